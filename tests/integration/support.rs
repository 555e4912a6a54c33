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
            header_read_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(75),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
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
            previous_encryption_keys: Vec::new(),
        },
        log: LogConfig {
            format: LogFormat::Pretty,
            level: "info".to_owned(),
            access: false,
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

// ---------------------------------------------------------------------------
// A whole tokenproxy (engine, proxy, admin) against the dev IdP and echo.
// ---------------------------------------------------------------------------

use tokenproxy::app::App;
use tokenproxy::dev::{DevIdp, IdpOptions};

/// Polls every 20 ms until `f` returns `Some`, or panics after `deadline`.
pub async fn poll_until<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A dev IdP, an echo upstream judged by it, a temp dir holding the config
/// file and the store, and (once started) the app built from that config.
///
/// Config snippets may use `@TOKEN_URL@`, `@IDP@` and `@ECHO@`; the
/// `[server]`, `[admin]` and `[store]` tables (ephemeral ports, store
/// `tokens.json` beside the config) are prepended. `${VAR}` values come from
/// [`TestEnv::vars`].
pub struct TestEnv {
    pub idp: DevIdp,
    pub echo: EchoUpstream,
    pub dir: tempfile::TempDir,
    pub vars: BTreeMap<String, String>,
    pub config: Option<Config>,
    pub app: Option<App>,
    pub client: TestClient,
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

/// Where [`TestEnv`] binds the admin listener. `check` refuses
/// `127.0.0.1:0` for both listeners (see
/// `tokens::port_zero_for_both_listeners_is_accepted`), so the admin side
/// takes another loopback address.
pub const ADMIN_LISTEN: &str = "127.0.0.2:0";

impl TestEnv {
    pub async fn new(opts: IdpOptions) -> TestEnv {
        let local = "127.0.0.1:0".parse().unwrap();
        let idp = DevIdp::start(local, opts).await.expect("dev IdP starts");
        let echo = EchoUpstream::start(local, idp.token_check())
            .await
            .expect("echo upstream starts");
        TestEnv {
            idp,
            echo,
            dir: tempfile::tempdir().expect("tempdir"),
            vars: BTreeMap::new(),
            config: None,
            app: None,
            client: client(),
        }
    }

    pub fn var(&mut self, name: &str, value: &str) -> &mut Self {
        self.vars.insert(name.to_owned(), value.to_owned());
        self
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("tokenproxy.toml")
    }

    pub fn store_path(&self) -> PathBuf {
        self.dir.path().join("tokens.json")
    }

    /// The full config text for a snippet of credentials and routes.
    pub fn render(&self, snippet: &str) -> String {
        let body = snippet
            .replace("@TOKEN_URL@", &self.idp.token_url())
            .replace("@IDP@", &self.idp.url())
            .replace("@ECHO@", &self.echo.url());
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"{ADMIN_LISTEN}\"\n\n\
             [store]\npath = \"tokens.json\"\n\n[log]\nformat = \"pretty\"\n\n{body}"
        )
    }

    /// Writes the config file and parses it (panicking on config errors).
    pub fn configure(&mut self, snippet: &str) -> &Config {
        let text = self.render(snippet);
        std::fs::write(self.config_path(), &text).expect("write config");
        let vars = self.vars.clone();
        let cfg = tokenproxy::config::parse(&text, &self.config_path(), &|k| vars.get(k).cloned())
            .unwrap_or_else(|e| panic!("config rejected:\n{e}\n---\n{text}"));
        self.config = Some(cfg);
        self.config.as_ref().unwrap()
    }

    /// Starts (or restarts after [`TestEnv::stop`]) the app on the config.
    pub async fn start(&mut self) {
        assert!(self.app.is_none(), "app already running");
        let cfg = self.config.as_ref().expect("configure() first");
        self.app = Some(App::start(cfg).await.expect("app starts"));
    }

    /// `configure` then `start`.
    pub async fn start_with(&mut self, snippet: &str) {
        self.configure(snippet);
        self.start().await;
    }

    pub async fn stop(&mut self) {
        if let Some(app) = self.app.take() {
            app.shutdown().await;
        }
        // A fresh client: pooled connections point at the old listener.
        self.client = client();
    }

    pub fn app(&self) -> &App {
        self.app.as_ref().expect("app running")
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.app().proxy_addr.expect("tcp listener")
        )
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.app().admin_addr.expect("tcp admin"))
    }

    pub async fn get(&self, path: &str) -> (Response<()>, Bytes) {
        send(&self.client, get(&self.url(path))).await
    }

    /// Admin `GET path`: status and raw body.
    pub async fn admin_raw(&self, path: &str) -> (Response<()>, Bytes) {
        send(&self.client, get(&self.admin_url(path))).await
    }

    /// Admin `/credentials/<name>` as JSON (the first entry when several
    /// tokens share the name).
    pub async fn credential(&self, name: &str) -> serde_json::Value {
        let (resp, body) = self.admin_raw(&format!("/credentials/{name}")).await;
        assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
        match json(&body) {
            serde_json::Value::Array(mut a) => a.remove(0),
            v => v,
        }
    }

    /// Polls admin status until `pred` holds (deadline 5 s).
    pub async fn wait_credential(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        poll_until(what, Duration::from_secs(5), || async {
            let s = self.credential(name).await;
            pred(&s).then_some(s)
        })
        .await
    }

    /// The store file as JSON.
    pub fn store(&self) -> serde_json::Value {
        json(&std::fs::read(self.store_path()).expect("store file exists"))
    }

    /// A credential's record in the store.
    pub fn stored(&self, name: &str) -> serde_json::Value {
        self.store()["credentials"][name].clone()
    }

    /// How many times the IdP was presented this refresh token.
    pub fn presented(&self, refresh_token: &str) -> usize {
        self.idp
            .grants()
            .iter()
            .filter(|g| g.refresh_token.as_deref() == Some(refresh_token))
            .count()
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Some(app) = &self.app {
            app.shutdown_token().cancel();
        }
    }
}

/// The bearer token the echo upstream received.
pub fn echoed_bearer(report: &serde_json::Value) -> String {
    let auth = echoed(report, "authorization");
    auth.first()
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_else(|| panic!("no bearer token echoed: {report}"))
        .to_owned()
}
