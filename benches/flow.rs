//! Durable workflow benchmarks against the real server, each with its baseline in the same run:
//! 1. the price of durability: N SQLite writes as N `ctx.tx` steps of one workflow (each
//!    commits its write with its journal row), as N `ctx.step` steps (write autocommitted, then
//!    the journal row), versus the same N writes in a plain Lua function, each in its own
//!    `db.tx` (the baseline), and all in one `db.tx`;
//! 2. recovery: 10,000 workflows started and asleep, the server killed with SIGKILL and
//!    restarted with the flow clock two hours on (test-only `clock_offset_secs`), so all are
//!    due at once: the time until the server listens and until all completed.
//!
//! `cargo bench --bench flow`; `BENCH_STEPS` (default 500) and `BENCH_PENDING` (default 10000).

use std::time::{Duration, Instant};

use serde_json::json;

#[path = "../tests/common/mod.rs"]
mod common;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn wait_done(c: &reqwest::Client, base: &str, id: &str) -> serde_json::Value {
    loop {
        let (_, v) = common::api(c, "GET", format!("{base}/flows/{id}"), None).await;
        match v["status"].as_str() {
            Some("completed") => return v,
            Some("failed") => panic!("{v}"),
            _ => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

async fn count_completed(c: &reqwest::Client, base: &str) -> u64 {
    let (_, v) = common::api(c, "GET", format!("{base}/flows?limit=1"), None).await;
    v["counts"]["completed"].as_u64().unwrap_or(0)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let steps = env_usize("BENCH_STEPS", 500);
    let pending = env_usize("BENCH_PENDING", 10_000);
    let dir = tempfile::tempdir().unwrap();
    let env = [("ICHIBASE_FLOW__POLL_INTERVAL_MS", "20"), ("ICHIBASE_POSTERITY", "false")];
    let mut s = common::Server::start_in(dir.path(), &[], &env);
    let c = common::client();
    let u = s.url.clone();
    common::ok(&c, &u, "CREATE TABLE w(i INTEGER, tag TEXT)").await;
    let put = |name: &'static str, src: String| {
        let (c, u) = (c.clone(), u.clone());
        async move {
            let r = common::put_fn(&c, &u, name, &src).await;
            assert_eq!(r.status, 200, "{}", r.body);
        }
    };
    put("wtx", format!(r#"return flow.define("wtx", function(ctx, input)
  for i = 1, {steps} do ctx.tx("s" .. i, function() db.exec("INSERT INTO w VALUES ({{i:Int64}}, 'wtx')", {{i = i}}) end) end
end)"#)).await;
    put("wstep", format!(r#"return flow.define("wstep", function(ctx, input)
  for i = 1, {steps} do ctx.step("s" .. i, function() db.exec("INSERT INTO w VALUES ({{i:Int64}}, 'wstep')", {{i = i}}) end) end
end)"#)).await;
    put("plain", format!(r#"return function()
  for i = 1, {steps} do db.tx(function() db.exec("INSERT INTO w VALUES ({{i:Int64}}, 'plain')", {{i = i}}) end) end
end"#)).await;
    put("onetx", format!(r#"return function()
  db.tx(function() for i = 1, {steps} do db.exec("INSERT INTO w VALUES ({{i:Int64}}, 'onetx')", {{i = i}}) end end)
end"#)).await;

    println!("## flow: the price of durability ({steps} writes, median of 5)\n");
    println!("| how | writes/s | ratio to plain db.tx per write |");
    println!("|---|---|---|");
    let mut results = Vec::new();
    for (label, name, is_flow) in [
        ("plain function, one db.tx per write (baseline)", "plain", false),
        ("plain function, all writes in one db.tx", "onetx", false),
        ("workflow, one ctx.tx step per write", "wtx", true),
        ("workflow, one ctx.step per write", "wstep", true),
    ] {
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            if is_flow {
                let (st, v) = common::api(&c, "POST", format!("{u}/flows/{name}"), Some(json!({}))).await;
                assert_eq!(st, 200, "{v}");
                wait_done(&c, &u, v["id"].as_str().unwrap()).await;
            } else {
                let r = common::call_fn(&c, &u, name, json!({})).await;
                assert_eq!(r.status, 200, "{}", r.body);
            }
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let rate = steps as f64 / times[2];
        results.push(rate);
        println!("| {label} | {rate:.0} | {:.2} |", rate / results[0]);
    }

    // Recovery.
    put("sleeper", r#"return flow.define("sleeper", function(ctx, input)
  ctx.sleep(3600)
  ctx.tx("write", function() db.exec("INSERT INTO w VALUES ({i:Int64}, 'sleeper')", {i = input.i}) end)
end)"#.to_string()).await;
    let before = count_completed(&c, &u).await;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for part in 0..8 {
        let (c, u) = (c.clone(), u.clone());
        tasks.push(tokio::spawn(async move {
            for i in (part..pending).step_by(8) {
                let (st, v) = common::api(&c, "POST", format!("{u}/flows/sleeper"), Some(json!({"input": {"i": i}}))).await;
                assert_eq!(st, 200, "{v}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let started = t.elapsed().as_secs_f64();
    loop {
        let (_, v) = common::api(&c, "GET", format!("{u}/flows?limit=1"), None).await;
        if v["counts"]["sleeping"].as_u64().unwrap_or(0) as usize >= pending {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let asleep = t.elapsed().as_secs_f64();
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    let t = Instant::now();
    let env2 = [
        ("ICHIBASE_FLOW__POLL_INTERVAL_MS", "20"),
        ("ICHIBASE_POSTERITY", "false"),
        ("ICHIBASE_FLOW__CLOCK_OFFSET_SECS", "7200"),
    ];
    s = common::Server::start_in(dir.path(), &[], &env2);
    let listening = t.elapsed().as_secs_f64();
    let u = s.url.clone();
    while count_completed(&c, &u).await < before + pending as u64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered = t.elapsed().as_secs_f64();
    println!("\n## flow: recovery with {pending} pending workflows\n");
    println!("| phase | seconds | workflows/s |");
    println!("|---|---|---|");
    println!("| start {pending} over HTTP (8 clients) | {started:.2} | {:.0} |", pending as f64 / started);
    println!("| ... until all asleep (one run each) | {asleep:.2} | {:.0} |", pending as f64 / asleep);
    println!("| kill -9, restart: listening | {listening:.2} | |");
    println!("| ... all {pending} completed (one run each: replay the sleep, one ctx.tx) | {recovered:.2} | {:.0} |", pending as f64 / (recovered - listening));
}
