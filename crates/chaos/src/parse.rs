//! Reading a scenario file: TOML syntax, then the types (serde), then the rules the types
//! cannot state. Every error carries the line and column of the offending key or value
//! and says what was expected; nothing here panics on any input (a property test feeds
//! it arbitrary text).

use std::fmt;
use std::ops::Range;

use toml_edit::{ImDocument, Item, Table, Value};

use crate::model::*;

/// Faults at most per file (an `every_s` fault counts `count` times).
pub const FAULTS_MAX: usize = 10_000;
const DURATION_S_MAX: f64 = 3600.0;
const HOSTS_MAX: u32 = 16;
const WORKERS_MAX: u32 = 64;
const STEPS_MAX: u64 = 100_000;

/// One problem in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    /// Where in the document, e.g. `faults[2].target` (empty for the whole file).
    pub path: String,
    pub message: String,
}

/// Every problem found in a file (syntax and type errors stop at the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioError {
    pub file: String,
    pub diagnostics: Vec<Diagnostic>,
    /// The file's lines, to show the offending one.
    lines: Vec<String>,
}

impl std::error::Error for ScenarioError {}

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            let at = if d.path.is_empty() {
                String::new()
            } else {
                format!(" ({})", d.path)
            };
            writeln!(
                f,
                "{}:{}:{}: error{at}: {}",
                self.file, d.line, d.column, d.message
            )?;
            if let Some(src) = self.lines.get(d.line.wrapping_sub(1)) {
                let src: String = src.chars().take(160).collect();
                writeln!(f, "{:>5} | {src}", d.line)?;
                write!(
                    f,
                    "      | {}^",
                    " ".repeat(d.column.saturating_sub(1).min(160))
                )?;
            }
        }
        Ok(())
    }
}

/// A scenario whose every rule holds, with its faults resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    pub scenario: Scenario,
    pub faults: Vec<Fault>,
}

/// Byte offset -> (line, column), both 1-based; the column counts characters.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    (line, before[line_start..].chars().count() + 1)
}

/// One step of a path into the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(&'static str),
    Index(usize),
}

