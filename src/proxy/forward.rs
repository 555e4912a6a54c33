//! The forwarder's parts that are built once: upstream connection pools (one
//! per TLS/connect setting and upstream origin), the parsed upstream target
//! of each route, and the upgrade tunnel.
//!
//! Knows nothing of tokens or routing; the request pipeline in `mod.rs`
//! drives it.

use super::body::{BoxError, ProxyBody};
use crate::egress::EgressConnector;
use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::Connection as _;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower_service::Service as _;

pub(crate) type HttpsConnect = HttpsConnector<EgressConnector>;

/// Pooled connections idle out before common upstream keep-alive timeouts
/// (60 s and more), so we rarely write into a connection the peer closed.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why [`super::Proxy::new`] failed. Names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum ProxyBuildError {
    #[error("{}: certificate rejected", path.display())]
    Cert {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("route {route}: upstream needs a scheme and an authority")]
    Upstream { route: String },
    #[error("TLS setup failed")]
    Tls(#[from] rustls::Error),
    #[error("TLS files")]
    TlsFiles(#[from] crate::tls::TlsError),
}

/// What makes two routes need different clients.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ClientKey {
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// Upgrades need HTTP/1.1 end to end: no `h2` in ALPN.
    pub h1_only: bool,
}

pub(crate) fn build_connector(
    key: &ClientKey,
    egress_proxy: Option<&http::Uri>,
) -> Result<HttpsConnect, ProxyBuildError> {
    let tls = crate::tls::client_config(key.ca_file.as_deref(), None, &[])?;
    let http = EgressConnector::new(egress_proxy, key.connect_timeout);

    // Plain http is allowed here; config validation only lets it through
    // for loopback upstreams or `allow_plaintext`.
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    Ok(if key.h1_only {
        // No ALPN at all: the server then speaks HTTP/1.1.
        builder
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http)
    } else {
        builder
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http)
    })
}

thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks this thread as proxy worker `index` (0: the main runtime's): each
/// worker keeps its own upstream connections, driven by its own runtime.
pub fn set_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// Why a request could not be exchanged with the upstream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    #[error("connect")]
    Connect(#[source] BoxError),
    #[error("request")]
    Request(#[source] hyper::Error),
}

impl SendError {
    /// Nothing reached the upstream: no connection was made.
    pub(crate) fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }
}

/// Connections to one upstream origin with one TLS/connect setting. An
/// HTTP/1.1 connection carries one request at a time and goes back to the
/// pool (most recently used first) when its response body is done; an
/// HTTP/2 connection (ALPN) is shared. Per request: one short lock to check
/// out and one to put back; nothing is spawned.
pub(crate) struct Pool {
    connector: HttpsConnect,
    /// Scheme and authority: what the connector dials.
    origin: Uri,
    /// One per worker thread: a connection is driven by the runtime that
    /// opened it, so a worker only uses its own (no cross-thread wake-ups).
    workers: Box<[WorkerConns]>,
}

#[derive(Default)]
struct WorkerConns {
    idle: parking_lot::Mutex<Vec<(http1::SendRequest<ProxyBody>, Instant)>>,
    h2: parking_lot::Mutex<Option<http2::SendRequest<ProxyBody>>>,
}

enum Sender {
    H1(http1::SendRequest<ProxyBody>),
    H2(http2::SendRequest<ProxyBody>),
}

impl Pool {
    pub(crate) fn new(
        connector: HttpsConnect,
        scheme: Scheme,
        authority: Authority,
        workers: usize,
    ) -> Pool {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(scheme);
        parts.authority = Some(authority);
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
        Pool {
            connector,
            origin: Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/")),
            workers: (0..workers.max(1))
                .map(|_| WorkerConns::default())
                .collect(),
        }
    }

    fn mine(&self) -> &WorkerConns {
        &self.workers[WORKER.with(|w| w.get()) % self.workers.len()]
    }

    /// Send `req` (absolute URI) on a pooled connection, or a new one. A
    /// request a pooled connection could not take (closed meanwhile) is
    /// moved to another: hyper hands back requests it never wrote.
    pub(crate) async fn send(
        self: &Arc<Self>,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        let absolute = req.uri().clone();
        loop {
            let (sender, reused) = match self.reuse() {
                Some(s) => (s, true),
                // Boxed: the connect future is large and rarely needed; inline
                // it would be copied around on every request.
                None => (Box::pin(self.connect()).await?, false),
            };
            let unsent = match sender {
                Sender::H2(mut s) => match s.try_send_request(req).await {
                    Ok(resp) => return Ok(resp.map(PooledBody::unpooled)),
                    Err(mut e) => match e.take_message() {
                        Some(r) if reused => {
                            self.mine().h2.lock().take();
                            r
                        }
                        _ => return Err(SendError::Request(e.into_error())),
                    },
                },
                Sender::H1(mut s) => {
                    // HTTP/1.1 to an origin server: origin-form target.
                    *req.uri_mut() = absolute
                        .path_and_query()
                        .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
                    match s.try_send_request(req).await {
                        Ok(resp) => {
                            // An upgraded connection is the tunnel's now.
                            let back = (resp.status() != StatusCode::SWITCHING_PROTOCOLS)
                                .then(|| (self.clone(), s));
                            return Ok(resp.map(|b| PooledBody {
                                body: Some(b),
                                back,
                            }));
                        }
                        Err(mut e) => match e.take_message() {
                            Some(mut r) if reused => {
                                *r.uri_mut() = absolute.clone();
                                r
                            }
                            _ => return Err(SendError::Request(e.into_error())),
                        },
                    }
                }
            };
            req = unsent;
        }
    }

    fn reuse(&self) -> Option<Sender> {
        let mine = self.mine();
        if let Some(s) = &*mine.h2.lock() {
            if !s.is_closed() {
                return Some(Sender::H2(s.clone()));
            }
        }
        let mut idle = mine.idle.lock();
        let now = Instant::now();
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let (s, since) = &idle[i];
            if s.is_closed() || now.duration_since(*since) > POOL_IDLE_TIMEOUT {
                idle.remove(i);
            } else if s.is_ready() {
                return Some(Sender::H1(idle.remove(i).0));
            }
            // Else still finishing its last response: left for later.
        }
        None
    }

    fn put_back(&self, s: http1::SendRequest<ProxyBody>) {
        if !s.is_closed() {
            self.mine().idle.lock().push((s, Instant::now()));
        }
    }

    async fn connect(&self) -> Result<Sender, SendError> {
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(SendError::Connect)?;
        let io = connector
            .call(self.origin.clone())
            .await
            .map_err(SendError::Connect)?;
        if io.connected().is_negotiated_h2() {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(SendError::Request)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %cause_chain(&e), "Upstream connection ended");
                }
            });
            *self.mine().h2.lock() = Some(sender.clone());
            Ok(Sender::H2(sender))
        } else {
            let (sender, conn) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(SendError::Request)?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %cause_chain(&e), "Upstream connection ended");
                }
            });
            Ok(Sender::H1(sender))
        }
    }
}

/// A response body from the pool: once read to its end, its HTTP/1.1
/// connection goes back to the pool; dropped early, the connection closes.
pub(crate) struct PooledBody {
    body: Option<Incoming>,
    back: Option<(Arc<Pool>, http1::SendRequest<ProxyBody>)>,
}

impl PooledBody {
    fn unpooled(body: Incoming) -> PooledBody {
        PooledBody {
            body: Some(body),
            back: None,
        }
    }

    fn release(&mut self) {
        if let Some((pool, sender)) = self.back.take() {
            pool.put_back(sender);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut *body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if body.is_end_stream() => this.release(),
            Poll::Ready(Some(Err(_))) => this.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Read to the end (or nothing to read): the connection is clean.
        if self.is_end_stream() {
            self.release();
        }
    }
}

/// A route's upstream, parsed once: requests only concatenate strings.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    scheme: Scheme,
    authority: Authority,
    /// Base path without trailing `/` (`""` for the root).
    pub base: String,
    /// Bytes of the request path to drop (`path_prefix` minus its final `/`)
    /// when `strip_prefix`; 0 otherwise.
    strip: usize,
    /// `Host` for the upstream: its authority.
    pub host_header: HeaderValue,
}

impl Upstream {
    pub(crate) fn new(upstream: &Uri, prefix: &str, strip_prefix: bool) -> Option<Self> {
        let authority = upstream.authority()?.clone();
        Some(Upstream {
            scheme: upstream.scheme()?.clone(),
            host_header: HeaderValue::from_str(authority.as_str()).ok()?,
            authority,
            base: upstream.path().trim_end_matches('/').to_owned(),
            strip: if strip_prefix {
                prefix.len().saturating_sub(1)
            } else {
                0
            },
        })
    }

