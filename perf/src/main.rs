//! `oxperf`: an NVMe/TCP initiator and load generator, for the OX appliance or any
//! NVMe/TCP target. It speaks the protocol through `nvmf-wire` (PDUs, commands,
//! DH-HMAC-CHAP), the types the target uses too, and builds nothing of the target.

mod auth;
mod engine;
mod report;
mod session;
mod verify;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::{Args, Parser, Subcommand, ValueEnum};
use nvmf_wire::pdu::Digests;

use crate::engine::{Control, Job, Pattern, Progress, Queue, QueueResult};
use crate::report::Report;
use crate::session::{Controller, DEFAULT_HOSTNQN, Endpoint, resolve};

/// NVMe/TCP benchmarking tool: discover targets, drive workloads, verify data.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a target's discovery log.
    Discover(DiscoverArgs),
    /// Run a workload against one or more namespaces.
    Run(RunArgs),
}

#[derive(Args)]
struct Common {
    /// Host NQN to connect as.
    #[arg(long, default_value = DEFAULT_HOSTNQN)]
    hostnqn: String,
    /// Digests: none, header, data or both.
    #[arg(long, value_enum, default_value = "none")]
    digest: DigestArg,
    /// Seconds to wait for the target before giving up.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Keep SQ flow control on (by default Connect turns it off, as `nvme connect
    /// --disable-sqflow` does, so a target may end a read with its data PDU alone).
    #[arg(long)]
    sq_flow_control: bool,
    /// DH-HMAC-CHAP secret of this host (`DHHC-1:XX:...:`, as `nvme connect
    /// --dhchap-secret` takes it), or a file holding it, for targets that require
    /// authentication.
    #[arg(long, value_name = "SECRET|FILE")]
    dhchap_secret: Option<String>,
    /// The controller's secret (or a file holding it): the target must prove it too.
    #[arg(long, value_name = "SECRET|FILE", requires = "dhchap_secret")]
    dhchap_ctrl_secret: Option<String>,
}

/// A secret given on the command line, or read from the file it names. Errors never
/// repeat the argument: it may be a mistyped secret.
fn secret(arg: &str, what: &str) -> anyhow::Result<nvmf_wire::dhchap::DhchapKey> {
    let text = if arg.starts_with("DHHC-1:") {
        arg.to_string()
    } else {
        std::fs::read_to_string(arg).map_err(|e| {
            anyhow::anyhow!("{what}: neither a DHHC-1:XX:...: secret nor a readable file ({e})")
        })?
    };
    nvmf_wire::dhchap::DhchapKey::parse(&text).with_context(|| what.to_string())
}

fn dhchap(c: &Common) -> anyhow::Result<Option<auth::HostSecrets>> {
    let Some(key) = &c.dhchap_secret else {
        return Ok(None);
    };
    Ok(Some(auth::HostSecrets {
        key: secret(key, "--dhchap-secret")?,
        ctrl_key: c
            .dhchap_ctrl_secret
            .as_deref()
            .map(|k| secret(k, "--dhchap-ctrl-secret"))
            .transpose()?,
    }))
}

#[derive(Clone, Copy, ValueEnum)]
enum DigestArg {
    None,
    Header,
    Data,
    Both,
}

#[derive(Args)]
struct DiscoverArgs {
    /// Target address:port (discovery controllers usually listen on 8009).
    addr: String,
    #[command(flatten)]
    common: Common,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    Read,
    Write,
    Randread,
    Randwrite,
    Randrw,
}

