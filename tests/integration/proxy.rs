//! The data path end to end: a real client → the proxy → the echo upstream.

use crate::harness::*;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn forwards_method_path_query_headers_and_injects_token() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    let req = Request::builder()
        .method(Method::PATCH)
        .uri(p.url("/api/items/7?a=%2F&b=+c;d=1&e"))
        .header("authorization", "Bearer client-own-token")
        .header("x-custom", "yes")
        .header("x-request-id", "req-42")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .body(Full::new(Bytes::from_static(b"hello")))
        .unwrap();
    let (resp, body) = send(&client(), req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-request-id"], "req-42");
    let r = json(&body);
    assert_eq!(r["method"], "PATCH");
    assert_eq!(r["path"], "/items/7");
    assert_eq!(r["query"], "a=%2F&b=+c;d=1&e");
    assert_eq!(r["body_len"], 5);
    assert_eq!(r["token_ok"], true);
    assert_eq!(
        echoed(&r, "authorization"),
        [format!("Bearer {GOOD_TOKEN}")]
    );
    assert_eq!(echoed(&r, "x-custom"), ["yes"]);
    assert_eq!(echoed(&r, "x-request-id"), ["req-42"]);
    assert_eq!(
        echoed(&r, "traceparent"),
        ["00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"]
    );
    assert_eq!(echoed(&r, "host"), [up.addr().to_string()]);
    assert_eq!(echoed(&r, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(echoed(&r, "x-forwarded-proto"), ["http"]);
    assert_eq!(echoed(&r, "x-forwarded-host"), [p.addr.to_string()]);
}

#[tokio::test]
async fn request_id_generated_when_absent() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    let (resp, body) = send(&client(), get(&p.url("/api/x"))).await;
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(rid.len(), 16);
    assert_eq!(echoed(&json(&body), "x-request-id"), [rid.as_str()]);
}

#[tokio::test]
async fn strip_prefix_off_keeps_the_whole_path() {
    let up = echo().await;
    let mut r = route("/api/", &format!("{}/base", up.url()));
    r.strip_prefix = false;
    let p = start_proxy(vec![r]).await;
    let (_, body) = send(&client(), get(&p.url("/api/x"))).await;
    assert_eq!(json(&body)["path"], "/base/api/x");
}

#[tokio::test]
async fn ten_mib_streams_both_ways() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    let c = client();
    let big = Bytes::from(vec![b'y'; 10 * 1024 * 1024]);
    let req = Request::post(p.url("/api/upload"))
        .body(Full::new(big))
        .unwrap();
    let (resp, body) = send(&c, req).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(json(&body)["body_len"], 10 * 1024 * 1024);

    let resp = c.request(get(&p.url("/api/bytes/10485760"))).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut n = 0usize;
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.unwrap().into_data() {
            n += d.len();
        }
    }
    assert_eq!(n, 10 * 1024 * 1024);
}

#[tokio::test]
async fn h2c_client_works() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    let resp = h2c_client()
        .request(get(&p.url("/api/x?q=1")))
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let r = json(&body);
    assert_eq!(r["token_ok"], true);
    assert_eq!(r["query"], "q=1");
}

#[tokio::test]
async fn unix_socket_listener_works() {
    use tokenproxy::config::ListenAddr;
    let up = echo().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tp.sock");
    // A stale socket file from a dead process is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let cfg = config(vec![route("/api/", &up.url())]);
    let proxy = build_proxy(&cfg);
    let listener = tokenproxy::proxy::bind(&ListenAddr::Unix(path.clone()))
        .await
        .unwrap();
    assert_eq!(
        listener.local_addr_string(),
        format!("unix:{}", path.display())
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(tokenproxy::proxy::serve(listener, proxy, shutdown.clone()));

    let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/api/x")
        .header("host", "localhost")
        .body(Full::<Bytes>::default())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let r = json(&resp.into_body().collect().await.unwrap().to_bytes());
    assert_eq!(r["token_ok"], true);
    assert!(echoed(&r, "x-forwarded-for").is_empty());
    drop(sender);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn hop_by_hop_headers_stripped_both_ways() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    let req = Request::get(p.url("/api/hop"))
        .header("connection", "x-foo")
        .header("x-foo", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("te", "gzip")
        .header("x-end-to-end", "kept")
        .body(Full::default())
        .unwrap();
    let (resp, body) = send(&client(), req).await;
    let r = json(&body);
    for h in ["x-foo", "keep-alive", "proxy-authorization", "te"] {
        assert!(echoed(&r, h).is_empty(), "{h} reached the upstream");
    }
    assert_eq!(echoed(&r, "x-end-to-end"), ["kept"]);
    for h in ["x-secret-hop", "keep-alive", "proxy-authenticate"] {
        assert!(!resp.headers().contains_key(h), "{h} reached the client");
    }
}

#[tokio::test]
async fn trailers_pass_with_te_trailers() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    for c in [client(), h2c_client()] {
        let req = Request::post(p.url("/api/trailers"))
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"abc")))
            .unwrap();
        let resp = c.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers arrive");
        assert_eq!(trailers["grpc-status"], "0");
        let r = json(&collected.to_bytes());
        assert_eq!(r["te_trailers"], true);
        assert_eq!(r["body_len"], 3);
    }
}

