//! Bootstrap (docs/architecture.md, login): owns PKCE, `state`, the
//! authorization URL, the callback validation and the code exchange, for the
//! CLI (`tokenproxy login`: loopback listener or pasted URL) and for the
//! admin endpoints `GET /login/<name>` and `GET /callback`.
//!
//! Codes, verifiers, state values, cookies and tokens never reach a log, a
//! page or an error message. Every failure names its cause and the fix
//! (`../shared/seeds/000_*`: the `invalid_grant` causes).

use crate::admin_client::AdminClient;
use crate::config::{Config, CredentialConfig, GrantType};
use crate::process::{EXIT_FAILURE, EXIT_USAGE};
use crate::secret::Secret;
use crate::token::engine::{install_family, InstallError};
use crate::token::grant::{
    self, build_token_request, parse_token_response, sanitize, Grant, GrantClient, GrantError,
    TokenSet,
};
use crate::token::store::{Record, Store};
use crate::token::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use parking_lot::Mutex;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// How long a started login may wait for its callback.
pub(crate) const STATE_TTL: Duration = Duration::from_secs(600);
/// The cookie that binds an admin login to the browser that started it.
pub(crate) const COOKIE: &str = "tokenproxy_login";
/// The strict CSP of every page here: no script, no fetch, inline style only.
pub(crate) const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'";

fn random_b64(n: usize) -> String {
    let mut buf = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut buf);
    URL_SAFE_NO_PAD.encode(buf)
}

/// RFC 7636 §4.1/§4.2: 32 random bytes as base64url (43 chars), and the S256
/// challenge.
pub struct Pkce {
    pub verifier: Secret,
    pub challenge: String,
}

impl Pkce {
    pub fn new() -> Pkce {
        let verifier = random_b64(32);
        Pkce {
            challenge: challenge_for(&verifier),
            verifier: Secret::new(verifier),
        }
    }
}

impl Default for Pkce {
    fn default() -> Self {
        Pkce::new()
    }
}

/// `BASE64URL(SHA256(verifier))` (RFC 7636 §4.2).
pub(crate) fn challenge_for(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// A started login waiting for its callback.
#[derive(Debug)]
pub(crate) struct Pending {
    pub credential: String,
    pub verifier: Secret,
    /// Exactly what the authorization request carried.
    pub redirect_uri: String,
    pub force: bool,
    /// The browser cookie it is bound to (admin flow only).
    pub browser: Option<Secret>,
    started: Instant,
}

/// Why a callback's `state` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StateProblem {
    Missing,
    Unknown,
    Reused,
    Expired,
    OtherBrowser,
}

/// Logins pending at once (each also expires after [`STATE_TTL`]).
pub(crate) const MAX_PENDING: usize = 32;
/// Spent and expired states remembered, to name a replay.
const MAX_GONE: usize = 256;

/// Single-use states. Spent and expired ones are remembered for one more TTL
/// so a replay is named as such rather than "unknown".
#[derive(Default)]
pub struct PendingStates {
    // A sync mutex: held for map operations only, never across an await.
    inner: Mutex<StatesInner>,
}

#[derive(Default)]
struct StatesInner {
    live: HashMap<String, Pending>,
    /// state → (spent (true) or expired, when).
    gone: HashMap<String, (bool, Instant)>,
}

impl StatesInner {
    fn prune(&mut self, now: Instant) {
        let expired: Vec<String> = self
            .live
            .iter()
            .filter(|(_, p)| now.duration_since(p.started) >= STATE_TTL)
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            self.live.remove(&k);
            self.gone.insert(k, (false, now));
        }
        self.gone
            .retain(|_, (_, at)| now.duration_since(*at) < STATE_TTL);
    }
}

impl PendingStates {
    /// Registers a new login and returns its random `state`.
    pub(crate) fn start(
        &self,
        credential: &str,
        verifier: Secret,
        redirect_uri: &str,
        force: bool,
        browser: Option<Secret>,
    ) -> String {
        let state = random_b64(24);
        let mut g = self.inner.lock();
        let now = Instant::now();
        g.prune(now);
        // A page looping over /login/NAME must not grow this without end:
        // the oldest pending login goes (a fresh one is what a person waits on).
        while g.live.len() >= MAX_PENDING {
            let Some(oldest) = g
                .live
                .iter()
                .min_by_key(|(_, p)| p.started)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            g.live.remove(&oldest);
            g.gone.insert(oldest, (false, now));
        }
        while g.gone.len() > MAX_GONE {
            let Some(oldest) = g
                .gone
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            g.gone.remove(&oldest);
        }
        g.live.insert(
            state.clone(),
            Pending {
                credential: credential.to_owned(),
                verifier,
                redirect_uri: redirect_uri.to_owned(),
                force,
                browser,
                started: Instant::now(),
            },
        );
        state
    }

    /// Consumes `state` if it is live (and, when bound, `browser` matches).
    /// A wrong browser does not consume it.
    pub(crate) fn take(
        &self,
        state: Option<&str>,
        browser: Option<&str>,
    ) -> Result<(Pending, Duration), StateProblem> {
        let state = state
            .filter(|s| !s.is_empty())
            .ok_or(StateProblem::Missing)?;
        let now = Instant::now();
        let mut g = self.inner.lock();
        if let Some(p) = g.live.get(state) {
            if now.duration_since(p.started) >= STATE_TTL {
                g.live.remove(state);
                g.gone.insert(state.to_owned(), (false, now));
                return Err(StateProblem::Expired);
            }
            if let Some(b) = &p.browser {
                if browser != Some(b.expose()) {
                    return Err(StateProblem::OtherBrowser);
                }
            }
        }
        g.prune(now);
        if let Some(p) = g.live.remove(state) {
            g.gone.insert(state.to_owned(), (true, now));
            let age = now.duration_since(p.started);
            return Ok((p, age));
        }
        match g.gone.get(state) {
            Some((true, _)) => Err(StateProblem::Reused),
            Some((false, _)) => Err(StateProblem::Expired),
            None => Err(StateProblem::Unknown),
        }
    }

    /// Test hook: ages one live state by `by` (state expiry).
    pub fn age(&self, state: &str, by: Duration) {
        if let Some(p) = self.inner.lock().live.get_mut(state) {
            p.started = p.started.checked_sub(by).unwrap_or(p.started);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().live.len()
    }
}

/// The admin flow's logins in progress: one per running proxy, kept on its
/// `Live` handle (not in a static, so two proxies in one
/// process, as in tests, never see each other's logins).
#[derive(Default)]
pub struct AdminLogins {
    /// Public for tests that age a state.
    pub states: PendingStates,
    confirms: ConfirmTokens,
}

/// What the admin login endpoints see of the running proxy (loaded once
/// per request) and the logins they keep.
pub(crate) struct AdminView<'a> {
    pub config: Arc<Config>,
    pub engine: Arc<Engine>,
    pub logins: &'a AdminLogins,
}

