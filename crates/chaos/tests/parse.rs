//! The scenario format: what parses, and every kind of bad input, each with its line and
//! column.

use phalanx_chaos::{parse, FaultKind, Target, Trigger};

const GOOD: &str = r#"# Kill a rank, then hang another during the recovery.
name = "kill-then-hang"
description = "two faults, the second during the first's recovery"

[cluster]
controllers = 3
workers = 4
spares = 1

[job]
steps = 120
checkpoint_interval_steps = 20

[[faults]]
kind = "kill"
target = "rank:1"
at_step = 30

[[faults]]
kind = "hang"
target = "rank:2"
after_event = { kind = "plan" }
duration_s = 4.0

[[faults]]
kind = "cpu-hog"
target = "host:0"
every_s = 10.0
count = 2
duration_s = 3.0
threads = 2

[expect]
bit_exact_with_reference = true
max_mttr_s = 30.0
required_events = [{ kind = "worker-failed", contains = "rank 1" }]
forbidden_events = [{ kind = "worker-quarantined" }]
"#;

/// The error's first diagnostic as (line, column, message).
fn first_error(text: &str) -> (usize, usize, String) {
    let e = parse("t.toml", text).expect_err("must be refused");
    let d = &e.diagnostics[0];
    // The rendered error names the file, line and column.
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!("t.toml:{}:{}: error", d.line, d.column)),
        "{shown}"
    );
    (d.line, d.column, d.message.clone())
}

#[test]
fn a_good_scenario_parses_and_its_triggers_resolve() {
    let v = parse("good.toml", GOOD).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(v.scenario.name, "kill-then-hang");
    assert_eq!(v.faults.len(), 3);
    assert_eq!(v.faults[0].kind, FaultKind::Kill);
    assert_eq!(v.faults[0].target, Some(Target::Rank(1)));
    assert_eq!(v.faults[0].trigger, Trigger::AtStep(30));
    assert!(matches!(v.faults[1].trigger, Trigger::AfterEvent(_)));
    assert_eq!(
        v.faults[2].trigger,
        Trigger::EveryS {
            every_s: 10.0,
            count: 2
        }
    );
    assert_eq!(v.scenario.job.seed, 7, "the default seed");
    assert_eq!(
        phalanx_chaos::purpose(GOOD),
        "Kill a rank, then hang another during the recovery."
    );
}

#[test]
fn an_unknown_key_is_refused_at_its_line_and_column() {
    let text = GOOD.replace("spares = 1", "spares = 1\nspare_pool = 2");
    let (line, col, msg) = first_error(&text);
    assert_eq!((line, col), (9, 1), "{msg}");
    assert!(msg.contains("unknown field `spare_pool`"), "{msg}");
    assert!(msg.contains("spares"), "names the known fields: {msg}");
}

#[test]
fn an_unknown_fault_kind_lists_the_known_ones() {
    let text = GOOD.replace("kind = \"kill\"", "kind = \"explode\"");
    let (line, col, msg) = first_error(&text);
    assert_eq!((line, col), (15, 8), "{msg}");
    assert!(msg.contains("explode") && msg.contains("cpu-hog"), "{msg}");
}

#[test]
fn a_target_that_does_not_exist_is_refused() {
    let text = GOOD.replace("target = \"rank:1\"", "target = \"rank:9\"");
    let (line, col, msg) = first_error(&text);
    assert_eq!((line, col), (16, 10), "{msg}");
    assert!(msg.contains("at most 4 ranks"), "{msg}");
    let text = GOOD.replace("target = \"rank:1\"", "target = \"worker:w9\"");
    assert!(first_error(&text).2.contains("w0..w4"));
    let text = GOOD.replace("target = \"rank:1\"", "target = \"gpu:1\"");
    let (line, _, msg) = first_error(&text);
    assert_eq!(line, 16);
    assert!(msg.contains("expected rank:R"), "{msg}");
    let text = GOOD.replace("target = \"host:0\"", "target = \"host:3\"");
    assert!(first_error(&text).2.contains("hosts are 0..=0"));
    // A kind that cannot hit such a target.
    let text = GOOD
        .replace("target = \"rank:1\"", "target = \"controller:leader\"")
        .replace("kind = \"kill\"", "kind = \"sdc\"");
    assert!(first_error(&text).2.contains("`sdc` cannot hit"));
}

#[test]
fn a_trigger_after_the_last_step_is_refused() {
    let text = GOOD.replace("at_step = 30", "at_step = 120");
    let (line, col, msg) = first_error(&text);
    assert_eq!((line, col), (17, 11), "{msg}");
    assert!(msg.contains("after the last step"), "{msg}");
}

#[test]
fn triggers_are_exactly_one() {
    let text = GOOD.replace("at_step = 30", "at_step = 30\nat_s = 5.0");
    assert!(first_error(&text).2.contains("more than one trigger"));
    let text = GOOD.replace("at_step = 30\n", "");
    let (line, _, msg) = first_error(&text);
    assert_eq!(line, 14, "points at the fault's table: {msg}");
    assert!(msg.contains("no trigger"));
    let text = GOOD.replace("at_step = 30", "at_step = 30\ncount = 3");
    assert!(first_error(&text).2.contains("only with `every_s`"));
}

