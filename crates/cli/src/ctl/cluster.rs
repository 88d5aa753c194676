//! `phalanx cluster up|down`: a local cluster of controllers and worker agents, and the
//! supervisor that restarts them.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use phalanx_proto::NodeId;

use super::output::table;
use super::{read_cluster, record_cluster, write_cluster, ClusterFile, NodeEntry, WorkerEntry};

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Start a local cluster of controllers and supervise it until Ctrl-C.
    Up {
        /// Controllers (Raft voters) to start, 1..=7. 3 tolerate one failure, 5 two;
        /// fewer than 3 tolerate none (a warning says so).
        #[arg(long, default_value_t = 3)]
        controllers: u32,
        /// Cluster directory: data, logs, the token and cluster.json that the other verbs
        /// read.
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
        /// Restart a worker that exited after this long, e.g. `5s` (`0s`: never), as a
        /// node supervisor would; restarted workers rejoin and the world grows back.
        #[arg(long, value_parser = crate::util::parse_duration, default_value = "0s")]
        worker_restart: Duration,
        /// Start workers without the fault-injection hooks (a production-like cluster).
        #[arg(long)]
        no_fault_injection: bool,
        /// Numerics profile of every worker (see docs/training.md).
        #[arg(long, default_value = "x86-64-avx2", value_parser = crate::util::parse_numerics)]
        numerics: phalanx_proto::NumericsProfile,
    },
    /// Stop the cluster started by `cluster up` in DIR.
    Down {
        /// Cluster directory given to `cluster up`.
        #[arg(long, default_value = "./local-cluster")]
        dir: PathBuf,
    },
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn spawn_node(
    exe: &Path,
    n: &NodeEntry,
    peers: &str,
    tls_dir: &Path,
) -> Result<std::process::Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&n.log)?;
    let mut c = std::process::Command::new(exe);
    super::launch::controller_args(&mut c, n.id, &n.address, peers, &n.data_dir, tls_dir);
    let child = c
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
            worker_restart,
            no_fault_injection,
            numerics,
        } => cluster_up(
            controllers,
            &dir,
            base_port,
            &WorkersSpec {
                count: workers + spares,
                device,
                restart_after: worker_restart,
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
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&w.log)?;
    let mut c = std::process::Command::new(exe);
    super::launch::worker_args(
        &mut c,
        &super::launch::WorkerLaunch {
            id: &w.id,
            device: &ws.device,
            numerics: ws.numerics,
            dir,
            fault_inbox: w.fault_inbox.as_deref(),
            listen: None,
            json_logs: false,
        },
    );
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
    super::controller::warn_few_controllers(Some(n as usize));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    if let Ok(old) = read_cluster(&dir) {
        if phalanx_controller::proc::recorded_alive(old.supervisor_pid)
            && old.supervisor_pid != std::process::id()
        {
            bail!("a cluster is already up in {} (supervisor pid {}); run `phalanx cluster down --dir {}`", dir.display(), old.supervisor_pid, dir.display());
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
    let peers = super::launch::peers_arg(nodes.iter().map(|n| (n.id, n.address.as_str())));
    let tls_dir = dir.join("tls");
    super::create_credentials(
        &tls_dir,
        &nodes
            .iter()
            .map(|n| (n.id, n.address.clone()))
            .collect::<Vec<_>>(),
    )?;
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for node in nodes.iter_mut() {
        let c = spawn_node(&exe, node, &peers, &tls_dir)?;
        node.pid = c.id();
        children.push(Some(c));
    }
    let mut cf = ClusterFile {
        token_file: None,
        tls_dir: Some(tls_dir.clone()),
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
    println!(
        "credentials: {} (operators: admin.pem/.key, reader.pem/.key, admin.token, reader.token)",
        tls_dir.display()
    );
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
                                    record_cluster(&dir, &cf);
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
                            match spawn_node(&exe, &nodes[i], &peers, &tls_dir) {
                                Ok(c) => {
                                    eprintln!("controller {} restarted (pid {})", nodes[i].id, c.id());
                                    cf.controllers[i].pid = c.id();
                                    record_cluster(&dir, &cf);
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
    record_cluster(&dir, &cf);
    eprintln!("cluster stopped");
    Ok(())
}

fn cluster_down(dir: &Path) -> Result<()> {
    let c = read_cluster(dir)?;
    let deadline = Instant::now() + Duration::from_secs(6);
    if phalanx_controller::proc::recorded_alive(c.supervisor_pid)
        && phalanx_controller::proc::terminate(c.supervisor_pid)
    {
        while phalanx_controller::proc::is_alive(c.supervisor_pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let mut killed = 0;
    for w in &c.workers {
        if phalanx_controller::proc::recorded_alive(w.pid) {
            phalanx_controller::proc::kill(w.pid);
            killed += 1;
        }
    }
    for n in &c.controllers {
        if phalanx_controller::proc::recorded_alive(n.pid) {
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
