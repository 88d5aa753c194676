//! State agreement at the start of a plan epoch (see [`crate::agent`]): every rank
//! announces whether it holds training state, at which step and with which parameter
//! hash; the ranks at the highest step hand their ZeRO-1 shards (own and buddy) to the
//! others; only when those do not cover the model, or nobody holds state, is a committed
//! checkpoint read ([`crate::job_checkpoints`]).
use std::ops::Range;
use std::time::Duration;

use phalanx_collective::BlockingGroup;
use phalanx_train::engine::{params_sha256, Engine};
use phalanx_train::optim::AdamWState;
use tracing::{info, warn};

use crate::job_checkpoints::{load_from_checkpoint, CheckpointSource};
use crate::WorkerError;

/// Agrees on one training state across the group (see the module docs); returns where
/// the state came from.
///
/// Optimizer moments are sharded (ZeRO-1, each rank also keeping a replica of the previous
/// rank's shard): every rank at the highest step contributes the parameters and moments of
/// the shards it holds, and each rank takes the whole parameter vector and its new own and
/// buddy slices from them. When the survivors' shards do not cover the whole
/// vector (two neighbours lost at once), or nobody holds state, every rank reads the newest
/// valid checkpoint instead; all ranks see the same announcements, so they all decide
/// alike.
pub fn sync_state(
    engine: &mut Engine,
    group: &mut BlockingGroup,
    has_state: bool,
    source: &CheckpointSource<'_>,
    timeout: Duration,
) -> Result<String, WorkerError> {
    let (world, rank) = (group.world(), group.rank());
    let mut mine = Vec::with_capacity(9 + 64);
    mine.push(u8::from(has_state));
    mine.extend_from_slice(&engine.step().to_le_bytes());
    mine.extend_from_slice(engine.params_sha256().as_bytes());
    let all = group.all_gather_within(&mine, timeout)?;
    let parsed: Vec<(bool, u64, &[u8])> = all
        .iter()
        .map(|b| {
            if b.len() < 9 {
                return Err(WorkerError::Protocol(format!(
                    "state announcement of {} bytes",
                    b.len()
                )));
            }
            Ok((
                b[0] == 1,
                u64::from_le_bytes(b[1..9].try_into().expect("8 bytes")),
                &b[9..],
            ))
        })
        .collect::<Result<_, _>>()?;
    let Some(best) = parsed.iter().filter(|p| p.0).map(|p| p.1).max() else {
        return load_from_checkpoint(engine, group, source, timeout);
    };
    // Every rank at `best` vouches for the parameters and moments of its own and buddy
    // ranges (valid even when its last parameter gather failed); together they must cover
    // the whole vector.
    let at_best = parsed[rank].0 && parsed[rank].1 == best;
    let contribution = if at_best {
        engine.shards_bytes()
    } else {
        Vec::new()
    };
    let parts = group.all_gather_within(&contribution, timeout)?;
    let n = engine.params.len();
    let mut shards = Vec::new();
    let mut holders = Vec::new();
    for (r, part) in parts.iter().enumerate() {
        let got = parse_shards(part, n)
            .map_err(|e| WorkerError::Protocol(format!("rank {r}'s state shards: {e}")))?;
        if !got.is_empty() {
            holders.push(r);
        }
        shards.extend(got);
    }
    if !covers(&shards, 0..n) {
        warn!(
            step = best,
            "the survivors' shards do not cover the model; rolling back to a checkpoint"
        );
        return load_from_checkpoint(engine, group, source, timeout);
    }
    let params = assemble(&shards, 0..n, |s| &s.1);
    if params_sha256(&params) != engine.params_sha256() || engine.step() != best {
        engine.load_params(best, params)?;
        info!(step = best, from = ?holders, "state received from peers");
    }
    let (own, buddy) = engine.shard_ranges(world, rank);
    let take = |range: Range<usize>| AdamWState {
        m: assemble(&shards, range.clone(), |s| &s.2).into(),
        v: assemble(&shards, range.clone(), |s| &s.3).into(),
        range,
        step: best,
    };
    engine.set_shards(take(own), buddy.map(take))?;
    Ok(format!(
        "peers in memory (ranks {holders:?} at step {best})"
    ))
}

