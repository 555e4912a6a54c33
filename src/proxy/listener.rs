//! Listeners and connection serving: TCP (v4/v6) and unix sockets, optional
//! TLS, HTTP/1.1 and HTTP/2 (prior knowledge, or ALPN under TLS) on every
//! listener, a connection limit, the header read and keep-alive timeouts,
//! graceful shutdown.
//!
//! Hands each request to [`Proxy::handle`], or a head with both
//! `Content-Length` and `Transfer-Encoding` to [`Proxy::refuse`]; decides
//! nothing else about requests.
//! [`serve_guarded`] lends the same connection guards to the admin listener.

use super::h1_server::{self, LeanBody, Parsed};
use super::{BoxError, ConnInfo, Proxy, ProxyBody, ProxyBuildError, ProxyError, SharedProxy};
use crate::config::ListenAddr;
use arc_swap::ArcSwap;
use http::{Request, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A TLS handshake must finish within this (the head watchdog starts after
/// it), so a silent client cannot hold a connection slot.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 abuse limits: streams open at once per connection, streams the
/// client reset before we accepted them (rapid reset, CVE-2023-44487), and
/// streams we had to reset for its errors; beyond the last two, GOAWAY.
const H2_MAX_CONCURRENT_STREAMS: u32 = 100;
const H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 256;

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// `127.0.0.1:8080`, `[::1]:8080` or `unix:/run/tp.sock`.
    pub fn local_addr_string(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| format!("tcp:<{e}>"), |a| a.to_string()),
            Listener::Unix(l) => match l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(PathBuf::from))
            {
                Some(p) => format!("unix:{}", p.display()),
                None => "unix:<unnamed>".to_owned(),
            },
        }
    }
}

/// A listening socket on its way to another worker thread's runtime.
pub enum StdListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl Listener {
    /// The same socket, for another worker: every worker accepts from it.
    pub fn try_clone_std(&self) -> std::io::Result<StdListener> {
        use std::os::fd::AsFd;
        Ok(match self {
            Listener::Tcp(l) => StdListener::Tcp(l.as_fd().try_clone_to_owned()?.into()),
            Listener::Unix(l) => StdListener::Unix(l.as_fd().try_clone_to_owned()?.into()),
        })
    }
}

impl StdListener {
    /// Registers the socket with the current runtime.
    pub fn into_tokio(self) -> std::io::Result<Listener> {
        Ok(match self {
            StdListener::Tcp(l) => {
                l.set_nonblocking(true)?;
                Listener::Tcp(TcpListener::from_std(l)?)
            }
            StdListener::Unix(l) => {
                l.set_nonblocking(true)?;
                Listener::Unix(UnixListener::from_std(l)?)
            }
        })
    }
}

/// Bind `addr`. A unix socket file left behind by a dead process is removed
/// first; one that still accepts connections is `AddrInUse`.
pub async fn bind(addr: &ListenAddr) -> std::io::Result<Listener> {
    match addr {
        ListenAddr::Tcp(a) => TcpListener::bind(a).await.map(Listener::Tcp),
        ListenAddr::Unix(path) => {
            remove_stale_socket(path).await?;
            UnixListener::bind(path).map(Listener::Unix)
        }
    }
}

async fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = tokio::fs::symlink_metadata(path).await else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        // Never delete something that is not ours to delete.
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("{} is in use by a running process", path.display()),
        ));
    }
    tokio::fs::remove_file(path).await
}

