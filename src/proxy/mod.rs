//! The proxy data path: listeners and connection serving, the router, header
//! hygiene, token injection, URI rewriting, the forwarder, and the one table
//! that maps proxy errors to responses ([`error`]).
//!
//! Per request: host allowlist and cross-site check → path safety → route →
//! token (before anything is sent upstream) → header hygiene → forward with
//! timeouts → response hygiene (hop-by-hop, `Location`/`Link`).
//!
//! Sees the token engine only through [`RouteToken`]: `get_for` for the
//! header value (an `ArcSwap` load when a usable token is cached, else a
//! wait, bounded by `refresh_wait`, on the engine's single-flight refresh)
//! and `rejected` when the upstream refuses it (`refresh_on`). It must not
//! know how tokens are obtained or refreshed. Everything a request needs
//! (parsed upstreams, header names, clients) is built once in
//! [`Proxy::new`]; per request the proxy is an `ArcSwap` load, and the only
//! lock is the connection's own `Host` cache (never contended: one
//! connection's requests take turns).

mod body;
pub(crate) mod error;
mod forward;
mod h1;
mod h1_server;
mod headers;
mod listener;
mod router;

pub(crate) use body::{BodyIdleTimeout, BoxError, ProxyBody};
pub(crate) use error::ProxyError;
pub(crate) use forward::set_worker;
pub use forward::ProxyBuildError;
pub(crate) use headers::{host_of, is_cross_site, HostPolicy};
pub use listener::{bind, serve, Listener};
pub(crate) use listener::{serve_guarded, Guards};
pub(crate) use listener::{serve_with_permits, StdListener};

/// The current proxy, swapped whole on reload.
pub type SharedProxy = Arc<arc_swap::ArcSwap<Proxy>>;

use crate::config::{Config, ListenAddr, RouteConfig};
use crate::token::RouteToken;
use body::{empty, IdleTimeout};
use error::X_REQUEST_ID;
use forward::{ClientKey, HttpsConnect, Pool, Upstream};
use headers::LinkRewriter;
use http::header::{HOST, LINK, LOCATION, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::Body;
use http_body_util::BodyExt;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// One configured route, ready to serve.
struct Route {
    /// `path_prefix`, the route's name in logs.
    label: String,
    token: RouteToken,
    header: HeaderName,
    target: Target,
    upgrades: bool,
    response_timeout: Duration,
    idle_timeout: Duration,
    /// Upstream statuses that mean "token rejected" (`refresh_on`).
    refresh_on: Vec<StatusCode>,
    /// Replay once after a reactive refresh; bodies up to this size are
    /// buffered for it (None: replay off).
    replay_max_body: Option<u64>,
    metrics: crate::metrics::RouteMetrics,
}

/// Where a route's requests go, with the clients that take them there.
struct Dest {
    upstream: Upstream,
    rewriter: LinkRewriter,
    pool: Arc<Pool>,
    /// HTTP/1.1-only twin of `pool` for upgrades (`upgrades = true` only).
    upgrade_pool: Option<Arc<Pool>>,
}

// The common static destination stays inline (no indirection per request);
// the rare token-value one is boxed.
#[allow(clippy::large_enum_variant)]
enum Target {
    /// Built once per config.
    Static(Dest),
    /// `upstream = "{token.NAME}/path"`: built once per value.
    FromToken(Box<FromToken>),
}

/// Builds (or shares) the pool for an upstream's origin.
type PoolFor<'a> = dyn FnMut(ClientKey, &http::Uri) -> Result<Arc<Pool>, ProxyBuildError> + 'a;

/// A destination that follows a value of the credential's token responses
/// (checked by `token::fields`). The value changes rarely (Salesforce: an
/// org migration), so the last one built is kept, and a request whose token
/// carries it costs one `ArcSwap` load and a string compare.
struct FromToken {
    field: crate::token_fields::TokenField,
    /// The configured path the requests go under.
    path: String,
    connector: HttpsConnect,
    upgrade_connector: Option<HttpsConnect>,
    workers: usize,
    prefix: String,
    strip_prefix: bool,
    current: arc_swap::ArcSwapOption<(Arc<str>, Arc<Dest>)>,
}

impl FromToken {
    fn dest(&self, origin: &Arc<str>) -> Option<Arc<Dest>> {
        if let Some(cur) = &*self.current.load() {
            if cur.0 == *origin {
                return Some(cur.1.clone());
            }
        }
        // Two requests may build at once: one wins, the other's serves once.
        let uri: http::Uri = format!("{origin}{}", self.path).parse().ok()?;
        let upstream = Upstream::new(&uri, &self.prefix, self.strip_prefix)?;
        let (scheme, authority) = (uri.scheme()?.clone(), uri.authority()?.clone());
        let pool = |c: &HttpsConnect, lean: bool| {
            Arc::new(Pool::new(
                c.clone(),
                scheme.clone(),
                authority.clone(),
                self.workers,
                lean,
            ))
        };
        let dest = Arc::new(Dest {
            rewriter: LinkRewriter::new(&uri, &upstream.base, &self.prefix, self.strip_prefix),
            upstream,
            pool: pool(&self.connector, true),
            upgrade_pool: self.upgrade_connector.as_ref().map(|c| pool(c, false)),
        });
        tracing::info!(
            event = "upstream_from_token",
            route = self.prefix.as_str(),
            field = self.field.as_str(),
            upstream = &**origin,
            "Route upstream set from the token response"
        );
        self.current
            .store(Some(Arc::new((origin.clone(), dest.clone()))));
        Some(dest)
    }
}

/// A route's destination for one request: borrowed, or held while a
/// token-value destination may be replaced.
enum DestRef<'a> {
    Borrowed(&'a Dest),
    Held(Arc<Dest>),
}

impl std::ops::Deref for DestRef<'_> {
    type Target = Dest;
    fn deref(&self) -> &Dest {
        match self {
            DestRef::Borrowed(d) => d,
            DestRef::Held(d) => d,
        }
    }
}

