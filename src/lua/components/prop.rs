//! `prop`: property-based testing inside the sandbox — generators (ints, numbers, booleans,
//! strings incl. Japanese text, lists, records, tuples, elements), `prop.check` with a seeded
//! run count, and shrinking of a failing case to a minimal counterexample.
//!
//! The module itself is Lua (`prop.lua`), so generators, properties and shrinking all run under
//! the invocation's instruction, memory and time limits. The host side only hands it the default
//! run count and seed, collects each check's outcome into [`Env::reports`], and, when a check is
//! replayed for a trace, tells `prop.check` which counterexample to run once. The module is
//! parsed on the first access to `prop`, so invocations that do not use it pay nothing.

use std::rc::Rc;

use mlua::{Lua, LuaSerdeExt, Table, Value};

use super::Component;
use crate::lua::{Env, to_json};

const SOURCE: &str = include_str!("prop.lua");

pub struct Prop;

impl Component for Prop {
    /// Installed once per pooled state (`lua::pool`): its loaded module lives in Lua tables the
    /// reset restores; the seed and replay it reads while installing matter to checks only, and
    /// checks never run in a pooled state.
    fn reusable(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "prop"
    }

    fn install(&self, lua: &Lua, env: &Rc<Env>) -> mlua::Result<()> {
        let e = Rc::clone(env);
        let report = lua.create_function(move |_, v: Value| {
            let j = to_json(&v).map_err(mlua::Error::runtime)?;
            e.reports.borrow_mut().push(j);
            Ok(())
        })?;
        let e = Rc::clone(env);
        let replay = lua.create_function(move |lua, name: String| {
            Ok(match &e.check.as_ref().and_then(|c| c.replay.as_ref()) {
                None => (Value::Nil, Value::Nil),
                Some((n, v)) if *n == name => (
                    Value::Boolean(true),
                    lua.to_value_with(
                        v,
                        mlua::SerializeOptions::new()
                            .serialize_none_to_null(false)
                            .serialize_unit_to_null(false),
                    )?,
                ),
                Some(_) => (Value::Boolean(false), Value::Nil),
            })
        })?;
        let seed = env.check.as_ref().map(|c| c.seed).unwrap_or(1);
        let runs = env.options.property_runs;
        // Loaded on first use: most invocations never touch `prop`, and parsing the module
        // costs more than the rest of a small call.
        let placeholder = lua.create_table()?;
        let meta = lua.create_table()?;
        meta.set(
            "__index",
            lua.create_function(move |lua, (t, key): (Table, Value)| {
                let m: Table = lua
                    .load(SOURCE)
                    .set_name("=prop")
                    .set_mode(mlua::ChunkMode::Text)
                    .call((report.clone(), replay.clone(), runs, seed))?;
                t.set_metatable(None)?;
                for pair in m.pairs::<Value, Value>() {
                    let (k, v) = pair?;
                    t.raw_set(k, v)?;
                }
                t.raw_get::<Value>(key)
            })?,
        )?;
        placeholder.set_metatable(Some(meta))?;
        lua.globals().set(self.name(), placeholder)
    }
}
