//! The `scale` scenario (issue 18, target 4): how the cost of a credential
//! grows with the number of credentials. For each N (`BENCH_SCALE_N`,
//! default 1,10,200,1000) and each store (file; postgres when its binaries
//! are installed), a fresh tokenproxy (one worker, pinned) with N
//! `refresh_token` credentials (1-hour tokens from a local dev IdP) and N
//! routes, one per credential. Measured, as process CPU time (utime +
//! stime) so that other load on the machine does not count:
//!
//! - start-up: seconds until every credential made its one grant;
//! - idle CPU, % of a core over `BENCH_SCALE_IDLE` seconds (default 20)
//!   with every token fresh: the store's change polls;
//! - per refresh (200 forced through the admin API, one at a time): CPU
//!   and bytes written beyond the idle rates (`wchar` of /proc/PID/io:
//!   every write syscall, file and socket; and `write_bytes`, what reached
//!   the storage layer);
//! - route lookup: CPU per request to the last route of N, over one
//!   keep-alive connection, beyond the idle rate;
//! - RSS with everything fresh, and per credential against N = 1.

use crate::common::{env_or, free_port, median_min_max, rss_kib};
use crate::load::read_response;
use crate::report::mmm;
use crate::scenarios::Ctx;
use crate::servers::launch_tokenproxy;
use crate::upstream::{start_upstream, UpstreamOpts};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokenproxy::dev::{DevClient, DevIdp, IdpOptions};

/// Refreshes forced per run.
const REFRESHES: usize = 200;
/// Requests per route-lookup measurement.
const REQUESTS: usize = 20_000;

/// One run of one (store, N).
#[derive(Clone, Debug, Default)]
pub struct Run {
    pub fresh_s: f64,
    pub idle_pct: f64,
    pub refresh_cpu_us: f64,
    pub refresh_wchar: f64,
    pub refresh_storage_bytes: f64,
    pub route_cpu_us: f64,
    pub rss_kib: f64,
}

/// Medians per (store, N), for the targets.
#[derive(Default)]
pub struct ScaleFindings {
    /// (store, N, runs)
    pub rows: Vec<(&'static str, usize, Vec<Run>)>,
}

impl ScaleFindings {
    pub fn median(&self, store: &str, n: usize, f: fn(&Run) -> f64) -> Option<f64> {
        self.rows
            .iter()
            .find(|(s, m, _)| *s == store && *m == n)
            .map(|(_, _, r)| median_min_max(r.iter().map(f).collect()).0)
    }
}

pub fn scale(ctx: &Ctx, findings: &mut ScaleFindings) -> String {
    let ns: Vec<usize> = std::env::var("BENCH_SCALE_N")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 10, 200, 1000]);
    let idle_secs: u64 = env_or("BENCH_SCALE_IDLE", 20u64).max(2);
    let max_n = ns.iter().copied().max().unwrap_or(1);
    crate::common::raise_nofile(4096 + 4 * max_n as u64);
    let idp = ctx
        .rt
        .block_on(DevIdp::start(
            "127.0.0.1:0".parse().unwrap(),
            IdpOptions {
                access_ttl: Duration::from_secs(3600),
                clients: (0..max_n)
                    .map(|i| DevClient::confidential(&format!("c{i}"), "s"))
                    .collect(),
                ..IdpOptions::default()
            },
        ))
        .unwrap();
    let upstream = start_upstream(UpstreamOpts {
        body_len: 2,
        tls: false,
        h2c: false,
        check: Some(idp.token_check()),
        cpus: "1",
    });
    let pg = Pg::start(&ctx.dir);
    let mut stores: Vec<&'static str> = vec!["file"];
    let mut notes = Vec::new();
    match &pg {
        Some(_) => stores.push("postgres"),
        None => notes
            .push("postgres: SKIPPED (no PostgreSQL under /usr/lib/postgresql/*/bin)".to_owned()),
    }
    let mut runs: Vec<(&'static str, usize, Vec<Run>)> = Vec::new();
    let mut db = 0;
    for rep in 0..ctx.reps {
        for store in &stores {
            for &n in &ns {
                let store_cfg = match *store {
                    "file" => format!(
                        "kind = \"file\"\npath = \"{}\"",
                        ctx.dir.join(format!("scale-{rep}-{n}.json")).display()
                    ),
                    _ => {
                        let pg = pg.as_ref().unwrap();
                        db += 1;
                        format!("kind = \"postgres\"\nurl = \"{}\"", pg.new_database(db))
                    }
                };
                let (run, warn) = one_run(
                    ctx,
                    &idp,
                    &upstream.addr.to_string(),
                    &store_cfg,
                    n,
                    idle_secs,
                );
                if let Some(w) = warn {
                    notes.push(format!("{store} N={n}: {w}"));
                }
                match runs.iter_mut().find(|(s, m, _)| s == store && *m == n) {
                    Some((_, _, v)) => v.push(run),
                    None => runs.push((store, n, vec![run])),
                }
            }
        }
    }
    drop(pg);
    ctx.rt.block_on(idp.stop());
    if upstream.rejected() > 0 {
        notes.push(format!(
            "the upstream rejected {} request(s) whose token the IdP did not accept",
            upstream.rejected()
        ));
    }
    let mut out = format!(
        "\n### scale: N refresh_token credentials and N routes, 1-hour tokens, one worker ({} reps, fresh proxy each, medians [min–max]; CPU is process CPU time, idle rate subtracted from the per-refresh and per-request figures)\n\n",
        ctx.reps
    );
    out.push_str("| store | N | all fresh s | idle CPU % of a core | CPU µs/refresh | bytes written/refresh (wchar) | storage bytes/refresh | CPU µs/request, last route | RSS MiB | KiB/credential vs N=1 |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for (store, n, r) in &runs {
        let m = |f: fn(&Run) -> f64| mmm(median_min_max(r.iter().map(f).collect()));
        let base = runs
            .iter()
            .find(|(s, m, _)| s == store && *m == 1)
            .map(|(_, _, r)| median_min_max(r.iter().map(|x| x.rss_kib).collect()).0);
        let per_cred = match base {
            Some(b) if *n > 1 => {
                let v = median_min_max(r.iter().map(|x| x.rss_kib).collect()).0;
                format!("{:.1}", (v - b) / (*n as f64 - 1.0))
            }
            _ => "–".to_owned(),
        };
        let _ = writeln!(
            out,
            "| {store} | {n} | {} | {} | {} | {} | {} | {} | {} | {per_cred} |",
            m(|x| x.fresh_s),
            m(|x| x.idle_pct),
            m(|x| x.refresh_cpu_us),
            m(|x| x.refresh_wchar),
            m(|x| x.refresh_storage_bytes),
            m(|x| x.route_cpu_us),
            m(|x| x.rss_kib / 1024.0),
        );
    }
    for n in notes {
        let _ = writeln!(out, "\n{n}");
    }
    findings.rows = runs;
    out
}

