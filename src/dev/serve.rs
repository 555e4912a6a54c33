//! The tiny serve loop shared by the dev IdP and the echo upstream: accept,
//! optional TLS, HTTP/1.1 and HTTP/2 (h2c prior knowledge on plain TCP), a
//! per-connection kill switch, and `stop`/`restart` that really close sockets
//! so tests can simulate a server that is down.

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// Response body used by both servers.
pub(crate) type DevBody = BoxBody<Bytes, io::Error>;
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
pub(crate) type Handler =
    Arc<dyn Fn(Request<Incoming>) -> BoxFuture<Response<DevBody>> + Send + Sync>;

pub(crate) fn full(body: impl Into<Bytes>) -> DevBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

pub(crate) fn empty() -> DevBody {
    full(Bytes::new())
}

/// Put into each request's extensions: dropping the connection from inside a
/// handler (fault injection) without writing any response.
#[derive(Clone)]
pub(crate) struct ConnKill(Arc<Notify>);

impl ConnKill {
    /// Closes the TCP connection; the caller's future is dropped with it, so
    /// call this last and then await something that never finishes.
    pub(crate) async fn kill(&self) -> ! {
        self.0.notify_one();
        std::future::pending::<()>().await;
        unreachable!("the connection task drops this future")
    }
}

/// The client certificate chain of a TLS connection, leaf first, put into
/// each request's extensions (RFC 8705 client authentication).
#[derive(Clone, Debug)]
pub(crate) struct PeerCerts(pub(crate) Arc<Vec<rustls::pki_types::CertificateDer<'static>>>);

/// A body fed from a channel: lets handlers stream chunks and trailers
/// without pulling in a `Stream` dependency.
pub(crate) struct ChanBody(pub(crate) mpsc::Receiver<Result<Frame<Bytes>, io::Error>>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.0.poll_recv(cx)
    }
}

/// `n` bytes of `b'x'` in chunks, generated lazily (never all in memory).
pub(crate) struct RepeatBody {
    pub(crate) remaining: u64,
    pub(crate) chunk: Bytes,
}

impl Body for RepeatBody {
    type Data = Bytes;
    type Error = io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64);
        self.remaining -= n;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n as usize)))))
    }
    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

struct Shared {
    handler: Handler,
    tls: Option<TlsAcceptor>,
    // Connection tasks by id, so `stop` can abort them (which drops, and so
    // closes, their sockets). A sync mutex: never held across an await.
    conns: Mutex<HashMap<u64, JoinHandle<()>>>,
    next_id: AtomicU64,
}

/// A running (or stopped) server on a fixed address.
pub(crate) struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl Server {
    pub(crate) async fn bind(
        addr: SocketAddr,
        handler: Handler,
        tls: Option<TlsAcceptor>,
    ) -> io::Result<Server> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            handler,
            tls,
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Server {
            addr,
            shared,
            accept: Mutex::new(Some(accept)),
        })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub(crate) fn connections(&self) -> u64 {
        self.shared.next_id.load(Ordering::Relaxed)
    }

    /// Closes the listener and every open connection; returns once they are
    /// gone, so a connect right after is refused.
    pub(crate) async fn stop(&self) {
        let accept = self.accept.lock().take();
        if let Some(accept) = accept {
            accept.abort();
            let _ = accept.await;
        }
        let conns: Vec<_> = self.shared.conns.lock().drain().map(|(_, h)| h).collect();
        for conn in conns {
            conn.abort();
            let _ = conn.await;
        }
    }

    /// Binds the same port again (state lives in the handler, so it is kept).
    pub(crate) async fn restart(&self) -> io::Result<()> {
        self.stop().await;
        let listener = TcpListener::bind(self.addr).await?;
        let accept = tokio::spawn(accept_loop(listener, self.shared.clone()));
        *self.accept.lock() = Some(accept);
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.lock().take() {
            accept.abort();
        }
        for (_, conn) in self.shared.conns.lock().drain() {
            conn.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            // EMFILE and friends: back off briefly instead of spinning.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        // Hold the map lock while spawning so the task's self-removal cannot
        // run before its insertion.
        let mut conns = shared.conns.lock();
        let task_shared = shared.clone();
        let handle = tokio::spawn(async move {
            match task_shared.tls.clone() {
                Some(acceptor) => {
                    if let Ok(tls) = acceptor.accept(stream).await {
                        let peer = tls.get_ref().1.peer_certificates().map(|c| {
                            PeerCerts(Arc::new(c.iter().map(|d| d.clone().into_owned()).collect()))
                        });
                        serve_conn(tls, &task_shared, peer).await;
                    }
                }
                None => serve_conn(stream, &task_shared, None).await,
            }
            task_shared.conns.lock().remove(&id);
        });
        conns.insert(id, handle);
    }
}

async fn serve_conn<S>(stream: S, shared: &Shared, peer: Option<PeerCerts>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let kill = Arc::new(Notify::new());
    let handler = shared.handler.clone();
    let conn_kill = ConnKill(kill.clone());
    let service = service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(conn_kill.clone());
        if let Some(peer) = &peer {
            req.extensions_mut().insert(peer.clone());
        }
        let fut = handler(req);
        async move { Ok::<_, Infallible>(fut.await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::select! {
        _ = conn => {}
        // Dropping `conn` drops the socket: the peer sees EOF, no response.
        _ = kill.notified() => {}
    }
}
