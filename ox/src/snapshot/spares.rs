//! Read buffers a snapshot uses again: a chunk's buffer comes back once its frame is
//! encoded (from another OX core, with its batch's answer), so the next device read of
//! a chunk needs no fresh allocation. A fresh one is zeroed (`alloc_zeroed`) only for
//! the device to overwrite it: ~8 % of the writer's samples at zstd 9 with two OX
//! cores (BENCHMARKS.md).
//!
//! A buffer given out again holds an earlier chunk's bytes until the read overwrites
//! them. Every device fills a successful read's buffers whole: the file, RAM and null
//! devices write each byte, holes and never-written blocks as zeroes
//! (`bdev/tests/devices.rs` checks), and volumes and clones pass reads to one of them
//! (a clone's miss is copied whole from the fetched chunk). A failed read's buffers
//! are dropped, never looked at.

use std::cell::RefCell;
use std::rc::Rc;

use bdev::IoBuf;

use crate::blockio::Bytes;

/// The writer's spare read buffers, shared by its reads — of the device, and of
/// copies saved before hosts' writes — (which take) and its encoders (which give
/// back). One core's: never sent elsewhere.
#[derive(Clone)]
pub(super) struct Spares(Rc<Inner>);

struct Inner {
    bufs: RefCell<Vec<IoBuf>>,
    /// Spares kept at most: the chunks a snapshot holds at once (a buffer is made only
    /// when no spare is big enough; past this many, one given back is let go).
    most: usize,
}

impl Spares {
    /// A pool keeping at most `most` spare buffers.
    pub(super) fn new(most: usize) -> Self {
        Self(Rc::new(Inner {
            bufs: RefCell::new(Vec::with_capacity(most)),
            most,
        }))
    }

    /// A buffer of `len` bytes to read into: a spare one if one is big enough (its
    /// bytes are an earlier chunk's), else a new one.
    pub(super) fn take(&self, len: usize) -> IoBuf {
        let spare = self.0.bufs.borrow_mut().pop();
        if let Some(mut buf) = spare
            && buf.set_len(len)
        {
            return buf;
        }
        IoBuf::new(len)
    }

    /// Keeps a chunk's buffer once its frame is encoded (bytes kept in a `Vec` are
    /// dropped: they were never a read's buffer).
    pub(super) fn give(&self, bytes: Bytes) {
        let Bytes::Read(buf) = bytes else { return };
        let mut spares = self.0.bufs.borrow_mut();
        if spares.len() < self.0.most {
            spares.push(buf);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.bufs.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_is_taken_again_at_the_length_asked() {
        let spares = Spares::new(4);
        let mut buf = spares.take(8192);
        buf.fill(7);
        let at = buf.as_ptr();
        spares.give(Bytes::Read(buf));
        spares.give(Bytes::Kept(vec![1; 8192]));
        assert_eq!(spares.len(), 1, "a Vec's bytes are not kept");
        let again = spares.take(4096);
        assert_eq!(
            (again.as_ptr(), again.len()),
            (at, 4096),
            "the same buffer, shorter"
        );
        assert_eq!(spares.len(), 0);
        // Too small for what is asked: a new buffer, and the spare is let go.
        spares.give(Bytes::Read(again));
        let bigger = spares.take(3 << 20);
        assert_eq!(bigger.len(), 3 << 20);
        assert!(bigger.iter().all(|&b| b == 0));
        for _ in 0..9 {
            spares.give(Bytes::Read(IoBuf::new(512)));
        }
        assert_eq!(spares.len(), 4, "no more than the most kept");
    }
}
