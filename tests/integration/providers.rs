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

/// Clients polling `/api/x` until stopped; every answer must be the
/// upstream's 200 with a valid token.
fn clients(url: String, stop: Arc<AtomicBool>, n: usize) -> Vec<tokio::task::JoinHandle<usize>> {
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
                    ok += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                ok
            })
        })
        .collect()
}

async fn serve_until_generation(stack: &Stack, extra: &str, generations: u64) {
    let app = stack.app(extra).await;
    let start = stack.wait_generation(1, S(10)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let url = format!("http://{}/api/x", app.proxy_addr.unwrap());
    let running = clients(url, stop.clone(), 4);
    stack.wait_generation(start + generations, S(30)).await;
    stop.store(true, Ordering::Relaxed);
    for c in running {
        assert!(c.await.expect("only 200s") > 0);
    }
    app.shutdown().await;
}

async fn profile_end_to_end(dialect: Dialect, extra: &str, hint_has: &str) {
    let stack = Stack::start(StackOpts {
        dialect,
        ..StackOpts::default()
    })
    .await;
    let extra = format!("{extra}\nmax_backoff = \"1s\"\n");
    // Rotations, a restart on the same store, more rotations.
    serve_until_generation(&stack, &extra, 3).await;
    serve_until_generation(&stack, &extra, 2).await;
    stack.assert_no_reuse();

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
    assert!(hint.contains(hint_has), "hint {hint:?} lacks {hint_has:?}");
    assert!(hint.contains("tokenproxy login"), "{hint}");
    let after = stack.refresh_grants();
    // Requests keep coming; the dead grant is not presented again.
    let c = client();
    for _ in 0..20 {
        let _ = get_ok(&c, &format!("http://{}/api/x", app.proxy_addr.unwrap())).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stack.refresh_grants(), after, "a dead grant was retried");
    stack.assert_no_reuse();
    assert_no_secrets(&[st.to_string()], &stack.secrets());
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_200_form_errors() {
    profile_end_to_end(Dialect::Github, "provider = \"github\"", "GitHub").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_ok_false() {
    profile_end_to_end(Dialect::Slack, "provider = \"slack\"", "Slack").await;
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
