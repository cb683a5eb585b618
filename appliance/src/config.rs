//! The daemon's TOML configuration: reactors, block devices, NVMe/TCP subsystems and
//! listeners. Unknown keys are errors, and every check names the key it rejects.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use bdev::{Bdev, UringConfig, create_malloc, create_null, open_uring};
use nvmf::dhchap::{DhchapKey, Hash, HostKeys};
use nvmf::ffdhe::DhGroup;
use nvmf::{HostPolicy, Limits, Namespace, SocketIo, Subsystem, TargetConfig};
use ox::keys::{Kek, KekSource};
use ox::store::http::Trust;
use ox::store::s3::{CredentialSource, S3Config};
use ox::throttle::{Limit, Throttle};
use reactor::{CoreList, IdlePolicy, ReactorConfig};
use serde::Deserialize;
use uuid::Uuid;

use crate::service::{Settings, StoreSpec};

/// The whole configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Reactor threads.
    #[serde(default)]
    pub reactors: ReactorsSection,
    /// NVMe/TCP target limits and discovery listeners.
    #[serde(default)]
    pub nvmf: NvmfSection,
    /// Block devices.
    #[serde(default, rename = "bdev")]
    pub bdevs: Vec<BdevSection>,
    /// Subsystems.
    #[serde(default, rename = "subsystem")]
    pub subsystems: Vec<SubsystemSection>,
    /// Control socket and audit log.
    #[serde(default)]
    pub control: ControlSection,
    /// Prometheus metrics.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// The web console.
    #[serde(default)]
    pub console: ConsoleSection,
    /// Object exchange: where state lives, OX cores, bandwidth, exports.
    pub ox: Option<OxSection>,
    /// Object stores.
    #[serde(default, rename = "store")]
    pub stores: Vec<StoreSection>,
    /// Key-encryption keys.
    #[serde(default, rename = "key")]
    pub keys: Vec<KeySection>,
    /// Volumes the appliance must have (created at start if missing).
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeSection>,
    /// Clones the appliance must have (created at start if missing).
    #[serde(default, rename = "clone")]
    pub clones: Vec<CloneSection>,
    /// Protection policies (each replaces its volume's policy set through the API).
    #[serde(default, rename = "policy")]
    pub policies: Vec<ox::policy::Policy>,
    /// Hosts that must authenticate (DH-HMAC-CHAP) wherever they connect.
    #[serde(default, rename = "host")]
    pub hosts: Vec<HostSection>,
}

/// `[[host]]`: a host's DH-HMAC-CHAP secrets. Every subsystem that lets this host in
/// (by name or with `allow_any_host`) makes it authenticate each queue with them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSection {
    /// The host's NQN.
    pub nqn: String,
    /// A file holding the host's secret, `DHHC-1:XX:...:` as `nvme gen-dhchap-key`
    /// prints it (readable by the owner only).
    pub dhchap_key_file: PathBuf,
    /// A file holding the controller's secret, for hosts that ask the appliance to
    /// authenticate itself too (bidirectional); without it such hosts are refused.
    pub dhchap_ctrl_key_file: Option<PathBuf>,
    /// `sha256` (default), `sha384` or `sha512`, used when the host offers it.
    pub dhchap_hash: Option<String>,
    /// Diffie-Hellman group to augment challenges with, when the host offers it:
    /// `null` (default: none), `ffdhe2048`, `ffdhe3072` or `ffdhe4096`.
    pub dhchap_dhgroup: Option<String>,
}

/// `[[clone]]`: a clone of a snapshot in a store, created at the first start and kept
/// in the catalogue (like `oxctl clone create --store --manifest-key`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneSection {
    /// Name.
    pub name: String,
    /// The store holding the snapshot.
    pub store: String,
    /// The snapshot's manifest key.
    pub manifest_key: String,
    /// Copy every chunk in the background.
    #[serde(default)]
    pub thicken: bool,
    /// Export under this NQN on `ox.export_listeners`.
    pub nqn: Option<String>,
    /// Allowed host NQNs.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Any host may connect.
    #[serde(default)]
    pub allow_any_host: bool,
}

/// `[[volume]]`: a snapshottable volume, created at the first start and kept in the
/// catalogue (like `oxctl volume create`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSection {
    /// Name.
    pub name: String,
    /// Size in MiB.
    pub size_mib: u64,
    /// 512 (default) or 4096.
    pub block_size: Option<u32>,
    /// Export under this NQN on `ox.export_listeners`.
    pub nqn: Option<String>,
    /// Allowed host NQNs.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Any host may connect.
    #[serde(default)]
    pub allow_any_host: bool,
}

