//! Raw TOML structs → validated [`Config`]: `${VAR}` expansion, `*_file`
//! secrets, defaults, and every check, collecting all errors.
//!
//! Reads `*_file` secrets from disk; otherwise pure.

use super::locate::{key_path, line_col, Index};
use super::raw::*;
use super::units::{expand, parse_duration, parse_size};
use super::*;
use crate::assertion::{KeyError, LoadError};
use http::HeaderValue;
use std::collections::HashMap;
use std::path::Path;

/// Header names a route may not inject into: hop-by-hop headers are stripped
/// on the way out, and the rest are framing the proxy owns.
const REFUSED_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

/// Form parameters the grant client sets itself.
const RESERVED_PARAMS: &[&str] = &[
    "grant_type",
    "refresh_token",
    "client_id",
    "client_secret",
    "client_assertion",
    "client_assertion_type",
    "code",
    "code_verifier",
    "redirect_uri",
    "scope",
    "audience",
    "resource",
];

pub(super) struct Ctx<'a> {
    pub file: &'a Path,
    pub text: &'a str,
    pub index: &'a Index,
    pub env: &'a dyn Fn(&str) -> Option<String>,
    pub base_dir: PathBuf,
    pub errors: Vec<ConfigError>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum UrlRule {
    /// Token, authorize, introspection endpoints and issuers: https, or http
    /// on loopback only (they carry client secrets and refresh tokens).
    Endpoint,
    /// Upstreams and proxies: http or https (plaintext is checked by the caller).
    Any,
}

impl Ctx<'_> {
    pub fn err(&mut self, path: &str, message: impl Into<String>) {
        let (line, col) = match self.index.offset_of(path) {
            Some(off) => line_col(self.text, off),
            None => (0, 0),
        };
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line,
            col,
            key: path.to_owned(),
            message: message.into(),
        });
    }

    /// The value with `${VAR}`s expanded; `None` (and an error) if one is missing.
    fn str(&mut self, path: &str, raw: Option<&String>) -> Option<String> {
        let raw = raw?;
        match expand(raw, self.env) {
            Ok(s) => Some(s),
            Err(e) => {
                self.err(path, e.to_string());
                None
            }
        }
    }

    /// A string that must be present and non-empty.
    fn required(&mut self, path: &str, raw: Option<&String>, what: &str) -> Option<String> {
        if raw.is_none() {
            self.err(path, format!("missing; expected {what}"));
            return None;
        }
        let s = self.str(path, raw)?;
        if s.trim().is_empty() {
            self.err(path, format!("is empty; expected {what}"));
            return None;
        }
        Some(s)
    }

    fn strings(&mut self, path: &str, raw: Option<&Vec<String>>) -> Option<Vec<String>> {
        let raw = raw?;
        let mut out = Vec::with_capacity(raw.len());
        for (i, s) in raw.iter().enumerate() {
            if let Some(s) = self.str(&format!("{path}[{i}]"), Some(s)) {
                out.push(s);
            }
        }
        Some(out)
    }

    /// A size: bytes as an integer or text such as `"64KiB"`.
    fn size(&mut self, path: &str, raw: Option<&RawSize>, default: u64) -> u64 {
        match raw {
            None => default,
            Some(RawSize::Bytes(n)) => u64::try_from(*n).unwrap_or_else(|_| {
                self.err(
                    path,
                    format!("{n} is negative; expected a size such as \"64KiB\""),
                );
                default
            }),
            Some(RawSize::Text(t)) => match self.str(path, Some(t)) {
                Some(t) => parse_size(&t).unwrap_or_else(|m| {
                    self.err(path, m);
                    default
                }),
                None => default,
            },
        }
    }

    fn duration(&mut self, path: &str, raw: Option<&String>, default: Duration) -> Duration {
        self.opt_duration(path, raw).unwrap_or(default)
    }

    fn opt_duration(&mut self, path: &str, raw: Option<&String>) -> Option<Duration> {
        let s = self.str(path, raw)?;
        match parse_duration(&s) {
            Ok(d) => Some(d),
            Err(e) => {
                self.err(path, e);
                None
            }
        }
    }

    /// A duration that must be more than zero.
    fn positive_duration(
        &mut self,
        path: &str,
        raw: Option<&String>,
        default: Duration,
    ) -> Duration {
        let d = self.duration(path, raw, default);
        if d.is_zero() {
            self.err(path, "must be more than 0s");
            return default;
        }
        d
    }

    /// A file path, relative to the config file's directory.
    fn path(&mut self, path: &str, raw: Option<&String>) -> Option<PathBuf> {
        let s = self.str(path, raw)?;
        if s.trim().is_empty() {
            self.err(path, "is empty; expected a file path");
            return None;
        }
        Some(self.base_dir.join(s))
    }

    /// An inline secret (`${VAR}` expanded); empty is refused.
    fn secret(&mut self, path: &str, raw: Option<&String>) -> Option<Secret> {
        let s = self.str(path, raw)?;
        if s.is_empty() {
            self.err(
                path,
                "is empty (an unset or empty variable?); remove the key or give a value",
            );
            return None;
        }
        Some(Secret::new(s))
    }

    /// A secret read from a file: one trailing newline/whitespace trimmed.
    fn secret_file(
        &mut self,
        path: &str,
        raw: Option<&String>,
    ) -> Option<(PathBuf, Option<Secret>)> {
        let p = self.path(path, raw)?;
        match std::fs::read_to_string(&p) {
            Ok(s) => {
                let s = s.trim_end();
                if s.is_empty() {
                    self.err(
                        path,
                        format!("{} is empty; expected the secret", p.display()),
                    );
                    Some((p, None))
                } else {
                    Some((p, Some(Secret::new(s))))
                }
            }
            Err(e) => {
                self.err(path, format!("cannot read {}: {e}", p.display()));
                Some((p, None))
            }
        }
    }

    fn url(&mut self, path: &str, raw: Option<&String>, rule: UrlRule) -> Option<Uri> {
        let raw_s = self.str(path, raw)?;
        // What messages echo: a proxy URL's password stays out of them.
        let s = without_userinfo(&raw_s);
        let uri: Uri = match raw_s.parse() {
            Ok(u) => u,
            Err(e) => {
                self.err(
                    path,
                    format!("{s:?} is not a URL ({e}); expected http(s)://host/..."),
                );
                return None;
            }
        };
        let scheme = uri.scheme_str().unwrap_or("");
        let host = uri.host().unwrap_or("");
        if !(scheme == "http" || scheme == "https") || host.is_empty() {
            self.err(
                path,
                format!("{s:?} is not an absolute http(s) URL; expected http(s)://host/..."),
            );
            return None;
        }
        if rule == UrlRule::Endpoint && scheme == "http" && !is_loopback_host(host) {
            self.err(
                path,
                format!("{s:?} must use https (http is allowed only on loopback: 127.0.0.0/8, ::1, localhost)"),
            );
            return None;
        }
        Some(uri)
    }

    fn listen_addr(&mut self, path: &str, s: &str) -> Option<ListenAddr> {
        match parse_listen(s) {
            Ok(a) => Some(a),
            Err(m) => {
                self.err(path, m);
                None
            }
        }
    }

    fn host(&mut self, path: &str, raw: Option<&String>) -> Option<String> {
        let s = self.str(path, raw)?;
        match normalize_host(&s) {
            Some(h) => Some(h),
            None => {
                self.err(
                    path,
                    format!("{s:?} is not a host name; expected e.g. \"api.internal\""),
                );
                None
            }
        }
    }
}

