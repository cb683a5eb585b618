//! The load engine: queue pairs driven by a pinned, busy-polling thread with
//! non-blocking sockets — many commands in flight per queue, PDUs batched into one
//! send and parsed out of one receive, latency recorded per command in an HDR
//! histogram. Nothing is shared between threads on the I/O path except relaxed
//! progress counters.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure};
use hdrhistogram::Histogram;
use nvmf_wire::cmd::{Cqe, SGL_DATA_BLOCK_OFFSET, SGL_TRANSPORT_DATA_BLOCK, Sqe, Status, io};
use nvmf_wire::pdu::{
    self, CommonHeader, DataHeader, Digests, FLAG_DATA_LAST, FLAG_DATA_SUCCESS, PduType,
};

use crate::session::{NamespaceInfo, Session};
use crate::verify::{self, Checked, Expect, Mismatch};

/// Access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Sequential within the queue's slice.
    Sequential,
    /// Uniformly random within the queue's slice.
    Random,
}

/// What one queue pair does.
#[derive(Debug, Clone)]
pub struct Job {
    /// Namespace.
    pub ns: NamespaceInfo,
    /// Sequential or random.
    pub pattern: Pattern,
    /// Percentage of reads (100 = read only, 0 = write only).
    pub read_pct: u8,
    /// Blocks per I/O.
    pub io_blocks: u64,
    /// Distance between possible I/O start LBAs, in blocks (the alignment).
    pub stride_blocks: u64,
    /// First LBA of this queue's slice and its length in blocks.
    pub first_lba: u64,
    /// Slice length in blocks.
    pub blocks: u64,
    /// Commands in flight.
    pub depth: u16,
    /// Stop after this many I/Os (0: no limit).
    pub io_limit: u64,
    /// I/Os per second cap (0: none).
    pub rate: f64,
    /// Verify with this seed.
    pub verify: Option<u64>,
    /// Abandon a command after this long.
    pub timeout: Duration,
    /// After the last I/O completes, send a Flush and wait for it (as fio's
    /// `end_fsync`): what was written is then durable, not only acknowledged.
    pub flush_at_end: bool,
}

/// Shared run controls and progress.
pub struct Control {
    /// Set to stop issuing (end of run or Ctrl-C).
    pub stop: AtomicBool,
    /// Set when warm-up ends: statistics restart.
    pub measuring: AtomicBool,
}

/// Progress counters of one queue, written only by its thread.
#[derive(Default)]
pub struct Progress {
    /// Completed I/Os.
    pub ios: AtomicU64,
    /// Completed bytes.
    pub bytes: AtomicU64,
}

/// What one queue pair measured.
pub struct QueueResult {
    /// Label (target and queue).
    pub label: String,
    /// Reads completed (measured period).
    pub reads: u64,
    /// Writes completed (measured period).
    pub writes: u64,
    /// Bytes moved (measured period).
    pub bytes: u64,
    /// Latency in nanoseconds.
    pub latency: Histogram<u64>,
    /// Measured period.
    pub elapsed: Duration,
    /// Commands that failed, with the first failure.
    pub errors: u64,
    /// First error.
    pub first_error: Option<String>,
    /// Blocks read that were never written (verify mode, read-only runs).
    pub unwritten: u64,
    /// Blocks checked (verify).
    pub verified: u64,
    /// First verify mismatch.
    pub mismatch: Option<Mismatch>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
}

/// Where a queue is with its Flush at the end of the run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum EndFlush {
    NotWanted,
    Wanted,
    Sent,
    Done,
}

struct Slot {
    op: Op,
    lba: u64,
    blocks: u64,
    unit: usize,
    generation: u32,
    started: Instant,
    /// Write data kept for R2T, or read data accumulated (verify).
    data: Vec<u8>,
    received: usize,
    busy: bool,
}

/// One I/O queue pair and its workload.
pub struct Queue {
    label: String,
    sock: TcpStream,
    digests: Digests,
    maxh2cdata: usize,
    in_capsule: usize,
    job: Job,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    tx: Vec<u8>,
    tx_pos: usize,
    slots: Vec<Slot>,
    free: Vec<u16>,
    rng: u64,
    seq_next: u64,
    units: u64,
    gens: Vec<u32>,
    unit_busy: Vec<bool>,
    pattern_buf: Vec<u8>,
    issued: u64,
    next_issue: Option<Instant>,
    interval: Duration,
    measure_start: Option<Instant>,
    result: QueueResult,
    progress: Arc<Progress>,
    end_flush: EndFlush,
}

