//! What ClickHouse clients probe before their first query, answered from the SQLite schema:
//! the functions `version()`, `timezone()`, `currentDatabase()`, `currentUser()`, `uptime()`,
//! the tables `system.tables`, `system.columns`, `system.databases`, `system.settings`,
//! `system.functions`, `system.formats`, and `SHOW TABLES`, `SHOW DATABASES`,
//! `DESCRIBE [TABLE] t`, `EXISTS [TABLE] t`.
//!
//! A statement naming a system table gets that name replaced by a subquery of literal rows
//! (`(SELECT ... FROM (VALUES ...)) AS tables`), built per request from the schema and filtered
//! by what the caller may see: the admin sees every table and view, other roles only objects
//! granted to them (`_ichibase_grants`). The schema is read with an elevated context on a
//! reader, never by the caller's SQL; the caller's statement then runs under its own authorizer
//! and reads nothing but literals.

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use rusqlite::Connection;
use rusqlite::functions::{Context, FunctionFlags};

use super::exec::Bound;
use super::format::Format;
use super::lexer::{TokKind, Token, tokenize};
use super::parse::unquote;
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::storage::{Authz, ExecControl, Storage};

/// What `version()` answers: the ClickHouse release whose HTTP interface this copies.
pub const SERVER_VERSION: &str = "24.8.0.0";
/// What `timezone()` answers: SQLite's `datetime('now')` is UTC.
pub const SERVER_TIMEZONE: &str = "UTC";
/// The one database.
pub const DATABASE: &str = "default";

static STARTED: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Start the `uptime()` clock (call once at startup).
pub fn mark_start() {
    LazyLock::force(&STARTED);
}

/// Register ClickHouse's introspection functions on a connection. `user` names the caller of
/// the request the connection serves now.
pub fn register_functions(
    conn: &Connection,
    user: Arc<dyn Fn() -> Option<String> + Send + Sync>,
) -> rusqlite::Result<()> {
    let flags = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_INNOCUOUS;
    let det = flags | FunctionFlags::SQLITE_DETERMINISTIC;
    conn.create_scalar_function("version", 0, det, |_c: &mut Context<'_>| Ok(SERVER_VERSION))?;
    conn.create_scalar_function("timezone", 0, det, |_c: &mut Context<'_>| {
        Ok(SERVER_TIMEZONE)
    })?;
    conn.create_scalar_function("currentDatabase", 0, det, |_c: &mut Context<'_>| {
        Ok(DATABASE)
    })?;
    conn.create_scalar_function("uptime", 0, flags, |_c: &mut Context<'_>| {
        Ok(STARTED.elapsed().as_secs() as i64)
    })?;
    conn.create_scalar_function("currentUser", 0, flags, move |_c: &mut Context<'_>| {
        Ok(user())
    })?;
    Ok(())
}

/// Names of the functions above (lower-case), callable by every role.
pub const FUNCTIONS: &[&str] = &[
    "version",
    "timezone",
    "currentdatabase",
    "currentuser",
    "uptime",
];

/// The caller's name as `currentUser()` reports it: the email when signed in, else the role.
pub fn user_name(ctx: &RequestContext) -> String {
    ctx.claim("email")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| ctx.role.as_str().to_string())
}

/// Settings listed in `system.settings`: (name, value, writable by a request, description).
/// Clients read this to decide what to send; each is one `apis::sql` accepts.
pub struct SettingRow {
    pub name: &'static str,
    pub value: String,
    pub readonly: bool,
    pub description: &'static str,
}

