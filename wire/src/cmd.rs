//! NVMe submission and completion queue entries as they travel in capsules, SGL
//! descriptors, opcodes and status codes (NVMe Base 2.x, NVMe over Fabrics 1.1).

use crate::le;

/// Admin opcodes the target implements.
pub mod admin {
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0A;
    /// Asynchronous Event Request.
    pub const ASYNC_EVENT: u8 = 0x0C;
    /// Keep Alive.
    pub const KEEP_ALIVE: u8 = 0x18;
}

/// NVM command set I/O opcodes.
pub mod io {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Compare.
    pub const COMPARE: u8 = 0x05;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DSM: u8 = 0x09;
}

/// The fabrics command opcode; the command type is in byte 4.
pub const FABRICS: u8 = 0x7F;

/// Fabrics command types.
pub mod fctype {
    /// Property Set.
    pub const PROPERTY_SET: u8 = 0x00;
    /// Connect.
    pub const CONNECT: u8 = 0x01;
    /// Property Get.
    pub const PROPERTY_GET: u8 = 0x04;
    /// Authentication Send.
    pub const AUTH_SEND: u8 = 0x05;
    /// Authentication Receive.
    pub const AUTH_RECV: u8 = 0x06;
    /// Disconnect (I/O queues).
    pub const DISCONNECT: u8 = 0x08;
}

/// SGL descriptor identifier: data block, offset subtype (in-capsule data).
pub const SGL_DATA_BLOCK_OFFSET: u8 = 0x01;
/// SGL descriptor identifier: transport data block, transport-specific subtype.
pub const SGL_TRANSPORT_DATA_BLOCK: u8 = 0x5A;

/// Direction of a command's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// No data.
    None,
    /// Host to controller (writes).
    HostToCtrl,
    /// Controller to host (reads).
    CtrlToHost,
}

/// A 64-byte submission queue entry.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sqe(pub [u8; 64]);

impl std::fmt::Debug for Sqe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Sqe {{ opcode: {:#04x}, cid: {}, nsid: {}, fctype: {:#04x} }}",
            self.opcode(),
            self.cid(),
            self.nsid(),
            self.fctype()
        )
    }
}

impl Sqe {
    /// An all-zero entry with `opcode` and `cid`.
    pub fn new(opcode: u8, cid: u16) -> Self {
        let mut b = [0u8; 64];
        b[0] = opcode;
        b[2..4].copy_from_slice(&cid.to_le_bytes());
        Self(b)
    }

    /// Opcode.
    pub fn opcode(&self) -> u8 {
        self.0[0]
    }

    /// Flags byte (fused operation, PSDT).
    pub fn flags(&self) -> u8 {
        self.0[1]
    }

    /// Command identifier.
    pub fn cid(&self) -> u16 {
        le::u16(&self.0, 2)
    }

    /// Namespace identifier.
    pub fn nsid(&self) -> u32 {
        le::u32(&self.0, 4)
    }

    /// Fabrics command type (byte 4) for fabrics commands.
    pub fn fctype(&self) -> u8 {
        self.0[4]
    }

    /// Command dword `n` (10..=15).
    pub fn cdw(&self, n: usize) -> u32 {
        le::u32(&self.0, n * 4)
    }

    /// Sets command dword `n`.
    pub fn set_cdw(&mut self, n: usize, v: u32) {
        le::put_u32(&mut self.0, n * 4, v);
    }

    /// Sets the namespace identifier.
    pub fn set_nsid(&mut self, nsid: u32) {
        le::put_u32(&mut self.0, 4, nsid);
    }

    /// SGL descriptor address field.
    pub fn sgl_addr(&self) -> u64 {
        le::u64(&self.0, 24)
    }

    /// SGL descriptor length.
    pub fn sgl_len(&self) -> u32 {
        le::u32(&self.0, 32)
    }

    /// SGL descriptor identifier (type << 4 | subtype).
    pub fn sgl_id(&self) -> u8 {
        self.0[39]
    }

    /// Sets the SGL descriptor: identifier, address (offset) and length.
    pub fn set_sgl(&mut self, id: u8, addr: u64, len: u32) {
        self.0[1] = (self.0[1] & 0x3F) | 0x40; // PSDT: SGL, metadata buffer
        le::put_u64(&mut self.0, 24, addr);
        le::put_u32(&mut self.0, 32, len);
        self.0[39] = id;
    }

