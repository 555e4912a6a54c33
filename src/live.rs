//! The handle a running proxy shares between the composition root, the
//! admin listener and the login endpoints: the current config, engine and
//! proxy (swapped whole on reload), `/readyz`'s store check and the admin
//! flow's pending logins. Binds nothing; `app` builds it.

use crate::config::{self, Config};
use crate::proxy::{self, Proxy, SharedProxy};
use crate::token::store::FileStore;
use crate::token::{Engine, EngineError};
use arc_swap::ArcSwap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

/// Why the proxy could not start, or a new configuration was not applied.
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
    #[error("cannot start proxy worker thread {worker}")]
    Worker {
        worker: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("route {route} has no token source")]
    NoToken { route: String },
    #[error("new configuration rejected:\n{0}")]
    Config(#[from] config::ConfigErrors),
}

/// The running proxy's shared state: what a reload swaps, and what the
/// admin listener keeps between requests.
pub struct Live {
    pub config: ArcSwap<Config>,
    pub engine: ArcSwap<Engine>,
    pub proxy: SharedProxy,
    /// `/readyz`'s last store check.
    pub ready: ReadyCache,
    /// The admin listener's browser logins in progress.
    pub logins: crate::login::AdminLogins,
    /// Device logins this process polls for (`POST /credentials/<name>/device`).
    pub devices: crate::device::DeviceLogins,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
}

impl Live {
    pub(crate) fn new(config: &Config, engine: Arc<Engine>, proxy: Arc<Proxy>) -> Live {
        Live {
            config: ArcSwap::from_pointee(config.clone()),
            engine: ArcSwap::new(engine),
            proxy: Arc::new(ArcSwap::new(proxy)),
            ready: Default::default(),
            logins: Default::default(),
            devices: Default::default(),
            reloading: tokio::sync::Mutex::new(()),
        }
    }
}

/// The data path for `config`, each route given its engine token handle;
/// refused when a route has none.
pub(crate) fn build_proxy(config: &Config, engine: &Engine) -> Result<Arc<Proxy>, AppError> {
    if let Some(route) = config
        .routes
        .iter()
        .find(|r| engine.route_token(config, r).is_none())
    {
        return Err(AppError::NoToken {
            route: route.path_prefix.clone(),
        });
    }
    Ok(Proxy::new(config, &|_, route| {
        engine
            .route_token(config, route)
            .expect("checked above: every route has a token source")
    })?)
}

impl Live {
    /// Loads the config file again and swaps it in, or keeps the old one.
    pub async fn reload(&self) -> Result<(), AppError> {
        let _one = self.reloading.lock().await;
        let source = self.config.load().source.clone();
        let new = match config::load(&source) {
            Ok(c) => c,
            Err(errors) => {
                tracing::error!(
                    event = "reload_rejected",
                    errors = %errors,
                    "New configuration rejected; keeping the running one"
                );
                return Err(errors.into());
            }
        };
        self.apply(new).await
    }

    async fn apply(&self, new: Config) -> Result<(), AppError> {
        let old_config = self.config.load_full();
        let restart_needed = restart_only_changes(&old_config, &new);
        if !restart_needed.is_empty() {
            tracing::warn!(
                event = "reload_partial",
                keys = %restart_needed.join(", "),
                "These settings apply only after a restart"
            );
        }
        let old_engine = self.engine.load_full();
        let engine = match old_engine.reload(&new).await {
            Ok(e) => Arc::new(e),
            Err(e) => {
                tracing::error!(event = "reload_rejected", error = %crate::error_chain(&e), "New configuration rejected; keeping the running one");
                return Err(e.into());
            }
        };
        let proxy = match build_proxy(&new, &engine) {
            Ok(p) => p,
            Err(e) => {
                // Stop the slots built for the rejected config.
                engine.retire_unused(&old_engine);
                tracing::error!(event = "reload_rejected", error = %crate::error_chain(&e), "New configuration rejected; keeping the running one");
                return Err(e);
            }
        };
        self.proxy.store(proxy);
        self.engine.store(engine.clone());
        self.config.store(Arc::new(new));
        old_engine.retire_unused(&engine);
        tracing::info!(event = "reloaded", "Configuration reloaded");
        Ok(())
    }
}

/// Settings bound at start-up.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    if old.server.listen != new.server.listen {
        keys.push("server.listen");
    }
    if old.server.worker_threads != new.server.worker_threads {
        keys.push("server.worker_threads");
    }
    if old.server.max_connections != new.server.max_connections {
        keys.push("server.max_connections");
    }
    if old.server.max_header_bytes != new.server.max_header_bytes {
        keys.push("server.max_header_bytes");
    }
    if old.server.max_headers != new.server.max_headers {
        keys.push("server.max_headers");
    }
    if old.admin.listen != new.admin.listen {
        keys.push("admin.listen");
    }
    if old.log.format != new.log.format || old.log.level != new.log.level {
        keys.push("log");
    }
    keys
}

/// `/readyz`'s view of the file store: a probe every few seconds must not
/// read, parse and unseal the whole store. The full read runs again only
/// when the file (size, mtime, inode) or the config changed since it last
/// succeeded; a stat is all a probe costs otherwise.
#[derive(Default)]
pub struct ReadyCache {
    /// Full reads of the store, for tests.
    reads: std::sync::atomic::AtomicU64,
    // A sync mutex: held for a compare or a store, never across an await.
    last_ok: parking_lot::Mutex<Option<(StoreStamp, Arc<crate::config::Config>)>>,
}

/// What a stat says of the store file (None: absent, which reads as empty),
/// and of its records directory (every write renames a file into it).
type StoreStamp = (FileStamp, FileStamp);
type FileStamp = Option<(u64, Option<SystemTime>, u64, u64)>;

impl ReadyCache {
    pub fn store_reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// None when the store reads fine, else why not.
    pub(crate) fn check(
        &self,
        config: &Arc<crate::config::Config>,
    ) -> Option<crate::token::store::StoreError> {
        use std::os::unix::fs::MetadataExt;
        let stat = |path: &std::path::Path, file: bool| -> Option<FileStamp> {
            match std::fs::metadata(path) {
                Ok(m) if m.is_file() == file => {
                    Some(Some((m.len(), m.modified().ok(), m.ino(), m.dev())))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(None),
                // The wrong kind or an error: read it and say why.
                _ => None,
            }
        };
        let mut records = config.store.path.clone().into_os_string();
        records.push(".d");
        let stamp: Option<StoreStamp> =
            stat(&config.store.path, true).zip(stat(std::path::Path::new(&records), false));
        if let (Some(stamp), Some((seen, cfg))) = (&stamp, &*self.last_ok.lock()) {
            if stamp == seen && Arc::ptr_eq(cfg, config) {
                return None;
            }
        }
        self.reads.fetch_add(1, Ordering::Relaxed);
        match FileStore::probe(&config.store) {
            Ok(_) => {
                *self.last_ok.lock() = stamp.map(|s| (s, config.clone()));
                None
            }
            Err(e) => {
                *self.last_ok.lock() = None;
                Some(e)
            }
        }
    }
}