/// `s` with any `user:password@` of its authority replaced by `[redacted]@`,
/// for messages.
pub(crate) fn without_userinfo(s: &str) -> String {
    let Some((scheme, rest)) = s.split_once("://") else {
        return s.to_owned();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{scheme}://[redacted]{}", &rest[at..]),
        None => s.to_owned(),
    }
}

pub use crate::net::is_loopback_host;

/// Lower-cased, without `:port`; `None` when it is not a plausible host.
fn normalize_host(s: &str) -> Option<String> {
    let s = s.trim().to_ascii_lowercase();
    let host = if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']')?;
        format!("[{}]", &rest[..end])
    } else {
        match s.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h.to_owned(),
            _ => s,
        }
    };
    let ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b));
    ok.then_some(host)
}

/// `IP:port`, `[v6]:port` or `unix:/absolute/path`.
pub fn parse_listen(s: &str) -> Result<ListenAddr, String> {
    if let Some(p) = s.strip_prefix("unix:") {
        if !p.starts_with('/') {
            return Err(format!(
                "{s:?}: a unix socket needs an absolute path, e.g. \"unix:/run/tp.sock\""
            ));
        }
        return Ok(ListenAddr::Unix(PathBuf::from(p)));
    }
    s.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|_| {
        format!("{s:?} is not a listen address; expected IP:port, [v6]:port or unix:/path (host names are not resolved)")
    })
}

fn one_of(s: &str, expected: &str) -> String {
    format!("{s:?} is not valid; expected {expected}")
}

pub(super) fn validate(raw: RawConfig, cx: &mut Ctx<'_>) -> Config {
    let server = server(raw.server.unwrap_or_default(), cx);
    let admin = admin(raw.admin.unwrap_or_default(), cx);
    for (i, l) in server.listen.iter().enumerate() {
        // Port 0 asks the OS for a fresh port each time: never a clash.
        let ephemeral = matches!(l, ListenAddr::Tcp(a) if a.port() == 0);
        if *l == admin.listen && !ephemeral {
            cx.err(
                "admin.listen",
                format!("{l} is also server.listen[{i}]; expected a different address"),
            );
        }
    }
    let store = store(raw.store.unwrap_or_default(), cx);
    let log = log(raw.log.unwrap_or_default(), cx);

    let raw_creds = raw.credentials.unwrap_or_default();
    let mut credentials = BTreeMap::new();
    for (name, rc) in &raw_creds {
        if let Some(c) = credential(name, rc, cx) {
            credentials.insert(name.clone(), Arc::new(c));
        }
    }
    shared_refresh_families(&credentials, cx);

    let routes = routes(raw.routes.unwrap_or_default(), &raw_creds, &credentials, cx);

    Config {
        source: cx.file.to_path_buf(),
        server,
        admin,
        store,
        log,
        credentials,
        routes,
    }
}

fn server(r: RawServer, cx: &mut Ctx<'_>) -> ServerConfig {
    let mut listen = Vec::new();
    match &r.listen {
        None => listen.push(ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 8080)))),
        Some(l) => {
            if l.items.is_empty() {
                cx.err("server.listen", "is empty; expected at least one address");
            }
            for (i, s) in l.items.iter().enumerate() {
                let path = if l.list {
                    format!("server.listen[{i}]")
                } else {
                    "server.listen".into()
                };
                let Some(s) = cx.str(&path, Some(s)) else {
                    continue;
                };
                if let Some(a) = cx.listen_addr(&path, &s) {
                    if listen.contains(&a) {
                        cx.err(&path, format!("{a} is listed twice"));
                    } else {
                        listen.push(a);
                    }
                }
            }
        }
    }
    let mut hosts = Vec::new();
    for (i, h) in r.hosts.iter().flatten().enumerate() {
        if let Some(h) = cx.host(&format!("server.hosts[{i}]"), Some(h)) {
            hosts.push(h);
        }
    }
    let tls_cert = cx.path("server.tls_cert", r.tls_cert.as_ref());
    let tls_key = cx.path("server.tls_key", r.tls_key.as_ref());
    both_or_neither(
        cx,
        "server",
        "tls_cert",
        r.tls_cert.is_some(),
        "tls_key",
        r.tls_key.is_some(),
    );
    let worker_threads = at_least_one(cx, "server.worker_threads", r.worker_threads, 2);
    let max_connections = at_least_one(cx, "server.max_connections", r.max_connections, 10_000);
    let shutdown_grace = cx.duration(
        "server.shutdown_grace",
        r.shutdown_grace.as_ref(),
        Duration::from_secs(20),
    );
    let header_read_timeout = cx.duration(
        "server.header_read_timeout",
        r.header_read_timeout.as_ref(),
        Duration::from_secs(10),
    );
    if header_read_timeout.is_zero() {
        cx.err(
            "server.header_read_timeout",
            "is 0s; expected a positive duration (slow clients must not hold connections forever)",
        );
    }
    let keepalive_timeout = cx.duration(
        "server.keepalive_timeout",
        r.keepalive_timeout.as_ref(),
        Duration::from_secs(75),
    );
    if keepalive_timeout.is_zero() {
        cx.err(
            "server.keepalive_timeout",
            "is 0s; expected a positive duration (how long an idle keep-alive connection is kept)",
        );
    }
    let max_header_bytes = cx.size(
        "server.max_header_bytes",
        r.max_header_bytes.as_ref(),
        64 * 1024,
    );
    // hyper cannot read a request line into less than 8 KiB.
    if !(8 * 1024..=16 * 1024 * 1024).contains(&max_header_bytes) {
        cx.err(
            "server.max_header_bytes",
            format!("{max_header_bytes} bytes is out of range; expected 8KiB to 16MiB"),
        );
    }
    let max_headers = at_least_one(cx, "server.max_headers", r.max_headers, 100);
    if max_headers > 10_000 {
        cx.err(
            "server.max_headers",
            format!("{max_headers} is too large; expected at most 10000"),
        );
    }
    // An empty value (`${HTTPS_PROXY:-}` unset) means no proxy.
    let egress_proxy = match cx.str("server.egress_proxy", r.egress_proxy.as_ref()) {
        Some(s) if s.trim().is_empty() => None,
        Some(s) => cx.url("server.egress_proxy", Some(&s), UrlRule::Any),
        None => None,
    };
    ServerConfig {
        listen,
        hosts,
        tls_cert,
        tls_key,
        worker_threads,
        max_connections,
        shutdown_grace,
        header_read_timeout,
        keepalive_timeout,
        max_header_bytes: max_header_bytes.clamp(8 * 1024, 16 * 1024 * 1024) as usize,
        max_headers: max_headers.min(10_000),
        egress_proxy,
    }
}

