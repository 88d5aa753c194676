//! Operator verbs of the controller: `controller`, `cluster`, `status`, `job`,
//! `checkpoint`, `events` and `worker drain`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use phalanx_controller::client::Client;
use phalanx_controller::server::{self, ServerConfig};
use phalanx_proto::{
    CheckpointInfo, Command, CommandResponse, Event, JobInfo, NodeId, StatusResponse,
};
use serde::{Deserialize, Serialize};

pub mod bench;
mod export;

/// Where to find the controllers: `--controllers` or a cluster directory.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// Controller addresses, comma-separated (any node answers; writes go to the leader).
    #[arg(long, env = "PHALANX_CONTROLLERS", value_delimiter = ',')]
    controllers: Vec<String>,
    /// Cluster directory written by `phalanx cluster up` (addresses and token file).
    /// Default: ./local-cluster when it exists.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// File holding the cluster token (default: DIR/token). `PHALANX_TOKEN` also works.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
pub enum ControllerCmd {
    /// Run one controller node in the foreground.
    Start(StartArgs),
    /// Add a controller to the cluster (joint consensus). Start it first with `--join`.
    Add {
        #[arg(long)]
        id: NodeId,
        #[arg(long)]
        address: String,
        #[command(flatten)]
        target: Target,
    },
    /// Benchmark: leader re-election time and committed commands/s (writes JSON).
    Bench(bench::BenchArgs),
    /// Remove a controller from the cluster (joint consensus).
    Remove {
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
    /// File holding the cluster token; else `PHALANX_TOKEN`.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Start empty and wait to be added with `phalanx controller add`.
    #[arg(long)]
    join: bool,
    /// This node's data dir was lost: start empty, have its id removed and added back by
    /// the running cluster, and catch up from a snapshot. Without it a node with an empty
    /// data dir that the cluster knows refuses to start.
    #[arg(long, conflicts_with = "join")]
    rejoin: bool,
    /// Raft tick in milliseconds (election after 10-20 ticks, heartbeat every 2).
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

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Start a local cluster of controllers and supervise it until Ctrl-C.
    Up {
        #[arg(long, default_value_t = 3)]
        controllers: u32,
        #[arg(long, default_value = "./local-cluster")]
        dir: PathBuf,
        /// First port; 0 picks free ports.
        #[arg(long, default_value_t = 0)]
        base_port: u16,
        /// Worker agents (emulated GPUs) to start, `w0`, `w1`, ...
        #[arg(long, default_value_t = 0)]
        workers: u32,
        /// Extra workers beyond the job's maximum world size: they wait as spares.
        #[arg(long, default_value_t = 0)]
        spares: u32,
        /// Emulated GPU model of every worker.
        #[arg(long, default_value = "emulated:H100-SXM-80GB")]
        device: String,
        /// Restart a worker that exited after this many seconds (0: never), as a node
        /// supervisor would; restarted workers rejoin and the world grows back.
        #[arg(long, default_value_t = 0)]
        worker_restart_s: u64,
        /// Start workers without the fault-injection hooks (a production-like cluster).
        #[arg(long)]
        no_fault_injection: bool,
        /// Numerics profile of every worker (see docs/training.md).
        #[arg(long, default_value = "x86-64-avx2", value_parser = crate::model::parse_numerics)]
        numerics: phalanx_proto::NumericsProfile,
    },
    /// Stop the cluster started by `cluster up` in DIR.
    Down {
        #[arg(long, default_value = "./local-cluster")]
        dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum JobCmd {
    /// Print a complete, commented job file.
    Init {
        #[arg(long, default_value = "tiny")]
        model: String,
        #[arg(long, default_value_t = 60)]
        steps: u64,
    },
    /// Validate and submit a job file (TOML).
    Submit {
        file: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// Show the job, its plan and progress.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Cancel the running job.
    Cancel {
        #[arg(long, default_value = "cancelled by operator")]
        reason: String,
        #[command(flatten)]
        target: Target,
    },
    /// Write the job's newest durable checkpoint (or --step) as a safetensors file, for
    /// `phalanx sample`.
    Export {
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Export this checkpoint step instead of the newest durable one.
        #[arg(long)]
        step: Option<u64>,
        /// The cluster's checkpoint root (default: DIR/checkpoints with --dir).
        #[arg(long)]
        checkpoint_dir: Option<PathBuf>,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Args, Debug)]
pub struct DrainCmd {
    /// Worker id.
    id: String,
    #[arg(long, default_value = "operator drain")]
    reason: String,
    #[command(flatten)]
    target: Target,
}

#[derive(Subcommand, Debug)]
pub enum CheckpointCmd {
    /// List the checkpoint catalog.
    List {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Args, Debug)]
pub struct StatusCmd {
    #[command(flatten)]
    target: Target,
}

#[derive(Args, Debug)]
pub struct EventsCmd {
    /// Show the last N events.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    #[command(flatten)]
    target: Target,
}

// ------------------------------------------------------------------ cluster directory

#[derive(Debug, Serialize, Deserialize, Clone)]
struct NodeEntry {
    id: NodeId,
    address: String,
    data_dir: PathBuf,
    log: PathBuf,
    pid: u32,
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub(crate) struct WorkerEntry {
    pub id: String,
    pub pid: u32,
    pub log: PathBuf,
    /// The worker's fault inbox, when fault injection is enabled.
    pub fault_inbox: Option<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub(crate) struct ClusterFile {
    pub token_file: PathBuf,
    pub supervisor_pid: u32,
    controllers: Vec<NodeEntry>,
    #[serde(default)]
    pub workers: Vec<WorkerEntry>,
}

impl ClusterFile {
    pub fn controller_addresses(&self) -> Vec<String> {
        self.controllers.iter().map(|c| c.address.clone()).collect()
    }

    /// Pid of controller `id`.
    pub fn controller_pid(&self, id: NodeId) -> Option<u32> {
        self.controllers.iter().find(|c| c.id == id).map(|c| c.pid)
    }
}

fn cluster_file(dir: &Path) -> PathBuf {
    dir.join("cluster.json")
}

pub(crate) fn read_cluster(dir: &Path) -> Result<ClusterFile> {
    let p = cluster_file(dir);
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "reading {} (is a cluster up in {}?)",
            p.display(),
            dir.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

fn write_cluster(dir: &Path, c: &ClusterFile) -> Result<()> {
    let tmp = dir.join("cluster.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(c)?)?;
    std::fs::rename(&tmp, cluster_file(dir))?;
    Ok(())
}

fn read_token(path: &Path) -> Result<String> {
    let t = std::fs::read_to_string(path)
        .with_context(|| format!("reading token file {}", path.display()))?;
    let t = t.trim().to_string();
    if t.is_empty() {
        bail!("token file {} is empty", path.display());
    }
    Ok(t)
}

impl Target {
    /// The cluster directory in use, if any (explicit, or ./local-cluster by default).
    pub(crate) fn dir(&self) -> Option<PathBuf> {
        self.dir.clone().or_else(|| {
            let d = PathBuf::from("./local-cluster");
            (self.controllers.is_empty() && cluster_file(&d).exists()).then_some(d)
        })
    }

    pub(crate) fn client(&self) -> Result<Client> {
        let dir = self.dir.clone().or_else(|| {
            let d = PathBuf::from("./local-cluster");
            (self.controllers.is_empty() && cluster_file(&d).exists()).then_some(d)
        });
        let mut addrs: Vec<String> = self
            .controllers
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect();
        let mut token_file = self.token_file.clone();
        if let Some(d) = &dir {
            let c = read_cluster(d)?;
            if addrs.is_empty() {
                addrs = c.controllers.iter().map(|n| n.address.clone()).collect();
            }
            token_file = token_file.or(Some(c.token_file));
        }
        if addrs.is_empty() {
            bail!("no controllers: pass --controllers ADDR,... or --dir DIR (from `phalanx cluster up`)");
        }
        let token = match token_file {
            Some(f) => read_token(&f)?,
            None => std::env::var("PHALANX_TOKEN").map_err(|_| {
                anyhow!("no token: pass --token-file F, --dir DIR or set PHALANX_TOKEN")
            })?,
        };
        Ok(Client::new(addrs, token)?)
    }
}

// ------------------------------------------------------------------ output helpers

fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.len());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:<width$}", c, width = w[i]))
            .collect();
        s.join("  ").trim_end().to_string()
    };
    let mut out = vec![line(headers.iter().map(|s| s.to_string()).collect())];
    for r in rows {
        out.push(line(r.clone()));
    }
    out.join("\n")
}

fn print_json(v: &impl Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn report(resp: &CommandResponse, json: bool) -> Result<()> {
    if json {
        print_json(resp)?;
    } else {
        let dup = if resp.duplicate {
            " (duplicate request, applied once)"
        } else {
            ""
        };
        println!("{} at index {}{dup}", resp.outcome.message(), resp.index);
    }
    if !resp.outcome.is_applied() {
        bail!("rejected: {}", resp.outcome.message());
    }
    Ok(())
}

// ------------------------------------------------------------------ verbs

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
                    action: "add".into(),
                    id,
                    address,
                },
            )?;
            if target.json {
                print_json(&v)
            } else {
                println!(
                    "accepted: add controller {id} (index {}; voters now {})",
                    v["index"], v["voters"]
                );
                Ok(())
            }
        }
        ControllerCmd::Remove { id, target } => {
            let c = target.client()?;
            let v: serde_json::Value = c.post(
                "/v1/members",
                &phalanx_proto::MemberChange {
                    action: "remove".into(),
                    id,
                    address: String::new(),
                },
            )?;
            if target.json {
                print_json(&v)
            } else {
                println!(
                    "accepted: remove controller {id} (index {}; voters now {})",
                    v["index"], v["voters"]
                );
                Ok(())
            }
        }
    }
}

