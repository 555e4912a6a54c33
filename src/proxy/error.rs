//! The one table that turns a failure the proxy itself detected into an HTTP
//! response (the list is in docs/architecture.md).
//!
//! Every proxy-made response carries a JSON body with a stable `error` code,
//! the request id, and the header `x-tokenproxy-error`, so a client can tell a
//! proxy-made 502 from the upstream's. Nothing here ever sees a token or the
//! client's `Authorization` value; causes are logged where they happen, not
//! put in bodies.

use super::body::{full, ProxyBody};
use crate::token::CredentialUnavailable;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderName, HeaderValue, Response, StatusCode};

pub(crate) static X_TOKENPROXY_ERROR: HeaderName = HeaderName::from_static("x-tokenproxy-error");
pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A failure the proxy answers itself, instead of the upstream.
#[derive(Debug)]
pub enum ProxyError {
    /// No route matches the host and path.
    NoRoute,
    /// `Host`/`:authority` is not a loopback name, listen address or configured host.
    HostNotAllowed,
    /// A browser marked the request cross-site, or sent a foreign `Origin`.
    CrossSite,
    /// A malformed request (bad path, bad Host...); the text is static and safe.
    BadRequest(&'static str),
    /// `CONNECT`: we are not a forward proxy.
    MethodNotAllowed,
    /// The route's credential has no usable token; never forwarded.
    CredentialUnavailable(CredentialUnavailable),
    /// Connect, DNS, TLS or connection failure before a response arrived.
    UpstreamUnreachable,
    /// No response headers within the route's `response_timeout`.
    UpstreamTimeout,
    /// An `Upgrade` request on a route without `upgrades = true`.
    UpgradeNotEnabled,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::HostNotAllowed => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::CrossSite => StatusCode::FORBIDDEN,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::CredentialUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UpgradeNotEnabled => StatusCode::NOT_IMPLEMENTED,
        }
    }

    /// The stable machine-readable code (body `error` and `x-tokenproxy-error`).
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no_route",
            ProxyError::HostNotAllowed => "host_not_allowed",
            ProxyError::CrossSite => "cross_site_request",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::MethodNotAllowed => "method_not_allowed",
            ProxyError::CredentialUnavailable(_) => "credential_unavailable",
            ProxyError::UpstreamUnreachable => "upstream_unreachable",
            ProxyError::UpstreamTimeout => "upstream_timeout",
            ProxyError::UpgradeNotEnabled => "upgrade_not_enabled",
        }
    }

    pub(crate) fn message(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no route matches this host and path",
            ProxyError::HostNotAllowed => {
                "Host is not a loopback name, a listen address or in server.hosts"
            }
            ProxyError::CrossSite => "cross-site browser requests are refused",
            ProxyError::BadRequest(m) => m,
            ProxyError::MethodNotAllowed => "CONNECT is not supported: this is not a forward proxy",
            ProxyError::CredentialUnavailable(_) => "no usable token for this route's credential",
            ProxyError::UpstreamUnreachable => "the upstream could not be reached",
            ProxyError::UpstreamTimeout => "the upstream did not answer in time",
            ProxyError::UpgradeNotEnabled => "protocol upgrades are not enabled on this route",
        }
    }
}

/// The response for `err`. The only place a proxy-made status is chosen.
pub fn into_response(err: &ProxyError, request_id: &HeaderValue) -> Response<ProxyBody> {
    let mut body = serde_json::json!({
        "error": err.code(),
        "message": err.message(),
        "request_id": request_id.to_str().unwrap_or(""),
    });
    let mut retry_after = None;
    if let ProxyError::CredentialUnavailable(cu) = err {
        body["credential"] = cu.credential.clone().into();
        body["reason"] = cu.reason.as_str().into();
        body["hint"] = cu.hint.clone().into();
        if let Some(d) = cu.retry_after {
            // Round up: "retry in 0 s" would invite a hot loop.
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            body["retry_after"] = secs.into();
            retry_after = Some(HeaderValue::from(secs));
        }
    }
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = err.status();
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        X_TOKENPROXY_ERROR.clone(),
        HeaderValue::from_static(err.code()),
    );
    h.insert(X_REQUEST_ID.clone(), request_id.clone());
    if let Some(v) = retry_after {
        h.insert(RETRY_AFTER, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::time::Duration;

    async fn json(resp: Response<ProxyBody>) -> serde_json::Value {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn every_error_has_code_header_and_request_id() {
        let rid = HeaderValue::from_static("abc123");
        let cases = [
            (ProxyError::NoRoute, 404, "no_route"),
            (ProxyError::HostNotAllowed, 421, "host_not_allowed"),
            (ProxyError::CrossSite, 403, "cross_site_request"),
            (ProxyError::BadRequest("bad path"), 400, "bad_request"),
            (ProxyError::MethodNotAllowed, 405, "method_not_allowed"),
            (ProxyError::UpstreamUnreachable, 502, "upstream_unreachable"),
            (ProxyError::UpstreamTimeout, 504, "upstream_timeout"),
            (ProxyError::UpgradeNotEnabled, 501, "upgrade_not_enabled"),
        ];
        for (err, status, code) in cases {
            let resp = into_response(&err, &rid);
            assert_eq!(resp.status().as_u16(), status);
            assert_eq!(resp.headers()["x-tokenproxy-error"], code);
            assert_eq!(resp.headers()["x-request-id"], "abc123");
            assert_eq!(resp.headers()["content-type"], "application/json");
            assert_eq!(resp.headers()["cache-control"], "no-store");
            let v = json(resp).await;
            assert_eq!(v["error"], code);
            assert_eq!(v["request_id"], "abc123");
            assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }

    #[tokio::test]
    async fn credential_unavailable_names_credential_reason_hint_and_retry_after() {
        let err = ProxyError::CredentialUnavailable(CredentialUnavailable {
            credential: "github".into(),
            reason: crate::token::reason::Reason::Idp("invalid_grant".into()),
            hint: "run tokenproxy login github".into(),
            retry_after: Some(Duration::from_millis(1500)),
        });
        let resp = into_response(&err, &HeaderValue::from_static("r1"));
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["retry-after"], "2");
        assert_eq!(
            resp.headers()["x-tokenproxy-error"],
            "credential_unavailable"
        );
        let v = json(resp).await;
        assert_eq!(v["credential"], "github");
        assert_eq!(v["reason"], "invalid_grant");
        assert_eq!(v["hint"], "run tokenproxy login github");
        assert_eq!(v["retry_after"], 2);
    }

    #[tokio::test]
    async fn credential_unavailable_without_retry_after_has_no_header() {
        let err = ProxyError::CredentialUnavailable(CredentialUnavailable {
            credential: "c".into(),
            reason: crate::token::reason::Reason::LostRotation,
            hint: "h".into(),
            retry_after: None,
        });
        let resp = into_response(&err, &HeaderValue::from_static("r"));
        assert!(resp.headers().get("retry-after").is_none());
    }
}
