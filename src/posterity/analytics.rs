//! Read-only SQL on DuckDB: `POST /analytics` and Lua's `analytics.query`.
//!
//! The request side is the SQL endpoint's (URL settings, `{name:Type}` parameters bound from
//! `param_*` values, formats, limits, headers, streaming) — only the engine differs. DuckDB's
//! SQL is not SQLite's (`::` casts, `{'a': 1}` struct literals, `$$` strings), so placeholders
//! are found by a DuckDB-aware scanner here and rewritten to `?N`; values are checked by the
//! shared [`crate::sql::params`] code.
//!
//! ## Read-only, by DuckDB's means
//! Every query is parsed by DuckDB (`json_serialize_sql`): it must be exactly one `SELECT`
//! (DuckDB serialises nothing else), and it runs inside `BEGIN TRANSACTION READ ONLY`, so a
//! write anywhere (even one hidden in a function) fails with DuckDB's read-only error. File
//! access is limited to the archive directory for everyone (see [`super::Posterity::open`]).
//!
//! ## Who may query what
//! The admin may query everything. Another role may reference **only views an admin granted to
//! it** (`PUT /admin/analytics/views/{name}` with `roles`), plus its own CTEs where they are in
//! scope: the query's syntax tree is walked by scope ([`super::guard`]), and any other table,
//! view, file (`FROM 'x.parquet'`) or table function (`read_parquet`, `app_table`,
//! `duckdb_tables()`...) is refused, as are functions that reveal settings (`current_setting`,
//! `duckdb_*`...), a CTE named like an existing table or view or like a path, and sizes of
//! generated values (`range(150000000)`) past `max_generated_elements`. Anonymous clients are
//! refused outright unless a view is granted to `anon` (and `anon_allowed`). Granted views
//! usually filter on the caller, which every query can read with `getvariable('user_id')` and
//! `getvariable('role')` — set by the engine on the query's own connection before the query
//! runs, out of the caller's reach (`SET` is not a `SELECT`).
//!
//! ## Resources
//! DuckDB runs with the `[analytics]` section's `memory_limit`, `threads` and
//! `max_temp_directory_size` (see [`super::AnalyticsSettings`]). A watchdog thread interrupts
//! the query (DuckDB's interrupt) at the request deadline, when the client disconnects, and when
//! the server's resident memory grew by `memory_guard_bytes` since the query started. Results
//! are capped at `max_result_rows`/`max_result_bytes` (a request may only lower them).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{RecvTimeoutError, sync_channel};
use std::time::Duration;

use duckdb::core::LogicalTypeId;
use duckdb::types::{TimeUnit, Value as DValue, ValueRef as DRef};
use rusqlite::types::Value as SqlValue;
use serde_json::{Map, Value as Json};
use tokio::sync::mpsc;

use super::AnalyticsSettings;
use super::{Posterity, duck_err, sql_str};
use crate::core::{Error, ErrorCode, RequestContext, Result, Role};
use crate::sql::exec::{Msg, Output, QuerySettings};
use crate::sql::format::{Column, Format};
use crate::sql::params;
use crate::sql::parse::Placeholder;
use crate::storage::ExecControl;

