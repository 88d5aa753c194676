//! Phalanx credentials (issue 11): who may say what.
//!
//! A cluster has its own certificate authority. Every component holds a certificate that
//! the CA signed and that names its role in a URI subject-alternative name,
//! `phalanx://<cluster-id>/<role>`:
//!
//! | role | URI path | held by |
//! |---|---|---|
//! | [`Role::Controller`] | `controller/<node id>` | one controller |
//! | [`Role::Worker`] | `worker/<worker id>` | one worker |
//! | [`Role::Admin`] | `operator/admin` | operators who change things |
//! | [`Role::Reader`] | `operator/reader` | dashboards, monitoring |
//!
//! The identity of a peer is read from its verified certificate, never from a field the
//! sender writes. Operators may also present a bearer token (`admin.token`,
//! `reader.token`), which a browser can carry in a cookie.
//!
//! Everything lives in one directory ([`TlsDir`], `<cluster dir>/tls/` by default):
//!
//! ```text
//! cluster-id            the cluster's id (hex), also in every certificate's URI
//! ca.pem  ca.key        the CA (ca.key only where certificates are issued)
//! controller-<N>.pem/.key, worker-<ID>.pem/.key, admin.pem/.key, reader.pem/.key
//! admin.token  reader.token   operator bearer tokens
//! epoch.key             the controllers' key for each plan epoch's collective secret
//! ```
//!
//! Private files are created with mode 0600 from the first byte ([`write_private`]).

mod files;
mod verify;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;
use thiserror::Error;

pub use files::write_private;
pub use verify::{client_config, peer_role, server_config, ClientAuth};

/// The ALPN protocol of controller-to-controller Raft links.
pub const ALPN_RAFT: &[u8] = b"phalanx-raft/1";
/// The ALPN protocol of HTTP/1.1 API connections.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// The ALPN protocol of collective (ring) links between workers.
pub const ALPN_COLLECTIVE: &[u8] = b"phalanx-ring/1";

#[derive(Debug, Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("certificate generation: {0}")]
    Gen(#[from] rcgen::Error),
    #[error("tls configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("bad identity: {0}")]
    Identity(String),
    #[error(
        "no credentials for {role} in {dir}: {what} is missing (run `phalanx cluster up`, \
         or `phalanx certs issue` where the CA key is, or see docs/security.md)"
    )]
    Missing {
        role: String,
        dir: PathBuf,
        what: String,
    },
}

pub type Result<T> = std::result::Result<T, PkiError>;

/// What a certificate (or a token) entitles its holder to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Controller(u64),
    Worker(String),
    Admin,
    Reader,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Controller(id) => write!(f, "controller/{id}"),
            Role::Worker(id) => write!(f, "worker/{id}"),
            Role::Admin => write!(f, "operator/admin"),
            Role::Reader => write!(f, "operator/reader"),
        }
    }
}

/// A worker id usable in a file name and a certificate: 1-64 of `[A-Za-z0-9._-]`, not
/// starting with a dot.
pub fn check_worker_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::Identity(format!(
            "worker id {id:?}: use 1-64 of [A-Za-z0-9._-], not starting with '.'"
        )))
    }
}

impl Role {
    /// The certificate's URI SAN for this role in `cluster`.
    pub fn uri(&self, cluster: &str) -> String {
        format!("phalanx://{cluster}/{self}")
    }

    /// Parses a URI SAN; `None` when it is not a phalanx URI of `cluster`.
    pub fn from_uri(uri: &str, cluster: &str) -> Option<Role> {
        let rest = uri.strip_prefix("phalanx://")?;
        let (c, path) = rest.split_once('/')?;
        if c != cluster {
            return None;
        }
        Role::from_path(path)
    }