impl Route {
    /// The upstream host for logs (the token value's name when it varies).
    fn upstream_host(&self) -> &str {
        match &self.target {
            Target::Static(d) => d.upstream.host_header.to_str().unwrap_or(""),
            Target::FromToken(f) => f.field.placeholder(),
        }
    }
}

/// All routes, clients and settings of the data path. Built once per config.
pub struct Proxy {
    routes: Vec<Route>,
    router: router::Router,
    hosts: HostPolicy,
    tls: Option<tokio_rustls::TlsAcceptor>,
    max_connections: usize,
    shutdown_grace: Duration,
    header_read_timeout: Duration,
    keepalive_timeout: Duration,
    max_header_bytes: usize,
    max_headers: usize,
    /// Requests that matched no route.
    unrouted: crate::metrics::RouteMetrics,
    /// `log.access`: one info line per request.
    access_log: bool,
}

/// What the pipeline knows about the connection a request came on. Built
/// once per connection: per-request work that only depends on the
/// connection is done here.
#[derive(Debug)]
pub(crate) struct ConnInfo {
    pub tls: bool,
    /// The peer as an `X-Forwarded-For` entry; None on unix sockets.
    forwarded_for: Option<HeaderValue>,
    /// The last `Host` value and its normalized host: keep-alive clients
    /// send the same one on every request.
    last_host: parking_lot::Mutex<Option<(HeaderValue, Arc<str>)>>,
}

impl ConnInfo {
    pub(crate) fn new(remote_ip: Option<IpAddr>, tls: bool) -> ConnInfo {
        ConnInfo {
            tls,
            forwarded_for: remote_ip
                .and_then(|ip| HeaderValue::from_str(&ip.to_canonical().to_string()).ok()),
            last_host: parking_lot::Mutex::new(None),
        }
    }

    /// [`headers::host_of`] of `value`, remembered for the next request.
    fn host_of(&self, value: &HeaderValue) -> Option<Arc<str>> {
        if let Some((v, host)) = &*self.last_host.lock() {
            if v == value {
                return Some(host.clone());
            }
        }
        let host: Arc<str> = value.to_str().ok().and_then(headers::host_of)?.into();
        // A copy: `value` shares the connection's whole read buffer, which
        // this would keep alive as long as the connection.
        let owned = HeaderValue::from_bytes(value.as_bytes()).ok()?;
        *self.last_host.lock() = Some((owned, host.clone()));
        Some(host)
    }
}

