//! A lean HTTP/1.1 server path for plain requests: the connection's task
//! parses the head with `httparse` (hyper's parser, with hyper's settings),
//! calls the proxy and writes the response itself. No dispatcher, no body
//! channel, no per-request service future in a slot.
//!
//! It takes only what it can serve exactly as hyper would: HTTP/1.1, a
//! method other than `HEAD`, `CONNECT` and `PRI`, an origin-form target, no
//! `Transfer-Encoding`, `Upgrade`, `Expect` or `TE`, at most one all-digit
//! `Content-Length` whose body has already arrived (`Connection: close` is
//! honoured as hyper honours it). Anything
//! else, including every malformed or oversized head, is declined: the
//! listener hands the bytes read so far to a hyper session, which answers
//! as before (its `400`, `431`, `414`, chunked bodies, upgrades, HTTP/2).
//! The `lean_server` fuzz target holds the parser to hyper's decisions; see
//! `docs/testing.md`.

use super::body::{BoxError, ProxyBody};
use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRAILER, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::Full;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::Poll;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// hyper's `MAX_URI_LEN`: a longer target is its `414`.
const MAX_URI_LEN: usize = (u16::MAX - 1) as usize;
/// Header fields parsed on the stack; heads with more go to hyper.
const STACK_HEADERS: usize = 128;
/// Body frames up to this size are copied behind the head (one write);
/// bigger ones are written from where they are.
const COPY_FRAME_MAX: usize = 8 * 1024;

/// The request body of a lean request: all of it, already read.
pub(crate) type LeanBody = Full<Bytes>;

/// What the first bytes of a connection's read buffer are.
pub(crate) enum Parsed {
    /// An incomplete head, still within the limits: read more.
    Partial,
    /// Not a plain request (or not a valid one): hyper serves it.
    Decline,
    /// A plain request, head and body complete.
    Request(Plan),
}

/// A request found by [`parse`], to be built from its bytes.
pub(crate) struct Plan {
    method: Method,
    target: std::ops::Range<usize>,
    fields: Vec<(HeaderName, std::ops::Range<usize>)>,
    head_len: usize,
    len: usize,
    close: bool,
}

impl Plan {
    /// Bytes the request takes: its head and its body.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The client asked to close the connection after this request.
    pub(crate) fn close(&self) -> bool {
        self.close
    }

    /// The request, from the first [`Plan::len`] bytes [`parse`] saw; the
    /// bytes back if the target or a value is not valid for `http`.
    pub(crate) fn build(self, bytes: Bytes) -> Result<Request<LeanBody>, Bytes> {
        let Ok(uri) = http::Uri::from_maybe_shared(bytes.slice(self.target)) else {
            return Err(bytes);
        };
        let mut headers = HeaderMap::with_capacity(self.fields.len());
        for (name, value) in self.fields {
            match HeaderValue::from_maybe_shared(bytes.slice(value)) {
                Ok(value) => headers.append(name, value),
                Err(_) => return Err(bytes),
            };
        }
        let mut request = Request::new(Full::new(bytes.slice(self.head_len..self.len)));
        *request.method_mut() = self.method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        Ok(request)
    }
}

