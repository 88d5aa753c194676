//! Who may say what (issue 11), tried against three real controllers with TLS on
//! loopback: the route table walked with every role's credential, forged and misnamed Raft
//! links, plain TCP, another cluster's certificates, and a body that is never read before
//! authentication.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use phalanx_controller::client::{http_once, Credentials};
use phalanx_controller::server::routes::{self, Who, ROUTES};
use phalanx_controller::server::{self, ControllerHandle, Security, ServerConfig};
use phalanx_pki::{Role, TlsDir, TokenKind, ALPN_HTTP1, ALPN_RAFT};
use phalanx_proto::{Command, StatusResponse};
use protobuf::Message as _;
use rustls::pki_types::ServerName;

mod common;
use common::{free_addr, status_with};

struct Cluster {
    _dir: tempfile::TempDir,
    tls: TlsDir,
    peers: BTreeMap<u64, String>,
    nodes: Vec<ControllerHandle>,
}

/// The nodes stop with the test, whether it passed or not.
impl Drop for Cluster {
    fn drop(&mut self) {
        for h in self.nodes.drain(..) {
            h.stop();
        }
    }
}

fn credentials(dir: &std::path::Path) -> TlsDir {
    let tls = TlsDir::create(dir).unwrap();
    for r in [
        Role::Admin,
        Role::Reader,
        Role::Worker("w0".into()),
        Role::Worker("w1".into()),
    ] {
        tls.issue(&r, &[]).unwrap();
    }
    tls
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let tls = credentials(&dir.path().join("tls"));
        let peers: BTreeMap<u64, String> = (1..=3).map(|i| (i, free_addr())).collect();
        for id in peers.keys() {
            tls.issue(&Role::Controller(*id), &["127.0.0.1".into()])
                .unwrap();
        }
        let nodes = peers
            .keys()
            .map(|id| {
                let cfg = ServerConfig::new(
                    *id,
                    peers[id].clone(),
                    peers.clone(),
                    dir.path().join(format!("n{id}")),
                    Security::tls(&tls, *id).unwrap(),
                );
                server::start(cfg).unwrap()
            })
            .collect();
        Cluster {
            _dir: dir,
            tls,
            peers,
            nodes,
        }
    }

    fn creds(&self, r: &Role) -> Credentials {
        Credentials::role(&self.tls, r).unwrap()
    }

    fn status(&self, id: u64) -> Option<StatusResponse> {
        status_with(&self.peers[&id], &self.creds(&Role::Admin))
    }

    /// The leader's id and term once every node agrees on both.
    fn settled_leader(&self) -> (u64, u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s: Vec<_> = self.peers.keys().filter_map(|i| self.status(*i)).collect();
            if s.len() == 3
                && s[0].leader_id != 0
                && s.iter()
                    .all(|x| x.leader_id == s[0].leader_id && x.term == s[0].term)
            {
                return (s[0].leader_id, s[0].term);
            }
            assert!(Instant::now() < deadline, "no settled leader");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A raw TLS connection to `addr`, as `identity` (or anonymous), offering `alpn`.
fn tls_connect(
    tls: &TlsDir,
    identity: Option<&Role>,
    addr: &str,
    alpn: &[u8],
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let id = identity.map(|r| tls.identity(r).unwrap());
    let cfg = tls.client_config(id.as_ref(), &[alpn]).unwrap();
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn =
        rustls::ClientConnection::new(cfg, ServerName::try_from("phalanx").unwrap()).unwrap();
    rustls::StreamOwned::new(conn, s)
}

/// A peer-link opening: the magic and the handshake frame.
fn peer_hello(from: u64) -> Vec<u8> {
    let hs = serde_json::to_vec(&serde_json::json!({"from": from, "acks": true})).unwrap();
    let mut v = b"PHXR".to_vec();
    v.extend_from_slice(&(hs.len() as u32).to_be_bytes());
    v.extend_from_slice(&hs);
    v
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

/// Did the server keep the link (it acknowledges the ping with a byte count) or close it?
fn link_kept<S: Read + Write>(s: &mut S) -> bool {
    let _ = s.write_all(&frame(&[]));
    let _ = s.flush();
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack).is_ok()
}

#[test]
fn raft_links_need_a_controller_certificate_naming_the_sender() {
    let c = Cluster::start();
    let (leader, term) = c.settled_leader();
    let follower = *c.peers.keys().find(|i| **i != leader).unwrap();
    let other = *c
        .peers
        .keys()
        .find(|i| **i != leader && **i != follower)
        .unwrap();
    let addr = &c.peers[&follower];

    // The control: the leader's own certificate, its own id: the link is kept.
    let mut s = tls_connect(&c.tls, Some(&Role::Controller(leader)), addr, ALPN_RAFT);
    s.write_all(&peer_hello(leader)).unwrap();
    assert!(link_kept(&mut s), "a genuine peer link was dropped");
    drop(s);

    // A forged heartbeat from "the leader" whose commit index is far past the follower's
    // log (raft-rs panics on it if it is ever delivered), sent over a worker's
    // credential: the link is refused at the handshake and the message never arrives.
    let mut forged = raft::prelude::Message::default();
    forged.set_msg_type(raft::prelude::MessageType::MsgHeartbeat);
    forged.from = leader;
    forged.to = follower;
    forged.term = term;
    forged.commit = 1_000_000;
    let forged = forged.write_to_bytes().unwrap();
    for who in [Some(Role::Worker("w0".into())), Some(Role::Admin), None] {
        let mut s = tls_connect(&c.tls, who.as_ref(), addr, ALPN_RAFT);
        let _ = s.write_all(&peer_hello(leader));
        let _ = s.write_all(&frame(&forged));
        assert!(
            !link_kept(&mut s),
            "a Raft link as {who:?} was kept (it must need a controller certificate)"
        );
    }

    // A controller certificate claiming another node's id: refused.
    let mut s = tls_connect(&c.tls, Some(&Role::Controller(other)), addr, ALPN_RAFT);
    let _ = s.write_all(&peer_hello(leader));
    let _ = s.write_all(&frame(&forged));
    assert!(
        !link_kept(&mut s),
        "controller {other}'s certificate spoke as controller {leader}"
    );

    // A link that names itself truly but carries a message from another id: closed.
    let mut s = tls_connect(&c.tls, Some(&Role::Controller(other)), addr, ALPN_RAFT);
    s.write_all(&peer_hello(other)).unwrap();
    assert!(link_kept(&mut s));
    let _ = s.write_all(&frame(&forged));
    assert!(
        !link_kept(&mut s),
        "a message from another id was taken on a peer link"
    );

    // The follower is alive, in the same term, under the same leader.
    assert_eq!(c.settled_leader(), (leader, term));
}

#[test]
fn plain_tcp_and_another_clusters_certificates_are_refused() {
    let c = Cluster::start();
    let (leader, _) = c.settled_leader();
    let addr = &c.peers[&leader];
    for plain in [
        &b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &peer_hello(1)[..],
    ] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(plain).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(
            !String::from_utf8_lossy(&buf).contains("HTTP/1.1"),
            "plain TCP was served"
        );
    }
    let plain = Credentials::insecure(c.tls.token(TokenKind::Admin).unwrap());
    assert!(http_once(
        addr,
        "GET",
        "/v1/status",
        &plain,
        None,
        Duration::from_secs(5)
    )
    .is_err());

    // Another cluster's admin certificate (its own CA) is refused at the handshake; a
    // client that trusts only the other CA refuses this cluster's server.
    let d = tempfile::tempdir().unwrap();
    let other = credentials(d.path());
    let foreign = Credentials::role(&other, &Role::Admin).unwrap();
    let r = http_once(
        addr,
        "GET",
        "/v1/status",
        &foreign,
        None,
        Duration::from_secs(5),
    );
    assert!(
        r.is_err(),
        "another cluster's certificate was answered: {r:?}"
    );
    let foreign_token = Credentials::token(&other, TokenKind::Admin).unwrap();
    let r = http_once(
        addr,
        "GET",
        "/v1/status",
        &foreign_token,
        None,
        Duration::from_secs(5),
    );
    assert!(r.is_err(), "a server of another cluster was trusted: {r:?}");
}

