//! Prometheus metrics over HTTP (`GET /metrics`, OpenMetrics text), served by hyper on
//! its own thread: per-device I/O counters and latency histograms, clone hydration and
//! object traffic by reason, snapshots and policies (RPO), stores, control and NVMe/TCP
//! connection decisions, and reactor busy time. Encoded by `prometheus-client` from
//! typed state read at each scrape (a [`Collector`]): nothing is kept twice, and a
//! field renamed in the service fails to compile here instead of exporting 0.
//! [`FAMILIES`] lists every family, for the docs and the dashboard's test.

use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::rc::Rc;
use std::sync::Arc;

use anyhow::Context;
use async_io::Async;
use bdev::{IoType, LatencyHistogram};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use smol_hyper::rt::FuturesIo;

use crate::control::State;

/// Binds `addr` and serves metrics from `state` until the process exits; returns the
/// bound address (port 0 picks one).
pub fn start(addr: SocketAddr, state: Arc<State>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).with_context(|| format!("metrics.listen: {addr}"))?;
    let local = listener.local_addr()?;
    let listener = Async::new(listener).context("metrics listener")?;
    let registry = Arc::new(registry_of(state));
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
                    let registry = Arc::clone(&registry);
                    ex.spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let registry = Arc::clone(&registry);
                            async move {
                                Ok::<_, std::convert::Infallible>(respond(&registry, &req))
                            }
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

fn respond(registry: &Registry, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let (status, body) = if req.uri().path() == "/metrics" {
        let mut text = String::new();
        match prometheus_client::encoding::text::encode(&mut text, registry) {
            Ok(()) => (StatusCode::OK, text),
            Err(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "metrics could not be encoded\n".to_string(),
            ),
        }
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
        hyper::header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    resp
}

/// The registry of oxd's metrics: one collector reading `state` at each scrape.
pub fn registry_of(state: Arc<State>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Exporter(state)));
    registry
}

/// What a family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Exposed as `NAME_total`.
    Counter,
    /// Exposed as `NAME`.
    Gauge,
    /// Exposed as `NAME_bucket` (with `le`), `NAME_sum` and `NAME_count`.
    Histogram,
}

/// One metric family: its name (a counter's without `_total`), kind, the names of
/// its labels (every sample has these, in this order) and help.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

const fn f(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    help: &'static str,
) -> Family {
    Family {
        name,
        kind,
        labels,
        help,
    }
}

