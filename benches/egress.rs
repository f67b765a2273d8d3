//! Egress benchmarks, each a ratio against a baseline measured in the same run:
//! 1. `http.fetch` overhead: one Lua invocation making 20 fetches to a local HTTP server, minus
//!    an invocation making none, per fetch — against a plain `reqwest` GET to the same server
//!    (same machine, keep-alive in both);
//! 2. the privacy guard's cost per KB scanned (mixed English/Japanese text with a few findings)
//!    against JSON-encoding the same text (what any outgoing body costs anyway).
//!
//! `cargo bench --bench egress`; `BENCH_SECS` sets the seconds per measurement (default 3).

use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use ichibase::egress::guard::{Guard, GuardSettings};

#[path = "../tests/common/mod.rs"]
mod common;

fn secs() -> f64 {
    std::env::var("BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0)
}

/// Mean seconds per call of `f` over about `secs()` seconds.
async fn per_call<F, Fut>(mut f: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..5 {
        f().await;
    }
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < Duration::from_secs_f64(secs()) {
        f().await;
        n += 1;
    }
    t0.elapsed().as_secs_f64() / n as f64
}

fn sample_text(kb: usize) -> String {
    let para = "Meeting notes for the podcast list: please add the new episodes. 今日は新しいエピソードを追加しました。\
        Contact bob@example.com about the 3 newsletters; the book list has 12 titles and ratings from 1 to 5. \
        次回の会議は来週の火曜日です。Your verification code is 482910. Links: https://example.org/a/b?x=1 \n";
    let mut s = String::new();
    while s.len() < kb * 1024 {
        s.push_str(para);
    }
    s
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // The local server both sides call.
        let app = Router::new().route("/x", get(|| async { "ok" }));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        let target = format!("http://127.0.0.1:{port}/x");

        // Baseline: plain reqwest.
        let plain = reqwest::Client::new();
        let t_plain = per_call(|| {
            let (c, u) = (plain.clone(), target.clone());
            async move {
                let r = c.get(u).send().await.unwrap();
                assert_eq!(r.text().await.unwrap(), "ok");
            }
        })
        .await;

        // ichibase: 20 fetches per invocation vs none.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("ichibase.toml"),
            format!("[egress.functions.\"f*\"]\nhosts = [\"127.0.0.1\"]\nports = [{port}]\nallow_addresses = [\"127.0.0.1/32\"]\n"),
        )
        .unwrap();
        let s = common::Server::start_in(dir.path(), &["--posterity-flush-secs", "1"], &[]);
        let c = common::client();
        assert_eq!(common::put_fn(&c, &s.url, "f0", "return function() return 1 end").await.status, 200);
        let src = format!("return function() for i = 1, 20 do local r = http.get('{target}') assert(r.body == 'ok') end return 1 end");
        assert_eq!(common::put_fn(&c, &s.url, "f20", &src).await.status, 200);
        let call = |name: &'static str| {
            let (c, u) = (c.clone(), s.url.clone());
            async move {
                let r = common::call_fn(&c, &u, name, serde_json::json!({})).await;
                assert_eq!(r.status, 200, "{}", r.body);
            }
        };
        let t0 = per_call(|| call("f0")).await;
        let t20 = per_call(|| call("f20")).await;
        let t_fetch = (t20 - t0) / 20.0;
        println!("http.fetch vs plain reqwest, same local server (keep-alive):");
        println!("  plain reqwest GET            {:>9.1} µs", t_plain * 1e6);
        println!("  http.fetch (per call, in Lua) {:>8.1} µs  (invocation with 20: {:.2} ms, with none: {:.2} ms)", t_fetch * 1e6, t20 * 1e3, t0 * 1e3);
        println!("  ratio                          {:>6.2}x", t_fetch / t_plain);
    });

    // The guard per KB.
    let guard = Guard::new(&GuardSettings {
        secrets: vec!["s3cr3t-token-abcdef".into(), "another-known-secret-42".into()],
        ..Default::default()
    });
    let text = sample_text(64);
    let kb = text.len() as f64 / 1024.0;
    let time = |f: &dyn Fn() -> usize| {
        let t0 = Instant::now();
        let mut n = 0u64;
        let mut sink = 0usize;
        while t0.elapsed() < Duration::from_secs_f64(secs()) {
            sink = sink.wrapping_add(f());
            n += 1;
        }
        std::hint::black_box(sink);
        t0.elapsed().as_secs_f64() / n as f64
    };
    let t_guard = time(&|| guard.scan(&text, &[]).text.len());
    let t_json = time(&|| serde_json::to_string(&text).unwrap().len());
    let found = guard.scan(&text, &[]).found();
    println!("privacy guard over {:.0} KB of mixed English/Japanese text ({found} findings):", kb);
    println!("  guard.scan        {:>8.2} µs/KB  ({:.1} MB/s)", t_guard * 1e6 / kb, text.len() as f64 / t_guard / 1e6);
    println!("  JSON-encode same  {:>8.2} µs/KB", t_json * 1e6 / kb);
    println!("  ratio             {:>8.2}x", t_guard / t_json);
}
