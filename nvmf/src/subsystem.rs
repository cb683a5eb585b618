//! What the target serves: subsystems with their namespaces, allowed hosts and
//! listeners, and the target-wide limits. Built from configuration and checked by
//! [`TargetConfig::validate`]; subsystems may be added and removed while the target
//! runs (each is immutable once added, so a controller's view never changes under it).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use bdev::Bdev;
use uuid::Uuid;

use crate::dhchap::HostKeys;
use crate::error::NvmfError;

pub use nvmf_wire::DISCOVERY_NQN;

/// Which hosts may connect to a subsystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPolicy {
    /// Any host NQN.
    Any,
    /// Only these host NQNs.
    Only(Vec<String>),
}

impl HostPolicy {
    /// Whether `hostnqn` may connect.
    pub fn allows(&self, hostnqn: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Only(list) => list.iter().any(|h| h == hostnqn),
        }
    }
}

/// A namespace: one bdev under a namespace ID, with stable identifiers.
#[derive(Clone)]
pub struct Namespace {
    /// Namespace ID (1-based).
    pub nsid: u32,
    /// The block device.
    pub bdev: Bdev,
    /// Stable UUID (the bdev's unless configured).
    pub uuid: Uuid,
}

impl Namespace {
    /// A namespace for `bdev` whose identifiers derive from the bdev's UUID.
    pub fn new(nsid: u32, bdev: Bdev) -> Self {
        let uuid = bdev.info().uuid;
        Self { nsid, bdev, uuid }
    }

    /// NGUID: the UUID's 16 bytes.
    pub fn nguid(&self) -> [u8; 16] {
        *self.uuid.as_bytes()
    }

    /// EUI-64: eight bytes derived from the UUID (its two halves folded together).
    pub fn eui64(&self) -> [u8; 8] {
        let b = self.uuid.as_bytes();
        let mut e = [0u8; 8];
        for i in 0..8 {
            e[i] = b[i] ^ b[i + 8];
        }
        e
    }
}

/// An NVM subsystem: what a host connects to by NQN.
#[derive(Clone)]
pub struct Subsystem {
    /// NVMe Qualified Name.
    pub nqn: String,
    /// Serial number (up to 20 ASCII characters).
    pub serial: String,
    /// Model number (up to 40 ASCII characters).
    pub model: String,
    /// Allowed hosts.
    pub hosts: HostPolicy,
    /// Namespaces, in any order; IDs unique.
    pub namespaces: Vec<Namespace>,
    /// Addresses this subsystem is reachable on.
    pub listeners: Vec<SocketAddr>,
    /// Hosts that must authenticate (DH-HMAC-CHAP) with these secrets; other allowed
    /// hosts connect without.
    pub host_keys: Vec<HostKeys>,
}

impl Subsystem {
    /// Checks the subsystem's names, hosts, listeners and namespaces against `limits`;
    /// every error names what is wrong.
    pub fn validate(&self, limits: &Limits) -> Result<(), NvmfError> {
        let bad = |what: String| Err(NvmfError::Config(what));
        let s = self;
        check_nqn(&s.nqn)?;
        if s.nqn == DISCOVERY_NQN {
            return bad(format!("subsystem NQN {} is reserved", s.nqn));
        }
        if s.serial.is_empty() || s.serial.len() > 20 || !printable(&s.serial) {
            return bad(format!(
                "subsystem {}: serial {:?} must be 1-20 printable ASCII characters",
                s.nqn, s.serial
            ));
        }
        if s.model.is_empty() || s.model.len() > 40 || !printable(&s.model) {
            return bad(format!(
                "subsystem {}: model {:?} must be 1-40 printable ASCII characters",
                s.nqn, s.model
            ));
        }
        if let HostPolicy::Only(hosts) = &s.hosts {
            for h in hosts {
                check_nqn(h)?;
            }
        }
        let mut keyed = HashSet::new();
        for k in &s.host_keys {
            check_nqn(&k.hostnqn)?;
            if !s.hosts.allows(&k.hostnqn) {
                return bad(format!(
                    "subsystem {}: host {} has a secret but is not allowed",
                    s.nqn, k.hostnqn
                ));
            }
            if !keyed.insert(&k.hostnqn) {
                return bad(format!(
                    "subsystem {}: host {} has two secrets",
                    s.nqn, k.hostnqn
                ));
            }
        }
        if s.listeners.is_empty() {
            return bad(format!("subsystem {} has no listener", s.nqn));
        }
        let mut ids = HashSet::new();
        for ns in &s.namespaces {
            if ns.nsid == 0 || ns.nsid == u32::MAX {
                return bad(format!(
                    "subsystem {}: invalid namespace ID {}",
                    s.nqn, ns.nsid
                ));
            }
            if !ids.insert(ns.nsid) {
                return bad(format!(
                    "subsystem {}: namespace ID {} used twice",
                    s.nqn, ns.nsid
                ));
            }
            if ns.bdev.block_size() as u64 > u64::from(limits.max_io_size) {
                return bad(format!(
                    "subsystem {}: block size of {} exceeds the max I/O size",
                    s.nqn,
                    ns.bdev.name()
                ));
            }
        }
        Ok(())
    }