/// `system.settings`: the settings a request may pass, with this request's values.
pub fn settings_rows(q: &super::exec::QuerySettings) -> Vec<SettingRow> {
    let b = |v: bool| if v { "1" } else { "0" }.to_string();
    vec![
        SettingRow {
            name: "max_result_rows",
            value: q.max_result_rows.to_string(),
            readonly: false,
            description: "Most rows of a result (0: the server's limit); a request may only lower it",
        },
        SettingRow {
            name: "max_result_bytes",
            value: q.max_result_bytes.to_string(),
            readonly: false,
            description: "Most bytes of a result (0: the server's limit); a request may only lower it",
        },
        SettingRow {
            name: "result_overflow_mode",
            value: if q.overflow_break { "break" } else { "throw" }.into(),
            readonly: false,
            description: "throw or break when a result limit is reached",
        },
        SettingRow {
            name: "max_execution_time",
            value: "0".into(),
            readonly: false,
            description: "Seconds a query may run (0: the server's limit); a request may only lower it",
        },
        SettingRow {
            name: "readonly",
            value: b(q.readonly),
            readonly: false,
            description: "1 or 2: refuse writes",
        },
        SettingRow {
            name: "output_format_json_quote_64bit_integers",
            value: b(q.quote_i64),
            readonly: false,
            description: "Quote 64-bit integers in JSON formats",
        },
        SettingRow {
            name: "wait_end_of_query",
            value: "0".into(),
            readonly: false,
            description: "Buffer the whole answer before sending it",
        },
        SettingRow {
            name: "max_query_size",
            value: q.max_query_size.to_string(),
            readonly: true,
            description: "Largest SQL text, bytes",
        },
        SettingRow {
            name: "enable_http_compression",
            value: "0".into(),
            readonly: false,
            description: "Compress the response as Accept-Encoding asks (gzip, deflate, zstd, br)",
        },
        SettingRow {
            name: "send_progress_in_http_headers",
            value: "0".into(),
            readonly: false,
            description: "Accepted; no progress headers are sent",
        },
        SettingRow {
            name: "http_headers_progress_interval_ms",
            value: "100".into(),
            readonly: false,
            description: "Accepted; no progress headers are sent",
        },
        SettingRow {
            name: "cancel_http_readonly_queries_on_client_close",
            value: "1".into(),
            readonly: false,
            description: "Queries are always cancelled when the client goes away",
        },
        SettingRow {
            name: "transaction",
            value: "0".into(),
            readonly: false,
            description: "ichibase: run several statements in one transaction",
        },
    ]
}

/// One column of a table or view.
#[derive(Debug, Clone)]
pub struct ColumnInfo {
    pub name: String,
    pub decl: String,
    pub notnull: bool,
    pub default: Option<String>,
    pub pk: bool,
}

/// One table or view the caller may see.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub name: String,
    pub is_view: bool,
    pub columns: Vec<ColumnInfo>,
}

/// The schema as the caller may see it.
#[derive(Debug, Default)]
pub struct Catalog {
    pub tables: Vec<TableInfo>,
    pub functions: Vec<String>,
}

impl Catalog {
    fn find(&self, name: &str) -> Option<&TableInfo> {
        self.tables
            .iter()
            .find(|t| t.name.eq_ignore_ascii_case(name))
    }
}

/// ClickHouse's name for the values a column of declared type `decl` holds (SQLite affinity
/// rules, plus date/time and boolean names), without `Nullable`.
pub fn base_type(decl: &str) -> &'static str {
    let d = decl.to_ascii_uppercase();
    if d.contains("INT") {
        "Int64"
    } else if d.contains("CHAR") || d.contains("CLOB") || d.contains("TEXT") {
        "String"
    } else if d.contains("REAL") || d.contains("FLOA") || d.contains("DOUB") {
        "Float64"
    } else if d.contains("DATE") || d.contains("TIME") || d.contains("UUID") || d.contains("JSON") {
        "String"
    } else if d.contains("BOOL") {
        "Int64"
    } else if d.contains("NUM") || d.contains("DEC") {
        "Float64"
    } else {
        // BLOB or no declared type: any bytes.
        "String"
    }
}

/// ClickHouse type of a table column as `DESCRIBE` and `system.columns` report it. Every
/// column is `Nullable`: SQLite result columns do not say whether they can hold NULL, and
/// the binary formats must agree with `DESCRIBE` about it.
pub fn column_ch_type(decl: &str) -> String {
    format!("Nullable({})", base_type(decl))
}

fn is_system_word(t: &Token, sql: &str) -> bool {
    t.kind == TokKind::Word
        && t.text(sql).len() > 7
        && t.text(sql)[..7].eq_ignore_ascii_case("system.")
}

fn first_word(toks: &[Token], sql: &str) -> String {
    toks.first()
        .filter(|t| t.kind == TokKind::Word)
        .map(|t| t.text(sql).to_ascii_uppercase())
        .unwrap_or_default()
}

