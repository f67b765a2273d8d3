//! Row-level security policies as permanent SQL views, and grants.
//!
//! A policy `name` over table `t` is a view `name` = `SELECT * FROM t WHERE (<using>)`, plus
//! INSTEAD OF triggers that let the granted roles insert, update and delete through it, each
//! refusing a row that fails `<check>` (`RAISE(ABORT, 'policy name: row violates WITH CHECK')`).
//! The view, its triggers, a row in `_ichibase_policies` and the grants to its roles are created
//! (or replaced) in one transaction. Predicates are SQL expressions over the table's columns and
//! may call `auth_userid()`, `auth_role()` and `auth_claim(name)`.
//!
//! The storage authorizer then lets a role reach the table's rows only through views granted to
//! it. This module only writes DDL and engine rows; it runs on the writer as the admin.

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::core::{Error, ErrorCode, Result};
use crate::sql::parse::quote_ident;

/// A policy as declared by an admin.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Name of the view users query (e.g. `my_notes`).
    pub name: String,
    /// The base table it guards.
    pub table: String,
    /// Roles that may use the view (e.g. `["user"]`, `["anon"]`).
    pub roles: Vec<String>,
    /// Operations granted: any of `select`, `insert`, `update`, `delete` (default: all four).
    #[serde(default = "all_operations")]
    pub operations: Vec<String>,
    /// Which rows are visible (and updatable / deletable): SQL `USING` predicate.
    #[serde(rename = "using")]
    pub using_expr: String,
    /// Which new or changed rows are accepted: SQL `WITH CHECK` predicate (default: `using`).
    #[serde(default, rename = "check")]
    pub check_expr: Option<String>,
    /// Column values filled in when an insert leaves them NULL, as SQL expressions
    /// (e.g. `{"owner": "auth_userid()"}`); columns with a table DEFAULT get that default.
    #[serde(default)]
    pub defaults: serde_json::Map<String, Json>,
}

fn all_operations() -> Vec<String> {
    ["select", "insert", "update", "delete"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorCode::BadArguments, msg)
}

fn check_name(what: &str, n: &str) -> Result<()> {
    if n.is_empty()
        || n.len() > 128
        || !n.chars().all(|c| c.is_alphanumeric() || c == '_')
        || n.chars().next().is_some_and(|c| c.is_ascii_digit())
    {
        return Err(bad(format!(
            "{what} '{n}' must be letters, digits and '_' (not starting with a digit)"
        )));
    }
    if n.to_ascii_lowercase().starts_with("_ichibase")
        || n.to_ascii_lowercase().starts_with("sqlite_")
    {
        return Err(bad(format!("{what} '{n}' uses a reserved prefix")));
    }
    Ok(())
}

fn check_role(r: &str) -> Result<()> {
    if r.is_empty()
        || r.len() > 64
        || !r
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        || r == "admin"
    {
        return Err(bad(format!(
            "role '{r}' is not a valid non-admin role name"
        )));
    }
    Ok(())
}

/// A predicate may not end the statement it is placed in.
/// An error SQLite reported for generated SQL that embeds `expr` at byte `start`: the offset
/// is given within `expr` (or left out when it points elsewhere).
fn expr_error(what: &str, e: rusqlite::Error, start: usize, expr: &str) -> Error {
    if let rusqlite::Error::SqlInputError { msg, offset, .. } = &e {
        let off = *offset as i64 - start as i64;
        return match usize::try_from(off).ok().filter(|o| *o <= expr.len()) {
            Some(o) => {
                let near: String = expr.get(o..).unwrap_or("").chars().take(40).collect();
                bad(format!("{what}: {msg} (at offset {o} of {what}: '{near}')"))
            }
            None => bad(format!("{what}: {msg}")),
        };
    }
    bad(format!("{what}: {}", Error::from(e).message))
}

