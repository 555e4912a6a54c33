//! The integration harness: one home for what tests share.
//!
//! - this file: HTTP clients and requests, polling with deadlines, ports,
//!   and skips that fail under CI;
//! - [`inproc`]: configs built in code and an in-process proxy with fixed
//!   tokens in front of an echo upstream;
//! - [`env`]: a dev IdP, an echo upstream and a config written as TOML text,
//!   run in-process ([`TestEnv`]);
//! - [`stack`]: the token-engine scenarios: a stack whose store tests read
//!   and write, `tokenproxy run` children killed on drop, CLI runs, and
//!   fault-scenario repetition.

#![allow(dead_code)]

pub mod env;
pub mod inproc;
pub mod stack;

pub use env::*;
pub use inproc::*;
pub use stack::*;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

/// Polls `f` every 20 ms until it yields `Some`, or panics after `within`.
pub async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > within {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A response as tests look at it.
#[derive(Debug, Clone)]
pub struct Got {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn try_get(c: &HttpClient, url: &str) -> Result<Got, String> {
    let req = http::Request::get(url).body(Full::default()).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(15), c.request(req))
        .await
        .map_err(|_| "timeout".to_owned())?
        .map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Got {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    })
}

pub async fn get_ok(c: &HttpClient, url: &str) -> Got {
    try_get(c, url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// A port free right now (bind 127.0.0.1:0 and drop).
/// A port for a listener a test starts later (a child process, a config
/// written first). Taken below Linux's ephemeral range (32768 and up), from
/// a counter: a port the kernel hands out, for another test's `bind(:0)` or
/// an outgoing connection, could otherwise be taken between this check and
/// the child's bind (`EADDRINUSE` in a loaded CI run).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const LOW: u16 = 20_000;
    const SPAN: u16 = 12_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        1 + rand::random::<u16>() % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let port = LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN)
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2c_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::default()).unwrap()
}

/// Status, headers and the whole body (tests only).
pub async fn send(c: &HttpClient, req: Request<Full<Bytes>>) -> (Response<()>, Bytes) {
    let resp = c.request(req).await.expect("request");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    (Response::from_parts(parts, ()), bytes)
}

/// A credential's file in a file store (`<store.path>.d/<name>.json`).
pub fn record_file(store: &std::path::Path, name: &str) -> std::path::PathBuf {
    let mut dir = store.as_os_str().to_owned();
    dir.push(".d");
    std::path::PathBuf::from(dir).join(format!("{name}.json"))
}

/// A credential's record as its file holds it (unsealed stores only), or null.
pub fn stored_record(store: &std::path::Path, name: &str) -> serde_json::Value {
    match std::fs::read(record_file(store, name)) {
        Ok(b) => json(&b)["record"].clone(),
        Err(_) => serde_json::Value::Null,
    }
}

/// Replaces a credential's record file atomically (temp + rename), as an
/// operator or another process would.
pub fn replace_record(store: &std::path::Path, name: &str, rec: serde_json::Value) {
    let path = record_file(store, name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = serde_json::json!({"version": 2, "credential": name, "record": rec});
    let tmp = path.with_extension("operator-tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&file).unwrap()).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

pub fn json(b: &[u8]) -> serde_json::Value {
    serde_json::from_slice(b)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(b)))
}

/// Write a raw HTTP/1.1 request and read the response head (and whatever
/// body bytes arrived with it) until the connection closes or `until` is seen.
pub async fn raw(addr: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A test that cannot run here says so; under CI (where tests/run.sh
/// installs everything) it fails instead, so a skip is never silent there.
pub fn skip_unless_ci(test: &str, why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} cannot run under CI: {why}"
    );
    eprintln!("SKIP {test}: {why} (fatal when CI is set)");
}

/// This machine's IPv4 address off loopback (the source address of its
/// default route) when it has one that can be bound: an admin listener there
/// treats even local clients as remote.
pub fn non_loopback_ip() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    // Connecting a UDP socket only picks a route; nothing is sent.
    s.connect("203.0.113.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    if ip.is_loopback() || ip.is_unspecified() {
        return None;
    }
    std::net::TcpListener::bind((ip, 0)).ok()?;
    Some(ip)
}

/// A free port on `ip`.
pub fn free_port_on(ip: std::net::IpAddr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
