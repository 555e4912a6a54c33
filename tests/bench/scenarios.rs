//! The scenarios. Most compare direct / tokenproxy / nginx / haproxy under
//! one load, interleaved (A B C D, B C D A, …; haproxy only where the client
//! speaks HTTP/1.1 and the upstream plain HTTP); `refresh` and `idle1000`
//! measure one property each.

use crate::common::{percentile, rss_kib, Sample};
use crate::load::{h2load, idle_connections, wrk, Spinners};
use crate::report::{mmm, Table};
use crate::servers::{
    start_haproxy, start_nginx, start_tokenproxy, start_tokenproxy_with, test_ca_file, HaproxyOpts,
    NginxOpts, Proxy, TpOpts,
};
use crate::upstream::{start_upstream, Upstream, UpstreamOpts};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant, UNIX_EPOCH};
use tokenproxy::dev::{DevIdp, IdpOptions};

/// Every scenario, in run order: (name, what it measures).
pub const ALL: [(&str, &str); 12] = [
    ("small64", "2 B bodies, 64 connections, wrk closed loop"),
    ("body16k", "16 KiB bodies, 64 connections, wrk closed loop"),
    ("small1", "2 B bodies, 1 connection, wrk closed loop"),
    ("body1m", "1 MiB bodies, 8 connections, wrk closed loop"),
    (
        "fixed1k",
        "1 connection at a fixed 1,000 req/s (h2load --rps), SCHED_IDLE spinners on both CPUs",
    ),
    (
        "h2",
        "HTTP/2 (h2c prior knowledge) from the client, 4 connections × 16 streams (h2load)",
    ),
    (
        "https_upstream",
        "upstream over TLS (dev test CA, verified), 2 B bodies, 64 connections",
    ),
    (
        "refresh",
        "tokens expiring every 2 s under load: p99.9 around each grant vs steady state",
    ),
    (
        "idle1000",
        "1,000 idle keep-alive connections: RSS per connection",
    ),
    (
        "default2",
        "default runtime (2 worker threads) vs nginx 2 workers and haproxy 2 threads, nothing pinned, 2 B, 64 connections",
    ),
    (
        "dpop",
        "DPoP (RFC 9449): a proof signed per request vs the bearer path, 2 B, 64 connections; and the signing cost per proof",
    ),
    (
        "scale",
        "N refresh_token credentials and N routes (file store, postgres when installed): idle CPU, CPU and bytes per refresh, route lookup, RSS per credential",
    ),
];

/// Where the bench runs: shared by every scenario.
pub struct Ctx {
    pub dir: PathBuf,
    pub script: PathBuf,
    pub reps: usize,
    pub seconds: u64,
    pub idp: DevIdp,
    pub token: String,
    pub rt: tokio::runtime::Runtime,
}

/// What the targets section reads.
#[derive(Default)]
pub struct Findings {
    /// The comparison tables, by scenario name.
    pub tables: Vec<(String, Table)>,
    /// Median (window p99.9, steady p99.9) in µs.
    pub refresh: Option<(f64, f64)>,
    /// Median KiB per idle connection, settled: (tokenproxy, nginx).
    pub idle: Option<(f64, f64)>,
    pub scale: crate::scale::ScaleFindings,
}

#[derive(Clone)]
enum Load {
    Wrk { conns: u32 },
    H2load(&'static [&'static str]),
}

/// How a comparison scenario is set up.
struct Setup {
    title: String,
    body_len: usize,
    load: Load,
    tls: bool,
    h2: bool,
    /// Pinned (load on CPU 0, the rest on CPU 1, one worker each) or
    /// nothing pinned with default workers.
    pinned: bool,
    spinners: bool,
    /// haproxy as a fourth target (plain-HTTP upstream, HTTP/1.1 client).
    haproxy: bool,
}

