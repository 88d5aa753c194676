//! The committed JSON Schema is the one the types generate, every library scenario is
//! valid and says what it proves, and a report directory gets its files and plots.

use phalanx_proto::RaftRole;
use std::path::PathBuf;

fn scenarios_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scenarios")
}

/// `PHALANX_UPDATE_SCHEMA=1 cargo test -p phalanx-chaos --test schema_and_library`
/// rewrites the file.
#[test]
fn the_committed_schema_is_current() {
    let path = scenarios_dir().join("scenario.schema.json");
    let fresh = phalanx_chaos::schema_json();
    if std::env::var_os("PHALANX_UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &fresh).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "{} is stale: run `PHALANX_UPDATE_SCHEMA=1 cargo test -p phalanx-chaos --test schema_and_library`",
        path.display()
    );
    for word in [
        "cpu-hog",
        "controller-pause",
        "link-down",
        "rates_per_min",
        "max_leaders_per_term",
    ] {
        assert!(fresh.contains(word), "{word}");
    }
}

#[test]
fn every_library_scenario_is_valid_and_says_what_it_proves() {
    let mut n = 0;
    let mut names = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(scenarios_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with('#') && phalanx_chaos::purpose(&text).len() > 20,
            "{} must open with a comment on what it proves",
            path.display()
        );
        let v = phalanx_chaos::parse(&path.display().to_string(), &text)
            .unwrap_or_else(|e| panic!("{e}"));
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        assert_eq!(
            v.scenario.name,
            stem,
            "{}: name = file name",
            path.display()
        );
        assert!(names.insert(stem));
        n += 1;
    }
    assert!(
        n >= 16,
        "the library has {n} scenarios (at least 16 expected)"
    );
}

#[test]
fn a_report_directory_gets_json_markdown_and_four_plots() {
    use phalanx_chaos::check::*;
    use phalanx_chaos::report::*;
    let dir = tempfile::tempdir().unwrap();
    let progress: Vec<ProgressSample> = (0..40)
        .map(|i| ProgressSample {
            t_s: i as f64 * 0.5,
            epoch: if i < 20 { 1 } else { 2 },
            progress_step: i * 3,
            rank_steps: vec![i * 3, i * 3, if (10..14).contains(&i) { 27 } else { i * 3 }],
            ranks: if i < 20 {
                vec!["w0".into(), "w1".into(), "w2".into()]
            } else {
                vec!["w0".into(), "w2".into()]
            },
        })
        .collect();
    let measured = Measured {
        completed: true,
        final_state: "completed".into(),
        progress_step: 117,
        recoveries: vec![RecoveryM {
            epoch: 2,
            source: "peers".into(),
            resumed_at_step: 57,
            steps_redone: 2,
            mttr_s: Some(0.4),
        }],
        leaders: (0..20)
            .flat_map(|i| {
                (1..=3).map(move |n| LeaderSample {
                    t_s: i as f64,
                    node: n,
                    role: if n == 1 + (i / 10) {
                        RaftRole::Leader
                    } else {
                        RaftRole::Follower
                    },
                    term: 2 + i / 10,
                    leader: 1 + i / 10,
                })
            })
            .collect(),
        wall_s: 20.0,
        ..Measured::default()
    };
    let r = Report {
        scenario: "t".into(),
        file: "t.toml".into(),
        description: "a test".into(),
        seed: 3,
        replay: "phalanx scenario run t.toml --seed 3".into(),
        passed: false,
        network: "one host".into(),
        verdicts: vec![Verdict {
            name: "max_mttr_s".into(),
            expected: "<= 0.001 s".into(),
            measured: "0.4 s".into(),
            holds: false,
        }],
        measured,
        faults: vec![FiredFault {
            index: 0,
            kind: "kill".into(),
            target: "rank:1".into(),
            resolved: "worker w1".into(),
            trigger: "at step 57".into(),
            t_s: 9.6,
            step: 57,
            duration_s: None,
            mechanism: "SIGKILL".into(),
            error: None,
        }],
        progress,
        losses: (0..=117).map(|s| (s, 5.0 - s as f64 * 0.02)).collect(),
        notes: vec![],
        error: None,
    };
    write(dir.path(), &r).unwrap();
    for (f, _) in PLOTS {
        let svg = std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert!(svg.contains("<svg") && svg.len() > 1000, "{f}");
    }
    let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    assert!(md.contains("![") && md.contains("loss.svg") && md.contains("❌"));
    let back = read(dir.path()).unwrap();
    // (Floats go through JSON with a last-bit wobble; compare what is exact.)
    assert!(back.verdicts == r.verdicts && back.faults == r.faults && back.progress == r.progress);
    let text = summary_text(&back);
    assert!(
        text.contains("FAILED") && text.contains("replay: phalanx scenario run t.toml --seed 3"),
        "{text}"
    );
    // The step-time grid shows the stall of rank 2 around t = 5 s.
    let (_, grid) = step_time_grid(&r, 40);
    assert!(grid.iter().any(|row| row[2].is_none() && row[0].is_some()));
}
