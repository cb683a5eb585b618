//! The data structures the target returns: Identify pages, log pages and the
//! discovery log. Offsets follow NVMe Base 2.0 (and Linux's `struct nvme_id_ctrl`).

use std::net::SocketAddr;

use crate::health::Health;
use crate::le::{put_ascii, put_str0, put_u16, put_u32, put_u64};
use crate::subsystem::{DISCOVERY_NQN, Limits, Namespace, Subsystem};

/// NVMe version the controller reports: 2.0. What that version makes mandatory for an
/// NVM subsystem's I/O controller over a fabric is implemented (Identify CNS 00h–03h,
/// 05h, 06h and 08h; the Supported Log Pages, Error, SMART / Health, Firmware Slot,
/// Changed Namespace List and Commands Supported and Effects logs; keep alive;
/// asynchronous events), and 2.0's readings of the health fields let a device without a
/// temperature sensor say so (1.2–1.4 required non-zero temperature thresholds).
pub const VERSION: u32 = 0x0002_0000;
/// Firmware revision reported in Identify Controller.
pub const FIRMWARE: &str = concat!("ox", env!("CARGO_PKG_VERSION"));
/// Keep-alive granularity (KAS), in units of 100 ms.
pub const KAS: u16 = 10;
/// Asynchronous event requests a controller holds (AERL + 1).
pub const AER_LIMIT: usize = 4;

/// Controller type, as Identify reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtrlKind {
    /// An I/O controller of an NVM subsystem.
    Io,
    /// A discovery controller.
    Discovery,
}

/// Identify Controller (CNS 01h).
pub fn controller(
    kind: CtrlKind,
    subsystem: Option<&Subsystem>,
    cntlid: u16,
    limits: &Limits,
) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    let (serial, model, nqn) = match subsystem {
        Some(s) => (s.serial.as_str(), s.model.as_str(), s.nqn.as_str()),
        None => ("OX-DISCOVERY", "OX appliance discovery", DISCOVERY_NQN),
    };
    put_ascii(&mut b, 4, 20, serial);
    put_ascii(&mut b, 24, 40, model);
    put_ascii(&mut b, 64, 8, FIRMWARE);
    b[72] = 6; // RAB
    b[76] = 0x02; // CMIC: may have more than one controller
    b[77] = limits.max_io_size.trailing_zeros().saturating_sub(12) as u8; // MDTS in 4 KiB units
    put_u16(&mut b, 78, cntlid);
    put_u32(&mut b, 80, VERSION);
    // OAES: namespace attribute notices (I/O), discovery log change notices (discovery).
    put_u32(
        &mut b,
        92,
        if kind == CtrlKind::Io {
            1 << 8
        } else {
            1 << 31
        },
    );
    put_u32(&mut b, 96, 1); // CTRATT: 128-bit host identifier
    b[111] = if kind == CtrlKind::Io { 1 } else { 2 }; // CNTRLTYPE
    b[258] = 3; // ACL (0-based)
    b[259] = (AER_LIMIT - 1) as u8; // AERL (0-based)
    b[260] = 0x03; // FRMW: one slot, read-only
    // LPA: extended data for Get Log Page; an I/O controller also keeps the SMART /
    // Health log per namespace and the Commands Supported and Effects log (a discovery
    // controller has neither, and a host reads the effects log if this says it may).
    b[261] = if kind == CtrlKind::Io {
        0x01 | 0x02 | 0x04
    } else {
        0x04
    };
    // WCTEMP and CCTEMP stay 0: no temperature thresholds (no sensor).
    put_u16(&mut b, 320, KAS);
    b[512] = 0x66; // SQES
    b[513] = 0x44; // CQES
    put_u16(&mut b, 514, limits.queue_depth); // MAXCMD
    if let Some(s) = subsystem {
        put_u32(&mut b, 516, s.max_nsid()); // NN
        put_u16(&mut b, 520, 0x0D); // ONCS: compare, DSM, write zeroes
        b[525] = 0x05; // VWC present; flush to all namespaces not supported
        put_u32(&mut b, 540, s.max_nsid()); // MNAN
    }
    put_u32(&mut b, 536, 1 | (1 << 20)); // SGLS: SGLs, offsets in data block descriptors
    put_str0(&mut b, 768, 256, nqn);
    let in_capsule = if kind == CtrlKind::Io {
        limits.in_capsule
    } else {
        crate::subsystem::ADMIN_IN_CAPSULE
    };
    put_u32(&mut b, 1792, (in_capsule + 64) / 16); // IOCCSZ
    put_u32(&mut b, 1796, 1); // IORCSZ
    put_u16(&mut b, 1800, 0); // ICDOFF
    b[1802] = 0; // FCATT: dynamic controller model
    b[1803] = 1; // MSDBD
    put_u16(&mut b, 2048, 0); // power state 0: max power unspecified
    b
}

/// LBA data size shift for a block size.
fn lbads(block_size: u32) -> u8 {
    block_size.trailing_zeros() as u8
}

