//! Change capture on a writer connection with SQLite's pre-update hook (the mechanism behind
//! `crate::realtime::cdc`; that module's top doc has the whole design).
//!
//! - **Capture.** `sqlite3_preupdate_hook` reports every row an INSERT, UPDATE or DELETE is
//!   about to change, with the whole old and new row. For the tables CDC is enabled on, the hook
//!   appends one compact binary record (op, rowid, old values, new values) to an in-memory
//!   buffer: no SQL runs per row.
//! - **Transactions.** What the buffer holds past the last commit is *pending*. The commit hook
//!   marks the buffer up to its end as committed (confirmed once the commit did not fail; a
//!   failed commit calls the rollback hook); the rollback hook drops everything pending. A
//!   statement that fails rolls back only its own rows: SQLite reports every abort through its
//!   error log ("statement aborts at …", installed here once per process with
//!   `SQLITE_CONFIG_LOG`), and `sqlite3_trace_v2` marks where each statement began
//!   (`SQLITE_TRACE_STMT`) and when it ended (`SQLITE_TRACE_PROFILE`), so a failed statement's
//!   records are cut off at its mark. `SAVEPOINT` / `RELEASE` / `ROLLBACK TO` statements that
//!   succeed keep a stack of marks, so `ROLLBACK TO x` drops exactly what ran since `x`.
//! - **Log.** After a write job the writer calls [`Capture::flush`] when its queue is empty, or
//!   when [`FLUSH_CHANGES`] committed changes gathered or the oldest waited [`FLUSH_AFTER`]
//!   (under a stream of writes one log row takes many jobs): the committed records
//!   become ONE row of `_ichibase_change_batches` (`first_id`, `last_id`, `data`): change ids
//!   `first_id..=last_id` are consecutive, strictly increasing in commit order (one writer
//!   thread), and each stays addressable for replay (`realtime::cdc::decode`). The row is its
//!   own small transaction right after the job's commits (a process crash between the two loses
//!   those events; the data itself is committed).
//!
//! Known limits (documented in the README's WebSockets section): writes by other processes (the
//! `sqlite3` shell) and by connections other than a [`Storage`](super::Storage) writer are not
//! captured; an `INSERT OR FAIL` / `RAISE(FAIL)` that aborts keeps its earlier rows in the
//! database but they are not captured; a column renamed or dropped in the same write job as a
//! captured write names that job's values by the new schema.
//!
//! **Unsafe audit.** The only `unsafe` code in the crate for capture is here: the declarations of
//! the four pre-update functions it uses (signatures from sqlite3.h of the bundled SQLite 3.54; they
//! exist only when SQLite is compiled with `SQLITE_ENABLE_PREUPDATE_HOOK`, which
//! `.cargo/config.toml` sets through `LIBSQLITE3_FLAGS` — without it the build fails to link, and
//! build.rs refuses to build first with a clear message), and the callbacks. Every callback
//! gets a pointer to a [`Capture`] that the process-wide registry keeps alive until
//! [`uninstall`] has removed both hooks; the callbacks only read values SQLite hands them for the
//! duration of the call, copy them into the buffer and never run SQL.

use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::sync::{Arc, Mutex, Once};

use rusqlite::{Connection, ffi};

use crate::core::Result;

unsafe extern "C" {
    fn sqlite3_preupdate_hook(
        db: *mut ffi::sqlite3,
        cb: Option<
            unsafe extern "C" fn(
                *mut c_void,
                *mut ffi::sqlite3,
                c_int,
                *const c_char,
                *const c_char,
                ffi::sqlite3_int64,
                ffi::sqlite3_int64,
            ),
        >,
        arg: *mut c_void,
    ) -> *mut c_void;
    fn sqlite3_preupdate_old(db: *mut ffi::sqlite3, i: c_int, v: *mut *mut ffi::sqlite3_value) -> c_int;
    fn sqlite3_preupdate_new(db: *mut ffi::sqlite3, i: c_int, v: *mut *mut ffi::sqlite3_value) -> c_int;
    fn sqlite3_preupdate_count(db: *mut ffi::sqlite3) -> c_int;
}

