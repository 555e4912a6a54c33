//! A lean HTTP/1.1 exchange with an upstream, for requests without a body:
//! the task serving the client writes the request head and reads the
//! response itself, on a connection checked out of the pool. No connection
//! task, no channel, no wake-up between tasks: on a small request that is
//! most of what a proxy spends beyond the kernel.
//!
//! Owns the wire format: the request head, the response head (parsed by
//! `httparse`, hyper's parser) and the response framing (length, chunked
//! with trailers, close-delimited; none for `HEAD`, 1xx, 204 and 304).
//! Knows nothing of pools, tokens or routing: `forward.rs` checks
//! connections out and takes them back from [`LeanBody::take_reusable`].

use super::body::BoxError;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use hyper_util::rt::TokioIo;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::either::Either;

/// hyper's own limits for a response head: generous for cookie-heavy APIs,
/// bounded against a hostile upstream.
const MAX_HEAD_BYTES: usize = 400 * 1024;
const MAX_HEADERS: usize = 100;
/// First read per response; streamed bodies double it up to the cap while
/// reads keep filling it (one syscall per 256 KiB on a fast upstream).
const READ_START: usize = 8 * 1024;
const READ_MAX: usize = 256 * 1024;
/// A chunk-size line or the trailer section longer than this is an attack.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 64 * 1024;

type TlsIo = tokio_rustls::client::TlsStream<TokioIo<TokioIo<TcpStream>>>;

/// An upstream connection's byte stream: plain TCP or TLS.
pub(crate) type Io = Either<TcpStream, Box<TlsIo>>;

/// The connector's stream, unwrapped to tokio's I/O traits.
pub(crate) fn io_from(s: hyper_rustls::MaybeHttpsStream<TokioIo<TcpStream>>) -> Io {
    match s {
        hyper_rustls::MaybeHttpsStream::Http(t) => Either::Left(t.into_inner()),
        hyper_rustls::MaybeHttpsStream::Https(t) => Either::Right(Box::new(t.into_inner())),
    }
}

/// Why an exchange failed. Nothing here carries message bytes.
#[derive(Debug, thiserror::Error)]
pub(crate) enum H1Error {
    #[error("upstream closed the connection before responding")]
    ClosedBeforeResponse,
    #[error("upstream closed the connection in the middle of the response")]
    Incomplete,
    #[error("malformed response from upstream: {0}")]
    Malformed(&'static str),
    #[error("upstream response head larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("upstream connection")]
    Io(#[from] io::Error),
}

/// An idle HTTP/1.1 connection. Holds no buffer while idle.
pub(crate) struct Conn {
    io: Io,
}

impl Conn {
    pub(crate) fn new(io: Io) -> Conn {
        Conn { io }
    }

    pub(crate) fn into_io(self) -> Io {
        self.io
    }

    /// False when the upstream closed the idle connection (or sent bytes
    /// nobody asked for). Costs no syscall unless the socket became
    /// readable since its last response.
    pub(crate) fn is_usable(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0u8; 1];
        let mut probe = ReadBuf::new(&mut byte);
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut probe)
            .is_pending()
    }

    /// Writes one request head; the request has no body. An error means the
    /// upstream may or may not have seen part of it.
    pub(crate) async fn send_head(&mut self, head: &[u8]) -> io::Result<()> {
        self.io.write_all(head).await?;
        self.io.flush().await
    }

    /// Reads the response head (skipping 1xx interim responses) and returns
    /// the response, whose body owns the connection until it is read.
    pub(crate) async fn read_response(
        self,
        method: &Method,
    ) -> Result<Response<LeanBody>, H1Error> {
        let mut reader = Reader {
            conn: self,
            buf: BytesMut::new(),
            read_size: READ_START,
        };
        loop {
            if !reader.buf.is_empty() {
                if let Some(head) = parse_head(&mut reader.buf)? {
                    if head.status.is_informational() {
                        if head.status == StatusCode::SWITCHING_PROTOCOLS {
                            return Err(H1Error::Malformed(
                                "101 to a request that asked no upgrade",
                            ));
                        }
                        reader.buf = BytesMut::from(&head.rest[..]);
                        continue;
                    }
                    return Ok(head.into_response(method, reader));
                }
            }
            if reader.buf.len() >= MAX_HEAD_BYTES {
                return Err(H1Error::HeadTooLarge);
            }
            let had = reader.buf.len();
            if std::future::poll_fn(|cx| reader.poll_fill(cx)).await? == 0 {
                return Err(if had == 0 {
                    H1Error::ClosedBeforeResponse
                } else {
                    H1Error::Incomplete
                });
            }
        }
    }
}

