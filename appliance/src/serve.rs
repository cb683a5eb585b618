//! `oxd --config FILE`: serve the configured block devices over NVMe/TCP until SIGINT
//! or SIGTERM, then stop cleanly (connections closed, in-flight I/O drained). SIGHUP
//! reloads the hosts' DH-HMAC-CHAP secrets.

use std::path::Path;

use anyhow::Context;
use nvmf::Target;
use reactor::ReactorSet;

use std::sync::Arc;

use ox_api::audit::AuditLog;

use crate::config::Config;
use crate::control;
use crate::health::HealthFile;
use crate::service::Service;
use ox::cores::OxCores;

/// Runs the daemon from the configuration file at `path`.
pub fn run(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let reactor_config = config.reactor_config()?;
    let bdevs = config.open_bdevs()?;
    let host_keys = config.host_keys()?;
    // The health figures first: this start is counted (and an unclean last stop found)
    // before anything is served.
    let health_file = match config.health_path() {
        Some(p) => Some(HealthFile::start(&p).context("nvmf.health_file")?),
        None => None,
    };
    // A start that fails before anything is served returns an error, not a crash: the
    // record is marked clean on the way out, so a configuration error is not counted as
    // an unsafe shutdown. Once the target serves, only a clean stop clears it.
    let mut clean_on_error = CleanOnError(health_file.clone());
    let health = health_file
        .as_ref()
        .map(|h| Arc::clone(h.health()))
        .unwrap_or_default();
    let target_config = config.target_config(&bdevs, &host_keys, health)?;
    let ox_settings = config.ox_settings(&host_keys)?;
    // Block the handled signals before any thread starts, so every thread inherits
    // the mask and only `wait_for_signal` receives them.
    let signals = handled_signals();
    // SAFETY: sigprocmask with a valid, initialised set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };
    let set = ReactorSet::start(reactor_config).context("starting reactors")?;
    let target =
        Arc::new(Target::start(target_config, set.handles()).context("starting NVMe/TCP target")?);
    clean_on_error.0 = None;
    if let Some(h) = &health_file {
        h.save_periodically()?;
    }
    let audit = match &config.control.audit_log {
        Some(p) => Some(Arc::new(AuditLog::open(p).context("control.audit_log")?)),
        None => None,
    };
    let service = match ox_settings {
        Some((settings, cores)) => {
            let ox_cores = Arc::new(OxCores::start(&cores, 1024).context("starting OX cores")?);
            let state_dir = settings.state_dir.clone();
            let service = Service::start(
                settings,
                set.handles().to_vec(),
                ox_cores,
                Arc::clone(&target),
                audit.clone(),
                health_file.clone(),
            )?;
            service.ensure_volumes(&config.volumes)?;
            service.ensure_clones(&config.clones)?;
            service.ensure_policies(&config.policies)?;
            service.resume_pending();
            service.start_policies();
            service.check_stores_in_background();
            tracing::info!("object exchange on, state in {}", state_dir.display());
            Some(service)
        }
        None => None,
    };
    for s in &config.subsystems {
        let addrs: Vec<String> = target
            .listeners_of(&s.nqn)
            .iter()
            .map(ToString::to_string)
            .collect();
        tracing::info!(
            subsystem = %s.nqn,
            namespaces = s.namespaces.len(),
            on = %addrs.join(" "),
            "serving"
        );
    }
    let all: Vec<String> = target
        .local_addrs()
        .iter()
        .map(ToString::to_string)
        .collect();
    tracing::info!("listening on {}", all.join(" "));
    let record = |action: &str, detail: serde_json::Value| -> anyhow::Result<()> {
        if let Some(a) = &audit {
            a.record("oxd", action, detail, "ok")?;
        }
        Ok(())
    };
    record("start", serde_json::json!({ "config": path }))?;
    let connects = audit_connects(&target, audit.clone())?;
    let state = Arc::new(control::State {
        bdevs: bdevs.clone(),
        target: Arc::clone(&target),
        cores: set.handles().iter().map(|h| h.core()).collect(),
        audit: audit.clone(),
        service: service.clone(),
        reactors: Some(set.handles().to_vec()),
        guard: control::ControlCounters::default(),
        connects,
    });
    let limits = config.control.limits()?;
    if let Some(listen) = &config.metrics.listen {
        let addr = crate::config::parse_addr(listen).context("metrics.listen")?;
        let bound = crate::metrics::start(addr, Arc::clone(&state))?;
        tracing::info!("metrics on http://{bound}/metrics");
    }
    // TLS for the TCP control API and the web console: [control]'s certificate, read
    // only when one of them listens (as before the console, a certificate configured
    // for later stops nothing).
    let c = &config.control;
    let listening = c.listen.is_some() || config.console.listen.is_some();
    let tls = match (&c.tls_cert_file, &c.tls_key_file) {
        _ if !listening => None,
        (Some(cert), Some(key)) => {
            // A secret file, private to this user.
            let pem = ox::secret_file::read(key)
                .with_context(|| format!("control.tls_key_file {}", key.display()))?;
            Some(ox_api::tls::server_config(cert, key, &pem).context("control.tls_cert_file")?)
        }
        (None, None) => None,
        _ => anyhow::bail!("control: give both tls_cert_file and tls_key_file, or neither"),
    };
    if let Some(listen) = &config.control.listen {
        let addr = crate::config::parse_addr(listen).context("control.listen")?;
        let token = config
            .control
            .token_file
            .as_ref()
            .context("control.listen needs control.token_file")?;
        let secure = tls.is_some();
        let bound = control::start_tcp(addr, token, tls.clone(), Arc::clone(&state), limits)?;
        if secure {
            tracing::info!("control API on tcp {bound} (TLS, token required)");
        } else {
            tracing::warn!(
                "control API on tcp {bound} (token required) without TLS: the token \
                 crosses the network in the clear (set control.tls_cert_file and tls_key_file)"
            );
        }
    }
    if let Some(listen) = &config.console.listen {
        let addr = crate::config::parse_addr(listen).context("console.listen")?;
        let token_file = c
            .token_file
            .as_ref()
            .context("console.listen needs control.token_file (the console's sign-in)")?;
        let token = control::read_token(token_file)?;
        let secure = tls.is_some();
        let bound = crate::console::start(addr, token, tls.clone(), Arc::clone(&state), limits)?;
        if secure {
            tracing::info!("web console on https://{bound}/ (TLS, token required)");
        } else {
            tracing::warn!(
                "web console on http://{bound}/ (token required) without TLS: the token \
                 crosses the network in the clear (set control.tls_cert_file and tls_key_file)"
            );
        }
    }
    let _socket = match &config.control.socket {
        Some(p) => {
            let s = control::start(p, state, limits)?;
            tracing::info!("control socket {}", p.display());
            Some(s)
        }
        None => None,
    };
    let signal = loop {
        let signal = wait_for_signal(&signals);
        if signal != libc::SIGHUP {
            break signal;
        }
        reload_host_keys(path, &target, service.as_deref(), audit.as_deref());
    };
    tracing::info!("signal {signal}: stopping");
    // Background work first; then the reactors (in-flight I/O drained, connections
    // closed, so no host write lands after this); then what must survive a restart.
    if let Some(s) = &service {
        s.stop_background();
    }
    set.shutdown().context("stopping reactors")?;
    let mut problems = service.as_ref().map(|s| s.persist()).unwrap_or_default();
    if let Some(Err(e)) = health_file.as_ref().map(|h| h.stop()) {
        problems.push(ox_api::error_chain(&e));
    }
    for p in &problems {
        tracing::warn!("at stop: {p}");
    }
    record(
        "stop",
        serde_json::json!({ "signal": signal, "problems": problems }),
    )?;
    tracing::info!("stopped");
    Ok(())
}

