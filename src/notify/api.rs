//! The notify HTTP API:
//! - `GET /notify/messages[?status=&channel=&limit=&before=]`, `GET /notify/messages/{id}`:
//!   outbox messages and their status (the admin sees all, a signed-in user their own);
//! - `GET /notify/push/vapid`: the VAPID public key browsers subscribe with (generated on first use);
//! - `POST /notify/push/subscriptions` (a browser's `PushSubscription.toJSON()` plus `device`),
//!   `GET /notify/push/subscriptions`, `DELETE /notify/push/subscriptions/{device}`: the caller's
//!   push subscriptions (the admin lists everyone's).

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use axum::routing::{delete, get};
use serde_json::json;

use super::outbox::{self, ListQuery};
use super::{Notify, push};
use crate::apis::{App, Caller, JsonBody, reply};
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::storage::ExecControl;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/notify/messages", get(list_messages))
        .route("/notify/messages/{id}", get(one_message))
        .route("/notify/push/vapid", get(vapid_key))
        .route("/notify/push/subscriptions", get(list_subscriptions).post(subscribe))
        .route("/notify/push/subscriptions/{device}", delete(unsubscribe))
}

fn service(app: &App) -> Result<&Notify> {
    app.get::<Notify>()
        .ok_or_else(|| Error::new(ErrorCode::NotImplemented, "the notify module is not running"))
}

/// A signed-in user (or the admin): anonymous callers have no messages or devices of their own.
fn user_of(ctx: &RequestContext) -> Result<Option<String>> {
    if ctx.is_admin() {
        return Ok(ctx.user_id.clone());
    }
    match &ctx.user_id {
        Some(u) => Ok(Some(u.clone())),
        None => Err(Error::new(
            ErrorCode::AccessDenied,
            "notify: sign in first (messages and push subscriptions belong to a user)",
        )),
    }
}

/// The listing's query string; unknown keys and bad values are typed errors.
fn list_query(raw: Option<&str>) -> Result<ListQuery> {
    let mut q = ListQuery::default();
    let bad = |m: String| Error::new(ErrorCode::BadArguments, m);
    for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "status" if ["queued", "sending", "sent", "dead"].contains(&v.as_ref()) => q.status = Some(v.into_owned()),
            "status" => return Err(bad(format!("status={v}: one of queued, sending, sent, dead"))),
            "channel" if ["email", "push", "sms", "chat"].contains(&v.as_ref()) => q.channel = Some(v.into_owned()),
            "channel" => return Err(bad(format!("channel={v}: one of email, push, sms, chat"))),
            "limit" => {
                q.limit = Some(v.parse().map_err(|_| bad(format!("limit={v}: a number from 1 to 1000")))?)
            }
            "before" => q.before = Some(v.into_owned()),
            other => return Err(bad(format!("unknown parameter {other:?} (status, channel, limit, before)"))),
        }
    }
    Ok(q)
}

async fn list_messages(State(app): State<App>, Caller(ctx): Caller, RawQuery(raw): RawQuery) -> Response {
    let r = async {
        user_of(&ctx)?;
        let q = list_query(raw.as_deref())?;
        let c2 = ctx.clone();
        let rows = app
            .storage()
            .read(&RequestContext::system(), ExecControl::lookup(), move |c| outbox::list(c, &c2, &q))
            .await?;
        Ok(json!({"messages": rows}))
    }
    .await;
    reply(r)
}

async fn one_message(State(app): State<App>, Caller(ctx): Caller, Path(id): Path<String>) -> Response {
    let r = async {
        user_of(&ctx)?;
        let (c2, id2) = (ctx.clone(), id.clone());
        app.storage()
            .read(&RequestContext::system(), ExecControl::lookup(), move |c| outbox::status(c, &c2, &id2))
            .await?
            .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("no message {id}")))
    }
    .await;
    reply(r)
}

async fn vapid_key(State(app): State<App>) -> Response {
    let r = async {
        let n = service(&app)?;
        let v = push::vapid(&app, n).await?;
        Ok(json!({"public_key": v.public_b64, "subject": n.settings.vapid_subject}))
    }
    .await;
    reply(r)
}

async fn subscribe(
    State(app): State<App>,
    Caller(ctx): Caller,
    JsonBody(sub): JsonBody<push::NewSubscription>,
) -> Response {
    let r = async {
        let n = service(&app)?;
        let user = user_of(&ctx)?.ok_or_else(|| {
            Error::new(ErrorCode::BadArguments, "push subscriptions belong to a user; this admin credential has none")
        })?;
        let device = push::validate(&sub)?;
        let max = n.settings.max_subscriptions_per_user;
        let (u, d) = (user.clone(), device.clone());
        app.storage()
            .write(&RequestContext::system(), ExecControl::lookup(), move |c| push::save(c, &u, &d, &sub, max))
            .await?;
        Ok(json!({"user_id": user, "device": device}))
    }
    .await;
    reply(r)
}

async fn list_subscriptions(State(app): State<App>, Caller(ctx): Caller) -> Response {
    let r = async {
        let user = user_of(&ctx)?;
        let filter = if ctx.is_admin() { None } else { user };
        let subs = app
            .storage()
            .read(&RequestContext::system(), ExecControl::lookup(), move |c| push::list(c, filter.as_deref()))
            .await?;
        Ok(json!({"subscriptions": subs}))
    }
    .await;
    reply(r)
}

async fn unsubscribe(State(app): State<App>, Caller(ctx): Caller, Path(device): Path<String>) -> Response {
    let r = async {
        let user = user_of(&ctx)?
            .ok_or_else(|| Error::new(ErrorCode::BadArguments, "this admin credential has no push subscriptions"))?;
        let d = device.clone();
        let n = app
            .storage()
            .write(&RequestContext::system(), ExecControl::lookup(), move |c| {
                Ok(c.execute(
                    "DELETE FROM _ichibase_notify_push_subscriptions WHERE user_id = ?1 AND device = ?2",
                    rusqlite::params![user, d],
                )?)
            })
            .await?;
        if n == 0 {
            return Err(Error::new(ErrorCode::NotFound, format!("no push subscription for device {device:?}")));
        }
        Ok(json!({"deleted": device}))
    }
    .await;
    reply(r)
}
