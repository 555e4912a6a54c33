//! The file store: one file per credential in the directory `<store.path>.d/`,
//! each written atomically (temp file in the same directory, fsync, rename,
//! fsync the directory) with mode 0600, and one lock file per credential
//! beside `store.path`, held (flock) across a whole spend: re-read, grant,
//! write. `store.path` itself is a small manifest, layout in
//! `docs/operations.md` ("The token store").
//!
//! A write touches one credential's file, and a change check `stat`s one
//! file: the cost of an operation does not grow with the number of
//! credentials. A short store-wide lock guards each compare-and-write; it
//! is always taken after a credential lock, never before, so the two cannot
//! deadlock.
//!
//! Stores written before the per-credential layout (version 1) held every
//! record in `store.path`. They are read as they are; the first write moves
//! every record into its own file (a record's own file always wins over the
//! manifest's copy, so a crash midway loses nothing) and then replaces
//! `store.path` with the manifest, whose `credentials` is not a map: an
//! older tokenproxy refuses it instead of taking the store for empty.
//!
//! With `store.encryption_key` each record file holds its record sealed
//! (see `seal`); `rekey` reseals every record under the current key.
//!
//! Every clone of a store shares one parsed snapshot per file, checked
//! against the file's stamp (inode, size, mtime, ctime) before use, and by
//! content while a change could still hide behind an unchanged stamp.

use super::record::{unix_ms, Record, Rekeyed, StoreError};
use super::seal::{self, Keyring};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::time::Instant;

/// A change poll may answer from a snapshot confirmed this recently; reads
/// (before a spend, under the credential's lock) always look at the file.
pub(super) const POLL_FRESH: Duration = Duration::from_millis(500);

/// How often the sweep looks for changes made by other processes.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// The layout this tokenproxy writes.
const VERSION: u32 = 2;

/// Reads and writes of one file store in flight at once.
const IO_PERMITS: usize = 4;

/// `store.path` as every version wrote it. Version 1 kept the records here
/// (`credentials` a map, or `sealed`); version 2 keeps a note in
/// `credentials` where a map used to be.
#[derive(Deserialize)]
struct RootFile {
    version: u32,
    #[serde(default)]
    credentials: Option<serde_json::Value>,
    #[serde(default)]
    sealed: Option<String>,
}

#[derive(Serialize)]
struct Manifest<'a> {
    version: u32,
    credentials: &'a str,
}

/// One credential's file.
#[derive(Serialize, Deserialize)]
struct RecordFile {
    version: u32,
    credential: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    record: Option<Record>,
    /// With `store.encryption_key`: `record` sealed (`tpv3:<key id>:...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed: Option<String>,
}

/// What `store.path` holds.
#[derive(Default)]
struct Root {
    /// Version 1's records, not yet moved into files of their own.
    legacy: BTreeMap<String, Record>,
    /// Whether it is already this layout's manifest.
    manifest: bool,
}

/// The file store. Cheap to clone; clones share the snapshots.
#[derive(Clone)]
pub struct FileStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    dir: PathBuf,
    keys: Option<Keyring>,
    root: Cell<Root>,
    records: parking_lot::Mutex<HashMap<String, Arc<Cell<Option<Record>>>>>,
    /// Bounds the store's reads and writes on the blocking pool: a thousand
    /// credentials starting at once would otherwise each hold a thread.
    io_gate: Arc<tokio::sync::Semaphore>,
    /// Credentials whose changes by other processes someone waits for.
    watchers: parking_lot::Mutex<HashMap<String, watch::Sender<u64>>>,
    sweeping: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore")
            .field("path", &self.inner.path)
            .field("keys", &self.inner.keys)
            .finish()
    }
}

/// The last version of one file seen, and the gate that makes one loader
/// at a time look at it (the others then find its result). Both sync
/// mutexes on the blocking pool: `loading` is held across a read of the
/// file (never a write), `last` across no I/O, so a poll answered from
/// memory never waits for a disk.
struct Cell<T> {
    last: parking_lot::Mutex<Option<Snapshot<T>>>,
    loading: parking_lot::Mutex<()>,
}

