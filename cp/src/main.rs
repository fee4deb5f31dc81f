//! `weft-cp`: the weft control plane. Thin: parse flags, load config (exit 64 when it is bad,
//! before binding anything), run the app until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use weft_cp::config::Config;

/// sysexits' EX_CONFIG-adjacent EX_USAGE: bad configuration.
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "weft-cp",
    version,
    about = "weft control plane: resources in an embedded sled store, served over a REST API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane until SIGTERM or SIGINT.
    Run {
        /// TOML config file (default: built-in defaults). `WEFT_CP_…` variables override it.
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
        /// Log format on stderr.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Check a config file and exit: 0 if it is valid, 64 with the reason if not.
    Validate {
        /// TOML config file.
        #[arg(long, short = 'c')]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logs(format: LogFormat) {
    // The journal (with structured fields) under systemd; stderr otherwise.
    let format = match format {
        LogFormat::Text => weft_systemd::Format::Text,
        LogFormat::Json => weft_systemd::Format::Json,
    };
    weft_systemd::init_logging("WEFT_LOG", "info", format);
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config } => match Config::load(Some(&config)) {
            Ok(_) => {
                println!("{}: valid", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("weft-cp: {e}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Run { config, log_format } => {
            let config = match Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("weft-cp: {e}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            init_logs(log_format);
            match run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("weft-cp: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Blocking threads beyond the dataplane server's store calls.
const BLOCKING_HEADROOM: usize = 16;

fn run(config: Config) -> anyhow::Result<()> {
    // Blocking threads: the dataplane server's store calls (bounded by `dp_server.store_calls`)
    // plus headroom for the API, the index and maintenance, so an API write never queues behind
    // a burst of dataplane records. tokio's default (512) let bursts leave hundreds of idle
    // threads behind, each with its stack and malloc arena.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(config.dp_server_store_calls + BLOCKING_HEADROOM)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let store = weft_cp::app::open_store(&config)?;
        let listeners = weft_cp::app::Listeners::bind(&config).await?;
        weft_cp::app::run(config, store, listeners, shutdown_signal()).await
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}
