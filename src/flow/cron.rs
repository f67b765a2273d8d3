//! Cron schedules: `flow.schedule(name, pattern, {tz =, input =, missed =})` starts workflow
//! `name` at every tick of `pattern` (croner: 5 or 6 fields, in the IANA time zone `tz`).
//!
//! At most one run per tick, across restarts: the instance started for a tick has the id
//! `cron:<name>:<tick ms>` and is created in the same transaction that moves the schedule's
//! `next_at` past it. Ticks that fell due while the server was down (before this process
//! started) are *missed*: `missed = "once"` (default) starts one run for all of them,
//! `"skip"` none. Ticks due while the server runs always start, late if the server is busy.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use croner::Cron;
use rusqlite::{Connection, params};
use serde_json::{Value as Json, json};

use super::FlowService;
use super::journal::{self, NewFlow, iso};
use crate::app::App;
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::storage::ExecControl;

fn parse(pattern: &str) -> Result<Cron> {
    if pattern.len() > 200 {
        return Err(Error::new(ErrorCode::BadArguments, "a cron pattern is at most 200 characters"));
    }
    Cron::from_str(pattern).map_err(|e| {
        Error::new(
            ErrorCode::BadArguments,
            format!("invalid cron pattern '{pattern}': {e}"),
        )
    })
}

pub(crate) fn zone(tz: &str) -> Result<chrono_tz::Tz> {
    tz.parse::<chrono_tz::Tz>().map_err(|_| {
        Error::new(
            ErrorCode::BadArguments,
            format!("unknown time zone '{tz}' (an IANA name such as 'Asia/Tokyo' or 'UTC')"),
        )
    })
}

/// The first tick at or after (`inclusive`) / after `ms`.
fn next_tick(cron: &Cron, tz: chrono_tz::Tz, ms: i64, inclusive: bool) -> Option<i64> {
    let t: DateTime<Utc> = DateTime::from_timestamp_millis(ms)?;
    cron.find_next_occurrence(&t.with_timezone(&tz), inclusive)
        .ok()
        .map(|d| d.with_timezone(&Utc).timestamp_millis())
}

