//! What a non-admin analytics query may reference, judged on DuckDB's own parse tree
//! (`json_serialize_sql`), by scope.
//!
//! ## Names
//! A table name in a query is a CTE only where DuckDB would bind it to one: inside the node
//! that declares it (its body, its `WHERE`/`SELECT` subqueries, both branches of a set
//! operation that carries it), in the bodies of the CTEs declared *after* it in the same
//! `WITH`, and in the recursive branch of its own `WITH RECURSIVE` body — never in its own
//! non-recursive body, in an earlier sibling, in an enclosing query or in a sibling subquery
//! or `UNION` branch. Anywhere else the same name is a catalog object or a replacement scan
//! (`FROM 'archive/*.parquet'` reads files), so it must be a view granted to the role. CTE
//! names that look like paths or globs (`/ . * ? [ ] { } : ~ \`) are refused outright, and a
//! CTE may not be named like an existing table or view (checked by the caller).
//!
//! ## Sources and functions
//! Table functions (`read_parquet`, `glob`, `read_text`, `query`, `app_table`, `range` as a
//! table...), `DESCRIBE`/`SUMMARIZE`/`SHOW` and bound refs are refused. Functions that reveal
//! the server's configuration or environment (`current_setting`, `getenv`, `duckdb_*`,
//! `pragma_*`, `which_secret`...) are refused.
//!
//! ## Size generators
//! DuckDB folds constant expressions while it optimises a query, before any interrupt can
//! reach it, and a folded list is held as one boxed value per element (~75 bytes each): the
//! 150-million element `range(150000000)` took 18 GB that way. Functions that build values of
//! a caller-chosen size (`range`, `generate_series`, `repeat`, `lpad`/`rpad`, `list_resize`,
//! `array_resize`, `to_base`, `bar`, widths in `printf`/`format`) take only constant sizes
//! here, and the **product** of all the sizes in one query (sizes compose through lambdas and
//! nesting) must stay within `max_generated_elements`.

use serde_json::Value as Json;

use crate::core::{Error, ErrorCode, Result};

/// A table reference that is not a CTE in scope: (catalog, schema, name), lower-cased.
pub type TableRef = (String, String, String);

/// What the walk found: references to check against the grants, and CTE names declared.
#[derive(Debug, Default)]
pub struct Found {
    pub refs: Vec<TableRef>,
    pub ctes: Vec<String>,
}

/// Functions that reveal configuration, files or the environment.
const SETTINGS_FUNCTIONS: &[&str] = &[
    "current_setting",
    "getenv",
    "which_secret",
    "current_database",
    "current_catalog",
    "current_schemas",
    "version",
    "platform",
    "json_execute_serialized_sql",
    "sql_auto_complete",
    "file_search_path",
];

const SETTINGS_PREFIXES: &[&str] = &["duckdb_", "pragma_", "pg_", "has_", "read_", "parquet_"];

/// Table-ref types that only read real tables/views or values.
const ALLOWED_REFS: &[&str] = &[
    "BASE_TABLE",
    "JOIN",
    "SUBQUERY",
    "EXPRESSION_LIST",
    "EMPTY",
    "PIVOT",
];

fn denied(msg: String) -> Error {
    Error::new(ErrorCode::AccessDenied, msg)
}

/// Walk `ast` (the whole `json_serialize_sql` output) for a non-admin role.
pub fn scan(ast: &Json, max_generated: u64) -> Result<Found> {
    let mut w = Walker {
        scope: Vec::new(),
        found: Found::default(),
        generated: 1,
        max_generated,
    };
    if let Some(stmts) = ast.get("statements") {
        w.walk(stmts)?;
    }
    Ok(w.found)
}

struct Walker {
    /// CTE names visible at this point, innermost last.
    scope: Vec<String>,
    found: Found,
    /// Product of the sizes of all generators seen.
    generated: u128,
    max_generated: u64,
}

