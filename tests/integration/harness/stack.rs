//! Helpers for the token-engine scenarios: a dev IdP + echo upstream + temp
//! store, configs written as TOML text, the proxy in-process or as a real
//! `tokenproxy run` child (killed on drop, output captured to files), admin
//! status, store reads and writes, and fault-scenario repetition.

use super::*;
use http_body_util::{BodyExt, Full};
use parking_lot::Mutex;
use std::collections::BTreeSet;
use std::fs::File;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenproxy::app::App;
use tokenproxy::config::Config;
use tokenproxy::dev::{DevIdp, EchoUpstream, IdpOptions};

pub const CLIENT_ID: &str = "demo-client";
pub const CLIENT_SECRET: &str = "demo-secret-8f3a1c";
pub const CRED: &str = "user";

/// The IdP, the upstream, a temp dir with the store, and every secret seen.
pub struct Stack {
    pub idp: DevIdp,
    pub echo: EchoUpstream,
    pub dir: tempfile::TempDir,
    pub seed: String,
    /// Every token and secret the test came across (for log checks).
    pub secrets: Mutex<BTreeSet<String>>,
    /// Appended to the config after the `/api/` route.
    pub extra_routes: String,
}

pub struct StackOpts {
    pub access_ttl: Duration,
    pub idp_reuse_grace: Duration,
    /// Upstream accepts any token (to see what a dead credential injects).
    pub permissive_echo: bool,
    /// The IdP's wire shapes (a provider's, for profile tests).
    pub dialect: tokenproxy::dev::Dialect,
    /// GitHub: a rotation kills the previous access token at once, and the
    /// upstream's 401 does not say `invalid_token`.
    pub github_rotation: bool,
    /// Salesforce: no `expires_in`.
    pub omit_expires_in: bool,
    /// More `[[routes]]` tables for the config.
    pub extra_routes: String,
    /// The refresh token's own lifetime at the IdP (sent with each grant).
    pub refresh_ttl: Option<Duration>,
    /// That lifetime runs from the family's first token (Spotify, LinkedIn).
    pub refresh_absolute: bool,
    /// false: refreshes return no new refresh token (Google, Dropbox).
    pub rotate_refresh_tokens: bool,
    /// The one client authentication method the IdP accepts (LinkedIn:
    /// `client_secret_post`); `None`: any.
    pub client_auth_method: Option<&'static str>,
}

impl Default for StackOpts {
    fn default() -> Self {
        StackOpts {
            access_ttl: Duration::from_secs(2),
            idp_reuse_grace: Duration::ZERO,
            permissive_echo: false,
            dialect: tokenproxy::dev::Dialect::Rfc,
            github_rotation: false,
            omit_expires_in: false,
            extra_routes: String::new(),
            refresh_ttl: None,
            refresh_absolute: false,
            rotate_refresh_tokens: true,
            client_auth_method: None,
        }
    }
}

impl Stack {
    pub async fn start(o: StackOpts) -> Stack {
        let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let idp = DevIdp::start(
            local,
            IdpOptions {
                access_ttl: o.access_ttl,
                reuse_grace: o.idp_reuse_grace,
                dialect: o.dialect,
                kill_previous_access: o.github_rotation,
                refresh_ttl: o.refresh_ttl,
                refresh_absolute: o.refresh_absolute,
                rotate_refresh_tokens: o.rotate_refresh_tokens,
                omit_expires_in: o.omit_expires_in,
                clients: vec![tokenproxy::dev::DevClient {
                    auth_method: o.client_auth_method.map(str::to_owned),
                    ..tokenproxy::dev::DevClient::confidential(CLIENT_ID, CLIENT_SECRET)
                }],
                ..IdpOptions::default()
            },
        )
        .await
        .expect("idp starts");
        let check: tokenproxy::dev::TokenCheck = if o.permissive_echo {
            Arc::new(|_: &str| true)
        } else {
            idp.token_check()
        };
        let echo = EchoUpstream::start(local, check)
            .await
            .expect("echo starts");
        echo.set_bare_401(o.github_rotation);
        let seed = idp.issue_refresh_token(CLIENT_ID, "alice");
        let secrets = Mutex::new(BTreeSet::from([seed.clone(), CLIENT_SECRET.to_owned()]));
        Stack {
            idp,
            echo,
            dir: tempfile::tempdir().unwrap(),
            seed,
            secrets,
            extra_routes: o.extra_routes,
        }
    }

