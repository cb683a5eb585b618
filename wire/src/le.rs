//! Little-endian field access for wire structures. Callers pass offsets inside buffers
//! whose length they have checked (a fixed-size command, a page, a message whose length
//! was validated first): an offset beyond the buffer is a bug in the caller, never a
//! property of the input, so it stops at once with the offset and the length rather
//! than reading as zero or writing nothing.

/// The `len` bytes at `off` of `b`, or a stop naming the bad field.
#[track_caller]
fn field(b: &[u8], off: usize, len: usize) -> &[u8] {
    match off.checked_add(len).and_then(|end| b.get(off..end)) {
        Some(s) => s,
        None => panic!(
            "{len}-byte field at offset {off} is beyond a {}-byte buffer",
            b.len()
        ),
    }
}

/// [`field`] for writing.
#[track_caller]
fn field_mut(b: &mut [u8], off: usize, len: usize) -> &mut [u8] {
    let size = b.len();
    match off.checked_add(len).and_then(|end| b.get_mut(off..end)) {
        Some(s) => s,
        None => panic!("{len}-byte field at offset {off} is beyond a {size}-byte buffer"),
    }
}

/// Reads a `u16` at `off`.
#[track_caller]
pub fn u16(b: &[u8], off: usize) -> u16 {
    let s = field(b, off, 2);
    u16::from_le_bytes([s[0], s[1]])
}

/// Reads a `u32` at `off`.
#[track_caller]
pub fn u32(b: &[u8], off: usize) -> u32 {
    let s = field(b, off, 4);
    u32::from_le_bytes([s[0], s[1], s[2], s[3]])
}

/// Reads a `u64` at `off`.
#[track_caller]
pub fn u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(field(b, off, 8));
    u64::from_le_bytes(a)
}

/// Writes `v` at `off`.
#[track_caller]
pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
    field_mut(b, off, 2).copy_from_slice(&v.to_le_bytes());
}

/// Writes `v` at `off`.
#[track_caller]
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    field_mut(b, off, 4).copy_from_slice(&v.to_le_bytes());
}

/// Writes `v` at `off`.
#[track_caller]
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    field_mut(b, off, 8).copy_from_slice(&v.to_le_bytes());
}

/// Writes `text` at `off`, space-padded to `len` bytes (NVMe ASCII string fields).
#[track_caller]
pub fn put_ascii(b: &mut [u8], off: usize, len: usize, text: &str) {
    let s = field_mut(b, off, len);
    s.fill(b' ');
    let n = text.len().min(len);
    s[..n].copy_from_slice(&text.as_bytes()[..n]);
}

/// Writes `text` at `off`, zero-padded to `len` bytes (NQN fields).
#[track_caller]
pub fn put_str0(b: &mut [u8], off: usize, len: usize, text: &str) {
    let s = field_mut(b, off, len);
    s.fill(0);
    let n = text.len().min(len.saturating_sub(1));
    s[..n].copy_from_slice(&text.as_bytes()[..n]);
}

/// Reads a NUL-terminated (or full-length) string field at `off`.
#[track_caller]
pub fn str0(b: &[u8], off: usize, len: usize) -> String {
    let s = field(b, off, len);
    let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
    String::from_utf8_lossy(&s[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_at_the_edges() {
        let mut b = [0u8; 16];
        put_u64(&mut b, 8, 0x0102_0304_0506_0708);
        put_u32(&mut b, 4, 0xAABB_CCDD);
        put_u16(&mut b, 0, 0x1234);
        assert_eq!(u64(&b, 8), 0x0102_0304_0506_0708);
        assert_eq!(u32(&b, 4), 0xAABB_CCDD);
        assert_eq!(u16(&b, 0), 0x1234);
        put_str0(&mut b, 0, 4, "nqn.x");
        assert_eq!(str0(&b, 0, 4), "nqn");
    }

    #[test]
    #[should_panic(expected = "2-byte field at offset 15 is beyond a 16-byte buffer")]
    fn a_read_past_the_end_stops_instead_of_reading_zero() {
        u16(&[0u8; 16], 15);
    }

    #[test]
    #[should_panic(expected = "8-byte field at offset 12 is beyond a 16-byte buffer")]
    fn a_write_past_the_end_stops_instead_of_writing_nothing() {
        put_u64(&mut [0u8; 16], 12, 1);
    }

    #[test]
    #[should_panic(expected = "beyond")]
    fn an_offset_that_overflows_stops() {
        u32(&[0u8; 16], usize::MAX - 1);
    }
}
