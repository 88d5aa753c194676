//! The command lines of a local cluster's processes, in one place: `cluster up` and the
//! scenario runner (and so `phalanx demo`, which runs a scenario) start their controllers
//! and workers with these, after making the cluster's credentials with
//! [`super::create_credentials`]. (`controller bench` runs its controllers in process,
//! with the same credentials.)
use std::path::Path;
use std::process::Command;

use phalanx_proto::{NodeId, NumericsProfile};

/// The `--peers` value: `id=address,...`.
pub fn peers_arg<'a>(nodes: impl IntoIterator<Item = (NodeId, &'a str)>) -> String {
    nodes
        .into_iter()
        .map(|(id, a)| format!("{id}={a}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `controller start` of node `id` listening at `listen`, its data in `data_dir`.
pub fn controller_args(
    c: &mut Command,
    id: NodeId,
    listen: &str,
    peers: &str,
    data_dir: &Path,
    tls_dir: &Path,
) {
    c.args(["controller", "start", "--id", &id.to_string()])
        .args(["--listen", listen, "--peers", peers])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--tls-dir")
        .arg(tls_dir);
}

/// One worker agent of a local cluster.
pub struct WorkerLaunch<'a> {
    pub id: &'a str,
    pub device: &'a str,
    pub numerics: NumericsProfile,
    /// The cluster directory (its `cluster.json` says where the controllers are).
    pub dir: &'a Path,
    pub fault_inbox: Option<&'a Path>,
    /// The collective's listen address; the agent's default when `None`.
    pub listen: Option<&'a str>,
    /// JSON log lines (the scenario runner reads them back).
    pub json_logs: bool,
}

/// `worker start` with its numerics profile's environment from the start (the worker would
/// re-execute otherwise) and `warn,phalanx_worker=info` logs unless `RUST_LOG` says more.
pub fn worker_args(c: &mut Command, w: &WorkerLaunch) {
    if w.json_logs {
        c.args(["--log-format", "json"]);
    }
    c.args(["worker", "start", "--id", w.id, "--device", w.device]);
    if let Some(listen) = w.listen {
        c.args(["--listen", listen]);
    }
    c.arg(format!("--numerics={}", w.numerics))
        .arg("--dir")
        .arg(w.dir);
    if let Some(inbox) = w.fault_inbox {
        c.arg("--fault-inbox").arg(inbox);
    }
    c.env(
        "RUST_LOG",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,phalanx_worker=info".into()),
    );
    crate::util::apply_numerics(w.numerics, c);
}
