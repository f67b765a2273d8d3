//! Authorization of non-admin SQL with SQLite's authorizer: what a role may read, write and call.
//!
//! The model: a role reaches data only through objects granted to it in `_ichibase_grants`
//! (policy views and explicitly public tables). Whatever an admin-defined view granted to the
//! role, or any trigger, reads or writes on its behalf is the admin's decision and is allowed.
//! Everything else is denied: base tables behind policies, engine tables, `sqlite_schema`,
//! table-valued pragmas, `ATTACH`, `PRAGMA`, DDL (schema changes are the admin's), and functions
//! outside an allow list.
//!
//! SQLite names the inner-most view, trigger *or CTE* as the "accessor" of an access, so a CTE
//! named like a granted view could pose as it; the SQL layer refuses such CTE names for
//! non-admin roles ([`Authz::is_schema_object`]).
//!
//! The grant and schema snapshot is reloaded when `PRAGMA schema_version` or the
//! `authz_version` counter (bumped by triggers on `_ichibase_grants`) changes.

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;

use rusqlite::Connection;
use rusqlite::hooks::{AuthAction, AuthContext};

pub const SELECT: u8 = 1;
pub const INSERT: u8 = 2;
pub const UPDATE: u8 = 4;
pub const DELETE: u8 = 8;

/// Privilege bit of a grant's `privilege` column.
pub fn privilege_bit(name: &str) -> Option<u8> {
    Some(match name {
        "select" => SELECT,
        "insert" => INSERT,
        "update" => UPDATE,
        "delete" => DELETE,
        // A `ddl` row of an older version grants nothing.
        _ => return None,
    })
}

/// Objects everybody may read: table-valued functions that only look at their arguments.
const PUBLIC_OBJECTS: &[&str] = &["json_each", "json_tree", "jsonb_each", "jsonb_tree"];

/// Functions top-level SQL of a non-admin role may call.
const ALLOWED_FUNCTIONS: &[&str] = &[
    "abs",
    "avg",
    "char",
    "coalesce",
    "concat",
    "concat_ws",
    "count",
    "date",
    "datetime",
    "format",
    "glob",
    "group_concat",
    "hex",
    "ifnull",
    "iif",
    "if",
    "instr",
    "julianday",
    "length",
    "like",
    "likelihood",
    "likely",
    "lower",
    "ltrim",
    "max",
    "min",
    "nullif",
    "octet_length",
    "printf",
    "quote",
    "random",
    "randomblob",
    "replace",
    "round",
    "rtrim",
    "sign",
    "strftime",
    "string_agg",
    "substr",
    "substring",
    "sum",
    "time",
    "timediff",
    "total",
    "trim",
    "typeof",
    "unhex",
    "unicode",
    "unistr",
    "unixepoch",
    "unlikely",
    "upper",
    "zeroblob",
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atan2",
    "atanh",
    "ceil",
    "ceiling",
    "cos",
    "cosh",
    "degrees",
    "exp",
    "floor",
    "ln",
    "log",
    "log10",
    "log2",
    "mod",
    "pi",
    "pow",
    "power",
    "radians",
    "sin",
    "sinh",
    "sqrt",
    "tan",
    "tanh",
    "trunc",
    "row_number",
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
    "ntile",
    "lag",
    "lead",
    "first_value",
    "last_value",
    "nth_value",
    "auth_userid",
    "auth_role",
    "auth_claim",
    // sqlite-vec's scalar functions (src/search): they only look at their arguments.
    "vec_f32",
    "vec_int8",
    "vec_bit",
    "vec_length",
    "vec_type",
    "vec_to_json",
    "vec_normalize",
    "vec_slice",
    "vec_add",
    "vec_sub",
    "vec_quantize_int8",
    "vec_quantize_binary",
    "vec_distance_l2",
    "vec_distance_l1",
    "vec_distance_cosine",
    "vec_distance_hamming",
    // Search over a granted view's FTS and vector index (src/search/sql.rs checks the grant).
    "search",
];

/// True when top-level SQL of a non-admin role may call `name`.
pub fn function_allowed(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    ALLOWED_FUNCTIONS.contains(&n.as_str())
        || crate::sql::system::FUNCTIONS.contains(&n.as_str())
        || n.starts_with("json_")
        || n.starts_with("jsonb_")
        || n == "json"
        || n == "jsonb"
}

