//! The catalogue: what the appliance holds beyond its configuration file — volumes and
//! clones created through the API, their exports, and the snapshots taken — saved as
//! JSON by atomic replacement (temporary file, fsync, rename, directory fsync), so a
//! crash leaves either the old catalogue or the new one, never a torn one.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Catalogue format version written. 2 added `thicken_mib_s` to clones, 3 `pending`,
/// 4 `appliance`, snapshots' `listed` and `policies`, 5 snapshots' `duration_ms`.
const VERSION: u32 = 5;

/// Versions this build reads (older ones lack fields that have defaults).
const READABLE: [u32; 5] = [1, 2, 3, 4, 5];

/// Everything the daemon must find again after a restart.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalogue {
    /// Format version.
    pub version: u32,
    /// This appliance's identity in the stores' catalogues (a UUID made at its first
    /// start, kept for good; empty in catalogues older than version 4 until loaded).
    #[serde(default)]
    pub appliance: String,
    /// Volumes (local, snapshottable).
    pub volumes: Vec<VolumeRecord>,
    /// Clones of snapshots.
    pub clones: Vec<CloneRecord>,
    /// Snapshots taken by this appliance, oldest first.
    pub snapshots: Vec<SnapshotRecord>,
    /// Snapshots asked for and not finished: started again at the next start.
    #[serde(default)]
    pub pending: Vec<PendingSnapshot>,
    /// Protection policies, one per volume at most.
    #[serde(default)]
    pub policies: Vec<ox::policy::Policy>,
}

/// A snapshot that was running when the daemon stopped or died.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingSnapshot {
    /// The volume.
    pub volume: String,
    /// The store.
    pub store: String,
    /// The key asked for (`None`: the default).
    pub key: Option<String>,
    /// Read back before publishing, asked for this snapshot (`None`: the store's
    /// setting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<bool>,
    /// A full snapshot (over no parent), asked for this one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub full: bool,
}

/// How a volume or clone is exported over NVMe/TCP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRecord {
    /// Subsystem NQN (namespace 1 is the device).
    pub nqn: String,
    /// Allowed host NQNs (ignored when `allow_any_host`).
    pub hosts: Vec<String>,
    /// Any host may connect.
    pub allow_any_host: bool,
}

impl ExportRecord {
    /// The export a configuration section asks for (`None` without an NQN).
    pub fn from_config(
        nqn: Option<&String>,
        hosts: &[String],
        allow_any_host: bool,
    ) -> Option<Self> {
        nqn.map(|nqn| Self {
            nqn: nqn.clone(),
            hosts: hosts.to_vec(),
            allow_any_host,
        })
    }
}

/// A volume: a file under the state directory with change tracking.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRecord {
    /// Unique name.
    pub name: String,
    /// Stable identity (namespace identifiers derive from it).
    pub uuid: String,
    /// Size.
    pub size_bytes: u64,
    /// 512 or 4096.
    pub block_size: u32,
    /// Change-tracking and snapshot chunk size.
    pub chunk_bytes: u64,
    /// NVMe/TCP export, if any.
    pub export: Option<ExportRecord>,
    /// The snapshot it began as (a volume over a snapshot: what it has not written or
    /// fetched is read from there), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basis: Option<BasisRecord>,
}

impl VolumeRecord {
    /// A new volume `name` (a fresh identity) of the geometry snapshot `m` records: a
    /// restore of it, or a volume over it (`basis`).
    pub fn of_snapshot(
        name: &str,
        m: &ox::format::Manifest,
        export: Option<ExportRecord>,
        basis: Option<BasisRecord>,
    ) -> Self {
        Self {
            name: name.into(),
            uuid: uuid::Uuid::new_v4().to_string(),
            size_bytes: m.volume_bytes,
            block_size: m.block_size,
            chunk_bytes: u64::from(m.chunk_bytes),
            export,
            basis,
        }
    }
}

/// The snapshot a volume began as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasisRecord {
    /// Its store.
    pub store: String,
    /// Its manifest key.
    pub manifest_key: String,
}

/// A clone: a local copy and presence record over a snapshot in a store.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneRecord {
    /// Unique name (shared with volumes).
    pub name: String,
    /// Stable identity.
    pub uuid: String,
    /// Store holding the snapshot.
    pub store: String,
    /// The snapshot's manifest key.
    pub manifest_key: String,
    /// Thickening wanted (runs in the background while the daemon runs).
    pub thicken: bool,
    /// Thickening paused by the operator.
    pub paused: bool,
    /// This clone's thickening bandwidth, MiB/s (absent or 0: the global background
    /// limit only).
    #[serde(default)]
    pub thicken_mib_s: Option<u64>,
    /// NVMe/TCP export, if any.
    pub export: Option<ExportRecord>,
}

