//! Prometheus metrics over HTTP (`GET /metrics`, text format 0.0.4), served by hyper on
//! its own thread: per-device I/O counters and latency, clone hydration and object
//! traffic by reason, snapshot uploads, and reactor busy time.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::rc::Rc;
use std::sync::Arc;

use anyhow::Context;
use async_io::Async;
use bdev::IoType;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use serde_json::Value;
use smol_hyper::rt::FuturesIo;

use crate::control::State;

/// Binds `addr` and serves metrics from `state` until the process exits; returns the
/// bound address (port 0 picks one).
pub fn start(addr: SocketAddr, state: Arc<State>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).with_context(|| format!("metrics.listen: {addr}"))?;
    let local = listener.local_addr()?;
    let listener = Async::new(listener).context("metrics listener")?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let ex = Rc::new(async_executor::LocalExecutor::new());
            async_io::block_on(ex.run(async {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        // Out of descriptors, say: back off rather than spin.
                        async_io::Timer::after(std::time::Duration::from_millis(100)).await;
                        continue;
                    };
                    let state = Arc::clone(&state);
                    ex.spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let state = Arc::clone(&state);
                            async move { Ok::<_, std::convert::Infallible>(respond(&state, &req)) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(FuturesIo::new(stream), service)
                            .await;
                    })
                    .detach();
                }
            }));
        })
        .context("starting the metrics thread")?;
    Ok(local)
}

fn respond(state: &State, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let (status, body) = if req.uri().path() == "/metrics" {
        (StatusCode::OK, render(state))
    } else {
        (
            StatusCode::NOT_FOUND,
            "not found: try /metrics\n".to_string(),
        )
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

/// Escapes a label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes one metric family: `# HELP`, `# TYPE`, then its samples.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{{{labels}}} {v}");
    }
}

