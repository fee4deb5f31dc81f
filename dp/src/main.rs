//! `weft-dp`: the weft dataplane proxy. Thin: parse flags, load config (exit 64 when bad).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use weft_dp::config::FileConfig;

const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(name = "weft-dp", version, about = "weft dataplane proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check the configuration (file plus flags) and exit: 0 if valid, 64 with the reason if not.
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
    /// Dataplane resource file (Kuma universal YAML).
    #[arg(long)]
    dataplane_file: Option<PathBuf>,
    /// Dataplane token file, needed for the first join only.
    #[arg(long)]
    dataplane_token_file: Option<PathBuf>,
    /// State directory for the key and certificate.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Admin listener address (default 127.0.0.1 on a free port).
    #[arg(long)]
    admin_address: Option<std::net::SocketAddr>,
}

fn main() -> ExitCode {
    let Command::Validate(f) = Cli::parse().command;
    let base = match &f.config {
        Some(p) => match FileConfig::load(p) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("weft-dp: {e}");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
        },
        None => FileConfig::default(),
    };
    let flags = FileConfig {
        cp_address: f.cp_address,
        ca_cert_file: f.ca_cert_file,
        dataplane_file: f.dataplane_file,
        dataplane_token_file: f.dataplane_token_file,
        state_dir: f.state_dir,
        admin_address: f.admin_address,
    };
    match base.overlay(flags).check() {
        Ok(c) => {
            println!(
                "valid: control plane {}, dataplane {}",
                c.cp_address,
                c.dataplane_file.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("weft-dp: {e}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
    }
}