impl Proxy {
    /// Build the data path. `token_for_route(i, route)` gives route `i`
    /// (its position in `config.routes`) its token handle.
    pub fn new(
        config: &Config,
        token_for_route: &dyn Fn(usize, &RouteConfig) -> RouteToken,
    ) -> Result<Arc<Proxy>, ProxyBuildError> {
        let mut connectors: HashMap<ClientKey, HttpsConnect> = HashMap::new();
        let mut pools: HashMap<(ClientKey, String), Arc<Pool>> = HashMap::new();
        let egress = crate::egress::proxy_from(config.server.egress_proxy.as_ref());
        // Routes to the same origin with the same settings share a pool.
        let mut pool_for = |key: ClientKey,
                            upstream: &http::Uri|
         -> Result<Arc<Pool>, ProxyBuildError> {
            let origin = format!(
                "{}://{}",
                upstream.scheme_str().unwrap_or(""),
                upstream.authority().map_or("", |a| a.as_str())
            );
            if let Some(p) = pools.get(&(key.clone(), origin.clone())) {
                return Ok(p.clone());
            }
            let connector = match connectors.get(&key) {
                Some(c) => c.clone(),
                None => {
                    let c = forward::build_connector(&key, egress.as_ref())?;
                    connectors.insert(key.clone(), c.clone());
                    c
                }
            };
            let (Some(scheme), Some(authority)) = (upstream.scheme(), upstream.authority()) else {
                return Err(ProxyBuildError::Upstream {
                    route: upstream.to_string(),
                });
            };
            let pool = Arc::new(Pool::new(
                connector,
                scheme.clone(),
                authority.clone(),
                config.server.worker_threads,
                // The upgrade pool needs hyper's protocol switch.
                !key.h1_only,
            ));
            pools.insert((key, origin), pool.clone());
            Ok(pool)
        };

        let mut routes = Vec::with_capacity(config.routes.len());
        for (i, rc) in config.routes.iter().enumerate() {
            let key = ClientKey {
                ca_file: rc.ca_file.clone(),
                connect_timeout: rc.connect_timeout,
                h1_only: false,
            };
            let target = if let Some(field) = rc.upstream_from {
                Target::FromToken(Box::new(FromToken {
                    field,
                    path: rc.upstream.path().to_owned(),
                    connector: forward::build_connector(&key, egress.as_ref())?,
                    upgrade_connector: if rc.upgrades {
                        Some(forward::build_connector(
                            &ClientKey {
                                h1_only: true,
                                ..key.clone()
                            },
                            egress.as_ref(),
                        )?)
                    } else {
                        None
                    },
                    workers: config.server.worker_threads,
                    prefix: rc.path_prefix.clone(),
                    strip_prefix: rc.strip_prefix,
                    current: arc_swap::ArcSwapOption::empty(),
                }))
            } else {
                Target::Static(Self::static_dest(rc, key, &mut pool_for)?)
            };
            routes.push(Route {
                label: rc.path_prefix.clone(),
                token: token_for_route(i, rc),
                header: rc.header.clone(),
                target,
                upgrades: rc.upgrades,
                response_timeout: rc.response_timeout,
                idle_timeout: rc.idle_timeout,
                refresh_on: rc
                    .refresh_on
                    .iter()
                    .filter_map(|s| StatusCode::from_u16(*s).ok())
                    .collect(),
                replay_max_body: rc.replay.then_some(rc.replay_max_body),
                metrics: crate::metrics::metrics().route(&rc.path_prefix),
            });
        }
        Self::finish(config, routes)
    }

    fn static_dest(
        rc: &RouteConfig,
        key: ClientKey,
        pool_for: &mut PoolFor<'_>,
    ) -> Result<Dest, ProxyBuildError> {
        let upstream = Upstream::new(&rc.upstream, &rc.path_prefix, rc.strip_prefix)
            // Validated config guarantees scheme and authority.
            .ok_or_else(|| ProxyBuildError::Upstream {
                route: rc.path_prefix.clone(),
            })?;
        let upgrade_pool = if rc.upgrades {
            Some(pool_for(
                ClientKey {
                    h1_only: true,
                    ..key.clone()
                },
                &rc.upstream,
            )?)
        } else {
            None
        };
        Ok(Dest {
            rewriter: LinkRewriter::new(
                &rc.upstream,
                &upstream.base,
                &rc.path_prefix,
                rc.strip_prefix,
            ),
            upstream,
            pool: pool_for(key, &rc.upstream)?,
            upgrade_pool,
        })
    }

    fn finish(config: &Config, routes: Vec<Route>) -> Result<Arc<Proxy>, ProxyBuildError> {
        let router = router::Router::new(
            config
                .routes
                .iter()
                .map(|r| (r.path_prefix.as_str(), r.host.as_deref())),
        );
        let mut names: Vec<String> = config.server.hosts.clone();
        names.extend(config.routes.iter().filter_map(|r| r.host.clone()));
        for l in &config.server.listen {
            if let ListenAddr::Tcp(a) = l {
                if !a.ip().is_unspecified() {
                    names.push(HostPolicy::ip_name(a.ip()));
                }
            }
        }
        let tls = match (&config.server.tls_cert, &config.server.tls_key) {
            (Some(cert), Some(key)) => Some(listener::tls_acceptor(cert, key)?),
            _ => None,
        };
        Ok(Arc::new(Proxy {
            routes,
            router,
            hosts: HostPolicy::new(names),
            tls,
            max_connections: config.server.max_connections.max(1),
            shutdown_grace: config.server.shutdown_grace,
            header_read_timeout: config.server.header_read_timeout,
            keepalive_timeout: config.server.keepalive_timeout,
            max_header_bytes: config.server.max_header_bytes,
            max_headers: config.server.max_headers,
            unrouted: crate::metrics::metrics().route("none"),
            access_log: config.log.access,
        }))
    }

