//! The token-endpoint conversation: a sans-IO request builder and response
//! parser (RFC 6749 §4.4, §6, §5.1, §5.2; RFC 7662 introspection), and the
//! client that sends them.
//!
//! Caches nothing and decides nothing about timing or state: the engine does.
//! Classifies every failure so the engine can, and says whether the request
//! may have reached the IdP (the lost-rotation rules depend on it).

use crate::assertion;
use crate::config::{AssertionAud, AssertionSource, AuthMethod, CredentialConfig};
use crate::egress::EgressConnector;
use crate::secret::Secret;
use base64::Engine as _;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, DATE, LOCATION, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Token responses larger than this are refused (a token set is a few KiB).
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024;
const USER_AGENT: &str = concat!("tokenproxy/", env!("CARGO_PKG_VERSION"));

/// What the grant presents.
#[derive(Debug, Clone)]
pub enum Grant<'a> {
    RefreshToken(&'a Secret),
    ClientCredentials {
        scopes: &'a [String],
        resource: Option<&'a str>,
    },
    AuthorizationCode {
        code: &'a Secret,
        redirect_uri: &'a str,
        verifier: &'a Secret,
    },
    /// RFC 8628 §3.4: the device code a device authorization returned.
    DeviceCode(&'a Secret),
}

impl Grant<'_> {
    pub fn grant_type(&self) -> &'static str {
        match self {
            Grant::RefreshToken(_) => "refresh_token",
            Grant::ClientCredentials { .. } => "client_credentials",
            Grant::AuthorizationCode { .. } => "authorization_code",
            Grant::DeviceCode(_) => DEVICE_CODE_GRANT,
        }
    }
}

/// RFC 8628 §3.4.
pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// A request ready to send: pure data.
#[derive(Debug)]
pub struct PreparedRequest {
    pub uri: Uri,
    pub headers: HeaderMap,
    /// Form-encoded body; holds secrets, so never log it.
    pub body: Secret,
}

/// Builds the token request for `grant` (RFC 6749 §4.4.2, §6, §4.1.3).
/// Fails before anything is sent when no client assertion can be made
/// (docs/client-authentication.md).
pub fn build_token_request(
    cred: &CredentialConfig,
    token_url: &Uri,
    grant: &Grant<'_>,
) -> Result<PreparedRequest, GrantError> {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("grant_type", grant.grant_type());
    match grant {
        Grant::RefreshToken(rt) => {
            form.append_pair("refresh_token", rt.expose());
            // RFC 6749 §6: scope is optional on refresh and must not widen;
            // some IdPs (Microsoft) require it (`scope_on_refresh`).
            if cred.scope_on_refresh && !cred.scopes.is_empty() {
                form.append_pair("scope", &cred.scopes.join(" "));
            }
        }
        Grant::ClientCredentials { scopes, resource } => {
            if !scopes.is_empty() {
                form.append_pair("scope", &scopes.join(" "));
            }
            if let Some(r) = resource.or(cred.resource.as_deref()) {
                form.append_pair("resource", r);
            }
        }
        Grant::AuthorizationCode {
            code,
            redirect_uri,
            verifier,
        } => {
            form.append_pair("code", code.expose());
            form.append_pair("redirect_uri", redirect_uri);
            form.append_pair("code_verifier", verifier.expose());
        }
        Grant::DeviceCode(device_code) => {
            form.append_pair("device_code", device_code.expose());
        }
    }
    if let Some(a) = &cred.audience {
        form.append_pair("audience", a);
    }
    if !matches!(grant, Grant::ClientCredentials { .. }) {
        if let Some(r) = &cred.resource {
            form.append_pair("resource", r);
        }
    }
    for (k, v) in &cred.extra_params {
        form.append_pair(k, v);
    }
    form_post(cred, token_url, form)
}

/// The form POST to an endpoint of the authorization server, with the
/// credential's client authentication.
fn form_post(
    cred: &CredentialConfig,
    url: &Uri,
    mut form: form_urlencoded::Serializer<'_, String>,
) -> Result<PreparedRequest, GrantError> {
    let mut headers = HeaderMap::new();
    apply_client_auth(cred, url, &mut form, &mut headers)?;
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-www-form-urlencoded"),
    );
    headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
    headers.insert(
        http::header::USER_AGENT,
        HeaderValue::from_static(USER_AGENT),
    );
    Ok(PreparedRequest {
        uri: url.clone(),
        headers,
        body: Secret::new(form.finish()),
    })
}

/// Builds the device authorization request (RFC 8628 §3.1): the client
/// authenticates as at the token endpoint; `scope` from `scopes`.
pub fn build_device_authorization_request(
    cred: &CredentialConfig,
    url: &Uri,
) -> Result<PreparedRequest, GrantError> {
    let mut form = form_urlencoded::Serializer::new(String::new());
    if !cred.scopes.is_empty() {
        form.append_pair("scope", &cred.scopes.join(" "));
    }
    if let Some(a) = &cred.audience {
        form.append_pair("audience", a);
    }
    if let Some(r) = &cred.resource {
        form.append_pair("resource", r);
    }
    form_post(cred, url, form)
}

/// A device authorization response (RFC 8628 §3.2). Only `device_code` is
/// secret: the user code and the links are for people.
#[derive(Debug, Clone)]
pub struct DeviceAuthorization {
    pub device_code: Secret,
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    pub expires_in: Duration,
    /// None: the RFC's default, 5 s.
    pub interval: Option<Duration>,
}

/// Parses a device authorization answer: an OAuth error is classified as
/// a token endpoint's would be; a 2xx must carry device_code, user_code,
/// verification_uri and expires_in.
pub fn parse_device_authorization(resp: &RawResponse) -> Result<DeviceAuthorization, GrantError> {
    let fields = parse_body(&resp.headers, &resp.body);
    let status = resp.status;
    let has_error = fields
        .as_ref()
        .is_some_and(|f| f.get_str("error").is_some());
    if has_error || !status.is_success() {
        // The same classification as a token response (no token involved).
        let mut e = match parse_token_response(resp, SystemTime::now()) {
            Err(e) => e,
            Ok(_) => GrantError::transient(
                Delivery::Answered,
                Some(status.as_u16()),
                "device authorization endpoint answered an error",
            ),
        };
        e.message = e
            .message
            .replace("token endpoint", "device authorization endpoint");
        return Err(e);
    }
    let unusable = |what: &str| GrantError {
        class: FailureClass::Config,
        ..GrantError::transient(
            Delivery::Answered,
            Some(status.as_u16()),
            format!("device authorization response {what}"),
        )
    };
    let Some(f) = fields else {
        return Err(unusable("is neither JSON nor form-encoded"));
    };
    let text = |k: &str| f.get_str(k).filter(|v| !v.is_empty());
    // Shown as links to people: web addresses only (no `javascript:`).
    let web = |v: &&str| {
        let l = v.to_ascii_lowercase();
        (l.starts_with("https://") || l.starts_with("http://")) && v.parse::<Uri>().is_ok()
    };
    let device_code = text("device_code").ok_or_else(|| unusable("has no device_code"))?;
    let user_code = text("user_code").ok_or_else(|| unusable("has no user_code"))?;
    // Google spells it verification_url.
    let verification_uri = text("verification_uri")
        .or_else(|| text("verification_url"))
        .filter(web)
        .ok_or_else(|| unusable("has no http(s) verification_uri"))?;
    let expires_in = f
        .get_secs("expires_in")
        .ok_or_else(|| unusable("has no usable expires_in"))?;
    Ok(DeviceAuthorization {
        device_code: Secret::new(device_code),
        user_code: sanitize(user_code, 64),
        verification_uri: sanitize(verification_uri, 512),
        verification_uri_complete: text("verification_uri_complete")
            .or_else(|| text("verification_url_complete"))
            .filter(web)
            .map(|v| sanitize(v, 1024)),
        expires_in,
        interval: f.get_secs("interval"),
    })
}

/// Builds an RFC 7662 introspection request for a refresh token.
pub fn build_introspection_request(
    cred: &CredentialConfig,
    url: &Uri,
    token: &Secret,
) -> Result<PreparedRequest, GrantError> {
    introspection_request(cred, url, token, "refresh_token")
}

/// Builds an RFC 7662 introspection request for an access token: its `exp`
/// is the lifetime a token response without `expires_in` did not say.
pub fn build_access_introspection_request(
    cred: &CredentialConfig,
    url: &Uri,
    token: &Secret,
) -> Result<PreparedRequest, GrantError> {
    introspection_request(cred, url, token, "access_token")
}

fn introspection_request(
    cred: &CredentialConfig,
    url: &Uri,
    token: &Secret,
    hint: &str,
) -> Result<PreparedRequest, GrantError> {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("token", token.expose());
    form.append_pair("token_type_hint", hint);
    form_post(cred, url, form)
}

fn apply_client_auth(
    cred: &CredentialConfig,
    endpoint: &Uri,
    form: &mut form_urlencoded::Serializer<'_, String>,
    headers: &mut HeaderMap,
) -> Result<(), GrantError> {
    let secret = cred
        .client_secret
        .as_ref()
        .map(Secret::expose)
        .unwrap_or("");
    match cred.auth_method {
        AuthMethod::ClientSecretBasic => {
            headers.insert(AUTHORIZATION, basic_auth(&cred.client_id, secret));
        }
        AuthMethod::ClientSecretPost => {
            form.append_pair("client_id", &cred.client_id);
            form.append_pair("client_secret", secret);
        }
        // RFC 8705 §2: the TLS handshake authenticates; the body names the client.
        AuthMethod::None | AuthMethod::TlsClientAuth | AuthMethod::SelfSignedTlsClientAuth => {
            form.append_pair("client_id", &cred.client_id);
        }
        AuthMethod::PrivateKeyJwt | AuthMethod::ClientSecretJwt => {
            let jwt = client_assertion(cred, endpoint, SystemTime::now())?;
            // RFC 7523 §3.1 makes client_id optional; send it, as most IdPs want.
            form.append_pair("client_id", &cred.client_id);
            form.append_pair("client_assertion_type", assertion::ASSERTION_TYPE);
            form.append_pair("client_assertion", jwt.expose());
        }
    }
    Ok(())
}

