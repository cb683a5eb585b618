//! Cutting the byte stream a host sends into checked PDUs, without any I/O: the part
//! of the target that sees raw hostile input, kept pure so it can be fuzzed.

use crate::cmd::Sqe;
use crate::pdu::{
    self, CAPSULE_CMD_HLEN, CH_LEN, CommonHeader, DataHeader, Digests, Fatal, Fes, IcReq, PduType,
    SHORT_HLEN,
};

/// What the connection has negotiated so far.
#[derive(Debug, Clone, Copy)]
pub struct FrameCtx {
    /// ICReq/ICResp done.
    pub negotiated: bool,
    /// Digests in force.
    pub digests: Digests,
    /// Largest PDU accepted (plen).
    pub max_pdu: usize,
    /// Largest H2CData payload (MAXH2CDATA).
    pub max_h2c_data: u32,
}

/// A checked PDU from a host, borrowing its data from the receive buffer.
#[derive(Debug)]
pub enum HostPdu<'a> {
    /// Connection initialisation.
    IcReq(IcReq),
    /// A command capsule with optional in-capsule data. `data_ok` is false when its
    /// data digest did not match (the command fails; the connection survives).
    Capsule {
        /// The command.
        sqe: Sqe,
        /// In-capsule data.
        data: Option<&'a [u8]>,
        /// Data digest matched (or none was used).
        data_ok: bool,
    },
    /// Data for an R2T.
    H2CData {
        /// Command, transfer tag, offset and length.
        header: DataHeader,
        /// The data (`header.length` bytes).
        data: &'a [u8],
        /// Data digest matched (or none was used).
        data_ok: bool,
        /// LAST flag.
        last: bool,
    },
    /// The host terminates the connection.
    TermReq,
}

/// Takes the next complete PDU off the front of `avail`: `Ok(None)` when more bytes are
/// needed, otherwise the PDU and its length. Every length comes from the header and is
/// checked against `avail` and `ctx` before use.
pub fn next_host_pdu<'a>(
    avail: &'a [u8],
    ctx: &FrameCtx,
) -> Result<Option<(HostPdu<'a>, usize)>, Fatal> {
    let Some(ch_bytes) = avail.first_chunk::<CH_LEN>() else {
        return Ok(None);
    };
    let ch = CommonHeader::parse(ch_bytes);
    let pdu_type = ch.pdu_type()?;
    let plen = ch.plen as usize;
    if plen > ctx.max_pdu || plen < CH_LEN {
        return Err(Fatal::new(Fes::InvalidHeaderField, 4));
    }
    if avail.len() < plen {
        return Ok(None);
    }
    let pdu = &avail[..plen];
    let parsed = match (ctx.negotiated, pdu_type) {
        (false, PduType::IcReq) => HostPdu::IcReq(IcReq::decode(pdu)?),
        (false, _) | (true, PduType::IcReq) => return Err(Fatal::new(Fes::SequenceError, 0)),
        (true, PduType::CapsuleCmd) => capsule(&ch, pdu, ctx)?,
        (true, PduType::H2CData) => h2c_data(&ch, pdu, ctx)?,
        (true, PduType::H2CTermReq) => HostPdu::TermReq,
        _ => return Err(Fatal::new(Fes::InvalidHeaderField, 0)),
    };
    Ok(Some((parsed, plen)))
}

fn check_hdgst(pdu: &[u8], hlen: usize, digests: Digests) -> Result<(), Fatal> {
    if digests.header && pdu.get(hlen..hlen + 4) != Some(&pdu::digest(&pdu[..hlen])[..]) {
        return Err(Fatal::new(Fes::HeaderDigest, 0));
    }
    Ok(())
}

