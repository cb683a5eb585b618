//! docs/API.md and the typed methods say the same: every method has its row, every row
//! is a method, each row's parameters column names every field the method takes (the
//! word "export" standing for `nqn`, `hosts` and `allow_any_host`, as the document says
//! above its table), and its result column every field, nested ones too, of the
//! method's typed result.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;

use ox_api::methods::*;
use serde_json::Value;

/// The method rows of API.md: name, and the parameters column.
fn rows() -> BTreeMap<String, String> {
    columns().into_iter().map(|(n, (p, _))| (n, p)).collect()
}

/// The method rows of API.md: name, and the parameters and result columns.
fn columns() -> BTreeMap<String, (String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/API.md");
    let text = std::fs::read_to_string(path).unwrap();
    let mut rows = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("| `") else {
            continue;
        };
        let Some((name, rest)) = rest.split_once("` |") else {
            continue;
        };
        // Tables of error codes and the like start with something else than a name.
        if !name.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            continue;
        }
        let mut cells = rest.split(" | ");
        let params = cells.next().unwrap_or("").to_string();
        let result = cells.next().unwrap_or("").to_string();
        assert!(
            rows.insert(name.to_string(), (params, result)).is_none(),
            "{name} has two rows"
        );
    }
    rows
}

#[test]
fn api_md_lists_every_method_with_every_parameter() {
    let rows = rows();
    for (name, fields) in ox_api::methods::ALL {
        let params = rows
            .get(*name)
            .unwrap_or_else(|| panic!("API.md has no row for {name}"));
        for field in *fields {
            let export = matches!(*field, "nqn" | "hosts" | "allow_any_host");
            // `field` alone, or with a value: `field: true`.
            let named =
                params.contains(&format!("`{field}`")) || params.contains(&format!("`{field}: "));
            assert!(
                named || (export && params.contains("export")),
                "API.md's row for {name} does not name its parameter {field}: {params}"
            );
        }
        if fields.is_empty() {
            assert!(params.trim() == "none", "{name} takes none: {params}");
        }
    }
    for name in rows.keys() {
        assert!(
            ox_api::methods::ALL.iter().any(|(n, _)| n == name),
            "API.md lists {name}, which is no method"
        );
    }
}

/// Methods whose row gives their result by pointing to another method's row.
const DOCUMENTED_WITH: &[(&str, &str)] = &[
    ("snapshot_create", "job_get"),
    ("snapshot_verify", "job_get"),
    ("snapshot_restore", "job_get"),
    ("job_list", "job_get"),
    ("job_cancel", "job_get"),
    ("clone_thicken", "clone_get"),
    ("policy_set", "policy_list"),
];

/// A result of method `M` as JSON: the compiler holds the sample to `M`'s type.
fn sample<M: Method>(result: M::Result) -> (&'static str, Value) {
    (M::NAME, serde_json::to_value(result).unwrap())
}

/// Every key of `v`, all the way down.
fn keys(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                out.push(k.clone());
                keys(v, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| keys(v, out)),
        _ => {}
    }
}

/// A name counts as named where it stands as a word (`thicken` is not named by
/// `thickening`).
fn names(text: &str, name: &str) -> bool {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|w| w == name)
}

fn appliance() -> Appliance {
    Appliance {
        id: String::new(),
        name: String::new(),
    }
}

fn retry() -> Retry {
    Retry {
        at: 0,
        op: String::new(),
        key: String::new(),
        reason: String::new(),
    }
}

fn job() -> Job {
    Job {
        id: 1,
        kind: String::new(),
        target: String::new(),
        state: JobState::Running,
        done: 0,
        total: 0,
        bytes: 0,
        retries: 0,
        last_retry: Some(retry()),
        outage: Some(Outage {
            since: 0,
            reason: String::new(),
        }),
        result: Value::Null,
        error: None,
    }
}

/// A clone with every figure given (`export` is described apart, above the tables).
fn clone_info() -> CloneInfo {
    CloneInfo {
        name: String::new(),
        kind: String::new(),
        uuid: String::new(),
        store: String::new(),
        manifest_key: String::new(),
        export: None,
        thicken: false,
        paused: false,
        thicken_mib_s: None,
        unavailable: Some(String::new()),
        size_bytes: Some(0),
        block_size: Some(512),
        chunks_present: Some(0),
        chunks_total: Some(0),
        hydration_pct: Some(0.0),
        host_read_bytes: Some(0),
        fetched_bytes: Some(Fetched {
            client_miss: 0,
            prefetch: 0,
            thickening: 0,
        }),
        object_bytes: Some(0),
        gets: Some(0),
        integrity_failures: Some(0),
        refetches: Some(0),
        miss_latency_us: Some(MissLatency {
            count: 0,
            p50: 0,
            p99: 0,
        }),
        thickening: Some(Thickening {
            paused: false,
            fetched: 0,
            eta_s: None,
            retrying: 0,
        }),
        warming: Some(Warming {
            paused: false,
            fetched: 0,
            setbacks: 0,
        }),
    }
}

