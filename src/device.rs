//! Device login (RFC 8628; docs/device-login.md): `tokenproxy login --device`
//! and the admin endpoint `POST /credentials/<name>/device` start a device
//! authorization, show the user code and link, poll the token endpoint and
//! install the result as a new token family, exactly as the code login does
//! (`login`'s checks, the credential's lock, `--force`).
//!
//! The device code is a bearer secret for the whole flow: it lives in a
//! [`Secret`] and reaches no log, page, JSON answer or error message. The
//! user code and the links are for people and may be shown.

use crate::admin_client::AdminClient;
use crate::config::{Config, CredentialConfig};
use crate::login::{Done, LoginError};
use crate::process::{EXIT_FAILURE, EXIT_USAGE};
use crate::token::engine::{install_family, InstallError, Slot};
use crate::token::grant::{
    self, build_device_authorization_request, build_token_request, parse_device_authorization,
    parse_token_response, DeviceAuthorization, FailureClass, Grant, GrantClient, GrantError,
    TokenSet,
};
use crate::token::store::Store;
use http::{StatusCode, Uri};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// RFC 8628 §3.2: the polling interval when the response names none.
pub(crate) const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// RFC 8628 §3.5: what each `slow_down` adds, for all later polls.
pub(crate) const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
/// The longest wait between polls after transport failures.
const MAX_INTERVAL: Duration = Duration::from_secs(60);

/// What a person needs to approve a device login. Never the device code.
#[derive(Debug, Clone)]
pub(crate) struct Prompt {
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    pub expires_in: Duration,
    pub interval: Duration,
}

impl Prompt {
    fn of(auth: &DeviceAuthorization) -> Prompt {
        Prompt {
            user_code: auth.user_code.clone(),
            verification_uri: auth.verification_uri.clone(),
            verification_uri_complete: auth.verification_uri_complete.clone(),
            expires_in: auth.expires_in,
            interval: auth.interval.unwrap_or(DEFAULT_INTERVAL),
        }
    }

    /// The admin API's answer (and the CLI's input when it goes through it).
    pub(crate) fn json(&self, credential: &str, expires_in: Duration) -> serde_json::Value {
        serde_json::json!({
            "credential": credential,
            "verification_uri": self.verification_uri,
            "user_code": self.user_code,
            "verification_uri_complete": self.verification_uri_complete,
            "expires_in": expires_in.as_secs(),
            "interval": self.interval.as_secs(),
        })
    }

    fn from_json(v: &serde_json::Value) -> Option<Prompt> {
        Some(Prompt {
            user_code: v["user_code"].as_str()?.to_owned(),
            verification_uri: v["verification_uri"].as_str()?.to_owned(),
            verification_uri_complete: v["verification_uri_complete"].as_str().map(str::to_owned),
            expires_in: Duration::from_secs(v["expires_in"].as_u64()?),
            interval: Duration::from_secs(v["interval"].as_u64().unwrap_or(5)),
        })
    }

    /// The lines the CLI prints.
    pub(crate) fn text(&self, name: &str) -> String {
        let mut s = format!(
            "To log in {name}, open this page on any device (a phone will do):\n\n  {}\n\nand enter the code:\n\nCode: {}\n",
            self.verification_uri, self.user_code
        );
        if let Some(c) = &self.verification_uri_complete {
            s.push_str(&format!(
                "\nOr open this link, which carries the code:\n\n  {c}\n"
            ));
        }
        s.push_str(&self.waiting());
        s
    }

    fn waiting(&self) -> String {
        format!(
            "\nWaiting for approval (the code expires in {})...",
            humantime::format_duration(Duration::from_secs(self.expires_in.as_secs()))
        )
    }
}

impl Prompt {
    /// The link as a QR code in block characters, for a phone's camera:
    /// the link that carries the code when there is one.
    pub(crate) fn qr(&self) -> Option<String> {
        let link = self
            .verification_uri_complete
            .as_deref()
            .unwrap_or(&self.verification_uri);
        let code = qrcode::QrCode::with_error_correction_level(link, qrcode::EcLevel::L).ok()?;
        Some(
            code.render::<qrcode::render::unicode::Dense1x2>()
                // Light modules dark on a dark terminal would not scan.
                .dark_color(qrcode::render::unicode::Dense1x2::Light)
                .light_color(qrcode::render::unicode::Dense1x2::Dark)
                .quiet_zone(true)
                .build(),
        )
    }