    /// Direction of the data transfer the command implies.
    pub fn direction(&self) -> Direction {
        let bits = if self.opcode() == FABRICS {
            self.fctype()
        } else {
            self.opcode()
        };
        match bits & 0x3 {
            0x1 => Direction::HostToCtrl,
            0x2 => Direction::CtrlToHost,
            _ => Direction::None,
        }
    }
}

/// Status code types.
pub mod sct {
    /// Generic command status.
    pub const GENERIC: u8 = 0;
    /// Command specific status.
    pub const COMMAND: u8 = 1;
    /// Media and data integrity errors.
    pub const MEDIA: u8 = 2;
}

/// A completion status: status code type, status code, Do Not Retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Status code type.
    pub sct: u8,
    /// Status code.
    pub sc: u8,
    /// Do not retry.
    pub dnr: bool,
}

impl Status {
    /// Successful completion.
    pub const SUCCESS: Self = Self::generic(0x00, false);
    /// Invalid command opcode.
    pub const INVALID_OPCODE: Self = Self::generic(0x01, true);
    /// Invalid field in command.
    pub const INVALID_FIELD: Self = Self::generic(0x02, true);
    /// Command ID conflict.
    pub const CID_CONFLICT: Self = Self::generic(0x03, true);
    /// Data transfer error.
    pub const DATA_TRANSFER_ERROR: Self = Self::generic(0x04, false);
    /// Internal error.
    pub const INTERNAL: Self = Self::generic(0x06, false);
    /// Command aborted due to SQ deletion.
    pub const ABORTED_SQ_DELETION: Self = Self::generic(0x08, false);
    /// Invalid namespace or format.
    pub const INVALID_NAMESPACE: Self = Self::generic(0x0B, true);
    /// Command sequence error.
    pub const SEQUENCE_ERROR: Self = Self::generic(0x0C, true);
    /// Data SGL length invalid.
    pub const SGL_LENGTH_INVALID: Self = Self::generic(0x0F, true);
    /// SGL descriptor type invalid.
    pub const SGL_TYPE_INVALID: Self = Self::generic(0x11, true);
    /// SGL offset invalid.
    pub const SGL_OFFSET_INVALID: Self = Self::generic(0x16, true);
    /// Transient transport error (a data digest mismatch; the host may retry).
    pub const TRANSIENT_TRANSPORT: Self = Self::generic(0x22, false);
    /// LBA out of range.
    pub const LBA_OUT_OF_RANGE: Self = Self::generic(0x80, true);
    /// Namespace not ready (retryable).
    pub const NAMESPACE_NOT_READY: Self = Self::generic(0x82, false);
    /// Invalid queue identifier.
    pub const INVALID_QUEUE_ID: Self = Self::command(0x01);
    /// Invalid queue size.
    pub const INVALID_QUEUE_SIZE: Self = Self::command(0x02);
    /// Asynchronous event request limit exceeded.
    pub const AER_LIMIT_EXCEEDED: Self = Self::command(0x05);
    /// Invalid log page.
    pub const INVALID_LOG_PAGE: Self = Self::command(0x09);
    /// Feature identifier not saveable.
    pub const FEATURE_NOT_SAVEABLE: Self = Self::command(0x0D);
    /// Connect: incompatible format.
    pub const CONNECT_INCOMPATIBLE_FORMAT: Self = Self::command(0x80);
    /// Connect: controller busy.
    pub const CONNECT_CTRL_BUSY: Self = Self::command(0x81);
    /// Connect: invalid parameters.
    pub const CONNECT_INVALID_PARAM: Self = Self::command(0x82);
    /// Connect: invalid host.
    pub const CONNECT_INVALID_HOST: Self = Self::command(0x84);
    /// The queue must authenticate before this command (do not retry).
    pub const AUTH_REQUIRED: Self = Self::command(0x91);
    /// Write fault.
    pub const WRITE_FAULT: Self = Self::media(0x80);
    /// Unrecovered read error.
    pub const UNRECOVERED_READ: Self = Self::media(0x81);
    /// Compare failure.
    pub const COMPARE_FAILURE: Self = Self::media(0x85);

    const fn generic(sc: u8, dnr: bool) -> Self {
        Self {
            sct: sct::GENERIC,
            sc,
            dnr,
        }
    }

    const fn command(sc: u8) -> Self {
        Self {
            sct: sct::COMMAND,
            sc,
            dnr: true,
        }
    }

    const fn media(sc: u8) -> Self {
        Self {
            sct: sct::MEDIA,
            sc,
            dnr: false,
        }
    }

