//! The control API's wire protocol: JSON-RPC 2.0 over a Unix socket, one request or
//! response per line. Method names follow SPDK's style (`bdev_get_bdevs`,
//! `nvmf_get_subsystems`); `ox_get_version` reports [`API_VERSION`], which changes only
//! when a method changes incompatibly. `docs/API.md` lists the methods.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Version of the control API.
pub const API_VERSION: u32 = 1;

/// Where `oxd` listens unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/oxd/oxd.sock";

/// Longest request line the daemon reads.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// JSON-RPC 2.0 error codes used by the API.
pub mod code {
    /// The line is not JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// Not a JSON-RPC 2.0 request.
    pub const INVALID_REQUEST: i64 = -32600;
    /// No such method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Parameters missing, unknown or of the wrong type.
    pub const INVALID_PARAMS: i64 = -32602;
    /// The daemon failed to do it.
    pub const INTERNAL_ERROR: i64 = -32603;
    /// The named object does not exist.
    pub const NOT_FOUND: i64 = -32001;
    /// The request was too large.
    pub const TOO_LARGE: i64 = -32002;
    /// A TCP connection did not authenticate.
    pub const UNAUTHORIZED: i64 = -32003;
    /// The request clashes with what exists or runs now (a name taken, a volume
    /// being snapshotted, a snapshot still needed): retry later or change it.
    pub const CONFLICT: i64 = -32004;
}

/// A request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// Always "2.0".
    pub jsonrpc: String,
    /// The method.
    pub method: String,
    /// Parameters (an object), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<serde_json::Value>,
    /// Request id, echoed in the response.
    #[serde(default)]
    pub id: serde_json::Value,
}

/// An error object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} (code {code})")]
pub struct RpcError {
    /// One of [`code`].
    pub code: i64,
    /// What went wrong, for people.
    pub message: String,
}

impl RpcError {
    /// An error with `code` and `message`.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// A response: `result` or `error`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Always "2.0".
    pub jsonrpc: String,
    /// The result on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The error on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RpcError>,
    /// The request's id.
    pub id: serde_json::Value,
}

/// Why a call failed on the client's side of the socket or the daemon's.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The socket could not be reached or broke.
    #[error("control socket {path}: {source}")]
    Socket {
        /// The socket.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The daemon answered something that is not a response.
    #[error("the daemon's answer is not a JSON-RPC response: {0}")]
    Garbled(String),
    /// The parameters could not be put into JSON (on this side).
    #[error("the request's parameters: {0}")]
    Params(serde_json::Error),
    /// The daemon answered with an error.
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Reads `v`, an answer to method `M`, as its typed result (fields it does not know are
/// left out); one that is not of its type is [`CallError::Garbled`], naming the field.
/// For a client that keeps the answer as it came too (to show it as is).
pub fn decode<M: crate::methods::Method>(v: &serde_json::Value) -> Result<M::Result, CallError> {
    serde_path_to_error::deserialize(v)
        .map_err(|e| CallError::Garbled(format!("{} result: {}: {}", M::NAME, e.path(), e.inner())))
}

/// A connection to the daemon's control API.
pub struct Client {
    path: String,
    reader: BufReader<Box<dyn std::io::Read + Send>>,
    writer: Box<dyn Write + Send>,
    next_id: u64,
}

impl Client {
    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> Result<Self, CallError> {
        let sock_err = |source| CallError::Socket {
            path: path.display().to_string(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(sock_err)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(600)))
            .map_err(sock_err)?;
        let writer = stream.try_clone().map_err(sock_err)?;
        Ok(Self {
            path: path.display().to_string(),
            reader: BufReader::new(Box::new(stream)),
            writer: Box::new(writer),
            next_id: 1,
        })
    }

    /// Connects to the API over TCP at `addr` ("host:port") and authenticates with
    /// `token`; over TLS when `ca` names the certificates to trust (a CA, or the
    /// daemon's own certificate), checked against `addr`'s host name or IP.
    pub fn connect_tcp(addr: &str, token: &str, ca: Option<&Path>) -> Result<Self, CallError> {
        let sock_err = |source| CallError::Socket {
            path: addr.to_string(),
            source,
        };
        let stream = std::net::TcpStream::connect(addr).map_err(sock_err)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(600)))
            .map_err(sock_err)?;
        let (reader, writer): (Box<dyn std::io::Read + Send>, Box<dyn Write + Send>) = match ca {
            None => {
                let writer = stream.try_clone().map_err(sock_err)?;
                (Box::new(stream), Box::new(writer))
            }
            Some(ca) => {
                let host = addr
                    .rsplit_once(':')
                    .map_or(addr, |(h, _)| h)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let config = crate::tls::client_config(ca)?;
                let tls = crate::tls::client_stream(config, host, stream)?;
                (Box::new(tls.clone()), Box::new(tls))
            }
        };
        let mut client = Self {
            path: addr.to_string(),
            reader: BufReader::new(reader),
            writer,
            next_id: 1,
        };
        client.request(&crate::methods::Auth {
            token: token.to_string(),
        })?;
        Ok(client)
    }

    /// Calls method `M` with `params` and returns its result, typed (fields it does not
    /// know are left out); a result that is not of its type is [`CallError::Garbled`],
    /// naming the field.
    pub fn request<M: crate::methods::Method>(
        &mut self,
        params: &M,
    ) -> Result<M::Result, CallError> {
        let v = self.invoke(params)?;
        decode::<M>(&v)
    }

    /// Calls method `M` with `params` and returns its result as JSON.
    pub fn invoke<M: crate::methods::Method>(
        &mut self,
        params: &M,
    ) -> Result<serde_json::Value, CallError> {
        let p = crate::methods::to_params(params).map_err(CallError::Params)?;
        self.call(M::NAME, Some(p))
    }

    /// Calls `method` with `params` and returns its result.
    pub fn call(
        &mut self,
        method: &str,
        params: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, CallError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = Request {
            jsonrpc: "2.0".into(),
            method: method.into(),
            params,
            id: id.into(),
        };
        let mut line = serde_json::to_vec(&req).map_err(|e| CallError::Garbled(e.to_string()))?;
        line.push(b'\n');
        let sock_err = |source| CallError::Socket {
            path: self.path.clone(),
            source,
        };
        self.writer.write_all(&line).map_err(sock_err)?;
        let mut answer = String::new();
        let n = self.reader.read_line(&mut answer).map_err(sock_err)?;
        if n == 0 {
            return Err(CallError::Garbled(
                "the daemon closed the connection".into(),
            ));
        }
        let resp: Response =
            serde_json::from_str(&answer).map_err(|e| CallError::Garbled(e.to_string()))?;
        match (resp.result, resp.error) {
            (_, Some(e)) => Err(e.into()),
            (Some(r), None) => Ok(r),
            (None, None) => Ok(serde_json::Value::Null),
        }
    }
}
