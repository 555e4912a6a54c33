//! The postgres store (fleet mode, docs/architecture.md "Fleet mode"): one row per
//! credential holding the record and a lease (holder, `lease_until`), plus
//! one LISTEN connection per process that wakes slots when another replica
//! writes.
//!
//! The lease is a committed row claimed by compare-and-set, never a session
//! or advisory lock held across the IdP call: a dropped session would
//! silently release those while the holder still believes it holds them.
//! Writes are fenced on the (family, generation) the writer read. Knows
//! nothing of HTTP or of when to refresh.
//!
//! TLS follows the URL's `sslmode` as libpq reads it, plus `sslrootcert`
//! (which tokio-postgres does not parse, so it is taken out here): with a
//! root file only that CA is trusted, otherwise the public web roots. With
//! `require` and the verify modes the certificate chain and the host name
//! are always verified. `prefer` (the default) is libpq's: TLS when the
//! server offers it, unverified, else plaintext; `check` warns about it off
//! loopback.

use super::record::{DeadMark, Intent, Record, Rekeyed, StoreError};
use super::seal::{self, Keyring};
use crate::secret::Secret;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_postgres::config::SslMode;
use tokio_postgres::{AsyncMessage, Client, Connection, NoTls};
use tokio_util::sync::CancellationToken;

/// A holder that stops renewing (killed, partitioned) loses the lease after this.
const LEASE_TTL: Duration = Duration::from_secs(10);
const RENEW_EVERY: Duration = Duration::from_secs(3);
/// Waiting longer than this for another replica's lease is a transient failure.
const LEASE_WAIT_MAX: Duration = Duration::from_secs(60);
/// Every statement: a hung database must not hang a refresh forever.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
const CHANNEL: &str = "tokenproxy_credentials";
/// `pg_advisory_xact_lock` key for migrations ("tokenpxy" in ASCII).
const MIGRATION_LOCK: i64 = 0x746f_6b65_6e70_7879;
const MAX_IDLE: usize = 4;
/// Connections in use at once: with many credentials a start-up or a poll
/// round must queue for a few connections, not open one each (the server
/// refuses clients past its `max_connections`).
const MAX_IN_USE: usize = 8;
/// How old the shared view of every row's version may be for a change
/// poll: one query per this, whatever the number of credentials.
const VERSIONS_FRESH: Duration = Duration::from_secs(1);

/// Versioned migrations; index + 1 is the schema version.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS tokenproxy_credentials (
        name text PRIMARY KEY,
        token_url text,
        client_id text,
        family text,
        generation bigint,
        refresh_token text,
        access_token text,
        access_expires_at_ms bigint,
        access_issued_at_ms bigint,
        refresh_expires_at_ms bigint,
        seeds_seen text[] NOT NULL DEFAULT '{}',
        dead text,
        lease_intent text,
        lease_holder text,
        lease_until timestamptz,
        updated_at timestamptz NOT NULL DEFAULT now()
    )",
    // The generated DPoP key kept with the token set (docs/dpop.md),
    // sealed like the tokens.
    "ALTER TABLE tokenproxy_credentials ADD COLUMN IF NOT EXISTS dpop_key text",
    // Checked token-response values routes use (`{token.instance_url}`), JSON.
    "ALTER TABLE tokenproxy_credentials ADD COLUMN IF NOT EXISTS token_fields text",
];

/// The postgres store. Cheap to clone; the pool and the listener are shared.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    keys: Option<Keyring>,
    /// Idle connections. A sync mutex: never held across an await.
    idle: Mutex<Vec<Client>>,
    /// A permit per connection in use (`MAX_IN_USE`); never held across
    /// anything but one statement's round trip, so waiting is short.
    in_use: Arc<tokio::sync::Semaphore>,
    /// One counter per credential, bumped on every NOTIFY for it.
    watchers: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// Every row's version (`xmin`, new with each committed change) and
    /// when it was queried. An async mutex, held across the query, so the
    /// polls of a round wait for one query instead of sending their own.
    versions: tokio::sync::Mutex<Option<(Instant, Versions)>>,
    /// Per credential, the record a poll last read in full, with the row
    /// version and the NOTIFY counter it was read at. A sync mutex, never
    /// held across an await.
    polled: Mutex<HashMap<String, Polled>>,
    stop: CancellationToken,
}

/// Row version by credential name.
type Versions = Arc<HashMap<String, String>>;

