//! `phalanx controller bench`: leader re-election time and committed commands/s.
//!
//! The controllers run in this process (three raft threads, each with its own tokio
//! runtime, sled directory and loopback port). "Killing" the leader stops its raft thread
//! and drops its sockets at once; the followers notice only through missed heartbeats,
//! exactly as with SIGKILL. The end-to-end tests do the real SIGKILL.

use phalanx_proto::RaftRole;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use phalanx_controller::client::{Client, Credentials};
use phalanx_controller::server::{self, ControllerHandle, Security, ServerConfig};
use phalanx_proto::{Command, NodeId, StatusResponse};
use serde::Serialize;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Leader kills to time.
    #[arg(long, default_value_t = 30)]
    kills: u32,
    /// Seconds of the throughput run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent clients of the throughput run.
    #[arg(long, default_value_t = 16)]
    clients: u32,
    /// Raft tick in milliseconds.
    #[arg(long, default_value_t = 10)]
    tick_ms: u64,
    /// Write the results here as JSON.
    #[arg(long, default_value = "bench-out/controller.json")]
    out: PathBuf,
    /// Scratch directory (default: a fresh temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Serialize)]
struct Summary {
    samples: usize,
    median_ms: f64,
    p99_ms: f64,
    min_ms: f64,
    max_ms: f64,
}

fn summary(mut v: Vec<f64>) -> Summary {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let q = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    Summary {
        samples: v.len(),
        median_ms: q(0.5),
        p99_ms: q(0.99),
        min_ms: v[0],
        max_ms: v[v.len() - 1],
    }
}

/// Three in-process controllers with real TLS credentials (made for the run).
struct Cluster {
    dir: PathBuf,
    tls: phalanx_pki::TlsDir,
    admin: Credentials,
    /// One client per node, so that polls reuse their TLS connections.
    per_node: BTreeMap<NodeId, Client>,
    peers: BTreeMap<NodeId, String>,
    nodes: BTreeMap<NodeId, Option<ControllerHandle>>,
    tick_ms: u64,
}

impl Cluster {
    fn new(dir: &Path, n: u64, tick_ms: u64) -> Result<Self> {
        let mut peers = BTreeMap::new();
        for id in 1..=n {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            peers.insert(id, l.local_addr()?.to_string());
        }
        let tls = super::create_credentials(
            &dir.join("tls"),
            &peers
                .iter()
                .map(|(i, a)| (*i, a.clone()))
                .collect::<Vec<_>>(),
        )?;
        let admin = Credentials::role(&tls, &phalanx_pki::Role::Admin)?;
        let per_node = peers
            .iter()
            .map(|(id, a)| Ok((*id, Client::new(vec![a.clone()], admin.clone())?)))
            .collect::<Result<_>>()?;
        let mut c = Cluster {
            per_node,
            dir: dir.to_path_buf(),
            tls,
            admin,
            peers,
            nodes: BTreeMap::new(),
            tick_ms,
        };
        for id in 1..=n {
            c.start(id)?;
        }
        Ok(c)
    }

