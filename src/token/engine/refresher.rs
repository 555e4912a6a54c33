//! The background refresher: refresh `refresh_before` ahead of expiry, back
//! off on failure, pick up store changes, save an unsaved rotation.

use super::*;
use rand::SeedableRng as _;

impl Slot {
    /// Picks up a record written by someone else (login, another process,
    /// an operator): revives a dead credential.
    pub(super) async fn poll_store(&self) {
        let SlotKind::Refresh { store, .. } = &self.kind else {
            return;
        };
        let disk = match self.poll_record(store).await {
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

    /// As `read_record`, but from [`Store::poll`]: possibly a moment old,
    /// which a change check can afford and a spend cannot.
    async fn poll_record(&self, store: &Store) -> Result<Option<Record>, Failure> {
        let rec = store
            .poll(&self.name)
            .await
            .map_err(|e| self.store_failure(&e))?;
        let url = self.token_url.to_string();
        Ok(rec.filter(|r| r.matches(&url, &self.cfg.client_id)))
    }

    /// Retries a failed store write; true once durable.
    pub(super) async fn retry_unsaved(&self) -> bool {
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
        let mut changes = self.store().and_then(|s| s.changes(&self.name));
        // A file store's sweep wakes us when another process writes, so a
        // poll is only a safety net there; with a thousand credentials,
        // polls every 2 s were most of an idle proxy's work.
        let poll_every = match (self.store(), &changes) {
            (Some(Store::File(_)), Some(_)) => Duration::from_secs(30),
            _ => Duration::from_secs(2),
        };
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
                    (Some(Outcome::ConfigError), Some(t)) => t,
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
                let by_expiry = self
                    .keep_alive_due(now, &mut rng)
                    .map_or(by_expiry, |k| k.min(by_expiry));
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
            if snap.dead.is_some()
                && snap.dead.as_ref().map(|d| d.outcome) != Some(Outcome::ConfigError)
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

    /// When to refresh only so that an idle-expiring refresh token (Keycloak's
    /// `refresh_expires_in`, a session idle timeout) does not run out while
    /// no request needs a token; None for an absolute lifetime (refreshing
    /// would not extend it) or when the IdP said nothing.
    fn keep_alive_due(&self, now: Instant, rng: &mut impl rand::Rng) -> Option<Instant> {
        if self.cfg.refresh_token_lifetime != crate::providers::RefreshLifetime::Idle {
            return None;
        }
        let (deadline, refreshed) = {
            let c = self.control.lock();
            let rec = c.record.as_ref()?;
            (rec.refresh_expires_at_ms?, rec.access_issued_at_ms?)
        };
        let window = Duration::from_millis(deadline.checked_sub(refreshed)?);
        let after = schedule::keep_alive_after(window)?;
        let at = store::from_unix_ms(refreshed) + after;
        let wall = self.clock.wall();
        let left = at.duration_since(wall).unwrap_or_default();
        Some(now + left.saturating_sub(schedule::jitter(window - after, rng)))
    }

    /// True when shutting down.
    pub(super) async fn sleep_or_shutdown(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = self.shutdown.cancelled() => true,
        }
    }
}

/// Resolves when the store reports a write by someone else.
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
