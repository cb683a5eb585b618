//! `cutfs`: a file system whose power the test can cut, served by the test process over
//! FUSE, so that a real oxd can keep its state directory, its volumes' and clones' files
//! on it and then lose what it never made durable (in the spirit of FoundationDB's
//! `AsyncFileNonDurable`, one level down: under the daemon, not under one device).
//!
//! What survives a cut follows what `fsync(2)` promises and no more:
//! - a file's contents and size are durable once it is synced (`fsync` or `fdatasync`);
//!   each 4 KiB page written since then is, at the cut, lost, kept or torn at 512-byte
//!   sector granularity, independently (so writes are also reordered), and its size is
//!   either the synced one or the current one;
//! - names (creates, links, renames, removals, directories) are changed in order, as a
//!   journal records them: syncing a directory makes every change up to the last one
//!   touching that directory durable; a cut keeps a random prefix of the rest. A rename
//!   is one change: a file is never lost by being renamed. Syncing a file does not make
//!   its name durable.
//!
//! Every open is direct I/O (no page cache) and nothing is cached by the kernel (entry
//! and attribute timeouts are zero), so the daemon sees exactly this state; the test
//! unmounts before a cut and mounts again after it, so no request of the dead daemon can
//! land after the power came back. One mutex guards the state: this is a test fixture,
//! and the daemon's I/O is serialized by FUSE's single session thread anyway.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

const PAGE: u64 = 4096;
const SECTOR: usize = 512;
const ROOT: u64 = 1;
/// Nothing is cached by the kernel: every lookup and stat asks us.
const TTL: Duration = Duration::ZERO;

type Page = Box<[u8]>;

fn zero_page() -> Page {
    vec![0u8; PAGE as usize].into_boxed_slice()
}

/// A regular file's contents: what is on the media and what was changed since the
/// last sync.
#[derive(Default)]
struct Contents {
    /// Pages on the media (absent: a hole).
    durable: BTreeMap<u64, Page>,
    durable_size: u64,
    /// Pages changed since the last sync: written (`Some`) or punched (`None`).
    dirty: BTreeMap<u64, Option<Page>>,
    size: u64,
}

impl Contents {
    fn page(&self, p: u64) -> Option<&Page> {
        match self.dirty.get(&p) {
            Some(changed) => changed.as_ref(),
            None => self.durable.get(&p),
        }
    }

    fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        let end = (offset + len).min(self.size);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut at = offset;
        while at < end {
            let p = at / PAGE;
            let from = (at % PAGE) as usize;
            let to = ((end - p * PAGE).min(PAGE)) as usize;
            match self.page(p) {
                Some(page) => out.extend_from_slice(&page[from..to]),
                None => out.resize(out.len() + (to - from), 0),
            }
            at = p * PAGE + to as u64;
        }
        out
    }

    /// Changes `[offset, offset + len)` of the current view: `data` or zeros.
    fn change(&mut self, offset: u64, len: u64, data: Option<&[u8]>) {
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let p = at / PAGE;
            let from = (at % PAGE) as usize;
            let to = ((end - p * PAGE).min(PAGE)) as usize;
            let whole = from == 0 && to == PAGE as usize;
            let new = match data {
                None if whole => None,
                None if self.page(p).is_none() => None,
                _ => {
                    let mut page = self.page(p).cloned().unwrap_or_else(zero_page);
                    let dst = &mut page[from..to];
                    match data {
                        Some(d) => {
                            let src = (at - offset) as usize;
                            dst.copy_from_slice(&d[src..src + (to - from)]);
                        }
                        None => dst.fill(0),
                    }
                    Some(page)
                }
            };
            self.dirty.insert(p, new);
            at = p * PAGE + to as u64;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.change(offset, data.len() as u64, Some(data));
        self.size = self.size.max(offset + data.len() as u64);
    }

    fn truncate(&mut self, size: u64) {
        if size < self.size {
            let last = self.durable.keys().chain(self.dirty.keys()).max().copied();
            if let Some(last) = last {
                let end = (last + 1) * PAGE;
                if end > size {
                    self.change(size, end - size, None);
                }
            }
        }
        self.size = size;
    }

    /// Makes the pages of `[offset, offset + len)` durable, and the size up to there.
    fn sync_range(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        for p in offset / PAGE..=(offset + len - 1) / PAGE {
            match self.dirty.remove(&p) {
                Some(Some(page)) => {
                    self.durable.insert(p, page);
                }
                Some(None) => {
                    self.durable.remove(&p);
                }
                None => {}
            }
        }
        self.durable_size = self.durable_size.max((offset + len).min(self.size));
    }

    fn sync(&mut self) {
        for (p, page) in std::mem::take(&mut self.dirty) {
            match page {
                Some(page) => self.durable.insert(p, page),
                None => self.durable.remove(&p),
            };
        }
        self.durable_size = self.size;
    }

    /// Power is cut: each changed page is lost, kept or torn; the size is the synced
    /// or the current one.
    fn cut(&mut self, rng: &mut Rng, stats: &mut CutStats) {
        for (p, page) in std::mem::take(&mut self.dirty) {
            stats.pages_unsynced += 1;
            match rng.below(3) {
                0 => stats.pages_lost += 1,
                1 => {
                    match page {
                        Some(page) => self.durable.insert(p, page),
                        None => self.durable.remove(&p),
                    };
                }
                _ => {
                    stats.pages_torn += 1;
                    let mut old = self.durable.remove(&p).unwrap_or_else(zero_page);
                    let new = page.unwrap_or_else(zero_page);
                    for s in 0..PAGE as usize / SECTOR {
                        if rng.below(2) == 0 {
                            let r = s * SECTOR..(s + 1) * SECTOR;
                            old[r.clone()].copy_from_slice(&new[r]);
                        }
                    }
                    self.durable.insert(p, old);
                }
            }
        }
        // Any size between the synced and the current one: an append may be cut short
        // mid-record.
        if self.size != self.durable_size {
            let (lo, hi) = (
                self.size.min(self.durable_size),
                self.size.max(self.durable_size),
            );
            self.durable_size = lo + rng.below(hi - lo + 1);
        }
        // Nothing lies beyond the end: a file extended later reads zeros there.
        let size = self.durable_size;
        self.durable.retain(|&p, _| p * PAGE < size);
        if let Some(page) = self.durable.get_mut(&(size / PAGE)) {
            page[(size % PAGE) as usize..].fill(0);
        }
        self.size = size;
    }

    fn allocated(&self) -> u64 {
        let mut pages: Vec<u64> = self.durable.keys().copied().collect();
        pages.extend(
            self.dirty
                .iter()
                .filter(|(_, p)| p.is_some())
                .map(|(k, _)| *k),
        );
        pages.sort_unstable();
        pages.dedup();
        pages.retain(|&p| self.page(p).is_some());
        pages.len() as u64 * PAGE
    }

    /// SEEK_DATA (`data`) or SEEK_HOLE from `offset`, by page.
    fn seek(&self, offset: u64, data: bool) -> Option<u64> {
        if offset >= self.size {
            return None;
        }
        let mut p = offset / PAGE;
        while p * PAGE < self.size {
            if self.page(p).is_some() == data {
                return Some((p * PAGE).max(offset));
            }
            p += 1;
        }
        if data { None } else { Some(self.size) }
    }
}

enum Kind {
    File(Contents),
    Dir,
}

struct Inode {
    kind: Kind,
    perm: u16,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
}

/// One change of the name space: `name` in directory `dir` now names `ino` (or nothing).
#[derive(Clone)]
struct NameChange {
    dir: u64,
    name: OsString,
    ino: Option<u64>,
}

/// What cuts did, for the test's report.
#[derive(Default, Debug, Clone, Copy)]
pub struct CutStats {
    pub cuts: u64,
    pub pages_unsynced: u64,
    pub pages_lost: u64,
    pub pages_torn: u64,
    pub name_changes_unsynced: u64,
    pub name_changes_lost: u64,
    pub file_syncs: u64,
    pub dir_syncs: u64,
    /// Writes made durable by themselves (O_DSYNC, `RWF_DSYNC`: what FUA becomes).
    pub dsync_writes: u64,
}

/// A seeded xorshift sequence (the test's own and the cuts').
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

