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
//!
//! Every clone of a store shares one parsed snapshot of the file, checked
//! against the file's stamp (inode, size, mtime, ctime) before use, and by
//! content while a change could still hide behind an unchanged stamp: with
//! many credentials, a change poll or a write costs a `stat`, not a parse
//! and an unseal of every credential.

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
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// A change poll may answer from a snapshot confirmed this recently; reads
/// (before a spend, under the credential's lock) always look at the file.
const POLL_FRESH: Duration = Duration::from_millis(500);

/// [`StoreFile`] unsealed, for writing without a copy of every record.
#[derive(Serialize)]
struct StoreFileRef<'a> {
    version: u32,
    credentials: &'a BTreeMap<String, Record>,
}

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

    /// Wakes on writes by other replicas (postgres LISTEN); `None` for files.
    pub fn changes(&self, name: &str) -> Option<tokio::sync::watch::Receiver<u64>> {
        match self {
            Store::File(_) => None,
            Store::Postgres(p) => Some(p.changes(name)),
        }
    }
}

/// The file store. Cheap to clone; clones share the snapshot.
#[derive(Clone)]
pub struct FileStore {
    path: PathBuf,
    keys: Option<Keyring>,
    snapshot: Arc<SnapshotCell>,
    /// Bounds the store's reads and writes on the blocking pool: a thousand
    /// credentials starting at once would otherwise each hold a copy of the
    /// whole file on a thread of their own.
    io_gate: Arc<tokio::sync::Semaphore>,
}

/// Reads and writes of one file store in flight at once.
const IO_PERMITS: usize = 4;

/// The last version of the file seen, and the gate that makes one loader
/// at a time look at the file (the others then find its result). Both sync
/// mutexes on the blocking pool: `loading` is held across a read of the
/// file (never a write), `last` across no I/O, so a poll answered from
/// memory never waits for a disk.
#[derive(Default)]
struct SnapshotCell {
    last: parking_lot::Mutex<Option<Snapshot>>,
    loading: parking_lot::Mutex<()>,
}

#[derive(Clone)]
struct Snapshot {
    /// `None`: no file.
    stamp: Option<Stamp>,
    credentials: Arc<BTreeMap<String, Record>>,
    /// The file's bytes while a change could still leave `stamp` as it
    /// was (see [`Stamp::settled`]); `None` once it cannot.
    bytes: Option<Arc<[u8]>>,
    /// When the file was last confirmed to hold `credentials`.
    checked: Instant,
}

