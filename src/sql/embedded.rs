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
pub fn prepare(sql: &str, params: &Map<String, Json>, multi: bool) -> Result<Prepared> {
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
    /// True when every statement only reads (decided by SQLite on `conn`).
    pub fn readonly(&self, conn: &Connection) -> Result<bool> {
        for b in &self.statements {
            if !conn.prepare_cached(&b.sql)?.readonly() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Run every statement on `conn` (inside whatever transaction the caller holds), returning
    /// the rows of the last one; more than `max_rows` rows is an error.
    pub fn run(
        &self,
        conn: &Connection,
        authz: &Authz,
        is_admin: bool,
        max_rows: u64,
    ) -> Result<Rows> {
        check_role_rules(authz, is_admin, &self.statements)?;
        let mut out = Rows::default();
        for b in &self.statements {
            let mut stmt = conn.prepare_cached(&b.sql)?;
            for (i, v) in b.values.iter().enumerate() {
                stmt.raw_bind_parameter(i + 1, v)?;
            }
            let columns: Vec<String> = stmt
                .column_names()
                .into_iter()
                .map(str::to_string)
                .collect();
            let n = columns.len();
            let before = conn.total_changes();
            let mut rows = stmt.raw_query();
            let mut collected = Vec::new();
            while let Some(r) = rows.next()? {
                if max_rows > 0 && collected.len() as u64 >= max_rows {
                    return Err(Error::new(
                        ErrorCode::TooManyRowsOrBytes,
                        format!("More than {max_rows} rows; add a LIMIT"),
                    ));
                }
                collected.push(
                    (0..n)
                        .map(|i| r.get::<_, Value>(i))
                        .collect::<rusqlite::Result<Vec<_>>>()?,
                );
            }
            drop(rows);
            out.changes += conn.total_changes() - before;
            out.columns = columns;
            out.rows = collected;
        }
        out.last_insert_rowid = conn.last_insert_rowid();
        Ok(out)
    }
}
