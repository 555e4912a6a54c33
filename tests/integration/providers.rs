//! Provider profiles end to end: the dev IdP speaks a vendor's documented
//! wire shapes (`Dialect`), the credential says `provider = "NAME"` (its
//! `token_url` pointing at the dev IdP: explicit keys win), and concurrent
//! clients run through the proxy across rotations and a restart with 0
//! reuses at the IdP and 0 failed requests; then the grant is revoked and
//! the credential dies once, with that provider's hint, and is not retried
//! (docs/providers.md).

use crate::harness::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokenproxy::dev::Dialect;

const S: fn(u64) -> Duration = Duration::from_secs;

/// Clients polling `path` until stopped; every answer must be the
/// upstream's 200 with a valid token, at `expect_path` when given.
fn clients(
    url: String,
    expect_path: Option<&'static str>,
    stop: Arc<AtomicBool>,
    n: usize,
) -> Vec<tokio::task::JoinHandle<usize>> {
    (0..n)
        .map(|_| {
            let (url, stop) = (url.clone(), stop.clone());
            tokio::spawn(async move {
                let c = client();
                let mut ok = 0;
                for _ in 0..4000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let g = get_ok(&c, &url).await;
                    assert_eq!(g.status, 200, "a failed request: {}", g.text());
                    assert_eq!(g.json()["token_ok"], true, "{}", g.text());
                    if let Some(p) = expect_path {
                        assert_eq!(g.json()["path"], p, "{}", g.text());
                    }
                    ok += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                ok
            })
        })
        .collect()
}

/// One provider's end-to-end run: the IdP's mode, the credential's keys,
/// and where clients send their requests.
struct Case {
    dialect: Dialect,
    /// GitHub: a rotation kills the previous access token at once.
    github_rotation: bool,
    /// Salesforce: no `expires_in`, the API host in `instance_url`.
    salesforce: bool,
    /// The IdP's `token_type` (Slack: `bot`).
    token_type: Option<&'static str>,
    access_ttl: u64,
    /// The refresh token's own lifetime, sent with each grant.
    refresh_ttl: Option<u64>,
    /// ... counted from the login, not from each refresh.
    refresh_absolute: bool,
    /// false: the refresh token never changes (RFC 6749 §6: the old one is kept).
    rotate: bool,
    /// The only client authentication the IdP accepts, as the vendor
    /// documents it (LinkedIn: client_id and client_secret in the body).
    client_auth: Option<&'static str>,
    /// Okta: the first refresh after the restart is refused 429 with
    /// `x-rate-limit-reset`; the next comes no earlier than that.
    rate_limit: bool,
    max_backoff: &'static str,
    extra: &'static str,
    extra_routes: &'static str,
    /// Requests go to this path on the proxy...
    path: &'static str,
    /// ... and reach this one at the upstream.
    upstream_path: Option<&'static str>,
    hint_has: &'static str,
}

const CASE: Case = Case {
    dialect: Dialect::Rfc,
    github_rotation: false,
    salesforce: false,
    token_type: None,
    access_ttl: 2,
    refresh_ttl: None,
    refresh_absolute: false,
    rotate: true,
    client_auth: None,
    rate_limit: false,
    max_backoff: "1s",
    extra: "",
    extra_routes: "",
    path: "/api/x",
    upstream_path: None,
    hint_has: "",
};

