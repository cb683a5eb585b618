//! The SMART / Health figures kept across restarts: the appliance's power-on time,
//! power cycles and unsafe shutdowns, each device's lifetime I/O totals, and (in a file
//! beside it, which builds that do not know it leave alone) each clone's
//! object-exchange counters ([`CloneTotals`]: what it fetched, and why).
//!
//! They live in one small JSON file, replaced atomically. A run marks it `running` as
//! it starts and clears the mark only at a clean stop, so a start that finds the mark
//! counts an unsafe shutdown (a crash, `kill -9`, a power loss). While running, the
//! figures are saved every [`SAVE_EVERY`]: an unclean end loses at most that much of
//! the I/O counts and power-on time, as a drive's own SMART counters may.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use bdev::IoTotals;
use nvmf::health::{Health, PowerLife};
use serde::{Deserialize, Serialize};

/// How often a running appliance saves its figures.
pub const SAVE_EVERY: Duration = Duration::from_secs(10);

const FORMAT: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    format: u32,
    /// A run started and has not stopped cleanly.
    running: bool,
    power_on_secs: u64,
    power_cycles: u64,
    unsafe_shutdowns: u64,
    devices: BTreeMap<String, Totals>,
}

/// The clones' file (beside the health file, so that one stays as older builds read it).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedClones {
    format: u32,
    /// By clone UUID (a clone deleted and made again under its name starts from zero).
    clones: BTreeMap<String, CloneTotals>,
}

/// A clone's counters over its whole life, across restarts: what hosts read, what was
/// made present and why, and its traffic with the store. A running clone counts from
/// zero; what it is shown and saved as is the sum with what it had counted before.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneTotals {
    /// Bytes hosts read from it.
    pub host_read_bytes: u64,
    /// Bytes made present for hosts' misses.
    pub client_miss_bytes: u64,
    /// ... by read-ahead and the snapshot's working set.
    pub prefetch_bytes: u64,
    /// ... by thickening.
    pub thickening_bytes: u64,
    /// Frames' and index pages' GETs.
    pub gets: u64,
    /// Their bytes.
    pub object_bytes: u64,
    /// Bodies that failed their integrity check.
    pub integrity_failures: u64,
    /// Fetches made again after one.
    pub refetches: u64,
}

impl CloneTotals {
    /// The sum, field by field.
    #[must_use]
    pub fn plus(self, o: Self) -> Self {
        Self {
            host_read_bytes: self.host_read_bytes.saturating_add(o.host_read_bytes),
            client_miss_bytes: self.client_miss_bytes.saturating_add(o.client_miss_bytes),
            prefetch_bytes: self.prefetch_bytes.saturating_add(o.prefetch_bytes),
            thickening_bytes: self.thickening_bytes.saturating_add(o.thickening_bytes),
            gets: self.gets.saturating_add(o.gets),
            object_bytes: self.object_bytes.saturating_add(o.object_bytes),
            integrity_failures: self.integrity_failures.saturating_add(o.integrity_failures),
            refetches: self.refetches.saturating_add(o.refetches),
        }
    }
}

/// What a save learns of the appliance's clones: every catalogued clone's UUID, and
/// the totals of those open (their base included).
#[derive(Debug, Default)]
pub struct OpenClones {
    /// Every clone in the catalogue (others' totals are dropped: deleted).
    pub known: std::collections::HashSet<String>,
    /// Open clones' totals by UUID.
    pub totals: Vec<(String, CloneTotals)>,
}

/// Where each save reads the clones; `None` once there is nothing to read (the
/// service gone), when the figures last saved stand.
type ClonesSource = Box<dyn Fn() -> Option<OpenClones> + Send + Sync>;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Totals {
    read_bytes: u64,
    write_bytes: u64,
    reads: u64,
    writes: u64,
}

impl From<Totals> for IoTotals {
    fn from(t: Totals) -> Self {
        Self {
            read_bytes: t.read_bytes,
            write_bytes: t.write_bytes,
            reads: t.reads,
            writes: t.writes,
        }
    }
}

