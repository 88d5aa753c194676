//! What a worker tells the controller when an epoch goes wrong: dead peers, a silent peer,
//! a corrupt replica, a job that cannot start here, an epoch that does not converge; and
//! the wait for the plan those reports make.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phalanx_collective::PeerSilent;
use phalanx_controller::client::{new_request_id, Client};
use phalanx_proto::{Assignment, Command, JobSpec, SilentPeer};
use tracing::{info, warn};

use super::{AgentConfig, Shared};
use crate::recovery_trace::{quiet, SilenceTrace};
use crate::WorkerError;

/// Failed attempts of one epoch in a row with no step committed; after
/// [`STUCK_ATTEMPTS`] of them the worker asks the controller for a new epoch.
pub const STUCK_ATTEMPTS: u32 = 3;

#[derive(Default)]
pub(super) struct StuckEpoch {
    pub(super) epoch: u64,
    pub(super) attempts: u32,
}

/// What a worker tells the controller about an epoch that does not converge.
pub(super) struct StuckReport {
    pub(super) epoch: u64,
    pub(super) attempts: u32,
    pub(super) blamed_rank: Option<u32>,
    pub(super) reason: String,
}

impl StuckEpoch {
    /// Counts a failed attempt of `epoch`; returns the report to send once the epoch has
    /// failed [`STUCK_ATTEMPTS`] times in a row without a step (then counts afresh).
    pub(super) fn failed(
        &mut self,
        epoch: u64,
        progressed: bool,
        my_rank: usize,
        e: &WorkerError,
    ) -> Option<StuckReport> {
        if epoch != self.epoch || progressed {
            *self = StuckEpoch { epoch, attempts: 0 };
        }
        self.attempts += 1;
        if self.attempts < STUCK_ATTEMPTS {
            return None;
        }
        let attempts = std::mem::take(&mut self.attempts);
        let blamed_rank = match e {
            WorkerError::Collective(c) => c.peer_rank().filter(|r| *r != my_rank),
            _ => None,
        }
        .map(|r| r as u32);
        let mut reason = e.to_string();
        if reason.len() > 400 {
            let mut cut = 400;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        Some(StuckReport {
            epoch,
            attempts,
            blamed_rank,
            reason,
        })
    }
}

pub(super) fn escalate_stuck_epoch(client: &Client, me: &str, job: &JobSpec, r: StuckReport) {
    warn!(epoch = r.epoch, attempts = r.attempts, reason = %r.reason, "epoch does not converge; asking for a new one");
    let cmd = Command::ReportEpochStuck {
        worker: me.to_string(),
        epoch: r.epoch,
        attempts: r.attempts,
        blamed_rank: r.blamed_rank,
        reason: r.reason,
    };
    let id = new_request_id(&format!("stuck-{}-{}-{me}", job.name, r.epoch));
    match client.command_with_id(id, cmd) {
        Ok(out) if !out.outcome.is_applied() => {
            info!(outcome = %out.outcome.message(), "stuck-epoch report not applied")
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "reporting the stuck epoch failed"),
    }
}

/// Silent data corruption found by the replica check: quarantine the odd one out. The
/// lowest rank that is not the odd one reports, so the report is made once.
pub(super) fn report_corrupt_replica(
    client: &Client,
    me: &str,
    a: &Assignment,
    odd: usize,
    reason: String,
) {
    let Ok(Some(job)) = client.get::<Option<phalanx_proto::JobInfo>>("/v1/job") else {
        return;
    };
    let Some(plan) = job.plan.filter(|p| p.epoch == a.epoch) else {
        return;
    };
    let reporter = if odd == 0 { 1 } else { 0 };
    if plan.ranks.get(reporter).map(String::as_str) != Some(me) {
        return;
    }
    let Some(id) = plan.ranks.get(odd) else {
        return;
    };
    warn!(worker = %id, %reason, "quarantining a corrupt replica");
    let addr = a.peers.get(odd).cloned();
    let cmd = Command::SetWorkerHealth {
        id: id.clone(),
        health: phalanx_proto::WorkerHealth::Quarantined,
        reason,
        address: addr,
    };
    let _ = client.command_with_id(new_request_id(&format!("sdc-{id}-{}", a.epoch)), cmd);
}

/// After a collective failed, tells the controller which peers are certainly dead: their
/// listener refuses connections (the process is gone). A stopped (hung) process still has
/// its socket open; the leader's lease catches that case.
/// Returns the ranks found dead.
pub(super) fn report_dead_peers(
    client: &Client,
    me: &str,
    a: &Assignment,
    my_rank: usize,
) -> Vec<usize> {
    let mut dead = Vec::new();
    let Ok(Some(job)) = client.get::<Option<phalanx_proto::JobInfo>>("/v1/job") else {
        return dead;
    };
    let Some(plan) = job.plan.filter(|p| p.epoch == a.epoch) else {
        return dead;
    };
    for (rank, addr) in a.peers.iter().enumerate() {
        if rank == my_rank {
            continue;
        }
        let Ok(sa) = addr.parse::<SocketAddr>() else {
            continue;
        };
        let refused = matches!(
            std::net::TcpStream::connect_timeout(&sa, Duration::from_millis(300)),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        );
        if !refused {
            continue;
        }
        dead.push(rank);
        let Some(id) = plan.ranks.get(rank) else {
            continue;
        };
        let reason = format!(
            "rank {rank} lost in epoch {}: connection refused at {addr} (reported by {me})",
            a.epoch
        );
        warn!(worker = %id, %reason, "reporting a dead peer");
        let cmd = Command::SetWorkerHealth {
            id: id.clone(),
            health: phalanx_proto::WorkerHealth::Failed,
            reason,
            address: Some(addr.clone()),
        };
        let _ = client.command_with_id(new_request_id(&format!("dead-{id}-{}", a.epoch)), cmd);
    }
    dead
}

/// Tells the controller that this worker could not start its rank of `job_id`.
pub(super) fn report_start_failure(cfg: &AgentConfig, job_id: &str, epoch: u64, e: &WorkerError) {
    let cmd = Command::ReportStartFailure {
        worker: cfg.id.clone(),
        job: job_id.to_string(),
        epoch,
        reason: e.to_string(),
    };
    warn!(job = job_id, epoch, error = %e, "the job cannot start on this worker");
    if let Err(e) = cfg.client.command(cmd) {
        warn!(error = %e, "reporting the start failure failed");
    }
}

/// A peer of `epoch` is silent: remember it for the heartbeats, send one at once, and
/// watch the assignment every 50 ms for 3 s so that the controller's new plan (if it
/// confirms the report) cancels the blocked operation at once.
pub(super) fn report_silence(
    client: &Arc<Client>,
    id: &str,
    shared: &Arc<Shared>,
    epoch: u64,
    p: &PeerSilent,
) {
    warn!(epoch, peer_rank = p.peer_rank, peer = %p.peer_addr, silent_ms = p.silent_ms, inbound = p.inbound, "peer silent; reporting it");
    // The epoch's first silence is this worker's detection of a fault (the root of the
    // recovery's trace); the report carries its context, so that the leader's decision
    // that confirms it, and the plan that follows, join the trace.
    let (trace, report_span) = {
        let mut st = shared
            .silence_trace
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match st.as_ref().filter(|s| s.epoch == epoch) {
            Some(s) => (s.detection.clone(), None),
            None => {
                let last_step = *shared
                    .last_step_at
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let (t, span) =
                    SilenceTrace::detected(id, epoch, p.peer_rank, p.silent_ms, last_step);
                let detection = t.detection.clone();
                *st = Some(t);
                (detection, Some(span))
            }
        }
    };
    let sp = SilentPeer {
        epoch,
        rank: p.peer_rank as u32,
        silent_ms: p.silent_ms,
        trace,
    };
    *shared.silent.lock().unwrap_or_else(|e| e.into_inner()) = Some((sp, Instant::now()));
    // When the report has gone (the plan phase of this worker's recovery starts there).
    let reported = move |shared: &Shared, span: Option<tracing::Span>| {
        drop(span);
        if let Some(s) = shared
            .silence_trace
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .filter(|s| s.epoch == epoch && s.reported_at.is_none())
        {
            s.reported_at = Some(std::time::SystemTime::now());
        }
    };
    if shared.reporting.swap(true, Ordering::SeqCst) {
        // A report thread is running already (an earlier epoch's, still watching the
        // assignment): the next regular heartbeat carries this report.
        reported(shared, report_span);
        return;
    }
    let (client, id, shared) = (client.clone(), id.to_string(), shared.clone());
    std::thread::spawn(move || {
        let sent = {
            let _in = report_span.as_ref().map(|s| s.enter());
            client.post::<serde_json::Value>("/v1/heartbeat", &shared.heartbeat(&id))
        };
        reported(&shared, report_span);
        if let Err(e) = sent {
            warn!(error = %e, "sending the silence report failed");
        }
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until && shared.epoch.load(Ordering::SeqCst) <= epoch {
            let polled = quiet("assignment")
                .in_scope(|| client.get::<Assignment>(&format!("/v1/assignment/{id}")));
            if let Ok(a) = polled {
                shared.epoch.fetch_max(a.epoch, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        shared.reporting.store(false, Ordering::SeqCst);
    });
}

/// The pause after an epoch failed: `backoff`, or less when the controller has already
/// made a newer plan (the reports just sent usually make it at once): the assignment is
/// polled every 20 ms meanwhile, and a newer epoch, seen there or by the heartbeats, ends
/// the wait. Without a newer plan the full back-off keeps a failing epoch from being
/// retried in a tight loop.
pub(super) fn wait_for_newer_epoch(
    client: &Client,
    id: &str,
    shared: &Shared,
    epoch: u64,
    backoff: Duration,
) {
    let until = Instant::now() + backoff;
    loop {
        if shared.epoch.load(Ordering::SeqCst) > epoch {
            return;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(20)));
        let polled = quiet("assignment")
            .in_scope(|| client.get::<Assignment>(&format!("/v1/assignment/{id}")));
        if let Ok(a) = polled {
            shared.epoch.fetch_max(a.epoch, Ordering::SeqCst);
        }
    }
}
