//! The composition root: builds the engine, the proxy and the admin listener
//! from a validated `Config`, binds the listeners and returns a handle with
//! the bound addresses, `reload()` and `shutdown()`; what the running parts
//! share is the [`Live`] handle. Tests start the whole
//! proxy in-process through here on `127.0.0.1:0`.
//!
//! Reload (SIGHUP, `POST /reload`, or a change of the config file or a
//! `*_file` secret) swaps the proxy and the engine whole; unchanged
//! credentials keep their state. An invalid new config is rejected with its
//! errors and the old one kept. Listeners are bound once: changing them needs
//! a restart.

use crate::config::Config;
use crate::live::build_proxy;
pub use crate::live::{AppError, Live};
use crate::proxy;
use crate::token::Engine;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running tokenproxy.
pub struct App {
    /// Bound proxy listeners, as `IP:port` or `unix:/path`.
    pub proxy_addrs: Vec<String>,
    /// The first TCP proxy listener (what tests and the demo talk to).
    pub proxy_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub live: Arc<Live>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl App {
    pub async fn start(config: &Config) -> Result<App, AppError> {
        let shutdown = CancellationToken::new();
        let engine = Arc::new(Engine::start(config, shutdown.clone()).await?);
        Self::start_with_engine(config, engine, shutdown).await
    }

    /// As [`App::start`], on a current-thread runtime, serving the listeners
    /// from `server.worker_threads` threads: this one and one more
    /// single-threaded runtime per extra worker, all accepting on the same
    /// sockets (nginx's worker model). The engine, the admin API and reloads
    /// stay on this thread's runtime.
    pub(crate) async fn start_with_workers(config: &Config) -> Result<App, AppError> {
        let shutdown = CancellationToken::new();
        let engine = Arc::new(Engine::start(config, shutdown.clone()).await?);
        let extra_workers = config.server.worker_threads.saturating_sub(1);
        Self::start_inner(config, engine, shutdown, extra_workers).await
    }

    /// With an engine built by the caller (tests inject a clock).
    pub async fn start_with_engine(
        config: &Config,
        engine: Arc<Engine>,
        shutdown: CancellationToken,
    ) -> Result<App, AppError> {
        Self::start_inner(config, engine, shutdown, 0).await
    }

    async fn start_inner(
        config: &Config,
        engine: Arc<Engine>,
        shutdown: CancellationToken,
        extra_workers: usize,
    ) -> Result<App, AppError> {
        let proxy = build_proxy(config, &engine)?;
        let live = Arc::new(Live::new(config, engine, proxy));
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
        // Each extra worker accepts on its own handle of every proxy socket.
        let mut per_worker: Vec<Vec<_>> = (0..extra_workers).map(|_| Vec::new()).collect();
        for listener in listeners {
            let permits = Arc::new(tokio::sync::Semaphore::new(
                config.server.max_connections.max(1),
            ));
            for mine in &mut per_worker {
                let handle = listener.try_clone_std().map_err(|source| AppError::Bind {
                    addr: listener.local_addr_string(),
                    source,
                })?;
                mine.push((handle, permits.clone()));
            }
            tasks.push(tokio::spawn(proxy::serve_with_permits(
                listener,
                live.proxy.clone(),
                shutdown.clone(),
                permits,
            )));
        }
        tasks.push(tokio::spawn(crate::admin::serve(
            admin_listener,
            live.clone(),
            shutdown.clone(),
        )));
        if config.source.is_file() {
            tasks.push(tokio::spawn(watch_files(live.clone(), shutdown.clone())));
        }
        for (i, mine) in per_worker.into_iter().enumerate() {
            let worker = i + 1;
            let (shared, shutdown) = (live.proxy.clone(), shutdown.clone());
            let thread = std::thread::Builder::new()
                .name(format!("tokenproxy-worker-{worker}"))
                .spawn(move || serve_worker(worker, mine, shared, shutdown))
                .map_err(|source| AppError::Worker { worker, source })?;
            tasks.push(tokio::task::spawn_blocking(move || {
                let _ = thread.join();
            }));
        }
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
            live,
            shutdown,
            tasks,
        })
    }

    /// Re-reads the config file and applies it (see the module doc).
    pub async fn reload(&self) -> Result<(), AppError> {
        self.live.reload().await
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, lets in-flight requests finish (bounded by the
    /// listeners' grace), and starts no refresh meanwhile.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let listeners = async {
            for t in self.tasks {
                let _ = t.await;
            }
        };
        // A grant cut off by exit may have rotated the refresh token
        // without its answer being saved: wait for it, bounded, alongside
        // the requests' drain (the two windows overlap, not add up).
        let engine = self.live.engine.load_full();
        let (drain, bound) = (engine.drain().clone(), engine.drain_bound());
        let refreshes = async {
            if drain.in_flight() > 0 {
                tracing::info!(
                    event = "shutdown_drain",
                    refreshes = drain.in_flight(),
                    "Waiting for refreshes in flight to finish and be saved"
                );
                if !drain.wait(bound).await {
                    tracing::warn!(
                        event = "shutdown_drain_timeout",
                        "A refresh was still in flight at exit"
                    );
                }
            }
        };
        tokio::join!(listeners, refreshes);
        tracing::info!("tokenproxy stopped");
    }
}

