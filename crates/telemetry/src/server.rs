//! The workers' `/metrics` server: plain HTTP/1.1 (hyper) on its own thread, numbers only,
//! meant for a Prometheus scrape on a trusted network. Bounded: at most
//! [`ServerLimits::connections_max`] connections at once (more are closed at once), a
//! deadline for the request head, and one for the whole connection; no keep-alive.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{oneshot, Semaphore};
use tracing::{debug, warn};

use crate::{TelemetryError, CONTENT_TYPE};

/// What the server answers `GET /metrics` with.
pub type Render = Arc<dyn Fn() -> Result<String, TelemetryError> + Send + Sync>;

#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    pub connections_max: usize,
    /// The request head must arrive within this.
    pub head_timeout: Duration,
    /// A connection is closed after this, whatever it is doing.
    pub connection_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            connections_max: 16,
            head_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(15),
        }
    }
}

/// A running server; dropping it stops it (within a connection timeout).
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MetricsServer {
    /// The address it listens on (the port chosen when the flag said `:0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Binds `addr` (an error names it) and serves `GET /metrics` with `render` on a thread of
/// its own.
pub fn serve(
    addr: SocketAddr,
    render: Render,
    limits: ServerLimits,
) -> Result<MetricsServer, TelemetryError> {
    let std_listener = std::net::TcpListener::bind(addr)
        .map_err(|e| TelemetryError::Server(format!("cannot listen on {addr}: {e}")))?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| TelemetryError::Server(format!("{addr}: {e}")))?;
    let local = std_listener
        .local_addr()
        .map_err(|e| TelemetryError::Server(format!("{addr}: {e}")))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| TelemetryError::Server(format!("runtime: {e}")))?;
    let (stop_tx, stop_rx) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(std_listener) {
                    Ok(l) => accept_loop(l, render, limits, stop_rx).await,
                    Err(e) => warn!(error = %e, "metrics server: listener"),
                }
            })
        })
        .map_err(|e| TelemetryError::Server(format!("thread: {e}")))?;
    Ok(MetricsServer {
        addr: local,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    render: Render,
    limits: ServerLimits,
    mut stop: oneshot::Receiver<()>,
) {
    let slots = Arc::new(Semaphore::new(limits.connections_max.max(1)));
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stop => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "metrics server: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "metrics server: connection cap reached; closed");
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let render = render.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&req, &render)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.head_timeout)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(limits.connection_timeout, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, error = %e, "metrics server: connection"),
                Err(_) => debug!(%peer, "metrics server: connection timed out"),
            }
            drop(permit);
        });
    }
}

fn answer(req: &Request<Incoming>, render: &Render) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(CONTENT_TYPE),
        );
        r
    };
    if req.uri().path().trim_end_matches('/') != "/metrics" {
        return text(
            StatusCode::NOT_FOUND,
            format!(
                "no route {}: this server has only GET /metrics\n",
                req.uri().path()
            ),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} /metrics: only GET\n", req.method()),
        );
    }
    match render() {
        Ok(body) => text(StatusCode::OK, body),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// Turns on this process's worker metrics and serves them at `addr`.
pub fn serve_worker(addr: SocketAddr, instance: &str) -> Result<MetricsServer, TelemetryError> {
    let m = crate::worker::install(crate::worker::WorkerMetrics::new(instance)?);
    serve(addr, Arc::new(move || m.render()), ServerLimits::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    #[test]
    fn it_serves_metrics_refuses_other_paths_and_closes_idle_connections() {
        let m = Arc::new(crate::worker::WorkerMetrics::new("srv-test").unwrap());
        m.plan_epoch(7);
        let mm = m.clone();
        let limits = ServerLimits {
            connections_max: 2,
            head_timeout: Duration::from_millis(300),
            connection_timeout: Duration::from_secs(2),
        };
        let srv = serve(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(move || mm.render()),
            limits,
        )
        .unwrap();
        let addr = srv.local_addr();
        let ok = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
        assert!(ok.contains("phalanx_train_plan_epoch 7"), "{ok}");
        let missing = get(addr, "GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = get(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        );
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        // A client that never sends its request is cut off at the head deadline.
        let t = std::time::Instant::now();
        let mut idle = std::net::TcpStream::connect(addr).unwrap();
        idle.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = Vec::new();
        let _ = idle.read_to_end(&mut buf);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        drop(srv);
    }

    #[test]
    fn a_taken_address_is_an_error_that_names_it() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let e = serve(
            addr,
            Arc::new(|| Ok(String::new())),
            ServerLimits::default(),
        )
        .err()
        .expect("the port is taken");
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }
}
