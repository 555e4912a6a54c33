//! The forwarder's parts that are built once: upstream connection pools (one
//! per TLS/connect setting and upstream origin), the parsed upstream target
//! of each route, and the upgrade tunnel.
//!
//! Knows nothing of tokens or routing; the request pipeline in `mod.rs`
//! drives it.

use super::body::{BoxError, ProxyBody};
use super::h1;
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
const SWEEP_EVERY: Duration = Duration::from_secs(5);

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
    /// Lean exchanges in progress on this thread.
    static EXCHANGING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Counts a lean exchange in progress on this worker while alive.
struct Exchanging {
    others: usize,
}

impl Exchanging {
    fn enter() -> Exchanging {
        let others = EXCHANGING.with(|n| n.replace(n.get() + 1));
        Exchanging { others }
    }
}

impl Drop for Exchanging {
    fn drop(&mut self) {
        EXCHANGING.with(|n| n.set(n.get().saturating_sub(1)));
    }
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
    #[error("request")]
    Exchange(#[source] h1::H1Error),
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
///
/// A request without a body goes over a lean connection ([`h1`]): the
/// serving task writes and reads it itself. Requests with a body (streamed
/// both ways at once) and upgrades use hyper's client connection, made from
/// an idle lean one when there is one.
pub(crate) struct Pool {
    connector: HttpsConnect,
    /// Scheme and authority: what the connector dials.
    origin: Uri,
    /// One per worker thread: a connection is driven by the runtime that
    /// opened it, so a worker only uses its own (no cross-thread wake-ups).
    workers: Box<[WorkerConns]>,
    /// Bodiless requests use [`h1`]; off for the upgrade pool.
    lean: bool,
}

#[derive(Default)]
struct WorkerConns {
    idle: parking_lot::Mutex<Vec<(http1::SendRequest<ProxyBody>, Instant)>>,
    lean: parking_lot::Mutex<Vec<(h1::Conn, Instant)>>,
    /// A sweeper task runs for `lean` (started with the first lean conn,
    /// on the runtime of the worker that opened it).
    swept: std::sync::atomic::AtomicBool,
    h2: parking_lot::Mutex<Option<http2::SendRequest<ProxyBody>>>,
}

enum Sender {
    H1(http1::SendRequest<ProxyBody>),
    H2(http2::SendRequest<ProxyBody>),
    Lean(h1::Conn),
}

impl Pool {
    pub(crate) fn new(
        connector: HttpsConnect,
        scheme: Scheme,
        authority: Authority,
        workers: usize,
        lean: bool,
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
            lean,
        }
    }

    fn mine(&self) -> &WorkerConns {
        &self.workers[self.worker_index()]
    }

    fn worker_index(&self) -> usize {
        WORKER.with(|w| w.get()) % self.workers.len()
    }

    /// Nothing polls an idle lean connection, so one the upstream closed
    /// would sit in CLOSE_WAIT until its next use. A task on this worker's
    /// runtime drops those (and expired ones) every `SWEEP_EVERY`; it ends
    /// with the pool (config reload).
    fn ensure_sweeper(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        let index = self.worker_index();
        if self.workers[index].swept.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SWEEP_EVERY).await;
                let Some(pool) = pool.upgrade() else { return };
                pool.sweep(index);
            }
        });
    }

    fn sweep(&self, index: usize) {
        let now = Instant::now();
        self.workers[index].lean.lock().retain_mut(|(conn, since)| {
            now.duration_since(*since) <= POOL_IDLE_TIMEOUT && conn.is_usable()
        });
    }

    /// Whether [`Pool::send`] leaves a request intact (only borrowed), so
    /// it can be retried or replayed without a copy: bodiless requests on a
    /// pool that is not for upgrades.
    pub(crate) fn keeps_request(&self, has_body: bool) -> bool {
        self.lean && !has_body
    }

    /// Send `req` (absolute URI) on a pooled connection, or a new one. When
    /// [`Pool::keeps_request`], `req` is intact afterwards; otherwise it is
    /// consumed and an empty shell stays in its place. A request a pooled
    /// connection could not take (closed meanwhile) is moved to another:
    /// nothing of it reached the upstream.
    pub(crate) async fn send(
        self: &Arc<Self>,
        req: &mut Request<ProxyBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        let lean = self.keeps_request(!req.body().is_end_stream());
        loop {
            let (sender, reused) = match self.reuse(lean) {
                Some(s) => (s, true),
                // Boxed: the connect future is large and rarely needed; inline
                // it would be copied around on every request.
                None => (Box::pin(self.connect()).await?, false),
            };
            let sender = match sender {
                // A body needs hyper: it streams both ways at once.
                Sender::Lean(conn) if !lean => {
                    Sender::H1(Box::pin(hyper_h1(TokioIo::new(conn.into_io()))).await?)
                }
                s => s,
            };
            match sender {
                Sender::Lean(conn) => match self.exchange(conn, req).await {
                    Ok(resp) => return Ok(resp),
                    // Not a byte of it reached the upstream: any method may
                    // move to another connection.
                    Err(None) if reused => {}
                    Err(None) => {
                        return Err(SendError::Exchange(h1::H1Error::ClosedBeforeResponse))
                    }
                    Err(Some(e)) => return Err(SendError::Exchange(e)),
                },
                Sender::H2(mut s) => {
                    let out = if lean { copy_bodiless(req) } else { take(req) };
                    match s.try_send_request(out).await {
                        Ok(resp) => return Ok(resp.map(PooledBody::unpooled)),
                        Err(mut e) => match e.take_message() {
                            Some(r) if reused => {
                                self.mine().h2.lock().take();
                                if !lean {
                                    *req = r;
                                }
                            }
                            _ => return Err(SendError::Request(e.into_error())),
                        },
                    }
                }
                Sender::H1(mut s) => {
                    let absolute = req.uri().clone();
                    let mut out = take(req);
                    // HTTP/1.1 to an origin server: origin-form target.
                    *out.uri_mut() = absolute
                        .path_and_query()
                        .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
                    match s.try_send_request(out).await {
                        Ok(resp) => {
                            // An upgraded connection is the tunnel's now.
                            let back = (resp.status() != StatusCode::SWITCHING_PROTOCOLS)
                                .then(|| (self.clone(), s));
                            return Ok(resp.map(|b| PooledBody::Hyper {
                                body: Some(b),
                                back,
                            }));
                        }
                        Err(mut e) => match e.take_message() {
                            Some(mut r) if reused => {
                                *r.uri_mut() = absolute;
                                *req = r;
                            }
                            _ => return Err(SendError::Request(e.into_error())),
                        },
                    }
                }
            }
        }
    }

    /// Writes `req`'s head on `conn` and reads the response. `Err(None)`:
    /// the connection failed before the upstream could have seen the whole
    /// request.
    async fn exchange(
        self: &Arc<Self>,
        mut conn: h1::Conn,
        req: &Request<ProxyBody>,
    ) -> Result<Response<PooledBody>, Option<h1::H1Error>> {
        let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        let head = h1::encode_head(req.method(), target, req.headers());
        let busy = Exchanging::enter();
        if busy.others > 0 {
            // Other exchanges are under way on this worker: write after
            // them, in one burst. A colocated upstream then wakes once per
            // burst, not once per request; each wake-up that preempts us
            // costs more than the extra poll.
            tokio::task::yield_now().await;
        }
        if conn.send_head(&head).await.is_err() {
            return Err(None);
        }
        let mut resp = conn.read_response(req.method()).await.map_err(Some)?;
        // The whole response came with its head: the connection is free
        // before the client has seen a byte.
        if let Some(conn) = resp.body_mut().take_reusable() {
            self.put_back_lean(conn);
        }
        let pool = self.clone();
        Ok(resp.map(|body| PooledBody::Lean { body, pool }))
    }

    fn reuse(&self, lean: bool) -> Option<Sender> {
        let mine = self.mine();
        if let Some(s) = &*mine.h2.lock() {
            if !s.is_closed() {
                return Some(Sender::H2(s.clone()));
            }
        }
        let now = Instant::now();
        if !lean {
            let mut idle = mine.idle.lock();
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
        }
        if !self.lean {
            return None;
        }
        let mut idle = mine.lean.lock();
        while let Some((mut conn, since)) = idle.pop() {
            if now.duration_since(since) <= POOL_IDLE_TIMEOUT && conn.is_usable() {
                return Some(Sender::Lean(conn));
            }
        }
        None
    }

    fn put_back(&self, s: http1::SendRequest<ProxyBody>) {
        if !s.is_closed() {
            self.mine().idle.lock().push((s, Instant::now()));
        }
    }

    /// Most recently used last; the sweeper ages out the rest.
    fn put_back_lean(&self, conn: h1::Conn) {
        self.mine().lean.lock().push((conn, Instant::now()));
    }

    async fn connect(self: &Arc<Self>) -> Result<Sender, SendError> {
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
                    tracing::debug!(error = %crate::error_chain(&e), "Upstream connection ended");
                }
            });
            *self.mine().h2.lock() = Some(sender.clone());
            Ok(Sender::H2(sender))
        } else if self.lean {
            self.ensure_sweeper();
            Ok(Sender::Lean(h1::Conn::new(h1::io_from(io))))
        } else {
            Ok(Sender::H1(hyper_h1(io).await?))
        }
    }
}