/// `[ox]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OxSection {
    /// Directory for the catalogue, volume files, clone copies and presence records.
    pub state_dir: PathBuf,
    /// OX cores (threads for encoding, fetching and thickening), as a core list
    /// ("1", "0-1"); default: one unpinned thread.
    pub cores: Option<String>,
    /// Client-miss bandwidth, MiB/s (0 or absent: unlimited).
    pub foreground_mib_s: Option<u64>,
    /// Snapshot upload and thickening bandwidth, MiB/s (0 or absent: unlimited).
    pub background_mib_s: Option<u64>,
    /// Where volumes and clones created through the API are exported over NVMe/TCP,
    /// e.g. ["0.0.0.0:4420"].
    #[serde(default)]
    pub export_listeners: Vec<String>,
    /// zstd level for snapshots (default 3; 0: no compression).
    pub zstd_level: Option<i32>,
    /// Seal data objects at this size, MiB (default 8).
    pub object_mib: Option<usize>,
    /// Chunk size of volumes created through the API, KiB (default 64).
    pub chunk_kib: Option<u64>,
}

/// `[[store]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// Unique name, used by the API.
    pub name: String,
    /// "s3" or "local" (a directory: the embedded default).
    pub kind: String,
    /// s3: endpoint URL, e.g. "https://s3.eu-west-1.amazonaws.com".
    pub endpoint: Option<String>,
    /// s3: bucket.
    pub bucket: Option<String>,
    /// s3: region (default "us-east-1").
    pub region: Option<String>,
    /// s3: "chain" (the AWS credential chain: the environment, then the shared
    /// credentials file's `profile`, then the config file's; the default), "env" (AWS_*
    /// variables), "file" (shared credentials file, `profile`), "process" (what
    /// `credential_process` prints), or "static" with `access_key`/`secret_key_file`.
    pub credentials: Option<String>,
    /// s3: profile for credentials = "chain" (default: AWS_PROFILE, else "default") or
    /// "file" (default: "default").
    pub profile: Option<String>,
    /// s3: for credentials = "process", the program and its arguments (run without a
    /// shell) printing credentials as the AWS SDKs' `credential_process` does.
    pub credential_process: Option<Vec<String>>,
    /// s3: access key ID for credentials = "static".
    pub access_key: Option<String>,
    /// s3: file holding the secret key for credentials = "static" (never inline).
    pub secret_key_file: Option<PathBuf>,
    /// s3: PEM bundle of the CAs to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// s3: allow plain http:// endpoints (default false).
    #[serde(default)]
    pub allow_http: bool,
    /// s3: "path" (`endpoint/bucket/key`, the default) or "virtual"
    /// (`bucket.endpoint/key`, for endpoints that take only virtual-hosted style).
    pub addressing: Option<String>,
    /// s3: "headers" (SigV4 in the Authorization header, as the SDKs sign: the
    /// default) or "query" (presigned URLs).
    pub signing: Option<String>,
    /// s3: connect to this address ("IP:PORT") instead of where the endpoint's host
    /// resolves; the host still names the server (`Host`, TLS).
    pub connect_to: Option<String>,
    /// s3: `true`: every PUT carries `Content-MD5` besides its CRC32C; `false`: none
    /// does; by default conditional PUTs always do, and others until the store answers
    /// one with its CRC32C (which shows it reads them), and for good again once one
    /// sent without is answered without it (`ox::store::s3::ContentMd5::Auto`).
    pub content_md5: Option<bool>,
    /// local: the directory.
    pub path: Option<PathBuf>,
    /// Read every object of a snapshot back (one GET each) and check every frame
    /// before publishing it (default false; `oxctl snapshot create --verify` asks for
    /// one snapshot).
    #[serde(default)]
    pub verify_before_publish: bool,
}

/// `[[key]]`: a key-encryption key; the first is the default for new snapshots.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySection {
    /// Key ID, recorded in every manifest it wraps a data key for.
    pub name: String,
    /// A file holding 64 hex characters (mode 0600).
    pub file: Option<PathBuf>,
    /// An environment variable holding 64 hex characters.
    pub env: Option<String>,
    /// A command printing 64 hex characters (a KMS hook).
    pub command: Option<String>,
}

