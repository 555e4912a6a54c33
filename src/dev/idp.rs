//! The dev identity provider: a strict OAuth 2.0 authorization server for
//! demos and tests. Refresh tokens rotate and belong to families; presenting a
//! spent one is reuse, which revokes the family and is counted (the oracle
//! every integration test asserts is zero). Faults are scripted per `/token`
//! request, and every `/token` request is recorded before it is answered.
//!
//! Endpoints: `POST /token`, `GET /authorize` (auto-approves, PKCE S256
//! required), `POST /device` and `GET /device/verify` (RFC 8628; the page
//! approves the user code it is given, or denies it with `deny=1`),
//! `POST /introspect` (RFC 7662), `POST /revoke` (RFC 7009) and RFC 8414
//! metadata under `/.well-known/`.
//!
//! All state sits behind one sync mutex that is never held across an await:
//! each grant is decided atomically, which is what makes "presented twice"
//! well defined even when requests race.

use super::echo::TokenCheck;
use super::serve::{full, ConnKill, DevBody, Handler, PeerCerts, Server};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use parking_lot::{Mutex, RwLock};
use rand::distributions::{Alphanumeric, DistString};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::time::Instant;

/// How the IdP behaves. `Default` registers one confidential client,
/// `demo-client`/`demo-secret`, accepting any auth method.
#[derive(Clone, Debug)]
pub struct IdpOptions {
    /// Access-token lifetime (`expires_in`). Default 10 s.
    pub access_ttl: Duration,
    /// `None`: refresh tokens never expire. `Some`: each refresh token expires
    /// that long after issue, sent as `refresh_token_expires_in`.
    pub refresh_ttl: Option<Duration>,
    /// Authorization-code lifetime. Default 60 s.
    pub code_ttl: Duration,
    /// Issue a new refresh token on every refresh and spend the presented
    /// one. When false the response carries no `refresh_token` (RFC 6749 §6)
    /// and the presented one stays active.
    pub rotate_refresh_tokens: bool,
    /// How long a spent refresh token still works (and is not reuse). 0: a
    /// spent token is invalid at once.
    pub reuse_grace: Duration,
    /// Device grant (RFC 8628): the polling `interval` it names, enforced
    /// (a faster poll earns `slow_down` and 5 s more). Default 5 s.
    pub device_interval: Duration,
    /// How long a device code lives (`expires_in`). Default 600 s.
    pub device_ttl: Duration,
    pub clients: Vec<DevClient>,
    /// How errors (and a few success details) are spelt, as a vendor
    /// documents them (docs/providers.md). Default: RFC 6749.
    pub dialect: Dialect,
    /// GitHub: a refresh revokes the family's earlier access tokens at once.
    pub kill_previous_access: bool,
    /// Salesforce: token responses carry no `expires_in` (the access token
    /// still expires after `access_ttl`).
    pub omit_expires_in: bool,
    /// Salesforce: sent as `instance_url` in every token response.
    pub instance_url: Option<String>,
    /// The `token_type` of token responses (Slack: `bot`). Default `Bearer`.
    pub token_type: String,
    /// Spotify, LinkedIn: `refresh_ttl` runs from the family's first token;
    /// rotated tokens inherit its deadline (refreshing does not extend it).
    pub refresh_absolute: bool,
}

/// A provider's documented wire shapes, for end-to-end tests of profiles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Dialect {
    #[default]
    Rfc,
    /// Errors as HTTP 200, form-encoded, `bad_refresh_token`
    /// (`bad_verification_code` with an `error_uri` for a refused code).
    Github,
    /// HTTP 200 `{"ok": false, "error": "invalid_refresh_token"}`
    /// (`invalid_code` for a refused code); `ok: true` on success.
    Slack,
    /// 400 `{"status": "BAD_REFRESH_TOKEN", "message": ...}`, no `error`
    /// (`BAD_AUTH_CODE` for a refused code).
    Hubspot,
    /// AADSTS codes in `error_description` and `error_codes`, with an
    /// `error_uri` (a refused code: AADSTS70008 expired, AADSTS54005
    /// redeemed); a refresh without `scope` is refused (AADSTS900144).
    Microsoft,
    /// RFC 6749 errors; `refresh_ttl` is sent as `refresh_expires_in` (the
    /// session's idle timeout: each refresh starts it again).
    Keycloak,
    /// `refresh_ttl` is sent as `x_refresh_token_expires_in`.
    Intuit,
    /// An unknown or rotated-out refresh token is 403 `invalid_grant`
    /// "Unknown or invalid refresh token."
    Auth0,
    /// A dead refresh token is `invalid_grant` "Refresh token has expired".
    Box,
}

impl Default for IdpOptions {
    fn default() -> Self {
        IdpOptions {
            access_ttl: Duration::from_secs(10),
            refresh_ttl: None,
            code_ttl: Duration::from_secs(60),
            rotate_refresh_tokens: true,
            reuse_grace: Duration::ZERO,
            device_interval: Duration::from_secs(5),
            device_ttl: Duration::from_secs(600),
            clients: vec![DevClient::confidential("demo-client", "demo-secret")],
            dialect: Dialect::Rfc,
            kill_previous_access: false,
            omit_expires_in: false,
            instance_url: None,
            token_type: "Bearer".into(),
            refresh_absolute: false,
        }
    }
}

/// A registered client.
#[derive(Clone, Debug)]
pub struct DevClient {
    pub client_id: String,
    /// `None`: a public client (auth method `none`).
    pub client_secret: Option<String>,
    /// `Some("client_secret_post")` etc.: only that method is accepted.
    pub auth_method: Option<String>,
    /// Exact matches only.
    pub redirect_uris: Vec<String>,
    /// `None`: any scope.
    pub allowed_scopes: Option<Vec<String>>,
    /// `private_key_jwt`: the PEM public key (or certificate) that verifies
    /// its assertions (RFC 7523 §3, checked strictly: signature, iss = sub =
    /// client_id, aud, exp at most 60 s after iat, a jti never seen before).
    pub assertion_key_pem: Option<String>,
    /// `private_key_jwt` with a token someone else issued (workload identity
    /// federation): iss, sub and aud it must carry instead. Such a token is
    /// presented until it expires, so its jti may repeat, as at Entra.
    pub federated: Option<Federated>,
    /// `tls_client_auth` (RFC 8705 §2.1): the certificate must chain to this
    /// CA (PEM) and hold this DNS name.
    pub tls_client_auth: Option<(String, String)>,
    /// `self_signed_tls_client_auth` (RFC 8705 §2.2): the registered
    /// certificate (PEM), compared byte for byte.
    pub self_signed_cert_pem: Option<String>,
    /// RFC 9449: every token request must carry a DPoP proof.
    pub dpop_required: bool,
}

/// What a federated assertion must say (see [`DevClient::federated`]).
#[derive(Clone, Debug)]
pub struct Federated {
    pub issuer: String,
    pub subject: String,
    pub audience: String,
}

impl DevClient {
    /// A confidential client accepting any auth method, scope and no
    /// redirect URIs.
    pub fn confidential(client_id: &str, client_secret: &str) -> DevClient {
        DevClient {
            client_id: client_id.to_owned(),
            client_secret: Some(client_secret.to_owned()),
            auth_method: None,
            redirect_uris: Vec::new(),
            allowed_scopes: None,
            assertion_key_pem: None,
            federated: None,
            tls_client_auth: None,
            self_signed_cert_pem: None,
            dpop_required: false,
        }
    }

    /// A `private_key_jwt` client whose assertions `public_pem` verifies.
    pub fn private_key_jwt(client_id: &str, public_pem: &str) -> DevClient {
        DevClient {
            client_secret: None,
            auth_method: Some("private_key_jwt".into()),
            assertion_key_pem: Some(public_pem.to_owned()),
            ..DevClient::confidential(client_id, "")
        }
    }

    /// A `client_secret_jwt` client (HS256 keyed with `secret`).
    pub fn client_secret_jwt(client_id: &str, secret: &str) -> DevClient {
        DevClient {
            auth_method: Some("client_secret_jwt".into()),
            ..DevClient::confidential(client_id, secret)
        }
    }

    /// A `tls_client_auth` client: a certificate from `ca_pem` for `dns_name`.
    pub fn tls_client_auth(client_id: &str, ca_pem: &str, dns_name: &str) -> DevClient {
        DevClient {
            client_secret: None,
            auth_method: Some("tls_client_auth".into()),
            tls_client_auth: Some((ca_pem.to_owned(), dns_name.to_owned())),
            ..DevClient::confidential(client_id, "")
        }
    }

    /// A `self_signed_tls_client_auth` client presenting `cert_pem`.
    pub fn self_signed_tls_client_auth(client_id: &str, cert_pem: &str) -> DevClient {
        DevClient {
            client_secret: None,
            auth_method: Some("self_signed_tls_client_auth".into()),
            self_signed_cert_pem: Some(cert_pem.to_owned()),
            ..DevClient::confidential(client_id, "")
        }
    }

    /// Confidential without a shared secret: it may use client_credentials.
    fn confidential_kind(&self) -> bool {
        self.client_secret.is_some()
            || self.assertion_key_pem.is_some()
            || self.tls_client_auth.is_some()
            || self.self_signed_cert_pem.is_some()
    }

    /// A public client (PKCE, auth method `none`).
    pub fn public(client_id: &str, redirect_uris: &[&str]) -> DevClient {
        DevClient {
            client_id: client_id.to_owned(),
            client_secret: None,
            auth_method: None,
            redirect_uris: redirect_uris.iter().map(|s| s.to_string()).collect(),
            ..DevClient::confidential(client_id, "")
        }
    }
}

