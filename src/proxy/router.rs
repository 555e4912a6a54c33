//! The router: request-path safety checks, then the route with the longest
//! `path_prefix` (on segment boundaries) whose optional `host` matches.
//!
//! Unsafe paths are rejected, never normalised: `/github/../admin` must not
//! reach another route, nor another path on the upstream. Knows nothing of
//! tokens or upstreams; it hands back an index into the route table.

use percent_encoding::percent_decode_str;

/// Why a path was refused (the text goes into the 400 body; it is static).
pub(crate) fn check_path(path: &str) -> Result<(), &'static str> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err("the request target must be an absolute path");
    };
    if path.bytes().any(|b| b < 0x20 || b == 0x7f || b == b'\\') {
        return Err("control characters and backslashes are not allowed in the path");
    }
    if rest.is_empty() {
        return Ok(());
    }
    let mut segments = rest.split('/').peekable();
    while let Some(seg) = segments.next() {
        // A trailing slash leaves one empty final segment: fine. `//` is not.
        if seg.is_empty() && segments.peek().is_some() {
            return Err("empty path segments (//) are not allowed");
        }
        check_segment(seg)?;
    }
    Ok(())
}

fn check_segment(seg: &str) -> Result<(), &'static str> {
    let bytes = seg.as_bytes();
    if !bytes.contains(&b'%') {
        // Nothing encoded: `check_path` already refused the raw bytes that
        // could hurt, and a segment holds no `/`.
        return check_dot_segment(bytes);
    }
    // Every `%` must start a valid escape; encoded separators are refused.
    let mut i = 0;
    while let Some(off) = bytes[i..].iter().position(|&b| b == b'%') {
        let at = i + off;
        let hex = bytes
            .get(at + 1..at + 3)
            .ok_or("malformed percent-encoding in the path")?;
        if !hex.iter().all(u8::is_ascii_hexdigit) {
            return Err("malformed percent-encoding in the path");
        }
        i = at + 3;
    }
    let decoded: Vec<u8> = percent_decode_str(seg).collect();
    if decoded.iter().any(|&b| b == b'/' || b == b'\\') {
        return Err("encoded slashes (%2F, %5C) are not allowed in the path");
    }
    if decoded.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err("encoded control characters are not allowed in the path");
    }
    check_dot_segment(&decoded)
}

fn check_dot_segment(decoded: &[u8]) -> Result<(), &'static str> {
    // `..;jsessionid` is `..` to some servers (path parameters).
    let name = decoded.split(|&b| b == b';').next().unwrap_or(&[]);
    if name == b"." || name == b".." {
        return Err("dot-segments (. and ..) are not allowed in the path");
    }
    Ok(())
}

/// The routes of one `path_prefix`, host-specific ones first, then config
/// order.
#[derive(Debug, Default)]
struct Candidates {
    routes: Vec<(Option<String>, usize)>,
}

/// Routes by prefix: a request looks up each of its path's segment
/// boundaries, longest first, so the cost grows with the path's depth, not
/// with the number of routes.
#[derive(Debug)]
pub(crate) struct Router {
    /// Keyed by the prefix without its trailing `/` (`/` is ""), so that a
    /// request's path can be looked up by slices of it, with no copy.
    by_prefix: std::collections::HashMap<String, Candidates>,
}

