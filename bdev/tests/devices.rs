//! Data integrity, validation, concurrency and shutdown for every block device, on real
//! reactors.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bdev::blocking::run_on;
use bdev::{
    Bdev, BdevError, BdevIo, IoBuf, IoType, UringConfig, create_malloc, create_null, open_uring,
};
use reactor::{CoreList, ReactorConfig, ReactorHandle, ReactorSet};

const T: Duration = Duration::from_secs(20);

fn reactors() -> ReactorSet {
    ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap()
}

/// A deterministic, position-dependent pattern so misplaced blocks are caught.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write(h: &ReactorHandle, dev: &Bdev, lba: u64, data: &[u8]) -> Result<(), BdevError> {
    let blocks = data.len() as u64 / u64::from(dev.block_size());
    run_on(
        h,
        dev,
        BdevIo::write(lba, blocks, vec![IoBuf::from_slice(data)]),
        T,
    )?
    .result
}

fn read(h: &ReactorHandle, dev: &Bdev, lba: u64, blocks: u64) -> Result<Vec<u8>, BdevError> {
    let len = (blocks * u64::from(dev.block_size())) as usize;
    let done = run_on(h, dev, BdevIo::read(lba, blocks, vec![IoBuf::new(len)]), T)?;
    let data = done.data();
    done.result.map(|()| data)
}

struct Devices {
    _dir: tempfile::TempDir,
    list: Vec<(Bdev, bool)>, // (device, stores data)
}

fn devices(block_size: u32) -> Devices {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let blocks = (64u64 << 20) / u64::from(block_size);
    let mut direct = UringConfig::new("uring-direct", dir.path().join("direct.img"));
    direct.create_size = Some(64 << 20);
    direct.block_size = Some(block_size);
    let mut buffered = UringConfig::new("uring-buffered", dir.path().join("buffered.img"));
    buffered.create_size = Some(64 << 20);
    buffered.block_size = Some(block_size);
    buffered.direct = false;
    let list = vec![
        (
            create_malloc("malloc", block_size, blocks, None).unwrap(),
            true,
        ),
        (
            create_null("null", block_size, blocks, None).unwrap(),
            false,
        ),
        (open_uring(&direct).unwrap(), true),
        (open_uring(&buffered).unwrap(), true),
    ];
    Devices { _dir: dir, list }
}

#[test]
fn patterns_at_start_middle_and_end_read_back() {
    let set = reactors();
    for block_size in [512u32, 4096] {
        let devs = devices(block_size);
        for (dev, stores) in &devs.list {
            let bs = u64::from(block_size);
            let n = dev.num_blocks();
            let extent = (256 << 10) / bs; // 256 KiB
            for (i, lba) in [0, n / 2 - extent / 2, n - extent].into_iter().enumerate() {
                let h = &set.handles()[i % set.len()];
                let data = pattern(lba ^ bs, (extent * bs) as usize);
                write(h, dev, lba, &data).unwrap();
                // Read back on the other reactor.
                let other = &set.handles()[(i + 1) % set.len()];
                let back = read(other, dev, lba, extent).unwrap();
                if *stores {
                    assert!(
                        back == data,
                        "{} bs {block_size}: mismatch at lba {lba}",
                        dev.name()
                    );
                } else {
                    assert!(back.iter().all(|&b| b == 0), "null must read zeroes");
                }
            }
            let stats = dev.stats();
            assert_eq!(stats.ops(IoType::Write), 3, "{}", dev.name());
            assert_eq!(stats.ops(IoType::Read), 3);
            assert_eq!(stats.bytes(IoType::Read), 3 * (256 << 10));
            assert_eq!(stats.latency.count(), 6);
            assert!(stats.latency.max() > Duration::ZERO);
        }
    }
    set.shutdown().unwrap();
}

