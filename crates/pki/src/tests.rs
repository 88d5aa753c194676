use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;

use super::*;

fn cluster(dir: &Path) -> TlsDir {
    let t = TlsDir::create(dir).unwrap();
    for r in [
        Role::Controller(1),
        Role::Worker("w0".into()),
        Role::Admin,
        Role::Reader,
    ] {
        t.issue(&r, &["127.0.0.1".into(), "localhost".into()])
            .unwrap();
    }
    t
}

/// One TLS exchange over loopback TCP: the server's view of the client's role (or its
/// handshake error) and the client's view of the server's role (or its error).
fn exchange(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    server_cluster: &str,
    client_cluster: &str,
) -> (
    std::result::Result<Option<Role>, String>,
    std::result::Result<Role, String>,
) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let sc = server_cluster.to_string();
    let srv = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let conn = rustls::ServerConnection::new(server).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, s);
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).map_err(|e| e.to_string())?;
        tls.write_all(b"y").map_err(|e| e.to_string())?;
        tls.flush().map_err(|e| e.to_string())?;
        Ok(tls
            .conn
            .peer_certificates()
            .map(|c| peer_role(c, &sc).unwrap()))
    });
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn =
        rustls::ClientConnection::new(client, ServerName::try_from("phalanx").unwrap()).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, s);
    let cr = (|| {
        tls.write_all(b"x").map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).map_err(|e| e.to_string())?;
        peer_role(tls.conn.peer_certificates().unwrap(), client_cluster).map_err(|e| e.to_string())
    })();
    drop(tls);
    (srv.join().unwrap(), cr)
}

#[test]
fn mutual_tls_names_both_roles() {
    let d = tempfile::tempdir().unwrap();
    let t = cluster(d.path());
    let c1 = t.identity(&Role::Controller(1)).unwrap();
    let w0 = t.identity(&Role::Worker("w0".into())).unwrap();
    let s = t
        .server_config(&c1, ClientAuth::Required, &[ALPN_RAFT])
        .unwrap();
    let c = t.client_config(Some(&w0), &[ALPN_RAFT]).unwrap();
    let (srv, cli) = exchange(s, c, t.cluster_id(), t.cluster_id());
    assert_eq!(srv.unwrap(), Some(Role::Worker("w0".into())));
    assert_eq!(cli.unwrap(), Role::Controller(1));
}

#[test]
fn optional_client_auth_allows_anonymous_and_required_refuses_it() {
    let d = tempfile::tempdir().unwrap();
    let t = cluster(d.path());
    let c1 = t.identity(&Role::Controller(1)).unwrap();
    let anon = t.client_config(None, &[]).unwrap();
    let opt = t.server_config(&c1, ClientAuth::Optional, &[]).unwrap();
    let (srv, cli) = exchange(opt, anon.clone(), t.cluster_id(), t.cluster_id());
    assert_eq!(srv.unwrap(), None);
    assert_eq!(cli.unwrap(), Role::Controller(1));
    let req = t.server_config(&c1, ClientAuth::Required, &[]).unwrap();
    let (srv, _) = exchange(req, anon, t.cluster_id(), t.cluster_id());
    assert!(srv.is_err(), "anonymous client accepted: {srv:?}");
}

#[test]
fn another_clusters_certificates_are_refused_both_ways() {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let a = cluster(d1.path());
    let b = cluster(d2.path());
    assert_ne!(a.cluster_id(), b.cluster_id());
    // A client of cluster b with b's worker certificate, against a's controller.
    let srv_cfg = a
        .server_config(
            &a.identity(&Role::Controller(1)).unwrap(),
            ClientAuth::Required,
            &[],
        )
        .unwrap();
    let b_client = b
        .client_config(Some(&b.identity(&Role::Worker("w0".into())).unwrap()), &[])
        .unwrap();
    let (srv, cli) = exchange(srv_cfg.clone(), b_client, a.cluster_id(), b.cluster_id());
    assert!(srv.is_err(), "server accepted a foreign client: {srv:?}");
    assert!(cli.is_err(), "client accepted a foreign server: {cli:?}");
    // a's own client whose trust is a's CA, against a server presenting b's certificate.
    let b_srv = b
        .server_config(
            &b.identity(&Role::Controller(1)).unwrap(),
            ClientAuth::Optional,
            &[],
        )
        .unwrap();
    let a_client = a.client_config(None, &[]).unwrap();
    let (_, cli) = exchange(b_srv, a_client, b.cluster_id(), a.cluster_id());
    assert!(cli.is_err(), "client accepted a foreign server: {cli:?}");
}

