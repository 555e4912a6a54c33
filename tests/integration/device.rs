//! Device login (RFC 8628) against the dev IdP, over real sockets: the
//! `login --device` binary on its own and through a running proxy's admin
//! API, `POST /credentials/<name>/device`, the status page, `slow_down`,
//! denial and expiry, and the dev IdP's own strictness. The timing rules
//! themselves run on a paused clock in `src/device.rs`.
//!
//! No device code, token or secret may show up in any output.

use crate::harness::*;
use bytes::Bytes;
use http_body_util::Full;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokenproxy::dev::{DevClient, DevIdp, IdpOptions};

const CLIENT: &str = "device-client";
const SECRET: &str = "device-secret-Qm38xZ";
const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

fn options(interval_s: u64) -> IdpOptions {
    IdpOptions {
        access_ttl: Duration::from_secs(2),
        device_interval: Duration::from_secs(interval_s),
        clients: vec![DevClient::confidential(CLIENT, SECRET)],
        ..IdpOptions::default()
    }
}

fn snippet(extra: &str) -> String {
    format!(
        r#"
[credentials.rt]
grant = "refresh_token"
token_url = "@TOKEN_URL@"
device_authorization_url = "@IDP@/device"
client_id = "{CLIENT}"
client_secret = "${{DEVICE_SECRET}}"
scopes = ["openid", "offline_access"]
{extra}

[[routes]]
path_prefix = "/rt/"
upstream = "@ECHO@"
credential = "rt"
"#
    )
}

async fn env_with(opts: IdpOptions) -> TestEnv {
    let mut env = TestEnv::new(opts).await;
    env.var("DEVICE_SECRET", SECRET);
    env
}

/// `tokenproxy login --device -c CONFIG ARGS...`, stdout read line by line.
struct Login {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    out: Vec<String>,
}

impl Login {
    fn spawn(env: &TestEnv, config: &std::path::Path, args: &[&str]) -> Login {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tokenproxy"));
        cmd.arg("login")
            .arg("--device")
            .arg("-c")
            .arg(config)
            .args(args)
            .env_remove("TOKENPROXY_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &env.vars {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn tokenproxy login --device");
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
        Login {
            child,
            lines,
            out: vec![],
        }
    }

    /// Reads stdout up to the `Code: ` line and returns the user code.
    fn user_code(&mut self) -> String {
        loop {
            let l = self
                .lines
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("no user code printed; got {:?}", self.out));
            self.out.push(l.clone());
            if let Some(code) = l.strip_prefix("Code: ") {
                return code.trim().to_owned();
            }
        }
    }

    /// Reads stdout up to a line containing `what`; returns all read so far.
    fn until(&mut self, what: &str) -> String {
        while !self.out.iter().any(|l| l.contains(what)) {
            let l = self
                .lines
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("{what:?} not printed; got {:?}", self.out));
            self.out.push(l);
        }
        self.out.join("\n")
    }

    /// Waits for the exit (killing it after `limit`): code, stdout, stderr.
    fn finish(mut self, limit: Duration) -> (i32, String, String) {
        let start = std::time::Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            if start.elapsed() > limit {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
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

async fn finish(login: Login, limit: Duration) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || login.finish(limit))
        .await
        .unwrap()
}

/// Every secret this test came across: the client secret, every device
/// code the IdP issued, and the tokens in the store.
fn secrets(env: &TestEnv) -> Vec<String> {
    let mut s = vec![SECRET.to_owned()];
    s.extend(env.idp.device_codes());
    if env.store_path().exists() {
        let rec = env.stored("rt");
        for k in ["refresh_token", "access_token"] {
            if let Some(t) = rec[k].as_str() {
                s.push(t.to_owned());
            }
        }
    }
    s
}

