//! tokenproxy: a sidecar reverse proxy that injects OAuth 2.0 access tokens
//! into plain-HTTP requests from a local service and forwards them over TLS,
//! refreshing the tokens itself without ever reusing a rotated refresh token.
//!
//! # Layout
//!
//! - [`config`]: raw TOML, validation, secret sources. Binds nothing.
//! - [`secret`]: redacting newtypes; no token is a bare `String` elsewhere.
//! - [`token`]: the engine (snapshot, single flight, schedule, state), the
//!   grant client and the store.
//! - [`proxy`]: listeners, router, header hygiene, forwarder, the one table
//!   that maps proxy errors to responses.
//! - [`login`]: PKCE, state, the authorization URL, callback and code
//!   exchange (CLI and admin endpoints); [`discovery`]: RFC 8414 metadata;
//!   [`doctor`]: the checklist that never spends a refresh token.
//! - [`dev`]: a local IdP with strict rotation and an echo upstream, used by
//!   `tokenproxy demo` and by every test.

pub mod admin;
mod admin_client;
pub mod app;
pub mod cli;
pub mod config;
pub mod demo;
pub mod dev;
pub mod discovery;
pub mod doctor;
pub mod egress;
pub mod login;
pub mod metrics;
pub mod proxy;
pub mod secret;
pub mod telemetry;
pub mod tls;
pub mod token;

/// An error and all its causes, `: `-separated. hyper's Display hides the
/// cause, so logs and messages use this.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_chain_walks_sources() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let outer = crate::app::AppError::Bind {
            addr: "127.0.0.1:1".into(),
            source: inner,
        };
        assert_eq!(
            super::error_chain(&outer),
            "cannot listen on 127.0.0.1:1: refused"
        );
    }
}
