//! The proxies under test, as child processes: tokenproxy (`run -c`), and
//! nginx and haproxy doing the same job (inject a fixed bearer token, forward
//! to the bench upstream over pooled keep-alive connections).

use crate::common::{child_pids, free_port, wait_port};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The dev test CA (trusted for the TLS upstream).
pub fn test_ca_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/dev/testdata/test-ca.pem")
}

/// A running proxy; SIGTERMed and reaped on drop.
pub struct Proxy {
    child: Child,
    pub port: u16,
    kind: Kind,
    pub log: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tokenproxy,
    Nginx,
    Haproxy,
}

impl Proxy {
    /// The processes whose CPU and memory count: tokenproxy's one process,
    /// nginx's master and workers, haproxy's one process (`-db`: no master,
    /// `nbthread` threads in the process).
    pub fn pids(&self) -> Vec<u32> {
        match self.kind {
            Kind::Nginx => child_pids(self.child.id()),
            Kind::Tokenproxy | Kind::Haproxy => vec![self.child.id()],
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Lines of the proxy's log (tokenproxy logs at warn: anything there
    /// is worth a look; nginx's error log and haproxy's stderr likewise).
    pub fn log_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        // SIGTERM: nginx's master then stops its workers (SIGKILL would
        // orphan them); haproxy stops at once.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

/// `cpus`: a taskset list, or `None` to leave it unpinned.
fn spawn(cpus: Option<&str>, program: &str, args: &[&str], log: &Path) -> Child {
    let out = std::fs::File::create(log).unwrap();
    let mut cmd = match cpus {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", c, program]);
            cmd
        }
        None => Command::new(program),
    };
    cmd.args(args)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

pub struct TpOpts<'a> {
    pub upstream: String,
    /// `None`: the default runtime (no `worker_threads` key).
    pub worker_threads: Option<usize>,
    pub ca_file: Option<PathBuf>,
    pub token_url: &'a str,
    pub cpus: Option<&'a str>,
}

pub fn start_tokenproxy(dir: &Path, o: TpOpts<'_>) -> Proxy {
    start_tokenproxy_with(dir, o, "")
}

/// As [`start_tokenproxy`], with `credential_extra` lines in the credential.
pub fn start_tokenproxy_with(dir: &Path, o: TpOpts<'_>, credential_extra: &str) -> Proxy {
    let port = free_port();
    let admin_port = free_port();
    let mut cfg = String::new();
    let _ = writeln!(cfg, "[server]\nlisten = \"127.0.0.1:{port}\"");
    if let Some(n) = o.worker_threads {
        let _ = writeln!(cfg, "worker_threads = {n}");
    }
    let _ = writeln!(cfg, "max_connections = 4096");
    let _ = writeln!(
        cfg,
        "[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n[log]\nlevel = \"warn\""
    );
    let _ = writeln!(
        cfg,
        "[store]\nkind = \"file\"\npath = \"tokens-{port}.json\"\n[credentials.svc]\ngrant = \"client_credentials\"\ntoken_url = \"{}\"\nclient_id = \"demo-client\"\nclient_secret = \"demo-secret\"\n{credential_extra}",
        o.token_url
    );
    let _ = writeln!(
        cfg,
        "[[routes]]\npath_prefix = \"/api/\"\nupstream = \"{}\"\ncredential = \"svc\"",
        o.upstream
    );
    if let Some(ca) = &o.ca_file {
        let _ = writeln!(cfg, "ca_file = \"{}\"", ca.display());
    }
    launch_tokenproxy(dir, port, &cfg, o.cpus)
}

/// Runs `tokenproxy run` on `cfg` (which listens on `port`) and waits for
/// the port.
pub fn launch_tokenproxy(dir: &Path, port: u16, cfg: &str, cpus: Option<&str>) -> Proxy {
    let path = dir.join(format!("tp-{port}.toml"));
    std::fs::write(&path, cfg).unwrap();
    let log = dir.join(format!("tp-{port}.log"));
    let exe = std::env::var("BENCH_TOKENPROXY")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_tokenproxy").to_owned());
    let child = spawn(cpus, &exe, &["run", "-c", path.to_str().unwrap()], &log);
    let proxy = Proxy {
        child,
        port,
        kind: Kind::Tokenproxy,
        log,
    };
    wait_port(port);
    proxy
}

pub struct NginxOpts<'a> {
    pub upstream: SocketAddr,
    pub workers: usize,
    /// Listen with `http2` (h2c prior knowledge on cleartext).
    pub http2: bool,
    /// Upstream over TLS, verified against this CA, name `localhost`.
    pub tls_ca: Option<PathBuf>,
    pub token: &'a str,
    pub cpus: Option<&'a str>,
    /// nginx's read buffer when streaming (`proxy_buffer_size`); its 4-8 KiB
    /// default would make it pay a read per few KiB of a large body.
    /// `proxy_buffers` and `proxy_busy_buffers_size` follow (unused without
    /// buffering, but nginx refuses a busy size above all buffers but one).
    pub buffer: &'a str,
}

pub fn start_nginx(dir: &Path, o: NginxOpts<'_>) -> Proxy {
    let port = free_port();
    let d = dir.join(format!("nginx-{port}"));
    std::fs::create_dir_all(&d).unwrap();
    let scheme = if o.tls_ca.is_some() { "https" } else { "http" };
    let tls = match &o.tls_ca {
        Some(ca) => format!(
            "      proxy_ssl_trusted_certificate {};\n      proxy_ssl_verify on;\n      proxy_ssl_server_name on;\n      proxy_ssl_name localhost;\n      proxy_ssl_session_reuse on;\n",
            ca.display()
        ),
        None => String::new(),
    };
    let conf = format!(
        r#"worker_processes {workers};
worker_rlimit_nofile 8192;
error_log {d}/error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {d};
  proxy_temp_path {d};
  upstream app {{ server {upstream}; keepalive 128; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{port}{h2};
    location /api/ {{
      proxy_pass {scheme}://app/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {token}";
      proxy_buffering off;
      proxy_buffer_size {buffer};
      proxy_buffers 4 {buffer};
      proxy_busy_buffers_size {buffer};
{tls}    }}
  }}
}}
"#,
        workers = o.workers,
        d = d.display(),
        upstream = o.upstream,
        h2 = if o.http2 { " http2" } else { "" },
        token = o.token,
        buffer = o.buffer,
    );
    let path = d.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let child = spawn(
        o.cpus,
        "nginx",
        &["-c", path.to_str().unwrap(), "-g", "daemon off;"],
        &d.join("stderr.log"),
    );
    let proxy = Proxy {
        child,
        port,
        kind: Kind::Nginx,
        log: d.join("error.log"),
    };
    wait_port(port);
    proxy
}

