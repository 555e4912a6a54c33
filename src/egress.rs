//! Outbound connections: direct, or through an HTTP CONNECT proxy
//! (`server.egress_proxy`, else `HTTPS_PROXY`), with `NO_PROXY` honoured and
//! loopback always direct. Used by the forwarder and the grant client, so
//! IdPs and upstreams are reached the same way. Knows nothing of TLS: the
//! TLS connector wraps this one, so TLS runs end to end through the tunnel.

use crate::net::ResolveError;
use http::{HeaderValue, Uri};
use hyper_util::client::legacy::connect::dns::{GaiAddrs, GaiResolver, Name};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where an egress proxy comes from: the config wins, then the environment.
pub fn proxy_from(config: Option<&Uri>) -> Option<Uri> {
    if let Some(u) = config {
        return Some(u.clone());
    }
    ["HTTPS_PROXY", "https_proxy"]
        .iter()
        .find_map(|k| std::env::var(k).ok())
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| v.trim().parse().ok())
}

/// The system resolver, whose failures carry a type ([`ResolveError`]) that
/// callers can recognise without reading hyper-util's message.
#[derive(Clone)]
pub(crate) struct Resolver(GaiResolver);

impl Service<Name> for Resolver {
    type Response = GaiAddrs;
    type Error = ResolveError;
    type Future = Pin<Box<dyn Future<Output = Result<GaiAddrs, ResolveError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ResolveError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let host = name.as_str().to_owned();
        let lookup = self.0.call(name);
        Box::pin(async move { lookup.await.map_err(|source| ResolveError { host, source }) })
    }
}

/// The egress proxy failed to open the tunnel; hyper-util's error (with its
/// own causes) is the source.
#[derive(Debug, thiserror::Error)]
#[error("egress proxy")]
pub(crate) struct EgressProxyError(#[source] pub BoxError);

type Direct = HttpConnector<Resolver>;

/// A TCP connector that tunnels through a proxy unless the host bypasses it.
#[derive(Clone)]
pub struct EgressConnector {
    direct: Direct,
    /// The proxy tunnel and the `NO_PROXY` hosts that bypass it.
    tunnel: Option<(Tunnel<Direct>, Arc<Vec<String>>)>,
}

impl EgressConnector {
    pub fn new(proxy: Option<&Uri>, connect_timeout: Duration) -> EgressConnector {
        let mut direct = HttpConnector::new_with_resolver(Resolver(GaiResolver::new()));
        direct.enforce_http(false);
        direct.set_nodelay(true);
        direct.set_connect_timeout(Some(connect_timeout));
        let tunnel = proxy.map(|p| {
            let mut t = Tunnel::new(p.clone(), direct.clone());
            if let Some(auth) = proxy_basic_auth(p) {
                t = t.with_auth(auth);
            }
            (t, Arc::new(no_proxy_list()))
        });
        EgressConnector { direct, tunnel }
    }
}

/// `http://user:pass@proxy:3128` → `Proxy-Authorization: Basic …`.
fn proxy_basic_auth(p: &Uri) -> Option<HeaderValue> {
    use base64::Engine as _;
    let authority = p.authority()?.as_str();
    let (userinfo, _) = authority.rsplit_once('@')?;
    let decoded = percent_encoding::percent_decode_str(userinfo)
        .decode_utf8()
        .ok()?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(decoded.as_bytes());
    let mut v = HeaderValue::from_str(&format!("Basic {b64}")).ok()?;
    v.set_sensitive(true);
    Some(v)
}

fn no_proxy_list() -> Vec<String> {
    ["NO_PROXY", "no_proxy"]
        .iter()
        .find_map(|k| std::env::var(k).ok())
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().trim_start_matches('.').to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Loopback never goes through a proxy; `NO_PROXY` entries match the host
/// or any subdomain (`*` matches all).
pub fn bypasses(host: &str, no_proxy: &[String]) -> bool {
    if crate::net::is_loopback_host(host) {
        return true;
    }
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    no_proxy
        .iter()
        .any(|n| n == "*" || host == *n || host.ends_with(&format!(".{n}")))
}

impl Service<Uri> for EgressConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.direct.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let host = dst.host().unwrap_or("").to_owned();
        match &mut self.tunnel {
            Some((tunnel, no_proxy)) if !bypasses(&host, no_proxy) => {
                // CONNECT needs the port; hyper-util assumes 443 otherwise.
                let port = dst.port_u16().unwrap_or(match dst.scheme_str() {
                    Some("http") => 80,
                    _ => 443,
                });
                let target = Uri::builder()
                    .scheme(dst.scheme_str().unwrap_or("https"))
                    .authority(format!("{}:{port}", dst.host().unwrap_or("")))
                    .path_and_query("/")
                    .build();
                let mut tunnel = tunnel.clone();
                Box::pin(async move {
                    let target = target.map_err(|e| Box::new(e) as BoxError)?;
                    tunnel
                        .call(target)
                        .await
                        .map_err(|e| Box::new(EgressProxyError(Box::new(e))) as BoxError)
                })
            }
            _ => {
                let fut = self.direct.call(dst);
                Box::pin(async move { fut.await.map_err(Into::into) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_no_proxy_bypass() {
        let np = vec!["internal.example".to_owned(), "10.0.0.1".to_owned()];
        assert!(bypasses("127.0.0.1", &np));
        assert!(bypasses("[::1]", &np));
        assert!(bypasses("localhost", &np));
        assert!(bypasses("api.internal.example", &np));
        assert!(bypasses("10.0.0.1", &np));
        assert!(!bypasses("api.github.com", &np));
        assert!(!bypasses("notinternal.example", &np));
        assert!(bypasses("anything", &["*".to_owned()]));
    }

    #[test]
    fn proxy_credentials_become_basic_auth() {
        let u: Uri = "http://us%40er:p%3Ass@proxy:3128".parse().unwrap();
        let v = proxy_basic_auth(&u).unwrap();
        assert_eq!(v.to_str().unwrap(), "Basic dXNAZXI6cDpzcw==");
        assert!(proxy_basic_auth(&"http://proxy:3128".parse().unwrap()).is_none());
    }
}
