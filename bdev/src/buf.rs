//! Owned, aligned I/O buffers.
//!
//! The kernel reads and writes these while an io_uring operation is in flight, so a
//! buffer is always owned (moved into the operation and handed back on completion),
//! never lent. 4096-byte alignment satisfies O_DIRECT on every device we support.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every [`IoBuf`].
pub const IO_ALIGN: usize = 4096;

/// A zero-initialised heap buffer aligned to [`IO_ALIGN`].
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: IoBuf uniquely owns its allocation, like Vec<u8>.
unsafe impl Send for IoBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> Self {
        let cap = len.max(1).next_multiple_of(IO_ALIGN);
        let Ok(layout) = Layout::from_size_align(cap, IO_ALIGN) else {
            alloc::handle_alloc_error(Layout::new::<u8>())
        };
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        Self { ptr, len, cap }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut buf = Self::new(data.len());
        buf.copy_from_slice(data);
        buf
    }

    /// Shortens the buffer to `len` bytes (no effect if it is already shorter).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Grows or shrinks the visible length within the allocation; new bytes are
    /// whatever the allocation held (zero if never written). Returns false if `len`
    /// exceeds the capacity.
    pub fn set_len(&mut self, len: usize) -> bool {
        if len > self.cap {
            return false;
        }
        self.len = len;
        true
    }

    /// Bytes allocated.
    pub fn capacity(&self) -> usize {
        self.cap
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `cap >= len` initialised (zeroed) bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Clone for IoBuf {
    fn clone(&self) -> Self {
        Self::from_slice(self)
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf").field("len", &self.len).finish()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this size and alignment.
        unsafe {
            alloc::dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.cap, IO_ALIGN),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [0, 1, 512, 4096, 4097, 1 << 20] {
            let buf = IoBuf::new(len);
            assert_eq!(buf.len(), len);
            assert_eq!(buf.as_ptr() as usize % IO_ALIGN, 0);
            assert!(buf.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn copies_and_resizes() {
        let mut buf = IoBuf::from_slice(b"hello");
        assert_eq!(&buf[..], b"hello");
        buf.truncate(2);
        assert_eq!(&buf[..], b"he");
        assert!(buf.set_len(5));
        assert_eq!(&buf[..], b"hello");
        assert!(!buf.set_len(buf.capacity() + 1));
        assert_eq!(&buf.clone()[..], b"hello");
    }
}
