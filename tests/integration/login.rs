//! Login (authorization code + PKCE) against the dev IdP, whose authorize
//! endpoint auto-approves: through the admin endpoints of an in-process app
//! (cookies by hand) and through the `login` binary's loopback listener.
//! Every failure names its cause, escaped, and no secret shows up.

use crate::harness::*;
use bytes::Bytes;
use http::Response;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokenproxy::dev::{DevClient, Fault, IdpOptions};

const SECRET: &str = "login-secret-Vb71qZ";
const REDIRECT: &str = "http://127.0.0.1:9901/callback";
const OTHER_REDIRECT: &str = "http://127.0.0.1:9901/callback/";

fn options(auth_method: Option<&str>, code_ttl: Duration) -> IdpOptions {
    let mut c = DevClient::confidential("login-client", SECRET);
    c.redirect_uris = vec![REDIRECT.into(), OTHER_REDIRECT.into()];
    c.auth_method = auth_method.map(str::to_owned);
    IdpOptions {
        access_ttl: Duration::from_secs(2),
        code_ttl,
        clients: vec![c],
        ..IdpOptions::default()
    }
}

fn snippet(redirect: &str) -> String {
    format!(
        r#"
[credentials.rt]
grant = "refresh_token"
token_url = "@TOKEN_URL@"
authorize_url = "@IDP@/authorize"
redirect_uri = "{redirect}"
client_id = "login-client"
client_secret = "${{LOGIN_SECRET}}"
auth_method = "client_secret_basic"
scopes = ["openid", "offline_access"]

[[routes]]
path_prefix = "/rt/"
upstream = "@ECHO@"
credential = "rt"
"#
    )
}

async fn started(opts: IdpOptions, secret: &str) -> TestEnv {
    let mut env = TestEnv::new(opts).await;
    env.var("LOGIN_SECRET", secret);
    env.start_with(&snippet(REDIRECT)).await;
    env
}

fn header<'a>(r: &'a Response<()>, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn location(r: &Response<()>) -> String {
    header(r, "location").to_owned()
}

