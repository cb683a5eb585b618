//! `uring`: a file or raw block device driven through the submitting core's io_uring.
//!
//! Each reactor's channel submits to that reactor's own ring, so two cores share the
//! file descriptor and nothing else. The file is opened with O_DIRECT by default (I/O
//! buffers are [`IoBuf`]s, aligned for it); a file system that refuses O_DIRECT is a
//! clear error unless buffered mode is asked for explicitly. Flush is `fdatasync`, FUA is
//! `RWF_DSYNC`; write-zeroes and unmap use `fallocate` and fall back to writing zeroes
//! where the file system cannot.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use reactor::Reactor;
use reactor::io_uring::{opcode, squeue, types};
use uuid::Uuid;

use crate::bdev::{BackendChannel, Bdev, BdevBackend, BdevInfo};
use crate::buf::IoBuf;
use crate::error::BdevError;
use crate::io::{BdevIo, IoCompletion, IoDone, IoType};

/// How to open a `uring` device.
#[derive(Debug, Clone)]
pub struct UringConfig {
    /// Device name.
    pub name: String,
    /// A regular file or a block device node.
    pub path: PathBuf,
    /// Logical block size; defaults to the device's logical sector size, at least 512.
    pub block_size: Option<u32>,
    /// Use O_DIRECT (the default). `false` is buffered I/O through the page cache.
    pub direct: bool,
    /// For regular files: create the file if missing and grow it to this many bytes.
    pub create_size: Option<u64>,
    /// The file or device must exist and have exactly this many bytes (a device the
    /// appliance made before, reopened): never created, grown or shrunk.
    pub expect_size: Option<u64>,
    /// Stable identity; a random one if not given.
    pub uuid: Option<Uuid>,
}

impl UringConfig {
    /// O_DIRECT access to an existing file or device.
    pub fn new(name: &str, path: impl Into<PathBuf>) -> Self {
        Self {
            name: name.to_string(),
            path: path.into(),
            block_size: None,
            direct: true,
            create_size: None,
            expect_size: None,
            uuid: None,
        }
    }
}

struct Backing {
    file: File,
    /// Set once fallocate has been refused: later zeroing writes zeroes directly.
    no_fallocate: AtomicBool,
}

struct Uring {
    backing: Arc<Backing>,
}

impl BdevBackend for Uring {
    fn supports(&self, _io_type: IoType) -> bool {
        true
    }

    fn create_channel(&self, info: &BdevInfo) -> Result<Box<dyn BackendChannel>, BdevError> {
        let reactor = reactor::current().ok_or(BdevError::NotOnReactor)?;
        Ok(Box::new(UringChannel {
            backing: Arc::clone(&self.backing),
            reactor,
            block_size: u64::from(info.block_size),
        }))
    }

    /// A regular file's allocated extent (a sparse file holds only what was written);
    /// a block device counts as wholly allocated.
    fn allocated_blocks(&self, info: &BdevInfo) -> Option<u64> {
        let st = rustix::fs::fstat(&self.backing.file).ok()?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return None;
        }
        let bytes = u64::try_from(st.st_blocks).ok()?.saturating_mul(512);
        Some(bytes.div_ceil(u64::from(info.block_size)))
    }
}

struct UringChannel {
    backing: Arc<Backing>,
    reactor: Rc<Reactor>,
    block_size: u64,
}

impl BackendChannel for UringChannel {
    fn submit(&self, io: BdevIo, done: IoDone) {
        let offset = io.offset_blocks * self.block_size;
        let len = io.num_blocks * self.block_size;
        let fd = types::Fd(self.backing.file.as_raw_fd());
        match io.io_type {
            IoType::Read | IoType::Write => Transfer {
                reactor: Rc::clone(&self.reactor),
                backing: Arc::clone(&self.backing),
                io,
                done,
                offset,
                moved: 0,
                iovecs: Vec::new(),
            }
            .issue(),
            IoType::Flush => {
                let entry = opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build();
                let on_complete = Box::new(move |res: i32| {
                    done.complete(finish(io.bufs, IoType::Flush, res));
                });
                // SAFETY: fsync references no memory.
                unsafe { self.reactor.submit(entry, on_complete) };
            }
            IoType::WriteZeroes | IoType::Unmap => {
                let zeroing = Zeroing {
                    reactor: Rc::clone(&self.reactor),
                    backing: Arc::clone(&self.backing),
                    io_type: io.io_type,
                    offset,
                    end: offset + len,
                    zeroes: None,
                    done,
                };
                if self.backing.no_fallocate.load(Ordering::Relaxed) {
                    zeroing.write_next();
                } else {
                    zeroing.fallocate();
                }
            }
        }
    }
}

