//! The register linearizability checker of `controller_linearizability.rs` (a WGL search),
//! shared by the partition test. Kept identical to the original; see that file for its
//! own test.
//!
//! Times are microseconds since the start of the run.

use std::collections::HashSet;

#[derive(Debug, Clone)]
pub enum OpKind {
    Write(u32),
    Read(Option<u32>),
}

#[derive(Debug, Clone)]
pub struct Op {
    pub kind: OpKind,
    pub call: u64,
    /// None: the client got no answer; the write may or may not have happened.
    pub ret: Option<u64>,
}

/// WGL search: is there a total order of the ops, consistent with real time, in which
/// every completed read returns the latest write? Pending writes may be left out.
pub fn linearizable(ops: &[Op]) -> Result<(), String> {
    let n = ops.len();
    let words = n.div_ceil(64);
    let mut memo: HashSet<(Vec<u64>, Option<u32>)> = HashSet::new();
    let completed: Vec<usize> = (0..n).filter(|i| ops[*i].ret.is_some()).collect();
    // Iterative DFS: (bitset, state, next candidate cursor).
    let mut stack: Vec<(Vec<u64>, Option<u32>)> = vec![(vec![0u64; words], None)];
    let mut explored = 0u64;
    while let Some((bits, state)) = stack.pop() {
        explored += 1;
        if explored > 20_000_000 {
            return Err("search too large".into());
        }
        let done = |i: usize| bits[i / 64] >> (i % 64) & 1 == 1;
        if completed.iter().all(|i| done(*i)) {
            return Ok(());
        }
        let min_ret = completed
            .iter()
            .filter(|i| !done(**i))
            .filter_map(|i| ops[*i].ret)
            .min()
            .unwrap_or(u64::MAX);
        for i in (0..n).rev() {
            if done(i) || ops[i].call > min_ret {
                continue;
            }
            let new_state = match ops[i].kind {
                OpKind::Write(v) => Some(v),
                OpKind::Read(r) => {
                    if r != state {
                        continue;
                    }
                    state
                }
            };
            let mut nb = bits.clone();
            nb[i / 64] |= 1 << (i % 64);
            if memo.insert((nb.clone(), new_state)) {
                stack.push((nb, new_state));
            }
        }
    }
    Err(format!(
        "no linearization of {n} operations (explored {explored} states)"
    ))
}