fn looks_like_path(name: &str) -> bool {
    name.is_empty()
        || name.chars().any(|c| {
            matches!(
                c,
                '/' | '\\' | '.' | '*' | '?' | '[' | ']' | '{' | '}' | ':' | '~' | '$' | '\'' | '"'
            ) || c.is_control()
        })
}

impl Walker {
    fn walk(&mut self, v: &Json) -> Result<()> {
        match v {
            Json::Array(a) => {
                for c in a {
                    self.walk(c)?;
                }
                Ok(())
            }
            Json::Object(o) => self.object(o),
            _ => Ok(()),
        }
    }

    fn object(&mut self, o: &serde_json::Map<String, Json>) -> Result<()> {
        let base = self.scope.len();
        // CTEs declared on this node: each body sees the earlier ones, the rest of the node sees all.
        if let Some(map) = o
            .get("cte_map")
            .and_then(|m| m.get("map"))
            .and_then(Json::as_array)
        {
            for e in map {
                let key = e.get("key").and_then(Json::as_str).unwrap_or("");
                if looks_like_path(key) {
                    return Err(denied(format!(
                        "A CTE may not be named like a file or pattern: \"{key}\""
                    )));
                }
                if let Some(body) = e.get("value") {
                    self.walk(body)?;
                }
                let k = key.to_lowercase();
                self.found.ctes.push(k.clone());
                self.scope.push(k);
            }
        }
        let r = self.node(o);
        self.scope.truncate(base);
        r
    }

    fn node(&mut self, o: &serde_json::Map<String, Json>) -> Result<()> {
        let ty = o.get("type").and_then(Json::as_str).unwrap_or("");
        let s = |k: &str| o.get(k).and_then(Json::as_str).unwrap_or("").to_lowercase();
        match ty {
            "RECURSIVE_CTE_NODE" => {
                // The anchor does not see the CTE itself; the recursive branch does.
                if let Some(l) = o.get("left") {
                    self.walk(l)?;
                }
                let base = self.scope.len();
                self.scope.push(s("cte_name"));
                let r = (|| {
                    for (k, v) in o {
                        if k != "left" && k != "cte_map" {
                            self.walk(v)?;
                        }
                    }
                    Ok(())
                })();
                self.scope.truncate(base);
                return r;
            }
            "CTE_NODE" => {
                // A materialised CTE as its own node: the query does not see it, the child does.
                if let Some(q) = o.get("query") {
                    self.walk(q)?;
                }
                let base = self.scope.len();
                let name = s("cte_name");
                if looks_like_path(&name) {
                    return Err(denied(format!(
                        "A CTE may not be named like a file or pattern: \"{name}\""
                    )));
                }
                self.found.ctes.push(name.clone());
                self.scope.push(name);
                let r = (|| {
                    for (k, v) in o {
                        if k != "query" && k != "cte_map" {
                            self.walk(v)?;
                        }
                    }
                    Ok(())
                })();
                self.scope.truncate(base);
                return r;
            }
            "BASE_TABLE" => {
                let (cat, sch, name) = (s("catalog_name"), s("schema_name"), s("table_name"));
                if !(cat.is_empty() && sch.is_empty() && self.scope.contains(&name)) {
                    self.found.refs.push((cat, sch, name));
                }
            }
            "TABLE_FUNCTION" | "SHOW_REF" | "COLUMN_DATA" | "DELIM_GET" | "BOUND_TABLE_REF"
            | "CTE" => {
                let what = o
                    .get("function")
                    .and_then(|f| f.get("function_name"))
                    .and_then(Json::as_str)
                    .unwrap_or("this source");
                return Err(denied(format!(
                    "Table functions ({what}) and DESCRIBE/SUMMARIZE/SHOW are for the admin; query the views granted to your role"
                )));
            }
            _ => {}
        }
        // A table ref of a type not known to be harmless is refused.
        if o.contains_key("sample")
            && !ty.is_empty()
            && !ty.ends_with("_NODE")
            && !ALLOWED_REFS.contains(&ty)
        {
            return Err(denied(format!(
                "Table source of type {ty} is for the admin"
            )));
        }
        if let Some(f) = o.get("function_name").and_then(Json::as_str) {
            self.function(&f.to_lowercase(), o)?;
        }
        for (k, v) in o {
            if k != "cte_map" {
                self.walk(v)?;
            }
        }
        Ok(())
    }