/// The device-code polls the IdP saw: (when, outcome).
fn polls(idp: &DevIdp) -> Vec<(std::time::SystemTime, String)> {
    idp.grants()
        .into_iter()
        .filter(|g| g.grant_type == DEVICE_GRANT)
        .map(|g| (g.at, g.outcome))
        .collect()
}

// Multi-threaded: the in-process IdP answers while this thread blocks
// reading the child's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_device_login_without_a_proxy_installs_a_family() {
    let mut env = env_with(options(1)).await;
    env.configure(&snippet(""));
    let mut login = Login::spawn(&env, &env.config_path(), &["rt"]);
    let code = login.user_code();
    let printed = login.until("Waiting for approval");
    let verify = format!("{}/device/verify", env.idp.url());
    assert!(printed.contains(&format!("  {verify}")), "{printed}");
    assert!(
        printed.contains(&format!("{verify}?user_code={code}")),
        "verification_uri_complete: {printed}"
    );
    // Let it poll while pending, then approve as a person would.
    wait_for("a pending poll", Duration::from_secs(5), || async {
        polls(&env.idp)
            .iter()
            .any(|(_, o)| o == "authorization_pending")
            .then_some(())
    })
    .await;
    assert!(env.idp.approve_device(&code, "phone-user"));
    let (status, out, err) = finish(login, Duration::from_secs(20)).await;
    assert_eq!(status, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("Logged in as phone-user"), "{out}");
    let family = env.stored("rt")["family"].as_str().unwrap().to_owned();
    assert!(out.contains(&family), "{out}");
    assert!(err.contains("phone-user"), "the subject is logged: {err}");
    // The IdP enforces its interval: any early poll would be a slow_down.
    let p = polls(&env.idp);
    assert!(p.iter().all(|(_, o)| o != "slow_down"), "{p:?}");
    assert_eq!(env.idp.grant_count(DEVICE_GRANT), 1);
    assert!(env
        .idp
        .grants()
        .iter()
        .filter(|g| g.grant_type == DEVICE_GRANT)
        .all(|g| g.client_auth == "client_secret_basic"));
    assert_no_secrets(&[out.clone(), err.clone()], &secrets(&env));

    // The proxy serves from the new family and keeps rotating it.
    env.start().await;
    let (r, _) = env.get("/rt/x").await;
    assert_eq!(r.status(), 200);
    wait_for("a rotation", Duration::from_secs(8), || async {
        let s = env.credential("rt").await;
        (s["generation"].as_u64() >= Some(1)).then_some(())
    })
    .await;
    assert_eq!(env.idp.reuse_count(), 0);
}

/// A `tokenproxy run` child on fixed ports for `env`'s config, its store
/// `env.store_path()`.
async fn run_child(env: &TestEnv, extra: &str) -> ChildProxy {
    let ports = (free_port(), free_port());
    let text = env
        .render(&snippet(extra))
        .replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{}\"", ports.0),
        )
        .replace(ADMIN_LISTEN, &format!("127.0.0.1:{}", ports.1))
        .replace("format = \"pretty\"", "format = \"json\"");
    // The child gets no environment of ours: the values go inline.
    let text = env
        .vars
        .iter()
        .fold(text, |t, (k, v)| t.replace(&format!("${{{k}}}"), v));
    std::fs::write(env.config_path(), &text).unwrap();
    ChildProxy::start(env.dir.path(), "run", &env.config_path(), ports).await
}

/// The admin API's view of credential `rt`.
async fn rt_status(c: &HttpClient, admin: std::net::SocketAddr) -> serde_json::Value {
    get_ok(c, &format!("http://{admin}/credentials/rt"))
        .await
        .json()
}

async fn wait_rt(c: &HttpClient, admin: std::net::SocketAddr, state: &str) {
    wait_for(&format!("rt {state}"), Duration::from_secs(5), || async {
        (rt_status(c, admin).await["state"] == state).then_some(())
    })
    .await
}

