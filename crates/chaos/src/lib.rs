//! Chaos scenarios: the file format (TOML, with a JSON Schema generated from these
//! types), its validation with line and column, the swarm's random draw, the check of
//! every expectation against what a run measured, and the report (JSON, Markdown and SVG
//! plots). Pure: no tch, no tokio, no processes; the runner lives in `phalanx-cli`
//! (`phalanx scenario run`). See docs/scenarios.md.

pub mod check;
pub mod model;
pub mod parse;
pub mod report;
pub mod swarm;

pub use check::{check, Measured, Verdict};
pub use model::*;
pub use parse::{parse, validate, Diagnostic, ScenarioError, Validated};

/// The JSON Schema of a scenario file, as committed in `scenarios/scenario.schema.json`.
pub fn schema_json() -> String {
    let schema = schemars::schema_for!(Scenario);
    let mut s = serde_json::to_string_pretty(&schema).unwrap_or_default();
    s.push('\n');
    s
}

/// The job the runner submits for scenario `s` with `seed`.
pub fn job_spec(s: &Scenario, seed: u64) -> phalanx_proto::JobSpec {
    phalanx_proto::JobSpec {
        name: s.name.clone(),
        model: s.job.model,
        corpus: "default".into(),
        steps: s.job.steps,
        global_batch: s.job.global_batch,
        seed,
        checkpoint_interval_steps: s.job.checkpoint_interval_steps,
        world_size_min: s.job.world_size_min(),
        world_size_max: s.job.world_size_max(&s.cluster),
        numerics: Default::default(),
        precision: Default::default(),
    }
}

/// The first comment block of a scenario file, joined into one line: its purpose.
pub fn purpose(text: &str) -> String {
    let mut out = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if let Some(c) = t.strip_prefix('#') {
            out.push(c.trim().to_string());
        } else if t.is_empty() && out.is_empty() {
            continue;
        } else {
            break;
        }
    }
    out.join(" ").trim().to_string()
}
