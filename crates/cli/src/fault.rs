//! `phalanx fault inject`: the fault verbs that chaos scenarios compose.
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use phalanx_worker::fault::{Fault, FaultKind};

use crate::ctl::{read_cluster, Target};

#[derive(Subcommand, Debug)]
pub enum FaultCmd {
    /// Inject one fault into a worker or a controller of a local cluster.
    Inject(InjectCmd),
    /// (internal) Send SIGCONT to a stopped process after a delay.
    #[command(hide = true)]
    Resume {
        #[arg(long)]
        pid: u32,
        #[arg(long)]
        after_ms: u64,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Kind {
    /// SIGKILL the process (a dead GPU or host).
    Kill,
    /// SIGSTOP the process, SIGCONT after --for (a hung GPU): heartbeats stop.
    Hang,
    /// Slow its steps by --factor for --for (a thermal straggler).
    Slow,
    /// The worker exits non-zero at its next step (a software bug).
    Crash,
    /// The device reports an uncorrectable memory error.
    Ecc,
    /// Flip a bit in one replica's parameters (silent data corruption).
    Sdc,
    /// Flip a bit in one rank's gradient before the reduction, at its next gradient check.
    SdcGrad,
    /// Checkpoint writes fail with "disk full" for --for.
    DiskFull,
    /// Cut the worker off from controllers and peers for --for.
    Partition,
    /// Flip bytes in a committed checkpoint's shard (--step, default the newest).
    CorruptCheckpoint,
}

#[derive(Args, Debug)]
pub struct InjectCmd {
    /// `worker:ID`, `rank:R` (the worker holding rank R now), `controller:leader` or
    /// `controller:ID`. Not needed for corrupt-checkpoint.
    #[arg(long)]
    target: Option<String>,
    #[arg(long, value_enum)]
    kind: Kind,
    /// Duration of hang, slow, disk-full and partition, e.g. `5s`, `800ms`.
    #[arg(long = "for", value_parser = parse_duration)]
    for_: Option<Duration>,
    /// Slowdown factor of `slow`.
    #[arg(long, default_value_t = 4.0)]
    factor: f64,
    /// Checkpoint step of corrupt-checkpoint.
    #[arg(long)]
    step: Option<u64>,
    #[command(flatten)]
    cluster: Target,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len()),
    );
    let v: f64 = num
        .parse()
        .map_err(|_| format!("bad duration `{s}`: expected e.g. 5s, 800ms, 2m"))?;
    let secs = match unit {
        "ms" => v / 1e3,
        "s" | "" => v,
        "m" => v * 60.0,
        _ => return Err(format!("bad duration unit in `{s}`: use ms, s or m")),
    };
    if !(secs.is_finite() && secs >= 0.0) {
        return Err(format!("bad duration `{s}`"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn run(cmd: FaultCmd) -> Result<()> {
    match cmd {
        FaultCmd::Inject(c) => inject(c),
        FaultCmd::Resume { pid, after_ms } => {
            std::thread::sleep(Duration::from_millis(after_ms));
            signal(pid, libc::SIGCONT)
        }
    }
}

fn signal(pid: u32, sig: i32) -> Result<()> {
    let pid = i32::try_from(pid).map_err(|_| anyhow!("pid {pid} out of range"))?;
    if pid <= 0 {
        bail!("no process to signal (pid {pid})");
    }
    // SAFETY: kill(2) with a positive pid and a valid signal number.
    let r = unsafe { libc::kill(pid, sig) };
    if r != 0 {
        bail!("kill({pid}, {sig}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn inject(c: InjectCmd) -> Result<()> {
    let dir = c.cluster.dir().ok_or_else(|| {
        anyhow!("fault injection needs a local cluster: pass --dir DIR (from `phalanx cluster up`)")
    })?;
    let cluster = read_cluster(&dir)?;
    if c.kind == Kind::CorruptCheckpoint {
        // The current job's checkpoint directory; by default its newest catalogued step.
        let client = c.cluster.client()?;
        let job: Option<phalanx_proto::JobInfo> = client.get("/v1/job")?;
        let job = job.ok_or_else(|| anyhow!("no job: nothing to corrupt"))?;
        let root =
            phalanx_worker::job_checkpoints::job_checkpoint_dir(&dir.join("checkpoints"), &job.id)?;
        let step = match c.step {
            Some(s) => s,
            None => {
                let cps: Vec<phalanx_proto::CheckpointInfo> = client.get("/v1/checkpoints")?;
                cps.iter()
                    .filter(|cp| cp.job == job.id && cp.durable)
                    .map(|cp| cp.step)
                    .max()
                    .ok_or_else(|| anyhow!("job {} has no committed checkpoint", job.id))?
            }
        };
        let path = phalanx_checkpoint::corrupt_shard(&root, step, 0)?;
        println!("corrupted checkpoint step {step}: {}", path.display());
        let record = phalanx_proto::Command::RecordFault {
            target: format!("checkpoint step {step}"),
            kind: "corrupt-checkpoint".into(),
        };
        if let Err(e) = c.cluster.client().and_then(|cl| Ok(cl.command(record)?)) {
            eprintln!(
                "warning: the fault was injected but could not be recorded in the event log: {e}"
            );
        }
        return Ok(());
    }
    let target = c
        .target
        .as_deref()
        .ok_or_else(|| anyhow!("--target is required for --kind {:?}", c.kind))?;
    let client = c.cluster.client()?;
    // Resolve the target to (name, pid, inbox).
    let (name, pid, inbox): (String, u32, Option<PathBuf>) = if let Some(which) =
        target.strip_prefix("controller:")
    {
        let id = if which == "leader" {
            let all = client.status_all();
            let leader = all
                .iter()
                .filter_map(|(_, r)| r.as_ref().ok())
                .map(|s| s.leader_id)
                .find(|&l| l != 0);
            leader.ok_or_else(|| anyhow!("no controller knows a leader right now"))?
        } else {
            which.parse().map_err(|_| {
                anyhow!("--target controller:{which}: expected `leader` or a node id")
            })?
        };
        let pid = cluster
            .controller_pid(id)
            .ok_or_else(|| anyhow!("controller {id} is not in {}", dir.display()))?;
        (format!("controller {id}"), pid, None)
    } else {
        let id = if let Some(r) = target.strip_prefix("rank:") {
            let r: usize = r
                .parse()
                .map_err(|_| anyhow!("--target rank:{r}: expected a number"))?;
            let job: Option<phalanx_proto::JobInfo> = client.get("/v1/job")?;
            let plan = job
                .and_then(|j| j.plan)
                .ok_or_else(|| anyhow!("no job plan: rank {r} names nobody"))?;
            plan.ranks.get(r).cloned().ok_or_else(|| {
                anyhow!(
                    "rank {r} is not in plan epoch {} ({} ranks)",
                    plan.epoch,
                    plan.ranks.len()
                )
            })?
        } else if let Some(id) = target.strip_prefix("worker:") {
            id.to_string()
        } else {
            bail!("--target `{target}`: expected worker:ID, rank:R, controller:leader or controller:ID");
        };
        let w = cluster.workers.iter().find(|w| w.id == id).ok_or_else(|| {
            anyhow!(
                "worker {id} was not started by the cluster in {}",
                dir.display()
            )
        })?;
        (format!("worker {id}"), w.pid, w.fault_inbox.clone())
    };
    let for_ms = c.for_.map(|d| d.as_millis() as u64);
    match c.kind {
        Kind::Kill => signal(pid, libc::SIGKILL)?,
        Kind::Hang => {
            signal(pid, libc::SIGSTOP)?;
            if let Some(ms) = for_ms {
                let exe = std::env::current_exe()?;
                std::process::Command::new(exe)
                    .args([
                        "fault",
                        "resume",
                        "--pid",
                        &pid.to_string(),
                        "--after-ms",
                        &ms.to_string(),
                    ])
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .context("spawning the resumer")?;
            }
        }
        kind => {
            let inbox = inbox
                .ok_or_else(|| anyhow!("refused: {name} runs without fault-injection hooks"))?;
            let kind = match kind {
                Kind::Slow => FaultKind::Slow,
                Kind::Crash => FaultKind::Crash,
                Kind::Ecc => FaultKind::Ecc,
                Kind::Sdc => FaultKind::Sdc,
                Kind::SdcGrad => FaultKind::SdcGrad,
                Kind::DiskFull => FaultKind::DiskFull,
                Kind::Partition => FaultKind::Partition,
                _ => unreachable!("handled above"),
            };
            if matches!(
                kind,
                FaultKind::Slow | FaultKind::DiskFull | FaultKind::Partition
            ) && for_ms.is_none()
            {
                bail!("--kind {:?} needs --for DURATION", c.kind);
            }
            let seq = std::fs::metadata(&inbox).map(|m| m.len()).unwrap_or(0);
            let f = Fault {
                seq,
                kind,
                factor: c.factor,
                for_ms: for_ms.unwrap_or(0),
            };
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&inbox)
                .with_context(|| format!("opening {}", inbox.display()))?;
            writeln!(file, "{}", serde_json::to_string(&f)?)?;
        }
    }
    // When the fault took effect (the signal sent, or the inbox written), for those who
    // time the recovery from the fault itself rather than from this command's start.
    let at_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let detail = match (c.kind, for_ms) {
        (Kind::Slow, Some(ms)) => format!("slow x{} for {ms} ms", c.factor),
        (k, Some(ms)) => format!("{k:?} for {ms} ms").to_lowercase(),
        (k, None) => format!("{k:?}").to_lowercase(),
    };
    if let Err(e) = client.command(phalanx_proto::Command::RecordFault {
        target: name.clone(),
        kind: detail,
    }) {
        eprintln!(
            "warning: the fault was injected but could not be recorded in the event log: {e}"
        );
    }
    println!(
        "injected {:?} into {name} (pid {pid}) at unix_ms {at_unix_ms}",
        c.kind
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("800ms").unwrap(), Duration::from_millis(800));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("5h").unwrap_err().contains("unit"));
        assert!(parse_duration("abc").is_err());
    }
}