/// Identify Namespace (CNS 00h) for an active namespace.
pub fn namespace(ns: &Namespace) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    let blocks = ns.bdev.num_blocks();
    put_u64(&mut b, 0, blocks); // NSZE
    put_u64(&mut b, 8, blocks); // NCAP
    // NUSE: blocks that hold data (a thin volume or clone holds fewer than NSZE).
    put_u64(&mut b, 16, ns.bdev.allocated_blocks());
    b[24] = 0x00; // NSFEAT
    b[25] = 0; // NLBAF (0-based: one format)
    b[26] = 0; // FLBAS: format 0
    b[30] = 0x01; // NMIC: may be attached to several controllers
    // DLFEAT: deallocated blocks read as zeroes; Write Zeroes may deallocate.
    b[33] = if ns.bdev.supports(bdev::IoType::Unmap) {
        0x09
    } else {
        0
    };
    b[104..120].copy_from_slice(&ns.nguid());
    b[120..128].copy_from_slice(&ns.eui64());
    put_u32(&mut b, 128, u32::from(lbads(ns.bdev.block_size())) << 16); // LBAF0
    b
}

/// I/O Command Set Independent Identify Namespace (CNS 08h).
pub fn namespace_independent(ns: Option<&Namespace>) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    if ns.is_some() {
        b[1] = 0x01; // NMIC
        b[14] = 0x01; // NSTAT: namespace ready
    }
    b
}

/// Active Namespace ID list (CNS 02h): IDs above `after`, ascending, up to 1024.
pub fn active_namespaces(subsystem: &Subsystem, after: u32) -> Vec<u8> {
    let mut ids: Vec<u32> = subsystem
        .namespaces
        .iter()
        .map(|n| n.nsid)
        .filter(|&id| id > after)
        .collect();
    ids.sort_unstable();
    let mut b = vec![0u8; 4096];
    for (i, id) in ids.into_iter().take(1024).enumerate() {
        put_u32(&mut b, i * 4, id);
    }
    b
}

/// Namespace Identification Descriptor list (CNS 03h): EUI-64, NGUID, UUID, CSI.
pub fn descriptors(ns: &Namespace) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    let mut at = 0;
    let mut push = |b: &mut Vec<u8>, nidt: u8, id: &[u8]| {
        b[at] = nidt;
        b[at + 1] = id.len() as u8;
        b[at + 4..at + 4 + id.len()].copy_from_slice(id);
        at += 4 + id.len();
    };
    push(&mut b, 1, &ns.eui64());
    push(&mut b, 2, &ns.nguid());
    push(&mut b, 3, ns.uuid.as_bytes());
    push(&mut b, 4, &[0]); // CSI: NVM
    b
}

/// SMART / Health Information log (02h): the lifetime I/O totals of `namespaces`
/// (one, or all of the controller's) and the appliance's power figures.
///
/// Nothing is invented: there is no temperature sensor, so the composite temperature
/// is 0 K ("not reported", as Linux's nvmet target and monitoring tools read it) and
/// no thresholds are advertised (WCTEMP and CCTEMP are 0); there is no spare media, so
/// available spare and its threshold are 0 — which sets no critical warning, as that
/// needs the spare to fall *below* the threshold. Percentage used, busy time, media
/// errors and error log entries are truly 0.
pub fn smart_log(health: &Health, namespaces: &[&Namespace]) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    let (mut read, mut written, mut reads, mut writes) = (0u128, 0u128, 0u128, 0u128);
    let mut counted: Vec<&str> = Vec::new();
    for ns in namespaces {
        // A device behind two namespaces is one device: count it once.
        if counted.contains(&ns.bdev.name()) {
            continue;
        }
        counted.push(ns.bdev.name());
        let t = health.totals(ns.bdev.name());
        read += u128::from(t.read_bytes);
        written += u128::from(t.write_bytes);
        reads += u128::from(t.reads);
        writes += u128::from(t.writes);
    }
    // Data units are thousands of 512-byte units, rounded up.
    let units = |bytes: u128| (bytes / 512).div_ceil(1000);
    b[32..48].copy_from_slice(&units(read).to_le_bytes());
    b[48..64].copy_from_slice(&units(written).to_le_bytes());
    b[64..80].copy_from_slice(&reads.to_le_bytes());
    b[80..96].copy_from_slice(&writes.to_le_bytes());
    let power = health.power();
    b[112..128].copy_from_slice(&u128::from(power.power_cycles).to_le_bytes());
    b[128..144].copy_from_slice(&u128::from(power.power_on_secs / 3600).to_le_bytes());
    b[144..160].copy_from_slice(&u128::from(power.unsafe_shutdowns).to_le_bytes());
    b
}

/// Log pages a controller of `kind` answers.
pub fn log_pages(kind: CtrlKind) -> &'static [u8] {
    match kind {
        CtrlKind::Io => &[0x00, 0x01, 0x02, 0x03, 0x04, 0x05],
        CtrlKind::Discovery => &[0x00, 0x01, 0x02, 0x03, 0x70],
    }
}