fn parse_peers(peers: &[String]) -> Result<BTreeMap<NodeId, String>> {
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
    let token = match &a.token_file {
        Some(f) => read_token(f)?,
        None => std::env::var("PHALANX_TOKEN")
            .map_err(|_| anyhow!("no cluster token: pass --token-file F or set PHALANX_TOKEN"))?,
    };
    let peers = parse_peers(&a.peers)?;
    let mut cfg = ServerConfig::new(a.id, a.listen.clone(), peers, a.data_dir.clone(), token);
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

fn random_token() -> Result<String> {
    let mut f = std::fs::File::open("/dev/urandom").context("opening /dev/urandom")?;
    let mut b = [0u8; 24];
    f.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn spawn_node(
    exe: &Path,
    n: &NodeEntry,
    peers: &str,
    token_file: &Path,
) -> Result<std::process::Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&n.log)?;
    let child = std::process::Command::new(exe)
        .args([
            "controller",
            "start",
            "--id",
            &n.id.to_string(),
            "--listen",
            &n.address,
            "--peers",
            peers,
        ])
        .arg("--data-dir")
        .arg(&n.data_dir)
        .arg("--token-file")
        .arg(token_file)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting controller {}", n.id))?;
    Ok(child)
}

pub fn cluster(cmd: ClusterCmd) -> Result<()> {
    match cmd {
        ClusterCmd::Up {
            controllers,
            dir,
            base_port,
            workers,
            spares,
            device,
            worker_restart_s,
            no_fault_injection,
            numerics,
        } => cluster_up(
            controllers,
            &dir,
            base_port,
            &WorkersSpec {
                count: workers + spares,
                device,
                restart_after: Duration::from_secs(worker_restart_s),
                faults: !no_fault_injection,
                numerics,
            },
        ),
        ClusterCmd::Down { dir } => cluster_down(&dir),
    }
}

