//! Egress proxy: upstreams off loopback are reached through an HTTP CONNECT
//! tunnel; loopback (here: the IdP) stays direct.

use crate::harness::{client, get, json, send};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokenproxy::app::App;
use tokenproxy::dev::{DevIdp, EchoUpstream, IdpOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A CONNECT proxy that sends every tunnel to 127.0.0.1 (so names that
/// resolve nowhere still reach the test upstream) and records the targets.
async fn connect_proxy() -> (
    String,
    Arc<parking_lot::Mutex<Vec<String>>>,
    Arc<AtomicUsize>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let targets = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let (t, c) = (targets.clone(), count.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (t, c) = (t.clone(), c.clone());
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                reader.read_line(&mut line).await.unwrap();
                let target = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).await.unwrap();
                    if h == "\r\n" || h.is_empty() {
                        break;
                    }
                }
                let port = target.rsplit(':').next().unwrap_or("0").to_owned();
                t.lock().push(target);
                c.fetch_add(1, Ordering::SeqCst);
                let mut upstream = TcpStream::connect(format!("127.0.0.1:{port}"))
                    .await
                    .unwrap();
                let mut client = reader.into_inner();
                client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (format!("http://{addr}"), targets, count)
}

#[tokio::test]
async fn upstreams_go_through_the_egress_proxy_and_loopback_does_not() {
    let idp = DevIdp::start("127.0.0.1:0".parse().unwrap(), IdpOptions::default())
        .await
        .unwrap();
    let echo = EchoUpstream::start("127.0.0.1:0".parse().unwrap(), idp.token_check())
        .await
        .unwrap();
    let (proxy_url, targets, tunnels) = connect_proxy().await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
egress_proxy = "{proxy_url}"
[admin]
listen = "127.0.0.1:0"
[credentials.svc]
grant = "client_credentials"
token_url = "{token_url}"
client_id = "demo-client"
client_secret = "demo-secret"
[[routes]]
path_prefix = "/far/"
upstream = "http://upstream.test:{port}/"
allow_plaintext = true
credential = "svc"
[[routes]]
path_prefix = "/near/"
upstream = "{echo}/"
credential = "svc"
"#,
        token_url = idp.token_url(),
        port = echo.addr().port(),
        echo = echo.url(),
    );
    let cfg = tokenproxy::config::parse(&text, &dir.path().join("p.toml"), &|_| None).unwrap();
    let app = App::start(&cfg).await.unwrap();
    let base = format!("http://{}", app.proxy_addr.unwrap());
    let c = client();

    let (resp, body) = send(&c, get(&format!("{base}/far/x"))).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["token_ok"], true);
    assert_eq!(
        targets.lock().clone(),
        vec![format!("upstream.test:{}", echo.addr().port())],
        "the upstream was reached through the tunnel"
    );
    let before = tunnels.load(Ordering::SeqCst);
    let (resp, _) = send(&c, get(&format!("{base}/near/y"))).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        tunnels.load(Ordering::SeqCst),
        before,
        "loopback upstreams and the loopback IdP never use the proxy"
    );
    assert_eq!(idp.grant_count("client_credentials"), 1);
    app.shutdown().await;
}
