//! The daemon's TOML configuration: reactors, block devices, NVMe/TCP subsystems and
//! listeners. Unknown keys are errors, and every check names the key it rejects.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use bdev::{Bdev, UringConfig, create_malloc, create_null, open_uring};
use nvmf::{HostPolicy, Limits, Namespace, SocketIo, Subsystem, TargetConfig};
use reactor::{CoreList, IdlePolicy, ReactorConfig};
use serde::Deserialize;
use uuid::Uuid;

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
}

/// `[control]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSection {
    /// Unix socket for the JSON-RPC control API (mode 0600); none if absent.
    pub socket: Option<PathBuf>,
    /// Hash-chained audit log of every control operation; none if absent.
    pub audit_log: Option<PathBuf>,
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
    /// Connections across the target.
    pub max_connections: Option<usize>,
    /// Socket I/O: "uring" (default) or "poll" (requires reactors.idle = "busy").
    pub socket_io: Option<String>,
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

    /// The NVMe/TCP target configuration over `bdevs`.
    pub fn target_config(&self, bdevs: &[Bdev]) -> anyhow::Result<TargetConfig> {
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
            subsystems.push(Subsystem {
                nqn: s.nqn.clone(),
                serial: s
                    .serial
                    .clone()
                    .unwrap_or_else(|| format!("OX{:06}", i + 1)),
                model: s.model.clone().unwrap_or_else(|| "OX appliance".into()),
                hosts: if s.allow_any_host {
                    HostPolicy::Any
                } else {
                    HostPolicy::Only(s.hosts.clone())
                },
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
        };
        config.validate()?;
        Ok(config)
    }
}

fn parse_addr(text: &str) -> anyhow::Result<SocketAddr> {
    text.parse()
        .with_context(|| format!("{text:?} is not an address:port (IPv6 as [addr]:port)"))
}
