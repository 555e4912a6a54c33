//! The echo upstream: checks the bearer token through a [`TokenCheck`] and
//! reports what it received as JSON, plus a few special paths that tests use
//! to exercise the proxy's forwarding (status codes, delays, large and slow
//! bodies, redirects, trailers, upgrades, hop-by-hop headers).
//!
//! Special paths match on the path's LAST segments, so a proxy that adds a
//! prefix still reaches them (`/api/v1/status/503` is `/status/503`):
//!
//! | path | behaviour |
//! |---|---|
//! | `…/status/{code}` | the echo JSON with that status (no body for 1xx/204/304) |
//! | `…/delay/{ms}` | sleeps before the headers, then echoes |
//! | `…/bytes/{n}` | `n` bytes of `x`, streamed in 64 KiB chunks, with a content length |
//! | `…/slow-body/{ms}` | headers at once, one body chunk after `ms` |
//! | `…/redirect` | 302 to `{url}/landed` with `Link: <{url}/page2>; rel="next"` |
//! | `…/trailers` | chunked JSON (`te_trailers`, `request_trailers`) then trailer `grpc-status: 0` |
//! | `…/ws` | `Upgrade: websocket` → 101 with RFC 6455 accept, then a raw byte echo |
//! | `…/hop` | echo plus hop-by-hop headers the proxy must strip |
//! | `…/set-header/{name}/{value}` | echo plus that response header |
//!
//! Any path with a `public` segment (`/public/...`) skips the token check.
//!
//! With [`EchoUpstream::set_dpop`], a DPoP-bound token (RFC 9449 §7) must
//! come as `Authorization: DPoP <token>` with one valid proof for this
//! request: signature, `htm`, `htu`, `iat`, a new `jti`, `ath` of the token,
//! the key it is bound to, and the nonce when one is demanded
//! ([`EchoUpstream::set_dpop_nonce`]). Refusals are 401s whose
//! `WWW-Authenticate` carries the reason.
//! Stands alone: it must not depend on the token, proxy or config modules.

use super::serve::{empty, full, ChanBody, DevBody, Handler, RepeatBody, Server};
use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::ser::{Serialize, SerializeMap, Serializer};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

/// Decides whether a presented access token is valid (e.g. the dev IdP's
/// [`crate::dev::DevIdp::token_check`]).
pub type TokenCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// The DPoP key (`jkt`) a token is bound to, `None` for a bearer token
/// (e.g. the dev IdP's [`crate::dev::DevIdp::dpop_binding`]).
pub type DpopBinding = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// A running echo upstream. Cheap to clone.
#[derive(Clone)]
pub struct EchoUpstream {
    inner: Arc<EchoInner>,
}

struct EchoInner {
    server: Server,
    state: Arc<EchoState>,
}

struct EchoState {
    check: TokenCheck,
    requests: AtomicUsize,
    /// Non-public requests without a token the check accepts (answered 401).
    unauthorized: AtomicUsize,
    // Filled in after binding (port 0); read by `/redirect`.
    url: parking_lot::RwLock<String>,
    dpop: parking_lot::RwLock<Option<DpopBinding>>,
    /// Demanded in every proof when set (RFC 9449 §9).
    dpop_nonce: parking_lot::RwLock<Option<String>>,
    /// Proof jtis seen, with their iat.
    seen_jti: parking_lot::Mutex<std::collections::HashMap<String, u64>>,
    nonce_challenges: AtomicUsize,
    /// GitHub's 401: `{"message": "Bad credentials"}`, no `WWW-Authenticate`
    /// error, so nothing says the token is invalid rather than unfit.
    bare_401: std::sync::atomic::AtomicBool,
}

const CHUNK: usize = 64 * 1024;
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

impl EchoUpstream {
    /// Plain TCP: HTTP/1.1, and HTTP/2 with prior knowledge (h2c).
    pub async fn start(addr: SocketAddr, check: TokenCheck) -> io::Result<EchoUpstream> {
        Self::start_inner(addr, check, None, "http").await
    }

