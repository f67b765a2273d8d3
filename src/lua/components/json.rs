//! `json.encode(value)` and `json.decode(text)`.

use std::rc::Rc;

use mlua::{Lua, LuaSerdeExt, Value};

use super::Component;
use crate::lua::{Env, to_json};

pub struct Json;

impl Component for Json {
    fn name(&self) -> &'static str {
        "json"
    }

    fn install(&self, lua: &Lua, _env: &Rc<Env>) -> mlua::Result<()> {
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
            lua.create_function(|lua, s: mlua::String| {
                let v: serde_json::Value = serde_json::from_slice(&s.as_bytes())
                    .map_err(|e| mlua::Error::runtime(format!("json.decode: {e}")))?;
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