struct Polled {
    version: Option<String>,
    notified: u64,
    record: Option<Record>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("tls", &self.inner.tls.is_some())
            .field("keys", &self.inner.keys)
            .finish()
    }
}

impl PgStore {
    /// Connects, creates or migrates the schema, and starts the listener.
    pub async fn open(url: &Secret, keys: Option<Keyring>) -> Result<PgStore, StoreError> {
        let url_text = url.expose();
        let url = UrlTls::split(url_text)?;
        let mut config: tokio_postgres::Config =
            url.rest
                .parse()
                .map_err(|e: tokio_postgres::Error| StoreError::Url {
                    message: strip_secrets(&e.to_string()),
                })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        // Lets an operator find the fleet's sessions in pg_stat_activity.
        if config.get_application_name().is_none() {
            config.application_name("tokenproxy");
        }
        let tls = match config.get_ssl_mode() {
            SslMode::Require => Some(rustls_connector(url.root_cert.as_deref())?),
            // With a connector, tokio-postgres asks for TLS and goes on in
            // plaintext only if the server declines, as libpq's prefer.
            SslMode::Prefer => Some(prefer_connector()?),
            _ => None,
        };
        if let Some(warning) = tls_warning(url_text) {
            tracing::warn!(event = "store_tls_unverified", warning = %warning, "Store connection not verified");
        }
        let store = PgStore {
            inner: Arc::new(Inner {
                config,
                tls,
                keys,
                idle: Mutex::new(Vec::new()),
                in_use: Arc::new(tokio::sync::Semaphore::new(MAX_IN_USE)),
                watchers: Mutex::new(HashMap::new()),
                versions: tokio::sync::Mutex::new(None),
                polled: Mutex::new(HashMap::new()),
                stop: CancellationToken::new(),
            }),
        };
        store.migrate().await?;
        tokio::spawn(listen_loop(
            Arc::downgrade(&store.inner),
            store.inner.stop.clone(),
        ));
        Ok(store)
    }

    async fn connect(&self) -> Result<Client, StoreError> {
        let cfg = &self.inner.config;
        let client = match &self.inner.tls {
            Some(tls) => {
                let (c, conn) = timed(cfg.connect(tls.clone())).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                c
            }
            None => {
                let (c, conn) = timed(cfg.connect(NoTls)).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                c
            }
        };
        Ok(client)
    }

    /// A pooled connection; returned to the pool when dropped while open.
    async fn client(&self) -> Result<Pooled, StoreError> {
        let permit = tokio::time::timeout(OP_TIMEOUT, self.inner.in_use.clone().acquire_owned())
            .await
            .map_err(|_| StoreError::DbTimeout)?
            .expect("never closed");
        let reused = {
            let mut idle = self.inner.idle.lock();
            idle.retain(|c| !c.is_closed());
            idle.pop()
        };
        let client = match reused {
            Some(c) => c,
            None => self.connect().await?,
        };
        Ok(Pooled {
            client: Some(client),
            inner: Arc::downgrade(&self.inner),
            broken: Default::default(),
            _permit: permit,
        })
    }