impl<T> Default for Cell<T> {
    fn default() -> Self {
        Cell {
            last: parking_lot::Mutex::new(None),
            loading: parking_lot::Mutex::new(()),
        }
    }
}

struct Snapshot<T> {
    /// `None`: no file.
    stamp: Option<Stamp>,
    value: Arc<T>,
    /// The file's bytes while a change could still leave `stamp` as it
    /// was (see [`Stamp::settled`]); `None` once it cannot.
    bytes: Option<Arc<[u8]>>,
    /// When the file was last confirmed to hold `value`.
    checked: Instant,
}

impl<T> Clone for Snapshot<T> {
    fn clone(&self) -> Self {
        Snapshot {
            stamp: self.stamp,
            value: self.value.clone(),
            bytes: self.bytes.clone(),
            checked: self.checked,
        }
    }
}

impl<T> Cell<T> {
    /// The value when it was confirmed within `max_age`, or is being
    /// confirmed right now (the polls of a round then do not queue a
    /// blocking task each behind that one).
    fn fresh(&self, now: Instant, max_age: Duration) -> Option<Arc<T>> {
        let last = self.last.lock();
        let s = last.as_ref()?;
        (now.saturating_duration_since(s.checked) <= max_age || self.loading.is_locked())
            .then(|| s.value.clone())
    }

    /// What `path` holds (`parse` gets `None` when there is no file): the snapshot when a confirmation within
    /// `max_age` will do or the file is unchanged, else a read and a parse
    /// (one for every caller waiting meanwhile). The flag says whether it
    /// was parsed anew.
    fn load(
        &self,
        path: &Path,
        max_age: Option<Duration>,
        parse: impl FnOnce(Option<&[u8]>) -> Result<T, StoreError>,
    ) -> Result<(Arc<T>, bool), StoreError> {
        let _one = self.loading.lock();
        let now = Instant::now();
        if let Some(age) = max_age {
            if let Some(s) = &*self.last.lock() {
                if now.saturating_duration_since(s.checked) <= age {
                    return Ok((s.value.clone(), false));
                }
            }
        }
        let read_err = |source| StoreError::Read {
            path: path.to_owned(),
            source,
        };
        // Taken before the file is looked at: whatever it then holds was
        // there at this moment or later.
        let seen = SystemTime::now();
        let mut file = match File::open(path) {
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
        let same = self.last.lock().clone().filter(|s| s.stamp == stamp);
        if let Some(s) = &same {
            if s.bytes.is_none() {
                return Ok((self.confirm(s, None, now), false));
            }
        }
        let mut bytes = Vec::new();
        if let Some(f) = &mut file {
            io::Read::read_to_end(f, &mut bytes).map_err(read_err)?;
        }
        if let Some(s) = same.filter(|s| s.bytes.as_deref() == Some(&bytes[..])) {
            let keep = (!settled).then_some(s.bytes.clone()).flatten();
            return Ok((self.confirm(&s, Some(keep), now), false));
        }
        let value = match parse(file.is_some().then_some(&bytes[..])) {
            Ok(v) => Arc::new(v),
            Err(e) => {
                // Never answer from an older version of an unreadable file.
                *self.last.lock() = None;
                return Err(e);
            }
        };
        *self.last.lock() = Some(Snapshot {
            stamp,
            value: value.clone(),
            bytes: (!settled).then(|| bytes.into()),
            checked: now,
        });
        Ok((value, true))
    }

    /// Notes that the file still holds `s` (and, when `bytes` is given,
    /// whether a same-stamp change is still possible).
    fn confirm(&self, s: &Snapshot<T>, bytes: Option<Option<Arc<[u8]>>>, now: Instant) -> Arc<T> {
        let mut last = self.last.lock();
        if let Some(l) = last.as_mut().filter(|l| l.stamp == s.stamp) {
            l.checked = now;
            if let Some(b) = bytes {
                l.bytes = b;
            }
        }
        s.value.clone()
    }

    /// Makes a file just written (or that failed to be) the snapshot.
    fn written(&self, written: &io::Result<fs::Metadata>, value: T, bytes: Vec<u8>, now: Instant) {
        let _one = self.loading.lock();
        *self.last.lock() = match written {
            // Just written, so never settled: the next load compares bytes.
            Ok(meta) => Some(Snapshot {
                stamp: Some(Stamp::of(meta)),
                value: Arc::new(value),
                bytes: Some(bytes.into()),
                checked: now,
            }),
            Err(_) => None,
        };
    }
}

/// What tells one version of a file from another without reading it.
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

/// Held across a whole spend; dropping it releases the flock. The lock
/// file also keeps the credential's high-water mark (the newest family and
/// generation written): it is not part of the store, so restoring the
/// store from a backup does not roll the mark back.
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

/// A credential's file name in the records directory: the name itself
/// when it is plain (config allows only letters, digits, `_` and `-`), else
/// `~` and its bytes in hex, so two names never share a file.
fn record_file_name(name: &str) -> String {
    let plain = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        format!("{name}.json")
    } else {
        let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
        format!("~{hex}.json")
    }
}

