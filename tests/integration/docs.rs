//! Docs that cannot drift, each held to the real binary: the metrics table
//! (docs/operations.md) against a real scrape; the configuration reference
//! against the parser's own key lists; the CLI reference against `--help`;
//! every fenced `toml` snippet through `tokenproxy check`; the book's
//! SUMMARY.md against the pages; every relative link between pages (files
//! and anchors). `proxy.example.toml` passing `check` is
//! `cli::example_config_passes_check`.

use crate::harness::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every markdown page under docs/.
fn docs_pages() -> Vec<PathBuf> {
    let mut v = vec![];
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

/// README.md, deploy/README.md and every page under docs/.
fn pages() -> Vec<PathBuf> {
    let mut v = vec![root().join("README.md"), root().join("deploy/README.md")];
    v.extend(docs_pages());
    v
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The metrics table's page.
pub const METRICS_PAGE: &str = "docs/operations.md";

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
/// metrics table of docs/operations.md with its type, and the table names nothing the
/// proxy does not expose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_table_matches_a_real_scrape() {
    let stack = Stack::start(StackOpts::default()).await;
    let app = stack.app("").await;
    let c = client();
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
        // OpenMetrics names a counter family without its `_total` suffix
        // (the classic text format, served here, names it with).
        let name = match kind {
            "counter" if !name.ends_with("_total") => format!("{name}_total"),
            _ => name.to_owned(),
        };
        exposed.insert(name, kind.to_owned());
    }
    assert!(exposed.len() >= 10, "too few families: {scrape}");
    let table = metrics_table(&read(METRICS_PAGE));
    for (name, kind) in &exposed {
        assert_eq!(
            table.get(name),
            Some(kind),
            "{name} ({kind}) is missing from {METRICS_PAGE}'s metrics table, or has another type"
        );
    }
    for name in table.keys() {
        assert!(
            exposed.contains_key(name),
            "{METRICS_PAGE}'s metrics table lists {name}, which /metrics does not expose"
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

/// No relative link between README.md, deploy/README.md and docs/ points at a missing file
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

/// `tokenproxy ARGS...` with `env` and nothing inherited that could change a
/// config's meaning.
fn tokenproxy(args: &[&str], env: &BTreeMap<String, String>) -> CliRun {
    let out = Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
        .args(args)
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .output()
        .expect("run tokenproxy");
    CliRun {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The keys the parser accepts, per table (`""` for the top level,
/// `credentials.NAME`, `routes`), in the parser's own words: a key it does
/// not know in each table makes `check` answer "expected one of: ...",
/// which serde derives from the very structs that parse the file.
fn accepted_keys() -> BTreeMap<String, BTreeSet<String>> {
    const BOGUS: &str = "zz_not_a_key";
    let tables = [
        "",
        "[server]",
        "[admin]",
        "[store]",
        "[log]",
        "[credentials.x]",
        "[[routes]]",
    ];
    let text: String = tables
        .iter()
        .map(|t| format!("{t}\n{BOGUS} = 1\n"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("keys.toml");
    std::fs::write(&cfg, text).unwrap();
    let run = tokenproxy(&["check", "-c", cfg.to_str().unwrap()], &BTreeMap::new());
    assert_eq!(run.code, Some(64), "{}", run.text());
    let mut accepted = BTreeMap::new();
    for line in run.stderr.lines() {
        let Some((head, list)) = line.split_once("; expected one of: ") else {
            continue;
        };
        let Some((head, _)) = head.split_once(&format!(": unknown key \"{BOGUS}\"")) else {
            continue;
        };
        let path = head.rsplit_once(": ").map_or(head, |(_, p)| p);
        let table = path.strip_suffix(BOGUS).unwrap().trim_end_matches('.');
        let table = match table {
            "credentials.x" => "credentials.NAME",
            "routes[0]" => "routes",
            t => t,
        };
        let keys = list.split(", ").map(str::to_owned).collect();
        accepted.insert(table.to_owned(), keys);
    }
    assert_eq!(
        accepted.len(),
        tables.len(),
        "expected an unknown-key error per table: {}",
        run.stderr
    );
    accepted
}

/// The keys docs/configuration.md documents, per table: the first cell of
/// each table row under a `## `[table]`` heading (`## Top-level tables` for
/// the top level).
fn documented_keys(page: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut documented: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut table: Option<String> = None;
    let mut fenced = false;
    for line in page.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        if fenced {
            continue;
        }
        if let Some(h) = line.strip_prefix("## ") {
            table = if h == "Top-level tables" {
                Some(String::new())
            } else {
                h.strip_prefix('`')
                    .and_then(|h| h.strip_suffix('`'))
                    .map(|h| h.trim_matches(['[', ']']).to_owned())
            };
            continue;
        }
        let (Some(t), Some(row)) = (&table, line.strip_prefix("| `")) else {
            continue;
        };
        let key = row.split('`').next().unwrap();
        documented
            .entry(t.clone())
            .or_default()
            .insert(key.to_owned());
    }
    documented
}

/// Every key the parser accepts is in docs/configuration.md under its
/// table, and every key documented there is one the parser accepts.
#[test]
fn configuration_reference_matches_the_parser() {
    let accepted = accepted_keys();
    let documented = documented_keys(&read("docs/configuration.md"));
    let mut wrong = vec![];
    for (table, keys) in &accepted {
        let shown = if table.is_empty() {
            "the top level"
        } else {
            table
        };
        let doc = documented.get(table).cloned().unwrap_or_default();
        for k in keys.difference(&doc) {
            wrong.push(format!("{shown}: `{k}` is accepted but not documented"));
        }
        for k in doc.difference(keys) {
            wrong.push(format!(
                "{shown}: `{k}` is documented but the parser refuses it"
            ));
        }
    }
    for table in documented.keys().filter(|t| !accepted.contains_key(*t)) {
        wrong.push(format!(
            "[{table}] is documented but is not a table of the config"
        ));
    }
    assert!(
        wrong.is_empty(),
        "docs/configuration.md and the parser disagree:\n{}",
        wrong.join("\n")
    );
    let total: usize = accepted.values().map(BTreeSet::len).sum();
    assert!(total > 60, "too few keys: {accepted:?}");
}

/// A fenced code block: its info string, first line number and text.
struct Fence {
    info: String,
    line: usize,
    text: String,
}

/// Fenced code blocks, indented ones (inside list items) included.
fn fences(page: &str) -> Vec<Fence> {
    let mut v = vec![];
    let mut open: Option<(usize, Fence)> = None;
    for (i, line) in page.lines().enumerate() {
        let trimmed = line.trim_start();
        match &mut open {
            None => {
                if let Some(info) = trimmed.strip_prefix("```") {
                    let indent = line.len() - trimmed.len();
                    let info = info.trim().to_owned();
                    let (line, text) = (i + 2, String::new());
                    open = Some((indent, Fence { info, line, text }));
                }
            }
            Some((indent, f)) => {
                if trimmed == "```" {
                    v.push(open.take().unwrap().1);
                } else {
                    f.text.push_str(line.get(*indent..).unwrap_or(trimmed));
                    f.text.push('\n');
                }
            }
        }
    }
    assert!(open.is_none(), "unclosed code fence");
    v
}

/// What a snippet marked `toml fragment` is checked with: the credentials
/// the pages' examples use (`github`, `billing`), each appended unless the
/// fragment defines it, so a fragment showing a route or one table still
/// makes a whole config.
const FRAGMENT_CREDENTIALS: &[(&str, &str)] = &[
    (
        "github",
        r#"grant = "refresh_token"
token_url = "https://github.com/login/oauth/access_token"
client_id = "Iv1.docs"
client_secret = "docs-fragment-secret"
refresh_token = "docs-fragment-seed"
"#,
    ),
    (
        "billing",
        r#"grant = "client_credentials"
token_url = "https://auth.example.com/oauth/token"
client_id = "billing-docs"
client_secret = "docs-fragment-secret"
"#,
    ),
];

fn complete_fragment(fragment: &str) -> String {
    let mut config = fragment.to_owned();
    for (name, body) in FRAGMENT_CREDENTIALS {
        let header = format!("[credentials.{name}]");
        if !fragment.contains(&header) {
            config.push_str(&format!("\n{header}\n{body}"));
        }
    }
    config
}

/// A dummy value for each `${VAR}` a snippet uses, shaped like what the
/// variable holds where the parser checks the shape.
fn dummy_env(snippet: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for (at, _) in snippet.match_indices("${") {
        let rest = &snippet[at + 2..];
        let end = rest.find(['}', ':']).unwrap_or(rest.len());
        let name = &rest[..end];
        let value = if name.ends_with("DATABASE_URL") {
            "postgres://tokenproxy@db.example.com/tokenproxy".to_owned()
        } else if name.ends_with("HTTPS_PROXY") {
            "http://proxy.example.com:3128".to_owned()
        } else {
            format!("dummy-{}", name.to_lowercase())
        };
        env.insert(name.to_owned(), value);
    }
    env
}

/// Every fenced `toml` snippet in README.md and docs/ passes
/// `tokenproxy check`, with a dummy value for each `${VAR}` and a dummy file
/// for each relative `*_file`. A snippet whose info string is
/// `toml fragment` is checked as `complete_fragment` completes it.
#[test]
fn toml_snippets_pass_check() {
    let mut checked = 0;
    let mut failed = vec![];
    let mut files = vec![root().join("README.md")];
    files.extend(docs_pages());
    for page in files {
        let shown = page.strip_prefix(root()).unwrap().display().to_string();
        let text = std::fs::read_to_string(&page).unwrap();
        for fence in fences(&text) {
            let mut words = fence.info.split_whitespace();
            if words.next() != Some("toml") {
                continue;
            }
            let fragment = words.any(|w| w == "fragment");
            let dir = tempfile::tempdir().unwrap();
            for line in fence.text.lines() {
                let Some((key, value)) = line.split_once('=') else {
                    continue;
                };
                let value = value
                    .split('#')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .trim_matches('"');
                // A key `check` proves able to sign: a real one (the dev IdP's test key).
                let key_file = match key.trim() {
                    "client_assertion_key" => Some(tokenproxy::dev::tls::testdata::RSA_KEY),
                    "client_assertion_cert" => Some(tokenproxy::dev::tls::testdata::RSA_CERT),
                    _ => None,
                };
                if let (Some(pem), false) = (key_file, value.starts_with('/')) {
                    std::fs::write(dir.path().join(value), pem).unwrap();
                } else if key.trim().ends_with("_file") && !value.starts_with('/') {
                    let p = dir.path().join(value);
                    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                    std::fs::write(p, "dummy-file-secret\n").unwrap();
                }
            }
            let config = if fragment {
                complete_fragment(&fence.text)
            } else {
                fence.text.clone()
            };
            let cfg = dir.path().join("snippet.toml");
            std::fs::write(&cfg, &config).unwrap();
            let run = tokenproxy(&["check", "-c", cfg.to_str().unwrap()], &dummy_env(&config));
            checked += 1;
            if run.code != Some(0) {
                let kind = if fragment { " (fragment)" } else { "" };
                failed.push(format!(
                    "{shown}:{}{kind}:\n{}",
                    fence.line,
                    run.stderr.trim_end()
                ));
            }
        }
    }
    assert!(checked >= 5, "too few toml snippets: {checked}");
    assert!(
        failed.is_empty(),
        "toml snippets that `tokenproxy check` refuses (mark a partial one ```toml fragment):\n{}",
        failed.join("\n\n")
    );
}

/// Every page under docs/ is in the book's SUMMARY.md, and every entry
/// there is a page.
#[test]
fn summary_lists_every_page() {
    let docs = root().join("docs");
    let summary = read("docs/SUMMARY.md");
    let listed: BTreeSet<PathBuf> = links(&summary)
        .into_iter()
        .map(|l| docs.join(l.split('#').next().unwrap()))
        .collect();
    let pages: BTreeSet<PathBuf> = docs_pages()
        .into_iter()
        .filter(|p| !p.ends_with("SUMMARY.md"))
        .collect();
    let missing: Vec<_> = pages.difference(&listed).collect();
    let dangling: Vec<_> = listed.difference(&pages).collect();
    assert!(
        missing.is_empty() && dangling.is_empty(),
        "docs/SUMMARY.md misses {missing:?}; lists pages that do not exist: {dangling:?}"
    );
    assert!(listed.len() >= 10, "too few entries: {listed:?}");
}

/// The subcommands a `--help` lists (without clap's `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

/// The flags (`-c`, `--config`) and argument names (`NAME`) a `--help`
/// lists, without `-h`/`--help`.
fn flags_and_args(help: &str) -> Vec<String> {
    let mut v = vec![];
    let mut section = "";
    for line in help.lines() {
        if !line.starts_with(' ') {
            section = line.trim();
            continue;
        }
        // The left column ends where the description starts (two spaces).
        let left = line.trim_start().split("  ").next().unwrap_or("");
        match section {
            "Options:" => v.extend(
                left.split([' ', ','])
                    .filter(|w| w.starts_with('-') && !matches!(*w, "-h" | "--help"))
                    .map(str::to_owned),
            ),
            "Arguments:" => v.push(left.trim_matches(['<', '>', '[', ']', '.']).to_owned()),
            _ => {}
        }
    }
    v
}

/// The text of the section headed `` `tokenproxy <command>` `` (up to the
/// next heading of the same or a higher level).
fn cli_section<'a>(page: &'a str, command: &str) -> Option<&'a str> {
    let heading = format!(" `tokenproxy {command}`");
    let mut level = 0;
    let mut start = None;
    let mut offset = 0;
    let mut fenced = false;
    for line in page.split_inclusive('\n') {
        let here = offset;
        offset += line.len();
        if line.starts_with("```") {
            fenced = !fenced;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let hashes = line.len() - line.trim_start_matches('#').len();
        match start {
            None if line.trim_start_matches('#').trim_end() == heading => {
                level = hashes;
                start = Some(here);
            }
            Some(s) if hashes <= level => return Some(&page[s..here]),
            _ => {}
        }
    }
    start.map(|s| &page[s..])
}

/// Every subcommand of the real `tokenproxy --help` (and `store --help`)
/// has a section in docs/cli.md naming each of its flags and arguments, and
/// every `tokenproxy ...` section there is a real command.
#[test]
fn cli_reference_covers_every_command_and_flag() {
    let page = read("docs/cli.md");
    let none = BTreeMap::new();
    let help = |args: &[&str]| {
        let mut args = args.to_vec();
        args.push("--help");
        let run = tokenproxy(&args, &none);
        assert_eq!(run.code, Some(0), "{args:?}: {}", run.text());
        run.stdout
    };
    let mut commands = vec![];
    for top in subcommands(&help(&[])) {
        let subs = subcommands(&help(&[&top]));
        commands.push(top.clone());
        commands.extend(subs.into_iter().map(|s| format!("{top} {s}")));
    }
    assert!(commands.len() >= 10, "too few commands: {commands:?}");
    let mut missing = vec![];
    for command in &commands {
        let Some(section) = cli_section(&page, command) else {
            missing.push(format!("no section `tokenproxy {command}`"));
            continue;
        };
        let args: Vec<&str> = command.split(' ').collect();
        for flag in flags_and_args(&help(&args)) {
            if !section.contains(&flag) {
                missing.push(format!("`tokenproxy {command}`: {flag} is not described"));
            }
        }
    }
    for line in page.lines().filter(|l| l.starts_with('#')) {
        if let Some(c) = line.split_once(" `tokenproxy ").map(|(_, c)| c) {
            let c = c.trim_end().trim_end_matches('`');
            if !commands.iter().any(|k| k == c) {
                missing.push(format!(
                    "docs/cli.md describes `tokenproxy {c}`, which --help does not list"
                ));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/cli.md and the binary disagree:\n{}",
        missing.join("\n")
    );
}
