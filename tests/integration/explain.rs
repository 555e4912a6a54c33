//! `tokenproxy explain` over the real logs of real failures: a `tokenproxy
//! run` child against the dev IdP, its stderr piped into the real binary.

use crate::harness::*;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokenproxy::dev::Fault;

const S: fn(u64) -> Duration = Duration::from_secs;

/// `tokenproxy explain ARGS` with `stdin` piped in; (exit code, stdout, stderr).
fn explain(args: &[&str], stdin: &[u8]) -> (Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
        .arg("explain")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tokenproxy explain");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The log line docs/troubleshooting.md shows under `anchor`.
fn page_line(anchor: &str) -> serde_json::Value {
    let page =
        std::fs::read_to_string(crate::docs::root().join("docs/troubleshooting.md")).unwrap();
    let section = page
        .split("\n## ")
        .find(|s| crate::docs::slug(s.lines().next().unwrap()) == anchor)
        .unwrap_or_else(|| panic!("no section {anchor}"));
    let block = section.split("```json\n").nth(1).unwrap();
    serde_json::from_str(block.split("\n```").next().unwrap()).unwrap()
}

/// The page shows the line a real run writes: the same fields, and the
/// same values where they do not vary from run to run.
fn assert_page_shows(real: &[serde_json::Value], anchor: &str, outcome: &str) {
    let shown = page_line(anchor);
    let line = real
        .iter()
        .find(|l| l["event"] == "token_refresh" && l["outcome"] == outcome)
        .unwrap_or_else(|| panic!("no {outcome} line in the run"));
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(&shown),
        keys(line),
        "{anchor}: the page's fields differ from the real line {line}"
    );
    for k in [
        "level",
        "message",
        "event",
        "grant_type",
        "outcome",
        "status",
        "error",
        "error_description",
        "hint",
        "target",
    ] {
        assert_eq!(
            shown[k], line[k],
            "{anchor}: {k} differs from the real line"
        );
    }
}

/// The family is revoked at the IdP before the proxy starts: the first
/// refresh gets `invalid_grant` ("refresh token revoked") and the
/// credential dies. `explain` names the cause and the login command, reads
/// stdin and `-f`, skips the foreign lines, and prints no secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explains_a_revoked_refresh_token_from_real_logs() {
    let stack = Stack::start(StackOpts::default()).await;
    stack.idp.revoke_family_of(&stack.seed);
    let (path, ports) = child_config(&stack, "proxy", "");
    let child = ChildProxy::start(stack.dir.path(), "run", &path, ports).await;
    wait_state(&client(), child.admin, "dead", S(10)).await;
    let mut logs = std::fs::read(&child.stderr).unwrap();
    assert!(
        String::from_utf8_lossy(&logs).contains("token_refresh"),
        "no refresh event logged"
    );
    // What `kubectl logs` interleaves: other containers' lines.
    logs.extend_from_slice(b"Starting sidecar...\n{\"level\":\"info\",\"msg\":\"other app\"}\n");

    let (code, out, err) = explain(&[], &logs);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains(&format!("credential {CRED}: DEAD since"))
            && out.contains("(Refresh token revoked or expired): no successful refresh after it"),
        "{out}"
    );
    assert!(out.contains("Refresh token revoked or expired x1"), "{out}");
    assert!(out.contains("reason invalid_grant, HTTP 400"), "{out}");
    assert!(out.contains("the log said: refresh token revoked"), "{out}");
    assert!(
        out.contains(&format!("tokenproxy login -c FILE {CRED}")),
        "{out}"
    );
    assert!(
        out.contains("docs/troubleshooting.md#refresh-token-revoked-or-expired"),
        "{out}"
    );
    assert!(out.contains("2 skipped (not tokenproxy JSON)"), "{out}");

    let (code, from_file, _) = explain(&["-f", child.stderr.to_str().unwrap()], b"");
    assert_eq!(code, Some(0));
    assert!(
        from_file.contains("Refresh token revoked or expired"),
        "{from_file}"
    );
    assert!(from_file.contains("0 skipped"), "{from_file}");

    let (code, js, _) = explain(&["--format", "json"], &logs);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&js).expect("one JSON document");
    let cred = &v["credentials"][0];
    assert_eq!(cred["credential"], CRED, "{v}");
    assert_eq!(cred["dead"], true, "{v}");
    assert_eq!(
        cred["causes"][0]["anchor"],
        "refresh-token-revoked-or-expired"
    );
    assert_eq!(cred["causes"][0]["count"], 1);
    assert_eq!(v["skipped"], 2);

    assert_page_shows(
        &child.log_events(),
        "refresh-token-revoked-or-expired",
        "invalid_grant",
    );
    assert_no_secrets(&[out, from_file, js, err], &stack.secrets());
}

