//! The transactional outbox and its sender.
//!
//! A message is one row of `_ichibase_notify_outbox`, written by `notify.*` inside the caller's
//! transaction (see `lua`): a rolled-back transaction or a failed invocation leaves no row, so
//! nothing is sent. The sender task delivers committed rows:
//!
//! 1. **claim** (one write): up to `batch` due rows `queued → sending`, `attempts + 1`;
//! 2. **deliver** them (up to `concurrency` at once) to the SMTP relay, push services or SMS API;
//! 3. **record** every outcome (one write): `sent`, back to `queued` with an exponential
//!    back-off, or `dead` after `max_attempts` (or at once on a permanent refusal).
//!
//! A kill -9 between 1 and 3 leaves rows in `sending`: at start they go back to `queued` with
//! `in_doubt + 1` and are sent again. That is the only window for a duplicate, at most `batch`
//! messages, and only where the peer cannot tell a resend (see docs/notify.md).
//!
//! Owns the outbox table's statements; must not deliver anything that is not committed.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Value as Json, json};

use super::{Notify, log_event, now_ms};
use crate::app::App;
use crate::core::{Error, RequestContext, Result};
use crate::storage::ExecControl;

/// A message about to be queued.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: String,
    pub channel: &'static str,
    pub owner: Option<String>,
    pub key: Option<String>,
    pub payload: String,
    pub trace_id: Option<String>,
    pub function: Option<String>,
}

impl NewMessage {
    pub fn new(channel: &'static str, ctx: &RequestContext, function: &str, key: Option<String>, payload: String) -> NewMessage {
        NewMessage {
            id: uuid::Uuid::new_v4().simple().to_string(),
            channel,
            owner: ctx.user_id.clone(),
            key,
            payload,
            trace_id: Some(ctx.trace_id.clone()),
            function: Some(function.to_string()),
        }
    }
}

/// The id of the message already queued by `owner` under `key`, if any.
pub fn find_by_key(c: &Connection, owner: Option<&str>, key: &str) -> Result<Option<String>> {
    Ok(c.prepare(
        "SELECT id FROM _ichibase_notify_outbox WHERE coalesce(owner, '') = coalesce(?1, '') AND idempotency_key = ?2",
    )?
    .query_row(params![owner, key], |r| r.get(0))
    .optional()?)
}

/// Queue `m` on `c` (inside whatever transaction is open there). With an idempotency key
/// already used by the same owner, nothing is queued and the earlier message's id is returned
/// with `false`. Statements are prepared uncached (they may run on a caller's session).
pub fn insert(c: &Connection, m: &NewMessage) -> Result<(String, bool)> {
    if let Some(key) = &m.key
        && let Some(id) = find_by_key(c, m.owner.as_deref(), key)?
    {
        return Ok((id, false));
    }
    let now = now_ms();
    c.prepare(
        "INSERT INTO _ichibase_notify_outbox
           (id, channel, owner, idempotency_key, payload, status, attempts, next_at, created_at, updated_at, trace_id, function)
         VALUES (?1, ?2, ?3, ?4, ?5, 'queued', 0, ?6, ?6, ?6, ?7, ?8)",
    )?
    .execute(params![m.id, m.channel, m.owner, m.key, m.payload, now, m.trace_id, m.function])?;
    Ok((m.id.clone(), true))
}

/// Columns shown for a message (the payload's attachments are left out).
const STATUS_COLUMNS: &str = "id, channel, owner, idempotency_key, status, attempts, next_at, created_at, updated_at, sent_at, last_error, result, in_doubt, trace_id, function, payload";