    /// Serve one request: the proxied response, or a proxy error response.
    /// Always carries `x-request-id`; logs one debug event.
    pub(crate) async fn handle<B>(&self, req: Request<B>, conn: &ConnInfo) -> Response<ProxyBody>
    where
        B: Body<Data = bytes::Bytes> + Send + Sync + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let start = Instant::now();
        let request_id = headers::request_id(req.headers());
        let method = req.method().clone();
        // Only paid for when the access log is on; never the query string.
        let path = self.access_log.then(|| req.uri().path().to_owned());
        let mut route = None;
        let mut resp = match self.forward(req, conn, &request_id, &mut route).await {
            Ok(r) => r,
            Err(e) => error::into_response(&e, &request_id),
        };
        resp.headers_mut()
            .insert(X_REQUEST_ID.clone(), request_id.clone());
        let route = route.map(|i| &self.routes[i]);
        route.map_or(&self.unrouted, |r| &r.metrics).request(
            resp.status().as_u16(),
            start.elapsed(),
            resp.headers().contains_key(&error::X_TOKENPROXY_ERROR),
        );
        tracing::debug!(
            route = route.map_or("", |r| r.label.as_str()),
            method = method.as_str(),
            status = resp.status().as_u16(),
            duration_ms = start.elapsed().as_millis() as u64,
            request_id = request_id.to_str().unwrap_or(""),
            upstream = route.map_or("", Route::upstream_host),
            "Request served"
        );
        if let Some(path) = path {
            tracing::info!(
                event = "access",
                route = route.map_or("", |r| r.label.as_str()),
                method = method.as_str(),
                path = path.as_str(),
                status = resp.status().as_u16(),
                duration_ms = start.elapsed().as_secs_f64() * 1000.0,
                request_id = request_id.to_str().unwrap_or(""),
                "Request"
            );
        }
        resp
    }

    /// Answers `err` without looking further at the request, and closes the
    /// connection after the response.
    pub(crate) fn refuse<B>(&self, req: &Request<B>, err: ProxyError) -> Response<ProxyBody> {
        let request_id = headers::request_id(req.headers());
        let mut resp = error::into_response(&err, &request_id);
        let h = resp.headers_mut();
        h.insert(X_REQUEST_ID.clone(), request_id.clone());
        h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        self.unrouted
            .request(resp.status().as_u16(), Duration::ZERO, true);
        tracing::debug!(
            status = resp.status().as_u16(),
            request_id = request_id.to_str().unwrap_or(""),
            error = err.message(),
            "Request refused"
        );
        resp
    }

    async fn forward<B>(
        &self,
        mut req: Request<B>,
        conn: &ConnInfo,
        request_id: &HeaderValue,
        route_out: &mut Option<usize>,
    ) -> Result<Response<ProxyBody>, ProxyError>
    where
        B: Body<Data = bytes::Bytes> + Send + Sync + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::MethodNotAllowed);
        }
        // Two Hosts: which one would the allowlist and the router see?
        if req.headers().get_all(HOST).iter().nth(1).is_some() {
            return Err(ProxyError::BadRequest("more than one Host header"));
        }
        let original_host = original_host(&req).ok_or(ProxyError::BadRequest("missing Host"))?;
        let host = conn
            .host_of(&original_host)
            .ok_or(ProxyError::BadRequest("malformed Host"))?;
        if !self.hosts.allows(&host) {
            return Err(ProxyError::HostNotAllowed);
        }
        self.check_cross_site(req.headers())?;

        // Absolute-form targets are routed by their path only: the host they
        // name is never contacted (not an open proxy).
        let path = req.uri().path();
        router::check_path(path).map_err(ProxyError::BadRequest)?;
        let idx = self.router.find(&host, path).ok_or(ProxyError::NoRoute)?;
        *route_out = Some(idx);
        let route = &self.routes[idx];

        let upgrade = req.version() <= Version::HTTP_11 && headers::wants_upgrade(req.headers());
        if upgrade && !route.upgrades {
            return Err(ProxyError::UpgradeNotEnabled);
        }
        let bad_target = |_| ProxyError::BadRequest("malformed request target");
        let static_uri = match &route.target {
            Target::Static(d) => Some(
                d.upstream
                    .uri(path, req.uri().query())
                    .map_err(bad_target)?,
            ),
            Target::FromToken(_) => None,
        };

        // Nothing goes upstream without its token.
        let injected = route
            .token
            .get_for(request_id.to_str().ok())
            .await
            .map_err(ProxyError::CredentialUnavailable)?;
        let dest = match &route.target {
            Target::Static(d) => DestRef::Borrowed(d),
            Target::FromToken(f) => DestRef::Held(
                injected
                    .origin
                    .as_ref()
                    .and_then(|o| f.dest(o))
                    .ok_or_else(|| {
                        ProxyError::CredentialUnavailable(
                            crate::token::CredentialUnavailable::field_missing(
                                route.token.credential(),
                                f.field,
                            ),
                        )
                    })?,
            ),
        };
        let uri = match static_uri {
            Some(u) => u,
            None => dest
                .upstream
                .uri(path, req.uri().query())
                .map_err(bad_target)?,
        };

        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let h = &mut parts.headers;
        headers::strip_hop_by_hop(h, upgrade);
        // Room for what follows at once, instead of a rehash per insert.
        h.reserve(6);
        h.insert(HOST, dest.upstream.host_header.clone());
        if let Some(peer) = &conn.forwarded_for {
            append_forwarded_for(h, peer);
        }
        h.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
        );
        h.insert(X_FORWARDED_HOST.clone(), original_host.clone());
        h.insert(X_REQUEST_ID.clone(), request_id.clone());
        // Replaces every client-sent value of the header.
        h.insert(route.header.clone(), injected.value.clone());
        // RFC 9449 §7: a bound token goes with a proof for this request;
        // the upstream URI is kept for the proof of a retry.
        let dpop_uri = match &injected.dpop {
            Some(d) => {
                h.insert(
                    &crate::dpop::DPOP,
                    dpop_proof(d, &parts.method, &uri, route.token.credential())?,
                );
                Some(uri.clone())
            }
            None => None,
        };

        let has_body = !body.is_end_stream();
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        let pool = match (&dest.upgrade_pool, upgrade) {
            (Some(p), true) => p,
            _ => &dest.pool,
        };
        let deadline = Instant::now() + route.response_timeout;
        let rid = request_id.to_str().unwrap_or("");
        let upstream_host = dest.upstream.host_header.to_str().unwrap_or("");

        // Reactive refresh (docs/architecture.md): small bodies with a
        // Content-Length are buffered so the request can be replayed once
        // with a new token.
        let replayable = !upgrade
            && (!route.refresh_on.is_empty() || injected.dpop.is_some())
            && route
                .replay_max_body
                .is_some_and(|max| replayable_body(&parts.headers, has_body, max));
        let (out_body, buffered) = if replayable && has_body {
            let max = route.replay_max_body.unwrap_or(0) as usize;
            // The same idle timeout as a streamed body: a stalled client
            // must not hold the request (and its token) forever.
            let body = IdleTimeout::new(body, route.idle_timeout);
            match http_body_util::Limited::new(body, max).collect().await {
                Ok(c) => {
                    let bytes = c.to_bytes();
                    (body::full(bytes.clone()), Some(bytes))
                }
                Err(e) if e.is::<BodyIdleTimeout>() => {
                    return Err(ProxyError::BadRequest(
                        "request body idle for longer than the route's idle_timeout",
                    ))
                }
                Err(_) => {
                    return Err(ProxyError::BadRequest(
                        "request body failed or exceeded its Content-Length",
                    ))
                }
            }
        } else if has_body {
            (IdleTimeout::new(body, route.idle_timeout).boxed(), None)
        } else {
            (empty(), replayable.then(bytes::Bytes::new))
        };
        // One retry for idempotent requests without a body: a pooled
        // connection the upstream just closed fails before any response byte.
        // The pool keeps bodiless requests intact; others need a copy.
        let idempotent = is_idempotent(&parts.method);
        let kept = !upgrade && pool.keeps_request(has_body);
        let saved =
            (!kept && !upgrade && (buffered.is_some() || (!has_body && idempotent))).then(|| {
                (
                    parts.method.clone(),
                    parts.uri.clone(),
                    parts.headers.clone(),
                )
            });
        let rebuild = |(method, uri, headers): &(Method, http::Uri, HeaderMap), body: ProxyBody| {
            let mut again = Request::new(body);
            *again.method_mut() = method.clone();
            *again.uri_mut() = uri.clone();
            *again.headers_mut() = headers.clone();
            again
        };
        // One await site for every attempt: the send future is the largest
        // part of a request's state, and each site would hold its own copy.
        let mut attempt = Request::from_parts(parts, out_body);
        let (mut retried, mut replayed, mut nonce_retried) = (false, false, false);
        let mut resp = loop {
            let e = match tokio::time::timeout_at(deadline, pool.send(&mut attempt)).await {
                Ok(Ok(r)) if dpop_nonce_challenge(&injected, dpop_uri.as_ref(), &r) => {
                    // RFC 9449 §9: the upstream wants a nonce (now learnt);
                    // one retry with it when the body can be sent again.
                    let (Some(d), Some(u), Some(bytes), false) =
                        (&injected.dpop, &dpop_uri, &buffered, nonce_retried)
                    else {
                        route.metrics.dpop_nonce_unreplayed();
                        break r;
                    };
                    if !kept {
                        let Some(saved) = &saved else {
                            route.metrics.dpop_nonce_unreplayed();
                            break r;
                        };
                        attempt = rebuild(saved, body::full(bytes.clone()));
                    }
                    let proof = dpop_proof(d, attempt.method(), u, route.token.credential())?;
                    attempt.headers_mut().insert(&crate::dpop::DPOP, proof);
                    nonce_retried = true;
                    continue;
                }
                Ok(Ok(r)) if replayed => break r,
                Ok(Ok(r)) => {
                    if !route.refresh_on.contains(&r.status()) {
                        break r;
                    }
                    route.metrics.upstream_rejected();
                    if !route.token.rejected(
                        &injected,
                        r.headers().get(WWW_AUTHENTICATE),
                        Some(rid),
                    ) {
                        break r;
                    }
                    let Some(bytes) = &buffered else {
                        break r;
                    };
                    // A 401 means the upstream did not act on the request, so
                    // any method may be replayed, once.
                    let fresh = route
                        .token
                        .replacement(&injected, Some(rid))
                        .await
                        .map_err(ProxyError::CredentialUnavailable)?;
                    if fresh.tag == injected.tag {
                        break r;
                    }
                    if !kept {
                        let Some(saved) = &saved else {
                            break r;
                        };
                        attempt = rebuild(saved, body::full(bytes.clone()));
                    }
                    match (&fresh.dpop, &dpop_uri) {
                        (Some(d), Some(u)) => {
                            let proof =
                                dpop_proof(d, attempt.method(), u, route.token.credential())?;
                            attempt.headers_mut().insert(&crate::dpop::DPOP, proof);
                        }
                        // A bearer token now: no proof goes with it.
                        (None, Some(_)) => drop(attempt.headers_mut().remove(&crate::dpop::DPOP)),
                        _ => {}
                    }
                    attempt
                        .headers_mut()
                        .insert(route.header.clone(), fresh.value);
                    tracing::debug!(
                        route = route.label.as_str(),
                        request_id = rid,
                        "Replaying with a refreshed token"
                    );
                    route.metrics.replayed();
                    replayed = true;
                    continue;
                }
                Ok(Err(e)) => e,
                Err(_) => {
                    tracing::warn!(
                        route = route.label.as_str(),
                        request_id = rid,
                        upstream = upstream_host,
                        timeout_ms = route.response_timeout.as_millis() as u64,
                        "Upstream timed out"
                    );
                    return Err(ProxyError::UpstreamTimeout);
                }
            };
            let retry = !retried
                && !replayed
                && !upgrade
                && !has_body
                && idempotent
                && !e.is_connect()
                && (kept || saved.is_some());
            if !retry {
                tracing::warn!(route = route.label.as_str(), request_id = rid, upstream = upstream_host, error = %crate::error_chain(&e), "Upstream unreachable");
                return Err(ProxyError::UpstreamUnreachable);
            }
            tracing::debug!(request_id = rid, upstream = upstream_host, error = %crate::error_chain(&e), "Retrying on a new connection");
            retried = true;
            if let Some(saved) = &saved {
                attempt = rebuild(saved, empty());
            }
        };

        if let (Some(client_upgrade), StatusCode::SWITCHING_PROTOCOLS) =
            (client_upgrade, resp.status())
        {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let (mut parts, _) = resp.into_parts();
            headers::strip_hop_by_hop(&mut parts.headers, true);
            parts.headers.remove(&error::X_TOKENPROXY_ERROR);
            parts.version = Version::HTTP_11;
            forward::spawn_tunnel(client_upgrade, upstream_upgrade, request_id.clone());
            return Ok(Response::from_parts(parts, empty()));
        }

        let (mut parts, body) = resp.into_parts();
        if !body.hop_by_hop_stripped() {
            // RFC 9112 §6.3: hyper decodes the chunks but keeps the length
            // header, which would misframe the body we send on.
            if parts.headers.contains_key(http::header::TRANSFER_ENCODING) {
                parts.headers.remove(http::header::CONTENT_LENGTH);
            }
            headers::strip_hop_by_hop(&mut parts.headers, false);
        }
        // Only the proxy says a response is its own error.
        parts.headers.remove(&error::X_TOKENPROXY_ERROR);
        parts.version = Version::HTTP_11;
        rewrite_links(&mut parts.headers, &dest.rewriter, &original_host, conn.tls);
        Ok(Response::from_parts(
            parts,
            IdleTimeout::new(body, route.idle_timeout).boxed(),
        ))
    }

    /// DNS rebinding and CSRF: a web page must not borrow our tokens.
    fn check_cross_site(&self, h: &HeaderMap) -> Result<(), ProxyError> {
        if headers::is_cross_site(h, &self.hosts) {
            return Err(ProxyError::CrossSite);
        }
        Ok(())
    }
}

