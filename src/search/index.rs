//! Search indexes of a table: their declaration, the objects they create and their upkeep.
//!
//! For a table `t` with an INTEGER PRIMARY KEY `k`, an index creates (all owned by the engine,
//! never granted to a role):
//! - `_ichibase_fts_<t>`: an FTS5 table (own content, rowid = `k`) over the text columns;
//! - `_ichibase_vq_<t>`: `(id INTEGER PRIMARY KEY, v BLOB)`, the validated vector of each row in
//!   the index's quantisation (float32, int8 or bit, as sqlite-vec stores them);
//! - triggers `_ichibase_search_<t>_ai/_au/_ad` that append changed keys to
//!   `_ichibase_search_queue`, which [`drain`] turns into index updates on the writer.
//!
//! This file only runs on the writer (create, drop, drain) or reads engine tables (list, load).

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::core::{Error, ErrorCode, Result};
use crate::sql::parse::quote_ident;

/// An index as declared by an admin (`PUT /search/indexes/{table}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexSpec {
    /// Text columns indexed for full-text search (may be empty when only `vector` is set).
    #[serde(default)]
    pub text: Vec<String>,
    /// FTS5 tokenizer: `trigram` (default; any language, Japanese included), `unicode61` or
    /// `porter` (English stemming).
    #[serde(default = "default_tokenizer")]
    pub tokenizer: String,
    /// The vector column, if any.
    #[serde(default)]
    pub vector: Option<VectorSpec>,
    /// Filled in by the engine: the table's INTEGER PRIMARY KEY column.
    #[serde(default, skip_deserializing)]
    pub key: String,
}

fn default_tokenizer() -> String {
    "trigram".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VectorSpec {
    /// Column holding the float32 vector (a JSON array or a little-endian float32 blob).
    pub column: String,
    pub dims: usize,
    /// `float32` (default), `int8` (sqlite-vec's `vec_quantize_int8(v, 'unit')`: components
    /// in [-1, 1]) or `bit` (`vec_quantize_binary`: the sign of each component).
    #[serde(default = "default_quantization")]
    pub quantization: String,
    /// `cosine` (default), `l2` or `l1`; `bit` vectors always use `hamming`.
    #[serde(default = "default_metric")]
    pub metric: String,
    /// Embed-on-insert: rows whose vector column is NULL get it from these text columns
    /// through the `ai` layer (see `search::embed_pending`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embed: Option<EmbedSpec>,
}

/// `"embed": {"from": ["title", "body"], "model": "emb"}` of a vector index.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedSpec {
    /// Text columns joined (one per line) into the text that is embedded.
    pub from: Vec<String>,
    /// An `[ai.models.NAME]`; default `[search] embed_model`.
    #[serde(default)]
    pub model: Option<String>,
}

fn default_quantization() -> String {
    "float32".into()
}
fn default_metric() -> String {
    "cosine".into()
}

impl VectorSpec {
    /// SQL storing a float32 vector expression `e` in this quantisation.
    pub fn quantize(&self, e: &str) -> String {
        match self.quantization.as_str() {
            "int8" => format!("vec_quantize_int8(vec_f32({e}), 'unit')"),
            "bit" => format!("vec_quantize_binary(vec_f32({e}))"),
            _ => format!("vec_f32({e})"),
        }
    }
    /// SQL reading a stored vector `e` back with its type.
    pub fn stored(&self, e: &str) -> String {
        match self.quantization.as_str() {
            "int8" => format!("vec_int8({e})"),
            "bit" => format!("vec_bit({e})"),
            _ => e.to_string(),
        }
    }
    /// The sqlite-vec distance function.
    pub fn distance_fn(&self) -> &'static str {
        match (self.quantization.as_str(), self.metric.as_str()) {
            ("bit", _) => "vec_distance_hamming",
            (_, "l2") => "vec_distance_l2",
            (_, "l1") => "vec_distance_l1",
            _ => "vec_distance_cosine",
        }
    }
}

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorCode::BadArguments, msg)
}

/// Name rules for the indexed table (the same as a policy's).
pub fn check_table_name(t: &str) -> Result<()> {
    if t.is_empty()
        || t.len() > 100
        || !t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        || t.starts_with(|c: char| c.is_ascii_digit())
    {
        return Err(bad(format!(
            "table '{t}' must be ASCII letters, digits and '_' (not starting with a digit)"
        )));
    }
    let l = t.to_ascii_lowercase();
    if l.starts_with("_ichibase") || l.starts_with("sqlite_") {
        return Err(bad(format!("table '{t}' uses a reserved prefix")));
    }
    Ok(())
}

