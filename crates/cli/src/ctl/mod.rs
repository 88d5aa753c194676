//! Operator verbs of the controller, split along their seams:
//!
//! - [`cluster`]: `cluster up` / `cluster down` (a local cluster and its supervisor),
//! - [`controller`]: `controller start|add|remove|bench`,
//! - [`dashboard`]: `dashboard` (the address of the leader's live web page),
//! - [`ops`]: `status`, `job`, `events`, `checkpoint list`, `worker drain|undrain|restore`,
//! - [`output`]: tables, JSON and how an outcome is reported.
//!
//! This module holds what they share: where the controllers are ([`Target`]) and the
//! cluster directory file written by `cluster up`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use phalanx_controller::client::Client;
use phalanx_proto::NodeId;
use serde::{Deserialize, Serialize};

pub mod bench;
pub mod cluster;
pub mod controller;
pub mod dashboard;
pub mod ops;
pub mod output;

pub use cluster::ClusterCmd;
pub use controller::ControllerCmd;
pub use ops::{CheckpointCmd, EventsCmd, JobCmd, StatusCmd, WorkerOpCmd};
pub use output::Output;

/// Where to find the controllers: `--controllers` or a cluster directory, and the token.
/// (A worker agent takes only this; the operator verbs take a [`Target`].)
#[derive(Args, Debug, Clone)]
pub struct Endpoint {
    /// Controller addresses, comma-separated (any node answers; writes go to the leader).
    #[arg(long, env = "PHALANX_CONTROLLERS", value_delimiter = ',')]
    pub controllers: Vec<String>,
    /// Cluster directory written by `phalanx cluster up` (addresses and token file).
    /// Default: ./local-cluster when it exists.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// File holding the cluster token (default: DIR/token). `PHALANX_TOKEN` also works.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// An operator verb's cluster: where the controllers are, how long to wait for them and
/// how to print the answer.
#[derive(Args, Debug, Clone)]
pub struct Target {
    #[command(flatten)]
    pub endpoint: Endpoint,
    /// Output format: a table for people or JSON for scripts.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Print JSON (the same as `--output json`).
    #[arg(long)]
    pub json: bool,
    /// How long to keep trying when no controller answers at all, e.g. `1500ms`, `30s`
    /// (then exit code 3). A cluster that answers but is electing a leader gets 10 s.
    #[arg(long, value_parser = crate::util::parse_duration, default_value = "1500ms")]
    pub wait: Duration,
}

impl Target {
    /// Print JSON rather than a table?
    pub fn json(&self) -> bool {
        self.json || self.output == Output::Json
    }

    /// The cluster directory in use, if any (explicit, or ./local-cluster by default).
    pub fn dir(&self) -> Option<PathBuf> {
        self.endpoint.dir()
    }

    /// A client that reports an unreachable cluster after `--wait` (exit code 3).
    pub fn client(&self) -> Result<Client> {
        let mut c = self.endpoint.client()?;
        c.unreachable_after = Some(self.wait);
        c.deadline = c.deadline.max(self.wait);
        Ok(c)
    }
}

// ------------------------------------------------------------------ cluster directory

#[derive(Debug, Serialize, Deserialize, Clone)]
pub(crate) struct NodeEntry {
    pub id: NodeId,
    pub address: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub pid: u32,
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct WorkerEntry {
    pub id: String,
    pub pid: u32,
    pub log: PathBuf,
    /// The worker's fault inbox, when fault injection is enabled.
    pub fault_inbox: Option<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct ClusterFile {
    pub token_file: PathBuf,
    pub supervisor_pid: u32,
    pub(crate) controllers: Vec<NodeEntry>,
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

pub(crate) fn cluster_file(dir: &Path) -> PathBuf {
    dir.join("cluster.json")
}

pub fn read_cluster(dir: &Path) -> Result<ClusterFile> {
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

pub(crate) fn write_cluster(dir: &Path, c: &ClusterFile) -> Result<()> {
    let tmp = dir.join("cluster.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(c)?)?;
    std::fs::rename(&tmp, cluster_file(dir))?;
    Ok(())
}

pub(crate) fn read_token(path: &Path) -> Result<String> {
    let t = std::fs::read_to_string(path)
        .with_context(|| format!("reading token file {}", path.display()))?;
    let t = t.trim().to_string();
    if t.is_empty() {
        bail!("token file {} is empty", path.display());
    }
    Ok(t)
}

impl Endpoint {
    /// The cluster directory in use, if any (explicit, or ./local-cluster by default).
    pub fn dir(&self) -> Option<PathBuf> {
        self.dir.clone().or_else(|| {
            let d = PathBuf::from("./local-cluster");
            (self.controllers.is_empty() && cluster_file(&d).exists()).then_some(d)
        })
    }

    /// A client with the default bounds (it keeps trying for 10 s).
    pub fn client(&self) -> Result<Client> {
        let dir = self.dir();
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
            return crate::outcome::usage(
                "no controllers: pass --controllers ADDR,... or --dir DIR (from `phalanx cluster up`)",
            );
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