/// The change log: one row per flushed batch (see the module doc).
pub const BATCH_TABLE_SQL: &str = "CREATE TABLE IF NOT EXISTS _ichibase_change_batches (
    first_id INTEGER PRIMARY KEY,
    last_id INTEGER NOT NULL,
    at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    data ANY NOT NULL
) STRICT";

/// Record ops in the encoding.
pub const OP_INSERT: u8 = 1;
pub const OP_UPDATE: u8 = 2;
pub const OP_DELETE: u8 = 3;
/// Value tags in the encoding.
pub const V_NULL: u8 = 0;
pub const V_INT: u8 = 1;
pub const V_REAL: u8 = 2;
pub const V_TEXT: u8 = 3;
pub const V_BLOB: u8 = 4;
/// First byte of a batch's `data`: the encoding's version.
pub const FORMAT: u8 = 1;

/// While more write jobs wait, committed changes are written once this many gathered or the
/// oldest waited this long (when the writer's queue is empty they are written at once).
pub const FLUSH_CHANGES: u32 = 10_000;
pub const FLUSH_AFTER: std::time::Duration = std::time::Duration::from_millis(50);

/// Buffered bytes past which a batch that cannot be written is dropped (with an error logged).
const MAX_UNWRITTEN: usize = 256 << 20;

/// A captured table: its columns (in order) and the positions of its primary-key columns (in
/// column order, as the keys of events show them).
#[derive(Debug)]
pub struct TableInfo {
    pub name: String,
    pub cols: Vec<String>,
    pub pk: Vec<usize>,
}

/// A position in the buffer: bytes and records.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Mark {
    len: usize,
    count: u32,
}

#[derive(Default)]
struct State {
    /// Tables CDC is enabled on, by name.
    tables: HashMap<Box<[u8]>, Arc<TableInfo>>,
    /// Tables the buffered records refer to (by index).
    used: Vec<Arc<TableInfo>>,
    buf: Vec<u8>,
    count: u32,
    committed: Mark,
    /// Set by the commit hook; confirmed unless the rollback hook runs first.
    tentative: Option<Mark>,
    /// Statements running on the connection, with where the buffer stood when each began.
    stmts: Vec<(usize, Mark)>,
    /// Open savepoints (lower-case names) with their marks.
    savepoints: Vec<(String, Mark)>,
    /// Some table's rows had another column count than its known columns.
    stale: bool,
    schema_version: i64,
    next_id: i64,
    /// Batches whose INSERT failed, retried first.
    unwritten: Vec<(u32, Vec<u8>)>,
    /// When the oldest committed, unwritten change committed.
    since: Option<std::time::Instant>,
}

impl State {
    fn mark(&self) -> Mark {
        Mark { len: self.buf.len(), count: self.count }
    }

    fn truncate(&mut self, m: Mark) {
        let m = if m.len < self.committed.len { self.committed } else { m };
        if m.len <= self.buf.len() {
            self.buf.truncate(m.len);
            self.count = m.count;
        }
    }

    fn confirm(&mut self) {
        if let Some(t) = self.tentative.take() {
            if self.committed.count == 0 && t.count > 0 {
                self.since = Some(std::time::Instant::now());
            }
            self.committed = t;
        }
    }
}

/// The capture state of one writer connection.
pub struct Capture {
    state: Mutex<State>,
}

fn registry() -> &'static Mutex<HashMap<usize, Arc<Capture>>> {
    static R: std::sync::OnceLock<Mutex<HashMap<usize, Arc<Capture>>>> = std::sync::OnceLock::new();
    R.get_or_init(Default::default)
}

fn db_of(conn: &Connection) -> *mut ffi::sqlite3 {
    // SAFETY: only the pointer value is used (as a key and for hook registration on this
    // connection, which `conn` owns).
    unsafe { conn.handle() }
}

/// The capture installed on `conn`, if it is a writer connection.
pub fn of(conn: &Connection) -> Option<Arc<Capture>> {
    registry().lock().unwrap().get(&(db_of(conn) as usize)).cloned()
}

