//! Round trip, resharding, corruption fallback, fault injection and retention.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use phalanx_checkpoint::*;
use rand::{Rng, SeedableRng};

/// A "global" optimizer state: the moments for every element, as if all ranks' shards
/// were concatenated. Values include -0.0, subnormals, infinities and NaN payloads so bit
/// exactness is really tested.
struct Global {
    params: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

fn global(n: usize, seed: u64) -> Global {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut gen = |i: usize| match i % 97 {
        0 => -0.0,
        1 => f32::from_bits(1),
        2 => f32::from_bits(0x7fc0_1234),
        3 => f32::INFINITY,
        _ => f32::from_bits(rng.gen::<u32>() & 0x7f7f_ffff),
    };
    Global {
        params: (0..n).map(&mut gen).collect(),
        m: (0..n).map(&mut gen).collect(),
        v: (0..n).map(&mut gen).collect(),
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|f| f.to_bits()).collect()
}

fn layout() -> Vec<LayoutEntry> {
    vec![
        ("wte".into(), vec![4, 8], 0),
        ("ln.bias".into(), vec![8], 32),
    ]
}

/// Writes checkpoint `step` of `g` as `world` ranks and commits it.
fn save(root: &Path, g: &Global, step: u64, world: usize) -> Manifest {
    let n = g.params.len();
    let mut records = Vec::new();
    for rank in 0..world {
        let range = shard_range(n, world, rank);
        let extra = format!("{{\"rank\":{rank},\"cursor\":{step}}}").into_bytes();
        let state = RankState {
            step,
            seed: 7,
            params: &g.params,
            range: range.clone(),
            m: &g.m[range.clone()],
            v: &g.v[range],
            opt_step: step,
            extra: &extra,
        };
        records.push(write_shard(root, world, rank, &state, None).expect("write shard"));
    }
    let spec = ManifestSpec {
        step,
        world,
        param_count: n,
        seed: 7,
        layout: layout(),
        params_sha256: Some(params_sha256(&g.params)),
        ..Default::default()
    };
    commit_manifest(root, &spec, records).expect("commit")
}

#[test]
fn round_trip_single_rank() {
    let dir = tempfile::tempdir().unwrap();
    let g = global(1000, 1);
    let manifest = save(dir.path(), &g, 5, 1);
    assert_eq!(
        manifest.params_sha256.as_deref(),
        Some(params_sha256(&g.params).as_str())
    );
    assert_eq!(
        manifest.shards[0].params_section_sha256,
        params_sha256(&g.params)
    );
    let listed: Vec<u64> = list(dir.path()).unwrap().iter().map(|e| e.step).collect();
    assert_eq!(listed, vec![5]);
    assert!(verify(dir.path(), 5).is_valid());
    let loaded = load_resharded(dir.path(), 5, 1, 0).unwrap();
    assert_eq!(bits(&loaded.params), bits(&g.params));
    assert_eq!(bits(&loaded.m), bits(&g.m));
    assert_eq!(bits(&loaded.v), bits(&g.v));
    assert_eq!(
        (loaded.step, loaded.seed, loaded.opt_step, loaded.old_world),
        (5, 7, 5, 1)
    );
    assert_eq!(loaded.extras, vec![b"{\"rank\":0,\"cursor\":5}".to_vec()]);
    assert_eq!(loaded.layout, layout());
    // The header on disk parses and matches.
    let bytes = fs::read(step_dir(dir.path(), 5).join("shard-0-of-1.bin")).unwrap();
    let h = ShardHeader::decode(&bytes).unwrap();
    assert_eq!(
        (h.step, h.world, h.rank, h.range_start, h.range_end),
        (5, 1, 0, 0, 1000)
    );
}

#[test]
fn reshard_any_world_to_any_world_is_bit_exact() {
    let n = 1013; // prime: uneven splits everywhere
    let g = global(n, 2);
    for (old_world, new_worlds) in [
        (4usize, vec![1usize, 2, 3, 4, 5]),
        (3, vec![4, 1, 7]),
        (1, vec![3]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &g, 10, old_world);
        for new_world in new_worlds {
            for new_rank in 0..new_world {
                let loaded = load_resharded(dir.path(), 10, new_world, new_rank).unwrap();
                let r = shard_range(n, new_world, new_rank);
                assert_eq!(loaded.range, r);
                assert_eq!(
                    bits(&loaded.params),
                    bits(&g.params),
                    "{old_world}->{new_world}"
                );
                assert_eq!(
                    bits(&loaded.m),
                    bits(&g.m[r.clone()]),
                    "{old_world}->{new_world} rank {new_rank}"
                );
                assert_eq!(
                    bits(&loaded.v),
                    bits(&g.v[r]),
                    "{old_world}->{new_world} rank {new_rank}"
                );
                assert_eq!(loaded.extras.len(), old_world);
            }
        }
    }
}

#[test]
fn load_range_accepts_a_custom_split() {
    let dir = tempfile::tempdir().unwrap();
    let g = global(300, 3);
    save(dir.path(), &g, 1, 4);
    let loaded = load_range(dir.path(), 1, 70..231).unwrap();
    assert_eq!(bits(&loaded.m), bits(&g.m[70..231]));
    assert!(load_range(dir.path(), 1, 0..301).is_err());
    assert!(load_resharded(dir.path(), 1, 2, 2).is_err());
}

#[test]
fn corrupt_shard_is_detected_and_latest_valid_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let g = global(500, 4);
    save(dir.path(), &g, 10, 4);
    save(dir.path(), &g, 20, 4);
    let path = corrupt_shard(dir.path(), 20, 2).unwrap();
    let report = verify(dir.path(), 20);
    assert!(!report.is_valid());
    assert_eq!(report.problems.len(), 1);
    assert_eq!(report.problems[0].file, path);
    assert!(matches!(
        report.problems[0].kind,
        ProblemKind::ChecksumMismatch { .. }
    ));
    let latest = latest_valid(dir.path()).unwrap();
    assert_eq!(latest.step(), Some(10));
    assert_eq!(latest.skipped.len(), 1);
    let shown = latest.skipped[0].to_string();
    assert!(
        shown.contains("step 20")
            && shown.contains("shard-2-of-4.bin")
            && shown.contains("sha256 mismatch"),
        "{shown}"
    );
    // Loading the corrupt one fails with a typed error naming the shard.
    let err = load_resharded(dir.path(), 20, 1, 0).unwrap_err();
    assert!(
        matches!(err, CheckpointError::ChecksumMismatch { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("shard-2-of-4.bin"));
}

#[test]
fn missing_shard_and_truncated_manifest_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let g = global(200, 5);
    save(dir.path(), &g, 1, 2);
    save(dir.path(), &g, 2, 2);
    save(dir.path(), &g, 3, 2);
    fs::remove_file(step_dir(dir.path(), 3).join("shard-1-of-2.bin")).unwrap();
    let manifest = step_dir(dir.path(), 2).join(MANIFEST_FILE);
    let text = fs::read(&manifest).unwrap();
    fs::write(&manifest, &text[..text.len() / 2]).unwrap();
    let latest = latest_valid(dir.path()).unwrap();
    assert_eq!(latest.step(), Some(1));
    let kinds: Vec<_> = latest
        .skipped
        .iter()
        .map(|p| (p.step, p.kind.clone()))
        .collect();
    assert_eq!(kinds[0], (3, ProblemKind::Missing));
    assert_eq!(kinds[1].0, 2);
    assert!(matches!(kinds[1].1, ProblemKind::ManifestUnreadable { .. }));
    assert!(matches!(
        read_manifest(dir.path(), 2),
        Err(CheckpointError::BadManifest { .. })
    ));
    assert!(matches!(
        load_resharded(dir.path(), 3, 1, 0),
        Err(CheckpointError::Io { .. })
    ));
}

#[test]
fn truncated_shard_is_a_size_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let g = global(200, 6);
    save(dir.path(), &g, 4, 1);
    let shard = step_dir(dir.path(), 4).join("shard-0-of-1.bin");
    let bytes = fs::read(&shard).unwrap();
    fs::write(&shard, &bytes[..bytes.len() - 3]).unwrap();
    let report = verify(dir.path(), 4);
    assert!(matches!(
        report.problems[0].kind,
        ProblemKind::SizeMismatch { .. }
    ));
    assert!(latest_valid(dir.path()).unwrap().manifest.is_none());
}

