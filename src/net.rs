//! Facts about names and addresses that security decisions share, with one
//! answer whoever asks: which hosts are this machine's loopback, which
//! header fields are hop-by-hop, and why a connection failed. Pure
//! functions and tables; no I/O.

use http::HeaderName;
use std::error::Error;
use std::net::IpAddr;

/// Whether `ip` is loopback: 127.0.0.0/8, `::1`, or an IPv4-mapped
/// `::ffff:127.x.y.z` (RFC 4291 §2.5.5.2: that is the IPv4 address).
pub fn is_loopback_ip(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Whether `host` (a URL or `Host` host, brackets optional for IPv6, any
/// case, one trailing dot allowed on names) is this machine's loopback.
///
/// Yes for loopback IPs ([`is_loopback_ip`]) and for `localhost` and names
/// under `.localhost` (RFC 6761 §6.3; browsers resolve them to loopback
/// themselves, so a page there is a local page). No for `0.0.0.0` and `::`:
/// "any address" is a way to listen, not a loopback destination.
pub fn is_loopback_host(host: &str) -> bool {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return is_loopback_ip(ip);
    }
    let name = host.strip_suffix('.').unwrap_or(host).as_bytes();
    const SUFFIX: &[u8] = b".localhost";
    name.eq_ignore_ascii_case(b"localhost")
        || (name.len() > SUFFIX.len()
            && name[name.len() - SUFFIX.len()..].eq_ignore_ascii_case(SUFFIX))
}

/// Header fields that are always hop-by-hop besides `Connection` (RFC 9110
/// §7.6.1), removed in both directions. `Trailer` is kept (gRPC); `TE` is
/// handled apart (only `trailers` survives).
pub(crate) static HOP_BY_HOP: [HeaderName; 6] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("proxy-authenticate"),
    HeaderName::from_static("proxy-authorization"),
    HeaderName::from_static("transfer-encoding"),
    HeaderName::from_static("upgrade"),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The one answer for every spelling a caller may hold.
    #[test]
    fn loopback_hosts() {
        let table = [
            ("localhost", true),
            ("foo.localhost", true),
            ("LOCALHOST.", true),
            ("Foo.LocalHost", true),
            ("127.0.0.1", true),
            ("127.1.2.3", true),
            ("::1", true),
            ("[::1]", true),
            ("::ffff:127.0.0.1", true),
            ("[::ffff:127.0.0.1]", true),
            ("0.0.0.0", false),
            ("::", false),
            ("[::]", false),
            (".localhost", false),
            ("localhost.evil.example", false),
            ("notlocalhost", false),
            ("evil-localhost", false),
            ("128.0.0.1", false),
            ("::2", false),
            ("::ffff:10.0.0.1", false),
            ("10.0.0.1", false),
            ("127.0.0.1.evil.example", false),
            ("", false),
        ];
        for (host, loopback) in table {
            assert_eq!(is_loopback_host(host), loopback, "{host:?}");
        }
    }
}

/// Why a connection to a server failed, read off the types in the error's
/// cause chain, never off their text: advice must not hang on a
/// dependency's wording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unreachable {
    /// The name has no address (our resolver's [`ResolveError`]).
    NoSuchHost,
    /// Nothing listens on that port.
    Refused,
    TimedOut,
    /// Expired or not yet valid: the server's certificate or this clock.
    CertificateExpired,
    /// Valid, but for other names.
    CertificateWrongName,
    /// Not issued by a trusted CA (or not verifiable at all).
    CertificateUntrusted,
    /// The peer answered the TLS handshake with something that is not TLS.
    NotTls,
    Other,
}

/// A name that did not resolve; the resolver's own error is the source.
#[derive(Debug, thiserror::Error)]
#[error("cannot resolve {host}")]
pub(crate) struct ResolveError {
    pub host: String,
    #[source]
    pub source: std::io::Error,
}

/// The first cause in `e`'s chain that says why, outermost first.
pub(crate) fn unreachable_cause(e: &(dyn Error + 'static)) -> Unreachable {
    let mut cur = Some(e);
    while let Some(err) = cur {
        let found = one_cause(err);
        if found != Unreachable::Other {
            return found;
        }
        cur = err.source();
    }
    Unreachable::Other
}

fn one_cause(err: &(dyn Error + 'static)) -> Unreachable {
    use rustls::CertificateError as C;
    if err.is::<ResolveError>() {
        return Unreachable::NoSuchHost;
    }
    if let Some(tls) = err.downcast_ref::<rustls::Error>() {
        return match tls {
            rustls::Error::InvalidCertificate(
                C::Expired
                | C::NotValidYet
                | C::ExpiredContext { .. }
                | C::NotValidYetContext { .. },
            ) => Unreachable::CertificateExpired,
            rustls::Error::InvalidCertificate(
                C::NotValidForName | C::NotValidForNameContext { .. },
            ) => Unreachable::CertificateWrongName,
            rustls::Error::InvalidCertificate(_) => Unreachable::CertificateUntrusted,
            rustls::Error::InvalidMessage(_) => Unreachable::NotTls,
            _ => Unreachable::Other,
        };
    }
    if let Some(io) = err.downcast_ref::<std::io::Error>() {
        // io::Error::source() skips a wrapped error; get_ref() reaches it.
        if let Some(inner) = io.get_ref() {
            let found = unreachable_cause(inner);
            if found != Unreachable::Other {
                return found;
            }
        }
        return match io.kind() {
            std::io::ErrorKind::ConnectionRefused => Unreachable::Refused,
            std::io::ErrorKind::TimedOut => Unreachable::TimedOut,
            _ => Unreachable::Other,
        };
    }
    Unreachable::Other
}