/// Parses a request at the start of `buf` under the listener's head limits.
pub(crate) fn parse(buf: &[u8], max_head_bytes: usize, max_headers: usize) -> Parsed {
    if max_headers > STACK_HEADERS {
        return Parsed::Decline;
    }
    let mut storage = [httparse::EMPTY_HEADER; STACK_HEADERS];
    let mut req = httparse::Request::new(&mut storage[..max_headers]);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= max_head_bytes => n,
        Ok(httparse::Status::Partial) if buf.len() < max_head_bytes => return Parsed::Partial,
        _ => return Parsed::Decline,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Decline;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Decline;
    };
    if matches!(method, Method::HEAD | Method::CONNECT)
        || method.as_str() == "PRI"
        || !path.starts_with('/')
        || path.len() > MAX_URI_LEN
    {
        return Parsed::Decline;
    }
    let offset = |s: &[u8]| {
        let start = s.as_ptr() as usize - buf.as_ptr() as usize;
        start..start + s.len()
    };
    let mut fields = Vec::with_capacity(req.headers.len());
    let mut body_len = None;
    let mut close = false;
    for h in req.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            return Parsed::Decline;
        };
        if refused_on_the_lean_path(&name) {
            return Parsed::Decline;
        }
        if name == CONTENT_LENGTH {
            match (body_len, digits(h.value)) {
                (None, Some(n)) => body_len = Some(n),
                _ => return Parsed::Decline,
            }
        } else if name == CONNECTION {
            // As hyper reads it: any line with a `close` token closes, but
            // only a line of visible ASCII has tokens (`to_str`).
            close |= h
                .value
                .iter()
                .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
                && h.value
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
        fields.push((name, offset(h.value)));
    }
    let Some(len) = head_len
        .checked_add(body_len.unwrap_or(0))
        .filter(|&l| l <= buf.len())
    else {
        // The body is still on its way: hyper streams it.
        return Parsed::Decline;
    };
    Parsed::Request(Plan {
        method,
        target: offset(path.as_bytes()),
        fields,
        head_len,
        len,
        close,
    })
}

/// Fields whose handling hyper owns: framing, connection management,
/// protocol switches, interim responses, trailers.
fn refused_on_the_lean_path(name: &HeaderName) -> bool {
    use http::header::{EXPECT, TE, UPGRADE};
    [&TRANSFER_ENCODING, &UPGRADE, &EXPECT, &TE].contains(&name)
}

/// A `Content-Length` value hyper would read the same way: 1 to 18 ASCII
/// digits (no sign, no list, no spaces).
fn digits(value: &[u8]) -> Option<usize> {
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// How the response body is framed on the wire.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Framing {
    Length(u64),
    Chunked,
}

/// What is ready for the client: bytes copied behind the head, then body
/// frames kept as they are, in order; flushed with one vectored write, as
/// hyper queues frames while its body has more ready. Kept by the
/// connection, so its buffers are reused.
#[derive(Default)]
pub(crate) struct WriteBuf {
    bytes: Vec<u8>,
    frames: std::collections::VecDeque<Bytes>,
    queued: usize,
}

/// Frames queued before a flush, at most: a slow client holds this much of
/// a response, no more.
const QUEUE_BYTES: usize = 256 * 1024;
const QUEUE_FRAMES: usize = 32;

impl WriteBuf {
    fn push_small(&mut self, b: &[u8]) {
        if self.frames.is_empty() {
            self.bytes.extend_from_slice(b);
        } else {
            self.frames.push_back(Bytes::copy_from_slice(b));
        }
    }

    fn push_data(&mut self, data: Bytes) {
        self.queued += data.len();
        if data.len() <= COPY_FRAME_MAX && self.frames.is_empty() {
            self.bytes.extend_from_slice(&data);
        } else {
            self.frames.push_back(data);
        }
    }

    fn is_full(&self) -> bool {
        self.queued >= QUEUE_BYTES || self.frames.len() >= QUEUE_FRAMES
    }

    async fn flush<W: AsyncWrite + Unpin>(&mut self, io: &mut W) -> io::Result<()> {
        let mut written = 0;
        while written < self.bytes.len() || !self.frames.is_empty() {
            let n = {
                let mut slices = [IoSlice::new(&[]); QUEUE_FRAMES + 1];
                let mut count = 0;
                if written < self.bytes.len() {
                    slices[0] = IoSlice::new(&self.bytes[written..]);
                    count = 1;
                }
                for frame in &self.frames {
                    slices[count] = IoSlice::new(frame);
                    count += 1;
                    if count == slices.len() {
                        break;
                    }
                }
                io.write_vectored(&slices[..count]).await?
            };
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            let from_bytes = n.min(self.bytes.len() - written);
            written += from_bytes;
            let mut n = n - from_bytes;
            while n > 0 {
                let Some(front) = self.frames.front_mut() else {
                    break;
                };
                if n < front.len() {
                    bytes::Buf::advance(front, n);
                    n = 0;
                } else {
                    n -= front.len();
                    self.frames.pop_front();
                }
            }
        }
        self.bytes.clear();
        self.queued = 0;
        io.flush().await
    }
}

