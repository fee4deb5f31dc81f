//! weft's end-to-end harness: runs the real `weft-cp`, `weft-dp` and `weftctl` binaries as
//! processes on free loopback ports with temporary data and state directories, and waits for
//! state with deadlines.
//!
//! The binaries are the ones `cargo build --workspace --bins` put next to this test binary
//! (`target/<profile>/`); the README's test command builds them first.

pub mod meshbed;
pub mod netns;
pub mod vmbed;

use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

/// Path of a workspace binary built beside the running test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (the README's test command does)",
        p.display()
    );
    p
}

/// A free TCP port on 127.0.0.1 (bound and released; the kernel does not hand it out again at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Polls `f` until it returns `Some`, or fails with `what` once `timeout` has passed.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `weft-cp` process. Killed (by its PID) when dropped.
pub struct Cp {
    child: Child,
    /// Its data directory (sled).
    pub data_dir: PathBuf,
    /// REST API address.
    pub api: SocketAddr,
    /// Diagnostics address.
    pub diagnostics: SocketAddr,
    /// Dataplane server address (gRPC over TLS).
    pub dp_server: SocketAddr,
    config_file: PathBuf,
    log_file: PathBuf,
}

impl Cp {
    /// Starts a CP on fresh free ports over `data_dir` and waits until `/ready` answers 200.
    pub fn start(data_dir: &Path) -> anyhow::Result<Cp> {
        let api = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let diagnostics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let dp_server = SocketAddr::from(([127, 0, 0, 1], free_port()));
        Self::start_on(data_dir, api, diagnostics, dp_server)
    }

    /// Starts a CP on the given addresses.
    pub fn start_on(
        data_dir: &Path,
        api: SocketAddr,
        diagnostics: SocketAddr,
        dp_server: SocketAddr,
    ) -> anyhow::Result<Cp> {
        std::fs::create_dir_all(data_dir)?;
        let config_file = data_dir.with_extension("toml");
        std::fs::write(
            &config_file,
            format!(
                "[store]\ntype = \"sled\"\npath = \"{}\"\n[api]\naddress = \"{api}\"\n[diagnostics]\naddress = \"{diagnostics}\"\n[dp_server]\naddress = \"{dp_server}\"\ntls_dir = \"{}\"\n",
                data_dir.display(),
                data_dir.with_extension("tls").display()
            ),
        )?;
        let log_file = data_dir.with_extension("log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_file)?;
        let child = Command::new(bin("weft-cp"))
            .args(["run", "--config"])
            .arg(&config_file)
            .env("WEFT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning weft-cp")?;
        let mut cp = Cp {
            child,
            data_dir: data_dir.to_owned(),
            api,
            diagnostics,
            dp_server,
            config_file,
            log_file,
        };
        cp.wait_ready()?;
        Ok(cp)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let url = format!("http://{}/ready", self.diagnostics);
        let client = client();
        let child = &mut self.child;
        let log = self.log_file.clone();
        wait_for("weft-cp /ready", Duration::from_secs(20), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "weft-cp exited with {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            client
                .get(&url)
                .send()
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ())
        })
    }

    /// `http://ADDR` of the REST API.
    pub fn url(&self) -> String {
        format!("http://{}", self.api)
    }

    /// The CP's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and waits for a clean exit.
    pub fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let child = &mut self.child;
        wait_for(
            "weft-cp to exit after SIGTERM",
            Duration::from_secs(10),
            || child.try_wait().ok().flatten(),
        )
    }

    /// Starts the CP again on the same data dir and addresses.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_none() {
            self.stop()?;
        }
        let next = Cp::start_on(&self.data_dir, self.api, self.diagnostics, self.dp_server)?;
        // The old process has exited; dropping it only reaps what is already reaped.
        drop(std::mem::replace(self, next));
        Ok(())
    }

    /// The CA file dataplanes pin (`--ca-cert-file`): generated by the CP on first start.
    pub fn ca_cert_file(&self) -> PathBuf {
        self.data_dir.with_extension("tls").join("ca.pem")
    }

    /// `https://127.0.0.1:PORT` of the dataplane server.
    pub fn dp_server_url(&self) -> String {
        format!("https://{}", self.dp_server)
    }

    /// The CP's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// Its config file.
    pub fn config_file(&self) -> &Path {
        &self.config_file
    }

    /// `GET <API>/path` as JSON; fails on a non-2xx answer.
    pub fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let r = client().get(format!("{}{path}", self.url())).send()?;
        let status = r.status();
        let body = r.text()?;
        if !status.is_success() {
            bail!("GET {path}: {status}: {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON: {body}"))
    }

    /// The `dataplaneInsight` of `mesh`/`name` from `GET /meshes/{mesh}/dataplanes/_overview`.
    pub fn insight(&self, mesh: &str, name: &str) -> anyhow::Result<Option<Value>> {
        let page = self.get_json(&format!("/meshes/{mesh}/dataplanes/_overview"))?;
        Ok(page["items"].as_array().and_then(|items| {
            items
                .iter()
                .find(|i| i["name"] == name)
                .map(|i| i["dataplaneInsight"].clone())
        }))
    }

    /// Runs `weftctl --api-address <this CP> ARGS…` with its own config dir.
    pub fn weftctl(&self, args: &[&str]) -> Output {
        self.weftctl_stdin(args, None)
    }

    /// Like `weftctl`, feeding `stdin`.
    pub fn weftctl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        use std::io::Write;
        let mut cmd = Command::new(bin("weftctl"));
        cmd.arg("--api-address")
            .arg(self.url())
            .env(
                "WEFTCTL_CONFIG",
                self.data_dir.with_extension("weftctl.toml"),
            )
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn weftctl");
        if let Some(s) = stdin {
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(s.as_bytes())
                .expect("write stdin");
        }
        child.wait_with_output().expect("weftctl output")
    }
}