/// Serialises a request head with an origin-form target.
pub(crate) fn encode_head(method: &Method, target: &str, headers: &HeaderMap) -> Vec<u8> {
    let mut len = method.as_str().len() + target.len() + 14;
    for (n, v) in headers {
        len += n.as_str().len() + v.len() + 4;
    }
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (n, v) in headers {
        // No body: a framing header would make the upstream wait for one.
        if n == http::header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(n.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

struct Reader {
    conn: Conn,
    buf: BytesMut,
    read_size: usize,
}

impl Reader {
    /// Reads once into `buf`; Ok(0) at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < self.read_size / 2 {
            self.buf.reserve(self.read_size);
        }
        let before = self.buf.capacity() - self.buf.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.conn.io),
            cx,
            &mut self.buf
        ))?;
        if n == before && self.read_size < READ_MAX {
            self.read_size *= 2;
        }
        Poll::Ready(Ok(n))
    }
}

fn malformed(e: httparse::Error) -> H1Error {
    H1Error::Malformed(match e {
        httparse::Error::TooManyHeaders => "more than 100 header fields",
        httparse::Error::Status => "invalid status",
        httparse::Error::Version => "invalid HTTP version",
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        _ => "invalid response head",
    })
}

struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    /// The connection may carry another request after a body-less
    /// response; a close-delimited or doubly framed body ends it.
    persistent: bool,
    /// Both Transfer-Encoding and Content-Length were sent.
    ambiguous: bool,
    /// Bytes read past the head.
    rest: Bytes,
    hop_by_hop_stripped: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

/// Parses the head at the start of `buf` and removes it; `None` (and
/// `buf` untouched) while it is incomplete. One parse, no copy: the bytes
/// read so far are frozen and header values are slices of them; what
/// follows the head goes back into `buf`.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, H1Error> {
    let bytes = std::mem::take(buf).freeze();
    let mut raw = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let config = httparse::ParserConfig::default();
    let len = match config.parse_response_with_uninit_headers(&mut resp, &bytes, &mut raw) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            // Nothing borrowed the bytes: back to a buffer without a copy.
            *buf = bytes
                .try_into_mut()
                .unwrap_or_else(|b| BytesMut::from(&b[..]));
            return Ok(None);
        }
        Err(e) => return Err(malformed(e)),
    };
    let code = resp.code.unwrap_or(0);
    let minor = resp.version.unwrap_or(1);
    let status =
        StatusCode::from_u16(code).map_err(|_| H1Error::Malformed("invalid status code"))?;
    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut headers = HeaderMap::with_capacity(resp.headers.len());
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut close = false;
    let mut keep_alive_token = false;
    // Hop-by-hop fields are left out here when that gives exactly what
    // `headers::strip_hop_by_hop` would; else all are kept for it to do.
    let mut listed_other = false;
    let mut te = false;
    let mut held_back: [Option<(HeaderName, HeaderValue)>; 4] = Default::default();
    let mut overflow = false;
    for h in resp.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| H1Error::Malformed("invalid header name"))?;
        let raw_value = h.value;
        if name == http::header::CONTENT_LENGTH {
            let n = parse_length(raw_value)?;
            if length.is_some_and(|l| l != n) {
                return Err(H1Error::Malformed("conflicting Content-Length values"));
            }
            length = Some(n);
        } else if name == http::header::TRANSFER_ENCODING {
            transfer_encoding = true;
            // Only the last coding says how the message ends.
            chunked = raw_value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == http::header::CONNECTION {
            for token in raw_value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                let is_close = token.eq_ignore_ascii_case(b"close");
                let is_keep_alive = token.eq_ignore_ascii_case(b"keep-alive");
                close |= is_close;
                keep_alive_token |= is_keep_alive;
                listed_other |= !(is_close || is_keep_alive || token.is_empty());
            }
        } else if name == http::header::TE {
            te = true;
        }
        let value = HeaderValue::from_maybe_shared(bytes.slice_ref(raw_value))
            .map_err(|_| H1Error::Malformed("invalid header value"))?;
        if super::headers::is_hop_by_hop(&name) {
            if let Some(slot) = held_back.iter_mut().find(|s| s.is_none()) {
                *slot = Some((name, value));
                continue;
            }
            overflow = true;
        }
        headers.append(name, value);
    }
    if transfer_encoding && length.is_some() {
        // RFC 9112 §6.3: the length is wrong for the body we re-frame.
        headers.remove(http::header::CONTENT_LENGTH);
    }
    // Only `close`/`keep-alive` listed and no TE: dropping the fields held
    // back is all the strip would do. Otherwise they go in for it.
    let hop_by_hop_stripped = !listed_other && !te && !overflow;
    if !hop_by_hop_stripped {
        for (name, value) in held_back.into_iter().flatten() {
            headers.append(name, value);
        }
    }
    let persistent = if version == Version::HTTP_10 {
        keep_alive_token && !close
    } else {
        !close
    };
    let framing = if transfer_encoding {
        // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length.
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    let rest = bytes.slice(len..);
    Ok(Some(Head {
        status,
        version,
        headers,
        framing,
        persistent,
        ambiguous: transfer_encoding && length.is_some(),
        rest,
        hop_by_hop_stripped,
    }))
}

