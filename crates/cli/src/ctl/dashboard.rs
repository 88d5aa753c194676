//! `phalanx dashboard`: the address of the leader's live dashboard (`/ui/`, served by every
//! controller), with the token in its query. It prints the address and opens nothing.

use phalanx_proto::RaftRole;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use phalanx_proto::StatusResponse;
use serde::Serialize;

use super::output::print_json;
use super::{read_cluster, read_token, Target};
use crate::outcome::Failure;

#[derive(Args, Debug)]
pub struct DashboardCmd {
    #[command(flatten)]
    pub target: Target,
}

#[derive(Serialize)]
struct DashboardAddress {
    /// The page, with `?token=`: opening it sets the cookie that the page then uses.
    url: String,
    /// The leader that serves it.
    leader_id: u64,
    address: String,
}

pub fn dashboard(cmd: DashboardCmd) -> Result<()> {
    let client = cmd.target.client_as(&phalanx_pki::Role::Reader)?;
    let token = token(&cmd.target)?;
    let start = Instant::now();
    let (leader_id, address) = loop {
        let all = client.status_all();
        if let Some(found) = pick(&all) {
            break found;
        }
        if start.elapsed() + Duration::from_millis(100) >= cmd.target.wait {
            let errs: Vec<String> = all
                .iter()
                .map(|(a, r)| match r {
                    Ok(s) => format!("{a}: node {} ({}, no leader known)", s.node_id, s.role),
                    Err(e) => format!("{a}: {e}"),
                })
                .collect();
            if errs.iter().any(|e| e.contains("401")) {
                bail!(
                    "unauthorized (401): wrong cluster token ({})",
                    errs.join("; ")
                );
            }
            return Err(Failure::Unreachable(format!(
                "no controller answered as or named a leader: {}",
                errs.join("; ")
            ))
            .into());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let view = DashboardAddress {
        url: phalanx_dashboard::url(&address, &token),
        leader_id,
        address,
    };
    if cmd.target.json() {
        return print_json(&view);
    }
    println!("{}", view.url);
    Ok(())
}

/// The leader with the highest term among the answers, else the leader that an answering
/// node names (at the address it lists for it).
fn pick(all: &[(String, Result<StatusResponse, String>)]) -> Option<(u64, String)> {
    let ok = || {
        all.iter()
            .filter_map(|(a, r)| r.as_ref().ok().map(|s| (a, s)))
    };
    if let Some((a, s)) = ok()
        .filter(|(_, s)| s.role == RaftRole::Leader)
        .max_by_key(|(_, s)| s.term)
    {
        return Some((s.node_id, a.clone()));
    }
    ok().filter(|(_, s)| s.leader_id != 0)
        .max_by_key(|(_, s)| s.term)
        .and_then(|(_, s)| {
            s.members
                .iter()
                .find(|m| m.id == s.leader_id && !m.address.is_empty())
                .map(|m| (m.id, m.address.clone()))
        })
}

/// The token the page is opened with: `--token-file`, else `PHALANX_TOKEN`, else the
/// read-only operator token of the credentials directory (`--tls-dir`, or the cluster
/// directory's).
fn token(target: &Target) -> Result<String> {
    if let Some(f) = &target.endpoint.token_file {
        return read_token(f);
    }
    if let Ok(t) = std::env::var("PHALANX_TOKEN") {
        if !t.trim().is_empty() {
            return Ok(t.trim().to_string());
        }
    }
    let tls = match (&target.endpoint.tls_dir, target.dir()) {
        (Some(t), _) => t.clone(),
        (None, Some(d)) => read_cluster(&d)?.tls_dir.unwrap_or_else(|| d.join("tls")),
        (None, None) => bail!("no token: pass --token-file F, --dir DIR or --tls-dir DIR"),
    };
    Ok(phalanx_pki::TlsDir::open(&tls)?.token(phalanx_pki::TokenKind::Reader)?)
}
