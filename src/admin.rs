//! The admin listener: health, readiness, metrics, credential status (JSON
//! and a page for people), manual refresh and reload.
//!
//! Reads the engine and the metrics; changes state only through the engine's
//! own entry points (`begin_refresh`, `Live::reload`). Bound to loopback by
//! default; off loopback, everything but `/healthz`, `/readyz` and
//! `/metrics` needs `admin.token`. Mutating endpoints take only POST with the
//! token or the `x-tokenproxy-admin` header, which a browser cannot send
//! cross-site without a preflight (no CSRF); a cross-site mark (`Sec-Fetch-Site`,
//! a foreign `Origin`) refuses them anyway, and a `Host` that is not ours gets
//! `421` (DNS rebinding). Connections get the data path's guards.

use crate::live::Live;
use crate::login::escape;
use crate::metrics::metrics;
use crate::proxy::Listener;
use crate::token::engine::{SlotStatus, State};
use crate::token::reason::Reason;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use http_body_util::Full;
use hyper::body::Incoming;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

pub use crate::admin_client::ADMIN_HEADER;

type AdminResponse = Response<Full<Bytes>>;

/// Request bodies above this are refused unread: the biggest admin body is
/// the login confirmation form.
pub(crate) const MAX_BODY: usize = 16 * 1024;
/// Connections at once: the admin API serves people, probes and scrapers.
const MAX_CONNECTIONS: usize = 64;

/// Serves until `shutdown`, with the data path's connection guards: the
/// header read and keep-alive timeouts and head limits of `[server]`, a
/// connection cap and a body cap.
pub(crate) async fn serve(listener: Listener, live: Arc<Live>, shutdown: CancellationToken) {
    let server = live.config.load().server.clone();
    let guards = crate::proxy::Guards {
        max_connections: MAX_CONNECTIONS,
        header_read_timeout: server.header_read_timeout,
        keepalive_timeout: server.keepalive_timeout,
        max_header_bytes: server.max_header_bytes,
        max_headers: server.max_headers,
    };
    let handler = move |req: Request<Incoming>, local: bool, conflict: bool| {
        let live = live.clone();
        async move {
            let resp = if conflict {
                json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": "bad_request", "message": "Content-Length and Transfer-Encoding together"}),
                )
            } else {
                match read_body(req).await {
                    Ok(req) => handle_with_body(req, &live, local).await,
                    Err(r) => r,
                }
            };
            resp.map(|b| b.map_err(|never| match never {}).boxed())
        }
    };
    crate::proxy::serve_guarded(listener, guards, shutdown, handler).await
}

/// The body, up to [`MAX_BODY`], else a `413` (or `400` when it fails).
async fn read_body(req: Request<Incoming>) -> Result<Request<Bytes>, AdminResponse> {
    use http_body_util::BodyExt;
    let too_big = || {
        json(
            StatusCode::PAYLOAD_TOO_LARGE,
            serde_json::json!({"error": "body_too_large", "message": format!("admin request bodies are limited to {MAX_BODY} bytes")}),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        let mut r = too_big();
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Err(r);
    }
    let (parts, body) = req.into_parts();
    match http_body_util::Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => Ok(Request::from_parts(parts, c.to_bytes())),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_big()),
        Err(_) => Err(json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "bad_request", "message": "the request body failed"}),
        )),
    }
}

/// One admin request without its body (as [`handle_with_body`]).
/// `loopback`: whether the peer is on this host (a unix socket counts).
pub async fn handle<B>(req: Request<B>, live: &Live, loopback: bool) -> AdminResponse {
    handle_with_body(req.map(|_| Bytes::new()), live, loopback).await
}