/// Every family oxd exports.
pub const FAMILIES: &[Family] = &[
    f(
        "ox_control_refused",
        Kind::Counter,
        &[],
        "Control connections refused: every slot, or the peer's share, was taken.",
    ),
    f(
        "ox_control_timeouts",
        Kind::Counter,
        &[],
        "Control connections closed at their authentication or request deadline.",
    ),
    f(
        "ox_control_auth_failures",
        Kind::Counter,
        &[],
        "Control connections that presented a bad or no token.",
    ),
    f(
        "ox_store_integrity_failures",
        Kind::Counter,
        &[],
        "Objects or ranges fetched from a store that failed their integrity check (snapshot loads, clones, verify, restore).",
    ),
    f(
        "ox_store_refetches",
        Kind::Counter,
        &[],
        "Fetches made again, on a fresh connection, after one failed its integrity check.",
    ),
    f(
        "ox_nvmf_connects",
        Kind::Counter,
        &["outcome"],
        "NVMe/TCP connection decisions by outcome: allowed, or why refused (including connections closed before Connect).",
    ),
    f(
        "ox_bdev_ops",
        Kind::Counter,
        &["bdev", "type"],
        "Completed requests by device and type.",
    ),
    f(
        "ox_bdev_bytes",
        Kind::Counter,
        &["bdev", "type"],
        "Bytes moved by device and type.",
    ),
    f(
        "ox_bdev_errors",
        Kind::Counter,
        &["bdev"],
        "Failed requests by device.",
    ),
    f(
        "ox_bdev_latency_seconds",
        Kind::Histogram,
        &["bdev"],
        "Request latency, submit to completion, by device.",
    ),
    f(
        "ox_bdev_lifetime_bytes",
        Kind::Gauge,
        &["bdev", "type"],
        "Bytes hosts read and wrote over NVMe/TCP by device over its whole life, kept across restarts (the SMART log's data units); saved every 10 s, so an unclean stop may step it back: read it as is, not through rate().",
    ),
    f(
        "ox_bdev_lifetime_ops",
        Kind::Gauge,
        &["bdev", "type"],
        "Host read and write commands by device over its whole life, kept across restarts as ox_bdev_lifetime_bytes is.",
    ),
    f(
        "ox_clone_hydration_ratio",
        Kind::Gauge,
        &["clone"],
        "Share of a clone's chunks present locally.",
    ),
    f(
        "ox_clone_host_read_bytes",
        Kind::Counter,
        &["clone"],
        "Bytes hosts read from a clone.",
    ),
    f(
        "ox_clone_object_gets",
        Kind::Counter,
        &["clone"],
        "GET requests a clone made (frames, index pages, its working set).",
    ),
    f(
        "ox_clone_integrity_failures",
        Kind::Counter,
        &["clone"],
        "Frames and index pages a clone fetched that failed their integrity check.",
    ),
    f(
        "ox_clone_refetches",
        Kind::Counter,
        &["clone"],
        "Fetches a clone made again after one failed its integrity check.",
    ),
    f(
        "ox_clone_object_bytes",
        Kind::Counter,
        &["clone"],
        "Bytes a clone fetched from its object store.",
    ),
    f(
        "ox_clone_fetched_bytes",
        Kind::Counter,
        &["clone", "reason"],
        "Bytes of chunks a clone made present, by reason (client_miss, prefetch, thickening).",
    ),
    f(
        "ox_clone_miss_latency_seconds",
        Kind::Histogram,
        &["clone"],
        "Client miss latency: miss to chunk present, by clone.",
    ),
    f(
        "ox_clone_lifetime_fetched_bytes",
        Kind::Gauge,
        &["clone", "reason"],
        "Bytes of chunks a clone made present over its whole life, by reason, kept across restarts; saved every 10 s, so an unclean stop may step it back: read it as is, not through rate().",
    ),
    f(
        "ox_clone_lifetime_object_bytes",
        Kind::Gauge,
        &["clone"],
        "Bytes a clone fetched from its store over its whole life (frames and index pages), kept across restarts as ox_clone_lifetime_fetched_bytes is.",
    ),
    f(
        "ox_snapshot_stored_bytes",
        Kind::Gauge,
        &["volume"],
        "Bytes stored by the catalogued snapshots, by volume (falls when one is deleted).",
    ),
    f(
        "ox_snapshots",
        Kind::Gauge,
        &["volume"],
        "Catalogued snapshots, by volume.",
    ),
    f(
        "ox_snapshot_last_duration_seconds",
        Kind::Gauge,
        &["volume"],
        "How long the newest catalogued snapshot of a volume took (of those whose duration is known), by volume.",
    ),
    f(
        "ox_policy_last_success_timestamp_seconds",
        Kind::Gauge,
        &["volume"],
        "When the newest snapshot of a protected volume was taken (Unix seconds).",
    ),
    f(
        "ox_policy_rpo_seconds",
        Kind::Gauge,
        &["volume"],
        "Age of a protected volume's newest snapshot: what a disaster would lose now.",
    ),
    f(
        "ox_policy_runs",
        Kind::Counter,
        &["volume"],
        "Snapshots a policy started since the daemon started.",
    ),
    f(
        "ox_policy_failures",
        Kind::Counter,
        &["volume"],
        "Policy snapshots or retentions that failed since the daemon started.",
    ),
    f(
        "ox_policy_retired_snapshots",
        Kind::Counter,
        &["volume"],
        "Snapshots a policy's retention retired since the daemon started.",
    ),
    f(
        "ox_policy_swept_objects",
        Kind::Counter,
        &["volume"],
        "Objects (data and index) retention removed from the store since the daemon started.",
    ),
    f(
        "ox_store_retries",
        Kind::Counter,
        &["store", "kind"],
        "Requests to an S3 store sent again after a failure worth retrying, by store and kind (slow_down: 429, or 503 with a slow-down code; server_error: other 5xx; damaged: a body damaged on the way; timeout; connection); the last one's reason is in store_list.",
    ),
    f(
        "ox_store_failures",
        Kind::Counter,
        &["store", "kind"],
        "Requests to an S3 store that still failed after their own retries, by store and kind (unavailable; refused: 4xx or 501; untrusted: the server's certificate; damaged: a success answer that cannot be right, such as a listing that does not parse or a range longer than asked).",
    ),
    f(
        "ox_throttle_waits",
        Kind::Counter,
        &["bdev", "class"],
        "Transfers to or from a store that waited on the bandwidth limits, by volume or clone (bdev) and class (foreground: host misses; background: snapshots, prefetch, thickening).",
    ),
    f(
        "ox_throttle_wait_seconds",
        Kind::Counter,
        &["bdev", "class"],
        "Time those transfers waited on the bandwidth limits, by volume or clone (bdev) and class.",
    ),
    f(
        "ox_throttle_waiting",
        Kind::Gauge,
        &["bdev", "class"],
        "Transfers of a volume or clone (bdev) waiting on the bandwidth limits now, by class; a series only while some wait.",
    ),
    f(
        "ox_reactor_busy_seconds",
        Kind::Counter,
        &["reactor", "core"],
        "Time reactors spent in passes that found work.",
    ),
    f(
        "ox_reactor_idle_seconds",
        Kind::Counter,
        &["reactor", "core"],
        "Time reactors spent idle or parked.",
    ),
    f(
        "ox_reactor_busy_ratio",
        Kind::Gauge,
        &["reactor", "core"],
        "Busy share of each reactor since start.",
    ),
];