/// A scripted misbehaviour, consumed one per `/token` request, FIFO. The
/// request is recorded either way. The resets close the whole TCP connection
/// (over HTTP/2 that ends every stream on it).
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer this without processing the grant (500, 429 + `Retry-After`,
    /// GitHub-style 200 `{"error":"bad_refresh_token"}`...).
    Status {
        status: u16,
        body: String,
        content_type: &'static str,
        headers: Vec<(String, String)>,
    },
    /// Sleep, then process normally.
    Delay(Duration),
    /// Close the connection without answering; the grant is NOT processed.
    ResetBeforeProcessing,
    /// Process the grant (a refresh token IS spent), then close the
    /// connection without answering: a lost rotation.
    ResetAfterProcessing,
    /// Process the grant, then wait for [`Hold::release`] before answering.
    HoldAfterProcessing(Hold),
    /// Process the grant (a refresh token IS spent), then answer this
    /// status with an HTML page instead: a gateway in front of the IdP that
    /// lost the IdP's answer.
    LoseAnswer(u16),
    /// 302 to this location, grant not processed.
    Redirect(String),
    /// Process normally but answer `application/x-www-form-urlencoded`, as
    /// old GitHub did.
    FormEncoded,
    /// Answer this without processing the grant (no extra headers).
    Body {
        status: u16,
        body: String,
        content_type: &'static str,
    },
    /// Answer `status` with this OAuth `error`, without processing the
    /// grant, as an IdP that quotes the request back: its
    /// `error_description` carries the request as JSON (every form
    /// parameter, and the Basic credentials' `client_id` and
    /// `client_secret`) and then a long tail, and its `error_uri` carries
    /// the form again as a query. Client secrets, codes and device codes
    /// in it must be scrubbed by whoever shows it.
    Echo { status: u16, error: &'static str },
}

impl Fault {
    fn name(&self) -> &'static str {
        match self {
            Fault::Status { .. } => "status",
            Fault::Delay(_) => "delay",
            Fault::ResetBeforeProcessing => "reset_before_processing",
            Fault::ResetAfterProcessing => "reset_after_processing",
            Fault::HoldAfterProcessing(_) => "hold_after_processing",
            Fault::LoseAnswer(_) => "lose_answer",
            Fault::Redirect(_) => "redirect",
            Fault::FormEncoded => "form_encoded",
            Fault::Body { .. } => "body",
            Fault::Echo { .. } => "echo",
        }
    }
}

/// A gate for [`Fault::HoldAfterProcessing`]: tests await [`Hold::reached`]
/// (a request is being held, its grant already processed), act, then call
/// [`Hold::release`].
#[derive(Clone)]
pub struct Hold {
    inner: Arc<HoldInner>,
}

struct HoldInner {
    // watch rather than Notify: late waiters must still see the state.
    reached: watch::Sender<bool>,
    released: watch::Sender<bool>,
}

impl Hold {
    pub fn new() -> Hold {
        Hold {
            inner: Arc::new(HoldInner {
                reached: watch::Sender::new(false),
                released: watch::Sender::new(false),
            }),
        }
    }

    /// Lets held requests (and any later ones on this gate) answer.
    pub fn release(&self) {
        self.inner.released.send_replace(true);
    }

    /// Resolves once a request is being held.
    pub async fn reached(&self) {
        let mut rx = self.inner.reached.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    pub fn is_reached(&self) -> bool {
        *self.inner.reached.borrow()
    }

    async fn hold(&self) {
        self.inner.reached.send_replace(true);
        let mut rx = self.inner.released.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }
}

impl Default for Hold {
    fn default() -> Self {
        Hold::new()
    }
}

impl fmt::Debug for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hold")
            .field("reached", &*self.inner.reached.borrow())
            .field("released", &*self.inner.released.borrow())
            .finish()
    }
}

/// One `/token` request as the IdP saw it.
#[derive(Clone, Debug)]
pub struct GrantRecord {
    pub at: SystemTime,
    pub grant_type: String,
    pub client_id: Option<String>,
    /// `client_secret_basic`, `client_secret_post`, `none` or `invalid`.
    pub client_auth: String,
    /// The refresh token presented, if any.
    pub refresh_token: Option<String>,
    pub family: Option<u64>,
    pub scope: Option<String>,
    pub resource: Option<String>,
    /// `ok`, the OAuth error code, or `fault` when a fault answered instead
    /// of the grant being processed.
    pub outcome: String,
    /// The fault applied to this request, if any (`reset_after_processing`
    /// etc.); the grant was processed unless `outcome` is `fault`.
    pub fault: Option<&'static str>,
    /// The thumbprint of the DPoP proof's key, when a valid proof came.
    pub dpop_jkt: Option<String>,
}

/// The running IdP. Cheap to clone; all clones share state.
#[derive(Clone)]
pub struct DevIdp {
    inner: Arc<IdpInner>,
}

struct IdpInner {
    server: Server,
    shared: Arc<Shared>,
}

struct Shared {
    url: RwLock<String>,
    state: Mutex<State>,
    /// Serves `/mtls/token` and advertises it in `mtls_endpoint_aliases`.
    mtls: bool,
}

struct AccessToken {
    client_id: String,
    subject: String,
    scope: Option<String>,
    family: Option<u64>,
    expires_at: Instant,
    exp_unix: u64,
    iat_unix: u64,
    revoked: bool,
    /// RFC 9449 §6: the key the token is bound to (`cnf.jkt`).
    jkt: Option<String>,
}

struct RefreshToken {
    client_id: String,
    subject: String,
    scope: Option<String>,
    family: u64,
    expires_at: Option<Instant>,
    exp_unix: Option<u64>,
    iat_unix: u64,
    spent_at: Option<Instant>,
    revoked: bool,
    /// RFC 9449 §5: a refresh token issued with a proof works only with
    /// proofs of the same key.
    jkt: Option<String>,
}

struct AuthCode {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    subject: String,
    scope: Option<String>,
    nonce: Option<String>,
    expires_at: Instant,
    // Set once redeemed: a second redemption revokes this family.
    family: Option<u64>,
}

/// A device authorization (RFC 8628 §3.2), keyed by its device code.
struct DeviceGrant {
    client_id: String,
    user_code: String,
    scope: Option<String>,
    expires_at: Instant,
    /// Grows by 5 s with each slow_down (§3.5).
    interval: Duration,
    last_poll: Option<Instant>,
    /// A test asked for one slow_down on the next poll.
    slow_down_next: bool,
    status: DeviceStatus,
}

#[derive(Clone, Debug, PartialEq)]
enum DeviceStatus {
    Pending,
    Approved(String),
    Denied,
    /// Redeemed into this family: a second redemption is refused.
    Redeemed(u64),
}

/// RFC 8628 §3.4.
const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

struct State {
    opts: IdpOptions,
    devices: HashMap<String, DeviceGrant>,
    access: HashMap<String, AccessToken>,
    refresh: HashMap<String, RefreshToken>,
    codes: HashMap<String, AuthCode>,
    revoked_families: HashSet<u64>,
    next_family: u64,
    faults: VecDeque<Fault>,
    /// Faults for `/device`: only those that answer apply there.
    device_faults: VecDeque<Fault>,
    grants: Vec<GrantRecord>,
    reuse_count: usize,
    /// Assertion jtis seen, with their exp (kept a minute past it).
    seen_jti: HashMap<String, u64>,
    /// DPoP proof jtis seen, with their iat (kept past the iat window).
    seen_proof_jti: HashMap<String, u64>,
    /// When set, every DPoP proof must carry this nonce (RFC 9449 §8).
    dpop_nonce: Option<String>,
    /// The key of the valid proof of the request being processed: set and
    /// cleared under the state lock, around one `process`.
    proof_jkt: Option<String>,
    /// `refresh_absolute`: each family's refresh-token deadline.
    family_deadline: HashMap<u64, (Instant, u64)>,
}

/// An RFC 6749 §5.2 error.
#[derive(Debug)]
struct OAuthError {
    code: &'static str,
    description: String,
}

fn err(code: &'static str, description: impl Into<String>) -> OAuthError {
    OAuthError {
        code,
        description: description.into(),
    }
}

type Form = Vec<(String, String)>;

/// RFC 6749 §3.1: a parameter sent without a value is treated as omitted.
fn param<'a>(form: &'a Form, name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, v)| k == name && !v.is_empty())
        .map(|(_, v)| v.as_str())
}

/// RFC 6749 §3.1/§3.2: request parameters MUST NOT be included more than once.
fn duplicate(form: &Form) -> Option<&str> {
    let mut seen = HashSet::new();
    form.iter()
        .find(|(k, _)| !seen.insert(k.as_str()))
        .map(|(k, _)| k.as_str())
}

fn parse_form(body: &[u8]) -> Form {
    form_urlencoded::parse(body).into_owned().collect()
}

