//! NVM I/O commands mapped onto bdev requests on the queue's reactor.

use std::cell::Cell;
use std::rc::Rc;

use bdev::{BdevError, BdevIo, Channel, IoBuf, IoCompletion, IoType};

use crate::bufpool;
use crate::cmd::{Sqe, Status, io};
use crate::conn::{Conn, IoQueue, Payload};
use crate::le;
use crate::subsystem::Namespace;

/// Executes an I/O command; the reply goes out when the bdev completes.
pub(crate) fn execute(conn: &Rc<Conn>, queue: &IoQueue, sqe: Sqe, data: Option<IoBuf>, xfer: u32) {
    let fail = |status: Status| conn.reply(&sqe, status.into(), None, 0);
    let Some(ns) = queue.subsystem.namespace(sqe.nsid()) else {
        return fail(Status::INVALID_NAMESPACE);
    };
    let io_type = match sqe.opcode() {
        io::READ | io::COMPARE => IoType::Read,
        io::WRITE => IoType::Write,
        io::FLUSH => IoType::Flush,
        io::WRITE_ZEROES => IoType::WriteZeroes,
        io::DSM => IoType::Unmap,
        _ => return fail(Status::INVALID_OPCODE),
    };
    let channel = match queue.channel(ns) {
        Ok(c) => c,
        Err(e) => return fail(status_of(&e, io_type)),
    };
    match sqe.opcode() {
        io::READ | io::WRITE | io::COMPARE => {
            let (slba, nlb) = lba_range(&sqe);
            let len = nlb * u64::from(ns.bdev.block_size());
            if let Err(s) = check_range(ns, slba, nlb) {
                return fail(s);
            }
            if len > u64::from(conn.target.limits.max_io_size) {
                return fail(Status::INVALID_FIELD);
            }
            if u64::from(xfer) != len {
                return fail(Status::SGL_LENGTH_INVALID);
            }
            let fua = sqe.cdw(12) & (1 << 30) != 0;
            match sqe.opcode() {
                io::READ => {
                    let io = BdevIo::read(slba, nlb, bufpool::list_of(bufpool::take(len as usize)))
                        .with_fua(fua);
                    submit(conn, &channel, sqe, io, xfer, IoType::Read);
                }
                io::WRITE => {
                    let Some(buf) = data else {
                        return fail(Status::SGL_LENGTH_INVALID);
                    };
                    let io = BdevIo::write(slba, nlb, bufpool::list_of(buf)).with_fua(fua);
                    submit(conn, &channel, sqe, io, 0, IoType::Write);
                }
                _ => {
                    let Some(expected) = data else {
                        return fail(Status::SGL_LENGTH_INVALID);
                    };
                    compare(conn, &channel, sqe, slba, nlb, expected);
                }
            }
        }
        io::FLUSH => {
            if ns.bdev.supports(IoType::Flush) {
                submit(conn, &channel, sqe, BdevIo::flush(), 0, IoType::Flush);
            } else {
                conn.reply(&sqe, Status::SUCCESS.into(), None, 0);
            }
        }
        io::WRITE_ZEROES => {
            let (slba, nlb) = lba_range(&sqe);
            if let Err(s) = check_range(ns, slba, nlb) {
                return fail(s);
            }
            submit(
                conn,
                &channel,
                sqe,
                BdevIo::write_zeroes(slba, nlb),
                0,
                IoType::WriteZeroes,
            );
        }
        io::DSM => dataset_management(conn, ns, &channel, sqe, data),
        // Unknown opcodes were answered above, before the channel.
        _ => fail(Status::INVALID_OPCODE),
    }
}

/// Starting LBA and block count (NLB is 0-based on the wire).
fn lba_range(sqe: &Sqe) -> (u64, u64) {
    let slba = u64::from(sqe.cdw(10)) | u64::from(sqe.cdw(11)) << 32;
    let nlb = u64::from(sqe.cdw(12) & 0xFFFF) + 1;
    (slba, nlb)
}

fn check_range(ns: &Namespace, slba: u64, nlb: u64) -> Result<(), Status> {
    match slba.checked_add(nlb) {
        Some(end) if end <= ns.bdev.num_blocks() => Ok(()),
        _ => Err(Status::LBA_OUT_OF_RANGE),
    }
}

