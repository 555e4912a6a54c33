//! The configured token store: a file store (see `file_store`) or
//! PostgreSQL (fleet mode, see `pg`), behind one interface the engine uses.
//! Knows nothing of HTTP or of when to refresh.

pub use super::file_store::{CredentialLock, FileStore};
use super::pg::{PgLease, PgStore};
pub use super::record::{
    from_unix_ms, new_family, normalize_endpoint, unix_ms, DeadMark, Intent, Record, Rekeyed,
    StoreError,
};
use super::seal::Keyring;
use crate::secret::Secret;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

/// The configured store: one file (one writer per refresh token) or
/// postgres (fleet mode). Cheap to clone.
#[derive(Clone, Debug)]
pub enum Store {
    File(FileStore),
    Postgres(PgStore),
}

/// Held across a whole spend: the file lock or the postgres lease.
#[derive(Debug)]
pub enum StoreLock {
    File(CredentialLock),
    Lease(PgLease),
}

impl StoreLock {
    /// Whether `rec` is older than a generation of its family already
    /// written (a store restored from an older backup): presenting its
    /// refresh token would be a reuse.
    pub fn is_rolled_back(&self, rec: &Record) -> bool {
        match self {
            StoreLock::File(l) => l
                .high_water()
                .is_some_and(|(f, g)| f == rec.family && g > rec.generation),
            StoreLock::Lease(_) => false,
        }
    }

    /// Notes a durable write of `rec` (the file store's high-water mark).
    pub fn note_written(&self, rec: &Record) {
        if let StoreLock::File(l) = self {
            if let Err(e) = l.raise_high_water(rec) {
                tracing::warn!(event = "high_water_write_failed", error = %e, "Could not record the credential's newest generation beside the store");
            }
        }
    }

    /// Releases at once (the file lock on drop; the lease with a round trip).
    pub async fn release(self) -> Result<(), StoreError> {
        match self {
            StoreLock::File(_) => Ok(()),
            StoreLock::Lease(l) => l.release().await,
        }
    }
}

impl Store {
    /// Opens the store as configured; postgres connects and migrates.
    pub async fn open_config(config: &crate::config::StoreConfig) -> Result<Store, StoreError> {
        match config.kind {
            crate::config::StoreKind::File => FileStore::open_config(config).map(Store::File),
            crate::config::StoreKind::Postgres => {
                let url = config.url.as_ref().ok_or_else(|| StoreError::Url {
                    message: "missing".into(),
                })?;
                PgStore::open(url, Keyring::from_config(config))
                    .await
                    .map(Store::Postgres)
            }
        }
    }

    /// Identifies the configured store, to reuse an open one on reload.
    pub fn config_key(config: &crate::config::StoreConfig) -> String {
        // Every key: a reload that changes any of them reopens the store.
        let key: Vec<String> = config
            .encryption_key
            .iter()
            .chain(&config.previous_encryption_keys)
            .map(Secret::fingerprint)
            .collect();
        let key = key.join(",");
        match config.kind {
            crate::config::StoreKind::File => format!("file:{}:{key}", config.path.display()),
            crate::config::StoreKind::Postgres => format!(
                "postgres:{}:{key}",
                config
                    .url
                    .as_ref()
                    .map(Secret::fingerprint)
                    .unwrap_or_default()
            ),
        }
    }

    pub fn path(&self) -> Option<&Path> {
        match self {
            Store::File(f) => Some(f.path()),
            Store::Postgres(_) => None,
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Store::Postgres(_))
    }

    pub async fn lock_credential(&self, name: &str) -> Result<StoreLock, StoreError> {
        match self {
            Store::File(f) => f.lock_credential(name).await.map(StoreLock::File),
            Store::Postgres(p) => p.lock_credential(name).await.map(StoreLock::Lease),
        }
    }

    pub async fn read(&self, name: &str) -> Result<Option<Record>, StoreError> {
        match self {
            Store::File(f) => {
                // Off the calling thread: it may also serve proxy traffic,
                // and a changed file is parsed and unsealed whole.
                let (f, name) = (f.clone(), name.to_owned());
                f.clone().blocking(move || f.read(&name)).await
            }
            Store::Postgres(p) => p.read(name).await,
        }
    }