fn param(url: &str, name: &str) -> Option<String> {
    let q = url.split_once('?')?.1;
    form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn with_param(url: &str, name: &str, value: &str) -> String {
    let (base, q) = url.split_once('?').unwrap();
    let mut ser = form_urlencoded::Serializer::new(String::new());
    for (k, v) in form_urlencoded::parse(q.as_bytes()) {
        ser.append_pair(&k, if k == name { value } else { &v });
    }
    format!("{base}?{}", ser.finish())
}

/// A started admin login: the IdP URL it redirected to and the cookie.
struct Started {
    idp_url: String,
    cookie: String,
    state: String,
}

/// `GET /login/rt`; with `?force=1`, the confirmation page first and then
/// its form (`POST` with the page's CSRF token and cookie).
async fn start_login(env: &TestEnv, query: &str) -> Started {
    let (r, page) = env.admin_raw(&format!("/login/rt{query}")).await;
    let r = if query.contains("force=1") {
        assert_eq!(r.status(), 200, "{r:?}");
        let page = String::from_utf8_lossy(&page);
        let csrf = page
            .split("name=csrf value=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .expect("a csrf field");
        let cookie = header(&r, "set-cookie").split(';').next().unwrap();
        let req = http::Request::post(env.admin_url("/login/rt"))
            .header("cookie", cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(http_body_util::Full::new(Bytes::from(format!(
                "csrf={csrf}&force=1"
            ))))
            .unwrap();
        send(&env.client, req).await.0
    } else {
        r
    };
    assert_eq!(r.status(), 302, "{r:?}");
    let set_cookie = header(&r, "set-cookie").to_owned();
    assert!(
        set_cookie.contains("HttpOnly")
            && set_cookie.contains("SameSite=Lax")
            && set_cookie.contains("Path=/")
            && set_cookie.contains("Max-Age=600"),
        "{set_cookie}"
    );
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let idp_url = location(&r);
    assert!(idp_url.starts_with(&env.idp.url()), "{idp_url}");
    assert_eq!(param(&idp_url, "redirect_uri").as_deref(), Some(REDIRECT));
    assert_eq!(
        param(&idp_url, "code_challenge_method").as_deref(),
        Some("S256")
    );
    assert_eq!(
        param(&idp_url, "scope").as_deref(),
        Some("openid offline_access")
    );
    let state = param(&idp_url, "state").expect("state");
    Started {
        idp_url,
        cookie,
        state,
    }
}

/// GETs the IdP's authorize URL (auto-approve) and returns the callback's
/// path and query as the admin listener should see them.
async fn authorize(env: &TestEnv, idp_url: &str) -> String {
    let (r, body) = send(&env.client, get(idp_url)).await;
    assert_eq!(r.status(), 302, "{}", String::from_utf8_lossy(&body));
    let cb = location(&r);
    cb.strip_prefix("http://127.0.0.1:9901")
        .unwrap_or_else(|| panic!("callback to the configured redirect_uri: {cb}"))
        .to_owned()
}

async fn callback(env: &TestEnv, path_query: &str, cookie: Option<&str>) -> (Response<()>, String) {
    let mut req = get(&env.admin_url(path_query));
    if let Some(c) = cookie {
        req.headers_mut().insert("cookie", c.parse().unwrap());
    }
    let (r, body) = send(&env.client, req).await;
    (r, String::from_utf8_lossy(&body).into_owned())
}

fn assert_page(r: &Response<()>, body: &str) {
    assert_eq!(
        header(r, "content-security-policy"),
        "default-src 'none'; style-src 'unsafe-inline'"
    );
    assert_eq!(header(r, "x-content-type-options"), "nosniff");
    assert_eq!(header(r, "cache-control"), "no-store");
    assert!(header(r, "content-type").starts_with("text/html"));
    assert!(body.contains("<h1>"), "{body}");
}

/// No code, state, verifier, token or client secret in what a user sees.
fn assert_no_secrets(env: &TestEnv, text: &str, path_query: &str) {
    assert!(!text.contains(SECRET), "client secret leaked: {text}");
    for k in ["code", "state"] {
        if let Some(v) = param(path_query, k) {
            assert!(!text.contains(&v), "{k} leaked: {text}");
        }
    }
    if env.store_path().exists() {
        let rec = env.stored("rt");
        for k in ["refresh_token", "access_token"] {
            if let Some(t) = rec[k].as_str() {
                assert!(!text.contains(t), "{k} leaked: {text}");
            }
        }
    }
}

/// A complete admin login; returns the callback path+query used.
async fn admin_login(env: &TestEnv, query: &str) -> String {
    let s = start_login(env, query).await;
    let cb = authorize(env, &s.idp_url).await;
    let (r, body) = callback(env, &cb, Some(&s.cookie)).await;
    assert_eq!(r.status(), 200, "{body}");
    assert_page(&r, &body);
    assert!(body.contains("Logged in as dev-user"), "{body}");
    assert_no_secrets(env, &body, &cb);
    cb
}

#[tokio::test]
async fn admin_login_installs_a_family_and_rotation_continues() {
    let env = started(options(None, Duration::from_secs(60)), SECRET).await;
    let (r, _) = env.get("/rt/before").await;
    assert_eq!(r.status(), 503, "no token before the login");
    admin_login(&env, "").await;
    let s = env
        .wait_credential("rt", "usable after login", |s| s["state"] != "dead")
        .await;
    let family = s["family"].as_str().unwrap().to_owned();
    let (r, body) = env.get("/rt/after").await;
    assert_eq!(r.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["token_ok"], true);
    // 2 s tokens: the engine refreshes within the family by itself.
    wait_for("a rotation", Duration::from_secs(8), || async {
        let s = env.credential("rt").await;
        (s["generation"].as_u64() >= Some(1)).then_some(())
    })
    .await;
    assert_eq!(env.credential("rt").await["family"], family.as_str());
    let (r, _) = env.get("/rt/later").await;
    assert_eq!(r.status(), 200);
    assert_eq!(env.idp.reuse_count(), 0);
    assert_eq!(env.idp.grant_count("authorization_code"), 1);
}

#[tokio::test]
async fn admin_login_state_problems_are_named() {
    let env = started(options(None, Duration::from_secs(60)), SECRET).await;
    // Missing and unknown.
    let (r, body) = callback(&env, "/callback?code=c-Xy", None).await;
    assert_eq!(r.status(), 400);
    assert_page(&r, &body);
    assert!(body.contains("has no `state`"), "{body}");
    let (_, body) = callback(&env, "/callback?code=c-Xy&state=bogus-St", None).await;
    assert!(body.contains("state` is unknown"), "{body}");
    assert!(
        !body.contains("bogus-St") && !body.contains("c-Xy"),
        "{body}"
    );

    // Another browser (no cookie, then a foreign one): refused, not spent.
    let s = start_login(&env, "").await;
    let cb = authorize(&env, &s.idp_url).await;
    let (_, body) = callback(&env, &cb, None).await;
    assert!(body.contains("different browser"), "{body}");
    let (_, body) = callback(&env, &cb, Some("tokenproxy_login=someone-else")).await;
    assert!(body.contains("different browser"), "{body}");
    assert_no_secrets(&env, &body, &cb);
    let (r, body) = callback(&env, &cb, Some(&s.cookie)).await;
    assert_eq!(r.status(), 200, "{body}");

    // Reused: the same callback again.
    let (r, body) = callback(&env, &cb, Some(&s.cookie)).await;
    assert_eq!(r.status(), 400);
    assert!(body.contains("already used"), "{body}");
    assert_no_secrets(&env, &body, &cb);

    // Expired.
    let s = start_login(&env, "?force=1").await;
    let cb = authorize(&env, &s.idp_url).await;
    env.app()
        .live
        .logins
        .states
        .age(&s.state, Duration::from_secs(601));
    let (_, body) = callback(&env, &cb, Some(&s.cookie)).await;
    assert!(body.contains("login expired"), "{body}");
    assert_eq!(env.idp.grant_count("authorization_code"), 1);
}

#[tokio::test]
async fn idp_error_on_the_callback_is_shown_escaped() {
    let env = started(options(None, Duration::from_secs(60)), SECRET).await;
    let s = start_login(&env, "").await;
    let q = format!(
        "/callback?error=access_denied&error_description=%3Cb%3Ex%3C%2Fb%3E&state={}",
        s.state
    );
    let (r, body) = callback(&env, &q, Some(&s.cookie)).await;
    assert_eq!(r.status(), 400);
    assert_page(&r, &body);
    assert!(body.contains("access_denied"), "{body}");
    assert!(body.contains("&lt;b&gt;x&lt;/b&gt;"), "{body}");
    assert!(!body.contains("<b>x</b>"), "{body}");
    assert!(body.contains("declined"), "{body}");
    assert!(!body.contains(&s.state));
    // The state is spent by the refusal.
    let (_, body) = callback(
        &env,
        &format!("/callback?code=x&state={}", s.state),
        Some(&s.cookie),
    )
    .await;
    assert!(body.contains("already used"), "{body}");
}

/// Starts a login, gets a code for a tampered authorization request, and
/// delivers it; returns the page.
async fn tampered(env: &TestEnv, name: &str, value: &str) -> (Response<()>, String, String) {
    let s = start_login(env, "").await;
    let url = with_param(&s.idp_url, name, value);
    let (r, _) = send(&env.client, get(&url)).await;
    assert_eq!(r.status(), 302);
    let loc = location(&r);
    let cb = format!("/callback?{}", loc.split_once('?').unwrap().1);
    let (r, body) = callback(env, &cb, Some(&s.cookie)).await;
    (r, body, cb)
}

#[tokio::test]
async fn exchange_invalid_grant_causes_are_named() {
    let env = started(options(None, Duration::from_secs(60)), SECRET).await;

    // The code was issued for another redirect_uri.
    let (r, body, cb) = tampered(&env, "redirect_uri", OTHER_REDIRECT).await;
    assert_eq!(r.status(), 502);
    assert_page(&r, &body);
    assert!(body.contains("invalid_grant"), "{body}");
    assert!(body.contains("redirect_uri mismatch"), "{body}");
    assert!(
        body.contains(&format!(
            "Sent: redirect_uri {REDIRECT} (configured: {REDIRECT})"
        )),
        "{body}"
    );
    assert!(body.contains("code_verifier was sent"), "{body}");
    assert!(body.contains("s old"), "{body}");
    assert_no_secrets(&env, &body, &cb);

    // The code was bound to another PKCE challenge.
    let other = tokenproxy::login::Pkce::new();
    let (_, body, cb) = tampered(&env, "code_challenge", &other.challenge).await;
    assert!(body.contains("PKCE mismatch"), "{body}");
    assert!(!body.contains(other.verifier.expose()));
    assert_no_secrets(&env, &body, &cb);

    // A code presented twice: the first login's code with a new state.
    let first = admin_login(&env, "").await;
    let code = param(&first, "code").unwrap();
    let s = start_login(&env, "?force=1").await;
    let q = format!("/callback?code={code}&state={}", s.state);
    let (_, body) = callback(&env, &q, Some(&s.cookie)).await;
    assert!(body.contains("code reused"), "{body}");
    assert!(!body.contains(&code), "{body}");
    assert_eq!(env.idp.reuse_count(), 0);
}

#[tokio::test]
async fn expired_code_is_named() {
    let env = started(options(None, Duration::from_millis(300)), SECRET).await;
    let s = start_login(&env, "").await;
    let cb = authorize(&env, &s.idp_url).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (_, body) = callback(&env, &cb, Some(&s.cookie)).await;
    assert!(body.contains("code expired"), "{body}");
    assert_no_secrets(&env, &body, &cb);
}

#[tokio::test]
async fn no_refresh_token_fails_loudly_with_a_hint() {
    let env = started(options(None, Duration::from_secs(60)), SECRET).await;
    env.idp.push_fault(Fault::Body {
        status: 200,
        body: r#"{"access_token":"at-no-rt-Kq2","token_type":"Bearer","expires_in":60}"#.into(),
        content_type: "application/json",
    });
    let s = start_login(&env, "").await;
    let cb = authorize(&env, &s.idp_url).await;
    let (r, body) = callback(&env, &cb, Some(&s.cookie)).await;
    assert_eq!(r.status(), 400);
    assert!(body.contains("returned no refresh_token"), "{body}");
    assert!(body.contains("offline"), "{body}");
    assert!(!body.contains("at-no-rt-Kq2"), "{body}");
    assert!(!env.store_path().exists() || env.stored("rt").is_null());
}

#[tokio::test]
async fn error_description_with_html_is_escaped() {
    let env = started(options(None, Duration::from_secs(60)), SECRET).await;
    env.idp.push_fault(Fault::Body {
        status: 400,
        body: r#"{"error":"invalid_grant","error_description":"<script>alert(1)</script> bad"}"#
            .into(),
        content_type: "application/json",
    });
    let s = start_login(&env, "").await;
    let cb = authorize(&env, &s.idp_url).await;
    let (_, body) = callback(&env, &cb, Some(&s.cookie)).await;
    assert!(
        body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{body}"
    );
    assert!(!body.contains("<script>"), "{body}");
}

#[tokio::test]
async fn wrong_client_secret_names_the_auth_method() {
    let env = started(options(None, Duration::from_secs(60)), "not-the-secret").await;
    let s = start_login(&env, "").await;
    let cb = authorize(&env, &s.idp_url).await;
    let (_, body) = callback(&env, &cb, Some(&s.cookie)).await;
    assert!(body.contains("invalid_client"), "{body}");
    assert!(body.contains("wrong client secret"), "{body}");
    assert!(
        body.contains("auth_method = &quot;client_secret_basic&quot;"),
        "{body}"
    );
    assert!(
        body.contains("try auth_method = &quot;client_secret_post&quot;"),
        "{body}"
    );
    assert!(!body.contains("not-the-secret"));
}

#[tokio::test]
async fn wrong_auth_method_suggests_the_other_one() {
    let env = started(
        options(Some("client_secret_post"), Duration::from_secs(60)),
        SECRET,
    )
    .await;
    let s = start_login(&env, "").await;
    let cb = authorize(&env, &s.idp_url).await;
    let (_, body) = callback(&env, &cb, Some(&s.cookie)).await;
    assert!(
        body.contains("must authenticate with client_secret_post"),
        "{body}"
    );
    assert!(
        body.contains("try auth_method = &quot;client_secret_post&quot;"),
        "{body}"
    );
}

#[tokio::test]
async fn replacing_a_working_family_needs_force() {
    let env = started(options(None, Duration::from_secs(60)), SECRET).await;
    admin_login(&env, "").await;
    let family = env.stored("rt")["family"].as_str().unwrap().to_owned();
    let (r, body) = env.admin_raw("/login/rt").await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(r.status(), 409, "{body}");
    assert!(body.contains("still has a working token family"), "{body}");
    assert!(body.contains("force"), "{body}");
    admin_login(&env, "?force=1").await;
    assert_ne!(env.stored("rt")["family"].as_str().unwrap(), family);
    let (r, _) = env.get("/rt/x").await;
    assert_eq!(r.status(), 200);
    assert_eq!(env.idp.reuse_count(), 0);
}

// ---------------------------------------------------------------------------
// The binary: loopback listener, and through a running proxy's admin API.
// ---------------------------------------------------------------------------

use crate::harness::free_port;

struct Child {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    out: Vec<String>,
}

impl Child {
    fn spawn(env: &TestEnv, args: &[&str]) -> Child {
        Self::spawn_with(env, args, Stdio::null())
    }

    fn spawn_with(env: &TestEnv, args: &[&str], stdin: Stdio) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tokenproxy"));
        cmd.arg("login")
            .arg("-c")
            .arg(env.config_path())
            .args(args)
            .env_remove("TOKENPROXY_CONFIG")
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &env.vars {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn tokenproxy login");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(l);
            }
        });
        Child {
            child,
            lines,
            out: vec![],
        }
    }

    /// The first printed line that is a URL.
    fn url(&mut self) -> String {
        loop {
            let l = self
                .lines
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("no URL printed; got {:?}", self.out));
            self.out.push(l.clone());
            if l.trim().starts_with("http") {
                return l.trim().to_owned();
            }
        }
    }

    /// As [`Child::finish`], killing the child if it has not exited within
    /// `limit` (its exit code is then -1).
    fn finish_within(mut self, limit: Duration) -> (i32, String, String) {
        let start = std::time::Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            if start.elapsed() > limit {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.finish()
    }

    fn finish(mut self) -> (i32, String, String) {
        let status = self.child.wait().unwrap();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.out.push(l);
        }
        let mut err = String::new();
        use std::io::Read;
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (status.code().unwrap_or(-1), self.out.join("\n"), err)
    }
}

