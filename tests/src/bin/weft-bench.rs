//! `weft-bench`: the benchmark harness (see BENCHMARKS.md).
//!
//! - `weft-bench datapath`: the same HTTP workload (nginx backend; wrk, and this binary's own
//!   fixed-rate and idle-connection clients) over each path between two network-namespace
//!   hosts: direct, the weft-dp pair, and HAProxy, nginx `stream` and stunnel mTLS pairs, paths
//!   alternating within each round; every figure is the median of the rounds.
//! - `weft-bench cp`: N simulated dataplanes (real token, real CSR, real TLS gRPC stream) against
//!   a real `weft-cp`: time to register, time for a policy change to be ACKed by all, CP memory
//!   and CPU.
//!
//! Everything runs inside namespaces of a testbed (tests/src/netns.rs): every client, proxy and
//! server, the CP and the simulated dataplanes. Nothing is sent from the root namespace.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Parser, Subcommand};
use weft_e2e::netns::{Host, Proc, Testbed, cpus_allowed, parse_cpu_list};
use weft_e2e::wait_for;

#[derive(Parser)]
#[command(
    name = "weft-bench",
    about = "weft's benchmark harness (see BENCHMARKS.md)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Data path: direct vs weft-dp pair vs HAProxy / nginx stream / stunnel mTLS pairs.
    Datapath(DatapathArgs),
    /// Control plane: N simulated dataplanes against a real weft-cp.
    Cp(CpArgs),
    /// (internal) the simulated dataplanes, run inside the CP's namespace by `weft-bench cp`.
    #[command(hide = true)]
    CpAgent(AgentArgs),
    /// (internal) open-loop fixed-rate HTTP/1.1 client, run inside the client host by
    /// `weft-bench datapath`; prints latency percentiles in µs as JSON.
    #[command(hide = true)]
    Load(client::LoadArgs),
    /// (internal) opens N keep-alive connections, one request on each, and holds them until
    /// killed; run inside the client host by `weft-bench datapath`.
    #[command(hide = true)]
    Hold(client::HoldArgs),
}

#[derive(Args)]
struct Common {
    /// Seconds-long mode: 1 round, ~1 s per figure (cp: 20 dataplanes).
    #[arg(long)]
    smoke: bool,
    /// Directory holding weft-cp, weft-dp and weftctl (default: this binary's directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Where the markdown table goes (default: <target>/bench/<datapath|cp>.md).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct DatapathArgs {
    #[command(flatten)]
    common: Common,
    /// Rounds (each figure is the median over them). Default 3, 1 with --smoke.
    #[arg(long)]
    rounds: Option<usize>,
    /// Duration of each measurement, e.g. 5s. Default 5s, 1s with --smoke.
    #[arg(long)]
    duration: Option<humantime::Duration>,
    /// Comma-separated paths (direct,weft,haproxy,nginx,stunnel). Default: all whose tools are installed.
    #[arg(long)]
    paths: Option<String>,
    /// Idle keep-alive connections held open for the memory-per-connection figure. Default
    /// 1000, 50 with --smoke.
    #[arg(long)]
    conns: Option<usize>,
    /// A/B in one run: also measures each weft path with this weft-dp binary (e.g. a build of
    /// another commit), as `<path>-b`, alternating with the others.
    #[arg(long, value_name = "WEFT_DP")]
    dp_b: Option<PathBuf>,
    /// MTU of the testbed's links (default 1500, Ethernet's), e.g. 9000 for jumbo frames.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1280..=65535))]
    mtu: Option<u32>,
    /// Gives the client host (wrk, the client-side proxies) and the server host (the
    /// server-side proxies, the nginx backend) half of this process's CPUs each, as two
    /// machines would have: no process of one side runs on the other's CPU, each host's
    /// received packets are processed on its own CPU (RPS on its link), and the placement no
    /// longer changes from one run to the next.
    #[arg(long)]
    pin: bool,
    /// Loses this % of the frames each way between the client and the server host, at random
    /// (e.g. 1 or 0.1; the two hosts' links send frames one by one, segmentation offloads off,
    /// so that a loss is a frame and not a 64 KiB batch): how each transport copes with loss.
    #[arg(long, value_parser = loss_percent)]
    loss: Option<f64>,
}

/// A `--loss` value: a percentage from 0.01 to 99.99 (the testbed's steps are 0.01 %).
fn loss_percent(s: &str) -> Result<f64, String> {
    let p: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|e| format!("{s:?}: {e}"))?;
    if (0.01..=99.99).contains(&p) {
        Ok(p)
    } else {
        Err(format!(
            "{s:?}: a loss is a percentage from 0.01 to 99.99 (steps of 0.01)"
        ))
    }
}

#[derive(Args)]
struct CpArgs {
    #[command(flatten)]
    common: Common,
    /// Simulated dataplanes. Default 1000, 20 with --smoke.
    #[arg(long)]
    dataplanes: Option<usize>,
    /// OS threads of the simulated dataplanes' runtime.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Rounds, each with a fresh CP (each figure is the median over them). Default 3, 1 with
    /// --smoke.
    #[arg(long)]
    rounds: Option<usize>,
}

#[derive(Args)]
struct AgentArgs {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long)]
    ca: PathBuf,
    #[arg(long)]
    token: PathBuf,
    #[arg(long)]
    dataplanes: usize,
    #[arg(long)]
    threads: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Datapath(a) => {
            watch_signals();
            datapath::run(a)
        }
        Cmd::Cp(a) => {
            watch_signals();
            cp::run(a)
        }
        Cmd::CpAgent(a) => agent::run(a),
        Cmd::Load(a) => client::load(a),
        Cmd::Hold(a) => client::hold(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared helpers

/// Set by SIGTERM or SIGINT: the run stops at its next measurement with an error, so that the
/// testbed (namespaces, processes) is dropped and cleaned up rather than left behind.
static STOP: AtomicBool = AtomicBool::new(false);

/// Watches for SIGTERM and SIGINT (a second one exits at once).
fn watch_signals() {
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            eprintln!("weft-bench: stopping at the next measurement, then cleaning up");
            STOP.store(true, Ordering::SeqCst);
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            std::process::exit(130);
        });
    });
}

/// An error once a signal asked the run to stop.
fn stopping() -> Result<()> {
    ensure!(!STOP.load(Ordering::SeqCst), "stopped by a signal");
    Ok(())
}

fn bin_dir(c: &Common) -> Result<PathBuf> {
    match &c.bin_dir {
        Some(d) => Ok(d.clone()),
        None => Ok(std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .to_owned()),
    }
}

fn out_file(c: &Common, bins: &Path, name: &str) -> PathBuf {
    c.out.clone().unwrap_or_else(|| {
        bins.parent()
            .unwrap_or(bins)
            .join("bench")
            .join(format!("{name}.md"))
    })
}

fn need(bins: &Path, name: &str) -> Result<PathBuf> {
    let p = bins.join(name);
    ensure!(
        p.exists(),
        "{} is missing: build it first (`cargo build --release --workspace --bins`)",
        p.display()
    );
    Ok(p)
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.exists())
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| stdout(&o).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The CPUs this process may run on (`Cpus_allowed_list` of /proc/self/status).
fn allowed_cpus() -> Result<Vec<usize>> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    parse_cpu_list(cpus_allowed(&status).context("no Cpus_allowed_list in /proc/self/status")?)
}

/// utime + stime of a process (all its threads), in seconds.
fn cpu_secs(pid: u32, tck: f64) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
    let rest = s.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (n(11) + n(12)) / tck
}

/// VmRSS in KiB.
fn rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0.0)
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn machine_line() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| stdout(&o).trim().to_owned())
        .unwrap_or_default();
    format!("{date}; {cpus} CPUs ({model}); kernel {}", kernel.trim())
}

fn write_out(path: &Path, text: &str) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("weft-bench: wrote {}", path.display());
    Ok(())
}

/// A testbed with `weft-cp` on host 1 (dataplane server on 0.0.0.0:5678 inside it, REST API on
/// its loopback). Like `weft_e2e::meshbed`, but with binaries from `bins` (a release build).
struct Mesh {
    bed: Testbed,
    cp: Proc,
    bins: PathBuf,
}

const API: &str = "http://127.0.0.1:5681";

impl Mesh {
    fn new(hosts: usize, bins: &Path) -> Result<Mesh> {
        ensure!(
            Testbed::available(),
            "network namespaces are unavailable: run as root"
        );
        let bed = Testbed::new(hosts)?;
        let dir = bed.dir().to_owned();
        let cfg = dir.join("cp.toml");
        std::fs::write(
            &cfg,
            format!(
                "[store]\ntype = \"sled\"\npath = \"{}\"\n[dp_server]\naddress = \"0.0.0.0:5678\"\ntls_dir = \"{}\"\ntls_sans = [\"{}\"]\n",
                dir.join("cp-store").display(),
                dir.join("cp-tls").display(),
                bed.host(1).addr
            ),
        )?;
        let h1 = bed.host(1).clone();
        let mut cmd = h1.command(need(bins, "weft-cp")?);
        cmd.args(["run", "--config"]).arg(&cfg);
        cmd.env("WEFT_LOG", "warn");
        let cp = h1.spawn("cp", cmd)?;
        wait_for("weft-cp /ready", Duration::from_secs(30), || {
            if !cp.is_running() {
                return Some(Err(anyhow::anyhow!("weft-cp exited: {}", cp.log())));
            }
            let out = h1.run_timeout(
                [
                    "curl",
                    "-fsS",
                    "-o",
                    "/dev/null",
                    "http://127.0.0.1:5680/ready",
                ],
                Duration::from_secs(2),
            );
            out.status.success().then_some(Ok(()))
        })??;
        Ok(Mesh {
            bed,
            cp,
            bins: bins.to_owned(),
        })
    }

    fn host(&self, i: usize) -> &Host {
        self.bed.host(i)
    }

    fn dir(&self) -> &Path {
        self.bed.dir()
    }

    fn ca_file(&self) -> PathBuf {
        self.dir().join("cp-tls/ca.pem")
    }

