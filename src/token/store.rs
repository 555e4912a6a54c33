//! The persisted token sets: one JSON file (`store.path`), written atomically
//! (temp file in the same directory, fsync, rename, fsync the directory) with
//! mode 0600, and one lock file per credential beside it, held (flock) across
//! a whole spend: re-read, grant, write.
//!
//! Knows nothing of HTTP or of when to refresh. The file holds every
//! credential's record, so a short store-wide lock guards each
//! read-modify-write; it is always taken after a credential lock, never
//! before, so the two cannot deadlock.
//!
//! With `store.encryption_key` the file holds the credentials sealed as one
//! value (see `seal`); `rekey` reseals everything under the current key.

use super::pg::{PgLease, PgStore};
pub use super::record::{
    from_unix_ms, new_family, normalize_endpoint, unix_ms, DeadMark, Intent, Record, Rekeyed,
    StoreError,
};
use super::seal::{self, Keyring};
use crate::secret::Secret;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

#[derive(Debug, Default, Serialize, Deserialize)]
struct StoreFile {
    version: u32,
    #[serde(default)]
    credentials: BTreeMap<String, Record>,
    /// With `store.encryption_key`: `credentials` as one sealed value
    /// (`tpv3:<key id>:<kdf>:...`; older: `tpv2:`, or bare base64 of XChaCha20-Poly1305).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed: Option<String>,
}

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
                // and the read unseals the whole file.
                let (f, name) = (f.clone(), name.to_owned());
                blocking(move || f.read(&name)).await
            }
            Store::Postgres(p) => p.read(name).await,
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
                blocking(move || {
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

    /// Wakes on writes by other replicas (postgres LISTEN); `None` for files.
    pub fn changes(&self, name: &str) -> Option<tokio::sync::watch::Receiver<u64>> {
        match self {
            Store::File(_) => None,
            Store::Postgres(p) => Some(p.changes(name)),
        }
    }
}

/// The file store. Cheap to clone.
#[derive(Clone)]
pub struct FileStore {
    path: PathBuf,
    keys: Option<Keyring>,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore")
            .field("path", &self.path)
            .field("keys", &self.keys)
            .finish()
    }
}

/// Held across a whole spend; dropping it releases the flock. The lock
/// file also keeps the credential's high-water mark (the newest family and
/// generation written): it is not part of the store file, so restoring that
/// file from a backup does not roll the mark back.
#[derive(Debug)]
pub struct CredentialLock {
    file: File,
}

impl CredentialLock {
    /// The newest (family, generation) written through this lock file.
    pub fn high_water(&self) -> Option<(String, u64)> {
        use std::io::{Read, Seek};
        let mut text = String::new();
        let mut f = &self.file;
        f.seek(io::SeekFrom::Start(0)).ok()?;
        f.read_to_string(&mut text).ok()?;
        let (family, generation) = text.trim().split_once(' ')?;
        Some((family.to_owned(), generation.parse().ok()?))
    }

    /// Records `rec` as the newest when it is (a new family, or a later
    /// generation of the same one).
    pub fn raise_high_water(&self, rec: &Record) -> io::Result<()> {
        use std::io::Seek;
        if let Some((family, generation)) = self.high_water() {
            if family == rec.family && generation >= rec.generation {
                return Ok(());
            }
        }
        let mut f = &self.file;
        f.set_len(0)?;
        f.seek(io::SeekFrom::Start(0))?;
        writeln!(f, "{} {}", rec.family, rec.generation)?;
        f.sync_data()
    }
}

impl FileStore {
    /// Opens (and checks) an unencrypted store; creates nothing until the
    /// first write.
    pub fn open(path: &Path) -> Result<FileStore, StoreError> {
        Self::open_with_keys(path, None)
    }

    /// The store as configured (`store.path` and the encryption keys).
    pub fn open_config(config: &crate::config::StoreConfig) -> Result<FileStore, StoreError> {
        Self::open_with_keys(&config.path, Keyring::from_config(config))
    }

    /// With keys, records are sealed at rest under the current one; a
    /// plaintext store (or one sealed under a previous key) is read as is
    /// and sealed under the current key at its next write.
    pub fn open_with_keys(path: &Path, keys: Option<Keyring>) -> Result<FileStore, StoreError> {
        let store = FileStore {
            path: path.to_owned(),
            keys,
        };
        store.read_all()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock_path(&self, name: &str) -> PathBuf {
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{safe}.lock"));
        PathBuf::from(p)
    }

    fn write_lock_path(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".lock");
        PathBuf::from(p)
    }

    /// Takes the credential's lock (blocks another process spending it).
    pub async fn lock_credential(&self, name: &str) -> Result<CredentialLock, StoreError> {
        let path = self.lock_path(name);
        tokio::task::spawn_blocking(move || lock_file(&path))
            .await
            .map_err(|e| StoreError::Lock {
                path: PathBuf::new(),
                source: io::Error::other(e),
            })?
            .map(|file| CredentialLock { file })
    }

    /// The credential's record, if any.
    pub fn read(&self, name: &str) -> Result<Option<Record>, StoreError> {
        Ok(self.read_all()?.credentials.remove(name))
    }

