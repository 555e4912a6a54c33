//! Prometheus metrics (listed in docs/architecture.md), one process-wide
//! registry.
//!
//! Per-route handles are resolved when the config is built, so a request
//! does only atomic increments; credential gauges (state, expiry) are read
//! from the engine at scrape time. Owns no state of the proxy or engine.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CredLabel {
    credential: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CredOutcome {
    credential: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CredFault {
    credential: String,
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CredState {
    credential: String,
    state: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

fn request_histogram() -> Histogram {
    // 100 µs to ~2.5 min: a sidecar's own errors are sub-millisecond,
    // upstreams take up to tens of seconds.
    Histogram::new(exponential_buckets(0.0001, 2.5, 14))
}

fn refresh_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.5, 12))
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RouteStatus, Counter>,
    request_duration: Family<RouteLabel, Histogram, fn() -> Histogram>,
    refresh_total: Family<CredOutcome, Counter>,
    refresh_duration: Family<CredLabel, Histogram, fn() -> Histogram>,
    endpoint_failures: Family<CredFault, Counter>,
    expires_in: Family<CredLabel, FloatGauge>,
    refresh_expires_in: Family<CredLabel, FloatGauge>,
    last_success: Family<CredLabel, FloatGauge>,
    state: Family<CredState, Gauge>,
    state_since: Family<CredLabel, FloatGauge>,
    store_write_failures: Counter,
    store_up: Family<CredLabel, Gauge>,
    upstream_401: Family<RouteLabel, Counter>,
    replays: Family<RouteLabel, Counter>,
    dpop_nonce_unreplayed: Family<RouteLabel, Counter>,
    /// For the status page: totals per route, kept across reloads.
    route_stats: parking_lot::Mutex<std::collections::HashMap<String, Arc<RouteStats>>>,
}