/// Through a running proxy: a credential killed by a revoked family is
/// revived by `login --device` (which goes through the admin API), the
/// admin endpoint answers the pending login, the status page shows its user
/// code and link, and the proxy serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_login_through_a_running_proxy_revives_a_dead_credential() {
    let mut env = env_with(options(1)).await;
    let seed = env.idp.issue_refresh_token(CLIENT, "old-user");
    env.var("SEED", &seed);
    let proxy = run_child(&env, "refresh_token = \"${SEED}\"").await;
    let c = &env.client;
    let got = get_ok(c, &proxy.url("/rt/before")).await;
    assert_eq!(got.status, 200, "{}", got.text());

    // The family dies: revoked at the IdP, then a refresh meets invalid_grant.
    env.idp.revoke_family_of(&seed);
    let r = post_admin(c, proxy.admin, "/credentials/rt/refresh").await;
    assert_eq!(r.status, 409, "{}", r.text());
    wait_rt(c, proxy.admin, "dead").await;

    let mut login = Login::spawn(&env, &env.config_path(), &["rt"]);
    let code = login.user_code();
    let printed = login.out.join("\n");
    assert!(printed.contains("tokenproxy is running"), "{printed}");

    // The same auth rules as the other mutating endpoints.
    let admin_url = format!("http://{}", proxy.admin);
    let plain = http::Request::post(format!("{admin_url}/credentials/rt/device"))
        .body(Full::<Bytes>::default())
        .unwrap();
    let (r, _) = send(c, plain).await;
    assert_eq!(r.status(), 403);
    // A second POST answers the pending login rather than starting another.
    let started = post_admin(c, proxy.admin, "/credentials/rt/device").await;
    assert_eq!(started.status, 200, "{}", started.text());
    let j = started.json();
    assert_eq!(j["user_code"], code.as_str());
    let complete = j["verification_uri_complete"].as_str().unwrap().to_owned();
    assert_eq!(
        j["verification_uri"],
        format!("{}/device/verify", env.idp.url())
    );
    assert!(j["expires_in"].as_u64().unwrap() > 500, "{j}");
    assert!(j.get("device_code").is_none(), "{j}");
    let unknown = post_admin(c, proxy.admin, "/credentials/nope/device").await;
    assert_eq!(unknown.status, 404);

    // The status page and the JSON show the pending login.
    let page = get_ok(c, &format!("{admin_url}/")).await;
    let page_text = page.text();
    assert!(page_text.contains(&code), "{page_text}");
    assert!(
        page_text.contains(&complete.replace('&', "&amp;")),
        "{page_text}"
    );
    let status = rt_status(c, proxy.admin).await;
    assert_eq!(status["device_login"]["state"], "pending", "{status}");
    assert_eq!(status["device_login"]["user_code"], code.as_str());

    // The person opens the link on a phone (the dev IdP's page approves).
    let approved = get_ok(c, &complete).await;
    assert_eq!(approved.status, 200, "{}", approved.text());

    let (exit, out, err) = finish(login, Duration::from_secs(30)).await;
    assert_eq!(exit, 0, "stdout: {out}\nstderr: {err}");
    wait_rt(c, proxy.admin, "fresh").await;
    let got = get_ok(c, &proxy.url("/rt/after")).await;
    assert_eq!(got.status, 200, "{}", got.text());
    let family = env.stored("rt")["family"].as_str().unwrap().to_owned();
    assert!(out.contains(&family), "{out}");
    let after = get_ok(c, &format!("{admin_url}/")).await.text();
    assert!(!after.contains(&code), "the login is no longer pending");
    let status = rt_status(c, proxy.admin).await;
    assert!(status.get("device_login").is_none(), "{status}");
    let installed = proxy
        .log_events()
        .into_iter()
        .find(|e| e["event"] == "login_installed")
        .expect("a login_installed event");
    assert_eq!(installed["subject"], "dev-user");
    assert_eq!(env.idp.reuse_count(), 0);

    let metrics = get_ok(c, &format!("{admin_url}/metrics")).await.text();
    let mut all = secrets(&env);
    all.push(seed);
    assert_no_secrets(
        &[
            out,
            err,
            started.text(),
            page_text,
            after,
            status.to_string(),
            metrics,
            proxy.output(),
        ],
        &all,
    );
}