/// (range, params, m, v) of one shard received from a peer.
type Shard = (Range<usize>, Vec<f32>, Vec<f32>, Vec<f32>);

fn parse_shards(mut b: &[u8], n: usize) -> Result<Vec<Shard>, String> {
    let mut out = Vec::new();
    while !b.is_empty() {
        if b.len() < 16 {
            return Err(format!("{} trailing bytes", b.len()));
        }
        let start = u64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as usize;
        let end = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")) as usize;
        if start > end || end > n {
            return Err(format!("range {start}..{end} outside 0..{n}"));
        }
        let len = end - start;
        let need = 16 + 12 * len;
        if b.len() < need {
            return Err(format!(
                "range {start}..{end} needs {need} bytes, {} left",
                b.len()
            ));
        }
        let f = |k: usize| {
            let at = 16 + 4 * len * k;
            b[at..at + 4 * len]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect::<Vec<f32>>()
        };
        out.push((start..end, f(0), f(1), f(2)));
        b = &b[need..];
    }
    Ok(out)
}

fn covers(shards: &[Shard], want: Range<usize>) -> bool {
    let mut ranges: Vec<&Range<usize>> = shards
        .iter()
        .map(|s| &s.0)
        .filter(|r| !r.is_empty())
        .collect();
    ranges.sort_by_key(|r| r.start);
    let mut next = want.start;
    for r in ranges {
        if r.start > next {
            break;
        }
        next = next.max(r.end);
    }
    next >= want.end
}

/// The values of `range`, each element taken from a shard that holds it (replicas are
/// identical, so any will do).
fn assemble(shards: &[Shard], range: Range<usize>, pick: impl Fn(&Shard) -> &Vec<f32>) -> Vec<f32> {
    let mut out = vec![0f32; range.len()];
    for s in shards {
        let lo = s.0.start.max(range.start);
        let hi = s.0.end.min(range.end);
        if lo < hi {
            out[lo - range.start..hi - range.start]
                .copy_from_slice(&pick(s)[lo - s.0.start..hi - s.0.start]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(r: Range<usize>) -> Shard {
        let p = r.clone().map(|i| i as f32 * 10.0).collect();
        let m = r.clone().map(|i| i as f32).collect();
        let v = r.clone().map(|i| -(i as f32)).collect();
        (r, p, m, v)
    }

    #[test]
    fn shards_round_trip_cover_and_assemble() {
        let shards = vec![shard(0..4), shard(3..7), shard(7..10)];
        assert!(covers(&shards, 0..10));
        assert!(!covers(&shards[..2], 0..10));
        assert!(!covers(&[shard(0..3), shard(4..10)], 0..10));
        assert_eq!(
            assemble(&shards, 2..8, |s| &s.2),
            vec![2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
        );
        assert_eq!(
            assemble(&shards, 2..8, |s| &s.3),
            vec![-2.0, -3.0, -4.0, -5.0, -6.0, -7.0]
        );
        assert_eq!(assemble(&shards, 0..2, |s| &s.1), vec![0.0, 10.0]);
    }

    #[test]
    fn malformed_shard_bytes_are_errors() {
        let mut b = Vec::new();
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(&4u64.to_le_bytes());
        b.extend_from_slice(&[0u8; 24]);
        assert_eq!(parse_shards(&b, 10).unwrap().len(), 1);
        assert!(parse_shards(&b[..30], 10).unwrap_err().contains("needs"));
        assert!(parse_shards(&b, 3).unwrap_err().contains("outside"));
        assert!(parse_shards(&b[..5], 10).unwrap_err().contains("trailing"));
    }
}
