//! The NVMe/TCP target driven by a scripted host over real loopback TCP: data paths
//! (in-capsule, R2T, C2H, flow control off), every I/O command, Connect and property
//! checks, keep-alive, limits, discovery, and hostile input that must end only the
//! offending connection.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::create_malloc;
use nvmf::cmd::{FABRICS, Sqe, Status, admin, io};
use nvmf::pdu::{self, Digests, Fes, IcReq, PduType};
use nvmf::{HostPolicy, Limits, Namespace, SocketIo, Subsystem, Target, TargetConfig, le};
use reactor::{CoreList, IdlePolicy, ReactorConfig, ReactorSet};
use support::{HOSTNQN, Host, pattern, rw};

const NQN: &str = "nqn.2026-11.io.ox:test";
const PRIVATE: &str = "nqn.2026-11.io.ox:private";
const BLOCKS: u64 = 128 * 1024; // 64 MiB of 512-byte blocks
const ALL_DIGESTS: Digests = Digests {
    header: true,
    data: true,
};

struct Setup {
    target: Target,
    addr: SocketAddr,
    set: Option<ReactorSet>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(set) = self.set.take() {
            set.shutdown().unwrap();
        }
    }
}

fn setup(limits: Limits) -> Setup {
    setup_with(limits, SocketIo::Uring, IdlePolicy::Adaptive)
}

fn setup_with(limits: Limits, socket_io: SocketIo, idle: IdlePolicy) -> Setup {
    let set =
        ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap()).with_idle(idle))
            .unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let config = TargetConfig {
        subsystems: vec![
            Subsystem {
                nqn: NQN.into(),
                serial: "OXTEST1".into(),
                model: "OX test".into(),
                hosts: HostPolicy::Any,
                namespaces: vec![
                    Namespace::new(1, create_malloc("m512", 512, BLOCKS, None).unwrap()),
                    Namespace::new(2, create_malloc("m4k", 4096, BLOCKS / 8, None).unwrap()),
                ],
                listeners: vec![any],
                host_keys: Vec::new(),
            },
            Subsystem {
                nqn: PRIVATE.into(),
                serial: "OXTEST2".into(),
                model: "OX test".into(),
                hosts: HostPolicy::Only(vec!["nqn.2026-11.io.ox:someone-else".into()]),
                namespaces: vec![Namespace::new(
                    1,
                    create_malloc("p", 512, 2048, None).unwrap(),
                )],
                listeners: vec![any],
                host_keys: Vec::new(),
            },
        ],
        discovery_listeners: vec![],
        limits,
        socket_io,
        health: Default::default(),
    };
    let target = Target::start(config, set.handles()).unwrap();
    let addr = target.local_addrs()[0];
    Setup {
        target,
        addr,
        set: Some(set),
    }
}

