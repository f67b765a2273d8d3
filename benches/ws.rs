//! WebSocket and change-capture benchmarks, measured against the real server binary (a
//! separate process, so clients and server each have their own file-descriptor budget):
//! 1. fan-out of one broadcast to 1,000 and 10,000 local clients: delivery latency p50/p99
//!    (from just before the HTTP `POST /broadcast` to each client's receipt);
//! 2. change capture while the writer runs at full speed (batched inserts from 4 clients):
//!    writer rows/s on a captured table vs an uncaptured one (a ratio, same run), and change
//!    events/s delivered to a subscriber.
//!
//! `cargo bench --bench ws`; `BENCH_CLIENTS=1000,10000` and `BENCH_SECS=3` adjust it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[path = "../tests/common/mod.rs"]
mod common;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1] as f64 / 1e3
}

async fn ws_connect(
    url: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {}", common::ADMIN_KEY).parse().unwrap());
    let cfg = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(cfg), true)
        .await
        .expect("connect");
    ws
}

async fn fanout(
    http: &reqwest::Client,
    base: &str,
    clients: usize,
    rounds: usize,
) -> (Vec<u64>, f64) {
    let url = base.replace("http://", "ws://") + "/ws";
    let received = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(clients);
    let t0 = Instant::now();
    let mut pending = Vec::new();
    for _ in 0..clients {
        let url = url.clone();
        pending.push(tokio::spawn(async move {
            let mut ws = ws_connect(&url).await;
            ws.send(Message::Text(
                json!({"type": "join", "channel": "bench", "presence": false})
                    .to_string()
                    .into(),
            ))
            .await
            .unwrap();
            loop {
                if let Some(Ok(Message::Text(t))) = ws.next().await {
                    if t.contains("\"joined\"") {
                        break;
                    }
                }
            }
            ws
        }));
        if pending.len() == 200 {
            for p in pending.drain(..) {
                tasks.push(p.await.unwrap());
            }
        }
    }
    for p in pending.drain(..) {
        tasks.push(p.await.unwrap());
    }
    let connect_s = t0.elapsed().as_secs_f64();
    let mut readers = Vec::new();
    for mut ws in tasks {
        let received = Arc::clone(&received);
        readers.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(rounds);
            while lat.len() < rounds {
                match tokio::time::timeout(Duration::from_secs(60), ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => {
                        let at = now_ns();
                        let v: Value = serde_json::from_str(&t).unwrap();
                        if v["type"] == "broadcast" {
                            lat.push(at.saturating_sub(v["payload"]["t"].as_u64().unwrap()));
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(Some(Ok(_))) => {}
                    _ => break,
                }
            }
            drop(ws);
            lat
        }));
    }
    for _ in 0..rounds {
        let r = http
            .post(format!("{base}/broadcast"))
            .json(&json!({"channel": "bench", "payload": {"t": now_ns()}}))
            .send()
            .await
            .unwrap();
        let delivered = r.json::<Value>().await.unwrap()["delivered"]
            .as_u64()
            .unwrap();
        assert_eq!(delivered as usize, clients, "every client must be reached");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut all = Vec::new();
    for r in readers {
        all.extend(r.await.unwrap());
    }
    all.sort_unstable();
    (all, connect_s)
}

