//! `nondurable_medium`: a file system in memory that loses what was never synced when
//! its power is cut — the [`Medium`] counterpart of [`crate::create_nondurable`], for
//! power-cut tests of the local state files' protocols (presence and change records).
//!
//! What a cut keeps, as POSIX allows and real file systems do:
//! - a file's contents: whatever was synced; of what was written since, each 512-byte
//!   sector independently (torn, reordered), and the length either the synced one or
//!   the current one (a grown file may end in zeroes);
//! - names (create, rename, remove): those made durable by a sync of their directory;
//!   of the rest, any subset (each kept or lost, in the order they were made: POSIX
//!   promises no order). A rename is atomic.
//!
//! Everything opened before a cut — the [`Medium`] from [`NonDurableMedium::mount`]
//! and its files — fails from then on, as the old process's would; mount again for
//! the state after the cut. A test object: one mutex for everything.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::medium::{Medium, MediumFile};

/// Granularity of what survives a cut: a sector is written whole or not at all.
const SECTOR: usize = 512;

/// A file's contents, by inode.
struct Inode {
    durable: Vec<u8>,
    current: Vec<u8>,
}

/// A change to the names not yet made durable by a directory sync.
enum NameOp {
    Link(PathBuf, u64),
    Unlink(PathBuf),
    Rename(PathBuf, PathBuf),
}

impl NameOp {
    fn dir(&self) -> Option<&Path> {
        match self {
            Self::Link(p, _) | Self::Unlink(p) | Self::Rename(_, p) => p.parent(),
        }
    }

    fn apply(&self, names: &mut BTreeMap<PathBuf, u64>) {
        match self {
            Self::Link(p, ino) => {
                names.insert(p.clone(), *ino);
            }
            Self::Unlink(p) => {
                names.remove(p);
            }
            Self::Rename(from, to) => {
                if let Some(ino) = names.remove(from) {
                    names.insert(to.clone(), ino);
                }
            }
        }
    }
}

struct State {
    inodes: HashMap<u64, Inode>,
    next_inode: u64,
    /// The names as they are now.
    names: BTreeMap<PathBuf, u64>,
    /// The names a cut keeps for certain.
    durable_names: BTreeMap<PathBuf, u64>,
    /// Changes to the names since, in order.
    pending: Vec<NameOp>,
    /// Which power-on mounts and files belong to: older ones fail.
    power_on: u64,
    /// Syncs do nothing (to show that a power-cut test can fail).
    lies: bool,
    /// Changes still allowed before the power fails by itself (see
    /// [`NonDurableMedium::fail_after`]).
    fuse: Option<u64>,
    /// What the last such failure did.
    blown: Option<MediumCut>,
    rng: u64,
}

impl State {
    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn inode(&mut self, ino: u64) -> io::Result<&mut Inode> {
        self.inodes
            .get_mut(&ino)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ESTALE))
    }

    /// What a cut leaves of a file synced as `durable` and written since to `current`.
    fn tear(&mut self, durable: &[u8], current: &[u8]) -> Vec<u8> {
        let len = if self.next_random().is_multiple_of(2) {
            durable.len()
        } else {
            current.len()
        };
        let mut out = vec![0; len];
        for at in (0..len).step_by(SECTOR) {
            let end = (at + SECTOR).min(len);
            let from = if self.next_random().is_multiple_of(2) {
                durable
            } else {
                current
            };
            if at < from.len() {
                let n = end.min(from.len()) - at;
                out[at..at + n].copy_from_slice(&from[at..at + n]);
            }
        }
        out
    }
}

/// What a cut did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediumCut {
    /// Files whose contents had unsynced changes.
    pub files_torn: u64,
    /// Changes to names that were not synced: kept, lost.
    pub names_kept: u64,
    /// See `names_kept`.
    pub names_lost: u64,
}

/// An in-memory file system with a power switch (see the module docs).
#[derive(Clone)]
pub struct NonDurableMedium {
    state: Arc<Mutex<State>>,
}

impl NonDurableMedium {
    /// An empty file system; `seed` decides what each cut keeps.
    pub fn new(seed: u64) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                inodes: HashMap::new(),
                next_inode: 1,
                names: BTreeMap::new(),
                durable_names: BTreeMap::new(),
                pending: Vec::new(),
                power_on: 0,
                lies: false,
                fuse: None,
                blown: None,
                // Spread (splitmix64) so that nearby seeds start far apart.
                rng: {
                    let z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
                    let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                    (z ^ (z >> 31)) | 1
                },
            })),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file system as the current power-on sees it.
    pub fn mount(&self) -> Arc<dyn Medium> {
        Arc::new(Mount {
            state: Arc::clone(&self.state),
            power_on: self.state().power_on,
        })
    }

    /// Cuts the power: unsynced contents and names are kept or lost (seeded), and every
    /// mount and file from before fails from now on.
    pub fn cut(&self) -> MediumCut {
        self.state().cut()
    }

    /// Makes the power fail by itself just before the change after the next `changes`
    /// (writes, length changes, syncs, creates, renames, removes), which then fails:
    /// a crash in the middle of whatever protocol is running. `None` disarms it.
    pub fn fail_after(&self, changes: Option<u64>) {
        let mut s = self.state();
        s.fuse = changes;
        s.blown = None;
    }

    /// What the power failure [`Self::fail_after`] set up did, once it has happened.
    pub fn failed(&self) -> Option<MediumCut> {
        self.state().blown
    }

    /// Makes syncs do nothing (or work again): for showing that a power-cut test can
    /// fail.
    pub fn lie_about_syncs(&self, lies: bool) {
        self.state().lies = lies;
    }
}