// Multi-threaded: the in-process IdP answers while this thread blocks
// reading the child's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_down_adds_five_seconds_to_the_interval() {
    let mut env = env_with(options(1)).await;
    env.configure(&snippet(""));
    let mut login = Login::spawn(&env, &env.config_path(), &["rt"]);
    let code = login.user_code();
    env.idp.slow_down_device(&code);
    wait_for("a slow_down answer", Duration::from_secs(5), || async {
        polls(&env.idp)
            .iter()
            .any(|(_, o)| o == "slow_down")
            .then_some(())
    })
    .await;
    assert!(env.idp.approve_device(&code, "phone-user"));
    let (status, out, err) = finish(login, Duration::from_secs(30)).await;
    assert_eq!(status, 0, "stdout: {out}\nstderr: {err}");
    let p = polls(&env.idp);
    let slow: Vec<usize> = (0..p.len()).filter(|i| p[*i].1 == "slow_down").collect();
    // Exactly the one asked for: the IdP now enforces 6 s, so a poll after
    // 1 s would have earned a second.
    assert_eq!(slow.len(), 1, "{p:?}");
    let gap = p[slow[0] + 1].0.duration_since(p[slow[0]].0).unwrap();
    assert!(gap >= Duration::from_millis(5_980), "{gap:?} {p:?}");
    assert_eq!(p.last().unwrap().1, "ok", "{p:?}");
    assert_no_secrets(&[out, err], &secrets(&env));
}

// Multi-threaded: the in-process IdP answers while this thread blocks
// reading the child's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_and_expired_device_logins_are_named() {
    let mut env = env_with(options(1)).await;
    env.configure(&snippet(""));

    let mut login = Login::spawn(&env, &env.config_path(), &["rt"]);
    let code = login.user_code();
    assert!(env.idp.deny_device(&code));
    let (status, out, err) = finish(login, Duration::from_secs(20)).await;
    assert_eq!(status, 1, "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains("refused the authorization: access_denied"),
        "{err}"
    );
    assert!(err.contains("declined"), "the fix: {err}");
    let mut outputs = vec![out, err];

    let mut login = Login::spawn(&env, &env.config_path(), &["rt"]);
    let code = login.user_code();
    env.idp.expire_device(&code);
    let (status, out, err) = finish(login, Duration::from_secs(20)).await;
    assert_eq!(status, 1, "stdout: {out}\nstderr: {err}");
    assert!(err.contains("device login expired"), "{err}");
    assert!(err.contains("login --device"), "the fix: {err}");
    outputs.extend([out, err]);

    assert!(!env.store_path().exists() || env.stored("rt").is_null());
    let p = polls(&env.idp);
    assert!(p.iter().any(|(_, o)| o == "access_denied"), "{p:?}");
    assert!(p.iter().any(|(_, o)| o == "expired_token"), "{p:?}");
    assert_no_secrets(&outputs, &secrets(&env));
}

