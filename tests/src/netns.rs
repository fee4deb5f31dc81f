//! A multi-host testbed made of network namespaces: one "switch" namespace holding a bridge,
//! and N host namespaces, each with an `eth0` (one end of a veth pair whose other end is a port
//! of the bridge) at `10.77.0.(10+i)/24` and `lo` up.
//!
//! **Safety rule:** the 10.77.0.0/24 addresses exist only inside these namespaces. The root
//! namespace has a default route off the machine, so nothing in the test process itself may talk
//! to them: every client runs inside a host, through [`Host::command`], [`Host::spawn`] or
//! [`Host::run`]. Nothing of the testbed lives in the root namespace: the veth pairs are created
//! inside the host namespaces (`ip -n HOST link add eth0 type veth peer name … netns SWITCH`).
//!
//! Every testbed has its own switch, and its namespace names carry a random id (`wt<id>-sw`,
//! `wt<id>-h<i>`), so testbeds can run in parallel in one process and across processes, all
//! using the same 10.77.0.x addresses.
//!
//! Processes started with [`Host::spawn`] are killed (SIGKILL, by PID) when their [`Proc`] is
//! dropped, and in any case when the [`Testbed`] is dropped, before its namespaces are deleted.
//! The `Child` stays unreaped until it is killed, so its PID cannot have been reused by then.
//!
//! `ip netns exec NS PROGRAM` execs PROGRAM in place (after `setns` and a private mount
//! namespace): the PID of the spawned `ip` process *is* the PID of PROGRAM, so killing it kills
//! the program, not a wrapper. The test `netns_exec_keeps_the_pid` checks this.

use std::ffi::OsStr;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::wait_for;

/// The most hosts one testbed has: addresses go up to 10.77.0.254.
pub const MAX_HOSTS: usize = 244;

/// The nftables tables of [`Testbed::set_loss`] in a receiving host: this, then the sending
/// host's index.
const LOSS_TABLE: &str = "weft_loss_from_h";

/// How long [`Host::run`] lets a command run before killing it.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// State shared by a testbed and its hosts: where logs go, and what was started.
struct Shared {
    dir: PathBuf,
    procs: Mutex<Vec<Arc<Mutex<Child>>>>,
    runs: AtomicU64,
    /// CPUs (a `taskset -c` list) that each host's commands are confined to, by host index.
    pins: Mutex<Vec<(usize, String)>>,
}

/// A switch namespace with a bridge and hosts on it. Dropping it kills what it started and
/// deletes its namespaces.
pub struct Testbed {
    id: String,
    switch: String,
    hosts: Vec<Host>,
    /// Namespaces created so far, deleted on drop (in reverse order).
    created: Vec<String>,
    shared: Arc<Shared>,
    dir: Option<tempfile::TempDir>,
}

/// One host: a network namespace with `eth0` on the testbed's bridge.
#[derive(Clone)]
pub struct Host {
    /// The namespace's name (`ip netns exec <ns> …`).
    pub ns: String,
    /// `eth0`'s address, `10.77.0.(10+i)`.
    pub addr: Ipv4Addr,
    index: usize,
    shared: Arc<Shared>,
}

/// A process started in a host by [`Host::spawn`]. SIGKILLed (by PID) when dropped.
pub struct Proc {
    name: String,
    pid: u32,
    child: Arc<Mutex<Child>>,
    log_file: PathBuf,
}

/// Runs `ip ARGS…`; fails with its stderr when it fails.
fn ip<I, S>(args: I) -> anyhow::Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("ip");
    cmd.args(args).stdin(Stdio::null());
    let out = cmd
        .output()
        .context("running `ip` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Six random base-36 characters.
fn random_id() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(SEQ.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    let mut n = h.finish();
    let mut s = String::new();
    for _ in 0..6 {
        s.push(char::from_digit((n % 36) as u32, 36).unwrap_or('0'));
        n /= 36;
    }
    s
}

/// The `Cpus_allowed_list` of a `/proc/<pid>/status` text (a `taskset -c` list, e.g. `0-1`).
pub fn cpus_allowed(status: &str) -> Option<&str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(str::trim)
}

