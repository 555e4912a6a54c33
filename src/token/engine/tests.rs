//! The engine's timing rules on tokio's paused clock: a scripted token
//! endpoint answers in place of a socket (the wiring is tested over real
//! sockets in `tests/integration/`), the store is a real file, and an hour
//! of schedule runs in milliseconds.

use super::*;
use crate::config::AuthMethod;
use crate::token::grant::{Exchange, PreparedRequest, RawResponse};
use crate::token::store::FileStore;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;

const S: fn(u64) -> Duration = Duration::from_secs;

enum Reply {
    /// A rotation: a new access and refresh token living this long.
    Ok(u64),
    /// A rotation whose access token lives `.0` and whose refresh token
    /// idles out after `.1` (Keycloak's `refresh_expires_in`).
    OkIdle(u64, u64),
    /// This status and body, the grant not run.
    Status(u16, &'static str, Option<&'static str>),
    /// The grant runs (the token is spent) and the answer is lost.
    Lost,
    /// RFC 9449 §8: 400 use_dpop_nonce with this nonce, the grant not run.
    Nonce(&'static str),
}

/// One presentation at the scripted IdP.
#[derive(Debug, Clone)]
struct Presented {
    at: Duration,
    refresh_token: String,
}

struct ScriptedIdp {
    start: Instant,
    replies: Mutex<VecDeque<Reply>>,
    /// When the queue is empty.
    default_lifetime: u64,
    presented: Mutex<Vec<Presented>>,
    /// When every request arrived, refused or not.
    requests: Mutex<Vec<Duration>>,
    issued: std::sync::atomic::AtomicU64,
    /// Each request's DPoP proof, if any.
    proofs: Mutex<Vec<Option<String>>>,
}

impl ScriptedIdp {
    fn new(default_lifetime: u64, replies: Vec<Reply>) -> Arc<ScriptedIdp> {
        Arc::new(ScriptedIdp {
            start: Instant::now(),
            replies: Mutex::new(replies.into()),
            default_lifetime,
            presented: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            issued: Default::default(),
            proofs: Mutex::new(Vec::new()),
        })
    }

    fn presented(&self) -> Vec<Presented> {
        self.presented.lock().clone()
    }

    fn answer(&self, req: &PreparedRequest) -> Result<RawResponse, GrantError> {
        let token = form_urlencoded::parse(req.body.expose().as_bytes())
            .find(|(k, _)| k == "refresh_token")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        self.requests.lock().push(self.start.elapsed());
        self.proofs.lock().push(
            req.headers
                .get("dpop")
                .map(|v| v.to_str().unwrap().to_owned()),
        );
        let reply = self.replies.lock().pop_front();
        let reply = reply.unwrap_or(Reply::Ok(self.default_lifetime));
        if !matches!(reply, Reply::Status(..) | Reply::Nonce(_)) {
            self.presented.lock().push(Presented {
                at: self.start.elapsed(),
                refresh_token: token,
            });
        }
        let json = |status: u16, body: String, retry_after: Option<&str>| {
            let mut headers = http::HeaderMap::new();
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            if let Some(r) = retry_after {
                headers.insert(
                    http::header::RETRY_AFTER,
                    http::HeaderValue::from_str(r).unwrap(),
                );
            }
            Ok(RawResponse {
                status: http::StatusCode::from_u16(status).unwrap(),
                headers,
                body: bytes::Bytes::from(body),
            })
        };
        match reply {
            Reply::Ok(lifetime) => {
                let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
                json(
                    200,
                    format!(
                        r#"{{"access_token":"at-{n}","token_type":"Bearer","expires_in":{lifetime},"refresh_token":"rt-{n}"}}"#
                    ),
                    None,
                )
            }
            Reply::OkIdle(lifetime, idle) => {
                let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
                json(
                    200,
                    format!(
                        r#"{{"access_token":"at-{n}","token_type":"Bearer","expires_in":{lifetime},"refresh_expires_in":{idle},"refresh_token":"rt-{n}"}}"#
                    ),
                    None,
                )
            }
            Reply::Status(status, body, retry_after) => json(status, body.into(), retry_after),
            Reply::Nonce(nonce) => {
                json(400, r#"{"error":"use_dpop_nonce"}"#.into(), None).map(|mut r| {
                    r.headers
                        .insert("dpop-nonce", http::HeaderValue::from_static(nonce));
                    r
                })
            }
            Reply::Lost => {
                self.issued.fetch_add(1, Ordering::SeqCst);
                Err(GrantError::transient(
                    grant::Delivery::MaybeSent,
                    None,
                    "connection reset after the request was written",
                ))
            }
        }
    }
}

