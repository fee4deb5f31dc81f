//! Booted "VMs" on the namespace testbed: each host of a [`Testbed`] runs a Debian bookworm
//! system under `systemd-nspawn -b` with systemd as its PID 1, so packages install with `dpkg`,
//! units run under a real service manager, and hosts can be crashed and rebooted.
//!
//! * The root file system is built once by `scripts/mkrootfs` (debootstrap) at
//!   [`DEFAULT_ROOTFS`] and shared read-only: every VM boots on its own overlay
//!   (`<testbed dir>/vm<i>/{upper,work,root}`) with its own `/etc/machine-id` and hostname
//!   `vm<i>`.
//! * VM `i` lives in host `i`'s network namespace (`--network-namespace-path`), so it has
//!   `eth0` at `10.77.0.(10+i)`, and [`Host::run`] (`ip netns exec`) shares its network stack.
//! * There is no systemd on the machine itself, so nspawn runs with `--register=no
//!   --keep-unit`, and everything inside a VM goes through `nsenter -t <its PID 1> -a`
//!   ([`Vm::exec`]): `systemctl`, `journalctl`, `dpkg`, test clients.
//!
//! **Safety rule:** as with [`Testbed`], test addresses exist only inside the testbed's
//! namespaces; clients run inside VMs or hosts, never in the root namespace.
//!
//! Cleanup ([`VmBed`]'s `Drop`): every VM is powered off (SIGTERM to its `systemd-nspawn`, by
//! PID; SIGKILL after 10 s), its overlay is unmounted (lazily if busy) and its upper layer
//! removed, and then the testbed kills what it spawned and deletes its namespaces. When the
//! drop happens during a panic, the VM directories (console logs, the upper layer with the
//! journal) are kept with the testbed's logs.

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::netns::{Host, Testbed};
use crate::wait_for;

/// Where `scripts/mkrootfs` keeps the shared root file system by default.
pub const DEFAULT_ROOTFS: &str = "/var/tmp/weft-rootfs-bookworm";

/// How long [`Vm::exec`] lets a command run before it is killed (inside the VM).
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a boot may take until `systemctl is-system-running` says running (or degraded).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a poweroff may take before nspawn is SIGKILLed.
pub const POWEROFF_TIMEOUT: Duration = Duration::from_secs(10);

/// The workspace root (`tests/..`).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// The root file system for VMs: `$WEFT_TEST_ROOTFS` or [`DEFAULT_ROOTFS`], built by
/// `scripts/mkrootfs` if it is not complete yet (a minute or two, once; concurrent callers wait
/// for one build). Prints how long debootstrap took when it ran.
pub fn rootfs() -> anyhow::Result<PathBuf> {
    let dir = std::env::var_os("WEFT_TEST_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOTFS));
    let start = Instant::now();
    let out = Command::new(workspace_root().join("scripts/mkrootfs"))
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .context("running scripts/mkrootfs")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("scripts/mkrootfs {} failed: {stderr}", dir.display());
    }
    if !stderr.trim().is_empty() {
        eprintln!("{}", stderr.trim());
        eprintln!(
            "rootfs {} ready after {:.1?}",
            dir.display(),
            start.elapsed()
        );
    }
    Ok(dir)
}

/// A [`Testbed`] whose hosts are booted VMs.
pub struct VmBed {
    vms: Vec<Vm>,
    /// The network testbed (dropped after the VMs).
    pub bed: Testbed,
}

/// One booted VM: a `systemd-nspawn -b` container on an overlay, in host `i`'s namespace.
pub struct Vm {
    index: usize,
    machine: String,
    host: Host,
    lower: PathBuf,
    dir: PathBuf,
    root: PathBuf,
    mounted: bool,
    nspawn: Option<Child>,
    leader: u32,
    boots: u32,
    execs: AtomicU64,
}

impl VmBed {
    /// `n` hosts, each running a booted VM on the shared root file system (built first if
    /// needed). Boots run in parallel; fails if one does not reach `running`/`degraded`
    /// within [`BOOT_TIMEOUT`] (whatever was started is cleaned up).
    pub fn new(n: usize) -> anyhow::Result<VmBed> {
        let lower = rootfs()?;
        Self::with_rootfs(n, &lower)
    }