fn both_or_neither(cx: &mut Ctx<'_>, table: &str, a: &str, has_a: bool, b: &str, has_b: bool) {
    if has_a && !has_b {
        cx.err(
            &format!("{table}.{b}"),
            format!("{a} is set but {b} is not; set both or neither"),
        );
    } else if has_b && !has_a {
        cx.err(
            &format!("{table}.{a}"),
            format!("{b} is set but {a} is not; set both or neither"),
        );
    }
}

fn at_least_one(cx: &mut Ctx<'_>, path: &str, raw: Option<i64>, default: usize) -> usize {
    match raw {
        None => default,
        Some(n) if n >= 1 => usize::try_from(n).unwrap_or(usize::MAX),
        Some(n) => {
            cx.err(path, format!("{n} is too small; expected at least 1"));
            default
        }
    }
}

fn admin(r: RawAdmin, cx: &mut Ctx<'_>) -> AdminConfig {
    let default = ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 9901)));
    let listen = match cx.str("admin.listen", r.listen.as_ref()) {
        Some(s) => cx.listen_addr("admin.listen", &s).unwrap_or(default),
        None => default,
    };
    let token = cx.secret("admin.token", r.token.as_ref());
    let off_loopback = matches!(&listen, ListenAddr::Tcp(a) if !crate::net::is_loopback_ip(a.ip()));
    if off_loopback && token.is_none() {
        cx.err(
            "admin.listen",
            format!("{listen} is reachable off this host; expected admin.token to be set (credentials and mutating endpoints need it there)"),
        );
    }
    AdminConfig {
        listen,
        token,
        ready_requires_tokens: r.ready_requires_tokens.unwrap_or(false),
    }
}

fn store(r: RawStore, cx: &mut Ctx<'_>) -> StoreConfig {
    let kind = match cx.str("store.kind", r.kind.as_ref()).as_deref() {
        None | Some("file") => StoreKind::File,
        Some("postgres") => StoreKind::Postgres,
        Some(other) => {
            cx.err("store.kind", one_of(other, "\"file\" or \"postgres\""));
            StoreKind::File
        }
    };
    let path = cx
        .path("store.path", r.path.as_ref())
        .unwrap_or_else(|| cx.base_dir.join("tokens.json"));
    let url = cx.secret("store.url", r.url.as_ref());
    match (kind, &url) {
        (StoreKind::Postgres, None) if r.url.is_none() => cx.err(
            "store.url",
            "missing; kind = \"postgres\" needs url = \"postgres://...\"",
        ),
        (StoreKind::Postgres, Some(u))
            if !(u.expose().starts_with("postgres://")
                || u.expose().starts_with("postgresql://")) =>
        {
            cx.err(
                "store.url",
                "is not a postgres URL; expected postgres://user@host/db",
            )
        }
        (StoreKind::File, Some(_)) => cx.err("store.url", "is only used with kind = \"postgres\""),
        _ => {}
    }
    if r.path.is_some() && kind == StoreKind::Postgres {
        cx.err("store.path", "is only used with kind = \"file\"");
    }
    let encryption_key = cx.secret("store.encryption_key", r.encryption_key.as_ref());
    let previous_encryption_keys = previous_keys(&r, encryption_key.as_ref(), cx);
    StoreConfig {
        kind,
        path,
        url,
        encryption_key,
        previous_encryption_keys,
    }
}

/// Keys that still open what was sealed before a rotation. Each must differ
/// from the current key and from the others (a repeated key is a typo that
/// would hide the real old key).
fn previous_keys(r: &RawStore, current: Option<&Secret>, cx: &mut Ctx<'_>) -> Vec<Secret> {
    const PATH: &str = "store.previous_encryption_keys";
    let Some(raw) = &r.previous_encryption_keys else {
        return Vec::new();
    };
    if r.encryption_key.is_none() {
        cx.err(
            PATH,
            "needs store.encryption_key (the key every write uses); move the newest key there",
        );
    }
    // With their index, to name the earlier duplicate.
    let mut keys: Vec<(usize, Secret)> = Vec::with_capacity(raw.len());
    for (i, v) in raw.iter().enumerate() {
        let path = format!("{PATH}[{i}]");
        let Some(key) = cx.secret(&path, Some(v)) else {
            continue;
        };
        if current == Some(&key) {
            cx.err(&path, "is the same key as store.encryption_key; remove it");
        } else if let Some((j, _)) = keys.iter().find(|(_, k)| *k == key) {
            cx.err(&path, format!("is the same key as {PATH}[{j}]; remove it"));
        } else {
            keys.push((i, key));
        }
    }
    keys.into_iter().map(|(_, k)| k).collect()
}

fn log(r: RawLog, cx: &mut Ctx<'_>) -> LogConfig {
    let format = match cx.str("log.format", r.format.as_ref()).as_deref() {
        // Unset: people at a terminal get lines they can read, collectors JSON.
        None if std::io::IsTerminal::is_terminal(&std::io::stderr()) => LogFormat::Pretty,
        None | Some("json") => LogFormat::Json,
        Some("pretty") => LogFormat::Pretty,
        Some(other) => {
            cx.err("log.format", one_of(other, "\"json\" or \"pretty\""));
            LogFormat::Json
        }
    };
    let level = cx
        .str("log.level", r.level.as_ref())
        .unwrap_or_else(|| "info".into());
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
        cx.err(
            "log.level",
            format!("{level:?} is not a log filter ({e}); expected e.g. \"info\" or \"info,tokenproxy=debug\""),
        );
    }
    LogConfig {
        format,
        level,
        access: r.access.unwrap_or(false),
    }
}

