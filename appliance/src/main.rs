//! `oxd`, the OX appliance daemon.
//!
//! `oxd --config FILE` serves the block devices and NVMe/TCP subsystems the file names;
//! `oxd smoke` is a self-contained run of the reactors and block devices; `oxd
//! dhchap-key` prints a new DH-HMAC-CHAP secret for `[[host]]` sections. With a
//! `[control]` section it serves the JSON-RPC control API (docs/API.md) and keeps a
//! hash-chained audit log; with `[ox]` it holds volumes, snapshots and clones
//! (docs/OPERATIONS.md); with `[metrics]` it serves Prometheus metrics.

mod admission;
mod catalogue;
mod config;
mod console;
mod control;
mod health;
mod logs;
mod metrics;
mod refusal;
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
    /// Print a new DH-HMAC-CHAP secret (`DHHC-1:XX:...:`, as `nvme gen-dhchap-key`
    /// makes) for a `[[host]]`'s dhchap_key_file or dhchap_ctrl_key_file; give the same
    /// string to the host's `nvme connect --dhchap-secret` (or --dhchap-ctrl-secret).
    DhchapKey(DhchapKeyArgs),
}

#[derive(clap::Args)]
struct DhchapKeyArgs {
    /// Key length in bytes: 32, 48 or 64.
    #[arg(long, default_value_t = 32)]
    bytes: usize,
    /// Hash that transforms the key with its owner's NQN first: none, sha256, sha384
    /// or sha512.
    #[arg(long, default_value = "sha256")]
    transform: String,
}

fn dhchap_key(a: &DhchapKeyArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use nvmf::dhchap::{DhchapKey, Hash};
    let transform = match a.transform.as_str() {
        "none" => None,
        name => Some(Hash::from_name(name).with_context(|| {
            format!("--transform {name:?} is not one of none, sha256, sha384, sha512")
        })?),
    };
    println!("{}", DhchapKey::generate(a.bytes, transform)?.encode());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match (cli.command, cli.config) {
        (Some(Command::Smoke(args)), None) => smoke::run(&args),
        (Some(Command::DhchapKey(args)), None) => dhchap_key(&args),
        (None, Some(path)) => {
            logs::init();
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
            eprintln!("oxd: error: {}", ox_api::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
