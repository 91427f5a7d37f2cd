//! The `lbwasm` binary: parse the command line, set up logging, run the command.

use clap::Parser;
use std::process::ExitCode;

/// mimalloc: per-thread free lists suit the share-nothing workers (see README, dependencies).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    lbwasm::install_builtins();
    let cli = lbwasm::cli::Cli::parse();
    // The simulator draws progress bars; the proxy it runs would scroll info logs over them.
    let default_level = match (&cli.command, std::env::var_os("RUST_LOG")) {
        (lbwasm::cli::Command::Simulate(_), None) => Some("warn"),
        _ => None,
    };
    if let Err(e) = lbwasm::cli::init_tracing(cli.log_level.as_deref().or(default_level)) {
        eprintln!("lbwasm: error: {e:#}");
        return ExitCode::FAILURE;
    }
    match lbwasm::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lbwasm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