/// The Host the client asked for: `Host` on HTTP/1 (the target's authority
/// when absent), `:authority` on HTTP/2.
fn original_host<B>(req: &Request<B>) -> Option<HeaderValue> {
    let from_uri = || {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    };
    if req.version() == Version::HTTP_2 {
        from_uri().or_else(|| req.headers().get(HOST).cloned())
    } else {
        req.headers().get(HOST).cloned().or_else(from_uri)
    }
}

/// A DPoP proof for one upstream request; a key that cannot sign leaves
/// the request unsent, like a missing token.
fn dpop_proof(
    d: &crate::token::InjectedDpop,
    method: &Method,
    uri: &http::Uri,
    credential: &str,
) -> Result<HeaderValue, ProxyError> {
    d.proof(method, uri).map_err(|_| {
        ProxyError::CredentialUnavailable(crate::token::CredentialUnavailable {
            credential: credential.to_owned(),
            reason: crate::token::reason::Reason::NoToken,
            hint: "The DPoP key could not sign a proof for this request.".into(),
            retry_after: None,
        })
    })
}

/// Learns the upstream's nonce from any answer to a DPoP request; true
/// when the answer asks for one (RFC 9449 §9).
fn dpop_nonce_challenge<B>(
    injected: &crate::token::Injected,
    uri: Option<&http::Uri>,
    resp: &Response<B>,
) -> bool {
    let (Some(d), Some(uri)) = (&injected.dpop, uri) else {
        return false;
    };
    d.nonces.learn(uri, resp.headers())
        && crate::dpop::upstream_wants_nonce(resp.status(), resp.headers())
}

