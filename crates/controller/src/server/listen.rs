//! The controller's one port: connections are capped, then (with TLS) the handshake says
//! what a connection is: ALPN `phalanx-raft/1` with a controller certificate is a Raft link
//! from the node the certificate names; everything else is HTTP/1.1 for the API, served by
//! hyper, whose caller is the role of its client certificate (or a token). In `--insecure`
//! mode, peer links start with the magic `PHXR` and anything else is HTTP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::{Extension, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use phalanx_pki::{peer_role, Role, ALPN_RAFT};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info_span, warn, Instrument};

use super::api::{self, ConnInfo};
use super::security::{Principal, Security};
use super::transport::{handle_peer, set_peer_socket_options};
use super::ConnCtx;
use crate::wire::PEER_MAGIC;

/// A TLS handshake (or the first bytes of a plain connection) must arrive within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A request's headers must arrive within this (hyper's header read timeout).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

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
    serve_http(tls, ConnInfo { peer, cert }, api).await;
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
        serve_http(stream, ConnInfo { peer, cert: None }, api).await;
    }
}

async fn serve_http<S>(s: S, conn: ConnInfo, api: Router)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let span = info_span!("api", peer = %conn.peer);
    let svc = TowerToHyperService::new(api.layer(Extension(conn)));
    let r = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(s), svc)
        .instrument(span)
        .await;
    if let Err(e) = r {
        debug!(%e, "API connection ended with an error");
    }
}