async fn get_raw(env: &TestEnv, url: &str) -> (Response<()>, Bytes) {
    send(&env.client, get(url)).await
}

#[tokio::test]
async fn cli_login_through_the_loopback_listener() {
    let port = free_port();
    let redirect = format!("http://127.0.0.1:{port}/callback");
    let mut opts = options(None, Duration::from_secs(60));
    opts.clients[0].redirect_uris = vec![redirect.clone()];
    let mut env = TestEnv::new(opts).await;
    env.var("LOGIN_SECRET", SECRET);
    env.configure(&snippet(&redirect));

    let mut child = Child::spawn(&env, &["rt"]);
    let url = child.url();
    assert!(url.starts_with(&env.idp.authorize_url()), "{url}");
    assert_eq!(
        param(&url, "redirect_uri").as_deref(),
        Some(redirect.as_str())
    );
    let (r, _) = get_raw(&env, &url).await;
    assert_eq!(r.status(), 302);
    let cb = location(&r);
    assert!(cb.starts_with(&redirect), "{cb}");
    let (r, body) = get_raw(&env, &cb).await;
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(r.status(), 200, "{body}");
    assert_page(&r, &body);
    let (code, out, err) = tokio::task::spawn_blocking(move || child.finish())
        .await
        .unwrap();
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("Logged in as dev-user"), "{out}");
    let family = env.stored("rt")["family"].as_str().unwrap().to_owned();
    assert!(out.contains(&family), "{out}");
    let all = format!("{out}\n{err}\n{body}");
    assert!(!all.contains(&param(&cb, "code").unwrap()), "code leaked");
    assert_no_secrets(&env, &all, "");

    // The proxy picks the family up and keeps rotating it.
    env.start().await;
    let (r, _) = env.get("/rt/x").await;
    assert_eq!(r.status(), 200);
    wait_for("a rotation", Duration::from_secs(8), || async {
        let s = env.credential("rt").await;
        (s["generation"].as_u64() >= Some(1)).then_some(())
    })
    .await;
    let (r, _) = env.get("/rt/y").await;
    assert_eq!(r.status(), 200);
    assert_eq!(env.idp.reuse_count(), 0);

    // An explicit --admin that does not answer is an error, not a fallback.
    let child = Child::spawn(&env, &["rt", "--admin", "127.0.0.1:9"]);
    let (code, _, err) = tokio::task::spawn_blocking(move || child.finish())
        .await
        .unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("does not answer"), "{err}");
}