/// A fresh assertion for one request to `endpoint` (RFC 7523 §3: `aud`
/// names the server; by default the endpoint itself).
fn client_assertion(
    cred: &CredentialConfig,
    endpoint: &Uri,
    now: SystemTime,
) -> Result<Secret, GrantError> {
    let aud = match &cred.client_assertion_aud {
        AssertionAud::TokenEndpoint => endpoint.to_string(),
        // The configured issuer, which discovery checked (RFC 8414 §3.3).
        AssertionAud::Issuer => cred.issuer.as_ref().map_or_else(
            || endpoint.to_string(),
            |i| i.to_string().trim_end_matches('/').to_owned(),
        ),
        AssertionAud::Url(u) => u.clone(),
    };
    let claims = assertion::Claims::new(&cred.client_id, &aud, now);
    let made = match (
        &cred.auth_method,
        &cred.client_assertion,
        &cred.client_secret,
    ) {
        (AuthMethod::ClientSecretJwt, _, Some(secret)) => assertion::sign_hs256(secret, &claims),
        (_, Some(AssertionSource::Key { key, .. }), _) => assertion::sign(key, &claims),
        (_, Some(AssertionSource::File(path)), _) => assertion::read_file(path, now),
        _ => Err(assertion::AssertionError::Sign(
            "no key, file or secret configured".into(),
        )),
    };
    made.map_err(|e| {
        GrantError::config_not_sent("no client assertion for the token request".into()).caused_by(e)
    })
}

/// RFC 6749 §2.3.1: id and secret are form-urlencoded before base64.
pub fn basic_auth(client_id: &str, secret: &str) -> HeaderValue {
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let raw = format!("{}:{}", enc(client_id), enc(secret));
    let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
    let mut v = HeaderValue::from_str(&format!("Basic {b64}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Basic"));
    v.set_sensitive(true);
    v
}

/// A successful token response (RFC 6749 §5.1).
#[derive(Debug, Clone)]
pub struct TokenSet {
    pub access_token: Secret,
    /// As sent (sanitized); RFC 6749 §5.1 makes it required, some IdPs omit it.
    pub token_type: Option<String>,
    /// When `expires_in` was missing: from a JWT's `exp - iat`, else None.
    pub expires_in: Option<Duration>,
    /// Whether `expires_in` came from the response itself.
    pub expires_in_sent: bool,
    pub refresh_token: Option<Secret>,
    pub refresh_token_expires_in: Option<Duration>,
    pub scope: Option<String>,
    /// From the id_token's `sub`, when one came back.
    pub subject: Option<String>,
    /// `token_type` was `DPoP` (RFC 9449 §5): the token is bound to the
    /// key that signed the request's proof.
    pub dpop_bound: bool,
    /// The generated DPoP key the request was proven with, to be stored
    /// with the token set (login and device login set it).
    pub dpop_key: Option<Secret>,
    /// Values routes may use (`{token.instance_url}`), each checked.
    pub fields: crate::token_fields::Fields,
    /// Values the response sent that failed their check, and why.
    pub rejected_fields: Vec<(crate::token_fields::TokenField, &'static str)>,
}

/// The RFC 6749 §5.2 error codes, plus vendors' spellings of invalid_grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OAuthCode {
    InvalidRequest,
    InvalidClient,
    InvalidGrant,
    UnauthorizedClient,
    UnsupportedGrantType,
    InvalidScope,
    TemporarilyUnavailable,
    Other(String),
}

impl OAuthCode {
    pub fn parse(code: &str) -> OAuthCode {
        match code {
            "invalid_request" => OAuthCode::InvalidRequest,
            "invalid_client" => OAuthCode::InvalidClient,
            // GitHub answers 200 with bad_refresh_token / bad_verification_code.
            "invalid_grant" | "bad_refresh_token" | "bad_verification_code" | "expired_token" => {
                OAuthCode::InvalidGrant
            }
            "unauthorized_client" => OAuthCode::UnauthorizedClient,
            "unsupported_grant_type" => OAuthCode::UnsupportedGrantType,
            "invalid_scope" => OAuthCode::InvalidScope,
            // A second use_dpop_nonce: the nonce is learnt, retry later.
            "temporarily_unavailable" | "server_error" | "slow_down" | "use_dpop_nonce" => {
                OAuthCode::TemporarilyUnavailable
            }
            other => OAuthCode::Other(other.to_owned()),
        }
    }
}

/// How the engine must treat a failure (docs/architecture.md, "Failure classes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// The grant itself is dead: no retry until a new refresh token arrives.
    InvalidGrant,
    /// Wrong client, scope, grant type or endpoint: retried slowly.
    Config,
    /// Retry with backoff.
    Transient,
}

/// Whether the request may have reached the IdP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Failed before a byte was written (DNS, connect, TLS): safe to retry.
    NotSent,
    /// Written, but no answer arrived: the IdP may have rotated.
    MaybeSent,
    /// The IdP answered (the answer is the failure).
    Answered,
}

/// A failed grant, classified. Display is one lowercase line without secrets;
/// a transport failure keeps its cause as the source (print the chain).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct GrantError {
    pub class: FailureClass,
    pub delivery: Delivery,
    /// HTTP status when the IdP answered.
    pub status: Option<u16>,
    /// The OAuth `error` code when there was one (sanitized, capped).
    pub code: Option<String>,
    pub description: Option<String>,
    pub retry_after: Option<Duration>,
    /// Where a 3xx pointed (host only).
    pub redirect_host: Option<String>,
    /// A vendor's own code found beside (or instead of) the OAuth one, such
    /// as Microsoft's `AADSTS70008` (docs/providers.md).
    pub vendor_code: Option<String>,
    /// RFC 6749 §5.2 `error_uri`, as sent (sanitized, capped): GitHub and
    /// Microsoft point at their explanation of the error.
    pub error_uri: Option<String>,
    pub message: String,
    /// Shared so that waiters behind a failed attempt get the same error.
    #[source]
    pub cause: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl GrantError {
    pub(crate) fn transient(
        delivery: Delivery,
        status: Option<u16>,
        message: impl Into<String>,
    ) -> Self {
        GrantError {
            class: FailureClass::Transient,
            delivery,
            status,
            code: None,
            description: None,
            retry_after: None,
            redirect_host: None,
            vendor_code: None,
            error_uri: None,
            message: message.into(),
            cause: None,
        }
    }

    /// A request that cannot be built or sent as configured: nothing left.
    pub(crate) fn config_not_sent(message: String) -> Self {
        GrantError {
            class: FailureClass::Config,
            ..GrantError::transient(Delivery::NotSent, None, message)
        }
    }

    pub(crate) fn caused_by(
        mut self,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        self.cause = Some(Arc::from(cause.into()));
        self
    }
}

impl GrantError {
    /// Which kind of fault this was, for `tokenproxy_token_endpoint_failures_total`.
    pub fn fault_class(&self) -> &'static str {
        match (self.delivery, self.status) {
            (Delivery::NotSent, _) => "not_sent",
            (Delivery::MaybeSent, None) => "no_answer",
            (Delivery::MaybeSent, Some(s)) if s >= 500 => "gateway_5xx",
            (Delivery::MaybeSent, Some(_)) => "unusable_answer",
            (Delivery::Answered, _) if self.class == FailureClass::Transient => "refused",
            (Delivery::Answered, _) => "rejected",
        }
    }
}

/// What a DPoP credential's token requests are proven with.
pub struct TokenEndpointDpop<'a> {
    pub key: &'a crate::dpop::DpopKey,
    pub nonces: &'a crate::dpop::Nonces,
}

/// The DPoP key a login (code or device) proves with: `dpop_key`'s, or a
/// new generated one, returned with its stored form so the new family
/// keeps it (docs/dpop.md). `None` without `dpop`.
pub struct LoginDpop {
    pub key: crate::dpop::DpopKey,
    pub stored: Option<Secret>,
    pub nonces: crate::dpop::Nonces,
}

impl LoginDpop {
    pub fn for_credential(cred: &CredentialConfig) -> Result<Option<LoginDpop>, GrantError> {
        let (key, stored) = match &cred.dpop {
            None => return Ok(None),
            Some(crate::config::DpopSource::File { path, .. }) => {
                // The config holds it behind an Arc; a login is one-off.
                let pem = std::fs::read(path).map_err(|e| {
                    GrantError::config_not_sent(format!("cannot read dpop_key {}", path.display()))
                        .caused_by(e)
                })?;
                let key = crate::dpop::DpopKey::from_pem(&pem).map_err(|e| {
                    GrantError::config_not_sent(format!("dpop_key {}", path.display())).caused_by(e)
                })?;
                (key, None)
            }
            Some(crate::config::DpopSource::Generated) => {
                let (key, stored) = crate::dpop::DpopKey::generate().map_err(|e| {
                    GrantError::config_not_sent("cannot generate a DPoP key".into()).caused_by(e)
                })?;
                (key, Some(stored))
            }
        };
        Ok(Some(LoginDpop {
            key,
            stored,
            nonces: Default::default(),
        }))
    }

    pub fn proven(&self) -> TokenEndpointDpop<'_> {
        TokenEndpointDpop {
            key: &self.key,
            nonces: &self.nonces,
        }
    }
}

/// The raw answer of the token endpoint.
#[derive(Debug)]
pub struct RawResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A 2xx we cannot use: the IdP accepted the grant and may have rotated the
/// refresh token, so presenting it again is not safe without the
/// lost-rotation checks.
const ROTATION_UNKNOWN: Delivery = Delivery::MaybeSent;

