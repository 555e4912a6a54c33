//! Header hygiene: the hop-by-hop table (RFC 9110 §7.6.1), the Host/Origin
//! allowlist that keeps web pages from borrowing the sidecar's tokens (DNS
//! rebinding, CSRF), request ids, and the `Location`/`Link` rewriting that
//! keeps pagination going through the proxy.
//!
//! Pure functions over header maps and strings; no I/O, no tokens.

use http::header::{CONNECTION, TE, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue};
use std::collections::HashSet;
use std::net::IpAddr;

use crate::net::HOP_BY_HOP;

/// Whether `name` is always hop-by-hop (`Connection` or the table above;
/// not `TE`, which may survive as `trailers`).
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == CONNECTION || HOP_BY_HOP.iter().any(|h| h == name)
}

/// Strip hop-by-hop headers. With `tunnel`, `Upgrade` survives and
/// `Connection` is reduced to `upgrade` (RFC 9110 §7.8).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, tunnel: bool) {
    // One pass over the names instead of a hash lookup per hop-by-hop name:
    // most messages carry none, or only `Connection: keep-alive`.
    let mut present = [false; HOP_BY_HOP.len()];
    let (mut connection, mut te) = (false, false);
    for name in headers.keys() {
        if name == CONNECTION {
            connection = true;
        } else if name == TE {
            te = true;
        } else if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        }
    }
    if connection {
        // Names the sender marked as hop-by-hop for this connection only.
        // Bytes, not `to_str`: one obs-text byte must not hide the list.
        // `close` names no header; `keep-alive` is in HOP_BY_HOP anyway.
        let listed: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.eq_ignore_ascii_case(b"close") && !t.eq_ignore_ascii_case(b"keep-alive"))
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .collect();
        headers.remove(CONNECTION);
        for name in listed {
            if tunnel && name == UPGRADE {
                continue;
            }
            headers.remove(name);
        }
    }
    for (name, present) in HOP_BY_HOP.iter().zip(present) {
        if present && !(tunnel && name == UPGRADE) {
            headers.remove(name);
        }
    }
    if tunnel {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if te {
        // gRPC needs `TE: trailers` end to end; anything else is hop-by-hop.
        let trailers = headers
            .get_all(TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| {
                t.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("trailers")
            });
        headers.remove(TE);
        if trailers {
            headers.insert(TE, HeaderValue::from_static("trailers"));
        }
    }
}

/// Whether the request asks for a protocol upgrade (HTTP/1.1 only).
pub(crate) fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE)
        && headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The host part of a `Host`/`:authority` value: lower-cased, without port
/// or trailing dot, IPv6 in brackets. None when malformed.
pub(crate) fn host_of(authority: &str) -> Option<String> {
    let a: http::uri::Authority = authority.parse().ok()?;
    if a.as_str().contains('@') {
        return None;
    }
    let host = a.host().trim_end_matches('.');
    if host.is_empty() {
        return None;
    }
    Some(host.to_ascii_lowercase())
}

/// Which `Host` values may reach the routes: loopback names, listen
/// addresses, `server.hosts` and the routes' hosts. Built once.
#[derive(Debug, Default)]
pub(crate) struct HostPolicy {
    extra: HashSet<String>,
}

impl HostPolicy {
    pub(crate) fn new(names: impl IntoIterator<Item = String>) -> Self {
        HostPolicy {
            extra: names
                .into_iter()
                .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
        }
    }

    /// Format an IP the way it appears as a Host (IPv6 in brackets).
    pub(crate) fn ip_name(ip: IpAddr) -> String {
        match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        }
    }

    /// `host` as returned by [`host_of`].
    pub(crate) fn allows(&self, host: &str) -> bool {
        crate::net::is_loopback_host(host) || self.extra.contains(host)
    }
}

/// The host of an `Origin` header (RFC 6454), or None for `null` and
/// anything unparsable (both refused by the caller).
pub(crate) fn origin_host(origin: &HeaderValue) -> Option<String> {
    let s = origin.to_str().ok()?;
    let uri: http::Uri = s.parse().ok()?;
    uri.scheme()?;
    host_of(uri.authority()?.as_str())
}

static SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

