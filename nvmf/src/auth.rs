//! One queue's DH-HMAC-CHAP transaction, as the controller runs it: the host's
//! Authentication Send commands carry Negotiate, Reply and Success2 messages; its
//! Authentication Receive commands fetch Challenge, Success1 or Failure1.
//!
//! Diffie-Hellman groups: the one configured for the host if it offers it, else the
//! NULL group (the challenge used as it is, as the Linux target does by default),
//! else ffdhe2048, 3072 or 4096 as offered ([`crate::ffdhe`]). A check that
//! fails in a Send completes the command successfully and makes the next Receive
//! return Failure1, after which the connection closes, as the specification orders.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::dhchap::{self, Hash, HostKeys};
use crate::le;

pub(crate) use crate::dhchap::{SECP, SPSP};
use crate::dhchap::{id, kind, message};
use crate::ffdhe::{DhGroup, DhKeyPair, augmented_challenge};

/// Largest Authentication Receive allocation length served.
pub(crate) const MAX_RECEIVE: u32 = 8192;
/// Largest Authentication Send accepted (a Reply with SHA-512 is 144 bytes).
pub(crate) const MAX_SEND: u32 = 4096;

/// Why authentication failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The response did not prove the secret.
    Failed,
    /// The host asked the controller to prove a secret; none is configured for it.
    NoControllerKey,
    /// The host gave up (Failure2), e.g. refusing the controller's proof.
    HostGaveUp,
    /// The host did not authenticate in time.
    TimedOut,
    /// Secure channel concatenation asked for; not supported.
    ConcatMismatch,
    /// None of the host's hash functions is usable.
    HashUnusable,
    /// The host does not offer the NULL DH group.
    DhGroupUnusable,
    /// A message's fields are wrong.
    IncorrectPayload,
    /// A message came out of order.
    IncorrectMessage,
}

