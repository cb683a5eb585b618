//! Submitting block I/O from threads that are not reactors (control plane, OX cores,
//! tests): the request travels to a reactor as a message and the completion comes back
//! over a channel.

use std::time::Duration;

use crossbeam_channel::Receiver;
use reactor::{ReactorError, ReactorHandle};

use crate::bdev::Bdev;
use crate::error::BdevError;
use crate::io::{BdevIo, IoCompletion};

/// Sends `io` to reactor `on` for `bdev`; the receiver yields its completion. Fails at
/// once if the reactor's mailbox is full or the reactor has stopped.
pub fn submit_on(
    on: &ReactorHandle,
    bdev: &Bdev,
    io: BdevIo,
) -> Result<Receiver<IoCompletion>, BdevError> {
    submit_within(on, bdev, io, None)
}

/// Like [`submit_on`], but waits up to `patience` (`Some`) for room in a full mailbox.
fn submit_within(
    on: &ReactorHandle,
    bdev: &Bdev,
    io: BdevIo,
    patience: Option<Duration>,
) -> Result<Receiver<IoCompletion>, BdevError> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let bdev = bdev.clone();
    let msg: reactor::Message = Box::new(move || match bdev.channel() {
        Ok(channel) => channel.submit(io, move |completion| {
            let _ = tx.send(completion);
        }),
        Err(e) => {
            let _ = tx.send(IoCompletion::err(io.bufs, e));
        }
    });
    match patience {
        Some(p) => on.send_within(msg, p),
        None => on.try_send(msg),
    }
    .map_err(|(e, _)| BdevError::Reactor(e))?;
    Ok(rx)
}

/// Runs `io` on reactor `on` and waits for it to complete: up to `timeout` for room in
/// the reactor's mailbox if it is full, and up to `timeout` for the completion.
pub fn run_on(
    on: &ReactorHandle,
    bdev: &Bdev,
    io: BdevIo,
    timeout: Duration,
) -> Result<IoCompletion, BdevError> {
    let rx = submit_within(on, bdev, io, Some(timeout))?;
    rx.recv_timeout(timeout).map_err(|_| {
        BdevError::Reactor(ReactorError::Timeout {
            reactor: on.index(),
            millis: timeout.as_millis() as u64,
        })
    })
}
