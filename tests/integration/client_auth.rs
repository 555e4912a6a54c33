//! Client authentication beyond secrets (docs/client-authentication.md):
//! `private_key_jwt` with a key or a federated token file,
//! `client_secret_jwt`, and `tls_client_auth` / `self_signed_tls_client_auth`
//! through `mtls_endpoint_aliases`. The dev IdP verifies each method
//! strictly; the proxy runs as a child process so its real log lines are
//! scanned for keys, assertions and secrets.

use crate::harness::*;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokenproxy::dev::tls::testdata as td;
use tokenproxy::dev::{DevClient, DevIdp, EchoUpstream, Federated, IdpOptions};

/// A proxy child with the given credentials (`{NAME}` routes `/NAME/` to the
/// echo upstream), and the key files written beside its config.
struct Run {
    dir: tempfile::TempDir,
    idp: DevIdp,
    echo: EchoUpstream,
}

impl Run {
    async fn new(clients: Vec<DevClient>, mtls: bool) -> Run {
        let local = "127.0.0.1:0".parse().unwrap();
        let opts = IdpOptions {
            access_ttl: Duration::from_secs(2),
            clients,
            ..IdpOptions::default()
        };
        let idp = if mtls {
            DevIdp::start_mtls(local, opts).await
        } else {
            DevIdp::start(local, opts).await
        }
        .expect("dev IdP starts");
        let echo = EchoUpstream::start(local, idp.token_check())
            .await
            .expect("echo starts");
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            ("client-ec.key", td::EC_KEY),
            ("client-rsa.key", td::RSA_KEY),
            ("client-rsa.pem", td::RSA_CERT),
            ("mtls-client.pem", td::MTLS_CLIENT_CERT),
            ("mtls-client.key", td::MTLS_CLIENT_KEY),
            ("idp-ca.pem", tokenproxy::dev::tls::TEST_CA_PEM),
        ] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        Run { dir, idp, echo }
    }

    /// Starts `tokenproxy run` on `credentials` (TOML), one route per name.
    async fn proxy(&self, credentials: &str, names: &[&str]) -> ChildProxy {
        let ports = (free_port(), free_port());
        let mut text = format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\n\n[admin]\nlisten = \"127.0.0.1:{}\"\n\n[store]\npath = \"tokens.json\"\n\n[log]\nformat = \"json\"\nlevel = \"debug\"\n\n",
            ports.0, ports.1
        );
        text.push_str(
            &credentials
                .replace("@TOKEN_URL@", &self.idp.token_url())
                .replace("@IDP@", &self.idp.url()),
        );
        for n in names {
            text.push_str(&format!(
                "\n[[routes]]\npath_prefix = \"/{n}/\"\nupstream = \"{}\"\ncredential = \"{n}\"\n",
                self.echo.url()
            ));
        }
        let path = self.dir.path().join("proxy.toml");
        std::fs::write(&path, text).unwrap();
        ChildProxy::start(self.dir.path(), "proxy", &path, ports).await
    }
}

async fn status(p: &ChildProxy, name: &str) -> serde_json::Value {
    let all = get_ok(&client(), &format!("http://{}/credentials", p.admin))
        .await
        .json();
    all.as_array()
        .and_then(|a| a.iter().find(|s| s["credential"] == name).cloned())
        .unwrap_or_else(|| panic!("no {name} in {all}"))
}

async fn wait_dead(p: &ChildProxy, name: &str) -> serde_json::Value {
    wait_for(&format!("{name} dead"), Duration::from_secs(10), || async {
        let s = status(p, name).await;
        (s["state"] == "dead").then_some(s)
    })
    .await
}

