//! The token engine end to end: the real app against the dev IdP (strict
//! rotation, reuse detection) and the echo upstream (accepts only the IdP's
//! live tokens). Every test ends with `reuse_count() == 0`.

use crate::harness::*;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;
use tokenproxy::dev::{DevClient, Fault, IdpOptions};

const RT_SECRET: &str = "rt-secret-Zq81xK";
const CC_SECRET: &str = "cc-secret-Wm42pL";

/// Two clients: `rt-client` must use Basic, `cc-client` must use post.
fn idp_options(access_ttl: Duration) -> IdpOptions {
    let mut rt = DevClient::confidential("rt-client", RT_SECRET);
    rt.auth_method = Some("client_secret_basic".into());
    let mut cc = DevClient::confidential("cc-client", CC_SECRET);
    cc.auth_method = Some("client_secret_post".into());
    IdpOptions {
        access_ttl,
        clients: vec![rt, cc],
        ..IdpOptions::default()
    }
}

/// `rt` (refresh_token, Basic, seeded from `${RT_SEED}`) on `/rt/` and `cc`
/// (client_credentials, post) on `/cc/`, both to the echo upstream.
const BOTH: &str = r#"
[credentials.rt]
grant = "refresh_token"
token_url = "@TOKEN_URL@"
client_id = "rt-client"
client_secret = "${RT_SECRET}"
auth_method = "client_secret_basic"
refresh_token = "${RT_SEED}"

[credentials.cc]
grant = "client_credentials"
token_url = "@TOKEN_URL@"
client_id = "cc-client"
client_secret = "${CC_SECRET}"
auth_method = "client_secret_post"
scopes = ["read"]

[[routes]]
path_prefix = "/rt/"
upstream = "@ECHO@"
credential = "rt"

[[routes]]
path_prefix = "/cc/"
upstream = "@ECHO@"
credential = "cc"
"#;

/// An env with both clients, the secrets and a fresh seed for `rt-client`.
async fn env(access_ttl: Duration) -> (TestEnv, String) {
    let mut env = TestEnv::new(idp_options(access_ttl)).await;
    let seed = env.idp.issue_refresh_token("rt-client", "alice");
    env.var("RT_SECRET", RT_SECRET)
        .var("CC_SECRET", CC_SECRET)
        .var("RT_SEED", &seed);
    (env, seed)
}

/// GETs `path` through the proxy and expects the echo's 200 with a live token.
async fn ok(env: &TestEnv, path: &str) -> serde_json::Value {
    let (resp, body) = env.get(path).await;
    assert_eq!(
        resp.status(),
        200,
        "{path}: {}",
        String::from_utf8_lossy(&body)
    );
    let r = json(&body);
    assert_eq!(r["token_ok"], true, "{r}");
    r
}

#[tokio::test]
async fn both_grants_injected_with_their_auth_methods_and_status_is_secret_free() {
    let (mut env, seed) = env(Duration::from_secs(60)).await;
    env.start_with(BOTH).await;

    let rt = ok(&env, "/rt/user?x=1").await;
    assert_eq!(rt["path"], "/user");
    assert_eq!(rt["query"], "x=1");
    let cc = ok(&env, "/cc/invoices").await;
    assert_eq!(cc["path"], "/invoices");
    let rt_token = echoed_bearer(&rt);
    let cc_token = echoed_bearer(&cc);
    assert_ne!(rt_token, cc_token);

    let grants = env.idp.grants();
    let rt_grant = grants
        .iter()
        .find(|g| g.grant_type == "refresh_token")
        .expect("a refresh_token grant");
    assert_eq!(rt_grant.client_id.as_deref(), Some("rt-client"));
    assert_eq!(rt_grant.client_auth, "client_secret_basic");
    assert_eq!(rt_grant.refresh_token.as_deref(), Some(seed.as_str()));
    assert_eq!(rt_grant.outcome, "ok");
    let cc_grant = grants
        .iter()
        .find(|g| g.grant_type == "client_credentials")
        .expect("a client_credentials grant");
    assert_eq!(cc_grant.client_id.as_deref(), Some("cc-client"));
    assert_eq!(cc_grant.client_auth, "client_secret_post");
    assert_eq!(cc_grant.scope.as_deref(), Some("read"));
    assert_eq!(cc_grant.outcome, "ok");

    // Admin status: state and identity, never a secret.
    let stored_rt = env.stored("rt")["refresh_token"]
        .as_str()
        .expect("rotated refresh token stored")
        .to_owned();
    assert_ne!(stored_rt, seed, "the seed was rotated");
    let (resp, body) = env.admin_raw("/credentials").await;
    assert_eq!(resp.status(), 200);
    let text = String::from_utf8_lossy(&body).into_owned();
    for secret in [
        &rt_token, &cc_token, &seed, &stored_rt, RT_SECRET, CC_SECRET,
    ] {
        assert!(!text.contains(secret), "admin /credentials leaks a secret");
    }
    let all = json(&body);
    let rt_status = all
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["credential"] == "rt")
        .expect("rt in status");
    assert_eq!(rt_status["state"], "fresh");
    assert!(rt_status["family"].is_string(), "{rt_status}");
    assert!(rt_status["refresh_token_fp"].is_string(), "{rt_status}");
    let cc_status = env.credential("cc").await;
    assert_eq!(cc_status["state"], "fresh");

    assert_eq!(env.idp.reuse_count(), 0);
}