    /// What the CLI prints: the text, and on a terminal the QR code.
    fn print(&self, name: &str) {
        let text = self.text(name);
        match std::io::IsTerminal::is_terminal(&std::io::stdout())
            .then(|| self.qr())
            .flatten()
        {
            Some(qr) => {
                let body = text.strip_suffix(&self.waiting()).unwrap_or(&text);
                println!(
                    "{body}\nOr scan this with a phone:\n\n{qr}\n{}",
                    self.waiting()
                );
            }
            None => println!("{text}"),
        }
    }
}

/// A refresh_token credential that can log in with the device grant.
pub(crate) struct Target {
    pub cred: Arc<CredentialConfig>,
    pub token_url: Uri,
    pub device_url: Uri,
}

/// Looks up `name` and resolves its token and device endpoints.
pub(crate) async fn target(config: &Config, name: &str) -> Result<Target, LoginError> {
    let cred = crate::login::refresh_credential(config, name)?;
    let egress = crate::egress::proxy_from(config.server.egress_proxy.as_ref());
    let (token_url, device_url) = crate::discovery::device_endpoints(&cred, egress.as_ref())
        .await
        .map_err(|source| LoginError::Discovery {
            credential: name.to_owned(),
            source,
        })?;
    let device_url = device_url.ok_or_else(|| no_device_endpoint(name))?;
    Ok(Target {
        cred,
        token_url,
        device_url,
    })
}

fn no_device_endpoint(name: &str) -> LoginError {
    LoginError::Setup(format!(
        "credential {name} has no device_authorization_url (set it, or issuer when the IdP's metadata names a device_authorization_endpoint)"
    ))
}