fn both_digests() -> [Digests; 2] {
    [Digests::default(), ALL_DIGESTS]
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn data_round_trips_in_capsule_and_through_r2t() {
    let s = setup(Limits::default());
    for digests in both_digests() {
        let mut a = Host::admin_ready(s.addr, digests, NQN, 2);
        let mut q = Host::io_queue(s.addr, digests, NQN, a.cntlid, 1);
        // 4 KiB fits in the capsule; 300 KiB needs R2T and several H2CData PDUs.
        for (lba, len) in [(0u64, 4096usize), (1000, 300 << 10), (BLOCKS - 8, 4096)] {
            let data = pattern(lba + len as u64, len);
            let w = q.write(1, lba, &data, 512);
            assert_eq!(w.status(), Status::SUCCESS);
            let r = q.read(1, lba, (len / 512) as u32, 512);
            assert_eq!(r.status(), Status::SUCCESS);
            assert!(r.data == data, "data differs at LBA {lba}");
        }
        // 4 KiB-block namespace.
        let data = pattern(9, 16384);
        assert!(q.write(2, 5, &data, 4096).status().is_success());
        assert!(q.read(2, 5, 4, 4096).data == data);
        // Keep alive is accepted.
        assert!(
            a.command(Sqe::new(admin::KEEP_ALIVE, 0), &[], 0)
                .status()
                .is_success()
        );
    }
}

#[test]
fn poll_mode_sockets_carry_the_same_traffic() {
    // Busy reactors on one core, so the test does not starve the machine.
    let s = setup_with(Limits::default(), SocketIo::Poll, IdlePolicy::Busy);
    for digests in both_digests() {
        let a = Host::admin_ready(s.addr, digests, NQN, 1);
        let mut q = Host::io_queue(s.addr, digests, NQN, a.cntlid, 1);
        for (lba, len) in [(0u64, 4096usize), (2000, 600 << 10)] {
            let data = pattern(lba ^ 0x77, len);
            assert!(q.write(1, lba, &data, 512).status().is_success());
            assert!(q.read(1, lba, (len / 512) as u32, 512).data == data);
        }
    }
}

#[test]
fn flush_write_zeroes_deallocate_and_compare() {
    let s = setup(Limits::default());
    let a = Host::admin_ready(s.addr, Digests::default(), NQN, 1);
    let mut q = Host::io_queue(s.addr, Digests::default(), NQN, a.cntlid, 1);
    let data = pattern(3, 8192);
    assert!(q.write(1, 64, &data, 512).status().is_success());

    let mut flush = Sqe::new(io::FLUSH, 0);
    flush.set_nsid(1);
    assert!(q.command(flush, &[], 0).status().is_success());

    // Compare: equal, then different (a media-class miscompare).
    let cmp = rw(io::COMPARE, 1, 64, 16);
    assert!(q.command(cmp, &data, 0).status().is_success());
    let mut other = data.clone();
    other[100] ^= 1;
    assert_eq!(q.command(cmp, &other, 0).status(), Status::COMPARE_FAILURE);

    // Write Zeroes on the first 8 blocks.
    let wz = rw(io::WRITE_ZEROES, 1, 64, 8);
    assert!(q.command(wz, &[], 0).status().is_success());
    let r = q.read(1, 64, 16, 512);
    assert!(r.data[..4096].iter().all(|&b| b == 0));
    assert_eq!(&r.data[4096..], &data[4096..]);

    // Dataset Management, deallocate the other 8 blocks (two ranges).
    let mut dsm = Sqe::new(io::DSM, 0);
    dsm.set_nsid(1);
    dsm.set_cdw(10, 1); // two ranges
    dsm.set_cdw(11, 1 << 2);
    let mut ranges = vec![0u8; 4096];
    le::put_u32(&mut ranges, 4, 4);
    le::put_u64(&mut ranges, 8, 72);
    le::put_u32(&mut ranges, 16 + 4, 4);
    le::put_u64(&mut ranges, 16 + 8, 76);
    assert!(q.command(dsm, &ranges, 0).status().is_success());
    assert!(q.read(1, 64, 16, 512).data.iter().all(|&b| b == 0));
    // A range past the end is refused.
    le::put_u64(&mut ranges, 16 + 8, BLOCKS);
    assert_eq!(
        q.command(dsm, &ranges, 0).status(),
        Status::LBA_OUT_OF_RANGE
    );
}

#[test]
fn bad_commands_get_the_right_status() {
    let s = setup(Limits::default());
    let mut a = Host::admin_ready(s.addr, Digests::default(), NQN, 1);
    let mut q = Host::io_queue(s.addr, Digests::default(), NQN, a.cntlid, 1);
    assert_eq!(
        q.read(1, BLOCKS - 1, 2, 512).status(),
        Status::LBA_OUT_OF_RANGE
    );
    assert_eq!(
        q.read(1, u64::MAX, 1, 512).status(),
        Status::LBA_OUT_OF_RANGE
    );
    assert_eq!(q.read(9, 0, 1, 512).status(), Status::INVALID_NAMESPACE);
    let mut zero_ns = Sqe::new(io::FLUSH, 0);
    zero_ns.set_nsid(0);
    assert_eq!(
        q.command(zero_ns, &[], 0).status(),
        Status::INVALID_NAMESPACE
    );
    assert_eq!(
        q.command(rw(0x7E, 1, 0, 1), &[], 0).status(),
        Status::INVALID_OPCODE
    );
    // Over MDTS (1 MiB): 4096 blocks of 512 = 2 MiB.
    let big = q.command(rw(io::READ, 1, 0, 4096), &[], 2 << 20);
    assert_eq!(big.status(), Status::INVALID_FIELD);
    // SGL length that disagrees with NLB.
    let short = q.command(rw(io::READ, 1, 0, 8), &[], 512);
    assert_eq!(short.status(), Status::SGL_LENGTH_INVALID);
    // Admin: unknown opcode, bad identify CNS, bad log page, namespace identify.
    assert_eq!(
        a.command(Sqe::new(0x7E, 0), &[], 0).status(),
        Status::INVALID_OPCODE
    );
    let mut idf = Sqe::new(admin::IDENTIFY, 0);
    idf.set_cdw(10, 0x55);
    assert_eq!(a.command(idf, &[], 4096).status(), Status::INVALID_FIELD);
    let mut log = Sqe::new(admin::GET_LOG_PAGE, 0);
    log.set_cdw(10, 0x42 | (127 << 16));
    assert_eq!(a.command(log, &[], 512).status(), Status::INVALID_LOG_PAGE);
    // Fabrics commands after Connect on an I/O queue (other than Disconnect).
    let mut pg = Sqe::new(FABRICS, 0);
    pg.0[4] = nvmf::cmd::fctype::PROPERTY_GET;
    assert_eq!(q.command(pg, &[], 0).status(), Status::INVALID_OPCODE);
    // The queue still works.
    assert!(q.read(1, 0, 1, 512).status().is_success());
}

#[test]
fn identify_and_logs_describe_the_subsystem() {
    let s = setup(Limits::default());
    let mut a = Host::admin_ready(s.addr, Digests::default(), NQN, 1);
    let mut idc = Sqe::new(admin::IDENTIFY, 0);
    idc.set_cdw(10, 1);
    let ctrl = a.command(idc, &[], 4096);
    assert!(ctrl.status().is_success());
    assert_eq!(le::u16(&ctrl.data, 78), a.cntlid);
    assert_eq!(le::str0(&ctrl.data, 768, 256), NQN);
    assert_eq!(le::u32(&ctrl.data, 516), 2); // NN
    assert_eq!(ctrl.data[77], 8); // MDTS: 1 MiB in 4 KiB units
    assert_ne!(le::u16(&ctrl.data, 320), 0); // KAS
    assert!(le::u32(&ctrl.data, 1792) >= 4); // IOCCSZ

    let mut list = Sqe::new(admin::IDENTIFY, 0);
    list.set_cdw(10, 2);
    let l = a.command(list, &[], 4096);
    assert_eq!(
        (
            le::u32(&l.data, 0),
            le::u32(&l.data, 4),
            le::u32(&l.data, 8)
        ),
        (1, 2, 0)
    );

    let mut idns = Sqe::new(admin::IDENTIFY, 0);
    idns.set_nsid(2);
    let ns = a.command(idns, &[], 4096);
    assert_eq!(le::u64(&ns.data, 0), BLOCKS / 8);
    assert_eq!((le::u32(&ns.data, 128) >> 16) & 0xFF, 12); // LBADS: 4096

    let mut desc = Sqe::new(admin::IDENTIFY, 0);
    desc.set_nsid(1);
    desc.set_cdw(10, 3);
    let d = a.command(desc, &[], 4096);
    // EUI-64 (8), NGUID (16), UUID (16), CSI (1), in that order with exact lengths.
    assert_eq!((d.data[0], d.data[1]), (1, 8));
    assert_eq!((d.data[12], d.data[13]), (2, 16));
    assert_eq!((d.data[32], d.data[33]), (3, 16));
    assert_eq!((d.data[52], d.data[53]), (4, 1));
    // Stable: asking again gives the same identifiers.
    assert_eq!(a.command(desc, &[], 4096).data, d.data);

    let mut smart = Sqe::new(admin::GET_LOG_PAGE, 0);
    smart.set_cdw(10, 0x02 | (127 << 16));
    let sm = a.command(smart, &[], 512);
    assert!(sm.status().is_success());
    assert_eq!(sm.data.len(), 512);
    // Unaligned log offset.
    smart.set_cdw(12, 2);
    assert_eq!(a.command(smart, &[], 512).status(), Status::INVALID_FIELD);
}

fn smart_log(a: &mut Host, nsid: u32) -> (Status, Vec<u8>) {
    let mut smart = Sqe::new(admin::GET_LOG_PAGE, 0);
    smart.set_cdw(10, 0x02 | (127 << 16));
    smart.set_nsid(nsid);
    let r = a.command(smart, &[], 512);
    (r.status(), r.data)
}

fn u128_at(b: &[u8], at: usize) -> u128 {
    u128::from_le_bytes(b[at..at + 16].try_into().unwrap())
}

#[test]
fn health_is_per_namespace_and_outlives_the_connection_that_wrote() {
    let s = setup(Limits::default());
    let d = Digests::default();
    let a = Host::admin_ready(s.addr, d, NQN, 2);
    let mut q = Host::io_queue(s.addr, d, NQN, a.cntlid, 1);
    // 1 MiB to namespace 1 in 256 writes; 64 KiB to namespace 2 in one; 2 reads of ns 1.
    for i in 0..256u64 {
        assert!(
            q.write(1, i * 8, &pattern(i, 4096), 512)
                .status()
                .is_success()
        );
    }
    assert!(
        q.write(2, 0, &pattern(1, 65536), 4096)
            .status()
            .is_success()
    );
    assert!(q.read(1, 0, 8, 512).status().is_success());
    assert!(q.read(1, 8, 8, 512).status().is_success());
    drop(q);
    drop(a);
    // Another controller, on another connection, reads what the first one did.
    let mut b = Host::admin_ready(s.addr, d, NQN, 2);
    let (st, one) = smart_log(&mut b, 1);
    assert!(st.is_success());
    assert_eq!(
        u128_at(&one, 48),
        3,
        "data units written: 2048 sectors, in thousands, up"
    );
    assert_eq!(u128_at(&one, 80), 256, "host write commands on namespace 1");
    assert_eq!(u128_at(&one, 64), 2, "host read commands on namespace 1");
    let (_, two) = smart_log(&mut b, 2);
    assert_eq!((u128_at(&two, 80), u128_at(&two, 48)), (1, 1));
    let (_, all) = smart_log(&mut b, u32::MAX);
    assert_eq!(
        u128_at(&all, 80),
        257,
        "the controller-wide log sums its namespaces"
    );
    assert_eq!(smart_log(&mut b, 9).0, Status::INVALID_NAMESPACE);
    // Nothing invented: no temperature (0 K), no spare, no warnings; one power cycle.
    assert_eq!(le::u16(&all, 1), 0, "composite temperature not reported");
    assert_eq!((all[0], all[3], all[4]), (0, 0, 0));
    assert_eq!(
        u128_at(&all, 112),
        0,
        "power cycles: no health record given"
    );

    let mut id = Sqe::new(admin::IDENTIFY, 0);
    id.set_cdw(10, 1);
    let c = b.command(id, &[], 4096).data;
    assert_eq!(le::u32(&c, 80), 0x0002_0000, "VER");
    assert_eq!(
        c[261], 0x07,
        "LPA: SMART per namespace, effects log, extended data"
    );
    assert_eq!(
        (le::u16(&c, 266), le::u16(&c, 268)),
        (0, 0),
        "no temperature thresholds"
    );
    let mut logs = Sqe::new(admin::GET_LOG_PAGE, 0);
    logs.set_cdw(10, (1024 / 4 - 1) << 16);
    let l = b.command(logs, &[], 1024).data;
    let listed: Vec<usize> = (0..256).filter(|&i| le::u32(&l, 4 * i) & 1 == 1).collect();
    assert_eq!(listed, [0, 1, 2, 3, 4, 5], "supported log pages");
    let mut effects = Sqe::new(admin::GET_LOG_PAGE, 0);
    effects.set_cdw(10, 0x05 | ((4096 / 4 - 1) << 16));
    let e = b.command(effects, &[], 4096).data;
    assert_eq!(
        le::u32(&e, 4 * 0x06),
        1,
        "Identify: supported, changes nothing"
    );
    assert_eq!(
        le::u32(&e, 1024 + 4),
        0b11,
        "Write: supported, changes content"
    );
    assert_eq!(le::u32(&e, 1024 + 4 * 0x02), 1, "Read: supported");
    assert_eq!(le::u32(&e, 1024 + 4 * 0x0E), 0, "opcode 0Eh: not supported");
}

#[test]
fn identify_namespace_reports_what_a_thin_device_holds() {
    let s = setup(Limits::default());
    let d = Digests::default();
    let mut a = Host::admin_ready(s.addr, d, NQN, 2);
    let mut q = Host::io_queue(s.addr, d, NQN, a.cntlid, 1);
    let nuse = |a: &mut Host| {
        let mut idns = Sqe::new(admin::IDENTIFY, 0);
        idns.set_nsid(1);
        let ns = a.command(idns, &[], 4096).data;
        (le::u64(&ns, 0), le::u64(&ns, 16))
    };
    // Malloc devices hold 2 MiB segments from their first write.
    let (nsze, before) = nuse(&mut a);
    assert_eq!(before, 0, "nothing written, nothing held");
    assert!(q.write(1, 0, &pattern(3, 4096), 512).status().is_success());
    let (_, after) = nuse(&mut a);
    assert_eq!(after, (2 << 20) / 512, "one segment");
    assert!(after < nsze);
}

#[test]
fn connect_checks_name_the_bad_parameter() {
    let s = setup(Limits::default());
    let d = Digests::default();
    let ipo = |c: nvmf::cmd::Cqe| (c.status, c.dw0 & 0xFFFF, c.dw0 >> 16 & 1);

    let mut h = Host::connect(s.addr, d);
    // A command before Connect.
    assert_eq!(
        h.command(Sqe::new(admin::KEEP_ALIVE, 0), &[], 0).status(),
        Status::SEQUENCE_ERROR
    );
    let c = h.fabric_connect(0, 31, "nqn.2026-11.io.ox:nope", HOSTNQN, 0xFFFF, 0, 0);
    assert_eq!(ipo(c), (Status::CONNECT_INVALID_PARAM, 256, 1));
    let c = h.fabric_connect(0, 31, PRIVATE, HOSTNQN, 0xFFFF, 0, 0);
    assert_eq!(c.status, Status::CONNECT_INVALID_HOST);
    let c = h.fabric_connect(0, 4000, NQN, HOSTNQN, 0xFFFF, 0, 0);
    assert_eq!(ipo(c), (Status::CONNECT_INVALID_PARAM, 44, 0));
    let c = h.fabric_connect(0, 31, NQN, "not-an-nqn", 0xFFFF, 0, 0);
    assert_eq!(ipo(c), (Status::CONNECT_INVALID_PARAM, 512, 1));
    let c = h.fabric_connect(3, 31, NQN, HOSTNQN, 0x1234, 0, 0);
    assert_eq!(ipo(c), (Status::CONNECT_INVALID_PARAM, 16, 1));

    let a = Host::admin_ready(s.addr, d, NQN, 2);
    let mut q = Host::connect(s.addr, d);
    let c = q.fabric_connect(3, 31, NQN, HOSTNQN, a.cntlid, 0, 0);
    assert_eq!(
        ipo(c),
        (Status::CONNECT_INVALID_PARAM, 42, 0),
        "qid above granted"
    );
    let depth = Limits::default().queue_depth;
    let c = q.fabric_connect(1, depth, NQN, HOSTNQN, a.cntlid, 0, 0);
    assert_eq!(
        ipo(c),
        (Status::CONNECT_INVALID_PARAM, 44, 0),
        "sqsize above MQES"
    );
    let c = q.fabric_connect(1, 31, NQN, "nqn.2026-11.io.ox:other-host", a.cntlid, 0, 0);
    assert_eq!(
        ipo(c),
        (Status::CONNECT_INVALID_PARAM, 512, 1),
        "host differs"
    );
    assert!(
        q.fabric_connect(1, 31, NQN, HOSTNQN, a.cntlid, 0, 0)
            .status
            .is_success()
    );
    let mut dup = Host::connect(s.addr, d);
    let c = dup.fabric_connect(1, 31, NQN, HOSTNQN, a.cntlid, 0, 0);
    assert_eq!(
        ipo(c),
        (Status::CONNECT_INVALID_PARAM, 42, 0),
        "queue in use"
    );
}

#[test]
fn properties_and_controller_reset() {
    let s = setup(Limits::default());
    let d = Digests::default();
    let mut a = Host::admin_ready(s.addr, d, NQN, 1);
    let cap = a.prop_get(0, true).cqe.unwrap();
    let cap = u64::from(cap.dw0) | u64::from(cap.dw1) << 32;
    assert_eq!(
        cap & 0xFFFF,
        u64::from(Limits::default().queue_depth) - 1,
        "MQES"
    );
    assert_eq!((cap >> 48) & 0xF, 0, "MPSMIN");
    assert_eq!(
        a.prop_get(8, false).cqe.unwrap().dw0,
        0x0002_0000,
        "NVMe 2.0"
    );
    assert_eq!(a.prop_get(0x99, false).status(), Status::INVALID_FIELD);
    let mut q = Host::io_queue(s.addr, d, NQN, a.cntlid, 1);
    assert!(q.read(1, 0, 1, 512).status().is_success());
    // CC.EN = 0 resets the controller: its I/O queues are closed.
    assert!(a.prop_set(0x14, 0).status().is_success());
    assert!(q.is_closed());
    assert_eq!(a.prop_get(0x1C, false).cqe.unwrap().dw0 & 1, 0);
    // Shutdown notification reports completion.
    assert!(
        a.prop_set(0x14, (6 << 16) | (4 << 20) | 1)
            .status()
            .is_success()
    );
    assert!(
        a.prop_set(0x14, (6 << 16) | (4 << 20) | 1 | (1 << 14))
            .status()
            .is_success()
    );
    assert_eq!((a.prop_get(0x1C, false).cqe.unwrap().dw0 >> 2) & 3, 2);
}

#[test]
fn sq_flow_control_off_reads_end_with_success_flag() {
    let s = setup(Limits::default());
    let d = Digests::default();
    let a = Host::admin_ready(s.addr, d, NQN, 2);
    let mut q = Host::connect(s.addr, d);
    let c = q.fabric_connect(1, 31, NQN, HOSTNQN, a.cntlid, 0, 0x04);
    assert!(c.status.is_success());
    assert_eq!(c.sqhd, 0xFFFF);
    let data = pattern(5, 4096);
    assert!(q.write(1, 0, &data, 512).status().is_success());
    let r = q.read(1, 0, 8, 512);
    assert!(r.success_flag && r.cqe.is_none());
    assert!(r.data == data);
    // Failures still get a response capsule.
    assert_eq!(q.read(1, BLOCKS, 1, 512).status(), Status::LBA_OUT_OF_RANGE);
    // With SQ flow control on (as SPDK's host leaves it), a read gets its response.
    let mut on = Host::io_queue(s.addr, d, NQN, a.cntlid, 2);
    let r = on.read(1, 0, 8, 512);
    assert!(!r.success_flag && r.cqe.is_some_and(|c| c.status.is_success()));
}

#[test]
fn c2h_success_always_ends_every_read_with_its_data() {
    let s = setup(Limits {
        c2h_success: nvmf::C2hSuccess::Always,
        ..Limits::default()
    });
    let d = Digests::default();
    let a = Host::admin_ready(s.addr, d, NQN, 1);
    // SQ flow control on: the response capsule is left out all the same, as SPDK's
    // target does; writes and failed reads still get theirs.
    let mut q = Host::io_queue(s.addr, d, NQN, a.cntlid, 1);
    let data = pattern(6, 8192);
    assert!(q.write(1, 16, &data, 512).status().is_success());
    let r = q.read(1, 16, 16, 512);
    assert!(r.success_flag && r.cqe.is_none());
    assert!(r.data == data);
    assert_eq!(q.read(1, BLOCKS, 1, 512).status(), Status::LBA_OUT_OF_RANGE);
}

#[test]
fn keep_alive_timeout_tears_down_the_controller_and_its_queues() {
    let s = setup(Limits::default());
    let d = Digests::default();
    let mut a = Host::connect(s.addr, d);
    assert!(
        a.fabric_connect(0, 31, NQN, HOSTNQN, 0xFFFF, 1000, 0)
            .status
            .is_success()
    );
    assert!(
        a.prop_set(0x14, (6 << 16) | (4 << 20) | 1)
            .status()
            .is_success()
    );
    let mut sf = Sqe::new(admin::SET_FEATURES, 0);
    sf.set_cdw(10, 0x07);
    assert!(a.command(sf, &[], 0).status().is_success());
    let mut q = Host::io_queue(s.addr, d, NQN, a.cntlid, 1);
    assert_eq!(s.target.controllers(), 1);
    // Keep-alives keep it alive...
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(400));
        assert!(
            a.command(Sqe::new(admin::KEEP_ALIVE, 0), &[], 0)
                .status()
                .is_success()
        );
    }
    assert!(q.read(1, 0, 1, 512).status().is_success());
    // ...silence kills it: admin and I/O queues closed.
    assert!(a.is_closed());
    assert!(q.is_closed());
    wait_until("controller teardown", || s.target.controllers() == 0);
}

