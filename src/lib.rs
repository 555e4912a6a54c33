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
//! - [`dev`]: a local IdP with strict rotation and an echo upstream, used by
//!   `tokenproxy demo` and by every test.

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod demo;
pub mod dev;
pub mod proxy;
pub mod secret;
pub mod telemetry;
pub mod tls;
pub mod token;
