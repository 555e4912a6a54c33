//! The admin listener: health, readiness and credential status as JSON.
//! Reads the engine's status; changes nothing. Bound to loopback by default.

use crate::app::Live;
use crate::proxy::Listener;
use crate::token::engine::SlotStatus;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;
use tokio_util::sync::CancellationToken;

/// Serves until `shutdown`.
pub async fn serve(listener: Listener, live: Arc<Live>, shutdown: CancellationToken) {
    loop {
        let live = live.clone();
        let svc = service_fn(move |req| {
            let live = live.clone();
            async move { Ok::<_, Infallible>(handle(req, &live).await) }
        });
        let builder = auto::Builder::new(TokioExecutor::new());
        match &listener {
            Listener::Tcp(l) => {
                let accepted = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    a = l.accept() => a,
                };
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(async move {
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    });
                }
            }
            Listener::Unix(l) => {
                let accepted = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    a = l.accept() => a,
                };
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(async move {
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    });
                }
            }
        }
    }
}

async fn handle(req: Request<Incoming>, live: &Live) -> Response<Full<Bytes>> {
    if let Some(r) = crate::login::handle_admin(&req, live).await {
        return r;
    }
    if req.method() == Method::POST && req.uri().path() == "/reload" {
        // A browser cannot add this header cross-origin without a preflight.
        if req.headers().get("x-tokenproxy-admin").is_none() {
            return json(
                StatusCode::FORBIDDEN,
                r#"{"error":"missing_header","message":"send the header x-tokenproxy-admin: 1"}"#
                    .into(),
            );
        }
        return match live.reload().await {
            Ok(()) => json(StatusCode::OK, r#"{"reloaded":true}"#.into()),
            Err(e) => json(
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::json!({"reloaded": false, "error": "config_rejected", "message": e.to_string()}).to_string(),
            ),
        };
    }
    let engine = live.engine.load_full();
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"error":"method_not_allowed"}"#.into(),
        );
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => text(StatusCode::OK, "ready\n"),
        "/credentials" => {
            let all: Vec<_> = engine.status().iter().map(status_json).collect();
            json(StatusCode::OK, serde_json::Value::Array(all).to_string())
        }
        path => match path.strip_prefix("/credentials/") {
            Some(name) => {
                let found: Vec<_> = engine
                    .status()
                    .iter()
                    .filter(|s| s.credential == name)
                    .map(status_json)
                    .collect();
                match found.len() {
                    0 => json(
                        StatusCode::NOT_FOUND,
                        r#"{"error":"no_such_credential"}"#.into(),
                    ),
                    1 => json(StatusCode::OK, found[0].to_string()),
                    _ => json(StatusCode::OK, serde_json::Value::Array(found).to_string()),
                }
            }
            None => json(StatusCode::NOT_FOUND, r#"{"error":"not_found"}"#.into()),
        },
    }
}

fn secs_since_epoch(t: Option<SystemTime>) -> serde_json::Value {
    t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| serde_json::json!(d.as_secs()))
        .unwrap_or(serde_json::Value::Null)
}

/// Secret-free by construction: `SlotStatus` holds no token.
pub fn status_json(s: &SlotStatus) -> serde_json::Value {
    serde_json::json!({
        "credential": s.credential,
        "grant_type": s.grant_type,
        "state": s.state,
        "state_since": secs_since_epoch(s.state_since),
        "expires_in_s": s.expires_in.map(|d| d.as_secs()),
        "family": s.family,
        "generation": s.generation,
        "last_refresh": secs_since_epoch(s.last_refresh),
        "last_error": s.last_error.as_ref().map(|f| serde_json::json!({
            "outcome": f.outcome,
            "reason": f.reason,
            "status": f.status,
            "hint": f.hint,
            "at": secs_since_epoch(Some(f.at)),
        })),
        "refresh_token_fp": s.refresh_token_fp,
    })
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    r
}