fn parse_length(v: &[u8]) -> Result<u64, H1Error> {
    // A list of identical values is allowed (RFC 9110 §8.6); anything else
    // is a framing attack.
    let mut value = None;
    for part in v.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return Err(H1Error::Malformed("invalid Content-Length"));
        }
        let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        if value.is_some_and(|v| v != n) {
            return Err(H1Error::Malformed("conflicting Content-Length values"));
        }
        value = Some(n);
    }
    value.ok_or(H1Error::Malformed("invalid Content-Length"))
}

impl Head {
    fn into_response(self, method: &Method, mut reader: Reader) -> Response<LeanBody> {
        let bodiless = *method == Method::HEAD
            || self.status == StatusCode::NO_CONTENT
            || self.status == StatusCode::NOT_MODIFIED;
        let decoder = match self.framing {
            _ if bodiless => Decoder::Length(0),
            Framing::Length(n) => Decoder::Length(n),
            Framing::Chunked => Decoder::Chunked(Chunked::Size),
            Framing::UntilClose => Decoder::UntilClose,
        };
        // A message with both framings must not leave the connection
        // reusable (RFC 9112 §6.3), nor one that ends when it closes.
        let keep_alive = self.persistent
            && (bodiless || (!self.ambiguous && self.framing != Framing::UntilClose));
        let mut body = LeanBody {
            hop_by_hop_stripped: self.hop_by_hop_stripped,
            reader: None,
            decoder,
            keep_alive,
            ready: None,
            reusable: None,
        };
        let mut rest = self.rest;
        match body.decoder {
            // The whole body often arrives with the head: hand it out as one
            // frame and free the connection now.
            Decoder::Length(n) if rest.len() as u64 >= n => {
                let n = n as usize;
                body.ready = (n > 0).then(|| rest.split_to(n));
                // Bytes past the response: the stream is out of step.
                body.keep_alive &= rest.is_empty();
                body.reader = Some(reader);
                body.finish();
            }
            _ => {
                // Copied once; later reads append to it.
                reader.buf = BytesMut::from(&rest[..]);
                body.reader = Some(reader);
            }
        }
        let mut resp = Response::new(body);
        *resp.status_mut() = self.status;
        *resp.version_mut() = self.version;
        *resp.headers_mut() = self.headers;
        resp
    }
}

