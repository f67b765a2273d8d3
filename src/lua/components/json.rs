//! `json.encode(value)` and `json.decode(text)`.

use std::rc::Rc;

use mlua::{Lua, LuaSerdeExt, Value};

use super::Component;
use crate::lua::{Env, to_json};

pub struct Json;

impl Component for Json {
    /// Installed once per pooled state (`lua::pool`): reads the invocation only when called.
    fn reusable(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "json"
    }

    fn install(&self, lua: &Lua, env: &Rc<Env>) -> mlua::Result<()> {
        // A decoded document takes several times its text in memory outside Lua's allocator.
        let max_decode = (env.options.memory_limit / 8).max(64 * 1024);
        let t = lua.create_table()?;
        t.set(
            "encode",
            lua.create_function(|_, v: Value| {
                to_json(&v)
                    .map(|j| j.to_string())
                    .map_err(|e| mlua::Error::runtime(format!("json.encode: {e}")))
            })?,
        )?;
        t.set(
            "decode",
            lua.create_function(move |lua, s: mlua::String| {
                if s.as_bytes().len() > max_decode {
                    return Err(mlua::Error::runtime(format!(
                        "json.decode: documents are limited to {max_decode} bytes in the sandbox"
                    )));
                }
                if s.as_bytes().len() > 1024 * 1024 {
                    crate::lua::mark_heavy();
                }
                let v: serde_json::Value = serde_json::from_slice(&s.as_bytes())
                    .map_err(|e| mlua::Error::runtime(format!("json.decode: {e}")))?;
                crate::lua::sandbox::time_check().map_err(mlua::Error::external)?;
                lua.to_value_with(
                    &v,
                    mlua::SerializeOptions::new()
                        .serialize_none_to_null(false)
                        .serialize_unit_to_null(false),
                )
            })?,
        )?;
        lua.globals().set(self.name(), t)
    }
}