pub(crate) fn tls_acceptor(
    cert: &Path,
    key: &Path,
) -> Result<tokio_rustls::TlsAcceptor, ProxyBuildError> {
    let certs = crate::tls::load_certs(cert)?;
    let key_der = crate::tls::load_key(key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|source| ProxyBuildError::Cert {
            path: cert.to_owned(),
            source,
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Accept and serve connections until `shutdown`, then stop accepting and
/// let in-flight requests finish, for at most `server.shutdown_grace`.
pub async fn serve(listener: Listener, proxy: Arc<Proxy>, shutdown: CancellationToken) {
    serve_shared(listener, Arc::new(ArcSwap::new(proxy)), shutdown).await
}

/// As [`serve`], reading the proxy anew for every request, so a reload
/// (routes, upstreams, credentials) applies to keep-alive connections too.
/// `max_connections`, the head limits and the grace stay as at start; a
/// reloaded TLS certificate applies to new connections.
pub async fn serve_shared(listener: Listener, shared: SharedProxy, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(shared.load().max_connections));
    serve_with_permits(listener, shared, shutdown, permits).await
}

/// As [`serve_shared`], with connection permits shared with the other
/// workers accepting on the same socket: a permit lives as long as its
/// connection.
pub async fn serve_with_permits(
    listener: Listener,
    shared: SharedProxy,
    shutdown: CancellationToken,
    permits: Arc<Semaphore>,
) {
    let proxy = shared.load_full();
    let local = listener.local_addr_string();
    let graceful = GracefulShutdown::new();
    let builders = Arc::new(Builders::new(proxy.max_header_bytes, proxy.max_headers));

    while let Some((permit, io, remote_ip)) =
        next_connection(&listener, &permits, &shutdown, &local).await
    {
        // The current proxy's TLS acceptor: a reload rotates certificates
        // for new connections without touching open ones.
        let tls = shared.load().tls.clone();
        let shared = shared.clone();
        let builders = builders.clone();
        let watcher = graceful.watcher();
        let shutdown = shutdown.clone();
        let task = async move {
            let _permit = permit;
            let _watcher = watcher;
            let conn = Conn {
                builders: &builders,
                shutdown: &shutdown,
            };
            match (tls, io) {
                (None, Accepted::Tcp(s)) => {
                    serve_proxy_conn(s, remote_ip, false, shared, conn).await
                }
                (None, Accepted::Unix(s)) => serve_proxy_conn(s, None, false, shared, conn).await,
                (Some(acceptor), io) => {
                    let io: Box<dyn Io> = match io {
                        Accepted::Tcp(s) => Box::new(s),
                        Accepted::Unix(s) => Box::new(s),
                    };
                    // Boxed: the handshake's state would otherwise size
                    // every connection's task, parked ones too.
                    let hs = Box::pin(tokio::time::timeout(
                        TLS_HANDSHAKE_TIMEOUT,
                        acceptor.accept(io),
                    ))
                    .await;
                    match hs {
                        // Boxed: the TLS state would otherwise size the task.
                        Ok(Ok(s)) => {
                            serve_proxy_conn(Box::new(s), remote_ip, true, shared, conn).await
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
        };
        tokio::spawn(task);
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::debug!(listener = local.as_str(), "Listener drained"),
        _ = tokio::time::sleep(proxy.shutdown_grace) => {
            tracing::warn!(listener = local.as_str(), grace_ms = proxy.shutdown_grace.as_millis() as u64, "Shutdown grace elapsed with requests in flight");
        }
    }
}

/// How a connection is served: HTTP/1.1 or HTTP/2 on a new connection,
/// HTTP/1.1 when a parked one wakes up.
pub(crate) struct Builders {
    auto: auto::Builder<TokioExecutor>,
    h1: hyper::server::conn::http1::Builder,
    /// `(max_header_bytes, max_headers)`, for the lean path.
    head_limits: (usize, usize),
}

impl Builders {
    pub(crate) fn new(max_header_bytes: usize, max_headers: usize) -> Builders {
        let mut h1 = hyper::server::conn::http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size(max_header_bytes)
            .max_headers(max_headers);
        Builders {
            auto: http_builder(max_header_bytes, max_headers),
            h1,
            head_limits: (max_header_bytes, max_headers),
        }
    }
}

/// HTTP/1.1 and HTTP/2 with the head limits and the HTTP/2 abuse limits.
fn http_builder(max_header_bytes: usize, max_headers: usize) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The connection watchdog times heads and idle keep-alives: hyper's
        // timer would run on every request and count idle time as head time.
        .header_read_timeout(None)
        // Bigger heads and more header fields get hyper's `431`.
        .max_buf_size(max_header_bytes)
        .max_headers(max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESET_STREAMS);
    builder
}

/// The data path's connection guards, for another listener (the admin API).
pub(crate) struct Guards {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
}

/// Serves `listener` until `shutdown` with [`Guards`]: a connection cap, the
/// head and keep-alive watchdog, head size limits. `handler(req, local,
/// framing_conflict)`: `local` is a loopback or unix peer; a conflict is a
/// head with both `Content-Length` and `Transfer-Encoding`.
pub(crate) async fn serve_guarded<H, Fut>(
    listener: Listener,
    guards: Guards,
    shutdown: CancellationToken,
    handler: H,
) where
    H: Fn(Request<Incoming>, bool, bool) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<ProxyBody>> + Send + 'static,
{
    let local = listener.local_addr_string();
    let permits = Arc::new(Semaphore::new(guards.max_connections.max(1)));
    let builders = Arc::new(Builders::new(guards.max_header_bytes, guards.max_headers));
    let graceful = GracefulShutdown::new();
    while let Some((permit, io, remote_ip)) =
        next_connection(&listener, &permits, &shutdown, &local).await
    {
        // A unix socket is as local as loopback.
        let is_local = remote_ip.is_none_or(crate::net::is_loopback_ip);
        let handler = handler.clone();
        let serve = move |req, conflict| handler(req, is_local, conflict);
        let builders = builders.clone();
        let watcher = graceful.watcher();
        let shutdown = shutdown.clone();
        let timeouts = (guards.header_read_timeout, guards.keepalive_timeout);
        tokio::spawn(async move {
            let _permit = permit;
            let _watcher = watcher;
            let conn = Conn {
                builders: &builders,
                shutdown: &shutdown,
            };
            match io {
                Accepted::Tcp(s) => serve_conn(s, conn, timeouts, serve, NO_LEAN).await,
                Accepted::Unix(s) => serve_conn(s, conn, timeouts, serve, NO_LEAN).await,
            }
        });
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// A connection slot and the next connection, or `None` at shutdown.
async fn next_connection(
    listener: &Listener,
    permits: &Arc<Semaphore>,
    shutdown: &CancellationToken,
    local: &str,
) -> Option<(OwnedSemaphorePermit, Accepted, Option<IpAddr>)> {
    let permit = tokio::select! {
        _ = shutdown.cancelled() => return None,
        p = permits.clone().acquire_owned() => p.ok()?,
    };
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return None,
            a = accept(listener) => a,
        };
        match accepted {
            Ok((io, remote_ip)) => return Some((permit, io, remote_ip)),
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(listener = local, error = %e, "Accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn accept(l: &Listener) -> std::io::Result<(Accepted, Option<IpAddr>)> {
    match l {
        Listener::Tcp(l) => {
            let (s, addr) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((Accepted::Tcp(s), Some(addr.ip())))
        }
        Listener::Unix(l) => {
            let (s, _) = l.accept().await?;
            Ok((Accepted::Unix(s), None))
        }
    }
}

/// What every connection of a listener shares.
#[derive(Clone, Copy)]
pub(crate) struct Conn<'a> {
    builders: &'a Builders,
    shutdown: &'a CancellationToken,
}

/// One data-path connection: the proxy as it is at each request.
async fn serve_proxy_conn<I>(
    io: I,
    remote_ip: Option<IpAddr>,
    tls: bool,
    shared: SharedProxy,
    conn: Conn<'_>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let info = Arc::new(ConnInfo::new(remote_ip, tls));
    let timeouts = {
        let p = shared.load();
        (p.header_read_timeout, p.keepalive_timeout)
    };
    let lean = {
        let shared = shared.clone();
        let info = info.clone();
        move |req: Request<LeanBody>| {
            let proxy = shared.load_full();
            let info = info.clone();
            async move { proxy.handle(req, &info).await }
        }
    };
    let handler = move |req: Request<Incoming>, conflict: bool| {
        let proxy = shared.load_full();
        let info = info.clone();
        async move {
            if conflict {
                proxy.refuse(
                    &req,
                    ProxyError::BadRequest(
                        "Content-Length and Transfer-Encoding together (request smuggling)",
                    ),
                )
            } else {
                proxy.handle(req, &info).await
            }
        }
    };
    serve_conn(io, conn, timeouts, handler, Some(lean)).await
}

type LeanFn = fn(Request<LeanBody>) -> std::future::Ready<http::Response<ProxyBody>>;

/// The admin listener serves everything through hyper.
const NO_LEAN: Option<LeanFn> = None;

/// An HTTP/1.1 connection idle this long between requests is parked: its
/// hyper session (read and write buffers, the slot for a request's
/// future: about 30 KiB) is freed, and the socket waits alone for its next
/// request. Shorter than any client's keep-alive pause worth the memory;
/// long enough that a busy connection never pays for a new session.
const PARK_AFTER: Duration = Duration::from_millis(250);

type Session = Pin<Box<dyn std::future::Future<Output = Result<(), BoxError>> + Send>>;

/// Serves one connection under the watchdog: `(header_read, keepalive)`
/// timeouts, requests counted in flight until their response body ends.
/// With `lean`, plain HTTP/1.1 requests are served by the lean path
/// (`h1_server`) until one is declined; hyper serves the connection from
/// there. An HTTP/1.1 connection that goes idle is parked (see
/// [`PARK_AFTER`]) and served anew when its next request starts.
async fn serve_conn<I, H, Fut, L, LFut>(
    mut io: I,
    conn: Conn<'_>,
    (header_read_timeout, keepalive_timeout): (Duration, Duration),
    handler: H,
    lean: Option<L>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, bool) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<ProxyBody>> + Send + 'static,
    L: Fn(Request<LeanBody>) -> LFut + Send + Sync,
    LFut: std::future::Future<Output = http::Response<ProxyBody>> + Send,
{
    let activity = Arc::new(Activity::new());
    let handler = Arc::new(handler);
    let mut rbuf = bytes::BytesMut::new();
    let mut fresh = true;
    loop {
        if let Some(lean) = &lean {
            let end = {
                // Boxed: a request's state would otherwise size every
                // connection's task, parked ones too.
                let mut session = Box::pin(serve_lean(&mut io, &mut rbuf, lean, &activity, conn));
                let mut stopping = false;
                loop {
                    tokio::select! {
                        end = session.as_mut() => break end,
                        verdict = WokenOnly::new(watchdog(&activity, header_read_timeout, keepalive_timeout)) => match verdict {
                            Verdict::Close(why) => {
                                tracing::debug!("Connection closed: {why}");
                                return;
                            }
                            Verdict::Park => break LeanEnd::Park,
                        },
                        // A request in flight is answered first; the session
                        // sees the shutdown after it.
                        _ = WokenOnly::new(conn.shutdown.cancelled()), if !stopping => {
                            activity.stopping.store(true, Ordering::Release);
                            if activity.in_flight.load(Ordering::Acquire) == 0 {
                                return;
                            }
                            stopping = true;
                        }
                    }
                }
            };
            match end {
                LeanEnd::Closed => return,
                LeanEnd::Declined => fresh = !activity.served.load(Ordering::Relaxed),
                LeanEnd::Park => {
                    rbuf = bytes::BytesMut::new();
                    let Some(first) = parked(
                        &mut io,
                        &activity,
                        conn,
                        (header_read_timeout, keepalive_timeout),
                    )
                    .await
                    else {
                        return;
                    };
                    rbuf.extend_from_slice(&first);
                    continue;
                }
            }
        }
        // Bytes already read (declined, or read while parked) go first.
        let prefix = std::mem::take(&mut rbuf).freeze();
        let slot = Arc::new(std::sync::Mutex::new(None));
        let io_in = Watched {
            inner: Parkable {
                inner: Some(io),
                prefix,
                activity: activity.clone(),
                slot: slot.clone(),
            },
            activity: activity.clone(),
            // A parked connection speaks HTTP/1.1: no preface to look for.
            heads: HeadScan {
                started: !fresh,
                ..HeadScan::default()
            },
        };
        let mut session = new_session(conn, fresh, io_in, &handler, &activity);
        let parked_now = loop {
            tokio::select! {
                r = session.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %crate::error_chain(&*e), "Connection ended with an error");
                    }
                    break activity.parking.load(Ordering::Relaxed);
                }
                verdict = watchdog(&activity, header_read_timeout, keepalive_timeout) => match verdict {
                    Verdict::Close(why) => {
                        tracing::debug!("Connection closed: {why}");
                        return;
                    }
                    Verdict::Park => {
                        activity.parking.store(true, Ordering::Relaxed);
                        activity.park.notify_one();
                    }
                },
            }
        };
        drop(session);
        let back = slot.lock().ok().and_then(|mut s| s.take());
        let Some(mut back) = back.filter(|_| parked_now) else {
            return;
        };
        activity.parking.store(false, Ordering::Relaxed);
        let Some(first) = parked(
            &mut back,
            &activity,
            conn,
            (header_read_timeout, keepalive_timeout),
        )
        .await
        else {
            return;
        };
        io = back;
        fresh = false;
        rbuf.extend_from_slice(&first);
    }
}

/// A parked connection: nothing held but the socket until the next bytes,
/// which are returned (`None`: closed, timed out or shutting down).
async fn parked<I: AsyncRead + Unpin>(
    io: &mut I,
    activity: &Activity,
    conn: Conn<'_>,
    (header_read_timeout, keepalive_timeout): (Duration, Duration),
) -> Option<Vec<u8>> {
    activity.parkable.store(false, Ordering::Relaxed);
    tracing::trace!("Connection parked");
    let mut first = [0u8; 64];
    let n = tokio::select! {
        r = io.read(&mut first) => match r {
            Ok(n) if n > 0 => n,
            _ => return None,
        },
        verdict = watchdog(activity, header_read_timeout, keepalive_timeout) => {
            if let Verdict::Close(why) = verdict {
                tracing::debug!("Connection closed: {why}");
            }
            return None;
        }
        _ = conn.shutdown.cancelled() => return None,
    };
    activity.bytes_read();
    Some(first[..n].to_vec())
}

/// How the lean path left a connection.
enum LeanEnd {
    Closed,
    /// A request it does not serve starts the read buffer: hyper's turn.
    Declined,
    /// Idle: the watchdog parks it.
    Park,
}

/// The lean path's first read on a connection, and its read size after.
const LEAN_READ: usize = 8 * 1024;

/// Waits for `response` while watching the client: if it closes the
/// connection first, the request is dropped (and with it the upstream
/// exchange), as hyper does. Bytes that arrive meanwhile (a pipelined
/// request) are kept in `rbuf`, and the watch ends there.
async fn answer_unless_gone<I, F>(
    io: &mut I,
    rbuf: &mut bytes::BytesMut,
    response: F,
) -> Option<http::Response<ProxyBody>>
where
    I: AsyncRead + Unpin,
    F: std::future::Future<Output = http::Response<ProxyBody>>,
{
    let mut response = std::pin::pin!(response);
    if !rbuf.is_empty() {
        return Some(response.await);
    }
    // Into the spare room the request left (or 64 bytes): reserving more
    // now would reallocate, as the request still holds the buffer.
    tokio::select! {
        biased;
        r = response.as_mut() => return Some(r),
        n = io.read_buf(rbuf) => match n {
            Ok(n) if n > 0 => {}
            _ => return None,
        },
    }
    Some(response.await)
}

/// Serves plain HTTP/1.1 requests from `io` until one is declined, the
/// connection closes, or (cancelled by the caller) the watchdog acts.
async fn serve_lean<I, L, LFut>(
    io: &mut I,
    rbuf: &mut bytes::BytesMut,
    lean: &L,
    activity: &Arc<Activity>,
    conn: Conn<'_>,
) -> LeanEnd
where
    I: AsyncRead + AsyncWrite + Unpin,
    L: Fn(Request<LeanBody>) -> LFut,
    LFut: std::future::Future<Output = http::Response<ProxyBody>>,
{
    let (max_head, max_headers) = conn.builders.head_limits;
    let mut out = h1_server::WriteBuf::default();
    loop {
        if !rbuf.is_empty() {
            match h1_server::parse(rbuf, max_head, max_headers) {
                Parsed::Partial => {}
                Parsed::Decline => return LeanEnd::Declined,
                Parsed::Request(plan) => {
                    let plan_close = plan.close();
                    let bytes = rbuf.split_to(plan.len()).freeze();
                    let request = match plan.build(bytes) {
                        Ok(r) => r,
                        Err(bytes) => {
                            let mut whole =
                                bytes::BytesMut::with_capacity(bytes.len() + rbuf.len());
                            whole.extend_from_slice(&bytes);
                            whole.extend_from_slice(rbuf);
                            *rbuf = whole;
                            return LeanEnd::Declined;
                        }
                    };
                    let in_flight = InFlight::start(activity, false);
                    let Some(response) = answer_unless_gone(io, rbuf, lean(request)).await else {
                        tracing::debug!("Client closed the connection with a request in flight");
                        return LeanEnd::Closed;
                    };
                    let close = plan_close || activity.stopping.load(Ordering::Acquire);
                    let keep_alive = h1_server::write_response(io, response, close, &mut out).await;
                    drop(in_flight);
                    match keep_alive {
                        Ok(true) => {}
                        Ok(_) => {
                            let _ = io.shutdown().await;
                            return LeanEnd::Closed;
                        }
                        Err(e) => {
                            tracing::debug!(error = %crate::error_chain(&e), "Connection ended with an error");
                            return LeanEnd::Closed;
                        }
                    }
                    if !rbuf.is_empty() {
                        activity.bytes_read();
                    }
                    continue;
                }
            }
        }
        // Parkable only while nothing is buffered and nothing is in flight.
        activity.parkable.store(rbuf.is_empty(), Ordering::Release);
        rbuf.reserve(LEAN_READ);
        let n = match io.read_buf(rbuf).await {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "Connection read failed");
                return LeanEnd::Closed;
            }
        };
        activity.parkable.store(false, Ordering::Release);
        if n == 0 {
            return LeanEnd::Closed;
        }
        activity.bytes_read();
    }
}

/// A hyper session on `io`: HTTP/1.1 or HTTP/2 on a fresh connection,
/// HTTP/1.1 on a parked one. It ends gracefully on shutdown or when the
/// watchdog parks the connection.
fn new_session<I, H, Fut>(
    conn: Conn<'_>,
    fresh: bool,
    io: Watched<Parkable<I>>,
    handler: &Arc<H>,
    activity: &Arc<Activity>,
) -> Session
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, bool) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<ProxyBody>> + Send + 'static,
{
    let for_service = activity.clone();
    let handler = handler.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let in_flight = InFlight::start(&for_service, req.version() == Version::HTTP_2);
        let conflict = for_service.framing_conflict.swap(false, Ordering::Relaxed);
        let resp = handler(req, conflict);
        async move {
            Ok::<_, Infallible>(resp.await.map(|body| Tracked {
                body,
                _in_flight: in_flight,
            }))
        }
    });
    let stop = activity.clone();
    let shutdown = conn.shutdown.clone();
    let io = TokioIo::new(io);
    if fresh {
        let session = conn
            .builders
            .auto
            .serve_connection_with_upgrades(io, service)
            .into_owned();
        until_stopped(session, |s| s.graceful_shutdown(), stop, shutdown)
    } else {
        let session = conn
            .builders
            .h1
            .serve_connection(io, service)
            .with_upgrades();
        until_stopped(session, |s| s.graceful_shutdown(), stop, shutdown)
    }
}

