//! Hostile clients over raw sockets: every shape gets a clear 4xx (or the
//! connection is cut) and the upstream sees nothing. The echo upstream's
//! `requests()` count is the oracle: it counts every request head it got.

use crate::harness::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Writes `bytes`, then reads until the peer closes or `wait` passes.
async fn exchange(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The peer may close (and reset) before it read everything: fine.
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(out: &str) -> u16 {
    out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Sends each raw request on its own connection and expects `status`.
async fn expect_all(addr: SocketAddr, cases: &[(&str, Vec<u8>)], status: u16) {
    for (what, bytes) in cases {
        let out = exchange(addr, bytes, Duration::from_secs(5)).await;
        assert_eq!(status_of(&out), status, "{what}: {out:?}");
    }
}

const HEAD: &str = "POST /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n";

fn req(extra_headers: &str, body: &str) -> Vec<u8> {
    format!("{HEAD}{extra_headers}\r\n{body}").into_bytes()
}

#[tokio::test]
async fn smuggling_shapes_get_400_and_never_reach_the_upstream() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    let cases = [
        (
            "TE not chunked last",
            req("Transfer-Encoding: chunked, identity\r\n", "0\r\n\r\n"),
        ),
        (
            "TE obfuscated",
            req("Transfer-Encoding: xchunked\r\n", "0\r\n\r\n"),
        ),
        (
            "conflicting CL",
            req("Content-Length: 3\r\nContent-Length: 5\r\n", "abcde"),
        ),
        ("CL list", req("Content-Length: 3, 5\r\n", "abcde")),
        ("CL negative", req("Content-Length: -1\r\n", "")),
        ("CL plus sign", req("Content-Length: +3\r\n", "abc")),
        ("CL hex", req("Content-Length: 0x3\r\n", "abc")),
        (
            "obs-fold",
            req("X-Folded: a\r\n  b\r\nContent-Length: 0\r\n", ""),
        ),
        (
            "bare CR in a header value",
            req("X-A: a\rb\r\nContent-Length: 0\r\n", ""),
        ),
        (
            "space before colon",
            req("Content-Length : 0\r\n", ""),
        ),
        (
            "HTTP/1.0 with TE",
            b"POST /api/x HTTP/1.0\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                .to_vec(),
        ),
    ];
    expect_all(p.addr, &cases, 400).await;
    assert_eq!(up.requests(), 0, "a smuggling shape reached the upstream");
    // Equal duplicates are one length (RFC 9110 §8.6) and pass.
    let out = exchange(
        p.addr,
        &req("Content-Length: 3\r\nContent-Length: 3\r\n", "abc"),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&out), 200, "{out}");
    assert!(out.contains("\"body_len\":3"), "{out}");
}