    /// TLS; ALPN defaults to `h2, http/1.1` when the config sets none.
    pub async fn start_tls(
        addr: SocketAddr,
        check: TokenCheck,
        tls: Arc<rustls::ServerConfig>,
    ) -> io::Result<EchoUpstream> {
        let tls = if tls.alpn_protocols.is_empty() {
            let mut config = (*tls).clone();
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Arc::new(config)
        } else {
            tls
        };
        Self::start_inner(addr, check, Some(TlsAcceptor::from(tls)), "https").await
    }

    async fn start_inner(
        addr: SocketAddr,
        check: TokenCheck,
        tls: Option<TlsAcceptor>,
        scheme: &str,
    ) -> io::Result<EchoUpstream> {
        let state = Arc::new(EchoState {
            bare_401: Default::default(),
            check,
            requests: AtomicUsize::new(0),
            unauthorized: AtomicUsize::new(0),
            url: parking_lot::RwLock::new(String::new()),
            dpop: Default::default(),
            dpop_nonce: Default::default(),
            seen_jti: Default::default(),
            nonce_challenges: AtomicUsize::new(0),
        });
        let handler_state = state.clone();
        let handler: Handler = Arc::new(move |req| Box::pin(handle(handler_state.clone(), req)));
        let server = Server::bind(addr, handler, tls).await?;
        *state.url.write() = format!("{scheme}://{}", server.addr());
        Ok(EchoUpstream {
            inner: Arc::new(EchoInner { server, state }),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.server.addr()
    }

    /// `http://127.0.0.1:PORT` (or `https://` for [`EchoUpstream::start_tls`]).
    pub fn url(&self) -> String {
        self.inner.state.url.read().clone()
    }

    /// Closes the listener and all connections.
    pub async fn stop(&self) {
        self.inner.server.stop().await
    }

    /// Connections accepted so far: how well the proxy reuses them.
    pub fn connections(&self) -> u64 {
        self.inner.server.connections()
    }

    /// Answer 401s as GitHub does (see `EchoState::bare_401`).
    pub fn set_bare_401(&self, on: bool) {
        self.inner.state.bare_401.store(on, Ordering::Relaxed);
    }

    /// Requests received so far (all paths, including rejected ones).
    pub fn requests(&self) -> usize {
        self.inner.state.requests.load(Ordering::Relaxed)
    }

    /// Requests that came without a valid token (each answered 401).
    pub fn unauthorized(&self) -> usize {
        self.inner.state.unauthorized.load(Ordering::Relaxed)
    }

    /// Verifies DPoP from now on: `binding` says which tokens are bound.
    pub fn set_dpop(&self, binding: DpopBinding) {
        *self.inner.state.dpop.write() = Some(binding);
    }

    /// Demands `nonce` in every proof (`None`: no nonce).
    pub fn set_dpop_nonce(&self, nonce: Option<&str>) {
        *self.inner.state.dpop_nonce.write() = nonce.map(str::to_owned);
    }

    /// 401 `use_dpop_nonce` answers so far.
    pub fn nonce_challenges(&self) -> usize {
        self.inner.state.nonce_challenges.load(Ordering::Relaxed)
    }
}

/// Header map serialized as `{name: [values...]}` in arrival order
/// (serde_json's own map would sort the names).
struct OrderedHeaders(Vec<(String, Vec<String>)>);

impl OrderedHeaders {
    fn from(headers: &HeaderMap) -> Self {
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        for (name, value) in headers {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            match out.iter_mut().find(|(n, _)| n == name.as_str()) {
                Some((_, values)) => values.push(value),
                None => out.push((name.as_str().to_owned(), vec![value])),
            }
        }
        OrderedHeaders(out)
    }
}

impl Serialize for OrderedHeaders {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (name, values) in &self.0 {
            map.serialize_entry(name, values)?;
        }
        map.end()
    }
}

#[derive(serde::Serialize)]
struct EchoReport {
    method: String,
    path: String,
    query: Option<String>,
    version: String,
    headers: OrderedHeaders,
    body_len: u64,
    token_ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    te_trailers: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_trailers: Option<OrderedHeaders>,
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<DevBody> {
    let body = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Extracts the token from `Bearer <t>`, `token <t>` (GitHub style) or
/// `DPoP <t>`.
fn presented_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    let known = scheme.eq_ignore_ascii_case("bearer")
        || scheme.eq_ignore_ascii_case("token")
        || scheme.eq_ignore_ascii_case("dpop");
    (known && !token.is_empty()).then_some(token)
}

/// A DPoP refusal: the `WWW-Authenticate` value, and whether to send the
/// nonce.
struct DpopRefusal {
    challenge: String,
    nonce: bool,
}

fn refuse(error: &str, description: &str) -> DpopRefusal {
    DpopRefusal {
        challenge: format!(
            "DPoP algs=\"ES256 EdDSA\", error=\"{error}\", error_description=\"{description}\""
        ),
        nonce: false,
    }
}

/// RFC 9449 §7: whether `token` comes with what its binding needs. `Ok`
/// for a bearer token the binding does not cover.
fn check_dpop(
    state: &EchoState,
    req: &Request<Incoming>,
    token: &str,
) -> Result<Option<String>, DpopRefusal> {
    let Some(binding) = state.dpop.read().clone() else {
        return Ok(None);
    };
    let scheme_dpop = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.len() > 5 && v[..5].eq_ignore_ascii_case("dpop "));
    let bound = binding(token);
    if bound.is_none() && !scheme_dpop {
        return Ok(None);
    }
    if !scheme_dpop {
        return Err(DpopRefusal {
            challenge: "Bearer error=\"invalid_token\", error_description=\"DPoP-bound token presented as a bearer token\"".into(),
            nonce: false,
        });
    }
    let proofs: Vec<&HeaderValue> = req.headers().get_all("dpop").iter().collect();
    let [proof] = proofs.as_slice() else {
        return Err(refuse(
            "invalid_dpop_proof",
            "exactly one DPoP proof is required",
        ));
    };
    let proof = proof
        .to_str()
        .map_err(|_| refuse("invalid_dpop_proof", "DPoP proof is not text"))?;
    let htu = format!("{}{}", state.url.read(), req.uri().path());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let v = crate::dpop::verify(proof, req.method().as_str(), &htu, now)
        .map_err(|m| refuse("invalid_dpop_proof", &m))?;
    if v.ath.as_deref() != Some(crate::dpop::ath(token).as_str()) {
        return Err(refuse(
            "invalid_dpop_proof",
            "DPoP proof ath does not match the access token",
        ));
    }
    if bound.as_deref() != Some(v.jkt.as_str()) {
        return Err(refuse(
            "invalid_token",
            "the access token is not bound to the DPoP proof's key",
        ));
    }
    if let Some(n) = &*state.dpop_nonce.read() {
        if v.nonce.as_deref() != Some(n) {
            return Err(DpopRefusal {
                nonce: true,
                ..refuse(
                    "use_dpop_nonce",
                    "Resource server requires nonce in DPoP proof",
                )
            });
        }
    }
    let mut seen = state.seen_jti.lock();
    seen.retain(|_, iat| *iat + 2 * crate::dpop::IAT_WINDOW_SECS >= now);
    if seen.insert(v.jti, v.iat).is_some() {
        return Err(refuse("invalid_dpop_proof", "DPoP proof jti replayed"));
    }
    Ok(Some(v.jkt))
}

async fn handle(state: Arc<EchoState>, req: Request<Incoming>) -> Response<DevBody> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let public = segments.contains(&"public");
    let token_ok = presented_token(req.headers()).is_some_and(|t| (state.check)(t));
    if !public && token_ok {
        let token = presented_token(req.headers()).unwrap_or("");
        if let Err(r) = check_dpop(&state, &req, token) {
            state.unauthorized.fetch_add(1, Ordering::Relaxed);
            let mut resp = json_response(
                StatusCode::UNAUTHORIZED,
                &serde_json::json!({"error": "dpop", "error_description": r.challenge}),
            );
            if let Ok(v) = HeaderValue::from_str(&r.challenge) {
                resp.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
            }
            let nonce = state.dpop_nonce.read().clone();
            if let (true, Some(n)) = (r.nonce, nonce) {
                state.nonce_challenges.fetch_add(1, Ordering::Relaxed);
                if let Ok(v) = HeaderValue::from_str(&n) {
                    resp.headers_mut().insert("dpop-nonce", v);
                }
            }
            return resp;
        }
    }
    if !public && !token_ok {
        state.unauthorized.fetch_add(1, Ordering::Relaxed);
        if state.bare_401.load(Ordering::Relaxed) {
            return json_response(
                StatusCode::UNAUTHORIZED,
                &serde_json::json!({"message": "Bad credentials"}),
            );
        }
        let mut resp = json_response(
            StatusCode::UNAUTHORIZED,
            &serde_json::json!({
                "error": "invalid_token",
                "error_description": "missing, unknown, expired or revoked access token",
            }),
        );
        resp.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
        return resp;
    }

