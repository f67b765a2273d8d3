//! Slack: the Events API and interactivity route (`POST /chat/slack/events`), verified with
//! the signing secret (`X-Slack-Signature` = `v0=` + hex HMAC-SHA256 of `v0:{ts}:{body}`,
//! `X-Slack-Request-Timestamp` within `timestamp_window_secs`, a signature seen before in the
//! window refused), the `url_verification` challenge, `message` / `app_mention` events,
//! `block_actions` payloads (`payload=` form field) for button presses, and
//! `chat.postMessage` with a section block and an actions block of buttons.
//!
//! Owns the Slack requests and parsing; must not run handlers (the inbox does).

use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Value as Json, json};

use super::inbound::{self, Inbound};
use super::{Chat, log_event, now_secs, secret};
use crate::apis::{App, error_response};
use crate::core::{Error, ErrorCode};

/// `v0=` + hex HMAC-SHA256 of `v0:{ts}:{body}`.
pub fn signature(secret: &[u8], ts: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(b"v0:");
    ctx.update(ts.as_bytes());
    ctx.update(b":");
    ctx.update(body);
    format!("v0={}", super::hex_encode(ctx.sign().as_ref()))
}

/// Check a request's signature and timestamp; refuse a signature seen before.
fn verify(chat: &Chat, secret: &str, headers: &HeaderMap, body: &[u8]) -> Result<(), Error> {
    let bad = |m: &str| Error::new(ErrorCode::ChatSignatureInvalid, format!("chat: {m}"));
    let ts = headers
        .get("x-slack-request-timestamp")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| bad("X-Slack-Request-Timestamp is missing"))?;
    let t: i64 = ts.parse().map_err(|_| bad("X-Slack-Request-Timestamp is not a number"))?;
    let given = headers
        .get("x-slack-signature")
        .map(|v| v.as_bytes())
        .ok_or_else(|| bad("X-Slack-Signature is missing"))?;
    let expected = signature(secret.as_bytes(), ts, body);
    if !super::same(given, expected.as_bytes()) {
        return Err(bad("X-Slack-Signature does not verify"));
    }
    let window = chat.settings.slack.timestamp_window_secs as i64;
    let now = now_secs();
    if (now - t).abs() > window {
        return Err(Error::new(
            ErrorCode::ChatReplayed,
            format!("chat: X-Slack-Request-Timestamp is {} s from now, outside [chat.slack] timestamp_window_secs ({window})", now - t),
        ));
    }
    let mut seen = chat.slack_seen.lock().unwrap();
    seen.retain(|_, at| (now - *at).abs() <= window);
    if seen.insert(expected, t).is_some() {
        return Err(Error::new(ErrorCode::ChatReplayed, "chat: this Slack request was seen before (replayed)"));
    }
    Ok(())
}

/// One Events API body or interactive payload as an inbound message (`None`: not for the
/// handler, e.g. the bot's own messages or edits).
pub fn parse_event(body: &Json) -> Option<Inbound> {
    let s = |v: Option<&Json>| v.and_then(Json::as_str).map(str::to_string);
    match body.get("type").and_then(Json::as_str)? {
        "event_callback" => {
            let e = body.get("event")?;
            let kind = e.get("type").and_then(Json::as_str)?;
            if !matches!(kind, "message" | "app_mention") || e.get("bot_id").is_some() || e.get("subtype").is_some() {
                return None;
            }
            Some(Inbound {
                provider: "slack".into(),
                event_id: s(body.get("event_id"))?,
                chat_id: s(e.get("channel"))?,
                from_id: s(e.get("user"))?,
                from_name: None,
                text: s(e.get("text")),
                message_id: s(e.get("ts")),
                reply_to: s(e.get("thread_ts")),
                callback: None,
                callback_id: None,
            })
        }
        "block_actions" => {
            let a = body.get("actions")?.as_array()?.first()?;
            let user = body.get("user")?;
            let message_ts = s(body.get("message").and_then(|m| m.get("ts")))
                .or_else(|| s(body.get("container").and_then(|c| c.get("message_ts"))));
            Some(Inbound {
                provider: "slack".into(),
                event_id: format!(
                    "action:{}:{}",
                    s(user.get("id"))?,
                    s(a.get("action_ts")).or_else(|| s(body.get("trigger_id")))?
                ),
                chat_id: s(body.get("channel").and_then(|c| c.get("id")))
                    .or_else(|| s(body.get("container").and_then(|c| c.get("channel_id"))))?,
                from_id: s(user.get("id"))?,
                from_name: s(user.get("name")).or_else(|| s(user.get("username"))),
                text: None,
                message_id: message_ts.clone(),
                reply_to: message_ts,
                callback: Some(s(a.get("value")).unwrap_or_default()),
                callback_id: None,
            })
        }
        _ => None,
    }
}

