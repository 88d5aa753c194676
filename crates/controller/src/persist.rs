//! When a replica's acknowledgements may leave: the bookkeeping of raft-rs's asynchronous
//! Ready, without threads or a disk, so that the TCP shell (with a sync thread) and the
//! randomized simulation (with simulated fsync delays) run the same code.
//!
//! The raft thread writes each Ready to sled (memory) and goes on; one sync at a time makes
//! everything written before it began durable. A Ready's `after_persist` messages (a
//! follower's append acknowledgements, votes) wait until a sync that covers the Ready has
//! finished, so nothing is acknowledged before the disk has it, while a Ready that wrote
//! nothing the disk must hold sends its heartbeat answers and pre-votes at once.

use std::collections::VecDeque;

use raft::prelude::{Message, MessageType};

use crate::node::{AsyncReady, Replica};

/// What the shell must do after a call: send these messages now, and start a sync that
/// covers every Ready up to this number (none is in flight when it is asked to).
#[derive(Debug, Default)]
pub struct PersistStep {
    pub send: Vec<Message>,
    pub start_sync: Option<u64>,
}

#[derive(Debug, Default)]
pub struct PersistQueue {
    /// A sync is running; its completion comes back through [`PersistQueue::on_synced`].
    inflight: bool,
    /// Readies not yet reported durable to raft-rs, oldest first: number, whether it
    /// needs an fsync, and the messages that must wait for it. Non-empty only while a sync
    /// is in flight.
    waiting: VecDeque<(u64, bool, Vec<Message>)>,
}

/// A message that says nothing about this node's durable log or vote: it may leave before
/// an earlier Ready's sync ends when its own Ready wrote nothing that needs one. A granted
/// vote never does: raft-rs grants a repeated request from the candidate it already voted
/// for without changing the hard state, so that Ready needs no sync of its own while the
/// vote itself may still be on its way to the disk; only a refusal goes early.
fn independent_of_disk(m: &Message) -> bool {
    match m.get_msg_type() {
        MessageType::MsgHeartbeatResponse
        | MessageType::MsgRequestPreVote
        | MessageType::MsgRequestPreVoteResponse
        | MessageType::MsgReadIndex => true,
        MessageType::MsgRequestVoteResponse => m.reject,
        _ => false,
    }
}

impl PersistQueue {
    /// Route one Ready from [`Replica::ready_async`] (its `early` messages are the
    /// caller's to send first).
    pub fn after_ready(&mut self, r: &mut Replica, ar: &mut AsyncReady) -> PersistStep {
        let after = std::mem::take(&mut ar.after_persist);
        let mut step = PersistStep::default();
        if !ar.needs_sync && self.waiting.is_empty() {
            r.on_persisted(ar.number, false);
            step.send = after;
            return step;
        }
        let held = if ar.needs_sync {
            after
        } else {
            let (now, held): (Vec<_>, Vec<_>) = after.into_iter().partition(independent_of_disk);
            step.send = now;
            held
        };
        self.waiting.push_back((ar.number, ar.needs_sync, held));
        // Waiting Readies imply a sync in flight; its completion starts the next one.
        if !self.inflight {
            self.inflight = true;
            step.start_sync = Some(ar.number);
        }
        step
    }

    /// The sync started for `number` has finished: everything up to it is durable.
    pub fn on_synced(&mut self, r: &mut Replica, number: u64) -> PersistStep {
        self.inflight = false;
        r.on_persisted(number, true);
        let mut step = PersistStep::default();
        while self.waiting.front().is_some_and(|w| w.0 <= number) {
            if let Some((_, _, msgs)) = self.waiting.pop_front() {
                step.send.extend(msgs);
            }
        }
        let Some(last) = self.waiting.back().map(|w| w.0) else {
            return step;
        };
        if self.waiting.iter().any(|w| w.1) {
            self.inflight = true;
            step.start_sync = Some(last);
        } else {
            // What is left needs no fsync: durable as soon as what came before is.
            r.on_persisted(last, false);
            for (_, _, msgs) in std::mem::take(&mut self.waiting) {
                step.send.extend(msgs);
            }
        }
        step
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(t: MessageType, reject: bool) -> Message {
        let mut m = Message::default();
        m.set_msg_type(t);
        m.reject = reject;
        m
    }

    #[test]
    fn only_messages_that_claim_nothing_durable_go_early() {
        assert!(independent_of_disk(&msg(
            MessageType::MsgHeartbeatResponse,
            false
        )));
        assert!(independent_of_disk(&msg(
            MessageType::MsgRequestPreVoteResponse,
            false
        )));
        // A refused vote claims nothing; a granted one (even a repeated grant whose Ready
        // changed no hard state) claims a vote that must be on disk first.
        assert!(independent_of_disk(&msg(
            MessageType::MsgRequestVoteResponse,
            true
        )));
        assert!(!independent_of_disk(&msg(
            MessageType::MsgRequestVoteResponse,
            false
        )));
        assert!(!independent_of_disk(&msg(
            MessageType::MsgAppendResponse,
            false
        )));
        assert!(!independent_of_disk(&msg(
            MessageType::MsgAppendResponse,
            true
        )));
    }
}
