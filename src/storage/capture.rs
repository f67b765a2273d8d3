//! Change capture on a writer connection with SQLite's pre-update hook (the mechanism behind
//! `crate::realtime::cdc`; that module's top doc has the whole design).
//!
//! - **Capture.** `sqlite3_preupdate_hook` reports every row an INSERT, UPDATE or DELETE is
//!   about to change, with the whole old and new row. For the tables CDC is enabled on, the hook
//!   appends one compact binary record (op, rowid, old values, new values) to an in-memory
//!   buffer: no SQL runs per row.
//! - **The log is written inside the data's transaction.** Records go to the change log
//!   (`_ichibase_change_batches`, one row per batch of records) on the same connection, inside the
//!   transaction that made them, so data and log commit (or roll back) together — a crash can
//!   never leave committed rows without their events. Where they are written (`sqlite3_trace_v2`
//!   tells when each top-level statement starts and ends):
//!   - when a statement that SQLite reports read-only (`sqlite3_stmt_readonly`: `COMMIT`,
//!     `END`, `RELEASE`, `ROLLBACK [TO]`, `SAVEPOINT`, `SELECT`) or a transaction-control
//!     statement (first keyword; `BEGIN IMMEDIATE` is not read-only for SQLite) starts while a
//!     transaction is open, the records buffered so far (of statements that ended) are inserted
//!     first. `COMMIT` thus commits them with the
//!     data; a `ROLLBACK TO` undoes the log rows written since its savepoint together with the
//!     data (SQLite's own savepoint semantics: no savepoint bookkeeping here, no SQL parsing);
//!   - a writing statement that would run in autocommit mode gets a transaction opened for it
//!     when it starts (a nested `BEGIN`), and when it ends its records are inserted and that
//!     transaction committed (a nested `COMMIT`) — semantically the autocommit it would have
//!     had. `VACUUM`, `PRAGMA`, `ATTACH` and `DETACH` (which cannot run in a transaction and
//!     change no captured row) are left alone;
//!   - the commit hook vetoes any commit that would leave captured records unwritten (the commit
//!     becomes a rollback and the statement fails): data is never committed without its events.
//!     A failure to write the log (disk full, time limit) fails the transaction the same way; a
//!     failure of the nested `COMMIT` above is reported as the write job's error
//!     ([`Capture::end_job`]).
//! - **Failed statements.** SQLite undoes a failed statement's own changes (its statement
//!   journal) but the hook saw them. When a statement that captured records ends, the row of its
//!   last record is read back: it must hold that record's outcome (inserted/updated row with the
//!   new values, deleted row absent); if it holds the earlier state the statement failed and its
//!   records are dropped. The last record is the final change of its row in the statement, so
//!   the check is exact except for a statement whose net effect on that row is nil (e.g. an
//!   UPDATE setting a column to its own value), where a failure would still emit that no-op.
//!   `INSERT OR FAIL` keeps its earlier rows in the database and their events. A rolled-back
//!   transaction (ROLLBACK, failed job, error that aborts the transaction) drops everything
//!   buffered (rollback hook).
//! - **REPLACE.** `INSERT OR REPLACE` over an existing key deletes the old row and inserts the new
//!   one; like the capture triggers of older versions (which saw only the insert), it is one
//!   `insert` event: a delete immediately followed, in the same statement, by an insert of the
//!   same key on the same table is dropped. Rows REPLACE removes for another key (a UNIQUE
//!   column) are `delete` events.
//! - **Schema changes.** When a writing statement ends, the schema version is compared; after a
//!   change the captured tables' columns are reloaded, and a captured table that was renamed
//!   (found by its root page) keeps being captured under its new name
//!   (`_ichibase_cdc_tables` is updated inside the same transaction).
//! - **Writes by others.** Writes by other processes (the `sqlite3` shell) or other connections
//!   are not seen by the hook; the writer notices them through `PRAGMA data_version`, read
//!   before each write job's first statement ([`Capture::job_starts`]; inside the transaction
//!   opened for an autocommit statement, so the look costs no lock cycle of its own), and
//!   subscribers get a `refetch` message.
//!
//! Change ids: a batch row has `first_id..=last_id`, consecutive, allocated as max(last_id)+1
//! when the row is inserted; with one writer they grow in commit order, across restarts too.
//!
//! **Unsafe audit.** The only `unsafe` code in the crate for capture is here: the declarations of
//! the four pre-update functions it uses (signatures from sqlite3.h of the bundled SQLite 3.54; they
//! exist only when SQLite is compiled with `SQLITE_ENABLE_PREUPDATE_HOOK`, which
//! `.cargo/config.toml` sets through `LIBSQLITE3_FLAGS` — without it the build fails to link, and
//! build.rs refuses to build first with a clear message), the callbacks, and a second, non-owning
//! rusqlite handle on the writer's own connection ([`Connection::from_handle`]) through which the
//! callbacks run their few statements (only where SQLite allows it: at a statement's start, before
//! it changed anything, and after it halted; never from the pre-update, commit or rollback hook).
//! Every callback gets a pointer to a [`Capture`] that the process-wide registry keeps alive until
//! [`uninstall`] has removed the hooks and dropped that handle.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, ffi};

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

