//! The control path of the initiator: TCP connect, ICReq, Fabrics Connect, controller
//! enable, Identify, Number of Queues, discovery log. Blocking, with timeouts; every
//! failure is an error that says what the target answered.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, anyhow, bail, ensure};
use nvmf_wire::cmd::{
    Cqe, FABRICS, SGL_DATA_BLOCK_OFFSET, SGL_TRANSPORT_DATA_BLOCK, Sqe, Status, admin, fctype,
};
use nvmf_wire::le;

use crate::auth::{HostSecrets, authenticate};
use nvmf_wire::pdu::{
    self, CommonHeader, DataHeader, Digests, FLAG_DATA_SUCCESS, IcReq, IcResp, PduType,
};

/// The well-known discovery NQN.
pub use nvmf_wire::DISCOVERY_NQN;

/// Default host NQN when none is given.
pub const DEFAULT_HOSTNQN: &str =
    "nqn.2014-08.org.nvmexpress:uuid:0c5e4b2a-7f3d-4e61-9a8b-0ae1f0c0ffee";

/// Connect's CATTR bit asking the controller not to report SQ head pointers.
const CONNECT_DISABLE_SQ_FLOW: u8 = 1 << 2;
/// Connect's result bit: the host must authenticate this queue (ATR).
const CONNECT_AUTH_REQUIRED: u32 = 1 << 17;

/// How to reach a target.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Address and port.
    pub addr: SocketAddr,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Host NQN.
    pub hostnqn: String,
    /// Header and data digests.
    pub digests: Digests,
    /// Connect and command timeout.
    pub timeout: Duration,
    /// Keep SQ flow control on. Off (the default, like `nvme connect --disable-sqflow`)
    /// lets a target complete a read with its last C2HData PDU alone, as SPDK's target
    /// does for every host, instead of adding a response capsule.
    pub sq_flow_control: bool,
    /// DH-HMAC-CHAP secrets, for targets that make this host authenticate.
    pub dhchap: Option<HostSecrets>,
}

/// Resolves "host:port".
pub fn resolve(text: &str) -> anyhow::Result<SocketAddr> {
    text.to_socket_addrs()
        .with_context(|| format!("resolving {text:?} (expected address:port)"))?
        .next()
        .ok_or_else(|| anyhow!("{text:?} resolves to no address"))
}

