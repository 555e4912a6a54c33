//! The benchmark harness (issue 8): one run drives the same load at a fast
//! upstream directly, through tokenproxy (token from the dev IdP, so the real
//! engine is on the path), and through nginx and haproxy doing the same job
//! (haproxy where the client speaks HTTP/1.1 to a plain-HTTP upstream),
//! interleaved (A B C D, B C D A, …), several repetitions, and prints a
//! markdown table per scenario (medians with min–max, ratios to nginx, to
//! haproxy and to direct), then the issue's targets, met or missed.
//!
//! `cargo bench --bench proxy` (installs nginx, haproxy, wrk and h2load with
//! apt when missing). `BENCH_REPS`, `BENCH_SECONDS` change the defaults (3 × 5 s);
//! `BENCH_SCENARIOS=small64,fixed1k,…` picks a subset (default: all, see
//! [`scenarios::ALL`]). `BENCH_TOKENPROXY=<path>` runs another tokenproxy
//! binary (a baseline build) under the same harness.
//! Pinning as on a 2-core machine: the load generator on CPU 0; upstream and
//! the proxy under test on CPU 1; tokenproxy with one worker thread against
//! one nginx worker and haproxy `nbthread 1` (except `default2`, which pins
//! nothing: 2 of each).

mod common;
mod load;
mod report;
mod scale;
mod scenarios;
mod servers;
mod upstream;