struct WorkersSpec {
    count: u32,
    device: String,
    restart_after: Duration,
    faults: bool,
    numerics: phalanx_proto::NumericsProfile,
}

fn spawn_worker(
    exe: &Path,
    dir: &Path,
    w: &WorkerEntry,
    ws: &WorkersSpec,
) -> Result<std::process::Child> {
    let device = ws.device.as_str();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&w.log)?;
    let mut c = std::process::Command::new(exe);
    c.args(["worker", "start", "--id", &w.id, "--device", device])
        .arg(format!("--numerics={}", ws.numerics))
        .arg("--dir")
        .arg(dir)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,phalanx_worker=info".into()),
        );
    if let Some(inbox) = &w.fault_inbox {
        c.arg("--fault-inbox").arg(inbox);
    }
    // The profile's environment from the start (the worker would re-execute otherwise).
    phalanx_worker::numerics::apply(ws.numerics, &mut c);
    c.stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting worker {}", w.id))
}

fn cluster_up(n: u32, dir: &Path, base_port: u16, ws: &WorkersSpec) -> Result<()> {
    if !(1..=7).contains(&n) {
        bail!("--controllers: {n} (expected 1..=7; 3 or 5 tolerate 1 or 2 failures)");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    if let Ok(old) = read_cluster(&dir) {
        if phalanx_controller::proc::is_alive(old.supervisor_pid)
            && old.supervisor_pid != std::process::id()
        {
            bail!("a cluster is already up in {} (supervisor pid {}); run `phalanx cluster down --dir {}`", dir.display(), old.supervisor_pid, dir.display());
        }
    }
    let token_file = dir.join("token");
    if !token_file.exists() {
        std::fs::write(&token_file, random_token()? + "\n")?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    // Reuse the addresses of an earlier run in this directory: the data dirs remember them.
    let previous = read_cluster(&dir).ok();
    let mut nodes = Vec::new();
    for id in 1..=n as NodeId {
        let address = match previous
            .as_ref()
            .and_then(|p| p.controllers.iter().find(|c| c.id == id))
        {
            Some(p) => p.address.clone(),
            None if base_port != 0 => format!("127.0.0.1:{}", base_port as u64 + id - 1),
            None => format!("127.0.0.1:{}", free_port()?),
        };
        nodes.push(NodeEntry {
            id,
            address,
            data_dir: dir.join(format!("node{id}")),
            log: dir.join(format!("node{id}.log")),
            pid: 0,
        });
    }
    let peers: String = nodes
        .iter()
        .map(|n| format!("{}={}", n.id, n.address))
        .collect::<Vec<_>>()
        .join(",");
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for node in nodes.iter_mut() {
        let c = spawn_node(&exe, node, &peers, &token_file)?;
        node.pid = c.id();
        children.push(Some(c));
    }
    let mut cf = ClusterFile {
        token_file: token_file.clone(),
        supervisor_pid: std::process::id(),
        controllers: nodes.clone(),
        workers: Vec::new(),
    };
    write_cluster(&dir, &cf)?;
    let mut worker_children = Vec::new();
    if ws.count > 0 {
        std::fs::create_dir_all(dir.join("faults"))?;
        std::fs::create_dir_all(dir.join("checkpoints"))?;
    }
    for i in 0..ws.count {
        let id = format!("w{i}");
        let mut w = WorkerEntry {
            log: dir.join(format!("{id}.log")),
            fault_inbox: ws
                .faults
                .then(|| dir.join("faults").join(format!("{id}.jsonl"))),
            id,
            pid: 0,
        };
        let c = spawn_worker(&exe, &dir, &w, ws)?;
        w.pid = c.id();
        cf.workers.push(w);
        worker_children.push(Some(c));
    }
    write_cluster(&dir, &cf)?;
    println!(
        "{}",
        table(
            &["ID", "ADDRESS", "PID", "DATA", "LOG"],
            &nodes
                .iter()
                .map(|n| vec![
                    n.id.to_string(),
                    n.address.clone(),
                    n.pid.to_string(),
                    n.data_dir.display().to_string(),
                    n.log.display().to_string()
                ])
                .collect::<Vec<_>>(),
        )
    );
    println!("token file: {}", token_file.display());
    println!(
        "controllers: {}",
        nodes
            .iter()
            .map(|n| n.address.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
    for w in &cf.workers {
        println!("worker {}  pid {}  log {}", w.id, w.pid, w.log.display());
    }
    println!("try: phalanx status --dir {}", dir.display());
    println!("supervising (a crashed controller restarts after 1 s); Ctrl-C or `phalanx cluster down --dir {}` stops the cluster", dir.display());

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stop = rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut dead_since: Vec<Option<Instant>> = vec![None; nodes.len()];
        let mut worker_dead_since: Vec<Option<Instant>> = vec![None; worker_children.len()];
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return Ok::<_, anyhow::Error>("interrupt"),
                _ = term.recv() => return Ok("terminate"),
                _ = tick.tick() => {
                    for (i, slot) in worker_children.iter_mut().enumerate() {
                        let exited = slot.as_mut().and_then(|c| c.try_wait().ok().flatten());
                        if let Some(status) = exited {
                            eprintln!("worker {} exited ({status})", cf.workers[i].id);
                            *slot = None;
                            worker_dead_since[i] = Some(Instant::now());
                        }
                        let due = worker_dead_since[i].is_some_and(|t| t.elapsed() >= ws.restart_after);
                        if slot.is_none() && ws.restart_after > Duration::ZERO && due {
                            match spawn_worker(&exe, &dir, &cf.workers[i], ws) {
                                Ok(c) => {
                                    eprintln!("worker {} restarted (pid {})", cf.workers[i].id, c.id());
                                    cf.workers[i].pid = c.id();
                                    let _ = write_cluster(&dir, &cf);
                                    *slot = Some(c);
                                    worker_dead_since[i] = None;
                                }
                                Err(e) => eprintln!("restarting worker {}: {e:#}", cf.workers[i].id),
                            }
                        }
                    }
                    for (i, slot) in children.iter_mut().enumerate() {
                        let exited = match slot.as_mut() {
                            Some(c) => c.try_wait().ok().flatten().map(|s| s.to_string()),
                            None => None,
                        };
                        if let Some(status) = exited {
                            eprintln!("controller {} exited ({status}); restarting in 1 s", nodes[i].id);
                            *slot = None;
                            dead_since[i] = Some(Instant::now());
                        }
                        if slot.is_none() && dead_since[i].is_some_and(|t| t.elapsed() >= Duration::from_secs(1)) {
                            match spawn_node(&exe, &nodes[i], &peers, &token_file) {
                                Ok(c) => {
                                    eprintln!("controller {} restarted (pid {})", nodes[i].id, c.id());
                                    cf.controllers[i].pid = c.id();
                                    let _ = write_cluster(&dir, &cf);
                                    *slot = Some(c);
                                    dead_since[i] = None;
                                }
                                Err(e) => eprintln!("restarting controller {}: {e:#}", nodes[i].id),
                            }
                        }
                    }
                }
            }
        }
    })?;
    eprintln!("{stop}: stopping workers and controllers");
    for c in worker_children.iter_mut().flatten() {
        let _ = c.kill();
        let _ = c.wait();
    }
    for c in children.iter_mut().flatten() {
        phalanx_controller::proc::terminate(c.id());
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    for c in children.iter_mut().flatten() {
        while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    cf.supervisor_pid = 0;
    let _ = write_cluster(&dir, &cf);
    eprintln!("cluster stopped");
    Ok(())
}

fn cluster_down(dir: &Path) -> Result<()> {
    let c = read_cluster(dir)?;
    let deadline = Instant::now() + Duration::from_secs(6);
    if c.supervisor_pid != 0 && phalanx_controller::proc::terminate(c.supervisor_pid) {
        while phalanx_controller::proc::is_alive(c.supervisor_pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let mut killed = 0;
    for w in &c.workers {
        if w.pid != 0 && phalanx_controller::proc::is_alive(w.pid) {
            phalanx_controller::proc::kill(w.pid);
            killed += 1;
        }
    }
    for n in &c.controllers {
        if n.pid != 0 && phalanx_controller::proc::is_alive(n.pid) {
            phalanx_controller::proc::kill(n.pid);
            killed += 1;
        }
    }
    println!(
        "cluster in {} stopped{}",
        dir.display(),
        if killed > 0 {
            format!(" ({killed} processes killed)")
        } else {
            String::new()
        }
    );
    Ok(())
}

#[derive(Serialize)]
struct NodeView {
    address: String,
    reachable: bool,
    node_id: Option<NodeId>,
    role: Option<String>,
    term: Option<u64>,
    commit_index: Option<u64>,
    applied_index: Option<u64>,
    error: Option<String>,
}

#[derive(Serialize)]
struct ClusterStatus {
    leader_id: NodeId,
    term: u64,
    members: Vec<phalanx_proto::ControllerMember>,
    commit_index: u64,
    workers: Vec<phalanx_proto::WorkerInfo>,
    job: Option<JobInfo>,
    nodes: Vec<NodeView>,
}

pub fn status(cmd: StatusCmd) -> Result<()> {
    let client = cmd.target.client()?;
    let all = client.status_all();
    let ok: Vec<&StatusResponse> = all.iter().filter_map(|(_, r)| r.as_ref().ok()).collect();
    if ok.is_empty() {
        let errs: Vec<String> = all
            .iter()
            .map(|(a, r)| format!("{a}: {}", r.as_ref().err().cloned().unwrap_or_default()))
            .collect();
        if errs.iter().any(|e| e.contains("401")) {
            bail!(
                "unauthorized (401): wrong cluster token ({})",
                errs.join("; ")
            );
        }
        bail!("no controller answered: {}", errs.join("; "));
    }
    // The view of the leader with the highest term, else of the most advanced node.
    let best = ok
        .iter()
        .filter(|s| s.role == "leader")
        .max_by_key(|s| s.term)
        .or_else(|| ok.iter().max_by_key(|s| (s.term, s.commit_index)))
        .copied()
        .ok_or_else(|| anyhow!("no status"))?;
    let nodes: Vec<NodeView> = all
        .iter()
        .map(|(a, r)| match r {
            Ok(s) => NodeView {
                address: a.clone(),
                reachable: true,
                node_id: Some(s.node_id),
                role: Some(s.role.clone()),
                term: Some(s.term),
                commit_index: Some(s.commit_index),
                applied_index: Some(s.applied_index),
                error: None,
            },
            Err(e) => NodeView {
                address: a.clone(),
                reachable: false,
                node_id: None,
                role: None,
                term: None,
                commit_index: None,
                applied_index: None,
                error: Some(e.clone()),
            },
        })
        .collect();
    let view = ClusterStatus {
        leader_id: if best.role == "leader" {
            best.node_id
        } else {
            best.leader_id
        },
        term: best.term,
        members: best.members.clone(),
        commit_index: best.commit_index,
        workers: best.workers.clone(),
        job: best.job.clone(),
        nodes,
    };
    if cmd.target.json {
        return print_json(&view);
    }
    let leader = if view.leader_id == 0 {
        "none".to_string()
    } else {
        view.leader_id.to_string()
    };
    println!(
        "leader: {leader}   term: {}   commit index: {}   members: {}",
        view.term,
        view.commit_index,
        view.members.len()
    );
    println!();
    println!(
        "{}",
        table(
            &["NODE", "ADDRESS", "ROLE", "TERM", "COMMIT", "APPLIED"],
            &view
                .nodes
                .iter()
                .map(|n| vec![
                    n.node_id.map(|i| i.to_string()).unwrap_or("?".into()),
                    n.address.clone(),
                    n.role.clone().unwrap_or_else(|| format!(
                        "unreachable ({})",
                        n.error.clone().unwrap_or_default()
                    )),
                    n.term.map(|t| t.to_string()).unwrap_or_default(),
                    n.commit_index.map(|t| t.to_string()).unwrap_or_default(),
                    n.applied_index.map(|t| t.to_string()).unwrap_or_default(),
                ])
                .collect::<Vec<_>>(),
        )
    );
    println!();
    if view.workers.is_empty() {
        println!("workers: none registered");
    } else {
        println!(
            "{}",
            table(
                &["WORKER", "ADDRESS", "DEVICE", "HEALTH", "REASON"],
                &view
                    .workers
                    .iter()
                    .map(|w| vec![
                        w.id.clone(),
                        w.address.clone(),
                        format!("{}:{}", w.device.kind, w.device.index),
                        w.health.as_str().into(),
                        w.health_reason.clone()
                    ])
                    .collect::<Vec<_>>(),
            )
        );
    }
    println!();
    print_job(view.job.as_ref());
    Ok(())
}

fn print_job(job: Option<&JobInfo>) {
    match job {
        None => println!("job: none"),
        Some(j) => {
            println!(
                "job: {}  state: {}  model: {}  progress: {}/{} steps  epoch: {}",
                j.spec.name,
                j.state.as_str(),
                j.spec.model,
                j.progress_step,
                j.spec.steps,
                j.plan
                    .as_ref()
                    .map(|p| p.epoch.to_string())
                    .unwrap_or("-".into())
            );
            if let Some(p) = &j.plan {
                let rows: Vec<Vec<String>> = p
                    .ranks
                    .iter()
                    .enumerate()
                    .map(|(r, w)| {
                        vec![
                            r.to_string(),
                            w.clone(),
                            j.rank_steps
                                .get(r)
                                .map(|s| s.to_string())
                                .unwrap_or_default(),
                        ]
                    })
                    .collect();
                println!("{}", table(&["RANK", "WORKER", "STEP"], &rows));
            }
            if let Some(sha) = &j.params_sha256 {
                println!("params_sha256: {sha}");
            }
            if !j.recoveries.is_empty() {
                println!();
                let rows: Vec<Vec<String>> = j
                    .recoveries
                    .iter()
                    .map(|r| {
                        vec![
                            r.epoch.to_string(),
                            r.resumed_at_step.to_string(),
                            r.steps_redone.to_string(),
                            r.mttr_ms
                                .map(|m| format!("{:.2}", m as f64 / 1e3))
                                .unwrap_or("-".into()),
                            r.source.clone(),
                        ]
                    })
                    .collect();
                println!(
                    "{}",
                    table(
                        &["EPOCH", "RESUMED AT", "REDONE", "MTTR s", "STATE FROM"],
                        &rows
                    )
                );
            }
            if let Some(e) = phalanx_core::effective_training_time(j) {
                println!("effective training time: {:.1}% (training wall time minus the recovery windows)", e * 100.0);
            }
            if !j.checkpoint_stall_us.is_empty() {
                let mut v = j.checkpoint_stall_us.clone();
                v.sort_unstable();
                println!(
                    "checkpoint stall: median {:.2} ms, max {:.2} ms over the last {} checkpoints",
                    v[v.len() / 2] as f64 / 1e3,
                    v[v.len() - 1] as f64 / 1e3,
                    v.len()
                );
            }
        }
    }
}

pub fn job(cmd: JobCmd) -> Result<()> {
    match cmd {
        JobCmd::Init { model, steps } => {
            let t = phalanx_core::job_template(&model, steps).map_err(|e| anyhow!("{e}"))?;
            print!("{t}");
            Ok(())
        }
        JobCmd::Submit { file, target } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading job file {}", file.display()))?;
            let spec = phalanx_core::parse_job_toml(&text)
                .map_err(|e| anyhow!("{}: {e}", file.display()))?;
            let c = target.client()?;
            report(&c.command(Command::SubmitJob { spec })?, target.json)
        }
        JobCmd::Status { target } => {
            let c = target.client()?;
            let job: Option<JobInfo> = c.get("/v1/job")?;
            if target.json {
                print_json(&job)
            } else {
                print_job(job.as_ref());
                Ok(())
            }
        }
        JobCmd::Cancel { reason, target } => {
            let c = target.client()?;
            report(&c.command(Command::CancelJob { reason })?, target.json)
        }
        JobCmd::Export {
            out,
            step,
            checkpoint_dir,
            target,
        } => export::export(&out, step, checkpoint_dir, &target),
    }
}

pub fn drain(cmd: DrainCmd) -> Result<()> {
    let c = cmd.target.client()?;
    report(
        &c.command(Command::DrainWorker {
            id: cmd.id,
            reason: cmd.reason,
        })?,
        cmd.target.json,
    )
}

pub fn checkpoint(cmd: CheckpointCmd) -> Result<()> {
    let CheckpointCmd::List { target } = cmd;
    let c = target.client()?;
    let cps: Vec<CheckpointInfo> = c.get("/v1/checkpoints")?;
    if target.json {
        return print_json(&cps);
    }
    if cps.is_empty() {
        println!("no checkpoints");
        return Ok(());
    }
    println!(
        "{}",
        table(
            &["JOB", "STEP", "EPOCH", "SHARDS", "BYTES", "DURABLE"],
            &cps.iter()
                .map(|c| vec![
                    c.job.clone(),
                    c.step.to_string(),
                    c.epoch.to_string(),
                    c.shards.len().to_string(),
                    c.shards.iter().map(|s| s.bytes).sum::<u64>().to_string(),
                    if c.durable { "yes".into() } else { "no".into() }
                ])
                .collect::<Vec<_>>(),
        )
    );
    Ok(())
}

pub fn events(cmd: EventsCmd) -> Result<()> {
    let c = cmd.target.client()?;
    let evs: Vec<Event> = c.get(&format!("/v1/events?limit={}", cmd.limit))?;
    if cmd.target.json {
        return print_json(&evs);
    }
    if evs.is_empty() {
        println!("no events");
        return Ok(());
    }
    println!(
        "{}",
        table(
            &["SEQ", "INDEX", "KIND", "SUBJECT", "REASON"],
            &evs.iter()
                .map(|e| vec![
                    e.seq.to_string(),
                    e.index.to_string(),
                    e.kind.clone(),
                    e.subject.clone(),
                    e.reason.clone()
                ])
                .collect::<Vec<_>>(),
        )
    );
    Ok(())
}