#[tokio::test]
async fn follows_successive_rotations_with_short_tokens() {
    let (mut env, _seed) = env(Duration::from_secs(2)).await;
    env.start_with(BOTH).await;

    let first = ok(&env, "/rt/a").await;
    let s0 = env
        .wait_credential("rt", "a family", |s| s["family"].is_string())
        .await;
    let family = s0["family"].clone();
    let g0 = s0["generation"].as_u64().expect("generation");
    let mut tokens = vec![echoed_bearer(&first)];

    // Proactive refresh at half-life: a rotation about every second.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
    loop {
        let r = ok(&env, "/rt/a").await;
        let t = echoed_bearer(&r);
        if tokens.last() != Some(&t) {
            tokens.push(t);
        }
        let s = env.credential("rt").await;
        assert_eq!(s["family"], family, "the family stays the same");
        let g = s["generation"].as_u64().expect("generation");
        if g >= g0 + 3 && tokens.len() >= 4 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} rotations in 12 s (generation {g0} -> {g})",
            g - g0
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(env.idp.grant_count("refresh_token") >= 4);
    assert_eq!(env.idp.reuse_count(), 0);
}

/// Fires `n` concurrent GETs at `path` and returns their statuses.
async fn burst(env: &TestEnv, path: &str, n: usize) -> Vec<u16> {
    let url = env.url(path);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let c = env.client.clone();
        let url = url.clone();
        set.spawn(async move {
            let (resp, body) = send(&c, get(&url)).await;
            let ok = resp.status() == 200 && json(&body)["token_ok"] == true;
            if ok {
                200
            } else {
                resp.status().as_u16()
            }
        });
    }
    let mut out = Vec::new();
    while let Some(s) = set.join_next().await {
        out.push(s.expect("request task"));
    }
    out
}

#[tokio::test]
async fn cold_start_burst_makes_exactly_one_grant_per_credential() {
    let (mut env, _seed) = env(Duration::from_secs(60)).await;
    // Slow grants, so the bursts pile up behind the first fetch.
    env.idp.push_fault(Fault::Delay(Duration::from_millis(300)));
    env.idp.push_fault(Fault::Delay(Duration::from_millis(300)));
    env.start_with(BOTH).await;

    let (rt, cc) = tokio::join!(burst(&env, "/rt/x", 200), burst(&env, "/cc/x", 200));
    let bad = |v: &[u16]| v.iter().filter(|s| **s != 200).count();
    assert_eq!(bad(&rt), 0, "refresh_token route: {rt:?}");
    assert_eq!(bad(&cc), 0, "client_credentials route: {cc:?}");
    assert_eq!(env.idp.grant_count("refresh_token"), 1);
    assert_eq!(env.idp.grant_count("client_credentials"), 1);
    assert_eq!(env.idp.grants().len(), 2, "{:?}", env.idp.grants());
    assert_eq!(env.idp.reuse_count(), 0);
}

