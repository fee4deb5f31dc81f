//! weft on booted hosts: Debian bookworm "VMs" (systemd-nspawn, systemd as PID 1, see
//! `weft_e2e::vmbed`) on the namespace testbed, with weft installed from its real packages
//! (`packaging/build --debug`) and run by systemd from its shipped units.
//!
//! Layout: vm1 (10.77.0.11) runs `weft-cp.service`; vm2 runs `weft-dp@web` in front of an HTTP
//! echo on 127.0.0.1:8081 with an outbound to `backend` on 127.0.0.1:20001; vm3 runs
//! `weft-dp@backend`, inbound 10.77.0.13:10002 in front of an HTTP echo on 127.0.0.1:8080, and
//! `weft-dp@echo`, inbound 10.77.0.13:10003 (TCP) in front of a TCP echo on 127.0.0.1:7070, which
//! web reaches on its outbound 127.0.0.1:20003.
//! Everything is configured through files in /etc/weft and tokens from `weftctl` run on vm1.
//! Every client runs inside a VM: 10.77.0.x is never contacted from the root namespace.
//!
//! The root file system is built by the first test that needs it (`scripts/mkrootfs`, cached
//! at /var/tmp/weft-rootfs-bookworm across runs). `WEFT_TEST_DEBS=DIR` uses the
//! `weft-{cp,dp}_*.deb` in DIR instead of running `packaging/build --debug`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use weft_e2e::vmbed::{Vm, VmBed};
use weft_e2e::{bin, wait_for};

const WEB_URL: &str = "http://127.0.0.1:20001/";

const ALLOW: &str = "type: MeshTrafficPermission\nmesh: default\nname: web-to-backend\nspec:\n  targetRef:\n    kind: MeshService\n    name: backend\n  from:\n  - targetRef:\n      kind: MeshService\n      name: web\n    default:\n      action: Allow\n";

const ALLOW_ECHO: &str = "type: MeshTrafficPermission\nmesh: default\nname: web-to-echo\nspec:\n  targetRef:\n    kind: MeshService\n    name: echo\n  from:\n  - targetRef:\n      kind: MeshService\n      name: web\n    default:\n      action: Allow\n";

const WEB_YAML: &str = "type: Dataplane\nmesh: default\nname: web\nnetworking:\n  address: 10.77.0.12\n  inbound:\n  - port: 10001\n    servicePort: 8081\n    tags:\n      kuma.io/service: web\n  outbound:\n  - port: 20001\n    tags:\n      kuma.io/service: backend\n  - port: 20003\n    tags:\n      kuma.io/service: echo\n";

/// A TCP service on vm3 beside backend: a second instance of the template unit.
const ECHO_YAML: &str = "type: Dataplane\nmesh: default\nname: echo\nnetworking:\n  address: 10.77.0.13\n  inbound:\n  - port: 10003\n    servicePort: 7070\n    tags:\n      kuma.io/service: echo\n      kuma.io/protocol: tcp\n";

/// web's outbound to echo, on vm2.
const ECHO_ADDR: &str = "127.0.0.1:20003";

const BACKEND_YAML: &str = "type: Dataplane\nmesh: default\nname: backend\nnetworking:\n  address: 10.77.0.13\n  inbound:\n  - port: 10002\n    servicePort: 8080\n    tags:\n      kuma.io/service: backend\n";

/// /etc/weft/cp.toml: the shipped defaults, plus the address dataplanes on other hosts use.
const CP_TOML: &str = "[general]\nmode = \"standalone\"\n[store]\ntype = \"sled\"\npath = \"/var/lib/weft/cp\"\n[api]\naddress = \"127.0.0.1:5681\"\n[dp_server]\naddress = \"0.0.0.0:5678\"\ntls_dir = \"/var/lib/weft/tls\"\ntls_sans = [\"10.77.0.11\"]\n[diagnostics]\naddress = \"127.0.0.1:5680\"\n";

