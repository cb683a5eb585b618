//! NVMe/TCP PDUs (NVMe/TCP Transport 1.0): the common header, every PDU the target and
//! host exchange, and CRC32C digests.
//!
//! Decoding checks every length against the bytes at hand and the negotiated limits, so
//! a hostile peer gets a [`Fatal`] error naming the offending field, never a panic.

use crate::le;

/// Length of the common header.
pub const CH_LEN: usize = 8;
/// Length of ICReq and ICResp PDUs.
pub const IC_LEN: usize = 128;
/// Header length of a CapsuleCmd (common header + 64-byte SQE).
pub const CAPSULE_CMD_HLEN: usize = 72;
/// Header length of CapsuleResp, H2CData, C2HData, R2T and TermReq PDUs.
pub const SHORT_HLEN: usize = 24;
/// Length of a header or data digest.
pub const DIGEST_LEN: usize = 4;

/// PDU types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PduType {
    /// Initialize Connection Request (host → controller).
    IcReq = 0,
    /// Initialize Connection Response.
    IcResp = 1,
    /// Host to Controller Terminate Connection Request.
    H2CTermReq = 2,
    /// Controller to Host Terminate Connection Request.
    C2HTermReq = 3,
    /// Command capsule.
    CapsuleCmd = 4,
    /// Response capsule.
    CapsuleResp = 5,
    /// Host to Controller data.
    H2CData = 6,
    /// Controller to Host data.
    C2HData = 7,
    /// Ready to Transfer.
    R2T = 9,
}

impl PduType {
    /// The type for a wire value, if it is one.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::IcReq,
            1 => Self::IcResp,
            2 => Self::H2CTermReq,
            3 => Self::C2HTermReq,
            4 => Self::CapsuleCmd,
            5 => Self::CapsuleResp,
            6 => Self::H2CData,
            7 => Self::C2HData,
            9 => Self::R2T,
            _ => return None,
        })
    }

    /// Whether PDUs of this type carry a header digest when header digests are on.
    pub fn digestible(self) -> bool {
        !matches!(
            self,
            Self::IcReq | Self::IcResp | Self::H2CTermReq | Self::C2HTermReq
        )
    }
}

/// Header flag: a header digest follows the header.
pub const FLAG_HDGST: u8 = 0x01;
/// Header flag: a data digest follows the data.
pub const FLAG_DDGST: u8 = 0x02;
/// Data PDU flag: last data PDU of the command (or of the R2T's transfer).
pub const FLAG_DATA_LAST: u8 = 0x04;
/// C2HData flag: the command succeeded and no CapsuleResp follows.
pub const FLAG_DATA_SUCCESS: u8 = 0x08;

/// Fatal error status codes carried by a TermReq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Fes {
    /// Invalid PDU header field.
    InvalidHeaderField = 1,
    /// PDU sequence error.
    SequenceError = 2,
    /// Header digest error.
    HeaderDigest = 3,
    /// Data transfer out of range.
    DataOutOfRange = 4,
    /// Data transfer limit exceeded (R2T limit).
    DataLimitExceeded = 5,
    /// Unsupported parameter.
    UnsupportedParameter = 6,
}

/// A fatal transport error: the connection is terminated with a TermReq carrying the
/// status and the byte offset of the offending field within the PDU header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("fatal NVMe/TCP error {fes:?} at header offset {offset}")]
pub struct Fatal {
    /// What went wrong.
    pub fes: Fes,
    /// Offset of the offending field (FEI).
    pub offset: u32,
}

impl Fatal {
    /// A fatal error of kind `fes` at header offset `offset`.
    pub fn new(fes: Fes, offset: u32) -> Self {
        Self { fes, offset }
    }
}

/// The 8-byte common header of every PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommonHeader {
    /// PDU type (raw, checked by [`CommonHeader::pdu_type`]).
    pub pdu_type: u8,
    /// Flags.
    pub flags: u8,
    /// Header length, without the header digest.
    pub hlen: u8,
    /// PDU data offset (0 when there is no data).
    pub pdo: u8,
    /// Total PDU length, digests included.
    pub plen: u32,
}

