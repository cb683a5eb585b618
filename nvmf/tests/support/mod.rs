//! A small blocking NVMe/TCP host for tests: enough of the protocol to drive the
//! target through every path, and to misbehave on purpose.
#![allow(dead_code)]

pub mod guest;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use nvmf::cmd::{
    Cqe, FABRICS, SGL_DATA_BLOCK_OFFSET, SGL_TRANSPORT_DATA_BLOCK, Sqe, Status, admin, fctype,
};
use nvmf::dhchap::{self, DhchapKey, Hash};
use nvmf::ffdhe::{DhGroup, DhKeyPair, augmented_challenge};
use nvmf::le;
use nvmf::pdu::{
    self, CommonHeader, DataHeader, Digests, FLAG_DATA_LAST, FLAG_DATA_SUCCESS, IcReq, IcResp,
    PduType,
};

pub const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";
pub const HOSTID: [u8; 16] = [7; 16];

/// A received PDU: its common header and all its bytes.
pub struct Pdu {
    pub ch: CommonHeader,
    pub bytes: Vec<u8>,
}

impl Pdu {
    pub fn kind(&self) -> u8 {
        self.ch.pdu_type
    }
}

pub struct Host {
    pub sock: TcpStream,
    pub digests: Digests,
    pub maxh2cdata: u32,
    pub cid: u16,
    pub cntlid: u16,
    pub in_capsule: usize,
    /// The Diffie-Hellman group of the last authentication.
    pub last_dh_group: DhGroup,
}

/// Outcome of a command: completion (absent when the C2HData carried SUCCESS) and data.
pub struct Done {
    pub cqe: Option<Cqe>,
    pub data: Vec<u8>,
    pub success_flag: bool,
}

impl Done {
    pub fn status(&self) -> Status {
        self.cqe.map_or(Status::SUCCESS, |c| c.status)
    }
}

impl Host {
    /// Opens a TCP connection and negotiates ICReq/ICResp.
    pub fn connect(addr: SocketAddr, digests: Digests) -> Self {
        Self::raw(addr).negotiate(digests)
    }

    /// Like [`Self::connect`], from the loopback address `source`.
    pub fn connect_from(source: &str, addr: SocketAddr, digests: Digests) -> Self {
        Self::raw_from(source, addr).negotiate(digests)
    }

    fn negotiate(self, digests: Digests) -> Self {
        let mut h = self;
        h.digests = digests;
        let req = IcReq {
            pfv: 0,
            hpda: 0,
            hdgst: digests.header,
            ddgst: digests.data,
            maxr2t: 0,
        };
        h.send(&req.encode());
        let p = h.recv().expect("ICResp");
        let resp = IcResp::decode(&p.bytes).expect("valid ICResp");
        assert_eq!(resp.cpda, 0);
        assert_eq!(resp.hdgst, digests.header);
        assert_eq!(resp.ddgst, digests.data);
        h.maxh2cdata = resp.maxh2cdata;
        h
    }

    /// A TCP connection with nothing negotiated.
    pub fn raw(addr: SocketAddr) -> Self {
        Self::over(TcpStream::connect(addr).unwrap())
    }

    /// A TCP connection from the loopback address `source` (a peer of its own), with
    /// nothing negotiated.
    pub fn raw_from(source: &str, addr: SocketAddr) -> Self {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let local: SocketAddr = format!("{source}:0").parse().unwrap();
        s.bind(&local.into()).unwrap();
        s.connect(&addr.into()).unwrap();
        Self::over(TcpStream::from(s))
    }

    fn over(sock: TcpStream) -> Self {
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        sock.set_nodelay(true).unwrap();
        Self {
            sock,
            digests: Digests::default(),
            maxh2cdata: 0,
            cid: 0,
            cntlid: 0,
            in_capsule: 8192,
            last_dh_group: DhGroup::Null,
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).unwrap();
    }

    /// Reads one PDU; `None` on EOF or error.
    pub fn recv(&mut self) -> Option<Pdu> {
        let mut ch = [0u8; 8];
        self.sock.read_exact(&mut ch).ok()?;
        let header = CommonHeader::parse(&ch);
        let mut bytes = ch.to_vec();
        bytes.resize(header.plen as usize, 0);
        self.sock.read_exact(&mut bytes[8..]).ok()?;
        Some(Pdu { ch: header, bytes })
    }

    /// Whether the target has closed the connection (EOF within the timeout).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        loop {
            match self.sock.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    /// Makes the next command use `cid` again (as SPDK's host does at shutdown with
    /// the CIDs of the AERs it cancelled on its own side).
    pub fn reuse_cid(&mut self, cid: u16) {
        self.cid = cid.wrapping_sub(1);
    }

