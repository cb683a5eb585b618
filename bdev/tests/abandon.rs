//! When a copy-before-write copy cannot be written (the state disk is full), the
//! running snapshot is abandoned — recorded durably, so no restart continues it — and
//! the host's write goes ahead. Its own process: it limits the file size it may write.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use bdev::blocking::run_on;
use bdev::{BdevIo, IoBuf, Tracking, create_malloc, create_volume};
use reactor::{CoreList, ReactorConfig, ReactorSet};

const CHUNK: u64 = 64 << 10;
const T: Duration = Duration::from_secs(20);

fn limit_file_size(bytes: u64) {
    let lim = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit(2) with a valid rlimit; affects only this test process.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &lim) }, 0);
}

#[test]
fn a_copy_that_cannot_be_written_abandons_the_snapshot_not_the_host_write() {
    // SAFETY: ignoring SIGXFSZ makes an oversized write fail with EFBIG instead of
    // killing the process.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let set = ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap();
    let malloc = create_malloc("m", 512, 8 * CHUNK / 512, None).unwrap();
    let (vol, h) = create_volume("v", malloc, CHUNK, Tracking::AllChanged, None).unwrap();
    let store = dir.path().join("v.cbw");
    h.set_preserve_file(&store).unwrap();
    let write = |chunk: u64, byte: u8| {
        let io = BdevIo::write(
            chunk * CHUNK / 512,
            8,
            vec![IoBuf::from_slice(&[byte; 4096])],
        );
        run_on(&set.handles()[0], &vol, io, T).unwrap().result
    };
    for c in 0..8 {
        write(c, 1).unwrap();
    }
    let mut changed = futures_lite::future::block_on(h.begin_snapshot(&set.handles()[0])).unwrap();
    h.settle(&mut changed);
    let token = h.snapshot_token().unwrap();
    // The state disk "fills up": only the first two slots can still be written.
    limit_file_size(2 * (512 + CHUNK));
    write(0, 2).unwrap();
    assert_eq!(h.snapshot_abandoned(), None, "chunk 0 was copied");
    write(5, 2).expect("the host's write goes ahead");
    let why = h.snapshot_abandoned().expect("the snapshot is abandoned");
    assert!(why.contains("chunk 5"), "{why}");
    // Recorded by renaming the marker armed when the snapshot began: no new space.
    let marker = dir.path().join("v.cbw.abandoned");
    assert!(marker.exists() && !dir.path().join("v.cbw.abandoned.armed").exists());
    assert!(
        std::fs::read_to_string(&marker)
            .unwrap()
            .contains("chunk 5")
    );
    // Later writes to chunks the snapshot has not read go straight through.
    write(6, 2).expect("no copy is attempted any more");
    let io = BdevIo::read(5 * CHUNK / 512, 8, vec![IoBuf::new(4096)]);
    let back = run_on(&set.handles()[0], &vol, io, T).unwrap();
    assert_eq!(back.data()[0], 2, "the host's data is on the volume");
    limit_file_size(libc::RLIM_INFINITY);
    // A restart would not continue it.
    let malloc = create_malloc("m2", 512, 8 * CHUNK / 512, None).unwrap();
    let (_v2, h2) = create_volume("v2", malloc, CHUNK, Tracking::AllChanged, None).unwrap();
    h2.set_preserve_file(&store).unwrap();
    let err = h2
        .resume_snapshot(token, 0, &changed, &set.handles()[0])
        .unwrap_err();
    assert!(err.to_string().contains("abandoned"), "{err}");
    // The next snapshot starts clean, armed again.
    h.end_snapshot(Some(&changed));
    futures_lite::future::block_on(h.begin_snapshot(&set.handles()[0])).unwrap();
    assert_eq!(h.snapshot_abandoned(), None);
    assert!(!marker.exists() && dir.path().join("v.cbw.abandoned.armed").exists());
    h.end_snapshot(None);
    set.shutdown().unwrap();
}