/// `Content-Length` and `Transfer-Encoding: chunked` together (RFC 9112
/// §6.3, the classic smuggling shape): a clear 400, the connection closed,
/// nothing reaches the upstream and the bytes after the chunked body are
/// never read as a second request. Also when the head arrives in pieces.
#[tokio::test]
async fn cl_and_te_together_get_400_and_nothing_is_forwarded() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    for headers in [
        "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
        "content-length: 100\r\nTRANSFER-ENCODING: chunked\r\n",
    ] {
        let bytes = format!(
            "POST /api/first HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n0\r\n\r\nGET /api/smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        );
        let out = exchange(p.addr, bytes.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(status_of(&out), 400, "{headers}: {out}");
        assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{headers}: {out}");
        assert!(out.contains("request smuggling"), "{out}");
        assert!(
            out.to_ascii_lowercase().contains("connection: close"),
            "{out}"
        );
    }
    // The head split across writes, byte by byte at the names.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    for piece in [
        "POST /api/first HTTP/1.1\r\nHost: 127.0.0.1\r\nCont",
        "ent-Len",
        "gth: 4\r\nTransfer-Enc",
        "oding: chunked\r\n",
        "\r\n0\r\n\r\n",
    ] {
        s.write_all(piece.as_bytes()).await.unwrap();
        s.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert_eq!(status_of(&out), 400, "{out}");
    assert_eq!(up.requests(), 0, "nothing may reach the upstream");

    // Either one alone is fine, also on a kept-alive connection after a
    // refused one elsewhere.
    let out = exchange(
        p.addr,
        b"POST /api/ok HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&out), 200, "{out}");
    assert!(out.contains("\"body_len\":3"), "{out}");
    assert_eq!(up.requests(), 1);
}

/// Bare LF line endings are accepted (RFC 9112 §2.2 lets a recipient do so)
/// and re-framed with CRLF upstream, so no two parsers disagree; a bare LF
/// can never hide inside a value, it ends the line.
#[tokio::test]
async fn bare_lf_line_endings_are_reframed_not_smuggled() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    let out = exchange(
        p.addr,
        b"GET /api/lf HTTP/1.1\nHost: 127.0.0.1\nX-A: a\nConnection: close\n\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&out), 200, "{out}");
    assert!(out.contains("\"x-a\":[\"a\"]"), "{out}");
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn invalid_chunk_sizes_never_complete_a_request_upstream() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    for body in [
        "zz\r\nabc\r\n0\r\n\r\n",
        "-1\r\nabc\r\n0\r\n\r\n",
        "ffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
        "3\r\nabcdef\r\n0\r\n\r\n",
    ] {
        let out = exchange(
            p.addr,
            &req("Transfer-Encoding: chunked\r\n", body),
            Duration::from_secs(5),
        )
        .await;
        // Chunked bodies stream (gRPC needs that), so the head may already
        // be upstream; the body error aborts it: never a 200.
        let status = status_of(&out);
        assert!(
            status == 0 || (400..500).contains(&status) || status == 502,
            "{body:?}: {out:?}"
        );
        assert!(!out.contains("\"body_len\""), "{body:?}: {out:?}");
    }
}

#[tokio::test]
async fn oversized_heads_get_431_or_414_and_too_many_headers_431() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    // Limits: 64 KiB of request head (listener.rs MAX_HEADER_BYTES), hyper's
    // 100 headers.
    let long_target = format!(
        "GET /api/{} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let out = exchange(p.addr, long_target.as_bytes(), Duration::from_secs(5)).await;
    assert!(matches!(status_of(&out), 414 | 431), "{out:.200}");
    let big_header = format!(
        "GET /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "b".repeat(70 * 1024)
    );
    let out = exchange(p.addr, big_header.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&out), 431, "{out:.200}");
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\n{many}Connection: close\r\n\r\n");
    let out = exchange(p.addr, many.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&out), 431, "{out:.200}");
    assert_eq!(up.requests(), 0);
    // Just under the limits passes.
    let ok: String = (0..80).map(|i| format!("X-H{i}: v\r\n")).collect();
    let ok = format!(
        "GET /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {}\r\n{ok}Connection: close\r\n\r\n",
        "b".repeat(30 * 1024)
    );
    let out = exchange(p.addr, ok.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&out), 200, "{out:.200}");
}

