//! Tests for loading and validation: every error names the right key and line.

use super::*;
use std::path::Path;

const EXAMPLE: &str = include_str!("../../proxy.example.toml");

const GH_SECRET: &str = "gh-client-secret-s3cr3t";
const GH_SEED: &str = "ghr_seed_refresh_T0KEN";
const ADMIN: &str = "admin-t0ken-xyz";
const STORE_KEY: &str = "store-key-0123456789";
const BILLING: &str = "billing-secret-qqq";

fn env(k: &str) -> Option<String> {
    match k {
        "GITHUB_CLIENT_SECRET" => Some(GH_SECRET.into()),
        "GITHUB_REFRESH_TOKEN" => Some(GH_SEED.into()),
        "ADMIN_TOKEN" => Some(ADMIN.into()),
        "TOKENPROXY_STORE_KEY" => Some(STORE_KEY.into()),
        "BILLING_CLIENT_SECRET" => Some(BILLING.into()),
        "UPSTREAM_HOST" => Some("api.example.com".into()),
        _ => None,
    }
}

fn parse_at(text: &str, source: &Path) -> Result<Config, ConfigErrors> {
    parse(text, source, &env)
}

fn ok(text: &str) -> Config {
    parse_at(text, Path::new("proxy.toml")).unwrap_or_else(|e| panic!("unexpected errors:\n{e}"))
}

fn errs(text: &str) -> Vec<ConfigError> {
    match parse_at(text, Path::new("proxy.toml")) {
        Ok(_) => panic!("expected errors"),
        Err(e) => e.0,
    }
}

/// 1-based line of the first occurrence of `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in text"));
    text[..at].matches('\n').count() + 1
}

/// The error for `key`, asserting it sits on the line where `needle` is.
fn err_at(text: &str, key: &str, needle: &str) -> ConfigError {
    let all = errs(text);
    let e = all
        .iter()
        .find(|e| e.key == key)
        .unwrap_or_else(|| panic!("no error for {key}; got:\n{}", ConfigErrors(all.clone())))
        .clone();
    assert_eq!(e.line, line_of(text, needle), "line of {key}: {e}");
    assert!(e.col >= 1, "{e}");
    e
}

const CRED: &str = r#"
[credentials.github]
grant = "refresh_token"
token_url = "https://github.com/login/oauth/access_token"
client_id = "Iv1.abc"
client_secret = "${GITHUB_CLIENT_SECRET}"
refresh_token = "${GITHUB_REFRESH_TOKEN}"
"#;

const ROUTE: &str = r#"
[[routes]]
path_prefix = "/github/"
upstream = "https://api.github.com/"
credential = "github"
"#;

fn with(extra: &str) -> String {
    format!("{CRED}{ROUTE}{extra}")
}

#[test]
fn example_file_parses() {
    let c = parse_at(EXAMPLE, Path::new("/etc/tokenproxy/proxy.toml"))
        .unwrap_or_else(|e| panic!("proxy.example.toml:\n{e}"));
    assert_eq!(c.server.listen.len(), 2);
    assert_eq!(c.server.hosts, vec!["api.internal"]);
    assert!(c.server.egress_proxy.is_none());
    assert_eq!(c.admin.token.as_ref().map(Secret::expose), Some(ADMIN));
    assert_eq!(c.store.path, Path::new("/etc/tokenproxy/tokens.json"));
    let gh = &c.credentials["github"];
    assert_eq!(
        gh.client_secret.as_ref().map(Secret::expose),
        Some(GH_SECRET)
    );
    assert_eq!(gh.refresh_token.as_ref().map(Secret::expose), Some(GH_SEED));
    assert_eq!(
        gh.extra_params,
        vec![("allow_signup".into(), "false".into())]
    );
    assert_eq!(c.credentials["billing"].grant, GrantType::ClientCredentials);
    assert_eq!(c.routes.len(), 2);
    assert_eq!(c.routes[0].format.prefix, "token ");
    assert_eq!(c.routes[1].path_prefix, "/billing/");
    assert_eq!(
        c.routes[1].scopes.as_deref(),
        Some(&["invoices.read".to_owned(), "invoices.write".to_owned()][..])
    );
}

#[test]
fn example_documents_every_key() {
    // Every key of the raw structs appears in the example, set or commented.
    let keys = [
        "listen",
        "hosts",
        "tls_cert",
        "tls_key",
        "worker_threads",
        "max_connections",
        "shutdown_grace",
        "header_read_timeout",
        "keepalive_timeout",
        "max_header_bytes",
        "max_headers",
        "egress_proxy",
        "token",
        "ready_requires_tokens",
        "kind",
        "path",
        "url",
        "encryption_key",
        "format",
        "level",
        "grant",
        "token_url",
        "authorize_url",
        "device_authorization_url",
        "redirect_uri",
        "client_id",
        "client_secret",
        "client_secret_file",
        "auth_method",
        "scopes",
        "refresh_token",
        "refresh_token_file",
        "issuer",
        "audience",
        "resource",
        "extra_params",
        "introspection_url",
        "reuse_grace",
        "ca_file",
        "client_cert",
        "client_key",
        "refresh_before",
        "refresh_wait",
        "max_backoff",
        "default_lifetime",
        "path_prefix",
        "host",
        "upstream",
        "credential",
        "strip_prefix",
        "header",
        "refresh_on",
        "replay",
        "replay_max_body",
        "connect_timeout",
        "response_timeout",
        "idle_timeout",
        "upgrades",
        "allow_plaintext",
    ];
    for k in keys {
        assert!(
            EXAMPLE.contains(&format!("{k} = ")),
            "{k} missing from proxy.example.toml"
        );
    }
}

#[test]
fn defaults() {
    let c = ok(&with(""));
    assert_eq!(
        c.server.listen,
        vec![ListenAddr::Tcp("127.0.0.1:8080".parse().unwrap())]
    );
    assert_eq!(c.server.worker_threads, 2);
    assert_eq!(c.server.max_connections, 10_000);
    assert_eq!(c.server.shutdown_grace, Duration::from_secs(20));
    assert_eq!(c.server.header_read_timeout, Duration::from_secs(10));
    assert_eq!(c.server.keepalive_timeout, Duration::from_secs(75));
    assert_eq!(c.server.max_header_bytes, 64 * 1024);
    assert_eq!(c.server.max_headers, 100);
    assert_eq!(
        c.admin.listen,
        ListenAddr::Tcp("127.0.0.1:9901".parse().unwrap())
    );
    assert!(c.admin.token.is_none());
    assert!(!c.admin.ready_requires_tokens);
    assert_eq!(c.store.kind, StoreKind::File);
    assert_eq!(c.store.path, Path::new("tokens.json"));
    assert_eq!(c.log.format, LogFormat::Json);
    assert_eq!(c.log.level, "info");
    let gh = &c.credentials["github"];
    assert_eq!(gh.auth_method, AuthMethod::ClientSecretBasic);
    assert_eq!(gh.reuse_grace, Duration::ZERO);
    assert_eq!(gh.refresh_before, None);
    assert_eq!(gh.refresh_wait, Duration::from_secs(10));
    assert_eq!(gh.max_backoff, Duration::from_secs(60));
    assert_eq!(gh.default_lifetime, Duration::from_secs(3600));
    let r = &c.routes[0];
    assert!(r.strip_prefix);
    assert_eq!(r.header, http::header::AUTHORIZATION);
    assert_eq!(r.format, TokenFormat::default());
    assert_eq!(r.refresh_on, vec![401]);
    assert!(r.replay);
    assert_eq!(r.replay_max_body, 65536);
    assert_eq!(r.connect_timeout, Duration::from_secs(5));
    assert_eq!(r.response_timeout, Duration::from_secs(60));
    assert_eq!(r.idle_timeout, Duration::from_secs(60));
    assert!(!r.upgrades);
    assert!(!r.allow_plaintext);
    assert!(r.scopes.is_none());
}