#[test]
fn partial_checkpoint_without_manifest_is_never_listed() {
    let dir = tempfile::tempdir().unwrap();
    let g = global(100, 7);
    save(dir.path(), &g, 1, 2);
    // Step 2: both shards durable, manifest never committed.
    for rank in 0..2 {
        let range = shard_range(100, 2, rank);
        let state = RankState {
            step: 2,
            seed: 7,
            params: &g.params,
            range: range.clone(),
            m: &g.m[range.clone()],
            v: &g.v[range],
            opt_step: 2,
            extra: b"",
        };
        write_shard(dir.path(), 2, rank, &state, None).unwrap();
    }
    assert_eq!(
        list(dir.path())
            .unwrap()
            .iter()
            .map(|e| e.step)
            .collect::<Vec<_>>(),
        vec![1]
    );
    assert_eq!(scan(dir.path()).unwrap().len(), 2);
    assert_eq!(latest_valid(dir.path()).unwrap().step(), Some(1));
    assert!(matches!(
        load_resharded(dir.path(), 2, 1, 0),
        Err(CheckpointError::NotCommitted { step: 2, .. })
    ));
    // A newer partial directory is not touched by retention; an older one is.
    let r = apply_retention(dir.path(), 1).unwrap();
    assert!(r.deleted_partial_steps.is_empty());
    assert!(step_dir(dir.path(), 2).exists());
}