fn status_json(r: &rusqlite::Row<'_>) -> rusqlite::Result<Json> {
    let result: Option<String> = r.get(11)?;
    let payload: String = r.get(15)?;
    let mut payload: Json = serde_json::from_str(&payload).unwrap_or(Json::Null);
    if let Some(a) = payload.get_mut("attachments").and_then(|a| a.as_array_mut()) {
        for att in a {
            if let Some(o) = att.as_object_mut() {
                let size = o.remove("data").and_then(|d| d.as_str().map(|s| s.len() * 3 / 4)).unwrap_or(0);
                o.insert("approx_bytes".into(), json!(size));
            }
        }
    }
    Ok(json!({
        "id": r.get::<_, String>(0)?,
        "channel": r.get::<_, String>(1)?,
        "owner": r.get::<_, Option<String>>(2)?,
        "idempotency_key": r.get::<_, Option<String>>(3)?,
        "status": r.get::<_, String>(4)?,
        "attempts": r.get::<_, i64>(5)?,
        "next_attempt_ms": r.get::<_, i64>(6)?,
        "created_ms": r.get::<_, i64>(7)?,
        "updated_ms": r.get::<_, i64>(8)?,
        "sent_ms": r.get::<_, Option<i64>>(9)?,
        "last_error": r.get::<_, Option<String>>(10)?,
        "result": result.and_then(|s| serde_json::from_str::<Json>(&s).ok()),
        "in_doubt": r.get::<_, i64>(12)?,
        "trace_id": r.get::<_, Option<String>>(13)?,
        "function": r.get::<_, Option<String>>(14)?,
        "message": payload,
    }))
}

/// One message as JSON, if `ctx` may see it (the admin sees all, a user their own).
pub fn status(c: &Connection, ctx: &RequestContext, id: &str) -> Result<Option<Json>> {
    let row = c
        .prepare(&format!("SELECT {STATUS_COLUMNS} FROM _ichibase_notify_outbox WHERE id = ?1"))?
        .query_row([id], status_json)
        .optional()?;
    Ok(row.filter(|m| ctx.is_admin() || (ctx.user_id.is_some() && m["owner"].as_str() == ctx.user_id.as_deref())))
}

/// Filters of a message listing.
#[derive(Debug, Default)]
pub struct ListQuery {
    pub status: Option<String>,
    pub channel: Option<String>,
    /// Newest first; at most this many (default 100, at most 1000).
    pub limit: Option<u32>,
    /// Only messages created before this one (paging).
    pub before: Option<String>,
}

/// Messages `ctx` may see, newest first.
pub fn list(c: &Connection, ctx: &RequestContext, q: &ListQuery) -> Result<Vec<Json>> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let owner = if ctx.is_admin() { None } else { ctx.user_id.clone() };
    let mut st = c.prepare(&format!(
        "SELECT {STATUS_COLUMNS} FROM _ichibase_notify_outbox
          WHERE (?1 IS NULL OR owner = ?1)
            AND (?2 IS NULL OR status = ?2)
            AND (?3 IS NULL OR channel = ?3)
            AND (?4 IS NULL OR rowid < (SELECT rowid FROM _ichibase_notify_outbox WHERE id = ?4))
          ORDER BY rowid DESC LIMIT ?5"
    ))?;
    let rows = st.query_map(params![owner, q.status, q.channel, q.before, limit], status_json)?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// What one delivery attempt came to.
#[derive(Debug)]
pub enum Delivery {
    /// Delivered; the peer's answer (ids, devices reached).
    Sent(Json),
    /// A temporary failure: try again after the back-off (with what already went through).
    Retry(String, Option<Json>),
    /// A permanent refusal: dead-letter now.
    Fail(String, Option<Json>),
}

/// A claimed message.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: String,
    pub channel: String,
    pub payload: String,
    pub attempts: u32,
    pub owner: Option<String>,
    pub trace_id: Option<String>,
    /// What earlier attempts already delivered (push: devices reached).
    pub result: Option<Json>,
    pub in_doubt: i64,
}

/// Start the sender (unless `[notify] sender = false`).
pub fn start(app: &App) -> anyhow::Result<()> {
    let Some(n) = app.get::<Notify>() else { return Ok(()) };
    if !n.settings.sender {
        return Ok(());
    }
    let rt = tokio::runtime::Handle::try_current()?;
    let app = app.clone();
    rt.spawn(async move { sender(app).await });
    Ok(())
}

async fn write<R: Send + 'static>(
    app: &App,
    f: impl FnOnce(&mut Connection) -> Result<R> + Send + 'static,
) -> Result<R> {
    app.storage().write(&RequestContext::system(), ExecControl::lookup(), f).await
}

