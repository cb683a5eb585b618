//! Controllers: Connect, properties, admin commands, keep-alive.
//!
//! A controller lives on the reactor of its admin queue, which alone changes its state
//! (properties, features, held asynchronous event requests). Its I/O queues, on any
//! reactor, see only [`CtrlShared`]: identity, readiness, the queue map, where the
//! admin queue lives and whether discovery news awaits it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::time::{Duration, Instant};

use reactor::{PollStatus, PollerId};

use crate::auth;
use crate::cmd::{Sqe, Status, admin};
use crate::conn::{Conn, IoQueue, Queue};
use crate::identify::{self, AER_LIMIT, CtrlKind};
use crate::le;
use crate::subsystem::{DISCOVERY_NQN, Namespace, check_nqn};
use crate::target::{ConnectEvent, CtrlShared, QueueRef, TargetShared};

/// A command's outcome: status, result dwords and any data for the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    pub status: Status,
    pub dw0: u32,
    pub dw1: u32,
    pub data: Option<Vec<u8>>,
}

impl From<Status> for Reply {
    fn from(status: Status) -> Self {
        Self {
            status,
            dw0: 0,
            dw1: 0,
            data: None,
        }
    }
}

impl Reply {
    fn ok(dw0: u32) -> Self {
        Self {
            dw0,
            ..Status::SUCCESS.into()
        }
    }

    fn data(data: Vec<u8>) -> Self {
        Self {
            data: Some(data),
            ..Status::SUCCESS.into()
        }
    }

    /// Connect: Invalid Parameters, naming the offending field (IPO) and whether it is
    /// in the command (false) or its data (true).
    fn invalid_param(offset: u16, in_data: bool) -> Self {
        Self {
            dw0: u32::from(offset) | (u32::from(in_data) << 16),
            ..Status::CONNECT_INVALID_PARAM.into()
        }
    }
}

/// Controller state, owned by the admin queue's reactor.
pub(crate) struct Controller {
    pub shared: Arc<CtrlShared>,
    kind: CtrlKind,
    cc: u32,
    csts: u32,
    kato: Duration,
    last_seen: Instant,
    async_config: u32,
    write_cache: bool,
    temp_threshold: u32,
    held_aers: Vec<u16>,
    /// A discovery log change not yet reported (no request was held when it came).
    disc_change_pending: bool,
    /// A discovery log change was reported and the host has not read the log since:
    /// further changes wait for that read, as the specification masks them.
    disc_change_masked: bool,
    ka_poller: Option<PollerId>,
    /// The listener its admin queue came in on (the current discovery subsystem's
    /// address, for a discovery controller).
    listener: std::net::SocketAddr,
}

/// Async Event Configuration bit: discovery log page change notices.
const AEN_DISCOVERY_CHANGE: u32 = 1 << 31;
/// The completion of an asynchronous event request for a discovery log change:
/// type Notice (2), information "discovery log page change" (0xF0), log page 0x70.
const DISCOVERY_CHANGE_EVENT: u32 = 0x2 | 0xF0 << 8 | 0x70 << 16;

/// If the discovery log changed since this controller last looked and it asked for
/// notices, completes its oldest held asynchronous event request, or keeps the notice
/// for the next request. Called when the target's message arrives and before every
/// admin command.
impl Controller {
    /// Forgets the held Asynchronous Event Request with this CID, if there is one
    /// (it will never be completed); whether there was.
    pub(crate) fn retire_held_aer(&mut self, cid: u16) -> bool {
        let found = self.held_aers.iter().position(|&held| held == cid);
        if let Some(i) = found {
            self.held_aers.remove(i);
        }
        found.is_some()
    }
}

