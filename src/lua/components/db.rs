//! `db`: SQL from Lua, as the caller, so policies and the authorizer apply exactly as over HTTP.
//!
//! - `db.query(sql, params?)` → array of rows (tables keyed by column name)
//! - `db.one(sql, params?)` → the first row or nil
//! - `db.exec(sql, params?)` → `{changes = n, last_insert_id = n}`
//! - `db.tx(function() ... end)` → runs the function in one write transaction: commit when it
//!   returns, rollback when it raises; the function's results are returned. A nested `db.tx`
//!   is a savepoint: its error undoes only its own writes.
//! - `db.migrate(sql)` → several statements in one transaction (admin only)
//!
//! Parameters are `{name:Type}` placeholders bound from the `params` table. Outside `db.tx`,
//! reads run on a pooled reader and writes on the writer (one statement, autocommitted).
//! Inside `db.tx`, every statement goes to one writer session held open for the transaction.
//! A write transaction has its own time limit, shorter than the invocation's:
//! `[lua_limits] tx_timeout_secs` from the outer `db.tx`'s start (or from an autocommitted
//! write's start) to its commit. Past it the writer rolls back and is free for others, and the
//! invocation ends with `TIMEOUT_EXCEEDED` (the limit stays fired, like the invocation's own:
//! `pcall` cannot catch it to open another transaction). Results are bounded in rows and bytes.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Instant;

use mlua::{Function, Lua, MultiValue, Table, Value};
use rusqlite::types::Value as Sql;

use super::{Component, lua_err};
use crate::core::{Error, ErrorCode, Result};
use crate::lua::sandbox::Limit;
use crate::lua::{Env, to_json};
use crate::sql::embedded::{self, Prepared, Rows};
use crate::storage::ExecControl;

pub struct Db;

/// Deepest `db.tx` nesting.
const MAX_TX_DEPTH: u32 = 32;

enum TxOp {
    Run(Prepared, mpsc::Sender<Result<Rows>>),
    /// Savepoint control inside the session (`SAVEPOINT`, `RELEASE`, `ROLLBACK TO`).
    Raw(String, mpsc::Sender<Result<()>>),
    Finish(bool, mpsc::Sender<Result<()>>),
    /// Engine code run inside the open transaction (see [`in_open_tx`]).
    Call(Box<dyn FnOnce(&mut rusqlite::Connection) + Send>),
    /// Engine work inside the transaction, just before its commit (see [`tx_then`]).
    BeforeCommit(CommitHook, mpsc::Sender<Result<()>>),
}

/// Engine statements run on the writer inside a `db.tx` transaction, before its commit.
pub type CommitHook = Box<dyn FnOnce(&mut rusqlite::Connection) -> Result<()> + Send>;

/// An open write transaction on the writer thread, fed statements from the Lua thread.
pub struct TxSession {
    ops: mpsc::Sender<TxOp>,
    depth: Cell<u32>,
}

impl TxSession {
    fn raw(&self, env: &Env, sql: String) -> Result<()> {
        let (reply, rx) = mpsc::channel();
        self.ops
            .send(TxOp::Raw(sql, reply))
            .map_err(|_| session_ended(env))?;
        rx.recv().map_err(|_| session_ended(env))?
    }
}

/// Run engine code `f` on the connection of the invocation's open `db.tx`, so its writes
/// commit or roll back with the caller's (inside a nested `db.tx`, with its savepoint).
/// `None` when no transaction is open. `f` runs with the caller's context installed: engine
/// tables need [`crate::storage::engine_statements`].
pub(crate) fn in_open_tx<R: Send + 'static>(
    env: &Env,
    f: impl FnOnce(&mut rusqlite::Connection) -> Result<R> + Send + 'static,
) -> Option<Result<R>> {
    let tx = env.tx.borrow();
    let tx = tx.as_ref()?;
    let (reply, rx) = mpsc::channel();
    let call = TxOp::Call(Box::new(move |c| {
        let _ = reply.send(f(c));
    }));
    if tx.ops.send(call).is_err() {
        return Some(Err(session_ended(env)));
    }
    Some(rx.recv().unwrap_or_else(|_| Err(session_ended(env))))
}

