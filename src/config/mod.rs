//! Configuration: the raw TOML structs, validation, defaults and secret
//! sources, producing the validated [`Config`] below.
//!
//! Binds nothing, calls nothing over the network. Every error names the file,
//! line, column and key path, and validation collects all errors before it
//! fails. Secrets are resolved (`${VAR}`, `*_file`) into [`Secret`]s here and
//! never printed.
//!
//! Entry points: [`load`], [`parse`], [`Config::summary`]. Inside: `raw` (the
//! serde structs), `locate` (key path → line/column), `units` (`${VAR}`,
//! durations, sizes), `validate` (raw → [`Config`], all the checks).

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
    /// Default 10s: a client must send its request head within this.
    pub header_read_timeout: Duration,
    /// Default 75s (nginx's): an idle keep-alive connection is closed after
    /// this long without a request.
    pub keepalive_timeout: Duration,
    /// Default 64 KiB: a bigger request head gets `431` (HTTP/1) and bounds
    /// the header list on HTTP/2.
    pub max_header_bytes: usize,
    /// Default 100: more header fields get `431` (HTTP/1).
    pub max_headers: usize,
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
    /// Seals every write (AES-256-GCM); see `token::seal` for how the key is derived.
    pub encryption_key: Option<Secret>,
    /// Still open values sealed under them (key rotation); never seal.
    pub previous_encryption_keys: Vec<Secret>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Default json, or pretty when stderr is a terminal.
    pub format: LogFormat,
    /// An `EnvFilter` directive; default `info`.
    pub level: String,
    /// One info line per request (route, method, path without query,
    /// status, durations). Default false.
    pub access: bool,
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

/// How the client authenticates at the token endpoint (RFC 6749 §2.3,
/// RFC 7523 §2.2, RFC 8705 §2; docs/client-authentication.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    ClientSecretBasic,
    ClientSecretPost,
    None,
    PrivateKeyJwt,
    ClientSecretJwt,
    TlsClientAuth,
    SelfSignedTlsClientAuth,
}

impl AuthMethod {
    pub const ALL: [AuthMethod; 7] = [
        AuthMethod::ClientSecretBasic,
        AuthMethod::ClientSecretPost,
        AuthMethod::None,
        AuthMethod::PrivateKeyJwt,
        AuthMethod::ClientSecretJwt,
        AuthMethod::TlsClientAuth,
        AuthMethod::SelfSignedTlsClientAuth,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::ClientSecretBasic => "client_secret_basic",
            AuthMethod::ClientSecretPost => "client_secret_post",
            AuthMethod::None => "none",
            AuthMethod::PrivateKeyJwt => "private_key_jwt",
            AuthMethod::ClientSecretJwt => "client_secret_jwt",
            AuthMethod::TlsClientAuth => "tls_client_auth",
            AuthMethod::SelfSignedTlsClientAuth => "self_signed_tls_client_auth",
        }
    }

    /// RFC 8705 §2: the TLS client certificate is the credential.
    pub fn is_mtls(self) -> bool {
        matches!(
            self,
            AuthMethod::TlsClientAuth | AuthMethod::SelfSignedTlsClientAuth
        )
    }

    /// Whether the method sends `client_secret` (or signs with it).
    pub fn uses_secret(self) -> bool {
        matches!(
            self,
            AuthMethod::ClientSecretBasic
                | AuthMethod::ClientSecretPost
                | AuthMethod::ClientSecretJwt
        )
    }
}

/// Where a `private_key_jwt` assertion comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum AssertionSource {
    /// `client_assertion_key` (+ `_alg`, `_kid`, `_cert`): signed here per
    /// request. The file is watched; a change reloads the credential.
    Key {
        key: crate::assertion::SigningKey,
        path: PathBuf,
        cert: Option<PathBuf>,
    },
    /// `client_assertion_file`: a JWT someone else signs and rotates,
    /// read for each token request.
    File(PathBuf),
}

/// Which key DPoP proofs are signed with (docs/dpop.md).
#[derive(Debug, Clone, PartialEq)]
pub enum DpopSource {
    /// A P-256 key generated once and kept in the store with the token set
    /// (in memory only for client_credentials, whose tokens are too).
    Generated,
    /// `dpop_key`: loaded and proven at config load; the file is watched.
    File {
        key: std::sync::Arc<crate::dpop::DpopKey>,
        path: PathBuf,
    },
}