pub fn fts_table(t: &str) -> String {
    format!("_ichibase_fts_{}", t.to_ascii_lowercase())
}
pub fn vq_table(t: &str) -> String {
    format!("_ichibase_vq_{}", t.to_ascii_lowercase())
}
fn trigger(t: &str, what: &str) -> String {
    format!("_ichibase_search_{}_{what}", t.to_ascii_lowercase())
}

/// The table's columns (name, declared type, pk position).
fn columns(c: &Connection, t: &str) -> Result<Vec<(String, String, i64)>> {
    let kind: Option<String> = c
        .query_row(
            "SELECT type FROM sqlite_schema WHERE name = ?1 COLLATE NOCASE",
            [t],
            |r| r.get(0),
        )
        .optional()?;
    match kind.as_deref() {
        Some("table") => {}
        Some(other) => return Err(bad(format!("'{t}' is a {other}, not a table"))),
        None => return Err(Error::new(ErrorCode::UnknownTable, format!("No table '{t}'"))),
    }
    let mut st = c.prepare("SELECT name, type, pk FROM pragma_table_info(?1)")?;
    let cols = st
        .query_map([t], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(cols)
}

/// Check `spec` against table `t`, filling in its key column.
fn validate(c: &Connection, t: &str, spec: &mut IndexSpec) -> Result<()> {
    check_table_name(t)?;
    let cols = columns(c, t)?;
    let pks: Vec<_> = cols.iter().filter(|x| x.2 > 0).collect();
    match pks.as_slice() {
        [(name, ty, _)] if ty.eq_ignore_ascii_case("integer") => spec.key = name.clone(),
        _ => {
            return Err(bad(format!(
                "table '{t}' needs an INTEGER PRIMARY KEY column to be indexed (it is the row's key in the index)"
            )));
        }
    }
    let has = |n: &str| cols.iter().any(|x| x.0.eq_ignore_ascii_case(n));
    if spec.text.is_empty() && spec.vector.is_none() {
        return Err(bad("an index needs text columns, a vector column or both"));
    }
    for col in &spec.text {
        if !has(col) {
            return Err(bad(format!("table '{t}' has no column '{col}'")));
        }
    }
    let mut seen = std::collections::HashSet::new();
    if !spec.text.iter().all(|x| seen.insert(x.to_ascii_lowercase())) {
        return Err(bad("a text column is listed twice"));
    }
    if !matches!(spec.tokenizer.as_str(), "trigram" | "unicode61" | "porter") {
        return Err(bad(format!(
            "unknown tokenizer '{}' (trigram, unicode61, porter)",
            spec.tokenizer
        )));
    }
    if let Some(v) = &spec.vector {
        if !has(&v.column) {
            return Err(bad(format!("table '{t}' has no column '{}'", v.column)));
        }
        if let Some(e) = &v.embed {
            if e.from.is_empty() {
                return Err(bad("vector.embed.from names the text columns to embed"));
            }
            for col in &e.from {
                if !has(col) {
                    return Err(bad(format!("table '{t}' has no column '{col}' (vector.embed.from)")));
                }
            }
            if e.model.as_deref().unwrap_or(super::settings().embed_model.as_str()).is_empty() {
                return Err(bad("vector.embed needs a model: \"model\" or [search] embed_model"));
            }
        }
        let max = super::settings().max_dims;
        if v.dims == 0 || v.dims > max {
            return Err(bad(format!(
                "vector dims must be 1..={max} ([search] max_dims)"
            )));
        }
        if !matches!(v.quantization.as_str(), "float32" | "int8" | "bit") {
            return Err(bad(format!(
                "unknown quantization '{}' (float32, int8, bit)",
                v.quantization
            )));
        }
        if v.quantization == "bit" && v.dims % 8 != 0 {
            return Err(bad("bit vectors need dims divisible by 8"));
        }
        if !matches!(v.metric.as_str(), "cosine" | "l2" | "l1") {
            return Err(bad(format!("unknown metric '{}' (cosine, l2, l1)", v.metric)));
        }
        if v.quantization == "int8" && v.metric == "l1" {
            return Err(bad("int8 vectors support the cosine and l2 metrics"));
        }
    }
    Ok(())
}

fn drop_objects(c: &Connection, t: &str) -> Result<()> {
    for what in ["ai", "au", "ad"] {
        c.execute_batch(&format!("DROP TRIGGER IF EXISTS {}", quote_ident(&trigger(t, what))))?;
    }
    c.execute_batch(&format!(
        "DROP TABLE IF EXISTS {}; DROP TABLE IF EXISTS {};",
        quote_ident(&fts_table(t)),
        quote_ident(&vq_table(t))
    ))?;
    c.execute(
        "DELETE FROM _ichibase_search_queue WHERE tbl = ?1",
        [t.to_ascii_lowercase()],
    )?;
    Ok(())
}

/// Create (or replace) the index of `t` and fill it from the table's rows.
pub fn create(c: &mut Connection, t: &str, spec: &IndexSpec) -> Result<serde_json::Value> {
    let mut spec = spec.clone();
    validate(c, t, &mut spec)?;
    let tx = c.savepoint()?;
    drop_objects(&tx, t)?;
    let tq = quote_ident(t);
    let key = quote_ident(&spec.key);
    let lt = t.to_ascii_lowercase();
    if !spec.text.is_empty() {
        let cols: Vec<String> = spec.text.iter().map(|x| quote_ident(x)).collect();
        let tokenize = match spec.tokenizer.as_str() {
            "porter" => "porter unicode61 remove_diacritics 2",
            "unicode61" => "unicode61 remove_diacritics 2",
            _ => "trigram",
        };
        tx.execute_batch(&format!(
            "CREATE VIRTUAL TABLE {} USING fts5({}, tokenize = '{tokenize}');
             INSERT INTO {} (rowid, {}) SELECT {key}, {} FROM {tq};",
            quote_ident(&fts_table(t)),
            cols.join(", "),
            quote_ident(&fts_table(t)),
            cols.join(", "),
            cols.join(", "),
        ))?;
    }
    if let Some(v) = &spec.vector {
        let vq = quote_ident(&vq_table(t));
        let col = quote_ident(&v.column);
        tx.execute_batch(&format!(
            "CREATE TABLE {vq} (id INTEGER PRIMARY KEY, v BLOB NOT NULL);"
        ))?;
        // Row by row: a malformed vector leaves its row out of the index instead of failing.
        let keys: Vec<i64> = tx
            .prepare(&format!("SELECT {key} FROM {tq} WHERE {col} IS NOT NULL"))?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        for id in keys {
            index_vector(&tx, t, &spec, v, id)?;
        }
    }
    let mut watched: Vec<String> = spec.text.iter().map(|x| quote_ident(x)).collect();
    if let Some(v) = &spec.vector {
        watched.push(quote_ident(&v.column));
    }
    watched.push(key.clone());
    let lit = format!("'{}'", lt.replace('\'', "''"));
    tx.execute_batch(&format!(
        "CREATE TRIGGER {ai} AFTER INSERT ON {tq} BEGIN
           INSERT INTO _ichibase_search_queue (tbl, id) VALUES ({lit}, new.{key});
         END;
         CREATE TRIGGER {au} AFTER UPDATE OF {watched} ON {tq} BEGIN
           INSERT INTO _ichibase_search_queue (tbl, id) VALUES ({lit}, old.{key});
           INSERT INTO _ichibase_search_queue (tbl, id) SELECT {lit}, new.{key} WHERE new.{key} IS NOT old.{key};
         END;
         CREATE TRIGGER {ad} AFTER DELETE ON {tq} BEGIN
           INSERT INTO _ichibase_search_queue (tbl, id) VALUES ({lit}, old.{key});
         END;",
        ai = quote_ident(&trigger(t, "ai")),
        au = quote_ident(&trigger(t, "au")),
        ad = quote_ident(&trigger(t, "ad")),
        watched = watched.join(", "),
    ))?;
    let json = serde_json::to_string(&spec).map_err(|e| Error::internal(e.to_string()))?;
    tx.execute(
        "INSERT OR REPLACE INTO _ichibase_search_indexes (tbl, spec) VALUES (?1, ?2)",
        params![lt, json],
    )?;
    tx.commit()?;
    let mut out = serde_json::to_value(&spec).map_err(|e| Error::internal(e.to_string()))?;
    out["table"] = serde_json::Value::String(t.to_string());
    Ok(out)
}

/// Remove the index of `t` (its objects and queue entries).
pub fn drop(c: &mut Connection, t: &str) -> Result<()> {
    check_table_name(t)?;
    let tx = c.savepoint()?;
    let n = tx.execute(
        "DELETE FROM _ichibase_search_indexes WHERE tbl = ?1",
        [t.to_ascii_lowercase()],
    )?;
    if n == 0 {
        return Err(Error::new(
            ErrorCode::NoSearchIndex,
            format!("table '{t}' has no search index"),
        ));
    }
    drop_objects(&tx, t)?;
    tx.commit()?;
    Ok(())
}

/// Every index: `{table, text, tokenizer, vector, key}`.
pub fn list(c: &Connection) -> Result<Vec<serde_json::Value>> {
    let mut st = c.prepare("SELECT tbl, spec FROM _ichibase_search_indexes ORDER BY tbl")?;
    let rows = st
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows
        .into_iter()
        .map(|(t, s)| {
            let mut v: serde_json::Value = serde_json::from_str(&s).unwrap_or_default();
            v["table"] = serde_json::Value::String(t);
            v
        })
        .collect())
}