async fn post_form(env: &TestEnv, path: &str, form: &[(&str, &str)]) -> Got {
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let basic = tokenproxy::token::grant::basic_auth(CLIENT, SECRET);
    let req = http::Request::post(format!("{}{path}", env.idp.url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("authorization", basic)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let (r, body) = send(&env.client, req).await;
    Got {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        body,
    }
}

/// The judge of the tests above: pending, slow_down when polled early,
/// access_denied, expired_token, and a redeemed device code refused.
#[tokio::test]
async fn dev_idp_device_grant_is_strict() {
    let env = env_with(options(1)).await;
    let env = &env;
    let start = || post_form(env, "/device", &[("scope", "offline_access")]);
    let poll = |dc: String| async move {
        post_form(
            env,
            "/token",
            &[("grant_type", DEVICE_GRANT), ("device_code", &dc)],
        )
        .await
        .json()
    };
    let a = start().await;
    assert_eq!(a.status, 200, "{}", a.text());
    let a = a.json();
    let dc = a["device_code"].as_str().unwrap().to_owned();
    let uc = a["user_code"].as_str().unwrap().to_owned();
    assert_eq!(a["interval"], 1);
    assert_eq!(poll(dc.clone()).await["error"], "authorization_pending");
    assert_eq!(
        poll(dc.clone()).await["error"],
        "slow_down",
        "polled at once"
    );
    env.idp.expire_device(&uc);
    assert_eq!(poll(dc.clone()).await["error"], "expired_token");

    let b = start().await.json();
    let dc = b["device_code"].as_str().unwrap().to_owned();
    assert!(env.idp.deny_device(b["user_code"].as_str().unwrap()));
    assert_eq!(poll(dc).await["error"], "access_denied");

    let c = start().await.json();
    let dc = c["device_code"].as_str().unwrap().to_owned();
    assert!(env
        .idp
        .approve_device(c["user_code"].as_str().unwrap(), "u"));
    let ok = poll(dc.clone()).await;
    assert!(ok["refresh_token"].is_string(), "{ok}");
    let again = poll(dc).await;
    assert_eq!(again["error"], "invalid_grant", "{again}");
    assert_eq!(again["error_description"], "device code already used");
    assert_eq!(poll("dc_unknown".into()).await["error"], "invalid_grant");
    // Client authentication is required at the device endpoint too.
    let req = http::Request::post(env.idp.device_url())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from("client_id=device-client")))
        .unwrap();
    let (r, _) = send(&env.client, req).await;
    assert_eq!(r.status(), 401);
}

/// With `issuer` only, discovery names the device endpoint; a
/// `client_credentials` credential and a credential without any device
/// endpoint are refused with the fix.
#[tokio::test]
async fn the_admin_endpoint_finds_the_device_endpoint_by_discovery() {
    let mut env = env_with(options(5)).await;
    env.start_with(&format!(
        r#"
[credentials.rt]
grant = "refresh_token"
issuer = "@IDP@"
client_id = "{CLIENT}"
client_secret = "${{DEVICE_SECRET}}"
scopes = ["offline_access"]

[credentials.nodevice]
grant = "refresh_token"
token_url = "@TOKEN_URL@"
client_id = "{CLIENT}-2"
client_secret = "x"

[credentials.m2m]
grant = "client_credentials"
token_url = "@TOKEN_URL@"
client_id = "{CLIENT}"
client_secret = "${{DEVICE_SECRET}}"

[[routes]]
path_prefix = "/rt/"
upstream = "@ECHO@"
credential = "rt"

[[routes]]
path_prefix = "/m2m/"
upstream = "@ECHO@"
credential = "m2m"
"#
    ))
    .await;
    let admin = env.app().admin_addr.unwrap();
    let r = post_admin(&env.client, admin, "/credentials/rt/device").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["verification_uri"],
        format!("{}/device/verify", env.idp.url())
    );
    assert_eq!(r.json()["interval"], 5);
    let r = post_admin(&env.client, admin, "/credentials/nodevice/device").await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(
        r.text().contains("no device_authorization_url"),
        "{}",
        r.text()
    );
    let r = post_admin(&env.client, admin, "/credentials/m2m/device").await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(
        r.text().contains("client_credentials needs no login"),
        "{}",
        r.text()
    );
    let all = get_ok(&env.client, &format!("http://{admin}/credentials"))
        .await
        .text();
    assert_no_secrets(&[all], &secrets(&env));
}

