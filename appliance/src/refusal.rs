//! Why the service refused a request, in the three kinds a client can act on
//! differently: fix the request, look again, or wait (or pick another name). The
//! control API turns each into its own error code; any other error is the daemon's
//! failure (-32603).

/// A request the service refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// A parameter is wrong or names what the configuration does not allow.
    #[error("{0}")]
    Invalid(String),
    /// What the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// It clashes with what exists or is running now: exists already, busy, in use.
    #[error("{0}")]
    Conflict(String),
}

/// Returns `Refusal::Invalid` with a formatted message.
macro_rules! invalid {
    ($($t:tt)*) => { return Err($crate::refusal::Refusal::Invalid(format!($($t)*)).into()) };
}

/// Returns `Refusal::NotFound` with a formatted message.
macro_rules! not_found {
    ($($t:tt)*) => { return Err($crate::refusal::Refusal::NotFound(format!($($t)*)).into()) };
}

/// Returns `Refusal::Conflict` with a formatted message.
macro_rules! conflict {
    ($($t:tt)*) => { return Err($crate::refusal::Refusal::Conflict(format!($($t)*)).into()) };
}

pub(crate) use {conflict, invalid, not_found};

/// A name as shown in a message: at most 64 characters (a 10 KB name is not echoed).
pub fn shown(name: &str) -> String {
    const MAX: usize = 64;
    match name.char_indices().nth(MAX) {
        None => format!("{name:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &name[..cut], name.len()),
    }
}