    let n = segments.len();
    let last = segments.last().copied().unwrap_or("");
    let last2 = (n >= 2).then(|| (segments[n - 2], segments[n - 1]));
    let last3 = (n >= 3).then(|| (segments[n - 3], segments[n - 2], segments[n - 1]));

    if let Some(("set-header", name, value)) = last3 {
        let mut resp = echo(req, token_ok, StatusCode::OK).await;
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            resp.headers_mut().append(name, value);
        }
        return resp;
    }
    match last2 {
        Some(("status", code)) => {
            return match code
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
            {
                Some(status) => echo(req, token_ok, status).await,
                None => text(StatusCode::BAD_REQUEST, "bad status code\n"),
            }
        }
        Some(("delay", ms)) => {
            let Ok(ms) = ms.parse::<u64>() else {
                return text(StatusCode::BAD_REQUEST, "bad delay\n");
            };
            tokio::time::sleep(Duration::from_millis(ms)).await;
            return echo(req, token_ok, StatusCode::OK).await;
        }
        Some(("bytes", count)) => {
            let Ok(count) = count.parse::<u64>() else {
                return text(StatusCode::BAD_REQUEST, "bad byte count\n");
            };
            let body = RepeatBody {
                remaining: count,
                chunk: Bytes::from(vec![b'x'; CHUNK]),
            };
            let mut resp = Response::new(body.boxed());
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            return resp;
        }
        Some(("slow-body", ms)) => {
            let Ok(ms) = ms.parse::<u64>() else {
                return text(StatusCode::BAD_REQUEST, "bad delay\n");
            };
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from_static(b"slow body\n"))))
                    .await;
            });
            return Response::new(ChanBody(rx).boxed());
        }
        _ => {}
    }
    match last {
        "redirect" => {
            let url = state.url.read().clone();
            let mut resp = text(StatusCode::FOUND, "redirecting\n");
            let headers = resp.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&format!("{url}/landed")) {
                headers.insert(http::header::LOCATION, v);
            }
            if let Ok(v) = HeaderValue::from_str(&format!("<{url}/page2>; rel=\"next\"")) {
                headers.insert(http::header::LINK, v);
            }
            resp
        }
        "trailers" => trailers(req, token_ok).await,
        "ws" => websocket(req),
        "hop" => {
            let mut resp = echo(req, token_ok, StatusCode::OK).await;
            let h = resp.headers_mut();
            h.insert(
                http::header::CONNECTION,
                HeaderValue::from_static("x-secret-hop"),
            );
            h.insert("x-secret-hop", HeaderValue::from_static("1"));
            h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            h.insert(
                http::header::PROXY_AUTHENTICATE,
                HeaderValue::from_static("x"),
            );
            resp
        }
        _ => echo(req, token_ok, StatusCode::OK).await,
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<DevBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    resp
}

