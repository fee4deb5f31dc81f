//! The systemd notification protocol as `Type=notify` units see it, with the real `weft-cp`:
//! READY=1 once its listeners are bound, WATCHDOG=1 pings at half of WATCHDOG_USEC,
//! RELOADING=1 then READY=1 on SIGHUP, STOPPING=1 on SIGTERM. A unix datagram socket stands
//! in for systemd's NOTIFY_SOCKET.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use weft_e2e::{bin, free_port};

/// Receives notifications until one contains `want`, or fails after `within`.
fn expect(sock: &UnixDatagram, want: &str, within: Duration, seen: &mut Vec<String>) -> Result<()> {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no {want:?} within {within:?}; got {seen:?}");
        }
        sock.set_read_timeout(Some(left))?;
        let Ok(n) = sock.recv(&mut buf) else {
            bail!("no {want:?} within {within:?}; got {seen:?}");
        };
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        seen.push(msg.clone());
        if msg.lines().any(|l| l == want) {
            return Ok(());
        }
    }
}

#[test]
fn weft_cp_speaks_the_notify_protocol() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path)?;
    let config = dir.path().join("cp.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\ntype = \"memory\"\npath = \"{}\"\n[api]\naddress = \"127.0.0.1:{}\"\n[diagnostics]\naddress = \"127.0.0.1:{}\"\n[dp_server]\naddress = \"127.0.0.1:{}\"\ntls_dir = \"{}\"\n",
            dir.path().join("store").display(),
            free_port(),
            free_port(),
            free_port(),
            dir.path().join("tls").display()
        ),
    )?;
    // systemd sets WATCHDOG_PID to the service's PID: a shell that execs weft-cp keeps its own.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" run --config \"$1\"")
        .arg(bin("weft-cp"))
        .arg(&config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning weft-cp")?;
    let pid = child.id().to_string();
    let mut seen = Vec::new();
    let r = (|| -> Result<()> {
        expect(&sock, "READY=1", Duration::from_secs(20), &mut seen)?;
        // Two pings within 0.4 s: the half-interval schedule.
        let t0 = Instant::now();
        expect(&sock, "WATCHDOG=1", Duration::from_secs(2), &mut seen)?;
        expect(&sock, "WATCHDOG=1", Duration::from_secs(2), &mut seen)?;
        assert!(
            t0.elapsed() < Duration::from_millis(900),
            "{:?}",
            t0.elapsed()
        );
        Command::new("kill").args(["-HUP", &pid]).status()?;
        expect(&sock, "RELOADING=1", Duration::from_secs(5), &mut seen)?;
        expect(&sock, "READY=1", Duration::from_secs(5), &mut seen)?;
        Command::new("kill").args(["-TERM", &pid]).status()?;
        expect(&sock, "STOPPING=1", Duration::from_secs(5), &mut seen)?;
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    r
}