/// CSRF tokens of the forced-login confirmation page: one per page the
/// admin listener rendered, bound to that browser's cookie and the
/// credential, single-use, expiring with [`STATE_TTL`], at most
/// [`MAX_PENDING`] at once.
#[derive(Default)]
struct ConfirmTokens {
    // A sync mutex: map operations only, never held across an await.
    inner: Mutex<HashMap<String, (String, String, Instant)>>,
}

impl ConfirmTokens {
    fn issue(&self, browser: &str, credential: &str) -> String {
        let token = random_b64(24);
        let now = Instant::now();
        let mut g = self.inner.lock();
        g.retain(|_, (_, _, at)| now.duration_since(*at) < STATE_TTL);
        while g.len() >= MAX_PENDING {
            let Some(oldest) = g
                .iter()
                .min_by_key(|(_, (_, _, at))| *at)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            g.remove(&oldest);
        }
        g.insert(
            token.clone(),
            (browser.to_owned(), credential.to_owned(), now),
        );
        token
    }

    /// Consumes `token` when it is live and was issued to this browser for
    /// this credential; a mismatch consumes nothing.
    fn take(&self, token: &str, browser: Option<&str>, credential: &str) -> bool {
        let mut g = self.inner.lock();
        let ok = g.get(token).is_some_and(|(b, c, at)| {
            Some(b.as_str()) == browser && c == credential && at.elapsed() < STATE_TTL
        });
        if ok {
            g.remove(token);
        }
        ok
    }
}

/// The authorization request (RFC 6749 §4.1.1, RFC 7636 §4.3).
pub(crate) fn authorization_url(
    cred: &CredentialConfig,
    authorize_url: &Uri,
    redirect_uri: &str,
    state: &str,
    challenge: &str,
) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("response_type", "code")
        .append_pair("client_id", &cred.client_id)
        .append_pair("redirect_uri", redirect_uri);
    if !cred.scopes.is_empty() {
        q.append_pair("scope", &cred.scopes.join(" "));
    }
    q.append_pair("state", state)
        .append_pair("code_challenge", challenge)
        .append_pair("code_challenge_method", "S256");
    if let Some(a) = &cred.audience {
        q.append_pair("audience", a);
    }
    if let Some(r) = &cred.resource {
        q.append_pair("resource", r);
    }
    let has_prompt = authorize_url
        .query()
        .is_some_and(|q| q.split('&').any(|p| p.starts_with("prompt=")));
    let google = authorize_url.host() == Some("accounts.google.com");
    // Google issues a refresh token only for offline access on a fresh consent.
    if google {
        q.append_pair("access_type", "offline");
        if !has_prompt {
            q.append_pair("prompt", "consent");
        }
    } else if !has_prompt && cred.scopes.iter().any(|s| s == "offline_access") {
        // OpenID Connect Core §11: offline_access is honoured only with
        // prompt=consent; without it providers drop the scope silently.
        q.append_pair("prompt", "consent");
    }
    // The provider profile's (docs/providers.md), unless already sent above
    // or written into authorize_url.
    let in_url = |k: &str| {
        authorize_url
            .query()
            .is_some_and(|q| q.split('&').any(|p| p.split('=').next() == Some(k)))
    };
    for (k, v) in &cred.login_params {
        let sent = (google && (k == "access_type" || k == "prompt"))
            || (k == "prompt" && cred.scopes.iter().any(|s| s == "offline_access"));
        if !sent && !in_url(k) {
            q.append_pair(k, v);
        }
    }
    let base = authorize_url.to_string();
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}{}", q.finish())
}

/// What came back on the redirect (RFC 6749 §4.1.2, §4.1.2.1; RFC 9207).
#[derive(Debug, Default)]
pub(crate) struct Callback {
    pub code: Option<Secret>,
    pub state: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
    pub error_uri: Option<String>,
    pub iss: Option<String>,
}

/// Parses a redirect's query (or a whole pasted URL).
pub(crate) fn parse_callback(input: &str) -> Callback {
    let input = input.trim();
    let query = match input.split_once('?') {
        Some((_, q)) => q,
        None => input,
    };
    let query = query.split('#').next().unwrap_or("");
    let mut cb = Callback::default();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "code" => cb.code = Some(Secret::new(v.into_owned())),
            "state" => cb.state = Some(v.into_owned()),
            "error" => cb.error = Some(sanitize(&v, 64)),
            // Shown on a page and logged: scrubbed like the log's fields.
            "error_description" => {
                cb.error_description = Some(grant::scrub(&sanitize(&v, 300), &[]))
            }
            "error_uri" => cb.error_uri = Some(grant::scrub(&sanitize(&v, 200), &[])),
            "iss" => cb.iss = Some(sanitize(&v, 200)),
            _ => {}
        }
    }
    cb
}