    pub fn next_cid(&mut self) -> u16 {
        self.cid = self.cid.wrapping_add(1);
        self.cid
    }

    /// Sends `sqe` (its CID replaced) with `write` data, in the capsule when it fits,
    /// otherwise through R2T; collects C2HData and the response.
    pub fn command(&mut self, mut sqe: Sqe, write: &[u8], read_len: u32) -> Done {
        let cid = self.next_cid();
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
        self.send(&capsule);
        let mut data = Vec::new();
        loop {
            let p = self.recv().expect("target closed the connection");
            match PduType::from_u8(p.kind()) {
                Some(PduType::CapsuleResp) => {
                    let off = 8;
                    let cqe = Cqe::decode(&p.bytes[off..off + 16]);
                    assert_eq!(cqe.cid, cid);
                    if self.digests.header {
                        assert_eq!(&p.bytes[24..28], &pdu::digest(&p.bytes[..24]));
                    }
                    return Done {
                        cqe: Some(cqe),
                        data,
                        success_flag: false,
                    };
                }
                Some(PduType::C2HData) => {
                    let h = DataHeader::parse(&p.bytes).expect("a whole data header");
                    assert_eq!(h.cccid, cid);
                    assert_eq!(h.offset as usize, data.len());
                    let pdo = usize::from(p.ch.pdo);
                    let chunk = &p.bytes[pdo..pdo + h.length as usize];
                    if self.digests.data {
                        let d = &p.bytes[pdo + h.length as usize..];
                        assert_eq!(d, &pdu::digest(chunk), "C2H data digest");
                    }
                    data.extend_from_slice(chunk);
                    if p.ch.flags & FLAG_DATA_SUCCESS != 0 {
                        assert!(p.ch.flags & FLAG_DATA_LAST != 0);
                        return Done {
                            cqe: None,
                            data,
                            success_flag: true,
                        };
                    }
                }
                Some(PduType::R2T) => {
                    let h = DataHeader::parse(&p.bytes).expect("a whole data header");
                    assert_eq!(h.cccid, cid);
                    self.send_h2c(
                        cid,
                        h.ttag,
                        h.offset,
                        &write[h.offset as usize..(h.offset + h.length) as usize],
                    );
                }
                other => panic!(
                    "unexpected PDU {other:?}: {:?}",
                    &p.bytes[..p.bytes.len().min(32)]
                ),
            }
        }
    }

    /// Sends `sqe` (a command without data; its CID replaced) without waiting for its
    /// completion, for commands the target holds; returns the CID.
    pub fn submit(&mut self, mut sqe: Sqe) -> u16 {
        let cid = self.next_cid();
        sqe.0[2..4].copy_from_slice(&cid.to_le_bytes());
        sqe.set_sgl(SGL_TRANSPORT_DATA_BLOCK, 0, 0);
        let capsule = pdu::capsule_cmd(self.digests, &sqe.0, &[]);
        self.send(&capsule);
        cid
    }

    /// The next PDU, which must be a response capsule.
    pub fn response(&mut self) -> Cqe {
        let p = self.recv().expect("target closed the connection");
        assert_eq!(
            PduType::from_u8(p.kind()),
            Some(PduType::CapsuleResp),
            "{:?}",
            &p.bytes[..p.bytes.len().min(32)]
        );
        Cqe::decode(&p.bytes[8..24])
    }

    /// Sends `data` for an R2T in H2CData PDUs of at most MAXH2CDATA.
    pub fn send_h2c(&mut self, cid: u16, ttag: u16, offset: u32, data: &[u8]) {
        let max = self.maxh2cdata as usize;
        let mut sent = 0;
        while sent < data.len() {
            let n = (data.len() - sent).min(max);
            let last = sent + n == data.len();
            let chunk = &data[sent..sent + n];
            let mut pdu = pdu::data_pdu_header(
                PduType::H2CData,
                self.digests,
                4,
                if last { FLAG_DATA_LAST } else { 0 },
                DataHeader {
                    cccid: cid,
                    ttag,
                    offset: offset + sent as u32,
                    length: n as u32,
                },
            );
            pdu.extend_from_slice(chunk);
            if self.digests.data {
                pdu.extend_from_slice(&pdu::digest(chunk));
            }
            self.send(&pdu);
            sent += n;
        }
    }