impl CommonHeader {
    /// Parses the first 8 bytes of `b` (which must hold them).
    pub fn parse(b: &[u8; CH_LEN]) -> Self {
        Self {
            pdu_type: b[0],
            flags: b[1],
            hlen: b[2],
            pdo: b[3],
            plen: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }

    /// Writes the header into the first 8 bytes of `out`.
    pub fn write(&self, out: &mut [u8]) {
        out[0] = self.pdu_type;
        out[1] = self.flags;
        out[2] = self.hlen;
        out[3] = self.pdo;
        out[4..8].copy_from_slice(&self.plen.to_le_bytes());
    }

    /// The PDU type, or a fatal error naming the type field.
    pub fn pdu_type(&self) -> Result<PduType, Fatal> {
        PduType::from_u8(self.pdu_type).ok_or(Fatal::new(Fes::InvalidHeaderField, 0))
    }
}

/// CRC32C digest as NVMe/TCP uses it (seed !0, result inverted), little-endian on the wire.
pub fn digest(data: &[u8]) -> [u8; DIGEST_LEN] {
    crc32c::crc32c(data).to_le_bytes()
}

/// Digest over several slices, as if they were one.
pub fn digest_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> [u8; DIGEST_LEN] {
    parts
        .into_iter()
        .fold(0, crc32c::crc32c_append)
        .to_le_bytes()
}

/// Initialize Connection Request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcReq {
    /// PDU format version (0).
    pub pfv: u16,
    /// Host PDU data alignment, in dwords, 0-based.
    pub hpda: u8,
    /// Header digest requested.
    pub hdgst: bool,
    /// Data digest requested.
    pub ddgst: bool,
    /// Maximum outstanding R2Ts per command, 0-based.
    pub maxr2t: u32,
}

impl IcReq {
    /// Encodes the 128-byte PDU.
    pub fn encode(&self) -> [u8; IC_LEN] {
        let mut b = [0u8; IC_LEN];
        header(PduType::IcReq, 0, IC_LEN, 0, IC_LEN).write(&mut b);
        b[8..10].copy_from_slice(&self.pfv.to_le_bytes());
        b[10] = self.hpda;
        b[11] = u8::from(self.hdgst) | (u8::from(self.ddgst) << 1);
        b[12..16].copy_from_slice(&self.maxr2t.to_le_bytes());
        b
    }

    /// Decodes a whole ICReq PDU (common header included).
    pub fn decode(b: &[u8]) -> Result<Self, Fatal> {
        check_ic(b, PduType::IcReq)?;
        let pfv = le::u16(b, 8);
        if pfv != 0 {
            return Err(Fatal::new(Fes::UnsupportedParameter, 8));
        }
        let hpda = b[10];
        if hpda > 31 {
            return Err(Fatal::new(Fes::InvalidHeaderField, 10));
        }
        Ok(Self {
            pfv,
            hpda,
            hdgst: b[11] & 1 != 0,
            ddgst: b[11] & 2 != 0,
            maxr2t: le::u32(b, 12),
        })
    }
}

/// Initialize Connection Response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcResp {
    /// PDU format version (0).
    pub pfv: u16,
    /// Controller PDU data alignment, in dwords, 0-based (Linux requires 0).
    pub cpda: u8,
    /// Header digest enabled.
    pub hdgst: bool,
    /// Data digest enabled.
    pub ddgst: bool,
    /// Largest H2CData payload the controller accepts.
    pub maxh2cdata: u32,
}

impl IcResp {
    /// Encodes the 128-byte PDU.
    pub fn encode(&self) -> [u8; IC_LEN] {
        let mut b = [0u8; IC_LEN];
        header(PduType::IcResp, 0, IC_LEN, 0, IC_LEN).write(&mut b);
        b[8..10].copy_from_slice(&self.pfv.to_le_bytes());
        b[10] = self.cpda;
        b[11] = u8::from(self.hdgst) | (u8::from(self.ddgst) << 1);
        b[12..16].copy_from_slice(&self.maxh2cdata.to_le_bytes());
        b
    }

    /// Decodes a whole ICResp PDU, checking what a host must check.
    pub fn decode(b: &[u8]) -> Result<Self, Fatal> {
        check_ic(b, PduType::IcResp)?;
        let r = Self {
            pfv: le::u16(b, 8),
            cpda: b[10],
            hdgst: b[11] & 1 != 0,
            ddgst: b[11] & 2 != 0,
            maxh2cdata: le::u32(b, 12),
        };
        if r.pfv != 0 {
            return Err(Fatal::new(Fes::UnsupportedParameter, 8));
        }
        if r.maxh2cdata < 4096 || !r.maxh2cdata.is_multiple_of(4) {
            return Err(Fatal::new(Fes::InvalidHeaderField, 12));
        }
        Ok(r)
    }
}