pub(crate) fn params_json(
    p: Option<Table>,
) -> mlua::Result<serde_json::Map<String, serde_json::Value>> {
    match p {
        None => Ok(serde_json::Map::new()),
        Some(t) => match to_json(&Value::Table(t))
            .map_err(|e| mlua::Error::runtime(format!("db: parameters: {e}")))?
        {
            serde_json::Value::Object(m) => Ok(m),
            serde_json::Value::Array(a) if a.is_empty() => Ok(serde_json::Map::new()),
            _ => Err(mlua::Error::runtime(
                "db: parameters must be a table of name = value (for {name:Type} placeholders)",
            )),
        },
    }
}

/// When a write transaction started now must end: its own limit, within the invocation's.
fn write_deadline(env: &Env) -> Instant {
    let own = Instant::now() + env.options.tx_timeout;
    env.control.deadline.map_or(own, |d| d.min(own))
}

/// An execution control for writes that must end by `deadline`.
fn write_control(env: &Env, deadline: Instant) -> Arc<ExecControl> {
    let now = Instant::now();
    let secs = deadline
        .saturating_duration_since(now)
        .as_secs_f64()
        .max(0.001);
    ExecControl::with_value_limit(now, secs, env.control.value_limit)
}

/// After a write failed: past the transaction's deadline, the failure is the transaction
/// limit, which ends the invocation.
fn write_failed(env: &Env, deadline: Instant, e: Error) -> Error {
    if Instant::now() >= deadline && env.control.deadline.is_none_or(|d| deadline < d) {
        env.meter.tripped.set(Some(Limit::Transaction));
        Error::new(
            ErrorCode::TimeoutExceeded,
            format!(
                "db: the write ran past its time limit ({} s, [lua_limits] tx_timeout_secs) and was rolled back",
                env.options.tx_timeout.as_secs_f64()
            ),
        )
    } else {
        e
    }
}

/// Inside `db.tx`: a session that ended (the writer gave up at the deadline) is the
/// transaction limit once the deadline passed.
fn session_ended(env: &Env) -> Error {
    match env.meter.tx_deadline() {
        Some(d) if Instant::now() >= d => {
            env.meter.tripped.set(Some(Limit::Transaction));
            Error::new(
                ErrorCode::TimeoutExceeded,
                format!(
                    "db.tx ran past its time limit ({} s, [lua_limits] tx_timeout_secs); the transaction was rolled back",
                    env.options.tx_timeout.as_secs_f64()
                ),
            )
        }
        _ => Error::internal("the transaction session ended"),
    }
}

fn prepare(env: &Env, sql: &str, p: Option<Table>) -> mlua::Result<Prepared> {
    if sql.len() > LARGE_SQL {
        // Parsing a large text allocates many times its size outside Lua (tokens, syntax
        // tree), also when it fails: hand that memory back at the invocation's end.
        crate::lua::mark_heavy();
    }
    embedded::prepare(sql, &params_json(p)?, false, env.options.max_sql).map_err(lua_err)
}

/// SQL texts longer than this mark their invocation heavy ([`crate::lua::mark_heavy`]).
const LARGE_SQL: usize = 64 * 1024;

/// Run `prepared` and record it in the posterity log (one `sql` row per call).
fn run(env: &Env, prepared: Prepared) -> Result<Rows> {
    let sink = env
        .app
        .as_ref()
        .map(|a| a.posterity().sink())
        .filter(|s| s.enabled());
    let Some(sink) = sink else {
        return run_unlogged(env, prepared);
    };
    let (text, verb) = prepared.describe();
    let t = Instant::now();
    let r = run_unlogged(env, prepared);
    let mut e = crate::posterity::Event::now("sql", Some(&env.ctx));
    e.name = Some(crate::posterity::sql_hash(&text));
    e.elapsed_ms = t.elapsed().as_secs_f64() * 1e3;
    e.outcome = Some(if r.is_ok() { "ok" } else { "error" });
    match &r {
        Ok(rows) => e.rows = Some(rows.rows.len().max(rows.changes as usize) as i64),
        Err(err) => e.error = Some(err.message.chars().take(1000).collect()),
    }
    e.detail = Some(
        serde_json::json!({"verb": verb, "from": "lua", "function": env.function}).to_string(),
    );
    e.sql_text = Some(text);
    sink.record(e);
    r
}