#[tokio::test]
async fn invalid_header_bytes_and_request_lines_get_400() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    let get = |line: &str, headers: &str| {
        format!("{line}\r\nHost: 127.0.0.1\r\n{headers}Connection: close\r\n\r\n").into_bytes()
    };
    let cases = [
        (
            "NUL in value",
            get("GET /api/x HTTP/1.1", "X-A: a\x00b\r\n"),
        ),
        (
            "SOH in value",
            get("GET /api/x HTTP/1.1", "X-A: a\x01b\r\n"),
        ),
        (
            "DEL in value",
            get("GET /api/x HTTP/1.1", "X-A: a\x7fb\r\n"),
        ),
        (
            "space in name",
            get("GET /api/x HTTP/1.1", "Bad Name: x\r\n"),
        ),
        ("paren in name", get("GET /api/x HTTP/1.1", "X(a): x\r\n")),
        ("empty name", get("GET /api/x HTTP/1.1", ": x\r\n")),
        ("no colon", get("GET /api/x HTTP/1.1", "X-A x\r\n")),
        ("space in target", get("GET /api/a b HTTP/1.1", "")),
        ("tab in target", get("GET /api/a\tb HTTP/1.1", "")),
        ("bad version", get("GET /api/x HTTP/9.9", "")),
        ("bad method", get("G@T /api/x HTTP/1.1", "")),
        ("no target", get("GET HTTP/1.1", "")),
        (
            "two Hosts",
            get("GET /api/x HTTP/1.1", "Host: 127.0.0.1\r\n"),
        ),
        (
            "empty Host",
            b"GET /api/x HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n".to_vec(),
        ),
        (
            "no Host",
            b"GET /api/x HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
        ),
        (
            "Host with userinfo",
            b"GET /api/x HTTP/1.1\r\nHost: a@127.0.0.1\r\nConnection: close\r\n\r\n".to_vec(),
        ),
    ];
    for (what, bytes) in &cases {
        let out = exchange(p.addr, bytes, Duration::from_secs(5)).await;
        let status = status_of(&out);
        assert!(
            (400..500).contains(&status) || (status == 0 && out.is_empty()),
            "{what}: {out:?}"
        );
    }
    assert_eq!(up.requests(), 0);
}

/// A listener that only counts the connections it gets.
async fn decoy() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((_s, _)) = l.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
        }
    });
    (addr, hits)
}