/// What an IdP that quotes its request back makes of a device login: the
/// provider's words are shown, without the client secret or the device
/// code, and capped.
fn assert_scrubbed_echo(env: &TestEnv, shown: &str) {
    assert!(shown.contains("could not process"), "{shown}");
    assert!(!shown.contains(SECRET), "client secret leaked: {shown}");
    for dc in env.idp.device_codes() {
        assert!(!shown.contains(&dc), "device code leaked: {shown}");
    }
    assert!(
        shown.matches("details").count() < 100,
        "the provider's text is not capped: {} bytes",
        shown.len()
    );
    assert_no_secrets(&[shown.to_owned()], &secrets(env));
}

/// The provider's `error_uri` is shown as the code login shows it
/// (` (see URI)`), with the client secret it quotes scrubbed.
fn assert_echoed_error_uri(shown: &str) {
    assert!(
        shown.contains(" (see https://idp.example/errors?client_secret=[redacted]&"),
        "no scrubbed error_uri in {shown}"
    );
}

/// The device authorization request, a poll refused and a poll declined,
/// each answered by an IdP that echoes the client secret (Basic) and the
/// device code: `login --device` prints the provider's text scrubbed and
/// capped, as the code login does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_device_login_scrubs_and_caps_the_providers_text() {
    use tokenproxy::dev::Fault;
    let mut env = env_with(options(1)).await;
    env.configure(&snippet(""));

    // The device authorization request itself.
    env.idp.push_device_fault(Fault::Echo {
        status: 400,
        error: "invalid_request",
    });
    let login = Login::spawn(&env, &env.config_path(), &["rt"]);
    let (status, out, err) = finish(login, Duration::from_secs(20)).await;
    assert_eq!(status, 1, "stdout: {out}\nstderr: {err}");
    assert!(err.contains("device authorization request failed"), "{err}");
    assert_echoed_error_uri(&err);
    assert_scrubbed_echo(&env, &format!("{out}\n{err}"));

    // A poll refused (invalid_request) and a poll declined (access_denied).
    for error in ["invalid_request", "access_denied"] {
        let mut login = Login::spawn(&env, &env.config_path(), &["rt"]);
        login.user_code();
        env.idp.push_fault(Fault::Echo { status: 400, error });
        let (status, out, err) = finish(login, Duration::from_secs(20)).await;
        assert_eq!(status, 1, "{error}: stdout: {out}\nstderr: {err}");
        assert!(err.contains(error), "{err}");
        assert_echoed_error_uri(&err);
        assert_scrubbed_echo(&env, &format!("{out}\n{err}"));
    }
    let p = polls(&env.idp);
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(env.idp.device_codes().len() == 2);
}

/// Through the admin API: the failed device login in `/credentials/rt`
/// and on the status page carries the scrubbed, capped text.
#[tokio::test]
async fn a_refused_device_login_through_the_admin_api_is_scrubbed() {
    use tokenproxy::dev::Fault;
    let mut env = env_with(options(1)).await;
    env.start_with(&snippet("")).await;
    let admin = env.app().admin_addr.unwrap();
    let started = post_admin(&env.client, admin, "/credentials/rt/device").await;
    assert_eq!(started.status, 200, "{}", started.text());
    env.idp.push_fault(Fault::Echo {
        status: 400,
        error: "invalid_request",
    });
    wait_for(
        "the device login to fail",
        Duration::from_secs(10),
        || async {
            (rt_status(&env.client, admin).await["device_login"]["state"] == "failed").then_some(())
        },
    )
    .await;
    let status = rt_status(&env.client, admin).await;
    assert_scrubbed_echo(&env, &status["device_login"].to_string());
    let all = get_ok(&env.client, &format!("http://{admin}/credentials"))
        .await
        .text();
    let page = get_ok(&env.client, &format!("http://{admin}/"))
        .await
        .text();
    assert_no_secrets(&[all, page], &secrets(&env));
}
