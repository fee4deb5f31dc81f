//! Drift check for the checked-in generated code.
//!
//! Compiles `proto/weft/v1/weft.proto` with `protox` (pure Rust, no `protoc` needed), runs
//! `tonic-prost-build` on the result and compares its output with `src/gen/weft.v1.rs`.
//! With `WEFT_REGEN=1` it writes the file instead:
//!
//! ```text
//! WEFT_REGEN=1 cargo test -p weft-api --test codegen
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};

const GENERATED: &str = "weft.v1.rs";

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Generates the Rust code for the proto into a temporary directory and returns it.
fn generate() -> Result<String> {
    let root = manifest_dir();
    let proto_dir = root.join("proto");
    let fds = protox::compile([proto_dir.join("weft/v1/weft.proto")], [&proto_dir])
        .context("compiling weft.proto with protox")?;

    let out = tempdir()?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .emit_rerun_if_changed(false)
        // Ordered maps: encoding is deterministic, so a config hashes to a stable version.
        .btree_map(".")
        .out_dir(&out)
        .compile_fds(fds)
        .context("generating Rust code with tonic-prost-build")?;

    let path = out.join(GENERATED);
    let code = std::fs::read_to_string(&path)
        .with_context(|| format!("reading generated {}", path.display()))?;
    std::fs::remove_dir_all(&out).ok();
    Ok(code)
}

/// A fresh, unique directory under the system temp dir.
fn tempdir() -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let dir = std::env::temp_dir().join(format!("weft-api-codegen-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn checked_in() -> PathBuf {
    manifest_dir().join("src/gen").join(GENERATED)
}

fn first_difference(a: &str, b: &str) -> Option<(usize, String, String)> {
    let mut al = a.lines();
    let mut bl = b.lines();
    for n in 1.. {
        match (al.next(), bl.next()) {
            (None, None) => return None,
            (x, y) if x == y => {}
            (x, y) => {
                return Some((
                    n,
                    x.unwrap_or("<end of file>").to_owned(),
                    y.unwrap_or("<end of file>").to_owned(),
                ));
            }
        }
    }
    None
}

fn write(path: &Path, code: &str) -> Result<()> {
    std::fs::write(path, code).with_context(|| format!("writing {}", path.display()))
}

#[test]
fn generated_code_is_up_to_date() -> Result<()> {
    let fresh = generate()?;
    let path = checked_in();

    if std::env::var_os("WEFT_REGEN").is_some_and(|v| v == "1") {
        write(&path, &fresh)?;
        eprintln!("wrote {}", path.display());
        return Ok(());
    }

    let current = std::fs::read_to_string(&path).unwrap_or_default();
    let diff = first_difference(&current, &fresh);
    ensure!(
        diff.is_none() && current == fresh,
        "generated code is stale: run `WEFT_REGEN=1 cargo test -p weft-api --test codegen`\n\
         ({} differs from what proto/weft/v1/weft.proto generates{})",
        path.display(),
        diff.map(|(n, have, want)| format!(
            "; first at line {n}:\n  checked in: {have}\n  generated:  {want}"
        ))
        .unwrap_or_default(),
    );
    Ok(())
}
