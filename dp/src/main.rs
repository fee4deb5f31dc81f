//! `weft-dp`: the weft dataplane proxy. Thin: install the crypto provider, parse flags, load
//! and check the config and the Dataplane file (exit 64 when bad, before binding anything),
//! then run until SIGTERM or SIGINT.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use weft_dp::app;
use weft_dp::config::{Config, FileConfig, parse_var};

const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(name = "weft-dp", version, about = "weft dataplane proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join the mesh and serve until SIGTERM/SIGINT.
    Run(Flags),
    /// Check the configuration (file plus flags) and the Dataplane file, and exit: 0 if valid,
    /// 64 with the reason if not.
    Validate(Flags),
}

#[derive(Args)]
struct Flags {
    /// TOML config file (e.g. /etc/weft/dp/web.toml); flags override its keys.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Control plane dataplane server, https://HOST:5678.
    #[arg(long)]
    cp_address: Option<String>,
    /// PEM CA bundle that signed the control plane's certificate.
    #[arg(long)]
    ca_cert_file: Option<PathBuf>,
    /// Dataplane resource file (Kuma universal YAML, `{{ var }}` templates allowed).
    #[arg(long)]
    dataplane_file: Option<PathBuf>,
    /// A value for a `{{ var }}` template in the dataplane file, `key=value`; repeatable.
    #[arg(long = "dataplane-var", value_name = "KEY=VALUE")]
    dataplane_vars: Vec<String>,
    /// Dataplane token file, needed for the first join only.
    #[arg(long)]
    dataplane_token_file: Option<PathBuf>,
    /// State directory for the key, certificate and last config.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Admin listener address (default 127.0.0.1 on a free port).
    #[arg(long)]
    admin_address: Option<std::net::SocketAddr>,
    /// Cap of the reconnect backoff, e.g. 3s.
    #[arg(long)]
    reconnect_max_backoff: Option<String>,
    /// Period of the status report, e.g. 10s.
    #[arg(long)]
    status_interval: Option<String>,
    /// On SIGTERM: how long open connections may take to finish, e.g. 10s (the default).
    #[arg(long)]
    drain_timeout: Option<String>,
    /// Threads of the async runtime (default: one per CPU; 1 runs everything on one thread,
    /// without work stealing: the cheapest per request).
    #[arg(long)]
    worker_threads: Option<usize>,
    /// Resume TLS sessions between dataplanes (default true; false: a full handshake per
    /// TLS connection).
    #[arg(long)]
    tls_resumption: Option<bool>,
    /// Congestion controller of the QUIC connections between dataplanes, for what this one
    /// sends: cubic (the default; backs off on every loss, as TCP does) or bbr (paces at the
    /// bandwidth it measures and keeps its speed on lossy links, e.g. a zone ingress across a
    /// WAN; quinn calls it experimental).
    #[arg(long, value_parser = ["cubic", "bbr"])]
    quic_congestion: Option<String>,
}

fn load(f: Flags) -> Result<Config, String> {
    let base = match &f.config {
        Some(p) => FileConfig::load(p).map_err(|e| e.to_string())?,
        None => FileConfig::default(),
    };
    let vars = f
        .dataplane_vars
        .iter()
        .map(|v| parse_var(v))
        .collect::<Result<BTreeMap<_, _>, _>>()
        .map_err(|e| e.to_string())?;
    let flags = FileConfig {
        cp_address: f.cp_address,
        ca_cert_file: f.ca_cert_file,
        dataplane_file: f.dataplane_file,
        dataplane_token_file: f.dataplane_token_file,
        state_dir: f.state_dir,
        admin_address: f.admin_address,
        dataplane_vars: (!vars.is_empty()).then_some(vars),
        reconnect_max_backoff: f.reconnect_max_backoff,
        status_interval: f.status_interval,
        drain_timeout: f.drain_timeout,
        worker_threads: f.worker_threads,
        tls_resumption: f.tls_resumption,
        quic_congestion: f.quic_congestion,
    };
    base.overlay(flags).check().map_err(|e| e.to_string())
}

fn init_tracing() {
    // The journal (with structured fields) under systemd; stderr otherwise.
    weft_systemd::init_logging("RUST_LOG", "info", weft_systemd::Format::Text);
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn main() -> ExitCode {
    weft_dp::heap::keep_freed_memory();
    // Ignoring the result is right: it only fails when a provider is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (run, flags) = match Cli::parse().command {
        Command::Run(f) => (true, f),
        Command::Validate(f) => (false, f),
    };
    init_tracing();
    let checked = match load(flags).and_then(|c| app::check(c).map_err(|e| e.to_string())) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("weft-dp: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    if !run {
        println!(
            "valid: control plane {}, dataplane {}/{} ({})",
            checked.config.cp_address,
            checked.dataplane.mesh,
            checked.dataplane.name,
            checked.config.dataplane_file.display()
        );
        return ExitCode::SUCCESS;
    }
    // One worker: a current-thread runtime. Everything (accepts, both copy
    // directions, the I/O driver, timers) runs on the thread that polls it,
    // with no work-stealing bookkeeping or cross-thread wake-ups.
    let mut builder = match checked.config.worker_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weft-dp: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(app::run_checked(checked, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-dp: {e}");
            ExitCode::FAILURE
        }
    }
}
