//! Reactive refresh (docs/architecture.md): an upstream 401 for a token the IdP revoked
//! early costs one refresh, and the request is replayed once.

use crate::harness::{client, echoed, get_ok, json, send};
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use std::time::Duration;
use tokenproxy::app::App;
use tokenproxy::dev::{DevIdp, EchoUpstream, IdpOptions};

struct Env {
    idp: DevIdp,
    _echo: EchoUpstream,
    app: Option<App>,
    _dir: tempfile::TempDir,
}

async fn start(route_extra: &str) -> Env {
    let idp = DevIdp::start(
        "127.0.0.1:0".parse().unwrap(),
        IdpOptions {
            access_ttl: Duration::from_secs(300),
            ..IdpOptions::default()
        },
    )
    .await
    .unwrap();
    let echo = EchoUpstream::start("127.0.0.1:0".parse().unwrap(), idp.token_check())
        .await
        .unwrap();
    let seed = idp.issue_refresh_token("demo-client", "u");
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[log]
format = "json"
[credentials.user]
grant = "refresh_token"
token_url = "{}"
client_id = "demo-client"
client_secret = "demo-secret"
refresh_token = "{seed}"
[[routes]]
path_prefix = "/api/"
upstream = "{}/"
credential = "user"
{route_extra}
"#,
        idp.token_url(),
        echo.url()
    );
    let path = dir.path().join("proxy.toml");
    let cfg = tokenproxy::config::parse(&text, &path, &|_| None).unwrap();
    let app = App::start(&cfg).await.unwrap();
    Env {
        idp,
        _echo: echo,
        app: Some(app),
        _dir: dir,
    }
}

impl Env {
    async fn replays(&self) -> f64 {
        let admin = self.app.as_ref().unwrap().admin_addr.unwrap();
        let scrape = get_ok(&client(), &format!("http://{admin}/metrics"))
            .await
            .text();
        scrape
            .lines()
            .find_map(|l| l.strip_prefix(r#"tokenproxy_replays_total{route="/api/"} "#))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }

    fn url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.app.as_ref().unwrap().proxy_addr.unwrap()
        )
    }
}

fn post(uri: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(uri)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

fn bearer(report: &serde_json::Value) -> String {
    echoed(report, "authorization")[0]
        .strip_prefix("Bearer ")
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn revoked_token_costs_one_refresh_and_the_request_is_replayed() {
    let mut env = start("").await;
    let c = client();
    let (resp, body) = send(&c, post(&env.url("/api/first"), "hello")).await;
    assert_eq!(resp.status(), 200);
    let first_token = bearer(&json(&body));
    let grants_before = env.idp.grant_count("refresh_token");
    let replays_before = env.replays().await;

    env.idp.revoke_access_token(&first_token);
    // 50 concurrent POSTs, all starting with the revoked token.
    let mut tasks = Vec::new();
    for i in 0..50 {
        let c = c.clone();
        let url = env.url(&format!("/api/burst/{i}"));
        tasks.push(tokio::spawn(async move {
            send(&c, post(&url, "payload-123")).await
        }));
    }
    for t in tasks {
        let (resp, body) = t.await.unwrap();
        assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
        let report = json(&body);
        assert_eq!(report["body_len"], 11, "the replay carried the whole body");
        assert_ne!(bearer(&report), first_token);
    }
    assert_eq!(
        env.idp.grant_count("refresh_token"),
        grants_before + 1,
        "a burst of 401s costs exactly one refresh"
    );
    // Those that met the revoked token were replayed (the rest started
    // after the refresh). Other tests share the registry and the label.
    let replayed = env.replays().await - replays_before;
    assert!(
        (1.0..=50.0).contains(&replayed),
        "tokenproxy_replays_total grew by {replayed}"
    );
    assert_eq!(env.idp.reuse_count(), 0);
    env.app.take().unwrap().shutdown().await;
}

#[tokio::test]
async fn replay_off_returns_the_401_but_still_refreshes() {
    let mut env = start("replay = false").await;
    let c = client();
    let (resp, body) = send(&c, post(&env.url("/api/a"), "x")).await;
    assert_eq!(resp.status(), 200);
    env.idp.revoke_access_token(&bearer(&json(&body)));
    let (resp, _) = send(&c, post(&env.url("/api/b"), "x")).await;
    assert_eq!(
        resp.status(),
        401,
        "without replay the client sees the upstream's 401"
    );
    let (resp, _) = send(&c, post(&env.url("/api/c"), "x")).await;
    assert_eq!(
        resp.status(),
        200,
        "the next request carries the refreshed token"
    );
    assert_eq!(env.idp.reuse_count(), 0);
    env.app.take().unwrap().shutdown().await;
}

#[tokio::test]
async fn insufficient_scope_never_triggers_a_refresh() {
    let mut env = start("").await;
    let c = client();
    let (resp, _) = send(&c, post(&env.url("/api/a"), "x")).await;
    assert_eq!(resp.status(), 200);
    let grants = env.idp.grant_count("refresh_token");
    // The echo's /status/401 answers 401 without error="invalid_token"; a
    // young token is then presumed fine (wrong scope, not expiry).
    let (resp, _) = send(&c, post(&env.url("/api/status/401"), "x")).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(env.idp.grant_count("refresh_token"), grants);
    env.app.take().unwrap().shutdown().await;
}
