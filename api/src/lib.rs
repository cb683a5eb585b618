//! The OX appliance's control API as its clients see it: what `oxd`, `oxctl` and other
//! clients share — the wire protocol and a client ([`api`]), every method's typed
//! parameters ([`methods`]), TLS for the API over TCP ([`tls`]) and the hash-chained
//! audit log ([`audit`]). It depends on none of the daemon's engine (reactors, devices,
//! object exchange), so a client builds small.
//!
//! Hand-written where a library would not do better: the JSON-RPC framing (one request
//! or response per line, a few dozen lines over serde) and the blocking client.

pub mod api;
pub mod audit;
pub mod methods;
pub mod tls;

/// An error and its causes on one line, "outer: inner: ...", leaving out a cause
/// whose text the message before it already ends with (many errors print their source
/// in their own message too).
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