/// The CPUs of a `taskset -c` list such as `0`, `2-3` or `0,2-3` (the form of
/// `Cpus_allowed_list`), in the order given.
pub fn parse_cpu_list(list: &str) -> anyhow::Result<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.trim().split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let parse = |n: &str| {
            n.trim()
                .parse::<usize>()
                .with_context(|| format!("CPU list {list:?}: {part:?} is not a CPU or a range"))
        };
        let (a, b) = (parse(a)?, parse(b)?);
        if a > b {
            bail!("CPU list {list:?}: range {part:?} runs backwards");
        }
        cpus.extend(a..=b);
    }
    Ok(cpus)
}

/// `cpus` as the hexadecimal bitmap sysfs CPU masks take (`rps_cpus`): 32-bit words, most
/// significant first, separated by commas, e.g. `2` for CPU 1 and `1,00000000` for CPU 32.
pub fn cpu_mask(cpus: &[usize]) -> String {
    let mut words = vec![0u32; cpus.iter().max().map_or(1, |m| m / 32 + 1)];
    for &c in cpus {
        words[c / 32] |= 1 << (c % 32);
    }
    let mut out = format!("{:x}", words[words.len() - 1]);
    for w in words.iter().rev().skip(1) {
        out += &format!(",{w:08x}");
    }
    out
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep using it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Testbed {
    /// Whether testbeds can be built here: we are root and `ip netns add` works. Tests should
    /// assert this (CI runs as root), not skip.
    pub fn available() -> bool {
        let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1))
                == Some("0")
        });
        if !root {
            return false;
        }
        let probe = format!("wt{}-probe", random_id());
        let ok = ip(["netns", "add", &probe]).is_ok();
        let _ = ip(["netns", "del", &probe]);
        ok
    }

    /// Builds a switch and `hosts` hosts (1 ≤ hosts ≤ [`MAX_HOSTS`]), and waits until every
    /// `eth0` is up. On failure, whatever was created is torn down again.
    pub fn new(hosts: usize) -> anyhow::Result<Testbed> {
        if hosts == 0 || hosts > MAX_HOSTS {
            bail!("a testbed has 1..={MAX_HOSTS} hosts, not {hosts}");
        }
        let id = random_id();
        let dir = tempfile::Builder::new()
            .prefix(&format!("weft-testbed-{id}-"))
            .tempdir()?;
        let shared = Arc::new(Shared {
            dir: dir.path().to_owned(),
            procs: Mutex::new(Vec::new()),
            pins: Mutex::new(Vec::new()),
            runs: AtomicU64::new(0),
        });
        let mut tb = Testbed {
            switch: format!("wt{id}-sw"),
            id,
            hosts: Vec::new(),
            created: Vec::new(),
            shared,
            dir: Some(dir),
        };
        tb.build(hosts)
            .with_context(|| format!("building testbed wt{}", tb.id))?;
        Ok(tb)
    }

    fn add_ns(&mut self, name: &str) -> anyhow::Result<()> {
        ip(["netns", "add", name])?;
        self.created.push(name.to_owned());
        Ok(())
    }

    fn build(&mut self, hosts: usize) -> anyhow::Result<()> {
        let sw = self.switch.clone();
        self.add_ns(&sw)?;
        ip(["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(["-n", &sw, "link", "set", "br0", "up"])?;
        for i in 1..=hosts {
            let ns = format!("wt{}-h{i}", self.id);
            let port = Self::port(i);
            let addr = Ipv4Addr::new(10, 77, 0, (10 + i) as u8);
            self.add_ns(&ns)?;
            // Created inside the host, peer moved straight into the switch: nothing touches the
            // root namespace, so names cannot clash with other testbeds.
            ip([
                "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns",
                &sw,
            ])?;
            ip(["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            ip([
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(["-n", &ns, "link", "set", "lo", "up"])?;
            self.hosts.push(Host {
                ns,
                addr,
                index: i,
                shared: self.shared.clone(),
            });
        }
        for i in 1..=hosts {
            self.wait_eth0_up(i)?;
        }
        Ok(())
    }

    /// The bridge port (in the switch namespace) of host `i`.
    fn port(i: usize) -> String {
        format!("veth-h{i}")
    }

    fn wait_eth0_up(&self, i: usize) -> anyhow::Result<()> {
        let ns = &self.host(i).ns;
        wait_for(
            &format!("eth0 of {ns} to be up"),
            Duration::from_secs(5),
            || {
                ip(["-n", ns, "-o", "link", "show", "dev", "eth0"])
                    .ok()
                    .filter(|l| l.contains("state UP"))
                    .map(|_| ())
            },
        )
    }

    /// Host `i` (1-based, as in `10.77.0.(10+i)`). Panics when there is no such host.
    pub fn host(&self, i: usize) -> &Host {
        assert!(
            (1..=self.hosts.len()).contains(&i),
            "testbed has hosts 1..={}, not {i}",
            self.hosts.len()
        );
        &self.hosts[i - 1]
    }

    /// All hosts, in order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The switch namespace (it holds `br0` and the hosts' ports `veth-h<i>`).
    pub fn switch_ns(&self) -> &str {
        &self.switch
    }

    /// Every namespace this testbed created (switch first).
    pub fn namespaces(&self) -> &[String] {
        &self.created
    }

    /// The temporary directory holding process logs. It is kept (and its path printed) when
    /// the testbed is dropped during a panic.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Confines host `i` to `cpus`, a `taskset -c` list such as `0` or `2-3`, as a machine of its
    /// own: what it starts from now on ([`Host::command`], [`Host::spawn`], [`Host::run`]) runs
    /// only there, and so does the kernel's receive processing of the packets that reach its
    /// `eth0` (Receive Packet Steering, `rps_cpus`), which a veth would otherwise leave to the
    /// sending host's CPU — on two machines the receiver's own CPU takes its NIC's packets.
    /// The scheduler no longer moves a host's processes onto another host's CPU from one run to
    /// the next. Processes already running stay where they are. Pinning again replaces both.
    pub fn pin(&self, i: usize, cpus: &str) -> anyhow::Result<()> {
        let host = self.host(i);
        let mask = cpu_mask(&parse_cpu_list(cpus)?);
        let steer = format!(
            "for q in /sys/class/net/eth0/queues/rx-*/rps_cpus; do echo {mask} > \"$q\" || exit 1; done"
        );
        ip(["netns", "exec", &host.ns, "sh", "-c", &steer])
            .with_context(|| format!("steering {}'s received packets to CPUs {cpus}", host.ns))?;
        let mut pins = lock(&self.shared.pins);
        pins.retain(|(h, _)| *h != host.index);
        pins.push((host.index, cpus.to_owned()));
        Ok(())
    }

    /// Sets the MTU of every host's link (both ends of each veth; the bridge follows its
    /// ports), e.g. 9000 for jumbo frames. Before traffic: connections already open keep
    /// what they learned of the path.
    pub fn set_mtu(&self, mtu: u32) -> anyhow::Result<()> {
        let mtu = mtu.to_string();
        for h in &self.hosts {
            ip(["-n", &h.ns, "link", "set", "eth0", "mtu", &mtu])?;
            ip([
                "-n",
                &self.switch,
                "link",
                "set",
                &Self::port(h.index),
                "mtu",
                &mtu,
            ])?;
        }
        Ok(())
    }

    /// Makes the path between hosts `i` and `j` lose `percent` % of its frames each way, at
    /// random (nftables `numgen random` in each host's input from the other; `tc netem` is not
    /// built into this kernel). A frame, not a batch: the kernel hands a veth whole TCP and UDP
    /// segmentation batches (up to 64 KiB) and cuts them into frames only if the link cannot,
    /// so the two hosts' links get TCP and UDP segmentation offload turned off, and the
    /// batches arrive cut, as they would from a wire. Other paths keep their packets (each
    /// receiving host has a table per sending host); setting a path again replaces its rate,
    /// and 0 loses nothing (the offloads stay off). Steps of 0.01 %.
    pub fn set_loss(&self, i: usize, j: usize, percent: f64) -> anyhow::Result<()> {
        if !(0.0..100.0).contains(&percent) {
            bail!("a loss rate is a percentage in [0, 100), not {percent}");
        }
        let per_10k = (percent * 100.0).round() as u32;
        if (percent > 0.0 && per_10k == 0) || per_10k >= 10_000 {
            bail!("a loss rate of {percent} % is not a step of 0.01 % between 0 and 100");
        }
        for (from, to) in [(i, j), (j, i)] {
            let (from, to) = (self.host(from), self.host(to));
            let offloads = [
                "netns",
                "exec",
                &from.ns,
                "ethtool",
                "-K",
                "eth0",
                "tso",
                "off",
                "tx-udp-segmentation",
                "off",
            ];
            ip(offloads).with_context(|| format!("segmentation offloads of {}", from.ns))?;
            let table = format!("inet {LOSS_TABLE}{}", from.index);
            let script = format!(
                "add table {table}; flush table {table}; \
                 add chain {table} input {{ type filter hook input priority 0; policy accept; }}; \
                 add rule {table} input ip saddr {} numgen random mod 10000 < {per_10k} counter drop",
                from.addr
            );
            ip(["netns", "exec", &to.ns, "nft", &script])
                .with_context(|| format!("loss from {} to {}", from.addr, to.ns))?;
        }
        Ok(())
    }

    /// How many frames [`Testbed::set_loss`] has dropped on their way into host `i`, from all
    /// hosts (0 when no loss was set there).
    pub fn lost(&self, i: usize) -> anyhow::Result<u64> {
        let ns = &self.host(i).ns;
        let ruleset = ip(["netns", "exec", ns, "nft", "list", "ruleset"])?;
        let mut lost = 0;
        for table in ruleset.split("table inet ").skip(1) {
            if !table.starts_with(LOSS_TABLE) {
                continue;
            }
            for n in table.split("counter packets ").skip(1) {
                let n = n.split_whitespace().next().unwrap_or_default();
                lost += n
                    .parse::<u64>()
                    .with_context(|| format!("loss counter {n:?} in {ns}"))?;
            }
        }
        Ok(lost)
    }

    /// Unplugs host `i`: its bridge port goes down, so its packets go nowhere (no RST, no ICMP).
    pub fn cut(&self, i: usize) -> anyhow::Result<()> {
        self.host(i);
        ip(["-n", &self.switch, "link", "set", &Self::port(i), "down"])?;
        Ok(())
    }

    /// Plugs host `i` back in and waits until its `eth0` has carrier again.
    pub fn restore(&self, i: usize) -> anyhow::Result<()> {
        self.host(i);
        ip(["-n", &self.switch, "link", "set", &Self::port(i), "up"])?;
        self.wait_eth0_up(i)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for child in lock(&self.shared.procs).drain(..) {
            let mut c = lock(&child);
            // A reaped child is not signalled again, so this cannot hit a reused PID.
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.created.iter().rev() {
            if let Err(e) = ip(["netns", "del", ns]) {
                eprintln!("testbed cleanup: {e:#}");
            }
        }
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                eprintln!(
                    "testbed wt{}: logs kept in {}",
                    self.id,
                    dir.keep().display()
                );
            }
        }
    }
}

impl Host {
    /// Index of the host (1-based).
    pub fn index(&self) -> usize {
        self.index
    }

    /// `ip netns exec <ns> <program>`: add arguments, then pass it to [`Host::spawn`] (or run it
    /// yourself). `ip netns exec` execs `program` in place, so the child's PID is `program`'s;
    /// on a host pinned with [`Testbed::pin`] it is `ip netns exec <ns> taskset -c <cpus>
    /// <program>`, and `taskset` execs in place too.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]);
        let pins = lock(&self.shared.pins);
        if let Some((_, cpus)) = pins.iter().find(|(h, _)| *h == self.index) {
            c.args(["taskset", "-c", cpus]);
        }
        c.arg(program);
        c
    }

    /// `SocketAddr` of this host's address and `port`.
    pub fn sock(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.addr, port))
    }

    /// Checks that `cmd` runs inside this host (it came from [`Host::command`]).
    fn check_inside(&self, cmd: &Command) -> anyhow::Result<()> {
        let args: Vec<&OsStr> = cmd.get_args().take(3).collect();
        if cmd.get_program() != "ip"
            || args != [OsStr::new("netns"), "exec".as_ref(), self.ns.as_ref()]
        {
            bail!(
                "{cmd:?} does not run inside {}: build it with Host::command",
                self.ns
            );
        }
        Ok(())
    }

    /// Starts `cmd` (from [`Host::command`]) with stdin from /dev/null and stdout and stderr
    /// appended to `<testbed dir>/h<i>-<name>.log`. The testbed kills it on drop at the latest.
    pub fn spawn(&self, name: &str, mut cmd: Command) -> anyhow::Result<Proc> {
        self.check_inside(&cmd)?;
        let log_file = self.shared.dir.join(format!("h{}-{name}.log", self.index));
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_file)
            .with_context(|| format!("opening {}", log_file.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {name} in {}: {cmd:?}", self.ns))?;
        let pid = child.id();
        let child = Arc::new(Mutex::new(child));
        lock(&self.shared.procs).push(child.clone());
        Ok(Proc {
            name: name.to_owned(),
            pid,
            child,
            log_file,
        })
    }

    /// Runs `args` (program first) inside the host to completion, with stdout and stderr
    /// captured. Killed after [`RUN_TIMEOUT`] (the status then shows SIGKILL). Panics only if
    /// the command cannot be started at all.
    pub fn run<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.run_timeout(args, RUN_TIMEOUT)
    }

    /// [`Host::run`] with an explicit deadline.
    pub fn run_timeout<I, S>(&self, args: I, timeout: Duration) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut args = args.into_iter();
        let program = args.next().expect("Host::run needs a program");
        let mut cmd = self.command(program);
        cmd.args(args);
        let n = self.shared.runs.fetch_add(1, Ordering::Relaxed);
        let base = self.shared.dir.join(format!("h{}-run{n}", self.index));
        let (out_file, err_file) = (base.with_extension("out"), base.with_extension("err"));
        let mut child = File::create(&out_file)
            .and_then(|out| {
                let err = File::create(&err_file)?;
                cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn()
            })
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        let status = wait_for(&format!("{cmd:?}"), timeout, || {
            child.try_wait().ok().flatten()
        })
        .unwrap_or_else(|_| {
            let _ = child.kill();
            child.wait().expect("wait for a killed child")
        });
        Output {
            status,
            stdout: std::fs::read(&out_file).unwrap_or_default(),
            stderr: std::fs::read(&err_file).unwrap_or_default(),
        }
    }
}

