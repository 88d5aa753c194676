//! `phalanx controller start|add|remove|bench`: one controller node and the membership.
use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};
use phalanx_controller::server::{self, Security, ServerConfig};
use phalanx_proto::NodeId;

use super::bench;
use super::output::print_json;
use super::Target;

#[derive(Subcommand, Debug)]
pub enum ControllerCmd {
    /// Run one controller node in the foreground.
    Start(StartArgs),
    /// Add a controller to the cluster (joint consensus). Start it first with `--join`.
    Add {
        /// The new node's id (>= 1, not used by another member).
        #[arg(long)]
        id: NodeId,
        /// The new node's address (HOST:PORT), as it was started with `--listen`.
        #[arg(long)]
        address: String,
        #[command(flatten)]
        target: Target,
    },
    /// Benchmark: leader re-election time and committed commands/s (writes JSON).
    Bench(bench::BenchArgs),
    /// Remove a controller from the cluster (joint consensus).
    Remove {
        /// The id of the member to remove.
        #[arg(long)]
        id: NodeId,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Args, Debug)]
pub struct StartArgs {
    /// This node's id (>= 1).
    #[arg(long)]
    id: NodeId,
    /// Address to listen on (peers, workers and operators share it).
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: String,
    /// Every controller of the initial cluster: ID=ADDR,ID=ADDR,... (this one included).
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    /// Directory of this node's sled storage.
    #[arg(long)]
    data_dir: PathBuf,
    /// Credentials directory: the CA, this controller's certificate and key
    /// (`controller-<ID>.pem/.key`), the operator tokens and the epoch key
    /// (docs/security.md).
    #[arg(long, env = "PHALANX_TLS_DIR", required_unless_present = "insecure")]
    tls_dir: Option<PathBuf>,
    /// No TLS and one shared token for every role (--token-file or PHALANX_TOKEN):
    /// anyone who can reach the port and holds the token can do anything, and everything
    /// travels in clear text. For loopback benchmarks only.
    #[arg(long, conflicts_with = "tls_dir")]
    insecure: bool,
    /// With --insecure: the file holding the shared token; else `PHALANX_TOKEN`.
    #[arg(long, requires = "insecure")]
    token_file: Option<PathBuf>,
    /// Start empty and wait to be added with `phalanx controller add`.
    #[arg(long)]
    join: bool,
    /// This node's data dir was lost: start empty, have its id removed and added back by
    /// the running cluster, and catch up from a snapshot. Without it a node with an empty
    /// data dir that the cluster knows refuses to start.
    #[arg(long, conflicts_with = "join")]
    rejoin: bool,
    /// Raft tick in milliseconds (election after 50-100 ticks, heartbeat every 5).
    #[arg(long, default_value_t = 10)]
    tick_ms: u64,
    /// Snapshot the state and compact the log every this many entries.
    #[arg(long, default_value_t = 1000)]
    snapshot_entries: u64,
    /// Worker lease: suspect after this long without a heartbeat.
    #[arg(long, default_value_t = 2000)]
    suspect_after_ms: u64,
    /// Worker lease: failed after this long without a heartbeat.
    #[arg(long, default_value_t = 5000)]
    fail_after_ms: u64,
    /// A failed worker whose heartbeats come back rejoins after this long without a gap.
    #[arg(long, default_value_t = 3000)]
    rejoin_after_ms: u64,
    /// A peer's report that a worker is silent is confirmed (the worker failed) when that
    /// worker's heartbeats have also been missing this long.
    #[arg(long, default_value_t = 500)]
    silent_confirm_ms: u64,
}

