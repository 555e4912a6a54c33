//! The admin listener as an attacker sees it (issue #17): a rebinding Host,
//! cross-site browser requests, slow or oversized clients. Raw sockets; the
//! dev IdP's grant count is the oracle that nothing was refreshed.

use crate::harness::{Stack, StackOpts, CRED};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Writes `bytes`, then reads until the peer closes or `wait` passes.
async fn exchange(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(out: &str) -> u16 {
    out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// One request on its own connection; `headers` end with `\r\n` each.
async fn admin(addr: SocketAddr, method: &str, path: &str, headers: &str) -> String {
    let len = if method == "POST" {
        "Content-Length: 0\r\n"
    } else {
        ""
    };
    let raw = format!("{method} {path} HTTP/1.1\r\n{headers}{len}Connection: close\r\n\r\n");
    exchange(addr, raw.as_bytes(), Duration::from_secs(15)).await
}

/// Hour-long tokens: the engine refreshes nothing by itself.
fn quiet() -> StackOpts {
    StackOpts {
        access_ttl: Duration::from_secs(3600),
        ..StackOpts::default()
    }
}

/// The first token is in: later refresh grants are the test's doing.
/// The app, once its first refresh has landed: with hour-long tokens the
/// engine is quiet after that, so grant counts and store reads are the
/// test's own.
async fn started(stack: &Stack, cfg: tokenproxy::config::Config) -> tokenproxy::app::App {
    let app = tokenproxy::app::App::start(&cfg).await.expect("app starts");
    stack.wait_generation(1, Duration::from_secs(10)).await;
    app
}

#[tokio::test]
async fn admin_refuses_a_foreign_host_on_every_endpoint() {
    let stack = Stack::start(quiet()).await;
    let app = started(&stack, stack.config("")).await;
    let addr = app.admin_addr.unwrap();
    let grants = stack.idp.grant_count("refresh_token");
    let refresh = format!("/credentials/{CRED}/refresh");
    let login = format!("/login/{CRED}");
    let cases = [
        ("GET", "/"),
        ("GET", "/credentials"),
        ("GET", "/credentials/user"),
        ("POST", refresh.as_str()),
        ("POST", "/reload"),
        ("GET", login.as_str()),
        ("GET", "/callback"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
    ];
    for (method, path) in cases {
        let out = admin(
            addr,
            method,
            path,
            "Host: evil.example:9901\r\nx-tokenproxy-admin: 1\r\n",
        )
        .await;
        assert_eq!(status_of(&out), 421, "{method} {path}: {out}");
        assert!(out.contains("host_not_allowed"), "{method} {path}: {out}");
    }
    assert_eq!(
        stack.idp.grant_count("refresh_token"),
        grants,
        "a refused refresh reached the IdP"
    );
    // Its own address and localhost still work.
    for host in [addr.to_string(), format!("localhost:{}", addr.port())] {
        let out = admin(addr, "GET", "/credentials", &format!("Host: {host}\r\n")).await;
        assert_eq!(status_of(&out), 200, "{host}: {out}");
    }
    let out = admin(
        addr,
        "POST",
        &refresh,
        &format!("Host: {addr}\r\nx-tokenproxy-admin: 1\r\n"),
    )
    .await;
    assert_eq!(status_of(&out), 200, "{out}");
    assert_eq!(stack.idp.grant_count("refresh_token"), grants + 1);
    // kubelet and Prometheus dial the pod IP: an IP literal reaches the
    // probes (a rebinding page always sends its own name), nothing else.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let out = admin(addr, "GET", path, "Host: 10.1.2.3:9901\r\n").await;
        assert_eq!(status_of(&out), 200, "{path}: {out}");
    }
    let out = admin(addr, "GET", "/credentials", "Host: 10.1.2.3:9901\r\n").await;
    assert_eq!(status_of(&out), 421, "{out}");
    app.shutdown().await;
}

#[tokio::test]
async fn admin_refuses_cross_site_state_changes_even_with_the_header() {
    let stack = Stack::start(quiet()).await;
    let app = started(&stack, stack.config("")).await;
    let addr = app.admin_addr.unwrap();
    let grants = stack.idp.grant_count("refresh_token");
    let refresh = format!("/credentials/{CRED}/refresh");
    for path in [refresh.as_str(), "/reload"] {
        for extra in [
            "Sec-Fetch-Site: cross-site\r\n",
            "Sec-Fetch-Site: same-site\r\n",
            "Origin: http://evil.example\r\n",
            "Origin: null\r\n",
        ] {
            let out = admin(
                addr,
                "POST",
                path,
                &format!("Host: {addr}\r\nx-tokenproxy-admin: 1\r\n{extra}"),
            )
            .await;
            assert_eq!(status_of(&out), 403, "{path} {extra}: {out}");
        }
    }
    assert_eq!(stack.idp.grant_count("refresh_token"), grants);
    // Its own origin, with the header, is fine.
    let out = admin(
        addr,
        "POST",
        &refresh,
        &format!("Host: {addr}\r\nOrigin: http://{addr}\r\nSec-Fetch-Site: same-origin\r\nx-tokenproxy-admin: 1\r\n"),
    )
    .await;
    assert_eq!(status_of(&out), 200, "{out}");
    assert_eq!(stack.idp.grant_count("refresh_token"), grants + 1);
    app.shutdown().await;
}

#[tokio::test]
async fn admin_slowloris_is_cut_and_big_bodies_refused() {
    let stack = Stack::start(quiet()).await;
    let mut cfg = stack.config("");
    cfg.server.header_read_timeout = Duration::from_secs(1);
    let app = started(&stack, cfg).await;
    let addr = app.admin_addr.unwrap();

    // A head that never ends, one line a second.
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET /credentials HTTP/1.1\r\nHost: {addr}\r\n").as_bytes())
        .await
        .unwrap();
    let mut cut = None;
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut buf = [0u8; 512];
        if s.write_all(format!("X-{i}: v\r\n").as_bytes())
            .await
            .is_err()
        {
            cut = Some(started.elapsed());
            break;
        }
        if tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf))
            .await
            .is_ok()
        {
            cut = Some(started.elapsed());
            break;
        }
    }
    let cut = cut.expect("the slow admin connection was never cut");
    assert!(cut < Duration::from_secs(4), "cut only after {cut:?}");

    // An idle connection goes too.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(4), idle.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");

    // A body bigger than any admin form is refused, unread.
    let out = exchange(
        addr,
        format!("POST /reload HTTP/1.1\r\nHost: {addr}\r\nx-tokenproxy-admin: 1\r\nContent-Length: 10000000\r\nConnection: close\r\n\r\nxxxx").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&out), 413, "{out}");
    app.shutdown().await;
}

