//! `phalanx fault inject|heal`: the fault verbs that chaos scenarios compose, and their
//! undo.
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use phalanx_proto::fault::{Fault, FaultKind, FOR_MS_MAX};

use crate::ctl::{read_cluster, Target};
use crate::outcome::usage;
use crate::util::parse_duration;

#[derive(Subcommand, Debug)]
pub enum FaultCmd {
    /// Inject one fault into a worker or a controller of a local cluster.
    Inject(InjectCmd),
    /// End a worker's or a controller's lasting faults now: a hang (SIGCONT), and a
    /// slow-down, a disk-full or a partition (through the worker's fault inbox).
    Heal(HealCmd),
    /// (internal) Send SIGCONT to a stopped process after a delay.
    #[command(hide = true)]
    Resume {
        /// The stopped process.
        #[arg(long)]
        pid: u32,
        /// Wait this many milliseconds first.
        #[arg(long)]
        after_ms: u64,
    },
}

/// A fault kind, spelled as everywhere else (kebab-case).
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

impl Kind {
    /// The kebab-case name, as on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Kill => "kill",
            Kind::Hang => "hang",
            Kind::Slow => "slow",
            Kind::Crash => "crash",
            Kind::Ecc => "ecc",
            Kind::Sdc => "sdc",
            Kind::SdcGrad => "sdc-grad",
            Kind::DiskFull => "disk-full",
            Kind::Partition => "partition",
            Kind::CorruptCheckpoint => "corrupt-checkpoint",
        }
    }

    /// Does the fault last until it ends (so it needs --for or --until-healed)?
    pub fn lasts(self) -> bool {
        matches!(
            self,
            Kind::Hang | Kind::Slow | Kind::DiskFull | Kind::Partition
        )
    }

    /// The worker-side fault of an inbox kind.
    fn inbox_kind(self) -> Option<FaultKind> {
        Some(match self {
            Kind::Slow => FaultKind::Slow,
            Kind::Crash => FaultKind::Crash,
            Kind::Ecc => FaultKind::Ecc,
            Kind::Sdc => FaultKind::Sdc,
            Kind::SdcGrad => FaultKind::SdcGrad,
            Kind::DiskFull => FaultKind::DiskFull,
            Kind::Partition => FaultKind::Partition,
            Kind::Kill | Kind::Hang | Kind::CorruptCheckpoint => return None,
        })
    }
}

#[derive(Args, Debug)]
pub struct InjectCmd {
    /// `worker:ID`, `rank:R` (the worker holding rank R now), `controller:leader` or
    /// `controller:ID`. Not needed for corrupt-checkpoint.
    #[arg(long)]
    target: Option<String>,
    /// What to inject.
    #[arg(long, value_enum)]
    kind: Kind,
    /// How long hang, slow, disk-full and partition last, with a unit: `5s`, `800ms`,
    /// `2m`. One of --for and --until-healed is required for those kinds.
    #[arg(long = "for", value_parser = parse_duration, conflicts_with = "until_healed")]
    for_: Option<Duration>,
    /// Let hang, slow, disk-full or partition last until `phalanx fault heal`.
    #[arg(long)]
    until_healed: bool,
    /// Slowdown factor of `slow`.
    #[arg(long, default_value_t = 4.0)]
    factor: f64,
    /// Checkpoint step of corrupt-checkpoint.
    #[arg(long)]
    step: Option<u64>,
    #[command(flatten)]
    cluster: Target,
}

#[derive(Args, Debug)]
pub struct HealCmd {
    /// `worker:ID` or `controller:ID`: the process the fault was injected into (after a
    /// hang is detected, its rank belongs to someone else and a hung leader leads no more,
    /// so `rank:R` and `controller:leader` are refused here).
    #[arg(long)]
    target: String,
    #[command(flatten)]
    cluster: Target,
}

pub fn run(cmd: FaultCmd) -> Result<()> {
    match cmd {
        FaultCmd::Inject(c) => inject(c),
        FaultCmd::Heal(c) => heal(c),
        FaultCmd::Resume { pid, after_ms } => {
            std::thread::sleep(Duration::from_millis(after_ms));
            signal(pid, libc::SIGCONT)
        }
    }
}

