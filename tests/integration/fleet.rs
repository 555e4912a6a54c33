//! Fleet mode (`store.kind = "postgres"`) against a real, throwaway
//! PostgreSQL cluster, with `tokenproxy run` replicas as real processes.
//! Judged by the dev IdP's reuse detection, as in `engine.rs`.

use crate::harness::*;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokenproxy::dev::{Fault, Hold};

const S: fn(u64) -> Duration = Duration::from_secs;

/// A PostgreSQL cluster in a temp dir on a free port, run as a non-root
/// user (initdb refuses root). Stopped on drop.
pub struct Pg {
    _dir: tempfile::TempDir,
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    sock: PathBuf,
    port: u16,
    /// Set when we are root: the user the server runs as.
    run_as: Option<&'static str>,
    /// Extra `-c name=value` server settings (TLS).
    settings: String,
}

/// The dev test CA and the server certificate it signed (SANs 127.0.0.1
/// and localhost).
const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/dev/testdata");

fn pg_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, b)| b)
}

impl Pg {
    /// None (with a note) when PostgreSQL is not installed and `CI` is
    /// unset; under CI a missing install is a failure.
    pub fn start() -> Option<Pg> {
        Self::start_with(false)
    }

    /// With `ssl=on`, serving the dev test certificate.
    pub fn start_tls() -> Option<Pg> {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Option<Pg> {
        let Some(bin) = pg_bin_dir() else {
            if std::env::var_os("CI").is_some() {
                panic!("PostgreSQL binaries missing under /usr/lib/postgresql/*/bin (tests/run.sh installs them)");
            }
            eprintln!("SKIP fleet test: PostgreSQL not installed (apt-get install postgresql)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let run_as = is_root.then_some("nobody");
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        std::fs::create_dir_all(&sock).unwrap();
        let mut settings = String::new();
        if tls {
            // The server refuses a key others can read; the chown below
            // makes it the server user's.
            use std::os::unix::fs::PermissionsExt;
            let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
            std::fs::copy(format!("{TESTDATA}/test-leaf.pem"), &cert).unwrap();
            std::fs::copy(format!("{TESTDATA}/test-leaf.key"), &key).unwrap();
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
            settings = format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert.display(),
                key.display()
            );
        }
        if let Some(user) = run_as {
            let ok = Command::new("chown")
                .args(["-R", &format!("{user}:"), &dir.path().to_string_lossy()])
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown the temp dir to {user}");
        }
        let pg = Pg {
            log: dir.path().join("pg.log"),
            _dir: dir,
            bin,
            data,
            sock,
            port: free_port(),
            run_as,
            settings,
        };
        let out = pg
            .cmd("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&pg.data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.start_server();
        Some(pg)
    }

    fn cmd(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        let mut c = match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        c.stdin(Stdio::null());
        c
    }

    pub fn start_server(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off{}",
            self.port,
            self.sock.display(),
            self.settings
        );
        let out = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-o", &opts, "-l"])
            .arg(&self.log)
            .args(["-w", "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start failed: {} {}",
            String::from_utf8_lossy(&out.stdout),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn stop_server(&self, mode: &str) {
        let _ = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", mode, "-w", "stop"])
            .output();
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// One query's rows, `|`-separated columns (psql -At).
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-U", "postgres", "-At", "-p"])
            .arg(self.port.to_string())
            .args(["-d", "postgres", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn generation(&self) -> Option<u64> {
        self.psql(&format!(
            "SELECT generation FROM tokenproxy_credentials WHERE name = '{CRED}' AND family IS NOT NULL"
        ))
        .parse()
        .ok()
    }

    pub async fn wait_generation(&self, at_least: u64, within: Duration) -> u64 {
        wait_for(
            &format!("stored generation >= {at_least}"),
            within,
            || async { self.generation().filter(|g| *g >= at_least) },
        )
        .await
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.stop_server("immediate");
    }
}

/// A replica's config: the stack's, with the postgres store.
fn replica_config(stack: &Stack, pg: &Pg, name: &str, extra: &str) -> (PathBuf, (u16, u16)) {
    replica_config_url(stack, &pg.url(), name, extra)
}

/// A replica's config with the postgres store at `url`.
fn replica_config_url(stack: &Stack, url: &str, name: &str, extra: &str) -> (PathBuf, (u16, u16)) {
    let ports = (free_port(), free_port());
    let path = stack.dir.path().join(format!("{name}.toml"));
    let file_store = format!("[store]\npath = \"{}\"", stack.store_path().display());
    let text = stack.toml(ports.0, ports.1, extra).replace(
        &file_store,
        &format!("[store]\nkind = \"postgres\"\nurl = \"{url}\""),
    );
    assert!(text.contains("postgres://"), "store section replaced");
    std::fs::write(&path, text).unwrap();
    (path, ports)
}

async fn start_replicas(stack: &Stack, pg: &Pg, n: usize, extra: &str) -> Vec<ChildProxy> {
    let mut out = Vec::new();
    for i in 0..n {
        let name = format!("r{i}");
        let (path, ports) = replica_config(stack, pg, &name, extra);
        out.push(ChildProxy::start(stack.dir.path(), &name, &path, ports).await);
    }
    out
}

/// Requests against every replica for `run_for`; returns (count, failures).
fn load(
    replicas: &[ChildProxy],
    per_replica: usize,
    run_for: Duration,
) -> Vec<tokio::task::JoinHandle<(usize, Vec<String>)>> {
    let c = client();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for r in replicas {
        for _ in 0..per_replica {
            let (c, url) = (c.clone(), r.url("/api/fleet"));
            tasks.push(tokio::spawn(async move {
                let (mut n, mut bad) = (0usize, Vec::new());
                while started.elapsed() < run_for && n < 5000 {
                    match try_get(&c, &url).await {
                        Ok(g) if g.status == 200 => {}
                        Ok(g) => bad.push(format!("{} {}", g.status, g.text())),
                        Err(e) => bad.push(e),
                    }
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                (n, bad)
            }));
        }
    }
    tasks
}

async fn join_load(
    tasks: Vec<tokio::task::JoinHandle<(usize, Vec<String>)>>,
) -> (usize, Vec<String>) {
    let (mut n, mut bad) = (0, Vec::new());
    for t in tasks {
        let (k, b) = t.await.unwrap();
        n += k;
        bad.extend(b);
    }
    (n, bad)
}

fn lost_races(replicas: &[&ChildProxy]) -> usize {
    replicas
        .iter()
        .flat_map(|p| p.log_events())
        .filter(|e| e["event"] == "token_refresh" && e["outcome"] == "lost_race")
        .count()
}

/// 3 replicas, one database, 2 s tokens, load on every replica for 10
/// lifetimes: the fleet refreshes like one process (not ×3), zero reuse,
/// zero failed requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_three_replicas_refresh_once_per_expiry() {
    let Some(pg) = Pg::start() else { return };
    let stack = Stack::start(StackOpts::default()).await;
    let replicas = start_replicas(&stack, &pg, 3, "").await;
    let c = client();
    for r in &replicas {
        let g = get_ok(&c, &r.url("/api/warmup")).await;
        assert_eq!(g.status, 200, "{}", g.text());
    }
    let lifetime = S(2);
    let run_for = lifetime * 10;
    let grants_at_start = stack.refresh_grants();
    let started = Instant::now();
    let (requests, bad) = join_load(load(&replicas, 8, run_for)).await;
    let elapsed = started.elapsed();
    let grants = stack.refresh_grants() - grants_at_start;
    // As in engine.rs: one refresh per `lifetime - refresh_before` (minus
    // up to 10 % jitter), plus grant latency on a busy box.
    let before = (S(30).max(lifetime / 10)).min(lifetime / 2);
    let interval_min = lifetime - before - before / 10;
    let interval_max = (lifetime - before).mul_f64(1.1);
    let expect_lo = (elapsed.as_secs_f64() / interval_max.as_secs_f64()).floor() as usize;
    let expect_hi = (elapsed.as_secs_f64() / interval_min.as_secs_f64()).ceil() as usize;
    let refs: Vec<&ChildProxy> = replicas.iter().collect();
    eprintln!(
        "fleet: replicas=3 requests={requests} failed={} refresh_grants={grants} (one process would make {expect_lo}..={expect_hi} over {elapsed:?}; lifetimes={:.1}) lost_race_adoptions={} reuses={}",
        bad.len(),
        elapsed.as_secs_f64() / lifetime.as_secs_f64(),
        lost_races(&refs),
        stack.idp.reuse_count()
    );
    assert!(
        bad.is_empty(),
        "{} failed, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(3)]
    );
    assert!(
        requests > 1000,
        "too little load to mean anything: {requests}"
    );
    assert!(
        grants + 1 >= expect_lo && grants <= expect_hi + 1,
        "refresh grants {grants} not in {expect_lo}..={expect_hi} ±1"
    );
    stack.assert_no_reuse();
    let outputs: Vec<String> = replicas.iter().map(|r| r.output()).collect();
    assert_no_secrets(&outputs, &stack.secrets());
}

/// PostgreSQL down across a refresh that falls due, under load: cached
/// tokens keep serving (no failed request), no replica refreshes without the
/// lease, /credentials and the logs say `store_unavailable`, readiness stays
/// up, and refreshes resume by themselves once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_survives_a_postgres_restart() {
    let Some(pg) = Pg::start() else { return };
    // 10 s tokens refresh 5 s early (usable until 9.5 s): an outage from just
    // after one refresh until 6.5 s spans the next one's due time.
    let stack = Stack::start(StackOpts {
        access_ttl: S(10),
        ..StackOpts::default()
    })
    .await;
    let replicas = start_replicas(&stack, &pg, 2, "max_backoff = \"1s\"").await;
    let c = client();
    for r in &replicas {
        assert_eq!(get_ok(&c, &r.url("/api/warmup")).await.status, 200);
    }
    let tasks = load(&replicas, 5, S(30));
    let first = pg.wait_generation(1, S(5)).await;
    let before = pg.wait_generation(first + 1, S(10)).await;
    let grants_before = stack.refresh_grants();
    pg.stop_server("fast");
    let down_at = Instant::now();
    let st = wait_for("store_unavailable on /credentials", S(5), || async {
        credential_status(&c, replicas[0].admin)
            .await
            .filter(|s| s["last_error"]["reason"] == "store_unavailable")
    })
    .await;
    assert_eq!(st["state"], "fresh", "cached token still serving: {st}");
    let ready = try_get(&c, &format!("http://{}/readyz", replicas[0].admin))
        .await
        .unwrap();
    assert_eq!(ready.status, 200, "readiness stays up: {}", ready.text());
    let m = try_get(&c, &format!("http://{}/metrics", replicas[0].admin))
        .await
        .unwrap()
        .text();
    assert!(
        m.contains(&format!("tokenproxy_store_up{{credential=\"{CRED}\"}} 0")),
        "the metrics say so: {}",
        m.lines()
            .filter(|l| l.contains("store_up"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    tokio::time::sleep(S(6).saturating_sub(down_at.elapsed())).await;
    assert_eq!(
        stack.refresh_grants(),
        grants_before,
        "no refresh without the lease while the database is down"
    );
    pg.start_server();
    eprintln!("postgres was down for {:?}", down_at.elapsed());
    pg.wait_generation(before + 1, S(10)).await;
    let (requests, bad) = join_load(tasks).await;
    let logs: String = replicas.iter().map(|r| r.output()).collect();
    eprintln!(
        "pg restart: requests={requests} failed={} refresh_grants={} reuses={}",
        bad.len(),
        stack.refresh_grants(),
        stack.idp.reuse_count()
    );
    assert!(
        bad.is_empty(),
        "{} failed, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(3)]
    );
    assert!(logs.contains("store_unavailable"), "the logs say so");
    stack.assert_no_reuse();
}

/// Two replicas started at the same moment on an empty database: the
/// migration runs once, both come up and serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_two_replicas_start_at_once_on_empty_database() {
    let Some(pg) = Pg::start() else { return };
    let stack = Stack::start(StackOpts::default()).await;
    let (pa, ports_a) = replica_config(&stack, &pg, "a", "");
    let (pb, ports_b) = replica_config(&stack, &pg, "b", "");
    let dir = stack.dir.path();
    let (a, b) = tokio::join!(
        ChildProxy::start(dir, "a", &pa, ports_a),
        ChildProxy::start(dir, "b", &pb, ports_b)
    );
    let c = client();
    for r in [&a, &b] {
        let g = get_ok(&c, &r.url("/api/x")).await;
        assert_eq!(g.status, 200, "{} {}", g.text(), r.output());
    }
    // Each migration ran once, though both replicas started together.
    assert_eq!(
        pg.psql("SELECT count(*) = count(DISTINCT version) FROM tokenproxy_schema"),
        "t"
    );
    assert_eq!(stack.refresh_grants(), 1, "one grant for the fleet");
    stack.assert_no_reuse();
}

fn holder_pid(pg: &Pg) -> Option<u32> {
    let h = pg.psql(&format!(
        "SELECT lease_holder FROM tokenproxy_credentials WHERE name = '{CRED}'"
    ));
    let mut parts = h.rsplit(':');
    parts.next()?;
    parts.next()?.parse().ok()
}

/// kill -9 of the replica holding the lease while the IdP holds its rotated
/// answer: the other replica takes over only after the lease runs out, and
/// only through the lost-rotation rules (here: dead, `lost_rotation`); the
/// possibly spent token is never presented again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_kill9_of_lease_holder_goes_through_lost_rotation() {
    let Some(pg) = Pg::start() else { return };
    let stack = Stack::start(StackOpts::default()).await;
    // The lease fences connect (1 s) + the grant timeout (30 s) + 5 s.
    let mut replicas = start_replicas(&stack, &pg, 2, "connect_timeout = \"1s\"\n").await;
    pg.wait_generation(1, S(10)).await;
    let hold = Hold::new();
    stack
        .idp
        .push_fault(Fault::HoldAfterProcessing(hold.clone()));
    tokio::time::timeout(S(10), hold.reached())
        .await
        .expect("a proactive refresh reaches the IdP");
    let spent = stack
        .presented()
        .last()
        .cloned()
        .expect("a presented token");
    let intent = pg.psql(&format!(
        "SELECT lease_intent FROM tokenproxy_credentials WHERE name = '{CRED}'"
    ));
    assert!(intent.contains("generation"), "intent durable: {intent}");
    let pid = holder_pid(&pg).expect("a lease holder");
    let idx = replicas
        .iter()
        .position(|r| r.child.id() == pid)
        .expect("the holder is one of ours");
    replicas[idx].kill9();
    let killed_at = Instant::now();
    hold.release();
    let survivor = &replicas[1 - idx];
    let c = client();
    let st = wait_state(&c, survivor.admin, "dead", S(60)).await;
    eprintln!(
        "kill -9: survivor dead after {:?}: {}",
        killed_at.elapsed(),
        st["last_error"]
    );
    assert!(
        killed_at.elapsed() > S(25),
        "took over before the fenced lease ran out"
    );
    assert_eq!(st["last_error"]["reason"], "lost_rotation", "{st}");
    let presented = stack.presented().iter().filter(|t| **t == spent).count();
    assert_eq!(presented, 1, "the possibly spent token came back");
    stack.assert_no_reuse();
}

/// With `store.encryption_key`, the token columns hold no token in clear
/// (read back with psql), and the replica still serves from them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_encrypted_columns_hold_no_token_in_clear() {
    let Some(pg) = Pg::start() else { return };
    let stack = Stack::start(StackOpts::default()).await;
    let (path, ports) = replica_config(&stack, &pg, "enc", "");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "kind = \"postgres\"",
        "kind = \"postgres\"\nencryption_key = \"correct horse battery staple\"",
    );
    std::fs::write(&path, text).unwrap();
    let r = ChildProxy::start(stack.dir.path(), "enc", &path, ports).await;
    let c = client();
    assert_eq!(get_ok(&c, &r.url("/api/x")).await.status, 200);
    pg.wait_generation(1, S(10)).await;
    let raw = pg.psql(&format!(
        "SELECT refresh_token || ' ' || access_token FROM tokenproxy_credentials WHERE name = '{CRED}'"
    ));
    assert!(raw.starts_with("tpv3:"), "sealed: {raw}");
    let access = bearer(&get_ok(&c, &r.url("/api/x")).await);
    assert!(access.len() > 8, "a token was injected");
    // Every refresh token the IdP saw, the seed, and the access token.
    let mut tokens = stack.presented();
    tokens.push(stack.seed.clone());
    tokens.push(access);
    for t in &tokens {
        assert!(
            !raw.contains(t.as_str()),
            "a token in clear in the database"
        );
    }
}

/// `tokenproxy store migrate`: a file store's family moves to postgres as is
/// (no grant for the move, no seed re-adopted), the file record is retired,
/// and a postgres replica carries on refreshing with zero reuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_migrate_moves_a_family_from_file_to_postgres() {
    let Some(pg) = Pg::start() else { return };
    let stack = Stack::start(StackOpts::default()).await;
    let (file_cfg, ports) = child_config(&stack, "file", "");
    let mut old = ChildProxy::start(stack.dir.path(), "file", &file_cfg, ports).await;
    stack.wait_generation(1, S(10)).await;
    old.kill9();
    let rec = stack.record().expect("a file record");
    let grants = stack.refresh_grants();
    let (pg_cfg, pg_ports) = replica_config(&stack, &pg, "pg", "");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
        .args(["store", "migrate", "--from"])
        .arg(&file_cfg)
        .arg("-c")
        .arg(&pg_cfg)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("moved family"), "{text}");
    assert_eq!(stack.refresh_grants(), grants, "moving spends nothing");
    let retired = stack.record().unwrap();
    assert_eq!(retired["dead"]["reason"], "migrated", "{retired}");
    let family = pg.psql(&format!(
        "SELECT family FROM tokenproxy_credentials WHERE name = '{CRED}'"
    ));
    assert_eq!(family, rec["family"].as_str().unwrap());
    let r = ChildProxy::start(stack.dir.path(), "pg", &pg_cfg, pg_ports).await;
    let c = client();
    assert_eq!(get_ok(&c, &r.url("/api/x")).await.status, 200);
    let g = rec["generation"].as_u64().unwrap();
    pg.wait_generation(g + 2, S(10)).await;
    let after = pg.psql(&format!(
        "SELECT family FROM tokenproxy_credentials WHERE name = '{CRED}'"
    ));
    assert_eq!(
        after, family,
        "the same family carried on; the seed was not re-adopted"
    );
    stack.assert_no_reuse();
}

/// The store's own rules, through the library: writes are fenced on the
/// identity read, and a second lease waits for the first to be released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_store_fences_writes_and_serialises_leases() {
    use tokenproxy::token::store::{Record, Store, StoreError};
    let Some(pg) = Pg::start() else { return };
    let cfg = tokenproxy::config::StoreConfig {
        kind: tokenproxy::config::StoreKind::Postgres,
        path: PathBuf::from("unused"),
        url: Some(tokenproxy::secret::Secret::new(pg.url())),
        encryption_key: None,
        previous_encryption_keys: Vec::new(),
    };
    let store = Store::open_config(&cfg).await.expect("store opens");
    let rec = |family: &str, generation: u64| Record {
        token_url: "http://127.0.0.1/token".into(),
        client_id: "c".into(),
        family: family.into(),
        generation,
        refresh_token: Some(tokenproxy::secret::Secret::new("rt")),
        access_token: None,
        access_expires_at_ms: None,
        access_issued_at_ms: None,
        refresh_expires_at_ms: None,
        token_fields: [("instance_url".into(), "https://eu1.example.com".into())].into(),
        seeds_seen: vec!["fp".into()],
        intent: None,
        dead: None,
        updated_at_ms: 0,
        dpop_key: None,
    };
    store.write("x", &rec("f", 0), None).await.unwrap();
    assert!(matches!(
        store.write("x", &rec("g", 0), None).await,
        Err(StoreError::Fenced { .. })
    ));
    store
        .write("x", &rec("f", 1), Some(("f", 0)))
        .await
        .unwrap();
    assert!(
        matches!(
            store.write("x", &rec("f", 1), Some(("f", 0))).await,
            Err(StoreError::Fenced { .. })
        ),
        "a stale writer (generation 0) cannot overwrite generation 1"
    );
    let back = store.read("x").await.unwrap().unwrap();
    assert_eq!((back.family.as_str(), back.generation), ("f", 1));
    assert_eq!(back.seeds_seen, vec!["fp".to_owned()]);
    // What routes take from the token response survives in the row.
    assert_eq!(back.token_fields, rec("f", 1).token_fields);

    let held = store.lock_credential("x").await.unwrap();
    let s2 = store.clone();
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let l = s2.lock_credential("x").await.unwrap();
        let _ = tx.send(());
        let _ = l.release().await;
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(rx.try_recv().is_err(), "the second lease must wait");
    held.release().await.unwrap();
    tokio::time::timeout(S(5), rx)
        .await
        .expect("the waiter gets the lease at once after the release")
        .unwrap();
}

const KEY_A: &str = "store-key-A-5d1f0c9e7b";
const KEY_B: &str = "store-key-B-a83e62f4c0";

/// `SELECT` of the credential's two token columns, space-separated.
fn token_columns(pg: &Pg) -> String {
    pg.psql(&format!(
        "SELECT refresh_token || ' ' || access_token FROM tokenproxy_credentials WHERE name = '{CRED}'"
    ))
}

/// A replica config whose store keys are `current` and `previous`.
fn keyed_replica(
    stack: &Stack,
    pg: &Pg,
    name: &str,
    current: &str,
    previous: &[&str],
) -> (PathBuf, (u16, u16)) {
    let (path, ports) = replica_config(stack, pg, name, "");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, with_store_keys(&text, current, previous)).unwrap();
    (path, ports)
}

/// Key rotation on postgres: rows sealed under A serve a replica whose key
/// is B with A as a previous key, without a grant; `store rekey` reseals
/// every column under B (psql sees only B's key id, no token in clear);
/// then B alone serves, and A alone refuses to start, naming B's key id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_key_rotation_then_rekey() {
    let Some(pg) = Pg::start() else { return };
    // Tokens outlive the test: any grant after the first is a failure.
    let stack = Stack::start(StackOpts {
        access_ttl: S(600),
        ..StackOpts::default()
    })
    .await;
    let dir = stack.dir.path();
    let c = client();
    let (a_cfg, a_ports) = keyed_replica(&stack, &pg, "key-a", KEY_A, &[]);
    let mut a = ChildProxy::start(dir, "key-a", &a_cfg, a_ports).await;
    let access = bearer(&get_ok(&c, &a.url("/api/x")).await);
    pg.wait_generation(1, S(10)).await;
    let sealed_a = token_columns(&pg);
    let (kid_a, kid_b) = (key_id(KEY_A, &sealed_a), key_id(KEY_B, &sealed_a));
    assert!(
        sealed_a
            .split(' ')
            .all(|v| v.starts_with(&format!("tpv3:{kid_a}:"))),
        "{sealed_a}"
    );
    a.kill9();
    let grants = stack.idp.grants().len();

    let (ab_cfg, ab_ports) = keyed_replica(&stack, &pg, "key-b-a", KEY_B, &[KEY_A]);
    let ab = ChildProxy::start(dir, "key-b-a", &ab_cfg, ab_ports).await;
    let g = get_ok(&c, &ab.url("/api/x")).await;
    assert_eq!(g.status, 200, "{}", g.text());
    assert_eq!(bearer(&g), access, "the stored token, opened with key A");
    assert_eq!(stack.idp.grants().len(), grants, "no grant");

    let rekey = rekey_ok(&ab_cfg, CRED, &kid_b);
    let sealed_b = token_columns(&pg);
    assert!(
        sealed_b
            .split(' ')
            .all(|v| v.starts_with(&format!("tpv3:{kid_b}:"))),
        "{sealed_b}"
    );
    assert!(!sealed_b.contains(&kid_a), "{sealed_b}");
    let mut tokens = stack.presented();
    tokens.extend([stack.seed.clone(), access.clone()]);
    for t in &tokens {
        assert!(!sealed_b.contains(t.as_str()), "a token in clear");
    }
    let again = run_cli(&[
        "store".as_ref(),
        "rekey".as_ref(),
        "-c".as_ref(),
        ab_cfg.as_os_str(),
    ]);
    assert!(again.stdout.contains("already sealed"), "{}", again.text());
    drop(ab);

    let (b_cfg, b_ports) = keyed_replica(&stack, &pg, "key-b", KEY_B, &[]);
    let b = ChildProxy::start(dir, "key-b", &b_cfg, b_ports).await;
    let g = get_ok(&c, &b.url("/api/x")).await;
    assert_eq!((g.status, bearer(&g)), (200, access.clone()));
    drop(b);

    let (a_only, _) = keyed_replica(&stack, &pg, "key-a-only", KEY_A, &[]);
    let failed = run_until_exit(dir, "key-a-only", &a_only, S(20)).await;
    assert_eq!(failed.code, Some(1), "{}", failed.text());
    assert!(
        failed
            .text()
            .contains(&format!("sealed with key id {kid_b}")),
        "names the key id it needs: {}",
        failed.text()
    );
    assert_eq!(token_columns(&pg), sealed_b, "never overwritten");
    assert_eq!(stack.idp.grants().len(), grants, "no grant in all of it");
    stack.assert_no_reuse();
    let mut secrets = stack.secrets();
    secrets.extend([KEY_A.to_owned(), KEY_B.to_owned(), access]);
    let outputs: Vec<String> = ["key-a", "key-b-a", "key-b", "key-a-only"]
        .iter()
        .flat_map(|l| ["stdout", "stderr"].map(|k| dir.join(format!("{l}.{k}"))))
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .chain([rekey.text(), again.text()])
        .collect();
    assert_no_secrets(&outputs, &secrets);
}

/// `store export` then `store import`: a file store's family goes to
/// postgres through a file, spending nothing (the replica serves the
/// exported access token; zero grants, zero reuse). The file store marks it
/// moved, so a proxy on it says so and does not refresh; once postgres
/// refreshed, importing the same file again is refused, even with --force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_export_then_import_moves_a_family_without_a_grant() {
    let Some(pg) = Pg::start() else { return };
    let stack = Stack::start(StackOpts {
        access_ttl: S(600),
        ..StackOpts::default()
    })
    .await;
    let dir = stack.dir.path();
    let c = client();
    let (file_cfg, ports) = child_config(&stack, "file", "");
    let mut old = ChildProxy::start(dir, "file", &file_cfg, ports).await;
    let access = bearer(&get_ok(&c, &old.url("/api/x")).await);
    let generation = stack.wait_generation(1, S(10)).await;
    old.kill9();
    let grants = stack.idp.grants().len();