fn random(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        Alphanumeric.sample_string(&mut rand::thread_rng(), 32)
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whole seconds for `expires_in`, rounded down (the client then refreshes
/// early, never late) but never 0 for a non-zero lifetime.
fn secs(d: Duration) -> u64 {
    match d.as_secs() {
        0 if !d.is_zero() => 1,
        s => s,
    }
}

/// RFC 6749 §2.3.1: id and secret are form-url-encoded before Basic.
fn form_decode(s: &str) -> Option<String> {
    let plus = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

fn parse_basic(header: &str) -> Option<(String, String)> {
    let (scheme, b64) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(b64.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((form_decode(id)?, form_decode(secret)?))
}

/// The client behind a request, or why authentication failed.
struct ClientAuth {
    client_id: Option<String>,
    method: &'static str,
    result: Result<DevClient, OAuthError>,
    /// An assertion's jti and exp, to refuse a replay (RFC 7523 §3 item 7).
    jti: Option<(String, u64)>,
}

impl ClientAuth {
    fn label(&self) -> String {
        match self.result {
            Ok(_) => self.method.to_owned(),
            Err(_) => "invalid".to_owned(),
        }
    }
}

/// RFC 7521 §4.2 / RFC 7523 §2.2.
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// The mTLS alias of `/token` (RFC 8705 §5), served when the IdP runs mTLS.
const MTLS_TOKEN_PATH: &str = "/mtls/token";

fn authenticate(clients: &[DevClient], p: &Posted, issuer: &str) -> ClientAuth {
    let form = &p.form;
    let authorization = p.authorization.as_deref();
    let fail = |client_id: Option<String>, code, msg: &str| ClientAuth {
        client_id,
        method: "invalid",
        result: Err(err(code, msg)),
        jti: None,
    };
    let body_id = param(form, "client_id").map(str::to_owned);
    let body_secret = param(form, "client_secret").map(str::to_owned);
    let assertion = param(form, "client_assertion");
    if assertion.is_some() || param(form, "client_assertion_type").is_some() {
        // RFC 6749 §2.3: a client MUST NOT use more than one method.
        if authorization.is_some() || body_secret.is_some() {
            return fail(
                body_id,
                "invalid_request",
                "more than one client authentication method",
            );
        }
        return assertion_auth(clients, p, issuer);
    }
    let basic = match authorization {
        Some(h) => match parse_basic(h) {
            Some(pair) => Some(pair),
            None => return fail(body_id, "invalid_client", "malformed Basic credentials"),
        },
        None => None,
    };
    let (id, secret, method) = match (basic, body_secret) {
        // RFC 6749 §2.3: a client MUST NOT use more than one method.
        (Some((id, _)), Some(_)) => {
            return fail(
                Some(id),
                "invalid_request",
                "more than one client authentication method",
            )
        }
        (Some((id, secret)), None) => {
            if body_id.as_ref().is_some_and(|b| *b != id) {
                return fail(
                    Some(id),
                    "invalid_request",
                    "client_id does not match the Basic credentials",
                );
            }
            (id, Some(secret), "client_secret_basic")
        }
        (None, Some(secret)) => match body_id {
            Some(id) => (id, Some(secret), "client_secret_post"),
            None => return fail(None, "invalid_client", "client_secret without client_id"),
        },
        (None, None) => match body_id {
            Some(id) => (id, None, "none"),
            None => return fail(None, "invalid_client", "no client authentication"),
        },
    };
    let Some(client) = clients.iter().find(|c| c.client_id == id) else {
        return fail(Some(id), "invalid_client", "unknown client");
    };
    if method == "none"
        && (client.tls_client_auth.is_some() || client.self_signed_cert_pem.is_some())
    {
        return tls_auth(client, p);
    }
    let secret_ok = match (&client.client_secret, &secret) {
        (Some(expected), Some(given)) => expected == given,
        (None, None) => true,
        _ => false,
    };
    if !secret_ok {
        let msg = match (&client.client_secret, &secret) {
            (Some(_), Some(_)) => "wrong client secret",
            (Some(_), None) => "client authentication required",
            _ => "a public client must not send a secret",
        };
        return fail(Some(id), "invalid_client", msg);
    }
    if let Some(required) = &client.auth_method {
        if required != method {
            return fail(
                Some(id),
                "invalid_client",
                &format!("this client must authenticate with {required}"),
            );
        }
    }
    ClientAuth {
        client_id: Some(id),
        method,
        result: Ok(client.clone()),
        jti: None,
    }
}

/// RFC 8705 §2: the client certificate of this TLS connection.
fn tls_auth(client: &DevClient, p: &Posted) -> ClientAuth {
    let id = Some(client.client_id.clone());
    let (method, checked) = match (&client.tls_client_auth, &client.self_signed_cert_pem) {
        (Some((ca, name)), _) => ("tls_client_auth", check_pki_cert(p, ca, name)),
        (None, Some(cert)) => ("self_signed_tls_client_auth", check_self_signed(p, cert)),
        (None, None) => ("invalid", Err("no certificate registered".to_owned())),
    };
    let checked = checked.and_then(|()| {
        // The alias is where the IdP asks for certificates (RFC 8705 §5).
        if p.mtls_alias_served && p.path == "/token" {
            Err(format!(
                "{method} is served at the mtls_endpoint_aliases token endpoint"
            ))
        } else {
            Ok(())
        }
    });
    match checked {
        Ok(()) => ClientAuth {
            client_id: id,
            method,
            result: Ok(client.clone()),
            jti: None,
        },
        Err(msg) => ClientAuth {
            client_id: id,
            method: "invalid",
            result: Err(err("invalid_client", msg)),
            jti: None,
        },
    }
}

fn leaf(p: &Posted) -> Result<&rustls::pki_types::CertificateDer<'static>, String> {
    p.peer
        .as_ref()
        .and_then(|c| c.0.first())
        .ok_or_else(|| "no client certificate in the TLS handshake".to_owned())
}

fn check_pki_cert(p: &Posted, ca_pem: &str, name: &str) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    let leaf = leaf(p)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()).flatten() {
        let _ = roots.add(c);
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| format!("client CA: {e}"))?;
    let intermediates = p.peer.as_ref().map_or(&[][..], |c| &c.0[1..]);
    verifier
        .verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now())
        .map_err(|e| format!("client certificate not trusted: {e}"))?;
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("{e:?}"))?;
    let server_name = rustls::pki_types::ServerName::try_from(name.to_owned())
        .map_err(|e| format!("registered name: {e}"))?;
    ee.verify_is_valid_for_subject_name(&server_name)
        .map_err(|_| format!("client certificate is not for {name}"))
}

fn check_self_signed(p: &Posted, cert_pem: &str) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    let leaf = leaf(p)?;
    let registered = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| format!("registered certificate: {e}"))?;
    if registered.as_ref() == leaf.as_ref() {
        Ok(())
    } else {
        Err("client certificate is not the registered one".into())
    }
}

/// RFC 7523 §3 with RFC 7521 §5.2's rules, strictly: `private_key_jwt`
/// (a registered public key) and `client_secret_jwt` (HS256, the secret).
fn assertion_auth(clients: &[DevClient], p: &Posted, issuer: &str) -> ClientAuth {
    let form = &p.form;
    let body_id = param(form, "client_id").map(str::to_owned);
    let fail = |client_id: Option<String>, code, msg: String| ClientAuth {
        client_id,
        method: "invalid",
        result: Err(err(code, msg)),
        jti: None,
    };
    if param(form, "client_assertion_type") != Some(JWT_BEARER) {
        return fail(
            body_id,
            "invalid_request",
            format!("client_assertion_type must be {JWT_BEARER}"),
        );
    }
    let Some(jwt) = param(form, "client_assertion") else {
        return fail(
            body_id,
            "invalid_request",
            "client_assertion is missing".into(),
        );
    };
    let Ok(header) = jsonwebtoken::decode_header(jwt) else {
        return fail(
            body_id,
            "invalid_client",
            "client_assertion is not a JWT".into(),
        );
    };
    // Which client: the body's client_id, else the unverified sub.
    let unverified_sub = jwt
        .split('.')
        .nth(1)
        .and_then(|c| URL_SAFE_NO_PAD.decode(c).ok())
        .and_then(|c| serde_json::from_slice::<Value>(&c).ok())
        .and_then(|c| c.get("sub").and_then(Value::as_str).map(str::to_owned));
    let Some(id) = body_id.clone().or(unverified_sub) else {
        return fail(None, "invalid_client", "no client_id and no sub".into());
    };
    let Some(client) = clients.iter().find(|c| c.client_id == id) else {
        return fail(Some(id), "invalid_client", "unknown client".into());
    };
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    let (method, key) = match (&client.assertion_key_pem, &client.client_secret, header.alg) {
        (Some(pem), _, Algorithm::RS256 | Algorithm::PS256) => {
            ("private_key_jwt", DecodingKey::from_rsa_pem(pem.as_bytes()))
        }
        (Some(pem), _, Algorithm::ES256) => {
            ("private_key_jwt", DecodingKey::from_ec_pem(pem.as_bytes()))
        }
        (None, Some(secret), Algorithm::HS256) if !secret.is_empty() => (
            "client_secret_jwt",
            Ok(DecodingKey::from_secret(secret.as_bytes())),
        ),
        (_, _, alg) => {
            return fail(
                Some(id),
                "invalid_client",
                format!("assertion algorithm {alg:?} is not registered for this client"),
            )
        }
    };
    if let Some(required) = &client.auth_method {
        if required != method {
            return fail(
                Some(id),
                "invalid_client",
                format!("this client must authenticate with {required}"),
            );
        }
    }
    let Ok(key) = key else {
        return fail(Some(id), "server_error", "registered key unreadable".into());
    };
    let endpoint = format!("{issuer}{}", p.path);
    let (want_iss, want_sub, auds) = match &client.federated {
        Some(f) => (
            f.issuer.clone(),
            f.subject.clone(),
            vec![f.audience.clone()],
        ),
        None => (id.clone(), id.clone(), vec![endpoint, issuer.to_owned()]),
    };
    let mut v = Validation::new(header.alg);
    v.leeway = 5;
    v.set_audience(&auds);
    v.set_issuer(&[&want_iss]);
    v.sub = Some(want_sub);
    v.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    let claims = match jsonwebtoken::decode::<Value>(jwt, &key, &v) {
        Ok(d) => d.claims,
        Err(e) => {
            let why = match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => "bad signature".to_owned(),
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => "assertion expired".to_owned(),
                jsonwebtoken::errors::ErrorKind::InvalidAudience => "wrong aud".to_owned(),
                jsonwebtoken::errors::ErrorKind::InvalidIssuer => "wrong iss".to_owned(),
                jsonwebtoken::errors::ErrorKind::InvalidSubject => "wrong sub".to_owned(),
                other => format!("invalid assertion ({other:?})"),
            };
            return fail(Some(id), "invalid_client", why);
        }
    };
    let now = unix_now();
    let exp = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
    if client.federated.is_none() {
        let Some(iat) = claims.get("iat").and_then(Value::as_u64) else {
            return fail(Some(id), "invalid_client", "assertion has no iat".into());
        };
        if iat > now + 5 {
            return fail(
                Some(id),
                "invalid_client",
                "assertion iat is in the future".into(),
            );
        }
        if exp.saturating_sub(iat) > 60 {
            return fail(
                Some(id),
                "invalid_client",
                "assertion lives longer than 60 s".into(),
            );
        }
    }
    let jti = match claims.get("jti").and_then(Value::as_str) {
        Some(j) if !j.is_empty() => j.to_owned(),
        _ if client.federated.is_some() => String::new(),
        _ => return fail(Some(id), "invalid_client", "assertion has no jti".into()),
    };
    ClientAuth {
        client_id: Some(id),
        method,
        result: Ok(client.clone()),
        // A federated token is presented until it expires: no replay rule.
        jti: (client.federated.is_none()).then_some((jti, exp)),
    }
}

/// Checks a requested scope against the client's allowed scopes; with no
/// request, grants everything allowed (or nothing in particular).
fn check_scope(client: &DevClient, requested: Option<&str>) -> Result<Option<String>, OAuthError> {
    match (requested, &client.allowed_scopes) {
        (Some(req), Some(allowed)) => {
            if let Some(bad) = req
                .split_whitespace()
                .find(|s| !allowed.iter().any(|a| a == s))
            {
                return Err(err(
                    "invalid_scope",
                    format!("scope {bad:?} is not allowed"),
                ));
            }
            Ok(Some(req.to_owned()))
        }
        (Some(req), None) => Ok(Some(req.to_owned())),
        (None, Some(allowed)) if !allowed.is_empty() => Ok(Some(allowed.join(" "))),
        (None, _) => Ok(None),
    }
}