/// The NVMe status for a failed bdev request.
pub(crate) fn status_of(error: &BdevError, io_type: IoType) -> Status {
    match error {
        BdevError::OutOfRange { .. } => Status::LBA_OUT_OF_RANGE,
        BdevError::ZeroLength(_)
        | BdevError::Unaligned { .. }
        | BdevError::BufferSize { .. }
        | BdevError::SegmentSize { .. }
        | BdevError::UnexpectedBuffers(_)
        | BdevError::TooLarge { .. } => Status::INVALID_FIELD,
        BdevError::Unsupported { .. } => Status::INVALID_OPCODE,
        BdevError::ShuttingDown => Status::ABORTED_SQ_DELETION,
        BdevError::Io { .. }
        | BdevError::ShortTransfer { .. }
        | BdevError::Basis { .. }
        | BdevError::Snapshot { .. } => match io_type {
            IoType::Read => Status::UNRECOVERED_READ,
            _ => Status::WRITE_FAULT,
        },
        _ => Status::INTERNAL,
    }
}

fn submit(
    conn: &Rc<Conn>,
    channel: &Rc<Channel>,
    sqe: Sqe,
    io: BdevIo,
    xfer: u32,
    io_type: IoType,
) {
    let conn = Rc::clone(conn);
    channel.submit(io, move |mut done: IoCompletion| match done.result {
        Ok(()) if io_type == IoType::Read => {
            let payload = done.bufs.pop().map(Payload::Buf);
            bufpool::give_list(done.bufs);
            conn.reply(&sqe, Status::SUCCESS.into(), payload, xfer);
        }
        result => {
            done.bufs.drain(..).for_each(bufpool::give);
            bufpool::give_list(done.bufs);
            let status = result.map_or_else(|e| status_of(&e, io_type), |()| Status::SUCCESS);
            conn.reply(&sqe, status.into(), None, 0);
        }
    });
}

fn compare(conn: &Rc<Conn>, channel: &Rc<Channel>, sqe: Sqe, slba: u64, nlb: u64, expected: IoBuf) {
    let conn = Rc::clone(conn);
    let io = BdevIo::read(slba, nlb, vec![IoBuf::new(expected.len())]);
    channel.submit(io, move |done: IoCompletion| {
        let status = match &done.result {
            Ok(()) if done.bufs.first().is_some_and(|b| b[..] == expected[..]) => Status::SUCCESS,
            Ok(()) => Status::COMPARE_FAILURE,
            Err(e) => status_of(e, IoType::Read),
        };
        conn.reply(&sqe, status.into(), None, 0);
    });
}

/// Dataset Management: deallocate each range (other attributes are hints, accepted).
fn dataset_management(
    conn: &Rc<Conn>,
    ns: &Namespace,
    channel: &Rc<Channel>,
    sqe: Sqe,
    data: Option<IoBuf>,
) {
    let nr = (sqe.cdw(10) & 0xFF) as usize + 1;
    let deallocate = sqe.cdw(11) & (1 << 2) != 0;
    let Some(data) = data.filter(|d| d.len() >= nr * 16) else {
        return conn.reply(&sqe, Status::SGL_LENGTH_INVALID.into(), None, 0);
    };
    if !deallocate {
        return conn.reply(&sqe, Status::SUCCESS.into(), None, 0);
    }
    let mut ranges = Vec::with_capacity(nr);
    for i in 0..nr {
        let r = &data[i * 16..i * 16 + 16];
        let nlb = u64::from(le::u32(r, 4));
        let slba = le::u64(r, 8);
        if let Err(s) = check_range(ns, slba, nlb) {
            return conn.reply(&sqe, s.into(), None, 0);
        }
        if nlb > 0 {
            ranges.push((slba, nlb));
        }
    }
    if ranges.is_empty() || !ns.bdev.supports(IoType::Unmap) {
        return conn.reply(&sqe, Status::SUCCESS.into(), None, 0);
    }
    let left = Rc::new(Cell::new(ranges.len()));
    let status = Rc::new(Cell::new(Status::SUCCESS));
    for (slba, nlb) in ranges {
        let (conn, left, status) = (Rc::clone(conn), Rc::clone(&left), Rc::clone(&status));
        channel.submit(BdevIo::unmap(slba, nlb), move |done: IoCompletion| {
            if let Err(e) = &done.result
                && status.get().is_success()
            {
                status.set(status_of(e, IoType::Unmap));
            }
            left.set(left.get() - 1);
            if left.get() == 0 {
                conn.reply(&sqe, status.get().into(), None, 0);
            }
        });
    }
}
