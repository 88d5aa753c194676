//! `phalanx job export`: the job's newest committed checkpoint as a safetensors file.
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use phalanx_proto::{CheckpointInfo, JobInfo};
use serde::Serialize;

use super::{print_json, Target};

/// Where checkpoints of job `job_id` live under the cluster's checkpoint root: the
/// agents' per-job directory, or the root itself for a cluster whose checkpoints predate
/// per-job directories.
fn job_checkpoint_dir(root: &Path, job_id: &str) -> Result<PathBuf> {
    let per_job = phalanx_worker::job_checkpoints::job_checkpoint_dir(root, job_id)?;
    Ok(if per_job.is_dir() {
        per_job
    } else {
        root.to_path_buf()
    })
}

/// The catalog's durable checkpoints of job `job` (its id), by ascending step. Entries
/// that name another job are skipped (entries without a job are taken as the current
/// job's).
pub(crate) fn durable_checkpoints(
    entries: Vec<serde_json::Value>,
    job: &str,
) -> Result<Vec<CheckpointInfo>> {
    let mut out = Vec::new();
    for v in entries {
        if v.get("job")
            .and_then(|j| j.as_str())
            .is_some_and(|j| !j.is_empty() && j != job)
        {
            continue;
        }
        let c: CheckpointInfo =
            serde_json::from_value(v).context("reading the checkpoint catalog")?;
        if c.durable {
            out.push(c);
        }
    }
    out.sort_by_key(|c| c.step);
    Ok(out)
}

#[derive(Serialize)]
struct Exported {
    job: String,
    model: String,
    step: u64,
    seed: u64,
    numerics: String,
    params_sha256: String,
    /// The job's final params_sha256 as reported by rank 0, when the job completed.
    job_params_sha256: Option<String>,
    out: PathBuf,
    bytes: usize,
}

pub fn export(
    out: &Path,
    step: Option<u64>,
    checkpoint_dir: Option<PathBuf>,
    target: &Target,
) -> Result<()> {
    crate::model::check_output_path(out)?;
    let root = match (checkpoint_dir, target.dir()) {
        (Some(d), _) => d,
        (None, Some(d)) => d.join("checkpoints"),
        (None, None) => bail!("pass --checkpoint-dir (or --dir of a local cluster)"),
    };
    let c = target.client()?;
    let job: serde_json::Value = c.get("/v1/job")?;
    if job.is_null() {
        bail!("no job on this cluster: nothing to export");
    }
    // The job's id names its checkpoints (older controllers have none: its name).
    let id = job
        .get("id")
        .and_then(|i| i.as_str())
        .filter(|i| !i.is_empty())
        .map(str::to_string);
    let job: JobInfo = serde_json::from_value(job).context("reading the job")?;
    let name = &job.spec.name;
    let id = id.unwrap_or_else(|| name.clone());
    let entries: Vec<serde_json::Value> = c.get("/v1/checkpoints")?;
    let durable = durable_checkpoints(entries, &id)?;
    let chosen = match step {
        Some(s) => durable.iter().find(|c| c.step == s).ok_or_else(|| {
            anyhow!(
                "job {name} has no durable checkpoint at step {s} (durable steps: {})",
                steps_list(&durable)
            )
        })?,
        None => durable.last().ok_or_else(|| {
            anyhow!(
                "job {name} ({}, step {}/{}) has no durable checkpoint yet",
                job.state.as_str(),
                job.progress_step,
                job.spec.steps
            )
        })?,
    };
    let dir = job_checkpoint_dir(&root, &id)?;
    let (bytes, meta) = phalanx_worker::export::checkpoint_to_safetensors(
        &dir,
        chosen.step,
        job.spec.model.as_str(),
        job.spec.numerics.as_str(),
    )?;
    crate::model::write_file_atomic(out, &bytes)?;
    let final_sha = (meta.steps == job.spec.steps)
        .then(|| job.params_sha256.clone())
        .flatten();
    let e = Exported {
        job: name.clone(),
        model: meta.model.clone(),
        step: meta.steps,
        seed: meta.seed,
        numerics: meta.numerics.clone(),
        params_sha256: meta.params_sha256.clone(),
        job_params_sha256: final_sha.clone(),
        out: out.to_path_buf(),
        bytes: bytes.len(),
    };
    if target.json() {
        return print_json(&e);
    }
    println!(
        "exported job {} (model {}, step {}/{}, numerics {}) to {} ({} bytes)",
        e.job,
        e.model,
        e.step,
        job.spec.steps,
        e.numerics,
        out.display(),
        e.bytes
    );
    println!("params_sha256 {}", e.params_sha256);
    if let Some(f) = final_sha {
        let same = if f == e.params_sha256 { "yes" } else { "NO" };
        println!("the job's final params_sha256 {f}: same {same}");
    }
    Ok(())
}

fn steps_list(cps: &[CheckpointInfo]) -> String {
    if cps.is_empty() {
        return "none".into();
    }
    cps.iter()
        .map(|c| c.step.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_durable_checkpoints_of_the_job_count() {
        let e = |step: u64, durable: bool, job: Option<&str>| {
            let mut v = serde_json::json!({
                "step": step, "epoch": 1, "shards": [], "durable": durable
            });
            if let Some(j) = job {
                v["job"] = j.into();
            }
            v
        };
        let got = durable_checkpoints(
            vec![
                e(30, true, Some("a")),
                e(10, true, None),
                e(20, false, Some("b")),
                e(15, true, Some("")),
                e(40, true, Some("other")),
                e(25, true, Some("b")),
            ],
            "b",
        )
        .unwrap();
        assert_eq!(
            got.iter().map(|c| c.step).collect::<Vec<_>>(),
            vec![10, 15, 25]
        );
    }

    #[test]
    fn the_per_job_directory_is_used_once_it_exists() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(job_checkpoint_dir(d.path(), "j-3").unwrap(), d.path());
        std::fs::create_dir(d.path().join("j-3")).unwrap();
        assert_eq!(
            job_checkpoint_dir(d.path(), "j-3").unwrap(),
            d.path().join("j-3")
        );
        assert!(job_checkpoint_dir(d.path(), "../etc").is_err());
    }
}