    /// Like [`VmBed::new`], on the given (complete) root file system.
    pub fn with_rootfs(n: usize, lower: &Path) -> anyhow::Result<VmBed> {
        assert!(
            Testbed::available(),
            "network namespaces are unavailable: run as root"
        );
        let bed = Testbed::new(n)?;
        // The testbed's random id (`wt<id>-sw`), so machine names are unique too.
        let sw = bed.switch_ns();
        let id = sw
            .strip_prefix("wt")
            .and_then(|s| s.strip_suffix("-sw"))
            .unwrap_or(sw)
            .to_owned();
        let hosts_file = {
            let mut s = String::from("127.0.0.1 localhost\n");
            for h in bed.hosts() {
                s.push_str(&format!("{} vm{}\n", h.addr, h.index()));
            }
            s
        };
        let mut vb = VmBed {
            vms: Vec::new(),
            bed,
        };
        for i in 1..=n {
            let host = vb.bed.host(i).clone();
            let dir = vb.bed.dir().join(format!("vm{i}"));
            let mut vm = Vm {
                index: i,
                machine: format!("wt{id}-vm{i}"),
                host,
                lower: lower.to_owned(),
                root: dir.join("root"),
                dir,
                mounted: false,
                nspawn: None,
                leader: 0,
                boots: 0,
                execs: AtomicU64::new(0),
            };
            // Pushed before anything can fail, so Drop cleans up what was done.
            vm.prepare(&hosts_file)
                .with_context(|| format!("preparing vm{i}"))?;
            vb.vms.push(vm);
        }
        for vm in &mut vb.vms {
            vm.spawn_nspawn()?;
        }
        for vm in &mut vb.vms {
            vm.wait_booted()?;
        }
        Ok(vb)
    }

    /// VM `i` (1-based).
    pub fn vm(&self, i: usize) -> &Vm {
        assert!(
            (1..=self.vms.len()).contains(&i),
            "no vm{i} (1..={})",
            self.vms.len()
        );
        &self.vms[i - 1]
    }

    /// VM `i`, mutable (for reboots).
    pub fn vm_mut(&mut self, i: usize) -> &mut Vm {
        assert!(
            (1..=self.vms.len()).contains(&i),
            "no vm{i} (1..={})",
            self.vms.len()
        );
        &mut self.vms[i - 1]
    }

    /// All VMs.
    pub fn vms(&self) -> &[Vm] {
        &self.vms
    }
}

impl Drop for VmBed {
    fn drop(&mut self) {
        // All at once: SIGTERM every nspawn, then wait for each (SIGKILL after the deadline).
        for vm in &mut self.vms {
            vm.signal_nspawn("-TERM");
        }
        for vm in &mut self.vms {
            vm.reap_nspawn(POWEROFF_TIMEOUT);
            vm.unmount();
            if !std::thread::panicking() {
                let _ = std::fs::remove_dir_all(&vm.dir);
            }
        }
        // Then `self.bed` drops: spawned processes killed, namespaces deleted.
    }
}

/// Runs a host command to completion; fails with its stderr.
fn host_cmd(program: &str, args: &[&OsStr]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// 32 random hex digits (a machine id).
fn machine_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut s = String::new();
    for _ in 0..2 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.write_u32(std::process::id());
        s.push_str(&format!("{:016x}", h.finish()));
    }
    s
}

impl Vm {
    /// Index (1-based): hostname `vm<i>`, address `10.77.0.(10+i)`.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The network host it lives in ([`Host::run`] shares its network stack).
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// Its root as the machine sees it (the merged overlay): files written here appear in
    /// the VM.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// PID (in the root PID namespace) of the VM's PID 1 (systemd) in the current boot.
    pub fn leader(&self) -> u32 {
        self.leader
    }

    /// How many times it has booted.
    pub fn boots(&self) -> u32 {
        self.boots
    }

