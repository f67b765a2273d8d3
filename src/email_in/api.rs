//! The inbound-email HTTP API:
//! - `GET /email/inbound[?status=&recipient=&limit=&before=]`: stored messages, newest first
//!   (the admin sees all, a signed-in user the messages addressed to them);
//! - `GET /email/inbound/{id}[?raw=1]`: one message with its email table, handler result and
//!   error (`raw=1` adds the message as received);
//! - `POST /email/inbound/{id}/retry` (admin): a `failed` message runs its handler again;
//! - `POST /email/inbound/{id}/release` (admin): a `quarantined` message goes to its handler;
//! - `GET /email/status` (admin): the listener's address, domains, addresses, counts by status.

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use axum::routing::{get, post};
use serde_json::json;

use super::{EmailIn, log_event, store};
use crate::apis::{Admin, App, Caller, reply};
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::storage::ExecControl;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/email/inbound", get(list))
        .route("/email/inbound/{id}", get(one))
        .route("/email/inbound/{id}/retry", post(retry))
        .route("/email/inbound/{id}/release", post(release))
        .route("/email/status", get(status))
}

/// Whose messages the caller sees: `None` for the admin (all), the user's id otherwise.
fn owner(ctx: &RequestContext) -> Result<Option<String>> {
    if ctx.is_admin() {
        return Ok(None);
    }
    match &ctx.user_id {
        Some(u) => Ok(Some(u.clone())),
        None => Err(Error::new(ErrorCode::AccessDenied, "inbound email: sign in first (messages belong to the addressed user)")),
    }
}

fn list_query(raw: Option<&str>) -> Result<store::ListQuery> {
    let mut q = store::ListQuery::default();
    let bad = |m: String| Error::new(ErrorCode::BadArguments, m);
    const STATUSES: [&str; 5] = ["pending", "running", "handled", "failed", "quarantined"];
    for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "status" if STATUSES.contains(&v.as_ref()) => q.status = Some(v.into_owned()),
            "status" => return Err(bad(format!("status={v}: one of {}", STATUSES.join(", ")))),
            "recipient" => q.recipient = Some(v.to_lowercase()),
            "limit" => q.limit = Some(v.parse().map_err(|_| bad(format!("limit={v}: a number from 1 to 1000")))?),
            "before" => q.before = Some(v.into_owned()),
            other => return Err(bad(format!("unknown parameter {other:?} (status, recipient, limit, before)"))),
        }
    }
    Ok(q)
}

async fn list(State(app): State<App>, Caller(ctx): Caller, RawQuery(raw): RawQuery) -> Response {
    let r = async {
        let user = owner(&ctx)?;
        let q = list_query(raw.as_deref())?;
        let rows = app
            .storage()
            .read(&RequestContext::system(), ExecControl::lookup(), move |c| store::list(c, user.as_deref(), &q))
            .await?;
        Ok(json!({"messages": rows}))
    }
    .await;
    reply(r)
}

async fn one(State(app): State<App>, Caller(ctx): Caller, Path(id): Path<String>, RawQuery(raw): RawQuery) -> Response {
    let r = async {
        let user = owner(&ctx)?;
        let mut with_raw = false;
        for (k, v) in form_urlencoded::parse(raw.as_deref().unwrap_or("").as_bytes()) {
            match k.as_ref() {
                "raw" => with_raw = matches!(v.as_ref(), "1" | "true"),
                other => return Err(Error::new(ErrorCode::BadArguments, format!("unknown parameter {other:?} (raw)"))),
            }
        }
        let id2 = id.clone();
        app.storage()
            .read(&RequestContext::system(), ExecControl::lookup(), move |c| store::get(c, &id2, user.as_deref(), with_raw))
            .await?
            .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("no inbound message {id}")))
    }
    .await;
    reply(r)
}

async fn requeue(app: &App, ctx: &RequestContext, id: String, from: &'static str) -> Result<serde_json::Value> {
    let id2 = id.clone();
    app.storage()
        .write(&RequestContext::system(), ExecControl::lookup(), move |c| store::requeue(c, &id2, from))
        .await?;
    if let Some(svc) = app.get::<EmailIn>() {
        svc.wake.notify_one();
    }
    let action = if from == "failed" { "retried" } else { "released" };
    log_event(app, ctx.user_id.as_deref(), Some(&ctx.trace_id), &id, action, 0.0, None, json!({"id": id, "by": ctx.role.as_str()}));
    Ok(json!({"id": id, "status": "pending"}))
}

async fn retry(State(app): State<App>, Admin(ctx): Admin, Path(id): Path<String>) -> Response {
    reply(requeue(&app, &ctx, id, "failed").await)
}

async fn release(State(app): State<App>, Admin(ctx): Admin, Path(id): Path<String>) -> Response {
    reply(requeue(&app, &ctx, id, "quarantined").await)
}

async fn status(State(app): State<App>, Admin(_ctx): Admin) -> Response {
    let r = async {
        let svc = app
            .get::<EmailIn>()
            .ok_or_else(|| Error::new(ErrorCode::NotImplemented, "the email_in module is not running"))?;
        let counts = app
            .storage()
            .read(&RequestContext::system(), ExecControl::lookup(), store::counts)
            .await?;
        let bound = *svc.bound.lock().unwrap_or_else(|e| e.into_inner());
        let s = &svc.settings;
        Ok(json!({
            "listening": bound.map(|a| a.to_string()),
            "domains": s.accepted_domains(),
            "addresses": s.addresses.iter().map(|(a, r)| json!({"address": a, "user": r.user, "function": r.function})).collect::<Vec<_>>(),
            "dkim_keys": s.dkim_keys.keys().collect::<Vec<_>>(),
            "unknown_senders": s.unknown_senders.as_str(),
            "dkim_fail": s.dkim_fail.as_str(),
            "messages": counts,
        }))
    }
    .await;
    reply(r)
}