#[test]
fn commit_refuses_incomplete_or_inconsistent_records() {
    let dir = tempfile::tempdir().unwrap();
    let g = global(100, 8);
    let range = shard_range(100, 2, 0);
    let state = RankState {
        step: 3,
        seed: 7,
        params: &g.params,
        range: range.clone(),
        m: &g.m[range.clone()],
        v: &g.v[range],
        opt_step: 3,
        extra: b"",
    };
    let rec = write_shard(dir.path(), 2, 0, &state, None).unwrap();
    let spec = ManifestSpec {
        step: 3,
        world: 2,
        param_count: 100,
        seed: 7,
        layout: vec![],
        params_sha256: None,
        ..Default::default()
    };
    assert!(matches!(
        commit_manifest(dir.path(), &spec, vec![rec.clone()]),
        Err(CheckpointError::BadManifest { .. })
    ));
    let mut forged = rec.clone();
    forged.rank = 1;
    forged.file = shard_file_name(1, 2);
    forged.range = 50..100;
    let err = commit_manifest(dir.path(), &spec, vec![rec, forged]).unwrap_err();
    assert!(
        matches!(err, CheckpointError::Io { op: "stat", .. }),
        "{err}"
    );
    assert!(list(dir.path()).unwrap().is_empty());
    // Bad arguments are typed errors.
    let bad = RankState {
        step: 3,
        seed: 7,
        params: &g.params,
        range: 90..120,
        m: &[],
        v: &[],
        opt_step: 0,
        extra: b"",
    };
    assert!(matches!(
        write_shard(dir.path(), 2, 0, &bad, None),
        Err(CheckpointError::InvalidInput(_))
    ));
    let state = RankState {
        step: 3,
        seed: 7,
        params: &g.params,
        range: 0..10,
        m: &g.m[..10],
        v: &g.v[..10],
        opt_step: 0,
        extra: b"",
    };
    assert!(matches!(
        write_shard(dir.path(), 2, 2, &state, None),
        Err(CheckpointError::InvalidInput(_))
    ));
}

#[test]
fn retention_keeps_exactly_r_and_never_the_newest_valid() {
    let dir = tempfile::tempdir().unwrap();
    let g = global(64, 9);
    for step in 1..=5 {
        save(dir.path(), &g, step, 2);
        apply_retention(dir.path(), 2).unwrap();
    }
    let steps: Vec<u64> = list(dir.path()).unwrap().iter().map(|e| e.step).collect();
    assert_eq!(steps, vec![4, 5]);
    // Newest two corrupt: the newest valid (3) must survive retention with R = 2.
    save(dir.path(), &g, 6, 2);
    let r = apply_retention(dir.path(), 2).unwrap();
    assert_eq!(r.kept_steps, vec![5, 6]);
    assert_eq!(r.deleted_steps, vec![4]);
    corrupt_shard(dir.path(), 5, 0).unwrap();
    corrupt_shard(dir.path(), 6, 1).unwrap();
    save(dir.path(), &g, 7, 2);
    corrupt_shard(dir.path(), 7, 0).unwrap();
    let r = apply_retention(dir.path(), 2).unwrap();
    // Kept 6 and 7 (newest two), but none verifies, so the newest valid older one stays:
    // 5 is corrupt and there is nothing older, so nothing valid exists and 5 is deleted.
    assert_eq!(r.kept_steps, vec![6, 7]);
    assert_eq!(r.deleted_steps, vec![5]);
    // Now with a valid older one.
    let dir = tempfile::tempdir().unwrap();
    for step in 1..=3 {
        save(dir.path(), &g, step, 1);
    }
    corrupt_shard(dir.path(), 3, 0).unwrap();
    let r = apply_retention(dir.path(), 1).unwrap();
    assert_eq!(r.kept_steps, vec![2, 3]);
    assert_eq!(r.deleted_steps, vec![1]);
    assert_eq!(latest_valid(dir.path()).unwrap().step(), Some(2));
    assert!(apply_retention(dir.path(), 0).is_err());
}

