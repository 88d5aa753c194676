//! A recovery as one trace across processes (issue 12). A worker whose epoch broke
//! records `recovery.detection` (from its last committed step to the error, a root) and
//! sends its reports under `recovery.report`, so that the controller's `api.request` and
//! `raft.propose` (the decision and its Raft commit) join the trace; the plan the report
//! made carries the proposal's `traceparent` ([`phalanx_proto::Plan::trace`]). Every
//! rank of the new plan then records its phases as children of that context:
//! `recovery.plan` (from the end of its old epoch until it starts the rendezvous of the
//! new one), `recovery.rendezvous`, `recovery.state_agreement` (attribute `source`:
//! peers, checkpoint or initial) and `recovery.first_step`, which ends where the MTTR
//! the worker reports ends. On one worker these phases are contiguous, so their sum is
//! that worker's MTTR. When the controller detected the fault (a lease), its
//! `recovery.detection` is the root instead.
//!
//! A peer that falls silent (hung, or not yet gone) fails no operation: the worker
//! records `recovery.detection` when it notices the silence and sends the report under
//! `recovery.report`; the report carries that context ([`phalanx_proto::SilentPeer::trace`])
//! and the leader's decision that confirms it (`recovery.decision`) joins the trace. The
//! plan phase then starts at the report: the epoch only ran on, blocked, until the new
//! plan superseded it. If the epoch fails after the report (the peer's connections
//! closed at last), `recovery.wait` covers the time blocked and the new reports join the
//! same detection. A worker whose own detections are not in the plan's trace (another
//! report made the plan, or, on a loaded machine, the error that broke its epoch came
//! before its silence report and started a detection of its own) links its
//! `recovery.plan` to each of them.
//!
//! The phases are recorded after the fact with their wall-clock bounds
//! ([`phalanx_telemetry::traces::record_span`]); without a trace pipeline nothing is
//! recorded and nothing here costs more than reading the clock.

use std::time::{Instant, SystemTime};

use phalanx_proto::TraceParent;
use phalanx_telemetry::traces::{
    record_linked_span, record_span, set_parent, set_unsampled, KeyValue,
};