fn check_expr(what: &str, e: &str) -> Result<()> {
    let toks = crate::sql::lexer::tokenize(e).map_err(|x| bad(format!("{what}: {}", x.message)))?;
    if toks.is_empty() {
        return Err(bad(format!("{what} is empty")));
    }
    if toks.iter().any(|t| {
        matches!(
            t.kind,
            crate::sql::lexer::TokKind::Semicolon
                | crate::sql::lexer::TokKind::Param { .. }
                | crate::sql::lexer::TokKind::NativeParam
        )
    }) {
        return Err(bad(format!(
            "{what} must be one SQL expression (no ';' or parameters)"
        )));
    }
    let mut depth = 0i64;
    for t in &toks {
        match t.kind {
            crate::sql::lexer::TokKind::LParen => depth += 1,
            crate::sql::lexer::TokKind::RParen => {
                depth -= 1;
                if depth < 0 {
                    return Err(bad(format!("{what} has unbalanced parentheses")));
                }
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(bad(format!("{what} has unbalanced parentheses")));
    }
    Ok(())
}

struct ColumnInfo {
    name: String,
    default: Option<String>,
    pk: bool,
}

fn table_columns(c: &Connection, table: &str) -> Result<Vec<ColumnInfo>> {
    let kind: Option<String> = c
        .query_row(
            "SELECT type FROM sqlite_schema WHERE name = ?1 COLLATE NOCASE",
            [table],
            |r| r.get(0),
        )
        .optional()?;
    match kind.as_deref() {
        Some("table") => {}
        Some(other) => return Err(bad(format!("'{table}' is a {other}, not a table"))),
        None => {
            return Err(Error::new(
                ErrorCode::UnknownTable,
                format!("No table '{table}'"),
            ));
        }
    }
    let mut st = c.prepare(
        "SELECT name, dflt_value, pk FROM pragma_table_xinfo(?1) WHERE hidden IN (0, 1)",
    )?;
    let cols = st
        .query_map([table], |r| {
            Ok(ColumnInfo {
                name: r.get(0)?,
                default: r.get(1)?,
                pk: r.get::<_, i64>(2)? > 0,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(cols)
}

/// Create or replace a policy (view, triggers, grants, record) in one transaction.
pub fn create(c: &mut Connection, spec: &PolicySpec) -> Result<()> {
    check_name("policy name", &spec.name)?;
    check_name("table", &spec.table)?;
    if spec.roles.is_empty() {
        return Err(bad("a policy needs at least one role"));
    }
    for r in &spec.roles {
        check_role(r)?;
    }
    for op in &spec.operations {
        if !matches!(op.as_str(), "select" | "insert" | "update" | "delete") {
            return Err(bad(format!(
                "unknown operation '{op}' (select, insert, update, delete)"
            )));
        }
    }
    if !spec.operations.iter().any(|o| o == "select") {
        return Err(bad("a policy view must at least grant select"));
    }
    check_expr("using", &spec.using_expr)?;
    let check = spec
        .check_expr
        .clone()
        .unwrap_or_else(|| spec.using_expr.clone());
    check_expr("check", &check)?;
    let tx = c.savepoint()?; // nests inside a bundle merge
    // Replacing: the name may not belong to something else.
    let existing: Option<String> = tx
        .query_row(
            "SELECT type FROM sqlite_schema WHERE name = ?1 COLLATE NOCASE",
            [&spec.name],
            |r| r.get(0),
        )
        .optional()?;
    let is_ours: bool = tx.query_row(
        "SELECT count(*) FROM _ichibase_policies WHERE name = ?1",
        [&spec.name],
        |r| r.get::<_, i64>(0),
    )? > 0;
    if existing.is_some() && !is_ours {
        return Err(bad(format!(
            "'{}' exists already and is not a policy view",
            spec.name
        )));
    }
    let cols = table_columns(&tx, &spec.table)?;
    let writes = spec
        .operations
        .iter()
        .any(|o| o == "update" || o == "delete");
    let pk: Vec<&ColumnInfo> = cols.iter().filter(|c| c.pk).collect();
    if writes && pk.is_empty() {
        return Err(bad(format!(
            "table '{}' needs a PRIMARY KEY for a policy that updates or deletes",
            spec.table
        )));
    }
    for k in spec.defaults.keys() {
        if !cols.iter().any(|c| c.name.eq_ignore_ascii_case(k)) {
            return Err(bad(format!(
                "defaults: table '{}' has no column '{k}'",
                spec.table
            )));
        }
    }
    let view = quote_ident(&spec.name);
    let table = quote_ident(&spec.table);
    let msg = format!(
        "policy {}: row violates WITH CHECK ({})",
        spec.name,
        check.replace('\'', "''")
    );
    let raise = format!("SELECT RAISE(ABORT, '{msg}')");
    let new_row = |prefix: &str, with_defaults: bool| -> Result<String> {
        let mut parts = Vec::new();
        for c in &cols {
            let mut v = format!("{prefix}.{}", quote_ident(&c.name));
            if with_defaults {
                if let Some(d) = spec
                    .defaults
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(&c.name))
                    .map(|(_, v)| v)
                {
                    let d = d.as_str().ok_or_else(|| {
                        bad(format!(
                            "defaults.{}: give an SQL expression as a string",
                            c.name
                        ))
                    })?;
                    check_expr(&format!("defaults.{}", c.name), d)?;
                    v = format!("coalesce({v}, ({d}))");
                } else if let Some(d) = &c.default {
                    v = format!("coalesce({v}, ({d}))");
                }
            }
            parts.push(format!("{v} AS {}", quote_ident(&c.name)));
        }
        Ok(parts.join(", "))
    };
    // The expressions are tried on their own first, so an error's offset points into the
    // user's text, not into the generated view or triggers.
    for (what, expr) in [("using", Some(&spec.using_expr)), ("check", spec.check_expr.as_ref())] {
        let Some(expr) = expr else { continue };
        let head = format!("SELECT * FROM {table} WHERE (");
        tx.prepare(&format!("{head}{expr})"))
            .map_err(|e| expr_error(what, e, head.len(), expr))?;
    }
    tx.execute_batch(&format!("DROP VIEW IF EXISTS {view}"))?;
    let head = format!("CREATE VIEW {view} AS SELECT * FROM {table} WHERE (");
    tx.execute_batch(&format!("{head}{})", spec.using_expr))
        .map_err(|e| expr_error("using", e, head.len(), &spec.using_expr))?;
    let ops = |o: &str| spec.operations.iter().any(|x| x == o);
    let col_list = cols
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let pk_match = pk
        .iter()
        .map(|c| format!("{} = OLD.{}", quote_ident(&c.name), quote_ident(&c.name)))
        .collect::<Vec<_>>()
        .join(" AND ");
    if ops("insert") {
        let row = new_row("NEW", true)?;
        tx.execute_batch(&format!(
            "CREATE TRIGGER {trig} INSTEAD OF INSERT ON {view} BEGIN
                 {raise} WHERE NOT EXISTS (SELECT 1 FROM (SELECT {row}) WHERE ({check}));
                 INSERT INTO {table} ({col_list}) SELECT * FROM (SELECT {row});
             END",
            trig = quote_ident(&format!("{}__insert", spec.name)),
        ))
        .map_err(|e| bad(format!("check / defaults: {}", Error::from(e).message)))?;
    }
    if ops("update") {
        let row = new_row("NEW", false)?;
        let sets = cols
            .iter()
            .map(|c| format!("{0} = NEW.{0}", quote_ident(&c.name)))
            .collect::<Vec<_>>()
            .join(", ");
        tx.execute_batch(&format!(
            "CREATE TRIGGER {trig} INSTEAD OF UPDATE ON {view} BEGIN
                 {raise} WHERE NOT EXISTS (SELECT 1 FROM (SELECT {row}) WHERE ({check}));
                 UPDATE {table} SET {sets} WHERE {pk_match};
             END",
            trig = quote_ident(&format!("{}__update", spec.name)),
        ))
        .map_err(|e| bad(format!("check: {}", Error::from(e).message)))?;
    }
    if ops("delete") {
        tx.execute_batch(&format!(
            "CREATE TRIGGER {trig} INSTEAD OF DELETE ON {view} BEGIN DELETE FROM {table} WHERE {pk_match}; END",
            trig = quote_ident(&format!("{}__delete", spec.name)),
        ))?;
    }
    // Prove the view and triggers compile against the table now, not at first use.
    tx.prepare(&format!("SELECT * FROM {view} LIMIT 0"))
        .map_err(|e| bad(format!("using: {}", Error::from(e).message)))?;
    tx.execute(
        "DELETE FROM _ichibase_grants WHERE object = ?1 COLLATE NOCASE",
        [&spec.name],
    )?;
    for r in &spec.roles {
        for op in &spec.operations {
            tx.execute(
                "INSERT INTO _ichibase_grants (object, role, privilege) VALUES (?1, ?2, ?3)",
                params![spec.name, r, op],
            )?;
        }
    }
    tx.execute(
        "INSERT OR REPLACE INTO _ichibase_policies (name, table_name, roles, operations, using_expr, check_expr, defaults) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            spec.name,
            spec.table,
            serde_json::to_string(&spec.roles).unwrap(),
            serde_json::to_string(&spec.operations).unwrap(),
            spec.using_expr,
            spec.check_expr,
            serde_json::to_string(&spec.defaults).unwrap()
        ],
    )?;
    tx.commit()?;
    Ok(())
}

/// Drop a policy's view (with its triggers), grants and record.
pub fn drop(c: &mut Connection, name: &str) -> Result<()> {
    let tx = c.transaction()?;
    let n = tx.execute("DELETE FROM _ichibase_policies WHERE name = ?1", [name])?;
    if n == 0 {
        return Err(Error::new(
            ErrorCode::NotFound,
            format!("No policy '{name}'"),
        ));
    }
    tx.execute_batch(&format!("DROP VIEW IF EXISTS {}", quote_ident(name)))?;
    tx.execute(
        "DELETE FROM _ichibase_grants WHERE object = ?1 COLLATE NOCASE",
        [name],
    )?;
    tx.commit()?;
    Ok(())
}

pub fn list(c: &Connection) -> Result<Vec<PolicySpec>> {
    let mut st = c.prepare("SELECT name, table_name, roles, operations, using_expr, check_expr, defaults FROM _ichibase_policies ORDER BY name")?;
    let rows = st
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, String>(6)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows
        .into_iter()
        .map(
            |(name, table, roles, ops, using_expr, check_expr, defaults)| PolicySpec {
                name,
                table,
                roles: serde_json::from_str(&roles).unwrap_or_default(),
                operations: serde_json::from_str(&ops).unwrap_or_default(),
                using_expr,
                check_expr,
                defaults: serde_json::from_str(&defaults).unwrap_or_default(),
            },
        )
        .collect())
}

/// A grant of privileges on an object (a policy view or an explicitly public table) to a role.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantSpec {
    /// Table or view name.
    pub object: String,
    pub role: String,
    pub privileges: Vec<String>,
}

pub fn grant(c: &mut Connection, g: &GrantSpec) -> Result<()> {
    check_role(&g.role)?;
    if g.privileges.is_empty() {
        return Err(bad(
            "give at least one privilege: select, insert, update, delete",
        ));
    }
    for p in &g.privileges {
        match p.as_str() {
            "select" | "insert" | "update" | "delete" => {}
            "ddl" => {
                return Err(bad(
                    "there is no ddl privilege: schema changes are the admin's (SQL as the admin, or a bundle's migrations verified on a branch)",
                ));
            }
            _ => return Err(bad(format!("unknown privilege '{p}' (select, insert, update, delete)"))),
        }
    }
    {
        check_name("object", &g.object)?;
        let exists: bool = c.query_row("SELECT count(*) FROM sqlite_schema WHERE type IN ('table', 'view') AND name = ?1 COLLATE NOCASE", [&g.object], |r| r.get::<_, i64>(0))? > 0;
        if !exists {
            return Err(Error::new(
                ErrorCode::UnknownTable,
                format!("No table or view '{}'", g.object),
            ));
        }
    }
    let tx = c.savepoint()?;
    for p in &g.privileges {
        tx.execute(
            "INSERT OR IGNORE INTO _ichibase_grants (object, role, privilege) VALUES (?1, ?2, ?3)",
            params![g.object, g.role, p],
        )?;
    }
    tx.commit()?;
    Ok(())
}

pub fn revoke(c: &mut Connection, object: &str, role: &str) -> Result<usize> {
    Ok(c.execute(
        "DELETE FROM _ichibase_grants WHERE object = ?1 COLLATE NOCASE AND role = ?2",
        params![object, role],
    )?)
}

pub fn list_grants(c: &Connection) -> Result<Vec<Json>> {
    let mut st = c.prepare("SELECT object, role, json_group_array(privilege) FROM _ichibase_grants GROUP BY object, role ORDER BY object, role")?;
    let rows = st
        .query_map([], |r| {
            let privs: String = r.get(2)?;
            Ok(serde_json::json!({"object": r.get::<_, String>(0)?, "role": r.get::<_, String>(1)?, "privileges": serde_json::from_str::<Json>(&privs).unwrap_or(Json::Null)}))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}
