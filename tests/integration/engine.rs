//! Token-engine scenarios over real sockets, judged by the dev IdP's reuse
//! detection: in every test a refresh token presented twice fails the test.

use crate::harness::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenproxy::dev::{Fault, Hold};

const S: fn(u64) -> Duration = Duration::from_secs;

/// 200 concurrent clients across 5 lifetimes of a 2 s token: every request
/// 200, one grant per refresh interval, zero reuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_200_clients_five_lifetimes_no_reuse() {
    let stack = Stack::start(StackOpts::default()).await;
    let app = stack.app("").await;
    let url = format!("http://{}/api/load", app.proxy_addr.unwrap());
    let c = client();
    // The first request may wait for the initial grant.
    let first = get_ok(&c, &url).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let grants_at_start = stack.refresh_grants();
    let lifetime = S(2);
    let run_for = lifetime * 5;
    let started = Instant::now();
    let total = Arc::new(AtomicUsize::new(0));
    let max_latency_ms = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (c, url, total, max_latency_ms) = (
            c.clone(),
            url.clone(),
            total.clone(),
            max_latency_ms.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut bad = Vec::new();
            // Bounded: at most 1000 iterations, and only for `run_for`.
            for _ in 0..1000 {
                if started.elapsed() >= run_for {
                    break;
                }
                let t0 = Instant::now();
                match try_get(&c, &url).await {
                    Ok(g) if g.status == 200 => {}
                    Ok(g) => bad.push(format!("{} {}", g.status, g.text())),
                    Err(e) => bad.push(e),
                }
                max_latency_ms.fetch_max(t0.elapsed().as_millis() as usize, Ordering::Relaxed);
                total.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            bad
        }));
    }
    let mut bad = Vec::new();
    for t in tasks {
        bad.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    let grants = stack.refresh_grants() - grants_at_start;
    let requests = total.load(Ordering::Relaxed);
    let reuses = stack.idp.reuse_count();
    // DESIGN.md: refresh `refresh_before` = min(max(30 s, 10 %), half) early,
    // minus up to 10 % of that as jitter: a 2 s token every 0.9 to 1.0 s.
    let before = (S(30).max(lifetime / 10)).min(lifetime / 2);
    let interval_min = lifetime - before - before / 10;
    // Plus the grant's own latency and scheduling on a busy 2-core box.
    let interval_max = (lifetime - before).mul_f64(1.1);
    let expect_lo = (elapsed.as_secs_f64() / interval_max.as_secs_f64()).floor() as usize;
    let expect_hi = (elapsed.as_secs_f64() / interval_min.as_secs_f64()).ceil() as usize;
    eprintln!(
        "load: requests={requests} non_200={} refresh_grants={grants} (expected {expect_lo}..={expect_hi} ±1 over {elapsed:?}) reuses={reuses} max_latency_ms={}",
        bad.len(),
        max_latency_ms.load(Ordering::Relaxed)
    );
    let times: Vec<_> = stack.idp.grants().iter().map(|g| g.at).collect();
    let gaps: Vec<u128> = times
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).unwrap_or_default().as_millis())
        .collect();
    eprintln!("load: grant gaps ms {gaps:?}");
    assert!(
        bad.is_empty(),
        "{} requests failed, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(3)]
    );
    assert!(
        requests > 2000,
        "too little load to mean anything: {requests}"
    );
    assert!(
        grants + 1 >= expect_lo && grants <= expect_hi + 1,
        "refresh grants {grants} not in {expect_lo}..={expect_hi} ±1"
    );
    stack.assert_no_reuse();
    app.shutdown().await;
}

