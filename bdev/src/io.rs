//! Block I/O requests and their completions.

use crate::buf::IoBuf;
use crate::error::BdevError;
use std::rc::Rc;

/// The kinds of block I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoType {
    /// Read blocks into the request's buffers.
    Read,
    /// Write the request's buffers to blocks.
    Write,
    /// Make every completed write durable.
    Flush,
    /// Set blocks to zero (no data transferred).
    WriteZeroes,
    /// Deallocate blocks; they read back as zeroes afterwards.
    Unmap,
}

impl IoType {
    /// Every kind, in a fixed order (used to index statistics).
    pub const ALL: [IoType; 5] = [
        IoType::Read,
        IoType::Write,
        IoType::Flush,
        IoType::WriteZeroes,
        IoType::Unmap,
    ];

    /// Its name in reports and metrics: `read`, `write`, `flush`, `write_zeroes`,
    /// `unmap`.
    pub fn name(self) -> &'static str {
        match self {
            IoType::Read => "read",
            IoType::Write => "write",
            IoType::Flush => "flush",
            IoType::WriteZeroes => "write_zeroes",
            IoType::Unmap => "unmap",
        }
    }

    /// Position in [`IoType::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether requests of this kind carry data buffers.
    pub fn has_data(self) -> bool {
        matches!(self, IoType::Read | IoType::Write)
    }
}

/// One block I/O request. Buffers are owned by the request while it is in flight and
/// handed back in its [`IoCompletion`].
#[derive(Debug)]
pub struct BdevIo {
    /// What to do.
    pub io_type: IoType,
    /// First block.
    pub offset_blocks: u64,
    /// Number of blocks (for reads and writes, the buffers must hold exactly this much).
    pub num_blocks: u64,
    /// Data segments, in order (reads and writes only).
    pub bufs: Vec<IoBuf>,
    /// Force unit access: the write is durable when it completes.
    pub fua: bool,
    /// Made by the appliance itself (a snapshot reading the volume, a copy of a chunk
    /// before a write over it), not a host: a clone does not read ahead of such a
    /// read of chunks it holds, and fetches what it lacks with its background work
    /// ([`crate::FetchReason::Internal`]) unless a host waits on it (`host_waits`).
    pub internal: bool,
    /// An internal request a host's request waits on (the copy of a chunk before the
    /// host's write over it): a clone fetches what it lacks as a host's miss.
    pub host_waits: bool,
}

impl BdevIo {
    /// Read `num_blocks` from `offset_blocks` into `bufs`.
    pub fn read(offset_blocks: u64, num_blocks: u64, bufs: Vec<IoBuf>) -> Self {
        Self {
            io_type: IoType::Read,
            offset_blocks,
            num_blocks,
            bufs,
            fua: false,
            internal: false,
            host_waits: false,
        }
    }

    /// Write `bufs` (holding `num_blocks` blocks) at `offset_blocks`.
    pub fn write(offset_blocks: u64, num_blocks: u64, bufs: Vec<IoBuf>) -> Self {
        Self {
            io_type: IoType::Write,
            offset_blocks,
            num_blocks,
            bufs,
            fua: false,
            internal: false,
            host_waits: false,
        }
    }

    /// Make all completed writes durable.
    pub fn flush() -> Self {
        Self::no_data(IoType::Flush, 0, 0)
    }

    /// Zero `num_blocks` from `offset_blocks`.
    pub fn write_zeroes(offset_blocks: u64, num_blocks: u64) -> Self {
        Self::no_data(IoType::WriteZeroes, offset_blocks, num_blocks)
    }

    /// Deallocate `num_blocks` from `offset_blocks`.
    pub fn unmap(offset_blocks: u64, num_blocks: u64) -> Self {
        Self::no_data(IoType::Unmap, offset_blocks, num_blocks)
    }

    /// Same request with force-unit-access set or cleared.
    pub fn with_fua(mut self, fua: bool) -> Self {
        self.fua = fua;
        self
    }

    /// Same request, marked as the appliance's own (see [`BdevIo::internal`]).
    pub fn internal(mut self) -> Self {
        self.internal = true;
        self
    }

    /// Same request, marked as the appliance's own with a host waiting on it (see
    /// [`BdevIo::host_waits`]).
    pub fn internal_for_host(mut self) -> Self {
        self.internal = true;
        self.host_waits = true;
        self
    }

