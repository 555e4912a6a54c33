//! Tests of the dev servers over real sockets.

use super::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::sync::Arc;
use std::time::Duration;

type TestClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn local() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

struct Reply {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

async fn send(req: http::Request<Full<Bytes>>) -> Reply {
    let resp = client().request(req).await.expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

async fn get(url: &str, token: Option<&str>) -> Reply {
    let mut req = http::Request::get(url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    send(req.body(Full::default()).unwrap()).await
}

fn fixed_check(valid: &'static str) -> TokenCheck {
    Arc::new(move |t: &str| t == valid)
}

#[tokio::test]
async fn echo_rejects_missing_token_with_www_authenticate() {
    let echo = EchoUpstream::start(local(), fixed_check("good"))
        .await
        .unwrap();
    let r = get(&format!("{}/x", echo.url()), None).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.headers["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
    assert_eq!(r.json()["error"], "invalid_token");
    let r = get(&format!("{}/x", echo.url()), Some("bad")).await;
    assert_eq!(r.status, 401);
    assert_eq!(echo.requests(), 2);
}

#[tokio::test]
async fn echo_reports_request_with_valid_token() {
    let echo = EchoUpstream::start(local(), fixed_check("good"))
        .await
        .unwrap();
    let req = http::Request::post(format!("{}/a/b?x=1&y=%20z", echo.url()))
        .header("authorization", "token good")
        .header("x-b", "2")
        .header("x-a", "1")
        .header("x-b", "3")
        .body(Full::new(Bytes::from_static(b"hello")))
        .unwrap();
    let r = send(req).await;
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["method"], "POST");
    assert_eq!(j["path"], "/a/b");
    assert_eq!(j["query"], "x=1&y=%20z");
    assert_eq!(j["version"], "HTTP/1.1");
    assert_eq!(j["body_len"], 5);
    assert_eq!(j["token_ok"], true);
    assert_eq!(j["headers"]["x-b"], serde_json::json!(["2", "3"]));
    // serde_json's Value sorts keys, so check arrival order in the raw text.
    let raw = String::from_utf8_lossy(&r.body).into_owned();
    assert!(raw.find("\"x-b\"").unwrap() < raw.find("\"x-a\"").unwrap());
}

#[tokio::test]
async fn echo_special_paths() {
    let echo = EchoUpstream::start(local(), fixed_check("good"))
        .await
        .unwrap();
    let url = echo.url();
    let r = get(&format!("{url}/anything/status/503"), Some("good")).await;
    assert_eq!(r.status, 503);
    let r = get(&format!("{url}/bytes/200000"), Some("good")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 200_000);
    assert_eq!(r.headers["content-length"], "200000");
    let r = get(&format!("{url}/public/status/204"), None).await;
    assert_eq!(r.status, 204);
    let r = get(&format!("{url}/redirect"), Some("good")).await;
    assert_eq!(r.status, 302);
    assert_eq!(r.headers["location"], format!("{url}/landed"));
    assert_eq!(r.headers["link"], format!("<{url}/page2>; rel=\"next\""));
    let r = get(&format!("{url}/delay/20"), Some("good")).await;
    assert_eq!(r.status, 200);
    let r = get(&format!("{url}/slow-body/20"), Some("good")).await;
    assert_eq!(&r.body[..], b"slow body\n");
    let r = get(&format!("{url}/set-header/x-test/yes"), Some("good")).await;
    assert_eq!(r.headers["x-test"], "yes");
}

#[tokio::test]
async fn echo_streams_large_request_bodies() {
    let echo = EchoUpstream::start(local(), fixed_check("good"))
        .await
        .unwrap();
    let body = Bytes::from(vec![7u8; 10 * 1024 * 1024]);
    let req = http::Request::put(format!("{}/upload", echo.url()))
        .header("authorization", "Bearer good")
        .body(Full::new(body))
        .unwrap();
    let r = send(req).await;
    assert_eq!(r.json()["body_len"], 10 * 1024 * 1024);
}

#[tokio::test]
async fn echo_http2_prior_knowledge() {
    let echo = EchoUpstream::start(local(), fixed_check("good"))
        .await
        .unwrap();
    let client: TestClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let req = http::Request::get(format!("{}/public/x", echo.url()))
        .body(Full::default())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["version"], "HTTP/2.0");
}

#[tokio::test]
async fn echo_websocket_upgrade_echoes_bytes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = EchoUpstream::start(local(), fixed_check("good"))
        .await
        .unwrap();
    let mut s = tokio::net::TcpStream::connect(echo.addr()).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer good\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0);
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    // The RFC 6455 §1.3 example.
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    s.write_all(b"ping!").await.unwrap();
    let mut got = [0u8; 5];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping!");
}

