//! Moving token families without spending a token: between two stores
//! (`store migrate`), or out to a file and back in (`store export`,
//! `store import`).
//!
//! A refresh token must have exactly one live copy. So whatever leaves a
//! store is marked moved there (a dead mark with reason `migrated`: a
//! process still using that store stops refreshing and says why), and a
//! store never takes a family at an older generation than it already holds
//! (that copy's refresh token is spent). Knows nothing of the CLI.

use super::reason::Reason;
use super::seal::{self, Keyring, UnsealError};
use super::store::{unix_ms, DeadMark, Record, Store, StoreError, StoreLock};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::SystemTime;

/// `format` of an export document.
const EXPORT_FORMAT: &str = "tokenproxy-export";

/// What `migrate` did for one credential.
#[derive(Debug, PartialEq, Eq)]
pub enum Migrated {
    Copied { family: String, generation: u64 },
    NothingStored,
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("credential {name}: the target store already holds a working token family (generation {generation}); pass --force to replace it")]
    TargetWorks { name: String, generation: u64 },
    #[error("credential {name}: the target store holds the same token family at generation {have}, newer than generation {incoming} being brought in; that copy's refresh token is spent, so this is refused even with --force")]
    Stale {
        name: String,
        have: u64,
        incoming: u64,
    },
    #[error("credential {name}: the source record is already retired (migrated) and has nothing to move")]
    SourceRetired { name: String },
    #[error("this export was already imported ({when}); importing it again would make a second live copy of its refresh tokens: export again from the store that now holds them")]
    AlreadyImported { when: String },
    #[error("credential {name}: the store holds no token set for it")]
    NothingStored { name: String },
    #[error("not a tokenproxy export (expected \"format\": \"{EXPORT_FORMAT}\")")]
    NotAnExport,
    #[error("the export is not valid JSON")]
    Document(#[source] serde_json::Error),
    #[error("the export is encrypted and cannot be opened with the configured store keys")]
    Sealed(#[source] UnsealError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A file holding token sets between `store export` and `store import`.
#[derive(Debug, Serialize, Deserialize)]
struct ExportDocument {
    format: String,
    version: u32,
    exported_at_ms: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    credentials: BTreeMap<String, Record>,
    /// With a store key: `credentials` sealed as one value, as in the file store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed: Option<String>,
    /// Set (Unix ms) by the import that consumed this document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    imported_at_ms: Option<u64>,
}

fn is_moved(rec: &Record) -> bool {
    rec.dead
        .as_ref()
        .is_some_and(|d| Reason::parse(&d.reason) == Reason::Migrated && d.family == rec.family)
}

/// The record as the source keeps it once moved: dead, so no process
/// using the source can present its refresh token again.
fn moved_mark(rec: &Record) -> Record {
    let mut retired = rec.clone();
    retired.intent = None;
    retired.dead = Some(DeadMark {
        family: rec.family.clone(),
        generation: rec.generation,
        reason: Reason::Migrated.as_str().to_owned(),
    });
    retired
}

/// May `incoming` replace what the target holds?
fn check_target(
    name: &str,
    incoming: &Record,
    existing: Option<&Record>,
    force: bool,
) -> Result<(), TransferError> {
    let Some(t) = existing else { return Ok(()) };
    if t.family == incoming.family && t.generation > incoming.generation {
        return Err(TransferError::Stale {
            name: name.to_owned(),
            have: t.generation,
            incoming: incoming.generation,
        });
    }
    let works = t.dead.is_none() && t.refresh_token.is_some();
    if works && t.identity() != incoming.identity() && !force {
        return Err(TransferError::TargetWorks {
            name: name.to_owned(),
            generation: t.generation,
        });
    }
    Ok(())
}

/// Writes `rec` into `to` under the credential's lock, after `check_target`.
/// Seeds the target had seen stay seen: forgetting one would let the
/// config's old seed start a family from a spent token.
async fn place(to: &Store, name: &str, rec: &Record, force: bool) -> Result<(), TransferError> {
    let lock = to.lock_credential(name).await?;
    let existing = to.read(name).await?;
    check_target(name, rec, existing.as_ref(), force)?;
    let mut rec = rec.clone();
    for seed in existing.iter().flat_map(|t| &t.seeds_seen) {
        if !rec.seeds_seen.contains(seed) {
            rec.seeds_seen.push(seed.clone());
        }
    }
    let prev = existing.as_ref().map(Record::identity);
    to.write(name, &rec, prev).await?;
    lock.release().await?;
    Ok(())
}

/// Moves one credential's record between stores: the source lock held
/// throughout, the record copied as is (family, generation, intent, seeds
/// seen), then the source marked moved.
pub async fn migrate(
    from: &Store,
    to: &Store,
    name: &str,
    force: bool,
) -> Result<Migrated, TransferError> {
    let src_lock = from.lock_credential(name).await?;
    let Some(rec) = from.read(name).await? else {
        src_lock.release().await?;
        return Ok(Migrated::NothingStored);
    };
    if is_moved(&rec) {
        return Err(TransferError::SourceRetired {
            name: name.to_owned(),
        });
    }
    // The source is retired before the target becomes live: a failure
    // in between leaves no copy live rather than two.
    let mark = moved_mark(&rec);
    from.write_held(&src_lock, name, &mark, Some(rec.identity()), None)
        .await?;
    if let Err(e) = place(to, name, &rec, force).await {
        // Not placed: the source goes back to what it was.
        from.write_held(&src_lock, name, &rec, Some(mark.identity()), None)
            .await?;
        return Err(e);
    }
    src_lock.release().await?;
    Ok(Migrated::Copied {
        family: rec.family,
        generation: rec.generation,
    })
}

/// Records read for export, their locks still held so nothing refreshes
/// them until `finish`.
pub struct Export {
    locks: Vec<StoreLock>,
    records: BTreeMap<String, Record>,
}

/// Locks and reads every named credential. Each must hold a live record.
pub async fn begin_export(from: &Store, names: &[String]) -> Result<Export, TransferError> {
    let mut names = names.to_vec();
    // One order for every caller, so two exports cannot deadlock.
    names.sort();
    names.dedup();
    let mut export = Export {
        locks: Vec::new(),
        records: BTreeMap::new(),
    };
    for name in names {
        export.locks.push(from.lock_credential(&name).await?);
        let rec = from
            .read(&name)
            .await?
            .ok_or_else(|| TransferError::NothingStored { name: name.clone() })?;
        if is_moved(&rec) {
            return Err(TransferError::SourceRetired { name });
        }
        export.records.insert(name, rec);
    }
    Ok(export)
}

impl Export {
    pub fn records(&self) -> &BTreeMap<String, Record> {
        &self.records
    }

    /// The export file's bytes; sealed under the current key when given.
    pub fn document(&self, keys: Option<&Keyring>) -> Vec<u8> {
        let mut doc = ExportDocument {
            format: EXPORT_FORMAT.into(),
            version: 1,
            exported_at_ms: unix_ms(SystemTime::now()),
            credentials: self.records.clone(),
            sealed: None,
            imported_at_ms: None,
        };
        if let Some(keys) = keys {
            // Serializing plain structs of strings and numbers cannot fail.
            let plain = serde_json::to_vec(&doc.credentials).unwrap_or_default();
            doc.sealed = Some(keys.seal(&plain));
            doc.credentials.clear();
        }
        let mut bytes = serde_json::to_vec_pretty(&doc).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }

    /// Releases the locks without marking anything (the document could not
    /// be written).
    pub async fn abandon(self) {
        for lock in self.locks {
            // A lease not released now runs out by itself.
            let _ = lock.release().await;
        }
    }

    /// Marks every exported record moved in the source (unless `keep`),
    /// then releases the locks. Call only once the document is durable. On
    /// failure, also returns the credentials already marked.
    pub async fn finish(
        self,
        from: &Store,
        keep: bool,
    ) -> Result<(), (Vec<String>, TransferError)> {
        let mut marked = Vec::new();
        if !keep {
            for (name, rec) in &self.records {
                if let Err(e) = from
                    .write(name, &moved_mark(rec), Some(rec.identity()))
                    .await
                {
                    return Err((marked, e.into()));
                }
                marked.push(name.clone());
            }
        }
        for lock in self.locks {
            lock.release()
                .await
                .map_err(|e| (marked.clone(), e.into()))?;
        }
        Ok(())
    }
}

/// The token sets in an export file; a sealed one is opened with `keys`
/// (the importing store's current or previous keys).
pub fn read_export(
    bytes: &[u8],
    keys: Option<&Keyring>,
) -> Result<BTreeMap<String, Record>, TransferError> {
    let doc: ExportDocument = serde_json::from_slice(bytes).map_err(TransferError::Document)?;
    if doc.format != EXPORT_FORMAT {
        return Err(TransferError::NotAnExport);
    }
    if let Some(at) = doc.imported_at_ms {
        return Err(TransferError::AlreadyImported {
            when: humantime::format_rfc3339_seconds(super::store::from_unix_ms(at)).to_string(),
        });
    }
    match doc.sealed {
        Some(sealed) => {
            let plain = seal::unseal_with(keys, &sealed).map_err(TransferError::Sealed)?;
            serde_json::from_slice(&plain).map_err(TransferError::Document)
        }
        None => Ok(doc.credentials),
    }
}

/// The export document marked consumed, so the same file cannot be
/// imported a second time (into this store or another one).
pub fn mark_imported(bytes: &[u8]) -> Result<Vec<u8>, TransferError> {
    let mut doc: ExportDocument = serde_json::from_slice(bytes).map_err(TransferError::Document)?;
    doc.imported_at_ms = Some(unix_ms(SystemTime::now()));
    let mut out = serde_json::to_vec_pretty(&doc).map_err(TransferError::Document)?;
    out.push(b'\n');
    Ok(out)
}

/// Writes an exported record into `to`, refusing to replace a working
/// family (unless `force`) or to go back to an older generation (ever).
pub async fn import(
    to: &Store,
    name: &str,
    rec: &Record,
    force: bool,
) -> Result<(), TransferError> {
    place(to, name, rec, force).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use crate::token::store::FileStore;

    fn record(family: &str, generation: u64) -> Record {
        Record {
            token_url: "http://127.0.0.1/token".into(),
            client_id: "c".into(),
            family: family.into(),
            generation,
            refresh_token: Some(Secret::new(format!("rt-{family}-{generation}"))),
            access_token: None,
            access_expires_at_ms: None,
            access_issued_at_ms: None,
            refresh_expires_at_ms: None,
            token_fields: Default::default(),
            seeds_seen: vec![format!("seed-{family}")],
            intent: None,
            dead: None,
            updated_at_ms: 0,
            dpop_key: None,
        }
    }

    fn file_store(dir: &tempfile::TempDir, name: &str, key: Option<&str>) -> Store {
        let keys = key.map(|k| Keyring::new(&Secret::new(k), &[]));
        Store::File(FileStore::open_with_keys(&dir.path().join(name), keys).unwrap())
    }

    #[tokio::test]
    async fn export_marks_the_source_moved_and_import_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let src = file_store(&dir, "src.json", None);
        src.write("a", &record("f1", 4), None).await.unwrap();
        let names = ["a".to_owned()];
        let export = begin_export(&src, &names).await.unwrap();
        let bytes = export.document(None);
        export.finish(&src, false).await.unwrap();
        let left = src.read("a").await.unwrap().unwrap();
        assert!(is_moved(&left), "{left:?}");
        assert!(matches!(
            begin_export(&src, &names).await,
            Err(TransferError::SourceRetired { .. })
        ));

        let dst = file_store(&dir, "dst.json", None);
        let recs = read_export(&bytes, None).unwrap();
        import(&dst, "a", &recs["a"], false).await.unwrap();
        let back = dst.read("a").await.unwrap().unwrap();
        assert_eq!(back.identity(), ("f1", 4));
        assert!(back.dead.is_none());
        // Back into the source it came from: revives the moved record.
        import(&src, "a", &recs["a"], false).await.unwrap();
        assert!(src.read("a").await.unwrap().unwrap().dead.is_none());
    }

    /// The source cannot be marked moved (its write lock is unusable): the
    /// target must not have become live, or there would be two copies.
    #[tokio::test]
    async fn migrate_never_leaves_two_live_copies() {
        let dir = tempfile::tempdir().unwrap();
        let src = file_store(&dir, "src.json", None);
        src.write("a", &record("f1", 3), None).await.unwrap();
        let write_lock = dir.path().join("src.json.lock");
        std::fs::remove_file(&write_lock).unwrap();
        std::fs::create_dir(&write_lock).unwrap();
        let dst = file_store(&dir, "dst.json", None);
        assert!(migrate(&src, &dst, "a", false).await.is_err());
        assert!(dst.read("a").await.unwrap().is_none(), "target live");
        assert!(src.read("a").await.unwrap().unwrap().dead.is_none());

        // A target that refuses: the source is left as it was.
        std::fs::remove_dir(dir.path().join("src.json.lock")).unwrap();
        dst.write("a", &record("other", 1), None).await.unwrap();
        assert!(matches!(
            migrate(&src, &dst, "a", false).await,
            Err(TransferError::TargetWorks { .. })
        ));
        let left = src.read("a").await.unwrap().unwrap();
        assert_eq!(left.identity(), ("f1", 3));
        assert!(left.dead.is_none());
        assert_eq!(dst.read("a").await.unwrap().unwrap().family, "other");
    }

    #[test]
    fn an_imported_export_cannot_be_imported_again() {
        let doc = ExportDocument {
            format: EXPORT_FORMAT.into(),
            version: 1,
            exported_at_ms: 1,
            credentials: BTreeMap::from([("a".to_owned(), record("f1", 2))]),
            sealed: None,
            imported_at_ms: None,
        };
        let bytes = serde_json::to_vec(&doc).unwrap();
        assert_eq!(read_export(&bytes, None).unwrap()["a"].generation, 2);
        let marked = mark_imported(&bytes).unwrap();
        assert!(matches!(
            read_export(&marked, None),
            Err(TransferError::AlreadyImported { .. })
        ));
    }

    #[tokio::test]
    async fn import_refuses_a_working_family_unless_forced_and_a_stale_generation_always() {
        let dir = tempfile::tempdir().unwrap();
        let dst = file_store(&dir, "dst.json", None);
        dst.write("a", &record("other", 2), None).await.unwrap();
        assert!(matches!(
            import(&dst, "a", &record("f1", 4), false).await,
            Err(TransferError::TargetWorks { generation: 2, .. })
        ));
        import(&dst, "a", &record("f1", 4), true).await.unwrap();
        let merged = dst.read("a").await.unwrap().unwrap();
        assert!(
            merged.seeds_seen.contains(&"seed-other".to_owned()),
            "seeds the target had seen stay seen: {:?}",
            merged.seeds_seen
        );
        dst.write("a", &record("f1", 5), Some(("f1", 4)))
            .await
            .unwrap();
        for force in [false, true] {
            assert!(matches!(
                import(&dst, "a", &record("f1", 4), force).await,
                Err(TransferError::Stale {
                    have: 5,
                    incoming: 4,
                    ..
                })
            ));
        }
        assert_eq!(dst.read("a").await.unwrap().unwrap().generation, 5);
    }

    #[tokio::test]
    async fn a_sealed_export_needs_a_key_of_the_importing_store() {
        let dir = tempfile::tempdir().unwrap();
        let src = file_store(&dir, "src.json", Some("key-a"));
        src.write("a", &record("f1", 1), None).await.unwrap();
        let export = begin_export(&src, &["a".to_owned()]).await.unwrap();
        let key_a = Keyring::new(&Secret::new("key-a"), &[]);
        let bytes = export.document(Some(&key_a));
        export.finish(&src, true).await.unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        // Quotes and dashes cannot occur in base64: no false alarm.
        assert!(
            !text.contains("rt-f1-1") && !text.contains("\"family\""),
            "{text}"
        );
        assert!(matches!(
            read_export(&bytes, None),
            Err(TransferError::Sealed(UnsealError::NoKey { .. }))
        ));
        let rotated = Keyring::new(&Secret::new("key-b"), &[Secret::new("key-a")]);
        assert_eq!(
            read_export(&bytes, Some(&rotated)).unwrap()["a"].generation,
            1
        );
        assert!(
            src.read("a").await.unwrap().unwrap().dead.is_none(),
            "--keep"
        );
        assert!(matches!(
            read_export(br#"{"format":"x","version":1,"exported_at_ms":0}"#, None),
            Err(TransferError::NotAnExport)
        ));
    }
}
