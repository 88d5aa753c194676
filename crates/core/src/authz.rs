//! Who may send which command (issue 11): the decision, with its reason, over the
//! replicated state. The shell authenticates the caller (a certificate's role, or an
//! operator token) and asks here before proposing; the route table of the API (which roles
//! reach which endpoint) lives with the routes.

use phalanx_proto::{Command, NodeId, WorkerHealth, WorkerId};

use crate::ClusterState;

/// An authenticated caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller<'a> {
    Controller(NodeId),
    Worker(&'a str),
    Admin,
    Reader,
    /// `--insecure` loopback mode: the one shared token stands for every role.
    Insecure,
}

/// The ranks of the current plan (empty without one).
pub fn plan_ranks(s: &ClusterState) -> &[WorkerId] {
    s.job
        .as_ref()
        .and_then(|j| j.plan.as_ref())
        .map(|p| p.ranks.as_slice())
        .unwrap_or(&[])
}

/// May `caller` propose `cmd` now, given the current plan's `ranks` ([`plan_ranks`])?
/// `Err` carries the reason for the 403.
pub fn authorize_command(
    caller: Caller<'_>,
    cmd: &Command,
    ranks: &[WorkerId],
) -> Result<(), String> {
    let me = match caller {
        Caller::Admin | Caller::Insecure => return Ok(()),
        Caller::Reader => return Err("the read-only credential cannot change anything".into()),
        Caller::Controller(id) => {
            return Err(format!(
                "controller {id}'s credential speaks Raft and changes its own membership; \
                 it sends no commands"
            ))
        }
        Caller::Worker(me) => me,
    };
    let for_self = |who: &str, what: &str| {
        if who == me {
            Ok(())
        } else {
            Err(format!(
                "worker {me} may report {what} only for itself, not for worker {who}"
            ))
        }
    };
    let in_plan = |who: &str| ranks.iter().any(|r| r == who);
    match cmd {
        Command::RegisterWorker { id, .. } => for_self(id, "its registration"),
        Command::ReportProgress { worker, .. }
        | Command::ReportResume { worker, .. }
        | Command::ReportEpochStuck { worker, .. }
        | Command::ReportStartFailure { worker, .. }
        | Command::ReportGradientMismatch { worker, .. }
        | Command::ReportResult { worker, .. }
        | Command::ReportCheckpointRefused { worker, .. } => for_self(worker, "progress"),
        Command::SetWorkerHealth { id, health, .. } => {
            let bad_state = !matches!(health, WorkerHealth::Failed | WorkerHealth::Quarantined);
            if bad_state {
                return Err(format!(
                    "a worker may only report a failure or a quarantine, not {}",
                    health.as_str()
                ));
            }
            if id == me {
                return Ok(());
            }
            // A dead peer, or the odd replica of a gradient check: both must be ranks of
            // the plan this worker is a rank of.
            if in_plan(me) && in_plan(id) {
                Ok(())
            } else {
                Err(format!(
                    "worker {me} may report worker {id} only when both are ranks of the \
                     current plan"
                ))
            }
        }
        Command::RecordCheckpoint { .. } => {
            if ranks.first().is_some_and(|r| r == me) {
                Ok(())
            } else {
                Err(format!(
                    "only rank 0 of the current plan records checkpoints, not worker {me}"
                ))
            }
        }
        Command::ReadBarrier => Ok(()),
        other => Err(format!(
            "worker {me} may not send {}: it needs the admin credential",
            command_name(other)
        )),
    }
}

/// The command's tag as it appears on the wire.
pub fn command_name(c: &Command) -> String {
    serde_json::to_value(c)
        .ok()
        .and_then(|v| v.get("type")?.as_str().map(str::to_string))
        .unwrap_or_else(|| "this command".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_speak_for_themselves_and_their_plan_only() {
        let s: Vec<WorkerId> = vec!["w0".into(), "w1".into()];
        let w0 = Caller::Worker("w0");
        let progress = |w: &str| Command::ReportCheckpointRefused {
            worker: w.into(),
            job: "j".into(),
            step: 3,
            reason: "r".into(),
        };
        assert!(authorize_command(w0, &progress("w0"), &s[..]).is_ok());
        let e = authorize_command(w0, &progress("w1"), &s[..]).unwrap_err();
        assert!(e.contains("only for itself"), "{e}");
        let health = |id: &str, h| Command::SetWorkerHealth {
            id: id.into(),
            health: h,
            reason: "r".into(),
            address: None,
        };
        assert!(authorize_command(w0, &health("w1", WorkerHealth::Failed), &s[..]).is_ok());
        assert!(authorize_command(w0, &health("w9", WorkerHealth::Failed), &s[..]).is_err());
        assert!(authorize_command(w0, &health("w1", WorkerHealth::Healthy), &s[..]).is_err());
        assert!(authorize_command(
            Caller::Worker("w9"),
            &health("w1", WorkerHealth::Failed),
            &s[..]
        )
        .is_err());
        let submit = Command::CancelJob { reason: "r".into() };
        let e = authorize_command(w0, &submit, &s[..]).unwrap_err();
        assert!(e.contains("cancel_job"), "{e}");
        assert!(authorize_command(Caller::Admin, &submit, &s[..]).is_ok());
        assert!(authorize_command(Caller::Reader, &Command::ReadBarrier, &s[..]).is_err());
        assert!(authorize_command(Caller::Controller(1), &Command::ReadBarrier, &s[..]).is_err());
        let ckpt = Command::RecordCheckpoint {
            job: "j".into(),
            step: 1,
            epoch: 1,
            shards: vec![],
            durable: true,
            stall_us: None,
            retain: 0,
        };
        assert!(authorize_command(w0, &ckpt, &s[..]).is_ok());
        assert!(authorize_command(Caller::Worker("w1"), &ckpt, &s[..]).is_err());
    }
}
