//! The status page in a real headless browser: `tests/browser/status_page.mjs`
//! (playwright-core driving Debian's chromium) against a running proxy with
//! one healthy and one dead credential. Saves a screenshot to
//! `target/artifacts/status-page.png` (a CI artifact).
//!
//! Skipped, with a message, only when `node`, `/usr/bin/chromium` or the
//! script's `node_modules` are missing and `CI` is not set; under CI it must
//! run (`tests/run.sh` installs chromium and runs `npm ci`).

use crate::harness::*;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokenproxy::dev::{DevClient, IdpOptions};

const CHROMIUM: &str = "/usr/bin/chromium";

fn missing_prerequisite(dir: &Path) -> Option<String> {
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !node {
        return Some("node is not installed".into());
    }
    if !Path::new(CHROMIUM).exists() {
        return Some(format!("{CHROMIUM} is missing (apt-get install chromium)"));
    }
    if !dir.join("node_modules/playwright-core").exists() {
        return Some(format!("run `npm ci` in {}", dir.display()));
    }
    None
}

#[tokio::test]
async fn status_page_in_a_headless_browser() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("tests/browser");
    if let Some(why) = missing_prerequisite(&dir) {
        assert!(
            std::env::var_os("CI").is_none(),
            "browser test cannot run under CI: {why}"
        );
        eprintln!("SKIPPED status_page_in_a_headless_browser: {why} (set CI=1 to make this fatal)");
        return;
    }

    let mut env = TestEnv::new(IdpOptions {
        access_ttl: Duration::from_secs(300),
        clients: vec![
            DevClient::confidential("demo-client", "demo-secret"),
            DevClient::confidential("other-client", "demo-secret"),
        ],
        ..IdpOptions::default()
    })
    .await;
    let seed = env.idp.issue_refresh_token("demo-client", "ops");
    env.start_with(&format!(
        r#"
[credentials.github]
grant = "refresh_token"
token_url = "@TOKEN_URL@"
client_id = "demo-client"
client_secret = "demo-secret"
refresh_token = "{seed}"

[credentials.salesforce]
grant = "refresh_token"
token_url = "@TOKEN_URL@"
client_id = "other-client"
client_secret = "demo-secret"
refresh_token = "rt_revoked_long_ago"

[[routes]]
path_prefix = "/github/"
upstream = "@ECHO@"
credential = "github"

[[routes]]
path_prefix = "/salesforce/"
upstream = "@ECHO@"
credential = "salesforce"
"#
    ))
    .await;
    for _ in 0..3 {
        assert_eq!(env.get("/github/user").await.0.status(), 200);
    }
    assert_eq!(env.get("/github/status/502").await.0.status(), 502);
    assert_eq!(env.get("/salesforce/query").await.0.status(), 503);

    let artifacts = root.join("target/artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let admin = env.admin_url("/");
    let child = std::process::Command::new("node")
        .current_dir(&dir)
        .arg("status_page.mjs")
        .args([admin.as_str(), "github", "salesforce"])
        .arg(&shot)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("node runs");
    let pid = child.id().to_string();
    // The proxy runs on this runtime: wait for node off it.
    let waited = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await;
    let Ok(out) = waited else {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status();
        panic!("status_page.mjs did not finish within 60 s");
    };
    let out = out.unwrap().expect("node output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "status_page.mjs failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let report = json(stdout.trim().lines().last().unwrap_or("").as_bytes());
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["seen"]["healthyState"], "fresh");
    assert_eq!(report["seen"]["deadState"], "dead");
    assert_eq!(report["seen"]["loginHref"], "/login/salesforce");
    assert!(
        shot.metadata().is_ok_and(|m| m.len() > 1000),
        "screenshot saved"
    );
}