#[derive(Default)]
struct Snapshot {
    key: Option<(i64, String)>,
    generation: u64,
    /// role -> object (lower-case) -> privilege bits
    grants: HashMap<String, HashMap<String, u8>>,
    views: HashSet<String>,
    triggers: HashSet<String>,
    /// Every table and view of the schema, and every virtual-table module (eponymous tables
    /// such as `pragma_*` or `json_each` are read under the module's name): a name outside
    /// this set can only be a CTE or subquery of the statement itself.
    objects: HashSet<String>,
}

impl Snapshot {
    /// A table, view, trigger or module of the database, or a name reserved by SQLite.
    fn is_object(&self, name: &str) -> bool {
        let n = name.to_ascii_lowercase();
        n.starts_with("sqlite_")
            || n.starts_with("pragma_")
            || self.objects.contains(&n)
            || self.triggers.contains(&n)
            || PUBLIC_OBJECTS.contains(&n.as_str())
    }

    fn allows(&self, role: &str, object: &str, bit: u8) -> bool {
        self.grants
            .get(role)
            .and_then(|g| g.get(object))
            .is_some_and(|p| p & bit != 0)
    }
}

/// Shared grant/schema snapshot used by every connection's authorizer.
#[derive(Default)]
pub struct Authz {
    snap: RwLock<Snapshot>,
}