/// One admin request, its body read (at most [`MAX_BODY`]).
pub(crate) async fn handle_with_body(
    req: Request<Bytes>,
    live: &Live,
    loopback: bool,
) -> AdminResponse {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let config = live.config.load_full();
    let token_ok = has_admin_token(&req, config.admin.token.as_ref());
    let probe = matches!(
        (method.as_str(), path.as_str()),
        ("GET" | "HEAD", "/healthz" | "/readyz") | ("GET", "/metrics")
    );
    // DNS rebinding: a page on evil.example whose name now resolves to us.
    if let Some(refused) = check_host(&req, &config, probe || token_ok) {
        return refused;
    }
    // Open to kubelet probes and Prometheus on the pod IP.
    match (method.as_str(), path.as_str()) {
        ("GET" | "HEAD", "/healthz") => return text(StatusCode::OK, "ok\n"),
        ("GET" | "HEAD", "/readyz") => return readyz(live),
        ("GET", "/metrics") => return metrics_page(live, wants_openmetrics(&req)),
        _ => {}
    }
    if !loopback && !token_ok {
        return json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "unauthorized", "message": "off loopback, send Authorization: Bearer <admin.token>"}),
        );
    }
    // A browser page elsewhere must not change state here, whatever else
    // it manages to send; starting a login counts (the callback is the
    // IdP's cross-site redirect, bound to its state and cookie instead).
    let starts_something = method == Method::POST || path.starts_with("/login/");
    if starts_something && crate::proxy::is_cross_site(req.headers(), &admin_hosts(&config)) {
        return json(
            StatusCode::FORBIDDEN,
            serde_json::json!({"error": "cross_site_request", "message": "cross-site browser requests are refused"}),
        );
    }
    // The browser login flow: GET only, state bound to a cookie.
    let view = crate::login::AdminView {
        config: config.clone(),
        engine: live.engine.load_full(),
        logins: &live.logins,
    };
    if let Some(r) = crate::login::handle_admin(&req, &view).await {
        return r;
    }
    if method == Method::POST {
        if !token_ok && !req.headers().contains_key(ADMIN_HEADER) {
            return json(
                StatusCode::FORBIDDEN,
                serde_json::json!({"error": "forbidden", "message": format!("send the header {ADMIN_HEADER}: 1 (or the admin token)")}),
            );
        }
        if path == "/reload" {
            return match live.reload().await {
                Ok(()) => json(StatusCode::OK, serde_json::json!({"reloaded": true})),
                // Validation errors are for the operator who asked (file,
                // line, key; secrets redacted); any other cause goes to the log.
                Err(crate::live::AppError::Config(errors)) => json(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    serde_json::json!({"reloaded": false, "error": "config_rejected", "message": errors.to_string()}),
                ),
                Err(e) => {
                    tracing::error!(error = %crate::error_chain(&e), "Reload failed; keeping the running configuration");
                    json(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        serde_json::json!({"reloaded": false, "error": "reload_failed", "message": "the new configuration could not be applied; the log says why"}),
                    )
                }
            };
        }
        if let Some(name) = path
            .strip_prefix("/credentials/")
            .and_then(|p| p.strip_suffix("/refresh"))
        {
            return refresh(live, name).await;
        }
        if let Some(name) = path
            .strip_prefix("/credentials/")
            .and_then(|p| p.strip_suffix("/device"))
        {
            let Some(slot) = live.engine.load().slot(name).cloned() else {
                return json(
                    StatusCode::NOT_FOUND,
                    serde_json::json!({"error": "no_such_credential"}),
                );
            };
            let force = form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
                .any(|(k, v)| k == "force" && matches!(&*v, "1" | "true" | "yes"));
            let (status, body) =
                crate::device::admin_start(&config, slot, &live.devices, force).await;
            return json(status, body);
        }
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not_found"}),
        );
    }
    if method != Method::GET && method != Method::HEAD {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": "method_not_allowed"}),
        );
    }
    let engine = live.engine.load_full();
    match path.as_str() {
        "/" => status_page(live),
        "/credentials" => {
            let all: Vec<_> = engine
                .status()
                .iter()
                .map(|s| with_device(live, s))
                .collect();
            json(StatusCode::OK, serde_json::Value::Array(all))
        }
        p => match p.strip_prefix("/credentials/") {
            Some(name) => {
                let found: Vec<_> = engine
                    .status()
                    .iter()
                    .filter(|s| s.credential == name)
                    .map(|s| with_device(live, s))
                    .collect();
                match found.len() {
                    0 => json(
                        StatusCode::NOT_FOUND,
                        serde_json::json!({"error": "no_such_credential"}),
                    ),
                    1 => json(StatusCode::OK, found[0].clone()),
                    _ => json(StatusCode::OK, serde_json::Value::Array(found)),
                }
            }
            None => json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "not_found"}),
            ),
        },
    }
}

/// Which `Host` values reach the admin API: loopback names, the listen
/// addresses (admin and proxy) and `server.hosts`.
fn admin_hosts(config: &crate::config::Config) -> crate::proxy::HostPolicy {
    let mut names = config.server.hosts.clone();
    for l in config.server.listen.iter().chain([&config.admin.listen]) {
        if let crate::config::ListenAddr::Tcp(a) = l {
            if !a.ip().is_unspecified() {
                names.push(crate::proxy::HostPolicy::ip_name(a.ip()));
            }
        }
    }
    crate::proxy::HostPolicy::new(names)
}