    pub fn store_path(&self) -> PathBuf {
        self.dir.path().join("tokens.json")
    }

    /// Config text: proxy and admin on the given ports (0 in-process),
    /// JSON logs, the store in the temp dir, one credential `user` with
    /// `extra` appended to its table, one route `/api/` to the echo.
    pub fn toml(&self, proxy_port: u16, admin_port: u16, extra: &str) -> String {
        format!(
            r#"[server]
listen = "127.0.0.1:{proxy_port}"

[admin]
listen = "127.0.0.1:{admin_port}"

[store]
path = "{store}"

[log]
format = "json"
level = "info"

[credentials.{CRED}]
grant = "refresh_token"
token_url = "{token_url}"
client_id = "{CLIENT_ID}"
client_secret = "{CLIENT_SECRET}"
refresh_token = "{seed}"
refresh_wait = "2s"
{extra}

[[routes]]
path_prefix = "/api/"
upstream = "{echo}/"
credential = "{CRED}"
{extra_routes}
"#,
            extra_routes = self.extra_routes,
            store = self.store_path().display(),
            token_url = self.idp.token_url(),
            seed = self.seed,
            echo = self.echo.url(),
        )
    }

    pub fn config(&self, extra: &str) -> Config {
        // Validation refuses two equal listen addresses, so parse with a
        // placeholder admin port and bind the admin on port 0 too.
        let text = self.toml(0, free_port(), extra);
        let mut cfg =
            tokenproxy::config::parse(&text, &self.dir.path().join("proxy.toml"), &|_| None)
                .unwrap_or_else(|e| panic!("config rejected: {e}"));
        cfg.admin.listen = tokenproxy::config::ListenAddr::Tcp("127.0.0.1:0".parse().unwrap());
        cfg
    }

    pub async fn app(&self, extra: &str) -> App {
        App::start(&self.config(extra)).await.expect("app starts")
    }

    /// The store's record for the credential (raw JSON), noting its secrets.
    pub fn record(&self) -> Option<serde_json::Value> {
        let rec = super::stored_record(&self.store_path(), CRED);
        if rec.is_null() {
            return None;
        }
        let mut s = self.secrets.lock();
        for k in ["refresh_token", "access_token"] {
            if let Some(t) = rec[k].as_str() {
                s.insert(t.to_owned());
            }
        }
        Some(rec)
    }

    pub fn generation(&self) -> Option<u64> {
        self.record()?["generation"].as_u64()
    }

    pub fn current_refresh_token(&self) -> String {
        self.record().expect("a record")["refresh_token"]
            .as_str()
            .expect("a refresh token")
            .to_owned()
    }

    /// Waits until the store holds at least this generation.
    pub async fn wait_generation(&self, at_least: u64, within: Duration) -> u64 {
        wait_for(
            &format!("store generation >= {at_least}"),
            within,
            || async { self.generation().filter(|g| *g >= at_least) },
        )
        .await
    }

    /// Replaces the credential's record with `rec`, atomically (temp+rename),
    /// as an operator or a login flow would.
    pub fn write_record(&self, rec: serde_json::Value) {
        super::replace_record(&self.store_path(), CRED, rec)
    }

    /// The credential's record file (`<store>.d/<name>.json`).
    pub fn record_path(&self) -> PathBuf {
        super::record_file(&self.store_path(), CRED)
    }

    /// Refresh tokens presented at the IdP, oldest first.
    pub fn presented(&self) -> Vec<String> {
        let v: Vec<String> = self
            .idp
            .grants()
            .into_iter()
            .filter(|g| g.grant_type == "refresh_token")
            .filter_map(|g| g.refresh_token)
            .collect();
        self.secrets.lock().extend(v.iter().cloned());
        v
    }