    /// Parses `controller/N`, `worker/ID`, `operator/admin`, `operator/reader`.
    pub fn from_path(path: &str) -> Option<Role> {
        let (kind, id) = path.split_once('/')?;
        match kind {
            "controller" => id.parse().ok().filter(|&n| n > 0).map(Role::Controller),
            "worker" => check_worker_id(id)
                .ok()
                .map(|_| Role::Worker(id.to_string())),
            "operator" if id == "admin" => Some(Role::Admin),
            "operator" if id == "reader" => Some(Role::Reader),
            _ => None,
        }
    }

    /// The file stem of this role's certificate and key in a [`TlsDir`].
    pub fn file_stem(&self) -> String {
        match self {
            Role::Controller(id) => format!("controller-{id}"),
            Role::Worker(id) => format!("worker-{id}"),
            Role::Admin => "admin".into(),
            Role::Reader => "reader".into(),
        }
    }
}

/// One component's credentials: its certificate chain and private key.
pub struct Identity {
    pub role: Role,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            role: self.role.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// The operator token kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Admin,
    Reader,
}

impl TokenKind {
    fn file(self) -> &'static str {
        match self {
            TokenKind::Admin => "admin.token",
            TokenKind::Reader => "reader.token",
        }
    }
    pub fn role(self) -> Role {
        match self {
            TokenKind::Admin => Role::Admin,
            TokenKind::Reader => Role::Reader,
        }
    }
}

/// A directory of cluster credentials (layout in the crate docs).
#[derive(Debug, Clone)]
pub struct TlsDir {
    dir: PathBuf,
    cluster: String,
}

/// Validity of the certificates `create` and `issue` make.
const CA_DAYS: i64 = 3650;
const LEAF_DAYS: i64 = 825;

impl TlsDir {
    /// Creates the CA, the cluster id, the operator tokens and the epoch key where they are
    /// missing (an existing CA is kept: bring your own by placing `ca.pem`, `ca.key` and
    /// `cluster-id` first). Idempotent.
    pub fn create(dir: &Path) -> Result<TlsDir> {
        files::create_dir_private(dir)?;
        let id_path = dir.join("cluster-id");
        if !id_path.exists() {
            if dir.join("ca.pem").exists() {
                return Err(PkiError::BadFile {
                    path: id_path,
                    message: "ca.pem exists but cluster-id does not; write the cluster id \
                              that the certificates' URIs carry"
                        .into(),
                });
            }
            let id = hex::encode(rand::random::<[u8; 8]>());
            files::write_public(&id_path, format!("{id}\n").as_bytes())?;
        }
        let tls = TlsDir::open_unchecked(dir)?;
        if !dir.join("ca.pem").exists() {
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::new(Vec::<String>::new())?;
            let mut dn = DistinguishedName::new();
            dn.push(
                DnType::CommonName,
                format!("phalanx cluster {} CA", tls.cluster),
            );
            p.distinguished_name = dn;
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            validity(&mut p, CA_DAYS);
            let cert = p.self_signed(&key)?;
            files::write_private(&dir.join("ca.key"), key.serialize_pem().as_bytes())?;
            files::write_public(&dir.join("ca.pem"), cert.pem().as_bytes())?;
        }
        for kind in [TokenKind::Admin, TokenKind::Reader] {
            let p = dir.join(kind.file());
            if !p.exists() {
                let t = hex::encode(rand::random::<[u8; 32]>());
                files::write_private(&p, format!("{t}\n").as_bytes())?;
            }
        }
        let ek = dir.join("epoch.key");
        if !ek.exists() {
            files::write_private(&ek, hex::encode(rand::random::<[u8; 32]>()).as_bytes())?;
        }
        Ok(tls)
    }

    /// Opens an existing directory; it must hold `cluster-id` and `ca.pem`.
    pub fn open(dir: &Path) -> Result<TlsDir> {
        let t = TlsDir::open_unchecked(dir)?;
        if !dir.join("ca.pem").exists() {
            return Err(PkiError::Missing {
                role: "the cluster".into(),
                dir: dir.to_path_buf(),
                what: "ca.pem".into(),
            });
        }
        Ok(t)
    }

