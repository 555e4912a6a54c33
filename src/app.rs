//! The composition root: builds the engine, the proxy and the admin listener
//! from a validated `Config`, binds the listeners and returns a handle with
//! the bound addresses and `shutdown()`. Tests start the whole proxy
//! in-process through here on `127.0.0.1:0`.

use crate::config::Config;
use crate::proxy::{self, Proxy};
use crate::token::{Engine, EngineError};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("token engine")]
    Engine(#[from] EngineError),
    #[error("proxy")]
    Proxy(#[from] proxy::ProxyBuildError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("route {route} has no token source")]
    NoToken { route: String },
}

/// A running tokenproxy.
pub struct App {
    /// Bound proxy listeners, as `IP:port` or `unix:/path`.
    pub proxy_addrs: Vec<String>,
    /// The first TCP proxy listener (what tests and the demo talk to).
    pub proxy_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub engine: Arc<Engine>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl App {
    pub async fn start(config: &Config) -> Result<App, AppError> {
        let shutdown = CancellationToken::new();
        let engine = Arc::new(Engine::start(config, shutdown.clone()).await?);
        Self::start_with_engine(config, engine, shutdown).await
    }

    /// With an engine built by the caller (tests inject a clock).
    pub async fn start_with_engine(
        config: &Config,
        engine: Arc<Engine>,
        shutdown: CancellationToken,
    ) -> Result<App, AppError> {
        if let Some(route) = config
            .routes
            .iter()
            .find(|r| engine.route_token(config, r).is_none())
        {
            return Err(AppError::NoToken {
                route: route.path_prefix.clone(),
            });
        }
        let proxy = Proxy::new(config, &|_, route| {
            engine
                .route_token(config, route)
                .expect("checked above: every route has a token source")
        })?;
        let mut tasks = Vec::new();
        let mut proxy_addrs = Vec::new();
        let mut proxy_addr = None;
        let mut listeners = Vec::new();
        for addr in &config.server.listen {
            let listener = proxy::bind(addr).await.map_err(|source| AppError::Bind {
                addr: addr.to_string(),
                source,
            })?;
            if let (None, proxy::Listener::Tcp(l)) = (proxy_addr, &listener) {
                proxy_addr = l.local_addr().ok();
            }
            proxy_addrs.push(listener.local_addr_string());
            listeners.push(listener);
        }
        let admin_listener =
            proxy::bind(&config.admin.listen)
                .await
                .map_err(|source| AppError::Bind {
                    addr: config.admin.listen.to_string(),
                    source,
                })?;
        let admin_addr = match &admin_listener {
            proxy::Listener::Tcp(l) => l.local_addr().ok(),
            proxy::Listener::Unix(_) => None,
        };
        for listener in listeners {
            tasks.push(tokio::spawn(proxy::serve(
                listener,
                proxy.clone(),
                shutdown.clone(),
            )));
        }
        tasks.push(tokio::spawn(crate::admin::serve(
            admin_listener,
            engine.clone(),
            shutdown.clone(),
        )));
        tracing::info!(
            listen = %proxy_addrs.join(","),
            admin = %config.admin.listen,
            routes = config.routes.len(),
            credentials = config.credentials.len(),
            version = env!("CARGO_PKG_VERSION"),
            "tokenproxy started"
        );
        Ok(App {
            proxy_addrs,
            proxy_addr,
            admin_addr,
            engine,
            shutdown,
            tasks,
        })
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, lets in-flight requests finish (bounded by the
    /// listeners' grace), and starts no refresh meanwhile.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        tracing::info!("tokenproxy stopped");
    }
}