/// Which hosts are connected to a subsystem, with their I/O queues, while they are;
/// none once they go.
#[test]
fn connected_controllers_name_the_hosts_of_each_subsystem() {
    let s = setup(Limits::default());
    let d = Digests::default();
    assert!(!s.target.connected().contains_key(NQN));
    let mut a = Host::admin_ready(s.addr, d, NQN, 1);
    let q = Host::io_queue(s.addr, d, NQN, a.cntlid, 1);
    let listed = s.target.connected().remove(NQN).unwrap_or_default();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        (
            listed[0].cntlid,
            listed[0].hostnqn.as_str(),
            listed[0].io_queues
        ),
        (a.cntlid, HOSTNQN, 1)
    );
    assert_eq!(s.target.connected().len(), 1, "only its subsystem");
    assert!(
        a.command(Sqe::new(admin::KEEP_ALIVE, 0), &[], 0)
            .status()
            .is_success()
    );
    drop(q);
    drop(a);
    wait_until("controller teardown", || {
        !s.target.connected().contains_key(NQN)
    });
}

#[test]
fn connection_limit_is_a_clean_busy_status() {
    let limits = Limits {
        max_connections: 2,
        ..Limits::default()
    };
    let s = setup(limits);
    let d = Digests::default();
    let first = Host::admin_ready(s.addr, d, NQN, 1);
    let _second = Host::io_queue(s.addr, d, NQN, first.cntlid, 1);
    let mut third = Host::connect(s.addr, d);
    let c = third.fabric_connect(0, 31, NQN, HOSTNQN, 0xFFFF, 0, 0);
    assert_eq!(c.status, Status::CONNECT_CTRL_BUSY);
    drop(third);
    drop(_second);
    wait_until("connection count to drop", || s.target.connections() == 1);
    let _again = Host::io_queue(s.addr, d, NQN, first.cntlid, 1);
}