#[test]
fn durations_and_sizes_in_config() {
    let c = ok(&format!(
        "{CRED}refresh_before = \"90s\"\nreuse_grace = \"2s\"\n{ROUTE}replay_max_body = \"1MiB\"\nconnect_timeout = \"250ms\"\nidle_timeout = \"5m\"\n[[routes]]\npath_prefix = \"/b\"\nupstream = \"https://b.example/\"\ncredential = \"github\"\nreplay_max_body = 100\n"
    ));
    let gh = &c.credentials["github"];
    assert_eq!(gh.refresh_before, Some(Duration::from_secs(90)));
    assert_eq!(gh.reuse_grace, Duration::from_secs(2));
    assert_eq!(c.routes[0].replay_max_body, 1 << 20);
    assert_eq!(c.routes[0].connect_timeout, Duration::from_millis(250));
    assert_eq!(c.routes[0].idle_timeout, Duration::from_secs(300));
    assert_eq!(c.routes[1].replay_max_body, 100);

    let t = with("connect_timeout = \"5\"\nreplay_max_body = \"lots\"\n");
    let e = err_at(&t, "routes[0].connect_timeout", "connect_timeout");
    assert!(e.message.contains("no unit"), "{e}");
    err_at(&t, "routes[0].replay_max_body", "replay_max_body");
    let t = with("idle_timeout = \"0s\"\n");
    err_at(&t, "routes[0].idle_timeout", "idle_timeout");
}

#[test]
fn display_is_file_line_col_key_message() {
    let t = format!(
        "{CRED}\n[credentials.stripe]\ngrant = \"client_credentials\"\ntoken_url = \"https://connect.stripe.com/oauth/token\"\nclient_id = \"ca_1\"\nclient_secret = \"x\"\n{ROUTE}\n[[routes]]\npath_prefix = \"/stripe/\"\nupstream = \"https://api.stripe.com/\"\ncredential = \"gihub\"\n"
    );
    let e = err_at(&t, "routes[1].credential", "credential = \"gihub\"");
    assert_eq!(
        e.to_string(),
        format!(
            "proxy.toml:{}:14: routes[1].credential: unknown credential \"gihub\" (known: github, stripe)",
            line_of(&t, "\"gihub\"")
        )
    );
    let all = ConfigErrors(vec![e.clone(), e]);
    assert_eq!(all.to_string().lines().count(), 2);
    let unplaced = ConfigError {
        file: "x.toml".into(),
        line: 0,
        col: 0,
        key: String::new(),
        message: "m".into(),
    };
    assert_eq!(unplaced.to_string(), "x.toml: m");
}

#[test]
fn route_prefix_rules() {
    let c = ok(&format!(
        "{CRED}[[routes]]\npath_prefix = \"/gh\"\nupstream = \"https://api.github.com/\"\ncredential = \"github\"\n[[routes]]\npath_prefix = \"/gh/\"\nhost = \"GitHub.Localhost:8080\"\nupstream = \"https://api.github.com/\"\ncredential = \"github\"\n"
    ));
    assert_eq!(c.routes[0].path_prefix, "/gh/");
    assert_eq!(c.routes[1].host.as_deref(), Some("github.localhost"));

    // "/github" normalizes to the same prefix as "/github/": a duplicate.
    let t = with("[[routes]]\npath_prefix = \"/github\"\nupstream = \"https://x.example/\"\ncredential = \"github\"\n");
    let e = err_at(&t, "routes[1].path_prefix", "\"/github\"\n");
    assert!(e.message.contains("routes[0]"), "{e}");

    let t = with("[[routes]]\npath_prefix = \"github/\"\nupstream = \"https://x.example/\"\ncredential = \"github\"\n");
    let e = err_at(&t, "routes[1].path_prefix", "\"github/\"");
    assert!(e.message.contains("start with '/'"), "{e}");

    let t =
        format!("{CRED}[[routes]]\nupstream = \"https://x.example/\"\ncredential = \"github\"\n");
    // A missing key points at its table.
    let e = err_at(&t, "routes[0].path_prefix", "[[routes]]");
    assert!(e.message.contains("missing"), "{e}");
}

#[test]
fn url_rules() {
    for (extra, key, needle) in [
        (
            "upstream = \"ftp://x.example/\"",
            "routes[1].upstream",
            "ftp://",
        ),
        (
            "upstream = \"/just/a/path\"",
            "routes[1].upstream",
            "/just/a/path",
        ),
        (
            "upstream = \"http://api.example.com/\"",
            "routes[1].upstream",
            "http://api",
        ),
    ] {
        let t = with(&format!(
            "[[routes]]\npath_prefix = \"/x/\"\ncredential = \"github\"\n{extra}\n"
        ));
        err_at(&t, key, needle);
    }
    // Plain http upstream: fine on loopback, or with allow_plaintext.
    for extra in [
        "upstream = \"http://127.0.0.1:9000/\"",
        "upstream = \"http://[::1]:9000/\"",
        "upstream = \"http://localhost:9000/\"",
        "upstream = \"http://api.example.com/\"\nallow_plaintext = true",
    ] {
        ok(&with(&format!(
            "[[routes]]\npath_prefix = \"/x/\"\ncredential = \"github\"\n{extra}\n"
        )));
    }
    // Token endpoints: https unless loopback.
    let t = with("").replace("https://github.com/login", "http://github.com/login");
    let e = err_at(&t, "credentials.github.token_url", "token_url");
    assert!(e.message.contains("https"), "{e}");
    ok(&with("").replace(
        "https://github.com/login/oauth/access_token",
        "http://127.0.0.2:9/token",
    ));
    for key in [
        "authorize_url",
        "device_authorization_url",
        "introspection_url",
        "issuer",
    ] {
        let t = format!("{CRED}{key} = \"http://idp.example.com/x\"\n{ROUTE}");
        err_at(
            &t,
            &format!("credentials.github.{key}"),
            &format!("{key} ="),
        );
        ok(&format!(
            "{CRED}{key} = \"http://localhost:8000/x\"\n{ROUTE}"
        ));
    }
    let t = format!("[server]\negress_proxy = \"socks5://p:1080\"\n{CRED}{ROUTE}");
    err_at(&t, "server.egress_proxy", "egress_proxy");
    let c = ok(&format!(
        "[server]\negress_proxy = \"http://proxy.corp:3128\"\n{CRED}{ROUTE}"
    ));
    assert!(c.server.egress_proxy.is_some());
}

