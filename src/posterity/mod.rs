//! Posterity: everything the engine does, remembered cheaply in DuckDB and queryable fast.
//!
//! Owns the analytical database `<data_dir>/posterity.duckdb` and everything that touches
//! DuckDB (nothing outside this module links to it):
//! - the **log** ([`Sink`]): one row per HTTP request, SQL statement and Lua invocation (and,
//!   later, AI calls and notifications), appended by one writer thread through a bounded queue;
//! - **analytics** ([`analytics`]): read-only SQL over the log, the Parquet archive and the app's
//!   SQLite tables, for `POST /analytics` and Lua's `analytics.query`;
//! - the **archive** ([`archive`]): complete days rolled into hive-partitioned Parquet files.
//!
//! Nothing in SQLite depends on this database: losing it loses history, never app data.
//!
//! ## The queue
//! [`Sink::record`] never waits for the writer: it encodes the event's fields back to back into
//! a shared buffer, the spool ([`Spool`], at most `posterity_queue` events), under a lock held
//! only for that copy, and the event's own memory is freed on the recording thread (handing
//! boxed events to the writer made it free them on its side, which cost the request threads'
//! allocator more than the copy). When the spool is full the event is **dropped and counted**; the count is reported by `GET /admin/posterity` and written into the
//! log itself as a `kind = 'posterity'` row (`name = 'dropped'`, `rows` = events lost) at the
//! next flush, so a gap in the history is visible in the history. The writer thread swaps the
//! spool out every tick (20 ms at most), decodes it in place, gathers the events column by column (Arrow builders) and
//! hands them to DuckDB's appender as whole data chunks (one per 2,048 rows), not value by value;
//! it commits every `posterity_flush_secs` (default 1 s) or every `posterity_batch_rows` rows,
//! whichever comes first: a crash loses at most the events of the last flush interval. A
//! graceful shutdown flushes everything queued. Committed rows wait in DuckDB's WAL until it
//! holds `posterity_checkpoint_mb` (default 64), then are compressed into the table at once.
//!
//! Request threads do as little as possible: a `sql` event ([`Event::sql`]) carries its
//! statement text and verb, and the writer derives the statement hash (`name`, remembered per
//! text) and the `{"verb": ...}` detail.

pub mod analytics;
pub mod app_table;
pub mod archive;
pub mod guard;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use duckdb::Connection;
use duckdb::arrow::array::{
    ArrayRef, Float64Builder, Int32Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use duckdb::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit as ArrowTimeUnit};
use duckdb::arrow::record_batch::RecordBatch;
use duckdb::types::{TimeUnit, Value};

use crate::core::{Error, ErrorCode, RequestContext, Result};

/// File name of the analytical database in the data directory.
pub const DB_FILE: &str = "posterity.duckdb";

/// Settings of the posterity service.
#[derive(Debug, Clone)]
pub struct PosterityOptions {
    pub data_dir: PathBuf,
    /// The app's SQLite database, readable from DuckDB with `app_table('name')` (admin only).
    pub app_db: PathBuf,
    /// Record events (off: nothing is appended; analytics and the archive still work).
    pub enabled: bool,
    pub flush_interval: Duration,
    /// Events queued before new ones are dropped.
    pub queue: usize,
    /// Rows appended before a flush even within the interval.
    pub batch_rows: usize,
    /// DuckDB's `checkpoint_threshold` in MB: committed rows wait in its WAL (and memory)
    /// until it reaches this size, then are compressed into the table at once. Fewer, larger
    /// checkpoints cost less CPU per row (each one compresses the last row group again).
    pub checkpoint_mb: u64,
    /// Complete days older than this many days go to the archive.
    pub archive_after_days: u32,
    /// The `[analytics]` section: DuckDB's resources and what non-admins may do.
    pub analytics: AnalyticsSettings,
}

/// The `[analytics]` configuration section (`ICHIBASE_ANALYTICS__<KEY>` in the environment):
/// the resources DuckDB may take and the limits of `POST /analytics` and `analytics.query`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnalyticsSettings {
    /// DuckDB's `memory_limit` (its buffer manager: hash tables, sorts, caches; spills to the
    /// temporary directory past it). DuckDB syntax: `"1GB"`, `"512MB"`.
    pub memory_limit: String,
    /// DuckDB's worker `threads` for analytics queries.
    pub threads: u32,
    /// DuckDB's `max_temp_directory_size`: disk a query may spill to.
    pub max_temp_directory_size: String,
    /// Rows an analytics result may have (a request's `max_result_rows` can only lower it; 0: no cap).
    pub max_result_rows: u64,
    /// Bytes an analytics result may have (a request's `max_result_bytes` can only lower it; 0: no cap).
    pub max_result_bytes: u64,
    /// Product of the sizes of `range`/`generate_series`/`repeat`/`lpad`... in one non-admin
    /// query (DuckDB folds such constants while planning, out of reach of any interrupt).
    pub max_generated_elements: u64,
    /// Interrupt an analytics query once the server's resident memory has grown by this many
    /// bytes since the query started (memory DuckDB does not account; 0: off).
    pub memory_guard_bytes: u64,
    /// Anonymous clients may query the views granted to the `anon` role; when false, or when
    /// no view is granted to `anon`, analytics refuses anonymous clients outright.
    pub anon_allowed: bool,
}

impl Default for AnalyticsSettings {
    fn default() -> Self {
        AnalyticsSettings {
            memory_limit: "1GB".into(),
            threads: 2,
            max_temp_directory_size: "4GB".into(),
            max_result_rows: 1_000_000,
            max_result_bytes: 256 * 1024 * 1024,
            max_generated_elements: 10_000_000,
            memory_guard_bytes: 2 * 1024 * 1024 * 1024,
            anon_allowed: true,
        }
    }
}

impl AnalyticsSettings {
    fn check(&self) -> anyhow::Result<()> {
        let size_ok = |s: &str| {
            !s.is_empty()
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == ' ' || c == '%')
        };
        if !size_ok(&self.memory_limit) {
            anyhow::bail!("[analytics] memory_limit '{}' is not a size like \"1GB\"", self.memory_limit);
        }
        if !size_ok(&self.max_temp_directory_size) {
            anyhow::bail!(
                "[analytics] max_temp_directory_size '{}' is not a size like \"4GB\"",
                self.max_temp_directory_size
            );
        }
        if self.threads == 0 {
            anyhow::bail!("[analytics] threads must be at least 1");
        }
        Ok(())
    }
}