struct State {
    /// By number (ordered, so a seed replays the same cut).
    inodes: BTreeMap<u64, Inode>,
    /// The name space as the daemon sees it.
    names: BTreeMap<(u64, OsString), u64>,
    /// The name space on the media.
    durable_names: BTreeMap<(u64, OsString), u64>,
    /// Changes not yet durable, in order; each entry is applied whole (a rename is two
    /// name changes in one entry).
    journal: Vec<Vec<NameChange>>,
    next_ino: u64,
    rng: Rng,
    stats: CutStats,
}

impl State {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let inode = self.inodes.get(&ino)?;
        let names = self.names.values().filter(|&&i| i == ino).count() as u32;
        let (kind, size, allocated, nlink) = match &inode.kind {
            Kind::File(c) => (FileType::RegularFile, c.size, c.allocated(), names),
            Kind::Dir => (FileType::Directory, 4096, 4096, 2),
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: allocated / 512,
            atime: inode.mtime,
            mtime: inode.mtime,
            ctime: inode.mtime,
            crtime: inode.mtime,
            kind,
            perm: inode.perm,
            nlink,
            uid: inode.uid,
            gid: inode.gid,
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    fn contents(&mut self, ino: u64) -> Result<&mut Contents, Errno> {
        match self.inodes.get_mut(&ino).map(|i| &mut i.kind) {
            Some(Kind::File(c)) => Ok(c),
            Some(Kind::Dir) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn is_dir(&self, ino: u64) -> bool {
        matches!(self.inodes.get(&ino).map(|i| &i.kind), Some(Kind::Dir))
    }

    fn is_empty_dir(&self, ino: u64) -> bool {
        self.names
            .range((ino, OsString::new())..)
            .next()
            .is_none_or(|((d, _), _)| *d != ino)
    }

    fn change_names(&mut self, changes: Vec<NameChange>) {
        for c in &changes {
            apply(&mut self.names, c);
        }
        self.journal.push(changes);
    }

    /// Makes every journalled change up to the last one touching `dir` durable.
    fn sync_dir(&mut self, dir: u64) {
        self.stats.dir_syncs += 1;
        if let Some(last) = self
            .journal
            .iter()
            .rposition(|e| e.iter().any(|c| c.dir == dir))
        {
            for entry in self.journal.drain(..=last) {
                for c in &entry {
                    apply(&mut self.durable_names, c);
                }
            }
        }
    }

    fn new_inode(&mut self, kind: Kind, perm: u16, (uid, gid): (u32, u32)) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(
            ino,
            Inode {
                kind,
                perm,
                uid,
                gid,
                mtime: SystemTime::now(),
            },
        );
        ino
    }

    /// A new file or directory `name` in `dir` (`None`: the name is taken).
    fn make(
        &mut self,
        dir: u64,
        name: &OsStr,
        kind: Kind,
        perm: u16,
        req: &Request,
    ) -> Option<FileAttr> {
        if self.names.contains_key(&(dir, name.to_os_string())) {
            return None;
        }
        let ino = self.new_inode(kind, perm, (req.uid(), req.gid()));
        self.change_names(vec![NameChange {
            dir,
            name: name.into(),
            ino: Some(ino),
        }]);
        self.attr(ino)
    }

    fn cut(&mut self) {
        self.stats.cuts += 1;
        let kept = self.rng.below(self.journal.len() as u64 + 1) as usize;
        self.stats.name_changes_unsynced += self.journal.len() as u64;
        self.stats.name_changes_lost += (self.journal.len() - kept) as u64;
        for entry in self.journal.drain(..).take(kept) {
            for c in &entry {
                apply(&mut self.durable_names, c);
            }
        }
        self.names = self.durable_names.clone();
        // What no name reaches is gone (the daemon is dead: nothing is open).
        let mut live: std::collections::HashSet<u64> = self.names.values().copied().collect();
        live.insert(ROOT);
        self.inodes.retain(|ino, _| live.contains(ino));
        let (rng, stats) = (&mut self.rng, &mut self.stats);
        for inode in self.inodes.values_mut() {
            if let Kind::File(c) = &mut inode.kind {
                c.cut(rng, stats);
            }
        }
    }
}

fn apply(names: &mut BTreeMap<(u64, OsString), u64>, c: &NameChange) {
    let key = (c.dir, c.name.clone());
    match c.ino {
        Some(ino) => names.insert(key, ino),
        None => names.remove(&key),
    };
}

/// The file system's state, shared by its FUSE sessions and the test.
#[derive(Clone)]
pub struct CutFs {
    state: Arc<Mutex<State>>,
}

/// A mounted `CutFs`; dropping it unmounts.
pub struct Mounted {
    session: Option<BackgroundSession>,
    pub path: PathBuf,
}

impl Mounted {
    /// Unmounts, waiting until the dead daemon's last files are closed (the kernel may
    /// still be tearing down its io_uring when the process has been reaped), then ends
    /// the session: no request reaches the state after this.
    fn unmount(&mut self) -> std::io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let path = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes())?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            // SAFETY: `path` is a valid NUL-terminated string for the call's duration.
            if unsafe { libc::umount2(path.as_ptr(), 0) } == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) || std::time::Instant::now() > deadline {
                // Detached, the session ends when the last file closes.
                // SAFETY: as above.
                unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
                return Err(e);
            }
            // The kernel closes the dead daemon's files by itself: look again shortly.
            std::thread::sleep(Duration::from_millis(1));
        }
        // Unmounted: the session's loop ends. The kernel may end it with ECONNABORTED
        // rather than ENODEV when the mount goes while a request is in flight (the
        // daemon killed mid-call); both are the end of this mount, not a failure.
        match session.join() {
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(()),
            ended => ended,
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = self.unmount();
    }
}