fn run_unlogged(env: &Env, prepared: Prepared) -> Result<Rows> {
    if let Some(tx) = env.tx.borrow().as_ref() {
        let (reply, rx) = mpsc::channel();
        tx.ops
            .send(TxOp::Run(prepared, reply))
            .map_err(|_| session_ended(env))?;
        let r = rx.recv().map_err(|_| session_ended(env))?;
        return match (r, env.meter.tx_deadline()) {
            (Err(e), Some(d)) => Err(write_failed(env, d, e)),
            (r, _) => r,
        };
    }
    let authz = Arc::clone(env.storage.authz());
    let is_admin = env.ctx.is_admin();
    let (max_rows, max_bytes) = (env.options.max_rows, env.options.memory_limit as u64);
    let read = env
        .storage
        .read_blocking(&env.rt, &env.ctx, Arc::clone(&env.control), |c| {
            if prepared.readonly(c)? {
                Ok(Some(
                    prepared.run(c, &authz, is_admin, max_rows, max_bytes)?,
                ))
            } else {
                Ok(None)
            }
        })?;
    match read {
        Some(rows) => Ok(rows),
        None => {
            let deadline = write_deadline(env);
            env.rt
                .block_on(
                    env.storage
                        .write(&env.ctx, write_control(env, deadline), move |c| {
                            prepared.run(c, &authz, is_admin, max_rows, max_bytes)
                        }),
                )
                .map_err(|e| write_failed(env, deadline, e))
        }
    }
}

pub(crate) fn to_lua_rows(lua: &Lua, rows: Rows) -> mlua::Result<Table> {
    if rows.rows.len() > 10_000 {
        crate::lua::mark_heavy();
    }
    let out = lua.create_table_with_capacity(rows.rows.len(), 0)?;
    // An array even when empty: `{"notes": []}`, not `{"notes": {}}`.
    out.set_metatable(Some(mlua::LuaSerdeExt::array_metatable(lua)))?;
    for (i, r) in rows.rows.into_iter().enumerate() {
        if i % 4096 == 4095 {
            crate::lua::sandbox::time_check().map_err(mlua::Error::external)?;
        }
        let t = lua.create_table_with_capacity(0, rows.columns.len())?;
        for (name, v) in rows.columns.iter().zip(r) {
            let lv = match v {
                Sql::Null => continue,
                Sql::Integer(n) => Value::Integer(n),
                Sql::Real(f) => Value::Number(f),
                Sql::Text(s) => Value::String(lua.create_string(&s)?),
                Sql::Blob(b) => Value::String(lua.create_string(&b)?),
            };
            t.raw_set(name.as_str(), lv)?;
        }
        out.raw_set(i + 1, t)?;
    }
    Ok(out)
}

/// `db.tx(f)` at the outermost level: open a writer session, run `f`, commit or roll back.
fn outer_tx(e: &Env, f: Function) -> mlua::Result<MultiValue> {
    tx_then(e, f, MultiValue::new(), None)
}

