//! State agreement at the start of a plan epoch (see [`crate::agent`]): every rank
//! announces whether it holds training state, at which step and with which parameter
//! hash; the ranks at the highest step hand their ZeRO-1 shards (own and buddy) to the
//! others; only when those do not cover the model, or nobody holds state, is a committed
//! checkpoint read ([`crate::job_checkpoints`]).
use std::ops::Range;
use std::time::Duration;

use phalanx_collective::BlockingGroup;
use phalanx_proto::StateSource;
use phalanx_train::engine::{params_sha256, Engine};
use phalanx_train::optim::AdamWState;
use tracing::{info, warn};

use crate::job_checkpoints::{load_from_checkpoint, CheckpointSource};
use crate::WorkerError;

/// Where a rank's state came from at the start of an epoch: its kind, and in words.
pub type Origin = (StateSource, String);

/// Agrees on one training state across the group (see the module docs); returns where
/// the state came from.
///
/// Optimizer moments are sharded (ZeRO-1, each rank also keeping a replica of the previous
/// rank's shard): the ranks holding the chosen step contribute the parameters and moments
/// of the shards they hold, and each rank takes the whole parameter vector and its new own
/// and buddy slices from them. The chosen step is the highest one whose holders' shards
/// cover the whole vector; failing that, the step before, offered by the ranks still at it
/// together with the kept pre-update shards ([`Engine::undo_shards`]) of the ranks that had
/// already applied the failed step (a step's last collective can complete on some ranks
/// and not on others). When neither covers the vector (two neighbours lost at once), or
/// nobody holds state, every rank reads the newest valid checkpoint instead. Every rank
/// sees the same announcements, so they all decide alike.
pub fn sync_state(
    engine: &mut Engine,
    group: &mut BlockingGroup,
    has_state: bool,
    source: &CheckpointSource<'_>,
    timeout: Duration,
) -> Result<Origin, WorkerError> {
    let (world, rank) = (group.world(), group.rank());
    let mine = Announcement {
        step: has_state.then(|| engine.step()),
        undo: has_state.then(|| engine.undo_step()).flatten(),
        ranges: std::iter::once(engine.opt.range.clone())
            .chain(engine.buddy.as_ref().map(|b| b.range.clone()))
            .collect(),
    };
    let all = group.all_gather_within(&mine.encode(), timeout)?;
    let announced: Vec<Announcement> = all
        .iter()
        .enumerate()
        .map(|(r, b)| {
            Announcement::decode(b)
                .map_err(|e| WorkerError::Protocol(format!("rank {r}'s state announcement: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let n = engine.params.len();
    let Some(plan) = choose(&announced, n) else {
        if announced.iter().any(|a| a.step.is_some()) {
            warn!("the survivors' shards do not cover the model; rolling back to a checkpoint");
        }
        return load_from_checkpoint(engine, group, source, timeout);
    };
    let contribution = match plan.offers[rank] {
        Some(Offer::Current) => engine.shards_bytes(),
        Some(Offer::Undo) => engine.undo_shards_bytes().ok_or_else(|| {
            WorkerError::Protocol("announced kept shards it does not hold".into())
        })?,
        None => Vec::new(),
    };
    let parts = group.all_gather_within(&contribution, timeout)?;
    let mut shards = Vec::new();
    for (r, part) in parts.iter().enumerate() {
        let got = parse_shards(part, n)
            .map_err(|e| WorkerError::Protocol(format!("rank {r}'s state shards: {e}")))?;
        if plan.offers[r].is_some() && !got.iter().map(|s| &s.0).eq(&announced[r].ranges) {
            return Err(WorkerError::Protocol(format!(
                "rank {r} sent other shards than it announced"
            )));
        }
        shards.extend(got);
    }
    let step = plan.step;
    let params = assemble(&shards, 0..n, |s| &s.1);
    if params_sha256(&params) != engine.params_sha256() || engine.step() != step {
        engine.load_params(step, params)?;
        info!(step, from = ?plan.holders(), "state received from peers");
    }
    let (own, buddy) = engine.shard_ranges(world, rank);
    let take = |range: Range<usize>| AdamWState {
        m: assemble(&shards, range.clone(), |s| &s.2).into(),
        v: assemble(&shards, range.clone(), |s| &s.3).into(),
        range,
        step,
    };
    engine.set_shards(take(own), buddy.map(take))?;
    Ok((StateSource::Peer, plan.describe()))
}

/// What a rank holds at the start of a plan epoch.
#[derive(Clone, Debug, PartialEq)]
struct Announcement {
    /// The step of its training state, when it holds one.
    step: Option<u64>,
    /// The step of the shards it kept from before its last update, when it kept them.
    undo: Option<u64>,
    /// The ranges of its shards (own, then buddy): those of its state and of its kept
    /// shards alike.
    ranges: Vec<Range<usize>>,
}

impl Announcement {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(18 + 16 * self.ranges.len());
        for v in [self.step, self.undo] {
            b.push(u8::from(v.is_some()));
            b.extend_from_slice(&v.unwrap_or(0).to_le_bytes());
        }
        for r in &self.ranges {
            b.extend_from_slice(&(r.start as u64).to_le_bytes());
            b.extend_from_slice(&(r.end as u64).to_le_bytes());
        }
        b
    }

    fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() < 18 || (b.len() - 18) % 16 != 0 {
            return Err(format!("{} bytes", b.len()));
        }
        let u = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let opt = |at: usize| match b[at] {
            0 => Ok(None),
            1 => Ok(Some(u(at + 1))),
            f => Err(format!("flag {f} at byte {at}")),
        };
        let ranges = (18..b.len())
            .step_by(16)
            .map(|at| u(at) as usize..u(at + 8) as usize)
            .collect();
        Ok(Self {
            step: opt(0)?,
            undo: opt(9)?,
            ranges,
        })
    }
}

/// Which of a rank's shards it contributes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Offer {
    /// Its current shards.
    Current,
    /// The shards it kept from before its last update.
    Undo,
}

/// The state the group agrees on: a step and, per rank, what it contributes.
#[derive(Debug, PartialEq)]
struct Plan {
    step: u64,
    /// The highest step anyone held (`step` or one more).
    best: u64,
    offers: Vec<Option<Offer>>,
}

impl Plan {
    fn holders(&self) -> Vec<usize> {
        (0..self.offers.len())
            .filter(|&r| self.offers[r].is_some())
            .collect()
    }

    /// The resume report's source (`peers in memory ...`).
    fn describe(&self) -> String {
        let step = self.step;
        let base = format!(
            "peers in memory (ranks {:?} at step {step})",
            self.holders()
        );
        if step == self.best {
            return base;
        }
        let ahead: Vec<usize> = (0..self.offers.len())
            .filter(|&r| self.offers[r] == Some(Offer::Undo))
            .collect();
        format!(
            "{base}, one step back: ranks {ahead:?} had applied step {step} and the others had not"
        )
    }
}

/// The highest step whose holders cover the whole vector of `n` parameters: the highest
/// announced, else the one before it with the kept shards of the ranks that got ahead.
/// None: read a checkpoint.
fn choose(announced: &[Announcement], n: usize) -> Option<Plan> {
    let best = announced.iter().filter_map(|a| a.step).max()?;
    for step in [Some(best), best.checked_sub(1)].into_iter().flatten() {
        let offers: Vec<Option<Offer>> = announced
            .iter()
            .map(|a| match (a.step, a.undo) {
                (Some(s), _) if s == step => Some(Offer::Current),
                (Some(_), Some(u)) if u == step => Some(Offer::Undo),
                _ => None,
            })
            .collect();
        let ranges: Vec<&Range<usize>> = announced
            .iter()
            .zip(&offers)
            .filter(|(_, o)| o.is_some())
            .flat_map(|(a, _)| &a.ranges)
            .collect();
        if covers(&ranges, 0..n) {
            return Some(Plan { step, best, offers });
        }
    }
    None
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

fn covers(ranges: &[&Range<usize>], want: Range<usize>) -> bool {
    let mut ranges: Vec<&Range<usize>> = ranges.iter().copied().filter(|r| !r.is_empty()).collect();
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
        let ranges: Vec<&Range<usize>> = shards.iter().map(|s| &s.0).collect();
        assert!(covers(&ranges, 0..10));
        assert!(!covers(&ranges[..2], 0..10));
        assert!(!covers(&[&(0..3), &(4..10)], 0..10));
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

    /// Rank `r` of 4 over 40 parameters, holding shards `r` and `r - 1`.
    fn ann(r: usize, step: Option<u64>, undo: Option<u64>) -> Announcement {
        let q = |k: usize| k * 10..k * 10 + 10;
        Announcement {
            step,
            undo,
            ranges: vec![q(r), q((r + 3) % 4)],
        }
    }

    #[test]
    fn announcements_round_trip_and_bad_ones_are_errors() {
        for a in [
            ann(2, Some(35), Some(34)),
            ann(0, None, None),
            ann(1, Some(7), None),
        ] {
            assert_eq!(Announcement::decode(&a.encode()).unwrap(), a);
        }
        let b = ann(2, Some(35), Some(34)).encode();
        assert!(Announcement::decode(&b[..20])
            .unwrap_err()
            .contains("20 bytes"));
        let mut bad = b.clone();
        bad[9] = 7;
        assert!(Announcement::decode(&bad).unwrap_err().contains("flag 7"));
    }

    #[test]
    fn the_highest_step_whose_holders_cover_the_model_is_chosen() {
        // Rank 1 died; the others all finished step 34: the survivors cover the model.
        let dead = ann(1, None, None);
        let all_at = |s| {
            vec![
                ann(0, Some(s), Some(s - 1)),
                dead.clone(),
                ann(2, Some(s), Some(s - 1)),
                ann(3, Some(s), Some(s - 1)),
            ]
        };
        let p = choose(&all_at(35), 40).unwrap();
        assert_eq!((p.step, p.holders()), (35, vec![0, 2, 3]));
        assert!(p
            .describe()
            .starts_with("peers in memory (ranks [0, 2, 3] at step 35)"));
        // Rank 1 died inside step 34's last collective, which completed on ranks 0 and 3
        // (now at 35) and not on rank 2 (still at 34): 0 and 3 alone miss shard 1, so the
        // group goes back to 34 with their kept shards.
        let split = vec![
            ann(0, Some(35), Some(34)),
            dead.clone(),
            ann(2, Some(34), Some(33)),
            ann(3, Some(35), Some(34)),
        ];
        let p = choose(&split, 40).unwrap();
        assert_eq!(p.step, 34);
        assert_eq!(
            p.offers,
            vec![
                Some(Offer::Undo),
                None,
                Some(Offer::Current),
                Some(Offer::Undo)
            ]
        );
        assert!(
            p.describe()
                .contains("one step back: ranks [0, 3] had applied step 34"),
            "{}",
            p.describe()
        );
        // Without kept shards (or with two neighbours lost) it is a checkpoint.
        let no_undo = vec![
            ann(0, Some(35), None),
            dead.clone(),
            ann(2, Some(34), None),
            ann(3, Some(35), None),
        ];
        assert_eq!(choose(&no_undo, 40), None);
        let two_lost = vec![
            ann(0, Some(35), Some(34)),
            dead.clone(),
            ann(2, None, None),
            ann(3, Some(35), Some(34)),
        ];
        assert_eq!(choose(&two_lost, 40), None);
        // Nobody holds state: a checkpoint; a rank without state does not offer kept shards.
        assert_eq!(
            choose(&[ann(0, None, Some(3)), ann(1, None, None)], 40),
            None
        );
    }

    /// The split for real, on the tiny model: 4 ranks train 2 steps; in step 2 rank 2
    /// dies after the step's last reduction and before its update (its engine survives at
    /// step 2), so ranks 0, 1 and 3 apply step 2 and fail in the parameter gather. Rank 1
    /// is then lost as well, and 0, 2 and 3 form a new group: 0 and 3 alone miss shard 1,
    /// so they go back to step 2 with their kept shards, and training from there ends
    /// bit-identical to an undisturbed run.
    #[test]
    fn survivors_split_by_a_failed_update_resume_one_step_back_bit_identical() {
        use crate::dp::testing::on_ranks;
        use crate::dp::Stepper;
        use std::sync::{Arc, Mutex};
        const T: Duration = Duration::from_secs(30);
        const STEPS: u64 = 5;
        let undisturbed = on_ranks(4, 8, |_, mut e, mut g| {
            let mut s = Stepper::new(&e, &g, &[], T).unwrap();
            while e.step() < STEPS {
                s.step(&mut e, &mut g).unwrap();
            }
            e.params_sha256()
        });
        // The second group: old ranks 0, 2 and 3 as new ranks 0, 1 and 2.
        let listeners: Vec<_> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let listeners = Arc::new(Mutex::new(
            listeners.into_iter().map(Some).collect::<Vec<_>>(),
        ));
        let after = on_ranks(4, 8, move |rank, mut e, mut g| {
            let mut s = Stepper::new(&e, &g, &[], T).unwrap();
            for _ in 0..2 {
                s.step(&mut e, &mut g).unwrap();
            }
            let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                s.step_with(&mut e, &mut g, &mut || {
                    if rank == 2 {
                        panic!("rank 2 dies before its update");
                    }
                })
            }));
            drop(g);
            match (rank, died) {
                (2, Err(_)) => assert_eq!(e.step(), 2),
                (_, Ok(Err(_))) => assert_eq!(e.step(), 3, "rank {rank} applied step 2"),
                (r, other) => panic!("rank {r}: {:?}", other.map(|o| o.map(|r| r.step))),
            }
            if rank == 1 {
                return None;
            }
            let new_rank = [0, 0, 1, 2][rank];
            let l = listeners.lock().unwrap()[new_rank].take().unwrap();
            let mut g = BlockingGroup::connect(
                phalanx_collective::GroupConfig::new(new_rank, peers.clone()),
                l,
            )
            .unwrap();
            let source = CheckpointSource {
                dir: std::env::temp_dir().join("no-checkpoints-here"),
                expect: crate::job_checkpoints::Expected {
                    job_id: "j".into(),
                    model: "tiny".into(),
                    seed: 5,
                    numerics: String::new(),
                },
                catalog: &|| panic!("no checkpoint may be read"),
                refused: &|_, _| {},
            };
            let from = sync_state(&mut e, &mut g, true, &source, T).unwrap();
            assert_eq!(e.step(), 2);
            let mut s = Stepper::new(&e, &g, &[], T).unwrap();
            while e.step() < STEPS {
                s.step(&mut e, &mut g).unwrap();
            }
            Some((from, e.params_sha256()))
        });
        for (from, sha) in after.into_iter().flatten() {
            assert_eq!(from.0, StateSource::Peer);
            assert_eq!(
                from.1,
                "peers in memory (ranks [0, 1, 2] at step 2), one step back: \
                 ranks [0, 2] had applied step 2 and the others had not"
            );
            assert_eq!(sha, undisturbed[0]);
        }
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