fn credential(name: &str, r: &RawCredential, cx: &mut Ctx<'_>) -> Option<CredentialConfig> {
    let base = key_path("credentials", name);
    let p = |k: &str| format!("{base}.{k}");
    let before = cx.errors.len();

    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        cx.err(&base, format!("credential name {name:?} is not valid; expected letters, digits, '_' and '-' (it appears in URLs and metrics)"));
    }

    let profile = provider(cx, &base, r);

    let grant = match cx.str(&p("grant"), r.grant.as_ref()).as_deref() {
        Some("refresh_token") => Some(GrantType::RefreshToken),
        Some("client_credentials") => Some(GrantType::ClientCredentials),
        Some(other) => {
            let hint = if other == "authorization_code" {
                " (authorization_code is used by `tokenproxy login` to obtain a refresh token; use grant = \"refresh_token\")"
            } else {
                ""
            };
            cx.err(
                &p("grant"),
                format!(
                    "{}{hint}",
                    one_of(other, "\"refresh_token\" or \"client_credentials\"")
                ),
            );
            None
        }
        None => {
            if r.grant.is_none() {
                cx.err(
                    &p("grant"),
                    "missing; expected \"refresh_token\" or \"client_credentials\"",
                );
            }
            None
        }
    };

    let auth_method = match cx.str(&p("auth_method"), r.auth_method.as_ref()).as_deref() {
        None => profile
            .as_ref()
            .and_then(|f| f.profile.auth_method)
            .and_then(|m| AuthMethod::ALL.into_iter().find(|a| a.as_str() == m))
            .unwrap_or(AuthMethod::ClientSecretBasic),
        Some(m) => match AuthMethod::ALL.iter().find(|a| a.as_str() == m) {
            Some(a) => *a,
            None => {
                let names: Vec<String> = AuthMethod::ALL
                    .iter()
                    .map(|a| format!("{:?}", a.as_str()))
                    .collect();
                cx.err(&p("auth_method"), one_of(m, &names.join(", ")));
                AuthMethod::ClientSecretBasic
            }
        },
    };

    // Explicit keys win over the profile (docs/providers.md).
    let filled = |own: Option<&String>, from: Option<&String>| own.or(from).cloned();
    let token_url = cx.url(
        &p("token_url"),
        filled(
            r.token_url.as_ref(),
            profile.as_ref().and_then(|f| f.token_url.as_ref()),
        )
        .as_ref()
        .filter(|_| r.token_url.is_some() || r.issuer.is_none()),
        UrlRule::Endpoint,
    );
    let authorize_url = cx.url(
        &p("authorize_url"),
        filled(
            r.authorize_url.as_ref(),
            profile.as_ref().and_then(|f| f.authorize_url.as_ref()),
        )
        .as_ref()
        .filter(|_| r.authorize_url.is_some() || r.issuer.is_none()),
        UrlRule::Endpoint,
    );
    let device_authorization_url = cx.url(
        &p("device_authorization_url"),
        r.device_authorization_url.as_ref(),
        UrlRule::Endpoint,
    );
    let introspection_url = cx.url(
        &p("introspection_url"),
        r.introspection_url.as_ref(),
        UrlRule::Endpoint,
    );
    let issuer = cx.url(&p("issuer"), r.issuer.as_ref(), UrlRule::Endpoint);
    if token_url.is_none() && r.token_url.is_none() && r.issuer.is_none() {
        match &profile {
            // A templated URL whose tenant/domain/realm is missing: already reported.
            Some(f) if f.profile.token_url.is_some() => {}
            Some(f) => cx.err(
                &p("provider"),
                format!(
                    "the {} profile does not know the token endpoint; set token_url = \"https://...\" (or issuer, for discovery); see `tokenproxy providers show {}`",
                    f.profile.name, f.profile.name
                ),
            ),
            None => cx.err(
                &p("token_url"),
                "missing; expected token_url = \"https://...\" (or issuer, for discovery)",
            ),
        }
    }
    let redirect_uri = cx
        .url(&p("redirect_uri"), r.redirect_uri.as_ref(), UrlRule::Any)
        .map(|u| u.to_string());

    let client_id = cx
        .required(&p("client_id"), r.client_id.as_ref(), "the OAuth client_id")
        .unwrap_or_default();

    // Client secret: inline or from a file, not both.
    let mut client_secret = cx.secret(&p("client_secret"), r.client_secret.as_ref());
    let mut client_secret_file = None;
    if r.client_secret.is_some() && r.client_secret_file.is_some() {
        cx.err(
            &p("client_secret_file"),
            "client_secret is also set; use one or the other",
        );
    } else if let Some((path, s)) =
        cx.secret_file(&p("client_secret_file"), r.client_secret_file.as_ref())
    {
        client_secret_file = Some(path);
        client_secret = s;
    }
    let has_secret = r.client_secret.is_some() || r.client_secret_file.is_some();
    if auth_method.uses_secret() && !has_secret {
        cx.err(
            &p("client_secret"),
            format!(
                "missing; auth_method = \"{}\" needs client_secret or client_secret_file (auth_method = \"none\" for a public client)",
                auth_method.as_str()
            ),
        );
    } else if !auth_method.uses_secret() && has_secret {
        let key = if r.client_secret.is_some() {
            "client_secret"
        } else {
            "client_secret_file"
        };
        cx.err(
            &p(key),
            format!(
                "is set but auth_method = \"{}\" never sends it; remove it or choose client_secret_basic/client_secret_post",
                auth_method.as_str()
            ),
        );
    }

    // Refresh-token seed: inline or from a file, not both.
    let mut refresh_token = cx.secret(&p("refresh_token"), r.refresh_token.as_ref());
    let mut refresh_token_file = None;
    if r.refresh_token.is_some() && r.refresh_token_file.is_some() {
        cx.err(
            &p("refresh_token_file"),
            "refresh_token is also set; use one or the other",
        );
    } else if let Some((path, s)) =
        cx.secret_file(&p("refresh_token_file"), r.refresh_token_file.as_ref())
    {
        refresh_token_file = Some(path);
        refresh_token = s;
    }
    if grant == Some(GrantType::ClientCredentials) {
        for k in ["refresh_token", "refresh_token_file"] {
            let set = if k == "refresh_token" {
                r.refresh_token.is_some()
            } else {
                r.refresh_token_file.is_some()
            };
            if set {
                cx.err(&p(k), "is only used with grant = \"refresh_token\"");
            }
        }
    }

    let scopes = cx
        .strings(&p("scopes"), r.scopes.as_ref())
        .unwrap_or_default();
    check_scopes(cx, &p("scopes"), &scopes);

    let mut extra_params = Vec::new();
    for (k, v) in r.extra_params.iter().flatten() {
        let kp = key_path(&p("extra_params"), k);
        if RESERVED_PARAMS.contains(&k.as_str()) {
            cx.err(
                &kp,
                format!("{k:?} is set by tokenproxy itself; use the credential's own key instead"),
            );
            continue;
        }
        if let Some(v) = cx.str(&kp, Some(v)) {
            extra_params.push((k.clone(), v));
        }
    }

    let client_cert = cx.path(&p("client_cert"), r.client_cert.as_ref());
    let client_key = cx.path(&p("client_key"), r.client_key.as_ref());
    both_or_neither(
        cx,
        &base,
        "client_cert",
        r.client_cert.is_some(),
        "client_key",
        r.client_key.is_some(),
    );

    if auth_method.is_mtls() && (r.client_cert.is_none() || r.client_key.is_none()) {
        cx.err(
            &p("auth_method"),
            format!(
                "\"{}\" authenticates with the TLS client certificate: set client_cert and client_key",
                auth_method.as_str()
            ),
        );
    }
    let (client_assertion, client_assertion_aud) = client_assertion(cx, &base, r, auth_method);
    let dpop = dpop(cx, &base, r);

    let c = CredentialConfig {
        name: name.to_owned(),
        grant: grant.unwrap_or(GrantType::RefreshToken),
        token_url,
        authorize_url,
        device_authorization_url,
        redirect_uri,
        client_id,
        client_secret,
        client_secret_file,
        auth_method,
        scopes,
        refresh_token,
        refresh_token_file,
        issuer,
        audience: cx.str(&p("audience"), r.audience.as_ref()),
        resource: cx.str(&p("resource"), r.resource.as_ref()),
        extra_params,
        introspection_url,
        reuse_grace: cx.duration(
            &p("reuse_grace"),
            r.reuse_grace.as_ref(),
            profile.as_ref().map_or(Duration::ZERO, |f| {
                Duration::from_secs(f.profile.reuse_grace_secs)
            }),
        ),
        ca_file: cx.path(&p("ca_file"), r.ca_file.as_ref()),
        client_cert,
        client_key,
        client_assertion,
        client_assertion_aud,
        dpop,
        refresh_before: cx.opt_duration(&p("refresh_before"), r.refresh_before.as_ref()),
        refresh_wait: cx.duration(
            &p("refresh_wait"),
            r.refresh_wait.as_ref(),
            Duration::from_secs(10),
        ),
        max_backoff: cx.positive_duration(
            &p("max_backoff"),
            r.max_backoff.as_ref(),
            Duration::from_secs(60),
        ),
        default_lifetime: cx.positive_duration(
            &p("default_lifetime"),
            r.default_lifetime.as_ref(),
            Duration::from_secs(
                profile
                    .as_ref()
                    .and_then(|f| f.profile.default_lifetime_secs)
                    .unwrap_or(3600),
            ),
        ),
        connect_timeout: cx.positive_duration(
            &p("connect_timeout"),
            r.connect_timeout.as_ref(),
            super::TOKEN_CONNECT_TIMEOUT,
        ),
        refresh_token_lifetime: match cx
            .str(
                &p("refresh_token_lifetime"),
                r.refresh_token_lifetime.as_ref(),
            )
            .as_deref()
        {
            None => profile
                .as_ref()
                .and_then(|f| f.profile.refresh_token_lifetime)
                .unwrap_or(crate::providers::RefreshLifetime::Idle),
            Some("idle") => crate::providers::RefreshLifetime::Idle,
            Some("absolute") => crate::providers::RefreshLifetime::Absolute,
            Some(other) => {
                cx.err(
                    &p("refresh_token_lifetime"),
                    format!("{other:?} is not a refresh token lifetime; expected \"idle\" or \"absolute\""),
                );
                crate::providers::RefreshLifetime::Idle
            }
        },
        token_types: cx
            .strings(&p("token_types"), r.token_types.as_ref())
            .unwrap_or_else(|| {
                profile
                    .as_ref()
                    .map(|f| {
                        f.profile
                            .token_types
                            .iter()
                            .map(|t| (*t).to_owned())
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .into_iter()
            .map(|t| t.to_ascii_lowercase())
            .collect(),
        token_field_hosts: match cx.strings(&p("token_field_hosts"), r.token_field_hosts.as_ref()) {
            Some(list) if list.is_empty() => {
                cx.err(
                    &p("token_field_hosts"),
                    "is empty; expected hosts such as [\".example.com\", \"api.example.com\"] (remove the key for any https origin)",
                );
                None
            }
            Some(list) => {
                let mut out = Vec::with_capacity(list.len());
                for (i, h) in list.iter().enumerate() {
                    match crate::token_fields::host_pattern(h) {
                        Ok(h) => out.push(h),
                        Err(why) => cx.err(
                            &format!("{}[{i}]", p("token_field_hosts")),
                            format!("{h:?} {why}; expected \".example.com\" (any subdomain) or \"api.example.com\" (that host only)"),
                        ),
                    }
                }
                Some(out)
            }
            None => profile
                .as_ref()
                .map(|f| f.profile.token_field_hosts)
                .filter(|h| !h.is_empty())
                .map(|h| h.iter().map(|h| (*h).to_owned()).collect()),
        },
        scope_on_refresh: r
            .scope_on_refresh
            .unwrap_or(profile.as_ref().is_some_and(|f| f.profile.scope_on_refresh)),
        provider: profile.as_ref().map(|f| f.profile),
        login_params: profile.as_ref().map_or_else(Vec::new, |f| {
            f.profile
                .login_params
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        }),
    };
    (cx.errors.len() == before).then_some(c)
}

/// A provider profile with its URLs expanded (docs/providers.md).
struct Filled {
    profile: &'static crate::providers::Profile,
    token_url: Option<String>,
    authorize_url: Option<String>,
}

/// `provider`, `tenant`, `domain`, `realm`: the profile, its URLs filled;
/// errors for an unknown name, a missing value the URLs need, or a value
/// no URL uses.
fn provider(cx: &mut Ctx<'_>, base: &str, r: &RawCredential) -> Option<Filled> {
    use crate::providers::{self, Param};
    let p = |k: &str| format!("{base}.{k}");
    let mut values: Vec<(Param, Option<String>)> = Vec::new();
    for (param, raw) in [
        (Param::Tenant, &r.tenant),
        (Param::Domain, &r.domain),
        (Param::Realm, &r.realm),
    ] {
        let v = cx.str(&p(param.key()), raw.as_ref());
        if let Some(v) = &v {
            // It goes into a URL: one path segment or host, nothing else.
            let ok = !v.is_empty()
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b));
            if !ok {
                cx.err(
                    &p(param.key()),
                    format!("{v:?} is not valid; expected letters, digits, '-', '.', '_' or ':' (it is put into the provider's URLs)"),
                );
                continue;
            }
        }
        values.push((param, v));
    }
    let value = |param: Param| {
        values
            .iter()
            .find(|(x, _)| *x == param)
            .and_then(|(_, v)| v.clone())
    };
    let Some(name) = cx.str(&p("provider"), r.provider.as_ref()) else {
        for (param, raw) in [
            (Param::Tenant, &r.tenant),
            (Param::Domain, &r.domain),
            (Param::Realm, &r.realm),
        ] {
            if raw.is_some() {
                cx.err(
                    &p(param.key()),
                    "is only used with a provider whose URLs need it (see `tokenproxy providers`)",
                );
            }
        }
        return None;
    };
    let Some(profile) = providers::find(&name) else {
        cx.err(
            &p("provider"),
            format!(
                "{name:?} is not a known provider; expected one of: {}",
                providers::names().join(", ")
            ),
        );
        return None;
    };
    // Only the profile's token_url makes a value required: with token_url or
    // issuer set, a missing one just leaves the profile's URLs unfilled.
    let needed = r.token_url.is_none() && r.issuer.is_none();
    for param in [Param::Tenant, Param::Domain, Param::Realm] {
        let raw = match param {
            Param::Tenant => &r.tenant,
            Param::Domain => &r.domain,
            Param::Realm => &r.realm,
        };
        if profile.params.contains(&param) {
            if raw.is_none() && needed {
                cx.err(
                    &p("provider"),
                    format!(
                        "provider \"{}\" needs {} = \"...\" (its URLs are templated with {{{}}}), or token_url (or issuer, for discovery) set yourself",
                        profile.name,
                        param.key(),
                        param.key()
                    ),
                );
            }
        } else if raw.is_some() {
            cx.err(
                &p(param.key()),
                format!(
                    "provider \"{}\" does not use {}; remove it",
                    profile.name,
                    param.key()
                ),
            );
        }
    }
    let expand = |t: Option<&str>| t.and_then(|t| profile.expand(t, &value));
    Some(Filled {
        profile,
        token_url: expand(profile.token_url),
        authorize_url: expand(profile.authorize_url),
    })
}

/// `client_assertion_*` (docs/client-authentication.md): a key that cannot
/// sign is an error here, at the key's line, not at the first refresh.
fn client_assertion(
    cx: &mut Ctx<'_>,
    base: &str,
    r: &RawCredential,
    method: AuthMethod,
) -> (Option<AssertionSource>, AssertionAud) {
    let p = |k: &str| format!("{base}.{k}");
    let jwt = matches!(
        method,
        AuthMethod::PrivateKeyJwt | AuthMethod::ClientSecretJwt
    );
    let key_only = [
        ("client_assertion_key", r.client_assertion_key.is_some()),
        ("client_assertion_alg", r.client_assertion_alg.is_some()),
        ("client_assertion_kid", r.client_assertion_kid.is_some()),
        ("client_assertion_cert", r.client_assertion_cert.is_some()),
        ("client_assertion_file", r.client_assertion_file.is_some()),
    ];
    if method != AuthMethod::PrivateKeyJwt {
        for (k, set) in key_only {
            if set {
                cx.err(&p(k), "is only used with auth_method = \"private_key_jwt\"");
            }
        }
    }
    let aud = match cx
        .str(&p("client_assertion_aud"), r.client_assertion_aud.as_ref())
        .as_deref()
    {
        _ if !jwt && r.client_assertion_aud.is_some() => {
            cx.err(
                &p("client_assertion_aud"),
                "is only used with auth_method = \"private_key_jwt\" or \"client_secret_jwt\"",
            );
            AssertionAud::TokenEndpoint
        }
        None | Some("token_endpoint") => AssertionAud::TokenEndpoint,
        Some("issuer") => {
            if r.issuer.is_none() {
                cx.err(
                    &p("client_assertion_aud"),
                    "is \"issuer\" but the credential has no issuer; set issuer or give the audience URL",
                );
            }
            AssertionAud::Issuer
        }
        Some(url) => match cx.url(
            &p("client_assertion_aud"),
            r.client_assertion_aud.as_ref(),
            UrlRule::Any,
        ) {
            Some(_) => AssertionAud::Url(url.to_owned()),
            None => AssertionAud::TokenEndpoint,
        },
    };
    if method != AuthMethod::PrivateKeyJwt {
        return (None, aud);
    }
    match (&r.client_assertion_key, &r.client_assertion_file) {
        (Some(_), Some(_)) => {
            cx.err(
                &p("client_assertion_file"),
                "client_assertion_key is also set; use one or the other",
            );
            (None, aud)
        }
        (None, None) => {
            cx.err(
                &p("auth_method"),
                "\"private_key_jwt\" needs client_assertion_key = \"PATH\" (a PKCS#8 PEM key) or client_assertion_file = \"PATH\" (a JWT signed by someone else)",
            );
            (None, aud)
        }
        (None, Some(f)) => {
            for (k, set) in &key_only[1..4] {
                if *set {
                    cx.err(
                        &p(k),
                        "is only used with client_assertion_key (a client_assertion_file token comes signed)",
                    );
                }
            }
            let path = cx.path(&p("client_assertion_file"), Some(f));
            (path.map(AssertionSource::File), aud)
        }
        (Some(k), None) => {
            let Some(path) = cx.path(&p("client_assertion_key"), Some(k)) else {
                return (None, aud);
            };
            let cert = cx.path(
                &p("client_assertion_cert"),
                r.client_assertion_cert.as_ref(),
            );
            let alg = cx.str(&p("client_assertion_alg"), r.client_assertion_alg.as_ref());
            let kid = cx.str(&p("client_assertion_kid"), r.client_assertion_kid.as_ref());
            let pem = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    cx.err(
                        &p("client_assertion_key"),
                        format!("cannot read {}: {e}", path.display()),
                    );
                    return (None, aud);
                }
            };
            let cert_pem = match &cert {
                Some(c) => match std::fs::read(c) {
                    Ok(b) => Some(b),
                    Err(e) => {
                        cx.err(
                            &p("client_assertion_cert"),
                            format!("cannot read {}: {e}", c.display()),
                        );
                        return (None, aud);
                    }
                },
                None => None,
            };
            match crate::assertion::load_key(&pem, alg.as_deref(), kid, cert_pem.as_deref()) {
                Ok(key) => (Some(AssertionSource::Key { key, path, cert }), aud),
                Err(LoadError::Key(
                    e @ (KeyError::AlgMismatch { .. } | KeyError::UnknownAlg(_)),
                )) if r.client_assertion_alg.is_some() => {
                    cx.err(
                        &p("client_assertion_alg"),
                        format!("{e} ({})", path.display()),
                    );
                    (None, aud)
                }
                Err(LoadError::Key(e)) => {
                    cx.err(
                        &p("client_assertion_key"),
                        format!("{} {e}", path.display()),
                    );
                    (None, aud)
                }
                Err(LoadError::Cert(e)) => {
                    let shown = cert
                        .as_ref()
                        .map(|c| c.display().to_string())
                        .unwrap_or_default();
                    cx.err(&p("client_assertion_cert"), format!("{shown} {e}"));
                    (None, aud)
                }
            }
        }
    }
}