    /// Creates or upgrades the schema. Under a transaction-scoped advisory
    /// lock, so replicas starting at once take turns instead of racing on
    /// `CREATE TABLE`.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.connect().await?;
        let tx = timed(client.transaction()).await?;
        timed(tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])).await?;
        timed(tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS tokenproxy_schema (version integer NOT NULL)",
        ))
        .await?;
        let row = timed(tx.query_one("SELECT max(version) FROM tokenproxy_schema", &[])).await?;
        let found: i32 = row.get::<_, Option<i32>>(0).unwrap_or(0);
        let known = MIGRATIONS.len() as i32;
        if found > known {
            return Err(StoreError::SchemaTooNew { found, known });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            timed(tx.batch_execute(sql)).await?;
            let v = i as i32 + 1;
            timed(tx.execute("INSERT INTO tokenproxy_schema (version) VALUES ($1)", &[&v])).await?;
            tracing::info!(
                event = "store_migrated",
                version = v,
                "Store schema migrated"
            );
        }
        timed(tx.commit()).await?;
        Ok(())
    }

    /// Wakes (the receiver sees a change) whenever any replica writes `name`,
    /// and after the listener reconnects (a notification may have been missed).
    pub fn changes(&self, name: &str) -> watch::Receiver<u64> {
        self.inner
            .watchers
            .lock()
            .entry(name.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Claims the credential's lease, waiting (on notifications, with a
    /// timeout) while another live holder has it.
    pub async fn lock_credential(&self, name: &str) -> Result<PgLease, StoreError> {
        let holder = format!(
            "{}:{}:{:08x}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "tokenproxy".into()),
            std::process::id(),
            rand::random::<u32>()
        );
        let mut rx = self.changes(name);
        let deadline = Instant::now() + LEASE_WAIT_MAX;
        loop {
            if self.try_claim(name, &holder).await? {
                let renew = tokio::spawn(renew_loop(self.clone(), name.to_owned(), holder.clone()));
                return Ok(PgLease {
                    store: self.clone(),
                    name: name.to_owned(),
                    holder,
                    renew,
                });
            }
            if Instant::now() >= deadline {
                return Err(StoreError::LeaseBusy {
                    name: name.to_owned(),
                });
            }
            // The holder's write and release both NOTIFY; the timeout covers
            // a holder that died (its lease runs out) or a lost notification.
            let _ = tokio::time::timeout(Duration::from_millis(500), rx.changed()).await;
        }
    }

    /// Compare-and-set in its own committed statement.
    async fn try_claim(&self, name: &str, holder: &str) -> Result<bool, StoreError> {
        let c = self.client().await?;
        let ttl = LEASE_TTL.as_secs_f64();
        let n = c
            .timed(c.execute(
                "INSERT INTO tokenproxy_credentials AS t (name, lease_holder, lease_until)
             VALUES ($1, $2, now() + make_interval(secs => $3))
             ON CONFLICT (name) DO UPDATE
               SET lease_holder = EXCLUDED.lease_holder, lease_until = EXCLUDED.lease_until
               WHERE t.lease_holder IS NULL OR t.lease_until < now()",
                &[&name, &holder, &ttl],
            ))
            .await?;
        Ok(n == 1)
    }

    async fn renew(&self, name: &str, holder: &str) -> Result<bool, StoreError> {
        let c = self.client().await?;
        let ttl = LEASE_TTL.as_secs_f64();
        // Never shortens the fence an intent write set.
        let n = c
            .timed(c.execute(
                "UPDATE tokenproxy_credentials
                 SET lease_until = greatest(lease_until, now() + make_interval(secs => $3))
             WHERE name = $1 AND lease_holder = $2 AND lease_until > now()",
                &[&name, &holder, &ttl],
            ))
            .await?;
        Ok(n == 1)
    }

    async fn release(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.timed(c.query(
            "WITH r AS (UPDATE tokenproxy_credentials SET lease_holder = NULL, lease_until = NULL
                        WHERE name = $1 AND lease_holder = $2 RETURNING name)
             SELECT pg_notify('tokenproxy_credentials', name) FROM r",
            &[&name, &holder],
        ))
        .await?;
        Ok(())
    }

    pub async fn read(&self, name: &str) -> Result<Option<Record>, StoreError> {
        Ok(self.read_versioned(name).await?.0)
    }

    /// As [`PgStore::read`] when the row changed since this credential's
    /// last poll (by the row versions of one query for every row, at most
    /// `VERSIONS_FRESH` old, and by NOTIFY), else the record that poll read.
    pub async fn poll(&self, name: &str) -> Result<Option<Record>, StoreError> {
        let notified = self.notified(name);
        let version = self.versions().await?.get(name).cloned();
        if let Some(p) = self.inner.polled.lock().get(name) {
            if p.version == version && p.notified == notified {
                return Ok(p.record.clone());
            }
        }
        let (record, version) = self.read_versioned(name).await?;
        self.inner.polled.lock().insert(
            name.to_owned(),
            Polled {
                version,
                notified,
                record: record.clone(),
            },
        );
        Ok(record)
    }

    /// NOTIFYs seen for `name` so far (0 without a watcher).
    fn notified(&self, name: &str) -> u64 {
        self.inner
            .watchers
            .lock()
            .get(name)
            .map_or(0, |tx| *tx.borrow())
    }

    /// Every row's version, queried at most once per `VERSIONS_FRESH`.
    async fn versions(&self) -> Result<Versions, StoreError> {
        let mut v = self.inner.versions.lock().await;
        if let Some((at, map)) = &*v {
            if at.elapsed() < VERSIONS_FRESH {
                return Ok(map.clone());
            }
        }
        let at = Instant::now();
        let c = self.client().await?;
        let rows = c
            .timed(c.query("SELECT name, xmin::text FROM tokenproxy_credentials", &[]))
            .await?;
        let map: Versions = Arc::new(rows.iter().map(|r| (r.get(0), r.get(1))).collect());
        *v = Some((at, map.clone()));
        Ok(map)
    }

    /// The record (`None` without one) and the row's version (`None`
    /// without a row).
    async fn read_versioned(
        &self,
        name: &str,
    ) -> Result<(Option<Record>, Option<String>), StoreError> {
        let c = self.client().await?;
        let row = c
            .timed(c.query_opt(
                "SELECT token_url, client_id, family, generation, refresh_token, access_token,
                    access_expires_at_ms, access_issued_at_ms, refresh_expires_at_ms,
                    seeds_seen, dead, lease_intent,
                    (extract(epoch FROM updated_at) * 1000)::bigint, xmin::text, dpop_key,
                    token_fields
             FROM tokenproxy_credentials WHERE name = $1",
                &[&name],
            ))
            .await?;
        let Some(row) = row else {
            return Ok((None, None));
        };
        let version: Option<String> = row.get(13);
        if row.get::<_, Option<String>>(2).is_none() {
            // A lease claimed before any record was written.
            return Ok((None, version));
        }
        let corrupt = |what: &str| StoreError::Column {
            name: name.to_owned(),
            message: what.to_owned(),
        };
        let token = |v: Option<String>| -> Result<Option<Secret>, StoreError> {
            match v {
                None => Ok(None),
                Some(s) => self.unseal(name, &s).map(Some),
            }
        };
        let dead: Option<String> = row.get(10);
        let intent: Option<String> = row.get(11);
        let record = Record {
            token_url: row.get::<_, Option<String>>(0).unwrap_or_default(),
            client_id: row.get::<_, Option<String>>(1).unwrap_or_default(),
            family: row.get(2),
            generation: row.get::<_, Option<i64>>(3).unwrap_or(0) as u64,
            refresh_token: token(row.get(4))?,
            access_token: token(row.get(5))?,
            access_expires_at_ms: row.get::<_, Option<i64>>(6).map(|v| v as u64),
            access_issued_at_ms: row.get::<_, Option<i64>>(7).map(|v| v as u64),
            refresh_expires_at_ms: row.get::<_, Option<i64>>(8).map(|v| v as u64),
            seeds_seen: row.get(9),
            dead: dead
                .map(|d| serde_json::from_str::<DeadMark>(&d))
                .transpose()
                .map_err(|_| corrupt("dead is not valid JSON"))?,
            intent: intent
                .map(|i| serde_json::from_str::<Intent>(&i))
                .transpose()
                .map_err(|_| corrupt("lease_intent is not valid JSON"))?,
            updated_at_ms: row.get::<_, Option<i64>>(12).unwrap_or(0) as u64,
            dpop_key: token(row.get(14))?,
            token_fields: row
                .get::<_, Option<String>>(15)
                .map(|f| serde_json::from_str(&f))
                .transpose()
                .map_err(|_| corrupt("token_fields is not valid JSON"))?
                .unwrap_or_default(),
        };
        Ok((Some(record), version))
    }

    /// Replaces the record only if the row still holds `prev` (the identity
    /// the writer read; `None`: no record yet). NOTIFY in the same statement.
    pub async fn write(
        &self,
        name: &str,
        rec: &Record,
        prev: Option<(&str, u64)>,
    ) -> Result<(), StoreError> {
        self.write_inner(name, rec, prev, None).await
    }

    /// As [`PgStore::write`], and only while `lease` is still held (the
    /// lease is a fence: a holder that lost it writes nothing, the intent
    /// included). `hold_for` extends the lease to cover a grant about to
    /// be sent, so nobody can take over while it may still be in flight.
    pub async fn write_held(
        &self,
        lease: &PgLease,
        name: &str,
        rec: &Record,
        prev: Option<(&str, u64)>,
        hold_for: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.write_inner(name, rec, prev, Some((&lease.holder, hold_for)))
            .await
    }

    async fn write_inner(
        &self,
        name: &str,
        rec: &Record,
        prev: Option<(&str, u64)>,
        lease: Option<(&str, Option<Duration>)>,
    ) -> Result<(), StoreError> {
        let c = self.client().await?;
        let refresh = rec.refresh_token.as_ref().map(|s| self.seal(s));
        let access = rec.access_token.as_ref().map(|s| self.seal(s));
        let dpop_key = rec.dpop_key.as_ref().map(|s| self.seal(s));
        let generation = rec.generation as i64;
        let ms = |v: Option<u64>| v.map(|v| v as i64);
        let (aexp, aiss, rexp) = (
            ms(rec.access_expires_at_ms),
            ms(rec.access_issued_at_ms),
            ms(rec.refresh_expires_at_ms),
        );
        let dead = rec
            .dead
            .as_ref()
            .map(|d| serde_json::to_string(d).unwrap_or_default());
        let intent = rec
            .intent
            .as_ref()
            .map(|i| serde_json::to_string(i).unwrap_or_default());
        let fields = (!rec.token_fields.is_empty())
            .then(|| serde_json::to_string(&rec.token_fields).unwrap_or_default());
        let prev_family = prev.map(|p| p.0);
        let prev_generation = prev.map(|p| p.1 as i64);
        let holder = lease.map(|l| l.0);
        let hold_secs = lease.and_then(|l| l.1).map(|d| d.as_secs_f64());
        // $1..$13 are the record's columns; $14, $15 the fence (update
        // only); $16 the lease holder that must still hold it, $17 how long
        // the lease must last from now; $18 the record's dpop_key; $19 the
        // token fields.
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 19] = [
            &name,
            &rec.token_url,
            &rec.client_id,
            &rec.family,
            &generation,
            &refresh,
            &access,
            &aexp,
            &aiss,
            &rexp,
            &rec.seeds_seen,
            &dead,
            &intent,
            &prev_family,
            &prev_generation,
            &holder,
            &hold_secs,
            &dpop_key,
            &fields,
        ];
        let updated = c
            .timed(c.query(
                "WITH w AS (
               UPDATE tokenproxy_credentials SET token_url = $2, client_id = $3, family = $4,
                 generation = $5, refresh_token = $6, access_token = $7,
                 access_expires_at_ms = $8, access_issued_at_ms = $9, refresh_expires_at_ms = $10,
                 seeds_seen = $11, dead = $12, lease_intent = $13, updated_at = now(),
                 dpop_key = $18, token_fields = $19,
                 lease_until = CASE WHEN $17::float8 IS NULL THEN lease_until
                   ELSE greatest(lease_until, now() + make_interval(secs => $17::float8)) END
               WHERE name = $1 AND family IS NOT DISTINCT FROM $14
                 AND generation IS NOT DISTINCT FROM $15
                 AND ($16::text IS NULL OR (lease_holder = $16 AND lease_until > now()))
               RETURNING name)
             SELECT pg_notify('tokenproxy_credentials', name) FROM w",
                &params,
            ))
            .await?;
        if !updated.is_empty() {
            return Ok(());
        }
        if prev.is_none() && holder.is_none() {
            let inserted = c
                .timed(c.query(
                    "WITH w AS (
                   INSERT INTO tokenproxy_credentials (name, token_url, client_id, family,
                     generation, refresh_token, access_token, access_expires_at_ms,
                     access_issued_at_ms, refresh_expires_at_ms, seeds_seen, dead, lease_intent,
                     dpop_key, token_fields)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
                   ON CONFLICT (name) DO NOTHING RETURNING name)
                 SELECT pg_notify('tokenproxy_credentials', name) FROM w",
                    // The same columns, without the fence.
                    &[&params[..13], &params[17..]].concat(),
                ))
                .await?;
            if !inserted.is_empty() {
                return Ok(());
            }
        }
        Err(StoreError::Fenced {
            name: name.to_owned(),
        })
    }

    /// Reseals every row's token columns under the current key. Each row
    /// on its own, fenced on the values read, so a refresh landing meanwhile
    /// is never overwritten (the row is read again instead). Rows that
    /// cannot be opened are reported and left as they are.
    pub async fn rekey(&self) -> Result<Rekeyed, StoreError> {
        let keys = self.inner.keys.clone().ok_or(StoreError::RekeyWithoutKey)?;
        let names: Vec<String> = {
            let c = self.client().await?;
            c.timed(c.query(
                "SELECT name FROM tokenproxy_credentials WHERE family IS NOT NULL ORDER BY name",
                &[],
            ))
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect()
        };
        let mut done = Rekeyed::default();
        for name in names {
            match self.rekey_row(&keys, &name).await {
                Ok(true) => done.resealed.push(name),
                Ok(false) => done.unchanged.push(name),
                Err(e) => done.failed.push((name, e)),
            }
        }
        // After the rows: a passphrase's id depends on the salt read from them.
        done.key_id = keys.current_id();
        Ok(done)
    }

    /// True when the row was rewritten, false when it needed nothing.
    async fn rekey_row(&self, keys: &Keyring, name: &str) -> Result<bool, StoreError> {
        for _ in 0..5 {
            let c = self.client().await?;
            let Some(row) = c
                .timed(c.query_opt(
                    "SELECT refresh_token, access_token, dpop_key FROM tokenproxy_credentials WHERE name = $1",
                    &[&name],
                ))
                .await?
            else {
                return Ok(false);
            };
            let old: [Option<String>; 3] = [row.get(0), row.get(1), row.get(2)];
            if old.iter().flatten().all(|v| keys.is_current(v)) {
                return Ok(false);
            }
            let mut new: [Option<String>; 3] = [None, None, None];
            for (slot, v) in new.iter_mut().zip(&old) {
                if let Some(v) = v {
                    *slot = Some(keys.seal(self.unseal(name, v)?.expose().as_bytes()));
                }
            }
            // No NOTIFY: the tokens, family and generation are unchanged.
            let n = c
                .timed(c.execute(
                    "UPDATE tokenproxy_credentials SET refresh_token = $2, access_token = $3,
                       dpop_key = $6
                     WHERE name = $1 AND refresh_token IS NOT DISTINCT FROM $4
                       AND access_token IS NOT DISTINCT FROM $5
                       AND dpop_key IS NOT DISTINCT FROM $7",
                    &[&name, &new[0], &new[1], &old[0], &old[1], &new[2], &old[2]],
                ))
                .await?;
            if n == 1 {
                return Ok(true);
            }
        }
        Err(StoreError::Fenced {
            name: name.to_owned(),
        })
    }

    fn seal(&self, s: &Secret) -> String {
        match &self.inner.keys {
            Some(keys) => keys.seal(s.expose().as_bytes()),
            None => s.expose().to_owned(),
        }
    }

    fn unseal(&self, name: &str, v: &str) -> Result<Secret, StoreError> {
        if !seal::is_sealed(v) {
            // Written before a key was set: read as is, sealed at the next write.
            return Ok(Secret::new(v));
        }
        let plain = seal::unseal_with(self.inner.keys.as_ref(), v).map_err(|source| {
            StoreError::DecryptColumn {
                name: name.to_owned(),
                source,
            }
        })?;
        String::from_utf8(plain)
            .map(Secret::new)
            .map_err(|_| StoreError::Column {
                name: name.to_owned(),
                message: "token is not UTF-8".into(),
            })
    }
}