/// What was sent in the exchange, for explaining its failure.
#[derive(Debug, Clone)]
pub(crate) struct Sent {
    pub redirect_uri: String,
    pub configured_redirect_uri: Option<String>,
    pub verifier_sent: bool,
    pub code_age: Duration,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum LoginError {
    /// The config or the arguments cannot work (exit 64).
    #[error("{0}")]
    Setup(String),
    /// The credential's TLS settings cannot be used (exit 64).
    #[error("TLS settings")]
    Tls(#[source] crate::discovery::DiscoveryError),
    /// The IdP's metadata could not be fetched or used (exit 1).
    #[error("credential {credential}: cannot find its endpoints")]
    Discovery {
        credential: String,
        #[source]
        source: crate::discovery::DiscoveryError,
    },
    /// The callback port is taken or not ours to bind (exit 1).
    #[error("cannot listen on {addr} for the login callback")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the identity provider refused the authorization: {error}{}{}", desc(.description), see(.error_uri))]
    Denied {
        error: String,
        description: Option<String>,
        error_uri: Option<String>,
    },
    #[error("{}", state_message(*.0))]
    State(StateProblem),
    #[error("the callback has neither a code nor an error; open the login URL again")]
    NoCode,
    #[error("the callback names issuer {found:?} but this credential's issuer is {expected:?}: the response comes from another authorization server (RFC 9207 mix-up); log in again")]
    WrongIssuer { found: String, expected: String },
    #[error("{}", explain_exchange(.error, .sent, .hint))]
    Exchange {
        error: GrantError,
        sent: Box<Sent>,
        hint: String,
    },
    #[error("the IdP returned no refresh_token, so this refresh_token credential cannot keep itself alive. {0}")]
    NoRefreshToken(String),
    #[error("{0}")]
    Install(#[from] InstallError),
    #[error("the device login expired before it was approved (its code was valid for {})", humantime::format_duration(*.0))]
    DeviceExpired(Duration),
    #[error("{}", explain_device(.what, .error, .hint))]
    Device {
        what: &'static str,
        error: GrantError,
        hint: String,
    },
}

/// The provider's answer in its own words (code, description, error_uri:
/// scrubbed and capped by `device::scrubbed`), as [`explain_exchange`]
/// shows a refused code exchange, and our hint.
fn explain_device(what: &str, e: &GrantError, hint: &str) -> String {
    let hint = if hint.is_empty() {
        String::new()
    } else {
        format!(". {hint}")
    };
    format!(
        "{what} failed: {}{}{}{hint}",
        crate::error_chain(e),
        desc(&e.description),
        see(&e.error_uri)
    )
}

fn desc(d: &Option<String>) -> String {
    d.as_ref().map(|d| format!(" ({d})")).unwrap_or_default()
}

/// The provider's `error_uri`, where it explains its error.
fn see(u: &Option<String>) -> String {
    u.as_ref()
        .map(|u| format!(" (see {u})"))
        .unwrap_or_default()
}

impl LoginError {
    /// A stable short code for logs and tests.
    pub fn code(&self) -> &'static str {
        match self {
            LoginError::Setup(_) => "setup",
            LoginError::Tls(_) => "setup",
            LoginError::Discovery { .. } | LoginError::Listen { .. } => "unavailable",
            LoginError::Denied { .. } => "denied",
            LoginError::State(StateProblem::Missing) => "state_missing",
            LoginError::State(StateProblem::Unknown) => "state_unknown",
            LoginError::State(StateProblem::Reused) => "state_reused",
            LoginError::State(StateProblem::Expired) => "state_expired",
            LoginError::State(StateProblem::OtherBrowser) => "state_other_browser",
            LoginError::NoCode => "no_code",
            LoginError::WrongIssuer { .. } => "wrong_issuer",
            LoginError::Exchange { .. } => "exchange_failed",
            LoginError::NoRefreshToken(_) => "no_refresh_token",
            LoginError::Install(InstallError::FamilyStillWorks(..)) => "family_still_works",
            LoginError::Install(_) => "install_failed",
            LoginError::DeviceExpired(_) => "device_expired",
            LoginError::Device { .. } => "device_failed",
        }
    }

    /// What to do next, one sentence.
    pub fn fix(&self) -> String {
        match self {
            LoginError::Denied {
                error, description, ..
            } => crate::token::hints::for_authorization_error(error, description.as_deref()),
            LoginError::State(_) | LoginError::NoCode | LoginError::WrongIssuer { .. } => {
                "Start a new login (`tokenproxy login -c FILE NAME` or the admin /login/NAME link) and finish it in the same browser within 10 minutes.".into()
            }
            LoginError::Install(InstallError::FamilyStillWorks(..)) => {
                "Pass --force (or open /login/NAME?force=1) to replace the working family.".into()
            }
            LoginError::Listen { .. } => "Is a proxy already running there? Then `login` goes through its admin API; or pass --no-listen.".into(),
            LoginError::DeviceExpired(_) => "Start a new one (`tokenproxy login --device -c FILE NAME` or POST /credentials/NAME/device) and enter its code before it expires.".into(),
            _ => String::new(),
        }
    }
}

fn state_message(p: StateProblem) -> &'static str {
    match p {
        StateProblem::Missing => "the callback has no `state`: it did not come from a login started by tokenproxy (or the IdP dropped it)",
        StateProblem::Unknown => "the callback's `state` is unknown: this login was not started by this tokenproxy process (it may have restarted), or the link was forged",
        StateProblem::Reused => "the callback's `state` was already used: each login finishes once (a reloaded or replayed callback page)",
        StateProblem::Expired => "the login expired: `state` is valid for 10 minutes after the login started",
        StateProblem::OtherBrowser => "the callback arrived in a different browser than the one that started the login (its cookie does not match)",
    }
}

/// The provider's answer in its own words (code, description, error_uri:
/// scrubbed and capped when the error was made), what was sent when the
/// code itself was refused, and our hint.
fn explain_exchange(e: &GrantError, sent: &Sent, hint: &str) -> String {
    let what = match (&e.code, e.status) {
        (Some(c), Some(s)) => format!("{s} {c}"),
        (Some(c), None) => c.clone(),
        (None, Some(s)) => format!("HTTP {s}"),
        (None, None) => crate::error_chain(e),
    };
    let head = format!(
        "the code exchange failed: {what}{}{}",
        desc(&e.description),
        see(&e.error_uri)
    );
    if !crate::token::hints::code_refused(e) {
        return format!("{head}. {hint}");
    }
    let configured = sent
        .configured_redirect_uri
        .as_deref()
        .unwrap_or("none (loopback default)");
    format!(
        "{head}. Sent: redirect_uri {} (configured: {configured}); a PKCE code_verifier was {}; the code was {}s old. {hint}",
        sent.redirect_uri,
        if sent.verifier_sent { "sent" } else { "NOT sent" },
        sent.code_age.as_secs()
    )
}

/// Why no refresh_token came back, per IdP: a login that cannot keep
/// itself alive fails loudly, with what to change.
pub(crate) fn offline_hint(cred: &CredentialConfig, authorize_url: Option<&Uri>) -> String {
    let host = authorize_url
        .or(cred.token_url.as_ref())
        .and_then(|u| u.host())
        .unwrap_or("")
        .to_ascii_lowercase();
    let has_offline = cred.scopes.iter().any(|s| s == "offline_access");
    if host.ends_with("google.com") || host.ends_with("googleapis.com") {
        "Google returns a refresh token only with access_type=offline and prompt=consent (tokenproxy sends both to accounts.google.com); if the app was authorized before, revoke it at https://myaccount.google.com/permissions and log in again.".into()
    } else if host.ends_with("auth0.com") {
        "Auth0 needs the offline_access scope and \"Allow Offline Access\" enabled on the API (and the Refresh Token grant on the application).".into()
    } else if host.contains("okta") {
        "Okta needs the offline_access scope and the Refresh Token grant type enabled for the app."
            .into()
    } else if host.contains("microsoftonline") || host.contains("login.live.com") {
        "Microsoft identity platform needs the offline_access scope.".into()
    } else if host.ends_with("github.com") {
        "GitHub issues refresh tokens only to GitHub Apps with \"Expire user authorization tokens\" enabled; OAuth Apps' tokens do not expire and cannot be refreshed.".into()
    } else if has_offline {
        "The offline_access scope was requested (with prompt=consent), yet no refresh token came back: allow the refresh_token grant for this client at the IdP, and check that the user actually granted offline access on the consent screen.".into()
    } else {
        "Ask for offline access: most IdPs need the offline_access scope (add it to `scopes`), some an access_type=offline parameter, and the client must be allowed the refresh_token grant.".into()
    }
}

/// Exchanges a code at once (RFC 6749 §4.1.3) with exactly the pending
/// redirect_uri and verifier. Returns the token set and when it was asked.
pub(crate) async fn exchange(
    cred: &CredentialConfig,
    token_url: &Uri,
    authorize_url: Option<&Uri>,
    client: &GrantClient,
    code: &Secret,
    pending: &Pending,
    code_age: Duration,
) -> Result<(TokenSet, SystemTime), LoginError> {
    let grant = Grant::AuthorizationCode {
        code,
        redirect_uri: &pending.redirect_uri,
        verifier: &pending.verifier,
    };
    let build = || build_token_request(cred, token_url, &grant);
    let sent_wall = SystemTime::now();
    // A DPoP nonce retry sends the code twice; the IdP refused the first
    // before redeeming it (RFC 9449 §8).
    let outcome = match (
        build(),
        crate::token::grant::LoginDpop::for_credential(cred),
    ) {
        (Ok(req), Ok(dpop)) => {
            let proven = dpop.as_ref().map(|d| d.proven());
            match client.send_proven(req, proven.as_ref(), &build).await {
                Ok(raw) => parse_token_response(&raw, SystemTime::now())
                    .and_then(|set| crate::token::grant::check_token_type(set, dpop.is_some()))
                    .map(|mut set| {
                        set.dpop_key = dpop.and_then(|d| d.stored);
                        set
                    }),
                Err(e) => Err(e),
            }
        }
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    let set = outcome.map_err(|mut error| {
        // IdP text may echo what it was sent: scrubbed before capping, so a
        // secret cut in half is still found.
        let mut known = vec![
            code.expose().to_owned(),
            pending.verifier.expose().to_owned(),
        ];
        known.extend(cred.client_secret.as_ref().map(|s| s.expose().to_owned()));
        let clean = |t: &str, max: usize| sanitize(&grant::scrub(t, &known), max);
        error.code = error.code.as_deref().map(|c| clean(c, 64));
        error.description = error.description.as_deref().map(|d| clean(d, 300));
        error.error_uri = error.error_uri.as_deref().map(|u| clean(u, 200));
        let hint = crate::token::hints::for_code_exchange(cred, &error, code_age);
        LoginError::Exchange {
            error,
            sent: Box::new(Sent {
                redirect_uri: pending.redirect_uri.clone(),
                configured_redirect_uri: cred.redirect_uri.clone(),
                verifier_sent: true,
                code_age,
            }),
            hint,
        }
    })?;
    if set.refresh_token.is_none() {
        return Err(LoginError::NoRefreshToken(offline_hint(
            cred,
            authorize_url,
        )));
    }
    Ok((set, sent_wall))
}

/// The store's record for `cred` if it is a family that still works.
pub(crate) async fn working_family(
    store: &Store,
    cred: &CredentialConfig,
    token_url: &Uri,
) -> Option<Record> {
    store
        .read(&cred.name)
        .await
        .ok()
        .flatten()
        .filter(|r| r.matches(&token_url.to_string(), &cred.client_id))
        .filter(|r| r.dead.is_none() && r.refresh_token.is_some())
}

/// A credential that can log in: refresh_token grant, with endpoints.
pub(crate) struct Target {
    pub cred: std::sync::Arc<CredentialConfig>,
    pub token_url: Uri,
    pub authorize_url: Uri,
}

/// Looks up `name` and resolves its endpoints (discovery when needed).
pub(crate) async fn target(config: &Config, name: &str) -> Result<Target, LoginError> {
    let cred = refresh_credential(config, name)?;
    let egress = crate::egress::proxy_from(config.server.egress_proxy.as_ref());
    let (token_url, authorize_url) = crate::discovery::endpoints(&cred, egress.as_ref())
        .await
        .map_err(|source| LoginError::Discovery {
            credential: name.to_owned(),
            source,
        })?;
    let authorize_url = authorize_url.ok_or_else(|| {
        LoginError::Setup(format!(
            "credential {name} has no authorize_url (set authorize_url, or issuer for discovery)"
        ))
    })?;
    Ok(Target {
        cred,
        token_url,
        authorize_url,
    })
}

/// `name`'s config if it is a refresh_token credential (the only kind a
/// login is for).
pub(crate) fn refresh_credential(
    config: &Config,
    name: &str,
) -> Result<Arc<CredentialConfig>, LoginError> {
    let cred = config.credentials.get(name).cloned().ok_or_else(|| {
        let known: Vec<&str> = config.credentials.keys().map(String::as_str).collect();
        LoginError::Setup(format!(
            "no credential named {name:?} in {} (known: {})",
            config.source.display(),
            known.join(", ")
        ))
    })?;
    if cred.grant != GrantType::RefreshToken {
        return Err(LoginError::Setup(format!(
            "credential {name} uses grant = \"{}\": login is for refresh_token credentials (client_credentials needs no login)",
            cred.grant.as_str()
        )));
    }
    Ok(cred)
}

/// Checks the callback: IdP error, state, issuer, code. Consumes the state.
pub(crate) fn validate_callback(
    states: &PendingStates,
    cb: &Callback,
    browser: Option<&str>,
    expected_issuer: Option<&Uri>,
) -> Result<(Pending, Duration, Secret), LoginError> {
    if let Some(error) = &cb.error {
        // Spend the state so the same answer cannot be replayed.
        let _ = states.take(cb.state.as_deref(), browser);
        return Err(LoginError::Denied {
            error: error.clone(),
            description: cb.error_description.clone(),
            error_uri: cb.error_uri.clone(),
        });
    }
    let (pending, age) = states
        .take(cb.state.as_deref(), browser)
        .map_err(LoginError::State)?;
    if let (Some(found), Some(expected)) = (&cb.iss, expected_issuer) {
        let expected = expected.to_string();
        if found.trim_end_matches('/') != expected.trim_end_matches('/') {
            return Err(LoginError::WrongIssuer {
                found: found.clone(),
                expected,
            });
        }
    }
    let code = cb.code.clone().ok_or(LoginError::NoCode)?;
    Ok((pending, age, code))
}

// ---------------------------------------------------------------------------
// Pages
// ---------------------------------------------------------------------------

/// HTML-escapes text for element content and quoted attributes.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A small result page; everything shown is escaped here.
pub(crate) fn page(status: StatusCode, title: &str, lines: &[String]) -> Response<Full<Bytes>> {
    let mut body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>tokenproxy: {t}</title>\
         <style>body{{font:16px/1.5 system-ui,sans-serif;margin:3em auto;max-width:42em;padding:0 1em}}\
         h1{{font-size:1.4em}}</style></head><body><h1>{t}</h1>",
        t = escape(title)
    );
    for l in lines.iter().filter(|l| !l.is_empty()) {
        body.push_str("<p>");
        body.push_str(&escape(l));
        body.push_str("</p>");
    }
    body.push_str("</body></html>\n");
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    secure_headers(&mut r);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

fn secure_headers<B>(r: &mut Response<B>) {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// The result of a finished login, for pages and the CLI.
pub(crate) struct Done {
    pub credential: String,
    pub subject: Option<String>,
    pub family: String,
}

impl Done {
    pub fn message(&self) -> String {
        format!(
            "Logged in{}: credential {} now has a new token family {} (generation 0).",
            self.subject
                .as_ref()
                .map(|s| format!(" as {s}"))
                .unwrap_or_default(),
            self.credential,
            self.family
        )
    }
}

pub(crate) fn success_page(done: &Done) -> Response<Full<Bytes>> {
    page(
        StatusCode::OK,
        "Login complete",
        &[
            done.message(),
            "You can close this tab; tokenproxy keeps the credential fresh from here.".into(),
        ],
    )
}

pub(crate) fn error_page(credential: Option<&str>, e: &LoginError) -> Response<Full<Bytes>> {
    let status = match e {
        LoginError::Exchange { .. } => StatusCode::BAD_GATEWAY,
        LoginError::Install(InstallError::FamilyStillWorks(..)) => StatusCode::CONFLICT,
        LoginError::Install(_) => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    };
    let title = match credential {
        Some(c) => format!("Login failed for {c}"),
        None => "Login failed".into(),
    };
    let message = match e {
        // The store's path and cause are for the log, not the page.
        LoginError::Install(i) if !matches!(i, InstallError::FamilyStillWorks(..)) => {
            "the new token family could not be stored; the log says why".to_owned()
        }
        e => crate::error_chain(e),
    };
    page(status, &title, &[message, e.fix()])
}

pub(crate) fn log_failure(credential: Option<&str>, e: &LoginError) {
    tracing::warn!(
        event = "login_failed",
        credential = credential.unwrap_or(""),
        reason = e.code(),
        error = %crate::error_chain(e),
        "Login failed"
    );
}

// ---------------------------------------------------------------------------
// Admin endpoints
// ---------------------------------------------------------------------------

fn cookie_value<B>(req: &Request<B>) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
        .filter(|v| !v.is_empty() && v.len() <= 128)
}

fn query_flag(uri: &Uri, name: &str) -> bool {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .any(|(k, v)| k == name && matches!(&*v, "1" | "true" | "yes"))
}

/// `GET /login/<name>`, `POST /login/<name>` (a confirmed forced login)
/// and `GET /callback` on the admin listener; `None` for any other path.
pub(crate) async fn handle_admin(
    req: &Request<Bytes>,
    live: &AdminView<'_>,
) -> Option<Response<Full<Bytes>>> {
    let path = req.uri().path();
    let name = path.strip_prefix("/login/").map(|n| {
        percent_encoding::percent_decode_str(n)
            .decode_utf8_lossy()
            .into_owned()
    });
    if name.is_none() && path != "/callback" {
        return None;
    }
    Some(match (req.method(), name) {
        // Replacing a working family is never a GET another site can
        // trigger: the GET only renders the confirmation form.
        (&http::Method::GET, Some(name)) if query_flag(req.uri(), "force") => {
            confirm_page(req, live, &name)
        }
        (&http::Method::GET, Some(name)) => admin_start(req, live, &name, false).await,
        (&http::Method::POST, Some(name)) => {
            let csrf = form_urlencoded::parse(req.body())
                .find(|(k, _)| k == "csrf")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            if !live
                .logins
                .confirms
                .take(&csrf, cookie_value(req).as_deref(), &name)
            {
                return Some(page(
                    StatusCode::FORBIDDEN,
                    "Confirmation not valid",
                    &[format!("This confirmation is missing, used, expired or from another browser. Open /login/{name}?force=1 again and confirm there.")],
                ));
            }
            admin_start(req, live, &name, true).await
        }
        (&http::Method::GET, None) => admin_callback(req, live).await,
        _ => page(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
            &["Use GET.".into()],
        ),
    })
}

/// The page that asks before a forced login: a form posting back here with
/// a CSRF token bound to this browser's cookie. Not framable (clickjacking).
fn confirm_page<B>(req: &Request<B>, live: &AdminView<'_>, name: &str) -> Response<Full<Bytes>> {
    if live.engine.slot(name).is_none() {
        let e = LoginError::Setup(format!("credential {name} is not running in this proxy"));
        log_failure(Some(name), &e);
        return error_page(Some(name), &e);
    }
    let browser = cookie_value(req).unwrap_or_else(|| random_b64(24));
    let token = live.logins.confirms.issue(&browser, name);
    let action: String = form_urlencoded::byte_serialize(name.as_bytes()).collect();
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>tokenproxy: replace {n}?</title>\
         <style>body{{font:16px/1.5 system-ui,sans-serif;margin:3em auto;max-width:42em;padding:0 1em}}</style></head>\
         <body><h1>Replace the token family of {n}?</h1><p>A new login replaces the family this credential uses now, even if it still works.</p>\
         <form method=post action=\"/login/{a}\"><input type=hidden name=csrf value=\"{t}\"><input type=hidden name=force value=1>\
         <button type=submit>Log in again and replace it</button></form></body></html>\n",
        n = escape(name),
        a = escape(&action),
        t = escape(&token),
    );
    let mut r = Response::new(Full::new(Bytes::from(body)));
    secure_headers(&mut r);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("{CSP}; frame-ancestors 'none'")) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{COOKIE}={browser}; HttpOnly; SameSite=Lax; Path=/; Max-Age={}",
        STATE_TTL.as_secs()
    )) {
        h.insert(header::SET_COOKIE, v);
    }
    r
}