/// `dpop` and `dpop_key` (docs/dpop.md): a key that cannot sign is an
/// error here, at the key's line.
fn dpop(cx: &mut Ctx<'_>, base: &str, r: &RawCredential) -> Option<DpopSource> {
    let p = |k: &str| format!("{base}.{k}");
    if r.dpop != Some(true) {
        if r.dpop_key.is_some() {
            cx.err(&p("dpop_key"), "is only used with dpop = true");
        }
        return None;
    }
    let Some(k) = &r.dpop_key else {
        return Some(DpopSource::Generated);
    };
    let path = cx.path(&p("dpop_key"), Some(k))?;
    let pem = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) => {
            cx.err(
                &p("dpop_key"),
                format!("cannot read {}: {e}", path.display()),
            );
            return None;
        }
    };
    match crate::dpop::DpopKey::from_pem(&pem) {
        Ok(key) => Some(DpopSource::File {
            key: Arc::new(key),
            path,
        }),
        Err(e) => {
            cx.err(&p("dpop_key"), format!("{} {e}", path.display()));
            None
        }
    }
}

/// Scopes go on the wire space-separated: one cannot contain a space.
fn check_scopes(cx: &mut Ctx<'_>, path: &str, scopes: &[String]) {
    for (i, s) in scopes.iter().enumerate() {
        if s.is_empty()
            || s.chars()
                .any(|c| c.is_whitespace() || c == '"' || c == '\\')
        {
            cx.err(
                &format!("{path}[{i}]"),
                format!("{s:?} is not a scope; expected one scope per list item, without spaces"),
            );
        }
    }
}