fn path_string(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

enum Node<'a> {
    Item(&'a Item),
    Value(&'a Value),
    Table(&'a Table),
}

impl<'a> Node<'a> {
    fn span(&self) -> Option<Range<usize>> {
        match self {
            Node::Item(i) => i.span(),
            Node::Value(v) => v.span(),
            Node::Table(t) => t.span(),
        }
    }
    fn child(&self, seg: &Seg) -> Option<Node<'a>> {
        match (self, seg) {
            (Node::Table(t), Seg::Key(k)) => t.get(k).map(Node::Item),
            (Node::Item(Item::Table(t)), Seg::Key(k)) => t.get(k).map(Node::Item),
            (Node::Item(Item::Value(v)), s) => Node::Value(v).child(s),
            (Node::Value(Value::InlineTable(t)), Seg::Key(k)) => t.get(k).map(Node::Value),
            (Node::Item(Item::ArrayOfTables(a)), Seg::Index(i)) => a.get(*i).map(Node::Table),
            (Node::Value(Value::Array(a)), Seg::Index(i)) => a.get(*i).map(Node::Value),
            _ => None,
        }
    }
}

/// The span of the deepest node of `path` that exists (a missing key points at its
/// table).
fn span_of(doc: &ImDocument<&str>, path: &[Seg]) -> Option<Range<usize>> {
    let mut node = Node::Table(doc.as_table());
    let mut best = None;
    for seg in path {
        match node.child(seg) {
            Some(n) => {
                if let Some(s) = n.span() {
                    best = Some(s);
                }
                node = n;
            }
            None => break,
        }
    }
    best
}

/// Parse and validate a scenario. `file` names it in the errors.
pub fn parse(file: &str, text: &str) -> Result<Validated, ScenarioError> {
    let err = |diagnostics| ScenarioError {
        file: file.to_string(),
        diagnostics,
        lines: text.lines().map(str::to_string).collect(),
    };
    let at = |span: Option<Range<usize>>, path: String, message: String| {
        let (line, column) = span.map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        Diagnostic {
            line,
            column,
            path,
            message,
        }
    };
    let doc = match ImDocument::parse(text) {
        Ok(d) => d,
        Err(e) => {
            return Err(err(vec![at(
                e.span(),
                String::new(),
                format!("not valid TOML: {}", e.message().trim()),
            )]))
        }
    };
    let scenario: Scenario = match toml::from_str(text) {
        Ok(s) => s,
        Err(e) => {
            return Err(err(vec![at(
                e.span(),
                String::new(),
                e.message().trim().to_string(),
            )]))
        }
    };
    match validate(&scenario) {
        Ok(faults) => Ok(Validated { scenario, faults }),
        Err(problems) => Err(err(problems
            .into_iter()
            .map(|p| at(span_of(&doc, &p.path), path_string(&p.path), p.message))
            .collect())),
    }
}

/// A rule broken at `path`.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub path: Vec<Seg>,
    pub message: String,
}

fn problem(path: Vec<Seg>, message: impl Into<String>) -> Problem {
    Problem {
        path,
        message: message.into(),
    }
}

fn bad_seconds(v: f64) -> bool {
    !(v.is_finite() && v > 0.0 && v <= DURATION_S_MAX)
}

/// The rules the types cannot state. Returns the resolved faults, or every problem.
pub fn validate(s: &Scenario) -> Result<Vec<Fault>, Vec<Problem>> {
    use Seg::{Index, Key};
    let mut p = Vec::new();
    let c = &s.cluster;
    if s.name.is_empty()
        || s.name.len() > 48
        || !s
            .name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_".contains(ch))
    {
        p.push(problem(
            vec![Key("name")],
            format!(
                "name {:?}: expected 1 to 48 letters, digits, `-` or `_`",
                s.name
            ),
        ));
    }
    if !(1..=7).contains(&c.controllers) {
        p.push(problem(
            vec![Key("cluster"), Key("controllers")],
            format!("controllers = {}: expected 1..=7", c.controllers),
        ));
    }
    if c.workers == 0 || c.worker_count() > WORKERS_MAX {
        p.push(problem(
            vec![Key("cluster"), Key("workers")],
            format!(
                "workers = {} (+ {} spares): expected 1..={WORKERS_MAX} in all",
                c.workers, c.spares
            ),
        ));
    }
    if !(1..=HOSTS_MAX).contains(&c.hosts) {
        p.push(problem(
            vec![Key("cluster"), Key("hosts")],
            format!("hosts = {}: expected 1..={HOSTS_MAX}", c.hosts),
        ));
    }
    if !(c.worker_restart_s.is_finite() && (0.0..=DURATION_S_MAX).contains(&c.worker_restart_s)) {
        p.push(problem(
            vec![Key("cluster"), Key("worker_restart_s")],
            format!(
                "worker_restart_s = {}: expected 0 (never) to {DURATION_S_MAX}",
                c.worker_restart_s
            ),
        ));
    }
    if !(c.device.starts_with("emulated") || c.device.starts_with("cuda:")) {
        p.push(problem(
            vec![Key("cluster"), Key("device")],
            format!(
                "device {:?}: expected `emulated[:MODEL]` or `cuda:N`",
                c.device
            ),
        ));
    }

    // The job: the controller's own validation, on the spec the runner will submit.
    let j = &s.job;
    let wmax = j.world_size_max(c);
    if j.steps > STEPS_MAX {
        p.push(problem(
            vec![Key("job"), Key("steps")],
            format!("steps = {}: expected 1..={STEPS_MAX}", j.steps),
        ));
    }
    if wmax > c.worker_count() {
        p.push(problem(
            vec![Key("job"), Key("world_size_max")],
            format!(
                "world_size_max = {wmax}: the cluster has only {} workers (workers + spares)",
                c.worker_count()
            ),
        ));
    }
    if let Err(e) = phalanx_core::jobfile::validate_job(&crate::job_spec(s, j.seed)) {
        let field = match &e {
            phalanx_core::jobfile::JobFileError::Invalid { field, .. } => *field,
            _ => "steps",
        };
        let key: &'static str = match field {
            "world_size_min" => "world_size_min",
            "world_size_max" => "world_size_max",
            "global_batch" => "global_batch",
            "model" => "model",
            "checkpoint_interval_steps" => "checkpoint_interval_steps",
            "name" => "name",
            _ => "steps",
        };
        let path = if key == "name" {
            vec![Key("name")]
        } else {
            vec![Key("job"), Key(key)]
        };
        p.push(problem(path, e.to_string().replace("job file: ", "")));
    }

    let mut faults = Vec::new();
    let mut fired = 0usize;
    for (i, f) in s.faults.iter().enumerate() {
        let at = |k: &'static str| vec![Key("faults"), Index(i), Key(k)];
        let whole = vec![Key("faults"), Index(i)];
        let kind = f.kind;
        // Target.
        match (&f.target, kind.targetless()) {
            (Some(_), true) => p.push(problem(
                at("target"),
                format!("`{kind}` takes no target: leave `target` out"),
            )),
            (None, false) => p.push(problem(
                whole.clone(),
                format!(
                    "`{kind}` needs a target: add `target = ...` ({})",
                    kind.targets_expected()
                ),
            )),
            (Some(t), false) if !kind.accepts(t) => p.push(problem(
                at("target"),
                format!(
                    "`{kind}` cannot hit `{t}`: expected {}",
                    kind.targets_expected()
                ),
            )),
            (Some(t), false) => {
                if let Some(m) = target_missing(s, t) {
                    p.push(problem(at("target"), m));
                }
            }
            _ => {}
        }
        if kind == FaultKind::LinkDown && c.hosts < 2 {
            p.push(problem(
                at("kind"),
                "`link-down` needs at least 2 hosts: set `cluster.hosts = 2` or more",
            ));
        }
        // Trigger: exactly one.
        let given: Vec<&str> = [
            f.at_step.map(|_| "at_step"),
            f.at_s.map(|_| "at_s"),
            f.after_event.as_ref().map(|_| "after_event"),
            f.every_s.map(|_| "every_s"),
        ]
        .into_iter()
        .flatten()
        .collect();
        let trigger = match given.as_slice() {
            [] => {
                p.push(problem(
                    whole.clone(),
                    "no trigger: expected one of `at_step`, `at_s`, `after_event` or `every_s` (with `count`)",
                ));
                None
            }
            [_] => {
                if let Some(step) = f.at_step {
                    if step >= j.steps {
                        p.push(problem(
                            at("at_step"),
                            format!(
                                "at_step = {step} is at or after the last step: the job trains steps 0..{} (expected at_step < {})",
                                j.steps, j.steps
                            ),
                        ));
                    }
                    Some(Trigger::AtStep(step))
                } else if let Some(t) = f.at_s {
                    if !(t.is_finite() && (0.0..=DURATION_S_MAX * 4.0).contains(&t)) {
                        p.push(problem(
                            at("at_s"),
                            format!("at_s = {t}: expected 0 to {}", DURATION_S_MAX * 4.0),
                        ));
                    }
                    Some(Trigger::AtS(t))
                } else if let Some(e) = &f.after_event {
                    Some(Trigger::AfterEvent(e.clone()))
                } else {
                    let every = f.every_s.unwrap_or(0.0);
                    if bad_seconds(every) {
                        p.push(problem(
                            at("every_s"),
                            format!(
                                "every_s = {every}: expected more than 0, at most {DURATION_S_MAX}"
                            ),
                        ));
                    }
                    Some(Trigger::EveryS {
                        every_s: every,
                        count: f.count.unwrap_or(1),
                    })
                }
            }
            many => {
                p.push(problem(
                    at(many[1]),
                    format!(
                        "more than one trigger ({}): expected exactly one",
                        many.join(", ")
                    ),
                ));
                None
            }
        };
        if let Some(n) = f.count {
            if f.every_s.is_none() {
                p.push(problem(at("count"), "`count` goes only with `every_s`"));
            } else if n == 0 || n as usize > FAULTS_MAX {
                p.push(problem(
                    at("count"),
                    format!("count = {n}: expected 1..={FAULTS_MAX}"),
                ));
            }
        }
        fired = fired.saturating_add(f.count.unwrap_or(1) as usize);
        if let Some(d) = f.delay_s {
            if !(d.is_finite() && (0.0..=DURATION_S_MAX).contains(&d)) {
                p.push(problem(
                    at("delay_s"),
                    format!("delay_s = {d}: expected 0 to {DURATION_S_MAX}"),
                ));
            }
        }
        // Parameters.
        match (f.duration_s, kind.has_duration()) {
            (None, true) => p.push(problem(
                whole.clone(),
                format!("`{kind}` needs `duration_s` (seconds)"),
            )),
            (Some(_), false) => p.push(problem(
                at("duration_s"),
                format!("`{kind}` has no duration: leave `duration_s` out"),
            )),
            (Some(d), true) if bad_seconds(d) => p.push(problem(
                at("duration_s"),
                format!("duration_s = {d}: expected more than 0, at most {DURATION_S_MAX}"),
            )),
            _ => {}
        }
        if let Some(x) = f.factor {
            if kind != FaultKind::Slow {
                p.push(problem(at("factor"), "`factor` goes only with `slow`"));
            } else if let Some(e) = phalanx_proto::fault::slow_factor_problem(x) {
                p.push(problem(at("factor"), e));
            }
        }
        if let Some(n) = f.threads {
            if kind != FaultKind::CpuHog {
                p.push(problem(at("threads"), "`threads` goes only with `cpu-hog`"));
            } else if !(1..=64).contains(&n) {
                p.push(problem(
                    at("threads"),
                    format!("threads = {n}: expected 1..=64"),
                ));
            }
        }
        if let Some(trigger) = trigger {
            faults.push(Fault {
                index: i,
                kind,
                target: f.target.clone(),
                trigger,
                delay_s: f.delay_s.unwrap_or(0.0),
                duration_s: f.duration_s,
                factor: f.factor.unwrap_or(4.0),
                threads: f.threads.unwrap_or(2),
            });
        }
    }
    if fired > FAULTS_MAX {
        p.push(problem(
            vec![Key("faults")],
            format!("{fired} faults in all: expected at most {FAULTS_MAX}"),
        ));
    }

    if let Some(sw) = &s.swarm {
        let at = |k: &'static str| vec![Key("swarm"), Key(k)];
        if sw.rates_per_min.values().all(|r| *r <= 0.0) {
            p.push(problem(
                at("rates_per_min"),
                "no kind has a rate above 0: expected e.g. `rates_per_min = { kill = 1.0 }`",
            ));
        }
        for (kind, rate) in &sw.rates_per_min {
            if !(rate.is_finite() && (0.0..=60.0).contains(rate)) {
                p.push(problem(
                    at("rates_per_min"),
                    format!("rate of `{kind}` = {rate}: expected 0 to 60 per minute"),
                ));
            }
            let ok = matches!(
                kind,
                FaultKind::Kill
                    | FaultKind::Hang
                    | FaultKind::Slow
                    | FaultKind::Crash
                    | FaultKind::Ecc
                    | FaultKind::Sdc
                    | FaultKind::SdcGrad
                    | FaultKind::Partition
                    | FaultKind::CpuHog
                    | FaultKind::ControllerPause
            ) || (*kind == FaultKind::LinkDown && c.hosts >= 2);
            if !ok {
                p.push(problem(
                    at("rates_per_min"),
                    format!("`{kind}` cannot be drawn by the swarm: expected kill, hang, slow, crash, ecc, sdc, sdc-grad, partition, cpu-hog, controller-pause, or link-down with 2+ hosts"),
                ));
            }
        }
        if bad_seconds(sw.duration_s) {
            p.push(problem(
                at("duration_s"),
                format!("duration_s = {}: expected more than 0", sw.duration_s),
            ));
        }
        if !(sw.min_gap_s.is_finite() && sw.min_gap_s >= 0.0) {
            p.push(problem(at("min_gap_s"), "min_gap_s: expected 0 or more"));
        }
        if !(sw.start_s.is_finite() && sw.start_s >= 0.0) {
            p.push(problem(at("start_s"), "start_s: expected 0 or more"));
        }
        if let Some(stop) = sw.stop_s {
            if !(stop.is_finite() && stop > sw.start_s) {
                p.push(problem(
                    at("stop_s"),
                    format!(
                        "stop_s = {stop}: expected more than start_s ({})",
                        sw.start_s
                    ),
                ));
            }
        }
    }

    check_expect(s, &mut p);
    if p.is_empty() {
        Ok(faults)
    } else {
        Err(p)
    }
}

