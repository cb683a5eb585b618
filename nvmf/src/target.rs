//! The running target: listeners bound, reactors chosen, controllers registered.
//!
//! Target-wide state that connections on different reactors must agree on (controller
//! IDs, which I/O queues belong to which controller, the connection count) lives in
//! [`TargetShared`] behind a mutex that only the control path (Connect, teardown)
//! takes; the I/O path never touches it.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use reactor::ReactorHandle;

use crate::conn;
use crate::dhchap::HostKeys;
use crate::error::NvmfError;
use crate::identify::{DiscoveryEntry, EntryKind};
use crate::listener;
use crate::subsystem::DISCOVERY_NQN;
use crate::subsystem::{Limits, SocketIo, Subsystem, TargetConfig};

/// A queue of a controller, as other reactors see it.
#[derive(Clone)]
pub(crate) struct QueueRef {
    pub reactor: ReactorHandle,
    pub conn_id: u64,
}

/// The part of a controller that every reactor may read: identity, whether it is
/// enabled, and where its queues live.
pub(crate) struct CtrlShared {
    pub cntlid: u16,
    /// `None` for a discovery controller.
    pub subsystem: Option<Arc<Subsystem>>,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    /// CC.EN = 1 and CSTS.RDY = 1.
    pub ready: AtomicBool,
    /// I/O queues granted by Set Features (Number of Queues).
    pub io_queues: AtomicU16,
    /// Connected I/O queues by queue ID.
    pub queues: Mutex<HashMap<u16, QueueRef>>,
    /// Where the admin queue (which owns the controller's state) lives.
    pub admin: QueueRef,
    /// Discovery news: the log changed since this (discovery) controller last looked.
    /// The message that tells its reactor is only a wake-up, so no notice is lost.
    pub discovery_news: AtomicBool,
}

impl CtrlShared {
    pub fn queues(&self) -> MutexGuard<'_, HashMap<u16, QueueRef>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes every I/O queue of this controller (reset or teardown).
    pub fn close_io_queues(&self) {
        let queues: Vec<QueueRef> = self.queues().drain().map(|(_, q)| q).collect();
        for q in queues {
            let id = q.conn_id;
            // A stopped reactor has closed its connections already.
            let _ = q.reactor.send(move || conn::close_by_id(id));
        }
    }
}

struct Ctrls {
    map: HashMap<u16, Arc<CtrlShared>>,
    next: u16,
}

/// State shared by every connection of the target.
pub(crate) struct TargetShared {
    /// Subsystems served now; read at Connect and discovery only (control path).
    subsystems: RwLock<Vec<Arc<Subsystem>>>,
    pub limits: Limits,
    pub socket_io: SocketIo,
    /// Lifetime figures for the SMART / Health log.
    pub health: Arc<crate::health::Health>,
    /// Every address listened on; a listener's index is its port ID.
    listen_addrs: RwLock<Vec<SocketAddr>>,
    pub reactors: Vec<ReactorHandle>,
    next_reactor: AtomicUsize,
    pub connections: AtomicUsize,
    /// Of the established connections, those of discovery controllers: counted apart.
    pub discovery_connections: AtomicUsize,
    /// Connections closed as accepted: too many not connected yet (in all, or from
    /// their address).
    pub refused_pending: AtomicU64,
    /// Connections closed for sending no ICReq, or no Connect, in time.
    pub timed_out_pending: AtomicU64,
    next_conn_id: AtomicU64,
    ctrls: Mutex<Ctrls>,
    pub genctr: AtomicU64,
    /// Told of every admin-queue Connect decision (for the audit log).
    pub observer: std::sync::OnceLock<ConnectObserver>,
}

/// Which count an established connection is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Established {
    /// Queues of subsystems' controllers (`Limits::max_connections`).
    Subsystem,
    /// Discovery controllers (`Limits::max_discovery_connections`).
    Discovery,
}