fn policy() -> PolicyInfo {
    PolicyInfo {
        volume: String::new(),
        store: String::new(),
        every_s: 60,
        key: Some(String::new()),
        keep_last: 0,
        hourly: 0,
        daily: 0,
        weekly: 0,
        monthly: 0,
        newest: None,
        last_success: None,
        rpo_s: None,
        next_due: 0,
        job: None,
        runs: 0,
        failures: 0,
        last_error: Some(PolicyError {
            at: 0,
            error: String::new(),
        }),
        retired: 0,
        swept_objects: 0,
        swept_manifests: 0,
        last_retention: Value::Null,
    }
}

fn bucket_volume() -> BucketVolume {
    BucketVolume {
        name: String::new(),
        volume: String::new(),
        prefix: String::new(),
        size_bytes: 0,
        block_size: 512,
        owner: appliance(),
        owned_here: true,
        since: 0,
        adopted_from: Some(appliance()),
    }
}

fn bucket_snapshot() -> BucketSnapshot {
    BucketSnapshot {
        id: String::new(),
        manifest_key: String::new(),
        parent: None,
        created: 0,
        stored_bytes: 0,
        appliance: appliance(),
        key: None,
        key_here: None,
    }
}

/// Every method's result, each field and nested field given: a method added to
/// `ALL` fails the test until it has one here.
fn samples() -> Vec<(&'static str, Value)> {
    let count = IoCount { ops: 0, bytes: 0 };
    let deleted = || Deleted {
        name: String::new(),
    };
    vec![
        sample::<OxGetVersion>(Version {
            api: 1,
            oxd: String::new(),
        }),
        sample::<BdevGetBdevs>(vec![BdevInfo {
            name: String::new(),
            block_size: 512,
            num_blocks: 0,
            size_bytes: 0,
            uuid: String::new(),
            stats: IoStats {
                read: count,
                write: count,
                flush: count,
                write_zeroes: count,
                unmap: count,
            },
            errors: 0,
            latency_us: Latency {
                mean: 0,
                p50: 0,
                p99: 0,
                max: 0,
            },
        }]),
        sample::<NvmfGetSubsystems>(vec![SubsystemInfo {
            nqn: String::new(),
            serial: String::new(),
            model: String::new(),
            allow_any_host: false,
            hosts: Vec::new(),
            listeners: Vec::new(),
            namespaces: vec![NamespaceInfo {
                nsid: 1,
                bdev: String::new(),
            }],
            controllers: vec![ControllerInfo {
                cntlid: 1,
                hostnqn: String::new(),
                io_queues: 0,
            }],
        }]),
        sample::<ReactorGetCores>(Cores { cores: vec![0] }),
        sample::<AuditVerify>(AuditReport {
            path: String::new(),
            intact: true,
            entries: Some(0),
            last_hash: Some(String::new()),
            error: Some(String::new()),
        }),
        sample::<VolumeCreate>(VolumeCreated {
            name: String::new(),
            listeners: Vec::new(),
            store: Some(String::new()),
            manifest_key: Some(String::new()),
            seeded: Some(Some(Seeded {
                seed: String::new(),
                chunks: 0,
                chunks_to_fetch: 0,
                changed_in_snapshot: 0,
                zero_in_snapshot: 0,
                changed_in_seed: 0,
                copied_bytes: 0,
                index_pages_read: 0,
                index_bytes_read: 0,
            })),
        }),
        sample::<VolumeDelete>(deleted()),
        sample::<VolumeAdopt>(Adopted {
            name: String::new(),
            store: String::new(),
            prefix: String::new(),
            owner: appliance(),
            adopted_from: appliance(),
            entered: Vec::new(),
            skipped: vec![NotEntered {
                manifest: String::new(),
                why: String::new(),
            }],
        }),
        sample::<VolumeList>(Volumes {
            volumes: vec![VolumeInfo {
                name: String::new(),
                kind: String::new(),
                size_bytes: 0,
                block_size: 512,
                chunk_bytes: 0,
                uuid: String::new(),
                export: None,
                snapshots: 0,
                read_bytes: 0,
                write_bytes: 0,
                unavailable: Some(String::new()),
            }],
            // Each as `clone_get`, whose row names their fields.
            clones: Vec::new(),
        }),
        sample::<SnapshotCreate>(job()),
        sample::<SnapshotList>(vec![Snapshot {
            id: String::new(),
            volume: String::new(),
            store: String::new(),
            manifest_key: String::new(),
            parent: None,
            created: 0,
            data_bytes: 0,
            meta_bytes: 0,
            chunks_read: 0,
            listed: false,
            duration_ms: 0,
        }]),
        sample::<SnapshotVerify>(job()),
        sample::<SnapshotRestore>(job()),
        sample::<SnapshotDelete>(SnapshotDeleted {
            id: String::new(),
            objects_deleted: 0,
            kept_as_ancestor: false,
        }),
        sample::<KeyList>(vec![KeyInfo {
            name: String::new(),
            default: true,
            check: String::new(),
        }]),
        sample::<KeyRotate>(Rotated {
            key: String::new(),
            snapshots: 0,
            rewrapped: 0,
            skipped: vec![RotateSkipped {
                snapshot: String::new(),
                volume: String::new(),
                owner: appliance(),
            }],
        }),
        sample::<KeyReceiver>(ReceiverKey {
            appliance: appliance(),
            public_key: String::new(),
        }),
        sample::<KeyExport>(ExportedKey {
            sealed: Value::Null,
            check: String::new(),
        }),
        sample::<KeyImport>(ImportedKey {
            key: String::new(),
            check: String::new(),
            file: String::new(),
            configured: false,
            configure: String::new(),
        }),
        sample::<StoreList>(vec![StoreInfo {
            name: String::new(),
            kind: String::new(),
            endpoint: Some(String::new()),
            bucket: Some(String::new()),
            region: Some(String::new()),
            path: Some(String::new()),
            check: Some(LastCheck {
                ok: true,
                at: 0,
                step: None,
                error: None,
            }),
            retries: Some(0),
            last_retry: Some(Some(retry())),
        }]),
        sample::<StoreCheck>(CheckReport {
            store: String::new(),
            ok: true,
            steps: vec![CheckStep {
                step: String::new(),
                ms: 0,
                error: None,
                detail: Some(String::new()),
            }],
        }),
        sample::<StoreCollect>(Collected {
            store: String::new(),
            dry_run: true,
            places: 0,
            objects: 0,
            bytes: 0,
            young: 0,
            ageless: 0,
            dead_leases: 0,
            grace_s: 0,
            requests: CollectRequests {
                lists: 0,
                gets: 0,
                deletes: 0,
            },
            skipped: vec![PlaceSkipped {
                prefix: String::new(),
                reason: String::new(),
            }],
            keys: Some(Vec::new()),
            keys_truncated: Some(false),
        }),
        sample::<StoreBrowse>(Browsed::Store(StoreCatalogue {
            store: String::new(),
            appliance: appliance(),
            volumes: vec![BrowsedVolume {
                head: bucket_volume(),
                snapshots: vec![bucket_snapshot()],
                more: false,
            }],
            unreadable: vec![PlaceSkipped {
                prefix: String::new(),
                reason: String::new(),
            }],
        })),
        sample::<StoreBrowse>(Browsed::Volume(VolumePage {
            store: String::new(),
            head: bucket_volume(),
            snapshots: vec![bucket_snapshot()],
            next: None,
        })),
        sample::<PolicySet>(policy()),
        sample::<PolicyDelete>(PolicyDeleted {
            volume: String::new(),
        }),
        sample::<PolicyList>(vec![policy()]),
        sample::<CloneCreate>(Created {
            name: String::new(),
            listeners: Vec::new(),
        }),
        sample::<CloneGet>(clone_info()),
        sample::<CloneDelete>(deleted()),
        sample::<CloneThicken>(clone_info()),
        sample::<JobGet>(job()),
        sample::<JobList>(vec![job()]),
        sample::<JobCancel>(job()),
    ]
}

