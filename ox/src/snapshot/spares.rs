//! Read buffers a snapshot uses again: a chunk's buffer comes back once its frame is
//! encoded (from another OX core, with its batch's answer), so the next read of a chunk
//! needs no fresh allocation. A fresh one is zeroed (`alloc_zeroed`) only for the
//! device to overwrite it: 8 % of the writer's core at zstd 9 with two OX cores.
//!
//! A buffer given out again holds an earlier chunk's bytes until the read overwrites
//! them; every device fills a successful read's buffers whole (a sparse file's holes
//! and a RAM disk's untouched blocks as zeroes: `bdev/tests/devices.rs` checks), and a
//! failed read's buffers are never looked at.

use std::cell::RefCell;
use std::rc::Rc;

use bdev::IoBuf;

use crate::blockio::Bytes;

/// Spare buffers kept at most. A buffer is made only when none is spare, so the spares
/// never outnumber the chunks the snapshot held at once (read ahead, and being
/// encoded); this bounds them should that change.
const MOST_SPARE: usize = 128;

/// The writer's spare read buffers, shared by its read-ahead (which takes) and its
/// encoders (which give back). One core's: never sent elsewhere.
#[derive(Clone, Default)]
pub(super) struct Spares(Rc<RefCell<Vec<IoBuf>>>);

impl Spares {
    /// A buffer of `len` bytes to read into: a spare one if one is big enough (its
    /// bytes are an earlier chunk's), else a new one.
    pub(super) fn take(&self, len: usize) -> IoBuf {
        let spare = self.0.borrow_mut().pop();
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
        let mut spares = self.0.borrow_mut();
        if spares.len() < MOST_SPARE {
            spares.push(buf);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_is_taken_again_at_the_length_asked() {
        let spares = Spares::default();
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
        for _ in 0..MOST_SPARE + 5 {
            spares.give(Bytes::Read(IoBuf::new(512)));
        }
        assert_eq!(spares.len(), MOST_SPARE);
    }
}