impl Router {
    /// `routes`: `(path_prefix, host)` in config order; indexes refer to it.
    /// Every prefix ends with `/` (the config normalises them).
    pub(crate) fn new<'a>(routes: impl IntoIterator<Item = (&'a str, Option<&'a str>)>) -> Self {
        let mut by_prefix: std::collections::HashMap<String, Candidates> = Default::default();
        for (index, (prefix, host)) in routes.into_iter().enumerate() {
            let key = prefix.strip_suffix('/').unwrap_or(prefix);
            by_prefix
                .entry(key.to_owned())
                .or_default()
                .routes
                .push((host.map(str::to_ascii_lowercase), index));
        }
        for c in by_prefix.values_mut() {
            // Stable: ties keep config order.
            c.routes.sort_by_key(|(host, _)| host.is_none());
        }
        Router { by_prefix }
    }

    /// `host` is lower-cased without port; `path` passed [`check_path`].
    /// The route with the longest prefix on a segment boundary whose host
    /// matches: `/github/` takes `/github`, `/github/` and `/github/x`,
    /// never `/githubx`.
    pub(crate) fn find(&self, host: &str, path: &str) -> Option<usize> {
        let in_prefix = |key: &str| {
            self.by_prefix
                .get(key)?
                .routes
                .iter()
                .find(|(h, _)| h.as_deref().is_none_or(|h| h == host))
                .map(|(_, i)| *i)
        };
        let bytes = path.as_bytes();
        // `/github` is `/github/`'s own path; then every `/`, from the end.
        let whole = (!path.ends_with('/')).then_some(path.len());
        whole
            .into_iter()
            .chain((0..bytes.len()).rev().filter(|&k| bytes[k] == b'/'))
            .find_map(|k| in_prefix(&path[..k]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The router before the prefix index: a scan of every route, longest
    /// prefix first, host-specific first on a tie, then config order.
    fn find_by_scan(routes: &[(&str, Option<&str>)], host: &str, path: &str) -> Option<usize> {
        let mut order: Vec<usize> = (0..routes.len()).collect();
        order.sort_by(|&a, &b| {
            let (pa, ha) = routes[a];
            let (pb, hb) = routes[b];
            pb.len()
                .cmp(&pa.len())
                .then(hb.is_some().cmp(&ha.is_some()))
        });
        order.into_iter().find(|&i| {
            let (prefix, h) = routes[i];
            h.is_none_or(|h| h.eq_ignore_ascii_case(host))
                && (path.starts_with(prefix) || path == &prefix[..prefix.len() - 1])
        })
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("ab".to_owned()),
            Just("a.b".to_owned())
        ]
    }

    fn prefix() -> impl Strategy<Value = String> {
        proptest::collection::vec(segment(), 0..4).prop_map(|s| {
            let mut p = String::from("/");
            for seg in s {
                p.push_str(&seg);
                p.push('/');
            }
            p
        })
    }

    proptest! {
        #[test]
        fn the_index_picks_what_a_scan_of_every_route_picks(
            routes in proptest::collection::vec(
                (prefix(), proptest::option::of(prop_oneof![Just("x.test"), Just("Y.test")])),
                0..12,
            ),
            path in proptest::collection::vec(segment(), 0..5),
            trailing in any::<bool>(),
            host in prop_oneof![Just("x.test"), Just("y.test"), Just("z.test")],
        ) {
            let mut p = String::new();
            for seg in &path {
                p.push('/');
                p.push_str(seg);
            }
            if trailing || p.is_empty() {
                p.push('/');
            }
            let table: Vec<(&str, Option<&str>)> =
                routes.iter().map(|(p, h)| (p.as_str(), *h)).collect();
            let router = Router::new(table.iter().copied());
            prop_assert_eq!(router.find(host, &p), find_by_scan(&table, host, &p), "{} {}", host, p);
        }
    }

    #[test]
    fn safe_paths_pass() {
        for p in [
            "/",
            "/github/",
            "/github/user",
            "/a/b/c/",
            "/a/%20b",
            "/a/b.json",
            "/a/...",
            "/a/.well-known/x",
            "/a/%7Euser",
            "/a/b;v=1",
            "/a/%2e%2e%2e",
        ] {
            assert_eq!(check_path(p), Ok(()), "{p}");
        }
    }

    #[test]
    fn traversal_and_ambiguity_rejected() {
        for p in [
            "/a/../b",
            "/a/..",
            "/..",
            "/a/./b",
            "/a/.",
            "/a/%2e%2e/b",
            "/a/%2E%2E/b",
            "/a/%2E./b",
            "/a/.%2e/b",
            "/a/%2e/b",
            "/a/..;x=1/b",
            "/a/%2fb",
            "/a/%2F../b",
            "/a/%5cb",
            "/a/%5C..",
            "/a\\..\\b",
            "/a//b",
            "//evil.com/x",
            "/a/%00b",
            "/a/%0ab",
            "/a/%7f",
            "/a/%zz",
            "/a/%2",
            "/a/b%",
            "*",
            "",
            "a/b",
        ] {
            assert!(check_path(p).is_err(), "{p} should be rejected");
        }
        assert!(check_path("/a/\u{1}b").is_err());
    }

    fn router() -> Router {
        Router::new([
            ("/", None),
            ("/github/", None),
            ("/github/orgs/", None),
            ("/github/", Some("gh.localhost")),
            ("/git/", None),
        ])
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let r = router();
        assert_eq!(r.find("localhost", "/github/user"), Some(1));
        assert_eq!(r.find("localhost", "/github"), Some(1));
        assert_eq!(r.find("localhost", "/github/"), Some(1));
        assert_eq!(r.find("localhost", "/github/orgs/x"), Some(2));
        assert_eq!(r.find("localhost", "/github/orgs"), Some(2));
        assert_eq!(r.find("localhost", "/github/orgsx"), Some(1));
        assert_eq!(r.find("localhost", "/githubx"), Some(0));
        assert_eq!(r.find("localhost", "/git/x"), Some(4));
        assert_eq!(r.find("localhost", "/gitx"), Some(0));
        assert_eq!(r.find("localhost", "/"), Some(0));
    }

    #[test]
    fn host_specific_route_wins_for_its_host_only() {
        let r = router();
        assert_eq!(r.find("gh.localhost", "/github/user"), Some(3));
        assert_eq!(r.find("other.localhost", "/github/user"), Some(1));
        // The longer host-less prefix still beats a shorter host route.
        assert_eq!(r.find("gh.localhost", "/github/orgs/x"), Some(2));
    }

    #[test]
    fn no_route() {
        let r = Router::new([("/github/", None), ("/x/", Some("x.localhost"))]);
        assert_eq!(r.find("localhost", "/other"), None);
        assert_eq!(r.find("localhost", "/x/y"), None);
        assert_eq!(r.find("x.localhost", "/x/y"), Some(1));
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 3986 §5.2.4 on a fully percent-decoded path: what the most
    /// lenient upstream could make of it.
    fn resolve(path: &[u8]) -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = Vec::new();
        for seg in path.split(|&b| b == b'/' || b == b'\\') {
            match seg {
                b"." | b"" => {}
                b".." => {
                    out.pop();
                }
                s => out.push(s.to_vec()),
            }
        }
        out
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("..".to_owned()),
            Just(".".to_owned()),
            Just("".to_owned()),
            Just("%2e%2e".to_owned()),
            Just("%2E.".to_owned()),
            Just("%2f".to_owned()),
            Just("%5c".to_owned()),
            Just("%c0%ae".to_owned()),
            Just("%25".to_owned()),
            Just("..;x".to_owned()),
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("api".to_owned()),
            "[a-z0-9._~%;\\\\-]{0,6}",
        ]
    }

    fn path() -> impl Strategy<Value = String> {
        proptest::collection::vec(segment(), 0..8).prop_map(|s| format!("/{}", s.join("/")))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// A path the check accepts and the router maps to a prefix stays
        /// under that prefix even after decoding and dot-segment removal.
        #[test]
        fn never_maps_a_path_outside_its_prefix(p in path()) {
            let router = Router::new([("/a/", None), ("/a/b/", None), ("/api/", None)]);
            let prefixes = ["/a/", "/a/b/", "/api/"];
            if check_path(&p).is_ok() {
                if let Some(i) = router.find("localhost", &p) {
                    let prefix = prefixes[i];
                    prop_assert!(p.starts_with(prefix) || p == prefix[..prefix.len() - 1]);
                    let decoded: Vec<u8> = percent_decode_str(&p).collect();
                    let resolved = resolve(&decoded);
                    let want = resolve(prefix.as_bytes());
                    prop_assert!(resolved.starts_with(&want), "{p} resolves outside {prefix}");
                    // The upstream-side path after stripping the prefix
                    // cannot climb out either.
                    let rest = &p[prefix.len().min(p.len())..];
                    let rest: Vec<u8> = percent_decode_str(rest).collect();
                    prop_assert!(!rest.split(|&b| b == b'/').any(|s| s == b".."));
                }
            }
        }

        /// The check is a pure function of the path, never panics, and
        /// whatever it accepts stays accepted with a trailing segment added
        /// (so a prefix cannot be accepted while its extension is not by
        /// accident of position).
        #[test]
        fn check_is_consistent(p in path(), extra in "[a-z]{1,4}") {
            let first = check_path(&p);
            prop_assert_eq!(first, check_path(&p));
            if first.is_ok() && !p.ends_with('/') {
                let longer = format!("{p}/{extra}");
                prop_assert!(check_path(&longer).is_ok(), "{}", longer);
            }
        }

        /// Arbitrary bytes: never a panic.
        #[test]
        fn check_never_panics(p in "\\PC{0,40}") {
            let _ = check_path(&p);
        }
    }
}