/// A host's attempt to create a controller (admin-queue Connect) or to authenticate
/// a queue (any queue), and the target's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectEvent {
    /// The host's NQN.
    pub hostnqn: String,
    /// The subsystem asked for.
    pub subnqn: String,
    /// The listener it came in on.
    pub listener: SocketAddr,
    /// The host's address.
    pub peer: SocketAddr,
    /// Whether the controller was created, or the queue authenticated.
    pub allowed: bool,
    /// "ok", "ok, authentication required", "authenticated", or why not.
    pub reason: &'static str,
}

/// Called on the reactor that handled the Connect: it must return at once (hand the
/// event to another thread for anything slow, such as an fsynced audit log).
pub type ConnectObserver = Arc<dyn Fn(ConnectEvent) + Send + Sync>;

impl TargetShared {
    fn ctrls(&self) -> MutexGuard<'_, Ctrls> {
        self.ctrls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reactor the next accepted connection goes to (round robin).
    pub fn pick_reactor(&self) -> &ReactorHandle {
        let i = self.next_reactor.fetch_add(1, Ordering::Relaxed);
        &self.reactors[i % self.reactors.len()]
    }

    /// The count of established connections of `kind`, and its limit.
    pub fn established(&self, kind: Established) -> (&AtomicUsize, usize) {
        match kind {
            Established::Subsystem => (&self.connections, self.limits.max_connections),
            Established::Discovery => (
                &self.discovery_connections,
                self.limits.max_discovery_connections,
            ),
        }
    }

    /// Counts and reports a connection from `peer` closed as it was accepted.
    pub fn refused(&self, listener: SocketAddr, peer: SocketAddr, reason: &'static str) {
        self.refused_pending.fetch_add(1, Ordering::Relaxed);
        self.tell(listener, peer, reason);
    }

    /// Counts and reports a connection closed for `what` (no ICReq, no Connect) in time.
    pub fn timed_out(&self, listener: SocketAddr, peer: SocketAddr, what: &'static str) {
        self.timed_out_pending.fetch_add(1, Ordering::Relaxed);
        self.tell(listener, peer, what);
    }