/// A claimed lease. Renewed in the background while held; released (with
/// a NOTIFY, so waiters retry at once) when dropped.
#[derive(Debug)]
pub struct PgLease {
    store: PgStore,
    name: String,
    holder: String,
    renew: tokio::task::JoinHandle<()>,
}

impl PgLease {
    /// Releases now and waits for it (a short-lived CLI must not leave the
    /// lease to run out).
    pub async fn release(mut self) -> Result<(), StoreError> {
        self.renew.abort();
        let holder = std::mem::take(&mut self.holder);
        self.store.release(&self.name, &holder).await
    }
}

impl Drop for PgLease {
    fn drop(&mut self) {
        self.renew.abort();
        if self.holder.is_empty() {
            return;
        }
        let (store, name, holder) = (
            self.store.clone(),
            std::mem::take(&mut self.name),
            std::mem::take(&mut self.holder),
        );
        // A failed release only delays the others until the lease runs out.
        tokio::spawn(async move {
            let _ = store.release(&name, &holder).await;
        });
    }
}

async fn renew_loop(store: PgStore, name: String, holder: String) {
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        match store.renew(&name, &holder).await {
            Ok(true) => {}
            Ok(false) => {
                // Another replica took over: its re-read sees our intent and
                // follows the lost-rotation rules; our write stays fenced.
                tracing::warn!(event = "lease_lost", credential = %name, "Refresh lease taken over by another replica");
                return;
            }
            Err(e) => {
                tracing::warn!(event = "lease_renew_failed", credential = %name, error = %crate::error_chain(&e), "Could not renew the refresh lease");
            }
        }
    }
}