/// Runs `session`, ending it with `graceful` when the watchdog parks the
/// connection or the listener shuts down.
fn until_stopped<C, E>(
    session: C,
    graceful: fn(Pin<&mut C>),
    stop: Arc<Activity>,
    shutdown: CancellationToken,
) -> Session
where
    C: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError>,
{
    Box::pin(async move {
        let mut session = std::pin::pin!(session);
        tokio::select! {
            // Parking first: hyper must not read a new head between the
            // watchdog's decision and the shutdown.
            biased;
            _ = stop.park.notified() => {}
            _ = shutdown.cancelled() => {}
            r = session.as_mut() => return r.map_err(Into::into),
        }
        graceful(session.as_mut());
        session.await.map_err(Into::into)
    })
}

/// The socket under a hyper session. When the session ends because the
/// connection is being parked, it is neither shut down nor closed but
/// handed back through `slot`.
struct Parkable<I> {
    inner: Option<I>,
    /// Bytes read while parked, served first.
    prefix: bytes::Bytes,
    activity: Arc<Activity>,
    slot: Arc<std::sync::Mutex<Option<I>>>,
}

impl<I> Parkable<I> {
    fn io(&mut self) -> std::io::Result<&mut I> {
        self.inner
            .as_mut()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotConnected))
    }
}