const WS_REQUEST: &str = "GET /ws/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

#[tokio::test]
async fn websocket_tunnelled_when_enabled() {
    let up = echo().await;
    let mut r = route("/ws/", &up.url());
    r.upgrades = true;
    let p = start_proxy(vec![r]).await;
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    s.write_all(WS_REQUEST.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="));
    s.write_all(b"ping through the tunnel").await.unwrap();
    let mut buf = [0u8; 23];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping through the tunnel");
}

#[tokio::test]
async fn upgrade_refused_when_not_enabled() {
    let up = echo().await;
    let p = start_proxy(vec![route("/ws/", &up.url())]).await;
    let out = raw(
        p.addr,
        &WS_REQUEST.replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 501"), "{out}");
    assert!(out.contains("x-tokenproxy-error: upgrade_not_enabled"));
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn location_and_link_rewritten_to_the_route() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    let (resp, _) = send(&client(), get(&p.url("/api/redirect"))).await;
    assert_eq!(resp.status(), 302);
    assert_eq!(
        resp.headers()["location"],
        format!("http://{}/api/landed", p.addr)
    );
    assert_eq!(
        resp.headers()["link"],
        format!("<http://{}/api/page2>; rel=\"next\"", p.addr)
    );
}

async fn assert_proxy_error(resp: &http::Response<()>, body: &[u8], status: u16, code: &str) {
    assert_eq!(
        resp.status().as_u16(),
        status,
        "{}",
        String::from_utf8_lossy(body)
    );
    assert_eq!(resp.headers()["x-tokenproxy-error"], code);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let rid = resp.headers()["x-request-id"].to_str().unwrap();
    let v = json(body);
    assert_eq!(v["error"], code);
    assert_eq!(v["request_id"], rid);
}

#[tokio::test]
async fn foreign_host_and_cross_site_requests_refused() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    let c = client();
    let cases = [
        ("host", "evil.example", 421, "host_not_allowed"),
        ("host", "localhost.evil.example:80", 421, "host_not_allowed"),
        ("sec-fetch-site", "cross-site", 403, "cross_site_request"),
        ("origin", "http://evil.example", 403, "cross_site_request"),
        ("origin", "null", 403, "cross_site_request"),
    ];
    for (name, value, status, code) in cases {
        let req = Request::get(p.url("/api/x"))
            .header(name, value)
            .body(Full::default())
            .unwrap();
        let (resp, body) = send(&c, req).await;
        assert_proxy_error(&resp, &body, status, code).await;
    }
    // Loopback names and same-origin browser requests are fine.
    for (name, value) in [
        ("host", "localhost:1234"),
        ("host", "foo.localhost"),
        ("origin", "http://localhost:3000"),
        ("sec-fetch-site", "same-origin"),
    ] {
        let req = Request::get(p.url("/api/x"))
            .header(name, value)
            .body(Full::default())
            .unwrap();
        let (resp, _) = send(&c, req).await;
        assert_eq!(resp.status(), 200, "{name}: {value}");
    }
    assert_eq!(up.requests(), 4);
}

#[tokio::test]
async fn unknown_route_is_404_json() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    let (resp, body) = send(&client(), get(&p.url("/apix/y"))).await;
    assert_proxy_error(&resp, &body, 404, "no_route").await;
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn traversal_rejected_before_reaching_upstream() {
    let up = echo().await;
    let p = start_proxy(vec![route("/a/", &up.url()), route("/b/", &up.url())]).await;
    let c = client();
    for path in [
        "/a/../b/x",
        "/a/%2e%2e/b/x",
        "/a/%2E./b",
        "/a/x%2Fy",
        "/a//b",
    ] {
        let (resp, body) = send(&c, get(&p.url(path))).await;
        assert_proxy_error(&resp, &body, 400, "bad_request").await;
    }
    // Raw, in case a client library would normalise.
    let out = raw(
        p.addr,
        "GET /a/..%2fb HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn absolute_form_is_routed_by_path_only_and_connect_refused() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    let out = raw(
        p.addr,
        "GET http://evil.example/api/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"path\":\"/x\""), "{out}");
    let out = raw(
        p.addr,
        "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 405"), "{out}");
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn upstream_down_is_502_json() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let p = start_proxy(vec![route("/api/", &format!("http://127.0.0.1:{port}"))]).await;
    let (resp, body) = send(&client(), get(&p.url("/api/x"))).await;
    assert_proxy_error(&resp, &body, 502, "upstream_unreachable").await;
}