/// A query ready to bind: `{name:Type}` placeholders replaced by `?N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    pub sql: String,
    /// Placeholder `i` is `?{i+1}` (a name used twice shares one index).
    pub params: Vec<Placeholder>,
    /// A trailing `FORMAT X`.
    pub format: Option<String>,
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Find `{name:Type}` placeholders and a trailing `FORMAT X` outside literals and comments.
/// A `{` that does not open a placeholder (a struct literal) is left as it is.
pub fn compile(text: &str) -> Result<Compiled> {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut params: Vec<Placeholder> = Vec::new();
    // (start, end) of bare words outside literals, in `out` coordinates.
    let mut words: Vec<(usize, usize)> = Vec::new();
    let mut last_code_end = 0usize;
    let mut i = 0;
    let copy_until = |out: &mut String, from: usize, to: usize| out.push_str(&text[from..to]);
    while i < b.len() {
        let c = b[i];
        let start = i;
        match c {
            // (each arm advances `i` by at least one character)
            b'\'' | b'"' => {
                let mut j = i + 1;
                loop {
                    match text[j..].find(c as char) {
                        None => {
                            return Err(Error::syntax(format!(
                                "Unterminated {} starting at offset {start}",
                                if c == b'\'' {
                                    "string literal"
                                } else {
                                    "quoted identifier"
                                }
                            )));
                        }
                        Some(k) => {
                            j += k + 1;
                            if j < b.len() && b[j] == c {
                                j += 1;
                                continue;
                            }
                            break;
                        }
                    }
                }
                copy_until(&mut out, i, j);
                i = j;
                last_code_end = out.len();
            }
            b'-' if text[i..].starts_with("--") => {
                let j = text[i..].find('\n').map_or(b.len(), |k| i + k + 1);
                copy_until(&mut out, i, j);
                i = j;
            }
            b'/' if text[i..].starts_with("/*") => {
                let j = text[i + 2..].find("*/").map_or(b.len(), |k| i + 2 + k + 2);
                copy_until(&mut out, i, j);
                i = j;
            }
            b'$' if text[i + 1..].starts_with('$')
                || text[i + 1..]
                    .find('$')
                    .is_some_and(|k| k > 0 && text[i + 1..i + 1 + k].chars().all(is_ident)) =>
            {
                // Dollar-quoted string: $$...$$ or $tag$...$tag$.
                let k = text[i + 1..].find('$').expect("checked");
                let tag = &text[i..i + k + 2];
                let body = i + tag.len();
                let j = text[body..]
                    .find(tag)
                    .map(|e| body + e + tag.len())
                    .ok_or_else(|| {
                        Error::syntax(format!("Unterminated dollar-quoted string at offset {i}"))
                    })?;
                copy_until(&mut out, i, j);
                i = j;
                last_code_end = out.len();
            }
            b'{' => {
                if let Some((name, ty, len)) = placeholder_at(&text[i..]) {
                    let idx = match params.iter().position(|p| p.name == name) {
                        Some(k) => {
                            if params[k].ty != ty {
                                return Err(Error::syntax(format!(
                                    "Query parameter '{name}' is declared with two types: {} and {ty}",
                                    params[k].ty
                                )));
                            }
                            k
                        }
                        None => {
                            params.push(Placeholder {
                                name: name.to_string(),
                                ty: ty.to_string(),
                            });
                            params.len() - 1
                        }
                    };
                    let _ = write!(out, "?{}", idx + 1);
                    i += len;
                } else {
                    out.push('{');
                    i += 1;
                }
                last_code_end = out.len();
            }
            _ if text[i..]
                .chars()
                .next()
                .is_some_and(|ch| ch.is_alphabetic() || ch == '_') =>
            {
                let j = text[i..]
                    .char_indices()
                    .find(|(_, ch)| !is_ident(*ch))
                    .map_or(b.len(), |(k, _)| i + k);
                let s = out.len();
                copy_until(&mut out, i, j);
                words.push((s, out.len()));
                i = j;
                last_code_end = out.len();
            }
            c if c.is_ascii_whitespace() || c == b';' => {
                out.push(c as char);
                i += 1;
            }
            _ => {
                let ch = text[i..].chars().next().expect("in bounds");
                out.push(ch);
                i += ch.len_utf8();
                last_code_end = out.len();
            }
        }
    }
    let mut format = None;
    if let [.., (fs, fe), (ns, ne)] = words[..] {
        if out[fs..fe].eq_ignore_ascii_case("FORMAT") && ne == last_code_end && fe < ns {
            if out[fe..ns].trim().is_empty() {
                format = Some(out[ns..ne].to_string());
                out.truncate(fs);
            }
        }
    }
    let sql = out.trim_end().trim_end_matches(';').trim_end().to_string();
    if sql.is_empty() {
        return Err(Error::syntax("Empty query"));
    }
    Ok(Compiled {
        sql,
        params,
        format,
    })
}

/// `{name:Type}` at the start of `s`: (name, type, length in bytes).
fn placeholder_at(s: &str) -> Option<(&str, &str, usize)> {
    let close = s.find('}')?;
    let inner = &s[1..close];
    let (name, ty) = inner.split_once(':')?;
    let (name, ty) = (name.trim(), ty.trim());
    let ok_name = !name.is_empty()
        && name.chars().all(is_ident)
        && !name.chars().next().is_some_and(|c| c.is_ascii_digit());
    let ok_ty = ty.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && ty
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '(' | ')' | ',' | ' ' | '_'));
    (ok_name && ok_ty).then_some((name, ty, close + 1))
}