/// Starts a child on `extra`, waits for its first grant, holds the next
/// (proactive) refresh at the IdP after it rotated, kills the child with
/// SIGKILL, releases the hold and starts a second child on the same config
/// and store. Returns the restarted child, the first one (for its output)
/// and the refresh token whose answer was lost.
async fn crash_during_held_rotation(
    stack: &Stack,
    extra: &str,
) -> (ChildProxy, ChildProxy, String) {
    let (path, ports) = child_config(stack, "proxy", extra);
    let mut first = ChildProxy::start(stack.dir.path(), "run1", &path, ports).await;
    stack.wait_generation(1, S(10)).await;
    let hold = Hold::new();
    stack
        .idp
        .push_fault(Fault::HoldAfterProcessing(hold.clone()));
    tokio::time::timeout(S(10), hold.reached())
        .await
        .expect("a proactive refresh reaches the IdP");
    let spent = stack
        .presented()
        .last()
        .cloned()
        .expect("a presented token");
    let rec = stack.record().unwrap();
    assert!(
        rec["intent"].is_object(),
        "write-ahead: the intent is durable before the token is presented: {}",
        rec["intent"]
    );
    first.kill9();
    hold.release();
    let second = ChildProxy::start(stack.dir.path(), "run2", &path, ports).await;
    (second, first, spent)
}

fn times_presented(stack: &Stack, token: &str) -> usize {
    stack.presented().iter().filter(|t| *t == token).count()
}

fn assert_logs_clean(stack: &Stack, children: &[&ChildProxy]) {
    let outputs: Vec<String> = children.iter().map(|c| c.output()).collect();
    assert!(
        outputs.iter().any(|o| o.contains("token_refresh")),
        "no logs captured"
    );
    assert_no_secrets(&outputs, &stack.secrets());
}

/// kill -9 while the IdP holds a rotated answer, no introspection, no grace:
/// the restart must not present the possibly spent token; `dead` with
/// `lost_rotation` and a hint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_with_held_rotation_goes_dead_lost_rotation() {
    let stack = Stack::start(StackOpts::default()).await;
    let (second, first, spent) = crash_during_held_rotation(&stack, "").await;
    let c = client();
    let st = wait_state(&c, second.admin, "dead", S(10)).await;
    assert_eq!(st["last_error"]["reason"], "lost_rotation", "{st}");
    assert_eq!(st["last_error"]["outcome"], "lost_rotation", "{st}");
    let hint = st["last_error"]["hint"].as_str().unwrap_or_default();
    assert!(hint.len() > 20, "a hint that says what happened: {st}");
    let grants = stack.refresh_grants();
    // One poll interval of the dead credential: still no grant.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(stack.refresh_grants(), grants, "no grant while dead");
    assert_eq!(
        times_presented(&stack, &spent),
        1,
        "the spent token came back"
    );
    stack.assert_no_reuse();
    eprintln!(
        "crash/no-grace: grants={} reuses={}",
        stack.refresh_grants(),
        stack.idp.reuse_count()
    );
    assert_logs_clean(&stack, &[&first, &second]);
}

/// Same crash with `introspection_url`: the proxy asks, learns the token is
/// spent, and goes dead with `lost_rotation` without presenting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_with_held_rotation_introspects_and_goes_dead() {
    let stack = Stack::start(StackOpts::default()).await;
    let extra = format!("introspection_url = \"{}\"", stack.idp.introspection_url());
    let (second, first, spent) = crash_during_held_rotation(&stack, &extra).await;
    let c = client();
    let st = wait_state(&c, second.admin, "dead", S(10)).await;
    assert_eq!(st["last_error"]["reason"], "lost_rotation", "{st}");
    let hint = st["last_error"]["hint"].as_str().unwrap_or_default();
    assert!(
        hint.contains("introspection"),
        "the hint says the IdP was asked: {st}"
    );
    assert_eq!(
        times_presented(&stack, &spent),
        1,
        "the spent token came back"
    );
    stack.assert_no_reuse();
    let ev = second
        .log_events()
        .into_iter()
        .find(|e| e["event"] == "token_refresh" && e["outcome"] == "lost_rotation");
    assert!(ev.is_some(), "a lost_rotation event: {}", second.output());
    assert_logs_clean(&stack, &[&first, &second]);
}

