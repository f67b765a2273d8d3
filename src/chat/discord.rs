//! Discord: the interactions endpoint (`POST /chat/discord/interactions`), verified with the
//! application's Ed25519 public key over `X-Signature-Timestamp` + body (`X-Signature-Ed25519`,
//! hex); PING answered PONG; slash commands (the text is `/name` and the options' values) and
//! button presses (`custom_id` = the button's data) go to the inbox; channel messages are sent
//! with the bot API (`POST /channels/{id}/messages`, buttons as components).
//!
//! Owns the Discord requests and parsing; must not run handlers (the inbox does).

use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Value as Json, json};

use super::inbound::{self, Inbound};
use super::{Chat, hex_decode, log_event, now_secs, secret};
use crate::apis::{App, error_response};
use crate::core::{Error, ErrorCode};

/// Check the Ed25519 signature of `timestamp + body`.
pub fn verify(public_key_hex: &str, sig_hex: &str, timestamp: &str, body: &[u8]) -> bool {
    let (Some(key), Some(sig)) = (hex_decode(public_key_hex), hex_decode(sig_hex)) else { return false };
    if key.len() != 32 || sig.len() != 64 {
        return false;
    }
    let mut msg = Vec::with_capacity(timestamp.len() + body.len());
    msg.extend_from_slice(timestamp.as_bytes());
    msg.extend_from_slice(body);
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &key)
        .verify(&msg, &sig)
        .is_ok()
}

fn user_of(i: &Json) -> Option<&Json> {
    i.get("member").and_then(|m| m.get("user")).or_else(|| i.get("user"))
}

fn str_of(v: Option<&Json>) -> Option<String> {
    v.and_then(Json::as_str).map(str::to_string)
}

/// A slash command's text: `/name` and its options' values (sub-commands flattened).
fn command_text(data: &Json) -> String {
    fn walk(opts: Option<&Json>, out: &mut Vec<String>) {
        for o in opts.and_then(Json::as_array).into_iter().flatten() {
            match o.get("value") {
                Some(Json::String(s)) => out.push(s.clone()),
                Some(v @ (Json::Number(_) | Json::Bool(_))) => out.push(v.to_string()),
                _ => {
                    if let Some(n) = o.get("name").and_then(Json::as_str) {
                        out.push(n.to_string());
                    }
                    walk(o.get("options"), out);
                }
            }
        }
    }
    let mut parts = vec![format!("/{}", data.get("name").and_then(Json::as_str).unwrap_or(""))];
    walk(data.get("options"), &mut parts);
    parts.join(" ")
}

/// An interaction (command or button) as an inbound message.
pub fn parse_interaction(i: &Json) -> Option<Inbound> {
    let kind = i.get("type").and_then(Json::as_i64)?;
    let user = user_of(i)?;
    let base = Inbound {
        provider: "discord".into(),
        event_id: str_of(i.get("id"))?,
        chat_id: str_of(i.get("channel_id")).or_else(|| str_of(i.get("channel").and_then(|c| c.get("id"))))?,
        from_id: str_of(user.get("id"))?,
        from_name: str_of(user.get("global_name")).or_else(|| str_of(user.get("username"))),
        text: None,
        message_id: None,
        reply_to: None,
        callback: None,
        callback_id: None,
    };
    match kind {
        2 => Some(Inbound { text: Some(command_text(i.get("data")?)), ..base }),
        3 => {
            let mid = str_of(i.get("message").and_then(|m| m.get("id")));
            Some(Inbound {
                callback: Some(str_of(i.get("data").and_then(|d| d.get("custom_id"))).unwrap_or_default()),
                message_id: mid.clone(),
                reply_to: mid,
                ..base
            })
        }
        _ => None,
    }
}

