//! How a rank learns its ring: the peers of `phalanx train`'s local group over stdio,
//! and the security of a cluster epoch's ring ([`epoch_security`]).
//!
//! How `phalanx train` starts a local data-parallel group:
//! The parent spawns N `phalanx worker run --rendezvous stdio` children. Each child binds
//! 127.0.0.1:0, prints a `listening` event with its address on stdout, and waits (with a
//! timeout) for one line on stdin naming every peer's address. Then the ranks connect
//! their ring. Afterwards children print `step`, `done` or `error` events, one JSON
//! object per line; anything else a child prints goes to stderr.
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use phalanx_collective::{EpochSecret, RingCredentials, RingTls, Security};
use phalanx_proto::Assignment;
use serde::{Deserialize, Serialize};

use crate::dp::{RunResult, StepReport};
use crate::WorkerError;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WorkerEvent {
    Listening { rank: usize, addr: SocketAddr },
    Step(StepReport),
    Done { rank: usize, result: Box<RunResult> },
    Error { rank: usize, message: String },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerList {
    pub peers: Vec<SocketAddr>,
    /// The group's secret (64 hex digits), which every ring hello proves: only the
    /// parent's children, who read it from their stdin, can join.
    pub secret: String,
}

/// Prints one event as a JSON line on stdout and flushes it.
pub fn emit(ev: &WorkerEvent) {
    let line = serde_json::to_string(ev).expect("events serialise");
    let mut out = std::io::stdout().lock();
    // A closed stdout means the parent is gone; the group's timeouts end this process.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Announces `addr` and reads the peer list and the group's secret from stdin within
/// `timeout`.
pub fn stdio_peers(
    rank: usize,
    world: usize,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(Vec<SocketAddr>, EpochSecret), WorkerError> {
    emit(&WorkerEvent::Listening { rank, addr });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let r = std::io::stdin().lock().read_line(&mut line).map(|_| line);
        let _ = tx.send(r);
    });
    let line = match rx.recv_timeout(timeout) {
        Ok(Ok(l)) if !l.trim().is_empty() => l,
        Ok(Ok(_)) => {
            return Err(WorkerError::Rendezvous(
                "stdin closed before the peer list arrived".into(),
            ))
        }
        Ok(Err(e)) => {
            return Err(WorkerError::Rendezvous(format!(
                "reading the peer list from stdin: {e}"
            )))
        }
        Err(_) => {
            return Err(WorkerError::Rendezvous(format!(
                "no peer list on stdin within {} ms",
                timeout.as_millis()
            )))
        }
    };
    // The line holds the secret: an error names the fault, never echoes the line.
    let list: PeerList = serde_json::from_str(line.trim()).map_err(|e| {
        WorkerError::Rendezvous(format!(
            "bad peer list on stdin ({} bytes): {e}",
            line.trim().len()
        ))
    })?;
    validate_peers(&list.peers, rank, world, Some(addr))?;
    let secret = EpochSecret::from_hex(&list.secret)
        .map_err(|e| WorkerError::Rendezvous(format!("peer list: {e}")))?;
    Ok((list.peers, secret))
}

/// Checks a peer list: one address per rank, no duplicates, and ours where expected.
pub fn validate_peers(
    peers: &[SocketAddr],
    rank: usize,
    world: usize,
    ours: Option<SocketAddr>,
) -> Result<(), WorkerError> {
    if world == 0 || rank >= world {
        return Err(WorkerError::Rendezvous(format!(
            "rank {rank} is not below world size {world}"
        )));
    }
    if peers.len() != world {
        return Err(WorkerError::Rendezvous(format!(
            "{} peer address(es) for world size {world}",
            peers.len()
        )));
    }
    for (i, a) in peers.iter().enumerate() {
        if peers[..i].contains(a) {
            return Err(WorkerError::Rendezvous(format!(
                "peer address {a} appears twice"
            )));
        }
    }
    if let Some(ours) = ours {
        if peers[rank] != ours {
            return Err(WorkerError::Rendezvous(format!(
                "peer list gives rank {rank} the address {}, but it listens on {ours}",
                peers[rank]
            )));
        }
    }
    Ok(())
}

/// A worker's ring credentials from its credentials directory (`None`: no TLS on the
/// ring; the epoch secret still guards every link). Loaded once, at the worker's start,
/// so that a missing or wrong certificate fails the start, not a later epoch.
pub fn ring_credentials(
    tls: Option<&phalanx_pki::TlsDir>,
    worker_id: &str,
) -> Result<Option<Arc<RingCredentials>>, WorkerError> {
    tls.map(|dir| {
        RingCredentials::load(dir, worker_id)
            .map(Arc::new)
            .map_err(|e| WorkerError::Rendezvous(format!("ring credentials: {e}")))
    })
    .transpose()
}

/// What the ring of assignment `a` must prove: the epoch's secret (the controller gives
/// it to the epoch's ranks only) and, with credentials, mutual TLS in which each
/// neighbour's certificate names the worker the plan puts at its rank.
pub fn epoch_security(
    a: &Assignment,
    creds: Option<&Arc<RingCredentials>>,
) -> Result<Security, WorkerError> {
    let hex = a.epoch_secret.as_ref().ok_or_else(|| {
        WorkerError::Protocol(format!(
            "the assignment of epoch {} gives this worker a rank but no epoch secret",
            a.epoch
        ))
    })?;
    let secret = EpochSecret::from_hex(&hex.0)
        .map_err(|e| WorkerError::Protocol(format!("assignment of epoch {}: {e}", a.epoch)))?;
    let tls = match creds {
        None => None,
        Some(creds) => {
            if a.rank_workers.len() != a.world_size as usize {
                return Err(WorkerError::Protocol(format!(
                    "the assignment of epoch {} names {} rank workers for world size {}",
                    a.epoch,
                    a.rank_workers.len(),
                    a.world_size
                )));
            }
            Some(RingTls {
                creds: creds.clone(),
                peer_workers: a.rank_workers.clone(),
            })
        }
    };
    Ok(Security { secret, tls })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_lists_are_validated() {
        let a: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:1001".parse().unwrap();
        validate_peers(&[a, b], 1, 2, Some(b)).unwrap();
        assert!(validate_peers(&[a, a], 0, 2, None)
            .unwrap_err()
            .to_string()
            .contains("twice"));
        assert!(validate_peers(&[a], 0, 2, None).is_err());
        assert!(validate_peers(&[a, b], 2, 2, None).is_err());
        assert!(validate_peers(&[a, b], 0, 2, Some(b)).is_err());
    }

    fn assignment(secret: Option<&str>) -> Assignment {
        Assignment {
            trace: None,
            worker: "w1".into(),
            rank: Some(1),
            epoch: 4,
            world_size: 2,
            peers: vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
            job: None,
            job_id: Some("j".into()),
            job_state: None,
            resume_step: 0,
            micro_shares: vec![],
            rank_workers: vec!["w0".into(), "w1".into()],
            epoch_secret: secret.map(|s| phalanx_proto::SecretHex(s.into())),
        }
    }

    #[test]
    fn an_epoch_ring_needs_the_epoch_secret() {
        let s = epoch_security(&assignment(Some(&"ab".repeat(32))), None).unwrap();
        assert_eq!(s.secret.bytes(), &[0xab; 32]);
        assert!(s.tls.is_none());
        let e = epoch_security(&assignment(None), None).unwrap_err();
        assert!(e.to_string().contains("no epoch secret"), "{e}");
        let e = epoch_security(&assignment(Some("12")), None).unwrap_err();
        assert!(e.to_string().contains("64 hex digits"), "{e}");
        // The secret never shows in a logged assignment.
        let a = assignment(Some(&"ab".repeat(32)));
        assert!(!format!("{a:?}").contains("abab"));
    }

    #[test]
    fn an_epoch_ring_with_credentials_checks_every_ranks_worker() {
        let dir = tempfile::tempdir().unwrap();
        let tls = phalanx_pki::TlsDir::create(dir.path()).unwrap();
        tls.issue(&phalanx_pki::Role::Worker("w1".into()), &[])
            .unwrap();
        let creds = ring_credentials(Some(&tls), "w1").unwrap();
        let s = epoch_security(&assignment(Some(&"ab".repeat(32))), creds.as_ref()).unwrap();
        assert_eq!(s.tls.unwrap().peer_workers, vec!["w0", "w1"]);
        let mut short = assignment(Some(&"ab".repeat(32)));
        short.rank_workers.pop();
        assert!(epoch_security(&short, creds.as_ref()).is_err());
        // A worker without a certificate of its own fails at its start.
        assert!(ring_credentials(Some(&tls), "w9").is_err());
    }

    #[test]
    fn events_round_trip_as_json_lines() {
        let ev = WorkerEvent::Error {
            rank: 3,
            message: "boom".into(),
        };
        let s = serde_json::to_string(&ev).unwrap();
        assert!(s.contains("\"event\":\"error\""), "{s}");
        let back: WorkerEvent = serde_json::from_str(&s).unwrap();
        assert!(matches!(back, WorkerEvent::Error { rank: 3, .. }));
    }
}
