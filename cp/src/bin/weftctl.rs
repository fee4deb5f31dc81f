//! `weftctl`: the command-line client of weft's control plane (see `weft_cp::cli`).
//!
//! Thin: parse the arguments (clap exits 2 on usage errors), run, print `Error: …` and exit 1
//! on failure.

use std::io::{self, Write};
use std::process::ExitCode;

use clap::Parser;
use weft_cp::cli::{self, Cli};

fn main() -> ExitCode {
    let args = Cli::parse();
    let mut out = io::stdout().lock();
    let mut err = io::stderr();
    match cli::run(args, &mut out, &mut err) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = out.flush();
            let _ = writeln!(err, "Error: {e}");
            ExitCode::from(1)
        }
    }
}