/// The IdP's `error_description` as the proxy logged it for `name`.
fn refusal(p: &ChildProxy, name: &str) -> String {
    p.log_events()
        .iter()
        .filter(|e| e["credential"] == name)
        .find_map(|e| e["error_description"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no refusal logged for {name}: {}", p.output()))
}

/// Everything the proxy printed or serves about itself.
async fn outputs(p: &ChildProxy) -> Vec<String> {
    let c = client();
    let mut out = vec![p.output()];
    for path in ["/credentials", "/metrics", "/"] {
        if let Ok(g) = try_get(&c, &format!("http://{}{path}", p.admin)).await {
            out.push(g.text());
        }
    }
    out
}

/// No private key, no JWT (assertions start `eyJ`, the base64 of `{"`), no
/// listed secret.
fn assert_clean(outputs: &[String], secrets: &[&str]) {
    let mut all: Vec<String> = secrets.iter().map(|s| s.to_string()).collect();
    for pem in [td::EC_KEY, td::RSA_KEY, td::MTLS_CLIENT_KEY] {
        all.extend(
            pem.lines()
                .filter(|l| !l.starts_with("-----"))
                .map(str::to_owned),
        );
    }
    assert_no_secrets(outputs, &all);
    for (i, o) in outputs.iter().enumerate() {
        assert!(!o.contains("eyJ"), "output #{i} holds a JWT");
        assert!(!o.contains("PRIVATE KEY"), "output #{i} holds a key");
    }
}

async fn through(p: &ChildProxy, name: &str) {
    let g = get_ok(&client(), &p.url(&format!("/{name}/x"))).await;
    assert_eq!(g.json()["token_ok"], true, "{}", g.text());
}

fn auth_of(idp: &DevIdp, client: &str) -> Vec<(String, String)> {
    idp.grants()
        .into_iter()
        .filter(|g| g.client_id.as_deref() == Some(client))
        .map(|g| (g.client_auth, g.outcome))
        .collect()
}

#[tokio::test]
async fn private_key_jwt_rotates_a_refresh_token_and_gets_client_credentials() {
    let run = Run::new(
        vec![
            DevClient::private_key_jwt("pkj-rt", td::EC_PUBLIC),
            DevClient::private_key_jwt("pkj-cc", td::RSA_PUBLIC),
        ],
        false,
    )
    .await;
    let seed = run.idp.issue_refresh_token("pkj-rt", "alice");
    let creds = format!(
        r#"
[credentials.rt]
grant = "refresh_token"
token_url = "@TOKEN_URL@"
client_id = "pkj-rt"
auth_method = "private_key_jwt"
client_assertion_key = "client-ec.key"
client_assertion_kid = "ec-1"
refresh_token = "{seed}"

[credentials.cc]
grant = "client_credentials"
token_url = "@TOKEN_URL@"
issuer = "@IDP@"
client_id = "pkj-cc"
auth_method = "private_key_jwt"
client_assertion_key = "client-rsa.key"
client_assertion_alg = "PS256"
client_assertion_cert = "client-rsa.pem"
client_assertion_aud = "issuer"
"#
    );
    let p = run.proxy(&creds, &["rt", "cc"]).await;
    through(&p, "rt").await;
    through(&p, "cc").await;
    // 2 s tokens: the refresh token rotates several times on its own.
    wait_for("3 rotations", Duration::from_secs(15), || async {
        (run.idp.grant_count("refresh_token") >= 3).then_some(())
    })
    .await;
    through(&p, "rt").await;
    assert_eq!(run.idp.reuse_count(), 0);
    for client in ["pkj-rt", "pkj-cc"] {
        let seen = auth_of(&run.idp, client);
        assert!(!seen.is_empty());
        for (auth, outcome) in &seen {
            assert_eq!((auth.as_str(), outcome.as_str()), ("private_key_jwt", "ok"));
        }
    }
    let rt = status(&p, "rt").await;
    assert_ne!(rt["state"], "dead", "{rt}");
    let mut secrets = vec![seed.clone()];
    secrets.extend(
        run.idp
            .grants()
            .iter()
            .filter_map(|g| g.refresh_token.clone()),
    );
    assert_clean(
        &outputs(&p).await,
        &secrets.iter().map(String::as_str).collect::<Vec<_>>(),
    );
}

#[tokio::test]
async fn a_key_the_idp_does_not_know_kills_the_credential_with_a_hint_naming_it() {
    // The IdP holds client-ec.pub; the proxy signs with another P-256 key.
    let run = Run::new(
        vec![
            DevClient::private_key_jwt("wrong-key", td::EC_PUBLIC),
            DevClient::private_key_jwt("wrong-aud", td::EC_PUBLIC),
        ],
        false,
    )
    .await;
    let creds = r#"
[credentials.key]
grant = "client_credentials"
token_url = "@TOKEN_URL@"
client_id = "wrong-key"
auth_method = "private_key_jwt"
client_assertion_key = "mtls-client.key"

[credentials.aud]
grant = "client_credentials"
token_url = "@TOKEN_URL@"
client_id = "wrong-aud"
auth_method = "private_key_jwt"
client_assertion_key = "client-ec.key"
client_assertion_aud = "https://elsewhere.example/token"
"#;
    let p = run.proxy(creds, &["key", "aud"]).await;
    for (name, client, why) in [
        ("key", "wrong-key", "bad signature"),
        ("aud", "wrong-aud", "wrong aud"),
    ] {
        let st = wait_dead(&p, name).await;
        assert_eq!(st["last_error"]["reason"], "invalid_client", "{st}");
        assert_eq!(refusal(&p, name), why, "{st}");
        let hint = st["last_error"]["hint"].as_str().unwrap_or_default();
        assert!(hint.contains("client_assertion_key"), "{hint}");
        assert!(hint.contains("JWK thumbprint"), "{hint}");
        assert!(auth_of(&run.idp, client)
            .iter()
            .all(|(a, _)| a == "invalid"));
    }
    let g = try_get(&client(), &p.url("/key/x")).await.unwrap();
    assert_eq!(g.status, 503, "{}", g.text());
    assert_clean(&outputs(&p).await, &[]);
}

/// A JWT as a Kubernetes projected service-account token looks, signed by
/// "the cluster" (client-ec.key), for `aud` and `exp`.
fn projected_token(exp: u64) -> String {
    let key = jsonwebtoken::EncodingKey::from_ec_pem(td::EC_KEY.as_bytes()).unwrap();
    let claims = serde_json::json!({
        "iss": "https://kubernetes.default.svc",
        "sub": "system:serviceaccount:apps:billing",
        "aud": "api://tokenproxy-federation",
        "iat": exp - 600,
        "exp": exp,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims,
        &key,
    )
    .unwrap()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn a_federated_token_file_is_read_per_request_and_never_used_expired() {
    let mut fed = DevClient::private_key_jwt("wif-client", td::EC_PUBLIC);
    fed.federated = Some(Federated {
        issuer: "https://kubernetes.default.svc".into(),
        subject: "system:serviceaccount:apps:billing".into(),
        audience: "api://tokenproxy-federation".into(),
    });
    let run = Run::new(vec![fed], false).await;
    let file = run.dir.path().join("sa-token");
    let expired = projected_token(unix_now() - 30);
    std::fs::write(&file, &expired).unwrap();
    let creds = r#"
[credentials.wif]
grant = "client_credentials"
token_url = "@TOKEN_URL@"
client_id = "wif-client"
auth_method = "private_key_jwt"
client_assertion_file = "sa-token"
"#;
    let p = run.proxy(creds, &["wif"]).await;
    let st = wait_dead(&p, "wif").await;
    let err = st["last_error"].to_string();
    assert!(err.contains("sa-token") && err.contains("expired"), "{st}");
    assert!(
        run.idp.grants().is_empty(),
        "an expired token is never presented"
    );
    // The kubelet writes a fresh one: the watched file brings it back.
    let fresh = projected_token(unix_now() + 3600);
    std::fs::write(&file, &fresh).unwrap();
    wait_for("wif healthy", Duration::from_secs(20), || async {
        let s = status(&p, "wif").await;
        (s["state"] != "dead" && run.idp.grant_count("client_credentials") >= 1).then_some(())
    })
    .await;
    through(&p, "wif").await;
    // Several grants present the same (still valid) file token.
    let before = run.idp.grant_count("client_credentials");
    wait_for("another grant", Duration::from_secs(10), || async {
        (run.idp.grant_count("client_credentials") > before).then_some(())
    })
    .await;
    assert!(auth_of(&run.idp, "wif-client")
        .iter()
        .all(|(a, o)| a == "private_key_jwt" && o == "ok"));
    assert_clean(&outputs(&p).await, &[&expired, &fresh]);
}

#[tokio::test]
async fn client_secret_jwt_signs_with_the_secret_and_a_wrong_secret_is_refused() {
    const SECRET: &str = "csj-secret-0123456789-abcdefghij";
    let run = Run::new(
        vec![
            DevClient::client_secret_jwt("csj", SECRET),
            DevClient::client_secret_jwt("csj-bad", "another-secret-0123456789-abcdef"),
        ],
        false,
    )
    .await;
    let creds = format!(
        r#"
[credentials.good]
grant = "client_credentials"
token_url = "@TOKEN_URL@"
client_id = "csj"
client_secret = "{SECRET}"
auth_method = "client_secret_jwt"

[credentials.bad]
grant = "client_credentials"
token_url = "@TOKEN_URL@"
client_id = "csj-bad"
client_secret = "{SECRET}"
auth_method = "client_secret_jwt"
"#
    );
    let p = run.proxy(&creds, &["good", "bad"]).await;
    through(&p, "good").await;
    assert!(auth_of(&run.idp, "csj")
        .iter()
        .all(|(a, o)| a == "client_secret_jwt" && o == "ok"));
    let st = wait_dead(&p, "bad").await;
    assert_eq!(refusal(&p, "bad"), "bad signature", "{st}");
    let hint = st["last_error"]["hint"].as_str().unwrap_or_default();
    assert!(hint.contains("client_secret (the HS256 key)"), "{hint}");
    assert_clean(&outputs(&p).await, &[SECRET]);
}

/// POSTs a form to the IdP's token endpoint; returns status and body.
async fn post_token(idp: &DevIdp, form: &[(&str, &str)]) -> (u16, serde_json::Value) {
    let body: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let addr = idp.addr();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST /token HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text[9..12].parse().unwrap();
    let json = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| b.find('{').map(|i| &b[i..]))
        .and_then(|b| serde_json::from_str(b.trim_end_matches(|c| c != '}')).ok())
        .unwrap_or_default();
    (status, json)
}

#[tokio::test]
async fn the_dev_idp_refuses_replayed_expired_long_lived_and_misaddressed_assertions() {
    let run = Run::new(
        vec![DevClient::private_key_jwt("strict", td::EC_PUBLIC)],
        false,
    )
    .await;
    let key = jsonwebtoken::EncodingKey::from_ec_pem(td::EC_KEY.as_bytes()).unwrap();
    let token_url = run.idp.token_url();
    let now = unix_now();
    let sign = |claims: serde_json::Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            &claims,
            &key,
        )
        .unwrap()
    };
    let claims = |jti: &str, iat: u64, exp: u64, aud: &str, sub: &str| serde_json::json!({"iss": "strict", "sub": sub, "aud": aud, "jti": jti, "iat": iat, "exp": exp});
    let present = |jwt: String| {
        let idp = run.idp.clone();
        async move {
            post_token(
                &idp,
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", "strict"),
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    ),
                    ("client_assertion", &jwt),
                ],
            )
            .await
        }
    };
    let good = sign(claims("j1", now, now + 60, &token_url, "strict"));
    assert_eq!(present(good.clone()).await.0, 200);
    let (status, body) = present(good).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error_description"], "assertion jti replayed");
    for (jwt, why) in [
        (
            sign(claims("j2", now - 300, now - 200, &token_url, "strict")),
            "assertion expired",
        ),
        (
            sign(claims("j3", now, now + 3600, &token_url, "strict")),
            "assertion lives longer than 60 s",
        ),
        (
            sign(claims(
                "j4",
                now,
                now + 60,
                "https://other.example/token",
                "strict",
            )),
            "wrong aud",
        ),
        (
            sign(claims("j5", now, now + 60, &token_url, "someone-else")),
            "wrong sub",
        ),
        (
            sign(
                serde_json::json!({"iss": "strict", "sub": "strict", "aud": token_url, "iat": now, "exp": now + 60}),
            ),
            "assertion has no jti",
        ),
    ] {
        let (status, body) = present(jwt).await;
        assert_eq!(status, 401, "{why}: {body}");
        assert_eq!(body["error"], "invalid_client", "{body}");
        assert_eq!(body["error_description"], why, "{body}");
    }
    // The issuer is an accepted audience too (client_assertion_aud = "issuer").
    let (status, _) = present(sign(claims("j6", now, now + 60, &run.idp.url(), "strict"))).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn tls_client_auth_uses_the_mtls_alias_and_the_certificate_decides() {
    let run = Run::new(
        vec![
            DevClient::tls_client_auth("pki-client", td::MTLS_CA, "client.tokenproxy.test"),
            DevClient::self_signed_tls_client_auth("self-client", td::RSA_CERT),
            DevClient::self_signed_tls_client_auth("wrong-cert", td::RSA_CERT),
            DevClient::tls_client_auth("no-alias", td::MTLS_CA, "client.tokenproxy.test"),
        ],
        true,
    )
    .await;
    let seed = run.idp.issue_refresh_token("pki-client", "alice");
    let creds = format!(
        r#"
[credentials.pki]
grant = "refresh_token"
issuer = "@IDP@"
ca_file = "idp-ca.pem"
client_id = "pki-client"
auth_method = "tls_client_auth"
client_cert = "mtls-client.pem"
client_key = "mtls-client.key"
refresh_token = "{seed}"

[credentials.self]
grant = "client_credentials"
issuer = "@IDP@"
ca_file = "idp-ca.pem"
client_id = "self-client"
auth_method = "self_signed_tls_client_auth"
client_cert = "client-rsa.pem"
client_key = "client-rsa.key"

[credentials.wrong]
grant = "client_credentials"
issuer = "@IDP@"
ca_file = "idp-ca.pem"
client_id = "wrong-cert"
auth_method = "self_signed_tls_client_auth"
client_cert = "mtls-client.pem"
client_key = "mtls-client.key"

[credentials.noalias]
grant = "client_credentials"
token_url = "@TOKEN_URL@"
ca_file = "idp-ca.pem"
client_id = "no-alias"
auth_method = "tls_client_auth"
client_cert = "mtls-client.pem"
client_key = "mtls-client.key"
"#
    );
    let p = run
        .proxy(&creds, &["pki", "self", "wrong", "noalias"])
        .await;
    through(&p, "pki").await;
    through(&p, "self").await;
    wait_for("2 rotations", Duration::from_secs(15), || async {
        (run.idp.grant_count("refresh_token") >= 2).then_some(())
    })
    .await;
    through(&p, "pki").await;
    assert_eq!(run.idp.reuse_count(), 0);
    assert!(auth_of(&run.idp, "pki-client")
        .iter()
        .all(|(a, o)| a == "tls_client_auth" && o == "ok"));
    assert!(auth_of(&run.idp, "self-client")
        .iter()
        .all(|(a, o)| a == "self_signed_tls_client_auth" && o == "ok"));
    for (name, why) in [
        ("wrong", "client certificate is not the registered one"),
        (
            "noalias",
            "tls_client_auth is served at the mtls_endpoint_aliases token endpoint",
        ),
    ] {
        let st = wait_dead(&p, name).await;
        assert_eq!(refusal(&p, name), why, "{st}");
        let hint = st["last_error"]["hint"].as_str().unwrap_or_default();
        assert!(
            hint.contains("client_cert") && hint.contains("mtls_endpoint_aliases"),
            "{hint}"
        );
    }
    assert_clean(&outputs(&p).await, &[&seed]);
}