async fn admin_start<B>(
    req: &Request<B>,
    live: &AdminView<'_>,
    name: &str,
    force: bool,
) -> Response<Full<Bytes>> {
    let name = name.to_owned();
    let config = live.config.clone();
    let fail = |e: LoginError| {
        log_failure(Some(&name), &e);
        error_page(Some(&name), &e)
    };
    let t = match target(&config, &name).await {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let Some(redirect_uri) = t.cred.redirect_uri.clone() else {
        return fail(LoginError::Setup(format!(
            "credential {name} has no redirect_uri: set redirect_uri = \"http://{}/callback\" (this admin listener) and register exactly that at the IdP",
            config.admin.listen
        )));
    };
    let engine = live.engine.clone();
    let Some(slot) = engine.slot(&name) else {
        return fail(LoginError::Setup(format!(
            "credential {name} is not running in this proxy"
        )));
    };
    if !force {
        if let Some(store) = slot.store() {
            if let Some(r) = working_family(store, &t.cred, slot.token_url()).await {
                return fail(LoginError::Install(InstallError::FamilyStillWorks(
                    name.clone(),
                    r.generation,
                )));
            }
        }
    }
    let browser = cookie_value(req).unwrap_or_else(|| random_b64(24));
    let pkce = Pkce::new();
    let state = live.logins.states.start(
        &name,
        pkce.verifier,
        &redirect_uri,
        force,
        Some(Secret::new(browser.clone())),
    );
    let url = authorization_url(
        &t.cred,
        &t.authorize_url,
        &redirect_uri,
        &state,
        &pkce.challenge,
    );
    tracing::info!(event = "login_started", credential = %name, via = "admin", "Login started");
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::FOUND;
    secure_headers(&mut r);
    if let Ok(v) = HeaderValue::from_str(&url) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{COOKIE}={browser}; HttpOnly; SameSite=Lax; Path=/; Max-Age={}",
        STATE_TTL.as_secs()
    )) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn admin_callback<B>(req: &Request<B>, live: &AdminView<'_>) -> Response<Full<Bytes>> {
    let cb = parse_callback(req.uri().query().unwrap_or(""));
    let browser = cookie_value(req);
    let (pending, age, code) =
        match validate_callback(&live.logins.states, &cb, browser.as_deref(), None) {
            Ok(v) => v,
            Err(e) => {
                log_failure(None, &e);
                return error_page(None, &e);
            }
        };
    let name = pending.credential.clone();
    match finish_admin(live, &cb, pending, age, &code).await {
        Ok(done) => success_page(&done),
        Err(e) => {
            log_failure(Some(&name), &e);
            error_page(Some(&name), &e)
        }
    }
}

