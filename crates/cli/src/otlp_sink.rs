//! A minimal OTLP/HTTP sink for `phalanx bench train --telemetry-overhead`: it accepts
//! `POST /v1/traces` on 127.0.0.1, reads each body and answers `200`, counting requests
//! and bytes, so that the runs with traces on export for real (over loopback) without a
//! collector. Not a collector: nothing is decoded or kept.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Requests and body bytes received so far.
#[derive(Default)]
pub struct Counts {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    stop: AtomicBool,
}

/// A running sink; stops accepting when dropped.
pub struct Sink {
    pub endpoint: String,
    pub counts: Arc<Counts>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.counts.stop.store(true, Ordering::SeqCst);
    }
}

/// One HTTP/1.1 request on a keep-alive connection: its body length, or None at the end.
fn one_request(r: &mut BufReader<TcpStream>) -> Option<u64> {
    let mut len = 0u64;
    let mut line = String::new();
    let mut first = true;
    loop {
        line.clear();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let l = line.trim_end();
        if l.is_empty() {
            if first {
                return None;
            }
            break;
        }
        first = false;
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().ok()?;
            }
        }
    }
    // A body larger than 64 MiB is not an OTLP batch of ours: drop the connection.
    if len > 64 << 20 {
        return None;
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).ok()?;
    Some(len)
}

fn serve(stream: TcpStream, counts: Arc<Counts>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut w) = stream.try_clone() else {
        return;
    };
    let mut r = BufReader::new(stream);
    while let Some(len) = one_request(&mut r) {
        counts.requests.fetch_add(1, Ordering::Relaxed);
        counts.bytes.fetch_add(len, Ordering::Relaxed);
        let ok =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if w.write_all(ok).is_err() {
            return;
        }
    }
}

/// Starts the sink on an ephemeral port of 127.0.0.1.
pub fn start() -> std::io::Result<Sink> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    listener.set_nonblocking(true)?;
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    std::thread::Builder::new()
        .name("otlp-sink".into())
        .spawn(move || {
            while !c.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let c = c.clone();
                        let _ = std::thread::Builder::new()
                            .name("otlp-sink-conn".into())
                            .spawn(move || serve(s, c));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })?;
    Ok(Sink { endpoint, counts })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sink_answers_two_requests_on_one_connection_and_counts_them() {
        let sink = start().unwrap();
        let addr = sink.endpoint.trim_start_matches("http://").to_string();
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        for body in ["abc", "hello"] {
            write!(
                s,
                "POST /v1/traces HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            let mut got = [0u8; 15];
            s.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"HTTP/1.1 200 OK");
            let mut rest = Vec::new();
            let mut b = [0u8; 1];
            while !rest.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut b).unwrap();
                rest.push(b[0]);
            }
        }
        assert_eq!(sink.counts.requests.load(Ordering::Relaxed), 2);
        assert_eq!(sink.counts.bytes.load(Ordering::Relaxed), 8);
    }
}