#[tokio::test]
async fn cli_login_with_a_pasted_redirect_url() {
    let mut env = TestEnv::new(options(None, Duration::from_secs(60))).await;
    env.var("LOGIN_SECRET", SECRET);
    env.configure(&snippet(REDIRECT));
    let mut child = Child::spawn_with(&env, &["rt", "--no-listen"], Stdio::piped());
    let url = child.url();
    assert_eq!(param(&url, "redirect_uri").as_deref(), Some(REDIRECT));
    let (r, _) = get_raw(&env, &url).await;
    let landed = location(&r);
    assert!(landed.starts_with(REDIRECT), "{landed}");
    {
        use std::io::Write;
        let mut stdin = child.child.stdin.take().unwrap();
        writeln!(stdin, "{landed}").unwrap();
    }
    let (code, out, err) = tokio::task::spawn_blocking(move || child.finish())
        .await
        .unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("Paste that whole URL"), "{out}");
    assert!(out.contains("Logged in as dev-user"), "{out}");
    assert!(!format!("{out}{err}").contains(&param(&landed, "code").unwrap()));
    assert_no_secrets(&env, &format!("{out}{err}"), "");
    assert_eq!(env.idp.grant_count("authorization_code"), 1);
}

#[tokio::test]
async fn cli_login_refuses_to_replace_without_force() {
    let port = free_port();
    let redirect = format!("http://127.0.0.1:{port}/callback");
    let mut opts = options(None, Duration::from_secs(60));
    opts.clients[0].redirect_uris = vec![redirect.clone()];
    let mut env = TestEnv::new(opts).await;
    let seed = env.idp.issue_refresh_token("login-client", "bob");
    env.var("LOGIN_SECRET", SECRET).var("SEED", &seed);
    let text = snippet(&redirect).replace("scopes = [", "refresh_token = \"${SEED}\"\nscopes = [");
    env.configure(&text);
    // Let the engine adopt the seed into the store, then stop.
    env.start().await;
    let (r, _) = env.get("/rt/x").await;
    assert_eq!(r.status(), 200);
    env.stop().await;

    let child = Child::spawn(&env, &["rt"]);
    let (code, out, err) = tokio::task::spawn_blocking(move || child.finish())
        .await
        .unwrap();
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("still has a working token family"), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert!(!out.contains("http"), "no URL before the refusal: {out}");
    assert!(!format!("{out}{err}").contains(&seed));
}

