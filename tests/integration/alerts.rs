//! deploy/prometheus/alerts.yaml: loads in Prometheus's own checker, its
//! unit tests pass, it uses only series tokenproxy exposes and its runbooks
//! are sections of docs/troubleshooting.md.

use crate::docs::{anchors, metrics_table, root, METRICS_PAGE};
use std::process::Command;
use std::time::Duration;

fn rules_dir() -> std::path::PathBuf {
    root().join("deploy/prometheus")
}

/// `promtool`, or `None` (printed as SKIP) where it is not installed; under
/// CI a missing promtool fails instead (tests/run.sh installs it).
fn promtool() -> Option<&'static str> {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("promtool");
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "promtool is missing under CI: tests/run.sh installs it (Debian's prometheus package)"
    );
    eprintln!("SKIP alert rules: promtool not installed (apt-get install prometheus)");
    None
}

fn run(args: &[&str]) {
    let Some(bin) = promtool() else { return };
    let out = Command::new(bin)
        .args(args)
        .current_dir(rules_dir())
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_pass_promtool_check() {
    run(&["check", "rules", "alerts.yaml"]);
}

#[test]
fn alert_rules_unit_tests_pass() {
    run(&["test", "rules", "alerts_test.yaml"]);
}

/// Every series an alert uses is in the metrics table (which a test holds
/// to a real scrape), and every runbook is a heading of the page.
#[test]
fn alerts_use_real_series_and_real_runbooks() {
    let rules = std::fs::read_to_string(rules_dir().join("alerts.yaml")).unwrap();
    let ops = std::fs::read_to_string(root().join(METRICS_PAGE)).unwrap();
    let table = metrics_table(&ops);
    let page = std::fs::read_to_string(root().join("docs/troubleshooting.md")).unwrap();
    let headings = anchors(&page);
    let mut series = 0;
    let mut runbooks = 0;
    for line in rules.lines().filter(|l| !l.trim_start().starts_with('#')) {
        for word in line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("tokenproxy_") {
                series += 1;
                assert!(
                    table.contains_key(word),
                    "{word} is not a tokenproxy metric"
                );
            }
        }
        if let Some(url) = line.trim().strip_prefix("runbook_url: ") {
            runbooks += 1;
            let anchor = url.trim_matches('"').split_once('#').map(|(_, a)| a);
            assert!(
                url.contains("docs/troubleshooting.md#")
                    && headings.iter().any(|h| Some(h.as_str()) == anchor),
                "runbook {url} is not a section of docs/troubleshooting.md"
            );
        }
    }
    assert!(
        series >= 5 && runbooks >= 5,
        "{series} series, {runbooks} runbooks"
    );
}

/// What a running proxy exposes parses and lints clean in Prometheus's own
/// checker, after a refresh and a proxied request filled the series.
#[tokio::test]
async fn a_real_scrape_passes_promtool_check_metrics() {
    use crate::harness::*;
    let Some(bin) = promtool() else { return };
    let stack = Stack::start(StackOpts::default()).await;
    let app = stack.app("").await;
    stack.wait_generation(1, Duration::from_secs(10)).await;
    let c = client();
    let proxied = get_ok(&c, &format!("http://{}/api/x", app.proxy_addr.unwrap())).await;
    assert_eq!(proxied.status, 200, "{}", proxied.text());
    let url = format!("http://{}/metrics", app.admin_addr.unwrap());
    let got = get_ok(&c, &url).await;
    assert_eq!(
        got.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let scrape = got.text();
    // Prometheus itself asks for OpenMetrics, and gets it.
    let req = http::Request::get(&url)
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .body(Default::default())
        .unwrap();
    let (resp, body) = send(&c, req).await;
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{resp:?}"
    );
    assert!(String::from_utf8_lossy(&body).ends_with("# EOF\n"));
    assert!(
        scrape.contains("tokenproxy_token_refresh_total"),
        "{scrape}"
    );
    let mut child = Command::new(bin)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    app.shutdown().await;
}