#[tokio::test]
async fn restart_reuses_the_stored_token_and_refreshes_with_the_latest() {
    // 6 s tokens: the proactive refresh comes 3 s after issue, long after
    // the restart below and soon enough to wait for.
    let (mut env, seed) = env(Duration::from_secs(6)).await;
    env.start_with(BOTH).await;
    let first = echoed_bearer(&ok(&env, "/rt/a").await);

    let mode = std::fs::metadata(env.store_path())
        .expect("store written")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "store mode {mode:o}");
    let stored_rt = env.stored("rt")["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(stored_rt, seed);
    let status = env.credential("rt").await;

    env.stop().await;
    let grants_before = env.idp.grants().len();
    env.start().await;
    let again = ok(&env, "/rt/a").await;
    assert_eq!(echoed_bearer(&again), first, "the stored access token");
    assert_eq!(
        env.idp.grants().len(),
        grants_before,
        "no grant after a restart with a valid stored token"
    );
    let after = env.credential("rt").await;
    assert_eq!(after["family"], status["family"]);
    assert_eq!(after["generation"], status["generation"]);

    // The next (proactive) refresh presents the latest refresh token.
    wait_for("the proactive refresh", Duration::from_secs(8), || async {
        (env.idp.grant_count("refresh_token") >= 2).then_some(())
    })
    .await;
    let last = env
        .idp
        .grants()
        .into_iter()
        .rfind(|g| g.grant_type == "refresh_token")
        .unwrap();
    assert_eq!(last.outcome, "ok");
    assert_eq!(last.refresh_token.as_deref(), Some(stored_rt.as_str()));
    let rotated = env
        .wait_credential("rt", "the rotated generation", |s| {
            s["generation"] != status["generation"]
        })
        .await;
    assert_eq!(rotated["family"], status["family"]);
    assert_ne!(env.stored("rt")["refresh_token"], stored_rt.as_str());
    assert_ne!(echoed_bearer(&ok(&env, "/rt/a").await), first);
    assert_eq!(env.presented(&seed), 1);
    assert_eq!(env.idp.reuse_count(), 0);
}

#[tokio::test]
async fn consumed_seed_still_in_config_is_never_presented_again() {
    let (mut env, seed) = env(Duration::from_secs(60)).await;
    env.start_with(BOTH).await;
    ok(&env, "/rt/a").await;
    assert_eq!(env.presented(&seed), 1);

    for round in 0..2 {
        env.stop().await;
        // Drop the stored access token: the restarted app must refresh at
        // once, with the stored refresh token, never the config's seed.
        let latest = env.stored("rt")["refresh_token"]
            .as_str()
            .unwrap()
            .to_owned();
        let mut rec = env.stored("rt");
        rec["access_token"] = serde_json::Value::Null;
        rec["access_expires_at_ms"] = serde_json::Value::Null;
        env.replace_stored("rt", rec);
        env.start().await;
        ok(&env, "/rt/a").await;
        assert_eq!(env.presented(&latest), 1, "round {round}");
    }
    assert_eq!(
        env.presented(&seed),
        1,
        "the seed was presented again: {:?}",
        env.idp.grants()
    );
    assert_eq!(env.idp.grant_count("refresh_token"), 3);
    assert_eq!(env.idp.reuse_count(), 0);
}

#[tokio::test]
async fn upstream_401_invalid_token_refreshes_and_replays_once() {
    let (mut env, _seed) = env(Duration::from_secs(60)).await;
    env.start_with(BOTH).await;
    for path in ["/rt/a", "/cc/a"] {
        let before = echoed_bearer(&ok(&env, path).await);
        env.idp.revoke_access_token(&before);
        let after = ok(&env, path).await;
        assert_ne!(echoed_bearer(&after), before, "{path}: a new access token");
    }
    assert_eq!(env.idp.grant_count("refresh_token"), 2);
    assert_eq!(env.idp.grant_count("client_credentials"), 2);
    assert_eq!(env.idp.reuse_count(), 0);
}