/// Maps a CQE result for a request without data to its completion.
fn finish(bufs: Vec<IoBuf>, io_type: IoType, res: i32) -> IoCompletion {
    if res < 0 {
        IoCompletion::err(
            bufs,
            BdevError::Io {
                io_type,
                errno: -res,
            },
        )
    } else {
        IoCompletion::ok(bufs)
    }
}

/// A read or write in flight: owns the request's buffers (and the iovecs pointing at
/// them) until the kernel is done, and resubmits the rest after a short transfer.
struct Transfer {
    reactor: Rc<Reactor>,
    backing: Arc<Backing>,
    io: BdevIo,
    done: IoDone,
    /// Byte offset of the request on the device.
    offset: u64,
    /// Bytes transferred so far.
    moved: u64,
    iovecs: Vec<libc::iovec>,
}

impl Transfer {
    fn issue(mut self) {
        let fd = types::Fd(self.backing.file.as_raw_fd());
        let write = self.io.io_type == IoType::Write;
        // Find the segment (and position in it) where the remaining bytes start.
        let mut skip = self.moved as usize;
        let mut first = 0;
        while skip >= self.io.bufs[first].len() {
            skip -= self.io.bufs[first].len();
            first += 1;
        }
        let file_offset = self.offset + self.moved;
        let rw_flags = if write && self.io.fua {
            libc::RWF_DSYNC
        } else {
            0
        };
        let entry: squeue::Entry = if first + 1 == self.io.bufs.len() {
            let buf = &mut self.io.bufs[first];
            let len = (buf.len() - skip) as u32;
            // SAFETY: `skip < buf.len()`, so the pointer stays inside the buffer.
            let ptr = unsafe { buf.as_mut_ptr().add(skip) };
            if write {
                opcode::Write::new(fd, ptr, len)
                    .offset(file_offset)
                    .rw_flags(rw_flags)
                    .build()
            } else {
                opcode::Read::new(fd, ptr, len).offset(file_offset).build()
            }
        } else {
            self.iovecs.clear();
            for (i, buf) in self.io.bufs[first..].iter_mut().enumerate() {
                let start = if i == 0 { skip } else { 0 };
                self.iovecs.push(libc::iovec {
                    // SAFETY: `start <= buf.len()`, so the pointer stays inside the buffer.
                    iov_base: unsafe { buf.as_mut_ptr().add(start) }.cast(),
                    iov_len: buf.len() - start,
                });
            }
            let n = self.iovecs.len() as u32;
            if write {
                opcode::Writev::new(fd, self.iovecs.as_ptr(), n)
                    .offset(file_offset)
                    .rw_flags(rw_flags)
                    .build()
            } else {
                opcode::Readv::new(fd, self.iovecs.as_ptr(), n)
                    .offset(file_offset)
                    .build()
            }
        };
        let reactor = Rc::clone(&self.reactor);
        // SAFETY: the entry points into the buffers and the iovec array, heap allocations
        // that `self` owns (moving `self` does not move them); the completion closure owns
        // `self` and frees them only after the kernel has finished.
        unsafe { reactor.submit(entry, Box::new(move |res| self.complete(res))) };
    }

    fn complete(mut self, res: i32) {
        let io_type = self.io.io_type;
        let total = self.io.buf_len();
        if res == -libc::EAGAIN || res == -libc::EINTR {
            return self.issue();
        }
        let result = if res < 0 {
            Err(BdevError::Io {
                io_type,
                errno: -res,
            })
        } else if res == 0 {
            Err(BdevError::ShortTransfer {
                io_type,
                offset: self.offset + self.moved,
            })
        } else {
            self.moved += res as u64;
            if self.moved < total {
                return self.issue();
            }
            Ok(())
        };
        let Transfer { io, done, .. } = self;
        done.complete(IoCompletion {
            bufs: io.bufs,
            result,
        });
    }
}

/// Write-zeroes or unmap: `fallocate` when the file system can, else zeroes written
/// in chunks of up to 1 MiB.
struct Zeroing {
    reactor: Rc<Reactor>,
    backing: Arc<Backing>,
    io_type: IoType,
    offset: u64,
    end: u64,
    zeroes: Option<IoBuf>,
    done: IoDone,
}

const ZERO_CHUNK: u64 = 1 << 20;

impl Zeroing {
    fn fallocate(self) {
        let fd = types::Fd(self.backing.file.as_raw_fd());
        let mode = match self.io_type {
            IoType::Unmap => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            _ => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        };
        let entry = opcode::Fallocate::new(fd, self.end - self.offset)
            .offset(self.offset)
            .mode(mode)
            .build();
        let reactor = Rc::clone(&self.reactor);
        let on_complete = Box::new(move |res: i32| {
            if res == -libc::EOPNOTSUPP || res == -libc::EINVAL || res == -libc::ENODEV {
                self.backing.no_fallocate.store(true, Ordering::Relaxed);
                return self.write_next();
            }
            let io_type = self.io_type;
            self.done.complete(finish(Vec::new(), io_type, res));
        });
        // SAFETY: fallocate references no memory.
        unsafe { reactor.submit(entry, on_complete) };
    }