impl<I> Drop for Parkable<I> {
    fn drop(&mut self) {
        if self.activity.parking.load(Ordering::Relaxed) {
            if let (Some(io), Ok(mut slot)) = (self.inner.take(), self.slot.lock()) {
                *slot = Some(io);
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Parkable<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(self.io()?).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Parkable<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(self.io()?).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(self.io()?).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.is_write_vectored())
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self.io()?).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.activity.parking.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(self.io()?).poll_shutdown(cx)
    }
}

/// Polls `inner` only once its own waker has fired (and on the first
/// poll). A connection's select wakes for every read and write; its timers
/// and the shutdown signal (whose poll takes a lock) need not be polled
/// each time.
struct WokenOnly<F> {
    inner: Pin<Box<F>>,
    signal: Arc<WakeSignal>,
    waker: std::task::Waker,
}

struct WakeSignal {
    woken: AtomicBool,
    outer: parking_lot::Mutex<Option<std::task::Waker>>,
}

impl std::task::Wake for WakeSignal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if let Some(w) = &*self.outer.lock() {
            w.wake_by_ref();
        }
    }
}

impl<F: std::future::Future> WokenOnly<F> {
    fn new(inner: F) -> WokenOnly<F> {
        let signal = Arc::new(WakeSignal {
            woken: AtomicBool::new(true),
            outer: parking_lot::Mutex::new(None),
        });
        WokenOnly {
            inner: Box::pin(inner),
            waker: signal.clone().into(),
            signal,
        }
    }
}

