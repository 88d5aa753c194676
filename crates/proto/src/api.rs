//! The HTTP API's own messages: error answers, a controller's status and membership
//! changes (the replicated commands and their parts are in the crate root).

use serde::{Deserialize, Serialize};

use crate::{ControllerMember, JobInfo, NodeId, WorkerInfo};

/// The machine-readable kind of a non-2xx answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub enum ErrorCode {
    /// 421: ask the leader (its id and address come along).
    NotLeader,
    /// 503: no leader is known right now.
    NoLeader,
    /// 504: the request did not commit in time.
    Timeout,
    BadRequest,
    NotFound,
    /// 409: the state machine refused the command.
    Refused,
    /// 401: no credential, or an unknown one.
    Unauthorized,
    /// 403: a known credential whose role may not do this.
    Forbidden,
    /// 408: the request (its body) did not arrive in time.
    RequestTimeout,
    PayloadTooLarge,
    Internal,
    /// A code this release does not know (a newer controller's), or an answer that was
    /// not an [`ErrorResponse`].
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotLeader => "not_leader",
            ErrorCode::NoLeader => "no_leader",
            ErrorCode::Timeout => "timeout",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Refused => "refused",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_id: Option<NodeId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_address: Option<String>,
}

/// A controller's Raft role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub enum RaftRole {
    Leader,
    Follower,
    Candidate,
    PreCandidate,
}

impl RaftRole {
    pub fn as_str(self) -> &'static str {
        match self {
            RaftRole::Leader => "leader",
            RaftRole::Follower => "follower",
            RaftRole::Candidate => "candidate",
            RaftRole::PreCandidate => "pre_candidate",
        }
    }
}

impl std::fmt::Display for RaftRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `GET /v1/status`: this node's view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusResponse {
    pub node_id: NodeId,
    pub role: RaftRole,
    /// 0 when this node knows no leader.
    pub leader_id: NodeId,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub members: Vec<ControllerMember>,
    pub workers: Vec<WorkerInfo>,
    pub job: Option<JobInfo>,
    pub checkpoints: usize,
    pub events: usize,
    /// On the leader: the highest log index each member has acknowledged. A member at 0
    /// never stored anything (a fresh node), as opposed to one that lost its data.
    #[serde(default)]
    pub matched: std::collections::BTreeMap<NodeId, u64>,
}

/// What a membership change does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub enum MemberAction {
    /// Add a voter (its address is required).
    Add,
    /// Remove a voter.
    Remove,
}

impl MemberChange {
    /// What is wrong with this change before it reaches Raft, if anything: raft-rs skips
    /// node id 0 silently (the answer would say accepted for a change that did nothing),
    /// and an added node's address is replicated into every snapshot and dialled by every
    /// peer, so it must be `HOST:PORT` of a sane length.
    pub fn problem(&self) -> Option<String> {
        if self.id == 0 {
            return Some("id: 0 is not a node id (ids start at 1)".into());
        }
        if self.action == MemberAction::Remove {
            return None;
        }
        let a = &self.address;
        if a.is_empty() {
            return Some("address: required to add a member".into());
        }
        let port = a
            .rsplit_once(':')
            .map(|(host, port)| (host, port.parse::<u16>()));
        let sane = a.len() <= 255 && !a.chars().any(|c| c.is_whitespace() || c.is_control());
        match port {
            Some((host, Ok(p))) if sane && !host.is_empty() && p != 0 => None,
            _ => Some(format!("address: {a:?} is not HOST:PORT")),
        }
    }
}

impl MemberAction {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberAction::Add => "add",
            MemberAction::Remove => "remove",
        }
    }
}

/// `POST /v1/members` (joint-consensus membership change).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberChange {
    pub action: MemberAction,
    pub id: NodeId,
    #[serde(default)]
    pub address: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_change_names_its_bad_field() {
        let c = |action, id, address: &str| MemberChange {
            action,
            id,
            address: address.into(),
        };
        assert_eq!(c(MemberAction::Add, 4, "127.0.0.1:7004").problem(), None);
        assert_eq!(
            c(MemberAction::Add, 4, "ctl-4.example:7004").problem(),
            None
        );
        assert_eq!(c(MemberAction::Add, 4, "[::1]:7004").problem(), None);
        assert_eq!(c(MemberAction::Remove, 4, "").problem(), None);
        for (id, address, want) in [
            (0, "127.0.0.1:7004", "id: 0"),
            (4, "", "address: required"),
            (4, "127.0.0.1", "is not HOST:PORT"),
            (4, "127.0.0.1:0", "is not HOST:PORT"),
            (4, ":7004", "is not HOST:PORT"),
            (4, "127.0.0.1:70000", "is not HOST:PORT"),
            (4, "a b:7004", "is not HOST:PORT"),
        ] {
            let p = c(MemberAction::Add, id, address).problem().unwrap();
            assert!(p.contains(want), "{address}: {p}");
        }
        assert!(c(MemberAction::Add, 4, &format!("{}:1", "h".repeat(300)))
            .problem()
            .is_some());
    }
}
