//! Deployed functions (versioned) and recorded traces, in engine tables.
//!
//! `_ichibase_functions` keeps every version's source; `_ichibase_function_heads` names the
//! live version of each function (deploy moves it forward, rollback moves it back).
//! `_ichibase_traces` and `_ichibase_trace_steps` hold deep traces. Everything here runs on
//! storage connections as the engine (admin), after the API layer checked the caller.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::{Value as Json, json};

use super::Outcome;
use super::limits::TraceLimits;
use crate::core::{Error, ErrorCode, Result};

pub const MAX_SOURCE: usize = 1024 * 1024;

pub fn check_name(name: &str) -> Result<()> {
    crate::core::check_name("function name", name)
}

#[derive(Debug, Clone, Serialize)]
pub struct FunctionInfo {
    pub name: String,
    pub version: i64,
    pub versions: i64,
    pub trace: bool,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct FunctionSource {
    pub name: String,
    pub version: i64,
    pub live: bool,
    pub trace: bool,
    pub created_at: String,
    pub created_by: Option<String>,
    pub source: String,
}

/// Store a new version and make it live. Returns its number.
pub fn deploy(
    c: &mut Connection,
    name: &str,
    source: &str,
    trace: bool,
    by: Option<&str>,
) -> Result<i64> {
    let tx = c.savepoint()?; // a savepoint, so a bundle merge can deploy inside its own transaction
    let v: i64 = tx.query_row(
        "SELECT coalesce(max(version), 0) + 1 FROM _ichibase_functions WHERE name = ?1",
        [name],
        |r| r.get(0),
    )?;
    tx.execute("INSERT INTO _ichibase_functions (name, version, source, trace, created_by) VALUES (?1, ?2, ?3, ?4, ?5)", params![name, v, source, trace, by])?;
    tx.execute(
        "INSERT INTO _ichibase_function_heads (name, version) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET version = excluded.version, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
        params![name, v],
    )?;
    tx.commit()?;
    Ok(v)
}

pub fn list(c: &Connection) -> Result<Vec<FunctionInfo>> {
    let mut st = c.prepare(
        "SELECT h.name, h.version, (SELECT count(*) FROM _ichibase_functions f WHERE f.name = h.name), f.trace, h.updated_at
         FROM _ichibase_function_heads h JOIN _ichibase_functions f ON f.name = h.name AND f.version = h.version ORDER BY h.name",
    )?;
    let rows = st
        .query_map([], |r| {
            Ok(FunctionInfo {
                name: r.get(0)?,
                version: r.get(1)?,
                versions: r.get(2)?,
                trace: r.get(3)?,
                updated_at: r.get(4)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// The look-up of [`get`] (every invocation runs it; a cached statement).
pub(crate) const GET_SQL: &str =
    "SELECT f.version, f.version = h.version, f.trace, f.created_at, f.created_by, f.source
     FROM _ichibase_functions f JOIN _ichibase_function_heads h ON h.name = f.name
     WHERE f.name = ?1 AND f.version = coalesce(?2, h.version)";

/// A version's source (`None`: the live one).
pub fn get(c: &Connection, name: &str, version: Option<i64>) -> Result<FunctionSource> {
    let row = c
        .prepare_cached(GET_SQL)?
        .query_row(params![name, version], |r| {
            Ok(FunctionSource {
                name: name.to_string(),
                version: r.get(0)?,
                live: r.get(1)?,
                trace: r.get(2)?,
                created_at: r.get(3)?,
                created_by: r.get(4)?,
                source: r.get(5)?,
            })
        })
        .optional()?;
    row.ok_or_else(|| match version {
        Some(v) => Error::new(
            ErrorCode::NotFound,
            format!("No version {v} of function '{name}'"),
        ),
        None => Error::new(ErrorCode::NotFound, format!("No function '{name}'")),
    })
}

/// The live versions of functions as last read, each with the database's change stamp of
/// that read ([`crate::storage::stamp`]): a copy is used only while the stamp is still the
/// database's, so any commit (a deploy, a rollback, a bundle merge, `ichibase fn deploy` from
/// another process, or any other write) sends the next call back to the database. Bounded: at
/// most [`SourceCache::MAX_FUNCTIONS`] functions and [`SourceCache::MAX_BYTES`] of source;
/// past either it starts over.
#[derive(Debug, Default)]
pub struct SourceCache(std::sync::RwLock<SourceMap>);

#[derive(Debug, Default)]
struct SourceMap {
    live: std::collections::HashMap<String, (crate::storage::stamp::Stamp, std::sync::Arc<FunctionSource>)>,
    bytes: usize,
}

impl SourceCache {
    pub const MAX_FUNCTIONS: usize = 1024;
    pub const MAX_BYTES: usize = 32 * 1024 * 1024;

    /// The live version of `name`: the cached copy when nothing was committed since it was
    /// read, else `read` (a read of [`get`] on `storage`; `None`: it could not run now), whose
    /// answer is kept when no commit happened while it ran.
    pub fn live(
        &self,
        storage: &crate::storage::Storage,
        name: &str,
        read: impl FnOnce() -> Option<Result<FunctionSource>>,
    ) -> Option<Result<std::sync::Arc<FunctionSource>>> {
        let before = storage.change_stamp();
        if let Some(stamp) = before {
            let map = self.0.read().unwrap_or_else(|e| e.into_inner());
            if let Some((s, f)) = map.live.get(name) {
                if *s == stamp {
                    return Some(Ok(std::sync::Arc::clone(f)));
                }
            }
        }
        let f = match read()? {
            Ok(f) => std::sync::Arc::new(f),
            Err(e) => return Some(Err(e)),
        };
        if let Some(stamp) = before.filter(|s| storage.change_stamp() == Some(*s)) {
            self.keep(name, stamp, std::sync::Arc::clone(&f));
        }
        Some(Ok(f))
    }

    fn keep(&self, name: &str, stamp: crate::storage::stamp::Stamp, f: std::sync::Arc<FunctionSource>) {
        let mut map = self.0.write().unwrap_or_else(|e| e.into_inner());
        let size = f.source.len() + name.len();
        if size > Self::MAX_BYTES {
            return;
        }
        if let Some((_, old)) = map.live.remove(name) {
            map.bytes -= old.source.len() + name.len();
        }
        if map.live.len() >= Self::MAX_FUNCTIONS || map.bytes + size > Self::MAX_BYTES {
            map.live.clear();
            map.bytes = 0;
        }
        map.bytes += size;
        map.live.insert(name.to_string(), (stamp, f));
    }

    /// Functions cached now (tests).
    pub fn len(&self) -> usize {
        self.0.read().unwrap_or_else(|e| e.into_inner()).live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub fn versions(c: &Connection, name: &str) -> Result<Vec<Json>> {
    let mut st = c.prepare(
        "SELECT f.version, f.created_at, f.created_by, f.trace, f.version = h.version, length(f.source)
         FROM _ichibase_functions f JOIN _ichibase_function_heads h ON h.name = f.name WHERE f.name = ?1 ORDER BY f.version",
    )?;
    let rows: Vec<Json> = st
        .query_map([name], |r| {
            Ok(json!({"version": r.get::<_, i64>(0)?, "created_at": r.get::<_, String>(1)?, "created_by": r.get::<_, Option<String>>(2)?,
                      "trace": r.get::<_, bool>(3)?, "live": r.get::<_, bool>(4)?, "bytes": r.get::<_, i64>(5)?}))
        })?
        .collect::<rusqlite::Result<_>>()?;
    if rows.is_empty() {
        return Err(Error::new(
            ErrorCode::NotFound,
            format!("No function '{name}'"),
        ));
    }
    Ok(rows)
}

/// Make `to` (default: the version before the live one) live again.
pub fn rollback(c: &mut Connection, name: &str, to: Option<i64>) -> Result<i64> {
    let tx = c.transaction()?;
    let live: Option<i64> = tx
        .query_row(
            "SELECT version FROM _ichibase_function_heads WHERE name = ?1",
            [name],
            |r| r.get(0),
        )
        .optional()?;
    let Some(live) = live else {
        return Err(Error::new(
            ErrorCode::NotFound,
            format!("No function '{name}'"),
        ));
    };
    let target: Option<i64> = match to {
        Some(v) => tx
            .query_row(
                "SELECT version FROM _ichibase_functions WHERE name = ?1 AND version = ?2",
                params![name, v],
                |r| r.get(0),
            )
            .optional()?,
        None => tx.query_row(
            "SELECT max(version) FROM _ichibase_functions WHERE name = ?1 AND version < ?2",
            params![name, live],
            |r| r.get(0),
        )?,
    };
    let Some(target) = target else {
        return Err(Error::new(
            ErrorCode::NotFound,
            match to {
                Some(v) => format!("No version {v} of function '{name}'"),
                None => format!("Function '{name}' has no version before {live}"),
            },
        ));
    };
    tx.execute("UPDATE _ichibase_function_heads SET version = ?1, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE name = ?2", params![target, name])?;
    tx.commit()?;
    Ok(target)
}

pub fn delete(c: &mut Connection, name: &str) -> Result<()> {
    let tx = c.transaction()?;
    let n = tx.execute(
        "DELETE FROM _ichibase_function_heads WHERE name = ?1",
        [name],
    )?;
    tx.execute("DELETE FROM _ichibase_functions WHERE name = ?1", [name])?;
    tx.commit()?;
    if n == 0 {
        return Err(Error::new(
            ErrorCode::NotFound,
            format!("No function '{name}'"),
        ));
    }
    Ok(())
}

/// A trace ready to be written: every value as JSON text, within `[traces] max_bytes`. Built
/// off the writer (by the background saver, see `lua::saver`), so the writer only inserts.
pub struct TraceRows {
    id: String,
    function: String,
    version: i64,
    user_id: Option<String>,
    role: String,
    owner: Option<String>,
    elapsed_ms: f64,
    outcome: &'static str,
    error: Option<String>,
    error_line: Option<i64>,
    instructions: i64,
    peak_memory: i64,
    truncated: bool,
    result: Option<String>,
    logs: String,
    sampling: Option<String>,
    bytes: usize,
    /// (step, line, depth, function, source, locals, upvalues, after, skipped)
    #[allow(clippy::type_complexity)]
    steps: Vec<(u64, i32, u32, std::sync::Arc<str>, std::sync::Arc<str>, std::sync::Arc<str>, std::sync::Arc<str>, bool, u64)>,
    limits: TraceLimits,
}

impl TraceRows {
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// Serialise a traced invocation for [`insert_trace`], within `[traces] max_bytes` (later
/// steps are dropped and the trace marked truncated). `owner` is who may read it besides the
/// admin (none: the admin only).
#[allow(clippy::too_many_arguments)]
pub fn trace_rows(
    id: &str,
    function: &str,
    version: i64,
    user_id: Option<&str>,
    role: &str,
    owner: Option<&str>,
    limits: &TraceLimits,
    o: &Outcome,
) -> TraceRows {
    let max = limits.max_bytes as usize;
    let (steps, mut truncated) = o
        .steps
        .as_ref()
        .map(|(s, t)| (s.as_slice(), *t))
        .unwrap_or((&[], false));
    // A result or log bigger than a quarter of the budget is not kept (only its size).
    let keep = |text: String, what: &str| -> String {
        if text.len() > max / 4 {
            Json::String(format!(
                "<{what} of {} bytes not kept: larger than a quarter of [traces] max_bytes>",
                text.len()
            ))
            .to_string()
        } else {
            text
        }
    };
    let (outcome, error, result) = match &o.result {
        Ok(v) => ("ok", None, Some(keep(v.to_string(), "result"))),
        Err(e) => {
            let mut t = e.to_string();
            if t.len() > max / 4 {
                let mut end = max / 4;
                while !t.is_char_boundary(end) {
                    end -= 1;
                }
                t.truncate(end);
                t.push_str("… (cut: [traces] max_bytes)");
            }
            ("error", Some(t), None)
        }
    };
    let logs = keep(serde_json::to_string(&o.logs).unwrap_or_default(), "logs");
    let sampling = o
        .sampling
        .as_ref()
        .map(|s| keep(serde_json::to_string(s).unwrap_or_default(), "sampling"));
    let mut bytes = result.as_ref().map_or(0, String::len)
        + logs.len()
        + error.as_ref().map_or(0, String::len)
        + sampling.as_ref().map_or(0, String::len);
    let mut rows = Vec::new();
    // Steps share the snapshots of values that did not change: each distinct snapshot is
    // turned into JSON text once.
    let mut texts: std::collections::HashMap<*const super::trace::Snap, std::sync::Arc<str>> =
        std::collections::HashMap::new();
    let mut text = |snap: &std::sync::Arc<super::trace::Snap>| -> std::sync::Arc<str> {
        std::sync::Arc::clone(texts.entry(std::sync::Arc::as_ptr(snap)).or_insert_with(|| {
            serde_json::to_string(&**snap).unwrap_or_default().into()
        }))
    };
    for s in steps {
        let locals = text(&s.locals);
        let upvalues = text(&s.upvalues);
        let size = 48 + s.function.len() + s.source.len() + locals.len() + upvalues.len();
        if bytes + size > max {
            truncated = true;
            break;
        }
        bytes += size;
        rows.push((
            s.step,
            s.line,
            s.depth,
            std::sync::Arc::clone(&s.function),
            std::sync::Arc::clone(&s.source),
            locals,
            upvalues,
            s.after,
            s.skipped,
        ));
    }
    drop(text);
    drop(texts);
    TraceRows {
        id: id.to_string(),
        function: function.to_string(),
        version,
        user_id: user_id.map(String::from),
        role: role.to_string(),
        owner: owner.map(String::from),
        elapsed_ms: o.elapsed.as_secs_f64() * 1e3,
        outcome,
        error,
        error_line: o.error_line,
        instructions: o.instructions.unwrap_or(0) as i64,
        peak_memory: o.peak_memory as i64,
        truncated,
        result,
        logs,
        sampling,
        bytes,
        steps: rows,
        limits: *limits,
    }
}

/// Write a trace [`trace_rows`] prepared, then prune traces past the retention and, oldest
/// first, beyond `[traces] total_bytes`.
pub fn insert_trace(c: &mut Connection, t: &TraceRows) -> Result<()> {
    let tx = c.transaction()?;
    tx.execute(
        "INSERT INTO _ichibase_traces (id, function, version, user_id, role, elapsed_ms, outcome, error, error_line, instructions, peak_memory, steps, truncated, result, logs, owner, bytes, sampling)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
        params![
            t.id,
            t.function,
            t.version,
            t.user_id,
            t.role,
            t.elapsed_ms,
            t.outcome,
            t.error,
            t.error_line,
            t.instructions,
            t.peak_memory,
            t.steps.len() as i64,
            t.truncated,
            t.result,
            t.logs,
            t.owner,
            t.bytes as i64,
            t.sampling,
        ],
    )?;
    {
        let mut st = tx.prepare("INSERT INTO _ichibase_trace_steps (trace_id, step, line, depth, function, source, locals, upvalues, after, skipped) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)")?;
        for (step, line, depth, function, source, locals, upvalues, after, skipped) in &t.steps {
            st.execute(params![
                t.id, *step as i64, line, depth, &**function, &**source, &**locals, &**upvalues, after, *skipped as i64
            ])?;
        }
    }
    prune_in(&tx, &t.limits)?;
    tx.commit()?;
    Ok(())
}

/// Persist a traced invocation now ([`trace_rows`] then [`insert_trace`]).
#[allow(clippy::too_many_arguments)]
pub fn save_trace(
    c: &mut Connection,
    id: &str,
    function: &str,
    version: i64,
    user_id: Option<&str>,
    role: &str,
    owner: Option<&str>,
    limits: &TraceLimits,
    o: &Outcome,
) -> Result<()> {
    let rows = trace_rows(id, function, version, user_id, role, owner, limits, o);
    insert_trace(c, &rows)
}

/// Delete traces past the retention and, oldest first, those beyond the total budget.
/// Returns how many were deleted.
pub fn prune_traces(c: &mut Connection, limits: &TraceLimits) -> Result<usize> {
    let tx = c.transaction()?;
    let n = prune_in(&tx, limits)?;
    tx.commit()?;
    Ok(n)
}

fn prune_in(c: &Connection, limits: &TraceLimits) -> Result<usize> {
    let modifier = format!("-{:.3} seconds", limits.retention_secs);
    let mut doomed: Vec<String> = c
        .prepare_cached(
            "SELECT id FROM _ichibase_traces WHERE started_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?1)",
        )?
        .query_map([&modifier], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let total: i64 = c.query_row(
        "SELECT coalesce(sum(bytes), 0) FROM _ichibase_traces WHERE started_at >= strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?1)",
        [&modifier],
        |r| r.get(0),
    )?;
    let mut excess = total - limits.total_bytes as i64;
    if excess > 0 {
        let mut st = c.prepare_cached(
            "SELECT id, bytes FROM _ichibase_traces WHERE started_at >= strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?1) ORDER BY started_at, rowid",
        )?;
        let mut rows = st.query([&modifier])?;
        while excess > 0 {
            let Some(r) = rows.next()? else { break };
            doomed.push(r.get(0)?);
            excess -= r.get::<_, i64>(1)?;
        }
    }
    let mut del_steps =
        c.prepare_cached("DELETE FROM _ichibase_trace_steps WHERE trace_id = ?1")?;
    let mut del = c.prepare_cached("DELETE FROM _ichibase_traces WHERE id = ?1")?;
    for id in &doomed {
        del_steps.execute([id])?;
        del.execute([id])?;
    }
    Ok(doomed.len())
}

/// Who may read trace `id` besides the admin (`None`: the admin only); NotFound when absent.
pub fn trace_owner(c: &Connection, id: &str) -> Result<Option<String>> {
    let row: Option<Option<String>> = c
        .query_row(
            "SELECT owner FROM _ichibase_traces WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .optional()?;
    row.ok_or_else(|| Error::new(ErrorCode::NotFound, format!("No trace {id}")))
}

pub fn get_trace(c: &Connection, id: &str) -> Result<Json> {
    let meta = c
        .query_row(
            "SELECT function, version, user_id, role, started_at, elapsed_ms, outcome, error, error_line, instructions, peak_memory, steps, truncated, result, logs, owner, bytes, sampling
             FROM _ichibase_traces WHERE id = ?1",
            [id],
            |r| {
                Ok(json!({
                    "id": id, "function": r.get::<_, String>(0)?, "version": r.get::<_, i64>(1)?, "user_id": r.get::<_, Option<String>>(2)?,
                    "role": r.get::<_, String>(3)?, "started_at": r.get::<_, String>(4)?, "elapsed_ms": r.get::<_, f64>(5)?,
                    "outcome": r.get::<_, String>(6)?, "error": r.get::<_, Option<String>>(7)?, "error_line": r.get::<_, Option<i64>>(8)?,
                    "instructions": r.get::<_, i64>(9)?, "peak_memory": r.get::<_, i64>(10)?, "steps": r.get::<_, i64>(11)?,
                    "truncated": r.get::<_, bool>(12)?,
                    "result": r.get::<_, Option<String>>(13)?.and_then(|s| serde_json::from_str::<Json>(&s).ok()),
                    "logs": r.get::<_, Option<String>>(14)?.and_then(|s| serde_json::from_str::<Json>(&s).ok()),
                    "owner": r.get::<_, Option<String>>(15)?, "bytes": r.get::<_, i64>(16)?,
                    "sampling": r.get::<_, Option<String>>(17)?.and_then(|s| serde_json::from_str::<Json>(&s).ok()),
                }))
            },
        )
        .optional()?
        .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("No trace {id}")))?;
    let mut st = c.prepare("SELECT step, line, depth, function, source, locals, upvalues, after, skipped FROM _ichibase_trace_steps WHERE trace_id = ?1 ORDER BY step")?;
    let steps: Vec<Json> = st
        .query_map([id], |r| {
            let mut s = json!({
                "step": r.get::<_, i64>(0)?, "line": r.get::<_, i64>(1)?, "depth": r.get::<_, i64>(2)?, "function": r.get::<_, String>(3)?,
                "source": r.get::<_, String>(4)?,
                "locals": serde_json::from_str::<Json>(&r.get::<_, String>(5)?).unwrap_or(Json::Null),
                "upvalues": serde_json::from_str::<Json>(&r.get::<_, String>(6)?).unwrap_or(Json::Null),
                "after": r.get::<_, bool>(7)?,
            });
            // Only on steps of a sampled line: visits of it not recorded since its last step.
            let skipped: i64 = r.get(8)?;
            if skipped > 0 {
                s["skipped"] = json!(skipped);
            }
            Ok(s)
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(json!({"trace": meta, "steps": steps}))
}

/// Hover: the value of variable `name` at `step` (the innermost binding: local, then upvalue),
/// or, without a step, its history — every step where its value changed.
pub fn hover(c: &Connection, id: &str, name: &str, step: Option<i64>) -> Result<Json> {
    let path = format!("$.\"{}\"", name.replace('"', "\\\""));
    let mut st = c.prepare(
        "SELECT step, line, function, depth,
                json_type(locals, ?2) IS NOT NULL, json_extract(locals, ?2), json(locals) -> ?2,
                json_type(upvalues, ?2) IS NOT NULL, json(upvalues) -> ?2
         FROM _ichibase_trace_steps WHERE trace_id = ?1 AND (?3 IS NULL OR step = ?3) ORDER BY step",
    )?;
    let rows: Vec<(i64, i64, String, i64, Option<(String, Json)>)> = st
        .query_map(params![id, path, step], |r| {
            let in_locals: bool = r.get(4)?;
            let in_up: bool = r.get(7)?;
            let parse = |s: Option<String>| {
                s.and_then(|s| serde_json::from_str::<Json>(&s).ok())
                    .unwrap_or(Json::Null)
            };
            let v = if in_locals {
                Some(("local".to_string(), parse(r.get(6)?)))
            } else if in_up {
                Some(("upvalue".to_string(), parse(r.get(8)?)))
            } else {
                None
            };
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, v))
        })?
        .collect::<rusqlite::Result<_>>()?;
    if rows.is_empty() {
        trace_owner(c, id)?;
        if let Some(s) = step {
            return Err(Error::new(
                ErrorCode::NotFound,
                format!("Trace {id} has no step {s}"),
            ));
        }
    }
    if step.is_some() {
        let (s, line, function, depth, v) = rows.into_iter().next().expect("checked above");
        return Ok(match v {
            Some((scope, value)) => {
                json!({"name": name, "step": s, "line": line, "function": function, "depth": depth, "scope": scope, "value": value, "defined": true})
            }
            None => {
                json!({"name": name, "step": s, "line": line, "function": function, "depth": depth, "defined": false, "value": null})
            }
        });
    }
    // A change is judged per frame (function and depth): a variable of the same name in a
    // called function is another variable.
    let mut history = Vec::new();
    let mut last: std::collections::HashMap<(String, i64), Json> = std::collections::HashMap::new();
    for (s, line, function, depth, v) in rows {
        if let Some((scope, value)) = v {
            let key = (function.clone(), depth);
            if last.get(&key) != Some(&value) {
                history.push(json!({"step": s, "line": line, "function": function, "depth": depth, "scope": scope, "value": value}));
                last.insert(key, value);
            }
        }
    }
    // With hot-line sampling some visits were not recorded: the history is over the recorded
    // steps (a value may have changed in between).
    let sampled: bool = c
        .query_row(
            "SELECT sampling IS NOT NULL FROM _ichibase_traces WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(false);
    Ok(json!({"name": name, "history": history, "sampled": sampled}))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::core::RequestContext;
    use crate::storage::{ExecControl, Storage};

    /// The cache answers with the copy it holds while nothing is committed, reads again after
    /// any commit (another connection's too), and never keeps what a read during a commit saw.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cached_sources_last_until_the_next_commit() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open_in(dir.path());
        let ctl = || ExecControl::new(std::time::Instant::now(), 0.0);
        let sys = RequestContext::system;
        storage
            .write(&sys(), ctl(), |c| deploy(c, "f", "return function() return 1 end", false, None))
            .await
            .unwrap();
        let cache = SourceCache::default();
        let reads = std::sync::atomic::AtomicUsize::new(0);
        let look = |cache: &SourceCache| {
            cache
                .live(&storage, "f", || {
                    reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    storage.try_read_inline(&sys(), ctl(), |c| get(c, "f", None))
                })
                .unwrap()
                .unwrap()
        };
        let a = look(&cache);
        let b = look(&cache);
        assert!(Arc::ptr_eq(&a, &b), "no commit in between: the same copy");
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Another connection deploys (as `ichibase fn deploy` in another process does).
        let mut other = rusqlite::Connection::open(storage.path()).unwrap();
        deploy(&mut other, "f", "return function() return 2 end", false, None).unwrap();
        let c = look(&cache);
        assert_eq!((c.version, reads.load(std::sync::atomic::Ordering::SeqCst)), (2, 2));
        assert!(c.source.contains("return 2"));
        // A read that a commit overtakes is answered but not kept.
        other.execute_batch("CREATE TABLE w(z)").unwrap();
        let d = cache
            .live(&storage, "f", || {
                other.execute_batch("CREATE TABLE x(y)").unwrap();
                storage.try_read_inline(&sys(), ctl(), |c| get(c, "f", None))
            });
        assert!(d.is_some());
        let e = look(&cache);
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 3, "the overtaken read was not kept");
        assert_eq!(e.version, 2);
        // Errors are answered, never cached.
        let missing = cache.live(&storage, "g", || storage.try_read_inline(&sys(), ctl(), |c| get(c, "g", None)));
        assert!(matches!(missing, Some(Err(_))));
        assert_eq!(cache.len(), 1);
    }

    /// However many functions are called, the cache holds at most its bounds (it starts over
    /// past them), and a source larger than the whole byte bound is never kept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_cache_stays_within_its_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open_in(dir.path());
        let stamp = storage.change_stamp().unwrap();
        let source = |name: &str, len: usize| FunctionSource {
            name: name.to_string(),
            version: 1,
            live: true,
            trace: false,
            created_at: String::new(),
            created_by: None,
            source: "x".repeat(len),
        };
        let cache = SourceCache::default();
        for i in 0..(SourceCache::MAX_FUNCTIONS * 2 + 7) {
            let name = format!("f{i}");
            cache.keep(&name, stamp, Arc::new(source(&name, 10)));
            assert!(cache.len() <= SourceCache::MAX_FUNCTIONS);
        }
        let big = SourceCache::MAX_BYTES / 3;
        for i in 0..7 {
            let name = format!("big{i}");
            cache.keep(&name, stamp, Arc::new(source(&name, big)));
            let map = cache.0.read().unwrap();
            assert!(map.bytes <= SourceCache::MAX_BYTES, "{} bytes", map.bytes);
            assert_eq!(map.bytes, map.live.iter().map(|(k, (_, f))| k.len() + f.source.len()).sum::<usize>());
        }
        cache.keep("huge", stamp, Arc::new(source("huge", SourceCache::MAX_BYTES + 1)));
        assert!(!cache.0.read().unwrap().live.contains_key("huge"));
    }
}