/// Host identifier derived from the host NQN (stable per host NQN).
pub fn host_id(hostnqn: &str) -> [u8; 16] {
    let a = crc32c::crc32c(hostnqn.as_bytes());
    let b = crc32c::crc32c_append(a, b"ox");
    let c = crc32c::crc32c_append(b, b"perf");
    let d = crc32c::crc32c_append(c, hostnqn.as_bytes());
    let mut id = [0u8; 16];
    for (i, w) in [a, b, c, d].iter().enumerate() {
        id[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    id
}

/// A connected, negotiated queue pair driven one command at a time.
pub struct Session {
    /// The socket.
    pub sock: TcpStream,
    /// Negotiated digests.
    pub digests: Digests,
    /// Target's MAXH2CDATA.
    pub maxh2cdata: u32,
    /// Controller ID after Connect.
    pub cntlid: u16,
    cid: u16,
    in_capsule: usize,
}

/// Facts about a namespace the workload needs.
#[derive(Debug, Clone, Copy)]
pub struct NamespaceInfo {
    /// Namespace ID.
    pub nsid: u32,
    /// Logical block size.
    pub block_size: u32,
    /// Number of blocks.
    pub blocks: u64,
}

/// Facts about the controller.
#[derive(Debug, Clone)]
pub struct ControllerInfo {
    /// Largest transfer in bytes (0 = unlimited).
    pub max_transfer: u32,
    /// In-capsule data bytes accepted on I/O queues.
    pub in_capsule: u32,
    /// Maximum queue entries (CAP.MQES + 1).
    pub max_queue_entries: u32,
    /// Model string.
    pub model: String,
    /// Serial string.
    pub serial: String,
    /// I/O queues granted.
    pub io_queues: u16,
}

/// A completed command.
pub struct Done {
    /// The completion (absent if the final C2HData carried SUCCESS).
    pub cqe: Option<Cqe>,
    /// Data returned.
    pub data: Vec<u8>,
}

impl Done {
    /// The command status.
    pub fn status(&self) -> Status {
        self.cqe.map_or(Status::SUCCESS, |c| c.status)
    }

    fn ok(self, what: &str) -> anyhow::Result<Self> {
        let s = self.status();
        ensure!(s.is_success(), "{what} failed: {s}");
        Ok(self)
    }
}

impl Session {
    /// Connects a TCP socket to `ep` and negotiates ICReq/ICResp.
    pub fn open(ep: &Endpoint) -> anyhow::Result<Self> {
        let sock = TcpStream::connect_timeout(&ep.addr, ep.timeout)
            .with_context(|| format!("connecting to {}", ep.addr))?;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(ep.timeout))?;
        sock.set_write_timeout(Some(ep.timeout))?;
        let mut s = Self {
            sock,
            digests: ep.digests,
            maxh2cdata: 0,
            cntlid: 0,
            cid: 0,
            in_capsule: nvmf_wire::ADMIN_IN_CAPSULE as usize,
        };
        let req = IcReq {
            pfv: 0,
            hpda: 0,
            hdgst: ep.digests.header,
            ddgst: ep.digests.data,
            maxr2t: 0,
        };
        s.sock
            .write_all(&req.encode())
            .with_context(|| format!("sending ICReq to {}", ep.addr))?;
        let (ch, bytes) = s.recv_pdu().context("waiting for ICResp")?;
        ensure!(
            ch.pdu_type == PduType::IcResp as u8,
            "expected ICResp, got PDU type {}",
            ch.pdu_type
        );
        let resp = IcResp::decode(&bytes).map_err(|e| anyhow!("invalid ICResp: {e}"))?;
        ensure!(
            resp.cpda == 0,
            "target asks for CPDA {}, unsupported",
            resp.cpda
        );
        ensure!(
            resp.hdgst == ep.digests.header && resp.ddgst == ep.digests.data,
            "target did not accept the requested digests"
        );
        s.maxh2cdata = resp.maxh2cdata;
        Ok(s)
    }

    /// In-capsule data this queue may send.
    pub fn in_capsule(&self) -> usize {
        self.in_capsule
    }

    /// Reads one whole PDU.
    pub fn recv_pdu(&mut self) -> anyhow::Result<(CommonHeader, Vec<u8>)> {
        let mut ch = [0u8; 8];
        self.sock.read_exact(&mut ch).map_err(timeout_msg)?;
        let header = CommonHeader::parse(&ch);
        ensure!(
            (8..=(64 << 20)).contains(&header.plen),
            "target sent a PDU of {} bytes",
            header.plen
        );
        let mut bytes = ch.to_vec();
        bytes.resize(header.plen as usize, 0);
        self.sock.read_exact(&mut bytes[8..]).map_err(timeout_msg)?;
        if header.pdu_type == PduType::C2HTermReq as u8 {
            let (fes, fei) = pdu::parse_term_req(&bytes).unwrap_or((0, 0));
            bail!("target terminated the connection: error {fes:#x} at header offset {fei}");
        }
        Ok((header, bytes))
    }

    /// Runs one command to completion (R2T for writes beyond in-capsule size).
    pub fn command(&mut self, mut sqe: Sqe, write: &[u8], read_len: u32) -> anyhow::Result<Done> {
        self.cid = self.cid.wrapping_add(1);
        let cid = self.cid;
        sqe.0[2..4].copy_from_slice(&cid.to_le_bytes());
        let in_capsule = !write.is_empty() && write.len() <= self.in_capsule;
        if in_capsule {
            sqe.set_sgl(SGL_DATA_BLOCK_OFFSET, 0, write.len() as u32);
        } else {
            let len = if write.is_empty() {
                read_len
            } else {
                write.len() as u32
            };
            sqe.set_sgl(SGL_TRANSPORT_DATA_BLOCK, 0, len);
        }
        let capsule = pdu::capsule_cmd(self.digests, &sqe.0, if in_capsule { write } else { &[] });
        self.sock.write_all(&capsule)?;
        let mut data = Vec::new();
        loop {
            let (ch, bytes) = self.recv_pdu()?;
            let hd = self.digests.hdgst_len();
            match PduType::from_u8(ch.pdu_type) {
                Some(PduType::CapsuleResp) => {
                    ensure!(bytes.len() >= 24 + hd, "short CapsuleResp");
                    let cqe = Cqe::decode(&bytes[8..24]);
                    ensure!(
                        cqe.cid == cid,
                        "response for CID {} while waiting for {cid}",
                        cqe.cid
                    );
                    return Ok(Done {
                        cqe: Some(cqe),
                        data,
                    });
                }
                Some(PduType::C2HData) => {
                    let h = DataHeader::parse(&bytes).context("short C2HData")?;
                    let pdo = usize::from(ch.pdo);
                    let end = pdo + h.length as usize;
                    ensure!(end <= bytes.len(), "C2HData longer than its PDU");
                    ensure!(h.offset as usize == data.len(), "C2HData out of order");
                    let chunk = &bytes[pdo..end];
                    if self.digests.data {
                        ensure!(
                            bytes[end..] == pdu::digest(chunk),
                            "C2HData data digest mismatch"
                        );
                    }
                    data.extend_from_slice(chunk);
                    if ch.flags & FLAG_DATA_SUCCESS != 0 {
                        return Ok(Done { cqe: None, data });
                    }
                }
                Some(PduType::R2T) => {
                    let h = DataHeader::parse(&bytes).context("short R2T")?;
                    let (start, end) = (h.offset as usize, (h.offset + h.length) as usize);
                    ensure!(end <= write.len(), "R2T beyond the write's data");
                    self.send_h2c(cid, h.ttag, h.offset, &write[start..end])?;
                }
                _ => bail!("unexpected PDU type {} from target", ch.pdu_type),
            }
        }
    }

    fn send_h2c(&mut self, cid: u16, ttag: u16, offset: u32, data: &[u8]) -> anyhow::Result<()> {
        let max = (self.maxh2cdata as usize).max(4096);
        for (i, chunk) in data.chunks(max).enumerate() {
            let off = offset + (i * max) as u32;
            let last = off as usize + chunk.len() == offset as usize + data.len();
            let mut p = pdu::data_pdu_header(
                PduType::H2CData,
                self.digests,
                4,
                if last { pdu::FLAG_DATA_LAST } else { 0 },
                DataHeader {
                    cccid: cid,
                    ttag,
                    offset: off,
                    length: chunk.len() as u32,
                },
            );
            p.extend_from_slice(chunk);
            if self.digests.data {
                p.extend_from_slice(&pdu::digest(chunk));
            }
            self.sock.write_all(&p)?;
        }
        Ok(())
    }

    /// Fabrics Connect for queue `qid`; returns the controller ID.
    pub fn connect(
        &mut self,
        ep: &Endpoint,
        qid: u16,
        sqsize: u16,
        cntlid: u16,
        kato_ms: u32,
    ) -> anyhow::Result<u16> {
        let mut sqe = Sqe::new(FABRICS, 0);
        sqe.0[4] = fctype::CONNECT;
        le::put_u16(&mut sqe.0, 42, qid);
        le::put_u16(&mut sqe.0, 44, sqsize);
        le::put_u32(&mut sqe.0, 48, kato_ms);
        if !ep.sq_flow_control {
            sqe.0[46] |= CONNECT_DISABLE_SQ_FLOW;
        }
        let mut data = vec![0u8; 1024];
        data[..16].copy_from_slice(&host_id(&ep.hostnqn));
        le::put_u16(&mut data, 16, cntlid);
        le::put_str0(&mut data, 256, 256, &ep.subnqn);
        le::put_str0(&mut data, 512, 256, &ep.hostnqn);
        let done = self.command(sqe, &data, 0)?;
        let cqe = done
            .cqe
            .ok_or_else(|| anyhow!("Connect answered without a response"))?;
        if !cqe.status.is_success() {
            let detail = if cqe.status == Status::CONNECT_INVALID_PARAM {
                let field = match (cqe.dw0 >> 16 & 1, cqe.dw0 & 0xFFFF) {
                    (1, 256) => "subsystem NQN".to_string(),
                    (1, 512) => "host NQN".to_string(),
                    (1, 16) => "controller ID".to_string(),
                    (0, 42) => "queue ID".to_string(),
                    (0, 44) => "queue size".to_string(),
                    (0, 46) if !ep.sq_flow_control => "connect attributes: the target may not \
                        let SQ flow control be turned off; try --sq-flow-control"
                        .to_string(),
                    (a, o) => format!("{} offset {o}", if a == 1 { "data" } else { "command" }),
                };
                format!(" (invalid {field})")
            } else {
                String::new()
            };
            bail!(
                "{} rejected Connect to {} queue {qid}: {}{detail}",
                ep.addr,
                ep.subnqn,
                cqe.status
            );
        }
        self.cntlid = cqe.dw0 as u16;
        let asked = cqe.dw0 & CONNECT_AUTH_REQUIRED != 0;
        if !asked && ep.dhchap.as_ref().is_some_and(|d| d.ctrl_key.is_some()) {
            bail!(
                "{} did not ask host {} to authenticate to {}, so it cannot prove the \
                 controller secret given with --dhchap-ctrl-secret: refusing it",
                ep.addr,
                ep.hostnqn,
                ep.subnqn
            );
        }
        if asked {
            let Some(secrets) = &ep.dhchap else {
                bail!(
                    "{} requires host {} to authenticate (DH-HMAC-CHAP) to {}: give \
                     --dhchap-secret",
                    ep.addr,
                    ep.hostnqn,
                    ep.subnqn
                );
            };
            authenticate(self, secrets, &ep.hostnqn, &ep.subnqn, qid)
                .with_context(|| format!("{} {} queue {qid}", ep.addr, ep.subnqn))?;
        }
        Ok(self.cntlid)
    }

    /// Property Get.
    pub fn prop_get(&mut self, offset: u32, eight: bool) -> anyhow::Result<u64> {
        let mut sqe = Sqe::new(FABRICS, 0);
        sqe.0[4] = fctype::PROPERTY_GET;
        sqe.0[40] = u8::from(eight);
        le::put_u32(&mut sqe.0, 44, offset);
        let cqe = self
            .command(sqe, &[], 0)?
            .ok("Property Get")?
            .cqe
            .ok_or_else(|| anyhow!("no response"))?;
        Ok(u64::from(cqe.dw0) | u64::from(cqe.dw1) << 32)
    }

    /// Property Set (4 bytes).
    pub fn prop_set(&mut self, offset: u32, value: u32) -> anyhow::Result<()> {
        let mut sqe = Sqe::new(FABRICS, 0);
        sqe.0[4] = fctype::PROPERTY_SET;
        le::put_u32(&mut sqe.0, 44, offset);
        le::put_u64(&mut sqe.0, 48, u64::from(value));
        self.command(sqe, &[], 0)?.ok("Property Set")?;
        Ok(())
    }

    /// Sets CC.EN and waits for CSTS.RDY.
    pub fn enable(&mut self) -> anyhow::Result<()> {
        self.prop_set(0x14, (6 << 16) | (4 << 20) | 1)?;
        for _ in 0..100 {
            let csts = self.prop_get(0x1C, false)?;
            ensure!(csts & 2 == 0, "controller fatal status after enable");
            if csts & 1 == 1 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("controller did not become ready")
    }

    /// Identify with `cns` for `nsid`.
    pub fn identify(&mut self, cns: u8, nsid: u32) -> anyhow::Result<Vec<u8>> {
        let mut sqe = Sqe::new(admin::IDENTIFY, 0);
        sqe.set_nsid(nsid);
        sqe.set_cdw(10, u32::from(cns));
        let d = self.command(sqe, &[], 4096)?.ok("Identify")?;
        ensure!(
            d.data.len() == 4096,
            "Identify returned {} bytes",
            d.data.len()
        );
        Ok(d.data)
    }

    /// Get Log Page `lid`, `len` bytes from `offset`.
    pub fn log_page(&mut self, lid: u8, offset: u64, len: u32) -> anyhow::Result<Vec<u8>> {
        let numd = len / 4 - 1;
        let mut sqe = Sqe::new(admin::GET_LOG_PAGE, 0);
        sqe.set_cdw(10, u32::from(lid) | (numd & 0xFFFF) << 16);
        sqe.set_cdw(11, numd >> 16);
        sqe.set_cdw(12, offset as u32);
        sqe.set_cdw(13, (offset >> 32) as u32);
        Ok(self.command(sqe, &[], len)?.ok("Get Log Page")?.data)
    }

    /// Set Features Number of Queues; returns the count granted.
    pub fn set_queues(&mut self, wanted: u16) -> anyhow::Result<u16> {
        let mut sqe = Sqe::new(admin::SET_FEATURES, 0);
        sqe.set_cdw(10, 0x07);
        let n = u32::from(wanted.max(1) - 1);
        sqe.set_cdw(11, n | n << 16);
        let cqe = self
            .command(sqe, &[], 0)?
            .ok("Set Features (Number of Queues)")?
            .cqe
            .ok_or_else(|| anyhow!("no response"))?;
        let granted = (cqe.dw0 & 0xFFFF).min(cqe.dw0 >> 16) + 1;
        Ok(granted as u16)
    }

    /// Keep Alive.
    pub fn keep_alive(&mut self) -> anyhow::Result<()> {
        self.command(Sqe::new(admin::KEEP_ALIVE, 0), &[], 0)?
            .ok("Keep Alive")?;
        Ok(())
    }
}

/// The target ended the connection (callers that expect it in some states, such as a
/// refused authentication, look for this).
#[derive(Debug, thiserror::Error)]
#[error("the target closed the connection")]
pub struct Closed;

fn timeout_msg(e: std::io::Error) -> anyhow::Error {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            anyhow!("timed out waiting for the target")
        }
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::BrokenPipe => anyhow!(Closed),
        _ => anyhow!(e),
    }
}