/// Same crash with a declared grace window (IdP and credential): the retry
/// within the window succeeds and requests work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_with_held_rotation_within_grace_retries() {
    let stack = Stack::start(StackOpts {
        idp_reuse_grace: S(30),
        ..StackOpts::default()
    })
    .await;
    let (second, first, spent) = crash_during_held_rotation(&stack, "reuse_grace = \"30s\"").await;
    // The stored access token may still serve for a moment; wait for the
    // retry's rotation, then for a request on the new token.
    stack.wait_generation(2, S(10)).await;
    let c = client();
    let url = second.url("/api/after-crash");
    wait_for("a 200 after the grace retry", S(10), || async {
        try_get(&c, &url).await.ok().filter(|g| g.status == 200)
    })
    .await;
    assert_eq!(
        times_presented(&stack, &spent),
        2,
        "presented once, retried once within the grace window"
    );
    let st = credential_status(&c, second.admin).await.unwrap();
    assert_ne!(st["state"], "dead", "{st}");
    stack.assert_no_reuse();
    eprintln!(
        "crash/grace: grants={} reuses={}",
        stack.refresh_grants(),
        stack.idp.reuse_count()
    );
    assert_logs_clean(&stack, &[&first, &second]);
}

/// The IdP rotates, then drops the connection (no crash): the answer is lost,
/// so without introspection or grace the credential goes dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_after_processing_goes_dead_lost_rotation() {
    let stack = Stack::start(StackOpts::default()).await;
    let app = stack.app("").await;
    stack.wait_generation(1, S(10)).await;
    stack.idp.push_fault(Fault::ResetAfterProcessing);
    let c = client();
    let admin = app.admin_addr.unwrap();
    let st = wait_state(&c, admin, "dead", S(10)).await;
    assert_eq!(st["last_error"]["reason"], "lost_rotation", "{st}");
    assert!(st["last_error"]["hint"]
        .as_str()
        .is_some_and(|h| !h.is_empty()));
    let spent: Vec<_> = stack
        .idp
        .grants()
        .into_iter()
        .filter(|g| g.fault == Some("reset_after_processing"))
        .filter_map(|g| g.refresh_token)
        .collect();
    assert_eq!(spent.len(), 1);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        times_presented(&stack, &spent[0]),
        1,
        "the spent token came back"
    );
    stack.assert_no_reuse();
    app.shutdown().await;
}

/// kill -9 right after a successful rotation was written: the restart serves
/// the stored token with no new grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_store_write_needs_no_new_grant() {
    let stack = Stack::start(StackOpts::default()).await;
    let (path, ports) = child_config(&stack, "proxy", "");
    let mut first = ChildProxy::start(stack.dir.path(), "run1", &path, ports).await;
    stack.wait_generation(1, S(10)).await;
    // The next token lives long enough that no refresh is due after restart.
    stack.idp.set_access_ttl(S(30));
    let generation = stack.wait_generation(2, S(10)).await;
    first.kill9();
    let grants = stack.refresh_grants();
    let second = ChildProxy::start(stack.dir.path(), "run2", &path, ports).await;
    let c = client();
    let got = get_ok(&c, &second.url("/api/after-crash")).await;
    assert_eq!(got.status, 200, "{}", got.text());
    let st = credential_status(&c, second.admin).await.unwrap();
    assert_eq!(st["state"], "fresh", "{st}");
    assert_eq!(st["generation"], generation, "{st}");
    assert_eq!(stack.refresh_grants(), grants, "no new grant after restart");
    stack.assert_no_reuse();
    assert_logs_clean(&stack, &[&first, &second]);
}

/// Two `tokenproxy run` processes sharing one store file, under concurrent
/// load across 5 expiries: the file lock makes them take turns, zero reuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_one_store_no_reuse() {
    let stack = Stack::start(StackOpts::default()).await;
    let (path_a, ports_a) = child_config(&stack, "a", "");
    let (path_b, ports_b) = child_config(&stack, "b", "");
    let a = ChildProxy::start(stack.dir.path(), "a", &path_a, ports_a).await;
    let b = ChildProxy::start(stack.dir.path(), "b", &path_b, ports_b).await;
    let c = client();
    let run_for = S(10);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let url = if i % 2 == 0 {
            a.url("/api/x")
        } else {
            b.url("/api/x")
        };
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let (mut n, mut bad) = (0usize, Vec::new());
            for _ in 0..2000 {
                if started.elapsed() >= run_for {
                    break;
                }
                match try_get(&c, &url).await {
                    Ok(g) if g.status == 200 => {}
                    Ok(g) => bad.push(format!("{} {}", g.status, g.text())),
                    Err(e) => bad.push(e),
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (n, bad)
        }));
    }
    let (mut requests, mut bad) = (0, Vec::new());
    for t in tasks {
        let (n, b) = t.await.unwrap();
        requests += n;
        bad.extend(b);
    }
    let lost_races = [&a, &b]
        .iter()
        .flat_map(|p| p.log_events())
        .filter(|e| e["event"] == "token_refresh" && e["outcome"] == "lost_race")
        .count();
    eprintln!(
        "two processes: requests={requests} non_200={} refresh_grants={} lost_race_adoptions={lost_races} reuses={}",
        bad.len(),
        stack.refresh_grants(),
        stack.idp.reuse_count()
    );
    assert!(
        bad.is_empty(),
        "{} failed, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(3)]
    );
    assert!(
        stack.refresh_grants() >= 5,
        "the tokens did expire and rotate"
    );
    stack.assert_no_reuse();
    assert_logs_clean(&stack, &[&a, &b]);
}