/// Marks the health record cleanly stopped when dropped outside a panic, unless
/// disarmed: `run` failing before the target serves. After that only the explicit
/// stop, once the reactors stopped cleanly and state was persisted, clears the mark;
/// a panic, an error while serving or a kill leaves it, and the next start counts an
/// unsafe shutdown.
struct CleanOnError(Option<Arc<HealthFile>>);

impl Drop for CleanOnError {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        if let Some(Err(e)) = self.0.as_ref().map(|h| h.stop()) {
            tracing::warn!("saving the health record: {}", ox_api::error_chain(&e));
        }
    }
}

/// Hosts' Connect decisions (and connections closed before a Connect) go, through a
/// thread (the reactor that decided must not wait for an fsync), to the audit log and
/// the log, and are counted by outcome for metrics. Every controller created is
/// recorded; refusals — which a hostile peer can make by the thousand — at most 20 a
/// minute, each saying how many were left out before it. If the thread falls behind
/// by thousands, the excess is counted rather than blocking hosts.
fn audit_connects(
    target: &Target,
    audit: Option<Arc<AuditLog>>,
) -> anyhow::Result<Arc<control::ConnectCounts>> {
    let (tx, rx) = crossbeam_channel::bounded::<nvmf::ConnectEvent>(4096);
    let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let d = Arc::clone(&dropped);
    target.observe_connects(Arc::new(move |e: nvmf::ConnectEvent| {
        if tx.try_send(e).is_err() {
            d.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }))?;
    let counts = Arc::new(control::ConnectCounts::default());
    let c = Arc::clone(&counts);
    static REFUSALS: crate::admission::RateLimited = crate::admission::RateLimited::new(20);
    std::thread::Builder::new()
        .name("audit-connects".into())
        .spawn(move || {
            for e in rx {
                let lost = dropped.swap(0, std::sync::atomic::Ordering::Relaxed);
                c.count(if e.allowed { "allowed" } else { e.reason }, lost);
                let left_out = if e.allowed {
                    0
                } else {
                    let Some(left_out) = REFUSALS.admit() else {
                        continue;
                    };
                    tracing::warn!(
                        // As sent, quoted and escaped: a host's Connect data is not
                        // to write lines of its own into the log.
                        host = ?e.hostnqn,
                        peer = %e.peer,
                        subsystem = ?e.subnqn,
                        listener = %e.listener,
                        reason = %e.reason,
                        not_logged_before = left_out,
                        "host denied"
                    );
                    left_out
                };
                let Some(a) = &audit else { continue };
                // "ok", "ok, authentication required", "authenticated", or why not.
                let result = if e.allowed {
                    e.reason.to_string()
                } else {
                    format!("denied: {}", e.reason)
                };
                let detail = serde_json::json!({
                    "subsystem": e.subnqn, "listener": e.listener.to_string(),
                    "peer": e.peer.to_string(), "unrecorded_before": lost + left_out,
                });
                if let Err(err) = a.record(
                    &format!("host {}", e.hostnqn),
                    "host_connect",
                    detail,
                    &result,
                ) {
                    tracing::error!("audit log: {err}");
                }
            }
        })
        .context("starting the connect audit thread")?;
    Ok(counts)
}

/// SIGHUP: the `[[host]]` secrets are read again from the configuration and its files
/// and replace the running ones (new connections use them; the rest of the file is not
/// reloaded). A configuration that fails its checks changes nothing.
fn reload_host_keys(
    path: &Path,
    target: &Target,
    service: Option<&Service>,
    audit: Option<&AuditLog>,
) {
    // The service first: an export made meanwhile gets the new secrets, and the
    // target's update below recomputes every subsystem's from the same list.
    let reloaded = Config::load(path)
        .and_then(|c| c.host_keys())
        .and_then(|keys| {
            if let Some(s) = service {
                s.set_host_keys(keys.clone());
            }
            target
                .set_host_keys(|s| crate::config::keys_for(&s.hosts, &keys))
                .context("applying them")?;
            Ok(keys.len())
        });
    let result = match reloaded {
        Ok(n) => {
            tracing::info!("SIGHUP: {n} host secrets in force");
            "ok".to_string()
        }
        Err(e) => {
            let e = ox_api::error_chain(&e);
            tracing::error!("SIGHUP: host secrets not reloaded, the running ones stay: {e}");
            format!("failed: {e}")
        }
    };
    if let Some(a) = audit {
        let detail = serde_json::json!({ "config": path.display().to_string() });
        if let Err(err) = a.record("oxd", "reload_host_keys", detail, &result) {
            tracing::error!("audit log: {err}");
        }
    }
}

/// The signals oxd waits for: SIGINT and SIGTERM stop it, SIGHUP reloads host secrets.
fn handled_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    loop {
        // SAFETY: a valid signal set and a pointer to a live i32.
        if unsafe { libc::sigwait(set, &mut sig) } == 0 {
            return sig;
        }
    }
}