impl From<IoTotals> for Totals {
    fn from(t: IoTotals) -> Self {
        Self {
            read_bytes: t.read_bytes,
            write_bytes: t.write_bytes,
            reads: t.reads,
            writes: t.writes,
        }
    }
}

/// The health file of a running appliance, and the thread that saves it.
pub struct HealthFile {
    path: PathBuf,
    health: Arc<Health>,
    /// Serialises saves (the saver thread's and the final one).
    saving: Mutex<()>,
    saver: Mutex<Option<(Sender<()>, JoinHandle<()>)>>,
    /// Clones' totals as last saved (at start: as the last run left them).
    clone_bases: Mutex<BTreeMap<String, CloneTotals>>,
    /// Where saves read the clones ([`HealthFile::track_clones`]).
    clone_source: Mutex<Option<ClonesSource>>,
}

impl HealthFile {
    /// Starts a run from the file at `path` (none yet: from zero): counts this power
    /// cycle and, if the last run did not stop cleanly, an unsafe shutdown, and marks
    /// the file `running` before anything is served. A file that cannot be read is set
    /// aside (`.damaged`) with a warning: health figures are not worth refusing to serve.
    pub fn start(path: &Path) -> anyhow::Result<Arc<Self>> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut saved = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<Saved>(&bytes) {
                Ok(s) if s.format == FORMAT => s,
                Ok(s) => {
                    set_aside(path, &format!("format {} is not {FORMAT}", s.format));
                    Saved::default()
                }
                Err(e) => {
                    set_aside(path, &e.to_string());
                    Saved::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Saved::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        saved.power_cycles = saved.power_cycles.saturating_add(1);
        if saved.running {
            saved.unsafe_shutdowns = saved.unsafe_shutdowns.saturating_add(1);
            tracing::warn!(
                "the last run did not stop cleanly: unsafe shutdown {} recorded in {}",
                saved.unsafe_shutdowns,
                path.display()
            );
        }
        let power = PowerLife {
            power_on_secs: saved.power_on_secs,
            power_cycles: saved.power_cycles,
            unsafe_shutdowns: saved.unsafe_shutdowns,
        };
        let devices = std::mem::take(&mut saved.devices)
            .into_iter()
            .map(|(name, t)| (name, IoTotals::from(t)));
        let file = Arc::new(Self {
            path: path.to_path_buf(),
            health: Arc::new(Health::new(power, devices)),
            saving: Mutex::new(()),
            saver: Mutex::new(None),
            clone_bases: Mutex::new(read_clones(&clones_path(path))),
            clone_source: Mutex::new(None),
        });
        file.save(true)
            .with_context(|| format!("marking {} running", path.display()))?;
        Ok(file)
    }

    /// The figures the target reports.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// What the clone of `uuid` had counted when last saved, for it to go on from as
    /// it opens (zero for a new one).
    pub fn clone_base(&self, uuid: &str) -> CloneTotals {
        self.clone_bases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(uuid)
            .copied()
            .unwrap_or_default()
    }

    /// Where each save reads the clones: an open clone's totals replace what was saved;
    /// a known clone not open (unavailable now) keeps it; an unknown one's go.
    pub fn track_clones(&self, source: ClonesSource) {
        *self.clone_source.lock().unwrap_or_else(|p| p.into_inner()) = Some(source);
    }

    /// Saves every [`SAVE_EVERY`] on a thread until [`HealthFile::stop`].
    pub fn save_periodically(self: &Arc<Self>) -> anyhow::Result<()> {
        let (tx, rx): (Sender<()>, Receiver<()>) = channel();
        let me = Arc::clone(self);
        let thread = std::thread::Builder::new()
            .name("health".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(SAVE_EVERY) {
                    if let Err(e) = me.save(true) {
                        tracing::warn!("saving {}: {e}", me.path.display());
                    }
                }
            })
            .context("starting the health thread")?;
        *self.saver.lock().unwrap_or_else(|p| p.into_inner()) = Some((tx, thread));
        Ok(())
    }

    /// A clean stop, once nothing is served any more: the last figures, and the
    /// `running` mark cleared.
    pub fn stop(&self) -> anyhow::Result<()> {
        if let Some((tx, thread)) = self.saver.lock().unwrap_or_else(|p| p.into_inner()).take() {
            drop(tx);
            let _ = thread.join();
        }
        self.save(false)
            .with_context(|| format!("saving {}", self.path.display()))
    }