#[tokio::test]
async fn echo_trailers_and_hop_headers() {
    let echo = EchoUpstream::start(local(), fixed_check("good"))
        .await
        .unwrap();
    let req = http::Request::get(format!("{}/trailers", echo.url()))
        .header("authorization", "Bearer good")
        .header("te", "trailers")
        .body(Full::default())
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
    let j: serde_json::Value = serde_json::from_slice(&collected.to_bytes()).unwrap();
    assert_eq!(j["te_trailers"], true);
    let r = get(&format!("{}/hop", echo.url()), Some("good")).await;
    assert_eq!(r.headers["x-secret-hop"], "1");
    assert_eq!(r.headers["proxy-authenticate"], "x");
}

#[tokio::test]
async fn echo_stop_refuses_connections() {
    let echo = EchoUpstream::start(local(), fixed_check("good"))
        .await
        .unwrap();
    echo.stop().await;
    assert!(tokio::net::TcpStream::connect(echo.addr()).await.is_err());
}

// ---- IdP ----

fn basic(id: &str, secret: &str) -> String {
    use base64::Engine as _;
    // RFC 6749 §2.3.1: form-url-encode each part, then base64.
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let raw = format!("{}:{}", enc(id), enc(secret));
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

fn form_request(
    url: &str,
    pairs: &[(&str, &str)],
    auth: Option<String>,
) -> http::Request<Full<Bytes>> {
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    let mut req =
        http::Request::post(url).header("content-type", "application/x-www-form-urlencoded");
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    req.body(Full::new(Bytes::from(body))).unwrap()
}

async fn post(url: &str, pairs: &[(&str, &str)], auth: Option<String>) -> Reply {
    send(form_request(url, pairs, auth)).await
}

async fn demo_idp(opts: IdpOptions) -> DevIdp {
    DevIdp::start(local(), opts).await.unwrap()
}

fn demo_auth() -> Option<String> {
    Some(basic("demo-client", "demo-secret"))
}

async fn refresh(idp: &DevIdp, rt: &str) -> Reply {
    post(
        &idp.token_url(),
        &[("grant_type", "refresh_token"), ("refresh_token", rt)],
        demo_auth(),
    )
    .await
}

async fn introspect(idp: &DevIdp, token: &str) -> serde_json::Value {
    let r = post(&idp.introspection_url(), &[("token", token)], demo_auth()).await;
    assert_eq!(r.status, 200);
    r.json()
}

#[tokio::test]
async fn client_credentials_issues_a_bearer_token() {
    let idp = demo_idp(IdpOptions::default()).await;
    let r = post(
        &idp.token_url(),
        &[
            ("grant_type", "client_credentials"),
            ("scope", "read write"),
            ("resource", "https://api.example"),
        ],
        demo_auth(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["cache-control"], "no-store");
    let j = r.json();
    assert_eq!(j["token_type"], "Bearer");
    assert_eq!(j["expires_in"], 10);
    assert_eq!(j["scope"], "read write");
    assert!(j.get("refresh_token").is_none());
    let at = j["access_token"].as_str().unwrap();
    assert!(at.starts_with("at_") && at.len() == 35);
    assert!(idp.is_access_token_valid(at));
    let g = &idp.grants()[0];
    assert_eq!(
        (
            g.grant_type.as_str(),
            g.client_auth.as_str(),
            g.outcome.as_str()
        ),
        ("client_credentials", "client_secret_basic", "ok")
    );
    assert_eq!(g.resource.as_deref(), Some("https://api.example"));
    assert_eq!(idp.grant_count("client_credentials"), 1);

    let echo = EchoUpstream::start(local(), idp.token_check())
        .await
        .unwrap();
    assert_eq!(
        get(&format!("{}/x", echo.url()), Some(at)).await.status,
        200
    );
    idp.revoke_access_token(at);
    assert_eq!(
        get(&format!("{}/x", echo.url()), Some(at)).await.status,
        401
    );
}

#[tokio::test]
async fn rotation_then_reuse_revokes_the_family() {
    let idp = demo_idp(IdpOptions::default()).await;
    let echo = EchoUpstream::start(local(), idp.token_check())
        .await
        .unwrap();
    let rt0 = idp.issue_refresh_token("demo-client", "alice");
    assert_eq!(idp.active_refresh_token_count(), 1);

    let j = refresh(&idp, &rt0).await.json();
    let at1 = j["access_token"].as_str().unwrap().to_owned();
    let rt1 = j["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(rt0, rt1);
    assert_eq!(idp.active_refresh_token_count(), 1);
    assert_eq!(
        get(&format!("{}/x", echo.url()), Some(&at1)).await.status,
        200
    );

    let r = refresh(&idp, &rt0).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "invalid_grant");
    assert!(r.json()["error_description"]
        .as_str()
        .unwrap()
        .contains("reuse"));
    assert_eq!(idp.reuse_count(), 1);
    assert_eq!(
        get(&format!("{}/x", echo.url()), Some(&at1)).await.status,
        401
    );
    let r = refresh(&idp, &rt1).await;
    assert_eq!(r.json()["error"], "invalid_grant");
    assert_eq!(idp.active_refresh_token_count(), 0);
    assert_eq!(idp.grant_count("refresh_token"), 1);
    let grants = idp.grants();
    assert_eq!(grants.len(), 3);
    assert_eq!(grants[1].refresh_token.as_deref(), Some(rt0.as_str()));
    assert_eq!(grants[1].family, grants[0].family);
    assert_eq!(grants[1].outcome, "invalid_grant");
}

#[tokio::test]
async fn reuse_grace_and_no_rotation() {
    let idp = demo_idp(IdpOptions {
        reuse_grace: Duration::from_secs(30),
        ..IdpOptions::default()
    })
    .await;
    let rt0 = idp.issue_refresh_token("demo-client", "alice");
    assert_eq!(refresh(&idp, &rt0).await.status, 200);
    assert_eq!(refresh(&idp, &rt0).await.status, 200);
    assert_eq!(idp.reuse_count(), 0);

    let idp = demo_idp(IdpOptions {
        rotate_refresh_tokens: false,
        refresh_ttl: Some(Duration::from_secs(100)),
        ..IdpOptions::default()
    })
    .await;
    let rt0 = idp.issue_refresh_token("demo-client", "alice");
    let j = refresh(&idp, &rt0).await.json();
    assert!(j.get("refresh_token").is_none());
    assert_eq!(refresh(&idp, &rt0).await.status, 200);
    assert_eq!(idp.reuse_count(), 0);

    let idp = demo_idp(IdpOptions {
        refresh_ttl: Some(Duration::from_secs(100)),
        ..IdpOptions::default()
    })
    .await;
    let rt0 = idp.issue_refresh_token("demo-client", "alice");
    assert_eq!(
        refresh(&idp, &rt0).await.json()["refresh_token_expires_in"],
        100
    );
}

fn odd_client() -> DevClient {
    DevClient::confidential("my client:%+", "s e:c%r+t/=")
}

#[tokio::test]
async fn basic_auth_decodes_special_characters_and_rejects_wrong_secrets() {
    let mut post_only = DevClient::confidential("post-only", "pw");
    post_only.auth_method = Some("client_secret_post".into());
    let idp = demo_idp(IdpOptions {
        clients: vec![odd_client(), post_only],
        ..IdpOptions::default()
    })
    .await;
    let cc = [("grant_type", "client_credentials")];
    let r = post(
        &idp.token_url(),
        &cc,
        Some(basic("my client:%+", "s e:c%r+t/=")),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    let r = post(&idp.token_url(), &cc, Some(basic("my client:%+", "wrong"))).await;
    assert_eq!(r.status, 401);
    assert!(r.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic"));
    assert_eq!(r.json()["error"], "invalid_client");
    assert!(r.json()["error_description"].is_string());
    assert_eq!(idp.grants()[1].client_auth, "invalid");

    // auth_method restriction: Basic refused, post accepted.
    let r = post(&idp.token_url(), &cc, Some(basic("post-only", "pw"))).await;
    assert_eq!(r.status, 401);
    let pairs = [
        ("grant_type", "client_credentials"),
        ("client_id", "post-only"),
        ("client_secret", "pw"),
    ];
    let r = post(&idp.token_url(), &pairs, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(idp.grants()[3].client_auth, "client_secret_post");

    // Refresh tokens belong to their client.
    let rt = idp.issue_refresh_token("post-only", "bob");
    let pairs = [("grant_type", "refresh_token"), ("refresh_token", &rt)];
    let r = post(
        &idp.token_url(),
        &pairs,
        Some(basic("my client:%+", "s e:c%r+t/=")),
    )
    .await;
    assert_eq!(r.json()["error"], "invalid_grant");
    assert!(r.json()["error_description"]
        .as_str()
        .unwrap()
        .contains("another client"));

    let r = post(
        &idp.token_url(),
        &[("grant_type", "password")],
        Some(basic("post-only", "x")),
    )
    .await;
    assert_eq!(r.status, 401);
    let pairs = [
        ("grant_type", "password"),
        ("client_id", "post-only"),
        ("client_secret", "pw"),
    ];
    assert_eq!(
        post(&idp.token_url(), &pairs, None).await.json()["error"],
        "unsupported_grant_type"
    );
}

const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const REDIRECT: &str = "http://127.0.0.1:9/callback";

#[test]
fn pkce_s256_matches_rfc7636_appendix_b() {
    assert_eq!(
        idp::s256(VERIFIER),
        "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    );
}

async fn authorize(idp: &DevIdp, redirect: &str) -> Reply {
    let q = form_urlencoded::Serializer::new(String::new())
        .extend_pairs([
            ("response_type", "code"),
            ("client_id", "cli"),
            ("redirect_uri", redirect),
            ("state", "st8"),
            ("code_challenge", &idp::s256(VERIFIER)),
            ("code_challenge_method", "S256"),
            ("login_hint", "carol"),
        ])
        .finish();
    get(&format!("{}?{q}", idp.authorize_url()), None).await
}

async fn code_from(idp: &DevIdp) -> String {
    let r = authorize(idp, REDIRECT).await;
    assert_eq!(r.status, 302);
    let loc = r.headers["location"].to_str().unwrap().to_owned();
    let (base, query) = loc.split_once('?').unwrap();
    assert_eq!(base, REDIRECT);
    let q: std::collections::HashMap<String, String> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    assert_eq!(q["state"], "st8");
    q["code"].clone()
}

async fn exchange(idp: &DevIdp, code: &str, redirect: &str, verifier: &str) -> Reply {
    let pairs = [
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", redirect),
        ("code_verifier", verifier),
        ("client_id", "cli"),
    ];
    post(&idp.token_url(), &pairs, None).await
}

#[tokio::test]
async fn authorization_code_with_pkce() {
    use base64::Engine as _;
    let idp = demo_idp(IdpOptions {
        clients: vec![DevClient::public("cli", &[REDIRECT])],
        ..IdpOptions::default()
    })
    .await;
    // Unregistered redirect_uri: an error page, never a redirect.
    let r = authorize(&idp, "http://evil.example/cb").await;
    assert_eq!(r.status, 400);
    assert!(r.headers.get("location").is_none());

    let code = code_from(&idp).await;
    let r = exchange(
        &idp,
        &code,
        REDIRECT,
        "wrong-verifier-wrong-verifier-wrong-verifier",
    )
    .await;
    assert_eq!(r.json()["error"], "invalid_grant");
    let r = exchange(&idp, &code, "http://127.0.0.1:9/other", VERIFIER).await;
    assert_eq!(r.json()["error"], "invalid_grant");

    let r = exchange(&idp, &code, REDIRECT, VERIFIER).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let j = r.json();
    let at = j["access_token"].as_str().unwrap().to_owned();
    let rt = j["refresh_token"].as_str().unwrap().to_owned();
    let parts: Vec<&str> = j["id_token"].as_str().unwrap().split('.').collect();
    assert_eq!(parts.len(), 3);
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(parts[1])
        .unwrap();
    let claims: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(claims["sub"], "carol");
    assert_eq!(claims["aud"], "cli");
    assert_eq!(claims["iss"], idp.url());
    assert_eq!(idp.grants().last().unwrap().client_auth, "none");

    // Code reuse: invalid_grant, and what the code issued is revoked.
    let r = exchange(&idp, &code, REDIRECT, VERIFIER).await;
    assert_eq!(r.json()["error"], "invalid_grant");
    assert!(!idp.is_access_token_valid(&at));
    let pairs = [
        ("grant_type", "refresh_token"),
        ("refresh_token", &rt),
        ("client_id", "cli"),
    ];
    assert_eq!(
        post(&idp.token_url(), &pairs, None).await.json()["error"],
        "invalid_grant"
    );
}

#[tokio::test]
async fn introspection_and_revocation() {
    let idp = demo_idp(IdpOptions::default()).await;
    let rt0 = idp.issue_refresh_token("demo-client", "alice");
    let j = introspect(&idp, &rt0).await;
    assert_eq!(j["active"], true);
    assert_eq!(j["client_id"], "demo-client");
    let rt1 = refresh(&idp, &rt0).await.json()["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        introspect(&idp, &rt0).await,
        serde_json::json!({"active": false})
    );
    assert_eq!(introspect(&idp, &rt1).await["active"], true);
    assert_eq!(
        idp.reuse_count(),
        0,
        "introspecting a spent token is not reuse"
    );
    let r = post(&idp.introspection_url(), &[("token", &rt1)], None).await;
    assert_eq!(r.status, 401);

    let r = post(&idp.revocation_url(), &[("token", &rt1)], demo_auth()).await;
    assert_eq!(r.status, 200);
    assert_eq!(introspect(&idp, &rt1).await["active"], false);
    assert_eq!(idp.active_refresh_token_count(), 0);

    let r = get(
        &format!("{}/.well-known/oauth-authorization-server", idp.url()),
        None,
    )
    .await;
    let m = r.json();
    assert_eq!(m["issuer"], idp.url());
    assert_eq!(m["token_endpoint"], idp.token_url());
    assert_eq!(
        m["code_challenge_methods_supported"],
        serde_json::json!(["S256"])
    );
}

#[tokio::test]
async fn fault_status_does_not_process_the_grant() {
    let idp = demo_idp(IdpOptions::default()).await;
    let rt = idp.issue_refresh_token("demo-client", "alice");
    idp.push_fault(Fault::Status {
        status: 429,
        body: "{\"error\":\"slow_down\"}".into(),
        content_type: "application/json",
        headers: vec![("Retry-After".into(), "2".into())],
    });
    let r = refresh(&idp, &rt).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.headers["retry-after"], "2");
    assert_eq!(idp.grants()[0].outcome, "fault");
    assert_eq!(idp.grants()[0].fault, Some("status"));
    assert_eq!(introspect(&idp, &rt).await["active"], true);

    idp.push_fault(Fault::FormEncoded);
    let r = refresh(&idp, &rt).await;
    assert_eq!(
        r.headers["content-type"],
        "application/x-www-form-urlencoded"
    );
    let q: std::collections::HashMap<String, String> =
        form_urlencoded::parse(&r.body).into_owned().collect();
    assert_eq!(q["token_type"], "Bearer");
    assert_eq!(idp.pending_faults(), 0);
}

#[tokio::test]
async fn fault_resets_drop_the_connection() {
    let idp = demo_idp(IdpOptions::default()).await;
    let rt = idp.issue_refresh_token("demo-client", "alice");
    idp.push_fault(Fault::ResetBeforeProcessing);
    assert!(client()
        .request(form_request(
            &idp.token_url(),
            &[("grant_type", "refresh_token"), ("refresh_token", &rt)],
            demo_auth(),
        ))
        .await
        .is_err());
    assert_eq!(introspect(&idp, &rt).await["active"], true);

    idp.push_fault(Fault::ResetAfterProcessing);
    assert!(client()
        .request(form_request(
            &idp.token_url(),
            &[("grant_type", "refresh_token"), ("refresh_token", &rt)],
            demo_auth(),
        ))
        .await
        .is_err());
    // The rotation happened although nobody saw the answer.
    assert_eq!(introspect(&idp, &rt).await["active"], false);
    let g = idp.grants();
    assert_eq!(
        (g[0].outcome.as_str(), g[0].fault),
        ("fault", Some("reset_before_processing"))
    );
    assert_eq!(
        (g[1].outcome.as_str(), g[1].fault),
        ("ok", Some("reset_after_processing"))
    );
    assert_eq!(idp.active_refresh_token_count(), 1);
    assert_eq!(refresh(&idp, &rt).await.json()["error"], "invalid_grant");
    assert_eq!(idp.reuse_count(), 1);
}

#[tokio::test]
async fn fault_hold_answers_after_release() {
    let idp = demo_idp(IdpOptions::default()).await;
    let rt = idp.issue_refresh_token("demo-client", "alice");
    let hold = Hold::new();
    idp.push_fault(Fault::HoldAfterProcessing(hold.clone()));
    let idp2 = idp.clone();
    let rt2 = rt.clone();
    let pending = tokio::spawn(async move { refresh(&idp2, &rt2).await });
    tokio::time::timeout(Duration::from_secs(5), hold.reached())
        .await
        .unwrap();
    assert!(hold.is_reached());
    assert_eq!(
        introspect(&idp, &rt).await["active"],
        false,
        "spent while held"
    );
    assert!(!pending.is_finished());
    hold.release();
    let r = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(r.json()["refresh_token"].is_string());
}

#[tokio::test]
async fn stop_refuses_and_restart_keeps_state() {
    let idp = demo_idp(IdpOptions::default()).await;
    let rt = idp.issue_refresh_token("demo-client", "alice");
    // An idle keep-alive connection must be closed by stop too.
    let mut idle = tokio::net::TcpStream::connect(idp.addr()).await.unwrap();
    idp.stop().await;
    assert!(tokio::net::TcpStream::connect(idp.addr()).await.is_err());
    let mut buf = [0u8; 1];
    use tokio::io::AsyncReadExt;
    assert!(matches!(idle.read(&mut buf).await, Ok(0) | Err(_)));
    idp.restart().await;
    assert_eq!(refresh(&idp, &rt).await.status, 200);
}

#[tokio::test]
async fn access_tokens_expire() {
    let idp = demo_idp(IdpOptions::default()).await;
    idp.set_access_ttl(Duration::from_millis(100));
    let at = idp.issue_access_token("demo-client");
    assert!(idp.is_access_token_valid(&at));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!idp.is_access_token_valid(&at));
}

#[tokio::test]
async fn echo_tls_negotiates_h2_and_http11() {
    let echo = EchoUpstream::start_tls(local(), fixed_check("good"), tls::test_server_config())
        .await
        .unwrap();
    assert!(echo.url().starts_with("https://127.0.0.1:"));
    for (alpn, version) in [("h2", "HTTP/2.0"), ("http/1.1", "HTTP/1.1")] {
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(tls::test_root_store())
        .with_no_client_auth();
        config.alpn_protocols = vec![alpn.as_bytes().to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(echo.addr()).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let stream = connector.connect(name, tcp).await.unwrap();
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(alpn.as_bytes()));
        let io = hyper_util::rt::TokioIo::new(stream);
        let req = http::Request::get(format!("{}/x", echo.url()))
            .header("authorization", "Bearer good")
            .header("host", "127.0.0.1")
            .body(Full::<Bytes>::default())
            .unwrap();
        let resp = if alpn == "h2" {
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            send.send_request(req).await.unwrap()
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            send.send_request(req).await.unwrap()
        };
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(j["version"], version);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_presentations_rotate_exactly_once() {
    let idp = demo_idp(IdpOptions::default()).await;
    let rt = idp.issue_refresh_token("demo-client", "alice");
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (idp, rt) = (idp.clone(), rt.clone());
            tokio::spawn(async move { refresh(&idp, &rt).await.status })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap() == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(idp.reuse_count(), 7);
    assert_eq!(
        idp.active_refresh_token_count(),
        0,
        "reuse revoked the new token too"
    );
}

#[tokio::test]
async fn authorize_errors_and_code_expiry() {
    let idp = demo_idp(IdpOptions {
        clients: vec![DevClient::public("cli", &[REDIRECT])],
        code_ttl: Duration::from_millis(50),
        ..IdpOptions::default()
    })
    .await;
    // No PKCE: redirected back with an error (the redirect_uri is valid).
    let url = format!(
        "{}?response_type=code&client_id=cli&redirect_uri={}&state=s",
        idp.authorize_url(),
        form_urlencoded::byte_serialize(REDIRECT.as_bytes()).collect::<String>()
    );
    let r = get(&url, None).await;
    assert_eq!(r.status, 302);
    let loc = r.headers["location"].to_str().unwrap();
    assert!(
        loc.starts_with(REDIRECT) && loc.contains("error=invalid_request"),
        "{loc}"
    );
    assert!(loc.contains("state=s"));
    let r = get(&format!("{}?client_id=nobody", idp.authorize_url()), None).await;
    assert_eq!(r.status, 400);

    let code = code_from(&idp).await;
    tokio::time::sleep(Duration::from_millis(80)).await;
    let r = exchange(&idp, &code, REDIRECT, VERIFIER).await;
    assert_eq!(r.json()["error"], "invalid_grant");
    assert!(r.json()["error_description"]
        .as_str()
        .unwrap()
        .contains("expired"));
}

fn dpop_key(pem: &str) -> crate::dpop::DpopKey {
    crate::dpop::DpopKey::from_pem(pem.as_bytes()).unwrap()
}

const DPOP_P256: &str = include_str!("testdata/dpop-p256.key");
const DPOP_ED25519: &str = include_str!("testdata/dpop-ed25519.key");

async fn refresh_with_proof(idp: &DevIdp, rt: &str, proof: Option<&str>) -> Reply {
    let mut req = form_request(
        &idp.token_url(),
        &[("grant_type", "refresh_token"), ("refresh_token", rt)],
        demo_auth(),
    );
    if let Some(p) = proof {
        req.headers_mut().insert("dpop", p.parse().unwrap());
    }
    send(req).await
}

fn token_proof(idp: &DevIdp, key: &crate::dpop::DpopKey, nonce: Option<&str>) -> String {
    key.proof(
        "POST",
        &idp.token_url(),
        None,
        nonce,
        std::time::SystemTime::now(),
    )
    .unwrap()
    .expose()
    .to_owned()
}

#[tokio::test]
async fn idp_binds_tokens_to_the_proof_key_and_refuses_each_bad_proof() {
    let idp = demo_idp(IdpOptions::default()).await;
    let key = dpop_key(DPOP_P256);
    let other = dpop_key(DPOP_ED25519);
    let rt0 = idp.issue_refresh_token("demo-client", "alice");

    // A valid proof: DPoP tokens bound to the key, shown by introspection.
    let proof = token_proof(&idp, &key, None);
    let r = refresh_with_proof(&idp, &rt0, Some(&proof)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let j = r.json();
    assert_eq!(j["token_type"], "DPoP");
    let at = j["access_token"].as_str().unwrap().to_owned();
    let rt1 = j["refresh_token"].as_str().unwrap().to_owned();
    let i = introspect(&idp, &at).await;
    assert_eq!(i["token_type"], "DPoP");
    assert_eq!(i["cnf"]["jkt"], key.thumbprint());
    assert_eq!(
        idp.grants().last().unwrap().dpop_jkt.as_deref(),
        Some(key.thumbprint())
    );

    // The same proof again: its jti was used.
    let r = refresh_with_proof(&idp, &rt1, Some(&proof)).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "invalid_dpop_proof");
    assert!(r.json()["error_description"]
        .as_str()
        .unwrap()
        .contains("jti replayed"));

    // A proof for another URL.
    let wrong_htu = key
        .proof(
            "POST",
            &format!("{}/elsewhere", idp.url()),
            None,
            None,
            std::time::SystemTime::now(),
        )
        .unwrap();
    let r = refresh_with_proof(&idp, &rt1, Some(wrong_htu.expose())).await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error_description"]
            .as_str()
            .unwrap()
            .contains("htu"),
        "{}",
        r.json()
    );

    // The bound refresh token with another key, and without a proof.
    let r = refresh_with_proof(&idp, &rt1, Some(&token_proof(&idp, &other, None))).await;
    assert_eq!(r.json()["error"], "invalid_grant");
    assert!(r.json()["error_description"]
        .as_str()
        .unwrap()
        .contains("another key"));
    let r = refresh_with_proof(&idp, &rt1, None).await;
    assert_eq!(r.json()["error"], "invalid_grant");
    assert_eq!(idp.reuse_count(), 0, "refused proofs spent nothing");

    // Nonce mode: a proof without the nonce is told it, then accepted.
    idp.set_dpop_nonce(Some("n-1"));
    let r = refresh_with_proof(&idp, &rt1, Some(&token_proof(&idp, &key, None))).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "use_dpop_nonce");
    assert_eq!(r.headers["dpop-nonce"], "n-1");
    let r = refresh_with_proof(&idp, &rt1, Some(&token_proof(&idp, &key, Some("n-1")))).await;
    assert_eq!(r.status, 200, "{}", r.json());
    assert_eq!(idp.reuse_count(), 0);
}

#[tokio::test]
async fn idp_can_require_dpop_of_a_client() {
    let mut client = DevClient::confidential("demo-client", "demo-secret");
    client.dpop_required = true;
    let idp = demo_idp(IdpOptions {
        clients: vec![client],
        ..IdpOptions::default()
    })
    .await;
    let rt0 = idp.issue_refresh_token("demo-client", "alice");
    let r = refresh_with_proof(&idp, &rt0, None).await;
    assert_eq!(r.json()["error"], "invalid_dpop_proof");
    let key = dpop_key(DPOP_P256);
    let r = refresh_with_proof(&idp, &rt0, Some(&token_proof(&idp, &key, None))).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn echo_verifies_dpop_proofs_their_ath_binding_and_nonce() {
    let idp = demo_idp(IdpOptions::default()).await;
    let key = dpop_key(DPOP_P256);
    let rt0 = idp.issue_refresh_token("demo-client", "alice");
    let r = refresh_with_proof(&idp, &rt0, Some(&token_proof(&idp, &key, None))).await;
    let at = r.json()["access_token"].as_str().unwrap().to_owned();
    let echo = EchoUpstream::start(local(), idp.token_check())
        .await
        .unwrap();
    echo.set_dpop(idp.dpop_binding());
    let url = format!("{}/v1/items?page=2", echo.url());
    let call = |scheme: &str, proof: Option<String>| {
        let mut req = http::Request::get(&url).header("authorization", format!("{scheme} {at}"));
        if let Some(p) = proof {
            req = req.header("dpop", p);
        }
        send(req.body(Full::default()).unwrap())
    };
    let proof = |k: &crate::dpop::DpopKey, ath: &str, nonce: Option<&str>| {
        k.proof("GET", &url, Some(ath), nonce, std::time::SystemTime::now())
            .unwrap()
            .expose()
            .to_owned()
    };
    let ath = crate::dpop::ath(&at);
    let challenge = |r: &Reply| r.headers["www-authenticate"].to_str().unwrap().to_owned();

    let r = call("Bearer", None).await;
    assert_eq!(r.status, 401);
    assert!(challenge(&r).contains("presented as a bearer token"));
    let r = call("DPoP", None).await;
    assert!(
        challenge(&r).contains("exactly one DPoP proof"),
        "{}",
        challenge(&r)
    );
    let r = call("DPoP", Some(proof(&key, "wrong-ath", None))).await;
    assert!(challenge(&r).contains("ath"), "{}", challenge(&r));
    let r = call("DPoP", Some(proof(&dpop_key(DPOP_ED25519), &ath, None))).await;
    assert!(challenge(&r).contains("not bound"), "{}", challenge(&r));
    let good = proof(&key, &ath, None);
    let r = call("DPoP", Some(good.clone())).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = call("DPoP", Some(good)).await;
    assert!(challenge(&r).contains("jti replayed"), "{}", challenge(&r));

    echo.set_dpop_nonce(Some("rs-n"));
    let r = call("DPoP", Some(proof(&key, &ath, None))).await;
    assert_eq!(r.status, 401);
    assert!(challenge(&r).contains("use_dpop_nonce"));
    assert_eq!(r.headers["dpop-nonce"], "rs-n");
    assert_eq!(echo.nonce_challenges(), 1);
    let r = call("DPoP", Some(proof(&key, &ath, Some("rs-n")))).await;
    assert_eq!(r.status, 200);
}
