//! Operator verbs of the controller, split along their seams:
//!
//! - [`cluster`]: `cluster up` / `cluster down` (a local cluster and its supervisor),
//! - [`controller`]: `controller start|add|remove|bench`,
//! - [`dashboard`]: `dashboard` (the address of the leader's live web page),
//! - [`launch`]: the command lines of a local cluster's controllers and workers,
//! - [`ops`]: `status`, `job`, `events`, `checkpoint list`, `worker drain|undrain|restore`,
//! - [`output`]: tables, JSON and how an outcome is reported.
//!
//! This module holds what they share: where the controllers are ([`Target`]) and the
//! cluster directory file written by `cluster up`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use phalanx_controller::client::{Client, Credentials};
use phalanx_pki::{Role, TlsDir};
use phalanx_proto::NodeId;
use serde::{Deserialize, Serialize};

pub mod bench;
pub mod cluster;
pub mod controller;
pub mod dashboard;
pub mod launch;
pub mod ops;
pub mod output;

pub use cluster::ClusterCmd;
pub use controller::ControllerCmd;
pub use ops::{CheckpointCmd, EventsCmd, JobCmd, StatusCmd, WorkerOpCmd};
pub use output::Output;

/// Where to find the controllers (`--controllers` or a cluster directory) and which
/// credentials to present (docs/security.md). (A worker agent takes only this; the
/// operator verbs take a [`Target`].)
#[derive(Args, Debug, Clone)]
pub struct Endpoint {
    /// Controller addresses, comma-separated (any node answers; writes go to the leader).
    #[arg(long, env = "PHALANX_CONTROLLERS", value_delimiter = ',')]
    pub controllers: Vec<String>,
    /// Cluster directory written by `phalanx cluster up` (addresses and credentials).
    /// Default: ./local-cluster when it exists.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Credentials directory (CA, certificates, tokens; default: DIR/tls).
    #[arg(long, env = "PHALANX_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Present the read-only operator credential instead of the admin one.
    #[arg(long)]
    pub read_only: bool,
    /// A bearer token file: with TLS, an operator token (admin.token or reader.token)
    /// instead of a client certificate; with `--insecure`, the shared token.
    /// `PHALANX_TOKEN` also works.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Plain HTTP with a shared token, for a cluster started with `--insecure`
    /// (loopback benchmarks only).
    #[arg(long)]
    pub insecure: bool,
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

    /// An operator's client (admin, or reader with `--read-only`) that reports an
    /// unreachable cluster after `--wait` (exit code 3).
    pub fn client(&self) -> Result<Client> {
        self.bounded(self.endpoint.client()?)
    }

    /// As [`Target::client`], presenting `role`'s credentials.
    pub fn client_as(&self, role: &Role) -> Result<Client> {
        self.bounded(self.endpoint.client_as(role)?)
    }