    fn weftctl(&self, args: &[&str]) -> Result<String> {
        let mut all: Vec<String> = vec![
            "env".into(),
            format!(
                "WEFTCTL_CONFIG={}",
                self.dir().join("weftctl.toml").display()
            ),
            need(&self.bins, "weftctl")?.display().to_string(),
            "--api-address".into(),
            API.into(),
        ];
        all.extend(args.iter().map(|s| (*s).to_owned()));
        let out = self.host(1).run(all);
        ensure!(
            out.status.success(),
            "weftctl {args:?}: {}{}",
            stdout(&out),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(stdout(&out))
    }

    fn apply(&self, name: &str, yaml: &str) -> Result<()> {
        let f = self.dir().join(format!("{name}.yaml"));
        std::fs::write(&f, yaml)?;
        self.weftctl(&["apply", "-f", &f.display().to_string()])?;
        Ok(())
    }

    fn token(&self, mesh: &str, name: Option<&str>, service: &str) -> Result<String> {
        let tag = format!("kuma.io/service={service}");
        let mut args = vec![
            "generate",
            "dataplane-token",
            "--mesh",
            mesh,
            "--tag",
            &tag,
            "--valid-for",
            "6h",
        ];
        if let Some(n) = name {
            args.extend(["--name", n]);
        }
        Ok(self.weftctl(&args)?.trim().to_owned())
    }

    /// `weft-dp run` with one runtime worker on host `i`, and `extra` flags; `bin` instead of
    /// the bin dir's weft-dp if given.
    #[allow(clippy::too_many_arguments)]
    fn start_dp(
        &self,
        bin: Option<&Path>,
        i: usize,
        mesh: &str,
        name: &str,
        service: &str,
        yaml: &str,
        extra: &[&str],
    ) -> Result<Proc> {
        let dir = self.dir().join(format!("dp-{mesh}-{name}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("dataplane.yaml"), yaml)?;
        std::fs::write(dir.join("token"), self.token(mesh, Some(name), service)?)?;
        let host = self.host(i).clone();
        let mut cmd = match bin {
            Some(b) => host.command(b),
            None => host.command(need(&self.bins, "weft-dp")?),
        };
        cmd.arg("run")
            .arg("--cp-address")
            .arg(format!("https://{}:5678", self.host(1).addr))
            .arg("--ca-cert-file")
            .arg(self.ca_file())
            .arg("--dataplane-file")
            .arg(dir.join("dataplane.yaml"))
            .arg("--dataplane-token-file")
            .arg(dir.join("token"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--worker-threads", "1", "--drain-timeout", "1s"])
            .args(extra);
        cmd.env("RUST_LOG", "warn");
        host.spawn(&format!("dp-{mesh}-{name}"), cmd)
    }
}

// ---------------------------------------------------------------------------------------------
mod datapath {
    use super::*;

    const SERVER_NAME: &str = "bench-server";
    const ONE_KIB: usize = 1024;
    const ONE_MIB: usize = 1 << 20;

    /// One path from the client host (h2) to the backend on the server host (h3).
    struct Path_ {
        name: &'static str,
        /// `http://…` base URL on the client host.
        base: String,
        /// The proxy processes whose CPU and memory are counted.
        procs: Vec<Proc>,
        note: String,
    }

    #[derive(Default, Clone)]
    struct Round {
        rps: f64,
        errors: u64,
        p50_ms: f64,
        p99_ms: f64,
        cps: f64,
        /// Time per new connection with one client (µs): the latency a connection adds.
        conn_us: f64,
        bulk_gbps: f64,
        cpu_us: f64,
        cpu_conn_us: f64,
        rss_mib: f64,
        /// RSS per held idle connection, KiB: both proxies, client side, server side.
        conn_kib: f64,
        conn_kib_client: f64,
        conn_kib_server: f64,
    }

    const FIGURES: [&str; 12] = [
        "rps", "p50", "p99", "cps", "conn1", "bulk", "cpu", "cpuc", "rss", "conn", "conn_c",
        "conn_s",
    ];

    fn get(r: &Round, f: &str) -> f64 {
        match f {
            "rps" => r.rps,
            "p50" => r.p50_ms,
            "p99" => r.p99_ms,
            "cps" => r.cps,
            "conn1" => r.conn_us,
            "bulk" => r.bulk_gbps,
            "cpu" => r.cpu_us,
            "cpuc" => r.cpu_conn_us,
            "conn" => r.conn_kib,
            "conn_c" => r.conn_kib_client,
            "conn_s" => r.conn_kib_server,
            _ => r.rss_mib,
        }
    }

    pub(super) fn run(a: DatapathArgs) -> Result<()> {
        let bins = bin_dir(&a.common)?;
        let smoke = a.common.smoke;
        let rounds = a.rounds.unwrap_or(if smoke { 1 } else { 3 }).max(1);
        let dur: Duration = a
            .duration
            .map(Into::into)
            .unwrap_or(Duration::from_secs(if smoke { 1 } else { 5 }));
        let secs = dur.as_secs().max(1);
        let wrk = which("wrk").context("wrk is not installed (scripts/install-deps)")?;
        let conns = a.conns.unwrap_or(if smoke { 50 } else { 1000 }).max(1);
        let nginx = which("nginx").context("nginx (the backend) is not installed")?;
        let stream_mod = Path::new("/usr/lib/nginx/modules/ngx_stream_module.so");
        let wanted: Vec<String> = a
            .paths
            .as_deref()
            .unwrap_or(DEFAULT_PATHS)
            .split(',')
            .map(|s| s.trim().to_owned())
            .collect();
        let want = |p: &str| wanted.iter().any(|w| w == p);
        let mut skipped: Vec<String> = Vec::new();

        let mesh = Mesh::new(3, &bins)?;
        if let Some(mtu) = a.mtu {
            mesh.bed.set_mtu(mtu)?;
        }
        let mut setup = format!("links' MTU {}", a.mtu.unwrap_or(1500));
        if a.pin {
            let cpus = allowed_cpus()?;
            ensure!(
                cpus.len() >= 2,
                "--pin needs 2 CPUs, this process may use {cpus:?}"
            );
            let list = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
            let (c, sv) = cpus.split_at(cpus.len() / 2);
            let (c, sv) = (list(c), list(sv));
            mesh.bed.pin(2, &c)?;
            mesh.bed.pin(3, &sv)?;
            setup += &format!(
                "; client host on CPU {c}, server host on CPU {sv} (processes and received packets)"
            );
        }
        if let Some(p) = a.loss {
            mesh.bed.set_loss(2, 3, p)?;
            setup += &format!(
                "; {p} % of the frames lost each way between the client and server hosts (segmentation offloads off)"
            );
        }
        let dir = mesh.dir().to_owned();
        let (client, server) = (mesh.host(2).clone(), mesh.host(3).clone());
        certs(&dir, &server)?;
        let tck = clk_tck();

        // Backend: nginx on the server host, one process, serving /1k and /1m.
        std::fs::create_dir_all(dir.join("www"))?;
        std::fs::write(dir.join("www/1k"), vec![b'a'; ONE_KIB])?;
        std::fs::write(dir.join("www/1m"), vec![b'b'; ONE_MIB])?;
        let backend_conf = format!(
            "{head}http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  tcp_nodelay on;\n  keepalive_requests 10000000;\n  keepalive_timeout 120s;\n  default_type application/octet-stream;\n  client_body_temp_path {d}/tmp-body;\n  proxy_temp_path {d}/tmp-proxy;\n  fastcgi_temp_path {d}/tmp-fcgi;\n  uwsgi_temp_path {d}/tmp-uwsgi;\n  scgi_temp_path {d}/tmp-scgi;\n  server {{\n    listen 0.0.0.0:8080 backlog=4096;\n    root {d}/www;\n  }}\n}}\n",
            head = nginx_head(&dir, "backend", false),
            d = dir.display()
        );
        let backend = spawn_nginx(&server, &nginx, &dir, "backend", &backend_conf)?;

        let mut paths: Vec<Path_> = Vec::new();
        if want("direct") {
            paths.push(Path_ {
                name: "direct",
                base: format!("http://{}:8080", server.addr),
                procs: Vec::new(),
                note: "plain TCP to the backend".into(),
            });
        }
        // Each weft variant (and its `-b` twin with `--dp-b`): a pair in a mesh of its own (the
        // transport is per mesh), on its own ports.
        let mut meshes: Vec<&'static str> = Vec::new();
        for (k, v) in WEFT.iter().enumerate().filter(|(_, v)| want(v.path)) {
            for bin in std::iter::once(None).chain(a.dp_b.as_deref().map(Some)) {
                let (path, mesh_name) = if bin.is_some() { v.b } else { (v.path, v.mesh) };
                let port = 10 * k + if bin.is_some() { 5 } else { 0 };
                let (inbound, outbound) = (10002 + port, 20001 + port);
                mesh.apply(
                    &format!("mesh-{mesh_name}"),
                    &mesh_yaml(mesh_name, v.transport),
                )?;
                mesh.apply(
                    &format!("allow-{mesh_name}"),
                    &ALLOW.replace("mesh: default", &format!("mesh: {mesh_name}")),
                )?;
                let extra: &[&str] = if v.resumption {
                    &[]
                } else {
                    &["--tls-resumption", "false"]
                };
                let s = mesh.start_dp(
                    bin,
                    3,
                    mesh_name,
                    "backend",
                    "backend",
                    &backend_yaml(mesh_name, inbound),
                    extra,
                )?;
                let c = mesh.start_dp(
                    bin,
                    2,
                    mesh_name,
                    "web",
                    "web",
                    &web_yaml(mesh_name, outbound),
                    extra,
                )?;
                let by = bin.map_or(String::new(), |b| format!(" ({})", b.display()));
                paths.push(Path_ {
                    name: path,
                    base: format!("http://127.0.0.1:{outbound}"),
                    procs: vec![c, s],
                    note: format!(
                        "weft-dp{by} --worker-threads 1, authorization on; {}",
                        v.note
                    ),
                });
                meshes.push(mesh_name);
            }
        }
        if want("haproxy") {
            match which("haproxy") {
                Some(hp) => paths.push(haproxy(&dir, &client, &server, &hp)?),
                None => skipped.push("haproxy (not installed)".into()),
            }
        }
        if want("nginx") {
            if stream_mod.exists() {
                paths.push(nginx_pair(&dir, &client, &server, &nginx)?);
            } else {
                skipped.push("nginx stream (libnginx-mod-stream not installed)".into());
            }
        }
        if want("stunnel") {
            match which("stunnel4").or_else(|| which("stunnel")) {
                Some(st) => paths.push(stunnel(&dir, &client, &server, &st)?),
                None => skipped.push("stunnel (not installed)".into()),
            }
        }
        if want("rusnel") {
            match which("rusnel").or_else(|| {
                let p = PathBuf::from("/var/tmp/rusnel/bin/rusnel");
                p.exists().then_some(p)
            }) {
                Some(r) => paths.push(rusnel(&dir, &client, &server, &r)?),
                None => skipped.push(
                    "rusnel (not installed: `cargo install rusnel --root /var/tmp/rusnel`)".into(),
                ),
            }
        }
        ensure!(!paths.is_empty(), "no path to measure");

        // Idle RSS, before any traffic: weft-dp once it reports ready (config applied, valid
        // certificate); the others once started (they load their certificates at start).
        for mesh_name in &meshes {
            for (i, name) in [(2, "web"), (3, "backend")] {
                dp_ready(&mesh, i, mesh_name, name)?;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        for p in &paths {
            detach(attach(&p.procs, &format!("{}-idle", p.name)), None);
        }
        let idle: BTreeMap<&'static str, Vec<f64>> = paths
            .iter()
            .map(|p| {
                (
                    p.name,
                    p.procs.iter().map(|q| rss_kib(q.pid()) / 1024.0).collect(),
                )
            })
            .collect();

        // Every path serves the 1 KiB object before anything is measured.
        let mut working = Vec::new();
        for p in paths {
            let url = format!("{}/1k", p.base);
            let r = wait_for(
                &format!("{} to serve {url}", p.name),
                Duration::from_secs(30),
                || {
                    let o = client.run_timeout(
                        ["curl", "-sS", "--max-time", "2", &url],
                        Duration::from_secs(3),
                    );
                    (o.status.success() && o.stdout.len() == ONE_KIB).then_some(())
                },
            );
            match r {
                Ok(()) => working.push(p),
                Err(e) => {
                    let logs: Vec<String> = p.procs.iter().map(|x| x.log()).collect();
                    eprintln!(
                        "weft-bench: {} does not work, skipped: {e}; logs: {logs:?}",
                        p.name
                    );
                    skipped.push(format!("{} (did not serve: {e})", p.name));
                }
            }
        }
        let paths = working;
        let _ = &backend;

        // Warm-up: a short keep-alive run per path.
        for p in &paths {
            let _ = wrk_run(&client, &wrk, &format!("{}/1k", p.base), 16, 1, false);
        }

        // The memory-per-connection baseline: each proxy's RSS after the warm-up, before the
        // first idle connections are held. Later rounds compare against it too, as freed
        // memory mostly stays with the process (allocator and pools) and would hide the cost.
        let base: BTreeMap<&'static str, Vec<f64>> = paths
            .iter()
            .map(|p| (p.name, p.procs.iter().map(|q| rss_kib(q.pid())).collect()))
            .collect();
        for p in &paths {
            detach(attach(&p.procs, &format!("{}-base", p.name)), None);
        }

        let mut results: BTreeMap<&'static str, Vec<Round>> = BTreeMap::new();
        for round in 0..rounds {
            stopping()?;
            let mut this: BTreeMap<&'static str, Round> = BTreeMap::new();
            // Figure by figure, the paths alternate: A B C … A B C …
            for p in &paths {
                let r = this.entry(p.name).or_default();
                let (held, rss) = hold_run(
                    &client,
                    &format!("{}/1k", p.base),
                    conns,
                    &p.procs,
                    &format!("{}-{round}", p.name),
                )?;
                r.errors += (conns - held) as u64;
                let per = |i: usize| match (rss.get(i), base[p.name].get(i)) {
                    (Some(after), Some(before)) if held > 0 => (after - before) / held as f64,
                    _ => f64::NAN,
                };
                r.conn_kib_client = per(0);
                r.conn_kib_server = per(1);
                r.conn_kib = r.conn_kib_client + r.conn_kib_server;
                eprintln!(
                    "round {round} {}: {held} idle conns held, {:.1} KiB each ({:.1} + {:.1})",
                    p.name, r.conn_kib, r.conn_kib_client, r.conn_kib_server
                );
            }
            for p in &paths {
                let pids: Vec<u32> = p.procs.iter().map(Proc::pid).collect();
                let cpu0: f64 = pids.iter().map(|&q| cpu_secs(q, tck)).sum();
                let attached = attach(&p.procs, &format!("{}-rps-{round}", p.name));
                let w = wrk_run(&client, &wrk, &format!("{}/1k", p.base), 16, secs, false)?;
                let cpu1: f64 = pids.iter().map(|&q| cpu_secs(q, tck)).sum();
                detach(attached, Some(w.requests));
                let r = this.entry(p.name).or_default();
                r.rps = w.rps;
                r.errors += w.errors;
                r.cpu_us = if pids.is_empty() || w.requests == 0 {
                    f64::NAN
                } else {
                    (cpu1 - cpu0) * 1e6 / w.requests as f64
                };
                r.rss_mib = if pids.is_empty() {
                    f64::NAN
                } else {
                    pids.iter().map(|&q| rss_kib(q)).sum::<f64>() / 1024.0
                };
                eprintln!(
                    "round {round} {}: {:.0} req/s, {:.1} µs CPU/req",
                    p.name, r.rps, r.cpu_us
                );
            }
            for p in &paths {
                let r = this.entry(p.name).or_default();
                let l = load_run(&client, &format!("{}/1k", p.base), secs)?;
                r.p50_ms = l.p50_ms;
                r.p99_ms = l.p99_ms;
                r.errors += l.errors;
                eprintln!(
                    "round {round} {}: p50 {:.3} ms p99 {:.3} ms @1000 req/s",
                    p.name, r.p50_ms, r.p99_ms
                );
            }
            for p in &paths {
                let pids: Vec<u32> = p.procs.iter().map(Proc::pid).collect();
                let cpu0: f64 = pids.iter().map(|&q| cpu_secs(q, tck)).sum();
                let attached = attach(&p.procs, &format!("{}-cps-{round}", p.name));
                let w = wrk_run(&client, &wrk, &format!("{}/1k", p.base), 16, secs, true)?;
                let cpu1: f64 = pids.iter().map(|&q| cpu_secs(q, tck)).sum();
                detach(attached, Some(w.requests));
                let r = this.entry(p.name).or_default();
                r.cpu_conn_us = if pids.is_empty() || w.requests == 0 {
                    f64::NAN
                } else {
                    (cpu1 - cpu0) * 1e6 / w.requests as f64
                };
                r.cps = w.rps;
                r.errors += w.errors;
                eprintln!("round {round} {}: {:.0} new conns/s", p.name, r.cps);
            }
            for p in &paths {
                // One client, one connection at a time: what opening a connection costs in
                // time (round trips between the proxies, wake-ups), not in throughput.
                let w = wrk_run(&client, &wrk, &format!("{}/1k", p.base), 1, secs, true)?;
                let r = this.entry(p.name).or_default();
                r.conn_us = if w.rps > 0.0 { 1e6 / w.rps } else { f64::NAN };
                r.errors += w.errors;
                eprintln!(
                    "round {round} {}: {:.0} µs per new conn, one client",
                    p.name, r.conn_us
                );
            }
            for p in &paths {
                let pids: Vec<u32> = p.procs.iter().map(Proc::pid).collect();
                let attached = attach(&p.procs, &format!("{}-bulk-{round}", p.name));
                let cpu0: Vec<f64> = pids.iter().map(|&q| cpu_secs(q, tck)).collect();
                let t0 = Instant::now();
                let w = wrk_run(&client, &wrk, &format!("{}/1m", p.base), 1, secs, false)?;
                // Each proxy's share of a core during the run (wrk's start-up included): whether
                // one end is what limits the stream.
                let wall = t0.elapsed().as_secs_f64();
                let busy: Vec<String> = pids
                    .iter()
                    .zip(&cpu0)
                    .map(|(&q, c0)| format!("{:.0} %", (cpu_secs(q, tck) - c0) * 100.0 / wall))
                    .collect();
                detach(attached, Some(w.requests));
                let r = this.entry(p.name).or_default();
                r.bulk_gbps = w.rps * ONE_MIB as f64 * 8.0 / 1e9;
                r.errors += w.errors;
                let busy = if busy.is_empty() {
                    String::new()
                } else {
                    format!("; proxies busy (client, server): {}", busy.join(", "))
                };
                eprintln!(
                    "round {round} {}: {:.2} Gbit/s bulk{busy}",
                    p.name, r.bulk_gbps
                );
            }
            for (k, v) in this {
                results.entry(k).or_default().push(v);
            }
        }

        let table = render(
            &paths,
            &results,
            &idle,
            &skipped,
            (rounds, secs, conns, &setup),
            &bins,
        );
        println!("{table}");
        write_out(&out_file(&a.common, &bins, "datapath"), &table)?;
        drop(paths);
        drop(backend);
        drop(mesh);
        Ok(())
    }

    fn fmt_val(f: &str, v: f64) -> String {
        if !v.is_finite() {
            return "–".into();
        }
        match f {
            "rps" | "cps" => format!("{v:.0}"),
            "p50" | "p99" => format!("{v:.3}"),
            "conn" | "conn_c" | "conn_s" => format!("{v:.2}"),
            "bulk" => format!("{v:.2}"),
            _ => format!("{v:.1}"),
        }
    }

    fn render(
        paths: &[Path_],
        results: &BTreeMap<&'static str, Vec<Round>>,
        idle: &BTreeMap<&'static str, Vec<f64>>,
        skipped: &[String],
        (rounds, secs, conns, setup): (usize, u64, usize, &str),
        bins: &Path,
    ) -> String {
        let med = |path: &str, f: &str| -> f64 {
            results
                .get(path)
                .and_then(|rs| median(&rs.iter().map(|r| get(r, f)).collect::<Vec<_>>()))
                .unwrap_or(f64::NAN)
        };
        let mut s = String::new();
        let _ = writeln!(s, "## weft-bench datapath\n");
        let _ = writeln!(
            s,
            "{}; {setup}; {rounds} round(s) of {secs} s per figure, paths alternating; binaries from `{}`.\n",
            machine_line(),
            bins.display()
        );
        let _ = writeln!(
            s,
            "| path | req/s (16 conns, keep-alive, 1 KiB) | p50 ms @1000 req/s | p99 ms @1000 req/s | p99 added vs direct (ms) | new conns/s (Connection: close) | µs per new conn, 1 client | bulk 1 MiB, 1 stream (Gbit/s) | proxy CPU µs/req (both sides) | proxy CPU µs per new conn (both sides) | proxy RSS MiB (both sides, after the req/s run) | idle RSS MiB (client + server side) | RSS KiB per idle conn ({conns} held; client + server side) | errors |"
        );
        let _ = writeln!(
            s,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for p in paths {
            let mut row = format!("| {} ", p.name);
            let cell = |row: &mut String, f: &str| {
                let v = med(p.name, f);
                let w = med("weft", f);
                let ratio = if p.name != "weft" && v.is_finite() && w.is_finite() && w != 0.0 {
                    format!(" ({:.2}× weft)", v / w)
                } else {
                    String::new()
                };
                let _ = write!(row, "| {}{ratio} ", fmt_val(f, v));
            };
            for f in ["rps", "p50", "p99"] {
                cell(&mut row, f);
            }
            let added = med(p.name, "p99") - med("direct", "p99");
            let _ = write!(row, "| {} ", fmt_val("p99", added));
            for f in ["cps", "conn1", "bulk", "cpu", "cpuc", "rss"] {
                cell(&mut row, f);
            }
            let sides = idle.get(p.name).map_or(&[][..], Vec::as_slice);
            let idle_cell = if sides.is_empty() {
                "–".to_owned()
            } else {
                let parts: Vec<String> = sides.iter().map(|v| format!("{v:.1}")).collect();
                format!("{:.1} ({})", sides.iter().sum::<f64>(), parts.join(" + "))
            };
            let _ = write!(row, "| {idle_cell} ");
            cell(&mut row, "conn");
            let (c, sv) = (med(p.name, "conn_c"), med(p.name, "conn_s"));
            if c.is_finite() && sv.is_finite() {
                row.pop();
                let _ = write!(row, " ({c:.1} + {sv:.1}) ");
            }
            let errors: u64 = results
                .get(p.name)
                .map_or(0, |rs| rs.iter().map(|r| r.errors).sum());
            let _ = writeln!(s, "{row}| {errors} |");
        }
        let _ = writeln!(s);
        for p in paths {
            let _ = writeln!(s, "- {}: {}", p.name, p.note);
        }
        for k in skipped {
            let _ = writeln!(s, "- not measured: {k}");
        }
        // Targets.
        let _ = writeln!(s, "\n### Targets\n");
        let check = |ok: Option<bool>| match ok {
            Some(true) => "met",
            Some(false) => "**NOT met**",
            None => "not measured",
        };
        let fin = |v: f64| v.is_finite().then_some(v);
        let cpu = fin(med("weft", "cpu"));
        let _ = writeln!(
            s,
            "- weft pair CPU/request ≤ 22 µs: {} ({})",
            cpu.map_or("–".into(), |v| format!("{v:.1} µs")),
            check(cpu.map(|v| v <= 22.0))
        );
        let hr = fin(med("weft", "rps") / med("haproxy", "rps"));
        let _ = writeln!(
            s,
            "- weft req/s ≥ 1.3× HAProxy: {} ({})",
            hr.map_or("–".into(), |v| format!("{v:.2}×")),
            check(hr.map(|v| v >= 1.3))
        );
        let dr = fin(med("weft", "rps") / med("direct", "rps"));
        let _ = writeln!(
            s,
            "- weft req/s ≥ 0.45× direct: {} ({})",
            dr.map_or("–".into(), |v| format!("{v:.2}×")),
            check(dr.map(|v| v >= 0.45))
        );
        let added = fin(med("weft", "p99") - med("direct", "p99"));
        let _ = writeln!(
            s,
            "- weft added p99 at 1000 req/s ≤ +0.2 ms: {} ({})",
            added.map_or("–".into(), |v| format!("{v:+.3} ms")),
            check(added.map(|v| v <= 0.2))
        );
        let conn = fin(med("weft", "conn"));
        let worst = fin(med("weft", "conn_c").max(med("weft", "conn_s")));
        let _ = writeln!(
            s,
            "- weft-dp RSS per proxied connection ≤ 16 KB: {} for the pair, {} for the larger side ({})",
            conn.map_or("–".into(), |v| format!("{v:.1} KiB")),
            worst.map_or("–".into(), |v| format!("{v:.1} KiB")),
            check(worst.map(|v| v * 1024.0 <= 16_000.0))
        );
        let idle_max = idle
            .get("weft")
            .and_then(|v| v.iter().copied().reduce(f64::max));
        let _ = writeln!(
            s,
            "- weft-dp idle RSS ≤ 10 MB: {} for the larger side ({})",
            idle_max.map_or("–".into(), |v| format!("{v:.1} MiB")),
            check(idle_max.map(|v| v * 1024.0 * 1024.0 <= 10e6))
        );
        // The multiplexed transports. The verdict is on the ratio of the medians; the ratios
        // within each round (the two paths measured minutes apart, not a whole run apart)
        // show how far the machine's drift moves it.
        let ratio = |a: &str, b: &str, f: &str| fin(med(a, f) / med(b, f));
        let same_round = |a: &str, b: &str, f: &str| -> Vec<String> {
            let (Some(ra), Some(rb)) = (results.get(a), results.get(b)) else {
                return Vec::new();
            };
            ra.iter()
                .zip(rb)
                .filter_map(|(x, y)| fin(get(x, f) / get(y, f)))
                .map(|v| format!("{v:.2}"))
                .collect()
        };
        for (what, (a, b, f)) in [
            (
                "weft-quic req/s ≥ 1.3× rusnel",
                ("weft-quic", "rusnel", "rps"),
            ),
            (
                "weft-quic CPU/request ≤ rusnel's / 1.3",
                ("rusnel", "weft-quic", "cpu"),
            ),
            (
                "weft-quic bulk ≥ 1.3× rusnel",
                ("weft-quic", "rusnel", "bulk"),
            ),
        ] {
            let r = ratio(a, b, f);
            let by_round = same_round(a, b, f);
            let by_round = if by_round.len() > 1 {
                format!("; round by round {}", by_round.join(", "))
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "- {what}: {} ({}{by_round})",
                r.map_or("–".into(), |v| format!("{v:.2}×")),
                check(r.map(|v| v >= 1.3))
            );
        }
        for p in ["weft-quic", "weft-pooled", "weft-auto"] {
            let cps = fin(med(p, "cps"));
            let _ = writeln!(
                s,
                "- {p} ≥ 12k new connections/s: {} ({})",
                cps.map_or("–".into(), |v| format!("{v:.0}")),
                check(cps.map(|v| v >= 12_000.0))
            );
        }
        for (what, f, better_low) in [("CPU/request", "cpu", true), ("bulk", "bulk", false)] {
            let (q, t) = (fin(med("weft-quic", f)), fin(med("weft", f)));
            let ok = q.zip(t).map(|(q, t)| {
                if better_low {
                    q <= t * 1.05
                } else {
                    q >= t * 0.95
                }
            });
            let _ = writeln!(
                s,
                "- weft-quic {what} no worse than weft (TLS) within 5 %: {} vs {} ({})",
                q.map_or("–".into(), |v| fmt_val(f, v)),
                t.map_or("–".into(), |v| fmt_val(f, v)),
                check(ok)
            );
        }
        // Every round, so the spread is visible.
        let _ = writeln!(s, "\n### Rounds\n");
        let _ = writeln!(s, "| path | figure | per round |");
        let _ = writeln!(s, "|---|---|---|");
        for p in paths {
            for f in FIGURES {
                let vals: Vec<String> = results
                    .get(p.name)
                    .map(|rs| rs.iter().map(|r| fmt_val(f, get(r, f))).collect())
                    .unwrap_or_default();
                let _ = writeln!(s, "| {} | {f} | {} |", p.name, vals.join(", "));
            }
        }
        s
    }

    /// The paths measured when `--paths` is not given (those whose tools are installed).
    const DEFAULT_PATHS: &str =
        "direct,weft,weft-full,weft-pooled,weft-quic,weft-auto,haproxy,nginx,stunnel,rusnel";

    /// A weft-dp pair over one transport.
    struct Variant {
        path: &'static str,
        mesh: &'static str,
        /// Path and mesh of its `--dp-b` twin.
        b: (&'static str, &'static str),
        transport: &'static str,
        resumption: bool,
        note: &'static str,
    }

    /// Every weft variant: `weft` is the default transport (TLS with session resumption).
    const WEFT: [Variant; 5] = [
        Variant {
            path: "weft",
            mesh: "default",
            b: ("weft-b", "default-b"),
            transport: "tls",
            resumption: true,
            note: "TLS over TCP per connection, sessions resumed (the default)",
        },
        Variant {
            path: "weft-full",
            mesh: "full",
            b: ("weft-full-b", "full-b"),
            transport: "tls",
            resumption: false,
            note: "TLS over TCP per connection, full handshakes (`--tls-resumption false`)",
        },
        Variant {
            path: "weft-pooled",
            mesh: "pooled",
            b: ("weft-pooled-b", "pooled-b"),
            transport: "pooled",
            resumption: true,
            note: "pooled TLS: HTTP/2 CONNECT streams over one mTLS connection",
        },
        Variant {
            path: "weft-quic",
            mesh: "quic",
            b: ("weft-quic-b", "quic-b"),
            transport: "quic",
            resumption: true,
            note: "QUIC: streams over one connection",
        },
        Variant {
            path: "weft-auto",
            mesh: "auto",
            b: ("weft-auto-b", "auto-b"),
            transport: "auto",
            resumption: true,
            note: "auto (QUIC here: UDP is open)",
        },
    ];

    fn mesh_yaml(name: &str, transport: &str) -> String {
        format!(
            "type: Mesh\nname: {name}\nmtls:\n  enabledBackend: ca-1\n  backends:\n  - name: ca-1\n    type: builtin\nnetworking:\n  transport: {transport}\n"
        )
    }

    fn backend_yaml(mesh: &str, port: usize) -> String {
        BACKEND_YAML
            .replace("mesh: default", &format!("mesh: {mesh}"))
            .replace("port: 10002", &format!("port: {port}"))
    }

    fn web_yaml(mesh: &str, port: usize) -> String {
        WEB_YAML
            .replace("mesh: default", &format!("mesh: {mesh}"))
            .replace("port: 20001", &format!("port: {port}"))
    }

    const ALLOW: &str = "type: MeshTrafficPermission\nmesh: default\nname: web-to-backend\nspec:\n  targetRef:\n    kind: MeshService\n    name: backend\n  from:\n  - targetRef:\n      kind: MeshService\n      name: web\n    default:\n      action: Allow\n";
    const BACKEND_YAML: &str = "type: Dataplane\nmesh: default\nname: backend\nnetworking:\n  address: 10.77.0.13\n  inbound:\n  - port: 10002\n    servicePort: 8080\n    tags:\n      kuma.io/service: backend\n";
    const WEB_YAML: &str = "type: Dataplane\nmesh: default\nname: web\nnetworking:\n  address: 10.77.0.12\n  inbound:\n  - port: 10001\n    servicePort: 8081\n    tags:\n      kuma.io/service: web\n  outbound:\n  - port: 20001\n    tags:\n      kuma.io/service: backend\n";

    /// A CA, a server certificate (bench-server + the server host's address) and a client
    /// certificate, all ECDSA P-256, in `dir`.
    fn certs(dir: &Path, server: &Host) -> Result<()> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "weft-bench CA");
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |name: &str, sans: Vec<SanType>| -> Result<(String, String)> {
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::new(vec![name.to_owned()])?;
            p.subject_alt_names.extend(sans);
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            let cert = p.signed_by(&key, &issuer)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let (sc, sk) = leaf(
            SERVER_NAME,
            vec![SanType::IpAddress(std::net::IpAddr::V4(server.addr))],
        )?;
        let (cc, ck) = leaf("bench-client", Vec::new())?;
        std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
        std::fs::write(dir.join("server.crt"), &sc)?;
        std::fs::write(dir.join("server.key"), &sk)?;
        std::fs::write(dir.join("server.pem"), format!("{sc}{sk}"))?;
        std::fs::write(dir.join("client.crt"), &cc)?;
        std::fs::write(dir.join("client.key"), &ck)?;
        std::fs::write(dir.join("client.pem"), format!("{cc}{ck}"))?;
        Ok(())
    }

    fn nginx_head(dir: &Path, name: &str, stream: bool) -> String {
        let load = if stream {
            "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n"
        } else {
            ""
        };
        format!(
            "{load}daemon off;\nmaster_process off;\nworker_processes 1;\nworker_rlimit_nofile 65536;\npid {d}/{name}.pid;\nerror_log {d}/{name}-error.log warn;\nevents {{\n  worker_connections 16384;\n}}\n",
            d = dir.display()
        )
    }

    /// One nginx process (`master_process off`: the PID is the process that serves).
    fn spawn_nginx(host: &Host, nginx: &Path, dir: &Path, name: &str, conf: &str) -> Result<Proc> {
        let f = dir.join(format!("{name}-nginx.conf"));
        std::fs::write(&f, conf)?;
        let mut cmd = host.command(nginx);
        cmd.arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join(format!("{name}-error.log")))
            .arg("-c")
            .arg(&f);
        host.spawn(name, cmd)
    }

    fn haproxy(dir: &Path, client: &Host, server: &Host, hp: &Path) -> Result<Path_> {
        let d = dir.display();
        let head = "global\n  nbthread 1\n  maxconn 4000\n  ssl-default-bind-options ssl-min-ver TLSv1.3\n  ssl-default-server-options ssl-min-ver TLSv1.3\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n";
        let srv = format!(
            "{head}listen in\n  bind {}:11001 ssl crt {d}/server.pem ca-file {d}/ca.pem verify required\n  server app 127.0.0.1:8080\n",
            server.addr
        );
        let cli = format!(
            "{head}listen out\n  bind 127.0.0.1:21001\n  server up {}:11001 ssl crt {d}/client.pem ca-file {d}/ca.pem verify required verifyhost {SERVER_NAME} sni str({SERVER_NAME})\n",
            server.addr
        );
        let spawn = |h: &Host, name: &str, conf: String| -> Result<Proc> {
            let f = dir.join(format!("{name}.cfg"));
            std::fs::write(&f, conf)?;
            let mut cmd = h.command(hp);
            cmd.arg("-db").arg("-f").arg(&f);
            h.spawn(name, cmd)
        };
        let s = spawn(server, "haproxy-server", srv)?;
        let c = spawn(client, "haproxy-client", cli)?;
        Ok(Path_ {
            name: "haproxy",
            base: "http://127.0.0.1:21001".into(),
            procs: vec![c, s],
            note: "HAProxy mode tcp, nbthread 1, TLS 1.3 both ways, verify required".into(),
        })
    }

    fn nginx_pair(dir: &Path, client: &Host, server: &Host, nginx: &Path) -> Result<Path_> {
        let d = dir.display();
        let srv = format!(
            "{}stream {{\n  server {{\n    listen {}:11002 ssl backlog=4096;\n    ssl_certificate {d}/server.crt;\n    ssl_certificate_key {d}/server.key;\n    ssl_client_certificate {d}/ca.pem;\n    ssl_verify_client on;\n    ssl_protocols TLSv1.3;\n    proxy_pass 127.0.0.1:8080;\n  }}\n}}\n",
            nginx_head(dir, "nginx-server", true),
            server.addr
        );
        let cli = format!(
            "{}stream {{\n  server {{\n    listen 127.0.0.1:21002 backlog=4096;\n    proxy_pass {}:11002;\n    proxy_ssl on;\n    proxy_ssl_certificate {d}/client.crt;\n    proxy_ssl_certificate_key {d}/client.key;\n    proxy_ssl_trusted_certificate {d}/ca.pem;\n    proxy_ssl_verify on;\n    proxy_ssl_name {SERVER_NAME};\n    proxy_ssl_server_name on;\n    proxy_ssl_protocols TLSv1.3;\n    proxy_ssl_session_reuse on;\n  }}\n}}\n",
            nginx_head(dir, "nginx-client", true),
            server.addr
        );
        let s = spawn_nginx(server, nginx, dir, "nginx-server", &srv)?;
        let c = spawn_nginx(client, nginx, dir, "nginx-client", &cli)?;
        Ok(Path_ {
            name: "nginx",
            base: "http://127.0.0.1:21002".into(),
            procs: vec![c, s],
            note: "nginx stream, one process each (worker_processes 1, master_process off), TLS 1.3, ssl_verify_client on".into(),
        })
    }

    /// rusnel (quinn-based TCP-over-QUIC tunnel) with mTLS: server on the server host, client
    /// on the client host; one tokio worker each (`TOKIO_WORKER_THREADS=1`).
    fn rusnel(dir: &Path, client: &Host, server: &Host, bin: &Path) -> Result<Path_> {
        let d = dir.display();
        let mut cmd = server.command(bin);
        cmd.args(["server", "--host", &server.addr.to_string(), "-p", "9443"])
            .args([
                "--tls-cert",
                &format!("{d}/server.crt"),
                "--tls-key",
                &format!("{d}/server.key"),
            ])
            .args([
                "--tls-ca",
                &format!("{d}/ca.pem"),
                "--no-admin-socket",
                "-q",
            ])
            .env("TOKIO_WORKER_THREADS", "1");
        let s = server.spawn("rusnel-server", cmd)?;
        let mut cmd = client.command(bin);
        cmd.args(["client", "--tls-ca", &format!("{d}/ca.pem")])
            .args([
                "--tls-cert",
                &format!("{d}/client.crt"),
                "--tls-key",
                &format!("{d}/client.key"),
            ])
            .arg(format!("{}:9443", server.addr))
            .arg("127.0.0.1:20900:127.0.0.1:8080")
            .env("TOKIO_WORKER_THREADS", "1");
        let c = client.spawn("rusnel-client", cmd)?;
        Ok(Path_ {
            name: "rusnel",
            base: "http://127.0.0.1:20900".into(),
            procs: vec![c, s],
            note: "rusnel client → server (QUIC, mTLS), TOKIO_WORKER_THREADS=1".into(),
        })
    }

    fn stunnel(dir: &Path, client: &Host, server: &Host, st: &Path) -> Result<Path_> {
        let d = dir.display();
        let head = "foreground = yes\npid =\ndebug = 3\nsyslog = no\n";
        let srv = format!(
            "{head}[in]\naccept = {}:11003\nconnect = 127.0.0.1:8080\ncert = {d}/server.crt\nkey = {d}/server.key\nCAfile = {d}/ca.pem\nverify = 2\nsslVersionMin = TLSv1.3\n",
            server.addr
        );
        let cli = format!(
            "{head}[out]\nclient = yes\naccept = 127.0.0.1:21003\nconnect = {}:11003\ncert = {d}/client.crt\nkey = {d}/client.key\nCAfile = {d}/ca.pem\nverify = 2\ncheckHost = {SERVER_NAME}\nsni = {SERVER_NAME}\nsslVersionMin = TLSv1.3\n",
            server.addr
        );
        let spawn = |h: &Host, name: &str, conf: String| -> Result<Proc> {
            let f = dir.join(format!("{name}.conf"));
            std::fs::write(&f, conf)?;
            let mut cmd = h.command(st);
            cmd.arg(&f);
            h.spawn(name, cmd)
        };
        let s = spawn(server, "stunnel-server", srv)?;
        let c = spawn(client, "stunnel-client", cli)?;
        Ok(Path_ {
            name: "stunnel",
            base: "http://127.0.0.1:21003".into(),
            procs: vec![c, s],
            note: "stunnel, verify = 2, TLS 1.3 (a thread per connection: one worker cannot be forced)".into(),
        })
    }

    /// Profiling aid: with `WEFT_BENCH_ATTACH` set (a `sh -c` template, e.g.
    /// `perf stat -e 'syscalls:sys_enter_*' -p {pids} -o /tmp/{what}.txt`), that command runs
    /// in the root namespace, attached to the proxies' PIDs, for the length of each req/s and
    /// new-conns/s and bulk run (`{what}` = `<path>-rps-<round>`, `<path>-cps-<round>`,
    /// `<path>-bulk-<round>`), and once when
    /// they are idle (`<path>-idle`), after the warm-up (`<path>-base`) and while the idle connections are held
    /// (`<path>-<round>-hold`); it gets SIGINT when the run ends. It only observes
    /// processes: no traffic. The command runs in its own process group, which gets the SIGINT.
    fn attach(procs: &[Proc], what: &str) -> Option<std::process::Child> {
        let tpl = std::env::var("WEFT_BENCH_ATTACH").ok()?;
        if procs.is_empty() {
            return None;
        }
        let list: Vec<String> = procs.iter().map(|p| p.pid().to_string()).collect();
        let cmd = tpl
            .replace("{pids}", &list.join(","))
            .replace("{what}", what);
        // Its own process group, so that the SIGINT reaches what the shell started.
        let child = std::os::unix::process::CommandExt::process_group(
            Command::new("sh").arg("-c").arg(&cmd),
            0,
        )
        .spawn();
        std::thread::sleep(Duration::from_millis(200));
        child
            .map_err(|e| eprintln!("weft-bench: WEFT_BENCH_ATTACH `{cmd}`: {e}"))
            .ok()
    }

    /// Ends what [`attach`] started; `requests` is how many the run it watched completed.
    fn detach(child: Option<std::process::Child>, requests: Option<u64>) {
        if let Some(mut c) = child {
            let _ = Command::new("kill")
                .args(["-INT", "--", &format!("-{}", c.id())])
                .status();
            let _ = c.wait();
            match requests {
                Some(n) => {
                    eprintln!("weft-bench: attached command ended; {n} requests in this run")
                }
                None => eprintln!("weft-bench: attached command ended"),
            }
        }
    }

    struct Wrk {
        rps: f64,
        requests: u64,
        errors: u64,
    }

    fn wrk_run(
        client: &Host,
        wrk: &Path,
        url: &str,
        conns: usize,
        secs: u64,
        close: bool,
    ) -> Result<Wrk> {
        stopping()?;
        let mut args: Vec<String> = vec![
            wrk.display().to_string(),
            "-t1".into(),
            format!("-c{conns}"),
            format!("-d{secs}s"),
            "--timeout".into(),
            "5s".into(),
        ];
        if close {
            args.extend(["-H".into(), "Connection: close".into()]);
        }
        args.push(url.into());
        let o = client.run_timeout(&args, Duration::from_secs(secs + 30));
        let text = stdout(&o);
        ensure!(
            o.status.success(),
            "wrk {url}: {text}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let mut w = Wrk {
            rps: 0.0,
            requests: 0,
            errors: 0,
        };
        for l in text.lines() {
            let l = l.trim();
            if let Some(v) = l.strip_prefix("Requests/sec:") {
                w.rps = v.trim().parse().unwrap_or(0.0);
            } else if let Some((n, _)) = l.split_once(" requests in ") {
                w.requests = n.trim().parse().unwrap_or(0);
            } else if let Some(v) = l.strip_prefix("Socket errors:") {
                // "connect 0, read 0, write 0, timeout 0"
                w.errors += v
                    .split(',')
                    .filter_map(|x| x.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .sum::<u64>();
            } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
                w.errors += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
        Ok(w)
    }

    struct Load {
        p50_ms: f64,
        p99_ms: f64,
        errors: u64,
    }

    /// `weft-bench load` at a fixed 1000 req/s over 10 keep-alive connections, on the client
    /// host.
    fn load_run(client: &Host, url: &str, secs: u64) -> Result<Load> {
        let exe = std::env::current_exe()?;
        let o = client.run_timeout(
            [
                exe.display().to_string(),
                "load".into(),
                "--url".into(),
                url.into(),
                "--rate".into(),
                "1000".into(),
                "--connections".into(),
                "10".into(),
                "--duration".into(),
                format!("{secs}s"),
            ],
            Duration::from_secs(secs + 60),
        );
        let text = stdout(&o);
        ensure!(
            o.status.success(),
            "load {url}: {text}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(text.trim())
            .with_context(|| format!("load {url}: not JSON: {text}"))?;
        let ms = |k: &str| v[k].as_f64().map_or(f64::NAN, |us| us / 1000.0);
        Ok(Load {
            p50_ms: ms("p50_us"),
            p99_ms: ms("p99_us"),
            errors: v["errors"].as_u64().unwrap_or(0),
        })
    }

    /// Holds `n` idle keep-alive connections through the path (`weft-bench hold` on the client
    /// host, one request on each so that every hop is established), reads the proxies' VmRSS
    /// (KiB, in `procs` order) while they are held, then closes them. Returns (held, RSS).
    fn hold_run(
        client: &Host,
        url: &str,
        n: usize,
        procs: &[Proc],
        what: &str,
    ) -> Result<(usize, Vec<f64>)> {
        let exe = std::env::current_exe()?;
        let mut cmd = client.command(&exe);
        cmd.arg("hold")
            .arg("--url")
            .arg(url)
            .arg("--connections")
            .arg(n.to_string());
        let holder = client.spawn("hold", cmd)?;
        let line = wait_for("the holder's `held` line", Duration::from_secs(120), || {
            let log = holder.log();
            if let Some(l) = log.lines().find_map(|l| l.strip_prefix("held ")) {
                return Some(serde_json::from_str::<serde_json::Value>(l.trim()).ok());
            }
            (!holder.is_running()).then_some(None)
        })?
        .with_context(|| format!("hold {url}: {}", holder.log()))?;
        let held = line["connections"].as_u64().unwrap_or(0) as usize;
        if held < n {
            eprintln!("weft-bench: hold {url}: only {held} of {n} connections: {line}");
        }
        // Let the server side settle (its half of each connection is already established: the
        // response came through it).
        std::thread::sleep(Duration::from_millis(300));
        let rss = procs.iter().map(|q| rss_kib(q.pid())).collect();
        detach(attach(procs, &format!("{what}-hold")), None);
        drop(holder);
        // Let the proxies close their halves before the next measurement.
        std::thread::sleep(Duration::from_secs(1));
        Ok((held, rss))
    }

    /// Waits until weft-dp `name` on host `i` reports ready on its admin server (asked from
    /// inside its own host).
    fn dp_ready(mesh: &Mesh, i: usize, mesh_name: &str, name: &str) -> Result<()> {
        let file = mesh
            .dir()
            .join(format!("dp-{mesh_name}-{name}/state/admin-address"));
        let host = mesh.host(i);
        wait_for(
            &format!("weft-dp {name} to be ready"),
            Duration::from_secs(60),
            || {
                let addr = std::fs::read_to_string(&file).ok()?;
                let url = format!("http://{}/ready", addr.trim());
                let o = host.run_timeout(
                    ["curl", "-sf", "--max-time", "2", &url],
                    Duration::from_secs(3),
                );
                o.status.success().then_some(())
            },
        )
    }
}

// ---------------------------------------------------------------------------------------------
mod cp {
    use super::*;

    /// One round's figures.
    struct Round {
        reg_total_s: f64,
        reg_p50_ms: f64,
        reg_p99_ms: f64,
        reg_max_ms: f64,
        retries: f64,
        upd_p50_ms: f64,
        upd_p99_ms: f64,
        upd_max_ms: f64,
        missing: usize,
        rss0_kib: f64,
        rss1_kib: f64,
        rss2_kib: f64,
        cpu_reg_s: f64,
        cpu_upd_s: f64,
    }

    impl Round {
        fn per_dp_kib(&self, n: usize) -> f64 {
            (self.rss1_kib - self.rss0_kib) / n as f64
        }
    }

    pub(super) fn run(a: CpArgs) -> Result<()> {
        let bins = bin_dir(&a.common)?;
        let n = a
            .dataplanes
            .unwrap_or(if a.common.smoke { 20 } else { 1000 });
        let rounds = a
            .rounds
            .unwrap_or(if a.common.smoke { 1 } else { 3 })
            .max(1);
        let mut results = Vec::with_capacity(rounds);
        for r in 0..rounds {
            stopping()?;
            let round = one_round(&bins, n, a.threads)?;
            eprintln!(
                "weft-bench cp: round {}/{rounds}: registered in {:.2} s, change ACKed p99 {:.0} ms, {:.1} KiB per dataplane",
                r + 1,
                round.reg_total_s,
                round.upd_p99_ms,
                round.per_dp_kib(n)
            );
            results.push(round);
        }
        let missing: usize = results.iter().map(|r| r.missing).sum();
        let s = render(&results, n, a.threads, &bins);
        println!("{s}");
        write_out(&out_file(&a.common, &bins, "cp"), &s)?;
        ensure!(
            missing == 0,
            "{missing} dataplanes did not ACK the change (over all rounds)"
        );
        Ok(())
    }

    /// The whole scenario against a fresh CP: register `n` dataplanes, change a policy.
    fn one_round(bins: &Path, n: usize, threads: usize) -> Result<Round> {
        let mesh = Mesh::new(1, bins)?;
        let h1 = mesh.host(1).clone();
        let tck = clk_tck();
        let token_file = mesh.dir().join("bench-token");
        std::fs::write(&token_file, mesh.token("default", None, "svc")?)?;
        let pid = mesh.cp.pid();
        let rss0 = rss_kib(pid);
        let cpu0 = cpu_secs(pid, tck);

        let exe = std::env::current_exe()?;
        let mut cmd = h1.command(&exe);
        cmd.arg("cp-agent")
            .arg("--addr")
            .arg("127.0.0.1:5678")
            .arg("--ca")
            .arg(mesh.ca_file())
            .arg("--token")
            .arg(&token_file)
            .arg("--dataplanes")
            .arg(n.to_string())
            .arg("--threads")
            .arg(threads.to_string());
        let agent = h1.spawn("cp-agent", cmd)?;
        let line = |prefix: &str, within: Duration| -> Result<serde_json::Value> {
            wait_for(&format!("the agent's `{prefix}` line"), within, || {
                let log = agent.log();
                if let Some(l) = log.lines().find_map(|l| l.strip_prefix(prefix)) {
                    return Some(
                        serde_json::from_str::<serde_json::Value>(l.trim())
                            .map_err(|e| anyhow::anyhow!("bad `{prefix}` line: {e}")),
                    );
                }
                (!agent.is_running()).then(|| Err(anyhow::anyhow!("the agent exited: {log}")))
            })
            .with_context(|| format!("agent log:\n{}", agent.log()))?
        };
        let reg = line("registered ", Duration::from_secs(600))?;
        let rss1 = rss_kib(pid);
        let cpu1 = cpu_secs(pid, tck);

        // One policy change that selects every dataplane.
        let t0 = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
        let c_before = cpu_secs(pid, tck);
        mesh.apply(
            "allow-all",
            "type: MeshTrafficPermission\nmesh: default\nname: allow-all\nspec:\n  targetRef:\n    kind: Mesh\n  from:\n  - targetRef:\n      kind: Mesh\n    default:\n      action: Allow\n",
        )?;
        let upd = line("updated ", Duration::from_secs(300))?;
        let cpu2 = cpu_secs(pid, tck);
        let rss2 = rss_kib(pid);
        let mut lat: Vec<f64> = upd["acked_unix"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_f64())
                    .map(|t| (t - t0) * 1000.0)
                    .collect()
            })
            .unwrap_or_default();
        lat.sort_by(f64::total_cmp);
        let missing = n.saturating_sub(lat.len());
        let _ = agent.term(Duration::from_secs(5));
        drop(agent);
        drop(mesh);

        let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
        Ok(Round {
            reg_total_s: f(&reg["total_s"]),
            reg_p50_ms: f(&reg["p50_ms"]),
            reg_p99_ms: f(&reg["p99_ms"]),
            reg_max_ms: f(&reg["max_ms"]),
            retries: f(&reg["retries"]),
            upd_p50_ms: percentile(&lat, 50.0),
            upd_p99_ms: percentile(&lat, 99.0),
            upd_max_ms: lat.last().copied().unwrap_or(f64::NAN),
            missing,
            rss0_kib: rss0,
            rss1_kib: rss1,
            rss2_kib: rss2,
            cpu_reg_s: cpu1 - cpu0,
            cpu_upd_s: cpu2 - c_before,
        })
    }

    fn render(results: &[Round], n: usize, threads: usize, bins: &Path) -> String {
        let rounds = results.len();
        let med = |g: &dyn Fn(&Round) -> f64| {
            median(&results.iter().map(g).collect::<Vec<_>>()).unwrap_or(f64::NAN)
        };
        let mut s = String::new();
        let _ = writeln!(s, "## weft-bench cp\n");
        let _ = writeln!(
            s,
            "{}; {n} simulated dataplanes on a {threads}-thread tokio runtime in the CP's namespace; {rounds} round(s), a fresh CP each, every figure the median over them; binaries from `{}`.\n",
            machine_line(),
            bins.display()
        );
        let _ = writeln!(s, "| figure | value |");
        let _ = writeln!(s, "|---|---|");
        let _ = writeln!(
            s,
            "| all {n} registered (Certify + stream + first ACK) | {:.2} s |",
            med(&|r| r.reg_total_s)
        );
        let _ = writeln!(
            s,
            "| one dataplane's registration p50 / p99 / max | {:.0} / {:.0} / {:.0} ms |",
            med(&|r| r.reg_p50_ms),
            med(&|r| r.reg_p99_ms),
            med(&|r| r.reg_max_ms)
        );
        let _ = writeln!(
            s,
            "| registration attempts that failed and were retried | {:.0} |",
            med(&|r| r.retries)
        );
        let _ = writeln!(
            s,
            "| policy change → ACKed by all: p50 / p99 / max | {:.0} / {:.0} / {:.0} ms |",
            med(&|r| r.upd_p50_ms),
            med(&|r| r.upd_p99_ms),
            med(&|r| r.upd_max_ms)
        );
        let _ = writeln!(
            s,
            "| dataplanes that did not ACK the change | {:.0} |",
            med(&|r| r.missing as f64)
        );
        let _ = writeln!(
            s,
            "| CP RSS idle → with {n} connected → after the change | {:.1} → {:.1} → {:.1} MiB |",
            med(&|r| r.rss0_kib) / 1024.0,
            med(&|r| r.rss1_kib) / 1024.0,
            med(&|r| r.rss2_kib) / 1024.0
        );
        let _ = writeln!(
            s,
            "| CP RSS per connected dataplane | {:.1} KiB |",
            med(&|r| r.per_dp_kib(n))
        );
        let _ = writeln!(
            s,
            "| CP CPU for registering all | {:.2} s ({:.2} ms per dataplane) |",
            med(&|r| r.cpu_reg_s),
            med(&|r| r.cpu_reg_s) * 1000.0 / n as f64
        );
        let _ = writeln!(
            s,
            "| CP CPU for the policy change (apply until all ACKed) | {:.3} s ({:.3} ms per dataplane) |",
            med(&|r| r.cpu_upd_s),
            med(&|r| r.cpu_upd_s) * 1000.0 / n as f64
        );
        let _ = writeln!(s, "\n### Rounds\n");
        let _ = writeln!(
            s,
            "| round | all registered | change ACKed p50 / p99 / max | RSS per dataplane | not ACKed |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|");
        for (i, r) in results.iter().enumerate() {
            let _ = writeln!(
                s,
                "| {} | {:.2} s | {:.0} / {:.0} / {:.0} ms | {:.1} KiB | {} |",
                i + 1,
                r.reg_total_s,
                r.upd_p50_ms,
                r.upd_p99_ms,
                r.upd_max_ms,
                r.per_dp_kib(n),
                r.missing
            );
        }
        s
    }
}

// ---------------------------------------------------------------------------------------------
mod agent {
    use super::*;
    use futures::SinkExt;
    use futures::channel::mpsc;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
    use weft_api::v1::{
        CertifyRequest, DiscoveryRequest, certify_request,
        discovery_client::DiscoveryClient,
        discovery_request::{Ack, Hello, Kind as Req},
        discovery_response::Kind as Resp,
        identity_client::IdentityClient,
    };

    const SERVICE: &str = "svc";

    struct Ctx {
        addr: SocketAddr,
        ca: String,
        token: String,
    }

    enum Event {
        Registered(Duration),
        Retry,
        Updated(f64),
    }

    pub(super) fn run(a: AgentArgs) -> Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(a.threads.max(1))
            .enable_all()
            .build()?;
        rt.block_on(main(a))
    }

    async fn main(a: AgentArgs) -> Result<()> {
        let ctx = Arc::new(Ctx {
            addr: a.addr,
            ca: std::fs::read_to_string(&a.ca)?,
            token: std::fs::read_to_string(&a.token)?.trim().to_owned(),
        });
        let n = a.dataplanes;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let start = Instant::now();
        for i in 0..n {
            let (ctx, tx) = (ctx.clone(), tx.clone());
            tokio::spawn(async move { dataplane(i, ctx, start, tx).await });
        }
        drop(tx);
        let mut reg: Vec<f64> = Vec::new();
        let mut retries = 0u64;
        let mut updated: Vec<f64> = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        while reg.len() < n {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Event::Registered(d))) => reg.push(d.as_secs_f64() * 1000.0),
                Ok(Some(Event::Retry)) => retries += 1,
                Ok(Some(Event::Updated(t))) => updated.push(t),
                _ => bail!("only {} of {n} dataplanes registered", reg.len()),
            }
        }
        let total = start.elapsed().as_secs_f64();
        reg.sort_by(f64::total_cmp);
        println!(
            "registered {}",
            serde_json::json!({
                "total_s": total,
                "p50_ms": percentile(&reg, 50.0),
                "p99_ms": percentile(&reg, 99.0),
                "max_ms": reg.last(),
                "retries": retries,
            })
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        while updated.len() < n {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Event::Updated(t))) => updated.push(t),
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        println!("updated {}", serde_json::json!({ "acked_unix": updated }));
        Ok(())
    }

    fn yaml(i: usize) -> String {
        format!(
            "type: Dataplane\nmesh: default\nname: sim-{i}\nnetworking:\n  address: 127.0.0.2\n  inbound:\n  - port: 20000\n    servicePort: 8080\n    tags:\n      kuma.io/service: {SERVICE}\n"
        )
    }

    async fn channel(ctx: &Ctx, identity: Option<(&str, &str)>) -> Result<Channel> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ctx.ca))
            .domain_name("localhost");
        if let Some((c, k)) = identity {
            tls = tls.identity(Identity::from_pem(c, k));
        }
        Ok(Endpoint::from_shared(format!("https://{}", ctx.addr))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(30))
            .connect()
            .await?)
    }

    /// One simulated dataplane: joins like weft-dp (Certify with the token and a CSR, then the
    /// stream authenticated by the issued certificate), ACKs every config, reports its first
    /// ACK and the time of its second.
    async fn dataplane(
        i: usize,
        ctx: Arc<Ctx>,
        start: Instant,
        tx: tokio::sync::mpsc::UnboundedSender<Event>,
    ) {
        let name = format!("sim-{i}");
        let mut registered = false;
        let mut seen = 0usize;
        loop {
            let r = session(&ctx, &name, i, start, &tx, &mut registered, &mut seen).await;
            if tx.is_closed() {
                return;
            }
            if r.is_err() && !registered {
                let _ = tx.send(Event::Retry);
            }
            tokio::time::sleep(Duration::from_millis(100 + (i as u64 % 100))).await;
        }
    }

    async fn session(
        ctx: &Ctx,
        name: &str,
        i: usize,
        start: Instant,
        tx: &tokio::sync::mpsc::UnboundedSender<Event>,
        registered: &mut bool,
        seen: &mut usize,
    ) -> Result<()> {
        let key = rcgen::KeyPair::generate()?;
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = vec![rcgen::SanType::URI(
            format!("spiffe://default/{SERVICE}").try_into()?,
        )];
        let csr = p.serialize_request(&key)?.pem()?;
        let mut id = IdentityClient::new(channel(ctx, None).await?);
        let cert = id
            .certify(CertifyRequest {
                mesh: "default".into(),
                dataplane_name: name.into(),
                csr_pem: csr,
                auth: Some(certify_request::Auth::Token(ctx.token.clone())),
                dataplane_yaml: yaml(i),
            })
            .await?
            .into_inner();
        // The join connection is not kept: the stream runs on a new one with the certificate.
        drop(id);
        let ch = channel(ctx, Some((&cert.cert_chain_pem, &key.serialize_pem()))).await?;
        let (mut req_tx, req_rx) = mpsc::channel::<DiscoveryRequest>(8);
        req_tx
            .send(DiscoveryRequest {
                kind: Some(Req::Hello(Hello {
                    mesh: "default".into(),
                    dataplane_name: name.into(),
                    dataplane_yaml: yaml(i),
                    dp_version: "weft-bench".into(),
                    admin_address: "127.0.0.1:9901".into(),
                    token: String::new(),
                })),
            })
            .await?;
        let mut rx = DiscoveryClient::new(ch).stream(req_rx).await?.into_inner();
        while let Some(m) = rx.message().await? {
            match m.kind {
                Some(Resp::Config(_)) | Some(Resp::Delta(_)) => {
                    req_tx
                        .send(DiscoveryRequest {
                            kind: Some(Req::Ack(Ack {
                                version: m.version.clone(),
                            })),
                        })
                        .await?;
                    *seen += 1;
                    if !*registered {
                        *registered = true;
                        let _ = tx.send(Event::Registered(start.elapsed()));
                    } else if *seen == 2 {
                        let now = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .map_or(0.0, |d| d.as_secs_f64());
                        let _ = tx.send(Event::Updated(now));
                    }
                }
                Some(Resp::Close(c)) => bail!("closed: {c:?}"),
                None => {}
            }
        }
        bail!("stream ended")
    }
}