    /// Whether this is success.
    pub fn is_success(&self) -> bool {
        self.sct == 0 && self.sc == 0
    }

    /// The 15-bit status field as it sits above the phase bit.
    pub fn to_field(self) -> u16 {
        (u16::from(self.sc) << 1) | (u16::from(self.sct & 0x7) << 9) | (u16::from(self.dnr) << 15)
    }

    /// Decodes a CQE status field.
    pub fn from_field(v: u16) -> Self {
        Self {
            sc: (v >> 1) as u8,
            sct: ((v >> 9) & 0x7) as u8,
            dnr: v & 0x8000 != 0,
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match (self.sct, self.sc) {
            (0, 0x00) => "success",
            (0, 0x01) => "invalid command opcode",
            (0, 0x02) => "invalid field in command",
            (0, 0x03) => "command ID conflict",
            (0, 0x04) => "data transfer error",
            (0, 0x06) => "internal error",
            (0, 0x08) => "aborted: SQ deletion",
            (0, 0x0B) => "invalid namespace or format",
            (0, 0x0C) => "command sequence error",
            (0, 0x0F) => "data SGL length invalid",
            (0, 0x11) => "SGL descriptor type invalid",
            (0, 0x80) => "LBA out of range",
            (0, 0x82) => "namespace not ready",
            (1, 0x01) => "invalid queue identifier",
            (1, 0x02) => "invalid queue size",
            (1, 0x09) => "invalid log page",
            (1, 0x80) => "connect: incompatible format",
            (1, 0x81) => "connect: controller busy",
            (1, 0x82) => "connect: invalid parameters",
            (1, 0x84) => "connect: invalid host",
            (2, 0x80) => "write fault",
            (2, 0x81) => "unrecovered read error",
            (2, 0x85) => "compare failure",
            _ => "status",
        };
        write!(f, "{name} (sct {:#x}, sc {:#04x})", self.sct, self.sc)
    }
}

/// A 16-byte completion queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cqe {
    /// Command specific dword 0.
    pub dw0: u32,
    /// Command specific dword 1.
    pub dw1: u32,
    /// Submission queue head pointer.
    pub sqhd: u16,
    /// Submission queue identifier.
    pub sqid: u16,
    /// Command identifier.
    pub cid: u16,
    /// Status.
    pub status: Status,
}

impl Cqe {
    /// A completion of `cid` with `status` and no result.
    pub fn new(cid: u16, status: Status) -> Self {
        Self {
            dw0: 0,
            dw1: 0,
            sqhd: 0,
            sqid: 0,
            cid,
            status,
        }
    }

    /// Encodes the 16 bytes.
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.dw0.to_le_bytes());
        b[4..8].copy_from_slice(&self.dw1.to_le_bytes());
        b[8..10].copy_from_slice(&self.sqhd.to_le_bytes());
        b[10..12].copy_from_slice(&self.sqid.to_le_bytes());
        b[12..14].copy_from_slice(&self.cid.to_le_bytes());
        b[14..16].copy_from_slice(&self.status.to_field().to_le_bytes());
        b
    }

    /// Decodes 16 bytes.
    pub fn decode(b: &[u8]) -> Self {
        Self {
            dw0: le::u32(b, 0),
            dw1: le::u32(b, 4),
            sqhd: le::u16(b, 8),
            sqid: le::u16(b, 10),
            cid: le::u16(b, 12),
            status: Status::from_field(le::u16(b, 14)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_field_round_trips() {
        for s in [
            Status::SUCCESS,
            Status::LBA_OUT_OF_RANGE,
            Status::CONNECT_INVALID_HOST,
            Status::UNRECOVERED_READ,
        ] {
            assert_eq!(Status::from_field(s.to_field()), s);
        }
        assert_eq!(Status::INVALID_FIELD.to_field(), 0x8004);
    }

    #[test]
    fn directions_follow_opcode_bits() {
        assert_eq!(Sqe::new(io::WRITE, 1).direction(), Direction::HostToCtrl);
        assert_eq!(Sqe::new(io::READ, 1).direction(), Direction::CtrlToHost);
        assert_eq!(Sqe::new(io::FLUSH, 1).direction(), Direction::None);
        let mut connect = Sqe::new(FABRICS, 1);
        connect.0[4] = fctype::CONNECT;
        assert_eq!(connect.direction(), Direction::HostToCtrl);
    }
}