impl<F: std::future::Future> std::future::Future for WokenOnly<F> {
    type Output = F::Output;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        if !this.signal.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        {
            // Stored before the inner poll, so no wake-up can be missed.
            let mut outer = this.signal.outer.lock();
            if !outer.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *outer = Some(cx.waker().clone());
            }
        }
        this.inner
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

const NO_HEAD: u64 = u64::MAX;

/// What the connection watchdog needs, kept by the reads, the service and
/// the response bodies: atomics, no lock and no timer per request. Times
/// are milliseconds since the connection was accepted.
struct Activity {
    opened: Instant,
    in_flight: AtomicU32,
    /// A request has started: the first-request limit no longer applies.
    served: AtomicBool,
    idle_since: AtomicU64,
    /// When the first byte of the next request head arrived (`NO_HEAD`: not
    /// yet).
    head_started: AtomicU64,
    /// HTTP/2 frames (pings, settings) arrive between requests: only idle
    /// time counts there.
    h2: AtomicBool,
    /// The last request head carried both `Content-Length` and
    /// `Transfer-Encoding` (set by [`HeadScan`], taken by the service).
    framing_conflict: AtomicBool,
    /// The last read ended exactly at the blank line of a head without a
    /// body, and nothing was read since: hyper holds no unparsed bytes, so
    /// its session may be dropped once the response is done.
    parkable: AtomicBool,
    /// The session is ending to park the connection (its socket is kept).
    parking: AtomicBool,
    /// Tells the session to end gracefully for parking.
    park: tokio::sync::Notify,
    /// The listener is shutting down: close after the response in flight
    /// (an atomic, where the token's own check takes a lock).
    stopping: AtomicBool,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            opened: Instant::now(),
            in_flight: AtomicU32::new(0),
            served: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(NO_HEAD),
            h2: AtomicBool::new(false),
            framing_conflict: AtomicBool::new(false),
            parkable: AtomicBool::new(false),
            parking: AtomicBool::new(false),
            park: tokio::sync::Notify::new(),
            stopping: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    /// Whether these bytes may start or continue a request head.
    fn bytes_read(&self) -> bool {
        if self.in_flight.load(Ordering::Relaxed) != 0 {
            return false;
        }
        if self.head_started.load(Ordering::Relaxed) == NO_HEAD {
            self.head_started.store(self.now_ms(), Ordering::Relaxed);
        }
        !self.h2.load(Ordering::Relaxed)
    }
}

