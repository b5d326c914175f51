use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = hearth::cli::Cli::parse();
    match hearth::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hearth: {}", hearth::cli::error_chain(&e));
            ExitCode::from(hearth::cli::exit_code(&e))
        }
    }
}