/// Writes `resp` to a lean request, framed as hyper frames a response to a
/// non-`HEAD` HTTP/1.1 request without `TE: trailers` (trailers dropped).
/// `close`: the connection ends after it (the client asked, or shutdown),
/// which the response says, as hyper's does. `Ok(true)`: the connection may
/// serve another request. `out` is empty on return.
pub(crate) async fn write_response<W>(
    io: &mut W,
    resp: Response<ProxyBody>,
    close: bool,
    out: &mut WriteBuf,
) -> io::Result<bool>
where
    W: AsyncWrite + Unpin,
{
    let (mut parts, mut body) = resp.into_parts();
    if close {
        let values = parts.headers.get_all(CONNECTION);
        if !values.iter().any(|v| has_token(v, "close")) {
            parts
                .headers
                .append(CONNECTION, HeaderValue::from_static("close"));
        }
    }
    let status = parts.status;
    if status.is_informational() {
        // hyper cannot send a 1xx as the response either: an empty 500.
        encode_head(
            StatusCode::INTERNAL_SERVER_ERROR,
            &HeaderMap::new(),
            None,
            &mut out.bytes,
        )?;
        out.flush(io).await?;
        return Ok(false);
    }
    let length = if body.is_end_stream() {
        None
    } else {
        Some(body.size_hint().exact())
    };
    let (framing, keep_alive) = encode_head(status, &parts.headers, length, &mut out.bytes)?;
    let mut remaining = match framing {
        Framing::Length(0) => {
            out.flush(io).await?;
            return Ok(keep_alive);
        }
        Framing::Length(n) => Some(n),
        Framing::Chunked => None,
    };
    loop {
        // Frames the body has ready are queued; before waiting on the
        // upstream, what is queued goes out (a stream such as server-sent
        // events must not sit behind a slow producer).
        let frame = match std::future::poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
            Poll::Ready(f) => Poll::Ready(Some(f)),
            Poll::Pending => Poll::Ready(None),
        })
        .await
        {
            Some(f) => f,
            None => {
                out.flush(io).await?;
                std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            }
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => return Err(io::Error::other(BodyFailed(e))),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                // Trailers: hyper sends them only when the request said
                // `TE: trailers`, which lean requests never do.
                Err(_) => continue,
            },
        };
        if data.is_empty() {
            continue;
        }
        match &mut remaining {
            Some(left) => {
                let n = data.len() as u64;
                if n > *left {
                    return Err(io::Error::other("response body longer than its length"));
                }
                *left -= n;
                out.push_data(data);
            }
            None => {
                out.push_small(format!("{:X}\r\n", data.len()).as_bytes());
                out.push_data(data);
                out.push_small(b"\r\n");
            }
        }
        if out.is_full() {
            out.flush(io).await?;
        }
    }
    match remaining {
        Some(0) => {}
        Some(_) => {
            out.flush(io).await?;
            return Err(io::Error::other("response body shorter than its length"));
        }
        None => out.push_small(b"0\r\n\r\n"),
    }
    out.flush(io).await?;
    Ok(keep_alive)
}

/// The response body failed mid-stream: the connection cannot be reused.
#[derive(Debug, thiserror::Error)]
#[error("response body failed: {}", crate::error_chain(&**.0))]
struct BodyFailed(BoxError);