    fn write_next(mut self) {
        if self.offset >= self.end {
            return self.done.complete(IoCompletion::ok(Vec::new()));
        }
        let len = (self.end - self.offset).min(ZERO_CHUNK);
        let zeroes = self
            .zeroes
            .get_or_insert_with(|| IoBuf::new(ZERO_CHUNK as usize));
        let entry = opcode::Write::new(
            types::Fd(self.backing.file.as_raw_fd()),
            zeroes.as_ptr(),
            len as u32,
        )
        .offset(self.offset)
        .build();
        let reactor = Rc::clone(&self.reactor);
        let on_complete = Box::new(move |res: i32| {
            if res <= 0 {
                let errno = if res == 0 { libc::EIO } else { -res };
                let io_type = self.io_type;
                return self.done.complete(IoCompletion::err(
                    Vec::new(),
                    BdevError::Io { io_type, errno },
                ));
            }
            let mut next = self;
            next.offset += res as u64;
            next.write_next();
        });
        // SAFETY: the entry points into the zero buffer owned by `self`, which the
        // completion closure owns until the kernel is done with it.
        unsafe { reactor.submit(entry, on_complete) };
    }
}

// ioctl numbers from <linux/fs.h>.
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

fn block_device_geometry(file: &File) -> io::Result<(u64, u32)> {
    let mut size: u64 = 0;
    let mut sector: libc::c_int = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer, which points at `size`.
    if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: BLKSSZGET writes one int to the pointer, which points at `sector`.
    if unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut sector) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((size, sector.max(512) as u32))
}

fn open_error(path: &Path, direct: bool, source: io::Error) -> BdevError {
    if direct && source.raw_os_error() == Some(libc::EINVAL) {
        BdevError::DirectIoUnsupported {
            path: path.to_path_buf(),
        }
    } else {
        BdevError::Open {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Opens a file or block device as a `uring` device.
pub fn open_uring(config: &UringConfig) -> Result<Bdev, BdevError> {
    let path = &config.path;
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    if config.direct {
        options.custom_flags(libc::O_DIRECT);
    }
    if config.create_size.is_some() {
        if config.expect_size.is_some() {
            return Err(BdevError::Config {
                name: config.name.clone(),
                reason: "create_size and expect_size exclude each other".into(),
            });
        }
        options.create(true);
    }
    let file = options
        .open(path)
        .map_err(|e| open_error(path, config.direct, e))?;
    let meta = file.metadata().map_err(|source| BdevError::Open {
        path: path.clone(),
        source,
    })?;
    let (size, sector) = if meta.file_type().is_block_device() {
        block_device_geometry(&file).map_err(|source| BdevError::Open {
            path: path.clone(),
            source,
        })?
    } else if meta.is_file() {
        let mut size = meta.len();
        if let Some(want) = config.create_size
            && size < want
        {
            file.set_len(want).map_err(|source| BdevError::Open {
                path: path.clone(),
                source,
            })?;
            size = want;
        }
        (size, 512)
    } else {
        return Err(BdevError::Config {
            name: config.name.clone(),
            reason: format!(
                "{} is neither a regular file nor a block device",
                path.display()
            ),
        });
    };
    if let Some(expected) = config.expect_size
        && size != expected
    {
        return Err(BdevError::SizeMismatch {
            path: path.clone(),
            expected,
            found: size,
        });
    }
    let block_size = config.block_size.unwrap_or(sector);
    if block_size < sector {
        return Err(BdevError::Config {
            name: config.name.clone(),
            reason: format!("block size {block_size} is below the device's {sector}-byte sector"),
        });
    }
    if size % u64::from(block_size) != 0 {
        return Err(BdevError::Config {
            name: config.name.clone(),
            reason: format!("size {size} is not a multiple of the block size {block_size}"),
        });
    }
    let info = BdevInfo {
        name: config.name.clone(),
        block_size,
        num_blocks: size / u64::from(block_size),
        uuid: config.uuid.unwrap_or_else(Uuid::new_v4),
    };
    info.validate()?;
    if config.direct {
        probe_direct(&file, block_size).map_err(|e| open_error(path, true, e))?;
    }
    Bdev::new(
        info,
        Uring {
            backing: Arc::new(Backing {
                file,
                no_fallocate: AtomicBool::new(false),
            }),
        },
    )
}

/// Some file systems accept O_DIRECT at open and refuse it at the first read.
fn probe_direct(file: &File, block_size: u32) -> io::Result<()> {
    let mut buf = IoBuf::new(block_size as usize);
    // SAFETY: reads at most `buf.len()` bytes into the live buffer we own.
    let n = unsafe { libc::pread(file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