/// True when some statement needs the catalog.
pub(crate) fn needed(statements: &[Bound]) -> bool {
    statements.iter().any(|b| {
        matches!(b.verb.as_str(), "SHOW" | "DESCRIBE" | "DESC" | "EXISTS")
            || (b.sql.len() > 7
                && b.sql.to_ascii_lowercase().contains("system.")
                && tokenize(&b.sql)
                    .map(|toks| toks.iter().any(|t| is_system_word(t, &b.sql)))
                    .unwrap_or(false))
    })
}

/// Read the schema the caller may see (elevated: the caller's own SQL never reads it). The
/// engine's own `_ichibase_*` tables are not listed (the admin may still query them).
pub async fn load(
    storage: &Storage,
    ctx: &RequestContext,
    control: Arc<ExecControl>,
) -> Result<Catalog> {
    let mut elevated = ctx.clone();
    elevated.elevated = true;
    let authz = Arc::clone(storage.authz());
    let role = ctx.role.as_str().to_string();
    let role = (!ctx.is_admin()).then_some(role);
    // Checking out a reader as a non-admin role refreshes the grant snapshot first.
    storage
        .read(&elevated, control, move |conn| {
            read_catalog(conn, &authz, role.as_deref())
        })
        .await
}

fn read_catalog(conn: &Connection, authz: &Authz, role: Option<&str>) -> Result<Catalog> {
    let mut tables: Vec<TableInfo> = Vec::new();
    let mut st = conn.prepare_cached(
        "SELECT m.type, m.name, p.name, coalesce(p.type, ''), p.\"notnull\", p.dflt_value, p.pk
         FROM sqlite_schema m JOIN pragma_table_info(m.name) p
         WHERE m.type IN ('table', 'view') AND m.name NOT LIKE 'sqlite\\_%' ESCAPE '\\'
           AND m.name NOT LIKE '\\_ichibase\\_%' ESCAPE '\\'
         ORDER BY m.name, p.cid",
    )?;
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        let (ty, name): (String, String) = (r.get(0)?, r.get(1)?);
        if let Some(role) = role {
            if !authz.granted(role, &name) {
                continue;
            }
        }
        let col = ColumnInfo {
            name: r.get(2)?,
            decl: r.get(3)?,
            notnull: r.get::<_, i64>(4)? != 0,
            default: r.get(5)?,
            pk: r.get::<_, i64>(6)? != 0,
        };
        match tables.last_mut() {
            Some(t) if t.name == name => t.columns.push(col),
            _ => tables.push(TableInfo {
                name,
                is_view: ty == "view",
                columns: vec![col],
            }),
        }
    }
    drop(rows);
    let mut functions: Vec<String> = Vec::new();
    let mut st =
        conn.prepare_cached("SELECT DISTINCT name FROM pragma_function_list ORDER BY name")?;
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        let name: String = r.get(0)?;
        if role.is_none() || crate::storage::authz::function_allowed(&name) {
            functions.push(name);
        }
    }
    Ok(Catalog { tables, functions })
}

/// A literal of a generated row.
enum Lit {
    Int(i64),
    Str(String),
}

fn lit_sql(l: &Lit, out: &mut String) {
    match l {
        Lit::Int(i) => out.push_str(&i.to_string()),
        Lit::Str(s) => {
            out.push('\'');
            for c in s.chars() {
                if c == '\'' {
                    out.push('\'');
                }
                out.push(c);
            }
            out.push('\'');
        }
    }
}

fn s(v: impl Into<String>) -> Lit {
    Lit::Str(v.into())
}

/// `(SELECT column1 AS "a", ... FROM (VALUES (...), ...))`.
fn rows_subquery(cols: &[&str], rows: &[Vec<Lit>]) -> String {
    let mut out = String::from("(SELECT ");
    for (i, c) in cols.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        if rows.is_empty() {
            out.push_str("NULL");
        } else {
            out.push_str(&format!("column{}", i + 1));
        }
        out.push_str(&format!(" AS \"{c}\""));
    }
    if rows.is_empty() {
        out.push_str(" WHERE 0)");
        return out;
    }
    out.push_str(" FROM (VALUES ");
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for (j, l) in r.iter().enumerate() {
            if j > 0 {
                out.push_str(", ");
            }
            lit_sql(l, &mut out);
        }
        out.push(')');
    }
    out.push_str("))");
    out
}