/// The change log: one row per batch of records (see the module doc).
pub const BATCH_TABLE_SQL: &str = "CREATE TABLE IF NOT EXISTS _ichibase_change_batches (
    first_id INTEGER PRIMARY KEY,
    last_id INTEGER NOT NULL,
    at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    data ANY NOT NULL
) STRICT";

/// A batch row; ids follow the newest row (or the ids of an older trigger-written log, `?3`).
const INSERT_BATCH_SQL: &str = "INSERT INTO _ichibase_change_batches (first_id, last_id, data)
    SELECT f, f + ?1 - 1, ?2 FROM (SELECT max(?3, coalesce(
        (SELECT last_id FROM _ichibase_change_batches ORDER BY first_id DESC LIMIT 1), 0)) + 1 AS f)";

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

/// Running top-level statements tracked at most (a statement never reported ended is dropped).
const MAX_STMTS: usize = 4096;

/// A captured table: its columns (in order) and the positions of its primary-key columns (in
/// column order, as the keys of events show them).
#[derive(Debug)]
pub struct TableInfo {
    pub name: String,
    pub cols: Vec<String>,
    pub pk: Vec<usize>,
    /// Root page (follows the table through a rename).
    rootpage: i64,
    without_rowid: bool,
}

/// A position in the buffer: bytes and records.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Mark {
    len: usize,
    count: u32,
}

/// A buffered DELETE record, for REPLACE coalescing.
struct Del {
    start: usize,
    end: usize,
    table: usize,
    key: Vec<u8>,
}

#[derive(Default)]
struct State {
    /// Tables CDC is enabled on, by name.
    tables: HashMap<Box<[u8]>, Arc<TableInfo>>,
    /// Tables the buffered records refer to (by index).
    used: Vec<Arc<TableInfo>>,
    /// Records not yet written to the log (all belong to the open transaction).
    buf: Vec<u8>,
    count: u32,
    /// Where the newest record starts.
    last: Option<usize>,
    /// DELETE records just appended, none after them yet (a REPLACE's).
    deletes: Vec<Del>,
    /// Top-level statements running, with where the buffer stood when each began and whether
    /// it may change the schema (its first keyword is not one of the data statements').
    stmts: Vec<(usize, Mark, bool)>,
    /// The statement a transaction was opened for (it would have run in autocommit mode).
    wrapped: Option<usize>,
    /// That transaction's statement ended but it could not commit yet (other writes running).
    wrap_open: bool,
    schema_version: i64,
    /// Compare the schema version before the next statement (a transaction rolled back).
    recheck: bool,
    /// Change ids of an older trigger-written log that new ids must follow.
    floor: i64,
    /// Veto the open transaction's commit (its log could not be written).
    veto: bool,
    /// An error to report as the write job's.
    error: Option<String>,
    data_version: Option<i64>,
    /// A write job started and has not looked for writes by others yet (see
    /// [`Capture::job_starts`]).
    poll_due: bool,
    /// The table the pre-update hook looked up last, by name (`None`: not captured), so a
    /// statement's rows do not hash the name once each.
    hot: Option<Hot>,
}

/// A table name and the captured table it names (`None`: none).
type Hot = (Box<[u8]>, Option<Arc<TableInfo>>);

impl State {
    /// The captured table named `name`, if it is one.
    fn table(&mut self, name: &[u8]) -> Option<Arc<TableInfo>> {
        if let Some((n, t)) = &self.hot
            && **n == *name
        {
            return t.clone();
        }
        let t = self.tables.get(name).cloned();
        self.hot = Some((name.into(), t.clone()));
        t
    }

    /// Replace the captured tables.
    fn set_tables(&mut self, tables: HashMap<Box<[u8]>, Arc<TableInfo>>) {
        self.tables = tables;
        self.hot = None;
    }

    fn mark(&self) -> Mark {
        Mark { len: self.buf.len(), count: self.count }
    }

    fn truncate(&mut self, m: Mark) {
        if m.len <= self.buf.len() {
            self.buf.truncate(m.len);
            self.count = m.count;
        }
        self.last = None;
        self.deletes.clear();
        if self.buf.is_empty() {
            self.used.clear();
        }
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.count = 0;
        self.used.clear();
        self.last = None;
        self.deletes.clear();
        for (_, m, _) in self.stmts.iter_mut() {
            *m = Mark::default();
        }
    }

    /// Where the oldest running statement began (records after it are not final yet).
    fn settled(&self) -> Mark {
        self.stmts
            .iter()
            .map(|(_, m, _)| *m)
            .min_by_key(|m| m.len)
            .unwrap_or(self.mark())
    }