async fn serve_until_generation(stack: &Stack, case: &Case, extra: &str, generations: u64) {
    let app = stack.app(extra).await;
    let start = stack.wait_generation(1, S(10)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let url = format!("http://{}{}", app.proxy_addr.unwrap(), case.path);
    let running = clients(url, case.upstream_path, stop.clone(), 4);
    stack.wait_generation(start + generations, S(30)).await;
    stop.store(true, Ordering::Relaxed);
    for c in running {
        assert!(c.await.expect("only 200s") > 0);
    }
    app.shutdown().await;
}

async fn run_case(case: Case) {
    let stack = Stack::start(StackOpts {
        dialect: case.dialect,
        github_rotation: case.github_rotation,
        omit_expires_in: case.salesforce,
        extra_routes: case.extra_routes.to_owned(),
        access_ttl: S(case.access_ttl),
        refresh_ttl: case.refresh_ttl.map(S),
        refresh_absolute: case.refresh_absolute,
        rotate_refresh_tokens: case.rotate,
        client_auth_method: case.client_auth,
        ..StackOpts::default()
    })
    .await;
    if case.salesforce {
        stack.idp.set_instance_url(Some(stack.echo.url()));
    }
    if let Some(t) = case.token_type {
        stack.idp.set_token_type(t);
    }
    let extra = format!(
        "{}\nmax_backoff = \"{}\"\n",
        case.extra
            .replace("{introspection}", &stack.idp.introspection_url()),
        case.max_backoff
    );
    // Rotations, a restart on the same store, more rotations.
    serve_until_generation(&stack, &case, &extra, 3).await;
    let refresh_deadline = |rec: serde_json::Value| rec["refresh_expires_at_ms"].as_u64();
    let first_deadline = refresh_deadline(stack.record().unwrap());
    let reset = case.rate_limit.then(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let reset = now + 2;
        stack.idp.push_fault(tokenproxy::dev::Fault::Status {
            status: 429,
            body: r#"{"errorCode":"E0000047","errorSummary":"API call exceeded rate limit due to too many requests."}"#.into(),
            content_type: "application/json",
            headers: vec![("x-rate-limit-reset".into(), reset.to_string())],
        });
        reset
    });
    serve_until_generation(&stack, &case, &extra, 2).await;
    if let Some(reset) = reset {
        let grants = stack.idp.grants();
        let limited = grants
            .iter()
            .position(|g| g.fault == Some("status"))
            .expect("the 429 was served");
        let next = &grants[limited + 1];
        let at = next.at.duration_since(std::time::UNIX_EPOCH).unwrap();
        assert!(
            at >= Duration::from_secs(reset),
            "a token request {at:?} before x-rate-limit-reset {reset}"
        );
    }
    if let (Some(ttl), false) = (case.refresh_ttl, case.refresh_absolute) {
        // Recorded from the vendor's spelling (Keycloak: refresh_expires_in),
        // and moved on by every refresh.
        let rec = stack.record().unwrap();
        let left = rec["refresh_expires_at_ms"].as_u64().expect("recorded")
            - rec["access_issued_at_ms"].as_u64().unwrap();
        assert!(left.abs_diff(ttl * 1000) < 1000, "{rec}");
    }
    if !case.rotate {
        // Generations moved on with the one refresh token the login gave.
        assert!(stack.generation().unwrap() >= 5);
        assert_eq!(stack.current_refresh_token(), stack.seed);
    }
    if case.refresh_absolute {
        // Rotations did not extend it: the deadline stayed where it was.
        let now = refresh_deadline(stack.record().unwrap()).expect("recorded");
        let first = first_deadline.expect("recorded");
        assert!(
            now.abs_diff(first) < 1500,
            "deadline moved {first} -> {now}"
        );
    }
    stack.assert_no_reuse();
    if let Some(method) = case.client_auth {
        let grants = stack.idp.grants();
        assert!(
            grants
                .iter()
                .filter(|g| g.grant_type == "refresh_token")
                .all(|g| g.client_auth == method && g.outcome == "ok"),
            "every refresh authenticated with {method}: {grants:?}"
        );
    }
    if case.salesforce {
        // No expires_in: the lifetime came from introspection (2 s), not
        // the 1 h default.
        let rec = stack.record().unwrap();
        let lifetime = rec["access_expires_at_ms"].as_u64().unwrap()
            - rec["access_issued_at_ms"].as_u64().unwrap();
        assert!(lifetime <= 2_000, "stored lifetime {lifetime} ms");
    }

    // Revoked at the IdP: dead once, in the provider's terms, no storm.
    let app = stack.app(&extra).await;
    stack.idp.revoke_family_of(&stack.current_refresh_token());
    let admin = app.admin_addr.unwrap();
    let st = wait_for("credential dead with invalid_grant", S(20), || async {
        let st = credential_status(&client(), admin).await?;
        (st["state"] == "dead" || st["last_error"]["outcome"] == "invalid_grant")
            .then_some(st)
            .filter(|s| s["last_error"]["outcome"] == "invalid_grant")
    })
    .await;
    let hint = st["last_error"]["hint"].as_str().unwrap_or_default();
    assert!(
        hint.contains(case.hint_has),
        "hint {hint:?} lacks {:?}",
        case.hint_has
    );
    assert!(hint.contains("tokenproxy login"), "{hint}");
    let after = stack.refresh_grants();
    // Requests keep coming; the dead grant is not presented again.
    let c = client();
    for _ in 0..20 {
        let _ = get_ok(
            &c,
            &format!("http://{}{}", app.proxy_addr.unwrap(), case.path),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stack.refresh_grants(), after, "a dead grant was retried");
    stack.assert_no_reuse();
    assert_no_secrets(&[st.to_string()], &stack.secrets());
    app.shutdown().await;
}

async fn profile_end_to_end(dialect: Dialect, extra: &'static str, hint_has: &'static str) {
    run_case(Case {
        dialect,
        extra,
        hint_has,
        ..CASE
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_200_form_errors_and_rotation_killing_the_previous_token() {
    run_case(Case {
        dialect: Dialect::Github,
        github_rotation: true,
        extra: "provider = \"github\"",
        hint_has: "GitHub",
        ..CASE
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_ok_false_and_bot_tokens() {
    run_case(Case {
        dialect: Dialect::Slack,
        token_type: Some("bot"),
        extra: "provider = \"slack\"",
        hint_has: "Slack",
        ..CASE
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubspot_errors_without_an_error_field() {
    profile_end_to_end(Dialect::Hubspot, "provider = \"hubspot\"", "HubSpot").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microsoft_aadsts_codes_and_scope_on_refresh() {
    profile_end_to_end(
        Dialect::Microsoft,
        "provider = \"microsoft\"\ntenant = \"common\"\nscopes = [\"offline_access\", \"User.Read\"]",
        "AADSTS700082",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn okta_x_rate_limit_reset() {
    run_case(Case {
        access_ttl: 8,
        rate_limit: true,
        max_backoff: "10s",
        extra: "provider = \"okta\"\nscopes = [\"offline_access\"]",
        hint_has: "revoked",
        ..CASE
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keycloak_refresh_expires_in() {
    run_case(Case {
        dialect: Dialect::Keycloak,
        refresh_ttl: Some(1800),
        extra: "provider = \"keycloak\"\ndomain = \"sso.example.com\"\nrealm = \"apps\"",
        hint_has: "revoked",
        ..CASE
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intuit_x_refresh_token_expires_in() {
    run_case(Case {
        dialect: Dialect::Intuit,
        refresh_ttl: Some(8_640_000),
        extra: "provider = \"intuit\"",
        hint_has: "revoked",
        ..CASE
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth0_403_invalid_grant() {
    run_case(Case {
        dialect: Dialect::Auth0,
        extra: "provider = \"auth0\"\nscopes = [\"offline_access\"]",
        hint_has: "tokenproxy login",
        ..CASE
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spotify_absolute_refresh_token_lifetime() {
    run_case(Case {
        refresh_ttl: Some(3600),
        refresh_absolute: true,
        extra: "provider = \"spotify\"",
        hint_has: "revoked",
        ..CASE
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linkedin_absolute_refresh_token_lifetime_and_client_secret_post() {
    run_case(Case {
        refresh_ttl: Some(86_400),
        refresh_absolute: true,
        client_auth: Some("client_secret_post"),
        extra: "provider = \"linkedin\"",
        hint_has: "revoked",
        ..CASE
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn box_refresh_token_has_expired() {
    run_case(Case {
        dialect: Dialect::Box,
        extra: "provider = \"box\"",
        hint_has: "expired at the IdP",
        ..CASE
    })
    .await;
}

/// Providers whose refreshes answer in RFC 6749's shapes, each with its
/// documented rotation: Google, Dropbox and Cognito (rotation off, its
/// default) keep one refresh token; Atlassian and Zoom rotate on every use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc_shaped_profiles_with_their_rotation() {
    for (extra, rotate) in [
        ("provider = \"google\"", false),
        ("provider = \"dropbox\"", false),
        ("provider = \"cognito\"", false),
        (
            "provider = \"atlassian\"\nscopes = [\"offline_access\"]",
            true,
        ),
        ("provider = \"zoom\"", true),
        ("provider = \"xero\"\nscopes = [\"offline_access\"]", true),
    ] {
        run_case(Case {
            rotate,
            extra,
            hint_has: "revoked",
            ..CASE
        })
        .await;
    }
}

const SF_ROUTE: &str = r#"
[[routes]]
path_prefix = "/sf/"
upstream = "{token.instance_url}/services/data/"
credential = "user"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salesforce_instance_url_and_a_lifetime_from_introspection() {
    run_case(Case {
        salesforce: true,
        extra: "provider = \"salesforce\"\nintrospection_url = \"{introspection}\"",
        extra_routes: SF_ROUTE,
        path: "/sf/x",
        upstream_path: Some("/services/data/x"),
        hint_has: "revoked",
        ..CASE
    })
    .await;
}

/// `{token.instance_url}`: 503 `credential_unavailable` until a response
/// has sent a valid value; a value that is not an https (or loopback)
/// origin steers nothing; the value survives a restart in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_url_routes_wait_for_a_valid_value_and_survive_a_restart() {
    let stack = Stack::start(StackOpts {
        omit_expires_in: true,
        extra_routes: SF_ROUTE.to_owned(),
        ..StackOpts::default()
    })
    .await;
    let extra = "provider = \"salesforce\"\ndefault_lifetime = \"2s\"\nmax_backoff = \"1s\"";
    let c = client();

    // No value yet: 503, with the reason and no secret.
    let app = stack.app(extra).await;
    let url = format!("http://{}/sf/x", app.proxy_addr.unwrap());
    let g = get_ok(&c, &url).await;
    assert_eq!(g.status, 503, "{}", g.text());
    assert_eq!(g.json()["error"], "credential_unavailable", "{}", g.text());
    assert_eq!(g.json()["reason"], "token_field_missing", "{}", g.text());
    let refused = g.text();
    // The credential itself is fine.
    let g = get_ok(&c, &format!("http://{}/api/x", app.proxy_addr.unwrap())).await;
    assert_eq!(g.status, 200, "{}", g.text());

    // A value that would send the token elsewhere in clear: never used.
    stack
        .idp
        .set_instance_url(Some("http://upstream.example.com".into()));
    let at = stack.generation().unwrap();
    stack.wait_generation(at + 1, S(10)).await;
    let g = get_until(&c, &url, 503).await;
    assert_eq!(g.status, 503, "{}", g.text());
    assert_eq!(g.json()["reason"], "token_field_missing", "{}", g.text());

    // A valid one: used from the next rotation on.
    stack.idp.set_instance_url(Some(stack.echo.url()));
    let at = stack.generation().unwrap();
    stack.wait_generation(at + 1, S(10)).await;
    let g = get_until(&c, &url, 200).await;
    assert_eq!(g.status, 200, "{}", g.text());
    assert_eq!(g.json()["path"], "/services/data/x");
    let rec = stack.record().unwrap();
    assert_eq!(rec["token_fields"]["instance_url"], stack.echo.url());
    app.shutdown().await;

    // After a restart, responses no longer carry it: the stored value serves.
    stack.idp.set_instance_url(None);
    let app = stack.app(extra).await;
    let url = format!("http://{}/sf/x", app.proxy_addr.unwrap());
    let g = get_ok(&c, &url).await;
    assert_eq!(g.status, 200, "{}", g.text());
    let at = stack.generation().unwrap();
    stack.wait_generation(at + 1, S(10)).await;
    let g = get_until(&c, &url, 200).await;
    assert_eq!(g.status, 200, "{}", g.text());
    let st = credential_status(&c, app.admin_addr.unwrap())
        .await
        .unwrap();
    assert_no_secrets(&[st.to_string(), refused], &stack.secrets());
    stack.assert_no_reuse();
    app.shutdown().await;
}

/// GitHub: a rotation kills the previous access token at once. A request
/// that carried it while the refresh was in flight gets a 401 the client
/// never sees: it is replayed with the new token, without another refresh,
/// and twice in a row (the reactive limit is not spent on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_replays_a_401_for_a_token_the_rotation_in_flight_killed() {
    let stack = Stack::start(StackOpts {
        dialect: Dialect::Github,
        github_rotation: true,
        access_ttl: S(4),
        ..StackOpts::default()
    })
    .await;
    let app = stack.app("provider = \"github\"").await;
    let url = format!("http://{}/api/x", app.proxy_addr.unwrap());
    let c = client();
    let g = get_ok(&c, &url).await;
    assert_eq!(g.status, 200, "{}", g.text());
    for round in 0..2 {
        let grants = stack.refresh_grants();
        let hold = tokenproxy::dev::Hold::new();
        stack
            .idp
            .push_fault(tokenproxy::dev::Fault::HoldAfterProcessing(hold.clone()));
        // The proactive refresh rotates at the IdP and is held there.
        hold.reached().await;
        let unauthorized = stack.echo.unauthorized();
        let req = tokio::spawn({
            let (c, url) = (c.clone(), url.clone());
            async move { get_ok(&c, &url).await }
        });
        wait_for("the upstream refused the killed token", S(5), || async {
            (stack.echo.unauthorized() > unauthorized).then_some(())
        })
        .await;
        hold.release();
        let g = req.await.unwrap();
        assert_eq!(g.status, 200, "round {round}: {}", g.text());
        assert_eq!(g.json()["token_ok"], true);
        assert_eq!(
            stack.refresh_grants(),
            grants + 1,
            "round {round}: one refresh"
        );
    }
    stack.assert_no_reuse();
    app.shutdown().await;
}

/// A `token_type` the credential does not inject is a configuration error
/// that keeps the rotation it came with: the rotated refresh token is saved
/// (no lost rotation, no reuse), and once the IdP issues Bearer tokens again
/// a restart carries on with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unexpected_token_type_is_a_clear_error_and_keeps_the_rotation() {
    let stack = Stack::start(StackOpts::default()).await;
    let extra = "max_backoff = \"1s\"";
    let app = stack.app(extra).await;
    let c = client();
    let url = format!("http://{}/api/x", app.proxy_addr.unwrap());
    assert_eq!(get_ok(&c, &url).await.status, 200);
    let at = stack.generation().unwrap();
    stack.idp.set_token_type("mac");
    let st = wait_for("dead of token_type_unsupported", S(10), || async {
        let st = credential_status(&client(), app.admin_addr.unwrap()).await?;
        (st["last_error"]["reason"] == "token_type_unsupported").then_some(st)
    })
    .await;
    assert_eq!(st["last_error"]["outcome"], "config_error", "{st}");
    let hint = st["last_error"]["hint"].as_str().unwrap();
    assert!(
        hint.contains("\"mac\"") && hint.contains("token_types"),
        "{hint}"
    );
    // The rotation that answer carried is in the store.
    let rec = stack.record().unwrap();
    assert_eq!(rec["generation"], at + 1, "{rec}");
    assert!(rec["intent"].is_null(), "{rec}");
    assert!(rec["access_token"].is_null(), "{rec}");
    let grants = stack.refresh_grants();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(stack.refresh_grants(), grants, "retried before 5 minutes");
    assert_no_secrets(&[st.to_string()], &stack.secrets());
    app.shutdown().await;

    stack.idp.set_token_type("Bearer");
    let app = stack.app(extra).await;
    let url = format!("http://{}/api/x", app.proxy_addr.unwrap());
    let g = get_ok(&c, &url).await;
    assert_eq!(g.status, 200, "{}", g.text());
    stack.assert_no_reuse();
    app.shutdown().await;
}

/// The log lines of token-response values, from a real process: the value
/// that failed its check and the one that set the upstream are named, and
/// no token or secret appears anywhere in the output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_url_log_events_name_the_value_and_no_secret() {
    let stack = Stack::start(StackOpts {
        omit_expires_in: true,
        extra_routes: SF_ROUTE.to_owned(),
        ..StackOpts::default()
    })
    .await;
    stack
        .idp
        .set_instance_url(Some("http://upstream.example.com".into()));
    let (path, ports) = child_config(
        &stack,
        "sf",
        "provider = \"salesforce\"\ndefault_lifetime = \"2s\"",
    );
    let child = ChildProxy::start(stack.dir.path(), "sf", &path, ports).await;
    let c = client();
    let g = get_ok(&c, &child.url("/sf/x")).await;
    assert_eq!(g.status, 503, "{}", g.text());
    stack.idp.set_instance_url(Some(stack.echo.url()));
    let at = stack.generation().unwrap();
    stack.wait_generation(at + 1, S(10)).await;
    let g = get_until(&c, &child.url("/sf/x"), 200).await;
    assert_eq!(g.status, 200, "{}", g.text());
    let events = child.log_events();
    let rejected = events
        .iter()
        .find(|e| e["event"] == "token_field_rejected")
        .unwrap_or_else(|| panic!("no token_field_rejected:\n{}", child.output()));
    assert_eq!(rejected["field"], "instance_url");
    assert_eq!(rejected["level"], "ERROR");
    let set = events
        .iter()
        .find(|e| e["event"] == "upstream_from_token")
        .unwrap_or_else(|| panic!("no upstream_from_token:\n{}", child.output()));
    assert_eq!(set["upstream"], stack.echo.url());
    assert_no_secrets(&[child.output()], &stack.secrets());
}

/// The `token_refresh` line logs the lifetime the token was given and where
/// it came from: Salesforce sends no `expires_in`, so with
/// `introspection_url` it is the introspected `exp` (2 s here), never the
/// profile's or config's `default_lifetime`; without it, that default; an
/// RFC answer's own `expires_in` otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_refresh_logs_the_lifetime_actually_used() {
    for source in ["introspection", "default", "response"] {
        // A stack each: a process killed mid-refresh must not leave the
        // next one a lost rotation to judge.
        let stack = Stack::start(StackOpts {
            omit_expires_in: source != "response",
            extra_routes: SF_ROUTE.to_owned(),
            ..StackOpts::default()
        })
        .await;
        stack.idp.set_instance_url(Some(stack.echo.url()));
        let (extra, expected) = match source {
            "introspection" => (
                format!(
                    "provider = \"salesforce\"\nintrospection_url = \"{}\"",
                    stack.idp.introspection_url()
                ),
                2,
            ),
            "default" => (
                "provider = \"salesforce\"\ndefault_lifetime = \"3s\"".to_owned(),
                3,
            ),
            _ => ("default_lifetime = \"1h\"".to_owned(), 2),
        };
        let (path, ports) = child_config(&stack, "sf", &extra);
        let child = ChildProxy::start(stack.dir.path(), "sf", &path, ports).await;
        let c = client();
        let g = get_ok(&c, &child.url("/sf/x")).await;
        assert_eq!(g.status, 200, "{}", g.text());
        stack.wait_generation(2, S(10)).await;
        let logged: Vec<serde_json::Value> = child
            .log_events()
            .into_iter()
            .filter(|e| e["event"] == "token_refresh" && e["outcome"] == "ok")
            .collect();
        assert!(!logged.is_empty(), "{}", child.output());
        for e in &logged {
            let lifetime = e["expires_in"].as_u64().expect("expires_in");
            // Introspection's exp counts from the send: a second may be gone.
            assert!(
                lifetime == expected || (source == "introspection" && lifetime + 1 == expected),
                "{source}: logged expires_in {lifetime}, not {expected}: {e}"
            );
            assert_eq!(e["expires_in_source"], source, "{e}");
        }
        assert_no_secrets(&[child.output()], &stack.secrets());
        stack.assert_no_reuse();
    }
}

/// `{token.instance_url}` takes only the hosts Salesforce documents for
/// orgs (the profile's `token_field_hosts`): another https origin is
/// rejected like an invalid value (`token_field_rejected`, the grant kept,
/// the route 503 `token_field_missing`); a Salesforce host is kept and
/// shown on `/credentials`; loopback (the dev upstream) stays allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_url_outside_the_profiles_hosts_is_rejected() {
    let stack = Stack::start(StackOpts {
        omit_expires_in: true,
        extra_routes: SF_ROUTE.to_owned(),
        ..StackOpts::default()
    })
    .await;
    stack
        .idp
        .set_instance_url(Some("https://org.attacker.example".into()));
    let (path, ports) = child_config(
        &stack,
        "hosts",
        "provider = \"salesforce\"\ndefault_lifetime = \"2s\"\nmax_backoff = \"1s\"",
    );
    let child = ChildProxy::start(stack.dir.path(), "hosts", &path, ports).await;
    let c = client();
    let g = get_ok(&c, &child.url("/sf/x")).await;
    assert_eq!(g.status, 503, "{}", g.text());
    assert_eq!(g.json()["error"], "credential_unavailable", "{}", g.text());
    assert_eq!(g.json()["reason"], "token_field_missing", "{}", g.text());
    // The grant stands: other routes of the credential work.
    let g = get_ok(&c, &child.url("/api/x")).await;
    assert_eq!(g.status, 200, "{}", g.text());
    let events = child.log_events();
    let rejected = events
        .iter()
        .find(|e| e["event"] == "token_field_rejected")
        .unwrap_or_else(|| panic!("no token_field_rejected:\n{}", child.output()));
    assert_eq!(rejected["field"], "instance_url");
    assert_eq!(rejected["level"], "ERROR");
    assert!(
        rejected["error"]
            .as_str()
            .unwrap_or("")
            .contains("token_field_hosts"),
        "{rejected}"
    );
    assert!(
        stack.record().unwrap()["token_fields"]["instance_url"].is_null(),
        "a rejected value was stored"
    );

    // A host Salesforce documents: kept, stored and shown.
    stack
        .idp
        .set_instance_url(Some("https://acme.my.salesforce.com".into()));
    let at = stack.generation().unwrap();
    stack.wait_generation(at + 1, S(10)).await;
    let rec = stack.record().unwrap();
    assert_eq!(
        rec["token_fields"]["instance_url"], "https://acme.my.salesforce.com",
        "{rec}"
    );
    let st = wait_for("the value on /credentials", S(5), || async {
        let st = credential_status(&c, child.admin).await?;
        (st["token_fields"]["instance_url"] == "https://acme.my.salesforce.com").then_some(st)
    })
    .await;
    // `tokenproxy status` shows it too (a host, not a secret).
    let status = tokio::task::spawn_blocking({
        let path = path.clone();
        move || {
            run_cli(&[
                std::ffi::OsStr::new("status"),
                "-c".as_ref(),
                path.as_os_str(),
            ])
        }
    })
    .await
    .unwrap();
    assert_eq!(status.code, Some(0), "{}", status.text());
    assert!(
        status
            .stdout
            .contains("token values: instance_url=https://acme.my.salesforce.com"),
        "{}",
        status.text()
    );

    // Loopback (tests, local IdPs) stays allowed.
    stack.idp.set_instance_url(Some(stack.echo.url()));
    let at = stack.generation().unwrap();
    stack.wait_generation(at + 1, S(10)).await;
    let g = get_ok(&c, &child.url("/sf/x")).await;
    assert_eq!(g.status, 200, "{}", g.text());
    assert_eq!(g.json()["path"], "/services/data/x");
    assert_no_secrets(
        &[child.output(), st.to_string(), status.text()],
        &stack.secrets(),
    );
    stack.assert_no_reuse();
}

/// The admin status page (`GET /`) shows the token values in use on the
/// credential's row, as `/credentials` and `tokenproxy status` do; a
/// credential without any shows none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_token_values_in_use() {
    let stack = Stack::start(StackOpts {
        omit_expires_in: true,
        extra_routes: SF_ROUTE.to_owned(),
        ..StackOpts::default()
    })
    .await;
    stack
        .idp
        .set_instance_url(Some("https://eu.example.net:8443".into()));
    let app = stack
        .app("provider = \"salesforce\"\ndefault_lifetime = \"2s\"\nmax_backoff = \"1s\"\ntoken_field_hosts = [\".example.net\"]")
        .await;
    let c = client();
    let admin = app.admin_addr.unwrap();
    let st = wait_for("the value on /credentials", S(10), || async {
        let st = credential_status(&c, admin).await?;
        (st["token_fields"]["instance_url"] == "https://eu.example.net:8443").then_some(st)
    })
    .await;
    let page = get_ok(&c, &format!("http://{admin}/")).await;
    assert_eq!(page.status, 200);
    let page = page.text();
    let row = page
        .split("<tr data-credential=\"user\"")
        .nth(1)
        .and_then(|r| r.split("</tr>").next())
        .unwrap_or_else(|| panic!("no row for user: {page}"));
    assert!(
        row.contains("token values: <code>instance_url=https://eu.example.net:8443</code>"),
        "{row}"
    );
    assert_no_secrets(&[page.clone(), st.to_string()], &stack.secrets());
    app.shutdown().await;

    // Without a value in use, no such line.
    let plain = Stack::start(StackOpts::default()).await;
    let app = plain.app("").await;
    plain.wait_generation(1, S(10)).await;
    let page = get_ok(&c, &format!("http://{}/", app.admin_addr.unwrap()))
        .await
        .text();
    assert!(page.contains("data-credential=\"user\""), "{page}");
    assert!(!page.contains("token values"), "{page}");
    app.shutdown().await;
}

/// `token_field_hosts` overrides the profile's list: a leading dot takes
/// any subdomain, a bare name only itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_field_hosts_overrides_the_profiles_list() {
    let stack = Stack::start(StackOpts {
        omit_expires_in: true,
        extra_routes: SF_ROUTE.to_owned(),
        ..StackOpts::default()
    })
    .await;
    let app = stack
        .app("provider = \"salesforce\"\ndefault_lifetime = \"2s\"\nmax_backoff = \"1s\"\ntoken_field_hosts = [\".example.net\", \"api.exact.test\"]")
        .await;
    let c = client();
    let admin = app.admin_addr.unwrap();
    let url = format!("http://{}/sf/x", app.proxy_addr.unwrap());
    for (value, kept) in [
        ("https://eu.example.net", true),
        ("https://acme.my.salesforce.com", false),
        ("https://api.exact.test:8443", true),
        ("https://x.api.exact.test", false),
        ("https://example.net", false),
        ("https://evilexample.net", false),
    ] {
        stack.idp.set_instance_url(Some(value.into()));
        let at = stack.generation().unwrap_or(0);
        stack.wait_generation(at + 1, S(10)).await;
        let rec = stack.record().unwrap();
        let stored = &rec["token_fields"]["instance_url"];
        // The store is written before the proxy's own copy is swapped:
        // wait for the status to show this grant's value (or none).
        let want = if kept {
            serde_json::json!(value)
        } else {
            serde_json::Value::Null
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let st = loop {
            let st = credential_status(&c, admin).await.unwrap();
            if st["token_fields"]["instance_url"] == want || std::time::Instant::now() > deadline {
                break st;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        if kept {
            assert_eq!(stored, value, "{value}: {rec}");
            assert_eq!(st["token_fields"]["instance_url"], value, "{st}");
        } else {
            assert!(stored.is_null(), "{value} was kept: {rec}");
            assert!(
                st["token_fields"]["instance_url"].is_null(),
                "{value} in use: {st}"
            );
            let g = get_ok(&c, &url).await;
            assert_eq!(g.status, 503, "{value}: {}", g.text());
            assert_eq!(g.json()["reason"], "token_field_missing", "{}", g.text());
        }
    }
    stack.assert_no_reuse();
    app.shutdown().await;
}

/// GETs `url` until it answers `status` (the proxy swaps in a grant's token
/// values just after the store is written) or 5 s pass; the last answer.
async fn get_until(c: &HttpClient, url: &str, status: u16) -> Got {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let g = get_ok(c, url).await;
        if g.status == status || std::time::Instant::now() > deadline {
            return g;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
