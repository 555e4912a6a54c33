//! The benchmark harness (issue 8): one run drives the same load at a fast
//! upstream directly, through tokenproxy (token from the dev IdP, so the real
//! engine is on the path), and through nginx doing the same job, alternating,
//! several repetitions, and prints medians with min–max.
//!
//! `cargo bench --bench proxy` (installs nginx and wrk with apt when missing).
//! Set `BENCH_REPS`, `BENCH_SECONDS` to change the defaults (3 × 5 s).
//! Pinning as on a 2-core machine: wrk on CPU 0; upstream and the proxy under
//! test on CPU 1; tokenproxy with one worker thread against one nginx worker.

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokenproxy::dev::{DevIdp, IdpOptions};

const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"#;

fn need(cmd: &str, package: &str) {
    if Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
    {
        return;
    }
    eprintln!("installing {package} …");
    let _ = Command::new("apt-get")
        .args(["install", "-y", "-q", package])
        .status();
}

/// A fast upstream: fixed body, keep-alive, HTTP/1.1, on its own thread.
fn start_upstream(body_len: usize) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let body = Bytes::from(vec![b'x'; body_len]);
            loop {
                let (s, _) = listener.accept().await.unwrap();
                let _ = s.set_nodelay(true);
                let body = body.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| {
                        let body = body.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(body)))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
    });
    rx.recv().unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// On-CPU nanoseconds of every thread of `pids` (schedstat).
fn cpu_ns(pids: &[u32]) -> u64 {
    let mut total = 0;
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
                total += s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    total
}

fn peak_rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

fn child_pids(parent: u32) -> Vec<u32> {
    let mut out = vec![parent];
    if let Ok(s) = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")) {
        out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    out
}

struct Sample {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    cpu_us_per_req: f64,
    rss_kib: u64,
    errors: u64,
}

fn run_wrk(url: &str, conns: u32, seconds: u64, script: &Path, pids: &[u32]) -> Sample {
    let cpu0 = cpu_ns(pids);
    let out = Command::new("taskset")
        .args([
            "-c",
            "0",
            "wrk",
            "-t1",
            &format!("-c{conns}"),
            &format!("-d{seconds}s"),
            "-s",
        ])
        .arg(script)
        .arg(url)
        .output()
        .expect("wrk runs");
    let cpu = cpu_ns(pids) - cpu0;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .unwrap_or_else(|| panic!("wrk said: {text}"));
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    let requests = v[0].max(1);
    Sample {
        rps: v[0] as f64 / (v[1] as f64 / 1e6),
        p50_us: v[2] as f64,
        p99_us: v[3] as f64,
        p999_us: v[4] as f64,
        cpu_us_per_req: if pids.is_empty() {
            0.0
        } else {
            cpu as f64 / 1000.0 / requests as f64
        },
        rss_kib: peak_rss_kib(pids),
        errors: v[5],
    }
}