    /// Base path + request path (prefix stripped when configured) + the
    /// query, byte for byte. `path` passed the router's checks.
    pub(crate) fn uri(&self, path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let rest = path.get(self.strip..).unwrap_or("");
        let q = query.map_or(0, |q| q.len() + 1);
        let mut pq = String::with_capacity(self.base.len() + rest.len() + q + 1);
        pq.push_str(&self.base);
        pq.push_str(rest);
        if pq.is_empty() {
            pq.push('/');
        }
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(PathAndQuery::from_maybe_shared(Bytes::from(pq))?);
        Ok(Uri::from_parts(parts)?)
    }
}

/// An error and all its causes, `: `-separated (hyper's Display hides them).
pub(crate) use crate::error_chain as cause_chain;

/// Once both sides switched protocols, copy bytes both ways until either
/// closes. Runs detached from the request.
pub(crate) fn spawn_tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    request_id: HeaderValue,
) {
    tokio::spawn(async move {
        let rid = request_id.to_str().unwrap_or("");
        match tokio::try_join!(client, upstream) {
            Ok((c, u)) => {
                let mut c = TokioIo::new(c);
                let mut u = TokioIo::new(u);
                match tokio::io::copy_bidirectional(&mut c, &mut u).await {
                    Ok((up, down)) => {
                        tracing::debug!(
                            request_id = rid,
                            bytes_up = up,
                            bytes_down = down,
                            "Tunnel closed"
                        )
                    }
                    Err(e) => tracing::debug!(request_id = rid, error = %e, "Tunnel aborted"),
                }
            }
            Err(e) => {
                tracing::warn!(request_id = rid, error = %cause_chain(&e), "Upgrade failed")
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(upstream: &str, prefix: &str, strip: bool) -> Upstream {
        Upstream::new(&upstream.parse().unwrap(), prefix, strip).unwrap()
    }

    #[test]
    fn strip_prefix_on() {
        let u = up("https://api.github.com/", "/github/", true);
        assert_eq!(
            u.uri("/github/user", None).unwrap(),
            "https://api.github.com/user"
        );
        assert_eq!(u.uri("/github/", None).unwrap(), "https://api.github.com/");
        assert_eq!(u.uri("/github", None).unwrap(), "https://api.github.com/");
        assert_eq!(u.host_header, "api.github.com");
    }

    #[test]
    fn strip_prefix_off() {
        let u = up("https://api.example.com", "/v1/", false);
        assert_eq!(
            u.uri("/v1/things", None).unwrap(),
            "https://api.example.com/v1/things"
        );
    }

    #[test]
    fn base_path_is_kept() {
        let u = up("https://api.example.com:8443/base/", "/ex/", true);
        assert_eq!(
            u.uri("/ex/x/y", None).unwrap(),
            "https://api.example.com:8443/base/x/y"
        );
        assert_eq!(
            u.uri("/ex", None).unwrap(),
            "https://api.example.com:8443/base"
        );
        assert_eq!(
            u.uri("/ex/", None).unwrap(),
            "https://api.example.com:8443/base/"
        );
        assert_eq!(u.host_header, "api.example.com:8443");
        let u = up("http://127.0.0.1:9000/base", "/ex/", false);
        assert_eq!(
            u.uri("/ex/x", None).unwrap(),
            "http://127.0.0.1:9000/base/ex/x"
        );
    }

    #[test]
    fn root_prefix() {
        let u = up("https://api.example.com/base", "/", true);
        assert_eq!(u.uri("/", None).unwrap(), "https://api.example.com/base/");
        assert_eq!(u.uri("/x", None).unwrap(), "https://api.example.com/base/x");
    }

    #[test]
    fn query_preserved_byte_for_byte() {
        let u = up("https://api.example.com/", "/ex/", true);
        for q in [
            "a=%2F&b=+c;d=1",
            "x=%2f%2e%2e",
            "",
            "a=1&a=2&=&&",
            "q=%E2%9C%93&s=a%20b+c",
            "path=/x/../y",
        ] {
            let uri = u.uri("/ex/p", Some(q)).unwrap();
            assert_eq!(uri.query(), Some(q));
            assert_eq!(uri.path(), "/p");
        }
    }
}
