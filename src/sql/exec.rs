//! Execute one SQL-over-HTTP request against [`Storage`].
//!
//! A single read-only statement first tries to run inline on the request's own worker
//! ([`start_inline`]: a free reader connection, a time budget and an answer cap, else it runs
//! again the usual way). Read-only single statements stream from a pooled reader; anything that writes goes to the
//! writer, inside one transaction when it has several statements, insert data or a RETURNING
//! result. Output travels to the HTTP layer as [`Msg`]s over a bounded channel: answers up to
//! `buffer_size` bytes arrive as one `Done` (so the status code and summary are exact), larger
//! ones as `Data` chunks while the query still runs, which keeps server memory bounded.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use rusqlite::Connection;
use rusqlite::types::Value;
use tokio::sync::mpsc;

use super::format::{self, Column, Format, Stats};
use super::input;
use super::params;
use super::spool::Spool;
use super::parse::{self, InsertTarget, quote_ident};
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::storage::{Authz, ExecControl, Storage};

/// Chunk size once a response streams.
const CHUNK: usize = 64 * 1024;
/// Chunks in flight between the SQLite thread and the socket.
const CHANNEL_DEPTH: usize = 8;

/// Per-request settings (URL settings already checked against server limits).
#[derive(Debug, Clone)]
pub struct QuerySettings {
    pub default_format: Option<Format>,
    /// Run several statements in one transaction.
    pub transaction: bool,
    /// Refuse anything that writes (GET requests, `readonly=1`).
    pub readonly: bool,
    pub max_result_rows: u64,
    pub max_result_bytes: u64,
    /// `result_overflow_mode=break`: stop at a limit and return what fits.
    pub overflow_break: bool,
    pub quote_i64: bool,
    pub params: HashMap<String, String>,
    /// Largest SQL text (insert data excluded), bytes.
    pub max_query_size: usize,
    /// Output buffered before streaming starts.
    pub buffer_size: usize,
    /// Where statement-level rows of the posterity log go.
    pub log: crate::posterity::Sink,
    /// Bounds of the queue between a streaming query and a slow client.
    pub spool: super::spool::SpoolLimits,
    /// Largest answer held whole in memory (on the writer, or with `wait_end_of_query=1`).
    pub max_buffered: usize,
}

/// ClickHouse's `X-ClickHouse-Summary` counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub read_rows: u64,
    pub read_bytes: u64,
    pub written_rows: u64,
    pub written_bytes: u64,
    pub result_rows: u64,
    pub result_bytes: u64,
    pub elapsed_ns: u64,
}

impl Summary {
    pub fn to_header(&self) -> String {
        format!(
            "{{\"read_rows\":\"{}\",\"read_bytes\":\"{}\",\"written_rows\":\"{}\",\"written_bytes\":\"{}\",\"total_rows_to_read\":\"0\",\"result_rows\":\"{}\",\"result_bytes\":\"{}\",\"elapsed_ns\":\"{}\"}}",
            self.read_rows,
            self.read_bytes,
            self.written_rows,
            self.written_bytes,
            self.result_rows,
            self.result_bytes,
            self.elapsed_ns
        )
    }
}

/// What the executor sends to the HTTP layer. The first message decides the response:
/// `Done` (complete answer) or `Error` give an exact status; `Data` starts a 200 stream that
/// ends with `Done` or, if the query fails midway, `Error`.
#[derive(Debug)]
pub enum Msg {
    Data(Bytes, Summary),
    Done(Bytes, Summary),
    Error(Error),
}

/// A statement with its parameters bound.
#[derive(Debug, Clone)]
pub(crate) struct Bound {
    pub(crate) sql: String,
    pub(crate) values: Vec<Value>,
    /// The declared type of each placeholder (`Int64`, ...), in `values`' order.
    pub(crate) types: Vec<String>,
    pub(crate) verb: String,
    pub(crate) ctes: Vec<String>,
    pub(crate) or_replace: bool,
    pub(crate) write_target: Option<parse::WriteTarget>,
}

impl Bound {
    pub(crate) fn new(st: super::parse::Statement, values: Vec<Value>) -> Bound {
        Bound {
            types: st.params.iter().map(|p| p.ty.clone()).collect(),
            sql: st.sql,
            values,
            verb: st.verb,
            ctes: st.ctes,
            or_replace: st.or_replace,
            write_target: st.write_target,
        }
    }
}

/// Records one posterity row per statement run (text hash, rows, elapsed, outcome).
#[derive(Clone)]
pub(crate) struct StmtLog {
    sink: crate::posterity::Sink,
    ctx: Option<Arc<RequestContext>>,
}

impl StmtLog {
    pub(crate) fn new(sink: crate::posterity::Sink, ctx: &RequestContext) -> StmtLog {
        let ctx = sink.enabled().then(|| Arc::new(ctx.clone()));
        StmtLog { sink, ctx }
    }

    fn record(&self, b: &Bound, rows: u64, elapsed: std::time::Duration, err: Option<&Error>) {
        record_statement(&self.sink, self.ctx.as_deref(), b, rows, elapsed, err);
    }
}