/// An admin session to an NVM subsystem's controller, enabled, with queues granted.
pub struct Controller {
    /// The admin queue.
    pub admin: Session,
    /// What Identify said.
    pub info: ControllerInfo,
}

impl Controller {
    /// Connects the admin queue, enables the controller and asks for `io_queues`.
    pub fn connect(ep: &Endpoint, io_queues: u16) -> anyhow::Result<Self> {
        let mut admin = Session::open(ep)?;
        admin.connect(ep, 0, 31, 0xFFFF, 30_000)?;
        let cap = admin.prop_get(0, true)?;
        admin.enable()?;
        let id = admin.identify(1, 0)?;
        let mdts = id[77];
        let ioccsz = le::u32(&id, 1792);
        let granted = admin.set_queues(io_queues)?;
        let info = ControllerInfo {
            max_transfer: if mdts == 0 { 0 } else { 4096u32 << mdts },
            in_capsule: (ioccsz * 16).saturating_sub(64),
            max_queue_entries: (cap & 0xFFFF) as u32 + 1,
            model: le::str0(&id, 24, 40).trim_end().to_string(),
            serial: le::str0(&id, 4, 20).trim_end().to_string(),
            io_queues: granted,
        };
        Ok(Self { admin, info })
    }

    /// Identify Namespace `nsid`.
    pub fn namespace(&mut self, nsid: u32) -> anyhow::Result<NamespaceInfo> {
        let id = self.admin.identify(0, nsid)?;
        let blocks = le::u64(&id, 0);
        ensure!(blocks > 0, "namespace {nsid} is not active");
        let flbas = usize::from(id[26] & 0xF);
        let lbads = id.get(128 + flbas * 4 + 2).copied().unwrap_or(0);
        ensure!(
            (9..=16).contains(&lbads),
            "namespace {nsid}: unsupported LBA size 2^{lbads}"
        );
        Ok(NamespaceInfo {
            nsid,
            block_size: 1 << lbads,
            blocks,
        })
    }