/// The inverse of [`record_file_name`].
fn credential_of_file(file: &str) -> Option<String> {
    let stem = file.strip_suffix(".json")?;
    let name = match stem.strip_prefix('~') {
        Some(hex) if hex.len() % 2 == 0 => {
            let bytes: Option<Vec<u8>> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
                .collect();
            String::from_utf8(bytes?).ok()?
        }
        Some(_) => return None,
        None => stem.to_owned(),
    };
    (record_file_name(&name) == file).then_some(name)
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
    /// plaintext record (or one sealed under a previous key) is read as is
    /// and sealed under the current key at its next write. Opening reads
    /// every record once, so one that cannot be opened (a wrong key) is
    /// found now.
    pub fn open_with_keys(path: &Path, keys: Option<Keyring>) -> Result<FileStore, StoreError> {
        let store = Self::open_unread(path, keys)?;
        store.verify()?;
        Ok(store)
    }

    /// Whether the store can be opened, without reading every record: the
    /// manifest and the list of records (readiness probes).
    pub fn probe(config: &crate::config::StoreConfig) -> Result<(), StoreError> {
        Self::open_unread(&config.path, Keyring::from_config(config)).map(drop)
    }

    fn open_unread(path: &Path, keys: Option<Keyring>) -> Result<FileStore, StoreError> {
        let mut dir = path.to_owned().into_os_string();
        dir.push(".d");
        let store = FileStore {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                dir: PathBuf::from(dir),
                keys,
                root: Cell::default(),
                records: parking_lot::Mutex::default(),
                io_gate: Arc::new(tokio::sync::Semaphore::new(IO_PERMITS)),
                watchers: parking_lot::Mutex::default(),
                sweeping: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        store.load_root(None)?;
        store.stored_names()?;
        Ok(store)
    }

    /// Reads every record: the first that cannot be read is the error.
    pub fn verify(&self) -> Result<usize, StoreError> {
        let (root, _) = self.load_root(None)?;
        let names = self.stored_names()?;
        for name in &names {
            self.load_record(name, None)?;
        }
        Ok(names.len() + root.legacy.keys().filter(|n| !names.contains(n)).count())
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Where the records live: `<store.path>.d`.
    pub fn records_dir(&self) -> &Path {
        &self.inner.dir
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.inner.dir.join(record_file_name(name))
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
        let mut p = self.inner.path.clone().into_os_string();
        p.push(format!(".{safe}.lock"));
        PathBuf::from(p)
    }

    fn write_lock_path(&self) -> PathBuf {
        let mut p = self.inner.path.clone().into_os_string();
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

    /// The credential's record as the store holds it now.
    pub fn read(&self, name: &str) -> Result<Option<Record>, StoreError> {
        self.read_aged(name, None)
    }

    /// From the snapshots when both were confirmed within `POLL_FRESH`.
    pub(super) fn poll_cached(&self, name: &str, now: Instant) -> Option<Option<Record>> {
        let root = self.inner.root.fresh(now, POLL_FRESH)?;
        let own = self.cell(name).fresh(now, POLL_FRESH)?;
        Some(Self::pick(&own, &root, name))
    }

    pub(super) fn poll_blocking(&self, name: &str) -> Result<Option<Record>, StoreError> {
        self.read_aged(name, Some(POLL_FRESH))
    }

    fn read_aged(
        &self,
        name: &str,
        max_age: Option<Duration>,
    ) -> Result<Option<Record>, StoreError> {
        // The manifest is checked too: an unreadable store is an error for
        // every credential, not a store that looks empty to some.
        let (root, _) = self.load_root(max_age)?;
        let (own, _) = self.load_record(name, max_age)?;
        Ok(Self::pick(&own, &root, name))
    }

    /// A record's own file wins over a version 1 copy in the manifest.
    fn pick(own: &Option<Record>, root: &Root, name: &str) -> Option<Record> {
        own.clone().or_else(|| root.legacy.get(name).cloned())
    }

    fn cell(&self, name: &str) -> Arc<Cell<Option<Record>>> {
        self.inner
            .records
            .lock()
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    fn load_root(&self, max_age: Option<Duration>) -> Result<(Arc<Root>, bool), StoreError> {
        self.inner
            .root
            .load(&self.inner.path, max_age, |b| match b {
                Some(b) => self.parse_root(b),
                None => Ok(Root::default()),
            })
    }

    fn load_record(
        &self,
        name: &str,
        max_age: Option<Duration>,
    ) -> Result<(Arc<Option<Record>>, bool), StoreError> {
        let path = self.record_path(name);
        self.cell(name).load(&path, max_age, |b| match b {
            Some(b) => self.parse_record(&path, name, b).map(Some),
            None => Ok(None),
        })
    }

    fn corrupt(&self, path: &Path) -> impl FnOnce(serde_json::Error) -> StoreError {
        let path = path.to_owned();
        move |source| StoreError::Corrupt { path, source }
    }

    fn parse_root(&self, bytes: &[u8]) -> Result<Root, StoreError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Root::default());
        }
        let path = &self.inner.path;
        let file: RootFile = serde_json::from_slice(bytes).map_err(self.corrupt(path))?;
        if file.version > VERSION {
            return Err(StoreError::LayoutTooNew {
                path: path.clone(),
                found: file.version,
                known: VERSION,
            });
        }
        if file.version >= 2 {
            return Ok(Root {
                legacy: BTreeMap::new(),
                manifest: true,
            });
        }
        let legacy = match (&file.sealed, file.credentials) {
            (Some(sealed), _) => {
                let plain = self.unseal(path, &seal::legacy_file_blob(sealed))?;
                serde_json::from_slice(&plain).map_err(self.corrupt(path))?
            }
            (None, Some(map)) => serde_json::from_value(map).map_err(self.corrupt(path))?,
            (None, None) => BTreeMap::new(),
        };
        Ok(Root {
            legacy,
            manifest: false,
        })
    }

    fn parse_record(&self, path: &Path, name: &str, bytes: &[u8]) -> Result<Record, StoreError> {
        let file: RecordFile = serde_json::from_slice(bytes).map_err(self.corrupt(path))?;
        let misfiled = || StoreError::Misfiled {
            path: path.to_owned(),
            name: name.to_owned(),
        };
        if file.version > VERSION {
            return Err(StoreError::LayoutTooNew {
                path: path.to_owned(),
                found: file.version,
                known: VERSION,
            });
        }
        if file.credential != name {
            return Err(misfiled());
        }
        match (file.record, file.sealed) {
            (Some(rec), None) => Ok(rec),
            (None, Some(sealed)) => {
                let plain = self.unseal(path, &sealed)?;
                serde_json::from_slice(&plain).map_err(self.corrupt(path))
            }
            _ => Err(misfiled()),
        }
    }

    fn unseal(&self, path: &Path, sealed: &str) -> Result<Vec<u8>, StoreError> {
        seal::unseal_with(self.inner.keys.as_ref(), sealed).map_err(|source| StoreError::Decrypt {
            path: path.to_owned(),
            source,
        })
    }

    /// Names with a file of their own (from the file names; a file that
    /// names another credential inside is found when it is read).
    fn stored_names(&self) -> Result<Vec<String>, StoreError> {
        let list_err = |source| StoreError::Read {
            path: self.inner.dir.clone(),
            source,
        };
        let entries = match fs::read_dir(&self.inner.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(list_err(e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let file = entry.map_err(list_err)?.file_name();
            // Temp files of a write in flight (or of one that crashed), and
            // anything else that is not a record's file.
            if let Some(name) = file.to_str().and_then(credential_of_file) {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
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
        let (root, _) = self.load_root(None)?;
        let (own, _) = self.load_record(name, None)?;
        let current = Self::pick(&own, &root, name);
        if fenced && current.as_ref().map(Record::identity) != prev {
            return Err(StoreError::Fenced {
                name: name.to_owned(),
            });
        }
        let mut record = record.clone();
        record.updated_at_ms = unix_ms(SystemTime::now());
        self.write_record(name, record)?;
        if !root.manifest {
            self.migrate(&root)?;
        }
        Ok(())
    }

    /// Moves version 1's records into files of their own (those without
    /// one yet), then replaces `store.path` with the manifest. Call with
    /// the write lock held.
    fn migrate(&self, root: &Root) -> Result<Vec<String>, StoreError> {
        let mut moved = Vec::new();
        for (name, rec) in &root.legacy {
            if self.load_record(name, None)?.0.is_none() {
                self.write_record(name, rec.clone())?;
                moved.push(name.clone());
            }
        }
        let note = format!(
            "one file per credential in {}",
            self.inner
                .dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let bytes = serde_json::to_vec_pretty(&Manifest {
            version: VERSION,
            credentials: &note,
        })
        .map_err(|e| self.write_error(&self.inner.path, io::Error::other(e)))?;
        let now = Instant::now();
        let written = write_atomic(&self.inner.path, &bytes);
        let root = Root {
            legacy: BTreeMap::new(),
            manifest: true,
        };
        self.inner.root.written(&written, root, bytes, now);
        written.map_err(|e| self.write_error(&self.inner.path, e))?;
        if !moved.is_empty() {
            tracing::info!(event = "store_migrated", path = %self.inner.path.display(), records = moved.len(), "Token store moved to one file per credential");
        }
        Ok(moved)
    }

    fn write_error(&self, path: &Path, source: io::Error) -> StoreError {
        StoreError::Write {
            path: path.to_owned(),
            source,
        }
    }

    /// Durably replaces one record's file, sealed when there is a key, and
    /// makes it the snapshot. Call with the write lock held.
    fn write_record(&self, name: &str, record: Record) -> Result<(), StoreError> {
        let path = self.record_path(name);
        let to_io = |e: serde_json::Error| self.write_error(&path, io::Error::other(e));
        let file = match &self.inner.keys {
            Some(keys) => RecordFile {
                version: VERSION,
                credential: name.to_owned(),
                record: None,
                sealed: Some(keys.seal(&serde_json::to_vec(&record).map_err(to_io)?)),
            },
            None => RecordFile {
                version: VERSION,
                credential: name.to_owned(),
                record: Some(record.clone()),
                sealed: None,
            },
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(to_io)?;
        if let Err(e) = fs::create_dir(&self.inner.dir) {
            if e.kind() != io::ErrorKind::AlreadyExists {
                return Err(self.write_error(&self.inner.dir, e));
            }
        } else {
            fs::set_permissions(
                &self.inner.dir,
                std::os::unix::fs::PermissionsExt::from_mode(0o700),
            )
            .map_err(|e| self.write_error(&self.inner.dir, e))?;
            sync_parent(&self.inner.dir).map_err(|e| self.write_error(&self.inner.dir, e))?;
        }
        let now = Instant::now();
        let written = write_atomic(&path, &bytes);
        self.cell(name).written(&written, Some(record), bytes, now);
        written.map(drop).map_err(|e| self.write_error(&path, e))
    }

    /// Reseals every record under the current key, under the same lock as
    /// every write (so no concurrent refresh is lost). A record that cannot
    /// be opened is reported and stays as it was.
    pub fn rekey(&self) -> Result<Rekeyed, StoreError> {
        let keys = self
            .inner
            .keys
            .as_ref()
            .ok_or(StoreError::RekeyWithoutKey)?;
        let _guard = lock_file(&self.write_lock_path())?;
        let mut done = Rekeyed {
            key_id: keys.current_id().to_owned(),
            ..Rekeyed::default()
        };
        let (root, _) = self.load_root(None)?;
        if !root.manifest && self.inner.path.exists() {
            done.resealed = self.migrate(&root)?;
        }
        for name in self.stored_names()? {
            if done.resealed.contains(&name) {
                continue;
            }
            let path = self.record_path(&name);
            let current = fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<RecordFile>(&b).ok())
                .and_then(|f| f.sealed)
                .is_some_and(|s| keys.is_current(&s));
            if current {
                done.unchanged.push(name);
                continue;
            }
            match self.load_record(&name, None) {
                Ok((rec, _)) => {
                    if let Some(rec) = (*rec).clone() {
                        self.write_record(&name, rec)?;
                        done.resealed.push(name);
                    }
                }
                Err(e) => done.failed.push((name, e)),
            }
        }
        done.resealed.sort();
        Ok(done)
    }

    /// Wakes (the receiver sees a change) when another process changes
    /// `name`'s record: a sweep every [`SWEEP_EVERY`] `stat`s the file of
    /// each credential someone waits for. `None` outside a runtime.
    pub fn changes(&self, name: &str) -> Option<watch::Receiver<u64>> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let rx = self
            .inner
            .watchers
            .lock()
            .entry(name.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        if !self
            .inner
            .sweeping
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            handle.spawn(sweep_loop(Arc::downgrade(&self.inner)));
        }
        Some(rx)
    }

    /// One sweep: every watched record whose file changed (or cannot be
    /// read) wakes its watchers; a changed manifest wakes all of them.
    fn sweep(&self) {
        let names: Vec<String> = self.inner.watchers.lock().keys().cloned().collect();
        let root_changed = !matches!(self.load_root(None), Ok((_, false)));
        for name in names {
            let changed = !matches!(self.load_record(&name, None), Ok((_, false)));
            if changed || root_changed {
                if let Some(tx) = self.inner.watchers.lock().get(&name) {
                    tx.send_modify(|n| *n += 1);
                }
            }
        }
    }

    /// Runs blocking store I/O on tokio's blocking pool, at most
    /// [`IO_PERMITS`] at a time. Nothing waiting for a permit holds a lock.
    pub(super) async fn blocking<T: Send + 'static>(
        self,
        work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let _permit = self
            .inner
            .io_gate
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| self.write_error(&self.inner.path, io::Error::other(e)))?;
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| self.write_error(&self.inner.path, io::Error::other(e)))?
    }
}

/// Sweeps until the store is dropped.
async fn sweep_loop(store: Weak<Inner>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = store.upgrade() else {
            return;
        };
        let store = FileStore { inner };
        let _ = store
            .clone()
            .blocking(move || {
                store.sweep();
                Ok(())
            })
            .await;
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

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    }
}

fn sync_parent(path: &Path) -> io::Result<()> {
    File::open(parent_dir(path))?.sync_all()
}

/// Temp file in the same directory, fsync, rename over, fsync the directory:
/// a crash leaves either the old or the new file, never a torn one. Returns
/// the new file's metadata as of after the rename (which changes its ctime).
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<fs::Metadata> {
    let dir = parent_dir(path);
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
    use crate::secret::Secret;
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
            token_fields: Default::default(),
            seeds_seen: vec![],
            intent: None,
            dead: None,
            updated_at_ms: 0,
            dpop_key: None,
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
        for file in [
            store.path().to_owned(),
            store.record_path("a"),
            store.record_path("b"),
        ] {
            let mode = fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", file.display());
        }
        let mode = fs::metadata(store.records_dir())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        for d in [dir.path(), store.records_dir()] {
            let leftovers: Vec<_> = fs::read_dir(d)
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
                .collect();
            assert!(leftovers.is_empty());
        }
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
        let raw = fs::read_to_string(store.record_path("b")).unwrap();
        let kid = super::seal::key_id_in(&Secret::new("correct horse"), &raw).unwrap();
        assert!(
            raw.contains(&format!("\"tpv3:{kid}:"))
                && !raw.contains("\"rt\"")
                && !raw.contains("family-two"),
            "{raw}"
        );
        assert_eq!(store.read("b").unwrap().unwrap().family, "family-two");
        // The record written before the key was set is sealed at its next write.
        store.write("a", &record("f1", 2)).unwrap();
        let raw_a = fs::read_to_string(store.record_path("a")).unwrap();
        assert!(
            raw_a.contains("\"tpv3:") && !raw_a.contains("\"rt\""),
            "{raw_a}"
        );
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
        let resealed = fs::read_to_string(rotated.record_path("a")).unwrap();
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
        for name in ["a", "b"] {
            let raw = fs::read_to_string(store.record_path(name)).unwrap();
            assert!(raw.contains("\"tpv3:"), "{raw}");
        }
        assert!(!fs::read_to_string(&path).unwrap().contains("sealed"));
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
        let path = store.record_path("a");
        rewrite_in_place_keeping_size_and_mtime(&path, 1);
        // A poll may answer from a snapshot confirmed a moment ago ...
        let later = Instant::now() + POLL_FRESH + Duration::from_millis(1);
        assert_eq!(store.poll_cached("a", later), None, "stale by then");
        // ... but once that moment has passed it looks at the file.
        store.cell("a").last.lock().as_mut().unwrap().checked -= POLL_FRESH * 2;
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
        let path = store.record_path("a");
        rewrite_in_place_keeping_size_and_mtime(&path, 1);
        // As if the rewrite had landed within the same clock tick: even
        // its ctime is the one the snapshot holds.
        let now = Stamp::of(&fs::metadata(&path).unwrap());
        store.cell("a").last.lock().as_mut().unwrap().stamp = Some(now);
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
        assert_eq!(mine.poll_blocking("b").unwrap().unwrap().family, "f2");
        // Unchanged since: the same parsed record answers.
        let (before, _) = mine.load_record("a", None).unwrap();
        let (after, parsed) = mine.load_record("a", None).unwrap();
        assert!(Arc::ptr_eq(&before, &after) && !parsed);
    }

    #[test]
    fn an_unreadable_file_is_an_error_not_the_last_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let store = FileStore::open(&path).unwrap();
        store.write("a", &record("f1", 1)).unwrap();
        store.write("b", &record("f2", 1)).unwrap();
        fs::write(store.record_path("a"), b"{ not json").unwrap();
        assert!(matches!(store.read("a"), Err(StoreError::Corrupt { .. })));
        store.write("a", &record("f1", 2)).unwrap_err();
        assert_eq!(store.read("b").unwrap().unwrap().generation, 1);
        // An unreadable manifest fails every credential.
        fs::write(&path, b"{ not json").unwrap();
        assert!(matches!(store.read("b"), Err(StoreError::Corrupt { .. })));
        store.write("b", &record("f2", 2)).unwrap_err();
    }

    fn write_v1(path: &Path, records: &[(&str, Record)]) {
        let creds: BTreeMap<&str, &Record> = records.iter().map(|(n, r)| (*n, r)).collect();
        let v1 = serde_json::json!({"version": 1, "credentials": creds});
        fs::write(path, serde_json::to_vec_pretty(&v1).unwrap()).unwrap();
    }

    #[test]
    fn a_version_1_store_is_read_as_is_and_moved_to_one_file_per_credential_at_the_first_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        write_v1(&path, &[("a", record("f1", 4)), ("b", record("f2", 9))]);
        let store = FileStore::open(&path).unwrap();
        assert_eq!(store.read("a").unwrap().unwrap().generation, 4);
        assert!(
            !store.records_dir().exists(),
            "opening and reading write nothing"
        );
        store.write("a", &record("f1", 5)).unwrap();
        assert_eq!(store.read("a").unwrap().unwrap().generation, 5);
        assert_eq!(store.read("b").unwrap().unwrap().generation, 9);
        assert!(store.record_path("b").exists());
        // What an older tokenproxy parses the manifest into: an error, never
        // an empty store (it would take a consumed seed for new).
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct OldStoreFile {
            version: u32,
            #[serde(default)]
            credentials: BTreeMap<String, Record>,
        }
        let manifest = fs::read(&path).unwrap();
        assert!(serde_json::from_slice::<OldStoreFile>(&manifest).is_err());
        // Another process, opening afresh, sees the same.
        let other = FileStore::open(&path).unwrap();
        assert_eq!(other.read("b").unwrap().unwrap().generation, 9);
    }

    #[test]
    fn a_move_cut_short_by_a_crash_loses_nothing_and_a_records_own_file_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let store = FileStore::open(&path).unwrap();
        store.write("a", &record("f1", 6)).unwrap();
        // The crash: records already in files of their own, the old file
        // (with an older copy of a) not yet replaced.
        write_v1(&path, &[("a", record("f1", 5)), ("b", record("f2", 2))]);
        let store = FileStore::open(&path).unwrap();
        assert_eq!(store.read("a").unwrap().unwrap().generation, 6);
        assert_eq!(store.read("b").unwrap().unwrap().generation, 2);
        store.write("c", &record("f3", 1)).unwrap();
        assert_eq!(store.read("a").unwrap().unwrap().generation, 6);
        assert_eq!(store.read("b").unwrap().unwrap().generation, 2);
    }

    #[test]
    fn a_write_touches_only_its_own_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(&dir.path().join("tokens.json")).unwrap();
        let names: Vec<String> = (0..50).map(|i| format!("c{i}")).collect();
        for n in &names {
            store.write(n, &record(n, 1)).unwrap();
        }
        let stamp = |n: &str| Stamp::of(&fs::metadata(store.record_path(n)).unwrap());
        let manifest = Stamp::of(&fs::metadata(store.path()).unwrap());
        let before: Vec<Stamp> = names.iter().map(|n| stamp(n)).collect();
        store.write("c7", &record("c7", 2)).unwrap();
        for (n, was) in names.iter().zip(&before) {
            assert_eq!(stamp(n) == *was, n != "c7", "{n}");
        }
        assert_eq!(manifest, Stamp::of(&fs::metadata(store.path()).unwrap()));
    }

    #[test]
    fn names_that_are_not_plain_get_files_of_their_own_and_misfiled_records_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let store = FileStore::open(&path).unwrap();
        for n in ["a.b", "a_b", "../x", ""] {
            store.write(n, &record(n, 1)).unwrap();
        }
        for n in ["a.b", "a_b", "../x", ""] {
            assert_eq!(store.read(n).unwrap().unwrap().family, n);
        }
        assert_eq!(fs::read_dir(store.records_dir()).unwrap().count(), 4);
        fs::copy(store.record_path("a_b"), store.record_path("zz")).unwrap();
        assert!(matches!(store.read("zz"), Err(StoreError::Misfiled { .. })));
        assert!(matches!(store.verify(), Err(StoreError::Misfiled { .. })));
        fs::remove_file(store.record_path("zz")).unwrap();
        assert_eq!(FileStore::open(&path).unwrap().verify().unwrap(), 4);
    }

    #[test]
    fn a_layout_newer_than_this_tokenproxy_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        fs::write(&path, br#"{"version": 3, "credentials": "elsewhere"}"#).unwrap();
        let err = FileStore::open(&path).unwrap_err();
        assert!(
            matches!(err, StoreError::LayoutTooNew { found: 3, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_sweep_wakes_watchers_of_a_record_another_process_changed_and_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let mine = FileStore::open(&path).unwrap();
        mine.write("a", &record("f1", 1)).unwrap();
        mine.write("b", &record("f2", 1)).unwrap();
        let mut a = mine.changes("a").unwrap();
        let mut b = mine.changes("b").unwrap();
        let mut c = mine.changes("c").unwrap();
        mine.sweep();
        // Own writes are not news, and nothing changed since.
        mine.write("a", &record("f1", 2)).unwrap();
        mine.sweep();
        assert!(!a.has_changed().unwrap() && !b.has_changed().unwrap());
        let other = FileStore::open(&path).unwrap();
        other.write("b", &record("f2", 2)).unwrap();
        other.write("c", &record("f3", 1)).unwrap();
        mine.sweep();
        assert!(!a.has_changed().unwrap());
        assert!(b.has_changed().unwrap() && c.has_changed().unwrap());
        b.mark_unchanged();
        c.mark_unchanged();
        fs::write(other.record_path("b"), b"{ not json").unwrap();
        mine.sweep();
        assert!(b.has_changed().unwrap(), "an unreadable record is news too");
        assert!(!c.has_changed().unwrap());
        let _ = a.borrow_and_update();
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