/// One fresh proxy with `n` credentials; the warning, if any.
fn one_run(
    ctx: &Ctx,
    idp: &DevIdp,
    upstream: &str,
    store_cfg: &str,
    n: usize,
    idle_secs: u64,
) -> (Run, Option<String>) {
    let port = free_port();
    let admin = free_port();
    let mut cfg = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nworker_threads = 1\nmax_connections = 4096\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[log]\nlevel = \"warn\"\n[store]\n{store_cfg}\n"
    );
    for i in 0..n {
        let seed = idp.issue_refresh_token(&format!("c{i}"), &format!("u{i}"));
        let _ = write!(
            cfg,
            "[credentials.c{i}]\ngrant = \"refresh_token\"\ntoken_url = \"{}\"\nclient_id = \"c{i}\"\nclient_secret = \"s\"\nrefresh_token = \"{seed}\"\n",
            idp.token_url()
        );
    }
    for i in 0..n {
        let _ = write!(
            cfg,
            "[[routes]]\npath_prefix = \"/r{i}/\"\nupstream = \"http://{upstream}/\"\ncredential = \"c{i}\"\n"
        );
    }
    let grants0 = idp.grant_count("refresh_token");
    let t0 = Instant::now();
    let tp = launch_tokenproxy(&ctx.dir, port, &cfg, Some("1"));
    let pids = tp.pids();
    let deadline = t0 + Duration::from_secs(60 + n as u64 / 5);
    while idp.grant_count("refresh_token") < grants0 + n {
        if Instant::now() > deadline {
            let warn = format!(
                "only {} of {n} credentials fresh in time",
                idp.grant_count("refresh_token") - grants0
            );
            tp.stop();
            return (Run::default(), Some(warn));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let fresh_s = t0.elapsed().as_secs_f64();
    // Let the last writes land and start-up garbage settle.
    std::thread::sleep(Duration::from_secs(3));
    let rss = rss_kib(&pids) as f64;

    let (io0, c0, w0) = (proc_io(&pids), cpu_ns(&pids), Instant::now());
    std::thread::sleep(Duration::from_secs(idle_secs));
    let idle_s = w0.elapsed().as_secs_f64();
    let idle_ns_per_s = (cpu_ns(&pids) - c0) as f64 / idle_s;
    let io1 = proc_io(&pids);
    // Background writes (postgres polls write queries) per second.
    let idle_io = (
        (io1.0 - io0.0) as f64 / idle_s,
        (io1.1 - io0.1) as f64 / idle_s,
    );

    // Round robin over the credentials (one at a time): N = 1 refreshes
    // its one credential as often as N = 1,000 refreshes 20 of them once.
    let k = REFRESHES;
    let (io0, c0, w0) = (proc_io(&pids), cpu_ns(&pids), Instant::now());
    let mut failed = 0;
    for i in 0..k {
        if !admin_refresh(admin, &format!("c{}", i % n)) {
            failed += 1;
        }
    }
    let took = w0.elapsed().as_secs_f64();
    let spent = (cpu_ns(&pids) - c0) as f64 - idle_ns_per_s * took;
    let io1 = proc_io(&pids);
    let refresh_cpu_us = spent / 1e3 / k as f64;
    let per_refresh = |d: u64, idle: f64| (d as f64 - idle * took) / k as f64;

    let (c0, w0) = (cpu_ns(&pids), Instant::now());
    let bad = requests(port, &format!("/r{}/x", n - 1), REQUESTS);
    let spent = (cpu_ns(&pids) - c0) as f64 - idle_ns_per_s * w0.elapsed().as_secs_f64();
    let route_cpu_us = spent / 1e3 / REQUESTS as f64;

    let mut warn = Vec::new();
    if failed > 0 {
        warn.push(format!("{failed} of {k} forced refreshes failed"));
    }
    if bad > 0 {
        warn.push(format!("{bad} of {REQUESTS} requests were not 2xx"));
    }
    let logged = tp.log_lines();
    if !logged.is_empty() {
        warn.push(format!(
            "{} log line(s) at warn or above; first: {}",
            logged.len(),
            logged[0]
        ));
    }
    tp.stop();
    (
        Run {
            fresh_s,
            idle_pct: idle_ns_per_s / 1e9 * 100.0,
            refresh_cpu_us,
            refresh_wchar: per_refresh(io1.0 - io0.0, idle_io.0),
            refresh_storage_bytes: per_refresh(io1.1 - io0.1, idle_io.1),
            route_cpu_us,
            rss_kib: rss,
        },
        (!warn.is_empty()).then(|| warn.join("; ")),
    )
}

/// utime + stime of `pids` in ns (/proc/PID/stat: unlike schedstat per
/// thread, it keeps the time of threads that exited, such as idle blocking
/// pool threads). Clock ticks (10 ms): windows and counts are sized for it.
fn cpu_ns(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            // Fields after the parenthesised command name; utime, stime are 14, 15.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum::<u64>()
        * 10_000_000
}

/// (wchar, write_bytes) summed over `pids`.
fn proc_io(pids: &[u32]) -> (u64, u64) {
    let mut out = (0, 0);
    for p in pids {
        let text = std::fs::read_to_string(format!("/proc/{p}/io")).unwrap_or_default();
        for l in text.lines() {
            let v = |l: &str| l.split_whitespace().nth(1)?.parse::<u64>().ok();
            if l.starts_with("wchar:") {
                out.0 += v(l).unwrap_or(0);
            } else if l.starts_with("write_bytes:") {
                out.1 += v(l).unwrap_or(0);
            }
        }
    }
    out
}

/// `POST /credentials/<name>/refresh`; true on 200.
fn admin_refresh(admin: u16, name: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", admin)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(40)));
    let req = format!(
        "POST /credentials/{name}/refresh HTTP/1.1\r\nHost: 127.0.0.1\r\nx-tokenproxy-admin: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    resp.starts_with(b"HTTP/1.1 200")
}

/// `n` sequential GETs over one keep-alive connection; how many were not 2xx.
fn requests(port: u16, path: &str, n: usize) -> usize {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    let mut bad = 0;
    for _ in 0..n {
        s.write_all(req.as_bytes()).unwrap();
        if !read_response(&mut s).is_some_and(|st| (200..300).contains(&st)) {
            bad += 1;
        }
    }
    bad
}

/// A throwaway PostgreSQL cluster (as the fleet tests start one: a temp
/// dir, a free port, run as `nobody` when we are root). Stopped on drop.
struct Pg {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    run_as: Option<&'static str>,
}

impl Pg {
    fn start(dir: &Path) -> Option<Pg> {
        let mut bins: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                let bin = e.path().join("bin");
                bin.join("initdb").exists().then_some((v, bin))
            })
            .collect();
        bins.sort();
        let bin = bins.pop()?.1;
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let base = dir.join("pg");
        let sock = base.join("sock");
        std::fs::create_dir_all(&sock).unwrap();
        let run_as = root.then_some("nobody");
        if let Some(u) = run_as {
            let _ = Command::new("chown")
                .args(["-R", &format!("{u}:")])
                .arg(&base)
                .status();
            // The bench's temp dir must be traversable by the server user.
            let _ = Command::new("chmod").args(["a+x"]).arg(dir).status();
        }
        let pg = Pg {
            bin,
            data: base.join("data"),
            port: free_port(),
            run_as,
        };
        let ok = pg
            .cmd("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&pg.data)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            pg.port,
            sock.display()
        );
        let ok = ok
            && pg
                .cmd("pg_ctl")
                .arg("-D")
                .arg(&pg.data)
                .args(["-o", &opts, "-l"])
                .arg(base.join("pg.log"))
                .args(["-w", "start"])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "postgres did not start; see {}",
                base.join("pg.log").display()
            );
            return None;
        }
        Some(pg)
    }

    fn cmd(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        let mut c = match self.run_as {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        c.stdin(Stdio::null());
        c
    }

    /// A new empty database; its URL.
    fn new_database(&self, i: usize) -> String {
        let ok = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-U", "postgres", "-q", "-p"])
            .arg(self.port.to_string())
            .args(["-d", "postgres", "-c", &format!("CREATE DATABASE s{i}")])
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "CREATE DATABASE s{i}");
        format!("postgres://postgres@127.0.0.1:{}/s{i}", self.port)
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .status();
    }
}
