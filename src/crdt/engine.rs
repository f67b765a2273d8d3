//! The CRR engine on one SQLite connection: metadata tables, the capture triggers, reading the
//! change feed and merging received changes.
//!
//! Owns the `_ichibase_crdt_*` tables and the `_ichibase_crdt__<table>__*` triggers. Works on a
//! plain `rusqlite::Connection` (the property tests use bare files); the HTTP side, RLS and the
//! peer loop are in the sibling files. Must not touch other modules' tables.
//!
//! Model (after cr-sqlite): every row of a CRR table has a causal length `cl` (odd: alive, even:
//! deleted; a delete adds one, a re-insert adds one) and every non-key column a clock
//! `(hlc, site)`: a hybrid logical clock (`wall ms << 16 | counter`) with the writing site as the
//! tie-breaker. A merge keeps the larger `cl`; at equal odd `cl` each column keeps the larger
//! clock. Every local write or merged change gives its row the next `db_version` of this site,
//! so "changes since N" is the rows whose version is above N, each sent whole (its current
//! values and clocks): no partial rows, and the same change applied twice changes nothing.

use std::collections::BTreeMap;

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::core::{Error, ErrorCode, Result};
use crate::sql::parse::quote_ident;

thread_local! {
    /// Set while the engine serves a non-admin caller: its statements are then prepared
    /// uncached, so no statement the engine prepared unhindered is reused by the caller's SQL.
    static NO_CACHE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` with the engine's statements uncached (see `NO_CACHE`).
pub fn uncached<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            NO_CACHE.with(|n| n.set(self.0));
        }
    }
    let _r = Reset(NO_CACHE.with(|n| n.replace(true)));
    f()
}

/// A prepared statement, cached unless the engine serves a non-admin caller.
pub enum St<'c> {
    Cached(rusqlite::CachedStatement<'c>),
    Fresh(rusqlite::Statement<'c>),
}

impl<'c> std::ops::Deref for St<'c> {
    type Target = rusqlite::Statement<'c>;
    fn deref(&self) -> &Self::Target {
        match self {
            St::Cached(s) => s,
            St::Fresh(s) => s,
        }
    }
}

impl std::ops::DerefMut for St<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match self {
            St::Cached(s) => s,
            St::Fresh(s) => s,
        }
    }
}

pub fn prep<'c>(c: &'c Connection, sql: &str) -> rusqlite::Result<St<'c>> {
    if NO_CACHE.with(|n| n.get()) {
        Ok(St::Fresh(c.prepare(sql)?))
    } else {
        Ok(St::Cached(c.prepare_cached(sql)?))
    }
}

/// The engine tables (also the module's migration: every statement is idempotent).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS _ichibase_crdt_tables (
    name TEXT PRIMARY KEY,
    pk TEXT NOT NULL,
    columns TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS _ichibase_crdt_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    db_version INTEGER NOT NULL,
    hlc INTEGER NOT NULL,
    applying INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS _ichibase_crdt_sites (
    ord INTEGER PRIMARY KEY,
    site TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS _ichibase_crdt_rows (
    tbl TEXT NOT NULL,
    pk TEXT NOT NULL,
    cl INTEGER NOT NULL,
    hlc INTEGER NOT NULL,
    db_version INTEGER NOT NULL,
    tomb TEXT,
    PRIMARY KEY (tbl, pk)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS _ichibase_crdt_rows_version ON _ichibase_crdt_rows (db_version);
CREATE TABLE IF NOT EXISTS _ichibase_crdt_clock (
    tbl TEXT NOT NULL,
    pk TEXT NOT NULL,
    col TEXT NOT NULL,
    hlc INTEGER NOT NULL,
    site INTEGER NOT NULL,
    PRIMARY KEY (tbl, pk, col)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _ichibase_crdt_peers (
    peer TEXT PRIMARY KEY,
    pulled INTEGER NOT NULL DEFAULT 0,
    pushed INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT
);
";

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorCode::BadArguments, msg)
}

fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Create the engine tables and this database's site id (once).
pub fn ensure_schema(c: &Connection) -> Result<()> {
    let have: i64 = c.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE name = '_ichibase_crdt_state'",
        [],
        |r| r.get(0),
    )?;
    if have == 0 {
        c.execute_batch(SCHEMA)?;
    }
    init_site(c)
}

/// The state row and the local site (ord 0), created on first use.
pub fn init_site(c: &Connection) -> Result<()> {
    c.execute(
        "INSERT OR IGNORE INTO _ichibase_crdt_state (id, db_version, hlc, applying) VALUES (1, 0, 0, 0)",
        [],
    )?;
    c.execute(
        "INSERT OR IGNORE INTO _ichibase_crdt_sites (ord, site) VALUES (0, ?1)",
        [uuid::Uuid::new_v4().to_string()],
    )?;
    Ok(())
}

/// This database's site id.
pub fn site_id(c: &Connection) -> Result<String> {
    Ok(c.query_row("SELECT site FROM _ichibase_crdt_sites WHERE ord = 0", [], |r| r.get(0))?)
}

/// The newest db_version of this site.
pub fn db_version(c: &Connection) -> Result<i64> {
    Ok(c.query_row("SELECT db_version FROM _ichibase_crdt_state", [], |r| r.get(0))?)
}

/// A CRR table: its primary key and other columns, in table order.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TableInfo {
    pub name: String,
    pub pk: Vec<String>,
    pub columns: Vec<String>,
}

/// Columns of `table` as (name, is-pk position > 0), or UNKNOWN_TABLE.
fn table_shape(c: &Connection, table: &str) -> Result<TableInfo> {
    let kind: Option<String> = c
        .query_row(
            "SELECT type FROM sqlite_schema WHERE name = ?1",
            [table],
            |r| r.get(0),
        )
        .optional()?;
    match kind.as_deref() {
        Some("table") => {}
        Some(other) => {
            return Err(Error::new(
                ErrorCode::CrdtRefused,
                format!("'{table}' is a {other}, not a table: only tables can be CRR tables"),
            ));
        }
        None => {
            return Err(Error::new(
                ErrorCode::UnknownTable,
                format!("No table '{table}' (names are case-sensitive here)"),
            ));
        }
    }
    let mut cols: Vec<(String, i64, i64)> = prep(c, "SELECT name, pk, hidden FROM pragma_table_xinfo(?1) ORDER BY cid")?
        .query_map([table], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    if cols.iter().any(|(_, _, hidden)| *hidden != 0) {
        return Err(Error::new(
            ErrorCode::CrdtRefused,
            format!("'{table}' has generated or hidden columns: CRR tables need plain columns"),
        ));
    }
    let mut pk: Vec<(i64, String)> = cols
        .iter()
        .filter(|(_, p, _)| *p > 0)
        .map(|(n, p, _)| (*p, n.clone()))
        .collect();
    pk.sort();
    let pk: Vec<String> = pk.into_iter().map(|(_, n)| n).collect();
    cols.retain(|(_, p, _)| *p == 0);
    Ok(TableInfo {
        name: table.to_string(),
        pk,
        columns: cols.into_iter().map(|(n, _, _)| n).collect(),
    })
}

fn trigger_name(table: &str, what: &str) -> String {
    format!("_ichibase_crdt__{table}__{what}")
}

/// The HLC of "now", advancing the stored one (SQL expression, used in triggers).
const NEXT_HLC: &str = "max(hlc + 1, CAST(unixepoch('subsec') * 1000 AS INTEGER) << 16)";

/// (Re)create the capture triggers of `t`.
fn create_triggers(c: &Connection, t: &TableInfo) -> Result<()> {
    let tbl = lit(&t.name);
    let qt = quote_ident(&t.name);
    let pkj = |p: &str| {
        format!(
            "json_array({})",
            t.pk.iter()
                .map(|k| format!("{p}.{}", quote_ident(k)))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    // The column names as a row source (no JSON to parse per write).
    let all_cols = if t.columns.is_empty() {
        "(SELECT NULL AS column1 WHERE false)".to_string()
    } else {
        format!(
            "(VALUES {})",
            t.columns.iter().map(|c| format!("({})", lit(c))).collect::<Vec<_>>().join(", ")
        )
    };
    let gate = "(SELECT applying FROM _ichibase_crdt_state) = 0";
    let bump = format!("UPDATE _ichibase_crdt_state SET db_version = db_version + 1, hlc = {NEXT_HLC};");
    for what in ["ins", "upd", "del", "pk"] {
        c.execute_batch(&format!(
            "DROP TRIGGER IF EXISTS {}",
            quote_ident(&trigger_name(&t.name, what))
        ))?;
    }
    c.execute_batch(&format!(
        "CREATE TRIGGER {name} AFTER INSERT ON {qt} WHEN {gate} BEGIN
           {bump}
           INSERT INTO _ichibase_crdt_rows (tbl, pk, cl, hlc, db_version, tomb)
             SELECT {tbl}, {new}, 1, hlc, db_version, NULL FROM _ichibase_crdt_state WHERE true
             ON CONFLICT (tbl, pk) DO UPDATE SET cl = CASE WHEN cl % 2 = 0 THEN cl + 1 ELSE cl END,
               hlc = excluded.hlc, db_version = excluded.db_version, tomb = NULL;
           INSERT INTO _ichibase_crdt_clock (tbl, pk, col, hlc, site)
             SELECT {tbl}, {new}, j.column1, s.hlc, 0 FROM _ichibase_crdt_state s, {all_cols} j WHERE true
             ON CONFLICT (tbl, pk, col) DO UPDATE SET hlc = excluded.hlc, site = 0;
         END",
        name = quote_ident(&trigger_name(&t.name, "ins")),
        new = pkj("NEW"),
    ))?;
    let changed = if t.columns.is_empty() {
        "SELECT NULL AS column1 WHERE false".to_string()
    } else {
        t.columns
            .iter()
            .map(|col| {
                let q = quote_ident(col);
                format!("SELECT {} AS column1 WHERE NEW.{q} IS NOT OLD.{q}", lit(col))
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ")
    };
    c.execute_batch(&format!(
        "CREATE TRIGGER {name} AFTER UPDATE ON {qt} WHEN {gate} BEGIN
           {bump}
           INSERT INTO _ichibase_crdt_rows (tbl, pk, cl, hlc, db_version, tomb)
             SELECT {tbl}, {new}, 1, hlc, db_version, NULL FROM _ichibase_crdt_state WHERE true
             ON CONFLICT (tbl, pk) DO UPDATE SET hlc = excluded.hlc, db_version = excluded.db_version;
           INSERT INTO _ichibase_crdt_clock (tbl, pk, col, hlc, site)
             SELECT {tbl}, {new}, j.column1, s.hlc, 0 FROM _ichibase_crdt_state s, ({changed}) j
             WHERE true
             ON CONFLICT (tbl, pk, col) DO UPDATE SET hlc = excluded.hlc, site = 0;
         END",
        name = quote_ident(&trigger_name(&t.name, "upd")),
        new = pkj("NEW"),
    ))?;
    let tomb = t
        .pk
        .iter()
        .chain(t.columns.iter())
        .map(|col| {
            let v = format!("OLD.{}", quote_ident(col));
            format!("{}, CASE WHEN typeof({v}) = 'blob' THEN hex({v}) ELSE {v} END", lit(col))
        })
        .collect::<Vec<_>>()
        .join(", ");
    c.execute_batch(&format!(
        "CREATE TRIGGER {name} AFTER DELETE ON {qt} WHEN {gate} BEGIN
           {bump}
           INSERT INTO _ichibase_crdt_rows (tbl, pk, cl, hlc, db_version, tomb)
             SELECT {tbl}, {old}, 2, hlc, db_version, json_object({tomb}) FROM _ichibase_crdt_state WHERE true
             ON CONFLICT (tbl, pk) DO UPDATE SET cl = CASE WHEN cl % 2 = 1 THEN cl + 1 ELSE cl END,
               hlc = excluded.hlc, db_version = excluded.db_version, tomb = excluded.tomb;
           DELETE FROM _ichibase_crdt_clock WHERE tbl = {tbl} AND pk = {old};
         END",
        name = quote_ident(&trigger_name(&t.name, "del")),
        old = pkj("OLD"),
    ))?;
    let pk_cols = t.pk.iter().map(|k| quote_ident(k)).collect::<Vec<_>>().join(", ");
    let pk_changed = t
        .pk
        .iter()
        .map(|k| format!("NEW.{0} IS NOT OLD.{0}", quote_ident(k)))
        .collect::<Vec<_>>()
        .join(" OR ");
    c.execute_batch(&format!(
        "CREATE TRIGGER {name} BEFORE UPDATE OF {pk_cols} ON {qt} WHEN {pk_changed} BEGIN
           SELECT RAISE(ABORT, {msg});
         END",
        name = quote_ident(&trigger_name(&t.name, "pk")),
        msg = lit(&format!(
            "CRDT_SCHEMA_REFUSED: the primary key of CRR table {} cannot change (delete the row and insert a new one)",
            t.name
        )),
    ))?;
    Ok(())
}

/// Turn `table` into a CRR table (idempotent): metadata for its existing rows, capture triggers.
pub fn enable(c: &mut Connection, table: &str) -> Result<TableInfo> {
    if table.starts_with("_ichibase") || table.starts_with("sqlite_") {
        return Err(bad("engine tables cannot be CRR tables"));
    }
    ensure_schema(c)?;
    let tx = c.savepoint()?;
    let t = table_shape(&tx, table)?;
    if t.pk.is_empty() {
        return Err(Error::new(
            ErrorCode::CrdtRefused,
            format!(
                "table '{table}' has no PRIMARY KEY: a CRR table needs one (rows are matched across devices by it; use e.g. a TEXT id from a UUID)"
            ),
        ));
    }
    let known: Option<String> = tx
        .query_row(
            "SELECT columns FROM _ichibase_crdt_tables WHERE name = ?1",
            [table],
            |r| r.get(0),
        )
        .optional()?;
    if known.is_none() {
        // Existing rows: alive (cl 1), every column written now by this site.
        let base = db_version(&tx)?;
        let hlc: i64 = tx.query_row(
            &format!("UPDATE _ichibase_crdt_state SET hlc = {NEXT_HLC} RETURNING hlc"),
            [],
            |r| r.get(0),
        )?;
        let pkj = format!(
            "json_array({})",
            t.pk.iter().map(|k| quote_ident(k)).collect::<Vec<_>>().join(", ")
        );
        let qt = quote_ident(table);
        let n = tx.execute(
            &format!(
                "INSERT OR IGNORE INTO _ichibase_crdt_rows (tbl, pk, cl, hlc, db_version, tomb)
                 SELECT ?1, {pkj}, 1, ?2, ?3 + row_number() OVER (), NULL FROM {qt}"
            ),
            params![table, hlc, base],
        )?;
        for col in &t.columns {
            tx.execute(
                &format!(
                    "INSERT OR IGNORE INTO _ichibase_crdt_clock (tbl, pk, col, hlc, site)
                     SELECT ?1, {pkj}, ?2, ?3, 0 FROM {qt}"
                ),
                params![table, col, hlc],
            )?;
        }
        tx.execute(
            "UPDATE _ichibase_crdt_state SET db_version = db_version + ?1",
            [n as i64],
        )?;
    }
    create_triggers(&tx, &t)?;
    tx.execute(
        "INSERT OR REPLACE INTO _ichibase_crdt_tables (name, pk, columns) VALUES (?1, ?2, ?3)",
        params![
            table,
            serde_json::to_string(&t.pk).unwrap(),
            serde_json::to_string(&t.columns).unwrap()
        ],
    )?;
    tx.commit()?;
    Ok(t)
}

/// Stop replicating `table`: its triggers and metadata go; the table stays as it is.
pub fn disable(c: &mut Connection, table: &str) -> Result<()> {
    ensure_schema(c)?;
    let tx = c.savepoint()?;
    if tx.execute("DELETE FROM _ichibase_crdt_tables WHERE name = ?1", [table])? == 0 {
        return Err(Error::new(
            ErrorCode::CrdtNotEnabled,
            format!("'{table}' is not a CRR table"),
        ));
    }
    for what in ["ins", "upd", "del", "pk"] {
        tx.execute_batch(&format!(
            "DROP TRIGGER IF EXISTS {}",
            quote_ident(&trigger_name(table, what))
        ))?;
    }
    tx.execute("DELETE FROM _ichibase_crdt_rows WHERE tbl = ?1", [table])?;
    tx.execute("DELETE FROM _ichibase_crdt_clock WHERE tbl = ?1", [table])?;
    tx.commit()?;
    Ok(())
}

/// Every CRR table.
pub fn list(c: &Connection) -> Result<Vec<TableInfo>> {
    let have: i64 = c.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE name = '_ichibase_crdt_tables'",
        [],
        |r| r.get(0),
    )?;
    if have == 0 {
        return Ok(Vec::new());
    }
    let rows: Vec<(String, String, String)> = prep(c, "SELECT name, pk, columns FROM _ichibase_crdt_tables ORDER BY name")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows
        .into_iter()
        .map(|(name, pk, cols)| TableInfo {
            name,
            pk: serde_json::from_str(&pk).unwrap_or_default(),
            columns: serde_json::from_str(&cols).unwrap_or_default(),
        })
        .collect())
}

/// Bring the triggers of CRR tables up to date with their schema after `ALTER TABLE ... ADD
/// COLUMN`: the new column gets captured from now on; rows whose new column holds a value
/// other than its default get a clock at the row's last write. Returns the tables refreshed.
pub fn refresh(c: &mut Connection) -> Result<Vec<String>> {
    let mut done = Vec::new();
    for known in list(c)? {
        let now = match table_shape(c, &known.name) {
            Ok(t) => t,
            Err(_) => continue, // dropped behind our back (another process): nothing to capture
        };
        if now == known {
            continue;
        }
        let tx = c.savepoint()?;
        let pkj = format!(
            "json_array({})",
            now.pk.iter().map(|k| quote_ident(k)).collect::<Vec<_>>().join(", ")
        );
        for col in now.columns.iter().filter(|c| !known.columns.contains(c)) {
            let dflt: Option<String> = tx
                .query_row(
                    "SELECT dflt_value FROM pragma_table_info(?1) WHERE name = ?2",
                    [&now.name, col],
                    |r| r.get(0),
                )
                .optional()?
                .flatten();
            let cond = match dflt {
                Some(d) => format!("{} IS NOT ({d})", quote_ident(col)),
                None => format!("{} IS NOT NULL", quote_ident(col)),
            };
            tx.execute(
                &format!(
                    "INSERT OR IGNORE INTO _ichibase_crdt_clock (tbl, pk, col, hlc, site)
                     SELECT ?1, {pkj}, ?2, r.hlc, 0 FROM {qt} t JOIN _ichibase_crdt_rows r ON r.tbl = ?1 AND r.pk = {pkj2}
                     WHERE {cond}",
                    qt = quote_ident(&now.name),
                    pkj2 = format!(
                        "json_array({})",
                        now.pk.iter().map(|k| format!("t.{}", quote_ident(k))).collect::<Vec<_>>().join(", ")
                    ),
                ),
                params![now.name, col],
            )?;
        }
        create_triggers(&tx, &now)?;
        tx.execute(
            "UPDATE _ichibase_crdt_tables SET pk = ?2, columns = ?3 WHERE name = ?1",
            params![
                now.name,
                serde_json::to_string(&now.pk).unwrap(),
                serde_json::to_string(&now.columns).unwrap()
            ],
        )?;
        tx.commit()?;
        done.push(now.name);
    }
    Ok(done)
}

/// Check a statement the SQL layer is about to run: a CRR table may not be dropped, renamed or
/// lose columns (that would not merge with other replicas). `ALTER TABLE t ADD COLUMN` is fine.
/// `is_crr` tells whether a table is a CRR table.
pub fn check_ddl(sql: &str, verb: &str, is_crr: &dyn Fn(&str) -> bool) -> Result<()> {
    use crate::sql::lexer::TokKind;
    if !verb.eq_ignore_ascii_case("DROP") && !verb.eq_ignore_ascii_case("ALTER") {
        return Ok(());
    }
    let Ok(toks) = crate::sql::lexer::tokenize(sql) else {
        return Ok(());
    };
    let words: Vec<String> = toks
        .iter()
        .filter(|t| !matches!(t.kind, TokKind::Semicolon))
        .map(|t| crate::sql::parse::unquote(&sql[t.start..t.end]))
        .collect();
    let up = |i: usize| words.get(i).map(|w| w.to_ascii_uppercase()).unwrap_or_default();
    if up(1) != "TABLE" {
        return Ok(());
    }
    let mut i = 2;
    if up(0) == "DROP" && up(2) == "IF" && up(3) == "EXISTS" {
        i = 4;
    }
    let mut name = words.get(i).cloned().unwrap_or_default();
    if words.get(i + 1).map(String::as_str) == Some(".") {
        name = words.get(i + 2).cloned().unwrap_or_default();
        i += 2;
    }
    if !is_crr(&name) {
        return Ok(());
    }
    let refuse = |what: &str| {
        Err(Error::new(
            ErrorCode::CrdtRefused,
            format!(
                "'{name}' is a CRR table: {what} would not merge with its other replicas. Adding a column (ALTER TABLE {name} ADD COLUMN, nullable or with a default) is allowed; for anything else run `ichibase crdt disable {name}` on every replica first"
            ),
        ))
    };
    if up(0) == "DROP" {
        return refuse("dropping it");
    }
    match up(i + 1).as_str() {
        "ADD" => {
            let rest = words[i + 2..].join(" ").to_ascii_uppercase();
            if rest.contains("NOT NULL") && !rest.contains("DEFAULT") {
                return refuse("a NOT NULL column without a DEFAULT");
            }
            if rest.contains("PRIMARY") || rest.contains("UNIQUE") {
                return refuse("a key column");
            }
            Ok(())
        }
        "RENAME" => refuse("renaming it or its columns"),
        "DROP" => refuse("dropping a column"),
        _ => refuse("this change"),
    }
}

/// True when `table` has CRR capture triggers (reads the schema).
pub fn is_crr(c: &Connection, table: &str) -> bool {
    prep(c, "SELECT 1 FROM sqlite_schema WHERE type = 'trigger' AND name = ?1")
        .and_then(|mut s| s.exists([trigger_name(table, "ins")]))
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------
// Changes on the wire.

/// One column of a row change: value, HLC and writing site.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ColChange {
    pub v: Json,
    pub t: i64,
    pub s: String,
}

/// The state of one row: its causal length and (when alive) every column with its clock.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RowChange {
    pub table: String,
    pub pk: Vec<Json>,
    pub cl: i64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cols: BTreeMap<String, ColChange>,
    /// The row's version at the sender (informative; the batch cursor is what to resume from).
    #[serde(default)]
    pub version: i64,
}