    fn function(&mut self, name: &str, o: &serde_json::Map<String, Json>) -> Result<()> {
        if SETTINGS_FUNCTIONS.contains(&name)
            || (SETTINGS_PREFIXES.iter().any(|p| name.starts_with(p)) && name != "pg_typeof")
        {
            return Err(denied(format!(
                "The function {name}() is for the admin (it reveals the server's configuration or files)"
            )));
        }
        let args: Vec<&Json> = o
            .get("children")
            .and_then(Json::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        let size = |i: usize| -> Result<i128> {
            args.get(i).and_then(|a| const_int(a)).ok_or_else(|| {
                denied(format!(
                    "{name}(): the size argument must be an integer constant for non-admin roles"
                ))
            })
        };
        let n: Option<i128> = match name {
            "range" | "generate_series" => {
                let incl = i128::from(name == "generate_series");
                let (start, stop, step) = match args.len() {
                    1 => (0, size(0)?, 1),
                    2 => (size(0)?, size(1)?, 1),
                    3 => (size(0)?, size(1)?, size(2)?),
                    _ => return Err(denied(format!("{name}(): unexpected arguments"))),
                };
                if step == 0 {
                    Some(0)
                } else {
                    Some(((stop - start) / step + incl).max(0))
                }
            }
            "repeat" => {
                let times = size(1)?;
                let unit = match args.first().and_then(|a| const_text(a)) {
                    Some(s) => s.len().max(1) as i128,
                    None => {
                        return Err(denied(
                            "repeat(): the repeated value must be a string constant for non-admin roles".into(),
                        ));
                    }
                };
                Some(times.max(0) * unit)
            }
            "lpad" | "rpad" | "list_resize" | "array_resize" => {
                if matches!(name, "list_resize" | "array_resize") {
                    if let Some(v) = args.get(2) {
                        if v.get("class").and_then(Json::as_str) != Some("CONSTANT") {
                            return Err(denied(format!(
                                "{name}(): the fill value must be a constant for non-admin roles"
                            )));
                        }
                    }
                }
                Some(size(1)?)
            }
            "to_base" if args.len() >= 3 => Some(size(2)?),
            "bar" if args.len() >= 4 => Some(size(3)?),
            "printf" | "format" => {
                let Some(f) = args.first().and_then(|a| const_text(a)) else {
                    return Err(denied(format!(
                        "{name}(): the format must be a string constant for non-admin roles"
                    )));
                };
                if f.contains('*') {
                    return Err(denied(format!("{name}(): '*' widths are for the admin")));
                }
                // The largest number in the format bounds any width or precision.
                let widest = f
                    .split(|c: char| !c.is_ascii_digit())
                    .filter(|d| !d.is_empty())
                    .map(|d| d.parse::<i128>().unwrap_or(i128::MAX))
                    .max()
                    .unwrap_or(0);
                Some(widest)
            }
            _ => None,
        };
        if let Some(n) = n {
            let n = n.max(1) as u128;
            self.generated = self.generated.saturating_mul(n);
            if self.generated > u128::from(self.max_generated) {
                return Err(Error::new(
                    ErrorCode::MemoryLimitExceeded,
                    format!(
                        "{name}(): generated values are limited to {} elements/bytes per query for non-admin roles (max_generated_elements); this query asks for {}",
                        self.max_generated, self.generated
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// An integer constant, possibly cast or negated.
fn const_int(v: &Json) -> Option<i128> {
    match v.get("class").and_then(Json::as_str)? {
        "CONSTANT" => {
            let val = v.get("value")?;
            if val.get("is_null").and_then(Json::as_bool) == Some(true) {
                return Some(0);
            }
            let x = val.get("value")?;
            if let Some(i) = x.as_i64() {
                return Some(i128::from(i));
            }
            if let Some(u) = x.as_u64() {
                return Some(i128::from(u));
            }
            if let Some(f) = x.as_f64() {
                return Some(f.ceil() as i128);
            }
            // HUGEINT and others arrive as objects or text: too big or not a number.
            x.as_str()
                .and_then(|s| s.trim().parse::<f64>().ok())
                .map(|f| f.ceil() as i128)
        }
        "CAST" => const_int(v.get("child")?),
        "FUNCTION" => {
            let f = v.get("function_name").and_then(Json::as_str)?;
            let ch = v.get("children")?.as_array()?;
            match (f, ch.len()) {
                ("-", 1) => const_int(&ch[0]).map(|x| -x),
                ("+", 1) => const_int(&ch[0]),
                _ => None,
            }
        }
        _ => None,
    }
}

/// A string constant's text.
fn const_text(v: &Json) -> Option<String> {
    match v.get("class").and_then(Json::as_str)? {
        "CONSTANT" => {
            let val = v.get("value")?;
            if val.get("is_null").and_then(Json::as_bool) == Some(true) {
                return Some(String::new());
            }
            val.get("value")?.as_str().map(str::to_string)
        }
        "CAST" => const_text(v.get("child")?),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(sql: &str) -> Json {
        let c = duckdb::Connection::open_in_memory().unwrap();
        let text: String = c
            .query_row("SELECT json_serialize_sql(?::VARCHAR)", [sql], |r| r.get(0))
            .unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn refs(sql: &str) -> Vec<String> {
        scan(&parse(sql), 1_000_000)
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
            .refs
            .into_iter()
            .map(|(_, _, n)| n)
            .collect()
    }

    #[test]
    fn ctes_resolve_by_scope() {
        // In scope: no reference left to check.
        assert!(refs("WITH a AS (SELECT 1), b AS (SELECT * FROM a) SELECT * FROM b UNION ALL SELECT * FROM a").is_empty());
        assert!(refs("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r").is_empty());
        assert!(refs("WITH x AS (SELECT 1) SELECT (SELECT count(*) FROM x) FROM (WITH y AS (SELECT * FROM x) SELECT * FROM y)").is_empty());
        // Out of scope: the name is a catalog object or a file.
        assert_eq!(
            refs("SELECT * FROM t UNION ALL (WITH t AS (SELECT 1) SELECT * FROM t)"),
            ["t"]
        );
        assert_eq!(refs("WITH t AS (SELECT * FROM t) SELECT * FROM t"), ["t"]);
        assert_eq!(
            refs("WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a"),
            ["b"]
        );
        assert_eq!(
            refs(
                "WITH RECURSIVE r(n) AS (SELECT * FROM r UNION ALL SELECT n FROM r) SELECT * FROM r"
            ),
            ["r"]
        );
        assert_eq!(
            refs("SELECT (WITH t AS (SELECT 1) SELECT 1), (SELECT 1 FROM t)"),
            ["t"]
        );
        assert_eq!(refs("WITH t AS (SELECT 1) SELECT * FROM main.t"), ["t"]);
    }

    #[test]
    fn refusals() {
        let refused = |sql: &str| scan(&parse(sql), 1_000_000).is_err();
        assert!(refused(
            "WITH \"a/*.parquet\" AS (SELECT 1) SELECT * FROM \"a/*.parquet\""
        ));
        assert!(refused("SELECT current_setting('threads')"));
        assert!(refused("SELECT * FROM read_parquet('x')"));
        assert!(refused("SELECT len(range(150000000))"));
        assert!(refused("SELECT len(range(n)) FROM (SELECT 5 AS n)"));
        assert!(refused(
            "SELECT list_transform(range(2000), x -> range(2000))"
        ));
        assert!(!refused(
            "SELECT len(range(1000)), repeat('ab', 10), lpad('x', 5, ' ')"
        ));
    }

    #[test]
    fn paths_are_not_cte_names() {
        assert!(looks_like_path("archive/*.parquet"));
        assert!(looks_like_path("x.csv"));
        assert!(!looks_like_path("my_cte"));
        assert!(!looks_like_path("My Data"));
    }
}
