//! `tokenproxy demo`: a self-contained playground. Starts the dev IdP
//! (strict rotation, short-lived tokens), the echo upstream and the proxy on
//! loopback, writes a real config file, and prints what to try.

use crate::app::App;
use crate::config::{self, LogFormat};
use crate::dev::{DevIdp, EchoUpstream, IdpOptions};
use std::process::ExitCode;
use std::time::Duration;

pub async fn run(listen: String, admin: String, token_ttl: Duration) -> ExitCode {
    crate::telemetry::init(LogFormat::Pretty, "info");
    match run_inner(&listen, &admin, token_ttl).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tokenproxy demo: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_inner(listen: &str, admin: &str, token_ttl: Duration) -> Result<ExitCode, String> {
    let loopback = "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?;
    let idp = DevIdp::start(
        loopback,
        IdpOptions {
            access_ttl: token_ttl,
            ..IdpOptions::default()
        },
    )
    .await
    .map_err(|e| format!("cannot start the demo IdP: {e}"))?;
    let echo = EchoUpstream::start(loopback, idp.token_check())
        .await
        .map_err(|e| format!("cannot start the echo upstream: {e}"))?;
    let dir = std::env::temp_dir().join(format!("tokenproxy-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let seed = idp.issue_refresh_token("demo-client", "demo-user");
    let config_path = dir.join("proxy.toml");
    let text = format!(
        r#"# Written by `tokenproxy demo`. The IdP and the upstream are in-process.
[server]
listen = "{listen}"

[admin]
listen = "{admin}"

[store]
path = "tokens.json"

[log]
format = "pretty"

# A user's token: refresh_token with strict rotation and reuse detection.
[credentials.demo]
grant = "refresh_token"
token_url = "{token_url}"
introspection_url = "{introspection_url}"
client_id = "demo-client"
client_secret_file = "client_secret"
refresh_token_file = "seed_refresh_token"

# A service's own token.
[credentials.machine]
grant = "client_credentials"
token_url = "{token_url}"
client_id = "demo-client"
client_secret_file = "client_secret"
auth_method = "client_secret_post"
scopes = ["read"]

[[routes]]
path_prefix = "/api/"
upstream = "{echo}/"
credential = "demo"

[[routes]]
path_prefix = "/machine/"
upstream = "{echo}/"
credential = "machine"
"#,
        token_url = idp.token_url(),
        introspection_url = idp.introspection_url(),
        echo = echo.url(),
    );
    std::fs::write(&config_path, text)
        .map_err(|e| format!("cannot write {}: {e}", config_path.display()))?;
    write_secret(&dir.join("client_secret"), "demo-secret")?;
    write_secret(&dir.join("seed_refresh_token"), &seed)?;
    let cfg = config::load(&config_path).map_err(|e| format!("demo config rejected:\n{e}"))?;
    let app = App::start(&cfg)
        .await
        .map_err(|e| format!("{}\n(is another tokenproxy running? try --listen 127.0.0.1:8081 --admin 127.0.0.1:9902)", crate::error_chain(&e)))?;
    let proxy = app
        .proxy_addr
        .map(|a| a.to_string())
        .unwrap_or_else(|| listen.to_owned());
    let admin_addr = app
        .admin_addr
        .map(|a| a.to_string())
        .unwrap_or_else(|| admin.to_owned());
    println!(
        r#"
tokenproxy demo is running.

  IdP (strict rotation, {ttl} access tokens): {idp}
  echo upstream (accepts only the IdP's live tokens): {echo}
  config: {config}
  token store: {store}

Try:
  curl -s 'http://{proxy}/api/hello?x=1'    # a user token, refreshed with rotation
  curl -s 'http://{proxy}/machine/hello'    # a client_credentials token
  curl -s '{echo}/hello'                     # straight to the upstream: 401
  curl -s 'http://{proxy}/nowhere'          # 404 no_route from the proxy
  curl -s 'http://{admin}/credentials'      # state, family, generation (never a token)
  open http://{admin}/                      # the status page
  curl -s 'http://{admin}/metrics'          # Prometheus metrics

Watch the token_refresh events below: one refresh per lifetime, each
rotating the refresh token. Ctrl-C stops everything.
"#,
        ttl = humantime::format_duration(token_ttl),
        idp = idp.url(),
        echo = echo.url(),
        config = config_path.display(),
        store = cfg.store.path.display(),
        admin = admin_addr,
    );
    while let crate::process::Signal::Reload = crate::process::wait_for_signal().await {
        // A rejected reload logs itself and keeps the running config.
        let _ = app.reload().await;
    }
    app.shutdown().await;
    let grants = idp.grants().len();
    let reuse = idp.reuse_count();
    println!("demo stopped: {grants} grant requests at the IdP, {reuse} refresh-token reuses.");
    idp.stop().await;
    echo.stop().await;
    Ok(ExitCode::SUCCESS)
}

/// Secrets go in 0600 files, as `*_file` expects them in production.
fn write_secret(path: &std::path::Path, value: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}
