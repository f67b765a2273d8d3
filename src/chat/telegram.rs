//! Telegram Bot API: the webhook (`POST /chat/telegram/webhook`, checked against
//! `X-Telegram-Bot-Api-Secret-Token`), long polling with `getUpdates` (the next offset is kept
//! in `_ichibase_chat_state` in the same transaction as the inbox rows, so a restart resumes
//! after the last stored update and no update is handled twice), `sendMessage` with
//! `reply_markup.inline_keyboard`, and `answerCallbackQuery` for button presses.
//!
//! Owns the Telegram requests and the parsing of updates; must not run handlers (the inbox does).

use std::time::Duration;

use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Value as Json, json};

use super::inbound::{self, Inbound};
use super::{Chat, log_event, secret};
use crate::apis::{App, error_response};
use crate::core::{Error, ErrorCode};

/// The offset's key in `_ichibase_chat_state`.
pub const OFFSET_KEY: &str = "telegram.offset";

fn id_string(v: &Json) -> Option<String> {
    match v {
        Json::Number(n) => Some(n.to_string()),
        Json::String(s) if !s.is_empty() && s.len() <= 64 => Some(s.clone()),
        _ => None,
    }
}

fn name_of(from: &Json) -> Option<String> {
    let first = from.get("first_name").and_then(Json::as_str);
    let last = from.get("last_name").and_then(Json::as_str);
    match (first, last) {
        (Some(f), Some(l)) => Some(format!("{f} {l}")),
        (Some(f), None) => Some(f.to_string()),
        _ => from.get("username").and_then(Json::as_str).map(str::to_string),
    }
}

/// One update as an inbound message; `None` for kinds the handler does not get (edits,
/// channel posts, ...).
pub fn parse_update(u: &Json) -> Option<Inbound> {
    let update_id = u.get("update_id").and_then(Json::as_i64)?;
    if let Some(m) = u.get("message") {
        let from = m.get("from")?;
        return Some(Inbound {
            provider: "telegram".into(),
            event_id: update_id.to_string(),
            chat_id: id_string(m.get("chat")?.get("id")?)?,
            from_id: id_string(from.get("id")?)?,
            from_name: name_of(from),
            text: m.get("text").or_else(|| m.get("caption")).and_then(Json::as_str).map(str::to_string),
            message_id: m.get("message_id").and_then(id_string),
            reply_to: m.get("reply_to_message").and_then(|r| r.get("message_id")).and_then(id_string),
            callback: None,
            callback_id: None,
        });
    }
    if let Some(q) = u.get("callback_query") {
        let from = q.get("from")?;
        let msg = q.get("message");
        return Some(Inbound {
            provider: "telegram".into(),
            event_id: update_id.to_string(),
            chat_id: msg.and_then(|m| m.get("chat")).and_then(|c| c.get("id")).and_then(id_string)
                .or_else(|| id_string(from.get("id")?))?,
            from_id: id_string(from.get("id")?)?,
            from_name: name_of(from),
            text: None,
            message_id: msg.and_then(|m| m.get("message_id")).and_then(id_string),
            reply_to: msg.and_then(|m| m.get("message_id")).and_then(id_string),
            callback: Some(q.get("data").and_then(Json::as_str).unwrap_or("").to_string()),
            callback_id: q.get("id").and_then(Json::as_str).map(str::to_string),
        });
    }
    None
}

/// `POST /chat/telegram/webhook`.
pub async fn webhook(app: &App, headers: &HeaderMap, body: &[u8]) -> Response {
    let Some(chat) = app.get::<Chat>() else {
        return error_response(&super::not_configured("telegram", "the module"), true, None);
    };
    let expected = &chat.settings.telegram.webhook_secret;
    if expected.is_empty() {
        return error_response(&super::not_configured("telegram", "webhook_secret"), true, None);
    }
    let given = headers.get("x-telegram-bot-api-secret-token").map(|v| v.as_bytes()).unwrap_or(b"");
    if !super::same(given, expected.as_bytes()) {
        log_event(app, None, None, "telegram", "forged", 0.0, Some("X-Telegram-Bot-Api-Secret-Token does not match"), json!({}));
        return error_response(
            &Error::new(ErrorCode::ChatSignatureInvalid, "chat: X-Telegram-Bot-Api-Secret-Token is missing or wrong"),
            true,
            None,
        );
    }
    let update: Json = match serde_json::from_slice(body) {
        Ok(u) => u,
        Err(e) => return error_response(&Error::new(ErrorCode::BadArguments, format!("chat: the update is not JSON: {e}")), true, None),
    };
    let msgs: Vec<Inbound> = parse_update(&update).into_iter().collect();
    match inbound::accept(app, msgs, None).await {
        Ok(_) => axum::Json(json!({"ok": true})).into_response(),
        // Telegram retries a failed delivery: the inbox's dedupe makes that safe.
        Err(e) => error_response(&e, true, None),
    }
}