/// Two credentials spending the same refresh-token family would each
/// invalidate the other's token at every rotation.
fn shared_refresh_families(creds: &BTreeMap<String, Arc<CredentialConfig>>, cx: &mut Ctx<'_>) {
    let mut seeds: HashMap<&str, &str> = HashMap::new();
    let mut families: HashMap<(String, &str), &str> = HashMap::new();
    for (name, c) in creds {
        let base = key_path("credentials", name);
        if let Some(seed) = &c.refresh_token {
            let key = if c.refresh_token_file.is_some() {
                "refresh_token_file"
            } else {
                "refresh_token"
            };
            if let Some(other) = seeds.insert(seed.expose(), name) {
                cx.err(
                    &format!("{base}.{key}"),
                    format!("is the same refresh token as credential {other:?} (fingerprint {}); each credential needs its own, or they revoke each other at every rotation", seed.fingerprint()),
                );
            }
        }
        if c.grant == GrantType::RefreshToken {
            let endpoint = match (&c.token_url, &c.issuer) {
                (Some(u), _) => u.to_string(),
                (None, Some(i)) => format!("issuer {i}"),
                (None, None) => continue,
            };
            if let Some(other) = families.insert((endpoint.clone(), c.client_id.as_str()), name) {
                cx.err(
                    &format!("{base}.client_id"),
                    format!("credential {other:?} already refreshes client_id {:?} at {endpoint}; two refresh_token credentials for the same client would spend each other's rotation (merge them, and route both paths to one credential)", c.client_id),
                );
            }
        }
    }
}

