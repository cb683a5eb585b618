//! `nondurable`: a RAM device with a volatile write cache that can lose power, in the
//! spirit of FoundationDB's `AsyncFileNonDurable`, for power-cut tests. A write is
//! acknowledged once in the cache; only a Flush (everything acknowledged before it) or a
//! FUA write (itself) makes it durable. [`PowerSwitch::cut`] then keeps a seeded random
//! subset of the cached sectors — writes are lost, torn at sector granularity and
//! reordered, as a real drive's may be — and fails every request still arriving at the
//! old device. [`PowerSwitch::restore`] gives the same media as a new device, as after a
//! reboot.
//!
//! A test device: its state sits behind one mutex shared with the test thread that
//! cuts the power (the I/O path of a production device never looks like this).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use uuid::Uuid;

use crate::bdev::{BackendChannel, Bdev, BdevBackend, BdevInfo};
use crate::completions::ReadyQueue;
use crate::error::BdevError;
use crate::io::{BdevIo, IoCompletion, IoDone, IoType};

/// Granularity of what survives a cut: a sector is written whole or not at all.
const SECTOR: usize = 512;

/// The drive's media and volatile cache: shared by the device below and by the
/// deterministic simulator (`crate::sim`), which drives it on one thread.
pub(crate) struct State {
    /// What survives any cut.
    media: Vec<u8>,
    /// Sectors acknowledged but not yet durable, by sector number (the last write of
    /// each: a drive never lands an older write of a sector over a newer one), with the
    /// write's sequence number.
    cache: BTreeMap<u64, (u64, Vec<u8>)>,
    /// The sequence number of the write each sector's media holds (none: never written).
    media_seq: BTreeMap<u64, u64>,
    /// Writes so far, sector by sector.
    writes: u64,
    /// Which power-on the device belongs to: requests to an older one fail.
    power_on: u64,
    /// A drive that lies: flushes and FUA are acknowledged and do nothing.
    lies: bool,
    rng: u64,
}

/// Sectors cached when a flush was issued (see [`State::cached`]).
#[cfg(test)]
pub(crate) type Cached = Vec<(u64, u64, Vec<u8>)>;

impl State {
    /// A drive of `bytes` zeroed bytes; `seed` decides what a cut keeps.
    pub(crate) fn new(bytes: usize, seed: u64) -> Self {
        Self {
            media: vec![0; bytes],
            cache: BTreeMap::new(),
            media_seq: BTreeMap::new(),
            writes: 0,
            power_on: 0,
            lies: false,
            rng: seed | 1,
        }
    }

    pub(crate) fn read(&self, offset: usize, out: &mut [u8]) {
        out.copy_from_slice(&self.media[offset..offset + out.len()]);
        let first = (offset / SECTOR) as u64;
        let last = ((offset + out.len()).div_ceil(SECTOR)) as u64;
        for (&sector, (_, data)) in self.cache.range(first..last) {
            let at = sector as usize * SECTOR;
            let (from, to) = (at.max(offset), (at + SECTOR).min(offset + out.len()));
            out[from - offset..to - offset].copy_from_slice(&data[from - at..to - at]);
        }
    }

    pub(crate) fn write(&mut self, offset: usize, data: &[u8], durable: bool) {
        assert!(
            offset.is_multiple_of(SECTOR) && data.len().is_multiple_of(SECTOR),
            "writes are whole sectors"
        );
        for (i, s) in data.chunks(SECTOR).enumerate() {
            let sector = (offset / SECTOR + i) as u64;
            self.writes += 1;
            if durable {
                self.cache.remove(&sector);
                self.land(sector, self.writes, s);
            } else {
                self.cache.insert(sector, (self.writes, s.to_vec()));
            }
        }
    }

    /// Puts write `seq` of `sector` on the media.
    fn land(&mut self, sector: u64, seq: u64, data: &[u8]) {
        let at = sector as usize * SECTOR;
        self.media[at..at + SECTOR].copy_from_slice(data);
        self.media_seq.insert(sector, seq);
    }

    pub(crate) fn flush(&mut self) {
        for (sector, (seq, data)) in std::mem::take(&mut self.cache) {
            self.land(sector, seq, &data);
        }
    }

    /// The sectors acknowledged and not yet durable: a flush issued now makes these
    /// durable when it ends ([`Self::persist`]), and no more.
    #[cfg(test)]
    pub(crate) fn cached(&self) -> Cached {
        self.cache
            .iter()
            .map(|(&s, (seq, d))| (s, *seq, d.clone()))
            .collect()
    }

    /// Makes `sectors` (what [`Self::cached`] gave when a flush was issued) durable,
    /// unless the media holds a newer write of a sector already (a FUA write since); a
    /// sector written again since stays cached with its newer bytes.
    #[cfg(test)]
    pub(crate) fn persist(&mut self, sectors: Cached) {
        for (sector, seq, data) in sectors {
            if self.media_seq.get(&sector).is_some_and(|&m| m >= seq) {
                continue;
            }
            if self.cache.get(&sector).is_some_and(|(c, _)| *c == seq) {
                self.cache.remove(&sector);
            }
            self.land(sector, seq, &data);
        }
    }

