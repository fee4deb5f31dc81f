//! Keeps the benchmark harness from rotting: `weft-bench datapath --smoke` and
//! `weft-bench cp --smoke` run for real (network namespaces, the debug binaries beside this
//! test) and their tables must hold numbers. The figures themselves are not judged here.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Result, ensure};
use weft_e2e::netns::Testbed;

fn bench(args: &[&str], out: &Path) -> Result<String> {
    let t0 = Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_weft-bench"))
        .args(args)
        .arg("--out")
        .arg(out)
        .output()?;
    eprintln!(
        "weft-bench {args:?} took {:?}\nstderr:\n{}",
        t0.elapsed(),
        String::from_utf8_lossy(&o.stderr)
    );
    ensure!(
        o.status.success(),
        "weft-bench {args:?} failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stdout)
    );
    let table = std::fs::read_to_string(out)?;
    ensure!(
        String::from_utf8_lossy(&o.stdout).contains(table.trim()),
        "the printed table differs from the file"
    );
    Ok(table)
}

/// The first figure of the table row of `path`.
fn first_figure(table: &str, path: &str) -> Option<f64> {
    let row = table
        .lines()
        .find(|l| l.starts_with(&format!("| {path} |")))?;
    row.split('|')
        .nth(2)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[test]
fn datapath_smoke_has_numbers() -> Result<()> {
    assert!(Testbed::available(), "network namespaces need root");
    let dir = tempfile::tempdir()?;
    // Pinned (one CPU per side), so that the `--pin` path runs too.
    let table = bench(
        &["datapath", "--smoke", "--pin"],
        &dir.path().join("datapath.md"),
    )?;
    eprintln!("{table}");
    ensure!(
        table.contains("; client host on CPU ") && table.contains(", server host on CPU "),
        "{table}"
    );
    for path in ["direct", "weft", "weft-pooled", "weft-quic", "weft-auto"] {
        let rps = first_figure(&table, path);
        ensure!(
            rps.is_some_and(|v| v > 0.0),
            "no req/s for {path}: {rps:?}\n{table}"
        );
    }
    ensure!(table.contains("### Targets"), "{table}");
    Ok(())
}

#[test]
fn cp_smoke_has_numbers() -> Result<()> {
    assert!(Testbed::available(), "network namespaces need root");
    let dir = tempfile::tempdir()?;
    let table = bench(&["cp", "--smoke"], &dir.path().join("cp.md"))?;
    eprintln!("{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("| all 20 registered"))
        .unwrap_or_default();
    let secs: Option<f64> = row
        .split('|')
        .nth(2)
        .and_then(|c| c.split_whitespace().next()?.parse().ok());
    ensure!(
        secs.is_some_and(|s| s > 0.0),
        "no registration time: {row:?}\n{table}"
    );
    ensure!(
        table.contains("| dataplanes that did not ACK the change | 0 |"),
        "{table}"
    );
    Ok(())
}

/// `--loss` takes a percentage from 0.01 to 99.99 and names what it got otherwise (what a
/// loss does to a testbed is checked in netns.rs, on the wire).
#[test]
fn datapath_loss_outside_its_range_is_refused() {
    for bad in ["0", "0.001", "100", "99.999", "-1", "lots"] {
        let o = Command::new(env!("CARGO_BIN_EXE_weft-bench"))
            .args(["datapath", "--smoke", &format!("--loss={bad}")])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "--loss {bad}: {err}");
        assert!(
            err.contains("--loss") && err.contains(&format!("{bad:?}")),
            "--loss {bad}: {err}"
        );
    }
}
