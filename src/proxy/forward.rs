//! The forwarder's parts that are built once: pooled HTTPS clients (one per
//! distinct TLS/connect setting), the parsed upstream target of each route,
//! and the upgrade tunnel.
//!
//! Knows nothing of tokens or routing; the request pipeline in `mod.rs`
//! drives it.

use super::body::ProxyBody;
use crate::egress::EgressConnector;
use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::path::PathBuf;
use std::time::Duration;

pub(crate) type HttpsClient = Client<HttpsConnector<EgressConnector>, ProxyBody>;

/// Pooled connections idle out before common upstream keep-alive timeouts
/// (60 s and more), so we rarely write into a connection the peer closed.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why [`super::Proxy::new`] failed. Names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum ProxyBuildError {
    #[error("{}: certificate rejected", path.display())]
    Cert {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("route {route}: upstream needs a scheme and an authority")]
    Upstream { route: String },
    #[error("TLS setup failed")]
    Tls(#[from] rustls::Error),
    #[error("TLS files")]
    TlsFiles(#[from] crate::tls::TlsError),
}

/// What makes two routes need different clients.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ClientKey {
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// Upgrades need HTTP/1.1 end to end: no `h2` in ALPN.
    pub h1_only: bool,
}

pub(crate) fn build_client(
    key: &ClientKey,
    egress_proxy: Option<&http::Uri>,
) -> Result<HttpsClient, ProxyBuildError> {
    let tls = crate::tls::client_config(key.ca_file.as_deref(), None, &[])?;
    let http = EgressConnector::new(egress_proxy, key.connect_timeout);

    // Plain http is allowed here; config validation only lets it through
    // for loopback upstreams or `allow_plaintext`.
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let connector = if key.h1_only {
        // No ALPN at all: the server then speaks HTTP/1.1.
        builder
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http)
    } else {
        builder
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http)
    };
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        // We set Host ourselves (the upstream authority).
        .set_host(false)
        .build(connector))
}

/// A route's upstream, parsed once: requests only concatenate strings.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    scheme: Scheme,
    authority: Authority,
    /// Base path without trailing `/` (`""` for the root).
    pub base: String,
    /// Bytes of the request path to drop (`path_prefix` minus its final `/`)
    /// when `strip_prefix`; 0 otherwise.
    strip: usize,
    /// `Host` for the upstream: its authority.
    pub host_header: HeaderValue,
}

impl Upstream {
    pub(crate) fn new(upstream: &Uri, prefix: &str, strip_prefix: bool) -> Option<Self> {
        let authority = upstream.authority()?.clone();
        Some(Upstream {
            scheme: upstream.scheme()?.clone(),
            host_header: HeaderValue::from_str(authority.as_str()).ok()?,
            authority,
            base: upstream.path().trim_end_matches('/').to_owned(),
            strip: if strip_prefix {
                prefix.len().saturating_sub(1)
            } else {
                0
            },
        })
    }

    /// Base path + request path (prefix stripped when configured) + the
    /// query, byte for byte. `path` passed the router's checks.
    pub(crate) fn uri(&self, path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let rest = path.get(self.strip..).unwrap_or("");
        let q = query.map_or(0, |q| q.len() + 1);
        let mut pq = String::with_capacity(self.base.len() + rest.len() + q + 1);
        pq.push_str(&self.base);
        pq.push_str(rest);
        if pq.is_empty() {
            pq.push('/');
        }
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(PathAndQuery::from_maybe_shared(Bytes::from(pq))?);
        Ok(Uri::from_parts(parts)?)
    }
}

/// An error and all its causes, `: `-separated (hyper's Display hides them).
pub(crate) use crate::error_chain as cause_chain;

/// Once both sides switched protocols, copy bytes both ways until either
/// closes. Runs detached from the request.
pub(crate) fn spawn_tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    request_id: HeaderValue,
) {
    tokio::spawn(async move {
        let rid = request_id.to_str().unwrap_or("");
        match tokio::try_join!(client, upstream) {
            Ok((c, u)) => {
                let mut c = TokioIo::new(c);
                let mut u = TokioIo::new(u);
                match tokio::io::copy_bidirectional(&mut c, &mut u).await {
                    Ok((up, down)) => {
                        tracing::debug!(
                            request_id = rid,
                            bytes_up = up,
                            bytes_down = down,
                            "Tunnel closed"
                        )
                    }
                    Err(e) => tracing::debug!(request_id = rid, error = %e, "Tunnel aborted"),
                }
            }
            Err(e) => {
                tracing::warn!(request_id = rid, error = %cause_chain(&e), "Upgrade failed")
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(upstream: &str, prefix: &str, strip: bool) -> Upstream {
        Upstream::new(&upstream.parse().unwrap(), prefix, strip).unwrap()
    }

    #[test]
    fn strip_prefix_on() {
        let u = up("https://api.github.com/", "/github/", true);
        assert_eq!(
            u.uri("/github/user", None).unwrap(),
            "https://api.github.com/user"
        );
        assert_eq!(u.uri("/github/", None).unwrap(), "https://api.github.com/");
        assert_eq!(u.uri("/github", None).unwrap(), "https://api.github.com/");
        assert_eq!(u.host_header, "api.github.com");
    }

    #[test]
    fn strip_prefix_off() {
        let u = up("https://api.example.com", "/v1/", false);
        assert_eq!(
            u.uri("/v1/things", None).unwrap(),
            "https://api.example.com/v1/things"
        );
    }

    #[test]
    fn base_path_is_kept() {
        let u = up("https://api.example.com:8443/base/", "/ex/", true);
        assert_eq!(
            u.uri("/ex/x/y", None).unwrap(),
            "https://api.example.com:8443/base/x/y"
        );
        assert_eq!(
            u.uri("/ex", None).unwrap(),
            "https://api.example.com:8443/base"
        );
        assert_eq!(
            u.uri("/ex/", None).unwrap(),
            "https://api.example.com:8443/base/"
        );
        assert_eq!(u.host_header, "api.example.com:8443");
        let u = up("http://127.0.0.1:9000/base", "/ex/", false);
        assert_eq!(
            u.uri("/ex/x", None).unwrap(),
            "http://127.0.0.1:9000/base/ex/x"
        );
    }

    #[test]
    fn root_prefix() {
        let u = up("https://api.example.com/base", "/", true);
        assert_eq!(u.uri("/", None).unwrap(), "https://api.example.com/base/");
        assert_eq!(u.uri("/x", None).unwrap(), "https://api.example.com/base/x");
    }

    #[test]
    fn query_preserved_byte_for_byte() {
        let u = up("https://api.example.com/", "/ex/", true);
        for q in [
            "a=%2F&b=+c;d=1",
            "x=%2f%2e%2e",
            "",
            "a=1&a=2&=&&",
            "q=%E2%9C%93&s=a%20b+c",
            "path=/x/../y",
        ] {
            let uri = u.uri("/ex/p", Some(q)).unwrap();
            assert_eq!(uri.query(), Some(q));
            assert_eq!(uri.path(), "/p");
        }
    }
}
