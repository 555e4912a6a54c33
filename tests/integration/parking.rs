//! Idle HTTP/1.1 keep-alive connections are parked: their hyper session is
//! dropped and the socket waits alone (docs/operations.md, "Idle
//! connections"). Whatever the client sends next, in whatever pieces, must
//! be served as if nothing had happened.

use crate::harness::*;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longer than the proxy's park delay plus a watchdog round.
const PARKED: Duration = Duration::from_millis(900);

const GET: &[u8] = b"GET /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

/// Reads one response with a `Content-Length` body: (status, body).
async fn response<S: AsyncRead + Unpin>(s: &mut S) -> (u16, String) {
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
                let status = head[9..12].parse().unwrap();
                return (
                    status,
                    String::from_utf8_lossy(&got[end + 4..]).into_owned(),
                );
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("no response within 5 s")
            .expect("read");
        assert!(
            n > 0,
            "closed mid-response: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
}

/// GET, park, then: a whole request, one sent in pieces with pauses (the
/// first piece wakes the parked socket), a POST with a body, and a GET
/// again; all on one connection.
async fn parked_connection_round<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    s.write_all(GET).await.unwrap();
    assert_eq!(response(s).await.0, 200);
    tokio::time::sleep(PARKED).await;

    s.write_all(GET).await.unwrap();
    assert_eq!(response(s).await.0, 200, "a whole request after parking");
    tokio::time::sleep(PARKED).await;

    for piece in [
        &b"G"[..],
        b"ET /api/x?piece",
        b"s=1 HTTP/1.1\r\nHo",
        b"st: 127.0.0.1\r\n\r\n",
    ] {
        s.write_all(piece).await.unwrap();
        s.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let (status, body) = response(s).await;
    assert_eq!(status, 200, "a request in pieces after parking: {body}");
    assert!(body.contains("pieces=1"), "{body}");
    tokio::time::sleep(PARKED).await;

    let post = b"POST /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello";
    s.write_all(post).await.unwrap();
    let (status, body) = response(s).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(body.as_bytes())["body_len"], 5, "{body}");
    tokio::time::sleep(PARKED).await;

    s.write_all(GET).await.unwrap();
    assert_eq!(response(s).await.0, 200, "a GET after a POST and a pause");
}

#[tokio::test]
async fn a_parked_keepalive_connection_serves_whatever_comes_next() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    parked_connection_round(&mut s).await;
    assert_eq!(up.requests(), 5);
}

/// A pipelined request cut short in the same read as a whole one: the
/// unparsed piece sits in hyper's buffer, so that connection must not be
/// parked (it would lose the piece).
#[tokio::test]
async fn a_partial_pipelined_request_is_not_lost_to_parking() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    // Both in the connection's first read (a parked connection wakes up on
    // a short read, so this is how a session meets such bytes).
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut both = GET.to_vec();
    both.extend_from_slice(b"GET /api/x?second=1 HTTP/1.1\r\nHo");
    s.write_all(&both).await.unwrap();
    assert_eq!(response(&mut s).await.0, 200);
    tokio::time::sleep(PARKED).await;
    s.write_all(b"st: 127.0.0.1\r\n\r\n").await.unwrap();
    let (status, body) = response(&mut s).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("second=1"), "{body}");
    assert_eq!(up.requests(), 2);
}

#[tokio::test]
async fn a_parked_connection_can_still_upgrade_to_a_websocket() {
    let up = echo().await;
    let mut api = route("/api/", &up.url());
    api.upgrades = true;
    let mut ws = route("/ws/", &up.url());
    ws.upgrades = true;
    let p = start_proxy(vec![api, ws]).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(GET).await.unwrap();
    assert_eq!(response(&mut s).await.0, 200);
    tokio::time::sleep(PARKED).await;

    s.write_all(b"GET /ws/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    s.write_all(b"ping through the tunnel").await.unwrap();
    let mut buf = [0u8; 23];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping through the tunnel");
}

#[tokio::test]
async fn a_parked_tls_connection_serves_whatever_comes_next() {
    let up = echo().await;
    let p = start_proxy_with(tls_config(vec![route("/api/", &up.url())])).await;
    let tls_config = test_tls_client();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls_config));
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let mut s = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    parked_connection_round(&mut s).await;
    assert_eq!(up.requests(), 5);
}

/// Parked connections still close after `server.keepalive_timeout`, and at
/// shutdown.
#[tokio::test]
async fn parked_connections_close_on_keepalive_timeout_and_shutdown() {
    let up = echo().await;
    let mut cfg = config(vec![route("/api/", &up.url())]);
    cfg.server.keepalive_timeout = Duration::from_secs(2);
    let p = start_proxy_with(cfg).await;
    let mut a = TcpStream::connect(p.addr).await.unwrap();
    a.write_all(GET).await.unwrap();
    assert_eq!(response(&mut a).await.0, 200);
    let idle = std::time::Instant::now();
    let mut byte = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(10), a.read(&mut byte)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
    let waited = idle.elapsed();
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );

    let mut b = TcpStream::connect(p.addr).await.unwrap();
    b.write_all(GET).await.unwrap();
    assert_eq!(response(&mut b).await.0, 200);
    tokio::time::sleep(PARKED).await;
    p.shutdown.cancel();
    let r = tokio::time::timeout(Duration::from_secs(2), b.read(&mut byte)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
}