fn drain(rx: &std::sync::mpsc::Receiver<CheckpointEvent>) -> Vec<CheckpointEvent> {
    rx.try_iter().collect()
}

#[test]
fn async_snapshot_round_trip_and_auto_commit_with_retention() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = CheckpointerConfig::new(dir.path(), 1, 0);
    cfg.auto_commit = true;
    cfg.retain_count = 2;
    cfg.layout = layout();
    let (ckpt, events) = AsyncCheckpointer::spawn(cfg).unwrap();
    let mut g = global(4096, 10);
    for step in 1..=4u64 {
        ckpt.snapshot(&RankState {
            step,
            seed: 7,
            params: &g.params,
            range: 0..4096,
            m: &g.m,
            v: &g.v,
            opt_step: step,
            extra: b"x",
        })
        .unwrap();
        // The training thread may mutate right away: the snapshot is a copy.
        let saved = g.params.clone();
        g.params.iter_mut().for_each(|p| *p += 1.0);
        let rec = ckpt.wait_durable(step, Duration::from_secs(10)).unwrap();
        assert_eq!(rec.params_section_sha256, params_sha256(&saved));
        let loaded = load_resharded(dir.path(), step, 1, 0).unwrap();
        assert_eq!(bits(&loaded.params), bits(&saved));
    }
    let steps: Vec<u64> = list(dir.path()).unwrap().iter().map(|e| e.step).collect();
    assert_eq!(steps, vec![3, 4]);
    let ev = drain(&events);
    assert_eq!(
        ev.iter()
            .filter(|e| matches!(e, CheckpointEvent::Durable { .. }))
            .count(),
        4
    );
    assert_eq!(
        ev.iter()
            .filter(|e| matches!(e, CheckpointEvent::Committed { .. }))
            .count(),
        4
    );
    assert!(ev.iter().any(|e| matches!(e, CheckpointEvent::RetentionApplied { deleted_steps } if deleted_steps == &vec![1])));
    assert_eq!(
        ckpt.wait_durable(99, Duration::from_millis(1)),
        Err(WaitError::UnknownStep { step: 99 })
    );
    ckpt.close(Duration::from_secs(10)).unwrap();
}

#[test]
fn async_shared_snapshot_per_rank_then_controller_commit() {
    let dir = tempfile::tempdir().unwrap();
    let g = global(999, 11);
    let params = Arc::new(g.params.clone());
    let world = 3;
    let mut writers = Vec::new();
    for rank in 0..world {
        let (ckpt, _events) =
            AsyncCheckpointer::spawn(CheckpointerConfig::new(dir.path(), world, rank)).unwrap();
        let r = shard_range(999, world, rank);
        ckpt.snapshot_shared(SharedRankState {
            step: 8,
            seed: 7,
            params: params.clone(),
            range: r.clone(),
            m: Arc::new(g.m[r.clone()].to_vec()),
            v: Arc::new(g.v[r].to_vec()),
            opt_step: 8,
            extra: vec![],
        })
        .unwrap();
        writers.push(ckpt);
    }
    let records: Vec<ShardRecord> = writers
        .iter()
        .map(|w| w.wait_durable(8, Duration::from_secs(10)).unwrap())
        .collect();
    assert!(
        list(dir.path()).unwrap().is_empty(),
        "not committed before the controller says so"
    );
    let spec = ManifestSpec {
        step: 8,
        world,
        param_count: 999,
        seed: 7,
        layout: vec![],
        params_sha256: Some(params_sha256(&g.params)),
        ..Default::default()
    };
    commit_manifest(dir.path(), &spec, records).unwrap();
    let loaded = load_resharded(dir.path(), 8, 2, 1).unwrap();
    assert_eq!(bits(&loaded.params), bits(&g.params));
    assert_eq!(bits(&loaded.m), bits(&g.m[shard_range(999, 2, 1)]));
}