/// What tells one version of the file from another without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// Whether every later change must show in the stamp. Timestamps come
    /// from a coarse clock (a kernel tick; whole seconds on some file
    /// systems), so a rewrite in the same tick can leave all of it as it
    /// was; an inode number is reused once freed; mtime can be set back.
    /// ctime cannot be set: once it is older than the moment the content was
    /// confirmed (`seen`) by more than a tick, any change after that moment
    /// gets a later one.
    fn settled(&self, seen: SystemTime) -> bool {
        let tick = if self.ctime.1 == 0 {
            Duration::from_secs(2)
        } else {
            Duration::from_millis(100)
        };
        let ctime = u64::try_from(self.ctime.0)
            .ok()
            .and_then(|s| UNIX_EPOCH.checked_add(Duration::new(s, self.ctime.1 as u32)));
        ctime.is_some_and(|c| c + tick < seen)
    }
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
            snapshot: Arc::default(),
            io_gate: Arc::new(tokio::sync::Semaphore::new(IO_PERMITS)),
        };
        store.load(None)?;
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

    /// The credential's record as the file holds it now.
    pub fn read(&self, name: &str) -> Result<Option<Record>, StoreError> {
        Ok(self.load(None)?.get(name).cloned())
    }

    /// From the snapshot when it was confirmed within `POLL_FRESH`, or is
    /// being confirmed right now (the polls of a round then do not queue a
    /// blocking task each behind that one).
    fn poll_cached(&self, name: &str, now: Instant) -> Option<Option<Record>> {
        let last = self.snapshot.last.lock();
        let s = last.as_ref()?;
        (now.saturating_duration_since(s.checked) <= POLL_FRESH
            || self.snapshot.loading.is_locked())
        .then(|| s.credentials.get(name).cloned())
    }

    fn poll_blocking(&self, name: &str) -> Result<Option<Record>, StoreError> {
        Ok(self.load(Some(POLL_FRESH))?.get(name).cloned())
    }

    /// Every credential as the file holds them: the snapshot when a
    /// confirmation within `max_age` will do or the file is unchanged, else
    /// a read and a parse (one for every caller waiting meanwhile).
    fn load(&self, max_age: Option<Duration>) -> Result<Arc<BTreeMap<String, Record>>, StoreError> {
        let _one = self.snapshot.loading.lock();
        let now = Instant::now();
        if let Some(age) = max_age {
            if let Some(s) = &*self.snapshot.last.lock() {
                if now.saturating_duration_since(s.checked) <= age {
                    return Ok(s.credentials.clone());
                }
            }
        }
        let read_err = |source| StoreError::Read {
            path: self.path.clone(),
            source,
        };
        // Taken before the file is looked at: whatever it then holds was
        // there at this moment or later.
        let seen = SystemTime::now();
        let mut file = match File::open(&self.path) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(read_err(e)),
        };
        // From the open file, so stamp and bytes are of one inode.
        let stamp = match &file {
            Some(f) => Some(Stamp::of(&f.metadata().map_err(read_err)?)),
            None => None,
        };
        let settled = stamp.is_none_or(|s| s.settled(seen));
        let last = self.snapshot.last.lock().clone();
        let same = last.filter(|s| s.stamp == stamp);
        if let Some(s) = &same {
            if s.bytes.is_none() {
                return Ok(self.confirm(s, None, now));
            }
        }
        let mut bytes = Vec::new();
        if let Some(f) = &mut file {
            io::Read::read_to_end(f, &mut bytes).map_err(read_err)?;
        }
        if let Some(s) = same.filter(|s| s.bytes.as_deref() == Some(&bytes[..])) {
            let keep = (!settled).then_some(s.bytes.clone()).flatten();
            return Ok(self.confirm(&s, Some(keep), now));
        }
        let credentials = match self.parse(&bytes) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                // Never answer from an older version of an unreadable file.
                *self.snapshot.last.lock() = None;
                return Err(e);
            }
        };
        *self.snapshot.last.lock() = Some(Snapshot {
            stamp,
            credentials: credentials.clone(),
            bytes: (!settled).then(|| bytes.into()),
            checked: now,
        });
        Ok(credentials)
    }

    /// Notes that the file still holds `s` (and, when `bytes` is given,
    /// whether a same-stamp change is still possible).
    fn confirm(
        &self,
        s: &Snapshot,
        bytes: Option<Option<Arc<[u8]>>>,
        now: Instant,
    ) -> Arc<BTreeMap<String, Record>> {
        let mut last = self.snapshot.last.lock();
        if let Some(l) = last.as_mut().filter(|l| l.stamp == s.stamp) {
            l.checked = now;
            if let Some(b) = bytes {
                l.bytes = b;
            }
        }
        s.credentials.clone()
    }

    fn parse(&self, bytes: &[u8]) -> Result<BTreeMap<String, Record>, StoreError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(BTreeMap::new());
        }
        let file: StoreFile =
            serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
                path: self.path.clone(),
                source,
            })?;
        match &file.sealed {
            Some(sealed) => self.unseal(sealed),
            None => Ok(file.credentials),
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
        let current = self.load(None)?;
        if fenced && current.get(name).map(Record::identity) != prev {
            return Err(StoreError::Fenced {
                name: name.to_owned(),
            });
        }
        let mut record = record.clone();
        record.updated_at_ms = unix_ms(SystemTime::now());
        let mut credentials = Arc::unwrap_or_clone(current);
        credentials.insert(name.to_owned(), record);
        self.write_all(credentials)
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
        let all = Arc::unwrap_or_clone(self.load(None)?);
        let names: Vec<String> = all.keys().cloned().collect();
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

    /// Durably replaces the file with `credentials`, sealed when there is a
    /// key, and makes them the snapshot. Call with the write lock held.
    fn write_all(&self, credentials: BTreeMap<String, Record>) -> Result<(), StoreError> {
        let to_io = |e: serde_json::Error| StoreError::Write {
            path: self.path.clone(),
            source: io::Error::other(e),
        };
        let bytes = match &self.keys {
            Some(keys) => {
                let plain = serde_json::to_vec(&credentials).map_err(to_io)?;
                serde_json::to_vec_pretty(&StoreFile {
                    version: 1,
                    credentials: BTreeMap::new(),
                    sealed: Some(keys.seal(&plain)),
                })
            }
            None => serde_json::to_vec_pretty(&StoreFileRef {
                version: 1,
                credentials: &credentials,
            }),
        }
        .map_err(to_io)?;
        let now = Instant::now();
        let written = write_atomic(&self.path, &bytes);
        // Not across the write: readers wait for a disk only when they must
        // read the file themselves.
        let _one = self.snapshot.loading.lock();
        *self.snapshot.last.lock() = match &written {
            // Just written, so never settled: the next load compares bytes.
            Ok(meta) => Some(Snapshot {
                stamp: Some(Stamp::of(meta)),
                credentials: Arc::new(credentials),
                bytes: Some(bytes.into()),
                checked: now,
            }),
            Err(_) => None,
        };
        written.map(drop).map_err(|source| StoreError::Write {
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

impl FileStore {
    /// Runs blocking store I/O on tokio's blocking pool, at most
    /// [`IO_PERMITS`] at a time. Nothing waiting for a permit holds a lock.
    async fn blocking<T: Send + 'static>(
        self,
        work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let _permit = self
            .io_gate
            .acquire_owned()
            .await
            .map_err(|e| StoreError::Write {
                path: self.path.clone(),
                source: io::Error::other(e),
            })?;
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| StoreError::Write {
                path: self.path.clone(),
                source: io::Error::other(e),
            })?
    }
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
/// a crash leaves either the old or the new file, never a torn one. Returns
/// the new file's metadata as of after the rename (which changes its ctime).
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<fs::Metadata> {
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
        File::open(&dir)?.sync_all()?;
        f.metadata()
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

    /// Rewrites the store file in place (same inode, same size) with the
    /// generation of `name` bumped from `from` to `from + 1`, and sets the
    /// mtime back: a change only ctime or the content can tell.
    fn rewrite_in_place_keeping_size_and_mtime(path: &Path, from: u64) {
        let text = fs::read_to_string(path).unwrap();
        let (old, new) = (
            format!("\"generation\": {from},"),
            format!("\"generation\": {},", from + 1),
        );
        assert_eq!(old.len(), new.len());
        assert!(text.contains(&old), "{text}");
        let mtime = fs::metadata(path).unwrap().modified().unwrap();
        let mut f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all(text.replacen(&old, &new, 1).as_bytes())
            .unwrap();
        f.set_times(fs::FileTimes::new().set_modified(mtime))
            .unwrap();
        drop(f);
        let after = fs::metadata(path).unwrap();
        assert_eq!(after.modified().unwrap(), mtime);
        assert_eq!(after.len(), text.len() as u64);
    }

    #[test]
    fn a_rewrite_keeping_inode_size_and_mtime_is_seen_by_reads_and_polls() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let store = FileStore::open(&path).unwrap();
        store.write("a", &record("f1", 1)).unwrap();
        store.write("b", &record("f2", 5)).unwrap();
        assert_eq!(store.read("a").unwrap().unwrap().generation, 1);
        rewrite_in_place_keeping_size_and_mtime(&path, 1);
        // A poll may answer from a snapshot confirmed a moment ago ...
        let later = Instant::now() + POLL_FRESH + Duration::from_millis(1);
        assert_eq!(store.poll_cached("a", later), None, "stale by then");
        // ... but once that moment has passed it looks at the file.
        store.snapshot.last.lock().as_mut().unwrap().checked -= POLL_FRESH * 2;
        assert_eq!(store.poll_blocking("a").unwrap().unwrap().generation, 2);
        // A read (before a spend) always looks.
        rewrite_in_place_keeping_size_and_mtime(&path, 2);
        assert_eq!(store.read("a").unwrap().unwrap().generation, 3);
        assert_eq!(store.read("b").unwrap().unwrap().generation, 5);
    }

    #[test]
    fn a_change_behind_an_unchanged_stamp_is_found_by_content_until_the_stamp_settles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let store = FileStore::open(&path).unwrap();
        store.write("a", &record("f1", 1)).unwrap();
        assert_eq!(store.read("a").unwrap().unwrap().generation, 1);
        rewrite_in_place_keeping_size_and_mtime(&path, 1);
        // As if the rewrite had landed within the same clock tick: even
        // its ctime is the one the snapshot holds.
        let now = Stamp::of(&fs::metadata(&path).unwrap());
        store.snapshot.last.lock().as_mut().unwrap().stamp = Some(now);
        assert_eq!(store.read("a").unwrap().unwrap().generation, 2);
    }

    #[test]
    fn a_stamp_settles_once_its_ctime_is_a_tick_older_than_the_read() {
        let stamp = |secs: i64, nanos: i64| Stamp {
            dev: 1,
            ino: 2,
            len: 3,
            mtime: (secs, nanos),
            ctime: (secs, nanos),
        };
        let at = |secs: u64, millis: u64| UNIX_EPOCH + Duration::from_millis(secs * 1000 + millis);
        assert!(stamp(100, 500_000_000).settled(at(100, 700)));
        assert!(!stamp(100, 500_000_000).settled(at(100, 550)));
        // Whole seconds: perhaps a file system that keeps no more.
        assert!(!stamp(100, 0).settled(at(101, 500)));
        assert!(stamp(100, 0).settled(at(102, 500)));
        // A clock set back: never settled.
        assert!(!stamp(100, 500_000_000).settled(at(90, 0)));
    }

    #[test]
    fn another_writers_replacement_is_seen_and_an_unchanged_file_is_not_parsed_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let mine = FileStore::open(&path).unwrap();
        // Another process: its own snapshot.
        let other = FileStore::open(&path).unwrap();
        mine.write("a", &record("f1", 1)).unwrap();
        other.write("a", &record("f1", 2)).unwrap();
        assert_eq!(mine.read("a").unwrap().unwrap().generation, 2);
        other.write("b", &record("f2", 1)).unwrap();
        mine.snapshot.last.lock().as_mut().unwrap().checked -= POLL_FRESH * 2;
        assert_eq!(mine.poll_blocking("b").unwrap().unwrap().family, "f2");
        // Unchanged since: the same parsed map answers.
        let before = mine.load(None).unwrap();
        assert!(Arc::ptr_eq(&before, &mine.load(None).unwrap()));
    }

    #[test]
    fn an_unreadable_file_is_an_error_not_the_last_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let store = FileStore::open(&path).unwrap();
        store.write("a", &record("f1", 1)).unwrap();
        fs::write(&path, b"{ not json").unwrap();
        assert!(matches!(store.read("a"), Err(StoreError::Corrupt { .. })));
        store.write("a", &record("f1", 2)).unwrap_err();
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
