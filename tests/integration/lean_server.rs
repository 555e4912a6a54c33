//! Plain HTTP/1.1 requests are served by the lean server path, the rest by
//! hyper, on the same connection (docs/architecture.md, "Listener"). Over
//! real sockets: pipelining, `Connection: close`, the hand-off to hyper and
//! back, and shutdown with a request in flight.

use crate::harness::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Everything the proxy sends until it closes the connection.
async fn read_to_close(s: &mut TcpStream) -> String {
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all))
        .await
        .expect("the proxy closes the connection within 5 s")
        .expect("read");
    String::from_utf8_lossy(&all).into_owned()
}

/// The response heads in `wire`, lowercased, in order.
fn heads(wire: &str) -> Vec<String> {
    wire.match_indices("HTTP/1.1 ")
        .map(|(at, _)| {
            let rest = &wire[at..];
            rest[..rest.find("\r\n\r\n").unwrap_or(rest.len())].to_ascii_lowercase()
        })
        .collect()
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_close_is_honoured() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    // One write: three requests, the last asking to close.
    s.write_all(
        b"GET /api/x?n=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n\
          POST /api/x?n=2 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\nabc\
          GET /api/x?n=3 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let wire = read_to_close(&mut s).await;
    let heads = heads(&wire);
    assert_eq!(heads.len(), 3, "{wire}");
    for head in &heads {
        assert!(head.starts_with("http/1.1 200 ok"), "{head}");
        assert!(head.contains("\r\ndate: "), "{head}");
    }
    assert!(!heads[0].contains("connection: close"), "{}", heads[0]);
    assert!(heads[2].contains("connection: close"), "{}", heads[2]);
    let order: Vec<usize> = ["n=1", "n=2", "n=3"]
        .iter()
        .map(|n| {
            wire.find(n)
                .unwrap_or_else(|| panic!("{n} missing: {wire}"))
        })
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{wire}");
    assert_eq!(up.requests(), 3);
}

/// A chunked upload is hyper's; the connection stays open and serves the
/// plain requests before and after it.
#[tokio::test]
async fn a_chunked_upload_between_plain_requests_keeps_the_connection() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        b"GET /api/x?n=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n\
          POST /api/x?n=2 HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\n\r\n\
          GET /api/x?n=3 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let wire = read_to_close(&mut s).await;
    let heads = heads(&wire);
    assert_eq!(heads.len(), 3, "{wire}");
    assert!(
        heads.iter().all(|h| h.starts_with("http/1.1 200")),
        "{wire}"
    );
    assert!(wire.contains("\"body_len\":5"), "{wire}");
    assert_eq!(up.requests(), 3);
}

/// A body that has not all arrived is streamed by hyper: the request is
/// served once the rest comes, on the same connection.
#[tokio::test]
async fn a_body_arriving_late_is_still_served() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"POST /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\nhello")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write_all(b"world").await.unwrap();
    s.write_all(b"GET /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let wire = read_to_close(&mut s).await;
    assert_eq!(heads(&wire).len(), 2, "{wire}");
    assert!(wire.contains("\"body_len\":10"), "{wire}");
}

/// At shutdown a request in flight is answered, says `Connection: close`,
/// and the connection closes.
#[tokio::test]
async fn shutdown_answers_the_request_in_flight_then_closes() {
    let up = echo().await;
    let p = start_proxy(vec![route("/api/", &up.url())]).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /api/delay/400 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    p.shutdown.cancel();
    let wire = read_to_close(&mut s).await;
    let heads = heads(&wire);
    assert_eq!(heads.len(), 1, "{wire}");
    assert!(heads[0].starts_with("http/1.1 200"), "{}", heads[0]);
    assert!(heads[0].contains("connection: close"), "{}", heads[0]);
}

/// A client that goes away while its request is upstream takes the request
/// with it: the upstream connection is dropped, not left to finish a
/// response nobody will read (hyper's behaviour, kept by the lean path).
#[tokio::test]
async fn a_client_that_goes_away_cancels_its_upstream_request() {
    // The lean path's request, and one hyper serves (`TE`).
    for request in [
        &b"GET /api/slow HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"[..],
        b"GET /api/slow HTTP/1.1\r\nHost: 127.0.0.1\r\nTE: trailers\r\n\r\n",
    ] {
        let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", upstream.local_addr().unwrap());
        let p = start_proxy(vec![route("/api/", &url)]).await;
        let mut client = TcpStream::connect(p.addr).await.unwrap();
        client.write_all(request).await.unwrap();
        let (mut conn, _) = tokio::time::timeout(Duration::from_secs(5), upstream.accept())
            .await
            .expect("the request reaches the upstream")
            .unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "upstream connection closed mid-head");
            head.extend_from_slice(&buf[..n]);
        }
        // The upstream holds its answer; the client gives up.
        drop(client);
        let gone = tokio::time::timeout(Duration::from_secs(3), conn.read(&mut buf)).await;
        assert!(
            matches!(gone, Ok(Ok(0)) | Ok(Err(_))),
            "{:?}: the upstream request outlived its client: {gone:?}",
            String::from_utf8_lossy(request)
        );
    }
}