impl Authz {
    /// Reload the snapshot if the schema or the grants changed. Must run with no request
    /// checked out on `conn` (the engine tables are read). Returns the snapshot generation.
    pub fn refresh(&self, conn: &Connection) -> rusqlite::Result<u64> {
        let key: (i64, String) = conn
            .prepare_cached(
                "SELECT (SELECT schema_version FROM pragma_schema_version), coalesce((SELECT value FROM _ichibase_meta WHERE key = 'authz_version'), '0')",
            )?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        {
            let s = self.snap.read().unwrap();
            if s.key.as_ref() == Some(&key) {
                return Ok(s.generation);
            }
        }
        let mut grants: HashMap<String, HashMap<String, u8>> = HashMap::new();
        let mut st =
            conn.prepare_cached("SELECT lower(object), role, privilege FROM _ichibase_grants")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let (object, role, privilege): (String, String, String) =
                (r.get(0)?, r.get(1)?, r.get(2)?);
            if let Some(bit) = privilege_bit(&privilege) {
                *grants.entry(role).or_default().entry(object).or_default() |= bit;
            }
        }
        let mut views = HashSet::new();
        let mut triggers = HashSet::new();
        let mut objects = HashSet::new();
        let mut st = conn.prepare_cached(
            "SELECT type, lower(name) FROM sqlite_schema WHERE type IN ('view', 'trigger', 'table')
             UNION ALL SELECT 'module', lower(name) FROM pragma_module_list",
        )?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let (ty, name): (String, String) = (r.get(0)?, r.get(1)?);
            match ty.as_str() {
                "view" => {
                    views.insert(name.clone());
                    objects.insert(name);
                }
                "trigger" => {
                    triggers.insert(name);
                }
                _ => {
                    objects.insert(name);
                }
            }
        }
        let mut s = self.snap.write().unwrap();
        if s.key.as_ref() != Some(&key) {
            s.generation += 1;
            s.key = Some(key);
            s.grants = grants;
            s.views = views;
            s.triggers = triggers;
            s.objects = objects;
        }
        Ok(s.generation)
    }

    /// True when `name` is a view or trigger: a CTE of that name could pose as it.
    pub fn is_schema_object(&self, name: &str) -> bool {
        let n = name.to_ascii_lowercase();
        let s = self.snap.read().unwrap();
        s.views.contains(&n) || s.triggers.contains(&n)
    }

    /// True when `role` holds any privilege on `object` (it may see that the object exists).
    pub fn granted(&self, role: &str, object: &str) -> bool {
        let s = self.snap.read().unwrap();
        s.grants
            .get(role)
            .and_then(|g| g.get(&object.to_ascii_lowercase()))
            .is_some_and(|p| *p != 0)
    }

    /// True when `role` may read `object` (SELECT granted on it).
    pub fn can_read(&self, role: &str, object: &str) -> bool {
        self.snap
            .read()
            .unwrap()
            .allows(role, &object.to_ascii_lowercase(), SELECT)
    }

    /// True when `role` holds the privilege `bit` ([`SELECT`], [`INSERT`], ...) on `object`:
    /// what the authorizer checks for top-level SQL of a non-admin role.
    pub fn allows(&self, role: &str, object: &str, bit: u8) -> bool {
        let o = object.to_ascii_lowercase();
        self.snap.read().unwrap().allows(role, &o, bit)
            || (bit == SELECT && PUBLIC_OBJECTS.contains(&o.as_str()))
    }

    /// True when `name` is a view.
    pub fn is_view(&self, name: &str) -> bool {
        self.snap.read().unwrap().views.contains(&name.to_ascii_lowercase())
    }

    /// Decide one authorizer callback for a non-admin `role`; `Err` carries the reason.
    pub fn decide(&self, role: &str, a: &AuthContext<'_>) -> Result<(), String> {
        let s = self.snap.read().unwrap();
        if let Some(acc) = a.accessor {
            let acc_l = acc.to_ascii_lowercase();
            if s.triggers.contains(&acc_l) {
                return Ok(());
            }
            if s.views.contains(&acc_l) {
                if !s.allows(role, &acc_l, SELECT) {
                    return Err(format!("role '{role}' may not read view {acc}"));
                }
                // What the granted view reads is the admin's decision; a write is never
                // covered by it (the view's INSTEAD OF triggers run as their own accessor).
                match &a.action {
                    AuthAction::Insert { .. }
                    | AuthAction::Update { .. }
                    | AuthAction::Delete { .. } => {}
                    _ => return Ok(()),
                }
            }
            // Otherwise the accessor is a CTE of the statement itself: judge it as top-level SQL.
        }
        let need = |object: &str, bit: u8, verb: &str| -> Result<(), String> {
            let o = object.to_ascii_lowercase();
            if bit != SELECT
                && (o == "sqlite_master" || o == "sqlite_schema" || o == "sqlite_temp_master")
            {
                return Err(format!("role '{role}' may not change the schema"));
            }
            if s.allows(role, &o, bit) || (bit == SELECT && PUBLIC_OBJECTS.contains(&o.as_str())) {
                Ok(())
            } else {
                Err(format!("role '{role}' may not {verb} {object}"))
            }
        };
        match &a.action {
            AuthAction::Select
            | AuthAction::Recursive
            | AuthAction::Transaction { .. }
            | AuthAction::Savepoint { .. } => Ok(()),
            // `SELECT count(*) FROM c` reads no column of `c`: SQLite then reports a read of `c`
            // with an empty column name, also when `c` is a CTE or subquery of the statement.
            // Such a name is not a table, view, trigger or virtual-table module of the
            // database (a CTE named like one is judged as that object, so it cannot pose as
            // it), and reading it reads only what its own definition read, which the
            // authorizer judged already.
            AuthAction::Read {
                table_name,
                column_name,
            } if column_name.is_empty() && !s.is_object(table_name) => Ok(()),
            AuthAction::Read { table_name, .. } => need(table_name, SELECT, "read"),
            AuthAction::Insert { table_name } => need(table_name, INSERT, "insert into"),
            AuthAction::Update { table_name, .. } => need(table_name, UPDATE, "update"),
            AuthAction::Delete { table_name } => need(table_name, DELETE, "delete from"),
            AuthAction::Function { function_name } => {
                if function_allowed(function_name) {
                    Ok(())
                } else {
                    Err(format!(
                        "function {function_name}() is not allowed for role '{role}'"
                    ))
                }
            }
            AuthAction::CreateTable { table_name }
            | AuthAction::DropTable { table_name }
            | AuthAction::AlterTable { table_name, .. }
            | AuthAction::CreateIndex { table_name, .. }
            | AuthAction::DropIndex { table_name, .. }
            | AuthAction::Reindex {
                index_name: table_name,
            }
            | AuthAction::Analyze { table_name } => Err(format!(
                "role '{role}' may not change the schema ({table_name}): schema changes are the admin's"
            )),
            AuthAction::Pragma { pragma_name, .. } => Err(format!(
                "PRAGMA {pragma_name} is not allowed for role '{role}'"
            )),
            other => Err(format!("{other:?} is not allowed for role '{role}'")),
        }
    }
}