fn routes(
    raw: Vec<RawRoute>,
    raw_creds: &BTreeMap<String, RawCredential>,
    creds: &BTreeMap<String, Arc<CredentialConfig>>,
    cx: &mut Ctx<'_>,
) -> Vec<RouteConfig> {
    let known: Vec<&str> = raw_creds.keys().map(String::as_str).collect();
    let mut seen: HashMap<(String, Option<String>), usize> = HashMap::new();
    let mut out = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let base = format!("routes[{i}]");
        let p = |k: &str| format!("{base}.{k}");

        let path_prefix = cx
            .required(
                &p("path_prefix"),
                r.path_prefix.as_ref(),
                "a path such as \"/github/\"",
            )
            .and_then(|s| {
                if !s.starts_with('/') {
                    cx.err(
                        &p("path_prefix"),
                        format!("{s:?} must start with '/'; expected e.g. \"/github/\""),
                    );
                    return None;
                }
                if s.contains(['?', '#']) || s.contains(char::is_whitespace) {
                    cx.err(
                        &p("path_prefix"),
                        format!("{s:?} must be a plain path, without query, fragment or spaces"),
                    );
                    return None;
                }
                Some(if s.ends_with('/') { s } else { format!("{s}/") })
            });
        let host = cx.host(&p("host"), r.host.as_ref());
        if let Some(prefix) = &path_prefix {
            if let Some(first) = seen.insert((prefix.clone(), host.clone()), i) {
                let on = host
                    .as_deref()
                    .map_or(String::new(), |h| format!(" for host {h:?}"));
                cx.err(
                    &p("path_prefix"),
                    format!("duplicate route: {prefix:?}{on} is already routes[{first}]"),
                );
            }
        }

        let allow_plaintext = r.allow_plaintext.unwrap_or(false);
        let template = r
            .upstream
            .as_deref()
            .filter(|u| u.contains("{token"))
            .map(|u| token_template(u.trim()));
        let (upstream, upstream_from) = match template {
            Some(Ok((field, path))) => (Some(path), Some(field)),
            Some(Err(m)) => {
                cx.err(&p("upstream"), m);
                (None, None)
            }
            None if r.upstream.is_none() => {
                cx.err(
                    &p("upstream"),
                    "missing; expected an http(s) URL such as \"https://api.github.com/\"",
                );
                (None, None)
            }
            None => (
                cx.url(&p("upstream"), r.upstream.as_ref(), UrlRule::Any),
                None,
            ),
        };
        if let Some(u) = upstream.as_ref().filter(|_| upstream_from.is_none()) {
            if u.authority().is_some_and(|a| a.as_str().contains('@')) {
                // It would reach the upstream's Host header, logs and pages.
                cx.err(
                    &p("upstream"),
                    "must not contain user:password@; the route's credential is what authenticates",
                );
            }
            if u.query().is_some() {
                cx.err(&p("upstream"), "must not have a query string");
            }
            if u.scheme_str() == Some("http")
                && !allow_plaintext
                && !is_loopback_host(u.host().unwrap_or(""))
            {
                cx.err(&p("upstream"), format!("{} is plain http off loopback: the token would travel in clear; use https or set allow_plaintext = true", without_userinfo(&u.to_string())));
            }
        }

        let credential = cx.required(
            &p("credential"),
            r.credential.as_ref(),
            "the name of a [credentials.NAME] table",
        );
        let grant = credential
            .as_deref()
            .and_then(|name| match creds.get(name) {
                Some(c) => Some(c.grant),
                None => {
                    if raw_creds.contains_key(name) {
                        // Exists but is invalid: its own errors say why.
                        return None;
                    }
                    let known = if known.is_empty() {
                        "none defined".to_owned()
                    } else {
                        known.join(", ")
                    };
                    cx.err(
                        &p("credential"),
                        format!("unknown credential {name:?} (known: {known})"),
                    );
                    None
                }
            });

        if let (Some(field), Some(cred)) = (
            upstream_from,
            credential.as_deref().and_then(|n| creds.get(n)),
        ) {
            // Without a profile, what the IdP sends is the user's call.
            if let Some(profile) = cred.provider {
                if !profile.token_fields.contains(&field.as_str()) {
                    let senders: Vec<&str> = crate::providers::PROFILES
                        .iter()
                        .filter(|p| p.token_fields.contains(&field.as_str()))
                        .map(|p| p.name)
                        .collect();
                    cx.err(
                        &p("upstream"),
                        format!(
                            "credential {:?} (provider = {:?}) sends no {} in its token responses; of the profiles, only {} do",
                            cred.name,
                            profile.name,
                            field.as_str(),
                            senders.join(", ")
                        ),
                    );
                }
            }
        }

        let header = match cx.str(&p("header"), r.header.as_ref()) {
            None => http::header::AUTHORIZATION,
            Some(h) => match HeaderName::from_bytes(h.as_bytes()) {
                Ok(name) if REFUSED_HEADERS.contains(&name.as_str()) => {
                    cx.err(&p("header"), format!("{h:?} is a hop-by-hop or framing header the proxy controls; expected e.g. \"Authorization\" or \"X-Api-Key\""));
                    http::header::AUTHORIZATION
                }
                Ok(name) => name,
                Err(_) => {
                    cx.err(
                        &p("header"),
                        format!(
                            "{h:?} is not a valid header name; expected e.g. \"Authorization\""
                        ),
                    );
                    http::header::AUTHORIZATION
                }
            },
        };
        let format = match cx.str(&p("format"), r.format.as_ref()) {
            None => TokenFormat::default(),
            Some(f) => parse_format(&f).unwrap_or_else(|m| {
                cx.err(&p("format"), m);
                TokenFormat::default()
            }),
        };

        let scopes = cx.strings(&p("scopes"), r.scopes.as_ref());
        if let Some(s) = &scopes {
            check_scopes(cx, &p("scopes"), s);
        }
        let resource = cx.str(&p("resource"), r.resource.as_ref());
        if grant == Some(GrantType::RefreshToken) {
            for (k, set) in [
                ("scopes", r.scopes.is_some()),
                ("resource", r.resource.is_some()),
            ] {
                if set {
                    cx.err(&p(k), "a per-route token needs grant = \"client_credentials\"; a refresh_token credential has one token for all its routes");
                }
            }
        }

        let mut refresh_on = Vec::new();
        for (j, s) in r
            .refresh_on
            .clone()
            .unwrap_or_else(|| vec![401])
            .into_iter()
            .enumerate()
        {
            match u16::try_from(s) {
                Ok(s) if (400..=599).contains(&s) => refresh_on.push(s),
                _ => cx.err(
                    &format!("{}[{j}]", p("refresh_on")),
                    format!("{s} is not an error status; expected 400..=599"),
                ),
            }
        }

        let replay_max_body = cx.size(&p("replay_max_body"), r.replay_max_body.as_ref(), 64 * 1024);

        out.push(RouteConfig {
            path_prefix: path_prefix.unwrap_or_default(),
            host,
            upstream: upstream.unwrap_or_else(|| Uri::from_static("http://invalid/")),
            upstream_from,
            credential: credential.unwrap_or_default(),
            strip_prefix: r.strip_prefix.unwrap_or(true),
            header,
            format,
            scopes,
            resource,
            refresh_on,
            replay: r.replay.unwrap_or(true),
            replay_max_body,
            connect_timeout: cx.positive_duration(
                &p("connect_timeout"),
                r.connect_timeout.as_ref(),
                Duration::from_secs(5),
            ),
            response_timeout: cx.positive_duration(
                &p("response_timeout"),
                r.response_timeout.as_ref(),
                Duration::from_secs(60),
            ),
            idle_timeout: cx.positive_duration(
                &p("idle_timeout"),
                r.idle_timeout.as_ref(),
                Duration::from_secs(60),
            ),
            upgrades: r.upgrades.unwrap_or(false),
            ca_file: cx.path(&p("ca_file"), r.ca_file.as_ref()),
            allow_plaintext,
        });
    }
    out
}