/// One extra proxy worker: its own single-threaded runtime accepting on
/// the shared sockets until shutdown.
fn serve_worker(
    worker: usize,
    listeners: Vec<(proxy::StdListener, Arc<tokio::sync::Semaphore>)>,
    shared: proxy::SharedProxy,
    shutdown: CancellationToken,
) {
    proxy::set_worker(worker);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(worker, error = %e, "Worker runtime failed to start; the other workers serve");
            return;
        }
    };
    runtime.block_on(async move {
        let mut serving = Vec::new();
        for (listener, permits) in listeners {
            match listener.into_tokio() {
                Ok(l) => serving.push(tokio::spawn(proxy::serve_with_permits(
                    l,
                    shared.clone(),
                    shutdown.clone(),
                    permits,
                ))),
                Err(e) => {
                    tracing::error!(worker, error = %e, "Worker cannot use a listener; the other workers serve it")
                }
            }
        }
        for s in serving {
            let _ = s.await;
        }
    });
}

/// The files whose change triggers a reload: the config and its secrets.
fn watched_files(config: &Config) -> Vec<PathBuf> {
    let mut files = vec![config.source.clone()];
    // A renewed listener certificate (cert-manager, certbot) applies by itself.
    files.extend(config.server.tls_cert.clone());
    files.extend(config.server.tls_key.clone());
    for c in config.credentials.values() {
        files.extend(c.client_secret_file.clone());
        files.extend(c.refresh_token_file.clone());
        match &c.client_assertion {
            Some(crate::config::AssertionSource::Key { path, cert, .. }) => {
                files.push(path.clone());
                files.extend(cert.clone());
            }
            // Read per request anyway; watched so a dead credential retries
            // as soon as a renewed token lands.
            Some(crate::config::AssertionSource::File(path)) => files.push(path.clone()),
            None => {}
        }
        if let Some(crate::config::DpopSource::File { path, .. }) = &c.dpop {
            files.push(path.clone());
        }
    }
    files
}

type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(files: &[PathBuf]) -> Stamp {
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .ok()
                .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
        })
        .collect()
}

/// Polls (every 2 s: cheap, and works on every filesystem and for
/// Kubernetes' symlink-swapped ConfigMaps) and reloads on change.
async fn watch_files(live: Arc<Live>, shutdown: CancellationToken) {
    let mut files = watched_files(&live.config.load());
    let mut last = stamp(&files);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.cancelled() => return,
        }
        let now = stamp(&files);
        if now == last {
            continue;
        }
        tracing::info!(
            event = "config_changed",
            "Config or secret file changed; reloading"
        );
        // A rejected reload logs itself and keeps the running config.
        let _ = live.reload().await;
        files = watched_files(&live.config.load());
        last = stamp(&files);
    }
}