fn check_ic(b: &[u8], expected: PduType) -> Result<(), Fatal> {
    let ch = parse_ch(b)?;
    if ch.pdu_type != expected as u8 {
        return Err(Fatal::new(Fes::InvalidHeaderField, 0));
    }
    if usize::from(ch.hlen) != IC_LEN {
        return Err(Fatal::new(Fes::InvalidHeaderField, 2));
    }
    if ch.pdo != 0 {
        return Err(Fatal::new(Fes::InvalidHeaderField, 3));
    }
    if ch.plen as usize != IC_LEN || b.len() < IC_LEN {
        return Err(Fatal::new(Fes::InvalidHeaderField, 4));
    }
    Ok(())
}

fn parse_ch(b: &[u8]) -> Result<CommonHeader, Fatal> {
    let ch: &[u8; CH_LEN] = b
        .get(..CH_LEN)
        .and_then(|s| s.try_into().ok())
        .ok_or(Fatal::new(Fes::InvalidHeaderField, 4))?;
    Ok(CommonHeader::parse(ch))
}

/// A common header for a PDU of `pdu_type`.
pub fn header(pdu_type: PduType, flags: u8, hlen: usize, pdo: usize, plen: usize) -> CommonHeader {
    CommonHeader {
        pdu_type: pdu_type as u8,
        flags,
        hlen: hlen as u8,
        pdo: pdo as u8,
        plen: plen as u32,
    }
}

/// The fields shared by H2CData, C2HData and R2T headers (bytes 8..24).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    /// Command capsule CID the data belongs to.
    pub cccid: u16,
    /// Transfer tag (H2CData and R2T; zero in C2HData).
    pub ttag: u16,
    /// Offset of this data within the command's data.
    pub offset: u32,
    /// Length of this data.
    pub length: u32,
}

impl DataHeader {
    /// Parses bytes 8..24 of a data or R2T header; `None` if `h` is shorter.
    pub fn parse(h: &[u8]) -> Option<Self> {
        (h.len() >= SHORT_HLEN).then(|| Self {
            cccid: le::u16(h, 8),
            ttag: le::u16(h, 10),
            offset: le::u32(h, 12),
            length: le::u32(h, 16),
        })
    }

    fn write(&self, out: &mut [u8]) {
        out[8..10].copy_from_slice(&self.cccid.to_le_bytes());
        out[10..12].copy_from_slice(&self.ttag.to_le_bytes());
        out[12..16].copy_from_slice(&self.offset.to_le_bytes());
        out[16..20].copy_from_slice(&self.length.to_le_bytes());
    }
}

/// Negotiated per-connection digest settings and alignment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    /// Header digests on.
    pub header: bool,
    /// Data digests on.
    pub data: bool,
}

impl Digests {
    /// Bytes a header digest adds.
    pub fn hdgst_len(self) -> usize {
        if self.header { DIGEST_LEN } else { 0 }
    }

    /// Bytes a data digest adds.
    pub fn ddgst_len(self) -> usize {
        if self.data { DIGEST_LEN } else { 0 }
    }

    fn flags(self, has_data: bool) -> u8 {
        let mut f = 0;
        if self.header {
            f |= FLAG_HDGST;
        }
        if self.data && has_data {
            f |= FLAG_DDGST;
        }
        f
    }
}

/// Encodes a short-header PDU (24-byte header) with no data, CapsuleResp or R2T, into
/// `out` (replacing what it held).
fn short_pdu_into(
    out: &mut Vec<u8>,
    pdu_type: PduType,
    digests: Digests,
    body: impl FnOnce(&mut [u8]),
) {
    let len = SHORT_HLEN + digests.hdgst_len();
    out.clear();
    out.resize(len, 0);
    header(pdu_type, digests.flags(false), SHORT_HLEN, 0, len).write(out);
    body(out);
    if digests.header {
        let d = digest(&out[..SHORT_HLEN]);
        out[SHORT_HLEN..].copy_from_slice(&d);
    }
}