    pub fn refresh_grants(&self) -> usize {
        self.idp
            .grants()
            .iter()
            .filter(|g| g.grant_type == "refresh_token")
            .count()
    }

    /// The oracle: no refresh token was presented after it was spent.
    pub fn assert_no_reuse(&self) {
        let presented = self.presented();
        assert_eq!(
            self.idp.reuse_count(),
            0,
            "a rotated refresh token was presented again; presentations: {}",
            presented.len()
        );
    }

    pub fn secrets(&self) -> Vec<String> {
        self.presented();
        self.record();
        self.secrets.lock().iter().cloned().collect()
    }
}

/// `GET /credentials/<CRED>` on the admin listener.
pub async fn credential_status(c: &HttpClient, admin: SocketAddr) -> Option<serde_json::Value> {
    let got = try_get(c, &format!("http://{admin}/credentials"))
        .await
        .ok()?;
    let all = got.json();
    all.as_array()?
        .iter()
        .find(|s| s["credential"] == CRED)
        .cloned()
}

/// Waits until the admin status shows `state`.
pub async fn wait_state(
    c: &HttpClient,
    admin: SocketAddr,
    state: &str,
    within: Duration,
) -> serde_json::Value {
    wait_for(&format!("state {state}"), within, || async {
        credential_status(c, admin)
            .await
            .filter(|s| s["state"] == state)
    })
    .await
}