    let file = dir.join("user.export.json");
    let export_args = |out: &std::path::Path| {
        vec![
            "store".into(),
            "export".into(),
            "-c".into(),
            file_cfg.clone().into_os_string(),
            "--credential".into(),
            CRED.into(),
            "--out".into(),
            out.as_os_str().to_owned(),
        ]
    };
    let export = run_cli(&export_args(&file));
    assert_eq!(export.code, Some(0), "{}", export.text());
    assert!(
        export.stderr.contains("WARNING") && export.stderr.contains("in clear"),
        "a store without a key exports in clear, loudly: {}",
        export.text()
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = run_cli(&export_args(&file));
    assert_eq!(again.code, Some(64), "never overwrites: {}", again.text());
    assert!(again.stderr.contains("already exists"), "{}", again.text());
    let moved = stack.record().expect("the source record stays");
    assert_eq!(moved["dead"]["reason"], "migrated", "{moved}");

    let (pg_cfg, pg_ports) = replica_config(&stack, &pg, "pg", "");
    let import_args = |force: bool| {
        let mut a: Vec<std::ffi::OsString> = vec![
            "store".into(),
            "import".into(),
            "-c".into(),
            pg_cfg.clone().into_os_string(),
            "--in".into(),
            file.clone().into_os_string(),
        ];
        if force {
            a.push("--force".into());
        }
        a
    };
    let import = run_cli(&import_args(false));
    assert_eq!(import.code, Some(0), "{}", import.text());
    assert!(
        import.stdout.contains(&format!("{CRED}: imported family")),
        "{}",
        import.text()
    );
    let replica = ChildProxy::start(dir, "pg", &pg_cfg, pg_ports).await;
    let g = get_ok(&c, &replica.url("/api/x")).await;
    assert_eq!((g.status, bearer(&g)), (200, access.clone()));
    assert_eq!(stack.idp.grants().len(), grants, "moving spent nothing");

    // A proxy still pointed at the source store reports the move.
    let (file2_cfg, ports2) = child_config(&stack, "file-after", "");
    let stale = ChildProxy::start(dir, "file-after", &file2_cfg, ports2).await;
    let st = wait_state(&c, stale.admin, "dead", S(10)).await;
    assert_eq!(st["last_error"]["reason"], "migrated", "{st}");
    assert!(
        st["last_error"]["hint"]
            .as_str()
            .is_some_and(|h| h.contains("moved")),
        "{st}"
    );
    assert_eq!(stack.idp.grants().len(), grants, "and does not refresh");
    drop(stale);

    // Postgres moves on; the export now holds a spent refresh token. The
    // import marked the file consumed: it is refused, here and into any
    // other store (a second live copy), --force or not.
    let r = post_admin(&c, replica.admin, &format!("/credentials/{CRED}/refresh")).await;
    assert!(r.status < 300, "{} {}", r.status, r.text());
    let newer = pg.wait_generation(generation + 1, S(10)).await;
    for force in [false, true] {
        let again = run_cli(&import_args(force));
        assert_eq!(again.code, Some(1), "{}", again.text());
        assert!(
            again.stderr.contains("already imported"),
            "{}",
            again.text()
        );
        assert_eq!(pg.generation(), Some(newer), "untouched");
    }
    let (other_cfg, _) = child_config(&stack, "other-store", "");
    let other_store = dir.join("other-tokens.json");
    let text = std::fs::read_to_string(&other_cfg).unwrap().replace(
        &stack.store_path().display().to_string(),
        &other_store.display().to_string(),
    );
    std::fs::write(&other_cfg, text).unwrap();
    let second_copy = run_cli(&[
        "store".as_ref(),
        "import".as_ref(),
        "-c".as_ref(),
        other_cfg.as_os_str(),
        "--in".as_ref(),
        file.as_os_str(),
    ]);
    assert_eq!(second_copy.code, Some(1), "{}", second_copy.text());
    assert!(
        !other_store.exists()
            || !std::fs::read_to_string(&other_store)
                .unwrap()
                .contains(CRED)
    );
    // The stale-generation refusal stays (a copy of the export without the mark).
    let unmarked = dir.join("user.export.copy.json");
    let mut doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    doc.as_object_mut().unwrap().remove("imported_at_ms");
    std::fs::write(&unmarked, serde_json::to_vec(&doc).unwrap()).unwrap();
    let stale = run_cli(&[
        "store".as_ref(),
        "import".as_ref(),
        "-c".as_ref(),
        pg_cfg.as_os_str(),
        "--in".as_ref(),
        unmarked.as_os_str(),
        "--force".as_ref(),
    ]);
    assert_eq!(stale.code, Some(1), "{}", stale.text());
    assert!(
        stale.stderr.contains("newer than generation"),
        "{}",
        stale.text()
    );
    assert_eq!(pg.generation(), Some(newer), "untouched");
    stack.assert_no_reuse();
    let mut outputs = vec![export.text(), again.text(), import.text()];
    outputs.extend([old.output(), replica.output()]);
    let mut secrets = stack.secrets();
    secrets.push(access);
    assert_no_secrets(&outputs, &secrets);
}

/// TLS to PostgreSQL verified against a private CA (`sslmode=verify-full`
/// and `sslrootcert`, host matching the certificate's SAN): the replica
/// serves and every session it holds is TLS (pg_stat_ssl). With a CA that
/// did not sign the server's certificate it does not start, says why, and
/// spends no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_tls_verified_with_sslrootcert() {
    let Some(pg) = Pg::start_tls() else { return };
    let stack = Stack::start(StackOpts::default()).await;
    let dir = stack.dir.path();
    let url = |ca: &str| {
        format!(
            "{}?sslmode=verify-full&sslrootcert={TESTDATA}/{ca}",
            pg.url()
        )
    };
    let (path, ports) = replica_config_url(&stack, &url("test-ca.pem"), "tls", "");
    let r = ChildProxy::start(dir, "tls", &path, ports).await;
    let c = client();
    let g = get_ok(&c, &r.url("/api/x")).await;
    assert_eq!(g.status, 200, "{} {}", g.text(), r.output());
    let sessions = pg.psql(
        "SELECT ssl FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE application_name = 'tokenproxy'",
    );
    assert!(
        !sessions.is_empty() && sessions.lines().all(|l| l == "t"),
        "every tokenproxy session is TLS: {sessions:?}"
    );
    drop(r);

