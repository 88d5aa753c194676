//! The live dashboard in a real browser: a cluster trains, a worker is killed, and headless
//! Chromium (Debian's `chromium`, driven through `chromium-driver` over WebDriver) shows
//! what a person would see on the page that `phalanx dashboard` names. A screenshot lands
//! in target/dashboard/. And the token's way into the browser, over raw HTTP: a cookie that
//! authorizes reads only.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use phalanx_tests::cluster::{job_toml, LocalCluster};
use phalanx_tests::{free_port, KillOnDrop};
use serde_json::{json, Value};

const INSTALL: &str = "apt-get install chromium chromium-driver";
/// How long the page may take to show each thing (polls once a second; a loaded machine).
const PAGE_LIMIT: Duration = Duration::from_secs(120);

/// `name` on the PATH (or `$env_var`), or a failure that says how to install it.
fn find_tool(env_var: &str, names: &[&str]) -> PathBuf {
    if let Some(p) = std::env::var_os(env_var) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{env_var}={} does not exist", p.display());
        return p;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for n in names {
            let p = dir.join(n);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "none of {names:?} is on the PATH: the dashboard's browser test needs Debian's \
         Chromium and its WebDriver (`{INSTALL}`; .ci/run installs them), or set {env_var}"
    );
}

/// chromedriver on a free port, up and answering.
fn start_chromedriver(driver: &Path, log: &Path) -> (KillOnDrop, String) {
    let port = free_port();
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", driver.display()));
    let child = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "chromedriver did not listen on port {port} within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, format!("http://127.0.0.1:{port}"))
}

async fn open_browser(webdriver: &str, chromium: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            // The controllers' certificates come from the cluster's own CA, which this
            // throw-away browser profile does not trust.
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1400,1750",
                     "--ignore-certificate-errors"],
        }),
    );
    let mut builder = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
    builder.capabilities(caps);
    let connect = builder.connect(webdriver);
    tokio::time::timeout(Duration::from_secs(60), connect)
        .await
        .expect("Chromium did not start within 60 s")
        .expect("a WebDriver session in Chromium")
}

/// What the page shows, read from its rendered text (`innerText`: what is on the screen).
const READ_PAGE: &str = r##"
const text = (sel) => { const e = document.querySelector(sel); return e ? e.innerText.trim() : null; };
const shown = (sel) => { const e = document.querySelector(sel); return !!e && e.offsetParent !== null; };
const rows = (sel) => [...document.querySelectorAll(sel + " tbody tr")];
return {
  leader: text("#leader"),
  conn: text("#conn"),
  workers: rows("#workers").map((r) => ({ id: r.dataset.worker, health: r.dataset.health, text: r.innerText })),
  epoch: text("#epoch"),
  recoveries: rows("#recoveries").map((r) => r.innerText),
  loss_points: Number(document.querySelector("#loss").dataset.points),
  loss_drawn: shown("#loss canvas"),
  heat_columns: Number(document.querySelector("#heat").dataset.columns),
  heat_shown: shown("#heat"),
  events: rows("#events").map((r) => ({ kind: r.dataset.kind, text: r.innerText })),
  cookie_visible_to_script: document.cookie.includes("phalanx_token"),
  address: location.href,
};
"##;