fn status_fault(status: u16, body: &str, headers: &[(&str, &str)]) -> Fault {
    Fault::Status {
        status,
        body: body.to_owned(),
        content_type: "text/plain",
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// IdP refusing connections, then answering 500, then 429 with
/// `Retry-After: 1`: the valid token serves while valid, then 503 with
/// Retry-After; grants back off; recovery on its own once the IdP is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idp_down_serves_valid_token_then_503_then_recovers() {
    let stack = Stack::start(StackOpts::default()).await;
    let app = stack.app("max_backoff = \"1s\"").await;
    let url = format!("http://{}/api/down", app.proxy_addr.unwrap());
    let c = client();
    let g = stack.wait_generation(1, S(10)).await;
    // Stop right after a rotation so the token has its whole life ahead.
    stack.wait_generation(g + 1, S(10)).await;
    stack.idp.stop().await;
    let rec = stack.record().unwrap();
    let issued = rec["access_issued_at_ms"].as_u64().unwrap();
    let expires = rec["access_expires_at_ms"].as_u64().unwrap();
    let margin_ms = ((expires - issued) / 20).min(5000);
    let usable_until = std::time::UNIX_EPOCH + Duration::from_millis(expires - margin_ms);

    let done = Arc::new(tokio::sync::Notify::new());
    // A few clients polling, so some requests also join in-flight attempts.
    let pollers: Vec<_> = (0..12)
        .map(|_| {
            let (c, url, done) = (c.clone(), url.clone(), done.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let stop = done.notified();
                tokio::pin!(stop);
                loop {
                    let at = std::time::SystemTime::now();
                    let got = try_get(&c, &url).await;
                    seen.push((at, got));
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(15)) => {}
                        _ = &mut stop => return seen,
                    }
                }
            })
        })
        .collect();
    // Connection refused for a while (past the token's usable end)...
    tokio::time::sleep(Duration::from_millis(2300)).await;
    // ...then the IdP's own 500s (with an OAuth error body: a refusal; a
    // bare 500 may be a gateway that lost a rotation, see grant_safety)...
    stack.idp.restart().await;
    let phase_500 = std::time::SystemTime::now();
    for _ in 0..100 {
        stack.idp.push_fault(status_fault(
            500,
            "error=server_error&error_description=internal+error",
            &[],
        ));
    }
    tokio::time::sleep(Duration::from_millis(2000)).await;
    // ...then 429 with Retry-After: 1...
    stack.idp.clear_faults();
    let phase_429 = std::time::SystemTime::now();
    for _ in 0..100 {
        stack
            .idp
            .push_fault(status_fault(429, "slow down", &[("Retry-After", "1")]));
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // ...then back.
    stack.idp.clear_faults();
    let back = std::time::SystemTime::now();
    wait_for("recovery", S(8), || async {
        try_get(&c, &url).await.ok().filter(|g| g.status == 200)
    })
    .await;
    let recovered_after = back.elapsed().unwrap();
    done.notify_waiters();
    let mut seen = Vec::new();
    for p in pollers {
        seen.extend(p.await.unwrap());
    }

    let slack = Duration::from_millis(100);
    let (mut ok_before, mut unavailable) = (0, 0);
    let mut no_retry_after = Vec::new();
    for (at, got) in &seen {
        let got = got.as_ref().expect("the proxy answers");
        if *at + slack < usable_until {
            assert_eq!(
                got.status,
                200,
                "the valid token keeps serving: {}",
                got.text()
            );
            ok_before += 1;
        } else if *at > usable_until + slack && *at < back {
            assert_eq!(got.status, 503, "{}", got.text());
            assert_eq!(got.json()["error"], "credential_unavailable");
            assert!(got.json()["reason"].is_string(), "{}", got.text());
            if !got.headers.contains_key("retry-after") {
                no_retry_after.push(got.text());
            }
            unavailable += 1;
        }
    }
    let grants: Vec<_> = stack
        .idp
        .grants()
        .into_iter()
        .filter(|g| g.at >= phase_500 && g.at < back)
        .collect();
    let gaps: Vec<(u128, Option<&str>)> = grants
        .windows(2)
        .map(|w| {
            (
                w[1].at
                    .duration_since(w[0].at)
                    .unwrap_or_default()
                    .as_millis(),
                w[0].fault,
            )
        })
        .collect();
    eprintln!(
        "idp down: ok_before_expiry={ok_before} unavailable={unavailable} grants_while_failing={} gaps_ms={:?} recovered_after={recovered_after:?} reuses={}",
        grants.len(),
        gaps.iter().map(|g| g.0).collect::<Vec<_>>(),
        stack.idp.reuse_count()
    );
    assert!(ok_before > 0 && unavailable > 0);
    assert!(!grants.is_empty(), "attempts continue while the IdP fails");
    // Backoff: no hot loop, and a 429's Retry-After is a floor.
    assert!(grants.len() <= 20, "too many attempts: {}", grants.len());
    for (gap, _) in &gaps {
        assert!(*gap >= 90, "backoff gaps are at least 100 ms: {gaps:?}");
    }
    for w in grants.windows(2) {
        if w[0].at >= phase_429 {
            let gap = w[1].at.duration_since(w[0].at).unwrap_or_default();
            assert!(
                gap >= Duration::from_millis(950),
                "Retry-After: 1 honoured: {gaps:?}"
            );
        }
    }
    stack.assert_no_reuse();
    assert!(
        no_retry_after.is_empty(),
        "{} of {unavailable} 503s without Retry-After, e.g. {}",
        no_retry_after.len(),
        no_retry_after[0]
    );
    app.shutdown().await;
}

