//! Reload: a changed config file is picked up by itself; an invalid one is
//! rejected and the running config kept; a new seed revives a dead
//! credential (seeds: docs/architecture.md).

use crate::harness::{client, get, send};
use std::time::{Duration, Instant};
use tokenproxy::app::App;
use tokenproxy::dev::{DevIdp, EchoUpstream, IdpOptions};

fn config_text(idp: &DevIdp, echo: &EchoUpstream, seed: &str, extra_route: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
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
{extra_route}
"#,
        idp.token_url(),
        echo.url()
    )
}

async fn wait_status(url: &str, want: u16, within: Duration) -> u16 {
    let c = client();
    let deadline = Instant::now() + within;
    loop {
        let (resp, _) = send(&c, get(url)).await;
        let got = resp.status().as_u16();
        if got == want || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn file_change_reloads_and_a_new_seed_revives_a_dead_credential() {
    let idp = DevIdp::start("127.0.0.1:0".parse().unwrap(), IdpOptions::default())
        .await
        .unwrap();
    let echo = EchoUpstream::start("127.0.0.1:0".parse().unwrap(), idp.token_check())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    // A seed the IdP never issued: the first refresh is invalid_grant.
    std::fs::write(&path, config_text(&idp, &echo, "rt_not_issued", "")).unwrap();
    let cfg = tokenproxy::config::load(&path).unwrap();
    let app = App::start(&cfg).await.unwrap();
    let base = format!("http://{}", app.proxy_addr.unwrap());

    let c = client();
    let (resp, body) = send(&c, get(&format!("{base}/api/x"))).await;
    assert_eq!(resp.status(), 503, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        resp.headers()["x-tokenproxy-error"],
        "credential_unavailable"
    );

    // An invalid config is rejected; the running one keeps serving.
    std::fs::write(&path, "[server\nlisten = ").unwrap();
    assert!(app.reload().await.is_err());
    let (resp, _) = send(&c, get(&format!("{base}/api/x"))).await;
    assert_eq!(resp.status(), 503, "old config still in force");
    let (resp, _) = send(&c, get(&format!("{base}/nowhere"))).await;
    assert_eq!(resp.status(), 404);

    // A new seed (and a new route) in the file: picked up without a signal.
    let seed = idp.issue_refresh_token("demo-client", "u");
    let extra = format!(
        "[[routes]]\npath_prefix = \"/more/\"\nupstream = \"{}/\"\ncredential = \"user\"\n",
        echo.url()
    );
    std::fs::write(&path, config_text(&idp, &echo, &seed, &extra)).unwrap();
    assert_eq!(
        wait_status(&format!("{base}/api/x"), 200, Duration::from_secs(8)).await,
        200,
        "the new seed revives the credential within a few seconds"
    );
    assert_eq!(
        wait_status(&format!("{base}/more/y"), 200, Duration::from_secs(2)).await,
        200
    );
    assert_eq!(idp.reuse_count(), 0);
    app.shutdown().await;
}

/// The TLS listener follows the config on reload: certificates are read
/// again, and new connections use the new settings (here: TLS turned off).
#[tokio::test]
async fn reload_applies_new_listener_tls_settings_to_new_connections() {
    let idp = DevIdp::start("127.0.0.1:0".parse().unwrap(), IdpOptions::default())
        .await
        .unwrap();
    let echo = EchoUpstream::start("127.0.0.1:0".parse().unwrap(), idp.token_check())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/src/dev/testdata");
    let seed = idp.issue_refresh_token("demo-client", "u");
    let plain = config_text(&idp, &echo, &seed, "");
    let with_tls = plain.replace(
        "listen = \"127.0.0.1:0\"\n[admin]",
        &format!(
            "listen = \"127.0.0.1:0\"\ntls_cert = \"{data}/test-leaf.pem\"\ntls_key = \"{data}/test-leaf.key\"\n[admin]"
        ),
    );
    assert_ne!(plain, with_tls);
    std::fs::write(&path, &with_tls).unwrap();
    let app = App::start(&tokenproxy::config::load(&path).unwrap())
        .await
        .unwrap();
    let addr = app.proxy_addr.unwrap();
    let plain_request = "GET /api/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let answer = crate::harness::raw(addr, plain_request).await;
    assert!(
        !answer.starts_with("HTTP/1.1 200"),
        "a TLS listener must not answer plain HTTP: {answer}"
    );
    std::fs::write(&path, &plain).unwrap();
    app.reload().await.unwrap();
    let answer = crate::harness::raw(addr, plain_request).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    app.shutdown().await;
}
