//! `phalanx worker start`: a worker agent that joins a cluster through its controllers.
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use phalanx_train::device::DeviceRequest;
use phalanx_worker::agent::{self, AgentConfig};

use crate::ctl::Target;

#[derive(Args, Debug)]
pub struct WorkerStartCmd {
    /// This worker's id (unique in the cluster), e.g. `w0`.
    #[arg(long)]
    pub id: String,
    #[command(flatten)]
    pub target: Target,
    /// Device: `emulated[:MODEL]` (see `phalanx devices`) or `cuda:N`.
    #[arg(long, default_value = "emulated:H100-SXM-80GB")]
    pub device: String,
    /// Override an emulated GPU's memory capacity, in GiB.
    #[arg(long)]
    pub memory_gib: Option<f64>,
    /// Address for collective traffic from peers.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Directory of the job's checkpoints, shared by the workers (default: DIR/checkpoints
    /// with --dir).
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Committed checkpoints to keep.
    #[arg(long, default_value_t = 3)]
    pub checkpoint_retain: usize,
    /// Milliseconds between heartbeats to the controller (they carry step progress and
    /// silence reports).
    #[arg(long, default_value_t = 100)]
    pub heartbeat_interval_ms: u64,
    /// A peer that makes no progress in a collective for this many median step times is
    /// reported to the controller at once (which confirms it against the peer's
    /// heartbeats); --op-timeout-ms stays the outer bound.
    #[arg(long, env = "PHALANX_SILENCE_FACTOR", default_value_t = 4.0)]
    pub silence_factor: f64,
    /// ... but never sooner than this.
    #[arg(long, env = "PHALANX_SILENCE_FLOOR_MS", default_value_t = 150)]
    pub silence_floor_ms: u64,
    /// Bound on every collective; a dead or hung peer is detected within it.
    #[arg(long, default_value_t = 3_000)]
    pub op_timeout_ms: u64,
    /// Milliseconds to wait for every rank of a new plan epoch to connect before the
    /// attempt fails.
    #[arg(long, default_value_t = 10_000)]
    pub rendezvous_timeout_ms: u64,
    /// Compare parameter hashes across replicas every N steps (0 disables).
    #[arg(long, default_value_t = 1)]
    pub sdc_check_interval: u64,
    /// Recompute a neighbour's micro-batch and compare gradients every N steps (0
    /// disables; costs one micro-batch of compute per rank each time).
    #[arg(long, default_value_t = 10)]
    pub grad_check_interval: u64,
    /// Exit when the job completes or is cancelled.
    #[arg(long)]
    pub exit_when_done: bool,
    /// Fault-injection inbox (chaos testing; `phalanx cluster up` sets it). Without it the
    /// worker has no fault hooks.
    #[arg(long)]
    pub fault_inbox: Option<PathBuf>,
    /// Exit with an error after this many seconds (0: run until stopped).
    #[arg(long, default_value_t = 0)]
    pub lifetime_max_s: u64,
    /// Numerics profile this worker computes under (reported at registration; it gets a
    /// rank only in jobs of this profile). See docs/training.md.
    #[arg(long, default_value = "x86-64-avx2", value_parser = crate::model::parse_numerics)]
    pub numerics: phalanx_proto::NumericsProfile,
    /// Serve this worker's metrics at http://ADDR/metrics in the Prometheus text format
    /// (plain HTTP, numbers only, for a scrape on a trusted network; port 0 picks one, the
    /// log names it). Off without it. See docs/observability.md.
    #[arg(long, env = "PHALANX_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

pub fn start(cmd: WorkerStartCmd) -> Result<()> {
    // First of all, before libtorch does any work (re-executes when the environment
    // differs from the profile's).
    phalanx_worker::numerics::ensure(cmd.numerics)?;
    let device = DeviceRequest::parse(&cmd.device, cmd.memory_gib)?;
    let torch_device = device.activate()?;
    // The worker speaks as itself: its own certificate (issued here when the CA key is at
    // hand, as in a local cluster).
    let client = cmd
        .target
        .client_as(&phalanx_pki::Role::Worker(cmd.id.clone()))?;
    let checkpoint_root = match (&cmd.checkpoint_dir, cmd.target.dir()) {
        (Some(d), _) => d.clone(),
        (None, Some(d)) => d.join("checkpoints"),
        (None, None) => anyhow::bail!("pass --checkpoint-dir (or --dir of a local cluster)"),
    };
    std::fs::create_dir_all(&checkpoint_root)
        .with_context(|| format!("creating {}", checkpoint_root.display()))?;
    let listener =
        TcpListener::bind(cmd.listen).with_context(|| format!("binding {}", cmd.listen))?;
    let silence = phalanx_worker::silence::SilenceConfig {
        factor: cmd.silence_factor,
        floor: Duration::from_millis(cmd.silence_floor_ms),
    };
    silence
        .validate()
        .map_err(|e| anyhow::anyhow!("--silence-factor / --silence-floor-ms: {e}"))?;
    let _metrics = crate::train::serve_metrics(cmd.metrics_listen, &cmd.id)?;
    let cfg = AgentConfig {
        id: cmd.id,
        client: Arc::new(client),
        device,
        torch_device,
        listener,
        checkpoint_root,
        checkpoint_retain: cmd.checkpoint_retain,
        heartbeat_interval: Duration::from_millis(cmd.heartbeat_interval_ms),
        op_timeout: Duration::from_millis(cmd.op_timeout_ms),
        rendezvous_timeout: Duration::from_millis(cmd.rendezvous_timeout_ms),
        sdc_check_interval: cmd.sdc_check_interval,
        grad_check_interval: cmd.grad_check_interval,
        exit_when_done: cmd.exit_when_done,
        lifetime_max: Duration::from_secs(cmd.lifetime_max_s),
        fault_inbox: cmd.fault_inbox,
        numerics: cmd.numerics,
        silence,
        // With TLS credentials the ring links run mutual TLS as well.
        tls: cmd.target.tls_dir_in_use()?,
    };
    agent::run(cfg)?;
    Ok(())
}
