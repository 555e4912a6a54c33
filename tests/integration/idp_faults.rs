//! Every failing-IdP shape against the engine: the right outcome class in the
//! admin status (`last_error.outcome`, which is also the `token_refresh` log
//! event's outcome) with a hint, no refresh token presented twice, and no
//! request forwarded without a valid token (the echo's 401 count stays 0;
//! clients see 200 or a proxy-made 503 only).

use crate::harness::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokenproxy::dev::Fault;

const S: fn(u64) -> Duration = Duration::from_secs;

fn status(status: u16, body: &str, content_type: &'static str, headers: &[(&str, &str)]) -> Fault {
    Fault::Status {
        status,
        body: body.to_owned(),
        content_type,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn body(status: u16, body: String) -> Fault {
    Fault::Body {
        status,
        body,
        content_type: "application/json",
    }
}

/// Polls `/api/x` until stopped; returns every status seen, panicking on a
/// response that is neither the upstream's 200 nor a proxy-made 503.
fn poller(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<u16>> {
    tokio::spawn(async move {
        let c = client();
        let mut seen = Vec::new();
        // Bounded: 2000 × ≥ 25 ms.
        for _ in 0..2000 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let g = get_ok(&c, &url).await;
            match g.status {
                200 => assert_eq!(g.json()["token_ok"], true, "{}", g.text()),
                503 => assert_eq!(g.json()["error"], "credential_unavailable", "{}", g.text()),
                s => panic!("unexpected {s}: {}", g.text()),
            }
            seen.push(g.status);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        seen
    })
}

struct Run {
    stack: Stack,
    app: tokenproxy::app::App,
    stop: Arc<AtomicBool>,
    poller: tokio::task::JoinHandle<Vec<u16>>,
    generation: u64,
}

async fn start(extra: &str) -> Run {
    start_with(extra, true).await
}

/// `introspect`: give the credential an `introspection_url`, so an unusable
/// 2xx (which may hide a rotation) can be verified and retried.
async fn start_with(extra: &str, introspect: bool) -> Run {
    let stack = Stack::start(StackOpts::default()).await;
    let introspection = if introspect && !extra.contains("introspection_url") {
        format!(
            "introspection_url = \"{}\"\n",
            stack.idp.introspection_url()
        )
    } else {
        String::new()
    };
    let backoff = if extra.contains("max_backoff") {
        ""
    } else {
        "max_backoff = \"1s\"\n"
    };
    let app = stack.app(&format!("{backoff}{introspection}{extra}")).await;
    let generation = stack.wait_generation(1, S(10)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let url = format!("http://{}/api/x", app.proxy_addr.unwrap());
    let poller = poller(url, stop.clone());
    Run {
        stack,
        app,
        stop,
        poller,
        generation,
    }
}

impl Run {
    async fn status(&self) -> serde_json::Value {
        credential_status(&client(), self.app.live_admin())
            .await
            .unwrap_or_default()
    }

    /// Waits for `last_error.outcome == outcome` with a non-empty hint.
    async fn wait_outcome(&self, outcome: &str) -> serde_json::Value {
        wait_for(&format!("outcome {outcome}"), S(15), || async {
            let st = self.status().await;
            (st["last_error"]["outcome"] == outcome).then_some(st)
        })
        .await
    }

    /// Faults cleared: a later generation arrives, then the final checks.
    async fn recovers(self) -> Vec<u16> {
        self.stack.idp.clear_faults();
        self.stack.wait_generation(self.generation + 1, S(20)).await;
        self.finish().await
    }

    async fn finish(self) -> Vec<u16> {
        self.stop.store(true, Ordering::Relaxed);
        let seen = self.poller.await.expect("poller: only 200 or 503");
        self.stack.assert_no_reuse();
        assert_eq!(
            self.stack.echo.unauthorized(),
            0,
            "a request went upstream without a valid token"
        );
        self.app.shutdown().await;
        seen
    }
}

trait AdminAddr {
    fn live_admin(&self) -> std::net::SocketAddr;
}
impl AdminAddr for tokenproxy::app::App {
    fn live_admin(&self) -> std::net::SocketAddr {
        self.admin_addr.unwrap()
    }
}

fn assert_hint(st: &serde_json::Value) {
    let hint = st["last_error"]["hint"].as_str().unwrap_or_default();
    assert!(!hint.is_empty(), "no hint: {st}");
}

/// Transient shapes: retried with backoff, the credential recovers alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_shapes_back_off_and_recover() {
    let big = format!("{{\"access_token\":\"{}\"}}", "x".repeat(10 * 1024 * 1024));
    let cases: Vec<(&str, Fault)> = vec![
        ("500", status(500, "oops", "text/plain", &[])),
        (
            "502",
            status(502, "<html>bad gateway</html>", "text/html", &[]),
        ),
        (
            "503 json",
            status(
                503,
                "{\"error\":\"temporarily_unavailable\"}",
                "application/json",
                &[],
            ),
        ),
        ("empty 200", body(200, String::new())),
        (
            "200 without access_token",
            body(200, "{\"token_type\":\"Bearer\",\"expires_in\":60}".into()),
        ),
        (
            "200 empty access_token",
            body(
                200,
                "{\"access_token\":\"\",\"token_type\":\"Bearer\"}".into(),
            ),
        ),
        (
            "200 access_token not a string",
            body(200, "{\"access_token\":42}".into()),
        ),
        (
            "200 access_token with CRLF",
            body(200, "{\"access_token\":\"a\\r\\nX-Evil: 1\"}".into()),
        ),
        (
            "non-JSON 200",
            Fault::Body {
                status: 200,
                body: "<html>login</html>".into(),
                content_type: "text/html",
            },
        ),
        (
            "truncated JSON",
            body(200, "{\"access_token\":\"abc".into()),
        ),
        ("10 MiB body", body(200, big)),
    ];
    let runs = cases.into_iter().map(|(name, fault)| async move {
        let run = start("").await;
        // Two in a row, so the failure is visible before the retry succeeds.
        run.stack.idp.push_fault(fault.clone());
        run.stack.idp.push_fault(fault);
        let st = run.wait_outcome("transient").await;
        assert_hint(&st);
        let t0 = Instant::now();
        run.recovers().await;
        eprintln!("{name}: transient, recovered in {:?}", t0.elapsed());
    });
    // Three at a time: a 2-core box.
    let runs: Vec<_> = runs.collect();
    let mut it = runs.into_iter();
    loop {
        let batch: Vec<_> = it.by_ref().take(3).collect();
        if batch.is_empty() {
            break;
        }
        futures_join_all(batch).await;
    }
}

async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(fs: Vec<F>) {
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    for h in handles {
        h.await.expect("case passed");
    }
}

/// 429 with `Retry-After` as an HTTP-date: transient, and the next attempt
/// waits at least that long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_honours_a_retry_after_http_date() {
    // The seconds form's timing runs on the paused clock
    // (token::engine::tests::retry_after_holds_off_the_next_request_up_to_max_backoff);
    // the date form needs the wall clock, so it runs here.
    for form in ["date"] {
        // max_backoff caps Retry-After: give it room above the 3-4 s asked.
        let run = start("max_backoff = \"5s\"\n").await;
        // An HTTP-date is absolute (whole seconds): no retry before it.
        let at = SystemTime::UNIX_EPOCH
            + S((SystemTime::now() + S(4))
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs());
        let value = match form {
            "seconds" => "3".to_owned(),
            _ => httpdate(at),
        };
        run.stack.idp.push_fault(status(
            429,
            "{\"error\":\"slow_down\"}",
            "application/json",
            &[("Retry-After", &value)],
        ));
        let st = run.wait_outcome("transient").await;
        assert_hint(&st);
        assert_eq!(st["last_error"]["status"], 429, "{st}");
        let limited_at = run
            .stack
            .idp
            .grants()
            .iter()
            .rev()
            .find(|g| g.fault.is_some())
            .unwrap()
            .at;
        run.stack.wait_generation(run.generation + 1, S(20)).await;
        let next = run
            .stack
            .idp
            .grants()
            .into_iter()
            .find(|g| g.at > limited_at)
            .unwrap()
            .at;
        let gap = next.duration_since(limited_at).unwrap();
        let honoured = match form {
            "seconds" => gap >= Duration::from_millis(2900),
            _ => next + Duration::from_millis(100) >= at,
        };
        assert!(
            honoured,
            "{form}: Retry-After {value} not honoured, retried after {gap:?}"
        );
        run.recovers().await;
    }
}

/// RFC 7231 IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
fn httpdate(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let days = secs / 86400;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    // Civil from days (Howard Hinnant).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let mon = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(mo - 1) as usize];
    format!("{wd}, {d:02} {mon} {y} {h:02}:{m:02}:{s:02} GMT")
}

/// Configuration-class answers: `token_type` other than Bearer, a redirect,
/// a 4xx without an OAuth body, `invalid_client`: `config_error` with a hint,
/// never a forward with the odd token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_shapes_are_config_errors_with_a_hint() {
    let cases: Vec<(&str, Fault)> = vec![
        (
            "DPoP token_type",
            body(
                200,
                "{\"access_token\":\"abc\",\"token_type\":\"DPoP\",\"expires_in\":60}".into(),
            ),
        ),
        (
            "MAC token_type",
            body(
                200,
                "{\"access_token\":\"abc\",\"token_type\":\"mac\"}".into(),
            ),
        ),
        (
            "redirect",
            Fault::Redirect("https://login.example/elsewhere".into()),
        ),
        (
            "404 html",
            status(404, "<html>not found</html>", "text/html", &[]),
        ),
        (
            "invalid_client",
            status(
                401,
                "{\"error\":\"invalid_client\"}",
                "application/json",
                &[],
            ),
        ),
    ];
    let mut tasks = Vec::new();
    for (name, fault) in cases {
        tasks.push(async move {
            let run = start("").await;
            run.stack.idp.push_fault(fault);
            let st = run.wait_outcome("config_error").await;
            assert_hint(&st);
            eprintln!("{name}: config_error, hint {}", st["last_error"]["hint"]);
            // Retried only slowly (minutes): no grants meanwhile.
            let grants = run.stack.refresh_grants();
            tokio::time::sleep(S(2)).await;
            assert!(
                run.stack.refresh_grants() <= grants + 1,
                "{name}: hot retry"
            );
            run.finish().await;
        });
    }
    futures_join_all(tasks).await;
}

/// `expires_in` as a string, zero, negative, absurdly large: a string is
/// read, the others fall back to `default_lifetime`; the token is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_expires_in_values_are_sane() {
    for (value, expect_secs) in [
        ("\"45\"", 45),
        ("0", 30),
        ("-60", 30),
        ("1e300", 30),
        ("99999999999999999999", 30),
        ("\"soon\"", 30),
        ("null", 30),
    ] {
        // Without introspection_url: with one, the introspected exp would
        // be the lifetime (docs/tokens-and-rotation.md, "Lifetimes").
        let run = start_with("default_lifetime = \"30s\"", false).await;
        // Valid at the IdP for longer than the check below can take on a
        // loaded machine (the IdP's own tokens last 2 s): an upstream 401
        // would start a reactive refresh, and the state would read
        // `refreshing`.
        let at = run.stack.idp.issue_access_token_lasting(CLIENT_ID, S(120));
        // Unprocessed by the IdP: the refresh token is not spent, so the
        // engine keeping the current one is right.
        run.stack.idp.push_fault(body(
            200,
            format!(
                "{{\"access_token\":\"{at}\",\"token_type\":\"Bearer\",\"expires_in\":{value}}}"
            ),
        ));
        let st = wait_for(&format!("expires_in {value}"), S(10), || async {
            let st = run.status().await;
            let left = st["expires_in_s"].as_u64()?;
            (left > 5).then_some(st)
        })
        .await;
        let left = st["expires_in_s"].as_u64().unwrap();
        assert!(
            left <= expect_secs && left + 5 >= expect_secs,
            "expires_in {value}: {left} s left, expected about {expect_secs}: {st}"
        );
        assert_eq!(st["state"], "fresh", "{st}");
        run.finish().await;
    }
}