#[test]
fn a_request_body_is_not_read_before_authentication() {
    let c = Cluster::start();
    let (leader, _) = c.settled_leader();
    let addr = &c.peers[&leader];
    // Headers announcing a 100 MB body, and no body: the answer (401 without a
    // credential, 403 with one that may not post) comes back at once.
    let reader = c.tls.token(TokenKind::Reader).unwrap();
    for (auth, want) in [
        (String::new(), "401"),
        (format!("Authorization: Bearer {reader}\r\n"), "403"),
    ] {
        let mut s = tls_connect(&c.tls, None, addr, ALPN_HTTP1);
        let head = format!(
            "POST /v1/command HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
        );
        s.write_all(head.as_bytes()).unwrap();
        s.flush().unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with(&format!("HTTP/1.1 {want}")), "{text}");
    }
    // An admin announcing more than the body limit gets 413, not a read of 100 MB.
    let admin = c.tls.token(TokenKind::Admin).unwrap();
    let mut s = tls_connect(&c.tls, None, addr, ALPN_HTTP1);
    let head = format!(
        "POST /v1/command HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}\r\nContent-Length: 100000000\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    s.flush().unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
}

/// A request for `route` that the role, if allowed, can make succeed.
fn request_for(
    route: &routes::RouteSpec,
    who: Who,
    leader: u64,
    addr: &str,
) -> (String, Option<Vec<u8>>) {
    let path = route
        .path
        .replace("{key}", "color")
        .replace("{worker}", "w0")
        .replace("{*file}", "index.html");
    let body = match (route.path, who) {
        ("/v1/command", Who::Worker) => Some(Command::RegisterWorker {
            id: "w0".into(),
            address: "127.0.0.1:9".into(),
            device: Default::default(),
        }),
        ("/v1/command", _) => Some(Command::SetAnnotation {
            key: "color".into(),
            value: "blue".into(),
        }),
        _ => None,
    }
    .map(|command| {
        serde_json::to_vec(&phalanx_proto::Envelope {
            trace: None,
            request_id: phalanx_controller::client::new_request_id("walk"),
            command,
        })
        .unwrap()
    });
    let body = match route.path {
        "/v1/heartbeat" => Some(serde_json::to_vec(&serde_json::json!({"worker": "w0"})).unwrap()),
        // The leader re-adds itself at its own address (a no-op the raft loop refuses).
        "/v1/members" => Some(
            serde_json::to_vec(
                &serde_json::json!({"action": "add", "id": leader, "address": addr}),
            )
            .unwrap(),
        ),
        _ => body,
    };
    (path, body)
}

