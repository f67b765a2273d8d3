//! Replication cost and speed, all in one run on this machine:
//!
//! 1. **Write throughput** of the real server (`ichibase::server::start`, in this process) for
//!    `BENCH_SECS` seconds (default 5) with 4 concurrent HTTP clients inserting ~300-byte rows,
//!    one row per request (each an fsync-free WAL commit, `synchronous=normal`):
//!    a. replication off; b. replication on to an S3 server (moto, on 127.0.0.1);
//!    c. replication off in ichibase and the stock `litestream replicate` process beside it,
//!    replicating the same database file to the same S3 server.
//!    Printed: inserts/s and the ratios b/a and c/a.
//! 2. **Replication lag** under a steady load of 200 inserts/s for `BENCH_SECS`: the time
//!    from the capture tick before a commit to the moment its file is stored in S3 (an upper
//!    bound of commit-to-stored), p50 and p99, from `GET /admin/backup/status`.
//! 3. **Restore time** of a `BENCH_RESTORE_MB` (default 1024) database from a local-directory
//!    replica (`file://`): a table of rows with 600 random bytes and 400 bytes of text each,
//!    replicated by a snapshot, then `ichibase::replication::restore` (download, apply,
//!    `integrity_check`).
//!
//! Needs `moto_server` and `litestream` (set `ICHIBASE_MOTO_SERVER` / `ICHIBASE_LITESTREAM`,
//! or run `./scripts/test` once, which installs both under `$HOME/.cache/ichibase-s3tools`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ichibase::config::Settings;

#[path = "../tests/common/mod.rs"]
mod common;

const BUCKET: &str = "bench-bucket";

fn tool(env: &str, name: &str) -> PathBuf {
    let p = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap())
            .join(".cache/ichibase-s3tools/venv/bin")
            .join(name)
    });
    assert!(p.exists(), "{} not found (set {env})", p.display());
    p
}

struct Moto {
    child: Child,
    endpoint: String,
}