    fn tell(&self, listener: SocketAddr, peer: SocketAddr, reason: &'static str) {
        if let Some(o) = self.observer.get() {
            o(ConnectEvent {
                hostnqn: String::new(),
                subnqn: String::new(),
                listener,
                peer,
                allowed: false,
                reason,
            });
        }
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a new controller with a fresh ID; `None` if all IDs are taken.
    pub fn add_ctrl(&self, make: impl FnOnce(u16) -> CtrlShared) -> Option<Arc<CtrlShared>> {
        let mut c = self.ctrls();
        for _ in 0..0xFFEF {
            let id = c.next;
            c.next = if c.next >= 0xFFEE { 1 } else { c.next + 1 };
            if let std::collections::hash_map::Entry::Vacant(slot) = c.map.entry(id) {
                let ctrl = Arc::new(make(id));
                slot.insert(Arc::clone(&ctrl));
                return Some(ctrl);
            }
        }
        None
    }

    pub fn ctrl(&self, cntlid: u16) -> Option<Arc<CtrlShared>> {
        self.ctrls().map.get(&cntlid).cloned()
    }

    /// Removes a controller and closes its I/O queues.
    pub fn remove_ctrl(&self, cntlid: u16) {
        let removed = self.ctrls().map.remove(&cntlid);
        if let Some(ctrl) = removed {
            ctrl.ready.store(false, Ordering::SeqCst);
            ctrl.close_io_queues();
        }
    }

    /// Number of live controllers.
    pub fn ctrl_count(&self) -> usize {
        self.ctrls().map.len()
    }

    /// The subsystems served now.
    pub fn subsystems(&self) -> Vec<Arc<Subsystem>> {
        self.subsystems
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.listen_addrs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Subsystem `changed` was added or removed: the discovery log's generation moves
    /// on, and every discovery controller of a host allowed to see it is told, so one
    /// that asked for discovery log change notices completes an asynchronous event
    /// request (a persistent discovery controller then reads the log again). Hosts
    /// that may not see the subsystem hear nothing of it.
    pub fn discovery_changed(&self, changed: &Subsystem) {
        self.genctr.fetch_add(1, Ordering::SeqCst);
        let admins: Vec<QueueRef> = self
            .ctrls()
            .map
            .values()
            .filter(|c| c.subsystem.is_none() && changed.hosts.allows(&c.hostnqn))
            .map(|c| {
                c.discovery_news.store(true, Ordering::Release);
                c.admin.clone()
            })
            .collect();
        for q in admins {
            let id = q.conn_id;
            // A full mailbox loses only the wake-up: the controller's next command
            // (a keep-alive at the latest) finds the flag.
            let _ = q.reactor.send(move || conn::discovery_news(id));
        }
    }

    /// Discovery log entries visible to `hostnqn`, asking through the discovery
    /// controller on listener `current`: that controller's own entry first (the
    /// current discovery subsystem, as hosts since NVMe 2.0 / TP 8013 expect), then
    /// every subsystem the host may see, on each of its listeners.
    pub fn discovery_entries(&self, hostnqn: &str, current: SocketAddr) -> Vec<DiscoveryEntry> {
        let listen_addrs = self.listen_addrs();
        let port_id =
            |addr: &SocketAddr| listen_addrs.iter().position(|a| a == addr).unwrap_or(0) as u16;
        let mut out = vec![DiscoveryEntry {
            nqn: DISCOVERY_NQN.into(),
            addr: current,
            port_id: port_id(&current),
            asqsz: self.limits.admin_queue_depth,
            kind: EntryKind::CurrentDiscovery,
        }];
        for s in &self.subsystems() {
            if !s.hosts.allows(hostnqn) {
                continue;
            }
            for addr in &s.listeners {
                out.push(DiscoveryEntry {
                    nqn: s.nqn.clone(),
                    addr: *addr,
                    port_id: port_id(addr),
                    asqsz: self.limits.admin_queue_depth,
                    kind: EntryKind::Subsystem,
                });
            }
        }
        out
    }
}

/// Binds `addr`. A port still held for a moment by a process that just died (its
/// io_uring is torn down after it exits, with the socket) is retried for a few seconds,
/// so a daemon restarted at once after a crash gets its port back.
fn bind(addr: SocketAddr) -> Result<TcpListener, NvmfError> {
    let mut tries = 0;
    loop {
        match TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(cause) => return Err(NvmfError::Listen { addr, cause }),
        }
    }
}

/// A running NVMe/TCP target. Connections live on the reactors it was started on; it
/// stops serving when those reactors stop.
pub struct Target {
    shared: Arc<TargetShared>,
}

impl Target {
    /// Validates `config`, binds every listener (port 0 picks a free port; the chosen
    /// ports are what discovery reports) and starts accepting on `reactors`.
    pub fn start(mut config: TargetConfig, reactors: &[ReactorHandle]) -> Result<Self, NvmfError> {
        config.validate()?;
        if reactors.is_empty() {
            return Err(NvmfError::Config("no reactors to serve on".into()));
        }
        let mut bound: Vec<(SocketAddr, TcpListener)> = Vec::new();
        for addr in config.listen_addresses() {
            let listener = bind(addr)?;
            bound.push((addr, listener));
        }
        let resolve = |a: &SocketAddr| -> SocketAddr {
            bound
                .iter()
                .find(|(configured, _)| configured == a)
                .and_then(|(_, l)| l.local_addr().ok())
                .unwrap_or(*a)
        };
        for s in &mut config.subsystems {
            s.listeners = s.listeners.iter().map(resolve).collect();
        }
        let listen_addrs: Vec<SocketAddr> = bound
            .iter()
            .map(|(a, l)| l.local_addr().unwrap_or(*a))
            .collect();
        for ns in config.subsystems.iter().flat_map(|s| &s.namespaces) {
            config.health.attach(&ns.bdev);
        }
        let shared = Arc::new(TargetShared {
            subsystems: RwLock::new(config.subsystems.into_iter().map(Arc::new).collect()),
            limits: config.limits,
            socket_io: config.socket_io,
            health: config.health,
            listen_addrs: RwLock::new(listen_addrs.clone()),
            reactors: reactors.to_vec(),
            next_reactor: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            discovery_connections: AtomicUsize::new(0),
            refused_pending: AtomicU64::new(0),
            timed_out_pending: AtomicU64::new(0),
            next_conn_id: AtomicU64::new(1),
            ctrls: Mutex::new(Ctrls {
                map: HashMap::new(),
                next: 1,
            }),
            genctr: AtomicU64::new(1),
            observer: std::sync::OnceLock::new(),
        });
        for (i, (_, l)) in bound.into_iter().enumerate() {
            let local = l.local_addr().map_err(|cause| NvmfError::Listen {
                addr: listen_addrs[i],
                cause,
            })?;
            listener::spawn(&shared, &reactors[i % reactors.len()], l, local)?;
        }
        for r in reactors {
            r.send(conn::close_all_on_stop)?;
        }
        Ok(Self { shared })
    }

