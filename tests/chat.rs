//! Two-way chats against a local server speaking the subset of the Telegram Bot API, the Slack
//! Web API and the Discord REST API that ichibase uses (written here, in Rust). Each test
//! starts the real binary with `[chat.*] base_url` pointed at that server, sends inbound
//! messages the way each provider does (signed webhooks, interactions, `getUpdates`), and
//! checks what the Lua handler's `chat.send` made reach the fake API.

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::post;
use common::*;
use serde_json::{Value, json};

const TG_TOKEN: &str = "123456:TEST-token";
const TG_SECRET: &str = "tg-webhook-secret-1";
const SLACK_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
const SLACK_TOKEN: &str = "xoxb-test-token";
const DISCORD_TOKEN: &str = "discord-bot-token";

/// What the fake provider APIs saw.
#[derive(Default)]
struct Seen {
    /// (API path, Authorization header, JSON body) of every send.
    sent: Vec<(String, String, Value)>,
    /// `answerCallbackQuery` ids.
    answered: Vec<String>,
    /// The `offset` of every `getUpdates`.
    offsets: Vec<i64>,
    /// Telegram updates waiting for `getUpdates`.
    updates: VecDeque<Value>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Seen>>);

impl Fake {
    fn sent(&self) -> Vec<(String, String, Value)> {
        self.0.lock().unwrap().sent.clone()
    }
    fn push_update(&self, u: Value) {
        self.0.lock().unwrap().updates.push_back(u);
    }

    /// Wait until a sent message matches `f`; returns its body.
    async fn wait_sent(&self, what: &str, f: impl Fn(&str, &Value) -> bool) -> (String, String, Value) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(m) = self.sent().into_iter().find(|(p, _, b)| f(p, b)) {
                return m;
            }
            assert!(Instant::now() < deadline, "no message reached the fake API: {what}; sent: {:#?}", self.sent());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn count(&self, f: impl Fn(&str, &Value) -> bool) -> usize {
        self.sent().iter().filter(|(p, _, b)| f(p, b)).count()
    }
}

fn auth(h: &HeaderMap) -> String {
    h.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
}