impl PosterityOptions {
    pub fn from_config(cfg: &crate::config::Config) -> anyhow::Result<Self> {
        let p = &cfg.posterity;
        let analytics: AnalyticsSettings = cfg.section("analytics")?;
        analytics.check()?;
        Ok(PosterityOptions {
            data_dir: cfg.data_dir.clone(),
            app_db: cfg.db_path(),
            enabled: p.enabled,
            flush_interval: Duration::from_secs_f64(p.flush_secs),
            queue: p.queue,
            batch_rows: p.batch_rows,
            checkpoint_mb: p.checkpoint_mb,
            archive_after_days: p.archive_after_days,
            analytics,
        })
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join(DB_FILE)
    }

    pub fn archive_dir(&self) -> PathBuf {
        self.data_dir.join("archive")
    }
}

/// One remembered event. `kind` says what it is (`http`, `sql`, `lua`, and later `ai`,
/// `notify`); the common columns are filled as far as they apply and anything else goes into
/// `detail` (JSON), so new kinds need no schema change.
#[derive(Debug, Clone, Default)]
pub struct Event {
    /// Microseconds since the Unix epoch (UTC).
    pub ts_us: i64,
    pub kind: &'static str,
    pub trace_id: Option<String>,
    pub query_id: Option<String>,
    pub user_id: Option<String>,
    pub role: Option<String>,
    /// HTTP method.
    pub method: Option<String>,
    /// Path (http), statement hash (sql), function (lua).
    pub name: Option<String>,
    /// Function version (lua).
    pub version: Option<i64>,
    /// HTTP status.
    pub status: Option<i32>,
    /// `ok` or `error`.
    pub outcome: Option<&'static str>,
    pub error: Option<String>,
    pub elapsed_ms: f64,
    pub rows: Option<i64>,
    pub bytes: Option<i64>,
    /// JSON object text.
    pub detail: Option<String>,
    /// Text of a SQL statement, stored once per hash in `sql_texts`. When `name` is unset the
    /// writer sets it to the text's [`sql_hash`] (off the request thread).
    pub sql_text: Option<String>,
    /// A `sql` event's statement verb: when `detail` is unset the writer writes
    /// `{"verb": <verb>}` there (off the request thread).
    pub sql_verb: Option<&'static str>,
}

/// What the request layer knows of one finished HTTP request (see [`Event::for_request`]).
#[derive(Debug, Clone, Default)]
pub struct HttpRequest {
    /// When the request arrived (microseconds since the Unix epoch).
    pub ts_us: i64,
    pub method: String,
    pub path: String,
    pub status: u16,
    /// The response's `X-ClickHouse-Query-Id`, `X-Ichibase-Trace-Id` and
    /// `X-ClickHouse-Exception-Code` headers.
    pub query_id: Option<String>,
    pub trace_id: Option<String>,
    pub exception_code: Option<String>,
}

impl Event {
    /// An event of `kind` stamped now, with the identity of `ctx`.
    pub fn now(kind: &'static str, ctx: Option<&RequestContext>) -> Event {
        let mut e = Event {
            ts_us: now_us(),
            kind,
            ..Default::default()
        };
        if let Some(c) = ctx {
            e.trace_id = Some(c.trace_id.clone());
            e.query_id = Some(c.query_id.clone());
            e.user_id = c.user_id.clone();
            e.role = Some(c.role.as_str().to_string());
        }
        e
    }

    /// A `sql` event of `ctx` for the statement `text`: its hash (`name`) and `detail` are
    /// filled by the writer thread, so the request thread only copies the text.
    pub fn sql(ctx: Option<&RequestContext>, text: &str, verb: &str) -> Event {
        let mut e = Event::now("sql", ctx);
        e.sql_text = Some(text.to_string());
        match static_verb(verb) {
            Some(v) => e.sql_verb = Some(v),
            None => e.detail = Some(verb_detail(verb)),
        }
        e
    }

    /// A module's event (`kind` = the module; `name` what it concerns, at most 320
    /// characters; `error` at most 1,000): the one shape the modules' `log_event`s record.
    #[allow(clippy::too_many_arguments)]
    pub fn module(
        kind: &'static str,
        user: Option<&str>,
        trace: Option<&str>,
        name: &str,
        outcome: &'static str,
        elapsed_ms: f64,
        error: Option<&str>,
        detail: serde_json::Value,
    ) -> Event {
        let mut e = Event::now(kind, None);
        e.user_id = user.map(str::to_string);
        e.trace_id = trace.map(str::to_string);
        e.name = Some(name.chars().take(320).collect());
        e.outcome = Some(outcome);
        e.elapsed_ms = elapsed_ms;
        e.error = error.map(|m| m.chars().take(1000).collect());
        e.detail = Some(detail.to_string());
        e
    }

    /// The `http` row of one request: the response's ids when it sent them, else the ids of
    /// the identity it ran as (`caller`), which also gives the user and role.
    pub fn for_request(r: HttpRequest, caller: Option<&RequestContext>) -> Event {
        let mut e = Event::now("http", None);
        e.ts_us = r.ts_us;
        e.method = Some(r.method);
        e.name = Some(r.path);
        e.status = Some(i32::from(r.status));
        e.outcome = Some(if r.status < 400 { "ok" } else { "error" });
        e.query_id = r.query_id;
        e.trace_id = r.trace_id;
        if let Some(c) = caller {
            e.user_id = c.user_id.clone();
            e.role = Some(c.role.as_str().to_string());
            e.query_id = e.query_id.or_else(|| Some(c.query_id.clone()));
            e.trace_id = e.trace_id.or_else(|| Some(c.trace_id.clone()));
        }
        if r.status >= 400 {
            e.error = r.exception_code.map(|c| format!("code {c}"));
        }
        e
    }

    /// The log's own row saying `n` events were dropped (queue full), `total` since start.
    fn dropped(n: i64, total: u64) -> Event {
        let mut e = Event::now("posterity", None);
        e.name = Some("dropped".into());
        e.rows = Some(n);
        e.detail = Some(format!(
            "{{\"dropped_total\":{total},\"reason\":\"queue full\"}}"
        ));
        e
    }
}

/// The verbs the SQL layer names (`parse::Statement::verb`), as static strings.
fn static_verb(verb: &str) -> Option<&'static str> {
    const VERBS: &[&str] = &[
        "SELECT", "INSERT", "UPDATE", "DELETE", "REPLACE", "WITH", "VALUES", "CREATE", "DROP",
        "ALTER", "PRAGMA", "EXPLAIN", "VACUUM", "ANALYZE", "REINDEX", "BEGIN", "COMMIT", "END",
        "ROLLBACK", "SAVEPOINT", "RELEASE", "ATTACH", "DETACH", "SHOW", "DESCRIBE", "EXISTS",
    ];
    VERBS.iter().find(|v| **v == verb).copied()
}

/// `{"verb": <verb>}`, the `detail` of a `sql` event.
fn verb_detail(verb: &str) -> String {
    format!("{{\"verb\":{}}}", serde_json::Value::from(verb))
}

pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// First 16 hex digits of the SHA-256 of a statement's text.
pub fn sql_hash(sql: &str) -> String {
    use sha2::Digest;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let d = sha2::Sha256::digest(sql.as_bytes());
    let mut out = String::with_capacity(16);
    for b in &d[..8] {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 15)] as char);
    }
    out
}

enum Cmd {
    Flush(SyncSender<()>),
    Stop,
}

/// Events recorded and not yet taken by the writer, encoded back to back ([`encode`]).
#[derive(Default)]
struct Spool {
    buf: Vec<u8>,
    events: usize,
    /// The writer has stopped: nothing more is taken.
    closed: bool,
}

/// Lock the spool (a panic while holding it cannot leave it half-written: `encode` only
/// appends bytes and counts after).
fn lock_spool(m: &Mutex<Spool>) -> std::sync::MutexGuard<'_, Spool> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Absent string, integer or float in the encoding.
const NONE_LEN: u32 = u32::MAX;

fn put_str(b: &mut Vec<u8>, s: Option<&str>) {
    match s {
        // A string of 4 GiB or more cannot be an event field: recorded as absent.
        Some(s) if s.len() < NONE_LEN as usize => {
            b.extend_from_slice(&(s.len() as u32).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        }
        _ => b.extend_from_slice(&NONE_LEN.to_le_bytes()),
    }
}

fn put_i64(b: &mut Vec<u8>, v: Option<i64>) {
    match v {
        Some(v) => {
            b.push(1);
            b.extend_from_slice(&v.to_le_bytes());
        }
        None => b.push(0),
    }
}

/// An event's fields, in [`Row`]'s order, appended to `b`.
fn encode(e: &Event, b: &mut Vec<u8>) {
    b.extend_from_slice(&e.ts_us.to_le_bytes());
    put_str(b, Some(e.kind));
    put_str(b, e.trace_id.as_deref());
    put_str(b, e.query_id.as_deref());
    put_str(b, e.user_id.as_deref());
    put_str(b, e.role.as_deref());
    put_str(b, e.method.as_deref());
    put_str(b, e.name.as_deref());
    put_i64(b, e.version);
    put_i64(b, e.status.map(i64::from));
    put_str(b, e.outcome);
    put_str(b, e.error.as_deref());
    b.extend_from_slice(&e.elapsed_ms.to_le_bytes());
    put_i64(b, e.rows);
    put_i64(b, e.bytes);
    put_str(b, e.detail.as_deref());
    put_str(b, e.sql_text.as_deref());
    put_str(b, e.sql_verb);
}

/// One event as the writer reads it: borrowed from the spool (or from an [`Event`]).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Row<'a> {
    ts_us: i64,
    kind: &'a str,
    trace_id: Option<&'a str>,
    query_id: Option<&'a str>,
    user_id: Option<&'a str>,
    role: Option<&'a str>,
    method: Option<&'a str>,
    name: Option<&'a str>,
    version: Option<i64>,
    status: Option<i32>,
    outcome: Option<&'a str>,
    error: Option<&'a str>,
    elapsed_ms: f64,
    rows: Option<i64>,
    bytes: Option<i64>,
    detail: Option<&'a str>,
    sql_text: Option<&'a str>,
    sql_verb: Option<&'a str>,
}

impl<'a> Row<'a> {
    fn of(e: &'a Event) -> Row<'a> {
        Row {
            ts_us: e.ts_us,
            kind: e.kind,
            trace_id: e.trace_id.as_deref(),
            query_id: e.query_id.as_deref(),
            user_id: e.user_id.as_deref(),
            role: e.role.as_deref(),
            method: e.method.as_deref(),
            name: e.name.as_deref(),
            version: e.version,
            status: e.status,
            outcome: e.outcome,
            error: e.error.as_deref(),
            elapsed_ms: e.elapsed_ms,
            rows: e.rows,
            bytes: e.bytes,
            detail: e.detail.as_deref(),
            sql_text: e.sql_text.as_deref(),
            sql_verb: e.sql_verb,
        }
    }
}

/// Reads the rows [`encode`] wrote; `None` at the end or at bytes it did not write.
struct Decoder<'a> {
    b: &'a [u8],
}

impl<'a> Decoder<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Some(head)
    }

    fn word<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn str(&mut self) -> Option<Option<&'a str>> {
        let n = u32::from_le_bytes(self.word()?);
        if n == NONE_LEN {
            return Some(None);
        }
        std::str::from_utf8(self.take(n as usize)?).ok().map(Some)
    }

    fn i64(&mut self) -> Option<Option<i64>> {
        match self.take(1)?[0] {
            0 => Some(None),
            _ => Some(Some(i64::from_le_bytes(self.word()?))),
        }
    }

    fn row(&mut self) -> Option<Row<'a>> {
        if self.b.is_empty() {
            return None;
        }
        Some(Row {
            ts_us: i64::from_le_bytes(self.word()?),
            kind: self.str()??,
            trace_id: self.str()?,
            query_id: self.str()?,
            user_id: self.str()?,
            role: self.str()?,
            method: self.str()?,
            name: self.str()?,
            version: self.i64()?,
            status: self.i64()?.and_then(|v| i32::try_from(v).ok()),
            outcome: self.str()?,
            error: self.str()?,
            elapsed_ms: f64::from_le_bytes(self.word()?),
            rows: self.i64()?,
            bytes: self.i64()?,
            detail: self.str()?,
            sql_text: self.str()?,
            sql_verb: self.str()?,
        })
    }
}

/// Counters of the log, shared between recorders and the writer.
#[derive(Debug, Default)]
struct Counters {
    recorded: AtomicU64,
    dropped: AtomicU64,
    written: AtomicU64,
    flushes: AtomicU64,
    failed: AtomicU64,
}

/// Where events are recorded; cheap to clone. A disabled sink ignores everything.
#[derive(Clone, Default)]
pub struct Sink {
    inner: Option<Arc<SinkInner>>,
}

struct SinkInner {
    spool: Arc<Mutex<Spool>>,
    /// Events the spool holds at most (`posterity_queue`).
    cap: usize,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sink({})", if self.enabled() { "on" } else { "off" })
    }
}

