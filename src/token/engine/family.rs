//! Families and seeds: start-up from the store (a seed is consumed once,
//! whatever the endpoint's spelling), and logins installed as new families.

use super::*;
use crate::token::reason::Reason;

impl Slot {
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
                    token_fields: Default::default(),
                    seeds_seen,
                    intent: None,
                    dead: None,
                    updated_at_ms: 0,
                    // A new family may keep the key (docs/dpop.md).
                    dpop_key: rec.as_ref().and_then(|r| r.dpop_key.clone()),
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
                tracing::error!(event = "token_refresh", credential = %self.name, grant_type = "refresh_token", outcome = "invalid_grant", error = Reason::NoRefreshToken.as_str(), hint = %f.hint, "No refresh token");
                self.publish(Snapshot {
                    token: None,
                    dead: Some(Arc::new(f)),
                });
            }
        }
        Ok(())
    }
}

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

/// Bootstrap (docs/getting-started.md, "Logging in"): writes a login's token set as a new family, under
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
        // A type this credential does not inject is never stored: the first
        // refresh then says why (token_type_unsupported).
        access_token: (set.dpop_bound
            || set
                .token_type
                .as_deref()
                .is_none_or(|t| super::refresh::token_type_injected(cfg, t)))
        .then(|| set.access_token.clone()),
        access_expires_at_ms: Some(store::unix_ms(sent_wall + lifetime)),
        access_issued_at_ms: Some(store::unix_ms(sent_wall)),
        refresh_expires_at_ms: set
            .refresh_token_expires_in
            .map(|d| store::unix_ms(sent_wall + d)),
        token_fields: crate::token_fields::keep_allowed(
            &cfg.name,
            cfg.token_field_hosts.as_deref(),
            set.fields.clone(),
        ),
        seeds_seen,
        intent: None,
        dead: None,
        updated_at_ms: 0,
        dpop_key: set.dpop_key.clone(),
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
}