/// The `Authorization` the echo upstream received.
fn echoed_auth(got: &Got) -> String {
    got.json()["headers"]["authorization"][0]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The family revoked at the IdP: the next refresh gets `invalid_grant`, the
/// credential dies with one error event and a hint, the current token serves
/// until it expires, then 503 with the reason; no more grants; a new family
/// written to the store revives it within 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_dead_serves_until_expiry_then_revives_from_store() {
    let stack = Stack::start(StackOpts {
        access_ttl: S(4),
        permissive_echo: true,
        ..StackOpts::default()
    })
    .await;
    let (path, ports) = child_config(&stack, "proxy", "");
    let proxy = ChildProxy::start(stack.dir.path(), "run", &path, ports).await;
    let c = client();
    let url = proxy.url("/api/ig");
    stack.wait_generation(1, S(10)).await;
    stack.idp.revoke_family_of(&stack.current_refresh_token());
    let st = wait_state(&c, proxy.admin, "dead", S(6)).await;
    assert_eq!(st["last_error"]["reason"], "invalid_grant", "{st}");
    let grants_when_dead = stack.refresh_grants();
    let rec = stack.record().unwrap();
    let token = rec["access_token"].as_str().unwrap().to_owned();
    let expires = std::time::UNIX_EPOCH
        + Duration::from_millis(rec["access_expires_at_ms"].as_u64().unwrap());

    // Still injected while valid (the upstream's answer is the judge)...
    let got = get_ok(&c, &url).await;
    assert!(
        std::time::SystemTime::now() < expires,
        "the dead credential's token expired before the check; slow machine?"
    );
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(echoed_auth(&got), format!("Bearer {token}"));
    // ...then 503 with the reason.
    let got = wait_for("503 after expiry", S(6), || async {
        try_get(&c, &url).await.ok().filter(|g| g.status == 503)
    })
    .await;
    let body = got.json();
    assert_eq!(body["error"], "credential_unavailable", "{body}");
    assert_eq!(body["reason"], "invalid_grant", "{body}");
    assert!(
        body["hint"].as_str().is_some_and(|h| !h.is_empty()),
        "{body}"
    );
    // No grant calls while dead (more than one store poll interval).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        stack.refresh_grants(),
        grants_when_dead,
        "grants while dead"
    );

    let events: Vec<_> = proxy
        .log_events()
        .into_iter()
        .filter(|e| e["event"] == "token_refresh" && e["outcome"] == "invalid_grant")
        .collect();
    assert_eq!(
        events.len(),
        1,
        "exactly one invalid_grant event: {events:?}"
    );
    assert_eq!(events[0]["level"], "ERROR", "{}", events[0]);
    assert!(
        events[0]["hint"].as_str().is_some_and(|h| h.len() > 20),
        "{}",
        events[0]
    );

    // Revival: an operator writes a new family into the store.
    let fresh = stack.idp.issue_refresh_token(CLIENT_ID, "alice");
    stack.secrets.lock().insert(fresh.clone());
    let mut rec = stack.record().unwrap();
    rec["family"] = "operator0001".into();
    rec["generation"] = 0.into();
    rec["refresh_token"] = fresh.into();
    for k in [
        "access_token",
        "access_expires_at_ms",
        "access_issued_at_ms",
        "intent",
        "dead",
    ] {
        rec[k] = serde_json::Value::Null;
    }
    let written = Instant::now();
    stack.write_record(rec);
    wait_for("revival", S(5), || async {
        try_get(&c, &url).await.ok().filter(|g| g.status == 200)
    })
    .await;
    eprintln!(
        "invalid_grant: revived {:?} after the store write",
        written.elapsed()
    );
    let st = credential_status(&c, proxy.admin).await.unwrap();
    assert_eq!(st["family"], "operator0001", "{st}");
    stack.assert_no_reuse();
    assert_logs_clean(&stack, &[&proxy]);
}

