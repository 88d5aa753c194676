//! rustls configurations that check phalanx identities.
//!
//! Servers present their role's certificate and verify a client certificate when one is
//! presented ([`ClientAuth::Optional`]: the API, where operators may use a bearer token
//! instead) or always ([`ClientAuth::Required`]: Raft and collective links). Clients
//! verify that the server's certificate chains to the cluster CA and names a role of this
//! cluster; which role it must be is the caller's check ([`peer_role`]), so addresses may
//! change (a worker's collective address, a controller behind NAT) without reissuing.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::{Identity, PkiError, Result, Role};

/// Whether a server demands a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// A client certificate is verified when presented; without one the connection is
    /// anonymous at the TLS layer (and must authenticate otherwise, e.g. with a token).
    Optional,
    /// No connection without a client certificate signed by the cluster CA.
    Required,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server configuration presenting `identity`, verifying client certificates against
/// `roots` as `auth` says, and offering the ALPN protocols `alpn` (in preference order).
pub fn server_config(
    roots: RootCertStore,
    identity: &Identity,
    auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>> {
    let p = provider();
    let b = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), p.clone());
    let b = match auth {
        ClientAuth::Optional => b.allow_unauthenticated(),
        ClientAuth::Required => b,
    };
    let verifier = b
        .build()
        .map_err(|e| PkiError::Identity(format!("client verifier: {e}")))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(p)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// A client configuration that presents `identity` (if any) and accepts a server whose
/// certificate chains to `roots` and names a role of `cluster`.
pub fn client_config(
    roots: RootCertStore,
    cluster: &str,
    identity: Option<&Identity>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>> {
    let p = provider();
    let verifier = Arc::new(ClusterServerVerifier {
        roots: Arc::new(roots),
        cluster: cluster.to_string(),
        provider: p.clone(),
    });
    let b = rustls::ClientConfig::builder_with_provider(p)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match identity {
        Some(id) => b.with_client_auth_cert(id.chain.clone(), id.key.clone_key())?,
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// The role that a peer's (already verified) certificate names in `cluster`: the URI SAN
/// `phalanx://<cluster>/<role>`. Exactly one such URI must be present.
pub fn peer_role(chain: &[CertificateDer<'_>], cluster: &str) -> Result<Role> {
    let leaf = chain
        .first()
        .ok_or_else(|| PkiError::Identity("no certificate presented".into()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| PkiError::Identity(format!("not an X.509 certificate: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::Identity(format!("bad subject alternative names: {e}")))?;
    let mut roles = Vec::new();
    if let Some(san) = san {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(u) = n {
                if let Some(r) = Role::from_uri(u, cluster) {
                    roles.push(r);
                }
            }
        }
    }
    match roles.len() {
        1 => Ok(roles.remove(0)),
        0 => Err(PkiError::Identity(format!(
            "the certificate names no phalanx role of cluster {cluster}"
        ))),
        n => Err(PkiError::Identity(format!(
            "the certificate names {n} phalanx roles; exactly one is allowed"
        ))),
    }
}

#[derive(Debug)]
struct ClusterServerVerifier {
    roots: Arc<RootCertStore>,
    cluster: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ClusterServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        peer_role(std::slice::from_ref(end_entity), &self.cluster).map_err(|e| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