    /// Cuts the power: each cached sector lands or is lost (seeded).
    pub(crate) fn cut(&mut self) -> Cut {
        self.power_on += 1;
        let mut cut = Cut { landed: 0, lost: 0 };
        for (sector, (seq, data)) in std::mem::take(&mut self.cache) {
            if self.next_random().is_multiple_of(2) {
                self.land(sector, seq, &data);
                cut.landed += 1;
            } else {
                cut.lost += 1;
            }
        }
        cut
    }

    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }
}

/// Controls the power of a [`create_nondurable`] device.
#[derive(Clone)]
pub struct PowerSwitch {
    state: Arc<Mutex<State>>,
    info: BdevInfo,
}

/// What a power cut did to the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// Cached sectors that reached the media anyway.
    pub landed: u64,
    /// Cached sectors lost.
    pub lost: u64,
}

impl PowerSwitch {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cuts the power: each cached sector lands or is lost (seeded), and every request
    /// to the device from now on fails.
    pub fn cut(&self) -> Cut {
        self.state().cut()
    }

    /// The media as a new device, as after power comes back (call after [`Self::cut`]).
    pub fn restore(&self) -> Result<Bdev, BdevError> {
        let power_on = self.state().power_on;
        device(self, power_on)
    }

    /// Makes the drive lie (or stop lying): flushes and FUA writes are acknowledged
    /// without making anything durable. For showing that a power-cut test can fail.
    pub fn lie_about_flushes(&self, lies: bool) {
        self.state().lies = lies;
    }

    /// Sectors acknowledged and not yet durable.
    pub fn cached_sectors(&self) -> usize {
        self.state().cache.len()
    }
}

struct NonDurable {
    switch: PowerSwitch,
    power_on: u64,
}

impl BdevBackend for NonDurable {
    fn supports(&self, _io_type: IoType) -> bool {
        true
    }

    fn create_channel(&self, _info: &BdevInfo) -> Result<Box<dyn BackendChannel>, BdevError> {
        let reactor = reactor::current().ok_or(BdevError::NotOnReactor)?;
        Ok(Box::new(NonDurableChannel {
            switch: self.switch.clone(),
            power_on: self.power_on,
            ready: ReadyQueue::new(reactor),
        }))
    }
}

struct NonDurableChannel {
    switch: PowerSwitch,
    power_on: u64,
    ready: ReadyQueue,
}

impl BackendChannel for NonDurableChannel {
    fn submit(&self, mut io: BdevIo, done: IoDone) {
        let mut s = self.switch.state();
        if s.power_on != self.power_on {
            drop(s);
            let e = BdevError::Io {
                io_type: io.io_type,
                errno: libc::EIO,
            };
            return self.ready.complete(done, IoCompletion::err(io.bufs, e));
        }
        let block = self.switch.info.block_size as usize;
        let fua = io.fua && !s.lies;
        let mut offset = io.offset_blocks as usize * block;
        match io.io_type {
            IoType::Read => {
                for buf in &mut io.bufs {
                    s.read(offset, buf);
                    offset += buf.len();
                }
            }
            IoType::Write => {
                for buf in &io.bufs {
                    s.write(offset, buf, fua);
                    offset += buf.len();
                }
            }
            IoType::WriteZeroes | IoType::Unmap => {
                let zeroes = vec![0u8; io.num_blocks as usize * block];
                s.write(offset, &zeroes, fua);
            }
            IoType::Flush if s.lies => {}
            IoType::Flush => s.flush(),
        }
        drop(s);
        self.ready.complete(done, IoCompletion::ok(io.bufs));
    }
}

fn device(switch: &PowerSwitch, power_on: u64) -> Result<Bdev, BdevError> {
    Bdev::new(
        switch.info.clone(),
        NonDurable {
            switch: switch.clone(),
            power_on,
        },
    )
}

/// A RAM device of `num_blocks` blocks whose writes are durable only once flushed (or
/// written with FUA), and the switch that cuts its power; `seed` decides which cached
/// sectors a cut keeps.
pub fn create_nondurable(
    name: &str,
    block_size: u32,
    num_blocks: u64,
    seed: u64,
) -> Result<(Bdev, PowerSwitch), BdevError> {
    let info = BdevInfo {
        name: name.to_string(),
        block_size,
        num_blocks,
        uuid: Uuid::new_v4(),
    };
    info.validate()?;
    let bytes = usize::try_from(info.size_bytes()).map_err(|_| BdevError::Config {
        name: name.to_string(),
        reason: "too large for a RAM device".into(),
    })?;
    let switch = PowerSwitch {
        state: Arc::new(Mutex::new(State::new(bytes, seed))),
        info,
    };
    Ok((device(&switch, 0)?, switch))
}
