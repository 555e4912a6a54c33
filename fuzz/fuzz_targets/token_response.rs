//! The token-response parser never panics and never accepts a response
//! without a non-empty, header-safe access token.
#![no_main]
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;
use tokenproxy::token::grant::{parse_token_response, RawResponse};

fuzz_target!(|data: &[u8]| {
    // [status hi, status lo, content-type selector, retry-after len, ...]
    if data.len() < 4 {
        return;
    }
    let Ok(status) = StatusCode::from_u16(u16::from_be_bytes([data[0], data[1]]) % 600) else {
        return;
    };
    let ct = [
        "application/json",
        "application/x-www-form-urlencoded",
        "text/plain",
    ][data[2] as usize % 3];
    let ra_len = (data[3] as usize).min(data.len() - 4);
    let mut headers = HeaderMap::new();
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ct));
    if let Ok(v) = HeaderValue::from_bytes(&data[4..4 + ra_len]) {
        headers.insert(http::header::RETRY_AFTER, v);
    }
    let resp = RawResponse {
        status,
        headers,
        body: Bytes::copy_from_slice(&data[4 + ra_len..]),
    };
    if let Ok(set) = parse_token_response(&resp, std::time::SystemTime::now()) {
        let t = set.access_token.expose();
        assert!(!t.is_empty());
        assert!(HeaderValue::from_str(t).is_ok());
        assert!(status.is_success());
    }
});
