//! Upstream responses the proxy must re-frame or clean (issue #17): both
//! `Transfer-Encoding` and `Content-Length`, a forged `x-tokenproxy-error`,
//! and a client that stalls a body buffered for replay. A raw-socket
//! upstream answers exactly the bytes given; both the lean exchange (no
//! request body) and hyper's (a body) are covered.

use crate::harness::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Answers every request (head and Content-Length body read) with
/// `response`, then closes; counts the requests it read.
async fn raw_upstream(response: &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                seen.fetch_add(1, Ordering::SeqCst);
                let _ = s.write_all(response).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, count)
}

/// Writes `bytes`, reads until the proxy closes (or 5 s).
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn head_of(out: &str) -> String {
    out.split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// The same request without a body (lean path) and with one (hyper).
fn requests() -> [(&'static str, &'static [u8]); 2] {
    [
        (
            "GET",
            b"GET /up/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        ),
        (
            "POST",
            b"POST /up/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        ),
    ]
}

#[tokio::test]
async fn chunked_with_content_length_is_forwarded_without_the_length() {
    let (up, count) = raw_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let p = start_proxy(vec![route("/up/", &format!("http://{up}/"))]).await;
    for (what, req) in requests() {
        let out = exchange(p.addr, req).await;
        let head = head_of(&out);
        assert!(head.starts_with("http/1.1 200"), "{what}: {out}");
        // RFC 9112 §6.3: the length is wrong once the body is re-framed.
        assert!(!head.contains("content-length: 100"), "{what}: {out}");
        assert!(out.contains("hello"), "{what}: {out}");
    }
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_upstream_cannot_forge_the_proxys_error_header() {
    for response in [
        &b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\nx-tokenproxy-error: credential_unavailable\r\n\r\nno"[..],
        b"HTTP/1.1 502 Bad Gateway\r\nTransfer-Encoding: chunked\r\nX-Tokenproxy-Error: upstream_unreachable\r\n\r\n2\r\nno\r\n0\r\n\r\n",
    ] {
        let (up, count) = raw_upstream(response).await;
        let p = start_proxy(vec![route("/up/", &format!("http://{up}/"))]).await;
        for (what, req) in requests() {
            let out = exchange(p.addr, req).await;
            let head = head_of(&out);
            assert!(head.starts_with("http/1.1 50"), "{what}: {out}");
            assert!(!head.contains("x-tokenproxy-error"), "{what}: {out}");
            assert!(out.ends_with("no") || out.contains("\r\n\r\n2\r\nno"), "{what}: {out}");
        }
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }
}

#[tokio::test]
async fn a_stalled_body_buffered_for_replay_hits_the_idle_timeout() {
    let (up, count) = raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let mut r = route("/up/", &format!("http://{up}/"));
    r.idle_timeout = Duration::from_secs(1);
    let p = start_proxy(vec![r]).await;
    let started = Instant::now();
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    // Half of a small body (so it is buffered for a replay), then nothing.
    s.write_all(b"POST /up/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\nabcde")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("the proxy waited on the stalled body for more than 5 s")
        .unwrap_or(0);
    let out = String::from_utf8_lossy(&buf[..n]);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 4"), "{out}");
    assert_eq!(
        count.load(Ordering::SeqCst),
        0,
        "a partial body went upstream"
    );
}
