//! The gradient spot check of [`Stepper`](super::Stepper): a rank recomputes a
//! neighbour's micro-batch and the group compares hashes before anything is reduced.
use phalanx_collective::BlockingGroup;
use phalanx_train::engine::Engine;

use super::Stepper;
use crate::WorkerError;

/// A 64-bit FNV-1a hash over the gradient's bits: enough to tell two computations of the
/// same micro-batch apart, at memory speed.
fn grad_hash(g: &[f32]) -> u64 {
    g.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
        (h ^ u64::from(x.to_bits())).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Stepper {
    /// Gradient spot check, possible only because every rank computes bit-identical
    /// gradients for the same micro-batch: each rank recomputes the first micro-batch of
    /// the next rank and the group compares hashes, before anything is reduced. Bits
    /// flipped in a gradient (silent data corruption that no parameter comparison can
    /// see, since every replica applies the same corrupted mean) show up as a mismatch;
    /// the step is then not applied (`GradientMismatch`) and redone, and on the redo a
    /// third rank recomputes the disputed micro-batch, so that a device that corrupts
    /// again is named (`GradientCorrupt`). Costs one micro-batch of compute per rank
    /// every `grad_check_every` steps; a flip in a micro-batch that is not checked, or
    /// between checks, goes unseen.
    pub(super) fn check_gradients(
        &mut self,
        engine: &Engine,
        group: &mut BlockingGroup,
        step: u64,
    ) -> Result<(), WorkerError> {
        if std::mem::take(&mut self.corrupt_next_checked_grad) {
            if let Some(g) = self.bufs.first_mut().filter(|g| !g.is_empty()) {
                let i = (step as usize).wrapping_mul(7919) % g.len();
                g[i] = f32::from_bits(g[i].to_bits() ^ (1 << 20));
            }
        }
        self.grad_checks += 1;
        // This attempt redoes a step whose check failed: a third rank weighs in.
        let dispute = self.disputed.filter(|d| d.0 == step);
        let mut checks: Vec<(usize, u64)> = Vec::new();
        if let Some(g) = self.bufs.first() {
            checks.push((self.mine.start, grad_hash(g)));
        }
        let recompute = |m: usize, buf: &mut Vec<f32>| -> Result<(usize, u64), WorkerError> {
            buf.resize(engine.params.len(), 0.0);
            engine.micro_grad(step, m, buf)?;
            Ok((m, grad_hash(buf)))
        };
        if let Some(m) = self.firsts[(self.rank + 1) % self.world] {
            checks.push(recompute(m, &mut self.check_buf)?);
        }
        if let Some((_, m, owner, verifier)) = dispute {
            let third = (0..self.world).find(|r| *r != owner && *r != verifier);
            if third == Some(self.rank) {
                checks.push(recompute(m, &mut self.check_buf)?);
            }
        }
        let mut bytes = Vec::with_capacity(checks.len() * 16);
        for (m, h) in &checks {
            bytes.extend_from_slice(&(*m as u64).to_le_bytes());
            bytes.extend_from_slice(&h.to_le_bytes());
        }
        let parts = group.all_gather_within(&bytes, self.op_timeout)?;
        // micro-batch -> [(rank, hash)], the owner's entry first.
        let mut seen: std::collections::BTreeMap<usize, Vec<(usize, u64)>> = Default::default();
        for (r, part) in parts.iter().enumerate() {
            if part.len() % 16 != 0 {
                return Err(WorkerError::Protocol(format!(
                    "rank {r} sent {} bytes of gradient checks",
                    part.len()
                )));
            }
            for c in part.chunks_exact(16) {
                let m = u64::from_le_bytes(c[..8].try_into().expect("8 bytes")) as usize;
                let h = u64::from_le_bytes(c[8..].try_into().expect("8 bytes"));
                let e = seen.entry(m).or_default();
                if self.firsts.get(r) == Some(&Some(m)) {
                    e.insert(0, (r, h));
                } else {
                    e.push((r, h));
                }
            }
        }
        for (&m, opinions) in &seen {
            let Some(&(owner, first)) = opinions.first() else {
                continue;
            };
            if opinions.iter().all(|(_, h)| *h == first) {
                continue;
            }
            let count = |h: u64| opinions.iter().filter(|(_, x)| *x == h).count();
            let majority = opinions
                .iter()
                .map(|(_, h)| *h)
                .find(|h| count(*h) * 2 > opinions.len());
            match majority {
                Some(good) if opinions.len() >= 3 => {
                    self.disputed = None;
                    let odd = opinions
                        .iter()
                        .find(|(_, h)| *h != good)
                        .map_or(owner, |(r, _)| *r);
                    return Err(WorkerError::GradientCorrupt {
                        rank: odd,
                        micro: m,
                        step,
                    });
                }
                // A second mismatch with no third rank to settle it (world 2), or three
                // different answers: nobody can be trusted; roll back.
                _ if dispute.is_some() || opinions.len() >= 3 => {
                    self.disputed = None;
                    return Err(WorkerError::NoMajority {
                        hashes: opinions.iter().map(|(_, h)| format!("{h:016x}")).collect(),
                    });
                }
                _ => {}
            }
            let verifier = opinions.get(1).map_or(owner, |(r, _)| *r);
            self.disputed = Some((step, m, owner, verifier));
            return Err(WorkerError::GradientMismatch {
                step,
                micro: m,
                owner,
                verifier,
            });
        }
        if dispute.is_some() {
            self.disputed = None;
        }
        Ok(())
    }
}
