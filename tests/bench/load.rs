//! Load generators: wrk (throughput, closed loop), h2load (HTTP/2, fixed
//! rate, and per-request timestamps from its `--log-file`), an idle
//! keep-alive client, and SCHED_IDLE spinners.

use crate::common::{cpu_ns, peak_rss_kib, percentile, Sample};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %d %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status))
end
"#;

/// A command pinned to `cpus` (taskset list), or unpinned for `None`.
fn pinned(cpus: Option<&str>, program: &str) -> Command {
    match cpus {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", c, program]);
            cmd
        }
        None => Command::new(program),
    }
}

/// wrk, one thread, `conns` connections, for `seconds`; CPU and peak RSS of
/// `pids` over the run.
pub fn wrk(
    url: &str,
    conns: u32,
    seconds: u64,
    script: &Path,
    cpus: Option<&str>,
    pids: &[u32],
) -> Sample {
    let cpu0 = cpu_ns(pids);
    let out = pinned(cpus, "wrk")
        .args(["-t1", &format!("-c{conns}"), &format!("-d{seconds}s"), "-s"])
        .arg(script)
        .arg(url)
        .output()
        .expect("wrk runs");
    let cpu = cpu_ns(pids) - cpu0;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .unwrap_or_else(|| panic!("wrk said: {text} {}", String::from_utf8_lossy(&out.stderr)));
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
            f64::NAN
        } else {
            cpu as f64 / 1000.0 / requests as f64
        },
        rss_kib: peak_rss_kib(pids),
        errors: v[5],
        non_2xx: v[6],
    }
}

/// One request from h2load's log: start (µs since the epoch), status (-1:
/// failed), latency (µs).
#[derive(Clone, Copy, Debug)]
pub struct Timed {
    pub start_us: u64,
    pub status: i32,
    pub latency_us: u64,
}

/// h2load with `args` (connections, streams, rate, `--h1`…) for `seconds`
/// against `url`, per-request log parsed here for the percentiles.
pub fn h2load(
    url: &str,
    args: &[&str],
    seconds: u64,
    log: &Path,
    cpus: Option<&str>,
    pids: &[u32],
) -> (Sample, Vec<Timed>) {
    let cpu0 = cpu_ns(pids);
    let out = pinned(cpus, "h2load")
        .args(args)
        .args(["-D", &seconds.to_string(), "--log-file"])
        .arg(log)
        .arg(url)
        .output()
        .expect("h2load runs");
    let cpu = cpu_ns(pids) - cpu0;
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let timed: Vec<Timed> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            Some(Timed {
                start_us: f.next()?.parse().ok()?,
                status: f.next()?.parse().ok()?,
                latency_us: f.next()?.trim().parse().ok()?,
            })
        })
        .collect();
    let _ = std::fs::remove_file(log);
    // h2load prints the protocol it negotiated: make sure it is the one
    // asked for (h2c unless `--h1`).
    let stdout = String::from_utf8_lossy(&out.stdout);
    let want = if args.contains(&"--h1") {
        "http/1.1"
    } else {
        "h2c"
    };
    let proto = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Application protocol:"))
        .map(str::trim);
    assert_eq!(proto, Some(want), "h2load against {url}: {stdout}");
    if timed.is_empty() {
        panic!(
            "h2load logged nothing: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut lat: Vec<u64> = timed
        .iter()
        .filter(|t| t.status >= 0)
        .map(|t| t.latency_us)
        .collect();
    lat.sort_unstable();
    let errors = timed.iter().filter(|t| t.status < 0).count() as u64;
    let non_2xx = timed
        .iter()
        .filter(|t| t.status >= 0 && !(200..300).contains(&t.status))
        .count() as u64;
    let first = timed.iter().map(|t| t.start_us).min().unwrap_or(0);
    let last = timed
        .iter()
        .map(|t| t.start_us + t.latency_us)
        .max()
        .unwrap_or(0);
    let span = ((last - first) as f64 / 1e6).max(seconds as f64 * 0.5);
    let done = lat.len().max(1);
    (
        Sample {
            rps: lat.len() as f64 / span,
            p50_us: percentile(&lat, 0.50),
            p99_us: percentile(&lat, 0.99),
            p999_us: percentile(&lat, 0.999),
            cpu_us_per_req: if pids.is_empty() {
                f64::NAN
            } else {
                cpu as f64 / 1000.0 / done as f64
            },
            rss_kib: peak_rss_kib(pids),
            errors,
            non_2xx,
        },
        timed,
    )
}

/// `n` keep-alive connections to `port`, one `GET path` answered on each,
/// left open. Returns the connections and how many answers were not 2xx.
pub fn idle_connections(port: u16, path: &str, n: usize) -> (Vec<TcpStream>, usize) {
    let mut conns = Vec::with_capacity(n);
    let mut bad = 0;
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    for _ in 0..n {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        if !read_response(&mut s).is_some_and(|st| (200..300).contains(&st)) {
            bad += 1;
        }
        conns.push(s);
    }
    (conns, bad)
}

/// Reads one response with a `Content-Length` body; its status.
pub fn read_response(s: &mut TcpStream) -> Option<u16> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < end + 4 + len {
            let n = s.read(&mut chunk).ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        return Some(status);
    }
}

/// A `SCHED_IDLE` busy loop on each CPU: the CPUs never go idle, so a wake-up
/// does not pay for leaving a deep C-state, yet every real task preempts
/// the spinners. Killed on drop.
pub struct Spinners(Vec<Child>);

impl Spinners {
    pub fn start(cpus: &[&str]) -> Spinners {
        Spinners(
            cpus.iter()
                .filter_map(|c| {
                    Command::new("taskset")
                        .args([
                            "-c",
                            c,
                            "chrt",
                            "--idle",
                            "0",
                            "sh",
                            "-c",
                            "while :; do :; done",
                        ])
                        .stdin(Stdio::null())
                        .spawn()
                        .ok()
                })
                .collect(),
        )
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
