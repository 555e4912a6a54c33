//! deploy/prometheus/alerts.yaml: loads in Prometheus's own checker, its
//! unit tests pass, it uses only series tokenproxy exposes and its runbooks
//! are sections of docs/troubleshooting.md.

use crate::docs::{anchors, metrics_table, root, METRICS_PAGE};
use std::process::Command;

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
