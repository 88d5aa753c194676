//! `phalanx status --json`: the cluster as the CLI sees it, from every controller's
//! [`crate::StatusResponse`]. The CLI prints it; tests and scripts read it back.

use serde::{Deserialize, Serialize};

use crate::{ControllerMember, JobInfo, NodeId, RaftRole, WorkerInfo};

/// One controller as `phalanx status` reached it (or failed to).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub address: String,
    pub reachable: bool,
    pub node_id: Option<NodeId>,
    pub role: Option<RaftRole>,
    pub term: Option<u64>,
    pub commit_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub error: Option<String>,
}

/// The answer of `phalanx status --json`: the best-informed controller's view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// 0 when no controller knows a leader.
    pub leader_id: NodeId,
    pub term: u64,
    pub members: Vec<ControllerMember>,
    pub commit_index: u64,
    pub workers: Vec<WorkerInfo>,
    pub job: Option<JobInfo>,
    pub nodes: Vec<NodeView>,
}