    /// Take the records up to `cut` as one encoded batch.
    fn take_batch(&mut self, cut: Mark) -> Option<(u32, Vec<u8>)> {
        if cut.count == 0 {
            return None;
        }
        let mut data = Vec::with_capacity(cut.len + 64);
        data.push(FORMAT);
        put_varint(&mut data, self.used.len() as u64);
        for t in &self.used {
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
        data.extend_from_slice(&self.buf[..cut.len]);
        self.buf.drain(..cut.len);
        self.count -= cut.count;
        for (_, m, _) in self.stmts.iter_mut() {
            m.len = m.len.saturating_sub(cut.len);
            m.count = m.count.saturating_sub(cut.count);
        }
        self.last = None;
        self.deletes.clear();
        if self.buf.is_empty() {
            self.used.clear();
        }
        Some((cut.count, data))
    }
}

thread_local! {
    /// Capture's own statements are running on this thread (the callbacks ignore them).
    static NESTED: Cell<bool> = const { Cell::new(false) };
    /// Rows capture's own statements changed on this thread (counted in SQLite's
    /// `total_changes`, which callers counting a statement's rows subtract: [`own_rows`]).
    static OWN_ROWS: Cell<u64> = const { Cell::new(0) };
}

/// Rows change capture wrote on this thread so far (its log rows; see `sql::exec::WriteCount`).
pub fn own_rows() -> u64 {
    OWN_ROWS.with(Cell::get)
}

/// The capture state of one writer connection.
pub struct Capture {
    state: Mutex<State>,
    /// A second, non-owning handle on the writer connection for capture's own statements.
    aux: Mutex<Option<Connection>>,
    /// Writes by others seen so far (`PRAGMA data_version` changes).
    external: AtomicU64,
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

/// Load a table's columns and primary key.
pub fn table_info(c: &Connection, name: &str) -> rusqlite::Result<Arc<TableInfo>> {
    let mut cols = Vec::new();
    let mut pk: Vec<usize> = Vec::new();
    let mut st = c.prepare_cached("SELECT name, pk FROM pragma_table_info(?1) ORDER BY cid")?;
    let mut rows = st.query([name])?;
    while let Some(r) = rows.next()? {
        let p: i64 = r.get(1)?;
        if p > 0 {
            pk.push(cols.len());
        }
        cols.push(r.get::<_, String>(0)?);
    }
    let rootpage: i64 = c
        .prepare_cached("SELECT rootpage FROM sqlite_schema WHERE type = 'table' AND name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let without_rowid: bool = c
        .prepare_cached("SELECT wr FROM pragma_table_list WHERE schema = 'main' AND name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()?
        .unwrap_or(false);
    Ok(Arc::new(TableInfo { name: name.to_string(), cols, pk, rootpage, without_rowid }))
}

/// The captured tables by name; a table renamed since `old` was loaded is found by its root
/// page and renamed in `_ichibase_cdc_tables` too (inside the caller's transaction).
fn load_tables(
    c: &Connection,
    old: &HashMap<Box<[u8]>, Arc<TableInfo>>,
) -> rusqlite::Result<HashMap<Box<[u8]>, Arc<TableInfo>>> {
    let names: Vec<String> = c
        .prepare_cached("SELECT name FROM _ichibase_cdc_tables")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = HashMap::new();
    for n in &names {
        let exists: bool = c
            .prepare_cached("SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'table' AND name = ?1")?
            .query_row([n], |r| r.get(0))?;
        let mut name = n.clone();
        if !exists {
            let Some(prev) = old.get(n.as_bytes()) else { continue };
            let renamed: Option<String> = c
                .prepare_cached("SELECT name FROM sqlite_schema WHERE type = 'table' AND rootpage = ?1")?
                .query_row([prev.rootpage], |r| r.get(0))
                .optional()?;
            match renamed {
                Some(r) if !names.contains(&r) && prev.rootpage > 0 => {
                    c.prepare_cached("UPDATE _ichibase_cdc_tables SET name = ?2 WHERE name = ?1")?
                        .execute([n, &r])?;
                    tracing::info!(from = %n, to = %r, "a captured table was renamed; capture follows it");
                    name = r;
                }
                _ => continue,
            }
        }
        let info = table_info(c, &name)?;
        out.insert(name.into_bytes().into_boxed_slice(), info);
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
    let legacy_table: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'table' AND name = '_ichibase_changes'",
        [],
        |r| r.get(0),
    )?;
    let floor: i64 = if legacy_table {
        conn.query_row("SELECT coalesce(max(id), 0) FROM _ichibase_changes", [], |r| r.get(0))?
    } else {
        0
    };
    let db = db_of(conn);
    // SAFETY: `db` is the open connection `conn`; the handle does not close it and is dropped in
    // `uninstall`, before `conn` closes.
    let aux = unsafe { Connection::from_handle(db) }?;
    let cap = Arc::new(Capture {
        state: Mutex::new(State {
            tables: load_tables(conn, &HashMap::new())?,
            schema_version: schema_version(conn),
            floor,
            ..State::default()
        }),
        aux: Mutex::new(Some(aux)),
        external: AtomicU64::new(0),
    });
    cap.note_data_version(conn);
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
        if s.veto || s.count > 0 {
            let why = if s.veto {
                "the change log could not be written".to_string()
            } else {
                format!("{} captured change(s) were not written to the change log", s.count)
            };
            tracing::error!(reason = %why, "change capture refused a commit (the transaction rolled back)");
            s.error.get_or_insert_with(|| format!("the write was rolled back: {why} (change capture)"));
            return true;
        }
        false
    }))?;
    let c3 = Arc::clone(&cap);
    conn.rollback_hook(Some(move || {
        let mut s = c3.state.lock().unwrap();
        s.clear();
        s.veto = false;
        s.wrapped = None;
        s.wrap_open = false;
        // A schema change may have rolled back with it: compare at the next statement's start.
        s.recheck = true;
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
    if let Some(cap) = registry().lock().unwrap().remove(&(db as usize)) {
        // Finalises its statements; does not close the connection.
        drop(cap.aux.lock().unwrap().take());
    }
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

/// Append one value SQLite hands out.
///
/// SAFETY: `v` is null or a value valid for the duration of the call.
unsafe fn put_value(b: &mut Vec<u8>, v: *mut ffi::sqlite3_value) {
    if v.is_null() {
        b.push(V_NULL);
        return;
    }
    // SAFETY: `v` is a valid value (see above).
    unsafe {
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

type Getter = unsafe extern "C" fn(*mut ffi::sqlite3, c_int, *mut *mut ffi::sqlite3_value) -> c_int;

/// Append the values SQLite hands out for one side of the row.
///
/// SAFETY: must run inside the pre-update callback of `db`.
unsafe fn put_row(b: &mut Vec<u8>, db: *mut ffi::sqlite3, n: c_int, get: Getter) {
    put_varint(b, n as u64);
    for i in 0..n {
        let mut v: *mut ffi::sqlite3_value = std::ptr::null_mut();
        // SAFETY: `i` < the column count SQLite reported; `v` is valid until the callback returns.
        unsafe {
            if get(db, i, &mut v) != ffi::SQLITE_OK {
                v = std::ptr::null_mut();
            }
            put_value(b, v);
        }
    }
}

/// The key a REPLACE's delete and insert share: the rowid, or the primary-key values of a
/// WITHOUT ROWID table.
///
/// SAFETY: must run inside the pre-update callback of `db`.
unsafe fn key_of(info: &TableInfo, db: *mut ffi::sqlite3, rowid: i64, get: Getter) -> Vec<u8> {
    let mut k = Vec::new();
    if !info.without_rowid {
        put_int(&mut k, rowid);
        return k;
    }
    for p in &info.pk {
        let mut v: *mut ffi::sqlite3_value = std::ptr::null_mut();
        // SAFETY: inside the callback; `p` is a column index of the table.
        unsafe {
            if get(db, *p as c_int, &mut v) != ffi::SQLITE_OK {
                v = std::ptr::null_mut();
            }
            put_value(&mut k, v);
        }
    }
    k
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
    if NESTED.with(Cell::get) {
        return;
    }
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
    let Some(info) = s.table(name.to_bytes()) else {
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
    let (code, rowid) = match op {
        ffi::SQLITE_INSERT => (OP_INSERT, key2),
        ffi::SQLITE_UPDATE => (OP_UPDATE, key2),
        ffi::SQLITE_DELETE => (OP_DELETE, key1),
        _ => return,
    };
    // REPLACE: the delete just before this insert of the same key goes (one `insert` event,
    // as the capture triggers of older versions reported it).
    if code == OP_INSERT && !s.deletes.is_empty() {
        // SAFETY: inside the callback.
        let key = unsafe { key_of(&info, db, rowid, sqlite3_preupdate_new) };
        let floor = s.stmts.last().map(|(_, m, _)| m.len).unwrap_or(0);
        if let Some(i) = s.deletes.iter().position(|d| d.table == idx && d.key == key && d.start >= floor) {
            let d = s.deletes.remove(i);
            s.buf.drain(d.start..d.end);
            s.count -= 1;
            let gone = d.end - d.start;
            for o in s.deletes.iter_mut().filter(|o| o.start > d.start) {
                o.start -= gone;
                o.end -= gone;
            }
        }
    }
    let start = s.buf.len();
    {
        let b = &mut s.buf;
        b.push(code);
        put_varint(b, idx as u64);
        put_int(b, rowid);
        // SAFETY: inside the pre-update callback; old values exist for UPDATE/DELETE, new ones
        // for INSERT/UPDATE.
        unsafe {
            if code != OP_INSERT {
                put_row(b, db, n, sqlite3_preupdate_old);
            }
            if code != OP_DELETE {
                put_row(b, db, n, sqlite3_preupdate_new);
            }
        }
    }
    s.count += 1;
    s.last = Some(start);
    if code == OP_DELETE {
        // SAFETY: inside the callback.
        let key = unsafe { key_of(&info, db, rowid, sqlite3_preupdate_old) };
        let end = s.buf.len();
        s.deletes.push(Del { start, end, table: idx, key });
    } else {
        s.deletes.clear();
    }
}

/// The first keyword of a statement (after blanks and comments), upper-case.
fn first_keyword(sql: &[u8]) -> String {
    let mut i = 0;
    loop {
        while i < sql.len() && sql[i].is_ascii_whitespace() {
            i += 1;
        }
        if sql[i..].starts_with(b"--") {
            while i < sql.len() && sql[i] != b'\n' {
                i += 1;
            }
        } else if sql[i..].starts_with(b"/*") {
            i = sql[i + 2..].windows(2).position(|w| w == b"*/").map(|p| i + 2 + p + 2).unwrap_or(sql.len());
        } else {
            break;
        }
    }
    let end = sql[i..].iter().position(|c| !c.is_ascii_alphabetic()).map(|p| i + p).unwrap_or(sql.len());
    String::from_utf8_lossy(&sql[i..end]).to_ascii_uppercase()
}

/// How a statement relates to transactions, by its first keyword.
#[derive(PartialEq)]
enum Kind {
    /// BEGIN / COMMIT / END / ROLLBACK / SAVEPOINT / RELEASE (`BEGIN IMMEDIATE` is not
    /// read-only for SQLite, yet opens a transaction itself).
    Control,
    /// Cannot run inside a transaction and changes no captured row.
    Outside,
    /// INSERT / UPDATE / DELETE / REPLACE / SELECT / VALUES / WITH: changes rows, never the
    /// schema.
    Data,
    /// Anything else (CREATE, DROP, ALTER, ...): may change the schema.
    Other,
}

impl Kind {
    /// Whether a statement of this kind may change the schema (the captured tables are
    /// checked again after it).
    fn may_change_schema(&self) -> bool {
        !matches!(self, Kind::Data)
    }
}

fn kind(first_keyword: &str) -> Kind {
    match first_keyword {
        "BEGIN" | "COMMIT" | "END" | "ROLLBACK" | "SAVEPOINT" | "RELEASE" => Kind::Control,
        "VACUUM" | "PRAGMA" | "ATTACH" | "DETACH" => Kind::Outside,
        "INSERT" | "UPDATE" | "DELETE" | "REPLACE" | "SELECT" | "VALUES" | "WITH" => Kind::Data,
        _ => Kind::Other,
    }
}

unsafe extern "C" fn on_trace(what: c_uint, arg: *mut c_void, p: *mut c_void, x: *mut c_void) -> c_int {
    if NESTED.with(Cell::get) {
        return 0;
    }
    // SAFETY: `arg` is the registered Capture.
    let cap = unsafe { &*(arg as *const Capture) };
    let stmt = p as *mut ffi::sqlite3_stmt;
    if what == ffi::SQLITE_TRACE_STMT as c_uint {
        // X is the statement's text, or "-- " and a trigger's name / the text of a statement
        // run inside another one: not a top-level statement.
        // SAFETY: X is a NUL-terminated string valid for the call (may be null).
        let text = if x.is_null() { &b""[..] } else { unsafe { CStr::from_ptr(x as *const c_char) }.to_bytes() };
        if text.starts_with(b"--") {
            return 0;
        }
        // SAFETY: P is a live statement of this connection.
        unsafe { cap.statement_starts(stmt, text) };
    } else if what == ffi::SQLITE_TRACE_PROFILE as c_uint {
        // SAFETY: P is the statement that just ended (or is being reset).
        unsafe { cap.statement_ends(stmt) };
    }
    0
}

/// A value of an encoded row, for comparing with what the database holds.
enum Val<'a> {
    Null,
    Int(i64),
    Real(f64),
    Text(&'a [u8]),
    Blob(&'a [u8]),
}

struct Rd<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Rd<'a> {
    fn byte(&mut self) -> Option<u8> {
        let v = *self.b.get(self.at)?;
        self.at += 1;
        Some(v)
    }
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    fn int(&mut self) -> Option<i64> {
        let v = self.varint()?;
        Some(((v >> 1) as i64) ^ -((v & 1) as i64))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.varint()? as usize;
        let s = self.b.get(self.at..self.at + n)?;
        self.at += n;
        Some(s)
    }
    fn value(&mut self) -> Option<Val<'a>> {
        Some(match self.byte()? {
            V_INT => Val::Int(self.int()?),
            V_REAL => {
                let s = self.b.get(self.at..self.at + 8)?;
                self.at += 8;
                Val::Real(f64::from_le_bytes(s.try_into().ok()?))
            }
            V_TEXT => Val::Text(self.bytes()?),
            V_BLOB => Val::Blob(self.bytes()?),
            _ => Val::Null,
        })
    }
    fn row(&mut self) -> Option<Vec<Val<'a>>> {
        let n = self.varint()? as usize;
        (0..n).map(|_| self.value()).collect()
    }
}

/// Loose equality of a recorded value and a stored one (an integer in a REAL column may come
/// back either way).
fn same(a: &Val<'_>, b: ValueRef<'_>) -> bool {
    match (a, b) {
        (Val::Null, ValueRef::Null) => true,
        (Val::Int(x), ValueRef::Integer(y)) => *x == y,
        (Val::Int(x), ValueRef::Real(y)) => (*x as f64) == y,
        (Val::Real(y), ValueRef::Integer(x)) => (x as f64) == *y,
        (Val::Real(x), ValueRef::Real(y)) => x == &y || (x.is_nan() && y.is_nan()),
        (Val::Text(x), ValueRef::Text(y)) => *x == y,
        (Val::Blob(x), ValueRef::Blob(y)) => *x == y,
        _ => false,
    }
}

impl Capture {
    /// Run capture's own statements on the writer connection (the callbacks ignore them; the
    /// authorizer lets them through).
    fn nested<R>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<R>) -> rusqlite::Result<R> {
        let aux = self.aux.lock().unwrap();
        let Some(c) = aux.as_ref() else {
            return Err(rusqlite::Error::InvalidQuery);
        };
        let prev = NESTED.with(|n| n.replace(true));
        let before = c.total_changes();
        let r = crate::storage::engine_statements(|| f(c));
        let own = c.total_changes().saturating_sub(before);
        OWN_ROWS.with(|n| n.set(n.get() + own));
        NESTED.with(|n| n.set(prev));
        r
    }

    /// Write the settled records (of statements that ended) to the log, inside the open
    /// transaction. A failure vetoes that transaction's commit.
    fn write_log(&self) -> bool {
        let (batch, floor) = {
            let mut s = self.state.lock().unwrap();
            let cut = s.settled();
            (s.take_batch(cut), s.floor)
        };
        let Some((n, data)) = batch else { return true };
        let r = self.nested(|c| c.prepare_cached(INSERT_BATCH_SQL)?.execute(rusqlite::params![n, data, floor]));
        if let Err(e) = r {
            tracing::error!(error = %e, "writing the change log failed; the transaction will roll back");
            let mut s = self.state.lock().unwrap();
            s.veto = true;
            s.error.get_or_insert_with(|| format!("the write was rolled back: writing the change log failed ({e})"));
            return false;
        }
        true
    }

    /// Commit the transaction opened for an autocommit statement, with its log row. Leaves it
    /// open when another write statement still runs (retried later).
    fn finish_wrapper(&self) {
        self.write_log();
        let r = self.nested(|c| c.prepare_cached("COMMIT")?.execute([]).map(|_| ()));
        let mut s = self.state.lock().unwrap();
        match r {
            Ok(()) => {
                s.wrap_open = false;
                s.wrapped = None;
            }
            Err(_) if !s.stmts.is_empty() && !s.veto => s.wrap_open = true,
            Err(e) => {
                s.wrap_open = false;
                s.wrapped = None;
                drop(s);
                let _ = self.nested(|c| c.execute_batch("ROLLBACK"));
                let mut s = self.state.lock().unwrap();
                s.error.get_or_insert_with(|| format!("the write was rolled back: its commit failed ({e})"));
            }
        }
    }

    /// SAFETY: `p` is a live statement of the writer connection, about to run.
    unsafe fn statement_starts(&self, p: *mut ffi::sqlite3_stmt, text: &[u8]) {
        // SAFETY: see above.
        let (readonly, auto) = unsafe {
            (ffi::sqlite3_stmt_readonly(p) != 0, ffi::sqlite3_get_autocommit(ffi::sqlite3_db_handle(p)) != 0)
        };
        let (active, wrap_open, due) = {
            let mut s = self.state.lock().unwrap();
            (!s.tables.is_empty() || s.count > 0, s.wrap_open, std::mem::take(&mut s.poll_due))
        };
        let word_kind = kind(&first_keyword(text));
        // Data statements never change the schema: no schema check after them (a change by
        // another process is noticed through `PRAGMA data_version`, see `poll_external`).
        let ddl = word_kind.may_change_schema();
        let k = if readonly { Kind::Control } else { word_kind };
        // Would autocommit: it runs in a transaction of ours, committed with its log row when
        // it ends.
        let wrap = active && auto && matches!(k, Kind::Data | Kind::Other);
        let mut opened = false;
        if due {
            // The job's look for writes by others. Before a statement that gets a transaction
            // of ours, it is read inside that transaction, opened IMMEDIATE (the statement
            // writes anyway): one lock cycle instead of a read transaction of its own first.
            // Should the write lock not be had, it is read on its own as before.
            if wrap {
                opened = self.nested(|c| c.prepare_cached("BEGIN IMMEDIATE")?.execute([])).is_ok();
            }
            self.poll();
        }
        if std::mem::take(&mut self.state.lock().unwrap().recheck) {
            // A transaction rolled back, or another process wrote (maybe a schema change with
            // either): the captured tables are read again before this statement changes rows.
            self.check_schema();
        }
        if active {
            if k == Kind::Control {
                // COMMIT / RELEASE / ROLLBACK [TO] / SAVEPOINT / BEGIN / SELECT: the records so
                // far go to the log first, inside the transaction (a commit includes them, a
                // rollback undoes them with the data).
                if wrap_open {
                    self.finish_wrapper();
                } else if !auto {
                    self.write_log();
                }
            } else if wrap && (opened || self.nested(|c| c.prepare_cached("BEGIN")?.execute([])).is_ok()) {
                self.state.lock().unwrap().wrapped = Some(p as usize);
            }
        }
        let mut s = self.state.lock().unwrap();
        let m = s.mark();
        if let Some(i) = s.stmts.iter().position(|(st, _, _)| *st == p as usize) {
            s.stmts.remove(i);
        }
        if s.stmts.len() >= MAX_STMTS {
            s.stmts.remove(0);
        }
        s.stmts.push((p as usize, m, ddl));
    }

    /// SAFETY: `p` is a statement of the writer connection that ended or is being reset.
    unsafe fn statement_ends(&self, p: *mut ffi::sqlite3_stmt) {
        // SAFETY: see above.
        let (busy, readonly, expired) = unsafe {
            (ffi::sqlite3_stmt_busy(p) != 0, ffi::sqlite3_stmt_readonly(p) != 0, ffi::sqlite3_expired(p) != 0)
        };
        let (check, last, mark, schema_check, wrapped, wrap_open) = {
            let mut s = self.state.lock().unwrap();
            let Some(at) = s.stmts.iter().rposition(|(st, _, _)| *st == p as usize) else {
                return;
            };
            if expired && s.count == s.stmts[at].1.count {
                // Most likely not an end: another connection changed the schema after the
                // statement was prepared, SQLite found out as the statement began (before it
                // changed a row), prepares it again and runs it again at once — without a new
                // start event. So it keeps its entry and the transaction opened for it (were
                // that committed here, the rerun's rows would be captured outside any
                // transaction of ours and its commit refused). Should it really have ended,
                // the job's end commits that transaction. The captured tables are compared
                // with the schema now, before the rerun changes rows.
                let tables = !s.tables.is_empty();
                drop(s);
                if tables {
                    self.check_schema();
                }
                return;
            }
            // Only this entry: statements may end out of order (a cursor reset after later ones).
            let (_, mark, ddl) = s.stmts.remove(at);
            let check = s.count > mark.count && !busy;
            (
                check,
                s.last,
                mark,
                !s.tables.is_empty() && ddl,
                s.wrapped == Some(p as usize),
                s.wrap_open,
            )
        };
        // A statement that halted with records: did it fail (SQLite undid its changes)?
        if check {
            if let Some(at) = last.filter(|l| *l >= mark.len) {
                if !self.outcome_stands(at) {
                    self.state.lock().unwrap().truncate(mark);
                }
            }
        }
        if schema_check && !readonly {
            self.check_schema();
        }
        if wrapped || wrap_open {
            self.finish_wrapper();
        }
    }

    /// Does the database hold the outcome of the record at `at` (the statement's last)?
    fn outcome_stands(&self, at: usize) -> bool {
        let (op, info, rowid, new, key) = {
            let s = self.state.lock().unwrap();
            let mut r = Rd { b: &s.buf, at };
            let Some(op) = r.byte() else { return true };
            let Some(info) = r.varint().and_then(|i| s.used.get(i as usize).cloned()) else { return true };
            let Some(rowid) = r.int() else { return true };
            let old_start = r.at;
            if op != OP_INSERT && r.row().is_none() {
                return true;
            }
            let new_start = r.at;
            if op != OP_DELETE && r.row().is_none() {
                return true;
            }
            let side = if op == OP_DELETE { old_start } else { new_start };
            (op, info, rowid, s.buf[new_start..r.at].to_vec(), s.buf[side..].to_vec())
        };
        let t = crate::sql::parse::quote_ident(&info.name);
        let (sql, params): (String, Vec<rusqlite::types::Value>) = if info.without_rowid {
            let mut r = Rd { b: &key, at: 0 };
            let Some(row) = r.row() else { return true };
            let mut conds = Vec::new();
            let mut ps = Vec::new();
            for (i, p) in info.pk.iter().enumerate() {
                let (Some(col), Some(v)) = (info.cols.get(*p), row.get(*p)) else { return true };
                conds.push(format!("{} IS ?{}", crate::sql::parse::quote_ident(col), i + 1));
                ps.push(match v {
                    Val::Null => rusqlite::types::Value::Null,
                    Val::Int(x) => rusqlite::types::Value::Integer(*x),
                    Val::Real(x) => rusqlite::types::Value::Real(*x),
                    Val::Text(x) => rusqlite::types::Value::Text(String::from_utf8_lossy(x).into_owned()),
                    Val::Blob(x) => rusqlite::types::Value::Blob(x.to_vec()),
                });
            }
            (format!("SELECT * FROM main.{t} WHERE {}", conds.join(" AND ")), ps)
        } else {
            (format!("SELECT * FROM main.{t} WHERE _rowid_ = ?1"), vec![rusqlite::types::Value::Integer(rowid)])
        };
        let r = self.nested(|c| {
            let mut st = c.prepare_cached(&sql)?;
            let mut rows = st.query(rusqlite::params_from_iter(params.iter()))?;
            let Some(row) = rows.next()? else { return Ok(op == OP_DELETE) };
            if op == OP_DELETE {
                return Ok(false);
            }
            let mut rd = Rd { b: &new, at: 0 };
            let Some(vals) = rd.row() else { return Ok(true) };
            if vals.len() != row.as_ref().column_count() {
                return Ok(true);
            }
            for (i, v) in vals.iter().enumerate() {
                if !same(v, row.get_ref(i)?) {
                    return Ok(false);
                }
            }
            Ok(true)
        });
        r.unwrap_or(true)
    }

    /// After a writing statement: reload the captured tables if the schema changed.
    fn check_schema(&self) {
        let Ok(v) = self.nested(|c| c.prepare_cached("PRAGMA schema_version")?.query_row([], |r| r.get::<_, i64>(0))) else { return };
        let old = {
            let s = self.state.lock().unwrap();
            if s.schema_version == v {
                return;
            }
            s.tables.iter().map(|(k, t)| (k.clone(), Arc::clone(t))).collect::<HashMap<_, _>>()
        };
        match self.nested(|c| load_tables(c, &old)) {
            Ok(t) => {
                let mut s = self.state.lock().unwrap();
                s.set_tables(t);
                s.schema_version = v;
            }
            Err(e) => tracing::error!(error = %e, "reloading the captured tables failed"),
        }
    }

    /// Start capturing `table` (after its enabling committed); reloads its columns.
    pub fn set_table(&self, c: &Connection, table: &str, on: bool) -> Result<()> {
        let info = if on { Some(table_info(c, table)?) } else { None };
        let mut s = self.state.lock().unwrap();
        s.hot = None;
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

    /// A write job starts: before its first statement runs, capture looks for writes other
    /// connections or processes committed since the last look (see [`Capture::poll_external`];
    /// done at the statement, so that it can share the statement's transaction).
    pub fn job_starts(&self) {
        let mut s = self.state.lock().unwrap();
        s.poll_due = !s.tables.is_empty();
    }

    /// Notice writes other connections or processes committed since the last look, now
    /// (`PRAGMA data_version` on this connection changes only for those).
    pub fn poll_external(&self, _conn: &Connection) {
        self.poll();
    }

    fn poll(&self) {
        {
            let mut s = self.state.lock().unwrap();
            s.poll_due = false;
            if s.tables.is_empty() {
                return;
            }
        }
        // Through capture's own handle (same connection, so the same data version).
        let Ok(v) = self.nested(|a| a.prepare_cached("PRAGMA data_version")?.query_row([], |r| r.get::<_, i64>(0))) else { return };
        let mut s = self.state.lock().unwrap();
        if s.data_version.is_some_and(|d| d != v) {
            // Maybe a schema change too: compare the schema version before the next statement.
            s.recheck = true;
            self.external.fetch_add(1, Ordering::Relaxed);
            tracing::info!("the database was changed by another connection or process; change subscribers are told to refetch");
        }
        s.data_version = Some(v);
    }

    /// How many times writes by others were noticed.
    pub fn external_writes(&self) -> u64 {
        self.external.load(Ordering::Relaxed)
    }

    /// After a write job: commit a transaction of ours still open, and the capture error the
    /// job must report instead of its result (its write was rolled back), if any.
    pub fn end_job(&self, c: &Connection) -> Option<String> {
        let open = {
            let s = self.state.lock().unwrap();
            s.wrap_open || s.wrapped.is_some()
        };
        if open {
            self.state.lock().unwrap().stmts.clear();
            self.finish_wrapper();
        }
        let mut s = self.state.lock().unwrap();
        s.stmts.clear();
        if c.is_autocommit() && s.count > 0 {
            // Never reached (a commit with unwritten records is refused); kept bounded.
            s.clear();
        }
        s.error.take()
    }

    /// The data version to compare with (our own commits do not change it).
    fn note_data_version(&self, c: &Connection) {
        if let Ok(v) = c.query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0)) {
            self.state.lock().unwrap().data_version = Some(v);
        }
    }
}