#[test]
fn token_field_hosts_default_to_the_profile_and_are_checked() {
    let sf = "[credentials.sf]\ngrant = \"client_credentials\"\nprovider = \"salesforce\"\nclient_id = \"c\"\nclient_secret = \"s\"\n";
    let route = "[[routes]]\npath_prefix = \"/sf/\"\ncredential = \"sf\"\nupstream = \"{token.instance_url}/services/data/\"\n";
    let c = ok(&format!("{sf}{route}"));
    assert_eq!(
        c.credentials["sf"].token_field_hosts.as_deref(),
        Some(&[".salesforce.com".to_owned(), ".force.com".to_owned()][..])
    );
    // No profile list, no key: any https origin, as before.
    assert_eq!(ok(&with("")).credentials["github"].token_field_hosts, None);
    // The key overrides the profile, lower-cased.
    let c = ok(&format!(
        "{sf}token_field_hosts = [\".Example.com\", \"api.exact.test\"]\n{route}"
    ));
    assert_eq!(
        c.credentials["sf"].token_field_hosts.as_deref(),
        Some(&[".example.com".to_owned(), "api.exact.test".to_owned()][..])
    );
    for (value, key, needle) in [
        (
            "[\"https://x.example.com\"]",
            "credentials.sf.token_field_hosts[0]",
            "is not a host name",
        ),
        (
            "[\".example.com\", \"*.example.com\"]",
            "credentials.sf.token_field_hosts[1]",
            "wildcard",
        ),
        (
            "[\"x.example.com:443\"]",
            "credentials.sf.token_field_hosts[0]",
            "is not a host name",
        ),
        ("[]", "credentials.sf.token_field_hosts", "is empty"),
    ] {
        let t = format!("{sf}token_field_hosts = {value}\n{route}");
        let e = err_at(&t, key, "token_field_hosts");
        assert!(e.message.contains(needle), "{value}: {e}");
        assert!(e.message.contains("\".example.com\""), "{value}: {e}");
    }
}

#[test]
fn upstreams_from_token_values() {
    let sf = r#"
[credentials.sf]
grant = "client_credentials"
provider = "salesforce"
token_url = "https://login.salesforce.com/services/oauth2/token"
client_id = "c"
client_secret = "s"
"#;
    let route = |cred: &str, upstream: &str| {
        format!("[[routes]]\npath_prefix = \"/x/\"\ncredential = \"{cred}\"\nupstream = \"{upstream}\"\n")
    };
    let c = ok(&format!(
        "{sf}{}",
        route("sf", "{token.instance_url}/services/data/")
    ));
    let r = &c.routes[0];
    assert_eq!(
        r.upstream_from,
        Some(crate::token_fields::TokenField::InstanceUrl)
    );
    assert_eq!(r.upstream.path(), "/services/data/");
    assert_eq!(r.upstream_display(), "{token.instance_url}/services/data/");
    // Without a profile, what the IdP sends is the user's call.
    ok(&with(&route("github", "{token.instance_url}")));
    for (upstream, needle) in [
        (
            "{token.api_host}/x/",
            "unknown token value {token.api_host}",
        ),
        (
            "https://{token.instance_url}/x/",
            "must be written {token.NAME} at the start",
        ),
        ("{token.instance_url}?q=1", "only a path may follow"),
        ("{token.instance_url}x.example/", "only a path may follow"),
        ("{token.instance_url", "at the start"),
    ] {
        let t = format!("{sf}{}", route("sf", upstream));
        let e = err_at(&t, "routes[0].upstream", "upstream =");
        assert!(e.message.contains(needle), "{upstream}: {e}");
    }
    // A profile that sends no such value.
    let t = format!(
        "{}{}",
        sf.replace("salesforce", "github")
            .replace("[credentials.sf]", "[credentials.gh]"),
        route("gh", "{token.instance_url}/x/")
    );
    let e = err_at(&t, "routes[0].upstream", "upstream =");
    assert!(e.message.contains("provider = \"github\""), "{e}");
    assert!(e.message.contains("only salesforce"), "{e}");
}

#[test]
fn refresh_token_lifetime_from_profile_or_config() {
    use crate::providers::RefreshLifetime;
    let c = ok(&with(""));
    assert_eq!(
        c.credentials["github"].refresh_token_lifetime,
        RefreshLifetime::Idle
    );
    let spotify = with("").replace(
        "grant = \"refresh_token\"\n",
        "grant = \"refresh_token\"\nprovider = \"spotify\"\n",
    );
    let c = ok(&spotify);
    assert_eq!(
        c.credentials["github"].refresh_token_lifetime,
        RefreshLifetime::Absolute
    );
    let c = ok(&spotify.replace(
        "provider = \"spotify\"\n",
        "provider = \"spotify\"\nrefresh_token_lifetime = \"idle\"\n",
    ));
    assert_eq!(
        c.credentials["github"].refresh_token_lifetime,
        RefreshLifetime::Idle
    );
    let t = with("").replace(
        "grant = \"refresh_token\"\n",
        "grant = \"refresh_token\"\nrefresh_token_lifetime = \"sliding\"\n",
    );
    let e = err_at(
        &t,
        "credentials.github.refresh_token_lifetime",
        "refresh_token_lifetime",
    );
    assert!(e.message.contains("\"idle\" or \"absolute\""), "{e}");
    // Slack's bearer tokens say "bot" or "user".
    let slack = with("").replace(
        "grant = \"refresh_token\"\n",
        "grant = \"refresh_token\"\nprovider = \"slack\"\n",
    );
    assert_eq!(
        ok(&slack).credentials["github"].token_types,
        ["bot", "user"]
    );
    let own = slack.replace(
        "provider = \"slack\"\n",
        "provider = \"slack\"\ntoken_types = [\"N_A\"]\n",
    );
    assert_eq!(ok(&own).credentials["github"].token_types, ["n_a"]);
}

#[test]
fn header_and_format_rules() {
    for (extra, key, needle) in [
        ("header = \"Bad Header\"", "routes[0].header", "header ="),
        ("header = \"Connection\"", "routes[0].header", "header ="),
        ("header = \"host\"", "routes[0].header", "header ="),
        (
            "header = \"Transfer-Encoding\"",
            "routes[0].header",
            "header =",
        ),
        ("format = \"Bearer\"", "routes[0].format", "format ="),
        (
            "format = \"{token} {token}\"",
            "routes[0].format",
            "format =",
        ),
        (
            "format = \"Bearer {token}\\r\\nX-Evil: 1\"",
            "routes[0].format",
            "format =",
        ),
        (
            "format = \"Bearer \\u0000{token}\"",
            "routes[0].format",
            "format =",
        ),
    ] {
        err_at(&with(&format!("{extra}\n")), key, needle);
    }
    let c = ok(&with("header = \"X-Api-Key\"\nformat = \"{token}\"\n"));
    assert_eq!(c.routes[0].header.as_str(), "x-api-key");
    assert_eq!(
        c.routes[0].format,
        TokenFormat {
            prefix: String::new(),
            suffix: String::new()
        }
    );
    let c = ok(&with("format = \"token={token};v=1\"\n"));
    assert_eq!(c.routes[0].format.suffix, ";v=1");
}