/// A suspend-like jump: the wall clock passes the expiry while the monotonic
/// clock does not. With the IdP down the expired token must not be injected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_jump_past_expiry_never_injects_expired_token() {
    use tokenproxy::token::engine::Clock;
    let stack = Stack::start(StackOpts {
        access_ttl: S(30),
        ..StackOpts::default()
    })
    .await;
    let cfg = stack.config("");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let clock = Arc::new(Clock::default());
    let engine = Arc::new(
        tokenproxy::token::Engine::start_with_clock(&cfg, shutdown.clone(), clock.clone())
            .await
            .unwrap(),
    );
    let app = tokenproxy::app::App::start_with_engine(&cfg, engine, shutdown)
        .await
        .unwrap();
    let url = format!("http://{}/api/suspend", app.proxy_addr.unwrap());
    let c = client();
    let got = get_ok(&c, &url).await;
    assert_eq!(got.status, 200, "{}", got.text());
    stack.idp.stop().await;
    let upstream_before = stack.echo.requests();
    clock.advance_wall(S(60));
    let got = get_ok(&c, &url).await;
    assert_eq!(got.status, 503, "expired token injected: {}", got.text());
    assert_eq!(got.json()["error"], "credential_unavailable");
    assert_eq!(
        stack.echo.requests(),
        upstream_before,
        "nothing reached the upstream"
    );
    // Once the IdP is back, a fresh token.
    stack.idp.restart().await;
    wait_for("a fresh token after the jump", S(8), || async {
        try_get(&c, &url).await.ok().filter(|g| g.status == 200)
    })
    .await;
    stack.assert_no_reuse();
    app.shutdown().await;
}