fn report(req: &Request<Incoming>, token_ok: bool) -> EchoReport {
    EchoReport {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
        query: req.uri().query().map(str::to_owned),
        version: format!("{:?}", req.version()),
        headers: OrderedHeaders::from(req.headers()),
        body_len: 0,
        token_ok,
        te_trailers: None,
        request_trailers: None,
    }
}

/// Reads the request body frame by frame, counting data bytes (never holding
/// the whole body) and keeping any trailers.
async fn drain(body: &mut Incoming) -> (u64, Option<HeaderMap>) {
    let mut len = 0u64;
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        match frame.into_data() {
            Ok(data) => len += data.len() as u64,
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    (len, trailers)
}

async fn echo(mut req: Request<Incoming>, token_ok: bool, status: StatusCode) -> Response<DevBody> {
    let mut report = report(&req, token_ok);
    report.body_len = drain(req.body_mut()).await.0;
    if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        let mut resp = Response::new(empty());
        *resp.status_mut() = status;
        return resp;
    }
    json_response(status, &report)
}

async fn trailers(mut req: Request<Incoming>, token_ok: bool) -> Response<DevBody> {
    let mut report = report(&req, token_ok);
    report.te_trailers = Some(req.headers().get_all(http::header::TE).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.to_ascii_lowercase().contains("trailers"))
    }));
    let (len, request_trailers) = drain(req.body_mut()).await;
    report.body_len = len;
    report.request_trailers = request_trailers.as_ref().map(OrderedHeaders::from);
    let body = serde_json::to_vec(&report).unwrap_or_default();
    let (tx, rx) = mpsc::channel(2);
    let mut trailer_map = HeaderMap::new();
    trailer_map.insert("grpc-status", HeaderValue::from_static("0"));
    // Capacity 2: both frames fit, so no task is needed to feed them.
    let _ = tx.try_send(Ok(Frame::data(Bytes::from(body))));
    let _ = tx.try_send(Ok(Frame::trailers(trailer_map)));
    let mut resp = Response::new(ChanBody(rx).boxed());
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        http::header::TRAILER,
        HeaderValue::from_static("grpc-status"),
    );
    resp
}