#[test]
fn discovery_lists_subsystems_the_host_may_see() {
    let set = ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap();
    let v4: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let v6: SocketAddr = "[::1]:0".parse().unwrap();
    let ipv6 = std::net::TcpListener::bind(v6).is_ok();
    let mut listeners = vec![v4];
    if ipv6 {
        listeners.push(v6);
    }
    let sub = |nqn: &str, hosts: HostPolicy| Subsystem {
        nqn: nqn.into(),
        serial: "S".into(),
        model: "M".into(),
        hosts,
        namespaces: vec![Namespace::new(
            1,
            create_malloc("d", 512, 64, None).unwrap(),
        )],
        listeners: listeners.clone(),
        host_keys: Vec::new(),
    };
    let config = TargetConfig {
        subsystems: vec![
            sub(NQN, HostPolicy::Any),
            sub(
                PRIVATE,
                HostPolicy::Only(vec!["nqn.2026-11.io.ox:x".into()]),
            ),
        ],
        // A distinct address: "127.0.0.1:0" would be the subsystems' own listener.
        discovery_listeners: vec!["127.0.0.2:0".parse().unwrap()],
        limits: Limits::default(),
        socket_io: SocketIo::Uring,
        health: Default::default(),
    };
    let target = Target::start(config, set.handles()).unwrap();
    // The discovery-only listener is the first address.
    let disc = target.local_addrs()[0];
    let mut h = Host::connect(disc, Digests::default());
    let c = h.fabric_connect(0, 31, nvmf::DISCOVERY_NQN, HOSTNQN, 0xFFFF, 0, 0);
    assert!(c.status.is_success());
    assert!(
        h.prop_set(0x14, (6 << 16) | (4 << 20) | 1)
            .status()
            .is_success()
    );
    let mut idc = Sqe::new(admin::IDENTIFY, 0);
    idc.set_cdw(10, 1);
    assert_eq!(
        h.command(idc, &[], 4096).data[111],
        2,
        "CNTRLTYPE discovery"
    );
    let mut log = Sqe::new(admin::GET_LOG_PAGE, 0);
    log.set_cdw(10, 0x70 | (((4096 * 2 / 4) - 1) << 16));
    let page = h.command(log, &[], 8192);
    assert!(page.status().is_success());
    let n = le::u64(&page.data, 8) as usize;
    assert_eq!(
        n,
        1 + listeners.len(),
        "this discovery subsystem, then only the open subsystem, once per listener"
    );
    // First the current discovery subsystem itself (TP 8013): SUBTYPE 3, EFLAGS
    // duplicate information and explicit persistent connections, on the listener
    // asked.
    let own = &page.data[1024..2048];
    assert_eq!(le::str0(own, 256, 256), nvmf::DISCOVERY_NQN);
    assert_eq!((own[2], le::u16(own, 10)), (3, 0x3));
    assert_eq!(le::str0(own, 32, 32).trim_end(), disc.port().to_string());
    for i in 1..n {
        let e = &page.data[1024 * (i + 1)..1024 * (i + 2)];
        assert_eq!(le::str0(e, 256, 256), NQN);
        assert_eq!(e[0], 3);
        assert_eq!(
            (e[2], e[3], le::u16(e, 10)),
            (2, 0x06, 0),
            "NVM subsystem; TREQ: secure channel not required, SQ flow control may be off"
        );
        let addr = le::str0(e, 512, 256).trim_end().to_string();
        let port = le::str0(e, 32, 32).trim_end().to_string();
        assert!(
            target
                .listeners_of(NQN)
                .iter()
                .any(|a| a.ip().to_string() == addr && a.port().to_string() == port)
        );
    }
    // A data subsystem is not reachable through the discovery-only listener.
    let mut wrong = Host::connect(disc, Digests::default());
    let c = wrong.fabric_connect(0, 31, NQN, HOSTNQN, 0xFFFF, 0, 0);
    assert_eq!(c.status, Status::CONNECT_INVALID_PARAM);
    if ipv6 {
        let v6addr = target.listeners_of(NQN)[1];
        let a = Host::admin_ready(v6addr, Digests::default(), NQN, 1);
        let mut q = Host::io_queue(v6addr, Digests::default(), NQN, a.cntlid, 1);
        assert!(q.read(1, 0, 1, 512).status().is_success());
    }
    drop(h);
    set.shutdown().unwrap();
}

/// Sends `bytes` on a fresh connection (after ICReq when `negotiate`) and expects a
/// C2HTermReq with `fes` at `offset`, then the connection closed.
fn expect_fatal(addr: SocketAddr, negotiate: bool, bytes: &[u8], fes: Fes, offset: u32) {
    let mut h = if negotiate {
        Host::connect(addr, Digests::default())
    } else {
        Host::raw(addr)
    };
    h.send(bytes);
    let p = h.recv().expect("a TermReq before the close");
    assert_eq!(p.kind(), PduType::C2HTermReq as u8);
    assert_eq!(pdu::parse_term_req(&p.bytes), Some((fes as u16, offset)));
    assert!(h.is_closed());
}

#[test]
fn protocol_violations_end_only_that_connection() {
    let s = setup(Limits::default());
    let d = Digests::default();
    let a = Host::admin_ready(s.addr, d, NQN, 1);
    let mut good = Host::io_queue(s.addr, d, NQN, a.cntlid, 1);

    let mut bad_pfv = IcReq {
        pfv: 0,
        hpda: 0,
        hdgst: false,
        ddgst: false,
        maxr2t: 0,
    }
    .encode();
    bad_pfv[8] = 1;
    expect_fatal(s.addr, false, &bad_pfv, Fes::UnsupportedParameter, 8);

    let capsule = pdu::capsule_cmd(d, &Sqe::new(admin::KEEP_ALIVE, 1).0, &[]);
    expect_fatal(s.addr, false, &capsule, Fes::SequenceError, 0);

    let mut huge = capsule.clone();
    huge[4..8].copy_from_slice(&(64u32 << 20).to_le_bytes());
    expect_fatal(s.addr, true, &huge, Fes::InvalidHeaderField, 4);

    let mut bad_hlen = capsule.clone();
    bad_hlen[2] = 40;
    expect_fatal(s.addr, true, &bad_hlen, Fes::InvalidHeaderField, 2);

    let mut bad_type = capsule.clone();
    bad_type[0] = 0x42;
    expect_fatal(s.addr, true, &bad_type, Fes::InvalidHeaderField, 0);

    let h2c = pdu::data_pdu_header(
        PduType::H2CData,
        d,
        4,
        pdu::FLAG_DATA_LAST,
        pdu::DataHeader {
            cccid: 1,
            ttag: 77,
            offset: 0,
            length: 4,
        },
    );
    let mut h2c = h2c;
    h2c.extend_from_slice(&[0; 4]);
    expect_fatal(s.addr, true, &h2c, Fes::InvalidHeaderField, 10);

    // A header digest that does not match.
    let dg = Digests {
        header: true,
        data: false,
    };
    let mut h = Host::connect(s.addr, dg);
    let mut c = pdu::capsule_cmd(dg, &Sqe::new(admin::KEEP_ALIVE, 1).0, &[]);
    c[72] ^= 0xFF;
    h.send(&c);
    let p = h.recv().unwrap();
    assert_eq!(
        pdu::parse_term_req(&p.bytes),
        Some((Fes::HeaderDigest as u16, 0))
    );
    assert!(h.is_closed());

    // A second ICReq.
    expect_fatal(
        s.addr,
        true,
        &IcReq {
            pfv: 0,
            hpda: 0,
            hdgst: false,
            ddgst: false,
            maxr2t: 0,
        }
        .encode(),
        Fes::SequenceError,
        0,
    );

    // The well-behaved queue carries on.
    let data = pattern(11, 65536);
    assert!(good.write(1, 4096, &data, 512).status().is_success());
    assert!(good.read(1, 4096, 128, 512).data == data);
}

#[test]
fn a_data_digest_error_fails_the_command_not_the_connection() {
    let s = setup(Limits::default());
    let d = ALL_DIGESTS;
    let a = Host::admin_ready(s.addr, d, NQN, 1);
    let mut q = Host::io_queue(s.addr, d, NQN, a.cntlid, 1);
    let data = pattern(1, 4096);
    let mut sqe = rw(io::WRITE, 1, 0, 8);
    sqe.0[2] = 0x99;
    sqe.set_sgl(nvmf::cmd::SGL_DATA_BLOCK_OFFSET, 0, 4096);
    let mut capsule = pdu::capsule_cmd(d, &sqe.0, &data);
    let n = capsule.len();
    capsule[n - 1] ^= 0xFF;
    q.send(&capsule);
    let p = q.recv().unwrap();
    let cqe = nvmf::cmd::Cqe::decode(&p.bytes[8..24]);
    assert_eq!(cqe.status, Status::TRANSIENT_TRANSPORT);
    // Nothing was written, and the queue still works.
    assert!(q.read(1, 0, 8, 512).data.iter().all(|&b| b == 0));
    assert!(q.write(1, 0, &data, 512).status().is_success());
}

