//! `db.search{table=, text=, vector=, k=, filter=, highlight=, rescore=}` in Lua: the `search()` SQL
//! function run as the caller, joined back to the view's rows.
//!
//! Installed as its own component (after the core's `db`): it adds `search` to the `db` table
//! and touches nothing else of `db`. Each hit is the view's row plus `_score`, `_text_rank`,
//! `_vector_rank`, `_bm25`, `_distance` and `_snippet`. With `text` but no `vector` on an index
//! that has a vector column, the query text goes through [`super::embed_query_text`] (the hook
//! for `ai.embed`).

use std::rc::Rc;

use mlua::{Lua, Table, Value};
use rusqlite::types::Value as Sql;

use crate::core::{Error, ErrorCode, RequestContext};
use crate::lua::Env;
use crate::lua::components::{Component, lua_err};
use crate::sql::parse::quote_ident;
use crate::storage::ExecControl;

pub struct DbSearch;

fn bad(msg: impl Into<String>) -> mlua::Error {
    lua_err(Error::new(ErrorCode::BadArguments, msg))
}

struct Args {
    table: String,
    text: Option<String>,
    vector: Option<Vec<f32>>,
    k: i64,
    options: serde_json::Map<String, serde_json::Value>,
}

fn parse(args: Table) -> mlua::Result<Args> {
    let mut a = Args {
        table: String::new(),
        text: None,
        vector: None,
        k: 10,
        options: Default::default(),
    };
    for pair in args.pairs::<Value, Value>() {
        let (k, v) = pair?;
        let key = match &k {
            Value::String(s) => s.to_str()?.to_string(),
            _ => return Err(bad("db.search: arguments are named: {table=, text=, vector=, k=, filter=, highlight=}")),
        };
        match (key.as_str(), v) {
            ("table", Value::String(s)) => a.table = s.to_str()?.to_string(),
            ("text", Value::String(s)) => a.text = Some(s.to_str()?.to_string()),
            ("text", Value::Nil) => {}
            ("k", Value::Integer(i)) if i >= 1 => a.k = i,
            ("k", Value::Number(f)) if f >= 1.0 && f.fract() == 0.0 && f < 1e9 => a.k = f as i64,
            ("vector", Value::Table(t)) => {
                let j = crate::lua::to_json(&Value::Table(t))
                    .map_err(|e| bad(format!("db.search: vector: {e}")))?;
                a.vector = Some(super::sql::vector_from_json(&j).map_err(lua_err)?);
            }
            ("filter", Value::Table(t)) => {
                let j = crate::lua::to_json(&Value::Table(t))
                    .map_err(|e| bad(format!("db.search: filter: {e}")))?;
                a.options.insert("filter".into(), j);
            }
            ("rescore", Value::Boolean(b)) => {
                a.options.insert("rescore".into(), serde_json::Value::Bool(b));
            }
            ("highlight", Value::Table(t)) => {
                let j = crate::lua::to_json(&Value::Table(t))
                    .map_err(|e| bad(format!("db.search: highlight: {e}")))?;
                a.options.insert("highlight".into(), j);
            }
            (
                "table" | "text" | "k" | "vector" | "filter" | "highlight" | "rescore",
                _,
            ) => {
                return Err(bad(format!("db.search: bad value for '{key}'")));
            }
            _ => {
                return Err(bad(format!(
                    "db.search: unknown argument '{key}' (table, text, vector, k, filter, highlight, rescore)"
                )));
            }
        }
    }
    if a.table.is_empty() {
        return Err(bad("db.search: table= (a view or table name) is required"));
    }
    Ok(a)
}

/// The key column and vector dimensions of the index behind `view` (engine look-up).
fn index_of(env: &Env, view: String) -> crate::core::Result<(String, Option<usize>)> {
    env.storage.read_blocking(
        &env.rt,
        &RequestContext::system(),
        ExecControl::lookup(),
        move |c| {
            let base: Option<String> = rusqlite::OptionalExtension::optional(c.query_row(
                "SELECT table_name FROM _ichibase_policies WHERE name = ?1 COLLATE NOCASE",
                [&view],
                |r| r.get(0),
            ))?;
            let base = base.unwrap_or(view.clone());
            let spec = super::index::load(c, &base)?.ok_or_else(|| {
                Error::new(
                    ErrorCode::NoSearchIndex,
                    format!("db.search: '{view}' has no search index"),
                )
            })?;
            Ok((spec.key.clone(), spec.vector.map(|v| v.dims)))
        },
    )
}

