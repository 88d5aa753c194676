//! The scenario runner's cluster: controllers and worker agents started by the runner
//! itself (each, where hosts are network namespaces, inside its host's namespace), and
//! described in the same `cluster.json` as `phalanx cluster up` writes, so that the
//! operator verbs and `phalanx fault inject` work on it unchanged.
//!
//! Every child is started with `PR_SET_PDEATHSIG = SIGKILL` (it dies with the runner, even
//! a runner that was SIGKILLed) in a process group of its own (a Ctrl-C on the terminal
//! reaches the runner only, which then tears everything down in order). All spawns happen
//! on the runner's main thread: the death signal follows the thread that forked.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use phalanx_chaos::ClusterSpec;
use serde::Serialize;

use crate::ctl::launch;

/// What a process is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Controller(u64),
    Worker(String),
}

pub struct Proc {
    pub role: Role,
    pub host: u32,
    /// `ip:port` of a controller; the listen address of a worker.
    pub address: String,
    pub log: PathBuf,
    pub child: Option<Child>,
    pub pid: u32,
    pub dead_since: Option<Instant>,
    pub restarts: u32,
}

/// The runner's processes and the directory that describes them.
pub struct Procs {
    pub exe: PathBuf,
    pub dir: PathBuf,
    /// The cluster's credentials (`<dir>/tls`).
    pub tls_dir: PathBuf,
    pub procs: Vec<Proc>,
    device: String,
    /// Open handles of the hosts' network namespaces (`None`: everything in this one).
    host_ns: Vec<Option<File>>,
}

// The same shape as `ctl::ClusterFile` (a test reads it back with `ctl::read_cluster`).
#[derive(Serialize)]
struct NodeEntryOut<'a> {
    id: u64,
    address: &'a str,
    data_dir: PathBuf,
    log: &'a Path,
    pid: u32,
}

#[derive(Serialize)]
struct WorkerEntryOut<'a> {
    id: &'a str,
    pid: u32,
    log: &'a Path,
    fault_inbox: Option<PathBuf>,
}

#[derive(Serialize)]
struct ClusterFileOut<'a> {
    tls_dir: &'a Path,
    supervisor_pid: u32,
    controllers: Vec<NodeEntryOut<'a>>,
    workers: Vec<WorkerEntryOut<'a>>,
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Send `sig` to `pid` (no-op for pid 0).
pub use phalanx_controller::proc::signal;

impl Procs {
    /// Lay out the cluster: addresses, logs and `cluster.json`. `hosts`: per host, its
    /// namespace name and address, or `None` for one host on 127.0.0.1.
    pub fn new(
        exe: PathBuf,
        dir: &Path,
        spec: &ClusterSpec,
        hosts: Option<Vec<(String, String)>>,
    ) -> Result<Procs> {
        std::fs::create_dir_all(dir.join("faults"))?;
        std::fs::create_dir_all(dir.join("checkpoints"))?;
        let (host_ns, host_ips) = match &hosts {
            Some(h) => {
                let mut fds = Vec::new();
                for (ns, _) in h {
                    // Where `ip netns add` puts them.
                    let p = Path::new("/var/run/netns").join(ns);
                    fds.push(Some(
                        File::open(&p).with_context(|| format!("opening {}", p.display()))?,
                    ));
                }
                (fds, h.iter().map(|(_, ip)| ip.clone()).collect())
            }
            None => (vec![None], vec!["127.0.0.1".to_string()]),
        };
        let ip_of = |host: u32| host_ips[(host as usize).min(host_ips.len() - 1)].clone();
        let mut procs = Vec::new();
        for id in 1..=spec.controllers as u64 {
            let host = if hosts.is_some() {
                spec.controller_host(id)
            } else {
                0
            };
            let port = if hosts.is_some() {
                7400 + id as u16
            } else {
                free_port()?
            };
            procs.push(Proc {
                role: Role::Controller(id),
                host,
                address: format!("{}:{port}", ip_of(host)),
                log: dir.join(format!("node{id}.log")),
                child: None,
                pid: 0,
                dead_since: None,
                restarts: 0,
            });
        }
        for i in 0..spec.worker_count() {
            let host = if hosts.is_some() {
                spec.worker_host(i)
            } else {
                0
            };
            procs.push(Proc {
                role: Role::Worker(format!("w{i}")),
                host,
                address: format!("{}:0", ip_of(host)),
                log: dir.join(format!("w{i}.log")),
                child: None,
                pid: 0,
                dead_since: None,
                restarts: 0,
            });
        }
        let tls_dir = dir.join("tls");
        crate::ctl::create_credentials(
            &tls_dir,
            &procs
                .iter()
                .filter_map(|p| match p.role {
                    Role::Controller(id) => Some((id, p.address.clone())),
                    Role::Worker(_) => None,
                })
                .collect::<Vec<_>>(),
        )?;
        let p = Procs {
            exe,
            dir: dir.to_path_buf(),
            tls_dir,
            procs,
            device: spec.device.clone(),
            host_ns,
        };
        p.write_cluster_file()?;
        Ok(p)
    }