#[test]
fn listen_rules() {
    let c = ok(&format!(
        "[server]\nlisten = \"unix:/run/tp.sock\"\n[admin]\nlisten = \"[::1]:9901\"\n{CRED}{ROUTE}"
    ));
    assert_eq!(
        c.server.listen,
        vec![ListenAddr::Unix("/run/tp.sock".into())]
    );
    assert_eq!(c.admin.listen.to_string(), "[::1]:9901");

    let t = format!("[server]\nlisten = [\"127.0.0.1:8080\", \"localhost:8080\"]\n{CRED}{ROUTE}");
    let e = err_at(&t, "server.listen[1]", "listen");
    assert_eq!(e.col, line_col_of(&t, "\"localhost"));
    let t = format!("[server]\nlisten = \"8080\"\n{CRED}{ROUTE}");
    err_at(&t, "server.listen", "listen");
    let t = format!("[server]\nlisten = \"unix:relative.sock\"\n{CRED}{ROUTE}");
    err_at(&t, "server.listen", "listen");
    let t = format!("[admin]\nlisten = \"0.0.0.0\"\n{CRED}{ROUTE}");
    err_at(&t, "admin.listen", "listen");
    let t = format!("[server]\nlisten = []\n{CRED}{ROUTE}");
    err_at(&t, "server.listen", "listen");
}

/// 1-based column of `needle` on its line.
fn line_col_of(text: &str, needle: &str) -> usize {
    let at = text.find(needle).unwrap_or_else(|| panic!("{needle:?}"));
    text[..at].chars().rev().take_while(|&c| c != '\n').count() + 1
}

#[test]
fn credential_rules() {
    let t = with("").replace("grant = \"refresh_token\"", "grant = \"password\"");
    err_at(&t, "credentials.github.grant", "grant");
    let t = with("").replace("grant = \"refresh_token\"\n", "");
    let e = err_at(&t, "credentials.github.grant", "[credentials.github]");
    assert!(e.message.contains("missing"), "{e}");

    let t = format!("{CRED}auth_method = \"private_key_jwt\"\n{ROUTE}");
    let e = err_at(&t, "credentials.github.auth_method", "auth_method");
    assert!(e.message.contains("client_assertion_key"), "{e}");
    let e = err_at(&t, "credentials.github.client_secret", "client_secret");
    assert!(e.message.contains("never sends it"), "{e}");
    let t = format!("{CRED}auth_method = \"client_secret_jwt\"\n{ROUTE}");
    ok(&t);
    let t = format!("{CRED}auth_method = \"tls_client_auth\"\n{ROUTE}");
    let e = err_at(&t, "credentials.github.auth_method", "auth_method");
    assert!(e.message.contains("client_cert and client_key"), "{e}");
    let t = format!("{CRED}auth_method = \"private_key_jwt_x\"\n{ROUTE}");
    let e = err_at(&t, "credentials.github.auth_method", "auth_method");
    assert!(e.message.contains("\"self_signed_tls_client_auth\""), "{e}");

    // basic/post need a secret.
    let t = with("").replace(
        "client_secret = \"${GITHUB_CLIENT_SECRET}\"\n",
        "auth_method = \"client_secret_post\"\n",
    );
    err_at(
        &t,
        "credentials.github.client_secret",
        "[credentials.github]",
    );
    let c = ok(&with("").replace(
        "client_secret = \"${GITHUB_CLIENT_SECRET}\"\n",
        "auth_method = \"none\"\n",
    ));
    assert_eq!(c.credentials["github"].auth_method, AuthMethod::None);
    assert!(c.credentials["github"].client_secret.is_none());

    // refresh_token needs token_url or issuer.
    let t = with("").replace(
        "token_url = \"https://github.com/login/oauth/access_token\"\n",
        "",
    );
    err_at(&t, "credentials.github.token_url", "[credentials.github]");
    ok(&with("").replace(
        "token_url = \"https://github.com/login/oauth/access_token\"\n",
        "issuer = \"https://token.actions.githubusercontent.com\"\n",
    ));

    let t = with("").replace("client_id = \"Iv1.abc\"\n", "client_id = \"\"\n");
    err_at(&t, "credentials.github.client_id", "client_id");

    // Per-route scopes/resource need client_credentials.
    let t = with("scopes = [\"repo\"]\nresource = \"https://x/\"\n");
    err_at(&t, "routes[0].scopes", "scopes");
    err_at(&t, "routes[0].resource", "resource =");
    let cc = "[credentials.cc]\ngrant = \"client_credentials\"\ntoken_url = \"https://idp.example/token\"\nclient_id = \"cc\"\nclient_secret = \"s\"\n";
    let c = ok(&with(&format!(
        "[[routes]]\npath_prefix = \"/cc/\"\nupstream = \"https://cc.example/\"\ncredential = \"cc\"\nscopes = [\"a\", \"b\"]\nresource = \"https://cc.example/\"\n{cc}"
    )));
    assert_eq!(c.routes[1].resource.as_deref(), Some("https://cc.example/"));

    let t = format!("{CRED}scopes = [\"repo user\"]\n{ROUTE}");
    err_at(&t, "credentials.github.scopes[0]", "scopes");
    let t = format!("{CRED}extra_params = {{ grant_type = \"password\" }}\n{ROUTE}");
    err_at(
        &t,
        "credentials.github.extra_params.grant_type",
        "extra_params",
    );
    let t = format!("{CRED}client_cert = \"c.pem\"\n{ROUTE}");
    err_at(&t, "credentials.github.client_key", "[credentials.github]");
    let t = format!("{CRED}default_lifetime = \"0s\"\n{ROUTE}");
    err_at(
        &t,
        "credentials.github.default_lifetime",
        "default_lifetime",
    );
}

#[test]
fn shared_refresh_families_are_rejected() {
    let second = "[credentials.gh2]\ngrant = \"refresh_token\"\ntoken_url = \"https://github.com/login/oauth/access_token\"\nclient_id = \"Iv1.other\"\nclient_secret = \"x\"\nrefresh_token = \"${GITHUB_REFRESH_TOKEN}\"\n";
    let t = with(second);
    // github's seed comes first in the file (CRED).
    let e = err_at(&t, "credentials.github.refresh_token", "refresh_token = ");
    // BTreeMap order: "gh2" is seen before "github", so the error is github's.
    assert!(e.message.contains("\"gh2\""), "{e}");
    assert!(!e.to_string().contains(GH_SEED));

    let same_client = "[credentials.gh2]\ngrant = \"refresh_token\"\ntoken_url = \"https://github.com/login/oauth/access_token\"\nclient_id = \"Iv1.abc\"\nclient_secret = \"x\"\n";
    let t = with(same_client);
    let e = errs(&t)
        .into_iter()
        .find(|e| e.key.ends_with(".client_id"))
        .expect("family error");
    assert!(e.message.contains("rotation"), "{e}");
    // Same client under client_credentials is fine: nothing rotates.
    ok(&with(
        &same_client.replace("\"refresh_token\"", "\"client_credentials\""),
    ));
}

