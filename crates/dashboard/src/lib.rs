//! The live dashboard that every controller serves under `/ui/`: one page, its script and
//! style, and the charting library (uPlot, vendored from npm under `assets/vendor/` with
//! its licence), all embedded in the binary. Nothing is fetched at run time.
//!
//! The page polls the controller's JSON API (`/v1/status`, `/v1/events`) with the
//! browser's cookie. This crate knows no HTTP server: the controller's router asks it for
//! an [`asset`], and for the cookie that carries the token ([`session_cookie`],
//! [`token_from_cookie`]); whatever the HTTP stack, those three calls are the whole
//! contract.
//!
//! Authentication: the page is opened as `/ui/?token=T` (the address `phalanx dashboard`
//! prints); the server checks T like a bearer token and answers with
//! `Set-Cookie: phalanx_token=T; HttpOnly; SameSite=Strict; Path=/`. The page then drops
//! the token from the address bar, and its requests carry the cookie. The server accepts
//! the cookie for reads (`GET`) only: a cookie travels with every request the browser
//! makes, so it must never authorize a change of the cluster.

/// The cookie that carries the token.
pub const COOKIE: &str = "phalanx_token";

/// Where the dashboard lives on a controller.
pub const PREFIX: &str = "/ui";

/// The most bytes of a token this crate accepts from a query or a cookie.
pub const TOKEN_BYTES_MAX: usize = 512;

/// The 401 message of a dashboard path without a valid token.
pub const UNAUTHORIZED: &str = "missing or wrong cluster token: open the address that \
    `phalanx dashboard --dir DIR` prints (its ?token= is kept in a cookie by the page)";

/// An embedded file: its `Content-Type` and bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asset {
    pub content_type: &'static str,
    pub body: &'static [u8],
}

const INDEX: Asset = Asset {
    content_type: "text/html; charset=utf-8",
    body: include_bytes!("../assets/index.html"),
};

const FILES: &[(&str, Asset)] = &[
    ("/", INDEX),
    ("/index.html", INDEX),
    (
        "/app.js",
        Asset {
            content_type: "text/javascript; charset=utf-8",
            body: include_bytes!("../assets/app.js"),
        },
    ),
    (
        "/style.css",
        Asset {
            content_type: "text/css; charset=utf-8",
            body: include_bytes!("../assets/style.css"),
        },
    ),
    (
        "/vendor/uPlot.iife.min.js",
        Asset {
            content_type: "text/javascript; charset=utf-8",
            body: include_bytes!("../assets/vendor/uPlot.iife.min.js"),
        },
    ),
    (
        "/vendor/uPlot.min.css",
        Asset {
            content_type: "text/css; charset=utf-8",
            body: include_bytes!("../assets/vendor/uPlot.min.css"),
        },
    ),
    (
        "/vendor/uPlot.LICENSE",
        Asset {
            content_type: "text/plain; charset=utf-8",
            body: include_bytes!("../assets/vendor/uPlot.LICENSE"),
        },
    ),
];

/// Is `path` (the request's path, without its query) the dashboard's?
pub fn is_ui_path(path: &str) -> bool {
    path == PREFIX || path.starts_with("/ui/")
}

/// The embedded file at `path` (`/ui`, `/ui/`, `/ui/app.js`, ...); `None` for any other
/// path. `/ui` and `/ui/` are the page.
pub fn asset(path: &str) -> Option<Asset> {
    let rest = path.strip_prefix(PREFIX)?;
    let rest = if rest.is_empty() { "/" } else { rest };
    FILES.iter().find(|(p, _)| *p == rest).map(|(_, a)| *a)
}

