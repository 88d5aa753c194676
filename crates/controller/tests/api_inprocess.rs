//! The server and client in one process: 3 controllers on loopback.

use std::time::{Duration, Instant};

use phalanx_controller::client::{http_once, Credentials};
use phalanx_controller::server::ServerConfig;
use phalanx_proto::{Command, MemberAction, MemberChange};

mod common;
use common::{free_addr, InProcess, TOKEN};

const LEADER_WAIT: Duration = Duration::from_secs(10);

#[test]
fn three_nodes_in_process_serve_writes_reads_and_fail_over() {
    let mut c = InProcess::start(3, |cfg| cfg);
    let peers = c.peers.clone();
    let (l, term) = c.wait_leader(LEADER_WAIT, 0, None);
    let client = c.client();
    let r = client
        .command_with_id(
            "req-a".into(),
            Command::SetAnnotation {
                key: "x".into(),
                value: "1".into(),
            },
        )
        .unwrap();
    assert!(r.outcome.is_applied() && !r.duplicate);
    let again = client
        .command_with_id(
            "req-a".into(),
            Command::SetAnnotation {
                key: "x".into(),
                value: "1".into(),
            },
        )
        .unwrap();
    assert!(again.duplicate);
    let v: serde_json::Value = client.get("/v1/annotations/x").unwrap();
    assert_eq!(v["value"], "1");
    // Wrong token.
    let (code, _) = http_once(
        &peers[&1],
        "GET",
        "/v1/status",
        &Credentials::insecure("bad"),
        None,
        Duration::from_secs(1),
    )
    .unwrap();
    assert_eq!(code, 401);
    // A follower redirects, once it has heard from the leader (until then it knows no
    // leader and says 503: a follower the commits above did not need can lag).
    let f = (1..=3).find(|i| *i != l).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (code, body) = loop {
        let (code, body) = http_once(
            &peers[&f],
            "GET",
            "/v1/job",
            &Credentials::insecure(TOKEN),
            None,
            Duration::from_secs(1),
        )
        .unwrap();
        if code != 503 || Instant::now() > deadline {
            break (code, body);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, 421, "{}", String::from_utf8_lossy(&body));

    let t0 = Instant::now();
    c.stop(l);
    let (l2, _) = c.wait_leader(LEADER_WAIT, term, Some(l));
    assert_ne!(l2, l);
    eprintln!("failover in {:?}", t0.elapsed());
    let r = client
        .command(Command::SetAnnotation {
            key: "x".into(),
            value: "2".into(),
        })
        .unwrap();
    assert!(r.outcome.is_applied());
    let v: serde_json::Value = client.get("/v1/annotations/x").unwrap();
    assert_eq!(v["value"], "2");
}

/// `POST /v1/members` answers once the change is applied: accepted with the new voters,
/// or refused (409) when it would leave no voter or names a non-member.
#[test]
fn members_answer_says_whether_the_change_was_accepted() {
    let c = InProcess::start(3, |cfg| cfg);
    let peers = &c.peers;
    c.wait_leader(LEADER_WAIT, 0, None);
    let post_bytes = |body: &[u8]| -> (u16, serde_json::Value) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (l, _) = c.wait_leader(LEADER_WAIT, 0, None);
            let (code, b) = http_once(
                &peers[&l],
                "POST",
                "/v1/members",
                &Credentials::insecure(TOKEN),
                Some(body),
                Duration::from_secs(5),
            )
            .unwrap();
            // A leader change in between: ask the new one.
            if (code == 421 || code == 503) && Instant::now() < deadline {
                continue;
            }
            return (code, serde_json::from_slice(&b).unwrap_or_default());
        }
    };
    let post = |body: MemberChange| post_bytes(&serde_json::to_vec(&body).unwrap());
    // Adding a fifth address (no process behind it): 3 of 4 voters still commit.
    let spare = free_addr();
    let change = |action: MemberAction, id: u64, address: &str| MemberChange {
        action,
        id,
        address: address.into(),
    };
    let (code, v) = post(change(MemberAction::Add, 4, &spare));
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["accepted"], true, "{v}");
    assert_eq!(v["voters"], serde_json::json!([1, 2, 3, 4]), "{v}");
    assert!(v["index"].as_u64().unwrap() > 0);
    let (code, v) = post(change(MemberAction::Add, 4, &spare));
    assert_eq!(code, 409, "already a voter: {v}");
    let (code, v) = post(change(MemberAction::Remove, 9, ""));
    assert_eq!(code, 409, "not a voter: {v}");
    // An action outside the vocabulary, node id 0 (which raft-rs would skip silently) and
    // an address that is not HOST:PORT are refused before they reach Raft, and named.
    let (code, v) = post_bytes(br#"{"action": "grow", "id": 5, "address": "127.0.0.1:1"}"#);
    assert_eq!(
        (code, &v["error"]),
        (400, &serde_json::json!("bad_request")),
        "{v}"
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("unknown variant `grow`, expected `add` or `remove`"),
        "{v}"
    );
    for (id, address, want) in [
        (0, spare.as_str(), "id: 0"),
        (5, "nowhere", "is not HOST:PORT"),
    ] {
        let (code, v) = post(change(MemberAction::Add, id, address));
        assert_eq!(code, 400, "{v}");
        assert!(v["message"].as_str().unwrap_or("").contains(want), "{v}");
    }
    // Removing 4 again; the joint state may still be leaving, so retry a refusal briefly.
    let deadline = Instant::now() + Duration::from_secs(10);
    let v = loop {
        let (code, v) = post(change(MemberAction::Remove, 4, ""));
        if code == 200 {
            break v;
        }
        assert_eq!(code, 409, "{v}");
        assert!(
            v["message"].as_str().unwrap_or("").contains("in progress"),
            "{v}"
        );
        assert!(Instant::now() < deadline, "remove never accepted: {v}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(v["voters"], serde_json::json!([1, 2, 3]), "{v}");
}

/// One controller tuned by `tune`, and a raw TCP connection to it that has sent `head`
/// (a request's first lines, with the token; `{addr}` is its address), reads time out
/// after `read_s`.
fn raw_request(
    tune: impl Fn(ServerConfig) -> ServerConfig,
    head: &str,
    read_s: u64,
) -> (InProcess, std::net::TcpStream) {
    use std::io::Write;
    let c = InProcess::start(1, tune);
    c.wait_leader(LEADER_WAIT, 0, None);
    let addr = c.peers[&1].clone();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(read_s)))
        .unwrap();
    let head = head.replace("{addr}", &addr).replace("{token}", TOKEN);
    s.write_all(head.as_bytes()).unwrap();
    (c, s)
}

