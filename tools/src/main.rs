//! `oxctl`, the operator CLI: talks to `oxd`'s control socket (JSON-RPC 2.0, see
//! docs/API.md) and checks audit logs.

use std::path::PathBuf;

use anyhow::Context;
use appliance::api::{Client, DEFAULT_SOCKET};
use clap::{Parser, Subcommand};
use serde_json::Value;

/// Operator CLI for the OX appliance.
///
/// Talks to a running oxd over its control socket (the `[control] socket` of its
/// configuration). Add --json to any command for machine-readable output.
///
/// Examples:
///   oxctl --socket /run/oxd/oxd.sock bdevs
///   oxctl subsystems --json
///   oxctl audit verify /var/lib/oxd/audit.log
#[derive(Parser)]
#[command(version, about, verbatim_doc_comment)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, env = "OXD_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print the daemon's JSON answer instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Versions of the daemon and its control API.
    Version,
    /// Block devices: size, block size, UUID, I/O counters and latency.
    Bdevs {
        /// Only this device.
        #[arg(long)]
        name: Option<String>,
    },
    /// NVMe/TCP subsystems: NQN, listeners, namespaces, allowed hosts.
    Subsystems,
    /// Audit log: check that no entry was changed, removed or reordered.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Call any API method with JSON parameters (for scripts and debugging).
    Call {
        /// Method name, e.g. bdev_get_bdevs.
        method: String,
        /// Parameters as a JSON object, e.g. '{"name": "vol0"}'.
        params: Option<String>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify a log's hash chain: the file given, or the daemon's own log.
    Verify {
        /// A copy of the log to check offline; without it the daemon checks its log.
        file: Option<PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("oxctl: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn call(cli: &Cli, method: &str, params: Option<Value>) -> anyhow::Result<Value> {
    let mut client = Client::connect(&cli.socket)
        .with_context(|| "is oxd running with [control] socket set? (--socket, OXD_SOCKET)")?;
    client
        .call(method, params)
        .with_context(|| format!("{method} failed"))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let result = match &cli.command {
        Command::Version => call(&cli, "ox_get_version", None)?,
        Command::Bdevs { name } => call(
            &cli,
            "bdev_get_bdevs",
            name.as_ref().map(|n| serde_json::json!({ "name": n })),
        )?,
        Command::Subsystems => call(&cli, "nvmf_get_subsystems", None)?,
        Command::Audit {
            command: AuditCommand::Verify { file: Some(file) },
        } => match appliance::audit::verify(file) {
            Ok((entries, last)) => {
                serde_json::json!({"path": file, "intact": true, "entries": entries, "last_hash": last})
            }
            Err(e) => serde_json::json!({"path": file, "intact": false, "error": e.to_string()}),
        },
        Command::Audit {
            command: AuditCommand::Verify { file: None },
        } => call(&cli, "audit_verify", None)?,
        Command::Call { method, params } => {
            let p = params
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .context("PARAMS is not JSON")?;
            call(&cli, method, p)?
        }
    };
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        print_human(&cli.command, &result);
    }
    // A broken audit chain is a failure for scripts too.
    if result.get("intact") == Some(&Value::Bool(false)) {
        anyhow::bail!("the audit log has been tampered with or damaged");
    }
    Ok(())
}

fn print_human(command: &Command, r: &Value) {
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    match command {
        Command::Version => println!("oxd {} (control API {})", s(&r["oxd"]), s(&r["api"])),
        Command::Bdevs { .. } => {
            println!(
                "{:<16} {:>12} {:>6} {:>12} {:>12} {:>8}  UUID",
                "NAME", "SIZE", "BLOCK", "READ OPS", "WRITE OPS", "ERRORS"
            );
            for b in r.as_array().into_iter().flatten() {
                println!(
                    "{:<16} {:>12} {:>6} {:>12} {:>12} {:>8}  {}",
                    s(&b["name"]),
                    human_bytes(b["size_bytes"].as_u64().unwrap_or(0)),
                    s(&b["block_size"]),
                    s(&b["stats"]["read"]["ops"]),
                    s(&b["stats"]["write"]["ops"]),
                    s(&b["errors"]),
                    s(&b["uuid"]),
                );
            }
        }
        Command::Subsystems => {
            for sub in r.as_array().into_iter().flatten() {
                println!("{}", s(&sub["nqn"]));
                let l: Vec<String> = sub["listeners"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(s)
                    .collect();
                println!("  listeners:  {}", l.join(" "));
                for ns in sub["namespaces"].as_array().into_iter().flatten() {
                    println!("  namespace {}: {}", s(&ns["nsid"]), s(&ns["bdev"]));
                }
                if sub["allow_any_host"] == Value::Bool(true) {
                    println!("  hosts:      any");
                } else {
                    for h in sub["hosts"].as_array().into_iter().flatten() {
                        println!("  host:       {}", s(h));
                    }
                }
            }
        }
        Command::Audit { .. } => {
            if r["intact"] == Value::Bool(true) {
                println!(
                    "{}: intact, {} entries, last hash {}",
                    s(&r["path"]),
                    s(&r["entries"]),
                    s(&r["last_hash"])
                );
            } else {
                println!("{}: BROKEN: {}", s(&r["path"]), s(&r["error"]));
            }
        }
        Command::Call { .. } => {
            println!("{}", serde_json::to_string_pretty(r).unwrap_or_default());
        }
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