#[test]
fn injected_disk_full_retries_then_succeeds_without_panic() {
    let dir = tempfile::tempdir().unwrap();
    let fault = FaultInjector::new();
    let mut cfg = CheckpointerConfig::new(dir.path(), 1, 0);
    cfg.auto_commit = true;
    cfg.fault = Some(fault.clone());
    cfg.initial_backoff_ms = 5;
    cfg.max_backoff_ms = 40;
    cfg.max_attempts = 100;
    let (ckpt, events) = AsyncCheckpointer::spawn(cfg).unwrap();
    let g = global(2048, 12);
    fault.disk_full_for(Duration::from_millis(150));
    ckpt.snapshot(&RankState {
        step: 1,
        seed: 7,
        params: &g.params,
        range: 0..2048,
        m: &g.m,
        v: &g.v,
        opt_step: 1,
        extra: b"",
    })
    .unwrap();
    let rec = ckpt.wait_durable(1, Duration::from_secs(10)).unwrap();
    assert_eq!(rec.params_section_sha256, params_sha256(&g.params));
    let ev = drain(&events);
    let failed = ev
        .iter()
        .filter(|e| {
            matches!(
                e,
                CheckpointEvent::Failed {
                    disk_full: true,
                    ..
                }
            )
        })
        .count();
    let retrying = ev
        .iter()
        .filter(|e| matches!(e, CheckpointEvent::Retrying { .. }))
        .count();
    assert!(failed >= 2 && retrying == failed, "{ev:?}");
    assert!(
        matches!(ev.last(), Some(CheckpointEvent::Committed { step: 1, .. })),
        "{ev:?}"
    );
    assert!(fault.injected_count() >= 2);
    // No temp files left behind, and the checkpoint verifies.
    let leftovers: Vec<_> = fs::read_dir(step_dir(dir.path(), 1))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
    assert_eq!(latest_valid(dir.path()).unwrap().step(), Some(1));
}

#[test]
fn persistent_failure_gives_up_with_an_event_and_busy_never_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let fault = FaultInjector::new();
    let mut cfg = CheckpointerConfig::new(dir.path(), 1, 0);
    cfg.fault = Some(fault.clone());
    cfg.initial_backoff_ms = 20;
    cfg.max_backoff_ms = 20;
    cfg.max_attempts = 3;
    cfg.max_in_flight = 1;
    let (ckpt, events) = AsyncCheckpointer::spawn(cfg).unwrap();
    let g = global(64, 13);
    let state = |step| RankState {
        step,
        seed: 7,
        params: &g.params,
        range: 0..64,
        m: &g.m,
        v: &g.v,
        opt_step: step,
        extra: b"",
    };
    fault.fail_next_attempts(3);
    ckpt.snapshot(&state(1)).unwrap();
    assert!(matches!(
        ckpt.snapshot(&state(2)),
        Err(SnapshotError::Busy {
            step: 2,
            in_flight: 1
        })
    ));
    assert!(matches!(
        ckpt.wait_durable(1, Duration::from_millis(1)),
        Err(WaitError::Timeout { step: 1, .. })
    ));
    assert!(matches!(
        ckpt.wait_durable(1, Duration::from_secs(10)),
        Err(WaitError::GaveUp { step: 1, .. })
    ));
    let ev = drain(&events);
    assert!(
        matches!(
            ev.last(),
            Some(CheckpointEvent::GaveUp {
                step: 1,
                attempts: 3,
                ..
            })
        ),
        "{ev:?}"
    );
    // The writer is still alive: the next snapshot succeeds.
    ckpt.snapshot(&state(2)).unwrap();
    ckpt.wait_durable(2, Duration::from_secs(10)).unwrap();
    assert!(
        list(dir.path()).unwrap().is_empty(),
        "no auto commit configured"
    );
    drop(ckpt); // Drop shuts down within its timeout.
}

#[test]
fn auto_commit_needs_world_one() {
    let mut cfg = CheckpointerConfig::new("/nonexistent", 2, 0);
    cfg.auto_commit = true;
    assert!(AsyncCheckpointer::spawn(cfg).is_err());
    assert!(AsyncCheckpointer::spawn(CheckpointerConfig::new("/nonexistent", 2, 2)).is_err());
}