#[test]
fn every_endpoint_answers_each_role_as_the_table_says() {
    let c = Cluster::start();
    let (leader, _) = c.settled_leader();
    let addr = c.peers[&leader].clone();
    let walk: Vec<(Who, &str, Credentials)> = vec![
        (Who::Reader, "reader certificate", c.creds(&Role::Reader)),
        (
            Who::Reader,
            "reader token",
            Credentials::token(&c.tls, TokenKind::Reader).unwrap(),
        ),
        (Who::Admin, "admin certificate", c.creds(&Role::Admin)),
        (
            Who::Admin,
            "admin token",
            Credentials::token(&c.tls, TokenKind::Admin).unwrap(),
        ),
        (
            Who::Worker,
            "worker w0 certificate",
            c.creds(&Role::Worker("w0".into())),
        ),
        (
            Who::Controller,
            "controller certificate",
            c.creds(&Role::Controller(leader)),
        ),
    ];
    // w0 is registered first, so that its own assignment and heartbeat answer 200.
    let (path, body) = request_for(&ROUTES[8], Who::Worker, leader, &addr);
    assert_eq!(ROUTES[8].path, "/v1/command");
    let (code, b) = http_once(
        &addr,
        "POST",
        &path,
        &walk[4].2,
        body.as_deref(),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&b));

    let mut rows = Vec::new();
    for route in ROUTES {
        for (who, name, creds) in &walk {
            let (path, body) = request_for(route, *who, leader, &addr);
            let (code, b) = http_once(
                &addr,
                route.method,
                &path,
                creds,
                body.as_deref(),
                Duration::from_secs(5),
            )
            .unwrap_or_else(|e| panic!("{} {path} as {name}: {e}", route.method));
            // A membership change that passes the checks reaches the raft loop, which
            // refuses re-adding a voter (409): still past authentication and the table.
            let want = match (route.who.contains(who), route.path) {
                (true, "/v1/members") if code == 409 => 409,
                (true, _) => 200,
                (false, _) => 403,
            };
            rows.push(format!("{} {path} as {name}: {code}", route.method));
            assert_eq!(
                code,
                want,
                "{} {path} as {name}: {}",
                route.method,
                String::from_utf8_lossy(&b)
            );
        }
    }
    // Paths are percent-decoded: a key with a space and a slash is one segment.
    let admin = c.creds(&Role::Admin);
    let set = serde_json::to_vec(&phalanx_proto::Envelope {
        trace: None,
        request_id: phalanx_controller::client::new_request_id("pct"),
        command: Command::SetAnnotation {
            key: "a b/c".into(),
            value: "v".into(),
        },
    })
    .unwrap();
    let (code, _) = http_once(
        &addr,
        "POST",
        "/v1/command",
        &admin,
        Some(&set),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(code, 200);
    let (code, b) = http_once(
        &addr,
        "GET",
        "/v1/annotations/a%20b%2Fc",
        &admin,
        None,
        Duration::from_secs(5),
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!((code, v["value"].as_str()), (200, Some("v")), "{v}");

    // Without any credential, every route is a 401.
    let anon = Credentials::tls_with_token(&c.tls, String::new()).unwrap();
    for route in ROUTES {
        let (path, body) = request_for(route, Who::Admin, leader, &addr);
        let (code, _) = http_once(
            &addr,
            route.method,
            &path,
            &anon,
            body.as_deref(),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(code, 401, "{} {path} without a credential", route.method);
    }
    eprintln!("{}", rows.join("\n"));
}

#[test]
fn workers_speak_only_for_themselves() {
    let c = Cluster::start();
    let (leader, _) = c.settled_leader();
    let addr = c.peers[&leader].clone();
    let w1 = c.creds(&Role::Worker("w1".into()));
    let post = |path: &str, body: serde_json::Value| {
        http_once(
            &addr,
            "POST",
            path,
            &w1,
            Some(&serde_json::to_vec(&body).unwrap()),
            Duration::from_secs(5),
        )
        .unwrap()
    };
    let env = |command: Command| {
        serde_json::to_value(phalanx_proto::Envelope {
            trace: None,
            request_id: phalanx_controller::client::new_request_id("w1"),
            command,
        })
        .unwrap()
    };
    let register = |id: &str| Command::RegisterWorker {
        id: id.into(),
        address: "127.0.0.1:9".into(),
        device: Default::default(),
    };
    assert_eq!(post("/v1/command", env(register("w1"))).0, 200);
    let (code, b) = post("/v1/command", env(register("w0")));
    assert_eq!(code, 403, "{}", String::from_utf8_lossy(&b));
    let (code, _) = post("/v1/heartbeat", serde_json::json!({"worker": "w0"}));
    assert_eq!(code, 403);
    let (code, _) = http_once(
        &addr,
        "GET",
        "/v1/assignment/w0",
        &w1,
        None,
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(code, 403);
    let (code, _) = http_once(
        &addr,
        "GET",
        "/v1/assignment/w1",
        &w1,
        None,
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(code, 200);
    // Not a rank of any plan: it may not report another worker dead.
    let (code, b) = post(
        "/v1/command",
        env(Command::SetWorkerHealth {
            id: "w0".into(),
            health: phalanx_proto::WorkerHealth::Failed,
            reason: "forged".into(),
            address: None,
        }),
    );
    assert_eq!(code, 403, "{}", String::from_utf8_lossy(&b));
    // Operators' commands need the admin credential.
    let (code, _) = post(
        "/v1/command",
        env(Command::CancelJob { reason: "x".into() }),
    );
    assert_eq!(code, 403);
    // A controller changes only its own membership.
    let other = *c.peers.keys().find(|i| **i != leader).unwrap();
    let ctl = c.creds(&Role::Controller(leader));
    let body =
        serde_json::to_vec(&serde_json::json!({"action": "remove", "id": other, "address": ""}))
            .unwrap();
    let (code, _) = http_once(
        &addr,
        "POST",
        "/v1/members",
        &ctl,
        Some(&body),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(code, 403);
}

#[test]
fn docs_security_md_shows_the_route_table() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/security.md"
    ))
    .expect("docs/security.md");
    assert!(
        doc.contains(&routes::markdown_table()),
        "docs/security.md must contain the route table as `routes::markdown_table()` prints it:\n{}",
        routes::markdown_table()
    );
}
