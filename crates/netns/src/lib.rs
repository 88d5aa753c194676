//! Hosts in Linux network namespaces on one virtual switch, with links that can be cut
//! and healed: the network of the end-to-end partition tests (and of the scenario
//! runner's `hosts`).
//!
//! ```text
//!   root namespace (the test, its clients)
//!      │ veth  10.A.B.254/24
//!   ┌──┴──────────── switch namespace: bridge ────────────┐
//!   │ veth            │ veth                 │ veth        │
//!  host 0           host 1               host 2   ...
//!  10.A.B.1/24      10.A.B.2/24          10.A.B.3/24
//! ```
//!
//! Every host reaches every other one and the root namespace through the bridge, which
//! lives in a namespace of its own so that nothing of the root namespace's firewall or
//! bridge settings applies to it. A cut between two hosts is a pair of host routes, one in
//! each host, so the root namespace keeps reaching every host while they cannot reach
//! each other. Kinds of cut ([`Cut`]):
//!
//! - [`Cut::Unreachable`]: `ip route add unreachable` — sends fail at once
//!   (`EHOSTUNREACH`); a connection open at the time keeps retransmitting into it.
//! - [`Cut::Blackhole`]: `ip route add blackhole` — packets are discarded (new
//!   connections fail with `EINVAL`).
//! - [`Cut::DeadGateway`]: a route through an on-link address nobody holds — packets wait
//!   for an ARP answer that never comes and are dropped without a word: the closest thing
//!   to a pulled cable without `tc netem`.
//!
//! Only the root user can do this; [`Lab::check_available`] says why not otherwise. Every
//! name carries a prefix with this process's id, and [`Lab`]'s `Drop` removes every
//! namespace and link it made; [`Lab::new`] also removes what a dead process of an earlier
//! run left behind. Addresses come from a `10.A.B.0/24` that no route or address of the
//! root namespace overlaps.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of every namespace this crate creates: `phxlab-<pid>-<n>-...`.
const NS_PREFIX: &str = "phxlab-";

/// How a cut link fails. See the crate docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    Unreachable,
    Blackhole,
    DeadGateway,
}

impl Cut {
    pub fn name(self) -> &'static str {
        match self {
            Cut::Unreachable => "unreachable",
            Cut::Blackhole => "blackhole",
            Cut::DeadGateway => "dead-gateway",
        }
    }
}