/// `"{token.instance_url}/services/data/"` → the field and the path after
/// it. The value must begin the URL: a response may name the origin, never
/// a part of a path or a query.
fn token_template(u: &str) -> Result<(crate::token_fields::TokenField, Uri), String> {
    use crate::token_fields::TokenField;
    let known = TokenField::ALL
        .iter()
        .map(|f| format!("{{token.{}}}", f.as_str()))
        .collect::<Vec<_>>()
        .join(", ");
    let Some((name, path)) = u
        .strip_prefix("{token.")
        .and_then(|rest| rest.split_once('}'))
    else {
        return Err(format!(
            "{u:?}: a token value must be written {{token.NAME}} at the start of upstream (known: {known})"
        ));
    };
    let Some(field) = TokenField::parse(name) else {
        return Err(format!(
            "{u:?}: unknown token value {{token.{name}}} (known: {known})"
        ));
    };
    let path = if path.is_empty() { "/" } else { path };
    if !path.starts_with('/') || path.contains(['{', '}', '?', '#']) {
        return Err(format!(
            "{u:?}: after {{token.{name}}} only a path may follow, such as \"/services/data/\""
        ));
    }
    match path.parse::<Uri>() {
        Ok(p) if p.scheme().is_none() && p.authority().is_none() => Ok((field, p)),
        _ => Err(format!("{u:?}: {path:?} is not a valid path")),
    }
}

/// `"Bearer {token}"` → prefix/suffix; exactly one `{token}`, and the rest
/// must be valid in a header value.
pub fn parse_format(f: &str) -> Result<TokenFormat, String> {
    let expected = "expected one {token}, e.g. \"Bearer {token}\" or \"token {token}\"";
    let Some((prefix, suffix)) = f.split_once("{token}") else {
        return Err(format!("{f:?} has no {{token}}; {expected}"));
    };
    if suffix.contains("{token}") {
        return Err(format!(
            "{f:?} contains {{token}} more than once; {expected}"
        ));
    }
    if f.contains(['\r', '\n']) {
        return Err(format!("{f:?} contains a line break; {expected}"));
    }
    if HeaderValue::from_str(&format!("{prefix}x{suffix}")).is_err() {
        return Err(format!(
            "{f:?} contains characters not allowed in a header value; {expected}"
        ));
    }
    Ok(TokenFormat {
        prefix: prefix.to_owned(),
        suffix: suffix.to_owned(),
    })
}