#[test]
fn random_garbage_never_takes_the_target_down() {
    let s = setup(Limits::default());
    let d = Digests::default();
    let a = Host::admin_ready(s.addr, d, NQN, 1);
    let mut good = Host::io_queue(s.addr, d, NQN, a.cntlid, 1);
    for seed in 0..200u64 {
        let negotiate = seed % 2 == 0;
        let mut h = if negotiate {
            Host::connect(s.addr, d)
        } else {
            Host::raw(s.addr)
        };
        let mut junk = pattern(seed, 8 + (seed as usize * 37) % 600);
        if seed % 3 == 0 {
            // A plausible header with random contents after it.
            junk[0] = 4;
            junk[2] = 72;
            let plen = junk.len() as u32;
            junk[4..8].copy_from_slice(&plen.to_le_bytes());
        }
        let _ = std::io::Write::write_all(&mut h.sock, &junk);
        h.sock
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        drop(h);
        if seed % 50 == 0 {
            assert!(good.read(1, 0, 1, 512).status().is_success());
        }
    }
    let data = pattern(99, 4096);
    assert!(good.write(1, 0, &data, 512).status().is_success());
    assert!(good.read(1, 0, 8, 512).data == data);
    wait_until("garbage connections to close", || {
        s.target.connections() == 2
    });
}

/// Well-framed capsules with random commands (opcodes, fabrics types, every dword,
/// SGLs of each kind, in-capsule data), on admin and I/O queues and before Connect:
/// whatever each gets (a status, an R2T, a held request, a TermReq), the target stays
/// up and the other connections keep working.
#[test]
fn random_commands_never_take_the_target_down() {
    let s = setup(Limits::default());
    let d = Digests::default();
    let a = Host::admin_ready(s.addr, d, NQN, 2);
    let mut good = Host::io_queue(s.addr, d, NQN, a.cntlid, 1);
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..60 {
        let mut h = match round % 3 {
            0 => Host::connect(s.addr, d),
            1 => Host::admin_ready(s.addr, d, NQN, 1),
            _ => Host::io_queue(s.addr, d, NQN, a.cntlid, 2),
        };
        for _ in 0..40 {
            let mut sqe = Sqe::new(0, 0);
            for b in sqe.0.iter_mut() {
                *b = next() as u8;
            }
            match next() % 4 {
                0 => sqe.0[0] = FABRICS,
                1 => sqe.0[0] = [io::READ, io::WRITE, io::FLUSH, io::DSM][next() as usize % 4],
                2 => {
                    sqe.0[0] = [admin::IDENTIFY, admin::GET_LOG_PAGE, admin::SET_FEATURES]
                        [next() as usize % 3]
                }
                _ => {}
            }
            if sqe.0[0] == FABRICS {
                sqe.0[4] = [0, 1, 4, 5, 6, 8, next() as u8][next() as usize % 7];
            }
            let data_len = (next() % 1024) as usize;
            let data: Vec<u8> = (0..data_len).map(|_| next() as u8).collect();
            let in_capsule = next() % 2 == 0;
            if in_capsule {
                sqe.set_sgl(nvmf::cmd::SGL_DATA_BLOCK_OFFSET, 0, data_len as u32);
            } else {
                sqe.set_sgl(
                    nvmf::cmd::SGL_TRANSPORT_DATA_BLOCK,
                    0,
                    next() as u32 % (1 << 21),
                );
            }
            let body = if in_capsule { &data[..] } else { &[][..] };
            let capsule = pdu::capsule_cmd(d, &sqe.0, body);
            if std::io::Write::write_all(&mut h.sock, &capsule).is_err() {
                break; // terminated: fine
            }
        }
        // Take whatever comes back for a moment, then go.
        h.sock
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        while h.recv().is_some() {}
        drop(h);
        if round % 10 == 0 {
            assert!(good.read(1, 0, 1, 512).status().is_success());
        }
    }
    let data = pattern(7, 4096);
    assert!(good.write(1, 8, &data, 512).status().is_success());
    assert!(good.read(1, 8, 8, 512).data == data);
    wait_until("the random connections to close", || {
        s.target.connections() == 2
    });
}

/// Starts a 64 KiB write through R2T on `q` and returns the R2T's (cid, ttag).
fn start_r2t_write(q: &mut Host) -> (u16, u16) {
    let mut sqe = rw(io::WRITE, 1, 0, 128);
    sqe.0[2..4].copy_from_slice(&500u16.to_le_bytes());
    sqe.set_sgl(nvmf::cmd::SGL_TRANSPORT_DATA_BLOCK, 0, 65536);
    q.send(&pdu::capsule_cmd(q.digests, &sqe.0, &[]));
    let r2t = q.recv().unwrap();
    assert_eq!(r2t.kind(), PduType::R2T as u8);
    let h = pdu::DataHeader::parse(&r2t.bytes).expect("a whole R2T header");
    assert_eq!((h.cccid, h.offset, h.length), (500, 0, 65536));
    (h.cccid, h.ttag)
}

#[test]
fn data_beyond_or_out_of_order_for_an_r2t_is_fatal() {
    let s = setup(Limits::default());
    let d = Digests::default();
    let a = Host::admin_ready(s.addr, d, NQN, 2);
    let mut good = Host::io_queue(s.addr, d, NQN, a.cntlid, 2);

    let mut q = Host::io_queue(s.addr, d, NQN, a.cntlid, 1);
    let (cid, ttag) = start_r2t_write(&mut q);
    q.send_h2c(cid, ttag, 4096, &[1; 4096]); // skips offset 0
    let p = q.recv().unwrap();
    assert_eq!(
        pdu::parse_term_req(&p.bytes),
        Some((Fes::DataOutOfRange as u16, 12))
    );
    assert!(q.is_closed());

    let mut q = Host::io_queue(s.addr, d, NQN, a.cntlid, 1);
    let (cid, ttag) = start_r2t_write(&mut q);
    q.send_h2c(cid, ttag, 0, &[1; 65536]);
    q.send_h2c(cid, ttag, 65536, &[1; 4096]); // more than asked for
    // Data for a finished transfer is for an unknown tag: fatal. (The write's own
    // response may come before or after the TermReq.)
    let mut term = None;
    while let Some(p) = q.recv() {
        if p.kind() == PduType::C2HTermReq as u8 {
            term = pdu::parse_term_req(&p.bytes);
        }
    }
    assert_eq!(term, Some((Fes::InvalidHeaderField as u16, 10)));

    let mut q = Host::io_queue(s.addr, d, NQN, a.cntlid, 1);
    let (_, ttag) = start_r2t_write(&mut q);
    q.send_h2c(7, ttag, 0, &[1; 4096]); // wrong command ID
    let p = q.recv().unwrap();
    assert_eq!(
        pdu::parse_term_req(&p.bytes),
        Some((Fes::InvalidHeaderField as u16, 8))
    );

    assert!(good.read(1, 0, 128, 512).data.iter().all(|&b| b == 1));
}

#[test]
fn a_host_that_vanishes_mid_write_loses_only_its_write() {
    let s = setup(Limits::default());
    let d = Digests::default();
    let a = Host::admin_ready(s.addr, d, NQN, 2);
    let mut good = Host::io_queue(s.addr, d, NQN, a.cntlid, 2);
    let before = pattern(21, 65536);
    assert!(good.write(1, 0, &before, 512).status().is_success());
    {
        let mut q = Host::io_queue(s.addr, d, NQN, a.cntlid, 1);
        let (cid, ttag) = start_r2t_write(&mut q);
        q.send_h2c(cid, ttag, 0, &[0xEE; 8192]); // half of the first part, then gone
    }
    wait_until("the vanished queue to close", || {
        s.target.connections() == 2
    });
    // Nothing of the unfinished write reached the device.
    assert!(good.read(1, 0, 128, 512).data == before);
    // Its queue ID is free again.
    let mut q = Host::io_queue(s.addr, d, NQN, a.cntlid, 1);
    assert!(q.read(1, 0, 1, 512).status().is_success());
}

#[test]
fn nothing_but_an_in_capsule_connect_is_accepted_before_connect() {
    let s = setup(Limits::default());
    let mut h = Host::connect(s.addr, Digests::default());
    // A write that would need an R2T: refused outright, no buffer, no R2T.
    let mut sqe = rw(io::WRITE, 1, 0, 2048);
    sqe.0[2..4].copy_from_slice(&9u16.to_le_bytes());
    sqe.set_sgl(nvmf::cmd::SGL_TRANSPORT_DATA_BLOCK, 0, 1 << 20);
    h.send(&pdu::capsule_cmd(Digests::default(), &sqe.0, &[]));
    let p = h.recv().unwrap();
    assert_eq!(
        p.kind(),
        PduType::CapsuleResp as u8,
        "no R2T before Connect"
    );
    assert_eq!(
        nvmf::cmd::Cqe::decode(&p.bytes[8..24]).status,
        Status::SEQUENCE_ERROR
    );
    // Connect still works on the same connection.
    assert!(
        h.fabric_connect(0, 31, NQN, HOSTNQN, 0xFFFF, 0, 0)
            .status
            .is_success()
    );
}