/// The device authorization request (RFC 8628 §3.1-3.2).
pub(crate) async fn start(
    cred: &CredentialConfig,
    device_url: &Uri,
    client: &GrantClient,
) -> Result<DeviceAuthorization, LoginError> {
    let outcome = match build_device_authorization_request(cred, device_url) {
        Ok(req) => match client.send(&req).await {
            Ok(raw) => parse_device_authorization(&raw),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    outcome.map_err(|error| failed(cred, "the device authorization request", error, None))
}

fn failed(
    cred: &CredentialConfig,
    what: &'static str,
    error: GrantError,
    device_code: Option<&crate::secret::Secret>,
) -> LoginError {
    let error = scrubbed(error, cred, device_code);
    let hint = crate::token::hints::for_grant_error(cred, &error);
    LoginError::Device { what, error, hint }
}

/// The IdP's text with what it may echo of the request (the client secret,
/// the device code) scrubbed, then capped as the code login caps it
/// (`login::exchange`): scrubbed first, so a secret cut in half is still
/// found.
fn scrubbed(
    mut error: GrantError,
    cred: &CredentialConfig,
    device_code: Option<&crate::secret::Secret>,
) -> GrantError {
    let known: Vec<String> = cred
        .client_secret
        .iter()
        .chain(device_code)
        .map(|s| s.expose().to_owned())
        .collect();
    let clean = |t: &str, max: usize| grant::sanitize(&grant::scrub(t, &known), max);
    error.code = error.code.as_deref().map(|c| clean(c, 64));
    error.description = error.description.as_deref().map(|d| clean(d, 300));
    error.error_uri = error.error_uri.as_deref().map(|u| clean(u, 200));
    // The message names the code as sent.
    for k in known.iter().filter(|k| k.len() >= 4) {
        error.message = error.message.replace(k.as_str(), "[redacted]");
    }
    error
}

/// Polls the token endpoint (RFC 8628 §3.4-3.5) every `interval` (5 s when
/// the IdP named none), 5 s more after each `slow_down`, until the login is
/// approved, refused or `expires_in` (counted from `issued`) runs out.
pub(crate) async fn poll(
    cred: &CredentialConfig,
    token_url: &Uri,
    client: &GrantClient,
    auth: &DeviceAuthorization,
    issued: Instant,
) -> Result<(TokenSet, SystemTime), LoginError> {
    let deadline = issued + auth.expires_in;
    let mut interval = auth.interval.unwrap_or(DEFAULT_INTERVAL);
    // One key for every poll: the answer that issues tokens binds them to it.
    let dpop = grant::LoginDpop::for_credential(cred)
        .map_err(|e| failed(cred, "polling the token endpoint", e, None))?;
    loop {
        let next = Instant::now() + interval;
        if next >= deadline {
            // Polling after expiry only earns expired_token.
            tokio::time::sleep_until(deadline).await;
            return Err(LoginError::DeviceExpired(auth.expires_in));
        }
        tokio::time::sleep_until(next).await;
        let poll = Grant::DeviceCode(&auth.device_code);
        let build = || build_token_request(cred, token_url, &poll);
        let req = build().map_err(|e| failed(cred, "polling the token endpoint", e, None))?;
        let sent_wall = SystemTime::now();
        let proven = dpop.as_ref().map(|d| d.proven());
        let answer = match client.send_proven(req, proven.as_ref(), &build).await {
            Ok(raw) => parse_token_response(&raw, SystemTime::now())
                .and_then(|set| grant::check_token_type(set, dpop.is_some()))
                .map(|mut set| {
                    set.dpop_key = dpop.as_ref().and_then(|d| d.stored.clone());
                    set
                }),
            Err(e) => Err(e),
        };
        let e = match answer {
            Ok(set) if set.refresh_token.is_none() => {
                return Err(LoginError::NoRefreshToken(crate::login::offline_hint(
                    cred, None,
                )))
            }
            Ok(set) => return Ok((set, sent_wall)),
            Err(e) => scrubbed(e, cred, Some(&auth.device_code)),
        };
        match e.code.as_deref() {
            Some("authorization_pending") => {}
            Some("slow_down") => interval += SLOW_DOWN_STEP,
            Some("expired_token") => return Err(LoginError::DeviceExpired(auth.expires_in)),
            Some("access_denied") => {
                return Err(LoginError::Denied {
                    error: "access_denied".into(),
                    description: e.description,
                    error_uri: e.error_uri,
                })
            }
            // RFC 8628 §3.5: back off on connection failures and the like.
            _ if e.class == FailureClass::Transient => {
                interval = (interval * 2).min(MAX_INTERVAL).max(interval);
                tracing::warn!(
                    event = "device_poll_failed",
                    credential = %cred.name,
                    error = %crate::error_chain(&e),
                    next_poll_s = interval.as_secs(),
                    "Device login poll failed; retrying"
                );
            }
            _ => {
                return Err(failed(
                    cred,
                    "polling the token endpoint",
                    e,
                    Some(&auth.device_code),
                ))
            }
        }
    }
}

/// The CLI without a running proxy: writes the store itself.
pub(crate) async fn run_local(
    config: &Config,
    name: &str,
    force: bool,
    announce: impl Fn(&Prompt),
) -> Result<Done, LoginError> {
    let t = target(config, name).await?;
    let store = Store::open_config(&config.store)
        .await
        .map_err(|e| LoginError::Setup(format!("token store: {}", crate::error_chain(&e))))?;
    if !force {
        if let Some(r) = crate::login::working_family(&store, &t.cred, &t.token_url).await {
            return Err(LoginError::Install(InstallError::FamilyStillWorks(
                name.to_owned(),
                r.generation,
            )));
        }
    }
    let client = GrantClient::new(
        crate::discovery::tls_for(&t.cred).map_err(LoginError::Tls)?,
        crate::token::GRANT_TIMEOUT,
        crate::egress::proxy_from(config.server.egress_proxy.as_ref()).as_ref(),
    );
    let auth = start(&t.cred, &t.device_url, &client).await?;
    let issued = Instant::now();
    tracing::info!(event = "login_started", credential = %name, via = "cli", flow = "device", "Login started");
    announce(&Prompt::of(&auth));
    let (set, sent_wall) = poll(&t.cred, &t.token_url, &client, &auth, issued).await?;
    let rec = install_family(&store, &t.cred, &t.token_url, &set, sent_wall, force).await?;
    Ok(Done {
        credential: name.to_owned(),
        subject: set.subject.clone(),
        family: rec.family,
    })
}

// ---------------------------------------------------------------------------
// In the running proxy
// ---------------------------------------------------------------------------

/// The device logins a running proxy is polling for, one per credential,
/// and the last one's failure (for `login --device` and the status page).
#[derive(Default, Clone)]
pub struct DeviceLogins {
    // A sync mutex: map operations only, never held across an await. Shared
    // with the polling tasks, which outlive the request that started them.
    inner: Arc<Mutex<HashMap<String, Entry>>>,
}

struct Entry {
    prompt: Prompt,
    expires_at: Instant,
    /// Tells this flow's task from a later one's.
    id: u64,
    failure: Option<(&'static str, String, String)>,
}

impl DeviceLogins {
    /// The credential's pending device login, for the status page: the user
    /// code, the link and the seconds left.
    pub(crate) fn pending(&self, credential: &str) -> Option<(Prompt, Duration)> {
        let g = self.inner.lock();
        let e = g.get(credential)?;
        let left = e.expires_at.checked_duration_since(Instant::now())?;
        e.failure.is_none().then(|| (e.prompt.clone(), left))
    }

    /// What `/credentials/<name>` shows: pending (the prompt) or failed
    /// (reason, message, fix). Never the device code.
    pub(crate) fn status_json(&self, credential: &str) -> Option<serde_json::Value> {
        let g = self.inner.lock();
        let e = g.get(credential)?;
        let now = Instant::now();
        Some(match &e.failure {
            Some((reason, message, fix)) => serde_json::json!({
                "state": "failed", "reason": reason, "message": message, "fix": fix,
            }),
            None => {
                let left = e.expires_at.checked_duration_since(now)?;
                let mut v = e.prompt.json(credential, left);
                v["state"] = serde_json::json!("pending");
                v
            }
        })
    }

    fn finish(&self, credential: &str, id: u64, result: &Result<Done, LoginError>) {
        let mut g = self.inner.lock();
        if g.get(credential).map(|e| e.id) != Some(id) {
            return;
        }
        match result {
            Ok(_) => {
                g.remove(credential);
            }
            Err(e) => {
                if let Some(entry) = g.get_mut(credential) {
                    entry.failure = Some((e.code(), crate::error_chain(e), e.fix()));
                }
            }
        }
    }
}

/// An admin answer: status and JSON body.
pub(crate) type Answer = (StatusCode, serde_json::Value);

fn refusal(status: StatusCode, e: &LoginError) -> Answer {
    let message = match e {
        // The store's path and cause are for the log.
        LoginError::Install(i) if !matches!(i, InstallError::FamilyStillWorks(..)) => {
            "the new token family could not be stored; the log says why".to_owned()
        }
        e => crate::error_chain(e),
    };
    (
        status,
        serde_json::json!({"error": e.code(), "message": message, "fix": e.fix()}),
    )
}

/// `POST /credentials/<name>/device[?force=1]`: starts a device login in
/// this process (or answers the one already pending) and returns what a
/// person needs; a task polls and installs the result.
pub(crate) async fn admin_start(
    config: &Config,
    slot: Arc<Slot>,
    logins: &DeviceLogins,
    force: bool,
) -> Answer {
    let name = slot.cfg.name.clone();
    let fail = |status, e: LoginError| {
        crate::login::log_failure(Some(&name), &e);
        refusal(status, &e)
    };
    if slot.store().is_none() {
        let e = crate::login::refresh_credential(config, &name)
            .err()
            .unwrap_or_else(|| LoginError::Setup(format!("credential {name} has no token store")));
        return fail(StatusCode::CONFLICT, e);
    }
    {
        let g = logins.inner.lock();
        if let Some(e) = g.get(&name) {
            if let (None, Some(left)) = (
                &e.failure,
                e.expires_at.checked_duration_since(Instant::now()),
            ) {
                return (StatusCode::OK, e.prompt.json(&name, left));
            }
        }
    }
    if !force {
        if let Some(store) = slot.store() {
            if let Some(r) = crate::login::working_family(store, &slot.cfg, slot.token_url()).await
            {
                return fail(
                    StatusCode::CONFLICT,
                    LoginError::Install(InstallError::FamilyStillWorks(name.clone(), r.generation)),
                );
            }
        }
    }
    let egress = crate::egress::proxy_from(config.server.egress_proxy.as_ref());
    let device_url = match crate::discovery::device_endpoints(&slot.cfg, egress.as_ref()).await {
        Ok((_, Some(d))) => d,
        Ok((_, None)) => return fail(StatusCode::CONFLICT, no_device_endpoint(&name)),
        Err(source) => {
            return fail(
                StatusCode::BAD_GATEWAY,
                LoginError::Discovery {
                    credential: name.clone(),
                    source,
                },
            )
        }
    };
    let auth = match start(&slot.cfg, &device_url, slot.grant_client()).await {
        Ok(a) => a,
        Err(e) => return fail(StatusCode::BAD_GATEWAY, e),
    };
    let issued = Instant::now();
    let prompt = Prompt::of(&auth);
    let id = rand::random::<u64>();
    logins.inner.lock().insert(
        name.clone(),
        Entry {
            prompt: prompt.clone(),
            expires_at: issued + auth.expires_in,
            id,
            failure: None,
        },
    );
    tracing::info!(event = "login_started", credential = %name, via = "admin", flow = "device", "Login started");
    // Its own task: the poll outlives this request, and a client hanging up
    // must not cancel an install half-way.
    let logins = logins.clone();
    let expires_in = auth.expires_in;
    tokio::spawn(async move {
        let result = async {
            let (set, sent_wall) = poll(
                &slot.cfg,
                slot.token_url(),
                slot.grant_client(),
                &auth,
                issued,
            )
            .await?;
            let rec = slot.install_login(&set, sent_wall, force).await?;
            Ok(Done {
                credential: slot.cfg.name.clone(),
                subject: set.subject.clone(),
                family: rec.family,
            })
        }
        .await;
        if let Err(e) = &result {
            crate::login::log_failure(Some(&slot.cfg.name), e);
        }
        logins.finish(&slot.cfg.name, id, &result);
    });
    (StatusCode::OK, prompt.json(&name, expires_in))
}

/// `tokenproxy login --device`: through the running proxy's admin API when
/// it answers, else here. Returns the exit code (0, 64 setup, 1 otherwise).
pub(crate) async fn run_cli(
    config: &Config,
    name: &str,
    force: bool,
    open: bool,
    admin: Option<&str>,
) -> u8 {
    match crate::login::running_admin(config, admin).await {
        Ok(Some(admin)) => return via_admin(&admin, name, force).await,
        Ok(None) => {}
        Err(code) => return code,
    }
    let announce = |p: &Prompt| {
        p.print(name);
        if open {
            crate::login::open_browser(
                p.verification_uri_complete
                    .as_deref()
                    .unwrap_or(&p.verification_uri),
            );
        }
    };
    match run_local(config, name, force, announce).await {
        Ok(done) => {
            println!("{}", done.message());
            0
        }
        Err(e) => {
            crate::login::log_failure(Some(name), &e);
            crate::login::report(&e)
        }
    }
}

/// `tokenproxy login --device` through the running proxy's admin API.
pub(crate) async fn via_admin(admin: &AdminClient, name: &str, force: bool) -> u8 {
    let base = admin.base().to_owned();
    let before = match crate::login::admin_family(admin, name).await {
        Ok(f) => f,
        Err(e) => {
            eprintln!("tokenproxy login: {e}");
            return EXIT_FAILURE;
        }
    };
    let encoded: String = form_urlencoded::byte_serialize(name.as_bytes()).collect();
    let path = format!(
        "/credentials/{encoded}/device{}",
        if force { "?force=1" } else { "" }
    );
    let (status, body) = match admin.post(&path).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tokenproxy login: {e}");
            return EXIT_FAILURE;
        }
    };
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let prompt = match (status.is_success(), Prompt::from_json(&v)) {
        (true, Some(p)) => p,
        _ => {
            eprintln!(
                "tokenproxy login: the running proxy at {base} could not start a device login: {}",
                v["message"].as_str().unwrap_or(&format!("{status}"))
            );
            if let Some(fix) = v["fix"].as_str().filter(|f| !f.is_empty()) {
                eprintln!("{fix}");
            }
            return match v["error"].as_str() {
                Some("setup") => EXIT_USAGE,
                _ => EXIT_FAILURE,
            };
        }
    };
    println!("tokenproxy is running (admin API {base}); it polls and stores the login itself.");
    prompt.print(name);
    let deadline = Instant::now() + prompt.expires_in + Duration::from_secs(5);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some(code) = crate::login::landed(admin, name, before.as_deref()).await {
            return code;
        }
        if let Ok((_, body)) = admin.get(&format!("/credentials/{encoded}")).await {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let d = &v["device_login"];
            if d["state"] == "failed" {
                eprintln!(
                    "tokenproxy login: {}",
                    d["message"].as_str().unwrap_or("the device login failed")
                );
                if let Some(fix) = d["fix"].as_str().filter(|f| !f.is_empty()) {
                    eprintln!("{fix}");
                }
                return EXIT_FAILURE;
            }
        }
    }
    eprintln!("tokenproxy login: the device login expired without an answer");
    EXIT_FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuthMethod;
    use crate::secret::Secret;
    use crate::token::grant::{Exchange, PreparedRequest, RawResponse};
    use std::collections::VecDeque;
    use std::future::Future;
    use std::pin::Pin;

    const S: fn(u64) -> Duration = Duration::from_secs;

    /// A token endpoint answering device-code polls from a script, noting
    /// when each poll arrived (paused clock).
    struct Script {
        start: Instant,
        replies: Mutex<VecDeque<&'static str>>,
        at: Mutex<Vec<Duration>>,
        bodies: Mutex<Vec<String>>,
    }

    impl Script {
        fn new(replies: &[&'static str]) -> Arc<Script> {
            Arc::new(Script {
                start: Instant::now(),
                replies: Mutex::new(replies.iter().copied().collect()),
                at: Mutex::new(vec![]),
                bodies: Mutex::new(vec![]),
            })
        }
    }

    impl Exchange for Script {
        fn exchange<'a>(
            &'a self,
            req: &'a PreparedRequest,
        ) -> Pin<Box<dyn Future<Output = Result<RawResponse, GrantError>> + Send + 'a>> {
            Box::pin(async move {
                self.at.lock().push(self.start.elapsed());
                self.bodies.lock().push(req.body.expose().to_owned());
                let reply = self
                    .replies
                    .lock()
                    .pop_front()
                    .unwrap_or("authorization_pending");
                let (status, body) = match reply {
                    "ok" => (200, r#"{"access_token":"at-1","token_type":"Bearer","expires_in":60,"refresh_token":"rt-1"}"#.to_owned()),
                    "no_rt" => (200, r#"{"access_token":"at-1","token_type":"Bearer","expires_in":60}"#.to_owned()),
                    "503" => (503, String::new()),
                    code => (400, format!(r#"{{"error":"{code}","error_description":"about dc-SECRET-0123456789abcdef"}}"#)),
                };
                let mut headers = http::HeaderMap::new();
                headers.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                Ok(RawResponse {
                    status: StatusCode::from_u16(status).unwrap(),
                    headers,
                    body: bytes::Bytes::from(body),
                })
            })
        }
    }

    fn auth(expires_in: u64, interval: Option<u64>) -> DeviceAuthorization {
        DeviceAuthorization {
            device_code: Secret::new("dc-SECRET-0123456789abcdef"),
            user_code: "WDJB-MJHT".into(),
            verification_uri: "https://idp.example/device".into(),
            verification_uri_complete: None,
            expires_in: S(expires_in),
            interval: interval.map(S),
        }
    }

    async fn run(
        script: &Arc<Script>,
        a: &DeviceAuthorization,
    ) -> Result<(TokenSet, SystemTime), LoginError> {
        let cred = crate::token::tests_support::credential(
            "dev",
            "https://idp.example/token",
            AuthMethod::ClientSecretPost,
        );
        let client = GrantClient::scripted(script.clone());
        poll(
            &cred,
            &"https://idp.example/token".parse().unwrap(),
            &client,
            a,
            Instant::now(),
        )
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn polls_every_five_seconds_by_default_and_five_more_after_slow_down() {
        let script = Script::new(&[
            "authorization_pending",
            "slow_down",
            "authorization_pending",
            "slow_down",
            "ok",
        ]);
        let (set, _) = run(&script, &auth(600, None)).await.unwrap();
        assert_eq!(set.refresh_token.unwrap().expose(), "rt-1");
        // 5 s (the default), then 10 s after the first slow_down, 15 s after
        // the second: each slow_down counts for every later poll (§3.5).
        assert_eq!(*script.at.lock(), vec![S(5), S(10), S(20), S(30), S(45)]);
        let body = script.bodies.lock()[0].clone();
        let form: Vec<(String, String)> = form_urlencoded::parse(body.as_bytes())
            .into_owned()
            .collect();
        assert!(
            form.contains(&("grant_type".into(), grant::DEVICE_CODE_GRANT.into())),
            "{form:?}"
        );
        assert!(form.contains(&("device_code".into(), "dc-SECRET-0123456789abcdef".into())));
    }

    #[tokio::test(start_paused = true)]
    async fn the_interval_the_idp_names_is_used() {
        let script = Script::new(&["authorization_pending", "ok"]);
        run(&script, &auth(600, Some(2))).await.unwrap();
        assert_eq!(*script.at.lock(), vec![S(2), S(4)]);
    }

    #[tokio::test(start_paused = true)]
    async fn stops_at_expires_in_without_polling_past_it() {
        let script = Script::new(&[]);
        let start = Instant::now();
        let e = run(&script, &auth(12, None)).await.unwrap_err();
        assert_eq!(e.code(), "device_expired");
        assert_eq!(*script.at.lock(), vec![S(5), S(10)]);
        assert_eq!(start.elapsed(), S(12));
        assert!(e.to_string().contains("expired"), "{e}");
        assert!(e.fix().contains("--device"), "{}", e.fix());
    }

    #[tokio::test(start_paused = true)]
    async fn expired_token_and_access_denied_stop_with_their_codes() {
        let script = Script::new(&["authorization_pending", "expired_token"]);
        let e = run(&script, &auth(600, None)).await.unwrap_err();
        assert_eq!(e.code(), "device_expired");
        assert_eq!(script.at.lock().len(), 2);

        let script = Script::new(&["access_denied"]);
        let e = run(&script, &auth(600, None)).await.unwrap_err();
        assert_eq!(e.code(), "denied");
        let text = format!("{} {}", crate::error_chain(&e), e.fix());
        assert!(
            text.contains("access_denied") && text.contains("declined"),
            "{text}"
        );
        assert!(!text.contains("dc-SECRET"), "{text}");

        let script = Script::new(&["invalid_grant"]);
        let e = run(&script, &auth(600, None)).await.unwrap_err();
        assert_eq!(e.code(), "device_failed");
        assert!(!crate::error_chain(&e).contains("dc-SECRET"), "{e}");

        let script = Script::new(&["no_rt"]);
        let e = run(&script, &auth(600, None)).await.unwrap_err();
        assert_eq!(e.code(), "no_refresh_token");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_endpoint_backs_off_and_keeps_waiting() {
        let script = Script::new(&["503", "503", "ok"]);
        run(&script, &auth(600, None)).await.unwrap();
        assert_eq!(*script.at.lock(), vec![S(5), S(15), S(35)]);
    }

    #[test]
    fn the_cli_text_shows_code_and_links_but_no_device_code() {
        let mut a = auth(900, None);
        a.verification_uri_complete = Some("https://idp.example/device?user_code=WDJB-MJHT".into());
        let text = Prompt::of(&a).text("github");
        assert!(text.contains("\n  https://idp.example/device\n"), "{text}");
        assert!(text.contains("Code: WDJB-MJHT"), "{text}");
        assert!(text.contains("user_code=WDJB-MJHT"), "{text}");
        assert!(text.contains("15m"), "{text}");
        assert!(!text.contains("dc-SECRET"), "{text}");
        let v = Prompt::of(&a).json("github", S(900));
        assert!(!v.to_string().contains("dc-SECRET"), "{v}");
        assert_eq!(Prompt::from_json(&v).unwrap().user_code, "WDJB-MJHT");
    }

    #[test]
    fn the_qr_code_carries_the_link_with_the_code_when_there_is_one() {
        let mut a = auth(900, None);
        let plain = Prompt::of(&a).qr().unwrap();
        a.verification_uri_complete = Some("https://idp.example/device?user_code=WDJB-MJHT".into());
        let complete = Prompt::of(&a).qr().unwrap();
        assert_ne!(plain, complete);
        let render = |link: &str| {
            let code =
                qrcode::QrCode::with_error_correction_level(link, qrcode::EcLevel::L).unwrap();
            let width = code.width() + 8; // 4 modules of quiet zone each side
            (width, code.to_colors())
        };
        let (width, modules) = render("https://idp.example/device?user_code=WDJB-MJHT");
        let lines: Vec<&str> = complete.lines().collect();
        assert_eq!(lines.len(), width.div_ceil(2), "{complete}");
        assert!(
            lines.iter().all(|l| l.chars().count() == width),
            "{complete}"
        );
        // Two rows per line; a dark module is blank, a light one a block
        // (readable on a dark terminal). The quiet zone is light; the
        // finder pattern's corner (rows 4-5 here) dark.
        assert!(
            lines[..2].iter().all(|l| l.chars().all(|c| c == '█')),
            "{complete}"
        );
        assert_eq!(
            (modules[0], modules[width - 8]),
            (qrcode::Color::Dark, qrcode::Color::Dark)
        );
        assert_eq!(lines[2].chars().nth(4), Some(' '), "{complete}");
    }
}