thread_local! {
    /// SQLite logged a statement abort on this thread since the flag was last taken.
    static ABORTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

unsafe extern "C" fn on_log(_arg: *mut c_void, code: c_int, msg: *const c_char) {
    if code & 0xff == ffi::SQLITE_NOTICE || code & 0xff == ffi::SQLITE_WARNING || msg.is_null() {
        return;
    }
    // SAFETY: SQLite passes a NUL-terminated message valid for the call.
    let m = unsafe { CStr::from_ptr(msg) }.to_bytes();
    if m.starts_with(b"statement aborts at ") {
        ABORTED.with(|a| a.set(true));
    }
}

/// Load a table's columns and primary key.
pub fn table_info(c: &Connection, name: &str) -> rusqlite::Result<Arc<TableInfo>> {
    let mut cols = Vec::new();
    let mut pk: Vec<usize> = Vec::new();
    let mut st = c.prepare("SELECT name, pk FROM pragma_table_info(?1) ORDER BY cid")?;
    let mut rows = st.query([name])?;
    while let Some(r) = rows.next()? {
        let p: i64 = r.get(1)?;
        if p > 0 {
            pk.push(cols.len());
        }
        cols.push(r.get::<_, String>(0)?);
    }
    Ok(Arc::new(TableInfo { name: name.to_string(), cols, pk }))
}

fn load_tables(c: &Connection) -> rusqlite::Result<HashMap<Box<[u8]>, Arc<TableInfo>>> {
    let names: Vec<String> = c
        .prepare("SELECT name FROM _ichibase_cdc_tables")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = HashMap::new();
    for n in names {
        let info = table_info(c, &n)?;
        out.insert(n.into_bytes().into_boxed_slice(), info);
    }
    Ok(out)
}

fn schema_version(c: &Connection) -> i64 {
    c.query_row("PRAGMA schema_version", [], |r| r.get(0)).unwrap_or(0)
}

/// Install capture on the writer connection `conn`: the change-log table, the hooks, the set of
/// captured tables; drops capture triggers a database from before the hook still has.
pub fn install(conn: &mut Connection) -> anyhow::Result<Arc<Capture>> {
    // SAFETY: a static, NUL-terminated option name.
    let has_hook = unsafe { ffi::sqlite3_compileoption_used(c"ENABLE_PREUPDATE_HOOK".as_ptr()) };
    anyhow::ensure!(
        has_hook == 1,
        "SQLite was built without SQLITE_ENABLE_PREUPDATE_HOOK, which change capture needs (build with the repository's .cargo/config.toml)"
    );
    static LOG: Once = Once::new();
    LOG.call_once(|| {
        // SAFETY: SQLITE_CONFIG_LOG may be set at any time (SQLite ≥ 3.42); the callback is a
        // plain function that touches only a thread-local.
        let rc = unsafe {
            ffi::sqlite3_config(
                ffi::SQLITE_CONFIG_LOG,
                on_log as unsafe extern "C" fn(*mut c_void, c_int, *const c_char),
                std::ptr::null_mut::<c_void>(),
            )
        };
        if rc != ffi::SQLITE_OK {
            tracing::error!(rc, "could not install SQLite's error log: failed statements inside a transaction could emit changes");
        }
    });
    conn.execute_batch(BATCH_TABLE_SQL)?;
    let legacy: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'trigger' AND name GLOB '_ichibase_cdc_*'")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for t in &legacy {
        conn.execute_batch(&format!("DROP TRIGGER IF EXISTS {}", crate::sql::parse::quote_ident(t)))?;
    }
    if !legacy.is_empty() {
        tracing::info!(triggers = legacy.len(), "removed the capture triggers of an older version (capture uses SQLite's pre-update hook now)");
    }
    let mut next: i64 = conn.query_row("SELECT coalesce(max(last_id), 0) FROM _ichibase_change_batches", [], |r| r.get(0))?;
    let legacy_table: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'table' AND name = '_ichibase_changes'",
        [],
        |r| r.get(0),
    )?;
    if legacy_table {
        next = next.max(conn.query_row("SELECT coalesce(max(id), 0) FROM _ichibase_changes", [], |r| r.get(0))?);
    }
    let cap = Arc::new(Capture {
        state: Mutex::new(State {
            tables: load_tables(conn)?,
            schema_version: schema_version(conn),
            next_id: next + 1,
            ..State::default()
        }),
    });
    let db = db_of(conn);
    let arg = Arc::as_ptr(&cap) as *mut c_void;
    registry().lock().unwrap().insert(db as usize, Arc::clone(&cap));
    // SAFETY: `arg` points to a Capture the registry keeps alive until `uninstall` removed the
    // hooks; `db` is the open connection `conn`.
    unsafe {
        sqlite3_preupdate_hook(db, Some(on_preupdate), arg);
        ffi::sqlite3_trace_v2(
            db,
            (ffi::SQLITE_TRACE_STMT | ffi::SQLITE_TRACE_PROFILE) as c_uint,
            Some(on_trace),
            arg,
        );
    }
    let c2 = Arc::clone(&cap);
    conn.commit_hook(Some(move || {
        let mut s = c2.state.lock().unwrap();
        s.tentative = Some(s.mark());
        s.savepoints.clear();
        false
    }))?;
    let c3 = Arc::clone(&cap);
    conn.rollback_hook(Some(move || {
        let mut s = c3.state.lock().unwrap();
        s.tentative = None;
        let m = s.committed;
        s.truncate(m);
        s.savepoints.clear();
    }))?;
    Ok(cap)
}