/// The index of table `t`, if it has one.
pub fn load(c: &Connection, t: &str) -> Result<Option<IndexSpec>> {
    let s: Option<String> = c
        .query_row(
            "SELECT spec FROM _ichibase_search_indexes WHERE tbl = ?1",
            [t.to_ascii_lowercase()],
            |r| r.get(0),
        )
        .optional()?;
    match s {
        None => Ok(None),
        Some(s) => {
            // `key` is never read from a request (an admin may not set it): take it apart.
            let mut v: serde_json::Value =
                serde_json::from_str(&s).map_err(|e| Error::internal(format!("index spec: {e}")))?;
            let key = v
                .as_object_mut()
                .and_then(|o| o.remove("key"))
                .and_then(|k| k.as_str().map(str::to_string))
                .unwrap_or_default();
            let mut spec: IndexSpec =
                serde_json::from_value(v).map_err(|e| Error::internal(format!("index spec: {e}")))?;
            spec.key = key;
            Ok(Some(spec))
        }
    }
}

/// (Re)index the vector of row `id`; a missing, malformed or mis-sized vector leaves it out.
fn index_vector(c: &Connection, t: &str, spec: &IndexSpec, v: &VectorSpec, id: i64) -> Result<()> {
    let vq = quote_ident(&vq_table(t));
    c.prepare_cached(&format!("DELETE FROM {vq} WHERE id = ?1"))?
        .execute([id])?;
    let sql = format!(
        "INSERT INTO {vq} (id, v) SELECT {key}, {q} FROM {tq} WHERE {key} = ?1 AND {col} IS NOT NULL AND vec_length(vec_f32({col})) = ?2",
        key = quote_ident(&spec.key),
        q = v.quantize(&quote_ident(&v.column)),
        tq = quote_ident(t),
        col = quote_ident(&v.column),
    );
    if let Err(e) = c
        .prepare_cached(&sql)
        .and_then(|mut st| st.execute(params![id, v.dims as i64]))
    {
        tracing::debug!(table = t, id, error = %e, "search: row left out of the vector index");
    }
    Ok(())
}

