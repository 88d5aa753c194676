//! `phalanx sim calibrate`: Phalanx's detection and recovery times from measurements of
//! the real emulated cluster. It reads the files the project writes:
//! - a demo summary (`phalanx demo --summary FILE`): per fault its kind, `detect_s`,
//!   `mttr_s` and the controller's reason (`detected_by`);
//! - `phalanx job status --json`: the job's recoveries, `mttr_ms` each;
//! - a scenario report (`report.json` of `phalanx scenario run`): `measured.recoveries`.
//!
//! and prints the `[policy.phalanx]` section of a simulation file.

use std::fmt::Write as _;

use serde_json::Value;

use crate::config::PhalanxTimings;

/// The measurements found in the files.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Samples {
    /// Crash (kill) detections, ms.
    pub crash_detect_ms: Vec<f64>,
    /// Hang or partition: the peer's silence before its report, ms (from the reason).
    pub silence_report_ms: Vec<f64>,
    /// `silent_confirm_ms` named in the controller's reasons.
    pub silent_confirm_ms: Vec<f64>,
    /// The workers' recovery windows, ms (charged after detection).
    pub replan_ms: Vec<f64>,
    /// Whole recovery windows with no detection split, ms.
    pub mttr_ms: Vec<f64>,
    pub sources: Vec<String>,
}

fn num_after(text: &str, key: &str) -> Option<f64> {
    let at = text.find(key)? + key.len();
    let digits: String = text[at..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    digits.parse().ok()
}

/// Read one file's JSON into `s`; `name` names it in errors and in the source line.
pub fn read(name: &str, text: &str, s: &mut Samples) -> Result<(), String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("{name}: not JSON: {e}"))?;
    let before = (
        s.crash_detect_ms.len() + s.silence_report_ms.len() + s.replan_ms.len(),
        s.mttr_ms.len(),
    );
    if let Some(faults) = v
        .get("faults")
        .and_then(Value::as_array)
        .filter(|_| v.get("measured").is_none())
    {
        // A demo summary.
        for (i, f) in faults.iter().enumerate() {
            let kind = f.get("fault").and_then(Value::as_str).unwrap_or("");
            let detect = f.get("detect_s").and_then(Value::as_f64);
            let mttr = f.get("mttr_s").and_then(Value::as_f64);
            let (Some(detect), Some(mttr)) = (detect, mttr) else {
                return Err(format!(
                    "{name}: faults[{i}]: detect_s and mttr_s must be numbers (a fault that was not recovered?)"
                ));
            };
            if !(detect.is_finite() && mttr.is_finite() && detect >= 0.0 && mttr >= 0.0) {
                return Err(format!(
                    "{name}: faults[{i}]: detect_s ({detect}) and mttr_s ({mttr}) must be >= 0"
                ));
            }
            // A controller fault does not stop training (the workers keep stepping
            // through an election): it says nothing about a worker's recovery.
            let target = f.get("target").and_then(Value::as_str).unwrap_or("");
            if target.starts_with("controller") {
                continue;
            }
            let reason = f.get("detected_by").and_then(Value::as_str).unwrap_or("");
            match kind {
                "kill" => s.crash_detect_ms.push(detect * 1000.0),
                "hang" | "partition" => {
                    if let Some(ms) = num_after(reason, "silent for") {
                        s.silence_report_ms.push(ms);
                    }
                }
                _ => {}
            }
            if let Some(ms) = num_after(reason, "silent_confirm_ms") {
                s.silent_confirm_ms.push(ms);
            }
            // The workers' recovery window (their epoch break to their first step in the
            // new epoch). It overlaps the detection, which the simulator charges before
            // it: counting both is conservative for Phalanx.
            s.replan_ms.push(mttr * 1000.0);
        }
    } else if let Some(m) = v.get("measured") {
        // A scenario report.
        for r in m
            .get("recoveries")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(x) = r
                .get("mttr_s")
                .and_then(Value::as_f64)
                .filter(|x| x.is_finite() && *x >= 0.0)
            {
                s.mttr_ms.push(x * 1000.0);
            }
        }
    } else if v.get("recoveries").is_some() || v.get("spec").is_some() {
        // `phalanx job status --json`.
        for r in v
            .get("recoveries")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(x) = r.get("mttr_ms").and_then(Value::as_f64) {
                s.mttr_ms.push(x);
            }
        }
    } else {
        return Err(format!(
            "{name}: neither a demo summary (faults[].detect_s), a scenario report \
             (measured.recoveries) nor `job status --json` (recoveries)"
        ));
    }
    let after = (
        s.crash_detect_ms.len() + s.silence_report_ms.len() + s.replan_ms.len(),
        s.mttr_ms.len(),
    );
    if after == before {
        return Err(format!("{name}: no recovery measured in it"));
    }
    s.sources.push(name.to_string());
    Ok(())
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// The timings the samples support: medians, over the defaults where nothing was
/// measured.
pub fn timings(s: &Samples) -> PhalanxTimings {
    let mut t = PhalanxTimings::default();
    if let Some(x) = median(&s.crash_detect_ms) {
        t.crash_report_ms = x.round() as u64;
    }
    if let Some(x) = median(&s.silence_report_ms) {
        t.silence_report_ms = x.round() as u64;
    }
    if let Some(x) = median(&s.silent_confirm_ms) {
        t.silent_confirm_ms = x.round() as u64;
    }
    if let Some(x) = median(&s.replan_ms) {
        t.replan_ms = x.round() as u64;
    } else if let Some(x) = median(&s.mttr_ms) {
        // Whole windows only: take the crash report off.
        t.replan_ms = (x - t.crash_report_ms as f64).max(0.0).round() as u64;
    }
    t.source = format!("phalanx sim calibrate {}", s.sources.join(" "));
    t
}