/// The packages under test.
#[derive(Debug, Clone)]
struct Debs {
    cp: PathBuf,
    dp: PathBuf,
    version: String,
    /// The same packages with a higher version (`<version>+vmtest1`), for the upgrade.
    cp_next: PathBuf,
    dp_next: PathBuf,
    next_version: String,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// Builds the packages once per test process (or takes them from `$WEFT_TEST_DEBS`).
fn debs() -> Result<Debs> {
    static DEBS: OnceLock<Result<Debs, String>> = OnceLock::new();
    DEBS.get_or_init(|| build_debs().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build_debs() -> Result<Debs> {
    let ws = workspace();
    let dir = match std::env::var_os("WEFT_TEST_DEBS") {
        Some(d) => ws.join(d),
        None => {
            let script = ws.join("packaging/build");
            ensure!(
                script.exists(),
                "{} does not exist yet: the booted-host tests install the real packages",
                script.display()
            );
            let start = Instant::now();
            let out = Command::new(&script)
                .arg("--debug")
                .current_dir(&ws)
                .output()
                .context("running packaging/build --debug")?;
            ensure!(
                out.status.success(),
                "packaging/build --debug failed ({}):\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            eprintln!("packaging/build --debug took {:.1?}", start.elapsed());
            ws.join("target/packages")
        }
    };
    // Copied out at once: target/packages is rewritten by every packaging/build run (other
    // test binaries, or someone building by hand).
    let out_dir = ws.join("target/vmtest-debs");
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir)?;
    let copy = |prefix: &str| -> Result<PathBuf> {
        let from = newest(&dir, prefix)?;
        let to = out_dir.join(from.file_name().context("deb file name")?);
        std::fs::copy(&from, &to).with_context(|| format!("copying {}", from.display()))?;
        Ok(to)
    };
    let cp = copy("weft-cp_")?;
    let dp = copy("weft-dp_")?;
    let version = deb_field(&cp, "Version")?;
    ensure!(
        deb_field(&dp, "Version")? == version,
        "weft-cp and weft-dp versions differ"
    );
    let next_version = format!("{version}+vmtest1");
    let cp_next = rebuild_with_version(&cp, &next_version, &out_dir)?;
    let dp_next = rebuild_with_version(&dp, &next_version, &out_dir)?;
    Ok(Debs {
        cp,
        dp,
        version,
        cp_next,
        dp_next,
        next_version,
    })
}

/// The newest `PREFIX*_amd64.deb` in `dir`.
fn newest(dir: &Path, prefix: &str) -> Result<PathBuf> {
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) && name.ends_with(".deb") {
            found.push((e.metadata()?.modified()?, e.path()));
        }
    }
    found.sort();
    found
        .pop()
        .map(|(_, p)| p)
        .with_context(|| format!("no {prefix}*.deb in {}", dir.display()))
}

fn deb_field(deb: &Path, field: &str) -> Result<String> {
    let out = Command::new("dpkg-deb")
        .arg("-f")
        .arg(deb)
        .arg(field)
        .output()?;
    ensure!(out.status.success(), "dpkg-deb -f {}", deb.display());
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The same package with `Version: version` (unpacked with `dpkg-deb -R`, control edited,
/// rebuilt with `dpkg-deb -b`): a real upgrade for dpkg, maintainer scripts included.
fn rebuild_with_version(deb: &Path, version: &str, out_dir: &Path) -> Result<PathBuf> {
    let package = deb_field(deb, "Package")?;
    let arch = deb_field(deb, "Architecture")?;
    let tree = tempfile::tempdir_in(out_dir)?;
    let root = tree.path().join("pkg");
    let run = |cmd: &mut Command| -> Result<()> {
        let out = cmd.output()?;
        ensure!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    run(Command::new("dpkg-deb").arg("-R").arg(deb).arg(&root))?;
    let control = root.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control)?;
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("Version:") {
                format!("Version: {version}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&control, text)?;
    let out = out_dir.join(format!("{package}_{version}_{arch}.deb"));
    run(Command::new("dpkg-deb")
        .args(["-Znone", "-b"])
        .arg(&root)
        .arg(&out))?;
    Ok(out)
}

/// A step of the scenario, timed.
fn step<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let start = Instant::now();
    let r = f().with_context(|| format!("step `{name}`"));
    eprintln!(
        "[vms] {name}: {} in {:.1?}",
        if r.is_ok() { "ok" } else { "FAILED" },
        start.elapsed()
    );
    r
}

/// Files root writes for the weft user to read: root:weft 0640.
fn write_weft_file(vm: &Vm, path: &str, contents: &str) -> Result<()> {
    vm.write_file(path, contents, 0o640)?;
    vm.exec_ok(["chown", "root:weft", path])?;
    Ok(())
}

/// `curl` inside the VM: Ok(body) on 2xx.
fn curl(vm: &Vm, url: &str) -> Result<String> {
    let out = vm.exec_timeout(
        ["curl", "-fsS", "--max-time", "3", url],
        Duration::from_secs(5),
    );
    ensure!(
        out.status.success(),
        "curl {url} in vm{}: {} {}",
        vm.index(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits until web's outbound on vm2 reaches the backend on vm3 (through both dataplanes).
fn wait_traffic(bed: &VmBed, timeout: Duration) -> Result<String> {
    let vm2 = bed.vm(2);
    let mut last = String::new();
    let r = wait_for("web -> backend over the mesh", timeout, || {
        match curl(vm2, WEB_URL) {
            Ok(body) if body.contains("backend") => Some(body),
            Ok(body) => {
                last = format!("unexpected body {body}");
                None
            }
            Err(e) => {
                last = format!("{e:#}");
                None
            }
        }
    });
    r.with_context(|| {
        format!(
            "last: {last}\n--- vm2 weft-dp@web ---\n{}\n--- vm3 weft-dp@backend ---\n{}",
            vm2.unit_report("weft-dp@web"),
            bed.vm(3).unit_report("weft-dp@backend")
        )
    })
}

/// `weftctl ARGS` on vm1 (against the CP's API on its loopback).
fn weftctl(vm1: &Vm, args: &[&str]) -> Result<String> {
    vm1.exec_ok(
        ["env", "HOME=/root", "weftctl"]
            .into_iter()
            .chain(args.iter().copied()),
    )
}

fn token(vm1: &Vm, name: &str, service: &str) -> Result<String> {
    let out = weftctl(
        vm1,
        &[
            "generate",
            "dataplane-token",
            "--mesh",
            "default",
            "--name",
            name,
            "--tag",
            &format!("kuma.io/service={service}"),
            "--valid-for",
            "1h",
        ],
    )?;
    Ok(out.trim().to_owned())
}

/// A demo app (`weft-testapp ARGS`) as a plain unit `UNIT.service`, so it survives reboots.
fn install_demo(vm: &Vm, unit: &str, args: &str) -> Result<()> {
    if !vm.path("/usr/local/bin/weft-testapp").exists() {
        vm.copy_in(&bin("weft-testapp"), "/usr/local/bin/weft-testapp")?;
    }
    vm.write_file(
        &format!("/etc/systemd/system/{unit}.service"),
        &format!(
            "[Unit]\nDescription=demo app {unit}\n[Service]\nExecStart=/usr/local/bin/weft-testapp {args}\nRestart=always\nDynamicUser=yes\n[Install]\nWantedBy=multi-user.target\n"
        ),
        0o644,
    )?;
    vm.exec_ok(["systemctl", "daemon-reload"])?;
    vm.exec_ok(["systemctl", "enable", "--now", &format!("{unit}.service")])?;
    vm.wait_active(&format!("{unit}.service"), Duration::from_secs(20))
}

/// One line through web's outbound to echo (vm2 -> vm3): whether it came back.
fn echo_works(vm2: &Vm) -> bool {
    let out = vm2.exec_timeout(
        [
            "weft-testapp",
            "tcp-send",
            "--to",
            ECHO_ADDR,
            "--data",
            "ping",
            "--timeout",
            "2s",
        ],
        Duration::from_secs(5),
    );
    out.stdout == b"ping"
}

/// Installs weft-dp on vm `i` (unless it is there) and runs the dataplane `name` from files
/// in /etc/weft, its admin server on 127.0.0.1:`admin_port`.
fn install_dp(
    bed: &VmBed,
    i: usize,
    debs: &Debs,
    (name, yaml, tok): (&str, &str, &str),
    admin_port: u16,
) -> Result<()> {
    let vm = bed.vm(i);
    if !vm.path("/usr/bin/weft-dp").exists() {
        vm.install_debs(std::slice::from_ref(&debs.dp))?;
    }
    let ca = std::fs::read_to_string(bed.vm(1).path("/var/lib/weft/tls/ca.pem"))
        .context("reading the CP's CA on vm1")?;
    write_weft_file(vm, "/etc/weft/ca.pem", &ca)?;
    write_weft_file(vm, &format!("/etc/weft/dp/{name}.yaml"), yaml)?;
    write_weft_file(vm, &format!("/etc/weft/dp/{name}.token"), tok)?;
    write_weft_file(
        vm,
        &format!("/etc/weft/dp/{name}.toml"),
        &format!(
            "cp_address = \"https://10.77.0.11:5678\"\nca_cert_file = \"/etc/weft/ca.pem\"\ndataplane_file = \"/etc/weft/dp/{name}.yaml\"\ndataplane_token_file = \"/etc/weft/dp/{name}.token\"\nadmin_address = \"127.0.0.1:{admin_port}\"\nreconnect_max_backoff = \"1s\"\ndrain_timeout = \"2s\"\n"
        ),
    )?;
    let unit = format!("weft-dp@{name}");
    let out = vm.systemctl(&["enable", "--now", &unit]);
    ensure!(
        out.status.success(),
        "systemctl enable --now {unit}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        vm.unit_report(&unit)
    );
    vm.wait_active(&unit, Duration::from_secs(30))?;
    check_notify(vm, &unit, &format!("http://127.0.0.1:{admin_port}/ready"))
}

/// The shipped unit is `Type=notify`, so once `systemctl start/restart` has returned the
/// service has said READY=1: its readiness endpoint answers at once, without polling. (Debs
/// given with `$WEFT_TEST_DEBS` may be stand-ins with another type: only reported then.)
fn check_notify(vm: &Vm, unit: &str, ready_url: &str) -> Result<()> {
    let ty = vm.unit_property(unit, "Type");
    if ty != "notify" && std::env::var_os("WEFT_TEST_DEBS").is_some() {
        eprintln!("[vms] warning: {unit} is Type={ty} in the given packages");
        return Ok(());
    }
    ensure!(ty == "notify", "{unit} is Type={ty}, not notify");
    curl(vm, ready_url).with_context(|| format!("{unit} active but not ready"))?;
    Ok(())
}

/// `systemctl show -p NRestarts`.
fn restarts(vm: &Vm, unit: &str) -> u32 {
    vm.unit_property(unit, "NRestarts").parse().unwrap_or(0)
}

fn main_pid(vm: &Vm, unit: &str) -> u32 {
    vm.unit_property(unit, "MainPID").parse().unwrap_or(0)
}

/// What a purge must leave behind: nothing of weft.
fn leftovers(vm: &Vm) -> Vec<String> {
    let mut left = Vec::new();
    for d in ["/etc/weft", "/var/lib/weft", "/var/log/weft", "/run/weft"] {
        if vm.path(d).exists() {
            let out = vm.exec(["find", d]);
            left.push(format!(
                "{d}: {}",
                String::from_utf8_lossy(&out.stdout).trim()
            ));
        }
    }
    let units = vm.exec([
        "find",
        "/etc/systemd",
        "/lib/systemd",
        "/usr/lib/systemd",
        "-name",
        "weft*",
    ]);
    let units = String::from_utf8_lossy(&units.stdout).trim().to_owned();
    if !units.is_empty() {
        left.push(format!("unit files: {units}"));
    }
    if vm.exec(["getent", "passwd", "weft"]).status.success() {
        left.push("user weft".into());
    }
    if vm.exec(["getent", "group", "weft"]).status.success() {
        left.push("group weft".into());
    }
    let procs = vm.exec(["pgrep", "-l", "-x", "weft-cp|weft-dp"]);
    let procs = String::from_utf8_lossy(&procs.stdout).trim().to_owned();
    if !procs.is_empty() {
        left.push(format!("processes: {procs}"));
    }
    left
}

/// The harness itself: VMs boot with their own identity and address, reach each other, and
/// survive a hard crash with their overlay intact.
#[test]
fn vms_boot_reach_each_other_and_survive_a_hard_crash() -> Result<()> {
    let start = Instant::now();
    let mut bed = VmBed::new(2)?;
    eprintln!("[vms] 2 VMs booted in {:.1?}", start.elapsed());
    let (vm1, vm2) = (bed.vm(1), bed.vm(2));
    ensure!(vm1.exec_ok(["hostname"])?.trim() == "vm1");
    ensure!(vm2.exec_ok(["hostname"])?.trim() == "vm2");
    let id1 = vm1.exec_ok(["cat", "/etc/machine-id"])?;
    let id2 = vm2.exec_ok(["cat", "/etc/machine-id"])?;
    ensure!(id1 != id2, "machine ids must differ: {id1} {id2}");
    ensure!(vm1.exec_ok(["ps", "-o", "comm=", "-p", "1"])?.trim() == "systemd");
    let addr = vm2.exec_ok(["ip", "-4", "-o", "addr", "show", "dev", "eth0"])?;
    ensure!(addr.contains("10.77.0.12/24"), "vm2 eth0: {addr}");
    vm2.exec_ok(["ping", "-c", "1", "-W", "2", "vm1"])?;
    // A unit that comes back after a crash, and a file that is kept.
    vm2.write_file(
        "/etc/systemd/system/sleeper.service",
        "[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n",
        0o644,
    )?;
    vm2.exec_ok(["systemctl", "enable", "--now", "sleeper.service"])?;
    vm2.exec_ok(["sh", "-c", "echo kept > /var/lib/kept && sync"])?;
    let leader = vm2.leader();
    let start = Instant::now();
    bed.vm_mut(2).hard_reboot()?;
    eprintln!("[vms] hard reboot in {:.1?}", start.elapsed());
    let vm2 = bed.vm(2);
    ensure!(vm2.leader() != leader && vm2.boots() == 2);
    vm2.wait_active("sleeper.service", Duration::from_secs(10))?;
    ensure!(vm2.exec_ok(["cat", "/var/lib/kept"])?.trim() == "kept");
    // The network stack of the host is the VM's.
    let out = bed
        .bed
        .host(1)
        .run(["ping", "-c", "1", "-W", "2", "10.77.0.12"]);
    ensure!(out.status.success(), "host 1 -> vm2: {out:?}");
    let status = bed.vm_mut(1).poweroff()?;
    eprintln!("[vms] vm1 powered off: {status}");
    Ok(())
}

/// The packaged mesh on three booted hosts, through its lifecycle.
#[test]
fn packaged_mesh_on_booted_hosts() -> Result<()> {
    let suite = Instant::now();
    let debs = step("packages", debs)?;
    eprintln!(
        "[vms] packages {} and {} (version {}, upgrade to {})",
        debs.cp.display(),
        debs.dp.display(),
        debs.version,
        debs.next_version
    );
    let mut bed = step("boot 3 VMs", || VmBed::new(3))?;

    step("weft-cp on vm1", || {
        let vm1 = bed.vm(1);
        vm1.install_debs(std::slice::from_ref(&debs.cp))?;
        write_weft_file(vm1, "/etc/weft/cp.toml", CP_TOML)?;
        vm1.exec_ok(["systemctl", "enable", "weft-cp"])?;
        // Restart: the package may have started it with the shipped config already.
        let out = vm1.systemctl(&["restart", "weft-cp"]);
        ensure!(
            out.status.success(),
            "systemctl restart weft-cp: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            vm1.unit_report("weft-cp")
        );
        vm1.wait_active("weft-cp", Duration::from_secs(30))?;
        check_notify(vm1, "weft-cp", "http://127.0.0.1:5680/ready")?;
        wait_for("the CP's CA", Duration::from_secs(10), || {
            vm1.path("/var/lib/weft/tls/ca.pem").exists().then_some(())
        })?;
        for (name, yaml) in [("allow", ALLOW), ("allow-echo", ALLOW_ECHO)] {
            let f = format!("/root/{name}.yaml");
            vm1.write_file(&f, yaml, 0o644)?;
            weftctl(vm1, &["apply", "-f", &f])?;
        }
        Ok(())
    })?;

    step("weft-dp and demo apps on vm2 and vm3", || {
        let vm1 = bed.vm(1);
        let vm3 = bed.vm(3);
        install_demo(
            vm3,
            "demo",
            "http-echo --listen 127.0.0.1:8080 --name backend",
        )?;
        install_demo(vm3, "demo-echo", "tcp-echo --listen 127.0.0.1:7070")?;
        install_demo(
            bed.vm(2),
            "demo",
            "http-echo --listen 127.0.0.1:8081 --name web",
        )?;
        let t_backend = token(vm1, "backend", "backend")?;
        let t_echo = token(vm1, "echo", "echo")?;
        let t_web = token(vm1, "web", "web")?;
        install_dp(&bed, 3, &debs, ("backend", BACKEND_YAML, &t_backend), 9901)?;
        install_dp(&bed, 3, &debs, ("echo", ECHO_YAML, &t_echo), 9902)?;
        install_dp(&bed, 2, &debs, ("web", WEB_YAML, &t_web), 9901)?;
        Ok(())
    })?;

    step("traffic over mTLS; plaintext refused", || {
        let body = wait_traffic(&bed, Duration::from_secs(20))?;
        ensure!(body.contains("backend"), "{body}");
        wait_for("web -> echo (TCP)", Duration::from_secs(20), || {
            echo_works(bed.vm(2)).then_some(())
        })
        .with_context(|| bed.vm(3).unit_report("weft-dp@echo"))?;
        // The inbound speaks mTLS only: a plaintext request from vm2 gets no answer.
        let out = bed.vm(2).exec_timeout(
            ["curl", "-sS", "--max-time", "3", "http://10.77.0.13:10002/"],
            Duration::from_secs(5),
        );
        ensure!(
            !out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("backend"),
            "plaintext to backend's inbound was answered: {out:?}"
        );
        // Logs go to the journal natively (structured entries, not just captured stderr).
        for (i, unit) in [(1, "weft-cp"), (2, "weft-dp@web"), (3, "weft-dp@echo")] {
            let out = bed.vm(i).exec_ok([
                "journalctl",
                "--no-pager",
                "-o",
                "cat",
                "-u",
                unit,
                "_TRANSPORT=journal",
            ])?;
            ensure!(
                !out.trim().is_empty(),
                "no native journal entries of {unit}; its journal:\n{}",
                bed.vm(i).journal(unit, 50)
            );
        }
        Ok(())
    })?;

    step("reload under load drops nothing", || {
        let (vm1, vm2, vm3) = (bed.vm(1), bed.vm(2), bed.vm(3));
        let pid_web = main_pid(vm2, "weft-dp@web");
        let pid_cp = main_pid(vm1, "weft-cp");
        // One long-lived connection through web's and echo's dataplanes, a line every 100 ms.
        let mut chat = vm2.spawn(
            "chat-reload",
            Duration::from_secs(30),
            [
                "weft-testapp",
                "tcp-chat",
                "--to",
                ECHO_ADDR,
                "--every",
                "100ms",
                "--duration",
                "6s",
            ],
        )?;
        wait_for("tcp-chat to connect", Duration::from_secs(5), || {
            vm2.log("chat-reload")
                .contains("connected to")
                .then_some(())
        })
        .with_context(|| vm2.log("chat-reload"))?;
        let mut load = vm2.spawn(
            "load-reload",
            Duration::from_secs(30),
            [
                "weft-testapp",
                "load",
                "--url",
                WEB_URL,
                "--duration",
                "5s",
                "--interval",
                "50ms",
            ],
        )?;
        std::thread::sleep(Duration::from_millis(1000));
        for (vm, unit) in [
            (vm2, "weft-dp@web"),
            (vm1, "weft-cp"),
            (vm3, "weft-dp@backend"),
            (vm3, "weft-dp@echo"),
        ] {
            let out = vm.systemctl(&["reload", unit]);
            ensure!(
                out.status.success(),
                "systemctl reload {unit}: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                vm.unit_report(unit)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let status = load.wait()?;
        let log = vm2.log("load-reload");
        ensure!(status.success(), "load failed: {log}");
        let summary: Value =
            serde_json::from_str(log.trim()).with_context(|| format!("load summary: {log}"))?;
        ensure!(
            summary["failed"] == 0 && summary["ok"].as_u64().unwrap_or(0) > 0,
            "requests failed across reloads: {summary}"
        );
        chat.wait()?;
        let log = vm2.log("chat-reload");
        let chat: Value = log
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .with_context(|| format!("tcp-chat summary: {log}"))?;
        ensure!(
            chat["error"].is_null()
                && chat["sent"].as_u64().unwrap_or(0) > 20
                && chat["sent"] == chat["echoed"],
            "the long-lived connection suffered from the reloads: {chat}"
        );
        eprintln!("[vms] one connection across reloads: {chat}");
        ensure!(
            main_pid(vm2, "weft-dp@web") == pid_web,
            "reload restarted weft-dp@web"
        );
        ensure!(
            main_pid(vm1, "weft-cp") == pid_cp,
            "reload restarted weft-cp"
        );
        eprintln!("[vms] load across reloads: {summary}");
        Ok(())
    })?;

    step("kill -9 of the dp: systemd restarts it", || {
        let vm2 = bed.vm(2);
        let unit = "weft-dp@web";
        let before = restarts(vm2, unit);
        let pid = main_pid(vm2, unit);
        ensure!(pid != 0, "no MainPID for {unit}");
        vm2.exec_ok(["kill", "-9", &pid.to_string()])?;
        wait_for("NRestarts to increment", Duration::from_secs(15), || {
            (restarts(vm2, unit) > before).then_some(())
        })
        .with_context(|| vm2.unit_report(unit))?;
        vm2.wait_active(unit, Duration::from_secs(20))?;
        ensure!(main_pid(vm2, unit) != pid);
        wait_traffic(&bed, Duration::from_secs(20))?;
        Ok(())
    })?;

    step("hard reboot of vm2: rejoins without a token", || {
        let vm2 = bed.vm(2);
        // The identity is persisted: the token is not needed any more.
        vm2.exec_ok(["rm", "-f", "/etc/weft/dp/web.token"])?;
        let key = std::fs::read(vm2.path("/var/lib/weft/dp/web/key.pem"))
            .context("web's key in its state directory")?;
        bed.vm_mut(2).hard_reboot()?;
        let vm2 = bed.vm(2);
        vm2.wait_active("demo.service", Duration::from_secs(20))?;
        vm2.wait_active("weft-dp@web", Duration::from_secs(30))?;
        wait_traffic(&bed, Duration::from_secs(30))?;
        let key_after = std::fs::read(vm2.path("/var/lib/weft/dp/web/key.pem"))?;
        ensure!(key == key_after, "web's key changed across the reboot");
        Ok(())
    })?;

    step("in-place upgrade keeps the mesh working", || {
        bed.vm(1)
            .install_debs(std::slice::from_ref(&debs.cp_next))?;
        bed.vm(3)
            .install_debs(std::slice::from_ref(&debs.dp_next))?;
        bed.vm(2)
            .install_debs(std::slice::from_ref(&debs.dp_next))?;
        for (i, pkg) in [(1, "weft-cp"), (2, "weft-dp"), (3, "weft-dp")] {
            let v = bed
                .vm(i)
                .exec_ok(["dpkg-query", "-W", "-f", "${Version}", pkg])?;
            ensure!(v == debs.next_version, "vm{i} {pkg} is {v}");
        }
        // The edited conffile is kept.
        let conf = std::fs::read_to_string(bed.vm(1).path("/etc/weft/cp.toml"))?;
        ensure!(conf.contains("10.77.0.11"), "cp.toml after upgrade: {conf}");
        bed.vm(1).wait_active("weft-cp", Duration::from_secs(30))?;
        for (i, unit) in [
            (3, "weft-dp@backend"),
            (3, "weft-dp@echo"),
            (2, "weft-dp@web"),
        ] {
            bed.vm(i).wait_active(unit, Duration::from_secs(30))?;
        }
        wait_traffic(&bed, Duration::from_secs(30))?;
        wait_for(
            "web -> echo after the upgrade",
            Duration::from_secs(20),
            || echo_works(bed.vm(2)).then_some(()),
        )?;
        Ok(())
    })?;

    step("purge leaves nothing behind", || {
        let mut problems = Vec::new();
        for (i, pkg) in [(2, "weft-dp"), (3, "weft-dp"), (1, "weft-cp")] {
            let vm = bed.vm(i);
            vm.exec_ok(["dpkg", "-P", pkg])?;
            let left = leftovers(vm);
            if !left.is_empty() {
                problems.push(format!("vm{i} after dpkg -P {pkg}: {}", left.join("; ")));
            }
        }
        if !problems.is_empty() {
            bail!("{}", problems.join("\n"));
        }
        Ok(())
    })?;

    let start = Instant::now();
    drop(bed);
    eprintln!(
        "[vms] teardown {:.1?}; whole scenario {:.1?}",
        start.elapsed(),
        suite.elapsed()
    );
    Ok(())
}