struct Pooled {
    client: Option<Client>,
    inner: Weak<Inner>,
    /// A statement timed out: the connection may be hung (a partition sends
    /// no FIN), so it is not returned to the pool.
    broken: std::sync::atomic::AtomicBool,
    /// Released after the connection went back to the pool.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Pooled {
    async fn timed<T>(
        &self,
        f: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, StoreError> {
        let r = timed(f).await;
        if matches!(r, Err(StoreError::DbTimeout)) {
            self.broken
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
}

impl std::ops::Deref for Pooled {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client.as_ref().expect("present until dropped")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if self.broken.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if let (Some(c), Some(inner)) = (self.client.take(), self.inner.upgrade()) {
            let mut idle = inner.idle.lock();
            if !c.is_closed() && idle.len() < MAX_IDLE {
                idle.push(c);
            }
        }
    }
}

async fn timed<T>(
    f: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(StoreError::Db { source }),
        Err(_) => Err(StoreError::DbTimeout),
    }
}

/// The one LISTEN connection of this process; reconnects with backoff and
/// wakes every watcher after a reconnect (notifications may have been lost;
/// the slots' periodic re-read covers the gap meanwhile).
async fn listen_loop(weak: Weak<Inner>, stop: CancellationToken) {
    let mut delay = Duration::from_millis(250);
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let (config, tls) = (inner.config.clone(), inner.tls.clone());
        drop(inner);
        let result = match tls {
            Some(tls) => match config.connect(tls).await {
                Ok((client, conn)) => listen_on(client, conn, &weak, &stop, &mut delay).await,
                Err(e) => Err(e),
            },
            None => match config.connect(NoTls).await {
                Ok((client, conn)) => listen_on(client, conn, &weak, &stop, &mut delay).await,
                Err(e) => Err(e),
            },
        };
        if stop.is_cancelled() {
            return;
        }
        if let Err(e) = result {
            tracing::warn!(event = "store_listen_failed", error = %crate::error_chain(&e), "Store notifications unavailable; retrying");
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn listen_on<S, T>(
    client: Client,
    mut conn: Connection<S, T>,
    weak: &Weak<Inner>,
    stop: &CancellationToken,
    delay: &mut Duration,
) -> Result<(), tokio_postgres::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // The connection's messages must be polled for LISTEN to deliver.
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx.send(Ok(n.payload().to_owned())).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    let _ = tx.send(Err(e));
                    return;
                }
                None => return,
            }
        }
    });
    let listened = client.batch_execute(&format!("LISTEN {CHANNEL}")).await;
    if let Err(e) = listened {
        driver.abort();
        return Err(e);
    }
    *delay = Duration::from_millis(250);
    wake(weak, None);
    let result = loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(Ok(name)) => wake(weak, Some(&name)),
                Some(Err(e)) => break Err(e),
                None => break Ok(()),
            },
            _ = stop.cancelled() => break Ok(()),
        }
    };
    driver.abort();
    drop(client);
    result
}

