//! DH-HMAC-CHAP in-band authentication, driven by a scripted host over loopback TCP:
//! hosts with secrets authenticate every queue before using it (one way, or both
//! ways when they ask), a wrong secret or a hostile exchange fails only that
//! connection, and the observer (the audit log) hears each outcome.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bdev::create_malloc;
use nvmf::cmd::{Sqe, Status, admin, fctype};
use nvmf::dhchap::{DhchapKey, Hash, HostKeys};
use nvmf::ffdhe::DhGroup;
use nvmf::le;
use nvmf::pdu::Digests;
use nvmf::{
    ConnectEvent, HostPolicy, Limits, Namespace, SocketIo, Subsystem, Target, TargetConfig,
};
use reactor::{CoreList, ReactorConfig, ReactorSet};
use support::{AuthOutcome, HOSTNQN, Host, auth_sqe, negotiate, pattern, reply};

const NQN: &str = "nqn.2026-11.io.ox:auth";
/// A second host, that also asks the controller to prove itself.
const BOTH_WAYS: &str = "nqn.2026-11.io.ox:host-both-ways";
/// A third, allowed without a secret.
const PLAIN: &str = "nqn.2026-11.io.ox:host-plain";
/// A fourth, configured for Diffie-Hellman augmented challenges (ffdhe2048).
const FFDHE: &str = "nqn.2026-11.io.ox:host-ffdhe";

struct Setup {
    target: Target,
    addr: SocketAddr,
    host_key: DhchapKey,
    both_key: DhchapKey,
    ctrl_key: DhchapKey,
    events: Arc<Mutex<Vec<ConnectEvent>>>,
    set: Option<ReactorSet>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(set) = self.set.take() {
            set.shutdown().unwrap();
        }
    }
}

fn setup(auth_timeout: Duration) -> Setup {
    let set = ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap();
    let host_key = DhchapKey::generate(32, Some(Hash::Sha256)).unwrap();
    let both_key = DhchapKey::generate(48, None).unwrap();
    let ctrl_key = DhchapKey::generate(64, Some(Hash::Sha512)).unwrap();
    let config = TargetConfig {
        subsystems: vec![Subsystem {
            nqn: NQN.into(),
            serial: "OXAUTH".into(),
            model: "OX test".into(),
            hosts: HostPolicy::Only(vec![
                HOSTNQN.into(),
                BOTH_WAYS.into(),
                PLAIN.into(),
                FFDHE.into(),
            ]),
            namespaces: vec![Namespace::new(
                1,
                create_malloc("auth", 512, 8192, None).unwrap(),
            )],
            listeners: vec!["127.0.0.1:0".parse().unwrap()],
            host_keys: vec![
                HostKeys {
                    hostnqn: HOSTNQN.into(),
                    key: host_key.clone(),
                    ctrl_key: None,
                    hash: Hash::Sha256,
                    dhgroup: DhGroup::Null,
                },
                HostKeys {
                    hostnqn: BOTH_WAYS.into(),
                    key: both_key.clone(),
                    ctrl_key: Some(ctrl_key.clone()),
                    hash: Hash::Sha384,
                    dhgroup: DhGroup::Ffdhe3072,
                },
                HostKeys {
                    hostnqn: FFDHE.into(),
                    key: host_key.clone(),
                    ctrl_key: Some(ctrl_key.clone()),
                    hash: Hash::Sha256,
                    dhgroup: DhGroup::Ffdhe2048,
                },
            ],
        }],
        discovery_listeners: vec![],
        limits: Limits {
            auth_timeout,
            ..Limits::default()
        },
        socket_io: SocketIo::Uring,
        health: Default::default(),
    };
    let target = Target::start(config, set.handles()).unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    target
        .observe_connects(Arc::new(move |e| sink.lock().unwrap().push(e)))
        .unwrap();
    let addr = target.local_addrs()[0];
    Setup {
        target,
        addr,
        host_key,
        both_key,
        ctrl_key,
        events,
        set: Some(set),
    }
}

