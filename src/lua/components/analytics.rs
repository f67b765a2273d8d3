//! `analytics`: read-only SQL on the analytics database (DuckDB) from Lua, as the caller.
//!
//! - `analytics.query(sql, params?)` → array of rows (tables keyed by column name)
//!
//! The same rules as `POST /analytics`: one SELECT in a read-only transaction; the admin
//! queries everything, other roles only the analytics views granted to them (see
//! `posterity::analytics`). `{name:Type}` placeholders are bound from `params`. Results are
//! bounded by the invocation's row limit; the query stops at the invocation's deadline.

use std::rc::Rc;

use mlua::{Lua, Table};

use super::db::{params_json, to_lua_rows};
use super::{Component, lua_err};
use crate::core::{Error, ErrorCode};
use crate::lua::Env;

pub struct Analytics;

impl Component for Analytics {
    /// Installed once per pooled state (`lua::pool`): reads the invocation only when called.
    fn reusable(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "analytics"
    }

    fn install(&self, lua: &Lua, env: &Rc<Env>) -> mlua::Result<()> {
        let t = lua.create_table()?;
        let e = Rc::clone(env);
        t.set(
            "query",
            lua.create_function(move |lua, (sql, p): (String, Option<Table>)| {
                let a = e.app.as_ref().map(|a| a.posterity()).ok_or_else(|| {
                    lua_err(Error::new(
                        ErrorCode::NotImplemented,
                        "analytics: no analytics database in this context",
                    ))
                })?;
                let params = params_json(p)?;
                let rows = crate::posterity::analytics::query_json(
                    a,
                    &e.ctx,
                    &e.control,
                    &sql,
                    &params,
                    e.options.max_rows,
                    e.options.max_sql,
                )
                .map_err(lua_err)?;
                to_lua_rows(lua, rows)
            })?,
        )?;
        lua.globals().set(self.name(), t)
    }
}
