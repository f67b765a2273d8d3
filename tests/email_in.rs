//! Inbound email end to end: Python's `smtplib` (a real SMTP client) sends to the real binary's
//! SMTP listener; messages are stored, their attachments land in the addressed user's file
//! area, and the Lua handler runs as that user. Also: refusals (unknown recipient, relaying,
//! size, recipients, unknown senders), quarantine and release, DKIM signed by dkimpy (an
//! independent signer) verified `pass` / `fail` / `none`, restart with a pending message, and
//! hostile input over a raw socket.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use serde_json::{Value, json};

const PEERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/email_in_peers");

/// The interpreter with dkimpy (scripts/peers/email_in.sh), when set up.
fn dkim_python() -> Option<String> {
    match std::env::var("ICHIBASE_EMAIL_IN_PYTHON") {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            if std::env::var("CI").is_ok() || std::env::var("ICHIBASE_REQUIRE_PEERS").is_ok() {
                panic!("ICHIBASE_EMAIL_IN_PYTHON is not set: source scripts/peers/email_in.sh (dkimpy)");
            }
            None
        }
    }
}

/// Send one message with smtplib (`send.py`); its JSON outcome.
fn send_with(python: &str, spec: Value) -> Value {
    let mut child = Command::new(python)
        .arg(format!("{PEERS}/send.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    child.stdin.take().unwrap().write_all(spec.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "send.py failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("send.py printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn send(spec: Value) -> Value {
    send_with("python3", spec)
}

struct Mail {
    srv: Server,
    smtp: String,
    host: String,
    port: u16,
    admin: reqwest::Client,
    _dir: Option<tempfile::TempDir>,
}

const BASE_CONFIG: &str = r#"
[email_in]
domains = ["in.example.com"]
max_recipients = 5
max_message_bytes = 200000
max_connections_per_ip = 8
rate_burst = 1000.0
poll_secs = 0.5

[email_in.addresses."news@in.example.com"]
user = "alice@example.com"
function = "ingest"

[email_in.addresses."plain@in.example.com"]
user = "alice@example.com"
function = "plain"

[email_in.addresses."strict@in.example.com"]
user = "alice@example.com"
function = "ingest"
senders = ["boss@corp.example"]
unknown_senders = "refuse"

[email_in.addresses."held@in.example.com"]
user = "alice@example.com"
function = "ingest"
senders = ["*@corp.example"]
unknown_senders = "quarantine"
"#;

/// The handler of `news@`: `on_email` with the text, the HTML as text, the attachment read
/// back from the file store, and who it ran as; every run leaves a file under `runs/`.
const INGEST: &str = r#"
function on_email(email, ctx)
  file.put("runs/" .. ctx.trace_id, email.id)
  local att = email.attachments[1]
  return {
    id = email.id, user = ctx.user_id, text = email.text, html_text = email.html_text,
    subject = email.subject, from = email.from, to = email.to, dkim = email.dkim, spf = email.spf,
    message_id = email.message_id, tag = email.tag,
    attachment = att and {name = att.name, content_type = att.content_type, size = att.size, path = att.path,
                          data = att.path and file.get(att.path)},
  }
end
"#;

/// The handler of `plain@`: the `{event = "email", email = ...}` input of a returned function.
const PLAIN: &str = r#"
return function(input, ctx)
  return {event = input.event, subject = input.email.subject, text = input.email.text, user = ctx.user_id}
end
"#;

/// Counts the runs `ingest` left (as the calling user).
const RUNS: &str = r#"return function() return #file.list("runs") end"#;

impl Mail {
    async fn start(extra_config: &str, env: &[(&str, &str)]) -> (Mail, User) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ichibase.toml"), format!("{BASE_CONFIG}\n{extra_config}")).unwrap();
        let mut m = Mail::start_in(dir.path(), env).await;
        m._dir = Some(dir);
        let alice = signup(&m.srv.url, "alice@example.com").await;
        for (name, src) in [("ingest", INGEST), ("plain", PLAIN), ("runs", RUNS)] {
            let r = put_fn(&m.admin, &m.srv.url, name, src).await;
            assert_eq!(r.status, 200, "{name}: {}", r.body);
        }
        (m, alice)
    }

    async fn start_in(dir: &Path, env: &[(&str, &str)]) -> Mail {
        let srv = Server::start_in(dir, &["--smtp-listen", "127.0.0.1:0", "--signup-open", "true"], env);
        let admin = client();
        let (st, j) = api(&admin, "GET", format!("{}/email/status", srv.url), None).await;
        assert_eq!(st, 200, "{j}");
        let smtp = j["listening"].as_str().expect("the SMTP listener is up").to_string();
        let (host, port) = smtp.rsplit_once(':').unwrap();
        let (host, port) = (host.to_string(), port.parse().unwrap());
        Mail { srv, smtp, host, port, admin, _dir: None }
    }

    fn spec(&self, mail_from: &str, rcpts: &[&str]) -> Value {
        json!({"host": self.host, "port": self.port, "mail_from": mail_from, "rcpts": rcpts})
    }

    /// The stored message `id` once `done(status)` holds (polls; generous timeout).
    async fn wait_status(&self, id: &str, done: impl Fn(&str) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (st, j) = api(&self.admin, "GET", format!("{}/email/inbound/{id}", self.srv.url), None).await;
            assert_eq!(st, 200, "{j}");
            if done(j["status"].as_str().unwrap_or("")) {
                return j;
            }
            assert!(Instant::now() < deadline, "message {id} stayed {}: {j}", j["status"]);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn handled(&self, id: &str) -> Value {
        let j = self.wait_status(id, |s| s == "handled" || s == "failed").await;
        assert_eq!(j["status"], "handled", "{j}");
        j
    }
}

/// The stored ids a 250 answer names (`send.py` does not return it): the newest messages.
async fn newest(m: &Mail, n: usize) -> Vec<Value> {
    let (st, j) = api(&m.admin, "GET", format!("{}/email/inbound?limit={n}", m.srv.url), None).await;
    assert_eq!(st, 200, "{j}");
    j["messages"].as_array().unwrap().clone()
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtplib_message_reaches_on_email_with_text_and_attachment() {
    let (m, alice) = Mail::start("", &[]).await;
    let csv = b"title,score\nLua,10\n".to_vec();
    let mut spec = m.spec("writer@news.example", &["news+weekly@in.example.com"]);
    spec["subject"] = json!("Weekly digest 日本語");
    spec["text"] = json!("Hello from the plain part.\nSecond line.");
    spec["html"] = json!("<html><body><h1>Digest</h1><p>Hello from <b>HTML</b>.</p><script>evil()</script></body></html>");
    spec["attachments"] = json!([{"name": "scores.csv", "content_type": "text/csv", "data_b64": b64(&csv)}]);
    spec["message_id"] = json!("<digest-1@news.example>");
    let out = send(spec.clone());
    assert_eq!(out["ok"], true, "{out}");

    let list = newest(&m, 1).await;
    assert_eq!(list.len(), 1);
    let id = list[0]["id"].as_str().unwrap().to_string();
    assert_eq!(list[0]["recipient"], "news+weekly@in.example.com");
    assert_eq!(list[0]["user_id"], alice.id.as_str());
    let j = m.handled(&id).await;
    let r = &j["result"];
    assert_eq!(r["id"], id.as_str());
    assert_eq!(r["user"], alice.id.as_str(), "the handler runs as the addressed user");
    assert!(r["text"].as_str().unwrap().contains("Hello from the plain part."), "{r}");
    let ht = r["html_text"].as_str().unwrap();
    assert!(ht.contains("Hello from HTML") && !ht.contains("evil"), "{ht}");
    assert_eq!(r["subject"], "Weekly digest 日本語");
    assert_eq!(r["from"], "writer@news.example");
    assert_eq!(r["to"], json!(["news+weekly@in.example.com"]));
    assert_eq!(r["message_id"], "digest-1@news.example");
    assert_eq!(r["tag"], "weekly");
    assert_eq!(r["dkim"], "none");
    assert_eq!(r["spf"], "none");
    let att = &r["attachment"];
    assert_eq!(att["name"], "scores.csv");
    assert_eq!(att["content_type"], "text/csv");
    assert_eq!(att["size"], csv.len());
    assert_eq!(att["data"], String::from_utf8(csv.clone()).unwrap(), "file.get reads the stored attachment");
    let path = att["path"].as_str().unwrap();
    assert!(path.starts_with(&format!("email/{id}/")), "{path}");
    // The attachment is in alice's own file area: on disk under users/<id>/.
    let on_disk = m.srv.data_dir.join("files").join("users").join(&alice.id).join(path);
    assert_eq!(std::fs::read(&on_disk).unwrap(), csv);

    // The user sees their message; the raw message is kept.
    let (st, mine) = api(&alice.client, "GET", format!("{}/email/inbound", m.srv.url), None).await;
    assert_eq!(st, 200);
    assert_eq!(mine["messages"].as_array().unwrap().len(), 1);
    let (st, raw) = api(&m.admin, "GET", format!("{}/email/inbound/{id}?raw=1", m.srv.url), None).await;
    assert_eq!(st, 200);
    assert!(raw["raw"].as_str().unwrap().contains("Message-ID: <digest-1@news.example>"));
    let (st, _) = api(&anon_client(), "GET", format!("{}/email/inbound", m.srv.url), None).await;
    assert!(st == 401 || st == 403, "{st}");

    // A resend of the same Message-ID (a client that lost the 250) is not handled again.
    let out = send(spec);
    assert_eq!(out["ok"], true, "{out}");
    let r = call_fn(&alice.client, &m.srv.url, "runs", json!(null)).await;
    assert_eq!(r.body, "1", "one handler run for one message");
    assert_eq!(newest(&m, 10).await.len(), 1);

    // The `{event = "email", email = ...}` input of a returned function.
    let mut spec = m.spec("writer@news.example", &["plain@in.example.com"]);
    spec["subject"] = json!("Plain one");
    spec["html"] = json!("<p>Only <i>html</i> here</p>");
    spec["text"] = json!("");
    let out = send(spec);
    assert_eq!(out["ok"], true, "{out}");
    let id = newest(&m, 1).await[0]["id"].as_str().unwrap().to_string();
    let j = m.handled(&id).await;
    assert_eq!(j["result"]["event"], "email");
    assert_eq!(j["result"]["subject"], "Plain one");
    assert_eq!(j["result"]["user"], alice.id.as_str());

    // Every message is in the posterity log.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = m.admin.post(format!("{}/analytics", m.srv.url))
            .body("SELECT DISTINCT outcome FROM log WHERE kind = 'email_in' ORDER BY outcome")
            .send().await.unwrap().text().await.unwrap();
        let rows: Vec<&str> = r.lines().collect();
        if ["accepted", "duplicate", "handled"].iter().all(|o| rows.contains(o)) {
            break;
        }
        assert!(Instant::now() < deadline, "email_in rows in the posterity log: {rows:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_quarantine() {
    let (m, alice) = Mail::start("", &[]).await;
    // Unknown recipient and another domain: 550 at RCPT.
    let out = send(m.spec("a@x.example", &["nobody@in.example.com"]));
    assert_eq!(out["error"], "recipients_refused", "{out}");
    assert_eq!(out["refused"]["nobody@in.example.com"][0], 550);
    let out = send(m.spec("a@x.example", &["someone@elsewhere.example"]));
    assert_eq!(out["refused"]["someone@elsewhere.example"][0], 550, "{out}");
    assert!(out["refused"]["someone@elsewhere.example"][1].as_str().unwrap().contains("Relaying denied"));
    // One good and one bad recipient: the good one gets it.
    let mut spec = m.spec("a@x.example", &["nobody@in.example.com", "plain@in.example.com"]);
    spec["text"] = json!("partly");
    let out = send(spec);
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["refused"]["nobody@in.example.com"][0], 550);

    // Oversized: smtplib declares SIZE= and is refused at MAIL (552).
    let mut spec = m.spec("a@x.example", &["plain@in.example.com"]);
    spec["text"] = json!("x".repeat(300_000));
    let out = send(spec);
    assert_eq!(out["code"], 552, "{out}");

    // Too many recipients: 452 past max_recipients (5).
    let many: Vec<String> = (0..8).map(|i| format!("news+{i}@in.example.com")).collect();
    let mut s = TcpStream::connect(&m.smtp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    expect(&mut r, "220");
    cmd(&mut s, &mut r, "EHLO test", "250");
    cmd(&mut s, &mut r, "MAIL FROM:<a@x.example>", "250");
    for _ in 0..5 {
        cmd(&mut s, &mut r, "RCPT TO:<plain@in.example.com>", "250"); // the same one: counted once
    }
    let mut codes = Vec::new();
    for a in &many {
        writeln!(s, "RCPT TO:<{a}>\r").unwrap();
        codes.push(line(&mut r)[..3].to_string());
    }
    // plain@ and four news+N@: five; the rest wait for another transaction.
    assert!(codes[..4].iter().all(|c| c == "250"), "{codes:?}");
    assert!(codes[4..].iter().all(|c| c == "452"), "{codes:?}");
    cmd(&mut s, &mut r, "RSET", "250");
    cmd(&mut s, &mut r, "QUIT", "221");

    // The sender allowlist: refused for `strict@`, quarantined for `held@`.
    let out = send(m.spec("stranger@x.example", &["strict@in.example.com"]));
    assert_eq!(out["refused"]["strict@in.example.com"][0], 550, "{out}");
    let mut spec = m.spec("boss@corp.example", &["strict@in.example.com"]);
    spec["subject"] = json!("from the boss");
    assert_eq!(send(spec)["ok"], true);
    let id = newest(&m, 1).await[0]["id"].as_str().unwrap().to_string();
    m.handled(&id).await;

    let mut spec = m.spec("stranger@x.example", &["held@in.example.com"]);
    spec["subject"] = json!("held one");
    assert_eq!(send(spec)["ok"], true);
    let held = newest(&m, 1).await[0].clone();
    let id = held["id"].as_str().unwrap().to_string();
    assert_eq!(held["status"], "quarantined", "{held}");
    assert!(held["reason"].as_str().unwrap().contains("unknown sender"));
    // No handler runs for it; retry is refused (409), release runs it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, j) = api(&m.admin, "GET", format!("{}/email/inbound/{id}", m.srv.url), None).await;
    assert_eq!(j["status"], "quarantined");
    assert_eq!(j["result"], Value::Null);
    let (st, j) = api(&m.admin, "POST", format!("{}/email/inbound/{id}/retry", m.srv.url), None).await;
    assert_eq!(st, 409, "{j}");
    assert_eq!(j["error"]["code"], 1100, "{j}");
    let (st, _) = api(&alice.client, "POST", format!("{}/email/inbound/{id}/release", m.srv.url), None).await;
    assert_eq!(st, 403, "only the admin releases");
    let (st, j) = api(&m.admin, "POST", format!("{}/email/inbound/{id}/release", m.srv.url), None).await;
    assert_eq!(st, 200, "{j}");
    let j = m.handled(&id).await;
    assert_eq!(j["result"]["subject"], "held one");
    let (st, _) = api(&m.admin, "POST", format!("{}/email/inbound/nope/release", m.srv.url), None).await;
    assert_eq!(st, 404);
    let (st, _) = api(&m.admin, "GET", format!("{}/email/inbound?status=bogus", m.srv.url), None).await;
    assert_eq!(st, 400);

    // A failing handler: `failed` with its error; after a fix, retry handles it.
    let r = put_fn(&m.admin, &m.srv.url, "plain", "return function() error('not today') end").await;
    assert_eq!(r.status, 200);
    let mut spec = m.spec("a@x.example", &["plain@in.example.com"]);
    spec["subject"] = json!("will fail");
    assert_eq!(send(spec)["ok"], true);
    let id = newest(&m, 1).await[0]["id"].as_str().unwrap().to_string();
    let j = m.wait_status(&id, |s| s == "failed" || s == "handled").await;
    assert_eq!(j["status"], "failed", "{j}");
    assert!(j["error"].as_str().unwrap().contains("not today"), "{j}");
    put_fn(&m.admin, &m.srv.url, "plain", PLAIN).await;
    let (st, _) = api(&m.admin, "POST", format!("{}/email/inbound/{id}/retry", m.srv.url), None).await;
    assert_eq!(st, 200);
    let j = m.handled(&id).await;
    assert_eq!(j["result"]["subject"], "will fail");
    assert_eq!(j["attempts"], 2);
}

fn line(r: &mut impl BufRead) -> String {
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    l
}

/// Read a (multi-line) reply; assert its code.
fn expect(r: &mut impl BufRead, code: &str) -> String {
    loop {
        let l = line(r);
        assert!(l.starts_with(code), "wanted {code}, got {l:?}");
        if l.as_bytes().get(3) != Some(&b'-') {
            return l;
        }
    }
}

fn cmd(s: &mut TcpStream, r: &mut impl BufRead, c: &str, code: &str) -> String {
    s.write_all(format!("{c}\r\n").as_bytes()).unwrap();
    expect(r, code)
}

/// The DKIM key record of the RSA test key (tests/email_in_peers/dkim_rsa.pem).
fn rsa_record() -> String {
    let p = std::fs::read_to_string(format!("{PEERS}/dkim_rsa.pub.b64")).unwrap();
    format!("v=DKIM1; k=rsa; p={}", p.trim())
}

/// The ed25519 test key: seed and DKIM record.
fn ed25519_key() -> (String, String) {
    let seed = [7u8; 32];
    let pk = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key();
    (b64(&seed), format!("v=DKIM1; k=ed25519; p={}", b64(pk.as_bytes())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dkim_signatures_pass_fail_and_none() {
    let Some(py) = dkim_python() else {
        eprintln!("skipped: peer missing (ICHIBASE_EMAIL_IN_PYTHON, scripts/peers/email_in.sh)");
        return;
    };
    let extra = format!(
        "[email_in.dkim_keys]\n\"mail._domainkey.signer.example\" = \"{}\"\n\"ed._domainkey.signer.example\" = \"{}\"\n\
         [email_in.spf]\n\"signer.example\" = [\"127.0.0.0/8\"]\n\"far.example\" = [\"192.0.2.0/24\"]\n",
        rsa_record(),
        ed25519_key().1
    );
    let (m, _alice) = Mail::start(&extra, &[]).await;
    let pem = std::fs::read_to_string(format!("{PEERS}/dkim_rsa.pem")).unwrap();
    let mk = |subject: &str, dkim: Value| {
        let mut spec = m.spec("news@signer.example", &["news@in.example.com"]);
        spec["from"] = json!("news@signer.example");
        spec["subject"] = json!(subject);
        spec["text"] = json!("Signed body text.\nWith  two  spaces  and trailing   \n\n\n");
        spec["message_id"] = json!(format!("<{}@signer.example>", subject.replace(' ', "-")));
        if !dkim.is_null() {
            spec["dkim"] = dkim;
        }
        spec
    };
    let rsa = json!({"selector": "mail", "domain": "signer.example", "key": pem, "algorithm": "rsa-sha256", "canon": "relaxed/relaxed"});

    // rsa-sha256 relaxed/relaxed, signed by dkimpy: pass; SPF from 127.0.0.1 in 127/8: pass.
    assert_eq!(send_with(&py, mk("rsa relaxed", rsa.clone()))["ok"], true);
    let id = newest(&m, 1).await[0]["id"].as_str().unwrap().to_string();
    let j = m.handled(&id).await;
    assert_eq!(j["dkim"], "pass", "{j}");
    assert_eq!(j["result"]["dkim"], "pass");
    assert_eq!(j["spf"], "pass");

    // simple/simple too.
    let mut simple = rsa.clone();
    simple["canon"] = json!("simple/simple");
    assert_eq!(send_with(&py, mk("rsa simple", simple))["ok"], true);
    let j = m.handled(newest(&m, 1).await[0]["id"].as_str().unwrap()).await;
    assert_eq!(j["dkim"], "pass", "{j}");

    // ed25519-sha256 (RFC 8463).
    let (seed, _) = ed25519_key();
    let ed = json!({"selector": "ed", "domain": "signer.example", "key": seed, "algorithm": "ed25519-sha256", "canon": "relaxed/simple"});
    assert_eq!(send_with(&py, mk("ed25519", ed))["ok"], true);
    let j = m.handled(newest(&m, 1).await[0]["id"].as_str().unwrap()).await;
    assert_eq!(j["dkim"], "pass", "{j}");

    // Tampered after signing: fail, quarantined, no handler runs.
    let mut spec = mk("tampered", rsa.clone());
    spec["tamper"] = json!(["Signed body", "Forged body"]);
    assert_eq!(send_with(&py, spec)["ok"], true);
    let j = newest(&m, 1).await[0].clone();
    assert_eq!(j["dkim"], "fail", "{j}");
    assert_eq!(j["status"], "quarantined", "{j}");
    assert!(j["dkim_detail"].as_str().unwrap().contains("body hash"), "{j}");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (_, j2) = api(&m.admin, "GET", format!("{}/email/inbound/{}", m.srv.url, j["id"].as_str().unwrap()), None).await;
    assert_eq!(j2["status"], "quarantined");
    assert_eq!(j2["result"], Value::Null, "no handler ran");

    // A signed header changed: fail.
    // Sign, then change the Subject by sending a raw copy with another subject line.
    let signed = sign_only(&py, &mk("header changed", rsa.clone()));
    let forged = signed.replace("Subject: header changed", "Subject: header CHANGED");
    let mut spec = m.spec("news@signer.example", &["news@in.example.com"]);
    spec["raw"] = json!(forged);
    assert_eq!(send_with(&py, spec)["ok"], true);
    let j = newest(&m, 1).await[0].clone();
    assert_eq!(j["dkim"], "fail", "{j}");

    // A key the server does not know: none (handled).
    let other = json!({"selector": "unknown", "domain": "signer.example", "key": pem, "algorithm": "rsa-sha256"});
    assert_eq!(send_with(&py, mk("unknown key", other))["ok"], true);
    let j = m.handled(newest(&m, 1).await[0]["id"].as_str().unwrap()).await;
    assert_eq!(j["dkim"], "none", "{j}");

    // SPF: a domain whose table does not list 127.0.0.1.
    let mut spec = m.spec("x@far.example", &["news@in.example.com"]);
    spec["subject"] = json!("spf fail");
    assert_eq!(send(spec)["ok"], true);
    let j = newest(&m, 1).await[0].clone();
    assert_eq!(j["spf"], "fail", "{j}");
}

/// The signed message as text (dkimpy), not sent.
fn sign_only(py: &str, spec: &Value) -> String {
    let code = format!(
        "import json,sys; sys.path.insert(0, {dir:?}); import send; s=json.loads(sys.argv[1]); \
         sys.stdout.write(send.sign(send.build(s), s['dkim']).decode())",
        dir = PEERS
    );
    let out = Command::new(py).arg("-c").arg(code).arg(spec.to_string()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_message_is_handled_once_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ichibase.toml"), BASE_CONFIG).unwrap();
    // Handlers off: the message is stored and waits.
    let mut m = Mail::start_in(dir.path(), &[("ICHIBASE_EMAIL_IN__HANDLERS", "false")]).await;
    let alice = signup(&m.srv.url, "alice@example.com").await;
    for (name, src) in [("ingest", INGEST), ("runs", RUNS)] {
        assert_eq!(put_fn(&m.admin, &m.srv.url, name, src).await.status, 200);
    }
    let mut spec = m.spec("writer@news.example", &["news@in.example.com"]);
    spec["subject"] = json!("survives a crash");
    spec["message_id"] = json!("<crash-1@news.example>");
    assert_eq!(send(spec.clone())["ok"], true);
    let id = newest(&m, 1).await[0]["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (_, j) = api(&m.admin, "GET", format!("{}/email/inbound/{id}", m.srv.url), None).await;
    assert_eq!(j["status"], "pending", "{j}");
    // kill -9: nothing but the database survives.
    m.srv.child.kill().unwrap();
    m.srv.child.wait().unwrap();
    drop(m);
    let mut m2 = Mail::start_in(dir.path(), &[]).await;
    let j = m2.handled(&id).await;
    assert_eq!(j["result"]["subject"], "survives a crash");
    assert_eq!(j["attempts"], 1);
    // Once: one run, also after the same message is sent again.
    spec["host"] = json!(m2.host);
    spec["port"] = json!(m2.port);
    assert_eq!(send(spec)["ok"], true);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = call_fn(&alice.client, &m2.srv.url, "runs", json!(null)).await;
    assert_eq!(r.body, "1", "{}", r.body);
    assert_eq!(newest(&m2, 10).await.len(), 1);
    m2._dir = Some(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_never_crashes_the_server() {
    let (m, _alice) = Mail::start("", &[]).await;
    let connect = || {
        let s = TcpStream::connect(&m.smtp).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let r = BufReader::new(s.try_clone().unwrap());
        (s, r)
    };
    // An endless line (no newline for 200 KB): refused, the connection goes on.
    let (mut s, mut r) = connect();
    expect(&mut r, "220");
    s.write_all(&vec![b'A'; 200_000]).unwrap();
    s.write_all(b"\r\n").unwrap();
    expect(&mut r, "500");
    cmd(&mut s, &mut r, "NOOP", "250");

    // DATA without SIZE, over max_message_bytes: 552 after the dot.
    cmd(&mut s, &mut r, "EHLO hostile", "250");
    cmd(&mut s, &mut r, "MAIL FROM:<h@x.example>", "250");
    cmd(&mut s, &mut r, "RCPT TO:<plain@in.example.com>", "250");
    cmd(&mut s, &mut r, "DATA", "354");
    let big_line = "B".repeat(900);
    for _ in 0..300 {
        s.write_all(format!("{big_line}\r\n").as_bytes()).unwrap();
    }
    cmd(&mut s, &mut r, ".", "552");

    // A huge header (one 50 KB line, over max_line_bytes) in DATA: 552.
    cmd(&mut s, &mut r, "MAIL FROM:<h@x.example>", "250");
    cmd(&mut s, &mut r, "RCPT TO:<plain@in.example.com>", "250");
    cmd(&mut s, &mut r, "DATA", "354");
    s.write_all(format!("X-Huge: {}\r\nSubject: big header\r\n\r\nbody\r\n", "h".repeat(50_000)).as_bytes()).unwrap();
    cmd(&mut s, &mut r, ".", "552");

    // Thousands of small headers within the size limit, and malformed MIME: stored, handled.
    let mut headers = String::new();
    for i in 0..3000 {
        headers.push_str(&format!("X-H{i}: v\r\n"));
    }
    let malformed = [
        format!("{headers}Subject: many headers\r\n\r\nbody\r\n"),
        "Subject: broken mime\r\nContent-Type: multipart/mixed; boundary=\"zz\"\r\n\r\n--zz\r\nContent-Type: text/plain\r\n\r\nunterminated part\r\n--zz\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!\r\n".to_string(),
        "Subject: =?UTF-8?B?////?= =?bogus?Q?x?=\r\nContent-Type: text/plain; charset=\"no-such-charset\"\r\n\r\n\u{0}\u{1}binary\u{7f}\r\n..leading dot\r\n".to_string(),
        "no headers at all, no blank line".to_string(),
        format!("Content-Type: multipart/mixed; boundary=a\r\n\r\n{}", "--a\r\nContent-Type: multipart/mixed; boundary=a\r\n\r\n".repeat(500)),
    ];
    for body in &malformed {
        cmd(&mut s, &mut r, "MAIL FROM:<h@x.example>", "250");
        cmd(&mut s, &mut r, "RCPT TO:<plain@in.example.com>", "250");
        cmd(&mut s, &mut r, "DATA", "354");
        let stuffed: String = body.split("\r\n").map(|l| if l.starts_with('.') { format!(".{l}\r\n") } else { format!("{l}\r\n") }).collect();
        s.write_all(stuffed.as_bytes()).unwrap();
        cmd(&mut s, &mut r, ".", "250");
    }
    // Commands out of order and garbage.
    cmd(&mut s, &mut r, "RCPT TO:<plain@in.example.com>", "503");
    cmd(&mut s, &mut r, "DATA", "503");
    cmd(&mut s, &mut r, "MAIL FROM:<not an address>", "553");
    cmd(&mut s, &mut r, "\u{1}\u{2}\u{3}", "500");
    cmd(&mut s, &mut r, "STARTTLS", "502");
    cmd(&mut s, &mut r, "QUIT", "221");

    // Too many bad commands: closed with 421.
    let (mut s, mut r) = connect();
    expect(&mut r, "220");
    let mut closed = false;
    for _ in 0..40 {
        if s.write_all(b"BOGUS\r\n").is_err() {
            closed = true;
            break;
        }
        let l = line(&mut r);
        if l.starts_with("421") || l.is_empty() {
            closed = true;
            break;
        }
    }
    assert!(closed, "the connection is closed after too many bad commands");

    // More connections from one address than max_connections_per_ip (8): 421.
    drop(s);
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while held.len() < 8 {
        let (s, mut r) = connect();
        if line(&mut r).starts_with("220") {
            held.push(s);
        } else {
            // The connections above are still being closed on the server's side.
            assert!(Instant::now() < deadline, "8 connections are admitted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (_s, mut r) = connect();
    expect(&mut r, "421");
    drop(held);

    // A client that stops mid-DATA does not leave anything behind (once the server has seen
    // the held connections go, it admits new ones).
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut s, mut r) = loop {
        let (s, mut r) = connect();
        if line(&mut r).starts_with("220") {
            break (s, r);
        }
        assert!(Instant::now() < deadline, "connections are admitted again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    cmd(&mut s, &mut r, "HELO x", "250");
    cmd(&mut s, &mut r, "MAIL FROM:<h@x.example>", "250");
    cmd(&mut s, &mut r, "RCPT TO:<plain@in.example.com>", "250");
    cmd(&mut s, &mut r, "DATA", "354");
    s.write_all(b"Subject: cut off\r\n\r\nhalf").unwrap();
    drop(s);

    // Still serving: HTTP, and a normal message end to end.
    let (st, _) = api(&m.admin, "GET", format!("{}/ping", m.srv.url), None).await;
    assert_eq!(st, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut spec = m.spec("a@x.example", &["plain@in.example.com"]);
    spec["subject"] = json!("after the storm");
    let out = send(spec);
    assert_eq!(out["ok"], true, "{out}");
    let j = m.handled(newest(&m, 1).await[0]["id"].as_str().unwrap()).await;
    assert_eq!(j["result"]["subject"], "after the storm");
    // The malformed ones were stored and reached the handler too (none lost, none crashed it).
    let (_, all) = api(&m.admin, "GET", format!("{}/email/inbound?limit=100", m.srv.url), None).await;
    let all = all["messages"].as_array().unwrap();
    assert_eq!(all.len(), malformed.len() + 1, "{all:?}");
    for msg in all {
        let j = m.wait_status(msg["id"].as_str().unwrap(), |s| s == "handled" || s == "failed").await;
        assert_eq!(j["status"], "handled", "{j}");
    }
    assert!(!all.iter().any(|x| x["subject"] == "cut off"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_over_its_rate_is_told_to_come_back_later() {
    let (m, _alice) = Mail::start(
        "",
        &[("ICHIBASE_EMAIL_IN__RATE_BURST", "3.0"), ("ICHIBASE_EMAIL_IN__RATE_PER_SENDER_PER_MINUTE", "1.0")],
    )
    .await;
    for i in 0..3 {
        let mut spec = m.spec("busy@x.example", &["plain@in.example.com"]);
        spec["subject"] = json!(format!("burst {i}"));
        assert_eq!(send(spec)["ok"], true);
    }
    let mut spec = m.spec("busy@x.example", &["plain@in.example.com"]);
    spec["subject"] = json!("one too many");
    let out = send(spec);
    assert_eq!(out["error"], "sender_refused", "{out}");
    assert_eq!(out["code"], 450, "a temporary refusal: the client retries later");
    // Other senders are not affected.
    assert_eq!(send(m.spec("calm@x.example", &["plain@in.example.com"]))["ok"], true);
    assert_eq!(newest(&m, 100).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_cut_off_by_a_crash_runs_again_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ichibase.toml"), BASE_CONFIG).unwrap();
    let env = [("ICHIBASE_LUA_TIMEOUT_SECS", "300"), ("ICHIBASE_LUA_CPU_LIMIT_SECS", "300")];
    let mut m = Mail::start_in(dir.path(), &env).await;
    signup(&m.srv.url, "alice@example.com").await;
    // A handler that spins: the message stays `running` until the crash.
    let spin = "function on_email(email) while true do end end";
    assert_eq!(put_fn(&m.admin, &m.srv.url, "ingest", spin).await.status, 200);
    let mut spec = m.spec("writer@news.example", &["news@in.example.com"]);
    spec["subject"] = json!("cut off");
    assert_eq!(send(spec)["ok"], true);
    let id = newest(&m, 1).await[0]["id"].as_str().unwrap().to_string();
    m.wait_status(&id, |s| s == "running").await;
    // The fix is deployed while it spins; then kill -9.
    assert_eq!(put_fn(&m.admin, &m.srv.url, "ingest", INGEST).await.status, 200);
    m.srv.child.kill().unwrap();
    m.srv.child.wait().unwrap();
    drop(m);
    let m2 = Mail::start_in(dir.path(), &env).await;
    let j = m2.handled(&id).await;
    assert_eq!(j["result"]["subject"], "cut off");
    assert_eq!(j["in_doubt"], 1, "{j}");
    assert_eq!(j["attempts"], 2, "{j}");
}
