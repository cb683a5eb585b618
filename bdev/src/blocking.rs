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
    let (tx, rx) = crossbeam_channel::bounded(1);
    let bdev = bdev.clone();
    on.send(move || match bdev.channel() {
        Ok(channel) => channel.submit(io, move |completion| {
            let _ = tx.send(completion);
        }),
        Err(e) => {
            let _ = tx.send(IoCompletion::err(io.bufs, e));
        }
    })?;
    Ok(rx)
}

/// Runs `io` on reactor `on` and waits up to `timeout` for it to complete.
pub fn run_on(
    on: &ReactorHandle,
    bdev: &Bdev,
    io: BdevIo,
    timeout: Duration,
) -> Result<IoCompletion, BdevError> {
    let rx = submit_on(on, bdev, io)?;
    rx.recv_timeout(timeout).map_err(|_| {
        BdevError::Reactor(ReactorError::Timeout {
            reactor: on.index(),
            millis: timeout.as_millis() as u64,
        })
    })
}
