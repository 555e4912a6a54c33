//! Authorization-server metadata (RFC 8414, OpenID Connect Discovery): fills
//! a credential's endpoints from its `issuer`, and a small one-shot HTTPS
//! fetch shared with `doctor`. Sends no secret; caches nothing.

use crate::config::CredentialConfig;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

const MAX_METADATA_BYTES: usize = 256 * 1024;
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The fields of the metadata that tokenproxy uses or checks.
#[derive(Debug, Clone, Default)]
pub struct Metadata {
    /// Where it was found.
    pub url: String,
    pub issuer: String,
    pub token_endpoint: Option<String>,
    pub authorization_endpoint: Option<String>,
    pub grant_types_supported: Option<Vec<String>>,
    pub token_endpoint_auth_methods_supported: Option<Vec<String>>,
    pub code_challenge_methods_supported: Option<Vec<String>>,
    /// `mtls_endpoint_aliases.token_endpoint` (RFC 8705 §5): where clients
    /// authenticating with a certificate send token requests.
    pub mtls_token_endpoint: Option<String>,
    /// RFC 8628 §4: where `tokenproxy login --device` starts.
    pub device_authorization_endpoint: Option<String>,
    /// RFC 9449 §5.1: the proof algorithms the IdP accepts.
    pub dpop_signing_alg_values_supported: Option<Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("{url} is not a valid URL")]
    BadUrl { url: String },
    #[error("cannot fetch {url}")]
    Fetch {
        url: String,
        #[source]
        source: FetchError,
    },
    #[error("no metadata at {issuer}/.well-known/openid-configuration or /.well-known/oauth-authorization-server (last answer: {status})")]
    NotFound { issuer: String, status: String },
    #[error("metadata at {url} is not a JSON object")]
    NotJson { url: String },
    #[error("metadata at {url} says issuer {found:?}, but the config says {configured:?}; they must be equal (RFC 8414 §3.3): fix `issuer`")]
    IssuerMismatch {
        url: String,
        found: String,
        configured: String,
    },
    #[error("metadata at {url} has no {field}")]
    Missing { url: String, field: &'static str },
    #[error("metadata at {url} gives {field} {value:?}, which must use https (http is allowed only on loopback, as for a configured endpoint)")]
    Insecure {
        url: String,
        field: &'static str,
        value: String,
    },
    #[error("TLS settings")]
    Tls(#[source] crate::tls::TlsError),
}

/// Why a one-shot fetch failed. The transport's errors stay as sources, so
/// callers can tell a DNS failure from an untrusted certificate by type.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot build the request")]
    Request(#[source] http::Error),
    #[error(transparent)]
    Exchange(hyper_util::client::legacy::Error),
    #[error("the response body failed")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl FetchError {
    /// Why the server could not be reached, for advice.
    pub(crate) fn unreachable(&self) -> crate::net::Unreachable {
        match self {
            FetchError::Timeout(_) => crate::net::Unreachable::TimedOut,
            e => crate::net::unreachable_cause(e),
        }
    }
}

/// An HTTP answer, headers and (capped) body.
#[derive(Debug)]
pub struct Fetched {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// One request, no body, no redirects followed. Errors carry the whole cause
/// chain (TLS reasons included).
pub async fn fetch(
    tls: rustls::ClientConfig,
    method: Method,
    uri: &Uri,
    egress: Option<&Uri>,
) -> Result<Fetched, FetchError> {
    let http = crate::egress::EgressConnector::new(egress, Duration::from_secs(5));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(https);
    let req = Request::builder()
        .method(method)
        .uri(uri.clone())
        .header(http::header::ACCEPT, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("tokenproxy/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::new())
        .map_err(FetchError::Request)?;
    let go = async {
        let resp = client.request(req).await.map_err(FetchError::Exchange)?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, MAX_METADATA_BYTES)
            .collect()
            .await
            .map_err(FetchError::Body)?
            .to_bytes();
        Ok(Fetched {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(FETCH_TIMEOUT, go)
        .await
        .map_err(|_| FetchError::Timeout(FETCH_TIMEOUT))?
}

/// The TLS settings the credential uses for its IdP.
pub fn tls_for(cred: &CredentialConfig) -> Result<rustls::ClientConfig, DiscoveryError> {
    let client_cert = match (&cred.client_cert, &cred.client_key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        _ => None,
    };
    crate::tls::client_config(cred.ca_file.as_deref(), client_cert, &[])
        .map_err(DiscoveryError::Tls)
}

/// The issuer as configured, without a trailing slash (RFC 8414 §3: the
/// well-known path is appended to it).
fn issuer_str(issuer: &Uri) -> String {
    issuer.to_string().trim_end_matches('/').to_owned()
}

/// Fetches `{issuer}/.well-known/openid-configuration`, falling back to
/// `/.well-known/oauth-authorization-server`, and checks `issuer`.
pub async fn discover(
    cred: &CredentialConfig,
    issuer: &Uri,
    egress: Option<&Uri>,
) -> Result<Metadata, DiscoveryError> {
    let tls = tls_for(cred)?;
    let base = issuer_str(issuer);
    let mut last = String::new();
    for suffix in [
        "/.well-known/openid-configuration",
        "/.well-known/oauth-authorization-server",
    ] {
        let url = format!("{base}{suffix}");
        let uri: Uri = url
            .parse()
            .map_err(|_| DiscoveryError::BadUrl { url: url.clone() })?;
        let got = fetch(tls.clone(), Method::GET, &uri, egress)
            .await
            .map_err(|source| DiscoveryError::Fetch {
                url: url.clone(),
                source,
            })?;
        if !got.status.is_success() {
            last = got.status.to_string();
            continue;
        }
        return parse_metadata(&url, &got.body, &base);
    }
    Err(DiscoveryError::NotFound {
        issuer: base,
        status: last,
    })
}

/// Sans-IO: the metadata document, checked against the configured issuer.
pub fn parse_metadata(url: &str, body: &[u8], issuer: &str) -> Result<Metadata, DiscoveryError> {
    let Ok(serde_json::Value::Object(m)) = serde_json::from_slice(body) else {
        return Err(DiscoveryError::NotJson { url: url.into() });
    };
    let s = |k: &str| m.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let list = |k: &str| {
        m.get(k).and_then(|v| v.as_array()).map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
    };
    let found = s("issuer").ok_or(DiscoveryError::Missing {
        url: url.into(),
        field: "issuer",
    })?;
    if found.trim_end_matches('/') != issuer.trim_end_matches('/') {
        return Err(DiscoveryError::IssuerMismatch {
            url: url.into(),
            found,
            configured: issuer.into(),
        });
    }
    Ok(Metadata {
        url: url.into(),
        issuer: found,
        token_endpoint: s("token_endpoint"),
        authorization_endpoint: s("authorization_endpoint"),
        grant_types_supported: list("grant_types_supported"),
        token_endpoint_auth_methods_supported: list("token_endpoint_auth_methods_supported"),
        code_challenge_methods_supported: list("code_challenge_methods_supported"),
        mtls_token_endpoint: m
            .get("mtls_endpoint_aliases")
            .and_then(|a| a.get("token_endpoint"))
            .and_then(|v| v.as_str())
            .map(str::to_owned),
        device_authorization_endpoint: s("device_authorization_endpoint"),
        dpop_signing_alg_values_supported: list("dpop_signing_alg_values_supported"),
    })
}

/// The credential's token and authorize endpoints: as configured, else from
/// discovery when `issuer` is set (DESIGN.md "Grants").
pub async fn endpoints(
    cred: &CredentialConfig,
    egress: Option<&Uri>,
) -> Result<(Uri, Option<Uri>), DiscoveryError> {
    let (token, authorize, _) = resolve(cred, egress, false).await?;
    Ok((token, authorize))
}

/// The token and device authorization endpoints (RFC 8628 §3.1), as
/// configured, else from discovery (docs/device-login.md).
pub async fn device_endpoints(
    cred: &CredentialConfig,
    egress: Option<&Uri>,
) -> Result<(Uri, Option<Uri>), DiscoveryError> {
    let (token, _, device) = resolve(cred, egress, true).await?;
    Ok((token, device))
}

/// Configured endpoints, the missing ones from discovery. `device`: whether
/// the device endpoint (rather than the authorize one) decides that
/// discovery is needed.
async fn resolve(
    cred: &CredentialConfig,
    egress: Option<&Uri>,
    device: bool,
) -> Result<(Uri, Option<Uri>, Option<Uri>), DiscoveryError> {
    let other = if device {
        &cred.device_authorization_url
    } else {
        &cred.authorize_url
    };
    if let (Some(t), Some(_)) = (&cred.token_url, other) {
        return Ok((
            t.clone(),
            cred.authorize_url.clone(),
            cred.device_authorization_url.clone(),
        ));
    }
    let Some(issuer) = &cred.issuer else {
        return match &cred.token_url {
            Some(t) => Ok((
                t.clone(),
                cred.authorize_url.clone(),
                cred.device_authorization_url.clone(),
            )),
            None => Err(DiscoveryError::Missing {
                url: "the config".into(),
                field: "token_url (or issuer)",
            }),
        };
    };
    let md = discover(cred, issuer, egress).await?;
    let parse = |field: &'static str, v: Option<String>| -> Result<Option<Uri>, DiscoveryError> {
        let Some(v) = v else { return Ok(None) };
        let uri: Uri = v.parse().map_err(|_| DiscoveryError::Missing {
            url: md.url.clone(),
            field: match field {
                "token_endpoint" => "a valid token_endpoint",
                "device_authorization_endpoint" => "a valid device_authorization_endpoint",
                _ => "a valid authorization_endpoint",
            },
        })?;
        // The same rule as a configured endpoint: these carry client
        // secrets, codes and refresh tokens.
        let host = uri.host().unwrap_or("");
        let secure = match uri.scheme_str() {
            Some("https") => !host.is_empty(),
            Some("http") => crate::config::is_loopback_host(host),
            _ => false,
        };
        if !secure {
            return Err(DiscoveryError::Insecure {
                url: md.url.clone(),
                field,
                value: v,
            });
        }
        Ok(Some(uri))
    };
    let token = match &cred.token_url {
        Some(t) => t.clone(),
        // RFC 8705 §5: certificate-bound clients use the aliases.
        None if cred.auth_method.is_mtls() && md.mtls_token_endpoint.is_some() => {
            parse("token_endpoint", md.mtls_token_endpoint.clone())?.ok_or(
                DiscoveryError::Missing {
                    url: md.url.clone(),
                    field: "token_endpoint",
                },
            )?
        }
        None => {
            parse("token_endpoint", md.token_endpoint.clone())?.ok_or(DiscoveryError::Missing {
                url: md.url.clone(),
                field: "token_endpoint",
            })?
        }
    };
    let authorize = match &cred.authorize_url {
        Some(a) => Some(a.clone()),
        None if device => None,
        None => parse("authorization_endpoint", md.authorization_endpoint.clone())?,
    };
    let device_url = match &cred.device_authorization_url {
        Some(d) => Some(d.clone()),
        None if !device => None,
        None => parse(
            "device_authorization_endpoint",
            md.device_authorization_endpoint.clone(),
        )?,
    };
    Ok((token, authorize, device_url))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuer_must_match() {
        let body = br#"{"issuer":"https://a.example","token_endpoint":"https://a.example/t"}"#;
        let md = parse_metadata("u", body, "https://a.example/").unwrap();
        assert_eq!(md.token_endpoint.as_deref(), Some("https://a.example/t"));
        assert_eq!(md.mtls_token_endpoint, None);
        assert_eq!(md.device_authorization_endpoint, None);
        let body = br#"{"issuer":"https://a.example","device_authorization_endpoint":"https://a.example/device"}"#;
        let md = parse_metadata("u", body, "https://a.example").unwrap();
        assert_eq!(
            md.device_authorization_endpoint.as_deref(),
            Some("https://a.example/device")
        );
        let body = br#"{"issuer":"https://a.example","mtls_endpoint_aliases":{"token_endpoint":"https://mtls.a.example/t"}}"#;
        let md = parse_metadata("u", body, "https://a.example").unwrap();
        assert_eq!(
            md.mtls_token_endpoint.as_deref(),
            Some("https://mtls.a.example/t")
        );
        let e = parse_metadata("u", body, "https://b.example").unwrap_err();
        assert!(e.to_string().contains("must be equal"), "{e}");
        assert!(parse_metadata("u", b"[]", "x").is_err());
    }

    /// A TLS server on `ip` with the dev test certificate (127.0.0.1 and
    /// localhost only), answering nothing after the handshake.
    async fn tls_listener(ip: &str) -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(crate::dev::tls::test_server_config());
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = acceptor.accept(s).await;
                });
            }
        });
        addr
    }

    fn trusting_test_ca() -> rustls::ClientConfig {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, crate::dev::tls::TEST_CA_PEM).unwrap();
        crate::tls::client_config(Some(&ca), None, &[]).unwrap()
    }

    async fn why(tls: rustls::ClientConfig, url: &str) -> crate::net::Unreachable {
        let e = fetch(tls, Method::GET, &url.parse().unwrap(), None)
            .await
            .unwrap_err();
        e.unreachable()
    }

    /// The advice `doctor` gives hangs on these types, not on message text.
    #[tokio::test]
    async fn fetch_failures_are_classified_by_type() {
        use crate::net::Unreachable as U;
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let plain_port = plain.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = plain.accept().await {
                use tokio::io::AsyncWriteExt;
                let _ = s
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        let webpki = crate::tls::client_config(None, None, &[]).unwrap();
        let tls = tls_listener("127.0.0.1").await;
        let other_name = tls_listener("127.0.0.2").await;

        assert_eq!(
            why(webpki.clone(), &format!("http://127.0.0.1:{port}/")).await,
            U::Refused
        );
        assert_eq!(
            why(webpki.clone(), "https://no-such-host.invalid/").await,
            U::NoSuchHost
        );
        assert_eq!(
            why(webpki.clone(), &format!("https://127.0.0.1:{plain_port}/")).await,
            U::NotTls
        );
        assert_eq!(
            why(webpki, &format!("https://127.0.0.1:{}/", tls.port())).await,
            U::CertificateUntrusted
        );
        assert_eq!(
            why(
                trusting_test_ca(),
                &format!("https://127.0.0.2:{}/", other_name.port())
            )
            .await,
            U::CertificateWrongName
        );
    }
}