impl State {
    /// Counts a change about to be made: `Err` if the power fails now instead.
    fn change(&mut self) -> io::Result<()> {
        match self.fuse {
            Some(0) => {
                self.fuse = None;
                self.blown = Some(self.cut());
                Err(power_lost())
            }
            Some(n) => {
                self.fuse = Some(n - 1);
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn cut(&mut self) -> MediumCut {
        let s = self;
        s.power_on += 1;
        let pending = std::mem::take(&mut s.pending);
        let mut names = std::mem::take(&mut s.durable_names);
        let mut cut = MediumCut {
            files_torn: 0,
            names_kept: 0,
            names_lost: 0,
        };
        for op in &pending {
            if s.next_random().is_multiple_of(2) {
                op.apply(&mut names);
                cut.names_kept += 1;
            } else {
                cut.names_lost += 1;
            }
        }
        let mut inodes = std::mem::take(&mut s.inodes);
        // Files no name reaches are gone.
        inodes.retain(|ino, _| names.values().any(|n| n == ino));
        let mut torn: Vec<(&u64, &mut Inode)> = inodes.iter_mut().collect();
        torn.sort_by_key(|(ino, _)| **ino);
        for (_, inode) in torn {
            if inode.durable != inode.current {
                cut.files_torn += 1;
                let kept = s.tear(&inode.durable, &inode.current);
                inode.durable.clone_from(&kept);
                inode.current = kept;
            }
        }
        s.inodes = inodes;
        s.names.clone_from(&names);
        s.durable_names = names;
        cut
    }
}

/// One power-on's view of a [`NonDurableMedium`].
struct Mount {
    state: Arc<Mutex<State>>,
    power_on: u64,
}

fn power_lost() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

fn not_found() -> io::Error {
    io::Error::from(io::ErrorKind::NotFound)
}

impl Mount {
    /// The state, if this mount's power-on is the current one.
    fn state(&self) -> io::Result<MutexGuard<'_, State>> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.power_on == self.power_on {
            Ok(s)
        } else {
            Err(power_lost())
        }
    }
}

impl Medium for Mount {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let mut s = self.state()?;
        let ino = *s.names.get(path).ok_or_else(not_found)?;
        Ok(s.inode(ino)?.current.clone())
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        Ok(self.state()?.names.contains_key(path))
    }