/// `[console]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSection {
    /// "address:port" serving the web console (behind `[control] token_file`, over TLS
    /// with `[control]`'s certificate if set); none if absent.
    pub listen: Option<String>,
}

/// `[metrics]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// "address:port" serving `GET /metrics` (OpenMetrics text); none if absent.
    pub listen: Option<String>,
}

/// `[control]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSection {
    /// Unix socket for the JSON-RPC control API (mode 0600); none if absent.
    pub socket: Option<PathBuf>,
    /// Hash-chained audit log of every control operation; none if absent.
    pub audit_log: Option<PathBuf>,
    /// Also serve the API over TCP at "address:port" (remote management), over TLS
    /// with `tls_cert_file` and `tls_key_file`. Needs `token_file`.
    pub listen: Option<String>,
    /// File holding the token TCP clients must present (at least 16 characters).
    pub token_file: Option<PathBuf>,
    /// PEM certificate (chain) the TCP control API presents: with `tls_key_file`, the
    /// API is served over TLS (`oxctl --ca-file` trusts it).
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// Seconds a TCP client has to authenticate, TLS handshake included (default 5).
    pub auth_timeout_s: Option<u64>,
    /// Seconds a request may take to arrive once begun (default 30).
    pub request_timeout_s: Option<u64>,
    /// Seconds a connection may wait between requests (default 600).
    pub idle_timeout_s: Option<u64>,
    /// Connections served at once, per listener (default 16; the Unix socket has its
    /// own).
    pub max_connections: Option<usize>,
    /// TCP connections served at once from one address (default 4).
    pub max_connections_per_peer: Option<usize>,
}

impl ControlSection {
    /// The control listeners' limits.
    pub fn limits(&self) -> anyhow::Result<crate::admission::Limits> {
        let d = crate::admission::Limits::default();
        let secs = |v: Option<u64>, default: std::time::Duration, key: &str| match v {
            None => Ok(default),
            Some(0) => bail!("control.{key} must be at least 1"),
            Some(s) => Ok(std::time::Duration::from_secs(s)),
        };
        let count = |v: Option<usize>, default: usize, key: &str| match v {
            None => Ok(default),
            Some(0) => bail!("control.{key} must be at least 1"),
            Some(n) => Ok(n),
        };
        Ok(crate::admission::Limits {
            max_connections: count(self.max_connections, d.max_connections, "max_connections")?,
            max_per_peer: count(
                self.max_connections_per_peer,
                d.max_per_peer,
                "max_connections_per_peer",
            )?,
            auth_timeout: secs(self.auth_timeout_s, d.auth_timeout, "auth_timeout_s")?,
            request_timeout: secs(
                self.request_timeout_s,
                d.request_timeout,
                "request_timeout_s",
            )?,
            idle_timeout: secs(self.idle_timeout_s, d.idle_timeout, "idle_timeout_s")?,
        })
    }
}

/// `[reactors]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReactorsSection {
    /// Core list such as "0-1" or "0,2"; default: every core available.
    pub cores: Option<String>,
    /// busy, adaptive (default) or interrupt.
    pub idle: Option<String>,
}

/// `[nvmf]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvmfSection {
    /// Listeners serving only discovery, e.g. ["0.0.0.0:8009"].
    #[serde(default)]
    pub discovery_listeners: Vec<String>,
    /// I/O queue depth.
    pub queue_depth: Option<u16>,
    /// Largest transfer per command, KiB (power of two).
    pub max_io_kib: Option<u32>,
    /// In-capsule data size on I/O queues, bytes.
    pub in_capsule_bytes: Option<u32>,
    /// Largest H2CData PDU payload, KiB.
    pub max_h2c_data_kib: Option<u32>,
    /// I/O queues per controller.
    pub max_io_queues: Option<u16>,
    /// Connections across the target that have completed Connect.
    pub max_connections: Option<usize>,
    /// Discovery controllers across the target (apart from `max_connections`).
    pub max_discovery_connections: Option<usize>,
    /// Connections of a listener that have not completed Connect yet.
    pub max_pending_connections: Option<usize>,
    /// Of those, from one source address.
    pub max_pending_per_address: Option<usize>,
    /// Seconds a new connection has to send its ICReq.
    pub icreq_timeout_s: Option<u64>,
    /// Seconds from ICReq to a successful Connect.
    pub connect_timeout_s: Option<u64>,
    /// Socket I/O: "uring" (default) or "poll" (requires reactors.idle = "busy").
    pub socket_io: Option<String>,
    /// Which reads end with their data PDU alone: "flow-control-off" (default: on queues
    /// whose host turned SQ flow control off) or "always" (as SPDK's target does).
    pub c2h_success: Option<String>,
    /// Where the SMART / Health figures are kept across restarts; defaults to
    /// `health.json` in `[ox] state_dir`. Without either they start at zero each run.
    pub health_file: Option<PathBuf>,
}

