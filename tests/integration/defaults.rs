//! Issue #17, "defaults that match what users expect": a server's
//! `Retry-After` bounded by `max_backoff`, discovered endpoints held to the
//! rules of configured ones, and TLS to PostgreSQL tried without `sslmode`.

use crate::harness::*;
use std::time::Duration;
use tokenproxy::dev::Fault;

const S: fn(u64) -> Duration = Duration::from_secs;

fn status_fault(status: u16, headers: &[(&str, &str)]) -> Fault {
    Fault::Status {
        status,
        body: "slow down".into(),
        content_type: "text/plain",
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// A 429 asking for a day (seconds, or an HTTP-date far ahead) does not park
/// the credential: the next attempt comes within `max_backoff`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_long_retry_after_is_capped_by_max_backoff() {
    let stack = Stack::start(StackOpts::default()).await;
    let app = stack.app("max_backoff = \"1s\"").await;
    let mut generation = stack.wait_generation(1, S(10)).await;
    for retry_after in ["86400", "Fri, 01 Jan 2100 00:00:00 GMT"] {
        let seen = stack.idp.grants().len();
        stack
            .idp
            .push_fault(status_fault(429, &[("Retry-After", retry_after)]));
        let faulted = wait_for("the 429", S(10), || async {
            stack.idp.grants()[seen..]
                .iter()
                .find(|g| g.fault == Some("status"))
                .map(|g| g.at)
        })
        .await;
        let next = wait_for("an attempt after the 429", S(6), || async {
            stack
                .idp
                .grants()
                .into_iter()
                .find(|g| g.at > faulted && g.fault.is_none())
                .map(|g| g.at)
        })
        .await;
        let gap = next.duration_since(faulted).unwrap();
        assert!(
            gap <= Duration::from_millis(1500),
            "Retry-After: {retry_after} waited {gap:?}, past max_backoff (1s)"
        );
        generation = stack.wait_generation(generation + 1, S(5)).await;
    }
    stack.assert_no_reuse();
    app.shutdown().await;
}

/// Serves the metadata `body(issuer)` at every path, over plain HTTP on
/// loopback (an issuer on loopback may be http, like a configured one).
async fn serve_metadata(body: impl Fn(&str) -> String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("http://{}", listener.local_addr().unwrap());
    let body = body(&issuer);
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(body.as_bytes()).await;
            });
        }
    });
    issuer
}