    fn read_all(&self) -> Result<StoreFile, StoreError> {
        match fs::read(&self.path) {
            Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => Ok(StoreFile::default()),
            Ok(bytes) => {
                let mut file: StoreFile =
                    serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                        path: self.path.clone(),
                        source,
                    })?;
                if let Some(sealed) = file.sealed.take() {
                    file.credentials = self.unseal(&sealed)?;
                }
                Ok(file)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(StoreFile::default()),
            Err(source) => Err(StoreError::Read {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Durably replaces the credential's record (other records untouched).
    /// Blocking I/O: call from `spawn_blocking` or accept a short stall.
    pub fn write(&self, name: &str, record: &Record) -> Result<(), StoreError> {
        self.write_fenced(name, record, None, false)
    }

    /// As [`FileStore::write`], refused (`Fenced`) when `fenced` and the
    /// stored record's identity is not `prev`: a writer that lost track of
    /// the store (a login landed meanwhile) never overwrites it.
    pub fn write_fenced(
        &self,
        name: &str,
        record: &Record,
        prev: Option<(&str, u64)>,
        fenced: bool,
    ) -> Result<(), StoreError> {
        let _guard = lock_file(&self.write_lock_path())?;
        let mut all = self.read_all()?;
        if fenced && all.credentials.get(name).map(Record::identity) != prev {
            return Err(StoreError::Fenced {
                name: name.to_owned(),
            });
        }
        let mut record = record.clone();
        record.updated_at_ms = unix_ms(SystemTime::now());
        all.credentials.insert(name.to_owned(), record);
        self.write_all(all)
    }

    /// Rewrites the whole file under the current key, under the same lock
    /// as every write (so no concurrent refresh is lost). An unreadable file
    /// is an error and stays as it was.
    pub fn rekey(&self) -> Result<Rekeyed, StoreError> {
        let keys = self.keys.as_ref().ok_or(StoreError::RekeyWithoutKey)?;
        let _guard = lock_file(&self.write_lock_path())?;
        let raw = match fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice::<StoreFile>(&bytes).ok(),
            Err(_) => None,
        };
        let already = raw
            .as_ref()
            .and_then(|f| f.sealed.as_deref())
            .is_some_and(|s| keys.is_current(s));
        let all = self.read_all()?;
        let names: Vec<String> = all.credentials.keys().cloned().collect();
        let mut done = Rekeyed {
            key_id: keys.current_id().to_owned(),
            ..Rekeyed::default()
        };
        if already || raw.is_none() {
            // Nothing stored yet, or sealed under this key already.
            done.unchanged = names;
            return Ok(done);
        }
        self.write_all(all)?;
        done.resealed = names;
        Ok(done)
    }

    /// Durably replaces the file with `all`, sealed when there is a key.
    /// Call with the write lock held.
    fn write_all(&self, mut all: StoreFile) -> Result<(), StoreError> {
        all.version = 1;
        let to_io = |e: serde_json::Error| StoreError::Write {
            path: self.path.clone(),
            source: io::Error::other(e),
        };
        if let Some(keys) = &self.keys {
            let plain = serde_json::to_vec(&all.credentials).map_err(to_io)?;
            all.credentials.clear();
            all.sealed = Some(keys.seal(&plain));
        }
        let bytes = serde_json::to_vec_pretty(&all).map_err(to_io)?;
        write_atomic(&self.path, &bytes).map_err(|source| StoreError::Write {
            path: self.path.clone(),
            source,
        })
    }

    fn unseal(&self, sealed: &str) -> Result<BTreeMap<String, Record>, StoreError> {
        let plain = seal::unseal_with(self.keys.as_ref(), &seal::legacy_file_blob(sealed))
            .map_err(|source| StoreError::Decrypt {
                path: self.path.clone(),
                source,
            })?;
        serde_json::from_slice(&plain).map_err(|source| StoreError::Corrupt {
            path: self.path.clone(),
            source,
        })
    }
}

/// Runs blocking store I/O on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| StoreError::Write {
            path: PathBuf::new(),
            source: io::Error::other(e),
        })?
}

fn lock_file(path: &Path) -> Result<File, StoreError> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| StoreError::Lock {
            path: path.to_owned(),
            source,
        })?;
    file.lock().map_err(|source| StoreError::Lock {
        path: path.to_owned(),
        source,
    })?;
    Ok(file)
}