async fn finish_admin(
    live: &AdminView<'_>,
    cb: &Callback,
    pending: Pending,
    age: Duration,
    code: &Secret,
) -> Result<Done, LoginError> {
    let name = pending.credential.clone();
    let engine = live.engine.clone();
    let slot = engine
        .slot(&name)
        .cloned()
        .ok_or_else(|| LoginError::Setup(format!("credential {name} is no longer configured")))?;
    let cred = slot.cfg.clone();
    if let (Some(found), Some(expected)) = (&cb.iss, &cred.issuer) {
        let expected = expected.to_string();
        if found.trim_end_matches('/') != expected.trim_end_matches('/') {
            return Err(LoginError::WrongIssuer {
                found: found.clone(),
                expected,
            });
        }
    }
    let (set, sent_wall) = exchange(
        &cred,
        slot.token_url(),
        cred.authorize_url.as_ref(),
        slot.grant_client(),
        code,
        &pending,
        age,
    )
    .await?;
    let rec = slot.install_login(&set, sent_wall, pending.force).await?;
    Ok(Done {
        credential: name,
        subject: set.subject.clone(),
        family: rec.family,
    })
}

// ---------------------------------------------------------------------------
// CLI flow (no running proxy)
// ---------------------------------------------------------------------------

/// Where the CLI waits for the callback.
pub(crate) struct Loopback {
    pub redirect_uri: String,
    pub listener: Option<tokio::net::TcpListener>,
    pub path: String,
}