    fn save(&self, running: bool) -> std::io::Result<()> {
        let _one = self.saving.lock().unwrap_or_else(|p| p.into_inner());
        let (power, devices) = self.health.record();
        // The clones, read first (their source takes the service's lock), then kept as
        // the figures to fall back on: a later save that cannot read them (the
        // service gone) never goes back to older ones.
        let open = self
            .clone_source
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|source| source());
        let clones = {
            let mut bases = self.clone_bases.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(open) = open {
                bases.retain(|uuid, _| open.known.contains(uuid));
                bases.extend(open.totals);
            }
            bases.clone()
        };
        let saved = Saved {
            format: FORMAT,
            running,
            power_on_secs: power.power_on_secs,
            power_cycles: power.power_cycles,
            unsafe_shutdowns: power.unsafe_shutdowns,
            devices: devices
                .into_iter()
                .map(|(name, t)| (name, Totals::from(t)))
                .collect(),
        };
        let bytes = serde_json::to_vec_pretty(&saved).map_err(std::io::Error::other)?;
        bdev::fsutil::replace_file(&self.path, &bytes)?;
        let clones = SavedClones {
            format: FORMAT,
            clones,
        };
        let bytes = serde_json::to_vec_pretty(&clones).map_err(std::io::Error::other)?;
        bdev::fsutil::replace_file(&clones_path(&self.path), &bytes)
    }
}

/// Where the clones' totals are kept: beside the health file (`health.json`:
/// `health.clones.json`).
fn clones_path(health: &Path) -> PathBuf {
    health.with_extension("clones.json")
}