fn median_min_max(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn nginx_conf(dir: &Path, port: u16, upstream: SocketAddr, token: &str) -> PathBuf {
    let conf = format!(
        r#"worker_processes 1;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir};
  proxy_temp_path {dir};
  upstream app {{ server {upstream}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    location /api/ {{
      proxy_pass http://app/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {token}";
      proxy_buffering off;
    }}
  }}
}}
"#,
        dir = dir.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    path
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not.
    if !std::env::args().any(|a| a == "--bench") {
        println!("benchmark skipped: run it with `cargo bench --bench proxy`");
        return;
    }
    need("nginx", "nginx-light");
    need("wrk", "wrk");
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("report.lua");
    std::fs::write(&script, WRK_SCRIPT).unwrap();
    // The bench process hosts the upstream and the IdP: keep it on CPU 1.
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

    let mut report = String::new();
    for (label, body_len, conns) in [
        ("small, 64 conns", 2usize, 64u32),
        ("16 KiB, 64 conns", 16 * 1024, 64),
        ("small, 1 conn", 2, 1),
        ("1 MiB, 8 conns", 1 << 20, 8),
    ] {
        let upstream = start_upstream(body_len);
        let tp_port = free_port();
        let admin_port = free_port();
        let cfg = dir.path().join(format!("tp-{tp_port}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[server]\nlisten = \"127.0.0.1:{tp_port}\"\nworker_threads = 1\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n[log]\nlevel = \"warn\"\n[credentials.svc]\ngrant = \"client_credentials\"\ntoken_url = \"{}\"\nclient_id = \"demo-client\"\nclient_secret = \"demo-secret\"\n[[routes]]\npath_prefix = \"/api/\"\nupstream = \"http://{upstream}/\"\ncredential = \"svc\"\n",
                idp.token_url()
            ),
        )
        .unwrap();
        let mut tp: Child = Command::new("taskset")
            .args(["-c", "1", env!("CARGO_BIN_EXE_tokenproxy"), "run", "-c"])
            .arg(&cfg)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_port(tp_port);
        let nginx_port = free_port();
        let conf = nginx_conf(dir.path(), nginx_port, upstream, &token);
        let mut nginx: Child = Command::new("taskset")
            .args(["-c", "1", "nginx", "-c"])
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_port(nginx_port);
        // Warm up pools and the token.
        for url in [
            format!("http://127.0.0.1:{tp_port}/api/x"),
            format!("http://127.0.0.1:{nginx_port}/api/x"),
        ] {
            run_wrk(&url, conns, 1, &script, &[]);
        }
        let targets = [
            ("direct", format!("http://{upstream}/x")),
            ("tokenproxy", format!("http://127.0.0.1:{tp_port}/api/x")),
            ("nginx", format!("http://127.0.0.1:{nginx_port}/api/x")),
        ];
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(), Vec::new(), Vec::new()];
        for rep in 0..reps {
            // Interleave: A B C, B C A, C A B …
            for k in 0..3 {
                let i = (rep + k) % 3;
                let pids = match i {
                    1 => vec![tp.id()],
                    2 => child_pids(nginx.id()),
                    _ => vec![],
                };
                samples[i].push(run_wrk(&targets[i].1, conns, seconds, &script, &pids));
            }
        }
        // SIGTERM: nginx's master then stops its workers (SIGKILL would orphan them).
        for pid in [tp.id(), nginx.id()] {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let _ = tp.wait();
        let _ = nginx.wait();
        let med =
            |i: usize, f: fn(&Sample) -> f64| median_min_max(samples[i].iter().map(f).collect());
        let _ = writeln!(
            report,
            "\n{label} (body {body_len} B, {reps}×{seconds}s, medians [min–max])"
        );
        let _ = writeln!(
            report,
            "{:<11} {:>22} {:>18} {:>18} {:>20} {:>22} {:>9} {:>6}",
            "target", "req/s", "p50 µs", "p99 µs", "p99.9 µs", "CPU µs/req", "RSS KiB", "errors"
        );
        for (i, (name, _)) in targets.iter().enumerate() {
            let f = |(m, lo, hi): (f64, f64, f64)| format!("{m:.1} [{lo:.1}–{hi:.1}]");
            let _ = writeln!(
                report,
                "{:<11} {:>22} {:>18} {:>18} {:>20} {:>22} {:>9} {:>6}",
                name,
                f(med(i, |s| s.rps)),
                f(med(i, |s| s.p50_us)),
                f(med(i, |s| s.p99_us)),
                f(med(i, |s| s.p999_us)),
                if i == 0 {
                    "-".to_owned()
                } else {
                    f(med(i, |s| s.cpu_us_per_req))
                },
                samples[i].iter().map(|s| s.rss_kib).max().unwrap_or(0),
                samples[i].iter().map(|s| s.errors).sum::<u64>()
            );
        }
        let ratio = |i: usize, j: usize, f: fn(&Sample) -> f64| med(i, f).0 / med(j, f).0;
        let _ = writeln!(
            report,
            "tokenproxy/nginx: req/s {:.2}×, CPU/req {:.2}×, p50 {:.2}×; tokenproxy/direct: req/s {:.2}×, added p50 {:.0} µs (nginx {:.0} µs)",
            ratio(1, 2, |s| s.rps),
            ratio(1, 2, |s| s.cpu_us_per_req),
            ratio(1, 2, |s| s.p50_us),
            ratio(1, 0, |s| s.rps),
            med(1, |s| s.p50_us).0 - med(0, |s| s.p50_us).0,
            med(2, |s| s.p50_us).0 - med(0, |s| s.p50_us).0,
        );
        print!("{}", report.split_off(0));
    }
    rt.block_on(idp.stop());
}
