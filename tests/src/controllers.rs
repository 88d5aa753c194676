//! A controller-only cluster for end-to-end tests: `phalanx controller start` processes on
//! 127.0.0.1 with the cluster's TLS credentials, each of which a test may kill (SIGKILL),
//! restart with more flags, or reach through a proxy of its own. Every process is killed
//! when the set is dropped, whether the test passed or not.
use phalanx_proto::RaftRole;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use phalanx_controller::client::{http_once, Client, Credentials};
use phalanx_pki::{Role, TlsDir};
use phalanx_proto::StatusResponse;

use crate::{free_port, phalanx, KillOnDrop};

/// `GET path` on one controller, decoded; `None` on any error or a non-200 answer.
pub fn get_json<T: serde::de::DeserializeOwned>(
    addr: &str,
    creds: &Credentials,
    path: &str,
    timeout: Duration,
) -> Option<T> {
    let (code, body) = http_once(addr, "GET", path, creds, None, timeout).ok()?;
    (code == 200)
        .then(|| serde_json::from_slice(&body).ok())
        .flatten()
}

/// One controller's `GET /v1/status`.
pub fn status_of(addr: &str, creds: &Credentials, timeout: Duration) -> Option<StatusResponse> {
    get_json(addr, creds, "/v1/status", timeout)
}

/// The last `n` bytes of `s` (at a character boundary), for failure messages.
pub fn tail(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

pub struct Controllers {
    /// Processes first: they are killed before the directory (declared after) is removed.
    pub procs: BTreeMap<u64, KillOnDrop>,
    pub dir: tempfile::TempDir,
    pub tls: TlsDir,
    /// The admin operator's credentials.
    pub admin: Credentials,
    /// Where each node listens.
    pub addrs: BTreeMap<u64, String>,
    /// (from, to) -> the address `from` dials to reach `to`, where it is not `addrs[to]`
    /// (a test's proxy).
    routes: BTreeMap<(u64, u64), String>,
    /// Flags every node starts with.
    extra: Vec<String>,
}

impl Controllers {
    /// `n` controllers started with `extra` flags.
    pub fn start(n: u64, extra: &[&str]) -> Self {
        let mut c = Self::prepare(n, extra);
        for id in 1..=n {
            c.start_node(id);
        }
        c
    }

    /// The addresses and credentials of `n` controllers (admin and reader roles issued),
    /// none started: a test routes links ([`Self::route`]) before [`Self::start_node`].
    pub fn prepare(n: u64, extra: &[&str]) -> Self {
        let addrs: BTreeMap<u64, String> = (1..=n)
            .map(|id| (id, format!("127.0.0.1:{}", free_port())))
            .collect();
        Self::prepare_at(tempfile::tempdir().unwrap(), addrs, extra)
    }

    /// [`Self::prepare`] of controllers listening at `addrs` (each one's certificate names
    /// the host of its address), their data, logs and credentials in `dir`.
    pub fn prepare_at(
        dir: tempfile::TempDir,
        addrs: BTreeMap<u64, String>,
        extra: &[&str],
    ) -> Self {
        let tls = TlsDir::create(&dir.path().join("tls")).unwrap();
        for r in [Role::Admin, Role::Reader] {
            tls.issue(&r, &[]).unwrap();
        }
        for (id, a) in &addrs {
            let host = a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h);
            tls.issue(&Role::Controller(*id), &[host.to_string()])
                .unwrap();
        }
        let admin = Credentials::role(&tls, &Role::Admin).unwrap();
        Controllers {
            procs: BTreeMap::new(),
            dir,
            tls,
            admin,
            addrs,
            routes: BTreeMap::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Node `from` reaches node `to` at `addr` (from its next start on).
    pub fn route(&mut self, from: u64, to: u64, addr: String) {
        self.routes.insert((from, to), addr);
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node{id}"))
    }

    pub fn start_node(&mut self, id: u64) {
        self.start_node_with(id, &[]);
    }

    /// Starts node `id` with `more` flags after the common ones; its log is appended to.
    pub fn start_node_with(&mut self, id: u64, more: &[&str]) {
        let mut base = phalanx();
        base.args(["--log", "info"]);
        self.start_node_from(id, base, more);
    }

    /// [`Self::start_node_with`] from `base`, a command that runs the `phalanx` binary
    /// (in a network namespace, say) to which the controller's arguments are added.
    pub fn start_node_from(&mut self, id: u64, mut base: Command, more: &[&str]) {
        let peers: Vec<String> = self
            .addrs
            .iter()
            .map(|(to, a)| {
                let a = self.routes.get(&(id, *to)).unwrap_or(a);
                format!("{to}={a}")
            })
            .collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node{id}.log")))
            .unwrap();
        let child = base
            .args(["controller", "start", "--id", &id.to_string()])
            .args(["--listen", &self.addrs[&id], "--peers", &peers.join(",")])
            .arg("--data-dir")
            .arg(self.data_dir(id))
            .arg("--tls-dir")
            .arg(self.tls.path())
            .args(&self.extra)
            .args(more)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn phalanx controller start");
        self.procs.insert(id, KillOnDrop(child));
    }

    /// SIGKILL one node.
    pub fn kill(&mut self, id: u64) {
        // KillOnDrop kills and reaps it.
        self.procs.remove(&id);
    }

    pub fn log(&self, id: u64) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node{id}.log"))).unwrap_or_default()
    }

    /// A client of every node, as the admin.
    pub fn client(&self) -> Client {
        Client::new(self.addrs.values().cloned().collect(), self.admin.clone()).unwrap()
    }

    pub fn status(&self, id: u64) -> Option<StatusResponse> {
        self.status_within(id, Duration::from_millis(500))
    }

    pub fn status_within(&self, id: u64, timeout: Duration) -> Option<StatusResponse> {
        status_of(&self.addrs[&id], &self.admin, timeout)
    }

    /// The leader of the highest term any node reports being, if one does now.
    pub fn leader(&self) -> Option<u64> {
        self.addrs
            .keys()
            .filter_map(|id| self.status(*id))
            .filter(|s| s.role == RaftRole::Leader)
            .max_by_key(|s| s.term)
            .map(|s| s.node_id)
    }

    /// Waits for a node other than `exclude` to lead in a term above `above_term`;
    /// returns (leader, term), or fails with the nodes' logs.
    pub fn wait_leader(
        &self,
        timeout: Duration,
        above_term: u64,
        exclude: Option<u64>,
    ) -> (u64, u64) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            for id in self.addrs.keys().filter(|i| Some(**i) != exclude) {
                if let Some(s) = self.status(*id) {
                    if s.role == RaftRole::Leader && s.term > above_term {
                        return (s.node_id, s.term);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let logs: Vec<String> = self
            .addrs
            .keys()
            .map(|i| format!("--- node {i}\n{}", tail(&self.log(*i), 2000)))
            .collect();
        panic!(
            "no leader above term {above_term} within {timeout:?}\n{}",
            logs.join("\n")
        );
    }

    /// The CLI flags that reach this cluster as the admin.
    pub fn cli_target(&self) -> Vec<String> {
        vec![
            "--controllers".into(),
            self.addrs.values().cloned().collect::<Vec<_>>().join(","),
            "--tls-dir".into(),
            self.tls.path().display().to_string(),
        ]
    }
}