#[test]
fn check_names_the_unusable_key_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("enc.key"), td::ENCRYPTED_KEY).unwrap();
    std::fs::write(dir.path().join("p384.key"), td::EC384_KEY).unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        r#"[credentials.a]
grant = "client_credentials"
token_url = "https://idp.example/token"
client_id = "a"
auth_method = "private_key_jwt"
client_assertion_key = "enc.key"

[credentials.b]
grant = "client_credentials"
token_url = "https://idp.example/token"
client_id = "b"
auth_method = "private_key_jwt"
client_assertion_key = "p384.key"

[[routes]]
path_prefix = "/a/"
upstream = "https://api.example/"
credential = "a"
"#,
    )
    .unwrap();
    let out = run_cli(&[Path::new("check"), Path::new("-c"), config.as_path()]);
    assert_eq!(out.code, Some(64), "{}", out.text());
    let text = out.text();
    let shown = config.display().to_string();
    assert!(
        text.contains(&format!(
            "{shown}:6:24: credentials.a.client_assertion_key:"
        )),
        "{text}"
    );
    assert!(text.contains("encrypted"), "{text}");
    assert!(
        text.contains(&format!(
            "{shown}:13:24: credentials.b.client_assertion_key:"
        )),
        "{text}"
    );
    assert!(text.contains("p384.key is not an RSA"), "{text}");
    assert!(!text.contains("PRIVATE KEY"), "{text}");
}