/// One statement's posterity row (nothing when the log is off).
fn record_statement(
    sink: &crate::posterity::Sink,
    ctx: Option<&RequestContext>,
    b: &Bound,
    rows: u64,
    elapsed: std::time::Duration,
    err: Option<&Error>,
) {
    if !sink.enabled() {
        return;
    }
    // The statement's hash and `detail` are derived by the log's writer thread.
    let mut e = crate::posterity::Event::sql(ctx, &b.sql, &b.verb);
    e.rows = Some(rows as i64);
    e.elapsed_ms = elapsed.as_secs_f64() * 1e3;
    e.outcome = Some(if err.is_some() { "error" } else { "ok" });
    e.error = err.map(|e| e.message.chars().take(1000).collect());
    sink.record(e);
}

/// The plan for one request, built before touching storage.
struct Plan {
    statements: Vec<Bound>,
    format: Format,
    /// The insert target and its data (bytes: binary formats are not text).
    insert: Option<(InsertTarget, Bytes)>,
}

/// Bounds of a read run inline on the request's own thread (see [`start_inline`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InlineReads {
    /// Wall-clock budget of one inline run; past it the statement is interrupted (SQLite's
    /// progress handler) and run again on the reader pool. Zero: never inline.
    pub budget: std::time::Duration,
    /// Largest answer an inline run may build; a larger one runs again on the pool (which
    /// streams it).
    pub max_bytes: usize,
}

impl InlineReads {
    pub const OFF: InlineReads = InlineReads {
        budget: std::time::Duration::ZERO,
        max_bytes: 0,
    };
}

/// Start executing `text`; output arrives on the returned receiver.
pub fn start(
    storage: Storage,
    ctx: RequestContext,
    control: Arc<ExecControl>,
    text: String,
    data: Option<Bytes>,
    settings: QuerySettings,
    turn: Option<tokio::sync::OwnedSemaphorePermit>,
) -> (Format, mpsc::Receiver<Msg>) {
    start_inline(storage, ctx, control, text, data, settings, turn, InlineReads::OFF)
}

/// [`start`], first trying a single read-only statement **inline**: on the calling thread (the
/// request's async worker), when a reader connection is free at once, within `inline`'s budget
/// and answer cap. Such a run answers with one `Done` (or `Error`) already queued on the
/// receiver, without a task, a channel hand-off or a thread hop. A run that is not a single
/// read, finds no free connection, or hits a bound goes the usual way (the interrupted attempt
/// leaves no trace: no output, no posterity row).
#[allow(clippy::too_many_arguments)]
pub fn start_inline(
    storage: Storage,
    ctx: RequestContext,
    control: Arc<ExecControl>,
    text: String,
    data: Option<Bytes>,
    settings: QuerySettings,
    turn: Option<tokio::sync::OwnedSemaphorePermit>,
    inline: InlineReads,
) -> (Format, mpsc::Receiver<Msg>) {
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    let plan = plan(&text, data, &settings);
    let format = match &plan {
        Ok(p) => p.format,
        Err(_) => sniff_format(&text)
            .or(settings.default_format)
            .unwrap_or(Format::TabSeparated),
    };
    let plan = match plan {
        Ok(p) if !inline.budget.is_zero() => match try_inline(&storage, &ctx, &control, p, &settings, inline) {
            Ok(msg) => {
                let _ = tx.try_send(msg);
                return (format, rx);
            }
            Err(p) => Ok(p),
        },
        other => other,
    };
    tokio::spawn(async move {
        let result = match plan {
            Ok(plan) => run(&storage, &ctx, control, plan, settings, tx.clone(), turn).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            let _ = tx.send(Msg::Error(e)).await;
        }
    });
    (format, rx)
}