/// A JSON value for an SQLite value (blobs as `{"$blob": base64}`).
pub fn to_json(v: Value) -> Json {
    use base64::Engine;
    match v {
        Value::Null => Json::Null,
        Value::Integer(i) => Json::from(i),
        Value::Real(f) => serde_json::Number::from_f64(f).map(Json::Number).unwrap_or(Json::Null),
        Value::Text(s) => Json::String(s),
        Value::Blob(b) => {
            serde_json::json!({"$blob": base64::engine::general_purpose::STANDARD.encode(b)})
        }
    }
}

/// The SQLite value of a JSON value from the wire.
pub fn from_json(v: &Json) -> Result<Value> {
    use base64::Engine;
    Ok(match v {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Integer(*b as i64),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Real(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::Text(s.clone()),
        Json::Object(o) if o.len() == 1 && o.contains_key("$blob") => Value::Blob(
            o["$blob"]
                .as_str()
                .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                .ok_or_else(|| bad("$blob must be base64 text"))?,
        ),
        other => Value::Text(other.to_string()),
    })
}

/// The canonical key text of `pk` values (as the triggers compute it: SQLite's `json_array`).
fn pk_text(c: &Connection, pk: &[Value]) -> Result<String> {
    let marks = vec!["?"; pk.len()].join(", ");
    Ok(prep(c, &format!("SELECT json_array({marks})"))?
        .query_row(rusqlite::params_from_iter(pk.iter()), |r| r.get(0))?)
}

fn where_pk(t: &TableInfo, prefix: usize) -> String {
    t.pk.iter()
        .enumerate()
        .map(|(i, k)| format!("{} IS ?{}", quote_ident(k), i + 1 + prefix))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// A candidate of the change feed: the row's change, and its last values when deleted.
pub struct Candidate {
    pub change: RowChange,
    pub tomb: Option<Json>,
}

/// Rows changed after `since` (at most `limit`), in version order, each whole; the cursor to
/// resume from is the last one's `version`. Tables not in `tables` (when given) are skipped
/// but still move the cursor.
pub fn changes(
    c: &Connection,
    since: i64,
    limit: usize,
    tables: Option<&[String]>,
) -> Result<(Vec<Candidate>, i64, bool)> {
    let infos: BTreeMap<String, TableInfo> =
        list(c)?.into_iter().map(|t| (t.name.clone(), t)).collect();
    let mut st = prep(c, 
        "SELECT tbl, pk, cl, db_version, tomb FROM _ichibase_crdt_rows WHERE db_version > ?1 ORDER BY db_version LIMIT ?2",
    )?;
    let limit = limit.min(1 << 40);
    let rows: Vec<(String, String, i64, i64, Option<String>)> = st
        .query_map(params![since, limit as i64 + 1], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let more = rows.len() > limit;
    let mut cursor = since;
    let mut out = Vec::new();
    let site_of = |ord: i64| -> Result<String> {
        Ok(prep(c, "SELECT site FROM _ichibase_crdt_sites WHERE ord = ?1")?
            .query_row([ord], |r| r.get(0))?)
    };
    for (tbl, pk, cl, version, tomb) in rows.into_iter().take(limit) {
        cursor = version;
        if tables.is_some_and(|ts| !ts.iter().any(|t| t == &tbl)) {
            continue;
        }
        let Some(info) = infos.get(&tbl) else { continue };
        let pk_vals: Vec<Json> = serde_json::from_str(&pk).unwrap_or_default();
        let mut cols = BTreeMap::new();
        if cl % 2 == 1 {
            let sql = format!(
                "SELECT {} FROM {} WHERE {}",
                if info.columns.is_empty() {
                    "1".to_string()
                } else {
                    info.columns.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ")
                },
                quote_ident(&tbl),
                where_pk(info, 0)
            );
            let keys: Vec<Value> = pk_vals.iter().map(from_json).collect::<Result<_>>()?;
            let vals: Option<Vec<Value>> = prep(c, &sql)?
                .query_row(rusqlite::params_from_iter(keys.iter()), |r| {
                    (0..info.columns.len()).map(|i| r.get::<_, Value>(i)).collect()
                })
                .optional()?;
            let Some(vals) = vals else { continue };
            let clocks: BTreeMap<String, (i64, i64)> = prep(c, 
                    "SELECT col, hlc, site FROM _ichibase_crdt_clock WHERE tbl = ?1 AND pk = ?2",
                )?
                .query_map(params![tbl, pk], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))?
                .collect::<rusqlite::Result<_>>()?;
            for (name, v) in info.columns.iter().zip(vals) {
                if let Some((hlc, site)) = clocks.get(name) {
                    cols.insert(
                        name.clone(),
                        ColChange { v: to_json(v), t: *hlc, s: site_of(*site)? },
                    );
                }
            }
        }
        out.push(Candidate {
            change: RowChange { table: tbl, pk: pk_vals, cl, cols, version },
            tomb: if cl % 2 == 0 { tomb.and_then(|t| serde_json::from_str(&t).ok()) } else { None },
        });
    }
    Ok((out, cursor, more))
}

// ---------------------------------------------------------------------------------------------
// Merging.

/// How a merged change's row writes reach the table: straight (the admin, a peer) or through
/// the caller's policy views (a user's device).
pub trait Target {
    fn insert(&self, c: &Connection, t: &TableInfo, cols: &[(String, Value)]) -> Result<()>;
    fn update(
        &self,
        c: &Connection,
        t: &TableInfo,
        pk: &[Value],
        sets: &[(String, Value)],
    ) -> Result<()>;
    fn delete(&self, c: &Connection, t: &TableInfo, pk: &[Value]) -> Result<()>;
    /// False for callers whose changes pass their policies: a deleted row this replica never
    /// had is then not recorded (it would shadow other users' later inserts of that key).
    fn trusted(&self) -> bool {
        true
    }
    /// Runs the engine's own statements (metadata) on `c`.
    fn engine<R>(&self, f: impl FnOnce() -> R) -> R
    where
        Self: Sized,
    {
        crate::storage::engine_statements(f)
    }
}

/// Writes straight to the base table.
pub struct Direct;

pub fn insert_sql(table: &str, cols: &[(String, Value)]) -> String {
    format!(
        "INSERT INTO {} ({}) VALUES ({})",
        quote_ident(table),
        cols.iter().map(|(n, _)| quote_ident(n)).collect::<Vec<_>>().join(", "),
        (1..=cols.len()).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ")
    )
}

pub fn update_sql(table: &str, t: &TableInfo, sets: &[(String, Value)]) -> String {
    format!(
        "UPDATE {} SET {} WHERE {}",
        quote_ident(table),
        sets.iter()
            .enumerate()
            .map(|(i, (n, _))| format!("{} = ?{}", quote_ident(n), i + 1))
            .collect::<Vec<_>>()
            .join(", "),
        where_pk(t, sets.len())
    )
}

pub fn delete_sql(table: &str, t: &TableInfo) -> String {
    format!("DELETE FROM {} WHERE {}", quote_ident(table), where_pk(t, 0))
}

impl Target for Direct {
    fn insert(&self, c: &Connection, t: &TableInfo, cols: &[(String, Value)]) -> Result<()> {
        prep(c, &insert_sql(&t.name, cols))?
            .execute(rusqlite::params_from_iter(cols.iter().map(|(_, v)| v)))?;
        Ok(())
    }
    fn update(&self, c: &Connection, t: &TableInfo, pk: &[Value], sets: &[(String, Value)]) -> Result<()> {
        prep(c, &update_sql(&t.name, t, sets))?
            .execute(rusqlite::params_from_iter(sets.iter().map(|(_, v)| v).chain(pk.iter())))?;
        Ok(())
    }
    fn delete(&self, c: &Connection, t: &TableInfo, pk: &[Value]) -> Result<()> {
        prep(c, &delete_sql(&t.name, t))?
            .execute(rusqlite::params_from_iter(pk.iter()))?;
        Ok(())
    }
}

/// What merging one change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The row changed here.
    Applied,
    /// Nothing to do: this replica has the change already, or a newer one.
    Unchanged,
}

/// Limits of a merge.
#[derive(Debug, Clone, Copy)]
pub struct MergeLimits {
    /// A change whose clock is further ahead of this machine's clock is refused (ms).
    pub max_clock_drift_ms: i64,
}

impl Default for MergeLimits {
    fn default() -> Self {
        MergeLimits { max_clock_drift_ms: 5 * 60 * 1000 }
    }
}

fn site_ord(c: &Connection, site: &str) -> Result<i64> {
    prep(c, "INSERT OR IGNORE INTO _ichibase_crdt_sites (site) VALUES (?1)")?
        .execute([site])?;
    Ok(prep(c, "SELECT ord FROM _ichibase_crdt_sites WHERE site = ?1")?
        .query_row([site], |r| r.get(0))?)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Check a change's shape against this replica (before anything is written).
fn validate(infos: &BTreeMap<String, TableInfo>, ch: &RowChange, limits: &MergeLimits) -> Result<TableInfo> {
    let t = infos.get(&ch.table).ok_or_else(|| {
        Error::new(
            ErrorCode::CrdtNotEnabled,
            format!("'{}' is not a CRR table here", ch.table),
        )
    })?;
    if ch.pk.len() != t.pk.len() {
        return Err(Error::new(
            ErrorCode::CrdtBadChange,
            format!("table '{}' has {} key column(s), the change gives {}", t.name, t.pk.len(), ch.pk.len()),
        ));
    }
    if ch.cl < 1 || ch.cl > 1 << 50 {
        return Err(Error::new(ErrorCode::CrdtBadChange, "cl (causal length) must be between 1 and 2^50"));
    }
    if ch.cl % 2 == 0 && !ch.cols.is_empty() {
        return Err(Error::new(ErrorCode::CrdtBadChange, "a deleted row (even cl) carries no columns"));
    }
    let horizon = (now_ms() + limits.max_clock_drift_ms) << 16;
    for (name, col) in &ch.cols {
        if col.t > horizon || col.t < 0 {
            return Err(Error::new(
                ErrorCode::CrdtBadChange,
                format!(
                    "column '{name}': its clock is more than {} ms ahead of this server's clock (max_clock_drift_ms in [crdt])",
                    limits.max_clock_drift_ms
                ),
            ));
        }
        if col.s.is_empty() || col.s.len() > 64 {
            return Err(Error::new(ErrorCode::CrdtBadChange, format!("column '{name}': bad site id")));
        }
    }
    Ok(t.clone())
}

/// Merge one change into this replica with `target` doing the row writes (the metadata is the
/// engine's). Run inside a transaction with `applying` set (see [`apply`]).
fn merge_one<T: Target>(c: &Connection, t: &TableInfo, ch: &RowChange, target: &T) -> Result<Outcome> {
    let pk: Vec<Value> = ch.pk.iter().map(from_json).collect::<Result<_>>()?;
    let (pkt, local) = target.engine(|| -> Result<_> {
        let pkt = pk_text(c, &pk)?;
        let local: Option<i64> = prep(c, "SELECT cl FROM _ichibase_crdt_rows WHERE tbl = ?1 AND pk = ?2")?
            .query_row(params![t.name, pkt], |r| r.get(0))
            .optional()?;
        Ok((pkt, local))
    })?;
    let cl_l = local.unwrap_or(0);
    if ch.cl < cl_l || (ch.cl == cl_l && ch.cl % 2 == 0) {
        return Ok(Outcome::Unchanged);
    }
    if local.is_none() && ch.cl % 2 == 0 && !target.trusted() {
        return Ok(Outcome::Unchanged);
    }
    // Columns this replica knows (a column only the sender has is left out).
    let known: Vec<(&String, &ColChange)> =
        ch.cols.iter().filter(|(n, _)| t.columns.contains(n)).collect();
    let max_hlc = ch.cols.values().map(|c| c.t).max().unwrap_or(0);
    if ch.cl > cl_l {
        let mut tomb: Option<String> = None;
        if cl_l % 2 == 1 {
            // The row is alive here in an older life: it goes (its last values kept for RLS).
            tomb = target.engine(|| row_json(c, t, &pk))?;
            target.delete(c, t, &pk)?;
        }
        if ch.cl % 2 == 1 {
            let mut row: Vec<(String, Value)> =
                t.pk.iter().cloned().zip(pk.iter().cloned()).collect();
            for (n, col) in &known {
                row.push(((*n).clone(), from_json(&col.v)?));
            }
            target.insert(c, t, &row)?;
            tomb = None;
        }
        target.engine(|| -> Result<()> {
            prep(c, "DELETE FROM _ichibase_crdt_clock WHERE tbl = ?1 AND pk = ?2")?
                .execute(params![t.name, pkt])?;
            for (n, col) in &known {
                let s = site_ord(c, &col.s)?;
                prep(c, 
                    "INSERT INTO _ichibase_crdt_clock (tbl, pk, col, hlc, site) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![t.name, pkt, n, col.t, s])?;
            }
            let v = bump(c, max_hlc)?;
            prep(c, 
                "INSERT INTO _ichibase_crdt_rows (tbl, pk, cl, hlc, db_version, tomb) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (tbl, pk) DO UPDATE SET cl = excluded.cl, hlc = max(hlc, excluded.hlc),
                   db_version = excluded.db_version, tomb = coalesce(excluded.tomb, CASE WHEN excluded.cl % 2 = 0 THEN tomb END)",
            )?
            .execute(params![t.name, pkt, ch.cl, max_hlc, v, tomb])?;
            Ok(())
        })?;
        return Ok(Outcome::Applied);
    }
    // Same life, alive: column by column, the larger (hlc, site) wins.
    let mut wins: Vec<(&String, &ColChange)> = Vec::new();
    target.engine(|| -> Result<()> {
        for (n, col) in &known {
            let local: Option<(i64, String)> = prep(c, 
                    "SELECT k.hlc, s.site FROM _ichibase_crdt_clock k JOIN _ichibase_crdt_sites s ON s.ord = k.site
                     WHERE k.tbl = ?1 AND k.pk = ?2 AND k.col = ?3",
                )?
                .query_row(params![t.name, pkt, n], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let newer = match &local {
                None => true,
                Some((h, s)) => (col.t, col.s.as_str()) > (*h, s.as_str()),
            };
            if newer {
                wins.push((*n, *col));
            }
        }
        Ok(())
    })?;
    if wins.is_empty() {
        target.engine(|| bump_hlc(c, max_hlc))?;
        return Ok(Outcome::Unchanged);
    }
    let sets: Vec<(String, Value)> = wins
        .iter()
        .map(|(n, col)| Ok(((*n).clone(), from_json(&col.v)?)))
        .collect::<Result<_>>()?;
    target.update(c, t, &pk, &sets)?;
    target.engine(|| -> Result<()> {
        for (n, col) in &wins {
            let s = site_ord(c, &col.s)?;
            prep(c, 
                "INSERT INTO _ichibase_crdt_clock (tbl, pk, col, hlc, site) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (tbl, pk, col) DO UPDATE SET hlc = excluded.hlc, site = excluded.site",
            )?
            .execute(params![t.name, pkt, n, col.t, s])?;
        }
        let v = bump(c, max_hlc)?;
        prep(c, 
            "UPDATE _ichibase_crdt_rows SET db_version = ?3, hlc = max(hlc, ?4) WHERE tbl = ?1 AND pk = ?2",
        )?
        .execute(params![t.name, pkt, v, max_hlc])?;
        Ok(())
    })?;
    Ok(Outcome::Applied)
}

/// The next db_version, with the HLC moved past `seen`.
fn bump(c: &Connection, seen: i64) -> Result<i64> {
    Ok(prep(c, 
        "UPDATE _ichibase_crdt_state SET db_version = db_version + 1, hlc = max(hlc, ?1) RETURNING db_version",
    )?
    .query_row([seen], |r| r.get(0))?)
}

fn bump_hlc(c: &Connection, seen: i64) -> Result<()> {
    prep(c, "UPDATE _ichibase_crdt_state SET hlc = max(hlc, ?1)")?
        .execute([seen])?;
    Ok(())
}

/// The row's values as a JSON object (for the tombstone), or None when it is not there.
fn row_json(c: &Connection, t: &TableInfo, pk: &[Value]) -> Result<Option<String>> {
    let cols: Vec<&String> = t.pk.iter().chain(t.columns.iter()).collect();
    let obj = cols
        .iter()
        .map(|col| {
            let q = quote_ident(col);
            format!("{}, CASE WHEN typeof({q}) = 'blob' THEN hex({q}) ELSE {q} END", lit(col))
        })
        .collect::<Vec<_>>()
        .join(", ");
    Ok(prep(c, &format!(
        "SELECT json_object({obj}) FROM {} WHERE {}",
        quote_ident(&t.name),
        where_pk(t, 0)
    ))?
    .query_row(rusqlite::params_from_iter(pk.iter()), |r| r.get(0))
    .optional()?)
}

/// What happened to one change of a batch.
#[derive(Debug, Clone, Serialize)]
pub struct ChangeResult {
    pub index: usize,
    pub table: String,
    pub pk: Vec<Json>,
    pub outcome: Option<Outcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Json>,
}

/// Merge a batch in one transaction: each change in its own savepoint, so a refused change
/// (its error reported) leaves the others applied. `after` runs last, inside the transaction
/// (the peer loop records its cursor there).
pub fn apply<T: Target>(
    c: &mut Connection,
    batch: &[RowChange],
    target: &T,
    limits: &MergeLimits,
    after: impl FnOnce(&Connection) -> Result<()>,
) -> Result<Vec<ChangeResult>> {
    let own_tx = c.is_autocommit();
    if own_tx {
        target.engine(|| c.execute_batch("BEGIN IMMEDIATE"))?;
    }
    let r = apply_inner(c, batch, target, limits, after);
    let end = target.engine(|| -> Result<()> {
        // `applying` back to 0 whatever happened, inside the same transaction.
        c.execute("UPDATE _ichibase_crdt_state SET applying = 0", [])?;
        Ok(())
    });
    if own_tx {
        target.engine(|| {
            if r.is_ok() && end.is_ok() {
                c.execute_batch("COMMIT")
            } else {
                c.execute_batch("ROLLBACK")
            }
        })?;
    }
    end?;
    r
}

fn apply_inner<T: Target>(
    c: &Connection,
    batch: &[RowChange],
    target: &T,
    limits: &MergeLimits,
    after: impl FnOnce(&Connection) -> Result<()>,
) -> Result<Vec<ChangeResult>> {
    let infos: BTreeMap<String, TableInfo> = target.engine(|| -> Result<_> {
        c.execute("UPDATE _ichibase_crdt_state SET applying = 1", [])?;
        Ok(list(c)?.into_iter().map(|t| (t.name.clone(), t)).collect())
    })?;
    let mut out = Vec::with_capacity(batch.len());
    for (index, ch) in batch.iter().enumerate() {
        let res = validate(&infos, ch, limits).and_then(|t| {
            target.engine(|| c.execute_batch("SAVEPOINT crdt_change"))?;
            match merge_one(c, &t, ch, target) {
                Ok(o) => {
                    target.engine(|| c.execute_batch("RELEASE crdt_change"))?;
                    Ok(o)
                }
                Err(e) => {
                    target.engine(|| c.execute_batch("ROLLBACK TO crdt_change; RELEASE crdt_change"))?;
                    Err(e)
                }
            }
        });
        out.push(ChangeResult {
            index,
            table: ch.table.clone(),
            pk: ch.pk.clone(),
            outcome: res.as_ref().ok().copied(),
            error: res.err().map(|e| {
                serde_json::json!({"code": e.code.number(), "name": e.code.name(), "message": e.message})
            }),
        });
    }
    target.engine(|| after(c))?;
    Ok(out)
}