pub fn controller(cmd: ControllerCmd) -> Result<()> {
    match cmd {
        ControllerCmd::Start(a) => start(a),
        ControllerCmd::Bench(a) => bench::run(a),
        ControllerCmd::Add {
            id,
            address,
            target,
        } => {
            let c = target.client()?;
            let v: serde_json::Value = c.post(
                "/v1/members",
                &phalanx_proto::MemberChange {
                    action: phalanx_proto::MemberAction::Add,
                    id,
                    address,
                },
            )?;
            if target.json() {
                print_json(&v)
            } else {
                println!(
                    "controller {id} added (log index {}; voters now {})",
                    v["index"], v["voters"]
                );
                warn_few_controllers(v["voters"].as_array().map(|a| a.len()));
                Ok(())
            }
        }
        ControllerCmd::Remove { id, target } => {
            let c = target.client()?;
            let v: serde_json::Value = c.post(
                "/v1/members",
                &phalanx_proto::MemberChange {
                    action: phalanx_proto::MemberAction::Remove,
                    id,
                    address: String::new(),
                },
            )?;
            if target.json() {
                print_json(&v)
            } else {
                println!(
                    "controller {id} removed (log index {}; voters now {})",
                    v["index"], v["voters"]
                );
                warn_few_controllers(v["voters"].as_array().map(|a| a.len()));
                Ok(())
            }
        }
    }
}

pub(crate) fn parse_peers(peers: &[String]) -> Result<BTreeMap<NodeId, String>> {
    let mut out = BTreeMap::new();
    for p in peers.iter().filter(|p| !p.is_empty()) {
        let (id, addr) = p
            .split_once('=')
            .ok_or_else(|| anyhow!("--peers: {p:?} is not ID=ADDR"))?;
        let id: NodeId = id
            .parse()
            .map_err(|_| anyhow!("--peers: {id:?} is not a node id"))?;
        if addr.is_empty() {
            bail!("--peers: node {id} has an empty address");
        }
        out.insert(id, addr.to_string());
    }
    Ok(out)
}

fn start(a: StartArgs) -> Result<()> {
    let security = match (&a.tls_dir, a.insecure) {
        (Some(d), false) => Security::tls(&phalanx_pki::TlsDir::open(d)?, a.id)?,
        (None, true) => {
            let token = match &a.token_file {
                Some(f) => super::read_token(f)?,
                None => std::env::var("PHALANX_TOKEN")
                    .map_err(|_| anyhow!("--insecure: pass --token-file F or set PHALANX_TOKEN"))?,
            };
            eprintln!(
                "WARNING: controller {} runs with --insecure: no TLS, and one shared token \
                 grants every role. Use it only for loopback benchmarks.",
                a.id
            );
            Security::insecure(token)
        }
        _ => bail!(
            "pass --tls-dir DIR (see docs/security.md), or --insecure for a loopback benchmark"
        ),
    };
    let peers = parse_peers(&a.peers)?;
    let mut cfg = ServerConfig::new(a.id, a.listen.clone(), peers, a.data_dir.clone(), security);
    cfg.join = a.join;
    cfg.rejoin = a.rejoin;
    cfg.tick_ms = a.tick_ms;
    cfg.snapshot_entries = a.snapshot_entries;
    cfg.lease.suspect_after_ms = a.suspect_after_ms;
    cfg.lease.fail_after_ms = a.fail_after_ms;
    cfg.lease.rejoin_after_ms = a.rejoin_after_ms;
    cfg.lease.silent_confirm_ms = a.silent_confirm_ms;
    let h = server::start(cfg)?;
    eprintln!(
        "controller {} listening on {} (data in {})",
        a.id,
        h.local_addr,
        a.data_dir.display()
    );
    h.wait();
    bail!("controller {} stopped (see the log above)", a.id)
}

/// Fewer than 3 controllers tolerate no controller failure: say so where it happens.
pub(crate) fn warn_few_controllers(voters: Option<usize>) {
    if let Some(n) = voters.filter(|n| *n < 3) {
        eprintln!(
            "warning: {n} controller{} tolerate{} no controller failure; 3 tolerate 1, 5 tolerate 2",
            if n == 1 { "" } else { "s" },
            if n == 1 { "s" } else { "" }
        );
    }
}
