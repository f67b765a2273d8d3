//! `ai` benchmarks, each against a baseline measured in the same run:
//!
//! 1. **Overhead of the ai layer per call**: a scripted model server (tests/common/
//!    model_server.rs) runs in this process; the server under test has one model pointing at
//!    it. Three latencies are measured in alternating rounds with one keep-alive client:
//!    - `direct`: this process POSTs the same chat request straight to the scripted server;
//!    - `lua`: `POST /fn/plain`, a Lua function returning a constant (invocation cost);
//!    - `ai`: `POST /fn/ask`, a Lua function calling `ai.generate_text{prompt=...}`.
//!    The layer's overhead is `p50(ai) - p50(lua) - p50(direct)`: argument checks, budget and
//!    cache look-ups, the provider request and parsing, the wait on the runtime, the result
//!    table and the generation's log row (goal: under 1 ms).
//! 2. **Generations logged without loss**: 16 concurrent clients call `ask` for a while; the
//!    calls that succeeded are compared with the generation rows `/ai/usage` counts and with
//!    posterity's dropped-event counter.
//!
//! `cargo bench --no-default-features --bench ai` (DUCKDB_LIB_DIR set, see README).
//! `BENCH_SECS` sets the seconds of each part (default 4).

use std::time::{Duration, Instant};

use serde_json::json;

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/model_server.rs"]
mod model_server;

fn p(v: &mut [u64], q: f64) -> f64 {
    v.sort_unstable();
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() - 1) as f64 * q).round() as usize] as f64 / 1e3
}

async fn timed(rb: reqwest::RequestBuilder) -> u64 {
    let t = Instant::now();
    let r = rb.send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let _ = r.bytes().await.unwrap();
    t.elapsed().as_nanos() as u64
}

fn main() {
    let secs: f64 = std::env::var("BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(4.0);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let m = model_server::ModelServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("ichibase.toml"),
            format!("[ai.models.fast]\nurl = \"{}\"\nmodel = \"m-fast\"\ninput_price = 1.0\noutput_price = 2.0\n", m.url),
        )
        .unwrap();
        let s = common::Server::start_in(dir.path(), &[], &[]);
        let c = common::client();
        let base = s.url.clone();
        for (name, src) in [
            ("plain", "return function(i) return {text = 'echo: ' .. i.q} end"),
            ("ask", "return function(i) return ai.generate_text{prompt = i.q} end"),
        ] {
            let r = common::put_fn(&c, &base, name, src).await;
            assert_eq!(r.status, 200, "{}", r.body);
        }
        let direct_body = json!({"model": "m-fast", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1024});
        let input = json!({"q": "hello"}).to_string();
        println!("# ichibase {} ai benchmarks", ichibase::VERSION);
        println!();
        println!(
            "- machine: {} cores; server, model server and client share them",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        );
        // Warm up every path.
        for _ in 0..200 {
            timed(c.post(format!("{}/chat/completions", m.url)).json(&direct_body)).await;
            timed(c.post(format!("{base}/fn/plain")).body(input.clone())).await;
            timed(c.post(format!("{base}/fn/ask")).body(input.clone())).await;
        }
        let (mut direct, mut lua, mut ai) = (Vec::new(), Vec::new(), Vec::new());
        let end = Instant::now() + Duration::from_secs_f64(secs);
        while Instant::now() < end {
            for _ in 0..50 {
                direct.push(timed(c.post(format!("{}/chat/completions", m.url)).json(&direct_body)).await);
                lua.push(timed(c.post(format!("{base}/fn/plain")).body(input.clone())).await);
                ai.push(timed(c.post(format!("{base}/fn/ask")).body(input.clone())).await);
            }
        }
        let (d50, l50, a50) = (p(&mut direct, 0.5), p(&mut lua, 0.5), p(&mut ai, 0.5));
        println!();
        println!("## Overhead of the ai layer per call ({} calls each, sequential)", ai.len());
        println!();
        println!("| path | p50 µs | p95 µs |");
        println!("|---|---|---|");
        println!("| direct to the scripted model | {d50:.0} | {:.0} |", p(&mut direct, 0.95));
        println!("| Lua function, no model call | {l50:.0} | {:.0} |", p(&mut lua, 0.95));
        println!("| Lua function with ai.generate_text | {a50:.0} | {:.0} |", p(&mut ai, 0.95));
        println!();
        println!("ai layer overhead at p50: **{:.0} µs** (ai − lua − direct)", a50 - l50 - d50);

        // Part 2: concurrent calls, every generation logged?
        let (_, before) = common::api(&c, "GET", format!("{base}/ai/usage?group_by=model"), None).await;
        let before_n = before["data"][0]["generations"].as_u64().unwrap_or(0);
        let (_, ps0) = common::api(&c, "GET", format!("{base}/admin/posterity"), None).await;
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs_f64(secs);
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (c, base, input) = (c.clone(), base.clone(), input.clone());
            tasks.push(tokio::spawn(async move {
                let mut ok = 0u64;
                while Instant::now() < end {
                    let r = c.post(format!("{base}/fn/ask")).body(input.clone()).send().await.unwrap();
                    if r.status().is_success() {
                        ok += 1;
                    }
                    let _ = r.bytes().await;
                }
                ok
            }));
        }
        let mut calls = 0;
        for t in tasks {
            calls += t.await.unwrap();
        }
        let elapsed = t0.elapsed().as_secs_f64();
        let (_, after) = common::api(&c, "GET", format!("{base}/ai/usage?group_by=model"), None).await;
        let logged = after["data"][0]["generations"].as_u64().unwrap_or(0) - before_n;
        let (_, ps1) = common::api(&c, "GET", format!("{base}/admin/posterity"), None).await;
        let dropped = ps1["dropped"].as_u64().unwrap_or(0) - ps0["dropped"].as_u64().unwrap_or(0);
        println!();
        println!("## Generations logged under load (16 concurrent clients, {elapsed:.1} s)");
        println!();
        println!("| calls answered | calls/s | generation rows logged | events dropped |");
        println!("|---|---|---|---|");
        println!("| {calls} | {:.0} | {logged} | {dropped} |", calls as f64 / elapsed);
        drop(s);
    });
}