/// hyper's server head encoding for a non-`HEAD` HTTP/1.1 request with
/// keep-alive on. `length`: `None` for a body that is already at its end,
/// `Some(None)` for one of unknown length. Returns the framing and whether
/// the connection stays open.
fn encode_head(
    status: StatusCode,
    headers: &HeaderMap,
    length: Option<Option<u64>>,
    dst: &mut Vec<u8>,
) -> io::Result<(Framing, bool)> {
    let user_error = || io::Error::other("response headers hyper would refuse");
    if status == StatusCode::OK {
        dst.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        dst.extend_from_slice(b"HTTP/1.1 ");
        dst.extend_from_slice(status.as_str().as_bytes());
        dst.push(b' ');
        dst.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    let can_have_body = !matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED);
    let mut framing = Framing::Length(0);
    let mut wrote_len = false;
    let mut wrote_date = false;
    let mut keep_alive = true;
    let mut prev_len = None;
    for name in headers.keys() {
        let values = headers.get_all(name);
        match *name {
            CONTENT_LENGTH => {
                if wrote_len {
                    return Err(user_error());
                }
                let mut first = true;
                for value in values {
                    let len = match length {
                        Some(Some(known)) => known,
                        Some(None) => {
                            let len = digits(value.as_bytes()).ok_or_else(user_error)? as u64;
                            if prev_len.is_some_and(|p| p != len) {
                                return Err(user_error());
                            }
                            prev_len = Some(len);
                            len
                        }
                        // An ended body: hyper writes its own `0` below.
                        None => break,
                    };
                    if first {
                        framing = Framing::Length(len);
                        put_field(dst, b"content-length", value.as_bytes());
                        wrote_len = true;
                        first = false;
                    }
                }
            }
            TRANSFER_ENCODING => {
                if wrote_len {
                    return Err(user_error());
                }
                if !can_have_body {
                    continue;
                }
                wrote_len = true;
                framing = Framing::Chunked;
                let mut last_is_chunked = false;
                let joined = join(values.iter(), |v| {
                    last_is_chunked = is_chunked(v);
                });
                let mut line = joined;
                if !last_is_chunked {
                    line.extend_from_slice(b", chunked");
                }
                put_field(dst, b"transfer-encoding", &line);
            }
            CONNECTION => {
                if values.iter().any(|v| has_token(v, "close")) {
                    keep_alive = false;
                }
                put_field(dst, b"connection", &join(values.iter(), |_| {}));
            }
            TRAILER => {
                if can_have_body {
                    put_field(dst, b"trailer", &join(values.iter(), |_| {}));
                }
            }
            _ => {
                wrote_date |= *name == DATE;
                for value in values {
                    put_field(dst, name.as_str().as_bytes(), value.as_bytes());
                }
            }
        }
    }
    if !wrote_len {
        framing = match length {
            Some(None) if can_have_body => {
                dst.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked
            }
            Some(None) => Framing::Length(0),
            None | Some(Some(0)) => {
                if can_have_body {
                    dst.extend_from_slice(b"content-length: 0\r\n");
                }
                Framing::Length(0)
            }
            Some(Some(n)) if can_have_body => {
                put_field(
                    dst,
                    b"content-length",
                    itoa::Buffer::new().format(n).as_bytes(),
                );
                Framing::Length(n)
            }
            Some(Some(_)) => Framing::Length(0),
        };
    }
    if !can_have_body {
        framing = Framing::Length(0);
    }
    if !wrote_date {
        dst.extend_from_slice(b"date: ");
        http_date(dst);
        dst.extend_from_slice(b"\r\n");
    }
    dst.extend_from_slice(b"\r\n");
    Ok((framing, keep_alive))
}

fn put_field(dst: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    dst.extend_from_slice(name);
    dst.extend_from_slice(b": ");
    dst.extend_from_slice(value);
    dst.extend_from_slice(b"\r\n");
}

/// A field's values on one line, as hyper writes the framing fields.
fn join<'a>(
    values: impl Iterator<Item = &'a HeaderValue>,
    mut each: impl FnMut(&HeaderValue),
) -> Vec<u8> {
    let mut line = Vec::new();
    for (i, v) in values.enumerate() {
        if i > 0 {
            line.extend_from_slice(b", ");
        }
        line.extend_from_slice(v.as_bytes());
        each(v);
    }
    line
}

fn is_chunked(value: &HeaderValue) -> bool {
    value
        .to_str()
        .ok()
        .and_then(|s| s.rsplit(',').next())
        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
}

fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .to_str()
        .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// The `Date` value, formatted once a second per thread (as hyper caches it).