impl Moto {
    fn start() -> Moto {
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
            .unwrap();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            std::thread::sleep(Duration::from_millis(50));
        }
        let endpoint = format!("http://127.0.0.1:{port}");
        // Create the bucket with one unsigned request (no curl on a fresh machine).
        {
            use std::io::{Read, Write};
            let host = endpoint.trim_start_matches("http://");
            let mut s = std::net::TcpStream::connect(host).expect("connect to moto");
            write!(
                s,
                "PUT /{BUCKET} HTTP/1.0\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n"
            )
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            assert!(
                out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200"),
                "create bucket: {out}"
            );
        }
        Moto { child, endpoint }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn settings(dir: &Path, replicate: Option<(&str, Option<&str>)>) -> ichibase::config::Config {
    let mut s = Settings {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        data_dir: Some(dir.to_path_buf()),
        admin_key: Some(common::ADMIN_KEY.into()),
        log_level: Some("warn".into()),
        ..Default::default()
    };
    if let Some((url, endpoint)) = replicate {
        s.replicate_url = Some(url.into());
        s.replicate_endpoint = endpoint.map(String::from);
        s.replicate_access_key_id = Some("bench".into());
        s.replicate_secret_access_key = Some("bench".into());
    }
    s.resolve().unwrap()
}

fn insert(i: u64) -> String {
    format!(
        "INSERT INTO events(at, kind, body) VALUES ({i}, 'note', printf('%0300d', {}))",
        i.wrapping_mul(2654435761) % 1_000_000_007
    )
}

/// Inserts per second with 4 concurrent clients for `secs`.
async fn throughput(base: &str, secs: f64) -> f64 {
    let c = common::client();
    let n = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = vec![];
    for t in 0..4u64 {
        let (c, n, stop, base) = (c.clone(), n.clone(), stop.clone(), base.to_string());
        tasks.push(tokio::spawn(async move {
            let mut i = t << 40;
            while !stop.load(Ordering::Relaxed) {
                common::ok(&c, &base, &insert(i)).await;
                i += 1;
                n.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let done = n.load(Ordering::Relaxed) as f64;
    let el = start.elapsed().as_secs_f64();
    for t in tasks {
        t.await.unwrap();
    }
    done / el
}

const SCHEMA: &str =
    "CREATE TABLE events(id INTEGER PRIMARY KEY, at INTEGER, kind TEXT, body TEXT)";

async fn run_server(
    dir: &Path,
    replicate: Option<(&str, Option<&str>)>,
) -> ichibase::server::Running {
    std::fs::create_dir_all(dir).unwrap();
    ichibase::server::start(settings(dir, replicate))
        .await
        .unwrap()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let restore_mb: u64 = std::env::var("BENCH_RESTORE_MB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let tmp = tempfile::tempdir().unwrap();
    let moto = Moto::start();

    // 1a. replication off
    let off = {
        let srv = run_server(&tmp.path().join("off"), None).await;
        let base = format!("http://{}", srv.addr);
        common::ok(&common::client(), &base, SCHEMA).await;
        let r = throughput(&base, secs).await;
        srv.shutdown().await.unwrap();
        r
    };
    // 1b. replication on (S3)
    let (on, lag) = {
        let url = format!("s3://{BUCKET}/ichibase");
        let srv = run_server(&tmp.path().join("on"), Some((&url, Some(&moto.endpoint)))).await;
        let base = format!("http://{}", srv.addr);
        let c = common::client();
        common::ok(&c, &base, SCHEMA).await;
        let r = throughput(&base, secs).await;
        // 2. steady load: 200 inserts/s
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        let start = Instant::now();
        let mut i = 1u64 << 50;
        while start.elapsed().as_secs_f64() < secs.max(5.0) {
            tick.tick().await;
            common::ok(&c, &base, &insert(i)).await;
            i += 1;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let st = srv.replication.as_ref().unwrap().status();
        srv.shutdown().await.unwrap();
        (r, st)
    };
    // 1c. ichibase without replication + litestream beside it
    let ls = {
        let dir = tmp.path().join("litestream");
        let srv = run_server(&dir, None).await;
        let base = format!("http://{}", srv.addr);
        common::ok(&common::client(), &base, SCHEMA).await;
        let cfg = tmp.path().join("litestream.yml");
        std::fs::write(
            &cfg,
            format!(
                "access-key-id: bench\nsecret-access-key: bench\ndbs:\n  - path: {}\n    replicas:\n      - type: s3\n        bucket: {BUCKET}\n        path: litestream\n        endpoint: {}\n        region: us-east-1\n        force-path-style: true\n",
                dir.join("ichibase.db").display(),
                moto.endpoint
            ),
        )
        .unwrap();
        let mut child = Command::new(tool("ICHIBASE_LITESTREAM", "litestream"))
            .env_remove("AWS_CA_BUNDLE")
            .args(["replicate", "-config", cfg.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let r = throughput(&base, secs).await;
        let _ = Command::new("kill").arg(child.id().to_string()).status();
        let _ = child.wait();
        srv.shutdown().await.unwrap();
        r
    };
    println!("write throughput (4 clients, one-row INSERT per request, {secs} s each):");
    println!("  replication off                      {off:>9.0} inserts/s");
    println!(
        "  ichibase replication to S3 (moto)    {on:>9.0} inserts/s   ratio {:.2}",
        on / off
    );
    println!(
        "  Litestream process beside ichibase   {ls:>9.0} inserts/s   ratio {:.2}",
        ls / off
    );
    println!(
        "replication lag at 200 inserts/s (capture tick before commit -> stored in S3): p50 {} ms, p99 {} ms",
        lag.lag_ms_p50.unwrap_or(0),
        lag.lag_ms_p99.unwrap_or(0)
    );

    // 3. restore time
    let dir = tmp.path().join("big");
    std::fs::create_dir_all(&dir).unwrap();
    let build = Instant::now();
    {
        let c = rusqlite::Connection::open(dir.join("ichibase.db")).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode=WAL; CREATE TABLE blobs(id INTEGER PRIMARY KEY, r BLOB, t TEXT);",
        )
        .unwrap();
        let rows = restore_mb * 1024 * 1024 / 1100;
        let mut done = 0;
        while done < rows {
            let n = (rows - done).min(50_000);
            c.execute_batch(&format!(
                "WITH RECURSIVE s(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM s WHERE x < {n}) \
                 INSERT INTO blobs(r, t) SELECT randomblob(600), printf('%0400d', x * 7919) FROM s"
            ))
            .unwrap();
            done += n;
        }
        c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
    }
    let db_size = std::fs::metadata(dir.join("ichibase.db")).unwrap().len();
    let rep = tmp.path().join("big-replica");
    let url = format!("file://{}", rep.display());
    let srv = run_server(&dir, Some((&url, None))).await;
    let snap = Instant::now();
    loop {
        let st = srv.replication.as_ref().unwrap().status();
        if st.last_snapshot_txid > 0 && st.pending_files == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let snap_secs = snap.elapsed().as_secs_f64();
    srv.shutdown().await.unwrap();
    let target = ichibase::replication::Target::open(&ichibase::replication::TargetOptions {
        url,
        timeout: Duration::from_secs(60),
        ..Default::default()
    })
    .unwrap();
    let to = tmp.path().join("restored.db");
    let t = Instant::now();
    let report = ichibase::replication::restore::restore(&target, &to, &Default::default())
        .await
        .unwrap();
    let restore_secs = t.elapsed().as_secs_f64();
    println!(
        "restore of a {:.0} MB database ({} MB replica) from a local-directory replica: {:.1} s \
         (incl. integrity_check); first snapshot took {:.1} s; building the database took {:.0} s",
        db_size as f64 / 1048576.0,
        report.bytes / 1048576,
        restore_secs,
        snap_secs,
        build.elapsed().as_secs_f64() - restore_secs - snap_secs
    );
    // The same replica copied to the S3 server, restored from there.
    let s3 = ichibase::replication::Target::open(&ichibase::replication::TargetOptions {
        url: format!("s3://{BUCKET}/big"),
        endpoint: Some(moto.endpoint.clone()),
        access_key_id: Some("bench".into()),
        secret_access_key: Some("bench".into()),
        timeout: Duration::from_secs(600),
        ..Default::default()
    })
    .unwrap();
    for obj in target.list("").await.unwrap() {
        let (level, name) = target.parse_level_path(&obj.name).unwrap();
        s3.put_file(
            &format!("{}/{name}", s3.level_dir(level)),
            &rep.join(&obj.name),
        )
        .await
        .unwrap();
    }
    let to = tmp.path().join("restored-s3.db");
    let t = Instant::now();
    let report = ichibase::replication::restore::restore(&s3, &to, &Default::default())
        .await
        .unwrap();
    println!(
        "restore of the same database from the S3 server on 127.0.0.1 (moto): {:.1} s ({} files)",
        t.elapsed().as_secs_f64(),
        report.files
    );
}