fn wake(weak: &Weak<Inner>, name: Option<&str>) {
    let Some(inner) = weak.upgrade() else { return };
    let watchers = inner.watchers.lock();
    match name {
        Some(n) => {
            if let Some(tx) = watchers.get(n) {
                tx.send_modify(|v| *v += 1);
            }
        }
        None => {
            for tx in watchers.values() {
                tx.send_modify(|v| *v += 1);
            }
        }
    }
}

/// Trusts only `root_cert` when given (libpq's `sslrootcert`), else the
/// public web roots.
fn rustls_connector(
    root_cert: Option<&Path>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    let tls = match root_cert {
        Some(ca) => crate::tls::client_config_trusting_only(ca),
        None => crate::tls::client_config(None, None, &[]),
    }
    .map_err(|e| StoreError::Url {
        message: format!("sslrootcert: {}", crate::error_chain(&e)),
    })?;
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
}

/// libpq's `prefer`: TLS without checking the certificate (libpq checks
/// nothing below `verify-ca` either). It keeps a passive listener out, not
/// an active one: `tls_warning` says so for databases off loopback.
fn prefer_connector() -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    let provider = crate::tls::provider();
    let verifier = Arc::new(Unverified(provider.clone()));
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Url {
            message: format!("TLS settings: {e}"),
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
}