// Multi-threaded: the in-process admin API must answer while this thread
// blocks reading the child's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_login_goes_through_a_running_proxy() {
    let admin_port = free_port();
    let mut env = TestEnv::new(options(None, Duration::from_secs(60))).await;
    env.var("LOGIN_SECRET", SECRET);
    let text = env
        .render(&snippet(REDIRECT))
        .replace(ADMIN_LISTEN, &format!("127.0.0.1:{admin_port}"));
    std::fs::write(env.config_path(), &text).unwrap();
    let vars = env.vars.clone();
    let cfg = tokenproxy::config::parse(&text, &env.config_path(), &|k| vars.get(k).cloned())
        .expect("config");
    env.config = Some(cfg);
    env.start().await;

    let mut child = Child::spawn(&env, &["rt"]);
    let url = child.url();
    assert_eq!(url, format!("http://127.0.0.1:{admin_port}/login/rt"));
    // The browser: admin 302 → IdP 302 → admin callback, with the cookie.
    let (r, _) = get_raw(&env, &url).await;
    assert_eq!(r.status(), 302);
    let cookie = header(&r, "set-cookie")
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let cb = authorize(&env, &location(&r)).await;
    let (r, body) = callback(&env, &cb, Some(&cookie)).await;
    assert_eq!(r.status(), 200, "{body}");
    let (code, out, err) = tokio::task::spawn_blocking(move || child.finish())
        .await
        .unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    let family = env.stored("rt")["family"].as_str().unwrap().to_owned();
    assert!(out.contains(&family), "{out}");
    let (r, _) = env.get("/rt/x").await;
    assert_eq!(r.status(), 200);
    assert_eq!(env.idp.reuse_count(), 0);
}