/// Connects queue `qid` as `hostnqn`; returns the host and Connect's result dword.
fn connect(addr: SocketAddr, hostnqn: &str, qid: u16, cntlid: u16) -> (Host, u32) {
    let mut h = Host::connect(addr, Digests::default());
    let cqe = h.fabric_connect(qid, 31, NQN, hostnqn, cntlid, 0, 0);
    assert!(cqe.status.is_success(), "connect: {}", cqe.status);
    (h, cqe.dw0)
}

const ATR: u32 = 1 << 17;

fn identify(h: &mut Host) -> Status {
    let mut sqe = Sqe::new(admin::IDENTIFY, 0);
    sqe.set_cdw(10, 1);
    h.command(sqe, &[], 4096).status()
}

fn enable(h: &mut Host) {
    assert!(
        h.prop_set(0x14, (6 << 16) | (4 << 20) | 1)
            .status()
            .is_success()
    );
    let mut sqe = Sqe::new(admin::SET_FEATURES, 0);
    sqe.set_cdw(10, 0x07);
    sqe.set_cdw(11, 0);
    assert!(h.command(sqe, &[], 0).status().is_success());
}

fn reasons(s: &Setup) -> Vec<(String, bool, &'static str)> {
    s.events
        .lock()
        .unwrap()
        .iter()
        .map(|e| (e.hostnqn.clone(), e.allowed, e.reason))
        .collect()
}

#[test]
fn hosts_with_secrets_authenticate_every_queue_before_using_it() {
    let s = setup(Duration::from_secs(30));
    let (mut admin_q, dw0) = connect(s.addr, HOSTNQN, 0, 0xFFFF);
    assert_ne!(dw0 & ATR, 0, "Connect asks the host to authenticate");
    let cntlid = dw0 as u16;
    // Nothing but authentication before it: not Identify, not properties (the status
    // compared includes Do Not Retry).
    assert_eq!(identify(&mut admin_q), Status::AUTH_REQUIRED);
    assert_eq!(
        admin_q.prop_get(0x1C, false).status(),
        Status::AUTH_REQUIRED
    );
    assert_eq!(
        admin_q.authenticate(HOSTNQN, NQN, &s.host_key, None),
        AuthOutcome::Success {
            controller_proved: false
        }
    );
    assert!(identify(&mut admin_q).is_success());
    enable(&mut admin_q);
    // The I/O queue authenticates on its own.
    let (mut io_q, dw0) = connect(s.addr, HOSTNQN, 1, cntlid);
    assert_ne!(dw0 & ATR, 0);
    assert_eq!(io_q.read(1, 0, 8, 512).status(), Status::AUTH_REQUIRED);
    assert_eq!(
        io_q.authenticate(HOSTNQN, NQN, &s.host_key, None),
        AuthOutcome::Success {
            controller_proved: false
        }
    );
    let data = pattern(5, 4096);
    assert!(io_q.write(1, 16, &data, 512).status().is_success());
    assert_eq!(io_q.read(1, 16, 8, 512).data, data);
    // Authenticating again (as after a reset) works on a live queue.
    assert_eq!(
        admin_q.authenticate(HOSTNQN, NQN, &s.host_key, None),
        AuthOutcome::Success {
            controller_proved: false
        }
    );
    assert!(identify(&mut admin_q).is_success());
    // A host without a secret connects as before.
    let (mut plain, dw0) = connect(s.addr, PLAIN, 0, 0xFFFF);
    assert_eq!(dw0 & ATR, 0);
    assert!(identify(&mut plain).is_success());
    let ev = reasons(&s);
    assert!(
        ev.contains(&(HOSTNQN.into(), true, "ok, authentication required")),
        "{ev:?}"
    );
    assert!(
        ev.contains(&(HOSTNQN.into(), true, "authenticated")),
        "{ev:?}"
    );
    assert!(ev.contains(&(PLAIN.into(), true, "ok")), "{ev:?}");
}

