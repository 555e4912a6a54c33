//! Pure schedule maths: when to refresh, how long a token stays usable, how
//! long to back off. Functions of their inputs only, so they are tested
//! without clocks.

use rand::Rng;
use std::time::Duration;

/// Refresh `max(30 s, 10 % of lifetime)` early, never more than
/// half the lifetime; a configured `refresh_before` also stays ≤ half.
pub fn refresh_before(lifetime: Duration, configured: Option<Duration>) -> Duration {
    let half = lifetime / 2;
    let wanted = configured.unwrap_or_else(|| Duration::from_secs(30).max(lifetime / 10));
    wanted.min(half)
}

/// A token is treated as expired this long before its deadline:
/// `min(5 s, 5 % of lifetime)`, so it never reaches the upstream stale.
pub fn safety_margin(lifetime: Duration) -> Duration {
    Duration::from_secs(5).min(lifetime / 20)
}

/// Up to 10 % of `refresh_before` (at most 5 s) earlier, so replicas sharing
/// a credential don't all wake at the same instant.
pub fn jitter(refresh_before: Duration, rng: &mut impl Rng) -> Duration {
    let span = (refresh_before / 10).min(Duration::from_secs(5));
    if span.is_zero() {
        return Duration::ZERO;
    }
    Duration::from_millis(rng.gen_range(0..=span.as_millis() as u64))
}

/// Exponential backoff with full jitter: uniform in `[0, min(cap, base·2^n)]`,
/// at least `floor` (e.g. a server's `Retry-After`) but never past `cap`: a
/// day-long `Retry-After` must not park a credential past its `max_backoff`.
pub fn backoff(
    attempt: u32,
    cap: Duration,
    floor: Option<Duration>,
    rng: &mut impl Rng,
) -> Duration {
    let base = Duration::from_millis(500);
    let exp = base.saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX));
    let ceiling = exp.min(cap);
    let pick = Duration::from_millis(rng.gen_range(0..=ceiling.as_millis() as u64));
    // A little floor keeps a thundering retry loop from spinning at 0 ms.
    pick.max(Duration::from_millis(100))
        .max(floor.unwrap_or_default().min(cap))
}

/// A refresh token's idle window shorter than this is not kept alive: near
/// an absolute cap (Keycloak's SSO Session Max shrinks `refresh_expires_in`)
/// keep-alive refreshes would otherwise come ever closer together.
pub const KEEP_ALIVE_MIN_WINDOW: Duration = Duration::from_secs(120);

/// How long after the last refresh to refresh again only to keep an
/// idle-expiring refresh token alive: `refresh_before` of its window ahead
/// of the deadline. `window` runs from that refresh to the deadline; None
/// when it is too short to plan with ([`KEEP_ALIVE_MIN_WINDOW`]).
pub fn keep_alive_after(window: Duration) -> Option<Duration> {
    (window >= KEEP_ALIVE_MIN_WINDOW).then(|| window - refresh_before(window, None))
}

/// Delay before retrying a configuration error (every 5 minutes).
pub const CONFIG_ERROR_RETRY: Duration = Duration::from_secs(300);

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn keep_alive_comes_a_tenth_of_the_idle_window_early() {
        // Keycloak's default SSO Session Idle: 30 minutes → 27.
        assert_eq!(keep_alive_after(S(1800)), Some(S(1620)));
        // 5 minutes: the 30 s floor.
        assert_eq!(keep_alive_after(S(300)), Some(S(270)));
        assert_eq!(keep_alive_after(S(120)), Some(S(90)));
        // Too short a window (an absolute cap close by): none.
        assert_eq!(keep_alive_after(S(119)), None);
    }

    #[test]
    fn refresh_before_matches_the_design_examples() {
        assert_eq!(refresh_before(S(3600), None), S(360)); // 1 h → 6 min
        assert_eq!(refresh_before(S(5), None), Duration::from_millis(2500)); // 5 s → 2.5 s
        assert_eq!(refresh_before(S(120), None), S(30)); // floor of 30 s
        assert_eq!(refresh_before(S(40), None), S(20)); // capped at half
        assert_eq!(refresh_before(S(3600), Some(S(60))), S(60));
        assert_eq!(refresh_before(S(60), Some(S(50))), S(30));
    }

    #[test]
    fn safety_margin_is_small() {
        assert_eq!(safety_margin(S(3600)), S(5));
        assert_eq!(safety_margin(S(10)), Duration::from_millis(500));
    }

    #[test]
    fn backoff_is_capped_and_honours_floor() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for attempt in 0..40 {
            let b = backoff(attempt, S(60), None, &mut rng);
            assert!(b <= S(60), "{attempt}: {b:?}");
            assert!(b >= Duration::from_millis(100), "{attempt}: {b:?}");
        }
        // Early attempts stay small: full jitter under base·2^n.
        for _ in 0..100 {
            assert!(backoff(1, S(60), None, &mut rng) <= S(1));
        }
        for _ in 0..100 {
            assert!(backoff(3, S(60), Some(S(7)), &mut rng) >= S(7));
        }
    }

    #[test]
    fn a_server_floor_longer_than_the_cap_is_capped() {
        // Issue #17: `Retry-After: 86400` (or a far HTTP-date) must not park
        // a credential past its max_backoff.
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for attempt in 0..10 {
            let b = backoff(attempt, S(60), Some(S(86_400)), &mut rng);
            assert_eq!(b, S(60), "{attempt}: {b:?}");
            assert!(backoff(attempt, S(2), Some(S(5)), &mut rng) <= S(2));
        }
        // A floor under the cap is still honoured.
        assert!(backoff(0, S(60), Some(S(30)), &mut rng) >= S(30));
    }

    #[test]
    fn jitter_is_bounded() {
        let mut rng = rand::thread_rng();
        for _ in 0..100 {
            assert!(jitter(S(360), &mut rng) <= S(5));
            assert!(jitter(S(2), &mut rng) <= Duration::from_millis(200));
        }
    }
}