    let grants = stack.refresh_grants();
    let (bad, _) = replica_config_url(&stack, &url("other-ca.pem"), "wrong-ca", "");
    let failed = run_until_exit(dir, "wrong-ca", &bad, S(20)).await;
    assert_eq!(failed.code, Some(1), "{}", failed.text());
    let log = failed.text();
    assert!(
        log.contains("TLS handshake") && log.contains("invalid peer certificate"),
        "a clear TLS error: {log}"
    );
    assert_eq!(
        stack.refresh_grants(),
        grants,
        "no refresh without the lease"
    );
    stack.assert_no_reuse();
}

/// POST a refresh to a replica's admin API without waiting for its outcome
/// (it may queue behind another replica's lease).
async fn nudge_refresh(admin: std::net::SocketAddr) {
    let req = http::Request::post(format!("http://{admin}/credentials/{CRED}/refresh"))
        .header(tokenproxy::admin::ADMIN_HEADER, "1")
        .body(http_body_util::Full::default())
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(500), client().request(req)).await;
}

/// The lease is a fence. Replica A's grant is delayed 15 s at the IdP while
/// A is cut from PostgreSQL (its connections stall, as in a partition).
/// A's lease was extended to outlive the grant when it wrote the intent, so
/// replica B cannot take over and ask introspection while A's request is
/// still on its way (introspection would say "active", B would rotate, and
/// A's late request would then be a reuse). Judged by the IdP: no reuse;
/// and once the partition heals the fleet goes on with one family.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_a_partitioned_holder_with_a_delayed_grant_is_never_overtaken() {
    crate::harness::repeat(
        "fleet_a_partitioned_holder_with_a_delayed_grant_is_never_overtaken",
        || async {
            use crate::fault_proxy::{FaultProxy, Mode};
            let Some(pg) = Pg::start() else { return };
            let stack = Stack::start(StackOpts {
                access_ttl: S(300),
                ..StackOpts::default()
            })
            .await;
            let cut = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], pg.port))).await;
            let extra = format!(
                "introspection_url = \"{}\"\nconnect_timeout = \"1s\"\nmax_backoff = \"2s\"\n",
                stack.idp.introspection_url()
            );
            let a_url = pg
                .url()
                .replace(&format!(":{}/", pg.port), &format!(":{}/", cut.addr.port()));
            let (a_path, a_ports) = replica_config_url(&stack, &a_url, "a", &extra);
            let a = ChildProxy::start(stack.dir.path(), "a", &a_path, a_ports).await;
            pg.wait_generation(1, S(10)).await;
            let (b_path, b_ports) = replica_config(&stack, &pg, "b", &extra);
            let b = ChildProxy::start(stack.dir.path(), "b", &b_path, b_ports).await;
            wait_for("B adopted generation 1", S(10), || async {
                credential_status(&client(), b.admin)
                    .await
                    .filter(|s| s["generation"] == 1 && s["state"] == "fresh")
            })
            .await;

            stack.idp.push_fault(Fault::Delay(S(15)));
            nudge_refresh(a.admin).await;
            wait_for("A's grant is at the IdP", S(10), || async {
                (stack.idp.pending_faults() == 0).then_some(())
            })
            .await;
            cut.set(Mode::Stall);
            let cut_at = Instant::now();
            // B is asked to refresh again and again while A is cut off.
            while cut_at.elapsed() < S(22) {
                nudge_refresh(b.admin).await;
                tokio::time::sleep(S(2)).await;
                stack.assert_no_reuse();
            }
            cut.set(Mode::Pass);
            pg.wait_generation(2, S(90)).await;
            for r in [&a, &b] {
                let g = wait_for("a replica serves", S(90), || async {
                    let g = get_ok(&client(), &r.url("/api/x")).await;
                    (g.status == 200).then_some(g)
                })
                .await;
                assert_eq!(g.status, 200, "{}", g.text());
            }
            stack.assert_no_reuse();
            assert_eq!(
                stack.refresh_grants(),
                2,
                "one grant per generation: {}",
                pg.psql("SELECT generation, dead FROM tokenproxy_credentials")
            );
        },
    )
    .await;
}