/// Grant failures whose bodies echo the secrets back, at debug level: no
/// token, refresh token or client secret appears in any output, status or
/// error body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_and_outputs_never_contain_secrets() {
    let stack = Stack::start(StackOpts::default()).await;
    // The unparsable 200 below may hide a rotation: introspection lets the
    // proxy verify the old token is still active and retry.
    let introspect = format!("introspection_url = \"{}\"", stack.idp.introspection_url());
    let (path, ports) = child_config(&stack, "proxy", &introspect);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("level = \"info\"", "level = \"debug\"");
    std::fs::write(&path, text).unwrap();
    let proxy = ChildProxy::start(stack.dir.path(), "run", &path, ports).await;
    let c = client();
    let mut outputs = Vec::new();
    stack.wait_generation(1, S(10)).await;
    let rec = stack.record().unwrap();
    let (rt, at) = (
        rec["refresh_token"].as_str().unwrap().to_owned(),
        rec["access_token"].as_str().unwrap().to_owned(),
    );
    let nasty = format!(
        "{{\"error\":\"temporarily_unavailable\",\"error_description\":\"refresh_token={rt} access_token={at} client_secret={CLIENT_SECRET}\"}}"
    );
    stack.idp.push_fault(Fault::Status {
        status: 503,
        body: nasty.clone(),
        content_type: "application/json",
        headers: vec![],
    });
    // An unparsable 200 carrying the secrets too.
    stack.idp.push_fault(Fault::Body {
        status: 200,
        body: format!("not json {rt} {CLIENT_SECRET}"),
        content_type: "text/plain",
    });
    let g = stack.generation().unwrap();
    wait_for("both faults consumed", S(15), || async {
        (stack.idp.pending_faults() == 0).then_some(())
    })
    .await;
    // Whatever the proxy answers meanwhile must be clean too.
    for _ in 0..5 {
        // Only the proxy's own answers: the echo upstream reports the token.
        if let Ok(got) = try_get(&c, &proxy.url("/api/x")).await {
            if got.status == 200 {
                continue;
            }
            outputs.push(format!("{:?} {}", got.headers, got.text()));
        }
        if let Some(st) = credential_status(&c, proxy.admin).await {
            outputs.push(st.to_string());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.wait_generation(g + 1, S(15)).await;
    let transient = proxy
        .log_events()
        .into_iter()
        .filter(|e| e["event"] == "token_refresh" && e["outcome"] == "transient")
        .count();
    assert!(
        transient >= 2,
        "the failures were logged: {}",
        proxy.output()
    );
    outputs.push(proxy.output());
    assert_no_secrets(&outputs, &stack.secrets());
    stack.assert_no_reuse();
}

/// The connection drops before the IdP processed the grant: with
/// `introspection_url` the proxy asks, hears "still active", presents the
/// token again and carries on (the counterpart of the spent case).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_before_processing_with_introspection_retries() {
    let stack = Stack::start(StackOpts::default()).await;
    let extra = format!("introspection_url = \"{}\"", stack.idp.introspection_url());
    let app = stack.app(&extra).await;
    let g = stack.wait_generation(1, S(10)).await;
    stack.idp.push_fault(Fault::ResetBeforeProcessing);
    stack.wait_generation(g + 1, S(10)).await;
    let dropped: Vec<_> = stack
        .idp
        .grants()
        .into_iter()
        .filter(|g| g.fault == Some("reset_before_processing"))
        .filter_map(|g| g.refresh_token)
        .collect();
    assert_eq!(dropped.len(), 1);
    assert_eq!(
        times_presented(&stack, &dropped[0]),
        2,
        "presented again only after introspection said it is active"
    );
    let c = client();
    let got = get_ok(&c, &format!("http://{}/api/x", app.proxy_addr.unwrap())).await;
    assert_eq!(got.status, 200, "{}", got.text());
    stack.assert_no_reuse();
    app.shutdown().await;
}

