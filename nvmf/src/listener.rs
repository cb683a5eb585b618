//! Accepting connections: each listening socket is polled by one reactor through its
//! io_uring (an Accept operation kept in flight); every accepted socket takes a pending
//! slot ([`crate::admission`]) or is closed at once, and is handed, as a message, to
//! the next reactor in turn, where it lives for its whole life.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use reactor::io_uring::{opcode, types};
use reactor::{ReactorHandle, current};

use crate::admission;
use crate::conn::Conn;
use crate::error::NvmfError;
use crate::target::TargetShared;

/// Starts accepting on `listener` from reactor `on`.
pub(crate) fn spawn(
    target: &Arc<TargetShared>,
    on: &ReactorHandle,
    listener: TcpListener,
    local: SocketAddr,
) -> Result<(), NvmfError> {
    let target = Arc::clone(target);
    on.send(move || {
        let l = Rc::new(Listening {
            target,
            listener,
            local,
        });
        if let Some(r) = current() {
            let weak = Rc::downgrade(&l);
            r.on_stop(move || {
                if let Some(l) = weak.upgrade() {
                    // Wakes the pending Accept (it fails with EINVAL) so the reactor
                    // need not wait for it.
                    // SAFETY: shutdown on a socket `l` owns and keeps open.
                    unsafe { libc::shutdown(l.listener.as_raw_fd(), libc::SHUT_RDWR) };
                }
            });
        }
        l.accept();
    })?;
    Ok(())
}

struct Listening {
    target: Arc<TargetShared>,
    listener: TcpListener,
    local: SocketAddr,
}

impl Listening {
    fn accept(self: &Rc<Self>) {
        let Some(r) = current() else { return };
        if r.is_stopping() {
            return;
        }
        let fd = types::Fd(self.listener.as_raw_fd());
        let entry = opcode::Accept::new(fd, std::ptr::null_mut(), std::ptr::null_mut())
            .flags(libc::SOCK_CLOEXEC)
            .build();
        let this = Rc::clone(self);
        // SAFETY: the operation uses no memory of ours beyond the listening socket,
        // which `this` (owned by the completion) keeps open.
        unsafe { r.submit(entry, Box::new(move |res| this.accepted(res))) };
    }

    fn accepted(self: &Rc<Self>, res: i32) {
        let Some(r) = current() else { return };
        if res >= 0 {
            // SAFETY: a successful accept returns a new descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(res) };
            let socket = std::net::TcpStream::from(fd);
            let local = self.local;
            let Ok(peer) = socket.peer_addr() else {
                // Gone already.
                return self.accept();
            };
            let target = Arc::clone(&self.target);
            match admission::admit(r.handle(), local, peer.ip(), &target.limits) {
                Ok(ticket) => {
                    let fd = OwnedFd::from(socket);
                    let to = self.target.pick_reactor().clone();
                    if let Err(e) = to.send(move || Conn::start(target, fd, local, peer, ticket)) {
                        eprintln!("nvmf: dropping connection on {local}: {e}");
                    }
                }
                Err(why) => {
                    // Closed unread: it cannot take a real host's place.
                    drop(socket);
                    target.refused(local, peer, why.reason());
                }
            }
            self.accept();
        } else if res == -libc::ECANCELED || r.is_stopping() {
            // Reactor shutting down: stop accepting; the socket closes with `self`.
        } else {
            // Out of descriptors or memory: back off briefly rather than spin.
            let this = Rc::clone(self);
            eprintln!(
                "nvmf: accept on {} failed: {}",
                self.local,
                std::io::Error::from_raw_os_error(-res)
            );
            r.after(Duration::from_millis(10), move || this.accept());
        }
    }
}