pub(crate) fn deliver_discovery_news(ctrl: &Rc<RefCell<Controller>>, conn: &Rc<Conn>) {
    let cid = {
        let mut c = ctrl.borrow_mut();
        if !c.shared.discovery_news.swap(false, Ordering::AcqRel) {
            return;
        }
        if c.kind != CtrlKind::Discovery
            || c.async_config & AEN_DISCOVERY_CHANGE == 0
            || c.disc_change_masked
        {
            return;
        }
        if c.held_aers.is_empty() {
            c.disc_change_pending = true;
            return;
        }
        c.disc_change_masked = true;
        c.held_aers.remove(0)
    };
    conn.complete_held(admin::ASYNC_EVENT, cid, Reply::ok(DISCOVERY_CHANGE_EVENT));
}

/// What a successful Connect sets up on the connection.
pub(crate) struct Connected {
    pub queue: Queue,
    pub sqsize: u16,
    pub sq_flow_off: bool,
    /// The host must authenticate this queue before using it.
    pub auth: Option<auth::Transaction>,
    pub reply: Reply,
}

/// Connect's result bit telling the host to authenticate (ATR).
const AUTH_REQUIRED: u32 = 1 << 17;

/// The host and subsystem NQNs a Connect names, as far as its data holds them.
fn connect_nqns(data: &[u8]) -> (String, String) {
    if data.len() < 1024 {
        return (String::new(), String::new());
    }
    (le::str0(data, 512, 256), le::str0(data, 256, 256))
}

/// Whether a Connect (its `data`) asks for the discovery subsystem.
pub(crate) fn connects_to_discovery(data: &[u8]) -> bool {
    connect_nqns(data).1 == DISCOVERY_NQN
}

/// Tells the observer (the audit log) of a Connect decision.
fn observe(conn: &Conn, hostnqn: &str, subnqn: &str, allowed: bool, reason: &'static str) {
    if let Some(o) = conn.target.observer.get() {
        o(ConnectEvent {
            hostnqn: hostnqn.to_string(),
            subnqn: subnqn.to_string(),
            listener: conn.local,
            peer: conn.peer,
            allowed,
            reason,
        });
    }
}

/// Refuses a Connect before it is examined (`reply`, for `reason`), and says so to
/// the observer.
pub(crate) fn refuse(conn: &Conn, data: &[u8], reason: &'static str, reply: Reply) -> Reply {
    let (hostnqn, subnqn) = connect_nqns(data);
    observe(conn, &hostnqn, &subnqn, false, reason);
    reply
}

/// Handles Connect (`data` is the 1024-byte connect data); every refusal, of an admin
/// or an I/O queue, is told to the observer with its reason.
pub(crate) fn connect(conn: &Rc<Conn>, sqe: &Sqe, data: &[u8]) -> Result<Connected, Reply> {
    decide(conn, sqe, data).map_err(|(reply, reason)| refuse(conn, data, reason, reply))
}