// ---------------------------------------------------------------------------------------------
/// The clients `weft-bench datapath` runs inside the client host: a fixed-rate latency client
/// with µs resolution (hey reports to 0.1 ms) and a holder of idle keep-alive connections.
mod client {
    use super::*;
    use std::io::{Read, Write};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[derive(Args)]
    pub(super) struct LoadArgs {
        /// `http://HOST:PORT/PATH` (an IP address, no TLS).
        #[arg(long)]
        url: String,
        /// Requests per second over all connections.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Keep-alive connections (requests go to them in turn).
        #[arg(long, default_value_t = 10)]
        connections: usize,
        #[arg(long, default_value = "5s")]
        duration: humantime::Duration,
    }

    #[derive(Args)]
    pub(super) struct HoldArgs {
        /// `http://HOST:PORT/PATH` (an IP address, no TLS).
        #[arg(long)]
        url: String,
        #[arg(long)]
        connections: usize,
    }

    /// (address, request bytes) of a plain `http://IP:PORT/PATH` URL.
    fn request(url: &str) -> Result<(SocketAddr, Vec<u8>)> {
        let rest = url.strip_prefix("http://").context("only http:// URLs")?;
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let addr: SocketAddr = host.parse().context("the URL's host must be IP:PORT")?;
        let req = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: weft-bench\r\n\r\n");
        Ok((addr, req.into_bytes()))
    }