/// Remove the hooks from `conn` (before it closes).
pub fn uninstall(conn: &mut Connection) {
    let db = db_of(conn);
    // SAFETY: removing hooks from the open connection; afterwards no callback uses the pointer.
    unsafe {
        sqlite3_preupdate_hook(db, None, std::ptr::null_mut());
        ffi::sqlite3_trace_v2(db, 0, None, std::ptr::null_mut());
    }
    let _ = conn.commit_hook(None::<fn() -> bool>);
    let _ = conn.rollback_hook(None::<fn()>);
    registry().lock().unwrap().remove(&(db as usize));
}

fn put_varint(b: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        b.push((v as u8) | 0x80);
        v >>= 7;
    }
    b.push(v as u8);
}

pub fn put_int(b: &mut Vec<u8>, v: i64) {
    put_varint(b, ((v << 1) ^ (v >> 63)) as u64);
}

pub fn put_bytes(b: &mut Vec<u8>, v: &[u8]) {
    put_varint(b, v.len() as u64);
    b.extend_from_slice(v);
}

/// Append the values SQLite hands out for one side of the row.
///
/// SAFETY: must run inside the pre-update callback of `db`.
unsafe fn put_row(
    b: &mut Vec<u8>,
    db: *mut ffi::sqlite3,
    n: c_int,
    get: unsafe extern "C" fn(*mut ffi::sqlite3, c_int, *mut *mut ffi::sqlite3_value) -> c_int,
) {
    put_varint(b, n as u64);
    for i in 0..n {
        let mut v: *mut ffi::sqlite3_value = std::ptr::null_mut();
        // SAFETY: `i` < the column count SQLite reported; `v` is valid until the callback returns.
        unsafe {
            if get(db, i, &mut v) != ffi::SQLITE_OK || v.is_null() {
                b.push(V_NULL);
                continue;
            }
            match ffi::sqlite3_value_type(v) {
                ffi::SQLITE_INTEGER => {
                    b.push(V_INT);
                    put_int(b, ffi::sqlite3_value_int64(v));
                }
                ffi::SQLITE_FLOAT => {
                    b.push(V_REAL);
                    b.extend_from_slice(&ffi::sqlite3_value_double(v).to_le_bytes());
                }
                ffi::SQLITE_TEXT => {
                    let p = ffi::sqlite3_value_text(v);
                    let len = ffi::sqlite3_value_bytes(v) as usize;
                    b.push(V_TEXT);
                    put_bytes(b, if p.is_null() { &[] } else { std::slice::from_raw_parts(p, len) });
                }
                ffi::SQLITE_BLOB => {
                    let p = ffi::sqlite3_value_blob(v) as *const u8;
                    let len = ffi::sqlite3_value_bytes(v) as usize;
                    b.push(V_BLOB);
                    put_bytes(b, if p.is_null() { &[] } else { std::slice::from_raw_parts(p, len) });
                }
                _ => b.push(V_NULL),
            }
        }
    }
}

