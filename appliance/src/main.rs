//! `oxd`, the OX appliance daemon.
//!
//! `oxd --config FILE` serves the block devices and NVMe/TCP subsystems the file names;
//! `oxd smoke` is a self-contained run of the reactors and block devices. With a
//! `[control]` section it serves the JSON-RPC control API (docs/API.md) and keeps a
//! hash-chained audit log; with `[ox]` it holds volumes, snapshots and clones
//! (docs/OPERATIONS.md); with `[metrics]` it serves Prometheus metrics.

mod catalogue;
mod config;
mod control;
mod metrics;
mod serve;
mod service;
mod smoke;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The OX storage appliance daemon.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Serve what this TOML configuration names (see examples/nvmf.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Start reactors and one device of each kind, check data integrity from every
    /// core, print statistics and stop.
    Smoke(smoke::SmokeArgs),
}

/// Logs to stdout (the journal under systemd): level and message, with time when on a
/// terminal. `RUST_LOG` filters (default `info`). Nothing secret is ever logged.
fn logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stdout);
    if std::io::stdout().is_terminal() {
        builder.init();
    } else {
        // The journal (or whoever reads the pipe) stamps the time itself.
        builder.without_time().with_ansi(false).init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match (cli.command, cli.config) {
        (Some(Command::Smoke(args)), None) => smoke::run(&args),
        (None, Some(path)) => {
            logging();
            serve::run(&path)
        }
        (Some(_), Some(_)) => Err(anyhow::anyhow!("--config does not apply to subcommands")),
        (None, None) => Err(anyhow::anyhow!(
            "nothing to do: give --config FILE to serve, or a subcommand (see --help)"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line, without a backtrace.
            eprintln!("oxd: error: {}", appliance::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
