//! The chat HTTP API:
//! - inbound, verified by each provider's scheme (no identity): `POST /chat/telegram/webhook`,
//!   `POST /chat/slack/events` (events and interactive payloads), `POST /chat/discord/interactions`;
//! - linking (a signed-in user): `POST /chat/link` → a one-time code to send to the bot as
//!   `/link CODE`; `GET /chat/links` (the admin sees all); `DELETE /chat/links/{provider}/{sender_id}`;
//! - `GET /chat/inbox[?status=&limit=]` (admin): inbound messages and what became of them
//!   (`quarantined` ones wait there).

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{delete, get, post};
use rusqlite::params;
use serde_json::json;

use super::{Chat, PROVIDERS, inbound};
use crate::apis::{Admin, App, BodyBytes, Caller, reply};
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::storage::ExecControl;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/chat/telegram/webhook", post(telegram_webhook))
        .route("/chat/slack/events", post(slack_events))
        .route("/chat/discord/interactions", post(discord_interactions))
        .route("/chat/link", post(new_link))
        .route("/chat/links", get(list_links))
        .route("/chat/links/{provider}/{sender}", delete(unlink))
        .route("/chat/inbox", get(inbox))
}

async fn telegram_webhook(State(app): State<App>, headers: HeaderMap, BodyBytes(body): BodyBytes) -> Response {
    super::telegram::webhook(&app, &headers, &body).await
}

async fn slack_events(State(app): State<App>, headers: HeaderMap, BodyBytes(body): BodyBytes) -> Response {
    super::slack::events(&app, &headers, &body).await
}

async fn discord_interactions(State(app): State<App>, headers: HeaderMap, BodyBytes(body): BodyBytes) -> Response {
    super::discord::interactions(&app, &headers, &body).await
}

fn service(app: &App) -> Result<&Chat> {
    app.get::<Chat>().ok_or_else(|| Error::new(ErrorCode::NotImplemented, "the chat module is not running"))
}

async fn new_link(State(app): State<App>, Caller(ctx): Caller) -> Response {
    let r = async {
        let chat = service(&app)?;
        let user = ctx.user_id.clone().ok_or_else(|| {
            Error::new(ErrorCode::AccessDenied, "chat: sign in first (a link code ties a chat to your user)")
        })?;
        let ttl = chat.settings.link_code_ttl_secs;
        let (code, expires) = inbound::new_code(&app, &user, ttl).await?;
        Ok(json!({"code": code, "command": format!("/link {code}"), "expires_at": expires, "expires_in": ttl,
                  "hint": "send the command to the bot in a direct message"}))
    }
    .await;
    reply(r)
}

async fn list_links(State(app): State<App>, Caller(ctx): Caller) -> Response {
    let r = async {
        let filter = if ctx.is_admin() {
            None
        } else {
            Some(ctx.user_id.clone().ok_or_else(|| Error::new(ErrorCode::AccessDenied, "chat: sign in first"))?)
        };
        let rows = app
            .storage()
            .read(&RequestContext::system(), ExecControl::lookup(), move |c| {
                let mut st = c.prepare(
                    "SELECT provider, sender_id, user_id, chat_id, name, created_at FROM _ichibase_chat_links
                      WHERE (?1 IS NULL OR user_id = ?1) ORDER BY created_at DESC LIMIT 1000",
                )?;
                let rows = st.query_map([filter], |r| {
                    Ok(json!({"provider": r.get::<_, String>(0)?, "sender_id": r.get::<_, String>(1)?, "user_id": r.get::<_, String>(2)?,
                              "chat_id": r.get::<_, String>(3)?, "name": r.get::<_, Option<String>>(4)?, "created_ms": r.get::<_, i64>(5)?}))
                })?;
                Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
            })
            .await?;
        Ok(json!({"links": rows}))
    }
    .await;
    reply(r)
}

async fn unlink(State(app): State<App>, Caller(ctx): Caller, Path((provider, sender)): Path<(String, String)>) -> Response {
    let r = async {
        if !PROVIDERS.contains(&provider.as_str()) {
            return Err(Error::new(ErrorCode::BadArguments, format!("chat: provider {provider:?} is not one of {}", PROVIDERS.join(", "))));
        }
        let owner = if ctx.is_admin() {
            None
        } else {
            Some(ctx.user_id.clone().ok_or_else(|| Error::new(ErrorCode::AccessDenied, "chat: sign in first"))?)
        };
        let (p, s) = (provider.clone(), sender.clone());
        let n = app
            .storage()
            .write(&RequestContext::system(), ExecControl::lookup(), move |c| {
                Ok(c.execute(
                    "DELETE FROM _ichibase_chat_links WHERE provider = ?1 AND sender_id = ?2 AND (?3 IS NULL OR user_id = ?3)",
                    params![p, s, owner],
                )?)
            })
            .await?;
        if n == 0 {
            return Err(Error::new(ErrorCode::NotFound, format!("chat: no link of {provider} user {sender:?} here")));
        }
        Ok(json!({"deleted": {"provider": provider, "sender_id": sender}}))
    }
    .await;
    reply(r)
}

async fn inbox(State(app): State<App>, Admin(_ctx): Admin, RawQuery(raw): RawQuery) -> Response {
    let r = async {
        let mut status: Option<String> = None;
        let mut limit: i64 = 100;
        for (k, v) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
            match k.as_ref() {
                "status" => status = Some(v.into_owned()),
                "limit" => {
                    limit = v.parse::<i64>().ok().filter(|n| (1..=1000).contains(n)).ok_or_else(|| {
                        Error::new(ErrorCode::BadArguments, format!("limit={v}: a number from 1 to 1000"))
                    })?
                }
                other => return Err(Error::new(ErrorCode::BadArguments, format!("unknown parameter {other:?} (status, limit)"))),
            }
        }
        let rows = app
            .storage()
            .read(&RequestContext::system(), ExecControl::lookup(), move |c| {
                let mut st = c.prepare(
                    "SELECT id, provider, event_id, message, status, user_id, error, created_at, updated_at FROM _ichibase_chat_inbox
                      WHERE (?1 IS NULL OR status = ?1) ORDER BY id DESC LIMIT ?2",
                )?;
                let rows = st.query_map(params![status, limit], |r| {
                    let msg: String = r.get(3)?;
                    Ok(json!({"id": r.get::<_, i64>(0)?, "provider": r.get::<_, String>(1)?, "event_id": r.get::<_, String>(2)?,
                              "message": serde_json::from_str::<serde_json::Value>(&msg).unwrap_or_default(),
                              "status": r.get::<_, String>(4)?, "user_id": r.get::<_, Option<String>>(5)?,
                              "error": r.get::<_, Option<String>>(6)?, "created_ms": r.get::<_, i64>(7)?, "updated_ms": r.get::<_, i64>(8)?}))
                })?;
                Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
            })
            .await?;
        Ok(json!({"messages": rows}))
    }
    .await;
    reply(r)
}
