//! A TCP fault proxy for the grant-safety suite: sits between tokenproxy and
//! the dev IdP (or PostgreSQL) and passes, stalls, blackholes, delays, or
//! replaces the answer with a gateway 5xx. The mode can change while
//! connections are open: a partition holds the bytes of live connections
//! too, as a dropped route does (no FIN, no RST).
//!
//! With `tls`, it terminates TLS with the dev test certificate in front of a
//! plain-HTTP backend; a stall then leaves the ClientHello unanswered.

#![allow(dead_code)]

use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// Forward both ways.
    Pass,
    /// Accept and never read or answer (a hung TLS handshake, a hung egress
    /// proxy); live connections stop moving bytes.
    Stall,
    /// Read the request and drop it; never answer.
    Blackhole,
    /// Forward each client chunk after this delay (the request reaches the
    /// backend late); answers pass at once.
    Delay(Duration),
    /// Forward the request, let the backend answer (it processed the
    /// grant), throw the answer away and send this status instead, as a
    /// gateway that lost the backend's answer.
    Replace(u16),
}

struct Shared {
    mode: Mutex<Mode>,
    backend: SocketAddr,
    accepted: AtomicUsize,
    forwarded: AtomicUsize,
    replaced: AtomicUsize,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    pub async fn start(backend: SocketAddr) -> FaultProxy {
        Self::start_inner(backend, None).await
    }

    /// Terminates TLS (the dev test certificate for 127.0.0.1/localhost).
    pub async fn start_tls(backend: SocketAddr) -> FaultProxy {
        let acceptor = tokio_rustls::TlsAcceptor::from(tokenproxy::dev::tls::test_server_config());
        Self::start_inner(backend, Some(acceptor)).await
    }

    async fn start_inner(
        backend: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Pass),
            backend,
            accepted: AtomicUsize::new(0),
            forwarded: AtomicUsize::new(0),
            replaced: AtomicUsize::new(0),
            tls,
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                s.accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(s.clone(), client));
            }
        });
        FaultProxy { addr, shared, task }
    }

    pub fn set(&self, mode: Mode) {
        *self.shared.mode.lock() = mode;
    }

    pub fn mode(&self) -> Mode {
        self.shared.mode.lock().clone()
    }

    /// `http://127.0.0.1:port` or `https://…` with TLS.
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.shared.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}{path}", self.addr)
    }

    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections whose bytes reached the backend.
    pub fn forwarded(&self) -> usize {
        self.shared.forwarded.load(Ordering::SeqCst)
    }

    /// Answers thrown away and replaced by a 5xx.
    pub fn replaced(&self) -> usize {
        self.shared.replaced.load(Ordering::SeqCst)
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn serve(s: Arc<Shared>, client: TcpStream) {
    let mode = s.mode.lock().clone();
    if mode == Mode::Stall {
        // Hold the socket open, read nothing, until the client gives up.
        hold(client).await;
        return;
    }
    let mut client: Box<dyn Io> = match &s.tls {
        Some(acceptor) => match acceptor.accept(client).await {
            Ok(t) => Box::new(t),
            Err(_) => return,
        },
        None => Box::new(client),
    };
    if mode == Mode::Blackhole {
        let mut buf = [0u8; 4096];
        while matches!(client.read(&mut buf).await, Ok(n) if n > 0) {}
        return;
    }
    let Ok(backend) = TcpStream::connect(s.backend).await else {
        return;
    };
    s.forwarded.fetch_add(1, Ordering::SeqCst);
    if let Mode::Replace(status) = mode {
        replace(&s, client, backend, status).await;
        return;
    }
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut br, mut bw) = backend.into_split();
    let up = pump(s.clone(), &mut cr, &mut bw, true);
    let down = pump(s.clone(), &mut br, &mut cw, false);
    tokio::join!(up, down);
}

async fn hold(client: TcpStream) {
    // Never read: the client's bytes sit unanswered until it gives up.
    tokio::time::sleep(Duration::from_secs(300)).await;
    drop(client);
}

/// Moves bytes one way, honouring the current mode before each chunk.
async fn pump(
    s: Arc<Shared>,
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    upstream: bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        loop {
            let mode = s.mode.lock().clone();
            match mode {
                Mode::Stall | Mode::Blackhole => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Mode::Delay(d) => {
                    if upstream {
                        tokio::time::sleep(d).await;
                    }
                    break;
                }
                _ => break,
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Forwards the request, waits for the backend's first answer bytes (the
/// grant was processed), then answers `status` in their place.
async fn replace(s: &Shared, client: Box<dyn Io>, backend: TcpStream, status: u16) {
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut br, mut bw) = backend.into_split();
    let forward = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if bw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let answered = async {
        let mut buf = [0u8; 1];
        let _ = br.read(&mut buf).await;
    };
    tokio::select! {
        _ = forward => return,
        _ = answered => {}
    }
    s.replaced.fetch_add(1, Ordering::SeqCst);
    let body = format!("<html><body><h1>{status} Bad Gateway</h1></body></html>");
    let head = format!(
        "HTTP/1.1 {status} Bad Gateway\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = cw.write_all(head.as_bytes()).await;
    let _ = cw.write_all(body.as_bytes()).await;
    let _ = cw.shutdown().await;
}
