//! Dev servers: a local OAuth identity provider with strict refresh-token
//! rotation, reuse detection and fault injection ([`DevIdp`]), and an echo
//! upstream that checks tokens and reports what it received
//! ([`EchoUpstream`]). Used by `tokenproxy demo` and by every integration
//! test as the judge, so both are strict and record everything.
//!
//! Owns only these two servers and their tiny serve loop. It stands alone: it
//! must not depend on the token, proxy or config modules (they are what it
//! judges). Secrets are plain `String`s here (a test IdP) but are never logged.

mod echo;
mod idp;
mod serve;
pub mod tls;

pub use echo::{EchoUpstream, TokenCheck};
pub use idp::{DevClient, DevIdp, Fault, GrantRecord, Hold, IdpOptions};

#[cfg(test)]
mod tests;