/// One inline attempt (see [`start_inline`]): the answer, or the plan back when the statement
/// must run the usual way.
fn try_inline(
    storage: &Storage,
    ctx: &RequestContext,
    control: &Arc<ExecControl>,
    plan: Plan,
    settings: &QuerySettings,
    inline: InlineReads,
) -> std::result::Result<Msg, Plan> {
    if plan.insert.is_some()
        || plan.statements.len() != 1
        || super::system::needed(&plan.statements)
        || control.is_cancelled()
    {
        return Err(plan);
    }
    let now = Instant::now();
    let until = now + inline.budget;
    if control.deadline.is_some_and(|d| d <= until) {
        // The request's own deadline comes first: its time-out must be reported as such.
        return Err(plan);
    }
    let budget = ExecControl::for_request(
        now,
        inline.budget.as_secs_f64(),
        control.value_limit,
        None,
    );
    let cap = inline.max_bytes.min(settings.buffer_size);
    let b = &plan.statements[0];
    let authz = storage.authz();
    let is_admin = ctx.is_admin();
    // Set when the attempt must not answer: not a read, over the cap, or over the budget.
    let mut fallback = false;
    let ran = storage.try_read_inline(ctx, Arc::clone(&budget), |conn| {
        check_role_rules(conn, authz, is_admin, &plan.statements)?;
        if !conn.prepare_cached(&b.sql)?.readonly() {
            // A write, or a read-only refusal: the usual path decides and reports.
            fallback = true;
            return Ok(None);
        }
        let mut out = Output::new(plan.format, settings, ctx.started, None);
        out.inline_cap = Some(cap);
        let t = Instant::now();
        let mut rows = 0u64;
        let r = step_statement(conn, b, Some(&mut out), &mut Summary::default(), &mut rows);
        if out.over_inline_cap {
            fallback = true;
            return Ok(None);
        }
        if r.as_ref().is_err_and(|e| e.code == ErrorCode::DatabaseBusy) {
            // A lock held elsewhere: the pool waits for it, off the async worker.
            fallback = true;
            return Ok(None);
        }
        if r.is_err() && budget.should_stop() && !control.should_stop() {
            // Interrupted by the budget (or ran past it): run again on the pool.
            fallback = true;
            return Ok(None);
        }
        record_statement(&settings.log, Some(ctx), b, rows, t.elapsed(), r.as_ref().err());
        r?;
        Ok(Some(out.into_buffer()))
    });
    match ran {
        None => Err(plan),
        Some(_) if fallback => Err(plan),
        Some(Ok(Some((bytes, summary)))) => Ok(Msg::Done(bytes, summary)),
        Some(Ok(None)) => Err(plan),
        // The budget ran out before the statement started (checked out late).
        Some(Err(_)) if budget.should_stop() && !control.should_stop() => Err(plan),
        // Busy before the statement ran (e.g. reading the schema): the pool waits for the lock.
        Some(Err(e)) if e.code == ErrorCode::DatabaseBusy => Err(plan),
        Some(Err(e)) => Ok(Msg::Error(e)),
    }
}

/// Bind every statement's placeholders with `value_of`, refusing transaction control (a request
/// or a Lua call is its own transaction; `how` says what to do instead).
pub(crate) fn bind(
    statements: Vec<super::parse::Statement>,
    how: &str,
    mut value_of: impl FnMut(&super::parse::Placeholder) -> Result<Value>,
) -> Result<Vec<Bound>> {
    let mut out = Vec::with_capacity(statements.len());
    for st in statements {
        if matches!(
            st.verb.as_str(),
            "BEGIN" | "COMMIT" | "END" | "ROLLBACK" | "SAVEPOINT" | "RELEASE"
        ) {
            return Err(Error::new(
                ErrorCode::BadArguments,
                format!(
                    "{} is not allowed: each call is its own transaction; {how}",
                    st.verb
                ),
            ));
        }
        let values = st
            .params
            .iter()
            .map(&mut value_of)
            .collect::<Result<Vec<_>>>()?;
        out.push(Bound::new(st, values));
    }
    Ok(out)
}

/// Best-effort `FORMAT X` at the end of text that failed to parse, so its error can still be
/// rendered in the format the client asked for.
fn sniff_format(text: &str) -> Option<Format> {
    let mut words = text
        .trim_end()
        .trim_end_matches(';')
        .rsplit(char::is_whitespace);
    let name = words.next()?;
    words.next().filter(|w| w.eq_ignore_ascii_case("FORMAT"))?;
    Format::parse(name).ok()
}

/// `data`: insert data sent apart from the text (binary, not UTF-8), which then ends with the
/// `FORMAT X` of an INSERT.
fn plan(text: &str, data: Option<Bytes>, settings: &QuerySettings) -> Result<Plan> {
    let parsed = parse::parse(text)?;
    let sql_len = text.len() - parsed.insert.as_ref().map_or(0, |(_, data)| data.len());
    if sql_len > settings.max_query_size {
        return Err(Error::new(
            ErrorCode::RequestTooLarge,
            format!(
                "Max query size exceeded: {sql_len} bytes of SQL, limit {} (max_query_size)",
                settings.max_query_size
            ),
        ));
    }
    let format = match &parsed.format {
        Some(name) => Format::parse(name)?,
        None => settings.default_format.unwrap_or(Format::TabSeparated),
    };
    if parsed.statements.len() + usize::from(parsed.insert.is_some()) > 1 && !settings.transaction {
        return Err(Error::syntax(
            "Multi-statements are not allowed; pass transaction=1 to run several statements in one transaction",
        ));
    }
    let statements = bind(
        parsed.statements,
        "send several statements with transaction=1",
        |p| {
            let raw = settings.params.get(&p.name).ok_or_else(|| {
                Error::new(
                    ErrorCode::UnknownQueryParameter,
                    format!(
                        "Substitution `{}` is not set: pass param_{}=<{}> in the URL",
                        p.name, p.name, p.ty
                    ),
                )
            })?;
            params::bind_value(&p.name, &p.ty, raw)
        },
    )?;
    let insert = match parsed.insert {
        Some((target, inline)) => {
            if settings.readonly {
                return Err(readonly_error());
            }
            Format::parse(&target.format)?;
            let bytes = match data {
                Some(d) if inline.is_empty() => d,
                Some(_) => {
                    return Err(Error::syntax(
                        "Insert data in both the query text and the body",
                    ));
                }
                None => Bytes::copy_from_slice(inline.as_bytes()),
            };
            Some((target, bytes))
        }
        None if data.is_some() => {
            return Err(Error::new(
                ErrorCode::BadArguments,
                "Request body is not valid UTF-8 and is not the data of an INSERT ... FORMAT <binary format> (Native, RowBinary, RowBinaryWithNamesAndTypes)",
            ));
        }
        None => None,
    };
    Ok(Plan {
        statements,
        format,
        insert,
    })
}