/// Parses a token endpoint answer. Any body with an `error` member is an error
/// whatever the status, and so are `ok: false` (Slack) and a vendor's error
/// shape without `error` (HubSpot's `status`); JSON and form-encoded bodies
/// are both understood (docs/providers.md, "Error vocabularies").
pub fn parse_token_response(resp: &RawResponse, now: SystemTime) -> Result<TokenSet, GrantError> {
    let status = resp.status;
    if status.is_redirection() {
        let host = resp
            .headers
            .get(LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| l.parse::<Uri>().ok())
            .and_then(|u| u.host().map(str::to_owned));
        return Err(GrantError {
            cause: None,
            class: FailureClass::Config,
            delivery: Delivery::Answered,
            status: Some(status.as_u16()),
            code: None,
            description: None,
            retry_after: None,
            message: format!(
                "token endpoint redirected ({}){}",
                status.as_u16(),
                host.as_ref()
                    .map(|h| format!(" to {h}"))
                    .unwrap_or_default()
            ),
            redirect_host: host,
            vendor_code: None,
            error_uri: None,
        });
    }
    let fields = parse_body(&resp.headers, &resp.body);
    let retry_after = parse_retry_after(&resp.headers, now);
    if let Some(v) = fields.as_ref().and_then(|f| vendor_error(f, status)) {
        let code = sanitize(&v.code, 64);
        let parsed = match v.class {
            Some(_) => None,
            None => Some(OAuthCode::parse(&code)),
        };
        let class = v.class.unwrap_or(match parsed {
            Some(OAuthCode::InvalidGrant) => FailureClass::InvalidGrant,
            Some(
                OAuthCode::InvalidClient
                | OAuthCode::UnauthorizedClient
                | OAuthCode::UnsupportedGrantType
                | OAuthCode::InvalidScope
                | OAuthCode::InvalidRequest,
            ) => FailureClass::Config,
            Some(OAuthCode::TemporarilyUnavailable) => FailureClass::Transient,
            _ if status.is_server_error() || status.as_u16() == 429 => FailureClass::Transient,
            _ => FailureClass::Config,
        });
        return Err(GrantError {
            cause: None,
            class,
            delivery: Delivery::Answered,
            status: Some(status.as_u16()),
            message: format!("token endpoint answered {} {code}", status.as_u16()),
            code: Some(code),
            description: v.description.map(|d| sanitize(&d, 4000)),
            retry_after,
            redirect_host: None,
            vendor_code: v.vendor_code.map(|c| sanitize(&c, 32)),
            error_uri: v.error_uri.map(|u| sanitize(&u, 200)),
        });
    }
    if matches!(status.as_u16(), 429 | 503) {
        // Load shed or no healthy backend: the grant was refused, not run.
        let mut e = GrantError::transient(
            Delivery::Answered,
            Some(status.as_u16()),
            format!("token endpoint answered {}", status.as_u16()),
        );
        e.retry_after = retry_after;
        return Err(e);
    }
    if status.is_server_error() {
        // A 502, a 504 or a 500 without an OAuth error body may come from a
        // gateway that lost the IdP's answer after the rotation.
        let mut e = GrantError::transient(
            Delivery::MaybeSent,
            Some(status.as_u16()),
            format!(
                "token endpoint answered {} without an OAuth error body (a gateway in front of the IdP may have lost its answer)",
                status.as_u16()
            ),
        );
        e.retry_after = retry_after;
        return Err(e);
    }
    if !status.is_success() {
        // A 4xx without an OAuth error body: most often a wrong URL or client.
        return Err(GrantError {
            cause: None,
            class: FailureClass::Config,
            delivery: Delivery::Answered,
            status: Some(status.as_u16()),
            code: None,
            description: None,
            retry_after,
            redirect_host: None,
            vendor_code: None,
            error_uri: None,
            message: format!(
                "token endpoint answered {} without an OAuth error",
                status.as_u16()
            ),
        });
    }
    let Some(fields) = fields else {
        return Err(GrantError::transient(
            ROTATION_UNKNOWN,
            Some(status.as_u16()),
            "token endpoint answered a body that is neither JSON nor form-encoded",
        ));
    };
    let Some(access) = fields.get_str("access_token").filter(|t| !t.is_empty()) else {
        return Err(GrantError::transient(
            ROTATION_UNKNOWN,
            Some(status.as_u16()),
            "token response has no access_token",
        ));
    };
    if HeaderValue::from_str(access).is_err() {
        return Err(GrantError::transient(
            ROTATION_UNKNOWN,
            Some(status.as_u16()),
            "access_token contains bytes that cannot go in a header",
        ));
    }
    let token_type = fields.get_str("token_type");
    let expires_sent = fields.get_secs("expires_in");
    let jwt = jwt_claims(access);
    let expires_in = expires_sent.or_else(|| {
        let (exp, iat) = (
            jwt.as_ref()?.get("exp")?.as_i64()?,
            jwt.as_ref()?.get("iat")?.as_i64()?,
        );
        (exp > iat).then(|| Duration::from_secs((exp - iat) as u64))
    });
    let subject = fields
        .get_str("id_token")
        .and_then(jwt_claims)
        .and_then(|c| {
            c.get("sub")
                .and_then(|s| s.as_str())
                .map(|s| sanitize(s, 128))
        });
    let mut values = crate::token_fields::Fields::new();
    let mut rejected_fields = Vec::new();
    for f in crate::token_fields::TokenField::ALL {
        if let Some(v) = fields.get_str(f.as_str()) {
            match f.check(v) {
                Ok(v) => {
                    values.insert(f.as_str().to_owned(), v);
                }
                Err(why) => rejected_fields.push((f, why)),
            }
        }
    }
    Ok(TokenSet {
        access_token: Secret::new(access),
        // Which types a credential injects is the engine's call (its
        // config); refusing here would lose the rotation this answer holds.
        token_type: fields.get_str("token_type").map(|t| sanitize(t, 32)),
        expires_in,
        expires_in_sent: expires_sent.is_some(),
        refresh_token: fields
            .get_str("refresh_token")
            .filter(|t| !t.is_empty())
            .map(Secret::new),
        // The standard-looking name, Intuit's, then Keycloak's (0 there means
        // "no expiry" and is ignored like any zero).
        refresh_token_expires_in: REFRESH_LIFETIME_KEYS
            .iter()
            .find_map(|k| fields.get_secs(k)),
        scope: fields.get_str("scope").map(|s| sanitize(s, 512)),
        subject,
        dpop_bound: token_type.is_some_and(|t| t.eq_ignore_ascii_case("dpop")),
        dpop_key: None,
        fields: values,
        rejected_fields,
    })
}

/// A `DPoP` token answers a DPoP proof (RFC 9449 §5); to a request without
/// one it is a token this credential cannot present: a configuration
/// error, found after the IdP may have rotated (as any unusable 2xx).
pub fn check_token_type(set: TokenSet, proven: bool) -> Result<TokenSet, GrantError> {
    if !set.dpop_bound || proven {
        return Ok(set);
    }
    Err(GrantError {
        class: FailureClass::Config,
        ..GrantError::transient(
            ROTATION_UNKNOWN,
            Some(200),
            "token_type \"DPoP\" but the request carried no DPoP proof (set dpop = true for this credential)",
        )
    })
}

/// Where token responses say how long the refresh token itself lives.
pub const REFRESH_LIFETIME_KEYS: [&str; 3] = [
    "refresh_token_expires_in",
    "x_refresh_token_expires_in",
    "refresh_expires_in",
];

/// An error found in a token-endpoint body, before classification.
struct VendorError {
    code: String,
    description: Option<String>,
    /// Set when a vendor code decides the class; else the OAuth code does.
    class: Option<FailureClass>,
    vendor_code: Option<String>,
    error_uri: Option<String>,
}

/// Vendor codes and the class each means. Codes are compared
/// case-insensitively (HubSpot sends `BAD_REFRESH_TOKEN`).
const VENDOR_CODES: &[(&str, FailureClass)] = &[
    // GitHub: https://docs.github.com/en/apps/creating-github-apps/authenticating-with-a-github-app/refreshing-user-access-tokens
    ("bad_refresh_token", FailureClass::InvalidGrant),
    // Slack's oauth.v2.access: https://docs.slack.dev/reference/methods/oauth.v2.access
    ("invalid_refresh_token", FailureClass::InvalidGrant),
    ("invalid_client_id", FailureClass::Config),
    ("bad_client_secret", FailureClass::Config),
];

/// Microsoft Entra codes (`error_codes`, or `AADSTSnnn:` in the
/// description) that decide the class whatever the OAuth code says.
const AADSTS_CODES: &[(u64, FailureClass)] = &[
    (70008, FailureClass::InvalidGrant), // refresh token expired (inactivity)
    (700082, FailureClass::InvalidGrant), // refresh token expired (inactivity)
    (50173, FailureClass::InvalidGrant), // grant expired: credentials changed or revoked
    (7000215, FailureClass::Config),     // invalid client secret
    (90002, FailureClass::Config),       // tenant not found
    (54005, FailureClass::InvalidGrant), // authorization code already redeemed
];

fn vendor_class(code: &str) -> Option<FailureClass> {
    VENDOR_CODES
        .iter()
        .find(|(c, _)| c.eq_ignore_ascii_case(code))
        .map(|(_, class)| *class)
}

