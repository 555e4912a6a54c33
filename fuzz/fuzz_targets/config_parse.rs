//! The config loader never panics, and every rejection is located.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // `*_file` secrets would read the fuzzer's disk: skip those inputs.
    if text.contains("_file") {
        return;
    }
    if let Err(errors) =
        tokenproxy::config::parse(text, Path::new("/nonexistent/fuzz.toml"), &|_| None)
    {
        assert!(!errors.0.is_empty());
        for e in &errors.0 {
            assert!(!e.key.is_empty() || e.line > 0, "unlocated: {e:?}");
        }
    }
});
