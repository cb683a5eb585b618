//! `preserve`: a volume's durable store of copy-before-write chunks, so that a running
//! snapshot's point-in-time image survives a restart or a crash of the appliance.
//!
//! A sparse file with one slot per chunk: slot *c* starts at *c* × (header + chunk
//! bytes). A header block names the snapshot (a random token), the chunk, the data's
//! length and its CRC32C, and carries its own CRC32C; the chunk's old contents follow.
//! A copy is written (header and data in one write, FUA) and has completed before the
//! host write that displaces it is issued. Recovery walks only the file's allocated
//! extents (`SEEK_DATA`/`SEEK_HOLE`), so it costs what was saved, not the volume size.
//! A slot whose token, chunk, length or checksums do not match is not a copy: it was
//! torn by a crash (and its host write never issued), or belongs to another snapshot.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::bdev::Bdev;
use crate::buf::IoBuf;
use crate::error::BdevError;
use crate::io::BdevIo;
use crate::uring::{UringConfig, open_uring};

const MAGIC: &[u8; 8] = b"OXCBW001";
/// Bytes reserved in the armed abandonment marker for its reason.
const MARKER_BYTES: usize = 4096;
/// Bytes of the header block that carry fields (the rest is zero).
const HEADER_FIELDS: usize = 44;