/// A client that sends a request's headers and then stops (its body never comes) gets 408
/// within `request_max_ms` instead of holding its connection slot.
#[test]
fn a_request_whose_body_never_comes_gets_408() {
    use std::io::Read;
    let (_c, mut s) = raw_request(
        |mut cfg| {
            cfg.http.request_max_ms = 400;
            cfg
        },
        "POST /v1/command HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"request_id\"",
        20,
    );
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        let n = s.read(&mut buf).expect("an answer before the read timeout");
        assert!(
            n > 0,
            "closed without an answer: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&got).to_string();
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
}

/// A kept-alive connection on which nothing moves is closed after `idle_max_ms` (here
/// well before the header read timeout, set to two minutes, could close it), so a client
/// that vanished or stopped reading holds no connection slot for good.
#[test]
fn an_idle_connection_is_closed() {
    use std::io::Read;
    let (_c, mut s) = raw_request(
        |mut cfg| {
            cfg.http.idle_max_ms = 1_000;
            cfg.http.header_timeout_ms = 120_000;
            cfg
        },
        "GET /v1/status HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n",
        30,
    );
    // The answer comes, then nothing moves: the server closes the connection (EOF, or a
    // reset) rather than waiting for a next request for good.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let t0 = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!(
                    "the idle connection was still open after {:?}",
                    t0.elapsed()
                )
            }
            Err(_) => break,
        }
    }
    let answer = String::from_utf8_lossy(&got);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