/// Two replicas with introspection, the second fresh on generation 1.
async fn two_replicas_on_generation_1(
    stack: &Stack,
    pg: &Pg,
    extra: &str,
) -> (ChildProxy, ChildProxy) {
    let (a_path, a_ports) = replica_config(stack, pg, "a", extra);
    let a = ChildProxy::start(stack.dir.path(), "a", &a_path, a_ports).await;
    pg.wait_generation(1, S(10)).await;
    let (b_path, b_ports) = replica_config(stack, pg, "b", extra);
    let b = ChildProxy::start(stack.dir.path(), "b", &b_path, b_ports).await;
    wait_for("B adopted generation 1", S(10), || async {
        credential_status(&client(), b.admin)
            .await
            .filter(|s| s["generation"] == 1 && s["state"] == "fresh")
    })
    .await;
    (a, b)
}

/// Two replicas on generation 1; replica A's next grant is held `delay` at
/// the IdP and is on its way when this returns. None without PostgreSQL.
async fn a_grant_delayed_at_the_idp(
    delay: Duration,
) -> Option<(Pg, Stack, ChildProxy, ChildProxy)> {
    let pg = Pg::start()?;
    let stack = Stack::start(StackOpts {
        access_ttl: S(300),
        ..StackOpts::default()
    })
    .await;
    let extra = format!(
        "introspection_url = \"{}\"\nconnect_timeout = \"1s\"\nmax_backoff = \"2s\"\n",
        stack.idp.introspection_url()
    );
    let (a, b) = two_replicas_on_generation_1(&stack, &pg, &extra).await;
    stack.idp.push_fault(Fault::Delay(delay));
    nudge_refresh(a.admin).await;
    wait_for("A's grant is at the IdP", S(10), || async {
        (stack.idp.pending_faults() == 0).then_some(())
    })
    .await;
    Some((pg, stack, a, b))
}

