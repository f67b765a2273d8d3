//! Inbound-email benchmarks against the real server binary, with lettre as the SMTP client:
//! 1. **receive**: messages/s accepted by the SMTP listener (parsed, DKIM-checked, attachment
//!    written to the file store, stored; handlers off), at concurrency 4, against the same
//!    messages' bytes stored over HTTP (`INSERT ... FORMAT JSONEachRow`, one request each, same
//!    concurrency) — the baseline, same run;
//! 2. **end to end**: messages/s from the first SMTP send to the last `handled`, against the
//!    same number of HTTP calls of the same function with the same input size.
//!
//! `cargo bench --bench email_in`; `BENCH_MESSAGES=500` adjusts it.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lettre::message::header::ContentType;
use lettre::message::{Attachment, MultiPart, SinglePart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde_json::json;

#[path = "../tests/common/mod.rs"]
mod common;

const CONFIG: &str = r#"
[email_in]
rate_per_sender_per_minute = 0.0
poll_secs = 0.05
[email_in.addresses."in@bench.example"]
user = "bench@example.com"
function = "ingest"
"#;

const INGEST: &str = r#"function on_email(email, ctx) return {n = #email.text, att = #email.attachments} end"#;
const CONCURRENCY: usize = 4;

fn message(i: usize, text: &str, att: &[u8]) -> Message {
    Message::builder()
        .from("sender@else.example".parse().unwrap())
        .to("in@bench.example".parse().unwrap())
        .subject(format!("bench {i}"))
        .message_id(Some(format!("<bench-{i}-{}@else.example>", std::process::id())))
        .multipart(
            MultiPart::mixed()
                .singlepart(SinglePart::plain(text.to_string()))
                .singlepart(Attachment::new("data.bin".into()).body(att.to_vec(), ContentType::parse("application/octet-stream").unwrap())),
        )
        .unwrap()
}

async fn start(dir: &std::path::Path, handlers: bool) -> (common::Server, u16) {
    std::fs::write(dir.join("ichibase.toml"), CONFIG).unwrap();
    let h = if handlers { "true" } else { "false" };
    let s = common::Server::start_in(
        dir,
        &["--smtp-listen", "127.0.0.1:0", "--signup-open", "true"],
        &[("ICHIBASE_EMAIL_IN__HANDLERS", h), ("ICHIBASE_POSTERITY", "false")],
    );
    let c = common::client();
    common::signup(&s.url, "bench@example.com").await;
    assert_eq!(common::put_fn(&c, &s.url, "ingest", INGEST).await.status, 200);
    let (_, st) = common::api(&c, "GET", format!("{}/email/status", s.url), None).await;
    let port = st["listening"].as_str().unwrap().rsplit_once(':').unwrap().1.parse().unwrap();
    (s, port)
}

async fn send_all(port: u16, from: usize, n: usize, text: &str, att: &[u8]) {
    let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1").port(port).build();
    futures_util::stream::iter(from..from + n)
        .map(|i| {
            let (t, m) = (transport.clone(), message(i, text, att));
            async move { t.send(m).await.expect("SMTP send") }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
}

async fn count(c: &reqwest::Client, url: &str, status: &str) -> i64 {
    let (_, st) = common::api(c, "GET", format!("{url}/email/status"), None).await;
    st["messages"][status].as_i64().unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("BENCH_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
    let text = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. ".repeat(90); // ~5 KB
    let att: Vec<u8> = (0..20_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let c = common::client();
    let tmp = tempfile::tempdir().unwrap();

    // 1. Receive (handlers off) against storing the same bytes over HTTP.
    let d1 = tmp.path().join("d1");
    std::fs::create_dir_all(&d1).unwrap();
    let (s, port) = start(&d1, false).await;
    send_all(port, 1_000_000, 10, &text, &att).await; // warm up (other Message-IDs)
    let t = Instant::now();
    send_all(port, 0, n, &text, &att).await;
    let smtp_secs = t.elapsed().as_secs_f64();
    assert_eq!(count(&c, &s.url, "pending").await, (n + 10) as i64);
    common::ok(&c, &s.url, "CREATE TABLE raw_mail (id INTEGER PRIMARY KEY, raw TEXT)").await;
    let raws: Vec<String> = (0..n).map(|i| String::from_utf8(message(i, &text, &att).formatted()).unwrap()).collect();
    let t = Instant::now();
    futures_util::stream::iter(raws.iter())
        .map(|raw| {
            let (c, url) = (c.clone(), s.url.clone());
            async move {
                let r = c
                    .post(format!("{url}/"))
                    .query(&[("query", "INSERT INTO raw_mail (raw) FORMAT JSONEachRow")])
                    .body(json!({"raw": raw}).to_string())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    let http_secs = t.elapsed().as_secs_f64();
    let size = raws[0].len();
    println!(
        "email_in receive: {n} messages of {size} bytes (5 KB text + 20 KB attachment) over SMTP in {smtp_secs:.2} s = {:.0} msg/s; \
         the same bytes stored over HTTP {:.0} msg/s; ratio {:.2}",
        n as f64 / smtp_secs,
        n as f64 / http_secs,
        http_secs / smtp_secs
    );
    drop(s);

    // 2. End to end (handlers on) against calling the function over HTTP.
    let d2 = tmp.path().join("d2");
    std::fs::create_dir_all(&d2).unwrap();
    let (s, port) = start(&d2, true).await;
    let t = Instant::now();
    send_all(port, 0, n, &text, &att).await;
    let deadline = Instant::now() + Duration::from_secs(1200);
    while count(&c, &s.url, "handled").await < n as i64 {
        assert!(Instant::now() < deadline, "messages were not handled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let e2e_secs = t.elapsed().as_secs_f64();
    let plain = r#"return function(input) return {n = #input.email.text, att = #input.email.attachments} end"#;
    assert_eq!(common::put_fn(&c, &s.url, "direct", plain).await.status, 200);
    let input = json!({"event": "email", "email": {"text": text, "attachments": [{"name": "data.bin", "size": att.len()}]}});
    let t = Instant::now();
    futures_util::stream::iter(0..n)
        .map(|_| {
            let (c, url, input) = (c.clone(), s.url.clone(), input.clone());
            async move {
                let r = common::call_fn(&c, &url, "direct", input).await;
                assert_eq!(r.status, 200, "{}", r.body);
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    let call_secs = t.elapsed().as_secs_f64();
    println!(
        "email_in end to end: {n} messages from the first SMTP send to the last handled in {e2e_secs:.2} s = {:.0} msg/s; \
         {n} HTTP calls of the same function {:.0} calls/s; ratio {:.2}",
        n as f64 / e2e_secs,
        n as f64 / call_secs,
        call_secs / e2e_secs
    );
}