/// Only bodies of a known, small length are buffered for a replay: never
/// chunked bodies, gRPC or `Expect: 100-continue`.
fn replayable_body(h: &HeaderMap, has_body: bool, max: u64) -> bool {
    if !has_body {
        return true;
    }
    let len = h
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let grpc = h
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    len.is_some_and(|l| l <= max)
        && !h.contains_key(http::header::TRANSFER_ENCODING)
        && !h.contains_key(http::header::EXPECT)
        && !grpc
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE | Method::PUT | Method::TRACE
    )
}

fn append_forwarded_for(h: &mut HeaderMap, peer: &HeaderValue) {
    if !h.contains_key(&X_FORWARDED_FOR) {
        h.insert(X_FORWARDED_FOR.clone(), peer.clone());
        return;
    }
    let mut value = String::new();
    for v in h.get_all(&X_FORWARDED_FOR) {
        match v.to_str().map(str::trim) {
            Ok(s) if !s.is_empty() => {
                value.push_str(s);
                value.push_str(", ");
            }
            _ => {}
        }
    }
    value.push_str(peer.to_str().unwrap_or_default());
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.insert(X_FORWARDED_FOR.clone(), v);
    }
}

fn rewrite_links(h: &mut HeaderMap, rw: &LinkRewriter, host: &HeaderValue, tls: bool) {
    if !h.contains_key(LOCATION) && !h.contains_key(LINK) {
        return;
    }
    let scheme = if tls { "https" } else { "http" };
    let origin = format!("{scheme}://{}", host.to_str().unwrap_or("localhost"));
    if let Some(new) = h
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| rw.rewrite(v, &origin))
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        h.insert(LOCATION, new);
    }
    if h.contains_key(LINK) {
        let values: Vec<HeaderValue> = h
            .get_all(LINK)
            .iter()
            .map(|v| {
                v.to_str()
                    .ok()
                    .and_then(|s| rw.rewrite_link(s, &origin))
                    .and_then(|s| HeaderValue::from_str(&s).ok())
                    .unwrap_or_else(|| v.clone())
            })
            .collect();
        h.remove(LINK);
        for v in values {
            h.append(LINK, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        AdminConfig, LogConfig, LogFormat, ServerConfig, StoreConfig, StoreKind, TokenFormat,
    };
    use http_body_util::Full;
    use parking_lot::Mutex;

    pub(crate) fn route(prefix: &str, upstream: &str) -> RouteConfig {
        RouteConfig {
            path_prefix: prefix.to_owned(),
            host: None,
            upstream: upstream.parse().unwrap(),
            upstream_from: None,
            credential: "test".to_owned(),
            strip_prefix: true,
            header: http::header::AUTHORIZATION,
            format: TokenFormat::default(),
            scopes: None,
            resource: None,
            refresh_on: vec![401],
            replay: true,
            replay_max_body: 64 * 1024,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            upgrades: false,
            ca_file: None,
            allow_plaintext: false,
        }
    }

    pub(crate) fn config(routes: Vec<RouteConfig>) -> Config {
        Config {
            source: "test.toml".into(),
            server: ServerConfig {
                listen: vec![
                    ListenAddr::Tcp("10.1.2.3:8080".parse().unwrap()),
                    ListenAddr::Tcp("0.0.0.0:8081".parse().unwrap()),
                ],
                hosts: vec!["api.internal".into()],
                tls_cert: None,
                tls_key: None,
                worker_threads: 2,
                max_connections: 100,
                shutdown_grace: Duration::from_secs(1),
                header_read_timeout: Duration::from_secs(10),
                keepalive_timeout: Duration::from_secs(75),
                max_header_bytes: 64 * 1024,
                max_headers: 100,
                egress_proxy: None,
            },
            admin: AdminConfig {
                listen: ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()),
                token: None,
                ready_requires_tokens: false,
            },
            store: StoreConfig {
                kind: StoreKind::File,
                path: "tokens.json".into(),
                url: None,
                encryption_key: None,
                previous_encryption_keys: Vec::new(),
            },
            log: LogConfig {
                format: LogFormat::Json,
                level: "debug".into(),
                access: false,
            },
            credentials: Default::default(),
            routes,
        }
    }

    fn proxy(routes: Vec<RouteConfig>) -> Arc<Proxy> {
        Proxy::new(&config(routes), &|_, r| {
            RouteToken::fixed(
                &r.credential,
                HeaderValue::from_static("Bearer s3cr3t-token"),
            )
        })
        .unwrap()
    }

    static CONN: std::sync::LazyLock<ConnInfo> =
        std::sync::LazyLock::new(|| ConnInfo::new(None, false));

    fn req(host: &str, path: &str) -> Request<Full<bytes::Bytes>> {
        Request::get(path)
            .header(HOST, host)
            .header("authorization", "Bearer client-secret-value")
            .header("cookie", "session=cookie-secret")
            .body(Full::default())
            .unwrap()
    }

    #[tokio::test]
    async fn allowlist_includes_listen_addresses_hosts_and_route_hosts() {
        let mut hosted = route("/h/", "http://127.0.0.1:9");
        hosted.host = Some("gh.example".into());
        let p = proxy(vec![route("/x/", "http://127.0.0.1:9"), hosted]);
        // Allowed hosts get past the allowlist (and then fail on the route).
        for host in ["api.internal", "10.1.2.3:8080", "gh.example", "localhost"] {
            let resp = p.handle(req(host, "/nope"), &CONN).await;
            assert_eq!(resp.status(), 404, "{host}");
        }
        for host in ["0.0.0.0", "10.1.2.4", "evil.example"] {
            let resp = p.handle(req(host, "/nope"), &CONN).await;
            assert_eq!(resp.status(), 421, "{host}");
        }
        let resp = p
            .handle(
                Request::get("/x/")
                    .body(Full::<bytes::Bytes>::default())
                    .unwrap(),
                &CONN,
            )
            .await;
        assert_eq!(resp.status(), 400, "missing Host");
    }

    /// A `MakeWriter` into a shared buffer, to inspect what was logged.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Capture {
            self.clone()
        }
    }

    #[tokio::test]
    async fn logs_one_event_per_request_without_secrets_or_query() {
        let up = crate::dev::EchoUpstream::start(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(|t: &str| t == "s3cr3t-token"),
        )
        .await
        .unwrap();
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let p = proxy(vec![
            route("/api/", &up.url()),
            route("/dead/", &format!("http://{dead}")),
        ]);
        // Other test threads register the same callsites concurrently; one
        // that finishes registering after our subscriber is installed keeps
        // a stale "never" interest. Register them here first and let any
        // concurrent registration settle; installing the subscriber then
        // recomputes every callsite's interest.
        let _ = p.handle(req("localhost", "/api/warm-up"), &CONN).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let capture = Capture::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(capture.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        tracing::callsite::rebuild_interest_cache();

        let resp = p
            .handle(req("localhost", "/api/x?access_token=query-secret"), &CONN)
            .await;
        assert_eq!(resp.status(), 200);
        let resp = p
            .handle(req("localhost", "/dead/x?q=query-secret"), &CONN)
            .await;
        assert_eq!(resp.status(), 502);

        let logs = String::from_utf8(capture.0.lock().clone()).unwrap();
        for secret in [
            "s3cr3t-token",
            "client-secret-value",
            "cookie-secret",
            "query-secret",
        ] {
            assert!(!logs.contains(secret), "{secret} leaked into logs:\n{logs}");
        }
        let served: Vec<serde_json::Value> = logs
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|v: &serde_json::Value| v["fields"]["message"] == "Request served")
            .collect();
        assert_eq!(served.len(), 2, "{logs}");
        assert_eq!(served[0]["fields"]["route"], "/api/");
        assert_eq!(served[0]["fields"]["status"], 200);
        assert_eq!(served[0]["fields"]["method"], "GET");
        assert_eq!(served[0]["fields"]["upstream"], up.addr().to_string());
        assert!(served[0]["fields"]["request_id"].as_str().is_some());
        assert!(served[0]["fields"]["duration_ms"].is_u64());
        // The upstream error is logged with its cause chain, not just "client error".
        let warn = logs
            .lines()
            .find(|l| l.contains("Upstream unreachable"))
            .expect("upstream error logged");
        assert!(warn.to_ascii_lowercase().contains("refused"), "{warn}");
    }
}

