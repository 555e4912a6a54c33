//! The token engine: per-credential current-token snapshot, single-flight
//! refresh, schedule, background refresher and state machine.
//!
//! The proxy sees it only through [`RouteToken`]: a cheap clonable handle
//! whose fast path is a lock-free read of a prebuilt `HeaderValue`.

use http::HeaderValue;
use std::sync::Arc;
use std::time::Duration;

/// Why a request could not get a token (the proxy answers `503
/// credential_unavailable` with these fields).
#[derive(Debug, Clone)]
pub struct CredentialUnavailable {
    pub credential: String,
    /// Stable machine-readable reason, e.g. `invalid_grant`, `refresh_timeout`.
    pub reason: String,
    /// What to do, one sentence, no secrets.
    pub hint: String,
    pub retry_after: Option<Duration>,
}

/// The header value to inject, plus a tag identifying which token it carries
/// (a hash, never the token), for reactive refresh.
#[derive(Clone)]
pub struct Injected {
    pub value: HeaderValue,
    pub tag: u64,
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
}

impl RouteToken {
    /// A token that never changes: for tests and benchmarks of the proxy.
    pub fn fixed(credential: &str, mut value: HeaderValue) -> RouteToken {
        value.set_sensitive(true);
        RouteToken {
            inner: Arc::new(RouteTokenInner::Fixed {
                credential: credential.to_owned(),
                injected: Injected { value, tag: 0 },
            }),
        }
    }

    pub fn credential(&self) -> &str {
        match &*self.inner {
            RouteTokenInner::Fixed { credential, .. } => credential,
        }
    }

    /// The current token's header value. Ready at once when a usable token is
    /// cached; otherwise waits for the single-flight refresh (bounded by the
    /// credential's `refresh_wait`).
    pub async fn get(&self) -> Result<Injected, CredentialUnavailable> {
        match &*self.inner {
            RouteTokenInner::Fixed { injected, .. } => Ok(injected.clone()),
        }
    }
}
