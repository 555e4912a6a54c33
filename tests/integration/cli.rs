//! The binary: `check`, `run`, `--version`, exit codes and error messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const SECRET: &str = "cli-client-secret-Hq7Vb2";
const SEED: &str = "cli-refresh-seed-Pk93Rt";

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tokenproxy"));
    c.env_remove("TOKENPROXY_CONFIG")
        .env_remove("HTTPS_PROXY")
        .stdin(Stdio::null());
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run tokenproxy")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A valid config: one refresh_token credential and one route.
fn good() -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.2:0"

[credentials.github-main]
grant = "refresh_token"
token_url = "http://127.0.0.1:9/token"
client_id = "cli-client"
client_secret = "{SECRET}"
refresh_token = "{SEED}"

[[routes]]
path_prefix = "/gh-route/"
upstream = "http://127.0.0.1:9/"
credential = "github-main"
"#
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn check_good_config_prints_a_secret_free_summary() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "good.toml", &good());
    let out = run(&["check", "-c", cfg.to_str().unwrap()]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("github-main"), "{stdout}");
    assert!(stdout.contains("/gh-route/"), "{stdout}");
    for secret in [SECRET, SEED] {
        assert!(
            !stdout.contains(secret),
            "summary leaks a secret:\n{stdout}"
        );
        assert!(!stderr.contains(secret), "stderr leaks a secret:\n{stderr}");
    }
}

/// One bad config case: edits to the good config, the key the error must
/// name, and a snippet that locates the offending line.
struct Case {
    what: &'static str,
    edits: &'static [(&'static str, &'static str)],
    key: &'static str,
    at: &'static str,
}

/// In an order whose edits all apply to one file (the duplicate route goes
/// first, before the first route's credential is renamed).
const CASES: &[Case] = &[
    Case {
        what: "duplicate prefixes",
        edits: &[(
            "credential = \"github-main\"\n",
            "credential = \"github-main\"\n\n[[routes]]\npath_prefix = \"/gh-route/\" # dup\nupstream = \"http://127.0.0.1:9/\"\ncredential = \"github-main\"\n",
        )],
        key: "routes[1].path_prefix",
        at: "# dup",
    },
    Case {
        what: "route naming an unknown credential",
        edits: &[("credential = \"github-main\"", "credential = \"nope\"")],
        key: "routes[0].credential",
        at: "credential = \"nope\"",
    },
    Case {
        what: "ftp upstream",
        edits: &[("upstream = \"http://127.0.0.1:9/\"", "upstream = \"ftp://127.0.0.1:9/\"")],
        key: "routes[0].upstream",
        at: "ftp://",
    },
    Case {
        what: "header name with a space",
        edits: &[("path_prefix = \"/gh-route/\"\n", "path_prefix = \"/gh-route/\"\nheader = \"X Token\"\n")],
        key: "routes[0].header",
        at: "X Token",
    },
    Case {
        what: "format without {token}",
        edits: &[("path_prefix = \"/gh-route/\"\n", "path_prefix = \"/gh-route/\"\nformat = \"Bearer\"\n")],
        key: "routes[0].format",
        at: "format = \"Bearer\"",
    },
    Case {
        what: "bad listen address",
        edits: &[("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:99999\"")],
        key: "server.listen",
        at: "99999",
    },
    Case {
        what: "missing ${VAR}",
        edits: &[(SECRET, "${TP_CLI_TEST_UNSET_VAR_7731}")],
        key: "credentials.github-main.client_secret",
        at: "TP_CLI_TEST_UNSET_VAR_7731",
    },
    Case {
        what: "unknown key",
        edits: &[("client_id = \"cli-client\"\n", "client_id = \"cli-client\"\ncolour = \"blue\"\n")],
        key: "credentials.github-main.colour",
        at: "colour",
    },
    Case {
        what: "a token_field_hosts entry that is a URL, not a host",
        edits: &[(
            "client_id = \"cli-client\"\n",
            "client_id = \"cli-client\"\ntoken_field_hosts = [\".example.com\", \"https://api.example.com\"]\n",
        )],
        key: "credentials.github-main.token_field_hosts[1]",
        at: "token_field_hosts",
    },
];