async fn writer_rate(http: &reqwest::Client, base: &str, table: &str, secs: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let sql = format!(
        "INSERT INTO {table}(v) SELECT 'payload-' || n FROM (WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 100) SELECT n FROM c)"
    );
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (c, b, sql) = (http.clone(), base.to_string(), sql.clone());
        tasks.push(tokio::spawn(async move {
            let mut rows = 0u64;
            while Instant::now() < deadline {
                let r = c
                    .post(format!("{b}/"))
                    .body(sql.clone())
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "{}", r.text().await.unwrap());
                r.bytes().await.unwrap();
                rows += 100;
            }
            rows
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / secs
}

fn main() {
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let sizes: Vec<usize> = std::env::var("BENCH_CLIENTS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1000, 10000]);
    // The release server in its own process, started by the tests' harness.
    let server = common::Server::start(&["--ws-queue", "200000"]);
    let base = server.url.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = common::client();
        println!("# ichibase {} WebSocket benchmarks", ichibase::VERSION);
        println!();
        println!("- machine: {} cores; server is the release binary in its own process, clients in this one", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        println!();
        println!("## Fan-out of one broadcast (10 rounds, 200 ms apart)");
        println!();
        println!("| clients | connect+join s | deliveries | p50 ms | p99 ms | max ms |");
        println!("|---:|---:|---:|---:|---:|---:|");
        for &n in &sizes {
            let (lat, connect_s) = fanout(&http, &base, n, 10).await;
            println!("| {n} | {connect_s:.2} | {} | {:.2} | {:.2} | {:.2} |", lat.len(), pct(&lat, 0.5) / 1e3, pct(&lat, 0.99) / 1e3, lat.last().copied().unwrap_or(0) as f64 / 1e6);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }

        for sql in ["CREATE TABLE ev(id INTEGER PRIMARY KEY, v TEXT)", "CREATE TABLE ev_plain(id INTEGER PRIMARY KEY, v TEXT)"] {
            common::ok(&http, &base, sql).await;
        }
        let r = common::jpost(&http, &base, "/admin/cdc", json!({"table": "ev"})).await;
        assert!((200..300).contains(&r.status), "{}", r.body);
        let url = base.replace("http://", "ws://") + "/ws";
        let mut sub = ws_connect(&url).await;
        sub.send(Message::Text(json!({"type": "subscribe", "sub": "s", "object": "ev"}).to_string().into())).await.unwrap();
        let events = Arc::new(AtomicU64::new(0));
        let last_at = Arc::new(std::sync::Mutex::new(Instant::now()));
        let (e2, l2) = (Arc::clone(&events), Arc::clone(&last_at));
        let counter = tokio::spawn(async move {
            while let Some(Ok(m)) = sub.next().await {
                if let Message::Text(t) = m {
                    if t.contains("\"change\"") {
                        e2.fetch_add(1, Ordering::Relaxed);
                        *l2.lock().unwrap() = Instant::now();
                    }
                }
            }
        });
        // Off/on pairs, each after the dispatcher delivered everything written before it (a
        // backlog would take CPU from the next measurement); the ratio of each pair and their median.
        let runs: usize = std::env::var("BENCH_CDC_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
        println!();
        println!("## Change capture with the writer at full speed (4 clients inserting 100 rows per statement, {secs} s, {runs} off/on pairs)");
        println!();
        println!("| writer rows/s, CDC off | writer rows/s, CDC on | ratio on/off | change events delivered | delivered/s (to the last event) |");
        println!("|---:|---:|---:|---:|---:|");
        let mut ratios = Vec::new();
        let mut written = 0u64;
        for _ in 0..runs {
            let off = writer_rate(&http, &base, "ev_plain", secs).await;
            let before = events.load(Ordering::Relaxed);
            let start = Instant::now();
            let on = writer_rate(&http, &base, "ev", secs).await;
            written += (on * secs).round() as u64;
            let wait = Instant::now() + Duration::from_secs(120);
            while events.load(Ordering::Relaxed) < written && Instant::now() < wait {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let delivered = events.load(Ordering::Relaxed);
            let took = last_at.lock().unwrap().duration_since(start).as_secs_f64();
            println!("| {off:.0} | {on:.0} | {:.3} | {} of {} | {:.0} |", on / off, delivered - before, (on * secs).round() as u64, (delivered - before) as f64 / took);
            ratios.push(on / off);
        }
        ratios.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!();
        println!("median ratio on/off: {:.3}", ratios[ratios.len() / 2]);
        counter.abort();
    });
    drop(server);
}