/// The store: the file, through an io_uring device for the write path, and directly
/// for truncation and recovery.
pub(crate) struct Preserve {
    /// The file as a block device (same block size as the volume).
    pub(crate) bdev: Bdev,
    file: File,
    path: PathBuf,
    header: u64,
    chunk_bytes: u64,
    volume_bytes: u64,
    chunks: u64,
    /// The running snapshot's token, written into every header.
    token: Mutex<[u8; 16]>,
    /// The running snapshot was abandoned (the marker is on disk), and why.
    abandoned: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl Preserve {
    /// Opens (creating if needed, never truncating) the store at `path` for a volume of
    /// `volume_bytes` in chunks of `chunk_bytes` with `block_size` blocks.
    pub(crate) fn open(
        name: &str,
        path: &Path,
        volume_bytes: u64,
        chunk_bytes: u64,
        block_size: u32,
    ) -> Result<Self, BdevError> {
        let header = u64::from(block_size).max(HEADER_FIELDS as u64);
        let chunks = volume_bytes.div_ceil(chunk_bytes);
        let size = chunks * (header + chunk_bytes);
        let mut config = UringConfig::new(&format!("{name}-cbw"), path);
        config.block_size = Some(block_size);
        config.create_size = Some(size);
        let bdev = match open_uring(&config) {
            Ok(b) => b,
            Err(_) => {
                // File systems without O_DIRECT (tmpfs): buffered writes with FUA are
                // as durable, through the page cache.
                config.direct = false;
                open_uring(&config)?
            }
        };
        let file = File::options()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| BdevError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            bdev,
            file,
            path: path.to_path_buf(),
            header,
            chunk_bytes,
            volume_bytes,
            chunks,
            token: Mutex::new([0; 16]),
            abandoned: AtomicBool::new(false),
            reason: Mutex::new(None),
        })
    }

    fn error(&self, reason: impl Into<String>) -> BdevError {
        BdevError::Preserve {
            path: self.path.display().to_string(),
            reason: reason.into(),
        }
    }

    fn slot_bytes(&self) -> u64 {
        self.header + self.chunk_bytes
    }

    fn chunk_len(&self, chunk: u64) -> u64 {
        (self.volume_bytes - chunk * self.chunk_bytes).min(self.chunk_bytes)
    }

    fn block_size(&self) -> u64 {
        u64::from(self.bdev.block_size())
    }

    /// The running snapshot's token.
    pub(crate) fn token(&self) -> [u8; 16] {
        *self.token.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Empties the store (freeing its space), forgets an abandoned snapshot, arms the
    /// marker for abandoning the next one, and adopts `token` for the copies to come.
    pub(crate) fn reset(&self, token: [u8; 16]) -> Result<(), BdevError> {
        let size = self.chunks * self.slot_bytes();
        self.file
            .set_len(0)
            .and_then(|()| self.file.set_len(size))
            .and_then(|()| crate::fsutil::remove_file(&self.marker_path("abandoned")))
            .and_then(|()| self.arm())
            .map_err(|e| self.error(format!("emptying: {e}")))?;
        self.abandoned.store(false, Ordering::SeqCst);
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.adopt(token);
        Ok(())
    }

    /// Beside the store: `abandoned` is present (with the reason) once the running
    /// snapshot has been abandoned, until the next one begins; `abandoned.armed` is its
    /// space, reserved in advance, since abandoning happens when the disk is full.
    fn marker_path(&self, which: &str) -> PathBuf {
        let mut p = self.path.as_os_str().to_owned();
        p.push(".");
        p.push(which);
        PathBuf::from(p)
    }

    /// Reserves the abandonment marker's space (a written, fsynced file).
    pub(crate) fn arm(&self) -> std::io::Result<()> {
        crate::fsutil::replace_file(&self.marker_path("abandoned.armed"), &[b' '; MARKER_BYTES])
    }

    /// Records durably that the running snapshot is abandoned (a copy could not be
    /// written), so that no restart continues it. Needs no new space on disk: the
    /// armed marker is overwritten in place (best effort) and renamed. Once only.
    pub(crate) fn abandon(&self, reason: &str) -> std::io::Result<()> {
        if self.abandoned.load(Ordering::SeqCst) {
            return Ok(());
        }
        let (armed, marker) = (
            self.marker_path("abandoned.armed"),
            self.marker_path("abandoned"),
        );
        match File::options().write(true).open(&armed) {
            Ok(f) => {
                let text = reason.as_bytes();
                // The reason is for people; the rename is what counts.
                let _ = f.write_all_at(&text[..text.len().min(MARKER_BYTES)], 0);
                let _ = f.sync_all();
                std::fs::rename(&armed, &marker)?;
                crate::fsutil::sync_dir_of(&marker)?;
            }
            // Not armed (a store opened by an older build): write one.
            Err(_) => crate::fsutil::replace_file(&marker, reason.as_bytes())?,
        }
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_string());
        self.abandoned.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Whether the running snapshot was abandoned (cheap: for the write path).
    pub(crate) fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::SeqCst)
    }

    /// Why the running snapshot was abandoned, if it was.
    pub(crate) fn abandoned(&self) -> Option<String> {
        if !self.is_abandoned() {
            return None;
        }
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether the marker says the snapshot was abandoned (at recovery: anything but a
    /// clear "no marker" counts as abandoned).
    pub(crate) fn abandoned_on_disk(&self) -> Option<String> {
        match std::fs::read(self.marker_path("abandoned")) {
            Ok(r) => Some(String::from_utf8_lossy(&r).trim_end().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => Some(format!("its marker cannot be read: {e}")),
        }
    }

    /// Takes `token` as the running snapshot's (after recovery: the copies stay).
    pub(crate) fn adopt(&self, token: [u8; 16]) {
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = token;
    }

    /// Frees the store's space once no snapshot needs it.
    pub(crate) fn release(&self) {
        let size = self.chunks * self.slot_bytes();
        // Failing to free space loses nothing: the next snapshot empties it again.
        let _ = self.file.set_len(0).and_then(|()| self.file.set_len(size));
    }

    /// The write that saves `data` (the chunk's old contents) into its slot: header
    /// and data together, FUA, so it is durable when it completes.
    pub(crate) fn copy_write(&self, chunk: u64, token: &[u8; 16], data: Vec<IoBuf>) -> BdevIo {
        let len: usize = data.iter().map(|b| b.len()).sum();
        let crc = data.iter().fold(0, |crc, b| crc32c::crc32c_append(crc, b));
        let mut header = IoBuf::new(self.header as usize);
        header[..HEADER_FIELDS].copy_from_slice(&encode_header(token, chunk, len as u32, crc));
        let mut bufs = Vec::with_capacity(data.len() + 1);
        bufs.push(header);
        bufs.extend(data);
        let bs = self.block_size();
        BdevIo::write(
            chunk * self.slot_bytes() / bs,
            (self.header + len as u64) / bs,
            bufs,
        )
        .with_fua(true)
    }

    /// Where chunk `chunk`'s copy lies on [`Self::bdev`]: (first block, blocks).
    pub(crate) fn copy_blocks(&self, chunk: u64) -> (u64, u64) {
        let bs = self.block_size();
        (
            (chunk * self.slot_bytes() + self.header) / bs,
            self.chunk_len(chunk) / bs,
        )
    }

    /// The chunks holding an intact copy made under `token`, among those `wanted`.
    pub(crate) fn scan(
        &self,
        token: &[u8; 16],
        wanted: impl Fn(u64) -> bool,
    ) -> Result<Vec<u64>, BdevError> {
        use rustix::fs::SeekFrom;
        let slot = self.slot_bytes();
        let mut found = Vec::new();
        let mut pos = 0;
        loop {
            let data = match rustix::fs::seek(&self.file, SeekFrom::Data(pos)) {
                Ok(at) => at,
                Err(rustix::io::Errno::NXIO) => break,
                Err(e) => return Err(self.error(format!("finding saved copies: {e}"))),
            };
            let hole = rustix::fs::seek(&self.file, SeekFrom::Hole(data))
                .map_err(|e| self.error(format!("finding saved copies: {e}")))?;
            let mut chunk = data.div_ceil(slot);
            while chunk < self.chunks && chunk * slot < hole {
                if wanted(chunk) && self.intact(chunk, token)? {
                    found.push(chunk);
                }
                chunk += 1;
            }
            if hole <= pos {
                break;
            }
            pos = hole;
        }
        Ok(found)
    }

    /// Whether slot `chunk` holds an intact copy made under `token`.
    fn intact(&self, chunk: u64, token: &[u8; 16]) -> Result<bool, BdevError> {
        let at = chunk * self.slot_bytes();
        let mut header = [0u8; HEADER_FIELDS];
        self.file
            .read_exact_at(&mut header, at)
            .map_err(|e| self.error(format!("reading slot {chunk}: {e}")))?;
        let len = self.chunk_len(chunk);
        let Some(crc) = decode_header(&header, token, chunk, len as u32) else {
            return Ok(false);
        };
        let mut data = vec![0u8; len as usize];
        match self.file.read_exact_at(&mut data, at + self.header) {
            Ok(()) => Ok(crc32c::crc32c(&data) == crc),
            // A copy cut short by a crash.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
            Err(e) => Err(self.error(format!("reading slot {chunk}: {e}"))),
        }
    }
}

fn encode_header(token: &[u8; 16], chunk: u64, len: u32, crc: u32) -> [u8; HEADER_FIELDS] {
    let mut h = [0u8; HEADER_FIELDS];
    h[..8].copy_from_slice(MAGIC);
    h[8..24].copy_from_slice(token);
    h[24..32].copy_from_slice(&chunk.to_le_bytes());
    h[32..36].copy_from_slice(&len.to_le_bytes());
    h[36..40].copy_from_slice(&crc.to_le_bytes());
    let own = crc32c::crc32c(&h[..40]);
    h[40..44].copy_from_slice(&own.to_le_bytes());
    h
}

/// The data's CRC32C if `h` is an intact header for (`token`, `chunk`, `len`).
fn decode_header(h: &[u8; HEADER_FIELDS], token: &[u8; 16], chunk: u64, len: u32) -> Option<u32> {
    let field = |r: std::ops::Range<usize>| h.get(r).unwrap_or_default();
    let own = u32::from_le_bytes(field(40..44).try_into().ok()?);
    let ok = field(0..8) == MAGIC
        && field(8..24) == token
        && field(24..32) == chunk.to_le_bytes()
        && field(32..36) == len.to_le_bytes()
        && crc32c::crc32c(field(0..40)) == own;
    ok.then(|| u32::from_le_bytes(field(36..40).try_into().unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_reject_any_mismatch() {
        let token = [7u8; 16];
        let h = encode_header(&token, 42, 65536, 0xdead_beef);
        assert_eq!(decode_header(&h, &token, 42, 65536), Some(0xdead_beef));
        assert_eq!(
            decode_header(&h, &[8u8; 16], 42, 65536),
            None,
            "other snapshot"
        );
        assert_eq!(decode_header(&h, &token, 43, 65536), None, "other chunk");
        assert_eq!(decode_header(&h, &token, 42, 512), None, "other length");
        for i in 0..HEADER_FIELDS {
            let mut bad = h;
            bad[i] ^= 1;
            assert_eq!(decode_header(&bad, &token, 42, 65536), None, "byte {i}");
        }
        assert_eq!(decode_header(&[0; HEADER_FIELDS], &[0; 16], 0, 0), None);
    }
}