fn apply(mut text: String, case: &Case) -> String {
    for (from, to) in case.edits {
        assert!(text.contains(from), "{}: edit does not apply", case.what);
        text = text.replacen(from, to, 1);
    }
    text
}

/// 1-based line of the first line containing `at`.
fn line_of(text: &str, at: &str) -> usize {
    text.lines()
        .position(|l| l.contains(at))
        .unwrap_or_else(|| panic!("{at:?} not in config"))
        + 1
}

/// Asserts stderr has `FILE:LINE:COL: KEY:` for this case.
fn assert_reported(stderr: &str, file: &Path, text: &str, case: &Case) {
    let prefix = format!("{}:{}:", file.display(), line_of(text, case.at));
    let found = stderr.lines().any(|l| {
        l.strip_prefix(&prefix).is_some_and(|rest| {
            let (col, rest) = rest.split_once(':').unwrap_or(("", ""));
            col.parse::<usize>().is_ok_and(|c| c > 0)
                && rest.starts_with(&format!(" {}: ", case.key))
        })
    });
    assert!(
        found,
        "{}: expected `{prefix}COL: {}: ...` in stderr:\n{stderr}\n---\n{text}",
        case.what, case.key
    );
}

#[test]
fn check_bad_configs_exit_64_naming_file_line_col_and_key() {
    let dir = tempfile::tempdir().unwrap();
    for (i, case) in CASES.iter().enumerate() {
        let text = apply(good(), case);
        let cfg = write(dir.path(), &format!("bad{i}.toml"), &text);
        let out = run(&["check", "-c", cfg.to_str().unwrap()]);
        let stderr = text_of(&out);
        assert_eq!(out.status.code(), Some(64), "{}: {stderr}", case.what);
        assert_reported(&stderr, &cfg, &text, case);
    }
}

fn text_of(out: &Output) -> String {
    text(&out.stderr)
}

#[test]
fn check_reports_all_errors_of_one_file_together() {
    let dir = tempfile::tempdir().unwrap();
    let text = CASES.iter().fold(good(), apply);
    let cfg = write(dir.path(), "all.toml", &text);
    let out = run(&["check", "-c", cfg.to_str().unwrap()]);
    let stderr = text_of(&out);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    for case in CASES {
        assert_reported(&stderr, &cfg, &text, case);
    }
    assert!(!stderr.contains(SEED), "stderr leaks the seed");
}

#[test]
fn version_and_usage_exit_codes() {
    let out = run(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains(env!("CARGO_PKG_VERSION")));

    let out = run(&["run"]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--config"));
}

#[test]
fn run_with_a_corrupt_store_exits_1_naming_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "tp.toml", &good());
    let store = write(dir.path(), "tokens.json", "{ this is not json");
    let mut child = bin()
        .args(["run", "-c", cfg.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tokenproxy");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tokenproxy run kept running with a corrupt store");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(store.to_str().unwrap()),
        "stderr should name {}:\n{stderr}",
        store.display()
    );
    assert_eq!(
        std::fs::read_to_string(&store).unwrap(),
        "{ this is not json",
        "an unreadable store is never overwritten"
    );
}

#[test]
fn example_config_passes_check() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.example.toml");
    let out = bin()
        .args(["check", "-c", example.to_str().unwrap()])
        .env("ADMIN_TOKEN", "admin-token-x")
        .env("TOKENPROXY_STORE_KEY", "store-key-x")
        .env("GITHUB_CLIENT_SECRET", "gh-secret-x")
        .env("GITHUB_REFRESH_TOKEN", "gh-refresh-x")
        .env("BILLING_CLIENT_SECRET", "billing-secret-x")
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    for secret in [
        "admin-token-x",
        "store-key-x",
        "gh-secret-x",
        "gh-refresh-x",
        "billing-secret-x",
    ] {
        assert!(!stdout.contains(secret), "summary leaks {secret}");
    }
    assert!(stdout.contains("github") && stdout.contains("billing"));
}