#[test]
fn a_digest_error_on_a_cid_in_use_does_not_free_it() {
    let s = setup(Limits::default());
    let d = ALL_DIGESTS;
    let a = Host::admin_ready(s.addr, d, NQN, 1);
    let mut q = Host::io_queue(s.addr, d, NQN, a.cntlid, 1);
    // A write waiting for its R2T data holds CID 500.
    let (cid, ttag) = start_r2t_write(&mut q);
    // A damaged capsule reusing CID 500: CID conflict, and the write is untouched.
    let mut bad = rw(io::WRITE, 1, 0, 8);
    bad.0[2..4].copy_from_slice(&500u16.to_le_bytes());
    bad.set_sgl(nvmf::cmd::SGL_DATA_BLOCK_OFFSET, 0, 4096);
    let mut capsule = pdu::capsule_cmd(d, &bad.0, &[3; 4096]);
    let n = capsule.len();
    capsule[n - 1] ^= 0xFF;
    q.send(&capsule);
    let p = q.recv().unwrap();
    assert_eq!(
        nvmf::cmd::Cqe::decode(&p.bytes[8..24]).status,
        Status::CID_CONFLICT
    );
    q.send_h2c(cid, ttag, 0, &[7; 65536]);
    let p = q.recv().unwrap();
    let cqe = nvmf::cmd::Cqe::decode(&p.bytes[8..24]);
    assert_eq!((cqe.cid, cqe.status), (500, Status::SUCCESS));
    assert!(q.read(1, 0, 128, 512).data.iter().all(|&b| b == 7));
}

