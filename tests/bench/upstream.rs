//! The fast upstream every scenario forwards to: a fixed body, keep-alive,
//! on its own thread (pinned where the scenario says), plain or TLS, HTTP/1.1
//! only or HTTP/1.1 + h2c (prior knowledge), optionally checking the token.

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokenproxy::dev::TokenCheck;

pub struct UpstreamOpts {
    pub body_len: usize,
    /// TLS with the dev test certificate (ALPN `http/1.1` only, like what
    /// nginx can speak to an upstream).
    pub tls: bool,
    /// Serve h2c prior knowledge as well as HTTP/1.1 (hyper-util's auto
    /// builder), so a client can reach it directly over HTTP/2.
    pub h2c: bool,
    /// Answer 401 unless `Authorization: Bearer <t>` passes this check.
    pub check: Option<TokenCheck>,
    /// CPUs for the upstream's thread (taskset list).
    pub cpus: &'static str,
}

pub struct Upstream {
    pub addr: SocketAddr,
    /// Requests answered 401 by the token check.
    pub rejected: Arc<AtomicU64>,
    /// Requests that came without an `Authorization: Bearer …` header,
    /// except on the path `/direct` (the `direct` target's): none should,
    /// through a proxy.
    pub no_bearer: Arc<AtomicU64>,
}

impl Upstream {
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    pub fn no_bearer(&self) -> u64 {
        self.no_bearer.load(Ordering::Relaxed)
    }
}

pub fn start_upstream(opts: UpstreamOpts) -> Upstream {
    let (tx, rx) = std::sync::mpsc::channel();
    let rejected = Arc::new(AtomicU64::new(0));
    let rejected2 = rejected.clone();
    let no_bearer = Arc::new(AtomicU64::new(0));
    let no_bearer2 = no_bearer.clone();
    std::thread::spawn(move || {
        crate::common::pin_this_thread(opts.cpus);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let acceptor = opts.tls.then(|| {
                let mut cfg = (*tokenproxy::dev::tls::test_server_config()).clone();
                cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
                tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
            });
            let body = Bytes::from(vec![b'x'; opts.body_len]);
            let check = opts.check.clone();
            let h2c = opts.h2c;
            loop {
                let (s, _) = listener.accept().await.unwrap();
                let _ = s.set_nodelay(true);
                let body = body.clone();
                let check = check.clone();
                let rejected = rejected2.clone();
                let no_bearer = no_bearer2.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let bearer = req
                            .headers()
                            .get(http::header::AUTHORIZATION)
                            .and_then(|v| {
                                let v = v.as_bytes();
                                v.strip_prefix(b"Bearer ")
                                    .or_else(|| v.strip_prefix(b"DPoP "))
                            })
                            .filter(|t| !t.is_empty());
                        if bearer.is_none() && req.uri().path() != "/direct" {
                            no_bearer.fetch_add(1, Ordering::Relaxed);
                        }
                        let ok = match &check {
                            None => true,
                            Some(check) => bearer
                                .and_then(|t| std::str::from_utf8(t).ok())
                                .is_some_and(|t| check(t)),
                        };
                        let resp = if ok {
                            hyper::Response::new(Full::new(body.clone()))
                        } else {
                            rejected.fetch_add(1, Ordering::Relaxed);
                            let mut r = hyper::Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = http::StatusCode::UNAUTHORIZED;
                            r
                        };
                        async move { Ok::<_, std::convert::Infallible>(resp) }
                    });
                    if let Some(acceptor) = acceptor {
                        let Ok(tls) = acceptor.accept(s).await else {
                            return;
                        };
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), svc)
                            .await;
                    } else if h2c {
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(s), svc)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(s), svc)
                            .await;
                    }
                });
            }
        });
    });
    Upstream {
        addr: rx.recv().unwrap(),
        rejected,
        no_bearer,
    }
}