/// Watches HTTP/1 request heads as they are read for `Content-Length` and
/// `Transfer-Encoding` together (RFC 9112 §6.3: a smuggling attempt). hyper
/// drops the length and lets chunked win, safely, but hides that both were
/// sent; this sees the raw names, one byte of state machine at a time, so
/// the request gets a `400` instead of being forwarded. Heads that arrive
/// while a request is in flight (pipelining) are left to hyper's handling.
#[derive(Default)]
struct HeadScan {
    /// An HTTP/2 connection (prior-knowledge preface): nothing to scan.
    off: bool,
    /// Any byte seen: the preface can only come first.
    started: bool,
    /// Past the blank line: wait for the next head.
    done: bool,
    /// Bytes of the current line, `\r` not counted.
    line_len: usize,
    /// Candidates still matching the current line's name (bit 0:
    /// content-length, bit 1: transfer-encoding).
    candidates: u8,
    /// Names seen in this head.
    seen: u8,
    /// The last feed ended exactly at the blank line of a head with
    /// neither name (no body follows).
    ended_bodiless: bool,
}

const FRAMING_NAMES: [&[u8]; 2] = [b"content-length", b"transfer-encoding"];

impl HeadScan {
    /// Feeds bytes read while no request is in flight; true when they end
    /// a head that had both names. Bytes after a head's blank line in the
    /// same read are a body or a pipelined request: left alone.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        self.ended_bodiless = false;
        if self.off {
            return false;
        }
        if self.done {
            *self = HeadScan {
                started: true,
                ..HeadScan::default()
            };
        }
        if !self.started && bytes.starts_with(b"PRI * HTTP/2.0") {
            self.off = true;
            return false;
        }
        self.started = true;
        let mut i = 0;
        while i < bytes.len() {
            if self.candidates == 0 && self.line_len > 0 {
                // Mid-line and no name can match: on to the line's end.
                match bytes[i..].iter().position(|&b| b == b'\n') {
                    Some(off) => {
                        self.line_len += off;
                        i += off;
                    }
                    None => {
                        self.line_len += bytes.len() - i;
                        return false;
                    }
                }
            }
            let b = bytes[i];
            i += 1;
            match b {
                b'\n' => {
                    if self.line_len == 0 {
                        self.done = true;
                        self.ended_bodiless = i == bytes.len() && self.seen == 0;
                        return self.seen == 0b11;
                    }
                    self.line_len = 0;
                    self.candidates = 0b11;
                }
                b'\r' => {}
                _ => {
                    let pos = self.line_len;
                    self.line_len += 1;
                    if self.candidates == 0 {
                        continue;
                    }
                    for (i, name) in FRAMING_NAMES.iter().enumerate() {
                        let bit = 1 << i;
                        if self.candidates & bit == 0 {
                            continue;
                        }
                        match name.get(pos) {
                            Some(c) if c.eq_ignore_ascii_case(&b) => {}
                            None if b == b':' => {
                                self.seen |= bit;
                                self.candidates &= !bit;
                            }
                            _ => self.candidates &= !bit,
                        }
                    }
                }
            }
        }
        false
    }
}