impl CutFs {
    pub fn new(seed: u64) -> Self {
        let mut inodes = BTreeMap::new();
        inodes.insert(
            ROOT,
            Inode {
                kind: Kind::Dir,
                perm: 0o755,
                uid: 0,
                gid: 0,
                mtime: SystemTime::now(),
            },
        );
        let state = State {
            inodes,
            names: BTreeMap::new(),
            durable_names: BTreeMap::new(),
            journal: Vec::new(),
            next_ino: ROOT + 1,
            // Not the test's own sequence from the same seed.
            rng: Rng((seed ^ 0x9E37_79B9_7F4A_7C15) | 1),
            stats: CutStats::default(),
        };
        CutFs {
            state: Arc::new(Mutex::new(state)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn mount(&self, path: &Path) -> Mounted {
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("cutfs".into())];
        let session = fuser::spawn_mount(self.clone(), path, &config).expect("mount cutfs");
        Mounted {
            session: Some(session),
            path: path.to_path_buf(),
        }
    }

    /// Cuts the power of an unmounted file system: what was not synced is lost, kept or
    /// torn, as the module doc says.
    pub fn cut(&self, mut mounted: Mounted) {
        mounted.unmount().expect("unmount cutfs");
        self.lock().cut();
    }

    pub fn stats(&self) -> CutStats {
        self.lock().stats
    }
}

fn direct() -> FopenFlags {
    FopenFlags::FOPEN_DIRECT_IO
}

impl Filesystem for CutFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let s = self.lock();
        match s
            .names
            .get(&(parent.0, name.to_os_string()))
            .and_then(|&i| s.attr(i))
        {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.lock().attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut s = self.lock();
        if let Some(size) = size {
            match s.contents(ino.0) {
                Ok(c) => c.truncate(size),
                Err(e) => return reply.error(e),
            }
        }
        let Some(inode) = s.inodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(mode) = mode {
            inode.perm = (mode & 0o7777) as u16;
        }
        inode.mtime = SystemTime::now();
        let attr = s.attr(ino.0).expect("present");
        reply.attr(&TTL, &attr);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let perm = (mode & !umask & 0o7777) as u16;
        match self.lock().make(parent.0, name, Kind::Dir, perm, req) {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::EEXIST),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.lock();
        match s.names.get(&(parent.0, name.to_os_string())) {
            None => reply.error(Errno::ENOENT),
            Some(&ino) if s.is_dir(ino) => reply.error(Errno::EISDIR),
            Some(_) => {
                s.change_names(vec![NameChange {
                    dir: parent.0,
                    name: name.into(),
                    ino: None,
                }]);
                reply.ok();
            }
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.lock();
        match s.names.get(&(parent.0, name.to_os_string())).copied() {
            None => reply.error(Errno::ENOENT),
            Some(ino) if !s.is_dir(ino) => reply.error(Errno::ENOTDIR),
            Some(ino) if !s.is_empty_dir(ino) => reply.error(Errno::ENOTEMPTY),
            Some(_) => {
                s.change_names(vec![NameChange {
                    dir: parent.0,
                    name: name.into(),
                    ino: None,
                }]);
                reply.ok();
            }
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut s = self.lock();
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            return reply.error(Errno::EINVAL);
        }
        let Some(ino) = s.names.get(&(parent.0, name.to_os_string())).copied() else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(&target) = s.names.get(&(newparent.0, newname.to_os_string())) {
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return reply.error(Errno::EEXIST);
            }
            if target == ino {
                return reply.ok();
            }
            match (s.is_dir(ino), s.is_dir(target)) {
                (false, true) => return reply.error(Errno::EISDIR),
                (true, false) => return reply.error(Errno::ENOTDIR),
                (true, true) if !s.is_empty_dir(target) => return reply.error(Errno::ENOTEMPTY),
                _ => {}
            }
        }
        s.change_names(vec![
            NameChange {
                dir: parent.0,
                name: name.into(),
                ino: None,
            },
            NameChange {
                dir: newparent.0,
                name: newname.into(),
                ino: Some(ino),
            },
        ]);
        reply.ok();
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let mut s = self.lock();
        if s.names.contains_key(&(newparent.0, newname.to_os_string())) {
            return reply.error(Errno::EEXIST);
        }
        if s.is_dir(ino.0) {
            return reply.error(Errno::EPERM);
        }
        let Some(attr) = s.attr(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        s.change_names(vec![NameChange {
            dir: newparent.0,
            name: newname.into(),
            ino: Some(ino.0),
        }]);
        reply.entry(&TTL, &attr, Generation(0));
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.lock().inodes.contains_key(&ino.0) {
            reply.opened(FileHandle(0), direct());
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let perm = (mode & !umask & 0o7777) as u16;
        let kind = Kind::File(Contents::default());
        match self.lock().make(parent.0, name, kind, perm, req) {
            Some(attr) => reply.created(&TTL, &attr, Generation(0), FileHandle(0), direct()),
            None => reply.error(Errno::EEXIST),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.lock().contents(ino.0) {
            Ok(c) => reply.data(&c.read(offset, u64::from(size))),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut s = self.lock();
        // A write asked to be durable by itself (O_DSYNC or O_SYNC on the file, or
        // RWF_DSYNC on the write: the kernel says so in these flags) is: its pages,
        // and the size that reaches them; nothing else of the file.
        let dsync = flags.0 & libc::O_DSYNC != 0;
        match s.contents(ino.0) {
            Ok(c) => {
                c.write(offset, data);
                if dsync {
                    c.sync_range(offset, data.len() as u64);
                }
            }
            Err(e) => return reply.error(e),
        }
        if dsync {
            s.stats.dsync_writes += 1;
        }
        if let Some(i) = s.inodes.get_mut(&ino.0) {
            i.mtime = SystemTime::now();
        }
        reply.written(data.len() as u32);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = self.lock();
        s.stats.file_syncs += 1;
        match s.contents(ino.0) {
            Ok(c) => {
                c.sync();
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let s = self.lock();
        if !s.is_dir(ino.0) {
            return reply.error(Errno::ENOTDIR);
        }
        let mut entries: Vec<(u64, FileType, OsString)> = vec![
            (ino.0, FileType::Directory, ".".into()),
            (ino.0, FileType::Directory, "..".into()),
        ];
        for ((_, name), &child) in s
            .names
            .range((ino.0, OsString::new())..)
            .take_while(|((d, _), _)| *d == ino.0)
        {
            let kind = if s.is_dir(child) {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            entries.push((child, kind, name.clone()));
        }
        for (i, (child, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.lock().sync_dir(ino.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(
            1 << 24,
            1 << 23,
            1 << 23,
            1 << 20,
            1 << 19,
            PAGE as u32,
            255,
            PAGE as u32,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut s = self.lock();
        let c = match s.contents(ino.0) {
            Ok(c) => c,
            Err(e) => return reply.error(e),
        };
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        match mode & !libc::FALLOC_FL_KEEP_SIZE {
            0 => {}
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE => {
                let end = if keep_size {
                    (offset + length).min(c.size)
                } else {
                    offset + length
                };
                if end > offset {
                    c.change(offset, end - offset, None);
                }
            }
            _ => return reply.error(Errno::EOPNOTSUPP),
        }
        if !keep_size {
            c.size = c.size.max(offset + length);
        }
        reply.ok();
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let mut s = self.lock();
        let c = match s.contents(ino.0) {
            Ok(c) => c,
            Err(e) => return reply.error(e),
        };
        let data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return reply.error(Errno::EINVAL),
        };
        match c.seek(offset.max(0) as u64, data) {
            Some(at) => reply.offset(at as i64),
            None => reply.error(Errno::ENXIO),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(s: &mut State, dir: u64, name: &str) -> u64 {
        let ino = s.new_inode(Kind::File(Contents::default()), 0o600, (0, 0));
        s.change_names(vec![NameChange {
            dir,
            name: name.into(),
            ino: Some(ino),
        }]);
        ino
    }

    fn has(s: &State, dir: u64, name: &str) -> bool {
        s.names.contains_key(&(dir, OsString::from(name)))
    }

    #[test]
    fn a_rename_survives_a_cut_whole_and_names_a_prefix() {
        for seed in 1..200 {
            let fs = CutFs::new(seed);
            let mut s = fs.lock();
            let a = create(&mut s, ROOT, "a");
            s.contents(a).unwrap().write(0, b"synced");
            s.contents(a).unwrap().sync();
            s.sync_dir(ROOT);
            s.change_names(vec![
                NameChange {
                    dir: ROOT,
                    name: "a".into(),
                    ino: None,
                },
                NameChange {
                    dir: ROOT,
                    name: "b".into(),
                    ino: Some(a),
                },
            ]);
            for i in 0..5 {
                create(&mut s, ROOT, &format!("n{i}"));
            }
            s.cut();
            // Old name or new, never both or neither; its synced data either way.
            assert!(has(&s, ROOT, "a") != has(&s, ROOT, "b"), "seed {seed}");
            assert_eq!(s.contents(a).unwrap().read(0, 6), b"synced");
            // Creates survive in order: a prefix, and only after the rename.
            let kept: Vec<bool> = (0..5).map(|i| has(&s, ROOT, &format!("n{i}"))).collect();
            assert!(
                kept.windows(2).all(|w| w[0] || !w[1]),
                "seed {seed}: {kept:?}"
            );
            assert!(!kept[0] || has(&s, ROOT, "b"), "seed {seed}");
        }
    }

    #[test]
    fn a_synced_directory_keeps_its_names_and_a_gone_file_is_collected() {
        let fs = CutFs::new(3);
        let mut s = fs.lock();
        let a = create(&mut s, ROOT, "a");
        let b = create(&mut s, ROOT, "b");
        s.sync_dir(ROOT);
        s.change_names(vec![NameChange {
            dir: ROOT,
            name: "b".into(),
            ino: None,
        }]);
        s.sync_dir(ROOT);
        s.cut();
        assert!(has(&s, ROOT, "a") && !has(&s, ROOT, "b"));
        assert!(s.inodes.contains_key(&a) && !s.inodes.contains_key(&b));
        assert_eq!(s.attr(a).unwrap().nlink, 1);
    }

    #[test]
    fn a_dsync_write_survives_a_cut_and_the_rest_of_the_file_need_not() {
        for seed in 1..50 {
            let mut rng = Rng(seed);
            let mut stats = CutStats::default();
            let mut c = Contents::default();
            c.write(0, &[1u8; 8192]);
            c.write(65536, &[2u8; 4096]);
            c.sync_range(65536, 4096);
            c.cut(&mut rng, &mut stats);
            assert_eq!(c.size, 65536 + 4096, "seed {seed}");
            assert_eq!(c.read(65536, 4096), vec![2u8; 4096], "seed {seed}");
        }
    }

    #[test]
    fn contents_survive_a_cut_only_where_synced() {
        let mut rng = Rng(7);
        let mut stats = CutStats::default();
        let mut c = Contents::default();
        c.write(100, b"durable");
        c.sync();
        c.write(5000, &[9u8; 8192]);
        c.cut(&mut rng, &mut stats);
        assert_eq!(&c.read(100, 7), b"durable");
        assert!((100 + 7..=5000 + 8192).contains(&c.size), "{}", c.size);
    }
}