    /// nspawn's console output (all boots).
    pub fn console_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    fn prepare(&mut self, hosts_file: &str) -> anyhow::Result<()> {
        let upper = self.dir.join("upper");
        let work = self.dir.join("work");
        for d in [&upper, &work, &self.root] {
            std::fs::create_dir_all(d)?;
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            self.lower.display(),
            upper.display(),
            work.display()
        );
        host_cmd(
            "mount",
            &[
                "-t".as_ref(),
                "overlay".as_ref(),
                "overlay".as_ref(),
                "-o".as_ref(),
                opts.as_ref(),
                self.root.as_os_str(),
            ],
        )?;
        self.mounted = true;
        let etc = self.root.join("etc");
        std::fs::write(etc.join("hostname"), format!("vm{}\n", self.index))?;
        std::fs::write(etc.join("machine-id"), format!("{}\n", machine_id()))?;
        std::fs::write(etc.join("hosts"), hosts_file)?;
        Ok(())
    }

    /// Starts `systemd-nspawn -b` (does not wait for the boot).
    fn spawn_nspawn(&mut self) -> anyhow::Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("console.log"))?;
        // `setsid` execs in place (the child is no process-group leader), so the child's PID
        // is nspawn's.
        let child = Command::new("setsid")
            .arg("systemd-nspawn")
            .args([
                "-q",
                "-b",
                "--register=no",
                "--keep-unit",
                "--console=passive",
            ])
            .args(["--link-journal=no", "--resolv-conf=off", "--timezone=off"])
            .arg("-D")
            .arg(&self.root)
            .arg(format!("--machine={}", self.machine))
            .arg(format!("--hostname=vm{}", self.index))
            .arg(format!(
                "--network-namespace-path=/run/netns/{}",
                self.host.ns
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning systemd-nspawn (is systemd-container installed?)")?;
        self.nspawn = Some(child);
        self.leader = 0;
        self.boots += 1;
        Ok(())
    }

    /// Finds nspawn's child (the container's PID 1), then waits for `is-system-running`.
    fn wait_booted(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let nspawn_pid = self.nspawn.as_ref().map(Child::id).context("not started")?;
        let leader = loop {
            if let Some(status) = self
                .nspawn
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "vm{}: systemd-nspawn exited with {status}: {}",
                    self.index,
                    self.console_log()
                );
            }
            let systemd = child_of(nspawn_pid).filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == "systemd")
            });
            if let Some(pid) = systemd {
                break pid;
            }
            if Instant::now() >= deadline {
                bail!(
                    "vm{}: no systemd under nspawn {nspawn_pid}: {}",
                    self.index,
                    self.console_log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.leader = leader;
        loop {
            let out = self.exec_timeout(["systemctl", "is-system-running"], Duration::from_secs(5));
            let last = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if last == "running" || last == "degraded" {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let jobs = self.exec(["systemctl", "list-jobs", "--no-pager"]);
                bail!(
                    "vm{} did not boot within {BOOT_TIMEOUT:?} (state {last:?}); jobs:\n{}\nconsole:\n{}",
                    self.index,
                    String::from_utf8_lossy(&jobs.stdout),
                    self.console_log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `args` (program first) inside the VM (`nsenter -t <PID 1> -a`, clean environment
    /// with a system PATH) and returns its output. Killed inside the VM after
    /// [`EXEC_TIMEOUT`].
    pub fn exec<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.exec_timeout(args, EXEC_TIMEOUT)
    }

    /// [`Vm::exec`] with an explicit deadline.
    pub fn exec_timeout<I, S>(&self, args: I, timeout: Duration) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(timeout);
        cmd.args(args);
        let n = self.execs.fetch_add(1, Ordering::Relaxed);
        let base = self.dir.join(format!("exec{n}"));
        let (out_file, err_file) = (base.with_extension("out"), base.with_extension("err"));
        let mut child = File::create(&out_file)
            .and_then(|out| {
                let err = File::create(&err_file)?;
                cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn()
            })
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        // `timeout` inside the VM kills the command; this outer deadline only covers nsenter.
        let status = wait_for(
            &format!("{cmd:?}"),
            timeout + Duration::from_secs(5),
            || child.try_wait().ok().flatten(),
        )
        .unwrap_or_else(|_| {
            let _ = child.kill();
            child.wait().expect("wait for a killed child")
        });
        let out = Output {
            status,
            stdout: std::fs::read(&out_file).unwrap_or_default(),
            stderr: std::fs::read(&err_file).unwrap_or_default(),
        };
        let _ = std::fs::remove_file(&out_file);
        let _ = std::fs::remove_file(&err_file);
        out
    }

    /// `nsenter -t <PID 1> -a env -i PATH=… timeout -s KILL <secs>`: add the program and its
    /// arguments. For long-running clients use [`Vm::spawn`]. Panics if the VM is not running
    /// (after [`Vm::crash`] or [`Vm::poweroff`], until [`Vm::boot`]).
    pub fn command(&self, timeout: Duration) -> Command {
        assert!(self.leader != 0, "vm{} is not running", self.index);
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(self.leader.to_string())
            .args(["-a", "env", "-i"])
            .args([
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8",
                "SYSTEMD_PAGER=",
                "SYSTEMD_COLORS=0",
                "DEBIAN_FRONTEND=noninteractive",
                "timeout",
                "-s",
                "KILL",
            ])
            .arg(format!("{}", timeout.as_secs().max(1)));
        c
    }

    /// Starts `args` inside the VM in the background (killed inside the VM after `timeout`),
    /// output to `<vm dir>/<name>.log`. The caller waits for it ([`Child::wait`]) and reads
    /// the log with [`Vm::log`].
    pub fn spawn<I, S>(&self, name: &str, timeout: Duration, args: I) -> anyhow::Result<Child>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let log = File::create(self.dir.join(format!("{name}.log")))?;
        let mut cmd = self.command(timeout);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        cmd.spawn()
            .with_context(|| format!("spawning {name} in vm{}", self.index))
    }

    /// The output so far of a process started with [`Vm::spawn`].
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Like [`Vm::exec`], failing (with stdout and stderr) unless it exits 0; its stdout.
    pub fn exec_ok<I, S>(&self, args: I) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<S> = args.into_iter().collect();
        let out = self.exec(args.iter());
        if !out.status.success() {
            let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
            bail!(
                "vm{}: {shown:?} failed ({}):\nstdout: {}\nstderr: {}",
                self.index,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `systemctl ARGS…` inside the VM.
    pub fn systemctl(&self, args: &[&str]) -> Output {
        self.exec(std::iter::once("systemctl").chain(args.iter().copied()))
    }

    /// One property of a unit (`systemctl show -p NAME --value UNIT`).
    pub fn unit_property(&self, unit: &str, name: &str) -> String {
        let out = self.systemctl(&["show", "-p", name, "--value", unit]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Waits until `unit` is `active`; fails early if it is `failed`, with its status and
    /// journal.
    pub fn wait_active(&self, unit: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.unit_property(unit, "ActiveState");
            if state == "active" {
                return Ok(());
            }
            if state == "failed" || Instant::now() >= deadline {
                bail!(
                    "vm{}: {unit} is {state:?}, not active{}:\n{}",
                    self.index,
                    if state == "failed" {
                        String::new()
                    } else {
                        format!(" after {timeout:?}")
                    },
                    self.unit_report(unit)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `systemctl status` and the last journal lines of `unit`, for failure messages.
    pub fn unit_report(&self, unit: &str) -> String {
        let status = self.systemctl(&["status", "--no-pager", "-l", unit]);
        let journal = self.journal(unit, 60);
        format!(
            "{}\n--- journal ---\n{journal}",
            String::from_utf8_lossy(&status.stdout)
        )
    }

    /// The last `lines` journal lines of `unit`.
    pub fn journal(&self, unit: &str, lines: usize) -> String {
        let out = self.exec([
            "journalctl",
            "--no-pager",
            "-o",
            "short-precise",
            "-n",
            &lines.to_string(),
            "-u",
            unit,
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes `contents` to `path` (absolute, inside the VM) with `mode`, creating parent
    /// directories. Written through the merged overlay; ownership is root's.
    pub fn write_file(&self, path: &str, contents: &str, mode: u32) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let p = self.path(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, contents).with_context(|| format!("writing {}", p.display()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    }

    /// Copies a host file into the VM at `path` (absolute), keeping its mode.
    pub fn copy_in(&self, from: &Path, path: &str) -> anyhow::Result<()> {
        let p = self.path(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(from, &p)
            .with_context(|| format!("copying {} to vm{}:{path}", from.display(), self.index))?;
        Ok(())
    }

    /// The host path of `path` inside the VM (through the merged overlay).
    pub fn path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// Copies the `.deb` files into the VM (`/var/cache/weft-test/`) and installs them with
    /// `dpkg -i` (upgrades keep changed conffiles). Returns dpkg's output.
    pub fn install_debs(&self, debs: &[PathBuf]) -> anyhow::Result<String> {
        let mut args: Vec<String> = vec![
            "dpkg".into(),
            "--force-confdef".into(),
            "--force-confold".into(),
            "-i".into(),
        ];
        for d in debs {
            let name = d
                .file_name()
                .with_context(|| format!("{} has no file name", d.display()))?
                .to_string_lossy()
                .into_owned();
            let inside = format!("/var/cache/weft-test/{name}");
            self.copy_in(d, &inside)?;
            args.push(inside);
        }
        self.exec_ok(&args)
    }

    /// Hard crash and reboot: SIGKILL to the VM's PID 1 (as pulling the plug would), waits for
    /// nspawn to exit, and boots again on the same overlay and network namespace.
    pub fn hard_reboot(&mut self) -> anyhow::Result<()> {
        self.crash()?;
        self.boot()
    }

    /// SIGKILL to the VM's PID 1; waits for nspawn to exit. [`Vm::boot`] starts it again.
    pub fn crash(&mut self) -> anyhow::Result<()> {
        if self.leader == 0 {
            bail!("vm{} is not running", self.index);
        }
        // The leader is nspawn's unreaped child here, so the PID is still the VM's.
        let _ = Command::new("kill")
            .args(["-KILL", &self.leader.to_string()])
            .status();
        let status = self.reap_nspawn(POWEROFF_TIMEOUT);
        self.leader = 0;
        if status.is_none() {
            bail!(
                "vm{}: nspawn did not exit after its PID 1 was killed",
                self.index
            );
        }
        Ok(())
    }

    /// Boots a stopped VM again (same overlay, same namespace) and waits for it.
    pub fn boot(&mut self) -> anyhow::Result<()> {
        if self.nspawn.is_some() {
            bail!("vm{} is running", self.index);
        }
        self.spawn_nspawn()?;
        self.wait_booted()
    }

    /// Clean poweroff (SIGTERM to nspawn, which asks the VM's systemd to power off); SIGKILL
    /// after [`POWEROFF_TIMEOUT`]. Returns nspawn's exit status.
    pub fn poweroff(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal_nspawn("-TERM");
        let status = self.reap_nspawn(POWEROFF_TIMEOUT);
        self.leader = 0;
        status.with_context(|| format!("vm{}: nspawn could not be reaped", self.index))
    }

    /// Sends a signal to nspawn (by the PID of our unreaped child).
    fn signal_nspawn(&mut self, sig: &str) {
        if let Some(c) = self.nspawn.as_mut() {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = Command::new("kill")
                    .args([sig, &c.id().to_string()])
                    .status();
            }
        }
    }

    /// Waits up to `timeout` for nspawn to exit, SIGKILLs it after that, and reaps it.
    fn reap_nspawn(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.nspawn.take()?;
        let r = wait_for("systemd-nspawn to exit", timeout, || {
            child.try_wait().ok().flatten()
        });
        let status = match r {
            Ok(s) => Some(s),
            Err(_) => {
                eprintln!(
                    "vm{}: nspawn still running after {timeout:?}: SIGKILL",
                    self.index
                );
                let _ = child.kill();
                child.wait().ok()
            }
        };
        self.leader = 0;
        status
    }

    fn unmount(&mut self) {
        if !self.mounted {
            return;
        }
        let root = self.root.as_os_str();
        if let Err(e) = host_cmd("umount", &[root]) {
            eprintln!("vm{}: {e:#}; unmounting lazily", self.index);
            if let Err(e) = host_cmd("umount", &["-l".as_ref(), root]) {
                eprintln!("vm{}: {e:#}", self.index);
                return;
            }
        }
        self.mounted = false;
    }
}

/// The first process whose parent is `pid` (nspawn has one child: the container's PID 1).
fn child_of(pid: u32) -> Option<u32> {
    if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        return s.split_whitespace().next().and_then(|p| p.parse().ok());
    }
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // pid (comm) state ppid …: comm may contain spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok());
        if ppid == Some(pid) {
            return Some(p);
        }
    }
    None
}
