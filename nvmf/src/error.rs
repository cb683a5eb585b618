//! Errors of the NVMe/TCP target.

use std::net::SocketAddr;

/// What can go wrong setting up or running the target. Protocol errors from hosts are
/// not here: they become NVMe status codes or terminated connections.
#[derive(Debug, thiserror::Error)]
pub enum NvmfError {
    /// The configuration is inconsistent.
    #[error("invalid NVMe/TCP target configuration: {0}")]
    Config(String),
    /// A listener could not be opened.
    #[error("cannot listen on {addr}: {cause}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        cause: std::io::Error,
    },
    /// A reactor refused work.
    #[error(transparent)]
    Reactor(#[from] reactor::ReactorError),
}
