//! The tracked volume: change tracking, exclusive snapshots, copy-before-write keeping
//! the snapshot point while writes go on.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use bdev::blocking::run_on;
use bdev::{BdevIo, IoBuf, Tracking, create_malloc, create_volume};
use reactor::{CoreList, ReactorConfig, ReactorSet};

const CHUNK: u64 = 64 << 10;
const T: Duration = Duration::from_secs(20);

#[test]
fn one_snapshot_at_a_time_and_changes_are_tracked_and_preserved() {
    let set = ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap();
    let (vol, h) = create_volume(
        "v",
        create_malloc("m", 512, (16 * CHUNK) / 512, None).unwrap(),
        CHUNK,
        Tracking::Fresh,
        None,
    )
    .unwrap();
    let write = |lba: u64, byte: u8| {
        let io = BdevIo::write(lba, 8, vec![IoBuf::from_slice(&[byte; 4096])]);
        run_on(&set.handles()[0], &vol, io, T)
            .unwrap()
            .result
            .unwrap();
    };
    write(0, 1);
    write(3 * CHUNK / 512, 1);
    let mut changed = h.begin_snapshot().unwrap();
    assert!(
        h.begin_snapshot().is_err(),
        "a second snapshot while one runs"
    );
    assert!(h.writes_settled());
    h.settle(&mut changed);
    assert_eq!(changed.count(), 2);
    assert!(changed.contains(0) && changed.contains(3));
    // A write to chunk 0 during the snapshot: the old contents are kept for it.
    write(0, 2);
    let old = h.claim_chunk(0).unwrap().expect("preserved copy");
    assert!(old[..4096].iter().all(|&b| b == 1));
    // Chunk 3 is read from the device, then released.
    assert_eq!(h.claim_chunk(3), Ok(None));
    h.chunk_read(3);
    h.end_snapshot(None);
    // The write during the snapshot counts for the next one.
    let next = h.begin_snapshot().unwrap();
    assert_eq!(next.count(), 1);
    assert!(next.contains(0));
    // A failed snapshot gives its changes back.
    h.end_snapshot(Some(&next));
    let again = h.begin_snapshot().unwrap();
    assert!(again.contains(0));
    h.end_snapshot(None);
    set.shutdown().unwrap();
}