/// Encodes a CapsuleResp carrying the 16-byte completion queue entry `cqe`.
pub fn capsule_resp(digests: Digests, cqe: &[u8; 16]) -> Vec<u8> {
    let mut out = Vec::new();
    capsule_resp_into(&mut out, digests, cqe);
    out
}

/// [`capsule_resp`] into `out` (replacing what it held), so a sender can reuse buffers.
pub fn capsule_resp_into(out: &mut Vec<u8>, digests: Digests, cqe: &[u8; 16]) {
    short_pdu_into(out, PduType::CapsuleResp, digests, |b| {
        b[8..24].copy_from_slice(cqe)
    })
}

/// Encodes an R2T asking for `length` bytes at `offset` of command `cccid`.
pub fn r2t(digests: Digests, cccid: u16, ttag: u16, offset: u32, length: u32) -> Vec<u8> {
    let mut out = Vec::new();
    short_pdu_into(&mut out, PduType::R2T, digests, |b| {
        DataHeader {
            cccid,
            ttag,
            offset,
            length,
        }
        .write(b)
    });
    out
}

/// Encodes the header part of a data PDU (C2HData from a target, H2CData from a host)
/// carrying `length` bytes at `offset`: the common header, the PDU-specific header,
/// the header digest and any padding up to the data (alignment `pda_bytes`). The data
/// and its digest (see [`digest`]) follow on the wire.
pub fn data_pdu_header(
    pdu_type: PduType,
    digests: Digests,
    pda_bytes: usize,
    flags: u8,
    data: DataHeader,
) -> Vec<u8> {
    let mut out = Vec::new();
    data_pdu_header_into(&mut out, pdu_type, digests, pda_bytes, flags, data);
    out
}

/// [`data_pdu_header`] into `out` (replacing what it held), so a sender can reuse
/// buffers.
pub fn data_pdu_header_into(
    out: &mut Vec<u8>,
    pdu_type: PduType,
    digests: Digests,
    pda_bytes: usize,
    flags: u8,
    data: DataHeader,
) {
    let hd = SHORT_HLEN + digests.hdgst_len();
    let pdo = hd.next_multiple_of(pda_bytes.max(1));
    let plen = pdo + data.length as usize + digests.ddgst_len();
    out.clear();
    out.resize(pdo, 0);
    header(pdu_type, digests.flags(true) | flags, SHORT_HLEN, pdo, plen).write(out);
    data.write(out);
    if digests.header {
        let d = digest(&out[..SHORT_HLEN]);
        out[SHORT_HLEN..hd].copy_from_slice(&d);
    }
}

/// Encodes a CapsuleCmd for the 64-byte `sqe` with optional in-capsule `data`.
pub fn capsule_cmd(digests: Digests, sqe: &[u8; 64], data: &[u8]) -> Vec<u8> {
    let hd = CAPSULE_CMD_HLEN + digests.hdgst_len();
    let has_data = !data.is_empty();
    let plen = hd + data.len() + if has_data { digests.ddgst_len() } else { 0 };
    let mut b = Vec::with_capacity(plen);
    b.resize(CAPSULE_CMD_HLEN, 0);
    let pdo = if has_data { hd } else { 0 };
    header(
        PduType::CapsuleCmd,
        digests.flags(has_data),
        CAPSULE_CMD_HLEN,
        pdo,
        plen,
    )
    .write(&mut b);
    b[8..72].copy_from_slice(sqe);
    if digests.header {
        let d = digest(&b[..CAPSULE_CMD_HLEN]);
        b.extend_from_slice(&d);
    }
    if has_data {
        b.extend_from_slice(data);
        if digests.data {
            b.extend_from_slice(&digest(data));
        }
    }
    b
}

/// Encodes a TermReq (`C2HTermReq` from a target, `H2CTermReq` from a host) for `fatal`,
/// echoing up to the first 152 bytes of the offending PDU header.
pub fn term_req(pdu_type: PduType, fatal: Fatal, offending: &[u8]) -> Vec<u8> {
    let echo = &offending[..offending.len().min(152)];
    let plen = SHORT_HLEN + echo.len();
    let mut b = vec![0u8; plen];
    header(pdu_type, 0, SHORT_HLEN, 0, plen).write(&mut b);
    b[8..10].copy_from_slice(&(fatal.fes as u16).to_le_bytes());
    b[10..14].copy_from_slice(&fatal.offset.to_le_bytes());
    b[SHORT_HLEN..].copy_from_slice(echo);
    b
}