impl Ctx {
    fn run_load(
        &self,
        load: &Load,
        url: &str,
        seconds: u64,
        cpus: Option<&str>,
        p: &[u32],
    ) -> Sample {
        match load {
            Load::Wrk { conns } => wrk(url, *conns, seconds, &self.script, cpus, p),
            Load::H2load(args) => {
                let log = self.dir.join("h2load.log");
                h2load(url, args, seconds, &log, cpus, p).0
            }
        }
    }

    fn log_notes(&self, proxies: &[(&str, &Proxy)], notes: &mut Vec<String>) {
        for (name, p) in proxies {
            let lines = p.log_lines();
            if !lines.is_empty() {
                let mut n = format!(
                    "{name} logged {} line(s) at warn or above; first:",
                    lines.len()
                );
                for l in lines.iter().take(3) {
                    let _ = write!(n, "\n    {l}");
                }
                notes.push(n);
            }
        }
    }

    /// direct, tokenproxy, nginx and (where `s.haproxy`) haproxy under the
    /// same load, interleaved: A B C D, B C D A, …
    fn compare(&self, s: Setup) -> Table {
        let upstream = start_upstream(UpstreamOpts {
            body_len: s.body_len,
            tls: s.tls,
            h2c: s.h2,
            check: None,
            cpus: if s.pinned { "1" } else { "0,1" },
        });
        let proxy_cpus = s.pinned.then_some("1");
        let load_cpus = s.pinned.then_some("0");
        let scheme = if s.tls { "https" } else { "http" };
        let tp = start_tokenproxy(
            &self.dir,
            TpOpts {
                upstream: format!("{scheme}://{}/", upstream.addr),
                worker_threads: s.pinned.then_some(1),
                ca_file: s.tls.then(test_ca_file),
                token_url: &self.idp.token_url(),
                cpus: proxy_cpus,
            },
        );
        let nginx = start_nginx(
            &self.dir,
            NginxOpts {
                upstream: upstream.addr,
                workers: if s.pinned { 1 } else { 2 },
                http2: s.h2,
                tls_ca: s.tls.then(test_ca_file),
                token: &self.token,
                cpus: proxy_cpus,
                buffer: if s.body_len >= 64 * 1024 { "64k" } else { "8k" },
            },
        );
        let haproxy = s.haproxy.then(|| {
            start_haproxy(
                &self.dir,
                HaproxyOpts {
                    upstream: upstream.addr,
                    threads: if s.pinned { 1 } else { 2 },
                    token: &self.token,
                    cpus: proxy_cpus,
                },
            )
        });
        let mut proxies: Vec<(&'static str, &Proxy)> = vec![("tokenproxy", &tp), ("nginx", &nginx)];
        if let Some(h) = &haproxy {
            proxies.push(("haproxy", h));
        }
        // The upstream serves any path; `/direct` tells it the request came
        // without a proxy (and so without a token).
        let mut targets = vec![(
            "direct",
            format!("{scheme}://{}/direct", upstream.addr),
            vec![],
        )];
        targets.extend(
            proxies
                .iter()
                .map(|(name, p)| (*name, p.url("/api/x"), p.pids())),
        );
        let n = targets.len();
        let _spin = s.spinners.then(|| Spinners::start(&["0", "1"]));
        // Warm up pools, TLS sessions and the token.
        for (_, url, _) in &targets[1..] {
            self.run_load(&s.load, url, 1, load_cpus, &[]);
        }
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); n];
        // Requests that reached the upstream without a bearer token, per
        // proxy (must stay 0).
        let mut no_bearer = vec![0u64; n];
        for rep in 0..self.reps {
            for k in 0..n {
                let i = (rep + k) % n;
                let (_, url, pids) = &targets[i];
                let before = upstream.no_bearer();
                samples[i].push(self.run_load(&s.load, url, self.seconds, load_cpus, pids));
                no_bearer[i] += upstream.no_bearer() - before;
            }
        }
        drop(_spin);
        let mut notes = Vec::new();
        for (i, (name, _, _)) in targets.iter().enumerate().skip(1) {
            if no_bearer[i] > 0 {
                notes.push(format!(
                    "{name}: {} request(s) reached the upstream without `Authorization: Bearer …`",
                    no_bearer[i]
                ));
            }
        }
        self.log_notes(&proxies, &mut notes);
        tp.stop();
        nginx.stop();
        if let Some(h) = haproxy {
            h.stop();
        }
        Table {
            title: s.title,
            targets: targets.iter().map(|(n, _, _)| *n).zip(samples).collect(),
            notes,
        }
    }

    pub fn run(&self, name: &str, findings: &mut Findings) -> String {
        let reps = self.reps;
        let wrk64 = Load::Wrk { conns: 64 };
        let plain = |title: &str, body_len: usize, load: Load| Setup {
            title: title.to_owned(),
            body_len,
            load,
            tls: false,
            h2: false,
            pinned: true,
            spinners: false,
            haproxy: true,
        };
        let table = match name {
            "small64" => self.compare(plain("small64: 2 B, 64 conns", 2, wrk64)),
            "body16k" => self.compare(plain("body16k: 16 KiB, 64 conns", 16 * 1024, wrk64)),
            "small1" => self.compare(plain(
                "small1: 2 B, 1 conn closed loop",
                2,
                Load::Wrk { conns: 1 },
            )),
            "body1m" => self.compare(plain(
                "body1m: 1 MiB, 8 conns",
                1 << 20,
                Load::Wrk { conns: 8 },
            )),
            "fixed1k" => self.compare(Setup {
                spinners: true,
                ..plain(
                    "fixed1k: 2 B, 1 conn at 1,000 req/s (h2load --h1 --rps 1000), SCHED_IDLE spinners",
                    2,
                    Load::H2load(&["--h1", "-c1", "-m1", "--rps", "1000"]),
                )
            }),
            "h2" => self.compare(Setup {
                h2: true,
                haproxy: false,
                ..plain(
                    "h2: HTTP/2 h2c from the client, 4 conns × 16 streams, 2 B (upstream leg HTTP/1.1 for the proxies)",
                    2,
                    Load::H2load(&["-c4", "-m16"]),
                )
            }),
            "https_upstream" => self.compare(Setup {
                tls: true,
                haproxy: false,
                ..plain(
                    "https_upstream: 2 B, 64 conns, upstream over TLS (direct = wrk over TLS)",
                    2,
                    wrk64,
                )
            }),
            "default2" => self.compare(Setup {
                pinned: false,
                ..plain(
                    "default2: 2 B, 64 conns, tokenproxy default runtime vs nginx 2 workers and haproxy nbthread 2, unpinned",
                    2,
                    wrk64,
                )
            }),
            "dpop" => self.dpop(),
            "refresh" => return self.refresh(findings),
            "idle1000" => return self.idle1000(findings),
            "scale" => return crate::scale::scale(self, &mut findings.scale),
            other => panic!("unknown scenario {other}"),
        };
        let out = table.render(reps);
        findings.tables.push((name.to_owned(), table));
        out
    }

    /// The same credential and upstream through two tokenproxies, one with
    /// `dpop = true` (an ES256 proof signed for every request), interleaved
    /// like `compare`; the note gives the signing cost alone.
    fn dpop(&self) -> Table {
        let upstream = start_upstream(UpstreamOpts {
            body_len: 2,
            tls: false,
            h2c: false,
            check: None,
            cpus: "1",
        });
        let token_url = self.idp.token_url();
        let opts = || TpOpts {
            upstream: format!("http://{}/", upstream.addr),
            worker_threads: Some(1),
            ca_file: None,
            token_url: &token_url,
            cpus: Some("1"),
        };
        let bearer = start_tokenproxy(&self.dir, opts());
        let dpop = start_tokenproxy_with(&self.dir, opts(), "dpop = true");
        let load = Load::Wrk { conns: 64 };
        let targets = [
            ("direct", format!("http://{}/direct", upstream.addr), vec![]),
            ("tokenproxy", bearer.url("/api/x"), bearer.pids()),
            ("tokenproxy+dpop", dpop.url("/api/x"), dpop.pids()),
        ];
        for (_, url, _) in &targets[1..] {
            self.run_load(&load, url, 1, Some("0"), &[]);
        }
        let n = targets.len();
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); n];
        for rep in 0..self.reps {
            for k in 0..n {
                let i = (rep + k) % n;
                let (_, url, pids) = &targets[i];
                samples[i].push(self.run_load(&load, url, self.seconds, Some("0"), pids));
            }
        }
        let mut notes = Vec::new();
        // The proof alone, on this thread: what each DPoP request adds.
        let (key, _) = tokenproxy::dpop::DpopKey::generate().unwrap();
        let ath = tokenproxy::dpop::ath("an-access-token");
        let rounds = 2000u32;
        let started = Instant::now();
        for _ in 0..rounds {
            let p = key.proof_header("GET", "http://127.0.0.1:1/x", Some(&ath), None);
            std::hint::black_box(p.unwrap());
        }
        notes.push(format!(
            "one ES256 proof (claims, signature, header value) takes {:.1} µs on the bench thread",
            started.elapsed().as_secs_f64() * 1e6 / f64::from(rounds)
        ));
        self.log_notes(
            &[("tokenproxy", &bearer), ("tokenproxy+dpop", &dpop)],
            &mut notes,
        );
        bearer.stop();
        dpop.stop();
        Table {
            title: "dpop: 2 B, 64 conns, bearer vs a DPoP proof per request".into(),
            targets: targets.iter().map(|(n, _, _)| *n).zip(samples).collect(),
            notes,
        }
    }

    /// Access tokens live 2 s (refreshed about 1 s before expiry) while
    /// 64 connections run closed loop; the upstream rejects any token the IdP
    /// would not accept.
    fn refresh(&self, findings: &mut Findings) -> String {
        let idp = self
            .rt
            .block_on(DevIdp::start(
                "127.0.0.1:0".parse().unwrap(),
                IdpOptions {
                    access_ttl: Duration::from_secs(2),
                    ..IdpOptions::default()
                },
            ))
            .unwrap();
        let upstream: Upstream = start_upstream(UpstreamOpts {
            body_len: 2,
            tls: false,
            h2c: false,
            check: Some(idp.token_check()),
            cpus: "1",
        });
        let tp = start_tokenproxy(
            &self.dir,
            TpOpts {
                upstream: format!("http://{}/", upstream.addr),
                worker_threads: Some(1),
                ca_file: None,
                token_url: &idp.token_url(),
                cpus: Some("1"),
            },
        );
        let url = tp.url("/api/x");
        let log = self.dir.join("refresh.log");
        let args: &[&str] = &["--h1", "-c64", "-m1"];
        h2load(&url, args, 1, &log, Some("0"), &[]);
        let seconds = (2 * self.seconds).max(12);
        let window_us = 100_000u64;
        let mut rows = Vec::new();
        for _ in 0..self.reps {
            let (sample, timed) = h2load(&url, args, seconds, &log, Some("0"), &tp.pids());
            let first = timed.iter().map(|t| t.start_us).min().unwrap_or(0);
            let last = timed
                .iter()
                .map(|t| t.start_us + t.latency_us)
                .max()
                .unwrap_or(0);
            let grants: Vec<u64> = idp
                .grants()
                .iter()
                .filter(|g| g.outcome == "ok")
                .map(|g| g.at.duration_since(UNIX_EPOCH).unwrap().as_micros() as u64)
                .filter(|&g| g + window_us >= first && g <= last + window_us)
                .collect();
            let (mut win, mut steady) = (Vec::new(), Vec::new());
            for t in timed.iter().filter(|t| t.status >= 0) {
                let (s, e) = (t.start_us, t.start_us + t.latency_us);
                // The first window that ends at or after the start overlaps
                // the request iff it starts before the request's end.
                let i = grants.partition_point(|&g| g + window_us < s);
                let inside = grants
                    .get(i)
                    .is_some_and(|&g| g.saturating_sub(window_us) <= e);
                if inside {
                    win.push(t.latency_us);
                } else {
                    steady.push(t.latency_us);
                }
            }
            win.sort_unstable();
            steady.sort_unstable();
            rows.push(RefreshRow {
                sample,
                grants: grants.len(),
                win_n: win.len(),
                win_p50: percentile(&win, 0.5),
                win_p999: percentile(&win, 0.999),
                steady_p50: percentile(&steady, 0.5),
                steady_p999: percentile(&steady, 0.999),
            });
        }
        let mut notes = Vec::new();
        if rows.iter().any(|r| r.grants == 0) {
            notes.push(
                "no grant during a run: the windows are empty (did the token lifetime apply?)"
                    .to_owned(),
            );
        }
        self.log_notes(&[("tokenproxy", &tp)], &mut notes);
        tp.stop();
        self.rt.block_on(idp.stop());
        let med =
            |f: fn(&RefreshRow) -> f64| crate::common::median_min_max(rows.iter().map(f).collect());
        let ratio = med(|r| r.win_p999 / r.steady_p999);
        findings.refresh = Some((med(|r| r.win_p999).0, med(|r| r.steady_p999).0));
        let mut out = format!(
            "\n### refresh: 2 B, 64 conns (h2load --h1), tokens live 2 s, {seconds} s per run, windows ±100 ms around each grant ({} reps, medians [min–max])\n\n",
            self.reps
        );
        out.push_str("| target | req/s | grants/run | requests in windows | window p50 µs | window p99.9 µs | steady p50 µs | steady p99.9 µs | window ÷ steady p99.9 | CPU µs/req | errors | non-2xx | upstream 401s |\n");
        out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        let _ = writeln!(
            out,
            "| tokenproxy | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            mmm(med(|r| r.sample.rps)),
            mmm(med(|r| r.grants as f64)),
            mmm(med(|r| r.win_n as f64)),
            mmm(med(|r| r.win_p50)),
            mmm(med(|r| r.win_p999)),
            mmm(med(|r| r.steady_p50)),
            mmm(med(|r| r.steady_p999)),
            if ratio.0.is_nan() {
                "–".to_owned()
            } else {
                format!("{:.2}× [{:.2}–{:.2}]", ratio.0, ratio.1, ratio.2)
            },
            mmm(med(|r| r.sample.cpu_us_per_req)),
            rows.iter().map(|r| r.sample.errors).sum::<u64>(),
            rows.iter().map(|r| r.sample.non_2xx).sum::<u64>(),
            upstream.rejected(),
        );
        for n in notes {
            let _ = writeln!(out, "\n{n}");
        }
        out
    }

    /// RSS growth per idle keep-alive connection, a fresh proxy per
    /// measurement (freed memory is not always returned to the OS).
    fn idle1000(&self, findings: &mut Findings) -> String {
        const N: usize = 1000;
        crate::common::raise_nofile(4 * N as u64);
        let upstream = start_upstream(UpstreamOpts {
            body_len: 2,
            tls: false,
            h2c: false,
            check: None,
            cpus: "1",
        });
        // (RSS before, 0.5 s after opening, settled, non-2xx)
        let mut rows: [Vec<(u64, u64, u64, usize)>; 2] = [Vec::new(), Vec::new()];
        let mut notes = Vec::new();
        for rep in 0..self.reps {
            for k in 0..2 {
                let i = (rep + k) % 2;
                let proxy = if i == 0 {
                    start_tokenproxy(
                        &self.dir,
                        TpOpts {
                            upstream: format!("http://{}/", upstream.addr),
                            worker_threads: Some(1),
                            ca_file: None,
                            token_url: &self.idp.token_url(),
                            cpus: Some("1"),
                        },
                    )
                } else {
                    start_nginx(
                        &self.dir,
                        NginxOpts {
                            upstream: upstream.addr,
                            workers: 1,
                            http2: false,
                            tls_ca: None,
                            token: &self.token,
                            cpus: Some("1"),
                            buffer: "8k",
                        },
                    )
                };
                // Token, upstream pool and code paths warm.
                drop(idle_connections(proxy.port, "/api/x", 4));
                std::thread::sleep(Duration::from_millis(300));
                let pids = proxy.pids();
                let before = rss_kib(&pids);
                let t0 = Instant::now();
                let (conns, bad) = idle_connections(proxy.port, "/api/x", N);
                let opened = t0.elapsed();
                std::thread::sleep(Duration::from_millis(500));
                let after = rss_kib(&pids);
                // Still open? A closed idle connection reads EOF at once.
                let mut closed = 0;
                for c in &conns {
                    c.set_nonblocking(true).unwrap();
                    let mut b = [0u8; 1];
                    if matches!(std::io::Read::read(&mut &*c, &mut b), Ok(0)) {
                        closed += 1;
                    }
                }
                if closed > 0 {
                    notes.push(format!(
                        "{}: {closed} of {N} idle connections were closed by the proxy within {:.1} s",
                        ["tokenproxy", "nginx"][i],
                        (opened + Duration::from_millis(500)).as_secs_f64()
                    ));
                }
                // Settled: idle long enough to be parked and for the
                // allocator's purge delay (mimalloc: 1 s), then a little
                // traffic on another connection, as a sidecar would see;
                // mimalloc returns freed pages only when it next runs.
                std::thread::sleep(Duration::from_millis(1500));
                drop(idle_connections(proxy.port, "/api/x", 4));
                std::thread::sleep(Duration::from_millis(300));
                let settled = rss_kib(&pids);
                drop(conns);
                if rep == self.reps - 1 {
                    self.log_notes(&[(["tokenproxy", "nginx"][i], &proxy)], &mut notes);
                }
                proxy.stop();
                rows[i].push((before, after, settled, bad));
            }
        }
        // KiB per connection between RSS before and the figure `at` picks.
        let growth = |i: usize, at: fn(&(u64, u64, u64, usize)) -> u64| {
            crate::common::median_min_max(
                rows[i]
                    .iter()
                    .map(|r| (at(r) as f64 - r.0 as f64) / N as f64)
                    .collect(),
            )
        };
        let per = |i: usize| growth(i, |r| r.1);
        let settled = |i: usize| growth(i, |r| r.2);
        findings.idle = Some((settled(0).0, settled(1).0));
        let mut out = format!(
            "\n### idle1000: {N} idle keep-alive connections, one 2 B request each ({} reps, fresh proxy each, medians [min–max])\n\n",
            self.reps
        );
        out.push_str(
            "| target | RSS before KiB | RSS after 0.5 s KiB | KiB per idle conn at 0.5 s | KiB per idle conn settled (2 s) | non-2xx |\n|---|---|---|---|---|---|\n",
        );
        for (i, name) in ["tokenproxy", "nginx (master + worker)"].iter().enumerate() {
            let m = |f: fn(&(u64, u64, u64, usize)) -> f64| {
                crate::common::median_min_max(rows[i].iter().map(f).collect())
            };
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {} | {} |",
                mmm(m(|r| r.0 as f64)),
                mmm(m(|r| r.1 as f64)),
                mmm(per(i)),
                mmm(settled(i)),
                rows[i].iter().map(|r| r.3).sum::<usize>()
            );
        }
        let ratio = |t: f64, n: f64| {
            if n > 0.0 {
                format!("{:.2}×", t / n)
            } else {
                "–".to_owned()
            }
        };
        let _ = writeln!(
            out,
            "| tokenproxy ÷ nginx | | | {} | {} | |",
            ratio(per(0).0, per(1).0),
            ratio(settled(0).0, settled(1).0)
        );
        for n in notes {
            let _ = writeln!(out, "\n{n}");
        }
        out
    }
}

struct RefreshRow {
    sample: Sample,
    grants: usize,
    win_n: usize,
    win_p50: f64,
    win_p999: f64,
    steady_p50: f64,
    steady_p999: f64,
}