impl Queue {
    /// Wraps a connected I/O queue session for `job`.
    pub fn new(
        label: String,
        session: Session,
        job: Job,
        progress: Arc<Progress>,
    ) -> anyhow::Result<Self> {
        let bs = job.ns.block_size as usize;
        let io_bytes = job.io_blocks as usize * bs;
        ensure!(
            job.blocks >= job.io_blocks,
            "{label}: range smaller than one I/O"
        );
        session.sock.set_nonblocking(true)?;
        ensure!(job.stride_blocks > 0, "{label}: alignment of zero blocks");
        let units = (job.blocks - job.io_blocks) / job.stride_blocks + 1;
        let verify = job.verify.is_some();
        let max_pdu = io_bytes + 64 + session.maxh2cdata as usize;
        let mut pattern_buf = vec![0u8; io_bytes];
        for (i, b) in pattern_buf.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(7);
        }
        let interval = if job.rate > 0.0 {
            Duration::from_secs_f64(1.0 / job.rate)
        } else {
            Duration::ZERO
        };
        Ok(Self {
            label: label.clone(),
            digests: session.digests,
            maxh2cdata: session.maxh2cdata.max(4096) as usize,
            in_capsule: session.in_capsule(),
            sock: session.sock,
            rx: vec![0u8; (4 * max_pdu).max(1 << 20)],
            rx_start: 0,
            rx_end: 0,
            tx: Vec::with_capacity(1 << 20),
            tx_pos: 0,
            slots: (0..job.depth)
                .map(|_| Slot {
                    op: Op::Read,
                    lba: 0,
                    blocks: 0,
                    unit: 0,
                    generation: 0,
                    started: Instant::now(),
                    data: Vec::new(),
                    received: 0,
                    busy: false,
                })
                .collect(),
            free: (0..job.depth).rev().collect(),
            rng: 0x2545_F491_4F6C_DD1D ^ job.first_lba.wrapping_mul(0x9E37_79B9),
            seq_next: 0,
            units,
            gens: if verify {
                vec![0; units as usize]
            } else {
                Vec::new()
            },
            unit_busy: if verify {
                vec![false; units as usize]
            } else {
                Vec::new()
            },
            pattern_buf,
            issued: 0,
            next_issue: None,
            interval,
            measure_start: None,
            result: QueueResult {
                label,
                reads: 0,
                writes: 0,
                bytes: 0,
                latency: Histogram::new_with_bounds(1, 120_000_000_000, 3)?,
                elapsed: Duration::ZERO,
                errors: 0,
                first_error: None,
                unwritten: 0,
                verified: 0,
                mismatch: None,
            },
            end_flush: if job.flush_at_end {
                EndFlush::Wanted
            } else {
                EndFlush::NotWanted
            },
            job,
            progress,
        })
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn rand(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    fn pick_unit(&mut self) -> u64 {
        match self.job.pattern {
            Pattern::Sequential => {
                let u = self.seq_next;
                self.seq_next = (self.seq_next + 1) % self.units;
                u
            }
            Pattern::Random => self.rand() % self.units,
        }
    }

    fn budget_spent(&self) -> bool {
        self.job.io_limit > 0 && self.issued >= self.job.io_limit
    }

    /// Issues commands while there is room, time and budget; then the Flush at the end.
    fn issue(&mut self, now: Instant, stopping: bool) {
        if self.end_flush == EndFlush::Wanted
            && (stopping || self.budget_spent())
            && self.in_flight() == 0
        {
            self.submit_flush(now);
            return;
        }
        while !stopping && !self.free.is_empty() {
            if self.budget_spent() {
                return;
            }
            if self.interval > Duration::ZERO {
                let next = *self.next_issue.get_or_insert(now);
                if next > now {
                    return;
                }
                self.next_issue = Some(next + self.interval);
            }
            let mut unit = self.pick_unit();
            if !self.unit_busy.is_empty() {
                // (Verify requires stride == I/O size, so units never overlap.)
                // Verify: never two commands on one unit at once.
                let mut tries = 0;
                while self.unit_busy[unit as usize] {
                    unit = (unit + 1) % self.units;
                    tries += 1;
                    if tries > self.units {
                        return;
                    }
                }
            }
            let op = if self.job.read_pct >= 100
                || (self.job.read_pct > 0 && self.rand() % 100 < u64::from(self.job.read_pct))
            {
                Op::Read
            } else {
                Op::Write
            };
            self.submit(op, unit, now);
        }
    }

    fn submit(&mut self, op: Op, unit: u64, now: Instant) {
        let Some(slot_id) = self.free.pop() else {
            return;
        };
        let bs = self.job.ns.block_size as usize;
        let blocks = self.job.io_blocks;
        let lba = self.job.first_lba + unit * self.job.stride_blocks;
        let len = blocks as usize * bs;
        let mut sqe = Sqe::new(if op == Op::Read { io::READ } else { io::WRITE }, slot_id);
        sqe.set_nsid(self.job.ns.nsid);
        sqe.set_cdw(10, lba as u32);
        sqe.set_cdw(11, (lba >> 32) as u32);
        sqe.set_cdw(12, (blocks - 1) as u32);
        let verify = self.job.verify;
        let mut generation = 0;
        let mut data = std::mem::take(&mut self.slots[usize::from(slot_id)].data);
        data.clear();
        if verify.is_some() {
            self.unit_busy[unit as usize] = true;
        }
        let in_capsule;
        match op {
            Op::Flush => unreachable!("a Flush is sent by submit_flush"),
            Op::Read => {
                sqe.set_sgl(SGL_TRANSPORT_DATA_BLOCK, 0, len as u32);
                in_capsule = false;
            }
            Op::Write => {
                in_capsule = len <= self.in_capsule;
                let id = if in_capsule {
                    SGL_DATA_BLOCK_OFFSET
                } else {
                    SGL_TRANSPORT_DATA_BLOCK
                };
                sqe.set_sgl(id, 0, len as u32);
                if let Some(seed) = verify {
                    generation = self.gens[unit as usize].wrapping_add(1).max(1);
                    data.resize(len, 0);
                    for (i, block) in data.chunks_mut(bs).enumerate() {
                        verify::fill(block, lba + i as u64, seed, generation);
                    }
                } else if !in_capsule {
                    data.extend_from_slice(&self.pattern_buf[..len]);
                }
            }
        }
        // Encode the capsule straight into the send buffer.
        let write_data: &[u8] = match (op, in_capsule, verify.is_some()) {
            (Op::Write, true, true) => &data,
            (Op::Write, true, false) => &self.pattern_buf[..len],
            _ => &[],
        };
        encode_capsule(&mut self.tx, self.digests, &sqe, write_data);
        let slot = &mut self.slots[usize::from(slot_id)];
        *slot = Slot {
            op,
            lba,
            blocks,
            unit: unit as usize,
            generation,
            started: now,
            data,
            received: 0,
            busy: true,
        };
        self.issued += 1;
    }

    fn submit_flush(&mut self, now: Instant) {
        let Some(slot_id) = self.free.pop() else {
            return;
        };
        let mut sqe = Sqe::new(io::FLUSH, slot_id);
        sqe.set_nsid(self.job.ns.nsid);
        encode_capsule(&mut self.tx, self.digests, &sqe, &[]);
        let slot = &mut self.slots[usize::from(slot_id)];
        slot.op = Op::Flush;
        slot.lba = 0;
        slot.blocks = 0;
        slot.started = now;
        slot.received = 0;
        slot.busy = true;
        self.end_flush = EndFlush::Sent;
    }

    /// One pass: issue, send, receive, complete. Returns whether anything happened.
    pub fn poll(&mut self, now: Instant, control: &Control) -> anyhow::Result<bool> {
        let stopping = control.stop.load(Ordering::Relaxed) || self.result.mismatch.is_some();
        if self.measure_start.is_none() && control.measuring.load(Ordering::Relaxed) {
            self.measure_start = Some(now);
            self.reset_stats();
        }
        self.issue(now, stopping);
        let mut work = self.flush()?;
        work |= self.receive(control)?;
        if let Some(oldest) = self
            .slots
            .iter()
            .filter(|s| s.busy)
            .map(|s| s.started)
            .min()
            && now.duration_since(oldest) > self.job.timeout
        {
            bail!(
                "{}: a command has been outstanding for over {:?}: the target stopped answering",
                self.label,
                self.job.timeout
            );
        }
        Ok(work)
    }

    fn reset_stats(&mut self) {
        let r = &mut self.result;
        r.reads = 0;
        r.writes = 0;
        r.bytes = 0;
        r.latency.reset();
    }

    fn flush_outstanding(&self) -> bool {
        matches!(self.end_flush, EndFlush::Wanted | EndFlush::Sent)
    }

    /// Whether all commands have completed (the Flush at the end too).
    pub fn idle(&self) -> bool {
        self.in_flight() == 0 && self.tx_pos == self.tx.len() && !self.flush_outstanding()
    }

    /// Whether this queue has nothing more to do (I/O budget spent or verify failed).
    pub fn finished(&self) -> bool {
        (self.budget_spent() || self.result.mismatch.is_some())
            && self.in_flight() == 0
            && !self.flush_outstanding()
    }

    fn flush(&mut self) -> anyhow::Result<bool> {
        if self.tx_pos == self.tx.len() {
            return Ok(false);
        }
        match self.sock.write(&self.tx[self.tx_pos..]) {
            Ok(0) => bail!("{}: the target closed the connection", self.label),
            Ok(n) => {
                self.tx_pos += n;
                if self.tx_pos == self.tx.len() {
                    self.tx.clear();
                    self.tx_pos = 0;
                }
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(anyhow!("{}: sending to the target: {e}", self.label)),
        }
    }

    fn receive(&mut self, control: &Control) -> anyhow::Result<bool> {
        if self.rx.len() - self.rx_end < self.rx.len() / 4 {
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        let n = match self.sock.read(&mut self.rx[self.rx_end..]) {
            Ok(0) => bail!("{}: the target closed the connection", self.label),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(anyhow!("{}: receiving from the target: {e}", self.label)),
        };
        self.rx_end += n;
        let now = Instant::now();
        loop {
            let avail = self.rx_end - self.rx_start;
            if avail < 8 {
                break;
            }
            let mut chb = [0u8; 8];
            chb.copy_from_slice(&self.rx[self.rx_start..self.rx_start + 8]);
            let ch = CommonHeader::parse(&chb);
            let plen = ch.plen as usize;
            ensure!(
                plen >= 8 && plen <= self.rx.len() / 2,
                "{}: target sent a PDU of {plen} bytes",
                self.label
            );
            if avail < plen {
                if self.rx.len() - self.rx_start < plen {
                    self.rx.copy_within(self.rx_start..self.rx_end, 0);
                    self.rx_end -= self.rx_start;
                    self.rx_start = 0;
                }
                break;
            }
            let start = self.rx_start;
            self.rx_start += plen;
            self.handle_pdu(&ch, start, plen, now, control)?;
        }
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        }
        Ok(true)
    }

    fn handle_pdu(
        &mut self,
        ch: &CommonHeader,
        start: usize,
        plen: usize,
        now: Instant,
        control: &Control,
    ) -> anyhow::Result<()> {
        let label = &self.label;
        let hd = self.digests.hdgst_len();
        match PduType::from_u8(ch.pdu_type) {
            Some(PduType::CapsuleResp) => {
                let p = &self.rx[start..start + plen];
                ensure!(plen >= 24 + hd, "{label}: short CapsuleResp");
                if self.digests.header {
                    ensure!(
                        p[24..28] == pdu::digest(&p[..24]),
                        "{label}: header digest mismatch"
                    );
                }
                let cqe = Cqe::decode(&p[8..24]);
                self.complete(cqe.cid, cqe.status, now, control)
            }
            Some(PduType::C2HData) => {
                let p = &self.rx[start..start + plen];
                if self.digests.header {
                    ensure!(
                        p[24..28] == pdu::digest(&p[..24]),
                        "{label}: header digest mismatch"
                    );
                }
                let h = DataHeader::parse(p).ok_or_else(|| anyhow!("{label}: short C2HData"))?;
                let pdo = usize::from(ch.pdo);
                let end = pdo + h.length as usize;
                ensure!(end <= plen, "{label}: C2HData longer than its PDU");
                if self.digests.data {
                    ensure!(
                        p[end..end + 4] == pdu::digest(&p[pdo..end]),
                        "{label}: C2HData data digest mismatch"
                    );
                }
                let slot = self
                    .slots
                    .get_mut(usize::from(h.cccid))
                    .filter(|s| s.busy && s.op == Op::Read)
                    .ok_or_else(|| anyhow!("{label}: C2HData for unknown command {}", h.cccid))?;
                ensure!(
                    h.offset as usize == slot.received,
                    "{label}: C2HData out of order"
                );
                slot.received += h.length as usize;
                if self.job.verify.is_some() {
                    slot.data
                        .extend_from_slice(&self.rx[start + pdo..start + end]);
                }
                if ch.flags & FLAG_DATA_SUCCESS != 0 {
                    ensure!(
                        ch.flags & FLAG_DATA_LAST != 0,
                        "{label}: SUCCESS without LAST"
                    );
                    self.complete(h.cccid, Status::SUCCESS, now, control)?;
                }
                Ok(())
            }
            Some(PduType::R2T) => {
                let h = DataHeader::parse(&self.rx[start..start + plen])
                    .ok_or_else(|| anyhow!("{label}: short R2T"))?;
                let slot = self
                    .slots
                    .get(usize::from(h.cccid))
                    .filter(|s| s.busy && s.op == Op::Write)
                    .ok_or_else(|| anyhow!("{label}: R2T for unknown command {}", h.cccid))?;
                let (off, len) = (h.offset as usize, h.length as usize);
                ensure!(
                    off + len <= slot.data.len(),
                    "{label}: R2T beyond the write"
                );
                let mut sent = 0;
                while sent < len {
                    let n = (len - sent).min(self.maxh2cdata);
                    let chunk = &self.slots[usize::from(h.cccid)].data[off + sent..off + sent + n];
                    let last = sent + n == len;
                    let hdr = pdu::data_pdu_header(
                        PduType::H2CData,
                        self.digests,
                        4,
                        if last { FLAG_DATA_LAST } else { 0 },
                        DataHeader {
                            cccid: h.cccid,
                            ttag: h.ttag,
                            offset: (off + sent) as u32,
                            length: n as u32,
                        },
                    );
                    self.tx.extend_from_slice(&hdr);
                    self.tx.extend_from_slice(chunk);
                    if self.digests.data {
                        self.tx.extend_from_slice(&pdu::digest(chunk));
                    }
                    sent += n;
                }
                Ok(())
            }
            Some(PduType::C2HTermReq) => {
                let (fes, fei) =
                    pdu::parse_term_req(&self.rx[start..start + plen]).unwrap_or((0, 0));
                bail!(
                    "{label}: target terminated the connection: error {fes:#x} at header offset {fei}"
                )
            }
            _ => bail!("{label}: unexpected PDU type {}", ch.pdu_type),
        }
    }

    fn complete(
        &mut self,
        cid: u16,
        status: Status,
        now: Instant,
        control: &Control,
    ) -> anyhow::Result<()> {
        let bs = self.job.ns.block_size as usize;
        let label = &self.label;
        let slot = self
            .slots
            .get_mut(usize::from(cid))
            .filter(|s| s.busy)
            .ok_or_else(|| anyhow!("{label}: completion for unknown command {cid}"))?;
        slot.busy = false;
        let (op, lba, blocks, unit, generation) =
            (slot.op, slot.lba, slot.blocks, slot.unit, slot.generation);
        let latency = now.saturating_duration_since(slot.started);
        let bytes = blocks * bs as u64;
        self.free.push(cid);
        if op == Op::Flush {
            debug_assert_eq!(self.end_flush, EndFlush::Sent);
            self.end_flush = EndFlush::Done;
            if !status.is_success() {
                self.result.errors += 1;
                self.result
                    .first_error
                    .get_or_insert_with(|| format!("flush at the end of the run: {status}"));
            }
            return Ok(());
        }
        if let Some(seed) = self.job.verify {
            self.unit_busy[unit] = false;
            if status.is_success() {
                match op {
                    Op::Flush => {}
                    Op::Write => self.gens[unit] = generation,
                    Op::Read => {
                        let slot = &self.slots[usize::from(cid)];
                        let expected_gen = self.gens[unit];
                        for (i, block) in slot.data.chunks(bs).enumerate() {
                            let expect = Expect {
                                lba: lba + i as u64,
                                seed,
                                generation: (expected_gen != 0).then_some(expected_gen),
                            };
                            match verify::check(block, expect) {
                                Ok(Checked::Ok) => self.result.verified += 1,
                                Ok(Checked::Unwritten) => self.result.unwritten += 1,
                                Err(m) => {
                                    if self.result.mismatch.is_none() {
                                        self.result.mismatch = Some(m);
                                    }
                                    break;
                                }
                            }
                        }
                        if slot.data.len() != bytes as usize && self.result.mismatch.is_none() {
                            self.result.mismatch = Some(Mismatch {
                                lba,
                                expected: format!("{bytes} bytes"),
                                actual: format!("{} bytes", slot.data.len()),
                            });
                        }
                    }
                }
            }
        }
        if !status.is_success() {
            self.result.errors += 1;
            if self.result.first_error.is_none() {
                let what = if op == Op::Read { "read" } else { "write" };
                self.result.first_error = Some(format!(
                    "{what} of {blocks} block(s) at LBA {lba}: {status}"
                ));
            }
            return Ok(());
        }
        let measuring = control.measuring.load(Ordering::Relaxed);
        if measuring {
            match op {
                Op::Read => self.result.reads += 1,
                Op::Write => self.result.writes += 1,
                Op::Flush => {}
            }
            self.result.bytes += bytes;
            let ns = latency.as_nanos().clamp(1, 120_000_000_000) as u64;
            let _ = self.result.latency.record(ns);
        }
        let p = &self.progress;
        p.ios
            .store(p.ios.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        p.bytes
            .store(p.bytes.load(Ordering::Relaxed) + bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Ends the run and returns what was measured.
    pub fn finish(mut self, end: Instant) -> QueueResult {
        self.result.elapsed = self
            .measure_start
            .map_or(Duration::ZERO, |s| end.saturating_duration_since(s));
        self.result
    }
}

/// Encodes a CapsuleCmd (with optional in-capsule data) into `out`.
fn encode_capsule(out: &mut Vec<u8>, digests: Digests, sqe: &Sqe, data: &[u8]) {
    let hd = pdu::CAPSULE_CMD_HLEN + digests.hdgst_len();
    let has_data = !data.is_empty();
    let plen = hd + data.len() + if has_data { digests.ddgst_len() } else { 0 };
    let start = out.len();
    let mut flags = 0;
    if digests.header {
        flags |= pdu::FLAG_HDGST;
    }
    if digests.data && has_data {
        flags |= pdu::FLAG_DDGST;
    }
    out.extend_from_slice(&[
        PduType::CapsuleCmd as u8,
        flags,
        pdu::CAPSULE_CMD_HLEN as u8,
        if has_data { hd as u8 } else { 0 },
    ]);
    out.extend_from_slice(&(plen as u32).to_le_bytes());
    out.extend_from_slice(&sqe.0);
    if digests.header {
        let d = pdu::digest(&out[start..start + pdu::CAPSULE_CMD_HLEN]);
        out.extend_from_slice(&d);
    }
    if has_data {
        out.extend_from_slice(data);
        if digests.data {
            out.extend_from_slice(&pdu::digest(data));
        }
    }
}

/// What one load thread returns: success or its error, its queues' results, and the
/// CPU time it used while measuring (from the end of warm-up).
pub type ThreadOutcome = (anyhow::Result<()>, Vec<QueueResult>, Duration);

/// Runs `queues` on the current thread until `control.stop` and all are idle, or every
/// queue has finished.
pub fn run_thread(
    mut queues: Vec<Queue>,
    control: &Control,
    cpu: fn() -> Duration,
) -> ThreadOutcome {
    let mut failure = None;
    let mut drain_deadline = None;
    let mut cpu_start = None;
    loop {
        let now = Instant::now();
        if cpu_start.is_none() && control.measuring.load(Ordering::Relaxed) {
            cpu_start = Some(cpu());
        }
        for q in queues.iter_mut() {
            if let Err(e) = q.poll(now, control) {
                failure = Some(e);
                break;
            }
        }
        if failure.is_some() {
            break;
        }
        if queues.iter().all(Queue::finished) {
            break;
        }
        if control.stop.load(Ordering::Relaxed) {
            if queues.iter().all(Queue::idle) {
                break;
            }
            let deadline = *drain_deadline.get_or_insert(now + Duration::from_secs(10));
            if now > deadline {
                failure = Some(anyhow!(
                    "commands still outstanding 10 s after the run ended"
                ));
                break;
            }
        }
    }
    let end = Instant::now();
    let used = cpu_start.map_or(Duration::ZERO, |start| cpu().saturating_sub(start));
    let results: Vec<QueueResult> = queues.into_iter().map(|q| q.finish(end)).collect();
    match failure {
        Some(e) => (Err(e), results, used),
        None => (Ok(()), results, used),
    }
}
