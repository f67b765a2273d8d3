//! SQL from inside the engine (the Lua `db` component, later others): the same parsing,
//! `{name:Type}` binding and role rules as SQL-over-HTTP, with parameters given as JSON values
//! and results collected into memory (bounded by a row limit) instead of streamed.

use rusqlite::Connection;
use rusqlite::types::Value;
use serde_json::{Map, Value as Json};

use super::exec::{Bound, bind, check_role_rules};
use super::params;
use super::parse;
use crate::core::{Error, ErrorCode, Result};
use crate::storage::Authz;

/// Statements ready to run.
#[derive(Clone)]
pub struct Prepared {
    pub(crate) statements: Vec<Bound>,
}

/// What running statements produced: the rows of the last one, and write counters.
#[derive(Debug, Default)]
pub struct Rows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
    pub changes: u64,
    pub last_insert_rowid: i64,
}

/// Parse `sql` and bind its placeholders from `params`. Several statements are allowed only
/// when `multi` is set; `FORMAT` clauses and insert data are not (the caller gets values).
pub fn prepare(
    sql: &str,
    params: &Map<String, Json>,
    multi: bool,
    max_size: usize,
) -> Result<Prepared> {
    if sql.len() > max_size {
        return Err(Error::new(
            ErrorCode::RequestTooLarge,
            format!(
                "SQL of {} bytes is over the limit of {max_size} (max_query_size)",
                sql.len()
            ),
        ));
    }
    let parsed = parse::parse(sql)?;
    if parsed.insert.is_some() || parsed.format.is_some() {
        return Err(Error::new(
            ErrorCode::BadArguments,
            "FORMAT clauses and insert data are for SQL-over-HTTP; pass values as parameters",
        ));
    }
    if parsed.statements.len() > 1 && !multi {
        return Err(Error::syntax(
            "One statement per call; use db.tx(...) or db.migrate(...) for several",
        ));
    }
    let statements = bind(parsed.statements, "use db.tx(function() ... end)", |p| {
        let v = params.get(&p.name).ok_or_else(|| {
            Error::new(
                ErrorCode::UnknownQueryParameter,
                format!(
                    "Parameter `{}` ({}) is missing from the parameters table",
                    p.name, p.ty
                ),
            )
        })?;
        params::bind_json(&p.name, &p.ty, v)
    })?;
    Ok(Prepared { statements })
}

impl Prepared {
    /// The statements' text (joined by `;\n`) and the first one's verb, for the log.
    pub fn describe(&self) -> (String, String) {
        let text = self
            .statements
            .iter()
            .map(|b| b.sql.as_str())
            .collect::<Vec<_>>()
            .join(";\n");
        let verb = self
            .statements
            .first()
            .map(|b| b.verb.clone())
            .unwrap_or_default();
        (text, verb)
    }

    /// True when every statement only reads (decided by SQLite on `conn`).
    pub fn readonly(&self, conn: &Connection) -> Result<bool> {
        for b in &self.statements {
            if !with_statement(conn, &b.sql, |st| Ok(st.readonly()))? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Run every statement on `conn` (inside whatever transaction the caller holds), returning
    /// the rows of the last one; more than `max_rows` rows or `max_bytes` of values is an error.
    pub fn run(
        &self,
        conn: &Connection,
        authz: &Authz,
        is_admin: bool,
        max_rows: u64,
        max_bytes: u64,
    ) -> Result<Rows> {
        check_role_rules(conn, authz, is_admin, &self.statements)?;
        let mut out = Rows::default();
        for b in &self.statements {
            let before = matches!(
                b.verb.as_str(),
                "INSERT" | "UPDATE" | "DELETE" | "REPLACE" | "WITH"
            )
            .then(|| super::exec::WriteCount::start(conn));
            let (columns, collected) = with_statement(conn, &b.sql, |stmt| {
                for (i, v) in b.values.iter().enumerate() {
                    stmt.raw_bind_parameter(i + 1, v)?;
                }
                let columns: Vec<String> = stmt
                    .column_names()
                    .into_iter()
                    .map(str::to_string)
                    .collect();
                let n = columns.len();
                let mut rows = stmt.raw_query();
                let mut collected = Vec::new();
                let mut bytes = 0u64;
                while let Some(r) = rows.next()? {
                    if max_rows > 0 && collected.len() as u64 >= max_rows {
                        return Err(Error::new(
                            ErrorCode::TooManyRowsOrBytes,
                            format!("More than {max_rows} rows; add a LIMIT"),
                        ));
                    }
                    // Sizes are checked on SQLite's copy before one is made here.
                    let mut row = Vec::with_capacity(n);
                    for i in 0..n {
                        let v = r.get_ref(i)?;
                        bytes += match v {
                            rusqlite::types::ValueRef::Text(t)
                            | rusqlite::types::ValueRef::Blob(t) => t.len() as u64,
                            _ => 8,
                        };
                        if max_bytes > 0 && bytes > max_bytes {
                            return Err(Error::new(
                                ErrorCode::TooManyRowsOrBytes,
                                format!(
                                    "Result larger than {max_bytes} bytes; select fewer rows or columns"
                                ),
                            ));
                        }
                        row.push(match v {
                            rusqlite::types::ValueRef::Null => Value::Null,
                            rusqlite::types::ValueRef::Integer(i) => Value::Integer(i),
                            rusqlite::types::ValueRef::Real(f) => Value::Real(f),
                            rusqlite::types::ValueRef::Text(t) => {
                                Value::Text(String::from_utf8_lossy(t).into_owned())
                            }
                            rusqlite::types::ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                        });
                    }
                    collected.push(row);
                }
                Ok((columns, collected))
            })?;
            if let Some(before) = before {
                out.changes += before.finish(conn);
            }
            out.columns = columns;
            out.rows = collected;
        }
        out.last_insert_rowid = conn.last_insert_rowid();
        Ok(out)
    }
}

/// Statements longer than this are prepared afresh instead of staying in the statement cache.
const CACHE_SQL_UP_TO: usize = 16 * 1024;

fn with_statement<R>(
    conn: &Connection,
    sql: &str,
    f: impl FnOnce(&mut rusqlite::Statement<'_>) -> Result<R>,
) -> Result<R> {
    if sql.len() <= CACHE_SQL_UP_TO {
        let mut st = conn.prepare_cached(sql)?;
        f(&mut st)
    } else {
        let mut st = conn.prepare(sql)?;
        f(&mut st)
    }
}
