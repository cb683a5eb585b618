//! The host's side of DH-HMAC-CHAP in-band authentication, run on a queue whose
//! Connect said the target requires it: Negotiate (SHA-256/384/512; the NULL group and
//! ffdhe2048/3072/4096), the challenge answered with the host's secret (augmented with
//! the Diffie-Hellman value the target chose a group for), and, with a controller
//! secret, a challenge of our own that the target must answer (bidirectional).

use anyhow::{Context, anyhow, bail, ensure};
use nvmf_wire::cmd::fctype;
use nvmf_wire::dhchap::{self, DhchapKey, Hash, id, kind};
use nvmf_wire::ffdhe::{DhGroup, DhKeyPair, augmented_challenge};
use nvmf_wire::le;

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

fn send(s: &mut Session, msg: &[u8], what: &str) -> anyhow::Result<()> {
    let sqe = dhchap::auth_command(fctype::AUTH_SEND, msg.len() as u32);
    let done = s.command(sqe, msg, 0)?;
    ensure!(
        done.status().is_success(),
        "authentication {what}: {}",
        done.status()
    );
    Ok(())
}

/// Fetches the next message; a Failure1 is an error naming the target's reason.
fn receive(s: &mut Session, t_id: u16, expect: u8, what: &str) -> anyhow::Result<Vec<u8>> {
    let sqe = dhchap::auth_command(fctype::AUTH_RECV, ALLOCATION);
    let done = s.command(sqe, &[], ALLOCATION)?;
    ensure!(
        done.status().is_success(),
        "authentication {what}: {}",
        done.status()
    );
    let m = done.data;
    ensure!(m.len() >= 16, "authentication {what}: {} bytes", m.len());
    if (m[0], m[1]) == (kind::COMMON, id::FAILURE1) {
        bail!("authentication refused: {}", failure_reason(m[7]));
    }
    ensure!(
        (m[0], m[1]) == (kind::DHCHAP, expect),
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
    let hashes = [Hash::Sha256.id(), Hash::Sha384.id(), Hash::Sha512.id()];
    let groups: Vec<u8> = DhGroup::ALL.iter().map(|g| g.id()).collect();
    send(s, &dhchap::negotiate(t_id, &hashes, &groups), "negotiate")?;

    let c = receive(s, t_id, id::CHALLENGE, "challenge")?;
    let hash = Hash::from_id(c[8]).context("the target chose a hash we did not offer")?;
    let hl = hash.digest_len();
    ensure!(
        usize::from(c[6]) == hl && c.len() >= 16 + hl,
        "challenge of the wrong length"
    );
    let group = DhGroup::from_id(c[9]).context("the target chose a DH group we did not offer")?;
    let dhvlen = usize::from(le::u16(&c, 10));
    ensure!(
        dhvlen == group.value_len() && c.len() >= 16 + hl + dhvlen,
        "a Diffie-Hellman value of the wrong length"
    );
    let seqnum = le::u32(&c, 12);
    // With a DH group: our key pair, the shared value, and every challenge augmented.
    let (our_value, shared) = match group {
        DhGroup::Null => (Vec::new(), None),
        g => {
            let pair = DhKeyPair::generate(g)?;
            let z = pair
                .shared_secret(&c[16 + hl..16 + hl + dhvlen])
                .context("the target's Diffie-Hellman value")?;
            (pair.public().to_vec(), Some(z))
        }
    };
    let augment = |challenge: &[u8]| match &shared {
        None => challenge.to_vec(),
        Some(z) => augmented_challenge(hash, z, challenge),
    };
    let exchange = |challenge, seqnum| dhchap::Exchange {
        hash,
        challenge,
        seqnum,
        t_id,
        hostnqn,
        subnqn,
    };
    let c1 = augment(&c[16..16 + hl]);
    let response = exchange(&c1, seqnum).host_response(&secrets.key);

    // Bidirectional: a challenge of our own, which the target must answer.
    let mut challenge = vec![0u8; hl];
    let mut seq = [0u8; 4];
    dhchap::random_bytes(&mut challenge)?;
    dhchap::random_bytes(&mut seq)?;
    let seqnum2 = u32::from_le_bytes(seq).max(1);
    let ours = secrets.ctrl_key.as_ref().map(|_| (&challenge[..], seqnum2));
    send(
        s,
        &dhchap::reply(t_id, &response, ours, &our_value),
        "reply",
    )?;

    // A target that refuses our response may end the connection instead of (or right
    // after) sending its Failure1: that is a refusal too, not a transport error.
    let ok = receive(s, t_id, id::SUCCESS1, "success").map_err(|e| {
        if e.chain().any(|c| c.is::<crate::session::Closed>()) {
            anyhow!("authentication refused: the target closed the connection after our reply")
        } else {
            e
        }
    })?;
    let Some(ctrl_key) = &secrets.ctrl_key else {
        return Ok(());
    };
    ensure!(
        ok[8] == 1 && ok.len() >= 16 + hl,
        "the target did not answer our challenge"
    );
    let r2 = &ok[16..16 + hl];
    let c2 = augment(&challenge);
    if !exchange(&c2, seqnum2).ctrl_proved(ctrl_key, r2) {
        let _ = send(s, &dhchap::failure2(t_id, 0x01), "failure");
        bail!("the target could not prove the controller secret: refusing it");
    }
    send(s, &dhchap::success2(t_id), "confirmation")
}