#[test]
fn previous_encryption_keys_rules() {
    let c = ok(&format!(
        "[store]\nencryption_key = \"new-key-1\"\nprevious_encryption_keys = [\"${{TOKENPROXY_STORE_KEY}}\", \"older\"]\n{CRED}{ROUTE}"
    ));
    let prev: Vec<&str> = c
        .store
        .previous_encryption_keys
        .iter()
        .map(|k| k.expose())
        .collect();
    assert_eq!(prev, [STORE_KEY, "older"]);
    assert!(c.summary().contains("previous_encryption_keys 2"));
    assert!(!c.summary().contains(STORE_KEY) && !c.summary().contains("older"));

    let t = format!(
        "[store]\nencryption_key = \"k1\"\nprevious_encryption_keys = [\n  \"k0\",\n  \"k1\",\n  \"\",\n  \"k0\",\n]\n{CRED}{ROUTE}"
    );
    let e = err_at(&t, "store.previous_encryption_keys[1]", "\"k1\",");
    assert!(
        e.message.contains("same key as store.encryption_key"),
        "{e}"
    );
    let e = err_at(&t, "store.previous_encryption_keys[2]", "\"\",");
    assert!(e.message.contains("empty"), "{e}");
    let e = err_at(&t, "store.previous_encryption_keys[3]", "\"k0\",\n]");
    assert!(
        e.message
            .contains("same key as store.previous_encryption_keys[0]"),
        "{e}"
    );
    assert!(
        errs(&t).iter().all(|e| !e.to_string().contains("k0")),
        "no key in a message"
    );

    let t = format!("[store]\nprevious_encryption_keys = [\"k0\"]\n{CRED}{ROUTE}");
    let e = err_at(
        &t,
        "store.previous_encryption_keys",
        "previous_encryption_keys",
    );
    assert!(e.message.contains("needs store.encryption_key"), "{e}");
    let t = format!("[store]\nencryption_key = \"\"\n{CRED}{ROUTE}");
    err_at(&t, "store.encryption_key", "encryption_key");
}

#[test]
fn server_admin_store_log_rules() {
    let t = format!(
        "[server]\nworker_threads = 0\nmax_connections = -1\ntls_cert = \"a.pem\"\n{CRED}{ROUTE}"
    );
    err_at(&t, "server.worker_threads", "worker_threads");
    err_at(&t, "server.max_connections", "max_connections");
    err_at(&t, "server.tls_key", "[server]");
    let t = format!(
        "[server]\nmax_header_bytes = \"1KiB\"\nmax_headers = 0\nkeepalive_timeout = \"0s\"\n{CRED}{ROUTE}"
    );
    err_at(&t, "server.max_header_bytes", "max_header_bytes");
    err_at(&t, "server.max_headers", "max_headers");
    err_at(&t, "server.keepalive_timeout", "keepalive_timeout");
    let c = ok(&format!(
        "[server]\nmax_header_bytes = \"16KiB\"\nmax_headers = 20\nkeepalive_timeout = \"5m\"\n{CRED}{ROUTE}"
    ));
    assert_eq!(c.server.max_header_bytes, 16 * 1024);
    assert_eq!(c.server.max_headers, 20);
    assert_eq!(c.server.keepalive_timeout, Duration::from_secs(300));
    let t = format!("[store]\nkind = \"redis\"\n{CRED}{ROUTE}");
    err_at(&t, "store.kind", "kind");
    let t = format!("[store]\nkind = \"postgres\"\n{CRED}{ROUTE}");
    err_at(&t, "store.url", "[store]");
    let t = format!("[store]\nkind = \"postgres\"\nurl = \"mysql://tp@db/tp\"\n{CRED}{ROUTE}");
    err_at(&t, "store.url", "mysql");
    let t = format!("[log]\nformat = \"xml\"\nlevel = \"info,=[\"\n{CRED}{ROUTE}");
    err_at(&t, "log.format", "format");
    err_at(&t, "log.level", "level");
    let c = ok(&format!(
        "[log]\nformat = \"pretty\"\nlevel = \"warn,tokenproxy=debug\"\n{CRED}{ROUTE}"
    ));
    assert_eq!(c.log.format, LogFormat::Pretty);
    let t = with("refresh_on = [401, 200, 600]\n");
    err_at(&t, "routes[0].refresh_on[1]", "refresh_on");
    err_at(&t, "routes[0].refresh_on[2]", "refresh_on");
    let c = ok(&with("refresh_on = [401, 403]\n"));
    assert_eq!(c.routes[0].refresh_on, vec![401, 403]);
}

#[test]
fn serde_errors_are_located_and_collected() {
    let t = format!("[server]\nlisten = \"127.0.0.1:8080\"\nworkers = 4\n{CRED}colour = \"blue\"\n{ROUTE}strip_prefix = \"yes\"\n");
    let all = errs(&t);
    let e = err_at(&t, "server.workers", "workers");
    assert_eq!(e.col, 1);
    assert!(e.message.contains("unknown key"), "{e}");
    err_at(&t, "credentials.github.colour", "colour");
    let e = err_at(&t, "routes[0].strip_prefix", "strip_prefix");
    assert!(e.message.contains("expected a boolean"), "{e}");
    assert_eq!(all.len(), 3, "{}", ConfigErrors(all.clone()));

    let t = format!("[servr]\nlisten = \"x\"\n{CRED}{ROUTE}");
    err_at(&t, "servr", "[servr]");
    let t = with("upstream = 5\n");
    // Duplicate key: a TOML syntax error, reported alone with its line.
    let e = &errs(&t)[0];
    assert_eq!(e.line, line_of(&t, "upstream = 5"), "{e}");
}

#[test]
fn syntax_error_has_a_line() {
    let t = "[server]\nlisten = \"127.0.0.1:8080\n";
    let e = &errs(t)[0];
    assert_eq!(e.line, 2, "{e}");
    assert!(e.message.contains("TOML"), "{e}");
}

#[test]
fn many_errors_in_one_load() {
    let t = format!(
        "[server]\nworker_threads = 0\n[log]\nformat = \"xml\"\n{CRED}auth_method = \"bogus\"\n{ROUTE}header = \"connection\"\n[[routes]]\npath_prefix = \"nope\"\nupstream = \"ftp://x\"\ncredential = \"missing\"\nextra = 1\n"
    );
    let all = errs(&t);
    let keys: Vec<&str> = all.iter().map(|e| e.key.as_str()).collect();
    for k in [
        "server.worker_threads",
        "log.format",
        "credentials.github.auth_method",
        "routes[0].header",
        "routes[1].path_prefix",
        "routes[1].upstream",
        "routes[1].credential",
        "routes[1].extra",
    ] {
        assert!(keys.contains(&k), "{k} missing from {keys:?}");
    }
    // In file order.
    let lines: Vec<usize> = all.iter().map(|e| e.line).collect();
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(lines, sorted);
}

#[test]
fn env_expansion() {
    let c = ok(&with("").replace("https://api.github.com/", "https://${UPSTREAM_HOST}/v1/"));
    assert_eq!(
        c.routes[0].upstream.to_string(),
        "https://api.example.com/v1/"
    );
    let c = ok(&with("format = \"$${HOME} {token}\"\n"));
    assert_eq!(c.routes[0].format.prefix, "${HOME} ");

    let t = with("").replace("${GITHUB_REFRESH_TOKEN}", "${NOT_SET_ANYWHERE}");
    let e = err_at(&t, "credentials.github.refresh_token", "NOT_SET_ANYWHERE");
    assert!(e.message.contains("NOT_SET_ANYWHERE"), "{e}");
    // The column of the value as written, not of its expansion.
    assert_eq!(e.col, line_col_of(&t, "\"${NOT_SET"));
}

/// A credential using `private_key_jwt` with files from src/dev/testdata.
fn pkjwt(dir: &Path, keys: &str) -> String {
    for f in [
        "client-rsa.key",
        "client-rsa.pem",
        "client-ec.key",
        "client-ec384.key",
        "client-encrypted.key",
        "mtls-client.pem",
    ] {
        let from = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/dev/testdata")
            .join(f);
        std::fs::copy(from, dir.join(f)).expect("copy testdata");
    }
    with("").replace(
        "client_secret = \"${GITHUB_CLIENT_SECRET}\"\n",
        &format!("auth_method = \"private_key_jwt\"\n{keys}"),
    )
}