impl Failure {
    /// What the audit log says.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::Failed => "authentication failed: wrong response (secret)",
            Self::NoControllerKey => {
                "authentication failed: the host asked for a controller secret; none configured"
            }
            Self::HostGaveUp => "authentication failed: the host gave up (controller secret?)",
            Self::TimedOut => "authentication failed: timed out",
            Self::ConcatMismatch => "authentication failed: secure channel concatenation",
            Self::HashUnusable => "authentication failed: no usable hash",
            Self::DhGroupUnusable => "authentication failed: NULL DH group not offered",
            Self::IncorrectPayload => "authentication failed: malformed message",
            Self::IncorrectMessage => "authentication failed: message out of order",
        }
    }

    /// Failure1's reason code explanation.
    fn code(self) -> u8 {
        match self {
            Self::Failed | Self::NoControllerKey | Self::HostGaveUp | Self::TimedOut => 1,
            Self::ConcatMismatch => 3,
            Self::HashUnusable => 4,
            Self::DhGroupUnusable => 5,
            Self::IncorrectPayload => 6,
            Self::IncorrectMessage => 7,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// Waiting for (or after, for a new transaction) Negotiate.
    Negotiate,
    /// Negotiated: the host fetches the challenge.
    Challenge,
    /// Challenge sent: the host sends its reply.
    Reply,
    /// Reply verified: the host fetches Success1 (with the controller's response).
    Success1(Option<Vec<u8>>),
    /// Bidirectional: the host confirms the controller's response.
    Success2,
    /// Failed: the host fetches Failure1, then the connection closes.
    Failure1(Failure),
    /// Authenticated (a new Negotiate starts again).
    Done,
}

/// What a Receive returns, and what happens after it is sent.
pub(crate) struct Received {
    /// The message (the command's data, padded with zeros to its allocation length).
    pub message: Vec<u8>,
    /// Authentication failed: close the connection once the message is out.
    pub close: bool,
}

/// One queue's authentication.
pub(crate) struct Transaction {
    keys: Arc<HostKeys>,
    subnqn: String,
    step: Step,
    t_id: u16,
    hash: Hash,
    challenge: Vec<u8>,
    seqnum: u32,
    /// The negotiated Diffie-Hellman group, and this side's key pair in it.
    group: DhGroup,
    dh: Option<DhKeyPair>,
    authenticated: bool,
    reported: bool,
}

impl Transaction {
    /// A queue of `keys.hostnqn` to `subnqn` that must authenticate before it is used.
    pub(crate) fn new(keys: Arc<HostKeys>, subnqn: &str) -> Self {
        let hash = keys.hash;
        Self {
            keys,
            subnqn: subnqn.to_string(),
            step: Step::Negotiate,
            t_id: 0,
            hash,
            challenge: Vec::new(),
            seqnum: 0,
            group: DhGroup::Null,
            dh: None,
            authenticated: false,
            reported: false,
        }
    }

    /// Whether the host has proved its secret (and, if it asked, heard the
    /// controller's proof).
    pub(crate) fn authenticated(&self) -> bool {
        self.authenticated
    }

    /// The host's NQN.
    pub(crate) fn hostnqn(&self) -> &str {
        &self.keys.hostnqn
    }

    /// The subsystem's NQN.
    pub(crate) fn subnqn(&self) -> &str {
        &self.subnqn
    }

    /// How the transaction ended, once: `Some(Ok)` when it completed, `Some(Err)`
    /// when it failed, then `None` until a new transaction ends.
    pub(crate) fn take_outcome(&mut self) -> Option<Result<(), Failure>> {
        let outcome = match self.step {
            Step::Done if self.authenticated => Ok(()),
            Step::Failure1(f) => Err(f),
            _ => return None,
        };
        if self.reported {
            return None;
        }
        self.reported = true;
        Some(outcome)
    }

    /// Whether the transaction failed (the connection is to be closed).
    pub(crate) fn failed(&self) -> bool {
        matches!(self.step, Step::Failure1(_))
    }

    /// An Authentication Send's message. Returns `Err` only when the host itself
    /// gave up (Failure2): close the connection. A check that fails here makes the
    /// next Receive return Failure1 (see [`Self::failure`]); a failed transaction
    /// stays failed.
    pub(crate) fn send(&mut self, msg: &[u8]) -> Result<(), Failure> {
        if let Step::Failure1(_) = self.step {
            return Ok(());
        }
        let (Some(&kind), Some(&id)) = (msg.first(), msg.get(1)) else {
            self.step = Step::Failure1(Failure::IncorrectPayload);
            return Ok(());
        };
        match (kind, id) {
            (kind::COMMON, id::NEGOTIATE) => {
                // Any other step: a Negotiate starts a transaction (re-authentication).
                self.reported = false;
                self.step = match self.negotiate(msg) {
                    Ok(()) => Step::Challenge,
                    Err(f) => Step::Failure1(f),
                };
            }
            (kind::COMMON, id::FAILURE2) => return Err(Failure::HostGaveUp),
            (kind::DHCHAP, id::REPLY) if self.step == Step::Reply => {
                self.step = match self.reply(msg) {
                    Ok(step) => step,
                    Err(f) => Step::Failure1(f),
                };
            }
            (kind::DHCHAP, id::SUCCESS2) if self.step == Step::Success2 => {
                self.step = if msg.len() >= 16 && le::u16(msg, 4) == self.t_id {
                    self.authenticated = true;
                    Step::Done
                } else {
                    Step::Failure1(Failure::IncorrectPayload)
                };
            }
            _ => self.step = Step::Failure1(Failure::IncorrectMessage),
        }
        Ok(())
    }

    /// An Authentication Receive of `al` bytes: the message the current step owes.
    pub(crate) fn receive(&mut self, al: usize) -> Received {
        let message = match std::mem::replace(&mut self.step, Step::Negotiate) {
            Step::Challenge => {
                self.challenge = vec![0u8; self.hash.digest_len()];
                if dhchap::random_bytes(&mut self.challenge).is_err() {
                    return self.failure(Failure::Failed, al);
                }
                self.seqnum = next_seqnum();
                self.dh = match self.group {
                    DhGroup::Null => None,
                    group => match DhKeyPair::generate(group) {
                        Ok(pair) => Some(pair),
                        Err(_) => return self.failure(Failure::Failed, al),
                    },
                };
                let dh_value = self.dh.as_ref().map_or(&[][..], DhKeyPair::public);
                let mut m = message(kind::DHCHAP, id::CHALLENGE, self.t_id, 16);
                m[6] = self.hash.digest_len() as u8;
                m[8] = self.hash.id();
                m[9] = self.group.id();
                le::put_u16(&mut m, 10, dh_value.len() as u16);
                le::put_u32(&mut m, 12, self.seqnum);
                m.extend_from_slice(&self.challenge);
                m.extend_from_slice(dh_value);
                self.step = Step::Reply;
                m
            }
            Step::Success1(r2) => {
                let mut m = message(kind::DHCHAP, id::SUCCESS1, self.t_id, 16);
                m[6] = self.hash.digest_len() as u8;
                match r2 {
                    Some(r2) => {
                        m[8] = 1; // RVALID
                        m.extend_from_slice(&r2);
                        self.step = Step::Success2;
                    }
                    None => self.step = Step::Done,
                }
                m
            }
            Step::Failure1(f) => return self.failure(f, al),
            Step::Done => {
                self.step = Step::Done;
                return self.failure(Failure::IncorrectMessage, al);
            }
            Step::Negotiate | Step::Reply | Step::Success2 => {
                return self.failure(Failure::IncorrectMessage, al);
            }
        };
        if message.len() > al {
            return self.failure(Failure::IncorrectPayload, al);
        }
        Received {
            message: padded(message, al),
            close: false,
        }
    }

    fn failure(&mut self, f: Failure, al: usize) -> Received {
        self.step = Step::Failure1(f);
        let mut m = message(kind::COMMON, id::FAILURE1, self.t_id, 8);
        m[6] = 0x01; // reason code: authentication failure
        m[7] = f.code();
        Received {
            message: padded(m, al),
            close: true,
        }
    }

    fn negotiate(&mut self, msg: &[u8]) -> Result<(), Failure> {
        if msg.len() < 8 + 64 {
            return Err(Failure::IncorrectPayload);
        }
        self.t_id = le::u16(msg, 4);
        if msg[6] != 0 {
            return Err(Failure::ConcatMismatch);
        }
        if msg[7] != 1 {
            return Err(Failure::HashUnusable);
        }
        let (authid, halen, dhlen) = (msg[8], usize::from(msg[10]), usize::from(msg[11]));
        if authid != kind::DHCHAP || halen > 30 || dhlen > 30 {
            return Err(Failure::IncorrectPayload);
        }
        let hashes = &msg[12..12 + halen];
        let groups = &msg[42..42 + dhlen];
        self.hash = if hashes.contains(&self.keys.hash.id()) {
            self.keys.hash
        } else {
            hashes
                .iter()
                .find_map(|&id| Hash::from_id(id))
                .ok_or(Failure::HashUnusable)?
        };
        // The configured group if offered; else NULL if offered; else the first
        // offered that is supported.
        let offered = |g: DhGroup| groups.contains(&g.id());
        self.group = if offered(self.keys.dhgroup) {
            self.keys.dhgroup
        } else if offered(DhGroup::Null) {
            DhGroup::Null
        } else {
            groups
                .iter()
                .find_map(|&id| DhGroup::from_id(id))
                .ok_or(Failure::DhGroupUnusable)?
        };
        Ok(())
    }

    fn reply(&mut self, msg: &[u8]) -> Result<Step, Failure> {
        if msg.len() < 16 {
            return Err(Failure::IncorrectPayload);
        }
        let hl = usize::from(msg[6]);
        let dhvlen = usize::from(le::u16(msg, 10));
        if le::u16(msg, 4) != self.t_id
            || hl != self.hash.digest_len()
            || dhvlen != self.group.value_len()
            || msg.len() < 16 + 2 * hl + dhvlen
        {
            return Err(Failure::IncorrectPayload);
        }
        let (response, c2) = (&msg[16..16 + hl], &msg[16 + hl..16 + 2 * hl]);
        let host_value = &msg[16 + 2 * hl..16 + 2 * hl + dhvlen];
        // With a DH group, each response answers the challenge augmented with the
        // shared value.
        let shared = match &self.dh {
            None => None,
            Some(pair) => Some(
                pair.shared_secret(host_value)
                    .map_err(|_| Failure::IncorrectPayload)?,
            ),
        };
        let hash = self.hash;
        let augment = |c: &[u8]| match &shared {
            None => c.to_vec(),
            Some(z) => augmented_challenge(hash, z, c),
        };
        let exchange = |challenge, seqnum| dhchap::Exchange {
            hash: self.hash,
            challenge,
            seqnum,
            t_id: self.t_id,
            hostnqn: &self.keys.hostnqn,
            subnqn: &self.subnqn,
        };
        let c1 = augment(&self.challenge);
        let proved = exchange(&c1, self.seqnum).host_proved(&self.keys.key, response);
        if !proved {
            return Err(Failure::Failed);
        }
        if msg[8] == 0 {
            self.authenticated = true;
            return Ok(Step::Success1(None));
        }
        // The host asks the controller to prove its own secret.
        let Some(ctrl_key) = &self.keys.ctrl_key else {
            return Err(Failure::NoControllerKey);
        };
        let s2 = le::u32(msg, 12);
        let c2 = augment(c2);
        Ok(Step::Success1(Some(
            exchange(&c2, s2).ctrl_response(ctrl_key),
        )))
    }
}

/// `m` zero-padded to `al` bytes (a Failure1 of 8 always fits: `al` is at least 16).
fn padded(mut m: Vec<u8>, al: usize) -> Vec<u8> {
    m.resize(al, 0);
    m
}

/// Sequence numbers for challenges: one counter for the process, starting at a
/// random value, never 0.
fn next_seqnum() -> u32 {
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let counter = NEXT.get_or_init(|| {
        let mut b = [0u8; 4];
        let _ = dhchap::random_bytes(&mut b);
        AtomicU32::new(u32::from_le_bytes(b))
    });
    loop {
        let s = counter.fetch_add(1, Ordering::Relaxed);
        if s != 0 {
            return s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dhchap::DhchapKey;

    fn transaction() -> Transaction {
        let keys = HostKeys {
            hostnqn: "nqn.2026-11.io.ox:h".into(),
            key: DhchapKey::generate(32, Some(Hash::Sha256)).unwrap_or_else(|e| panic!("{e}")),
            ctrl_key: Some(DhchapKey::generate(32, None).unwrap_or_else(|e| panic!("{e}"))),
            hash: Hash::Sha256,
            dhgroup: DhGroup::Ffdhe2048,
        };
        Transaction::new(Arc::new(keys), "nqn.2026-11.io.ox:s")
    }

    /// Random messages, truncated valid ones and valid headers with random bodies, in
    /// random order with receives between: never a panic, never authenticated, every
    /// receive exactly its allocation length, and a failed transaction stays failed.
    #[test]
    fn hostile_messages_never_panic_or_authenticate() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2000 {
            let mut t = transaction();
            for _ in 0..20 {
                let len = (next() % 200) as usize;
                let mut m: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                match next() % 4 {
                    0 => {
                        let valid = dhchap::negotiate(1, &[1, 2, 3], &[0]);
                        m = valid[..(next() as usize % (valid.len() + 1))].to_vec();
                    }
                    1 if m.len() >= 2 => {
                        m[0] = kind::DHCHAP;
                        m[1] = id::REPLY;
                    }
                    2 if m.len() >= 2 => {
                        m[0] = kind::COMMON;
                        m[1] = id::NEGOTIATE;
                    }
                    _ => {}
                }
                let was_failed = t.failed();
                let _ = t.send(&m);
                assert!(
                    !was_failed || t.failed(),
                    "a failed transaction stays failed"
                );
                if next() % 2 == 0 {
                    let al = 16 + (next() % 4096) as usize;
                    let r = t.receive(al);
                    assert_eq!(r.message.len(), al);
                    assert!(!r.close || t.failed());
                }
                assert!(!t.authenticated(), "no response proved the secret");
            }
        }
    }
}