/// Latency histogram bounds, in seconds: 10 µs to 10 s.
const LATENCY_BOUNDS: [f64; 19] = [
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

type Labels = Vec<(&'static str, String)>;

/// A value of a sample.
enum Value {
    Int(u64),
    Float(f64),
    Latency(LatencyHistogram),
}

/// Reads oxd's state at each scrape.
#[derive(Debug)]
struct Exporter(Arc<State>);

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State").finish_non_exhaustive()
    }
}

/// Encodes family `name` (declared in [`FAMILIES`]) with its samples.
fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    samples: impl IntoIterator<Item = (Labels, Value)>,
) -> fmt::Result {
    let Some(fam) = FAMILIES.iter().find(|f| f.name == name) else {
        debug_assert!(false, "metric family {name} is not declared in FAMILIES");
        return Ok(());
    };
    let kind = match fam.kind {
        Kind::Counter => MetricType::Counter,
        Kind::Gauge => MetricType::Gauge,
        Kind::Histogram => MetricType::Histogram,
    };
    let mut m = enc.encode_descriptor(fam.name, fam.help, None, kind)?;
    for (labels, value) in samples {
        debug_assert!(
            labels
                .iter()
                .map(|(k, _)| *k)
                .eq(fam.labels.iter().copied()),
            "a sample of {name} has labels {labels:?}, not {:?}",
            fam.labels
        );
        // The encoder writes label values as they are: a device's name comes from the
        // configuration and may hold what the text format must escape.
        let labels: Labels = labels.into_iter().map(|(k, v)| (k, escaped(&v))).collect();
        let mut one = m.encode_family(&labels)?;
        match (fam.kind, value) {
            (Kind::Counter, Value::Int(v)) => one.encode_counter::<NoLabelSet, _, u64>(&v, None)?,
            (Kind::Counter, Value::Float(v)) => {
                one.encode_counter::<NoLabelSet, _, u64>(&v, None)?
            }
            (Kind::Gauge, Value::Int(v)) => one.encode_gauge(&v)?,
            (Kind::Gauge, Value::Float(v)) => one.encode_gauge(&v)?,
            (Kind::Histogram, Value::Latency(h)) => one.encode_histogram::<NoLabelSet>(
                h.sum().as_secs_f64(),
                h.count(),
                &h.between(&LATENCY_BOUNDS),
                None,
            )?,
            _ => debug_assert!(false, "a sample of {name} does not fit its kind"),
        }
    }
    Ok(())
}