    /// Fabrics Connect; returns the completion.
    #[allow(clippy::too_many_arguments)]
    pub fn fabric_connect(
        &mut self,
        qid: u16,
        sqsize: u16,
        subnqn: &str,
        hostnqn: &str,
        cntlid: u16,
        kato_ms: u32,
        cattr: u8,
    ) -> Cqe {
        let mut sqe = Sqe::new(FABRICS, 0);
        sqe.0[4] = fctype::CONNECT;
        le::put_u16(&mut sqe.0, 42, qid);
        le::put_u16(&mut sqe.0, 44, sqsize);
        sqe.0[46] = cattr;
        le::put_u32(&mut sqe.0, 48, kato_ms);
        let mut data = vec![0u8; 1024];
        data[..16].copy_from_slice(&HOSTID);
        le::put_u16(&mut data, 16, cntlid);
        le::put_str0(&mut data, 256, 256, subnqn);
        le::put_str0(&mut data, 512, 256, hostnqn);
        let saved = self.in_capsule;
        self.in_capsule = 8192;
        let done = self.command(sqe, &data, 0);
        self.in_capsule = saved;
        let cqe = done.cqe.expect("connect response");
        if cqe.status.is_success() {
            self.cntlid = cqe.dw0 as u16;
        }
        cqe
    }

    pub fn prop_get(&mut self, offset: u32, eight: bool) -> Done {
        let mut sqe = Sqe::new(FABRICS, 0);
        sqe.0[4] = fctype::PROPERTY_GET;
        sqe.0[40] = u8::from(eight);
        le::put_u32(&mut sqe.0, 44, offset);
        self.command(sqe, &[], 0)
    }

    pub fn prop_set(&mut self, offset: u32, value: u32) -> Done {
        let mut sqe = Sqe::new(FABRICS, 0);
        sqe.0[4] = fctype::PROPERTY_SET;
        le::put_u32(&mut sqe.0, 44, offset);
        le::put_u64(&mut sqe.0, 48, u64::from(value));
        self.command(sqe, &[], 0)
    }

    /// Authentication Send of `msg` (DH-HMAC-CHAP).
    pub fn auth_send(&mut self, msg: &[u8]) -> Done {
        let mut sqe = auth_sqe(fctype::AUTH_SEND);
        sqe.set_cdw(11, msg.len() as u32);
        self.command(sqe, msg, 0)
    }

    /// Authentication Receive of `al` bytes.
    pub fn auth_receive(&mut self, al: u32) -> Done {
        let mut sqe = auth_sqe(fctype::AUTH_RECV);
        sqe.set_cdw(11, al);
        self.command(sqe, &[], al)
    }

    /// Runs the host's side of DH-HMAC-CHAP as the Linux host does (t_id, the three
    /// hashes and six groups it offers, a Reply with the response, a challenge of its
    /// own when `ctrl_key` is given) and returns what the controller answered last.
    pub fn authenticate(
        &mut self,
        hostnqn: &str,
        subnqn: &str,
        key: &DhchapKey,
        ctrl_key: Option<&DhchapKey>,
    ) -> AuthOutcome {
        let t_id = 7;
        let done = self.auth_send(&negotiate(t_id, &[1, 2, 3], &[0, 1, 2, 3, 4, 5]));
        assert!(done.status().is_success(), "negotiate: {}", done.status());
        let challenge = self.auth_receive(4096);
        assert!(challenge.status().is_success());
        let c = &challenge.data;
        if c[1] != 0x01 {
            return AuthOutcome::Failure1(c[7]);
        }
        assert_eq!(le::u16(c, 4), t_id, "challenge t_id");
        let hl = usize::from(c[6]);
        let hash = Hash::from_id(c[8]).expect("a known hash");
        assert_eq!(hl, hash.digest_len());
        let group = DhGroup::from_id(c[9]).expect("a group we offered");
        let dhvlen = usize::from(le::u16(c, 10));
        assert_eq!(dhvlen, group.value_len(), "the group's value length");
        self.last_dh_group = group;
        let seqnum = le::u32(c, 12);
        // With a DH group: our key pair, the shared value, augmented challenges.
        let (ours, shared) = match group {
            DhGroup::Null => (Vec::new(), None),
            g => {
                let pair = DhKeyPair::generate(g).unwrap();
                let z = pair.shared_secret(&c[16 + hl..16 + hl + dhvlen]).unwrap();
                (pair.public().to_vec(), Some(z))
            }
        };
        let augment = |challenge: &[u8]| match &shared {
            None => challenge.to_vec(),
            Some(z) => augmented_challenge(hash, z, challenge),
        };
        let c1 = &augment(&c[16..16 + hl]);
        let exchange = |challenge, seqnum| dhchap::Exchange {
            hash,
            challenge,
            seqnum,
            t_id,
            hostnqn,
            subnqn,
        };
        let r1 = exchange(c1, seqnum).host_response(key);
        let c2 = vec![0x5Au8; hl];
        let s2 = 0x0102_0304u32;
        let done = self.auth_send(&dhchap::reply(
            t_id,
            &r1,
            ctrl_key.map(|_| (&c2[..], s2)),
            &ours,
        ));
        assert!(done.status().is_success(), "reply: {}", done.status());
        let success1 = self.auth_receive(4096);
        assert!(success1.status().is_success());
        let m = &success1.data;
        if m[1] != 0x03 {
            return AuthOutcome::Failure1(m[7]);
        }
        let Some(ctrl_key) = ctrl_key else {
            return AuthOutcome::Success {
                controller_proved: false,
            };
        };
        assert_eq!(
            m[8], 1,
            "RVALID: the controller answers the host's challenge"
        );
        let r2 = &m[16..16 + hl];
        let c2 = augment(&c2);
        let want = exchange(&c2, s2).ctrl_response(ctrl_key);
        if r2 != want.as_slice() {
            return AuthOutcome::Success {
                controller_proved: false,
            };
        }
        assert!(
            self.auth_send(&dhchap::success2(t_id))
                .status()
                .is_success()
        );
        AuthOutcome::Success {
            controller_proved: true,
        }
    }

