//! Branch benchmark against the real server binary (its own process): what taking a branch
//! costs the live app.
//! 1. single-row INSERT latency (p50/p99) from one client, alone vs while branches of the live
//!    database are taken and deleted back to back (ratio, same run), once with the copy at the
//!    server's priority (`[branches] copy_nice = 0`) and once at the default nice 19, each on a
//!    restart of the server on the same data with its own baseline;
//! 2. branch creation time and throughput (MB/s) for the database size;
//! 3. merge time of a small bundle (a column and an index on the big table).
//!
//! `cargo bench --bench branch`; `BENCH_MB=200` (database size) and `BENCH_SECS=5` adjust it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

#[path = "../tests/common/mod.rs"]
mod common;

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

async fn insert_latencies(http: &reqwest::Client, base: &str, secs: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        let t = Instant::now();
        common::ok(
            http,
            base,
            "INSERT INTO events (body) VALUES (hex(randomblob(50)))",
        )
        .await;
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    out.sort_by(f64::total_cmp);
    out
}

/// Inserts alone, then while branches are taken and deleted back to back: (alone, during,
/// branch creation times), all sorted.
async fn alone_and_during(http: &reqwest::Client, base: &str, secs: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let alone = insert_latencies(http, base, secs).await;
    let stop = Arc::new(AtomicBool::new(false));
    let brancher = {
        let (http, base, stop) = (http.clone(), base.to_string(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut times = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("b{i}");
                let t = Instant::now();
                let r = http.post(format!("{base}/branches")).json(&json!({"name": name})).send().await.unwrap();
                assert!(r.status().is_success(), "{}", r.text().await.unwrap());
                times.push(t.elapsed().as_secs_f64());
                let r = http.delete(format!("{base}/branches/{name}")).send().await.unwrap();
                assert!(r.status().is_success());
                i += 1;
            }
            times
        })
    };
    let during = insert_latencies(http, base, secs).await;
    stop.store(true, Ordering::Relaxed);
    let mut btimes = brancher.await.unwrap();
    btimes.sort_by(f64::total_cmp);
    (alone, during, btimes)
}

fn print_phase(title: &str, secs: f64, db_bytes: u64, alone: &[f64], during: &[f64], btimes: &[f64]) {
    println!("## {title}: single-row INSERT latency while branches are taken (one client, {secs} s each)");
    println!();
    println!("| | inserts | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    for (label, v) in [("alone", alone), ("during back-to-back branching", during)] {
        println!(
            "| {label} | {} | {:.2} | {:.2} | {:.2} |",
            v.len(),
            pct(v, 0.5),
            pct(v, 0.99),
            v.last().copied().unwrap_or(f64::NAN)
        );
    }
    println!();
    println!(
        "- ratio during/alone: p50 {:.2}, p99 {:.2}; inserts completed {:.2}",
        pct(during, 0.5) / pct(alone, 0.5),
        pct(during, 0.99) / pct(alone, 0.99),
        during.len() as f64 / alone.len() as f64
    );
    println!(
        "- branches taken: {}; creation p50 {:.2} s ({:.0} MB/s), max {:.2} s",
        btimes.len(),
        pct(btimes, 0.5),
        db_bytes as f64 / 1e6 / pct(btimes, 0.5),
        btimes.last().copied().unwrap_or(f64::NAN)
    );
    println!();
}

fn main() {
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let mb: u64 = std::env::var("BENCH_MB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    // The release server in its own process, started by the tests' harness.
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().to_path_buf();
    let mut loader = common::Server::start_in(&data_dir, &[], &[]);
    let base = loader.url.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = common::client();
        common::ok(&http, &base, "CREATE TABLE big (id INTEGER PRIMARY KEY, payload BLOB)").await;
        common::ok(&http, &base, "CREATE TABLE events (id INTEGER PRIMARY KEY, body TEXT)").await;
        let chunks = mb.div_ceil(50);
        for _ in 0..chunks {
            common::ok(&http, &base, "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 50000) INSERT INTO big (payload) SELECT randomblob(1000) FROM c").await;
        }
        let db_bytes = std::fs::metadata(data_dir.join("ichibase.db")).map(|m| m.len()).unwrap_or(0)
            + std::fs::metadata(data_dir.join("ichibase.db-wal")).map(|m| m.len()).unwrap_or(0);
        println!("# ichibase {} branch benchmark", ichibase::VERSION);
        println!();
        println!(
            "- machine: {} cores; database {:.0} MB; server is the {} binary in its own process",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            db_bytes as f64 / 1e6,
            if cfg!(debug_assertions) { "debug" } else { "release" }
        );
        println!();
        loader.terminate();

        // The copy at the server's own priority (`[branches] copy_nice = 0`, how branches were
        // taken before) on the same data, then the default (nice 19), each with its own
        // baseline measured just before.
        for (title, nice) in [("copy at nice 0 (before)", 0), ("copy at nice 19 (default)", 19)] {
            let conf = data_dir.join(format!("bench-nice{nice}.toml"));
            std::fs::write(&conf, format!("[branches]\ncopy_nice = {nice}\n")).unwrap();
            let mut s = common::Server::start_in(
                &data_dir,
                &[],
                &[("ICHIBASE_CONFIG", conf.to_str().unwrap())],
            );
            let (alone, during, btimes) = alone_and_during(&http, &s.url, secs).await;
            print_phase(title, secs, db_bytes, &alone, &during, &btimes);
            s.terminate();
        }
        let server = common::Server::start_in(&data_dir, &[], &[]);
        let base = server.url.clone();

        // Merge: a bundle adding a column and an index to the big table, through a branch.
        let r = http.post(format!("{base}/branches")).json(&json!({"name": "m"})).send().await.unwrap();
        assert!(r.status().is_success());
        let bundle = json!({
            "name": "bench",
            "migrations": ["ALTER TABLE big ADD COLUMN tag TEXT NOT NULL DEFAULT ''", "CREATE INDEX big_tag ON big (tag)"],
            "functions": [{"name": "count_big", "source": "return function() return db.one('SELECT count(*) AS n FROM big') end"}],
            "checks": [{"name": "counts", "lua": "assert(fn.call('count_big', {}).n > 0)"}]
        });
        let t = Instant::now();
        let r = http.post(format!("{base}/branches/m/apply")).json(&bundle).send().await.unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
        let apply = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let r = http.post(format!("{base}/branches/m/merge")).send().await.unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
        let merge = t.elapsed().as_secs_f64();
        drop(server);
        println!("- bundle (column + index on the big table, one function, one check): apply + checks in the branch {apply:.2} s, merge into live {merge:.2} s");
    });
}
