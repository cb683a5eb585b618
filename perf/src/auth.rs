//! The host's side of DH-HMAC-CHAP in-band authentication, run on a queue whose
//! Connect said the target requires it: Negotiate (SHA-256/384/512, the NULL DH
//! group), the challenge answered with the host's secret, and, with a controller
//! secret, a challenge of our own that the target must answer (bidirectional).

use anyhow::{Context, bail, ensure};
use nvmf::cmd::{FABRICS, Sqe, fctype};
use nvmf::dhchap::{self, DhchapKey, Hash};
use nvmf::le;

use crate::session::Session;

/// The secrets a host authenticates with.
#[derive(Debug, Clone)]
pub struct HostSecrets {
    /// The host's secret.
    pub key: DhchapKey,
    /// The controller's secret: the target must prove it holds it.
    pub ctrl_key: Option<DhchapKey>,
}

/// Largest message fetched.
const ALLOCATION: u32 = 4096;

/// Failure reasons a target reports (Failure1's reason code explanation).
fn failure_reason(code: u8) -> &'static str {
    match code {
        1 => "the target did not accept our response (wrong secret?)",
        3 => "secure channel concatenation mismatch",
        4 => "no hash function in common",
        5 => "no DH group in common (we offer only the NULL group)",
        6 => "the target found a message malformed",
        7 => "the target found a message out of order",
        _ => "unknown reason",
    }
}

fn auth_sqe(kind: u8, len: u32) -> Sqe {
    let mut sqe = Sqe::new(FABRICS, 0);
    sqe.0[4] = kind;
    sqe.0[41] = 0x01; // SPSP0: DH-HMAC-CHAP
    sqe.0[42] = 0x01; // SPSP1
    sqe.0[43] = 0xE9; // SECP: NVMe in-band authentication
    sqe.set_cdw(11, len);
    sqe
}

fn send(s: &mut Session, msg: &[u8], what: &str) -> anyhow::Result<()> {
    let done = s.command(auth_sqe(fctype::AUTH_SEND, msg.len() as u32), msg, 0)?;
    ensure!(
        done.status().is_success(),
        "authentication {what}: {}",
        done.status()
    );
    Ok(())
}

/// Fetches the next message; a Failure1 is an error naming the target's reason.
fn receive(s: &mut Session, t_id: u16, expect: u8, what: &str) -> anyhow::Result<Vec<u8>> {
    let done = s.command(auth_sqe(fctype::AUTH_RECV, ALLOCATION), &[], ALLOCATION)?;
    ensure!(
        done.status().is_success(),
        "authentication {what}: {}",
        done.status()
    );
    let m = done.data;
    ensure!(m.len() >= 16, "authentication {what}: {} bytes", m.len());
    if (m[0], m[1]) == (0x00, 0xF1) {
        bail!("authentication refused: {}", failure_reason(m[7]));
    }
    ensure!(
        (m[0], m[1]) == (0x01, expect),
        "authentication {what}: unexpected message {:#04x}/{:#04x}",
        m[0],
        m[1]
    );
    ensure!(
        le::u16(&m, 4) == t_id,
        "authentication {what}: wrong transaction ID"
    );
    Ok(m)
}

/// Authenticates the queue `s` of `hostnqn` to `subnqn`, transaction `t_id`.
pub fn authenticate(
    s: &mut Session,
    secrets: &HostSecrets,
    hostnqn: &str,
    subnqn: &str,
    t_id: u16,
) -> anyhow::Result<()> {
    let mut negotiate = vec![0u8; 72];
    le::put_u16(&mut negotiate, 4, t_id);
    negotiate[7] = 1; // one protocol descriptor
    negotiate[8] = 0x01; // DH-HMAC-CHAP
    negotiate[10] = 3;
    negotiate[11] = 1;
    negotiate[12..15].copy_from_slice(&[1, 2, 3]); // SHA-256, -384, -512
    negotiate[42] = 0; // the NULL DH group
    send(s, &negotiate, "negotiate")?;

    let c = receive(s, t_id, 0x01, "challenge")?;
    let hash = Hash::from_id(c[8]).context("the target chose a hash we did not offer")?;
    let hl = hash.digest_len();
    ensure!(
        usize::from(c[6]) == hl && c.len() >= 16 + hl,
        "challenge of the wrong length"
    );
    ensure!(
        c[9] == 0 && le::u16(&c, 10) == 0,
        "the target chose a DH group we did not offer"
    );
    let seqnum = le::u32(&c, 12);
    let response = dhchap::host_response(
        hash,
        &secrets.key,
        &c[16..16 + hl],
        seqnum,
        t_id,
        hostnqn,
        subnqn,
    );

    let mut reply = vec![0u8; 16 + 2 * hl];
    reply[0] = 0x01;
    reply[1] = 0x02;
    le::put_u16(&mut reply, 4, t_id);
    reply[6] = hl as u8;
    reply[16..16 + hl].copy_from_slice(&response);
    let mut challenge = vec![0u8; hl];
    let seqnum2 = rand_u32()?.max(1);
    if secrets.ctrl_key.is_some() {
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut challenge)
            .map_err(|_| anyhow::anyhow!("no random bytes for a challenge"))?;
        reply[8] = 1; // CVALID: prove yourself too
        le::put_u32(&mut reply, 12, seqnum2);
        reply[16 + hl..].copy_from_slice(&challenge);
    }
    send(s, &reply, "reply")?;

    let ok = receive(s, t_id, 0x03, "success")?;
    let Some(ctrl_key) = &secrets.ctrl_key else {
        return Ok(());
    };
    ensure!(
        ok[8] == 1 && ok.len() >= 16 + hl,
        "the target did not answer our challenge"
    );
    let r2 = &ok[16..16 + hl];
    if !dhchap::verify_ctrl_response(
        hash, ctrl_key, &challenge, seqnum2, t_id, hostnqn, subnqn, r2,
    ) {
        let mut failure2 = vec![0u8; 16];
        failure2[1] = 0xF0;
        le::put_u16(&mut failure2, 4, t_id);
        failure2[6] = 0x01;
        failure2[7] = 0x01;
        let _ = send(s, &failure2, "failure");
        bail!("the target could not prove the controller secret: refusing it");
    }
    let mut success2 = vec![0u8; 16];
    success2[0] = 0x01;
    success2[1] = 0x04;
    le::put_u16(&mut success2, 4, t_id);
    send(s, &success2, "confirmation")
}

fn rand_u32() -> anyhow::Result<u32> {
    let mut b = [0u8; 4];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| anyhow::anyhow!("no random bytes"))?;
    Ok(u32::from_le_bytes(b))
}