/// The lease holder is paused (SIGSTOP) past its old 10 s lease while its
/// grant is on its way to the IdP (delayed there 12 s). The fence keeps the
/// other replica out until the grant cannot be in flight any more; resumed,
/// the holder saves the rotation and the fleet goes on. No reuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_a_paused_holder_is_not_overtaken_mid_grant() {
    crate::harness::repeat(
        "fleet_a_paused_holder_is_not_overtaken_mid_grant",
        || async {
            let Some((pg, stack, a, b)) = a_grant_delayed_at_the_idp(S(12)).await else {
                return;
            };
            let pid = a.child.id().to_string();
            let signal = |sig: &str| {
                assert!(Command::new("kill")
                    .args([sig, &pid])
                    .status()
                    .unwrap()
                    .success());
            };
            signal("-STOP");
            let paused_at = Instant::now();
            while paused_at.elapsed() < S(20) {
                nudge_refresh(b.admin).await;
                tokio::time::sleep(S(2)).await;
                stack.assert_no_reuse();
            }
            signal("-CONT");
            pg.wait_generation(2, S(60)).await;
            for r in [&a, &b] {
                wait_for("a replica serves", S(60), || async {
                    let g = get_ok(&client(), &r.url("/api/x")).await;
                    (g.status == 200).then_some(())
                })
                .await;
            }
            stack.assert_no_reuse();
        },
    )
    .await;
}