/// Parses a TermReq's status and field offset.
pub fn parse_term_req(h: &[u8]) -> Option<(u16, u32)> {
    (h.len() >= SHORT_HLEN).then(|| (le::u16(h, 8), le::u32(h, 10)))
}

/// Checks the framing of a received PDU header (not IC PDUs): `hlen` as the type
/// requires, the header digest flag as negotiated, `pdo` and `plen` consistent and
/// within `max_plen`. Returns whether a data digest follows the data.
pub fn check_frame(
    ch: &CommonHeader,
    expected_hlen: usize,
    digests: Digests,
    max_plen: usize,
) -> Result<bool, Fatal> {
    if usize::from(ch.hlen) != expected_hlen {
        return Err(Fatal::new(Fes::InvalidHeaderField, 2));
    }
    if (ch.flags & FLAG_HDGST != 0) != digests.header {
        return Err(Fatal::new(Fes::InvalidHeaderField, 1));
    }
    let plen = ch.plen as usize;
    let hd = expected_hlen + digests.hdgst_len();
    if plen < hd || plen > max_plen {
        return Err(Fatal::new(Fes::InvalidHeaderField, 4));
    }
    let has_data = plen > hd;
    let ddgst = ch.flags & FLAG_DDGST != 0;
    if has_data {
        if ddgst != digests.data {
            return Err(Fatal::new(Fes::InvalidHeaderField, 1));
        }
        let pdo = usize::from(ch.pdo);
        if pdo < hd || pdo + if ddgst { DIGEST_LEN } else { 0 } > plen {
            return Err(Fatal::new(Fes::InvalidHeaderField, 3));
        }
    } else if ch.pdo != 0 && usize::from(ch.pdo) != hd {
        return Err(Fatal::new(Fes::InvalidHeaderField, 3));
    }
    Ok(has_data && ddgst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ic_round_trip_and_checks() {
        let req = IcReq {
            pfv: 0,
            hpda: 0,
            hdgst: true,
            ddgst: false,
            maxr2t: 0,
        };
        assert_eq!(IcReq::decode(&req.encode()), Ok(req));
        let mut bad = req.encode();
        bad[8] = 1;
        assert_eq!(
            IcReq::decode(&bad),
            Err(Fatal::new(Fes::UnsupportedParameter, 8))
        );
        let mut short = req.encode();
        short[4] = 64;
        assert_eq!(
            IcReq::decode(&short),
            Err(Fatal::new(Fes::InvalidHeaderField, 4))
        );
        assert!(IcReq::decode(&[0u8; 3]).is_err());
        let resp = IcResp {
            pfv: 0,
            cpda: 0,
            hdgst: true,
            ddgst: true,
            maxh2cdata: 131072,
        };
        assert_eq!(IcResp::decode(&resp.encode()), Ok(resp));
    }

    #[test]
    fn digest_matches_the_crc32c_check_value() {
        // The standard CRC-32C check value for "123456789".
        assert_eq!(u32::from_le_bytes(digest(b"123456789")), 0xE306_9283);
        assert_eq!(
            digest_parts([&b"1234"[..], &b"56789"[..]]),
            digest(b"123456789")
        );
    }

    #[test]
    fn data_header_has_the_right_layout() {
        let d = Digests {
            header: true,
            data: true,
        };
        let h = data_pdu_header(
            PduType::C2HData,
            d,
            4,
            FLAG_DATA_LAST,
            DataHeader {
                cccid: 7,
                ttag: 0,
                offset: 4096,
                length: 512,
            },
        );
        let ch = CommonHeader::parse(h[..8].try_into().unwrap());
        assert_eq!(ch.hlen, 24);
        assert_eq!(ch.pdo, 28);
        assert_eq!(ch.plen, 28 + 512 + 4);
        assert_eq!(ch.flags, FLAG_HDGST | FLAG_DDGST | FLAG_DATA_LAST);
        assert_eq!(DataHeader::parse(&h).map(|h| h.offset), Some(4096));
        assert!(DataHeader::parse(&h[..23]).is_none());
        assert_eq!(&h[24..28], &digest(&h[..24]));
    }
}