fn take(req: &mut Request<ProxyBody>) -> Request<ProxyBody> {
    std::mem::replace(req, Request::new(super::body::empty()))
}

/// What HTTP/2 sends of a bodiless request it may not consume.
fn copy_bodiless(req: &Request<ProxyBody>) -> Request<ProxyBody> {
    let mut out = Request::new(super::body::empty());
    *out.method_mut() = req.method().clone();
    *out.uri_mut() = req.uri().clone();
    *out.version_mut() = req.version();
    *out.headers_mut() = req.headers().clone();
    out
}

/// Hands `io` to a hyper HTTP/1.1 client connection driven by its own task.
async fn hyper_h1<I>(io: I) -> Result<http1::SendRequest<ProxyBody>, SendError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .handshake(io)
        .await
        .map_err(SendError::Request)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %crate::error_chain(&e), "Upstream connection ended");
        }
    });
    Ok(sender)
}

/// A response body from the pool: once read to its end, its HTTP/1.1
/// connection goes back to the pool; dropped early, the connection closes.
pub(crate) enum PooledBody {
    Hyper {
        body: Option<Incoming>,
        back: Option<(Arc<Pool>, http1::SendRequest<ProxyBody>)>,
    },
    Lean {
        body: h1::LeanBody,
        pool: Arc<Pool>,
    },
}