/// Latency beyond what a request will wait: the token expires while the
/// refresh hangs; requests wait `refresh_wait` (2 s) and get a 503 with
/// Retry-After, never the expired token; the refresh completes and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_idp_means_503_after_refresh_wait_then_recovery() {
    let run = start("").await;
    run.stack.idp.push_fault(Fault::Delay(S(6)));
    // The proactive refresh starts ~1 s before expiry and hangs 6 s.
    let url = format!("http://{}/api/slow", run.app.proxy_addr.unwrap());
    let c = client();
    let got_503 = wait_for("a 503 while the IdP hangs", S(10), || async {
        let t0 = Instant::now();
        let g = try_get(&c, &url).await.ok()?;
        (g.status == 503).then_some((g, t0.elapsed()))
    })
    .await;
    let (g, waited) = got_503;
    assert!(g.headers.contains_key("retry-after"), "{g:?}");
    assert!(
        waited >= Duration::from_millis(1900),
        "waited only {waited:?}"
    );
    wait_for("200 again once the slow grant lands", S(15), || async {
        try_get(&c, &url).await.ok().filter(|g| g.status == 200)
    })
    .await;
    let seen = run.recovers().await;
    assert!(seen.contains(&503), "{seen:?}");
}

/// The connection drops before / after the IdP processed the grant. With
/// `introspection_url`, before: verified active, retried, recovers; after
/// (the rotation is lost): verified inactive, `lost_rotation` with its hint,
/// and the spent token is never presented again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_resets_before_and_after_processing() {
    for (fault, dead) in [
        (Fault::ResetBeforeProcessing, false),
        (Fault::ResetAfterProcessing, true),
    ] {
        let stack = Stack::start(StackOpts::default()).await;
        let extra = format!(
            "max_backoff = \"1s\"\nintrospection_url = \"{}\"",
            stack.idp.introspection_url()
        );
        let app = stack.app(&extra).await;
        let generation = stack.wait_generation(1, S(10)).await;
        let stop = Arc::new(AtomicBool::new(false));
        let poller = poller(
            format!("http://{}/api/x", app.proxy_addr.unwrap()),
            stop.clone(),
        );
        let run = Run {
            stack,
            app,
            stop,
            poller,
            generation,
        };
        run.stack.idp.push_fault(fault);
        if dead {
            let st = run.wait_outcome("lost_rotation").await;
            assert_hint(&st);
            assert_eq!(st["state"], "dead", "{st}");
            // Stays dead: nothing presented again.
            let grants = run.stack.refresh_grants();
            tokio::time::sleep(S(2)).await;
            assert_eq!(run.stack.refresh_grants(), grants);
            run.finish().await;
        } else {
            run.recovers().await;
        }
    }
}