/// The Bot API method URL (the token is a path segment).
fn method_url(base: &str, token: &str, method: &str) -> String {
    format!("{}/bot{token}/{method}", base.trim_end_matches('/'))
}

async fn token(app: &App) -> crate::core::Result<String> {
    let s = &app.get::<Chat>().expect("chat service").settings.telegram;
    secret(app, "telegram", &s.token, &s.token_vault, &s.base_url).await
}

/// Start the long poller (`[chat.telegram] poll = true`).
pub fn start_poller(app: &App) -> anyhow::Result<()> {
    let Some(chat) = app.get::<Chat>() else { return Ok(()) };
    if !chat.settings.telegram.poll {
        return Ok(());
    }
    anyhow::ensure!(
        chat.settings.can_send("telegram"),
        "[chat.telegram] poll = true needs token or token_vault"
    );
    let rt = tokio::runtime::Handle::try_current()?;
    let app = app.clone();
    rt.spawn(async move { poller(app).await });
    Ok(())
}

async fn poller(app: App) {
    let chat = app.get::<Chat>().expect("chat service");
    let s = chat.settings.telegram.clone();
    let mut backoff = Duration::from_millis(500);
    loop {
        match poll_once(&app, chat, &s).await {
            Ok(()) => backoff = Duration::from_millis(500),
            Err(e) => {
                tracing::warn!(error = %e, "chat: telegram getUpdates failed");
                log_event(&app, None, None, "telegram", "poll_failed", 0.0, Some(&e.message), json!({}));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

async fn poll_once(app: &App, chat: &Chat, s: &super::TelegramSettings) -> crate::core::Result<()> {
    let offset: i64 = inbound::state(app, OFFSET_KEY).await?.and_then(|v| v.parse().ok()).unwrap_or(0);
    let token = token(app).await?;
    let body = json!({"offset": offset, "timeout": s.poll_timeout_secs, "allowed_updates": ["message", "callback_query"]});
    let resp = chat
        .http
        .post(method_url(&s.base_url, &token, "getUpdates"))
        .timeout(Duration::from_secs(s.poll_timeout_secs + 30))
        .json(&body)
        .send()
        .await
        .map_err(|e| Error::new(ErrorCode::EgressFailed, format!("getUpdates: {}", without(&e.to_string(), &token))))?;
    let code = resp.status().as_u16();
    let answer: Json = resp.json().await.unwrap_or(Json::Null);
    if code != 200 || answer.get("ok") != Some(&Json::Bool(true)) {
        return Err(Error::new(ErrorCode::EgressFailed, format!("getUpdates answered {code}: {}", answer.get("description").unwrap_or(&answer))));
    }
    let updates = answer.get("result").and_then(Json::as_array).cloned().unwrap_or_default();
    let Some(last) = updates.iter().filter_map(|u| u.get("update_id").and_then(Json::as_i64)).max() else {
        return Ok(());
    };
    let msgs: Vec<Inbound> = updates.iter().filter_map(parse_update).collect();
    // The inbox rows and the next offset commit together.
    inbound::accept(app, msgs, Some((OFFSET_KEY.to_string(), (last + 1).to_string()))).await?;
    Ok(())
}

/// A message with the token taken out (reqwest errors name the URL).
fn without(msg: &str, token: &str) -> String {
    if token.is_empty() { msg.to_string() } else { msg.replace(token, "***") }
}

/// Answer a button press (best effort: the query expires after a while anyway).
pub async fn answer_callback(app: &App, id: &str) {
    let Some(chat) = app.get::<Chat>() else { return };
    let s = &chat.settings.telegram;
    let Ok(token) = token(app).await else { return };
    let r = chat
        .http
        .post(method_url(&s.base_url, &token, "answerCallbackQuery"))
        .json(&json!({"callback_query_id": id}))
        .send()
        .await;
    let (outcome, err) = match r {
        Ok(r) if r.status().is_success() => ("answered", None),
        Ok(r) => ("answer_failed", Some(format!("answerCallbackQuery answered {}", r.status()))),
        Err(e) => ("answer_failed", Some(without(&e.to_string(), &token))),
    };
    log_event(app, None, None, "telegram", outcome, 0.0, err.as_deref(), json!({"callback_query_id": id}));
}

/// The `sendMessage` body of an outbox message.
pub fn send_body(chat_id: &str, text: &str, buttons: &[(String, String)], reply_to: Option<&str>) -> Json {
    let chat: Json = chat_id.parse::<i64>().map(Json::from).unwrap_or_else(|_| Json::from(chat_id));
    let mut body = json!({"chat_id": chat, "text": text});
    if !buttons.is_empty() {
        let rows: Vec<Json> = buttons
            .chunks(super::send::ROW)
            .map(|row| Json::Array(row.iter().map(|(t, d)| json!({"text": t, "callback_data": d})).collect()))
            .collect();
        body["reply_markup"] = json!({"inline_keyboard": rows});
    }
    if let Some(r) = reply_to.and_then(|r| r.parse::<i64>().ok()) {
        body["reply_parameters"] = json!({"message_id": r, "allow_sending_without_reply": true});
    }
    body
}

/// Send one message; `Ok(message id)` or an error with whether to retry.
pub async fn send(app: &App, body: &Json) -> std::result::Result<Json, (bool, String)> {
    let chat = app.get::<Chat>().expect("chat service");
    let s = &chat.settings.telegram;
    let token = token(app).await.map_err(|e| (true, e.message))?;
    let resp = chat
        .http
        .post(method_url(&s.base_url, &token, "sendMessage"))
        .json(body)
        .send()
        .await
        .map_err(|e| (true, format!("sendMessage: {}", without(&e.to_string(), &token))))?;
    let code = resp.status().as_u16();
    let answer: Json = resp.json().await.unwrap_or(Json::Null);
    match code {
        200 if answer.get("ok") == Some(&Json::Bool(true)) => {
            Ok(json!({"message_id": answer.get("result").and_then(|r| r.get("message_id"))}))
        }
        429 | 500..=599 => Err((true, format!("sendMessage answered {code}: {}", answer.get("description").unwrap_or(&answer)))),
        _ => Err((false, format!("sendMessage answered {code}: {}", answer.get("description").unwrap_or(&answer)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_parse_into_messages_and_button_presses() {
        let m = parse_update(&json!({"update_id": 7, "message": {"message_id": 3, "from": {"id": 42, "first_name": "Ann"},
            "chat": {"id": -100, "type": "group"}, "text": "hi", "reply_to_message": {"message_id": 2}}})).unwrap();
        assert_eq!((m.event_id.as_str(), m.chat_id.as_str(), m.from_id.as_str()), ("7", "-100", "42"));
        assert_eq!((m.text.as_deref(), m.reply_to.as_deref(), m.from_name.as_deref()), (Some("hi"), Some("2"), Some("Ann")));
        let q = parse_update(&json!({"update_id": 8, "callback_query": {"id": "cq", "data": "like:1", "from": {"id": 42, "username": "ann"},
            "message": {"message_id": 9, "chat": {"id": 42}}}})).unwrap();
        assert_eq!((q.callback.as_deref(), q.callback_id.as_deref(), q.chat_id.as_str()), (Some("like:1"), Some("cq"), "42"));
        assert!(parse_update(&json!({"update_id": 9, "edited_message": {}})).is_none());
        assert!(parse_update(&json!({"message": {}})).is_none());
    }

    #[test]
    fn send_bodies_carry_the_keyboard_and_reply() {
        let b = send_body("42", "t", &[("Yes".into(), "y".into()), ("No".into(), "n".into())], Some("5"));
        assert_eq!(b["chat_id"], 42);
        assert_eq!(b["reply_markup"]["inline_keyboard"][0][1]["callback_data"], "n");
        assert_eq!(b["reply_parameters"]["message_id"], 5);
        assert!(send_body("@chan", "t", &[], None).get("reply_markup").is_none());
    }
}