#[tokio::test]
async fn never_an_open_proxy_absolute_form_foreign_host_and_connect() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    let (decoy, hits) = decoy().await;
    let cases: Vec<(String, u16)> = vec![
        // Routed by path to the configured upstream, never to the decoy.
        (
            format!("GET http://{decoy}/api/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
            200,
        ),
        // No route for the path: the decoy is not a fallback.
        (
            format!("GET http://{decoy}/other HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
            404,
        ),
        // Host naming another loopback address: allowed (loopback), but
        // still routed by path to the configured upstream.
        (
            format!("GET /api/x HTTP/1.1\r\nHost: {decoy}\r\nConnection: close\r\n\r\n"),
            200,
        ),
        // Host naming a foreign host: refused (DNS rebinding).
        (
            "GET /api/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n".into(),
            421,
        ),
        (
            "GET http://evil.example/api/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n".into(),
            421,
        ),
        (
            format!("CONNECT {decoy} HTTP/1.1\r\nHost: {decoy}\r\nConnection: close\r\n\r\n"),
            405,
        ),
        (
            "CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\nConnection: close\r\n\r\n".into(),
            405,
        ),
    ];
    for (request, status) in &cases {
        let out = exchange(p.addr, request.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(status_of(&out), *status, "{request}: {out}");
        if *status == 200 {
            assert!(
                out.contains(&format!("\"host\":[\"{}\"]", up.addr())),
                "{out}"
            );
        } else {
            assert!(out.contains("x-tokenproxy-error: "), "{out}");
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the decoy was contacted");
    assert_eq!(up.requests(), 2);
}

#[tokio::test]
async fn traversal_and_encoding_tricks_never_leave_the_prefix() {
    let up = echo().await;
    let p = start_proxy(vec![route("/a/", &up.url()), route("/b/", &up.url())]).await;
    for path in [
        "/a/../b/x",
        "/a/./x",
        "/a/%2e%2e/b/x",
        "/a/%2E%2e/b/x",
        "/a/.%2e/b/x",
        "/a/%2e./b/x",
        "/a/..%2fb/x",
        "/a/%2e%2e%2fb/x",
        "/a/x%2Fy",
        "/a/x%5cy",
        "/a//b/x",
        "//a/x",
        "/a/..\\b/x",
        "/a\\..\\b/x",
        "/a/..;/b/x",
        "/a/%2e%2e;x/b",
        "/a/%00/x",
        "/a/%0d%0aX-Injected:%201",
        "/a/%",
        "/a/%zz",
        "/a/%2",
    ] {
        let out = exchange(
            p.addr,
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(status_of(&out), 400, "{path}: {out}");
        assert!(
            out.contains("x-tokenproxy-error: bad_request"),
            "{path}: {out}"
        );
    }
    assert_eq!(up.requests(), 0);
    // Overlong UTF-8 (`%c0%ae` is `.` to a broken decoder), double encoding
    // and `%u` escapes are not dot-segments or separators: forwarded within
    // the prefix, byte for byte, never decoded into `..`.
    for (path, upstream_path) in [
        ("/a/%c0%ae%c0%ae/b/x", "/%c0%ae%c0%ae/b/x"),
        ("/a/%c0%af/x", "/%c0%af/x"),
        ("/a/%252e%252e/b", "/%252e%252e/b"),
        ("/a/%u002e%u002e/b", "/%u002e%u002e/b"),
    ] {
        let out = exchange(
            p.addr,
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        let status = status_of(&out);
        if status == 200 {
            assert!(
                out.contains(&format!("\"path\":\"{upstream_path}\"")),
                "{path}: {out}"
            );
        } else {
            assert_eq!(status, 400, "{path}: {out}");
        }
    }
}

#[tokio::test]
async fn slowloris_is_cut_by_the_header_read_timeout() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    let started = Instant::now();
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    // One header line a second, never finishing the head; bounded at 20.
    let mut closed_after = None;
    for i in 0..20 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut buf = [0u8; 512];
        if s.write_all(format!("X-{i}: v\r\n").as_bytes())
            .await
            .is_err()
        {
            closed_after = Some(started.elapsed());
            break;
        }
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
            // EOF, a reset or a 408: the server gave up on us.
            let _ = r;
            closed_after = Some(started.elapsed());
            break;
        }
    }
    let closed_after = closed_after.expect("the slow connection was never cut");
    assert!(
        closed_after < Duration::from_secs(13),
        "cut only after {closed_after:?}"
    );
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn connection_flood_is_bounded_and_idle_holders_are_evicted() {
    let up = echo().await;
    let mut cfg = config(vec![route("/api/", &up.url())]);
    cfg.server.max_connections = 4;
    let p = start_proxy_with(cfg).await;
    // As many connections as permits, never sending a byte (more only queue
    // in the kernel's backlog, each cut in turn after the timeout).
    let mut flood = Vec::new();
    for _ in 0..4 {
        flood.push(TcpStream::connect(p.addr).await.unwrap());
    }
    // A real client still gets served, once the header read timeout has
    // evicted the idle permit holders (10 s).
    let started = Instant::now();
    let out = exchange(
        p.addr,
        b"GET /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(status_of(&out), 200, "{out}");
    assert!(started.elapsed() < Duration::from_secs(15));
    // The silent ones were closed.
    for s in &mut flood {
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
    }
    assert_eq!(up.requests(), 1);
    drop(flood);
}

#[tokio::test]
async fn expect_100_continue_works() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"PUT /api/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("a 100 Continue arrives before the body is sent")
        .unwrap();
    let interim = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    s.write_all(b"hello").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"body_len\":5"), "{out}");
}

#[tokio::test]
async fn websocket_upgrade_on_a_plain_route_is_501_and_never_reaches_upstream() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    for extra in ["", "Content-Length: 0\r\n", "Upgrade: h2c\r\n"] {
        let out = exchange(
            p.addr,
            format!("GET /api/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(status_of(&out), 501, "{out}");
        assert!(out.contains("x-tokenproxy-error: upgrade_not_enabled"));
    }
    assert_eq!(up.requests(), 0);
}

// --- HTTP/2 -----------------------------------------------------------------

async fn h2_connect(
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    (send, tokio::spawn(conn))
}

fn h2_get(addr: SocketAddr, path: &str) -> http::Request<()> {
    http::Request::get(format!("http://{addr}{path}"))
        .body(())
        .unwrap()
}

#[tokio::test]
async fn h2_rapid_reset_is_cut_off_and_others_still_served() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    let (mut send, conn) = h2_connect(p.addr).await;
    let mut sent = 0;
    // Bounded: at most 5000 streams opened and reset at once.
    for _ in 0..5000 {
        if send.clone().ready().await.is_err() {
            break;
        }
        let Ok((_resp, mut stream)) = send.send_request(h2_get(p.addr, "/api/delay/200"), true)
        else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        sent += 1;
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    eprintln!(
        "rapid reset: {sent} streams reset, upstream saw {}, connection ended: {ended:?}",
        up.requests()
    );
    // Each reset stream is cancelled before it costs an upstream request,
    // and the connection is eventually cut.
    assert!(up.requests() < 100, "{} forwarded", up.requests());
    assert!(
        matches!(ended, Ok(Ok(Err(_)))),
        "the abusive connection was not cut: {ended:?}"
    );
    // The proxy is fine for everyone else.
    let (resp, _) = send_h2c(&p.url("/api/after")).await;
    assert_eq!(resp, 200);
}

async fn send_h2c(url: &str) -> (u16, bytes::Bytes) {
    let (resp, body) = send(&h2c_client(), get(url)).await;
    (resp.status().as_u16(), body)
}

#[tokio::test]
async fn h2_limits_streams_and_header_lists() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let (send, mut conn) = h2::client::handshake(tcp).await.unwrap();
    // Drive the connection until the server's SETTINGS arrived.
    let mut send = send;
    let (resp, _) = send.send_request(h2_get(p.addr, "/api/x"), true).unwrap();
    let resp = tokio::select! {
        r = resp => r.unwrap(),
        _ = &mut conn => panic!("connection ended"),
    };
    assert_eq!(resp.status(), 200);
    assert!(
        conn.max_concurrent_send_streams() <= 100,
        "max_concurrent_streams advertised: {}",
        conn.max_concurrent_send_streams()
    );
    tokio::spawn(conn);
    // A 100 KiB header list: refused, never forwarded.
    let before = up.requests();
    let req = http::Request::get(format!("http://{}/api/big", p.addr))
        .header("x-big", "b".repeat(100 * 1024))
        .body(())
        .unwrap();
    let outcome = match send.clone().ready().await {
        Ok(mut s) => match s.send_request(req, true) {
            Ok((resp, _)) => match tokio::time::timeout(Duration::from_secs(5), resp).await {
                Ok(Ok(r)) => format!("status {}", r.status().as_u16()),
                Ok(Err(e)) => format!("error {e}"),
                Err(_) => "timeout".to_owned(),
            },
            Err(e) => format!("refused locally {e}"),
        },
        Err(e) => format!("connection {e}"),
    };
    assert!(
        outcome == "status 431" || outcome.starts_with("error") || outcome.starts_with("refused"),
        "{outcome}"
    );
    assert_eq!(up.requests(), before, "{outcome}");
}

// --- Admin ------------------------------------------------------------------

#[tokio::test]
async fn admin_mutations_unreachable_from_a_browser_form() {
    let stack = crate::harness::Stack::start(crate::harness::StackOpts::default()).await;
    let app = stack.app("").await;
    let admin = app.admin_addr.unwrap();
    let cred = crate::harness::CRED;
    for path in ["/reload".to_owned(), format!("/credentials/{cred}/refresh")] {
        // What an HTML form (or a no-cors fetch) can send: POST, a simple
        // content type, an Origin, no custom header.
        let form = format!(
            "POST {path} HTTP/1.1\r\nHost: {admin}\r\nOrigin: http://evil.example\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 3\r\nConnection: close\r\n\r\na=b"
        );
        let out = exchange(admin, form.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(status_of(&out), 403, "{path}: {out}");
        // Same with a rebinding Host and text/plain.
        let form = format!(
            "POST {path} HTTP/1.1\r\nHost: evil.example\r\nContent-Type: text/plain\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let out = exchange(admin, form.as_bytes(), Duration::from_secs(5)).await;
        assert!(matches!(status_of(&out), 403 | 421), "{path}: {out}");
        // GET (a link, an <img>) never mutates.
        let out = exchange(
            admin,
            format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n").as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert!(matches!(status_of(&out), 404 | 405), "{path}: {out}");
    }
    let refreshes = stack.refresh_grants();
    // With the header (which a browser cannot send cross-origin) it works.
    let out = exchange(
        admin,
        format!("POST /credentials/{cred}/refresh HTTP/1.1\r\nHost: {admin}\r\nx-tokenproxy-admin: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(status_of(&out), 200, "{out}");
    assert!(stack.refresh_grants() > refreshes);
    app.shutdown().await;
}

/// A `Connection` value with an obs-text byte still has its listed headers
/// stripped (found by the hop-by-hop property test).
#[tokio::test]
async fn connection_listed_headers_stripped_even_with_obs_text() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    let out = exchange(
        p.addr,
        b"GET /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: x-secret, \xffobs, close\r\nX-Secret: 1\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&out), 200, "{out}");
    assert!(!out.contains("x-secret"), "{out}");
}

/// Reads one response with a `Content-Length` body; None when the peer
/// closed first.
async fn read_response(s: &mut TcpStream) -> Option<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return Some(String::from_utf8_lossy(&got).into_owned());
            }
        }
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// The header read timeout times request heads from their first byte; an
/// idle keep-alive connection lives until `server.keepalive_timeout`.
#[tokio::test]
async fn idle_keepalive_outlives_the_header_timeout_until_keepalive_timeout() {
    let up = echo().await;
    let mut cfg = config(vec![route("/api/", &up.url())]);
    cfg.server.header_read_timeout = Duration::from_secs(1);
    cfg.server.keepalive_timeout = Duration::from_secs(3);
    let p = start_proxy_with(cfg).await;
    let get = b"GET /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

    let mut s = TcpStream::connect(p.addr).await.unwrap();
    for round in 0..3 {
        s.write_all(get).await.unwrap();
        let out = read_response(&mut s).await.expect("closed while in use");
        assert_eq!(status_of(&out), 200, "round {round}: {out}");
        // Idle for twice the header read timeout, well within keep-alive.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // Idle past the keep-alive timeout: closed by the proxy.
    let idle = Instant::now();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
    assert!(
        idle.elapsed() < Duration::from_secs(3),
        "{:?}",
        idle.elapsed()
    );

    // A head started on a kept-alive connection must still finish in time.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(get).await.unwrap();
    assert!(read_response(&mut s).await.is_some());
    s.write_all(b"GET /api/slow HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(_)) | Ok(Err(_))), "{r:?}");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "a stalled head was cut only after {:?}",
        started.elapsed()
    );
    assert_eq!(up.requests(), 4);
}

#[tokio::test]
async fn header_limits_follow_the_config() {
    let up = echo().await;
    let mut cfg = config(vec![route("/api/", &up.url())]);
    cfg.server.max_header_bytes = 16 * 1024;
    cfg.server.max_headers = 20;
    let p = start_proxy_with(cfg).await;
    let with_headers = |extra: String| {
        format!("GET /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n")
    };
    let big = with_headers(format!("X-Big: {}\r\n", "b".repeat(20 * 1024)));
    let out = exchange(p.addr, big.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&out), 431, "{out:.200}");
    let many = with_headers((0..25).map(|i| format!("X-H{i}: v\r\n")).collect());
    let out = exchange(p.addr, many.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&out), 431, "{out:.200}");
    assert_eq!(up.requests(), 0);
    // Under both limits: served (the defaults, 64 KiB and 100, are tested
    // above with bigger heads).
    let fine = with_headers(format!(
        "X-Big: {}\r\n{}",
        "b".repeat(10 * 1024),
        (0..12)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>()
    ));
    let out = exchange(p.addr, fine.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&out), 200, "{out:.200}");
}