    fn start(&mut self, id: NodeId) -> Result<()> {
        let mut cfg = ServerConfig::new(
            id,
            self.peers[&id].clone(),
            self.peers.clone(),
            self.dir.join(format!("node{id}")),
            Security::tls(&self.tls, id)?,
        );
        cfg.tick_ms = self.tick_ms;
        // sled releases its directory lock shortly after the old instance stops.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match server::start(cfg.clone()) {
                Ok(h) => {
                    self.nodes.insert(id, Some(h));
                    return Ok(());
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(%e, "restart retry");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e).context(format!("starting controller {id}")),
            }
        }
    }

    fn status(&self, id: NodeId) -> Option<StatusResponse> {
        self.per_node[&id]
            .status_all_within(Duration::from_millis(300))
            .pop()?
            .1
            .ok()
    }

    /// The leader that every live node agrees on.
    fn wait_leader(
        &self,
        timeout: Duration,
        above_term: u64,
        exclude: Option<NodeId>,
    ) -> Result<(NodeId, u64)> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            for id in self.peers.keys().filter(|i| Some(**i) != exclude) {
                if let Some(s) = self.status(*id) {
                    if s.role == RaftRole::Leader && s.term > above_term {
                        return Ok((s.node_id, s.term));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        bail!("no leader within {timeout:?}")
    }

    fn client(&self) -> Result<Client> {
        Ok(Client::new(
            self.peers.values().cloned().collect(),
            self.admin.clone(),
        )?)
    }
}

pub fn run(a: BenchArgs) -> Result<()> {
    let tmp;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            tmp = std::env::temp_dir().join(format!("phalanx-ctl-bench-{}", std::process::id()));
            tmp
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;

    // ---- throughput: 3 durable nodes vs raw sled on one node
    eprintln!(
        "throughput: {} clients for {} s on 3 controllers",
        a.clients, a.seconds
    );
    let mut cluster = Cluster::new(&dir.join("tput"), 3, a.tick_ms)?;
    cluster.wait_leader(Duration::from_secs(10), 0, None)?;
    let done = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for c in 0..a.clients {
        let client = cluster.client()?;
        let (done, count, errors) = (done.clone(), count.clone(), errors.clone());
        threads.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !done.load(Ordering::Relaxed) {
                i += 1;
                let cmd = Command::SetAnnotation {
                    key: format!("c{c}"),
                    value: i.to_string(),
                };
                match client.command(cmd) {
                    Ok(r) if r.outcome.is_applied() => {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(a.seconds));
    done.store(true, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    for t in threads {
        let _ = t.join();
    }
    let committed = count.load(Ordering::Relaxed);
    let cmds_per_s = committed as f64 / elapsed;
    for (_, h) in std::mem::take(&mut cluster.nodes) {
        if let Some(h) = h {
            h.stop();
        }
    }

    let raw_dir = dir.join("raw-sled");
    let raw_per_s = raw_sled(&raw_dir, a.seconds)?;
    eprintln!(
        "  committed commands/s: {cmds_per_s:.0}   raw sled insert+flush+fsync/s: {raw_per_s:.0}"
    );

    // ---- re-election
    eprintln!("re-election: {} leader kills", a.kills);
    let mut cluster = Cluster::new(&dir.join("elect"), 3, a.tick_ms)?;
    let (mut leader, mut term) = cluster.wait_leader(Duration::from_secs(10), 0, None)?;
    let mut samples = Vec::new();
    for k in 0..a.kills {
        let h = cluster.nodes.get_mut(&leader).and_then(Option::take);
        let t_kill = Instant::now();
        // Drop the leader's sockets and raft thread in a helper thread, so the clock runs
        // from the instant of the kill, not from the end of the shutdown.
        let stopper = std::thread::spawn(move || {
            if let Some(h) = h {
                h.stop();
            }
        });
        let (new_leader, new_term) =
            cluster.wait_leader(Duration::from_secs(10), term, Some(leader))?;
        let ms = t_kill.elapsed().as_secs_f64() * 1e3;
        samples.push(ms);
        let _ = stopper.join();
        eprintln!(
            "  kill {:>2}: node {leader} -> node {new_leader} in {ms:.0} ms",
            k + 1
        );
        cluster.start(leader)?;
        // Let the restarted node rejoin as a follower before the next kill.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if cluster
                .status(leader)
                .is_some_and(|s| s.leader_id == new_leader && s.role == RaftRole::Follower)
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(100));
        leader = new_leader;
        term = new_term;
    }
    for (_, h) in std::mem::take(&mut cluster.nodes) {
        if let Some(h) = h {
            h.stop();
        }
    }
    let reelection = summary(samples);
    eprintln!(
        "  re-election median {:.0} ms, p99 {:.0} ms",
        reelection.median_ms, reelection.p99_ms
    );

    let result = serde_json::json!({
        "bench": "controller",
        "config": {"controllers": 3, "tick_ms": a.tick_ms, "election_tick": 50, "election_timeout_ticks": "50..100",
                   "clients": a.clients, "seconds": a.seconds, "kills": a.kills},
        "reelection_ms": reelection,
        "throughput": {"committed_commands_per_s": cmds_per_s, "committed": committed,
                       "client_errors": errors.load(Ordering::Relaxed)},
        "raw_sled": {"insert_flush_fsync_per_s": raw_per_s},
    });
    if let Some(p) = a.out.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(&a.out, serde_json::to_vec_pretty(&result)?)?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// One writer doing what the raft storage does per Ready, without raft: insert, flush,
/// fsync of the sled files.
fn raw_sled(dir: &Path, seconds: u64) -> Result<f64> {
    Ok(phalanx_controller::storage::bench_raw_sled(
        dir,
        Duration::from_secs(seconds),
    )?)
}
