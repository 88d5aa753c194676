//! The controller's one port: connections are capped, then (with TLS) the handshake says
//! what a connection is: ALPN `phalanx-raft/1` with a controller certificate is a Raft link
//! from the node the certificate names; everything else is HTTP/1.1 for the API, served by
//! hyper, whose caller is the role of its client certificate (or a token). In `--insecure`
//! mode, peer links start with the magic `PHXR` and anything else is HTTP.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::{Extension, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use phalanx_pki::{peer_role, Role, ALPN_RAFT};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info_span, warn, Instrument};

use super::api::{self, ConnInfo};
use super::security::{Principal, Security};
use super::transport::{handle_peer, set_peer_socket_options};
use super::{ConnCtx, HttpLimits};
use crate::wire::PEER_MAGIC;

/// A TLS handshake (or the first bytes of a plain connection) must arrive within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn accept_loop(listener: TcpListener, ctx: Arc<ConnCtx>) {
    let permits = Arc::new(Semaphore::new(ctx.cfg.http.connections_max.max(1)));
    let acceptor = match &ctx.cfg.security {
        Security::Tls(t) => Some(TlsAcceptor::from(t.server.clone())),
        Security::Insecure { .. } => None,
    };
    let api = api::router(ctx.clone());
    let mut last_cap_warning: Option<Instant> = None;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(%e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if last_cap_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                warn!(%peer, cap = ctx.cfg.http.connections_max, "connection cap reached; new connections are closed");
                last_cap_warning = Some(Instant::now());
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (ctx, acceptor, api) = (ctx.clone(), acceptor.clone(), api.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match acceptor {
                Some(acc) => serve_tls(stream, peer, ctx, acc, api).await,
                None => serve_plain(stream, peer, ctx, api).await,
            }
        });
    }
}

async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<ConnCtx>,
    acc: TlsAcceptor,
    api: Router,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acc.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            // Plain TCP, a certificate of another CA, a client that gave up.
            debug!(%peer, %e, "TLS handshake refused");
            return;
        }
        Err(_) => {
            debug!(%peer, "no TLS handshake in time; closed");
            return;
        }
    };
    let Security::Tls(sec) = &ctx.cfg.security else {
        return;
    };
    let (tcp, conn) = tls.get_ref();
    let cert = conn
        .peer_certificates()
        .map(|c| peer_role(c, sec.dir.cluster_id()));
    if conn.alpn_protocol() == Some(ALPN_RAFT) {
        match cert {
            Some(Ok(Role::Controller(id))) => {
                set_peer_socket_options(tcp, ctx.cfg.peer_liveness());
                handle_peer(tls, peer, ctx.clone(), Some(id)).await;
            }
            other => {
                let who = match other {
                    None => "no certificate".to_string(),
                    Some(Ok(r)) => format!("a {r} certificate"),
                    Some(Err(e)) => e.to_string(),
                };
                warn!(%peer, %who, "Raft connection refused: it needs a controller certificate");
            }
        }
        return;
    }
    let cert = match cert {
        None => None,
        Some(Ok(r)) => Some(Principal::from_role(r)),
        Some(Err(e)) => {
            warn!(%peer, %e, "API connection refused: its certificate names no role");
            return;
        }
    };
    serve_http(tls, ConnInfo { peer, cert }, api, ctx.cfg.http).await;
}

async fn serve_plain(mut stream: TcpStream, peer: SocketAddr, ctx: Arc<ConnCtx>, api: Router) {
    let mut first = [0u8; 4];
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    // Peek until 4 bytes arrived (or the client sent fewer and waits: then treat as HTTP).
    loop {
        match tokio::time::timeout(Duration::from_millis(200), stream.peek(&mut first)).await {
            Ok(Ok(0)) => return,
            Ok(Ok(n)) if n >= 4 => break,
            Ok(Ok(_)) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            _ => return,
        }
    }
    if &first == PEER_MAGIC {
        set_peer_socket_options(&stream, ctx.cfg.peer_liveness());
        handle_peer(stream, peer, ctx, None).await;
    } else {
        let _ = &mut stream;
        serve_http(stream, ConnInfo { peer, cert: None }, api, ctx.cfg.http).await;
    }
}

async fn serve_http<S>(s: S, conn: ConnInfo, api: Router, limits: HttpLimits)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let span = info_span!("api", peer = %conn.peer);
    let peer = conn.peer;
    let svc = TowerToHyperService::new(api.layer(Extension(conn)));
    let (io, moved) = Moving::new(s);
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.header_timeout_ms.max(1)))
        .serve_connection(TokioIo::new(io), svc)
        .instrument(span);
    tokio::pin!(served);
    let idle_max = Duration::from_millis(limits.idle_max_ms.max(1));
    let check = (idle_max / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        tokio::select! {
            r = served.as_mut() => {
                if let Err(e) = r {
                    debug!(%e, "API connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep(check) => {
                if moved.idle() >= idle_max {
                    // Dropping the connection closes it, whatever it was waiting on.
                    debug!(%peer, idle_ms = idle_max.as_millis() as u64, "API connection idle; closed");
                    return;
                }
            }
        }
    }
}

/// A stream that notes when it last moved a byte, either way.
struct Moving<S> {
    inner: S,
    moved: Arc<Moved>,
}

/// When a [`Moving`] stream last moved a byte, in ms since it was made.
struct Moved {
    since: Instant,
    last_ms: AtomicU64,
}

impl Moved {
    fn touch(&self) {
        let ms = self.since.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.since.elapsed().saturating_sub(last)
    }
}

impl<S> Moving<S> {
    fn new(inner: S) -> (Self, Arc<Moved>) {
        let moved = Arc::new(Moved {
            since: Instant::now(),
            last_ms: AtomicU64::new(0),
        });
        (
            Moving {
                inner,
                moved: moved.clone(),
            },
            moved,
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Moving<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Moving<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.moved.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.moved.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