#[test]
fn a_host_that_stops_reading_is_paused_not_buffered_without_limit() {
    let s = setup(Limits::default());
    let d = Digests::default();
    let a = Host::admin_ready(s.addr, d, NQN, 1);
    let mut q = Host::io_queue(s.addr, d, NQN, a.cntlid, 1);
    let data = pattern(77, 1 << 20);
    assert!(q.write(1, 0, &data, 512).status().is_success());
    // 64 reads of 1 MiB sent without reading a byte of the replies (64 MiB > the cap).
    for i in 0..64u16 {
        let mut sqe = rw(io::READ, 1, 0, 2048);
        sqe.0[2..4].copy_from_slice(&(1000 + i).to_le_bytes());
        sqe.set_sgl(nvmf::cmd::SGL_TRANSPORT_DATA_BLOCK, 0, 1 << 20);
        q.send(&pdu::capsule_cmd(d, &sqe.0, &[]));
    }
    std::thread::sleep(Duration::from_millis(300));
    // Now read: every reply arrives, intact.
    let mut done = 0;
    let mut got = Vec::new();
    while done < 64 {
        let p = q.recv().expect("replies after the pause");
        match PduType::from_u8(p.kind()) {
            Some(PduType::C2HData) => {
                let pdo = usize::from(p.ch.pdo);
                got.extend_from_slice(&p.bytes[pdo..]);
            }
            Some(PduType::CapsuleResp) => {
                assert!(nvmf::cmd::Cqe::decode(&p.bytes[8..24]).status.is_success());
                assert!(got == data, "reply {done} corrupted");
                got.clear();
                done += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn replies_cut_short_by_a_full_socket_resume_in_order_and_intact() {
    use std::os::fd::AsRawFd;
    let s = setup(Limits::default());
    let d = Digests::default();
    let a = Host::admin_ready(s.addr, d, NQN, 1);
    let mut q = Host::io_queue(s.addr, d, NQN, a.cntlid, 1);
    let data = pattern(91, 8 << 20);
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        assert!(
            q.write(1, i as u64 * 2048, chunk, 512)
                .status()
                .is_success()
        );
    }
    // A receive window of two segments and 29 MiB of replies, far more than the
    // socket buffers hold: the target's sends stop part-way through batches of many
    // segments (small and large reads mixed) and must resume exactly there.
    let fd = q.sock.as_raw_fd();
    let bytes: libc::c_int = 128 << 10;
    // SAFETY: a valid socket and a pointer to a live c_int of the size given.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    let sizes = [4096u32, 65536, 512, 262_144, 8192, 1 << 20];
    let mut expect = std::collections::HashMap::new();
    let mut offset = 0u64;
    for i in 0..127u16 {
        let len = sizes[usize::from(i) % sizes.len()];
        if offset + u64::from(len) > data.len() as u64 {
            offset = 0;
        }
        let cid = 2000 + i;
        let mut sqe = rw(io::READ, 1, offset / 512, len / 512);
        sqe.0[2..4].copy_from_slice(&cid.to_le_bytes());
        sqe.set_sgl(nvmf::cmd::SGL_TRANSPORT_DATA_BLOCK, 0, len);
        q.send(&pdu::capsule_cmd(d, &sqe.0, &[]));
        expect.insert(
            cid,
            &data[offset as usize..(offset + u64::from(len)) as usize],
        );
        offset += u64::from(len) * 3;
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut got: std::collections::HashMap<u16, Vec<u8>> = std::collections::HashMap::new();
    let mut done = 0;
    while done < expect.len() {
        let p = q.recv().expect("every reply arrives");
        match PduType::from_u8(p.kind()) {
            Some(PduType::C2HData) => {
                let h = nvmf::pdu::DataHeader::parse(&p.bytes).expect("a whole data header");
                let pdo = usize::from(p.ch.pdo);
                let buf = got.entry(h.cccid).or_default();
                assert_eq!(
                    h.offset as usize,
                    buf.len(),
                    "data in order for {}",
                    h.cccid
                );
                buf.extend_from_slice(&p.bytes[pdo..pdo + h.length as usize]);
            }
            Some(PduType::CapsuleResp) => {
                let cqe = nvmf::cmd::Cqe::decode(&p.bytes[8..24]);
                assert!(cqe.status.is_success());
                let want = expect[&cqe.cid];
                assert!(
                    got.remove(&cqe.cid).as_deref() == Some(want),
                    "read {}",
                    cqe.cid
                );
                done += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn subsystems_come_and_go_while_the_target_runs() {
    let s = setup(Limits::default());
    let added = "nqn.2026-11.io.ox:added";
    let sub = |listeners: Vec<SocketAddr>| Subsystem {
        nqn: added.into(),
        serial: "OXADD".into(),
        model: "OX test".into(),
        hosts: HostPolicy::Any,
        namespaces: vec![Namespace::new(
            1,
            create_malloc("new", 512, 4096, None).unwrap(),
        )],
        listeners,
        host_keys: Vec::new(),
    };
    // On the existing listener, and on a new one bound on the spot.
    let fresh: SocketAddr = "127.0.0.3:0".parse().unwrap();
    let at = s.target.add_subsystem(sub(vec![s.addr, fresh])).unwrap();
    assert_eq!(at[0], s.addr);
    assert_ne!(at[1].port(), 0, "the new listener's port is resolved");
    for addr in &at {
        let a = Host::admin_ready(*addr, Digests::default(), added, 1);
        let mut q = Host::io_queue(*addr, Digests::default(), added, a.cntlid, 1);
        let data = pattern(3, 4096);
        assert!(q.write(1, 8, &data, 512).status().is_success());
        assert!(q.read(1, 8, 8, 512).data == data);
    }
    // The same NQN twice, or an invalid one, is refused; the target carries on.
    let again = s.target.add_subsystem(sub(vec![s.addr])).unwrap_err();
    assert!(again.to_string().contains("exists already"), "{again}");
    let mut bad = sub(vec![s.addr]);
    bad.nqn = "not-an-nqn".into();
    assert!(s.target.add_subsystem(bad).is_err());
    // Removed: its controllers are torn down and new hosts cannot connect.
    let a = Host::admin_ready(s.addr, Digests::default(), added, 1);
    let mut q = Host::io_queue(s.addr, Digests::default(), added, a.cntlid, 1);
    s.target.remove_subsystem(added).unwrap();
    wait_until("the I/O queue to close", || q.is_closed());
    let mut h = Host::connect(s.addr, Digests::default());
    let c = h.fabric_connect(0, 31, added, HOSTNQN, 0xFFFF, 0, 0);
    assert_eq!(c.status, Status::CONNECT_INVALID_PARAM);
    assert!(s.target.remove_subsystem(added).is_err());
    // The configured subsystem was never disturbed.
    let a = Host::admin_ready(s.addr, Digests::default(), NQN, 1);
    let mut q = Host::io_queue(s.addr, Digests::default(), NQN, a.cntlid, 1);
    assert!(q.read(1, 0, 1, 512).status().is_success());
}

/// A discovery controller of `hostnqn`, enabled, with discovery log change notices
/// asked for or not.
fn discovery_controller(addr: SocketAddr, hostnqn: &str, notices: bool) -> Host {
    let mut h = Host::connect(addr, Digests::default());
    let c = h.fabric_connect(0, 31, nvmf::DISCOVERY_NQN, hostnqn, 0xFFFF, 0, 0);
    assert!(c.status.is_success());
    enable(&mut h);
    let mut idc = Sqe::new(admin::IDENTIFY, 0);
    idc.set_cdw(10, 1);
    let id = h.command(idc, &[], 4096).data;
    assert_ne!(
        le::u32(&id, 92) & 1 << 31,
        0,
        "OAES: discovery log change notices"
    );
    // No effects log or per-namespace SMART claimed where there is none to read.
    assert_eq!(id[261], 0x04, "LPA of a discovery controller");
    if notices {
        set_async_events(&mut h, 1 << 31);
    }
    h
}

fn enable(h: &mut Host) {
    assert!(
        h.prop_set(0x14, (6 << 16) | (4 << 20) | 1)
            .status()
            .is_success()
    );
}

fn set_async_events(h: &mut Host, config: u32) {
    let mut aec = Sqe::new(admin::SET_FEATURES, 0);
    aec.set_cdw(10, 0x0B);
    aec.set_cdw(11, config);
    assert!(h.command(aec, &[], 0).status().is_success());
}

/// Two Keep Alives answered in turn: no held request completed before them, and the
/// controller's reactor has begun a pass (taking its messages) since the first.
fn nothing_held_completed(h: &mut Host) {
    for _ in 0..2 {
        let done = h.command(Sqe::new(admin::KEEP_ALIVE, 0), &[], 0);
        assert!(done.status().is_success());
    }
}

fn discovery_generation(h: &mut Host, retain: bool) -> u64 {
    let mut log = Sqe::new(admin::GET_LOG_PAGE, 0);
    log.set_cdw(10, 0x70 | u32::from(retain) << 15 | ((1024 / 4) - 1) << 16);
    let page = h.command(log, &[], 1024);
    assert!(page.status().is_success());
    le::u64(&page.data, 0)
}

#[test]
fn discovery_controllers_are_told_when_the_log_changes() {
    const CHANGED: u32 = 0x0070_F002; // notice, discovery log page change, log 0x70
    let s = setup(Limits::default());
    let sub = |nqn: &str, hosts: HostPolicy| Subsystem {
        nqn: nqn.into(),
        serial: "OXAEN".into(),
        model: "OX test".into(),
        hosts,
        namespaces: vec![Namespace::new(
            1,
            create_malloc("aen", 512, 64, None).unwrap(),
        )],
        listeners: vec![s.addr],
        host_keys: Vec::new(),
    };
    let open = |nqn: &str| sub(nqn, HostPolicy::Any);
    let mut told = discovery_controller(s.addr, HOSTNQN, true);
    let mut quiet = discovery_controller(s.addr, HOSTNQN, false);
    let generation = discovery_generation(&mut told, false);
    let held = told.submit(Sqe::new(admin::ASYNC_EVENT, 0));
    let _quiet_held = quiet.submit(Sqe::new(admin::ASYNC_EVENT, 0));
    nothing_held_completed(&mut told);

    s.target
        .add_subsystem(open("nqn.2026-11.io.ox:aen1"))
        .unwrap();
    let cqe = told.response();
    assert_eq!(
        (cqe.cid, cqe.status, cqe.dw0),
        (held, Status::SUCCESS, CHANGED)
    );
    // Until the host reads the log, further changes are masked.
    let next = told.submit(Sqe::new(admin::ASYNC_EVENT, 0));
    s.target.remove_subsystem("nqn.2026-11.io.ox:aen1").unwrap();
    nothing_held_completed(&mut told);
    // Reading it with Retain Asynchronous Event keeps the mask; without, lifts it.
    assert_eq!(discovery_generation(&mut told, true), generation + 2);
    s.target
        .add_subsystem(open("nqn.2026-11.io.ox:aen2"))
        .unwrap();
    nothing_held_completed(&mut told);
    assert_eq!(discovery_generation(&mut told, false), generation + 3);
    // A subsystem this host may not see tells it nothing.
    let other = HostPolicy::Only(vec!["nqn.2026-11.io.ox:someone-else".into()]);
    s.target
        .add_subsystem(sub("nqn.2026-11.io.ox:hidden", other))
        .unwrap();
    nothing_held_completed(&mut told);
    s.target
        .add_subsystem(open("nqn.2026-11.io.ox:aen3"))
        .unwrap();
    let cqe = told.response();
    assert_eq!((cqe.cid, cqe.dw0), (next, CHANGED));

    // A change with no request held is kept for the next one, which completes at once.
    discovery_generation(&mut told, false);
    s.target.remove_subsystem("nqn.2026-11.io.ox:aen3").unwrap();
    nothing_held_completed(&mut told);
    let late = told.submit(Sqe::new(admin::ASYNC_EVENT, 0));
    let cqe = told.response();
    assert_eq!((cqe.cid, cqe.dw0), (late, CHANGED));
    // ... unless the log was read meanwhile, or notices were turned off meanwhile.
    discovery_generation(&mut told, false);
    s.target.remove_subsystem("nqn.2026-11.io.ox:aen2").unwrap();
    nothing_held_completed(&mut told);
    discovery_generation(&mut told, false);
    let pending = told.submit(Sqe::new(admin::ASYNC_EVENT, 0));
    nothing_held_completed(&mut told);
    s.target
        .remove_subsystem("nqn.2026-11.io.ox:hidden")
        .unwrap(); // not this host's
    s.target
        .add_subsystem(open("nqn.2026-11.io.ox:aen4"))
        .unwrap();
    let cqe = told.response();
    assert_eq!((cqe.cid, cqe.dw0), (pending, CHANGED));
    discovery_generation(&mut told, false);
    set_async_events(&mut told, 0);
    s.target.remove_subsystem("nqn.2026-11.io.ox:aen4").unwrap();
    nothing_held_completed(&mut told);
    set_async_events(&mut told, 1 << 31);
    let _held = told.submit(Sqe::new(admin::ASYNC_EVENT, 0));
    nothing_held_completed(&mut told);

    // A controller reset drops held requests and notice state; the host starts over.
    assert!(told.prop_set(0x14, 0).status().is_success());
    enable(&mut told);
    s.target
        .add_subsystem(open("nqn.2026-11.io.ox:aen5"))
        .unwrap();
    nothing_held_completed(&mut told); // notices are off again after the reset
    set_async_events(&mut told, 1 << 31);
    let after_reset = told.submit(Sqe::new(admin::ASYNC_EVENT, 0));
    s.target.remove_subsystem("nqn.2026-11.io.ox:aen5").unwrap();
    let cqe = told.response();
    assert_eq!((cqe.cid, cqe.dw0), (after_reset, CHANGED));

    // A controller that did not ask for notices keeps its request held throughout
    // (its response would arrive before the Keep Alives').
    nothing_held_completed(&mut quiet);
}

#[test]
fn connect_decisions_are_reported_to_the_observer() {
    let s = setup(Limits::default());
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    s.target
        .observe_connects(std::sync::Arc::new(move |e| {
            let _ = tx.lock().unwrap().send(e);
        }))
        .unwrap();
    let a = Host::admin_ready(s.addr, Digests::default(), NQN, 1);
    let _q = Host::io_queue(s.addr, Digests::default(), NQN, a.cntlid, 1);
    let mut h = Host::connect(s.addr, Digests::default());
    let c = h.fabric_connect(0, 31, PRIVATE, HOSTNQN, 0xFFFF, 0, 0);
    assert_eq!(c.status, Status::CONNECT_INVALID_HOST);
    let mut h = Host::connect(s.addr, Digests::default());
    let c = h.fabric_connect(0, 31, "nqn.2026-11.io.ox:nope", HOSTNQN, 0xFFFF, 0, 0);
    assert_eq!(c.status, Status::CONNECT_INVALID_PARAM);
    // Bad parameters, and refused I/O queues, are reported too.
    let mut h = Host::connect(s.addr, Digests::default());
    let c = h.fabric_connect(0, 31, NQN, "not-an-nqn", 0xFFFF, 0, 0);
    assert_eq!(c.status, Status::CONNECT_INVALID_PARAM);
    let mut h = Host::connect(s.addr, Digests::default());
    let c = h.fabric_connect(0, 0, NQN, HOSTNQN, 0xFFFF, 0, 0);
    assert_eq!(c.status, Status::CONNECT_INVALID_PARAM);
    let mut h = Host::connect(s.addr, Digests::default());
    let c = h.fabric_connect(1, 31, NQN, HOSTNQN, 0x7777, 0, 0);
    assert_eq!(c.status, Status::CONNECT_INVALID_PARAM);
    let mut h = Host::connect(s.addr, Digests::default());
    let c = h.fabric_connect(1, 31, NQN, HOSTNQN, a.cntlid, 0, 0);
    assert_eq!(c.status, Status::CONNECT_INVALID_PARAM, "queue 1 is taken");
    let got: Vec<nvmf::ConnectEvent> = (0..7)
        .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
        .collect();
    assert!(got[0].allowed && got[0].subnqn == NQN && got[0].hostnqn == HOSTNQN);
    assert!(got.iter().all(|e| e.peer.ip().is_loopback()));
    let refusals: Vec<&str> = got[1..].iter().map(|e| e.reason).collect();
    assert!(got[1..].iter().all(|e| !e.allowed));
    assert_eq!(
        refusals,
        [
            "host not allowed",
            "no such subsystem on this listener",
            "invalid host NQN",
            "invalid admin queue size",
            "no such controller",
            "queue ID in use",
        ]
    );
    assert_eq!(got[6].hostnqn, HOSTNQN);
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "I/O queues that connect are not reported"
    );
    assert!(
        s.target
            .observe_connects(std::sync::Arc::new(|_| {}))
            .is_err()
    );
}

/// Hundreds of sockets that never send an ICReq, and dozens that send one and never a
/// Connect, take only pending slots (a share per address): a real host still connects
/// and does I/O among them, and every one of them is closed at its deadline (or as it
/// was accepted), counted and reported.
#[test]
fn idle_sockets_never_lock_real_hosts_out() {
    let limits = Limits {
        max_connections: 8,
        max_pending_connections: 64,
        max_pending_per_address: 16,
        max_io_queues: 8,
        icreq_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        ..Limits::default()
    };
    let s = setup(limits);
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    s.target
        .observe_connects(Arc::new(move |e| sink.lock().unwrap().push(e)))
        .unwrap();
    let d = Digests::default();
    let mut silent: Vec<Host> = (0..300)
        .map(|_| Host::raw_from("127.0.0.2", s.addr))
        .collect();
    let mut no_connect: Vec<Host> = (0..40)
        .map(|i| Host::connect_from(&format!("127.0.0.{}", 10 + i % 4), s.addr, d))
        .collect();
    // A real host, among them: connects, opens a queue and does I/O.
    let mut admin = Host::admin_ready(s.addr, d, NQN, 1);
    let mut q = Host::io_queue(s.addr, d, NQN, admin.cntlid, 1);
    let data = pattern(77, 4096);
    assert!(q.write(1, 8, &data, 512).status().is_success());
    let r = q.read(1, 8, 8, 512);
    assert!(r.status().is_success() && r.data == data);
    // Every socket that never connected is closed: at once, or at its deadline.
    for h in silent.iter_mut().chain(no_connect.iter_mut()) {
        assert!(
            h.is_closed(),
            "a socket that never sent Connect was kept open"
        );
    }
    let (refused, timed_out) = s.target.pending_dropped();
    assert_eq!(
        refused + timed_out,
        340,
        "refused {refused}, timed out {timed_out}"
    );
    assert!(
        refused > 0 && timed_out >= 40,
        "refused {refused}, timed out {timed_out}"
    );
    // The real host's queues outlived every deadline and still work.
    let r = q.read(1, 8, 8, 512);
    assert!(r.status().is_success() && r.data == data);
    assert_eq!(admin.prop_get(0x1c, false).status(), Status::SUCCESS);
    assert_eq!(s.target.connections(), 2);
    let events = events.lock().unwrap();
    let count = |reason: &str| events.iter().filter(|e| e.reason == reason).count() as u64;
    assert_eq!(
        count("too many connections from this address that have not sent Connect")
            + count("too many connections that have not sent Connect"),
        refused
    );
    assert_eq!(count("no ICReq") + count("no Connect"), timed_out);
    assert_eq!(count("no Connect"), 40);
    assert!(
        events
            .iter()
            .filter(|e| !e.allowed)
            .all(|e| e.peer.ip().to_string() != "127.0.0.1")
    );
}

/// Discovery controllers (whose Connect needs no host check) have slots of their
/// own: idle ones fill those, never the slots I/O hosts connect with.
#[test]
fn idle_discovery_controllers_cannot_take_io_hosts_places() {
    let limits = Limits {
        max_connections: 2,
        max_discovery_connections: 2,
        ..Limits::default()
    };
    let s = setup(limits);
    let d = Digests::default();
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut h = Host::connect(s.addr, d);
        let c = h.fabric_connect(0, 31, nvmf::DISCOVERY_NQN, HOSTNQN, 0xFFFF, 0, 0);
        assert_eq!(c.status, Status::SUCCESS);
        idle.push(h);
    }
    let mut third = Host::connect(s.addr, d);
    let c = third.fabric_connect(0, 31, nvmf::DISCOVERY_NQN, HOSTNQN, 0xFFFF, 0, 0);
    assert_eq!(
        c.status,
        Status::CONNECT_CTRL_BUSY,
        "discovery slots are full"
    );
    // An I/O host still gets its admin queue and an I/O queue.
    let a = Host::admin_ready(s.addr, d, NQN, 1);
    let mut q = Host::io_queue(s.addr, d, NQN, a.cntlid, 1);
    assert!(q.read(1, 0, 8, 512).status().is_success());
    assert_eq!(s.target.connections(), 2);
    // A discovery controller that goes frees its slot.
    drop(idle.pop());
    wait_until("a discovery slot to free", || {
        let mut h = Host::connect(s.addr, d);
        h.fabric_connect(0, 31, nvmf::DISCOVERY_NQN, HOSTNQN, 0xFFFF, 0, 0)
            .status
            == Status::SUCCESS
    });
}

/// What SPDK's host does that a target must take: a Connect without a host NQN (its
/// tools send none unless told one) where any host may connect, and, at shutdown, a
/// Property Get of CC reusing the CID of an Asynchronous Event Request it cancelled on
/// its own side only.
#[test]
fn spdk_hosts_without_a_host_nqn_or_reusing_a_held_aer_cid_are_served() {
    let s = setup(Limits::default());
    let d = Digests::default();
    // No host NQN: let in where any host may connect, on the admin and I/O queues.
    let mut a = Host::connect(s.addr, d);
    let c = a.fabric_connect(0, 31, NQN, "", 0xFFFF, 0, 0);
    assert_eq!(c.status, Status::SUCCESS);
    assert!(
        a.prop_set(0x14, (6 << 16) | (4 << 20) | 1)
            .status()
            .is_success()
    );
    let mut sqe = Sqe::new(admin::SET_FEATURES, 0);
    sqe.set_cdw(10, 0x07);
    sqe.set_cdw(11, 0);
    assert!(a.command(sqe, &[], 0).status().is_success());
    let mut q = Host::connect(s.addr, d);
    let c = q.fabric_connect(1, 31, NQN, "", a.cntlid, 0, 0);
    assert_eq!(c.status, Status::SUCCESS);
    assert!(q.read(1, 0, 8, 512).status().is_success());
    // ... but not where only named hosts may.
    let mut p = Host::connect(s.addr, d);
    let c = p.fabric_connect(0, 31, PRIVATE, "", 0xFFFF, 0, 0);
    assert_eq!(c.status, Status::CONNECT_INVALID_HOST);
    // An AER is held; a Property Get of CC reusing its CID retires it and is answered.
    let aer = a.submit(Sqe::new(admin::ASYNC_EVENT, 0));
    let second = a.submit(Sqe::new(admin::ASYNC_EVENT, 0));
    a.reuse_cid(aer);
    let cc = a.prop_get(0x14, false);
    assert_eq!(cc.status(), Status::SUCCESS, "not a CID conflict");
    assert_eq!(cc.cqe.unwrap().dw0 & 1, 1, "CC.EN read back");
    // A command reusing the other held AER's CID retires that one too.
    a.reuse_cid(second);
    let mut sqe = Sqe::new(admin::GET_FEATURES, 0);
    sqe.set_cdw(10, 0x07);
    assert!(a.command(sqe, &[], 0).status().is_success());
    // Commands with fresh CIDs go on as ever.
    a.reuse_cid(1000);
    assert!(a.prop_get(0x1C, false).status().is_success());
}

/// A host asking for nine I/O queues (`spdk_nvme_perf -P 9`) gets them by default.
#[test]
fn a_host_may_connect_127_io_queues_by_default() {
    let s = setup(Limits::default());
    let d = Digests::default();
    let a = Host::admin_ready(s.addr, d, NQN, 127);
    // As a host does: every queue's socket is open before the first Connect, so all of
    // them are pending at once (and each holds only a small receive buffer meanwhile).
    let mut queues: Vec<Host> = (0..127).map(|_| Host::connect(s.addr, d)).collect();
    for (i, q) in queues.iter_mut().enumerate() {
        let qid = i as u16 + 1;
        let c = q.fabric_connect(qid, 127, NQN, HOSTNQN, a.cntlid, 0, 0);
        assert!(c.status.is_success(), "queue {qid}: {}", c.status);
    }
    // Connected queues take full-size PDUs: a 128 KiB write in one H2CData burst.
    let data = pattern(11, 128 << 10);
    let last = queues.last_mut().unwrap();
    assert!(last.write(1, 0, &data, 512).status().is_success());
    assert!(last.read(1, 0, 256, 512).data == data);
}

#[test]
fn before_connect_only_small_pdus_are_taken() {
    let s = setup(Limits::default());
    // A capsule claiming 64 KiB of in-capsule data before any Connect: the connection is
    // ended with a header error, not given a 64 KiB buffer to fill.
    let mut pdu = vec![0u8; 72];
    pdu[0] = 0x04; // CapsuleCmd
    pdu[2] = 72; // HLEN
    pdu[3] = 72; // PDO
    pdu[4..8].copy_from_slice(&(72u32 + (64 << 10)).to_le_bytes());
    expect_fatal(s.addr, true, &pdu, Fes::InvalidHeaderField, 4);
}
