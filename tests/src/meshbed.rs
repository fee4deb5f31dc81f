//! A mesh on the namespace testbed: `weft-cp` on host 1 (dataplane server on
//! `10.77.0.11:5678`, REST API on host 1's loopback), and helpers to start dataplanes and
//! test apps on the other hosts. Every command, `weftctl` and `curl` included, runs inside a
//! test host; nothing is sent from the root namespace.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::netns::{Host, Proc, Testbed};
use crate::{bin, wait_for};

/// The CP's REST API inside host 1.
const API: &str = "http://127.0.0.1:5681";
/// The CP's diagnostics inside host 1.
const DIAGNOSTICS: &str = "http://127.0.0.1:5680";

/// A testbed with a control plane on host 1.
pub struct MeshBed {
    /// The hosts.
    pub bed: Testbed,
    cp: Option<Proc>,
    cp_config: PathBuf,
    /// More `weft-dp run` flags for the dataplanes started from now on.
    dp_flags: Vec<String>,
}

/// A dataplane started by [`MeshBed::start_dp`].
pub struct Dataplane {
    /// Its process.
    pub proc: Proc,
    /// The host it runs on.
    pub host: Host,
    /// Its state directory.
    pub state_dir: PathBuf,
    /// Its name.
    pub name: String,
}

impl MeshBed {
    /// `hosts` hosts (at least 2); `weft-cp` on host 1, ready.
    pub fn new(hosts: usize) -> anyhow::Result<MeshBed> {
        assert!(
            Testbed::available(),
            "network namespaces are unavailable: run as root"
        );
        let bed = Testbed::new(hosts)?;
        let dir = bed.dir().to_owned();
        let cp_config = dir.join("cp.toml");
        std::fs::write(
            &cp_config,
            format!(
                "[store]\ntype = \"sled\"\npath = \"{}\"\n[dp_server]\naddress = \"0.0.0.0:5678\"\ntls_dir = \"{}\"\ntls_sans = [\"{}\"]\n",
                dir.join("cp-store").display(),
                dir.join("cp-tls").display(),
                bed.host(1).addr
            ),
        )?;
        let mut m = MeshBed {
            bed,
            cp: None,
            cp_config,
            dp_flags: Vec::new(),
        };
        m.start_cp()?;
        Ok(m)
    }

    /// Host `i`.
    pub fn host(&self, i: usize) -> &Host {
        self.bed.host(i)
    }

    /// Starts (or restarts) the CP and waits until it is ready.
    pub fn start_cp(&mut self) -> anyhow::Result<()> {
        let h1 = self.bed.host(1).clone();
        let mut cmd = h1.command(bin("weft-cp"));
        cmd.args(["run", "--config"]).arg(&self.cp_config);
        cmd.env("WEFT_LOG", "info");
        let proc = h1.spawn("cp", cmd)?;
        wait_for("weft-cp /ready", Duration::from_secs(20), || {
            if !proc.is_running() {
                panic!("weft-cp exited: {}", proc.log());
            }
            let out = h1.run_timeout(
                [
                    "curl",
                    "-fsS",
                    "-o",
                    "/dev/null",
                    &format!("{DIAGNOSTICS}/ready"),
                ],
                Duration::from_secs(2),
            );
            out.status.success().then_some(())
        })?;
        self.cp = Some(proc);
        Ok(())
    }

    /// `kill -9` of the CP.
    pub fn kill_cp(&mut self) {
        if let Some(p) = self.cp.take() {
            p.kill9();
        }
    }

    /// The CP's log.
    pub fn cp_log(&self) -> String {
        self.cp.as_ref().map(Proc::log).unwrap_or_default()
    }

    /// The CA file dataplanes pin.
    pub fn ca_file(&self) -> PathBuf {
        self.bed.dir().join("cp-tls/ca.pem")
    }

    /// Runs `weftctl ARGS` inside host 1 against the CP.
    pub fn weftctl(&self, args: &[&str]) -> Output {
        let config = self.bed.dir().join("weftctl.toml");
        let mut all: Vec<String> = vec![
            "env".into(),
            format!("WEFTCTL_CONFIG={}", config.display()),
            bin("weftctl").display().to_string(),
            "--api-address".into(),
            API.into(),
        ];
        all.extend(args.iter().map(|s| (*s).to_owned()));
        self.bed.host(1).run(all)
    }

