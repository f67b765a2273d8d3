//! SQL of the flow engine tables: instances, their journals, events and schedules.
//!
//! Everything here runs on storage connections as the engine. Statements that may run inside
//! a caller's transaction (a `ctx.tx` step's journal row) use uncached statements under
//! `storage::engine_statements` (see there). Times are flow-clock milliseconds.

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Value as Json, json};

use crate::core::{Error, ErrorCode, Result};

pub const SCHEMA: &str = "
CREATE TABLE _ichibase_flows (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    status TEXT NOT NULL,
    input TEXT NOT NULL,
    output TEXT,
    error TEXT,
    error_code INTEGER,
    trace_id TEXT NOT NULL,
    user_id TEXT,
    role TEXT NOT NULL,
    claims TEXT,
    parent_id TEXT,
    schedule TEXT,
    tick INTEGER,
    wake_at INTEGER,
    wait_event TEXT,
    runs INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    finished_at INTEGER
);
CREATE INDEX _ichibase_flows_due ON _ichibase_flows (wake_at)
    WHERE status IN ('pending', 'running', 'sleeping', 'waiting');
CREATE INDEX _ichibase_flows_created ON _ichibase_flows (created_at);
CREATE INDEX _ichibase_flows_finished ON _ichibase_flows (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX _ichibase_flows_parent ON _ichibase_flows (parent_id) WHERE parent_id IS NOT NULL;
CREATE TABLE _ichibase_flow_steps (
    flow_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    result TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    started_at INTEGER,
    finished_at INTEGER,
    trace_id TEXT,
    PRIMARY KEY (flow_id, seq)
) WITHOUT ROWID;
CREATE TABLE _ichibase_flow_events (
    id INTEGER PRIMARY KEY,
    flow_id TEXT NOT NULL,
    name TEXT NOT NULL,
    payload TEXT NOT NULL,
    consumed_seq INTEGER,
    created_at INTEGER NOT NULL
);
CREATE INDEX _ichibase_flow_events_flow ON _ichibase_flow_events (flow_id, name, consumed_seq);
CREATE TABLE _ichibase_flow_schedules (
    name TEXT PRIMARY KEY,
    cron TEXT NOT NULL,
    tz TEXT NOT NULL,
    input TEXT NOT NULL,
    missed TEXT NOT NULL,
    user_id TEXT,
    role TEXT NOT NULL,
    next_at INTEGER NOT NULL,
    last_tick INTEGER,
    last_flow_id TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
";

/// Statuses of an unfinished instance.
pub const ACTIVE: &str = "('pending', 'running', 'sleeping', 'waiting')";

/// Waiting forever (no timeout): never due by time.
pub const FOREVER: i64 = i64::MAX;

/// One instance.
#[derive(Debug, Clone)]
pub struct FlowRow {
    pub id: String,
    pub name: String,
    pub version: i64,
    pub status: String,
    pub input: String,
    pub trace_id: String,
    pub user_id: Option<String>,
    pub role: String,
    pub claims: Option<String>,
    pub parent_id: Option<String>,
    pub tick: Option<i64>,
    pub runs: i64,
}

/// One journal entry.
#[derive(Debug, Clone)]
pub struct StepRec {
    pub seq: i64,
    pub name: String,
    /// `step`, `tx`, `sleep`, `event`, `now`, `random`, `child`.
    pub kind: String,
    /// `done`, `failed`, `retry` (a failed attempt, retried later), `waiting` (a sleep, an
    /// event or a child not there yet).
    pub status: String,
    pub result: Option<String>,
    pub error: Option<String>,
    pub attempts: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub trace_id: Option<String>,
}

/// What starts an instance.
#[derive(Debug, Clone)]
pub struct NewFlow {
    pub id: String,
    pub name: String,
    pub input: String,
    pub trace_id: String,
    pub user_id: Option<String>,
    pub role: String,
    pub claims: Option<String>,
    pub parent_id: Option<String>,
    pub schedule: Option<String>,
    pub tick: Option<i64>,
    pub now: i64,
}

pub fn due(c: &Connection, now: i64, limit: usize) -> Result<Vec<String>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT id FROM _ichibase_flows WHERE status IN {ACTIVE} AND wake_at <= ?1 ORDER BY wake_at LIMIT ?2"
    ))?;
    let rows = st
        .query_map(params![now, limit as i64], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

pub fn load(c: &Connection, id: &str) -> Result<Option<FlowRow>> {
    Ok(c.prepare_cached(
        "SELECT id, name, version, status, input, trace_id, user_id, role, claims, parent_id, tick, runs
         FROM _ichibase_flows WHERE id = ?1",
    )?
    .query_row([id], |r| {
        Ok(FlowRow {
            id: r.get(0)?,
            name: r.get(1)?,
            version: r.get(2)?,
            status: r.get(3)?,
            input: r.get(4)?,
            trace_id: r.get(5)?,
            user_id: r.get(6)?,
            role: r.get(7)?,
            claims: r.get(8)?,
            parent_id: r.get(9)?,
            tick: r.get(10)?,
            runs: r.get(11)?,
        })
    })
    .optional()?)
}

pub fn steps(c: &Connection, id: &str) -> Result<Vec<StepRec>> {
    let mut st = c.prepare_cached(
        "SELECT seq, name, kind, status, result, error, attempts, started_at, finished_at, trace_id
         FROM _ichibase_flow_steps WHERE flow_id = ?1 ORDER BY seq",
    )?;
    let rows = st
        .query_map([id], |r| {
            Ok(StepRec {
                seq: r.get(0)?,
                name: r.get(1)?,
                kind: r.get(2)?,
                status: r.get(3)?,
                result: r.get(4)?,
                error: r.get(5)?,
                attempts: r.get(6)?,
                started_at: r.get(7)?,
                finished_at: r.get(8)?,
                trace_id: r.get(9)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// Write (or replace) one journal entry. Uncached: it may run inside a caller's transaction.
pub fn put_step(c: &Connection, flow_id: &str, s: &StepRec) -> Result<()> {
    c.execute(
        "INSERT OR REPLACE INTO _ichibase_flow_steps
         (flow_id, seq, name, kind, status, result, error, attempts, started_at, finished_at, trace_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            flow_id, s.seq, s.name, s.kind, s.status, s.result, s.error, s.attempts, s.started_at,
            s.finished_at, s.trace_id
        ],
    )?;
    Ok(())
}

/// Number of unfinished instances.
pub fn active(c: &Connection) -> Result<u64> {
    Ok(c.prepare_cached(&format!(
        "SELECT count(*) FROM _ichibase_flows WHERE status IN {ACTIVE}"
    ))?
    .query_row([], |r| r.get::<_, i64>(0))? as u64)
}

/// Create an instance unless one with its id exists. Returns (version, created).
pub fn insert(c: &Connection, f: &NewFlow) -> Result<(i64, bool)> {
    if let Some((name, version, user)) = c
        .prepare_cached("SELECT name, version, user_id FROM _ichibase_flows WHERE id = ?1")?
        .query_row([&f.id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, Option<String>>(2)?))
        })
        .optional()?
    {
        if name != f.name || (user != f.user_id && f.role != "admin") {
            return Err(Error::new(
                ErrorCode::Conflict,
                format!("flow id '{}' is taken by another instance", f.id),
            ));
        }
        return Ok((version, false));
    }
    let version: Option<i64> = c
        .prepare_cached("SELECT version FROM _ichibase_function_heads WHERE name = ?1")?
        .query_row([&f.name], |r| r.get(0))
        .optional()?;
    let Some(version) = version else {
        return Err(Error::new(
            ErrorCode::NotFound,
            format!(
                "No workflow '{}': deploy a function of that name whose source calls flow.define('{}', ...)",
                f.name, f.name
            ),
        ));
    };
    c.execute(
        "INSERT INTO _ichibase_flows (id, name, version, status, input, trace_id, user_id, role, claims,
            parent_id, schedule, tick, wake_at, created_at, updated_at)
         VALUES (?1, ?2, ?3, 'pending', ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12, ?12)",
        params![
            f.id, f.name, version, f.input, f.trace_id, f.user_id, f.role, f.claims, f.parent_id,
            f.schedule, f.tick, f.now
        ],
    )?;
    Ok((version, true))
}

pub fn mark_running(c: &Connection, id: &str, now: i64) -> Result<bool> {
    let n = c.execute(
        &format!(
            "UPDATE _ichibase_flows SET status = 'running', runs = runs + 1, updated_at = ?2
             WHERE id = ?1 AND status IN {ACTIVE}"
        ),
        params![id, now],
    )?;
    Ok(n == 1)
}

/// Where a run left an instance.
#[derive(Debug, Clone)]
pub enum Next {
    Completed(String),
    Failed { error: String, code: u32 },
    /// `sleeping` or `waiting` until `wake_at` (or an event / a child wakes it).
    Suspended {
        status: &'static str,
        wake_at: i64,
        event: Option<String>,
    },
}

/// Record where a run left the instance (unless it was cancelled meanwhile); wake the parent
/// of a finished child. Returns whether the instance was updated.
pub fn finish(c: &Connection, id: &str, next: &Next, now: i64) -> Result<bool> {
    let n = match next {
        Next::Completed(out) => c.execute(
            &format!("UPDATE _ichibase_flows SET status = 'completed', output = ?2, wake_at = NULL, wait_event = NULL,
                 updated_at = ?3, finished_at = ?3 WHERE id = ?1 AND status IN {ACTIVE}"),
            params![id, out, now],
        )?,
        Next::Failed { error, code } => c.execute(
            &format!("UPDATE _ichibase_flows SET status = 'failed', error = ?2, error_code = ?3, wake_at = NULL,
                 wait_event = NULL, updated_at = ?4, finished_at = ?4 WHERE id = ?1 AND status IN {ACTIVE}"),
            params![id, error, code, now],
        )?,
        Next::Suspended { status, wake_at, event } => c.execute(
            &format!("UPDATE _ichibase_flows SET status = ?2, wake_at = ?3, wait_event = ?4, updated_at = ?5
                 WHERE id = ?1 AND status IN {ACTIVE}"),
            params![id, status, wake_at, event, now],
        )?,
    };
    if n == 1 && matches!(next, Next::Completed(_) | Next::Failed { .. }) {
        wake_parent(c, id)?;
    }
    Ok(n == 1)
}

/// A child finished: its parent (waiting for it) is due now.
pub fn wake_parent(c: &Connection, child: &str) -> Result<()> {
    c.execute(
        "UPDATE _ichibase_flows SET wake_at = 0 WHERE status = 'waiting'
           AND id = (SELECT parent_id FROM _ichibase_flows WHERE id = ?1)
           AND wait_event = 'child:' || ?1",
        [child],
    )?;
    Ok(())
}

/// Cancel an instance and its unfinished children. Returns whether it was unfinished.
pub fn cancel(c: &mut Connection, id: &str, now: i64) -> Result<Vec<String>> {
    let tx = c.transaction()?;
    let mut ids = vec![];
    let mut todo = vec![id.to_string()];
    while let Some(x) = todo.pop() {
        let n = tx.execute(
            &format!("UPDATE _ichibase_flows SET status = 'cancelled', error = 'cancelled', error_code = ?3,
                 wake_at = NULL, updated_at = ?2, finished_at = ?2 WHERE id = ?1 AND status IN {ACTIVE}"),
            params![x, now, ErrorCode::FlowCancelled.number()],
        )?;
        if n == 1 {
            wake_parent(&tx, &x)?;
            ids.push(x.clone());
            let mut st = tx.prepare_cached(&format!(
                "SELECT id FROM _ichibase_flows WHERE parent_id = ?1 AND status IN {ACTIVE}"
            ))?;
            let kids: Vec<String> = st
                .query_map([&x], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            todo.extend(kids);
        }
    }
    tx.commit()?;
    Ok(ids)
}

/// Status, error and output of an instance (for a parent waiting on it).
pub fn outcome(c: &Connection, id: &str) -> Result<Option<(String, Option<String>, Option<String>)>> {
    Ok(c.prepare_cached("SELECT status, output, error FROM _ichibase_flows WHERE id = ?1")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?)
}

/// Queue an event for an instance; wake it if it waits for that name.
pub fn add_event(c: &mut Connection, id: &str, name: &str, payload: &str, now: i64, max: u64) -> Result<()> {
    let tx = c.transaction()?;
    let status: Option<String> = tx
        .prepare_cached("SELECT status FROM _ichibase_flows WHERE id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?;
    match status.as_deref() {
        None => return Err(Error::new(ErrorCode::NotFound, format!("No flow '{id}'"))),
        Some("pending" | "running" | "sleeping" | "waiting") => {}
        Some(s) => {
            return Err(Error::new(
                ErrorCode::Conflict,
                format!("flow '{id}' is {s}: it takes no more events"),
            ));
        }
    }
    let queued: i64 = tx
        .prepare_cached("SELECT count(*) FROM _ichibase_flow_events WHERE flow_id = ?1 AND consumed_seq IS NULL")?
        .query_row([id], |r| r.get(0))?;
    if queued as u64 >= max {
        return Err(Error::new(
            ErrorCode::FlowLimit,
            format!("flow '{id}' has {queued} unconsumed events ([flow] max_events)"),
        ));
    }
    tx.execute(
        "INSERT INTO _ichibase_flow_events (flow_id, name, payload, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![id, name, payload, now],
    )?;
    tx.execute(
        "UPDATE _ichibase_flows SET wake_at = 0 WHERE id = ?1 AND status = 'waiting' AND wait_event = 'event:' || ?2",
        params![id, name],
    )?;
    tx.commit()?;
    Ok(())
}

/// Take the oldest unconsumed event `name` for journal entry `seq`, recording it as done in
/// the same transaction. Returns its payload.
pub fn consume_event(c: &mut Connection, id: &str, rec: &StepRec, now: i64) -> Result<Option<String>> {
    let tx = c.transaction()?;
    let ev: Option<(i64, String)> = tx
        .prepare_cached(
            "SELECT id, payload FROM _ichibase_flow_events WHERE flow_id = ?1 AND name = ?2 AND consumed_seq IS NULL ORDER BY id LIMIT 1",
        )?
        .query_row(params![id, rec.name], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((eid, payload)) = ev else {
        return Ok(None);
    };
    tx.execute(
        "UPDATE _ichibase_flow_events SET consumed_seq = ?2 WHERE id = ?1",
        params![eid, rec.seq],
    )?;
    let mut done = rec.clone();
    done.status = "done".into();
    done.result = Some(payload.clone());
    done.finished_at = Some(now);
    put_step(&tx, id, &done)?;
    tx.commit()?;
    Ok(Some(payload))
}

/// Delete instances finished before `cutoff` with their journals and events.
pub fn prune(c: &mut Connection, cutoff: i64) -> Result<usize> {
    let tx = c.transaction()?;
    tx.execute(
        "DELETE FROM _ichibase_flow_steps WHERE flow_id IN (SELECT id FROM _ichibase_flows WHERE finished_at < ?1)",
        [cutoff],
    )?;
    tx.execute(
        "DELETE FROM _ichibase_flow_events WHERE flow_id IN (SELECT id FROM _ichibase_flows WHERE finished_at < ?1)",
        [cutoff],
    )?;
    let n = tx.execute("DELETE FROM _ichibase_flows WHERE finished_at < ?1", [cutoff])?;
    tx.commit()?;
    Ok(n)
}

/// An ISO-8601 UTC text for a flow-clock time.
pub fn iso(ms: Option<i64>) -> Json {
    match ms.and_then(chrono::DateTime::from_timestamp_millis) {
        Some(t) if ms != Some(FOREVER) => Json::String(t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()),
        _ => Json::Null,
    }
}

fn parse(s: Option<String>) -> Json {
    s.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or(Json::Null)
}

const SUMMARY: &str = "id, name, version, status, error, error_code, trace_id, user_id, role, parent_id, schedule,
     wake_at, wait_event, runs, created_at, updated_at, finished_at";

fn summary(r: &rusqlite::Row) -> rusqlite::Result<Json> {
    Ok(json!({
        "id": r.get::<_, String>(0)?,
        "name": r.get::<_, String>(1)?,
        "version": r.get::<_, i64>(2)?,
        "status": r.get::<_, String>(3)?,
        "error": r.get::<_, Option<String>>(4)?,
        "error_code": r.get::<_, Option<i64>>(5)?,
        "trace_id": r.get::<_, String>(6)?,
        "user_id": r.get::<_, Option<String>>(7)?,
        "role": r.get::<_, String>(8)?,
        "parent_id": r.get::<_, Option<String>>(9)?,
        "schedule": r.get::<_, Option<String>>(10)?,
        "wake_at": iso(r.get::<_, Option<i64>>(11)?),
        "waiting_for": r.get::<_, Option<String>>(12)?,
        "runs": r.get::<_, i64>(13)?,
        "created_at": iso(r.get::<_, Option<i64>>(14)?),
        "updated_at": iso(r.get::<_, Option<i64>>(15)?),
        "finished_at": iso(r.get::<_, Option<i64>>(16)?),
    }))
}

/// Instances, newest first; `user` limits them to one user's.
pub fn list(
    c: &Connection,
    user: Option<&str>,
    status: Option<&str>,
    name: Option<&str>,
    limit: usize,
) -> Result<Vec<Json>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {SUMMARY} FROM _ichibase_flows
         WHERE (?1 IS NULL OR user_id = ?1) AND (?2 IS NULL OR status = ?2) AND (?3 IS NULL OR name = ?3)
         ORDER BY created_at DESC, id LIMIT ?4"
    ))?;
    let rows = st
        .query_map(params![user, status, name, limit as i64], summary)?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// Counts of instances by status.
pub fn counts(c: &Connection, user: Option<&str>) -> Result<Json> {
    let mut st = c.prepare_cached(
        "SELECT status, count(*) FROM _ichibase_flows WHERE (?1 IS NULL OR user_id = ?1) GROUP BY status",
    )?;
    let mut m = serde_json::Map::new();
    for r in st.query_map([user], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
        let (s, n) = r?;
        m.insert(s, json!(n));
    }
    Ok(Json::Object(m))
}

/// One instance with its input, output and journal; `None` when missing. The owner (user id)
/// comes back separately for the access check.
pub fn detail(c: &Connection, id: &str) -> Result<Option<(Option<String>, Json)>> {
    let row = c
        .prepare_cached(&format!(
            "SELECT {SUMMARY}, input, output FROM _ichibase_flows WHERE id = ?1"
        ))?
        .query_row([id], |r| {
            let mut s = summary(r)?;
            s["input"] = parse(r.get(17)?);
            s["output"] = parse(r.get(18)?);
            Ok(s)
        })
        .optional()?;
    let Some(mut row) = row else { return Ok(None) };
    let steps: Vec<Json> = steps(c, id)?
        .into_iter()
        .map(|s| {
            let ms = match (s.started_at, s.finished_at) {
                (Some(a), Some(b)) => json!(b - a),
                _ => Json::Null,
            };
            json!({"seq": s.seq, "name": s.name, "kind": s.kind, "status": s.status,
                   "result": parse(s.result), "error": s.error, "attempts": s.attempts,
                   "started_at": iso(s.started_at), "finished_at": iso(s.finished_at),
                   "elapsed_ms": ms, "trace_id": s.trace_id})
        })
        .collect();
    row["steps"] = Json::Array(steps);
    let owner = row["user_id"].as_str().map(str::to_string);
    Ok(Some((owner, row)))
}