unsafe extern "C" fn on_preupdate(
    arg: *mut c_void,
    db: *mut ffi::sqlite3,
    op: c_int,
    zdb: *const c_char,
    zname: *const c_char,
    key1: ffi::sqlite3_int64,
    key2: ffi::sqlite3_int64,
) {
    // SAFETY: `arg` is the registered Capture (see `install`); the names are NUL-terminated
    // strings valid for the call.
    let (cap, dbname, name) = unsafe { (&*(arg as *const Capture), CStr::from_ptr(zdb), CStr::from_ptr(zname)) };
    if dbname.to_bytes() != b"main" {
        return;
    }
    let mut s = match cap.state.lock() {
        Ok(s) => s,
        Err(_) => return,
    };
    let Some(info) = s.tables.get(name.to_bytes()).cloned() else {
        return;
    };
    let idx = match s.used.iter().position(|t| Arc::ptr_eq(t, &info)) {
        Some(i) => i,
        None => {
            s.used.push(Arc::clone(&info));
            s.used.len() - 1
        }
    };
    // SAFETY: inside the pre-update callback of `db`.
    let n = unsafe { sqlite3_preupdate_count(db) };
    if n as usize != info.cols.len() {
        s.stale = true;
    }
    let (code, rowid) = match op {
        ffi::SQLITE_INSERT => (OP_INSERT, key2),
        ffi::SQLITE_UPDATE => (OP_UPDATE, key2),
        ffi::SQLITE_DELETE => (OP_DELETE, key1),
        _ => return,
    };
    let b = &mut s.buf;
    b.push(code);
    put_varint(b, idx as u64);
    put_int(b, rowid);
    // SAFETY: inside the pre-update callback; old values exist for UPDATE/DELETE, new ones for
    // INSERT/UPDATE.
    unsafe {
        if code != OP_INSERT {
            put_row(b, db, n, sqlite3_preupdate_old);
        }
        if code != OP_DELETE {
            put_row(b, db, n, sqlite3_preupdate_new);
        }
    }
    s.count += 1;
}

/// `SAVEPOINT x` / `RELEASE [SAVEPOINT] x` / `ROLLBACK [TRANSACTION] TO [SAVEPOINT] x`.
#[derive(Debug, PartialEq)]
enum SpCmd {
    Begin(String),
    Release(String),
    RollbackTo(String),
}

fn words(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = sql.trim().trim_end_matches(';').chars().peekable();
    while let Some(&c) = it.peek() {
        if c.is_whitespace() {
            it.next();
        } else if let Some(close) = match c {
            '"' => Some('"'),
            '`' => Some('`'),
            '[' => Some(']'),
            '\'' => Some('\''),
            _ => None,
        } {
            it.next();
            let mut w = String::new();
            while let Some(d) = it.next() {
                if d == close {
                    if close != ']' && it.peek() == Some(&close) {
                        it.next();
                        w.push(d);
                        continue;
                    }
                    break;
                }
                w.push(d);
            }
            out.push(w.to_lowercase());
        } else {
            let mut w = String::new();
            while let Some(&d) = it.peek() {
                if d.is_whitespace() || d == ';' {
                    break;
                }
                w.push(d);
                it.next();
            }
            out.push(w.to_lowercase());
        }
        if out.len() > 5 {
            break;
        }
    }
    out
}

fn savepoint_cmd(sql: &str) -> Option<SpCmd> {
    let head = sql.trim_start().get(..8)?.to_ascii_uppercase();
    if !(head.starts_with("SAVEPOIN") || head.starts_with("RELEASE") || head.starts_with("ROLLBACK")) {
        return None;
    }
    let w = words(sql);
    let ws: Vec<&str> = w.iter().map(String::as_str).collect();
    match ws.as_slice() {
        ["savepoint", name] => Some(SpCmd::Begin(name.to_string())),
        ["release", "savepoint", name] | ["release", name] => Some(SpCmd::Release(name.to_string())),
        ["rollback", rest @ ..] => {
            let rest = rest.strip_prefix(&["transaction"]).unwrap_or(rest);
            let rest = rest.strip_prefix(&["to"])?;
            let rest = rest.strip_prefix(&["savepoint"]).unwrap_or(rest);
            match rest {
                [name] => Some(SpCmd::RollbackTo(name.to_string())),
                _ => None,
            }
        }
        _ => None,
    }
}

