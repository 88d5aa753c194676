//! How a controller authenticates what reaches its port, and how it authenticates itself.
//!
//! With TLS (the default), the port speaks only TLS: a Raft link is a TLS connection with
//! the ALPN protocol `phalanx-raft/1` and a controller certificate (the node id comes from
//! the certificate); anything else is HTTP/1.1, whose caller is the role in its client
//! certificate, or an operator holding the admin or read-only token. `--insecure` (plain
//! TCP, one shared token that stands for every role) is for loopback benchmarks only.

use std::fmt;
use std::sync::Arc;

use phalanx_core::authz::Caller;
use phalanx_pki::{ClientAuth, Role, TlsDir, TokenKind, ALPN_HTTP1, ALPN_RAFT};
use phalanx_proto::NodeId;

use crate::client::Credentials;

/// An authenticated caller, owning its worker id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Controller(NodeId),
    Worker(String),
    Admin,
    Reader,
    Insecure,
}

impl Principal {
    pub fn caller(&self) -> Caller<'_> {
        match self {
            Principal::Controller(id) => Caller::Controller(*id),
            Principal::Worker(w) => Caller::Worker(w),
            Principal::Admin => Caller::Admin,
            Principal::Reader => Caller::Reader,
            Principal::Insecure => Caller::Insecure,
        }
    }

    pub fn from_role(r: Role) -> Principal {
        match r {
            Role::Controller(id) => Principal::Controller(id),
            Role::Worker(w) => Principal::Worker(w),
            Role::Admin => Principal::Admin,
            Role::Reader => Principal::Reader,
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Controller(id) => write!(f, "controller/{id}"),
            Principal::Worker(w) => write!(f, "worker/{w}"),
            Principal::Admin => f.write_str("operator/admin"),
            Principal::Reader => f.write_str("operator/reader"),
            Principal::Insecure => f.write_str("insecure-token"),
        }
    }
}

/// A controller's credentials and what it accepts.
#[derive(Clone)]
pub enum Security {
    /// Plain TCP; the one token is every role. Loopback benchmarks only.
    Insecure {
        token: String,
    },
    Tls(Arc<TlsSecurity>),
}

pub struct TlsSecurity {
    pub dir: TlsDir,
    pub id: NodeId,
    /// The API and Raft listener: this controller's certificate, client certificates
    /// verified when presented.
    pub server: Arc<rustls::ServerConfig>,
    /// Outgoing Raft links: this controller's certificate, ALPN `phalanx-raft/1`.
    pub raft_client: Arc<rustls::ClientConfig>,
    /// Calls to other controllers' APIs (rejoin), as this controller.
    pub api: Credentials,
    admin_token: String,
    reader_token: String,
    /// The key each plan epoch's collective secret is derived from.
    pub epoch_key: [u8; 32],
}

impl fmt::Debug for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Security::Insecure { .. } => f.write_str("Insecure"),
            Security::Tls(t) => write!(f, "Tls({}, controller {})", t.dir.path().display(), t.id),
        }
    }
}

impl Security {
    pub fn insecure(token: impl Into<String>) -> Security {
        Security::Insecure {
            token: token.into(),
        }
    }

    /// Controller `id`'s credentials from a credentials directory: its certificate and
    /// key, the CA, the operator tokens and the epoch key.
    pub fn tls(dir: &TlsDir, id: NodeId) -> Result<Security, phalanx_pki::PkiError> {
        let me = dir.identity(&Role::Controller(id))?;
        Ok(Security::Tls(Arc::new(TlsSecurity {
            dir: dir.clone(),
            id,
            server: dir.server_config(&me, ClientAuth::Optional, &[ALPN_RAFT, ALPN_HTTP1])?,
            raft_client: dir.client_config(Some(&me), &[ALPN_RAFT])?,
            api: Credentials::identity(dir, &me)?,
            admin_token: dir.token(TokenKind::Admin)?,
            reader_token: dir.token(TokenKind::Reader)?,
            epoch_key: dir.epoch_key()?,
        })))
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Security::Tls(_))
    }

    /// The principal a bearer token stands for, if any.
    pub fn token_principal(&self, presented: &str) -> Option<Principal> {
        match self {
            Security::Insecure { token } => {
                token_eq(presented, token).then_some(Principal::Insecure)
            }
            Security::Tls(t) => {
                if token_eq(presented, &t.admin_token) {
                    Some(Principal::Admin)
                } else if token_eq(presented, &t.reader_token) {
                    Some(Principal::Reader)
                } else {
                    None
                }
            }
        }
    }

    /// Credentials for this controller's own calls to the other controllers' APIs.
    pub fn client_credentials(&self) -> Credentials {
        match self {
            Security::Insecure { token } => Credentials::insecure(token.clone()),
            Security::Tls(t) => t.api.clone(),
        }
    }

    /// The key of each plan epoch's collective secret: the epoch key with TLS; in
    /// insecure mode a digest of the shared token (every holder of it knows it anyway).
    pub fn epoch_key(&self) -> [u8; 32] {
        match self {
            Security::Tls(t) => t.epoch_key,
            Security::Insecure { token } => {
                use sha2::Digest;
                sha2::Sha256::digest(token.as_bytes()).into()
            }
        }
    }
}

/// Constant-time in the length of the presented token.
pub(crate) fn token_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = (a.len() != b.len()) as u8;
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0 && !b.is_empty()
}