#[test]
fn a_host_that_asks_hears_the_controller_prove_its_secret() {
    let s = setup(Duration::from_secs(30));
    let (mut q, _) = connect(s.addr, BOTH_WAYS, 0, 0xFFFF);
    assert_eq!(
        q.authenticate(BOTH_WAYS, NQN, &s.both_key, Some(&s.ctrl_key)),
        AuthOutcome::Success {
            controller_proved: true
        }
    );
    assert!(identify(&mut q).is_success());
    // A host holding the wrong controller secret sees the proof fail (and so refuses
    // the controller); the host that has no controller secret configured here is
    // refused when it asks for one.
    let (mut q, _) = connect(s.addr, BOTH_WAYS, 0, 0xFFFF);
    let wrong = DhchapKey::generate(64, Some(Hash::Sha512)).unwrap();
    assert_eq!(
        q.authenticate(BOTH_WAYS, NQN, &s.both_key, Some(&wrong)),
        AuthOutcome::Success {
            controller_proved: false
        }
    );
    let (mut q, _) = connect(s.addr, HOSTNQN, 0, 0xFFFF);
    assert_eq!(
        q.authenticate(HOSTNQN, NQN, &s.host_key, Some(&s.ctrl_key)),
        AuthOutcome::Failure1(1)
    );
    assert!(q.is_closed());
}

#[test]
fn a_wrong_secret_fails_and_closes_only_that_connection() {
    let s = setup(Duration::from_secs(30));
    let (mut good, _) = connect(s.addr, HOSTNQN, 0, 0xFFFF);
    assert!(matches!(
        good.authenticate(HOSTNQN, NQN, &s.host_key, None),
        AuthOutcome::Success { .. }
    ));
    let (mut bad, _) = connect(s.addr, HOSTNQN, 0, 0xFFFF);
    let wrong = DhchapKey::generate(32, Some(Hash::Sha256)).unwrap();
    assert_eq!(
        bad.authenticate(HOSTNQN, NQN, &wrong, None),
        AuthOutcome::Failure1(1)
    );
    assert!(
        bad.is_closed(),
        "a failed authentication ends the connection"
    );
    // Another host's secret is no good either.
    let (mut other, _) = connect(s.addr, HOSTNQN, 0, 0xFFFF);
    assert_eq!(
        other.authenticate(HOSTNQN, NQN, &s.both_key, None),
        AuthOutcome::Failure1(1)
    );
    assert!(
        identify(&mut good).is_success(),
        "the good host is undisturbed"
    );
    let ev = reasons(&s);
    assert!(
        ev.contains(&(
            HOSTNQN.into(),
            false,
            "authentication failed: wrong response (secret)"
        )),
        "{ev:?}"
    );
}

/// Sends `msg` and returns the reason code of the Failure1 the next Receive brings,
/// checking that the connection then closes.
fn failure_after(h: &mut Host, msg: &[u8]) -> u8 {
    assert!(h.auth_send(msg).status().is_success());
    let m = h.auth_receive(4096).data;
    assert_eq!(
        (m[0], m[1], m[6]),
        (0x00, 0xF1, 0x01),
        "Failure1: {:?}",
        &m[..8]
    );
    assert!(h.is_closed());
    m[7]
}