unsafe extern "C" fn on_trace(what: c_uint, arg: *mut c_void, p: *mut c_void, x: *mut c_void) -> c_int {
    // SAFETY: `arg` is the registered Capture.
    let cap = unsafe { &*(arg as *const Capture) };
    let Ok(mut s) = cap.state.lock() else { return 0 };
    // A commit attempted by an earlier statement (or by this one, now ended) that did not fail:
    // a failing commit calls the rollback hook inside the same step, which drops `tentative`,
    // or (busy) leaves the transaction open, which is not autocommit mode.
    // SAFETY: P is a live statement of this connection for both trace events.
    if unsafe { ffi::sqlite3_get_autocommit(ffi::sqlite3_db_handle(p as *mut ffi::sqlite3_stmt)) } != 0 {
        s.confirm();
    }
    if what == ffi::SQLITE_TRACE_STMT as c_uint {
        // X is the statement's text, or "-- " and a trigger's name for trigger programs (which
        // run inside their statement: not a statement boundary).
        // SAFETY: X is a NUL-terminated string valid for the call (may be null).
        let text = if x.is_null() { &b""[..] } else { unsafe { CStr::from_ptr(x as *const c_char) }.to_bytes() };
        if text.starts_with(b"--") {
            return 0;
        }
        ABORTED.with(|a| a.set(false));
        let m = s.mark();
        if let Some(i) = s.stmts.iter().position(|(st, _)| *st == p as usize) {
            s.stmts.remove(i); // run again without an end reported (never, but bounded)
        }
        if s.stmts.len() >= 4096 {
            s.stmts.remove(0);
        }
        s.stmts.push((p as usize, m));
    } else if what == ffi::SQLITE_TRACE_PROFILE as c_uint {
        let failed = ABORTED.with(|a| a.replace(false));
        let Some(at) = s.stmts.iter().rposition(|(st, _)| *st == p as usize) else { return 0 };
        // Only this entry: statements may end out of order (a cursor reset after later ones).
        let (_, mark) = s.stmts.remove(at);
        if failed {
            s.truncate(mark);
            return 0;
        }
        // SAFETY: P is the statement that just ended; its text lives as long as the statement.
        let sql = unsafe { ffi::sqlite3_sql(p as *mut ffi::sqlite3_stmt) };
        if sql.is_null() {
            return 0;
        }
        let sql = unsafe { CStr::from_ptr(sql) }.to_string_lossy();
        match savepoint_cmd(&sql) {
            Some(SpCmd::Begin(n)) => s.savepoints.push((n, mark)),
            Some(SpCmd::Release(n)) => {
                if let Some(i) = s.savepoints.iter().rposition(|(m, _)| *m == n) {
                    s.savepoints.truncate(i);
                }
            }
            Some(SpCmd::RollbackTo(n)) => {
                if let Some(i) = s.savepoints.iter().rposition(|(m, _)| *m == n) {
                    let m = s.savepoints[i].1;
                    s.savepoints.truncate(i + 1);
                    s.truncate(m);
                }
            }
            None => {}
        }
    }
    0
}

impl Capture {
    /// Start capturing `table` (after its enabling committed); reloads its columns.
    pub fn set_table(&self, c: &Connection, table: &str, on: bool) -> Result<()> {
        let info = if on { Some(table_info(c, table)?) } else { None };
        let mut s = self.state.lock().unwrap();
        let key: Box<[u8]> = table.as_bytes().into();
        match info {
            Some(i) => {
                s.tables.insert(key, i);
            }
            None => {
                s.tables.remove(&key);
            }
        }
        Ok(())
    }

    /// Whether committed changes should be written now although more write jobs wait.
    pub fn due(&self, c: &Connection) -> bool {
        let mut s = self.state.lock().unwrap();
        if c.is_autocommit() {
            s.confirm();
        }
        !s.unwritten.is_empty()
            || s.committed.count >= FLUSH_CHANGES
            || s.since.is_some_and(|t| t.elapsed() >= FLUSH_AFTER)
    }