/// What the status page shows per route.
#[derive(Debug, Default)]
pub struct RouteStats {
    pub requests: AtomicU64,
    pub server_errors: AtomicU64,
    /// Answers the proxy made itself (x-tokenproxy-error).
    pub proxy_errors: AtomicU64,
    pub last_status: AtomicU16,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tokenproxy");
        let m = Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(request_histogram),
            refresh_total: Family::default(),
            refresh_duration: Family::new_with_constructor(refresh_histogram),
            expires_in: Family::default(),
            refresh_expires_in: Family::default(),
            last_success: Family::default(),
            state: Family::default(),
            state_since: Family::default(),
            store_write_failures: Counter::default(),
            endpoint_failures: Family::default(),
            store_up: Family::default(),
            upstream_401: Family::default(),
            replays: Family::default(),
            dpop_nonce_unreplayed: Family::default(),
            route_stats: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests served, by route and status",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers, by route",
            m.request_duration.clone(),
        );
        registry.register(
            "token_refresh",
            "Token-endpoint attempts, by credential and outcome",
            m.refresh_total.clone(),
        );
        registry.register(
            "token_endpoint_failures",
            "Failed token-endpoint exchanges by fault class: not_sent, no_answer, gateway_5xx, unusable_answer, refused, rejected",
            m.endpoint_failures.clone(),
        );
        registry.register(
            "token_refresh_duration_seconds",
            "Duration of token-endpoint attempts",
            m.refresh_duration.clone(),
        );
        registry.register(
            "token_expires_in_seconds",
            "Seconds until the current access token expires",
            m.expires_in.clone(),
        );
        registry.register(
            "refresh_token_expires_in_seconds",
            "Seconds until the refresh token itself expires, when the IdP says (refresh_token_expires_in)",
            m.refresh_expires_in.clone(),
        );
        registry.register(
            "token_last_success_timestamp_seconds",
            "Unix time of the last successful refresh",
            m.last_success.clone(),
        );
        registry.register(
            "credential_state",
            "1 for the credential's current state (fresh, refreshing, expired, dead)",
            m.state.clone(),
        );
        registry.register(
            "credential_state_since_timestamp_seconds",
            "Unix time the credential entered its current state",
            m.state_since.clone(),
        );
        registry.register(
            "store_write_failures",
            "Token store writes that failed",
            m.store_write_failures.clone(),
        );
        registry.register(
            "store_up",
            "Whether the last token-store read for a refresh_token credential succeeded",
            m.store_up.clone(),
        );
        registry.register(
            "upstream_401",
            "Upstream answers with a refresh_on status, by route",
            m.upstream_401.clone(),
        );
        registry.register(
            "replays",
            "Requests replayed after a reactive refresh, by route",
            m.replays.clone(),
        );
        registry.register(
            "dpop_nonce_unreplayed",
            "Upstream DPoP nonce challenges answered to the client because the request body could not be sent again, by route",
            m.dpop_nonce_unreplayed.clone(),
        );
        Metrics { registry, ..m }
    }

    /// One token-endpoint attempt ended.
    pub fn refresh_attempt(&self, credential: &str, outcome: &str, duration: Duration) {
        self.refresh_total
            .get_or_create(&CredOutcome {
                credential: credential.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        let label = CredLabel {
            credential: credential.to_owned(),
        };
        self.refresh_duration
            .get_or_create(&label)
            .observe(duration.as_secs_f64());
        if outcome == "ok" || outcome == "lost_race" {
            self.last_success
                .get_or_create(&label)
                .set(unix_secs(SystemTime::now()));
        }
    }

    /// One failed token-endpoint exchange, by what kind of fault it was.
    pub fn endpoint_failure(&self, credential: &str, class: &str) {
        self.endpoint_failures
            .get_or_create(&CredFault {
                credential: credential.to_owned(),
                class: class.to_owned(),
            })
            .inc();
    }

    pub fn store_write_failed(&self) {
        self.store_write_failures.inc();
    }

    /// Gauges read from the engine at scrape time.
    pub fn set_credential(
        &self,
        credential: &str,
        state: &str,
        since: Option<SystemTime>,
        expires_in: Option<Duration>,
    ) {
        let label = CredLabel {
            credential: credential.to_owned(),
        };
        // The engine's state names (engine::State::ALL, named here as text:
        // the engine depends on metrics, not the other way round).
        for s in ["fresh", "refreshing", "expired", "dead"] {
            self.state
                .get_or_create(&CredState {
                    credential: credential.to_owned(),
                    state: s.to_owned(),
                })
                .set(i64::from(s == state));
        }
        if let Some(since) = since {
            self.state_since.get_or_create(&label).set(unix_secs(since));
        }
        self.expires_in
            .get_or_create(&label)
            .set(expires_in.map_or(0.0, |d| d.as_secs_f64()));
    }

    /// Only for credentials whose IdP said when the refresh token expires.
    pub fn set_refresh_expires_in(&self, credential: &str, left: Duration) {
        self.refresh_expires_in
            .get_or_create(&CredLabel {
                credential: credential.to_owned(),
            })
            .set(left.as_secs_f64());
    }

    pub fn set_store_up(&self, credential: &str, up: bool) {
        self.store_up
            .get_or_create(&CredLabel {
                credential: credential.to_owned(),
            })
            .set(i64::from(up));
    }

    /// Forgets credential gauges (before a scrape re-sets the current ones,
    /// so credentials removed by a reload disappear).
    pub fn clear_credential_gauges(&self) {
        self.state.clear();
        self.store_up.clear();
        self.state_since.clear();
        self.expires_in.clear();
        self.refresh_expires_in.clear();
    }

    /// The OpenMetrics exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Handles for one route, resolved once.
    pub fn route(&self, route: &str) -> RouteMetrics {
        let label = RouteLabel {
            route: route.to_owned(),
        };
        RouteMetrics {
            route: route.to_owned(),
            common: Default::default(),
            duration: self.request_duration.get_or_create(&label).clone(),
            upstream_401: self.upstream_401.get_or_create(&label).clone(),
            replays: self.replays.get_or_create(&label).clone(),
            dpop_nonce_unreplayed: self.dpop_nonce_unreplayed.get_or_create(&label).clone(),
            stats: self.route_stats(route),
        }
    }

    pub fn route_stats(&self, route: &str) -> Arc<RouteStats> {
        self.route_stats
            .lock()
            .entry(route.to_owned())
            .or_default()
            .clone()
    }
}

/// Statuses whose counters are pre-resolved per route; others take the
/// family's lookup (rare by definition).
const COMMON_STATUSES: [u16; 12] = [200, 201, 204, 304, 400, 401, 403, 404, 429, 502, 503, 504];

/// Per-route metric handles: a request only touches atomics.
#[derive(Clone)]
pub struct RouteMetrics {
    route: String,
    /// Resolved on first use, so unused statuses export no series.
    common: [std::sync::OnceLock<Counter>; 12],
    duration: Histogram,
    upstream_401: Counter,
    replays: Counter,
    dpop_nonce_unreplayed: Counter,
    stats: Arc<RouteStats>,
}

impl RouteMetrics {
    pub fn request(&self, status: u16, elapsed: Duration, proxy_made: bool) {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.stats.server_errors.fetch_add(1, Ordering::Relaxed);
        }
        if proxy_made {
            self.stats.proxy_errors.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.last_status.store(status, Ordering::Relaxed);
        }
        let lookup = || {
            metrics()
                .requests
                .get_or_create(&RouteStatus {
                    route: self.route.clone(),
                    status,
                })
                .clone()
        };
        match COMMON_STATUSES.iter().position(|s| *s == status) {
            Some(i) => {
                self.common[i].get_or_init(lookup).inc();
            }
            None => {
                lookup().inc();
            }
        }
        self.duration.observe(elapsed.as_secs_f64());
    }

    pub fn upstream_rejected(&self) {
        self.upstream_401.inc();
    }

    /// A request sent again with a refreshed token.
    pub fn replayed(&self) {
        self.replays.inc();
    }

    /// An upstream's DPoP nonce challenge went back to the client: the
    /// body was streamed, so the request could not be sent again.
    pub fn dpop_nonce_unreplayed(&self) {
        self.dpop_nonce_unreplayed.inc();
    }
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// OpenMetrics text as the classic Prometheus text format (0.0.4): a
/// counter's HELP and TYPE name its `_total` samples, and there is no
/// `# EOF` or `# UNIT`. Label values are escaped alike in both formats.
pub fn to_text_format(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            counters.insert(name.to_owned());
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find(|p| line.starts_with(p));
        match meta {
            Some(prefix) => {
                let rest = &line[prefix.len()..];
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{prefix}{name}_total {tail}"));
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_text_format_names_counters_by_their_samples() {
        let om = "# HELP tokenproxy_requests Requests.\n# TYPE tokenproxy_requests counter\ntokenproxy_requests_total{route=\"/a/\"} 2\n# HELP tokenproxy_up Up.\n# TYPE tokenproxy_up gauge\ntokenproxy_up 1\n# EOF\n";
        assert_eq!(
            super::to_text_format(om),
            "# HELP tokenproxy_requests_total Requests.\n# TYPE tokenproxy_requests_total counter\ntokenproxy_requests_total{route=\"/a/\"} 2\n# HELP tokenproxy_up Up.\n# TYPE tokenproxy_up gauge\ntokenproxy_up 1\n"
        );
    }
    use super::*;

    #[test]
    fn route_handles_count_into_the_registry() {
        let m = metrics();
        let r = m.route("/unit-test/");
        r.request(200, Duration::from_millis(3), false);
        r.request(200, Duration::from_millis(3), false);
        r.request(418, Duration::from_millis(3), false);
        let stats = m.route_stats("/unit-test/");
        assert_eq!(stats.requests.load(Ordering::Relaxed), 3);
        assert_eq!(stats.last_status.load(Ordering::Relaxed), 418);
        r.upstream_rejected();
        let text = m.encode();
        assert!(
            text.contains(r#"tokenproxy_requests_total{route="/unit-test/",status="200"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"tokenproxy_requests_total{route="/unit-test/",status="418"} 1"#));
        assert!(text.contains(r#"tokenproxy_upstream_401_total{route="/unit-test/"} 1"#));
        assert!(text.contains("tokenproxy_request_duration_seconds_bucket"));
    }
}