/// `POST /chat/discord/interactions`.
pub async fn interactions(app: &App, headers: &HeaderMap, body: &[u8]) -> Response {
    let Some(chat) = app.get::<Chat>() else {
        return error_response(&super::not_configured("discord", "the module"), true, None);
    };
    let s = &chat.settings.discord;
    if s.public_key.is_empty() {
        return error_response(&super::not_configured("discord", "public_key"), true, None);
    }
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    let (sig, ts) = (h("x-signature-ed25519"), h("x-signature-timestamp"));
    if !verify(&s.public_key, sig, ts, body) {
        log_event(app, None, None, "discord", "forged", 0.0, Some("X-Signature-Ed25519 does not verify"), json!({}));
        return error_response(&Error::new(ErrorCode::ChatSignatureInvalid, "chat: X-Signature-Ed25519 does not verify"), true, None);
    }
    let window = s.timestamp_window_secs as i64;
    if ts.parse::<i64>().map_or(true, |t| (now_secs() - t).abs() > window) {
        log_event(app, None, None, "discord", "forged", 0.0, Some("X-Signature-Timestamp outside the window"), json!({}));
        return error_response(
            &Error::new(ErrorCode::ChatReplayed, format!("chat: X-Signature-Timestamp is outside [chat.discord] timestamp_window_secs ({window})")),
            true,
            None,
        );
    }
    let i: Json = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return error_response(&Error::new(ErrorCode::BadArguments, format!("chat: the interaction is not JSON: {e}")), true, None),
    };
    let kind = i.get("type").and_then(Json::as_i64).unwrap_or(0);
    if kind == 1 {
        return axum::Json(json!({"type": 1})).into_response();
    }
    let msgs: Vec<Inbound> = parse_interaction(&i).into_iter().collect();
    if let Err(e) = inbound::accept(app, msgs, None).await {
        return error_response(&e, true, None);
    }
    let answer = match kind {
        // A button: acknowledged without changing the message.
        3 => json!({"type": 6}),
        // A command: an ephemeral acknowledgement, or "thinking..." without one.
        _ if !s.ack_text.is_empty() => json!({"type": 4, "data": {"content": s.ack_text, "flags": 64}}),
        _ => json!({"type": 5}),
    };
    axum::Json(answer).into_response()
}

/// The `POST /channels/{id}/messages` body of an outbox message.
pub fn send_body(text: &str, buttons: &[(String, String)], reply_to: Option<&str>) -> Json {
    let mut body = json!({"content": text, "allowed_mentions": {"parse": []}});
    if !buttons.is_empty() {
        let rows: Vec<Json> = buttons
            .chunks(super::send::ROW)
            .map(|row| {
                json!({"type": 1, "components": row.iter().map(|(t, d)| json!({"type": 2, "style": 1, "label": t, "custom_id": d})).collect::<Vec<_>>()})
            })
            .collect();
        body["components"] = Json::Array(rows);
    }
    if let Some(m) = reply_to {
        body["message_reference"] = json!({"message_id": m, "fail_if_not_exists": false});
    }
    body
}

pub async fn send(app: &App, chat_id: &str, body: &Json) -> std::result::Result<Json, (bool, String)> {
    let chat = app.get::<Chat>().expect("chat service");
    let s = &chat.settings.discord;
    let token = secret(app, "discord", &s.bot_token, &s.bot_token_vault, &s.base_url).await.map_err(|e| (true, e.message))?;
    // chat_id is digits only (checked when queued): safe in the path.
    let resp = chat
        .http
        .post(format!("{}/channels/{chat_id}/messages", s.base_url.trim_end_matches('/')))
        .header("Authorization", format!("Bot {token}"))
        .json(body)
        .send()
        .await
        .map_err(|e| (true, format!("create message: {e}")))?;
    let code = resp.status().as_u16();
    let answer: Json = resp.json().await.unwrap_or(Json::Null);
    match code {
        200..=299 => Ok(json!({"id": answer.get("id")})),
        429 | 500..=599 => Err((true, format!("create message answered {code}: {}", answer.get("message").unwrap_or(&answer)))),
        _ => Err((false, format!("create message answered {code}: {}", answer.get("message").unwrap_or(&answer)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_forgeries_do_not() {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        use ring::signature::KeyPair;
        let pk = super::super::hex_encode(kp.public_key().as_ref());
        let sig = super::super::hex_encode(kp.sign(b"123{\"type\":1}").as_ref());
        assert!(verify(&pk, &sig, "123", b"{\"type\":1}"));
        assert!(!verify(&pk, &sig, "124", b"{\"type\":1}"));
        assert!(!verify(&pk, &sig, "123", b"{\"type\":2}"));
        assert!(!verify(&pk, "00", "123", b"{}"));
    }

    #[test]
    fn commands_and_buttons_parse() {
        let c = parse_interaction(&json!({"id": "1", "type": 2, "channel_id": "55", "member": {"user": {"id": "9", "username": "ann"}},
            "data": {"name": "say", "options": [{"name": "text", "type": 3, "value": "hello there"}]}})).unwrap();
        assert_eq!((c.text.as_deref(), c.chat_id.as_str(), c.from_id.as_str()), (Some("/say hello there"), "55", "9"));
        let b = parse_interaction(&json!({"id": "2", "type": 3, "channel_id": "55", "user": {"id": "9"}, "message": {"id": "77"},
            "data": {"custom_id": "like:1", "component_type": 2}})).unwrap();
        assert_eq!((b.callback.as_deref(), b.reply_to.as_deref()), (Some("like:1"), Some("77")));
    }
}