/// Accepts any certificate but still checks the handshake signatures (so
/// the session keys belong to whoever holds the certificate's key).
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What `check` (and the start-up log) says when `url` reaches a database
/// off loopback without verified TLS: `sslmode=disable`, or `prefer` (the
/// default), which is TLS only if the server offers it and never verified.
/// Names the host and the mode, never the URL (it may hold a password).
pub fn tls_warning(url: &str) -> Option<String> {
    let split = UrlTls::split(url).ok()?;
    let config: tokio_postgres::Config = split.rest.parse().ok()?;
    let what = match config.get_ssl_mode() {
        SslMode::Disable => "sslmode=disable: plaintext",
        SslMode::Prefer => {
            "sslmode=prefer, the default: TLS only if the server offers it, and its certificate is not checked"
        }
        _ => return None,
    };
    // Unix sockets and loopback never leave the machine.
    let remote: Vec<&str> = config
        .get_hosts()
        .iter()
        .filter_map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => Some(h.as_str()),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(_) => None,
        })
        .filter(|h| !crate::config::is_loopback_host(h))
        .collect();
    if remote.is_empty() {
        return None;
    }
    Some(format!(
        "store.url: the database at {} is reached without verified TLS ({what}); anyone on the path can read or alter the sealed tokens and the login. Add sslmode=verify-full&sslrootcert=/path/to/db-ca.pem",
        remote.join(", ")
    ))
}

