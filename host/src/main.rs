//! The `lbwasm` binary: parse the command line, set up logging, run the command.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = lbwasm::cli::Cli::parse();
    lbwasm::cli::init_tracing(cli.log_level.as_deref());
    match lbwasm::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lbwasm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