fn http_date(dst: &mut Vec<u8>) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with_borrow_mut(|(at, text)| {
        if *at != secs {
            *at = secs;
            *text = httpdate::fmt_http_date(now);
        }
        dst.extend_from_slice(text.as_bytes());
    });
}

/// For the fuzz target: the lean parser's reading of `wire`, or `None`
/// when it would not serve it (incomplete, declined or invalid).
pub(crate) fn parse_for_fuzzing(
    wire: &[u8],
    max_head_bytes: usize,
    max_headers: usize,
) -> Option<ParsedForFuzzing> {
    let Parsed::Request(plan) = parse(wire, max_head_bytes, max_headers) else {
        return None;
    };
    let (len, close) = (plan.len(), plan.close());
    let (parts, body) = plan
        .build(Bytes::copy_from_slice(&wire[..len]))
        .ok()?
        .into_parts();
    Some(ParsedForFuzzing::new(parts, body_bytes(body), len, close))
}

/// For the fuzz target: what hyper's HTTP/1.1 server, with the same head
/// limits, reads from `wire` as its first request (`len`: all of `wire`).
pub(crate) fn hyper_reading_for_fuzzing(
    wire: &[u8],
    max_head_bytes: usize,
    max_headers: usize,
) -> Option<ParsedForFuzzing> {
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncReadExt;
    let seen = Arc::new(Mutex::new(None));
    let record = seen.clone();
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let record = record.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await?.to_bytes().to_vec();
            let mut first = record.lock().unwrap_or_else(|e| e.into_inner());
            if first.is_none() && parts.version == http::Version::HTTP_11 {
                *first = Some(ParsedForFuzzing::new(parts, body, 0, false));
            }
            Ok::<_, hyper::Error>(Response::new(http_body_util::Empty::<Bytes>::new()))
        }
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .ok()?;
    let head = runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(wire.len() + 64 * 1024);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .max_buf_size(max_head_bytes)
            .max_headers(max_headers);
        let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(server), service);
        // The client stays open until the response head is in, so that
        // hyper's keep-alive decision is the request's alone.
        let talk = async {
            client.write_all(wire).await?;
            let mut head = Vec::new();
            let mut chunk = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match client.read(&mut chunk).await? {
                    0 => break,
                    n => head.extend_from_slice(&chunk[..n]),
                }
            }
            Ok::<_, io::Error>(head)
        };
        let server = tokio::spawn(conn);
        let head = tokio::time::timeout(std::time::Duration::from_secs(2), talk).await;
        server.abort();
        head.ok().and_then(Result::ok)
    });
    let close = String::from_utf8_lossy(&head?)
        .to_ascii_lowercase()
        .lines()
        .any(|l| l.starts_with("connection:") && l.contains("close"));
    let first = seen.lock().unwrap_or_else(|e| e.into_inner()).take();
    first.map(|p| ParsedForFuzzing {
        len: wire.len(),
        close,
        ..p
    })
}

fn body_bytes(mut body: LeanBody) -> Vec<u8> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut out = Vec::new();
    while let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut body).poll_frame(&mut cx) {
        if let Ok(data) = frame.into_data() {
            out.extend_from_slice(&data);
        }
    }
    out
}

/// A request as the fuzz target compares it.
#[derive(Debug, PartialEq, Eq)]
pub struct ParsedForFuzzing {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// Bytes the request took on the wire.
    pub len: usize,
    /// The connection closes after the response.
    pub close: bool,
}