    /// The namespace with ID `nsid`.
    pub fn namespace(&self, nsid: u32) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.nsid == nsid)
    }

    /// Highest namespace ID (the controller's NN).
    pub fn max_nsid(&self) -> u32 {
        self.namespaces.iter().map(|n| n.nsid).max().unwrap_or(0)
    }
}

/// Target-wide limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// I/O queue depth (entries); hosts asking for more are refused at Connect.
    pub queue_depth: u16,
    /// Admin queue depth.
    pub admin_queue_depth: u16,
    /// Largest data transfer of one command in bytes (MDTS), a power of two ≥ 4 KiB.
    pub max_io_size: u32,
    /// In-capsule data accepted on I/O queues, bytes.
    pub in_capsule: u32,
    /// Largest H2CData PDU payload (MAXH2CDATA).
    pub max_h2c_data: u32,
    /// I/O queues per controller.
    pub max_io_queues: u16,
    /// Connections across the whole target that have completed Connect (queues of
    /// controllers); one more gets "controller busy".
    pub max_connections: usize,
    /// Discovery controllers across the target (counted apart from `max_connections`,
    /// so idle ones cannot lock out I/O hosts); one more gets "controller busy".
    pub max_discovery_connections: usize,
    /// Connections of one listener that have not completed Connect yet; more are
    /// closed as they are accepted.
    pub max_pending_connections: usize,
    /// Of those, from one source address (a host opens all its queues before it
    /// connects them: at least `max_io_queues` + 1).
    pub max_pending_per_address: usize,
    /// Time from accepting a connection to its ICReq; then it is closed.
    pub icreq_timeout: std::time::Duration,
    /// Time from ICReq to a successful Connect; then it is closed.
    pub connect_timeout: std::time::Duration,
    /// Time a queue that must authenticate has, from its Connect, before it is closed.
    pub auth_timeout: std::time::Duration,
    /// Which successful reads end with their data PDU alone.
    pub c2h_success: C2hSuccess,
}

/// When a successful read ends with its C2HData PDU alone (its SUCCESS flag set),
/// saving the CapsuleResp PDU that would follow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum C2hSuccess {
    /// Only on queues whose host turned SQ flow control off at Connect, as the NVMe/TCP
    /// transport specification allows and Linux's nvmet does: the CapsuleResp left out
    /// is what carries the SQ head pointer such a host has said it does not need.
    #[default]
    FlowControlOff,
    /// On every queue, as SPDK's target does by default (its `c2h_success`). Hosts
    /// then get no SQ head pointer for those reads: fine for hosts that never use it to
    /// pace submissions (Linux's nvme-tcp and SPDK's initiator size their queues by
    /// tags), not for one that does, which would see its queue as full and stall.
    Always,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            queue_depth: 256,
            admin_queue_depth: 32,
            max_io_size: 1 << 20,
            in_capsule: 8192,
            max_h2c_data: 128 << 10,
            // Hosts ask for one per CPU (spdk_nvme_perf -P N for N); as many as SPDK's
            // target allows. The pending per-address limit (128) must stay above it.
            max_io_queues: 127,
            // Two hosts with 127 queues each fit in 256 (a queue costs about 256 KiB
            // of receive buffer while connected): four in 512.
            max_connections: 512,
            max_discovery_connections: 64,
            max_pending_connections: 256,
            max_pending_per_address: 128,
            icreq_timeout: std::time::Duration::from_secs(5),
            connect_timeout: std::time::Duration::from_secs(5),
            auth_timeout: std::time::Duration::from_secs(30),
            c2h_success: C2hSuccess::FlowControlOff,
        }
    }
}