/// A label value as the text format writes it: `\\`, `\"` and `\n` escaped.
fn escaped(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn one(labels: Labels, v: Value) -> std::iter::Once<(Labels, Value)> {
    std::iter::once((labels, v))
}

impl Collector for Exporter {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let state = &self.0;
        let e = &mut enc;
        let n = |c: &std::sync::atomic::AtomicU64| {
            Value::Int(c.load(std::sync::atomic::Ordering::Relaxed))
        };
        let g = &state.guard;
        family(e, "ox_control_refused", one(vec![], n(&g.refused)))?;
        family(e, "ox_control_timeouts", one(vec![], n(&g.timed_out)))?;
        family(
            e,
            "ox_control_auth_failures",
            one(vec![], n(&g.auth_failures)),
        )?;
        let integrity = &ox::fetch::TOTAL;
        family(
            e,
            "ox_store_integrity_failures",
            one(vec![], n(&integrity.failures)),
        )?;
        family(
            e,
            "ox_store_refetches",
            one(vec![], n(&integrity.refetches)),
        )?;
        family(
            e,
            "ox_nvmf_connects",
            state
                .connects
                .snapshot()
                .into_iter()
                .map(|(outcome, c)| (vec![("outcome", outcome.to_string())], Value::Int(c))),
        )?;

        let dynamic = state
            .service
            .as_ref()
            .map(|s| s.bdevs())
            .unwrap_or_default();
        let stats: Vec<(String, bdev::BdevStats)> = state
            .bdevs
            .iter()
            .chain(dynamic.iter())
            .map(|b| (b.name().to_string(), b.stats()))
            .collect();
        let per_type = |f: fn(&bdev::BdevStats, IoType) -> u64| {
            stats.iter().flat_map(move |(name, s)| {
                IoType::ALL.iter().map(move |t| {
                    (
                        vec![("bdev", name.clone()), ("type", t.name().to_string())],
                        Value::Int(f(s, *t)),
                    )
                })
            })
        };
        family(e, "ox_bdev_ops", per_type(|s, t| s.ops(t)))?;
        family(e, "ox_bdev_bytes", per_type(|s, t| s.bytes(t)))?;
        family(
            e,
            "ox_bdev_errors",
            stats
                .iter()
                .map(|(name, s)| (vec![("bdev", name.clone())], Value::Int(s.errors))),
        )?;
        family(
            e,
            "ox_bdev_latency_seconds",
            stats.iter().map(|(name, s)| {
                (
                    vec![("bdev", name.clone())],
                    Value::Latency(s.latency.clone()),
                )
            }),
        )?;
        let (_, lifetimes) = state.target.health().record();
        let per_op = |read: fn(&bdev::IoTotals) -> u64, write: fn(&bdev::IoTotals) -> u64| {
            lifetimes.iter().flat_map(move |(name, t)| {
                [("read", read(t)), ("write", write(t))].map(|(op, v)| {
                    (
                        vec![("bdev", name.clone()), ("type", op.to_string())],
                        Value::Int(v),
                    )
                })
            })
        };
        family(
            e,
            "ox_bdev_lifetime_bytes",
            per_op(|t| t.read_bytes, |t| t.write_bytes),
        )?;
        family(e, "ox_bdev_lifetime_ops", per_op(|t| t.reads, |t| t.writes))?;

        if let Some(service) = &state.service {
            let clones = service.clone_views();
            let per_clone = |f: fn(&crate::service::CloneView) -> Value| {
                clones
                    .iter()
                    .map(move |c| (vec![("clone", c.name.clone())], f(c)))
            };
            family(
                e,
                "ox_clone_hydration_ratio",
                per_clone(|c| Value::Float(c.hydration())),
            )?;
            family(
                e,
                "ox_clone_host_read_bytes",
                per_clone(|c| Value::Int(c.host_read_bytes)),
            )?;
            family(e, "ox_clone_object_gets", per_clone(|c| Value::Int(c.gets)))?;
            family(
                e,
                "ox_clone_integrity_failures",
                per_clone(|c| Value::Int(c.integrity_failures)),
            )?;
            family(
                e,
                "ox_clone_refetches",
                per_clone(|c| Value::Int(c.refetches)),
            )?;
            family(
                e,
                "ox_clone_object_bytes",
                per_clone(|c| Value::Int(c.object_bytes)),
            )?;
            family(
                e,
                "ox_clone_fetched_bytes",
                clones.iter().flat_map(|c| {
                    c.fetched_bytes.iter().map(|(reason, bytes)| {
                        (
                            vec![("clone", c.name.clone()), ("reason", reason.to_string())],
                            Value::Int(*bytes),
                        )
                    })
                }),
            )?;
            family(
                e,
                "ox_clone_miss_latency_seconds",
                per_clone(|c| Value::Latency(c.miss_latency.clone())),
            )?;
            family(
                e,
                "ox_clone_lifetime_fetched_bytes",
                clones.iter().flat_map(|c| {
                    crate::service::fetched(&c.lifetime).map(|(reason, bytes)| {
                        (
                            vec![("clone", c.name.clone()), ("reason", reason.to_string())],
                            Value::Int(bytes),
                        )
                    })
                }),
            )?;
            family(
                e,
                "ox_clone_lifetime_object_bytes",
                per_clone(|c| Value::Int(c.lifetime.object_bytes)),
            )?;

            let totals = service.snapshot_totals();
            family(
                e,
                "ox_snapshot_stored_bytes",
                totals.iter().map(|t| {
                    (
                        vec![("volume", t.volume.clone())],
                        Value::Int(t.stored_bytes),
                    )
                }),
            )?;
            family(
                e,
                "ox_snapshots",
                totals
                    .iter()
                    .map(|t| (vec![("volume", t.volume.clone())], Value::Int(t.snapshots))),
            )?;
            family(
                e,
                "ox_snapshot_last_duration_seconds",
                totals.iter().filter_map(|t| {
                    let ms = t.last_duration_ms?;
                    Some((
                        vec![("volume", t.volume.clone())],
                        Value::Float(ms as f64 / 1000.0),
                    ))
                }),
            )?;

            let policies = service.policy_views();
            let per_policy = |f: fn(&crate::service::PolicyView) -> Option<u64>| {
                policies.iter().filter_map(move |p| {
                    Some((vec![("volume", p.volume.clone())], Value::Int(f(p)?)))
                })
            };
            family(
                e,
                "ox_policy_last_success_timestamp_seconds",
                per_policy(|p| p.last_success),
            )?;
            family(e, "ox_policy_rpo_seconds", per_policy(|p| p.rpo_s))?;
            family(e, "ox_policy_runs", per_policy(|p| Some(p.runs)))?;
            family(e, "ox_policy_failures", per_policy(|p| Some(p.failures)))?;
            family(
                e,
                "ox_policy_retired_snapshots",
                per_policy(|p| Some(p.retired)),
            )?;
            family(
                e,
                "ox_policy_swept_objects",
                per_policy(|p| Some(p.swept_objects)),
            )?;
            let (mut retries, mut failures) = (Vec::new(), Vec::new());
            for s in service.store_troubles() {
                let sample = |(kind, n): (&str, u64)| {
                    (
                        vec![("store", s.store.clone()), ("kind", kind.to_string())],
                        Value::Int(n),
                    )
                };
                retries.extend(s.retries.iter().copied().map(sample));
                failures.extend(s.failures.iter().copied().map(sample));
            }
            family(e, "ox_store_retries", retries)?;
            family(e, "ox_store_failures", failures)?;
            let waits = service.throttle_waits();
            let per_wait = |f: fn(&ox::throttle::Waited) -> Value| {
                waits.iter().map(move |(volume, class, w)| {
                    (
                        vec![("bdev", volume.clone()), ("class", class.to_string())],
                        f(w),
                    )
                })
            };
            family(
                e,
                "ox_throttle_waits",
                per_wait(|w| Value::Int(w.transfers)),
            )?;
            family(
                e,
                "ox_throttle_wait_seconds",
                per_wait(|w| Value::Float(w.time.as_secs_f64())),
            )?;
            let waiting = service
                .throttle_waiting()
                .into_iter()
                .map(|(volume, class, n)| {
                    (
                        vec![("bdev", volume), ("class", class.to_string())],
                        Value::Int(n),
                    )
                });
            family(e, "ox_throttle_waiting", waiting)?;
        }

        if let Some(reactors) = &state.reactors {
            let each: Vec<(Labels, reactor::ReactorStats)> = reactors
                .iter()
                .map(|r| {
                    (
                        vec![
                            ("reactor", r.index().to_string()),
                            ("core", r.core().to_string()),
                        ],
                        r.stats(),
                    )
                })
                .collect();
            family(
                e,
                "ox_reactor_busy_seconds",
                each.iter()
                    .map(|(l, s)| (l.clone(), Value::Float(s.busy.as_secs_f64()))),
            )?;
            family(
                e,
                "ox_reactor_idle_seconds",
                each.iter()
                    .map(|(l, s)| (l.clone(), Value::Float(s.idle.as_secs_f64()))),
            )?;
            family(
                e,
                "ox_reactor_busy_ratio",
                each.iter()
                    .map(|(l, s)| (l.clone(), Value::Float(s.busy_fraction()))),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// The names a family is exposed under.
    fn exposed(f: &Family) -> Vec<String> {
        match f.kind {
            Kind::Counter => vec![format!("{}_total", f.name)],
            Kind::Gauge => vec![f.name.to_string()],
            Kind::Histogram => ["bucket", "sum", "count"]
                .iter()
                .map(|s| format!("{}_{s}", f.name))
                .collect(),
        }
    }

    /// Encodes one family of `samples` as the exporter does.
    #[derive(Debug)]
    struct Fixed(&'static str, Vec<(String, u64)>);

    impl Collector for Fixed {
        fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
            let samples = self
                .1
                .iter()
                .map(|(name, v)| (vec![("bdev", name.clone())], Value::Int(*v)));
            family(&mut enc, self.0, samples)
        }
    }

    #[test]
    fn hostile_label_values_are_escaped() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Fixed(
            "ox_bdev_errors",
            vec![("a\"b\\c\nd".into(), 1)],
        )));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("ox_bdev_errors_total{bdev=\"a\\\"b\\\\c\\nd\"} 1\n"),
            "{text}"
        );
        // One sample line, one HELP, one TYPE, the EOF: nothing broke the line.
        assert_eq!(text.lines().count(), 4, "{text}");
    }

    #[test]
    fn families_are_named_once_and_as_prometheus_wants() {
        let mut names: Vec<&str> = FAMILIES.iter().map(|f| f.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FAMILIES.len(), "a family declared twice");
        for f in FAMILIES {
            assert!(f.name.starts_with("ox_"), "{}", f.name);
            assert!(
                !f.name.ends_with("_total"),
                "{}: the encoder adds _total",
                f.name
            );
            assert!(
                f.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{}",
                f.name
            );
            assert!(!f.help.is_empty(), "{}", f.name);
        }
    }

    /// The families, their kinds, labels and help are those docs/metrics.txt lists: a
    /// renamed or retyped metric breaks operators' dashboards and alerts, so it must be
    /// a deliberate change of that file (and said in the release notes), never a
    /// side effect.
    #[test]
    fn metric_families_are_the_golden_list() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.txt");
        let golden = std::fs::read_to_string(path).unwrap();
        let mut now = String::from(GOLDEN_HEADER);
        for f in FAMILIES {
            let kind = match f.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            now.push_str(&format!(
                "{} {kind} {{{}}}\n    {}\n",
                exposed(f).join(" "),
                f.labels.join(","),
                f.help
            ));
        }
        if golden != now {
            let (g, n): (Vec<_>, Vec<_>) = (golden.lines().collect(), now.lines().collect());
            let gone: Vec<_> = g.iter().filter(|l| !n.contains(l)).collect();
            let new: Vec<_> = n.iter().filter(|l| !g.contains(l)).collect();
            panic!(
                "the exported metrics differ from docs/metrics.txt\nonly in the file: \
                 {gone:#?}\nonly exported: {new:#?}\nIf the change is meant, write this into \
                 the file:\n{now}"
            );
        }
    }

    const GOLDEN_HEADER: &str = "\
# Every metric family oxd exports at /metrics: the names as Prometheus sees them, the
# type, the labels, and the help. Checked against the code by appliance/src/metrics.rs
# (metric_families_are_the_golden_list): change it only on purpose.
";

    /// The dashboard in docs/grafana loads (valid JSON, panels with queries) and every
    /// metric its queries name is one oxd exports.
    #[test]
    fn the_grafana_dashboard_queries_only_exported_metrics() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/grafana/oxd.json");
        let text = std::fs::read_to_string(path).unwrap();
        let dash: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert!(dash["title"].is_string() && dash["uid"].is_string());
        let panels = dash["panels"].as_array().expect("panels");
        assert!(!panels.is_empty());
        let mut ids = Vec::new();
        let mut used = std::collections::BTreeSet::new();
        for p in panels {
            ids.push(p["id"].as_u64().expect("a panel id"));
            let title = p["title"].as_str().expect("a panel title");
            let targets = p["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{title}: no query");
            for t in targets {
                let expr = t["expr"].as_str().expect("a query");
                let mut names = 0;
                // The labels of the families the query reads (and histograms' `le`).
                let mut labels = vec!["le"];
                let mut rest = expr;
                while let Some(at) = rest.find("ox_") {
                    let tail = &rest[at..];
                    let end = tail
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(tail.len());
                    let name = &tail[..end];
                    let family = FAMILIES
                        .iter()
                        .find(|f| exposed(f).iter().any(|n| n == name));
                    let Some(family) = family else {
                        panic!("{title}: {name} is not exported (query {expr})");
                    };
                    labels.extend(family.labels);
                    used.insert(name.to_string());
                    names += 1;
                    rest = &tail[end..];
                }
                assert!(names > 0, "{title}: the query {expr} names no ox_ metric");
                // Every label it groups by (or leaves out) is one those families
                // have, and so is every label its legend shows.
                let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
                let mut named: Vec<&str> = Vec::new();
                for keyword in ["by", "without"] {
                    for (at, _) in expr.match_indices(keyword) {
                        let before = expr[..at].chars().next_back();
                        let after = expr[at + keyword.len()..].trim_start();
                        if before.is_some_and(ident) || !after.starts_with('(') {
                            continue;
                        }
                        let end = after.find(')').expect("a closed group");
                        named.extend(after[1..end].split(',').map(str::trim));
                    }
                }
                let legend = t["legendFormat"].as_str().unwrap_or("");
                for part in legend.split("{{").skip(1) {
                    named.push(part.split("}}").next().unwrap_or("").trim());
                }
                for label in named.into_iter().filter(|l| !l.is_empty()) {
                    assert!(
                        labels.contains(&label),
                        "{title}: no family of the query has label {label} ({expr})"
                    );
                }
            }
        }
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), panels.len(), "panel ids are unique");
        // Every family is on the dashboard somewhere.
        for f in FAMILIES {
            assert!(
                exposed(f).iter().any(|n| used.contains(n)),
                "{} is on no panel",
                f.name
            );
        }
    }
}
