//! Shared helpers for integration tests: configs built in code, an
//! in-process proxy on `127.0.0.1:0`, an echo upstream, plain hyper clients.

#![allow(dead_code)]

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokenproxy::config::{
    AdminConfig, Config, ListenAddr, LogConfig, LogFormat, RouteConfig, ServerConfig, StoreConfig,
    StoreKind, TokenFormat,
};
use tokenproxy::dev::EchoUpstream;
use tokenproxy::proxy::{bind, serve, Listener, Proxy};
use tokenproxy::token::RouteToken;
use tokio_util::sync::CancellationToken;

/// The token the fixed `RouteToken`s inject and the echo upstream accepts.
pub const GOOD_TOKEN: &str = "good-token";

/// A route with the documented defaults.
pub fn route(prefix: &str, upstream: &str) -> RouteConfig {
    RouteConfig {
        path_prefix: prefix.to_owned(),
        host: None,
        upstream: upstream.parse().expect("upstream URL"),
        credential: "test".to_owned(),
        strip_prefix: true,
        header: HeaderName::from_static("authorization"),
        format: TokenFormat::default(),
        scopes: None,
        resource: None,
        refresh_on: vec![401],
        replay: true,
        replay_max_body: 64 * 1024,
        connect_timeout: Duration::from_secs(5),
        response_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(60),
        upgrades: false,
        ca_file: None,
        allow_plaintext: false,
    }
}

/// A config with defaults everywhere and these routes.
pub fn config(routes: Vec<RouteConfig>) -> Config {
    Config {
        source: PathBuf::from("test.toml"),
        server: ServerConfig {
            listen: vec![ListenAddr::Tcp("127.0.0.1:0".parse().unwrap())],
            hosts: vec![],
            tls_cert: None,
            tls_key: None,
            worker_threads: 2,
            max_connections: 10_000,
            shutdown_grace: Duration::from_secs(5),
            egress_proxy: None,
        },
        admin: AdminConfig {
            listen: ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()),
            token: None,
            ready_requires_tokens: false,
        },
        store: StoreConfig {
            kind: StoreKind::File,
            path: PathBuf::from("tokens.json"),
            url: None,
            encryption_key: None,
        },
        log: LogConfig {
            format: LogFormat::Pretty,
            level: "info".to_owned(),
        },
        credentials: BTreeMap::new(),
        routes,
    }
}

pub async fn echo() -> EchoUpstream {
    EchoUpstream::start(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(|t: &str| t == GOOD_TOKEN),
    )
    .await
    .expect("echo upstream starts")
}

/// A proxy serving in-process; shut down on drop of `shutdown` or explicitly.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl TestProxy {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn build_proxy(config: &Config) -> Arc<Proxy> {
    Proxy::new(config, &|_, r| {
        RouteToken::fixed(
            &r.credential,
            HeaderValue::from_str(&format!("Bearer {GOOD_TOKEN}")).unwrap(),
        )
    })
    .expect("proxy builds")
}

pub async fn start_proxy_with(config: Config) -> TestProxy {
    let proxy = build_proxy(&config);
    let listener = bind(&config.server.listen[0]).await.expect("bind");
    let Listener::Tcp(l) = &listener else {
        panic!("tcp listener expected")
    };
    let addr = l.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve(listener, proxy, shutdown.clone()));
    TestProxy {
        addr,
        shutdown,
        task,
    }
}

pub async fn start_proxy(routes: Vec<RouteConfig>) -> TestProxy {
    start_proxy_with(config(routes)).await
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2c_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::default()).unwrap()
}

/// Status, headers and the whole body (tests only).
pub async fn send(c: &TestClient, req: Request<Full<Bytes>>) -> (Response<()>, Bytes) {
    let resp = c.request(req).await.expect("request");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    (Response::from_parts(parts, ()), bytes)
}

pub fn json(b: &[u8]) -> serde_json::Value {
    serde_json::from_slice(b)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(b)))
}

/// One header's values as the echo upstream reported them.
pub fn echoed<'a>(report: &'a serde_json::Value, name: &str) -> Vec<&'a str> {
    report["headers"][name]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default()
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
