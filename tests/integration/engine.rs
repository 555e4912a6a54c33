//! Token-engine scenarios over real sockets, judged by the dev IdP's reuse
//! detection: in every test a refresh token presented twice fails the test.

use crate::harness::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenproxy::dev::{Fault, Hold};

const S: fn(u64) -> Duration = Duration::from_secs;

/// 200 concurrent clients across 5 lifetimes of a 2 s token: every request
/// 200, one grant per refresh interval, zero reuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_200_clients_five_lifetimes_no_reuse() {
    let stack = Stack::start(StackOpts::default()).await;
    let app = stack.app("").await;
    let url = format!("http://{}/api/load", app.proxy_addr.unwrap());
    let c = http();
    // The first request may wait for the initial grant.
    let first = get_ok(&c, &url).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let grants_at_start = stack.refresh_grants();
    let lifetime = S(2);
    let run_for = lifetime * 5;
    let started = Instant::now();
    let total = Arc::new(AtomicUsize::new(0));
    let max_latency_ms = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (c, url, total, max_latency_ms) = (
            c.clone(),
            url.clone(),
            total.clone(),
            max_latency_ms.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut bad = Vec::new();
            // Bounded: at most 1000 iterations, and only for `run_for`.
            for _ in 0..1000 {
                if started.elapsed() >= run_for {
                    break;
                }
                let t0 = Instant::now();
                match try_get(&c, &url).await {
                    Ok(g) if g.status == 200 => {}
                    Ok(g) => bad.push(format!("{} {}", g.status, g.text())),
                    Err(e) => bad.push(e),
                }
                max_latency_ms.fetch_max(t0.elapsed().as_millis() as usize, Ordering::Relaxed);
                total.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            bad
        }));
    }
    let mut bad = Vec::new();
    for t in tasks {
        bad.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    let grants = stack.refresh_grants() - grants_at_start;
    let requests = total.load(Ordering::Relaxed);
    let reuses = stack.idp.reuse_count();
    // DESIGN.md: refresh `refresh_before` = min(max(30 s, 10 %), half) early,
    // minus up to 10 % of that as jitter: a 2 s token every 0.9 to 1.0 s.
    let before = (S(30).max(lifetime / 10)).min(lifetime / 2);
    let interval_min = lifetime - before - before / 10;
    // Plus the grant's own latency and scheduling on a busy 2-core box.
    let interval_max = (lifetime - before).mul_f64(1.1);
    let expect_lo = (elapsed.as_secs_f64() / interval_max.as_secs_f64()).floor() as usize;
    let expect_hi = (elapsed.as_secs_f64() / interval_min.as_secs_f64()).ceil() as usize;
    eprintln!(
        "load: requests={requests} non_200={} refresh_grants={grants} (expected {expect_lo}..={expect_hi} ±1 over {elapsed:?}) reuses={reuses} max_latency_ms={}",
        bad.len(),
        max_latency_ms.load(Ordering::Relaxed)
    );
    let times: Vec<_> = stack.idp.grants().iter().map(|g| g.at).collect();
    let gaps: Vec<u128> = times
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).unwrap_or_default().as_millis())
        .collect();
    eprintln!("load: grant gaps ms {gaps:?}");
    assert!(
        bad.is_empty(),
        "{} requests failed, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(3)]
    );
    assert!(
        requests > 2000,
        "too little load to mean anything: {requests}"
    );
    assert!(
        grants + 1 >= expect_lo && grants <= expect_hi + 1,
        "refresh grants {grants} not in {expect_lo}..={expect_hi} ±1"
    );
    stack.assert_no_reuse();
    app.shutdown().await;
}
