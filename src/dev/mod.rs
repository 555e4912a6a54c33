//! Dev servers: a local OAuth identity provider with strict refresh-token
//! rotation, reuse detection and fault injection ([`DevIdp`]), and an echo
//! upstream that checks tokens and reports what it received
//! ([`EchoUpstream`]). Used by `tokenproxy demo` and by every integration
//! test as the judge, so both are strict and record everything.
//!
//! Owns only these two servers, their tiny serve loop and a fixed test PKI
//! ([`tls`]). It stands alone: it must not depend on the token, proxy or
//! config modules (they are what it judges). Secrets are plain `String`s here
//! (a test IdP) but are never logged.
//!
//! # Layout
//!
//! - `idp`: [`DevIdp`], [`IdpOptions`], [`DevClient`], [`Fault`], [`Hold`],
//!   [`GrantRecord`].
//! - `echo`: [`EchoUpstream`], [`TokenCheck`]; its doc lists the special paths.
//! - `serve`: accept loop, optional TLS, HTTP/1.1 + HTTP/2, a per-connection
//!   kill switch (for faults that hang up) and stop/restart.
//! - [`tls`]: a CA and a `127.0.0.1` certificate for TLS upstream tests.
//!
//! # Example
//!
//! ```no_run
//! use tokenproxy::dev::{DevIdp, EchoUpstream, Fault, IdpOptions};
//! # async fn demo() -> std::io::Result<()> {
//! let local = "127.0.0.1:0".parse().unwrap();
//! let idp = DevIdp::start(local, IdpOptions::default()).await?;
//! let echo = EchoUpstream::start(local, idp.token_check()).await?;
//! let seed = idp.issue_refresh_token("demo-client", "alice");
//! idp.push_fault(Fault::ResetAfterProcessing); // the next /token answer is lost
//! // ... run the proxy against idp.token_url() and echo.url() with `seed` ...
//! assert_eq!(idp.reuse_count(), 0, "a rotated refresh token came back");
//! # Ok(()) }
//! ```

mod echo;
mod idp;
mod serve;
pub mod tls;

pub use echo::{DpopBinding, EchoUpstream, TokenCheck};
pub use idp::{DevClient, DevIdp, Dialect, Fault, Federated, GrantRecord, Hold, IdpOptions};

#[cfg(test)]
mod tests;