/// The `aud` of an assertion tokenproxy signs (`client_assertion_aud`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssertionAud {
    /// The token endpoint URL (default; what Entra and Okta require).
    TokenEndpoint,
    /// The credential's `issuer` (FAPI 2.0, the RFC 7523 update).
    Issuer,
    Url(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct CredentialConfig {
    pub name: String,
    pub grant: GrantType,
    /// Required unless `issuer` is set (discovery fills it then).
    pub token_url: Option<Uri>,
    pub authorize_url: Option<Uri>,
    /// RFC 8628 device authorization endpoint (`tokenproxy login --device`);
    /// from discovery when unset.
    pub device_authorization_url: Option<Uri>,
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
    /// `private_key_jwt` only.
    pub client_assertion: Option<AssertionSource>,
    /// `private_key_jwt` and `client_secret_jwt`.
    pub client_assertion_aud: AssertionAud,
    /// `dpop = true` (RFC 9449): tokens bound to this key.
    pub dpop: Option<DpopSource>,
    /// None: DESIGN.md's default (max(30s, 10% of lifetime), ≤ half).
    pub refresh_before: Option<Duration>,
    /// Default 10s.
    pub refresh_wait: Duration,
    /// Default 60s.
    pub max_backoff: Duration,
    /// Default 1h.
    pub default_lifetime: Duration,
    /// DNS, TCP, egress CONNECT and TLS to the token endpoint. Default 10s.
    pub connect_timeout: Duration,
    /// Send `scopes` again on every refresh (Microsoft requires it).
    /// Default false, or the provider profile's.
    pub scope_on_refresh: bool,
    /// Whether a refresh restarts the refresh token's own lifetime (then
    /// the engine keeps it alive). Default idle, or the profile's.
    pub refresh_token_lifetime: crate::providers::RefreshLifetime,
    /// `token_type` values injected besides `Bearer`, lower-cased. Default
    /// the profile's (Slack: `bot`, `user`).
    pub token_types: Vec<String>,
    /// The hosts `{token.NAME}` values may name (`.example.com`: any
    /// subdomain; else that host), lower-cased; loopback is always
    /// allowed. `None`: any https origin. Default the profile's.
    pub token_field_hosts: Option<Vec<String>>,
    /// The provider profile that filled unset keys (docs/providers.md).
    pub provider: Option<&'static crate::providers::Profile>,
    /// Extra authorization-request parameters from the profile (Google's
    /// `access_type=offline`), sent by `login`.
    pub login_params: Vec<(String, String)>,
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
    /// http or https, with authority; its path is the base path requests go
    /// under. With `upstream_from`: the path only (the origin comes from
    /// the token response).
    pub upstream: Uri,
    /// `upstream = "{token.NAME}/path"`: the origin is that value of the
    /// credential's latest token response.
    pub upstream_from: Option<crate::token_fields::TokenField>,
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

impl RouteConfig {
    /// The upstream as configured, without `user:password@`.
    pub fn upstream_display(&self) -> String {
        match self.upstream_from {
            Some(f) => format!("{{token.{}}}{}", f.as_str(), self.upstream.path()),
            None => redact_userinfo(&self.upstream),
        }
    }
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

mod locate;
mod raw;
#[cfg(test)]
mod tests;
mod units;
mod validate;

pub use units::{parse_duration, parse_size};
pub use validate::{is_loopback_host, parse_format, parse_listen};

use std::fmt;
use std::path::Path;

impl fmt::Display for ConfigError {
    /// `file:line:col: key: message`, the shape editors and CI annotate.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.col)?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

/// Default `connect_timeout` of a credential: DNS, TCP, the egress proxy's
/// CONNECT and the TLS handshake to the token endpoint.
pub const TOKEN_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads and validates the config file, expanding `${VAR}` from the process
/// environment.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: 0,
        col: 0,
        key: String::new(),
        message: format!("cannot read the config file: {e}"),
    })?;
    parse(&text, path, &|k| std::env::var(k).ok())
}

/// Validates config `text`. `source` names the file in messages, and relative
/// paths (`store.path`, `*_file`, `ca_file`, ...) resolve against its
/// directory. `env` supplies `${VAR}` values. Reads `*_file` secrets; nothing
/// else touches the outside world.
pub fn parse(
    text: &str,
    source: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let located = |offset: Option<usize>, key: String, message: String| {
        let (line, col) = offset.map_or((0, 0), |o| locate::line_col(text, o));
        ConfigError {
            file: source.to_path_buf(),
            line,
            col,
            key,
            message,
        }
    };
    let doc = toml_edit::ImDocument::parse(text).map_err(|e| {
        located(
            e.span().map(|s| s.start),
            String::new(),
            format!(
                "TOML syntax error: {}",
                e.message().trim_end().replace('\n', "; ")
            ),
        )
    })?;
    let index = locate::Index::build(&doc);

    // serde stops at the first error; to report them all, blank out the
    // offending entry (offsets unchanged) and deserialize again.
    let mut errors = Vec::new();
    let mut serde_paths: Vec<String> = Vec::new();
    let mut masked = text.to_owned();
    let mut raw = None;
    // serde would read `[[server]]` as a struct in sequence form and blame
    // its first field; say what is wrong instead.
    for k in ["server", "admin", "store", "log"] {
        if doc
            .get(k)
            .is_some_and(|i| i.is_array_of_tables() || i.is_array())
        {
            errors.push(located(
                index.offset_of(k),
                k.to_owned(),
                format!("expected one [{k}] table, not a list"),
            ));
            serde_paths.push(k.to_owned());
            masked = locate::mask(&masked, &index.blank_of(k));
        }
    }
    for _ in 0..64 {
        match toml::from_str::<raw::RawConfig>(&masked) {
            Ok(r) => {
                raw = Some(r);
                break;
            }
            Err(e) => {
                let offset = e.span().map(|s| s.start);
                let key = offset
                    .and_then(|o| index.path_at(o))
                    .unwrap_or_default()
                    .to_owned();
                let mut message = serde_message(e.message());
                if key == "routes" {
                    message.push_str(" (write a [[routes]] table for each route)");
                }
                errors.push(located(offset, key.clone(), message));
                serde_paths.push(key);
                let blank = offset.map(|o| index.blank_at(o)).unwrap_or_default();
                let next = locate::mask(&masked, &blank);
                if blank.is_empty()
                    || next == masked
                    || toml_edit::ImDocument::parse(next.as_str()).is_err()
                {
                    break;
                }
                masked = next;
            }
        }
    }

    let config = raw.map(|raw| {
        let mut cx = validate::Ctx {
            file: source,
            text,
            index: &index,
            env,
            base_dir: source.parent().map(Path::to_path_buf).unwrap_or_default(),
            errors: Vec::new(),
        };
        let config = validate::validate(raw, &mut cx);
        // A key serde already rejected was blanked: don't also call it missing.
        errors.extend(cx.errors.into_iter().filter(|e| {
            !serde_paths.iter().any(|p| {
                !p.is_empty()
                    && (e.key == *p
                        || e.key.starts_with(&format!("{p}."))
                        || e.key.starts_with(&format!("{p}[")))
            })
        }));
        config
    });

    match config {
        Some(c) if errors.is_empty() => Ok(c),
        _ => {
            errors.sort_by_key(|e| (e.line, e.col));
            Err(ConfigErrors(errors))
        }
    }
}

/// serde's wording, in the file's terms, with a suggestion for a misspelt key.
fn serde_message(m: &str) -> String {
    let m = m.trim_end();
    if let Some(rest) = m.strip_prefix("unknown field `") {
        if let Some((key, expected)) = rest.split_once("`, expected one of ") {
            let options: Vec<&str> = expected.split(", ").map(|o| o.trim_matches('`')).collect();
            let hint = options
                .iter()
                .filter(|o| edit_distance(key, o) <= 2)
                .min_by_key(|o| edit_distance(key, o))
                .map_or(String::new(), |o| format!(" (did you mean {o:?}?)"));
            return format!(
                "unknown key {key:?}{hint}; expected one of: {}",
                options.join(", ")
            );
        }
    }
    m.replace("unknown field", "unknown key")
        .replace("missing field", "missing key")
        .replace("expected i64", "expected an integer")
        .replace("expected a sequence", "expected a list")
        .replace("expected a map", "expected a table")
        .replace("expected struct RawConfig", "expected a table")
        .replace("expected struct RawServer", "expected a table")
        .replace("expected struct RawAdmin", "expected a table")
        .replace("expected struct RawStore", "expected a table")
        .replace("expected struct RawLog", "expected a table")
        .replace("expected struct RawCredential", "expected a table")
        .replace("expected struct RawRoute", "expected a table")
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

impl Config {
    /// What `tokenproxy check` prints: every listener, credential and route,
    /// and whether each secret is set, never a secret itself.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let set = |b: bool| if b { "set" } else { "not set" };
        let mut s = String::new();
        let listen: Vec<String> = self.server.listen.iter().map(ToString::to_string).collect();
        let _ = writeln!(s, "config: {}", self.source.display());
        let _ = writeln!(
            s,
            "listen: {} (worker_threads {}, max_connections {}, tls {})",
            listen.join(", "),
            self.server.worker_threads,
            self.server.max_connections,
            if self.server.tls_cert.is_some() {
                "on"
            } else {
                "off"
            },
        );
        if !self.server.hosts.is_empty() {
            let _ = writeln!(s, "hosts: {}", self.server.hosts.join(", "));
        }
        if let Some(p) = &self.server.egress_proxy {
            let _ = writeln!(s, "egress_proxy: {}", redact_userinfo(p));
        }
        let _ = writeln!(
            s,
            "admin: {} (token {}, ready_requires_tokens {})",
            self.admin.listen,
            set(self.admin.token.is_some()),
            self.admin.ready_requires_tokens,
        );
        match self.store.kind {
            StoreKind::File => {
                let _ = write!(s, "store: file {}", self.store.path.display());
            }
            StoreKind::Postgres => {
                let _ = write!(s, "store: postgres (url {})", set(self.store.url.is_some()));
            }
        }
        let _ = writeln!(
            s,
            " (encryption_key {}, previous_encryption_keys {})",
            set(self.store.encryption_key.is_some()),
            self.store.previous_encryption_keys.len()
        );
        let _ = writeln!(
            s,
            "log: {} {}",
            match self.log.format {
                LogFormat::Json => "json",
                LogFormat::Pretty => "pretty",
            },
            self.log.level
        );
        for c in self.credentials.values() {
            let endpoint = match (&c.token_url, &c.issuer) {
                (Some(u), _) => u.to_string(),
                (None, Some(i)) => format!("(discovered from {i})"),
                (None, None) => "-".into(),
            };
            let _ = writeln!(
                s,
                "credential {}: grant {}, token_url {}, client_id {}, auth_method {}, scopes [{}], client_secret {}",
                c.name,
                c.grant.as_str(),
                endpoint,
                c.client_id,
                c.auth_method.as_str(),
                c.scopes.join(" "),
                set(c.client_secret.is_some()),
            );
            if c.grant == GrantType::RefreshToken {
                // The fingerprint only: the same one the logs and /credentials show.
                let seed = c
                    .refresh_token
                    .as_ref()
                    .map_or("not set (use `tokenproxy login`)".to_owned(), |t| {
                        format!("set (fingerprint {})", t.fingerprint())
                    });
                let _ = writeln!(s, "  refresh_token seed: {seed}");
            }
        }
        for r in &self.routes {
            let host = r.host.as_ref().map_or(String::new(), |h| format!(" [{h}]"));
            let _ = writeln!(
                s,
                "route {}{} -> {} (credential {}, header {}, strip_prefix {})",
                r.path_prefix,
                host,
                r.upstream_display(),
                r.credential,
                r.header,
                r.strip_prefix,
            );
        }
        s
    }
}

/// A URI without `user:password@`, which may carry a credential.
fn redact_userinfo(u: &Uri) -> String {
    match u.authority() {
        Some(a) if a.as_str().contains('@') => {
            let host_port = a.as_str().rsplit('@').next().unwrap_or("");
            let path = u.path_and_query().map_or("", |p| p.as_str());
            format!(
                "{}://[redacted]@{host_port}{path}",
                u.scheme_str().unwrap_or("")
            )
        }
        _ => u.to_string(),
    }
}