#[test]
fn hostile_exchanges_fail_with_the_right_reason() {
    let s = setup(Duration::from_secs(30));
    let fresh = || connect(s.addr, HOSTNQN, 0, 0xFFFF).0;
    let all_hashes = [1, 2, 3];
    let all_groups = [0, 1, 2, 3, 4, 5];
    // Secure channel concatenation, no usable hash, no NULL group, bad descriptor.
    let mut m = negotiate(1, &all_hashes, &all_groups);
    m[6] = 1;
    assert_eq!(failure_after(&mut fresh(), &m), 3);
    assert_eq!(
        failure_after(&mut fresh(), &negotiate(1, &[9, 17], &all_groups)),
        4
    );
    assert_eq!(
        failure_after(&mut fresh(), &negotiate(1, &all_hashes, &[4, 5])),
        5
    );
    let mut m = negotiate(1, &all_hashes, &all_groups);
    m[10] = 31;
    assert_eq!(failure_after(&mut fresh(), &m), 6);
    assert_eq!(failure_after(&mut fresh(), &m[..40]), 6, "truncated");
    // Out of order: a Reply first, a Success2 out of turn, a Receive first.
    assert_eq!(failure_after(&mut fresh(), &reply(1, &[0; 32], None)), 7);
    let mut q = fresh();
    let m = q.auth_receive(4096).data;
    assert_eq!((m[1], m[7]), (0xF1, 7));
    assert!(q.is_closed());
    // A Reply with the wrong transaction ID, a wrong length, or a DH value.
    let mut q = fresh();
    assert!(
        q.auth_send(&negotiate(1, &all_hashes, &all_groups))
            .status()
            .is_success()
    );
    let c = q.auth_receive(4096).data;
    assert_eq!(
        (c[8], c[6]),
        (1, 32),
        "SHA-256, as configured for this host"
    );
    assert_eq!(failure_after(&mut q, &reply(2, &[0; 32], None)), 6);
    let mut q = fresh();
    q.auth_send(&negotiate(1, &all_hashes, &all_groups));
    q.auth_receive(4096);
    assert_eq!(failure_after(&mut q, &reply(1, &[0; 48], None)), 6);
    let mut q = fresh();
    q.auth_send(&negotiate(1, &all_hashes, &all_groups));
    q.auth_receive(4096);
    let mut r = reply(1, &[0; 32], None);
    r[10] = 4; // a DH value length with the NULL group
    assert_eq!(failure_after(&mut q, &r), 6);
    // The host giving up (Failure2) closes the connection.
    let mut q = fresh();
    let mut f2 = vec![0u8; 8];
    f2[1] = 0xF0;
    assert!(q.auth_send(&f2).status().is_success());
    assert!(q.is_closed());
    // A failed transaction stays failed: a new Negotiate does not buy another guess.
    let mut q = fresh();
    q.auth_send(&negotiate(1, &all_hashes, &all_groups));
    q.auth_receive(4096);
    assert!(q.auth_send(&reply(1, &[0; 32], None)).status().is_success());
    assert_eq!(
        failure_after(&mut q, &negotiate(1, &all_hashes, &all_groups)),
        1
    );
    let ev = reasons(&s);
    let gave_up = "authentication failed: the host gave up (controller secret?)";
    assert!(ev.contains(&(HOSTNQN.into(), false, gave_up)), "{ev:?}");
}

#[test]
fn an_unauthenticated_host_cannot_make_the_target_allocate_or_hold_queues() {
    let s = setup(Duration::from_secs(30));
    // No R2T before authentication: data must come in the capsule, and little of it.
    let (mut q, _) = connect(s.addr, HOSTNQN, 0, 0xFFFF);
    q.in_capsule = 0;
    let msg = negotiate(1, &[1], &[0]);
    let mut sqe = auth_sqe(fctype::AUTH_SEND);
    sqe.set_cdw(11, msg.len() as u32);
    assert_eq!(q.command(sqe, &msg, 0).status(), Status::AUTH_REQUIRED);
    q.in_capsule = 8192;
    let big = vec![0u8; 4097];
    let mut sqe = auth_sqe(fctype::AUTH_SEND);
    sqe.set_cdw(11, big.len() as u32);
    assert_eq!(q.command(sqe, &big, 0).status(), Status::INVALID_FIELD);
    assert!(matches!(
        q.authenticate(HOSTNQN, NQN, &s.host_key, None),
        AuthOutcome::Success { .. }
    ));
    enable(&mut q);
    let cntlid = q.cntlid;
    // An I/O queue that does not authenticate does not hold its queue ID: the real
    // host's queue 1 connects and authenticates beside it.
    let (mut squatter, _) = connect(s.addr, HOSTNQN, 1, cntlid);
    let (mut real, _) = connect(s.addr, HOSTNQN, 1, cntlid);
    assert!(matches!(
        real.authenticate(HOSTNQN, NQN, &s.host_key, None),
        AuthOutcome::Success { .. }
    ));
    assert!(real.read(1, 0, 1, 512).status().is_success());
    // Once queue 1 is taken, another that authenticates for it is closed.
    assert!(matches!(
        squatter.authenticate(HOSTNQN, NQN, &s.host_key, None),
        AuthOutcome::Success { .. }
    ));
    assert!(squatter.is_closed());
    assert!(real.read(1, 0, 1, 512).status().is_success());
    // And a queue ID already registered is refused at Connect, as before.
    let mut h = Host::connect(s.addr, Digests::default());
    let c = h.fabric_connect(1, 31, NQN, HOSTNQN, cntlid, 0, 0);
    assert_eq!(c.status, Status::CONNECT_INVALID_PARAM);
}

