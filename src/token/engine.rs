//! The per-credential engine: the published snapshot (read lock-free by the
//! hot path), the single flight, the refresh procedure with its write-ahead
//! intent and lost-rotation rules, and the background refresher.
//!
//! One [`Slot`] per token: a `refresh_token` credential has one; a
//! `client_credentials` credential has one per (scopes, resource) asked for
//! by its routes. Talks to the IdP only through `grant`, to disk only
//! through `store`.

use super::grant::{self, Delivery, FailureClass, Grant, GrantClient, GrantError, TokenSet};
use super::schedule;
use super::store::{self, Intent, Record, Store, StoreError, StoreLock};
use super::CredentialUnavailable;
use crate::config::{CredentialConfig, GrantType};
use crate::secret::Secret;
use arc_swap::ArcSwap;
use http::Uri;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Wall clock with a test offset (a suspend moves the wall clock, not the
/// monotonic one).
#[derive(Debug, Default)]
pub struct Clock {
    offset_ms: AtomicI64,
}

impl Clock {
    pub fn wall(&self) -> SystemTime {
        let off = self.offset_ms.load(Ordering::Relaxed);
        let now = SystemTime::now();
        if off >= 0 {
            now + Duration::from_millis(off as u64)
        } else {
            now - Duration::from_millis(off.unsigned_abs())
        }
    }

    /// Moves the wall clock forward (tests: a suspend/resume).
    pub fn advance_wall(&self, by: Duration) {
        self.offset_ms
            .fetch_add(by.as_millis() as i64, Ordering::Relaxed);
    }

    /// Moves the wall clock back (tests: NTP stepping the clock).
    pub fn rewind_wall(&self, by: Duration) {
        self.offset_ms
            .fetch_sub(by.as_millis() as i64, Ordering::Relaxed);
    }
}

/// The state names of DESIGN.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Fresh,
    Refreshing,
    Expired,
    Dead,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Fresh => "fresh",
            State::Refreshing => "refreshing",
            State::Expired => "expired",
            State::Dead => "dead",
        }
    }
}

/// An access token as published to the hot path.
#[derive(Debug)]
pub struct Token {
    pub access: Secret,
    /// A hash of the access token: identifies it without revealing it.
    pub tag: u64,
    pub expires_wall: SystemTime,
    expires_mono: Instant,
    usable_until_wall: SystemTime,
    usable_until_mono: Instant,
    pub lifetime: Duration,
    pub family: String,
    pub generation: u64,
}

impl Token {
    fn new(
        access: Secret,
        sent_wall: SystemTime,
        sent_mono: Instant,
        lifetime: Duration,
        family: String,
        generation: u64,
    ) -> Token {
        let margin = schedule::safety_margin(lifetime);
        let tag = token_tag(&access);
        Token {
            access,
            tag,
            expires_wall: sent_wall + lifetime,
            expires_mono: sent_mono + lifetime,
            usable_until_wall: sent_wall + lifetime - margin,
            usable_until_mono: sent_mono + lifetime - margin,
            lifetime,
            family,
            generation,
        }
    }

    /// Usable only while both deadlines are ahead.
    pub fn usable(&self, wall: SystemTime, mono: Instant) -> bool {
        mono < self.usable_until_mono && wall < self.usable_until_wall
    }

    /// Time left, by the more pessimistic clock.
    pub fn remaining(&self, wall: SystemTime, mono: Instant) -> Duration {
        let by_wall = self.expires_wall.duration_since(wall).unwrap_or_default();
        let by_mono = self.expires_mono.saturating_duration_since(mono);
        by_wall.min(by_mono)
    }
}