    fn open_unchecked(dir: &Path) -> Result<TlsDir> {
        let p = dir.join("cluster-id");
        let raw = files::read(&p)?;
        let id = String::from_utf8_lossy(&raw).trim().to_string();
        if id.is_empty()
            || id.len() > 64
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(PkiError::BadFile {
                path: p,
                message: format!("cluster id {id:?}: use 1-64 of [A-Za-z0-9.-]"),
            });
        }
        Ok(TlsDir {
            dir: dir.to_path_buf(),
            cluster: id,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn cluster_id(&self) -> &str {
        &self.cluster
    }

    /// Where `role`'s certificate and key live.
    pub fn cert_paths(&self, role: &Role) -> (PathBuf, PathBuf) {
        let s = role.file_stem();
        (
            self.dir.join(format!("{s}.pem")),
            self.dir.join(format!("{s}.key")),
        )
    }

    pub fn has_identity(&self, role: &Role) -> bool {
        let (c, k) = self.cert_paths(role);
        c.exists() && k.exists()
    }

    /// Issues a certificate for `role` signed by the CA (needs `ca.key`), unless one
    /// exists. `hosts` (DNS names or IP addresses) go into the certificate's SANs so that
    /// ordinary TLS clients (curl `--cacert`, a browser trusting the CA) can verify a
    /// server by its address; phalanx's own clients verify the role instead.
    pub fn issue(&self, role: &Role, hosts: &[String]) -> Result<()> {
        if self.has_identity(role) {
            return Ok(());
        }
        if let Role::Worker(id) = role {
            check_worker_id(id)?;
        }
        let ca_key_path = self.dir.join("ca.key");
        if !ca_key_path.exists() {
            return Err(PkiError::Missing {
                role: role.to_string(),
                dir: self.dir.clone(),
                what: format!("{}.pem (and ca.key to issue it)", role.file_stem()),
            });
        }
        let ca_key_pem =
            String::from_utf8(files::read(&ca_key_path)?).map_err(|_| PkiError::BadFile {
                path: ca_key_path.clone(),
                message: "not UTF-8 PEM".into(),
            })?;
        let ca_key = KeyPair::from_pem(&ca_key_pem)?;
        let ca_pem_path = self.dir.join("ca.pem");
        let ca_pem =
            String::from_utf8(files::read(&ca_pem_path)?).map_err(|_| PkiError::BadFile {
                path: ca_pem_path.clone(),
                message: "not UTF-8 PEM".into(),
            })?;
        // rcgen signs with the issuer's subject and key: rebuild the issuer from ca.pem
        // (so a CA brought by the user keeps its own subject).
        let issuer = CertificateParams::from_ca_cert_pem(&ca_pem)
            .map_err(|e| PkiError::BadFile {
                path: ca_pem_path.clone(),
                message: format!("not a usable CA certificate: {e}"),
            })?
            .self_signed(&ca_key)?;

        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, role.to_string());
        dn.push(
            DnType::OrganizationName,
            format!("phalanx {}", self.cluster),
        );
        p.distinguished_name = dn;
        p.subject_alt_names
            .push(SanType::URI(role.uri(&self.cluster).try_into()?));
        for h in hosts {
            let san = match h.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(h.clone().try_into()?),
            };
            if !p.subject_alt_names.contains(&san) {
                p.subject_alt_names.push(san);
            }
        }
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity(&mut p, LEAF_DAYS);
        let cert = p.signed_by(&key, &issuer, &ca_key)?;
        let (cp, kp) = self.cert_paths(role);
        files::write_private(&kp, key.serialize_pem().as_bytes())?;
        files::write_public(&cp, cert.pem().as_bytes())?;
        Ok(())
    }