/// Steady state: while a (slow) proactive refresh is in flight the current
/// token keeps serving, so no request waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_do_not_wait_for_a_proactive_refresh() {
    let stack = Stack::start(StackOpts::default()).await;
    let app = stack.app("").await;
    let url = format!("http://{}/api/steady", app.proxy_addr.unwrap());
    let c = client();
    let g = stack.wait_generation(1, S(10)).await;
    stack.wait_generation(g + 1, S(10)).await;
    // The next refresh starts ~1 s before expiry and takes 700 ms.
    stack
        .idp
        .push_fault(Fault::Delay(Duration::from_millis(700)));
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    while stack.generation() < Some(g + 2) || started.elapsed() < S(2) {
        assert!(
            started.elapsed() < S(10),
            "the delayed refresh never landed"
        );
        let t0 = Instant::now();
        let got = get_ok(&c, &url).await;
        assert_eq!(got.status, 200, "{}", got.text());
        slowest = slowest.max(t0.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("steady: slowest request {slowest:?} across a 700 ms refresh");
    assert!(
        slowest < Duration::from_millis(500),
        "a request waited: {slowest:?}"
    );
    stack.assert_no_reuse();
    app.shutdown().await;
}

/// A dead credential comes back when a new seed appears in the config (a
/// restart with the new `refresh_token`): a new family, no reuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_seed_in_config_revives_a_dead_credential() {
    let stack = Stack::start(StackOpts::default()).await;
    let (path, ports) = child_config(&stack, "proxy", "");
    let mut first = ChildProxy::start(stack.dir.path(), "run1", &path, ports).await;
    let c = client();
    stack.wait_generation(1, S(10)).await;
    stack.idp.revoke_family_of(&stack.current_refresh_token());
    let dead = wait_state(&c, first.admin, "dead", S(6)).await;
    first.kill9();
    // The same seed again is never re-adopted...
    let mut again = ChildProxy::start(stack.dir.path(), "run2", &path, ports).await;
    let st = wait_state(&c, again.admin, "dead", S(6)).await;
    assert_eq!(
        st["family"], dead["family"],
        "an old seed is not a new family: {st}"
    );
    again.kill9();
    // ...a new one is.
    let seed = stack.idp.issue_refresh_token(CLIENT_ID, "alice");
    stack.secrets.lock().insert(seed.clone());
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(&stack.seed, &seed);
    std::fs::write(&path, text).unwrap();
    let third = ChildProxy::start(stack.dir.path(), "run3", &path, ports).await;
    let url = third.url("/api/seed");
    wait_for("revival by a new seed", S(5), || async {
        try_get(&c, &url).await.ok().filter(|g| g.status == 200)
    })
    .await;
    let st = credential_status(&c, third.admin).await.unwrap();
    assert_ne!(st["family"], dead["family"], "{st}");
    assert_ne!(st["state"], "dead", "{st}");
    stack.assert_no_reuse();
    assert_logs_clean(&stack, &[&first, &again, &third]);
}

/// Suspect (house in order): the file store's I/O ran on the thread that
/// also serves proxy traffic. With one thread for both (a current-thread
/// runtime, as `tokenproxy run` uses for worker 0) and another process
/// holding the store-wide write lock for 3 s while a refresh wants to
/// write, a request must still be served at once by the current token.
#[tokio::test(flavor = "current_thread")]
async fn store_io_never_blocks_the_serving_thread() {
    let stack = Stack::start(StackOpts {
        access_ttl: S(60),
        ..StackOpts::default()
    })
    .await;
    let app = stack.app("").await;
    stack.wait_generation(1, S(10)).await;
    let url = format!("http://{}/api/x", app.proxy_addr.unwrap());
    assert_eq!(get_ok(&client(), &url).await.status, 200);

    let mut write_lock = stack.store_path().into_os_string();
    write_lock.push(".lock");
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&write_lock)
            .unwrap();
        f.lock().unwrap();
        locked_tx.send(()).unwrap();
        std::thread::sleep(S(3));
        drop(f);
    });
    locked_rx.recv().unwrap();
    let admin = app.admin_addr.unwrap();
    let refresh = tokio::spawn(async move {
        post_admin(&client(), admin, &format!("/credentials/{CRED}/refresh")).await
    });
    // Timed from a thread of its own: if the runtime's only thread is
    // stuck, nothing on it could measure that.
    let proxy = app.proxy_addr.unwrap();
    let probe = std::thread::spawn(move || {
        use std::io::{Read, Write};
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let mut s = std::net::TcpStream::connect(proxy).unwrap();
        s.write_all(b"GET /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        (started.elapsed(), out)
    });
    // Let the runtime run (the refresh, the proxy) until the probe is done.
    while !probe.is_finished() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (took, out) = probe.join().unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        took < Duration::from_millis(1500),
        "a request waited {took:?} for another process's store lock"
    );
    let _ = refresh.await;
    holder.join().unwrap();
    stack.wait_generation(2, S(10)).await;
    stack.assert_no_reuse();
    app.shutdown().await;
}