enum Decoder {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    /// Hex digits, then optional extensions, up to LF.
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd {
        seen_cr: bool,
    },
    /// After the last chunk: trailer fields up to an empty line.
    Trailers,
}

/// What one step of chunked decoding produced.
enum Step {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
    NeedMore,
}

impl Chunked {
    fn step(&mut self, buf: &mut BytesMut) -> Result<Step, H1Error> {
        loop {
            match self {
                Chunked::Size => {
                    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err(H1Error::Malformed("chunk size line too long"));
                        }
                        // The partial line stays in `buf` until its LF.
                        return Ok(Step::NeedMore);
                    };
                    let text = buf.split_to(nl + 1);
                    let text = &text[..nl];
                    let text = text.strip_suffix(b"\r").unwrap_or(text);
                    let hex_end = text
                        .iter()
                        .position(|b| !b.is_ascii_hexdigit())
                        .unwrap_or(text.len());
                    let (hex, rest) = text.split_at(hex_end);
                    if hex.is_empty() || hex.len() > 15 {
                        return Err(H1Error::Malformed("invalid chunk size"));
                    }
                    if !rest.is_empty() && !matches!(rest.trim_ascii_start().first(), Some(b';')) {
                        return Err(H1Error::Malformed("invalid chunk size"));
                    }
                    let size = hex.iter().fold(0u64, |n, &d| {
                        n * 16 + u64::from((d as char).to_digit(16).unwrap_or(0))
                    });
                    *self = if size == 0 {
                        Chunked::Trailers
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(remaining) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let n = (*remaining).min(buf.len() as u64);
                    *remaining -= n;
                    let data = buf.split_to(n as usize).freeze();
                    if *remaining == 0 {
                        *self = Chunked::DataEnd { seen_cr: false };
                    }
                    return Ok(Step::Data(data));
                }
                Chunked::DataEnd { seen_cr } => {
                    let Some(&b) = buf.first() else {
                        return Ok(Step::NeedMore);
                    };
                    let _ = buf.split_to(1);
                    match (b, *seen_cr) {
                        (b'\r', false) => *seen_cr = true,
                        (b'\n', _) => *self = Chunked::Size,
                        _ => return Err(H1Error::Malformed("missing CRLF after chunk data")),
                    }
                }
                Chunked::Trailers => {
                    // Empty trailer section: just the final CRLF.
                    if buf.starts_with(b"\r\n") || buf.starts_with(b"\n") {
                        let _ = buf.split_to(if buf[0] == b'\r' { 2 } else { 1 });
                        return Ok(Step::End);
                    }
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    return match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((len, parsed))) => {
                            let mut trailers = HeaderMap::with_capacity(parsed.len());
                            for f in parsed.iter() {
                                let name = HeaderName::from_bytes(f.name.as_bytes())
                                    .map_err(|_| H1Error::Malformed("invalid trailer name"))?;
                                let value = HeaderValue::from_bytes(f.value)
                                    .map_err(|_| H1Error::Malformed("invalid trailer value"))?;
                                trailers.append(name, value);
                            }
                            let _ = buf.split_to(len);
                            Ok(Step::Trailers(trailers))
                        }
                        Ok(httparse::Status::Partial) if buf.len() <= MAX_TRAILERS => {
                            Ok(Step::NeedMore)
                        }
                        Ok(httparse::Status::Partial) => {
                            Err(H1Error::Malformed("trailer section too large"))
                        }
                        Err(e) => Err(malformed(e)),
                    };
                }
            }
        }
    }
}

/// A response body read straight from the upstream connection.
pub(crate) struct LeanBody {
    hop_by_hop_stripped: bool,
    reader: Option<Reader>,
    decoder: Decoder,
    keep_alive: bool,
    /// Body bytes that arrived with the head.
    ready: Option<Bytes>,
    /// The connection, once the body ended cleanly on a reusable one.
    reusable: Option<Conn>,
}

impl LeanBody {
    /// The connection, clean and ready for another request, once the body
    /// has been read to its end; `None` before that or when it must close.
    pub(crate) fn take_reusable(&mut self) -> Option<Conn> {
        self.reusable.take()
    }