#[derive(Args)]
struct RunArgs {
    /// Target as ADDRESS:PORT,SUBSYSTEM-NQN[,NSID] (NSID defaults to 1); repeat for
    /// several namespaces or targets in one run.
    #[arg(long = "target", required = true)]
    targets: Vec<String>,
    /// Workload.
    #[arg(short, long, value_enum, default_value = "randread")]
    workload: Workload,
    /// Percentage of reads for randrw.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    read_pct: u8,
    /// I/O size in bytes (a multiple of the namespace's block size).
    #[arg(long, default_value_t = 4096)]
    bs: u32,
    /// Alignment of I/O offsets in bytes (default: the I/O size).
    #[arg(long)]
    align: Option<u32>,
    /// Commands in flight per queue pair.
    #[arg(long, default_value_t = 32)]
    qd: u16,
    /// I/O queue pairs per target.
    #[arg(long, default_value_t = 1)]
    qpairs: u16,
    /// Initiator cores (e.g. "1" or "0,1"); queue pairs are spread over them.
    #[arg(long, default_value = "1")]
    cores: String,
    /// Seconds to measure (after warm-up). Ignored with --ios.
    #[arg(long, default_value_t = 10.0)]
    time: f64,
    /// Stop after this many I/Os in total instead of after --time.
    #[arg(long)]
    ios: Option<u64>,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    /// LBA range as FIRST:COUNT (default: the whole namespace).
    #[arg(long)]
    range: Option<String>,
    /// Cap on total IOPS (for latency at a given load).
    #[arg(long)]
    rate: Option<f64>,
    /// Write self-describing blocks and check every read.
    #[arg(long)]
    verify: bool,
    /// Seed of verify blocks (use the same seed to verify an earlier run's writes).
    #[arg(long, default_value_t = 0x0F0F_0F0F)]
    seed: u64,
    /// After its last I/O, each queue pair sends a Flush and waits for it (as fio's
    /// end_fsync): the writes are then durable, not only acknowledged. A failed Flush
    /// counts as a failed command.
    #[arg(long)]
    flush: bool,
    /// Do not print progress once a second.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    common: Common,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn digests(d: DigestArg) -> Digests {
    Digests {
        header: matches!(d, DigestArg::Header | DigestArg::Both),
        data: matches!(d, DigestArg::Data | DigestArg::Both),
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Discover(a) => exit(discover(&a)),
        Command::Run(a) => match run(&a) {
            Ok(code) => code,
            Err(e) => exit(Err(e)),
        },
    }
}

fn exit(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("oxperf: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn discover(a: &DiscoverArgs) -> anyhow::Result<()> {
    let ep = Endpoint {
        addr: resolve(&a.addr)?,
        subnqn: String::new(),
        hostnqn: a.common.hostnqn.clone(),
        digests: digests(a.common.digest),
        timeout: Duration::from_secs(a.common.timeout),
        sq_flow_control: a.common.sq_flow_control,
        dhchap: dhchap(&a.common)?,
    };
    let records = session::discover(&ep)?;
    if a.common.json {
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(());
    }
    println!("Discovery Log Number of Records {}", records.len());
    for (i, r) in records.iter().enumerate() {
        println!("=====Discovery Log Entry {i}======");
        println!(
            "trtype:  {}",
            if r.trtype == 3 {
                "tcp".into()
            } else {
                r.trtype.to_string()
            }
        );
        println!(
            "adrfam:  {}",
            match r.adrfam {
                1 => "ipv4",
                2 => "ipv6",
                _ => "other",
            }
        );
        println!(
            "subtype: {}",
            match r.subtype {
                2 => "nvme subsystem",
                3 => "current discovery subsystem",
                _ => "other",
            }
        );
        println!("portid:  {}", r.portid);
        println!("trsvcid: {}", r.trsvcid);
        println!("subnqn:  {}", r.subnqn);
        println!("traddr:  {}", r.traddr);
    }
    Ok(())
}

struct TargetSpec {
    addr: String,
    nqn: String,
    nsid: u32,
}

fn parse_target(text: &str) -> anyhow::Result<TargetSpec> {
    let parts: Vec<&str> = text.split(',').collect();
    ensure!(
        (2..=3).contains(&parts.len()),
        "--target {text:?}: expected ADDRESS:PORT,NQN[,NSID]"
    );
    let nsid = match parts.get(2) {
        Some(n) => n
            .parse()
            .with_context(|| format!("--target {text:?}: bad NSID"))?,
        None => 1,
    };
    Ok(TargetSpec {
        addr: parts[0].into(),
        nqn: parts[1].into(),
        nsid,
    })
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn parse_cores(text: &str) -> anyhow::Result<Vec<usize>> {
    let available: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    let mut cores = Vec::new();
    for part in text.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<usize>()?, b.trim().parse::<usize>()?),
            None => {
                let c = part.trim().parse::<usize>()?;
                (c, c)
            }
        };
        for c in a..=b {
            ensure!(
                available.contains(&c),
                "--cores: core {c} is not available (available: {available:?})"
            );
            cores.push(c);
        }
    }
    ensure!(!cores.is_empty(), "--cores: no cores");
    Ok(cores)
}

