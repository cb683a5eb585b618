//! `oxd smoke`: a self-contained run of the reactors and block devices.
//!
//! It starts pinned reactors, opens one device of each kind (RAM, null and an io_uring
//! file in a temporary directory), writes self-checking patterns at the start, middle
//! and end of each from every reactor, then drives a burst of concurrent writes and
//! reads from all reactors at once and verifies every block. It needs nothing outside
//! the machine and proves the foundation works where it runs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bdev::blocking::{run_on, submit_on};
use bdev::{
    Bdev, BdevIo, IoBuf, IoCompletion, IoType, UringConfig, create_malloc, create_null, open_uring,
};
use clap::Args;
use crossbeam_channel::Receiver;
use reactor::{CoreList, IdlePolicy, ReactorConfig, ReactorHandle, ReactorSet};

const TIMEOUT: Duration = Duration::from_secs(30);
const BLOCK: u32 = 4096;

/// Options of `oxd smoke`.
#[derive(Args, Debug)]
pub struct SmokeArgs {
    /// Reactor cores, e.g. `0-1` or `0,2` (default: every core this process may use).
    #[arg(long)]
    cores: Option<String>,
    /// Idle policy of the reactors: busy, adaptive or interrupt.
    #[arg(long, default_value = "adaptive")]
    idle: IdlePolicy,
    /// Size of each device in MiB.
    #[arg(long, default_value_t = 64)]
    size_mib: u64,
    /// Directory for the io_uring device's backing file (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Concurrent requests per reactor in the burst phase.
    #[arg(long, default_value_t = 32)]
    depth: usize,
}

/// Runs the smoke test and prints what it did; any failure is an error.
pub fn run(args: &SmokeArgs) -> anyhow::Result<()> {
    let cores = match &args.cores {
        Some(list) => CoreList::parse(list)?,
        None => CoreList::all_available()?,
    };
    ensure!(args.size_mib >= 1, "--size-mib must be at least 1");
    ensure!(args.depth >= 1, "--depth must be at least 1");
    let started = Instant::now();
    let set = ReactorSet::start(ReactorConfig::new(cores.clone()).with_idle(args.idle))
        .context("starting reactors")?;
    println!(
        "oxd smoke: {} reactor(s) on cores {:?}, idle policy {}",
        set.len(),
        cores.cores(),
        args.idle
    );

    let dir = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let file = dir.join(format!("oxd-smoke-{}.img", std::process::id()));
    let outcome = exercise(&set, args, &file);
    let _ = std::fs::remove_file(&file);
    let shutdown = set.shutdown().context("stopping reactors");
    outcome?;
    shutdown?;
    println!("oxd smoke: all checks passed in {:.2?}", started.elapsed());
    Ok(())
}

fn exercise(set: &ReactorSet, args: &SmokeArgs, file: &std::path::Path) -> anyhow::Result<()> {
    let bytes = args.size_mib << 20;
    let blocks = bytes / u64::from(BLOCK);
    let mut uring = UringConfig::new("uring0", file);
    uring.create_size = Some(bytes);
    uring.block_size = Some(BLOCK);
    let devices = [
        (create_malloc("malloc0", BLOCK, blocks, None)?, true),
        (create_null("null0", BLOCK, blocks, None)?, false),
        (
            open_uring(&uring).with_context(|| format!("opening {}", file.display()))?,
            true,
        ),
    ];
    for (dev, stores) in &devices {
        for h in set.handles() {
            patterns(h, dev, *stores)
                .with_context(|| format!("{} on reactor {}", dev.name(), h.index()))?;
        }
        burst(set.handles(), dev, *stores, args.depth)
            .with_context(|| format!("{}: concurrent burst", dev.name()))?;
        flush(&set.handles()[0], dev)?;
    }
    println!(
        "{:<10} {:>8} {:>8} {:>10} {:>10} {:>7} {:>10} {:>10}",
        "device", "reads", "writes", "read MiB", "write MiB", "errors", "p50", "p99"
    );
    for (dev, _) in &devices {
        let s = dev.stats();
        println!(
            "{:<10} {:>8} {:>8} {:>10.1} {:>10.1} {:>7} {:>10.1?} {:>10.1?}",
            dev.name(),
            s.ops(IoType::Read),
            s.ops(IoType::Write),
            s.bytes(IoType::Read) as f64 / 1048576.0,
            s.bytes(IoType::Write) as f64 / 1048576.0,
            s.errors,
            s.latency.quantile(0.5),
            s.latency.quantile(0.99),
        );
    }
    for h in set.handles() {
        let s = h.stats();
        println!(
            "reactor {} (core {}): {} passes, {} parks, {} messages",
            h.index(),
            h.core(),
            s.passes,
            s.parks,
            s.messages
        );
    }
    Ok(())
}

