//! Operations: metrics after known traffic, readiness vs. a dead credential
//! and a broken store, secret files reloading a credential, no token on any
//! admin page, the admin token off loopback, POST-only mutations, and the
//! binary's lifecycle (SIGTERM drain, SIGHUP reload) as a child process.
//!
//! The metrics registry is process-wide: every test here uses its own route
//! and credential names, so series never collide with other tests.

use crate::harness::*;
use crate::harness::{self, ChildProxy, Stack, StackOpts};
use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use std::time::Duration;
use tokenproxy::dev::{DevClient, IdpOptions};

const SECRET: &str = "demo-secret";

/// One healthy credential `<p>ok` on `/<p>-ok/` and (when `dead`) one
/// seeded with a token the IdP never issued, `<p>dead` on `/<p>-dead/`.
/// Seeds are literal: a reload re-reads the file, and `${VAR}` would come
/// from the process environment, not from `TestEnv::vars`.
fn snippet(p: &str, seed: &str, dead: bool) -> String {
    let mut s = format!(
        r#"
[credentials.{p}ok]
grant = "refresh_token"
token_url = "@TOKEN_URL@"
client_id = "demo-client"
client_secret = "{SECRET}"
refresh_token = "{seed}"

[[routes]]
path_prefix = "/{p}-ok/"
upstream = "@ECHO@"
credential = "{p}ok"
"#
    );
    if dead {
        s.push_str(&format!(
            r#"
[credentials.{p}dead]
grant = "refresh_token"
token_url = "@TOKEN_URL@"
client_id = "dead-client"
client_secret = "{SECRET}"
refresh_token = "rt_never_issued_{p}"

[[routes]]
path_prefix = "/{p}-dead/"
upstream = "@ECHO@"
credential = "{p}dead"
"#
        ));
    }
    s
}

/// The env, configured (not started); `admin_token` goes into `[admin]`.
async fn env_with(p: &str, dead: bool, admin_token: Option<&str>) -> TestEnv {
    let mut env = TestEnv::new(IdpOptions {
        access_ttl: Duration::from_secs(60),
        clients: vec![
            DevClient::confidential("demo-client", SECRET),
            DevClient::confidential("dead-client", SECRET),
        ],
        ..IdpOptions::default()
    })
    .await;
    let seed = env.idp.issue_refresh_token("demo-client", "ops");
    env.var("SEED", &seed);
    env.configure(&snippet(p, &seed, dead));
    if let Some(t) = admin_token {
        let text = std::fs::read_to_string(env.config_path())
            .unwrap()
            .replacen("[admin]\n", &format!("[admin]\ntoken = \"{t}\"\n"), 1);
        std::fs::write(env.config_path(), &text).unwrap();
        env.config = Some(tokenproxy::config::load(&env.config_path()).expect("config"));
    }
    env
}