/// Index up to `batch` queued rows in one transaction; returns how many queue entries it took.
pub fn drain(c: &mut Connection, batch: usize) -> Result<usize> {
    let tx = c.transaction()?;
    let entries: Vec<(i64, String, i64)> = tx
        .prepare("SELECT seq, tbl, id FROM _ichibase_search_queue ORDER BY seq LIMIT ?1")?
        .query_map([batch as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let Some(last) = entries.last().map(|e| e.0) else {
        return Ok(0);
    };
    let mut specs: std::collections::HashMap<String, Option<IndexSpec>> = Default::default();
    let mut done = std::collections::HashSet::new();
    for (_, t, id) in &entries {
        if !done.insert((t.clone(), *id)) {
            continue;
        }
        if !specs.contains_key(t) {
            specs.insert(t.clone(), load(&tx, t)?);
        }
        let Some(spec) = specs[t].as_ref() else { continue };
        if !spec.text.is_empty() {
            let fts = quote_ident(&fts_table(t));
            let cols: Vec<String> = spec.text.iter().map(|x| quote_ident(x)).collect();
            tx.prepare_cached(&format!("DELETE FROM {fts} WHERE rowid = ?1"))?
                .execute([id])?;
            tx.prepare_cached(
                &format!(
                    "INSERT INTO {fts} (rowid, {c}) SELECT {key}, {c} FROM {tq} WHERE {key} = ?1",
                    c = cols.join(", "),
                    key = quote_ident(&spec.key),
                    tq = quote_ident(t),
                ),
            )?
            .execute([id])?;
        }
        if let Some(v) = &spec.vector {
            index_vector(&tx, t, spec, v, *id)?;
        }
    }
    tx.execute("DELETE FROM _ichibase_search_queue WHERE seq <= ?1", [last])?;
    tx.commit()?;
    Ok(entries.len())
}