use common::{env_or, need, Sample};
use report::{num, signed};
use scenarios::{Ctx, Findings, ALL};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokenproxy::dev::{DevIdp, IdpOptions};

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not.
    if !std::env::args().any(|a| a == "--bench") {
        println!("benchmark skipped: run it with `cargo bench --bench proxy`");
        return;
    }
    let started = Instant::now();
    let selected: Vec<String> = match std::env::var("BENCH_SCENARIOS") {
        Ok(v) if !v.trim().is_empty() && v.trim() != "all" => {
            v.split(',').map(|s| s.trim().to_owned()).collect()
        }
        _ => ALL.iter().map(|(n, _)| (*n).to_owned()).collect(),
    };
    for s in &selected {
        if !ALL.iter().any(|(n, _)| n == s) {
            let names: Vec<&str> = ALL.iter().map(|(n, _)| *n).collect();
            eprintln!("unknown scenario {s:?}; known: {}", names.join(","));
            std::process::exit(2);
        }
    }
    // `scale` drives its own requests: no load generator, no other proxy.
    if selected.iter().any(|s| s != "scale") {
        need("nginx", "nginx-light");
        need("haproxy", "haproxy");
        need("wrk", "wrk");
        need("h2load", "nghttp2-client");
    }
    let reps: usize = env_or("BENCH_REPS", 3usize).max(1);
    let seconds: u64 = env_or("BENCH_SECONDS", 5u64).max(1);
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("report.lua");
    std::fs::write(&script, load::WRK_SCRIPT).unwrap();
    // The bench process hosts the upstream and the IdP: keep it on CPU 1
    // (threads started later inherit this; `default2`'s upstream re-pins
    // its own thread).
    let _ = Command::new("taskset")
        .args(["-cp", "1", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let idp = rt
        .block_on(DevIdp::start(
            "127.0.0.1:0".parse().unwrap(),
            IdpOptions {
                access_ttl: Duration::from_secs(3600),
                ..IdpOptions::default()
            },
        ))
        .unwrap();
    let token = idp.issue_access_token("demo-client");
    let ctx = Ctx {
        dir: dir.path().to_owned(),
        script,
        reps,
        seconds,
        idp,
        token,
        rt,
    };

    println!(
        "## tokenproxy vs nginx and haproxy ({reps} reps × {seconds} s; scenarios: {})",
        selected.join(", ")
    );
    let mut findings = Findings::default();
    for name in &selected {
        let t0 = Instant::now();
        let out = ctx.run(name, &mut findings);
        print!("{out}");
        println!("\n({name}: {:.0} s)", t0.elapsed().as_secs_f64());
    }
    print!("{}", targets(&findings));
    ctx.rt.block_on(ctx.idp.stop());
    println!(
        "\ntotal wall time: {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

/// The issue's targets: met, missed, or not run.
fn targets(f: &Findings) -> String {
    let table = |name: &str| f.tables.iter().find(|(n, _)| n == name).map(|(_, t)| t);
    let med =
        |name: &str, target: &str, g: fn(&Sample) -> f64| table(name).map(|t| t.median(target, g));
    let mut lines = Vec::new();
    let mut push = |what: String, verdict: Option<(bool, String)>| {
        lines.push(match verdict {
            Some((ok, fig)) => format!("- **{}** {what}: {fig}", if ok { "met" } else { "MISSED" }),
            None => format!("- not run: {what}"),
        })
    };
    let rps = |s: &Sample| s.rps;
    let cpu = |s: &Sample| s.cpu_us_per_req;
    for (name, label) in [("small64", "small"), ("body16k", "16 KiB")] {
        push(
            format!("CPU/request {label} ≤ 1.0× nginx"),
            med(name, "tokenproxy", cpu)
                .zip(med(name, "nginx", cpu))
                .map(|(t, n)| {
                    (
                        t <= n,
                        format!("{:.2}× ({} vs {} µs)", t / n, num(t), num(n)),
                    )
                }),
        );
        push(
            format!("throughput {label} ≥ 1.0× nginx"),
            med(name, "tokenproxy", rps)
                .zip(med(name, "nginx", rps))
                .map(|(t, n)| {
                    (
                        t >= n,
                        format!("{:.2}× ({} vs {} req/s)", t / n, num(t), num(n)),
                    )
                }),
        );
    }
    let p50 = |s: &Sample| s.p50_us;
    push(
        "added p50 at fixed 1k req/s ≤ nginx's".to_owned(),
        table("fixed1k").map(|t| {
            let d = t.median("direct", p50);
            let (a, b) = (t.median("tokenproxy", p50) - d, t.median("nginx", p50) - d);
            (
                a <= b,
                format!("{} µs vs nginx {} µs", signed(a), signed(b)),
            )
        }),
    );
    push(
        "1 MiB throughput ≥ the better of nginx and haproxy".to_owned(),
        med("body1m", "tokenproxy", rps)
            .zip(med("body1m", "nginx", rps))
            .map(|(t, n)| {
                // haproxy's median, when it ran (NaN otherwise).
                let h = med("body1m", "haproxy", rps).unwrap_or(f64::NAN);
                let (best, who) = if h > n { (h, "haproxy") } else { (n, "nginx") };
                let other = if h.is_nan() {
                    String::new()
                } else if who == "nginx" {
                    format!("; haproxy {}", num(h))
                } else {
                    format!("; nginx {}", num(n))
                };
                (
                    t >= best,
                    format!(
                        "{:.2}× ({} vs {who} {} req/s{other})",
                        t / best,
                        num(t),
                        num(best)
                    ),
                )
            }),
    );
    push(
        "refresh-window p99.9 ≤ 1.1× steady".to_owned(),
        f.refresh.map(|(w, s)| {
            (
                w <= 1.1 * s,
                format!("{:.2}× ({} vs {} µs)", w / s, num(w), num(s)),
            )
        }),
    );
    let peak = ["small64", "body16k"]
        .iter()
        .filter_map(|n| table(n).map(|t| t.stat("tokenproxy", |s| s.rss_kib as f64).2))
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    push(
        "peak RSS ≤ 10 MiB at 64 conns (small64, body16k)".to_owned(),
        peak.map(|k| (k <= 10.0 * 1024.0, format!("{:.1} MiB", k / 1024.0))),
    );
    push(
        "≤ 4 KiB per idle connection, settled (idle1000)".to_owned(),
        f.idle
            .map(|(t, n)| (t <= 4.0, format!("{} KiB (nginx {} KiB)", num(t), num(n)))),
    );
    push(
        "default runtime throughput ≥ nginx 2 workers (default2)".to_owned(),
        med("default2", "tokenproxy", rps)
            .zip(med("default2", "nginx", rps))
            .map(|(t, n)| {
                (
                    t >= n,
                    format!("{:.2}× ({} vs {} req/s)", t / n, num(t), num(n)),
                )
            }),
    );
    scale_targets(&f.scale, &mut push);
    format!(
        "\n### targets (issue 8, issue 18)\n\n{}\n",
        lines.join("\n")
    )
}

/// Issue 18, target 4: at N = 1,000 against N = 1, per store.
fn scale_targets(s: &scale::ScaleFindings, push: &mut impl FnMut(String, Option<(bool, String)>)) {
    for store in ["file", "postgres"] {
        let at = |n, f| s.median(store, n, f);
        push(
            format!("{store}: idle CPU with 1,000 fresh credentials < 1 % of a core"),
            at(1000, |r| r.idle_pct).map(|v| (v < 1.0, format!("{v:.2} %"))),
        );
        let flat = |what: &str, f: fn(&scale::Run) -> f64, unit: &str| {
            (
                format!("{store}: {what} at N = 1,000 ≤ 1.2× N = 1"),
                at(1000, f).zip(at(1, f)).map(|(big, one)| {
                    (
                        big <= 1.2 * one,
                        format!("{:.2}× ({} vs {} {unit})", big / one, num(big), num(one)),
                    )
                }),
            )
        };
        for (what, f, unit) in [
            (
                "CPU per refresh",
                (|r: &scale::Run| r.refresh_cpu_us) as fn(&_) -> f64,
                "µs",
            ),
            ("bytes written per refresh", |r| r.refresh_wchar, "B"),
            (
                "CPU per request on the last route",
                |r| r.route_cpu_us,
                "µs",
            ),
        ] {
            let (w, v) = flat(what, f, unit);
            push(w, v);
        }
        if let Some((one, big)) = at(1, |r| r.rss_kib).zip(at(1000, |r| r.rss_kib)) {
            push(
                format!("{store}: memory per credential (reported)"),
                Some((true, format!("{:.1} KiB", (big - one) / 999.0))),
            );
        }
    }
}
