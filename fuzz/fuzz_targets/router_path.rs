//! The path check never panics, and a path it accepts never routes outside
//! its prefix, even once decoded and dot-segments are resolved.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tokenproxy::proxy::fuzzing::{check_path, route};

const PREFIXES: [&str; 3] = ["/a/", "/a/b/", "/api/"];

fn decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn resolve(path: &[u8]) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = Vec::new();
    for seg in path.split(|&b| b == b'/' || b == b'\\') {
        match seg {
            b"." | b"" => {}
            b".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if check_path(path).is_err() {
        return;
    }
    if let Some(i) = route(&PREFIXES, path) {
        let prefix = PREFIXES[i];
        assert!(path.starts_with(prefix) || path == &prefix[..prefix.len() - 1]);
        let decoded = decode(path);
        let want = resolve(prefix.as_bytes());
        assert!(
            resolve(&decoded).starts_with(&want),
            "{path} escapes {prefix}"
        );
    }
});
