//! DPoP (RFC 9449, docs/dpop.md) over real sockets: tokens bound to a
//! generated key kept in the store (the same key after a kill -9 restart)
//! or to `dpop_key`; the token endpoint's and the upstream's nonces, each
//! costing one retry; refusals with their messages; no key, proof or token
//! in logs, metrics or status.

use crate::harness::*;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use std::time::Duration;

const S: fn(u64) -> Duration = Duration::from_secs;

fn dpop_stack_echo(stack: &Stack) {
    stack.echo.set_dpop(stack.idp.dpop_binding());
}

/// The last successful refresh grant's proof key at the IdP.
fn last_ok_jkt(stack: &Stack) -> Option<String> {
    stack
        .idp
        .grants()
        .into_iter()
        .rev()
        .find(|g| g.grant_type == "refresh_token" && g.outcome == "ok")
        .and_then(|g| g.dpop_jkt)
}

async fn metrics(c: &HttpClient, admin: std::net::SocketAddr) -> String {
    get_ok(c, &format!("http://{admin}/metrics")).await.text()
}

fn metric(scrape: &str, prefix: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// What the echo saw: the scheme-prefixed token and the proof.
fn echoed_dpop(report: &serde_json::Value) -> (String, String) {
    let auth = echoed(report, "authorization")[0].to_owned();
    let proof = echoed(report, "dpop")
        .first()
        .unwrap_or_else(|| panic!("no DPoP proof echoed: {report}"))
        .to_string();
    (auth, proof)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_key_is_kept_in_the_store_and_survives_a_restart() {
    let stack = Stack::start(StackOpts::default()).await;
    dpop_stack_echo(&stack);
    let (path, ports) = child_config(&stack, "dpop", "dpop = true");
    let mut first = ChildProxy::start(stack.dir.path(), "run1", &path, ports).await;
    let c = client();
    let got = get_ok(&c, &first.url("/api/items?page=2")).await;
    assert_eq!(got.status, 200, "{} {}", got.text(), first.output());
    let (auth, proof) = echoed_dpop(&got.json());
    assert!(auth.starts_with("DPoP "), "{auth}");
    let rec = stack.record().expect("a record");
    let stored_key = rec["dpop_key"]
        .as_str()
        .expect("the key is stored")
        .to_owned();
    let jkt = last_ok_jkt(&stack).expect("the grant carried a proof");
    let token = auth.trim_start_matches("DPoP ").to_owned();
    assert_eq!(
        stack.idp.access_token_jkt(&token).as_deref(),
        Some(jkt.as_str())
    );

    // Rotations keep proving with the same key.
    stack.wait_generation(2, S(10)).await;
    assert_eq!(last_ok_jkt(&stack).as_deref(), Some(jkt.as_str()));
    first.kill9();

    // kill -9, restart: the stored key proves the next refresh.
    let generation = stack.generation().unwrap();
    let second = ChildProxy::start(stack.dir.path(), "run2", &path, ports).await;
    stack.wait_generation(generation + 1, S(10)).await;
    assert_eq!(
        last_ok_jkt(&stack).as_deref(),
        Some(jkt.as_str()),
        "the restarted process presents the same key"
    );
    let got = get_ok(&c, &second.url("/api/after-restart")).await;
    assert_eq!(got.status, 200, "{}", got.text());
    let (_, proof2) = echoed_dpop(&got.json());
    stack.assert_no_reuse();

    // No key, proof or token in logs, metrics or status.
    let scrape = metrics(&c, second.admin).await;
    let status = credential_status(&c, second.admin)
        .await
        .unwrap()
        .to_string();
    let all = get_ok(&c, &format!("http://{}/", second.admin))
        .await
        .text();
    let mut secrets = stack.secrets();
    secrets.extend([stored_key, proof, proof2, token]);
    assert_no_secrets(
        &[first.output(), second.output(), scrape, status, all],
        &secrets,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_dpop_key_binds_the_tokens() {
    let stack = Stack::start(StackOpts::default()).await;
    dpop_stack_echo(&stack);
    let key_path = stack.dir.path().join("dpop.key");
    let pem = include_str!("../../src/dev/testdata/dpop-ed25519.key");
    std::fs::write(&key_path, pem).unwrap();
    let want = tokenproxy::dpop::DpopKey::from_pem(pem.as_bytes()).unwrap();
    let app = stack
        .app(&format!(
            "dpop = true\ndpop_key = \"{}\"",
            key_path.display()
        ))
        .await;
    let c = client();
    let got = get_ok(&c, &format!("http://{}/api/x", app.proxy_addr.unwrap())).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(last_ok_jkt(&stack).as_deref(), Some(want.thumbprint()));
    let rec = stack.record().unwrap();
    assert!(
        rec.get("dpop_key").is_none(),
        "a configured key is not stored: {rec}"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_nonce_costs_one_retry_and_no_lost_rotation() {
    let stack = Stack::start(StackOpts::default()).await;
    dpop_stack_echo(&stack);
    stack.idp.set_dpop_nonce(Some("idp-nonce-1"));
    let (path, ports) = child_config(&stack, "nonce", "dpop = true");
    let proxy = ChildProxy::start(stack.dir.path(), "run", &path, ports).await;
    let c = client();
    let got = get_ok(&c, &proxy.url("/api/x")).await;
    assert_eq!(got.status, 200, "{} {}", got.text(), proxy.output());
    let outcomes = |stack: &Stack| -> Vec<String> {
        stack
            .idp
            .grants()
            .into_iter()
            .filter(|g| g.grant_type == "refresh_token")
            .map(|g| g.outcome)
            .collect()
    };
    assert_eq!(
        outcomes(&stack),
        ["use_dpop_nonce", "ok"],
        "exactly one retry"
    );

    // A new nonce at the next rotation: again one retry, the same token.
    stack.idp.set_dpop_nonce(Some("idp-nonce-2"));
    stack.wait_generation(2, S(10)).await;
    let o = outcomes(&stack);
    assert_eq!(&o[2..4], ["use_dpop_nonce", "ok"], "{o:?}");
    let presented = stack.presented();
    assert_eq!(
        presented[2], presented[3],
        "the retry presents the same token"
    );
    stack.assert_no_reuse();
    let st = credential_status(&c, proxy.admin).await.unwrap();
    // 2-second tokens: it may be refreshing again right now.
    assert!(
        st["state"] == "fresh" || st["state"] == "refreshing",
        "{st}"
    );
    let events = proxy.log_events();
    assert!(
        !events
            .iter()
            .any(|e| e["outcome"] == "lost_rotation" || e["reason"] == "lost_rotation"),
        "a nonce refusal is not a lost rotation"
    );
    let refreshes: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["event"] == "token_refresh")
        .collect();
    assert!(
        refreshes
            .iter()
            .all(|e| e["outcome"] == "ok" && e["attempt"] == 1),
        "the nonce retry is inside one attempt, not a failed one: {refreshes:?}"
    );
}

fn post(uri: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(uri)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_nonce_replays_a_buffered_body_and_counts_a_streamed_one() {
    let stack = Stack::start(StackOpts {
        access_ttl: S(300),
        ..StackOpts::default()
    })
    .await;
    dpop_stack_echo(&stack);
    let app = stack.app("dpop = true").await;
    let proxy = app.proxy_addr.unwrap();
    let admin = app.admin_addr.unwrap();
    let c = client();
    let unreplayed = r#"tokenproxy_dpop_nonce_unreplayed_total{route="/api/"} "#;

    stack.echo.set_dpop_nonce(Some("rs-1"));
    let (resp, body) = send(&c, post(&format!("http://{proxy}/api/buffered"), "hello")).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["body_len"], 5, "the body went again");
    assert_eq!(stack.echo.nonce_challenges(), 1);
    assert_eq!(metric(&metrics(&c, admin).await, unreplayed), 0.0);

    // The nonce is kept: no challenge for the next request.
    let got = get_ok(&c, &format!("http://{proxy}/api/again")).await;
    assert_eq!(got.status, 200);
    assert_eq!(stack.echo.nonce_challenges(), 1);

    // A chunked body cannot be sent twice: the 401 goes back, counted.
    stack.echo.set_dpop_nonce(Some("rs-2"));
    let head = raw(
        proxy,
        "POST /api/streamed HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("use_dpop_nonce"),
        "{head}"
    );
    assert_eq!(metric(&metrics(&c, admin).await, unreplayed), 1.0);
    // ...and the nonce it brought serves the next request.
    let (resp, _) = send(&c, post(&format!("http://{proxy}/api/later"), "x")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(stack.echo.nonce_challenges(), 2);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_their_messages() {
    // Another key for a bound refresh token: invalid_grant, dead, said so.
    let stack = Stack::start(StackOpts::default()).await;
    dpop_stack_echo(&stack);
    let (path, ports) = child_config(&stack, "wrongkey", "dpop = true");
    let proxy = ChildProxy::start(stack.dir.path(), "wrongkey", &path, ports).await;
    let c = client();
    let got = get_ok(&c, &proxy.url("/api/x")).await;
    assert_eq!(got.status, 200, "{}", got.text());
    // The echo refuses a replayed proof, with its message.
    let (auth, proof) = echoed_dpop(&got.json());
    let replay = Request::get(format!("{}/x", stack.echo.url()))
        .header("authorization", &auth)
        .header("dpop", &proof)
        .body(Full::default())
        .unwrap();
    let (resp, _) = send(&c, replay).await;
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"].to_str().unwrap();
    assert!(challenge.contains("jti replayed"), "{challenge}");

    let mut rec = stack.record().unwrap();
    let (_, other) = tokenproxy::dpop::DpopKey::generate().unwrap();
    rec["dpop_key"] = serde_json::json!(other.expose());
    rec["access_token"] = serde_json::Value::Null;
    stack.write_record(rec);
    let st = wait_state(&c, proxy.admin, "dead", S(15)).await;
    assert_eq!(st["last_error"]["reason"], "invalid_grant", "{st}");
    let events = proxy.log_events();
    assert!(
        events.iter().any(|e| e["event"] == "token_refresh"
            && e["error_description"]
                .as_str()
                .is_some_and(|d| d.contains("another key"))),
        "{}",
        proxy.output()
    );
    stack.assert_no_reuse();
    drop(proxy);

    // A proof for another URL than the IdP sees (token_url spelt with
    // localhost, the IdP's own URL with 127.0.0.1): a config error.
    let stack = Stack::start(StackOpts::default()).await;
    let (path, ports) = child_config(&stack, "htu", "dpop = true");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("http://127.0.0.1:", "http://localhost:");
    // Only the token endpoint's spelling changes (the echo stays put).
    let text = text.replacen(
        &format!(
            "upstream = \"{}",
            stack.echo.url().replace("127.0.0.1", "localhost")
        ),
        &format!("upstream = \"{}", stack.echo.url()),
        1,
    );
    std::fs::write(&path, text).unwrap();
    let proxy = ChildProxy::start(stack.dir.path(), "htu", &path, ports).await;
    let got = get_ok(&c, &proxy.url("/api/x")).await;
    assert_eq!(got.status, 503, "{}", got.text());
    let events = proxy.log_events();
    assert!(
        events.iter().any(|e| e["event"] == "token_refresh"
            && e["error"] == "invalid_dpop_proof"
            && e["error_description"]
                .as_str()
                .is_some_and(|d| d.contains("htu"))),
        "{}",
        proxy.output()
    );
    stack.assert_no_reuse();
}

/// With `store.encryption_key` the generated key is sealed with the rest
/// of the record: its file holds no key (and no field name) in clear, and
/// a restart opens it and proves with the same key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generated_key_is_sealed_in_an_encrypted_file_store() {
    let stack = Stack::start(StackOpts::default()).await;
    dpop_stack_echo(&stack);
    let (path, ports) = child_config(&stack, "sealed", "dpop = true");
    let text = with_store_keys(
        &std::fs::read_to_string(&path).unwrap(),
        "dpop sealing key",
        &[],
    );
    std::fs::write(&path, text).unwrap();
    let mut first = ChildProxy::start(stack.dir.path(), "sealed1", &path, ports).await;
    let c = client();
    let got = get_ok(&c, &first.url("/api/x")).await;
    assert_eq!(got.status, 200, "{} {}", got.text(), first.output());
    let jkt = last_ok_jkt(&stack).expect("a proof");
    let raw = std::fs::read_to_string(stack.record_path()).unwrap();
    assert!(raw.contains("tpv3:"), "sealed: {raw}");
    assert!(!raw.contains("dpop_key"), "the key is not in clear: {raw}");
    first.kill9();
    let generation = stack.idp.grant_count("refresh_token");
    let _second = ChildProxy::start(stack.dir.path(), "sealed2", &path, ports).await;
    wait_for("a refresh after the restart", S(10), || async {
        (stack.idp.grant_count("refresh_token") > generation).then_some(())
    })
    .await;
    assert_eq!(last_ok_jkt(&stack).as_deref(), Some(jkt.as_str()));
    stack.assert_no_reuse();
}
