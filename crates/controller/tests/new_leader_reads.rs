//! A read that reaches a brand-new leader before its first commit in the term.
//!
//! One real controller (node 1) runs with two fake peers played by this test over the peer
//! protocol: node 2 grants node 1 its (pre-)votes and answers heartbeats, but holds back
//! its acknowledgement of the new leader's first entry; node 3 never answers. raft-rs
//! refuses ReadIndex until the leader has committed an entry of its term, so the read
//! must wait for that commit (and then be served at once) rather than time out.

use phalanx_proto::RaftRole;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phalanx_controller::client::{http_once, Credentials};
use phalanx_controller::server::{self, Security, ServerConfig};
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};

mod common;
use common::{status, TOKEN};

fn frame(b: &[u8]) -> Vec<u8> {
    let mut f = (b.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(b);
    f
}

fn read_frame(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).ok()?;
    Some(buf)
}

/// Accept node 1's connections to a fake peer; every message goes to `tx`. Connections
/// that ask for acknowledgements get them (a cumulative u64 count of bytes read).
fn fake_inbox(l: TcpListener, tx: mpsc::Sender<Message>, stop: Arc<AtomicBool>) {
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut s, _)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            s.set_nonblocking(false).unwrap();
            let (tx, stop) = (tx.clone(), stop.clone());
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut magic = [0u8; 4];
                if s.read_exact(&mut magic).is_err() {
                    return;
                }
                let Some(hs) = read_frame(&mut s) else { return };
                let hs: serde_json::Value = serde_json::from_slice(&hs).unwrap();
                let acks = hs["acks"].as_bool().unwrap_or(false);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let Some(b) = read_frame(&mut s) else { return };
                    n += 4 + b.len() as u64;
                    if acks && s.write_all(&n.to_be_bytes()).is_err() {
                        return;
                    }
                    if b.is_empty() {
                        continue; // keepalive
                    }
                    if tx.send(Message::parse_from_bytes(&b).unwrap()).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// Node 2's answer of type `t` to `m`.
fn reply(m: &Message, t: MessageType) -> Message {
    let mut r = Message::default();
    r.set_msg_type(t);
    r.from = 2;
    r.to = 1;
    r.term = m.term;
    r
}

#[test]
fn read_on_new_leader_waits_for_first_commit_then_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr1 = l1.local_addr().unwrap().to_string();
    drop(l1);
    let fake2 = TcpListener::bind("127.0.0.1:0").unwrap();
    let fake3 = TcpListener::bind("127.0.0.1:0").unwrap();
    let peers: BTreeMap<u64, String> = [
        (1, addr1.clone()),
        (2, fake2.local_addr().unwrap().to_string()),
        (3, fake3.local_addr().unwrap().to_string()),
    ]
    .into();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx2, rx2) = mpsc::channel();
    let (tx3, _rx3) = mpsc::channel();
    fake_inbox(fake2, tx2, stop.clone());
    fake_inbox(fake3, tx3, stop.clone());

    let mut cfg = ServerConfig::new(
        1,
        addr1.clone(),
        peers,
        dir.path().join("n1"),
        Security::insecure(TOKEN),
    );
    cfg.request_timeout_ms = 3_000;
    let node = server::start(cfg).unwrap();

    // Node 2's outgoing link to node 1.
    let mut out = TcpStream::connect(&addr1).unwrap();
    out.write_all(b"PHXR").unwrap();
    out.write_all(&frame(
        serde_json::json!({"from": 2, "token": TOKEN})
            .to_string()
            .as_bytes(),
    ))
    .unwrap();
    let mut send = move |m: Message| {
        out.write_all(&frame(&m.write_to_bytes().unwrap())).unwrap();
    };

    // Play node 2 until node 1 has sent its first entry as leader; hold back the ack.
    let deadline = Instant::now() + Duration::from_secs(20);
    let first_append = loop {
        assert!(Instant::now() < deadline, "node 1 never became leader");
        let Ok(m) = rx2.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        match m.get_msg_type() {
            MessageType::MsgRequestPreVote => {
                send(reply(&m, MessageType::MsgRequestPreVoteResponse))
            }
            MessageType::MsgRequestVote => send(reply(&m, MessageType::MsgRequestVoteResponse)),
            MessageType::MsgAppend if !m.entries.is_empty() => break m,
            _ => {}
        }
    };
    let s = status(&addr1).expect("status of node 1");
    assert_eq!(s.role, RaftRole::Leader);
    assert!(
        s.commit_index < first_append.index + 1,
        "node 1 committed its first entry without a quorum: {s:?}"
    );

    // From now on node 2 answers heartbeats (check-quorum and ReadIndex need them), and
    // acknowledges appends only once `release` is set.
    let release = Arc::new(AtomicBool::new(false));
    let (rel, stop2) = (release.clone(), stop.clone());
    let responder = std::thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) {
            let Ok(m) = rx2.recv_timeout(Duration::from_millis(5)) else {
                continue;
            };
            match m.get_msg_type() {
                MessageType::MsgHeartbeat => {
                    let mut r = reply(&m, MessageType::MsgHeartbeatResponse);
                    r.context = m.context.clone();
                    send(r);
                }
                MessageType::MsgAppend if rel.load(Ordering::SeqCst) => {
                    let mut r = reply(&m, MessageType::MsgAppendResponse);
                    r.index = m.index + m.entries.len() as u64;
                    send(r);
                }
                _ => {}
            }
        }
    });

    // A linearizable read now reaches a leader with no commit in its term.
    let a = addr1.clone();
    let sent = Instant::now();
    let read = std::thread::spawn(move || {
        let r = http_once(
            &a,
            "GET",
            "/v1/annotations/x",
            &Credentials::insecure(TOKEN),
            None,
            Duration::from_secs(10),
        );
        (r, Instant::now())
    });
    // Give the read time to reach the raft thread before the commit (ordering only: the
    // assertions below hold either way once the fix is in).
    std::thread::sleep(Duration::from_millis(300));
    let s = status(&addr1).expect("status of node 1");
    assert!(
        s.role == RaftRole::Leader && s.commit_index <= first_append.index,
        "node 1 lost leadership or committed without node 2: {s:?}"
    );

    // Let node 2 acknowledge the first entry (raft retransmits it on the next heartbeat
    // response): node 1 commits.
    release.store(true, Ordering::SeqCst);
    let acked = Instant::now();
    let served = read.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    responder.join().unwrap();
    let (result, at) = served;
    let (code, body) = result.expect("read answered");
    let after_commit = at.saturating_duration_since(acked);
    eprintln!(
        "read sent {:?} before the first commit was acknowledged; answered {:?} after it ({code})",
        acked - sent,
        after_commit
    );
    assert_eq!(
        code,
        200,
        "the read was refused: {}",
        String::from_utf8_lossy(&body)
    );
    assert!(
        after_commit < Duration::from_millis(500),
        "the read was answered {after_commit:?} after the leader's first commit"
    );
    node.stop();
}