async fn admin_text(env: &TestEnv, path: &str) -> (u16, String) {
    let (resp, body) = env.admin_raw(path).await;
    (
        resp.status().as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// The value of one exact series (`name{labels}`) in a scrape.
fn series(scrape: &str, key: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

#[tokio::test]
async fn metrics_count_known_traffic() {
    let mut env = env_with("opsm", false, None).await;
    env.start().await;
    for _ in 0..3 {
        let (resp, body) = env.get("/opsm-ok/x").await;
        assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    }
    let (resp, _) = env.get("/opsm-ok/status/404").await;
    assert_eq!(resp.status(), 404);

    let (status, m) = admin_text(&env, "/metrics").await;
    assert_eq!(status, 200);
    let v = |k: &str| series(&m, k).unwrap_or_else(|| panic!("no series {k} in:\n{m}"));
    assert_eq!(
        v(r#"tokenproxy_requests_total{route="/opsm-ok/",status="200"}"#),
        3.0
    );
    assert_eq!(
        v(r#"tokenproxy_requests_total{route="/opsm-ok/",status="404"}"#),
        1.0
    );
    assert_eq!(
        v(r#"tokenproxy_token_refresh_total{credential="opsmok",outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        v(r#"tokenproxy_credential_state{credential="opsmok",state="fresh"}"#),
        1.0
    );
    assert_eq!(
        v(r#"tokenproxy_credential_state{credential="opsmok",state="dead"}"#),
        0.0
    );
    assert_eq!(
        v(r#"tokenproxy_upstream_401_total{route="/opsm-ok/"}"#),
        0.0
    );
    assert_eq!(
        v(r#"tokenproxy_request_duration_seconds_count{route="/opsm-ok/"}"#),
        4.0
    );
    assert_eq!(
        v(r#"tokenproxy_token_refresh_duration_seconds_count{credential="opsmok"}"#),
        1.0
    );
    let expires = v(r#"tokenproxy_token_expires_in_seconds{credential="opsmok"}"#);
    assert!((1.0..=60.0).contains(&expires), "expires_in {expires}");
    assert!(v(r#"tokenproxy_token_last_success_timestamp_seconds{credential="opsmok"}"#) > 1e9);
    assert!(v(r#"tokenproxy_credential_state_since_timestamp_seconds{credential="opsmok"}"#) > 1e9);
    assert!(m.contains("tokenproxy_store_write_failures_total"), "{m}");
    // Without `Accept: application/openmetrics-text`, the classic format.
    assert!(
        m.contains("# TYPE tokenproxy_store_write_failures_total counter") && !m.contains("# EOF"),
        "{m}"
    );

    // An upstream 401 with a live token: counted once, answered 401.
    let (resp, _) = env.get("/opsm-ok/status/401").await;
    assert_eq!(resp.status(), 401);
    let (_, m) = admin_text(&env, "/metrics").await;
    let v = |k: &str| series(&m, k).unwrap_or_else(|| panic!("no series {k} in:\n{m}"));
    assert_eq!(
        v(r#"tokenproxy_upstream_401_total{route="/opsm-ok/"}"#),
        1.0
    );
    assert_eq!(
        v(r#"tokenproxy_requests_total{route="/opsm-ok/",status="401"}"#),
        1.0
    );
    assert_eq!(
        v(r#"tokenproxy_requests_total{route="/opsm-ok/",status="200"}"#),
        3.0
    );
    assert_eq!(env.idp.reuse_count(), 0);
}

#[tokio::test]
async fn readyz_ignores_a_dead_credential_but_not_a_broken_store() {
    let mut env = env_with("opsr", true, None).await;
    env.start().await;
    let (resp, _) = env.get("/opsr-ok/x").await;
    assert_eq!(resp.status(), 200);
    let (resp, body) = env.get("/opsr-dead/x").await;
    assert_eq!(resp.status(), 503, "{}", String::from_utf8_lossy(&body));

    // Every view shows the dead credential at once, without waiting.
    let dead = env.credential("opsrdead").await;
    assert_eq!(dead["state"], "dead", "{dead}");
    assert_eq!(dead["last_error"]["outcome"], "invalid_grant", "{dead}");
    assert!(dead["last_error"]["hint"]
        .as_str()
        .is_some_and(|h| !h.is_empty()));
    assert!(dead["state_since"].as_u64().is_some(), "{dead}");
    assert_eq!(env.credential("opsrok").await["state"], "fresh");
    let (status, page) = admin_text(&env, "/").await;
    assert_eq!(status, 200);
    assert!(
        page.contains(r#"data-credential="opsrdead" data-state="dead""#),
        "{page}"
    );
    assert!(
        page.contains(r#"href="/login/opsrdead">log in</a>"#),
        "{page}"
    );
    assert!(page.contains(r#"data-credential="opsrok" data-state="fresh""#));
    assert!(
        !page.contains(r#"href="/login/opsrok""#),
        "no login link when healthy"
    );
    assert!(page.contains(r#"data-route="/opsr-dead/""#));
    let (_, m) = admin_text(&env, "/metrics").await;
    assert_eq!(
        series(
            &m,
            r#"tokenproxy_credential_state{credential="opsrdead",state="dead"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        series(
            &m,
            r#"tokenproxy_credential_state{credential="opsrdead",state="fresh"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        series(
            &m,
            r#"tokenproxy_token_refresh_total{credential="opsrdead",outcome="invalid_grant"}"#
        ),
        Some(1.0),
        "{m}"
    );

    // A dead credential does not take the pod out of service.
    assert_eq!(admin_text(&env, "/readyz").await.0, 200);

    // A store that cannot be read does.
    let store = env.store_path();
    let saved = std::fs::read(&store).expect("store written");
    std::fs::write(&store, b"{ not json").unwrap();
    let (status, body) = admin_text(&env, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("store_unavailable"), "{body}");
    std::fs::remove_file(&store).unwrap();
    std::fs::create_dir(&store).unwrap();
    assert_eq!(admin_text(&env, "/readyz").await.0, 503);
    std::fs::remove_dir(&store).unwrap();
    std::fs::write(&store, &saved).unwrap();
    assert_eq!(admin_text(&env, "/readyz").await.0, 200);
    assert_eq!(admin_text(&env, "/healthz").await.0, 200);
}

#[tokio::test]
async fn a_changed_client_secret_file_reloads_the_credential() {
    let mut env = TestEnv::new(IdpOptions::default()).await;
    let seed = env.idp.issue_refresh_token("demo-client", "ops");
    let secret_file = env.dir.path().join("client-secret");
    // A wrong secret of another length (the watcher compares mtime and size).
    std::fs::write(&secret_file, "wrong-secret-value\n").unwrap();
    env.start_with(&format!(
        r#"
[credentials.opsf]
grant = "refresh_token"
token_url = "@TOKEN_URL@"
client_id = "demo-client"
client_secret_file = "{}"
refresh_token = "{seed}"

[[routes]]
path_prefix = "/opsf/"
upstream = "@ECHO@"
credential = "opsf"
"#,
        secret_file.display(),
    ))
    .await;
    let (resp, _) = env.get("/opsf/x").await;
    assert_eq!(resp.status(), 503);
    let s = env.credential("opsf").await;
    assert_eq!(s["state"], "dead", "{s}");
    assert_eq!(s["last_error"]["outcome"], "config_error", "{s}");

    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    wait_for(
        "the credential to recover",
        Duration::from_secs(6),
        || async {
            let (resp, _) = env.get("/opsf/x").await;
            (resp.status() == 200).then_some(())
        },
    )
    .await;
    let s = env.credential("opsf").await;
    assert_eq!(s["state"], "fresh", "{s}");
    assert_eq!(env.idp.reuse_count(), 0);
}

#[tokio::test]
async fn admin_pages_never_show_a_token() {
    let mut env = env_with("opst", true, None).await;
    env.start().await;
    let (resp, body) = env.get("/opst-ok/x").await;
    assert_eq!(resp.status(), 200);
    let bearer = echoed_bearer(&json(&body));
    let _ = env.get("/opst-dead/x").await;
    let rec = env.stored("opstok");
    let mut tokens = vec![bearer, SECRET.to_owned()];
    for k in ["access_token", "refresh_token"] {
        tokens.push(
            rec[k]
                .as_str()
                .unwrap_or_else(|| panic!("{k} in {rec}"))
                .to_owned(),
        );
    }
    for g in env.idp.grants() {
        tokens.extend(g.refresh_token);
    }
    for path in [
        "/",
        "/credentials",
        "/credentials/opstok",
        "/credentials/opstdead",
        "/metrics",
    ] {
        let (status, text) = admin_text(&env, path).await;
        assert_eq!(status, 200, "{path}: {text}");
        for t in &tokens {
            assert!(
                !text.contains(t.as_str()),
                "{path} shows a token or secret ({}...)",
                &t[..4]
            );
        }
    }
    // The fingerprint is there instead.
    let s = env.credential("opstok").await;
    assert_eq!(s["refresh_token_fp"].as_str().map(str::len), Some(8), "{s}");
}

fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut b = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap()
}

async fn call(
    live: &tokenproxy::app::Live,
    loopback: bool,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Bytes) {
    let resp = tokenproxy::admin::handle(req(method, path, headers), live, loopback).await;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, body)
}

#[tokio::test]
async fn admin_token_off_loopback_and_post_only_mutations() {
    let mut env = env_with("opsa", false, Some("admin-tok-7Hq2")).await;
    env.start().await;
    let _ = env.get("/opsa-ok/x").await;
    let live = env.app().live.clone();
    let good = [("authorization", "Bearer admin-tok-7Hq2")];
    let wrong = [("authorization", "Bearer admin-tok-7Hq3")];

    // Off loopback: probes and Prometheus need no token...
    for p in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(call(&live, false, "GET", p, &[]).await.0, 200, "{p}");
    }
    // ...everything else does.
    for p in ["/", "/credentials", "/credentials/opsaok"] {
        assert_eq!(call(&live, false, "GET", p, &[]).await.0, 401, "{p}");
        assert_eq!(call(&live, false, "GET", p, &wrong).await.0, 401, "{p}");
        assert_eq!(call(&live, false, "GET", p, &good).await.0, 200, "{p}");
    }
    // A rebinding Host is refused; the pod IP with the token is not.
    let foreign = [("host", "evil.example:9901"), good[0]];
    assert_eq!(
        call(&live, false, "GET", "/credentials", &foreign).await.0,
        421
    );
    let pod_ip = [("host", "10.0.3.7:9901"), good[0]];
    assert_eq!(
        call(&live, false, "GET", "/credentials", &pod_ip).await.0,
        200
    );
    let pod_ip = [("host", "10.0.3.7:9901")];
    assert_eq!(
        call(&live, true, "GET", "/credentials", &pod_ip).await.0,
        421
    );
    // The custom header alone does not replace the token off loopback.
    let hdr = [("x-tokenproxy-admin", "1")];
    assert_eq!(call(&live, false, "POST", "/reload", &hdr).await.0, 401);
    assert_eq!(call(&live, false, "POST", "/reload", &good).await.0, 200);

    // On loopback: a POST needs the header (or the token)...
    assert_eq!(call(&live, true, "POST", "/reload", &[]).await.0, 403);
    let grants = env.idp.grants().len();
    assert_eq!(
        call(&live, true, "POST", "/credentials/opsaok/refresh", &[])
            .await
            .0,
        403
    );
    assert_eq!(
        env.idp.grants().len(),
        grants,
        "a refused POST refreshes nothing"
    );
    // ...and a GET is never a mutation.
    let (status, _) = call(&live, true, "GET", "/credentials/opsaok/refresh", &hdr).await;
    assert!(status >= 400, "GET refresh answered {status}");
    assert_eq!(call(&live, true, "GET", "/reload", &hdr).await.0, 404);
    assert_eq!(env.idp.grants().len(), grants, "a GET refreshes nothing");
    let (status, body) = call(&live, true, "POST", "/credentials/opsaok/refresh", &hdr).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(env.idp.grants().len(), grants + 1);
    // Over the socket too (loopback peer).
    let (resp, _) = send(
        &env.client,
        Request::post(env.admin_url("/reload"))
            .body(Default::default())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 403);
    assert_eq!(env.idp.reuse_count(), 0);
}

// ---------------------------------------------------------------------------
// The binary as a child process.
// ---------------------------------------------------------------------------

fn signal(child: &ChildProxy, sig: &str) {
    let st = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &child.child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{sig}");
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits_0() {
    let stack = Stack::start(StackOpts {
        access_ttl: Duration::from_secs(60),
        ..StackOpts::default()
    })
    .await;
    let (path, ports) = harness::child_config(&stack, "term", "");
    let mut child = ChildProxy::start(stack.dir.path(), "term", &path, ports).await;
    let c = harness::client();
    // Warm up: a token, and a pooled connection.
    assert_eq!(harness::get_ok(&c, &child.url("/api/x")).await.status, 200);

    let slow = {
        let c = c.clone();
        let url = child.url("/api/delay/1500");
        tokio::spawn(async move { harness::try_get(&c, &url).await })
    };
    // The slow request reaches the upstream (its connection is open).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!slow.is_finished());
    signal(&child, "TERM");

    // New connections are refused while the slow one drains.
    let proxy = child.proxy;
    harness::wait_for("the listener to close", Duration::from_secs(1), || async {
        tokio::net::TcpStream::connect(proxy)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    let got = slow
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(got.status, 200, "{}", got.text());

    let code = harness::wait_for("the process to exit", Duration::from_secs(10), || {
        let st = child.child.try_wait().unwrap();
        async move { st }
    })
    .await;
    assert_eq!(code.code(), Some(0), "{}", child.output());
    stack.assert_no_reuse();
}

#[tokio::test]
async fn sighup_applies_a_changed_route_and_keeps_the_old_config_when_broken() {
    let stack = Stack::start(StackOpts {
        access_ttl: Duration::from_secs(60),
        ..StackOpts::default()
    })
    .await;
    let (path, ports) = harness::child_config(&stack, "hup", "");
    let child = ChildProxy::start(stack.dir.path(), "hup", &path, ports).await;
    let c = harness::client();
    assert_eq!(harness::get_ok(&c, &child.url("/api/x")).await.status, 200);

    // Same length and the old mtime: the file watcher cannot see the change,
    // so only SIGHUP can apply it.
    let text = std::fs::read_to_string(&path).unwrap();
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let changed = text.replace("path_prefix = \"/api/\"", "path_prefix = \"/apx/\"");
    assert_ne!(changed, text);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::io::Write::write_all(&mut &f, changed.as_bytes()).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    signal(&child, "HUP");
    harness::wait_for("the new route", Duration::from_secs(3), || async {
        let got = harness::try_get(&c, &child.url("/apx/x")).await.ok()?;
        (got.status == 200).then_some(())
    })
    .await;
    let old = harness::get_ok(&c, &child.url("/api/x")).await;
    assert_eq!(old.status, 404, "{}", old.text());
    assert_eq!(old.json()["error"], "no_route");

    // A broken config: rejected, logged, the running one kept.
    std::fs::write(&path, "[server\nlisten = ").unwrap();
    signal(&child, "HUP");
    let event = harness::wait_for("reload_rejected logged", Duration::from_secs(3), || {
        let e = child
            .log_events()
            .into_iter()
            .find(|e| e["event"] == "reload_rejected");
        async move { e }
    })
    .await;
    assert_eq!(event["level"], "ERROR", "{event}");
    assert!(
        event["errors"]
            .as_str()
            .is_some_and(|e| e.contains("hup.toml:1:")),
        "the error names where: {event}"
    );
    assert_eq!(harness::get_ok(&c, &child.url("/apx/x")).await.status, 200);
    assert_eq!(harness::get_ok(&c, &child.url("/api/x")).await.status, 404);
    let health = harness::get_ok(&c, &format!("http://{}/healthz", child.admin)).await;
    assert_eq!(health.status, 200);
    stack.assert_no_reuse();
}

/// `log.access = true`: one info line per request, path without its query.
#[tokio::test]
async fn access_log_lines_name_the_request_but_never_the_query() {
    use crate::harness::{client, free_port, get_ok, ChildProxy, Stack, StackOpts};
    let stack = Stack::start(StackOpts::default()).await;
    let ports = (free_port(), free_port());
    let text = stack
        .toml(ports.0, ports.1, "")
        .replace("level = \"info\"", "level = \"info\"\naccess = true");
    let path = stack.dir.path().join("access.toml");
    std::fs::write(&path, text).unwrap();
    let proxy = ChildProxy::start(stack.dir.path(), "access", &path, ports).await;
    let c = client();
    get_ok(&c, &proxy.url("/api/hello?access_token=query-secret")).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let line = loop {
        let found = proxy
            .log_events()
            .into_iter()
            .find(|e| e["event"] == "access");
        if let Some(l) = found {
            break l;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no access line: {}",
            proxy.output()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(line["path"], "/api/hello");
    assert_eq!(line["route"], "/api/");
    assert_eq!(line["status"], 200);
    assert_eq!(line["method"], "GET");
    assert!(line["request_id"].as_str().is_some_and(|r| !r.is_empty()));
    assert!(!proxy.output().contains("query-secret"));
}

/// A refresh a request causes is logged with that request's id
/// (`request_id` wherever a request caused the event).
#[tokio::test]
async fn a_refresh_caused_by_a_request_carries_its_request_id() {
    use crate::harness::{client, free_port, get_ok, ChildProxy, Stack, StackOpts};
    use http_body_util::{BodyExt, Full};
    let stack = Stack::start(StackOpts {
        access_ttl: std::time::Duration::from_secs(120),
        ..StackOpts::default()
    })
    .await;
    let ports = (free_port(), free_port());
    let path = stack.dir.path().join("rid.toml");
    std::fs::write(&path, stack.toml(ports.0, ports.1, "")).unwrap();
    let proxy = ChildProxy::start(stack.dir.path(), "rid", &path, ports).await;
    let c = client();
    let first = get_ok(&c, &proxy.url("/api/first")).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let token = first.json()["headers"]["authorization"][0]
        .as_str()
        .unwrap()
        .trim_start_matches("Bearer ")
        .to_owned();
    // The upstream now rejects it: the next request causes a refresh.
    stack.idp.revoke_access_token(&token);
    let req = http::Request::get(proxy.url("/api/second"))
        .header("x-request-id", "rid-caused-it-42")
        .body(Full::default())
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let caused: Vec<_> = proxy
            .log_events()
            .into_iter()
            .filter(|e| e["event"] == "token_refresh" && e["request_id"] == "rid-caused-it-42")
            .collect();
        if let Some(e) = caused.first() {
            assert_eq!(e["outcome"], "ok");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no token_refresh with the request id: {}",
            proxy.output()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    stack.assert_no_reuse();
}

/// An IdP that says when the refresh token itself expires
/// (`refresh_token_expires_in`): the time left is a gauge, for the
/// `TokenproxyRefreshTokenExpiringSoon` alert; a credential without it has
/// no series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_token_lifetime_is_a_gauge_when_the_idp_sends_it() {
    use crate::harness::{client, get_ok, wait_for};
    let idp = tokenproxy::dev::DevIdp::start(
        "127.0.0.1:0".parse().unwrap(),
        tokenproxy::dev::IdpOptions {
            refresh_ttl: Some(Duration::from_secs(5 * 86_400)),
            clients: vec![tokenproxy::dev::DevClient::confidential(
                crate::harness::CLIENT_ID,
                crate::harness::CLIENT_SECRET,
            )],
            ..tokenproxy::dev::IdpOptions::default()
        },
    )
    .await
    .unwrap();
    let seed = idp.issue_refresh_token(crate::harness::CLIENT_ID, "alice");
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[store]\npath = \"{}\"\n\
         [credentials.user]\ngrant = \"refresh_token\"\ntoken_url = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\nrefresh_token = \"{seed}\"\n\
         [[routes]]\npath_prefix = \"/api/\"\nupstream = \"http://127.0.0.1:9/\"\ncredential = \"user\"\n",
        dir.path().join("tokens.json").display(),
        idp.token_url(),
        crate::harness::CLIENT_ID,
        crate::harness::CLIENT_SECRET,
    );
    let cfg = tokenproxy::config::parse(&text, &dir.path().join("proxy.toml"), &|_| None).unwrap();
    let app = tokenproxy::app::App::start(&cfg).await.unwrap();
    let url = format!("http://{}/metrics", app.admin_addr.unwrap());
    let line = wait_for("the gauge", Duration::from_secs(10), || async {
        get_ok(&client(), &url)
            .await
            .text()
            .lines()
            .find(|l| {
                l.starts_with("tokenproxy_refresh_token_expires_in_seconds{credential=\"user\"}")
            })
            .map(str::to_owned)
    })
    .await;
    let left: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(left > 4.9 * 86_400.0 && left <= 5.0 * 86_400.0, "{line}");
    app.shutdown().await;
}