fn to_duck(v: SqlValue) -> DValue {
    match v {
        SqlValue::Null => DValue::Null,
        SqlValue::Integer(i) => DValue::BigInt(i),
        SqlValue::Real(f) => DValue::Double(f),
        SqlValue::Text(s) => DValue::Text(s),
        SqlValue::Blob(b) => DValue::Blob(b),
    }
}

/// Days since 1970-01-01 to (year, month, day) (proleptic Gregorian).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn date_text(days: i64) -> String {
    let (y, m, d) = civil(days);
    format!("{y:04}-{m:02}-{d:02}")
}

fn timestamp_text(unit: TimeUnit, v: i64) -> String {
    let us = match unit {
        TimeUnit::Second => v.saturating_mul(1_000_000),
        TimeUnit::Millisecond => v.saturating_mul(1000),
        TimeUnit::Microsecond => v,
        TimeUnit::Nanosecond => v.div_euclid(1000),
    };
    let days = us.div_euclid(86_400_000_000);
    let rest = us.rem_euclid(86_400_000_000);
    let (h, mi, s, frac) = (
        rest / 3_600_000_000,
        rest / 60_000_000 % 60,
        rest / 1_000_000 % 60,
        rest % 1_000_000,
    );
    format!("{} {h:02}:{mi:02}:{s:02}.{frac:06}", date_text(days))
}

fn to_json(v: &DValue) -> Json {
    match v {
        DValue::Null => Json::Null,
        DValue::Boolean(b) => Json::Bool(*b),
        DValue::TinyInt(i) => (*i).into(),
        DValue::SmallInt(i) => (*i).into(),
        DValue::Int(i) => (*i).into(),
        DValue::BigInt(i) => (*i).into(),
        DValue::UTinyInt(i) => (*i).into(),
        DValue::USmallInt(i) => (*i).into(),
        DValue::UInt(i) => (*i).into(),
        DValue::UBigInt(i) => (*i).into(),
        DValue::HugeInt(i) => Json::String(i.to_string()),
        DValue::UHugeInt(i) => Json::String(i.to_string()),
        DValue::Float(f) => {
            serde_json::Number::from_f64(f64::from(*f)).map_or(Json::Null, Json::Number)
        }
        DValue::Double(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        DValue::Decimal(d) => Json::String(d.to_string()),
        DValue::Timestamp(u, t) => Json::String(timestamp_text(*u, *t)),
        DValue::Text(s) | DValue::Enum(s) => Json::String(s.clone()),
        DValue::Blob(b) | DValue::Geometry(b) => {
            Json::String(String::from_utf8_lossy(b).into_owned())
        }
        DValue::Date32(d) => Json::String(date_text(i64::from(*d))),
        DValue::List(l) | DValue::Array(l) => Json::Array(l.iter().map(to_json).collect()),
        DValue::Struct(m) => Json::Object(m.iter().map(|(k, v)| (k.clone(), to_json(v))).collect()),
        DValue::Map(m) => Json::Array(
            m.iter()
                .map(|(k, v)| Json::Array(vec![to_json(k), to_json(v)]))
                .collect(),
        ),
        DValue::Union(v) => to_json(v),
        other => Json::String(format!("{other:?}")),
    }
}

/// A DuckDB value as the shared writers see values (SQLite's storage classes).
fn to_sql(v: DRef<'_>) -> SqlValue {
    match v {
        DRef::Null => SqlValue::Null,
        DRef::Boolean(b) => SqlValue::Integer(i64::from(b)),
        DRef::TinyInt(i) => SqlValue::Integer(i64::from(i)),
        DRef::SmallInt(i) => SqlValue::Integer(i64::from(i)),
        DRef::Int(i) => SqlValue::Integer(i64::from(i)),
        DRef::BigInt(i) => SqlValue::Integer(i),
        DRef::UTinyInt(i) => SqlValue::Integer(i64::from(i)),
        DRef::USmallInt(i) => SqlValue::Integer(i64::from(i)),
        DRef::UInt(i) => SqlValue::Integer(i64::from(i)),
        DRef::UBigInt(i) => {
            i64::try_from(i).map_or_else(|_| SqlValue::Text(i.to_string()), SqlValue::Integer)
        }
        DRef::HugeInt(i) => {
            i64::try_from(i).map_or_else(|_| SqlValue::Text(i.to_string()), SqlValue::Integer)
        }
        DRef::UHugeInt(i) => {
            i64::try_from(i).map_or_else(|_| SqlValue::Text(i.to_string()), SqlValue::Integer)
        }
        DRef::Float(f) => SqlValue::Real(f64::from(f)),
        DRef::Double(f) => SqlValue::Real(f),
        DRef::Decimal(d) => d
            .to_string()
            .parse::<f64>()
            .map_or_else(|_| SqlValue::Text(d.to_string()), SqlValue::Real),
        DRef::Timestamp(u, t) => SqlValue::Text(timestamp_text(u, t)),
        DRef::Date32(d) => SqlValue::Text(date_text(i64::from(d))),
        DRef::Text(t) => SqlValue::Text(String::from_utf8_lossy(t).into_owned()),
        DRef::Blob(b) => SqlValue::Blob(b.to_vec()),
        other => match to_json(&other.to_owned()) {
            Json::String(s) => SqlValue::Text(s),
            j => SqlValue::Text(j.to_string()),
        },
    }
}

fn type_name(id: LogicalTypeId) -> &'static str {
    use LogicalTypeId as T;
    match id {
        T::Boolean => "Bool",
        T::Tinyint => "Int8",
        T::Smallint => "Int16",
        T::Integer => "Int32",
        T::Bigint => "Int64",
        T::UTinyint => "UInt8",
        T::USmallint => "UInt16",
        T::UInteger => "UInt32",
        T::UBigint => "UInt64",
        T::Hugeint => "Int128",
        T::Float => "Float32",
        T::Double | T::Decimal => "Float64",
        T::Timestamp | T::TimestampMs | T::TimestampS | T::TimestampNs | T::TimestampTZ => {
            "DateTime64(6)"
        }
        T::Date => "Date",
        T::Uuid => "UUID",
        _ => "String",
    }
}

