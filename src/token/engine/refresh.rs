//! One refresh attempt, start to end: the re-read under the credential's
//! lock, the write-ahead intent, the grant, and what its failure means
//! (docs/architecture.md, "Lost rotation" and "Failure classes").

use super::*;
use crate::token::reason::Reason;

impl Slot {
    /// One attempt, start to end, with its one log event.
    pub(super) async fn refresh_once(
        self: &Arc<Self>,
        cause: Option<String>,
    ) -> Result<(), Failure> {
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
            result
                .as_ref()
                .err()
                .map_or(ev.outcome, |f| f.outcome)
                .as_str(),
            started.elapsed(),
        );
        if let Err(f) = &result {
            if f.outcome.is_dead() {
                let token = self.snapshot.load().token.clone();
                self.publish(Snapshot {
                    token,
                    dead: Some(Arc::new(f.clone())),
                });
            }
        }
        result
    }

    pub(super) async fn client_credentials(
        &self,
        scopes: &[String],
        resource: Option<&str>,
        ev: &mut RefreshEvent,
    ) -> Result<(), Failure> {
        let grant = Grant::ClientCredentials { scopes, resource };
        let build = || grant::build_token_request(&self.cfg, &self.token_url, &grant);
        let req = build().map_err(|e| self.classify(&e, ev))?;
        let key = self.dpop.as_ref().and_then(SlotDpop::in_memory);
        let proven = self.proven(key.as_deref());
        let sent_wall = self.clock.wall();
        let sent_mono = Instant::now();
        let set = self
            .exchange(req, proven.as_ref(), &build, ev, sent_wall)
            .await
            .map_err(|e| self.classify(&e, ev))?;
        if let Some(f) = self.unsupported_token_type(&set, ev) {
            return Err(f);
        }
        let (lifetime, source) = match self.introspected_lifetime(&set, sent_wall).await {
            Some(l) => (l, LifetimeSource::Introspection),
            None => self.lifetime(&set),
        };
        ev.ok(lifetime, source, false);
        let bound = self.bound_key(&set, key);
        self.note_rejected_fields(&set);
        let previous = self
            .snapshot
            .load()
            .token
            .as_ref()
            .map(|t| t.fields.clone());
        let fields = self.allowed_fields(crate::token_fields::merge(
            &previous.unwrap_or_default(),
            &set.fields,
            &set.rejected_fields,
        ));
        self.publish(Snapshot {
            token: Some(Arc::new(
                Token::new(
                    set.access_token,
                    sent_wall,
                    sent_mono,
                    lifetime,
                    String::new(),
                    0,
                )
                .bound_to(bound)
                .with_fields(fields),
            )),
            dead: None,
        });
        Ok(())
    }

    /// What a token request is proven with, for a DPoP credential.
    pub(super) fn proven<'a>(
        &'a self,
        key: Option<&'a crate::dpop::DpopKey>,
    ) -> Option<grant::TokenEndpointDpop<'a>> {
        Some(grant::TokenEndpointDpop {
            key: key?,
            nonces: &self.dpop.as_ref()?.nonces,
        })
    }

    /// The key a new token is bound to. RFC 9449 §5: an IdP that ignores
    /// the proof answers `token_type: Bearer`; the token is then used as a
    /// bearer token (refusing it would throw away a rotation the IdP
    /// already made), and the operator is told.
    pub(super) fn bound_key(
        &self,
        set: &TokenSet,
        key: Option<Arc<crate::dpop::DpopKey>>,
    ) -> Option<Arc<crate::dpop::DpopKey>> {
        let key = key?;
        if set.dpop_bound {
            return Some(key);
        }
        tracing::warn!(
            event = "dpop_not_bound",
            credential = %self.name,
            hint = "The IdP answered token_type Bearer to a DPoP request: the token is not bound to the key and is sent as a bearer token. Enable DPoP for this client at the IdP, or remove dpop = true.",
            "Token is not DPoP-bound"
        );
        None
    }

    /// A `token_type` this credential does not inject (`Bearer`, and the
    /// profile's or `token_types`): a configuration error, decided after the
    /// answer was taken as a grant, so a rotation it carries is kept.
    pub(super) fn unsupported_token_type(
        &self,
        set: &TokenSet,
        ev: &mut RefreshEvent,
    ) -> Option<Failure> {
        let tt = set.token_type.as_deref()?;
        // DPoP: bound to the proof's key (checked by grant::check_token_type).
        if set.dpop_bound || token_type_injected(&self.cfg, tt) {
            return None;
        }
        ev.outcome = Outcome::ConfigError;
        Some(Failure {
            outcome: Outcome::ConfigError,
            reason: Reason::TokenTypeUnsupported,
            hint: format!(
                "The IdP issued token_type {tt:?}, which this credential does not inject (Bearer{}); if the upstream takes it as a bearer token, add it to token_types, else this grant cannot be used here. A rotated refresh token was saved.",
                self.cfg
                    .token_types
                    .iter()
                    .map(|t| format!(", {t}"))
                    .collect::<String>()
            ),
            retry_after: None,
            status: ev.status,
            error: None,
            error_description: None,
            at: self.clock.wall(),
        })
    }

    /// RFC 7662 on a new access token whose response said nothing of its
    /// lifetime (no `expires_in`, not a JWT; Salesforce), when
    /// `introspection_url` is set. None: use `default_lifetime`. A failure
    /// here never fails the grant it follows.
    pub(super) async fn introspected_lifetime(
        &self,
        set: &TokenSet,
        sent_wall: SystemTime,
    ) -> Option<Duration> {
        if set.expires_in.is_some() {
            return None;
        }
        let url = self.cfg.introspection_url.as_ref()?;
        let answer =
            match grant::build_access_introspection_request(&self.cfg, url, &set.access_token) {
                Ok(req) => self.client.send(&req).await,
                Err(e) => Err(e),
            };
        match answer.and_then(|r| grant::parse_introspection_lifetime(&r, sent_wall)) {
            Ok(Some(l)) => Some(l),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(
                    event = "lifetime_introspection_failed",
                    credential = %self.name,
                    error = %crate::error_chain(&e),
                    hint = "The token response had no expires_in and introspection did not say when the access token expires; default_lifetime is assumed.",
                    "Access token lifetime unknown"
                );
                None
            }
        }
    }

    /// The access token's lifetime from the response alone, and whence.
    pub(super) fn lifetime(&self, set: &TokenSet) -> (Duration, LifetimeSource) {
        match set.expires_in {
            Some(l) if set.expires_in_sent => (l, LifetimeSource::Response),
            Some(l) => (l, LifetimeSource::Jwt),
            None => (self.cfg.default_lifetime, LifetimeSource::Default),
        }
    }

    pub(super) fn check_skew(&self, headers: &http::HeaderMap, sent_wall: SystemTime) {
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
    pub(super) fn scrub(&self, text: &str) -> String {
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
    /// One token request and its answer: sent (with a DPoP proof and its
    /// nonce retry when `proven`), the status noted, the clock checked,
    /// the body parsed and its token type checked.
    async fn exchange(
        &self,
        req: grant::PreparedRequest,
        proven: Option<&grant::TokenEndpointDpop<'_>>,
        build: &(dyn Fn() -> Result<grant::PreparedRequest, GrantError> + Sync),
        ev: &mut RefreshEvent,
        sent_wall: SystemTime,
    ) -> Result<TokenSet, GrantError> {
        let raw = self.client.send_proven(req, proven, build).await?;
        ev.status = Some(raw.status.as_u16());
        self.check_skew(&raw.headers, sent_wall);
        let set = grant::parse_token_response(&raw, sent_wall)?;
        grant::check_token_type(set, proven.is_some())
    }

    pub(super) fn classify(&self, e: &GrantError, ev: &mut RefreshEvent) -> Failure {
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
        ev.error = e
            .code
            .clone()
            .or_else(|| Some(self.scrub(&crate::error_chain(e))));
        ev.error_description = e.description.clone();
        let outcome = match e.class {
            FailureClass::InvalidGrant => Outcome::InvalidGrant,
            FailureClass::Config => Outcome::ConfigError,
            FailureClass::Transient => Outcome::Transient,
        };
        Failure {
            outcome,
            reason: e
                .code
                .clone()
                .map_or(Reason::Unexplained(outcome), Reason::Idp),
            hint: crate::token::hints::for_grant_error(&self.cfg, e),
            retry_after: e.retry_after,
            status: e.status,
            error: ev.error.clone(),
            error_description: e.description.clone(),
            at: self.clock.wall(),
        }
    }

    /// The refresh_token procedure under the credential's lock: re-read,
    /// (intent, grant, write), publish.
    pub(super) async fn refresh_with_store(
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
                    ev.outcome = Outcome::LostRace;
                    return Ok(());
                }
                disk
            }
            (Some(disk), None) => {
                if self.adopt(&disk) {
                    ev.set_identity(&disk);
                    ev.outcome = Outcome::LostRace;
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
                return Err(self.dead_on_disk(&Reason::parse(&dead.reason)));
            }
        }
        let Some(refresh_token) = rec.refresh_token.clone() else {
            return Err(self.dead_failure(
                Outcome::InvalidGrant,
                Reason::NoRefreshToken,
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

        // A generated DPoP key is stored with the intent, before its first
        // use: a restart or another replica proves with the same key.
        if self.dpop.as_ref().is_some_and(SlotDpop::generates) && rec.dpop_key.is_none() {
            match crate::dpop::DpopKey::generate() {
                Ok((_, stored)) => rec.dpop_key = Some(stored),
                Err(e) => {
                    let e = GrantError::config_not_sent("cannot generate a DPoP key".into())
                        .caused_by(e);
                    return Err(self.classify(&e, ev));
                }
            }
        }
        let dpop_key = self
            .dpop
            .as_ref()
            .and_then(|d| d.key_for(rec.dpop_key.as_ref()));
        if self.dpop.is_some() && dpop_key.is_none() {
            // Never a proofless request from a DPoP credential.
            let e = GrantError::config_not_sent(
                "the DPoP key stored with the token set cannot be read".into(),
            );
            return Err(self.classify(&e, ev));
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

        // A request that cannot be built (no client assertion) goes down the
        // not-sent path below: nothing was presented.
        let grant = Grant::RefreshToken(&refresh_token);
        let build = || grant::build_token_request(&self.cfg, &self.token_url, &grant);
        let built = build();
        let proven = self.proven(dpop_key.as_deref());
        let sent_wall = self.clock.wall();
        let sent_mono = Instant::now();
        if built.is_ok() {
            let mut c = self.control.lock();
            let same = c
                .presented
                .as_ref()
                .is_some_and(|(f, g, _)| *f == rec.family && *g == rec.generation);
            if !same {
                c.presented = Some((rec.family.clone(), rec.generation, sent_mono));
            }
        }
        let answer = match built {
            Ok(req) => {
                self.exchange(req, proven.as_ref(), &build, ev, sent_wall)
                    .await
            }
            Err(e) => Err(e),
        };
        match answer {
            Ok(set) => {
                let (lifetime, source) = self.lifetime(&set);
                let rotated = set.refresh_token.is_some();
                let unsupported = self.unsupported_token_type(&set, ev);
                let mut next = rec.clone();
                next.generation += 1;
                // RFC 6749 §6: no refresh_token in the answer keeps the old one.
                if let Some(rt) = set.refresh_token.clone() {
                    next.refresh_token = Some(rt);
                }
                next.access_token = Some(set.access_token.clone());
                next.access_issued_at_ms = Some(store::unix_ms(sent_wall));
                next.access_expires_at_ms = Some(store::unix_ms(sent_wall + lifetime));
                if unsupported.is_some() {
                    // Never stored, so never injected after a restart.
                    next.access_token = None;
                    next.access_expires_at_ms = None;
                }
                next.refresh_expires_at_ms = set
                    .refresh_token_expires_in
                    .map(|d| store::unix_ms(sent_wall + d))
                    .or(if rotated {
                        None
                    } else {
                        rec.refresh_expires_at_ms
                    });
                self.note_rejected_fields(&set);
                next.token_fields = self.allowed_fields(crate::token_fields::merge(
                    &rec.token_fields,
                    &set.fields,
                    &set.rejected_fields,
                ));
                next.intent = None;
                next.dead = None;
                ev.set_identity(&next);
                ev.refresh_token_fp = next.refresh_token.as_ref().map(Secret::fingerprint);
                if unsupported.is_none() {
                    ev.ok(lifetime, source, rotated);
                }
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
                        error = %crate::error_chain(&e),
                        hint = "The rotated refresh token could not be saved; the new access token is served from memory and no further refresh starts until the write succeeds.",
                        "Store write failed"
                    );
                    crate::metrics::metrics().store_write_failed();
                    self.control.lock().unsaved = Some(next.clone());
                }
                if let Some(f) = unsupported {
                    self.control.lock().record = Some(next);
                    return Err(f);
                }
                let bound = self.bound_key(&set, dpop_key.clone());
                // Asked only once the rotation is durable: a lost answer
                // here must not keep the new refresh token from the store.
                let mut lifetime = lifetime;
                if let Some(l) = self.introspected_lifetime(&set, sent_wall).await {
                    lifetime = l;
                    // The log line reports the lifetime in use (emitted
                    // once this attempt returns).
                    ev.ok(l, LifetimeSource::Introspection, rotated);
                    next.access_expires_at_ms = Some(store::unix_ms(sent_wall + l));
                    let saved = self.control.lock().unsaved.is_none();
                    if saved {
                        // Best effort: the stored expiry only times a
                        // restart's first refresh (a 401 refreshes anyway).
                        let id = (next.family.clone(), next.generation);
                        let _ = self
                            .write_record(store, lock, &next, Some((&id.0, id.1)), None)
                            .await;
                    }
                }
                let token = Token::new(
                    set.access_token,
                    sent_wall,
                    sent_mono,
                    lifetime,
                    next.family.clone(),
                    next.generation,
                )
                .bound_to(bound)
                .with_fields(next.token_fields.clone());
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
                                ev.outcome = Outcome::LostRace;
                                return Ok(());
                            }
                        }
                        rec.intent = None;
                        rec.dead = Some(store::DeadMark {
                            family: rec.family.clone(),
                            generation: rec.generation,
                            reason: failure.reason.as_str().to_owned(),
                        });
                        let id = (rec.family.clone(), rec.generation);
                        // Unsaved, the mark still holds in memory, and the
                        // store keeps the intent: a restart goes through the
                        // lost-rotation checks, never presents blindly.
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
                        // Unsaved, the intent stays on disk and
                        // unspent_intent says it was not spent.
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

    /// docs/architecture.md, "Lost rotation": present the token again only if the IdP
    /// says it is still active, or within the declared grace window.
    pub(super) async fn check_lost_rotation(
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
            let answer = match grant::build_introspection_request(&self.cfg, url, refresh_token) {
                Ok(req) => self.client.send(&req).await,
                Err(e) => Err(e),
            };
            match answer.and_then(|r| grant::parse_introspection(&r)) {
                Ok(true) => {
                    rec.intent = None;
                    return Ok(());
                }
                Ok(false) => {}
                Err(e) => {
                    // Unknown: never guess. Keep the intent and try later.
                    let mut f = self.classify(&e, ev);
                    f.reason = Reason::LostRotationUnverified;
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
            reason: Reason::LostRotation.as_str().to_owned(),
        });
        let id = (rec.family.clone(), rec.generation);
        // Unsaved, the intent stays on disk: a restart reaches this same
        // verdict, so dropping the error loses nothing.
        let _ = self
            .write_record(store, lock, rec, Some((&id.0, id.1)), None)
            .await;
        self.control.lock().record = Some(rec.clone());
        ev.status = None;
        Err(self.dead_failure(
            Outcome::LostRotation,
            Reason::LostRotation,
            crate::token::hints::lost_rotation(&self.cfg, gateway_status),
        ))
    }

    /// Fleet: an intent another replica wrote less than a grant's length
    /// ago may still be in flight (its lease ended early: released, or a
    /// clock apart). Asking introspection now could hear "active" before
    /// the IdP has seen that request, so wait until it cannot be.
    pub(super) fn wait_for_grant_elsewhere(
        &self,
        store: &Store,
        intent: &Intent,
    ) -> Result<(), Failure> {
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
            Reason::RefreshInFlightElsewhere,
            "Another replica presented this refresh token moments ago and its answer may still arrive; waiting before checking whether it was spent.",
        );
        f.retry_after = Some(fence - age);
        Err(f)
    }

    /// How long ago `intent` was first presented, by the more pessimistic
    /// of the monotonic clock (when this process presented it) and the
    /// wall clock. A wall clock behind the intent cannot be trusted: old.
    pub(super) fn intent_age(&self, intent: &Intent) -> Duration {
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

    /// The failure a dead mark in the store stands for.
    pub(super) fn dead_on_disk(&self, reason: &Reason) -> Failure {
        let outcome = if *reason == Reason::LostRotation {
            Outcome::LostRotation
        } else {
            Outcome::InvalidGrant
        };
        self.dead_failure(
            outcome,
            reason.clone(),
            crate::token::hints::dead_on_disk(reason),
        )
    }

    /// The store holds an older generation of a family than one already
    /// written: restored from a backup, or edited. Its token is spent.
    pub(super) fn rolled_back_failure(&self, disk: &Record) -> Failure {
        tracing::error!(event = "store_rolled_back", credential = %self.name, family = %disk.family, generation = disk.generation, "The store holds an older generation than one already written");
        self.dead_failure(
            Outcome::InvalidGrant,
            Reason::StoreRolledBack,
            format!("The store holds generation {} of this token family, but a newer generation was already written: the store was restored from an older backup or edited, and its refresh token is spent, so it is not presented (that would be a reuse); run `tokenproxy login` to start a new family.", disk.generation),
        )
    }

    /// No token set for this endpoint and client. `seed_spent`: the
    /// configured seed was consumed before (for another spelling or another
    /// endpoint), so it is not presented again.
    pub(super) fn no_record_failure(&self, seed_spent: bool) -> Failure {
        if seed_spent {
            self.dead_failure(
                Outcome::InvalidGrant,
                Reason::SeedAlreadyUsed,
                format!("The configured refresh_token was already consumed by this store for another token endpoint or client_id, and a consumed seed is never presented again; the store's family does not belong to {} and client {}. If the IdP did not change, restore the previous token_url/client_id; otherwise run `tokenproxy login` or set a new refresh_token.", self.token_url, self.cfg.client_id),
            )
        } else {
            self.dead_failure(
                Outcome::InvalidGrant,
                Reason::NoRefreshToken,
                "There is no refresh token for this credential: run `tokenproxy login` or set refresh_token in the config.".into(),
            )
        }
    }

    /// How long a grant may be in flight once its intent is written: the
    /// fleet lease is extended to cover it (docs/architecture.md, "Fleet").
    pub(crate) fn grant_fence(&self) -> Duration {
        self.cfg.connect_timeout + crate::token::GRANT_TIMEOUT + FENCE_MARGIN
    }

    pub(super) fn dead_failure(&self, outcome: Outcome, reason: Reason, hint: String) -> Failure {
        Failure {
            outcome,
            error: Some(reason.as_str().to_owned()),
            reason,
            hint,
            retry_after: None,
            status: None,
            error_description: None,
            at: self.clock.wall(),
        }
    }

    /// Also notes the outage (logged once, until a read succeeds again).
    /// Never called with the control lock held.
    pub(super) fn store_failure(&self, e: &StoreError) -> Failure {
        let first = !std::mem::replace(&mut self.control.lock().store_down, true);
        if first {
            tracing::warn!(event = "store_unavailable", credential = %self.name, error = %crate::error_chain(e), "Token store unavailable; serving the cached token, no refresh until it is back");
        }
        Failure {
            outcome: Outcome::Transient,
            reason: Reason::StoreUnavailable,
            hint: match &self.kind {
                // The cause (a path, a database user) goes to the log only:
                // hints reach clients in 503 bodies.
                SlotKind::Refresh { store, .. } if store.is_postgres() => "The postgres store could not be used (the store_unavailable log event has the cause); cached tokens keep serving until they expire, and no refresh happens without the fleet lease. Check store.url and the database.".to_owned(),
                _ => "The token store could not be used (the store_unavailable log event has the cause); check store.path, its permissions and free space.".to_owned(),
            },
            retry_after: None,
            status: None,
            error: Some(Reason::StoreUnavailable.as_str().to_owned()),
            error_description: None,
            at: self.clock.wall(),
        }
    }

    pub(super) async fn read_record(&self, store: &Store) -> Result<Option<Record>, Failure> {
        Ok(self.read_record_raw(store).await?.0)
    }

    /// The record if it belongs to this credential, and the identity of
    /// whatever the store holds (what a fenced write must find).
    pub(super) async fn read_record_raw(
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

    pub(super) async fn write_record(
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
    pub(super) async fn adopt_after_fence(
        &self,
        store: &Store,
        ev: &mut RefreshEvent,
    ) -> Result<(), Failure> {
        match self.read_record(store).await? {
            Some(disk) => {
                ev.set_identity(&disk);
                self.adopt(&disk);
                ev.outcome = Outcome::LostRace;
                Ok(())
            }
            None => Err(self.failure_simple(
                Reason::StoreChanged,
                "The stored record changed during the refresh; retrying.",
            )),
        }
    }

    /// Publishes the record's access token when it is still usable. Returns
    /// whether it was (the caller then needs no grant).
    pub(super) fn adopt(&self, rec: &Record) -> bool {
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
            dead: dead.map(|d| Arc::new(self.dead_on_disk(&Reason::parse(&d.reason)))),
        });
        usable && dead.is_none()
    }

    pub(super) fn token_from_record(&self, rec: &Record) -> Option<Token> {
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
        // A stored token of a DPoP credential counts as bound to the
        // record's key (docs/dpop.md).
        let key = self
            .dpop
            .as_ref()
            .and_then(|d| d.key_for(rec.dpop_key.as_ref()));
        Some(
            Token::new(
                access,
                issued,
                sent_mono,
                lifetime,
                rec.family.clone(),
                rec.generation,
            )
            .bound_to(key)
            // Stored under an earlier config, perhaps: checked again.
            .with_fields(self.allowed_fields(rec.token_fields.clone())),
        )
    }

    /// The values this credential's `token_field_hosts` allows; the others
    /// are logged and dropped (docs/routing.md).
    pub(super) fn allowed_fields(
        &self,
        fields: crate::token_fields::Fields,
    ) -> crate::token_fields::Fields {
        crate::token_fields::keep_allowed(&self.name, self.cfg.token_field_hosts.as_deref(), fields)
    }

    /// A token-response value that failed its check steers nothing; the
    /// grant itself stands (docs/routing.md, "Upstreams from the token
    /// response").
    fn note_rejected_fields(&self, set: &TokenSet) {
        for (field, why) in &set.rejected_fields {
            tracing::error!(
                event = "token_field_rejected",
                credential = %self.name,
                field = field.as_str(),
                error = *why,
                hint = "Routes that use this value answer 503 until a token response carries a valid one.",
                "Token response value rejected"
            );
        }
    }

    pub(super) fn warn_refresh_expiry(&self, rec: &Record) {
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
}

/// Whether a `token_type` is one this credential injects: `Bearer`, or one
/// of its `token_types` (the profile's: Slack's `bot` and `user`).
pub(super) fn token_type_injected(cfg: &CredentialConfig, tt: &str) -> bool {
    tt.eq_ignore_ascii_case("bearer") || cfg.token_types.iter().any(|t| t.eq_ignore_ascii_case(tt))
}

/// Where an access token's lifetime (`expires_in` in the log) came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LifetimeSource {
    /// The response's `expires_in`.
    Response,
    /// The access token's own `exp - iat` (a JWT, decoded, not verified).
    Jwt,
    /// RFC 7662 introspection's `exp` (no `expires_in`, `introspection_url` set).
    Introspection,
    /// `default_lifetime` (the config's or the profile's).
    Default,
}

impl LifetimeSource {
    fn as_str(self) -> &'static str {
        match self {
            LifetimeSource::Response => "response",
            LifetimeSource::Jwt => "jwt",
            LifetimeSource::Introspection => "introspection",
            LifetimeSource::Default => "default",
        }
    }
}

/// The fields of the one `token_refresh` event per attempt.
pub(super) struct RefreshEvent {
    grant_type: &'static str,
    outcome: Outcome,
    status: Option<u16>,
    error: Option<String>,
    error_description: Option<String>,
    attempt: u32,
    duration_ms: u64,
    expires_in: Option<u64>,
    expires_in_source: Option<LifetimeSource>,
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
            outcome: Outcome::Ok,
            status: None,
            error: None,
            error_description: None,
            attempt,
            duration_ms: 0,
            expires_in: None,
            expires_in_source: None,
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

    fn ok(&mut self, lifetime: Duration, source: LifetimeSource, rotated: bool) {
        self.outcome = Outcome::Ok;
        self.expires_in = Some(lifetime.as_secs());
        self.expires_in_source = Some(source);
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
                    expires_in_source = self.expires_in_source.map(LifetimeSource::as_str),
                    rotated = self.rotated,
                    family = self.family.as_deref(),
                    generation = self.generation,
                    refresh_token_fp = self.refresh_token_fp.as_deref(),
                    request_id = self.request_id.as_deref(),
                    reason = failure.map(|f| f.reason.as_str()),
                    hint = $hint,
                    $msg
                )
            };
        }
        match failure {
            None if self.outcome == Outcome::LostRace => {
                event!(
                    tracing::Level::INFO,
                    "Adopted a token refreshed elsewhere",
                    "lost_race",
                    None::<&str>
                )
            }
            None => event!(tracing::Level::INFO, "Token refreshed", "ok", None::<&str>),
            Some(f) if f.outcome == Outcome::Transient => {
                event!(
                    tracing::Level::WARN,
                    "Grant failed",
                    f.outcome.as_str(),
                    Some(f.hint.as_str())
                )
            }
            Some(f) => event!(
                tracing::Level::ERROR,
                "Grant failed; credential is dead",
                f.outcome.as_str(),
                Some(f.hint.as_str())
            ),
        }
    }
}