    /// Admin connect + CC.EN + Number of Queues: a ready controller.
    pub fn admin_ready(addr: SocketAddr, digests: Digests, subnqn: &str, io_queues: u16) -> Self {
        let mut h = Self::connect(addr, digests);
        let cqe = h.fabric_connect(0, 31, subnqn, HOSTNQN, 0xFFFF, 0, 0);
        assert!(cqe.status.is_success(), "admin connect: {}", cqe.status);
        assert!(
            h.prop_set(0x14, (6 << 16) | (4 << 20) | 1)
                .status()
                .is_success()
        );
        let csts = h.prop_get(0x1C, false).cqe.unwrap().dw0;
        assert_eq!(csts & 1, 1, "CSTS.RDY");
        let mut sqe = Sqe::new(admin::SET_FEATURES, 0);
        sqe.set_cdw(10, 0x07);
        let n = u32::from(io_queues - 1);
        sqe.set_cdw(11, n | n << 16);
        assert!(h.command(sqe, &[], 0).status().is_success());
        h
    }

    /// An I/O queue of controller `cntlid`.
    pub fn io_queue(
        addr: SocketAddr,
        digests: Digests,
        subnqn: &str,
        cntlid: u16,
        qid: u16,
    ) -> Self {
        let mut h = Self::connect(addr, digests);
        let cqe = h.fabric_connect(qid, 127, subnqn, HOSTNQN, cntlid, 0, 0);
        assert!(cqe.status.is_success(), "I/O connect: {}", cqe.status);
        h
    }

    pub fn read(&mut self, nsid: u32, slba: u64, blocks: u32, block_size: u32) -> Done {
        self.command(
            rw(nvmf::cmd::io::READ, nsid, slba, blocks),
            &[],
            blocks * block_size,
        )
    }

    pub fn write(&mut self, nsid: u32, slba: u64, data: &[u8], block_size: u32) -> Done {
        let blocks = (data.len() / block_size as usize) as u32;
        self.command(rw(nvmf::cmd::io::WRITE, nsid, slba, blocks), data, 0)
    }
}

/// How a DH-HMAC-CHAP transaction ended.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthOutcome {
    /// Success1 came (and, if asked, the controller proved its secret).
    Success { controller_proved: bool },
    /// Failure1 came, with this reason code explanation.
    Failure1(u8),
}

/// An Authentication Send/Receive command naming DH-HMAC-CHAP (its length set by
/// the caller).
pub fn auth_sqe(fctype: u8) -> Sqe {
    dhchap::auth_command(fctype, 0)
}

/// An AUTH_Negotiate message offering `hashes` and `groups`.
pub fn negotiate(t_id: u16, hashes: &[u8], groups: &[u8]) -> Vec<u8> {
    dhchap::negotiate(t_id, hashes, groups)
}

/// A DH-HMAC-CHAP_Reply carrying `response` (and a challenge of the host's own).
pub fn reply(t_id: u16, response: &[u8], challenge: Option<(&[u8], u32)>) -> Vec<u8> {
    dhchap::reply(t_id, response, challenge, &[])
}

/// A read/write-shaped command.
pub fn rw(opcode: u8, nsid: u32, slba: u64, blocks: u32) -> Sqe {
    let mut sqe = Sqe::new(opcode, 0);
    sqe.set_nsid(nsid);
    sqe.set_cdw(10, slba as u32);
    sqe.set_cdw(11, (slba >> 32) as u32);
    sqe.set_cdw(12, blocks - 1);
    sqe
}

/// A deterministic pattern.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
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