    /// Write what committed since the last flush as one batch row. Runs on the writer between
    /// jobs (no transaction open). Returns the number of changes written.
    pub fn flush(&self, c: &Connection) -> usize {
        let (schema_changed, has_work) = {
            let mut s = self.state.lock().unwrap();
            if c.is_autocommit() {
                s.confirm();
            }
            (s.stale, s.committed.count > 0 || !s.unwritten.is_empty())
        };
        if !has_work {
            return 0;
        }
        let sv = schema_version(c);
        let reload = schema_changed || sv != self.state.lock().unwrap().schema_version;
        let fresh = if reload { load_tables(c).ok() } else { None };
        let mut pending = {
            let mut s = self.state.lock().unwrap();
            if let Some(t) = fresh {
                s.tables = t;
                s.schema_version = sv;
                s.stale = false;
            }
            let mut batches = std::mem::take(&mut s.unwritten);
            if s.committed.count > 0 {
                let cut = s.committed;
                let mut data = Vec::with_capacity(cut.len + 64);
                data.push(FORMAT);
                put_varint(&mut data, s.used.len() as u64);
                for t in &s.used {
                    let t = s.tables.get(t.name.as_bytes()).unwrap_or(t);
                    put_bytes(&mut data, t.name.as_bytes());
                    put_varint(&mut data, t.cols.len() as u64);
                    for col in &t.cols {
                        put_bytes(&mut data, col.as_bytes());
                    }
                    put_varint(&mut data, t.pk.len() as u64);
                    for p in &t.pk {
                        put_varint(&mut data, *p as u64);
                    }
                }
                put_varint(&mut data, cut.count as u64);
                data.extend_from_slice(&s.buf[..cut.len]);
                s.buf.drain(..cut.len);
                s.count -= cut.count;
                s.committed = Mark::default();
                s.since = None;
                let st = &mut *s;
                for st in st.stmts.iter_mut().map(|(_, m)| m).chain(st.savepoints.iter_mut().map(|(_, m)| m)) {
                    st.len = st.len.saturating_sub(cut.len);
                    st.count = st.count.saturating_sub(cut.count);
                }
                if s.buf.is_empty() {
                    s.used.clear();
                }
                batches.push((cut.count, data));
            }
            batches
        };
        let mut written = 0;
        let mut i = 0;
        while i < pending.len() {
            let (n, data) = &pending[i];
            let first = self.state.lock().unwrap().next_id;
            let r = crate::storage::engine_statements(|| {
                c.prepare_cached("INSERT INTO _ichibase_change_batches (first_id, last_id, data) VALUES (?1, ?2, ?3)")
                    .and_then(|mut st| st.execute(rusqlite::params![first, first + *n as i64 - 1, data]))
            });
            match r {
                Ok(_) => {
                    self.state.lock().unwrap().next_id = first + *n as i64;
                    written += *n as usize;
                    i += 1;
                }
                Err(e) => {
                    tracing::error!(error = %e, "writing the change log failed; retrying after the next write");
                    break;
                }
            }
        }
        pending.drain(..i);
        if !pending.is_empty() {
            let bytes: usize = pending.iter().map(|(_, d)| d.len()).sum();
            if bytes > MAX_UNWRITTEN {
                tracing::error!(bytes, "dropping unwritten change batches");
            } else {
                let mut s = self.state.lock().unwrap();
                pending.append(&mut s.unwritten);
                s.unwritten = pending;
            }
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn savepoint_statements_are_recognised() {
        assert_eq!(savepoint_cmd("SAVEPOINT a"), Some(SpCmd::Begin("a".into())));
        assert_eq!(savepoint_cmd("savepoint \"My Sp\";"), Some(SpCmd::Begin("my sp".into())));
        assert_eq!(savepoint_cmd("RELEASE SAVEPOINT a"), Some(SpCmd::Release("a".into())));
        assert_eq!(savepoint_cmd("RELEASE _rusqlite_sp"), Some(SpCmd::Release("_rusqlite_sp".into())));
        assert_eq!(savepoint_cmd("ROLLBACK TO ichibase_tx_2"), Some(SpCmd::RollbackTo("ichibase_tx_2".into())));
        assert_eq!(savepoint_cmd("rollback transaction to savepoint [x]"), Some(SpCmd::RollbackTo("x".into())));
        assert_eq!(savepoint_cmd("ROLLBACK"), None);
        assert_eq!(savepoint_cmd("INSERT INTO t VALUES (1)"), None);
    }
}