/// Run `f(args)` in one write transaction as the caller, like `db.tx`; when it returns, `hook`
/// turns its results into engine work (e.g. a workflow's journal row, `src/flow`) that runs in
/// the same transaction before the commit: the writes and the record commit together or not
/// at all. Not inside an open `db.tx`.
pub fn tx_then(
    e: &Env,
    f: Function,
    args: MultiValue,
    hook: Option<&dyn Fn(&MultiValue) -> mlua::Result<CommitHook>>,
) -> mlua::Result<MultiValue> {
    if e.tx.borrow().is_some() {
        return Err(lua_err(Error::new(
            ErrorCode::BadArguments,
            "a transaction is already open (db.tx)",
        )));
    }
    let (ops, rx) = mpsc::channel::<TxOp>();
    let authz = Arc::clone(e.storage.authz());
    let is_admin = e.ctx.is_admin();
    let (max_rows, max_bytes) = (e.options.max_rows, e.options.memory_limit as u64);
    // The transaction's own limit: the writer rolls back past it, and the hook ends the
    // invocation (a pure-CPU loop inside the transaction sends the writer nothing).
    let deadline = write_deadline(e);
    e.meter.set_tx_deadline(Some(deadline));
    let (storage, ctx, control) = (e.storage.clone(), e.ctx.clone(), write_control(e, deadline));
    let job = async move {
        storage
            .write(&ctx, control, move |c| {
                c.execute_batch("BEGIN IMMEDIATE")?;
                loop {
                    match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                        Ok(TxOp::Run(p, reply)) => {
                            let _ = reply.send(p.run(c, &authz, is_admin, max_rows, max_bytes));
                        }
                        Ok(TxOp::Raw(sql, reply)) => {
                            let _ = reply.send(c.execute_batch(&sql).map_err(Error::from));
                        }
                        Ok(TxOp::Call(f)) => f(c),
                        Ok(TxOp::BeforeCommit(hook, reply)) => {
                            let _ = reply.send(hook(c));
                        }
                        Ok(TxOp::Finish(commit, reply)) => {
                            let r = c.execute_batch(if commit { "COMMIT" } else { "ROLLBACK" }).map_err(Error::from);
                            if r.is_err() {
                                let _ = c.execute_batch("ROLLBACK");
                            }
                            let _ = reply.send(r);
                            return Ok(());
                        }
                        Err(_) => {
                            let _ = c.execute_batch("ROLLBACK");
                            return Err(Error::new(ErrorCode::TimeoutExceeded, "db.tx: the transaction was abandoned or ran past its time limit; rolled back"));
                        }
                    }
                }
            })
            .await
    };
    let handle = e.rt.spawn(job);
    *e.tx.borrow_mut() = Some(TxSession {
        ops: ops.clone(),
        depth: Cell::new(0),
    });
    let mut result = f.call::<MultiValue>(args);
    if let (Ok(v), Some(hook)) = (&result, hook) {
        let sent = hook(v).and_then(|h| {
            let (reply, done) = mpsc::channel();
            ops.send(TxOp::BeforeCommit(h, reply))
                .map_err(|_| lua_err(session_ended(e)))?;
            done.recv()
                .unwrap_or_else(|_| Err(session_ended(e)))
                .map_err(lua_err)
        });
        if let Err(err) = sent {
            result = Err(err);
        }
    }
    e.tx.borrow_mut().take();
    let (reply, done) = mpsc::channel();
    let _ = ops.send(TxOp::Finish(result.is_ok(), reply));
    let finished = done.recv().unwrap_or_else(|_| Err(session_ended(e)));
    let _ = e.rt.block_on(handle);
    e.meter.set_tx_deadline(None);
    let finished = finished.map_err(|err| write_failed(e, deadline, err));
    match (result, finished) {
        (Ok(v), Ok(())) => Ok(v),
        (Ok(_), Err(err)) => Err(lua_err(err)),
        (Err(err), _) => Err(err),
    }
}

