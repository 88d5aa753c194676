//! Simulation files: the presets parse, the committed JSON Schema is the generated one,
//! and bad files get errors that name the field.

use phalanx_sim::config::{parse, schema_json, PRESETS};
use phalanx_sim::Job;

#[test]
fn every_preset_parses_and_builds() {
    for (name, text) in PRESETS {
        let f = parse(text, name).unwrap_or_else(|e| panic!("{e}"));
        Job::build(&f).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn the_committed_schema_is_the_generated_one() {
    let committed = include_str!("../sim.schema.json");
    assert_eq!(
        committed,
        schema_json(),
        "crates/sim/sim.schema.json is stale: phalanx sim schema > crates/sim/sim.schema.json"
    );
}

fn base() -> String {
    PRESETS[0].1.to_string()
}

#[test]
fn bad_files_get_errors_naming_the_field() {
    let cases: Vec<(String, &str)> = vec![
        (base().replace("days = 54.0", "days = -1.0"), "days"),
        (base().replace("tp = 8", "tp = 0"), "layout.tp"),
        (base().replace("gpus = 16384", "gpus = 16000"), "layout"),
        (
            base().replace("kind = \"restart\"", "kind = \"pray\""),
            "pray",
        ),
        (base().replace("[layout]", "[layout]\nwarp = 9"), "warp"),
        (base().replace("tp = 8", "tp = \"eight\""), "tp"),
        (
            base().replace("gpu = \"H100-SXM-80GB\"", "gpu = \"Z80\""),
            "hardware.gpu",
        ),
        (
            base().replace("preset = \"llama3-405b\"", "preset = \"llama9\""),
            "model.preset",
        ),
        (
            base()
                .replace("recompute = \"full\"", "recompute = \"selective\"")
                .replace("pp = 16", "pp = 8")
                .replace("dp = 128", "dp = 256"),
            "does not fit",
        ),
        (
            base().replace("mode = \"sync\"", "mode = \"sync\"\ninterval_min = 0.0"),
            "checkpoint.interval_min",
        ),
    ];
    for (text, needle) in cases {
        let err = match parse(&text, "bad.toml") {
            Err(e) => e.to_string(),
            Ok(f) => match Job::build(&f) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("accepted a bad file (expected an error naming {needle})"),
            },
        };
        assert!(
            err.contains(needle),
            "error {err:?} does not name {needle:?}"
        );
    }
}