pub fn token_tag(access: &Secret) -> u64 {
    let d = Sha256::digest(access.expose().as_bytes());
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// Counts refreshes in flight across every slot, so shutdown can wait for
/// a grant to finish and be written (a rotation cut off by exit is lost).
#[derive(Debug, Default)]
pub struct Drain {
    inflight: std::sync::atomic::AtomicUsize,
    idle: Notify,
}

impl Drain {
    fn enter(self: &Arc<Self>) -> DrainGuard {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        DrainGuard(self.clone())
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }

    /// Waits until no refresh is in flight, at most `within`. Returns
    /// whether everything finished.
    pub async fn wait(&self, within: Duration) -> bool {
        let until = Instant::now() + within;
        loop {
            let idle = self.idle.notified();
            if self.in_flight() == 0 {
                return true;
            }
            if tokio::time::timeout_at(until, idle).await.is_err() {
                return self.in_flight() == 0;
            }
        }
    }
}

struct DrainGuard(Arc<Drain>);

impl Drop for DrainGuard {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// What readers see; replaced whole on every change.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub token: Option<Arc<Token>>,
    /// Set while the credential is Dead.
    pub dead: Option<Arc<Failure>>,
}

/// A failed refresh, as waiters and logs see it. Holds no secret.
#[derive(Debug, Clone)]
pub struct Failure {
    pub outcome: &'static str,
    pub reason: String,
    pub hint: String,
    pub retry_after: Option<Duration>,
    pub status: Option<u16>,
    pub error: Option<String>,
    pub error_description: Option<String>,
    pub at: SystemTime,
}

impl Failure {
    pub fn unavailable(&self, credential: &str) -> CredentialUnavailable {
        CredentialUnavailable {
            credential: credential.to_owned(),
            reason: self.reason.clone(),
            hint: self.hint.clone(),
            retry_after: self.retry_after,
        }
    }
}

type Outcome = Option<Result<(), Arc<Failure>>>;

/// A 401 without `error="invalid_token"` triggers a refresh only for a token
/// at least this old (a fresh token rejected is more likely a wrong scope).
const REACTIVE_MIN_AGE: Duration = Duration::from_secs(30);
const REACTIVE_MIN_INTERVAL: Duration = Duration::from_secs(10);
/// Added to the longest grant when fencing the fleet lease around it.
const FENCE_MARGIN: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Control {
    /// The one refresh in flight; everyone who needs a token waits on it.
    inflight: Option<watch::Receiver<Outcome>>,
    /// Backoff: no new attempt before this.
    next_attempt: Option<Instant>,
    consecutive_failures: u32,
    last_failure: Option<Arc<Failure>>,
    last_success: Option<SystemTime>,
    /// The record the in-memory token came from (refresh_token slots).
    record: Option<Record>,
    /// A successful rotation not yet durable: no refresh until it is.
    unsaved: Option<Record>,
    state_since: Option<SystemTime>,
    last_state: Option<State>,
    /// Reactive refreshes are limited to one per credential per 10 s.
    last_reactive: Option<Instant>,
    /// The last store read failed: logged once per outage, not per poll.
    store_down: bool,
    /// An intent whose grant is known not to have been spent (not sent, or
    /// refused) although clearing it in the store may have failed.
    unspent_intent: Option<Intent>,
    /// When this process first presented (family, generation), on the
    /// monotonic clock: a wall clock that jumps back cannot make an old
    /// intent look young.
    presented: Option<(String, u64, Instant)>,
}

pub enum SlotKind {
    Refresh {
        store: Store,
        /// `Store::config_key` of the config it was opened from.
        store_key: String,
    },
    ClientCredentials {
        scopes: Vec<String>,
        resource: Option<String>,
    },
}

/// One token's engine.
pub struct Slot {
    pub name: String,
    pub cfg: Arc<CredentialConfig>,
    token_url: Uri,
    kind: SlotKind,
    client: GrantClient,
    snapshot: ArcSwap<Snapshot>,
    control: Mutex<Control>,
    /// Wakes the background refresher when the snapshot changes.
    changed: Notify,
    clock: Arc<Clock>,
    shutdown: CancellationToken,
    drain: Arc<Drain>,
    /// The engine's runtime: refreshes run there, not on the proxy worker
    /// thread whose request asked for one.
    runtime: Option<tokio::runtime::Handle>,
}

impl Slot {
    pub fn new(
        cfg: Arc<CredentialConfig>,
        token_url: Uri,
        kind: SlotKind,
        client: GrantClient,
        clock: Arc<Clock>,
        shutdown: CancellationToken,
        drain: Arc<Drain>,
    ) -> Arc<Slot> {
        Arc::new(Slot {
            name: cfg.name.clone(),
            cfg,
            token_url,
            kind,
            client,
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            control: Mutex::new(Control::default()),
            changed: Notify::new(),
            clock,
            shutdown,
            drain,
            runtime: tokio::runtime::Handle::try_current().ok(),
        })
    }

    /// Stops this slot's background refresher; a refresh in flight finishes
    /// (it holds the credential's lock, so a successor waits for it).
    pub fn retire(&self) {
        self.shutdown.cancel();
    }

    pub fn store_path(&self) -> Option<&std::path::Path> {
        match &self.kind {
            SlotKind::Refresh { store, .. } => store.path(),
            SlotKind::ClientCredentials { .. } => None,
        }
    }

    pub fn store_key(&self) -> Option<&str> {
        match &self.kind {
            SlotKind::Refresh { store_key, .. } => Some(store_key),
            SlotKind::ClientCredentials { .. } => None,
        }
    }

    pub fn store(&self) -> Option<&Store> {
        match &self.kind {
            SlotKind::Refresh { store, .. } => Some(store),
            SlotKind::ClientCredentials { .. } => None,
        }
    }

    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    fn publish(&self, snap: Snapshot) {
        self.snapshot.store(Arc::new(snap));
        self.changed.notify_one();
        self.note_state();
    }

    /// The state as DESIGN.md names it.
    pub fn state(&self) -> State {
        let snap = self.snapshot.load();
        if snap.dead.is_some() {
            return State::Dead;
        }
        if self.control.lock().inflight.is_some() {
            return State::Refreshing;
        }
        match &snap.token {
            Some(t) if t.usable(self.clock.wall(), Instant::now()) => State::Fresh,
            _ => State::Expired,
        }
    }

    fn note_state(&self) {
        let state = self.state();
        let mut c = self.control.lock();
        if c.last_state != Some(state) {
            c.last_state = Some(state);
            c.state_since = Some(self.clock.wall());
        }
    }

    /// DESIGN.md "Reactive refresh": the upstream rejected the token tagged
    /// `tag`. Returns true when a newer token is (or will shortly be)
    /// available, so a replay is worth trying.
    pub fn rejected(
        self: &Arc<Self>,
        tag: u64,
        says_invalid_token: bool,
        request_id: Option<&str>,
    ) -> bool {
        let snap = self.snapshot.load_full();
        let Some(current) = snap.token.clone() else {
            return true;
        };
        if current.tag != tag {
            // Already replaced: the burst's later 401s cost nothing.
            return true;
        }
        let age = current.lifetime.saturating_sub(
            current
                .expires_mono
                .saturating_duration_since(Instant::now()),
        );
        if !says_invalid_token && age < REACTIVE_MIN_AGE {
            return false;
        }
        {
            let mut c = self.control.lock();
            let now = Instant::now();
            if c.last_reactive
                .is_some_and(|t| now.duration_since(t) < REACTIVE_MIN_INTERVAL)
            {
                return false;
            }
            c.last_reactive = Some(now);
        }
        tracing::info!(
            event = "token_rejected",
            credential = %self.name,
            family = %current.family,
            generation = current.generation,
            invalid_token = says_invalid_token,
            "Upstream rejected the token; refreshing"
        );
        // Drop the rejected token so no request carries it again; the
        // refresh goes through the single flight like any other.
        self.publish(Snapshot {
            token: None,
            dead: snap.dead.clone(),
        });
        if self.begin_refresh_for(request_id).is_err() {
            return false;
        }
        true
    }

    /// A usable token right now, if there is one.
    pub fn usable_token(&self) -> Option<Arc<Token>> {
        let snap = self.snapshot.load();
        let t = snap.token.as_ref()?;
        t.usable(self.clock.wall(), Instant::now())
            .then(|| t.clone())
    }

    /// Waits (up to `refresh_wait`) for a usable token.
    /// `request_id`: the request that needs the token (logged with the
    /// refresh it starts).
    pub async fn wait_usable(
        self: &Arc<Self>,
        request_id: Option<&str>,
    ) -> Result<Arc<Token>, CredentialUnavailable> {
        if let Some(t) = self.usable_token() {
            return Ok(t);
        }
        let mut rx = match self.begin_refresh_for(request_id) {
            Ok(rx) => rx,
            Err(f) => return Err(f.unavailable(&self.name)),
        };
        let waited =
            tokio::time::timeout(self.cfg.refresh_wait, rx.wait_for(Option::is_some)).await;
        if let Some(t) = self.usable_token() {
            return Ok(t);
        }
        match waited {
            Ok(Ok(outcome)) => match outcome.as_ref() {
                Some(Err(f)) => {
                    let mut u = f.unavailable(&self.name);
                    // The backoff decides when a retry can help; tell the client.
                    if u.retry_after.is_none() && f.outcome == "transient" {
                        let next = self.control.lock().next_attempt;
                        u.retry_after = Some(
                            next.map_or(Duration::from_secs(1), |t| {
                                t.saturating_duration_since(Instant::now())
                            })
                            .max(Duration::from_secs(1)),
                        );
                    }
                    Err(u)
                }
                _ => Err(self.generic_unavailable("no_token", None)),
            },
            Ok(Err(_)) => Err(self.generic_unavailable("shutting_down", None)),
            Err(_) => {
                Err(self.generic_unavailable("refresh_timeout", Some(Duration::from_secs(1))))
            }
        }
    }

    fn generic_unavailable(
        &self,
        reason: &str,
        retry_after: Option<Duration>,
    ) -> CredentialUnavailable {
        let hint = match reason {
            "refresh_timeout" => format!(
                "The token endpoint did not answer within refresh_wait ({}); check that the IdP is reachable, the refresh continues in the background.",
                humantime::format_duration(self.cfg.refresh_wait)
            ),
            "shutting_down" => "tokenproxy is shutting down; retry against another instance.".to_owned(),
            _ => "No usable token yet; see the token_refresh log events for this credential.".to_owned(),
        };
        CredentialUnavailable {
            credential: self.name.clone(),
            reason: reason.to_owned(),
            hint,
            retry_after,
        }
    }

    /// Joins the refresh in flight, or starts one. Refuses (with the reason)
    /// while dead, backing off, unsaved, or shutting down.
    pub fn begin_refresh(self: &Arc<Self>) -> Result<watch::Receiver<Outcome>, Arc<Failure>> {
        self.begin_refresh_for(None)
    }

    /// As [`Slot::begin_refresh`]; a refresh it starts is logged with the
    /// `request_id` that caused it (joining one in flight changes nothing).
    pub fn begin_refresh_for(
        self: &Arc<Self>,
        request_id: Option<&str>,
    ) -> Result<watch::Receiver<Outcome>, Arc<Failure>> {
        let mut c = self.control.lock();
        if let Some(rx) = &c.inflight {
            return Ok(rx.clone());
        }
        if self.shutdown.is_cancelled() {
            return Err(Arc::new(self.failure_simple(
                "shutting_down",
                "tokenproxy is shutting down; no refresh starts now.",
            )));
        }
        let now = Instant::now();
        if let Some(dead) = &self.snapshot.load().dead {
            let retry_allowed =
                dead.outcome == "config_error" && c.next_attempt.is_none_or(|t| now >= t);
            if !retry_allowed {
                return Err(dead.clone());
            }
        } else if let Some(t) = c.next_attempt {
            if now < t {
                let mut f = c.last_failure.as_deref().cloned().unwrap_or_else(|| {
                    self.failure_simple("backoff", "Retrying the token endpoint with backoff.")
                });
                f.retry_after = Some((t - now).max(Duration::from_secs(1)));
                return Err(Arc::new(f));
            }
        }
        if c.unsaved.is_some() {
            return Err(Arc::new(self.failure_simple(
                "store_write_failed",
                "The last rotated refresh token is not yet saved to the store; no further refresh until it is (check disk space and permissions of store.path).",
            )));
        }
        let (tx, rx) = watch::channel(None);
        c.inflight = Some(rx.clone());
        drop(c);
        let slot = self.clone();
        let cause = request_id.map(str::to_owned);
        let draining = self.drain.enter();
        let refresh = async move {
            let _draining = draining;
            // Its own task: a client hanging up cannot cancel a rotation.
            let guard = InflightGuard(slot.clone());
            let result = slot.refresh_once(cause).await.map_err(Arc::new);
            slot.finish(&result);
            drop(guard);
            let _ = tx.send(Some(result));
        };
        match &self.runtime {
            Some(rt) => drop(rt.spawn(refresh)),
            None => drop(tokio::spawn(refresh)),
        }
        self.note_state();
        Ok(rx)
    }

    fn failure_simple(&self, reason: &str, hint: &str) -> Failure {
        Failure {
            outcome: "transient",
            reason: reason.to_owned(),
            hint: hint.to_owned(),
            retry_after: None,
            status: None,
            error: None,
            error_description: None,
            at: self.clock.wall(),
        }
    }

    fn finish(&self, result: &Result<(), Arc<Failure>>) {
        let mut c = self.control.lock();
        match result {
            Ok(()) => {
                c.consecutive_failures = 0;
                c.next_attempt = None;
                c.last_success = Some(self.clock.wall());
            }
            Err(f) => {
                c.consecutive_failures = c.consecutive_failures.saturating_add(1);
                c.last_failure = Some(f.clone());
                let wait = match f.outcome {
                    "config_error" => schedule::CONFIG_ERROR_RETRY,
                    "invalid_grant" | "lost_rotation" => schedule::CONFIG_ERROR_RETRY,
                    _ => schedule::backoff(
                        c.consecutive_failures - 1,
                        self.cfg.max_backoff,
                        f.retry_after,
                        &mut rand::thread_rng(),
                    ),
                };
                c.next_attempt = Some(Instant::now() + wait);
            }
        }
    }

    /// One attempt, start to end, with its one log event.
    async fn refresh_once(self: &Arc<Self>, cause: Option<String>) -> Result<(), Failure> {
        let started = Instant::now();
        let attempt = self.control.lock().consecutive_failures + 1;
        let mut ev = RefreshEvent::new(self, attempt);
        ev.request_id = cause;
        let result = match &self.kind {
            SlotKind::Refresh { store, .. } => self.refresh_with_store(store, &mut ev).await,
            SlotKind::ClientCredentials { scopes, resource } => {
                self.client_credentials(scopes, resource.as_deref(), &mut ev)
                    .await
            }
        };
        ev.duration_ms = started.elapsed().as_millis() as u64;
        ev.emit(&self.name, result.as_ref().err());
        crate::metrics::metrics().refresh_attempt(
            &self.name,
            result.as_ref().err().map_or(ev.outcome, |f| f.outcome),
            started.elapsed(),
        );
        if let Err(f) = &result {
            if matches!(
                f.outcome,
                "invalid_grant" | "lost_rotation" | "config_error"
            ) {
                let token = self.snapshot.load().token.clone();
                self.publish(Snapshot {
                    token,
                    dead: Some(Arc::new(f.clone())),
                });
            }
        }
        result
    }

    async fn client_credentials(
        &self,
        scopes: &[String],
        resource: Option<&str>,
        ev: &mut RefreshEvent,
    ) -> Result<(), Failure> {
        let req = grant::build_token_request(
            &self.cfg,
            &self.token_url,
            &Grant::ClientCredentials { scopes, resource },
        );
        let sent_wall = self.clock.wall();
        let sent_mono = Instant::now();
        let set = self
            .client
            .send(&req)
            .await
            .and_then(|raw| {
                ev.status = Some(raw.status.as_u16());
                self.check_skew(&raw.headers, sent_wall);
                grant::parse_token_response(&raw, sent_wall)
            })
            .map_err(|e| self.classify(&e, ev))?;
        let lifetime = self.lifetime(&set);
        ev.ok(lifetime, false);
        self.publish(Snapshot {
            token: Some(Arc::new(Token::new(
                set.access_token,
                sent_wall,
                sent_mono,
                lifetime,
                String::new(),
                0,
            ))),
            dead: None,
        });
        Ok(())
    }

    fn lifetime(&self, set: &TokenSet) -> Duration {
        set.expires_in.unwrap_or(self.cfg.default_lifetime)
    }

    fn check_skew(&self, headers: &http::HeaderMap, sent_wall: SystemTime) {
        if let Some(date) = grant::response_date(headers) {
            let skew = match date.duration_since(sent_wall) {
                Ok(d) => d,
                Err(e) => e.duration(),
            };
            if skew > Duration::from_secs(60) {
                tracing::warn!(
                    event = "clock_skew",
                    credential = %self.name,
                    skew_s = skew.as_secs(),
                    hint = "The IdP's Date differs from the local clock by over a minute; fix NTP on this host, or tokens may be rejected as expired or not yet valid.",
                    "Clock skew with the IdP"
                );
            }
        }
    }

    /// Removes this credential's secrets and anything token-shaped.
    fn scrub(&self, text: &str) -> String {
        let mut known: Vec<String> = Vec::new();
        if let Some(s) = &self.cfg.client_secret {
            known.push(s.expose().to_owned());
        }
        if let Some(s) = &self.cfg.refresh_token {
            known.push(s.expose().to_owned());
        }
        if let Some(r) = &self.control.lock().record {
            known.extend(r.refresh_token.as_ref().map(|s| s.expose().to_owned()));
            known.extend(r.access_token.as_ref().map(|s| s.expose().to_owned()));
        }
        if let Some(t) = &self.snapshot.load().token {
            known.push(t.access.expose().to_owned());
        }
        grant::scrub(text, &known)
    }

    /// Maps a grant error to a failure with its hint.
    fn classify(&self, e: &GrantError, ev: &mut RefreshEvent) -> Failure {
        crate::metrics::metrics().endpoint_failure(&self.name, e.fault_class());
        // IdP text may echo what we sent: never let a secret through.
        // Scrub before capping, so a secret cut in half is still found.
        let description = e
            .description
            .as_deref()
            .map(|d| grant::sanitize(&self.scrub(d), 200));
        let mut e = e.clone();
        e.description = description;
        e.code = e.code.as_deref().map(|c| self.scrub(c));
        let e = &e;
        ev.status = e.status;
        ev.error = e.code.clone().or_else(|| Some(self.scrub(&e.message)));
        ev.error_description = e.description.clone();
        let outcome = e.class.outcome();
        Failure {
            outcome,
            reason: e.code.clone().unwrap_or_else(|| outcome.to_owned()),
            hint: super::hints::for_grant_error(&self.cfg, e),
            retry_after: e.retry_after,
            status: e.status,
            error: ev.error.clone(),
            error_description: e.description.clone(),
            at: self.clock.wall(),
        }
    }

    /// The refresh_token procedure under the credential's lock: re-read,
    /// (intent, grant, write), publish.
    async fn refresh_with_store(
        &self,
        store: &Store,
        ev: &mut RefreshEvent,
    ) -> Result<(), Failure> {
        let lock = store
            .lock_credential(&self.name)
            .await
            .map_err(|e| self.store_failure(&e))?;
        let lock = &lock;
        let (on_disk, disk_identity) = self.read_record_raw(store).await?;
        let mine = self.control.lock().record.clone();
        if let Some(disk) = &on_disk {
            let seen_newer = mine
                .as_ref()
                .is_some_and(|m| m.family == disk.family && m.generation > disk.generation);
            if seen_newer || lock.is_rolled_back(disk) {
                ev.set_identity(disk);
                return Err(self.rolled_back_failure(disk));
            }
        }
        let mut rec = match (on_disk, mine) {
            (Some(disk), Some(mine)) if disk.identity() != mine.identity() => {
                // Someone else (another process, a login) moved on: adopt.
                ev.set_identity(&disk);
                if self.adopt(&disk) {
                    ev.outcome = "lost_race";
                    return Ok(());
                }
                disk
            }
            (Some(disk), None) => {
                if self.adopt(&disk) {
                    ev.set_identity(&disk);
                    ev.outcome = "lost_race";
                    return Ok(());
                }
                disk
            }
            (Some(disk), Some(_)) => disk,
            (None, Some(mine)) => mine,
            (None, None) => {
                let seen = match (disk_identity.is_some(), &self.cfg.refresh_token) {
                    (true, Some(seed)) => store
                        .read(&self.name)
                        .await
                        .ok()
                        .flatten()
                        .is_some_and(|r| r.has_seen_seed(seed)),
                    _ => false,
                };
                return Err(self.no_record_failure(seen));
            }
        };
        ev.set_identity(&rec);
        if let Some(dead) = &rec.dead {
            if dead.family == rec.family && dead.generation == rec.generation {
                return Err(self.dead_failure(
                    if dead.reason == "lost_rotation" {
                        "lost_rotation"
                    } else {
                        "invalid_grant"
                    },
                    &dead.reason,
                    super::hints::dead_on_disk(&dead.reason),
                ));
            }
        }
        let Some(refresh_token) = rec.refresh_token.clone() else {
            return Err(self.dead_failure(
                "invalid_grant",
                "no_refresh_token",
                "The stored token set has no refresh token: run `tokenproxy login` for this credential.".into(),
            ));
        };
        ev.refresh_token_fp = Some(refresh_token.fingerprint());

        // An intent for this very generation: an earlier attempt may have
        // spent the token without us learning the answer.
        let mut intent_at_ms = store::unix_ms(self.clock.wall());
        // Whether an earlier presentation of this token may have spent it
        // (a retry inside the grace window): then no answer to this attempt
        // short of a rotation clears the intent.
        let mut carried = false;
        if let Some(intent) = rec.intent.clone() {
            let unspent = self.control.lock().unspent_intent.as_ref() == Some(&intent);
            if intent.family == rec.family && intent.generation == rec.generation && !unspent {
                self.wait_for_grant_elsewhere(store, &intent)?;
                self.check_lost_rotation(store, lock, &mut rec, &refresh_token, None, ev)
                    .await?;
                if rec.intent.is_some() {
                    // The grace window runs from the first presentation.
                    intent_at_ms = intent.at_ms;
                    carried = true;
                }
            }
        }

        rec.intent = Some(Intent {
            family: rec.family.clone(),
            generation: rec.generation,
            at_ms: intent_at_ms,
        });
        let prev = disk_identity.as_ref().map(|(f, g)| (f.as_str(), *g));
        match self
            .write_record(store, lock, &rec, prev, Some(self.grant_fence()))
            .await
        {
            Ok(()) => {}
            Err(StoreError::Fenced { .. }) => return self.adopt_after_fence(store, ev).await,
            Err(e) => return Err(self.store_failure(&e)),
        }

        let req = grant::build_token_request(
            &self.cfg,
            &self.token_url,
            &Grant::RefreshToken(&refresh_token),
        );
        let sent_wall = self.clock.wall();
        let sent_mono = Instant::now();
        {
            let mut c = self.control.lock();
            let same = c
                .presented
                .as_ref()
                .is_some_and(|(f, g, _)| *f == rec.family && *g == rec.generation);
            if !same {
                c.presented = Some((rec.family.clone(), rec.generation, sent_mono));
            }
        }
        let answer = self.client.send(&req).await.and_then(|raw| {
            ev.status = Some(raw.status.as_u16());
            self.check_skew(&raw.headers, sent_wall);
            grant::parse_token_response(&raw, sent_wall)
        });
        match answer {
            Ok(set) => {
                let lifetime = self.lifetime(&set);
                let rotated = set.refresh_token.is_some();
                let mut next = rec.clone();
                next.generation += 1;
                // RFC 6749 §6: no refresh_token in the answer keeps the old one.
                if let Some(rt) = set.refresh_token.clone() {
                    next.refresh_token = Some(rt);
                }
                next.access_token = Some(set.access_token.clone());
                next.access_issued_at_ms = Some(store::unix_ms(sent_wall));
                next.access_expires_at_ms = Some(store::unix_ms(sent_wall + lifetime));
                next.refresh_expires_at_ms = set
                    .refresh_token_expires_in
                    .map(|d| store::unix_ms(sent_wall + d))
                    .or(if rotated {
                        None
                    } else {
                        rec.refresh_expires_at_ms
                    });
                next.intent = None;
                next.dead = None;
                ev.set_identity(&next);
                ev.refresh_token_fp = next.refresh_token.as_ref().map(Secret::fingerprint);
                ev.ok(lifetime, rotated);
                self.warn_refresh_expiry(&next);
                // Durable before published (write-ahead): a crash after this
                // line loses nothing.
                let written = self
                    .write_record(store, lock, &next, Some(rec.identity()), None)
                    .await;
                if let Err(StoreError::Fenced { .. }) = written {
                    let moved_on = matches!(
                        store.read(&self.name).await,
                        Ok(Some(disk)) if disk.identity() != rec.identity()
                    );
                    if moved_on {
                        // Another writer moved the store on meanwhile: the
                        // store is the truth, our rotation is orphaned.
                        tracing::warn!(event = "rotation_superseded", credential = %self.name, family = %rec.family, generation = rec.generation, "Store moved on during this refresh; adopting it");
                        return self.adopt_after_fence(store, ev).await;
                    }
                    // Only the lease was lost: the store still holds n, so
                    // our n+1 is the live token. Saved under a new lease.
                }
                if let Err(e) = written {
                    tracing::error!(
                        event = "store_write_failed",
                        credential = %self.name,
                        error = %grant::error_chain(&e),
                        hint = "The rotated refresh token could not be saved; the new access token is served from memory and no further refresh starts until the write succeeds.",
                        "Store write failed"
                    );
                    crate::metrics::metrics().store_write_failed();
                    self.control.lock().unsaved = Some(next.clone());
                }
                let token = Token::new(
                    set.access_token,
                    sent_wall,
                    sent_mono,
                    lifetime,
                    next.family.clone(),
                    next.generation,
                );
                self.control.lock().record = Some(next);
                self.publish(Snapshot {
                    token: Some(Arc::new(token)),
                    dead: None,
                });
                Ok(())
            }
            Err(e) => {
                let failure = self.classify(&e, ev);
                match (e.delivery, e.class) {
                    (Delivery::MaybeSent, _) => {
                        // Keep the intent: the next attempt must first learn
                        // whether the token was spent.
                        self.check_lost_rotation(
                            store,
                            lock,
                            &mut rec,
                            &refresh_token,
                            e.status,
                            ev,
                        )
                        .await?;
                        Err(failure)
                    }
                    (_, FailureClass::InvalidGrant) => {
                        // Race-aware: did someone else rotate meanwhile?
                        if let Ok(Some(disk)) = store.read(&self.name).await {
                            if disk.identity() != rec.identity() {
                                ev.set_identity(&disk);
                                self.adopt(&disk);
                                self.control.lock().record = Some(disk);
                                ev.outcome = "lost_race";
                                return Ok(());
                            }
                        }
                        rec.intent = None;
                        rec.dead = Some(store::DeadMark {
                            family: rec.family.clone(),
                            generation: rec.generation,
                            reason: failure.reason.clone(),
                        });
                        let id = (rec.family.clone(), rec.generation);
                        let _ = self
                            .write_record(store, lock, &rec, Some((&id.0, id.1)), None)
                            .await;
                        self.control.lock().record = Some(rec);
                        Err(failure)
                    }
                    _ if carried => {
                        // This attempt spent nothing, but the first
                        // presentation may have: the intent stays.
                        self.control.lock().record = Some(rec);
                        Err(failure)
                    }
                    _ => {
                        // Not sent, or refused: nothing was spent. Remember
                        // it in case clearing the durable intent fails.
                        self.control.lock().unspent_intent = rec.intent.take();
                        let id = (rec.family.clone(), rec.generation);
                        let _ = self
                            .write_record(store, lock, &rec, Some((&id.0, id.1)), None)
                            .await;
                        self.control.lock().record = Some(rec);
                        Err(failure)
                    }
                }
            }
        }
    }

    /// DESIGN.md "Lost rotation": present the token again only if the IdP
    /// says it is still active, or within the declared grace window.
    async fn check_lost_rotation(
        &self,
        store: &Store,
        lock: &StoreLock,
        rec: &mut Record,
        refresh_token: &Secret,
        gateway_status: Option<u16>,
        ev: &mut RefreshEvent,
    ) -> Result<(), Failure> {
        // The intent of the presentation in question (written before it).
        let intent = rec.intent.clone();
        if let Some(url) = &self.cfg.introspection_url {
            let req = grant::build_introspection_request(&self.cfg, url, refresh_token);
            match self
                .client
                .send(&req)
                .await
                .and_then(|r| grant::parse_introspection(&r))
            {
                Ok(true) => {
                    rec.intent = None;
                    return Ok(());
                }
                Ok(false) => {}
                Err(e) => {
                    // Unknown: never guess. Keep the intent and try later.
                    let mut f = self.classify(&e, ev);
                    f.reason = "lost_rotation_unverified".into();
                    f.hint = "A refresh may have been spent without its answer arriving, and the introspection endpoint could not confirm the token is still active; retrying the check with backoff.".into();
                    return Err(f);
                }
            }
        } else if !self.cfg.reuse_grace.is_zero()
            && intent
                .as_ref()
                .is_some_and(|i| self.intent_age(i) < self.cfg.reuse_grace)
        {
            return Ok(());
        }
        rec.intent = None;
        rec.dead = Some(store::DeadMark {
            family: rec.family.clone(),
            generation: rec.generation,
            reason: "lost_rotation".into(),
        });
        let id = (rec.family.clone(), rec.generation);
        let _ = self
            .write_record(store, lock, rec, Some((&id.0, id.1)), None)
            .await;
        self.control.lock().record = Some(rec.clone());
        ev.status = None;
        Err(self.dead_failure(
            "lost_rotation",
            "lost_rotation",
            super::hints::lost_rotation(&self.cfg, gateway_status),
        ))
    }

    /// Fleet: an intent another replica wrote less than a grant's length
    /// ago may still be in flight (its lease ended early: released, or a
    /// clock apart). Asking introspection now could hear "active" before
    /// the IdP has seen that request, so wait until it cannot be.
    fn wait_for_grant_elsewhere(&self, store: &Store, intent: &Intent) -> Result<(), Failure> {
        let mine = self
            .control
            .lock()
            .presented
            .as_ref()
            .is_some_and(|(f, g, _)| *f == intent.family && *g == intent.generation);
        if !store.is_postgres() || mine {
            return Ok(());
        }
        let fence = self.grant_fence();
        let at = store::from_unix_ms(intent.at_ms);
        let age = match self.clock.wall().duration_since(at) {
            Ok(age) => age,
            // From the future: young, unless too far ahead to be skew.
            Err(e) if e.duration() <= fence => Duration::ZERO,
            Err(_) => Duration::MAX,
        };
        if age >= fence {
            return Ok(());
        }
        let mut f = self.failure_simple(
            "refresh_in_flight_elsewhere",
            "Another replica presented this refresh token moments ago and its answer may still arrive; waiting before checking whether it was spent.",
        );
        f.retry_after = Some(fence - age);
        Err(f)
    }

    /// How long ago `intent` was first presented, by the more pessimistic
    /// of the monotonic clock (when this process presented it) and the
    /// wall clock. A wall clock behind the intent cannot be trusted: old.
    fn intent_age(&self, intent: &Intent) -> Duration {
        let by_wall = self
            .clock
            .wall()
            .duration_since(store::from_unix_ms(intent.at_ms))
            .ok();
        let by_mono = self
            .control
            .lock()
            .presented
            .as_ref()
            .filter(|(f, g, _)| *f == intent.family && *g == intent.generation)
            .map(|(_, _, at)| at.elapsed());
        match (by_wall, by_mono) {
            (Some(w), Some(m)) => w.max(m),
            (None, Some(m)) => m,
            (Some(w), None) => w,
            (None, None) => Duration::MAX,
        }
    }

    /// The store holds an older generation of a family than one already
    /// written: restored from a backup, or edited. Its token is spent.
    fn rolled_back_failure(&self, disk: &Record) -> Failure {
        tracing::error!(event = "store_rolled_back", credential = %self.name, family = %disk.family, generation = disk.generation, "The store holds an older generation than one already written");
        self.dead_failure(
            "invalid_grant",
            "store_rolled_back",
            format!("The store holds generation {} of this token family, but a newer generation was already written: the store was restored from an older backup or edited, and its refresh token is spent, so it is not presented (that would be a reuse); run `tokenproxy login` to start a new family.", disk.generation),
        )
    }

    /// No token set for this endpoint and client. `seed_spent`: the
    /// configured seed was consumed before (for another spelling or another
    /// endpoint), so it is not presented again.
    fn no_record_failure(&self, seed_spent: bool) -> Failure {
        if seed_spent {
            self.dead_failure(
                "invalid_grant",
                "seed_already_used",
                format!("The configured refresh_token was already consumed by this store for another token endpoint or client_id, and a consumed seed is never presented again; the store's family does not belong to {} and client {}. If the IdP did not change, restore the previous token_url/client_id; otherwise run `tokenproxy login` or set a new refresh_token.", self.token_url, self.cfg.client_id),
            )
        } else {
            self.dead_failure(
                "invalid_grant",
                "no_refresh_token",
                "There is no refresh token for this credential: run `tokenproxy login` or set refresh_token in the config.".into(),
            )
        }
    }

    /// How long a grant may be in flight once its intent is written: the
    /// fleet lease is extended to cover it (docs/architecture.md, "Fleet").
    fn grant_fence(&self) -> Duration {
        self.cfg.connect_timeout + super::GRANT_TIMEOUT + FENCE_MARGIN
    }

    fn dead_failure(&self, outcome: &'static str, reason: &str, hint: String) -> Failure {
        Failure {
            outcome,
            reason: reason.to_owned(),
            hint,
            retry_after: None,
            status: None,
            error: Some(reason.to_owned()),
            error_description: None,
            at: self.clock.wall(),
        }
    }

    /// Also notes the outage (logged once, until a read succeeds again).
    /// Never called with the control lock held.
    fn store_failure(&self, e: &StoreError) -> Failure {
        let first = !std::mem::replace(&mut self.control.lock().store_down, true);
        if first {
            tracing::warn!(event = "store_unavailable", credential = %self.name, error = %grant::error_chain(e), "Token store unavailable; serving the cached token, no refresh until it is back");
        }
        Failure {
            outcome: "transient",
            reason: "store_unavailable".into(),
            hint: match &self.kind {
                SlotKind::Refresh { store, .. } if store.is_postgres() => format!("The postgres store could not be used ({}); cached tokens keep serving until they expire, and no refresh happens without the fleet lease. Check store.url and the database.", grant::error_chain(e)),
                _ => format!("The token store could not be used ({}); check store.path, its permissions and free space.", grant::error_chain(e)),
            },
            retry_after: None,
            status: None,
            error: Some("store_unavailable".into()),
            error_description: None,
            at: self.clock.wall(),
        }
    }

    async fn read_record(&self, store: &Store) -> Result<Option<Record>, Failure> {
        Ok(self.read_record_raw(store).await?.0)
    }

    /// The record if it belongs to this credential, and the identity of
    /// whatever the store holds (what a fenced write must find).
    async fn read_record_raw(
        &self,
        store: &Store,
    ) -> Result<(Option<Record>, Option<(String, u64)>), Failure> {
        let rec = store
            .read(&self.name)
            .await
            .map_err(|e| self.store_failure(&e))?;
        let identity = rec.as_ref().map(|r| (r.family.clone(), r.generation));
        let url = self.token_url.to_string();
        Ok((
            rec.filter(|r| r.matches(&url, &self.cfg.client_id)),
            identity,
        ))
    }

    async fn write_record(
        &self,
        store: &Store,
        lock: &StoreLock,
        rec: &Record,
        prev: Option<(&str, u64)>,
        hold_for: Option<Duration>,
    ) -> Result<(), StoreError> {
        let r = store
            .write_held(lock, &self.name, rec, prev, hold_for)
            .await;
        if r.is_ok() {
            lock.note_written(rec);
            self.control.lock().unsaved = None;
        }
        r
    }

    /// A fenced write was refused: someone else moved the record on. Like a
    /// lost race: re-read and adopt, never present our token again.
    async fn adopt_after_fence(&self, store: &Store, ev: &mut RefreshEvent) -> Result<(), Failure> {
        match self.read_record(store).await? {
            Some(disk) => {
                ev.set_identity(&disk);
                self.adopt(&disk);
                ev.outcome = "lost_race";
                Ok(())
            }
            None => Err(self.failure_simple(
                "store_changed",
                "The stored record changed during the refresh; retrying.",
            )),
        }
    }

    /// Publishes the record's access token when it is still usable. Returns
    /// whether it was (the caller then needs no grant).
    fn adopt(&self, rec: &Record) -> bool {
        let dead = rec
            .dead
            .as_ref()
            .filter(|d| d.family == rec.family && d.generation == rec.generation);
        self.control.lock().record = Some(rec.clone());
        let token = self.token_from_record(rec);
        let usable = token
            .as_ref()
            .is_some_and(|t| t.usable(self.clock.wall(), Instant::now()));
        self.publish(Snapshot {
            token: token.map(Arc::new),
            dead: dead.map(|d| {
                Arc::new(self.dead_failure(
                    if d.reason == "lost_rotation" {
                        "lost_rotation"
                    } else {
                        "invalid_grant"
                    },
                    &d.reason,
                    super::hints::dead_on_disk(&d.reason),
                ))
            }),
        });
        usable && dead.is_none()
    }

    fn token_from_record(&self, rec: &Record) -> Option<Token> {
        let access = rec.access_token.clone()?;
        let issued = store::from_unix_ms(rec.access_issued_at_ms?);
        let expires = store::from_unix_ms(rec.access_expires_at_ms?);
        let lifetime = expires.duration_since(issued).ok()?;
        let wall = self.clock.wall();
        // Map the wall-clock issue time onto the monotonic clock.
        let age = wall.duration_since(issued).unwrap_or_default();
        let mono_now = Instant::now();
        let sent_mono = mono_now.checked_sub(age).unwrap_or(mono_now);
        if age >= lifetime {
            return None;
        }
        Some(Token::new(
            access,
            issued,
            sent_mono,
            lifetime,
            rec.family.clone(),
            rec.generation,
        ))
    }

    fn warn_refresh_expiry(&self, rec: &Record) {
        if let Some(at) = rec.refresh_expires_at_ms {
            let left = store::from_unix_ms(at)
                .duration_since(self.clock.wall())
                .unwrap_or_default();
            if left < Duration::from_secs(7 * 86_400) {
                tracing::warn!(
                    event = "refresh_token_expiring",
                    credential = %self.name,
                    expires_in_s = left.as_secs(),
                    hint = "The refresh token itself expires soon and rotation does not extend it; run `tokenproxy login` before then.",
                    "Refresh token expiring"
                );
            }
        }
    }

    /// Start-up for refresh_token slots: consume a new seed, load the stored
    /// token set. Under the credential's lock.
    pub async fn init_from_store(&self) -> Result<(), StoreError> {
        let SlotKind::Refresh { store, .. } = &self.kind else {
            return Ok(());
        };
        let lock = store.lock_credential(&self.name).await?;
        let url = self.token_url.to_string();
        let existing = store.read(&self.name).await?;
        let prev = existing.as_ref().map(|r| (r.family.clone(), r.generation));
        let prev = prev.as_ref().map(|(f, g)| (f.as_str(), *g));
        // Consumed seeds are remembered whatever the record's endpoint: a
        // respelled or moved token_url must never revive a spent seed.
        let seen_before = existing
            .as_ref()
            .zip(self.cfg.refresh_token.as_ref())
            .is_some_and(|(r, seed)| r.has_seen_seed(seed));
        let all_seeds_seen = existing
            .as_ref()
            .map(|r| r.seeds_seen.clone())
            .unwrap_or_default();
        let mut rec = existing.filter(|r| r.matches(&url, &self.cfg.client_id));
        if let Some(seed) = &self.cfg.refresh_token {
            let fp = seed.fingerprint();
            let seen = seen_before;
            if !seen {
                let mut seeds_seen = all_seeds_seen;
                seeds_seen.push(fp.clone());
                let new = Record {
                    token_url: url.clone(),
                    client_id: self.cfg.client_id.clone(),
                    family: store::new_family(),
                    generation: 0,
                    refresh_token: Some(seed.clone()),
                    access_token: None,
                    access_expires_at_ms: None,
                    access_issued_at_ms: None,
                    refresh_expires_at_ms: None,
                    seeds_seen,
                    intent: None,
                    dead: None,
                    updated_at_ms: 0,
                };
                store
                    .write_held(&lock, &self.name, &new, prev, None)
                    .await?;
                tracing::info!(
                    event = "seed_adopted",
                    credential = %self.name,
                    family = %new.family,
                    refresh_token_fp = %fp,
                    "New refresh token seed adopted as a new family"
                );
                rec = Some(new);
            } else if let Some(r) = rec.as_mut() {
                if !r.seeds_seen.contains(&fp) {
                    r.seeds_seen.push(fp);
                    store.write_held(&lock, &self.name, r, prev, None).await?;
                }
            }
        }
        match rec {
            Some(r) if lock.is_rolled_back(&r) => {
                let f = self.rolled_back_failure(&r);
                self.control.lock().record = Some(r);
                self.publish(Snapshot {
                    token: None,
                    dead: Some(Arc::new(f)),
                });
            }
            Some(r) => {
                self.adopt(&r);
            }
            None => {
                self.control.lock().record = None;
                let f = self.no_record_failure(seen_before);
                tracing::error!(event = "token_refresh", credential = %self.name, grant_type = "refresh_token", outcome = "invalid_grant", error = "no_refresh_token", hint = %f.hint, "No refresh token");
                self.publish(Snapshot {
                    token: None,
                    dead: Some(Arc::new(f)),
                });
            }
        }
        Ok(())
    }

    /// Picks up a record written by someone else (login, another process,
    /// an operator): revives a dead credential.
    async fn poll_store(&self) {
        let SlotKind::Refresh { store, .. } = &self.kind else {
            return;
        };
        let disk = match self.read_record(store).await {
            Ok(d) => {
                let mut c = self.control.lock();
                if std::mem::take(&mut c.store_down) {
                    tracing::info!(event = "store_recovered", credential = %self.name, "Token store available again");
                }
                d
            }
            Err(f) => {
                // /credentials shows it even when no refresh was due.
                self.control.lock().last_failure = Some(Arc::new(f));
                return;
            }
        };
        let Some(disk) = disk else {
            return;
        };
        let mine = self.control.lock().record.clone();
        if mine.as_ref().map(Record::identity) != Some(disk.identity()) {
            if self.control.lock().inflight.is_some() {
                return;
            }
            if mine
                .as_ref()
                .is_some_and(|m| m.family == disk.family && m.generation > disk.generation)
            {
                // Older than what we hold (our rotation not yet saved, or a
                // store restored from a backup): never go back to it.
                return;
            }
            tracing::info!(event = "store_changed", credential = %self.name, family = %disk.family, generation = disk.generation, "Adopted a newer token set from the store");
            let was_dead = self.snapshot.load().dead.is_some();
            self.adopt(&disk);
            if was_dead && disk.dead.is_none() {
                let mut c = self.control.lock();
                c.next_attempt = None;
                c.consecutive_failures = 0;
            }
        }
    }

    /// Retries a failed store write; true once durable.
    async fn retry_unsaved(&self) -> bool {
        let SlotKind::Refresh { store, .. } = &self.kind else {
            return true;
        };
        let Some(rec) = self.control.lock().unsaved.clone() else {
            return true;
        };
        // Under the credential's lock, like every write of a spend.
        let Ok(lock) = store.lock_credential(&self.name).await else {
            return false;
        };
        // Unsaved records are always a refresh's n+1, fenced on n.
        let prev = (rec.family.as_str(), rec.generation.saturating_sub(1));
        match self
            .write_record(store, &lock, &rec, Some(prev), None)
            .await
        {
            Ok(()) => {
                tracing::info!(event = "store_write_recovered", credential = %self.name, "Rotated token set saved");
                true
            }
            Err(StoreError::Fenced { .. }) => {
                // A login or another writer moved the record on meanwhile:
                // the store is the truth; our rotation is orphaned.
                let Ok(disk) = self.read_record(store).await else {
                    return false;
                };
                tracing::warn!(event = "rotation_superseded", credential = %self.name, family = %rec.family, generation = rec.generation, "The store moved on while the rotated token set was unsaved; adopting the store's");
                self.control.lock().unsaved = None;
                if let Some(disk) = disk {
                    self.adopt(&disk);
                }
                true
            }
            Err(_) => false,
        }
    }

    /// The background refresher: refresh `refresh_before` ahead of expiry,
    /// back off on failure, notice store changes, stop at shutdown.
    pub async fn run(self: Arc<Self>) {
        let mut rng = rand::rngs::StdRng::from_entropy();
        // Jittered start, so many credentials or replicas don't burst the IdP.
        let start_jitter = Duration::from_millis(rand::Rng::gen_range(&mut rng, 0..200));
        tokio::select! {
            _ = tokio::time::sleep(start_jitter) => {}
            _ = self.shutdown.cancelled() => return,
        }
        let poll_every = Duration::from_secs(2);
        let mut changes = self.store().and_then(|s| s.changes(&self.name));
        loop {
            if !self.retry_unsaved().await {
                if self.sleep_or_shutdown(Duration::from_secs(1)).await {
                    return;
                }
                continue;
            }
            let now = Instant::now();
            let snap = self.snapshot.load_full();
            let due = if snap.dead.is_some() {
                let c = self.control.lock();
                match (snap.dead.as_ref().map(|d| d.outcome), c.next_attempt) {
                    (Some("config_error"), Some(t)) => t,
                    _ => now + poll_every,
                }
            } else {
                let backoff_until = self.control.lock().next_attempt;
                let by_expiry = match &snap.token {
                    Some(t) => {
                        let before = schedule::refresh_before(t.lifetime, self.cfg.refresh_before);
                        let left = t.remaining(self.clock.wall(), now);
                        now + left.saturating_sub(before + schedule::jitter(before, &mut rng))
                    }
                    None => now,
                };
                backoff_until.map_or(by_expiry, |b| b.max(by_expiry))
            };
            let wake = due.min(now + poll_every);
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = self.changed.notified() => continue,
                _ = store_changed(&mut changes) => {
                    // Another replica wrote: adopt at once, not at the next poll.
                    self.poll_store().await;
                    continue;
                }
                _ = self.shutdown.cancelled() => return,
            }
            if Instant::now() < due {
                self.poll_store().await;
                continue;
            }
            let snap = self.snapshot.load();
            if snap.dead.is_some() && snap.dead.as_ref().map(|d| d.outcome) != Some("config_error")
            {
                self.poll_store().await;
                continue;
            }
            match self.begin_refresh() {
                Ok(mut rx) => {
                    tokio::select! {
                        _ = rx.wait_for(Option::is_some) => {}
                        _ = self.shutdown.cancelled() => return,
                    }
                }
                Err(_) => {
                    self.poll_store().await;
                }
            }
        }
    }

    /// True when shutting down.
    async fn sleep_or_shutdown(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = self.shutdown.cancelled() => true,
        }
    }

    /// For status output: a secret-free view.
    pub fn status(&self) -> SlotStatus {
        let snap = self.snapshot.load();
        let state = self.state();
        let c = self.control.lock();
        let wall = self.clock.wall();
        let rec = c.record.as_ref();
        SlotStatus {
            credential: self.name.clone(),
            grant_type: self.cfg.grant.as_str(),
            state: state.as_str(),
            state_since: c.state_since,
            expires_in: snap
                .token
                .as_ref()
                .map(|t| t.remaining(wall, Instant::now())),
            family: rec.map(|r| r.family.clone()),
            generation: rec.map(|r| r.generation),
            last_refresh: c.last_success,
            last_error: c
                .last_failure
                .as_deref()
                .cloned()
                .or_else(|| snap.dead.as_deref().cloned()),
            refresh_token_fp: rec
                .and_then(|r| r.refresh_token.as_ref())
                .map(Secret::fingerprint),
            store_up: self.store().map(|_| !c.store_down),
        }
    }
}