impl ParsedForFuzzing {
    fn new(parts: http::request::Parts, body: Vec<u8>, len: usize, close: bool) -> Self {
        ParsedForFuzzing {
            method: parts.method.to_string(),
            target: parts.uri.to_string(),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect(),
            body,
            len,
            close,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{hyper_reading_for_fuzzing as hyper, parse_for_fuzzing as lean};

    const LIMITS: (usize, usize) = (16 * 1024, 100);

    /// The lean reading, checked against hyper's whenever there is one.
    fn agreed(wire: &[u8]) -> Option<super::ParsedForFuzzing> {
        let ours = lean(wire, LIMITS.0, LIMITS.1)?;
        let theirs = hyper(&wire[..ours.len], LIMITS.0, LIMITS.1);
        assert_eq!(
            Some(&ours),
            theirs.as_ref(),
            "{:?}",
            String::from_utf8_lossy(wire)
        );
        Some(ours)
    }

    #[test]
    fn plain_requests_are_read_as_hyper_reads_them() {
        for wire in [
            &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"GET /a/b?c=d&e HTTP/1.1\r\nHost: a:8080\r\nX-A: 1\r\nx-a: 2\r\nAccept: */*\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
            b"PUT /x HTTP/1.1\nHost: a\nContent-Length: 0\n\n",
            b"DELETE /x HTTP/1.1\r\nHost: a\r\nX-Empty:\r\nX-Tab: a\tb \r\n\r\n",
            b"PATCH /%7E?q=%20 HTTP/1.1\r\nHost: a\r\nX-Obs: caf\xc3\xa9\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\n\r\n",
            b"OPTIONS /x HTTP/1.1\r\nContent-Length: 000003\r\n\r\nabcdef",
            b"GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n",
            b"GET / HTTP/1.1\r\nConnection: x-hop, Keep-Alive\r\nX-Hop: 1\r\n\r\n",
        ] {
            let read = agreed(wire);
            assert_eq!(
                read.map(|p| p.close),
                Some(false),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        // Found by the fuzz target: hyper reads tokens only from a value
        // that is all visible ASCII, so this `close` does not count.
        let obs_text = agreed(b"GET / HTTP/1.1\r\nConnection: close, caf\xc3\xa9\r\n\r\n");
        assert_eq!(obs_text.map(|p| p.close), Some(false));
        for wire in [
            &b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nConnection: keep-alive\r\nConnection: x, CLOSE \r\n\r\n",
        ] {
            assert_eq!(agreed(wire).map(|p| p.close), Some(true));
        }
        let pipelined = agreed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\n\r\n");
        assert_eq!(pipelined.map(|p| p.len), Some(27));
    }

    #[test]
    fn anything_hyper_owns_or_refuses_is_declined() {
        for wire in [
            // Framing, connection management, interim responses, upgrades.
            &b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
            b"POST /x HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /x HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
            b"POST /x HTTP/1.1\r\nContent-Length: 4, 4\r\n\r\nabcd",
            b"POST /x HTTP/1.1\r\nContent-Length: +4\r\n\r\nabcd",
            b"POST /x HTTP/1.1\r\nContent-Length: 4\r\n\r\nab",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx",
            b"GET / HTTP/1.1\r\nTE: trailers\r\n\r\n",
            // Other versions, methods and target forms.
            b"GET / HTTP/1.0\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"HEAD / HTTP/1.1\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\n\r\n",
            b"GET http://a/x HTTP/1.1\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n\r\n",
            // Malformed: hyper answers these itself.
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n",
            b"GET /a b HTTP/1.1\r\n\r\n",
            b"G\x01T / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nX:\x7f\r\n\r\n",
        ] {
            assert!(
                lean(wire, LIMITS.0, LIMITS.1).is_none(),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        // The harness sees hyper refuse: these never reach a service.
        for wire in [
            &b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"[..],
            b"GET /a b HTTP/1.1\r\n\r\n",
            b"POST /x HTTP/1.1\r\nContent-Length: +4\r\n\r\nabcd",
        ] {
            assert_eq!(hyper(wire, LIMITS.0, LIMITS.1), None);
        }
    }

    #[test]
    fn heads_past_the_limits_are_left_to_hyper() {
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(LIMITS.0 + 10, b'a');
        big.extend_from_slice(b"\r\n\r\n");
        assert!(lean(&big, LIMITS.0, LIMITS.1).is_none());
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=LIMITS.1 {
            many.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(lean(&many, LIMITS.0, LIMITS.1).is_none());
        // At the limit: still lean, and still what hyper reads.
        let mut at = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..LIMITS.1 {
            at.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
        }
        at.extend_from_slice(b"\r\n");
        assert!(agreed(&at).is_some());
    }
}