    /// The operator's admin credentials for this cluster.
    pub fn admin_credentials(&self) -> Result<phalanx_controller::client::Credentials> {
        let tls = phalanx_pki::TlsDir::open(&self.tls_dir)?;
        Ok(phalanx_controller::client::Credentials::role(
            &tls,
            &phalanx_pki::Role::Admin,
        )?)
    }

    pub fn controller_addresses(&self) -> Vec<String> {
        self.procs
            .iter()
            .filter(|p| matches!(p.role, Role::Controller(_)))
            .map(|p| p.address.clone())
            .collect()
    }

    pub fn find(&self, role: &Role) -> Option<&Proc> {
        self.procs.iter().find(|p| &p.role == role)
    }

    /// Who runs on host `h`, in words.
    pub fn on_host(&self, h: u32) -> String {
        self.procs
            .iter()
            .filter(|p| p.host == h)
            .map(|p| match &p.role {
                Role::Controller(id) => format!("controller {id}"),
                Role::Worker(w) => w.clone(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn write_cluster_file(&self) -> Result<()> {
        let out = ClusterFileOut {
            tls_dir: &self.tls_dir,
            supervisor_pid: std::process::id(),
            controllers: self
                .procs
                .iter()
                .filter_map(|p| match p.role {
                    Role::Controller(id) => Some(NodeEntryOut {
                        id,
                        address: &p.address,
                        data_dir: self.dir.join(format!("node{id}")),
                        log: &p.log,
                        pid: p.pid,
                    }),
                    _ => None,
                })
                .collect(),
            workers: self
                .procs
                .iter()
                .filter_map(|p| match &p.role {
                    Role::Worker(id) => Some(WorkerEntryOut {
                        id,
                        pid: p.pid,
                        log: &p.log,
                        fault_inbox: Some(self.dir.join("faults").join(format!("{id}.jsonl"))),
                    }),
                    _ => None,
                })
                .collect(),
        };
        let tmp = self.dir.join("cluster.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&out)?)?;
        std::fs::rename(&tmp, self.dir.join("cluster.json"))?;
        Ok(())
    }

    /// A command for host `host`: death signal, own process group, and the host's
    /// network namespace.
    pub fn command(&self, host: u32, program: &Path) -> Command {
        let mut c = Command::new(program);
        let ns_fd = self
            .host_ns
            .get(host as usize)
            .and_then(|f| f.as_ref())
            .map(|f| f.as_raw_fd());
        // SAFETY: only async-signal-safe calls (prctl, setpgid, setns, getppid) between
        // fork and exec.
        unsafe {
            c.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The runner may have died between fork and prctl.
                if libc::getppid() == 1 {
                    return Err(std::io::Error::other("the runner is gone"));
                }
                libc::setpgid(0, 0);
                if let Some(fd) = ns_fd {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        c
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let peers = launch::peers_arg(self.procs.iter().filter_map(|p| match p.role {
            Role::Controller(id) => Some((id, p.address.as_str())),
            _ => None,
        }));
        let p = &self.procs[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p.log)?;
        let mut c = self.command(p.host, &self.exe);
        match &p.role {
            Role::Controller(id) => launch::controller_args(
                &mut c,
                *id,
                &p.address,
                &peers,
                &self.dir.join(format!("node{id}")),
                &self.tls_dir,
            ),
            Role::Worker(id) => launch::worker_args(
                &mut c,
                &launch::WorkerLaunch {
                    id,
                    device: &self.device,
                    numerics: phalanx_proto::NumericsProfile::default(),
                    dir: &self.dir,
                    fault_inbox: Some(&self.dir.join("faults").join(format!("{id}.jsonl"))),
                    listen: Some(&p.address),
                    json_logs: true,
                },
            ),
        }
        let child = c
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {:?}", p.role))?;
        let p = &mut self.procs[i];
        p.pid = child.id();
        p.child = Some(child);
        p.dead_since = None;
        Ok(())
    }

    /// Start every process that is not running.
    pub fn start_all(&mut self) -> Result<()> {
        for i in 0..self.procs.len() {
            if self.procs[i].child.is_none() {
                self.spawn(i)?;
            }
        }
        self.write_cluster_file()
    }

    /// Reap exits; restart controllers dead for 1 s (as `cluster up` does) and workers
    /// dead for `worker_restart` (never when zero). Returns what happened, for the log.
    pub fn supervise(&mut self, worker_restart: Duration) -> Vec<String> {
        let mut notes = Vec::new();
        let mut changed = false;
        for i in 0..self.procs.len() {
            let p = &mut self.procs[i];
            if let Some(c) = p.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    notes.push(format!("{:?} exited ({st})", p.role));
                    p.child = None;
                    p.dead_since = Some(Instant::now());
                }
            }
            let after = match p.role {
                Role::Controller(_) => Duration::from_secs(1),
                Role::Worker(_) => worker_restart,
            };
            let due = p.dead_since.is_some_and(|t| t.elapsed() >= after);
            if p.child.is_none() && after > Duration::ZERO && due {
                self.procs[i].restarts += 1;
                match self.spawn(i) {
                    Ok(()) => {
                        notes.push(format!("{:?} restarted", self.procs[i].role));
                        changed = true;
                    }
                    Err(e) => notes.push(format!("restarting {:?}: {e:#}", self.procs[i].role)),
                }
            }
        }
        if changed {
            if let Err(e) = self.write_cluster_file() {
                notes.push(format!("recording the restarted pid: {e:#}"));
            }
        }
        notes
    }

    /// SIGKILL every process and wait for each (bounded).
    pub fn kill_all(&mut self) {
        for p in &mut self.procs {
            if let Some(c) = p.child.as_mut() {
                // A stopped process dies of SIGKILL too.
                let _ = c.kill();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for p in &mut self.procs {
            if let Some(mut c) = p.child.take() {
                while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                p.dead_since = Some(Instant::now());
            }
        }
    }

    /// Every process still running, as (what, pid).
    pub fn running(&mut self) -> Vec<(String, u32)> {
        self.procs
            .iter_mut()
            .filter_map(|p| {
                let c = p.child.as_mut()?;
                c.try_wait()
                    .ok()
                    .flatten()
                    .is_none()
                    .then(|| (format!("{:?}", p.role), p.pid))
            })
            .collect()
    }

    pub fn pid_of(&self, role: &Role) -> Result<u32> {
        let p = self
            .find(role)
            .ok_or_else(|| anyhow!("{role:?} is not in this cluster"))?;
        if p.child.is_none() {
            return Err(anyhow!("{role:?} is not running"));
        }
        Ok(p.pid)
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.kill_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The runner's cluster file is the one `cluster up` writes: the operator verbs and
    /// `fault inject` read it.
    #[test]
    fn the_cluster_file_reads_as_cluster_ups() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ClusterSpec {
            spares: 1,
            ..ClusterSpec::default()
        };
        let p = Procs::new(PathBuf::from("/bin/true"), dir.path(), &spec, None).unwrap();
        let cf = crate::ctl::read_cluster(dir.path()).unwrap();
        assert_eq!(cf.controller_addresses(), p.controller_addresses());
        assert_eq!(cf.controller_addresses().len(), 3);
        assert_eq!(cf.supervisor_pid, std::process::id());
        let ids: Vec<&str> = cf.workers.iter().map(|w| w.id.as_str()).collect();
        assert_eq!(ids, ["w0", "w1", "w2", "w3", "w4"]);
        assert!(cf.workers.iter().all(|w| w.fault_inbox.is_some()));
        assert!(cf.tls_dir.unwrap().join("ca.pem").exists());
    }

    #[test]
    fn hosts_put_controllers_apart_when_there_are_enough() {
        let spec = ClusterSpec {
            hosts: 4,
            ..ClusterSpec::default()
        };
        let c: Vec<u32> = (1..=3).map(|id| spec.controller_host(id)).collect();
        let w: Vec<u32> = (0..4).map(|i| spec.worker_host(i)).collect();
        assert_eq!((c, w), (vec![0, 1, 2], vec![3, 3, 3, 3]));
        let spec = ClusterSpec {
            hosts: 3,
            ..ClusterSpec::default()
        };
        let w: Vec<u32> = (0..4).map(|i| spec.worker_host(i)).collect();
        assert_eq!(w, vec![0, 1, 2, 0]);
    }
}
