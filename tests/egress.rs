//! Secure egress end to end through `POST /fn/...`: the SSRF suite (every spelling of a private
//! address, names resolving to one, redirects to one, oversized and slow answers — each refused
//! with a clear error), the privacy guard over what reaches a local capture server (with
//! property tests in English and Japanese), vault references, and the audit rows.
//!
//! The capture server is a real HTTP server on 127.0.0.1: the policies that reach it name that
//! address explicitly (`allow_addresses`), every other policy gets the default denial.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use common::{Server, call_fn, client, put_fn, read};
use serde_json::{Value, json};

/// What the capture server saw of one request.
#[derive(Debug, Clone)]
pub struct Captured {
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Captured {
    fn all_text(&self) -> String {
        let h: Vec<String> = self.headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        format!("{} {}\n{}\n\n{}", self.method, self.uri, h.join("\n"), self.body)
    }
}

#[derive(Clone, Default)]
pub struct Peer {
    pub seen: Arc<Mutex<Vec<Captured>>>,
}

async fn capture(State(p): State<Peer>, method: axum::http::Method, uri: Uri, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let c = Captured {
        method: method.to_string(),
        uri: uri.to_string(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
        body: String::from_utf8_lossy(&body).to_string(),
    };
    let echo = c.all_text();
    p.seen.lock().unwrap().push(c);
    let path = uri.path().to_string();
    match path.as_str() {
        "/echo" => echo.into_response(),
        "/unauthorized" => (StatusCode::UNAUTHORIZED, "no").into_response(),
        _ => "captured".into_response(),
    }
}

#[derive(serde::Deserialize)]
struct To {
    to: String,
}

async fn redirect(Query(t): Query<To>) -> Response {
    Response::builder()
        .status(302)
        .header("location", t.to)
        .body(Body::empty())
        .unwrap()
}

async fn redirect_loop() -> Response {
    Response::builder().status(302).header("location", "/loop").body(Body::empty()).unwrap()
}

async fn big() -> Response {
    "x".repeat(200_000).into_response()
}

async fn big_chunked() -> Response {
    let chunks = (0..50).map(|_| Ok::<_, std::io::Error>(axum::body::Bytes::from(vec![b'y'; 10_000])));
    Body::from_stream(futures_util::stream::iter(chunks)).into_response()
}

async fn slow() -> Response {
    tokio::time::sleep(Duration::from_secs(60)).await;
    "late".into_response()
}

/// Start the capture server on 127.0.0.1; returns its port.
pub async fn start_peer(peer: Peer) -> u16 {
    let app = Router::new()
        .route("/redirect", any(redirect))
        .route("/loop", any(redirect_loop))
        .route("/big", any(big))
        .route("/big-chunked", any(big_chunked))
        .route("/slow", any(slow))
        .fallback(any(capture))
        .with_state(peer);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    port
}

fn config(port: u16, extra: &str) -> String {
    format!(
        r#"
[egress]
max_response_bytes = 100000
timeout_secs = 5
[egress.resolve]
"peer.test" = ["127.0.0.1"]
"rebind.test" = ["127.0.0.1"]
"meta.test" = ["169.254.169.254"]
"mapped.test" = ["::ffff:127.0.0.1"]

# Reaches the capture server: names 127.0.0.1 explicitly.
[egress.functions.ok]
hosts = ["127.0.0.1", "peer.test"]
ports = [{port}]
methods = ["GET", "POST"]
allow_addresses = ["127.0.0.1/32"]

# Any host, default address rules: everything private is refused.
[egress.functions.strict]
hosts = ["*"]
ports = [{port}, 80, 443]

# Any host, but only 127.0.0.1 among private addresses (redirect tests).
[egress.functions.redir]
hosts = ["*"]
ports = [{port}, 80]
allow_addresses = ["127.0.0.1/32"]

[egress.functions.narrow]
hosts = ["peer.test"]
ports = [{port}]
methods = ["GET"]
paths = ["/api/", "/redirect"]
allow_addresses = ["127.0.0.1/32"]

[egress.functions."mail*"]
hosts = ["127.0.0.1"]
ports = [{port}]
allow_addresses = ["127.0.0.1/32"]
allow_kinds = ["email"]
{extra}
"#
    )
}

pub struct Env {
    pub server: Server,
    pub peer: Peer,
    pub port: u16,
    _dir: tempfile::TempDir,
}

pub async fn env_with(extra: &str, flags: &[&str]) -> Env {
    let peer = Peer::default();
    let port = start_peer(peer.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ichibase.toml"), config(port, extra)).unwrap();
    let server = Server::start_in(dir.path(), flags, &[]);
    Env { server, peer, port, _dir: dir }
}

/// Deploy `name` running `body` (Lua statements returning a value; `input` is the argument).
async fn deploy(e: &Env, name: &str, body: &str) {
    let src = format!("return function(input, ctx)\n{body}\nend");
    let r = put_fn(&client(), &e.server.url, name, &src).await;
    assert_eq!(r.status, 200, "deploy {name}: {}", r.body);
}

/// The generic fetcher: `input` = {url, method?, body?, headers?, timeout?}.
const FETCH: &str = r#"
local r = http.fetch{url = input.url, method = input.method, body = input.body, headers = input.headers, timeout = input.timeout}
return {status = r.status, body = r.body, url = r.url, redacted = r.redacted}"#;

async fn call(e: &Env, name: &str, input: Value) -> (u16, Value) {
    let r = call_fn(&client(), &e.server.url, name, input).await;
    let v = serde_json::from_str(&r.body).unwrap_or_else(|_| json!({"text": r.body}));
    (r.status, v)
}

fn err_text(v: &Value) -> String {
    v.to_string()
}

#[tokio::test]
async fn ssrf_suite_every_private_spelling_is_refused() {
    let e = env_with("", &[]).await;
    let p = e.port;
    deploy(&e, "strict", FETCH).await;
    deploy(&e, "ok", FETCH).await;
    // The allowed path works: the policy names 127.0.0.1.
    let (s, v) = call(&e, "ok", json!({"url": format!("http://127.0.0.1:{p}/hello")})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], 200);
    assert_eq!(v["body"], "captured");
    let (s, v) = call(&e, "ok", json!({"url": format!("http://peer.test:{p}/hello")})).await;
    assert_eq!(s, 200, "{v}");

    let cases = [
        format!("http://127.0.0.1:{p}/"),
        format!("http://127.1:{p}/"),
        format!("http://127.0.1:{p}/"),
        format!("http://0x7f000001:{p}/"),
        format!("http://0x7f.0.0.1:{p}/"),
        format!("http://0177.0.0.1:{p}/"),
        format!("http://2130706433:{p}/"),
        format!("http://017700000001:{p}/"),
        format!("http://[::1]:{p}/"),
        format!("http://[0:0:0:0:0:0:0:1]:{p}/"),
        format!("http://[::ffff:127.0.0.1]:{p}/"),
        format!("http://[::ffff:7f00:1]:{p}/"),
        format!("http://[64:ff9b::127.0.0.1]:{p}/"),
        format!("http://[2002:7f00:1::]:{p}/"),
        format!("http://0.0.0.0:{p}/"),
        format!("http://0:{p}/"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://[fd00:ec2::254]/latest/meta-data/".to_string(),
        "http://100.100.100.200/latest/meta-data/".to_string(),
        "http://10.0.0.1/".to_string(),
        "http://172.16.5.4/".to_string(),
        "http://192.168.0.1/".to_string(),
        "http://100.64.0.1/".to_string(),
        "http://[fd00::1]/".to_string(),
        "http://[fe80::1]/".to_string(),
        "http://224.0.0.1/".to_string(),
        "http://255.255.255.255/".to_string(),
        // Names that resolve to private addresses.
        format!("http://localhost:{p}/"),
        format!("http://LOCALHOST.:{p}/"),
        format!("http://rebind.test:{p}/"),
        "http://meta.test/".to_string(),
        format!("http://mapped.test:{p}/"),
    ];
    let before = e.peer.seen.lock().unwrap().len();
    for url in &cases {
        let (s, v) = call(&e, "strict", json!({"url": url})).await;
        assert_eq!(s, 403, "{url} must be refused: {v}");
        let t = err_text(&v);
        assert!(t.contains("EGRESS_DENIED") || t.contains("1060"), "{url}: {t}");
        assert!(t.contains("address"), "{url}: the error names the address class: {t}");
    }
    assert_eq!(e.peer.seen.lock().unwrap().len(), before, "nothing reached the peer");

    // Other URL tricks.
    for (url, want) in [
        (format!("http://user:pw@127.0.0.1:{p}/"), "credentials"),
        (format!("ftp://127.0.0.1:{p}/"), "scheme"),
        (format!("file:///etc/passwd"), "scheme"),
        (format!("http://127.0.0.1:22/"), "port"),
        ("not a url".to_string(), "bad URL"),
    ] {
        let (s, v) = call(&e, "strict", json!({"url": url})).await;
        assert!(s == 403 || s == 400, "{url}: {s} {v}");
        assert!(err_text(&v).contains(want), "{url}: {v}");
    }
}

#[tokio::test]
async fn redirects_are_checked_hop_by_hop() {
    let e = env_with("", &[]).await;
    let p = e.port;
    deploy(&e, "redir", FETCH).await;
    // A redirect to an allowed place is followed.
    let to = format!("http://127.0.0.1:{p}/landed");
    let (s, v) = call(&e, "redir", json!({"url": format!("http://127.0.0.1:{p}/redirect?to={}", urlenc(&to))})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["url"], to);
    // Redirects to private addresses are refused at the hop.
    for to in [
        format!("http://127.0.0.2:{p}/x"),
        format!("http://[::1]:{p}/x"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        // Names and spellings of addresses outside the policy's 127.0.0.1/32.
        "http://meta.test/latest/meta-data/".to_string(),
        format!("http://0x7f000002:{p}/x"),
        format!("http://2130706434:{p}/x"),
        "http://[::ffff:10.0.0.1]/x".to_string(),
        "http://[::]/x".to_string(),
    ] {
        let before = e.peer.seen.lock().unwrap().len();
        let (s, v) = call(&e, "redir", json!({"url": format!("http://127.0.0.1:{p}/redirect?to={}", urlenc(&to))})).await;
        assert_eq!(s, 403, "redirect to {to}: {v}");
        assert!(err_text(&v).contains("EGRESS_DENIED"), "{v}");
        assert_eq!(e.peer.seen.lock().unwrap().len(), before);
    }
    // A redirect loop ends at the limit.
    let (s, v) = call(&e, "redir", json!({"url": format!("http://127.0.0.1:{p}/loop")})).await;
    assert_eq!(s, 422, "{v}");
    assert!(err_text(&v).contains("max_redirects"), "{v}");
    // A redirect to a path the policy does not allow is refused at the hop.
    deploy(&e, "narrow", FETCH).await;
    let (s, v) = call(&e, "narrow", json!({"url": format!("http://peer.test:{p}/redirect?to=/other")})).await;
    assert_eq!(s, 403, "{v}");
    assert!(err_text(&v).contains("path /other") && err_text(&v).contains("redirected from"), "{v}");
    let (s, v) = call(&e, "narrow", json!({"url": format!("http://peer.test:{p}/api/x")})).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = call(&e, "narrow", json!({"url": format!("http://peer.test:{p}/other")})).await;
    assert_eq!(s, 403, "{v}");
    assert!(err_text(&v).contains("path /other"), "{v}");
    let (s, v) = call(&e, "narrow", json!({"url": format!("http://peer.test:{p}/api/x"), "method": "POST"})).await;
    assert_eq!(s, 403, "{v}");
    assert!(err_text(&v).contains("method POST"), "{v}");
    let (s, v) = call(&e, "narrow", json!({"url": format!("http://127.0.0.1:{p}/api/x")})).await;
    assert_eq!(s, 403, "{v}");
    assert!(err_text(&v).contains("host 127.0.0.1"), "{v}");
    // A function without a policy cannot reach out at all.
    deploy(&e, "nopolicy", FETCH).await;
    let (s, v) = call(&e, "nopolicy", json!({"url": format!("http://127.0.0.1:{p}/")})).await;
    assert_eq!(s, 403, "{v}");
    assert!(err_text(&v).contains("no egress policy"), "{v}");
}

fn urlenc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn oversized_and_slow_answers_are_refused() {
    let e = env_with("", &["--lua-timeout-secs", "4"]).await;
    let p = e.port;
    deploy(&e, "ok", FETCH).await;
    for path in ["/big", "/big-chunked"] {
        let (s, v) = call(&e, "ok", json!({"url": format!("http://127.0.0.1:{p}{path}")})).await;
        assert_eq!(s, 422, "{path}: {v}");
        assert!(err_text(&v).contains("max_response_bytes"), "{v}");
    }
    // The call's own timeout.
    let t0 = Instant::now();
    let (s, v) = call(&e, "ok", json!({"url": format!("http://127.0.0.1:{p}/slow"), "timeout": 1})).await;
    assert_eq!(s, 408, "{v}");
    assert!(err_text(&v).contains("no complete answer"), "{v}");
    assert!(t0.elapsed() < Duration::from_secs(30));
    // Without one, the invocation's deadline (4 s here) ends the wait: the Lua time limit.
    let (s, v) = call(&e, "ok", json!({"url": format!("http://127.0.0.1:{p}/slow"), "timeout": 25})).await;
    assert_eq!(s, 408, "{v}");
    assert!(err_text(&v).contains("Lua time limit"), "{v}");
    // An oversized request body (over the default 1 MiB).
    deploy(&e, "ok", "return http.post(input.url, string.rep('z', 2 * 1024 * 1024))").await;
    let (s, v) = call(&e, "ok", json!({"url": format!("http://127.0.0.1:{p}/x")})).await;
    assert_eq!(s, 422, "{v}");
    assert!(err_text(&v).contains("max_request_bytes"), "{v}");
}

#[tokio::test]
async fn bad_arguments_from_lua_are_typed_errors() {
    let e = env_with("", &[]).await;
    for (i, src) in [
        "return http.fetch('x')",
        "return http.fetch{}",
        "return http.fetch{url = 5}",
        "return http.fetch{url = 'http://127.0.0.1/', bogus = 1}",
        "return http.fetch{url = 'http://127.0.0.1/', headers = 'x'}",
        "return http.fetch{url = 'http://127.0.0.1/', headers = {[1] = 'x'}}",
        "return http.fetch{url = 'http://127.0.0.1/', headers = {a = {}}}",
        "return http.fetch{url = 'http://127.0.0.1/', body = true}",
        "return http.fetch{url = 'http://127.0.0.1/', timeout = -1}",
        "return http.fetch{url = 'http://127.0.0.1/', method = 'GE T'}",
        "return http.fetch{url = 'http://127.0.0.1/', headers = {['bad name'] = 'x'}}",
        "return http.fetch{url = 'http://127.0.0.1/', headers = {host = 'evil'}}",
    ]
    .iter()
    .enumerate()
    {
        let name = format!("ok{i}");
        let r = put_fn(&client(), &e.server.url, &name, &format!("return function() {src} end")).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let (s, v) = call(&e, &name, json!({})).await;
        assert!(s == 400 || s == 403, "{src}: {s} {v}");
    }
}

/// Random text (English, Japanese, punctuation; digits only where a case puts them).
mod textgen {
    use proptest::prelude::*;
    pub fn filler() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[a-zA-Z ,.!?あいうえおかきくけこさしすせそ今日天気予定会議ですね。、]{0,30}").unwrap()
    }
}

#[test]
fn property_secrets_codes_cards_and_my_numbers_never_reach_the_capture_server() {
    use base64::Engine;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let secret = "Vx9-kq2Lr8Zt4Wm7";
    let e = rt.block_on(async {
        let e = env_with(&format!("[egress.guard]\nsecrets = [\"{secret}\"]\n"), &[]).await;
        deploy(&e, "ok", FETCH).await;
        e
    });
    let p = e.port;
    let mut runner = TestRunner::new(Config { cases: 40, ..Config::default() });
    let strat = (
        textgen::filler(),
        textgen::filler(),
        0u32..1_000_000,
        proptest::collection::vec(0u32..10, 14),
        proptest::collection::vec(0u32..10, 11),
        0usize..8,
        0usize..3,
        0usize..4,
        0usize..3,
    );
    runner
        .run(&strat, |(pre, post, otp, card_body, mn_body, phrase, sep, enc, place)| {
            let otp = format!("{otp:06}");
            let phrases = [
                format!("Your verification code is {otp}"),
                format!("{otp} is your one-time code"),
                format!("Use code {otp} to sign in"),
                format!("認証コードは{otp}です"),
                format!("ワンタイムパスワード：{otp}"),
                format!("確認コード {otp} を入力してください"),
                format!("Your OTP: {otp}."),
                format!("セキュリティコード「{otp}」"),
            ];
            let mut card: Vec<u32> = vec![5, 1];
            card.extend(&card_body[..13]);
            let mut c = 0;
            while {
                let mut t = card.clone();
                t.push(c);
                !luhn(&t)
            } {
                c += 1;
            }
            card.push(c);
            let sepc = ["", " ", "-"][sep];
            let group = |d: &[u32]| -> String {
                d.chunks(4)
                    .map(|g| g.iter().map(|x| char::from_digit(*x, 10).unwrap()).collect::<String>())
                    .collect::<Vec<_>>()
                    .join(sepc)
            };
            let card_s = group(&card);
            let mut mn = mn_body.clone();
            mn.push(my_number_check(&mn));
            let mn_s = group(&mn);
            let sec = match enc {
                0 => secret.to_string(),
                1 => base64::engine::general_purpose::STANDARD.encode(secret),
                2 => form_urlencoded::byte_serialize(secret.as_bytes()).collect(),
                _ => secret.bytes().map(|b| format!("{b:02x}")).collect(),
            };
            let text = format!("{pre} {} {post}。カード番号 {card_s} 、マイナンバー {mn_s} 。token {sec} {pre}", phrases[phrase]);
            // Header values are ASCII: English phrasing only there.
            let ascii = format!("note: {} ; card {card_s} ; id {mn_s} ; token {sec} end", phrases[[0, 1, 2, 6][phrase % 4]]);
            let input = match place {
                0 => json!({"url": format!("http://127.0.0.1:{p}/in-body"), "method": "POST", "body": text}),
                1 => json!({"url": format!("http://127.0.0.1:{p}/in-header"), "headers": {"x-note": ascii}}),
                _ => json!({"url": format!("http://127.0.0.1:{p}/in-query?q={}", urlenc(&text))}),
            };
            let before = e.peer.seen.lock().unwrap().len();
            let (s, v) = rt.block_on(call(&e, "ok", input));
            prop_assert_eq!(s, 200, "{}", v);
            let seen = e.peer.seen.lock().unwrap()[before..].to_vec();
            prop_assert_eq!(seen.len(), 1);
            let got = seen[0].all_text();
            let decoded: String = percent_encoding::percent_decode_str(&got).decode_utf8_lossy().replace('+', " ");
            for needle in [&otp, &card_s, &mn_s, &sec.to_string(), &secret.to_string()] {
                prop_assert!(!got.contains(needle.as_str()) && !decoded.contains(needle.as_str()), "{} reached the server: {}", needle, got);
            }
            prop_assert!(v["redacted"].as_object().is_some_and(|o| !o.is_empty()), "{}", v);
            Ok(())
        })
        .unwrap();
}

fn luhn(d: &[u32]) -> bool {
    let mut sum = 0;
    for (i, x) in d.iter().rev().enumerate() {
        let mut v = *x;
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum % 10 == 0
}

fn my_number_check(d: &[u32]) -> u32 {
    let mut sum = 0;
    for n in 1..=11usize {
        let q = if n <= 6 { n as u32 + 1 } else { n as u32 - 5 };
        sum += d[11 - n] * q;
    }
    let r = sum % 11;
    if r <= 1 { 0 } else { 11 - r }
}

#[tokio::test]
async fn guard_policy_allows_blocks_and_the_audit_keeps_counts_only() {
    let e = env_with("[egress.guard]\nblock = [\"card\"]\n", &["--posterity-flush-secs", "0.2"]).await;
    let p = e.port;
    deploy(&e, "ok", FETCH).await;
    deploy(&e, "mailer", FETCH).await;
    let url = format!("http://127.0.0.1:{p}/send");
    // Emails are redacted for most functions, sent by the mailer (its policy allows them).
    let (s, v) = call(&e, "ok", json!({"url": url, "method": "POST", "body": "to alice@example.com, code 834201"})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["redacted"], json!({"email": 1, "otp": 1}));
    let last = e.peer.seen.lock().unwrap().last().unwrap().clone();
    assert!(!last.body.contains("alice@example.com") && last.body.contains("[REDACTED:email]"), "{last:?}");
    let (s, v) = call(&e, "mailer", json!({"url": url, "method": "POST", "body": "to alice@example.com"})).await;
    assert_eq!(s, 200, "{v}");
    assert!(e.peer.seen.lock().unwrap().last().unwrap().body.contains("alice@example.com"));
    // A blocked kind refuses the whole request: nothing is sent.
    let before = e.peer.seen.lock().unwrap().len();
    let (s, v) = call(&e, "ok", json!({"url": url, "method": "POST", "body": "pay with 4111 1111 1111 1111"})).await;
    assert_eq!(s, 422, "{v}");
    assert!(err_text(&v).contains("PRIVACY_BLOCKED") && err_text(&v).contains("card (1)"), "{v}");
    assert_eq!(e.peer.seen.lock().unwrap().len(), before);
    // The audit: host, status, bytes, redaction counts; never the values.
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(15);
    let rows = loop {
        let r = read(
            c.post(format!("{}/analytics", e.server.url))
                .query(&[("default_format", "JSON")])
                .body("SELECT name, method, status, bytes, outcome, detail, error FROM log WHERE kind = 'egress' ORDER BY ts")
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let rows = r.json()["data"].as_array().unwrap().clone();
        if rows.len() >= 3 || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(rows[0]["name"], "127.0.0.1");
    assert_eq!(rows[0]["status"], 200);
    let d: Value = serde_json::from_str(rows[0]["detail"].as_str().unwrap()).unwrap();
    assert_eq!(d["redacted"], json!({"email": 1, "otp": 1}));
    assert_eq!(d["function"], "ok");
    assert_eq!(rows[2]["outcome"], "error");
    let all = serde_json::to_string(&rows).unwrap();
    for v in ["alice@example.com", "834201", "4111"] {
        assert!(!all.contains(v), "{v} is in the audit: {all}");
    }
}

#[tokio::test]
async fn vault_references_are_substituted_only_toward_bound_hosts() {
    let e = env_with("", &["--signup-open", "true"]).await;
    let p = e.port;
    let c = client();
    let base = &e.server.url;
    let value = "tok-Sp0t1fy-abcdef123456";
    let r = common::json_request(&c, reqwest::Method::PUT, format!("{base}/vault/spotify"), Some(json!({"value": value, "functions": ["ok", "strict"], "hosts": ["127.0.0.1"]}))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = common::json_request(&c, reqwest::Method::PUT, format!("{base}/vault/other"), Some(json!({"value": "other-secret-value-999", "functions": ["nobody"], "hosts": ["127.0.0.1"]}))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The listing never shows values.
    let (s, v) = common::api(&c, "GET", format!("{base}/vault"), None).await;
    assert_eq!(s, 200);
    assert!(!v.to_string().contains(value), "{v}");
    assert_eq!(v["secrets"][1]["name"], "spotify");
    assert_eq!(v["secrets"][1]["hosts"], json!(["127.0.0.1"]));
    // Non-admins may not manage it.
    let u = common::signup(base, "v@example.com").await;
    let r = common::json_request(&u.client, reqwest::Method::GET, format!("{base}/vault"), None).await;
    assert!(r.status == 403 || r.status == 401, "{}", r.body);

    deploy(&e, "ok", r#"
local ref = vault.bearer("spotify")
local r = http.fetch{url = input.url, headers = {Authorization = ref}}
return {status = r.status, body = r.body, shown = tostring(ref), t = type(ref)}"#).await;
    let (s, v) = call(&e, "ok", json!({"url": format!("http://127.0.0.1:{p}/echo")})).await;
    assert_eq!(s, 200, "{v}");
    let last = e.peer.seen.lock().unwrap().last().unwrap().clone();
    assert!(last.headers.iter().any(|(k, v2)| k == "authorization" && v2 == &format!("Bearer {value}")), "{last:?}");
    // Lua never sees it: not through tostring, not when the remote echoes it back.
    assert_eq!(v["shown"], "vault:spotify");
    assert!(!v.to_string().contains(value), "{v}");
    assert!(v["body"].as_str().unwrap().contains("[REDACTED:secret]"), "{v}");
    // Not toward a host it is not bound to.
    let (s, v) = call(&e, "ok", json!({"url": format!("http://peer.test:{p}/echo")})).await;
    assert_eq!(s, 403, "{v}");
    assert!(err_text(&v).contains("VAULT_DENIED") && err_text(&v).contains("not bound"), "{v}");
    // Not for a function outside its scope.
    deploy(&e, "thief", r#"return tostring(vault.bearer("other"))"#).await;
    let (s, v) = call(&e, "thief", json!({})).await;
    assert_eq!(s, 403, "{v}");
    assert!(err_text(&v).contains("may not use"), "{v}");
    // Sending the value itself (e.g. copied from a table) is redacted like any secret.
    deploy(&e, "ok", &format!(r#"local r = http.fetch{{url = input.url, method = "POST", body = "v={value}"}} return r.redacted"#)).await;
    let (s, v) = call(&e, "ok", json!({"url": format!("http://127.0.0.1:{p}/x")})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["secret"], 1, "{v}");
    assert!(!e.peer.seen.lock().unwrap().last().unwrap().body.contains(value));
    // Delete.
    let r = common::json_request(&c, reqwest::Method::DELETE, format!("{base}/vault/spotify"), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = common::json_request(&c, reqwest::Method::DELETE, format!("{base}/vault/spotify"), None).await;
    assert_eq!(r.status, 404, "{}", r.body);
}

#[tokio::test]
async fn vault_keys_rotate() {
    use base64::Engine;
    let k1 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let k2 = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
    let peer = Peer::default();
    let port = start_peer(peer.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let write = |extra: &str| std::fs::write(dir.path().join("ichibase.toml"), config(port, extra)).unwrap();
    write(&format!("[vault]\nkey = \"{k1}\"\n"));
    let s = Server::start_in(dir.path(), &[], &[]);
    let c = client();
    let r = common::json_request(&c, reqwest::Method::PUT, format!("{}/vault/k", s.url), Some(json!({"value": "rotating-secret-1", "functions": ["ok"], "hosts": ["127.0.0.1"]}))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    drop(s);
    // A new key with the old one still listed: readable; rotate re-seals.
    write(&format!("[vault]\nkey = \"{k2}\"\nold_keys = [\"{k1}\"]\n"));
    let s = Server::start_in(dir.path(), &[], &[]);
    let (st, v) = common::api(&c, "POST", format!("{}/vault/rotate", s.url), None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["rotated"], 1);
    drop(s);
    // Only the new key now.
    write(&format!("[vault]\nkey = \"{k2}\"\n"));
    let s = Server::start_in(dir.path(), &[], &[]);
    let src = format!("return function() local r = http.fetch{{url = 'http://127.0.0.1:{port}/r', headers = {{['x-k'] = vault.ref('k')}}}} return r.status end");
    assert_eq!(put_fn(&c, &s.url, "ok", &src).await.status, 200);
    let r = call_fn(&c, &s.url, "ok", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(peer.seen.lock().unwrap().last().unwrap().headers.iter().any(|(k, v)| k == "x-k" && v == "rotating-secret-1"));
    // The database holds no plaintext.
    drop(s);
    let db = std::fs::read(dir.path().join("ichibase.db")).unwrap();
    assert!(!db.windows(17).any(|w| w == b"rotating-secret-1"));
}

/// A local OAuth2 provider speaking the real protocol: authorization code with PKCE (S256),
/// refresh tokens, short-lived access tokens, revocation, and an API that checks them.
mod fake_oauth {
    use std::collections::{HashMap, HashSet};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use axum::Router;
    use axum::extract::{Query, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Redirect, Response};
    use axum::routing::{get, post};
    use base64::Engine;
    use serde_json::json;
    use sha2::Digest;

    #[derive(Default)]
    pub struct St {
        pub codes: HashMap<String, (String, String)>, // code -> (challenge, redirect_uri)
        pub access: HashMap<String, Instant>,
        pub refresh: HashSet<String>,
        pub refresh_grants: usize,
        pub n: usize,
    }
    pub type Shared = Arc<Mutex<St>>;
    pub const LIFETIME: u64 = 3;

    async fn authorize(State(s): State<Shared>, Query(q): Query<HashMap<String, String>>) -> Response {
        if q.get("client_id").map(String::as_str) != Some("cid")
            || q.get("code_challenge_method").map(String::as_str) != Some("S256")
            || q.get("response_type").map(String::as_str) != Some("code")
        {
            return (StatusCode::BAD_REQUEST, "bad authorize request").into_response();
        }
        let mut st = s.lock().unwrap();
        st.n += 1;
        let code = format!("code{}", st.n);
        st.codes.insert(code.clone(), (q["code_challenge"].clone(), q["redirect_uri"].clone()));
        let sep = if q["redirect_uri"].contains('?') { '&' } else { '?' };
        Redirect::to(&format!("{}{sep}code={code}&state={}", q["redirect_uri"], q["state"])).into_response()
    }

    fn issue(st: &mut St, with_refresh: bool) -> serde_json::Value {
        st.n += 1;
        let access = format!("at-{}-{}", st.n, "x".repeat(12));
        st.access.insert(access.clone(), Instant::now() + Duration::from_secs(LIFETIME));
        let mut j = json!({"access_token": access, "token_type": "Bearer", "expires_in": LIFETIME});
        if with_refresh {
            let r = format!("rt-{}-{}", st.n, "y".repeat(12));
            st.refresh.insert(r.clone());
            j["refresh_token"] = json!(r);
        }
        j
    }

    async fn token(State(s): State<Shared>, body: String) -> Response {
        let f: HashMap<String, String> = form_urlencoded::parse(body.as_bytes()).into_owned().collect();
        if f.get("client_id").map(String::as_str) != Some("cid") || f.get("client_secret").map(String::as_str) != Some("csecret") {
            return (StatusCode::UNAUTHORIZED, axum::Json(json!({"error": "invalid_client"}))).into_response();
        }
        let mut st = s.lock().unwrap();
        match f.get("grant_type").map(String::as_str) {
            Some("authorization_code") => {
                let Some((challenge, redirect)) = st.codes.remove(f.get("code").map(String::as_str).unwrap_or("")) else {
                    return (StatusCode::BAD_REQUEST, axum::Json(json!({"error": "invalid_grant"}))).into_response();
                };
                let verifier = f.get("code_verifier").cloned().unwrap_or_default();
                let want = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()));
                if want != challenge || f.get("redirect_uri") != Some(&redirect) {
                    return (StatusCode::BAD_REQUEST, axum::Json(json!({"error": "invalid_grant", "error_description": "PKCE verification failed"}))).into_response();
                }
                axum::Json(issue(&mut st, true)).into_response()
            }
            Some("refresh_token") => {
                st.refresh_grants += 1;
                let r = f.get("refresh_token").cloned().unwrap_or_default();
                if !st.refresh.remove(&r) {
                    return (StatusCode::BAD_REQUEST, axum::Json(json!({"error": "invalid_grant", "error_description": "refresh token revoked"}))).into_response();
                }
                axum::Json(issue(&mut st, true)).into_response()
            }
            _ => (StatusCode::BAD_REQUEST, axum::Json(json!({"error": "unsupported_grant_type"}))).into_response(),
        }
    }

    async fn me(State(s): State<Shared>, h: HeaderMap) -> Response {
        let tok = h.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
        let st = s.lock().unwrap();
        match st.access.get(tok) {
            Some(exp) if *exp > Instant::now() => axum::Json(json!({"user": "listener"})).into_response(),
            _ => (StatusCode::UNAUTHORIZED, "expired or unknown token").into_response(),
        }
    }

    async fn expire_all(State(s): State<Shared>) -> &'static str {
        s.lock().unwrap().access.clear();
        "ok"
    }

    async fn revoke_all(State(s): State<Shared>) -> &'static str {
        let mut st = s.lock().unwrap();
        st.refresh.clear();
        st.access.clear();
        "ok"
    }

    pub async fn start() -> (u16, Shared) {
        let s: Shared = Arc::default();
        let app = Router::new()
            .route("/authorize", get(authorize))
            .route("/token", post(token))
            .route("/api/me", get(me))
            .route("/test/expire", post(expire_all))
            .route("/test/revoke", post(revoke_all))
            .with_state(Arc::clone(&s));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        (port, s)
    }
}

#[tokio::test]
async fn oauth2_code_pkce_refresh_and_revocation() {
    let (op, st) = fake_oauth::start().await;
    let extra = format!(
        r#"
[egress.functions.spot]
hosts = ["127.0.0.1"]
ports = [{op}]
allow_addresses = ["127.0.0.1/32"]

[vault.oauth.fake]
auth_url = "http://127.0.0.1:{op}/authorize"
token_url = "http://127.0.0.1:{op}/token"
client_id = "cid"
client_secret = "csecret"
scopes = ["user-read"]
hosts = ["127.0.0.1"]
functions = ["spot"]
refresh_margin_secs = 1
"#
    );
    let e = env_with(&extra, &[]).await;
    let base = &e.server.url;
    let c = client();
    // Unknown provider, and a callback with a made-up state.
    let (s, _) = common::api(&c, "GET", format!("{base}/vault/oauth/nope/start"), None).await;
    assert_eq!(s, 404);
    let r = common::anon_client().get(format!("{base}/vault/oauth/fake/callback?code=x&state=forged")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // Start (admin) → the provider's authorize URL with a PKCE challenge.
    let (s, v) = common::api(&c, "GET", format!("{base}/vault/oauth/fake/start"), None).await;
    assert_eq!(s, 200, "{v}");
    let auth_url = v["authorize_url"].as_str().unwrap().to_string();
    assert!(auth_url.contains("code_challenge_method=S256") && auth_url.contains("scope=user-read"), "{auth_url}");
    // The browser: the provider approves and sends it back to the callback.
    let browser = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = browser.get(&auth_url).send().await.unwrap();
    assert_eq!(r.status(), 303, "{:?}", r.text().await);
    let back = r.headers()["location"].to_str().unwrap().to_string();
    assert!(back.starts_with(&format!("{base}/vault/oauth/fake/callback?")), "{back}");
    let r = read(browser.get(&back).send().await.unwrap()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["connected"], "fake");
    // The state is single-use.
    let r = read(browser.get(&back).send().await.unwrap()).await;
    assert_eq!(r.status, 401, "{}", r.body);
    // Listed like any secret, without values.
    let (_, v) = common::api(&c, "GET", format!("{base}/vault"), None).await;
    assert_eq!(v["secrets"][0]["name"], "fake");
    assert!(!v.to_string().contains("at-"), "{v}");

    deploy(&e, "spot", &format!(r#"
local r = http.fetch{{url = "http://127.0.0.1:{op}/api/me", headers = {{Authorization = vault.bearer("fake")}}}}
return {{status = r.status, body = r.body}}"#)).await;
    let (s, v) = call(&e, "spot", json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(st.lock().unwrap().refresh_grants, 0);
    // Close to expiry (lifetime 3 s, margin 1 s): refreshed before the call.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let (s, v) = call(&e, "spot", json!({})).await;
    assert_eq!((s, v["status"].clone()), (200, json!(200)), "{v}");
    assert_eq!(st.lock().unwrap().refresh_grants, 1);
    // The provider drops the access token early: the 401 triggers a refresh and one retry.
    common::request(&browser, reqwest::Method::POST, format!("http://127.0.0.1:{op}/test/expire"), None).await;
    let (s, v) = call(&e, "spot", json!({})).await;
    assert_eq!((s, v["status"].clone()), (200, json!(200)), "{v}");
    assert_eq!(st.lock().unwrap().refresh_grants, 2);
    // Revoked grant: a clear error reaches Lua.
    common::request(&browser, reqwest::Method::POST, format!("http://127.0.0.1:{op}/test/revoke"), None).await;
    let (s, v) = call(&e, "spot", json!({})).await;
    assert_eq!(s, 502, "{v}");
    let t = v.to_string();
    assert!(t.contains("OAUTH_FAILED") && t.contains("invalid_grant") && t.contains("/vault/oauth/fake/start"), "{t}");
    // Lua can catch it as an error value too.
    deploy(&e, "spot", &format!(r#"
local ok, err = pcall(http.fetch, {{url = "http://127.0.0.1:{op}/api/me", headers = {{Authorization = vault.bearer("fake")}}}})
return {{ok = ok, err = tostring(err)}}"#)).await;
    let (s, v) = call(&e, "spot", json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["ok"], false);
    assert!(v["err"].as_str().unwrap().contains("refresh token revoked"), "{v}");
}