/// A snapshot this appliance published.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRecord {
    /// Snapshot ID (hex).
    pub id: String,
    /// The volume it was taken of.
    pub volume: String,
    /// The store it lives in.
    pub store: String,
    /// Its manifest key.
    pub manifest_key: String,
    /// Parent snapshot ID, for incremental snapshots.
    pub parent: Option<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// Bytes of frames uploaded.
    pub data_bytes: u64,
    /// Bytes of index pages and manifest uploaded.
    pub meta_bytes: u64,
    /// Chunks read from the volume.
    pub chunks_read: u64,
    /// Recorded in the store's own catalogue (the bucket): false until that write
    /// succeeds, and for snapshots taken before it existed; such entries are written
    /// at the volume's next snapshot into the store.
    #[serde(default)]
    pub listed: bool,
    /// How long taking it took, in milliseconds: the attempt that published it, at
    /// least 1. 0: not known (catalogued before durations were recorded).
    #[serde(default)]
    pub duration_ms: u64,
}

impl Catalogue {
    /// The catalogue file in `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("catalogue.json")
    }

    /// Loads the catalogue of `state_dir` (empty if there is none yet). One without
    /// an appliance identity gets a new one, which the caller must save.
    pub fn load(state_dir: &Path) -> anyhow::Result<Self> {
        let path = Self::path(state_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self {
                    version: VERSION,
                    appliance: uuid::Uuid::new_v4().to_string(),
                    ..Self::default()
                });
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        // The version first: a later build's catalogue (with fields this one does not
        // know) is told apart from a damaged one, so an operator going back to an
        // older build is not sent to restore a backup.
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let Versioned { version } = serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged", path.display()))?;
        if !READABLE.contains(&version) {
            anyhow::bail!(
                "{} has format version {version}, this oxd reads {READABLE:?} (a later \
                 build wrote it: see docs/OPERATIONS.md, Upgrade)",
                path.display(),
            );
        }
        let c: Self = serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged", path.display()))?;
        let appliance = match c.appliance.as_str() {
            "" => uuid::Uuid::new_v4().to_string(),
            id => id.to_string(),
        };
        Ok(Self {
            version: VERSION,
            appliance,
            ..c
        })
    }

    /// Saves atomically to `state_dir`.
    pub fn save(&self, state_dir: &Path) -> anyhow::Result<()> {
        let path = Self::path(state_dir);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(self).context("encoding the catalogue")?;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(state_dir)?.sync_all()
        };
        write().with_context(|| format!("saving {}", path.display()))
    }

    /// Whether a volume or clone is called `name`.
    pub fn has_name(&self, name: &str) -> bool {
        self.volumes.iter().any(|v| v.name == name) || self.clones.iter().any(|c| c.name == name)
    }

    /// The NQNs exported now.
    pub fn exported_nqns(&self) -> impl Iterator<Item = &str> {
        self.volumes
            .iter()
            .filter_map(|v| v.export.as_ref())
            .chain(self.clones.iter().filter_map(|c| c.export.as_ref()))
            .map(|e| e.nqn.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads_and_refuses_damage() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Catalogue::load(dir.path()).unwrap();
        assert!(c.volumes.is_empty());
        c.volumes.push(VolumeRecord {
            name: "v".into(),
            uuid: uuid::Uuid::new_v4().to_string(),
            size_bytes: 1 << 20,
            block_size: 512,
            chunk_bytes: 65536,
            export: None,
            basis: None,
        });
        assert_eq!(c.appliance.len(), 36, "a new appliance gets an identity");
        c.save(dir.path()).unwrap();
        let again = Catalogue::load(dir.path()).unwrap();
        assert_eq!(again.volumes[0].name, "v");
        assert_eq!(again.appliance, c.appliance, "and keeps it");
        assert!(again.has_name("v") && !again.has_name("w"));
        // A catalogue from before identities gets one.
        std::fs::write(
            Catalogue::path(dir.path()),
            br#"{"version": 3, "volumes": [], "clones": [], "snapshots": []}"#,
        )
        .unwrap();
        let old = Catalogue::load(dir.path()).unwrap();
        assert!(!old.appliance.is_empty() && old.appliance != c.appliance);
        // A snapshot catalogued before durations were recorded: not known (0).
        std::fs::write(
            Catalogue::path(dir.path()),
            br#"{"version": 4, "volumes": [], "clones": [], "snapshots": [{"id": "a",
                "volume": "v", "store": "l", "manifest_key": "k", "parent": null,
                "created": 1, "data_bytes": 0, "meta_bytes": 0, "chunks_read": 0,
                "listed": true}]}"#,
        )
        .unwrap();
        let old = Catalogue::load(dir.path()).unwrap();
        assert_eq!((old.version, old.snapshots[0].duration_ms), (VERSION, 0));
        std::fs::write(Catalogue::path(dir.path()), b"{\"version\": 1, \"volu").unwrap();
        let e = Catalogue::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("damaged"), "{e}");
        // A later build's catalogue, with a field this one does not know: its version
        // is what is said, not damage.
        std::fs::write(
            Catalogue::path(dir.path()),
            br#"{"version": 99, "volumes": [], "clones": [], "snapshots": [], "later": 1}"#,
        )
        .unwrap();
        let e = Catalogue::load(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("format version 99") && !e.contains("damaged"),
            "{e}"
        );
    }
}