/// `[[bdev]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BdevSection {
    /// Unique name.
    pub name: String,
    /// malloc, null or uring.
    pub kind: String,
    /// Size in MiB (malloc, null; uring when creating a file).
    pub size_mib: Option<u64>,
    /// 512 or 4096.
    pub block_size: Option<u32>,
    /// uring: file or block device.
    pub path: Option<PathBuf>,
    /// uring: O_DIRECT (default true).
    pub direct: Option<bool>,
    /// Stable UUID (namespace identifiers derive from it); random if absent.
    pub uuid: Option<Uuid>,
}

/// `[[subsystem]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubsystemSection {
    /// NQN.
    pub nqn: String,
    /// Serial number.
    pub serial: Option<String>,
    /// Model number.
    pub model: Option<String>,
    /// Allow every host (default false: only `hosts`).
    #[serde(default)]
    pub allow_any_host: bool,
    /// Allowed host NQNs.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// "address:port" listeners; IPv6 as "[::1]:4420".
    pub listeners: Vec<String>,
    /// Namespaces: bdev names, namespace IDs 1, 2, ... in order.
    #[serde(default)]
    pub namespaces: Vec<String>,
}

impl Config {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading configuration {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing configuration {}", path.display()))
    }

    /// Reactor configuration.
    pub fn reactor_config(&self) -> anyhow::Result<ReactorConfig> {
        let cores = match &self.reactors.cores {
            Some(c) => CoreList::parse(c).context("reactors.cores")?,
            None => CoreList::all_available()?,
        };
        let idle: IdlePolicy = match &self.reactors.idle {
            Some(i) => i.parse().context("reactors.idle")?,
            None => IdlePolicy::Adaptive,
        };
        Ok(ReactorConfig::new(cores).with_idle(idle))
    }

    /// Opens every bdev.
    pub fn open_bdevs(&self) -> anyhow::Result<Vec<Bdev>> {
        let mut names = HashSet::new();
        let mut out = Vec::new();
        for b in &self.bdevs {
            if !names.insert(b.name.as_str()) {
                bail!("bdev.name: {:?} is defined twice", b.name);
            }
            let bs = b.block_size.unwrap_or(512);
            let size = |key: &str| -> anyhow::Result<u64> {
                let mib = b
                    .size_mib
                    .with_context(|| format!("bdev {:?}: {key} is required", b.name))?;
                Ok((mib << 20) / u64::from(bs))
            };
            let dev = match b.kind.as_str() {
                "malloc" => create_malloc(&b.name, bs, size("size_mib")?, b.uuid),
                "null" => create_null(&b.name, bs, size("size_mib")?, b.uuid),
                "uring" => {
                    let path = b
                        .path
                        .clone()
                        .with_context(|| format!("bdev {:?}: path is required", b.name))?;
                    let mut c = UringConfig::new(&b.name, path);
                    c.block_size = b.block_size;
                    c.direct = b.direct.unwrap_or(true);
                    c.create_size = b.size_mib.map(|m| m << 20);
                    c.uuid = b.uuid;
                    open_uring(&c)
                }
                other => bail!(
                    "bdev {:?}: kind {other:?} is not one of malloc, null, uring",
                    b.name
                ),
            }
            .with_context(|| format!("bdev {:?}", b.name))?;
            out.push(dev);
        }
        Ok(out)
    }

