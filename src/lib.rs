//! tokenproxy: a sidecar reverse proxy that injects OAuth 2.0 access tokens
//! into plain-HTTP requests from a local service and forwards them over TLS,
//! refreshing the tokens itself without ever reusing a rotated refresh token.
//!
//! # Layout
//!
//! - [`admin`]: the admin listener (health, readiness, metrics, credential
//!   status, refresh, reload, the login endpoints' door).
//! - `admin_client`: the one client of a running proxy's admin API (`status`,
//!   `doctor`, `login`), sending `admin.token`.
//! - [`assertion`]: client assertions (RFC 7523): signing keys proven at
//!   load, per-request JWTs, federated token files.
//! - [`app`]: the composition root: builds and binds everything, returns
//!   the running [`app::App`].
//! - [`cli`]: argument parsing and the commands' wiring.
//! - [`config`]: raw TOML, validation, secret sources. Binds nothing.
//! - `demo`: `tokenproxy demo`, the self-contained playground.
//! - [`device`]: device login (RFC 8628): `login --device` and the admin
//!   `POST /credentials/<name>/device`, polling and installing.
//! - [`dev`]: a local IdP with strict rotation and an echo upstream, used by
//!   `demo` and by every test.
//! - [`discovery`]: RFC 8414 / OpenID metadata and one-off HTTPS fetches.
//! - `doctor`: the checklist that never spends a refresh token.
//! - `egress`: outbound connections, direct or through a CONNECT proxy.
//! - `live`: the handle the running parts share (`Live`): config,
//!   engine and proxy swapped on reload, readiness cache, pending logins.
//! - [`login`]: PKCE, state, the authorization URL, callback and code
//!   exchange (CLI and admin endpoints), and their HTML pages.
//! - `metrics`: the Prometheus registry.
//! - `net`: one answer for "is this host loopback?" and the hop-by-hop
//!   header table.
//! - `process`: exit codes and signals.
//! - [`proxy`]: listeners, router, header hygiene, forwarder, the one table
//!   that maps proxy errors to responses.
//! - [`secret`]: redacting newtypes; no token is a bare `String` elsewhere.
//! - `telemetry`: logging set-up (JSON lines or a human format).
//! - [`tls`]: rustls client configs and certificate and key loading.
//! - [`token`]: the engine (snapshot, single flight, schedule, state), the
//!   grant client and the store.
//! - [`token_fields`]: token-response values routes may use
//!   (`{token.instance_url}`) and the check each must pass.

pub mod admin;
mod admin_client;
pub mod app;
pub mod assertion;
pub mod cli;
pub mod config;
pub(crate) mod demo;
pub mod dev;
pub mod device;
pub mod discovery;
pub(crate) mod doctor;
pub mod dpop;
pub(crate) mod egress;
pub(crate) mod explain;
pub(crate) mod live;
pub mod login;
pub(crate) mod metrics;
pub(crate) mod net;
pub(crate) mod process;
pub mod providers;
pub mod proxy;
pub mod secret;
pub(crate) mod telemetry;
pub mod tls;
pub mod token;
pub mod token_fields;