    /// Reports every admin-queue Connect decision and every authentication outcome
    /// (host, subsystem, allowed or why not) to `observer`; set once.
    pub fn observe_connects(&self, observer: ConnectObserver) -> Result<(), NvmfError> {
        self.shared
            .observer
            .set(observer)
            .map_err(|_| NvmfError::Config("a connect observer is set already".into()))
    }

    /// Lifetime figures the SMART / Health log reports (for their owner to save).
    pub fn health(&self) -> &Arc<crate::health::Health> {
        &self.shared.health
    }

    /// Addresses the target listens on (ports resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.shared.listen_addrs()
    }

    /// Starts serving `subsystem` at once: its listeners are bound unless the target
    /// listens there already (port 0 picks a free port), and discovery lists it.
    /// Returns its resolved listeners.
    pub fn add_subsystem(&self, mut subsystem: Subsystem) -> Result<Vec<SocketAddr>, NvmfError> {
        subsystem.validate(&self.shared.limits)?;
        for ns in &subsystem.namespaces {
            self.shared.health.attach(&ns.bdev);
        }
        let exists = |list: &[Arc<Subsystem>]| {
            if list.iter().any(|s| s.nqn == subsystem.nqn) {
                Err(NvmfError::Config(format!(
                    "subsystem {} exists already",
                    subsystem.nqn
                )))
            } else {
                Ok(())
            }
        };
        exists(&self.shared.subsystems())?;
        // Bind new listeners before taking the lock (a bind may wait for a port to be
        // released), so Connects on the reactors never wait on it; nothing is served
        // from them unless the whole subsystem goes in.
        let known = self.shared.listen_addrs();
        let mut fresh = Vec::new();
        let mut resolved = Vec::new();
        for addr in &subsystem.listeners {
            if known.contains(addr) {
                resolved.push(*addr);
                continue;
            }
            let l = bind(*addr)?;
            let local = l
                .local_addr()
                .map_err(|cause| NvmfError::Listen { addr: *addr, cause })?;
            resolved.push(local);
            fresh.push((l, local));
        }
        let mut subsystems = self
            .shared
            .subsystems
            .write()
            .unwrap_or_else(|p| p.into_inner());
        exists(&subsystems)?;
        for (l, local) in fresh {
            listener::spawn(&self.shared, self.shared.pick_reactor(), l, local)?;
            self.shared
                .listen_addrs
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .push(local);
        }
        subsystem.listeners.clone_from(&resolved);
        let subsystem = Arc::new(subsystem);
        subsystems.push(Arc::clone(&subsystem));
        drop(subsystems);
        self.shared.discovery_changed(&subsystem);
        Ok(resolved)
    }

