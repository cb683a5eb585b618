//! `malloc`: a RAM-backed block device, sparse and shared by every core.
//!
//! Memory is held in 2 MiB segments allocated on first write, so a large device costs
//! only what has been written. Segments are 2 MiB-aligned and advised as huge pages, so
//! random access over a large device does not miss the TLB on every request. Each segment has its own lock, held only for the copy
//! of that segment's part of a request; two cores rarely touch the same segment at once,
//! so the lock is an uncontended atomic in practice. Racing unsynchronised copies would
//! be undefined behaviour in Rust, which is why the locks exist at all.

use std::sync::{Arc, RwLock};

use uuid::Uuid;

use crate::bdev::{BackendChannel, Bdev, BdevBackend, BdevInfo};
use crate::completions::ReadyQueue;
use crate::error::BdevError;
use crate::io::{BdevIo, IoCompletion, IoDone, IoType};

const SEGMENT: u64 = 2 << 20;

type Segment = RwLock<Option<HugeSegment>>;

/// One zeroed, 2 MiB-aligned, huge-page-advised block of memory.
struct HugeSegment {
    ptr: std::ptr::NonNull<u8>,
}

// SAFETY: HugeSegment uniquely owns its allocation, like Box<[u8]>.
unsafe impl Send for HugeSegment {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for HugeSegment {}

impl HugeSegment {
    const LAYOUT: std::alloc::Layout =
        match std::alloc::Layout::from_size_align(SEGMENT as usize, SEGMENT as usize) {
            Ok(l) => l,
            Err(_) => panic!("segment layout"),
        };

    fn new() -> Self {
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc(Self::LAYOUT) };
        let Some(ptr) = std::ptr::NonNull::new(raw) else {
            std::alloc::handle_alloc_error(Self::LAYOUT)
        };
        // Advise before the first touch, so the pages fault in as huge pages; failure
        // only loses the hint.
        // SAFETY: advising memory we just allocated.
        unsafe { libc::madvise(raw.cast(), SEGMENT as usize, libc::MADV_HUGEPAGE) };
        // SAFETY: zeroing the whole allocation we own (this also initialises it).
        unsafe { std::ptr::write_bytes(raw, 0, SEGMENT as usize) };
        Self { ptr }
    }
}

impl std::ops::Deref for HugeSegment {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the allocation is SEGMENT bytes, initialised (zeroed in `new`), owned
        // by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), SEGMENT as usize) }
    }
}

impl std::ops::DerefMut for HugeSegment {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), SEGMENT as usize) }
    }
}

impl Drop for HugeSegment {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::LAYOUT) };
    }
}

struct Store {
    segments: Box<[Segment]>,
}

impl Store {
    /// Calls `f(segment, offset_in_segment, range_in_request)` for each piece of the
    /// byte range `offset..offset+len`.
    fn for_each_piece(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&Segment, usize, std::ops::Range<usize>),
    ) {
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let seg = (pos / SEGMENT) as usize;
            let within = (pos % SEGMENT) as usize;
            let n = (SEGMENT - pos % SEGMENT).min(len - done);
            f(
                &self.segments[seg],
                within,
                done as usize..(done + n) as usize,
            );
            done += n;
        }
    }

    fn read(&self, offset: u64, out: &mut [u8]) {
        self.for_each_piece(offset, out.len() as u64, |segment, within, range| {
            let guard = segment.read().unwrap_or_else(|p| p.into_inner());
            let dst = &mut out[range.clone()];
            match guard.as_deref() {
                Some(data) => dst.copy_from_slice(&data[within..within + range.len()]),
                None => dst.fill(0),
            }
        });
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.for_each_piece(offset, data.len() as u64, |segment, within, range| {
            let mut guard = segment.write().unwrap_or_else(|p| p.into_inner());
            let seg = guard.get_or_insert_with(HugeSegment::new);
            seg[within..within + range.len()].copy_from_slice(&data[range]);
        });
    }

    fn zero(&self, offset: u64, len: u64) {
        self.for_each_piece(offset, len, |segment, within, range| {
            let mut guard = segment.write().unwrap_or_else(|p| p.into_inner());
            if range.len() as u64 == SEGMENT {
                *guard = None; // Whole segment: give the memory back.
            } else if let Some(seg) = guard.as_mut() {
                seg[within..within + range.len()].fill(0);
            }
        });
    }
}

struct Malloc {
    store: Arc<Store>,
}

impl BdevBackend for Malloc {
    fn supports(&self, _io_type: IoType) -> bool {
        true
    }

    fn create_channel(&self, info: &BdevInfo) -> Result<Box<dyn BackendChannel>, BdevError> {
        let reactor = reactor::current().ok_or(BdevError::NotOnReactor)?;
        Ok(Box::new(MallocChannel {
            store: Arc::clone(&self.store),
            ready: ReadyQueue::new(reactor),
            block_size: u64::from(info.block_size),
        }))
    }

    /// Segments written to (and not since zeroed whole), in blocks.
    fn allocated_blocks(&self, info: &BdevInfo) -> Option<u64> {
        let held = self
            .store
            .segments
            .iter()
            .filter(|s| s.read().unwrap_or_else(|p| p.into_inner()).is_some())
            .count() as u64;
        Some(held * SEGMENT / u64::from(info.block_size))
    }
}

struct MallocChannel {
    store: Arc<Store>,
    ready: ReadyQueue,
    block_size: u64,
}

impl MallocChannel {
    fn execute(&self, io: &mut BdevIo) {
        let block_size = self.block_size;
        let mut offset = io.offset_blocks * block_size;
        match io.io_type {
            IoType::Read => {
                for buf in &mut io.bufs {
                    self.store.read(offset, buf);
                    offset += buf.len() as u64;
                }
            }
            IoType::Write => {
                for buf in &io.bufs {
                    self.store.write(offset, buf);
                    offset += buf.len() as u64;
                }
            }
            IoType::WriteZeroes | IoType::Unmap => {
                self.store.zero(offset, io.num_blocks * block_size);
            }
            IoType::Flush => {}
        }
    }
}

impl BackendChannel for MallocChannel {
    fn submit(&self, mut io: BdevIo, done: IoDone) {
        self.execute(&mut io);
        self.ready.complete(done, IoCompletion::ok(io.bufs));
    }
}

/// Creates a RAM-backed device of `num_blocks` blocks of `block_size` bytes.
pub fn create_malloc(
    name: &str,
    block_size: u32,
    num_blocks: u64,
    uuid: Option<Uuid>,
) -> Result<Bdev, BdevError> {
    let info = BdevInfo {
        name: name.to_string(),
        block_size,
        num_blocks,
        uuid: uuid.unwrap_or_else(Uuid::new_v4),
    };
    info.validate()?;
    let segments = info.size_bytes().div_ceil(SEGMENT);
    if segments > 1 << 24 {
        return Err(BdevError::Config {
            name: name.to_string(),
            reason: "malloc devices are limited to 16 TiB".into(),
        });
    }
    let store = Store {
        segments: (0..segments).map(|_| RwLock::new(None)).collect(),
    };
    Bdev::new(
        info,
        Malloc {
            store: Arc::new(store),
        },
    )
}
