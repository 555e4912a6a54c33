//! The store model shared by both stores (file and postgres): the record of
//! one credential, its write-ahead intent and dead mark, the store errors,
//! and how endpoints, times and families are written. Knows no store.

use super::seal::UnsealError;
use crate::secret::Secret;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The on-disk state of one credential.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub token_url: String,
    pub client_id: String,
    /// Random, new for every login, import or newly adopted seed.
    pub family: String,
    /// +1 per successful refresh within the family.
    pub generation: u64,
    #[serde(with = "opt_secret")]
    pub refresh_token: Option<Secret>,
    #[serde(with = "opt_secret", default)]
    pub access_token: Option<Secret>,
    /// Wall-clock expiry of `access_token`, Unix milliseconds.
    #[serde(default)]
    pub access_expires_at_ms: Option<u64>,
    /// When `access_token` was requested, Unix milliseconds.
    #[serde(default)]
    pub access_issued_at_ms: Option<u64>,
    #[serde(default)]
    pub refresh_expires_at_ms: Option<u64>,
    /// Checked values of the latest token response that routes may use
    /// (`{token.instance_url}`), so a restart knows them before a refresh.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub token_fields: crate::token_fields::Fields,
    /// Fingerprints of every config seed this store has consumed.
    #[serde(default)]
    pub seeds_seen: Vec<String>,
    /// Write-ahead intent: this (family, generation) is being presented.
    #[serde(default)]
    pub intent: Option<Intent>,
    /// Set when the credential died; cleared by a new family.
    #[serde(default)]
    pub dead: Option<DeadMark>,
    #[serde(default)]
    pub updated_at_ms: u64,
    /// The generated DPoP key (PKCS#8, base64url) the token set is bound
    /// to (docs/dpop.md); `None` without `dpop` or with `dpop_key`. A
    /// secret: sealed with the rest when the store is encrypted.
    #[serde(with = "opt_secret", default, skip_serializing_if = "Option::is_none")]
    pub dpop_key: Option<Secret>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Intent {
    pub family: String,
    pub generation: u64,
    pub at_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeadMark {
    pub family: String,
    pub generation: u64,
    pub reason: String,
}

impl Record {
    /// A record belongs to a credential only while its endpoint and client
    /// match; endpoints are compared normalised, so two spellings of one
    /// URL share one family.
    pub fn matches(&self, token_url: &str, client_id: &str) -> bool {
        self.client_id == client_id
            && normalize_endpoint(&self.token_url) == normalize_endpoint(token_url)
    }

    /// Whether this store has already consumed `seed` (by fingerprint): a
    /// consumed seed is never presented again, whatever the endpoint.
    pub fn has_seen_seed(&self, seed: &Secret) -> bool {
        self.seeds_seen.contains(&seed.fingerprint()) || self.refresh_token.as_ref() == Some(seed)
    }

    pub fn identity(&self) -> (&str, u64) {
        (&self.family, self.generation)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read token store {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("token store {path} is not valid JSON (fix or move it away; it is never overwritten while unreadable)")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("token store {path} was written by a newer tokenproxy (layout {found}; this one knows up to {known}): upgrade tokenproxy")]
    LayoutTooNew {
        path: PathBuf,
        found: u32,
        known: u32,
    },
    #[error("token store file {path} holds credential {name:?}, not the one its name says (move it back or away)")]
    Misfiled { path: PathBuf, name: String },
    #[error("cannot write token store {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("token store {path} is encrypted and cannot be opened with the configured keys (it is never overwritten while unreadable)")]
    Decrypt {
        path: PathBuf,
        #[source]
        source: UnsealError,
    },
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("store.url: {message}")]
    Url { message: String },
    #[error("postgres store")]
    Db {
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("postgres store did not answer in time")]
    DbTimeout,
    #[error("postgres store schema version {found} is newer than this tokenproxy knows ({known}); upgrade tokenproxy")]
    SchemaTooNew { found: i32, known: i32 },
    #[error("credential {name} changed in the store meanwhile (fenced write refused)")]
    Fenced { name: String },
    #[error("credential {name}: another replica has held the refresh lease for over a minute")]
    LeaseBusy { name: String },
    #[error("credential {name}: its stored tokens are encrypted and cannot be opened with the configured keys (the row is never overwritten while unreadable)")]
    DecryptColumn {
        name: String,
        #[source]
        source: UnsealError,
    },
    #[error("store rekey needs store.encryption_key (the key to seal under)")]
    RekeyWithoutKey,
    #[error("credential {name}: stored {message}")]
    Column { name: String, message: String },
}

/// What `rekey` did.
#[derive(Debug, Default)]
pub struct Rekeyed {
    /// The key id everything is now sealed under.
    pub key_id: String,
    /// Records rewritten under the current key.
    pub resealed: Vec<String>,
    /// Records already sealed under the current key.
    pub unchanged: Vec<String>,
    /// Records left as they were, and why.
    pub failed: Vec<(String, StoreError)>,
}

/// A token endpoint as compared between config and store: scheme and host
/// in lower case, the default port left out, every loopback name as one,
/// no trailing slash. Anything unparsable compares as written.
pub fn normalize_endpoint(url: &str) -> String {
    let Ok(uri) = url.trim().parse::<http::Uri>() else {
        return url.to_owned();
    };
    let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
        return url.to_owned();
    };
    let scheme = scheme.to_ascii_lowercase();
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    let loopback = host == "localhost"
        || host.ends_with(".localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let host = if loopback {
        "loopback".to_owned()
    } else {
        host
    };
    let default_port = match scheme.as_str() {
        "https" => Some(443),
        "http" => Some(80),
        _ => None,
    };
    let port = uri
        .port_u16()
        .filter(|p| Some(*p) != default_port)
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let path = uri.path().trim_end_matches('/');
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    format!("{scheme}://{host}{port}{path}{query}")
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

pub fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A new random family id.
pub fn new_family() -> String {
    format!("{:016x}", rand::random::<u64>())
}

mod opt_secret {
    use crate::secret::Secret;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Secret>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(secret) => s.serialize_some(secret.expose()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
        Ok(Option::<String>::deserialize(d)?.map(Secret::new))
    }
}
