//! `tokenproxy doctor` as a user runs it: the binary against the dev IdP,
//! healthy and broken configs, checking each line names the cause and the
//! fix, and that no refresh token is ever spent.

use crate::harness::*;
use std::process::{Command, Stdio};
use std::sync::Arc;
use tokenproxy::dev::{DevClient, IdpOptions};

const RT_SECRET: &str = "doc-rt-secret-Lm55";
const CC_SECRET: &str = "doc-cc-secret-Tt09";

fn options() -> IdpOptions {
    let mut rt = DevClient::confidential("rt-client", RT_SECRET);
    rt.auth_method = Some("client_secret_basic".into());
    rt.redirect_uris = vec!["http://127.0.0.1:9901/callback".into()];
    let cc = DevClient::confidential("cc-client", CC_SECRET);
    IdpOptions {
        clients: vec![rt, cc],
        ..IdpOptions::default()
    }
}

/// `rt` via discovery (`issuer`) plus `@RT_EXTRA@` lines, `cc` with a
/// real grant, one route each to the echo upstream.
const CONFIG: &str = r#"
[credentials.rt]
grant = "refresh_token"
issuer = "@IDP@"
redirect_uri = "http://127.0.0.1:9901/callback"
client_id = "rt-client"
client_secret = "${RT_SECRET}"
refresh_token = "${RT_SEED}"
@RT_EXTRA@

[credentials.cc]
grant = "client_credentials"
token_url = "@TOKEN_URL@"
client_id = "cc-client"
client_secret = "${CC_SECRET}"
auth_method = "client_secret_post"

[[routes]]
path_prefix = "/rt/"
upstream = "@ECHO@"
credential = "rt"

[[routes]]
path_prefix = "/cc/"
upstream = "@ECHO@"
credential = "cc"
"#;

async fn env(rt_secret: &str, cc_secret: &str, rt_extra: &str) -> (TestEnv, String) {
    let mut env = TestEnv::new(options()).await;
    let seed = env.idp.issue_refresh_token("rt-client", "alice");
    env.var("RT_SECRET", rt_secret)
        .var("CC_SECRET", cc_secret)
        .var("RT_SEED", &seed);
    env.configure(&CONFIG.replace("@RT_EXTRA@", rt_extra));
    (env, seed)
}

/// Runs `tokenproxy doctor -c <env's config> args...` off the runtime thread.
async fn doctor(env: &TestEnv, args: &[&str]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tokenproxy"));
    cmd.arg("doctor")
        .arg("-c")
        .arg(env.config_path())
        .args(args)
        .env_remove("TOKENPROXY_CONFIG")
        .stdin(Stdio::null());
    for (k, v) in &env.vars {
        cmd.env(k, v);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn line<'a>(out: &'a str, needle: &str) -> &'a str {
    out.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{out}"))
}

fn assert_clean(env: &TestEnv, out: &str, seed: &str) {
    for s in [RT_SECRET, CC_SECRET, seed] {
        assert!(!out.contains(s), "secret in doctor output:\n{out}");
    }
    assert_eq!(env.presented(seed), 0, "doctor spent the refresh token");
    assert_eq!(env.idp.reuse_count(), 0);
}

#[tokio::test]
async fn healthy_config_passes() {
    let (env, seed) = env(RT_SECRET, CC_SECRET, "").await;
    let (code, out) = doctor(&env, &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains('✗'), "{out}");
    assert!(line(&out, "config").starts_with('✓'));
    assert!(line(&out, "metadata at").starts_with('✓'));
    assert!(line(&out, "PKCE S256 supported").starts_with('✓'));
    assert!(line(&out, "rt: client authentication accepted").starts_with('✓'));
    assert!(line(&out, "client_credentials grant works").starts_with('✓'));
    assert!(line(&out, "rt: token endpoint").starts_with('✓'));
    assert!(line(&out, "rt: authorize endpoint").starts_with('✓'));
    assert!(line(&out, "clock within").starts_with('✓'));
    assert!(line(&out, "route /rt/: upstream").starts_with('✓'));
    assert!(line(&out, "store directory").starts_with('✓'));
    assert_clean(&env, &out, &seed);
}

