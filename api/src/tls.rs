//! TLS for the control API over TCP (rustls with the ring provider, TLS 1.2 and 1.3):
//! the daemon's certificate and key from PEM files, a client's trust from a PEM bundle
//! (a CA, or the daemon's self-signed certificate itself), and a stream both halves of
//! a request/response loop can use.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, StreamOwned};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{what} {path}: {reason}")]
    Pem {
        /// Which file.
        what: &'static str,
        /// Where.
        path: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The address is not a name or IP a certificate can be checked against.
    #[error("{0:?} is not a host name or IP address to check the daemon's certificate for")]
    Name(String),
}

fn pem_error(what: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::Pem {
        what,
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, path, e))?;
    if certs.is_empty() {
        return Err(pem_error(what, path, "holds no certificate"));
    }
    Ok(certs)
}

/// The daemon's side: its certificate chain (a PEM file) and private key (`key_pem`,
/// read by the caller from the secret file `key`, which names it in errors).
pub fn server_config(
    cert: &Path,
    key: &Path,
    key_pem: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates("certificate", cert)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| pem_error("private key", key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// A client's side: trusts only the certificates in `ca` (PEM).
pub fn client_config(ca: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates("CA bundle", ca)? {
        roots.add(cert)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A client TLS session over `tcp` to `host` (the name or IP the daemon's certificate
/// must carry).
pub fn client_stream(
    config: Arc<ClientConfig>,
    host: &str,
    tcp: std::net::TcpStream,
) -> Result<Duplex<StreamOwned<ClientConnection, std::net::TcpStream>>, TlsError> {
    let name = ServerName::try_from(host.to_string()).map_err(|_| TlsError::Name(host.into()))?;
    let conn = ClientConnection::new(config, name)?;
    Ok(Duplex::new(StreamOwned::new(conn, tcp)))
}

/// One stream shared by a reader and a writer that take turns (a TLS session cannot
/// be split like a socket).
pub struct Duplex<S>(Arc<Mutex<S>>);

impl<S> Duplex<S> {
    /// Wraps `stream`.
    pub fn new(stream: S) -> Self {
        Self(Arc::new(Mutex::new(stream)))
    }
}

impl<S> Clone for Duplex<S> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<S: Read> Read for Duplex<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).read(buf)
    }
}

impl<S: Write> Write for Duplex<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}
