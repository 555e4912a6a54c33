//! The one client of a running proxy's admin API, for `tokenproxy status`,
//! `doctor` and `login`: where the API is (`admin.listen` or `--admin`),
//! and requests that carry `admin.token` when the config has one (off
//! loopback, everything but the probes needs it).
//!
//! Connects directly, never through an egress proxy: the admin API is this
//! host's (or pod's) own listener, and the token must not pass a proxy.

use crate::config::{Config, ListenAddr};
use crate::secret::Secret;
use bytes::Bytes;
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

/// The header a mutating admin request carries (no CSRF from a browser:
/// a page elsewhere cannot send it without a preflight). Here, not in
/// `admin`, so that this client and the server share it without a cycle.
pub const ADMIN_HEADER: &str = "x-tokenproxy-admin";

/// A request and its answer together (connection, head and body).
const TIMEOUT: Duration = Duration::from_secs(5);
/// Admin answers are small JSON documents.
const MAX_BODY: usize = 1024 * 1024;

/// A running proxy's admin API, as this config (or `--admin`) names it.
pub(crate) struct AdminClient {
    base: String,
    token: Option<Secret>,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

impl AdminClient {
    /// `explicit` is `--admin` (`host:port` or a URL); else `admin.listen`
    /// when it is TCP with a fixed port (an unspecified address is asked
    /// on loopback). None when there is nothing to ask.
    pub(crate) fn new(config: &Config, explicit: Option<&str>) -> Option<AdminClient> {
        let base = match explicit {
            Some(a) => {
                let a = a.trim_end_matches('/');
                if a.contains("://") {
                    a.to_owned()
                } else {
                    format!("http://{a}")
                }
            }
            None => match &config.admin.listen {
                ListenAddr::Tcp(a) if a.port() != 0 => {
                    let host = match a.ip().to_canonical() {
                        IpAddr::V4(v) if v.is_unspecified() => "127.0.0.1".to_owned(),
                        IpAddr::V6(v) if v.is_unspecified() => "[::1]".to_owned(),
                        IpAddr::V6(v) => format!("[{v}]"),
                        ip => ip.to_string(),
                    };
                    format!("http://{host}:{}", a.port())
                }
                _ => return None,
            },
        };
        let tls = crate::tls::client_config(None, None, &[]).ok()?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(TIMEOUT));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Some(AdminClient {
            base,
            token: config.admin.token.clone(),
            client: Client::builder(TokioExecutor::new()).build(https),
        })
    }

    /// `http://host:port`, without a trailing `/`.
    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    /// `GET base+path` with the admin token: the status and the body, or
    /// why there was no answer (never the token).
    pub(crate) async fn get(&self, path: &str) -> Result<(StatusCode, Bytes), String> {
        self.send(http::Method::GET, path).await
    }

    /// `POST base+path` with the admin token and the admin header (the
    /// mutating endpoints' rule), no body.
    pub(crate) async fn post(&self, path: &str) -> Result<(StatusCode, Bytes), String> {
        self.send(http::Method::POST, path).await
    }

    async fn send(&self, method: http::Method, path: &str) -> Result<(StatusCode, Bytes), String> {
        let url = format!("{}{path}", self.base);
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(&url)
            .header(header::ACCEPT, "application/json");
        if method == http::Method::POST {
            builder = builder.header(ADMIN_HEADER, "1");
        }
        let mut req = builder
            .body(Empty::new())
            .map_err(|e| format!("{url}: {e}"))?;
        if let Some(t) = &self.token {
            if let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {}", t.expose())) {
                v.set_sensitive(true);
                req.headers_mut().insert(header::AUTHORIZATION, v);
            }
        }
        let go = async {
            let resp = self.client.request(req).await.map_err(|e| {
                format!("{url}: {} (is tokenproxy running?)", crate::error_chain(&e))
            })?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("{url}: {e}"))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(TIMEOUT, go)
            .await
            .map_err(|_| format!("{url}: no answer within {} s", TIMEOUT.as_secs()))?
    }
}

/// `tokenproxy status`: the admin API's view as a table.
pub(crate) async fn status_table(config: &Config) -> Result<String, String> {
    let admin = AdminClient::new(config, None)
        .ok_or("status needs a TCP admin.listen with a fixed port")?;
    let (status, body) = admin.get("/credentials").await?;
    let url = format!("{}/credentials", admin.base());
    if !status.is_success() {
        return Err(format!(
            "{url}: {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    let list: Vec<serde_json::Value> =
        serde_json::from_slice(&body).map_err(|e| format!("{url}: not JSON: {e}"))?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<18} {:<10} {:>10} {:>6}  {:<16} LAST ERROR",
        "CREDENTIAL", "GRANT", "STATE", "EXPIRES IN", "GEN", "FAMILY"
    );
    for c in &list {
        let s = |k: &str| c[k].as_str().unwrap_or("-").to_owned();
        let expires = c["expires_in_s"]
            .as_u64()
            .map_or("-".into(), |v| format!("{v}s"));
        let generation = c["generation"]
            .as_u64()
            .map_or("-".into(), |v| v.to_string());
        let error = match &c["last_error"] {
            serde_json::Value::Object(e) => format!(
                "{} ({}): {}",
                e.get("outcome").and_then(|v| v.as_str()).unwrap_or(""),
                e.get("reason").and_then(|v| v.as_str()).unwrap_or(""),
                e.get("hint").and_then(|v| v.as_str()).unwrap_or("")
            ),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:<16} {:<18} {:<10} {:>10} {:>6}  {:<16} {}",
            s("credential"),
            s("grant_type"),
            s("state"),
            expires,
            generation,
            s("family"),
            error
        );
        // Hosts the routes of `{token.NAME}` go to (no secret).
        if let Some(values) = c["token_fields"].as_object().filter(|m| !m.is_empty()) {
            let shown: Vec<String> = values
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?")))
                .collect();
            let _ = writeln!(out, "{:<16} token values: {}", "", shown.join(", "));
        }
    }
    Ok(out)
}
