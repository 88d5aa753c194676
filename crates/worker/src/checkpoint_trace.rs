//! A checkpoint as one trace (issue 12): rank 0 opens the root `checkpoint` span when it
//! takes the step's snapshot and ends it when the controller has committed the
//! checkpoint to its catalog. Under it: every rank's `checkpoint.snapshot` (the training
//! thread handing the state to the writer) and `checkpoint.write` (from the snapshot until
//! the step loop learns that the rank's shard is durable, with the writer's own
//! `write_ms`), with the writer thread's phases as its children, timed by the writer:
//! `checkpoint.file_write` (the shard's bytes) and `checkpoint.fsync` (fsync, rename and
//! the directory's fsync: durable); and rank 0's `checkpoint.commit` (the
//! manifest's write, `ckpt_commit_manifest`, and the `RecordCheckpoint` call whose
//! `traceparent` puts the controller's `api.request` and `raft.propose` in the trace).
//!
//! The other ranks learn the root's context from rank 0 in the exchange of durable shard
//! records that precedes every commit ([`Exchange`]), and record their spans then, with
//! the times they measured. Without a trace pipeline nothing is recorded.

use std::time::SystemTime;

use phalanx_checkpoint::{ShardRecord, WriteTimes};
use phalanx_proto::TraceParent;
use phalanx_telemetry::traces::{record_span, set_parent, start_span, KeyValue, OpenSpan};
use serde::{Deserialize, Serialize};

/// What ranks exchange before a commit: their durable shards, and rank 0's open
/// checkpoint traces.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Exchange {
    pub shards: Vec<ShardRecord>,
    #[serde(default)]
    pub traces: Vec<(u64, TraceParent)>,
}

/// Steps whose trace is kept open at most (older ones end as they are).
const OPEN_MAX: usize = 8;

#[derive(Debug)]
struct Pending {
    step: u64,
    /// Rank 0's root (on rank 0 only).
    root: Option<OpenSpan>,
    snap: (SystemTime, SystemTime),
    /// When the step loop saw the shard durable, the writer's `write_ms` and its phases.
    durable: Option<(SystemTime, u64, WriteTimes)>,
}

/// One rank's checkpoint traces.
#[derive(Debug)]
pub(crate) struct CheckpointTraces {
    rank: usize,
    pending: Vec<Pending>,
}

impl CheckpointTraces {
    pub fn new(rank: usize) -> Self {
        Self {
            rank,
            pending: Vec::new(),
        }
    }

    fn attrs(&self, step: u64) -> Vec<KeyValue> {
        vec![
            KeyValue::new("step", step as i64),
            KeyValue::new("rank", self.rank as i64),
        ]
    }

    /// The snapshot of `step` was taken between `start` and `end`.
    pub fn snapshot(&mut self, step: u64, start: SystemTime, end: SystemTime) {
        let root = (self.rank == 0)
            .then(|| start_span("checkpoint", None, start, self.attrs(step)))
            .flatten();
        if let Some(r) = &root {
            record_span(
                "checkpoint.snapshot",
                Some(r.traceparent()),
                start,
                end,
                self.attrs(step),
            );
        }
        self.pending.retain(|p| p.step != step);
        self.pending.push(Pending {
            step,
            root,
            snap: (start, end),
            durable: None,
        });
        if self.pending.len() > OPEN_MAX {
            self.pending.remove(0);
        }
    }

    /// `checkpoint.write` of `p` under `root`, and the writer's phases under it.
    fn record_write(&self, root: &TraceParent, p: &Pending) {
        let Some((seen, write_ms, times)) = p.durable else {
            return;
        };
        let mut a = self.attrs(p.step);
        a.push(KeyValue::new("write_ms", write_ms as i64));
        let Some(write) = record_span("checkpoint.write", Some(root), p.snap.1, seen, a) else {
            return;
        };
        let (w0, w1) = times.write;
        record_span(
            "checkpoint.file_write",
            Some(&write),
            w0,
            w1,
            self.attrs(p.step),
        );
        let (f0, f1) = times.fsync;
        record_span("checkpoint.fsync", Some(&write), f0, f1, self.attrs(p.step));
    }

    /// The shard of `step` is durable (seen now; the writer took `write_ms`, in `times`).
    pub fn durable(&mut self, step: u64, write_ms: u64, times: WriteTimes) {
        let now = SystemTime::now();
        let Some(i) = self.pending.iter().position(|p| p.step == step) else {
            return;
        };
        self.pending[i].durable = Some((now, write_ms, times));
        let p = &self.pending[i];
        if let Some(r) = &p.root {
            self.record_write(r.traceparent(), p);
        }
    }

    /// Rank 0's open roots, for the exchange.
    pub fn roots(&self) -> Vec<(u64, TraceParent)> {
        self.pending
            .iter()
            .filter_map(|p| p.root.as_ref().map(|r| (p.step, r.traceparent().clone())))
            .collect()
    }

    /// Another rank: records the snapshot and write of every durable step whose root rank
    /// 0 named, and forgets them.
    pub fn adopt(&mut self, roots: &[(u64, TraceParent)]) {
        if self.rank == 0 {
            return;
        }
        let mut done = Vec::new();
        for p in &self.pending {
            let (Some(_), Some((_, root))) = (p.durable, roots.iter().find(|(s, _)| *s == p.step))
            else {
                continue;
            };
            record_span(
                "checkpoint.snapshot",
                Some(root),
                p.snap.0,
                p.snap.1,
                self.attrs(p.step),
            );
            self.record_write(root, p);
            done.push(p.step);
        }
        self.pending.retain(|p| !done.contains(&p.step));
    }

    /// Rank 0: the span under which the manifest is written and the commit is recorded
    /// (disabled without a root).
    pub fn commit_span(&self, step: u64) -> tracing::Span {
        let span = tracing::info_span!("checkpoint.commit", step);
        if let Some(r) = self
            .pending
            .iter()
            .find(|p| p.step == step)
            .and_then(|p| p.root.as_ref())
        {
            set_parent(&span, r.traceparent());
        }
        span
    }

    /// Rank 0: the commit of `step` ended (`outcome`: committed, refused, error); the
    /// root ends.
    pub fn committed(&mut self, step: u64, outcome: &'static str) {
        if let Some(i) = self.pending.iter().position(|p| p.step == step) {
            let p = self.pending.remove(i);
            if let Some(r) = p.root {
                r.end(vec![KeyValue::new("outcome", outcome)]);
            }
        }
    }
}
