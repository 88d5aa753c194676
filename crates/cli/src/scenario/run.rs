//! `phalanx scenario run`: bring up the scenario's cluster, submit its job, fire its faults
//! on their triggers, check every expectation, write the report, tear everything down.
//!
//! Teardown is by ownership: the network lab (`phalanx_netns::Lab`) and the processes
//! (`Procs`) are dropped on every path out of [`run`], after the timed faults have been
//! undone (paused controllers continued, cut links healed, busy threads stopped). Ctrl-C
//! and SIGTERM set a flag the main loop checks; a SIGKILLed runner takes its children
//! with it (`PR_SET_PDEATHSIG`), and its namespaces are swept by the next lab.

use phalanx_proto::RaftRole;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use phalanx_chaos::check::{effective_training_time, LeaderSample, Measured, RecoveryM, SeenEvent};
use phalanx_chaos::report::{FiredFault, ProgressSample, Report};
use phalanx_chaos::{Fault, FaultKind, Target, Trigger, Validated};
use phalanx_controller::client::Client;
use phalanx_proto::{Command as Cmd, Event, JobInfo, JobState, StatusResponse};

use super::procs::{signal, Procs, Role};
use super::reference::{losses, reference_sha, run_bounded};

pub(super) static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
}

pub struct RunOptions {
    pub file: PathBuf,
    pub seed: Option<u64>,
    pub report: Option<PathBuf>,
    pub dir: Option<PathBuf>,
    pub timeout_s: Option<u64>,
}

/// A timed effect to undo.
enum Undo {
    Resume { pid: u32, at: Instant, what: String },
    Heal { host: u32, at: Instant },
    StopHog { flag: Arc<AtomicBool>, at: Instant },
}

struct State {
    /// Per fault: times fired; the instant its trigger first held (for `delay_s`).
    fired: Vec<u32>,
    armed: Vec<Option<Instant>>,
    /// Event seq when each fault last fired (anchors the next fault's `after_event`).
    fired_seq: Vec<Option<u64>>,
    report: Vec<FiredFault>,
    undo: Vec<Undo>,
    hogs: Vec<std::thread::JoinHandle<()>>,
}

fn poll_client(procs: &Procs) -> Result<Client> {
    let mut c = Client::new(procs.controller_addresses(), procs.admin_credentials()?)?;
    c.request_timeout = Duration::from_millis(1500);
    c.deadline = Duration::from_secs(3);
    Ok(c)
}

fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if STOP.load(Ordering::SeqCst) {
            bail!("interrupted while waiting for {what}");
        }
        if t0.elapsed() > timeout {
            bail!("timed out after {} s waiting for {what}", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What `target` names right now, as (role, words).
fn resolve(
    t: &Target,
    fault: &Fault,
    k: u32,
    seed: u64,
    job: Option<&JobInfo>,
    client: &Client,
) -> Result<(Option<Role>, Option<u32>, String)> {
    let ranks = || -> Result<Vec<String>> {
        job.and_then(|j| j.plan.as_ref())
            .map(|p| p.ranks.clone())
            .ok_or_else(|| anyhow!("no plan yet: {t} names nobody"))
    };
    Ok(match t {
        Target::Rank(r) => {
            let ranks = ranks()?;
            let w = ranks
                .get(*r as usize)
                .cloned()
                .ok_or_else(|| anyhow!("rank {r} is not in the plan ({} ranks)", ranks.len()))?;
            (
                Some(Role::Worker(w.clone())),
                None,
                format!("{w} (rank {r})"),
            )
        }
        Target::RandomWorker => {
            let ranks = ranks()?;
            let i = phalanx_chaos::swarm::pick(seed, fault.index, k as u64, ranks.len());
            let w = ranks
                .get(i)
                .cloned()
                .ok_or_else(|| anyhow!("the plan has no ranks"))?;
            (
                Some(Role::Worker(w.clone())),
                None,
                format!("{w} (rank {i})"),
            )
        }
        Target::Worker(w) => (Some(Role::Worker(w.clone())), None, w.clone()),
        Target::Controller(id) => (
            Some(Role::Controller(*id)),
            None,
            format!("controller {id}"),
        ),
        Target::ControllerLeader => {
            let leader = client
                .status_all()
                .into_iter()
                .filter_map(|(_, r)| r.ok())
                .filter(|s| s.role == RaftRole::Leader)
                .max_by_key(|s| s.term)
                .map(|s| s.node_id)
                .ok_or_else(|| anyhow!("no controller leads right now"))?;
            (
                Some(Role::Controller(leader)),
                None,
                format!("controller {leader} (the leader)"),
            )
        }
        Target::Host(h) => (None, Some(*h), format!("host {h}")),
    })
}

struct Ctx<'a> {
    seed: u64,
    procs: &'a mut Procs,
    lab: Option<&'a phalanx_netns::Lab>,
    client: &'a Client,
    dir: &'a Path,
    origin: Instant,
}

fn record(client: &Client, target: &str, kind: &str) {
    let _ = client.command(Cmd::RecordFault {
        target: target.into(),
        kind: kind.into(),
    });
}

/// Fire fault `f` (its `k`-th time). Returns (what it hit, how), or why not.
fn fire(
    cx: &mut Ctx,
    st: &mut State,
    f: &Fault,
    k: u32,
    job: Option<&JobInfo>,
) -> Result<(String, String)> {
    let dur = Duration::from_secs_f64(f.duration_s.unwrap_or(0.0));
    let exe = cx.procs.exe.clone();
    let inject = |cx: &Ctx, target: &str, extra: &[String]| -> Result<String> {
        // The injector runs in this namespace: it reads the cluster file, signals pids
        // and talks to the controllers from here.
        let mut c = std::process::Command::new(&exe);
        c.args([
            "fault",
            "inject",
            "--kind",
            f.kind.as_str(),
            "--target",
            target,
        ])
        .args(extra)
        .arg("--dir")
        .arg(cx.dir);
        run_bounded(c, Duration::from_secs(30))
    };
    let for_arg = || vec!["--for".to_string(), format!("{}ms", dur.as_millis())];
    if f.kind == FaultKind::CorruptCheckpoint {
        let mut c = std::process::Command::new(&exe);
        c.args(["fault", "inject", "--kind", "corrupt-checkpoint", "--dir"])
            .arg(cx.dir);
        let out = run_bounded(c, Duration::from_secs(30))?;
        return Ok(("the newest checkpoint".into(), out));
    }
    if f.kind == FaultKind::ClusterRestart {
        record(cx.client, "cluster", "cluster-restart");
        cx.procs.kill_all();
        cx.procs.start_all()?;
        return Ok((
            "every process".into(),
            "SIGKILL to every controller and worker, then all started again from their directories"
                .into(),
        ));
    }
    let target = f.target.as_ref().ok_or_else(|| anyhow!("no target"))?;
    let (role, host, words) = resolve(target, f, k, cx.seed, job, cx.client)?;
    let host_of = |procs: &Procs| -> Option<u32> {
        host.or_else(|| role.as_ref().and_then(|r| procs.find(r)).map(|p| p.host))
    };
    let role_target = |r: &Role| match r {
        Role::Controller(id) => format!("controller:{id}"),
        Role::Worker(w) => format!("worker:{w}"),
    };
    match f.kind {
        FaultKind::Kill
        | FaultKind::Hang
        | FaultKind::Slow
        | FaultKind::Crash
        | FaultKind::Ecc
        | FaultKind::Sdc
        | FaultKind::SdcGrad
        | FaultKind::DiskFull => {
            let r = role.ok_or_else(|| anyhow!("`{}` needs a process", f.kind))?;
            let mut extra = Vec::new();
            if f.kind.has_duration() {
                extra.extend(for_arg());
            }
            if f.kind == FaultKind::Slow {
                extra.extend(["--factor".to_string(), f.factor.to_string()]);
            }
            let out = inject(cx, &role_target(&r), &extra)?;
            let how = match f.kind {
                FaultKind::Kill => "SIGKILL",
                FaultKind::Hang => "SIGSTOP, SIGCONT after the duration",
                _ => "the worker's fault inbox",
            };
            Ok((words, format!("{how} (phalanx fault inject: {out})")))
        }
        FaultKind::Drain => {
            let Some(Role::Worker(w)) = role else {
                bail!("drain needs a worker");
            };
            cx.client.command(Cmd::DrainWorker {
                id: w.clone(),
                reason: "scenario: planned maintenance".into(),
            })?;
            Ok((words, "DrainWorker through the controller".into()))
        }
        FaultKind::ControllerPause => {
            let r = role.ok_or_else(|| anyhow!("controller-pause needs a controller"))?;
            let pid = cx.procs.pid_of(&r)?;
            record(
                cx.client,
                &words,
                &format!("controller-pause for {} ms", dur.as_millis()),
            );
            if !signal(pid, libc::SIGSTOP) {
                bail!("SIGSTOP {pid}: {}", std::io::Error::last_os_error());
            }
            st.undo.push(Undo::Resume {
                pid,
                at: Instant::now() + dur,
                what: words.clone(),
            });
            Ok((words, format!("SIGSTOP pid {pid}, SIGCONT after {:?}", dur)))
        }
        FaultKind::CpuHog => {
            let flag = Arc::new(AtomicBool::new(false));
            for _ in 0..f.threads {
                let flag = flag.clone();
                let until = Instant::now() + dur;
                st.hogs.push(std::thread::spawn(move || {
                    let mut x: u64 = 1;
                    while !flag.load(Ordering::Relaxed) && Instant::now() < until {
                        for _ in 0..10_000 {
                            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                        }
                        std::hint::black_box(x);
                    }
                }));
            }
            st.undo.push(Undo::StopHog {
                flag,
                at: Instant::now() + dur,
            });
            let h = host_of(cx.procs).unwrap_or(0);
            record(
                cx.client,
                &format!("host {h}"),
                &format!(
                    "cpu-hog: {} busy threads for {} ms",
                    f.threads,
                    dur.as_millis()
                ),
            );
            Ok((
                format!("host {h} ({})", cx.procs.on_host(h)),
                format!(
                    "{} busy threads in the runner (CPU is shared by every host of this machine)",
                    f.threads
                ),
            ))
        }
        FaultKind::Partition | FaultKind::LinkDown => {
            let h = host_of(cx.procs).ok_or_else(|| anyhow!("no host for {words}"))?;
            match cx.lab {
                Some(lab) => {
                    record(
                        cx.client,
                        &format!("host {h}"),
                        &format!("{} for {} ms (real cut)", f.kind, dur.as_millis()),
                    );
                    lab.isolate(h as usize, phalanx_netns::Cut::DeadGateway)
                        .map_err(|e| anyhow!("{e}"))?;
                    st.undo.push(Undo::Heal {
                        host: h,
                        at: Instant::now() + dur,
                    });
                    Ok((
                        format!("{words}: host {h} ({})", cx.procs.on_host(h)),
                        format!(
                            "real cut in network namespaces: host {h} isolated from every other host (dead-gateway routes), healed after {:?}",
                            dur
                        ),
                    ))
                }
                None => {
                    // The fallback: the in-worker emulation for the workers on the host,
                    // a pause for its controllers.
                    let on: Vec<Role> = match (f.kind, &role) {
                        (FaultKind::Partition, Some(r)) => vec![r.clone()],
                        _ => cx
                            .procs
                            .procs
                            .iter()
                            .filter(|p| p.host == h)
                            .map(|p| p.role.clone())
                            .collect(),
                    };
                    let mut done = Vec::new();
                    for r in on {
                        match &r {
                            Role::Worker(w) => {
                                let mut c = std::process::Command::new(&exe);
                                c.args(["fault", "inject", "--kind", "partition", "--target"])
                                    .arg(format!("worker:{w}"))
                                    .args(for_arg())
                                    .arg("--dir")
                                    .arg(cx.dir);
                                run_bounded(c, Duration::from_secs(30))?;
                                done.push(format!("{w} (emulated in the worker)"));
                            }
                            Role::Controller(id) => {
                                let pid = cx.procs.pid_of(&r)?;
                                if signal(pid, libc::SIGSTOP) {
                                    st.undo.push(Undo::Resume {
                                        pid,
                                        at: Instant::now() + dur,
                                        what: format!("controller {id}"),
                                    });
                                    done.push(format!("controller {id} (paused)"));
                                }
                            }
                        }
                    }
                    Ok((
                        format!("{words}: {}", done.join(", ")),
                        "FALLBACK (no network namespaces): emulated inside the workers, controllers paused".into(),
                    ))
                }
            }
        }
        FaultKind::CorruptCheckpoint | FaultKind::ClusterRestart => unreachable!("handled above"),
    }
}

/// Has fault `i`'s trigger (for its next firing) come?
fn trigger_holds(
    f: &Fault,
    fired: u32,
    anchor_seq: Option<u64>,
    job: Option<&JobInfo>,
    elapsed_s: f64,
    events: &[SeenEvent],
) -> bool {
    match &f.trigger {
        Trigger::AtStep(s) => fired == 0 && job.is_some_and(|j| j.progress_step >= *s),
        Trigger::AtS(t) => fired == 0 && elapsed_s >= *t,
        Trigger::EveryS { every_s, count } => {
            fired < *count && elapsed_s >= every_s * (fired + 1) as f64
        }
        Trigger::AfterEvent(m) => {
            fired == 0
                && anchor_seq.is_some_and(|a| {
                    events
                        .iter()
                        .any(|e| e.seq > a && m.matches(e.kind, &e.subject, &e.reason))
                })
        }
    }
}

fn undo_due(st: &mut State, lab: Option<&phalanx_netns::Lab>, all: bool) -> Vec<String> {
    let now = Instant::now();
    let mut notes = Vec::new();
    st.undo.retain(|u| {
        let at = match u {
            Undo::Resume { at, .. } | Undo::Heal { at, .. } | Undo::StopHog { at, .. } => *at,
        };
        if !all && now < at {
            return true;
        }
        match u {
            Undo::Resume { pid, what, .. } => {
                signal(*pid, libc::SIGCONT);
                notes.push(format!("{what} continued"));
            }
            Undo::Heal { host, .. } => {
                if let Some(lab) = lab {
                    for j in 0..lab.hosts().len() {
                        if j != *host as usize {
                            if let Err(e) = lab.heal(*host as usize, j) {
                                notes.push(format!("healing host {host}: {e}"));
                            }
                        }
                    }
                    notes.push(format!("host {host} healed"));
                }
            }
            Undo::StopHog { flag, .. } => flag.store(true, Ordering::Relaxed),
        }
        false
    });
    notes
}

/// Remove the namespaces of labs whose runner died (SIGKILL leaves them): building a
/// lab sweeps them, so build a one-host lab only when there is something to sweep.
fn sweep_stale_labs() {
    if phalanx_netns::Lab::check_available().is_err() {
        return;
    }
    let Ok(out) = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
    else {
        return;
    };
    let stale = String::from_utf8_lossy(&out.stdout).lines().any(|l| {
        l.strip_prefix("phxlab-")
            .and_then(|r| r.split('-').next())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    });
    if stale {
        drop(phalanx_netns::Lab::new(1));
    }
}

/// The run; `Ok(report)` whether or not the expectations hold.
pub fn run(o: &RunOptions, v: &Validated) -> Result<Report> {
    install_signal_handlers();
    let s = &v.scenario;
    let seed = o.seed.unwrap_or(s.job.seed);
    let exe = std::env::current_exe()?;
    let file = o.file.display().to_string();
    let replay = format!(
        "phalanx scenario run {file} --seed {seed}{}",
        o.report
            .as_ref()
            .map(|r| format!(" --report {}", r.display()))
            .unwrap_or_default()
    );
    let dir = o
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/scenarios").join(&s.name));
    if dir.exists() {
        if !dir.join(".phalanx-scenario").exists() && std::fs::read_dir(&dir)?.next().is_some() {
            bail!(
                "{} exists and is not a scenario directory: pass another --dir",
                dir.display()
            );
        }
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(".phalanx-scenario"), "")?;
    let dir = dir.canonicalize()?;
    let mut notes = Vec::new();

    // Every fault of the run: the file's, then the swarm's.
    let mut faults = v.faults.clone();
    if let Some(sw) = &s.swarm {
        let horizon = s.expect.max_wall_s.unwrap_or(3600.0);
        faults.extend(phalanx_chaos::swarm::draw(
            sw,
            &s.cluster,
            seed,
            horizon,
            faults.len(),
        ));
        notes.push(format!(
            "swarm: {} faults drawn from seed {seed}",
            faults.len() - v.faults.len()
        ));
    }

    let reference = if s.expect.bit_exact_with_reference {
        let cache = dir
            .parent()
            .map(|p| p.join("cache"))
            .unwrap_or_else(|| dir.join("cache"));
        Some(reference_sha(&exe, &cache, v, seed)?)
    } else {
        None
    };

    // Hosts.
    sweep_stale_labs();
    let want_ns = s.cluster.hosts >= 2;
    let lab = if want_ns {
        match phalanx_netns::Lab::check_available()
            .and_then(|()| phalanx_netns::Lab::new(s.cluster.hosts as usize))
        {
            Ok(l) => Some(l),
            Err(e) => {
                notes.push(format!(
                    "network namespaces unavailable ({e}): every process runs on 127.0.0.1; link-down and partition fall back to their emulation"
                ));
                None
            }
        }
    } else {
        None
    };
    let network = match &lab {
        Some(l) => format!(
            "network namespaces: {} hosts on a bridge ({}), real link cuts",
            l.hosts().len(),
            l.hosts()
                .iter()
                .map(|h| format!("host {} {}", h.index, h.ip))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None if want_ns => format!(
            "{} hosts requested, namespaces unavailable: one host (127.0.0.1), partitions emulated",
            s.cluster.hosts
        ),
        None => "one host: every process on 127.0.0.1 (partitions emulated in the worker)".into(),
    };
    let hosts = lab.as_ref().map(|l| {
        l.hosts()
            .iter()
            .map(|h| (h.ns.clone(), h.ip.to_string()))
            .collect()
    });
    let mut procs = Procs::new(exe.clone(), &dir, &s.cluster, hosts)?;
    println!(
        "== scenario {} (seed {seed}): {} controllers, {} workers + {} spares, {network}",
        s.name, s.cluster.controllers, s.cluster.workers, s.cluster.spares
    );
    println!("   cluster directory {}", dir.display());
    procs.start_all()?;
    let client = poll_client(&procs)?;
    let worker_restart = Duration::from_secs_f64(s.cluster.worker_restart_s);
    wait_until(
        "a leader and every worker registered",
        Duration::from_secs(180),
        || {
            for n in procs.supervise(worker_restart) {
                eprintln!("   {n}");
            }
            let st: StatusResponse = client.get("/v1/status").ok()?;
            (st.leader_id != 0 && st.workers.len() == s.cluster.worker_count() as usize)
                .then_some(())
        },
    )?;
    // The live page (issue 12): every controller serves it; this is the leader's.
    if let Ok(st) = client.get::<StatusResponse>("/v1/status") {
        let leader = st.members.iter().find(|m| m.id == st.leader_id);
        let reader = phalanx_pki::TlsDir::open(&procs.tls_dir)
            .and_then(|t| t.token(phalanx_pki::TokenKind::Reader));
        if let (Some(m), Ok(token)) = (leader, reader) {
            println!(
                "   dashboard {}",
                phalanx_dashboard::url(&m.address, token.trim())
            );
        }
    }
    let before: Vec<Event> = client.get("/v1/events?limit=1000").unwrap_or_default();
    let mut last_seq = before.last().map(|e| e.seq).unwrap_or(0);
    let spec = phalanx_chaos::job_spec(s, seed);
    client.command(Cmd::SubmitJob { spec })?;
    let origin = Instant::now();
    let submit_seq = last_seq;
    println!(
        "== job submitted: {} model, {} steps, global batch {}, seed {seed}; {} faults",
        s.job.model.as_str(),
        s.job.steps,
        s.job.global_batch,
        faults.len()
    );

    // Controller terms and leaders, polled from a thread (a paused controller makes a
    // status call wait out its timeout).
    let leaders: Arc<Mutex<Vec<LeaderSample>>> = Arc::default();
    let monitor_stop = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (leaders, stop) = (leaders.clone(), monitor_stop.clone());
        let c = poll_client(&procs)?;
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for (_, r) in c.status_all() {
                    if let Ok(st) = r {
                        let t_s = origin.elapsed().as_secs_f64();
                        if let Ok(mut l) = leaders.lock() {
                            l.push(LeaderSample {
                                t_s,
                                node: st.node_id,
                                role: st.role,
                                term: st.term,
                                leader: st.leader_id,
                            });
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };

    let mut stt = State {
        fired: vec![0; faults.len()],
        armed: vec![None; faults.len()],
        fired_seq: vec![None; faults.len()],
        report: Vec::new(),
        undo: Vec::new(),
        hogs: Vec::new(),
    };
    let mut events: Vec<SeenEvent> = Vec::new();
    let mut progress: Vec<ProgressSample> = Vec::new();
    let mut last_job: Option<JobInfo> = None;
    let deadline = Duration::from_secs(o.timeout_s.unwrap_or_else(|| {
        s.expect
            .max_wall_s
            .map(|w| (w * 1.5 + 60.0) as u64)
            .unwrap_or(1200)
    }));
    let mut runner_error = None;
    let mut ended_at = None;
    let mut cx = Ctx {
        seed,
        procs: &mut procs,
        lab: lab.as_ref(),
        client: &client,
        dir: &dir,
        origin,
    };
    loop {
        if STOP.load(Ordering::SeqCst) {
            runner_error = Some("interrupted (Ctrl-C or SIGTERM): torn down".to_string());
            break;
        }
        let t = cx.origin.elapsed();
        if t > deadline {
            runner_error = Some(format!(
                "the job did not finish within {} s (the run's bound; --timeout-s sets it)",
                deadline.as_secs()
            ));
            break;
        }
        for n in cx.procs.supervise(worker_restart) {
            eprintln!("   {n}");
        }
        for n in undo_due(&mut stt, cx.lab, false) {
            println!("   {:>6.1} s  {n}", t.as_secs_f64());
        }
        let t_s = t.as_secs_f64();
        if let Ok(Some(j)) = client.get::<Option<JobInfo>>("/v1/job") {
            progress.push(ProgressSample {
                t_s,
                epoch: j.plan.as_ref().map(|p| p.epoch).unwrap_or(0),
                progress_step: j.progress_step,
                rank_steps: j.rank_steps.clone(),
                ranks: j.plan.as_ref().map(|p| p.ranks.clone()).unwrap_or_default(),
            });
            last_job = Some(j);
        }
        if let Ok(evs) = client.get::<Vec<Event>>("/v1/events?limit=500") {
            let seen = last_seq;
            for e in evs.into_iter().filter(|e| e.seq > seen) {
                last_seq = e.seq;
                if e.kind != phalanx_proto::EventKind::CheckpointDurable {
                    println!(
                        "   {t_s:>6.1} s  event {} {}: {}",
                        e.kind, e.subject, e.reason
                    );
                }
                events.push(SeenEvent {
                    seq: e.seq,
                    t_s,
                    kind: e.kind,
                    subject: e.subject,
                    reason: e.reason,
                });
            }
        }
        if let Some(j) = &last_job {
            if j.state.is_terminal()
                && (j.state != JobState::Completed || j.params_sha256.is_some())
            {
                ended_at = Some(t_s);
                break;
            }
        }
        // Faults whose trigger came.
        for (i, f) in faults.iter().enumerate() {
            let anchor = if i == 0 || !matches!(f.trigger, Trigger::AfterEvent(_)) {
                Some(submit_seq)
            } else {
                stt.fired_seq[i - 1]
            };
            if stt.armed[i].is_none()
                && trigger_holds(f, stt.fired[i], anchor, last_job.as_ref(), t_s, &events)
            {
                stt.armed[i] = Some(Instant::now());
            }
            let Some(armed) = stt.armed[i] else { continue };
            if armed.elapsed().as_secs_f64() < f.delay_s {
                continue;
            }
            stt.armed[i] = None;
            let k = stt.fired[i];
            stt.fired[i] += 1;
            stt.fired_seq[i] = Some(last_seq);
            let step = last_job.as_ref().map(|j| j.progress_step).unwrap_or(0);
            let fired_at = cx.origin.elapsed().as_secs_f64();
            let (resolved, mechanism, error) =
                match fire(&mut cx, &mut stt, f, k, last_job.as_ref()) {
                    Ok((r, m)) => (r, m, None),
                    Err(e) => (String::new(), String::new(), Some(format!("{e:#}"))),
                };
            println!(
                "   {fired_at:>6.1} s  fault #{i} {} {} at step {step}: {}",
                f.kind,
                f.target.as_ref().map(|t| t.to_string()).unwrap_or_default(),
                match &error {
                    Some(e) => format!("NOT FIRED: {e}"),
                    None => format!("{resolved}; {mechanism}"),
                }
            );
            stt.report.push(FiredFault {
                index: f.index,
                kind: f.kind.to_string(),
                target: f.target.as_ref().map(|t| t.to_string()).unwrap_or_default(),
                resolved,
                trigger: f.trigger.to_string(),
                t_s: fired_at,
                step,
                duration_s: f.duration_s,
                mechanism,
                error,
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let wall_s = ended_at.unwrap_or_else(|| origin.elapsed().as_secs_f64());
    // Undo what is still in effect, so the last reads and the teardown meet a whole
    // cluster.
    for n in undo_due(&mut stt, lab.as_ref(), true) {
        println!("   teardown: {n}");
    }
    for h in stt.hogs.drain(..) {
        let _ = h.join();
    }
    // The final view (the job's last record may lag its terminal state by a poll).
    if let Ok(Some(j)) = client.get::<Option<JobInfo>>("/v1/job") {
        last_job = Some(j);
    }
    monitor_stop.store(true, Ordering::Relaxed);
    let _ = monitor.join();
    let job = last_job.unwrap_or_else(|| JobInfo {
        id: String::new(),
        spec: phalanx_chaos::job_spec(s, seed),
        state: JobState::Waiting,
        plan: None,
        progress_step: 0,
        rank_steps: vec![],
        params_sha256: None,
        recoveries: vec![],
        checkpoint_stall_us: vec![],
        started_at_ms: None,
        finished_at_ms: None,
        failure: None,
        start_failures: 0,
        start_failed_workers: Vec::new(),
        history: Default::default(),
        throughput: None,
    });
    let mttrs: Vec<u64> = job.recoveries.iter().filter_map(|r| r.mttr_ms).collect();
    let measured = Measured {
        completed: job.state == JobState::Completed,
        final_state: job.state.as_str().to_string(),
        progress_step: job.progress_step,
        params_sha256: job.params_sha256.clone(),
        reference_sha256: reference,
        recoveries: job
            .recoveries
            .iter()
            .map(|r| RecoveryM {
                epoch: r.epoch,
                source: r.source.clone(),
                resumed_at_step: r.resumed_at_step,
                steps_redone: r.steps_redone,
                mttr_s: r.mttr_ms.map(|m| m as f64 / 1e3),
            })
            .collect(),
        effective_training_time: effective_training_time(
            job.started_at_ms,
            job.finished_at_ms,
            &mttrs,
        ),
        events,
        leaders: leaders.lock().map(|l| l.clone()).unwrap_or_default(),
        wall_s,
    };
    let losses = losses(&procs);
    // Teardown: every process, then (when `lab` drops) every namespace and link.
    procs.kill_all();
    let left = procs.running();
    if !left.is_empty() {
        notes.push(format!(
            "processes still running after the teardown: {left:?}"
        ));
    }
    drop(procs);
    drop(lab);
    let verdicts = phalanx_chaos::check(&s.expect, &measured);
    let passed = runner_error.is_none()
        && verdicts.iter().all(|v| v.holds)
        && stt.report.iter().all(|f| f.error.is_none());
    for f in stt.report.iter().filter(|f| f.error.is_some()) {
        notes.push(format!(
            "fault #{} ({}) could not be fired: {}",
            f.index,
            f.kind,
            f.error.as_deref().unwrap_or("")
        ));
    }
    Ok(Report {
        scenario: s.name.clone(),
        file,
        description: if s.description.is_empty() {
            std::fs::read_to_string(&o.file)
                .map(|t| phalanx_chaos::purpose(&t))
                .unwrap_or_default()
        } else {
            s.description.clone()
        },
        seed,
        replay,
        passed,
        network,
        verdicts,
        measured,
        faults: stt.report,
        progress,
        losses,
        notes,
        error: runner_error,
    })
}
