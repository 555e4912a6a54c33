//! Configuration: the raw TOML structs, validation, defaults and secret
//! sources, producing the validated [`Config`] below.
//!
//! Binds nothing, calls nothing over the network. Every error names the file,
//! line, column and key path, and validation collects all errors before it
//! fails. Secrets are resolved (`${VAR}`, `*_file`) into [`Secret`]s here and
//! never printed.

use crate::secret::Secret;
use http::{HeaderName, Uri};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The validated configuration. Everything the rest of the program reads.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was loaded from (errors and reloads name it).
    pub source: PathBuf,
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub store: StoreConfig,
    pub log: LogConfig,
    /// By credential name.
    pub credentials: BTreeMap<String, Arc<CredentialConfig>>,
    /// In file order.
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    /// `unix:/run/tp.sock`
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Default `["127.0.0.1:8080"]`.
    pub listen: Vec<ListenAddr>,
    /// Host values accepted besides loopback names and listen addresses,
    /// lower-cased, without port.
    pub hosts: Vec<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Default 2.
    pub worker_threads: usize,
    /// Default 10000.
    pub max_connections: usize,
    /// Default 20s.
    pub shutdown_grace: Duration,
    pub egress_proxy: Option<Uri>,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Default `127.0.0.1:9901`.
    pub listen: ListenAddr,
    pub token: Option<Secret>,
    /// Default false.
    pub ready_requires_tokens: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    File,
    Postgres,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// File store path, resolved relative to the config file's directory.
    /// Default `tokens.json`.
    pub path: PathBuf,
    pub url: Option<Secret>,
    pub encryption_key: Option<Secret>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Default json.
    pub format: LogFormat,
    /// An `EnvFilter` directive; default `info`.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantType {
    RefreshToken,
    ClientCredentials,
}

impl GrantType {
    /// The RFC 6749 `grant_type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            GrantType::RefreshToken => "refresh_token",
            GrantType::ClientCredentials => "client_credentials",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    ClientSecretBasic,
    ClientSecretPost,
    None,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::ClientSecretBasic => "client_secret_basic",
            AuthMethod::ClientSecretPost => "client_secret_post",
            AuthMethod::None => "none",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CredentialConfig {
    pub name: String,
    pub grant: GrantType,
    /// Required unless `issuer` is set (discovery fills it then).
    pub token_url: Option<Uri>,
    pub authorize_url: Option<Uri>,
    pub redirect_uri: Option<String>,
    pub client_id: String,
    /// From `client_secret` or `client_secret_file`.
    pub client_secret: Option<Secret>,
    /// Watched for changes when set.
    pub client_secret_file: Option<PathBuf>,
    pub auth_method: AuthMethod,
    pub scopes: Vec<String>,
    /// The seed (see DESIGN.md "Seeds").
    pub refresh_token: Option<Secret>,
    pub refresh_token_file: Option<PathBuf>,
    pub issuer: Option<Uri>,
    pub audience: Option<String>,
    pub resource: Option<String>,
    /// In key order.
    pub extra_params: Vec<(String, String)>,
    pub introspection_url: Option<Uri>,
    /// Default 0s.
    pub reuse_grace: Duration,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// None: DESIGN.md's default (max(30s, 10% of lifetime), ≤ half).
    pub refresh_before: Option<Duration>,
    /// Default 10s.
    pub refresh_wait: Duration,
    /// Default 60s.
    pub max_backoff: Duration,
    /// Default 1h.
    pub default_lifetime: Duration,
}

/// `format = "Bearer {token}"`, split around the one `{token}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFormat {
    pub prefix: String,
    pub suffix: String,
}

impl Default for TokenFormat {
    fn default() -> Self {
        TokenFormat {
            prefix: "Bearer ".into(),
            suffix: String::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Starts and ends with `/` after validation ("/github" becomes "/github/").
    pub path_prefix: String,
    /// Lower-cased, without port.
    pub host: Option<String>,
    /// http or https, with authority; its path is the base path requests go under.
    pub upstream: Uri,
    pub credential: String,
    /// Default true.
    pub strip_prefix: bool,
    /// Default `authorization`.
    pub header: HeaderName,
    pub format: TokenFormat,
    /// client_credentials only: per-route token.
    pub scopes: Option<Vec<String>>,
    pub resource: Option<String>,
    /// Default `[401]`.
    pub refresh_on: Vec<u16>,
    /// Default true.
    pub replay: bool,
    /// Default 64 KiB.
    pub replay_max_body: u64,
    /// Default 5s.
    pub connect_timeout: Duration,
    /// Default 60s.
    pub response_timeout: Duration,
    /// Default 60s.
    pub idle_timeout: Duration,
    /// Default false.
    pub upgrades: bool,
    pub ca_file: Option<PathBuf>,
    /// Default false.
    pub allow_plaintext: bool,
}

/// One configuration error, located in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the error is not tied to a place (e.g. unreadable file).
    pub line: usize,
    pub col: usize,
    /// Dotted key path, e.g. `routes[2].credential` or `credentials.github.token_url`.
    pub key: String,
    pub message: String,
}

/// All errors found in one load, in file order.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);