/// The wall-clock time of an `Instant` in the past.
pub(crate) fn wall(at: Instant) -> SystemTime {
    SystemTime::now()
        .checked_sub(at.elapsed())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// A span for a periodic call (heartbeat, poll, progress report) that no trace records:
/// enter it around the call.
pub(crate) fn quiet(name: &'static str) -> tracing::Span {
    let span = tracing::info_span!("worker.poll", call = name);
    set_unsampled(&span);
    span
}

/// Where a worker stands in a recovery, across its epochs.
#[derive(Debug, Default)]
pub(crate) struct RecoveryTrace {
    /// When this worker's last epoch ended (with an error, or superseded): the new plan's
    /// wait starts there.
    pub ended_at: Option<SystemTime>,
    /// This worker's own detections of the fault that ended its last epoch: usually one;
    /// two when, on a loaded machine, its silence report of a peer and the error that
    /// broke its epoch each started one. The new plan's first phase links to every one
    /// that is not in the plan's trace (another report made the plan).
    detections: Vec<TraceParent>,
}

impl RecoveryTrace {
    /// The epoch broke at `now`, `last_step` being this worker's last committed step:
    /// records the detection and returns its context with the span under which the
    /// reports go (the child of the detection; disabled when nothing records traces).
    /// After a silence this worker reported in the epoch, that report's detection is the
    /// one: the time blocked since the report is `recovery.wait`, and the reports join
    /// its trace.
    pub fn detected(
        &mut self,
        worker: &str,
        epoch: u64,
        error: &str,
        last_step: Option<Instant>,
        silence: Option<SilenceTrace>,
    ) -> (Option<TraceParent>, tracing::Span) {
        let error = KeyValue::new("error", error.chars().take(300).collect::<String>());
        let Some(SilenceTrace {
            detection: Some(detection),
            reported_at: Some(reported_at),
            ..
        }) = silence
        else {
            let (detection, report) = detect(worker, epoch, last_step, error);
            self.keep(detection.clone());
            return (detection, report);
        };
        record_span(
            "recovery.wait",
            Some(&detection),
            reported_at,
            SystemTime::now(),
            vec![KeyValue::new("epoch", epoch as i64), error],
        );
        let report = tracing::info_span!("recovery.report", worker, epoch);
        set_parent(&report, &detection);
        self.keep(Some(detection.clone()));
        (Some(detection), report)
    }

    /// The epoch ended (the report is done, or it was superseded); after a silence this
    /// worker reported in it, the wait for the new plan began at that report.
    pub fn ended(&mut self, silence: Option<SilenceTrace>) {
        self.ended_at = Some(
            silence
                .as_ref()
                .and_then(|s| s.reported_at)
                .unwrap_or_else(SystemTime::now),
        );
        self.keep(silence.and_then(|s| s.detection));
    }

    fn keep(&mut self, detection: Option<TraceParent>) {
        if let Some(d) = detection {
            if !self.detections.contains(&d) {
                self.detections.push(d);
            }
        }
    }

    /// The phases of one epoch as they end; does nothing unless the epoch's plan has a
    /// trace context and is a recovery (not the job's first plan).
    pub fn epoch(&mut self, plan: Option<&TraceParent>, epoch: u64, rank: usize) -> EpochTrace {
        let began = self.ended_at.take();
        let parent = plan.filter(|_| epoch > 1).cloned();
        let links = std::mem::take(&mut self.detections)
            .into_iter()
            .filter(|d| {
                parent
                    .as_ref()
                    .is_some_and(|p| p.trace_id() != d.trace_id())
            })
            .collect();
        EpochTrace {
            parent,
            links,
            epoch,
            rank,
            mark: began.unwrap_or_else(SystemTime::now),
            first_step_done: false,
        }
    }
}

/// Records `recovery.detection` from `last_step` (this worker's last committed step) to
/// now, a root, and returns its context with the `recovery.report` span (its child) for
/// the reports.
fn detect(
    worker: &str,
    epoch: u64,
    last_step: Option<Instant>,
    cause: KeyValue,
) -> (Option<TraceParent>, tracing::Span) {
    let now = SystemTime::now();
    let detection = record_span(
        "recovery.detection",
        None,
        last_step.map(wall).unwrap_or(now),
        now,
        vec![
            KeyValue::new("detected_by", "worker"),
            KeyValue::new("worker", worker.to_string()),
            KeyValue::new("epoch", epoch as i64),
            cause,
        ],
    );
    let report = tracing::info_span!("recovery.report", worker, epoch);
    if let Some(d) = &detection {
        set_parent(&report, d);
    }
    (detection, report)
}

/// A silent peer this worker reported in `epoch`: the detection it recorded (`None`
/// without a trace pipeline) and when the report had been sent.
#[derive(Debug, Clone)]
pub(crate) struct SilenceTrace {
    pub epoch: u64,
    pub detection: Option<TraceParent>,
    pub reported_at: Option<SystemTime>,
}

impl SilenceTrace {
    /// The first silence of `epoch`: records the detection (from `last_step` to now) and
    /// returns it with the span under which the report goes.
    pub fn detected(
        worker: &str,
        epoch: u64,
        peer_rank: usize,
        silent_ms: u64,
        last_step: Option<Instant>,
    ) -> (SilenceTrace, tracing::Span) {
        let (detection, report) = detect(
            worker,
            epoch,
            last_step,
            KeyValue::new(
                "silent_peer",
                format!("rank {peer_rank}, silent for {silent_ms} ms"),
            ),
        );
        let trace = SilenceTrace {
            epoch,
            detection,
            reported_at: None,
        };
        (trace, report)
    }
}

/// The recovery phases of one epoch on one worker, each from the end of the one before.
#[derive(Debug)]
pub(crate) struct EpochTrace {
    parent: Option<TraceParent>,
    /// This worker's own detections, in other traces than the plan's.
    links: Vec<TraceParent>,
    epoch: u64,
    rank: usize,
    mark: SystemTime,
    first_step_done: bool,
}

impl EpochTrace {
    fn phase(&mut self, name: &'static str, mut attrs: Vec<KeyValue>) -> Option<TraceParent> {
        let now = SystemTime::now();
        let start = std::mem::replace(&mut self.mark, now);
        let parent = self.parent.as_ref()?;
        attrs.push(KeyValue::new("epoch", self.epoch as i64));
        attrs.push(KeyValue::new("rank", self.rank as i64));
        // The first phase links to this worker's own detections of the fault that another
        // report's trace left out: the traces are one recovery.
        let links = std::mem::take(&mut self.links);
        record_linked_span(name, Some(parent), &links, start, now, attrs)
    }

    /// From the old epoch's end until this rank starts the rendezvous; linked to this
    /// worker's own detection when that is in another trace.
    pub fn plan_received(&mut self) {
        self.phase("recovery.plan", vec![]);
    }

    /// The group formed (or failed to).
    pub fn rendezvous_done(&mut self, ok: bool) {
        self.phase("recovery.rendezvous", vec![KeyValue::new("ok", ok)]);
    }

    /// The state agreement ended; `source` is what `sync_state` says (its kind and words)
    /// or the error.
    pub fn state_agreed(&mut self, source: Result<&crate::state_sync::Origin, String>) {
        let attrs = match source {
            Ok((kind, s)) => {
                vec![
                    KeyValue::new("source", kind.as_str()),
                    KeyValue::new("source.detail", s.to_string()),
                ]
            }
            Err(e) => vec![KeyValue::new("error", e)],
        };
        self.phase("recovery.state_agreement", attrs);
    }

    /// The epoch's first step is committed (where the MTTR ends). Returns the span under
    /// which the resume report goes (disabled when nothing records traces).
    pub fn first_step(&mut self, step: u64) -> Option<tracing::Span> {
        if std::mem::replace(&mut self.first_step_done, true) {
            return None;
        }
        let tp = self.phase(
            "recovery.first_step",
            vec![KeyValue::new("step", step as i64)],
        )?;
        let span = tracing::info_span!("recovery.resume_report", epoch = self.epoch);
        set_parent(&span, &tp);
        Some(span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(trace: char, span: char) -> TraceParent {
        let t: String = std::iter::repeat_n(trace, 32).collect();
        let s: String = std::iter::repeat_n(span, 16).collect();
        TraceParent::parse(&format!("00-{t}-{s}-01")).unwrap()
    }

    #[test]
    fn every_own_detection_outside_the_plans_trace_is_linked_once() {
        // The error that broke the epoch started one detection, then the silence report
        // (whose trace made the plan) another: the error's is linked, the report's is
        // the plan's own trace.
        let mut r = RecoveryTrace::default();
        let error = tp('a', '1');
        let silence = tp('b', '2');
        r.keep(Some(error.clone()));
        r.keep(Some(error.clone()));
        r.ended(Some(SilenceTrace {
            epoch: 1,
            detection: Some(silence.clone()),
            reported_at: Some(SystemTime::now()),
        }));
        let plan = tp('b', '3');
        let e = r.epoch(Some(&plan), 2, 0);
        assert_eq!(e.links, vec![error], "{e:?}");
        // taken: the next epoch starts with none
        let e = r.epoch(Some(&tp('c', '4')), 3, 0);
        assert!(e.links.is_empty(), "{e:?}");
        // a first plan (epoch 1) is no recovery: nothing to link
        r.keep(Some(silence));
        let e = r.epoch(Some(&plan), 1, 0);
        assert!(e.links.is_empty(), "{e:?}");
    }
}
