//! Small helpers shared by the scenarios: tools, ports, /proc readings and
//! the per-run sample.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Installs `package` with apt when `cmd` is not on the PATH.
pub fn need(cmd: &str, package: &str) {
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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// On-CPU nanoseconds of every thread of `pids`, exited ones included.
pub fn cpu_ns(pids: &[u32]) -> u64 {
    let mut total = 0;
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        let mut live_ticks = 0;
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
                total += s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            live_ticks += stat_ticks(&t.path().join("stat")).unwrap_or(0);
        }
        // Threads that exited (tokio's idle blocking threads do) have no
        // schedstat left; the process's own stat still counts their time,
        // in clock ticks.
        let all_ticks = stat_ticks(std::path::Path::new(&format!("/proc/{pid}/stat"))).unwrap_or(0);
        total += all_ticks.saturating_sub(live_ticks) * NS_PER_TICK;
    }
    total
}

/// USER_HZ: what Linux reports CPU times of /proc/*/stat in, on every
/// architecture it runs benchmarks on.
const NS_PER_TICK: u64 = 10_000_000;

/// utime + stime of a /proc stat file, in clock ticks.
fn stat_ticks(path: &std::path::Path) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may hold spaces: count from its `)`.
    let rest = &s[s.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Sum over `pids` of a `kB` field of /proc/<pid>/status (`VmHWM`, `VmRSS`).
fn status_kib(pids: &[u32], field: &str) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

pub fn peak_rss_kib(pids: &[u32]) -> u64 {
    status_kib(pids, "VmHWM:")
}

pub fn rss_kib(pids: &[u32]) -> u64 {
    status_kib(pids, "VmRSS:")
}

/// `parent` and its direct children (nginx: master and workers).
pub fn child_pids(parent: u32) -> Vec<u32> {
    let mut out = vec![parent];
    if let Ok(s) = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")) {
        out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    out
}

/// Pins the calling thread (not the process) to `cpus` (taskset syntax).
pub fn pin_this_thread(cpus: &str) {
    // /proc/thread-self -> "<pid>/task/<tid>"
    let Some(tid) = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
    else {
        return;
    };
    let _ = Command::new("taskset")
        .args(["-pc", cpus, &tid])
        .stdout(Stdio::null())
        .status();
}

/// Soft `RLIMIT_NOFILE` of this process raised to at least `n` (children
/// inherit it). Uses `prlimit(1)`: no libc dependency.
pub fn raise_nofile(n: u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if soft >= n {
        return;
    }
    let pid = std::process::id().to_string();
    let ok = Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={n}:{n}")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("warning: could not raise the open-file limit to {n} (now {soft})");
    }
}

/// One measured run of one target.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// On-CPU time of the proxy's processes over the run / completed
    /// requests; NaN when there is no proxy (direct).
    pub cpu_us_per_req: f64,
    /// VmHWM after the run (summed over nginx's processes); 0 for direct.
    pub rss_kib: u64,
    /// Connect/read/write/timeout errors and failed streams.
    pub errors: u64,
    /// Responses that were not 2xx.
    pub non_2xx: u64,
}

/// (median, min, max); NaN for an empty list.
pub fn median_min_max(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// The `p`-quantile (0..=1) of sorted values (nearest rank).
pub fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

/// Reads an env var, or the default.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