/// The clones' totals saved at `path`: none if there is no file; one that cannot be
/// read is set aside, and they start from zero.
fn read_clones(path: &Path) -> BTreeMap<String, CloneTotals> {
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice::<SavedClones>(&bytes) {
            Ok(s) if s.format == FORMAT => s.clones,
            Ok(s) => {
                set_aside(path, &format!("format {} is not {FORMAT}", s.format));
                BTreeMap::new()
            }
            Err(e) => {
                set_aside(path, &e.to_string());
                BTreeMap::new()
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => {
            tracing::warn!("{}: {e}; clones' counters start from zero", path.display());
            BTreeMap::new()
        }
    }
}

/// Moves an unreadable health file aside so the next save does not destroy evidence.
fn set_aside(path: &Path, why: &str) {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".damaged");
    let aside = PathBuf::from(aside);
    match std::fs::rename(path, &aside) {
        Ok(()) => tracing::warn!(
            "{} cannot be read ({why}): moved to {}; health figures start from zero",
            path.display(),
            aside.display()
        ),
        Err(e) => tracing::warn!("{} cannot be read ({why}) nor moved: {e}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_reactor() -> reactor::ReactorSet {
        let cores = reactor::CoreList::parse("0").unwrap();
        reactor::ReactorSet::start(reactor::ReactorConfig::new(cores)).unwrap()
    }

    /// Runs `io` on `dev` from the set's reactor and waits for it to succeed.
    fn run_io(set: &reactor::ReactorSet, dev: &bdev::Bdev, io: bdev::BdevIo) {
        let dev = dev.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        set.handles()[0]
            .send(move || {
                let ch = dev.channel().unwrap();
                ch.submit(io, move |c| tx.send(c.result.is_ok()).unwrap());
            })
            .unwrap();
        assert!(rx.recv().unwrap());
    }

    fn write_once(set: &reactor::ReactorSet, dev: &bdev::Bdev) {
        let buf = bdev::IoBuf::from_slice(&[7; 4096]);
        run_io(set, dev, bdev::BdevIo::write(0, 8, vec![buf]));
    }

    #[test]
    fn a_start_without_a_clean_stop_is_an_unsafe_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("health.json");
        let first = HealthFile::start(&path).unwrap();
        assert_eq!(first.health().power().power_cycles, 1);
        first.stop().unwrap();
        let second = HealthFile::start(&path).unwrap();
        let p = second.health().power();
        assert_eq!((p.power_cycles, p.unsafe_shutdowns), (2, 0));
        // No stop: as after kill -9.
        drop(second);
        let third = HealthFile::start(&path).unwrap();
        let p = third.health().power();
        assert_eq!((p.power_cycles, p.unsafe_shutdowns), (3, 1));
    }

    #[test]
    fn device_totals_survive_a_restart_and_a_new_opening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("health.json");
        let file = HealthFile::start(&path).unwrap();
        let set = one_reactor();
        let first = bdev::create_malloc("vol", 512, 2048, None).unwrap();
        // Before it is served (a restore writing through it): not host I/O.
        write_once(&set, &first);
        file.health().attach(&first);
        write_once(&set, &first);
        drop(first);
        // Re-opened under the same name: the totals go on.
        let again = bdev::create_malloc("vol", 512, 2048, None).unwrap();
        file.health().attach(&again);
        write_once(&set, &again);
        assert_eq!(file.health().totals("vol").writes, 2);
        file.stop().unwrap();
        drop(file);
        let after = HealthFile::start(&path).unwrap();
        let t = after.health().totals("vol");
        assert_eq!((t.writes, t.write_bytes), (2, 8192));
        after.health().forget("vol");
        assert_eq!(after.health().totals("vol"), IoTotals::default());
        set.shutdown().unwrap();
    }

    /// A clone's totals come back after a restart, from their own file (the health
    /// file stays as older builds read it); a save that cannot read the clones keeps
    /// the last figures; a clone no longer catalogued loses its totals.
    #[test]
    fn clone_totals_survive_a_restart_and_never_go_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("health.json");
        let file = HealthFile::start(&path).unwrap();
        let t = CloneTotals {
            gets: 3,
            client_miss_bytes: 4096,
            ..CloneTotals::default()
        };
        let open = move |uuids: &[&str]| OpenClones {
            known: uuids.iter().map(|u| u.to_string()).collect(),
            totals: uuids.iter().map(|u| (u.to_string(), t)).collect(),
        };
        let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let g = Arc::clone(&gone);
        file.track_clones(Box::new(move || {
            (!g.load(std::sync::atomic::Ordering::SeqCst)).then(|| open(&["u1", "u2"]))
        }));
        file.stop().unwrap();
        // The source then reads nothing (the service gone): the figures stay.
        gone.store(true, std::sync::atomic::Ordering::SeqCst);
        file.stop().unwrap();
        drop(file);
        let health: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert!(health.get("clones").is_none(), "{health}");
        let after = HealthFile::start(&path).unwrap();
        assert_eq!(after.clone_base("u1"), t);
        assert_eq!(after.clone_base("u3"), CloneTotals::default());
        // u2 was deleted.
        after.track_clones(Box::new(move || Some(open(&["u1"]))));
        after.stop().unwrap();
        drop(after);
        let again = HealthFile::start(&path).unwrap();
        assert_eq!(again.clone_base("u1"), t);
        assert_eq!(again.clone_base("u2"), CloneTotals::default());
    }

    #[test]
    fn a_device_keeps_the_totals_it_was_first_attached_to() {
        let dir = tempfile::tempdir().unwrap();
        let file = HealthFile::start(&dir.path().join("health.json")).unwrap();
        let set = one_reactor();
        let dev = bdev::create_malloc("v", 512, 2048, None).unwrap();
        file.health().attach(&dev);
        let read = bdev::BdevIo::read(0, 8, vec![bdev::IoBuf::new(4096)]);
        run_io(&set, &dev, read);
        // Its name forgotten while it lives, then served again: its totals come back.
        file.health().forget("v");
        file.health().attach(&dev);
        assert_eq!(file.health().totals("v").reads, 1);
        set.shutdown().unwrap();
    }

    #[test]
    fn a_damaged_file_is_set_aside_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("health.json");
        std::fs::write(&path, b"{\"format\": 1, \"running\": tr").unwrap();
        let file = HealthFile::start(&path).unwrap();
        assert_eq!(file.health().power().power_cycles, 1);
        assert!(dir.path().join("health.json.damaged").exists());
    }
}
