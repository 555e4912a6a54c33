//! A whole tokenproxy (engine, proxy, admin) in-process against the dev IdP
//! and the echo upstream, configured with TOML text.

use super::*;
use std::collections::BTreeMap;
use std::path::PathBuf;
use tokenproxy::config::Config;
use tokenproxy::dev::EchoUpstream;

use tokenproxy::app::App;
use tokenproxy::dev::{DevIdp, IdpOptions};

/// A dev IdP, an echo upstream judged by it, a temp dir holding the config
/// file and the store, and (once started) the app built from that config.
///
/// Config snippets may use `@TOKEN_URL@`, `@IDP@` and `@ECHO@`; the
/// `[server]`, `[admin]` and `[store]` tables (ephemeral ports, store
/// `tokens.json` beside the config) are prepended. `${VAR}` values come from
/// [`TestEnv::vars`].
pub struct TestEnv {
    pub idp: DevIdp,
    pub echo: EchoUpstream,
    pub dir: tempfile::TempDir,
    pub vars: BTreeMap<String, String>,
    pub config: Option<Config>,
    pub app: Option<App>,
    pub client: HttpClient,
}

/// Where [`TestEnv`] binds the admin listener. `check` refuses
/// `127.0.0.1:0` for both listeners (see
/// `tokens::port_zero_for_both_listeners_is_accepted`), so the admin side
/// takes another loopback address.
pub const ADMIN_LISTEN: &str = "127.0.0.2:0";

impl TestEnv {
    pub async fn new(opts: IdpOptions) -> TestEnv {
        let local = "127.0.0.1:0".parse().unwrap();
        let idp = DevIdp::start(local, opts).await.expect("dev IdP starts");
        let echo = EchoUpstream::start(local, idp.token_check())
            .await
            .expect("echo upstream starts");
        TestEnv {
            idp,
            echo,
            dir: tempfile::tempdir().expect("tempdir"),
            vars: BTreeMap::new(),
            config: None,
            app: None,
            client: client(),
        }
    }

    pub fn var(&mut self, name: &str, value: &str) -> &mut Self {
        self.vars.insert(name.to_owned(), value.to_owned());
        self
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("tokenproxy.toml")
    }

    pub fn store_path(&self) -> PathBuf {
        self.dir.path().join("tokens.json")
    }

    /// The full config text for a snippet of credentials and routes.
    pub fn render(&self, snippet: &str) -> String {
        let body = snippet
            .replace("@TOKEN_URL@", &self.idp.token_url())
            .replace("@IDP@", &self.idp.url())
            .replace("@ECHO@", &self.echo.url());
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"{ADMIN_LISTEN}\"\n\n\
             [store]\npath = \"tokens.json\"\n\n[log]\nformat = \"pretty\"\n\n{body}"
        )
    }

    /// Writes the config file and parses it (panicking on config errors).
    pub fn configure(&mut self, snippet: &str) -> &Config {
        let text = self.render(snippet);
        std::fs::write(self.config_path(), &text).expect("write config");
        let vars = self.vars.clone();
        let cfg = tokenproxy::config::parse(&text, &self.config_path(), &|k| vars.get(k).cloned())
            .unwrap_or_else(|e| panic!("config rejected:\n{e}\n---\n{text}"));
        self.config = Some(cfg);
        self.config.as_ref().unwrap()
    }

    /// Starts (or restarts after [`TestEnv::stop`]) the app on the config.
    pub async fn start(&mut self) {
        assert!(self.app.is_none(), "app already running");
        let cfg = self.config.as_ref().expect("configure() first");
        self.app = Some(App::start(cfg).await.expect("app starts"));
    }

    /// `configure` then `start`.
    pub async fn start_with(&mut self, snippet: &str) {
        self.configure(snippet);
        self.start().await;
    }

    pub async fn stop(&mut self) {
        if let Some(app) = self.app.take() {
            app.shutdown().await;
        }
        // A fresh client: pooled connections point at the old listener.
        self.client = client();
    }

    pub fn app(&self) -> &App {
        self.app.as_ref().expect("app running")
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.app().proxy_addr.expect("tcp listener")
        )
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.app().admin_addr.expect("tcp admin"))
    }

    pub async fn get(&self, path: &str) -> (Response<()>, Bytes) {
        send(&self.client, get(&self.url(path))).await
    }

    /// Admin `GET path`: status and raw body.
    pub async fn admin_raw(&self, path: &str) -> (Response<()>, Bytes) {
        send(&self.client, get(&self.admin_url(path))).await
    }

    /// Admin `/credentials/<name>` as JSON (the first entry when several
    /// tokens share the name).
    pub async fn credential(&self, name: &str) -> serde_json::Value {
        let (resp, body) = self.admin_raw(&format!("/credentials/{name}")).await;
        assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
        match json(&body) {
            serde_json::Value::Array(mut a) => a.remove(0),
            v => v,
        }
    }

    /// Polls admin status until `pred` holds (deadline 5 s).
    pub async fn wait_credential(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_for(what, Duration::from_secs(5), || async {
            let s = self.credential(name).await;
            pred(&s).then_some(s)
        })
        .await
    }

    /// A credential's record in the store (null when it has none).
    pub fn stored(&self, name: &str) -> serde_json::Value {
        super::stored_record(&self.store_path(), name)
    }

    /// Replaces a credential's record in the store, as an operator would.
    pub fn replace_stored(&self, name: &str, rec: serde_json::Value) {
        super::replace_record(&self.store_path(), name, rec)
    }

    /// How many times the IdP was presented this refresh token.
    pub fn presented(&self, refresh_token: &str) -> usize {
        self.idp
            .grants()
            .iter()
            .filter(|g| g.refresh_token.as_deref() == Some(refresh_token))
            .count()
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Some(app) = &self.app {
            app.shutdown_token().cancel();
        }
    }
}

/// The bearer token the echo upstream received.
pub fn echoed_bearer(report: &serde_json::Value) -> String {
    let auth = echoed(report, "authorization");
    auth.first()
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_else(|| panic!("no bearer token echoed: {report}"))
        .to_owned()
}