/// Resolves when the store reports a write by someone else; never for a
/// file store (its changes are found by the periodic re-read).
async fn store_changed(rx: &mut Option<watch::Receiver<u64>>) {
    match rx {
        Some(r) => {
            if r.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

struct InflightGuard(Arc<Slot>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.control.lock().inflight = None;
        self.0.note_state();
    }
}

/// A secret-free summary of one slot.
#[derive(Debug, Clone)]
pub struct SlotStatus {
    pub credential: String,
    pub grant_type: &'static str,
    pub state: &'static str,
    pub state_since: Option<SystemTime>,
    pub expires_in: Option<Duration>,
    pub family: Option<String>,
    pub generation: Option<u64>,
    pub last_refresh: Option<SystemTime>,
    pub last_error: Option<Failure>,
    pub refresh_token_fp: Option<String>,
    /// refresh_token slots: whether the last store read succeeded.
    pub store_up: Option<bool>,
}

/// The fields of the one `token_refresh` event per attempt.
struct RefreshEvent {
    grant_type: &'static str,
    outcome: &'static str,
    status: Option<u16>,
    error: Option<String>,
    error_description: Option<String>,
    attempt: u32,
    duration_ms: u64,
    expires_in: Option<u64>,
    rotated: Option<bool>,
    family: Option<String>,
    generation: Option<u64>,
    refresh_token_fp: Option<String>,
    request_id: Option<String>,
}

impl RefreshEvent {
    fn new(slot: &Slot, attempt: u32) -> Self {
        RefreshEvent {
            grant_type: match slot.cfg.grant {
                GrantType::RefreshToken => "refresh_token",
                GrantType::ClientCredentials => "client_credentials",
            },
            outcome: "ok",
            status: None,
            error: None,
            error_description: None,
            attempt,
            duration_ms: 0,
            expires_in: None,
            rotated: None,
            family: None,
            generation: None,
            refresh_token_fp: None,
            request_id: None,
        }
    }

    fn set_identity(&mut self, rec: &Record) {
        self.family = Some(rec.family.clone());
        self.generation = Some(rec.generation);
    }

    fn ok(&mut self, lifetime: Duration, rotated: bool) {
        self.outcome = "ok";
        self.expires_in = Some(lifetime.as_secs());
        self.rotated = Some(rotated);
    }

    fn emit(&self, credential: &str, failure: Option<&Failure>) {
        macro_rules! event {
            ($lvl:expr, $msg:literal, $outcome:expr, $hint:expr) => {
                tracing::event!(
                    $lvl,
                    event = "token_refresh",
                    credential,
                    grant_type = self.grant_type,
                    outcome = $outcome,
                    status = self.status,
                    error = self.error.as_deref(),
                    error_description = self.error_description.as_deref(),
                    attempt = self.attempt,
                    duration_ms = self.duration_ms,
                    expires_in = self.expires_in,
                    rotated = self.rotated,
                    family = self.family.as_deref(),
                    generation = self.generation,
                    refresh_token_fp = self.refresh_token_fp.as_deref(),
                    request_id = self.request_id.as_deref(),
                    hint = $hint,
                    $msg
                )
            };
        }
        match failure {
            None if self.outcome == "lost_race" => {
                event!(
                    tracing::Level::INFO,
                    "Adopted a token refreshed elsewhere",
                    "lost_race",
                    None::<&str>
                )
            }
            None => event!(tracing::Level::INFO, "Token refreshed", "ok", None::<&str>),
            Some(f) if f.outcome == "transient" => {
                event!(
                    tracing::Level::WARN,
                    "Grant failed",
                    f.outcome,
                    Some(f.hint.as_str())
                )
            }
            Some(f) => event!(
                tracing::Level::ERROR,
                "Grant failed; credential is dead",
                f.outcome,
                Some(f.hint.as_str())
            ),
        }
    }
}

use rand::SeedableRng as _;

/// Why a login result was not installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("credential {0} still has a working token family (generation {1}); pass --force to replace it")]
    FamilyStillWorks(String, u64),
    #[error(
        "the token response has no refresh_token, so a refresh_token credential cannot use it"
    )]
    NoRefreshToken,
    #[error("token store")]
    Store(#[from] StoreError),
}