#[tokio::test]
async fn readyz_does_not_read_the_store_on_every_probe() {
    let stack = Stack::start(quiet()).await;
    let app = started(&stack, stack.config("")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let addr = app.admin_addr.unwrap();
    let before = app.live.ready.store_reads();
    for _ in 0..20 {
        let out = admin(addr, "GET", "/readyz", &format!("Host: {addr}\r\n")).await;
        assert_eq!(status_of(&out), 200, "{out}");
    }
    let reads = app.live.ready.store_reads() - before;
    assert!(reads <= 1, "20 probes read the store {reads} times");
    // A changed store file is checked again.
    let out = admin(
        addr,
        "POST",
        &format!("/credentials/{CRED}/refresh"),
        &format!("Host: {addr}\r\nx-tokenproxy-admin: 1\r\n"),
    )
    .await;
    assert_eq!(status_of(&out), 200, "{out}");
    let before = app.live.ready.store_reads();
    let out = admin(addr, "GET", "/readyz", &format!("Host: {addr}\r\n")).await;
    assert_eq!(status_of(&out), 200, "{out}");
    assert_eq!(app.live.ready.store_reads(), before + 1);
    app.shutdown().await;
}

fn header_of<'a>(out: &'a str, name: &str) -> Option<&'a str> {
    let head = out.split("\r\n\r\n").next()?;
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test]
async fn a_forced_login_needs_a_post_with_the_pages_csrf_token() {
    let stack = Stack::start(quiet()).await;
    let extra = format!(
        "authorize_url = \"{}/authorize\"\nredirect_uri = \"http://127.0.0.1:9901/callback\"\n",
        stack.idp.url()
    );
    let app = started(&stack, stack.config(&extra)).await;
    let addr = app.admin_addr.unwrap();
    let host = format!("Host: {addr}\r\n");
    let path = format!("/login/{CRED}");
    let to_idp =
        |out: &str| header_of(out, "location").is_some_and(|l| l.starts_with(&stack.idp.url()));

    // The family works: a plain start is refused, and a GET with force is
    // only a page (an <img> or a link elsewhere starts nothing).
    let out = admin(addr, "GET", &path, &host).await;
    assert_eq!(status_of(&out), 409, "{out}");
    let out = admin(addr, "GET", &format!("{path}?force=1"), &host).await;
    assert_eq!(status_of(&out), 200, "{out}");
    assert!(!to_idp(&out), "a GET started a forced login: {out}");
    let csp = header_of(&out, "content-security-policy").unwrap_or("");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    let csrf = out
        .split("name=csrf value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("a csrf field")
        .to_owned();
    let cookie = header_of(&out, "set-cookie")
        .and_then(|c| c.split(';').next())
        .expect("a cookie")
        .to_owned();
    // Cross-site, even a forced GET gets no page.
    let out = admin(
        addr,
        "GET",
        &format!("{path}?force=1"),
        &format!("{host}Sec-Fetch-Site: cross-site\r\n"),
    )
    .await;
    assert_eq!(status_of(&out), 403, "{out}");

    let post = |headers: String, body: String| {
        let raw = format!(
            "POST {path} HTTP/1.1\r\n{host}{headers}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        async move { exchange(addr, raw.as_bytes(), Duration::from_secs(10)).await }
    };
    let form = format!("csrf={csrf}&force=1");
    let cookie_h = format!("Cookie: {cookie}\r\n");
    let refused = [
        // No token, a wrong one, no cookie, another browser's cookie.
        (cookie_h.clone(), "force=1".to_owned()),
        (
            cookie_h.clone(),
            "csrf=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA&force=1".to_owned(),
        ),
        (String::new(), form.clone()),
        (
            "Cookie: tokenproxy_login=someone-else\r\n".to_owned(),
            form.clone(),
        ),
        // The right ones, sent by another site.
        (
            format!("{cookie_h}Origin: http://evil.example\r\n"),
            form.clone(),
        ),
        (
            format!("{cookie_h}Sec-Fetch-Site: cross-site\r\n"),
            form.clone(),
        ),
    ];
    for (headers, body) in refused {
        let out = post(headers.clone(), body.clone()).await;
        assert_eq!(status_of(&out), 403, "{headers} {body}: {out}");
        assert!(!to_idp(&out), "{out}");
    }
    // From the page, in the same browser: on to the IdP, once.
    let out = post(
        format!("{cookie_h}Origin: http://{addr}\r\nSec-Fetch-Site: same-origin\r\n"),
        form.clone(),
    )
    .await;
    assert_eq!(status_of(&out), 302, "{out}");
    assert!(to_idp(&out), "{out}");
    let out = post(cookie_h.clone(), form.clone()).await;
    assert_eq!(status_of(&out), 403, "a csrf token is single-use: {out}");
    assert_eq!(stack.idp.grant_count("authorization_code"), 0);
    app.shutdown().await;
}

const EGRESS_PW: &str = "egress-pw-Q9zR";
const UPSTREAM_PW: &str = "upstream-pw-7Kx";

#[tokio::test]
async fn check_refuses_upstream_userinfo_and_never_echoes_a_url_password() {
    let stack = Stack::start(quiet()).await;
    let base = stack.toml(18080, 19901, "");
    let cases = [
        // The password would reach the upstream's Host header and the page.
        base.replace(
            &format!("upstream = \"{}/\"", stack.echo.url()),
            &format!("upstream = \"https://upuser:{UPSTREAM_PW}@api.example/\""),
        ),
        // Config errors that echo a URL.
        base.replace(
            "[admin]",
            &format!("egress_proxy = \"socks5://proxyuser:{EGRESS_PW}@proxy:1080\"\n\n[admin]"),
        ),
        base.replace(
            "[admin]",
            &format!("egress_proxy = \"http://proxyuser:{EGRESS_PW}@pro xy:1080\"\n\n[admin]"),
        ),
        base.replace(
            &format!("upstream = \"{}/\"", stack.echo.url()),
            &format!("upstream = \"http://upuser:{UPSTREAM_PW}@10.9.8.7/\""),
        ),
    ];
    for (i, text) in cases.iter().enumerate() {
        assert!(
            text.contains("_PW") || text.contains("-pw-"),
            "case {i} changed nothing"
        );
        let path = stack.dir.path().join(format!("check{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let run = crate::harness::run_cli(&["check", "-c", path.to_str().unwrap()]);
        assert_eq!(run.code, Some(64), "case {i}: {}", run.text());
        for secret in [EGRESS_PW, UPSTREAM_PW] {
            assert!(!run.text().contains(secret), "case {i}: {}", run.text());
        }
    }
}

#[tokio::test]
async fn secrets_never_reach_error_bodies_the_status_page_or_metrics() {
    let stack = Stack::start(quiet()).await;
    let mut cfg = stack.config("");
    // Loopback goes direct, so the proxy is never dialled.
    cfg.server.egress_proxy = Some(
        format!("http://proxyuser:{EGRESS_PW}@127.0.0.1:3128")
            .parse()
            .unwrap(),
    );
    let app = started(&stack, cfg).await;
    let admin_addr = app.admin_addr.unwrap();
    let proxy = app.proxy_addr.unwrap();
    let mut seen = Vec::new();
    let get = |addr: SocketAddr, path: &str, headers: String| {
        let raw = format!("GET {path} HTTP/1.1\r\n{headers}Connection: close\r\n\r\n");
        async move { exchange(addr, raw.as_bytes(), Duration::from_secs(10)).await }
    };
    let host = format!("Host: {proxy}\r\n");
    for (path, headers, status) in [
        ("/api/x", host.clone(), 200),
        ("/nowhere", host.clone(), 404),
        ("/api/x", "Host: evil.example\r\n".to_owned(), 421),
        (
            "/api/x",
            format!("{host}Origin: http://evil.example\r\n"),
            403,
        ),
    ] {
        let out = get(proxy, path, headers).await;
        assert_eq!(status_of(&out), status, "{path}: {out}");
        // The 200 is the echo upstream's body, which reflects the token it
        // was sent; only what the proxy makes itself is checked.
        if status != 200 {
            seen.push(out);
        }
    }
    let host = format!("Host: {admin_addr}\r\n");
    for path in ["/", "/credentials", "/metrics", "/readyz", "/login/nobody"] {
        seen.push(get(admin_addr, path, host.clone()).await);
    }
    // A store that cannot be read: the probe says so, not where it is.
    std::fs::write(stack.store_path(), b"{ not json").unwrap();
    let out = get(admin_addr, "/readyz", host.clone()).await;
    assert_eq!(status_of(&out), 503, "{out}");
    assert!(out.contains("store_unavailable"), "{out}");
    seen.push(out);

    let mut secrets = stack.secrets();
    secrets.extend([EGRESS_PW.to_owned(), "proxyuser".to_owned()]);
    let store = stack.store_path().display().to_string();
    for out in &seen {
        for s in &secrets {
            assert!(
                !out.contains(s.as_str()),
                "a secret ({}...) in {out}",
                &s[..4]
            );
        }
        // Pages name the config file (for people); nothing names the store.
        assert!(
            !out.contains(&store) && !out.contains("tokens.json"),
            "{out}"
        );
    }
    app.shutdown().await;
}

/// A store that cannot be read while the token has expired: the client's
/// 503 says `store_unavailable` with a short hint, never the store's path or
/// the error chain (those are in the log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_store_is_not_described_in_client_error_bodies() {
    use crate::harness::{client, get_ok, wait_for};
    let stack = Stack::start(StackOpts::default()).await;
    let app = stack.app("max_backoff = \"1s\"\n").await;
    stack.wait_generation(1, Duration::from_secs(10)).await;
    let store = stack.store_path();
    let aside = stack.dir.path().join("tokens.aside");
    std::fs::rename(&store, &aside).unwrap();
    std::fs::create_dir(&store).unwrap();
    let url = format!("http://{}/api/x", app.proxy_addr.unwrap());
    let got = wait_for(
        "a 503 store_unavailable",
        Duration::from_secs(15),
        || async {
            let g = get_ok(&client(), &url).await;
            (g.status == 503 && g.json()["reason"] == "store_unavailable").then_some(g)
        },
    )
    .await;
    let body = got.text();
    let dir = stack.dir.path().display().to_string();
    assert!(
        !body.contains(&dir),
        "the store path reached a client: {body}"
    );
    assert!(
        !body.contains("Is a directory"),
        "an error chain reached a client: {body}"
    );
    std::fs::remove_dir(&store).unwrap();
    std::fs::rename(&aside, &store).unwrap();
    app.shutdown().await;
}