impl PooledBody {
    fn unpooled(body: Incoming) -> PooledBody {
        PooledBody::Hyper {
            body: Some(body),
            back: None,
        }
    }

    /// The response's hop-by-hop headers were already left out.
    pub(crate) fn hop_by_hop_stripped(&self) -> bool {
        match self {
            PooledBody::Hyper { .. } => false,
            PooledBody::Lean { body, .. } => body.hop_by_hop_stripped(),
        }
    }

    fn release(&mut self) {
        match self {
            PooledBody::Hyper { back, .. } => {
                if let Some((pool, sender)) = back.take() {
                    pool.put_back(sender);
                }
            }
            PooledBody::Lean { body, pool } => {
                if let Some(conn) = body.take_reusable() {
                    pool.put_back_lean(conn);
                }
            }
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut *self {
            PooledBody::Hyper { body, back } => {
                let Some(inner) = body.as_mut() else {
                    return Poll::Ready(None);
                };
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => self.release(),
                    Poll::Ready(Some(Ok(_))) if inner.is_end_stream() => self.release(),
                    Poll::Ready(Some(Err(_))) => *back = None,
                    _ => {}
                }
                polled.map_err(Into::into)
            }
            PooledBody::Lean { body, pool } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                if polled.is_ready() {
                    if let Some(conn) = body.take_reusable() {
                        pool.put_back_lean(conn);
                    }
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            PooledBody::Hyper { body, .. } => body.as_ref().is_none_or(Body::is_end_stream),
            PooledBody::Lean { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            PooledBody::Hyper { body, .. } => body
                .as_ref()
                .map_or_else(|| SizeHint::with_exact(0), Body::size_hint),
            PooledBody::Lean { body, .. } => body.size_hint(),
        }
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
                tracing::warn!(request_id = rid, error = %crate::error_chain(&e), "Upgrade failed")
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn idle_connections_the_upstream_closed_are_swept() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Answers one request per connection, then closes it after 50 ms,
        // like an upstream's keep-alive timeout.
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                });
            }
        });
        let key = ClientKey {
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
            h1_only: false,
        };
        let pool = Arc::new(Pool::new(
            build_connector(&key, None).unwrap(),
            Scheme::HTTP,
            addr.to_string().parse().unwrap(),
            1,
            true,
        ));
        let mut req = Request::new(super::super::body::empty());
        *req.uri_mut() = format!("http://{addr}/").parse().unwrap();
        let resp = pool.send(&mut req).await.unwrap();
        assert_eq!(resp.status(), 200);
        drop(resp);
        assert_eq!(pool.workers[0].lean.lock().len(), 1, "back in the pool");
        tokio::time::sleep(Duration::from_millis(200)).await;
        pool.sweep(0);
        assert!(pool.workers[0].lean.lock().is_empty(), "closed one swept");
    }

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