/// RFC 8252 §7.3: binds the loopback redirect (the configured port, or an
/// ephemeral one when redirect_uri is unset or has port 0).
pub(crate) async fn bind_loopback(
    cred: &CredentialConfig,
    listen: bool,
) -> Result<Loopback, LoginError> {
    let configured = cred.redirect_uri.clone();
    let Some(uri) = configured.as_deref() else {
        if !listen {
            return Err(LoginError::Setup(format!(
                "credential {} has no redirect_uri: --no-listen needs one registered at the IdP",
                cred.name
            )));
        }
        let l = bind("127.0.0.1:0").await?;
        let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
        return Ok(Loopback {
            redirect_uri: format!("http://127.0.0.1:{port}/callback"),
            listener: Some(l),
            path: "/callback".into(),
        });
    };
    if !listen {
        return Ok(Loopback {
            redirect_uri: uri.to_owned(),
            listener: None,
            path: String::new(),
        });
    }
    let parsed: Uri = uri
        .parse()
        .map_err(|_| LoginError::Setup(format!("redirect_uri {uri:?} is not a URL")))?;
    let host = parsed.host().unwrap_or("");
    let loopback = crate::net::is_loopback_host(host);
    if parsed.scheme_str() != Some("http") || !loopback {
        return Err(LoginError::Setup(format!(
            "redirect_uri {uri} is not an http loopback address, so tokenproxy cannot receive the callback itself: use --no-listen and paste the URL the browser lands on"
        )));
    }
    let port = parsed.port_u16().unwrap_or(80);
    // A loopback name is bound as 127.0.0.1: browsers resolve `localhost`
    // and `*.localhost` to loopback themselves, whatever DNS says.
    let ip = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    let l = bind(&std::net::SocketAddr::new(ip, port).to_string()).await?;
    let redirect_uri = if port == 0 {
        let actual = l.local_addr().map(|a| a.port()).unwrap_or(0);
        uri.replacen(&format!("{host}:0"), &format!("{host}:{actual}"), 1)
    } else {
        uri.to_owned()
    };
    Ok(Loopback {
        redirect_uri,
        listener: Some(l),
        path: parsed.path().to_owned(),
    })
}

async fn bind(addr: &str) -> Result<tokio::net::TcpListener, LoginError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| LoginError::Listen {
            addr: addr.to_owned(),
            source,
        })
}

/// Runs the CLI login without a proxy. `out` receives the lines to print
/// (the URL first). Returns the result for the caller to print.
pub(crate) async fn run_local(
    config: &Config,
    name: &str,
    force: bool,
    listen: bool,
    announce: impl Fn(&str),
    pasted: impl std::future::Future<Output = Option<String>>,
) -> Result<Done, LoginError> {
    let t = target(config, name).await?;
    let store = Store::open_config(&config.store)
        .await
        .map_err(|e| LoginError::Setup(format!("token store: {}", crate::error_chain(&e))))?;
    if !force {
        if let Some(r) = working_family(&store, &t.cred, &t.token_url).await {
            return Err(LoginError::Install(InstallError::FamilyStillWorks(
                name.to_owned(),
                r.generation,
            )));
        }
    }
    let lb = bind_loopback(&t.cred, listen).await?;
    let states = PendingStates::default();
    let pkce = Pkce::new();
    let state = states.start(name, pkce.verifier, &lb.redirect_uri, force, None);
    let url = authorization_url(
        &t.cred,
        &t.authorize_url,
        &lb.redirect_uri,
        &state,
        &pkce.challenge,
    );
    tracing::info!(event = "login_started", credential = %name, via = "cli", "Login started");
    announce(&url);
    let client = GrantClient::new(
        crate::discovery::tls_for(&t.cred).map_err(LoginError::Tls)?,
        crate::token::GRANT_TIMEOUT,
        crate::egress::proxy_from(config.server.egress_proxy.as_ref()).as_ref(),
    );
    let finish = |cb: Callback| {
        let t = &t;
        let states = &states;
        let store = &store;
        let client = &client;
        async move {
            let (pending, age, code) =
                validate_callback(states, &cb, None, t.cred.issuer.as_ref())?;
            let (set, sent_wall) = exchange(
                &t.cred,
                &t.token_url,
                Some(&t.authorize_url),
                client,
                &code,
                &pending,
                age,
            )
            .await?;
            let rec = install_family(store, &t.cred, &t.token_url, &set, sent_wall, pending.force)
                .await?;
            Ok::<_, LoginError>(Done {
                credential: name.to_owned(),
                subject: set.subject.clone(),
                family: rec.family,
            })
        }
    };
    let result = match lb.listener {
        None => {
            let Some(line) = tokio::time::timeout(STATE_TTL, pasted).await.ok().flatten() else {
                return Err(LoginError::State(StateProblem::Expired));
            };
            finish(parse_callback(&line)).await
        }
        Some(listener) => {
            let wait = serve_callback(listener, &lb.path, finish);
            match tokio::time::timeout(STATE_TTL, wait).await {
                Ok(r) => r,
                Err(_) => Err(LoginError::State(StateProblem::Expired)),
            }
        }
    };
    if let Err(e) = &result {
        log_failure(Some(name), e);
    }
    result
}

