//! The packages and units: `packaging/build --debug` builds the .deb and .rpm files once (from the
//! debug binaries, so no release build), then each test checks one side of them: lintian has no
//! errors, the file lists and maintainer scripts hold what the booted-host suite relies on, and
//! `systemd/check` (`systemd-analyze verify` silent, exposure <= 2.5) passes.
//! Needs lintian, rpm, dpkg-dev, jq and systemd (scripts/install-deps installs them).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the repository")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The package files, built once for all the tests of this binary: (weft-cp.deb, weft-dp.deb,
/// weft-cp.rpm, weft-dp.rpm).
fn packages() -> &'static [PathBuf; 4] {
    static PACKAGES: OnceLock<[PathBuf; 4]> = OnceLock::new();
    PACKAGES.get_or_init(|| {
        let out = run(Command::new(repo().join("packaging/build")).arg("--debug"));
        assert!(
            out.status.success(),
            "packaging/build --debug failed:\n{}",
            text(&out)
        );
        let dir = repo().join("target/packages");
        let version = env!("CARGO_PKG_VERSION");
        let files = [
            dir.join(format!("weft-cp_{version}_amd64.deb")),
            dir.join(format!("weft-dp_{version}_amd64.deb")),
            dir.join(format!("weft-cp-{version}-1.x86_64.rpm")),
            dir.join(format!("weft-dp-{version}-1.x86_64.rpm")),
        ];
        for f in &files {
            assert!(f.is_file(), "packaging/build did not write {}", f.display());
        }
        files
    })
}

fn assert_contains_all(what: &str, haystack: &str, needles: &[&str]) {
    for n in needles {
        assert!(haystack.contains(n), "{what} lacks {n:?}:\n{haystack}");
    }
}

#[test]
fn lintian_finds_no_errors() {
    let [cp, dp, ..] = packages();
    let out = run(Command::new("lintian")
        .args(["--fail-on", "error"])
        .arg(cp)
        .arg(dp));
    assert!(
        out.status.success(),
        "lintian reports errors:\n{}",
        text(&out)
    );
    assert!(
        !text(&out).lines().any(|l| l.starts_with("E: ")),
        "lintian errors:\n{}",
        text(&out)
    );
}

#[test]
fn debs_hold_binaries_units_config_and_scripts() {
    let [cp, dp, ..] = packages();
    let list = |deb: &Path| {
        let out = run(Command::new("dpkg-deb").arg("-c").arg(deb));
        assert!(
            out.status.success(),
            "dpkg-deb -c {}: {}",
            deb.display(),
            text(&out)
        );
        text(&out)
    };
    let field =
        |deb: &Path, f: &str| text(&run(Command::new("dpkg-deb").arg("-f").arg(deb).arg(f)));
    let info = |deb: &Path, member: &str| {
        let out = run(Command::new("dpkg-deb").args(["-I"]).arg(deb).arg(member));
        assert!(
            out.status.success(),
            "{} has no {member}: {}",
            deb.display(),
            text(&out)
        );
        text(&out)
    };

    assert_contains_all(
        "weft-cp.deb",
        &list(cp),
        &[
            "-rwxr-xr-x root/root",
            "./usr/bin/weft-cp",
            "./usr/bin/weftctl",
            "./lib/systemd/system/weft-cp.service",
            "./etc/weft/cp.toml",
            "./usr/share/doc/weft-cp/copyright",
            "./usr/share/doc/weft-cp/changelog.gz",
            "./usr/share/man/man1/weft-cp.1.gz",
        ],
    );
    assert_contains_all(
        "weft-dp.deb",
        &list(dp),
        &[
            "./usr/bin/weft-dp",
            "./lib/systemd/system/weft-dp@.service",
            "./etc/weft/dp/example.toml.sample",
            "./usr/share/doc/weft-dp/copyright",
        ],
    );
    assert_eq!(info(cp, "conffiles").trim(), "/etc/weft/cp.toml");
    for deb in [cp, dp] {
        assert!(
            field(deb, "Depends").contains("libc6"),
            "{}: Depends",
            deb.display()
        );
        let postinst = info(deb, "postinst");
        assert_contains_all(
            "postinst",
            &postinst,
            &[
                "useradd --system",
                "[ -d /run/systemd/system ]",
                "try-restart",
            ],
        );
        assert_contains_all("prerm", &info(deb, "prerm"), &["stop"]);
        assert_contains_all(
            "postrm",
            &info(deb, "postrm"),
            &["purge", "userdel weft", "rm -rf /var/lib/weft"],
        );
    }
    assert!(info(dp, "postinst").contains("'weft-dp@*.service'"));

    // The shipped default config is one weft-cp accepts.
    let bin = repo().join("target/debug/weft-cp");
    let out = run(Command::new(&bin)
        .args(["validate", "--config"])
        .arg(repo().join("packaging/weft-cp/cp.toml")));
    assert!(
        out.status.success(),
        "the packaged /etc/weft/cp.toml is invalid: {}",
        text(&out)
    );
}

#[test]
fn rpms_hold_binaries_units_config_and_scriptlets() {
    let [.., cp, dp] = packages();
    let rpm = |args: &[&str], file: &Path| {
        let out = run(Command::new("rpm").args(args).arg(file));
        assert!(
            out.status.success(),
            "rpm {args:?} {}: {}",
            file.display(),
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_contains_all(
        "weft-cp.rpm -qpi",
        &rpm(&["-qpi"], cp),
        &["Name        : weft-cp", "License     : Apache-2.0"],
    );
    assert_contains_all(
        "weft-cp.rpm -qplv",
        &rpm(&["-qplv"], cp),
        &[
            "-rwxr-xr-x    1 root     root",
            "/usr/bin/weft-cp",
            "/usr/bin/weftctl",
            "/usr/lib/systemd/system/weft-cp.service",
            "/etc/weft/cp.toml",
        ],
    );
    assert_contains_all(
        "weft-dp.rpm -qpl",
        &rpm(&["-qpl"], dp),
        &[
            "/usr/bin/weft-dp",
            "/usr/lib/systemd/system/weft-dp@.service",
            "/etc/weft/dp/example.toml.sample",
        ],
    );
    assert_eq!(rpm(&["-qpc"], cp).trim(), "/etc/weft/cp.toml");
    for (file, unit) in [(cp, "weft-cp.service"), (dp, "'weft-dp@*.service'")] {
        assert_contains_all(
            "rpm --scripts",
            &rpm(&["-qp", "--scripts"], file),
            &[
                "preinstall scriptlet",
                "useradd --system",
                "postinstall scriptlet",
                "daemon-reload",
                "preuninstall scriptlet",
                &format!("systemctl stop {unit}"),
                "postuninstall scriptlet",
                &format!("systemctl try-restart {unit}"),
            ],
        );
    }
}

#[test]
fn systemd_units_verify_and_are_hardened() {
    packages(); // the debug binaries are built
    let out = run(Command::new(repo().join("systemd/check"))
        .arg("--bin-dir")
        .arg(repo().join("target/debug")));
    assert!(
        out.status.success(),
        "systemd/check failed:\n{}",
        text(&out)
    );
}