/// Off loopback the admin API answers `/credentials/<name>` only with
/// `admin.token`: `login` must send it, or it never sees the new family and
/// waits out its 10 minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_login_through_an_admin_listener_off_loopback_sends_the_admin_token() {
    let Some(ip) = non_loopback_ip() else {
        skip_unless_ci(
            "cli_login_through_an_admin_listener_off_loopback_sends_the_admin_token",
            "no non-loopback address to bind",
        );
        return;
    };
    const ADMIN_TOKEN: &str = "login-admin-tok-Zr40";
    let admin_port = free_port_on(ip);
    let mut env = TestEnv::new(options(None, Duration::from_secs(60))).await;
    env.var("LOGIN_SECRET", SECRET);
    let text = env
        .render(&snippet(REDIRECT))
        .replace(ADMIN_LISTEN, &format!("{ip}:{admin_port}"))
        .replacen(
            "[admin]\n",
            &format!("[admin]\ntoken = \"{ADMIN_TOKEN}\"\n"),
            1,
        );
    std::fs::write(env.config_path(), &text).unwrap();
    let vars = env.vars.clone();
    let cfg = tokenproxy::config::parse(&text, &env.config_path(), &|k| vars.get(k).cloned())
        .expect("config");
    env.config = Some(cfg);
    env.start().await;

    let mut child = Child::spawn(&env, &["rt"]);
    let url = child.url();
    assert_eq!(url, format!("http://{ip}:{admin_port}/login/rt"));
    // The browser, off loopback too, sends the admin token as well.
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let mut req = get(&url);
    req.headers_mut()
        .insert("authorization", bearer.parse().unwrap());
    let (r, _) = send(&env.client, req).await;
    assert_eq!(r.status(), 302);
    let cookie = header(&r, "set-cookie")
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let cb = authorize(&env, &location(&r)).await;
    let mut req = get(&env.admin_url(&cb));
    req.headers_mut().insert("cookie", cookie.parse().unwrap());
    req.headers_mut()
        .insert("authorization", bearer.parse().unwrap());
    let (r, body) = send(&env.client, req).await;
    assert_eq!(r.status(), 200, "{}", String::from_utf8_lossy(&body));
    let (code, out, err) =
        tokio::task::spawn_blocking(move || child.finish_within(Duration::from_secs(30)))
            .await
            .unwrap();
    assert_eq!(code, 0, "login did not see the new family:\n{out}\n{err}");
    let family = env.stored("rt")["family"].as_str().unwrap().to_owned();
    assert!(out.contains(&family), "{out}");
    assert!(!out.contains(ADMIN_TOKEN) && !err.contains(ADMIN_TOKEN));
}

#[tokio::test]
async fn a_failed_install_names_no_store_path_on_the_page() {
    let env = started(options(None, Duration::from_secs(60)), SECRET).await;
    let s = start_login(&env, "").await;
    let cb = authorize(&env, &s.idp_url).await;
    // The store cannot be written: a directory where the file goes.
    let store = env.store_path();
    let _ = std::fs::remove_file(&store);
    std::fs::create_dir(&store).unwrap();
    let (r, body) = callback(&env, &cb, Some(&s.cookie)).await;
    assert_eq!(r.status(), 500, "{body}");
    assert!(!body.contains("tokens.json"), "{body}");
    assert!(
        !body.contains(&env.dir.path().display().to_string()),
        "{body}"
    );
    assert!(body.contains("log"), "{body}");
}

