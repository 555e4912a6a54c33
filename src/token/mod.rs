//! The token engine: per-credential current-token snapshot, single-flight
//! refresh, schedule, background refresher and state machine; the grant
//! client and the store it uses.
//!
//! The proxy sees it only through [`RouteToken`]: a cheap clonable handle
//! whose fast path is a lock-free read of a prebuilt `HeaderValue`.

pub mod engine;
pub mod file_store;
pub mod grant;
pub mod hints;
pub mod pg;
pub mod reason;
pub mod record;
pub mod schedule;
pub mod seal;
pub mod store;
pub mod transfer;

use crate::config::{Config, CredentialConfig, GrantType, RouteConfig, StoreKind, TokenFormat};
use crate::token_fields as fields;
use arc_swap::ArcSwapOption;
use engine::{Clock, Slot, SlotKind, SlotStatus};
use http::{HeaderValue, Uri};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use store::Store;
use tokio_util::sync::CancellationToken;

/// How long one token-endpoint exchange may take before it counts as lost.
pub const GRANT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a request could not get a token (the proxy answers `503
/// credential_unavailable` with these fields).
#[derive(Debug, Clone)]
pub struct CredentialUnavailable {
    pub credential: String,
    /// Stable machine-readable reason, e.g. `invalid_grant`, `refresh_timeout`.
    pub reason: reason::Reason,
    /// What to do, one sentence, no secrets.
    pub hint: String,
    pub retry_after: Option<Duration>,
}

impl CredentialUnavailable {
    /// A route whose upstream is `{token.NAME}` before any valid token
    /// response has sent that value.
    pub fn field_missing(credential: &str, field: fields::TokenField) -> CredentialUnavailable {
        CredentialUnavailable {
            credential: credential.to_owned(),
            reason: reason::Reason::TokenFieldMissing,
            hint: format!(
                "This route's upstream is {}, and no token response has sent a valid {} yet (an https origin); see the token_field_rejected log event, or run `tokenproxy login` again.",
                field.placeholder(),
                field.as_str()
            ),
            retry_after: None,
        }
    }
}

/// The header value to inject, plus a tag identifying which token it carries
/// (a hash, never the token), for reactive refresh.
#[derive(Clone)]
pub struct Injected {
    pub value: HeaderValue,
    pub tag: u64,
    /// The route's `{token.NAME}` value from this token's response (a
    /// checked origin), when the route's upstream uses one.
    pub origin: Option<Arc<str>>,
    /// Set when the token is DPoP-bound: each request needs its own proof.
    pub dpop: Option<Arc<InjectedDpop>>,
}

/// What a proof for a DPoP-bound token needs, built once per token.
pub struct InjectedDpop {
    pub key: Arc<crate::dpop::DpopKey>,
    /// `ath`: the token's SHA-256, base64url.
    pub ath: String,
    pub nonces: Arc<crate::dpop::Nonces>,
}