#[tokio::test]
async fn running_proxy_view_is_shown() {
    let (mut env, seed) = env(RT_SECRET, CC_SECRET, "").await;
    let port = std::net::TcpListener::bind("127.0.0.2:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = std::fs::read_to_string(env.config_path())
        .unwrap()
        .replace(ADMIN_LISTEN, &format!("127.0.0.2:{port}"));
    std::fs::write(env.config_path(), &text).unwrap();
    let vars = env.vars.clone();
    env.config = Some(
        tokenproxy::config::parse(&text, &env.config_path(), &|k| vars.get(k).cloned()).unwrap(),
    );
    env.start().await;
    let (r, _) = env.get("/rt/x").await;
    assert_eq!(r.status(), 200);
    let (code, out) = doctor(&env, &["rt"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(line(&out, "running proxy: rt is").starts_with('✓'), "{out}");
    assert!(!out.contains("route /cc/"), "only rt's checks: {out}");
    // The proxy spent the seed once (adopting it); doctor did not.
    assert_eq!(env.presented(&seed), 1);
    assert_eq!(env.idp.reuse_count(), 0);
}

/// Off loopback the admin API answers `/credentials` only with
/// `admin.token`: doctor must send it to show the running proxy's view.
#[tokio::test]
async fn running_proxy_view_off_loopback_sends_the_admin_token() {
    let Some(ip) = non_loopback_ip() else {
        skip_unless_ci(
            "running_proxy_view_off_loopback_sends_the_admin_token",
            "no non-loopback address to bind",
        );
        return;
    };
    const ADMIN_TOKEN: &str = "doc-admin-tok-Pq81";
    let (mut env, seed) = env(RT_SECRET, CC_SECRET, "").await;
    let text = std::fs::read_to_string(env.config_path())
        .unwrap()
        .replace(ADMIN_LISTEN, &format!("{ip}:{}", free_port_on(ip)))
        .replacen(
            "[admin]\n",
            &format!("[admin]\ntoken = \"{ADMIN_TOKEN}\"\n"),
            1,
        );
    std::fs::write(env.config_path(), &text).unwrap();
    let vars = env.vars.clone();
    env.config = Some(
        tokenproxy::config::parse(&text, &env.config_path(), &|k| vars.get(k).cloned()).unwrap(),
    );
    env.start().await;
    let (r, _) = env.get("/rt/x").await;
    assert_eq!(r.status(), 200);
    let (code, out) = doctor(&env, &["rt"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(line(&out, "running proxy: rt is").starts_with('✓'), "{out}");
    assert!(!out.contains(ADMIN_TOKEN), "{out}");
    assert_eq!(env.presented(&seed), 1);
}

#[tokio::test]
async fn wrong_token_url_is_named() {
    let (env, seed) = env(RT_SECRET, CC_SECRET, "token_url = \"@IDP@/oauth/token\"").await;
    let (code, out) = doctor(&env, &[]).await;
    assert_eq!(code, 1, "{out}");
    let l = line(&out, "differs from the metadata's token_endpoint");
    assert!(l.starts_with('✗') && l.contains("fix:"), "{l}");
    let l = line(&out, "answered 404");
    assert!(
        l.starts_with('✗') && l.contains("token_url is wrong"),
        "{l}"
    );
    assert_clean(&env, &out, &seed);

    let (env, _) = env_with_token_url("http://127.0.0.1:9/token").await;
    let (code, out) = doctor(&env, &["cc"]).await;
    assert_eq!(code, 1, "{out}");
    let l = line(&out, "cc: token endpoint");
    assert!(l.starts_with('✗') && l.contains("nothing listens"), "{l}");
}

/// The advice follows the failure's type: a name that does not resolve, and
/// an https URL pointing at a port that speaks plain HTTP.
#[tokio::test]
async fn unresolvable_host_and_plaintext_port_are_named() {
    let unresolvable = cc_only("https://idp.no-such-host.invalid/token", None).await;
    let (code, out) = doctor(&unresolvable, &[]).await;
    assert_eq!(code, 1, "{out}");
    let l = line(&out, "cc: token endpoint");
    assert!(l.starts_with('✗') && l.contains("does not resolve"), "{l}");

    let (with_idp, _) = env(RT_SECRET, CC_SECRET, "").await;
    let plain = with_idp.idp.token_url().replace("http://", "https://");
    let plaintext = cc_only(&plain, None).await;
    let (code, out) = doctor(&plaintext, &[]).await;
    assert_eq!(code, 1, "{out}");
    let l = line(&out, "cc: token endpoint");
    assert!(
        l.starts_with('✗') && l.contains("does not speak TLS"),
        "{l}"
    );
}

async fn env_with_token_url(url: &str) -> (TestEnv, String) {
    let (mut env, seed) = env(RT_SECRET, CC_SECRET, "").await;
    let text = std::fs::read_to_string(env.config_path())
        .unwrap()
        .replace(&env.idp.token_url(), url);
    std::fs::write(env.config_path(), &text).unwrap();
    env.config = None;
    (env, seed)
}

#[tokio::test]
async fn wrong_secrets_are_named() {
    let (env, seed) = env("wrong-rt-secret", "wrong-cc-secret", "").await;
    let (code, out) = doctor(&env, &[]).await;
    assert_eq!(code, 1, "{out}");
    let l = line(&out, "rt: the IdP rejected the client");
    assert!(l.starts_with('✗'), "{l}");
    assert!(l.contains("auth_method = \"client_secret_basic\""), "{l}");
    // The same hint the engine gives (token::hints::invalid_client).
    assert!(
        l.contains("expects auth_method = \"client_secret_post\""),
        "{l}"
    );
    let l = line(&out, "cc: client_credentials grant failed");
    assert!(l.starts_with('✗') && l.contains("invalid_client"), "{l}");
    assert!(!out.contains("wrong-rt-secret") && !out.contains("wrong-cc-secret"));
    assert_clean(&env, &out, &seed);
}

#[tokio::test]
async fn unwritable_or_open_store_is_named() {
    let (env, seed) = env(RT_SECRET, CC_SECRET, "").await;
    // A file where the store's directory should be: not writable, even as root.
    std::fs::write(env.dir.path().join("blocker"), "").unwrap();
    let text = std::fs::read_to_string(env.config_path())
        .unwrap()
        .replace("path = \"tokens.json\"", "path = \"blocker/tokens.json\"");
    std::fs::write(env.config_path(), &text).unwrap();
    let (code, out) = doctor(&env, &["rt"]).await;
    assert_eq!(code, 1, "{out}");
    let l = line(&out, "is not writable");
    assert!(l.starts_with('✗') && l.contains("fix:"), "{l}");
    assert_clean(&env, &out, &seed);

    let (env, _) = self::env(RT_SECRET, CC_SECRET, "").await;
    std::fs::write(env.store_path(), "{}").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(env.store_path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out) = doctor(&env, &["rt"]).await;
    assert_eq!(code, 1, "{out}");
    let l = line(&out, "has mode 0644");
    assert!(l.starts_with('✗') && l.contains("chmod 600"), "{l}");
}

#[tokio::test]
async fn metadata_mismatch_is_named() {
    // auth_method the IdP does not list, and an issuer spelled differently.
    let (env, seed) = env(RT_SECRET, CC_SECRET, "").await;
    let text = std::fs::read_to_string(env.config_path()).unwrap().replace(
        &format!("issuer = \"{}\"", env.idp.url()),
        &format!(
            "issuer = \"{}\"",
            env.idp.url().replace("127.0.0.1", "localhost")
        ),
    );
    std::fs::write(env.config_path(), &text).unwrap();
    let (code, out) = doctor(&env, &["rt"]).await;
    assert_eq!(code, 1, "{out}");
    let l = line(&out, "discovery failed");
    assert!(l.starts_with('✗') && l.contains("must be equal"), "{l}");
    assert_clean(&env, &out, &seed);
}

// ---------------------------------------------------------------------------
// TLS: a token endpoint with a private CA, and one with an expired cert.
// ---------------------------------------------------------------------------

/// An HTTPS server answering 404 to everything.
async fn tls_server(config: Arc<rustls::ServerConfig>) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|_req| async {
                    let mut r = http::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from_static(b"{}"),
                    ));
                    *r.status_mut() = http::StatusCode::NOT_FOUND;
                    Ok::<_, std::convert::Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

async fn cc_only(token_url: &str, ca_file: Option<&str>) -> TestEnv {
    let mut env = TestEnv::new(options()).await;
    env.var("CC_SECRET", CC_SECRET);
    let ca = ca_file
        .map(|c| format!("ca_file = \"{c}\"\n"))
        .unwrap_or_default();
    env.configure(&format!(
        "[credentials.cc]\ngrant = \"client_credentials\"\ntoken_url = \"{token_url}\"\n\
         client_id = \"cc-client\"\nclient_secret = \"${{CC_SECRET}}\"\n{ca}"
    ));
    env
}

#[tokio::test]
async fn untrusted_private_ca_is_named() {
    let addr = tls_server(tokenproxy::dev::tls::test_server_config()).await;
    let url = format!("https://127.0.0.1:{}/token", addr.port());
    let env = cc_only(&url, None).await;
    let (code, out) = doctor(&env, &[]).await;
    assert_eq!(code, 1, "{out}");
    let l = line(&out, "cc: token endpoint");
    assert!(l.starts_with('✗') && l.contains("set ca_file"), "{l}");

    // Trusting the CA, the endpoint answers (the 404 then fails the grant).
    let env2 = cc_only(&url, Some("ca.pem")).await;
    std::fs::write(
        env2.dir.path().join("ca.pem"),
        tokenproxy::dev::tls::TEST_CA_PEM,
    )
    .unwrap();
    let (_, out) = doctor(&env2, &[]).await;
    assert!(line(&out, "cc: token endpoint").starts_with('✓'), "{out}");
}

/// A CA and a leaf for 127.0.0.1 that expired in 2021, made with the openssl
/// CLI (`openssl ca` can backdate). None when openssl is missing.
fn expired_pki(dir: &std::path::Path) -> Option<()> {
    let run = |args: &[&str]| {
        Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok()
            .filter(|s| s.success())
    };
    run(&["version"])?;
    std::fs::write(dir.join("index.txt"), "").ok()?;
    std::fs::write(dir.join("serial"), "1000\n").ok()?;
    std::fs::write(
        dir.join("ca.cnf"),
        "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n\
         default_md = sha256\npolicy = p\nx509_extensions = ext\n[p]\ncommonName = supplied\n\
         [ext]\nsubjectAltName = IP:127.0.0.1\nbasicConstraints = CA:FALSE\n\
         extendedKeyUsage = serverAuth\n",
    )
    .ok()?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=doctor-test-ca",
        "-days",
        "3650",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=keyCertSign,cRLSign",
    ]);
    run(&a)?;
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    run(&a)?;
    run(&[
        "ca",
        "-batch",
        "-config",
        "ca.cnf",
        "-cert",
        "ca.pem",
        "-keyfile",
        "ca.key",
        "-in",
        "leaf.csr",
        "-out",
        "leaf.pem",
        "-notext",
        "-startdate",
        "20200101000000Z",
        "-enddate",
        "20210101000000Z",
    ])?;
    Some(())
}

#[tokio::test]
async fn expired_certificate_is_named() {
    let pki = tempfile::tempdir().unwrap();
    if expired_pki(pki.path()).is_none() {
        skip_unless_ci("expired_certificate_is_named", "the openssl CLI is missing");
        return;
    }
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> =
        rustls::pki_types::CertificateDer::pem_file_iter(pki.path().join("leaf.pem"))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(pki.path().join("leaf.key")).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(tokenproxy::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let addr = tls_server(Arc::new(server)).await;
    let url = format!("https://127.0.0.1:{}/token", addr.port());
    let ca = pki.path().join("ca.pem");
    let env = cc_only(&url, Some(ca.to_str().unwrap())).await;
    let (code, out) = doctor(&env, &[]).await;
    assert_eq!(code, 1, "{out}");
    let l = line(&out, "cc: token endpoint");
    assert!(l.starts_with('✗') && l.contains("expired"), "{l}");
}

#[tokio::test]
async fn a_device_authorization_url_is_checked_against_the_metadata() {
    let (env, seed) = env(
        RT_SECRET,
        CC_SECRET,
        "device_authorization_url = \"@IDP@/device\"\n",
    )
    .await;
    let (_, out) = doctor(&env, &["rt"]).await;
    let l = line(&out, "device_authorization_url matches");
    assert!(l.starts_with('✓'), "{l}\n{out}");
    let l = line(&out, "device_code grant");
    assert!(l.starts_with('✓'), "{l}\n{out}");
    assert_clean(&env, &out, &seed);

    let (env, seed) = self::env(
        RT_SECRET,
        CC_SECRET,
        "device_authorization_url = \"@IDP@/device-elsewhere\"\n",
    )
    .await;
    let (code, out) = doctor(&env, &["rt"]).await;
    assert_eq!(code, 1, "{out}");
    let l = line(&out, "device_authorization_url");
    assert!(
        l.starts_with('✗') && l.contains("differs") && l.contains("fix:"),
        "{l}\n{out}"
    );
    assert_clean(&env, &out, &seed);
}

#[tokio::test]
async fn dpop_algorithm_is_checked_against_the_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("dpop.key");
    std::fs::write(
        &key,
        include_str!("../../src/dev/testdata/dpop-ed25519.key"),
    )
    .unwrap();
    let (env, seed) = env(
        RT_SECRET,
        CC_SECRET,
        &format!("dpop = true\ndpop_key = \"{}\"", key.display()),
    )
    .await;
    let (code, out) = doctor(&env, &["rt"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        line(&out, "rt: the IdP accepts DPoP proofs signed EdDSA").starts_with('✓'),
        "{out}"
    );
    let want = tokenproxy::dpop::DpopKey::from_pem(
        include_str!("../../src/dev/testdata/dpop-ed25519.key").as_bytes(),
    )
    .unwrap();
    let l = line(&out, "dpop_key");
    assert!(
        l.contains(want.thumbprint()) && !l.contains("PRIVATE"),
        "{l}"
    );
    assert_clean(&env, &out, &seed);
}

/// What a provider profile knows: Okta issues no refresh token without
/// `offline_access`; a Keycloak `domain` that does not resolve is named as
/// such, not only as an unreachable endpoint. Nothing is spent.
#[tokio::test]
async fn provider_profiles_warn_about_what_they_know() {
    let (e, seed) = env(RT_SECRET, CC_SECRET, "provider = \"okta\"").await;
    let (_, out) = doctor(&e, &["rt"]).await;
    let l = line(&out, "rt: scopes lack offline_access");
    assert!(l.starts_with('!'), "{l}");
    assert!(l.contains("Okta") && l.contains("tokenproxy login"), "{l}");
    assert_clean(&e, &out, &seed);

    let (e, seed) = env(
        RT_SECRET,
        CC_SECRET,
        "provider = \"okta\"\nscopes = [\"offline_access\"]",
    )
    .await;
    let (_, out) = doctor(&e, &["rt"]).await;
    assert!(line(&out, "rt: scopes include offline_access").starts_with('✓'));
    assert_clean(&e, &out, &seed);

    let (e, seed) = env(
        RT_SECRET,
        CC_SECRET,
        "provider = \"keycloak\"\ndomain = \"no-such-host.invalid\"\nrealm = \"apps\"",
    )
    .await;
    // The profile's token_url, not discovery: drop issuer.
    let text: String = std::fs::read_to_string(e.config_path())
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("issuer = "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(e.config_path(), text).unwrap();
    let (code, out) = doctor(&e, &["rt"]).await;
    assert_ne!(code, 0, "{out}");
    let l = line(&out, "rt: domain no-such-host.invalid does not resolve");
    assert!(l.starts_with('✗') && l.contains("check domain"), "{l}");
    assert_clean(&e, &out, &seed);

    // Microsoft answers a tenant it does not know with AADSTS90002.
    let (e, seed) = env(RT_SECRET, CC_SECRET, "").await;
    // Every request to the token endpoint gets it (the reachability probe too).
    for _ in 0..2 {
        e.idp.push_fault(tokenproxy::dev::Fault::Status {
            status: 400,
            body: r#"{"error":"invalid_request","error_description":"AADSTS90002: Tenant 'contoso.example' not found.","error_codes":[90002]}"#.into(),
            content_type: "application/json",
            headers: vec![],
        });
    }
    let (code, out) = doctor(&e, &["rt"]).await;
    assert_ne!(code, 0, "{out}");
    let l = line(&out, "rt: the tenant in token_url is unknown");
    assert!(l.starts_with('✗') && l.contains("set tenant"), "{l}");
    assert_clean(&e, &out, &seed);
}
