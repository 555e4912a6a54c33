//! Configs built in code and an in-process proxy on `127.0.0.1:0` whose
//! routes inject fixed tokens in front of an echo upstream.

use http::{HeaderName, HeaderValue};
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
        upstream_from: None,
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

/// One header's values as the echo upstream reported them.
pub fn echoed<'a>(report: &'a serde_json::Value, name: &str) -> Vec<&'a str> {
    report["headers"][name]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default()
}

/// `config(routes)` with the proxy's listener on TLS: the dev test
/// certificate for `localhost` (src/dev/testdata).
pub fn tls_config(routes: Vec<RouteConfig>) -> Config {
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/src/dev/testdata");
    let mut cfg = config(routes);
    cfg.server.tls_cert = Some(format!("{data}/test-leaf.pem").into());
    cfg.server.tls_key = Some(format!("{data}/test-leaf.key").into());
    cfg
}

/// A TLS client that trusts the dev test CA.
pub fn test_tls_client() -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(tokenproxy::dev::tls::test_root_store())
        .with_no_client_auth()
}