#[derive(Debug)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Run `ip ARGS` (in namespace `ns` when given); the error carries its stderr.
fn ip(ns: Option<&str>, args: &[&str]) -> Result<String> {
    let mut c = Command::new("ip");
    if let Some(ns) = ns {
        c.args(["netns", "exec", ns, "ip"]);
    }
    let out = c
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error(format!("cannot run `ip`: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error(format!(
            "`ip {}{}` failed: {}",
            ns.map(|n| format!("(in {n}) ")).unwrap_or_default(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// One host: a network namespace with one interface (`eth0`) on the switch.
#[derive(Debug, Clone)]
pub struct Host {
    pub index: usize,
    /// The namespace's name (for `ip netns exec`).
    pub ns: String,
    pub ip: Ipv4Addr,
}

/// A set of hosts on one switch; everything is removed on drop.
pub struct Lab {
    tag: String,
    switch: String,
    root_link: String,
    net: [u8; 3],
    hosts: Vec<Host>,
    /// Namespaces and root links made so far (for the clean-up).
    made_ns: Vec<String>,
}

static LABS: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// `Ok` when this process can build a lab: root, `ip` installed, namespaces usable.
    pub fn check_available() -> Result<()> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(Error(
                "not root: network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN".into(),
            ));
        }
        ip(None, &["-V"]).map_err(|e| Error(format!("iproute2 is missing: {e}")))?;
        if !Path::new("/proc/self/ns/net").exists() {
            return Err(Error("this kernel has no network namespaces".into()));
        }
        Ok(())
    }

    /// A lab of `n` hosts (1..=250).
    pub fn new(n: usize) -> Result<Lab> {
        Self::check_available()?;
        if n == 0 || n > 250 {
            return Err(Error(format!("hosts: {n} (expected 1..=250)")));
        }
        sweep_stale();
        let pid = std::process::id();
        let k = LABS.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{pid}-{k}");
        let net = pick_subnet(pid, k)?;
        let mut lab = Lab {
            switch: format!("{NS_PREFIX}{tag}-sw"),
            // Link names have 15 bytes at most: "pl" + 8 hex digits + 'r'.
            root_link: format!("pl{:08x}r", (pid << 8) ^ k),
            tag,
            net,
            hosts: Vec::new(),
            made_ns: Vec::new(),
        };
        // On any error, `lab` is dropped here and removes what was made.
        lab.build(n)?;
        Ok(lab)
    }

    fn addr(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.net[0], self.net[1], self.net[2], last)
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        ip(None, &["netns", "add", name])?;
        self.made_ns.push(name.to_string());
        ip(Some(name), &["link", "set", "lo", "up"])?;
        Ok(())
    }

    fn build(&mut self, n: usize) -> Result<()> {
        let sw = self.switch.clone();
        self.add_ns(&sw)?;
        ip(Some(&sw), &["link", "add", "br0", "type", "bridge"])?;
        ip(Some(&sw), &["link", "set", "br0", "up"])?;
        // The root namespace's port: its end keeps a name unique in the root namespace.
        let root = self.root_link.clone();
        ip(
            None,
            &[
                "link", "add", &root, "type", "veth", "peer", "name", "up0", "netns", &sw,
            ],
        )?;
        ip(Some(&sw), &["link", "set", "up0", "master", "br0", "up"])?;
        let gw = format!("{}/24", self.addr(254));
        ip(None, &["addr", "add", &gw, "dev", &root])?;
        ip(None, &["link", "set", &root, "up"])?;
        for i in 0..n {
            let ns = format!("{NS_PREFIX}{}-h{i}", self.tag);
            self.add_ns(&ns)?;
            let port = format!("h{i}");
            ip(
                Some(&sw),
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            )?;
            ip(Some(&sw), &["link", "set", &port, "master", "br0", "up"])?;
            let host_ip = self.addr(i as u8 + 1);
            ip(
                Some(&ns),
                &["addr", "add", &format!("{host_ip}/24"), "dev", "eth0"],
            )?;
            ip(Some(&ns), &["link", "set", "eth0", "up"])?;
            self.hosts.push(Host {
                index: i,
                ns,
                ip: host_ip,
            });
        }
        Ok(())
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// The root namespace's address on the switch (where the test's clients come from).
    pub fn root_ip(&self) -> Ipv4Addr {
        self.addr(254)
    }

    /// `ip netns exec <host> <program>`: a command that runs inside host `i`.
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[i].ns]).arg(program);
        c
    }

    /// Cut the link between hosts `a` and `b`, both ways.
    pub fn cut(&self, a: usize, b: usize, kind: Cut) -> Result<()> {
        let dead_gw = self.addr(253).to_string();
        for (from, to) in [(a, b), (b, a)] {
            let dst = format!("{}/32", self.hosts[to].ip);
            let ns = Some(self.hosts[from].ns.as_str());
            match kind {
                Cut::Unreachable => ip(ns, &["route", "replace", "unreachable", &dst])?,
                Cut::Blackhole => ip(ns, &["route", "replace", "blackhole", &dst])?,
                Cut::DeadGateway => ip(
                    ns,
                    &["route", "replace", &dst, "via", &dead_gw, "dev", "eth0"],
                )?,
            };
        }
        Ok(())
    }

    /// Heal the link between hosts `a` and `b` (a link that is not cut is left alone).
    pub fn heal(&self, a: usize, b: usize) -> Result<()> {
        for (from, to) in [(a, b), (b, a)] {
            let dst = format!("{}/32", self.hosts[to].ip);
            let ns = Some(self.hosts[from].ns.as_str());
            let routes = ip(ns, &["route", "show", &dst])?;
            if !routes.trim().is_empty() {
                ip(ns, &["route", "del", &dst])?;
            }
        }
        Ok(())
    }

    /// Cut host `i` from every other host (the root namespace still reaches it).
    pub fn isolate(&self, i: usize, kind: Cut) -> Result<()> {
        for j in 0..self.hosts.len() {
            if j != i {
                self.cut(i, j, kind)?;
            }
        }
        Ok(())
    }

    /// Heal every link.
    pub fn heal_all(&self) -> Result<()> {
        for a in 0..self.hosts.len() {
            for b in a + 1..self.hosts.len() {
                self.heal(a, b)?;
            }
        }
        Ok(())
    }

    fn remove(&mut self) {
        let _ = ip(None, &["link", "del", &self.root_link]);
        for ns in self.made_ns.drain(..).rev() {
            let _ = ip(None, &["netns", "del", &ns]);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Remove namespaces (and so their links) left by labs of processes that no longer run,
/// and end the processes still running inside them.
fn sweep_stale() {
    let Ok(list) = ip(None, &["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            // Processes that run ended without stopping (it was killed) die with it.
            if let Ok(pids) = ip(None, &["netns", "pids", name]) {
                for p in pids
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    // SAFETY: kill(2) has no memory-safety preconditions.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
            let _ = ip(None, &["netns", "del", name]);
        }
    }
}

/// A `10.A.B.0/24` that overlaps no address or route of the root namespace.
fn pick_subnet(pid: u32, k: u32) -> Result<[u8; 3]> {
    let taken = ip(None, &["-4", "route", "show", "table", "all"])? + &ip(None, &["-4", "addr"])?;
    let prefixes: Vec<(u32, u32)> = taken.split_whitespace().filter_map(parse_prefix).collect();
    let seed = pid.wrapping_mul(31).wrapping_add(k.wrapping_mul(7919));
    for t in 0..2_000u32 {
        let x = seed.wrapping_add(t.wrapping_mul(104_729));
        let net = [10, 200 + (x % 50) as u8, ((x / 50) % 256) as u8];
        let base = u32::from_be_bytes([net[0], net[1], net[2], 0]);
        let clash = prefixes.iter().any(|(addr, len)| {
            let len = (*len).min(24);
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            len > 0 && (addr & mask) == (base & mask)
        });
        if !clash {
            return Ok(net);
        }
    }
    Err(Error(
        "no free 10.200-249.x.0/24 subnet in the root namespace".into(),
    ))
}

/// `a.b.c.d` or `a.b.c.d/len` (as `ip` prints them) -> (address, prefix length).
fn parse_prefix(s: &str) -> Option<(u32, u32)> {
    let (a, len) = match s.split_once('/') {
        Some((a, l)) => (a, l.parse::<u32>().ok()?),
        None => (s, 32),
    };
    let addr: Ipv4Addr = a.parse().ok()?;
    (len <= 32).then_some((u32::from(addr), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse() {
        assert_eq!(parse_prefix("10.1.2.0/24"), Some((0x0a010200, 24)));
        assert_eq!(parse_prefix("192.0.2.1"), Some((0xc0000201, 32)));
        assert_eq!(parse_prefix("default"), None);
        assert_eq!(parse_prefix("10.1.2.0/33"), None);
    }

    /// Build a lab, check reachability and each kind of cut, and leave nothing behind.
    /// Skipped (with a message) where namespaces are not available.
    #[test]
    fn lab_cuts_heals_and_cleans_up() {
        if let Err(e) = Lab::check_available() {
            eprintln!("SKIPPED lab_cuts_heals_and_cleans_up: {e}");
            return;
        }
        let lab = Lab::new(3).expect("lab");
        let (ns0, ns1) = (lab.host(0).ns.clone(), lab.host(1).ns.clone());
        let root_link = lab.root_link.clone();
        let route_get = |from: usize, to: usize| {
            ip(
                Some(&lab.host(from).ns),
                &["route", "get", &lab.host(to).ip.to_string()],
            )
        };
        assert!(route_get(0, 1).unwrap().contains("dev eth0"));
        for kind in [Cut::Unreachable, Cut::Blackhole, Cut::DeadGateway] {
            lab.cut(0, 1, kind).unwrap();
            let r = route_get(0, 1);
            match kind {
                Cut::DeadGateway => assert!(r.unwrap().contains("via"), "{kind:?}"),
                _ => assert!(r.is_err(), "{kind:?}: {r:?}"),
            }
            assert!(route_get(1, 0).is_err() || kind == Cut::DeadGateway);
            // Host 2 still reaches both.
            assert!(route_get(2, 0).unwrap().contains("dev eth0"));
            lab.heal(0, 1).unwrap();
            assert!(route_get(0, 1).unwrap().contains("dev eth0"), "{kind:?}");
        }
        drop(lab);
        let list = ip(None, &["netns", "list"]).unwrap();
        assert!(!list.contains(&ns0) && !list.contains(&ns1), "{list}");
        assert!(ip(None, &["link", "show", &root_link]).is_err());
    }
}