/// `POST /chat/slack/events`: events (JSON) and interactive payloads (`payload=` form).
pub async fn events(app: &App, headers: &HeaderMap, body: &[u8]) -> Response {
    let Some(chat) = app.get::<Chat>() else {
        return error_response(&super::not_configured("slack", "the module"), true, None);
    };
    let s = &chat.settings.slack;
    if s.signing_secret.is_empty() && s.signing_secret_vault.is_empty() {
        return error_response(&super::not_configured("slack", "signing_secret"), true, None);
    }
    let secret = match secret(app, "slack", &s.signing_secret, &s.signing_secret_vault, &s.base_url).await {
        Ok(v) => v,
        Err(e) => return error_response(&e, true, None),
    };
    if let Err(e) = verify(chat, &secret, headers, body) {
        log_event(app, None, None, "slack", "forged", 0.0, Some(&e.message), json!({}));
        return error_response(&e, true, None);
    }
    let form = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let parsed: Result<Json, String> = if form {
        form_urlencoded::parse(body)
            .find(|(k, _)| k == "payload")
            .ok_or_else(|| "the form has no payload field".to_string())
            .and_then(|(_, v)| serde_json::from_str(&v).map_err(|e| e.to_string()))
    } else {
        serde_json::from_slice(body).map_err(|e| e.to_string())
    };
    let parsed = match parsed {
        Ok(j) => j,
        Err(e) => return error_response(&Error::new(ErrorCode::BadArguments, format!("chat: unreadable Slack request: {e}")), true, None),
    };
    if parsed.get("type").and_then(Json::as_str) == Some("url_verification") {
        let challenge = parsed.get("challenge").and_then(Json::as_str).unwrap_or("");
        return axum::Json(json!({"challenge": challenge})).into_response();
    }
    let msgs: Vec<Inbound> = parse_event(&parsed).into_iter().collect();
    match inbound::accept(app, msgs, None).await {
        Ok(_) => axum::http::StatusCode::OK.into_response(),
        Err(e) => error_response(&e, true, None),
    }
}

/// The `chat.postMessage` body of an outbox message.
pub fn send_body(chat_id: &str, text: &str, buttons: &[(String, String)], reply_to: Option<&str>) -> Json {
    let mut blocks = vec![json!({"type": "section", "text": {"type": "mrkdwn", "text": text}})];
    for (r, row) in buttons.chunks(super::send::ROW).enumerate() {
        let elements: Vec<Json> = row
            .iter()
            .enumerate()
            .map(|(i, (t, d))| {
                json!({"type": "button", "text": {"type": "plain_text", "text": t},
                       "value": d, "action_id": format!("ichibase_{}", r * super::send::ROW + i)})
            })
            .collect();
        blocks.push(json!({"type": "actions", "elements": elements}));
    }
    let mut body = json!({"channel": chat_id, "text": text, "blocks": blocks});
    if let Some(ts) = reply_to {
        body["thread_ts"] = json!(ts);
    }
    body
}

pub async fn send(app: &App, body: &Json) -> std::result::Result<Json, (bool, String)> {
    let chat = app.get::<Chat>().expect("chat service");
    let s = &chat.settings.slack;
    let token = secret(app, "slack", &s.bot_token, &s.bot_token_vault, &s.base_url).await.map_err(|e| (true, e.message))?;
    let resp = chat
        .http
        .post(format!("{}/chat.postMessage", s.base_url.trim_end_matches('/')))
        .bearer_auth(&token)
        .json(body)
        .send()
        .await
        .map_err(|e| (true, format!("chat.postMessage: {e}")))?;
    let code = resp.status().as_u16();
    let answer: Json = resp.json().await.unwrap_or(Json::Null);
    let err = answer.get("error").and_then(Json::as_str).unwrap_or("").to_string();
    match code {
        200 if answer.get("ok") == Some(&Json::Bool(true)) => Ok(json!({"ts": answer.get("ts"), "channel": answer.get("channel")})),
        200 if matches!(err.as_str(), "ratelimited" | "internal_error" | "fatal_error" | "service_unavailable" | "request_timeout") => {
            Err((true, format!("chat.postMessage: {err}")))
        }
        200 => Err((false, format!("chat.postMessage: {err}"))),
        429 | 500..=599 => Err((true, format!("chat.postMessage answered {code}"))),
        _ => Err((false, format!("chat.postMessage answered {code}: {err}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_slacks_example() {
        // The worked example of Slack's "Verifying requests from Slack" guide.
        let body = b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
        assert_eq!(
            signature(b"8f742231b10e8888abcd99yyyzzz85a5", "1531420618", body),
            "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
        );
    }

    #[test]
    fn events_and_button_presses_parse() {
        let m = parse_event(&json!({"type": "event_callback", "event_id": "Ev1",
            "event": {"type": "message", "channel": "D1", "user": "U1", "text": "hi", "ts": "1.2", "thread_ts": "1.1"}})).unwrap();
        assert_eq!((m.chat_id.as_str(), m.from_id.as_str(), m.text.as_deref(), m.reply_to.as_deref()), ("D1", "U1", Some("hi"), Some("1.1")));
        assert!(parse_event(&json!({"type": "event_callback", "event_id": "Ev2",
            "event": {"type": "message", "channel": "D1", "bot_id": "B1", "text": "echo", "ts": "1.3"}})).is_none(), "the bot's own messages");
        let b = parse_event(&json!({"type": "block_actions", "user": {"id": "U1", "name": "ann"}, "channel": {"id": "C1"},
            "message": {"ts": "9.9"}, "actions": [{"action_id": "ichibase_0", "value": "like:1", "action_ts": "10.1"}]})).unwrap();
        assert_eq!((b.callback.as_deref(), b.chat_id.as_str(), b.reply_to.as_deref()), (Some("like:1"), "C1", Some("9.9")));
    }

    #[test]
    fn post_bodies_have_blocks_and_buttons() {
        let b = send_body("C1", "hello", &[("Yes".into(), "y".into())], Some("1.5"));
        assert_eq!(b["blocks"][1]["type"], "actions");
        assert_eq!(b["blocks"][1]["elements"][0]["value"], "y");
        assert_eq!(b["thread_ts"], "1.5");
    }
}