/// Create or replace a schedule (admin). Its runs start as the admin who scheduled it, or,
/// with `as_user` (a user id or email), as that user with their role (a per-user daily job:
/// RLS, files, canvas and budgets are the user's). Returns it.
#[allow(clippy::too_many_arguments)]
pub async fn schedule(
    app: &App,
    ctx: &RequestContext,
    name: &str,
    pattern: &str,
    tz: &str,
    input: Json,
    missed: &str,
    as_user: Option<String>,
) -> Result<Json> {
    if !ctx.is_admin() {
        return Err(Error::new(ErrorCode::AccessDenied, "flow.schedule is for the admin role"));
    }
    crate::lua::store::check_name(name)?;
    let svc = app
        .get::<FlowService>()
        .ok_or_else(|| Error::internal("the flow service is not running"))?;
    let cron = parse(pattern)?;
    let z = zone(tz)?;
    if !matches!(missed, "once" | "skip") {
        return Err(Error::new(
            ErrorCode::BadArguments,
            format!("flow.schedule: missed must be \"once\" or \"skip\", not '{missed}'"),
        ));
    }
    let input = input.to_string();
    if input.len() as u64 > svc.settings.max_input_bytes {
        return Err(Error::new(ErrorCode::FlowLimit, "the schedule's input is over [flow] max_input_bytes"));
    }
    let now = svc.now_ms();
    let next = next_tick(&cron, z, now, false)
        .ok_or_else(|| Error::new(ErrorCode::BadArguments, format!("cron pattern '{pattern}' has no future tick")))?;
    let (mut user, mut role, _) = super::component::identity(ctx);
    if let Some(who) = as_user {
        let found: Option<(String, String)> = app
            .storage()
            .read(&RequestContext::system(), ExecControl::lookup(), move |c| {
                Ok(c.query_row(
                    "SELECT id, role FROM _ichibase_users WHERE (id = ?1 OR email = ?1) AND disabled_at IS NULL",
                    [&who],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .ok())
            })
            .await?;
        let (id, r) = found.ok_or_else(|| {
            Error::new(ErrorCode::NotFound, "flow.schedule: user: no such (enabled) user")
        })?;
        user = Some(id);
        role = r;
    }
    let shown_user = user.clone();
    let (n, p, t, m, max) = (name.to_string(), pattern.to_string(), tz.to_string(), missed.to_string(), svc.settings.max_schedules);
    app.storage()
        .write(&RequestContext::system(), ExecControl::lookup(), move |c| {
            let count: i64 = c.query_row(
                "SELECT count(*) FROM _ichibase_flow_schedules WHERE name <> ?1",
                [&n],
                |r| r.get(0),
            )?;
            if count as usize >= max {
                return Err(Error::new(ErrorCode::FlowLimit, format!("{count} schedules exist ([flow] max_schedules)")));
            }
            c.execute(
                "INSERT INTO _ichibase_flow_schedules (name, cron, tz, input, missed, user_id, role, next_at, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)
                 ON CONFLICT (name) DO UPDATE SET cron = excluded.cron, tz = excluded.tz, input = excluded.input,
                   missed = excluded.missed, user_id = excluded.user_id, role = excluded.role,
                   next_at = excluded.next_at, updated_at = excluded.updated_at",
                params![n, p, t, input, m, user, role, next, now],
            )?;
            Ok(())
        })
        .await?;
    svc.wake();
    Ok(json!({"name": name, "cron": pattern, "tz": tz, "missed": missed, "next_at": iso(Some(next)), "user_id": shown_user}))
}

pub async fn unschedule(app: &App, ctx: &RequestContext, name: &str) -> Result<bool> {
    if !ctx.is_admin() {
        return Err(Error::new(ErrorCode::AccessDenied, "flow.unschedule is for the admin role"));
    }
    let n = name.to_string();
    app.storage()
        .write(&RequestContext::system(), ExecControl::lookup(), move |c| {
            Ok(c.execute("DELETE FROM _ichibase_flow_schedules WHERE name = ?1", [&n])? == 1)
        })
        .await
}

pub fn list(c: &Connection) -> Result<Vec<Json>> {
    let mut st = c.prepare_cached(
        "SELECT name, cron, tz, input, missed, user_id, role, next_at, last_tick, last_flow_id, created_at
         FROM _ichibase_flow_schedules ORDER BY name",
    )?;
    let rows = st
        .query_map([], |r| {
            Ok(json!({
                "name": r.get::<_, String>(0)?,
                "cron": r.get::<_, String>(1)?,
                "tz": r.get::<_, String>(2)?,
                "input": serde_json::from_str::<Json>(&r.get::<_, String>(3)?).unwrap_or(Json::Null),
                "missed": r.get::<_, String>(4)?,
                "user_id": r.get::<_, Option<String>>(5)?,
                "role": r.get::<_, String>(6)?,
                "next_at": iso(r.get(7)?),
                "last_tick": iso(r.get(8)?),
                "last_flow_id": r.get::<_, Option<String>>(9)?,
                "created_at": iso(r.get(10)?),
            }))
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

struct Due {
    name: String,
    cron: String,
    tz: String,
    input: String,
    missed: String,
    user_id: Option<String>,
    role: String,
    next_at: i64,
}

/// Start the runs of every schedule whose tick came (called by the poller).
pub async fn tick(app: &App) -> Result<()> {
    let Some(svc) = app.get::<FlowService>() else { return Ok(()) };
    let now = svc.now_ms();
    let started = svc.started_ms();
    let due: Vec<Due> = app
        .storage()
        .read(&RequestContext::system(), ExecControl::lookup(), move |c| {
            let mut st = c.prepare_cached(
                "SELECT name, cron, tz, input, missed, user_id, role, next_at FROM _ichibase_flow_schedules WHERE next_at <= ?1",
            )?;
            let rows = st
                .query_map([now], |r| {
                    Ok(Due {
                        name: r.get(0)?,
                        cron: r.get(1)?,
                        tz: r.get(2)?,
                        input: r.get(3)?,
                        missed: r.get(4)?,
                        user_id: r.get(5)?,
                        role: r.get(6)?,
                        next_at: r.get(7)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
        .await?;
    for d in due {
        let (Ok(cron), Ok(tz)) = (parse(&d.cron), zone(&d.tz)) else { continue };
        // The ticks from next_at up to now: missed (before this process started) or on time.
        let (mut missed_last, mut on_time) = (None, Vec::new());
        let mut t = Some(d.next_at);
        let mut guard = 0;
        while let Some(x) = t.filter(|x| *x <= now) {
            if x < started {
                missed_last = Some(x);
            } else {
                on_time.push(x);
            }
            guard += 1;
            if guard > 10_000 {
                break;
            }
            t = next_tick(&cron, tz, x, false);
        }
        if on_time.len() > 100 {
            on_time.drain(..on_time.len() - 100);
        }
        let mut fire = on_time;
        if d.missed == "once"
            && let Some(m) = missed_last
            && fire.is_empty()
        {
            fire.push(m);
        }
        let next = next_tick(&cron, tz, now, false).unwrap_or(journal::FOREVER);
        let news: Vec<NewFlow> = fire
            .iter()
            .map(|tick| NewFlow {
                id: format!("cron:{}:{tick}", d.name),
                name: d.name.clone(),
                input: d.input.clone(),
                trace_id: uuid::Uuid::new_v4().simple().to_string(),
                user_id: d.user_id.clone(),
                role: d.role.clone(),
                claims: None,
                parent_id: None,
                schedule: Some(d.name.clone()),
                tick: Some(*tick),
                now,
            })
            .collect();
        let (name, old) = (d.name.clone(), d.next_at);
        let r = app
            .storage()
            .write(&RequestContext::system(), ExecControl::lookup(), move |c| {
                let tx = c.transaction()?;
                let mut last = None;
                for f in &news {
                    match journal::insert(&tx, f) {
                        Ok(_) => last = Some((f.tick, f.id.clone())),
                        Err(e) if e.code == ErrorCode::NotFound => {
                            tracing::warn!(schedule = %f.name, "flow: a scheduled workflow is not deployed; tick skipped");
                        }
                        Err(e) => return Err(e),
                    }
                }
                tx.execute(
                    "UPDATE _ichibase_flow_schedules SET next_at = ?2,
                       last_tick = coalesce(?3, last_tick), last_flow_id = coalesce(?4, last_flow_id)
                     WHERE name = ?1 AND next_at = ?5",
                    params![name, next, last.as_ref().and_then(|l| l.0), last.as_ref().map(|l| l.1.clone()), old],
                )?;
                tx.commit()?;
                Ok(())
            })
            .await;
        r?;
        svc.wake();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_follow_the_time_zone() {
        let c = parse("0 7 * * *").unwrap();
        let tokyo = zone("Asia/Tokyo").unwrap();
        // 2026-01-01T00:00:00Z: 07:00 in Tokyo is 22:00 UTC the same day.
        let t0 = 1_767_225_600_000;
        let n = next_tick(&c, tokyo, t0, false).unwrap();
        assert_eq!(n, t0 + 22 * 3_600_000);
        assert_eq!(next_tick(&c, tokyo, n, true), Some(n));
        assert_eq!(next_tick(&c, tokyo, n, false), Some(n + 86_400_000));
        assert!(parse("61 * * * *").is_err());
        assert!(parse("not cron").is_err());
        assert!(zone("Mars/Olympus").is_err());
        assert_eq!(zone("UTC").unwrap(), chrono_tz::UTC);
    }
}