/// RFC 7636 §4.1: 43 to 128 unreserved characters.
fn verifier_well_formed(v: &str) -> bool {
    (43..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// RFC 7636 §4.2: BASE64URL(SHA256(verifier)).
pub(crate) fn s256(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

impl State {
    fn new(opts: IdpOptions) -> State {
        State {
            opts,
            devices: HashMap::new(),
            access: HashMap::new(),
            refresh: HashMap::new(),
            codes: HashMap::new(),
            revoked_families: HashSet::new(),
            next_family: 1,
            faults: VecDeque::new(),
            device_faults: VecDeque::new(),
            grants: Vec::new(),
            reuse_count: 0,
            seen_jti: HashMap::new(),
            seen_proof_jti: HashMap::new(),
            dpop_nonce: None,
            proof_jkt: None,
            family_deadline: HashMap::new(),
        }
    }

    fn new_family(&mut self) -> u64 {
        let f = self.next_family;
        self.next_family += 1;
        f
    }

    fn mint_access(
        &mut self,
        client_id: &str,
        subject: &str,
        scope: Option<&str>,
        family: Option<u64>,
    ) -> (String, u64) {
        let token = random("at_");
        let ttl = self.opts.access_ttl;
        let now_unix = unix_now();
        let jkt = self.proof_jkt.clone();
        self.access.insert(
            token.clone(),
            AccessToken {
                client_id: client_id.to_owned(),
                subject: subject.to_owned(),
                scope: scope.map(str::to_owned),
                family,
                expires_at: Instant::now() + ttl,
                exp_unix: now_unix + secs(ttl),
                iat_unix: now_unix,
                revoked: false,
                jkt,
            },
        );
        (token, secs(ttl))
    }

    fn mint_refresh(
        &mut self,
        client_id: &str,
        subject: &str,
        scope: Option<&str>,
        family: u64,
    ) -> String {
        let token = random("rt_");
        let ttl = self.opts.refresh_ttl;
        let now_unix = unix_now();
        let jkt = self.proof_jkt.clone();
        let mut deadline = ttl.map(|t| (Instant::now() + t, now_unix + secs(t)));
        if let (true, Some(d)) = (self.opts.refresh_absolute, deadline) {
            deadline = Some(*self.family_deadline.entry(family).or_insert(d));
        }
        self.refresh.insert(
            token.clone(),
            RefreshToken {
                client_id: client_id.to_owned(),
                subject: subject.to_owned(),
                scope: scope.map(str::to_owned),
                family,
                expires_at: deadline.map(|d| d.0),
                exp_unix: deadline.map(|d| d.1),
                iat_unix: now_unix,
                spent_at: None,
                revoked: false,
                jkt,
            },
        );
        token
    }

    /// Revokes every refresh and access token of a family.
    fn revoke_family(&mut self, family: u64) {
        self.revoked_families.insert(family);
        for rt in self.refresh.values_mut().filter(|rt| rt.family == family) {
            rt.revoked = true;
        }
        for at in self.access.values_mut() {
            if at.family == Some(family) {
                at.revoked = true;
            }
        }
    }

    /// A token response; `refresh` is `None` when not rotating.
    fn token_response(
        &mut self,
        client_id: &str,
        subject: &str,
        scope: Option<&str>,
        family: Option<u64>,
        with_refresh: bool,
    ) -> Map<String, Value> {
        let (access, expires_in) = self.mint_access(client_id, subject, scope, family);
        let mut body = Map::new();
        body.insert("access_token".into(), json!(access));
        // RFC 9449 §5.
        let token_type = if self.proof_jkt.is_some() {
            "DPoP"
        } else {
            self.opts.token_type.as_str()
        };
        body.insert("token_type".into(), json!(token_type));
        if !self.opts.omit_expires_in {
            body.insert("expires_in".into(), json!(expires_in));
        }
        if let Some(url) = &self.opts.instance_url {
            body.insert("instance_url".into(), json!(url));
        }
        if let Some(scope) = scope {
            body.insert("scope".into(), json!(scope));
        }
        if let (true, Some(family)) = (with_refresh, family) {
            let refresh = self.mint_refresh(client_id, subject, scope, family);
            let left = self.refresh.get(&refresh).and_then(|r| r.expires_at);
            body.insert("refresh_token".into(), json!(refresh));
            if let Some(at) = left {
                // Rounded: a just-minted token's full lifetime reads as such.
                let ttl = at.saturating_duration_since(Instant::now()) + Duration::from_millis(500);
                let key = match self.opts.dialect {
                    Dialect::Keycloak => "refresh_expires_in",
                    Dialect::Intuit => "x_refresh_token_expires_in",
                    _ => "refresh_token_expires_in",
                };
                body.insert(key.into(), json!(secs(ttl)));
            }
        }
        body
    }

    fn process(
        &mut self,
        form: &Form,
        auth: ClientAuth,
        record: &mut GrantRecord,
        issuer: &str,
    ) -> Result<Map<String, Value>, OAuthError> {
        if let Some(name) = duplicate(form) {
            return Err(err("invalid_request", format!("parameter {name} repeated")));
        }
        let client = auth.result?;
        if client.dpop_required && self.proof_jkt.is_none() {
            return Err(err(
                "invalid_dpop_proof",
                "this client must send a DPoP proof",
            ));
        }
        match param(form, "grant_type") {
            None => Err(err("invalid_request", "grant_type is missing")),
            Some("client_credentials") => {
                // RFC 6749 §4.4: confidential clients only.
                if !client.confidential_kind() {
                    return Err(err(
                        "unauthorized_client",
                        "a public client cannot use client_credentials",
                    ));
                }
                let scope = check_scope(&client, param(form, "scope"))?;
                record.scope = scope.clone();
                Ok(self.token_response(
                    &client.client_id,
                    &client.client_id,
                    scope.as_deref(),
                    None,
                    false,
                ))
            }
            Some("refresh_token") => self.refresh_grant(form, &client, record),
            Some("authorization_code") => self.code_grant(form, &client, record, issuer),
            Some(DEVICE_CODE_GRANT) => self.device_grant(form, &client, record, issuer),
            Some(other) => Err(err(
                "unsupported_grant_type",
                format!("grant_type {other:?} is not supported"),
            )),
        }
    }

    fn refresh_grant(
        &mut self,
        form: &Form,
        client: &DevClient,
        record: &mut GrantRecord,
    ) -> Result<Map<String, Value>, OAuthError> {
        let presented = param(form, "refresh_token")
            .ok_or_else(|| err("invalid_request", "refresh_token is missing"))?;
        if self.opts.dialect == Dialect::Microsoft && param(form, "scope").is_none() {
            return Err(err(
                "invalid_request",
                "AADSTS900144: The request body must contain the following parameter: 'scope'.",
            ));
        }
        let now = Instant::now();
        let grace = self.opts.reuse_grace;
        let Some(rt) = self.refresh.get(presented) else {
            return Err(err("invalid_grant", "unknown refresh token"));
        };
        record.family = Some(rt.family);
        if rt.client_id != client.client_id {
            return Err(err(
                "invalid_grant",
                "refresh token issued to another client",
            ));
        }
        if rt.jkt.is_some() && rt.jkt != self.proof_jkt {
            // RFC 9449 §5: only the key it was issued to may present it.
            return Err(err(
                "invalid_grant",
                "DPoP-bound refresh token presented with another key or without a proof",
            ));
        }
        let family = rt.family;
        let in_grace = rt.spent_at.is_some_and(|at| now < at + grace);
        if rt.spent_at.is_some() && !in_grace {
            // The oracle: a rotated token came back. Revoke the family, as
            // the OAuth 2.0 Security BCP §4.14.2 recommends.
            self.reuse_count += 1;
            self.revoke_family(family);
            return Err(err(
                "invalid_grant",
                "refresh token reuse detected; family revoked",
            ));
        }
        if rt.revoked {
            return Err(err("invalid_grant", "refresh token revoked"));
        }
        if rt.expires_at.is_some_and(|exp| now >= exp) {
            return Err(err("invalid_grant", "refresh token expired"));
        }
        let original = rt.scope.clone();
        let subject = rt.subject.clone();
        // RFC 6749 §6: a requested scope must not exceed the original grant.
        let scope = match param(form, "scope") {
            Some(req) => {
                let granted: Vec<&str> = original
                    .as_deref()
                    .unwrap_or("")
                    .split_whitespace()
                    .collect();
                if original.is_some() {
                    if let Some(bad) = req.split_whitespace().find(|s| !granted.contains(s)) {
                        return Err(err(
                            "invalid_scope",
                            format!("scope {bad:?} exceeds the original grant"),
                        ));
                    }
                }
                Some(req.to_owned())
            }
            None => original,
        };
        record.scope = scope.clone();
        let rotate = self.opts.rotate_refresh_tokens;
        if rotate {
            if let Some(rt) = self.refresh.get_mut(presented) {
                // Keep the first spend time: grace runs from the rotation.
                rt.spent_at.get_or_insert(now);
            }
        }
        if self.opts.kill_previous_access {
            for at in self.access.values_mut() {
                if at.family == Some(family) {
                    at.revoked = true;
                }
            }
        }
        Ok(self.token_response(
            &client.client_id,
            &subject,
            scope.as_deref(),
            Some(family),
            rotate,
        ))
    }

    fn code_grant(
        &mut self,
        form: &Form,
        client: &DevClient,
        record: &mut GrantRecord,
        issuer: &str,
    ) -> Result<Map<String, Value>, OAuthError> {
        let code_value =
            param(form, "code").ok_or_else(|| err("invalid_request", "code is missing"))?;
        let Some(code) = self.codes.get(code_value) else {
            return Err(err("invalid_grant", "unknown authorization code"));
        };
        if code.client_id != client.client_id {
            return Err(err("invalid_grant", "code issued to another client"));
        }
        if let Some(family) = code.family {
            // RFC 6749 §4.1.2: a reused code SHOULD revoke what it issued.
            record.family = Some(family);
            self.revoke_family(family);
            return Err(err(
                "invalid_grant",
                "authorization code already used; its tokens are revoked",
            ));
        }
        if Instant::now() >= code.expires_at {
            return Err(err("invalid_grant", "authorization code expired"));
        }
        // RFC 6749 §4.1.3: the same redirect_uri as in the authorization request.
        if param(form, "redirect_uri") != Some(code.redirect_uri.as_str()) {
            return Err(err("invalid_grant", "redirect_uri does not match"));
        }
        let verifier = param(form, "code_verifier")
            .ok_or_else(|| err("invalid_grant", "code_verifier is missing"))?;
        if !verifier_well_formed(verifier) || s256(verifier) != code.challenge {
            return Err(err("invalid_grant", "code_verifier does not match"));
        }
        let subject = code.subject.clone();
        let scope = code.scope.clone();
        let nonce = code.nonce.clone();
        let family = self.new_family();
        if let Some(code) = self.codes.get_mut(code_value) {
            code.family = Some(family);
        }
        record.family = Some(family);
        record.scope = scope.clone();
        let mut body = self.token_response(
            &client.client_id,
            &subject,
            scope.as_deref(),
            Some(family),
            true,
        );
        let now = unix_now();
        let mut claims = json!({
            "iss": issuer,
            "sub": subject,
            "aud": client.client_id,
            "iat": now,
            "exp": now + secs(self.opts.access_ttl),
        });
        if let Some(nonce) = nonce {
            claims["nonce"] = json!(nonce);
        }
        body.insert("id_token".into(), json!(unsigned_jwt(&claims)));
        Ok(body)
    }

    /// RFC 8628 §3.4-3.5, strictly: a poll before `interval` has passed
    /// since the last one is `slow_down` (and the interval grows by 5 s);
    /// a redeemed device code is refused.
    fn device_grant(
        &mut self,
        form: &Form,
        client: &DevClient,
        record: &mut GrantRecord,
        issuer: &str,
    ) -> Result<Map<String, Value>, OAuthError> {
        let code = param(form, "device_code")
            .ok_or_else(|| err("invalid_request", "device_code is missing"))?;
        let now = Instant::now();
        let Some(d) = self.devices.get_mut(code) else {
            return Err(err("invalid_grant", "unknown device code"));
        };
        if d.client_id != client.client_id {
            return Err(err("invalid_grant", "device code issued to another client"));
        }
        if let DeviceStatus::Redeemed(family) = d.status {
            record.family = Some(family);
            return Err(err("invalid_grant", "device code already used"));
        }
        if now >= d.expires_at {
            return Err(err("expired_token", "the device code expired"));
        }
        // Arrival to arrival; a little slack for the scheduler.
        let too_fast = d
            .last_poll
            .is_some_and(|at| now + Duration::from_millis(20) < at + d.interval);
        d.last_poll = Some(now);
        if too_fast || std::mem::take(&mut d.slow_down_next) {
            d.interval += Duration::from_secs(5);
            return Err(err("slow_down", "polled faster than the interval"));
        }
        let subject = match &d.status {
            DeviceStatus::Pending => return Err(err("authorization_pending", "not approved yet")),
            DeviceStatus::Denied => return Err(err("access_denied", "the user declined")),
            DeviceStatus::Approved(subject) => subject.clone(),
            DeviceStatus::Redeemed(_) => unreachable!("handled above"),
        };
        let scope = d.scope.clone();
        let family = self.new_family();
        if let Some(d) = self.devices.get_mut(code) {
            d.status = DeviceStatus::Redeemed(family);
        }
        record.family = Some(family);
        record.scope = scope.clone();
        let mut body = self.token_response(
            &client.client_id,
            &subject,
            scope.as_deref(),
            Some(family),
            true,
        );
        let now = unix_now();
        let claims = json!({
            "iss": issuer, "sub": subject, "aud": client.client_id,
            "iat": now, "exp": now + secs(self.opts.access_ttl),
        });
        body.insert("id_token".into(), json!(unsigned_jwt(&claims)));
        Ok(body)
    }

    /// Sets a pending device login's status by its user code.
    fn decide_device(&mut self, user_code: &str, status: DeviceStatus) -> bool {
        match self
            .devices
            .values_mut()
            .find(|d| d.user_code == user_code && d.status == DeviceStatus::Pending)
        {
            Some(d) => {
                d.status = status;
                true
            }
            None => false,
        }
    }

    fn refresh_active(&self, rt: &RefreshToken, now: Instant) -> bool {
        rt.spent_at.is_none() && !rt.revoked && rt.expires_at.is_none_or(|exp| now < exp)
    }
}

/// An `alg: none` JWT: well formed, unsigned (dev only).
fn unsigned_jwt(claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{payload}.")
}

fn json_response(status: StatusCode, body: &Value) -> Response<DevBody> {
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // RFC 6749 §5.1: token responses must not be cached.
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    h.insert(http::header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

fn error_response(e: &OAuthError) -> Response<DevBody> {
    let status = if e.code == "invalid_client" {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::BAD_REQUEST
    };
    let mut resp = json_response(
        status,
        &json!({"error": e.code, "error_description": e.description}),
    );
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"tokenproxy-dev\""),
        );
    }
    resp
}

fn form_response(body: &Map<String, Value>) -> Response<DevBody> {
    let mut ser = form_urlencoded::Serializer::new(String::new());
    for (k, v) in body {
        match v {
            Value::String(s) => ser.append_pair(k, s),
            other => ser.append_pair(k, &other.to_string()),
        };
    }
    let mut resp = Response::new(full(ser.finish()));
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-www-form-urlencoded"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    resp
}

fn raw_response(status: u16, body: &str, content_type: &str) -> Response<DevBody> {
    let mut resp = Response::new(full(body.to_owned()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

fn html(status: StatusCode, message: &str) -> Response<DevBody> {
    let mut resp = Response::new(full(format!(
        "<!doctype html><title>dev IdP</title><p>{message}</p>\n"
    )));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

impl DevIdp {
    /// Binds `addr` (use `127.0.0.1:0` in tests) and serves in spawned tasks.
    pub async fn start(addr: SocketAddr, opts: IdpOptions) -> io::Result<DevIdp> {
        Self::start_inner(addr, opts, None).await
    }

    /// Over TLS with [`super::tls::test_server_config_mtls`]: asks for client
    /// certificates (RFC 8705), serves the mTLS alias `/mtls/token` and
    /// advertises it in `mtls_endpoint_aliases`; certificate-authenticated
    /// clients are accepted only there.
    pub async fn start_mtls(addr: SocketAddr, opts: IdpOptions) -> io::Result<DevIdp> {
        let tls = tokio_rustls::TlsAcceptor::from(super::tls::test_server_config_mtls());
        Self::start_inner(addr, opts, Some(tls)).await
    }

    async fn start_inner(
        addr: SocketAddr,
        opts: IdpOptions,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> io::Result<DevIdp> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let shared = Arc::new(Shared {
            url: RwLock::new(String::new()),
            state: Mutex::new(State::new(opts)),
            mtls: tls.is_some(),
        });
        let handler_shared = shared.clone();
        let handler: Handler = Arc::new(move |req| Box::pin(handle(handler_shared.clone(), req)));
        let server = Server::bind(addr, handler, tls).await?;
        *shared.url.write() = format!("{scheme}://{}", server.addr());
        Ok(DevIdp {
            inner: Arc::new(IdpInner { server, shared }),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.server.addr()
    }

    /// `http://127.0.0.1:PORT`; also the issuer.
    pub fn url(&self) -> String {
        self.inner.shared.url.read().clone()
    }

    pub fn token_url(&self) -> String {
        format!("{}/token", self.url())
    }

    pub fn authorize_url(&self) -> String {
        format!("{}/authorize", self.url())
    }

    pub fn introspection_url(&self) -> String {
        format!("{}/introspect", self.url())
    }

    pub fn revocation_url(&self) -> String {
        format!("{}/revoke", self.url())
    }

    /// Closes the listener and all open connections: later connects are
    /// refused until [`DevIdp::restart`].
    pub async fn stop(&self) {
        self.inner.server.stop().await
    }

    /// Binds the same port again, keeping all state. Panics if the port was
    /// taken meanwhile (see [`DevIdp::try_restart`]).
    pub async fn restart(&self) {
        if let Err(e) = self.try_restart().await {
            panic!("dev IdP could not rebind {}: {e}", self.addr());
        }
    }

    pub async fn try_restart(&self) -> io::Result<()> {
        self.inner.server.restart().await
    }

    fn state(&self) -> parking_lot::MutexGuard<'_, State> {
        self.inner.shared.state.lock()
    }

    /// Seeds an active refresh token in a new family.
    pub fn issue_refresh_token(&self, client_id: &str, subject: &str) -> String {
        let mut st = self.state();
        let scope = st
            .opts
            .clients
            .iter()
            .find(|c| c.client_id == client_id)
            .and_then(|c| c.allowed_scopes.as_ref())
            .map(|s| s.join(" "));
        let family = st.new_family();
        st.mint_refresh(client_id, subject, scope.as_deref(), family)
    }

    /// Mints an access token outside any family (for echo-only tests).
    pub fn issue_access_token(&self, client_id: &str) -> String {
        self.state().mint_access(client_id, client_id, None, None).0
    }

    /// As [`DevIdp::issue_access_token`], valid for `ttl` rather than the
    /// IdP's `access_ttl`: a token a scripted answer hands out that must
    /// outlive a slow test.
    pub fn issue_access_token_lasting(&self, client_id: &str, ttl: Duration) -> String {
        let mut state = self.state();
        let token = state.mint_access(client_id, client_id, None, None).0;
        if let Some(t) = state.access.get_mut(&token) {
            t.expires_at = Instant::now() + ttl;
            t.exp_unix = t.iat_unix + secs(ttl);
        }
        token
    }

    /// Every `/token` request so far, oldest first.
    pub fn grants(&self) -> Vec<GrantRecord> {
        self.state().grants.clone()
    }

    /// Spent refresh tokens presented outside the grace window. Tests of the
    /// proxy assert this stays 0.
    pub fn reuse_count(&self) -> usize {
        self.state().reuse_count
    }

    /// Successful grants of this type (including ones whose answer a fault
    /// then dropped or held).
    pub fn grant_count(&self, grant_type: &str) -> usize {
        self.state()
            .grants
            .iter()
            .filter(|g| g.grant_type == grant_type && g.outcome == "ok")
            .count()
    }

    /// Nonce mode (RFC 9449 §8): from now on every DPoP proof must carry
    /// `nonce`; `None` turns it off.
    pub fn set_dpop_nonce(&self, nonce: Option<&str>) {
        self.state().dpop_nonce = nonce.map(str::to_owned);
    }

    /// The DPoP key (`jkt`) an access token issued here is bound to.
    pub fn access_token_jkt(&self, token: &str) -> Option<String> {
        self.state().access.get(token).and_then(|a| a.jkt.clone())
    }

    /// For [`crate::dev::EchoUpstream::set_dpop`]: a token's binding, as
    /// the IdP's introspection (`cnf.jkt`) would tell a resource server.
    pub fn dpop_binding(&self) -> super::echo::DpopBinding {
        let shared = self.inner.shared.clone();
        Arc::new(move |t: &str| {
            shared
                .state
                .lock()
                .access
                .get(t)
                .and_then(|a| a.jkt.clone())
        })
    }

    /// A check for [`crate::dev::EchoUpstream`] backed by this IdP.
    pub fn token_check(&self) -> TokenCheck {
        let shared = self.inner.shared.clone();
        Arc::new(move |t: &str| access_valid(&shared.state.lock(), t))
    }

    /// Issued here, not expired, not revoked.
    pub fn is_access_token_valid(&self, token: &str) -> bool {
        access_valid(&self.state(), token)
    }

    pub fn revoke_access_token(&self, token: &str) {
        if let Some(at) = self.state().access.get_mut(token) {
            at.revoked = true;
        }
    }

    /// Revokes the whole family of a refresh token (refresh and access tokens).
    pub fn revoke_family_of(&self, refresh_token: &str) {
        let mut st = self.state();
        if let Some(family) = st.refresh.get(refresh_token).map(|rt| rt.family) {
            st.revoke_family(family);
        }
    }

    /// Refresh tokens neither spent, revoked nor expired.
    pub fn active_refresh_token_count(&self) -> usize {
        let st = self.state();
        let now = Instant::now();
        st.refresh
            .values()
            .filter(|rt| st.refresh_active(rt, now))
            .count()
    }

    /// Lifetime of access tokens issued from now on.
    /// Salesforce: the `instance_url` later token responses carry.
    pub fn set_instance_url(&self, url: Option<String>) {
        self.state().opts.instance_url = url;
    }

    /// The `token_type` later token responses carry.
    pub fn set_token_type(&self, t: &str) {
        self.state().opts.token_type = t.to_owned();
    }

    pub fn set_access_ttl(&self, d: Duration) {
        self.state().opts.access_ttl = d;
    }

    /// Queues a fault for a later `/token` request (FIFO, one per request).
    pub fn push_fault(&self, f: Fault) {
        self.state().faults.push_back(f);
    }

    pub fn clear_faults(&self) {
        self.state().faults.clear();
        self.state().device_faults.clear();
    }

    /// Queues a fault for a later `/device` request (FIFO, one per
    /// request). Only the faults that answer without processing apply
    /// there ([`Fault::Status`], [`Fault::Body`], [`Fault::Echo`],
    /// [`Fault::Redirect`]); any other is consumed and ignored.
    pub fn push_device_fault(&self, f: Fault) {
        self.state().device_faults.push_back(f);
    }

    /// Faults not yet consumed.
    pub fn pending_faults(&self) -> usize {
        self.state().faults.len()
    }

    pub fn device_url(&self) -> String {
        format!("{}/device", self.url())
    }

    /// Approves a pending device login (as `subject`); false when no
    /// pending login has this user code.
    pub fn approve_device(&self, user_code: &str, subject: &str) -> bool {
        self.state()
            .decide_device(user_code, DeviceStatus::Approved(subject.to_owned()))
    }

    /// Declines a pending device login: its next poll gets `access_denied`.
    pub fn deny_device(&self, user_code: &str) -> bool {
        self.state().decide_device(user_code, DeviceStatus::Denied)
    }

    /// Ends a device login's lifetime now: its next poll gets `expired_token`.
    pub fn expire_device(&self, user_code: &str) {
        let now = Instant::now();
        for d in self.state().devices.values_mut() {
            if d.user_code == user_code {
                d.expires_at = now;
            }
        }
    }

    /// The next poll of this device login gets `slow_down` (and the
    /// interval it enforces grows by 5 s, as for a real one).
    pub fn slow_down_device(&self, user_code: &str) {
        for d in self.state().devices.values_mut() {
            if d.user_code == user_code {
                d.slow_down_next = true;
            }
        }
    }

    /// Every device code issued (tests check none leaks).
    pub fn device_codes(&self) -> Vec<String> {
        self.state().devices.keys().cloned().collect()
    }
}

fn access_valid(st: &State, token: &str) -> bool {
    st.access
        .get(token)
        .is_some_and(|at| !at.revoked && Instant::now() < at.expires_at)
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<DevBody> {
    let path = req.uri().path().to_owned();
    match path.as_str() {
        "/token" => token_endpoint(shared, req).await,
        MTLS_TOKEN_PATH if shared.mtls => token_endpoint(shared, req).await,
        "/authorize" => authorize(&shared, &req),
        "/device" => device_authorization(shared, req).await,
        "/device/verify" => device_verify(&shared, &req),
        "/introspect" => introspect(shared, req).await,
        "/revoke" => revoke(shared, req).await,
        "/.well-known/oauth-authorization-server" | "/.well-known/openid-configuration" => {
            metadata(&shared.url.read(), shared.mtls)
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": "not_found", "error_description": "no such endpoint"}),
        ),
    }
}

/// What a POST endpoint received: form, Basic header, or an error to answer.
struct Posted {
    form: Form,
    authorization: Option<String>,
    /// The request path: an assertion's `aud` may name the endpoint.
    path: String,
    /// The TLS client certificate chain, when one was presented.
    peer: Option<PeerCerts>,
    /// Whether this IdP advertises `mtls_endpoint_aliases`.
    mtls_alias_served: bool,
    /// Every `DPoP` header value (RFC 9449 §4.3: there must be at most one).
    dpop: Vec<String>,
}

async fn read_post(req: Request<Incoming>, mtls: bool) -> Result<Posted, OAuthError> {
    if req.method() != Method::POST {
        return Err(err("invalid_request", "use POST"));
    }
    let path = req.uri().path().to_owned();
    let peer = req.extensions().get::<PeerCerts>().cloned();
    let form_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';').next().is_some_and(|m| {
                m.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        });
    let authorization = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let dpop = req
        .headers()
        .get_all("dpop")
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    let body = Limited::new(req.into_body(), 1 << 20)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|_| err("invalid_request", "unreadable or oversized body"))?;
    if !form_type {
        return Err(err(
            "invalid_request",
            "content-type must be application/x-www-form-urlencoded",
        ));
    }
    Ok(Posted {
        form: parse_form(&body),
        authorization,
        path,
        peer,
        mtls_alias_served: mtls,
        dpop,
    })
}

/// The answer of a fault that answers without processing the request.
fn canned_answer(fault: &Fault, posted: Option<&Posted>) -> Option<Response<DevBody>> {
    match fault {
        Fault::Status {
            status,
            body,
            content_type,
            headers,
        } => {
            let mut resp = raw_response(*status, body, content_type);
            for (k, v) in headers {
                if let (Ok(k), Ok(v)) = (
                    HeaderName::from_bytes(k.as_bytes()),
                    HeaderValue::from_str(v),
                ) {
                    resp.headers_mut().append(k, v);
                }
            }
            Some(resp)
        }
        Fault::Body {
            status,
            body,
            content_type,
        } => Some(raw_response(*status, body, content_type)),
        Fault::Redirect(location) => {
            let mut resp = raw_response(302, "", "text/plain");
            if let Ok(v) = HeaderValue::from_str(location) {
                resp.headers_mut().insert(http::header::LOCATION, v);
            }
            Some(resp)
        }
        Fault::Echo { status, error } => Some(echo_answer(*status, error, posted)),
        _ => None,
    }
}

/// [`Fault::Echo`]: the request quoted back in the answer.
fn echo_answer(status: u16, error: &str, posted: Option<&Posted>) -> Response<DevBody> {
    let mut quoted = Map::new();
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Some(p) = posted {
        if let Some((id, secret)) = p.authorization.as_deref().and_then(parse_basic) {
            quoted.insert("client_id".into(), json!(id));
            quoted.insert("client_secret".into(), json!(secret));
            query.append_pair("client_secret", &secret);
        }
        for (k, v) in &p.form {
            quoted.insert(k.clone(), json!(v));
            query.append_pair(k, v);
        }
    }
    json_response(
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        &json!({
            "error": error,
            "error_description": format!(
                "could not process {}; {}",
                Value::Object(quoted),
                "details ".repeat(600)
            ),
            "error_uri": format!("https://idp.example/errors?{}", query.finish()),
        }),
    )
}

async fn token_endpoint(shared: Arc<Shared>, req: Request<Incoming>) -> Response<DevBody> {
    let kill = req.extensions().get::<ConnKill>().cloned();
    let posted = read_post(req, shared.mtls).await;
    let issuer = shared.url.read().clone();
    let fault = shared.state.lock().faults.pop_front();

    // Faults that answer (or hang up) without processing the grant.
    let canned = fault
        .as_ref()
        .and_then(|f| canned_answer(f, posted.as_ref().ok()));
    let unprocessed = canned.is_some() || matches!(fault, Some(Fault::ResetBeforeProcessing));
    if unprocessed {
        {
            let mut st = shared.state.lock();
            let mut record = match &posted {
                Ok(p) => describe(&st, p, &issuer),
                Err(_) => blank_record(),
            };
            record.outcome = "fault".into();
            record.fault = fault.as_ref().map(Fault::name);
            st.grants.push(record);
        }
        return match canned {
            Some(resp) => resp,
            None => kill_or_500(kill).await,
        };
    }
    if let Some(Fault::Delay(d)) = &fault {
        tokio::time::sleep(*d).await;
    }

    let outcome = {
        let mut st = shared.state.lock();
        let (mut record, result) = match posted {
            Ok(p) => {
                let mut record = describe(&st, &p, &issuer);
                // RFC 9449 §4.3 and §8: the proof is checked before the
                // client or the grant, so a refused proof spends nothing.
                match check_proof(&mut st, &p, &issuer) {
                    Ok(jkt) => record.dpop_jkt = jkt,
                    Err((e, with_nonce)) => {
                        record.outcome = e.code.into();
                        st.grants.push(record);
                        // Nothing was processed: a scripted fault waits
                        // for the request that is.
                        if let Some(f) = fault.clone() {
                            st.faults.push_front(f);
                        }
                        let nonce = st.dpop_nonce.clone().filter(|_| with_nonce);
                        drop(st);
                        let mut resp = error_response(&e);
                        if let Some(v) = nonce.and_then(|n| HeaderValue::from_str(&n).ok()) {
                            resp.headers_mut().insert("dpop-nonce", v);
                        }
                        return resp;
                    }
                }
                st.proof_jkt = record.dpop_jkt.clone();
                let mut auth = authenticate(&st.opts.clients, &p, &issuer);
                if let Some((jti, exp)) = auth.jti.take() {
                    let now = unix_now();
                    st.seen_jti.retain(|_, e| *e + 60 >= now);
                    if st.seen_jti.insert(jti, exp).is_some() {
                        auth.method = "invalid";
                        auth.result = Err(err("invalid_client", "assertion jti replayed"));
                        record.client_auth = "invalid".into();
                    }
                }
                let result = st.process(&p.form, auth, &mut record, &issuer);
                st.proof_jkt = None;
                (record, result)
            }
            Err(e) => (blank_record(), Err(e)),
        };
        record.outcome = match &result {
            Ok(_) => "ok".into(),
            Err(e) => e.code.into(),
        };
        record.fault = fault.as_ref().map(Fault::name);
        let code_grant = record.grant_type == "authorization_code";
        st.grants.push(record);
        (result, code_grant)
    };
    let (outcome, code_grant) = outcome;

    let dialect = shared.state.lock().opts.dialect;
    match fault {
        Some(Fault::ResetAfterProcessing) => kill_or_500(kill).await,
        Some(Fault::HoldAfterProcessing(hold)) => {
            hold.hold().await;
            respond_as(dialect, outcome, false, code_grant)
        }
        Some(Fault::FormEncoded) => respond_as(dialect, outcome, true, code_grant),
        Some(Fault::LoseAnswer(status)) => raw_response(
            status,
            "<html><body><h1>Bad Gateway</h1></body></html>",
            "text/html",
        ),
        _ => respond_as(dialect, outcome, false, code_grant),
    }
}

/// A refused code exchange (`invalid_grant` on `authorization_code`) as
/// each vendor documents it; `None`: the RFC shape.
fn code_refused_as(dialect: Dialect, e: &OAuthError) -> Option<Response<DevBody>> {
    match dialect {
        // docs.github.com: troubleshooting-oauth-app-access-token-request-errors
        Dialect::Github => {
            let mut m = Map::new();
            m.insert("error".into(), json!("bad_verification_code"));
            m.insert(
                "error_description".into(),
                json!("The code passed is incorrect or expired."),
            );
            m.insert(
                "error_uri".into(),
                json!("/apps/managing-oauth-apps/troubleshooting-oauth-app-access-token-request-errors/#bad-verification-code"),
            );
            let mut resp = form_response(&m);
            *resp.status_mut() = StatusCode::OK;
            Some(resp)
        }
        // docs.slack.dev: oauth.v2.access
        Dialect::Slack => Some(json_response(
            StatusCode::OK,
            &json!({"ok": false, "error": "invalid_code"}),
        )),
        Dialect::Hubspot => Some(json_response(
            StatusCode::BAD_REQUEST,
            &json!({"status": "BAD_AUTH_CODE", "message": "missing or unknown auth code", "correlationId": "dev"}),
        )),
        Dialect::Microsoft => {
            let (n, text) = if e.description.contains("expired") {
                (70008, "The provided authorization code or refresh token has expired due to inactivity. Send a new interactive authorization request for this user and resource.")
            } else if e.description.contains("already used") {
                (54005, "OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an existing refresh token.")
            } else {
                return None;
            };
            Some(json_response(
                StatusCode::BAD_REQUEST,
                &json!({
                    "error": "invalid_grant",
                    "error_description": format!("AADSTS{n}: {text} Trace ID: 0d1e2f30-dev ({})", e.description),
                    "error_codes": [n],
                    "error_uri": format!("https://login.microsoftonline.com/error?code={n}"),
                }),
            ))
        }
        _ => None,
    }
}

/// The answer in `dialect`'s documented shapes (docs/providers.md).
fn respond_as(
    dialect: Dialect,
    outcome: Result<Map<String, Value>, OAuthError>,
    form: bool,
    code_grant: bool,
) -> Response<DevBody> {
    let grant_dead = |e: &OAuthError| e.code == "invalid_grant";
    if let Err(e) = &outcome {
        if code_grant && grant_dead(e) {
            if let Some(resp) = code_refused_as(dialect, e) {
                return resp;
            }
        }
    }
    match (dialect, outcome, form) {
        (Dialect::Slack, Ok(mut body), _) => {
            body.insert("ok".into(), json!(true));
            json_response(StatusCode::OK, &Value::Object(body))
        }
        (_, Ok(body), false) => json_response(StatusCode::OK, &Value::Object(body)),
        (_, Ok(body), true) => form_response(&body),
        (Dialect::Github, Err(e), _) => {
            let code = if grant_dead(&e) {
                "bad_refresh_token"
            } else {
                e.code
            };
            let mut m = Map::new();
            m.insert("error".into(), json!(code));
            m.insert("error_description".into(), json!(e.description));
            let mut resp = form_response(&m);
            *resp.status_mut() = StatusCode::OK;
            resp
        }
        (Dialect::Slack, Err(e), _) => {
            let code = if grant_dead(&e) {
                "invalid_refresh_token"
            } else {
                e.code
            };
            json_response(StatusCode::OK, &json!({"ok": false, "error": code}))
        }
        (Dialect::Hubspot, Err(e), _) => {
            let status = if grant_dead(&e) {
                "BAD_REFRESH_TOKEN".to_owned()
            } else {
                e.code.to_ascii_uppercase()
            };
            json_response(
                StatusCode::BAD_REQUEST,
                &json!({"status": status, "message": e.description, "correlationId": "dev"}),
            )
        }
        (Dialect::Microsoft, Err(e), _) if grant_dead(&e) => json_response(
            StatusCode::BAD_REQUEST,
            &json!({
                "error": "invalid_grant",
                "error_description": format!("AADSTS700082: The refresh token has expired due to inactivity. ({})", e.description),
                "error_codes": [700082],
            }),
        ),
        (Dialect::Box, Err(e), _) if grant_dead(&e) => json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "invalid_grant", "error_description": "Refresh token has expired"}),
        ),
        (Dialect::Auth0, Err(e), _) if grant_dead(&e) => json_response(
            StatusCode::FORBIDDEN,
            &json!({"error": "invalid_grant", "error_description": "Unknown or invalid refresh token."}),
        ),
        (_, Err(e), _) => error_response(&e),
    }
}

async fn kill_or_500(kill: Option<ConnKill>) -> Response<DevBody> {
    match kill {
        Some(kill) => kill.kill().await,
        None => raw_response(500, "connection kill unavailable", "text/plain"),
    }
}

fn blank_record() -> GrantRecord {
    GrantRecord {
        at: SystemTime::now(),
        grant_type: String::new(),
        client_id: None,
        client_auth: "invalid".into(),
        refresh_token: None,
        family: None,
        scope: None,
        resource: None,
        outcome: String::new(),
        fault: None,
        dpop_jkt: None,
    }
}

/// RFC 9449 §4.3, strictly: at most one proof; when there is one, it
/// verifies for `POST` to this endpoint, its jti is new, and it carries
/// the current nonce when nonces are on. `Ok(Some(jkt))` for a valid
/// proof, `Ok(None)` without one; an error says whether to send the nonce.
fn check_proof(
    st: &mut State,
    p: &Posted,
    issuer: &str,
) -> Result<Option<String>, (OAuthError, bool)> {
    let proof = match p.dpop.as_slice() {
        [] => return Ok(None),
        [one] => one,
        _ => {
            return Err((
                err("invalid_dpop_proof", "more than one DPoP header"),
                false,
            ))
        }
    };
    let htu = format!("{issuer}{}", p.path);
    let now = unix_now();
    let v = crate::dpop::verify(proof, "POST", &htu, now)
        .map_err(|m| (err("invalid_dpop_proof", m), false))?;
    if let Some(n) = &st.dpop_nonce {
        if v.nonce.as_deref() != Some(n) {
            return Err((
                err(
                    "use_dpop_nonce",
                    "Authorization server requires nonce in DPoP proof",
                ),
                true,
            ));
        }
    }
    st.seen_proof_jti
        .retain(|_, iat| *iat + 2 * crate::dpop::IAT_WINDOW_SECS >= now);
    if st.seen_proof_jti.insert(v.jti, v.iat).is_some() {
        return Err((err("invalid_dpop_proof", "DPoP proof jti replayed"), false));
    }
    Ok(Some(v.jkt))
}

/// The record of a request before (or without) processing it.
fn describe(st: &State, p: &Posted, issuer: &str) -> GrantRecord {
    let auth = authenticate(&st.opts.clients, p, issuer);
    let refresh_token = param(&p.form, "refresh_token").map(str::to_owned);
    GrantRecord {
        at: SystemTime::now(),
        grant_type: param(&p.form, "grant_type").unwrap_or("").to_owned(),
        client_id: auth.client_id.clone(),
        client_auth: auth.label(),
        family: refresh_token
            .as_deref()
            .and_then(|t| st.refresh.get(t))
            .map(|rt| rt.family),
        refresh_token,
        scope: param(&p.form, "scope").map(str::to_owned),
        resource: param(&p.form, "resource").map(str::to_owned),
        outcome: String::new(),
        fault: None,
        dpop_jkt: None,
    }
}

/// RFC 8628 §3.1-3.2: client authentication as at `/token` (assertion jtis
/// included), scope checked, a new device code and user code; a queued
/// device fault that answers answers instead.
async fn device_authorization(shared: Arc<Shared>, req: Request<Incoming>) -> Response<DevBody> {
    let posted = read_post(req, shared.mtls).await;
    let fault = shared.state.lock().device_faults.pop_front();
    if let Some(resp) = fault.and_then(|f| canned_answer(&f, posted.as_ref().ok())) {
        return resp;
    }
    let p = match posted {
        Ok(p) => p,
        Err(e) => return error_response(&e),
    };
    let issuer = shared.url.read().clone();
    let mut st = shared.state.lock();
    if let Some(name) = duplicate(&p.form) {
        return error_response(&err(
            "invalid_request",
            format!("parameter {name} repeated"),
        ));
    }
    let mut auth = authenticate(&st.opts.clients, &p, &issuer);
    if let Some((jti, exp)) = auth.jti.take() {
        let now = unix_now();
        st.seen_jti.retain(|_, e| *e + 60 >= now);
        if st.seen_jti.insert(jti, exp).is_some() {
            auth.result = Err(err("invalid_client", "assertion jti replayed"));
        }
    }
    let client = match auth.result {
        Ok(c) => c,
        Err(e) => return error_response(&e),
    };
    let scope = match check_scope(&client, param(&p.form, "scope")) {
        Ok(s) => s,
        Err(e) => return error_response(&e),
    };
    let device_code = random("dc_");
    // RFC 8628 §6.1: short, case-insensitive, no vowels or look-alikes.
    let user_code: String = {
        use rand::seq::SliceRandom;
        let alphabet = b"BCDFGHJKLMNPQRSTVWXZ";
        let mut rng = rand::thread_rng();
        let pick: Vec<u8> = (0..8)
            .filter_map(|_| alphabet.choose(&mut rng).copied())
            .collect();
        format!(
            "{}-{}",
            String::from_utf8_lossy(&pick[..4]),
            String::from_utf8_lossy(&pick[4..])
        )
    };
    let ttl = st.opts.device_ttl;
    let interval = st.opts.device_interval;
    st.devices.insert(
        device_code.clone(),
        DeviceGrant {
            client_id: client.client_id.clone(),
            user_code: user_code.clone(),
            scope,
            expires_at: Instant::now() + ttl,
            interval,
            last_poll: None,
            slow_down_next: false,
            status: DeviceStatus::Pending,
        },
    );
    let verify = format!("{issuer}/device/verify");
    json_response(
        StatusCode::OK,
        &json!({
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": verify,
            "verification_uri_complete": format!("{verify}?user_code={user_code}"),
            "expires_in": secs(ttl),
            "interval": secs(interval),
        }),
    )
}

/// The page a person opens: `?user_code=X` approves that login (as
/// `login_hint`, else dev-user), with `deny=1` declines it; without a code,
/// a form asks for one.
fn device_verify(shared: &Shared, req: &Request<Incoming>) -> Response<DevBody> {
    let q: Form = parse_form(req.uri().query().unwrap_or("").as_bytes());
    let Some(code) = param(&q, "user_code") else {
        let mut resp = html(StatusCode::OK, "Enter the code shown on your device.");
        *resp.body_mut() = full(
            "<!doctype html><title>dev IdP</title><form method=get>\
             <label>Code <input name=user_code autofocus></label> <button>Approve</button></form>\n"
                .to_owned(),
        );
        return resp;
    };
    let code = code.trim().to_ascii_uppercase();
    let deny = param(&q, "deny").is_some();
    let subject = param(&q, "login_hint").unwrap_or("dev-user").to_owned();
    let status = if deny {
        DeviceStatus::Denied
    } else {
        DeviceStatus::Approved(subject)
    };
    if shared.state.lock().decide_device(&code, status) {
        html(
            StatusCode::OK,
            if deny {
                "Declined. You can close this page."
            } else {
                "Approved. You can close this page; the device finishes the login."
            },
        )
    } else {
        html(StatusCode::BAD_REQUEST, "unknown, used or expired code")
    }
}

/// Auto-approving authorization endpoint (RFC 6749 §4.1.1, RFC 7636);
/// `deny=1` makes the user decline.
fn authorize(shared: &Shared, req: &Request<Incoming>) -> Response<DevBody> {
    if req.method() != Method::GET {
        return html(StatusCode::METHOD_NOT_ALLOWED, "use GET");
    }
    let q: Form = parse_form(req.uri().query().unwrap_or("").as_bytes());
    let mut st = shared.state.lock();
    let Some(client) = param(&q, "client_id")
        .and_then(|id| st.opts.clients.iter().find(|c| c.client_id == id))
        .cloned()
    else {
        return html(StatusCode::BAD_REQUEST, "unknown client_id");
    };
    // §4.1.2.1: with a bad redirect_uri, tell the user, never redirect.
    let Some(redirect_uri) = param(&q, "redirect_uri")
        .filter(|r| client.redirect_uris.iter().any(|u| u == r))
        .map(str::to_owned)
    else {
        return html(
            StatusCode::BAD_REQUEST,
            "redirect_uri missing or not registered for this client",
        );
    };
    let issuer = shared.url.read().clone();
    let state = param(&q, "state").map(str::to_owned);
    let redirect = |pairs: &[(&str, &str)]| {
        let mut ser = form_urlencoded::Serializer::new(String::new());
        for (k, v) in pairs {
            ser.append_pair(k, v);
        }
        if let Some(s) = &state {
            ser.append_pair("state", s);
        }
        // RFC 9207: identify the issuer in the response.
        ser.append_pair("iss", &issuer);
        let sep = if redirect_uri.contains('?') { '&' } else { '?' };
        let location = format!("{redirect_uri}{sep}{}", ser.finish());
        let mut resp = Response::new(full(Bytes::new()));
        *resp.status_mut() = StatusCode::FOUND;
        if let Ok(v) = HeaderValue::from_str(&location) {
            resp.headers_mut().insert(http::header::LOCATION, v);
        }
        resp
    };
    let redirect_error =
        |code: &str, msg: &str| redirect(&[("error", code), ("error_description", msg)]);
    if duplicate(&q).is_some() {
        return redirect_error("invalid_request", "repeated parameter");
    }
    if param(&q, "response_type") != Some("code") {
        return redirect_error("unsupported_response_type", "only response_type=code");
    }
    let Some(challenge) = param(&q, "code_challenge") else {
        return redirect_error("invalid_request", "PKCE code_challenge is required");
    };
    if param(&q, "code_challenge_method") != Some("S256") {
        return redirect_error("invalid_request", "code_challenge_method must be S256");
    }
    if param(&q, "deny").is_some() {
        // The user declines, in the vendor's words (RFC 6749 §4.1.2.1).
        return match st.opts.dialect {
            Dialect::Github => redirect(&[
                ("error", "access_denied"),
                ("error_description", "The user has denied your application access."),
                ("error_uri", "https://docs.github.com/apps/managing-oauth-apps/troubleshooting-authorization-request-errors/#access-denied"),
            ]),
            Dialect::Microsoft => redirect_error(
                "access_denied",
                "AADSTS65004: User declined to consent to access the app.",
            ),
            _ => redirect_error("access_denied", "the user declined"),
        };
    }
    let scope = match check_scope(&client, param(&q, "scope")) {
        Ok(s) => s,
        Err(e) => return redirect_error(e.code, &e.description),
    };
    let code = random("code_");
    let code_ttl = st.opts.code_ttl;
    st.codes.insert(
        code.clone(),
        AuthCode {
            client_id: client.client_id.clone(),
            redirect_uri: redirect_uri.clone(),
            challenge: challenge.to_owned(),
            subject: param(&q, "login_hint").unwrap_or("dev-user").to_owned(),
            scope,
            nonce: param(&q, "nonce").map(str::to_owned),
            expires_at: Instant::now() + code_ttl,
            family: None,
        },
    );
    redirect(&[("code", &code)])
}

/// RFC 7662. Client authentication required; spent refresh tokens are
/// inactive.
async fn introspect(shared: Arc<Shared>, req: Request<Incoming>) -> Response<DevBody> {
    let p = match read_post(req, shared.mtls).await {
        Ok(p) => p,
        Err(e) => return error_response(&e),
    };
    let st = shared.state.lock();
    if let Err(e) = authenticate(&st.opts.clients, &p, &shared.url.read()).result {
        return error_response(&e);
    }
    let Some(token) = param(&p.form, "token") else {
        return error_response(&err("invalid_request", "token is missing"));
    };
    let issuer = shared.url.read().clone();
    let now = Instant::now();
    let mut body = json!({"active": false});
    if let Some(at) = st.access.get(token) {
        if !at.revoked && now < at.expires_at {
            body = json!({
                "active": true, "token_type": "Bearer", "client_id": at.client_id,
                "sub": at.subject, "exp": at.exp_unix, "iat": at.iat_unix, "iss": issuer,
            });
            if let Some(jkt) = &at.jkt {
                // RFC 9449 §6.2.
                body["token_type"] = json!("DPoP");
                body["cnf"] = json!({ "jkt": jkt });
            }
            if let Some(scope) = &at.scope {
                body["scope"] = json!(scope);
            }
        }
    } else if let Some(rt) = st.refresh.get(token) {
        if st.refresh_active(rt, now) {
            body = json!({
                "active": true, "token_type": "refresh_token", "client_id": rt.client_id,
                "sub": rt.subject, "iat": rt.iat_unix, "iss": issuer,
            });
            if let Some(exp) = rt.exp_unix {
                body["exp"] = json!(exp);
            }
            if let Some(scope) = &rt.scope {
                body["scope"] = json!(scope);
            }
        }
    }
    json_response(StatusCode::OK, &body)
}

/// RFC 7009. A refresh token revokes its whole family (§2.1 allows it).
async fn revoke(shared: Arc<Shared>, req: Request<Incoming>) -> Response<DevBody> {
    let p = match read_post(req, shared.mtls).await {
        Ok(p) => p,
        Err(e) => return error_response(&e),
    };
    let mut st = shared.state.lock();
    let client = match authenticate(&st.opts.clients, &p, &shared.url.read()).result {
        Ok(c) => c,
        Err(e) => return error_response(&e),
    };
    let Some(token) = param(&p.form, "token") else {
        return error_response(&err("invalid_request", "token is missing"));
    };
    let owner_family = |st: &State| {
        if let Some(rt) = st.refresh.get(token) {
            Some((rt.client_id.clone(), Some(rt.family)))
        } else {
            st.access.get(token).map(|at| (at.client_id.clone(), None))
        }
    };
    match owner_family(&st) {
        Some((owner, _)) if owner != client.client_id => error_response(&err(
            "unauthorized_client",
            "token issued to another client",
        )),
        Some((_, Some(family))) => {
            st.revoke_family(family);
            json_response(StatusCode::OK, &json!({}))
        }
        Some((_, None)) => {
            if let Some(at) = st.access.get_mut(token) {
                at.revoked = true;
            }
            json_response(StatusCode::OK, &json!({}))
        }
        // §2.2: an unknown token is not an error.
        None => json_response(StatusCode::OK, &json!({})),
    }
}

/// RFC 8414 metadata (also served as OpenID discovery).
fn metadata(issuer: &str, mtls: bool) -> Response<DevBody> {
    let mut md = json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{issuer}/authorize"),
            "token_endpoint": format!("{issuer}/token"),
            "introspection_endpoint": format!("{issuer}/introspect"),
            "revocation_endpoint": format!("{issuer}/revoke"),
            "response_types_supported": ["code"],
            "device_authorization_endpoint": format!("{issuer}/device"),
            "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials",
                "urn:ietf:params:oauth:grant-type:device_code"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported":
                ["client_secret_basic", "client_secret_post", "none", "private_key_jwt",
                 "client_secret_jwt", "tls_client_auth", "self_signed_tls_client_auth"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS256", "PS256", "ES256", "HS256"],
            "dpop_signing_alg_values_supported": ["ES256", "EdDSA"],
            "introspection_endpoint_auth_methods_supported":
                ["client_secret_basic", "client_secret_post"],
            "revocation_endpoint_auth_methods_supported":
                ["client_secret_basic", "client_secret_post"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["none"],
            "authorization_response_iss_parameter_supported": true,
    });
    if mtls {
        md["mtls_endpoint_aliases"] =
            json!({ "token_endpoint": format!("{issuer}{MTLS_TOKEN_PATH}") });
    }
    json_response(StatusCode::OK, &md)
}