impl Component for DbSearch {
    /// Installed once per pooled state (`lua::pool`): reads the invocation only when called.
    fn reusable(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "db.search"
    }

    fn install(&self, lua: &Lua, env: &Rc<Env>) -> mlua::Result<()> {
        let db: Table = match lua.globals().get::<Value>("db")? {
            Value::Table(t) => t,
            _ => return Ok(()),
        };
        let e = Rc::clone(env);
        db.set(
            "search",
            lua.create_function(move |lua, args: Table| {
                let mut a = parse(args)?;
                let (key, dims) = index_of(&e, a.table.clone()).map_err(lua_err)?;
                if a.vector.is_none() {
                    if let (Some(text), Some(dims)) = (&a.text, dims) {
                        a.vector = super::embed_query_text(&e, text, dims).map_err(lua_err)?;
                    }
                }
                let sql = format!(
                    "SELECT v.*, json_extract(s.value, '$.score') AS _score,
                            json_extract(s.value, '$.text_rank') AS _text_rank,
                            json_extract(s.value, '$.vector_rank') AS _vector_rank,
                            json_extract(s.value, '$.bm25') AS _bm25,
                            json_extract(s.value, '$.distance') AS _distance,
                            json_extract(s.value, '$.snippet') AS _snippet
                     FROM json_each(search(?1, ?2, ?3, ?4, ?5)) AS s
                     JOIN {view} AS v ON v.{key} = json_extract(s.value, '$.id')
                     ORDER BY s.key",
                    view = quote_ident(&a.table),
                    key = quote_ident(&key),
                );
                let params: Vec<Sql> = vec![
                    Sql::Text(a.table.clone()),
                    a.text.clone().map_or(Sql::Null, Sql::Text),
                    a.vector
                        .as_ref()
                        .map_or(Sql::Null, |v| Sql::Blob(v.iter().flat_map(|x| x.to_le_bytes()).collect())),
                    Sql::Integer(a.k),
                    Sql::Text(serde_json::Value::Object(a.options.clone()).to_string()),
                ];
                let rows = e
                    .storage
                    .read_blocking(&e.rt, &e.ctx, std::sync::Arc::clone(&e.control), move |c| {
                        let mut st = c.prepare(&sql)?;
                        let names: Vec<String> =
                            st.column_names().map(|s| s.to_string()).collect();
                        let rows = st
                            .query_map(rusqlite::params_from_iter(params.iter()), |r| {
                                (0..names.len()).map(|i| r.get::<_, Sql>(i)).collect::<rusqlite::Result<Vec<_>>>()
                            })?
                            .collect::<rusqlite::Result<Vec<_>>>()?;
                        Ok((names, rows))
                    })
                    .map_err(lua_err)?;
                let (names, rows) = rows;
                let out = lua.create_table_with_capacity(rows.len(), 0)?;
                out.set_metatable(Some(mlua::LuaSerdeExt::array_metatable(lua)))?;
                for (i, r) in rows.into_iter().enumerate() {
                    let t = lua.create_table_with_capacity(0, names.len())?;
                    for (name, v) in names.iter().zip(r) {
                        let lv = match v {
                            Sql::Null => continue,
                            Sql::Integer(n) => Value::Integer(n),
                            Sql::Real(f) => Value::Number(f),
                            Sql::Text(s) => Value::String(lua.create_string(&s)?),
                            Sql::Blob(b) => Value::String(lua.create_string(&b)?),
                        };
                        t.raw_set(name.as_str(), lv)?;
                    }
                    out.raw_set(i + 1, t)?;
                }
                Ok(out)
            })?,
        )
    }
}