/// A browser request marked cross-site: `Sec-Fetch-Site: cross-site` or
/// `same-site` (another subdomain), or an `Origin` whose host `hosts` does
/// not allow (`null` included). A web page must not borrow the sidecar.
pub(crate) fn is_cross_site(h: &HeaderMap, hosts: &HostPolicy) -> bool {
    if let Some(v) = h.get(&SEC_FETCH_SITE) {
        let v = v.as_bytes();
        if v.eq_ignore_ascii_case(b"cross-site") || v.eq_ignore_ascii_case(b"same-site") {
            return true;
        }
    }
    match h.get(http::header::ORIGIN) {
        Some(origin) => !origin_host(origin).is_some_and(|host| hosts.allows(&host)),
        None => false,
    }
}

/// A valid incoming `x-request-id`, else a fresh one (16 hex digits).
pub(crate) fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(super::error::X_REQUEST_ID.clone()) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic()) {
            return v.clone();
        }
    }
    let n: u64 = rand::random();
    let mut buf = [0u8; 16];
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, slot) in buf.iter_mut().enumerate() {
        *slot = HEX[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// Maps URLs that point at a route's upstream (origin + base path) back to
/// the route, so `Location` and pagination `Link`s keep using the proxy.
#[derive(Debug, Clone)]
pub(crate) struct LinkRewriter {
    /// `https://api.example.com` (lower-case, default port omitted as configured).
    origin: String,
    /// Upstream base path without trailing `/` (`""` for the root).
    base: String,
    /// Route prefix with trailing `/` (`/github/`).
    prefix: String,
    strip_prefix: bool,
}

impl LinkRewriter {
    pub(crate) fn new(upstream: &http::Uri, base: &str, prefix: &str, strip_prefix: bool) -> Self {
        let scheme = upstream
            .scheme_str()
            .unwrap_or("https")
            .to_ascii_lowercase();
        let authority = upstream
            .authority()
            .map(|a| a.as_str().to_ascii_lowercase())
            .unwrap_or_default();
        LinkRewriter {
            origin: format!("{scheme}://{authority}"),
            base: base.to_owned(),
            prefix: prefix.to_owned(),
            strip_prefix,
        }
    }

    /// Rewrite one URI reference. `proxy_origin` is `http://{original Host}`.
    /// None when it does not point into this route's upstream.
    pub(crate) fn rewrite(&self, v: &str, proxy_origin: &str) -> Option<String> {
        let (path, absolute) = if v.len() >= self.origin.len()
            && v.is_char_boundary(self.origin.len())
            && v[..self.origin.len()].eq_ignore_ascii_case(&self.origin)
        {
            let rest = &v[self.origin.len()..];
            if !(rest.is_empty() || rest.starts_with(['/', '?', '#'])) {
                return None; // api.example.com.evil or :8443
            }
            (rest, true)
        } else if v.starts_with('/') && !v.starts_with("//") {
            (v, false)
        } else {
            return None;
        };
        let rest = strip_segment_prefix(path, &self.base)?;
        let mut out = String::with_capacity(proxy_origin.len() + self.prefix.len() + rest.len());
        if absolute {
            out.push_str(proxy_origin);
        }
        if self.strip_prefix {
            out.push_str(self.prefix.trim_end_matches('/'));
            if !rest.starts_with('/') {
                out.push('/');
            }
            out.push_str(rest);
        } else {
            // The upstream path already carries the prefix; only paths that
            // route back here are rewritten.
            strip_segment_prefix(rest, self.prefix.trim_end_matches('/'))?;
            if !rest.starts_with('/') {
                out.push('/');
            }
            out.push_str(rest);
        }
        Some(out)
    }

    /// Rewrite every `<uri-reference>` of a `Link` header (RFC 8288).
    pub(crate) fn rewrite_link(&self, v: &str, proxy_origin: &str) -> Option<String> {
        let mut out = String::with_capacity(v.len());
        let mut changed = false;
        let mut rest = v;
        while let Some(open) = rest.find('<') {
            let Some(close) = rest[open..].find('>') else {
                break;
            };
            let target = &rest[open + 1..open + close];
            out.push_str(&rest[..=open]);
            match self.rewrite(target, proxy_origin) {
                Some(new) => {
                    out.push_str(&new);
                    changed = true;
                }
                None => out.push_str(target),
            }
            out.push('>');
            rest = &rest[open + close + 1..];
        }
        out.push_str(rest);
        changed.then_some(out)
    }
}

/// `path` with `prefix` removed when `prefix` is a whole-segment prefix of
/// it (`/base` of `/base`, `/base/x`, `/base?q`, not of `/basement`).
fn strip_segment_prefix<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with(['/', '?', '#'])).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-foo"),
            ("connection", "X-Bar"),
            ("keep-alive", "timeout=5"),
            ("x-foo", "1"),
            ("x-bar", "2"),
            ("proxy-authorization", "Basic xyz"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authenticate", "Basic"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("te", "gzip"),
            ("trailer", "grpc-status"),
            ("x-keep", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["trailer", "x-keep"]);
    }

    #[test]
    fn te_trailers_survives_alone() {
        let mut h = map(&[("te", "trailers, deflate;q=0.5")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h["te"], "trailers");
        let mut h = map(&[("te", "Trailers")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn tunnel_keeps_upgrade() {
        let mut h = map(&[
            ("connection", "Upgrade, x-foo"),
            ("upgrade", "websocket"),
            ("x-foo", "1"),
            ("sec-websocket-key", "k"),
        ]);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert!(h.get("x-foo").is_none());
        assert_eq!(h["sec-websocket-key"], "k");
    }

    #[test]
    fn upgrade_needs_both_headers() {
        assert!(!wants_upgrade(&map(&[("upgrade", "websocket")])));
        assert!(!wants_upgrade(&map(&[("connection", "upgrade")])));
        assert!(wants_upgrade(&map(&[
            ("connection", "keep-alive, UPGRADE"),
            ("upgrade", "h2c")
        ])));
    }

    #[test]
    fn host_of_strips_port_and_case() {
        assert_eq!(host_of("LocalHost:8080").as_deref(), Some("localhost"));
        assert_eq!(host_of("[::1]:80").as_deref(), Some("[::1]"));
        assert_eq!(host_of("127.0.0.1").as_deref(), Some("127.0.0.1"));
        assert_eq!(host_of("example.com.").as_deref(), Some("example.com"));
        assert_eq!(host_of("user@evil"), None);
        assert_eq!(host_of(""), None);
        assert_eq!(host_of("a b"), None);
    }

    #[test]
    fn host_allowlist() {
        let p = HostPolicy::new(["api.internal".to_owned(), "10.0.0.5".to_owned()]);
        for ok in [
            "localhost",
            "github.localhost",
            "127.0.0.1",
            "127.1.2.3",
            "[::1]",
            "[::ffff:127.0.0.1]",
            "api.internal",
            "10.0.0.5",
        ] {
            assert!(p.allows(ok), "{ok}");
        }
        for bad in [
            "evil.com",
            "localhost.evil.com",
            "notlocalhost",
            "128.0.0.1",
            "[::2]",
            "10.0.0.6",
            "0.0.0.0",
        ] {
            assert!(!p.allows(bad), "{bad}");
        }
    }

    #[test]
    fn origin_hosts() {
        let o = |s| origin_host(&HeaderValue::from_static(s));
        assert_eq!(o("http://localhost:3000").as_deref(), Some("localhost"));
        assert_eq!(o("https://Evil.com").as_deref(), Some("evil.com"));
        assert_eq!(o("null"), None);
    }

    #[test]
    fn request_id_propagated_or_generated() {
        let h = map(&[("x-request-id", "abc-123")]);
        assert_eq!(request_id(&h), "abc-123");
        let g = request_id(&HeaderMap::new());
        assert_eq!(g.len(), 16);
        assert!(g.as_bytes().iter().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(g, request_id(&HeaderMap::new()));
        let bad = map(&[("x-request-id", "has space")]);
        assert_ne!(request_id(&bad), "has space");
    }

    fn rw(upstream: &str, strip: bool) -> LinkRewriter {
        let u: http::Uri = upstream.parse().unwrap();
        let base = u.path().trim_end_matches('/').to_owned();
        LinkRewriter::new(&u, &base, "/gh/", strip)
    }

    #[test]
    fn location_rewritten_to_route() {
        let r = rw("https://api.example.com/base/", true);
        let o = "http://localhost:8080";
        let cases = [
            (
                "https://api.example.com/base/x?page=2",
                Some("http://localhost:8080/gh/x?page=2"),
            ),
            (
                "https://API.example.com/base",
                Some("http://localhost:8080/gh/"),
            ),
            (
                "https://api.example.com/base?a",
                Some("http://localhost:8080/gh/?a"),
            ),
            ("/base/x", Some("/gh/x")),
            ("https://api.example.com/basement", None),
            ("https://api.example.com/other", None),
            ("https://api.example.com.evil/base/x", None),
            ("http://api.example.com/base/x", None),
            ("https://other.com/base/x", None),
            ("//api.example.com/base/x", None),
            ("relative/x", None),
        ];
        for (input, want) in cases {
            assert_eq!(r.rewrite(input, o).as_deref(), want, "{input}");
        }
        let root = rw("https://api.github.com", true);
        assert_eq!(
            root.rewrite("https://api.github.com/user/repos?page=3", o)
                .as_deref(),
            Some("http://localhost:8080/gh/user/repos?page=3")
        );
    }

    #[test]
    fn location_without_strip_prefix_must_route_back() {
        let r = rw("https://api.example.com/v1", false);
        let o = "http://localhost";
        assert_eq!(
            r.rewrite("https://api.example.com/v1/gh/x", o).as_deref(),
            Some("http://localhost/gh/x")
        );
        assert_eq!(r.rewrite("https://api.example.com/v1/other", o), None);
    }

    #[test]
    fn link_header_rewritten() {
        let r = rw("https://api.github.com/", true);
        let v = r#"<https://api.github.com/user/repos?page=2>; rel="next", <https://elsewhere.com/x>; rel="help", <https://api.github.com/user/repos?page=9>; rel="last""#;
        assert_eq!(
            r.rewrite_link(v, "http://127.0.0.1:8080").unwrap(),
            r#"<http://127.0.0.1:8080/gh/user/repos?page=2>; rel="next", <https://elsewhere.com/x>; rel="help", <http://127.0.0.1:8080/gh/user/repos?page=9>; rel="last""#
        );
        assert_eq!(r.rewrite_link("<https://x.com/>; rel=a", "http://h"), None);
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("connection".to_owned()),
            Just("keep-alive".to_owned()),
            Just("proxy-connection".to_owned()),
            Just("proxy-authorization".to_owned()),
            Just("proxy-authenticate".to_owned()),
            Just("transfer-encoding".to_owned()),
            Just("upgrade".to_owned()),
            Just("te".to_owned()),
            Just("trailer".to_owned()),
            Just("x-secret".to_owned()),
            Just("authorization".to_owned()),
            "[a-z][a-z0-9-]{0,10}",
        ]
    }

    fn value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"trailers".to_vec()),
            Just(b"x-secret, keep-alive".to_vec()),
            Just(b"close".to_vec()),
            Just(b"x-secret, \xffobs".to_vec()),
            "[ -~]{0,24}".prop_map(String::into_bytes),
            // obs-text: not valid UTF-8, still a valid header value.
            proptest::collection::vec(prop_oneof![0x20u8..0x7f, 0x80u8..=0xff, Just(b',')], 0..24),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// No hop-by-hop header, and nothing `Connection` listed, survives;
        /// `TE` survives only as `trailers`; `Connection`/`Upgrade` only
        /// when tunnelling.
        #[test]
        fn stripping_never_leaves_a_hop_by_hop_header(
            pairs in proptest::collection::vec((name(), value()), 0..12),
            tunnel in any::<bool>(),
        ) {
            let mut h = HeaderMap::new();
            for (n, v) in &pairs {
                if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n.as_bytes()), HeaderValue::from_bytes(v)) {
                    h.append(n, v);
                }
            }
            let listed: Vec<HeaderName> = h
                .get_all(CONNECTION)
                .iter()
                .flat_map(|v| v.as_bytes().split(|&b| b == b','))
                .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
                .collect();
            strip_hop_by_hop(&mut h, tunnel);
            for n in &HOP_BY_HOP {
                if !(tunnel && n == UPGRADE) {
                    prop_assert!(!h.contains_key(n), "{n} left in {h:?}");
                }
            }
            for n in &listed {
                let kept = (tunnel && (n == UPGRADE || n == CONNECTION)) || n == TE;
                prop_assert!(kept || !h.contains_key(n), "listed {n} left in {h:?}");
            }
            if tunnel {
                prop_assert_eq!(h.get_all(CONNECTION).iter().count(), 1);
                prop_assert_eq!(&h[CONNECTION], "upgrade");
            } else {
                prop_assert!(!h.contains_key(CONNECTION));
            }
            for v in h.get_all(TE) {
                prop_assert_eq!(v, "trailers");
            }
        }
    }
}
