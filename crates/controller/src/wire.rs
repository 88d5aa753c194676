//! Pure decoders for the two wire formats on the controller port:
//! - peer frames: the magic `PHXR` once, then `[u32 big-endian length][payload]` frames;
//! - HTTP/1.1 requests and responses (one request per connection, `Content-Length` bodies).
//!
//! Both take bytes and limits and return a typed error on bad input; neither panics.

use thiserror::Error;

pub const PEER_MAGIC: &[u8; 4] = b"PHXR";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds frame_bytes_max {max}")]
    TooLarge { len: u64, max: u64 },
}

pub fn encode_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Decode one frame from the start of `buf`: `Ok(None)` when more bytes are needed,
/// `Ok(Some((payload, consumed)))` otherwise.
pub fn decode_frame(
    buf: &[u8],
    frame_bytes_max: u64,
) -> Result<Option<(&[u8], usize)>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as u64;
    if len > frame_bytes_max {
        return Err(FrameError::TooLarge {
            len,
            max: frame_bytes_max,
        });
    }
    let end = 4 + len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((&buf[4..end], end)))
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HttpError {
    #[error("headers exceed header_bytes_max {0}")]
    HeadersTooLarge(usize),
    #[error("body of {len} bytes exceeds body_bytes_max {max}")]
    BodyTooLarge { len: usize, max: usize },
    #[error("malformed request: {0}")]
    Malformed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub header_bytes_max: usize,
    pub body_bytes_max: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_bytes_max: 16 * 1024,
            body_bytes_max: 1024 * 1024,
        }
    }
}

fn find_header_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn parse_headers(text: &str) -> Result<Vec<(String, String)>, HttpError> {
    let mut headers = Vec::new();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        let (k, v) = line.split_once(':').ok_or_else(|| {
            HttpError::Malformed(format!("header line without ':': {:.60}", line))
        })?;
        if k.is_empty() || k.contains(' ') {
            return Err(HttpError::Malformed(format!("bad header name {:.60}", k)));
        }
        headers.push((k.to_string(), v.trim().to_string()));
    }
    Ok(headers)
}

fn content_length(headers: &[(String, String)], max: usize) -> Result<usize, HttpError> {
    match headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        None => Ok(0),
        Some((_, v)) => {
            let len: usize = v
                .parse()
                .map_err(|_| HttpError::Malformed(format!("bad Content-Length {:.30}", v)))?;
            if len > max {
                return Err(HttpError::BodyTooLarge { len, max });
            }
            Ok(len)
        }
    }
}

/// Parse one HTTP request from `buf`: `Ok(None)` when more bytes are needed.
pub fn parse_request(buf: &[u8], limits: HttpLimits) -> Result<Option<Request>, HttpError> {
    let Some(head_end) = find_header_end(buf) else {
        if buf.len() > limits.header_bytes_max {
            return Err(HttpError::HeadersTooLarge(limits.header_bytes_max));
        }
        return Ok(None);
    };
    if head_end > limits.header_bytes_max {
        return Err(HttpError::HeadersTooLarge(limits.header_bytes_max));
    }
    let head = std::str::from_utf8(&buf[..head_end - 4])
        .map_err(|_| HttpError::Malformed("headers are not UTF-8".into()))?;
    let (request_line, rest) = head.split_once("\r\n").unwrap_or((head, ""));
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed(format!(
            "bad request line {:.80}",
            request_line
        )));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed(format!(
            "unsupported version {:.20}",
            version
        )));
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(HttpError::Malformed(format!("bad method {:.20}", method)));
    }
    if !target.starts_with('/') {
        return Err(HttpError::Malformed(
            "request target must start with '/'".into(),
        ));
    }
    let headers = parse_headers(rest)?;
    if headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && !v.eq_ignore_ascii_case("identity")
    }) {
        return Err(HttpError::Malformed(
            "chunked bodies are not supported; send Content-Length".into(),
        ));
    }
    let len = content_length(&headers, limits.body_bytes_max)?;
    if buf.len() < head_end + len {
        return Ok(None);
    }
    let (path, qs) = target.split_once('?').unwrap_or((target, ""));
    let query = qs
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    Ok(Some(Request {
        method: method.to_string(),
        path: path.to_string(),
        query,
        headers,
        body: buf[head_end..head_end + len].to_vec(),
    }))
}

pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        421 => "Misdirected Request",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

pub fn encode_response(status: u16, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason_phrase(status),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// Parse a complete response (the server closes the connection after it).
pub fn parse_response(
    buf: &[u8],
    body_bytes_max: usize,
) -> Result<Option<(u16, Vec<u8>)>, HttpError> {
    let Some(head_end) = find_header_end(buf) else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end - 4])
        .map_err(|_| HttpError::Malformed("response headers are not UTF-8".into()))?;
    let (status_line, rest) = head.split_once("\r\n").unwrap_or((head, ""));
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| HttpError::Malformed(format!("bad status line {:.60}", status_line)))?;
    let headers = parse_headers(rest)?;
    let len = content_length(&headers, body_bytes_max)?;
    if buf.len() < head_end + len {
        return Ok(None);
    }
    Ok(Some((status, buf[head_end..head_end + len].to_vec())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_request_with_body_and_query() {
        let raw = b"POST /v1/command?x=1&y HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t\r\nContent-Length: 2\r\n\r\n{}";
        let r = parse_request(raw, HttpLimits::default()).unwrap().unwrap();
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/v1/command");
        assert_eq!(r.query_param("x"), Some("1"));
        assert_eq!(r.header("authorization"), Some("Bearer t"));
        assert_eq!(r.body, b"{}");
        assert_eq!(
            parse_request(&raw[..raw.len() - 1], HttpLimits::default()).unwrap(),
            None
        );
    }

    #[test]
    fn rejects_oversized_and_malformed() {
        let lim = HttpLimits {
            header_bytes_max: 64,
            body_bytes_max: 10,
        };
        assert!(matches!(
            parse_request(b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n", lim),
            Err(HttpError::BodyTooLarge { .. })
        ));
        assert!(matches!(
            parse_request(&[b'a'; 100], lim),
            Err(HttpError::HeadersTooLarge(_))
        ));
        assert!(parse_request(b"GARBAGE\r\n\r\n", lim).is_err());
        assert!(parse_request(b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", lim).is_err());
        assert!(matches!(
            decode_frame(&[0xff, 0xff, 0xff, 0xff], 1024),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn frame_roundtrip() {
        let f = encode_frame(b"hello");
        assert_eq!(decode_frame(&f, 100).unwrap(), Some((&b"hello"[..], 9)));
        assert_eq!(decode_frame(&f[..6], 100).unwrap(), None);
    }

    proptest! {
        #[test]
        fn request_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_request(&bytes, HttpLimits { header_bytes_max: 256, body_bytes_max: 128 });
            let _ = parse_response(&bytes, 128);
        }

        #[test]
        fn request_decoder_never_panics_on_near_valid(
            method in "[A-Z]{0,7}", path in "[ -~]{0,40}", hdr in "[ -~]{0,40}", body in "[ -~]{0,40}", cl in 0usize..100
        ) {
            let raw = format!("{method} {path} HTTP/1.1\r\n{hdr}\r\nContent-Length: {cl}\r\n\r\n{body}");
            let _ = parse_request(raw.as_bytes(), HttpLimits::default());
        }

        #[test]
        fn frame_decoder_never_panics_and_roundtrips(bytes in proptest::collection::vec(any::<u8>(), 0..300), payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_frame(&bytes, 128);
            let f = encode_frame(&payload);
            let (p, used) = decode_frame(&f, 1 << 20).unwrap().unwrap();
            prop_assert_eq!(p, &payload[..]);
            prop_assert_eq!(used, f.len());
        }
    }
}
