//! How the operator verbs print: tables for people, JSON for scripts, and one outcome
//! line (or one error line) per command.
use anyhow::Result;
use clap::ValueEnum;
use phalanx_proto::CommandResponse;
use serde::Serialize;

use crate::outcome::Failure;

/// `--output`: the format of a verb's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable tables.
    Table,
    /// One JSON document (the same fields as the API).
    Json,
}

pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.len());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:<width$}", c, width = w[i]))
            .collect();
        s.join("  ").trim_end().to_string()
    };
    let mut out = vec![line(headers.iter().map(|s| s.to_string()).collect())];
    for r in rows {
        out.push(line(r.clone()));
    }
    out.join("\n")
}

pub fn print_json(v: &impl Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// An accepted command prints what changed (one line, or the response as JSON); a
/// rejected one prints nothing on stdout and fails with the controller's reason (one
/// line on stderr, exit code 1).
pub fn report(resp: &CommandResponse, json: bool) -> Result<()> {
    if !resp.outcome.is_applied() {
        return Err(Failure::Rejected(resp.outcome.message().to_string()).into());
    }
    if json {
        print_json(resp)?;
    } else {
        let dup = if resp.duplicate {
            " (duplicate request, applied once)"
        } else {
            ""
        };
        println!("{} (log index {}){dup}", resp.outcome.message(), resp.index);
    }
    Ok(())
}
