//! The OX appliance: what `oxd` and `oxctl` share — the control API's wire protocol
//! ([`api`]), TLS for it over TCP ([`tls`]) and the hash-chained audit log ([`audit`]).

pub mod api;
pub mod audit;
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