#[tokio::test]
async fn slow_upstream_is_504_json() {
    let up = echo().await;
    let mut r = route("/api/", &up.url());
    r.response_timeout = Duration::from_millis(300);
    let p = start_proxy(vec![r]).await;
    let (resp, body) = send(&client(), get(&p.url("/api/delay/2000"))).await;
    assert_proxy_error(&resp, &body, 504, "upstream_timeout").await;
}

#[tokio::test]
async fn idle_response_body_is_aborted() {
    let up = echo().await;
    let mut r = route("/api/", &up.url());
    r.idle_timeout = Duration::from_millis(200);
    let p = start_proxy(vec![r]).await;
    let resp = client()
        .request(get(&p.url("/api/slow-body/3000")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let res = tokio::time::timeout(Duration::from_secs(2), resp.into_body().collect()).await;
    assert!(matches!(res, Ok(Err(_))), "body should abort, got {res:?}");
}

/// An HTTPS echo upstream (ALPN h2 and http/1.1) and its CA file.
async fn tls_echo() -> (
    tokenproxy::dev::EchoUpstream,
    tempfile::TempDir,
    std::path::PathBuf,
) {
    use tokenproxy::dev::{tls, EchoUpstream};
    let up = EchoUpstream::start_tls(
        "127.0.0.1:0".parse().unwrap(),
        std::sync::Arc::new(|t: &str| t == GOOD_TOKEN),
        tls::test_server_config(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, tls::TEST_CA_PEM).unwrap();
    (up, dir, ca)
}

#[tokio::test]
async fn https_upstream_needs_its_ca() {
    let (up, _dir, ca) = tls_echo().await;
    let mut trusted = route("/trusted/", &up.url());
    trusted.ca_file = Some(ca);
    let untrusted = route("/untrusted/", &up.url());
    let p = start_proxy(vec![trusted, untrusted]).await;
    let c = client();
    let (resp, body) = send(&c, get(&p.url("/trusted/x"))).await;
    assert_eq!(resp.status(), 200);
    let r = json(&body);
    assert_eq!(r["token_ok"], true);
    assert_eq!(r["version"], "HTTP/2.0", "ALPN should pick h2");
    let (resp, body) = send(&c, get(&p.url("/untrusted/x"))).await;
    assert_proxy_error(&resp, &body, 502, "upstream_unreachable").await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    let c = client();
    let inflight = tokio::spawn({
        let url = p.url("/api/delay/500");
        async move { send(&c, get(&url)).await.0.status() }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    p.shutdown.cancel();
    assert_eq!(inflight.await.unwrap(), 200);
    let TestProxy { .. } = p;
}

#[tokio::test]
async fn tls_listener_serves_h1_and_h2() {
    let up = echo().await;
    let p = start_proxy_with(tls_config(vec![route("/api/", &up.url())])).await;
    let tls_config = test_tls_client();
    for h2 in [false, true] {
        let b = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config.clone())
            .https_only();
        let connector = if h2 {
            b.enable_http2().build()
        } else {
            b.enable_http1().build()
        };
        let c: hyper_util::client::legacy::Client<_, Full<Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector);
        let resp = c
            .request(get(&format!("https://localhost:{}/api/x", p.addr.port())))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let want = if h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        assert_eq!(resp.version(), want);
        let r = json(&resp.into_body().collect().await.unwrap().to_bytes());
        assert_eq!(echoed(&r, "x-forwarded-proto"), ["https"]);
        assert_eq!(r["token_ok"], true);
    }
}

#[tokio::test]
async fn websocket_over_tls_upstream_uses_http1() {
    use tokenproxy::dev::{tls, EchoUpstream};
    let up = EchoUpstream::start_tls(
        "127.0.0.1:0".parse().unwrap(),
        std::sync::Arc::new(|t: &str| t == GOOD_TOKEN),
        tls::test_server_config(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, tls::TEST_CA_PEM).unwrap();
    let mut r = route("/ws/", &up.url());
    r.ca_file = Some(ca);
    r.upgrades = true;
    let p = start_proxy(vec![r]).await;
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    s.write_all(WS_REQUEST.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    s.write_all(b"tls").await.unwrap();
    let mut buf = [0u8; 3];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"tls");
}

/// An upstream that closes a kept-alive connection on its second request
/// without answering: the proxy retries an idempotent bodiless request once.
#[tokio::test]
async fn idempotent_request_retried_once_on_a_dead_pooled_connection() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let mut conns = 0;
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            conns += 1;
            let first = conns == 1;
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(ok).await;
                if first {
                    // Reads the next request, then hangs up without a byte.
                    let _ = s.read(&mut buf).await;
                    return;
                }
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(ok).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let p = start_proxy(vec![route("/api/", &format!("http://{addr}"))]).await;
    let c = client();
    for _ in 0..2 {
        let (resp, body) = send(&c, get(&p.url("/api/x"))).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(&body[..], b"ok");
    }
    // A POST with a body is never replayed.
    let req = Request::post(p.url("/api/x"))
        .body(Full::new(Bytes::from_static(b"x")))
        .unwrap();
    let (resp, _) = send(&c, req).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn max_connections_is_enforced() {
    let up = echo().await;
    let mut cfg = config(vec![route("/api/", &up.url())]);
    cfg.server.max_connections = 1;
    let p = start_proxy_with(cfg).await;
    let req = "GET /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let mut a = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    a.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(a.read(&mut buf).await.unwrap() > 0);
    // `a` is kept alive: a second connection waits for its permit.
    let mut b = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    b.write_all(req.as_bytes()).await.unwrap();
    let waited = tokio::time::timeout(Duration::from_millis(300), b.read(&mut buf)).await;
    assert!(
        waited.is_err(),
        "second connection served while the first was open"
    );
    drop(a);
    let n = tokio::time::timeout(Duration::from_secs(5), b.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

/// Upstream connections are pooled: HTTP/1.1 ones carry one request at a
/// time and are reused, an HTTP/2 one (ALPN) is shared by concurrent
/// requests.
#[tokio::test]
async fn upstream_connections_are_reused() {
    let h1 = echo().await;
    let (h2, _dir, ca) = tls_echo().await;
    let mut over_h2 = route("/h2/", &h2.url());
    over_h2.ca_file = Some(ca);
    let p = start_proxy(vec![route("/h1/", &h1.url()), over_h2]).await;
    let c = client();
    for prefix in ["/h1/", "/h2/"] {
        for i in 0..20 {
            let (resp, body) = send(&c, get(&p.url(&format!("{prefix}{i}")))).await;
            assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
        }
    }
    assert_eq!(
        h1.connections(),
        1,
        "sequential requests share one connection"
    );
    assert_eq!(h2.connections(), 1);

    // Eight at once: HTTP/1.1 needs up to eight connections, HTTP/2 one.
    for prefix in ["/h1/", "/h2/"] {
        let all: Vec<_> = (0..8)
            .map(|i| {
                let c = c.clone();
                let url = p.url(&format!("{prefix}c{i}"));
                tokio::spawn(async move { send(&c, get(&url)).await.0.status() })
            })
            .collect();
        for r in all {
            assert_eq!(r.await.unwrap(), 200);
        }
    }
    assert!(h1.connections() <= 8, "{}", h1.connections());
    assert_eq!(h2.connections(), 1);
    // And they are reused afterwards.
    let before = h1.connections();
    for i in 0..20 {
        let (resp, _) = send(&c, get(&p.url(&format!("/h1/again{i}")))).await;
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(h1.connections(), before);
    assert_eq!(h1.requests() + h2.requests(), 2 * 20 + 2 * 8 + 20);
}

/// A scripted HTTP/1.1 upstream on a real socket: each request's path picks
/// a response shape the echo upstream never sends. Records request heads
/// and counts connections.
async fn scripted_upstream() -> (
    String,
    std::sync::Arc<parking_lot::Mutex<Vec<String>>>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::Ordering;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let heads = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let conns = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (h, n) = (heads.clone(), conns.clone());
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            n.fetch_add(1, Ordering::SeqCst);
            let h = h.clone();
            tokio::spawn(async move {
                loop {
                    let mut head = Vec::new();
                    while !head.ends_with(b"\r\n\r\n") {
                        let mut b = [0u8; 1];
                        if s.read(&mut b).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(b[0]);
                    }
                    let head = String::from_utf8(head).unwrap();
                    let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                    h.lock().push(head);
                    let (wire, then_close): (&[u8], bool) = match path.as_str() {
                        "/chunked" => (
                            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n",
                            false,
                        ),
                        "/close" => (
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                            true,
                        ),
                        "/eof" => (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", true),
                        "/idle-close" => (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", true),
                        "/bad" => (
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
                            true,
                        ),
                        "/truncated" => (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", true),
                        "/head" => (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n", false),
                        _ => (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nyes", false),
                    };
                    if s.write_all(wire).await.is_err() {
                        return;
                    }
                    if then_close {
                        // `idle-close` closes without saying so, like an
                        // upstream's keep-alive timeout firing.
                        return;
                    }
                }
            });
        }
    });
    (url, heads, conns)
}

#[tokio::test]
async fn bodiless_requests_handle_every_upstream_framing() {
    let (up, heads, conns) = scripted_upstream().await;
    let p = start_proxy(vec![route("/s/", &up)]).await;
    let c = client();

    // Chunked with trailers: body and trailers reach the client.
    let req = Request::get(p.url("/s/chunked"))
        .header("te", "trailers")
        .body(Full::default())
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers arrive");
    assert_eq!(trailers["x-sum"], "11");
    assert_eq!(collected.to_bytes(), "hello world");

    // The upstream closes after each response: every request still works.
    for _ in 0..3 {
        let (resp, body) = send(&c, get(&p.url("/s/close"))).await;
        assert_eq!((resp.status().as_u16(), &body[..]), (200, &b"ok"[..]));
    }
    let (resp, body) = send(&c, get(&p.url("/s/eof"))).await;
    assert_eq!(
        (resp.status().as_u16(), &body[..]),
        (200, &b"until the end"[..])
    );

    // A pooled connection the upstream closed while idle is not used.
    for _ in 0..3 {
        let (resp, body) = send(&c, get(&p.url("/s/idle-close"))).await;
        assert_eq!((resp.status().as_u16(), &body[..]), (200, &b"ok"[..]));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // HEAD: the length is announced, no body follows, the connection
    // stays usable.
    let before = conns.load(std::sync::atomic::Ordering::SeqCst);
    let head = Request::head(p.url("/s/head"))
        .body(Full::default())
        .unwrap();
    let (resp, body) = send(&c, head).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], "50");
    assert!(body.is_empty());
    let (resp, body) = send(&c, get(&p.url("/s/plain"))).await;
    assert_eq!((resp.status().as_u16(), &body[..]), (200, &b"yes"[..]));
    assert_eq!(
        conns.load(std::sync::atomic::Ordering::SeqCst),
        before + 1,
        "HEAD then GET share one new connection"
    );

    // Conflicting lengths: 502 with our error code, not a guess.
    let (resp, body) = send(&c, get(&p.url("/s/bad"))).await;
    assert_eq!(resp.status(), 502, "{}", String::from_utf8_lossy(&body));
    assert_eq!(resp.headers()["x-tokenproxy-error"], "upstream_unreachable");

    // A body cut short is an aborted response (before or after its head
    // reached the client), never a short success.
    if let Ok(resp) = c.request(get(&p.url("/s/truncated"))).await {
        assert!(resp.into_body().collect().await.is_err());
    }

    // Every request went out with the token, the upstream's Host and
    // origin-form targets.
    for head in heads.lock().iter() {
        let lower = head.to_ascii_lowercase();
        assert!(
            lower.contains("authorization: bearer good-token\r\n"),
            "{head}"
        );
        assert!(
            head.starts_with("GET /") || head.starts_with("HEAD /"),
            "{head}"
        );
        assert!(lower.contains(&format!("host: {}\r\n", &up[7..])), "{head}");
    }
}
