//! Notify benchmarks against the real server binary and a local aiosmtpd server
//! (tests/notify_peers/smtp_sink.py; needs `ICHIBASE_NOTIFY_PYTHON`, see scripts/peers/notify.sh):
//! 1. **throughput**: messages/s from `notify.email` through the outbox to the SMTP server
//!    (queued by 10 transactions, timed until the last one arrived), against the same number
//!    of messages sent straight to the same server with lettre at the same concurrency (the
//!    baseline, same run);
//! 2. **cost in the calling transaction**: mean latency of a function whose `db.tx` inserts a
//!    row, with and without a `notify.email` in the same transaction (the sender is off, so
//!    only the outbox write is measured), and the ratio.
//!
//! `cargo bench --bench notify`; `BENCH_MESSAGES=2000` and `BENCH_CALLS=300` adjust it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lettre::message::Mailbox;
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde_json::json;

#[path = "../tests/common/mod.rs"]
mod common;

struct Peer(Child);
impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn sink(py: &str, port: u16, out: &Path) -> Peer {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/notify_peers/smtp_sink.py");
    let mut c = Command::new(py)
        .arg(script)
        .arg(port.to_string())
        .arg(out)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the SMTP sink");
    let mut lines = BufReader::new(c.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap().trim(), "ready");
    Peer(c)
}

fn count(out: &Path) -> usize {
    std::fs::read_to_string(out).map(|s| s.lines().count()).unwrap_or(0)
}

async fn wait_count(out: &Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while count(out) < n {
        assert!(Instant::now() < deadline, "messages did not arrive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn env(port: u16, sender: bool) -> Vec<(&'static str, String)> {
    vec![
        ("ICHIBASE_NOTIFY__SMTP_URL", format!("smtp://127.0.0.1:{port}")),
        ("ICHIBASE_NOTIFY__FROM", "bench@example.test".into()),
        ("ICHIBASE_NOTIFY__SENDER", sender.to_string()),
        ("ICHIBASE_NOTIFY__POLL_SECS", "0.05".into()),
    ]
}

fn server(dir: &Path, env: &[(&'static str, String)]) -> common::Server {
    let e: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    common::Server::start_in(dir, &[], &e)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Ok(py) = std::env::var("ICHIBASE_NOTIFY_PYTHON") else {
        eprintln!("notify bench skipped: ICHIBASE_NOTIFY_PYTHON is not set (source scripts/peers/notify.sh)");
        return;
    };
    let messages: usize = std::env::var("BENCH_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let calls: usize = std::env::var("BENCH_CALLS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let tmp = tempfile::tempdir().unwrap();
    let c = common::client();

    // 1. Throughput through the outbox, and the direct baseline.
    let port = free_port();
    let out = tmp.path().join("outbox.jsonl");
    let _sink = sink(&py, port, &out);
    let d1 = tmp.path().join("d1");
    std::fs::create_dir_all(&d1).unwrap();
    let s = server(&d1, &env(port, true));
    let r = common::put_fn(&c, &s.url, "burst", r#"return function(input)
      db.tx(function()
        for i = 1, input.n do notify.email{to = "load@example.test", subject = "m" .. i, text = "hello"} end
      end)
    end"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let per = messages / 10;
    let t = Instant::now();
    for _ in 0..10 {
        let r = common::call_fn(&c, &s.url, "burst", json!({"n": per})).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let queued = t.elapsed();
    wait_count(&out, per * 10).await;
    let outbox_secs = t.elapsed().as_secs_f64();
    let outbox_rate = (per * 10) as f64 / outbox_secs;
    drop(s);

    let out2 = tmp.path().join("direct.jsonl");
    let port2 = free_port();
    let _sink2 = sink(&py, port2, &out2);
    let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(&format!("smtp://127.0.0.1:{port2}"))
        .unwrap()
        .pool_config(PoolConfig::new().max_size(8))
        .build();
    let from: Mailbox = "bench@example.test".parse().unwrap();
    let t = Instant::now();
    use futures_util::StreamExt;
    futures_util::stream::iter(0..per * 10)
        .map(|i| {
            let (transport, from) = (transport.clone(), from.clone());
            async move {
                let m = Message::builder()
                    .from(from)
                    .to("load@example.test".parse().unwrap())
                    .subject(format!("m{i}"))
                    .body("hello".to_string())
                    .unwrap();
                transport.send(m).await.unwrap();
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    wait_count(&out2, per * 10).await;
    let direct_rate = (per * 10) as f64 / t.elapsed().as_secs_f64();
    println!(
        "notify throughput: {} emails through the outbox in {outbox_secs:.2} s = {outbox_rate:.0} msg/s (queued in {:.2} s); \
         direct lettre to the same server {direct_rate:.0} msg/s; ratio {:.2}",
        per * 10,
        queued.as_secs_f64(),
        outbox_rate / direct_rate
    );

    // 2. What a notify.email adds to the calling transaction (sender off).
    let d2 = tmp.path().join("d2");
    std::fs::create_dir_all(&d2).unwrap();
    let s = server(&d2, &env(port, false));
    common::ok(&c, &s.url, "CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT)").await;
    for (name, src) in [
        ("plain", r#"return function(input) db.tx(function() db.exec("INSERT INTO orders (item) VALUES ({i:String})", {i = input.item}) end) end"#),
        ("with_notify", r#"return function(input) db.tx(function()
            db.exec("INSERT INTO orders (item) VALUES ({i:String})", {i = input.item})
            notify.email{to = "a@example.test", subject = "order " .. input.item, markdown = "Thanks for **" .. input.item .. "**"}
          end) end"#),
        ("outside_tx", r#"return function(input)
            db.exec("INSERT INTO orders (item) VALUES ({i:String})", {i = input.item})
            notify.email{to = "a@example.test", subject = "order " .. input.item, markdown = "Thanks for **" .. input.item .. "**"}
          end"#),
    ] {
        let r = common::put_fn(&c, &s.url, name, src).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let mut mean = std::collections::HashMap::new();
    // Interleaved rounds so drift (other load on the machine) hits every variant alike.
    let mut total = std::collections::HashMap::<&str, Duration>::new();
    for _ in 0..20 {
        let r = common::call_fn(&c, &s.url, "plain", json!({"item": "warm"})).await;
        assert_eq!(r.status, 200);
    }
    for round in 0..calls {
        for name in ["plain", "with_notify", "outside_tx"] {
            let t = Instant::now();
            let r = common::call_fn(&c, &s.url, name, json!({"item": format!("i{round}")})).await;
            *total.entry(name).or_default() += t.elapsed();
            assert_eq!(r.status, 200, "{}", r.body);
        }
    }
    for (k, v) in &total {
        mean.insert(*k, v.as_secs_f64() * 1e3 / calls as f64);
    }
    println!(
        "notify cost in the calling transaction ({calls} calls each): db.tx insert {:.3} ms; + notify.email in the same tx {:.3} ms (ratio {:.2}); \
         insert + notify.email outside db.tx {:.3} ms (ratio {:.2})",
        mean["plain"],
        mean["with_notify"],
        mean["with_notify"] / mean["plain"],
        mean["outside_tx"],
        mean["outside_tx"] / mean["plain"]
    );
}