/// How connections move bytes to and from their sockets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SocketIo {
    /// Recv and SendMsg operations on the reactor's io_uring (the default): works with
    /// every idle policy, since a parked reactor wakes on the completion.
    #[default]
    Uring,
    /// Non-blocking recv/sendmsg system calls from a poller on every pass. Only for
    /// `busy` reactors: a parked reactor would not notice socket readiness. Kept to
    /// measure against io_uring (see BENCHMARKS.md).
    Poll,
}

pub use nvmf_wire::ADMIN_IN_CAPSULE;

/// Everything the target serves.
#[derive(Clone, Default)]
pub struct TargetConfig {
    /// Subsystems.
    pub subsystems: Vec<Subsystem>,
    /// Listeners that serve only the discovery subsystem (typically port 8009). Every
    /// subsystem listener also answers discovery.
    pub discovery_listeners: Vec<SocketAddr>,
    /// Limits.
    pub limits: Limits,
    /// Socket I/O mechanism.
    pub socket_io: SocketIo,
    /// Lifetime figures the SMART / Health log reports (fresh by default).
    pub health: Arc<crate::health::Health>,
}

impl TargetConfig {
    /// Checks names, identifiers and limits; every error names what is wrong.
    pub fn validate(&self) -> Result<(), NvmfError> {
        let bad = |what: String| Err(NvmfError::Config(what));
        let l = &self.limits;
        if !(2..=65535).contains(&l.queue_depth) {
            return bad(format!("queue depth {} must be 2..=65535", l.queue_depth));
        }
        if !(2..=4096).contains(&l.admin_queue_depth) {
            return bad(format!(
                "admin queue depth {} must be 2..=4096",
                l.admin_queue_depth
            ));
        }
        if !l.max_io_size.is_power_of_two()
            || l.max_io_size < 4096
            || u64::from(l.max_io_size) > bdev::MAX_IO_BYTES
        {
            return bad(format!(
                "max I/O size {} must be a power of two from 4096 to {}",
                l.max_io_size,
                bdev::MAX_IO_BYTES
            ));
        }
        if !l.in_capsule.is_multiple_of(16) || l.in_capsule > 1 << 20 {
            return bad(format!(
                "in-capsule size {} must be a multiple of 16 up to 1 MiB",
                l.in_capsule
            ));
        }
        if l.max_h2c_data < 4096 || !l.max_h2c_data.is_multiple_of(4) || l.max_h2c_data > 1 << 20 {
            return bad(format!(
                "max H2C data {} must be a multiple of 4 from 4096 to 1 MiB",
                l.max_h2c_data
            ));
        }
        if l.max_io_queues == 0 {
            return bad("at least one I/O queue per controller".into());
        }
        if l.max_connections == 0 {
            return bad("max connections must be at least 1".into());
        }
        if l.max_discovery_connections == 0 {
            return bad("max discovery connections must be at least 1".into());
        }
        if l.max_pending_connections == 0 || l.max_pending_per_address == 0 {
            return bad(
                "max pending connections (in all and per address) must be at least 1".into(),
            );
        }
        if l.max_pending_per_address <= usize::from(l.max_io_queues) {
            return bad(format!(
                "max pending connections per address {} must exceed the I/O queues per controller ({}): a host opens them all before it connects them",
                l.max_pending_per_address, l.max_io_queues
            ));
        }
        if l.icreq_timeout.is_zero() || l.connect_timeout.is_zero() {
            return bad("ICReq and Connect time-outs must be above zero".into());
        }
        let mut nqns = HashSet::new();
        for s in &self.subsystems {
            if !nqns.insert(&s.nqn) {
                return bad(format!("subsystem {} is defined twice", s.nqn));
            }
            s.validate(l)?;
        }
        Ok(())
    }

    /// Every address the target listens on, each once.
    pub fn listen_addresses(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for a in self
            .discovery_listeners
            .iter()
            .chain(self.subsystems.iter().flat_map(|s| s.listeners.iter()))
        {
            if !out.contains(a) {
                out.push(*a);
            }
        }
        out
    }
}

fn printable(s: &str) -> bool {
    s.bytes().all(|c| (0x20..0x7F).contains(&c))
}

/// Checks an NQN: `nqn.` prefix (or the UUID form), at most 223 bytes, printable.
pub fn check_nqn(nqn: &str) -> Result<(), NvmfError> {
    if !nqn.starts_with("nqn.") || nqn.len() > 223 || !printable(nqn) {
        return Err(NvmfError::Config(format!(
            "{nqn:?} is not a valid NQN (\"nqn.\" followed by up to 219 printable characters)"
        )));
    }
    Ok(())
}
