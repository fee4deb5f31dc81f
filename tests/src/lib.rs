//! weft's end-to-end harness: runs the real `weft-cp` and `weftctl` binaries as processes on
//! free loopback ports with temporary data directories, and waits for state with deadlines.
//!
//! The binaries are the ones `cargo build --workspace --bins` put next to this test binary
//! (`target/<profile>/`); the README's test command builds them first.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

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