#[test]
fn client_assertion_keys_are_proven_at_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("proxy.toml");
    let load = |keys: &str| parse_at(&pkjwt(dir.path(), keys), &source);
    let c = load("client_assertion_key = \"client-rsa.key\"\nclient_assertion_cert = \"client-rsa.pem\"\nclient_assertion_kid = \"k1\"\nclient_assertion_alg = \"PS256\"\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let gh = &c.credentials["github"];
    assert_eq!(gh.auth_method, AuthMethod::PrivateKeyJwt);
    let Some(AssertionSource::Key { key, .. }) = &gh.client_assertion else {
        panic!("{:?}", gh.client_assertion)
    };
    assert_eq!((key.alg(), key.kid()), ("PS256", Some("k1")));
    assert!(key.cert_thumbprint().is_some());
    assert!(!c.summary().contains("PRIVATE KEY"));

    // Each unusable key is an error at its own line, naming the file.
    let located = |keys: &str, key: &str, needle: &str, want: &str| {
        let t = pkjwt(dir.path(), keys);
        let all = parse_at(&t, &source).expect_err(keys).0;
        let e = all
            .iter()
            .find(|e| e.key == format!("credentials.github.{key}"))
            .unwrap_or_else(|| panic!("no error for {key}: {}", ConfigErrors(all.clone())));
        assert_eq!(e.line, line_of(&t, needle), "{e}");
        assert!(e.message.contains(want), "{e}");
        assert_eq!(e.file, source);
    };
    located(
        "client_assertion_key = \"client-encrypted.key\"\n",
        "client_assertion_key",
        "client_assertion_key",
        "encrypted",
    );
    located(
        "client_assertion_key = \"client-ec384.key\"\n",
        "client_assertion_key",
        "client_assertion_key",
        "client-ec384.key is not an RSA",
    );
    located(
        "client_assertion_key = \"client-rsa.pem\"\n",
        "client_assertion_key",
        "client_assertion_key",
        "holds no PEM private key",
    );
    located(
        "client_assertion_key = \"missing.key\"\n",
        "client_assertion_key",
        "client_assertion_key",
        "cannot read",
    );
    located(
        "client_assertion_key = \"client-ec.key\"\nclient_assertion_alg = \"RS256\"\n",
        "client_assertion_alg",
        "client_assertion_alg",
        "does not fit this P-256 key",
    );
    located(
        "client_assertion_key = \"client-rsa.key\"\nclient_assertion_cert = \"mtls-client.pem\"\n",
        "client_assertion_cert",
        "client_assertion_cert",
        "does not belong",
    );
    located(
        "client_assertion_file = \"token\"\nclient_assertion_kid = \"k\"\n",
        "client_assertion_kid",
        "client_assertion_kid",
        "only used with client_assertion_key",
    );
    located(
        "client_assertion_key = \"client-ec.key\"\nclient_assertion_file = \"token\"\n",
        "client_assertion_file",
        "client_assertion_file",
        "use one or the other",
    );
    located(
        "client_assertion_key = \"client-ec.key\"\nclient_assertion_aud = \"issuer\"\n",
        "client_assertion_aud",
        "client_assertion_aud",
        "no issuer",
    );

    // The file is read per request, not at load: a missing one is no error yet.
    let c = load("client_assertion_file = \"/var/run/secrets/tokens/idp\"\n")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        c.credentials["github"].client_assertion,
        Some(AssertionSource::File(_))
    ));
    // The assertion keys belong to private_key_jwt.
    let t = format!("{CRED}client_assertion_key = \"x\"\n{ROUTE}");
    let e = err_at(
        &t,
        "credentials.github.client_assertion_key",
        "client_assertion_key",
    );
    assert!(e.message.contains("only used with"), "{e}");
}

#[test]
fn secret_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("secret"), "file-secret-value\n").expect("write");
    std::fs::write(dir.path().join("seed"), "file-seed-value \r\n").expect("write");
    let source = dir.path().join("proxy.toml");
    let t = with("")
        .replace(
            "client_secret = \"${GITHUB_CLIENT_SECRET}\"",
            "client_secret_file = \"secret\"",
        )
        .replace(
            "refresh_token = \"${GITHUB_REFRESH_TOKEN}\"",
            "refresh_token_file = \"seed\"",
        );
    let c = parse_at(&t, &source).unwrap_or_else(|e| panic!("{e}"));
    let gh = &c.credentials["github"];
    assert_eq!(
        gh.client_secret.as_ref().map(Secret::expose),
        Some("file-secret-value")
    );
    assert_eq!(
        gh.client_secret_file.as_deref(),
        Some(dir.path().join("secret").as_path())
    );
    assert_eq!(
        gh.refresh_token.as_ref().map(Secret::expose),
        Some("file-seed-value")
    );
    assert!(!c.summary().contains("file-secret-value"));

    // Unreadable: the error names the key and the path.
    let t2 = t.replace("\"secret\"", "\"no-such-file\"");
    let Err(e) = parse_at(&t2, &source) else {
        panic!("expected an error")
    };
    let e =
        e.0.iter()
            .find(|e| e.key == "credentials.github.client_secret_file")
            .expect("error");
    assert!(e.message.contains("no-such-file"), "{e}");
    assert_eq!(e.line, line_of(&t2, "client_secret_file"));

    // Both inline and file.
    let t3 = with("").replace(
        "client_secret = \"${GITHUB_CLIENT_SECRET}\"",
        "client_secret = \"x\"\nclient_secret_file = \"secret\"",
    );
    let Err(e) = parse_at(&t3, &source) else {
        panic!("expected an error")
    };
    assert!(
        e.0.iter()
            .any(|e| e.key == "credentials.github.client_secret_file"),
        "{e}"
    );
}

#[test]
fn relative_paths_resolve_against_the_config_dir() {
    let c = parse_at(
        &with("ca_file = \"ca.pem\"\n").replace(
            "[[routes]]",
            "[store]\npath = \"state/tokens.json\"\n[[routes]]",
        ),
        Path::new("/etc/tp/proxy.toml"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.store.path, Path::new("/etc/tp/state/tokens.json"));
    assert_eq!(
        c.routes[0].ca_file.as_deref(),
        Some(Path::new("/etc/tp/ca.pem"))
    );
}

#[test]
fn summary_and_debug_hide_secrets() {
    let c = parse_at(EXAMPLE, Path::new("proxy.toml")).unwrap_or_else(|e| panic!("{e}"));
    let summary = c.summary();
    let debug = format!("{c:?}");
    for secret in [GH_SECRET, GH_SEED, ADMIN, STORE_KEY, BILLING] {
        assert!(!summary.contains(secret), "summary leaks {secret}");
        assert!(!debug.contains(secret), "Debug leaks {secret}");
        let fp = Secret::new(secret).fingerprint();
        if secret != GH_SEED {
            assert!(
                !summary.contains(&fp),
                "summary shows the fingerprint of {secret}"
            );
        }
    }
    assert!(summary.contains("127.0.0.1:8080"), "{summary}");
    assert!(
        summary.contains("credential github: grant refresh_token"),
        "{summary}"
    );
    assert!(summary.contains("client_secret set"), "{summary}");
    assert!(
        summary.contains(&Secret::new(GH_SEED).fingerprint()),
        "{summary}"
    );
    assert!(
        summary.contains("route /github/ -> https://api.github.com/ (credential github, header authorization, strip_prefix true)"),
        "{summary}"
    );
}

#[test]
fn load_reads_the_file_and_reports_a_missing_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("proxy.toml");
    std::fs::write(
        &p,
        with("")
            .replace("${GITHUB_CLIENT_SECRET}", "lit")
            .replace("${GITHUB_REFRESH_TOKEN}", "seed"),
    )
    .expect("write");
    let c = load(&p).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.source, p);
    let Err(e) = load(&dir.path().join("absent.toml")) else {
        panic!("expected an error")
    };
    assert!(e.to_string().contains("absent.toml: cannot read"), "{e}");
}