// ---------------------------------------------------------------------------
// Providers' own words: a refused authorization or code exchange shows the
// vendor's code, text and error_uri (scrubbed, capped) beside our hint.
// ---------------------------------------------------------------------------

/// `snippet` for a credential of `provider` (its profile's hints), still
/// pointed at the dev IdP (explicit keys win).
fn provider_snippet(redirect: &str, provider: &str) -> String {
    snippet(redirect).replace("scopes = [", &format!("{provider}\nscopes = ["))
}

/// One provider whose code exchange is refused: what its answer says and
/// what our hint must add.
struct Refused {
    dialect: tokenproxy::dev::Dialect,
    provider: &'static str,
    /// The vendor's own code, text and error_uri, as shown.
    vendor: &'static [&'static str],
    /// Our hint, in that provider's terms.
    hint: &'static [&'static str],
}

const REFUSED: &[Refused] = &[
    Refused {
        dialect: tokenproxy::dev::Dialect::Github,
        provider: "provider = \"github\"",
        vendor: &[
            "bad_verification_code",
            "The code passed is incorrect or expired.",
            "/apps/managing-oauth-apps/troubleshooting-oauth-app-access-token-request-errors/#bad-verification-code",
        ],
        hint: &["GitHub App", "rejected the authorization code"],
    },
    Refused {
        dialect: tokenproxy::dev::Dialect::Slack,
        provider: "provider = \"slack\"",
        vendor: &["invalid_code"],
        hint: &["Slack", "rejected the authorization code"],
    },
    Refused {
        dialect: tokenproxy::dev::Dialect::Hubspot,
        provider: "provider = \"hubspot\"",
        vendor: &["BAD_AUTH_CODE", "missing or unknown auth code"],
        hint: &["HubSpot", "rejected the authorization code"],
    },
    Refused {
        dialect: tokenproxy::dev::Dialect::Microsoft,
        provider: "provider = \"microsoft\"\ntenant = \"common\"",
        vendor: &[
            "AADSTS70008",
            "The provided authorization code or refresh token has expired due to inactivity.",
            "https://login.microsoftonline.com/error?code=70008",
        ],
        hint: &["Microsoft", "authorization code expired"],
    },
];

#[tokio::test]
async fn a_refused_code_exchange_shows_the_providers_words_and_our_hint() {
    for case in REFUSED {
        let mut opts = options(None, Duration::from_millis(300));
        opts.dialect = case.dialect;
        let mut env = TestEnv::new(opts).await;
        env.var("LOGIN_SECRET", SECRET);
        env.start_with(&provider_snippet(REDIRECT, case.provider))
            .await;
        let s = start_login(&env, "").await;
        let cb = authorize(&env, &s.idp_url).await;
        // The code expires at the IdP: each vendor refuses it its own way.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let (r, body) = callback(&env, &cb, Some(&s.cookie)).await;
        assert_eq!(r.status(), 502, "{:?}: {body}", case.dialect);
        assert_page(&r, &body);
        let text = body.replace("&#39;", "'").replace("&quot;", "\"");
        for v in case.vendor.iter().chain(case.hint) {
            assert!(text.contains(v), "{:?}: no {v:?} in {body}", case.dialect);
        }
        // A code exchange is not a refresh: no refresh-token advice.
        assert!(
            !text.contains("refresh token expired")
                && !text.contains("check the credential's configuration"),
            "{:?}: {body}",
            case.dialect
        );
        assert_no_secrets(&env, &body, &cb);
        // One exchange, refused; nothing stored.
        let exchanges = env
            .idp
            .grants()
            .into_iter()
            .filter(|g| g.grant_type == "authorization_code")
            .count();
        assert_eq!(exchanges, 1, "{:?}", case.dialect);
        assert_eq!(env.idp.grant_count("authorization_code"), 0);
        assert!(!env.store_path().exists() || env.stored("rt").is_null());
    }
}