/// Headers every dashboard answer carries: no caching of a page whose address may hold
/// the token, no referrer that could leak it, no framing, scripts and styles from this
/// controller only.
pub const SECURITY_HEADERS: &[(&str, &str)] = &[
    ("Cache-Control", "no-store"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Content-Type-Options", "nosniff"),
    (
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
];

/// The headers of the answer that serves `asset`: its type, [`SECURITY_HEADERS`] and,
/// when the request carried a valid token in its query, the cookie that keeps it.
pub fn headers(asset: &Asset, token_to_keep: Option<&str>) -> Vec<(&'static str, String)> {
    let mut h = vec![("Content-Type", asset.content_type.to_string())];
    h.extend(SECURITY_HEADERS.iter().map(|(k, v)| (*k, v.to_string())));
    if let Some(t) = token_to_keep {
        h.push(("Set-Cookie", session_cookie(t)));
    }
    h
}

/// The `Set-Cookie` value that hands `token` to the browser (percent-encoded, so any
/// token is a valid cookie value).
pub fn session_cookie(token: &str) -> String {
    format!(
        "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/",
        percent_encode(token)
    )
}

/// The token in a `Cookie` request header (`a=1; phalanx_token=T; b=2`), decoded; `None`
/// when there is none, or when it is not valid percent-encoded UTF-8 of at most
/// [`TOKEN_BYTES_MAX`] bytes.
pub fn token_from_cookie(header: &str) -> Option<String> {
    header
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .and_then(|(_, v)| percent_decode(v.trim().trim_matches('"')))
}

/// The `token` query parameter's raw value, decoded (`None` when it is not valid
/// percent-encoded UTF-8 of at most [`TOKEN_BYTES_MAX`] bytes).
pub fn token_from_query(raw: &str) -> Option<String> {
    percent_decode(raw)
}

/// The dashboard's address on the controller at `address` (`host:port`), with the token
/// in its query.
pub fn url(address: &str, token: &str) -> String {
    format!("https://{address}{PREFIX}/?token={}", percent_encode(token))
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
        if out.len() > TOKEN_BYTES_MAX {
            return None;
        }
    }
    let t = String::from_utf8(out).ok()?;
    (!t.is_empty()).then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_asset_is_embedded_with_its_type() {
        for p in ["/ui", "/ui/", "/ui/index.html"] {
            let a = asset(p).unwrap();
            assert!(a.content_type.starts_with("text/html"));
            assert!(std::str::from_utf8(a.body).unwrap().contains("app.js"));
        }
        let js = asset("/ui/app.js").unwrap();
        assert!(js.content_type.starts_with("text/javascript"));
        let uplot = asset("/ui/vendor/uPlot.iife.min.js").unwrap();
        assert!(std::str::from_utf8(uplot.body).unwrap().contains("uPlot"));
        assert!(asset("/ui/vendor/uPlot.min.css").is_some());
        assert!(asset("/ui/vendor/uPlot.LICENSE").is_some());
        for p in ["/ui/../token", "/ui/missing.js", "/v1/status", "/uix", "/"] {
            assert_eq!(asset(p), None, "{p}");
        }
        assert!(is_ui_path("/ui") && is_ui_path("/ui/app.js") && !is_ui_path("/uix"));
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        let text = |p: &str| String::from_utf8_lossy(asset(p).unwrap().body).into_owned();
        let html = text("/ui/");
        for attr in ["src=\"", "href=\""] {
            for (k, part) in html.split(attr).enumerate().skip(1) {
                let target = part.split('"').next().unwrap();
                assert!(
                    !target.contains(':') && !target.starts_with('/'),
                    "index.html {attr}{target}\" (#{k}) is not one of this crate's files"
                );
                assert!(asset(&format!("/ui/{target}")).is_some(), "{target}");
            }
        }
        let js = text("/ui/app.js");
        assert!(js.contains("getJson(\"/v1/status\")"));
        for call in js.split("getJson(").skip(2) {
            assert!(
                call.starts_with("\"/v1/") || call.starts_with("`/v1/"),
                "{call:.40}"
            );
        }
        assert!(!js.contains("fetch(\"http") && !js.contains("import("));
        let css = text("/ui/style.css");
        assert!(!css.contains("@import") && !css.contains("url("));
    }

    #[test]
    fn answers_set_the_cookie_only_when_asked_and_always_forbid_caching() {
        let page = asset("/ui/").unwrap();
        let h = headers(&page, Some("t0k"));
        let get = |k: &str| h.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("Content-Type"), Some(page.content_type));
        assert_eq!(get("Cache-Control"), Some("no-store"));
        assert_eq!(get("Referrer-Policy"), Some("no-referrer"));
        assert_eq!(
            get("Set-Cookie"),
            Some("phalanx_token=t0k; HttpOnly; SameSite=Strict; Path=/")
        );
        assert!(!headers(&page, None).iter().any(|(k, _)| *k == "Set-Cookie"));
    }

    #[test]
    fn the_cookie_round_trips_any_token() {
        for t in ["3fa9c0", "a b;c=d,\"é\"", "%41"] {
            let set = session_cookie(t);
            assert!(
                set.ends_with("; HttpOnly; SameSite=Strict; Path=/"),
                "{set}"
            );
            let value = set.split(';').next().unwrap();
            assert!(!value.contains(' ') && !value[COOKIE.len() + 1..].contains('='));
            let header = format!("theme=dark; {value}; other=1");
            assert_eq!(token_from_cookie(&header).as_deref(), Some(t));
        }
        assert_eq!(token_from_cookie("theme=dark"), None);
        assert_eq!(token_from_cookie("phalanx_token="), None);
        assert_eq!(token_from_cookie("phalanx_token=%zz"), None);
        assert_eq!(token_from_cookie("phalanx_token=%ff%fe"), None);
        let long = format!("phalanx_token={}", "a".repeat(TOKEN_BYTES_MAX + 1));
        assert_eq!(token_from_cookie(&long), None);
    }

    #[test]
    fn the_url_carries_the_encoded_token() {
        let u = url("127.0.0.1:7000", "a&b");
        assert_eq!(u, "https://127.0.0.1:7000/ui/?token=a%26b");
        let raw = u.split_once("token=").unwrap().1;
        assert_eq!(token_from_query(raw).as_deref(), Some("a&b"));
        assert_eq!(token_from_query("%4"), None);
    }
}