/// The `[policy.phalanx]` section, with the sample counts as comments.
pub fn toml_section(s: &Samples, t: &PhalanxTimings) -> String {
    let mut o = String::new();
    let n = |v: &Vec<f64>| v.len();
    let _ = writeln!(o, "[policy.phalanx]");
    let _ = writeln!(
        o,
        "crash_report_ms = {}  # median of {} kill detections",
        t.crash_report_ms,
        n(&s.crash_detect_ms)
    );
    let _ = writeln!(
        o,
        "silence_report_ms = {}  # median of {} silence reports",
        t.silence_report_ms,
        n(&s.silence_report_ms)
    );
    let _ = writeln!(
        o,
        "silent_confirm_ms = {}  # from {} controller reasons",
        t.silent_confirm_ms,
        n(&s.silent_confirm_ms)
    );
    let _ = writeln!(
        o,
        "replan_ms = {}  # median of {} demo MTTRs, or {} job/scenario MTTRs less the crash report",
        t.replan_ms,
        n(&s.replan_ms),
        n(&s.mttr_ms)
    );
    let _ = writeln!(o, "heartbeat_ms = {}", t.heartbeat_ms);
    let _ = writeln!(o, "source = {:?}", t.source);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_demo_summary_gives_detection_and_replan_times() {
        let summary = r#"{"faults":[
          {"fault":"kill","target":"rank:1","detect_s":0.25,"mttr_s":0.2,"detected_by":"rank 1 lost"},
          {"fault":"kill","target":"controller:leader","detect_s":0.6,"mttr_s":0.9,"detected_by":"Raft election"},
          {"fault":"hang","detect_s":0.9,"mttr_s":1.2,"detected_by":"w2 reported rank 1 of epoch 1 silent for 155 ms, and its heartbeats stopped 812 ms ago (confirmed after 780 ms: silent_confirm_ms 400, or 3 x its longest recent heartbeat gap)"}
        ]}"#;
        let mut s = Samples::default();
        read("demo.json", summary, &mut s).unwrap();
        let t = timings(&s);
        assert_eq!(t.crash_report_ms, 250);
        assert_eq!(t.silence_report_ms, 155);
        assert_eq!(t.silent_confirm_ms, 400);
        // Medians of [200, 1200] ms (the controller's fault left out).
        assert_eq!(t.replan_ms, 1200);
        assert!(toml_section(&s, &t).contains("replan_ms = 1200"));
    }

    #[test]
    fn files_of_another_kind_are_refused_by_name() {
        let mut s = Samples::default();
        let e = read("x.json", "{\"a\":1}", &mut s).unwrap_err();
        assert!(e.starts_with("x.json: neither"), "{e}");
        let e = read("y.json", "not json", &mut s).unwrap_err();
        assert!(e.starts_with("y.json: not JSON"), "{e}");
        let e = read(
            "z.json",
            r#"{"faults":[{"fault":"kill","detect_s":-2.0,"mttr_s":1.0}]}"#,
            &mut s,
        )
        .unwrap_err();
        assert!(e.contains("faults[0]"), "{e}");
    }
}