async fn sender(app: App) {
    let n = app.get::<Notify>().expect("notify service");
    let poll = Duration::from_secs_f64(n.settings.poll_secs);
    // Rows left in `sending` by a crash: their delivery may or may not have happened.
    let now = now_ms();
    match write(&app, move |c| {
        let mut st = c.prepare(
            "UPDATE _ichibase_notify_outbox SET status = 'queued', in_doubt = in_doubt + 1, next_at = ?1, updated_at = ?1
              WHERE status = 'sending' RETURNING id, channel, attempts",
        )?;
        let rows = st.query_map([now], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    })
    .await
    {
        Ok(rows) => {
            for (id, channel, attempts) in &rows {
                log_event(&app, None, None, channel, "in_doubt", 0.0, Some("the server stopped during this delivery; sending again"),
                    json!({"id": id, "attempt": attempts}));
            }
            if !rows.is_empty() {
                tracing::warn!(messages = rows.len(), "notify: messages in flight at the last stop are sent again");
            }
        }
        Err(e) => tracing::error!(error = %e, "notify: recovering in-flight messages failed"),
    }
    loop {
        // Idle, this is one read per `poll_secs`; the writer is used only when a message is due.
        let due = match next_due(&app).await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "notify: looking for due messages failed");
                tokio::time::sleep(poll).await;
                continue;
            }
        };
        if due.is_some_and(|at| at <= now_ms()) {
            match claim(&app, n).await {
                Ok(batch) if !batch.is_empty() => {
                    deliver_batch(&app, n, batch).await;
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "notify: claiming messages failed");
                    tokio::time::sleep(poll).await;
                    continue;
                }
            }
        }
        let wait = due
            .map(|at| Duration::from_millis((at - now_ms()).max(0) as u64))
            .unwrap_or(poll)
            .min(poll);
        tokio::select! {
            _ = n.wake.notified() => {}
            _ = tokio::time::sleep(wait.max(Duration::from_millis(5))) => {}
        }
    }
}

