//! The TOML file as written: serde structs mirroring DESIGN.md's schema, one
//! per table, every key optional so that a missing key is reported by
//! validation (with a location) rather than by serde (without one).
//!
//! Nothing here interprets a value: strings stay strings until `validate`
//! expands `${VAR}`s and parses them.

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub server: Option<RawServer>,
    pub admin: Option<RawAdmin>,
    pub store: Option<RawStore>,
    pub log: Option<RawLog>,
    /// A BTreeMap: credential names come back sorted, which keeps messages stable.
    pub credentials: Option<BTreeMap<String, RawCredential>>,
    pub routes: Option<Vec<RawRoute>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<OneOrMany>,
    pub hosts: Option<Vec<String>>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub worker_threads: Option<i64>,
    pub max_connections: Option<i64>,
    pub shutdown_grace: Option<String>,
    pub header_read_timeout: Option<String>,
    pub keepalive_timeout: Option<String>,
    pub max_header_bytes: Option<RawSize>,
    pub max_headers: Option<i64>,
    pub egress_proxy: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub token: Option<String>,
    pub ready_requires_tokens: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub kind: Option<String>,
    pub path: Option<String>,
    pub url: Option<String>,
    pub encryption_key: Option<String>,
    pub previous_encryption_keys: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub level: Option<String>,
    pub access: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCredential {
    pub grant: Option<String>,
    pub token_url: Option<String>,
    pub authorize_url: Option<String>,
    pub device_authorization_url: Option<String>,
    pub redirect_uri: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub client_secret_file: Option<String>,
    pub auth_method: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub refresh_token: Option<String>,
    pub refresh_token_file: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub resource: Option<String>,
    pub extra_params: Option<BTreeMap<String, String>>,
    pub introspection_url: Option<String>,
    pub reuse_grace: Option<String>,
    pub ca_file: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    pub client_assertion_key: Option<String>,
    pub client_assertion_alg: Option<String>,
    pub client_assertion_kid: Option<String>,
    pub client_assertion_cert: Option<String>,
    pub client_assertion_aud: Option<String>,
    pub client_assertion_file: Option<String>,
    pub dpop: Option<bool>,
    pub dpop_key: Option<String>,
    pub refresh_before: Option<String>,
    pub refresh_wait: Option<String>,
    pub max_backoff: Option<String>,
    pub default_lifetime: Option<String>,
    pub connect_timeout: Option<String>,
    pub provider: Option<String>,
    pub tenant: Option<String>,
    pub domain: Option<String>,
    pub realm: Option<String>,
    pub scope_on_refresh: Option<bool>,
    pub refresh_token_lifetime: Option<String>,
    pub token_types: Option<Vec<String>>,
    pub token_field_hosts: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub path_prefix: Option<String>,
    pub host: Option<String>,
    pub upstream: Option<String>,
    pub credential: Option<String>,
    pub strip_prefix: Option<bool>,
    pub header: Option<String>,
    pub format: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub resource: Option<String>,
    pub refresh_on: Option<Vec<i64>>,
    pub replay: Option<bool>,
    pub replay_max_body: Option<RawSize>,
    pub connect_timeout: Option<String>,
    pub response_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub upgrades: Option<bool>,
    pub ca_file: Option<String>,
    pub allow_plaintext: Option<bool>,
}

/// `listen = "a"` or `listen = ["a", "b"]`. Hand-written rather than
/// `#[serde(untagged)]`, whose error ("did not match any variant") says
/// nothing useful.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneOrMany {
    pub items: Vec<String>,
    /// Written as a list: element paths get an index (`listen[1]`).
    pub list: bool,
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany {
                    items: vec![v.to_owned()],
                    list: false,
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut items = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    items.push(s);
                }
                Ok(OneOrMany { items, list: true })
            }
        }
        d.deserialize_any(V)
    }
}

/// A size: `"64KiB"` or a plain integer of bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawSize {
    Text(String),
    Bytes(i64),
}

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"64KiB\" or a number of bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSize, E> {
                Ok(RawSize::Text(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawSize, E> {
                i64::try_from(v)
                    .map(RawSize::Bytes)
                    .map_err(|_| E::custom("size too large"))
            }
        }
        d.deserialize_any(V)
    }
}