    /// The credential's record for a periodic change check: possibly a
    /// moment old (a file snapshot confirmed within `POLL_FRESH`; on
    /// postgres, one query for every credential per poll round). Never the
    /// read before a spend: that is [`Store::read`].
    pub async fn poll(&self, name: &str) -> Result<Option<Record>, StoreError> {
        match self {
            Store::File(f) => {
                if let Some(hit) = f.poll_cached(name, Instant::now()) {
                    return Ok(hit);
                }
                let (f, name) = (f.clone(), name.to_owned());
                f.clone().blocking(move || f.poll_blocking(&name)).await
            }
            Store::Postgres(p) => p.poll(name).await,
        }
    }

    /// Writes the record. `prev` is the identity the writer read under its
    /// lock; the write is refused (`Fenced`) when the record moved on.
    pub async fn write(
        &self,
        name: &str,
        rec: &Record,
        prev: Option<(&str, u64)>,
    ) -> Result<(), StoreError> {
        match self {
            Store::File(f) => {
                // Off the calling thread: the store-wide write lock can be
                // held by another process, and the write fsyncs.
                let (f, name, rec) = (f.clone(), name.to_owned(), rec.clone());
                let prev = prev.map(|(fam, g)| (fam.to_owned(), g));
                f.clone()
                    .blocking(move || {
                        f.write_fenced(
                            &name,
                            &rec,
                            prev.as_ref().map(|(fam, g)| (fam.as_str(), *g)),
                            true,
                        )
                    })
                    .await
            }
            Store::Postgres(p) => p.write(name, rec, prev).await,
        }
    }

    /// As [`Store::write`] by the holder of `lock`: on postgres, refused
    /// (`Fenced`) once the lease is lost, and `hold_for` makes the lease
    /// last at least that long (a grant about to be sent). The file lock
    /// cannot be lost while held.
    pub async fn write_held(
        &self,
        lock: &StoreLock,
        name: &str,
        rec: &Record,
        prev: Option<(&str, u64)>,
        hold_for: Option<Duration>,
    ) -> Result<(), StoreError> {
        match (self, lock) {
            (Store::Postgres(p), StoreLock::Lease(l)) => {
                p.write_held(l, name, rec, prev, hold_for).await
            }
            _ => self.write(name, rec, prev).await,
        }
    }

    /// Reseals every stored record under the current key (no grant, no
    /// change of family or generation). Records that cannot be opened are
    /// reported and left untouched.
    pub async fn rekey(&self) -> Result<Rekeyed, StoreError> {
        match self {
            Store::File(f) => {
                let f = f.clone();
                tokio::task::spawn_blocking(move || f.rekey())
                    .await
                    .map_err(|e| StoreError::Write {
                        path: PathBuf::new(),
                        source: io::Error::other(e),
                    })?
            }
            Store::Postgres(p) => p.rekey().await,
        }
    }

    /// Wakes on writes by other processes (postgres LISTEN; the file
    /// store's sweep); `None` for a file store outside a runtime.
    pub fn changes(&self, name: &str) -> Option<tokio::sync::watch::Receiver<u64>> {
        match self {
            Store::File(f) => f.changes(name),
            Store::Postgres(p) => Some(p.changes(name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_compare_normalised() {
        let n = normalize_endpoint;
        let same = [
            ("http://127.0.0.1:8080/token", "http://localhost:8080/token"),
            ("http://127.0.0.1:8080/token", "http://[::1]:8080/token/"),
            (
                "https://IdP.Example.com/oauth/token",
                "https://idp.example.com:443/oauth/token",
            ),
            (
                "https://idp.example.com/oauth/token/",
                "HTTPS://idp.example.com/oauth/token",
            ),
        ];
        for (a, b) in same {
            assert_eq!(n(a), n(b), "{a} vs {b}");
        }
        let different = [
            (
                "https://idp.example.com/oauth/token",
                "https://idp.example.com/oauth2/token",
            ),
            (
                "https://idp.example.com/token",
                "http://idp.example.com/token",
            ),
            (
                "https://idp.example.com/token",
                "https://idp.example.com:8443/token",
            ),
            ("https://a.example.com/token", "https://b.example.com/token"),
            ("http://localhost:1/token", "http://localhost:2/token"),
        ];
        for (a, b) in different {
            assert_ne!(n(a), n(b), "{a} vs {b}");
        }
    }
}