impl Exchange for ScriptedIdp {
    fn exchange<'a>(
        &'a self,
        req: &'a PreparedRequest,
    ) -> Pin<Box<dyn Future<Output = Result<RawResponse, GrantError>> + Send + 'a>> {
        Box::pin(async move { self.answer(req) })
    }
}

struct Rig {
    slot: Arc<Slot>,
    idp: Arc<ScriptedIdp>,
    _dir: tempfile::TempDir,
}

/// A refresh_token slot seeded with `rt-0`, its store in a temp dir, its
/// refresher running.
async fn start(idp: Arc<ScriptedIdp>, tune: impl FnOnce(&mut CredentialConfig)) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = crate::token::tests_support::credential(
        "paused",
        "https://idp.example/token",
        AuthMethod::ClientSecretPost,
    );
    cfg.refresh_token = Some(Secret::new("rt-0"));
    tune(&mut cfg);
    let store = Store::File(FileStore::open(&dir.path().join("tokens.json")).unwrap());
    let slot = Slot::new(
        Arc::new(cfg),
        "https://idp.example/token".parse().unwrap(),
        SlotKind::Refresh {
            store,
            store_key: "test".into(),
        },
        GrantClient::scripted(idp.clone()),
        Arc::new(Clock::following_tokio()),
        CancellationToken::new(),
        Arc::default(),
    );
    slot.init_from_store().await.unwrap();
    tokio::spawn(slot.clone().run());
    Rig {
        slot,
        idp,
        _dir: dir,
    }
}

/// Lets virtual time pass in small steps, so work on the blocking pool
/// (store I/O) never lets the clock jump far past a timer.
async fn run_for(d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_ten_minute_token_is_refreshed_a_minute_early() {
    let idp = ScriptedIdp::new(600, vec![]);
    let rig = start(idp, |_| {}).await;
    run_for(S(700)).await;
    let p = rig.idp.presented();
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(p[0].at < S(1), "the seed at once: {p:?}");
    // 600 s lifetime, refresh_before max(30 s, 10 %) = 60 s, jitter ≤ 5 s.
    let gap = p[1].at - p[0].at;
    assert!(
        gap >= S(534) && gap <= S(541),
        "second refresh after {gap:?}"
    );
    assert_eq!(rig.slot.state(), State::Fresh);
}

#[tokio::test(start_paused = true)]
async fn transient_failures_back_off_exponentially_up_to_max_backoff() {
    let mut replies = vec![Reply::Ok(60)];
    replies.extend((0..8).map(|_| Reply::Status(503, "busy", None)));
    let idp = ScriptedIdp::new(3600, replies);
    let rig = start(idp, |c| c.max_backoff = S(4)).await;
    run_for(S(120)).await;
    let at = rig.idp.requests.lock().clone();
    // The seed, eight refusals, the success.
    assert_eq!(at.len(), 10, "{at:?}");
    assert!(
        at[1] >= S(26),
        "the first refresh is scheduled, not early: {at:?}"
    );
    let gaps: Vec<Duration> = at[1..].windows(2).map(|w| w[1] - w[0]).collect();
    // Full jitter within min(cap, 0.5 s · 2^n), at least 100 ms, never past
    // max_backoff (nor past the scheduled refresh point, 30 s in, while the
    // old token still works).
    assert!(
        gaps.iter().all(|g| *g <= Duration::from_millis(4100)),
        "{gaps:?}"
    );
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(90)),
        "{gaps:?}"
    );
    assert_eq!(rig.slot.state(), State::Fresh);
}