/// The data of a PDU whose frame `check_frame` accepted, and whether its digest holds.
fn data_of<'a>(
    ch: &CommonHeader,
    pdu: &'a [u8],
    has_ddgst: bool,
) -> Result<(&'a [u8], bool), Fatal> {
    let data_end = pdu.len() - if has_ddgst { pdu::DIGEST_LEN } else { 0 };
    let data = pdu
        .get(usize::from(ch.pdo)..data_end)
        .ok_or(Fatal::new(Fes::InvalidHeaderField, 3))?;
    let ok = !has_ddgst || pdu[data_end..] == pdu::digest(data);
    Ok((data, ok))
}

fn capsule<'a>(ch: &CommonHeader, pdu: &'a [u8], ctx: &FrameCtx) -> Result<HostPdu<'a>, Fatal> {
    let has_ddgst = pdu::check_frame(ch, CAPSULE_CMD_HLEN, ctx.digests, ctx.max_pdu)?;
    check_hdgst(pdu, CAPSULE_CMD_HLEN, ctx.digests)?;
    let mut raw = [0u8; 64];
    raw.copy_from_slice(&pdu[CH_LEN..CAPSULE_CMD_HLEN]);
    let hd = CAPSULE_CMD_HLEN + ctx.digests.hdgst_len();
    if pdu.len() <= hd {
        return Ok(HostPdu::Capsule {
            sqe: Sqe(raw),
            data: None,
            data_ok: true,
        });
    }
    let (data, data_ok) = data_of(ch, pdu, has_ddgst)?;
    Ok(HostPdu::Capsule {
        sqe: Sqe(raw),
        data: Some(data),
        data_ok,
    })
}

fn h2c_data<'a>(ch: &CommonHeader, pdu: &'a [u8], ctx: &FrameCtx) -> Result<HostPdu<'a>, Fatal> {
    let has_ddgst = pdu::check_frame(ch, SHORT_HLEN, ctx.digests, ctx.max_pdu)?;
    check_hdgst(pdu, SHORT_HLEN, ctx.digests)?;
    // check_frame made sure of a whole header.
    let header = DataHeader::parse(pdu).ok_or(Fatal::new(Fes::InvalidHeaderField, 4))?;
    let (data, data_ok) = data_of(ch, pdu, has_ddgst)?;
    if data.len() != header.length as usize {
        return Err(Fatal::new(Fes::InvalidHeaderField, 16));
    }
    if header.length > ctx.max_h2c_data {
        return Err(Fatal::new(Fes::DataLimitExceeded, 16));
    }
    Ok(HostPdu::H2CData {
        header,
        data,
        data_ok,
        last: ch.flags & pdu::FLAG_DATA_LAST != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(negotiated: bool, digests: Digests) -> FrameCtx {
        FrameCtx {
            negotiated,
            digests,
            max_pdu: 16384,
            max_h2c_data: 8192,
        }
    }

    #[test]
    fn partial_pdus_wait_for_more_bytes() {
        let c = pdu::capsule_cmd(Digests::default(), &[0; 64], &[1; 100]);
        for cut in 0..c.len() {
            assert!(
                next_host_pdu(&c[..cut], &ctx(true, Digests::default()))
                    .unwrap()
                    .is_none()
            );
        }
        let (p, n) = next_host_pdu(&c, &ctx(true, Digests::default()))
            .unwrap()
            .unwrap();
        assert_eq!(n, c.len());
        assert!(
            matches!(p, HostPdu::Capsule { data: Some(d), data_ok: true, .. } if d.len() == 100)
        );
    }

    #[test]
    fn random_streams_never_panic() {
        let mut x = 0x1234_5678_9ABC_DEF1u64;
        let mut buf = vec![0u8; 4096];
        for round in 0..20_000 {
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let len = (x as usize) % buf.len();
            // Make some of them look like real headers.
            if round % 2 == 0 && len >= 8 {
                buf[0] = [0, 4, 6, 2][round % 4];
                buf[4..8].copy_from_slice(&(len as u32).to_le_bytes());
            }
            let d = Digests {
                header: round % 3 == 0,
                data: round % 5 == 0,
            };
            let _ = next_host_pdu(&buf[..len], &ctx(round % 7 != 0, d));
        }
    }
}
