//! Per-reactor recycling of data buffers, so the I/O path does not allocate and zero a
//! fresh aligned buffer for every command. Buffers return when their data has been
//! sent (reads) or written (writes); a recycled buffer's old contents are always fully
//! overwritten before anyone sees them.

use std::cell::RefCell;

use bdev::IoBuf;

/// Buffers kept per size class.
const PER_CLASS: usize = 256;
/// Largest buffer kept (bigger ones are freed).
const MAX_KEPT: usize = 1 << 20;

/// Small byte vectors (PDU headers) kept.
const SMALL_KEPT: usize = 1024;
/// Capacity of a new small vector: a data PDU header with its digest and padding to
/// 32 bytes, or a response capsule, fits without growing.
const SMALL_CAP: usize = 64;
/// Largest small vector kept.
const SMALL_MAX: usize = 256;

/// Empty buffer lists kept (a request's `bufs`, one per command in flight).
const LISTS_KEPT: usize = 1024;

thread_local! {
    static POOL: RefCell<Vec<(usize, Vec<IoBuf>)>> = const { RefCell::new(Vec::new()) };
    static SMALL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    static LISTS: RefCell<Vec<Vec<IoBuf>>> = const { RefCell::new(Vec::new()) };
}

/// A request's buffer list holding `buf`, reusing a list an earlier request gave back
/// (each command would otherwise allocate and free one).
pub(crate) fn list_of(buf: IoBuf) -> Vec<IoBuf> {
    let mut list = LISTS
        .with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(1));
    list.push(buf);
    list
}

/// Returns an emptied buffer list for reuse on this reactor.
pub(crate) fn give_list(list: Vec<IoBuf>) {
    debug_assert!(
        list.is_empty(),
        "a list is given back once its buffers are taken"
    );
    if list.capacity() == 0 || !list.is_empty() {
        return;
    }
    LISTS.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < LISTS_KEPT {
            p.push(list);
        }
    });
}

/// An empty byte vector for a PDU header, reusing one sent earlier on this reactor.
pub(crate) fn small() -> Vec<u8> {
    SMALL
        .with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(SMALL_CAP))
}

/// Returns a header's vector for reuse on this reactor (ones too small to hold a
/// header without growing, such as a data digest's, and large ones are freed).
pub(crate) fn give_small(mut v: Vec<u8>) {
    if !(SMALL_CAP..=SMALL_MAX).contains(&v.capacity()) {
        return;
    }
    v.clear();
    SMALL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < SMALL_KEPT {
            p.push(v);
        }
    });
}

/// A buffer of `len` bytes whose contents the caller will overwrite entirely.
pub(crate) fn take(len: usize) -> IoBuf {
    let cap = len.max(1).next_multiple_of(bdev::IO_ALIGN);
    let reused = POOL.with(|p| {
        p.borrow_mut()
            .iter_mut()
            .find(|(c, _)| *c == cap)
            .and_then(|(_, list)| list.pop())
    });
    match reused {
        Some(mut buf) => {
            // Same capacity class, so `len` always fits.
            if buf.set_len(len) {
                buf
            } else {
                IoBuf::new(len)
            }
        }
        None => IoBuf::new(len),
    }
}

/// A buffer holding a copy of `data`.
pub(crate) fn copy_of(data: &[u8]) -> IoBuf {
    let mut buf = take(data.len());
    buf.copy_from_slice(data);
    buf
}

/// Returns a buffer for reuse on this reactor.
pub(crate) fn give(buf: IoBuf) {
    let cap = buf.capacity();
    if cap > MAX_KEPT {
        return;
    }
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        match p.iter_mut().find(|(c, _)| *c == cap) {
            Some((_, list)) if list.len() < PER_CLASS => list.push(buf),
            Some(_) => {}
            None => p.push((cap, vec![buf])),
        }
    });
}
