//! The per-credential engine, in rooms (docs/architecture.md, "The token
//! engine"):
//!
//! - this file: the [`Slot`] (one per token), its published [`Snapshot`]
//!   (read lock-free by the hot path), its state machine, the single flight
//!   ([`Slot::begin_refresh`]) and the shutdown [`Drain`];
//! - [`refresh`]: one refresh attempt: write-ahead intent, the grant, the
//!   lost-rotation rules and the failure classes;
//! - [`family`]: families and seeds: start-up from the store, consumed seeds,
//!   logins installed as new families;
//! - [`refresher`]: the background loop: proactive refresh, backoff, store
//!   polling, saving an unsaved rotation.
//!
//! One [`Slot`] per token: a `refresh_token` credential has one; a
//! `client_credentials` credential has one per (scopes, resource) asked for
//! by its routes. Talks to the IdP only through `grant`, to the store only
//! through `store`.

mod family;
mod refresh;
mod refresher;
#[cfg(test)]
mod tests;

pub use family::{install_family, InstallError};

use super::grant::{self, Delivery, FailureClass, Grant, GrantClient, GrantError, TokenSet};
use super::reason::Reason;
use super::schedule;
use super::store::{self, Intent, Record, Store, StoreError, StoreLock};
use crate::config::{CredentialConfig, DpopSource, GrantType};
use crate::dpop::{DpopKey, Nonces};
use crate::secret::Secret;
use crate::token::CredentialUnavailable;
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
    /// Tests on tokio's paused clock: the wall clock moves with it.
    follows_tokio: Option<(SystemTime, Instant)>,
}

impl Clock {
    /// A wall clock that advances with tokio's (paused) clock.
    pub fn following_tokio() -> Clock {
        Clock {
            offset_ms: AtomicI64::new(0),
            follows_tokio: Some((SystemTime::now(), Instant::now())),
        }
    }

    pub fn wall(&self) -> SystemTime {
        let off = self.offset_ms.load(Ordering::Relaxed);
        let now = match self.follows_tokio {
            Some((wall, mono)) => wall + mono.elapsed(),
            None => SystemTime::now(),
        };
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

/// A credential's state (docs/architecture.md, "States").
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Fresh,
    Refreshing,
    Expired,
    Dead,
}

impl State {
    pub const ALL: [State; 4] = [State::Fresh, State::Refreshing, State::Expired, State::Dead];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Fresh => "fresh",
            State::Refreshing => "refreshing",
            State::Expired => "expired",
            State::Dead => "dead",
        }
    }
}

