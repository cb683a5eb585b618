//! `oxctl`, the operator CLI: talks to `oxd`'s control socket (JSON-RPC 2.0, see
//! docs/API.md) and checks audit logs.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ox_api::api::{API_VERSION, CallError, Client, DEFAULT_SOCKET, code, decode};
use ox_api::methods::{self as m, Method};
use serde_json::{Value, json};

/// Operator CLI for the OX appliance.
///
/// Talks to a running oxd over its control socket (the `[control] socket` of its
/// configuration). Add --json to any command for machine-readable output.
///
/// Examples:
///   oxctl volume create vol0 --size-mib 1024 --nqn nqn.2026-11.io.ox:vol0 --allow-any-host
///   oxctl snapshot create vol0 --store s3          # waits, with a progress bar
///   oxctl snapshot list
///   oxctl clone create c0 --snapshot 3fa2 --nqn nqn.2026-11.io.ox:c0 --allow-any-host
///   oxctl clone get c0                             # hydration, bytes fetched, misses
///   oxctl clone thicken c0 pause
///   oxctl bdevs
///   oxctl audit verify /var/lib/oxd/audit.log
#[derive(Parser)]
#[command(version, about, verbatim_doc_comment)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, env = "OXD_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Reach the daemon over TCP instead ("host:port", its `[control] listen`).
    #[arg(long, global = true, env = "OXD_CONNECT")]
    connect: Option<String>,
    /// File holding the token for --connect.
    #[arg(long, global = true, env = "OXD_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// With --connect: use TLS and trust only the certificates in this PEM file (a CA,
    /// or the daemon's own certificate, `[control] tls_cert_file`).
    #[arg(long, global = true, env = "OXD_CA_FILE")]
    ca_file: Option<PathBuf>,
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
    /// Volumes: local, snapshottable block devices.
    Volume {
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// Snapshots of volumes into object stores.
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// Clones: volumes readable and writable at once over a snapshot.
    Clone {
        #[command(subcommand)]
        command: CloneCommand,
    },
    /// Object stores.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Protection policies: snapshots on a schedule, and what is kept.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Key-encryption keys: list, create, rotate.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Long operations (snapshots) and their progress.
    Job {
        #[command(subcommand)]
        command: JobCommand,
    },
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

/// Where a new volume or clone is exported over NVMe/TCP.
#[derive(clap::Args)]
struct ExportArgs {
    /// Export under this subsystem NQN (namespace 1), on the daemon's export listeners.
    #[arg(long)]
    nqn: Option<String>,
    /// A host NQN allowed to connect (repeat for more).
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// Let any host connect.
    #[arg(long)]
    allow_any_host: bool,
}

impl ExportArgs {
    /// `nqn`, `hosts` and `allow_any_host` as the API takes them (hosts and
    /// allow_any_host only with an NQN).
    fn params(&self) -> (Option<String>, Option<Vec<String>>, Option<bool>) {
        match &self.nqn {
            Some(n) => (
                Some(n.clone()),
                Some(self.hosts.clone()),
                Some(self.allow_any_host),
            ),
            None => (None, None, None),
        }
    }
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Create a volume (a file in the daemon's state directory): empty, of --size-mib;
    /// or over a snapshot found in --from-store's catalogue (--from-volume with --latest
    /// or --snapshot ID), readable and writable at once, whose snapshots into that store
    /// continue the snapshot's lineage and store only what this volume changed.
    Create {
        /// Name (A-Z a-z 0-9 . _ -).
        name: String,
        /// Size in MiB (a multiple of the chunk size).
        #[arg(
            long,
            required_unless_present = "from_store",
            conflicts_with = "from_store"
        )]
        size_mib: Option<u64>,
        /// 512 or 4096.
        #[arg(long, default_value_t = 512)]
        block_size: u32,
        /// The store holding the snapshot to begin from.
        #[arg(long, requires = "from_volume")]
        from_store: Option<String>,
        /// The volume (name, identity or prefix) in --from-store's catalogue.
        #[arg(long, requires = "from_store")]
        from_volume: Option<String>,
        /// Its newest snapshot.
        #[arg(long, requires = "from_volume", conflicts_with = "snapshot")]
        latest: bool,
        /// That snapshot (its whole ID).
        #[arg(long, requires = "from_volume")]
        snapshot: Option<String>,
        /// Fail-back: a volume here whose last snapshot (wherever it was taken) is that
        /// snapshot or one of its ancestors; its data is copied locally so that only
        /// the chunks changed since, there or here, are read from the store.
        #[arg(long, requires = "from_volume")]
        seed: Option<String>,
        #[command(flatten)]
        export: ExportArgs,
    },
    /// Delete a volume and its data (its snapshots stay).
    Delete {
        /// Name.
        name: String,
    },
    /// Take a volume's place in a store over for this appliance (after the appliance
    /// that owns it is gone for good): its snapshots go there from now on, and the
    /// other appliance's are refused.
    Adopt {
        /// Name.
        name: String,
        /// Store.
        #[arg(long)]
        store: String,
    },
    /// Volumes and clones.
    List,
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Snapshot a volume into a store (incremental over its last snapshot there).
    Create {
        /// The volume.
        volume: String,
        /// The store, as named in the daemon's configuration.
        #[arg(long)]
        store: String,
        /// Key-encryption key (default: the first configured).
        #[arg(long)]
        key: Option<String>,
        /// Read every object back and check every frame before publishing (one GET
        /// per object), whatever the store's verify_before_publish says.
        #[arg(long, conflicts_with = "no_verify")]
        verify: bool,
        /// Do not read back, whatever the store's verify_before_publish says.
        #[arg(long)]
        no_verify: bool,
        /// Return at once with the job ID instead of waiting.
        #[arg(long)]
        no_wait: bool,
        /// A full snapshot: every chunk read and stored, over no parent (a new
        /// lineage; later snapshots are incremental over it).
        #[arg(long)]
        full: bool,
    },
    /// Snapshots taken by this appliance.
    List {
        /// Only of this volume.
        #[arg(long)]
        volume: Option<String>,
    },
    /// Fetch and check every frame of a snapshot; lists every bad one.
    Verify {
        /// Snapshot ID (or a unique prefix).
        id: String,
        /// Return at once with the job ID.
        #[arg(long)]
        no_wait: bool,
    },
    /// Copy a snapshot into a new volume.
    Restore {
        /// Snapshot ID (or a unique prefix).
        id: String,
        /// Name of the new volume.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        export: ExportArgs,
        /// Return at once with the job ID.
        #[arg(long)]
        no_wait: bool,
    },
    /// Delete a snapshot and the objects only it uses (newest first: a snapshot
    /// another one builds on, or a clone reads from, is kept).
    Delete {
        /// Snapshot ID (or a unique prefix).
        id: String,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// The object stores oxd is configured with (no credentials shown).
    List,
    /// Check a store as oxd reaches it: list, put a probe object, read it back, find
    /// it in a listing, delete it, see it gone (each step timed); fails naming the step
    /// and the reason.
    Check {
        /// The store, as named in the daemon's configuration.
        name: String,
    },
    /// Collect what failed uploads and deleted snapshots left, across the bucket:
    /// objects no manifest names, older than a day, in every volume place no upload
    /// holds (whichever appliance wrote them).
    Collect {
        /// The store, as named in the daemon's configuration.
        name: String,
        /// Say what would be deleted, and delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// What the store's own catalogue holds, whichever appliance wrote it: its
    /// volumes (owner, size) with their newest snapshots, or one volume's snapshots,
    /// newest first, a page at a time.
    Browse {
        /// The store, as named in the daemon's configuration.
        name: String,
        /// One volume (its name, identity or prefix): its snapshots.
        #[arg(long)]
        volume: Option<String>,
        /// Snapshots shown (per volume, or in the page; 1 to 1000).
        #[arg(long)]
        limit: Option<u64>,
        /// The page after this one (the `next` of the page before).
        #[arg(long, requires = "volume")]
        after: Option<String>,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Protect a volume: a snapshot into STORE every --every seconds; after each, keep
    /// the newest --keep-last and the newest of each of the last --hourly hours,
    /// --daily days, --weekly weeks and --monthly months (that have one), and collect
    /// the rest. Replaces the volume's policy.
    Set {
        /// The volume.
        volume: String,
        /// The store.
        #[arg(long)]
        store: String,
        /// Seconds between snapshots.
        #[arg(long)]
        every: u64,
        /// Key to wrap them under (default: the daemon's first).
        #[arg(long)]
        key: Option<String>,
        /// Keep the newest N.
        #[arg(long, default_value_t = 0)]
        keep_last: u32,
        /// Keep the newest of each of the last N hours.
        #[arg(long, default_value_t = 0)]
        hourly: u32,
        /// ... days.
        #[arg(long, default_value_t = 0)]
        daily: u32,
        /// ... weeks.
        #[arg(long, default_value_t = 0)]
        weekly: u32,
        /// ... months.
        #[arg(long, default_value_t = 0)]
        monthly: u32,
    },
    /// Every policy: its recovery point now (age of the newest snapshot), next run,
    /// failures, and what retention did.
    List,
    /// Stop protecting a volume (its snapshots stay).
    Delete {
        /// The volume.
        volume: String,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// The key-encryption keys oxd is configured with (names only; the first is the
    /// default for new snapshots).
    List,
    /// Write a new random key-encryption key to FILE (mode 0600), for a [[key]] entry.
    Create {
        /// Where to write it (must not exist).
        file: PathBuf,
    },
    /// Re-wrap every snapshot's data key under key NAME (configured in oxd, as must be
    /// the keys they use now); afterwards the old key can be removed.
    Rotate {
        /// The key to wrap under.
        to: String,
    },
    /// This appliance's receiver key: what another appliance seals a key for it with
    /// (`key export --to`).
    Receiver,
    /// Seal key NAME for the appliance whose receiver key is --to, into --out (a file
    /// only that appliance can open; never the key in the clear).
    Export {
        /// The key (as configured here).
        name: String,
        /// The receiving appliance's `oxctl key receiver` public key.
        #[arg(long)]
        to: String,
        /// Where to write the sealed key (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Open a key sealed for this appliance (`key export` elsewhere) into
    /// STATE_DIR/keys/NAME.key; prints the [[key]] section to add (then restart oxd).
    Import {
        /// The sealed key file.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum CloneCommand {
    /// Clone a snapshot: readable and writable at once, fetched on demand.
    Create {
        /// Name of the clone.
        name: String,
        /// Snapshot ID (or a unique prefix) from `oxctl snapshot list`; with --store
        /// and --volume, that volume's snapshot in the store, by its whole ID (`oxctl
        /// store browse`).
        #[arg(long, conflicts_with_all = ["manifest_key", "latest"])]
        snapshot: Option<String>,
        /// A store holding a snapshot taken elsewhere: with --manifest-key, or with
        /// --volume and --latest (or --snapshot) to find it in the store's catalogue.
        #[arg(long)]
        store: Option<String>,
        /// The snapshot's manifest key in --store.
        #[arg(long, requires = "store", conflicts_with = "volume")]
        manifest_key: Option<String>,
        /// A volume in --store's catalogue (its name, identity or prefix), whichever
        /// appliance took its snapshots.
        #[arg(long, requires = "store")]
        volume: Option<String>,
        /// The newest snapshot of --volume.
        #[arg(long, requires = "volume")]
        latest: bool,
        /// Copy every chunk in the background (within the bandwidth policy).
        #[arg(long)]
        thicken: bool,
        #[command(flatten)]
        export: ExportArgs,
    },
    /// Hydration, bytes fetched by reason, GETs, miss latency, thickening.
    Get {
        /// Name.
        name: String,
    },
    /// Delete a clone's local copy (the snapshot stays).
    Delete {
        /// Name.
        name: String,
    },
    /// Start, pause or resume background thickening, and set its bandwidth.
    Thicken {
        /// Name.
        name: String,
        /// start, pause or resume.
        #[arg(value_parser = thicken_action)]
        action: m::ThickenAction,
        /// This clone's thickening bandwidth in MiB/s (0: only the global limit).
        #[arg(long)]
        mib_s: Option<u64>,
    },
}

#[derive(Subcommand)]
enum JobCommand {
    /// One job's progress and outcome.
    Get {
        /// Job ID.
        id: u64,
    },
    /// Every job since the daemon started.
    List,
    /// Cancel a running snapshot, restore or verify (a cancelled snapshot publishes
    /// nothing; a cancelled restore leaves no volume).
    Cancel {
        /// Job ID.
        id: u64,
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
            eprintln!("oxctl: error: {}", ox_api::error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

fn client(cli: &Cli) -> anyhow::Result<Client> {
    match &cli.connect {
        Some(addr) => {
            let file = cli
                .token_file
                .as_ref()
                .context("--connect needs --token-file (or OXD_TOKEN_FILE)")?;
            let token = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            Client::connect_tcp(addr, token.trim(), cli.ca_file.as_deref())
                .with_context(|| format!("connecting to oxd at {addr}"))
        }
        None => Client::connect(&cli.socket)
            .with_context(|| "is oxd running with [control] socket set? (--socket, OXD_SOCKET)"),
    }
}

fn call(cli: &Cli, method: &str, params: Option<Value>) -> anyhow::Result<Value> {
    let mut client = client(cli)?;
    let r = client.call(method, params);
    answered(&mut client, method, r)
}

/// Calls method `M` with `params`: its answer as it came (what --json shows).
fn invoke<M: Method>(cli: &Cli, params: &M) -> anyhow::Result<Value> {
    let mut client = client(cli)?;
    let r = client.invoke(params);
    answered(&mut client, M::NAME, r)
}

/// Calls method `M` with `params`: its typed result.
fn request<M: Method>(cli: &Cli, params: &M) -> anyhow::Result<M::Result> {
    let mut client = client(cli)?;
    let r = client.request(params);
    answered(&mut client, M::NAME, r)
}

/// `r`, an answer to method `M`, as its typed result.
fn typed<M: Method>(r: &Value) -> anyhow::Result<M::Result> {
    Ok(decode::<M>(r)?)
}

/// The answer to `method`; a refusal the daemon may give because it is another build
/// (a method or parameter it does not know) says which builds met.
fn answered<T>(client: &mut Client, method: &str, r: Result<T, CallError>) -> anyhow::Result<T> {
    let e = match r {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    let unknown = matches!(&e, CallError::Rpc(rpc)
        if rpc.code == code::METHOD_NOT_FOUND
            || (rpc.code == code::INVALID_PARAMS
                // This build's daemons, and those before typed parameters.
                && (rpc.message.contains("unknown field")
                    || rpc.message.contains("unknown parameter"))));
    let ours = (env!("CARGO_PKG_VERSION"), u64::from(API_VERSION));
    let theirs = if unknown {
        client
            .request(&m::OxGetVersion {})
            .ok()
            .map(|v| (v.oxd, u64::from(v.api)))
    } else {
        None
    };
    let e = anyhow::Error::new(e).context(format!("{method} failed"));
    match theirs {
        Some((oxd, api)) if oxd != ours.0 || api != ours.1 => Err(e.context(format!(
            "oxd {oxd} (API {api}) is another build than oxctl {} (API {}): it may not \
                 know this method or parameter",
            ours.0, ours.1
        ))),
        _ => Err(e),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let result = match &cli.command {
        Command::Version => invoke(&cli, &m::OxGetVersion {})?,
        Command::Bdevs { name } => invoke(&cli, &m::BdevGetBdevs { name: name.clone() })?,
        Command::Subsystems => invoke(&cli, &m::NvmfGetSubsystems {})?,
        Command::Volume { command } => match command {
            VolumeCommand::Create {
                name,
                size_mib,
                block_size,
                from_store,
                from_volume,
                latest,
                snapshot,
                seed,
                export,
            } => {
                let (nqn, hosts, allow_any_host) = export.params();
                let mut p = m::VolumeCreate {
                    name: name.clone(),
                    size_mib: None,
                    block_size: None,
                    snapshot: None,
                    store: None,
                    manifest_key: None,
                    volume: None,
                    latest: None,
                    seed: None,
                    nqn,
                    hosts,
                    allow_any_host,
                };
                match (size_mib, from_store, from_volume) {
                    (Some(size), _, _) => {
                        p.size_mib = Some(*size);
                        p.block_size = Some(u64::from(*block_size));
                    }
                    (None, Some(store), Some(volume)) => {
                        p.store = Some(store.clone());
                        p.volume = Some(volume.clone());
                        match snapshot {
                            Some(id) => p.snapshot = Some(id.clone()),
                            None => p.latest = Some(*latest),
                        }
                        p.seed.clone_from(seed);
                    }
                    _ => anyhow::bail!("give --size-mib, or --from-store and --from-volume"),
                }
                invoke(&cli, &p)?
            }
            VolumeCommand::Adopt { name, store } => invoke(
                &cli,
                &m::VolumeAdopt {
                    name: name.clone(),
                    store: store.clone(),
                },
            )?,
            VolumeCommand::Delete { name } => {
                invoke(&cli, &m::VolumeDelete { name: name.clone() })?
            }
            VolumeCommand::List => invoke(&cli, &m::VolumeList {})?,
        },
        Command::Snapshot { command } => match command {
            SnapshotCommand::Create {
                volume,
                store,
                key,
                verify,
                no_verify,
                no_wait,
                full,
            } => {
                let p = m::SnapshotCreate {
                    volume: volume.clone(),
                    store: store.clone(),
                    key: key.clone(),
                    verify: (*verify || *no_verify).then_some(*verify),
                    full: full.then_some(true),
                };
                let job = invoke(&cli, &p)?;
                if *no_wait {
                    job
                } else {
                    wait_for(&cli, typed::<m::SnapshotCreate>(&job)?.id)?
                }
            }
            SnapshotCommand::List { volume } => invoke(
                &cli,
                &m::SnapshotList {
                    volume: volume.clone(),
                },
            )?,
            SnapshotCommand::Verify { id, no_wait } => {
                let job = invoke(&cli, &m::SnapshotVerify { id: id.clone() })?;
                if *no_wait {
                    job
                } else {
                    wait_for(&cli, typed::<m::SnapshotVerify>(&job)?.id)?
                }
            }
            SnapshotCommand::Restore {
                id,
                name,
                export,
                no_wait,
            } => {
                let (nqn, hosts, allow_any_host) = export.params();
                let p = m::SnapshotRestore {
                    id: id.clone(),
                    name: name.clone(),
                    nqn,
                    hosts,
                    allow_any_host,
                };
                let job = invoke(&cli, &p)?;
                if *no_wait {
                    job
                } else {
                    wait_for(&cli, typed::<m::SnapshotRestore>(&job)?.id)?
                }
            }
            SnapshotCommand::Delete { id } => invoke(&cli, &m::SnapshotDelete { id: id.clone() })?,
        },
        Command::Store {
            command: StoreCommand::List,
        } => invoke(&cli, &m::StoreList {})?,
        Command::Store {
            command: StoreCommand::Check { name },
        } => invoke(&cli, &m::StoreCheck { name: name.clone() })?,
        Command::Store {
            command: StoreCommand::Collect { name, dry_run },
        } => invoke(
            &cli,
            &m::StoreCollect {
                name: name.clone(),
                dry_run: Some(*dry_run),
            },
        )?,
        Command::Store {
            command:
                StoreCommand::Browse {
                    name,
                    volume,
                    limit,
                    after,
                },
        } => invoke(
            &cli,
            &m::StoreBrowse {
                store: name.clone(),
                volume: volume.clone(),
                limit: *limit,
                after: after.clone(),
            },
        )?,
        Command::Policy { command } => match command {
            PolicyCommand::Set {
                volume,
                store,
                every,
                key,
                keep_last,
                hourly,
                daily,
                weekly,
                monthly,
            } => invoke(
                &cli,
                &m::PolicySet {
                    volume: volume.clone(),
                    store: store.clone(),
                    every_s: *every,
                    key: key.clone(),
                    keep_last: Some(*keep_last),
                    hourly: Some(*hourly),
                    daily: Some(*daily),
                    weekly: Some(*weekly),
                    monthly: Some(*monthly),
                },
            )?,
            PolicyCommand::List => invoke(&cli, &m::PolicyList {})?,
            PolicyCommand::Delete { volume } => invoke(
                &cli,
                &m::PolicyDelete {
                    volume: volume.clone(),
                },
            )?,
        },
        Command::Key { command } => match command {
            KeyCommand::List => invoke(&cli, &m::KeyList {})?,
            KeyCommand::Create { file } => create_key(file)?,
            KeyCommand::Rotate { to } => invoke(&cli, &m::KeyRotate { to: to.clone() })?,
            KeyCommand::Receiver => invoke(&cli, &m::KeyReceiver {})?,
            KeyCommand::Export { name, to, out } => {
                let r = request(
                    &cli,
                    &m::KeyExport {
                        key: name.clone(),
                        to: to.clone(),
                    },
                )?;
                write_new_private(out, &serde_json::to_vec_pretty(&r.sealed)?)
                    .with_context(|| format!("writing {}", out.display()))?;
                json!({ "key": name, "file": out, "check": r.check })
            }
            KeyCommand::Import { file } => {
                let text =
                    std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
                let sealed: Value = serde_json::from_slice(&text)
                    .with_context(|| format!("{} is not a sealed key", file.display()))?;
                invoke(&cli, &m::KeyImport { sealed })?
            }
        },
        Command::Clone { command } => match command {
            CloneCommand::Create {
                name,
                snapshot,
                store,
                manifest_key,
                volume,
                latest,
                thicken,
                export,
            } => {
                let (nqn, hosts, allow_any_host) = export.params();
                let p = m::CloneCreate {
                    name: name.clone(),
                    snapshot: snapshot.clone(),
                    store: store.clone(),
                    manifest_key: manifest_key.clone(),
                    volume: volume.clone(),
                    latest: latest.then_some(true),
                    thicken: Some(*thicken),
                    nqn,
                    hosts,
                    allow_any_host,
                };
                invoke(&cli, &p)?
            }
            CloneCommand::Get { name } => invoke(&cli, &m::CloneGet { name: name.clone() })?,
            CloneCommand::Delete { name } => invoke(&cli, &m::CloneDelete { name: name.clone() })?,
            CloneCommand::Thicken {
                name,
                action,
                mib_s,
            } => invoke(
                &cli,
                &m::CloneThicken {
                    name: name.clone(),
                    action: *action,
                    mib_s: *mib_s,
                },
            )?,
        },
        Command::Job { command } => match command {
            JobCommand::Get { id } => invoke(&cli, &m::JobGet { id: *id })?,
            JobCommand::List => invoke(&cli, &m::JobList {})?,
            JobCommand::Cancel { id } => invoke(&cli, &m::JobCancel { id: *id })?,
        },
        Command::Audit {
            command: AuditCommand::Verify { file: Some(file) },
        } => serde_json::to_value(ox_api::audit::report(file))?,
        Command::Audit {
            command: AuditCommand::Verify { file: None },
        } => invoke(&cli, &m::AuditVerify {})?,
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
    } else if let Err(e) = print_human(&cli.command, &result) {
        // What was asked is done: the answer is shown as oxd sent it even if this
        // oxctl cannot read it as text (a daemon of another build, say), and the
        // command still succeeds, so a script does not do it twice.
        // (tools/tests/oxctl.rs looks for this text: keep them the same.)
        eprintln!("oxctl: cannot show oxd's answer as text ({e:#}); as oxd sent it:");
        println!("{}", serde_json::to_string_pretty(&result)?);
    }
    // A broken audit chain or a failed job is a failure for scripts too.
    if result.get("intact") == Some(&Value::Bool(false)) {
        anyhow::bail!("the audit log has been tampered with or damaged");
    }
    if result.get("state").and_then(Value::as_str) == Some("failed") {
        anyhow::bail!("job {} failed: {}", result["id"], result["error"]);
    }
    if result.get("ok") == Some(&Value::Bool(false)) {
        // The step the check names (as oxd does): the clock's if it failed — a clock
        // too far off is why the listing before it was refused — else the first.
        let steps = result["steps"].as_array().cloned().unwrap_or_default();
        let failed = |clock: bool| {
            let mut failing = steps.iter().filter(|s| !s["error"].is_null());
            failing.find(|s| !clock || s["step"] == "clock").cloned()
        };
        let failed = failed(true).or_else(|| failed(false)).unwrap_or_default();
        anyhow::bail!(
            "store {} failed its check at {}: {}",
            result["store"],
            failed["step"],
            failed["error"]
        );
    }
    Ok(())
}

/// A `clone thicken` action from its name.
fn thicken_action(s: &str) -> Result<m::ThickenAction, String> {
    match s {
        "start" => Ok(m::ThickenAction::Start),
        "pause" => Ok(m::ThickenAction::Pause),
        "resume" => Ok(m::ThickenAction::Resume),
        _ => Err(format!("{s:?} is not start, pause or resume")),
    }
}

/// Writes `bytes` to a new file only its owner can read.
fn write_new_private(file: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Writes 32 random bytes as hex to a new file only its owner can read.
fn create_key(file: &std::path::Path) -> anyhow::Result<Value> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
        .context("reading /dev/urandom")?;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    if file.exists() {
        anyhow::bail!("{} exists already", file.display());
    }
    // Written whole beside it, then renamed: a crash never leaves a short key file.
    let tmp = file.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(format!("{hex}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, file))
        .with_context(|| format!("writing {}", file.display()))?;
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", dir.display()))?;
    }
    Ok(json!({ "file": file, "created": true }))
}

/// Polls job `id` until it ends, with a progress bar on a terminal (hidden otherwise);
/// returns its last answer, as it came.
fn wait_for(cli: &Cli, id: u64) -> anyhow::Result<Value> {
    let bar = indicatif::ProgressBar::new(0);
    if cli.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} chunks, {elapsed} elapsed, ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut client = client(cli)?;
    loop {
        let raw = client.invoke(&m::JobGet { id })?;
        let j = decode::<m::JobGet>(&raw)?;
        bar.set_length(j.total);
        bar.set_position(j.done);
        bar.set_message(format!(
            "{} {} ({} uploaded)",
            j.kind,
            j.target,
            human_bytes(j.bytes)
        ));
        if j.state != m::JobState::Running {
            bar.finish_and_clear();
            return Ok(raw);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// `r`, the answer to `command`, for people: read as its method's typed result (a
/// command without a view of its own shows the JSON).
fn print_human(command: &Command, r: &Value) -> anyhow::Result<()> {
    match command {
        Command::Version => {
            let v = typed::<m::OxGetVersion>(r)?;
            println!("oxd {} (control API {})", v.oxd, v.api);
        }
        Command::Bdevs { .. } => {
            let bdevs = typed::<m::BdevGetBdevs>(r)?;
            println!(
                "{:<16} {:>12} {:>6} {:>12} {:>12} {:>8}  UUID",
                "NAME", "SIZE", "BLOCK", "READ OPS", "WRITE OPS", "ERRORS"
            );
            for b in bdevs {
                println!(
                    "{:<16} {:>12} {:>6} {:>12} {:>12} {:>8}  {}",
                    b.name,
                    human_bytes(b.size_bytes),
                    b.block_size,
                    b.stats.read.ops,
                    b.stats.write.ops,
                    b.errors,
                    b.uuid,
                );
            }
        }
        Command::Subsystems => {
            for sub in typed::<m::NvmfGetSubsystems>(r)? {
                println!("{}", sub.nqn);
                println!("  listeners:  {}", sub.listeners.join(" "));
                for ns in &sub.namespaces {
                    println!("  namespace {}: {}", ns.nsid, ns.bdev);
                }
                if sub.allow_any_host {
                    println!("  hosts:      any");
                } else {
                    for h in &sub.hosts {
                        println!("  host:       {h}");
                    }
                }
            }
        }
        Command::Audit { .. } => {
            let a = typed::<m::AuditVerify>(r)?;
            if a.intact {
                println!(
                    "{}: intact, {} entries, last hash {}",
                    a.path,
                    or_dash(a.entries),
                    or_dash(a.last_hash)
                );
            } else {
                println!("{}: BROKEN: {}", a.path, or_dash(a.error));
            }
        }
        Command::Volume {
            command: VolumeCommand::List,
        } => {
            let list = typed::<m::VolumeList>(r)?;
            println!(
                "{:<16} {:<7} {:>12} {:>9}  EXPORT / STATE",
                "NAME", "KIND", "SIZE", "HYDRATED"
            );
            for v in &list.volumes {
                println!(
                    "{:<16} {:<7} {:>12} {:>9}  {}",
                    v.name,
                    "volume",
                    human_bytes(v.size_bytes),
                    "-",
                    or_dash(v.export.as_ref().map(|e| &e.nqn)),
                );
            }
            for c in &list.clones {
                let state = match &c.unavailable {
                    Some(why) => format!("UNAVAILABLE: {why}"),
                    None => or_dash(c.export.as_ref().map(|e| &e.nqn)),
                };
                println!(
                    "{:<16} {:<7} {:>12} {:>8.1}%  {}",
                    c.name,
                    "clone",
                    human_bytes(c.size_bytes.unwrap_or(0)),
                    c.hydration_pct.unwrap_or(0.0),
                    state,
                );
            }
        }
        Command::Snapshot {
            command: SnapshotCommand::List { .. },
        } => {
            let list = typed::<m::SnapshotList>(r)?;
            println!(
                "{:<34} {:<16} {:<10} {:>12}  MANIFEST",
                "ID", "VOLUME", "STORE", "UPLOADED"
            );
            for x in list {
                println!(
                    "{:<34} {:<16} {:<10} {:>12}  {}",
                    x.id,
                    x.volume,
                    x.store,
                    human_bytes(x.data_bytes.saturating_add(x.meta_bytes)),
                    x.manifest_key,
                );
            }
        }
        Command::Snapshot {
            command: SnapshotCommand::Create { .. },
        } => {
            let job = typed::<m::SnapshotCreate>(r)?;
            if job.state != m::JobState::Done {
                // Still running (--no-wait), or failed: the job as it is.
                return print_json(r);
            }
            let x: m::Snapshot =
                serde_json::from_value(job.result).context("the snapshot job's result")?;
            println!(
                "snapshot {} of {}: {} chunks read, {} uploaded, manifest {}",
                x.id,
                x.volume,
                x.chunks_read,
                human_bytes(x.data_bytes.saturating_add(x.meta_bytes)),
                x.manifest_key,
            );
        }
        Command::Clone {
            command: CloneCommand::Get { .. } | CloneCommand::Thicken { .. },
        } => {
            // `clone_thicken` answers as `clone_get` does.
            let c = typed::<m::CloneGet>(r)?;
            println!("{}: {}", c.name, c.manifest_key);
            println!(
                "  hydrated      {:.1}% ({} of {} chunks)",
                c.hydration_pct.unwrap_or(0.0),
                or_dash(c.chunks_present),
                or_dash(c.chunks_total)
            );
            println!(
                "  host reads    {}",
                human_bytes(c.host_read_bytes.unwrap_or(0))
            );
            let fetched = c.fetched_bytes;
            for (reason, bytes) in [
                ("client_miss", fetched.map(|f| f.client_miss)),
                ("prefetch", fetched.map(|f| f.prefetch)),
                ("thickening", fetched.map(|f| f.thickening)),
            ] {
                println!(
                    "  fetched ({reason:<11}) {}",
                    human_bytes(bytes.unwrap_or(0))
                );
            }
            println!(
                "  object store  {} in {} GETs",
                human_bytes(c.object_bytes.unwrap_or(0)),
                or_dash(c.gets)
            );
            let miss = c.miss_latency_us;
            println!(
                "  miss latency  p50 {} µs, p99 {} µs ({} misses)",
                or_dash(miss.map(|l| l.p50)),
                or_dash(miss.map(|l| l.p99)),
                or_dash(miss.map(|l| l.count))
            );
            if let Some(t) = c.thickening {
                println!(
                    "  thickening    {}, {} chunks fetched, ETA {} s{}",
                    if t.paused { "paused" } else { "running" },
                    t.fetched,
                    or_dash(t.eta_s),
                    match t.retrying {
                        0 => String::new(),
                        n => format!(", {n} runs the store failed waiting to be asked again"),
                    }
                );
            }
        }
        Command::Volume {
            command: VolumeCommand::Create { .. },
        } => {
            let v = typed::<m::VolumeCreate>(r)?;
            print_created(&v.name, &v.listeners);
        }
        Command::Clone {
            command: CloneCommand::Create { .. },
        } => {
            let c = typed::<m::CloneCreate>(r)?;
            print_created(&c.name, &c.listeners);
        }
        Command::Volume {
            command: VolumeCommand::Adopt { .. },
        } => {
            let a = typed::<m::VolumeAdopt>(r)?;
            println!(
                "{} in {} is this appliance's now (adopted from {})",
                a.name, a.store, a.adopted_from.name
            );
        }
        Command::Volume {
            command: VolumeCommand::Delete { .. },
        } => println!("deleted {}", typed::<m::VolumeDelete>(r)?.name),
        Command::Clone {
            command: CloneCommand::Delete { .. },
        } => println!("deleted {}", typed::<m::CloneDelete>(r)?.name),
        Command::Store {
            command: StoreCommand::Check { .. },
        } => {
            for step in typed::<m::StoreCheck>(r)?.steps {
                let outcome = match (&step.error, &step.detail) {
                    (None, None) => "ok".to_string(),
                    (None, Some(d)) => format!("ok ({d})"),
                    (Some(e), _) => format!("FAILED: {e}"),
                };
                println!("{:<8} {:>7} ms  {outcome}", step.step, step.ms);
            }
        }
        Command::Store {
            command: StoreCommand::Collect { .. },
        } => {
            let c = typed::<m::StoreCollect>(r)?;
            for k in c.keys.iter().flatten() {
                println!("would delete {k}");
            }
            println!(
                "{} {} objects ({} bytes) and {} dead upload leases in {} places; kept {} \
                 younger than {} s and {} of unknown age; {} LISTs, {} GETs",
                if c.dry_run {
                    "would collect"
                } else {
                    "collected"
                },
                c.objects,
                c.bytes,
                c.dead_leases,
                c.places,
                c.young,
                c.grace_s,
                c.ageless,
                c.requests.lists,
                c.requests.gets,
            );
            for p in &c.skipped {
                println!("left alone {}: {}", p.prefix, p.reason);
            }
        }
        Command::Policy {
            command: PolicyCommand::List,
        } => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |x| x.as_secs());
            for p in typed::<m::PolicyList>(r)? {
                println!(
                    "{}  every {}s into {}  RPO now {}  next in {}s  runs {}  failures {}  retired {}",
                    p.volume,
                    p.every_s,
                    p.store,
                    p.rpo_s.map_or("-".into(), |v| format!("{v}s")),
                    p.next_due.saturating_sub(now),
                    p.runs,
                    p.failures,
                    p.retired,
                );
                if let Some(e) = &p.last_error {
                    println!("    last error: {}", e.error);
                }
            }
        }
        Command::Store {
            command: StoreCommand::Browse { .. },
        } => {
            let snapshot_line = |v: &m::BucketSnapshot| {
                println!(
                    "    {}  {:>9} ago  {:>10} stored  by {}  key {}{}",
                    v.id,
                    age(v.created),
                    human_bytes(v.stored_bytes),
                    v.appliance.name,
                    or_dash(v.key.as_deref()),
                    if v.key_here == Some(false) {
                        " (not configured here)"
                    } else {
                        ""
                    }
                );
            };
            // A volume, its snapshots, and where older ones are: `more` in a browse of
            // the store, `next` in a page of the volume's.
            let volume_lines = |v: &m::BucketVolume,
                                snapshots: &[m::BucketSnapshot],
                                more: bool,
                                next: Option<&str>| {
                println!(
                    "{}  {}  {}  owner {}{}",
                    v.name,
                    v.volume,
                    human_bytes(v.size_bytes),
                    v.owner.name,
                    if v.owned_here {
                        " (this appliance)"
                    } else {
                        ""
                    }
                );
                for snap in snapshots {
                    snapshot_line(snap);
                }
                if more {
                    println!(
                        "    … older: oxctl store browse STORE --volume {}",
                        v.volume
                    );
                }
                if let Some(next) = next {
                    println!("    … older: --after {next}");
                }
            };
            match typed::<m::StoreBrowse>(r)? {
                m::Browsed::Store(store) => {
                    for v in &store.volumes {
                        volume_lines(&v.head, &v.snapshots, v.more, None);
                    }
                    for u in &store.unreadable {
                        println!("{}  UNREADABLE: {}", u.prefix, u.reason);
                    }
                }
                m::Browsed::Volume(page) => {
                    volume_lines(&page.head, &page.snapshots, false, page.next.as_deref());
                }
            }
        }
        _ => print_json(r)?,
    }
    Ok(())
}

/// `r` as indented JSON.
fn print_json(r: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(r)?);
    Ok(())
}

/// A new volume's or clone's name, and where it is exported.
fn print_created(name: &str, listeners: &[String]) {
    if listeners.is_empty() {
        println!("created {name} (not exported)");
    } else {
        println!("created {name}, exported on {}", listeners.join(" "));
    }
}

/// `v`, or "-" for none.
fn or_dash<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// How long ago `secs` (Unix seconds) was, roughly.
fn age(secs: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let d = now.saturating_sub(secs);
    match d {
        0..60 => format!("{d}s"),
        60..3600 => format!("{}m", d / 60),
        3600..86400 => format!("{}h", d / 3600),
        _ => format!("{}d", d / 86400),
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
