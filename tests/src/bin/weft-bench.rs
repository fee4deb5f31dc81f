//! `weft-bench`: the benchmark harness (see BENCHMARKS.md).
//!
//! - `weft-bench datapath`: the same HTTP workload (nginx backend, wrk and hey clients) over
//!   each path between two network-namespace hosts: direct, the weft-dp pair, and HAProxy,
//!   nginx `stream` and stunnel mTLS pairs, paths alternating within each round; every figure
//!   is the median of the rounds.
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
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Parser, Subcommand};
use weft_e2e::netns::{Host, Proc, Testbed};
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
        Cmd::Datapath(a) => datapath::run(a),
        Cmd::Cp(a) => cp::run(a),
        Cmd::CpAgent(a) => agent::run(a),
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

    fn token(&self, name: Option<&str>, service: &str) -> Result<String> {
        let tag = format!("kuma.io/service={service}");
        let mut args = vec![
            "generate",
            "dataplane-token",
            "--mesh",
            "default",
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

    /// `weft-dp run` with one runtime worker on host `i`.
    fn start_dp(&self, i: usize, name: &str, service: &str, yaml: &str) -> Result<Proc> {
        let dir = self.dir().join(format!("dp-{name}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("dataplane.yaml"), yaml)?;
        std::fs::write(dir.join("token"), self.token(Some(name), service)?)?;
        let host = self.host(i).clone();
        let mut cmd = host.command(need(&self.bins, "weft-dp")?);
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
            .args(["--worker-threads", "1", "--drain-timeout", "1s"]);
        cmd.env("RUST_LOG", "warn");
        host.spawn(&format!("dp-{name}"), cmd)
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
        bulk_gbps: f64,
        cpu_us: f64,
        rss_mib: f64,
    }

    const FIGURES: [&str; 7] = ["rps", "p50", "p99", "cps", "bulk", "cpu", "rss"];

    fn get(r: &Round, f: &str) -> f64 {
        match f {
            "rps" => r.rps,
            "p50" => r.p50_ms,
            "p99" => r.p99_ms,
            "cps" => r.cps,
            "bulk" => r.bulk_gbps,
            "cpu" => r.cpu_us,
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
        let hey = which("hey");
        let nginx = which("nginx").context("nginx (the backend) is not installed")?;
        let stream_mod = Path::new("/usr/lib/nginx/modules/ngx_stream_module.so");
        let wanted: Vec<String> = a
            .paths
            .as_deref()
            .unwrap_or("direct,weft,haproxy,nginx,stunnel")
            .split(',')
            .map(|s| s.trim().to_owned())
            .collect();
        let want = |p: &str| wanted.iter().any(|w| w == p);
        let mut skipped: Vec<String> = Vec::new();

        let mesh = Mesh::new(3, &bins)?;
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
        if want("weft") {
            mesh.apply("allow", ALLOW)?;
            let s = mesh.start_dp(3, "backend", "backend", BACKEND_YAML)?;
            let c = mesh.start_dp(2, "web", "web", WEB_YAML)?;
            paths.push(Path_ {
                name: "weft",
                base: "http://127.0.0.1:20001".into(),
                procs: vec![c, s],
                note: "weft-dp --worker-threads 1, authorization on".into(),
            });
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
        ensure!(!paths.is_empty(), "no path to measure");

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

        let mut results: BTreeMap<&'static str, Vec<Round>> = BTreeMap::new();
        for round in 0..rounds {
            let mut this: BTreeMap<&'static str, Round> = BTreeMap::new();
            // Figure by figure, the paths alternate: A B C … A B C …
            for p in &paths {
                let pids: Vec<u32> = p.procs.iter().map(Proc::pid).collect();
                let cpu0: f64 = pids.iter().map(|&q| cpu_secs(q, tck)).sum();
                let w = wrk_run(&client, &wrk, &format!("{}/1k", p.base), 16, secs, false)?;
                let cpu1: f64 = pids.iter().map(|&q| cpu_secs(q, tck)).sum();
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
                match &hey {
                    Some(hey) => {
                        let (p50, p99) = hey_run(&client, hey, &format!("{}/1k", p.base), secs)?;
                        r.p50_ms = p50;
                        r.p99_ms = p99;
                    }
                    None => {
                        r.p50_ms = f64::NAN;
                        r.p99_ms = f64::NAN;
                    }
                }
                eprintln!(
                    "round {round} {}: p50 {:.3} ms p99 {:.3} ms @1000 req/s",
                    p.name, r.p50_ms, r.p99_ms
                );
            }
            for p in &paths {
                let w = wrk_run(&client, &wrk, &format!("{}/1k", p.base), 16, secs, true)?;
                let r = this.entry(p.name).or_default();
                r.cps = w.rps;
                r.errors += w.errors;
                eprintln!("round {round} {}: {:.0} new conns/s", p.name, r.cps);
            }
            for p in &paths {
                let w = wrk_run(&client, &wrk, &format!("{}/1m", p.base), 1, secs, false)?;
                let r = this.entry(p.name).or_default();
                r.bulk_gbps = w.rps * ONE_MIB as f64 * 8.0 / 1e9;
                r.errors += w.errors;
                eprintln!("round {round} {}: {:.2} Gbit/s bulk", p.name, r.bulk_gbps);
            }
            for (k, v) in this {
                results.entry(k).or_default().push(v);
            }
        }

        let table = render(&paths, &results, &skipped, rounds, secs, &bins);
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
            "bulk" => format!("{v:.2}"),
            _ => format!("{v:.1}"),
        }
    }

    fn render(
        paths: &[Path_],
        results: &BTreeMap<&'static str, Vec<Round>>,
        skipped: &[String],
        rounds: usize,
        secs: u64,
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
            "{}; {rounds} round(s) of {secs} s per figure, paths alternating; binaries from `{}`.\n",
            machine_line(),
            bins.display()
        );
        let _ = writeln!(
            s,
            "| path | req/s (16 conns, keep-alive, 1 KiB) | p50 ms @1000 req/s | p99 ms @1000 req/s | new conns/s (Connection: close) | bulk 1 MiB, 1 stream (Gbit/s) | proxy CPU µs/req (both sides) | proxy RSS MiB (both sides) | errors |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
        for p in paths {
            let mut row = format!("| {} ", p.name);
            for f in FIGURES {
                let v = med(p.name, f);
                let w = med("weft", f);
                let ratio = if p.name != "weft" && v.is_finite() && w.is_finite() && w != 0.0 {
                    format!(" ({:.2}× weft)", v / w)
                } else {
                    String::new()
                };
                let _ = write!(row, "| {}{ratio} ", fmt_val(f, v));
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

    /// hey at a fixed 1000 req/s (10 connections × 100 req/s): (p50, p99) in ms.
    fn hey_run(client: &Host, hey: &Path, url: &str, secs: u64) -> Result<(f64, f64)> {
        let o = client.run_timeout(
            [
                hey.display().to_string(),
                "-z".into(),
                format!("{secs}s"),
                "-c".into(),
                "10".into(),
                "-q".into(),
                "100".into(),
                url.into(),
            ],
            Duration::from_secs(secs + 30),
        );
        let text = stdout(&o);
        ensure!(o.status.success(), "hey {url}: {text}");
        let pct = |p: &str| -> f64 {
            text.lines()
                .find_map(|l| {
                    let l = l.trim();
                    let rest = l.strip_prefix(p)?.strip_prefix("% in ")?;
                    rest.split_whitespace().next()?.parse::<f64>().ok()
                })
                .map_or(f64::NAN, |s| s * 1000.0)
        };
        Ok((pct("50"), pct("99")))
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
        std::fs::write(&token_file, mesh.token(None, "svc")?)?;
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