/// A run of different faults back to back: no reuse, no bad forward, and
/// the credential recovers. (A response lost after the IdP rotated, across a
/// proxy crash, is `engine::crash_with_held_rotation_*`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_never_happens_under_a_mix_of_faults() {
    let run = start("").await;
    for f in [
        status(500, "x", "text/plain", &[]),
        body(200, String::new()),
        Fault::Delay(Duration::from_millis(300)),
        status(429, "x", "text/plain", &[("Retry-After", "1")]),
        body(200, "{}".into()),
    ] {
        run.stack.idp.push_fault(f);
    }
    wait_for("faults consumed", S(20), || async {
        (run.stack.idp.pending_faults() == 0).then_some(())
    })
    .await;
    run.recovers().await;
}

/// Without `introspection_url` or `reuse_grace`, an unusable 2xx is a
/// possible lost rotation: the IdP may have rotated and its answer is lost.
/// The credential goes Dead `lost_rotation` instead of presenting the old
/// refresh token again on a guess.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_2xx_without_introspection_is_a_lost_rotation() {
    let run = start_with("", false).await;
    run.stack
        .idp
        .push_fault(body(200, "{\"token_type\":\"Bearer\"}".into()));
    let st = run.wait_outcome("lost_rotation").await;
    assert_hint(&st);
    let grants = run.stack.refresh_grants();
    tokio::time::sleep(S(2)).await;
    assert_eq!(run.stack.refresh_grants(), grants, "no retry on a guess");
    run.finish().await;
}