    /// The length of a complete response at the start of `buf` (a 2xx with Content-Length), if
    /// it is all there; an error for anything else.
    fn complete(buf: &[u8]) -> Result<Option<usize>> {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            return Ok(None);
        };
        let head = std::str::from_utf8(&buf[..end]).context("response head is not UTF-8")?;
        let status = head.split_whitespace().nth(1).unwrap_or("");
        ensure!(status.starts_with('2'), "status {status}");
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .context("no Content-Length")?;
        let total = end + 4 + len;
        Ok((buf.len() >= total).then_some(total))
    }

    /// One request and its whole response on a blocking connection.
    fn exchange(s: &mut std::net::TcpStream, req: &[u8], buf: &mut Vec<u8>) -> Result<()> {
        s.write_all(req)?;
        buf.clear();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = s.read(&mut chunk)?;
            ensure!(n > 0, "connection closed");
            buf.extend_from_slice(&chunk[..n]);
            if complete(buf)?.is_some() {
                return Ok(());
            }
        }
    }

    /// Open loop: request k is due at t0 + k/rate, whatever happened to the earlier ones, and
    /// its latency counts from then (a late response delays the next ones on its connection,
    /// and that wait is counted: no coordinated omission). One blocking thread per connection
    /// sleeps with 1 ns timer slack, so wake-ups are µs-accurate.
    pub(super) fn load(a: LoadArgs) -> Result<()> {
        let (addr, req) = request(&a.url)?;
        // Threads inherit the slack of the thread that creates them. Best effort.
        let _ = std::fs::write("/proc/thread-self/timerslack_ns", "1");
        let conns = a.connections.max(1);
        let rate = f64::from(a.rate.max(1));
        let dur: Duration = a.duration.into();
        let total = (dur.as_secs_f64() * rate) as u64;
        let mut streams = Vec::new();
        for _ in 0..conns {
            let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            streams.push(s);
        }
        let t0 = Instant::now() + Duration::from_millis(20);
        let threads: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(c, mut s)| {
                let req = req.clone();
                std::thread::spawn(move || {
                    let (mut lat, mut late, mut errors) = (Vec::new(), Vec::new(), 0u64);
                    let mut buf = Vec::new();
                    let mut k = c as u64;
                    while k < total {
                        let due = t0 + Duration::from_secs_f64(k as f64 / rate);
                        let now = Instant::now();
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                        late.push(due.elapsed().as_secs_f64() * 1e6);
                        match exchange(&mut s, &req, &mut buf) {
                            Ok(()) => lat.push(due.elapsed().as_secs_f64() * 1e6),
                            Err(_) => {
                                errors += 1;
                                if let Ok(n) = std::net::TcpStream::connect_timeout(
                                    &addr,
                                    Duration::from_secs(5),
                                ) {
                                    let _ = n.set_nodelay(true);
                                    let _ = n.set_read_timeout(Some(Duration::from_secs(10)));
                                    s = n;
                                }
                            }
                        }
                        k += conns as u64;
                    }
                    (lat, late, errors)
                })
            })
            .collect();
        let (mut lat, mut late, mut errors) = (Vec::new(), Vec::new(), 0);
        for t in threads {
            let (l, w, e) = t
                .join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
            lat.extend(l);
            late.extend(w);
            errors += e;
        }
        lat.sort_by(f64::total_cmp);
        late.sort_by(f64::total_cmp);
        let elapsed = t0.elapsed().as_secs_f64();
        let out = serde_json::json!({
            "requests": lat.len(),
            "errors": errors,
            "rate": lat.len() as f64 / elapsed,
            "p50_us": percentile(&lat, 50.0),
            "p90_us": percentile(&lat, 90.0),
            "p99_us": percentile(&lat, 99.0),
            "max_us": lat.last().copied().unwrap_or(f64::NAN),
            "send_late_p99_us": percentile(&late, 99.0),
        });
        println!("{out}");
        Ok(())
    }

    /// Opens the connections (64 at a time), makes one request on each, prints `held {json}`
    /// and sleeps until killed.
    pub(super) fn hold(a: HoldArgs) -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let (addr, req) = request(&a.url)?;
            let req = Arc::new(req);
            let gate = Arc::new(tokio::sync::Semaphore::new(64));
            let tasks: Vec<_> = (0..a.connections)
                .map(|_| {
                    let (req, gate) = (req.clone(), gate.clone());
                    tokio::spawn(async move {
                        let _permit = gate.acquire().await?;
                        let mut s = tokio::time::timeout(
                            Duration::from_secs(10),
                            tokio::net::TcpStream::connect(addr),
                        )
                        .await??;
                        s.set_nodelay(true)?;
                        s.write_all(&req).await?;
                        let mut buf = Vec::new();
                        let mut chunk = [0u8; 4096];
                        loop {
                            let n =
                                tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
                                    .await??;
                            ensure!(n > 0, "connection closed");
                            buf.extend_from_slice(&chunk[..n]);
                            if complete(&buf)?.is_some() {
                                return anyhow::Ok(s);
                            }
                        }
                    })
                })
                .collect();
            let mut held = Vec::new();
            let mut errors = 0;
            let mut first_error = String::new();
            for t in tasks {
                match t.await? {
                    Ok(s) => held.push(s),
                    Err(e) => {
                        errors += 1;
                        if first_error.is_empty() {
                            first_error = format!("{e:#}");
                        }
                    }
                }
            }
            let line = serde_json::json!({
                "connections": held.len(),
                "errors": errors,
                "first_error": first_error,
            });
            println!("held {line}");
            tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
            drop(held);
            Ok(())
        })
    }
}