async fn claim(app: &App, n: &Notify) -> Result<Vec<Claimed>> {
    let batch = n.settings.batch;
    write(app, move |c| {
        let now = now_ms();
        let mut st = c.prepare_cached(
            "UPDATE _ichibase_notify_outbox SET status = 'sending', attempts = attempts + 1, updated_at = ?1
              WHERE id IN (SELECT id FROM _ichibase_notify_outbox WHERE status = 'queued' AND next_at <= ?1
                           ORDER BY next_at, rowid LIMIT ?2)
              RETURNING id, channel, payload, attempts, owner, trace_id, result, in_doubt",
        )?;
        let rows = st.query_map(params![now, batch], |r| {
            Ok(Claimed {
                id: r.get(0)?,
                channel: r.get(1)?,
                payload: r.get(2)?,
                attempts: r.get::<_, i64>(3)? as u32,
                owner: r.get(4)?,
                trace_id: r.get(5)?,
                result: r.get::<_, Option<String>>(6)?.and_then(|s| serde_json::from_str(&s).ok()),
                in_doubt: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    })
    .await
}

async fn next_due(app: &App) -> Result<Option<i64>> {
    app.storage()
        .read(&RequestContext::system(), ExecControl::lookup(), |c| {
            Ok(c.prepare_cached("SELECT min(next_at) FROM _ichibase_notify_outbox WHERE status = 'queued'")?
                .query_row([], |r| r.get::<_, Option<i64>>(0))?)
        })
        .await
}

async fn deliver_one(app: &App, n: &Notify, m: &Claimed) -> Delivery {
    match m.channel.as_str() {
        "email" => super::email::deliver(n, m).await,
        "push" => super::push::deliver(app, n, m).await,
        "sms" => super::sms::deliver(n, m).await,
        "chat" => match app.get::<super::ExternalChannel>() {
            Some(ch) => ch.0.deliver(app, m).await,
            None => Delivery::Retry("the chat module is not running".into(), None),
        },
        other => Delivery::Fail(format!("unknown channel {other}"), None),
    }
}

/// Deliver a claimed batch, `concurrency` at a time, recording outcomes as they come in
/// (whatever finished together is recorded in one write): a message delivered but not yet
/// recorded is what a crash can send twice, so that window is kept short.
async fn deliver_batch(app: &App, n: &Notify, batch: Vec<Claimed>) {
    let mut done = std::pin::pin!(
        futures_util::stream::iter(batch)
            .map(|m| async move {
                let t = Instant::now();
                let d = deliver_one(app, n, &m).await;
                (m, d, t.elapsed().as_secs_f64() * 1e3)
            })
            .buffer_unordered(n.settings.concurrency as usize)
            .ready_chunks(n.settings.concurrency as usize)
    );
    while let Some(results) = done.next().await {
        record(app, n, results).await;
    }
}

async fn record(app: &App, n: &Notify, results: Vec<(Claimed, Delivery, f64)>) {
    let settings = n.settings.clone();
    let plan: Vec<(String, &'static str, i64, Option<String>, Option<String>)> = results
        .iter()
        .map(|(m, d, _)| {
            let now = now_ms();
            match d {
                Delivery::Sent(r) => (m.id.clone(), "sent", now, None, Some(r.to_string())),
                Delivery::Retry(e, r) if m.attempts < settings.max_attempts => (
                    m.id.clone(),
                    "queued",
                    now + settings.backoff(m.attempts).as_millis() as i64,
                    Some(e.clone()),
                    r.as_ref().map(|r| r.to_string()),
                ),
                Delivery::Retry(e, r) | Delivery::Fail(e, r) => {
                    (m.id.clone(), "dead", now, Some(e.clone()), r.as_ref().map(|r| r.to_string()))
                }
            }
        })
        .collect();
    let plan2 = plan.clone();
    let recorded = write(app, move |c| {
        let tx = c.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "UPDATE _ichibase_notify_outbox
                    SET status = ?2, next_at = ?3, last_error = ?4, result = coalesce(?5, result), updated_at = ?6,
                        sent_at = CASE WHEN ?2 = 'sent' THEN ?6 ELSE sent_at END
                  WHERE id = ?1 AND status = 'sending'",
            )?;
            let now = now_ms();
            for (id, status, next_at, err, result) in &plan2 {
                st.execute(params![id, status, next_at, err, result, now])?;
            }
        }
        tx.commit()?;
        Ok(())
    })
    .await;
    if let Err(e) = &recorded {
        // The rows stay `sending`: the next start sends them again (in doubt).
        tracing::error!(error = %e, "notify: recording delivery outcomes failed");
    }
    for ((m, d, ms), (_, status, next_at, _, _)) in results.iter().zip(&plan) {
        let (outcome, err) = match (d, *status) {
            (Delivery::Sent(_), _) => ("sent", None),
            (Delivery::Retry(e, _), "queued") => ("retry", Some(e.as_str())),
            (Delivery::Retry(e, _) | Delivery::Fail(e, _), _) => ("dead", Some(e.as_str())),
        };
        let mut detail = json!({"id": m.id, "attempt": m.attempts, "in_doubt": m.in_doubt});
        if let Delivery::Sent(r) = d {
            detail["peer"] = r.clone();
        }
        if outcome == "retry" {
            detail["next_attempt_ms"] = json!(next_at);
        }
        log_event(app, m.owner.as_deref(), m.trace_id.as_deref(), &m.channel, outcome, *ms, err, detail);
    }
}

/// Queue deferred messages (a call outside `db.tx`) in one transaction of their own.
pub fn insert_all(c: &mut Connection, msgs: &[NewMessage]) -> Result<Vec<(String, bool)>> {
    let tx = c.transaction()?;
    let out = msgs.iter().map(|m| insert(&tx, m)).collect::<Result<Vec<_>>>()?;
    tx.commit()?;
    Ok(out)
}

/// The error of a message that is too large.
pub fn too_large(what: &str, bytes: usize, max: usize) -> Error {
    Error::new(
        crate::core::ErrorCode::RequestTooLarge,
        format!("notify.{what}: the message is {bytes} bytes, over [notify] max_message_bytes ({max})"),
    )
}
