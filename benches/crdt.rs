//! CRDT benchmark (src/crdt), each figure against a baseline measured in the same run:
//! 1. local writes: rows/s inserted into a CRR table (capture triggers) vs the same rows into a
//!    plain table (ratio);
//! 2. merging: row changes/s applied from another replica vs plain inserts of the same rows;
//! 3. storage: bytes of CRR metadata per row (database size with vs without CRR, same rows);
//! 4. sync lag between two local servers (`ichibase sync` between them) under steady writes
//!    (p50 / p99 from the write's answer on A to the row being readable on B).
//!
//! `cargo bench --bench crdt`; `BENCH_ROWS=20000`, `BENCH_SECS=10`, `BENCH_RATE=50` adjust it.

use std::time::{Duration, Instant};

use ichibase::crdt::engine::{self, Direct, MergeLimits};
use rusqlite::Connection;

#[path = "../tests/common/mod.rs"]
mod common;

const SCHEMA: &str = "CREATE TABLE t (id INTEGER PRIMARY KEY, title TEXT, body TEXT, n INTEGER, score REAL)";

fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

fn open(path: &std::path::Path, crr: bool) -> Connection {
    let mut c = Connection::open(path).unwrap();
    c.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;").unwrap();
    c.execute_batch(SCHEMA).unwrap();
    if crr {
        engine::enable(&mut c, "t").unwrap();
    }
    c
}

fn insert_rows(c: &mut Connection, rows: usize) -> f64 {
    let t = Instant::now();
    let tx = c.transaction().unwrap();
    {
        let mut st = tx
            .prepare("INSERT INTO t (id, title, body, n, score) VALUES (?1, ?2, ?3, ?4, ?5)")
            .unwrap();
        for i in 0..rows as i64 {
            st.execute(rusqlite::params![i, format!("title {i}"), "x".repeat(100), i * 7, i as f64 / 3.0])
                .unwrap();
        }
    }
    tx.commit().unwrap();
    t.elapsed().as_secs_f64()
}

fn size(c: &Connection) -> i64 {
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); VACUUM;").unwrap();
    c.query_row("SELECT page_count * page_size FROM pragma_page_count, pragma_page_size", [], |r| r.get(0))
        .unwrap()
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn main() {
    let rows: usize = env("BENCH_ROWS", 20_000);
    let secs: f64 = env("BENCH_SECS", 10.0);
    let rate: f64 = env("BENCH_RATE", 50.0);
    let dir = tempfile::tempdir().unwrap();

    // 1. Local writes.
    let mut plain = open(&dir.path().join("plain.db"), false);
    let t_plain = insert_rows(&mut plain, rows);
    let mut crr = open(&dir.path().join("crr.db"), true);
    let t_crr = insert_rows(&mut crr, rows);
    println!(
        "local inserts: plain {:.0} rows/s, CRR {:.0} rows/s (ratio {:.2})",
        rows as f64 / t_plain,
        rows as f64 / t_crr,
        t_plain / t_crr
    );

    // 2. Merging another replica's changes (batches of 1000, each its own transaction).
    let (cands, _, _) = engine::changes(&crr, 0, usize::MAX / 2, None).unwrap();
    let changes: Vec<_> = cands.into_iter().map(|c| c.change).collect();
    let mut replica = open(&dir.path().join("replica.db"), true);
    let t = Instant::now();
    for batch in changes.chunks(1000) {
        engine::apply(&mut replica, batch, &Direct, &MergeLimits::default(), |_| Ok(())).unwrap();
    }
    let t_apply = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for batch in changes.chunks(1000) {
        engine::apply(&mut replica, batch, &Direct, &MergeLimits::default(), |_| Ok(())).unwrap();
    }
    let t_again = t.elapsed().as_secs_f64();
    println!(
        "merge: {:.0} changes/s applied (ratio {:.2} of plain inserts); the same changes again (no-ops): {:.0} changes/s",
        rows as f64 / t_apply,
        t_plain / t_apply,
        rows as f64 / t_again
    );

    // 3. Storage.
    let (s_plain, s_crr) = (size(&plain), size(&crr));
    println!(
        "storage: plain {} KB, CRR {} KB: {:.0} bytes of CRR metadata per row ({} non-key columns)",
        s_plain / 1024,
        s_crr / 1024,
        (s_crr - s_plain) as f64 / rows as f64,
        4
    );
    drop((plain, crr, replica));

    // 4. Sync lag between two servers.
    let a = common::Server::start(&[]);
    let b = common::Server::start(&[]);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let admin = common::client();
        for s in [&a.url, &b.url] {
            common::ok(&admin, s, "CREATE TABLE ev (id INTEGER PRIMARY KEY, body TEXT)").await;
            let r = common::jpost(&admin, s, "/admin/crdt/tables", serde_json::json!({"table": "ev"})).await;
            assert_eq!(r.status, 200, "{}", r.body);
        }
        let mut sync = std::process::Command::new(env!("CARGO_BIN_EXE_ichibase"))
            .args(["sync", "--peer", &b.url, "--key", common::ADMIN_KEY, "--interval-ms", "20", "--data-dir"])
            .arg(&a.data_dir)
            .env("ICHIBASE_LOG", "warn")
            .spawn()
            .unwrap();
        let n = (secs * rate) as i64;
        let gap = Duration::from_secs_f64(1.0 / rate);
        let mut written = Vec::with_capacity(n as usize);
        let bu = b.url.clone();
        let watcher = tokio::spawn(async move {
            let c = common::client();
            let mut seen: Vec<Option<Instant>> = vec![None; n as usize];
            let mut max = -1i64;
            let end = Instant::now() + Duration::from_secs_f64(secs + 60.0);
            while max < n - 1 && Instant::now() < end {
                let body = common::ok(&c, &bu, "SELECT coalesce(max(id), -1) FROM ev FORMAT TSV").await;
                let m: i64 = body.trim().parse().unwrap();
                let now = Instant::now();
                for i in (max + 1)..=m {
                    seen[i as usize] = Some(now);
                }
                max = max.max(m);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seen
        });
        for i in 0..n {
            let t = Instant::now();
            common::ok(&admin, &a.url, &format!("INSERT INTO ev (id, body) VALUES ({i}, 'event {i}')")).await;
            written.push(Instant::now());
            if let Some(rest) = gap.checked_sub(t.elapsed()) {
                tokio::time::sleep(rest).await;
            }
        }
        let seen = watcher.await.unwrap();
        let _ = sync.kill();
        let _ = sync.wait();
        let mut lags: Vec<f64> = written
            .iter()
            .zip(seen.iter())
            .filter_map(|(w, s)| s.map(|s| s.saturating_duration_since(*w).as_secs_f64() * 1e3))
            .collect();
        lags.sort_by(f64::total_cmp);
        println!(
            "sync lag A -> B at {rate} writes/s for {secs} s: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} of {n} rows arrived)",
            pct(&lags, 0.5),
            pct(&lags, 0.99),
            lags.last().copied().unwrap_or(f64::NAN),
            lags.len()
        );
    });
}