/// Every method's result: each field (nested ones too) is named by API.md's result
/// column for it — its own row's, or the row it points to.
#[test]
fn api_md_names_every_field_of_every_result() {
    let columns = columns();
    let samples = samples();
    for (name, _) in ox_api::methods::ALL {
        assert!(
            samples.iter().any(|(n, _)| n == name),
            "{name}: no sample of its result here"
        );
    }
    for (method, value) in &samples {
        let row = match DOCUMENTED_WITH.iter().find(|(m, _)| m == method) {
            Some((_, other)) => {
                let (_, own) = &columns[*method];
                assert!(
                    own.contains(&format!("`{other}`")),
                    "API.md's result for {method} does not point to {other}'s: {own}"
                );
                other
            }
            None => method,
        };
        let (_, result) = &columns[*row];
        let mut found = Vec::new();
        keys(value, &mut found);
        for name in found {
            assert!(
                names(result, &name),
                "API.md's result for {method} ({row}'s row) does not name {name}: {result}"
            );
        }
    }
}

/// `auth`, which API.md describes apart: its answer's fields are named there.
#[test]
fn api_md_names_the_fields_of_the_auth_answer() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/API.md");
    let text = std::fs::read_to_string(path).unwrap();
    let over_tcp = text
        .split("\n\n")
        .find(|p| p.starts_with("**Over TCP.**"))
        .unwrap();
    let (_, answer) = sample::<Auth>(Authenticated {
        authenticated: true,
    });
    let mut found = Vec::new();
    keys(&answer, &mut found);
    for name in found {
        assert!(names(over_tcp, &name), "API.md's auth does not name {name}");
    }
}