/// Everything a person should see after the kill; `Err` names what is still missing.
fn check(page: &Value, leader: u64, leader_address: &str, killed: &str) -> Result<(), String> {
    let at = page["address"].as_str().unwrap_or("");
    if at != format!("https://{leader_address}/ui/") {
        return Err(format!(
            "the page is at {at:?}, not on the leader's https://{leader_address}/ui/"
        ));
    }
    let leader_text = page["leader"].as_str().unwrap_or("");
    if !leader_text.starts_with(&format!("node {leader} ")) {
        return Err(format!(
            "the leader shown is {leader_text:?}, not node {leader}"
        ));
    }
    if page["conn"] != "live" {
        return Err(format!("the page is not live: {}", page["conn"]));
    }
    let workers = page["workers"].as_array().cloned().unwrap_or_default();
    if workers.len() != 4 {
        return Err(format!("{} workers shown, not 4", workers.len()));
    }
    let dead = workers.iter().find(|w| w["id"] == killed);
    if !dead.is_some_and(|w| {
        w["health"] == "failed" && w["text"].as_str().unwrap_or("").contains("failed")
    }) {
        return Err(format!("{killed} is not shown failed: {dead:?}"));
    }
    let epoch: u64 = page["epoch"]
        .as_str()
        .and_then(|e| e.parse().ok())
        .unwrap_or(0);
    if epoch < 2 {
        return Err(format!("plan epoch shown: {}", page["epoch"]));
    }
    let recoveries = page["recoveries"].as_array().cloned().unwrap_or_default();
    let with_mttr = recoveries.iter().filter_map(|r| r.as_str()).find(|r| {
        r.split("MTTR ")
            .nth(1)
            .is_some_and(|m| m.starts_with(|c: char| c.is_ascii_digit()))
    });
    if with_mttr.is_none() {
        return Err(format!("no recovery with an MTTR shown: {recoveries:?}"));
    }
    if !(page["loss_points"].as_u64().unwrap_or(0) > 1 && page["loss_drawn"] == true) {
        return Err(format!(
            "the loss curve shows {} points (drawn: {})",
            page["loss_points"], page["loss_drawn"]
        ));
    }
    if !(page["heat_columns"].as_u64().unwrap_or(0) > 1 && page["heat_shown"] == true) {
        return Err(format!(
            "the heat map shows {} columns",
            page["heat_columns"]
        ));
    }
    let events = page["events"].as_array().cloned().unwrap_or_default();
    if !events
        .iter()
        .any(|e| e["kind"] == "worker-failed" && e["text"].as_str().unwrap_or("").contains(killed))
    {
        return Err(format!(
            "no worker-failed event for {killed} in the event log"
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_a_killed_worker_its_recovery_and_the_loss_curve() {
    let chromium = find_tool(
        "PHALANX_CHROMIUM",
        &["chromium", "chromium-browser", "google-chrome"],
    );
    let driver = find_tool("PHALANX_CHROMEDRIVER", &["chromedriver"]);
    let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard");
    std::fs::create_dir_all(&shots).unwrap();

    // Four workers, no restarts (the killed one stays failed); the job outlives the test.
    let c = LocalCluster::start(4, 0);
    c.submit(&job_toml("dash", 100_000, 50, 2, 4));
    c.wait_step(10, Duration::from_secs(120));
    // The leader's id and address, as `phalanx status` sees them now.
    let leader_now = || {
        let s = c.status()?;
        let m = s.members.iter().find(|m| m.id == s.leader_id)?;
        Some((m.id, m.address.clone()))
    };
    let (mut leader, mut leader_address) = leader_now().expect("a leader");
    let killed = "w1";
    c.kill_workers_at_once(&[killed]);

    let url = c.ctl_ok(&["dashboard"]).trim().to_string();
    assert!(
        url.starts_with("https://127.0.0.1:") && url.contains("/ui/?token="),
        "{url}"
    );
    // Open it on a follower instead: the page must move itself to the leader, over https
    // (the cookie goes along: cookies do not depend on the port).
    let printed_host = url["https://".len()..]
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let follower = c
        .status()
        .expect("status")
        .members
        .into_iter()
        .find(|m| m.address != printed_host)
        .expect("another controller");
    let url = url.replacen(&printed_host, &follower.address, 1);

    let (_driver, webdriver) = start_chromedriver(&driver, &c.dir.path().join("chromedriver.log"));
    let browser = open_browser(&webdriver, &chromium).await;
    browser.goto(&url).await.expect("open the dashboard");

    let started = Instant::now();
    let (page, verdict) = loop {
        // (A page that is moving to another controller has nothing to read for a moment.)
        let page = match browser.execute(READ_PAGE, vec![]).await {
            Ok(page) => page,
            Err(e) => json!({ "error": e.to_string() }),
        };
        match check(&page, leader, &leader_address, killed) {
            Ok(()) => break (page, Ok(())),
            Err(e) if started.elapsed() > PAGE_LIMIT => break (page, Err(e)),
            Err(e) => {
                // A leader elected meanwhile (a loaded machine): the page follows it.
                let moved = e.starts_with("the page is at") && page.get("error").is_none();
                if moved || e.starts_with("the leader shown") {
                    if let Some((id, address)) = leader_now() {
                        (leader, leader_address) = (id, address);
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await
            }
        }
    };
    let png = browser.screenshot().await.expect("a screenshot");
    let shot = shots.join("dashboard.png");
    std::fs::write(&shot, &png).unwrap();
    browser.close().await.expect("close the browser");
    if let Err(e) = verdict {
        panic!(
            "after {PAGE_LIMIT:?} the dashboard does not show it: {e}\npage: {page:#}\nscreenshot: {}\n{}",
            shot.display(),
            c.logs()
        );
    }
    // The token went into an HttpOnly cookie: not in the address bar, not readable by script.
    assert!(
        !page["address"].as_str().unwrap().contains("token="),
        "{}",
        page["address"]
    );
    assert_eq!(page["cookie_visible_to_script"], false);
    eprintln!("dashboard screenshot: {}", shot.display());
}

/// One raw HTTP/1.1 exchange over TLS, anonymous at the TLS layer (as a browser is),
/// the connection closed after it: status and the whole text.
fn raw_https(tls: &phalanx_pki::TlsDir, address: &str, request: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let cfg = tls.client_config(None, &[phalanx_pki::ALPN_HTTP1]).unwrap();
    let s = std::net::TcpStream::connect(address).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = rustls::StreamOwned::new(rustls::ClientConnection::new(cfg, name).unwrap(), s);
    s.write_all(request.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, text)
}

#[test]
fn the_token_becomes_a_cookie_that_authorizes_reads_only() {
    let c = LocalCluster::start(0, 0);
    let url = c.ctl_ok(&["dashboard"]).trim().to_string();
    let tls = phalanx_pki::TlsDir::open(&c.cluster_dir().join("tls")).unwrap();
    let rest = url.strip_prefix("https://").unwrap();
    let (address, target) = rest.split_at(rest.find('/').unwrap());
    let token = target.split_once("token=").unwrap().1;
    let get = |path: &str, extra: &str| {
        raw_https(
            &tls,
            address,
            &format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n{extra}\r\n"),
        )
    };

    // The page answers with the cookie, never cached.
    // (hyper writes header names in lower case; HTTP does not care.)
    let (status, page) = get(target, "");
    let page = page.to_lowercase();
    assert_eq!(status, 200, "{page}");
    let set_cookie =
        format!("set-cookie: phalanx_token={token}; httponly; samesite=strict; path=/\r\n")
            .to_lowercase();
    assert!(page.contains(&set_cookie), "{page}");
    assert!(page.contains("cache-control: no-store\r\n"), "{page}");
    assert!(page.contains("<script src=\"app.js\">"), "{page}");
    let cookie = format!("Cookie: phalanx_token={token}\r\n");
    // The cookie reads the API and the page's files...
    for path in ["/v1/status", "/ui/app.js", "/ui/vendor/uPlot.iife.min.js"] {
        let (status, text) = get(path, &cookie);
        assert_eq!(status, 200, "GET {path} with the cookie: {text}");
        assert!(
            !text.to_lowercase().contains("set-cookie"),
            "GET {path}: {text}"
        );
    }
    // ...and changes nothing: a POST with only the cookie is refused.
    let body =
        r#"{"request_id":"dash-1","command":{"type":"set_annotation","key":"k","value":"v"}}"#;
    let (status, text) = raw_https(
        &tls,
        address,
        &format!(
            "POST /v1/command HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n{cookie}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    assert_eq!(status, 401, "a cookie authorized a POST: {text}");
    // Without a token, or with a wrong one, nothing; the page's 401 says what to open.
    for (path, extra) in [
        ("/ui/", String::new()),
        ("/ui/?token=wrong", String::new()),
        ("/v1/status", "Cookie: phalanx_token=wrong\r\n".to_string()),
    ] {
        let (status, text) = get(path, &extra);
        assert_eq!(status, 401, "GET {path} {extra:?}: {text}");
        assert!(!text.to_lowercase().contains("set-cookie"), "{text}");
    }
    assert!(get("/ui/", "").1.contains("phalanx dashboard --dir DIR"));
}
