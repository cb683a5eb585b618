//! One NVMe/TCP connection (a queue pair) on the reactor that owns it.
//!
//! Socket I/O goes through the reactor's io_uring: one Recv is always in flight into
//! the connection's receive buffer, and one SendMsg at a time drains its send queue
//! (owned segments, so the kernel's view of them stays valid). Replies are queued, and
//! the send starts once per reactor pass ([`Reactor::before_submit`]), so everything a
//! pass produced leaves together (up to 64 segments, taken while under 1 MiB).
//! Received bytes are cut into PDUs and handled in order; a framing error gets a
//! C2HTermReq and the connection closes, without disturbing any other connection. A
//! queue whose host must authenticate (DH-HMAC-CHAP, [`crate::auth`]) takes nothing
//! but authentication commands until it has.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bdev::{BdevError, Channel, IoBuf};
use reactor::io_uring::{opcode, types};
use reactor::{PollStatus, PollerId, Reactor, current};

use crate::admission;
use crate::auth;
use crate::bufpool;
use crate::cmd::{
    Cqe, Direction, FABRICS, SGL_DATA_BLOCK_OFFSET, SGL_TRANSPORT_DATA_BLOCK, Sqe, Status, fctype,
};
use crate::ctrlr::{self, Controller, Reply};
use crate::framing::{FrameCtx, HostPdu, next_host_pdu};
use crate::io;
use crate::pdu::{
    self, CAPSULE_CMD_HLEN, CH_LEN, DataHeader, Digests, FLAG_DATA_LAST, FLAG_DATA_SUCCESS, Fatal,
    Fes, IC_LEN, IcReq, IcResp, PduType, SHORT_HLEN,
};
use crate::subsystem::{ADMIN_IN_CAPSULE, C2hSuccess, Namespace, SocketIo, Subsystem};
use crate::target::{CtrlShared, Established, QueueRef, TargetShared};

/// Largest PDU accepted before a queue's Connect succeeds: an ICReq, or a Connect (or
/// other admin/fabrics) capsule with in-capsule data. A connection starts with a receive
/// buffer for this and grows it to its full size once connected, so pending
/// connections — which a peer can open by the hundred — hold little memory.
const PRE_CONNECT_PDU: usize = CAPSULE_CMD_HLEN + 8 + ADMIN_IN_CAPSULE as usize;

/// Receive buffer for PDUs of up to `max_pdu` bytes: room for two, so one arriving
/// behind another is read without compacting first.
fn rx_size(max_pdu: usize) -> usize {
    (2 * max_pdu).max(16 << 10)
}

/// Segments handed to one SendMsg at most.
const MAX_IOV: usize = 64;
/// Bytes after which a SendMsg takes no further segment: the kernel copies a send in
/// one go, and about 1 MiB (~0.2 ms) keeps that from stalling the reactor's other
/// connections when 32 large reads complete in one pass.
const MAX_SEND: usize = 1 << 20;
/// Unsent reply bytes beyond which the connection stops reading new commands, so a
/// host that does not read its socket cannot make the target queue without limit.
const TX_CAP: usize = 8 << 20;

thread_local! {
    /// Connections on this reactor, by ID, so controller teardown can reach them.
    static CONNS: RefCell<HashMap<u64, Weak<Conn>>> = RefCell::new(HashMap::new());
}

/// Closes the connection `id` if it lives on this reactor.
pub(crate) fn close_by_id(id: u64) {
    let conn = CONNS.with(|c| c.borrow().get(&id).and_then(Weak::upgrade));
    if let Some(conn) = conn {
        conn.close();
    }
}

/// Tells the admin queue `id`, if it lives on this reactor, that discovery news (a
/// log change) awaits it.
pub(crate) fn discovery_news(id: u64) {
    let conn = CONNS.with(|c| c.borrow().get(&id).and_then(Weak::upgrade));
    let Some(conn) = conn else { return };
    let ctrl = match &conn.st.borrow().queue {
        Some(Queue::Admin(c)) => Rc::clone(c),
        _ => return,
    };
    ctrlr::deliver_discovery_news(&ctrl, &conn);
}

/// Registers a stop hook on this reactor that closes every connection on it.
pub(crate) fn close_all_on_stop() {
    if let Some(r) = current() {
        r.on_stop(|| {
            let conns: Vec<Rc<Conn>> =
                CONNS.with(|c| c.borrow().values().filter_map(Weak::upgrade).collect());
            for c in conns {
                c.close();
            }
        });
    }
}

/// Data a reply carries back to the host.
pub(crate) enum Payload {
    Vec(Vec<u8>),
    Buf(IoBuf),
}

impl Payload {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Vec(v) => v,
            Self::Buf(b) => b,
        }
    }
}

/// One piece of the send queue, with how much of it has been sent.
struct Seg {
    data: Payload,
    len: usize,
    sent: usize,
}

/// How many of the queued segments one send takes: up to [`MAX_IOV`], adding them
/// while under [`MAX_SEND`] bytes (so a large read's header and data leave together).
fn batch_len(tx: &VecDeque<Seg>) -> usize {
    let mut bytes = 0;
    tx.iter()
        .take(MAX_IOV)
        .take_while(|s| {
            let under = bytes < MAX_SEND;
            bytes += s.len - s.sent;
            under
        })
        .count()
}

impl Seg {
    /// The unsent part, for a sendmsg: it points into the segment, which must stay
    /// where it is (and be kept) until the kernel is done with it.
    fn iovec(&self) -> libc::iovec {
        let unsent = &self.data.bytes()[self.sent..self.len];
        libc::iovec {
            iov_base: unsent.as_ptr() as *mut libc::c_void,
            iov_len: unsent.len(),
        }
    }

    /// Hands a sent buffer back to this reactor's pools.
    fn recycle(self) {
        match self.data {
            Payload::Buf(b) => bufpool::give(b),
            Payload::Vec(v) => bufpool::give_small(v),
        }
    }

    fn vec(v: Vec<u8>) -> Self {
        let len = v.len();
        Self {
            data: Payload::Vec(v),
            len,
            sent: 0,
        }
    }
}

/// What this connection is after Connect.
pub(crate) enum Queue {
    /// The admin queue; it owns the controller.
    Admin(Rc<RefCell<Controller>>),
    /// An I/O queue of a controller that lives elsewhere.
    Io(Rc<IoQueue>),
}