async fn telegram_method(State(f): State<Fake>, Path((bot, method)): Path<(String, String)>, body: axum::body::Bytes) -> axum::response::Response {
    if bot != format!("bot{TG_TOKEN}") {
        return (axum::http::StatusCode::UNAUTHORIZED, axum::Json(json!({"ok": false, "error_code": 401, "description": "Unauthorized"}))).into_response();
    }
    let b: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match method.as_str() {
        "sendMessage" => {
            let mut s = f.0.lock().unwrap();
            s.sent.push((format!("telegram/{method}"), String::new(), b));
            let id = 1000 + s.sent.len();
            axum::Json(json!({"ok": true, "result": {"message_id": id}})).into_response()
        }
        "answerCallbackQuery" => {
            f.0.lock().unwrap().answered.push(b["callback_query_id"].as_str().unwrap_or("").to_string());
            axum::Json(json!({"ok": true, "result": true})).into_response()
        }
        "getUpdates" => {
            let offset = b["offset"].as_i64().unwrap_or(0);
            let timeout = b["timeout"].as_u64().unwrap_or(0).min(2);
            f.0.lock().unwrap().offsets.push(offset);
            // Long poll: answer as soon as there is an update at or after the offset.
            let deadline = Instant::now() + Duration::from_secs(timeout);
            loop {
                let ready: Vec<Value> = {
                    let mut s = f.0.lock().unwrap();
                    // Telegram forgets updates before the offset once it is asked for it.
                    s.updates.retain(|u| u["update_id"].as_i64().unwrap() >= offset);
                    s.updates.iter().cloned().collect()
                };
                if !ready.is_empty() || Instant::now() >= deadline {
                    return axum::Json(json!({"ok": true, "result": ready})).into_response();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        _ => (axum::http::StatusCode::NOT_FOUND, axum::Json(json!({"ok": false, "description": "Not Found"}))).into_response(),
    }
}

async fn slack_post(State(f): State<Fake>, headers: HeaderMap, body: axum::body::Bytes) -> axum::response::Response {
    if auth(&headers) != format!("Bearer {SLACK_TOKEN}") {
        return axum::Json(json!({"ok": false, "error": "invalid_auth"})).into_response();
    }
    let b: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let channel = b["channel"].clone();
    f.0.lock().unwrap().sent.push(("slack/chat.postMessage".into(), auth(&headers), b));
    axum::Json(json!({"ok": true, "channel": channel, "ts": "1700000000.000200"})).into_response()
}

async fn discord_post(State(f): State<Fake>, Path(channel): Path<String>, headers: HeaderMap, body: axum::body::Bytes) -> axum::response::Response {
    if auth(&headers) != format!("Bot {DISCORD_TOKEN}") {
        return (axum::http::StatusCode::UNAUTHORIZED, axum::Json(json!({"message": "401: Unauthorized", "code": 0}))).into_response();
    }
    let b: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    f.0.lock().unwrap().sent.push((format!("discord/channels/{channel}/messages"), auth(&headers), b));
    axum::Json(json!({"id": "900000000000000001", "channel_id": channel})).into_response()
}

/// Start the fake provider APIs; returns their base URL.
async fn start_fake(f: &Fake) -> String {
    let app = Router::new()
        .route("/telegram/{bot}/{method}", post(telegram_method))
        .route("/slack/api/chat.postMessage", post(slack_post))
        .route("/discord/api/v10/channels/{channel}/messages", post(discord_post))
        .with_state(f.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}")
}

struct Keys {
    discord: ring::signature::Ed25519KeyPair,
    discord_public: String,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn keys() -> Keys {
    use ring::signature::KeyPair;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let public = hex(kp.public_key().as_ref());
    Keys { discord: kp, discord_public: public }
}

/// ichibase.toml pointing every provider at the fake.
fn config(fake: &str, keys: &Keys, extra_chat: &str, telegram_extra: &str) -> String {
    format!(
        r#"
signup_open = true

[notify]
poll_secs = 0.2
backoff_base_secs = 0.2
backoff_max_secs = 1

[chat]
function = "bot"
{extra_chat}

[chat.telegram]
base_url = "{fake}/telegram"
token = "{TG_TOKEN}"
webhook_secret = "{TG_SECRET}"
{telegram_extra}

[chat.slack]
base_url = "{fake}/slack/api"
bot_token = "{SLACK_TOKEN}"
signing_secret = "{SLACK_SECRET}"

[chat.discord]
base_url = "{fake}/discord/api/v10"
bot_token = "{DISCORD_TOKEN}"
public_key = "{}"
"#,
        keys.discord_public
    )
}

fn start_with(dir: &std::path::Path, toml: &str) -> Server {
    std::fs::write(dir.join("ichibase.toml"), toml).unwrap();
    Server::start_in(dir, &[], &[])
}

/// The handler every test deploys: it answers in the chat the message came from, with who it
/// ran as, and offers two buttons; a button press is answered with its data.
const BOT: &str = r#"
function on_message(m, ctx)
  if m.callback then
    return chat.send{provider = m.provider, chat_id = m.chat_id, text = "pressed " .. m.callback .. " by " .. tostring(m.user)}
  end
  return chat.send{provider = m.provider, chat_id = m.chat_id, reply_to = m.message_id,
    text = "echo: " .. tostring(m.text) .. " | user " .. tostring(ctx.user_id) .. " | from " .. m.from.id,
    buttons = {{text = "Liked it", data = "like:" .. (m.message_id or "x")}, {text = "Boring", data = "boring"}}}
end
"#;

async fn deploy_bot(base: &str) {
    let r = put_fn(&client(), base, "bot", BOT).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

async fn tg_webhook(base: &str, secret: Option<&str>, update: Value) -> Resp {
    let mut req = anon_client().post(format!("{base}/chat/telegram/webhook")).json(&update);
    if let Some(s) = secret {
        req = req.header("X-Telegram-Bot-Api-Secret-Token", s);
    }
    read(req.send().await.unwrap()).await
}

fn tg_message(update_id: i64, from: i64, message_id: i64, text: &str) -> Value {
    json!({"update_id": update_id, "message": {"message_id": message_id, "date": 1700000000,
        "from": {"id": from, "is_bot": false, "first_name": "Ann"}, "chat": {"id": from, "type": "private"}, "text": text}})
}

async fn link_code(user: &User, base: &str) -> String {
    let r = read(user.client.post(format!("{base}/chat/link")).send().await.unwrap()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["code"].as_str().unwrap().to_string()
}

async fn inbox(base: &str, status: &str) -> Vec<Value> {
    let r = read(client().get(format!("{base}/chat/inbox?status={status}")).send().await.unwrap()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["messages"].as_array().unwrap().clone()
}

async fn wait_inbox(base: &str, status: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = inbox(base, status).await;
        if rows.len() >= n {
            return rows;
        }
        assert!(Instant::now() < deadline, "fewer than {n} inbox rows are {status}: {rows:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn telegram_webhook_link_handler_reply_and_buttons() {
    let fake = Fake::default();
    let url = start_fake(&fake).await;
    let k = keys();
    let tmp = tempfile::tempdir().unwrap();
    let s = start_with(tmp.path(), &config(&url, &k, r#"unlinked = "refuse""#, ""));
    let base = s.url.clone();
    deploy_bot(&base).await;
    let ann = signup(&base, "ann-chat@example.test").await;

    // A forged webhook (wrong or missing secret) is refused before anything is stored.
    let r = tg_webhook(&base, Some("wrong"), tg_message(1, 42, 10, "forged")).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["error"]["name"], "CHAT_SIGNATURE_INVALID", "{}", r.body);
    let r = tg_webhook(&base, None, tg_message(2, 42, 11, "forged")).await;
    assert_eq!(r.status, 401);

    // An unlinked sender is refused (no handler).
    let r = tg_webhook(&base, Some(TG_SECRET), tg_message(3, 42, 12, "who am I")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    wait_inbox(&base, "refused", 1).await;

    // The link flow: a code for the signed-in user, sent to the bot.
    let code = link_code(&ann, &base).await;
    let r = tg_webhook(&base, Some(TG_SECRET), tg_message(4, 42, 13, &format!("/link {code}"))).await;
    assert_eq!(r.status, 200);
    fake.wait_sent("the link confirmation", |p, b| p.ends_with("sendMessage") && b["text"].as_str().unwrap().starts_with("Linked")).await;
    let links = read(ann.client.get(format!("{base}/chat/links")).send().await.unwrap()).await.json();
    assert_eq!(links["links"][0]["provider"], "telegram");
    assert_eq!(links["links"][0]["sender_id"], "42");
    // The code is one-time.
    tg_webhook(&base, Some(TG_SECRET), tg_message(5, 43, 14, &format!("/link {code}"))).await;
    fake.wait_sent("the refusal of a used code", |_, b| b["chat_id"] == 43 && b["text"].as_str().unwrap().contains("unknown or expired")).await;

    // A message → the handler as Ann → the reply with an inline keyboard, as a reply.
    tg_webhook(&base, Some(TG_SECRET), tg_message(6, 42, 15, "hello bot")).await;
    let (_, _, b) = fake.wait_sent("the handler's reply", |_, b| b["text"].as_str().unwrap().starts_with("echo: hello bot")).await;
    assert_eq!(b["chat_id"], 42);
    assert_eq!(b["text"], format!("echo: hello bot | user {} | from 42", ann.id));
    assert_eq!(b["reply_parameters"]["message_id"], 15);
    assert_eq!(b["reply_markup"]["inline_keyboard"], json!([[{"text": "Liked it", "callback_data": "like:15"}, {"text": "Boring", "callback_data": "boring"}]]));

    // The same update delivered again (Telegram retries) is handled once.
    tg_webhook(&base, Some(TG_SECRET), tg_message(6, 42, 15, "hello bot")).await;

    // A button press → the handler with callback = data, and answerCallbackQuery.
    let press = json!({"update_id": 7, "callback_query": {"id": "cbq-1", "data": "like:15", "chat_instance": "x",
        "from": {"id": 42, "is_bot": false, "first_name": "Ann"}, "message": {"message_id": 1001, "chat": {"id": 42, "type": "private"}}}});
    tg_webhook(&base, Some(TG_SECRET), press).await;
    fake.wait_sent("the button's answer", |_, b| b["text"] == format!("pressed like:15 by {}", ann.id)).await;
    assert!(fake.0.lock().unwrap().answered.contains(&"cbq-1".to_string()));

    // chat.send{user=} from a function Ann calls reaches her linked chat.
    put_fn(&client(), &base, "notify_me", r#"return function(i, ctx) return chat.send{user = ctx.user_id, text = i.text} end"#).await;
    let r = call_fn(&ann.client, &base, "notify_me", json!({"text": "your digest is ready"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json().is_string(), "chat.send answers the outbox id: {}", r.body);
    let (_, _, b) = fake.wait_sent("chat.send{user=}", |_, b| b["text"] == "your digest is ready").await;
    assert_eq!(b["chat_id"], 42);

    // After a later message, nothing the forged requests carried was ever handled, and the
    // retried update was handled once.
    tg_webhook(&base, Some(TG_SECRET), tg_message(8, 42, 16, "last")).await;
    fake.wait_sent("the last reply", |_, b| b["text"].as_str().unwrap().starts_with("echo: last")).await;
    assert_eq!(fake.count(|_, b| b["text"].as_str().unwrap().contains("forged")), 0);
    assert_eq!(fake.count(|_, b| b["text"].as_str().unwrap().contains("who am I")), 0);
    assert_eq!(fake.count(|_, b| b["text"].as_str().unwrap().starts_with("echo: hello bot")), 1);

    // Every inbound and outbound message is in the posterity log.
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body = c
            .post(format!("{base}/analytics"))
            .body("SELECT DISTINCT outcome FROM log WHERE kind = 'chat' AND name = 'telegram' ORDER BY 1")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let got: Vec<&str> = body.lines().collect();
        if ["forged", "received", "refused", "linked", "handled", "sent", "answered", "duplicate"].iter().all(|o| got.contains(o)) {
            break;
        }
        assert!(Instant::now() < deadline, "posterity outcomes: {got:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn lua_arguments_and_permissions_are_checked() {
    let fake = Fake::default();
    let url = start_fake(&fake).await;
    let k = keys();
    let tmp = tempfile::tempdir().unwrap();
    let s = start_with(tmp.path(), &config(&url, &k, "", ""));
    let base = s.url.clone();
    put_fn(&client(), &base, "send", r#"return function(i) return chat.send(i) end"#).await;
    put_fn(&client(), &base, "send_raw", r#"return function(i) return chat.send(i.v) end"#).await;
    let bad: Vec<(Value, &str)> = vec![
        (json!({"provider": "telegram", "chat_id": "42"}), "text= is required"),
        (json!({"provider": "irc", "chat_id": "42", "text": "x"}), "not one of"),
        (json!({"chat_id": "42", "text": "x"}), "needs provider="),
        (json!({"provider": "discord", "chat_id": "1/../2", "text": "x"}), "not a discord chat id"),
        (json!({"provider": "telegram", "chat_id": "42", "user": "u", "text": "x"}), "not both"),
        (json!({"provider": "telegram", "chat_id": "42", "text": "x", "color": "red"}), "unknown field"),
        (json!({"provider": "discord", "chat_id": "42", "text": "x".repeat(2001)}), "takes 1 to 2000"),
        (json!({"provider": "telegram", "chat_id": "42", "text": "x", "buttons": [{"text": "a", "data": "d".repeat(65)}]}), "over 64 bytes"),
        (json!({"provider": "telegram", "chat_id": "42", "text": "x", "buttons": [{"text": "", "data": "d"}]}), "1 to 75"),
        (json!({"provider": "telegram", "chat_id": "42", "text": "x", "buttons": [{"text": "a", "data": "d", "url": "u"}]}), "text= and data= only"),
        (json!({"provider": "telegram", "chat_id": "42", "text": "x", "buttons": "yes"}), "buttons must be a list"),
        (json!({"provider": "telegram", "chat_id": "42", "text": "x", "reply_to": "abc"}), "not a telegram message id"),
        (json!({"provider": "slack", "chat_id": "C1", "text": "x", "reply_to": "12"}), "not a slack message id"),
        (json!({"provider": "telegram", "chat_id": {"a": 1}, "text": "x"}), "must be a string"),
        (json!({"user": "nobody", "text": "x"}), "no linked"),
    ];
    for (args, want) in bad {
        let r = call_fn(&client(), &base, "send", args.clone()).await;
        assert_ne!(r.status, 200, "{args}: {}", r.body);
        assert!(r.body.contains(want), "{args}: wanted {want:?} in {}", r.body);
    }
    let many: Vec<Value> = (0..26).map(|i| json!({"text": format!("b{i}"), "data": format!("d{i}")})).collect();
    let r = call_fn(&client(), &base, "send", json!({"provider": "telegram", "chat_id": "42", "text": "x", "buttons": many})).await;
    assert!(r.body.contains("at most 25 buttons"), "{}", r.body);
    for v in [json!(null), json!("text"), json!(5)] {
        let r = call_fn(&client(), &base, "send_raw", json!({"v": v})).await;
        assert!(r.body.contains("takes a table"), "{}", r.body);
    }
    // A user may not send to chats that are not theirs, nor as another user.
    let bob = signup(&base, "bob-chat@example.test").await;
    let r = call_fn(&bob.client, &base, "send", json!({"provider": "telegram", "chat_id": "42", "text": "spam"})).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = call_fn(&bob.client, &base, "send", json!({"user": "someone-else", "text": "spam"})).await;
    assert_eq!(r.status, 403, "{}", r.body);
    // The admin may; a failed invocation queues nothing.
    let r = call_fn(&client(), &base, "send", json!({"provider": "telegram", "chat_id": "42", "text": "from the admin"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    put_fn(&client(), &base, "send_then_fail", r#"return function() chat.send{provider = "telegram", chat_id = "42", text = "never"}; error("boom") end"#).await;
    let r = call_fn(&client(), &base, "send_then_fail", json!({})).await;
    assert_ne!(r.status, 200);
    fake.wait_sent("the admin's message", |_, b| b["text"] == "from the admin").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fake.count(|_, b| b["text"] == "never" || b["text"] == "spam"), 0);
}

fn slack_sign(ts: i64, body: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SLACK_SECRET.as_bytes());
    format!("v0={}", hex(ring::hmac::sign(&key, format!("v0:{ts}:{body}").as_bytes()).as_ref()))
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

async fn slack_post_signed(base: &str, ts: i64, sig: &str, body: &str, form: bool) -> Resp {
    read(
        anon_client()
            .post(format!("{base}/chat/slack/events"))
            .header("X-Slack-Request-Timestamp", ts.to_string())
            .header("X-Slack-Signature", sig)
            .header("Content-Type", if form { "application/x-www-form-urlencoded" } else { "application/json" })
            .body(body.to_string())
            .send()
            .await
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn slack_events_signatures_replays_and_buttons() {
    let fake = Fake::default();
    let url = start_fake(&fake).await;
    let k = keys();
    let tmp = tempfile::tempdir().unwrap();
    let s = start_with(tmp.path(), &config(&url, &k, r#"unlinked = "anon""#, ""));
    let base = s.url.clone();
    deploy_bot(&base).await;

    // The URL verification handshake (signed like every request).
    let body = json!({"token": "t", "challenge": "ch-123", "type": "url_verification"}).to_string();
    let r = slack_post_signed(&base, now(), &slack_sign(now(), &body), &body, false).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["challenge"], "ch-123");

    let event = |id: &str, text: &str| {
        json!({"type": "event_callback", "team_id": "T1", "event_id": id, "event_time": now(),
               "event": {"type": "message", "channel": "D0CHAT", "user": "U0ANN", "text": text, "ts": "1700000000.000100", "channel_type": "im"}})
        .to_string()
    };
    // Forged: a wrong signature, a signature of another body, no signature.
    let b1 = event("Ev1", "forged one");
    let r = slack_post_signed(&base, now(), "v0=0000", &b1, false).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["error"]["name"], "CHAT_SIGNATURE_INVALID");
    let r = slack_post_signed(&base, now(), &slack_sign(now(), &event("Ev1", "other")), &b1, false).await;
    assert_eq!(r.status, 401);
    // Stale: properly signed, outside the 300 s window.
    let old = now() - 600;
    let r = slack_post_signed(&base, old, &slack_sign(old, &b1), &b1, false).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["error"]["name"], "CHAT_REPLAYED");

    // A signed message → the handler (anon: the sender is unlinked) → chat.postMessage with blocks.
    let b2 = event("Ev2", "hello slack");
    let (ts, sig) = (now(), slack_sign(now(), &b2));
    let r = slack_post_signed(&base, ts, &sig, &b2, false).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The same signed request again is a replay.
    let r = slack_post_signed(&base, ts, &sig, &b2, false).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["error"]["name"], "CHAT_REPLAYED");
    let (_, a, b) = fake.wait_sent("the Slack reply", |p, b| p.starts_with("slack") && b["text"].as_str().unwrap().starts_with("echo: hello slack")).await;
    assert_eq!(a, format!("Bearer {SLACK_TOKEN}"));
    assert_eq!(b["channel"], "D0CHAT");
    assert_eq!(b["text"], "echo: hello slack | user nil | from U0ANN");
    assert_eq!(b["thread_ts"], "1700000000.000100");
    assert_eq!(b["blocks"][0]["type"], "section");
    assert_eq!(b["blocks"][0]["text"]["text"], b["text"]);
    assert_eq!(b["blocks"][1]["type"], "actions");
    assert_eq!(b["blocks"][1]["elements"][0]["type"], "button");
    assert_eq!(b["blocks"][1]["elements"][0]["text"]["text"], "Liked it");
    assert_eq!(b["blocks"][1]["elements"][0]["value"], "like:1700000000.000100");
    assert_eq!(b["blocks"][1]["elements"][1]["value"], "boring");

    // A button press: an interactive payload in a form field.
    let payload = json!({"type": "block_actions", "user": {"id": "U0ANN", "username": "ann"}, "channel": {"id": "D0CHAT"},
        "container": {"type": "message", "message_ts": "1700000000.000200"}, "message": {"ts": "1700000000.000200"},
        "trigger_id": "tr-1", "actions": [{"action_id": "ichibase_1", "type": "button", "value": "boring", "action_ts": "1700000001.1"}]});
    let form: String = form_urlencoded::Serializer::new(String::new()).append_pair("payload", &payload.to_string()).finish();
    let r = slack_post_signed(&base, now(), &slack_sign(now(), &form), &form, true).await;
    assert_eq!(r.status, 200, "{}", r.body);
    fake.wait_sent("the button's answer", |p, b| p.starts_with("slack") && b["text"] == "pressed boring by nil").await;

    // The bot's own messages (bot_id) do not reach the handler.
    let own = json!({"type": "event_callback", "event_id": "Ev3", "event": {"type": "message", "channel": "D0CHAT", "bot_id": "B1", "text": "echo: loop", "ts": "1.3"}}).to_string();
    slack_post_signed(&base, now(), &slack_sign(now(), &own), &own, false).await;
    let b4 = event("Ev4", "after");
    slack_post_signed(&base, now(), &slack_sign(now(), &b4), &b4, false).await;
    fake.wait_sent("the last reply", |_, b| b["text"].as_str().unwrap().starts_with("echo: after")).await;
    assert_eq!(fake.count(|_, b| b["text"].as_str().unwrap().contains("forged") || b["text"].as_str().unwrap().contains("loop")), 0);
    assert_eq!(fake.count(|_, b| b["text"].as_str().unwrap().starts_with("echo: hello slack")), 1);
}

async fn discord_post_signed(base: &str, k: &Keys, body: &str, forge: bool) -> Resp {
    let ts = now().to_string();
    let mut msg = ts.clone().into_bytes();
    msg.extend_from_slice(body.as_bytes());
    let mut sig = k.discord.sign(&msg).as_ref().to_vec();
    if forge {
        sig[0] ^= 1;
    }
    read(
        anon_client()
            .post(format!("{base}/chat/discord/interactions"))
            .header("X-Signature-Ed25519", hex(&sig))
            .header("X-Signature-Timestamp", ts)
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn discord_ping_commands_and_buttons() {
    let fake = Fake::default();
    let url = start_fake(&fake).await;
    let k = keys();
    let tmp = tempfile::tempdir().unwrap();
    let s = start_with(tmp.path(), &config(&url, &k, r#"unlinked = "anon""#, ""));
    let base = s.url.clone();
    deploy_bot(&base).await;

    let ping = json!({"id": "1", "type": 1, "application_id": "7"}).to_string();
    let r = discord_post_signed(&base, &k, &ping, false).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"type": 1}));
    let r = discord_post_signed(&base, &k, &ping, true).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["error"]["name"], "CHAT_SIGNATURE_INVALID");

    let command = |id: &str, text: &str| {
        json!({"id": id, "type": 2, "application_id": "7", "channel_id": "555000000000000001", "token": "tok",
               "member": {"user": {"id": "333000000000000001", "username": "ann"}},
               "data": {"id": "9", "name": "say", "type": 1, "options": [{"name": "text", "type": 3, "value": text}]}})
        .to_string()
    };
    let r = discord_post_signed(&base, &k, &command("101", "forged"), true).await;
    assert_eq!(r.status, 401);
    let r = discord_post_signed(&base, &k, &command("102", "hi discord"), false).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["type"], 4, "an ephemeral acknowledgement: {}", r.body);
    assert_eq!(r.json()["data"]["flags"], 64);
    let (p, a, b) = fake.wait_sent("the Discord reply", |p, b| p.starts_with("discord") && b["content"].as_str().unwrap_or("").starts_with("echo: /say hi discord")).await;
    assert_eq!(p, "discord/channels/555000000000000001/messages");
    assert_eq!(a, format!("Bot {DISCORD_TOKEN}"));
    assert_eq!(b["components"][0]["type"], 1);
    assert_eq!(b["components"][0]["components"][0], json!({"type": 2, "style": 1, "label": "Liked it", "custom_id": "like:x"}));
    assert_eq!(b["components"][0]["components"][1]["custom_id"], "boring");

    let button = json!({"id": "103", "type": 3, "application_id": "7", "channel_id": "555000000000000001", "token": "tok",
        "member": {"user": {"id": "333000000000000001", "username": "ann"}}, "message": {"id": "900000000000000001"},
        "data": {"custom_id": "like:x", "component_type": 2}}).to_string();
    let r = discord_post_signed(&base, &k, &button, false).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"type": 6}));
    fake.wait_sent("the button's answer", |p, b| p.starts_with("discord") && b["content"] == "pressed like:x by nil").await;
    assert_eq!(fake.count(|_, b| b["content"].as_str().unwrap_or("").contains("forged")), 0);
}

#[tokio::test]
async fn telegram_long_polling_resumes_at_the_right_offset_after_a_restart() {
    let fake = Fake::default();
    let url = start_fake(&fake).await;
    let k = keys();
    let tmp = tempfile::tempdir().unwrap();
    let toml = config(&url, &k, r#"unlinked = "anon""#, "poll = true\npoll_timeout_secs = 1");
    fake.push_update(tg_message(500, 42, 1, "first"));
    fake.push_update(tg_message(501, 42, 2, "second"));
    let mut s = start_with(tmp.path(), &toml);
    deploy_bot(&s.url).await;
    fake.wait_sent("the first reply", |_, b| b["text"].as_str().unwrap().starts_with("echo: first")).await;
    fake.wait_sent("the second reply", |_, b| b["text"].as_str().unwrap().starts_with("echo: second")).await;
    // The poller confirmed both (asked for offset 502) before the stop.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fake.0.lock().unwrap().offsets.contains(&502) {
        assert!(Instant::now() < deadline, "offsets: {:?}", fake.0.lock().unwrap().offsets);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.terminate();

    // While the server is down, one more update arrives; the fake still holds the earlier
    // ones for anyone asking from an older offset.
    {
        let mut st = fake.0.lock().unwrap();
        st.offsets.clear();
        st.updates.push_back(tg_message(500, 42, 1, "first"));
        st.updates.push_back(tg_message(501, 42, 2, "second"));
    }
    fake.push_update(tg_message(502, 42, 3, "third"));
    let s = start_with(tmp.path(), &toml);
    fake.wait_sent("the reply after the restart", |_, b| b["text"].as_str().unwrap().starts_with("echo: third")).await;
    assert_eq!(fake.0.lock().unwrap().offsets.first(), Some(&502), "the first getUpdates after the restart resumes at the stored offset");
    tokio::time::sleep(Duration::from_secs(1)).await;
    for t in ["echo: first", "echo: second", "echo: third"] {
        assert_eq!(fake.count(|_, b| b["text"].as_str().unwrap().starts_with(t)), 1, "{t} was handled once");
    }
    let handled = wait_inbox(&s.url, "handled", 3).await;
    assert_eq!(handled.len(), 3);
}

#[tokio::test]
async fn unlinked_senders_are_quarantined_and_rate_limited() {
    let fake = Fake::default();
    let url = start_fake(&fake).await;
    let k = keys();
    let tmp = tempfile::tempdir().unwrap();
    let extra = "unlinked = \"quarantine\"\nunlinked_reply = \"Please link your account first.\"\nrate_burst = 2\nrate_per_minute = 1";
    let s = start_with(tmp.path(), &config(&url, &k, extra, ""));
    let base = s.url.clone();
    deploy_bot(&base).await;
    for i in 0..4 {
        let r = tg_webhook(&base, Some(TG_SECRET), tg_message(10 + i, 77, 20 + i, &format!("spam {i}"))).await;
        assert_eq!(r.status, 200);
    }
    let q = wait_inbox(&base, "quarantined", 2).await;
    assert_eq!(q.len(), 2);
    assert_eq!(q[0]["message"]["from_id"], "77");
    let limited = wait_inbox(&base, "limited", 2).await;
    assert_eq!(limited.len(), 2);
    fake.wait_sent("the unlinked reply", |_, b| b["text"] == "Please link your account first.").await;
    assert_eq!(fake.count(|_, b| b["text"].as_str().unwrap().starts_with("echo:")), 0, "no handler ran");
    // The inbox is the admin's.
    let r = read(anon_client().get(format!("{base}/chat/inbox")).send().await.unwrap()).await;
    assert_eq!(r.status, 401);
}