impl Sink {
    /// A sink that records nothing.
    pub fn disabled() -> Sink {
        Sink { inner: None }
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Queue `e` without waiting for the writer; when the spool is full (or the writer has
    /// stopped) the event is dropped and counted. `e` is freed here, on the caller's thread.
    pub fn record(&self, e: Event) {
        let Some(s) = &self.inner else { return };
        let taken = {
            let mut sp = lock_spool(&s.spool);
            let take = !sp.closed && sp.events < s.cap;
            if take {
                encode(&e, &mut sp.buf);
                sp.events += 1;
            }
            take
        };
        let counter = if taken { &s.counters.recorded } else { &s.counters.dropped };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counters reported by `GET /admin/posterity`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stats {
    pub enabled: bool,
    /// Events accepted into the queue.
    pub recorded: u64,
    /// Events dropped because the queue was full.
    pub dropped: u64,
    /// Rows committed to the log.
    pub written: u64,
    pub flushes: u64,
    /// Rows lost to a failed flush (DuckDB error).
    pub failed: u64,
    pub queue_capacity: usize,
    pub flush_interval_secs: f64,
    pub database: String,
}

/// The posterity service: the DuckDB database, its writer thread and its query connections.
#[derive(Clone)]
pub struct Posterity {
    inner: Arc<Inner>,
}

struct Inner {
    opts: PosterityOptions,
    sink: Sink,
    counters: Arc<Counters>,
    /// Source of fresh connections for queries (a DuckDB connection is not shared across threads).
    base: Mutex<Connection>,
    writer: Mutex<Option<(SyncSender<Cmd>, std::thread::JoinHandle<()>)>>,
    /// Serialises archive runs.
    archiving: Mutex<()>,
}

/// Columns of the log, in table order.
pub(crate) const LOG_COLUMNS: &str = "ts, kind, trace_id, query_id, user_id, role, method, name, version, status, outcome, error, elapsed_ms, rows, bytes, detail";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS log (
    ts TIMESTAMP NOT NULL,
    kind VARCHAR NOT NULL,
    trace_id VARCHAR,
    query_id VARCHAR,
    user_id VARCHAR,
    role VARCHAR,
    method VARCHAR,
    name VARCHAR,
    version BIGINT,
    status INTEGER,
    outcome VARCHAR,
    error VARCHAR,
    elapsed_ms DOUBLE,
    rows BIGINT,
    bytes BIGINT,
    detail JSON
);
CREATE TABLE IF NOT EXISTS sql_texts (hash VARCHAR NOT NULL, text VARCHAR, first_seen TIMESTAMP);
CREATE TABLE IF NOT EXISTS archive_files (
    path VARCHAR NOT NULL, kind VARCHAR, day DATE, rows BIGINT, bytes BIGINT, created TIMESTAMP
);
CREATE TABLE IF NOT EXISTS analytics_grants (view_name VARCHAR NOT NULL, role VARCHAR NOT NULL, granted TIMESTAMP);
";

/// Names of the engine's own objects (an admin view may not take them).
pub const ENGINE_OBJECTS: &[&str] = &[
    "log",
    "log_all",
    "sql_texts",
    "archive_files",
    "analytics_grants",
    "http_requests",
    "sql_statements",
    "lua_invocations",
    "ai_calls",
    "app_table",
];

/// Map a DuckDB error onto the engine's error codes.
pub fn duck_err(e: duckdb::Error) -> Error {
    let msg = e.to_string();
    let code = if msg.starts_with("Parser Error") {
        ErrorCode::SyntaxError
    } else if msg.starts_with("Catalog Error") {
        if msg.contains("Function") || msg.contains("function") {
            ErrorCode::UnknownFunction
        } else {
            ErrorCode::UnknownTable
        }
    } else if msg.starts_with("Binder Error") {
        ErrorCode::UnknownIdentifier
    } else if msg.starts_with("Permission Error") {
        ErrorCode::AccessDenied
    } else if msg.contains("read-only mode") || msg.contains("read-only transaction") {
        ErrorCode::Readonly
    } else if msg.starts_with("Out of Memory Error") {
        ErrorCode::MemoryLimitExceeded
    } else if msg.starts_with("INTERRUPT") || msg.contains("Interrupted") {
        ErrorCode::QueryWasCancelled
    } else if msg.starts_with("Conversion Error")
        || msg.starts_with("Invalid Input Error")
        || msg.starts_with("Out of Range Error")
        || msg.contains("Invalid Parameter")
    {
        ErrorCode::BadArguments
    } else if msg.starts_with("IO Error") && msg.contains("lock") {
        ErrorCode::DatabaseBusy
    } else {
        ErrorCode::StorageError
    };
    Error::new(code, msg)
}

fn sql_str(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Open the database file and apply the `[analytics]` settings (on the `duckdb` thread of
/// [`Posterity::open`]).
fn open_duckdb(
    opts: &PosterityOptions,
    path: &Path,
    archive_dir: &Path,
    temp_dir: &Path,
) -> anyhow::Result<Connection> {
    let conn = Connection::open(path).map_err(|e| {
        let m = e.to_string();
        if m.contains("lock") {
            anyhow::anyhow!(
                "{} is in use by another process (a running server?): {m}",
                path.display()
            )
        } else {
            anyhow::anyhow!("opening {}: {m}", path.display())
        }
    })?;
    // The request log (who asked what) is for this user only, its WAL too.
    crate::storage::private_file(path)?;
    let wal = PathBuf::from(format!("{}.wal", path.display()));
    if wal.exists() {
        crate::storage::private_file(&wal)?;
    }
    // Queries may touch no file but the archive (and DuckDB's own spill directory): no
    // read_csv('/etc/passwd'), no COPY TO elsewhere, no ATTACH, no extension downloads.
    conn.execute_batch(&format!(
        "SET temp_directory = {t};
         SET allowed_directories = [{a}, {t}];
         SET enable_external_access = false;
         SET autoinstall_known_extensions = false;
         SET autoload_known_extensions = false;
         SET memory_limit = {m};
         SET threads = {n};
         SET max_temp_directory_size = {d};",
        t = sql_str(&format!("{}/", temp_dir.display())),
        a = sql_str(&format!("{}/", archive_dir.display())),
        m = sql_str(&opts.analytics.memory_limit),
        n = opts.analytics.threads,
        d = sql_str(&opts.analytics.max_temp_directory_size),
    ))
    .map_err(|e| anyhow::anyhow!("posterity: DuckDB settings of [analytics]: {e}"))?;
    conn.execute_batch(&format!("SET checkpoint_threshold = '{}MB';", opts.checkpoint_mb))
        .map_err(|e| anyhow::anyhow!("posterity: posterity_checkpoint_mb = {}: {e}", opts.checkpoint_mb))?;
    Ok(conn)
}

impl Posterity {
    /// Open (creating if needed) the posterity database, recover an interrupted archive run,
    /// lock down file access and start the writer thread.
    pub fn open(opts: PosterityOptions) -> anyhow::Result<Posterity> {
        crate::storage::private_dir(&opts.data_dir)?;
        let archive_dir = opts.archive_dir();
        crate::storage::private_dir(&archive_dir)?;
        let temp_dir = opts.data_dir.join("posterity.tmp");
        crate::storage::private_dir(&temp_dir)?;
        let path = opts.db_path();
        // DuckDB starts its worker threads (checkpoints, parallel analytics) from the thread
        // that opens the database and sets `threads`, and a new thread inherits its creator's
        // nice value and name: opened from a thread at nice 10, like the writer, they yield to
        // requests under CPU contention (a checkpoint's compression at nice 0 took ~8% of a
        // saturated server's CPU) and show up as `duckdb` in `top -H`.
        let conn = std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("duckdb".into())
                .spawn_scoped(scope, || {
                    crate::core::background::lower_this_thread(10);
                    open_duckdb(&opts, &path, &archive_dir, &temp_dir)
                })?
                .join()
                .map_err(|_| anyhow::anyhow!("posterity: opening DuckDB panicked"))?
        })?;
        conn.execute_batch(SCHEMA)?;
        app_table::register(&conn, &opts.app_db)?;
        archive::recover(&conn, &archive_dir)?;
        archive::create_views(&conn, &archive_dir)?;
        conn.execute_batch("SET lock_configuration = true;")?;
        Self::start(opts, conn)
    }

    /// Start the writer thread on an open database.
    fn start(opts: PosterityOptions, conn: Connection) -> anyhow::Result<Posterity> {
        let counters = Arc::new(Counters::default());
        let (tx, rx) = sync_channel(16);
        let spool = Arc::new(Mutex::new(Spool::default()));
        let wconn = conn.try_clone()?;
        let (c2, s2) = (Arc::clone(&counters), Arc::clone(&spool));
        let (flush_every, batch) = (opts.flush_interval, opts.batch_rows.max(1));
        let handle = std::thread::Builder::new()
            .name("posterity".into())
            .spawn(move || writer_loop(wconn, rx, s2, c2, flush_every, batch))?;
        let sink = if opts.enabled {
            Sink {
                inner: Some(Arc::new(SinkInner {
                    spool,
                    cap: opts.queue.max(1),
                    counters: Arc::clone(&counters),
                })),
            }
        } else {
            Sink::disabled()
        };
        Ok(Posterity {
            inner: Arc::new(Inner {
                opts,
                sink,
                counters,
                base: Mutex::new(conn),
                writer: Mutex::new(Some((tx, handle))),
                archiving: Mutex::new(()),
            }),
        })
    }

    pub fn options(&self) -> &PosterityOptions {
        &self.inner.opts
    }

    /// The recording handle (disabled when logging is off).
    pub fn sink(&self) -> Sink {
        self.inner.sink.clone()
    }

    /// A fresh connection to the database (for one query or one archive run).
    pub(crate) fn connect(&self) -> Result<Connection> {
        self.inner
            .base
            .lock()
            .map_err(|_| Error::internal("posterity connection lock poisoned"))?
            .try_clone()
            .map_err(duck_err)
    }

    /// Commit everything queued so far (blocking).
    pub fn flush(&self) {
        let tx = match &*self.inner.writer.lock().expect("writer lock") {
            Some((tx, _)) => tx.clone(),
            None => return,
        };
        let (ack_tx, ack_rx) = sync_channel(1);
        if tx.send(Cmd::Flush(ack_tx)).is_ok() {
            let _ = ack_rx.recv_timeout(Duration::from_secs(30));
        }
    }

    /// Flush and stop the writer (blocking). Events recorded afterwards are dropped.
    pub fn close(&self) {
        let w = self.inner.writer.lock().expect("writer lock").take();
        if let Some((tx, handle)) = w {
            let _ = tx.send(Cmd::Stop);
            drop(tx);
            let _ = handle.join();
        }
        if let Ok(c) = self.inner.base.lock() {
            let _ = c.execute_batch("CHECKPOINT");
        }
    }

    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        Stats {
            enabled: self.inner.sink.enabled(),
            recorded: c.recorded.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            written: c.written.load(Ordering::Relaxed),
            flushes: c.flushes.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            queue_capacity: self.inner.opts.queue,
            flush_interval_secs: self.inner.opts.flush_interval.as_secs_f64(),
            database: self.inner.opts.db_path().display().to_string(),
        }
    }

    pub(crate) fn archive_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner
            .archiving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

fn ts_value(us: i64) -> Value {
    Value::Timestamp(TimeUnit::Microsecond, us)
}

/// Rows waiting to be appended, column by column (Arrow builders): the writer appends them to
/// DuckDB as one data chunk per tick (at most [`CHUNK_ROWS`] rows each) instead of value by value.
struct Batch {
    ts: TimestampMicrosecondBuilder,
    kind: StringBuilder,
    trace_id: StringBuilder,
    query_id: StringBuilder,
    user_id: StringBuilder,
    role: StringBuilder,
    method: StringBuilder,
    name: StringBuilder,
    version: Int64Builder,
    status: Int32Builder,
    outcome: StringBuilder,
    error: StringBuilder,
    elapsed_ms: Float64Builder,
    rows: Int64Builder,
    bytes: Int64Builder,
    detail: StringBuilder,
    len: usize,
    schema: SchemaRef,
}

/// DuckDB's vector size: rows per appended chunk.
const CHUNK_ROWS: usize = 2048;

impl Batch {
    fn new() -> Batch {
        let text = |n: &str| Field::new(n, DataType::Utf8, true);
        let schema = Arc::new(Schema::new(vec![
            Field::new("ts", DataType::Timestamp(ArrowTimeUnit::Microsecond, None), false),
            text("kind"),
            text("trace_id"),
            text("query_id"),
            text("user_id"),
            text("role"),
            text("method"),
            text("name"),
            Field::new("version", DataType::Int64, true),
            Field::new("status", DataType::Int32, true),
            text("outcome"),
            text("error"),
            Field::new("elapsed_ms", DataType::Float64, true),
            Field::new("rows", DataType::Int64, true),
            Field::new("bytes", DataType::Int64, true),
            text("detail"),
        ]));
        Batch {
            ts: TimestampMicrosecondBuilder::with_capacity(CHUNK_ROWS),
            kind: StringBuilder::new(),
            trace_id: StringBuilder::new(),
            query_id: StringBuilder::new(),
            user_id: StringBuilder::new(),
            role: StringBuilder::new(),
            method: StringBuilder::new(),
            name: StringBuilder::new(),
            version: Int64Builder::with_capacity(CHUNK_ROWS),
            status: Int32Builder::with_capacity(CHUNK_ROWS),
            outcome: StringBuilder::new(),
            error: StringBuilder::new(),
            elapsed_ms: Float64Builder::with_capacity(CHUNK_ROWS),
            rows: Int64Builder::with_capacity(CHUNK_ROWS),
            bytes: Int64Builder::with_capacity(CHUNK_ROWS),
            detail: StringBuilder::new(),
            len: 0,
            schema,
        }
    }

    /// Add `e`; `name` and `detail` replace the event's own when given (derived by the writer).
    fn push(&mut self, e: &Row<'_>, name: Option<&str>, detail: Option<&str>) {
        self.ts.append_value(e.ts_us);
        self.kind.append_value(e.kind);
        self.trace_id.append_option(e.trace_id);
        self.query_id.append_option(e.query_id);
        self.user_id.append_option(e.user_id);
        self.role.append_option(e.role);
        self.method.append_option(e.method);
        self.name.append_option(name.or(e.name));
        self.version.append_option(e.version);
        self.status.append_option(e.status);
        self.outcome.append_option(e.outcome);
        self.error.append_option(e.error);
        self.elapsed_ms.append_value(e.elapsed_ms);
        self.rows.append_option(e.rows);
        self.bytes.append_option(e.bytes);
        self.detail.append_option(detail.or(e.detail));
        self.len += 1;
    }

    /// The rows so far as one record batch; the builders start over.
    fn take(&mut self) -> duckdb::arrow::error::Result<RecordBatch> {
        self.len = 0;
        // `finish` hands a string builder's buffers over and leaves it empty: the next chunk
        // starts from buffers as large as this one's, instead of growing them again (the
        // copies of each doubling were a tenth of this thread's time).
        fn text(b: &mut StringBuilder) -> ArrayRef {
            let bytes = b.values_slice().len();
            let a = b.finish();
            *b = StringBuilder::with_capacity(CHUNK_ROWS, bytes.max(64));
            Arc::new(a)
        }
        let cols: Vec<ArrayRef> = vec![
            Arc::new(self.ts.finish()),
            text(&mut self.kind),
            text(&mut self.trace_id),
            text(&mut self.query_id),
            text(&mut self.user_id),
            text(&mut self.role),
            text(&mut self.method),
            text(&mut self.name),
            Arc::new(self.version.finish()),
            Arc::new(self.status.finish()),
            text(&mut self.outcome),
            text(&mut self.error),
            Arc::new(self.elapsed_ms.finish()),
            Arc::new(self.rows.finish()),
            Arc::new(self.bytes.finish()),
            text(&mut self.detail),
        ];
        RecordBatch::try_new(Arc::clone(&self.schema), cols)
    }
}

/// Statement hashes by text, derived by the writer for `sql` events (see [`Event::sql`]),
/// computed once each.
#[derive(Default)]
struct Hashes(std::collections::HashMap<String, String>);

impl Hashes {
    /// Distinct statement texts remembered at most (then the map starts over).
    const MAX_TEXTS: usize = 10_000;

    /// The hash of `text`, and whether this is the first time the writer meets the text
    /// since the map last started over (only then can its `sql_texts` row be missing).
    fn get(&mut self, text: &str) -> (&str, bool) {
        let new = !self.0.contains_key(text);
        if new {
            if self.0.len() >= Self::MAX_TEXTS {
                self.0.clear();
            }
            self.0.insert(text.to_string(), sql_hash(text));
        }
        (&self.0[text], new)
    }
}

/// The `{"verb": ...}` detail of `sql` events by verb, derived by the writer, computed once each.
#[derive(Default)]
struct Details(std::collections::HashMap<String, String>);

impl Details {
    fn get(&mut self, verb: &str) -> &str {
        if !self.0.contains_key(verb) {
            // Only the statement verbs are recorded; the bound is for safety.
            if self.0.len() >= 64 {
                self.0.clear();
            }
            self.0.insert(verb.to_string(), verb_detail(verb));
        }
        &self.0[verb]
    }
}

/// Commands waiting for the writer, taken before the spool: a flush then finds every event
/// recorded before it was asked for. `(flush acks, stop)`.
fn commands(rx: &Receiver<Cmd>) -> (Vec<SyncSender<()>>, bool) {
    let (mut acks, mut stop) = (Vec::new(), false);
    loop {
        match rx.try_recv() {
            Ok(Cmd::Flush(ack)) => acks.push(ack),
            // A stop still takes what was recorded before it.
            Ok(Cmd::Stop) => stop = true,
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Disconnected) => {
                stop = true;
                break;
            }
        }
    }
    (acks, stop)
}

/// Swap the spool's events into `into` (empty, its capacity kept); the count taken. After a
/// stop the spool takes nothing more (later events are dropped and counted).
fn take_spool(spool: &Mutex<Spool>, into: &mut Vec<u8>, stop: bool) -> usize {
    let mut sp = lock_spool(spool);
    std::mem::swap(&mut sp.buf, into);
    sp.closed |= stop;
    std::mem::take(&mut sp.events)
}

fn writer_loop(
    conn: Connection,
    rx: Receiver<Cmd>,
    spool: Arc<Mutex<Spool>>,
    counters: Arc<Counters>,
    flush_every: Duration,
    batch: usize,
) {
    // Nice 10: under CPU contention request threads go first and the writer catches up in
    // idle moments (the queue absorbs the difference; past it, events are dropped and counted,
    // never waited for).
    crate::core::background::lower_this_thread(10);
    let mut seen: HashSet<String> = HashSet::new();
    if let Ok(mut st) = conn.prepare("SELECT DISTINCT hash FROM sql_texts") {
        if let Ok(rows) = st.query_map([], |r| r.get::<_, String>(0)) {
            seen.extend(rows.flatten());
        }
    }
    let mut log = match conn.appender("log") {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "posterity: cannot append to the log; events are discarded");
            let mut buf = Vec::new();
            loop {
                std::thread::sleep(Duration::from_millis(20));
                let (acks, stop) = commands(&rx);
                let n = take_spool(&spool, &mut buf, stop);
                buf.clear();
                counters.failed.fetch_add(n as u64, Ordering::Relaxed);
                for a in acks {
                    let _ = a.send(());
                }
                if stop {
                    return;
                }
            }
        }
    };
    let mut texts = conn.appender("sql_texts").ok();
    let mut rows = Batch::new();
    let (mut hashes, mut details) = (Hashes::default(), Details::default());
    // Rows appended to DuckDB and not yet committed.
    let mut pending = 0u64;
    // From 0, not from the counter's value now: events dropped while this thread was still
    // starting (a burst at start) are reported like any others.
    let mut reported_drops = 0u64;
    let mut next_flush = Instant::now() + flush_every;
    // Hand the buffered rows to DuckDB as one chunk.
    let append = |log: &mut duckdb::Appender<'_>, rows: &mut Batch, pending: &mut u64| {
        if rows.len == 0 {
            return;
        }
        let n = rows.len as u64;
        match rows
            .take()
            .map_err(|e| e.to_string())
            .and_then(|b| log.append_record_batch(b).map_err(|e| e.to_string()))
        {
            Ok(()) => *pending += n,
            Err(err) => {
                counters.failed.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(error = %err, rows = n, "posterity: cannot append events");
            }
        }
    };
    let mut flush = |log: &mut duckdb::Appender<'_>,
                     texts: &mut Option<duckdb::Appender<'_>>,
                     rows: &mut Batch,
                     pending: &mut u64| {
        let dropped = counters.dropped.load(Ordering::Relaxed);
        if dropped > reported_drops {
            let n = (dropped - reported_drops) as i64;
            reported_drops = dropped;
            rows.push(&Row::of(&Event::dropped(n, dropped)), None, None);
        }
        append(log, rows, pending);
        if *pending == 0 {
            return;
        }
        if let Some(t) = texts.as_mut() {
            if let Err(e) = t.flush() {
                tracing::warn!(error = %e, "posterity: sql_texts flush failed");
            }
        }
        match log.flush() {
            Ok(()) => {
                counters.written.fetch_add(*pending, Ordering::Relaxed);
                counters.flushes.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                counters.failed.fetch_add(*pending, Ordering::Relaxed);
                tracing::warn!(error = %e, rows = *pending, "posterity: flush failed; rows lost");
            }
        }
        *pending = 0;
    };
    // The writer polls: it sleeps a short tick and swaps the spool out, never blocking on a
    // channel, so a request recording an event never pays for waking this thread up. What one
    // tick took is decoded in place and appended as columns, one chunk per [`CHUNK_ROWS`] rows.
    let tick = flush_every
        .min(Duration::from_millis(20))
        .max(Duration::from_millis(1));
    let mut taken: Vec<u8> = Vec::new();
    loop {
        std::thread::sleep(tick);
        let (acks, stop) = commands(&rx);
        let n = take_spool(&spool, &mut taken, stop);
        let mut decoder = Decoder { b: &taken };
        let mut decoded = 0usize;
        while let Some(e) = decoder.row() {
            decoded += 1;
            // Derived columns of `sql` events (see `Event::sql`): the verb's detail, then the
            // statement's hash (borrowed from `hashes`, not copied).
            let detail = match (e.detail, e.sql_verb) {
                (None, Some(v)) => Some(details.get(v)),
                _ => None,
            };
            let (hash, new_text) = match (e.name, e.sql_text) {
                (None, Some(text)) => {
                    let (h, new) = hashes.get(text);
                    (Some(h), new)
                }
                (Some(h), Some(_)) => (Some(h), true),
                _ => (None, false),
            };
            // A text met before since `hashes` started over was checked then.
            if let (true, Some(text), Some(hash), Some(t)) = (new_text, e.sql_text, hash, texts.as_mut()) {
                if !seen.contains(hash) && seen.len() < 1_000_000 {
                    seen.insert(hash.to_string());
                    let text: String = text.chars().take(8192).collect();
                    let _ = t.append_row(duckdb::params![hash, text, ts_value(e.ts_us)]);
                }
            }
            rows.push(&e, hash, detail);
            if rows.len >= CHUNK_ROWS {
                append(&mut log, &mut rows, &mut pending);
            }
            if pending + rows.len as u64 >= batch as u64 {
                flush(&mut log, &mut texts, &mut rows, &mut pending);
                next_flush = Instant::now() + flush_every;
            }
        }
        if decoded < n {
            // Bytes `encode` did not write (cannot happen): the rest of the tick is lost, counted.
            counters.failed.fetch_add((n - decoded) as u64, Ordering::Relaxed);
            tracing::error!(lost = n - decoded, "posterity: undecodable events in the spool");
        }
        // A burst's buffer is not kept for ever.
        if taken.capacity() > 8 << 20 {
            taken = Vec::new();
        } else {
            taken.clear();
        }
        if stop || !acks.is_empty() || Instant::now() >= next_flush {
            flush(&mut log, &mut texts, &mut rows, &mut pending);
            next_flush = Instant::now() + flush_every;
            for a in acks {
                let _ = a.send(());
            }
        } else {
            append(&mut log, &mut rows, &mut pending);
        }
        if stop {
            break;
        }
    }
}