/// A 429, then a refresh the IdP processed whose answer a gateway replaced
/// by a 502 page: `explain` shows "Rate limited" (a warning that healed)
/// and "Lost rotation behind a gateway 5xx" with its fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explains_rate_limit_then_gateway_lost_rotation() {
    let stack = Stack::start(StackOpts::default()).await;
    let (path, ports) = child_config(&stack, "proxy", "max_backoff = \"2s\"");
    let child = ChildProxy::start(stack.dir.path(), "run", &path, ports).await;
    stack.wait_generation(1, S(10)).await;
    stack.idp.push_fault(Fault::Status {
        status: 429,
        body: String::new(),
        content_type: "text/plain",
        headers: vec![("Retry-After".into(), "1".into())],
    });
    stack.idp.push_fault(Fault::LoseAnswer(502));
    wait_state(&client(), child.admin, "dead", S(15)).await;
    let logs = std::fs::read(&child.stderr).unwrap();

    let (code, out, err) = explain(&[], &logs);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("Lost rotation behind a gateway 5xx x1"),
        "{out}"
    );
    assert!(out.contains("Rate limited x1"), "{out}");
    assert!(out.contains("reason rate_limited, HTTP 429"), "{out}");
    assert!(
        out.contains("set introspection_url or reuse_grace"),
        "{out}"
    );
    // The dead cause comes first: it is what needs the human.
    let dead_at = out.find("Lost rotation behind").unwrap();
    assert!(dead_at < out.find("Rate limited").unwrap(), "{out}");
    let events = child.log_events();
    assert_page_shows(
        &events,
        "lost-rotation-behind-a-gateway-5xx",
        "lost_rotation",
    );
    assert_page_shows(&events, "rate-limited", "transient");
    stack.assert_no_reuse();
    assert_no_secrets(&[out, err], &stack.secrets());
}

/// `explain REASON` prints the entry (or every possible cause); an unknown
/// reason is a usage error listing the known ones.
#[test]
fn explains_one_reason() {
    let (code, out, _) = explain(&["seed_already_used"], b"");
    assert_eq!(code, Some(0));
    assert!(out.contains("Seed already used"), "{out}");
    assert!(out.contains("fix: "), "{out}");
    assert!(
        out.contains("docs/troubleshooting.md#seed-already-used"),
        "{out}"
    );

    let (code, out, _) = explain(&["invalid_grant"], b"");
    assert_eq!(code, Some(0));
    assert!(out.contains("invalid_grant has 3 possible causes"), "{out}");
    assert!(out.contains("Refresh token reused after rotation"), "{out}");

    let (code, js, _) = explain(&["--format", "json", "invalid_client"], b"");
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&js).unwrap();
    assert_eq!(v[0]["anchor"], "wrong-client-credentials-or-auth-method");

    let (code, _, err) = explain(&["no_such_reason"], b"");
    assert_eq!(code, Some(64));
    assert!(
        err.contains("unknown reason") && err.contains("lost_rotation"),
        "{err}"
    );

    let (code, _, err) = explain(&["-f", "/nonexistent/log"], b"");
    assert_eq!(code, Some(64));
    assert!(err.contains("/nonexistent/log"), "{err}");
}

/// Two replicas with a store each and the same seed: the second presents
/// the seed the first already rotated, the IdP detects the reuse and
/// revokes the family. Their logs together (`kubectl logs -l app=...`)
/// explain it as a reuse after rotation, with the one-writer fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explains_a_refresh_token_reused_by_a_second_replica() {
    let stack = Stack::start(StackOpts::default()).await;
    let (path_a, ports_a) = child_config(&stack, "replica-a", "");
    let a = ChildProxy::start(stack.dir.path(), "a", &path_a, ports_a).await;
    stack.wait_generation(1, S(10)).await;
    // Replica b: same credential and seed, its own store.
    let ports_b = (free_port(), free_port());
    let own_store = stack.dir.path().join("replica-b-tokens.json");
    let text = stack.toml(ports_b.0, ports_b.1, "").replace(
        &stack.store_path().display().to_string(),
        &own_store.display().to_string(),
    );
    let path_b = stack.dir.path().join("replica-b.toml");
    std::fs::write(&path_b, text).unwrap();
    let b = ChildProxy::start(stack.dir.path(), "b", &path_b, ports_b).await;
    wait_state(&client(), b.admin, "dead", S(10)).await;
    assert!(stack.idp.reuse_count() >= 1, "the IdP saw the reuse");

    let mut logs = std::fs::read(&a.stderr).unwrap();
    logs.extend(std::fs::read(&b.stderr).unwrap());
    let (code, out, err) = explain(&[], &logs);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("Refresh token reused after rotation x1"),
        "{out}"
    );
    assert!(
        out.contains("the log said: refresh token reuse detected; family revoked"),
        "{out}"
    );
    assert!(out.contains("Give the refresh token one writer"), "{out}");
    assert!(
        out.contains("docs/troubleshooting.md#refresh-token-reused-after-rotation"),
        "{out}"
    );
    assert!(
        out.contains(&format!("credential {CRED}: DEAD since")),
        "{out}"
    );
    assert_no_secrets(&[out, err], &stack.secrets());
}