pub use super::reason::Outcome;

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
    /// The DPoP key the token is bound to (RFC 9449 §6): requests carrying
    /// it need a proof signed with this key.
    pub dpop: Option<Arc<DpopKey>>,
    /// Checked token-response values routes may use (`{token.NAME}`).
    pub fields: crate::token_fields::Fields,
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
            dpop: None,
            fields: Default::default(),
        }
    }

    fn bound_to(mut self, key: Option<Arc<DpopKey>>) -> Token {
        self.dpop = key;
        self
    }

    fn with_fields(mut self, fields: crate::token_fields::Fields) -> Token {
        self.fields = fields;
        self
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
    pub outcome: Outcome,
    pub reason: Reason,
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

/// What waiters on a refresh in flight receive once it settles.
type Settled = Option<Result<(), Arc<Failure>>>;

/// A 401 without `error="invalid_token"` triggers a refresh only for a token
/// at least this old (a fresh token rejected is more likely a wrong scope).
const REACTIVE_MIN_AGE: Duration = Duration::from_secs(30);
const REACTIVE_MIN_INTERVAL: Duration = Duration::from_secs(10);
/// Added to the longest grant when fencing the fleet lease around it.
const FENCE_MARGIN: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Control {
    /// The one refresh in flight; everyone who needs a token waits on it.
    inflight: Option<watch::Receiver<Settled>>,
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

/// A DPoP credential's keys and nonces (docs/dpop.md).
pub struct SlotDpop {
    source: DpopSource,
    /// Server nonces by origin: the token endpoint's and the upstreams'.
    pub nonces: Arc<Nonces>,
    /// The last key parsed from a record (by its fingerprint), or the
    /// in-memory key of a client_credentials slot. A sync mutex, never
    /// held across an await.
    cached: Mutex<Option<(String, Arc<DpopKey>)>>,
}

impl SlotDpop {
    fn new(source: DpopSource) -> SlotDpop {
        SlotDpop {
            source,
            nonces: Arc::default(),
            cached: Mutex::new(None),
        }
    }

    /// The key for a token set whose record holds `stored`: `dpop_key`'s
    /// when configured, else the stored generated one.
    fn key_for(&self, stored: Option<&Secret>) -> Option<Arc<DpopKey>> {
        if let DpopSource::File { key, .. } = &self.source {
            return Some(key.clone());
        }
        let stored = stored?;
        let fp = stored.fingerprint();
        let mut c = self.cached.lock();
        if let Some((f, k)) = &*c {
            if *f == fp {
                return Some(k.clone());
            }
        }
        let key = Arc::new(DpopKey::from_stored(stored).ok()?);
        *c = Some((fp, key.clone()));
        Some(key)
    }

    /// For tokens never stored (client_credentials): one key per process.
    fn in_memory(&self) -> Option<Arc<DpopKey>> {
        if let DpopSource::File { key, .. } = &self.source {
            return Some(key.clone());
        }
        let mut c = self.cached.lock();
        if let Some((_, k)) = &*c {
            return Some(k.clone());
        }
        let (key, _) = DpopKey::generate().ok()?;
        let key = Arc::new(key);
        *c = Some((String::new(), key.clone()));
        Some(key)
    }

    fn generates(&self) -> bool {
        self.source == DpopSource::Generated
    }
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
    /// `dpop = true` only.
    pub dpop: Option<SlotDpop>,
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
        let dpop = cfg.dpop.clone().map(SlotDpop::new);
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
            dpop,
        })
    }

    /// Stops this slot's background refresher; a refresh in flight finishes
    /// (it holds the credential's lock, so a successor waits for it).
    pub fn retire(&self) {
        self.shutdown.cancel();
    }

    /// A reload triggered by a changed config or secret file retries a
    /// credential dead of a config error at once (docs/architecture.md,
    /// "Failure classes"), even when its config compares equal: a file read
    /// per request (`client_assertion_file`) is not part of the config.
    pub fn retry_config_error_now(&self) {
        let dead_of_config = self
            .snapshot
            .load()
            .dead
            .as_ref()
            .is_some_and(|d| d.outcome == Outcome::ConfigError);
        if dead_of_config {
            self.control.lock().next_attempt = Some(Instant::now());
            self.changed.notify_one();
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

    fn publish(&self, snap: Snapshot) {
        self.snapshot.store(Arc::new(snap));
        self.changed.notify_one();
        self.note_state();
    }

    /// The state (docs/architecture.md, "Identity and states").
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

    /// Reactive refresh (docs/routing.md, "Reactive refresh"): the upstream rejected the token tagged
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
        if self.control.lock().inflight.is_some() {
            // The refresh in flight may have replaced it at the IdP already
            // (GitHub kills the previous access token at once): its result
            // is the replacement, so this is no reason to refresh again, nor
            // a use of the reactive limit. The replay waits for it
            // ([`Slot::wait_replaced`]).
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

    /// Waits (up to `refresh_wait`) for the refresh in flight when the
    /// current token is still the one tagged `tag`: a replay after a
    /// rejection must carry its result.
    pub async fn wait_replaced(&self, tag: u64) {
        let inflight = {
            let c = self.control.lock();
            c.inflight.clone()
        };
        let still = self
            .snapshot
            .load()
            .token
            .as_ref()
            .is_some_and(|t| t.tag == tag);
        if let (true, Some(mut rx)) = (still, inflight) {
            let _ = tokio::time::timeout(self.cfg.refresh_wait, rx.wait_for(Option::is_some)).await;
        }
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
                    if u.retry_after.is_none() && f.outcome == Outcome::Transient {
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
                _ => Err(self.generic_unavailable(Reason::NoToken, None)),
            },
            Ok(Err(_)) => Err(self.generic_unavailable(Reason::ShuttingDown, None)),
            Err(_) => {
                Err(self.generic_unavailable(Reason::RefreshTimeout, Some(Duration::from_secs(1))))
            }
        }
    }

    fn generic_unavailable(
        &self,
        reason: Reason,
        retry_after: Option<Duration>,
    ) -> CredentialUnavailable {
        let hint = match reason {
            Reason::RefreshTimeout => format!(
                "The token endpoint did not answer within refresh_wait ({}); check that the IdP is reachable, the refresh continues in the background.",
                humantime::format_duration(self.cfg.refresh_wait)
            ),
            Reason::ShuttingDown => "tokenproxy is shutting down; retry against another instance.".to_owned(),
            _ => "No usable token yet; see the token_refresh log events for this credential.".to_owned(),
        };
        CredentialUnavailable {
            credential: self.name.clone(),
            reason,
            hint,
            retry_after,
        }
    }

    /// Joins the refresh in flight, or starts one. Refuses (with the reason)
    /// while dead, backing off, unsaved, or shutting down.
    pub fn begin_refresh(self: &Arc<Self>) -> Result<watch::Receiver<Settled>, Arc<Failure>> {
        self.begin_refresh_for(None)
    }

    /// As [`Slot::begin_refresh`]; a refresh it starts is logged with the
    /// `request_id` that caused it (joining one in flight changes nothing).
    pub fn begin_refresh_for(
        self: &Arc<Self>,
        request_id: Option<&str>,
    ) -> Result<watch::Receiver<Settled>, Arc<Failure>> {
        let mut c = self.control.lock();
        if let Some(rx) = &c.inflight {
            return Ok(rx.clone());
        }
        if self.shutdown.is_cancelled() {
            return Err(Arc::new(self.failure_simple(
                Reason::ShuttingDown,
                "tokenproxy is shutting down; no refresh starts now.",
            )));
        }
        let now = Instant::now();
        if let Some(dead) = &self.snapshot.load().dead {
            let retry_allowed =
                dead.outcome == Outcome::ConfigError && c.next_attempt.is_none_or(|t| now >= t);
            if !retry_allowed {
                return Err(dead.clone());
            }
        } else if let Some(t) = c.next_attempt {
            if now < t {
                let mut f = c.last_failure.as_deref().cloned().unwrap_or_else(|| {
                    self.failure_simple(
                        Reason::Backoff,
                        "Retrying the token endpoint with backoff.",
                    )
                });
                f.retry_after = Some((t - now).max(Duration::from_secs(1)));
                return Err(Arc::new(f));
            }
        }
        if c.unsaved.is_some() {
            return Err(Arc::new(self.failure_simple(
                Reason::StoreWriteFailed,
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

    fn failure_simple(&self, reason: Reason, hint: &str) -> Failure {
        Failure {
            outcome: Outcome::Transient,
            reason,
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
                    Outcome::ConfigError | Outcome::InvalidGrant | Outcome::LostRotation => {
                        schedule::CONFIG_ERROR_RETRY
                    }
                    _ => schedule::backoff(
                        c.consecutive_failures - 1,
                        self.cfg.max_backoff,
                        f.retry_after,
                        &mut rand::thread_rng(),
                    ),
                };
                // A rate limit says when asking again makes sense: none
                // before then, up to max_backoff (a day-long one must not
                // park the credential); the log and `/credentials`
                // (`next_attempt_at`) say until when.
                let limited = match (f.status, f.retry_after) {
                    (Some(429), Some(d)) => Some(d),
                    _ => None,
                };
                c.next_attempt = Some(Instant::now() + wait);
                if let Some(d) = limited {
                    let until = self.clock.wall() + wait;
                    // retry_after_s is what the IdP asked; until is what
                    // tokenproxy does (capped at max_backoff).
                    tracing::warn!(
                        event = "rate_limited",
                        credential = %self.name,
                        retry_after_s = d.as_secs(),
                        until = crate::token::store::unix_ms(until) / 1000,
                        "Token endpoint rate limit; no token request until then"
                    );
                }
            }
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
            state,
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
            next_attempt_at: c
                .next_attempt
                .and_then(|t| t.checked_duration_since(Instant::now()))
                .map(|left| wall + left),
            refresh_expires_in: rec.and_then(|r| r.refresh_expires_at_ms).map(|at| {
                store::from_unix_ms(at)
                    .duration_since(wall)
                    .unwrap_or_default()
            }),
            token_fields: match (&snap.token, rec) {
                (Some(t), _) => t.fields.clone(),
                (None, Some(r)) => {
                    crate::token_fields::allowed(
                        &r.token_fields,
                        self.cfg.token_field_hosts.as_deref(),
                    )
                    .0
                }
                (None, None) => Default::default(),
            },
        }
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
    pub state: State,
    pub state_since: Option<SystemTime>,
    pub expires_in: Option<Duration>,
    pub family: Option<String>,
    pub generation: Option<u64>,
    pub last_refresh: Option<SystemTime>,
    pub last_error: Option<Failure>,
    pub refresh_token_fp: Option<String>,
    /// refresh_token slots: whether the last store read succeeded.
    pub store_up: Option<bool>,
    /// When the IdP said how long the refresh token itself lives
    /// (`refresh_token_expires_in` and its vendor spellings): the time left.
    pub refresh_expires_in: Option<Duration>,
    /// No token request before this (backoff or a rate limit).
    pub next_attempt_at: Option<SystemTime>,
    /// The token-response values routes may use (`{token.instance_url}`):
    /// checked origins, hosts only, no secret.
    pub token_fields: crate::token_fields::Fields,
}

impl Slot {
    pub fn token_url(&self) -> &Uri {
        &self.token_url
    }

    /// The grant client this credential uses (TLS settings included).
    pub fn grant_client(&self) -> &GrantClient {
        &self.client
    }
}
