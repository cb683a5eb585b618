//! Little-endian field access for wire structures. Callers pass offsets inside buffers
//! whose length they have already checked; out-of-range reads yield zero rather than
//! panic, so a mistake can never crash a reactor.

/// Reads a `u16` at `off`.
pub fn u16(b: &[u8], off: usize) -> u16 {
    b.get(off..off + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

/// Reads a `u32` at `off`.
pub fn u32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Reads a `u64` at `off`.
pub fn u64(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8).map_or(0, |s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_le_bytes(a)
    })
}

/// Writes `v` at `off` (ignored if out of range).
pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
    if let Some(s) = b.get_mut(off..off + 2) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

/// Writes `v` at `off` (ignored if out of range).
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    if let Some(s) = b.get_mut(off..off + 4) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

/// Writes `v` at `off` (ignored if out of range).
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    if let Some(s) = b.get_mut(off..off + 8) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

/// Writes `text` at `off`, space-padded to `len` bytes (NVMe ASCII string fields).
pub fn put_ascii(b: &mut [u8], off: usize, len: usize, text: &str) {
    if let Some(s) = b.get_mut(off..off + len) {
        s.fill(b' ');
        let n = text.len().min(len);
        s[..n].copy_from_slice(&text.as_bytes()[..n]);
    }
}

/// Writes `text` at `off`, zero-padded to `len` bytes (NQN fields).
pub fn put_str0(b: &mut [u8], off: usize, len: usize, text: &str) {
    if let Some(s) = b.get_mut(off..off + len) {
        s.fill(0);
        let n = text.len().min(len.saturating_sub(1));
        s[..n].copy_from_slice(&text.as_bytes()[..n]);
    }
}

/// Reads a NUL-terminated (or full-length) string field at `off`.
pub fn str0(b: &[u8], off: usize, len: usize) -> String {
    let s = b.get(off..off + len).unwrap_or_default();
    let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
    String::from_utf8_lossy(&s[..end]).into_owned()
}