fn run(a: &RunArgs) -> anyhow::Result<ExitCode> {
    let specs: Vec<TargetSpec> = a
        .targets
        .iter()
        .map(|t| parse_target(t))
        .collect::<anyhow::Result<_>>()?;
    let cores = parse_cores(&a.cores)?;
    ensure!(a.qd >= 1, "--qd must be at least 1");
    ensure!(a.qpairs >= 1, "--qpairs must be at least 1");
    ensure!(a.time > 0.0 || a.ios.is_some(), "--time must be positive");
    let (pattern, read_pct) = match a.workload {
        Workload::Read => (Pattern::Sequential, 100),
        Workload::Write => (Pattern::Sequential, 0),
        Workload::Randread => (Pattern::Random, 100),
        Workload::Randwrite => (Pattern::Random, 0),
        Workload::Randrw => (Pattern::Random, a.read_pct),
    };
    let timeout = Duration::from_secs(a.common.timeout.max(1));
    let total_queues = specs.len() as u64 * u64::from(a.qpairs);
    let mut controllers = Vec::new();
    let mut queues = Vec::new();
    let progress: Vec<Arc<Progress>> = (0..total_queues).map(|_| Arc::default()).collect();
    for spec in &specs {
        let ep = Endpoint {
            addr: resolve(&spec.addr)?,
            subnqn: spec.nqn.clone(),
            hostnqn: a.common.hostnqn.clone(),
            digests: digests(a.common.digest),
            timeout,
            sq_flow_control: a.common.sq_flow_control,
            dhchap: dhchap(&a.common)?,
        };
        let mut ctrl = Controller::connect(&ep, a.qpairs)
            .with_context(|| format!("{} {}", ep.addr, ep.subnqn))?;
        let ns = ctrl.namespace(spec.nsid)?;
        let bs = ns.block_size;
        if !a.common.json && !a.quiet {
            eprintln!(
                "{} {}: {} (serial {}), namespace {} of {} blocks of {bs} bytes",
                spec.addr, spec.nqn, ctrl.info.model, ctrl.info.serial, spec.nsid, ns.blocks
            );
        }
        ensure!(
            a.bs >= bs && a.bs.is_multiple_of(bs),
            "--bs {} is not a multiple of {}'s block size {bs}",
            a.bs,
            spec.nqn
        );
        ensure!(
            ctrl.info.max_transfer == 0 || a.bs <= ctrl.info.max_transfer,
            "--bs {} exceeds the controller's maximum transfer of {} bytes",
            a.bs,
            ctrl.info.max_transfer
        );
        ensure!(
            u32::from(a.qd) < ctrl.info.max_queue_entries,
            "--qd {} exceeds the controller's queue size ({} entries)",
            a.qd,
            ctrl.info.max_queue_entries
        );
        ensure!(
            ctrl.info.io_queues >= a.qpairs,
            "the controller granted {} I/O queues, --qpairs asks for {}",
            ctrl.info.io_queues,
            a.qpairs
        );
        let align = a.align.unwrap_or(a.bs);
        ensure!(
            align >= bs && align.is_multiple_of(bs),
            "--align must be a multiple of the block size {bs}"
        );
        ensure!(
            !a.verify || align == a.bs,
            "--verify needs --align equal to --bs"
        );
        let (first, count) = match &a.range {
            Some(r) => {
                let (f, c) = r.split_once(':').context("--range: expected FIRST:COUNT")?;
                (
                    f.parse::<u64>().context("--range FIRST")?,
                    c.parse::<u64>().context("--range COUNT")?,
                )
            }
            None => (0, ns.blocks),
        };
        ensure!(
            first.checked_add(count).is_some_and(|e| e <= ns.blocks),
            "--range {first}:{count} is beyond the namespace ({} blocks)",
            ns.blocks
        );
        let io_blocks = u64::from(a.bs / bs);
        let slice = count / u64::from(a.qpairs);
        ensure!(
            slice >= io_blocks,
            "--range is too small for {} queue pairs",
            a.qpairs
        );
        for q in 0..a.qpairs {
            let session = ctrl.io_queue(&ep, q + 1, a.qd + 1)?;
            let job = Job {
                ns,
                pattern,
                read_pct,
                io_blocks,
                stride_blocks: u64::from(align / bs),
                first_lba: first + u64::from(q) * slice,
                blocks: slice,
                depth: a.qd,
                io_limit: a.ios.map_or(0, |n| n.div_ceil(total_queues)),
                rate: a.rate.map_or(0.0, |r| r / total_queues as f64),
                verify: a.verify.then_some(a.seed),
                timeout,
                flush_at_end: a.flush,
            };
            let label = format!("{}/{}/q{}", spec.addr, spec.nsid, q + 1);
            let i = queues.len();
            queues.push(Queue::new(label, session, job, Arc::clone(&progress[i]))?);
        }
        controllers.push(ctrl);
    }
    let workload = format!(
        "{} bs={} qd={} qpairs={} targets={} cores={:?}{}{}",
        match a.workload {
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::Randread => "randread",
            Workload::Randwrite => "randwrite",
            Workload::Randrw => "randrw",
        },
        a.bs,
        a.qd,
        a.qpairs,
        specs.len(),
        cores,
        if a.verify { " verify" } else { "" },
        if a.flush { " flush" } else { "" }
    );

    // SAFETY: installing an async-signal-safe handler that only stores an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    let control = Arc::new(Control {
        stop: AtomicBool::new(false),
        measuring: AtomicBool::new(a.warmup <= 0.0),
    });
    let mut per_thread: Vec<Vec<Queue>> = (0..cores.len()).map(|_| Vec::new()).collect();
    for (i, q) in queues.into_iter().enumerate() {
        per_thread[i % cores.len()].push(q);
    }
    let mut threads = Vec::new();
    for (core, qs) in cores.iter().copied().zip(per_thread) {
        if qs.is_empty() {
            continue;
        }
        let control = Arc::clone(&control);
        threads.push(
            std::thread::Builder::new()
                .name(format!("oxperf-{core}"))
                .spawn(move || {
                    core_affinity::set_for_current(core_affinity::CoreId { id: core });
                    engine::run_thread(qs, &control, thread_cpu)
                })?,
        );
    }

    let started = Instant::now();
    let warmup = Duration::from_secs_f64(a.warmup.max(0.0));
    let run_for = Duration::from_secs_f64(a.time.max(0.0));
    let mut last_ka = Instant::now();
    let mut last_print = Instant::now();
    let mut last_ios = 0u64;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let elapsed = started.elapsed();
        if !control.measuring.load(Ordering::Relaxed) && elapsed >= warmup {
            control.measuring.store(true, Ordering::SeqCst);
        }
        let interrupted = INTERRUPTED.load(Ordering::Relaxed);
        if interrupted || (a.ios.is_none() && elapsed >= warmup + run_for) {
            control.stop.store(true, Ordering::SeqCst);
        }
        if threads.iter().all(|t| t.is_finished()) {
            break;
        }
        if last_ka.elapsed() >= Duration::from_secs(5) {
            for c in &mut controllers {
                // A failed keep-alive shows up as failed I/O: no need to stop here.
                let _ = c.admin.keep_alive();
            }
            last_ka = Instant::now();
        }
        if !a.quiet && !a.common.json && last_print.elapsed() >= Duration::from_secs(1) {
            let ios: u64 = progress.iter().map(|p| p.ios.load(Ordering::Relaxed)).sum();
            let dt = last_print.elapsed().as_secs_f64();
            eprintln!(
                "[{:>5.1} s] {:>10.0} IOPS{}",
                elapsed.as_secs_f64(),
                (ios - last_ios) as f64 / dt,
                if elapsed < warmup { " (warm-up)" } else { "" }
            );
            last_ios = ios;
            last_print = Instant::now();
        }
    }
    let mut results: Vec<QueueResult> = Vec::new();
    let mut cpu = Duration::ZERO;
    let mut failure = None;
    for t in threads {
        match t.join() {
            Ok((outcome, r, c)) => {
                results.extend(r);
                cpu += c;
                if let Err(e) = outcome {
                    failure.get_or_insert(e);
                }
            }
            Err(_) => bail!("a load thread panicked"),
        }
    }
    let report = Report::new(workload, &results, cpu, INTERRUPTED.load(Ordering::Relaxed))?;
    if a.common.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    if let Some(e) = failure {
        eprintln!("oxperf: error: {e:#}");
        return Ok(ExitCode::FAILURE);
    }
    if report.mismatch.is_some() {
        return Ok(ExitCode::from(3));
    }
    if report.total.errors > 0 {
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}