    /// The response head already went without its hop-by-hop fields.
    pub(crate) fn hop_by_hop_stripped(&self) -> bool {
        self.hop_by_hop_stripped
    }

    fn finish(&mut self) {
        self.decoder = Decoder::Done;
        if let Some(reader) = self.reader.take() {
            // Bytes past the end of the response: the upstream is confused.
            if self.keep_alive && reader.buf.is_empty() {
                self.reusable = Some(reader.conn);
            }
        }
    }

    fn fail(&mut self, e: H1Error) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.decoder = Decoder::Done;
        self.reader = None;
        Poll::Ready(Some(Err(e.into())))
    }
}

impl Body for LeanBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(data) = this.ready.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        loop {
            let Some(reader) = this.reader.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.decoder {
                Decoder::Done => return Poll::Ready(None),
                Decoder::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Decoder::Length(remaining) => {
                    if !reader.buf.is_empty() {
                        let n = (*remaining).min(reader.buf.len() as u64);
                        *remaining -= n;
                        let data = reader.buf.split_to(n as usize).freeze();
                        if *remaining == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Decoder::UntilClose => {
                    if !reader.buf.is_empty() {
                        let data = reader.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Decoder::Chunked(state) => match state.step(&mut reader.buf) {
                    Ok(Step::Data(d)) => return Poll::Ready(Some(Ok(Frame::data(d)))),
                    Ok(Step::Trailers(t)) => {
                        this.finish();
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                    Ok(Step::End) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Step::NeedMore) => {}
                    Err(e) => return this.fail(e),
                },
            }
            match ready!(reader.poll_fill(cx)) {
                Ok(0) if matches!(this.decoder, Decoder::UntilClose) => {
                    this.decoder = Decoder::Done;
                    this.reader = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(H1Error::Incomplete),
                Ok(_) => {}
                Err(e) => return this.fail(H1Error::Io(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_none() && matches!(self.decoder, Decoder::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.decoder, &self.ready) {
            (Decoder::Done, Some(d)) => SizeHint::with_exact(d.len() as u64),
            (Decoder::Done, None) => SizeHint::with_exact(0),
            (Decoder::Length(n), _) => SizeHint::with_exact(*n),
            _ => SizeHint::default(),
        }
    }
}

/// Decodes `wire` as the response to a `GET`, the way an exchange does,
/// fed `piece` bytes at a time: status, body and trailer count. For the
/// fuzz target, which checks that the split never changes the outcome.
pub fn decode_for_fuzzing(wire: &[u8], piece: usize) -> Result<(u16, Vec<u8>, usize), String> {
    let mut input = wire.chunks(piece.max(1));
    let mut buf = BytesMut::new();
    let head = loop {
        if !buf.is_empty() {
            match parse_head(&mut buf).map_err(|e| e.to_string())? {
                Some(h) if h.status == StatusCode::SWITCHING_PROTOCOLS => {
                    return Err("unexpected 101".into())
                }
                Some(h) if h.status.is_informational() => {
                    buf = BytesMut::from(&h.rest[..]);
                    continue;
                }
                Some(h) => break h,
                None => {}
            }
        }
        match input.next() {
            Some(more) => buf.extend_from_slice(more),
            None => return Err("incomplete head".into()),
        }
    };
    let mut rest = BytesMut::from(&head.rest[..]);
    let mut body = Vec::new();
    let mut trailers = 0;
    let bodiless = head.status == StatusCode::NO_CONTENT || head.status == StatusCode::NOT_MODIFIED;
    match head.framing {
        _ if bodiless => {}
        Framing::Length(n) => loop {
            let take = (n - body.len() as u64).min(rest.len() as u64) as usize;
            body.extend_from_slice(&rest.split_to(take));
            if body.len() as u64 == n {
                break;
            }
            match input.next() {
                Some(more) => rest.extend_from_slice(more),
                None => return Err(H1Error::Incomplete.to_string()),
            }
        },
        Framing::UntilClose => {
            body.extend_from_slice(&rest);
            input.for_each(|more| body.extend_from_slice(more));
        }
        Framing::Chunked => {
            let mut state = Chunked::Size;
            loop {
                match state.step(&mut rest).map_err(|e| e.to_string())? {
                    Step::Data(d) => body.extend_from_slice(&d),
                    Step::Trailers(t) => {
                        trailers = t.len();
                        break;
                    }
                    Step::End => break,
                    Step::NeedMore => match input.next() {
                        Some(more) => rest.extend_from_slice(more),
                        None => return Err(H1Error::Incomplete.to_string()),
                    },
                }
            }
        }
    }
    Ok((head.status.as_u16(), body, trailers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// An upstream on a real socket: for each expected request it reads
    /// one head and writes `pieces` with a pause between them (so the
    /// reader sees them split), then keeps the connection open unless
    /// `close`. Returns the connection and the request heads it read.
    async fn upstream(
        script: Vec<(Vec<&'static [u8]>, bool)>,
    ) -> (Conn, tokio::task::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut heads = Vec::new();
            for (pieces, close) in script {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut b = [0u8; 1];
                    if s.read(&mut b).await.unwrap() == 0 {
                        return heads;
                    }
                    head.push(b[0]);
                }
                heads.push(String::from_utf8(head).unwrap());
                for p in pieces {
                    s.write_all(p).await.unwrap();
                    s.flush().await.unwrap();
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                if close {
                    return heads;
                }
            }
            // Hold the connection until the client is done with it.
            let _ = s.read(&mut [0u8; 1]).await;
            heads
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        (Conn::new(Either::Left(stream)), server)
    }

    fn get(path: &str) -> Vec<u8> {
        let mut h = HeaderMap::new();
        h.insert(http::header::HOST, HeaderValue::from_static("up.example"));
        encode_head(&Method::GET, path, &h)
    }

    async fn exchange(
        mut conn: Conn,
        method: Method,
    ) -> Result<(Response<()>, Bytes, Option<HeaderMap>, Option<Conn>), BoxError> {
        let mut h = HeaderMap::new();
        h.insert(http::header::HOST, HeaderValue::from_static("up.example"));
        conn.send_head(&encode_head(&method, "/p?q=1", &h)).await?;
        let resp = conn.read_response(&method).await?;
        let (parts, mut body) = resp.into_parts();
        let mut data = BytesMut::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            match frame?.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        assert!(body.is_end_stream());
        let reusable = body.take_reusable();
        Ok((
            Response::from_parts(parts, ()),
            data.freeze(),
            trailers,
            reusable,
        ))
    }

    #[tokio::test]
    async fn length_framed_response_then_the_connection_is_reused() {
        let (conn, server) = upstream(vec![
            (
                vec![b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nx-a:  2 \r\n\r\nhello"],
                false,
            ),
            (
                vec![
                    b"HTTP/1.1 201 Created\r\ncontent-length: 3\r\n\r\n",
                    b"a",
                    b"bc",
                ],
                false,
            ),
        ])
        .await;
        let (resp, body, _, again) = exchange(conn, Method::GET).await.unwrap();
        assert_eq!(resp.status(), 200);
        let xa: Vec<_> = resp.headers().get_all("x-a").iter().collect();
        assert_eq!(xa, ["1", "2"]);
        assert_eq!(body, "hello");
        let mut again = again.expect("reusable");
        assert!(again.is_usable());
        let (resp, body, _, back) = exchange(again, Method::GET).await.unwrap();
        assert_eq!((resp.status().as_u16(), &body[..]), (201, &b"abc"[..]));
        drop(back);
        let heads = server.await.unwrap();
        assert_eq!(heads.len(), 2);
        assert_eq!(heads[0], "GET /p?q=1 HTTP/1.1\r\nhost: up.example\r\n\r\n");
    }

    #[tokio::test]
    async fn chunked_with_extensions_and_trailers_split_across_reads() {
        let (conn, _server) = upstream(vec![(
            vec![
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r",
                b"\nWiki\r\n5\r\npedia\r",
                b"\n0\r\ngrpc-status: 0\r\n",
                b"x-t: y\r\n\r\n",
            ],
            false,
        )])
        .await;
        let (resp, body, trailers, back) = exchange(conn, Method::GET).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(body, "Wikipedia");
        let t = trailers.expect("trailers");
        assert_eq!(t["grpc-status"], "0");
        assert_eq!(t["x-t"], "y");
        assert!(back.is_some(), "chunked end leaves the connection clean");
    }

    #[test]
    fn chunked_decoder_fed_one_byte_at_a_time() {
        let wire = b"3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n";
        let mut state = Chunked::Size;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut ended = false;
        for &b in wire.iter() {
            buf.extend_from_slice(&[b]);
            loop {
                match state.step(&mut buf).unwrap() {
                    Step::Data(d) => out.extend_from_slice(&d),
                    Step::End => ended = true,
                    Step::Trailers(_) => panic!("no trailers were sent"),
                    Step::NeedMore => break,
                }
                if ended {
                    break;
                }
            }
        }
        assert!(ended && buf.is_empty());
        assert_eq!(out, b"abc0123456789abcdef");
    }

    #[test]
    fn decoding_does_not_depend_on_how_the_bytes_arrive() {
        let wire = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nt: 1\r\n\r\n";
        let whole = decode_for_fuzzing(wire, wire.len()).unwrap();
        assert_eq!(whole, (200, b"abcde".to_vec(), 1));
        for piece in 1..wire.len() {
            assert_eq!(
                decode_for_fuzzing(wire, piece).unwrap(),
                whole,
                "piece {piece}"
            );
        }
    }

    #[test]
    fn chunked_decoder_rejects_bad_sizes() {
        for wire in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"1 2\r\n",
            b"1234567890abcdef0\r\n",
            b"2\r\nabX",
        ] {
            let mut state = Chunked::Size;
            let mut buf = BytesMut::from(wire);
            let r = (0..4).try_for_each(|_| state.step(&mut buf).map(|_| ()));
            assert!(r.is_err(), "{:?} accepted", String::from_utf8_lossy(wire));
        }
    }

    #[tokio::test]
    async fn head_204_and_304_have_no_body_whatever_the_headers_say() {
        for (method, wire) in [
            (
                Method::HEAD,
                &b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"[..],
            ),
            (Method::GET, b"HTTP/1.1 204 No Content\r\n\r\n"),
            (
                Method::GET,
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            ),
        ] {
            let wire: &'static [u8] = Box::leak(wire.to_vec().into_boxed_slice());
            let (conn, _s) = upstream(vec![(vec![wire], false)]).await;
            let (_, body, _, back) = exchange(conn, method).await.unwrap();
            assert!(body.is_empty());
            assert!(back.is_some());
        }
    }

    #[tokio::test]
    async fn interim_responses_are_skipped() {
        let (conn, _s) = upstream(vec![(
            vec![
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            ],
            false,
        )])
        .await;
        let (resp, body, _, _) = exchange(conn, Method::GET).await.unwrap();
        assert_eq!((resp.status().as_u16(), &body[..]), (200, &b"ok"[..]));
        assert!(!resp.headers().contains_key("link"));
    }

    #[tokio::test]
    async fn which_responses_leave_the_connection_reusable() {
        let cases: [(&'static [u8], &[u8], bool); 5] = [
            (b"HTTP/1.1 200 OK\r\n\r\nuntil close", b"until close", false),
            (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx", b"x", false),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx", b"x", false),
            (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx", b"x", true),
            // Both framings: chunked wins and the connection must close.
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
                b"x",
                false,
            ),
        ];
        for (wire, want, reusable) in cases {
            let (conn, _s) = upstream(vec![(vec![wire], true)]).await;
            let (_, body, _, back) = exchange(conn, Method::GET).await.unwrap();
            assert_eq!(&body[..], want, "{}", String::from_utf8_lossy(wire));
            assert_eq!(
                back.is_some(),
                reusable,
                "{}",
                String::from_utf8_lossy(wire)
            );
        }
    }

    #[tokio::test]
    async fn framing_errors_fail_the_exchange() {
        let heads: [&'static [u8]; 6] = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
        ];
        for wire in heads {
            let (conn, _s) = upstream(vec![(vec![wire], false)]).await;
            let err = exchange(conn, Method::GET).await.err();
            let err = err.unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(wire)));
            assert!(err.to_string().contains("malformed"), "{err}");
        }
        let (conn, _s) = upstream(vec![(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello"],
            false,
        )])
        .await;
        assert_eq!(exchange(conn, Method::GET).await.unwrap().1, "hello");
    }

    #[tokio::test]
    async fn a_truncated_body_is_an_error_not_a_short_success() {
        for wire in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc",
        ] {
            let wire: &'static [u8] = Box::leak(wire.to_vec().into_boxed_slice());
            let (conn, _s) = upstream(vec![(vec![wire], true)]).await;
            let err = exchange(conn, Method::GET).await.err().expect("error");
            assert!(err.to_string().contains("middle of the response"), "{err}");
        }
    }

    #[tokio::test]
    async fn closed_connections_are_detected() {
        // Closed after reading the request, before any response byte.
        let (conn, _s) = upstream(vec![(vec![], true)]).await;
        let err = exchange(conn, Method::GET).await.err().expect("error");
        assert!(err.to_string().contains("before responding"), "{err}");

        // Closed while idle in the pool.
        let (mut conn, server) = upstream(vec![]).await;
        assert!(conn.is_usable());
        server.abort();
        let listener_side_closed = async {
            for _ in 0..100 {
                if !conn.is_usable() {
                    return true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            false
        };
        assert!(listener_side_closed.await);
    }

    #[tokio::test]
    async fn an_oversized_head_is_refused() {
        let mut big = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
        big.resize(MAX_HEAD_BYTES + 10, b'a');
        let big: &'static [u8] = Box::leak(big.into_boxed_slice());
        let (conn, _s) = upstream(vec![(vec![big], false)]).await;
        let err = exchange(conn, Method::GET).await.err().expect("error");
        assert!(err.to_string().contains("larger than"), "{err}");
    }

    #[test]
    fn held_back_hop_by_hop_fields_match_the_full_strip() {
        let heads: [&[u8]; 6] = [
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nx-a: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx-a: 1\r\nConnection: close, x-a\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTE: trailers\r\nUpgrade: h2c\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nProxy-Authenticate: Basic\r\nProxy-Connection: x\r\nUpgrade: a\r\nKeep-Alive: 1\r\nConnection: Keep-Alive\r\nx-b: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\nx-c: 3\r\n\r\n",
        ];
        for wire in heads {
            let mut buf = BytesMut::from(wire);
            let head = parse_head(&mut buf).unwrap().unwrap();
            let mut ours = head.headers.clone();
            if !head.hop_by_hop_stripped {
                crate::proxy::headers::strip_hop_by_hop(&mut ours, false);
            }
            let mut raw = [httparse::EMPTY_HEADER; 16];
            let mut r = httparse::Response::new(&mut raw);
            r.parse(wire).unwrap();
            let mut all = HeaderMap::new();
            for h in r.headers.iter() {
                all.append(
                    HeaderName::from_bytes(h.name.as_bytes()).unwrap(),
                    HeaderValue::from_bytes(h.value).unwrap(),
                );
            }
            crate::proxy::headers::strip_hop_by_hop(&mut all, false);
            assert_eq!(ours, all, "{}", String::from_utf8_lossy(wire));
        }
    }

    #[test]
    fn request_head_is_origin_form_without_framing_headers() {
        let mut h = HeaderMap::new();
        h.insert(http::header::HOST, HeaderValue::from_static("a"));
        h.append("x-m", HeaderValue::from_static("1"));
        h.append("x-m", HeaderValue::from_static("2"));
        h.insert(
            http::header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        let head = encode_head(&Method::DELETE, "/x", &h);
        assert_eq!(
            head,
            b"DELETE /x HTTP/1.1\r\nhost: a\r\nx-m: 1\r\nx-m: 2\r\n\r\n"
        );
        assert_eq!(
            get("/").len(),
            b"GET / HTTP/1.1\r\nhost: up.example\r\n\r\n".len()
        );
    }
}
