//! Runs the configured Lua function for every stored `pending` message, as the addressed user,
//! through `lua::invoke`, and records `handled` or `failed` (with the error).
//!
//! Delivery to the handler is at least once: a message is claimed (`pending → running`) before
//! its handler runs and recorded after; a stop in between leaves it `running`, and the next
//! start puts it back to `pending` (`in_doubt + 1`) and runs it again. A message is stored once
//! per (Message-ID, recipient), so a client resending it never runs a second handler.
//!
//! The input is `{event = "email", email = {...}}`; a function defining a global
//! `on_email(email, ctx)` gets the email table itself. Owns the handler task.

use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension};
use serde_json::{Value as Json, json};

use super::{EmailIn, log_event, store};
use crate::app::App;
use crate::core::{Error, ErrorCode, RequestContext, Result, Role};
use crate::lua::{self, Invocation};
use crate::storage::ExecControl;

/// Largest handler result kept in the table (bytes of JSON); larger ones are noted, not kept.
const MAX_RESULT: usize = 64 << 10;

/// The user named by `user` (an id or an email), not disabled: (id, role, email).
pub fn find_user(c: &Connection, user: &str) -> Result<Option<(String, String, String)>> {
    Ok(c.prepare_cached(
        "SELECT id, role, email FROM _ichibase_users
          WHERE (id = ?1 OR email = ?1 COLLATE NOCASE) AND disabled_at IS NULL
          ORDER BY id = ?1 DESC LIMIT 1",
    )?
    .query_row([user], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
    .optional()?)
}

/// The identity a handler runs as: the user, their role, claims as a session would carry.
fn user_context(id: String, role: String, email: String) -> RequestContext {
    let mut ctx = RequestContext::new(None, Role::from_name(&role));
    let mut claims = serde_json::Map::new();
    claims.insert("sub".into(), json!(id));
    claims.insert("role".into(), json!(role));
    claims.insert("email".into(), json!(email));
    ctx.user_id = Some(id);
    ctx.claims = Some(std::sync::Arc::new(claims));
    ctx
}

/// The function's source with `on_email` support: the chunk runs inside a function (on the
/// same first line, so line numbers stay), and a global `on_email` defined by it becomes the
/// handler, called with `input.email`.
pub fn wrap(source: &str) -> String {
    format!(
        "local __ichibase_ret = (function(...) {source}\nend)(...)\n\
         if type(on_email) == 'function' then return function(input, ctx) return on_email(input.email, ctx) end end\n\
         return __ichibase_ret\n"
    )
}

/// Start the handler task: recover messages a stop left `running`, then run pending ones.
pub fn start(app: &App) -> anyhow::Result<()> {
    let Some(svc) = app.get::<EmailIn>() else { return Ok(()) };
    if !svc.settings.handlers {
        return Ok(());
    }
    let _rt = tokio::runtime::Handle::try_current()?;
    let workers = svc.settings.handler_concurrency;
    let app = app.clone();
    tokio::spawn(async move {
        match app
            .storage()
            .write(&RequestContext::system(), ExecControl::lookup(), |c| store::recover(c))
            .await
        {
            Ok(ids) => {
                for id in &ids {
                    log_event(&app, None, None, id, "in_doubt", 0.0, Some("the server stopped while its handler ran; running it again"),
                        json!({"id": id}));
                }
                if !ids.is_empty() {
                    tracing::warn!(messages = ids.len(), "inbound email: handlers running at the last stop run again");
                }
            }
            Err(e) => tracing::error!(error = %e, "inbound email: recovering running messages failed"),
        }
        for _ in 0..workers {
            let app = app.clone();
            tokio::spawn(async move { worker(app).await });
        }
    });
    Ok(())
}

async fn worker(app: App) {
    let svc = app.get::<EmailIn>().expect("email_in service");
    loop {
        let claimed = app
            .storage()
            .write(&RequestContext::system(), ExecControl::lookup(), |c| store::claim(c))
            .await;
        match claimed {
            Ok(Some(m)) => {
                run(&app, m).await;
                // More may be waiting: let another worker look too.
                svc.wake.notify_one();
            }
            Ok(None) => {
                tokio::select! {
                    _ = svc.wake.notified() => {}
                    _ = tokio::time::sleep(svc.poll()) => {}
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "inbound email: claiming a message failed");
                tokio::time::sleep(svc.poll()).await;
            }
        }
    }
}

async fn record(app: &App, id: &str, status: &'static str, error: Option<String>, result: Option<String>, trace: Option<String>) {
    let id = id.to_string();
    let r = app
        .storage()
        .write(&RequestContext::system(), ExecControl::lookup(), move |c| {
            store::finish(c, &id, status, error.as_deref(), result.as_deref(), trace.as_deref())
        })
        .await;
    if let Err(e) = r {
        // It stays `running`: the next start runs it again.
        tracing::error!(error = %e, "inbound email: recording a handler outcome failed");
    }
}

async fn run(app: &App, m: store::Claimed) {
    let started = Instant::now();
    // Each run reserves its memory limit from the server-wide Lua budget, as HTTP calls do.
    let reserved = match app.lua_limits().budget.reserve(app.lua().memory_limit as u64).await {
        Ok(p) => p,
        Err(e) => {
            record(app, &m.id, "pending", None, None, None).await;
            tracing::debug!(error = %e.message, "inbound email: no Lua memory budget now; retried");
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        }
    };
    let runtime = lua::Runtime::of_app(app, tokio::runtime::Handle::current());
    let m2 = m.clone();
    let ran = tokio::task::spawn_blocking(move || -> Result<(RequestContext, i64, lua::Outcome)> {
        let (user, f) = runtime.storage.read_blocking(&runtime.rt, &RequestContext::system(), ExecControl::lookup(), |c| {
            let user = find_user(c, &m2.user_id)?;
            let f = lua::store::get(c, &m2.function, None);
            Ok((user, f))
        })?;
        let (id, role, email) = user.ok_or_else(|| {
            Error::new(ErrorCode::AccessDenied, format!("user {} does not exist or is disabled", m2.user_id))
        })?;
        let f = f.map_err(|e| Error::new(e.code, format!("function '{}': {}", m2.function, e.message)))?;
        let ctx = user_context(id, role, email);
        let mut email: Json = serde_json::from_str(&m2.email).unwrap_or_else(|_| json!({}));
        email["id"] = json!(m2.id);
        let inv = Invocation {
            function: m2.function.clone(),
            version: f.version,
            source: wrap(&f.source),
            input: json!({"event": "email", "email": email}),
            trace: f.trace,
            ..Default::default()
        };
        let outcome = lua::invoke(&runtime, ctx.clone(), inv);
        drop(reserved);
        Ok((ctx, f.version, outcome))
    })
    .await;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let detail = json!({"id": m.id, "function": m.function, "attempt": m.attempts, "in_doubt": m.in_doubt});
    let (status, error, result, trace) = match ran {
        Err(e) => ("failed", Some(format!("the handler task failed: {e}")), None, None),
        Ok(Err(e)) => ("failed", Some(e.message), None, None),
        Ok(Ok((ctx, _version, outcome))) => match outcome.result {
            Ok(v) => {
                let t = v.to_string();
                let t = if t.len() > MAX_RESULT { json!({"truncated": true, "bytes": t.len()}).to_string() } else { t };
                ("handled", None, Some(t), Some(ctx.trace_id))
            }
            // The server is stopping: the message stays for the next start.
            Err(e) if e.code == ErrorCode::ShuttingDown => ("pending", None, None, None),
            Err(e) => ("failed", Some(e.message), None, Some(ctx.trace_id)),
        },
    };
    log_event(app, Some(&m.user_id), trace.as_deref(), &m.recipient,
        match status { "handled" => "handled", "pending" => "interrupted", _ => "failed" },
        ms, error.as_deref(), detail);
    record(app, &m.id, status, error, result, trace).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapped_source_keeps_line_one() {
        let w = wrap("return function() end");
        assert!(w.starts_with("local __ichibase_ret = (function(...) return function() end\nend)(...)"));
    }
}