/// The URL's TLS wishes, with what tokio-postgres cannot parse taken out.
#[derive(Debug, PartialEq)]
struct UrlTls {
    /// The URL for tokio-postgres: no `sslrootcert`, and `verify-ca` /
    /// `verify-full` spelled `require` (which here verifies as much).
    rest: String,
    root_cert: Option<PathBuf>,
}

impl UrlTls {
    fn split(url: &str) -> Result<UrlTls, StoreError> {
        let Some((base, query)) = url.split_once('?') else {
            return Ok(UrlTls {
                rest: url.to_owned(),
                root_cert: None,
            });
        };
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let mut kept = Vec::new();
        let (mut root_cert, mut mode) = (None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match decode(k).as_str() {
                // libpq's name for the system roots: what we trust anyway.
                "sslrootcert" if decode(v) == "system" => {}
                "sslrootcert" => root_cert = Some(PathBuf::from(decode(v))),
                "sslmode" => {
                    let m = decode(v);
                    let spelled = if m == "verify-full" || m == "verify-ca" {
                        "require"
                    } else {
                        m.as_str()
                    };
                    kept.push(format!("sslmode={spelled}"));
                    mode = Some(m);
                }
                _ => kept.push(pair.to_owned()),
            }
        }
        let verifies = matches!(
            mode.as_deref(),
            Some("require" | "verify-ca" | "verify-full")
        );
        if root_cert.is_some() && !verifies {
            return Err(StoreError::Url {
                message: "sslrootcert needs sslmode=verify-full (or require, verify-ca); without it the connection may be plaintext".into(),
            });
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok(UrlTls { rest, root_cert })
    }
}

/// tokio-postgres's parse errors do not echo the URL, but be sure.
fn strip_secrets(s: &str) -> String {
    if s.contains("://") {
        "invalid connection string".into()
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslrootcert_and_verify_modes_are_taken_out_of_the_url() {
        let u = UrlTls::split(
            "postgres://tp:pw@db:5432/tp?sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20x.pem&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(
            u.rest,
            "postgres://tp:pw@db:5432/tp?sslmode=require&connect_timeout=3"
        );
        assert_eq!(u.root_cert, Some(PathBuf::from("/etc/ca x.pem")));
        let u = UrlTls::split("postgres://db/tp?sslmode=verify-ca").unwrap();
        assert_eq!(
            (u.rest.as_str(), u.root_cert),
            ("postgres://db/tp?sslmode=require", None)
        );
        let u = UrlTls::split("postgres://db/tp?sslrootcert=system&sslmode=require").unwrap();
        assert_eq!(
            (u.rest.as_str(), u.root_cert),
            ("postgres://db/tp?sslmode=require", None)
        );
        let plain = "postgres://db/tp";
        assert_eq!(UrlTls::split(plain).unwrap().rest, plain);
    }

    #[test]
    fn sslrootcert_without_a_verifying_mode_is_refused_without_echoing_the_url() {
        for url in [
            "postgres://tp:hunter2@db/tp?sslrootcert=/ca.pem",
            "postgres://tp:hunter2@db/tp?sslmode=prefer&sslrootcert=/ca.pem",
        ] {
            let err = UrlTls::split(url).unwrap_err().to_string();
            assert!(err.contains("sslmode=verify-full"), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }

    #[tokio::test]
    async fn an_unreadable_sslrootcert_names_the_file_not_the_password() {
        let url = Secret::new(
            "postgres://tp:hunter2@127.0.0.1:1/tp?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        );
        let err = crate::error_chain(&PgStore::open(&url, None).await.unwrap_err());
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}