/// Views granted to `role`, lower-cased.
fn granted_views(conn: &duckdb::Connection, role: &str) -> Result<HashSet<String>> {
    let mut st = conn
        .prepare("SELECT lower(view_name) FROM analytics_grants WHERE role = ?")
        .map_err(duck_err)?;
    let views = st
        .query_map([role], |r| r.get::<_, String>(0))
        .map_err(duck_err)?
        .flatten()
        .collect();
    Ok(views)
}

/// Refuse what a non-admin role may not reference (see the module docs and [`super::guard`]).
fn check_role(
    conn: &duckdb::Connection,
    ctx: &RequestContext,
    ast: &Json,
    granted: &HashSet<String>,
    limits: &AnalyticsSettings,
) -> Result<()> {
    let role = ctx.role.as_str();
    let found = super::guard::scan(ast, limits.max_generated_elements)?;
    if !found.ctes.is_empty() {
        let mut st = conn
            .prepare(
                "SELECT lower(table_name) FROM duckdb_tables() UNION SELECT lower(view_name) FROM duckdb_views()",
            )
            .map_err(duck_err)?;
        let objects: HashSet<String> = st
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(duck_err)?
            .flatten()
            .collect();
        if let Some(c) = found.ctes.iter().find(|c| objects.contains(*c)) {
            return Err(Error::new(
                ErrorCode::AccessDenied,
                format!("A CTE may not be named like the table or view '{c}'"),
            ));
        }
    }
    for (catalog, schema, name) in found.refs {
        let plain = catalog.is_empty() && (schema.is_empty() || schema == "main");
        if !(plain && granted.contains(&name)) {
            let shown = [catalog.as_str(), schema.as_str(), name.as_str()]
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect::<Vec<_>>()
                .join(".");
            return Err(Error::new(
                ErrorCode::AccessDenied,
                format!(
                    "Role '{role}' may query only the analytics views granted to it; '{shown}' is not one of them"
                ),
            ));
        }
    }
    Ok(())
}

