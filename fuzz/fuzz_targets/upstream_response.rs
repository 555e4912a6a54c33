//! The upstream response decoder (head, framing, chunks, trailers) never
//! panics, and how the bytes are split across reads never changes what it
//! decodes: a response is one thing, whatever the network does to it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tokenproxy::proxy::fuzzing::decode_response;

fuzz_target!(|data: &[u8]| {
    let Some((&piece, wire)) = data.split_first() else {
        return;
    };
    let whole = decode_response(wire, wire.len());
    let split = decode_response(wire, usize::from(piece % 64) + 1);
    assert_eq!(whole, split);
});