    fn no_data(io_type: IoType, offset_blocks: u64, num_blocks: u64) -> Self {
        Self {
            io_type,
            offset_blocks,
            num_blocks,
            bufs: Vec::new(),
            fua: false,
            internal: false,
            host_waits: false,
        }
    }

    /// Total bytes in the data buffers.
    pub fn buf_len(&self) -> u64 {
        self.bufs.iter().map(|b| b.len() as u64).sum()
    }
}

/// The outcome of a request: its buffers back, and whether it succeeded.
#[derive(Debug)]
pub struct IoCompletion {
    /// The request's buffers (filled, for a successful read).
    pub bufs: Vec<IoBuf>,
    /// Success, or why the request failed.
    pub result: Result<(), BdevError>,
}

impl IoCompletion {
    /// A successful completion.
    pub fn ok(bufs: Vec<IoBuf>) -> Self {
        Self {
            bufs,
            result: Ok(()),
        }
    }

    /// A failed completion.
    pub fn err(bufs: Vec<IoBuf>, error: BdevError) -> Self {
        Self {
            bufs,
            result: Err(error),
        }
    }

    /// The buffers concatenated: one copy of each (a copy-before-write copy kept in
    /// memory is taken this way). A byte-by-byte collect here was most of what the
    /// reactor spent serving a snapshot's reads when they were taken this way too.
    pub fn data(&self) -> Vec<u8> {
        let mut data = Vec::with_capacity(self.bufs.iter().map(|b| b.len()).sum());
        for b in &self.bufs {
            data.extend_from_slice(b);
        }
        data
    }
}

/// Called exactly once, on the submitting reactor, when a request completes
/// ([`IoDone::complete`]): the submitter's closure and, before it, what a device
/// stacked on another must learn of the request's end ([`IoDone::noting`]: a volume
/// counting its writes in flight), without a closure of its own per request. (A boxed
/// closure per write was a large share of what a volume added to a RAM device's write.)
pub struct IoDone {
    then: Box<dyn FnOnce(IoCompletion)>,
    first: Option<Rc<dyn Finished>>,
}

/// What learns that a request it passed down has completed, before its submitter.
pub trait Finished {
    /// The request has completed (called once per request noted).
    fn finished(&self);
}

impl IoDone {
    /// `then` is called with the completion.
    pub fn new(then: impl FnOnce(IoCompletion) + 'static) -> Self {
        Self {
            then: Box::new(then),
            first: None,
        }
    }

    /// Delivers `completion`: what was noted learns first, then the submitter.
    pub fn complete(self, completion: IoCompletion) {
        if let Some(first) = self.first {
            first.finished();
        }
        (self.then)(completion)
    }

    /// This completion, with `note` learning of it first. Free where nothing is noted
    /// yet (one device stacked on another); a closure of its own otherwise.
    pub fn noting(self, note: Rc<dyn Finished>) -> Self {
        match self.first {
            None => Self {
                then: self.then,
                first: Some(note),
            },
            Some(_) => Self::new(move |c| {
                note.finished();
                self.complete(c)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    struct Log(Rc<RefCell<Vec<&'static str>>>, &'static str);

    impl Finished for Log {
        fn finished(&self) {
            self.0.borrow_mut().push(self.1);
        }
    }

    /// What is noted learns of the completion once, before the submitter, however many
    /// devices note it.
    #[test]
    fn noted_devices_learn_first_and_once() {
        let seen = Rc::new(RefCell::new(Vec::new()));
        let s = Rc::clone(&seen);
        let done = IoDone::new(move |c: IoCompletion| {
            assert!(c.result.is_ok());
            s.borrow_mut().push("submitter");
        });
        let first: Rc<dyn Finished> = Rc::new(Log(Rc::clone(&seen), "noted first"));
        let second: Rc<dyn Finished> = Rc::new(Log(Rc::clone(&seen), "noted second"));
        done.noting(first)
            .noting(second)
            .complete(IoCompletion::ok(Vec::new()));
        // The later note learns first, as nested closures did: a device noting a request
        // it got from above learns of its end before the one above it.
        assert_eq!(*seen.borrow(), ["noted second", "noted first", "submitter"]);

        // Dropped without completing (a reactor stopping): nobody hears of it.
        seen.borrow_mut().clear();
        let s = Rc::clone(&seen);
        let noted: Rc<dyn Finished> = Rc::new(Log(Rc::clone(&seen), "noted"));
        drop(IoDone::new(move |_| s.borrow_mut().push("submitter")).noting(noted));
        assert!(seen.borrow().is_empty());
    }
}