/// `tokenproxy doctor -c FILE` off the runtime thread: exit code and output.
async fn doctor(config: &Path) -> (i32, String) {
    let config = config.to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        run_cli(&[Path::new("doctor"), Path::new("-c"), config.as_path()])
    })
    .await
    .unwrap();
    (out.code.unwrap_or(-1), out.text())
}

#[tokio::test]
async fn doctor_proves_key_and_certificate_clients_without_spending_and_names_public_facts() {
    let run = Run::new(
        vec![
            DevClient::private_key_jwt("pkj-rt", td::EC_PUBLIC),
            DevClient::tls_client_auth("pki-client", td::MTLS_CA, "client.tokenproxy.test"),
        ],
        true,
    )
    .await;
    let seed = run.idp.issue_refresh_token("pkj-rt", "alice");
    let mtls_seed = run.idp.issue_refresh_token("pki-client", "bob");
    let ports = (free_port(), free_port());
    let config = run.dir.path().join("doctor.toml");
    std::fs::write(
        &config,
        format!(
            r#"[server]
listen = "127.0.0.1:{}"
[admin]
listen = "127.0.0.1:{}"
[store]
path = "tokens.json"

[credentials.rt]
grant = "refresh_token"
issuer = "{idp}"
ca_file = "idp-ca.pem"
client_id = "pkj-rt"
auth_method = "private_key_jwt"
client_assertion_key = "client-ec.key"
client_assertion_kid = "ec-1"
refresh_token = "{seed}"

[credentials.pki]
grant = "refresh_token"
issuer = "{idp}"
ca_file = "idp-ca.pem"
client_id = "pki-client"
auth_method = "tls_client_auth"
client_cert = "mtls-client.pem"
client_key = "mtls-client.key"
refresh_token = "{mtls_seed}"

[[routes]]
path_prefix = "/rt/"
upstream = "https://api.example/"
credential = "rt"
"#,
            ports.0,
            ports.1,
            idp = run.idp.url(),
        ),
    )
    .unwrap();
    let (_, out) = doctor(&config).await;
    let key = tokenproxy::assertion::load_key(td::EC_KEY.as_bytes(), None, None, None).unwrap();
    assert!(
        out.contains("client authentication accepted (private_key_jwt"),
        "{out}"
    );
    assert!(
        out.contains("client authentication accepted (tls_client_auth"),
        "{out}"
    );
    assert!(out.contains("kid ec-1"), "{out}");
    assert!(out.contains(key.thumbprint()), "{out}");
    assert!(
        out.contains("auth_method private_key_jwt is supported"),
        "{out}"
    );
    assert!(out.contains("x5t#S256"), "{out}");
    // Nothing spent: the seeds were never presented as real grants.
    for s in [&seed, &mtls_seed] {
        assert!(run
            .idp
            .grants()
            .iter()
            .all(|g| g.refresh_token.as_deref() != Some(s)));
    }
    assert_clean(&[out], &[&seed, &mtls_seed]);
}