    fn bounded(&self, mut c: Client) -> Result<Client> {
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
    /// The shared token of an `--insecure` cluster (none with TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// The credentials directory of a TLS cluster (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
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

/// [`write_cluster`] from a supervisor that must go on whatever happens: a failure is said
/// on stderr (the record keeps an exited process's pid; `fault` and `cluster down` then
/// refuse to signal it, as it is no phalanx process).
pub(crate) fn record_cluster(dir: &Path, c: &ClusterFile) {
    if let Err(e) = write_cluster(dir, c) {
        eprintln!(
            "WARNING: could not record the new pids in {}: {e:#}",
            cluster_file(dir).display()
        );
    }
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

    /// The credentials directory this endpoint uses, unless it is `--insecure` (then
    /// `None`): `--tls-dir`, else the cluster directory's.
    pub fn tls_dir_in_use(&self) -> Result<Option<TlsDir>> {
        let cf = self.dir().as_deref().map(read_cluster).transpose()?;
        let insecure_file = cf.as_ref().and_then(|c| c.token_file.clone());
        if self.insecure || (insecure_file.is_some() && self.tls_dir.is_none()) {
            return Ok(None);
        }
        let dir = self
            .tls_dir
            .clone()
            .or_else(|| cf.as_ref().and_then(|c| c.tls_dir.clone()))
            .or_else(|| self.dir().map(|d| d.join("tls")));
        Ok(match dir {
            Some(d) => Some(TlsDir::open(&d)?),
            None => None,
        })
    }

    /// An operator's client (admin, or reader with `--read-only`) with the default bounds
    /// (it keeps trying for 10 s).
    pub fn client(&self) -> Result<Client> {
        let role = if self.read_only {
            Role::Reader
        } else {
            Role::Admin
        };
        self.client_as(&role)
    }

    /// A client presenting `role`'s credentials.
    pub fn client_as(&self, role: &Role) -> Result<Client> {
        let dir = self.dir();
        let mut addrs: Vec<String> = self
            .controllers
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect();
        let cf = dir.as_deref().map(read_cluster).transpose()?;
        if let Some(c) = &cf {
            if addrs.is_empty() {
                addrs = c.controller_addresses();
            }
        }
        if addrs.is_empty() {
            return crate::outcome::usage(
                "no controllers: pass --controllers ADDR,... or --dir DIR (from `phalanx cluster up`)",
            );
        }
        let token = match &self.token_file {
            Some(f) => Some(read_token(f)?),
            None => std::env::var("PHALANX_TOKEN")
                .ok()
                .filter(|t| !t.trim().is_empty()),
        };
        let insecure_file = cf.as_ref().and_then(|c| c.token_file.clone());
        let creds = if self.insecure || (insecure_file.is_some() && self.tls_dir.is_none()) {
            let token = match (token, insecure_file) {
                (Some(t), _) => t,
                (None, Some(f)) => read_token(&f)?,
                (None, None) => bail!(
                    "--insecure needs the shared token: pass --token-file F or set PHALANX_TOKEN"
                ),
            };
            Credentials::insecure(token)
        } else {
            let tls_dir = self
                .tls_dir
                .clone()
                .or_else(|| cf.as_ref().and_then(|c| c.tls_dir.clone()))
                .or_else(|| dir.as_ref().map(|d| d.join("tls")))
                .ok_or_else(|| {
                    anyhow!(
                        "no credentials: pass --dir DIR (from `phalanx cluster up`) or \
                         --tls-dir DIR (see docs/security.md)"
                    )
                })?;
            let tls = TlsDir::open(&tls_dir)?;
            match token {
                Some(t) => Credentials::tls_with_token(&tls, t)?,
                None => credentials_for(&tls, role)?,
            }
        };
        Ok(Client::new(addrs, creds)?)
    }
}

/// `role`'s client credentials from `tls`. A worker certificate that is missing is issued
/// when the CA key is at hand (a local cluster adding a worker); otherwise the error names
/// the file to provide.
pub fn credentials_for(tls: &TlsDir, role: &Role) -> Result<Credentials> {
    if let Role::Worker(_) = role {
        if !tls.has_identity(role) && tls.path().join("ca.key").exists() {
            tls.issue(role, &[])?;
        }
    }
    Ok(Credentials::role(tls, role)?)
}

/// Creates a local cluster's credentials in `dir` (`<cluster dir>/tls`): the CA, the
/// operator certificates and tokens, and one certificate per controller (valid for its
/// address's host and `localhost`). Workers' certificates are issued as they start.
pub fn create_credentials(dir: &Path, controllers: &[(NodeId, String)]) -> Result<TlsDir> {
    let tls = TlsDir::create(dir)?;
    for r in [Role::Admin, Role::Reader] {
        tls.issue(&r, &[])?;
    }
    for (id, addr) in controllers {
        let host = addr
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
            .unwrap_or_else(|| addr.clone());
        tls.issue(&Role::Controller(*id), &[host, "localhost".into()])?;
    }
    Ok(tls)
}
