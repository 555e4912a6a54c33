//! Hop-by-hop stripping never leaves a hop-by-hop header, nor one that
//! `Connection` listed.
#![no_main]
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tokenproxy::proxy::fuzzing::strip_hop_by_hop;

const HOP: [&str; 6] = [
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "transfer-encoding",
    "upgrade",
];

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let tunnel = flags & 1 == 1;
    let mut h = HeaderMap::new();
    // Lines of `name:value`.
    for line in rest.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(&line[colon + 1..]),
        ) {
            h.append(n, v);
        }
    }
    let listed: Vec<HeaderName> = h
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
        .collect();
    strip_hop_by_hop(&mut h, tunnel);
    for n in HOP {
        if !(tunnel && n == "upgrade") {
            assert!(!h.contains_key(n), "{n} left");
        }
    }
    for n in &listed {
        let kept = (tunnel && (n == "upgrade" || n == "connection")) || n == "te";
        assert!(kept || !h.contains_key(n), "listed {n} left");
    }
    for v in h.get_all(http::header::TE) {
        assert_eq!(v, "trailers");
    }
});