/// Serves the loopback listener until a request reaches `path`; answers the
/// browser with the result page and returns the result.
async fn serve_callback<F, Fut>(
    listener: tokio::net::TcpListener,
    path: &str,
    finish: F,
) -> Result<Done, LoginError>
where
    F: Fn(Callback) -> Fut,
    Fut: std::future::Future<Output = Result<Done, LoginError>>,
{
    use hyper::server::conn::http1;
    use hyper_util::rt::TokioIo;
    use std::sync::Arc;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(
        String,
        tokio::sync::oneshot::Sender<Response<Full<Bytes>>>,
    )>(1);
    let path = Arc::new(path.to_owned());
    let accept = async {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let tx = tx.clone();
            let path = path.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    let path = path.clone();
                    async move {
                        if req.uri().path() != path.as_str() {
                            return Ok::<_, std::convert::Infallible>(page(
                                StatusCode::NOT_FOUND,
                                "Not found",
                                &["This listener only waits for the login callback.".into()],
                            ));
                        }
                        let (otx, orx) = tokio::sync::oneshot::channel();
                        let q = req.uri().query().unwrap_or("").to_owned();
                        if tx.send((q, otx)).await.is_err() {
                            return Ok(page(
                                StatusCode::GONE,
                                "Login already finished",
                                &["This login already finished; start a new one.".into()],
                            ));
                        }
                        Ok(orx.await.unwrap_or_else(|_| {
                            page(StatusCode::GONE, "Login already finished", &[])
                        }))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    };
    let handle = async {
        let (q, reply) = rx.recv().await.ok_or(LoginError::NoCode)?;
        let result = finish(parse_callback(&q)).await;
        let resp = match &result {
            Ok(done) => success_page(done),
            Err(e) => error_page(None, e),
        };
        let _ = reply.send(resp);
        // Let the page reach the browser before the process exits.
        tokio::time::sleep(Duration::from_millis(100)).await;
        result
    };
    tokio::select! {
        r = handle => r,
        _ = accept => unreachable!("the accept loop never ends"),
    }
}

// ---------------------------------------------------------------------------
// `tokenproxy login`
// ---------------------------------------------------------------------------

/// The command's arguments.
pub(crate) struct CliArgs {
    pub name: String,
    pub force: bool,
    pub open: bool,
    pub no_listen: bool,
    pub admin: Option<String>,
}

/// The admin API's view of `name`'s token family (None: no family yet).
/// Whether the running proxy now holds a family other than `before`:
/// the exit code once it does (or once the admin API fails), else `None`.
pub(crate) async fn landed(admin: &AdminClient, name: &str, before: Option<&str>) -> Option<u8> {
    match admin_family(admin, name).await {
        Ok(Some(f)) if Some(f.as_str()) != before => {
            println!("Logged in: credential {name} now has a new token family {f} (generation 0).");
            Some(0)
        }
        Ok(_) => None,
        Err(e) => {
            eprintln!("tokenproxy login: {e}");
            Some(EXIT_FAILURE)
        }
    }
}

pub(crate) async fn admin_family(
    admin: &AdminClient,
    name: &str,
) -> Result<Option<String>, String> {
    let base = admin.base();
    let (status, body) = admin
        .get(&format!("/credentials/{name}"))
        .await
        .map_err(|e| format!("the admin API at {base} stopped answering: {e}"))?;
    if status == StatusCode::NOT_FOUND {
        return Err(format!(
            "the running proxy at {base} has no credential {name:?} (reload it after editing the config)"
        ));
    }
    if !status.is_success() {
        // Waiting on an answer that can never name a family helps nobody.
        return Err(format!(
            "the admin API at {base} answered {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let v = match v {
        serde_json::Value::Array(mut a) if !a.is_empty() => a.remove(0),
        v => v,
    };
    Ok(v["family"].as_str().map(str::to_owned))
}

pub(crate) fn open_browser(url: &str) {
    for cmd in ["xdg-open", "open"] {
        let spawned = std::process::Command::new(cmd)
            .arg(url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if spawned.is_ok() {
            return;
        }
    }
}

/// `tokenproxy login`: through the running proxy's admin API when it
/// answers, else on a loopback listener (or a pasted URL). Returns the exit
/// code: 0, 64 for config/usage, 1 otherwise.
pub(crate) async fn run_cli(config: &Config, args: CliArgs) -> u8 {
    let name = args.name.as_str();
    let admin = match running_admin(config, args.admin.as_deref()).await {
        Ok(a) => a,
        Err(code) => return code,
    };
    if let Some(admin) = admin {
        return via_admin(config, &admin, &args).await;
    }
    let announce = |url: &str| {
        println!("Open this URL in a browser to log in {name}:\n\n  {url}\n");
        if args.no_listen {
            println!("After you approve, the browser goes to the redirect_uri (the page may not load there). Paste that whole URL here and press Enter:");
        } else {
            println!("Waiting for the callback (10 minutes)...");
        }
        if args.open {
            open_browser(url);
        }
    };
    let pasted = async {
        tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).ok()?;
            Some(line)
        })
        .await
        .ok()
        .flatten()
    };
    match run_local(config, name, args.force, !args.no_listen, announce, pasted).await {
        Ok(done) => {
            println!("{}", done.message());
            0
        }
        Err(e) => report(&e),
    }
}

/// Prints a failed login's cause and fix; returns the exit code.
pub(crate) fn report(e: &LoginError) -> u8 {
    eprintln!("tokenproxy login: {}", crate::error_chain(e));
    let fix = e.fix();
    if !fix.is_empty() {
        eprintln!("{fix}");
    }
    match e {
        LoginError::Setup(_) | LoginError::Tls(_) => EXIT_USAGE,
        _ => EXIT_FAILURE,
    }
}

/// The running proxy's admin API when it answers `/healthz`; an explicit
/// `--admin` that does not answer is an error (exit 1), not a fallback.
pub(crate) async fn running_admin(
    config: &Config,
    explicit: Option<&str>,
) -> Result<Option<AdminClient>, u8> {
    let admin = AdminClient::new(config, explicit);
    let up = match &admin {
        Some(a) => a
            .get("/healthz")
            .await
            .is_ok_and(|(status, _)| status.is_success()),
        None => false,
    };
    if explicit.is_some() && !up {
        eprintln!(
            "tokenproxy login: the admin API at {} does not answer /healthz",
            admin.as_ref().map_or("?", |a| a.base())
        );
        return Err(EXIT_FAILURE);
    }
    Ok(admin.filter(|_| up))
}

async fn via_admin(config: &Config, admin: &AdminClient, args: &CliArgs) -> u8 {
    let name = &args.name;
    let base = admin.base();
    if let Some(c) = config.credentials.get(name) {
        if c.redirect_uri.is_none() {
            eprintln!("tokenproxy login: credential {name} has no redirect_uri; to log in through the running proxy set redirect_uri = \"{base}/callback\" and register it at the IdP");
            return EXIT_USAGE;
        }
    }
    let before = match admin_family(admin, name).await {
        Ok(f) => f,
        Err(e) => {
            eprintln!("tokenproxy login: {e}");
            return EXIT_FAILURE;
        }
    };
    let encoded: String = form_urlencoded::byte_serialize(name.as_bytes()).collect();
    let url = format!(
        "{base}/login/{encoded}{}",
        if args.force { "?force=1" } else { "" }
    );
    println!("tokenproxy is running (admin API {base}); it will store the login itself.\nOpen this URL in a browser to log in {name}:\n\n  {url}\n\nWaiting for the login to finish (10 minutes)...");
    if args.open {
        open_browser(&url);
    }
    let deadline = Instant::now() + STATE_TTL;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some(code) = landed(admin, name, before.as_deref()).await {
            return code;
        }
    }
    eprintln!("tokenproxy login: no login finished within 10 minutes; the result page in the browser says why");
    EXIT_FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_logins_are_bounded_in_number_keeping_the_newest() {
        let states = PendingStates::default();
        let mut started = Vec::new();
        for i in 0..200 {
            started.push(states.start(
                &format!("c{i}"),
                Secret::new(String::from("v")),
                "http://127.0.0.1/cb",
                false,
                None,
            ));
        }
        assert!(states.len() <= 32, "{} pending", states.len());
        let newest = started.pop().unwrap();
        assert!(states.take(Some(&newest), None).is_ok());
        assert!(states.inner.lock().gone.len() <= 256);
    }

    #[test]
    fn pkce_s256_is_base64url_sha256() {
        assert_eq!(
            challenge_for("dBjftJeZ4CVP-mJ92IZ1xR8ySAN2YqqgpPsbWgAACSc"),
            // Computed independently (Python hashlib + urlsafe_b64encode).
            "SMREygzQAQYm6WM764svA7_7Kb15tO2jakDJ9tkwsY0"
        );
        let p = Pkce::new();
        assert_eq!(p.verifier.expose().len(), 43);
        assert_eq!(p.challenge, challenge_for(p.verifier.expose()));
    }

    #[test]
    fn state_is_single_use_and_bound_to_browser() {
        let s = PendingStates::default();
        let st = s.start(
            "c",
            Secret::new("v"),
            "http://r",
            false,
            Some(Secret::new("b1")),
        );
        assert_eq!(s.take(None, None).unwrap_err(), StateProblem::Missing);
        assert_eq!(
            s.take(Some("nope"), None).unwrap_err(),
            StateProblem::Unknown
        );
        assert_eq!(
            s.take(Some(&st), Some("b2")).unwrap_err(),
            StateProblem::OtherBrowser
        );
        assert!(s.take(Some(&st), Some("b1")).is_ok());
        assert_eq!(
            s.take(Some(&st), Some("b1")).unwrap_err(),
            StateProblem::Reused
        );
        let st2 = s.start("c", Secret::new("v"), "http://r", false, None);
        s.age(&st2, STATE_TTL);
        assert_eq!(s.take(Some(&st2), None).unwrap_err(), StateProblem::Expired);
        assert_eq!(s.take(Some(&st2), None).unwrap_err(), StateProblem::Expired);
    }

    #[test]
    fn authorization_url_carries_everything() {
        let mut c = crate::token::tests_support::credential(
            "c",
            "https://idp.example/token",
            crate::config::AuthMethod::ClientSecretBasic,
        );
        c.scopes = vec!["openid".into(), "offline_access".into()];
        c.audience = Some("api".into());
        let url = authorization_url(
            &c,
            &"https://idp.example/authorize?x=1".parse().unwrap(),
            "http://127.0.0.1:9901/callback",
            "st",
            "ch",
        );
        assert_eq!(url, "https://idp.example/authorize?x=1&response_type=code&client_id=client&redirect_uri=http%3A%2F%2F127.0.0.1%3A9901%2Fcallback&scope=openid+offline_access&state=st&code_challenge=ch&code_challenge_method=S256&audience=api&prompt=consent", "OIDC Core §11: offline_access goes with prompt=consent");
    }

    #[test]
    fn escape_and_callback_parsing() {
        assert_eq!(escape("<b>\"x\"&'"), "&lt;b&gt;&quot;x&quot;&amp;&#39;");
        let cb =
            parse_callback("http://127.0.0.1/callback?code=c1&state=s1&iss=http%3A%2F%2Fi#frag");
        assert_eq!(cb.code.unwrap().expose(), "c1");
        assert_eq!(cb.state.as_deref(), Some("s1"));
        assert_eq!(cb.iss.as_deref(), Some("http://i"));
        let cb = parse_callback("error=access_denied&error_description=%3Cb%3Ex%3C%2Fb%3E&error_uri=https%3A%2F%2Fidp.example%2Ferr%23denied");
        assert_eq!(cb.error.as_deref(), Some("access_denied"));
        assert_eq!(
            cb.error_uri.as_deref(),
            Some("https://idp.example/err#denied")
        );
        assert_eq!(cb.error_description.as_deref(), Some("<b>x</b>"));
        let cb = parse_callback(
            "error=invalid_request&error_description=bad+refresh_token+rt-9fQ2xLmZ81aB7cD3eF5g",
        );
        assert_eq!(
            cb.error_description.as_deref(),
            Some("bad refresh_token [redacted]")
        );
    }
}