#[test]
fn write_failure_surfaces_as_event_on_unwritable_root() {
    // A root that is a file: every write fails with a real I/O error.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("not-a-dir");
    fs::write(&root, b"x").unwrap();
    let mut cfg = CheckpointerConfig::new(&root, 1, 0);
    cfg.max_attempts = 2;
    cfg.initial_backoff_ms = 1;
    let (ckpt, events) = AsyncCheckpointer::spawn(cfg).unwrap();
    let g = global(8, 14);
    ckpt.snapshot(&RankState {
        step: 1,
        seed: 0,
        params: &g.params,
        range: 0..8,
        m: &g.m,
        v: &g.v,
        opt_step: 0,
        extra: b"",
    })
    .unwrap();
    assert!(matches!(
        ckpt.wait_durable(1, Duration::from_secs(10)),
        Err(WaitError::GaveUp { .. })
    ));
    let ev = drain(&events);
    assert!(
        ev.iter().any(
            |e| matches!(e, CheckpointEvent::Failed { error, .. } if error.contains("not-a-dir"))
        ),
        "{ev:?}"
    );
}

#[test]
fn shared_snapshot_releases_buffers_before_the_write_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let fault = FaultInjector::new();
    let mut cfg = CheckpointerConfig::new(dir.path(), 1, 0);
    cfg.fault = Some(fault.clone());
    cfg.initial_backoff_ms = 50;
    cfg.max_backoff_ms = 50;
    cfg.max_attempts = 10;
    let (ckpt, _events) = AsyncCheckpointer::spawn(cfg).unwrap();
    let g = global(3000, 15);
    let mut params = Arc::new(g.params.clone());
    let (m, v) = (Arc::new(g.m.clone()), Arc::new(g.v.clone()));
    // The write keeps failing for a while, but the buffers are released right away.
    fault.fail_next_attempts(3);
    ckpt.snapshot_shared(SharedRankState {
        step: 1,
        seed: 7,
        params: params.clone(),
        range: 0..3000,
        m: m.clone(),
        v,
        opt_step: 1,
        extra: vec![],
    })
    .unwrap();
    ckpt.wait_released(1, Duration::from_secs(10)).unwrap();
    assert_eq!(
        Arc::strong_count(&params),
        1,
        "writer dropped its reference"
    );
    Arc::make_mut(&mut params).iter_mut().for_each(|p| *p = 0.0); // no copy, mutation allowed
    assert!(matches!(
        ckpt.wait_durable(1, Duration::from_millis(1)),
        Err(WaitError::Timeout { .. })
    ));
    let rec = ckpt.wait_durable(1, Duration::from_secs(10)).unwrap();
    assert_eq!(
        rec.params_section_sha256,
        params_sha256(&g.params),
        "the snapshot, not the mutation"
    );
    assert!(matches!(
        ckpt.wait_released(5, Duration::from_millis(1)),
        Err(WaitError::UnknownStep { step: 5 })
    ));
}

#[test]
fn rewriting_a_committed_step_uncommits_it_until_recommitted() {
    let dir = tempfile::tempdir().unwrap();
    let g = global(100, 16);
    save(dir.path(), &g, 1, 2);
    save(dir.path(), &g, 2, 2);
    let other = global(100, 17);
    let range = shard_range(100, 2, 0);
    let state = RankState {
        step: 2,
        seed: 7,
        params: &other.params,
        range: range.clone(),
        m: &other.m[range.clone()],
        v: &other.v[range],
        opt_step: 2,
        extra: b"",
    };
    write_shard(dir.path(), 2, 0, &state, None).unwrap();
    assert_eq!(
        list(dir.path())
            .unwrap()
            .iter()
            .map(|e| e.step)
            .collect::<Vec<_>>(),
        vec![1]
    );
    assert_eq!(latest_valid(dir.path()).unwrap().step(), Some(1));
    save(dir.path(), &other, 2, 2);
    let loaded = load_resharded(dir.path(), 2, 1, 0).unwrap();
    assert_eq!(bits(&loaded.params), bits(&other.params));
}

#[test]
fn manifest_claiming_a_huge_model_is_an_error_not_an_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let g = global(100, 18);
    save(dir.path(), &g, 1, 1);
    let path = step_dir(dir.path(), 1).join(MANIFEST_FILE);
    let mut m: Manifest = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    m.param_count = 1 << 50;
    m.shards[0].range = 0..(1 << 50);
    m.shards[0].bytes = u64::MAX / 2;
    fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    assert!(load_resharded(dir.path(), 1, 1, 0).is_err());
    m.shards[0].bytes = 128 + 12 * (1u64 << 50);
    fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    assert!(matches!(
        load_resharded(dir.path(), 1, 1, 0),
        Err(CheckpointError::SizeMismatch { .. })
    ));
    assert!(!verify(dir.path(), 1).is_valid());
}