/// A successful read writes every byte of its buffers, never-written blocks (a file's
/// holes, a RAM disk's untouched segments) as zeroes: a snapshot reads into buffers
/// that still hold an earlier chunk's bytes.
#[test]
fn a_read_fills_its_buffers_whole() {
    let set = reactors();
    let h = &set.handles()[0];
    for block_size in [512u32, 4096] {
        let devs = devices(block_size);
        let bs = block_size as usize;
        // Written: the 8 blocks before 2 MiB (the end of the RAM disk's first segment).
        let boundary = ((2 << 20) / bs) as u64;
        for (dev, stores) in &devs.list {
            let data = pattern(u64::from(block_size), 8 * bs);
            write(h, dev, boundary - 8, &data).unwrap();
            // 16 blocks before the boundary and 16 after (a segment never written), in
            // two buffers the second of which starts mid-write, both stale.
            let bufs = vec![
                IoBuf::from_slice(&vec![0xA5; 12 * bs]),
                IoBuf::from_slice(&vec![0x5A; 20 * bs]),
            ];
            let done = run_on(h, dev, BdevIo::read(boundary - 16, 32, bufs), T).unwrap();
            let back = done.data();
            done.result.unwrap();
            let mut want = vec![0; 32 * bs];
            if *stores {
                want[8 * bs..16 * bs].copy_from_slice(&data);
            }
            assert!(
                back == want,
                "{} bs {block_size}: stale bytes read back",
                dev.name()
            );
        }
    }
    set.shutdown().unwrap();
}

#[test]
fn vectored_fua_zeroes_unmap_and_flush() {
    let set = reactors();
    let h = &set.handles()[0];
    let devs = devices(512);
    for (dev, stores) in devs.list.iter().filter(|(_, s)| *s) {
        // A write from three segments of different sizes, with FUA.
        let data = pattern(7, 12 * 512);
        let bufs = vec![
            IoBuf::from_slice(&data[..512]),
            IoBuf::from_slice(&data[512..4096]),
            IoBuf::from_slice(&data[4096..]),
        ];
        let io = BdevIo::write(100, 12, bufs).with_fua(true);
        run_on(h, dev, io, T).unwrap().result.unwrap();
        // Read it back into two segments.
        let io = BdevIo::read(100, 12, vec![IoBuf::new(1024), IoBuf::new(5120)]);
        let done = run_on(h, dev, io, T).unwrap();
        done.result.as_ref().unwrap();
        assert_eq!(done.bufs.len(), 2);
        assert!(done.data() == data, "{}: vectored round trip", dev.name());

        // Zero a middle part, unmap the tail; the rest must survive.
        run_on(h, dev, BdevIo::write_zeroes(102, 2), T)
            .unwrap()
            .result
            .unwrap();
        run_on(h, dev, BdevIo::unmap(108, 4), T)
            .unwrap()
            .result
            .unwrap();
        run_on(h, dev, BdevIo::flush(), T).unwrap().result.unwrap();
        let back = read(h, dev, 100, 12).unwrap();
        let mut expect = data.clone();
        expect[2 * 512..4 * 512].fill(0);
        expect[8 * 512..].fill(0);
        assert!(back == expect, "{}: zeroes/unmap", dev.name());
        assert!(*stores);
        // Large unmap and write-zeroes across MiB boundaries.
        write(h, dev, 2047, &pattern(9, 4 * 512)).unwrap();
        run_on(h, dev, BdevIo::write_zeroes(0, 8192), T)
            .unwrap()
            .result
            .unwrap();
        assert!(read(h, dev, 2047, 4).unwrap().iter().all(|&b| b == 0));
    }
    set.shutdown().unwrap();
}