/// `421` for a foreign `Host`, `400` for two or a malformed one. No `Host`
/// at all (HTTP/1.0 tools) passes: a browser always sends one. Probes and
/// requests with the admin token also take an IP literal (kubelet,
/// Prometheus and operators dial the pod IP): a rebinding page always sends
/// its own name, and cannot attach the token.
fn check_host<B>(
    req: &Request<B>,
    config: &crate::config::Config,
    ip_literal_ok: bool,
) -> Option<AdminResponse> {
    let mut all = req.headers().get_all(header::HOST).iter();
    let value = match (all.next(), all.next()) {
        (_, Some(_)) => return Some(bad_host("more than one Host header")),
        (Some(v), None) => v.to_str().ok().map(str::to_owned),
        (None, None) => match req.uri().authority() {
            Some(a) => Some(a.as_str().to_owned()),
            None => return None,
        },
    };
    let Some(value) = value else {
        return Some(bad_host("malformed Host"));
    };
    let Some(host) = crate::proxy::host_of(&value) else {
        return Some(bad_host("malformed Host"));
    };
    let ip_literal = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .is_ok();
    if (ip_literal_ok && ip_literal) || admin_hosts(config).allows(&host) {
        return None;
    }
    let mut r = json(
        StatusCode::MISDIRECTED_REQUEST,
        serde_json::json!({"error": "host_not_allowed", "message": "this Host is not one of the admin listener's names; add it to server.hosts"}),
    );
    r.headers_mut().insert(
        crate::proxy::error::X_TOKENPROXY_ERROR.clone(),
        HeaderValue::from_static("host_not_allowed"),
    );
    Some(r)
}

fn bad_host(message: &'static str) -> AdminResponse {
    json(
        StatusCode::BAD_REQUEST,
        serde_json::json!({"error": "bad_request", "message": message}),
    )
}

/// Constant-time comparison of `Authorization: Bearer <token>`.
fn has_admin_token<B>(req: &Request<B>, token: Option<&crate::secret::Secret>) -> bool {
    let Some(token) = token else {
        return false;
    };
    let Some(given) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (a, b) = (given.as_bytes(), token.expose().as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Config loaded and listeners bound (we are answering); the store opens;
/// with `ready_requires_tokens`, every credential has a usable token.
fn readyz(live: &Live) -> AdminResponse {
    let config = live.config.load_full();
    let needs_store = config
        .credentials
        .values()
        .any(|c| c.grant == crate::config::GrantType::RefreshToken);
    // Postgres is not probed here: a database blip must not take the whole
    // fleet out of service while cached tokens serve (/credentials says so).
    if needs_store && config.store.kind == crate::config::StoreKind::File {
        if let Some(e) = live.ready.check(&config) {
            // The path and the cause go to the log, not to whoever probes.
            tracing::warn!(error = %crate::error_chain(&e), "Store unreadable: not ready");
            return json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"ready": false, "reason": Reason::StoreUnavailable, "message": "the token store cannot be read; the log says why"}),
            );
        }
    }
    if config.admin.ready_requires_tokens {
        let missing: Vec<String> = live
            .engine
            .load()
            .status()
            .into_iter()
            .filter(|s| !matches!(s.state, State::Fresh | State::Refreshing))
            .map(|s| s.credential)
            .collect();
        if !missing.is_empty() {
            return json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"ready": false, "reason": Reason::NoToken, "credentials": missing}),
            );
        }
    }
    text(StatusCode::OK, "ready\n")
}

/// Prometheus asks for OpenMetrics; scrapers that do not (older agents,
/// `promtool check metrics`) get the classic text format.
fn wants_openmetrics<B>(req: &Request<B>) -> bool {
    req.headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

fn metrics_page(live: &Live, openmetrics: bool) -> AdminResponse {
    let m = metrics();
    m.clear_credential_gauges();
    for s in live.engine.load().status() {
        m.set_credential(&s.credential, s.state.as_str(), s.state_since, s.expires_in);
        if let Some(up) = s.store_up {
            m.set_store_up(&s.credential, up);
        }
        if let Some(left) = s.refresh_expires_in {
            m.set_refresh_expires_in(&s.credential, left);
        }
    }
    let (body, content_type) = if openmetrics {
        (
            m.encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        (
            crate::metrics::to_text_format(&m.encode()),
            "text/plain; version=0.0.4; charset=utf-8",
        )
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

async fn refresh(live: &Live, name: &str) -> AdminResponse {
    let engine = live.engine.load_full();
    let Some(slot) = engine.slot(name).cloned() else {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "no_such_credential"}),
        );
    };
    let outcome = match slot.begin_refresh() {
        Ok(mut rx) => {
            match tokio::time::timeout(Duration::from_secs(35), rx.wait_for(Option::is_some)).await
            {
                Ok(Ok(o)) => o.clone(),
                _ => None,
            }
        }
        Err(f) => Some(Err(f)),
    };
    let status = status_json(&slot.status());
    match outcome {
        Some(Ok(())) => json(
            StatusCode::OK,
            serde_json::json!({"refreshed": true, "credential": status}),
        ),
        Some(Err(f)) => json(
            StatusCode::CONFLICT,
            serde_json::json!({"refreshed": false, "outcome": f.outcome, "reason": f.reason, "hint": f.hint, "credential": status}),
        ),
        None => json(
            StatusCode::GATEWAY_TIMEOUT,
            serde_json::json!({"refreshed": false, "reason": "still_running", "credential": status}),
        ),
    }
}

fn secs_since_epoch(t: Option<SystemTime>) -> serde_json::Value {
    t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| serde_json::json!(d.as_secs()))
        .unwrap_or(serde_json::Value::Null)
}