#[test]
fn serde_messages_speak_toml() {
    let t = format!(
        "[servr]\nx = 1\n[server]\nworker_threads = \"two\"\n{CRED}scopes = \"repo\"\n{ROUTE}"
    );
    let e = err_at(&t, "servr", "[servr]");
    assert!(
        e.message
            .starts_with("unknown key \"servr\" (did you mean \"server\"?)"),
        "{e}"
    );
    let e = err_at(&t, "server.worker_threads", "worker_threads");
    assert!(e.message.ends_with("expected an integer"), "{e}");
    let e = err_at(&t, "credentials.github.scopes", "scopes");
    assert!(e.message.ends_with("expected a list"), "{e}");
    assert_eq!(
        errs(&t).len(),
        3,
        "the contents of [servr] are not reported again"
    );
}

#[test]
fn syntax_error_is_one_line() {
    let e = &errs("[server\n")[0];
    assert_eq!((e.line, e.key.as_str()), (1, ""));
    assert!(!e.to_string().contains('\n'), "{e}");
}

#[test]
fn wrong_table_shapes() {
    let t = format!("[[server]]\nlisten = \"127.0.0.1:1\"\n{CRED}{ROUTE}");
    let e = err_at(&t, "server", "[[server]]");
    assert!(e.message.contains("not a list"), "{e}");
    assert_eq!(errs(&t).len(), 1);
    let t = format!("{CRED}[routes]\npath_prefix = \"/x/\"\n");
    let e = err_at(&t, "routes", "[routes]");
    assert!(e.message.contains("[[routes]]"), "{e}");
    let t = "[credentials]\ngh = 5\n";
    let e = err_at(t, "credentials.gh", "gh = 5");
    assert!(e.message.ends_with("expected a table"), "{e}");
}

mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn line() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            Just("listen"),
            Just("hosts"),
            Just("max_connections"),
            Just("worker_threads"),
            Just("shutdown_grace"),
            Just("path"),
            Just("kind"),
            Just("format"),
            Just("level"),
            Just("grant"),
            Just("token_url"),
            Just("client_id"),
            Just("client_secret"),
            Just("refresh_token"),
            Just("refresh_wait"),
            Just("max_backoff"),
            Just("default_lifetime"),
            Just("path_prefix"),
            Just("upstream"),
            Just("credential"),
            Just("header"),
            Just("refresh_on"),
            Just("replay_max_body"),
            Just("scopes"),
            Just("upgrades"),
            Just("unknown_key"),
            Just("a.b"),
            Just("\"quoted key\""),
        ];
        let value = prop_oneof![
            Just("\"127.0.0.1:0\"".to_owned()),
            Just("\"unix:/tmp/x.sock\"".to_owned()),
            Just("\"http://127.0.0.1:1/token\"".to_owned()),
            Just("\"https://idp.example/t\"".to_owned()),
            Just("\"/api/\"".to_owned()),
            Just("\"user\"".to_owned()),
            Just("\"refresh_token\"".to_owned()),
            Just("\"${MISSING}\"".to_owned()),
            Just("\"${GITHUB_CLIENT_SECRET}\"".to_owned()),
            Just("\"10s\"".to_owned()),
            Just("\"-1s\"".to_owned()),
            Just("\"64KiB\"".to_owned()),
            Just("[401, 403]".to_owned()),
            Just("[]".to_owned()),
            Just("{}".to_owned()),
            Just("true".to_owned()),
            Just("0".to_owned()),
            Just("-1".to_owned()),
            Just("99999999999999999999".to_owned()),
            Just("1e308".to_owned()),
            Just("nan".to_owned()),
            Just("1979-05-27T07:32:00Z".to_owned()),
            Just("\"\"".to_owned()),
            "\"[ -~&&[^\"\\\\]]{0,12}\"",
            "[0-9]{1,6}",
        ];
        let header = prop_oneof![
            Just("[server]"),
            Just("[admin]"),
            Just("[store]"),
            Just("[log]"),
            Just("[credentials.user]"),
            Just("[credentials.\"we ird\"]"),
            Just("[[routes]]"),
            Just("[routes]"),
            Just("[[credentials]]"),
            Just("[unknown]"),
            Just("[server.x]"),
        ];
        prop_oneof![
            3 => (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
            1 => header.prop_map(str::to_owned),
            1 => "[ -~]{0,20}",
        ]
    }

    fn mutated_example() -> impl Strategy<Value = String> {
        let lines: Vec<String> = EXAMPLE.lines().map(str::to_owned).collect();
        let n = lines.len();
        (proptest::collection::vec((0..n, 0..3u8, line()), 1..4)).prop_map(move |edits| {
            let mut l = lines.clone();
            for (i, op, new) in edits {
                let i = i.min(l.len().saturating_sub(1));
                match op {
                    0 if !l.is_empty() => {
                        l.remove(i);
                    }
                    1 => l.insert(i, new),
                    _ if !l.is_empty() => l[i] = new,
                    _ => {}
                }
            }
            l.join("\n")
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Never panics; every rejection names a key or a line.
        #[test]
        fn loader_never_panics_and_every_error_is_located(
            text in prop_oneof![
                proptest::collection::vec(line(), 0..16).prop_map(|l| l.join("\n")),
                mutated_example(),
                "\\PC{0,200}",
            ]
        ) {
            let dir = tempfile::tempdir().unwrap();
            if let Err(ConfigErrors(errors)) = parse(&text, &dir.path().join("p.toml"), &env) {
                prop_assert!(!errors.is_empty());
                for e in &errors {
                    prop_assert!(
                        !e.key.is_empty() || e.line > 0,
                        "unlocated error: {e:?}\n---\n{text}"
                    );
                    prop_assert!(!e.message.is_empty());
                }
            }
        }
    }
}

#[test]
fn provider_fills_unset_keys_and_explicit_keys_win() {
    let base =
        "[credentials.gh]\ngrant = \"refresh_token\"\nclient_id = \"c\"\nclient_secret = \"s\"\n";
    let c = ok(&format!("{base}provider = \"github\"\n"));
    let gh = &c.credentials["gh"];
    assert_eq!(
        gh.token_url.as_ref().unwrap().to_string(),
        "https://github.com/login/oauth/access_token"
    );
    assert_eq!(gh.auth_method, AuthMethod::ClientSecretPost);
    assert_eq!(gh.default_lifetime, Duration::from_secs(28_800));
    assert_eq!(gh.provider.unwrap().name, "github");
    // Explicit keys win: a local token endpoint, another auth method.
    let c = ok(&format!(
        "{base}provider = \"github\"\ntoken_url = \"http://127.0.0.1:9/token\"\nauth_method = \"client_secret_basic\"\ndefault_lifetime = \"5m\"\n"
    ));
    let gh = &c.credentials["gh"];
    assert_eq!(
        gh.token_url.as_ref().unwrap().to_string(),
        "http://127.0.0.1:9/token"
    );
    assert_eq!(gh.auth_method, AuthMethod::ClientSecretBasic);
    assert_eq!(gh.default_lifetime, Duration::from_secs(300));
    // Microsoft: templated with tenant; scope on refresh.
    let c = ok(&format!(
        "{base}provider = \"microsoft\"\ntenant = \"contoso.onmicrosoft.com\"\n"
    ));
    let ms = &c.credentials["gh"];
    assert_eq!(
        ms.token_url.as_ref().unwrap().to_string(),
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    );
    assert!(ms.scope_on_refresh);
    assert_eq!(
        ms.authorize_url.as_ref().unwrap().to_string(),
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/authorize"
    );
    // An explicit authorize_url wins over the profile's.
    let c = ok(&format!(
        "{base}provider = \"microsoft\"\ntenant = \"common\"\nauthorize_url = \"http://127.0.0.1:9/authorize\"\n"
    ));
    assert_eq!(
        c.credentials["gh"]
            .authorize_url
            .as_ref()
            .unwrap()
            .to_string(),
        "http://127.0.0.1:9/authorize"
    );
    // Okta and Auth0: templated with the tenant's domain.
    let c = ok(&format!(
        "{base}provider = \"okta\"\ndomain = \"dev-123456.okta.com\"\n"
    ));
    let okta = &c.credentials["gh"];
    assert_eq!(
        okta.token_url.as_ref().unwrap().to_string(),
        "https://dev-123456.okta.com/oauth2/default/v1/token"
    );
    assert_eq!(
        okta.authorize_url.as_ref().unwrap().to_string(),
        "https://dev-123456.okta.com/oauth2/default/v1/authorize"
    );
    let c = ok(&format!(
        "{base}provider = \"auth0\"\ndomain = \"example.eu.auth0.com\"\n"
    ));
    assert_eq!(
        c.credentials["gh"].token_url.as_ref().unwrap().to_string(),
        "https://example.eu.auth0.com/oauth/token"
    );
    let c = ok(&format!(
        "{base}provider = \"microsoft\"\ntenant = \"common\"\nscope_on_refresh = false\n"
    ));
    assert!(!c.credentials["gh"].scope_on_refresh);
    // Google: login parameters.
    let c = ok(&format!("{base}provider = \"google\"\n"));
    assert!(c.credentials["gh"]
        .login_params
        .contains(&("access_type".into(), "offline".into())));
}

#[test]
fn provider_errors_name_the_line() {
    let base =
        "[credentials.ms]\ngrant = \"refresh_token\"\nclient_id = \"c\"\nclient_secret = \"s\"\n";
    let text = format!("{base}provider = \"microsoft\"\n");
    let e = err_at(&text, "credentials.ms.provider", "provider =");
    assert!(e.message.contains("tenant"), "{e}");
    let text = format!("{base}provider = \"gitlab\"\n");
    let e = err_at(&text, "credentials.ms.provider", "provider =");
    assert!(
        e.message.contains("github") && e.message.contains("linkedin"),
        "{e}"
    );
    let text = format!("{base}provider = \"github\"\ntenant = \"x\"\n");
    err_at(&text, "credentials.ms.tenant", "tenant =");
    let text = format!("{base}tenant = \"x\"\ntoken_url = \"https://a.example/t\"\n");
    err_at(&text, "credentials.ms.tenant", "tenant =");
    let text = format!("{base}provider = \"microsoft\"\ntenant = \"a/b\"\n");
    err_at(&text, "credentials.ms.tenant", "tenant =");
    // A profile that does not know its endpoint says what to set.
    let text = format!("{base}provider = \"cognito\"\n");
    let e = err_at(&text, "credentials.ms.provider", "provider =");
    assert!(e.message.contains("token_url"), "{e}");
    // Okta's endpoints need the org's domain, or token_url/issuer instead.
    let text = format!("{base}provider = \"okta\"\n");
    let e = err_at(&text, "credentials.ms.provider", "provider =");
    assert!(
        e.message.contains("domain") && e.message.contains("token_url"),
        "{e}"
    );
    assert!(ok(&format!(
        "{base}provider = \"okta\"\nissuer = \"https://dev-1.okta.com/oauth2/default\"\n"
    ))
    .credentials["ms"]
        .token_url
        .is_none());
    // An explicit token_url needs no domain; the authorize URL then stays unset.
    let c = ok(&format!(
        "{base}provider = \"okta\"\ntoken_url = \"https://a.example/t\"\n"
    ));
    assert_eq!(
        c.credentials["ms"].token_url.as_ref().unwrap().to_string(),
        "https://a.example/t"
    );
    assert!(c.credentials["ms"].authorize_url.is_none());
}

#[test]
fn every_profile_auth_method_is_a_known_method() {
    for p in crate::providers::PROFILES {
        if let Some(m) = p.auth_method {
            assert!(
                AuthMethod::ALL.iter().any(|a| a.as_str() == m),
                "{}: {m}",
                p.name
            );
        }
    }
}

#[test]
fn dpop_keys_are_proven_at_load_and_errors_name_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("proxy.toml");
    for f in [
        "dpop-p256.key",
        "dpop-ed25519.key",
        "client-ec384.key",
        "client-rsa.key",
    ] {
        let from = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/dev/testdata")
            .join(f);
        std::fs::copy(from, dir.path().join(f)).expect("copy testdata");
    }
    let text = |keys: &str| {
        with("").replace(
            "client_secret = \"${GITHUB_CLIENT_SECRET}\"\n",
            &format!("client_secret = \"s\"\n{keys}"),
        )
    };
    let c = parse_at(&text("dpop = true\n"), &source).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.credentials["github"].dpop, Some(DpopSource::Generated));
    for (file, alg) in [("dpop-p256.key", "ES256"), ("dpop-ed25519.key", "EdDSA")] {
        let c = parse_at(
            &text(&format!("dpop = true\ndpop_key = \"{file}\"\n")),
            &source,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let Some(DpopSource::File { key, .. }) = &c.credentials["github"].dpop else {
            panic!("{:?}", c.credentials["github"].dpop)
        };
        assert_eq!(key.alg(), alg);
        assert!(!c.summary().contains("PRIVATE KEY"));
    }
    let located = |keys: &str, want: &str| {
        let t = text(keys);
        let all = parse_at(&t, &source).expect_err(keys).0;
        let e = all
            .iter()
            .find(|e| e.key == "credentials.github.dpop_key")
            .unwrap_or_else(|| panic!("no error: {}", ConfigErrors(all.clone())));
        assert_eq!(e.line, line_of(&t, "dpop_key"), "{e}");
        assert!(e.message.contains(want), "{e}");
    };
    located(
        "dpop = true\ndpop_key = \"client-ec384.key\"\n",
        "client-ec384.key is not a P-256 or Ed25519 key",
    );
    located(
        "dpop = true\ndpop_key = \"client-rsa.key\"\n",
        "client-rsa.key is not a P-256",
    );
    located("dpop = true\ndpop_key = \"missing.key\"\n", "cannot read");
    located(
        "dpop_key = \"dpop-p256.key\"\n",
        "only used with dpop = true",
    );
}