/// A `tokenproxy run` child; SIGKILLed on drop. Its stdout and stderr go to
/// files in the stack's dir, so they survive a kill and a restart.
pub struct ChildProxy {
    pub child: std::process::Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl ChildProxy {
    /// Writes `toml` to `config_path` (if given text) and starts the binary,
    /// waiting until the admin port answers.
    pub async fn start(dir: &Path, label: &str, config_path: &Path, ports: (u16, u16)) -> Self {
        let stdout = dir.join(format!("{label}.stdout"));
        let stderr = dir.join(format!("{label}.stderr"));
        let child = Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
            .arg("run")
            .arg("-c")
            .arg(config_path)
            .env_remove("TOKENPROXY_LOG")
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn tokenproxy");
        let mut me = ChildProxy {
            child,
            proxy: SocketAddr::from(([127, 0, 0, 1], ports.0)),
            admin: SocketAddr::from(([127, 0, 0, 1], ports.1)),
            stdout,
            stderr,
        };
        let c = client();
        let admin = me.admin;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if try_get(&c, &format!("http://{admin}/healthz"))
                .await
                .is_ok()
            {
                break;
            }
            if let Ok(Some(st)) = me.child.try_wait() {
                panic!("tokenproxy exited ({st}): {}", me.output());
            }
            assert!(Instant::now() < deadline, "tokenproxy did not come up");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        me
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// stdout + stderr so far.
    pub fn output(&self) -> String {
        let mut s = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        s.push_str(&std::fs::read_to_string(&self.stderr).unwrap_or_default());
        s
    }

    /// The JSON log lines on stderr.
    pub fn log_events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.stderr)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for ChildProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a config file for a child and picks free ports.
pub fn child_config(stack: &Stack, name: &str, extra: &str) -> (PathBuf, (u16, u16)) {
    let ports = (free_port(), free_port());
    let path = stack.dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, stack.toml(ports.0, ports.1, extra)).unwrap();
    (path, ports)
}

/// Asserts that no secret substring appears in any captured output.
pub fn assert_no_secrets(outputs: &[String], secrets: &[String]) {
    for s in secrets {
        if s.len() < 8 {
            continue;
        }
        for (i, out) in outputs.iter().enumerate() {
            assert!(
                !out.contains(s.as_str()),
                "output #{i} contains a secret (len {}, starts {:?})",
                s.len(),
                &s[..4]
            );
        }
    }
}

/// A finished run of the binary: a `store` command, or a `run` that had to
/// stop by itself.
#[derive(Debug)]
pub struct CliRun {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    /// stdout + stderr.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

fn tokenproxy_command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tokenproxy"));
    c.env_remove("TOKENPROXY_CONFIG")
        .env_remove("TOKENPROXY_LOG")
        .stdin(Stdio::null());
    c
}

/// Runs `tokenproxy ARGS...` to completion.
pub fn run_cli<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> CliRun {
    let out = tokenproxy_command()
        .args(args)
        .output()
        .expect("run tokenproxy");
    CliRun {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `tokenproxy run -c CONFIG` that must exit by itself (a start-up failure)
/// within `within`; killed and failed otherwise.
pub async fn run_until_exit(dir: &Path, label: &str, config: &Path, within: Duration) -> CliRun {
    let (stdout, stderr) = (
        dir.join(format!("{label}.stdout")),
        dir.join(format!("{label}.stderr")),
    );
    let mut child = tokenproxy_command()
        .arg("run")
        .arg("-c")
        .arg(config)
        .stdout(File::create(&stdout).unwrap())
        .stderr(File::create(&stderr).unwrap())
        .spawn()
        .expect("spawn tokenproxy");
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "tokenproxy run did not exit within {within:?}: {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    CliRun {
        code: status.code(),
        stdout: std::fs::read_to_string(&stdout).unwrap_or_default(),
        stderr: std::fs::read_to_string(&stderr).unwrap_or_default(),
    }
}

/// Config text with `encryption_key` (and previous keys) in its `[store]`.
pub fn with_store_keys(text: &str, current: &str, previous: &[&str]) -> String {
    let previous: Vec<String> = previous.iter().map(|p| format!("\"{p}\"")).collect();
    let keys = format!(
        "[store]\nencryption_key = \"{current}\"\nprevious_encryption_keys = [{}]\n",
        previous.join(", ")
    );
    assert!(text.contains("[store]\n"), "a [store] table to add keys to");
    text.replacen("[store]\n", &keys, 1)
}

/// The key id `key` has in `sealed` (text holding a sealed value): for a
/// passphrase it depends on the salt recorded there.
pub fn key_id(key: &str, sealed: &str) -> String {
    tokenproxy::token::seal::key_id_in(&tokenproxy::secret::Secret::new(key), sealed)
        .unwrap_or_else(|| panic!("no tpv3 value in {sealed}"))
}

/// The token the echo upstream received (`Bearer ` stripped).
pub fn bearer(g: &Got) -> String {
    g.json()["headers"]["authorization"][0]
        .as_str()
        .unwrap_or_default()
        .trim_start_matches("Bearer ")
        .to_owned()
}

/// POST to the admin API as the CLI would (with the admin header).
pub async fn post_admin(c: &HttpClient, admin: SocketAddr, path: &str) -> Got {
    let req = http::Request::post(format!("http://{admin}{path}"))
        .header(tokenproxy::admin::ADMIN_HEADER, "1")
        .body(Full::default())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(15), c.request(req))
        .await
        .expect("admin answers in time")
        .expect("admin answers");
    let (parts, body) = resp.into_parts();
    Got {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// `tokenproxy store rekey -c config` succeeds and reseals `credential`
/// under key id `kid`.
pub fn rekey_ok(config: &Path, credential: &str, kid: &str) -> CliRun {
    let rekey = run_cli(&[
        "store".as_ref(),
        "rekey".as_ref(),
        "-c".as_ref(),
        config.as_os_str(),
    ]);
    assert_eq!(rekey.code, Some(0), "{}", rekey.text());
    assert!(
        rekey
            .stdout
            .contains(&format!("{credential}: resealed under key id {kid}")),
        "{}",
        rekey.text()
    );
    rekey
}

/// How many times each fault scenario runs: 1 in CI (the short form),
/// more on demand (`TOKENPROXY_FAULT_TRIALS=25 cargo test --test
/// integration grant_safety fleet_a_partitioned -- --nocapture`).
pub fn fault_trials() -> usize {
    std::env::var("TOKENPROXY_FAULT_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1)
}

/// Runs a fault scenario [`fault_trials`] times (each trial asserts no
/// reuse and no needless death itself) and reports the count.
pub async fn repeat<F, Fut>(scenario: &str, mut trial: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let n = fault_trials();
    for _ in 0..n {
        trial().await;
    }
    eprintln!("FAULTS: {scenario} trials={n} reuses=0 needless_deaths=0");
}