/// Counts a request as in flight from its head until its response body is
/// done (sent, failed or abandoned).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>, h2: bool) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.served.store(true, Ordering::Relaxed);
        activity.head_started.store(NO_HEAD, Ordering::Relaxed);
        if h2 {
            activity.h2.store(true, Ordering::Relaxed);
        }
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        if a.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            a.idle_since.store(a.now_ms(), Ordering::Release);
        }
    }
}

/// The response body, holding its request's [`InFlight`].
struct Tracked {
    body: ProxyBody,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// What the watchdog decided.
enum Verdict {
    Close(&'static str),
    /// Idle for [`PARK_AFTER`] with nothing buffered: free the session.
    Park,
}

/// Resolves when the connection must be closed (with the reason): a request
/// head took longer than `header_read_timeout` from its first byte, a new
/// connection sent no request within it, or the connection sat idle between
/// requests for `keepalive_timeout`; or parked. One timer per connection,
/// never one per request: it sleeps to the next deadline, at most half
/// `header_read_timeout` at a time.
async fn watchdog(a: &Activity, header_read: Duration, keepalive: Duration) -> Verdict {
    let head_limit = header_read.as_millis() as u64;
    let idle_limit = keepalive.as_millis() as u64;
    let park_after = PARK_AFTER.as_millis() as u64;
    let poll = (head_limit / 2).max(1);
    loop {
        let now = a.now_ms();
        let next = if a.in_flight.load(Ordering::Acquire) > 0 {
            // Back soon enough to park the connection once it is idle.
            now + poll.min(park_after)
        } else {
            let head = a.head_started.load(Ordering::Relaxed);
            if head != NO_HEAD && !a.h2.load(Ordering::Relaxed) {
                if now >= head + head_limit {
                    return Verdict::Close(
                        "no complete request head within server.header_read_timeout",
                    );
                }
                (head + head_limit).min(now + park_after)
            } else {
                let first = !a.served.load(Ordering::Relaxed);
                let limit = if first { head_limit } else { idle_limit };
                let idle = a.idle_since.load(Ordering::Acquire);
                if now >= idle + limit {
                    return Verdict::Close(if first {
                        "no request within server.header_read_timeout"
                    } else {
                        "idle for server.keepalive_timeout"
                    });
                }
                let parkable = !first
                    && head == NO_HEAD
                    && !a.h2.load(Ordering::Relaxed)
                    && !a.parking.load(Ordering::Relaxed)
                    && a.parkable.load(Ordering::Acquire);
                if parkable && now >= idle + park_after {
                    return Verdict::Park;
                }
                let next = (idle + limit).min(now + poll);
                if parkable {
                    next.min(idle + park_after)
                } else if first {
                    // The first request may come and go before `poll`.
                    next.min(now + park_after)
                } else {
                    next
                }
            }
        };
        tokio::time::sleep_until(a.opened + Duration::from_millis(next)).await;
    }
}

/// Tells the [`Activity`] when bytes arrive.
struct Watched<I> {
    inner: I,
    activity: Arc<Activity>,
    heads: HeadScan,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let mut parkable = false;
            if self.activity.bytes_read() {
                if self.heads.feed(&buf.filled()[before..]) {
                    self.activity
                        .framing_conflict
                        .store(true, Ordering::Relaxed);
                }
                parkable = self.heads.ended_bodiless;
            }
            self.activity.parkable.store(parkable, Ordering::Release);
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::HeadScan;