#[test]
fn contradictory_expectations_are_refused() {
    let text = GOOD.replace("[expect]\n", "[expect]\ncompletes = false\n");
    let (line, _, msg) = first_error(&text);
    assert_eq!(line, 35, "{msg}");
    assert!(msg.contains("contradictory"), "{msg}");
    let text = GOOD.replace(
        "forbidden_events = [{ kind = \"worker-quarantined\" }]",
        "forbidden_events = [{ kind = \"worker-failed\" }]",
    );
    let (line, _, msg) = first_error(&text);
    assert_eq!(line, 36);
    assert!(
        msg.contains("contradictory") && msg.contains("forbidden"),
        "{msg}"
    );
    let text = GOOD.replace("max_mttr_s = 30.0", "max_leaders_per_term = 0");
    assert!(first_error(&text).2.contains("contradictory"));
    let text = GOOD.replace("max_mttr_s = 30.0", "max_wall_s = 5.0");
    assert!(first_error(&text).2.contains("after `expect.max_wall_s"));
}

#[test]
fn durations_and_parameters_are_checked() {
    let text = GOOD.replace("duration_s = 4.0\n", "");
    assert!(first_error(&text).2.contains("needs `duration_s`"));
    let text = GOOD.replace("at_step = 30", "at_step = 30\nduration_s = 1.0");
    assert!(first_error(&text).2.contains("has no duration"));
    let text = GOOD.replace("threads = 2", "threads = 0");
    assert!(first_error(&text).2.contains("threads = 0"));
    let text = GOOD
        .replace("kind = \"cpu-hog\"", "kind = \"link-down\"")
        .replace("threads = 2\n", "");
    assert!(first_error(&text).2.contains("at least 2 hosts"));
}

#[test]
fn a_file_that_is_not_toml_is_refused_at_the_error() {
    let (line, col, msg) = first_error("name = \"x\"\n[job\nsteps = 3\n");
    assert_eq!(line, 2, "{msg} at {col}");
    assert!(msg.contains("not valid TOML"), "{msg}");
    let (line, _, msg) = first_error("{ \"name\": \"json\" }");
    assert_eq!(line, 1);
    assert!(msg.contains("not valid TOML"), "{msg}");
}

#[test]
fn wrong_types_and_missing_sections_are_refused() {
    let (_, _, msg) = first_error("name = \"x\"\n");
    assert!(msg.contains("missing field `job`"), "{msg}");
    let text = GOOD.replace("steps = 120", "steps = \"many\"");
    let (line, col, msg) = first_error(&text);
    assert_eq!((line, col), (11, 9), "{msg}");
    let text = GOOD.replace("steps = 120", "steps = 0");
    let (line, _, msg) = first_error(&text);
    assert_eq!(line, 11, "{msg}");
}

#[test]
fn the_job_is_the_one_the_controller_accepts() {
    let v = parse("good.toml", GOOD).unwrap();
    let spec = phalanx_chaos::job_spec(&v.scenario, 11);
    assert_eq!(spec.seed, 11);
    assert_eq!(spec.world_size_max, 4);
    phalanx_core::jobfile::validate_job(&spec).unwrap();
}

mod props {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Arbitrary text never panics the parser.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
            let _ = phalanx_chaos::parse("p.toml", &text);
        }

        /// A valid file with a slice cut out or a character spliced in never panics, and
        /// every error it gives points inside the file.
        #[test]
        fn mutated_scenarios_never_panic(cut in 0usize..1200, len in 0usize..40, ch in any::<char>()) {
            let good = super::GOOD;
            let mut s: Vec<char> = good.chars().collect();
            let at = cut.min(s.len());
            let end = (at + len).min(s.len());
            s.splice(at..end, std::iter::once(ch));
            let text: String = s.into_iter().collect();
            if let Err(e) = phalanx_chaos::parse("p.toml", &text) {
                let lines = text.lines().count().max(1);
                for d in &e.diagnostics {
                    prop_assert!(d.line >= 1 && d.line <= lines + 1, "{d:?}");
                    prop_assert!(d.column >= 1);
                }
                let _ = e.to_string();
            }
        }

        /// Values of any size in numeric fields never panic.
        #[test]
        fn extreme_numbers_never_panic(steps in any::<i64>(), at in any::<i64>(), d in any::<f64>(), c in any::<i64>()) {
            let text = format!(
                "name = \"n\"\n[job]\nsteps = {steps}\n[[faults]]\nkind = \"hang\"\ntarget = \"rank:0\"\nat_step = {at}\nduration_s = {d:?}\n[[faults]]\nkind = \"kill\"\ntarget = \"random-worker\"\nevery_s = {d:?}\ncount = {c}\n"
            );
            let _ = phalanx_chaos::parse("p.toml", &text);
        }
    }
}