#[tokio::test]
async fn github_style_200_error_kills_the_credential_and_answers_503() {
    let (mut env, seed) = env(Duration::from_secs(60)).await;
    env.idp.push_fault(Fault::Status {
        status: 200,
        body: r#"{"error":"bad_refresh_token","error_description":"The refresh token passed is incorrect or expired."}"#.into(),
        content_type: "application/json",
        headers: vec![],
    });
    env.start_with(
        r#"
[credentials.rt]
grant = "refresh_token"
token_url = "@TOKEN_URL@"
client_id = "rt-client"
client_secret = "${RT_SECRET}"
refresh_token = "${RT_SEED}"
refresh_wait = "1s"

[[routes]]
path_prefix = "/rt/"
upstream = "@ECHO@"
credential = "rt"
"#,
    )
    .await;

    let s = env
        .wait_credential("rt", "state dead", |s| s["state"] == "dead")
        .await;
    assert_eq!(s["last_error"]["outcome"], "invalid_grant", "{s}");
    assert!(s["last_error"]["hint"].is_string(), "{s}");
    assert!(!s.to_string().contains(&seed));

    let (resp, body) = env.get("/rt/user").await;
    assert_eq!(resp.status(), 503, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        resp.headers()["x-tokenproxy-error"],
        "credential_unavailable"
    );
    let b = json(&body);
    assert_eq!(b["error"], "credential_unavailable");
    assert_eq!(b["credential"], "rt");
    assert!(b["reason"].is_string(), "{b}");
    assert!(
        b["request_id"].is_string() || b["x-request-id"].is_string(),
        "{b}"
    );
    assert!(!String::from_utf8_lossy(&body).contains(&seed));
    assert_eq!(env.echo.requests(), 0, "never forwarded without a token");
    // Dead: no retry against the IdP.
    assert_eq!(env.idp.grants().len(), 1);
    assert_eq!(env.idp.reuse_count(), 0);
}

#[tokio::test]
async fn form_encoded_token_response_is_parsed() {
    let (mut env, _seed) = env(Duration::from_secs(60)).await;
    env.idp.push_fault(Fault::FormEncoded);
    env.idp.push_fault(Fault::FormEncoded);
    env.start_with(BOTH).await;
    ok(&env, "/rt/a").await;
    ok(&env, "/cc/a").await;
    let faults: Vec<_> = env.idp.grants().iter().map(|g| g.fault).collect();
    assert_eq!(faults, [Some("form_encoded"), Some("form_encoded")]);
    assert_eq!(env.idp.reuse_count(), 0);
}

#[tokio::test]
async fn upstream_failures_and_unknown_routes_are_proxy_errors() {
    let (mut env, _seed) = env(Duration::from_secs(60)).await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    env.start_with(&format!(
        r#"
[credentials.cc]
grant = "client_credentials"
token_url = "@TOKEN_URL@"
client_id = "cc-client"
client_secret = "${{CC_SECRET}}"
auth_method = "client_secret_post"

[[routes]]
path_prefix = "/down/"
upstream = "http://{closed}/"
credential = "cc"
connect_timeout = "1s"

[[routes]]
path_prefix = "/slow/"
upstream = "@ECHO@"
credential = "cc"
response_timeout = "300ms"
"#
    ))
    .await;

    let expect = |resp: &http::Response<()>, body: &[u8], status: u16, code: &str| {
        assert_eq!(resp.status(), status, "{}", String::from_utf8_lossy(body));
        assert_eq!(resp.headers()["x-tokenproxy-error"], code);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        let b = json(body);
        assert_eq!(b["error"], code);
        let rid = resp.headers()["x-request-id"].to_str().unwrap();
        assert!(body.windows(rid.len()).any(|w| w == rid.as_bytes()));
    };

    let (resp, body) = env.get("/down/x").await;
    expect(&resp, &body, 502, "upstream_unreachable");

    let started = tokio::time::Instant::now();
    let (resp, body) = env.get("/slow/delay/2000").await;
    expect(&resp, &body, 504, "upstream_timeout");
    assert!(started.elapsed() < Duration::from_millis(1500));

    let (resp, body) = env.get("/nowhere/x").await;
    expect(&resp, &body, 404, "no_route");
    assert_eq!(env.idp.reuse_count(), 0);
}

#[tokio::test]
async fn port_zero_for_both_listeners_is_accepted() {
    let text = "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    let cfg = tokenproxy::config::parse(text, std::path::Path::new("t.toml"), &|_| None);
    assert!(cfg.is_ok(), "{}", cfg.err().unwrap());
}