/// Entry points for the fuzz targets in `fuzz/` (not a public API).
#[doc(hidden)]
pub mod fuzzing {
    /// The router's path check.
    pub fn check_path(path: &str) -> Result<(), &'static str> {
        super::router::check_path(path)
    }

    /// Hop-by-hop stripping, as done on every forwarded message.
    pub fn strip_hop_by_hop(headers: &mut http::HeaderMap, tunnel: bool) {
        super::headers::strip_hop_by_hop(headers, tunnel)
    }

    /// The upstream response decoder, fed `piece` bytes at a time.
    pub fn decode_response(wire: &[u8], piece: usize) -> Result<(u16, Vec<u8>, usize), String> {
        super::h1::decode_for_fuzzing(wire, piece)
    }

    /// The lean server path's reading of a request (`None`: not served
    /// there), under hyper's default head limits.
    pub fn lean_request(wire: &[u8]) -> Option<super::h1_server::ParsedForFuzzing> {
        super::h1_server::parse_for_fuzzing(wire, LIMITS.0, LIMITS.1)
    }

    /// hyper's reading of `wire` (all of it) as its first request, under
    /// the same limits as [`lean_request`].
    pub fn hyper_request(wire: &[u8]) -> Option<super::h1_server::ParsedForFuzzing> {
        super::h1_server::hyper_reading_for_fuzzing(wire, LIMITS.0, LIMITS.1)
    }

    /// hyper's default header count, and a head limit above its minimum.
    const LIMITS: (usize, usize) = (16 * 1024, 100);

    /// Longest-prefix routing over `prefixes` (no hosts).
    pub fn route(prefixes: &[&str], path: &str) -> Option<usize> {
        super::router::Router::new(prefixes.iter().map(|p| (*p, None))).find("localhost", path)
    }
}