#[tokio::test(start_paused = true)]
async fn a_lost_answer_is_retried_only_inside_the_grace_window() {
    // Inside: lost, then retried at once with the same token.
    let idp = ScriptedIdp::new(3600, vec![Reply::Ok(60), Reply::Lost]);
    let rig = start(idp, |c| c.reuse_grace = S(5)).await;
    run_for(S(40)).await;
    let p = rig.idp.presented();
    assert_eq!(p.len(), 3, "{p:?}");
    assert_eq!(p[1].refresh_token, p[2].refresh_token, "presented again");
    assert!(p[2].at - p[1].at < S(5), "{p:?}");
    assert_eq!(rig.slot.state(), State::Fresh);

    // Outside: the retry is pushed past the window by a refusal asking for
    // 10 s; the token is not presented a third time.
    let idp = ScriptedIdp::new(
        3600,
        vec![
            Reply::Ok(60),
            Reply::Lost,
            Reply::Status(503, "busy", Some("10")),
        ],
    );
    let rig = start(idp, |c| c.reuse_grace = S(5)).await;
    run_for(S(60)).await;
    let p = rig.idp.presented();
    assert_eq!(p.len(), 2, "{p:?}");
    assert_eq!(rig.slot.state(), State::Dead);
    let dead = rig.slot.status().last_error.unwrap();
    assert_eq!(dead.reason, crate::token::reason::Reason::LostRotation);
}