/// The endpoints of a credential configured with `issuer` only, whose
/// metadata holds `fields` (JSON members after `issuer`).
async fn discovered(
    stack: &Stack,
    fields: &'static str,
) -> Result<(String, Option<String>), String> {
    let issuer = serve_metadata(|i| format!(r#"{{"issuer":"{i}",{fields}}}"#)).await;
    let text = stack.toml(0, free_port(), "").replace(
        &format!("token_url = \"{}\"", stack.idp.token_url()),
        &format!("issuer = \"{issuer}\""),
    );
    assert!(text.contains("issuer = "), "token_url replaced");
    let cfg = tokenproxy::config::parse(&text, &stack.dir.path().join("p.toml"), &|_| None)
        .unwrap_or_else(|e| panic!("config rejected: {e}"));
    tokenproxy::discovery::endpoints(&cfg.credentials[CRED], None)
        .await
        .map(|(t, a)| (t.to_string(), a.map(|a| a.to_string())))
        .map_err(|e| e.to_string())
}

/// Discovered endpoints follow the rule for configured ones: https, or http
/// on loopback only; anything else is refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovered_endpoints_must_be_https_or_loopback() {
    let stack = Stack::start(StackOpts::default()).await;
    let err = discovered(&stack, r#""token_endpoint":"http://idp.example/token""#)
        .await
        .unwrap_err();
    assert!(
        err.contains("token_endpoint")
            && err.contains("http://idp.example/token")
            && err.contains("https"),
        "{err}"
    );
    let err = discovered(
        &stack,
        r#""token_endpoint":"https://idp.example/token","authorization_endpoint":"http://idp.example/authorize""#,
    )
    .await
    .unwrap_err();
    assert!(
        err.contains("authorization_endpoint") && err.contains("https"),
        "{err}"
    );
    let err = discovered(&stack, r#""token_endpoint":"ftp://idp.example/token""#)
        .await
        .unwrap_err();
    assert!(err.contains("token_endpoint"), "{err}");

    let ok = discovered(
        &stack,
        r#""token_endpoint":"https://idp.example/token","authorization_endpoint":"http://127.0.0.1:9/authorize""#,
    )
    .await
    .unwrap();
    assert_eq!(ok.0, "https://idp.example/token");
    assert_eq!(ok.1.as_deref(), Some("http://127.0.0.1:9/authorize"));
    let ok = discovered(&stack, r#""token_endpoint":"http://localhost:9/token""#).await;
    assert_eq!(ok.unwrap().0, "http://localhost:9/token");
}

/// The stack's config with the postgres store at `url`.
fn pg_config(stack: &Stack, url: &str, name: &str) -> (std::path::PathBuf, (u16, u16)) {
    let (path, ports) = child_config(stack, name, "");
    let file_store = format!("[store]\npath = \"{}\"", stack.store_path().display());
    let text = std::fs::read_to_string(&path).unwrap().replace(
        &file_store,
        &format!("[store]\nkind = \"postgres\"\nurl = \"{url}\""),
    );
    assert!(text.contains("postgres://"), "store section replaced");
    std::fs::write(&path, text).unwrap();
    (path, ports)
}

/// Whether each of tokenproxy's sessions uses TLS (`t`/`f` per session).
fn tokenproxy_sessions_ssl(pg: &crate::fleet::Pg) -> Vec<String> {
    pg.psql(
        "SELECT ssl FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE application_name = 'tokenproxy'",
    )
    .lines()
    .map(str::to_owned)
    .collect()
}

/// Without `sslmode` the store tries TLS first, as libpq's `prefer` does:
/// a server offering TLS gets TLS (its certificate is not checked, as with
/// libpq), one without TLS still works in plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_without_sslmode_prefers_tls_and_falls_back_to_plaintext() {
    let Some(tls) = crate::fleet::Pg::start_tls() else {
        return;
    };
    let stack = Stack::start(StackOpts::default()).await;
    let dir = stack.dir.path();
    let c = client();
    assert!(!tls.url().contains("sslmode"), "{}", tls.url());
    let (path, ports) = pg_config(&stack, &tls.url(), "prefer-tls");
    let r = ChildProxy::start(dir, "prefer-tls", &path, ports).await;
    let g = get_ok(&c, &r.url("/api/x")).await;
    assert_eq!(g.status, 200, "{} {}", g.text(), r.output());
    let sessions = tokenproxy_sessions_ssl(&tls);
    assert!(
        !sessions.is_empty() && sessions.iter().all(|l| l == "t"),
        "TLS when the server offers it: {sessions:?}"
    );
    drop(r);
    drop(tls);

    stack.assert_no_reuse();

    // A new database is a new store: it needs a seed of its own.
    let Some(plain) = crate::fleet::Pg::start() else {
        return;
    };
    let stack = Stack::start(StackOpts::default()).await;
    let dir = stack.dir.path();
    let (path, ports) = pg_config(&stack, &plain.url(), "prefer-plain");
    let r = ChildProxy::start(dir, "prefer-plain", &path, ports).await;
    let g = get_ok(&c, &r.url("/api/x")).await;
    assert_eq!(g.status, 200, "{} {}", g.text(), r.output());
    let sessions = tokenproxy_sessions_ssl(&plain);
    assert!(
        !sessions.is_empty() && sessions.iter().all(|l| l == "f"),
        "plaintext when it does not: {sessions:?}"
    );
    drop(r);
    stack.assert_no_reuse();
}

/// `tokenproxy check` warns (exit 0) when a database off loopback would be
/// reached without verified TLS, and never prints the URL's password.
#[test]
fn check_warns_of_a_remote_database_without_verified_tls() {
    let dir = tempfile::tempdir().unwrap();
    let check = |url: &str| {
        let path = dir.path().join("check.toml");
        let text = format!(
            "[store]\nkind = \"postgres\"\nurl = \"{url}\"\n\n[credentials.c]\ngrant = \"client_credentials\"\ntoken_url = \"https://idp.example/token\"\nclient_id = \"c\"\nclient_secret = \"s3cret-client\"\n\n[[routes]]\npath_prefix = \"/\"\nupstream = \"https://api.example/\"\ncredential = \"c\"\n"
        );
        std::fs::write(&path, text).unwrap();
        let out = run_cli(&["check".as_ref(), "-c".as_ref(), path.as_os_str()]);
        assert_eq!(out.code, Some(0), "a warning, not an error: {}", out.text());
        assert!(!out.text().contains("hunter2"), "{}", out.text());
        out.text()
    };
    for (url, mode) in [
        ("postgres://tp:hunter2@db.example:5432/tp", "prefer"),
        (
            "postgres://tp:hunter2@db.example/tp?sslmode=prefer",
            "prefer",
        ),
        (
            "postgres://tp:hunter2@10.1.2.3/tp?sslmode=disable",
            "disable",
        ),
    ] {
        let out = check(url);
        let warning = out
            .lines()
            .find(|l| l.starts_with("warning: store.url"))
            .unwrap_or_else(|| panic!("no warning for {mode}: {out}"));
        assert!(warning.contains(&format!("sslmode={mode}")), "{warning}");
        assert!(warning.contains("verify-full"), "{warning}");
    }
    for url in [
        "postgres://tp:hunter2@db.example/tp?sslmode=verify-full&sslrootcert=/etc/ca.pem",
        "postgres://tp:hunter2@db.example/tp?sslmode=require",
        "postgres://tp:hunter2@127.0.0.1:5432/tp",
        "postgres://tp:hunter2@localhost/tp?sslmode=disable",
    ] {
        let out = check(url);
        assert!(!out.contains("warning"), "{url}: {out}");
    }
}

/// Seals `plain` as tokenproxy did before the KDF (`tpv2`: AES-256-GCM under
/// SHA-256 of the key string, key id from that hash).
fn seal_tpv2(key: &str, plain: &[u8]) -> String {
    use aes_gcm::aead::{Aead, KeyInit};
    use base64::Engine as _;
    use sha2::Digest as _;
    let derived = sha2::Sha256::digest(key.as_bytes());
    let mut input = b"tokenproxy-key-id\0".to_vec();
    input.extend_from_slice(&derived);
    let kid = tokenproxy::secret::fingerprint(&input);
    let nonce = [3u8; 12];
    let aes = aes_gcm::Aes256Gcm::new_from_slice(&derived).unwrap();
    let mut blob = nonce.to_vec();
    blob.extend(
        aes.encrypt(aes_gcm::Nonce::from_slice(&nonce), plain)
            .unwrap(),
    );
    format!(
        "tpv2:{kid}:{}",
        base64::engine::general_purpose::STANDARD.encode(blob)
    )
}

/// A file store sealed the old way (`tpv2`, SHA-256 of the passphrase)
/// still opens: the stored token serves without a grant. Its next write
/// seals it as `tpv3` through Argon2id, parameters and salt in the file; a
/// wrong passphrase then cannot open it, and no output shows the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tpv2_file_store_opens_and_its_next_write_uses_argon2id() {
    const KEY: &str = "a passphrase, not random bytes";
    // Tokens outlive the test: a grant happens only when asked for.
    let stack = Stack::start(StackOpts {
        access_ttl: S(600),
        ..StackOpts::default()
    })
    .await;
    let dir = stack.dir.path();
    let c = client();
    let raw = || std::fs::read_to_string(stack.record_path()).unwrap();

    // A plaintext store, then the same records sealed as tpv2 by hand.
    let (plain_cfg, plain_ports) = child_config(&stack, "plain", "");
    let mut plain = ChildProxy::start(dir, "plain", &plain_cfg, plain_ports).await;
    let access = bearer(&get_ok(&c, &plain.url("/api/x")).await);
    plain.kill9();
    // As a tokenproxy of that time wrote it: every record in the one file.
    let file: serde_json::Value = serde_json::from_str(&raw()).unwrap();
    let creds = serde_json::to_vec(&serde_json::json!({ CRED: file["record"] })).unwrap();
    let v2 = seal_tpv2(KEY, &creds);
    std::fs::remove_file(stack.record_path()).unwrap();
    std::fs::write(
        stack.store_path(),
        serde_json::json!({"version": 1, "sealed": v2}).to_string(),
    )
    .unwrap();

    let (path, ports) = child_config(&stack, "kdf", "");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, with_store_keys(&text, KEY, &[])).unwrap();
    let grants = stack.refresh_grants();
    let mut r = ChildProxy::start(dir, "kdf", &path, ports).await;
    let g = get_ok(&c, &r.url("/api/x")).await;
    assert_eq!(
        (g.status, bearer(&g)),
        (200, access),
        "the stored token: {}",
        r.output()
    );
    assert_eq!(stack.refresh_grants(), grants, "opened without a grant");
    // The next write (a refresh) reseals it.
    let refreshed = post_admin(&c, r.admin, &format!("/credentials/{CRED}/refresh")).await;
    assert_eq!(refreshed.status, 200, "{}", refreshed.text());
    wait_for("a write after the tpv2 read", S(10), || async {
        raw().contains("\"tpv3:").then_some(())
    })
    .await;
    r.kill9();
    let sealed = raw();
    let kid = key_id(KEY, &sealed);
    assert!(
        sealed.contains(&format!("\"tpv3:{kid}:argon2id$v=19$m=19456,t=2,p=1$")),
        "{sealed}"
    );
    assert!(
        !sealed.contains("tpv2:") && !sealed.contains(&v2[5..13]),
        "{sealed}"
    );
    stack.assert_no_reuse();

    let (wrong, _) = child_config(&stack, "wrong", "");
    let text = std::fs::read_to_string(&wrong).unwrap();
    std::fs::write(
        &wrong,
        with_store_keys(&text, "a passphrase, not random byte", &[]),
    )
    .unwrap();
    let failed = run_until_exit(dir, "wrong", &wrong, S(20)).await;
    assert_eq!(failed.code, Some(1), "{}", failed.text());
    assert!(
        failed.text().contains(&format!("sealed with key id {kid}")),
        "{}",
        failed.text()
    );
    assert_eq!(raw(), sealed, "never overwritten");
    let outputs: Vec<String> = ["plain", "kdf", "wrong"]
        .iter()
        .flat_map(|l| ["stdout", "stderr"].map(|k| dir.join(format!("{l}.{k}"))))
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect();
    let mut secrets = stack.secrets();
    secrets.push(KEY.to_owned());
    assert_no_secrets(&outputs, &secrets);
}