#[test]
fn invalid_requests_get_typed_errors() {
    let set = reactors();
    let h = &set.handles()[0];
    let devs = devices(4096);
    for (dev, _) in &devs.list {
        let n = dev.num_blocks();
        let io = |io| run_on(h, dev, io, T).unwrap().result.unwrap_err();
        assert!(matches!(
            io(BdevIo::read(n, 1, vec![IoBuf::new(4096)])),
            BdevError::OutOfRange { offset_blocks, .. } if offset_blocks == n
        ));
        assert!(matches!(
            io(BdevIo::write(n - 1, 2, vec![IoBuf::new(8192)])),
            BdevError::OutOfRange { .. }
        ));
        assert!(matches!(
            io(BdevIo::read(u64::MAX, 2, vec![IoBuf::new(8192)])),
            BdevError::OutOfRange { .. }
        ));
        assert!(matches!(
            io(BdevIo::unmap(n - 1, 2)),
            BdevError::OutOfRange { .. }
        ));
        assert!(matches!(
            io(BdevIo::read(0, 2, vec![IoBuf::new(4096)])),
            BdevError::BufferSize {
                expected: 8192,
                actual: 4096
            }
        ));
        assert!(matches!(
            io(BdevIo::write(0, 1, vec![IoBuf::new(512), IoBuf::new(3584)])),
            BdevError::SegmentSize {
                index: 0,
                len: 512,
                ..
            }
        ));
        assert!(matches!(
            io(BdevIo::read(0, 0, vec![])),
            BdevError::ZeroLength(IoType::Read)
        ));
        let mut zeroes = BdevIo::write_zeroes(0, 1);
        zeroes.bufs.push(IoBuf::new(4096));
        assert!(matches!(
            io(zeroes),
            BdevError::UnexpectedBuffers(IoType::WriteZeroes)
        ));
        let huge = bdev::MAX_IO_BYTES / 4096 + 1;
        assert!(matches!(
            io(BdevIo::read(0, huge.min(n), vec![])),
            BdevError::TooLarge { .. } | BdevError::BufferSize { .. }
        ));
        assert!(matches!(
            dev.blocks_of(100, 4096),
            Err(BdevError::Unaligned { offset: 100, .. })
        ));
        assert!(matches!(
            dev.blocks_of(4096, 10),
            Err(BdevError::Unaligned { .. })
        ));
        assert_eq!(dev.blocks_of(8192, 4096).unwrap(), (2, 1));
        assert!(
            dev.stats().errors >= 8,
            "{}: rejected requests are counted",
            dev.name()
        );
    }
    set.shutdown().unwrap();
}

#[test]
fn bad_devices_are_refused_at_open() {
    assert!(matches!(
        create_malloc("m", 1000, 10, None),
        Err(BdevError::BlockSize(1000))
    ));
    assert!(matches!(
        create_null("n", 512, 0, None),
        Err(BdevError::Empty(_))
    ));
    let missing = open_uring(&UringConfig::new("u", "/nonexistent/dir/file"));
    assert!(
        matches!(missing, Err(BdevError::Open { .. })),
        "{missing:?}"
    );
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let odd = dir.path().join("odd.img");
    std::fs::write(&odd, vec![0u8; 4096 + 100]).unwrap();
    let err = open_uring(&UringConfig::new("odd", &odd)).unwrap_err();
    assert!(err.to_string().contains("not a multiple"), "{err}");
    let mut small = UringConfig::new("small", &odd);
    small.block_size = Some(256);
    assert!(open_uring(&small).is_err());
    // Submitting off a reactor is refused, not a panic.
    let dev = create_null("n", 512, 8, None).unwrap();
    assert!(matches!(dev.channel(), Err(BdevError::NotOnReactor)));
}

#[test]
fn two_reactors_share_one_uring_device() {
    let set = reactors();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut config = UringConfig::new("shared", dir.path().join("shared.img"));
    config.create_size = Some(32 << 20);
    config.block_size = Some(4096);
    let dev = open_uring(&config).unwrap();
    // Each reactor keeps 32 writes in flight to its own interleaved stripes at once.
    let per_reactor = 512u64;
    let mut waits = Vec::new();
    for (r, h) in set.handles().iter().enumerate() {
        let n = set.len() as u64;
        let rxs: Vec<_> = (0..per_reactor)
            .map(|i| {
                let lba = i * n + r as u64;
                let io = BdevIo::write(lba, 1, vec![IoBuf::from_slice(&pattern(lba, 4096))]);
                bdev::blocking::submit_on(h, &dev, io).unwrap()
            })
            .collect();
        waits.extend(rxs);
    }
    for rx in waits {
        rx.recv_timeout(T).unwrap().result.unwrap();
    }
    // Each reactor reads back everything, concurrently with the other.
    let total = per_reactor * set.len() as u64;
    let checks: Vec<_> = set
        .handles()
        .iter()
        .map(|h| {
            let io = BdevIo::read(0, total, vec![IoBuf::new((total * 4096) as usize)]);
            bdev::blocking::submit_on(h, &dev, io).unwrap()
        })
        .collect();
    for rx in checks {
        let data = rx.recv_timeout(T).unwrap();
        data.result.as_ref().unwrap();
        let data = data.data();
        for lba in 0..total {
            let block = &data[(lba * 4096) as usize..][..4096];
            assert!(block == pattern(lba, 4096).as_slice(), "lba {lba}");
        }
    }
    set.shutdown().unwrap();
}