pub struct HaproxyOpts<'a> {
    pub upstream: SocketAddr,
    pub threads: usize,
    pub token: &'a str,
    pub cpus: Option<&'a str>,
}

/// haproxy in the foreground (`-db`: one process, `nbthread` threads), no
/// logging (no `log` line: its stderr gets only alerts and warnings;
/// `BENCH_HAPROXY_LOG=1` logs abnormal sessions there, for debugging), HTTP
/// keep-alive on both sides, idle upstream connections shared by every
/// client connection (`http-reuse always`), `/api/` stripped like nginx's
/// `proxy_pass …/`, no health checks, buffers at their defaults.
pub fn start_haproxy(dir: &Path, o: HaproxyOpts<'_>) -> Proxy {
    let port = free_port();
    let d = dir.join(format!("haproxy-{port}"));
    std::fs::create_dir_all(&d).unwrap();
    let (log_global, log_defaults) = if std::env::var("BENCH_HAPROXY_LOG").is_ok_and(|v| v == "1") {
        (
            "  log stderr format raw local0 info\n",
            "  log global\n  option httplog\n  option dontlog-normal\n  option dontlognull\n",
        )
    } else {
        ("", "")
    };
    let conf = format!(
        r#"global
  nbthread {threads}
  maxconn 8192
{log_global}
defaults
  mode http
{log_defaults}  option http-keep-alive
  no option httpclose
  http-reuse always
  timeout connect 10s
  timeout client 300s
  timeout server 300s
  timeout http-keep-alive 300s

frontend fe
  bind 127.0.0.1:{port}
  maxconn 8192
  default_backend app

backend app
  http-request replace-path ^/api/(.*) /\1
  http-request set-header Authorization "Bearer {token}"
  server s1 {upstream}
"#,
        threads = o.threads,
        upstream = o.upstream,
        token = o.token,
    );
    let path = d.join("haproxy.cfg");
    std::fs::write(&path, conf).unwrap();
    let log = d.join("stderr.log");
    let child = spawn(
        o.cpus,
        "haproxy",
        &["-db", "-f", path.to_str().unwrap()],
        &log,
    );
    let proxy = Proxy {
        child,
        port,
        kind: Kind::Haproxy,
        log,
    };
    wait_port(port);
    proxy
}
