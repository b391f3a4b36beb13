//! Serving HTTP(S) with limits that hold against slow or greedy clients:
//! the TLS handshake and the request head each have a deadline, the head
//! has a size limit, and connections are capped in total and per client
//! address. (`axum::serve` sets none of these: a client sending its headers
//! one byte a minute would hold a connection forever.)

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::{fingerprint, PeerInfo};

/// What one server allows its clients.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// The TLS handshake must finish within this.
    pub handshake_timeout: Duration,
    /// A request's head (request line and headers) must arrive within this;
    /// an idle keep-alive connection is closed after it too (hyper counts
    /// from when the connection waits for the next request). NovaCron's
    /// clients drop pooled connections sooner (`novacron_api::POOL_IDLE_TIMEOUT`),
    /// so they never send a request on one the server is closing.
    pub header_read_timeout: Duration,
    /// Largest request head, in bytes (hyper answers 431 above it).
    pub max_header_bytes: usize,
    /// Most headers in one request.
    pub max_headers: usize,
    /// Connections open at once, in total and from one address; more are
    /// closed as they arrive.
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Requests in flight at once on one HTTP/2 connection.
    pub max_http2_streams: u32,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 << 10,
            max_headers: 100,
            max_connections: 1024,
            max_connections_per_ip: 256,
            max_http2_streams: 128,
        }
    }
}

/// Open connections, in total and per client address.
#[derive(Default)]
struct Counts {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
}

/// A connection's place in [`Counts`], given back when it closes.
struct Slot {
    counts: Arc<Mutex<Counts>>,
    ip: IpAddr,
}

impl Slot {
    fn take(counts: &Arc<Mutex<Counts>>, ip: IpAddr, limits: &ServeLimits) -> Option<Slot> {
        let mut c = counts.lock();
        let mine = c.by_ip.get(&ip).copied().unwrap_or(0);
        if c.total >= limits.max_connections || mine >= limits.max_connections_per_ip {
            return None;
        }
        c.total += 1;
        c.by_ip.insert(ip, mine + 1);
        Some(Slot {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.by_ip.remove(&self.ip);
            }
        }
    }
}

/// Serves `router` on `tcp` (TLS with `tls`, else plain HTTP) until
/// `shutdown`; then stops accepting and lets open requests finish.
/// Handlers see the client as `ConnectInfo<PeerInfo>`.
pub async fn serve(
    tcp: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    router: Router,
    limits: ServeLimits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let mut http = Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers);
    // Spoken only where TLS offers it (the API's listener).
    http.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_http2_streams)
        .max_header_list_size(limits.max_header_bytes.try_into().unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let http = Arc::new(http);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let counts = Arc::new(Mutex::new(Counts::default()));
    loop {
        let (stream, addr) = tokio::select! {
            accepted = tcp.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off, as axum does.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => {
                // Open requests finish (streams such as watches are told to
                // end); the caller bounds how long that may take.
                while counts.lock().total > 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                return Ok(());
            }
        };
        let Some(slot) = Slot::take(&counts, addr.ip(), &limits) else {
            tracing::debug!(peer = %addr, "too many connections; closed");
            continue;
        };
        let (http, acceptor, router, shutdown) = (http.clone(), acceptor.clone(), router.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let _ = stream.set_nodelay(true);
            match acceptor {
                None => {
                    let peer = PeerInfo {
                        addr,
                        cert_sha256: None,
                        cert_common_name: None,
                    };
                    connection(&http, TokioIo::new(stream), peer, router, shutdown).await
                }
                Some(acceptor) => {
                    let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => return tracing::debug!(peer = %addr, error = %e, "TLS handshake refused"),
                        Err(_) => return tracing::debug!(peer = %addr, "TLS handshake timed out"),
                    };
                    let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
                    let peer = PeerInfo {
                        addr,
                        cert_sha256: cert.map(|c| fingerprint(c.as_ref())),
                        // The handshake checked the chain: the name is the CA's word.
                        cert_common_name: cert.and_then(|c| crate::der::subject_common_name(c.as_ref()).ok()),
                    };
                    connection(&http, TokioIo::new(tls), peer, router, shutdown).await
                }
            }
        });
    }
}

async fn connection<I>(
    http: &Builder<TokioExecutor>,
    io: I,
    peer: PeerInfo,
    router: Router,
    shutdown: CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let addr: SocketAddr = peer.addr;
    let service = router.map_request(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer.clone()));
        req
    });
    let conn = http.serve_connection_with_upgrades(io, TowerToHyperService::new(service));
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(peer = %addr, error = %e, "connection ended with an error");
    }
}