/// The first AADSTS code we know, from `error_codes` or the description.
fn aadsts(fields: &Fields, description: Option<&str>) -> Option<(u64, FailureClass)> {
    let mut found: Vec<u64> = fields.get_u64_list("error_codes");
    if let Some(d) = description {
        let mut rest = d;
        while let Some(i) = rest.find("AADSTS") {
            rest = &rest[i + 6..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if let Ok(n) = digits.parse() {
                found.push(n);
            }
        }
    }
    found
        .into_iter()
        .find_map(|n| AADSTS_CODES.iter().find(|(c, _)| *c == n).copied())
}

/// Finds an error in a body: RFC 6749 §5.2's `error` whatever the status;
/// `ok: false` (Slack answers 200); a vendor shape without `error`
/// (HubSpot's `status`/`message`) on a 4xx, or with a known vendor code
/// on any status. A body with none of these is not an error here.
fn vendor_error(fields: &Fields, status: StatusCode) -> Option<VendorError> {
    let not_ok = fields.get_bool("ok") == Some(false);
    let (code, description) = match fields.get_str("error") {
        Some(code) => (
            code.to_owned(),
            fields.get_str("error_description").map(str::to_owned),
        ),
        None => {
            let vendor = fields
                .get_str("status")
                .or_else(|| fields.get_str("code"))
                .filter(|c| !c.trim().is_empty() && c.len() <= 64);
            let message = fields.get_str("message").map(str::to_owned);
            match vendor {
                // Not on a 5xx: a gateway's own page may hide a rotation
                // (docs/architecture.md, "Lost rotation").
                Some(c) if status.is_client_error() || vendor_class(c).is_some() => {
                    (c.to_owned(), message)
                }
                _ if not_ok && !status.is_server_error() => ("ok_false".to_owned(), message),
                _ => return None,
            }
        }
    };
    let mut class = vendor_class(&code);
    let mut vendor_code = class.map(|_| code.clone());
    if let Some((n, c)) = aadsts(fields, description.as_deref()) {
        class = Some(c);
        vendor_code = Some(format!("AADSTS{n}"));
    }
    Some(VendorError {
        code,
        description,
        class,
        vendor_code,
        error_uri: fields
            .get_str("error_uri")
            .filter(|u| !u.trim().is_empty())
            .map(str::to_owned),
    })
}

/// The RFC 7662 answer: is the token still active?
pub fn parse_introspection(resp: &RawResponse) -> Result<bool, GrantError> {
    if !resp.status.is_success() {
        return Err(GrantError::transient(
            Delivery::Answered,
            Some(resp.status.as_u16()),
            format!("introspection endpoint answered {}", resp.status.as_u16()),
        ));
    }
    match parse_body(&resp.headers, &resp.body).and_then(|f| f.get_bool("active")) {
        Some(active) => Ok(active),
        None => Err(GrantError::transient(
            Delivery::Answered,
            Some(resp.status.as_u16()),
            "introspection response has no boolean `active`",
        )),
    }
}

/// The lifetime RFC 7662 gives an active token: its `exp` (epoch seconds)
/// from `sent`. None when inactive, without `exp`, or already past it.
pub fn parse_introspection_lifetime(
    resp: &RawResponse,
    sent: SystemTime,
) -> Result<Option<Duration>, GrantError> {
    if !parse_introspection(resp)? {
        return Ok(None);
    }
    let exp = parse_body(&resp.headers, &resp.body).and_then(|f| match f {
        Fields::Json(m) => m.get("exp")?.as_u64(),
        Fields::Form(_) => f.get_str("exp")?.parse().ok(),
    });
    Ok(exp.and_then(|e| {
        (SystemTime::UNIX_EPOCH + Duration::from_secs(e))
            .duration_since(sent)
            .ok()
            .filter(|d| !d.is_zero())
    }))
}

/// A flat view of a JSON object or a form body.
enum Fields {
    Json(serde_json::Map<String, serde_json::Value>),
    Form(Vec<(String, String)>),
}

impl Fields {
    fn get_str(&self, key: &str) -> Option<&str> {
        match self {
            Fields::Json(m) => m.get(key).and_then(|v| v.as_str()),
            Fields::Form(f) => f.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()),
        }
    }

    /// Seconds as a number or a numeric string; absurd values are ignored.
    fn get_secs(&self, key: &str) -> Option<Duration> {
        let n: f64 = match self {
            Fields::Json(m) => match m.get(key)? {
                serde_json::Value::Number(n) => n.as_f64()?,
                serde_json::Value::String(s) => s.trim().parse().ok()?,
                _ => return None,
            },
            Fields::Form(_) => self.get_str(key)?.trim().parse().ok()?,
        };
        // Zero, negative or beyond ten years: not a lifetime we can plan with.
        (1.0..=315_360_000.0)
            .contains(&n)
            .then(|| Duration::from_secs(n as u64))
    }

    /// A JSON list of non-negative integers (Microsoft's `error_codes`).
    fn get_u64_list(&self, key: &str) -> Vec<u64> {
        match self {
            Fields::Json(m) => m
                .get(key)
                .and_then(|v| v.as_array())
                .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
                .unwrap_or_default(),
            Fields::Form(_) => Vec::new(),
        }
    }

    fn get_bool(&self, key: &str) -> Option<bool> {
        match self {
            Fields::Json(m) => m.get(key)?.as_bool(),
            Fields::Form(_) => match self.get_str(key)? {
                "true" => Some(true),
                "false" => Some(false),
                _ => None,
            },
        }
    }
}

fn parse_body(headers: &HeaderMap, body: &[u8]) -> Option<Fields> {
    let ct = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let trimmed = body.trim_ascii();
    if trimmed.starts_with(b"{") {
        if let Ok(serde_json::Value::Object(m)) = serde_json::from_slice(trimmed) {
            return Some(Fields::Json(m));
        }
        return None;
    }
    let looks_form = ct.starts_with("application/x-www-form-urlencoded")
        || (!trimmed.is_empty()
            && trimmed.contains(&b'=')
            && !trimmed
                .iter()
                .any(|b| b.is_ascii_whitespace() || *b == b'<'));
    if looks_form {
        let pairs: Vec<(String, String)> = form_urlencoded::parse(trimmed)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        if !pairs.is_empty() {
            return Some(Fields::Form(pairs));
        }
    }
    None
}

/// Decodes a JWT's claims without verifying it (only to learn exp/iat/sub).
fn jwt_claims(token: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let mut parts = token.split('.');
    let (_h, p, _s) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(p.trim_end_matches('='))
        .ok()?;
    match serde_json::from_slice(&raw).ok()? {
        serde_json::Value::Object(m) => Some(m),
        _ => None,
    }
}

/// `Retry-After` as seconds or an HTTP-date (RFC 9110 §10.2.3); without it,
/// a rate-limit reset time in epoch seconds (`X-RateLimit-Reset`, as GitHub
/// and others send). The engine caps either at `max_backoff`.
pub fn parse_retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let Some(v) = headers.get(RETRY_AFTER) else {
        let reset = ["x-ratelimit-reset", "x-rate-limit-reset"]
            .iter()
            .find_map(|n| headers.get(*n))?;
        let epoch: u64 = reset.to_str().ok()?.trim().parse().ok()?;
        // checked: a hostile value must not overflow the clock.
        let at = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(epoch))?;
        return Some(at.duration_since(now).unwrap_or(Duration::ZERO));
    };
    let v = v.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(86_400)));
    }
    let at = httpdate_parse(v)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

fn httpdate_parse(v: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(&imf_to_rfc3339(v)?).ok()
}

/// "Sun, 06 Nov 1994 08:49:37 GMT" → "1994-11-06 08:49:37".
fn imf_to_rfc3339(v: &str) -> Option<String> {
    let mut it = v.split_whitespace();
    let _dow = it.next()?;
    let day: u32 = it.next()?.parse().ok()?;
    let mon = match it.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: u32 = it.next()?.parse().ok()?;
    let time = it.next()?;
    (it.next()? == "GMT").then_some(())?;
    Some(format!("{year:04}-{mon:02}-{day:02} {time}"))
}

/// The IdP's `Date` header, for skew warnings.
pub fn response_date(headers: &HeaderMap) -> Option<SystemTime> {
    httpdate_parse(headers.get(DATE)?.to_str().ok()?)
}