    /// Every `[[host]]`'s secrets, read from their files and checked.
    pub fn host_keys(&self) -> anyhow::Result<Vec<HostKeys>> {
        let mut out: Vec<HostKeys> = Vec::new();
        for h in &self.hosts {
            let what = || format!("host {:?}", h.nqn);
            nvmf::check_nqn(&h.nqn).with_context(what)?;
            if out.iter().any(|k| k.hostnqn == h.nqn) {
                bail!("host.nqn: {:?} is defined twice", h.nqn);
            }
            let hash = match h.dhchap_hash.as_deref() {
                None => Hash::Sha256,
                Some(name) => Hash::from_name(name).with_context(|| {
                    format!(
                        "host {:?}: dhchap_hash {name:?} is not one of sha256, sha384, sha512",
                        h.nqn
                    )
                })?,
            };
            let key = read_secret(&h.dhchap_key_file).with_context(what)?;
            let ctrl_key = match &h.dhchap_ctrl_key_file {
                Some(path) => Some(read_secret(path).with_context(what)?),
                None => None,
            };
            let dhgroup = match h.dhchap_dhgroup.as_deref() {
                None => DhGroup::Null,
                Some(name) => DhGroup::from_name(name).with_context(|| {
                    format!(
                        "host {:?}: dhchap_dhgroup {name:?} is not one of null, ffdhe2048, \
                         ffdhe3072, ffdhe4096",
                        h.nqn
                    )
                })?,
            };
            out.push(HostKeys {
                hostnqn: h.nqn.clone(),
                key,
                ctrl_key,
                hash,
                dhgroup,
            });
        }
        Ok(out)
    }

    /// Where the SMART / Health figures are kept, if anywhere.
    pub fn health_path(&self) -> Option<PathBuf> {
        self.nvmf
            .health_file
            .clone()
            .or_else(|| self.ox.as_ref().map(|o| o.state_dir.join("health.json")))
    }

