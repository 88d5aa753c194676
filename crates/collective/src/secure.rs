//! The security of a ring: the plan epoch's secret that every hello must prove
//! ([`crate::auth`]), and mutual TLS with worker certificates on every link.
//!
//! A worker needs only its credentials directory and its worker id
//! ([`RingCredentials::load`], once) and, for each plan epoch, the epoch's secret and the
//! worker id of every rank ([`Security`]). With TLS, the dialer and the listener each
//! verify that the other's certificate chains to the cluster CA and names exactly the
//! worker that the plan puts at that rank ([`phalanx_pki::peer_role`]).
use std::fmt;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use phalanx_pki::{ClientAuth, PkiError, Role, TlsDir, ALPN_COLLECTIVE};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use crate::auth::{BINDING_BYTES, BINDING_LABEL};

/// A plan epoch's collective secret (32 bytes). Its `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct EpochSecret([u8; 32]);

impl EpochSecret {
    pub fn new(bytes: [u8; 32]) -> Self {
        EpochSecret(bytes)
    }

    /// Parses 64 hex digits (the form in which the controller hands the secret out).
    pub fn from_hex(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "an epoch secret is 64 hex digits; got {} characters",
                s.len()
            ));
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|e| format!("epoch secret: {e}"))?;
        }
        Ok(EpochSecret(out))
    }

    /// 32 random bytes (for a group whose members are given it privately, such as the
    /// children of `phalanx train`).
    pub fn random() -> Self {
        EpochSecret(rand::random())
    }

    /// The 64 hex digits that [`EpochSecret::from_hex`] reads.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for EpochSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EpochSecret(<redacted>)")
    }
}

/// A worker's TLS credentials for ring links: its certificate and key, the cluster CA,
/// and the rustls configurations built from them (server: client certificate required;
/// both: ALPN `phalanx-ring/1`).
#[derive(Clone)]
pub struct RingCredentials {
    cluster: String,
    worker: String,
    pub(crate) server: Arc<rustls::ServerConfig>,
    pub(crate) client: Arc<rustls::ClientConfig>,
}

impl RingCredentials {
    /// Loads `worker_id`'s certificate and key from `dir` (see [`phalanx_pki::TlsDir`]).
    pub fn load(dir: &TlsDir, worker_id: &str) -> Result<RingCredentials, PkiError> {
        let role = Role::Worker(worker_id.to_string());
        let id = dir.identity(&role)?;
        Ok(RingCredentials {
            cluster: dir.cluster_id().to_string(),
            worker: worker_id.to_string(),
            server: dir.server_config(&id, ClientAuth::Required, &[ALPN_COLLECTIVE])?,
            client: dir.client_config(Some(&id), &[ALPN_COLLECTIVE])?,
        })
    }

    pub fn worker_id(&self) -> &str {
        &self.worker
    }

    pub fn cluster_id(&self) -> &str {
        &self.cluster
    }
}

impl fmt::Debug for RingCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingCredentials")
            .field("cluster", &self.cluster)
            .field("worker", &self.worker)
            .finish()
    }
}

/// Mutual TLS on a group's links.
#[derive(Clone, Debug)]
pub struct RingTls {
    pub creds: Arc<RingCredentials>,
    /// The worker id the plan puts at each rank (index = rank); this rank's must be
    /// `creds`' own.
    pub peer_workers: Vec<String>,
}

/// What a group's links must prove. Without it ([`crate::GroupConfig::security`] `None`)
/// the handshake is keyed by the public group id and proves nothing: for tests and
/// loopback benchmarks only.
#[derive(Clone, Debug)]
pub struct Security {
    /// The plan epoch's secret; every hello proves it.
    pub secret: EpochSecret,
    /// Mutual TLS with worker certificates, when the worker has credentials.
    pub tls: Option<RingTls>,
}

/// Checks a verified TLS peer: the ring's ALPN, and a certificate naming `expected`.
pub(crate) fn check_tls_peer(
    conn: &rustls::CommonState,
    creds: &RingCredentials,
    expected: &str,
    peer_rank: usize,
) -> Result<(), String> {
    if conn.alpn_protocol() != Some(ALPN_COLLECTIVE) {
        return Err(format!(
            "the TLS peer did not agree on ALPN {}",
            String::from_utf8_lossy(ALPN_COLLECTIVE)
        ));
    }
    let certs = conn
        .peer_certificates()
        .ok_or_else(|| "the TLS peer presented no certificate".to_string())?;
    let role = phalanx_pki::peer_role(certs, &creds.cluster).map_err(|e| e.to_string())?;
    let want = Role::Worker(expected.to_string());
    if role != want {
        return Err(format!(
            "the peer's certificate is for {role}, but the plan puts {want} at rank {peer_rank}"
        ));
    }
    Ok(())
}

/// One ring link's byte stream: plain TCP, or TLS over it (either end).
pub(crate) enum Conn {
    Plain(TcpStream),
    TlsClient(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    TlsServer(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Conn {
    /// The TLS exporter value that binds the hello's MACs to this connection (zeros on
    /// plain TCP).
    pub(crate) fn binding(&self) -> Result<[u8; BINDING_BYTES], rustls::Error> {
        let out = [0u8; BINDING_BYTES];
        match self {
            Conn::Plain(_) => Ok(out),
            Conn::TlsClient(s) => s
                .get_ref()
                .1
                .export_keying_material(out, BINDING_LABEL, None),
            Conn::TlsServer(s) => s
                .get_ref()
                .1
                .export_keying_material(out, BINDING_LABEL, None),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::TlsClient(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::TlsServer(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::TlsClient(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::TlsServer(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::TlsClient(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Conn::TlsServer(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::TlsClient(s) => s.is_write_vectored(),
            Conn::TlsServer(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::TlsClient(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::TlsServer(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::TlsClient(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::TlsServer(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_parse_from_hex_and_never_print() {
        let hex = "00ff".repeat(16);
        let s = EpochSecret::from_hex(&hex).unwrap();
        assert_eq!(s.bytes()[1], 0xff);
        assert_eq!(format!("{s:?}"), "EpochSecret(<redacted>)");
        assert!(EpochSecret::from_hex("abc").is_err());
        assert!(EpochSecret::from_hex(&"zz".repeat(32)).is_err());
    }
}
