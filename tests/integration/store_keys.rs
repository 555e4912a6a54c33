//! File-store encryption keys through the real binary: rotation with
//! `store.previous_encryption_keys` and `tokenproxy store rekey`.

use crate::harness::*;
use std::path::PathBuf;
use std::time::Duration;

const KEY_A: &str = "file-key-A-0b7c3e91d2";
const KEY_B: &str = "file-key-B-6f2a8d05e4";

fn keyed_config(
    stack: &Stack,
    name: &str,
    current: &str,
    previous: &[&str],
) -> (PathBuf, (u16, u16)) {
    let (path, ports) = child_config(stack, name, "");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, with_store_keys(&text, current, previous)).unwrap();
    (path, ports)
}

/// Sealed under A; B with A as a previous key serves the stored token
/// without a grant; `store rekey` reseals the file under B; then B alone
/// serves and A alone refuses to start, naming B's key id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_key_rotation_then_rekey() {
    // Tokens outlive the test: any grant after the first is a failure.
    let stack = Stack::start(StackOpts {
        access_ttl: Duration::from_secs(600),
        ..StackOpts::default()
    })
    .await;
    let dir = stack.dir.path();
    let c = client();
    let raw = || std::fs::read_to_string(stack.record_path()).unwrap();

    let (a_cfg, a_ports) = keyed_config(&stack, "key-a", KEY_A, &[]);
    let mut a = ChildProxy::start(dir, "key-a", &a_cfg, a_ports).await;
    let access = bearer(&get_ok(&c, &a.url("/api/x")).await);
    a.kill9();
    // A passphrase's key id depends on the store's salt: B reseals with it.
    let (kid_a, kid_b) = (key_id(KEY_A, &raw()), key_id(KEY_B, &raw()));
    assert!(raw().contains(&format!("\"tpv3:{kid_a}:")), "{}", raw());
    let grants = stack.idp.grants().len();

    let (ab_cfg, ab_ports) = keyed_config(&stack, "key-b-a", KEY_B, &[KEY_A]);
    let ab = ChildProxy::start(dir, "key-b-a", &ab_cfg, ab_ports).await;
    let g = get_ok(&c, &ab.url("/api/x")).await;
    assert_eq!((g.status, bearer(&g)), (200, access.clone()));
    assert_eq!(stack.idp.grants().len(), grants, "no grant");

    let rekey = rekey_ok(&ab_cfg, CRED, &kid_b);
    let sealed = raw();
    assert!(
        sealed.contains(&format!("\"tpv3:{kid_b}:")) && !sealed.contains(&kid_a),
        "{sealed}"
    );
    let mut tokens = stack.presented();
    tokens.extend([stack.seed.clone(), access.clone()]);
    for t in &tokens {
        assert!(!sealed.contains(t.as_str()), "a token in clear");
    }
    drop(ab);

    let (b_cfg, b_ports) = keyed_config(&stack, "key-b", KEY_B, &[]);
    let b = ChildProxy::start(dir, "key-b", &b_cfg, b_ports).await;
    let g = get_ok(&c, &b.url("/api/x")).await;
    assert_eq!((g.status, bearer(&g)), (200, access.clone()));
    drop(b);

    let (a_only, _) = keyed_config(&stack, "key-a-only", KEY_A, &[]);
    let failed = run_until_exit(dir, "key-a-only", &a_only, Duration::from_secs(20)).await;
    assert_eq!(failed.code, Some(1), "{}", failed.text());
    assert!(
        failed
            .text()
            .contains(&format!("sealed with key id {kid_b}")),
        "{}",
        failed.text()
    );
    assert_eq!(raw(), sealed, "never overwritten");

    // Without a key there is nothing to seal under: a usage error.
    let (plain, _) = child_config(&stack, "plain", "");
    let no_key = run_cli(&[
        "store".as_ref(),
        "rekey".as_ref(),
        "-c".as_ref(),
        plain.as_os_str(),
    ]);
    assert_eq!(no_key.code, Some(64), "{}", no_key.text());
    assert!(
        no_key.stderr.contains("encryption_key"),
        "{}",
        no_key.text()
    );

    assert_eq!(stack.idp.grants().len(), grants, "no grant in all of it");
    let mut secrets = stack.secrets();
    secrets.extend([KEY_A.to_owned(), KEY_B.to_owned(), access]);
    let outputs: Vec<String> = ["key-a", "key-b-a", "key-b", "key-a-only"]
        .iter()
        .flat_map(|l| ["stdout", "stderr"].map(|k| dir.join(format!("{l}.{k}"))))
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .chain([rekey.text(), no_key.text()])
        .collect();
    assert_no_secrets(&outputs, &secrets);
}