type Refused = (Reply, &'static str);

fn decide(conn: &Rc<Conn>, sqe: &Sqe, data: &[u8]) -> Result<Connected, Refused> {
    let target = &conn.target;
    if data.len() < 1024 {
        return Err((Status::SGL_LENGTH_INVALID.into(), "Connect data too short"));
    }
    if le::u16(&sqe.0, 40) != 0 {
        return Err((
            Status::CONNECT_INCOMPATIBLE_FORMAT.into(),
            "unsupported Connect format",
        ));
    }
    let qid = le::u16(&sqe.0, 42);
    let sqsize = le::u16(&sqe.0, 44);
    let cattr = sqe.0[46];
    let kato_ms = le::u32(&sqe.0, 48);
    let mut hostid = [0u8; 16];
    hostid.copy_from_slice(&data[..16]);
    let cntlid = le::u16(data, 16);
    let subnqn = le::str0(data, 256, 256);
    let hostnqn = le::str0(data, 512, 256);
    // SPDK's tools send no host NQN unless told one; as SPDK's target and Linux
    // nvmet do, that is accepted where any host may connect (it matches no allow-list
    // entry and no secret).
    let anonymous = hostnqn.is_empty();
    if !anonymous && check_nqn(&hostnqn).is_err() {
        return Err((Reply::invalid_param(512, true), "invalid host NQN"));
    }
    let discovery = subnqn == DISCOVERY_NQN;
    let subsystem = if discovery {
        None
    } else {
        let Some(s) = target
            .subsystems()
            .into_iter()
            .find(|s| s.nqn == subnqn && s.listeners.contains(&conn.local))
        else {
            return Err((
                Reply::invalid_param(256, true),
                "no such subsystem on this listener",
            ));
        };
        if anonymous && s.hosts != crate::HostPolicy::Any {
            return Err((
                Status::CONNECT_INVALID_HOST.into(),
                "no host NQN, and the subsystem lets in only named hosts",
            ));
        }
        if !s.hosts.allows(&hostnqn) {
            return Err((Status::CONNECT_INVALID_HOST.into(), "host not allowed"));
        }
        Some(s)
    };
    // A host with a secret for this subsystem authenticates every queue it connects
    // (discovery needs none).
    let auth = subsystem.as_ref().and_then(|s| {
        s.host_keys
            .iter()
            .find(|k| k.hostnqn == hostnqn)
            .map(|k| auth::Transaction::new(Arc::new(k.clone()), &s.nqn))
    });
    let result = |cntlid: u16| {
        let atr = if auth.is_some() { AUTH_REQUIRED } else { 0 };
        Reply::ok(u32::from(cntlid) | atr)
    };
    let sq_flow_off = cattr & 0x04 != 0;
    if qid == 0 {
        let depth = target.limits.admin_queue_depth;
        if sqsize == 0 || sqsize >= depth {
            return Err((Reply::invalid_param(44, false), "invalid admin queue size"));
        }
        if cntlid != 0xFFFF {
            return Err((
                Reply::invalid_param(16, true),
                "admin Connect must ask for a dynamic controller",
            ));
        }
        let shared = target
            .add_ctrl(|id| CtrlShared {
                cntlid: id,
                subsystem: subsystem.clone(),
                hostnqn: hostnqn.clone(),
                hostid,
                ready: AtomicBool::new(false),
                io_queues: AtomicU16::new(0),
                queues: std::sync::Mutex::new(HashMap::new()),
                admin: QueueRef {
                    reactor: conn.reactor().handle().clone(),
                    conn_id: conn.id(),
                },
                discovery_news: AtomicBool::new(false),
            })
            .ok_or((Status::CONNECT_CTRL_BUSY.into(), "no controller ID free"))?;
        let id = shared.cntlid;
        // A subsystem removed while this Connect was deciding must not keep a
        // controller: removal lists the subsystem first, then tears down controllers.
        if let Some(s) = &subsystem
            && !target.subsystems().iter().any(|x| Arc::ptr_eq(x, s))
        {
            target.remove_ctrl(id);
            return Err((Reply::invalid_param(256, true), "subsystem removed"));
        }
        observe(
            conn,
            &hostnqn,
            &subnqn,
            true,
            if auth.is_some() {
                "ok, authentication required"
            } else {
                "ok"
            },
        );
        let ctrl = Rc::new(RefCell::new(Controller {
            shared,
            kind: if discovery {
                CtrlKind::Discovery
            } else {
                CtrlKind::Io
            },
            cc: 0,
            csts: 0,
            kato: Duration::from_millis(u64::from(kato_ms)),
            last_seen: Instant::now(),
            async_config: 0,
            write_cache: true,
            temp_threshold: 0x0157,
            held_aers: Vec::new(),
            disc_change_pending: false,
            disc_change_masked: false,
            ka_poller: None,
            listener: conn.local,
        }));
        arm_keep_alive(&ctrl, conn);
        return Ok(Connected {
            queue: Queue::Admin(ctrl),
            sqsize,
            sq_flow_off,
            reply: result(id),
            auth,
        });
    }
    // An I/O queue of an existing controller.
    let Some(subsystem) = subsystem else {
        return Err((
            Reply::invalid_param(42, false),
            "I/O queue on a discovery controller",
        ));
    };
    let ctrl = target
        .ctrl(cntlid)
        .filter(|c| c.subsystem.as_ref().is_some_and(|s| s.nqn == subsystem.nqn))
        .ok_or((Reply::invalid_param(16, true), "no such controller"))?;
    if ctrl.hostnqn != hostnqn {
        return Err((
            Reply::invalid_param(512, true),
            "host NQN differs from the controller's",
        ));
    }
    if ctrl.hostid != hostid {
        return Err((
            Reply::invalid_param(0, true),
            "host ID differs from the controller's",
        ));
    }
    if !ctrl.ready.load(Ordering::SeqCst) {
        return Err((Status::SEQUENCE_ERROR.into(), "controller not enabled"));
    }
    if qid > ctrl.io_queues.load(Ordering::SeqCst) {
        return Err((
            Reply::invalid_param(42, false),
            "queue ID beyond the I/O queues granted",
        ));
    }
    if sqsize == 0 || sqsize >= target.limits.queue_depth {
        return Err((Reply::invalid_param(44, false), "invalid I/O queue size"));
    }
    {
        let mut queues = ctrl.queues();
        if queues.contains_key(&qid) {
            return Err((Reply::invalid_param(42, false), "queue ID in use"));
        }
        // A queue that must authenticate is registered once it has (the connection
        // does it), so a host without the secret cannot hold the queue ID.
        if auth.is_none() {
            queues.insert(
                qid,
                QueueRef {
                    reactor: conn.reactor().handle().clone(),
                    conn_id: conn.id(),
                },
            );
        }
    }
    let id = ctrl.cntlid;
    Ok(Connected {
        queue: Queue::Io(Rc::new(IoQueue::new(qid, ctrl, subsystem))),
        sqsize,
        sq_flow_off,
        reply: result(id),
        auth,
    })
}

/// Starts the keep-alive check: a controller not heard from within KATO is torn down.
fn arm_keep_alive(ctrl: &Rc<RefCell<Controller>>, conn: &Rc<Conn>) {
    let kato = ctrl.borrow().kato;
    if kato.is_zero() {
        return;
    }
    let weak_conn: Weak<Conn> = Rc::downgrade(conn);
    let weak_ctrl = Rc::downgrade(ctrl);
    let period = Duration::from_millis(u64::from(identify::KAS) * 100).min(kato);
    let id = conn
        .reactor()
        .register_periodic("nvmf-keep-alive", period, move || {
            let (Some(conn), Some(ctrl)) = (weak_conn.upgrade(), weak_ctrl.upgrade()) else {
                return PollStatus::Idle;
            };
            let expired = {
                let c = ctrl.borrow();
                c.last_seen.elapsed() > c.kato + period
            };
            if expired {
                tracing::info!(
                    cntlid = ctrl.borrow().shared.cntlid,
                    host = %ctrl.borrow().shared.hostnqn,
                    "controller missed its keep-alive; tearing it down"
                );
                conn.close();
            }
            PollStatus::Idle
        });
    ctrl.borrow_mut().ka_poller = Some(id);
}

/// Tears a controller down when its admin queue goes away.
pub(crate) fn teardown(ctrl: &Rc<RefCell<Controller>>, target: &TargetShared) {
    let (cntlid, poller) = {
        let mut c = ctrl.borrow_mut();
        c.held_aers.clear();
        (c.shared.cntlid, c.ka_poller.take())
    };
    if let (Some(p), Some(r)) = (poller, reactor::current()) {
        r.unregister_poller(p);
    }
    target.remove_ctrl(cntlid);
}

const CAP: u32 = 0x00;
const VS: u32 = 0x08;
const CC: u32 = 0x14;
const CSTS: u32 = 0x1C;
const AQA: u32 = 0x24;
const ASQ: u32 = 0x28;
const ACQ: u32 = 0x30;

/// Property Get / Property Set.
pub(crate) fn property(ctrl: &Rc<RefCell<Controller>>, target: &TargetShared, sqe: &Sqe) -> Reply {
    let eight = sqe.0[40] & 1 != 0;
    let offset = le::u32(&sqe.0, 44);
    let mut c = ctrl.borrow_mut();
    c.last_seen = Instant::now();
    if sqe.fctype() == crate::cmd::fctype::PROPERTY_GET {
        let value: u64 = match offset {
            CAP => {
                let depth = match c.kind {
                    CtrlKind::Io => target.limits.queue_depth,
                    CtrlKind::Discovery => target.limits.admin_queue_depth,
                };
                u64::from(depth - 1) // MQES
                    | 1 << 16 // CQR
                    | 15 << 24 // TO: 7.5 s
                    | 1 << 37 // CSS: NVM command set
                // MPSMIN = MPSMAX = 0 (4 KiB)
            }
            VS => u64::from(identify::VERSION),
            CC => u64::from(c.cc),
            CSTS => u64::from(c.csts),
            AQA | ASQ | ACQ => 0,
            _ => return Status::INVALID_FIELD.into(),
        };
        if offset == CAP && !eight {
            return Status::INVALID_FIELD.into();
        }
        return Reply {
            dw0: value as u32,
            dw1: (value >> 32) as u32,
            ..Status::SUCCESS.into()
        };
    }
    let value = le::u64(&sqe.0, 48);
    match offset {
        CC => {
            let new = value as u32;
            let was_enabled = c.cc & 1 != 0;
            let enable = new & 1 != 0;
            c.cc = new;
            if enable && !was_enabled {
                let iosqes = (new >> 16) & 0xF;
                let iocqes = (new >> 20) & 0xF;
                if c.kind == CtrlKind::Io && (iosqes != 6 || iocqes != 4) {
                    c.csts |= 1 << 1; // CFS
                } else {
                    c.csts = 1; // RDY
                    c.shared.ready.store(true, Ordering::SeqCst);
                }
            } else if !enable && was_enabled {
                // Controller reset: its I/O queues go away, the admin queue stays.
                c.shared.ready.store(false, Ordering::SeqCst);
                c.shared.close_io_queues();
                c.csts = 0;
                // Features and events start over (the host sets them again).
                c.held_aers.clear();
                c.async_config = 0;
                c.disc_change_pending = false;
                c.disc_change_masked = false;
            }
            if (new >> 14) & 0x3 != 0 {
                // Shutdown notification: nothing volatile to lose; report complete.
                c.shared.ready.store(false, Ordering::SeqCst);
                c.csts = (c.csts & !(0x3 << 2)) | (0x2 << 2);
            }
            Status::SUCCESS.into()
        }
        AQA | ASQ | ACQ => Status::SUCCESS.into(),
        _ => Status::INVALID_FIELD.into(),
    }
}

/// Handles an admin command. `None` means the command is held (an asynchronous event
/// request) and completes later.
pub(crate) fn admin(
    ctrl: &Rc<RefCell<Controller>>,
    conn: &Rc<Conn>,
    sqe: &Sqe,
    data: Option<&[u8]>,
    xfer: u32,
) -> Option<Reply> {
    let _ = data;
    let mut c = ctrl.borrow_mut();
    c.last_seen = Instant::now();
    let target = &conn.target;
    let reply = match sqe.opcode() {
        admin::IDENTIFY => identify_cmd(&c, target, sqe),
        admin::GET_LOG_PAGE => log_page(&mut c, target, sqe, xfer),
        admin::SET_FEATURES => set_features(&mut c, target, sqe),
        admin::GET_FEATURES => get_features(&c, sqe),
        admin::KEEP_ALIVE => Status::SUCCESS.into(),
        admin::ABORT => Reply::ok(1), // command not aborted
        admin::ASYNC_EVENT => {
            if c.disc_change_pending && c.async_config & AEN_DISCOVERY_CHANGE != 0 {
                c.disc_change_pending = false;
                c.disc_change_masked = true;
                Reply::ok(DISCOVERY_CHANGE_EVENT)
            } else if c.held_aers.len() >= AER_LIMIT {
                Status::AER_LIMIT_EXCEEDED.into()
            } else {
                c.held_aers.push(sqe.cid());
                return None;
            }
        }
        _ => Status::INVALID_OPCODE.into(),
    };
    Some(reply)
}

fn identify_cmd(c: &Controller, target: &TargetShared, sqe: &Sqe) -> Reply {
    let cns = sqe.cdw(10) & 0xFF;
    let csi = sqe.cdw(11) >> 24;
    let nsid = sqe.nsid();
    let subsystem = c.shared.subsystem.as_deref();
    if cns == 0x01 {
        return Reply::data(identify::controller(
            c.kind,
            subsystem,
            c.shared.cntlid,
            &target.limits,
        ));
    }
    let Some(s) = subsystem else {
        return Status::INVALID_FIELD.into();
    };
    let active = s.namespace(nsid);
    let in_range = nsid >= 1 && nsid <= s.max_nsid();
    match cns {
        0x00 => match active {
            Some(ns) => Reply::data(identify::namespace(ns)),
            None if in_range || nsid == u32::MAX => Reply::data(vec![0; 4096]),
            None => Status::INVALID_NAMESPACE.into(),
        },
        0x02 => {
            if nsid >= 0xFFFF_FFFE {
                Status::INVALID_NAMESPACE.into()
            } else {
                Reply::data(identify::active_namespaces(s, nsid))
            }
        }
        0x03 => match active {
            Some(ns) => Reply::data(identify::descriptors(ns)),
            None => Status::INVALID_NAMESPACE.into(),
        },
        0x05 if csi == 0 => match active {
            Some(_) => Reply::data(vec![0; 4096]),
            None => Status::INVALID_NAMESPACE.into(),
        },
        0x06 if csi == 0 => Reply::data(vec![0; 4096]),
        0x08 => match active {
            Some(ns) => Reply::data(identify::namespace_independent(Some(ns))),
            None if in_range => Reply::data(identify::namespace_independent(None)),
            None => Status::INVALID_NAMESPACE.into(),
        },
        _ => Status::INVALID_FIELD.into(),
    }
}

fn log_page(c: &mut Controller, target: &TargetShared, sqe: &Sqe, xfer: u32) -> Reply {
    let cdw10 = sqe.cdw(10);
    let lid = (cdw10 & 0xFF) as u8;
    let retain = cdw10 & (1 << 15) != 0;
    let numd = (u64::from(sqe.cdw(11) & 0xFFFF) << 16 | u64::from(cdw10 >> 16)) + 1;
    let len = (numd * 4).min(u64::from(xfer)) as usize;
    let offset = u64::from(sqe.cdw(12)) | u64::from(sqe.cdw(13)) << 32;
    if offset % 4 != 0 {
        return Status::INVALID_FIELD.into();
    }
    let subsystem = c.shared.subsystem.as_deref();
    let page = match (lid, c.kind) {
        (0x00, kind) => identify::supported_logs(kind),
        (0x01, _) => vec![0u8; 64],
        (0x02, _) => {
            let all: Vec<&Namespace> = subsystem.iter().flat_map(|s| &s.namespaces).collect();
            let nsid = sqe.nsid();
            if nsid == 0 || nsid == u32::MAX {
                identify::smart_log(&target.health, &all)
            } else {
                match all.iter().find(|ns| ns.nsid == nsid) {
                    Some(ns) => identify::smart_log(&target.health, &[ns]),
                    None => return Status::INVALID_NAMESPACE.into(),
                }
            }
        }
        (0x03, _) => identify::firmware_log(),
        (0x04, CtrlKind::Io) => vec![0u8; 4096],
        (0x05, CtrlKind::Io) => identify::command_effects(),
        (0x70, CtrlKind::Discovery) => identify::discovery_log(
            target.genctr.load(Ordering::Relaxed),
            &target.discovery_entries(&c.shared.hostnqn, c.listener),
        ),
        _ => return Status::INVALID_LOG_PAGE.into(),
    };
    if offset > page.len() as u64 {
        return Status::INVALID_FIELD.into();
    }
    let start = offset as usize;
    let mut out = page[start..page.len().min(start + len)].to_vec();
    out.resize(len, 0);
    if lid == 0x70 && !retain {
        // The host has read the discovery log without Retain Asynchronous Event: a
        // change it has seen is no longer news, and notices of the next are unmasked.
        c.disc_change_pending = false;
        c.disc_change_masked = false;
    }
    Reply::data(out)
}

const FEAT_ARBITRATION: u32 = 0x01;
const FEAT_POWER: u32 = 0x02;
const FEAT_TEMP: u32 = 0x04;
const FEAT_ERROR_RECOVERY: u32 = 0x05;
const FEAT_WRITE_CACHE: u32 = 0x06;
const FEAT_NUM_QUEUES: u32 = 0x07;
const FEAT_ASYNC_EVENT: u32 = 0x0B;
const FEAT_KATO: u32 = 0x0F;

fn set_features(c: &mut Controller, target: &TargetShared, sqe: &Sqe) -> Reply {
    let cdw10 = sqe.cdw(10);
    if cdw10 & (1 << 31) != 0 {
        return Status::FEATURE_NOT_SAVEABLE.into();
    }
    let value = sqe.cdw(11);
    let io = c.kind == CtrlKind::Io;
    match cdw10 & 0xFF {
        FEAT_NUM_QUEUES if io => {
            let (nsqr, ncqr) = (value & 0xFFFF, value >> 16);
            if nsqr == 0xFFFF || ncqr == 0xFFFF {
                return Status::INVALID_FIELD.into();
            }
            let granted = (nsqr.max(ncqr) + 1).min(u32::from(target.limits.max_io_queues));
            c.shared.io_queues.store(granted as u16, Ordering::SeqCst);
            Reply::ok((granted - 1) | (granted - 1) << 16)
        }
        FEAT_ASYNC_EVENT => {
            c.async_config = value;
            Status::SUCCESS.into()
        }
        FEAT_KATO => {
            c.kato = Duration::from_millis(u64::from(value));
            Status::SUCCESS.into()
        }
        FEAT_WRITE_CACHE if io => {
            c.write_cache = value & 1 != 0;
            Status::SUCCESS.into()
        }
        FEAT_TEMP if io => {
            c.temp_threshold = value & 0xFFFF;
            Status::SUCCESS.into()
        }
        FEAT_ARBITRATION | FEAT_POWER | FEAT_ERROR_RECOVERY if io => Status::SUCCESS.into(),
        _ => Status::INVALID_FIELD.into(),
    }
}

fn get_features(c: &Controller, sqe: &Sqe) -> Reply {
    let io = c.kind == CtrlKind::Io;
    let value = match sqe.cdw(10) & 0xFF {
        FEAT_NUM_QUEUES if io => {
            let n = u32::from(c.shared.io_queues.load(Ordering::SeqCst).max(1)) - 1;
            n | n << 16
        }
        FEAT_ASYNC_EVENT => c.async_config,
        FEAT_KATO => c.kato.as_millis() as u32,
        FEAT_WRITE_CACHE if io => u32::from(c.write_cache),
        FEAT_TEMP if io => c.temp_threshold,
        FEAT_ARBITRATION | FEAT_POWER | FEAT_ERROR_RECOVERY if io => 0,
        _ => return Status::INVALID_FIELD.into(),
    };
    Reply::ok(value)
}