#[test]
fn malformed_authentication_commands_get_a_clear_status() {
    let s = setup(Duration::from_secs(30));
    let (mut q, _) = connect(s.addr, HOSTNQN, 0, 0xFFFF);
    let msg = negotiate(1, &[1], &[0]);
    // Another security protocol, or SPSP.
    for (byte, value) in [(43, 0xEA), (41, 2), (42, 0)] {
        let mut sqe = auth_sqe(fctype::AUTH_SEND);
        sqe.set_cdw(11, msg.len() as u32);
        sqe.0[byte] = value;
        assert_eq!(q.command(sqe, &msg, 0).status(), Status::INVALID_FIELD);
    }
    // A transfer length that is not the data's.
    let mut sqe = auth_sqe(fctype::AUTH_SEND);
    sqe.set_cdw(11, msg.len() as u32 + 1);
    assert_eq!(q.command(sqe, &msg, 0).status(), Status::SGL_LENGTH_INVALID);
    // Allocation lengths too small, too large, or not the transfer's.
    for al in [0, 8, 1 << 20] {
        let mut sqe = auth_sqe(fctype::AUTH_RECV);
        sqe.set_cdw(11, al);
        assert_eq!(
            q.command(sqe, &[], al.min(8192)).status(),
            Status::INVALID_FIELD
        );
    }
    let mut sqe = auth_sqe(fctype::AUTH_RECV);
    sqe.set_cdw(11, 4096);
    assert_eq!(
        q.command(sqe, &[], 2048).status(),
        Status::SGL_LENGTH_INVALID
    );
    // None of that broke the transaction.
    assert!(matches!(
        q.authenticate(HOSTNQN, NQN, &s.host_key, None),
        AuthOutcome::Success { .. }
    ));
    // A host that needs no authentication has none to do.
    let (mut plain, _) = connect(s.addr, PLAIN, 0, 0xFFFF);
    assert_eq!(plain.auth_send(&msg).status(), Status::INVALID_FIELD);
}

#[test]
fn a_queue_that_does_not_authenticate_in_time_is_closed() {
    let s = setup(Duration::from_millis(300));
    let (mut idle, _) = connect(s.addr, HOSTNQN, 0, 0xFFFF);
    let (mut done, _) = connect(s.addr, HOSTNQN, 0, 0xFFFF);
    assert!(matches!(
        done.authenticate(HOSTNQN, NQN, &s.host_key, None),
        AuthOutcome::Success { .. }
    ));
    std::thread::sleep(Duration::from_millis(600));
    assert!(idle.is_closed());
    assert!(
        identify(&mut done).is_success(),
        "an authenticated queue stays"
    );
    let ev = reasons(&s);
    let timed_out = "authentication failed: timed out";
    assert!(ev.contains(&(HOSTNQN.into(), false, timed_out)), "{ev:?}");
    // Hosts and their secrets must be allowed hosts.
    let sub = |hosts: HostPolicy| Subsystem {
        nqn: "nqn.2026-11.io.ox:auth2".into(),
        serial: "S".into(),
        model: "M".into(),
        hosts,
        namespaces: vec![],
        listeners: vec![s.addr],
        host_keys: vec![HostKeys {
            hostnqn: HOSTNQN.into(),
            key: s.host_key.clone(),
            ctrl_key: None,
            hash: Hash::Sha256,
            dhgroup: DhGroup::Null,
        }],
    };
    let e = s
        .target
        .add_subsystem(sub(HostPolicy::Only(vec![PLAIN.into()])))
        .unwrap_err();
    assert!(
        e.to_string().contains("has a secret but is not allowed"),
        "{e}"
    );
}