#[cfg(unix)]
#[test]
fn private_files_are_0600_and_never_overwritten() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let t = cluster(d.path());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for f in [
        "ca.key",
        "controller-1.key",
        "worker-w0.key",
        "admin.key",
        "reader.key",
        "admin.token",
        "reader.token",
        "epoch.key",
    ] {
        assert_eq!(mode(&d.path().join(f)), 0o600, "{f}");
    }
    assert_eq!(mode(d.path()), 0o700);
    assert!(write_private(&d.path().join("admin.token"), b"x").is_err());
    // Issuing again keeps the existing certificate; create again keeps the CA.
    let before = std::fs::read(d.path().join("controller-1.pem")).unwrap();
    let ca = std::fs::read(d.path().join("ca.pem")).unwrap();
    TlsDir::create(d.path()).unwrap();
    t.issue(&Role::Controller(1), &[]).unwrap();
    assert_eq!(
        std::fs::read(d.path().join("controller-1.pem")).unwrap(),
        before
    );
    assert_eq!(std::fs::read(d.path().join("ca.pem")).unwrap(), ca);
}

#[test]
fn identity_checks_the_certificate_names_the_role() {
    let d = tempfile::tempdir().unwrap();
    let t = cluster(d.path());
    // A worker certificate copied to an admin's file name is not an admin.
    std::fs::remove_file(d.path().join("admin.pem")).unwrap();
    std::fs::copy(d.path().join("worker-w0.pem"), d.path().join("admin.pem")).unwrap();
    let e = t.identity(&Role::Admin).err().unwrap().to_string();
    assert!(e.contains("not operator/admin"), "{e}");
    let e = t.identity(&Role::Controller(7)).err().unwrap().to_string();
    assert!(e.contains("controller-7.pem"), "{e}");
}

#[test]
fn roles_and_ids_are_validated() {
    assert_eq!(
        Role::from_uri("phalanx://c1/controller/3", "c1"),
        Some(Role::Controller(3))
    );
    assert_eq!(Role::from_uri("phalanx://c2/controller/3", "c1"), None);
    assert_eq!(Role::from_uri("phalanx://c1/controller/0", "c1"), None);
    assert_eq!(Role::from_uri("phalanx://c1/worker/../x", "c1"), None);
    assert_eq!(Role::from_uri("phalanx://c1/operator/root", "c1"), None);
    assert!(check_worker_id("w-1.a_b").is_ok());
    for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
        assert!(check_worker_id(bad).is_err(), "{bad:?}");
    }
    let d = tempfile::tempdir().unwrap();
    let t = TlsDir::create(d.path()).unwrap();
    assert!(t.issue(&Role::Worker("../evil".into()), &[]).is_err());
}

#[test]
fn epoch_secrets_are_fresh_per_epoch_and_job_and_agree_across_callers() {
    let d = tempfile::tempdir().unwrap();
    let t = TlsDir::create(d.path()).unwrap();
    let k = t.epoch_key().unwrap();
    assert_eq!(epoch_secret(&k, "job-1", 2), epoch_secret(&k, "job-1", 2));
    assert_ne!(epoch_secret(&k, "job-1", 2), epoch_secret(&k, "job-1", 3));
    assert_ne!(epoch_secret(&k, "job-1", 2), epoch_secret(&k, "job-2", 2));
    assert_ne!(
        epoch_secret(&k, "job-1", 2),
        epoch_secret(&[0; 32], "job-1", 2)
    );
    assert!(t.token(TokenKind::Admin).unwrap() != t.token(TokenKind::Reader).unwrap());
}