impl Drop for Cp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP client with short timeouts.
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(1))
        .build()
        .expect("reqwest client")
}

/// stdout of a command that must have succeeded; panics with its stderr otherwise.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How to run one `weft-dp`: the files it is given.
#[derive(Debug, Clone)]
pub struct DpSpec {
    /// `--cp-address`.
    pub cp_address: String,
    /// `--ca-cert-file`.
    pub ca_cert_file: PathBuf,
    /// `--dataplane-file`.
    pub dataplane_file: PathBuf,
    /// `--dataplane-token-file`, if any.
    pub token_file: Option<PathBuf>,
    /// `--state-dir`.
    pub state_dir: PathBuf,
    /// `--dataplane-var KEY=VALUE` flags.
    pub vars: Vec<(String, String)>,
    /// Where its stdout and stderr go (appended across restarts).
    pub log_file: PathBuf,
}

impl DpSpec {
    /// A dataplane of `cp` living in `dir`: writes `dir/dataplane.yaml` and `dir/token` (when
    /// `token` is given); state in `dir/state`, log in `dir/dp.log`.
    pub fn new(
        cp: &Cp,
        dir: &Path,
        dataplane_yaml: &str,
        token: Option<&str>,
    ) -> anyhow::Result<DpSpec> {
        std::fs::create_dir_all(dir)?;
        let dataplane_file = dir.join("dataplane.yaml");
        std::fs::write(&dataplane_file, dataplane_yaml)?;
        let token_file = match token {
            Some(t) => {
                let f = dir.join("token");
                std::fs::write(&f, t)?;
                Some(f)
            }
            None => None,
        };
        Ok(DpSpec {
            cp_address: cp.dp_server_url(),
            ca_cert_file: cp.ca_cert_file(),
            dataplane_file,
            token_file,
            state_dir: dir.join("state"),
            vars: Vec::new(),
            log_file: dir.join("dp.log"),
        })
    }

    /// Adds a `--dataplane-var key=value`.
    pub fn var(mut self, key: &str, value: &str) -> DpSpec {
        self.vars.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The flags of `weft-dp run` / `weft-dp validate`.
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            "--cp-address".into(),
            self.cp_address.clone().into(),
            "--ca-cert-file".into(),
            self.ca_cert_file.clone().into(),
            "--dataplane-file".into(),
            self.dataplane_file.clone().into(),
            "--state-dir".into(),
            self.state_dir.clone().into(),
            "--reconnect-max-backoff".into(),
            "1s".into(),
        ];
        if let Some(t) = &self.token_file {
            a.push("--dataplane-token-file".into());
            a.push(t.clone().into());
        }
        for (k, v) in &self.vars {
            a.push("--dataplane-var".into());
            a.push(format!("{k}={v}").into());
        }
        a
    }

    /// Runs `weft-dp validate` with these flags.
    pub fn validate(&self) -> Output {
        Command::new(bin("weft-dp"))
            .arg("validate")
            .args(self.args())
            .stdin(Stdio::null())
            .output()
            .expect("run weft-dp validate")
    }
}