#[test]
fn secrets_are_replaced_for_new_connections_or_not_at_all() {
    let s = setup(Duration::from_secs(30));
    let (mut before, _) = connect(s.addr, HOSTNQN, 0, 0xFFFF);
    assert!(matches!(
        before.authenticate(HOSTNQN, NQN, &s.host_key, None),
        AuthOutcome::Success { .. }
    ));
    let rotated = DhchapKey::generate(32, Some(Hash::Sha256)).unwrap();
    let keys = |hostnqn: &str, key: &DhchapKey| {
        vec![HostKeys {
            hostnqn: hostnqn.into(),
            key: key.clone(),
            ctrl_key: None,
            hash: Hash::Sha256,
            dhgroup: DhGroup::Null,
        }]
    };
    // A secret for a host the subsystem does not allow: refused, nothing changes.
    let e = s
        .target
        .set_host_keys(|_| keys("nqn.2026-11.io.ox:stranger", &rotated))
        .unwrap_err();
    assert!(e.to_string().contains("not allowed"), "{e}");
    let (mut q, _) = connect(s.addr, HOSTNQN, 0, 0xFFFF);
    assert!(matches!(
        q.authenticate(HOSTNQN, NQN, &s.host_key, None),
        AuthOutcome::Success { .. }
    ));
    s.target.set_host_keys(|_| keys(HOSTNQN, &rotated)).unwrap();
    let (mut old, _) = connect(s.addr, HOSTNQN, 0, 0xFFFF);
    assert_eq!(
        old.authenticate(HOSTNQN, NQN, &s.host_key, None),
        AuthOutcome::Failure1(1)
    );
    let (mut new, _) = connect(s.addr, HOSTNQN, 0, 0xFFFF);
    assert!(matches!(
        new.authenticate(HOSTNQN, NQN, &rotated, None),
        AuthOutcome::Success { .. }
    ));
    // BOTH_WAYS lost its secret with the rotation: it now connects without one.
    let (_, dw0) = connect(s.addr, BOTH_WAYS, 0, 0xFFFF);
    assert_eq!(dw0 & ATR, 0);
    // The connection made before keeps working.
    assert!(identify(&mut before).is_success());
}