/// The whole exposition.
pub fn render(state: &State) -> String {
    let mut out = String::new();
    let dynamic = state
        .service
        .as_ref()
        .map(|s| s.bdevs())
        .unwrap_or_default();
    let bdevs: Vec<&bdev::Bdev> = state.bdevs.iter().chain(dynamic.iter()).collect();
    let stats: Vec<(String, bdev::BdevStats)> =
        bdevs.iter().map(|b| (esc(b.name()), b.stats())).collect();
    let per_kind = |f: &dyn Fn(&bdev::BdevStats, IoType) -> u64| -> Vec<(String, f64)> {
        stats
            .iter()
            .flat_map(|(n, s)| {
                IoType::ALL.iter().map(move |t| {
                    (
                        format!("bdev=\"{n}\",type=\"{}\"", t.name()),
                        f(s, *t) as f64,
                    )
                })
            })
            .collect()
    };
    let g = &state.guard;
    let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed) as f64;
    family(
        &mut out,
        "ox_control_refused_total",
        "counter",
        "Control connections refused: every slot, or the peer's share, was taken.",
        &[(String::new(), n(&g.refused))],
    );
    family(
        &mut out,
        "ox_control_timeouts_total",
        "counter",
        "Control connections closed at their authentication or request deadline.",
        &[(String::new(), n(&g.timed_out))],
    );
    family(
        &mut out,
        "ox_control_auth_failures_total",
        "counter",
        "Control connections that presented a bad or no token.",
        &[(String::new(), n(&g.auth_failures))],
    );
    let integrity = &ox::fetch::TOTAL;
    family(
        &mut out,
        "ox_store_integrity_failures_total",
        "counter",
        "Objects or ranges fetched from a store that failed their integrity check (snapshot loads, clones, verify, restore).",
        &[(String::new(), n(&integrity.failures))],
    );
    family(
        &mut out,
        "ox_store_refetches_total",
        "counter",
        "Fetches made again, on a fresh connection, after one failed its integrity check.",
        &[(String::new(), n(&integrity.refetches))],
    );
    let connects: Vec<(String, f64)> = state
        .connects
        .snapshot()
        .into_iter()
        .map(|(outcome, n)| (format!("outcome=\"{}\"", esc(outcome)), n as f64))
        .collect();
    family(
        &mut out,
        "ox_nvmf_connects_total",
        "counter",
        "NVMe/TCP connection decisions by outcome: allowed, or why refused (including connections closed before Connect).",
        &connects,
    );
    family(
        &mut out,
        "ox_bdev_ops_total",
        "counter",
        "Completed requests by device and type.",
        &per_kind(&|s, t| s.ops(t)),
    );
    family(
        &mut out,
        "ox_bdev_bytes_total",
        "counter",
        "Bytes moved by device and type.",
        &per_kind(&|s, t| s.bytes(t)),
    );
    family(
        &mut out,
        "ox_bdev_errors_total",
        "counter",
        "Failed requests by device.",
        &stats
            .iter()
            .map(|(n, s)| (format!("bdev=\"{n}\""), s.errors as f64))
            .collect::<Vec<_>>(),
    );
    let mut lat = Vec::new();
    for (n, s) in &stats {
        for q in [0.5, 0.9, 0.99] {
            lat.push((
                format!("bdev=\"{n}\",quantile=\"{q}\""),
                s.latency.quantile(q).as_secs_f64(),
            ));
        }
    }
    family(
        &mut out,
        "ox_bdev_latency_seconds",
        "summary",
        "Request latency, submit to completion.",
        &lat,
    );
    for (n, s) in &stats {
        let count = s.latency.count();
        let _ = writeln!(out, "ox_bdev_latency_seconds_count{{bdev=\"{n}\"}} {count}");
        let _ = writeln!(
            out,
            "ox_bdev_latency_seconds_sum{{bdev=\"{n}\"}} {}",
            s.latency.mean().as_secs_f64() * count as f64
        );
    }
    if let Some(service) = &state.service {
        clones(&mut out, &service.volume_list());
        let mut uploaded: std::collections::BTreeMap<String, f64> = Default::default();
        let mut count: std::collections::BTreeMap<String, f64> = Default::default();
        for s in service.snapshot_list(None).as_array().into_iter().flatten() {
            let v = esc(s["volume"].as_str().unwrap_or(""));
            *uploaded.entry(v.clone()).or_default() += (s["data_bytes"].as_u64().unwrap_or(0)
                + s["meta_bytes"].as_u64().unwrap_or(0))
                as f64;
            *count.entry(v).or_default() += 1.0;
        }
        family(
            &mut out,
            "ox_snapshot_stored_bytes",
            "gauge",
            "Bytes stored by the catalogued snapshots, by volume (falls when one is deleted).",
            &uploaded
                .into_iter()
                .map(|(v, b)| (format!("volume=\"{v}\""), b))
                .collect::<Vec<_>>(),
        );
        family(
            &mut out,
            "ox_snapshots",
            "gauge",
            "Catalogued snapshots, by volume.",
            &count
                .into_iter()
                .map(|(v, b)| (format!("volume=\"{v}\""), b))
                .collect::<Vec<_>>(),
        );
        let policies = service.policy_list();
        let per_policy = |field: &str| -> Vec<(String, f64)> {
            policies
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| {
                    let v = esc(p["volume"].as_str().unwrap_or(""));
                    Some((format!("volume=\"{v}\""), p[field].as_u64()? as f64))
                })
                .collect()
        };
        for (name, kind, help, field) in [
            (
                "ox_policy_last_success_timestamp_seconds",
                "gauge",
                "When the newest snapshot of a protected volume was taken (Unix seconds).",
                "last_success",
            ),
            (
                "ox_policy_rpo_seconds",
                "gauge",
                "Age of a protected volume's newest snapshot: what a disaster would lose now.",
                "rpo_s",
            ),
            (
                "ox_policy_runs_total",
                "counter",
                "Snapshots a policy started since the daemon started.",
                "runs",
            ),
            (
                "ox_policy_failures_total",
                "counter",
                "Policy snapshots or retentions that failed since the daemon started.",
                "failures",
            ),
            (
                "ox_policy_retired_snapshots_total",
                "counter",
                "Snapshots a policy's retention retired since the daemon started.",
                "retired",
            ),
            (
                "ox_policy_swept_objects_total",
                "counter",
                "Objects (data and index) retention removed from the store since the daemon started.",
                "swept_objects",
            ),
        ] {
            family(&mut out, name, kind, help, &per_policy(field));
        }
        let retries: Vec<(String, f64)> = service
            .store_list()
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["kind"] == "s3")
            .map(|s| {
                let name = esc(s["name"].as_str().unwrap_or(""));
                let n = s["retries"].as_u64().unwrap_or(0) as f64;
                (format!("store=\"{name}\""), n)
            })
            .collect();
        family(
            &mut out,
            "ox_store_retries_total",
            "counter",
            "Requests to an S3 store sent again after a failure worth retrying (5xx, 429, reset, timeout), by store; the last one's reason is in store_list.",
            &retries,
        );
    }
    if let Some(reactors) = &state.reactors {
        let mut busy = Vec::new();
        let mut idle = Vec::new();
        let mut ratio = Vec::new();
        for r in reactors {
            let s = r.stats();
            let l = format!("reactor=\"{}\",core=\"{}\"", r.index(), r.core());
            busy.push((l.clone(), s.busy.as_secs_f64()));
            idle.push((l.clone(), s.idle.as_secs_f64()));
            ratio.push((l, s.busy_fraction()));
        }
        family(
            &mut out,
            "ox_reactor_busy_seconds_total",
            "counter",
            "Time reactors spent in passes that found work.",
            &busy,
        );
        family(
            &mut out,
            "ox_reactor_idle_seconds_total",
            "counter",
            "Time reactors spent idle or parked.",
            &idle,
        );
        family(
            &mut out,
            "ox_reactor_busy_ratio",
            "gauge",
            "Busy share of each reactor since start.",
            &ratio,
        );
    }
    out
}