/// An error and all its causes, `: `-separated. hyper's Display hides the
/// cause, so logs and messages use this.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    /// Dependencies allowed to close a cycle, each with why (none today).
    const TOLERATED: &[(&str, &str)] = &[];

    /// Top-level module → the top-level modules its code names as
    /// `crate::x` (`use crate::x::…`, `crate::x::f()`, `use crate::{x, y}`).
    fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files: BTreeMap<String, Vec<std::path::PathBuf>> = BTreeMap::new();
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                let mut stack = vec![path];
                while let Some(dir) = stack.pop() {
                    for e in std::fs::read_dir(dir).unwrap() {
                        let p = e.unwrap().path();
                        if p.is_dir() {
                            stack.push(p);
                        } else if p.extension().is_some_and(|x| x == "rs") {
                            files.entry(name.clone()).or_default().push(p);
                        }
                    }
                }
            } else if path.extension().is_some_and(|x| x == "rs") && name != "lib" && name != "main"
            {
                files.entry(name).or_default().push(path);
            }
        }
        let modules: BTreeSet<String> = files.keys().cloned().collect();
        let mut graph = BTreeMap::new();
        for (module, paths) in &files {
            let mut deps = BTreeSet::new();
            for path in paths {
                let text = std::fs::read_to_string(path).unwrap();
                for names in text.lines().map(code_of).map(crate_paths) {
                    deps.extend(names.into_iter().filter(|n| modules.contains(n)));
                }
            }
            deps.remove(module);
            graph.insert(module.clone(), deps);
        }
        graph
    }

    /// The line without its `//` comment (a `://` in a URL is not one).
    fn code_of(line: &str) -> &str {
        let b = line.as_bytes();
        let cut = (0..b.len().saturating_sub(1))
            .find(|&i| b[i] == b'/' && b[i + 1] == b'/' && (i == 0 || b[i - 1] != b':'));
        &line[..cut.unwrap_or(line.len())]
    }

    /// The first segment after each `crate::` (each name of a `crate::{…}`).
    fn crate_paths(code: &str) -> Vec<String> {
        let ident = |s: &str| -> String {
            s.trim_start()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        };
        let mut out = Vec::new();
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            match rest.strip_prefix('{') {
                Some(group) => {
                    // Top-level names of the group only: `a::{b, c}` gives `a`.
                    let (mut depth, mut start) = (0, true);
                    for (j, c) in group.char_indices() {
                        match c {
                            '{' => depth += 1,
                            '}' if depth == 0 => break,
                            '}' => depth -= 1,
                            ',' if depth == 0 => start = true,
                            c if start && !c.is_whitespace() => {
                                out.push(ident(&group[j..]));
                                start = false;
                            }
                            _ => {}
                        }
                    }
                }
                None => out.push(ident(rest)),
            }
        }
        out
    }

    /// A cycle in `graph`, as the path around it, if there is one.
    fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
        fn visit(
            n: &str,
            graph: &BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) -> Option<Vec<String>> {
            if let Some(at) = path.iter().position(|p| p == n) {
                let mut cycle = path[at..].to_vec();
                cycle.push(n.to_owned());
                return Some(cycle);
            }
            if done.contains(n) {
                return None;
            }
            path.push(n.to_owned());
            for d in graph.get(n).into_iter().flatten() {
                if let Some(c) = visit(d, graph, path, done) {
                    return Some(c);
                }
            }
            path.pop();
            done.insert(n.to_owned());
            None
        }
        let mut done = BTreeSet::new();
        graph
            .keys()
            .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
    }

    #[test]
    fn top_level_modules_import_no_cycle() {
        let mut graph = module_graph();
        // The parse works: known edges are seen.
        assert!(graph["admin"].contains("live"), "{graph:?}");
        assert!(graph["cli"].contains("process"), "{graph:?}");
        for (from, to) in TOLERATED {
            graph.get_mut(*from).map(|d| d.remove(*to));
        }
        if let Some(cycle) = find_cycle(&graph) {
            panic!(
                "import cycle between top-level modules: {}; move what both sides share into a module both can use",
                cycle.join(" -> ")
            );
        }
    }

    /// Inside `src/token`: each file (the engine's rooms as one, `engine`)
    /// → the token modules it names as `super::x` or `crate::token::x`.
    #[test]
    fn token_modules_import_no_cycle() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/token");
        let mut files: BTreeMap<String, Vec<std::path::PathBuf>> = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                for e in std::fs::read_dir(&p).unwrap() {
                    files
                        .entry(name.clone())
                        .or_default()
                        .push(e.unwrap().path());
                }
            } else if name != "mod" {
                files.entry(name).or_default().push(p);
            }
        }
        let modules: BTreeSet<String> = files.keys().cloned().collect();
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (module, paths) in &files {
            let mut deps = BTreeSet::new();
            for path in paths {
                // In the engine's rooms `super::` is the engine itself.
                let nested = path.parent() != Some(dir.as_path());
                let text = std::fs::read_to_string(path).unwrap();
                for line in text.lines().map(code_of) {
                    let line = line.replace("crate::token::", "crate::");
                    let line = if nested {
                        line
                    } else {
                        line.replace("super::", "crate::")
                    };
                    deps.extend(
                        crate_paths(&line)
                            .into_iter()
                            .filter(|n| modules.contains(n)),
                    );
                }
            }
            deps.remove(module);
            graph.insert(module.clone(), deps);
        }
        assert!(graph["pg"].contains("record"), "{graph:?}");
        assert!(graph["store"].contains("pg"), "{graph:?}");
        if let Some(cycle) = find_cycle(&graph) {
            panic!("import cycle inside src/token: {}", cycle.join(" -> "));
        }
    }

    #[test]
    fn the_cycle_check_sees_cycles_and_grouped_uses() {
        assert_eq!(
            crate_paths("use crate::{a::{b, c}, d}; crate::e::f(); x // crate::g"),
            ["a", "d", "e", "g"]
        );
        assert_eq!(
            code_of("let u = \"http://x\"; // crate::g"),
            "let u = \"http://x\"; "
        );
        let g = |edges: &[(&str, &str)]| {
            let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (a, b) in edges {
                m.entry(a.to_string()).or_default().insert(b.to_string());
            }
            m
        };
        assert_eq!(
            find_cycle(&g(&[("a", "b"), ("b", "c"), ("c", "a")])),
            Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
        );
        assert_eq!(find_cycle(&g(&[("a", "b"), ("a", "c"), ("b", "c")])), None);
    }

    #[test]
    fn error_chain_walks_sources() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let outer = crate::live::AppError::Bind {
            addr: "127.0.0.1:1".into(),
            source: inner,
        };
        assert_eq!(
            super::error_chain(&outer),
            "cannot listen on 127.0.0.1:1: refused"
        );
    }
}