/// Path of `p` for DuckDB SQL text.
pub(crate) fn path_literal(p: &Path) -> String {
    sql_str(&p.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Posterity {
        open_with(dir, 64)
    }

    fn options(dir: &Path) -> PosterityOptions {
        PosterityOptions {
            data_dir: dir.to_path_buf(),
            app_db: dir.join("ichibase.db"),
            enabled: true,
            flush_interval: Duration::from_secs(60),
            queue: 1024,
            batch_rows: 50_000,
            checkpoint_mb: 64,
            archive_after_days: 7,
            analytics: AnalyticsSettings::default(),
        }
    }

    fn open_with(dir: &Path, checkpoint_mb: u64) -> Posterity {
        Posterity::open(PosterityOptions { checkpoint_mb, ..options(dir) }).unwrap()
    }

    /// Every field of an event comes out of the spool as it went in: absent and empty
    /// strings, multibyte text, negative and extreme numbers, events back to back.
    #[test]
    fn spooled_events_decode_to_exactly_what_was_recorded() {
        let mut full = Event::sql(None, "SELECT '日本語' -- ✓", "SELECT");
        full.ts_us = -5;
        full.trace_id = Some(String::new());
        full.query_id = Some("q-1".into());
        full.user_id = Some("ユーザー".into());
        full.role = Some("user".into());
        full.method = Some("POST".into());
        full.name = Some("/fn/x".into());
        full.version = Some(i64::MIN);
        full.status = Some(i32::MAX);
        full.outcome = Some("error");
        full.error = Some("e".repeat(1000));
        full.elapsed_ms = f64::MAX;
        full.rows = Some(0);
        full.bytes = Some(i64::MAX);
        full.detail = Some("{\"a\":[1,2]}".into());
        let bare = Event::now("lua", None);
        let odd = Event::sql(None, "", "NOT A VERB");
        let events = [full, bare, odd];
        let mut buf = Vec::new();
        for e in &events {
            encode(e, &mut buf);
        }
        let mut d = Decoder { b: &buf };
        for e in &events {
            assert_eq!(d.row(), Some(Row::of(e)));
        }
        assert_eq!(d.row(), None, "nothing after the last event");
        // Bytes cut short are refused, never read past.
        for cut in [1, 7, 9, buf.len() / 2, buf.len() - 1] {
            let mut d = Decoder { b: &buf[..cut] };
            let mut n = 0;
            while d.row().is_some() {
                n += 1;
            }
            assert!(n < events.len(), "cut at {cut}");
        }
    }

    /// The spool holds `posterity_queue` events; past it, and once the writer has stopped,
    /// events are dropped and counted, never waited for.
    #[test]
    fn a_full_or_stopped_spool_drops_and_counts() {
        let spool = Arc::new(Mutex::new(Spool::default()));
        let counters = Arc::new(Counters::default());
        let sink = Sink {
            inner: Some(Arc::new(SinkInner { spool: Arc::clone(&spool), cap: 3, counters: Arc::clone(&counters) })),
        };
        for i in 0..5 {
            let mut e = Event::now("http", None);
            e.rows = Some(i);
            sink.record(e);
        }
        assert_eq!(counters.recorded.load(Ordering::Relaxed), 3);
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 2);
        let mut taken = Vec::new();
        assert_eq!(take_spool(&spool, &mut taken, false), 3);
        let mut d = Decoder { b: &taken };
        let kept: Vec<Option<i64>> = std::iter::from_fn(|| d.row()).map(|r| r.rows).collect();
        assert_eq!(kept, vec![Some(0), Some(1), Some(2)], "the first three, in order");
        // Room again after the writer took them; none after it stopped.
        sink.record(Event::now("http", None));
        assert_eq!(take_spool(&spool, &mut Vec::new(), true), 1);
        sink.record(Event::now("http", None));
        assert_eq!(counters.recorded.load(Ordering::Relaxed), 4);
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 3);
        assert_eq!(take_spool(&spool, &mut Vec::new(), false), 0);
    }

    /// A burst past the spool's size: what was kept is in the log, and the log itself says how
    /// many events were lost (a `posterity`/`dropped` row), so the counts add up.
    #[test]
    fn a_burst_past_the_spool_leaves_its_count_in_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let p = Posterity::open(PosterityOptions { queue: 4, ..options(dir.path()) }).unwrap();
        let sink = p.sink();
        // The writer takes at most 4 events per 20 ms tick: 100,000 events in a row overflow
        // it unless recording them takes over 8 minutes.
        let n = 100_000u64;
        for _ in 0..n {
            sink.record(Event::now("http", None));
        }
        p.flush();
        let st = p.stats();
        assert!(st.dropped > 0, "{st:?}");
        assert_eq!(st.recorded + st.dropped, n, "{st:?}");
        let c = p.connect().unwrap();
        let (kept, lost): (i64, i64) = c
            .query_row(
                "SELECT count(*) FILTER (WHERE kind = 'http'), coalesce(sum(rows) FILTER (WHERE kind = 'posterity' AND name = 'dropped'), 0) FROM log",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((kept as u64, lost as u64), (st.recorded, st.dropped));
        p.close();
        // After close nothing is taken: dropped and counted.
        sink.record(Event::now("http", None));
        assert_eq!(p.stats().dropped, st.dropped + 1);
    }

    /// DuckDB's worker threads (checkpoints, parallel analytics) run at the writer's nice 10,
    /// named `duckdb`: requests go first under CPU contention.
    #[cfg(target_os = "linux")]
    #[test]
    fn duckdb_workers_yield_to_requests() {
        let dir = tempfile::tempdir().unwrap();
        let p = open(dir.path());
        let mut workers = Vec::new();
        for t in std::fs::read_dir("/proc/thread-self/..").unwrap() {
            let t = t.unwrap().path();
            let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
            let stat = std::fs::read_to_string(t.join("stat")).unwrap_or_default();
            // Field 19 of stat is the nice value (fields counted after the `(comm)` one).
            let nice: Option<i64> = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split(' ').nth(16))
                .and_then(|v| v.parse().ok());
            match comm.trim() {
                "duckdb" => workers.push(nice),
                "posterity" => assert_eq!(nice, Some(10), "the writer"),
                _ => {}
            }
        }
        assert!(!workers.is_empty(), "DuckDB's workers are named after the thread that opened it");
        assert!(workers.iter().all(|n| *n == Some(10)), "{workers:?}");
        // And they work: a parallel aggregate answers.
        let c = p.connect().unwrap();
        let n: i64 = c.query_row("SELECT count(*) FROM range(3000000) t(x) WHERE x % 3 = 0", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 1_000_000);
        p.close();
    }

    /// `posterity_checkpoint_mb` is the log's DuckDB checkpoint threshold (DuckDB's own
    /// default would be 16 MB), and analytics cannot change it afterwards.
    #[test]
    fn the_checkpoint_threshold_is_the_configured_one() {
        let threshold = |c: &Connection| -> String {
            c.query_row("SELECT current_setting('checkpoint_threshold')", [], |r| r.get(0)).unwrap()
        };
        let reference = Connection::open_in_memory().unwrap();
        let mut want = Vec::new();
        for mb in [3, 64] {
            reference.execute_batch(&format!("SET checkpoint_threshold = '{mb}MB'")).unwrap();
            want.push(threshold(&reference));
        }
        assert_ne!(want[0], want[1]);
        for (mb, want) in [3, 64].into_iter().zip(want) {
            let dir = tempfile::tempdir().unwrap();
            let p = open_with(dir.path(), mb);
            let c = p.connect().unwrap();
            assert_eq!(threshold(&c), want, "{mb} MB");
            assert!(c.execute_batch("SET checkpoint_threshold = '1MB'").is_err(), "the configuration is locked");
            p.close();
        }
    }

    #[test]
    fn chunked_rows_keep_every_column_and_derive_sql_hash_and_detail() {
        let dir = tempfile::tempdir().unwrap();
        let p = open(dir.path());
        let sink = p.sink();
        let mut e = Event::sql(None, "SELECT 42", "SELECT");
        e.rows = Some(1);
        e.elapsed_ms = 0.5;
        e.outcome = Some("ok");
        sink.record(e);
        let mut h = Event::now("http", None);
        h.method = Some("GET".into());
        h.name = Some("/ping".into());
        h.status = Some(200);
        h.version = Some(3);
        h.bytes = Some(5);
        h.detail = Some("{\"a\":1}".into());
        sink.record(h);
        // A detail that is not JSON does not cost the rows appended with it.
        let mut bad = Event::now("lua", None);
        bad.detail = Some("not json {".into());
        sink.record(bad);
        p.flush();
        let s = p.stats();
        let c = p.connect().unwrap();
        let sql: (String, String, Option<i64>, String) = c
            .query_row(
                "SELECT name, detail::VARCHAR, rows, (SELECT text FROM sql_texts WHERE hash = log.name) FROM log WHERE kind = 'sql'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert_eq!(sql, (sql_hash("SELECT 42"), "{\"verb\":\"SELECT\"}".to_string(), Some(1), "SELECT 42".to_string()));
        let http: (String, String, i32, i64, i64, String) = c
            .query_row(
                "SELECT method, name, status, version, bytes, detail::VARCHAR FROM log WHERE kind = 'http'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
            )
            .unwrap();
        assert_eq!(http, ("GET".into(), "/ping".into(), 200, 3, 5, "{\"a\":1}".into()));
        let n: i64 = c.query_row("SELECT count(*) FROM log", [], |r| r.get(0)).unwrap();
        assert_eq!((n, s.written, s.failed), (3, 3, 0), "{s:?}");
        p.close();
    }
}