fn system_table(name: &str, cat: &Catalog, settings: &[SettingRow]) -> Result<String> {
    Ok(match name {
        "tables" => rows_subquery(
            &[
                "database",
                "name",
                "engine",
                "is_temporary",
                "comment",
                "uuid",
            ],
            &cat.tables
                .iter()
                .map(|t| {
                    vec![
                        s(DATABASE),
                        s(t.name.clone()),
                        s(if t.is_view { "View" } else { "SQLite" }),
                        Lit::Int(0),
                        s(""),
                        s("00000000-0000-0000-0000-000000000000"),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
        "columns" => {
            let mut rows = Vec::new();
            for t in &cat.tables {
                for (i, c) in t.columns.iter().enumerate() {
                    rows.push(vec![
                        s(DATABASE),
                        s(t.name.clone()),
                        s(c.name.clone()),
                        s(column_ch_type(&c.decl)),
                        Lit::Int(i as i64 + 1),
                        s(if c.default.is_some() { "DEFAULT" } else { "" }),
                        s(c.default.clone().unwrap_or_default()),
                        s(""),
                        Lit::Int(c.pk as i64),
                        s(c.decl.clone()),
                        Lit::Int(c.notnull as i64),
                    ]);
                }
            }
            rows_subquery(
                &[
                    "database",
                    "table",
                    "name",
                    "type",
                    "position",
                    "default_kind",
                    "default_expression",
                    "comment",
                    "is_in_primary_key",
                    "sqlite_type",
                    "sqlite_notnull",
                ],
                &rows,
            )
        }
        "databases" => rows_subquery(
            &["name", "engine", "comment"],
            &[vec![s(DATABASE), s("SQLite"), s("")]],
        ),
        "settings" => rows_subquery(
            &[
                "name",
                "value",
                "changed",
                "description",
                "readonly",
                "type",
            ],
            &settings
                .iter()
                .map(|r| {
                    vec![
                        s(r.name),
                        s(r.value.clone()),
                        Lit::Int(0),
                        s(r.description),
                        Lit::Int(r.readonly as i64),
                        s("String"),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
        "functions" => rows_subquery(
            &["name", "is_aggregate", "case_insensitive", "alias_to"],
            &cat.functions
                .iter()
                .map(|f| {
                    let agg = matches!(
                        f.as_str(),
                        "avg"
                            | "count"
                            | "group_concat"
                            | "max"
                            | "min"
                            | "sum"
                            | "total"
                            | "string_agg"
                    );
                    vec![s(f.clone()), Lit::Int(agg as i64), Lit::Int(1), s("")]
                })
                .collect::<Vec<_>>(),
        ),
        "formats" => rows_subquery(
            &["name", "is_input", "is_output"],
            &Format::ALL
                .iter()
                .map(|f| vec![s(f.name()), Lit::Int(1), Lit::Int(1)])
                .collect::<Vec<_>>(),
        ),
        "one" => rows_subquery(&["dummy"], &[vec![Lit::Int(0)]]),
        other => {
            return Err(Error::new(
                ErrorCode::UnknownTable,
                format!(
                    "Table system.{other} does not exist; ichibase has system.tables, system.columns, system.databases, system.settings, system.functions, system.formats and system.one"
                ),
            ));
        }
    })
}

/// Words after a table name that are not an alias.
const NOT_ALIAS: &[&str] = &[
    "WHERE",
    "LIMIT",
    "ORDER",
    "GROUP",
    "JOIN",
    "LEFT",
    "RIGHT",
    "INNER",
    "CROSS",
    "FULL",
    "NATURAL",
    "ON",
    "USING",
    "UNION",
    "INTERSECT",
    "EXCEPT",
    "HAVING",
    "WINDOW",
    "OFFSET",
    "FORMAT",
    "SETTINGS",
    "OUTER",
];

/// Replace `system.X` names by their rows.
fn replace_system_tables(sql: &str, cat: &Catalog, settings: &[SettingRow]) -> Result<String> {
    let toks = tokenize(sql)?;
    let mut out = String::with_capacity(sql.len());
    let mut copied = 0;
    let select = toks
        .first()
        .is_some_and(|t| t.is_word(sql, "SELECT") || t.is_word(sql, "WITH"));
    for (i, t) in toks.iter().enumerate() {
        // ClickHouse's column `table` (system.columns) is a keyword to SQLite, and never one in
        // a SELECT: quote it.
        if select && t.is_word(sql, "table") {
            out.push_str(&sql[copied..t.start]);
            out.push_str("\"table\"");
            copied = t.end;
            continue;
        }
        if !is_system_word(t, sql) {
            continue;
        }
        let name = t.text(sql)[7..].to_ascii_lowercase();
        out.push_str(&sql[copied..t.start]);
        out.push_str(&system_table(&name, cat, settings)?);
        let aliased = toks.get(i + 1).is_some_and(|n| {
            n.kind == TokKind::QuotedIdent
                || (n.kind == TokKind::Word
                    && !NOT_ALIAS
                        .iter()
                        .any(|k| n.text(sql).eq_ignore_ascii_case(k)))
        });
        if !aliased {
            out.push_str(&format!(" AS \"{name}\""));
        }
        copied = t.end;
    }
    out.push_str(&sql[copied..]);
    Ok(out)
}

/// `name`, `"name"`, `default.name`: the table name, or an error naming another database.
fn table_name(toks: &[Token], sql: &str) -> Result<String> {
    let text: String = toks
        .iter()
        .map(|t| t.text(sql))
        .collect::<Vec<_>>()
        .join("");
    let text = text.trim();
    if text.is_empty() {
        return Err(Error::syntax("Expected a table name"));
    }
    let name = match text.split_once('.') {
        Some((db, rest)) if !db.starts_with(['"', '`', '[']) => {
            let db = unquote(db);
            if !matches!(db.as_str(), "default" | "main") {
                return Err(Error::new(
                    ErrorCode::UnknownDatabase,
                    format!("Database {db} does not exist; ichibase has one database, 'default'"),
                ));
            }
            rest.to_string()
        }
        _ => text.to_string(),
    };
    Ok(unquote(&name))
}

/// Rewrite SHOW / DESCRIBE / EXISTS statements into queries on system tables.
fn rewrite_statement(sql: &str, cat: &Catalog) -> Result<Option<String>> {
    let toks = tokenize(sql)?;
    let verb = first_word(&toks, sql);
    let word = |i: usize| {
        toks.get(i)
            .filter(|t| t.kind == TokKind::Word)
            .map(|t| t.text(sql).to_ascii_uppercase())
            .unwrap_or_default()
    };
    Ok(match verb.as_str() {
        "SHOW" => match word(1).as_str() {
            "TABLES" => {
                // SHOW TABLES [FROM|IN db] [[NOT] LIKE 'pattern']
                let mut i = 2;
                if matches!(word(i).as_str(), "FROM" | "IN") {
                    let db = toks
                        .get(i + 1)
                        .map(|t| unquote(t.text(sql)))
                        .unwrap_or_default();
                    if !matches!(db.as_str(), "default" | "main") {
                        return Err(Error::new(
                            ErrorCode::UnknownDatabase,
                            format!(
                                "Database {db} does not exist; ichibase has one database, 'default'"
                            ),
                        ));
                    }
                    i += 2;
                }
                let mut filter = String::new();
                let not = word(i) == "NOT";
                if not {
                    i += 1;
                }
                if matches!(word(i).as_str(), "LIKE" | "ILIKE") {
                    let pat = toks
                        .get(i + 1)
                        .filter(|t| t.kind == TokKind::Str)
                        .ok_or_else(|| Error::syntax("SHOW TABLES LIKE needs a string pattern"))?;
                    filter = format!(
                        " WHERE name {}LIKE {}",
                        if not { "NOT " } else { "" },
                        pat.text(sql)
                    );
                } else if toks.len() > i {
                    return Err(Error::syntax(
                        "Expected SHOW TABLES [FROM default] [[NOT] LIKE 'pattern']",
                    ));
                }
                Some(format!(
                    "SELECT name FROM system.tables{filter} ORDER BY name"
                ))
            }
            "DATABASES" => Some("SELECT name FROM system.databases".to_string()),
            _ => None,
        },
        "DESCRIBE" | "DESC" | "EXISTS" => {
            let mut i = 1;
            if matches!(word(i).as_str(), "TABLE" | "VIEW") {
                i += 1;
            }
            if verb == "EXISTS" && word(1) == "TEMPORARY" {
                return Ok(Some("SELECT 0 AS result".into()));
            }
            let name = table_name(&toks[i.min(toks.len())..], sql)?;
            let found = cat.find(&name);
            if verb == "EXISTS" {
                return Ok(Some(format!(
                    "SELECT {} AS result",
                    u8::from(found.is_some())
                )));
            }
            let t = found.ok_or_else(|| {
                Error::new(
                    ErrorCode::UnknownTable,
                    format!("Table default.{name} does not exist"),
                )
            })?;
            let rows: Vec<Vec<Lit>> = t
                .columns
                .iter()
                .map(|c| {
                    vec![
                        s(c.name.clone()),
                        s(column_ch_type(&c.decl)),
                        s(if c.default.is_some() { "DEFAULT" } else { "" }),
                        s(c.default.clone().unwrap_or_default()),
                        s(""),
                        s(""),
                        s(""),
                    ]
                })
                .collect();
            Some(format!(
                "SELECT * FROM {}",
                rows_subquery(
                    &[
                        "name",
                        "type",
                        "default_type",
                        "default_expression",
                        "comment",
                        "codec_expression",
                        "ttl_expression",
                    ],
                    &rows,
                )
            ))
        }
        _ => None,
    })
}

/// Rewrite every statement that needs the catalog.
pub(crate) fn expand(
    statements: &mut [Bound],
    cat: &Catalog,
    settings: &[SettingRow],
) -> Result<()> {
    for b in statements.iter_mut() {
        if let Some(sql) = rewrite_statement(&b.sql, cat)? {
            if !b.values.is_empty() {
                return Err(Error::syntax(format!(
                    "{} does not take query parameters",
                    b.verb
                )));
            }
            b.sql = sql;
            b.verb = "SELECT".into();
        }
        if b.sql.to_ascii_lowercase().contains("system.") {
            b.sql = replace_system_tables(&b.sql, cat, settings)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cat() -> Catalog {
        Catalog {
            tables: vec![TableInfo {
                name: "t".into(),
                is_view: false,
                columns: vec![ColumnInfo {
                    name: "a".into(),
                    decl: "INTEGER".into(),
                    notnull: false,
                    default: None,
                    pk: true,
                }],
            }],
            functions: vec!["abs".into()],
        }
    }

    fn run(sql: &str) -> Vec<Vec<String>> {
        let c = Connection::open_in_memory().unwrap();
        let mut st = c.prepare(sql).unwrap();
        let n = st.column_count();
        let mut rows = st.query([]).unwrap();
        let mut out = Vec::new();
        while let Some(r) = rows.next().unwrap() {
            out.push(
                (0..n)
                    .map(|i| match r.get_ref(i).unwrap() {
                        rusqlite::types::ValueRef::Integer(i) => i.to_string(),
                        rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into(),
                        _ => "NULL".into(),
                    })
                    .collect(),
            );
        }
        out
    }

    #[test]
    fn system_tables_become_rows() {
        let sql = replace_system_tables(
            "SELECT name FROM system.tables WHERE database = 'default'",
            &cat(),
            &[],
        )
        .unwrap();
        assert_eq!(run(&sql), vec![vec!["t".to_string()]]);
        let sql = replace_system_tables(
            "SELECT name FROM system.columns WHERE table = 't'",
            &cat(),
            &[],
        )
        .unwrap();
        assert_eq!(run(&sql), vec![vec!["a".to_string()]]);
        let sql =
            replace_system_tables("SELECT count(*) FROM system.settings s", &cat(), &[]).unwrap();
        assert_eq!(run(&sql), vec![vec!["0".to_string()]]);
    }

    #[test]
    fn describe_and_exists() {
        let sql = rewrite_statement("DESCRIBE TABLE default.\"t\"", &cat())
            .unwrap()
            .unwrap();
        assert_eq!(
            run(&sql)[0][..2],
            ["a".to_string(), "Nullable(Int64)".to_string()]
        );
        let sql = rewrite_statement("EXISTS TABLE nope", &cat())
            .unwrap()
            .unwrap();
        assert_eq!(run(&sql), vec![vec!["0".to_string()]]);
        let e = rewrite_statement("DESC nope", &cat()).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownTable);
        let sql = rewrite_statement("SHOW TABLES LIKE 't%'", &cat())
            .unwrap()
            .unwrap();
        let sql = replace_system_tables(&sql, &cat(), &[]).unwrap();
        assert_eq!(run(&sql), vec![vec!["t".to_string()]]);
    }
}