/// Replaces known secrets, and any long token-shaped word, by `[redacted]`.
pub fn scrub(text: &str, known: &[String]) -> String {
    let mut out = text.to_owned();
    for k in known.iter().filter(|k| k.len() >= 4) {
        for form in encoded_forms(k) {
            out = out.replace(form.as_str(), "[redacted]");
        }
    }
    out.split(' ')
        .map(|w| if looks_like_token(w) { "[redacted]" } else { w })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `secret` as sent and as an IdP may echo it inside a URL or a form:
/// form-encoded, percent-encoded, each with upper- and lower-case hex.
fn encoded_forms(secret: &str) -> Vec<String> {
    let form: String = form_urlencoded::byte_serialize(secret.as_bytes()).collect();
    let percent = percent_encoding::utf8_percent_encode(secret, percent_encoding::NON_ALPHANUMERIC)
        .to_string();
    let mut forms = vec![secret.to_owned()];
    for f in [form, percent] {
        let lower = lower_hex(&f);
        for v in [f, lower] {
            if !forms.contains(&v) {
                forms.push(v);
            }
        }
    }
    forms
}

/// `%2F` → `%2f`; the rest unchanged.
fn lower_hex(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut left = 0;
    for c in s.chars() {
        if c == '%' {
            left = 2;
            out.push(c);
        } else if left > 0 {
            left -= 1;
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// 20+ characters of token alphabet with both letters and digits: an
/// opaque token or a JWT, never prose.
fn looks_like_token(w: &str) -> bool {
    let w = w.trim_matches(|c: char| matches!(c, '"' | '\'' | ',' | '.' | ';' | ':' | '(' | ')'));
    w.len() >= 20
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b))
        && w.bytes().any(|b| b.is_ascii_digit())
        && w.bytes().any(|b| b.is_ascii_alphabetic())
}

/// Keeps IdP-provided text printable and short before it reaches a log.
pub fn sanitize(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

type Connector = hyper_rustls::HttpsConnector<EgressConnector>;

/// DNS, TCP connect, the egress proxy's CONNECT and the TLS handshake
/// together: a stall there means nothing was sent (docs/architecture.md,
/// "Lost rotation"). The default of a credential's `connect_timeout`.
pub use crate::config::TOKEN_CONNECT_TIMEOUT as CONNECT_TIMEOUT;

/// Sends grant and introspection requests. One per credential (its TLS
/// settings may differ); a new connection per request, so a request is never
/// written onto a connection the IdP already closed (that would be an
/// ambiguous loss). Connecting and exchanging have separate deadlines: only
/// a failure after the connection is up may have reached the IdP.
#[derive(Clone)]
pub struct GrantClient {
    connector: Connector,
    connect_timeout: Duration,
    /// From the first byte of the request written to the end of the body.
    timeout: Duration,
    /// Tests of the engine's timing rules answer here instead of a socket,
    /// so they run on tokio's paused clock.
    scripted: Option<Arc<dyn Exchange>>,
}

/// A token endpoint that answers without a socket (engine timing tests).
pub trait Exchange: Send + Sync {
    fn exchange<'a>(
        &'a self,
        req: &'a PreparedRequest,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<RawResponse, GrantError>> + Send + 'a>,
    >;
}

impl GrantClient {
    pub fn new(
        tls: rustls::ClientConfig,
        timeout: Duration,
        egress_proxy: Option<&Uri>,
    ) -> GrantClient {
        Self::with_connect_timeout(tls, timeout, CONNECT_TIMEOUT, egress_proxy)
    }

    pub fn with_connect_timeout(
        tls: rustls::ClientConfig,
        timeout: Duration,
        connect_timeout: Duration,
        egress_proxy: Option<&Uri>,
    ) -> GrantClient {
        let http = EgressConnector::new(egress_proxy, Duration::from_secs(5).min(connect_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        GrantClient {
            connector,
            connect_timeout,
            timeout,
            scripted: None,
        }
    }

    /// A client whose every exchange goes to `script` (tests).
    pub fn scripted(script: Arc<dyn Exchange>) -> GrantClient {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let mut c = Self::new(tls, Duration::from_secs(30), None);
        c.scripted = Some(script);
        c
    }

    /// Sends a token-endpoint request; with `dpop`, with a proof, and
    /// once more with the nonce when the IdP asks for one (RFC 9449 §8).
    /// That first answer refused the request before looking at the grant,
    /// so the retry presents nothing twice: to the engine it is one
    /// presentation. `rebuild` makes the request again (a client assertion
    /// must not be sent twice with the same `jti`).
    pub async fn send_proven(
        &self,
        mut req: PreparedRequest,
        dpop: Option<&TokenEndpointDpop<'_>>,
        rebuild: &(dyn Fn() -> Result<PreparedRequest, GrantError> + Sync),
    ) -> Result<RawResponse, GrantError> {
        let Some(d) = dpop else {
            return self.send(&req).await;
        };
        let mut retried = false;
        loop {
            let nonce = d.nonces.get(&req.uri);
            let proof = d
                .key
                .proof_header("POST", &crate::dpop::htu(&req.uri), None, nonce.as_deref())
                .map_err(|e| {
                    GrantError::config_not_sent("no DPoP proof for the token request".into())
                        .caused_by(e)
                })?;
            req.headers.insert(&crate::dpop::DPOP, proof);
            let resp = self.send(&req).await?;
            d.nonces.learn(&req.uri, &resp.headers);
            if !retried
                && crate::dpop::token_endpoint_wants_nonce(resp.status, &resp.headers, &resp.body)
            {
                retried = true;
                req = rebuild()?;
                continue;
            }
            return Ok(resp);
        }
    }

    /// Sends `req`; reads at most [`MAX_RESPONSE_BYTES`]. Never follows redirects.
    pub async fn send(&self, req: &PreparedRequest) -> Result<RawResponse, GrantError> {
        if let Some(script) = &self.scripted {
            return script.exchange(req).await;
        }
        let not_sent = GrantError::config_not_sent;
        let authority = req
            .uri
            .authority()
            .ok_or_else(|| not_sent("token endpoint URL has no host".into()))?;
        let host = HeaderValue::from_str(authority.as_str().rsplit('@').next().unwrap_or(""))
            .map_err(|e| not_sent(format!("cannot build token request: {e}")))?;
        let target = req
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let mut builder = Request::builder().method(Method::POST).uri(target);
        if let Some(h) = builder.headers_mut() {
            h.extend(req.headers.clone());
            h.insert(http::header::HOST, host);
        }
        let request = builder
            .body(Full::new(Bytes::from(req.body.expose().to_owned())))
            .map_err(|e| not_sent(format!("cannot build token request: {e}")))?;

        let mut connector = self.connector.clone();
        let connect = async {
            std::future::poll_fn(|cx| tower_service::Service::poll_ready(&mut connector, cx))
                .await?;
            tower_service::Service::call(&mut connector, req.uri.clone()).await
        };
        let io = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => {
                return Err(GrantError::transient(
                    Delivery::NotSent,
                    None,
                    "cannot connect to the token endpoint",
                )
                .caused_by(e))
            }
            Err(_) => {
                return Err(GrantError::transient(
                    Delivery::NotSent,
                    None,
                    format!(
                        "no connection to the token endpoint within {:?} (DNS, TCP connect, egress proxy CONNECT or TLS handshake); nothing was sent",
                        self.connect_timeout
                    ),
                ))
            }
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| {
                GrantError::transient(
                    Delivery::NotSent,
                    None,
                    "HTTP/1 handshake with the token endpoint failed",
                )
                .caused_by(e)
            })?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let exchange = async {
            let resp = sender.send_request(request).await.map_err(|e| {
                GrantError::transient(Delivery::MaybeSent, None, "the token request got no answer")
                    .caused_by(e)
            })?;
            let (parts, body) = resp.into_parts();
            // The IdP answered: whatever happens to the body, it processed
            // the request, so a body failure is still a possible rotation.
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    let oversized = e
                        .downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some();
                    let delivery = if oversized && !parts.status.is_success() {
                        Delivery::Answered
                    } else {
                        Delivery::MaybeSent
                    };
                    let status = Some(parts.status.as_u16());
                    if oversized {
                        GrantError::transient(
                            delivery,
                            status,
                            format!("token response larger than {MAX_RESPONSE_BYTES} bytes"),
                        )
                    } else {
                        GrantError::transient(delivery, status, "token response body failed")
                            .caused_by(e)
                    }
                })?
                .to_bytes();
            Ok(RawResponse {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        let result = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(GrantError::transient(
                Delivery::MaybeSent,
                None,
                format!(
                    "no answer from the token endpoint within {:?}",
                    self.timeout
                ),
            )),
        };
        driver.abort();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cred(method: AuthMethod) -> CredentialConfig {
        crate::token::tests_support::credential("c", "http://127.0.0.1:1/token", method)
    }

    fn raw(status: u16, ct: &str, body: &str) -> RawResponse {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
        RawResponse {
            status: StatusCode::from_u16(status).unwrap(),
            headers,
            body: Bytes::from(body.to_owned()),
        }
    }

    #[test]
    fn basic_auth_form_encodes_before_base64() {
        // RFC 6749 §2.3.1: "a b:c%" → "a+b%3Ac%25".
        let v = basic_auth("a b:c%", "s+/=");
        let b64 = v.to_str().unwrap().strip_prefix("Basic ").unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(std::str::from_utf8(&raw).unwrap(), "a+b%3Ac%25:s%2B%2F%3D");
        assert!(v.is_sensitive());
    }

    #[test]
    fn refresh_request_with_post_auth_carries_secret_in_body_only() {
        let c = cred(AuthMethod::ClientSecretPost);
        let rt = Secret::new("rt-1");
        let req = build_token_request(
            &c,
            &"http://127.0.0.1:1/token".parse().unwrap(),
            &Grant::RefreshToken(&rt),
        )
        .unwrap();
        let body = req.body.expose();
        assert!(body.contains("grant_type=refresh_token"));
        assert!(body.contains("refresh_token=rt-1"));
        assert!(body.contains("client_secret=sec%26ret"));
        assert!(req.headers.get(AUTHORIZATION).is_none());
        assert_eq!(req.headers[ACCEPT], "application/json");
        assert!(!format!("{req:?}").contains("rt-1"));
    }

    #[test]
    fn client_credentials_sends_scope_and_resource() {
        let c = cred(AuthMethod::ClientSecretBasic);
        let scopes = vec!["read".to_owned(), "write".to_owned()];
        let req = build_token_request(
            &c,
            &"http://127.0.0.1:1/token".parse().unwrap(),
            &Grant::ClientCredentials {
                scopes: &scopes,
                resource: Some("https://api/"),
            },
        )
        .unwrap();
        let body = req.body.expose();
        assert!(body.contains("scope=read+write"), "{body}");
        assert!(body.contains("resource=https%3A%2F%2Fapi%2F"), "{body}");
        assert!(req.headers.get(AUTHORIZATION).is_some());
    }

    fn form_of(req: &PreparedRequest) -> Vec<(String, String)> {
        form_urlencoded::parse(req.body.expose().as_bytes())
            .into_owned()
            .collect()
    }

    fn get<'a>(form: &'a [(String, String)], k: &str) -> Option<&'a str> {
        form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }

    fn jwt_parts(jwt: &str) -> (serde_json::Value, serde_json::Value) {
        let p: Vec<&str> = jwt.split('.').collect();
        let d = |s: &str| {
            serde_json::from_slice(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(s)
                    .unwrap(),
            )
            .unwrap()
        };
        (d(p[0]), d(p[1]))
    }

    fn key_cred(aud: AssertionAud) -> CredentialConfig {
        let mut c = cred(AuthMethod::PrivateKeyJwt);
        c.client_secret = None;
        c.client_assertion = Some(AssertionSource::Key {
            key: assertion::load_key(
                include_bytes!("../dev/testdata/client-ec.key"),
                None,
                Some("kid-1".into()),
                None,
            )
            .unwrap(),
            path: "client-ec.key".into(),
            cert: None,
        });
        c.client_assertion_aud = aud;
        c.issuer = Some("https://idp.example/".parse().unwrap());
        c
    }

    #[test]
    fn private_key_jwt_sends_a_fresh_assertion_and_no_secret() {
        let url: Uri = "https://idp.example/oauth2/token".parse().unwrap();
        let rt = Secret::new("rt-1");
        let c = key_cred(AssertionAud::TokenEndpoint);
        let a = build_token_request(&c, &url, &Grant::RefreshToken(&rt)).unwrap();
        let b = build_token_request(&c, &url, &Grant::RefreshToken(&rt)).unwrap();
        let (fa, fb) = (form_of(&a), form_of(&b));
        assert_eq!(
            get(&fa, "client_assertion_type"),
            Some(assertion::ASSERTION_TYPE)
        );
        assert_eq!(get(&fa, "client_id"), Some("client"));
        assert!(get(&fa, "client_secret").is_none());
        assert!(a.headers.get(AUTHORIZATION).is_none());
        let (h, claims) = jwt_parts(get(&fa, "client_assertion").unwrap());
        assert_eq!(h["alg"], "ES256");
        assert_eq!(h["kid"], "kid-1");
        assert_eq!(claims["iss"], "client");
        assert_eq!(claims["sub"], "client");
        assert_eq!(claims["aud"], "https://idp.example/oauth2/token");
        assert!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap() <= 60);
        let (_, claims_b) = jwt_parts(get(&fb, "client_assertion").unwrap());
        assert_ne!(claims["jti"], claims_b["jti"], "a jti per request");
        assert!(!format!("{a:?}").contains(get(&fa, "client_assertion").unwrap()));
    }

    #[test]
    fn assertion_audience_follows_client_assertion_aud() {
        let url: Uri = "https://idp.example/oauth2/token".parse().unwrap();
        let rt = Secret::new("rt-1");
        for (aud, want) in [
            (AssertionAud::Issuer, "https://idp.example"),
            (
                AssertionAud::Url("https://login.example/aud".into()),
                "https://login.example/aud",
            ),
        ] {
            let req = build_token_request(&key_cred(aud), &url, &Grant::RefreshToken(&rt)).unwrap();
            let (_, claims) = jwt_parts(get(&form_of(&req), "client_assertion").unwrap());
            assert_eq!(claims["aud"], want);
        }
    }

    #[test]
    fn client_secret_jwt_signs_with_the_secret_and_never_sends_it() {
        let url: Uri = "https://idp.example/token".parse().unwrap();
        let c = cred(AuthMethod::ClientSecretJwt);
        let req = build_token_request(
            &c,
            &url,
            &Grant::ClientCredentials {
                scopes: &[],
                resource: None,
            },
        )
        .unwrap();
        let form = form_of(&req);
        assert!(!req.body.expose().contains("sec%26ret"));
        let jwt = get(&form, "client_assertion").unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        v.set_audience(&["https://idp.example/token"]);
        jsonwebtoken::decode::<serde_json::Value>(
            jwt,
            &jsonwebtoken::DecodingKey::from_secret(b"sec&ret"),
            &v,
        )
        .unwrap();
    }

    #[test]
    fn tls_client_auth_sends_the_client_id_only() {
        for m in [
            AuthMethod::TlsClientAuth,
            AuthMethod::SelfSignedTlsClientAuth,
        ] {
            let mut c = cred(m);
            c.client_secret = None;
            let rt = Secret::new("rt-1");
            let req = build_token_request(
                &c,
                &"https://idp.example/token".parse().unwrap(),
                &Grant::RefreshToken(&rt),
            )
            .unwrap();
            let form = form_of(&req);
            assert_eq!(get(&form, "client_id"), Some("client"));
            assert!(get(&form, "client_secret").is_none());
            assert!(get(&form, "client_assertion").is_none());
            assert!(req.headers.get(AUTHORIZATION).is_none());
        }
    }

    #[test]
    fn an_expired_assertion_file_fails_before_sending_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"exp":1000}"#);
        let jwt = format!("eyJhbGciOiJSUzI1NiJ9.{claims}.c2lnbmF0dXJl");
        std::fs::write(&path, &jwt).unwrap();
        let mut c = cred(AuthMethod::PrivateKeyJwt);
        c.client_secret = None;
        c.client_assertion = Some(AssertionSource::File(path.clone()));
        let rt = Secret::new("rt-1");
        let e = build_token_request(
            &c,
            &"https://idp.example/token".parse().unwrap(),
            &Grant::RefreshToken(&rt),
        )
        .unwrap_err();
        assert_eq!(e.delivery, Delivery::NotSent);
        assert_eq!(e.class, FailureClass::Config);
        let chain = crate::error_chain(&e);
        assert!(chain.contains(&path.display().to_string()), "{chain}");
        assert!(chain.contains("expired"), "{chain}");
        assert!(!chain.contains(&jwt));
        // A fresh one written in its place is used at once.
        let exp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let claims =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(r#"{{"exp":{exp}}}"#));
        let fresh = format!("eyJhbGciOiJSUzI1NiJ9.{claims}.c2lnbmF0dXJl");
        std::fs::write(&path, format!("{fresh}\n")).unwrap();
        let req = build_token_request(
            &c,
            &"https://idp.example/token".parse().unwrap(),
            &Grant::RefreshToken(&rt),
        )
        .unwrap();
        assert_eq!(
            get(&form_of(&req), "client_assertion"),
            Some(fresh.as_str())
        );
    }

    #[test]
    fn device_authorization_answers_parse_strictly() {
        let ok = raw(
            200,
            "application/json",
            r#"{"device_code":"dc-1","user_code":"WDJB-MJHT","verification_url":"https://www.google.com/device","expires_in":"1800"}"#,
        );
        let a = parse_device_authorization(&ok).unwrap();
        assert_eq!(a.device_code.expose(), "dc-1");
        assert_eq!(a.verification_uri, "https://www.google.com/device");
        assert_eq!(a.expires_in, Duration::from_secs(1800));
        assert_eq!(a.interval, None, "the caller defaults to 5 s");
        assert!(
            !format!("{a:?}").contains("dc-1"),
            "Debug redacts the device code"
        );
        let js = raw(
            200,
            "application/json",
            r#"{"device_code":"dc-1","user_code":"X","verification_uri":"javascript:alert(1)","expires_in":60}"#,
        );
        assert!(
            parse_device_authorization(&js).is_err(),
            "a link people click must be a web address"
        );
        let no_code = raw(
            200,
            "application/json",
            r#"{"user_code":"X","verification_uri":"https://a/","expires_in":60}"#,
        );
        let e = parse_device_authorization(&no_code).unwrap_err();
        assert!(e.message.contains("no device_code"), "{e}");
        let refused = raw(401, "application/json", r#"{"error":"invalid_client"}"#);
        let e = parse_device_authorization(&refused).unwrap_err();
        assert_eq!(
            (e.class, e.code.as_deref()),
            (FailureClass::Config, Some("invalid_client"))
        );
        assert!(e.message.contains("device authorization endpoint"), "{e}");
    }

    #[test]
    fn parses_json_success() {
        let t = parse_token_response(
            &raw(200, "application/json", r#"{"access_token":"at","token_type":"bearer","expires_in":"3600","refresh_token":"rt2"}"#),
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(t.access_token.expose(), "at");
        assert_eq!(t.expires_in, Some(Duration::from_secs(3600)));
        assert_eq!(t.refresh_token.unwrap().expose(), "rt2");
    }

    #[test]
    fn github_200_with_error_is_an_error() {
        let e = parse_token_response(
            &raw(200, "application/json", r#"{"error":"bad_refresh_token","error_description":"The refresh token passed is incorrect or expired."}"#),
            SystemTime::now(),
        )
        .unwrap_err();
        assert_eq!(e.class, FailureClass::InvalidGrant);
        assert_eq!(e.code.as_deref(), Some("bad_refresh_token"));
        assert_eq!(e.delivery, Delivery::Answered);
    }

    #[test]
    fn form_encoded_bodies_parse() {
        let t = parse_token_response(
            &raw(
                200,
                "application/x-www-form-urlencoded",
                "access_token=at%2B1&token_type=bearer&expires_in=28800&refresh_token=r",
            ),
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(t.access_token.expose(), "at+1");
        let e = parse_token_response(
            &raw(
                200,
                "text/plain",
                "error=invalid_client&error_description=bad",
            ),
            SystemTime::now(),
        )
        .unwrap_err();
        assert_eq!(e.class, FailureClass::Config);
    }

    #[test]
    fn slack_ok_false_is_an_error_classified_by_its_code() {
        // https://docs.slack.dev/reference/methods/oauth.v2.access answers 200.
        let now = SystemTime::now();
        let e = parse_token_response(
            &raw(
                200,
                "application/json",
                r#"{"ok":false,"error":"invalid_refresh_token"}"#,
            ),
            now,
        )
        .unwrap_err();
        assert_eq!(e.class, FailureClass::InvalidGrant);
        assert_eq!(e.delivery, Delivery::Answered);
        assert_eq!(e.vendor_code.as_deref(), Some("invalid_refresh_token"));
        let e = parse_token_response(
            &raw(
                200,
                "application/json",
                r#"{"ok":false,"error":"bad_client_secret"}"#,
            ),
            now,
        )
        .unwrap_err();
        assert_eq!(e.class, FailureClass::Config);
        // ok:false wins over an access_token in the same body.
        let e = parse_token_response(
            &raw(
                200,
                "application/json",
                r#"{"ok":false,"access_token":"a"}"#,
            ),
            now,
        )
        .unwrap_err();
        assert_eq!(e.code.as_deref(), Some("ok_false"));
        // ok:true with a token is a success.
        let t = parse_token_response(
            &raw(
                200,
                "application/json",
                r#"{"ok":true,"access_token":"xoxe.xoxb-1","token_type":"bot","expires_in":43200}"#,
            ),
            now,
        );
        // Slack's token_type "bot": whether it is injected is the
        // credential's call (token_types), not the parser's.
        assert_eq!(t.unwrap().token_type.as_deref(), Some("bot"));
    }

    #[test]
    fn github_200_form_error_without_json_maps_to_invalid_grant() {
        let e = parse_token_response(
            &raw(
                200,
                "application/x-www-form-urlencoded",
                "error=bad_refresh_token&error_description=The+refresh+token+passed+is+incorrect+or+expired.",
            ),
            SystemTime::now(),
        )
        .unwrap_err();
        assert_eq!(e.class, FailureClass::InvalidGrant);
        assert_eq!(e.delivery, Delivery::Answered);
        assert_eq!(e.vendor_code.as_deref(), Some("bad_refresh_token"));
    }

    #[test]
    fn error_uri_is_kept_from_json_and_form_bodies() {
        let now = SystemTime::now();
        let e = parse_token_response(
            &raw(
                200,
                "application/x-www-form-urlencoded",
                "error=bad_verification_code&error_description=The+code+passed+is+incorrect+or+expired.&error_uri=%2Fapps%2Ftroubleshooting%2F%23bad-verification-code",
            ),
            now,
        )
        .unwrap_err();
        assert_eq!(e.class, FailureClass::InvalidGrant);
        assert_eq!(
            e.error_uri.as_deref(),
            Some("/apps/troubleshooting/#bad-verification-code")
        );
        let e = parse_token_response(
            &raw(400, "application/json", r#"{"error":"invalid_grant","error_description":"AADSTS54005: OAuth2 Authorization code was already redeemed.","error_codes":[54005],"error_uri":"https://login.microsoftonline.com/error?code=54005"}"#),
            now,
        )
        .unwrap_err();
        assert_eq!(e.vendor_code.as_deref(), Some("AADSTS54005"));
        assert_eq!(
            e.error_uri.as_deref(),
            Some("https://login.microsoftonline.com/error?code=54005")
        );
    }

    #[test]
    fn hubspot_status_without_error_field_is_classified() {
        let now = SystemTime::now();
        let e = parse_token_response(
            &raw(400, "application/json", r#"{"status":"BAD_REFRESH_TOKEN","message":"missing or invalid refresh token","correlationId":"x"}"#),
            now,
        )
        .unwrap_err();
        assert_eq!(e.class, FailureClass::InvalidGrant);
        assert_eq!(e.code.as_deref(), Some("BAD_REFRESH_TOKEN"));
        assert_eq!(
            e.description.as_deref(),
            Some("missing or invalid refresh token")
        );
        // An unknown vendor status on a 4xx is a refusal of the config kind.
        let e = parse_token_response(
            &raw(
                400,
                "application/json",
                r#"{"status":"BAD_CLIENT_ID","message":"x"}"#,
            ),
            now,
        )
        .unwrap_err();
        assert_eq!(e.class, FailureClass::Config);
        // On a 5xx a vendor shape does not hide the gateway rule.
        let e = parse_token_response(
            &raw(
                500,
                "application/json",
                r#"{"status":"error","message":"internal"}"#,
            ),
            now,
        )
        .unwrap_err();
        assert_eq!(e.delivery, Delivery::MaybeSent);
        // A 2xx with a status member and a token is still a success.
        assert!(parse_token_response(
            &raw(
                200,
                "application/json",
                r#"{"status":"ok","access_token":"a"}"#
            ),
            now,
        )
        .is_ok());
    }

    #[test]
    fn forbidden_with_an_oauth_error_is_classified_like_400() {
        let e = parse_token_response(
            &raw(403, "application/json", r#"{"error":"invalid_grant","error_description":"Unknown or invalid refresh token."}"#),
            SystemTime::now(),
        )
        .unwrap_err();
        assert_eq!(e.class, FailureClass::InvalidGrant);
        assert_eq!(e.delivery, Delivery::Answered);
    }

    #[test]
    fn microsoft_aadsts_codes_decide_the_class() {
        let now = SystemTime::now();
        let c = |b: &str| parse_token_response(&raw(400, "application/json", b), now).unwrap_err();
        for (body, class, vendor) in [
            (
                r#"{"error":"invalid_grant","error_description":"AADSTS700082: The refresh token has expired due to inactivity.","error_codes":[700082]}"#,
                FailureClass::InvalidGrant,
                "AADSTS700082",
            ),
            (
                r#"{"error":"invalid_grant","error_description":"AADSTS70008: The provided authorization code or refresh token has expired."}"#,
                FailureClass::InvalidGrant,
                "AADSTS70008",
            ),
            (
                r#"{"error":"invalid_grant","error_codes":[50173]}"#,
                FailureClass::InvalidGrant,
                "AADSTS50173",
            ),
            (
                r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.","error_codes":[7000215]}"#,
                FailureClass::Config,
                "AADSTS7000215",
            ),
            (
                r#"{"error":"invalid_request","error_description":"AADSTS90002: Tenant 'contoso.example' not found.","error_codes":[90002]}"#,
                FailureClass::Config,
                "AADSTS90002",
            ),
            // A vendor code beats a misleading OAuth one.
            (
                r#"{"error":"invalid_request","error_codes":[700082]}"#,
                FailureClass::InvalidGrant,
                "AADSTS700082",
            ),
        ] {
            let e = c(body);
            assert_eq!(e.class, class, "{body}");
            assert_eq!(e.vendor_code.as_deref(), Some(vendor), "{body}");
        }
        // An unknown AADSTS code leaves the OAuth code in charge.
        let e = c(r#"{"error":"invalid_scope","error_codes":[70011]}"#);
        assert_eq!(e.class, FailureClass::Config);
        assert_eq!(e.vendor_code, None);
    }

    #[test]
    fn vendor_refresh_token_lifetimes_are_recorded() {
        let now = SystemTime::now();
        for key in REFRESH_LIFETIME_KEYS {
            let body = format!(r#"{{"access_token":"a","expires_in":3600,"{key}":8726400}}"#);
            let t = parse_token_response(&raw(200, "application/json", &body), now).unwrap();
            assert_eq!(
                t.refresh_token_expires_in,
                Some(Duration::from_secs(8_726_400)),
                "{key}"
            );
        }
        // Keycloak's 0 (an offline token without expiry) is no lifetime.
        let t = parse_token_response(
            &raw(
                200,
                "application/json",
                r#"{"access_token":"a","refresh_expires_in":0}"#,
            ),
            now,
        )
        .unwrap();
        assert_eq!(t.refresh_token_expires_in, None);
    }

    #[test]
    fn scope_is_sent_on_refresh_only_when_configured() {
        let mut c = cred(AuthMethod::ClientSecretBasic);
        c.scopes = vec!["offline_access".into(), "User.Read".into()];
        let rt = Secret::new("rt-1");
        let url: Uri = "http://127.0.0.1:1/token".parse().unwrap();
        let req = build_token_request(&c, &url, &Grant::RefreshToken(&rt)).unwrap();
        assert!(get(&form_of(&req), "scope").is_none());
        c.scope_on_refresh = true;
        let req = build_token_request(&c, &url, &Grant::RefreshToken(&rt)).unwrap();
        assert_eq!(
            get(&form_of(&req), "scope"),
            Some("offline_access User.Read")
        );
    }

    #[test]
    fn a_dpop_token_needs_a_proven_request() {
        let now = SystemTime::now();
        let r = raw(
            200,
            "application/json",
            r#"{"access_token":"a","token_type":"DPoP","refresh_token":"r"}"#,
        );
        let set = parse_token_response(&r, now).unwrap();
        assert!(set.dpop_bound);
        assert!(check_token_type(set.clone(), true).is_ok());
        let e = check_token_type(set, false).unwrap_err();
        assert_eq!(e.class, FailureClass::Config);
        // The IdP answered 2xx: it may have rotated.
        assert_eq!(e.delivery, Delivery::MaybeSent);
        let bearer = raw(
            200,
            "application/json",
            r#"{"access_token":"a","token_type":"Bearer"}"#,
        );
        let set = parse_token_response(&bearer, now).unwrap();
        assert!(!set.dpop_bound && check_token_type(set, false).is_ok());
    }

    #[test]
    fn classes_follow_the_design() {
        let now = SystemTime::now();
        let c = |s, b: &str| parse_token_response(&raw(s, "application/json", b), now).unwrap_err();
        assert_eq!(
            c(400, r#"{"error":"invalid_grant"}"#).class,
            FailureClass::InvalidGrant
        );
        assert_eq!(
            c(401, r#"{"error":"invalid_client"}"#).class,
            FailureClass::Config
        );
        assert_eq!(
            c(400, r#"{"error":"invalid_scope"}"#).class,
            FailureClass::Config
        );
        assert_eq!(
            c(503, r#"{"error":"temporarily_unavailable"}"#).class,
            FailureClass::Transient
        );
        assert_eq!(c(500, "oops").class, FailureClass::Transient);
        assert_eq!(c(200, "<html>").class, FailureClass::Transient);
        assert_eq!(
            c(200, r#"{"token_type":"bearer"}"#).class,
            FailureClass::Transient
        );
        // Any token_type parses: the engine decides what it injects.
        let t = parse_token_response(
            &raw(
                200,
                "application/json",
                r#"{"access_token":"a","token_type":"bot"}"#,
            ),
            now,
        )
        .unwrap();
        assert_eq!(t.token_type.as_deref(), Some("bot"));
        let mut r = raw(302, "text/html", "");
        r.headers.insert(
            LOCATION,
            HeaderValue::from_static("https://login.example.com/x"),
        );
        let e = parse_token_response(&r, now).unwrap_err();
        assert_eq!(e.class, FailureClass::Config);
        assert_eq!(e.redirect_host.as_deref(), Some("login.example.com"));
    }

    #[test]
    fn unusable_2xx_may_hide_a_rotation_but_errors_do_not() {
        let now = SystemTime::now();
        for body in ["<html>", r#"{"token_type":"bearer"}"#] {
            let e = parse_token_response(&raw(200, "application/json", body), now).unwrap_err();
            assert_eq!(e.delivery, Delivery::MaybeSent, "{body}");
        }
        let e = parse_token_response(
            &raw(400, "application/json", r#"{"error":"invalid_grant"}"#),
            now,
        )
        .unwrap_err();
        assert_eq!(e.delivery, Delivery::Answered);
        let e = parse_token_response(&raw(503, "text/plain", "busy"), now).unwrap_err();
        assert_eq!(e.delivery, Delivery::Answered);
    }

    #[test]
    fn gateway_5xx_may_hide_a_rotation_but_refusals_do_not() {
        let now = SystemTime::now();
        let e = |s, ct, b: &str| parse_token_response(&raw(s, ct, b), now).unwrap_err();
        for (status, body) in [
            (502, "<html>bad gateway</html>"),
            (504, ""),
            (500, "oops"),
            (500, r#"{"message":"internal"}"#),
        ] {
            let got = e(status, "text/html", body);
            assert_eq!(got.delivery, Delivery::MaybeSent, "{status} {body}");
            assert_eq!(got.class, FailureClass::Transient);
            assert_eq!(got.fault_class(), "gateway_5xx");
        }
        for (status, body) in [
            (503, "no healthy upstream"),
            (429, ""),
            (500, r#"{"error":"server_error"}"#),
            (502, r#"{"error":"temporarily_unavailable"}"#),
        ] {
            let got = e(status, "application/json", body);
            assert_eq!(got.delivery, Delivery::Answered, "{status} {body}");
            assert_eq!(got.class, FailureClass::Transient);
            assert_eq!(got.fault_class(), "refused");
        }
    }

    #[test]
    fn retry_after_seconds_and_date() {
        let mut r = raw(429, "application/json", "{}");
        r.headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        let e = parse_token_response(&r, SystemTime::now()).unwrap_err();
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
        let now = humantime::parse_rfc3339("1994-11-06T08:49:00Z").unwrap();
        r.headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        assert_eq!(
            parse_retry_after(&r.headers, now),
            Some(Duration::from_secs(37))
        );
    }

    #[test]
    fn rate_limit_reset_epoch_counts_like_retry_after() {
        // DESIGN.md "Failure classes": X-RateLimit-Reset / x-rate-limit-reset.
        let now = humantime::parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
        let epoch = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        for name in ["x-ratelimit-reset", "x-rate-limit-reset"] {
            let mut h = HeaderMap::new();
            h.insert(
                name,
                HeaderValue::from_str(&(epoch + 42).to_string()).unwrap(),
            );
            assert_eq!(
                parse_retry_after(&h, now),
                Some(Duration::from_secs(42)),
                "{name}"
            );
            // Retry-After wins when both are sent.
            h.insert(RETRY_AFTER, HeaderValue::from_static("3"));
            assert_eq!(parse_retry_after(&h, now), Some(Duration::from_secs(3)));
        }
        let mut past = HeaderMap::new();
        past.insert("x-rate-limit-reset", HeaderValue::from_static("1000"));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        let mut huge = HeaderMap::new();
        huge.insert(
            "x-ratelimit-reset",
            HeaderValue::from_str(&u64::MAX.to_string()).unwrap(),
        );
        let _ = parse_retry_after(&huge, now);
    }

    #[test]
    fn expires_in_falls_back_to_jwt_and_rejects_nonsense() {
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(r#"{"exp":1300,"iat":1000,"sub":"u"}"#);
        let jwt = format!("e30.{claims}.sig");
        let body = format!(r#"{{"access_token":"{jwt}","token_type":"Bearer"}}"#);
        let t =
            parse_token_response(&raw(200, "application/json", &body), SystemTime::now()).unwrap();
        assert_eq!(t.expires_in, Some(Duration::from_secs(300)));
        assert!(!t.expires_in_sent);
        for bad in ["0", "-5", "\"abc\"", "1e12"] {
            let body = format!(r#"{{"access_token":"x","expires_in":{bad}}}"#);
            let t = parse_token_response(&raw(200, "application/json", &body), SystemTime::now())
                .unwrap();
            assert_eq!(t.expires_in, None, "{bad}");
        }
    }

    #[test]
    fn introspection_gives_an_access_token_its_lifetime() {
        let sent = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let r = raw(200, "application/json", r#"{"active":true,"exp":1000900}"#);
        assert_eq!(
            parse_introspection_lifetime(&r, sent).unwrap(),
            Some(Duration::from_secs(900))
        );
        for body in [
            r#"{"active":false}"#,
            r#"{"active":true}"#,
            r#"{"active":true,"exp":999000}"#,
        ] {
            let r = raw(200, "application/json", body);
            assert_eq!(
                parse_introspection_lifetime(&r, sent).unwrap(),
                None,
                "{body}"
            );
        }
        assert!(parse_introspection_lifetime(&raw(500, "text/plain", "x"), sent).is_err());
    }

    #[test]
    fn introspection_answers() {
        assert!(parse_introspection(&raw(200, "application/json", r#"{"active":true}"#)).unwrap());
        assert!(
            !parse_introspection(&raw(200, "application/json", r#"{"active":false}"#)).unwrap()
        );
        assert!(parse_introspection(&raw(200, "application/json", r#"{}"#)).is_err());
    }

    #[test]
    fn scrub_removes_known_secrets_and_token_shaped_words() {
        let known = vec!["s3cr3t-value".to_owned()];
        let out = scrub(
            "client s3cr3t-value rejected; token rt_AbC123xyz789QWEasd456 is spent, see docs",
            &known,
        );
        assert_eq!(
            out,
            "client [redacted] rejected; token [redacted] is spent, see docs"
        );
        assert_eq!(
            scrub("The refresh token is invalid", &[]),
            "The refresh token is invalid"
        );
    }

    #[test]
    fn scrub_removes_known_secrets_in_their_url_encoded_forms() {
        // An IdP that echoes the request in an error_uri encodes it.
        let known = vec!["s3cr+t/Value=Qm38 x".to_owned()];
        for text in [
            "see https://idp.example/e?client_secret=s3cr%2Bt%2FValue%3DQm38+x&a=1",
            "see https://idp.example/e?client_secret=s3cr%2bt%2fValue%3dQm38%20x&a=1",
            "see https://idp.example/e?client_secret=s3cr%2Bt%2FValue%3DQm38%20x&a=1",
        ] {
            let out = scrub(text, &known);
            assert_eq!(
                out, "see https://idp.example/e?client_secret=[redacted]&a=1",
                "{text}"
            );
        }
    }

    #[test]
    fn sanitize_caps_and_strips_controls() {
        assert_eq!(sanitize("a\r\nb", 10), "a  b");
        assert_eq!(sanitize("abcdef", 3), "abc…");
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn json_value() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("\"\"".to_owned()),
            Just("null".to_owned()),
            Just("0".to_owned()),
            Just("-1".to_owned()),
            Just("1e400".to_owned()),
            Just("99999999999999999999".to_owned()),
            Just("\"Bearer\"".to_owned()),
            Just("\"DPoP\"".to_owned()),
            Just("\"invalid_grant\"".to_owned()),
            Just("false".to_owned()),
            Just("true".to_owned()),
            Just("\"BAD_REFRESH_TOKEN\"".to_owned()),
            Just("[700082]".to_owned()),
            Just("\"a.eyJleHAiOjEsImlhdCI6Mn0.c\"".to_owned()),
            Just("{}".to_owned()),
            Just("[]".to_owned()),
            "\"[ -~]{0,12}\"",
            "-?[0-9]{1,12}(\\.[0-9]{1,3})?",
        ]
    }

    fn key() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            Just("access_token"),
            Just("token_type"),
            Just("expires_in"),
            Just("refresh_token"),
            Just("refresh_token_expires_in"),
            Just("scope"),
            Just("id_token"),
            Just("error"),
            Just("error_description"),
            Just("ok"),
            Just("status"),
            Just("message"),
            Just("error_codes"),
            Just("refresh_expires_in"),
            Just("other"),
        ]
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec((key(), json_value()), 0..6).prop_map(|kv| {
                let members: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                format!("{{{}}}", members.join(",")).into_bytes()
            }),
            proptest::collection::vec((key(), "[ -~]{0,10}"), 0..6).prop_map(|kv| {
                let pairs: Vec<String> = kv.iter().map(|(k, v)| format!("{k}={v}")).collect();
                pairs.join("&").into_bytes()
            }),
            proptest::collection::vec(any::<u8>(), 0..64),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// An error shape is never taken as success: a body with an `error`
        /// member, `ok: false`, or a known vendor code in `status` fails,
        /// whatever else it carries.
        #[test]
        fn error_shapes_never_succeed(
            status in prop_oneof![Just(200u16), Just(201), Just(400), Just(401), Just(403)],
            shape in prop_oneof![
                Just(r#""error":"x""#),
                Just(r#""ok":false"#),
                Just(r#""status":"BAD_REFRESH_TOKEN""#),
                Just(r#""status":"bad_refresh_token""#),
            ],
            kv in proptest::collection::vec((key(), json_value()), 0..5),
        ) {
            let mut members: Vec<String> = vec![
                shape.to_owned(),
                r#""access_token":"tok""#.to_owned(),
                r#""token_type":"Bearer""#.to_owned(),
            ];
            // Later duplicates would override the shape: keep other keys only.
            members.extend(
                kv.iter()
                    .filter(|(k, _)| !matches!(*k, "error" | "ok" | "status" | "access_token" | "token_type"))
                    .map(|(k, v)| format!("\"{k}\":{v}")),
            );
            let body = format!("{{{}}}", members.join(","));
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            let resp = RawResponse {
                status: StatusCode::from_u16(status).unwrap(),
                headers,
                body: Bytes::from(body.clone()),
            };
            prop_assert!(parse_token_response(&resp, SystemTime::now()).is_err(), "{}", body);
        }

        /// Never panics; never Ok without a non-empty, header-safe token;
        /// lifetimes are sane when present.
        #[test]
        fn token_response_parser_never_accepts_without_a_token(
            status in prop_oneof![Just(200u16), Just(201), Just(302), Just(400), Just(401), Just(429), Just(500), 100u16..600],
            ct in prop_oneof![Just("application/json"), Just("application/x-www-form-urlencoded"), Just("text/plain"), Just("application/json; charset=utf-8")],
            retry_after in proptest::option::of("[ -~]{0,30}"),
            body in body(),
        ) {
            let Ok(status) = StatusCode::from_u16(status) else { return Ok(()) };
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
            if let Some(ra) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
                headers.insert(http::header::RETRY_AFTER, ra);
            }
            let resp = RawResponse { status, headers, body: Bytes::from(body) };
            match parse_token_response(&resp, SystemTime::now()) {
                Ok(set) => {
                    let t = set.access_token.expose();
                    prop_assert!(!t.is_empty());
                    prop_assert!(HeaderValue::from_str(t).is_ok());
                    prop_assert!(status.is_success());
                    if let Some(d) = set.expires_in {
                        prop_assert!(d >= Duration::from_secs(1));
                    }
                }
                Err(e) => {
                    prop_assert!(!e.message.is_empty());
                    if let Some(d) = e.retry_after {
                        prop_assert!(d <= Duration::from_secs(366 * 86400));
                    }
                }
            }
        }
    }
}
