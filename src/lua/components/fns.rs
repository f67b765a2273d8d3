//! `fn`: call other deployed functions from Lua — `fn.call(name, input)` runs the live version
//! of `name` in the same sandbox (same identity, limits and trace), `fn.load(name)` returns its
//! handler. Property checks use it to exercise the services of a bundle.
//!
//! Each loaded function gets its own global table (falling back to the shared globals), so its
//! top-level definitions do not leak into the caller. Sources are read as the engine (function
//! code is not app data); the code then runs as the caller.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use mlua::{Function, Lua, Value};

use super::{Component, lua_err};
use crate::core::RequestContext;
use crate::lua::{Env, sandbox, store};

pub struct Fns;

fn load(lua: &Lua, env: &Env, name: &str) -> mlua::Result<Function> {
    store::check_name(name).map_err(lua_err)?;
    let src = env
        .storage
        .read_blocking(
            &env.rt,
            &RequestContext::system(),
            Arc::clone(&env.control),
            {
                let name = name.to_string();
                move |c| store::get(c, &name, None)
            },
        )
        .map_err(lua_err)?;
    if sandbox::has_close_attribute(&src.source) {
        return Err(mlua::Error::runtime(format!(
            "function '{name}' uses to-be-closed variables (<close>), which the sandbox refuses"
        )));
    }
    let globals = lua.globals();
    let own = lua.create_table()?;
    let meta = lua.create_table()?;
    meta.set("__index", globals)?;
    own.set_metatable(Some(meta))?;
    let returned: Value = lua
        .load(&src.source)
        .set_name(format!("={name}"))
        .set_mode(mlua::ChunkMode::Text)
        .set_environment(own.clone())
        .call(())?;
    match returned {
        Value::Function(f) => Ok(f),
        _ => match own.raw_get::<Value>("handler")? {
            Value::Function(f) => Ok(f),
            _ => Err(mlua::Error::runtime(format!(
                "function '{name}' must return a function, or define handler(input, ctx)"
            ))),
        },
    }
}

impl Component for Fns {
    /// Installed once per pooled state (`lua::pool`): its cache of loaded functions belongs to
    /// one invocation (`EnvState::serial`).
    fn reusable(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "fn"
    }

    fn install(&self, lua: &Lua, env: &Rc<Env>) -> mlua::Result<()> {
        // Loaded functions, for the invocation `.0` only (a pooled state serves many).
        let cache: Rc<RefCell<(u64, HashMap<String, Function>)>> = Rc::default();
        let get = {
            let env = Rc::clone(env);
            let cache = Rc::clone(&cache);
            move |lua: &Lua, name: &str| -> mlua::Result<Function> {
                {
                    let mut c = cache.borrow_mut();
                    if c.0 != env.serial {
                        *c = (env.serial, HashMap::new());
                    }
                    if let Some(f) = c.1.get(name) {
                        return Ok(f.clone());
                    }
                }
                let f = load(lua, &env, name)?;
                cache.borrow_mut().1.insert(name.to_string(), f.clone());
                Ok(f)
            }
        };
        let get = Rc::new(get);
        let t = lua.create_table()?;
        let g = Rc::clone(&get);
        t.set(
            "load",
            lua.create_function(move |lua, name: String| g(lua, &name))?,
        )?;
        let g = Rc::clone(&get);
        let e = Rc::clone(env);
        t.set(
            "call",
            lua.create_function(move |lua, (name, input): (String, Value)| {
                let f = g(lua, &name)?;
                let ctx = lua.create_table()?;
                ctx.set("user_id", e.ctx.user_id.clone())?;
                ctx.set("role", e.ctx.role.as_str())?;
                ctx.set("trace_id", e.ctx.trace_id.clone())?;
                ctx.set("function", name)?;
                f.call::<Value>((input, ctx))
            })?,
        )?;
        lua.globals().set(self.name(), t)
    }
}