/// A running `weft-dp` process. Killed (by its PID) when dropped.
pub struct Dp {
    child: Child,
    /// How it was started.
    pub spec: DpSpec,
    admin: SocketAddr,
}

impl Dp {
    /// Starts `weft-dp run` and waits (with a deadline) until it has written its admin address.
    /// Does not wait for readiness: see [`Dp::wait_ready`].
    pub fn start(spec: DpSpec) -> anyhow::Result<Dp> {
        std::fs::create_dir_all(&spec.state_dir)?;
        let admin_file = spec.state_dir.join("admin-address");
        // The file of an earlier run would name a port nobody listens on any more.
        match std::fs::remove_file(&admin_file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log_file)?;
        let mut child = Command::new(bin("weft-dp"))
            .arg("run")
            .args(spec.args())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning weft-dp")?;
        let log_file = spec.log_file.clone();
        let admin = wait_for(
            "weft-dp to write <state-dir>/admin-address",
            Duration::from_secs(10),
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "weft-dp exited with {status}: {}",
                        std::fs::read_to_string(&log_file).unwrap_or_default()
                    );
                }
                std::fs::read_to_string(&admin_file)
                    .ok()
                    .and_then(|s| s.trim().parse::<SocketAddr>().ok())
            },
        );
        let admin = match admin {
            Ok(a) => a,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        Ok(Dp { child, spec, admin })
    }

    /// The admin listener's address, as the dataplane wrote it to `<state-dir>/admin-address`.
    pub fn admin_address(&self) -> SocketAddr {
        self.admin
    }

    /// The dataplane's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `GET /config` of the admin server: `{"version": "...", "config": {...}}`.
    pub fn config(&self) -> anyhow::Result<Value> {
        let r = client()
            .get(format!("http://{}/config", self.admin))
            .send()?;
        let status = r.status();
        let v: Value = r.json()?;
        if !status.is_success() {
            bail!("GET /config: {status}: {v}");
        }
        Ok(v)
    }

    /// The version of the applied config, if it serves one.
    pub fn config_version(&self) -> Option<String> {
        self.config()
            .ok()
            .and_then(|c| c["version"].as_str().map(str::to_owned))
    }

    /// Whether `GET /ready` answers 200.
    pub fn ready(&self) -> bool {
        client()
            .get(format!("http://{}/ready", self.admin))
            .send()
            .is_ok_and(|r| r.status().is_success())
    }

    /// Waits until `/ready` answers 200.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let r = wait_for("weft-dp /ready", timeout, || self.ready().then_some(()));
        r.with_context(|| format!("weft-dp log:\n{}", self.log()))
    }

    /// The value of an unlabelled sample of `GET /metrics`, e.g. `weft_dp_cp_connected`.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let text = client()
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .ok()?
            .text()
            .ok()?;
        text.lines().find_map(|l| {
            let (n, v) = l.split_once(' ')?;
            (n == name).then(|| v.trim().parse().ok()).flatten()
        })
    }

    /// Reads a file of its state directory (`key.pem`, `cert.pem`, `bundle.pem`, …).
    pub fn state_file(&self, name: &str) -> anyhow::Result<String> {
        let p = self.spec.state_dir.join(name);
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    }

    /// Its log so far (all runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.spec.log_file).unwrap_or_default()
    }

    /// SIGTERM, and waits for a clean exit.
    pub fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let child = &mut self.child;
        wait_for(
            "weft-dp to exit after SIGTERM",
            Duration::from_secs(10),
            || child.try_wait().ok().flatten(),
        )
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again with the same spec (stopping it first if it runs).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        let next = Dp::start(self.spec.clone())?;
        // The old process has exited; dropping it only reaps what is already reaped.
        drop(std::mem::replace(self, next));
        Ok(())
    }
}

impl Drop for Dp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