/// A nested `db.tx(f)`: a savepoint inside the open transaction.
fn nested_tx(e: &Env, f: Function) -> mlua::Result<MultiValue> {
    let depth = {
        let tx = e.tx.borrow();
        let tx = tx.as_ref().expect("called inside a transaction");
        let d = tx.depth.get() + 1;
        if d > MAX_TX_DEPTH {
            return Err(lua_err(Error::new(
                ErrorCode::BadArguments,
                format!("db.tx: nested more than {MAX_TX_DEPTH} levels"),
            )));
        }
        tx.depth.set(d);
        tx.raw(e, format!("SAVEPOINT ichibase_tx_{d}"))
            .map_err(lua_err)?;
        d
    };
    let result = f.call::<MultiValue>(());
    let tx = e.tx.borrow();
    let Some(tx) = tx.as_ref() else { return result };
    tx.depth.set(depth - 1);
    let end = match &result {
        Ok(_) => tx.raw(e, format!("RELEASE ichibase_tx_{depth}")),
        Err(_) => tx
            .raw(e, format!("ROLLBACK TO ichibase_tx_{depth}"))
            .and_then(|_| tx.raw(e, format!("RELEASE ichibase_tx_{depth}"))),
    };
    match (result, end) {
        (Ok(v), Ok(())) => Ok(v),
        (Ok(_), Err(err)) => Err(lua_err(err)),
        (Err(err), _) => Err(err),
    }
}

impl Component for Db {
    /// Installed once per pooled state (`lua::pool`): reads the invocation only when called.
    fn reusable(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "db"
    }

    fn install(&self, lua: &Lua, env: &Rc<Env>) -> mlua::Result<()> {
        let t = lua.create_table()?;
        let e = Rc::clone(env);
        t.set(
            "query",
            lua.create_function(move |lua, (sql, p): (String, Option<Table>)| {
                let prepared = prepare(&e, &sql, p)?;
                to_lua_rows(lua, run(&e, prepared).map_err(lua_err)?)
            })?,
        )?;
        let e = Rc::clone(env);
        t.set(
            "one",
            lua.create_function(move |lua, (sql, p): (String, Option<Table>)| {
                let prepared = prepare(&e, &sql, p)?;
                let rows = to_lua_rows(lua, run(&e, prepared).map_err(lua_err)?)?;
                rows.raw_get::<Value>(1)
            })?,
        )?;
        let e = Rc::clone(env);
        t.set(
            "exec",
            lua.create_function(move |lua, (sql, p): (String, Option<Table>)| {
                let prepared = prepare(&e, &sql, p)?;
                let rows = run(&e, prepared).map_err(lua_err)?;
                let out = lua.create_table()?;
                out.set("changes", rows.changes)?;
                out.set("last_insert_id", rows.last_insert_rowid)?;
                Ok(out)
            })?,
        )?;
        let e = Rc::clone(env);
        t.set(
            "tx",
            lua.create_function(move |_, f: Function| {
                if e.tx.borrow().is_some() {
                    nested_tx(&e, f)
                } else {
                    outer_tx(&e, f)
                }
            })?,
        )?;
        let e = Rc::clone(env);
        t.set(
            "migrate",
            lua.create_function(move |_, sql: String| {
                if !e.ctx.is_admin() {
                    return Err(lua_err(Error::new(
                        ErrorCode::AccessDenied,
                        "db.migrate is for the admin role",
                    )));
                }
                if e.tx.borrow().is_some() {
                    return Err(lua_err(Error::new(
                        ErrorCode::BadArguments,
                        "db.migrate cannot run inside db.tx",
                    )));
                }
                if sql.len() > LARGE_SQL {
                    crate::lua::mark_heavy();
                }
                let prepared =
                    embedded::prepare(&sql, &serde_json::Map::new(), true, e.options.max_sql)
                        .map_err(lua_err)?;
                let authz = Arc::clone(e.storage.authz());
                let (max_rows, max_bytes) = (e.options.max_rows, e.options.memory_limit as u64);
                let deadline = write_deadline(&e);
                e.rt.block_on(
                    e.storage
                        .write(&e.ctx, write_control(&e, deadline), move |c| {
                            c.execute_batch("BEGIN IMMEDIATE")?;
                            match prepared.run(c, &authz, true, max_rows, max_bytes) {
                                Ok(_) => c.execute_batch("COMMIT").map_err(Error::from),
                                Err(err) => {
                                    let _ = c.execute_batch("ROLLBACK");
                                    Err(err)
                                }
                            }
                        }),
                )
                .map_err(|err| lua_err(write_failed(&e, deadline, err)))
            })?,
        )?;
        lua.globals().set(self.name(), t)
    }
}