    /// `weftctl ARGS` that must succeed; its stdout.
    pub fn weftctl_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.weftctl(args);
        if !out.status.success() {
            bail!(
                "weftctl {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Applies YAML (written to a file first).
    pub fn apply(&self, name: &str, yaml: &str) -> anyhow::Result<()> {
        let f = self.bed.dir().join(format!("{name}.yaml"));
        std::fs::write(&f, yaml)?;
        self.weftctl_ok(&["apply", "-f", &f.display().to_string()])?;
        Ok(())
    }

    /// A GET on the REST API, as JSON.
    pub fn api_json(&self, path: &str) -> anyhow::Result<Value> {
        let out = self
            .bed
            .host(1)
            .run(["curl", "-fsS", &format!("{API}{path}")]);
        if !out.status.success() {
            bail!("GET {path}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// The insight of a dataplane.
    pub fn insight(&self, mesh: &str, name: &str) -> anyhow::Result<Value> {
        let v = self.api_json(&format!("/meshes/{mesh}/dataplanes/_overview"))?;
        v["items"]
            .as_array()
            .and_then(|items| items.iter().find(|i| i["name"] == name))
            .map(|i| i["dataplaneInsight"].clone())
            .with_context(|| format!("no dataplane {name} in {v}"))
    }

    /// A dataplane token for `name` with `service`.
    pub fn token(&self, mesh: &str, name: &str, service: &str) -> anyhow::Result<String> {
        let out = self.weftctl_ok(&[
            "generate",
            "dataplane-token",
            "--mesh",
            mesh,
            "--name",
            name,
            "--tag",
            &format!("kuma.io/service={service}"),
            "--valid-for",
            "1h",
        ])?;
        Ok(out.trim().to_owned())
    }

    /// Gives the dataplanes started from now on these `weft-dp run` flags as well, e.g.
    /// `["--quic-congestion", "bbr"]`.
    pub fn set_dp_flags(&mut self, flags: &[&str]) {
        self.dp_flags = flags.iter().map(|f| (*f).to_owned()).collect();
    }

    /// Starts `weft-dp` for the Dataplane `yaml` (named `name`, in `mesh`) on host `i`, with
    /// a fresh token, and waits until its admin address is known.
    pub fn start_dp(
        &self,
        i: usize,
        mesh: &str,
        name: &str,
        service: &str,
        yaml: &str,
    ) -> anyhow::Result<Dataplane> {
        let dir = self.bed.dir().join(format!("dp-{name}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("dataplane.yaml"), yaml)?;
        std::fs::write(dir.join("token"), self.token(mesh, name, service)?)?;
        let state_dir = dir.join("state");
        let host = self.bed.host(i).clone();
        let mut cmd = host.command(bin("weft-dp"));
        cmd.arg("run")
            .arg("--cp-address")
            .arg(format!("https://{}:5678", self.bed.host(1).addr))
            .arg("--ca-cert-file")
            .arg(self.ca_file())
            .arg("--dataplane-file")
            .arg(dir.join("dataplane.yaml"))
            .arg("--dataplane-token-file")
            .arg(dir.join("token"))
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--reconnect-max-backoff")
            .arg("1s")
            .arg("--drain-timeout")
            .arg("2s")
            .args(&self.dp_flags);
        cmd.env("RUST_LOG", "info");
        let proc = host.spawn(&format!("dp-{name}"), cmd)?;
        wait_for(
            &format!("{name}'s admin address"),
            Duration::from_secs(10),
            || state_dir.join("admin-address").exists().then_some(()),
        )?;
        Ok(Dataplane {
            proc,
            host,
            state_dir,
            name: name.to_owned(),
        })
    }

    /// Starts `weft-testapp http-echo` named `name` on host `i`'s loopback port `port`.
    pub fn http_echo(&self, i: usize, name: &str, port: u16) -> anyhow::Result<Proc> {
        let host = self.bed.host(i);
        let mut cmd = host.command(bin("weft-testapp"));
        cmd.args([
            "http-echo",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--name",
            name,
        ]);
        let p = host.spawn(&format!("echo-{name}"), cmd)?;
        p.wait_listening(Duration::from_secs(10))?;
        Ok(p)
    }

    /// Starts `weft-testapp tcp-echo` on host `i`'s loopback port `port`.
    pub fn tcp_echo(&self, i: usize, name: &str, port: u16) -> anyhow::Result<Proc> {
        let host = self.bed.host(i);
        let mut cmd = host.command(bin("weft-testapp"));
        cmd.args(["tcp-echo", "--listen", &format!("127.0.0.1:{port}")]);
        let p = host.spawn(&format!("tcp-echo-{name}"), cmd)?;
        p.wait_listening(Duration::from_secs(10))?;
        Ok(p)
    }

    /// Starts `weft-testapp ARGS` inside host `i` in the background (a client such as `load`
    /// or `tcp-chat`); its output goes to the [`Proc`]'s log.
    pub fn testapp(&self, i: usize, name: &str, args: &[&str]) -> anyhow::Result<Proc> {
        let host = self.bed.host(i);
        let mut cmd = host.command(bin("weft-testapp"));
        cmd.args(args);
        host.spawn(name, cmd)
    }

    /// `curl` inside host `i`: (exit code, body).
    pub fn curl(&self, i: usize, url: &str) -> (i32, String) {
        let out = self.bed.host(i).run_timeout(
            ["curl", "-sS", "--max-time", "3", url],
            Duration::from_secs(5),
        );
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// Runs `weft-testapp ARGS` inside host `i` to completion (killed after `timeout`), with
    /// its output captured: the client side of a check.
    pub fn run_testapp(&self, i: usize, args: &[&str], timeout: Duration) -> Output {
        let testapp = bin("weft-testapp");
        let mut argv: Vec<&OsStr> = vec![testapp.as_os_str()];
        argv.extend(args.iter().map(OsStr::new));
        self.bed.host(i).run_timeout(argv, timeout)
    }

    /// Runs `weft-testapp load` inside host `i` for `duration`; returns its JSON summary.
    pub fn load(
        &self,
        i: usize,
        url: &str,
        duration: &str,
        interval: &str,
    ) -> anyhow::Result<Value> {
        let out = self.run_testapp(
            i,
            &[
                "load",
                "--url",
                url,
                "--duration",
                duration,
                "--interval",
                interval,
            ],
            Duration::from_secs(120),
        );
        if !out.status.success() {
            bail!("load failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

impl Dataplane {
    /// A GET on the dataplane's admin server (inside its host).
    pub fn admin(&self, path: &str) -> anyhow::Result<String> {
        let addr = std::fs::read_to_string(self.state_dir.join("admin-address"))?;
        let out = self.host.run_timeout(
            [
                "curl",
                "-sS",
                "--max-time",
                "3",
                &format!("http://{}{path}", addr.trim()),
            ],
            Duration::from_secs(5),
        );
        if !out.status.success() {
            bail!(
                "GET {path} on {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The value of metric `name` with labels containing every `label` (summed over matches).
    pub fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let Ok(text) = self.admin("/metrics") else {
            return 0.0;
        };
        text.lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}