/// RFC 6455 §4.2.2: `Sec-WebSocket-Accept` = base64(SHA-1(key + GUID)).
pub(crate) fn websocket_accept(key: &str) -> String {
    let digest = sha1(format!("{key}{WS_GUID}").as_bytes());
    base64::engine::general_purpose::STANDARD.encode(digest)
}

fn websocket(mut req: Request<Incoming>) -> Response<DevBody> {
    let is_upgrade = req
        .headers()
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = req
        .headers()
        .get(http::header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (true, Some(key)) = (is_upgrade, key) else {
        let mut resp = text(StatusCode::UPGRADE_REQUIRED, "websocket upgrade required\n");
        resp.headers_mut()
            .insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
        return resp;
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut io = TokioIo::new(upgraded);
        let mut buf = vec![0u8; 16 * 1024];
        // A raw byte echo (no frame parsing): enough to prove the tunnel.
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if io.write_all(&buf[..n]).await.is_err() || io.flush().await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    if let Ok(v) = HeaderValue::from_str(&websocket_accept(&key)) {
        h.insert(http::header::SEC_WEBSOCKET_ACCEPT, v);
    }
    resp
}

/// SHA-1 (FIPS 180-4), only for the WebSocket handshake; not worth a crate.
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A827999),
                20..=39 => (b ^ c ^ d, 0x6ED9EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (hi, v) in h.iter_mut().zip([a, b, c, d, e]) {
            *hi = hi.wrapping_add(v);
        }
    }
    let mut out = [0u8; 20];
    for (i, v) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
    }
    out
}