/// Secret-free by construction: `SlotStatus` holds no token.
pub(crate) fn status_json(s: &SlotStatus) -> serde_json::Value {
    serde_json::json!({
        "credential": s.credential,
        "grant_type": s.grant_type,
        "state": s.state.as_str(),
        "state_since": secs_since_epoch(s.state_since),
        "expires_in_s": s.expires_in.map(|d| d.as_secs()),
        "family": s.family,
        "generation": s.generation,
        "last_refresh": secs_since_epoch(s.last_refresh),
        "last_error": s.last_error.as_ref().map(|f| serde_json::json!({
            "outcome": f.outcome,
            "reason": f.reason,
            "status": f.status,
            "hint": f.hint,
            "at": secs_since_epoch(Some(f.at)),
        })),
        "refresh_token_fp": s.refresh_token_fp,
        "next_attempt_at": secs_since_epoch(s.next_attempt_at),
        "token_fields": s.token_fields,
    })
}

/// [`status_json`] plus the credential's device login, pending or failed
/// (user code and link, or the failure; never the device code).
fn with_device(live: &Live, s: &SlotStatus) -> serde_json::Value {
    let mut v = status_json(s);
    if let Some(d) = live.devices.status_json(&s.credential) {
        v["device_login"] = d;
    }
    v
}

