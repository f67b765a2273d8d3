//! Notifications against real peers: an aiosmtpd SMTP server that parses the MIME
//! (tests/notify_peers/smtp_sink.py), a push service that checks the VAPID JWT and decrypts the
//! RFC 8291 payload with `http_ece` (tests/notify_peers/push_service.py), and a Twilio-style SMS
//! API served by this test. The outbox: rollback sends nothing, a peer that is down gets
//! retries and one copy when it returns, dead letters, idempotency keys, and kill -9 during a
//! burst of 1,000 messages.
//!
//! The Python peers need `ICHIBASE_NOTIFY_PYTHON` (set by scripts/peers/notify.sh).

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// The interpreter with aiosmtpd, http_ece and cryptography; `None` (test skipped) when it is
/// not set up, unless `CI` or `ICHIBASE_REQUIRE_PEERS` demand the peers.
fn python() -> Option<String> {
    match std::env::var("ICHIBASE_NOTIFY_PYTHON") {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            if std::env::var_os("CI").is_some() || std::env::var_os("ICHIBASE_REQUIRE_PEERS").is_some() {
                panic!("ICHIBASE_NOTIFY_PYTHON is not set: source scripts/peers/notify.sh (scripts/test does)");
            }
            eprintln!("skipped: peer missing (ICHIBASE_NOTIFY_PYTHON; see scripts/peers/notify.sh)");
            None
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn peer_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/notify_peers").join(name)
}

/// A peer process, killed when dropped.
struct Peer(Child);

impl Peer {
    fn start(py: &str, script: &str, args: &[&str]) -> Peer {
        let mut child = Command::new(py)
            .arg(peer_script(script))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start peer");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        match lines.next() {
            Some(Ok(l)) if l.trim() == "ready" => {}
            other => panic!("{script} did not start: {other:?}"),
        }
        std::thread::spawn(move || for _ in lines {});
        Peer(child)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An SMTP sink on `port` writing to `out`.
fn smtp_sink(py: &str, port: u16, out: &Path) -> Peer {
    Peer::start(py, "smtp_sink.py", &[&port.to_string(), out.to_str().unwrap()])
}

/// Environment of a server whose mail goes to 127.0.0.1:`smtp_port`, with quick retries.
fn notify_env(smtp_port: u16, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v = vec![
        ("ICHIBASE_NOTIFY__SMTP_URL".to_string(), format!("smtp://127.0.0.1:{smtp_port}")),
        ("ICHIBASE_NOTIFY__FROM".to_string(), "Ichibase App <app@example.test>".to_string()),
        ("ICHIBASE_NOTIFY__BACKOFF_BASE_SECS".to_string(), "0.2".to_string()),
        ("ICHIBASE_NOTIFY__BACKOFF_MAX_SECS".to_string(), "1".to_string()),
        ("ICHIBASE_NOTIFY__POLL_SECS".to_string(), "0.2".to_string()),
        ("ICHIBASE_NOTIFY__SMTP_TIMEOUT_SECS".to_string(), "5".to_string()),
    ];
    for (k, val) in extra {
        v.retain(|(kk, _)| kk != k);
        v.push((k.to_string(), val.to_string()));
    }
    v
}

fn start_server(dir: &Path, env: &[(String, String)]) -> Server {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Server::start_in(dir, &["--signup-open", "true", "--posterity-flush-secs", "0.2"], &env)
}

async fn message(base: &str, id: &str) -> Value {
    let (st, v) = api(&client(), "GET", format!("{base}/notify/messages/{id}"), None).await;
    assert_eq!(st, 200, "{v}");
    v
}

async fn wait_status(base: &str, id: &str, status: &str, secs: u64) -> Value {
    wait_for(&format!("message {id} to be {status}"), secs, || async {
        let m = message(base, id).await;
        (m["status"] == status).then_some(m)
    })
    .await
}

async fn deploy(base: &str, name: &str, src: &str) {
    let r = put_fn(&client(), base, name, src).await;
    assert_eq!(r.status, 200, "deploy {name}: {}", r.body);
}

const SEND_MAIL: &str = r#"return function(input)
  local id = notify.email{to = input.to, subject = input.subject, text = input.text,
    markdown = input.markdown, idempotency_key = input.key}
  return {id = id}
end"#;

#[tokio::test]
async fn email_with_markdown_attachment_and_reply_to_reaches_smtp() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (port, out) = (free_port(), tmp.path().join("mail.jsonl"));
    let _sink = smtp_sink(&py, port, &out);
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let s = start_server(&data, &notify_env(port, &[]));
    let base = s.url.clone();
    deploy(&base, "digest", r##"return function(input)
      local id = notify.email{
        to = {"Ann <ann@example.test>", "bob@example.test"}, cc = "carol@example.test", bcc = {"dave@example.test"},
        subject = "Daily digest ✓", markdown = "# Digest\n\nYou have **3** new notes.\n\n<script>x</script>",
        reply_to = "support@example.test",
        attachments = {{filename = "notes.csv", content = "a,b\n1,2\n", content_type = "text/csv"},
                       {filename = "blob.bin", content = "\0\1\2\255"}}}
      return {id = id}
    end"##).await;
    let r = call_fn(&client(), &base, "digest", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let m = wait_status(&base, &id, "sent", 60).await;
    assert_eq!(m["attempts"], 1, "{m}");
    assert_eq!(m["channel"], "email");
    let got = mails(&out);
    assert_eq!(got.len(), 1, "{got:?}");
    let g = &got[0];
    assert!(g.get("mime_error").is_none(), "the MIME did not check out: {g}");
    assert_eq!(g["message_id"], format!("<{id}@example.test>"));
    assert_eq!(g["subject"], "Daily digest ✓");
    assert!(g["from"].as_str().unwrap().contains("app@example.test"), "{g}");
    assert!(g["to"].as_str().unwrap().contains("ann@example.test") && g["to"].as_str().unwrap().contains("bob@example.test"));
    assert_eq!(g["cc"], "carol@example.test");
    assert_eq!(g["bcc_header"], false, "Bcc must not be in the headers");
    assert_eq!(g["reply_to"], "support@example.test");
    let rcpt: HashSet<&str> = g["rcpt_tos"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(rcpt, HashSet::from(["ann@example.test", "bob@example.test", "carol@example.test", "dave@example.test"]));
    assert_eq!(g["content_type"], "multipart/mixed");
    let parts = g["parts"].as_array().unwrap();
    let find = |ct: &str| parts.iter().find(|p| p["content_type"] == ct && p["filename"].is_null()).unwrap_or_else(|| panic!("no {ct} part: {g}"));
    assert!(parts.iter().any(|p| p["content_type"] == "multipart/alternative"), "{g}");
    assert!(find("text/plain")["text"].as_str().unwrap().contains("You have **3** new notes."));
    let html = find("text/html")["text"].as_str().unwrap();
    assert!(html.contains("<h1>Digest</h1>") && html.contains("<strong>3</strong>"), "{html}");
    assert!(!html.contains("<script>"), "raw HTML in Markdown must be escaped: {html}");
    let att = |name: &str| parts.iter().find(|p| p["filename"] == name).unwrap_or_else(|| panic!("no attachment {name}: {g}"));
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    assert_eq!(b64.decode(att("notes.csv")["base64"].as_str().unwrap()).unwrap(), b"a,b\n1,2\n");
    assert_eq!(att("notes.csv")["content_type"], "text/csv");
    assert_eq!(b64.decode(att("blob.bin")["base64"].as_str().unwrap()).unwrap(), [0u8, 1, 2, 255]);

    // Plain text and HTML given directly.
    deploy(&base, "mail", SEND_MAIL).await;
    let r = call_fn(&client(), &base, "mail", json!({"to": "x@example.test", "subject": "plain", "text": "just text"})).await;
    let id2 = r.json()["id"].as_str().unwrap().to_string();
    wait_status(&base, &id2, "sent", 60).await;
    let g = mails(&out).into_iter().find(|g| g["subject"] == "plain").unwrap();
    assert_eq!(g["content_type"], "text/plain");
    assert_eq!(g["parts"][0]["text"].as_str().unwrap().trim_end(), "just text");

    // Every message, attempt and outcome is in the posterity log.
    let c = client();
    wait_for("notify rows in the posterity log", 30, || {
        let c = c.clone();
        let base = base.clone();
        let id = id.clone();
        async move {
            let r = c
                .post(format!("{base}/analytics"))
                .body(format!("SELECT outcome FROM log WHERE kind = 'notify' AND (detail->>'id') = '{id}' ORDER BY ts"))
                .send()
                .await
                .unwrap();
            let body = r.text().await.unwrap();
            let mut rows: Vec<&str> = body.lines().collect();
            rows.sort();
            (rows == ["queued", "sent"]).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn starttls_to_a_relay_with_its_own_ca() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (port, out) = (free_port(), tmp.path().join("mail.jsonl"));
    let _sink = Peer::start(&py, "smtp_sink.py", &[&port.to_string(), out.to_str().unwrap(), "--starttls", tmp.path().to_str().unwrap()]);
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let url = format!("smtp://localhost:{port}?tls=required");
    let ca = tmp.path().join("ca.pem");
    let s = start_server(&data, &notify_env(port, &[
        ("ICHIBASE_NOTIFY__SMTP_URL", url.as_str()),
        ("ICHIBASE_NOTIFY__SMTP_CA_FILE", ca.to_str().unwrap()),
    ]));
    deploy(&s.url, "mail", SEND_MAIL).await;
    let r = call_fn(&client(), &s.url, "mail", json!({"to": "a@example.test", "subject": "over TLS", "text": "x"})).await;
    let id = r.json()["id"].as_str().unwrap().to_string();
    wait_status(&s.url, &id, "sent", 60).await;
    let got = mails(&out);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["tls"], true, "the message went over STARTTLS: {}", got[0]);
    drop(s);
    // Without the CA the relay's certificate is refused: retried, never sent in plain text.
    let data2 = tmp.path().join("data2");
    std::fs::create_dir_all(&data2).unwrap();
    let s = start_server(&data2, &notify_env(port, &[("ICHIBASE_NOTIFY__SMTP_URL", url.as_str())]));
    deploy(&s.url, "mail", SEND_MAIL).await;
    let r = call_fn(&client(), &s.url, "mail", json!({"to": "a@example.test", "subject": "untrusted", "text": "x"})).await;
    let id = r.json()["id"].as_str().unwrap().to_string();
    let m = wait_for("a failed TLS attempt", 60, || async {
        let m = message(&s.url, &id).await;
        (m["attempts"].as_i64().unwrap() >= 1 && !m["last_error"].is_null()).then_some(m)
    })
    .await;
    assert_ne!(m["status"], "sent", "{m}");
    assert_eq!(mails(&out).len(), 1, "nothing sent to an untrusted relay");
}

#[tokio::test]
async fn rolled_back_or_failed_invocations_send_nothing() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (port, out) = (free_port(), tmp.path().join("mail.jsonl"));
    let _sink = smtp_sink(&py, port, &out);
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let s = start_server(&data, &notify_env(port, &[]));
    let base = s.url.clone();
    ok(&client(), &base, "CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT)").await;
    deploy(&base, "order", r#"return function(input)
      local ids = {}
      if input.tx then
        local ok, err = pcall(db.tx, function()
          db.exec("INSERT INTO orders (item) VALUES ({i:String})", {i = input.item})
          ids[#ids + 1] = notify.email{to = "a@example.test", subject = input.item, text = "tx"}
          pcall(db.tx, function()
            ids[#ids + 1] = notify.email{to = "a@example.test", subject = input.item .. " nested", text = "nested"}
            if input.fail_nested then error("undo the nested one") end
          end)
          if input.fail then error("roll back") end
        end)
        if not ok then error(err) end
      else
        ids[#ids + 1] = notify.email{to = "a@example.test", subject = input.item, text = "no tx"}
        if input.fail then error("the invocation fails after queueing") end
      end
      return {ids = ids}
    end"#).await;
    let c = client();
    // A transaction that rolls back, and an invocation that fails outside db.tx.
    let r = call_fn(&c, &base, "order", json!({"tx": true, "fail": true, "item": "rolled back"})).await;
    assert_ne!(r.status, 200, "{}", r.body);
    let r = call_fn(&c, &base, "order", json!({"tx": false, "fail": true, "item": "failed"})).await;
    assert_ne!(r.status, 200, "{}", r.body);
    // A nested db.tx that rolls back undoes only its own message.
    let r = call_fn(&c, &base, "order", json!({"tx": true, "fail_nested": true, "item": "outer kept"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let undone = r.json()["ids"][1].as_str().unwrap().to_string();
    // Committed: both messages.
    let r = call_fn(&c, &base, "order", json!({"tx": true, "item": "committed"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ids: Vec<String> = r.json()["ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    for id in &ids {
        wait_status(&base, id, "sent", 60).await;
    }
    let r = call_fn(&c, &base, "order", json!({"tx": false, "item": "marker"})).await;
    let marker = r.json()["ids"][0].as_str().unwrap().to_string();
    wait_status(&base, &marker, "sent", 60).await;
    let mut subjects: Vec<String> = mails(&out).iter().map(|g| g["subject"].as_str().unwrap().to_string()).collect();
    subjects.sort();
    assert_eq!(subjects, ["committed", "committed nested", "marker", "outer kept"]);
    let (st, v) = api(&c, "GET", format!("{base}/notify/messages"), None).await;
    assert_eq!(st, 200);
    assert_eq!(v["messages"].as_array().unwrap().len(), 4, "only committed messages exist: {v}");
    let (st, _) = api(&c, "GET", format!("{base}/notify/messages/{undone}"), None).await;
    assert_eq!(st, 404, "the nested transaction's message was rolled back with it");
    assert_eq!(post(&c, &base, &[], "SELECT count(*) FROM orders").await.body.trim(), "2");
}

#[tokio::test]
async fn smtp_down_retries_then_delivers_once_and_dead_letters() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (port, out) = (free_port(), tmp.path().join("mail.jsonl"));
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let s = start_server(&data, &notify_env(port, &[("ICHIBASE_NOTIFY__MAX_ATTEMPTS", "40")]));
    let base = s.url.clone();
    deploy(&base, "mail", SEND_MAIL).await;
    let r = call_fn(&client(), &base, "mail", json!({"to": "a@example.test", "subject": "while down", "text": "x"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    // The relay is down: attempts pile up with an error and a back-off.
    let m = wait_for("two failed attempts", 60, || async {
        let m = message(&base, &id).await;
        (m["attempts"].as_i64().unwrap() >= 2).then_some(m)
    })
    .await;
    assert_eq!(m["status"], "queued", "{m}");
    assert!(m["last_error"].as_str().unwrap().contains("SMTP"), "{m}");
    // The relay comes back: delivered, once.
    let _sink = smtp_sink(&py, port, &out);
    let m = wait_status(&base, &id, "sent", 60).await;
    assert!(m["attempts"].as_i64().unwrap() >= 2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = mails(&out);
    assert_eq!(got.len(), 1, "delivered exactly once: {got:?}");
    drop(s);

    // A relay that never comes back: dead after max_attempts.
    let data2 = tmp.path().join("data2");
    std::fs::create_dir_all(&data2).unwrap();
    let s = start_server(&data2, &notify_env(free_port(), &[("ICHIBASE_NOTIFY__MAX_ATTEMPTS", "3")]));
    deploy(&s.url, "mail", SEND_MAIL).await;
    let r = call_fn(&client(), &s.url, "mail", json!({"to": "a@example.test", "subject": "never", "text": "x"})).await;
    let id = r.json()["id"].as_str().unwrap().to_string();
    let m = wait_status(&s.url, &id, "dead", 60).await;
    assert_eq!(m["attempts"], 3, "{m}");
    let (_, v) = api(&client(), "GET", format!("{}/notify/messages?status=dead", s.url), None).await;
    assert_eq!(v["messages"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn idempotency_key_queues_once() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (port, out) = (free_port(), tmp.path().join("mail.jsonl"));
    let _sink = smtp_sink(&py, port, &out);
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let s = start_server(&data, &notify_env(port, &[]));
    let base = s.url.clone();
    deploy(&base, "mail", SEND_MAIL).await;
    deploy(&base, "mail_tx", r#"return function(input)
      local a, b
      db.tx(function()
        a = notify.email{to = "a@example.test", subject = "tx", text = "x", idempotency_key = input.key}
        b = notify.email{to = "a@example.test", subject = "tx", text = "x", idempotency_key = input.key}
      end)
      return {a = a, b = b}
    end"#).await;
    let input = json!({"to": "a@example.test", "subject": "once", "text": "x", "key": "digest-2026-12-01"});
    let a = call_fn(&client(), &base, "mail", input.clone()).await.json()["id"].as_str().unwrap().to_string();
    let b = call_fn(&client(), &base, "mail", input).await.json()["id"].as_str().unwrap().to_string();
    assert_eq!(a, b);
    let r = call_fn(&client(), &base, "mail_tx", json!({"key": "k2"})).await.json();
    assert_eq!(r["a"], r["b"], "{r}");
    wait_status(&base, &a, "sent", 60).await;
    wait_status(&base, r["a"].as_str().unwrap(), "sent", 60).await;
    assert_eq!(mails(&out).len(), 2);
}

#[tokio::test]
async fn bad_arguments_and_unconfigured_channels_are_typed_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start_server(tmp.path(), &[]);
    let base = s.url.clone();
    deploy(&base, "n", r#"return function(input)
      local f = load("return " .. input.call, "call", "t", _ENV)
      return {id = f()}
    end"#).await;
    let call = |c: &'static str| {
        let base = base.clone();
        async move { call_fn(&client(), &base, "n", json!({"call": c})).await }
    };
    let r = call("notify.email{to='a@example.test', subject='s', text='t'}").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("NOTIFY_NOT_CONFIGURED") && r.body.contains("smtp_url"), "{}", r.body);
    let r = call("notify.sms{to='+15551234567', body='hi'}").await;
    assert_eq!(r.status, 503, "{}", r.body);
    drop(s);
    let tmp = tempfile::tempdir().unwrap();
    let s = start_server(tmp.path(), &notify_env(free_port(), &[
        ("ICHIBASE_NOTIFY__SMS_URL", "http://127.0.0.1:9"),
        ("ICHIBASE_NOTIFY__SMS_ACCOUNT_SID", "AC1"),
        ("ICHIBASE_NOTIFY__SMS_AUTH_TOKEN", "t"),
        ("ICHIBASE_NOTIFY__SMS_FROM", "\"+15550000000\""),
        ("ICHIBASE_NOTIFY__MAX_BYTES_PER_INVOCATION", "1000000"),
    ]));
    let base = s.url.clone();
    deploy(&base, "n", r#"return function(input)
      local f = load("return " .. input.call, "call", "t", _ENV)
      return {id = f()}
    end"#).await;
    for (c, needle) in [
        ("notify.email{to='not an address', subject='s', text='t'}", "not an email address"),
        ("notify.email{to='a@example.test', subject='s'}", "text=, markdown= or html="),
        ("notify.email{to='a@example.test', subject='s', text='t', colour='red'}", "unknown field"),
        ("notify.email{to='a@example.test', subject='a\\r\\nBcc: x@evil.test', text='t'}", "line breaks"),
        ("notify.email{to={}, subject='s', text='t'}", "at least one address"),
        ("notify.email{to='a@example.test', subject={}, text='t'}", "must be a string"),
        ("notify.email{to='a@example.test', subject='s', text='t', attachments={{filename='a'}}}", "content="),
        ("notify.email('nope')", ""),
        ("notify.push{title='x'}", "user= is required"),
        ("notify.push{user='u', title=string.rep('x', 4000)}", ""),
        ("notify.sms{to='555', body='x'}", "E.164"),
        ("notify.sms{to='+15551234567', body=''}", "1 to 1600"),
        ("notify.email{to='a@example.test', subject='s', text='t', idempotency_key=''}", "idempotency_key"),
        ("(function() local big = string.rep('x', 300000) for i = 1, 10 do notify.email{to='a@example.test', subject='s', text=big} end end)()", "max_bytes_per_invocation"),
    ] {
        let base = base.clone();
        let r = call_fn(&client(), &base, "n", json!({"call": c})).await;
        assert!((400..500).contains(&r.status), "{c}: {} {}", r.status, r.body);
        assert!(r.body.contains(needle), "{c}: {}", r.body);
    }
    // Nothing was queued by the refused calls.
    let (_, v) = api(&client(), "GET", format!("{base}/notify/messages"), None).await;
    assert_eq!(v["messages"].as_array().unwrap().len(), 0, "{v}");
    let (st, v) = api(&client(), "GET", format!("{base}/notify/messages?status=bogus"), None).await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = api(&client(), "GET", format!("{base}/notify/messages?colour=red"), None).await;
    assert_eq!(st, 400, "{v}");
    // Status of an unknown message.
    let (st, v) = api(&client(), "GET", format!("{base}/notify/messages/nope"), None).await;
    assert_eq!(st, 404, "{v}");
    // Anonymous callers have no messages.
    let (st, _) = api(&anon_client(), "GET", format!("{base}/notify/messages"), None).await;
    assert_eq!(st, 403);
}

/// The Twilio-style SMS API subset, served here: `POST /2010-04-01/Accounts/{sid}/Messages.json`.
#[derive(Default)]
struct SmsApi {
    received: Vec<HashMap<String, String>>,
    keys: HashSet<String>,
    /// Answer 503 to this many requests first.
    fail_next: usize,
    duplicates: usize,
}

async fn sms_api(state: Arc<Mutex<SmsApi>>) -> u16 {
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/2010-04-01/Accounts/{sid}/Messages.json",
        post(move |axum::extract::Path(sid): axum::extract::Path<String>, headers: HeaderMap, body: axum::body::Bytes| {
            let state = Arc::clone(&state);
            async move {
                use base64::Engine as _;
                let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
                let want = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{sid}:secret-token")));
                if sid != "AC123" || auth != want {
                    return (StatusCode::UNAUTHORIZED, axum::Json(json!({"code": 20003, "message": "Authenticate"})));
                }
                let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
                let mut st = state.lock().unwrap();
                if st.fail_next > 0 {
                    st.fail_next -= 1;
                    return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"code": 20500, "message": "Internal Server Error"})));
                }
                if !form.get("To").is_some_and(|t| t.starts_with("+1555")) {
                    return (StatusCode::BAD_REQUEST, axum::Json(json!({"code": 21211, "message": "Invalid 'To' Phone Number"})));
                }
                let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                if !key.is_empty() && !st.keys.insert(key) {
                    st.duplicates += 1;
                } else {
                    st.received.push(form.clone());
                }
                let sid = format!("SM{:032}", st.received.len());
                (StatusCode::CREATED, axum::Json(json!({"sid": sid, "status": "queued", "to": form.get("To"), "body": form.get("Body")})))
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    port
}

#[tokio::test]
async fn sms_through_a_twilio_style_api() {
    let state = Arc::new(Mutex::new(SmsApi { fail_next: 2, ..Default::default() }));
    let port = sms_api(Arc::clone(&state)).await;
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}/2010-04-01");
    let s = start_server(tmp.path(), &notify_env(free_port(), &[
        ("ICHIBASE_NOTIFY__SMS_URL", url.as_str()),
        ("ICHIBASE_NOTIFY__SMS_ACCOUNT_SID", "AC123"),
        ("ICHIBASE_NOTIFY__SMS_AUTH_TOKEN", "secret-token"),
        ("ICHIBASE_NOTIFY__SMS_FROM", "\"+15550001111\""),
    ]));
    let base = s.url.clone();
    deploy(&base, "text", r#"return function(input) return {id = notify.sms{to = input.to, body = input.body}} end"#).await;
    // The provider fails twice (503), then accepts: one message, after retries.
    let r = call_fn(&client(), &base, "text", json!({"to": "+15551234567", "body": "Server room is on fire 🔥"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let m = wait_status(&base, &id, "sent", 60).await;
    assert_eq!(m["attempts"], 3, "{m}");
    assert!(m["result"]["sid"].as_str().unwrap().starts_with("SM"), "{m}");
    {
        let st = state.lock().unwrap();
        assert_eq!(st.received.len(), 1);
        let f = &st.received[0];
        assert_eq!(f["To"], "+15551234567");
        assert_eq!(f["From"], "+15550001111");
        assert_eq!(f["Body"], "Server room is on fire 🔥");
    }
    // The provider refuses the number (400): dead at once, with its message.
    let r = call_fn(&client(), &base, "text", json!({"to": "+4930123456", "body": "hi"})).await;
    let id = r.json()["id"].as_str().unwrap().to_string();
    let m = wait_status(&base, &id, "dead", 60).await;
    assert_eq!(m["attempts"], 1, "{m}");
    assert!(m["last_error"].as_str().unwrap().contains("Invalid 'To' Phone Number"), "{m}");
}

#[tokio::test]
async fn web_push_is_encrypted_signed_and_reaches_every_device() {
    let Some(py) = python() else { return };
    let push_port = free_port();
    let _push = Peer::start(&py, "push_service.py", &[&push_port.to_string()]);
    let tmp = tempfile::tempdir().unwrap();
    let env = notify_env(free_port(), &[("ICHIBASE_NOTIFY__VAPID_SUBJECT", "mailto:ops@example.test")]);
    let mut s = start_server(tmp.path(), &env);
    let base = s.url.clone();
    let peer = format!("http://127.0.0.1:{push_port}");
    let (st, key) = api(&anon_client(), "GET", format!("{base}/notify/push/vapid"), None).await;
    assert_eq!(st, 200, "{key}");
    let vapid_key = key["public_key"].as_str().unwrap().to_string();
    assert_eq!(vapid_key.len(), 87, "an uncompressed P-256 point, base64url: {vapid_key}");

    let ann = signup(&base, "ann@example.test").await;
    let bob = signup(&base, "bob@example.test").await;
    for device in ["phone", "laptop", "gone-tablet", "flaky-watch"] {
        let (_, sub) = api(&anon_client(), "GET", format!("{peer}/subscribe/{device}"), None).await;
        let mut body = sub.clone();
        body["device"] = json!(device);
        let (st, v) = api(&ann.client, "POST", format!("{base}/notify/push/subscriptions"), Some(body)).await;
        assert_eq!(st, 200, "{v}");
    }
    let (_, sub) = api(&anon_client(), "GET", format!("{peer}/subscribe/bob-phone"), None).await;
    let (st, _) = api(&bob.client, "POST", format!("{base}/notify/push/subscriptions"), Some(sub)).await;
    assert_eq!(st, 200);
    // Bad subscriptions are refused.
    let (st, v) = api(&ann.client, "POST", format!("{base}/notify/push/subscriptions"),
        Some(json!({"endpoint": "ftp://x", "keys": {"p256dh": "AAAA", "auth": "AAAA"}}))).await;
    assert_eq!(st, 400, "{v}");
    let (st, _) = api(&anon_client(), "POST", format!("{base}/notify/push/subscriptions"),
        Some(json!({"endpoint": "http://x", "keys": {"p256dh": "AAAA", "auth": "AAAA"}}))).await;
    assert_eq!(st, 403);
    let (_, v) = api(&ann.client, "GET", format!("{base}/notify/push/subscriptions"), None).await;
    assert_eq!(v["subscriptions"].as_array().unwrap().len(), 4, "a user sees their own: {v}");

    deploy(&base, "ready", r#"return function(input)
      return {id = notify.push{user = input.user, title = "Your summary is ready", body = "3 new notes", url = "/summary/today"}}
    end"#).await;
    let r = call_fn(&ann.client, &base, "ready", json!({"user": ann.id})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let m = wait_status(&base, &id, "sent", 60).await;
    assert_eq!(m["attempts"], 2, "the flaky device needs a second attempt: {m}");
    let delivered: HashSet<&str> = m["result"]["delivered"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(delivered, HashSet::from(["phone", "laptop", "flaky-watch"]), "{m}");
    assert_eq!(m["result"]["gone"][0]["device"], "gone-tablet", "{m}");

    let (_, got) = api(&anon_client(), "GET", format!("{peer}/received"), None).await;
    let got = got.as_array().unwrap().clone();
    for r in &got {
        assert!(r.get("error").is_none(), "the push service refused a push: {r}");
    }
    let devices: Vec<&str> = got.iter().map(|r| r["device"].as_str().unwrap()).collect();
    assert_eq!(devices.len(), 3, "one push per device, no resend to devices already reached: {devices:?}");
    for r in &got {
        assert_eq!(r["payload"]["title"], "Your summary is ready");
        assert_eq!(r["payload"]["body"], "3 new notes");
        assert_eq!(r["payload"]["url"], "/summary/today");
        assert_eq!(r["payload"]["id"], id);
        assert_eq!(r["vapid_k"], vapid_key.as_str());
        assert_eq!(r["aud"], peer.as_str());
        assert_eq!(r["sub"], "mailto:ops@example.test");
        assert_eq!(r["ttl"], 86400);
    }
    // The expired subscription (410) was removed; bob's device got nothing.
    let (_, v) = api(&ann.client, "GET", format!("{base}/notify/push/subscriptions"), None).await;
    let left: HashSet<&str> = v["subscriptions"].as_array().unwrap().iter().map(|s| s["device"].as_str().unwrap()).collect();
    assert_eq!(left, HashSet::from(["phone", "laptop", "flaky-watch"]));
    // The admin sees every user's subscriptions; a user deletes their own.
    let (_, v) = api(&client(), "GET", format!("{base}/notify/push/subscriptions"), None).await;
    assert_eq!(v["subscriptions"].as_array().unwrap().len(), 4);
    let (st, _) = api(&ann.client, "DELETE", format!("{base}/notify/push/subscriptions/laptop"), None).await;
    assert_eq!(st, 200);
    let (st, _) = api(&ann.client, "DELETE", format!("{base}/notify/push/subscriptions/laptop"), None).await;
    assert_eq!(st, 404);

    // A user sees their own messages only.
    let (st, v) = api(&ann.client, "GET", format!("{base}/notify/messages/{id}"), None).await;
    assert_eq!(st, 200, "{v}");
    let (st, _) = api(&bob.client, "GET", format!("{base}/notify/messages/{id}"), None).await;
    assert_eq!(st, 404);
    let (_, v) = api(&bob.client, "GET", format!("{base}/notify/messages"), None).await;
    assert_eq!(v["messages"].as_array().unwrap().len(), 0);
    // ... also from Lua.
    deploy(&base, "st", "return function(input) return {m = notify.status(input.id)} end").await;
    let r = call_fn(&ann.client, &base, "st", json!({"id": id})).await.json();
    assert_eq!(r["m"]["status"], "sent", "{r}");
    let r = call_fn(&bob.client, &base, "st", json!({"id": id})).await.json();
    assert!(r["m"].is_null(), "{r}");

    // The VAPID key is kept across restarts.
    s.terminate();
    let s = start_server(tmp.path(), &env);
    let (_, key2) = api(&anon_client(), "GET", format!("{}/notify/push/vapid", s.url), None).await;
    assert_eq!(key2["public_key"], vapid_key.as_str());
}

#[tokio::test]
async fn kill_9_during_a_burst_of_1000_loses_nothing() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (port, out) = (free_port(), tmp.path().join("mail.jsonl"));
    let _sink = smtp_sink(&py, port, &out);
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let env = notify_env(port, &[]);
    let mut s = start_server(&data, &env);
    let base = s.url.clone();
    deploy(&base, "burst", r#"return function(input)
      db.tx(function()
        for i = 1, input.n do
          local k = "burst-" .. (input.start + i)
          notify.email{to = "load@example.test", subject = k, text = "message " .. k, idempotency_key = k}
        end
      end)
      return {ok = true}
    end"#).await;
    const CALLS: usize = 20;
    const PER: usize = 50;
    // The burst: 20 transactions of 50 messages each, while the server is killed.
    let acked = Arc::new(Mutex::new(HashSet::<usize>::new()));
    let (a2, b2) = (Arc::clone(&acked), base.clone());
    let burst = tokio::spawn(async move {
        for call in 0..CALLS {
            let r = client().post(format!("{b2}/fn/burst")).body(json!({"start": call * PER, "n": PER}).to_string()).send().await;
            match r {
                Ok(r) if r.status() == 200 => {
                    a2.lock().unwrap().insert(call);
                }
                _ => break,
            }
        }
    });
    wait_for("part of the burst to arrive", 120, || async { (mails(&out).len() >= 100).then_some(()) }).await;
    let _ = s.child.kill(); // SIGKILL
    let _ = s.child.wait();
    let _ = burst.await;
    let before_restart = mails(&out).len();
    let acked_before: HashSet<usize> = acked.lock().unwrap().clone();
    eprintln!("kill -9 after {before_restart} mails arrived; {} of {CALLS} transactions acknowledged", acked_before.len());

    // Restart; the calls not acknowledged are made again (their keys make that safe).
    let s = start_server(&data, &env);
    let base = s.url.clone();
    for call in (0..CALLS).filter(|c| !acked_before.contains(c)) {
        let r = call_fn(&client(), &base, "burst", json!({"start": call * PER, "n": PER})).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let all = CALLS * PER;
    wait_for("every committed message to arrive", 300, || async {
        let got: HashSet<String> = mails(&out).iter().map(|g| g["subject"].as_str().unwrap().to_string()).collect();
        (got.len() >= all).then_some(())
    })
    .await;
    let got = mails(&out);
    let mut by_subject: HashMap<String, usize> = HashMap::new();
    for g in &got {
        assert!(g.get("mime_error").is_none(), "{g}");
        *by_subject.entry(g["subject"].as_str().unwrap().to_string()).or_default() += 1;
    }
    let expected: HashSet<String> = (1..=all).map(|i| format!("burst-{i}")).collect();
    let subjects: HashSet<String> = by_subject.keys().cloned().collect();
    assert_eq!(subjects, expected, "every committed message, and nothing else, was delivered");
    let duplicates: usize = by_subject.values().map(|n| n - 1).sum();
    // Every message is `sent`; those in flight at the kill are marked in doubt.
    let (_, v) = api(&client(), "GET", format!("{base}/notify/messages?limit=1000"), None).await;
    let msgs = v["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), all);
    wait_for("every message to be recorded as sent", 60, || async {
        let (_, v) = api(&client(), "GET", format!("{base}/notify/messages?status=sent&limit=1000"), None).await;
        (v["messages"].as_array().unwrap().len() == all).then_some(())
    })
    .await;
    let in_doubt = msgs.iter().filter(|m| m["in_doubt"].as_i64().unwrap() > 0).count();
    eprintln!("notify kill -9 report: {all} committed, {} delivered, {duplicates} duplicates, {in_doubt} in doubt at restart", got.len());
    // Only a message in flight at the kill can arrive twice: at most one claimed batch.
    assert!(duplicates <= in_doubt, "{duplicates} duplicates but only {in_doubt} messages were in flight");
    assert!(in_doubt <= 32, "at most one batch ([notify] batch = 32) is in flight: {in_doubt}");
}