    /// The NVMe/TCP target configuration over `bdevs`; `host_keys` (from
    /// [`Self::host_keys`]) go to the subsystems that let their hosts in.
    pub fn target_config(
        &self,
        bdevs: &[Bdev],
        host_keys: &[HostKeys],
        health: Arc<nvmf::health::Health>,
    ) -> anyhow::Result<TargetConfig> {
        let d = Limits::default();
        let n = &self.nvmf;
        let limits = Limits {
            queue_depth: n.queue_depth.unwrap_or(d.queue_depth),
            admin_queue_depth: d.admin_queue_depth,
            max_io_size: n
                .max_io_kib
                .map_or(d.max_io_size, |k| k.saturating_mul(1024)),
            in_capsule: n.in_capsule_bytes.unwrap_or(d.in_capsule),
            max_h2c_data: n
                .max_h2c_data_kib
                .map_or(d.max_h2c_data, |k| k.saturating_mul(1024)),
            max_io_queues: n.max_io_queues.unwrap_or(d.max_io_queues),
            max_connections: n.max_connections.unwrap_or(d.max_connections),
            max_discovery_connections: n
                .max_discovery_connections
                .unwrap_or(d.max_discovery_connections),
            max_pending_connections: n
                .max_pending_connections
                .unwrap_or(d.max_pending_connections),
            max_pending_per_address: n
                .max_pending_per_address
                .unwrap_or(d.max_pending_per_address),
            icreq_timeout: n
                .icreq_timeout_s
                .map_or(d.icreq_timeout, std::time::Duration::from_secs),
            connect_timeout: n
                .connect_timeout_s
                .map_or(d.connect_timeout, std::time::Duration::from_secs),
            auth_timeout: d.auth_timeout,
            c2h_success: match n.c2h_success.as_deref() {
                None | Some("flow-control-off") => nvmf::C2hSuccess::FlowControlOff,
                Some("always") => nvmf::C2hSuccess::Always,
                Some(other) => {
                    bail!("nvmf.c2h_success: {other:?} is not \"flow-control-off\" or \"always\"")
                }
            },
        };
        let mut subsystems = Vec::new();
        for (i, s) in self.subsystems.iter().enumerate() {
            let listeners = s
                .listeners
                .iter()
                .map(|l| parse_addr(l).with_context(|| format!("subsystem {}: listeners", s.nqn)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let namespaces = s
                .namespaces
                .iter()
                .enumerate()
                .map(|(j, name)| {
                    let bdev = bdevs.iter().find(|b| b.name() == name).with_context(|| {
                        format!("subsystem {}: namespaces: no bdev named {name:?}", s.nqn)
                    })?;
                    Ok(Namespace::new(j as u32 + 1, bdev.clone()))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            if s.allow_any_host && !s.hosts.is_empty() {
                bail!(
                    "subsystem {}: allow_any_host and hosts are mutually exclusive",
                    s.nqn
                );
            }
            let hosts = host_policy(s.allow_any_host, &s.hosts);
            warn_if_open(&s.nqn, &hosts, host_keys);
            subsystems.push(Subsystem {
                nqn: s.nqn.clone(),
                serial: s
                    .serial
                    .clone()
                    .unwrap_or_else(|| format!("OX{:06}", i + 1)),
                model: s.model.clone().unwrap_or_else(|| "OX appliance".into()),
                host_keys: keys_for(&hosts, host_keys),
                hosts,
                namespaces,
                listeners,
            });
        }
        let discovery_listeners = n
            .discovery_listeners
            .iter()
            .map(|l| parse_addr(l).context("nvmf.discovery_listeners"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let socket_io = match n.socket_io.as_deref() {
            None | Some("uring") => SocketIo::Uring,
            Some("poll") => {
                if self.reactors.idle.as_deref() != Some("busy") {
                    bail!(
                        "nvmf.socket_io = \"poll\" needs reactors.idle = \"busy\" (a parked reactor does not see sockets)"
                    );
                }
                SocketIo::Poll
            }
            Some(other) => bail!("nvmf.socket_io: {other:?} is not \"uring\" or \"poll\""),
        };
        let config = TargetConfig {
            subsystems,
            discovery_listeners,
            limits,
            socket_io,
            health,
        };
        config.validate()?;
        Ok(config)
    }
}

pub fn parse_addr(text: &str) -> anyhow::Result<SocketAddr> {
    text.parse()
        .with_context(|| format!("{text:?} is not an address:port (IPv6 as [addr]:port)"))
}

impl Config {
    /// The object-exchange settings, if `[ox]` is present: stores and keys resolved
    /// (credentials and key material read now, so a missing one fails the start with
    /// its name), and the OX core list.
    pub fn ox_settings(
        &self,
        host_keys: &[HostKeys],
    ) -> anyhow::Result<Option<(Settings, Vec<Option<usize>>)>> {
        let Some(ox) = &self.ox else {
            if !self.stores.is_empty()
                || !self.keys.is_empty()
                || !self.volumes.is_empty()
                || !self.clones.is_empty()
            {
                bail!(
                    "[[store]], [[key]], [[volume]] and [[clone]] need an [ox] section (state_dir)"
                );
            }
            return Ok(None);
        };
        let mut stores = HashMap::new();
        for s in &self.stores {
            crate::service::check_name(&s.name).context("store.name")?;
            let spec = store_spec(s).with_context(|| format!("store {:?}", s.name))?;
            if stores.insert(s.name.clone(), spec).is_some() {
                bail!("store.name: {:?} is defined twice", s.name);
            }
        }
        let mut keys: Vec<Kek> = Vec::new();
        for k in &self.keys {
            let source = match (&k.file, &k.env, &k.command) {
                (Some(f), None, None) => KekSource::File(f.clone()),
                (None, Some(e), None) => KekSource::Env(e.clone()),
                (None, None, Some(c)) => KekSource::Command(c.clone()),
                _ => bail!("key {:?}: give exactly one of file, env, command", k.name),
            };
            if keys.iter().any(|x| x.id == k.name) {
                bail!("key.name: {:?} is defined twice", k.name);
            }
            // The error names the key already.
            keys.push(Kek::load(&k.name, &source)?);
        }
        let mib = |v: Option<u64>| Limit::per_second(v.unwrap_or(0) << 20);
        let limit = |v: Option<u64>| {
            if v.unwrap_or(0) == 0 {
                Limit::NONE
            } else {
                mib(v)
            }
        };
        let export_listeners = ox
            .export_listeners
            .iter()
            .map(|l| parse_addr(l).context("ox.export_listeners"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // Exactly what the snapshot format reads back (ox::codec::CHUNK_SIZES).
        let chunk_bytes = ox.chunk_kib.unwrap_or(64).saturating_mul(1024);
        let readable = ox::codec::CHUNK_SIZES;
        if !readable.contains(&(chunk_bytes as usize)) || !chunk_bytes.is_power_of_two() {
            bail!(
                "ox.chunk_kib = {} must be a power of two from {} to {}",
                ox.chunk_kib.unwrap_or(64),
                readable.start() >> 10,
                readable.end() >> 10
            );
        }
        let zstd_level = ox.zstd_level.unwrap_or(3);
        let levels = ox::codec::ZSTD_LEVELS;
        if !levels.contains(&zstd_level) {
            bail!(
                "ox.zstd_level = {zstd_level} must be from 0 (no compression) to {}",
                levels.end()
            );
        }
        let object_mib = ox.object_mib.unwrap_or(8);
        if !(1..=1024).contains(&object_mib) {
            bail!("ox.object_mib = {object_mib} must be from 1 to 1024");
        }
        let cores = match &ox.cores {
            None => vec![None],
            Some(list) => CoreList::parse(list)
                .context("ox.cores")?
                .cores()
                .iter()
                .map(|&c| Some(c))
                .collect(),
        };
        let settings = Settings {
            state_dir: ox.state_dir.clone(),
            stores,
            keys,
            throttle: Throttle::new(limit(ox.foreground_mib_s), limit(ox.background_mib_s)),
            export_listeners,
            zstd_level,
            object_bytes: object_mib << 20,
            chunk_bytes,
            verify_before_publish: self
                .stores
                .iter()
                .filter(|s| s.verify_before_publish)
                .map(|s| s.name.clone())
                .collect(),
            host_keys: std::sync::RwLock::new(host_keys.to_vec()),
        };
        Ok(Some((settings, cores)))
    }
}

/// Who may connect: any host, or those listed.
pub fn host_policy(allow_any_host: bool, hosts: &[String]) -> HostPolicy {
    if allow_any_host {
        HostPolicy::Any
    } else {
        HostPolicy::Only(hosts.to_vec())
    }
}

/// The secrets of the hosts `policy` lets in: those hosts must authenticate.
pub fn keys_for(policy: &HostPolicy, keys: &[HostKeys]) -> Vec<HostKeys> {
    keys.iter()
        .filter(|k| policy.allows(&k.hostnqn))
        .cloned()
        .collect()
}

/// Warns when subsystem `nqn` lets any host in while hosts have secrets: anyone can
/// connect under a name that has none, so the secrets do not protect it.
pub fn warn_if_open(nqn: &str, policy: &HostPolicy, keys: &[HostKeys]) {
    if *policy == HostPolicy::Any && !keys.is_empty() {
        tracing::warn!(
            subsystem = nqn,
            "lets any host in: hosts with [[host]] secrets must authenticate, but any \
             other host name connects without one (list the hosts to protect it)"
        );
    }
}

/// Reads a DH-HMAC-CHAP secret from `path`, a secret file ([`ox::secret_file`]).
fn read_secret(path: &Path) -> anyhow::Result<DhchapKey> {
    let text = ox::secret_file::read(path)?;
    DhchapKey::parse(&text).with_context(|| format!("secret {}", path.display()))
}

fn store_spec(s: &StoreSection) -> anyhow::Result<StoreSpec> {
    let need = |v: &Option<String>, key: &str| -> anyhow::Result<String> {
        v.clone()
            .with_context(|| format!("{key} is required for kind = \"s3\""))
    };
    match s.kind.as_str() {
        "local" => {
            let path = s
                .path
                .clone()
                .context("path is required for kind = \"local\"")?;
            // Missing is fine (the store makes it); anything but a directory is not.
            match std::fs::metadata(&path) {
                Ok(m) if !m.is_dir() => {
                    bail!("path {} is not a directory", path.display())
                }
                _ => Ok(StoreSpec::Local(path)),
            }
        }
        "s3" => {
            let endpoint: url::Url = need(&s.endpoint, "endpoint")?
                .parse()
                .context("endpoint is not a URL")?;
            let bucket = need(&s.bucket, "bucket")?;
            let mode = s.credentials.as_deref().unwrap_or("chain");
            if !["chain", "env", "file", "process", "static"].contains(&mode) {
                bail!("credentials {mode:?} is not chain, env, file, process or static");
            }
            // A setting the chosen source does not read is a mistake to say, not to
            // pass over: the chain would sign with whatever it finds instead.
            for (field, given, read_by) in [
                ("access_key", s.access_key.is_some(), &["static"][..]),
                ("secret_key_file", s.secret_key_file.is_some(), &["static"]),
                (
                    "credential_process",
                    s.credential_process.is_some(),
                    &["process"],
                ),
                ("profile", s.profile.is_some(), &["chain", "file"]),
            ] {
                if given && !read_by.contains(&mode) {
                    bail!(
                        "{field} is set but credentials = {mode:?} does not read it \
                         (credentials = {:?} does)",
                        read_by[0]
                    );
                }
            }
            let credentials = match mode {
                "chain" => {
                    let env = ox::store::credential_chain::process_env;
                    let (source, at) =
                        ox::store::credential_chain::resolve(s.profile.as_deref(), env)
                            .context("credentials")?;
                    tracing::info!(store = %s.name, "credentials from {at}");
                    source
                }
                "env" => CredentialSource::Environment,
                "file" => CredentialSource::SharedFile {
                    profile: s.profile.clone().unwrap_or_else(|| "default".into()),
                },
                "static" => {
                    let file = s
                        .secret_key_file
                        .as_ref()
                        .context("credentials = \"static\" needs secret_key_file")?;
                    let secret = ox::secret_file::read(file)
                        .context("secret_key_file")?
                        .trim()
                        .to_string();
                    CredentialSource::Static {
                        access_key: need(&s.access_key, "access_key")?,
                        secret_key: secret,
                    }
                }
                "process" => match &s.credential_process {
                    Some(command) if !command.is_empty() => CredentialSource::Process {
                        command: command.clone(),
                    },
                    _ => bail!(
                        "credentials = \"process\" needs credential_process = [\"program\", \"args\"...]"
                    ),
                },
                other => {
                    bail!("credentials {other:?} is not chain, env, file, process or static")
                }
            };
            // Resolve now: missing credentials fail the start, naming the store (a
            // command is run once here, and its answer kept for the first requests).
            match &credentials {
                CredentialSource::Process { command } => {
                    ox::store::credential_process::prime(command).context("credentials")?
                }
                other => drop(ox::store::s3::resolve_credentials(other).context("credentials")?),
            }
            let mut c = S3Config::new(
                endpoint,
                &bucket,
                s.region.as_deref().unwrap_or("us-east-1"),
                credentials,
            );
            c.allow_http = s.allow_http;
            c.path_style = match s.addressing.as_deref() {
                None | Some("path") => true,
                Some("virtual") => false,
                Some(other) => bail!("addressing {other:?} is not \"path\" or \"virtual\""),
            };
            c.signing = match s.signing.as_deref() {
                None | Some("headers") => ox::store::s3::Signing::Headers,
                Some("query") => ox::store::s3::Signing::Query,
                Some(other) => bail!("signing {other:?} is not \"headers\" or \"query\""),
            };
            if let Some(addr) = &s.connect_to {
                c.connect_to = Some(
                    addr.parse()
                        .with_context(|| format!("connect_to {addr:?} is not IP:PORT"))?,
                );
            }
            if let Some(ca) = &s.ca_file {
                c.trust = Trust::CaBundle(ca.clone());
            }
            c.content_md5 = match s.content_md5 {
                None => ox::store::s3::ContentMd5::Auto,
                Some(true) => ox::store::s3::ContentMd5::Always,
                Some(false) => ox::store::s3::ContentMd5::Never,
            };
            if c.endpoint.scheme() == "http" && !c.allow_http {
                bail!("endpoint is plain http: set allow_http = true to allow it");
            }
            Ok(StoreSpec::S3(Box::new(c)))
        }
        other => bail!("kind {other:?} is not \"s3\" or \"local\""),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The S3 settings a `[[store]]` of `endpoint` with `extra` lines makes.
    fn s3_settings(endpoint: &str, extra: &str) -> ox::store::s3::S3Config {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = format!(
            "name = \"s\"\nkind = \"s3\"\nendpoint = \"{endpoint}\"\nbucket = \"b\"\n\
             credentials = \"static\"\naccess_key = \"a\"\nsecret_key_file = {secret:?}\n\
             allow_http = true\n{extra}"
        );
        match store_spec(&toml::from_str(&text).unwrap()).unwrap() {
            StoreSpec::S3(c) => *c,
            StoreSpec::Local(_) => unreachable!("an s3 store"),
        }
    }

    #[test]
    fn content_md5_is_learnt_from_the_store_unless_told() {
        use ox::store::s3::ContentMd5;
        let md5 = |extra| s3_settings("https://s3.example", extra).content_md5;
        assert_eq!(md5(""), ContentMd5::Auto);
        assert_eq!(md5("content_md5 = true"), ContentMd5::Always);
        assert_eq!(md5("content_md5 = false"), ContentMd5::Never);
    }
}
