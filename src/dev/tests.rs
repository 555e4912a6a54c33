//! Tests of the dev servers over real sockets.

use super::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::sync::Arc;

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