/// An IdP that echoes what it was sent: the code and the client secret
/// never reach the page, and a long text is capped.
#[tokio::test]
async fn a_refused_code_exchange_scrubs_and_caps_the_providers_text() {
    let mut opts = options(None, Duration::from_secs(60));
    opts.dialect = tokenproxy::dev::Dialect::Hubspot;
    let mut env = TestEnv::new(opts).await;
    env.var("LOGIN_SECRET", SECRET);
    env.start_with(&provider_snippet(REDIRECT, "provider = \"hubspot\""))
        .await;
    let s = start_login(&env, "").await;
    let cb = authorize(&env, &s.idp_url).await;
    let code = param(&cb, "code").unwrap();
    let message = format!(
        "auth code {code} presented with client_secret={SECRET} is unknown; {}",
        "details ".repeat(600)
    );
    env.idp.push_fault(Fault::Body {
        status: 400,
        body: serde_json::json!({"status": "BAD_AUTH_CODE", "message": message}).to_string(),
        content_type: "application/json",
    });
    let (r, body) = callback(&env, &cb, Some(&s.cookie)).await;
    assert_eq!(r.status(), 502, "{body}");
    assert!(body.contains("BAD_AUTH_CODE"), "{body}");
    assert!(body.contains("is unknown"), "{body}");
    assert!(body.contains("rejected the authorization code"), "{body}");
    assert!(!body.contains(&code), "code leaked: {body}");
    assert!(!body.contains(SECRET), "client secret leaked: {body}");
    assert!(
        body.matches("details").count() < 100,
        "the provider's text is not capped: {} bytes",
        body.len()
    );
    assert_no_secrets(&env, &body, &cb);
}

/// `tokenproxy login` (loopback listener) prints the provider's words and
/// our hint when the exchange is refused, and exits 1.
#[tokio::test]
async fn cli_login_prints_a_refused_exchange_in_the_providers_words() {
    let port = free_port();
    let redirect = format!("http://127.0.0.1:{port}/callback");
    let mut opts = options(None, Duration::from_millis(300));
    opts.dialect = tokenproxy::dev::Dialect::Microsoft;
    opts.clients[0].redirect_uris = vec![redirect.clone()];
    let mut env = TestEnv::new(opts).await;
    env.var("LOGIN_SECRET", SECRET);
    env.configure(&provider_snippet(
        &redirect,
        "provider = \"microsoft\"\ntenant = \"common\"",
    ));
    let mut child = Child::spawn(&env, &["rt"]);
    let url = child.url();
    let (r, _) = get_raw(&env, &url).await;
    assert_eq!(r.status(), 302);
    let cb = location(&r);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (r, page) = get_raw(&env, &cb).await;
    assert_eq!(r.status(), 502, "{}", String::from_utf8_lossy(&page));
    let (code, out, err) = tokio::task::spawn_blocking(move || child.finish())
        .await
        .unwrap();
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    for v in [
        "AADSTS70008",
        "has expired due to inactivity",
        "https://login.microsoftonline.com/error?code=70008",
        "Microsoft",
        "authorization code expired",
    ] {
        assert!(err.contains(v), "no {v:?} in {err}");
    }
    let all = format!("{out}\n{err}");
    assert!(!all.contains(&param(&cb, "code").unwrap()), "code leaked");
    // stdout printed the authorization URL (state included) on purpose.
    assert!(!err.contains(&param(&cb, "state").unwrap()), "state leaked");
    assert_no_secrets(&env, &all, "");
}

/// The user declines at the IdP: `tokenproxy login` prints the provider's
/// error, description and error_uri, and our hint.
#[tokio::test]
async fn cli_login_prints_a_refused_authorization_in_the_providers_words() {
    let port = free_port();
    let redirect = format!("http://127.0.0.1:{port}/callback");
    let mut opts = options(None, Duration::from_secs(60));
    opts.dialect = tokenproxy::dev::Dialect::Github;
    opts.clients[0].redirect_uris = vec![redirect.clone()];
    let mut env = TestEnv::new(opts).await;
    env.var("LOGIN_SECRET", SECRET);
    env.configure(&provider_snippet(&redirect, "provider = \"github\""));
    let mut child = Child::spawn(&env, &["rt"]);
    let url = child.url();
    let (r, _) = get_raw(&env, &format!("{url}&deny=1")).await;
    assert_eq!(r.status(), 302);
    let cb = location(&r);
    assert!(cb.contains("error=access_denied"), "{cb}");
    let (r, page) = get_raw(&env, &cb).await;
    assert_eq!(r.status(), 400, "{}", String::from_utf8_lossy(&page));
    let (code, out, err) = tokio::task::spawn_blocking(move || child.finish())
        .await
        .unwrap();
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    for v in [
        "access_denied",
        "The user has denied your application access.",
        "https://docs.github.com/apps/managing-oauth-apps/troubleshooting-authorization-request-errors/#access-denied",
        "declined",
    ] {
        assert!(err.contains(v), "no {v:?} in {err}");
    }
    let page = String::from_utf8_lossy(&page).into_owned();
    let state = param(&cb, "state").unwrap();
    assert!(
        !err.contains(&state) && !page.contains(&state),
        "state leaked"
    );
    let all = format!("{out}\n{err}\n{page}");
    assert_no_secrets(&env, &all, "");
    assert_eq!(env.idp.grant_count("authorization_code"), 0);
}