/// DESIGN.md "Bootstrap": writes a login's token set as a new family, under
/// the credential's lock. Replacing a family that still works needs `force`.
/// Returns the new record; a running engine adopts it (revival) by itself.
pub async fn install_family(
    store: &Store,
    cfg: &CredentialConfig,
    token_url: &Uri,
    set: &TokenSet,
    sent_wall: SystemTime,
    force: bool,
) -> Result<Record, InstallError> {
    let Some(refresh_token) = set.refresh_token.clone() else {
        return Err(InstallError::NoRefreshToken);
    };
    let lock = store.lock_credential(&cfg.name).await?;
    let url = token_url.to_string();
    let raw = store.read(&cfg.name).await?;
    let prev = raw.as_ref().map(|r| (r.family.clone(), r.generation));
    let all_seeds_seen = raw
        .as_ref()
        .map(|r| r.seeds_seen.clone())
        .unwrap_or_default();
    let existing = raw.filter(|r| r.matches(&url, &cfg.client_id));
    if let Some(r) = &existing {
        let works = r.dead.is_none() && r.refresh_token.is_some();
        if works && !force {
            return Err(InstallError::FamilyStillWorks(
                cfg.name.clone(),
                r.generation,
            ));
        }
    }
    let lifetime = set.expires_in.unwrap_or(cfg.default_lifetime);
    // Seeds consumed under any endpoint stay consumed.
    let mut seeds_seen = all_seeds_seen;
    // The config's seed, if any, is older than this login: never adopt it again.
    if let Some(seed) = &cfg.refresh_token {
        let fp = seed.fingerprint();
        if !seeds_seen.contains(&fp) {
            seeds_seen.push(fp);
        }
    }
    let record = Record {
        token_url: url,
        client_id: cfg.client_id.clone(),
        family: store::new_family(),
        generation: 0,
        refresh_token: Some(refresh_token),
        access_token: Some(set.access_token.clone()),
        access_expires_at_ms: Some(store::unix_ms(sent_wall + lifetime)),
        access_issued_at_ms: Some(store::unix_ms(sent_wall)),
        refresh_expires_at_ms: set
            .refresh_token_expires_in
            .map(|d| store::unix_ms(sent_wall + d)),
        seeds_seen,
        intent: None,
        dead: None,
        updated_at_ms: 0,
    };
    store
        .write_held(
            &lock,
            &cfg.name,
            &record,
            prev.as_ref().map(|(f, g)| (f.as_str(), *g)),
            None,
        )
        .await?;
    tracing::info!(
        event = "login_installed",
        credential = %cfg.name,
        family = %record.family,
        subject = set.subject.as_deref(),
        refresh_token_fp = %record.refresh_token.as_ref().map(Secret::fingerprint).unwrap_or_default(),
        "New token family installed"
    );
    Ok(record)
}

impl Slot {
    /// Installs a login's result and publishes it at once (admin login flow).
    pub async fn install_login(
        &self,
        set: &TokenSet,
        sent_wall: SystemTime,
        force: bool,
    ) -> Result<Record, InstallError> {
        let SlotKind::Refresh { store, .. } = &self.kind else {
            return Err(InstallError::NoRefreshToken);
        };
        let rec = install_family(store, &self.cfg, &self.token_url, set, sent_wall, force).await?;
        self.adopt(&rec);
        {
            let mut c = self.control.lock();
            c.next_attempt = None;
            c.consecutive_failures = 0;
        }
        Ok(rec)
    }

    pub fn token_url(&self) -> &Uri {
        &self.token_url
    }

    /// The grant client this credential uses (TLS settings included).
    pub fn grant_client(&self) -> &GrantClient {
        &self.client
    }
}