/// Temp file in the same directory, fsync, rename over, fsync the directory:
/// a crash leaves either the old or the new file, never a torn one.
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::seal::UnsealError;
    use std::os::unix::fs::PermissionsExt;

    fn record(family: &str, generation: u64) -> Record {
        Record {
            token_url: "http://127.0.0.1/token".into(),
            client_id: "c".into(),
            family: family.into(),
            generation,
            refresh_token: Some(Secret::new("rt")),
            access_token: None,
            access_expires_at_ms: None,
            access_issued_at_ms: None,
            refresh_expires_at_ms: None,
            seeds_seen: vec![],
            intent: None,
            dead: None,
            updated_at_ms: 0,
        }
    }

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

    #[test]
    fn write_is_0600_and_keeps_other_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(&dir.path().join("tokens.json")).unwrap();
        store.write("a", &record("f1", 1)).unwrap();
        store.write("b", &record("f2", 7)).unwrap();
        store.write("a", &record("f1", 2)).unwrap();
        assert_eq!(store.read("a").unwrap().unwrap().generation, 2);
        assert_eq!(store.read("b").unwrap().unwrap().generation, 7);
        let mode = fs::metadata(store.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn corrupt_store_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        fs::write(&path, b"{ not json").unwrap();
        assert!(matches!(
            FileStore::open(&path),
            Err(StoreError::Corrupt { .. })
        ));
    }

    fn keys(current: &str, previous: &[&str]) -> Option<Keyring> {
        let prev: Vec<Secret> = previous.iter().map(|p| Secret::new(*p)).collect();
        Some(Keyring::new(&Secret::new(current), &prev))
    }

    #[test]
    fn encrypted_store_hides_tokens_and_needs_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        // A plaintext store is sealed at its next write.
        FileStore::open(&path)
            .unwrap()
            .write("a", &record("f1", 1))
            .unwrap();
        let store = FileStore::open_with_keys(&path, keys("correct horse", &[])).unwrap();
        assert_eq!(store.read("a").unwrap().unwrap().generation, 1);
        store.write("b", &record("family-two", 2)).unwrap();
        let raw = fs::read_to_string(&path).unwrap();
        let kid = super::seal::key_id_in(&Secret::new("correct horse"), &raw).unwrap();
        assert!(
            raw.contains(&format!("\"tpv3:{kid}:"))
                && !raw.contains("\"rt\"")
                && !raw.contains("family-two"),
            "{raw}"
        );
        assert_eq!(store.read("b").unwrap().unwrap().family, "family-two");
        let err = FileStore::open(&path).unwrap_err();
        assert!(matches!(
            &err,
            StoreError::Decrypt { source: UnsealError::NoKey { kid: k }, .. } if *k == kid
        ));
        let err = FileStore::open_with_keys(&path, keys("wrong", &[])).unwrap_err();
        let text = crate::error_chain(&err);
        assert!(
            text.contains(&kid) && !text.contains("wrong") && !text.contains("correct"),
            "{text}"
        );
    }

    #[test]
    fn a_previous_key_opens_and_rekey_reseals_under_the_current_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let old = FileStore::open_with_keys(&path, keys("key-a", &[])).unwrap();
        old.write("a", &record("f1", 3)).unwrap();
        let rotated = FileStore::open_with_keys(&path, keys("key-b", &["key-a"])).unwrap();
        assert_eq!(rotated.read("a").unwrap().unwrap().generation, 3);
        assert!(
            FileStore::open_with_keys(&path, keys("key-b", &[])).is_err(),
            "not yet rekeyed"
        );
        let done = rotated.rekey().unwrap();
        assert_eq!(done.resealed, vec!["a".to_owned()]);
        let resealed = fs::read_to_string(&path).unwrap();
        assert_eq!(
            Some(done.key_id),
            super::seal::key_id_in(&Secret::new("key-b"), &resealed)
        );
        let again = rotated.rekey().unwrap();
        assert!(again.resealed.is_empty() && again.unchanged == vec!["a".to_owned()]);
        let only_b = FileStore::open_with_keys(&path, keys("key-b", &[])).unwrap();
        assert_eq!(only_b.read("a").unwrap().unwrap().family, "f1");
        assert!(FileStore::open_with_keys(&path, keys("key-a", &[])).is_err());
        let plain = FileStore::open(&dir.path().join("plain.json")).unwrap();
        assert!(matches!(plain.rekey(), Err(StoreError::RekeyWithoutKey)));
    }

    #[test]
    fn a_store_sealed_in_the_old_format_opens_and_is_resealed_at_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let mut creds = BTreeMap::new();
        creds.insert("a".to_owned(), record("f1", 5));
        let v1 = super::seal::tests::seal_v1("key-a", &serde_json::to_vec(&creds).unwrap());
        // Before key ids the file held the bare base64 blob.
        let blob = v1.strip_prefix("tpv1:").unwrap();
        fs::write(&path, format!(r#"{{"version":1,"sealed":"{blob}"}}"#)).unwrap();
        let store = FileStore::open_with_keys(&path, keys("key-a", &[])).unwrap();
        assert_eq!(store.read("a").unwrap().unwrap().generation, 5);
        store.write("b", &record("f2", 1)).unwrap();
        assert!(fs::read_to_string(&path).unwrap().contains("\"tpv3:"));
        assert_eq!(store.read("a").unwrap().unwrap().generation, 5);
    }

    #[tokio::test]
    async fn credential_lock_excludes_a_second_holder() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(&dir.path().join("tokens.json")).unwrap();
        let held = store.lock_credential("a").await.unwrap();
        let s2 = store.clone();
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _l = s2.lock_credential("a").await.unwrap();
            let _ = tx.send(());
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(rx.try_recv().is_err(), "second lock must wait");
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .unwrap()
            .unwrap();
    }
}