#[tokio::test(start_paused = true)]
async fn retry_after_holds_off_the_next_request_up_to_max_backoff() {
    // Asked for 30 s with room to honour it: nothing before then.
    let replies = vec![
        Reply::Ok(60),
        Reply::Status(429, r#"{"error":"slow_down"}"#, Some("30")),
    ];
    let rig = start(ScriptedIdp::new(3600, replies), |c| c.max_backoff = S(120)).await;
    run_for(S(100)).await;
    let at = rig.idp.requests.lock().clone();
    assert_eq!(at.len(), 3, "{at:?}");
    let gap = at[2] - at[1];
    assert!(gap >= S(30) && gap <= S(31), "retried after {gap:?}");
    assert_eq!(rig.slot.state(), State::Fresh);

    // Asked for a day: max_backoff caps it.
    let replies = vec![
        Reply::Ok(60),
        Reply::Status(429, r#"{"error":"slow_down"}"#, Some("86400")),
    ];
    let rig = start(ScriptedIdp::new(3600, replies), |c| c.max_backoff = S(4)).await;
    run_for(S(100)).await;
    let at = rig.idp.requests.lock().clone();
    assert_eq!(at.len(), 3, "{at:?}");
    assert!(at[2] - at[1] <= Duration::from_millis(4100), "{at:?}");
}

#[tokio::test(start_paused = true)]
async fn a_rate_limit_shows_until_when_in_the_status() {
    let replies = vec![
        Reply::Ok(60),
        Reply::Status(429, r#"{"error":"slow_down"}"#, Some("30")),
    ];
    let rig = start(ScriptedIdp::new(3600, replies), |c| c.max_backoff = S(120)).await;
    // The first refresh is due 30 s in; the 429 answers it.
    run_for(S(45)).await;
    assert_eq!(rig.idp.requests.lock().len(), 2);
    let next = rig
        .slot
        .status()
        .next_attempt_at
        .expect("next_attempt_at while rate limited");
    let left = next
        .duration_since(rig.slot.clock.wall())
        .unwrap_or_default();
    assert!(left > S(10) && left <= S(30), "{left:?}");
    run_for(S(60)).await;
    assert_eq!(rig.slot.status().next_attempt_at, None);
}

fn proof_claims(proof: &str) -> serde_json::Value {
    use base64::Engine as _;
    let claims = proof.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(claims)
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_dpop_nonce_costs_one_retry_inside_one_attempt() {
    let idp = ScriptedIdp::new(600, vec![Reply::Nonce("n-1"), Reply::Ok(600)]);
    let rig = start(idp, |c| c.dpop = Some(crate::config::DpopSource::Generated)).await;
    run_for(S(5)).await;
    assert_eq!(rig.idp.presented().len(), 1, "the refusal spent nothing");
    let proofs = rig.idp.proofs.lock().clone();
    assert_eq!(proofs.len(), 2, "one retry");
    let first = proof_claims(proofs[0].as_deref().expect("a proof"));
    let second = proof_claims(proofs[1].as_deref().expect("a proof"));
    assert_eq!(first.get("nonce"), None);
    assert_eq!(second["nonce"], "n-1");
    assert_ne!(first["jti"], second["jti"]);
    assert_eq!(rig.slot.state(), State::Fresh);
    let c = rig.slot.control.lock();
    assert_eq!(c.consecutive_failures, 0, "not a failed attempt");
    let rec = c.record.as_ref().unwrap();
    assert!(rec.intent.is_none() && rec.dpop_key.is_some(), "{rec:?}");
}

#[tokio::test(start_paused = true)]
async fn a_bearer_answer_to_a_dpop_request_is_used_as_bearer_and_the_key_kept() {
    // The scripted IdP answers token_type Bearer.
    let idp = ScriptedIdp::new(600, vec![]);
    let rig = start(idp, |c| c.dpop = Some(crate::config::DpopSource::Generated)).await;
    run_for(S(700)).await;
    assert_eq!(rig.idp.presented().len(), 2);
    assert!(
        rig.idp.proofs.lock().iter().all(Option::is_some),
        "every request proven"
    );
    let token = rig.slot.usable_token().expect("a token");
    assert!(token.dpop.is_none(), "not bound: sent as a bearer token");
    // Both refreshes proved with the one stored key.
    let jkts: std::collections::BTreeSet<String> = rig
        .idp
        .proofs
        .lock()
        .iter()
        .map(|p| {
            let h = p.as_deref().unwrap().split('.').next().unwrap().to_owned();
            h
        })
        .collect();
    assert_eq!(jkts.len(), 1, "one key (the proof header names it)");
}

/// Keycloak: the refresh token dies after 30 idle minutes, the access token
/// lives an hour. With no request at all, the refresher refreshes before the
/// idle deadline (27 minutes in), each refresh starting the window again.
#[tokio::test(start_paused = true)]
async fn an_idle_expiring_refresh_token_is_kept_alive_without_traffic() {
    let idp = ScriptedIdp::new(3600, (0..6).map(|_| Reply::OkIdle(3600, 1800)).collect());
    let rig = start(idp, |_| {}).await;
    run_for(S(3700)).await;
    let p = rig.idp.presented();
    // The seed, then one refresh per idle window, never past its deadline.
    assert!(p.len() >= 3, "{p:?}");
    for w in p.windows(2) {
        let gap = w[1].at - w[0].at;
        assert!(gap < S(1800), "the refresh token idled out: {p:?}");
        assert!(gap >= S(1620 - 20), "refreshed too early: {p:?}");
    }
    assert_eq!(rig.slot.state(), State::Fresh);
}

/// An absolute lifetime (Spotify, LinkedIn, or `refresh_token_lifetime =
/// "absolute"`): refreshing early would not extend it, so only the access
/// token's own schedule refreshes.
#[tokio::test(start_paused = true)]
async fn an_absolute_refresh_token_lifetime_is_not_kept_alive() {
    let idp = ScriptedIdp::new(3600, (0..6).map(|_| Reply::OkIdle(3600, 1800)).collect());
    let rig = start(idp, |c| {
        c.refresh_token_lifetime = crate::providers::RefreshLifetime::Absolute
    })
    .await;
    run_for(S(3000)).await;
    let p = rig.idp.presented();
    assert_eq!(p.len(), 1, "only the seed: {p:?}");
}