    /// Stops serving subsystem `nqn`: hosts can no longer connect, discovery stops
    /// listing it, and its controllers are torn down (their I/O queues closed).
    pub fn remove_subsystem(&self, nqn: &str) -> Result<(), NvmfError> {
        let removed = {
            let mut subsystems = self
                .shared
                .subsystems
                .write()
                .unwrap_or_else(|p| p.into_inner());
            let at = subsystems.iter().position(|s| s.nqn == nqn);
            at.map(|i| subsystems.remove(i))
        };
        let Some(removed) = removed else {
            return Err(NvmfError::Config(format!("no subsystem {nqn}")));
        };
        self.shared.discovery_changed(&removed);
        let doomed: Vec<u16> = self
            .shared
            .ctrls()
            .map
            .values()
            .filter(|c| c.subsystem.as_ref().is_some_and(|s| s.nqn == nqn))
            .map(|c| c.cntlid)
            .collect();
        for id in doomed {
            self.shared.remove_ctrl(id);
        }
        Ok(())
    }

    /// Replaces every subsystem's DH-HMAC-CHAP secrets with what `keys` gives for it
    /// (secrets rotated): new connections authenticate with them; connections made
    /// before keep theirs until they reconnect. Fails, changing nothing, if a
    /// subsystem would give a secret to a host it does not allow.
    pub fn set_host_keys(
        &self,
        keys: impl Fn(&Subsystem) -> Vec<HostKeys>,
    ) -> Result<(), NvmfError> {
        let mut subsystems = self
            .shared
            .subsystems
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let mut updated = Vec::with_capacity(subsystems.len());
        for s in subsystems.iter() {
            let mut new = Subsystem::clone(s);
            new.host_keys = keys(s);
            new.validate(&self.shared.limits)?;
            updated.push(Arc::new(new));
        }
        *subsystems = updated;
        Ok(())
    }

    /// Resolved listeners of subsystem `nqn` (empty if there is no such subsystem).
    pub fn listeners_of(&self, nqn: &str) -> Vec<SocketAddr> {
        self.shared
            .subsystems()
            .iter()
            .find(|s| s.nqn == nqn)
            .map(|s| s.listeners.clone())
            .unwrap_or_default()
    }

    /// Every subsystem served now, configured or added while running.
    pub fn subsystems(&self) -> Vec<Arc<Subsystem>> {
        self.shared.subsystems()
    }

    /// Connections that have completed Connect.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Connections closed as they were accepted (too many not connected yet) and
    /// connections closed for sending no ICReq or Connect in time.
    pub fn pending_dropped(&self) -> (u64, u64) {
        (
            self.shared.refused_pending.load(Ordering::Relaxed),
            self.shared.timed_out_pending.load(Ordering::Relaxed),
        )
    }

    /// Live controllers (admin queues connected).
    pub fn controllers(&self) -> usize {
        self.shared.ctrl_count()
    }

    /// The live controllers by subsystem NQN: which hosts are connected, each list
    /// ordered by controller ID (discovery controllers left out). One pass over the
    /// controller registry, holding its lock (as Connect does) only to copy it; each
    /// controller's queues are counted after. Never on an I/O path.
    pub fn connected(&self) -> HashMap<String, Vec<ControllerInfo>> {
        let ctrls: Vec<Arc<CtrlShared>> = self.shared.ctrls().map.values().cloned().collect();
        let mut by_nqn: HashMap<String, Vec<ControllerInfo>> = HashMap::new();
        for c in ctrls {
            let Some(s) = &c.subsystem else {
                continue;
            };
            by_nqn
                .entry(s.nqn.clone())
                .or_default()
                .push(ControllerInfo {
                    cntlid: c.cntlid,
                    hostnqn: c.hostnqn.clone(),
                    io_queues: c.queues().len(),
                });
        }
        for list in by_nqn.values_mut() {
            list.sort_by_key(|c| c.cntlid);
        }
        by_nqn
    }
}

/// A live controller of a subsystem, as [`Target::connected`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerInfo {
    /// Its controller ID.
    pub cntlid: u16,
    /// The host that connected it.
    pub hostnqn: String,
    /// I/O queues connected.
    pub io_queues: usize,
}