impl Proc {
    /// The name given to [`Host::spawn`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process's PID (that of the program itself: `ip netns exec` execs in place).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// Path of its log file.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// Whether it is still running (an exited process is reaped here).
    pub fn is_running(&self) -> bool {
        matches!(lock(&self.child).try_wait(), Ok(None))
    }

    /// Waits until it has printed `listening on ADDR` and returns ADDR. Fails with the log when
    /// it exits first or the deadline passes.
    pub fn wait_listening(&self, timeout: Duration) -> anyhow::Result<SocketAddr> {
        let r = wait_for(
            &format!("{} to print `listening on ADDR`", self.name),
            timeout,
            || {
                let log = self.log();
                if let Some(a) = log.lines().find_map(|l| l.strip_prefix("listening on ")) {
                    return Some(a.trim().parse::<SocketAddr>().map_err(|e| e.to_string()));
                }
                lock(&self.child)
                    .try_wait()
                    .ok()
                    .flatten()
                    .map(|status| Err(format!("it exited with {status}")))
            },
        );
        match r {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => bail!("{}: {e}; log:\n{}", self.name, self.log()),
            Err(e) => Err(e).with_context(|| format!("log of {}:\n{}", self.name, self.log())),
        }
    }

    /// SIGKILL, as a crash would, and reaps it.
    pub fn kill9(&self) {
        let mut c = lock(&self.child);
        let _ = c.kill();
        let _ = c.wait();
    }