    /// Loads `role`'s certificate and key, checking that the certificate names `role` in
    /// this cluster.
    pub fn identity(&self, role: &Role) -> Result<Identity> {
        let (cp, kp) = self.cert_paths(role);
        for p in [&cp, &kp] {
            if !p.exists() {
                return Err(PkiError::Missing {
                    role: role.to_string(),
                    dir: self.dir.clone(),
                    what: p
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                });
            }
        }
        let chain = files::read_certs(&cp)?;
        let key = files::read_key(&kp)?;
        let got = peer_role(&chain, &self.cluster).map_err(|e| PkiError::BadFile {
            path: cp.clone(),
            message: e.to_string(),
        })?;
        if &got != role {
            return Err(PkiError::BadFile {
                path: cp,
                message: format!("the certificate is for {got}, not {role}"),
            });
        }
        Ok(Identity {
            role: role.clone(),
            chain,
            key,
        })
    }

    /// The trust anchors: the certificates in `ca.pem`.
    pub fn roots(&self) -> Result<RootCertStore> {
        let p = self.dir.join("ca.pem");
        let mut roots = RootCertStore::empty();
        for c in files::read_certs(&p)? {
            roots.add(c).map_err(|e| PkiError::BadFile {
                path: p.clone(),
                message: format!("not a usable CA certificate: {e}"),
            })?;
        }
        Ok(roots)
    }

    /// An operator token, trimmed.
    pub fn token(&self, kind: TokenKind) -> Result<String> {
        let p = self.dir.join(kind.file());
        if !p.exists() {
            return Err(PkiError::Missing {
                role: kind.role().to_string(),
                dir: self.dir.clone(),
                what: kind.file().into(),
            });
        }
        let t = String::from_utf8_lossy(&files::read(&p)?)
            .trim()
            .to_string();
        if t.len() < 16 {
            return Err(PkiError::BadFile {
                path: p,
                message: "token shorter than 16 characters".into(),
            });
        }
        Ok(t)
    }

    /// The controllers' epoch key (32 bytes), from which each plan epoch's collective
    /// secret is derived ([`epoch_secret`]).
    pub fn epoch_key(&self) -> Result<[u8; 32]> {
        let p = self.dir.join("epoch.key");
        if !p.exists() {
            return Err(PkiError::Missing {
                role: "controller".into(),
                dir: self.dir.clone(),
                what: "epoch.key".into(),
            });
        }
        let raw = String::from_utf8_lossy(&files::read(&p)?)
            .trim()
            .to_string();
        let mut k = [0u8; 32];
        hex::decode_to_slice(&raw, &mut k).map_err(|e| PkiError::BadFile {
            path: p,
            message: format!("expected 64 hex digits: {e}"),
        })?;
        Ok(k)
    }

    /// A rustls server configuration for `identity` (see [`server_config`]).
    pub fn server_config(
        &self,
        identity: &Identity,
        auth: ClientAuth,
        alpn: &[&[u8]],
    ) -> Result<Arc<rustls::ServerConfig>> {
        server_config(self.roots()?, identity, auth, alpn)
    }

    /// A rustls client configuration (see [`client_config`]).
    pub fn client_config(
        &self,
        identity: Option<&Identity>,
        alpn: &[&[u8]],
    ) -> Result<Arc<rustls::ClientConfig>> {
        client_config(self.roots()?, &self.cluster, identity, alpn)
    }
}

/// The collective secret of one plan epoch of one job: HMAC-SHA256 over the job id and
/// the epoch under the controllers' epoch key. Deterministic, so every controller derives
/// the same one, and fresh for every epoch; only the epoch's members are given it.
pub fn epoch_secret(epoch_key: &[u8; 32], job_id: &str, epoch: u64) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(epoch_key).expect("any key size");
    m.update(b"phalanx epoch secret v1\0");
    m.update(job_id.as_bytes());
    m.update(b"\0");
    m.update(&epoch.to_be_bytes());
    m.finalize().into_bytes().into()
}

fn validity(p: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // An hour of slack for clocks that disagree a little.
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(days);
}

#[cfg(test)]
mod tests;