    fn open(&self, path: &Path, truncate: bool) -> io::Result<Box<dyn MediumFile>> {
        let mut s = self.state()?;
        let ino = match s.names.get(path) {
            Some(&ino) => ino,
            None => {
                s.change()?;
                let ino = s.next_inode;
                s.next_inode += 1;
                s.inodes.insert(
                    ino,
                    Inode {
                        durable: Vec::new(),
                        current: Vec::new(),
                    },
                );
                s.names.insert(path.to_path_buf(), ino);
                s.pending.push(NameOp::Link(path.to_path_buf(), ino));
                ino
            }
        };
        if truncate {
            s.change()?;
            s.inode(ino)?.current.clear();
        }
        Ok(Box::new(File {
            state: Arc::clone(&self.state),
            power_on: self.power_on,
            ino,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        if from.parent() != to.parent() {
            return Err(io::Error::from_raw_os_error(libc::EXDEV));
        }
        let mut s = self.state()?;
        if !s.names.contains_key(from) {
            return Err(not_found());
        }
        s.change()?;
        let ino = s.names.remove(from).ok_or_else(not_found)?;
        s.names.insert(to.to_path_buf(), ino);
        s.pending
            .push(NameOp::Rename(from.to_path_buf(), to.to_path_buf()));
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut s = self.state()?;
        if !s.names.contains_key(path) {
            return Err(not_found());
        }
        s.change()?;
        s.names.remove(path);
        s.pending.push(NameOp::Unlink(path.to_path_buf()));
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut s = self.state()?;
        s.change()?;
        if s.lies {
            return Ok(());
        }
        let dir = path.parent();
        let pending = std::mem::take(&mut s.pending);
        let mut names = std::mem::take(&mut s.durable_names);
        let mut rest = Vec::new();
        for op in pending {
            if op.dir() == dir {
                op.apply(&mut names);
            } else {
                rest.push(op);
            }
        }
        s.durable_names = names;
        s.pending = rest;
        Ok(())
    }
}

/// A file open on a [`Mount`].
struct File {
    state: Arc<Mutex<State>>,
    power_on: u64,
    ino: u64,
}

impl File {
    /// Runs `f` on the file's inode (and whether syncs lie), if the power is on;
    /// `change`: counted as a change (see [`NonDurableMedium::fail_after`]).
    fn inode<T>(&self, change: bool, f: impl FnOnce(&mut Inode, bool) -> T) -> io::Result<T> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.power_on != self.power_on {
            return Err(power_lost());
        }
        if change {
            s.change()?;
        }
        let lies = s.lies;
        Ok(f(s.inode(self.ino)?, lies))
    }
}

impl MediumFile for File {
    fn read_all(&mut self) -> io::Result<Vec<u8>> {
        self.inode(false, |i, _| i.current.clone())
    }

    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let at = usize::try_from(offset).map_err(io::Error::other)?;
        self.inode(true, |i, _| {
            let end = at + bytes.len();
            if i.current.len() < end {
                i.current.resize(end, 0);
            }
            i.current[at..end].copy_from_slice(bytes);
        })
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        self.inode(true, |i, _| i.current.resize(len, 0))
    }

    fn sync(&mut self) -> io::Result<()> {
        self.inode(true, |i, lies| {
            if !lies {
                i.durable.clone_from(&i.current);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str) -> PathBuf {
        PathBuf::from("/state").join(name)
    }

    #[test]
    fn synced_contents_and_names_survive_every_cut() {
        for seed in 0..64 {
            let medium = NonDurableMedium::new(seed);
            let m = medium.mount();
            let mut f = m.open(&p("a"), false).unwrap();
            f.write_at(0, &[7; 1000]).unwrap();
            f.sync().unwrap();
            m.sync_dir(&p("a")).unwrap();
            f.write_at(1000, &[9; 3000]).unwrap();
            crate::medium::replace_file(&*m, &p("b"), b"new").unwrap();
            medium.cut();
            assert!(f.write_at(0, &[1]).is_err(), "a file from before the cut");
            assert!(m.read(&p("a")).is_err(), "a mount from before the cut");
            let m = medium.mount();
            let a = m.read(&p("a")).unwrap();
            assert_eq!(&a[..1000], &[7; 1000], "seed {seed}");
            assert!(a.len() == 1000 || a.len() == 4000, "seed {seed}");
            assert!(a[1000..].iter().all(|&b| b == 0 || b == 9), "seed {seed}");
            assert_eq!(m.read(&p("b")).unwrap(), b"new", "seed {seed}");
        }
    }

    #[test]
    fn unsynced_names_and_contents_may_be_lost() {
        let (mut lost_name, mut lost_bytes, mut kept_name) = (0, 0, 0);
        for seed in 0..64 {
            let medium = NonDurableMedium::new(seed);
            let m = medium.mount();
            let mut f = m.open(&p("a"), false).unwrap();
            f.write_at(0, &[5; 2048]).unwrap();
            f.sync().unwrap();
            let cut = medium.cut();
            assert_eq!(cut.names_kept + cut.names_lost, 1);
            let m = medium.mount();
            match m.read(&p("a")) {
                Ok(a) => {
                    kept_name += 1;
                    assert_eq!(a, vec![5; 2048], "synced contents of a kept name");
                }
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::NotFound);
                    lost_name += 1;
                }
            }
            let mut g = m.open(&p("g"), false).unwrap();
            m.sync_dir(&p("g")).unwrap();
            g.write_at(0, &[3; 4096]).unwrap();
            medium.cut();
            if medium.mount().read(&p("g")).unwrap() != vec![3; 4096] {
                lost_bytes += 1;
            }
        }
        assert!(lost_name > 0 && kept_name > 0 && lost_bytes > 0);
    }

    #[test]
    fn a_replace_cut_at_any_point_leaves_the_old_contents_or_the_new() {
        for seed in 0..32 {
            for point in 0..8 {
                let medium = NonDurableMedium::new(seed);
                let m = medium.mount();
                crate::medium::replace_file(&*m, &p("f"), &[1; 3000]).unwrap();
                medium.fail_after(Some(point));
                let r = crate::medium::replace_file(&*m, &p("f"), &[2; 5000]);
                let failed = medium.failed();
                assert_eq!(r.is_err(), failed.is_some(), "seed {seed} point {point}");
                let got = medium.mount().read(&p("f")).unwrap();
                assert!(
                    got == [1; 3000] || (got == [2; 5000] && failed.is_none_or(|_| point >= 5)),
                    "seed {seed}, cut before change {point}: a mixture"
                );
            }
        }
    }

    #[test]
    fn a_lying_medium_keeps_nothing_it_was_not_forced_to() {
        let medium = NonDurableMedium::new(1);
        medium.lie_about_syncs(true);
        let mut lost = 0;
        for i in 0..16 {
            let m = medium.mount();
            let r = p(&format!("r{i}"));
            crate::medium::replace_file(&*m, &r, b"x").unwrap();
            medium.cut();
            lost += u32::from(medium.mount().read(&r).ok().as_deref() != Some(b"x"));
        }
        assert!(lost > 0);
    }
}