#[test]
fn shutdown_with_io_in_flight_loses_no_request() {
    let set = reactors();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut config = UringConfig::new("busy", dir.path().join("busy.img"));
    config.create_size = Some(64 << 20);
    let dev = open_uring(&config).unwrap();
    let malloc = create_malloc("m", 512, 1 << 16, None).unwrap();
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let per_reactor = 2000usize;
    for h in set.handles() {
        let (dev, malloc) = (dev.clone(), malloc.clone());
        let (ok, failed) = (Arc::clone(&ok), Arc::clone(&failed));
        h.send(move || {
            let uring = dev.channel().unwrap();
            let ram = malloc.channel().unwrap();
            for i in 0..per_reactor as u64 {
                let (ok, failed) = (Arc::clone(&ok), Arc::clone(&failed));
                let done = move |c: bdev::IoCompletion| {
                    match c.result {
                        Ok(()) => ok.fetch_add(1, Ordering::SeqCst),
                        Err(_) => failed.fetch_add(1, Ordering::SeqCst),
                    };
                };
                let io = BdevIo::read((i * 8) % (1 << 16), 8, vec![IoBuf::new(4096)]);
                if i % 2 == 0 {
                    uring.submit(io, done);
                } else {
                    ram.submit(io, done);
                }
            }
        })
        .unwrap();
    }
    set.shutdown().unwrap();
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    assert_eq!(ok + failed, per_reactor * 2, "ok {ok} failed {failed}");

    // After shutdown began, new I/O fails with ShuttingDown rather than vanishing.
    let set = reactors();
    let (tx, rx) = crossbeam_channel::unbounded();
    let malloc2 = malloc.clone();
    set.call(0, move || {
        let ram = malloc2.channel().unwrap();
        reactor::current().unwrap().on_stop(move || {
            ram.submit(BdevIo::read(0, 1, vec![IoBuf::new(512)]), move |c| {
                tx.send(c.result).unwrap();
            });
        });
    })
    .unwrap();
    set.shutdown().unwrap();
    assert!(matches!(
        rx.recv_timeout(T).unwrap(),
        Err(BdevError::ShuttingDown)
    ));
}

#[test]
fn zeroing_falls_back_to_writes_where_fallocate_is_refused() {
    // tmpfs refuses FALLOC_FL_ZERO_RANGE, so write-zeroes must write zeroes itself.
    let set = reactors();
    let h = &set.handles()[0];
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let mut config = UringConfig::new("shm", dir.path().join("shm.img"));
    config.create_size = Some(4 << 20);
    config.direct = false;
    let dev = open_uring(&config).unwrap();
    let data = pattern(3, 3 << 20);
    write(h, &dev, 0, &data).unwrap();
    run_on(h, &dev, BdevIo::write_zeroes(1, 4096), T)
        .unwrap()
        .result
        .unwrap();
    run_on(h, &dev, BdevIo::write_zeroes(5000, 10), T)
        .unwrap()
        .result
        .unwrap();
    let back = read(h, &dev, 0, 6144).unwrap();
    let mut expect = data.clone();
    expect[512..512 + 4096 * 512].fill(0);
    expect[5000 * 512..5010 * 512].fill(0);
    assert!(back == expect);
    set.shutdown().unwrap();
}

#[test]
fn thin_devices_report_what_they_hold() {
    let set = reactors();
    let h = &set.handles()[0];
    let devs = devices(512);
    for (dev, stores) in &devs.list {
        assert!(
            dev.allocated_blocks() < dev.num_blocks() / 2,
            "{}: a new device holds (almost) nothing",
            dev.name()
        );
        write(h, dev, 4096, &pattern(5, 1 << 20)).unwrap();
        let held = dev.allocated_blocks();
        if *stores {
            assert!(
                held >= 2048,
                "{}: 1 MiB written, {held} blocks held",
                dev.name()
            );
            assert!(
                held < dev.num_blocks() / 2,
                "{}: {held} blocks held",
                dev.name()
            );
        } else {
            assert_eq!(held, 0, "{}: keeps nothing", dev.name());
        }
        // Zeroing a whole region gives back what the backing store can free.
        run_on(h, dev, BdevIo::unmap(0, dev.num_blocks()), T)
            .unwrap()
            .result
            .unwrap();
        assert!(
            dev.allocated_blocks() <= held,
            "{}: unmapping everything frees, not allocates",
            dev.name()
        );
    }
    drop(devs);
    set.shutdown().unwrap();
}