/// Parse with DuckDB: one SELECT, and what this role may reference.
fn check(
    conn: &duckdb::Connection,
    ctx: &RequestContext,
    sql: &str,
    limits: &AnalyticsSettings,
) -> Result<()> {
    // Anonymous clients get nothing unless a view is granted to them (before any parsing).
    let granted = if ctx.is_admin() {
        HashSet::new()
    } else {
        granted_views(conn, ctx.role.as_str())?
    };
    if ctx.role == Role::Anon && (!limits.anon_allowed || granted.is_empty()) {
        return Err(Error::new(
            ErrorCode::AccessDenied,
            "Analytics needs signing in: no analytics view is granted to anonymous clients",
        ));
    }
    let text: String = conn
        .query_row(
            &format!("SELECT json_serialize_sql({})", sql_str(sql)),
            [],
            |r| r.get(0),
        )
        .map_err(duck_err)?;
    let ast: Json = serde_json::from_str(&text)
        .map_err(|e| Error::internal(format!("json_serialize_sql: {e}")))?;
    if ast.get("error").and_then(Json::as_bool) == Some(true) {
        let msg = ast
            .get("error_message")
            .and_then(Json::as_str)
            .unwrap_or("cannot parse");
        if msg.contains("Only SELECT") {
            return Err(Error::new(
                ErrorCode::Readonly,
                "Analytics is read-only: only SELECT queries (FROM, WITH, SUMMARIZE, DESCRIBE...) run here",
            ));
        }
        return Err(Error::syntax(msg.to_string()));
    }
    let n = ast
        .get("statements")
        .and_then(Json::as_array)
        .map_or(0, Vec::len);
    if n != 1 {
        return Err(Error::syntax(format!(
            "One statement per analytics query, got {n}"
        )));
    }
    if !ctx.is_admin() {
        check_role(conn, ctx, &ast, &granted, limits)?;
    }
    Ok(())
}

/// Run `sql` with `values` as `ctx`: `on_header` gets the columns, `on_row` each row
/// (return `false` to stop). Blocking.
pub fn execute(
    p: &Posterity,
    ctx: &RequestContext,
    control: &Arc<ExecControl>,
    sql: &str,
    values: Vec<SqlValue>,
    on_header: &mut dyn FnMut(Vec<Column>),
    on_row: &mut dyn FnMut(&[SqlValue]) -> Result<bool>,
) -> Result<u64> {
    control.check()?;
    let limits = &p.options().analytics;
    let conn = p.connect()?;
    check(&conn, ctx, sql, limits)?;
    conn.execute_batch(&format!(
        "SET VARIABLE user_id = {}; SET VARIABLE role = {}; SET VARIABLE trace_id = {}; BEGIN TRANSACTION READ ONLY;",
        ctx.user_id.as_deref().map_or("NULL".to_string(), sql_str),
        sql_str(ctx.role.as_str()),
        sql_str(&ctx.trace_id),
    ))
    .map_err(duck_err)?;
    // Interrupt the query at the deadline, when the client goes away, or when the server's
    // memory grows past the guard (allocations DuckDB's memory_limit does not see).
    let (done_tx, done_rx) = sync_channel::<()>(1);
    let ih = conn.interrupt_handle();
    let c2 = Arc::clone(control);
    let guard = limits.memory_guard_bytes;
    let over_memory = Arc::new(AtomicBool::new(false));
    let over2 = Arc::clone(&over_memory);
    let watchdog = std::thread::Builder::new()
        .name("analytics-watchdog".into())
        .spawn(move || {
            let base = resident_bytes();
            loop {
                match done_rx.recv_timeout(Duration::from_millis(50)) {
                    Err(RecvTimeoutError::Timeout) => {
                        if c2.should_stop() {
                            ih.interrupt();
                            return;
                        }
                        if guard > 0 {
                            if let (Some(b), Some(now)) = (base, resident_bytes()) {
                                if now > b.saturating_add(guard) {
                                    over2.store(true, Ordering::Relaxed);
                                    ih.interrupt();
                                    return;
                                }
                            }
                        }
                    }
                    _ => return,
                }
            }
        })
        .map_err(|e| Error::internal(format!("analytics watchdog: {e}")))?;
    let result = (|| -> Result<u64> {
        let mut st = conn.prepare(sql).map_err(duck_err)?;
        let mut rows = st
            .query(duckdb::params_from_iter(values.into_iter().map(to_duck)))
            .map_err(duck_err)?;
        let ncols;
        {
            let stmt = rows
                .as_ref()
                .ok_or_else(|| Error::internal("no statement"))?;
            ncols = stmt.column_count();
            let cols = (0..ncols)
                .map(|i| Column {
                    name: stmt.column_name(i).cloned().unwrap_or_default(),
                    ty: type_name(stmt.column_logical_type(i).id()).to_string(),
                })
                .collect();
            on_header(cols);
        }
        let mut n = 0u64;
        let mut buf: Vec<SqlValue> = Vec::with_capacity(ncols);
        while let Some(row) = rows.next().map_err(duck_err)? {
            buf.clear();
            for i in 0..ncols {
                buf.push(to_sql(row.get_ref(i).map_err(duck_err)?));
            }
            n += 1;
            if !on_row(&buf)? {
                break;
            }
        }
        Ok(n)
    })();
    let _ = done_tx.send(());
    let _ = watchdog.join();
    let _ = conn.execute_batch("ROLLBACK");
    result.map_err(|e| {
        if over_memory.load(Ordering::Relaxed) {
            Error::new(
                ErrorCode::MemoryLimitExceeded,
                format!(
                    "Memory limit exceeded: the server grew by more than {} bytes during this analytics query (memory_guard_bytes)",
                    guard
                ),
            )
        } else if e.code == ErrorCode::QueryWasCancelled || control.should_stop() {
            control.stop_error()
        } else {
            e
        }
    })
}

