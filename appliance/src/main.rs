//! `oxd`, the OX appliance daemon.
//!
//! Today it has one job, `oxd smoke`: a self-contained run of the pinned reactors and
//! the block devices. Serving NVMe/TCP and object exchange arrive with their issues.

mod smoke;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The OX storage appliance daemon.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start reactors and one device of each kind, check data integrity from every
    /// core, print statistics and stop.
    Smoke(smoke::SmokeArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Smoke(args) => smoke::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line, without a backtrace.
            eprintln!("oxd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
