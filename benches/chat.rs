//! Chat benchmark against the real server binary and a local fake Telegram Bot API (Rust, in
//! this file): **the cost of the inbound pipeline**. `BENCH_MESSAGES` (default 200) Telegram
//! updates are posted to the webhook (secret checked, inbox row, worker, handler as the linked
//! user, `chat.send` through the outbox) and timed until every reply reached the fake API;
//! the baseline, in the same run on the same server, is the same number of direct function
//! calls (`POST /fn/direct`, the same `chat.send` through the outbox) timed the same way.
//! Both are sent with the same concurrency (`BENCH_CONCURRENCY`, default 8). Prints
//! messages/s of both and the ratio.
//!
//! `cargo bench --bench chat` (or, without a release build, `cargo test --bench chat`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::post;
use futures_util::StreamExt;
use serde_json::{Value, json};

#[path = "../tests/common/mod.rs"]
mod common;

const TOKEN: &str = "1:BENCH";
const SECRET: &str = "bench-secret";

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Vec<String>>>);

async fn method(State(f): State<Fake>, Path((_bot, _m)): Path<(String, String)>, body: axum::body::Bytes) -> axum::Json<Value> {
    let b: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    f.0.lock().unwrap().push(b["text"].as_str().unwrap_or("").to_string());
    axum::Json(json!({"ok": true, "result": {"message_id": 1}}))
}

async fn wait_for(f: &Fake, prefix: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let got = f.0.lock().unwrap().iter().filter(|t| t.starts_with(prefix)).count();
        if got >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{got} of {n} {prefix} replies arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

#[tokio::main]
async fn main() {
    let n = env_usize("BENCH_MESSAGES", 200);
    let conc = env_usize("BENCH_CONCURRENCY", 8);
    let fake = Fake::default();
    let app = Router::new().route("/{bot}/{method}", post(method)).with_state(fake.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });

    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("ichibase.toml"),
        format!(
            "signup_open = true\n[notify]\npoll_secs = 0.1\n[chat]\nfunction = \"bot\"\nunlinked = \"anon\"\nrate_burst = 100000\nrate_per_minute = 1000000\n\
             [chat.telegram]\nbase_url = \"{url}\"\ntoken = \"{TOKEN}\"\nwebhook_secret = \"{SECRET}\"\n"
        ),
    )
    .unwrap();
    let s = common::Server::start_in(tmp.path(), &[], &[]);
    let base = s.url.clone();
    let admin = common::client();
    let bot = r#"function on_message(m, ctx) return chat.send{provider = m.provider, chat_id = m.chat_id, text = "hook " .. m.text} end"#;
    assert_eq!(common::put_fn(&admin, &base, "bot", bot).await.status, 200);
    let direct = r#"return function(i) return chat.send{provider = "telegram", chat_id = 42, text = "direct " .. i.n} end"#;
    assert_eq!(common::put_fn(&admin, &base, "direct", direct).await.status, 200);
    let anon = common::anon_client();

    // Warm-up (first connections, statement caches).
    for i in 0..5 {
        common::call_fn(&admin, &base, "direct", json!({"n": format!("w{i}")})).await;
    }
    wait_for(&fake, "direct w", 5).await;

    // Baseline: direct function calls with the same chat.send.
    let t = Instant::now();
    futures_util::stream::iter(0..n)
        .for_each_concurrent(conc, |i| {
            let (admin, base) = (admin.clone(), base.clone());
            async move {
                let r = common::call_fn(&admin, &base, "direct", json!({"n": i})).await;
                assert_eq!(r.status, 200, "{}", r.body);
            }
        })
        .await;
    wait_for(&fake, "direct ", n + 5).await;
    let direct_secs = t.elapsed().as_secs_f64();

    // Inbound: webhook → inbox → handler → chat.send.
    let t = Instant::now();
    futures_util::stream::iter(0..n)
        .for_each_concurrent(conc, |i| {
            let (anon, base) = (anon.clone(), base.clone());
            async move {
                let u = json!({"update_id": 1000 + i, "message": {"message_id": i + 1, "from": {"id": 42, "first_name": "B"},
                    "chat": {"id": 42, "type": "private"}, "text": format!("m{i}")}});
                let r = anon
                    .post(format!("{base}/chat/telegram/webhook"))
                    .header("X-Telegram-Bot-Api-Secret-Token", SECRET)
                    .json(&u)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
        })
        .await;
    wait_for(&fake, "hook ", n).await;
    let hook_secs = t.elapsed().as_secs_f64();

    let (d, h) = (n as f64 / direct_secs, n as f64 / hook_secs);
    println!("chat: {n} messages, concurrency {conc}");
    println!("  baseline  POST /fn/direct → chat.send → fake API : {d:8.1} msg/s ({direct_secs:.2} s)");
    println!("  inbound   webhook → inbox → handler → chat.send  : {h:8.1} msg/s ({hook_secs:.2} s)");
    println!("  ratio inbound / baseline: {:.2}", h / d);
}