/// What an I/O queue's commands need, at hand: cloning the `Rc` per command costs no
/// atomic operation, and each namespace's bdev channel is looked up once.
pub(crate) struct IoQueue {
    pub(crate) qid: u16,
    pub(crate) ctrl: Arc<CtrlShared>,
    pub(crate) subsystem: Arc<Subsystem>,
    /// This reactor's channel to each namespace's bdev, by NSID, opened on first use.
    channels: RefCell<Vec<(u32, Rc<Channel>)>>,
}

impl IoQueue {
    pub(crate) fn new(qid: u16, ctrl: Arc<CtrlShared>, subsystem: Arc<Subsystem>) -> Self {
        Self {
            qid,
            ctrl,
            subsystem,
            channels: RefCell::default(),
        }
    }

    /// This reactor's channel to `ns`'s bdev.
    pub(crate) fn channel(&self, ns: &Namespace) -> Result<Rc<Channel>, BdevError> {
        if let Some((_, c)) = self.channels.borrow().iter().find(|(n, _)| *n == ns.nsid) {
            return Ok(Rc::clone(c));
        }
        let channel = ns.bdev.channel()?;
        self.channels
            .borrow_mut()
            .push((ns.nsid, Rc::clone(&channel)));
        Ok(channel)
    }
}

/// A write waiting for its data (R2T sent).
struct PendingWrite {
    sqe: Sqe,
    buf: IoBuf,
    received: u32,
    failed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitIcReq,
    Ready,
    /// A TermReq is queued; close once it is sent.
    Terminating,
    Closed,
}

struct State {
    phase: Phase,
    digests: Digests,
    /// Host PDU data alignment in bytes.
    hpda: usize,
    /// Receive buffer; `None` while a Recv owns it.
    rx: Option<Vec<u8>>,
    rx_start: usize,
    rx_end: usize,
    tx: VecDeque<Seg>,
    sending: bool,
    /// A send is queued to run just before the reactor submits this pass's I/O.
    send_queued: bool,
    /// The last send's vectors, for the next.
    spare_send: Option<Box<SendOp>>,
    /// Bytes handed to the SendMsg in flight.
    tx_inflight: usize,
    /// Receiving is paused until the send backlog drains.
    rx_paused: bool,
    queue: Option<Queue>,
    /// The host must authenticate (DH-HMAC-CHAP) before this queue is used.
    auth: Option<auth::Transaction>,
    sqsize: u16,
    sqhd: u16,
    sq_flow_off: bool,
    cids: CidSet,
    writes: HashMap<u16, PendingWrite>,
    free_ttags: Vec<u16>,
    /// Counted in the target's established connections (Connect succeeded): among
    /// the discovery controllers' or the rest.
    counted: Option<Established>,
    /// The pending slot held until Connect succeeds.
    pending: Option<admission::Ticket>,
}

/// A connection. Shared (`Rc`) by its in-flight socket and block operations.
pub(crate) struct Conn {
    id: u64,
    fd: OwnedFd,
    pub(crate) target: Arc<TargetShared>,
    pub(crate) local: SocketAddr,
    /// The host's address.
    pub(crate) peer: SocketAddr,
    reactor: Rc<Reactor>,
    st: RefCell<State>,
    max_pdu: usize,
    /// Poll mode: the poller that does this connection's socket I/O.
    poller: Cell<Option<PollerId>>,
}

impl Conn {
    /// Takes over an accepted socket on the current reactor; it holds `ticket` until
    /// its Connect succeeds, and must send its ICReq and then its Connect in time.
    pub(crate) fn start(
        target: Arc<TargetShared>,
        fd: OwnedFd,
        local: SocketAddr,
        peer: SocketAddr,
        ticket: admission::Ticket,
    ) {
        let Some(reactor) = current() else { return };
        set_nodelay(&fd);
        let l = &target.limits;
        let max_pdu = (CAPSULE_CMD_HLEN + 8 + l.in_capsule.max(ADMIN_IN_CAPSULE) as usize)
            .max(SHORT_HLEN + 8 + l.max_h2c_data as usize)
            .max(IC_LEN);
        let conn = Rc::new(Conn {
            id: target.next_conn_id(),
            fd,
            local,
            peer,
            reactor,
            max_pdu,
            poller: Cell::new(None),
            st: RefCell::new(State {
                phase: Phase::AwaitIcReq,
                digests: Digests::default(),
                hpda: 4,
                rx: Some(vec![0u8; rx_size(PRE_CONNECT_PDU)]),
                rx_start: 0,
                rx_end: 0,
                tx: VecDeque::new(),
                sending: false,
                send_queued: false,
                spare_send: None,
                tx_inflight: 0,
                rx_paused: false,
                queue: None,
                auth: None,
                sqsize: 0,
                sqhd: 0,
                sq_flow_off: false,
                cids: CidSet::default(),
                writes: HashMap::new(),
                free_ttags: Vec::new(),
                counted: None,
                pending: Some(ticket),
            }),
            target,
        });
        conn.close_if_still(
            Phase::AwaitIcReq,
            conn.target.limits.icreq_timeout,
            "no ICReq",
        );
        CONNS.with(|c| c.borrow_mut().insert(conn.id, Rc::downgrade(&conn)));
        if conn.target.socket_io == SocketIo::Poll {
            // The poller owns the connection until `close` unregisters it.
            let this = Rc::clone(&conn);
            let id = conn.reactor.register_poller("nvmf-socket", move || {
                PollStatus::from_work(this.poll_socket())
            });
            conn.poller.set(Some(id));
        }
        conn.recv();
    }