/// Block contents that name their own LBA and writer, so misplaced data is caught.
fn block_pattern(lba: u64, salt: u64) -> Vec<u8> {
    let mut x = (lba ^ salt.rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..BLOCK as usize)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn run_ok(h: &ReactorHandle, dev: &Bdev, io: BdevIo) -> anyhow::Result<IoCompletion> {
    let done = run_on(h, dev, io, TIMEOUT)?;
    if let Err(e) = &done.result {
        bail!("I/O failed: {e}");
    }
    Ok(done)
}

/// Writes and reads back 8 blocks at the start, middle and end of `dev`.
fn patterns(h: &ReactorHandle, dev: &Bdev, stores: bool) -> anyhow::Result<()> {
    let n = dev.num_blocks();
    let salt = h.index() as u64 + 1;
    for lba in [0, n / 2, n - 8] {
        let data: Vec<u8> = (lba..lba + 8)
            .flat_map(|b| block_pattern(b, salt))
            .collect();
        run_ok(
            h,
            dev,
            BdevIo::write(lba, 8, vec![IoBuf::from_slice(&data)]),
        )?;
        let read = run_ok(h, dev, BdevIo::read(lba, 8, vec![IoBuf::new(data.len())]))?.data();
        let expected = if stores { data } else { vec![0; read.len()] };
        ensure!(
            read == expected,
            "data read at LBA {lba} differs from what was written"
        );
    }
    Ok(())
}

/// Every reactor writes `depth` distinct blocks at once, then reads them all back.
fn burst(handles: &[ReactorHandle], dev: &Bdev, stores: bool, depth: usize) -> anyhow::Result<()> {
    let stride = (dev.num_blocks() / (handles.len() * depth) as u64).max(1);
    let lbas: Vec<(usize, u64)> = (0..handles.len() * depth)
        .map(|i| (i % handles.len(), (i as u64 * stride) % dev.num_blocks()))
        .collect();
    let salt = 0xB0057;
    let writes: Vec<Receiver<IoCompletion>> = lbas
        .iter()
        .map(|&(r, lba)| {
            let io = BdevIo::write(lba, 1, vec![IoBuf::from_slice(&block_pattern(lba, salt))]);
            submit_on(&handles[r], dev, io)
        })
        .collect::<Result<_, _>>()?;
    for rx in writes {
        let done = rx.recv_timeout(TIMEOUT).context("write timed out")?;
        done.result.context("write failed")?;
    }
    let reads: Vec<Receiver<IoCompletion>> = lbas
        .iter()
        .map(|&(r, lba)| {
            submit_on(
                &handles[r],
                dev,
                BdevIo::read(lba, 1, vec![IoBuf::new(BLOCK as usize)]),
            )
        })
        .collect::<Result<_, _>>()?;
    for (rx, &(_, lba)) in reads.into_iter().zip(&lbas) {
        let done = rx.recv_timeout(TIMEOUT).context("read timed out")?;
        let data = done.data();
        done.result.context("read failed")?;
        let expected = if stores {
            block_pattern(lba, salt)
        } else {
            vec![0; BLOCK as usize]
        };
        ensure!(
            data == expected,
            "burst: block at LBA {lba} differs from what was written"
        );
    }
    Ok(())
}

fn flush(h: &ReactorHandle, dev: &Bdev) -> anyhow::Result<()> {
    if dev.supports(IoType::Flush) {
        run_ok(h, dev, BdevIo::flush()).with_context(|| format!("{}: flush", dev.name()))?;
    }
    Ok(())
}