fn readonly_error() -> Error {
    Error::new(
        ErrorCode::Readonly,
        "Cannot execute query in readonly mode: GET requests and readonly=1 only read; send writes with POST",
    )
}

async fn run(
    storage: &Storage,
    ctx: &RequestContext,
    control: Arc<ExecControl>,
    plan: Plan,
    settings: QuerySettings,
    tx: mpsc::Sender<Msg>,
    mut turn: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<()> {
    let started = ctx.started;
    let is_admin = ctx.is_admin();
    let mut plan = plan;
    if super::system::needed(&plan.statements) {
        let catalog = super::system::load(storage, ctx, Arc::clone(&control)).await?;
        super::system::expand(
            &mut plan.statements,
            &catalog,
            &super::system::settings_rows(&settings),
        )?;
    }
    let slog = StmtLog::new(settings.log.clone(), ctx);
    let slog2 = slog.clone();
    // Single statements and read-only transactions try a reader first.
    // Batches (`transaction=1`) whose every statement only reads run there too: reading never
    // takes the single writer.
    if plan.insert.is_none() {
        let s = settings.clone();
        let tx2 = tx.clone();
        let statements = plan.statements.clone();
        let format = plan.format;
        let authz = Arc::clone(storage.authz());
        // Chunks a slow client has not taken yet, handed out of the reader so that the
        // connection goes back to the pool before the network is waited for.
        let leftover: Arc<std::sync::Mutex<Option<(Spool, Option<Msg>)>>> = Arc::default();
        let slot = Arc::clone(&leftover);
        let read = storage
            .read(ctx, Arc::clone(&control), move |conn| {
                check_role_rules(conn, &authz, is_admin, &statements)?;
                if statements.len() == 1 && !conn.prepare_cached(&statements[0].sql)?.readonly() {
                    return if s.readonly {
                        Err(readonly_error())
                    } else {
                        Ok(true)
                    };
                }
                if statements.len() > 1 {
                    for b in &statements {
                        // A statement that needs an earlier one's effect (a table it creates)
                        // does not prepare here: the writer runs the batch and reports.
                        match conn.prepare_cached(&b.sql) {
                            Ok(st) if st.readonly() => {}
                            Ok(_) if s.readonly => return Err(readonly_error()),
                            Err(e) if s.readonly => return Err(e.into()),
                            _ => return Ok(true),
                        }
                    }
                }
                let spool = Spool::new(tx2, s.spool.clone());
                let mut out = Output::new(format, &s, started, Some(spool));
                let r = if statements.len() == 1 {
                    run_statement(
                        conn,
                        &statements[0],
                        Some(&mut out),
                        &mut Summary::default(),
                        &slog2,
                    )
                } else {
                    conn.execute_batch("BEGIN")?;
                    let r = run_all(conn, &statements, &mut out, &slog2);
                    let _ = conn.execute_batch("ROLLBACK");
                    r
                };
                match r {
                    Ok(()) => *slot.lock().unwrap() = out.finish().map(|(sp, m)| (sp, Some(m))),
                    Err(e) => {
                        *slot.lock().unwrap() = out.take_spool().map(|sp| (sp, None));
                        // Errors go back through storage, which maps interrupts and
                        // authorizer denials.
                        return Err(e);
                    }
                }
                Ok(false)
            })
            .await;
        let leftover = leftover.lock().unwrap().take();
        if !matches!(read, Ok(true)) {
            // The database work is over: the caller's turn goes to the next query while a slow
            // client is still being served.
            turn = None;
        }
        match (read, leftover) {
            (Ok(false), Some((spool, Some(last)))) => {
                spool.drain(last).await;
                return Ok(());
            }
            (Err(e), Some((spool, _))) if !spool.is_idle() => {
                spool.drain(Msg::Error(e)).await;
                return Ok(());
            }
            (Ok(false), _) => return Ok(()),
            (Ok(true), _) => {}
            (Err(e), _) => return Err(e),
        }
    } else if settings.readonly {
        return Err(readonly_error());
    }

    let s = settings.clone();
    let format = plan.format;
    let authz = Arc::clone(storage.authz());
    let written = storage
        .write(ctx, control, move |conn| {
            check_role_rules(conn, &authz, is_admin, &plan.statements)?;
            if let Some((target, _)) = &plan.insert {
                if !is_admin && target.head.to_ascii_uppercase().contains("REPLACE") {
                    return Err(Error::new(
                        ErrorCode::AccessDenied,
                        "REPLACE conflict resolution is not allowed for this role",
                    ));
                }
            }
            let mut out = Output::new(format, &s, started, None);
            let wrap = plan.statements.len() > 1
                || plan.insert.is_some()
                || (plan.statements.len() == 1
                    && plan.statements[0].verb != "VACUUM"
                    && returns_rows(conn, &plan.statements[0])?);
            if wrap {
                conn.execute_batch("BEGIN IMMEDIATE")?;
            }
            let r = (|| -> Result<()> {
                run_all(conn, &plan.statements, &mut out, &slog)?;
                if let Some((target, data)) = &plan.insert {
                    run_insert(conn, target, data, &mut out.summary)?;
                }
                Ok(())
            })();
            if wrap {
                match &r {
                    Ok(()) => conn.execute_batch("COMMIT")?,
                    Err(_) => {
                        let _ = conn.execute_batch("ROLLBACK");
                    }
                }
            }
            r?;
            Ok(out.into_buffer())
        })
        .await;
    drop(turn);
    let (body, summary) = written?;
    let _ = tx.send(Msg::Done(body, summary)).await;
    Ok(())
}

/// Statement-level rules for non-admin roles that SQLite's authorizer cannot express:
/// - a CTE named like a view or trigger would pose as it (the authorizer names the inner-most
///   view, trigger *or CTE* as the accessor);
/// - REPLACE conflict resolution carries into the INSTEAD OF triggers of policy views, where it
///   would delete rows the role cannot see;
/// - VACUUM (and `VACUUM INTO 'file'`) is the admin's;
/// - SQLite compiles *every* expression of an UPDATE/DELETE on a view (SET, FROM, WHERE,
///   RETURNING) with the view as the accessor, so the authorizer cannot tell the view's own reads
///   from the caller's: such a statement may only use the view's columns, literals, parameters and
///   functions. Subqueries, CTEs, `UPDATE ... FROM` and `IN table` are refused; read first, then
///   write with the values.
pub(crate) fn check_role_rules(conn: &Connection, authz: &Authz, is_admin: bool, statements: &[Bound]) -> Result<()> {
    if is_admin {
        // Schema changes of CRR tables that would not merge (other roles get no DDL at all).
        for b in statements {
            crate::crdt::check_statement(conn, &b.verb, &b.sql)?;
        }
        return Ok(());
    }
    for b in statements {
        if let Some(t) = &b.write_target {
            if t.reads_other && authz.is_view(&t.name) {
                return Err(Error::new(
                    ErrorCode::AccessDenied,
                    format!(
                        "An UPDATE or DELETE through the view '{}' may only use the view's own columns, values and parameters: subqueries, CTEs, UPDATE ... FROM and IN <table> are not allowed for this role (read first, then write with the values)",
                        t.name
                    ),
                ));
            }
        }
        if let Some(name) = b.ctes.iter().find(|n| authz.is_schema_object(n)) {
            return Err(Error::new(
                ErrorCode::AccessDenied,
                format!("A CTE or window may not be named like the view or trigger '{name}'"),
            ));
        }
        if b.or_replace {
            return Err(Error::new(
                ErrorCode::AccessDenied,
                "REPLACE conflict resolution is not allowed for this role; use INSERT, UPDATE or INSERT ... ON CONFLICT on a table",
            ));
        }
        if b.verb == "VACUUM" {
            return Err(Error::new(
                ErrorCode::AccessDenied,
                "VACUUM is reserved for the admin",
            ));
        }
    }
    Ok(())
}

fn returns_rows(conn: &Connection, b: &Bound) -> Result<bool> {
    Ok(conn.prepare_cached(&b.sql)?.column_count() > 0)
}

/// Run every statement; only the last one's rows are returned.
fn run_all(
    conn: &Connection,
    statements: &[Bound],
    out: &mut Output<'_>,
    log: &StmtLog,
) -> Result<()> {
    for (i, b) in statements.iter().enumerate() {
        if i + 1 == statements.len() {
            run_statement(conn, b, Some(out), &mut Summary::default(), log)?;
        } else {
            run_statement(conn, b, None, &mut out.summary, log)?;
        }
    }
    Ok(())
}

/// Step one statement, formatting its rows into `out` (or discarding them), and log it.
fn run_statement(
    conn: &Connection,
    b: &Bound,
    out: Option<&mut Output<'_>>,
    side: &mut Summary,
    log: &StmtLog,
) -> Result<()> {
    let t = Instant::now();
    let mut rows = 0u64;
    let r = step_statement(conn, b, out, side, &mut rows);
    log.record(b, rows, t.elapsed(), r.as_ref().err());
    r
}

fn step_statement(
    conn: &Connection,
    b: &Bound,
    out: Option<&mut Output<'_>>,
    side: &mut Summary,
    counted: &mut u64,
) -> Result<()> {
    use rusqlite::fallible_streaming_iterator::FallibleStreamingIterator as _;
    let mut stmt = conn.prepare_cached(&b.sql)?;
    for (i, v) in b.values.iter().enumerate() {
        stmt.raw_bind_parameter(i + 1, v)?;
    }
    let dml = matches!(
        b.verb.as_str(),
        "INSERT" | "UPDATE" | "DELETE" | "REPLACE" | "WITH"
    );
    let before = dml.then(|| WriteCount::start(conn));
    // The result's columns are read after the first step: a cached statement whose schema
    // changed since it was prepared (an ALTER TABLE) is prepared again by that step, so its
    // columns are the new ones, never the stale preparation's.
    let mut rows = stmt.raw_query();
    rows.advance()?;
    let summary = match rows.get() {
        Some(first) => {
            let decls = column_decls(first.as_ref(), b);
            match out {
                Some(out) if !decls.is_empty() => {
                    // A SELECT without FROM, UNION or VALUES has at most one row: its integer
                    // literals get ClickHouse's narrow types (`SELECT 1` is UInt8).
                    let literals = if b.verb == "SELECT" {
                        literal_columns(&b.sql, decls.len())
                    } else {
                        Vec::new()
                    };
                    out.header(column_meta(&decls, Some(first), &literals));
                    *counted += 1;
                    let mut more = out.row(first)?;
                    while more {
                        match rows.next()? {
                            Some(r) => {
                                *counted += 1;
                                more = out.row(r)?
                            }
                            None => break,
                        }
                    }
                    &mut out.summary
                }
                out => {
                    *counted += 1;
                    while rows.next()?.is_some() {
                        *counted += 1;
                    }
                    match out {
                        Some(out) => &mut out.summary,
                        None => side,
                    }
                }
            }
        }
        None => {
            // No row: the step has run (and re-prepared if needed); the header comes from the
            // statement itself.
            drop(rows);
            match out {
                Some(out) => {
                    let decls = column_decls(&stmt, b);
                    if !decls.is_empty() {
                        out.header(column_meta(&decls, None, &[]));
                    }
                    &mut out.summary
                }
                None => side,
            }
        }
    };
    if let Some(before) = before {
        let changed = before.finish(conn);
        summary.written_rows += changed;
        *counted = (*counted).max(changed);
    }
    Ok(())
}

/// Name and declared type of each result column of `stmt`.
fn column_decls(stmt: &rusqlite::Statement<'_>, b: &Bound) -> Vec<(String, Option<String>)> {
    stmt.columns()
        .map(|c| {
            let decl = c.decl_type().map(str::to_string);
            let name = if decl.is_none() && c.name().contains('?') {
                param_column_name(c.name(), b)
            } else {
                c.name().to_string()
            };
            (name, decl)
        })
        .collect()
}

/// Rows a statement wrote: SQLite's change count (which includes what triggers write, so rows
/// written through a policy view's INSTEAD OF triggers count) minus the change-log rows
/// change-data-capture wrote meanwhile (bookkeeping, not the statement's rows).
pub(crate) struct WriteCount {
    total: u64,
    captured: u64,
}

impl WriteCount {
    pub(crate) fn start(conn: &Connection) -> WriteCount {
        WriteCount {
            total: conn.total_changes(),
            captured: crate::storage::capture::own_rows(),
        }
    }

    pub(crate) fn finish(self, conn: &Connection) -> u64 {
        let captured = crate::storage::capture::own_rows() - self.captured;
        (conn.total_changes() - self.total).saturating_sub(captured)
    }
}

/// The name of an expression column that holds parameters: SQLite names `SELECT ?1` after
/// its text, `?1`; ClickHouse substitutes `{x:Int64}` with `_CAST(5, 'Int64')` and names the
/// column after that, so each `?N` becomes the same text here.
fn param_column_name(name: &str, b: &Bound) -> String {
    let mut out = String::with_capacity(name.len() + 16);
    let mut rest = name;
    while let Some(q) = rest.find('?') {
        out.push_str(&rest[..q]);
        let after = &rest[q + 1..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        let idx = after[..digits].parse::<usize>().ok().filter(|i| *i >= 1);
        match idx.and_then(|i| Some((b.values.get(i - 1)?, b.types.get(i - 1)?))) {
            Some((v, ty)) => {
                let lit = match v {
                    Value::Null => "NULL".to_string(),
                    Value::Integer(n) => n.to_string(),
                    Value::Real(f) => f.to_string(),
                    Value::Text(t) => format!("'{}'", t.replace('\\', "\\\\").replace('\'', "\\'")),
                    Value::Blob(_) => "'<blob>'".to_string(),
                };
                out.push_str(&format!("_CAST({lit}, '{ty}')"));
                rest = &after[digits..];
            }
            None => {
                out.push('?');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn column_meta(
    decls: &[(String, Option<String>)],
    first: Option<&rusqlite::Row<'_>>,
    literals: &[bool],
) -> Vec<Column> {
    decls
        .iter()
        .enumerate()
        .map(|(i, (name, decl))| {
            let v = first.and_then(|r| r.get_ref(i).ok());
            Column {
                name: name.clone(),
                ty: match v {
                    Some(v) if literals.get(i) == Some(&true) && decl.is_none() => {
                        format::literal_type(v)
                    }
                    _ => format::column_type(decl.as_deref(), v),
                },
            }
        })
        .collect()
}

/// For a SELECT that names no table and combines no selects (one row at most): which of its
/// `n` result columns are integer literals (`1`, `-3`, `42 AS x`). Empty otherwise.
fn literal_columns(sql: &str, n: usize) -> Vec<bool> {
    use super::lexer::TokKind;
    let Ok(toks) = super::lexer::tokenize(sql) else {
        return Vec::new();
    };
    if toks.iter().any(|t| {
        ["FROM", "UNION", "VALUES", "INTERSECT", "EXCEPT", "WITH"]
            .iter()
            .any(|w| t.is_word(sql, w))
    }) {
        return Vec::new();
    }
    let mut items: Vec<Vec<&super::lexer::Token>> = vec![Vec::new()];
    let mut depth = 0i32;
    for t in toks.iter().skip(1) {
        match t.kind {
            TokKind::LParen => depth += 1,
            TokKind::RParen => depth -= 1,
            TokKind::Punct if depth == 0 && t.text(sql) == "," => {
                items.push(Vec::new());
                continue;
            }
            _ => {}
        }
        items.last_mut().unwrap().push(t);
    }
    if items.len() != n {
        return Vec::new();
    }
    items
        .iter()
        .map(|item| {
            let mut it = item.iter().peekable();
            if it.peek().is_some_and(|t| t.kind == TokKind::Punct && t.text(sql) == "-") {
                it.next();
            }
            let Some(num) = it.next() else { return false };
            let is_int = num.kind == TokKind::Word && num.text(sql).bytes().all(|b| b.is_ascii_digit());
            let rest: Vec<_> = it.collect();
            let alias_ok = match rest.as_slice() {
                [] => true,
                [a] => a.kind == TokKind::Word || a.kind == TokKind::QuotedIdent,
                [as_, a] => as_.is_word(sql, "AS") && matches!(a.kind, TokKind::Word | TokKind::QuotedIdent),
                _ => false,
            };
            is_int && alias_ok
        })
        .collect()
}

/// Insert rows of `data` (in the target's format) into the target table.
fn run_insert(
    conn: &Connection,
    target: &InsertTarget,
    data: &[u8],
    summary: &mut Summary,
) -> Result<()> {
    let fmt = Format::parse(&target.format)?;
    // RowBinary without names: the INSERT's columns (or the table's), typed as DESCRIBE says.
    let mut table_types = || -> Result<Vec<(String, String)>> {
        let st = conn.prepare(&format!("SELECT * FROM {} LIMIT 0", target.table))?;
        let all: Vec<(String, String)> = st
            .columns()
            .into_iter()
            .map(|c| {
                (
                    c.name().to_string(),
                    super::system::column_ch_type(c.decl_type().unwrap_or("")),
                )
            })
            .collect();
        match target.columns.as_deref() {
            None => Ok(all),
            Some(names) => names
                .iter()
                .map(|n| {
                    all.iter()
                        .find(|(c, _)| c.eq_ignore_ascii_case(n))
                        .cloned()
                        .ok_or_else(|| {
                            Error::new(
                                ErrorCode::UnknownIdentifier,
                                format!("No column {n} in table {}", target.table),
                            )
                        })
                })
                .collect(),
        }
    };
    let mut table_columns = || -> Result<Vec<String>> {
        let st = conn.prepare(&format!("SELECT * FROM {} LIMIT 0", target.table))?;
        Ok(st.column_names().into_iter().map(str::to_string).collect())
    };
    let mut insert_row = |cols: &[String], vals: Vec<Value>| -> Result<()> {
        let names: Vec<String> = cols.iter().map(|c| quote_ident(c)).collect();
        let marks: Vec<String> = (1..=cols.len()).map(|i| format!("?{i}")).collect();
        let sql = format!(
            "{} {} ({}) VALUES ({})",
            target.head,
            target.table,
            names.join(","),
            marks.join(",")
        );
        let mut st = conn.prepare_cached(&sql)?;
        for (i, v) in vals.iter().enumerate() {
            summary.written_bytes += match v {
                Value::Null => 1,
                Value::Integer(_) | Value::Real(_) => 8,
                Value::Text(t) => t.len() as u64,
                Value::Blob(b) => b.len() as u64,
            };
            st.raw_bind_parameter(i + 1, v)?;
        }
        st.raw_execute()?;
        Ok(())
    };
    let n = match fmt {
        Format::Native => super::binary::read_native(data, &mut insert_row)?,
        Format::RowBinary | Format::RowBinaryWithNamesAndTypes => super::binary::read_row_binary(
            data,
            fmt == Format::RowBinaryWithNamesAndTypes,
            &mut table_types,
            &mut insert_row,
        )?,
        _ => {
            let text = std::str::from_utf8(data).map_err(|e| {
                Error::new(
                    ErrorCode::IncorrectData,
                    format!(
                        "Insert data in format {} is not valid UTF-8 (at byte {})",
                        fmt.name(),
                        e.valid_up_to()
                    ),
                )
            })?;
            input::for_each_row(
                fmt,
                text,
                target.columns.as_deref(),
                &mut table_columns,
                &mut insert_row,
            )?
        }
    };
    summary.written_rows += n;
    Ok(())
}

/// Formats rows, enforces result limits and hands bytes to the HTTP layer.
pub(crate) struct Output<'s> {
    writer: format::Writer,
    buf: Vec<u8>,
    settings: &'s QuerySettings,
    started: Instant,
    /// `None` on the writer: everything is buffered and sent after commit.
    tx: Option<Spool>,
    streaming: bool,
    /// A result set was started (header written), so a footer belongs at the end.
    has_header: bool,
    summary: Summary,
    /// Set when a limit stopped the result in `break` mode.
    truncated: bool,
    /// An inline run's cap on the answer (see [`InlineReads::max_bytes`]).
    inline_cap: Option<usize>,
    /// The answer outgrew `inline_cap`: the attempt stopped and must run again on the pool.
    over_inline_cap: bool,
}

impl<'s> Output<'s> {
    pub(crate) fn new(
        format: Format,
        settings: &'s QuerySettings,
        started: Instant,
        tx: Option<Spool>,
    ) -> Self {
        Output {
            writer: format::Writer::new(format, settings.quote_i64),
            buf: Vec::with_capacity(8 * 1024),
            settings,
            started,
            tx,
            streaming: false,
            has_header: false,
            summary: Summary::default(),
            truncated: false,
            inline_cap: None,
            over_inline_cap: false,
        }
    }

    pub(crate) fn header(&mut self, cols: Vec<Column>) {
        self.has_header = true;
        self.writer.header(cols, &mut self.buf);
    }

    /// Write one row; `Ok(false)` once a limit stops the result in break mode.
    pub(crate) fn row<R: format::RowValues + ?Sized>(&mut self, r: &R) -> Result<bool> {
        let s = self.settings;
        if s.max_result_rows > 0 && self.summary.result_rows >= s.max_result_rows {
            return self.limit(format!(
                "Limit for result exceeded, max rows: {} (max_result_rows)",
                s.max_result_rows
            ));
        }
        let before = self.buf.len();
        let bytes = self.writer.row(r, &mut self.buf)?;
        self.summary.result_rows += 1;
        self.summary.read_rows += 1;
        self.summary.read_bytes += bytes;
        self.summary.result_bytes += (self.buf.len() - before) as u64;
        if s.max_result_bytes > 0 && self.summary.result_bytes > s.max_result_bytes {
            return self.limit(format!(
                "Limit for result exceeded, max bytes: {} (max_result_bytes)",
                s.max_result_bytes
            ));
        }
        if self.inline_cap.is_some_and(|cap| self.buf.len() > cap) {
            self.over_inline_cap = true;
            return Err(Error::internal("inline answer cap reached"));
        }
        self.flush()?;
        if self.buf.len() > s.max_buffered {
            return Err(Error::new(
                ErrorCode::MemoryLimitExceeded,
                format!(
                    "The answer held in memory exceeds {} bytes (max_buffered_result_bytes in the [sql_guard] section): a write's RETURNING rows and wait_end_of_query=1 answers are held whole; stream a SELECT instead",
                    s.max_buffered
                ),
            ));
        }
        Ok(true)
    }

    fn limit(&mut self, why: String) -> Result<bool> {
        if self.settings.overflow_break {
            self.truncated = true;
            Ok(false)
        } else {
            Err(Error::new(ErrorCode::TooManyRowsOrBytes, why))
        }
    }

    fn elapsed(&mut self) {
        self.summary.elapsed_ns = self.started.elapsed().as_nanos() as u64;
    }

    /// Send buffered bytes once a streaming threshold is reached.
    fn flush(&mut self) -> Result<()> {
        if self.tx.is_none() {
            return Ok(());
        }
        let threshold = if self.streaming {
            CHUNK
        } else {
            self.settings.buffer_size
        };
        if self.buf.len() < threshold {
            return Ok(());
        }
        self.elapsed();
        let summary = self.summary;
        let tx = self.tx.as_mut().expect("checked above");
        let bytes = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(CHUNK + 4096),
        ));
        self.streaming = true;
        // Never blocks: a slow client's chunks queue in the spool, not on this connection.
        tx.push(bytes, summary)
    }

    /// The spool, when the query failed: chunks already queued still go out before the error.
    pub(crate) fn take_spool(&mut self) -> Option<Spool> {
        self.tx.take()
    }

    fn write_footer(&mut self) {
        self.elapsed();
        if !self.has_header {
            return;
        }
        let stats = Stats {
            elapsed_secs: self.summary.elapsed_ns as f64 / 1e9,
            rows_read: self.summary.read_rows,
            bytes_read: self.summary.read_bytes,
        };
        self.writer.footer(&stats, &mut self.buf);
    }

    /// Finish on a reader: send the rest as `Done`. When a slow client still has chunks
    /// queued, the spool and the final message come back to be drained once the connection is
    /// free again.
    pub(crate) fn finish(mut self) -> Option<(Spool, Msg)> {
        self.write_footer();
        let mut spool = self.tx.take()?;
        let last = Msg::Done(Bytes::from(std::mem::take(&mut self.buf)), self.summary);
        spool.try_finish(last).map(|m| (spool, m))
    }

    /// Finish on the writer: the whole answer, sent after commit.
    fn into_buffer(mut self) -> (Bytes, Summary) {
        self.write_footer();
        (Bytes::from(self.buf), self.summary)
    }
}