    /// SIGTERM, then waits up to `deadline` for it to exit. If it has not, it is SIGKILLed
    /// and this fails.
    pub fn term(&self, deadline: Duration) -> anyhow::Result<ExitStatus> {
        {
            let mut c = lock(&self.child);
            if let Some(status) = c.try_wait()? {
                return Ok(status);
            }
            // Still unreaped while we hold the lock, so the PID is still this process's.
            let ok = Command::new("kill")
                .args(["-TERM", &self.pid.to_string()])
                .status()?
                .success();
            if !ok {
                bail!("kill -TERM {} failed", self.pid);
            }
        }
        let r = wait_for(
            &format!("{} (pid {}) to exit after SIGTERM", self.name, self.pid),
            deadline,
            || lock(&self.child).try_wait().ok().flatten(),
        );
        if r.is_err() {
            self.kill9();
        }
        r
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_and_masks() {
        assert_eq!(parse_cpu_list("0").unwrap(), [0]);
        assert_eq!(parse_cpu_list("0,2-4\n").unwrap(), [0, 2, 3, 4]);
        assert_eq!(cpu_mask(&[0]), "1");
        assert_eq!(cpu_mask(&[1]), "2");
        assert_eq!(cpu_mask(&[0, 2, 3, 4]), "1d");
        assert_eq!(cpu_mask(&[32]), "1,00000000");
        assert_eq!(cpu_mask(&[1, 35, 64]), "1,00000008,00000002");
        for bad in ["", "x", "1-", "3-1", "0,,1"] {
            let e = parse_cpu_list(bad).unwrap_err().to_string();
            assert!(e.contains("CPU list"), "{bad:?}: {e}");
        }
    }
}