    /// Counts this connection among the target's established ones of `kind`, if
    /// there is room (its Connect is being decided); false: they are full.
    fn take_established_slot(&self, kind: Established) -> bool {
        let mut st = self.st.borrow_mut();
        assert!(st.counted.is_none(), "a connection counted twice");
        let (count, limit) = self.target.established(kind);
        if count.fetch_add(1, Ordering::SeqCst) >= limit {
            count.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        st.counted = Some(kind);
        true
    }

    /// Gives the established slot back (its Connect failed, or the connection closed).
    fn release_established_slot(&self) {
        let kind = self.st.borrow_mut().counted.take();
        let Some(kind) = kind else {
            unreachable!("an established slot given back that was never taken");
        };
        self.target
            .established(kind)
            .0
            .fetch_sub(1, Ordering::SeqCst);
    }

    /// Closes the connection after `after` unless it has left `phase` (AwaitIcReq) or,
    /// for Ready, completed its Connect by then: a peer that never gets that far
    /// cannot hold a socket and a pending slot.
    fn close_if_still(
        self: &Rc<Self>,
        phase: Phase,
        after: std::time::Duration,
        what: &'static str,
    ) {
        let weak = Rc::downgrade(self);
        self.reactor.after(after, move || {
            let Some(c) = weak.upgrade() else { return };
            let stuck = {
                let st = c.st.borrow();
                st.phase == phase && st.queue.is_none()
            };
            if stuck {
                c.target.timed_out(c.local, c.peer, what);
                c.close();
            }
        });
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn reactor(&self) -> &Rc<Reactor> {
        &self.reactor
    }

    /// Closes the connection: the socket is shut down (in-flight socket operations
    /// complete with errors and drop their references) and, for an admin queue, the
    /// controller and its I/O queues are torn down.
    pub(crate) fn close(self: &Rc<Self>) {
        let (queue, counted) = {
            let mut st = self.st.borrow_mut();
            if st.phase == Phase::Closed {
                return;
            }
            st.phase = Phase::Closed;
            st.tx.clear();
            st.writes.clear();
            // A pending slot goes back with the ticket.
            st.pending = None;
            (st.queue.take(), st.counted.is_some())
        };
        // SAFETY: shutdown on a descriptor we own; it stays open until `self` drops.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
        if counted {
            self.release_established_slot();
        }
        match queue {
            Some(Queue::Admin(ctrl)) => ctrlr::teardown(&ctrl, &self.target),
            Some(Queue::Io(q)) => {
                let mut queues = q.ctrl.queues();
                if queues.get(&q.qid).is_some_and(|r| r.conn_id == self.id) {
                    queues.remove(&q.qid);
                }
            }
            None => {}
        }
        CONNS.with(|c| c.borrow_mut().remove(&self.id));
        if let Some(id) = self.poller.take() {
            self.reactor.unregister_poller(id);
        }
    }

    // ---------------------------------------------------------------- receive side

    /// The largest PDU this connection accepts now: small until its Connect succeeds.
    fn max_pdu_now(&self, st: &State) -> usize {
        if st.queue.is_some() {
            self.max_pdu
        } else {
            PRE_CONNECT_PDU.min(self.max_pdu)
        }
    }

    /// Takes the receive buffer (compacted, and grown once connected) and the offset to
    /// receive at; `None` while closed, while a Recv owns it, or while the send backlog
    /// is over [`TX_CAP`].
    fn take_rx(&self) -> Option<(Vec<u8>, usize)> {
        let mut st = self.st.borrow_mut();
        if st.phase == Phase::Closed {
            return None;
        }
        let backlog: usize = st.tx.iter().map(|s| s.len - s.sent).sum::<usize>() + st.tx_inflight;
        if backlog > TX_CAP {
            st.rx_paused = true;
            return None;
        }
        let mut buf = st.rx.take()?;
        let max_pdu = self.max_pdu_now(&st);
        if buf.len() < rx_size(max_pdu) {
            // Connected: from now on PDUs may be as large as the limits allow.
            buf.resize(rx_size(max_pdu), 0);
        }
        // Compact so that a whole PDU of up to `max_pdu` bytes fits after `rx_start`.
        if st.rx_start > 0 && buf.len() - st.rx_start < max_pdu + CH_LEN {
            let (s, e) = (st.rx_start, st.rx_end);
            buf.copy_within(s..e, 0);
            st.rx_start = 0;
            st.rx_end = e - s;
        }
        Some((buf, st.rx_end))
    }

    /// Poll mode: one non-blocking receive and one send. Returns whether bytes moved.
    fn poll_socket(self: &Rc<Self>) -> bool {
        let mut work = false;
        if let Some((mut buf, end)) = self.take_rx() {
            let spare = &mut buf[end..];
            // SAFETY: recv writes at most `spare.len()` bytes into memory we own.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    spare.as_mut_ptr().cast(),
                    spare.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            if n < 0 && (errno == libc::EAGAIN || errno == libc::EINTR) {
                self.st.borrow_mut().rx = Some(buf);
            } else {
                work = true;
                self.received(buf, if n < 0 { -errno } else { n as i32 });
            }
        }
        work | self.send_now()
    }

    /// Poll mode: sends what is queued with one non-blocking sendmsg.
    fn send_now(self: &Rc<Self>) -> bool {
        let sent = {
            let st = self.st.borrow();
            if st.tx.is_empty() || st.phase == Phase::Closed {
                return false;
            }
            let n = batch_len(&st.tx);
            let mut iov: Vec<libc::iovec> = st.tx.iter().take(n).map(Seg::iovec).collect();
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = iov.len();
            // SAFETY: the iovecs point into segments borrowed for the whole call.
            unsafe {
                libc::sendmsg(
                    self.fd.as_raw_fd(),
                    &msg,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            }
        };
        if sent < 0 {
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            if errno != libc::EAGAIN && errno != libc::EINTR {
                self.close();
            }
            return false;
        }
        {
            let mut st = self.st.borrow_mut();
            let mut left = sent as usize;
            while let Some(front) = st.tx.front_mut() {
                let remaining = front.len - front.sent;
                if left >= remaining {
                    left -= remaining;
                    if let Some(seg) = st.tx.pop_front() {
                        seg.recycle();
                    }
                } else {
                    front.sent += left;
                    break;
                }
            }
        }
        self.maybe_finish_terminating();
        true
    }

    fn recv(self: &Rc<Self>) {
        if self.poller.get().is_some() {
            return;
        }
        let Some((mut buf, end)) = self.take_rx() else {
            return;
        };
        let spare = buf.len() - end;
        let ptr = buf[end..].as_mut_ptr();
        let entry = opcode::Recv::new(types::Fd(self.fd.as_raw_fd()), ptr, spare as u32).build();
        let this = Rc::clone(self);
        // Late: the replies this pass queues leave before the receive, which on a
        // quiet socket arms a poll inside the submit (QD 1 latency).
        // SAFETY: the buffer is moved into the completion closure, so it outlives the
        // operation and nothing else touches it meanwhile; moving a Vec leaves its heap
        // allocation (where `ptr` points) in place.
        unsafe {
            self.reactor
                .submit_late(entry, Box::new(move |res| this.received(buf, res)))
        };
    }

    fn received(self: &Rc<Self>, buf: Vec<u8>, res: i32) {
        if res <= 0 {
            // EOF, reset, or cancellation at shutdown.
            self.close();
            return;
        }
        {
            let mut st = self.st.borrow_mut();
            st.rx_end += res as usize;
            st.rx = Some(buf);
        }
        self.process_rx();
        self.recv();
    }

    /// Handles every complete PDU in the receive buffer.
    fn process_rx(self: &Rc<Self>) {
        loop {
            let (buf, start, end) = {
                let mut st = self.st.borrow_mut();
                if !matches!(st.phase, Phase::AwaitIcReq | Phase::Ready) {
                    return;
                }
                let Some(buf) = st.rx.take() else { return };
                (buf, st.rx_start, st.rx_end)
            };
            let avail = &buf[start..end];
            let consumed = match self.next_pdu(avail) {
                Ok(Some(n)) => n,
                Ok(None) => 0,
                Err(fatal) => {
                    // Echo the offending header (a fatal error implies at least a
                    // common header's worth of bytes).
                    let hlen = usize::from(avail.get(2).copied().unwrap_or(0));
                    let echo = avail[..hlen.clamp(CH_LEN, 152).min(avail.len())].to_vec();
                    self.st.borrow_mut().rx = Some(buf);
                    self.terminate(fatal, &echo);
                    return;
                }
            };
            let mut st = self.st.borrow_mut();
            st.rx = Some(buf);
            if consumed == 0 {
                if st.rx_start == st.rx_end {
                    st.rx_start = 0;
                    st.rx_end = 0;
                }
                return;
            }
            st.rx_start += consumed;
        }
    }

    /// Handles the PDU at the start of `avail` if it is complete; returns its length.
    fn next_pdu(self: &Rc<Self>, avail: &[u8]) -> Result<Option<usize>, Fatal> {
        let ctx = {
            let st = self.st.borrow();
            FrameCtx {
                negotiated: st.phase != Phase::AwaitIcReq,
                digests: st.digests,
                max_pdu: self.max_pdu_now(&st),
                max_h2c_data: self.target.limits.max_h2c_data,
            }
        };
        let Some((pdu, len)) = next_host_pdu(avail, &ctx)? else {
            return Ok(None);
        };
        match pdu {
            HostPdu::IcReq(req) => self.on_icreq(req),
            HostPdu::Capsule { sqe, data, data_ok } => {
                if data_ok {
                    self.command(sqe, data);
                } else {
                    // Data digest error: the command fails, the connection survives.
                    // (A CID already in use keeps its command: answer without freeing it.)
                    let conflict = self.st.borrow().cids.contains(sqe.cid());
                    if !conflict && self.admit(&sqe) {
                        self.reply(&sqe, Status::TRANSIENT_TRANSPORT.into(), None, 0);
                    } else {
                        self.send_resp(Cqe::new(sqe.cid(), Status::CID_CONFLICT));
                    }
                }
            }
            HostPdu::H2CData {
                header,
                data,
                data_ok,
                ..
            } => self.on_h2c_data(header, data, data_ok)?,
            HostPdu::TermReq => self.close(),
        }
        Ok(Some(len))
    }

    fn on_icreq(self: &Rc<Self>, req: IcReq) {
        let digests = Digests {
            header: req.hdgst,
            data: req.ddgst,
        };
        {
            let mut st = self.st.borrow_mut();
            st.digests = digests;
            st.hpda = (usize::from(req.hpda) + 1) * 4;
            st.phase = Phase::Ready;
        }
        self.close_if_still(
            Phase::Ready,
            self.target.limits.connect_timeout,
            "no Connect",
        );
        let resp = IcResp {
            pfv: 0,
            cpda: 0,
            hdgst: req.hdgst,
            ddgst: req.ddgst,
            maxh2cdata: self.target.limits.max_h2c_data,
        };
        self.send_bytes(resp.encode().to_vec());
    }

    /// Counts a received command toward the submission queue head.
    fn admit(&self, sqe: &Sqe) -> bool {
        let mut st = self.st.borrow_mut();
        if st.sqsize > 0 {
            st.sqhd = (st.sqhd + 1) % (st.sqsize + 1);
        }
        let depth = usize::from(st.sqsize) + 1;
        if st.queue.is_some() && st.cids.len() >= depth {
            return false;
        }
        st.cids.insert(sqe.cid())
    }

    /// A new admin command whose CID is a held Asynchronous Event Request's retires
    /// that request (it is never completed): SPDK's host, shutting down, cancels its
    /// AERs on its own side only and reuses one of their CIDs for Property Get CC, and
    /// the targets hosts are tested against take it.
    fn retire_held_aer(&self, cid: u16) {
        let mut st = self.st.borrow_mut();
        let Some(Queue::Admin(ctrl)) = &st.queue else {
            return;
        };
        let retired = ctrl.borrow_mut().retire_held_aer(cid);
        if retired {
            assert!(st.cids.contains(cid), "a held AER's CID is in use");
            st.cids.remove(cid);
        }
    }

    /// Routes a command once its SGL is checked: data in the capsule, or to be
    /// fetched with R2T, or to be returned with C2HData.
    fn command(self: &Rc<Self>, sqe: Sqe, in_capsule: Option<&[u8]>) {
        self.retire_held_aer(sqe.cid());
        let cid_ok = {
            let conflict = self.st.borrow().cids.contains(sqe.cid());
            !conflict && self.admit(&sqe)
        };
        if !cid_ok {
            // Answer without disturbing the command already using this CID.
            let status = if self.st.borrow().cids.contains(sqe.cid()) {
                Status::CID_CONFLICT
            } else {
                Status::SEQUENCE_ERROR
            };
            self.send_resp(Cqe::new(sqe.cid(), status));
            return;
        }
        let connected = self.st.borrow().queue.is_some();
        let unauthenticated = self.awaiting_auth();
        if unauthenticated
            && in_capsule.is_none()
            && sqe.direction() == Direction::HostToCtrl
            && sqe.sgl_len() > 0
        {
            // No R2T buffer for a host that has not authenticated.
            return self.reply(&sqe, Status::AUTH_REQUIRED.into(), None, 0);
        }
        let is_connect = sqe.opcode() == FABRICS && sqe.fctype() == fctype::CONNECT;
        let allowed = connected || (is_connect && in_capsule.is_some());
        if !allowed {
            // Before Connect only an in-capsule Connect is accepted: nothing else may
            // make the target allocate (an R2T buffer, say) for an unknown host.
            return self.reply(&sqe, Status::SEQUENCE_ERROR.into(), None, 0);
        }
        let (in_capsule_limit, max_xfer) = {
            let st = self.st.borrow();
            match &st.queue {
                Some(Queue::Io(_)) => (
                    self.target.limits.in_capsule,
                    self.target.limits.max_io_size,
                ),
                _ => (ADMIN_IN_CAPSULE, self.target.limits.max_io_size),
            }
        };
        let len = sqe.sgl_len();
        match sqe.direction() {
            Direction::HostToCtrl => {
                if let Some(data) = in_capsule {
                    if sqe.sgl_id() != SGL_DATA_BLOCK_OFFSET {
                        return self.reply(&sqe, Status::SGL_TYPE_INVALID.into(), None, 0);
                    }
                    if sqe.sgl_addr() != 0 {
                        return self.reply(&sqe, Status::SGL_OFFSET_INVALID.into(), None, 0);
                    }
                    if data.len() != len as usize || len > in_capsule_limit {
                        return self.reply(&sqe, Status::SGL_LENGTH_INVALID.into(), None, 0);
                    }
                    let buf = bufpool::copy_of(data);
                    self.execute(sqe, Some(buf), len);
                } else if len == 0 {
                    self.execute(sqe, None, 0);
                } else {
                    if sqe.sgl_id() != SGL_TRANSPORT_DATA_BLOCK {
                        return self.reply(&sqe, Status::SGL_TYPE_INVALID.into(), None, 0);
                    }
                    if len > max_xfer {
                        return self.reply(&sqe, Status::INVALID_FIELD.into(), None, 0);
                    }
                    self.request_data(sqe, len);
                }
            }
            Direction::CtrlToHost => {
                if in_capsule.is_some() {
                    return self.reply(&sqe, Status::INVALID_FIELD.into(), None, 0);
                }
                if len > 0 && sqe.sgl_id() != SGL_TRANSPORT_DATA_BLOCK {
                    return self.reply(&sqe, Status::SGL_TYPE_INVALID.into(), None, 0);
                }
                if len > max_xfer {
                    return self.reply(&sqe, Status::INVALID_FIELD.into(), None, 0);
                }
                self.execute(sqe, None, len);
            }
            Direction::None => {
                if in_capsule.is_some() {
                    return self.reply(&sqe, Status::INVALID_FIELD.into(), None, 0);
                }
                self.execute(sqe, None, 0)
            }
        }
    }

    /// Sends an R2T for the whole transfer; H2CData PDUs fill the buffer.
    fn request_data(self: &Rc<Self>, sqe: Sqe, len: u32) {
        let (ttag, digests) = {
            let mut st = self.st.borrow_mut();
            let ttag = match st.free_ttags.pop() {
                Some(t) => t,
                None => st.writes.len() as u16,
            };
            st.writes.insert(
                ttag,
                PendingWrite {
                    sqe,
                    buf: bufpool::take(len as usize),
                    received: 0,
                    failed: false,
                },
            );
            (ttag, st.digests)
        };
        self.send_bytes(pdu::r2t(digests, sqe.cid(), ttag, 0, len));
    }

    fn on_h2c_data(
        self: &Rc<Self>,
        h: DataHeader,
        data: &[u8],
        digest_ok: bool,
    ) -> Result<(), Fatal> {
        let done = {
            let mut st = self.st.borrow_mut();
            let w = st
                .writes
                .get_mut(&h.ttag)
                .ok_or(Fatal::new(Fes::InvalidHeaderField, 10))?;
            if w.sqe.cid() != h.cccid {
                return Err(Fatal::new(Fes::InvalidHeaderField, 8));
            }
            if h.offset != w.received {
                return Err(Fatal::new(Fes::DataOutOfRange, 12));
            }
            let end = h.offset as usize + data.len();
            if end > w.buf.len() {
                return Err(Fatal::new(Fes::DataOutOfRange, 16));
            }
            w.buf[h.offset as usize..end].copy_from_slice(data);
            w.received = end as u32;
            w.failed |= !digest_ok;
            if end == w.buf.len() {
                st.free_ttags.push(h.ttag);
                st.writes.remove(&h.ttag)
            } else {
                None
            }
        };
        if let Some(w) = done {
            if w.failed {
                self.reply(&w.sqe, Status::TRANSIENT_TRANSPORT.into(), None, 0);
            } else {
                let len = w.buf.len() as u32;
                self.execute(w.sqe, Some(w.buf), len);
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- execution

    fn execute(self: &Rc<Self>, sqe: Sqe, data: Option<IoBuf>, xfer: u32) {
        let unauthenticated = self.awaiting_auth();
        let auth_command = sqe.opcode() == FABRICS
            && matches!(
                sqe.fctype(),
                fctype::AUTH_SEND | fctype::AUTH_RECV | fctype::DISCONNECT
            );
        if unauthenticated && !auth_command {
            return self.reply(&sqe, Status::AUTH_REQUIRED.into(), None, 0);
        }
        if sqe.opcode() == FABRICS {
            return self.fabrics(sqe, data, xfer);
        }
        enum Route {
            Admin(Rc<RefCell<Controller>>),
            Io(Rc<IoQueue>),
            None,
        }
        let route = match &self.st.borrow().queue {
            Some(Queue::Admin(c)) => Route::Admin(Rc::clone(c)),
            Some(Queue::Io(q)) => Route::Io(Rc::clone(q)),
            None => Route::None,
        };
        match route {
            Route::Admin(ctrl) => {
                ctrlr::deliver_discovery_news(&ctrl, self);
                let reply = ctrlr::admin(&ctrl, self, &sqe, data.as_deref(), xfer);
                if let Some(reply) = reply {
                    self.reply(&sqe, reply, None, xfer);
                }
            }
            Route::Io(queue) => {
                if !queue.ctrl.ready.load(Ordering::Relaxed) {
                    return self.reply(&sqe, Status::NAMESPACE_NOT_READY.into(), None, 0);
                }
                io::execute(self, &queue, sqe, data, xfer);
            }
            Route::None => self.reply(&sqe, Status::SEQUENCE_ERROR.into(), None, 0),
        }
    }

    fn fabrics(self: &Rc<Self>, sqe: Sqe, data: Option<IoBuf>, xfer: u32) {
        let connected = self.st.borrow().queue.is_some();
        let reply = match (sqe.fctype(), connected) {
            (fctype::CONNECT, false) => {
                // Discovery controllers have slots of their own: idle ones (a
                // discovery Connect needs no host check) cannot take I/O hosts' places.
                let kind = if ctrlr::connects_to_discovery(data.as_deref().unwrap_or_default()) {
                    Established::Discovery
                } else {
                    Established::Subsystem
                };
                let outcome = if self.take_established_slot(kind) {
                    ctrlr::connect(self, &sqe, data.as_deref().unwrap_or_default())
                        .inspect_err(|_| self.release_established_slot())
                } else {
                    let data = data.as_deref().unwrap_or_default();
                    let busy = Status::CONNECT_CTRL_BUSY.into();
                    Err(ctrlr::refuse(self, data, "too many connections", busy))
                };
                match outcome {
                    Ok(c) => {
                        let mut st = self.st.borrow_mut();
                        // Connected: its pending slot goes back.
                        st.pending = None;
                        st.sqsize = c.sqsize;
                        st.sq_flow_off = c.sq_flow_off;
                        st.sqhd = 1 % (c.sqsize + 1);
                        st.queue = Some(c.queue);
                        st.auth = c.auth;
                        let must_authenticate = st.auth.is_some();
                        drop(st);
                        if must_authenticate {
                            self.arm_auth_timeout();
                        }
                        c.reply
                    }
                    Err(reply) => reply,
                }
            }
            (fctype::CONNECT, true) => Status::SEQUENCE_ERROR.into(),
            (_, false) => Status::SEQUENCE_ERROR.into(),
            (fctype::DISCONNECT, true) => {
                let is_io = matches!(self.st.borrow().queue, Some(Queue::Io(_)));
                if is_io {
                    self.reply(&sqe, Status::SUCCESS.into(), None, 0);
                    self.st.borrow_mut().phase = Phase::Terminating;
                    self.maybe_finish_terminating();
                    return;
                }
                Status::INVALID_FIELD.into()
            }
            (fctype::AUTH_SEND, true) => return self.auth_send(&sqe, data.as_deref()),
            (fctype::AUTH_RECV, true) => return self.auth_receive(&sqe, xfer),
            (fctype::PROPERTY_GET | fctype::PROPERTY_SET, true) => {
                let ctrl = match &self.st.borrow().queue {
                    Some(Queue::Admin(c)) => Some(Rc::clone(c)),
                    _ => None,
                };
                match ctrl {
                    Some(c) => ctrlr::property(&c, &self.target, &sqe),
                    None => Status::INVALID_OPCODE.into(),
                }
            }
            _ => Status::INVALID_OPCODE.into(),
        };
        self.reply(&sqe, reply, None, xfer);
    }

    // ---------------------------------------------------------------- authentication

    /// The host must still authenticate this queue before using it.
    fn awaiting_auth(&self) -> bool {
        self.st
            .borrow()
            .auth
            .as_ref()
            .is_some_and(|a| !a.authenticated())
    }

    /// Authentication Send: a DH-HMAC-CHAP message from the host (in the capsule:
    /// an unauthenticated host may not make the target allocate more).
    fn auth_send(self: &Rc<Self>, sqe: &Sqe, data: Option<&[u8]>) {
        let tl = sqe.cdw(11);
        if !auth_fields_ok(sqe) || tl == 0 || tl > auth::MAX_SEND {
            return self.reply(sqe, Status::INVALID_FIELD.into(), None, 0);
        }
        let Some(msg) = data.filter(|d| d.len() == tl as usize) else {
            return self.reply(sqe, Status::SGL_LENGTH_INVALID.into(), None, 0);
        };
        let outcome = self.st.borrow_mut().auth.as_mut().map(|t| t.send(msg));
        match outcome {
            // This host needs no authentication here.
            None => self.reply(sqe, Status::INVALID_FIELD.into(), None, 0),
            Some(Ok(())) => {
                self.reply(sqe, Status::SUCCESS.into(), None, 0);
                self.auth_progress();
            }
            Some(Err(failure)) => {
                // The host gave up (Failure2): so does the connection.
                self.reply(sqe, Status::SUCCESS.into(), None, 0);
                self.observe_auth(Err(failure));
                self.auth_failed();
            }
        }
    }

    /// Authentication Receive: the DH-HMAC-CHAP message the transaction owes.
    fn auth_receive(self: &Rc<Self>, sqe: &Sqe, xfer: u32) {
        let al = sqe.cdw(11);
        if !auth_fields_ok(sqe) || !(16..=auth::MAX_RECEIVE).contains(&al) {
            return self.reply(sqe, Status::INVALID_FIELD.into(), None, 0);
        }
        if xfer != al {
            return self.reply(sqe, Status::SGL_LENGTH_INVALID.into(), None, 0);
        }
        let received = self
            .st
            .borrow_mut()
            .auth
            .as_mut()
            .map(|t| t.receive(al as usize));
        let Some(received) = received else {
            return self.reply(sqe, Status::INVALID_FIELD.into(), None, 0);
        };
        self.reply(
            sqe,
            Status::SUCCESS.into(),
            Some(Payload::Vec(received.message)),
            xfer,
        );
        self.auth_progress();
        if received.close {
            self.auth_failed();
        }
    }

    /// After a step of the transaction: its outcome, if it just ended, goes to the
    /// audit; an I/O queue that has just authenticated takes its place in its
    /// controller.
    fn auth_progress(self: &Rc<Self>) {
        let outcome = self
            .st
            .borrow_mut()
            .auth
            .as_mut()
            .and_then(|t| t.take_outcome());
        let Some(outcome) = outcome else { return };
        self.observe_auth(outcome);
        if outcome.is_ok() && !self.register_io_queue() {
            self.auth_failed();
        }
    }

    /// Registers an I/O queue with its controller once it has authenticated (not at
    /// Connect: an unauthenticated host must not hold a queue ID the real one needs).
    /// False if the controller went away or the queue ID was taken meanwhile.
    fn register_io_queue(self: &Rc<Self>) -> bool {
        let queue = match &self.st.borrow().queue {
            Some(Queue::Io(q)) => Rc::clone(q),
            _ => return true,
        };
        let mut queues = queue.ctrl.queues();
        if let Some(existing) = queues.get(&queue.qid) {
            return existing.conn_id == self.id;
        }
        if !queue.ctrl.ready.load(Ordering::SeqCst) {
            return false;
        }
        queues.insert(
            queue.qid,
            QueueRef {
                reactor: self.reactor.handle().clone(),
                conn_id: self.id,
            },
        );
        true
    }

    /// Authentication failed: the connection closes once the message that says so
    /// is out.
    fn auth_failed(self: &Rc<Self>) {
        self.st.borrow_mut().phase = Phase::Terminating;
        self.maybe_finish_terminating();
        self.close_soon();
    }

    /// Reports an authentication's outcome to the connect observer (the audit log):
    /// every success and failure, on every queue.
    fn observe_auth(&self, outcome: Result<(), auth::Failure>) {
        let names = {
            let st = self.st.borrow();
            st.auth
                .as_ref()
                .map(|t| (t.hostnqn().to_string(), t.subnqn().to_string()))
        };
        let (Some((hostnqn, subnqn)), Some(o)) = (names, self.target.observer.get()) else {
            return;
        };
        o(crate::target::ConnectEvent {
            hostnqn,
            subnqn,
            listener: self.local,
            peer: self.peer,
            allowed: outcome.is_ok(),
            reason: outcome.map_or_else(auth::Failure::reason, |()| "authenticated"),
        });
    }

    /// A queue that has not authenticated within the limit's time of its Connect is
    /// closed (and the audit told), so hosts without the secret cannot hold
    /// connections open.
    fn arm_auth_timeout(self: &Rc<Self>) {
        let weak = Rc::downgrade(self);
        self.reactor
            .after(self.target.limits.auth_timeout, move || {
                let Some(c) = weak.upgrade() else { return };
                let pending = {
                    let st = c.st.borrow();
                    st.phase != Phase::Closed
                        && st
                            .auth
                            .as_ref()
                            .is_some_and(|a| !a.authenticated() && !a.failed())
                };
                if pending {
                    c.observe_auth(Err(auth::Failure::TimedOut));
                    c.close();
                }
            });
    }

    /// Completes a command: data (from `reply.data` or `payload`) as C2HData, then the
    /// response capsule, unless the host disabled SQ flow control and the command
    /// succeeded with data, in which case the last C2HData carries SUCCESS instead.
    pub(crate) fn reply(
        self: &Rc<Self>,
        sqe: &Sqe,
        reply: Reply,
        payload: Option<Payload>,
        xfer: u32,
    ) {
        let (digests, hpda, sqhd, flow_off, sqid) = {
            let mut st = self.st.borrow_mut();
            // Once a TermReq or a Disconnect's response is queued, nothing follows it.
            if matches!(st.phase, Phase::Closed | Phase::Terminating) {
                return;
            }
            st.cids.remove(sqe.cid());
            let sqid = match &st.queue {
                Some(Queue::Io(q)) => q.qid,
                _ => 0,
            };
            (st.digests, st.hpda, st.sqhd, st.sq_flow_off, sqid)
        };
        let payload = payload.or(reply.data.map(Payload::Vec));
        let ok = reply.status.is_success();
        let mut data_sent = false;
        if let Some(p) = payload
            && ok
            && xfer > 0
        {
            let len = p.bytes().len().min(xfer as usize);
            if len > 0 {
                // The data PDU can stand for the response only when the response would
                // carry nothing else: a success with no command-specific result.
                let success = (flow_off || self.target.limits.c2h_success == C2hSuccess::Always)
                    && reply.dw0 == 0
                    && reply.dw1 == 0;
                let mut flags = FLAG_DATA_LAST;
                if success {
                    flags |= FLAG_DATA_SUCCESS;
                }
                let mut hdr = bufpool::small();
                pdu::data_pdu_header_into(
                    &mut hdr,
                    PduType::C2HData,
                    digests,
                    hpda,
                    flags,
                    DataHeader {
                        cccid: sqe.cid(),
                        ttag: 0,
                        offset: 0,
                        length: len as u32,
                    },
                );
                let ddgst = digests.data.then(|| pdu::digest(&p.bytes()[..len]));
                let mut st = self.st.borrow_mut();
                st.tx.push_back(Seg::vec(hdr));
                st.tx.push_back(Seg {
                    data: p,
                    len,
                    sent: 0,
                });
                if let Some(d) = ddgst {
                    st.tx.push_back(Seg::vec(d.to_vec()));
                }
                data_sent = success;
            }
        }
        if !data_sent {
            let cqe = Cqe {
                dw0: reply.dw0,
                dw1: reply.dw1,
                sqhd: if flow_off { 0xFFFF } else { sqhd },
                sqid,
                cid: sqe.cid(),
                status: reply.status,
            };
            let mut resp = bufpool::small();
            pdu::capsule_resp_into(&mut resp, digests, &cqe.encode());
            self.st.borrow_mut().tx.push_back(Seg::vec(resp));
        }
        self.schedule_send();
    }

    /// Completes a command held earlier (an asynchronous event request) with `reply`.
    pub(crate) fn complete_held(self: &Rc<Self>, opcode: u8, cid: u16, reply: Reply) {
        self.reply(&Sqe::new(opcode, cid), reply, None, 0);
    }

    fn send_resp(self: &Rc<Self>, cqe: Cqe) {
        let digests = self.st.borrow().digests;
        let mut resp = bufpool::small();
        pdu::capsule_resp_into(&mut resp, digests, &cqe.encode());
        self.send_bytes(resp);
    }

    // ---------------------------------------------------------------- send side

    fn send_bytes(self: &Rc<Self>, bytes: Vec<u8>) {
        self.st.borrow_mut().tx.push_back(Seg::vec(bytes));
        self.schedule_send();
    }

    /// Sends what is queued at the end of this reactor pass, so every reply the pass
    /// produces goes out in one SendMsg.
    fn schedule_send(self: &Rc<Self>) {
        if self.poller.get().is_some() {
            // Poll mode: the poller sends once per pass, batching replies.
            return;
        }
        {
            let mut st = self.st.borrow_mut();
            if st.send_queued || st.sending || st.tx.is_empty() || st.phase == Phase::Closed {
                return;
            }
            st.send_queued = true;
        }
        let this = Rc::clone(self);
        self.reactor.before_submit(move || this.start_send());
    }

    /// Starts a SendMsg for queued segments unless one is in flight.
    fn start_send(self: &Rc<Self>) {
        let mut op = {
            let mut st = self.st.borrow_mut();
            st.send_queued = false;
            if st.sending || st.tx.is_empty() || st.phase == Phase::Closed {
                return;
            }
            st.sending = true;
            let mut op = st.spare_send.take().unwrap_or_else(SendOp::new);
            let n = batch_len(&st.tx);
            op.batch.extend(st.tx.drain(..n));
            st.tx_inflight = op.batch.iter().map(|s| s.len - s.sent).sum();
            op
        };
        let SendOp { batch, iov, msg } = &mut *op;
        iov.extend(batch.iter().map(Seg::iovec));
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len();
        let entry = opcode::SendMsg::new(types::Fd(self.fd.as_raw_fd()), &op.msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build();
        let this = Rc::clone(self);
        // SAFETY: `op` (the segments, the iovec array and the msghdr that points at
        // it) is boxed and moved into the completion, so every pointer the kernel
        // holds stays valid until the operation completes.
        unsafe {
            self.reactor
                .submit(entry, Box::new(move |res| this.sent(op, res)))
        };
    }

    fn sent(self: &Rc<Self>, mut op: Box<SendOp>, res: i32) {
        if res < 0 {
            self.close();
            return;
        }
        let mut left = res as usize;
        // Segments sent in full go back to the pools; the rest, in order, stay in
        // `batch` to go back to the front of the queue.
        let mut kept = 0;
        for i in 0..op.batch.len() {
            let remaining = op.batch[i].len - op.batch[i].sent;
            if left >= remaining {
                left -= remaining;
            } else {
                op.batch[i].sent += left;
                left = 0;
                op.batch.swap(kept, i);
                kept += 1;
            }
        }
        op.batch.drain(kept..).for_each(Seg::recycle);
        op.iov.clear();
        let resume = {
            let mut st = self.st.borrow_mut();
            st.sending = false;
            st.tx_inflight = 0;
            for seg in op.batch.drain(..).rev() {
                st.tx.push_front(seg);
            }
            st.spare_send = Some(op);
            let backlog: usize = st.tx.iter().map(|s| s.len - s.sent).sum();
            let resume = st.rx_paused && backlog <= TX_CAP / 2;
            if resume {
                st.rx_paused = false;
            }
            resume
        };
        self.schedule_send();
        if resume {
            self.recv();
        }
        self.maybe_finish_terminating();
    }

    /// Sends a C2HTermReq for `fatal` and closes once it is out (or after 1 s).
    fn terminate(self: &Rc<Self>, fatal: Fatal, offending: &[u8]) {
        {
            let mut st = self.st.borrow_mut();
            if st.phase == Phase::Closed {
                return;
            }
            st.phase = Phase::Terminating;
        }
        self.send_bytes(pdu::term_req(PduType::C2HTermReq, fatal, offending));
        self.close_soon();
        self.maybe_finish_terminating();
    }

    /// Closes the connection in 1 s at the latest, whether or not what is queued has
    /// gone out by then (a host that stops reading cannot keep it).
    fn close_soon(self: &Rc<Self>) {
        let weak = Rc::downgrade(self);
        self.reactor.after(Duration::from_secs(1), move || {
            if let Some(c) = weak.upgrade() {
                c.close();
            }
        });
    }

    fn maybe_finish_terminating(self: &Rc<Self>) {
        let done = {
            let st = self.st.borrow();
            st.phase == Phase::Terminating && !st.sending && st.tx.is_empty()
        };
        if done {
            self.close();
        }
    }
}

/// Whether an Authentication Send/Receive names DH-HMAC-CHAP: security protocol
/// 0xE9, SPSP0 and SPSP1 1.
fn auth_fields_ok(sqe: &Sqe) -> bool {
    sqe.0[43] == auth::SECP && sqe.0[41] == auth::SPSP && sqe.0[42] == auth::SPSP
}

/// Command IDs in flight on a queue: a 64 Ki-bit set, so the check is a bit test.
struct CidSet {
    bits: Box<[u64; 1024]>,
    len: usize,
}

impl Default for CidSet {
    fn default() -> Self {
        Self {
            bits: Box::new([0; 1024]),
            len: 0,
        }
    }
}

impl CidSet {
    fn contains(&self, cid: u16) -> bool {
        self.bits[usize::from(cid >> 6)] & (1 << (cid & 63)) != 0
    }

    /// Adds `cid`; false if it was already present.
    fn insert(&mut self, cid: u16) -> bool {
        if self.contains(cid) {
            return false;
        }
        self.bits[usize::from(cid >> 6)] |= 1 << (cid & 63);
        self.len += 1;
        true
    }

    fn remove(&mut self, cid: u16) {
        if self.contains(cid) {
            self.bits[usize::from(cid >> 6)] &= !(1 << (cid & 63));
            self.len -= 1;
        }
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// A SendMsg's segments and the iovecs and header that point into them; kept by the
/// connection between sends so its vectors are reused.
struct SendOp {
    batch: Vec<Seg>,
    iov: Vec<libc::iovec>,
    msg: libc::msghdr,
}

impl SendOp {
    fn new() -> Box<Self> {
        Box::new(Self {
            batch: Vec::with_capacity(MAX_IOV),
            iov: Vec::with_capacity(MAX_IOV),
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            msg: unsafe { std::mem::zeroed() },
        })
    }
}

fn set_nodelay(fd: &OwnedFd) {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and a pointer to a live c_int of the size given.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}
