//! Docs that cannot drift: the metrics table against a real scrape, and
//! every relative link between README.md and docs/ (files and anchors).
//! `proxy.example.toml` passing `check` is `cli::example_config_passes_check`.

use crate::harness::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every page under docs/.
fn pages() -> Vec<PathBuf> {
    let mut v = vec![root().join("README.md")];
    let mut dirs = vec![root().join("docs")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "md") {
                v.push(p);
            }
        }
    }
    v.sort();
    v
}

/// The `| `metric{labels}` | type |` rows of the metrics table: name → type.
pub fn metrics_table(text: &str) -> BTreeMap<String, String> {
    let mut rows = BTreeMap::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 || !cells[1].starts_with("`tokenproxy_") {
            continue;
        }
        let name = cells[1].trim_matches('`');
        let name = name.split('{').next().unwrap();
        rows.insert(name.to_owned(), cells[2].to_owned());
    }
    rows
}

/// Every series family a running proxy exposes on `/metrics` is in the
/// README's metrics table with its type, and the table names nothing the
/// proxy does not expose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_table_matches_a_real_scrape() {
    let stack = Stack::start(StackOpts::default()).await;
    let app = stack.app("").await;
    let c = http();
    // One request and one refresh, so per-route and per-credential families
    // have samples too.
    stack
        .wait_generation(1, std::time::Duration::from_secs(10))
        .await;
    let _ = get_ok(&c, &format!("http://{}/api/x", app.proxy_addr.unwrap())).await;
    let scrape = get_ok(&c, &format!("http://{}/metrics", app.admin_addr.unwrap()))
        .await
        .text();
    let mut exposed = BTreeMap::new();
    for line in scrape.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        // OpenMetrics names a counter family without its `_total` suffix.
        let name = match kind {
            "counter" => format!("{name}_total"),
            _ => name.to_owned(),
        };
        exposed.insert(name, kind.to_owned());
    }
    assert!(exposed.len() >= 10, "too few families: {scrape}");
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let table = metrics_table(&readme);
    for (name, kind) in &exposed {
        assert_eq!(
            table.get(name),
            Some(kind),
            "{name} ({kind}) is missing from the README's metrics table, or has another type"
        );
    }
    for name in table.keys() {
        assert!(
            exposed.contains_key(name),
            "the README's metrics table lists {name}, which /metrics does not expose"
        );
    }
    app.shutdown().await;
}

/// GitHub's heading anchors: lowercase; spaces to `-`; punctuation other
/// than `-` and `_` dropped (backticks too).
pub fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Headings' anchors of a markdown page (outside fenced code).
pub fn anchors(text: &str) -> Vec<String> {
    let mut fenced = false;
    let mut v = vec![];
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            v.push(slug(line.trim_start_matches('#')));
        }
    }
    v
}

/// `](target)` links outside fenced code.
fn links(text: &str) -> Vec<String> {
    let mut fenced = false;
    let mut v = vec![];
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        for (at, _) in line.match_indices("](") {
            let rest = &line[at + 2..];
            if let Some(end) = rest.find(')') {
                v.push(rest[..end].to_owned());
            }
        }
    }
    v
}

/// No relative link between README.md and docs/ points at a missing file
/// or a missing heading.
#[test]
fn relative_links_between_pages_resolve() {
    let mut broken = vec![];
    let mut checked = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for link in links(&text) {
            if link.contains("://") || link.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (file, anchor) = match link.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (link.as_str(), None),
            };
            let target = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap_or(Path::new(".")).join(file)
            };
            let shown = page.strip_prefix(root()).unwrap().display().to_string();
            if !target.exists() {
                broken.push(format!("{shown}: {link} (no such file)"));
                continue;
            }
            if let Some(a) = anchor {
                if target.extension().is_some_and(|x| x == "md") {
                    let t = std::fs::read_to_string(&target).unwrap();
                    if !anchors(&t).iter().any(|h| h == a) {
                        broken.push(format!("{shown}: {link} (no such heading)"));
                    }
                }
            }
        }
    }
    assert!(checked > 10, "too few links found: {checked}");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}