    fn scan(parts: &[&[u8]]) -> Vec<bool> {
        let mut s = HeadScan::default();
        parts.iter().map(|p| s.feed(p)).collect()
    }

    #[test]
    fn both_framing_headers_are_seen_in_any_case_and_split() {
        let head: &[u8] = b"POST /x HTTP/1.1\r\nHost: a\r\ncontent-LENGTH: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(scan(&[head]), [true]);
        let bytes: Vec<&[u8]> = head.chunks(1).collect();
        assert_eq!(scan(&bytes).iter().filter(|b| **b).count(), 1);
        assert!(*scan(&bytes).last().unwrap());
        // Bare LF line endings too.
        assert_eq!(
            scan(&[b"POST /x HTTP/1.1\nTransfer-Encoding: chunked\nContent-Length: 4\n\n"]),
            [true]
        );
    }

    #[test]
    fn one_of_them_or_lookalikes_are_not_a_conflict() {
        for head in [
            &b"POST /x HTTP/1.1\r\nContent-Length: 4\r\n\r\n"[..],
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /x HTTP/1.1\r\nX-Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /x HTTP/1.1\r\nContent-Length-X: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /x HTTP/1.1\r\nX: content-length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(scan(&[head]), [false], "{}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn bytes_after_the_blank_line_and_h2_are_left_alone() {
        // A body that looks like a head, in the same read: not scanned.
        let read: &[u8] = b"POST /x HTTP/1.1\r\nContent-Length: 44\r\n\r\nContent-Length: 1\r\nTransfer-Encoding: x\r\n\r\n";
        assert_eq!(scan(&[read]), [false]);
        // The next head starts clean.
        assert_eq!(
            scan(&[read, b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"]),
            [false, false]
        );
        let mut s = HeadScan::default();
        assert!(!s.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(!s.feed(b"Content-Length: 1\r\nTransfer-Encoding: x\r\n\r\n"));
    }
}