/// Signals a process recorded in `cluster.json`, unless that pid no longer runs a
/// Phalanx program (the record is stale: the pid may belong to anything now).
fn signal(pid: u32, sig: i32) -> Result<()> {
    if pid == 0 {
        bail!("no process to signal (pid 0)");
    }
    if !phalanx_controller::proc::is_phalanx(pid) {
        bail!("pid {pid} recorded in cluster.json is not a phalanx process now: the process exited and the record is stale");
    }
    if !phalanx_controller::proc::signal(pid, sig) {
        bail!("kill({pid}, {sig}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn now_unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// A resolved target: its name for people, its pid and its fault inbox.
struct Resolved {
    name: String,
    pid: u32,
    inbox: Option<PathBuf>,
}

fn resolve(
    target: &str,
    dir: &std::path::Path,
    cluster: &crate::ctl::ClusterFile,
    client: &phalanx_controller::client::Client,
) -> Result<Resolved> {
    if let Some(which) = target.strip_prefix("controller:") {
        let id = if which == "leader" {
            let all = client.status_all();
            let leader = all
                .iter()
                .filter_map(|(_, r)| r.as_ref().ok())
                .map(|s| s.leader_id)
                .find(|&l| l != 0);
            leader.ok_or_else(|| anyhow!("no controller knows a leader right now"))?
        } else {
            match which.parse() {
                Ok(id) => id,
                Err(_) => {
                    return usage(format!(
                        "--target controller:{which}: expected `leader` or a node id"
                    ))
                }
            }
        };
        let pid = cluster
            .controller_pid(id)
            .ok_or_else(|| anyhow!("controller {id} is not in {}", dir.display()))?;
        return Ok(Resolved {
            name: format!("controller {id}"),
            pid,
            inbox: None,
        });
    }
    let id = if let Some(r) = target.strip_prefix("rank:") {
        let Ok(r) = r.parse::<usize>() else {
            return usage(format!("--target rank:{r}: expected a number"));
        };
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
        return usage(format!(
            "--target `{target}`: expected worker:ID, rank:R, controller:leader or controller:ID"
        ));
    };
    let w = cluster.workers.iter().find(|w| w.id == id).ok_or_else(|| {
        anyhow!(
            "worker {id} was not started by the cluster in {}",
            dir.display()
        )
    })?;
    Ok(Resolved {
        name: format!("worker {id}"),
        pid: w.pid,
        inbox: w.fault_inbox.clone(),
    })
}

fn append_fault(inbox: &std::path::Path, kind: FaultKind, factor: f64, for_ms: u64) -> Result<()> {
    let seq = std::fs::metadata(inbox).map(|m| m.len()).unwrap_or(0);
    let f = Fault {
        seq,
        kind,
        factor,
        for_ms,
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(inbox)
        .with_context(|| format!("opening {}", inbox.display()))?;
    writeln!(file, "{}", serde_json::to_string(&f)?)?;
    Ok(())
}

fn local_dir(t: &Target) -> Result<PathBuf> {
    match t.dir() {
        Some(d) => Ok(d),
        None => usage(
            "fault injection needs a local cluster: pass --dir DIR (from `phalanx cluster up`)",
        ),
    }
}

fn inject(c: InjectCmd) -> Result<()> {
    if c.kind.lasts() && c.for_.is_none() && !c.until_healed {
        return usage(format!(
            "--kind {} lasts: pass --for DURATION (e.g. --for 5s) or --until-healed (then `phalanx fault heal`)",
            c.kind.as_str()
        ));
    }
    if !c.kind.lasts() && (c.for_.is_some() || c.until_healed) {
        return usage(format!(
            "--kind {} is over at once: --for and --until-healed do not apply",
            c.kind.as_str()
        ));
    }
    if c.kind == Kind::Slow {
        if let Some(e) = phalanx_proto::fault::slow_factor_problem(c.factor) {
            return usage(format!("--factor: {e}"));
        }
    }
    if let Some(d) = c.for_.filter(|d| d.as_millis() > u128::from(FOR_MS_MAX)) {
        return usage(format!(
            "--for {d:?}: at most a day; use --until-healed for longer"
        ));
    }
    let dir = local_dir(&c.cluster)?;
    let cluster = read_cluster(&dir)?;
    if c.kind == Kind::CorruptCheckpoint {
        return corrupt_checkpoint(&c, &dir);
    }
    let Some(target) = c.target.as_deref() else {
        return usage(format!(
            "--target is required for --kind {}",
            c.kind.as_str()
        ));
    };
    let client = c.cluster.client()?;
    let Resolved { name, pid, inbox } = resolve(target, &dir, &cluster, &client)?;
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
            let Some(inbox) = inbox else {
                return Err(crate::outcome::Failure::Rejected(format!(
                    "{name} runs without fault-injection hooks"
                ))
                .into());
            };
            let fk = kind
                .inbox_kind()
                .expect("kill, hang and corrupt-checkpoint handled above");
            append_fault(&inbox, fk, c.factor, for_ms.unwrap_or(0))?;
        }
    }
    // When the fault took effect (the signal sent, or the inbox written), for those who
    // time the recovery from the fault itself rather than from this command's start.
    let at_unix_ms = now_unix_ms();
    let lasting = match (for_ms, c.until_healed) {
        (Some(ms), _) => format!(" for {ms} ms"),
        (None, true) => " until healed".to_string(),
        (None, false) => String::new(),
    };
    let detail = match c.kind {
        Kind::Slow => format!("slow x{}{lasting}", c.factor),
        k => format!("{}{lasting}", k.as_str()),
    };
    if let Err(e) = client.command(phalanx_proto::Command::RecordFault {
        target: name.clone(),
        kind: detail.clone(),
    }) {
        eprintln!(
            "warning: the fault was injected but could not be recorded in the event log: {e}"
        );
    }
    println!("injected {detail} into {name} (pid {pid}) at unix_ms {at_unix_ms}");
    Ok(())
}

fn corrupt_checkpoint(c: &InjectCmd, dir: &std::path::Path) -> Result<()> {
    // The current job's checkpoint directory; by default its newest catalogued step.
    let client = c.cluster.client()?;
    let job: Option<phalanx_proto::JobInfo> = client.get("/v1/job")?;
    let job = job.ok_or_else(|| anyhow!("no job: nothing to corrupt"))?;
    let root = phalanx_core::job_checkpoint_dir(&dir.join("checkpoints"), &job.id)
        .map_err(|e| anyhow!(e))?;
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
    if let Err(e) = client.command(record) {
        eprintln!(
            "warning: the fault was injected but could not be recorded in the event log: {e}"
        );
    }
    Ok(())
}

/// Ends a hang (SIGCONT) and, for a worker with hooks, a slow-down, a disk-full and a
/// partition (a `heal` line in its inbox, read on its next heartbeat tick). Healing a
/// target with no fault changes nothing and is not an error.
fn heal(c: HealCmd) -> Result<()> {
    let dir = local_dir(&c.cluster)?;
    let cluster = read_cluster(&dir)?;
    let client = c.cluster.client()?;
    if c.target.starts_with("rank:") || c.target == "controller:leader" {
        return usage(format!(
            "--target {}: heal names the process the fault went into (worker:ID or \
             controller:ID, as `fault inject` printed it): once a fault is detected, ranks \
             and leadership move to others",
            c.target
        ));
    }
    let Resolved { name, pid, inbox } = resolve(&c.target, &dir, &cluster, &client)?;
    signal(pid, libc::SIGCONT).with_context(|| format!("resuming {name} (pid {pid})"))?;
    let mut what = vec!["hang (SIGCONT)"];
    if let Some(inbox) = &inbox {
        append_fault(inbox, FaultKind::Heal, 0.0, 0)?;
        what.push("slow, disk-full and partition (fault inbox)");
    }
    if let Err(e) = client.command(phalanx_proto::Command::RecordFault {
        target: name.clone(),
        kind: "heal".into(),
    }) {
        eprintln!("warning: healed, but it could not be recorded in the event log: {e}");
    }
    println!(
        "healed {name} (pid {pid}): {} at unix_ms {}",
        what.join("; "),
        now_unix_ms()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_lasting_kind_needs_a_duration_or_until_healed() {
        for k in Kind::value_variants() {
            let name = k.to_possible_value().unwrap().get_name().to_string();
            assert_eq!(name, k.as_str(), "one spelling per kind");
        }
        assert!(Kind::Hang.lasts() && Kind::Partition.lasts());
        assert!(!Kind::Kill.lasts() && !Kind::Ecc.lasts());
    }

    /// The three fault enums (this verb's, the worker inbox's and the scenario files')
    /// spell every kind they share the same way.
    #[test]
    fn fault_kinds_are_spelled_alike_on_the_command_line_in_the_inbox_and_in_scenarios() {
        for k in Kind::value_variants() {
            let name = format!("\"{}\"", k.as_str());
            let scenario: phalanx_chaos::FaultKind = serde_json::from_str(&name)
                .unwrap_or_else(|e| panic!("scenario files do not know {name}: {e}"));
            assert_eq!(format!("\"{}\"", scenario.as_str()), name);
            if let Some(inbox) = k.inbox_kind() {
                assert_eq!(inbox.as_str(), k.as_str());
            }
        }
    }
}