/// Random commands (every opcode and dword, SGLs of each kind, in-capsule data) on a
/// queue that has not authenticated: each is answered with a status and nothing else
/// (no data, no R2T), and the status is Authentication Required unless the command
/// was malformed before it got that far.
#[test]
fn nothing_passes_before_authentication() {
    use nvmf::cmd::{Cqe, FABRICS, SGL_DATA_BLOCK_OFFSET, SGL_TRANSPORT_DATA_BLOCK};
    use nvmf::pdu::{self, PduType};
    let s = setup(Duration::from_secs(30));
    let (mut q, _) = connect(s.addr, HOSTNQN, 0, 0xFFFF);
    let mut seed = 0xD1B5_4A32_D192_ED03u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let allowed = [
        Status::AUTH_REQUIRED,
        Status::SGL_TYPE_INVALID,
        Status::SGL_OFFSET_INVALID,
        Status::SGL_LENGTH_INVALID,
        Status::INVALID_FIELD,
    ];
    for cid in 1..=400u16 {
        let mut sqe = Sqe::new(0, 0);
        for b in sqe.0.iter_mut() {
            *b = next() as u8;
        }
        if next() % 3 == 0 {
            sqe.0[0] = FABRICS;
        }
        if sqe.0[0] == FABRICS
            && matches!(
                sqe.0[4],
                fctype::AUTH_SEND | fctype::AUTH_RECV | fctype::DISCONNECT
            )
        {
            sqe.0[4] = fctype::PROPERTY_SET;
        }
        sqe.0[2..4].copy_from_slice(&cid.to_le_bytes());
        let data: Vec<u8> = (0..next() % 512).map(|_| next() as u8).collect();
        let in_capsule = !data.is_empty() && next() % 2 == 0;
        if in_capsule {
            sqe.set_sgl(SGL_DATA_BLOCK_OFFSET, 0, data.len() as u32);
        } else {
            sqe.set_sgl(SGL_TRANSPORT_DATA_BLOCK, 0, next() as u32 % (1 << 20));
        }
        let body = if in_capsule { &data[..] } else { &[][..] };
        q.send(&pdu::capsule_cmd(Digests::default(), &sqe.0, body));
        let p = q.recv().expect("an answer");
        assert_eq!(
            PduType::from_u8(p.kind()),
            Some(PduType::CapsuleResp),
            "only a status before authentication (command {:02x?})",
            &sqe.0[..8]
        );
        let cqe = Cqe::decode(&p.bytes[8..24]);
        assert_eq!(cqe.cid, cid);
        assert!(allowed.contains(&cqe.status), "{}", cqe.status);
    }
    // And the queue still authenticates afterwards.
    assert!(matches!(
        q.authenticate(HOSTNQN, NQN, &s.host_key, None),
        AuthOutcome::Success { .. }
    ));
}

#[test]
fn diffie_hellman_augments_the_challenges_when_configured_and_offered() {
    let s = setup(Duration::from_secs(30));
    // Offered (the scripted host offers what Linux does): the configured group.
    let (mut q, _) = connect(s.addr, FFDHE, 0, 0xFFFF);
    assert_eq!(
        q.authenticate(FFDHE, NQN, &s.host_key, Some(&s.ctrl_key)),
        AuthOutcome::Success {
            controller_proved: true
        }
    );
    assert_eq!(q.last_dh_group, DhGroup::Ffdhe2048);
    assert!(identify(&mut q).is_success());
    let (mut q, _) = connect(s.addr, BOTH_WAYS, 0, 0xFFFF);
    assert_eq!(
        q.authenticate(BOTH_WAYS, NQN, &s.both_key, Some(&s.ctrl_key)),
        AuthOutcome::Success {
            controller_proved: true
        }
    );
    assert_eq!(q.last_dh_group, DhGroup::Ffdhe3072);
    // The wrong secret still fails with a group.
    let (mut q, _) = connect(s.addr, FFDHE, 0, 0xFFFF);
    assert_eq!(
        q.authenticate(FFDHE, NQN, &s.both_key, None),
        AuthOutcome::Failure1(1)
    );
    // A host that offers only NULL gets NULL; one that offers only groups not
    // supported here is refused.
    let (mut q, _) = connect(s.addr, FFDHE, 0, 0xFFFF);
    assert!(q.auth_send(&negotiate(1, &[1], &[0])).status().is_success());
    let c = q.auth_receive(4096).data;
    assert_eq!(
        (c[1], c[9], le::u16(&c, 10)),
        (0x01, 0, 0),
        "NULL, no value"
    );
    let (mut q, _) = connect(s.addr, FFDHE, 0, 0xFFFF);
    assert_eq!(failure_after(&mut q, &negotiate(1, &[1], &[4, 5])), 5);
    // A Reply whose DH value is out of range, or of the wrong length, fails.
    for value in [vec![0u8; 256], vec![1u8; 100]] {
        let (mut q, _) = connect(s.addr, FFDHE, 0, 0xFFFF);
        q.auth_send(&negotiate(1, &[1], &[1]));
        let c = q.auth_receive(4096).data;
        assert_eq!((c[9], le::u16(&c, 10)), (1, 256), "ffdhe2048 and its value");
        let r = nvmf::dhchap::reply(1, &[0; 32], None, &value);
        assert_eq!(failure_after(&mut q, &r), 6);
    }
}