    /// Connects I/O queue `qid` with `entries` entries.
    pub fn io_queue(&self, ep: &Endpoint, qid: u16, entries: u16) -> anyhow::Result<Session> {
        let mut s = Session::open(ep)?;
        s.connect(ep, qid, entries - 1, self.admin.cntlid, 0)?;
        s.in_capsule = self.info.in_capsule as usize;
        Ok(s)
    }
}

/// One discovery log entry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiscoveryRecord {
    /// Transport type (3 = TCP).
    pub trtype: u8,
    /// Address family (1 IPv4, 2 IPv6).
    pub adrfam: u8,
    /// Subsystem type (2 NVM, 3 current discovery).
    pub subtype: u8,
    /// Port ID.
    pub portid: u16,
    /// Transport service ID (port).
    pub trsvcid: String,
    /// Transport address.
    pub traddr: String,
    /// Subsystem NQN.
    pub subnqn: String,
}

/// Reads the discovery log of the target at `ep` (its `subnqn` is ignored).
pub fn discover(ep: &Endpoint) -> anyhow::Result<Vec<DiscoveryRecord>> {
    let ep = Endpoint {
        subnqn: DISCOVERY_NQN.to_string(),
        ..ep.clone()
    };
    let mut s = Session::open(&ep)?;
    s.connect(&ep, 0, 31, 0xFFFF, 0)?;
    s.enable()?;
    let head = s.log_page(0x70, 0, 1024)?;
    ensure!(
        head.len() >= 16,
        "discovery log header of {} bytes",
        head.len()
    );
    let numrec = le::u64(&head, 8).min(1024) as u32;
    let page = s.log_page(0x70, 0, 1024 * (numrec + 1))?;
    let mut out = Vec::new();
    for i in 0..numrec as usize {
        let e = page
            .get(1024 * (i + 1)..1024 * (i + 2))
            .ok_or_else(|| anyhow!("discovery log shorter than its record count"))?;
        out.push(DiscoveryRecord {
            trtype: e[0],
            adrfam: e[1],
            subtype: e[2],
            portid: le::u16(e, 4),
            trsvcid: le::str0(e, 32, 32).trim().to_string(),
            traddr: le::str0(e, 512, 256).trim().to_string(),
            subnqn: le::str0(e, 256, 256),
        });
    }
    Ok(out)
}
