//! The lean HTTP/1.1 server path is as strict as hyper: a request it serves
//! from some bytes is the request hyper's server reads from the same bytes
//! (method, target, header fields in order, body, bytes used). Where hyper
//! refuses, or reads something else, the lean path must decline and leave
//! the bytes to hyper.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tokenproxy::proxy::fuzzing::{hyper_request, lean_request};

fuzz_target!(|wire: &[u8]| {
    if let Some(lean) = lean_request(wire) {
        let hyper = hyper_request(&wire[..lean.len]);
        assert_eq!(
            Some(&lean),
            hyper.as_ref(),
            "{:?}",
            String::from_utf8_lossy(wire)
        );
    }
});