/// Supported Log Pages log (00h): LSUPP for each page answered.
pub fn supported_logs(kind: CtrlKind) -> Vec<u8> {
    let mut b = vec![0u8; 1024];
    for &lid in log_pages(kind) {
        put_u32(&mut b, 4 * usize::from(lid), 1);
    }
    b
}

/// Commands Supported and Effects log (05h): which admin and I/O commands are
/// implemented (CSUPP) and which change logical block content (LBCC), so a host's
/// passthrough knows what to revalidate.
pub fn command_effects() -> Vec<u8> {
    use crate::cmd::{admin, io};
    const CSUPP: u32 = 1;
    const LBCC: u32 = 1 << 1;
    let mut b = vec![0u8; 4096];
    for op in [
        admin::GET_LOG_PAGE,
        admin::IDENTIFY,
        admin::ABORT,
        admin::SET_FEATURES,
        admin::GET_FEATURES,
        admin::ASYNC_EVENT,
        admin::KEEP_ALIVE,
    ] {
        put_u32(&mut b, 4 * usize::from(op), CSUPP);
    }
    for (op, effects) in [
        (io::FLUSH, CSUPP),
        (io::WRITE, CSUPP | LBCC),
        (io::READ, CSUPP),
        (io::COMPARE, CSUPP),
        (io::WRITE_ZEROES, CSUPP | LBCC),
        (io::DSM, CSUPP | LBCC),
    ] {
        put_u32(&mut b, 1024 + 4 * usize::from(op), effects);
    }
    b
}

/// Firmware Slot Information log (03h).
pub fn firmware_log() -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[0] = 1; // active slot 1
    put_ascii(&mut b, 8, 8, FIRMWARE);
    b
}

/// One discovery log entry's worth of facts.
#[derive(Debug, Clone)]
pub struct DiscoveryEntry {
    /// Subsystem NQN.
    pub nqn: String,
    /// Listener address.
    pub addr: SocketAddr,
    /// Port ID (the listener's index).
    pub port_id: u16,
    /// Admin queue depth the host may use.
    pub asqsz: u16,
    /// What it describes.
    pub kind: EntryKind,
}

/// What a discovery log entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// An NVM subsystem (SUBTYPE 2).
    Subsystem,
    /// The discovery subsystem the host is asking (SUBTYPE 3, TP 8013): explicit
    /// persistent connections supported (it sends log change notices), and the same
    /// log from every port.
    CurrentDiscovery,
}

/// TREQ: secure channel not required (no TLS here; DH-HMAC-CHAP authenticates
/// without one); SQ flow control may be disabled.
const TREQ: u8 = 0x02 | 0x04;
/// EFLAGS: duplicate returned information, explicit persistent connections.
const EFLAGS_CURRENT: u16 = 0x01 | 0x02;

/// Discovery log page (70h): header and 1024-byte entries.
pub fn discovery_log(genctr: u64, entries: &[DiscoveryEntry]) -> Vec<u8> {
    let mut b = vec![0u8; 1024 * (1 + entries.len())];
    put_u64(&mut b, 0, genctr);
    put_u64(&mut b, 8, entries.len() as u64);
    put_u16(&mut b, 16, 0); // RECFMT
    for (i, e) in entries.iter().enumerate() {
        let o = 1024 * (i + 1);
        b[o] = 3; // TRTYPE: TCP
        b[o + 1] = if e.addr.is_ipv4() { 1 } else { 2 }; // ADRFAM
        let (subtype, eflags) = match e.kind {
            EntryKind::Subsystem => (2, 0),
            EntryKind::CurrentDiscovery => (3, EFLAGS_CURRENT),
        };
        b[o + 2] = subtype; // SUBTYPE
        b[o + 3] = TREQ;
        put_u16(&mut b, o + 4, e.port_id);
        put_u16(&mut b, o + 6, 0xFFFF); // CNTLID: dynamic
        put_u16(&mut b, o + 8, e.asqsz);
        put_u16(&mut b, o + 10, eflags); // EFLAGS
        put_ascii(&mut b, o + 32, 32, &e.addr.port().to_string());
        put_str0(&mut b, o + 256, 256, &e.nqn);
        put_ascii(&mut b, o + 512, 256, &e.addr.ip().to_string());
        b[o + 768] = 0; // TSAS: TCP security type none
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_entries_carry_address_and_nqn() {
        let log = discovery_log(
            7,
            &[DiscoveryEntry {
                nqn: "nqn.2026-11.io.ox:a".into(),
                addr: "[::1]:4420".parse().unwrap(),
                port_id: 2,
                asqsz: 32,
                kind: EntryKind::Subsystem,
            }],
        );
        assert_eq!(log.len(), 2048);
        assert_eq!(crate::le::u64(&log, 8), 1);
        assert_eq!(log[1024 + 1], 2);
        assert_eq!(
            crate::le::str0(&log, 1024 + 256, 256),
            "nqn.2026-11.io.ox:a"
        );
        assert_eq!(crate::le::str0(&log, 1024 + 32, 32).trim_end(), "4420");
        assert_eq!(crate::le::str0(&log, 1024 + 512, 256).trim_end(), "::1");
    }
}