impl InjectedDpop {
    /// A fresh proof for one upstream request (RFC 9449 §7.1).
    pub fn proof(
        &self,
        method: &http::Method,
        uri: &Uri,
    ) -> Result<HeaderValue, crate::dpop::ProofError> {
        let nonce = self.nonces.get(uri);
        self.key.proof_header(
            method.as_str(),
            &crate::dpop::htu(uri),
            Some(&self.ath),
            nonce.as_deref(),
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("credential {credential}: cannot find its endpoints")]
    Discovery {
        credential: String,
        #[source]
        source: crate::discovery::DiscoveryError,
    },
    #[error("credential {credential}: a refresh_token credential needs a store")]
    NoStore { credential: String },
    #[error("token store")]
    Store(#[from] store::StoreError),
    #[error("credential {credential}: TLS")]
    Tls {
        credential: String,
        #[source]
        source: crate::tls::TlsError,
    },
}

/// All credentials' engines. Built per config; a reload keeps the slots
/// whose credential did not change, so their state and timers carry over.
pub struct Engine {
    slots: HashMap<SlotKey, Arc<Slot>>,
    /// In credential-name order, for status output.
    order: Vec<Arc<Slot>>,
    clock: Arc<Clock>,
    shutdown: CancellationToken,
    /// Shared by every engine a reload builds from this one.
    drain: Arc<engine::Drain>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SlotKey {
    credential: String,
    scopes: Option<Vec<String>>,
    resource: Option<String>,
}

impl Engine {
    /// Opens the store, consumes new seeds, loads stored tokens and starts
    /// one background refresher per token. Binds nothing.
    pub async fn start(
        config: &Config,
        shutdown: CancellationToken,
    ) -> Result<Engine, EngineError> {
        Self::start_with_clock(config, shutdown, Arc::new(Clock::default())).await
    }

    pub async fn start_with_clock(
        config: &Config,
        shutdown: CancellationToken,
        clock: Arc<Clock>,
    ) -> Result<Engine, EngineError> {
        Self::build(config, None, shutdown, clock).await
    }

    /// The engine for `config`, reusing this one's unchanged slots. Slots
    /// left out are not stopped here: call [`Engine::retire_unused`] once the
    /// new engine is in place.
    pub async fn reload(&self, config: &Config) -> Result<Engine, EngineError> {
        Self::build(
            config,
            Some(self),
            self.shutdown.clone(),
            self.clock.clone(),
        )
        .await
    }

    /// Stops the background work of this engine's slots that `next` does not use.
    pub fn retire_unused(&self, next: &Engine) {
        for (key, slot) in &self.slots {
            let kept = next.slots.get(key).is_some_and(|s| Arc::ptr_eq(s, slot));
            if !kept {
                slot.retire();
            }
        }
    }

    async fn build(
        config: &Config,
        previous: Option<&Engine>,
        shutdown: CancellationToken,
        clock: Arc<Clock>,
    ) -> Result<Engine, EngineError> {
        let needs_store = config
            .credentials
            .values()
            .any(|c| c.grant == GrantType::RefreshToken);
        let drain = previous.map_or_else(Default::default, |p| p.drain.clone());
        let store_key = Store::config_key(&config.store);
        // A reload keeps an open postgres store (its pool and LISTEN
        // connection) when the store config did not change.
        let open_pg = previous.and_then(|p| {
            p.slots
                .values()
                .filter(|s| s.store_key() == Some(store_key.as_str()))
                .find_map(|s| s.store().filter(|st| st.is_postgres()).cloned())
        });
        let store = if needs_store {
            match open_pg {
                Some(s) if config.store.kind == StoreKind::Postgres => Some(s),
                _ => Some(Store::open_config(&config.store).await?),
            }
        } else {
            None
        };
        let mut keys: Vec<SlotKey> = Vec::new();
        for (name, cred) in &config.credentials {
            if cred.grant == GrantType::RefreshToken {
                keys.push(SlotKey {
                    credential: name.clone(),
                    scopes: None,
                    resource: None,
                });
            }
        }
        for route in &config.routes {
            let key = slot_key(config, route);
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        let mut slots = HashMap::new();
        let mut order = Vec::new();
        let mut fresh = Vec::new();
        let egress = crate::egress::proxy_from(config.server.egress_proxy.as_ref());
        for key in keys {
            let Some(cred) = config.credentials.get(&key.credential) else {
                continue;
            };
            let reused = previous
                .and_then(|p| p.slots.get(&key))
                .filter(|s| {
                    *s.cfg == **cred && s.store_key() == store.as_ref().map(|_| store_key.as_str())
                })
                .cloned();
            let slot = match reused {
                Some(s) => {
                    s.retry_config_error_now();
                    s
                }
                None => {
                    let token_url = resolve_token_url(cred, egress.as_ref()).await?;
                    let s = build_slot(
                        cred,
                        token_url,
                        &key,
                        store.as_ref().map(|s| (s, store_key.as_str())),
                        egress.as_ref(),
                        clock.clone(),
                        shutdown.child_token(),
                        drain.clone(),
                    )?;
                    fresh.push(s.clone());
                    s
                }
            };
            order.push(slot.clone());
            slots.insert(key, slot);
        }
        for slot in &fresh {
            if let Err(e) = slot.init_from_store().await {
                for s in &fresh {
                    s.retire();
                }
                return Err(e.into());
            }
        }
        for slot in fresh {
            tokio::spawn(slot.run());
        }
        Ok(Engine {
            slots,
            order,
            clock,
            shutdown,
            drain,
        })
    }

    /// The handle a route injects from.
    pub fn route_token(&self, config: &Config, route: &RouteConfig) -> Option<RouteToken> {
        let slot = self.slots.get(&slot_key(config, route))?.clone();
        Some(RouteToken::new(slot, &route.format, route.upstream_from))
    }

    /// The refresh_token slot of credential `name` (login, manual refresh).
    pub fn slot(&self, name: &str) -> Option<&Arc<Slot>> {
        self.slots.get(&SlotKey {
            credential: name.to_owned(),
            scopes: None,
            resource: None,
        })
    }

    /// Secret-free status of every token.
    pub fn status(&self) -> Vec<SlotStatus> {
        self.order.iter().map(|s| s.status()).collect()
    }

    pub fn clock(&self) -> &Arc<Clock> {
        &self.clock
    }

    /// Refreshes in flight, for shutdown to wait on.
    pub fn drain(&self) -> &Arc<engine::Drain> {
        &self.drain
    }

    /// How long shutdown waits for refreshes in flight: as long as the
    /// slowest credential's grant may take (its own connect_timeout, then
    /// the grant timeout). Cut shorter, an exit could land after the IdP
    /// rotated and before the answer was saved.
    pub fn drain_bound(&self) -> Duration {
        self.slots
            .values()
            .map(|s| s.grant_fence())
            .max()
            .unwrap_or(GRANT_TIMEOUT + grant::CONNECT_TIMEOUT)
    }
}

fn slot_key(config: &Config, route: &RouteConfig) -> SlotKey {
    let cc = config
        .credentials
        .get(&route.credential)
        .is_some_and(|c| c.grant == GrantType::ClientCredentials);
    SlotKey {
        credential: route.credential.clone(),
        scopes: if cc { route.scopes.clone() } else { None },
        resource: if cc { route.resource.clone() } else { None },
    }
}

/// The configured token_url, else the issuer's discovered token endpoint.
async fn resolve_token_url(
    cred: &CredentialConfig,
    egress: Option<&Uri>,
) -> Result<Uri, EngineError> {
    if let Some(u) = &cred.token_url {
        return Ok(u.clone());
    }
    crate::discovery::endpoints(cred, egress)
        .await
        .map(|(t, _)| t)
        .map_err(|source| EngineError::Discovery {
            credential: cred.name.clone(),
            source,
        })
}

#[allow(clippy::too_many_arguments)]
fn build_slot(
    cred: &Arc<CredentialConfig>,
    token_url: Uri,
    key: &SlotKey,
    store: Option<(&Store, &str)>,
    egress: Option<&Uri>,
    clock: Arc<Clock>,
    shutdown: CancellationToken,
    drain: Arc<engine::Drain>,
) -> Result<Arc<Slot>, EngineError> {
    let client_cert = match (&cred.client_cert, &cred.client_key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        _ => None,
    };
    let tls =
        crate::tls::client_config(cred.ca_file.as_deref(), client_cert, &[]).map_err(|source| {
            EngineError::Tls {
                credential: cred.name.clone(),
                source,
            }
        })?;
    let client =
        grant::GrantClient::with_connect_timeout(tls, GRANT_TIMEOUT, cred.connect_timeout, egress);
    let kind = match cred.grant {
        GrantType::RefreshToken => {
            let (store, store_key) = store.ok_or_else(|| EngineError::NoStore {
                credential: cred.name.clone(),
            })?;
            SlotKind::Refresh {
                store: store.clone(),
                store_key: store_key.to_owned(),
            }
        }
        GrantType::ClientCredentials => SlotKind::ClientCredentials {
            scopes: key.scopes.clone().unwrap_or_else(|| cred.scopes.clone()),
            resource: key.resource.clone().or_else(|| cred.resource.clone()),
        },
    };
    Ok(Slot::new(
        cred.clone(),
        token_url,
        kind,
        client,
        clock,
        shutdown,
        drain,
    ))
}

/// A route's view of its credential's token.
#[derive(Clone)]
pub struct RouteToken {
    inner: Arc<RouteTokenInner>,
}

enum RouteTokenInner {
    Fixed {
        credential: String,
        injected: Injected,
    },
    Live {
        slot: Arc<Slot>,
        format: TokenFormat,
        /// The response value the route's upstream comes from.
        field: Option<fields::TokenField>,
        /// The header value for the current token, built once per token.
        cached: ArcSwapOption<Injected>,
    },
}

impl RouteToken {
    fn new(slot: Arc<Slot>, format: &TokenFormat, field: Option<fields::TokenField>) -> RouteToken {
        RouteToken {
            inner: Arc::new(RouteTokenInner::Live {
                slot,
                format: format.clone(),
                field,
                cached: ArcSwapOption::empty(),
            }),
        }
    }

    /// A token that never changes: for tests and benchmarks of the proxy.
    pub fn fixed(credential: &str, mut value: HeaderValue) -> RouteToken {
        value.set_sensitive(true);
        RouteToken {
            inner: Arc::new(RouteTokenInner::Fixed {
                credential: credential.to_owned(),
                injected: Injected {
                    value,
                    tag: 0,
                    dpop: None,
                    origin: None,
                },
            }),
        }
    }

    pub fn credential(&self) -> &str {
        match &*self.inner {
            RouteTokenInner::Fixed { credential, .. } => credential,
            RouteTokenInner::Live { slot, .. } => &slot.name,
        }
    }

    /// The upstream answered a `refresh_on` status to a request that carried
    /// `injected`. Decides (the reactive-refresh rules, docs/routing.md) whether to refresh;
    /// true when a replay with a newer token is worth trying.
    pub fn rejected(
        &self,
        injected: &Injected,
        www_authenticate: Option<&HeaderValue>,
        request_id: Option<&str>,
    ) -> bool {
        let RouteTokenInner::Live { slot, .. } = &*self.inner else {
            return false;
        };
        let challenge = www_authenticate
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if challenge.contains("insufficient_scope") {
            return false;
        }
        let says_invalid = challenge.contains("invalid_token");
        slot.rejected(injected.tag, says_invalid, request_id)
    }

    /// The token to replay a rejected request with: the current one, once a
    /// refresh in flight that may replace `rejected` has settled.
    pub async fn replacement(
        &self,
        rejected: &Injected,
        request_id: Option<&str>,
    ) -> Result<Injected, CredentialUnavailable> {
        if let RouteTokenInner::Live { slot, .. } = &*self.inner {
            slot.wait_replaced(rejected.tag).await;
        }
        self.get_for(request_id).await
    }

    /// The current token's header value. Ready at once when a usable token is
    /// cached; otherwise waits for the single-flight refresh (bounded by the
    /// credential's `refresh_wait`). A refresh this request starts is logged
    /// with its `request_id`.
    pub async fn get_for(
        &self,
        request_id: Option<&str>,
    ) -> Result<Injected, CredentialUnavailable> {
        match &*self.inner {
            RouteTokenInner::Fixed { injected, .. } => Ok(injected.clone()),
            RouteTokenInner::Live {
                slot,
                format,
                field,
                cached,
            } => {
                let token = match slot.usable_token() {
                    Some(t) => t,
                    None => slot.wait_usable(request_id).await?,
                };
                if let Some(c) = &*cached.load() {
                    if c.tag == token.tag {
                        return Ok(Injected::clone(c));
                    }
                }
                let dpop = token.dpop.as_ref().zip(slot.dpop.as_ref()).map(|(key, d)| {
                    Arc::new(InjectedDpop {
                        key: key.clone(),
                        ath: crate::dpop::ath(token.access.expose()),
                        nonces: d.nonces.clone(),
                    })
                });
                // RFC 9449 §7.1: a bound token goes in the DPoP scheme.
                let (prefix, suffix) = match &dpop {
                    Some(_) => ("DPoP ", ""),
                    None => (format.prefix.as_str(), format.suffix.as_str()),
                };
                let mut raw = String::with_capacity(
                    prefix.len() + token.access.expose().len() + suffix.len(),
                );
                raw.push_str(prefix);
                raw.push_str(token.access.expose());
                raw.push_str(suffix);
                let mut value = HeaderValue::from_str(&raw).map_err(|_| CredentialUnavailable {
                    credential: slot.name.clone(),
                    reason: reason::Reason::TokenNotAHeader,
                    hint: "The IdP issued an access token with bytes that cannot go in a header."
                        .into(),
                    retry_after: None,
                })?;
                value.set_sensitive(true);
                let injected = Injected {
                    value,
                    tag: token.tag,
                    dpop,
                    origin: field
                        .and_then(|f| token.fields.get(f.as_str()))
                        .map(|v| Arc::from(v.as_str())),
                };
                cached.store(Some(Arc::new(injected.clone())));
                Ok(injected)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_waits_as_long_as_the_slowest_credential_may_take() {
        let text = r#"
[server]
listen = "127.0.0.1:0"
[credentials.quick]
grant = "client_credentials"
token_url = "http://127.0.0.1:1/token"
client_id = "a"
client_secret = "s"
connect_timeout = "2s"
[credentials.slow]
grant = "client_credentials"
token_url = "http://127.0.0.1:1/token"
client_id = "b"
client_secret = "s"
connect_timeout = "60s"
[[routes]]
path_prefix = "/q/"
upstream = "http://127.0.0.1:2"
credential = "quick"
[[routes]]
path_prefix = "/s/"
upstream = "http://127.0.0.1:2"
credential = "slow"
"#;
        let config = crate::config::parse(text, std::path::Path::new("t.toml"), &|_| None).unwrap();
        let shutdown = CancellationToken::new();
        let engine = Engine::start(&config, shutdown.clone()).await.unwrap();
        // 60 s to connect, 30 s for the answer, 5 s to save it.
        assert_eq!(engine.drain_bound(), Duration::from_secs(95));
        shutdown.cancel();
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use crate::config::{AuthMethod, CredentialConfig, GrantType};
    use crate::secret::Secret;
    use std::time::Duration;

    pub fn credential(name: &str, token_url: &str, method: AuthMethod) -> CredentialConfig {
        CredentialConfig {
            name: name.into(),
            grant: GrantType::RefreshToken,
            token_url: Some(token_url.parse().unwrap()),
            authorize_url: None,
            device_authorization_url: None,
            redirect_uri: None,
            client_id: "client".into(),
            client_secret: Some(Secret::new("sec&ret")),
            client_secret_file: None,
            auth_method: method,
            scopes: vec![],
            refresh_token: None,
            refresh_token_file: None,
            issuer: None,
            audience: None,
            resource: None,
            extra_params: vec![],
            introspection_url: None,
            reuse_grace: Duration::ZERO,
            ca_file: None,
            client_cert: None,
            client_key: None,
            client_assertion: None,
            client_assertion_aud: crate::config::AssertionAud::TokenEndpoint,
            dpop: None,
            refresh_before: None,
            refresh_wait: Duration::from_secs(10),
            max_backoff: Duration::from_secs(60),
            default_lifetime: Duration::from_secs(3600),
            connect_timeout: super::grant::CONNECT_TIMEOUT,
            scope_on_refresh: false,
            refresh_token_lifetime: crate::providers::RefreshLifetime::Idle,
            token_types: vec![],
            provider: None,
            login_params: vec![],
            token_field_hosts: None,
        }
    }
}