/// PostgreSQL restarts while the holder's grant is at the IdP: the rotated
/// token cannot be saved at first, is served from memory, saved once the
/// database is back, and nobody presents anything twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_a_postgres_restart_mid_grant_loses_nothing() {
    crate::harness::repeat(
        "fleet_a_postgres_restart_mid_grant_loses_nothing",
        || async {
            let Some((pg, stack, a, b)) = a_grant_delayed_at_the_idp(S(3)).await else {
                return;
            };
            pg.stop_server("fast");
            tokio::time::sleep(S(6)).await;
            pg.start_server();
            pg.wait_generation(2, S(60)).await;
            for r in [&a, &b] {
                let st = wait_for("a replica serves generation 2", S(60), || async {
                    let st = credential_status(&client(), r.admin).await?;
                    (st["generation"] == 2 && st["state"] == "fresh").then_some(st)
                })
                .await;
                assert!(st["last_error"]["reason"] != "lost_rotation", "{st}");
            }
            stack.assert_no_reuse();
            assert_eq!(stack.refresh_grants(), 2, "one grant per generation");
        },
    )
    .await;
}

/// DPoP in fleet mode: the generated key is kept (sealed) in the row, so
/// both replicas, and a replica started after both were killed, prove
/// with one key (docs/dpop.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_replicas_share_one_sealed_dpop_key() {
    let Some(pg) = Pg::start() else { return };
    let stack = Stack::start(StackOpts::default()).await;
    stack.echo.set_dpop(stack.idp.dpop_binding());
    let sealed = |name: &str| {
        let (path, ports) = replica_config(&stack, &pg, name, "dpop = true");
        let text = std::fs::read_to_string(&path).unwrap().replace(
            "kind = \"postgres\"",
            "kind = \"postgres\"\nencryption_key = \"correct horse battery staple\"",
        );
        std::fs::write(&path, text).unwrap();
        (path, ports)
    };
    let (pa, ports_a) = sealed("a");
    let (pb, ports_b) = sealed("b");
    let dir = stack.dir.path();
    let (mut a, mut b) = tokio::join!(
        ChildProxy::start(dir, "a", &pa, ports_a),
        ChildProxy::start(dir, "b", &pb, ports_b)
    );
    let c = client();
    for r in [&a, &b] {
        let g = get_ok(&c, &r.url("/api/x")).await;
        assert_eq!(g.status, 200, "{} {}", g.text(), r.output());
    }
    pg.wait_generation(2, S(15)).await;
    let key = pg.psql(&format!(
        "SELECT dpop_key FROM tokenproxy_credentials WHERE name = '{CRED}'"
    ));
    assert!(key.starts_with("tpv3:"), "the key is sealed: {key}");
    let jkts = || -> std::collections::BTreeSet<String> {
        stack
            .idp
            .grants()
            .into_iter()
            .filter(|g| g.outcome == "ok")
            .filter_map(|g| g.dpop_jkt)
            .collect()
    };
    assert_eq!(jkts().len(), 1, "one key for the fleet: {:?}", jkts());
    a.kill9();
    b.kill9();
    let generation = pg.generation().unwrap_or(0);
    let (pc, ports_c) = sealed("c");
    let _c = ChildProxy::start(dir, "c", &pc, ports_c).await;
    pg.wait_generation(generation + 1, S(15)).await;
    assert_eq!(
        jkts().len(),
        1,
        "the same key after a restart: {:?}",
        jkts()
    );
    stack.assert_no_reuse();
}
