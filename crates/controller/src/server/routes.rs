//! Which role reaches which endpoint: the one table that the API enforces, that
//! `docs/security.md` prints and that the tests walk (issue 11).
//!
//! A route lets a request through when the caller's role is listed; checks that depend on
//! the request (a worker speaks only for itself, a controller changes only its own
//! membership, which commands a worker may send) follow in the handler and in
//! `phalanx_core::authz`.

use super::security::Principal;

/// A role, as the route table names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// The read-only operator credential (certificate or token).
    Reader,
    /// The admin operator credential (certificate or token).
    Admin,
    /// Any worker certificate (the handler then checks it speaks for itself).
    Worker,
    /// A controller certificate.
    Controller,
}

impl Who {
    pub fn name(self) -> &'static str {
        match self {
            Who::Reader => "reader",
            Who::Admin => "admin",
            Who::Worker => "worker",
            Who::Controller => "controller",
        }
    }

    pub fn of(p: &Principal) -> Option<Who> {
        match p {
            Principal::Reader => Some(Who::Reader),
            Principal::Admin => Some(Who::Admin),
            Principal::Worker(_) => Some(Who::Worker),
            Principal::Controller(_) => Some(Who::Controller),
            Principal::Insecure => None,
        }
    }
}

pub struct RouteSpec {
    pub method: &'static str,
    /// The route pattern (axum syntax: `{name}` is one path segment, percent-decoded).
    pub path: &'static str,
    pub who: &'static [Who],
    /// What it does, and any narrower check made by the handler.
    pub what: &'static str,
}

use Who::*;

pub const ROUTES: &[RouteSpec] = &[
    RouteSpec {
        method: "GET",
        path: "/v1/status",
        who: &[Reader, Admin, Worker, Controller],
        what: "this controller's view: role, term, members, workers, job",
    },
    RouteSpec {
        method: "GET",
        path: "/v1/metrics",
        who: &[Reader, Admin],
        what: "the controller's counters as JSON",
    },
    RouteSpec {
        method: "GET",
        path: "/v1/workers",
        who: &[Reader, Admin],
        what: "every registered worker",
    },
    RouteSpec {
        method: "GET",
        path: "/v1/job",
        who: &[Reader, Admin, Worker],
        what: "the job, its plan and progress",
    },
    RouteSpec {
        method: "GET",
        path: "/v1/checkpoints",
        who: &[Reader, Admin, Worker],
        what: "the checkpoint catalog",
    },
    RouteSpec {
        method: "GET",
        path: "/v1/events",
        who: &[Reader, Admin],
        what: "the event log (`?limit=N`)",
    },
    RouteSpec {
        method: "GET",
        path: "/v1/annotations/{key}",
        who: &[Reader, Admin],
        what: "one annotation",
    },
    RouteSpec {
        method: "GET",
        path: "/v1/assignment/{worker}",
        who: &[Worker],
        what: "a worker's rank, peers and epoch secret: only its own",
    },
    RouteSpec {
        method: "POST",
        path: "/v1/command",
        who: &[Admin, Worker],
        what: "propose a command; a worker only reports for itself and its plan \
               (phalanx_core::authz)",
    },
    RouteSpec {
        method: "POST",
        path: "/v1/heartbeat",
        who: &[Worker],
        what: "a worker's heartbeat: only its own",
    },
    RouteSpec {
        method: "POST",
        path: "/v1/members",
        who: &[Admin, Controller],
        what: "change the controllers' membership; a controller only its own (rejoin)",
    },
    RouteSpec {
        method: "GET",
        path: "/metrics",
        who: &[Reader, Admin],
        what: "Prometheus text (docs/observability.md)",
    },
    RouteSpec {
        method: "GET",
        path: "/ui",
        who: &[Reader, Admin],
        what: "the dashboard (docs/dashboard.md); `?token=T` sets its cookie",
    },
    RouteSpec {
        method: "GET",
        path: "/ui/",
        who: &[Reader, Admin],
        what: "the dashboard's page",
    },
    RouteSpec {
        method: "GET",
        path: "/ui/{*file}",
        who: &[Reader, Admin],
        what: "the dashboard's script, styles and vendored uPlot",
    },
];

/// The route spec of a matched route.
pub fn spec(method: &str, pattern: &str) -> Option<&'static RouteSpec> {
    ROUTES
        .iter()
        .find(|r| r.method == method && r.path == pattern)
}

/// May `p` reach the route? `Err` names who may.
pub fn check(p: &Principal, r: &RouteSpec) -> Result<(), String> {
    match Who::of(p) {
        None => Ok(()),
        Some(w) if r.who.contains(&w) => Ok(()),
        Some(_) => Err(format!(
            "{p} may not call {} {}; it needs the {} credential",
            r.method,
            r.path,
            r.who
                .iter()
                .map(|w| w.name())
                .collect::<Vec<_>>()
                .join(" or ")
        )),
    }
}

/// The table as Markdown (the one in docs/security.md).
pub fn markdown_table() -> String {
    let mut s = String::from(
        "| endpoint | reader | admin | worker | controller | what |\n|---|---|---|---|---|---|\n",
    );
    for r in ROUTES {
        let mark = |w: Who| if r.who.contains(&w) { "yes" } else { "-" };
        s.push_str(&format!(
            "| `{} {}` | {} | {} | {} | {} | {} |\n",
            r.method,
            r.path,
            mark(Reader),
            mark(Admin),
            mark(Worker),
            mark(Controller),
            r.what
        ));
    }
    s
}