fn json(status: StatusCode, body: serde_json::Value) -> AdminResponse {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn text(status: StatusCode, body: &'static str) -> AdminResponse {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn ago(t: Option<SystemTime>) -> String {
    match t.and_then(|t| SystemTime::now().duration_since(t).ok()) {
        Some(d) => format!(
            "{} ago",
            humantime::format_duration(Duration::from_secs(d.as_secs()))
        ),
        None => "never".into(),
    }
}

/// The page for the person paged at night: every credential and route, no
/// external assets, refreshed every 5 s, a live countdown in between.
fn status_page(live: &Live) -> AdminResponse {
    let config = live.config.load_full();
    let statuses = live.engine.load().status();
    let nonce = format!("{:032x}", rand::random::<u128>());
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut h = String::with_capacity(8192);
    h.push_str("<!doctype html><html lang=en><head><meta charset=utf-8><meta http-equiv=refresh content=5>");
    h.push_str("<meta name=viewport content=\"width=device-width\"><title>tokenproxy status</title><style>");
    h.push_str("body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin-bottom:2em}");
    h.push_str("th,td{border:1px solid #ccc;padding:.35em .6em;text-align:left;vertical-align:top}th{background:#f3f3f3;white-space:nowrap}td.state,td.num{white-space:nowrap}td.num{font-variant-numeric:tabular-nums}");
    h.push_str(".fresh{color:#176a1f;background:#e6f4e7;font-weight:600}.refreshing{color:#1f4f8a;background:#e5eef9;font-weight:600}.expired{color:#a35b00;background:#fdf0dc;font-weight:600}.dead{color:#fff;background:#b3261e;font-weight:600}.badge{padding:.05em .45em;border-radius:3px}.login{margin-left:.4em}.device{margin-top:.3em}.user-code{font:600 120% ui-monospace,monospace;letter-spacing:.08em}");
    h.push_str(".hint{color:#555;font-size:90%}</style></head><body><h1>tokenproxy</h1>");
    let _ = write!(
        h,
        "<p>version {} · config <code>{}</code></p><h2>Credentials</h2><table id=credentials><tr><th>Credential<th>Grant<th>State<th>Expires in<th>Generation<th>Last refresh<th>Last error</tr>",
        env!("CARGO_PKG_VERSION"),
        escape(&config.source.display().to_string())
    );
    for s in &statuses {
        let expires = match s.expires_in {
            Some(d) => format!(
                "<span class=countdown data-expires=\"{}\">{}s</span>",
                now + d.as_secs(),
                d.as_secs()
            ),
            None => "—".into(),
        };
        let error = match &s.last_error {
            Some(f) => format!(
                "<b>{}</b> ({}) {}<div class=hint>{}</div>",
                escape(f.outcome.as_str()),
                escape(f.reason.as_str()),
                escape(&ago(Some(f.at))),
                escape(&f.hint)
            ),
            None => "—".into(),
        };
        let mut login = if s.state == State::Dead && s.grant_type == "refresh_token" {
            format!(
                " <a class=login href=\"/login/{0}\">log in</a>",
                escape(&s.credential)
            )
        } else {
            String::new()
        };
        // A pending device login: what a person types on a phone. The
        // device code never reaches this page.
        if let Some((p, left)) = live.devices.pending(&s.credential) {
            let link = p
                .verification_uri_complete
                .as_deref()
                .unwrap_or(&p.verification_uri);
            let _ = write!(
                login,
                "<div class=device>Device login pending: open <a href=\"{href}\">{uri}</a> and enter <b class=user-code>{code}</b> (<span class=countdown data-expires=\"{exp}\">{left}s</span> left)</div>",
                href = escape(link),
                uri = escape(&p.verification_uri),
                code = escape(&p.user_code),
                exp = now + left.as_secs(),
                left = left.as_secs(),
            );
        }
        // The values routes of `{token.NAME}` use (hosts, never a secret),
        // as `/credentials` and `tokenproxy status` show them.
        let fields = if s.token_fields.is_empty() {
            String::new()
        } else {
            let shown: Vec<String> = s
                .token_fields
                .iter()
                .map(|(k, v)| format!("<code>{}={}</code>", escape(k), escape(v)))
                .collect();
            format!("<div class=hint>token values: {}</div>", shown.join(", "))
        };
        let _ = write!(
            h,
            "<tr data-credential=\"{name}\" data-state=\"{state}\"><td>{name}{fields}<td>{grant}<td class=state><span class=\"badge {state}\">{state}</span> since {since}{login}<td class=num>{expires}<td class=num>{generation}<td>{last}<td>{error}</tr>",
            name = escape(&s.credential),
            grant = escape(s.grant_type),
            state = escape(s.state.as_str()),
            since = escape(&ago(s.state_since)),
            generation = s.generation.map_or("—".into(), |g| g.to_string()),
            last = escape(&ago(s.last_refresh)),
        );
    }
    h.push_str("</table><h2>Routes</h2><table id=routes><tr><th>Route<th>Upstream<th>Credential<th>Requests<th>5xx<th>Proxy errors<th>Last upstream status</tr>");
    for r in &config.routes {
        let st = metrics().route_stats(&r.path_prefix);
        let requests = st.requests.load(Ordering::Relaxed);
        let rate = |n: u64| {
            if requests == 0 {
                "—".to_owned()
            } else {
                format!("{n} ({:.1} %)", 100.0 * n as f64 / requests as f64)
            }
        };
        let last = st.last_status.load(Ordering::Relaxed);
        let _ = write!(
            h,
            "<tr data-route=\"{prefix}\"><td>{prefix}{host}<td>{upstream}<td>{cred}<td class=num>{requests}<td class=num>{e5}<td class=num>{ep}<td class=num>{last}</tr>",
            prefix = escape(&r.path_prefix),
            host = r.host.as_deref().map(|h| format!(" (host {})", escape(h))).unwrap_or_default(),
            upstream = escape(&r.upstream_display()),
            cred = escape(&r.credential),
            e5 = rate(st.server_errors.load(Ordering::Relaxed)),
            ep = rate(st.proxy_errors.load(Ordering::Relaxed)),
            last = if last == 0 { "—".to_owned() } else { last.to_string() },
        );
    }
    let _ = write!(
        h,
        "</table><script nonce=\"{nonce}\">setInterval(function(){{var n=Date.now()/1000;document.querySelectorAll('.countdown').forEach(function(e){{var s=Math.max(0,Math.round(e.dataset.expires-n));e.textContent=s+'s';}});}},1000);</script></body></html>"
    );
    let mut r = Response::new(Full::new(Bytes::from(h)));
    let headers = r.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    if let Ok(csp) = HeaderValue::from_str(&format!(
        "default-src 'none'; style-src 'unsafe-inline'; script-src 'nonce-{nonce}'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )) {
        headers.insert("content-security-policy", csp);
    }
    r
}