/// `Some(why)` when `t` names nothing in this scenario's cluster.
fn target_missing(s: &Scenario, t: &Target) -> Option<String> {
    let c = &s.cluster;
    let wmax = s.job.world_size_max(c);
    match t {
        Target::Rank(r) if *r >= wmax => Some(format!(
            "target `{t}` does not exist: the job has at most {wmax} ranks (expected rank:0..rank:{})",
            wmax.saturating_sub(1)
        )),
        Target::Worker(w) if !c.worker_ids().contains(w) => Some(format!(
            "target `{t}` does not exist: the cluster's workers are w0..w{}",
            c.worker_count().saturating_sub(1)
        )),
        Target::Controller(id) if *id == 0 || *id > c.controllers as u64 => Some(format!(
            "target `{t}` does not exist: the controllers are 1..={}",
            c.controllers
        )),
        Target::Host(h) if *h >= c.hosts => Some(format!(
            "target `{t}` does not exist: the hosts are 0..={}",
            c.hosts.saturating_sub(1)
        )),
        _ => None,
    }
}

fn check_expect(s: &Scenario, p: &mut Vec<Problem>) {
    use Seg::{Index, Key};
    let e = &s.expect;
    let at = |k: &'static str| vec![Key("expect"), Key(k)];
    if !e.completes {
        for (set, name) in [
            (e.bit_exact_with_reference, "bit_exact_with_reference"),
            (
                e.min_effective_training_time.is_some(),
                "min_effective_training_time",
            ),
        ] {
            if set {
                p.push(problem(
                    at(name),
                    format!("contradictory expectations: `{name}` needs the job to complete, but `completes = false`"),
                ));
            }
        }
    }
    if let Some(x) = e.min_effective_training_time {
        if !(x.is_finite() && (0.0..=1.0).contains(&x)) {
            p.push(problem(
                at("min_effective_training_time"),
                format!("min_effective_training_time = {x}: expected a fraction in 0..=1"),
            ));
        }
    }
    if let Some(x) = e.max_mttr_s {
        if !(x.is_finite() && x > 0.0) {
            p.push(problem(
                at("max_mttr_s"),
                format!("max_mttr_s = {x}: expected more than 0"),
            ));
        }
    }
    if e.max_leaders_per_term == Some(0) {
        p.push(problem(
            at("max_leaders_per_term"),
            "max_leaders_per_term = 0 is contradictory: a term that elects anyone has one leader (expected 1)",
        ));
    }
    if let Some(w) = e.max_wall_s {
        if !(w.is_finite() && w > 0.0) {
            p.push(problem(
                at("max_wall_s"),
                format!("max_wall_s = {w}: expected more than 0"),
            ));
        }
        for (i, f) in s.faults.iter().enumerate() {
            let last = match (f.at_s, f.every_s) {
                (Some(t), _) => Some((t, "at_s")),
                (None, Some(ev)) => Some((ev * f.count.unwrap_or(1) as f64, "every_s")),
                _ => None,
            };
            if let Some((t, key)) = last {
                if t > w {
                    p.push(problem(
                        vec![Key("faults"), Index(i), Key(key)],
                        format!("contradictory expectations: this fault fires at {t} s, after `expect.max_wall_s = {w}`"),
                    ));
                }
            }
        }
    }
    if e.min_recoveries.is_some() && s.faults.is_empty() && s.swarm.is_none() {
        p.push(problem(
            at("min_recoveries"),
            "contradictory expectations: `min_recoveries` with no fault to recover from",
        ));
    }
    for (i, req) in e.required_events.iter().enumerate() {
        for forb in &e.forbidden_events {
            let covered = forb.kind == req.kind
                && match (&forb.contains, &req.contains) {
                    (None, _) => true,
                    (Some(f), Some(r)) => r.contains(f.as_str()),
                    (Some(_), None) => false,
                };
            if covered {
                p.push(problem(
                    vec![Key("expect"), Key("required_events"), Index(i)],
                    format!("contradictory expectations: `{req}` is required, but every such event is forbidden by `{forb}`"),
                ));
            }
        }
    }
}