fn clones(out: &mut String, list: &Value) {
    let cl: Vec<&Value> = list["clones"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c.get("chunks_total").is_some())
        .collect();
    let one = |key: &dyn Fn(&Value) -> f64| -> Vec<(String, f64)> {
        cl.iter()
            .map(|c| {
                (
                    format!("clone=\"{}\"", esc(c["name"].as_str().unwrap_or(""))),
                    key(c),
                )
            })
            .collect()
    };
    let num = |v: &Value| v.as_f64().unwrap_or(0.0);
    family(
        out,
        "ox_clone_hydration_ratio",
        "gauge",
        "Share of a clone's chunks present locally.",
        &one(&|c| num(&c["hydration_pct"]) / 100.0),
    );
    family(
        out,
        "ox_clone_host_read_bytes_total",
        "counter",
        "Bytes hosts read from a clone.",
        &one(&|c| num(&c["host_read_bytes"])),
    );
    family(
        out,
        "ox_clone_object_gets_total",
        "counter",
        "GET requests a clone made (frames and index pages).",
        &one(&|c| num(&c["gets"])),
    );
    family(
        out,
        "ox_clone_integrity_failures_total",
        "counter",
        "Frames and index pages a clone fetched that failed their integrity check.",
        &one(&|c| num(&c["integrity_failures"])),
    );
    family(
        out,
        "ox_clone_refetches_total",
        "counter",
        "Fetches a clone made again after one failed its integrity check.",
        &one(&|c| num(&c["refetches"])),
    );
    family(
        out,
        "ox_clone_object_bytes_total",
        "counter",
        "Bytes a clone fetched from its object store.",
        &one(&|c| num(&c["object_bytes"])),
    );
    let mut by_reason = Vec::new();
    for c in &cl {
        for reason in ["client_miss", "prefetch", "thickening"] {
            by_reason.push((
                format!(
                    "clone=\"{}\",reason=\"{reason}\"",
                    esc(c["name"].as_str().unwrap_or(""))
                ),
                num(&c["fetched_bytes"][reason]),
            ));
        }
    }
    family(
        out,
        "ox_clone_fetched_bytes_total",
        "counter",
        "Bytes of chunks a clone made present, by reason.",
        &by_reason,
    );
    let mut miss = Vec::new();
    for c in &cl {
        let n = esc(c["name"].as_str().unwrap_or(""));
        for (q, k) in [("0.5", "p50"), ("0.99", "p99")] {
            miss.push((
                format!("clone=\"{n}\",quantile=\"{q}\""),
                num(&c["miss_latency_us"][k]) / 1e6,
            ));
        }
    }
    family(
        out,
        "ox_clone_miss_latency_seconds",
        "summary",
        "Client miss latency: miss to chunk present.",
        &miss,
    );
}