/// Resident memory of this process (Linux), bytes.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).unwrap_or(4096))
}

/// The lower of a requested limit and a configured cap (0 means none).
fn capped(requested: u64, cap: u64) -> u64 {
    match (requested, cap) {
        (r, 0) => r,
        (0, c) => c,
        (r, c) => r.min(c),
    }
}

/// Start an analytics request; output arrives as the SQL endpoint's messages.
pub fn start(
    p: Posterity,
    ctx: RequestContext,
    control: Arc<ExecControl>,
    text: String,
    mut settings: QuerySettings,
) -> (Format, mpsc::Receiver<Msg>) {
    let (tx, rx) = mpsc::channel(8);
    let limits = &p.options().analytics;
    settings.max_result_rows = capped(settings.max_result_rows, limits.max_result_rows);
    settings.max_result_bytes = capped(settings.max_result_bytes, limits.max_result_bytes);
    let compiled = compile(&text).and_then(|c| {
        if c.sql.len() > settings.max_query_size {
            return Err(Error::new(
                ErrorCode::RequestTooLarge,
                format!(
                    "Max query size exceeded: {} bytes of SQL, limit {} (max_query_size)",
                    c.sql.len(),
                    settings.max_query_size
                ),
            ));
        }
        let format = match &c.format {
            Some(f) => Format::parse(f)?,
            None => settings.default_format.unwrap_or(Format::TabSeparated),
        };
        let values = c
            .params
            .iter()
            .map(|ph| {
                let raw = settings.params.get(&ph.name).ok_or_else(|| {
                    Error::new(
                        ErrorCode::UnknownQueryParameter,
                        format!(
                            "Substitution `{}` is not set: pass param_{}=<{}> in the URL",
                            ph.name, ph.name, ph.ty
                        ),
                    )
                })?;
                params::bind_value(&ph.name, &ph.ty, raw)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((c, format, values))
    });
    let format = match &compiled {
        Ok((_, f, _)) => *f,
        Err(_) => settings.default_format.unwrap_or(Format::TabSeparated),
    };
    tokio::task::spawn_blocking(move || {
        let (c, format, values) = match compiled {
            Ok(x) => x,
            Err(e) => {
                let _ = tx.blocking_send(Msg::Error(e));
                return;
            }
        };
        let spool = crate::sql::spool::Spool::new(tx.clone(), settings.spool.clone());
        let mut out = Output::new(format, &settings, ctx.started, Some(spool));
        let out_cell = std::cell::RefCell::new(&mut out);
        let r = execute(
            &p,
            &ctx,
            &control,
            &c.sql,
            values,
            &mut |cols| out_cell.borrow_mut().header(cols),
            &mut |row| out_cell.borrow_mut().row(row),
        );
        // A slow client's chunks drain on the runtime, not on this thread.
        let rt = tokio::runtime::Handle::current();
        match r {
            Ok(_) => {
                if let Some((spool, last)) = out.finish() {
                    rt.spawn(spool.drain(last));
                }
            }
            Err(e) => match out.take_spool() {
                Some(spool) if !spool.is_idle() => {
                    rt.spawn(spool.drain(Msg::Error(e)));
                }
                _ => {
                    let _ = tx.blocking_send(Msg::Error(e));
                }
            },
        }
    });
    (format, rx)
}

/// Run `sql` with JSON `params` (for `{name:Type}` placeholders), at most `max_rows` rows.
pub fn query_json(
    p: &Posterity,
    ctx: &RequestContext,
    control: &Arc<ExecControl>,
    sql: &str,
    params_in: &Map<String, Json>,
    max_rows: u64,
    max_sql: usize,
) -> Result<crate::sql::embedded::Rows> {
    if sql.len() > max_sql {
        return Err(Error::new(
            ErrorCode::RequestTooLarge,
            format!(
                "SQL of {} bytes is over the limit of {max_sql} (max_query_size)",
                sql.len()
            ),
        ));
    }
    let max_rows = capped(max_rows, p.options().analytics.max_result_rows);
    let c = compile(sql)?;
    if c.format.is_some() {
        return Err(Error::new(
            ErrorCode::BadArguments,
            "FORMAT clauses are for HTTP; analytics.query returns rows",
        ));
    }
    let values = c
        .params
        .iter()
        .map(|ph| {
            let v = params_in.get(&ph.name).ok_or_else(|| {
                Error::new(
                    ErrorCode::UnknownQueryParameter,
                    format!(
                        "Parameter `{}` ({}) is missing from the parameters table",
                        ph.name, ph.ty
                    ),
                )
            })?;
            params::bind_json(&ph.name, &ph.ty, v)
        })
        .collect::<Result<Vec<_>>>()?;
    let cols = std::cell::RefCell::new(Vec::new());
    let mut rows: Vec<Vec<SqlValue>> = Vec::new();
    execute(
        p,
        ctx,
        control,
        &c.sql,
        values,
        &mut |cs| *cols.borrow_mut() = cs.into_iter().map(|c| c.name).collect(),
        &mut |row| {
            if max_rows > 0 && rows.len() as u64 >= max_rows {
                return Err(Error::new(
                    ErrorCode::TooManyRowsOrBytes,
                    format!("analytics.query: more than {max_rows} rows; aggregate or add LIMIT"),
                ));
            }
            rows.push(row.to_vec());
            Ok(true)
        },
    )?;
    Ok(crate::sql::embedded::Rows {
        columns: cols.into_inner(),
        rows,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_and_format() {
        let c = compile("SELECT {a:Int64} + {a:Int64}, {b:String}, {'x': 1}, 1::INT, '{c:String}' FROM t FORMAT JSON;").unwrap();
        assert_eq!(
            c.sql,
            "SELECT ?1 + ?1, ?2, {'x': 1}, 1::INT, '{c:String}' FROM t"
        );
        assert_eq!(c.params.len(), 2);
        assert_eq!(c.format.as_deref(), Some("JSON"));
        let c =
            compile("SELECT 'é' AS café,\u{a0}1 → 2, '{x:Int8}' || {y:Int8} FORMAT CSV").unwrap();
        assert_eq!(c.sql, "SELECT 'é' AS café,\u{a0}1 → 2, '{x:Int8}' || ?1");
        assert_eq!(c.format.as_deref(), Some("CSV"));
        let c = compile("SELECT 'FORMAT JSON' -- FORMAT CSV\n").unwrap();
        assert_eq!(c.format, None);
        let c = compile("SELECT $$ {x:String} $$, x AS format").unwrap();
        assert!(c.params.is_empty());
        assert_eq!(c.format, None);
        assert!(compile("SELECT 'abc").is_err());
    }

    #[test]
    fn scanner_never_panics() {
        let parts = [
            "",
            "{",
            "{a:",
            "}",
            "$",
            "$$",
            "$a",
            "$a$",
            "'",
            "\"",
            "é",
            "{é:String}",
            "--",
            "/*",
            "*/",
            "\u{a0}",
            "\u{85}",
            "→",
            ";",
            "FORMAT",
            " ",
            "x",
            "{b:Int8}",
            "\n",
            "日本",
        ];
        for a in parts {
            for b in parts {
                for c in parts {
                    let _ = compile(&format!("{a}{b}{c}"));
                    let _ = compile(&format!("SELECT {a} {b}{c}"));
                }
            }
        }
    }

    #[test]
    fn dates() {
        assert_eq!(date_text(0), "1970-01-01");
        assert_eq!(date_text(20_000), "2024-10-04");
        assert_eq!(date_text(-1), "1969-12-31");
        assert_eq!(
            timestamp_text(TimeUnit::Microsecond, 1_700_000_000_123_456),
            "2023-11-14 22:13:20.123456"
        );
    }
}

/// An admin-defined analytics view and the roles it is granted to.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ViewInfo {
    pub name: String,
    pub sql: String,
    pub roles: Vec<String>,
}

fn check_view_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if !ok {
        return Err(Error::new(
            ErrorCode::BadArguments,
            format!("View name '{name}' must be lower-case letters, digits and '_' (not first)"),
        ));
    }
    if super::ENGINE_OBJECTS.contains(&name)
        || name.starts_with("duckdb_")
        || name.starts_with("pg_")
    {
        return Err(Error::new(
            ErrorCode::BadArguments,
            format!("'{name}' is the name of one of the engine's own objects"),
        ));
    }
    Ok(())
}

impl Posterity {
    /// Create or replace the analytics view `name` as `sql` (one SELECT) and grant it to
    /// `roles` (replacing earlier grants). Blocking.
    pub fn define_view(&self, name: &str, sql: &str, roles: &[String]) -> Result<ViewInfo> {
        check_view_name(name)?;
        for r in roles {
            if r.is_empty() || r == "admin" || r.len() > 64 {
                return Err(Error::new(
                    ErrorCode::BadArguments,
                    format!("'{r}' is not a role to grant a view to (the admin sees everything)"),
                ));
            }
        }
        let conn = self.connect()?;
        let sql = sql.trim().trim_end_matches(';').trim();
        check(
            &conn,
            &RequestContext::system(),
            sql,
            &self.inner.opts.analytics,
        )?;
        let exists_as_table: i64 = conn
            .query_row(
                "SELECT count(*) FROM duckdb_tables() WHERE lower(table_name) = ?",
                [name],
                |r| r.get(0),
            )
            .map_err(duck_err)?;
        if exists_as_table > 0 {
            return Err(Error::new(
                ErrorCode::BadArguments,
                format!("'{name}' is a table"),
            ));
        }
        conn.execute_batch("BEGIN TRANSACTION").map_err(duck_err)?;
        let r = (|| -> Result<()> {
            conn.execute_batch(&format!("CREATE OR REPLACE VIEW \"{name}\" AS {sql}"))
                .map_err(duck_err)?;
            conn.execute("DELETE FROM analytics_grants WHERE view_name = ?", [name])
                .map_err(duck_err)?;
            for r in roles {
                conn.execute(
                    "INSERT INTO analytics_grants VALUES (?, ?, ?)",
                    duckdb::params![name, r.as_str(), super::ts_value(super::now_us())],
                )
                .map_err(duck_err)?;
            }
            Ok(())
        })();
        match r {
            Ok(()) => conn.execute_batch("COMMIT").map_err(duck_err)?,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        }
        Ok(ViewInfo {
            name: name.to_string(),
            sql: sql.to_string(),
            roles: roles.to_vec(),
        })
    }

    /// Drop an admin-defined view and its grants; false when there was none. Blocking.
    pub fn drop_view(&self, name: &str) -> Result<bool> {
        check_view_name(name)?;
        let conn = self.connect()?;
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM duckdb_views() WHERE view_name = ? AND NOT internal",
                [name],
                |r| r.get(0),
            )
            .map_err(duck_err)?;
        conn.execute_batch(&format!("DROP VIEW IF EXISTS \"{name}\""))
            .map_err(duck_err)?;
        conn.execute("DELETE FROM analytics_grants WHERE view_name = ?", [name])
            .map_err(duck_err)?;
        Ok(n > 0)
    }

    /// Admin-defined views with their grants. Blocking.
    pub fn list_views(&self) -> Result<Vec<ViewInfo>> {
        let conn = self.connect()?;
        let mut st = conn
            .prepare(
                "SELECT v.view_name, v.sql,
                        coalesce(list(g.role ORDER BY g.role) FILTER (WHERE g.role IS NOT NULL), [])
                 FROM duckdb_views() v LEFT JOIN analytics_grants g ON g.view_name = v.view_name
                 WHERE NOT v.internal AND v.schema_name = 'main'
                 GROUP BY ALL ORDER BY 1",
            )
            .map_err(duck_err)?;
        let rows = st
            .query_map([], |r| {
                let roles = match r.get::<_, DValue>(2)? {
                    DValue::List(l) => l
                        .into_iter()
                        .filter_map(|v| match v {
                            DValue::Text(s) => Some(s),
                            _ => None,
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                Ok(ViewInfo {
                    name: r.get(0)?,
                    sql: r.get(1)?,
                    roles,
                })
            })
            .map_err(duck_err)?;
        Ok(rows
            .flatten()
            .filter(|v| !super::ENGINE_OBJECTS.contains(&v.name.as_str()))
            .collect())
    }
}
