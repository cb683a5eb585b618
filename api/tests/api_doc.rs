//! docs/API.md and the typed methods say the same: every method has its row, every row
//! is a method, and each row's parameters column names every field the method takes
//! (the word "export" standing for `nqn`, `hosts` and `allow_any_host`, as the document
//! says above its table).
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;

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

/// The typed results' fields are the ones API.md's result column names.
#[test]
fn api_md_names_every_field_of_the_typed_results() {
    use ox_api::methods::{Job, JobState, Version};
    // A name counts as named where it stands as a word (`thicken` is not named by
    // `thickening`).
    let word = |text: &str, name: &str| {
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .any(|w| w == name)
    };
    let columns = columns();
    let fields =
        |v: serde_json::Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
    let version = fields(
        serde_json::to_value(Version {
            api: 1,
            oxd: String::new(),
        })
        .unwrap(),
    );
    let job = fields(
        serde_json::to_value(Job {
            id: 1,
            kind: String::new(),
            target: String::new(),
            state: JobState::Running,
            done: 0,
            total: 0,
            bytes: 0,
            retries: 0,
            last_retry: None,
            outage: None,
            result: serde_json::Value::Null,
            error: None,
        })
        .unwrap(),
    );
    let clone = fields(
        serde_json::to_value(ox_api::methods::CloneInfo {
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
            fetched_bytes: None,
            object_bytes: Some(0),
            gets: Some(0),
            integrity_failures: Some(0),
            refetches: Some(0),
            miss_latency_us: None,
            thickening: None,
            warming: None,
        })
        .unwrap(),
    );
    let mut clone = clone;
    clone.extend(["fetched_bytes", "miss_latency_us", "thickening", "warming"].map(String::from));
    let volume = fields(
        serde_json::to_value(ox_api::methods::VolumeInfo {
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
        })
        .unwrap(),
    );
    let snapshot = fields(
        serde_json::to_value(ox_api::methods::Snapshot {
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
        })
        .unwrap(),
    );
    let key = fields(
        serde_json::to_value(ox_api::methods::KeyInfo {
            name: String::new(),
            default: true,
            check: String::new(),
        })
        .unwrap(),
    );
    let policy = fields(
        serde_json::to_value(ox_api::methods::PolicyInfo {
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
            last_error: None,
            retired: 0,
            swept_objects: 0,
            swept_manifests: 0,
            last_retention: serde_json::Value::Null,
        })
        .unwrap(),
    );
    for (method, names) in [
        ("key_list", &key),
        ("policy_list", &policy),
        ("ox_get_version", &version),
        ("job_get", &job),
        ("clone_get", &clone),
        ("volume_list", &volume),
        ("snapshot_list", &snapshot),
    ] {
        let (_, result) = &columns[method];
        for name in names {
            assert!(
                word(result, name),
                "API.md's result for {method} does not name {name}: {result}"
            );
        }
    }
}
