//! The safe `debug` component (Lua's own `debug` library is the host's): the trace id,
//! whether the invocation is traced, checkpoints recorded into the trace, and a traceback.

use std::collections::HashSet;
use std::rc::Rc;

use mlua::{Lua, Value};

use super::Component;
use crate::lua::Env;
use crate::lua::trace::serialize;

pub struct Debug;

impl Component for Debug {
    /// Installed once per pooled state (`lua::pool`): reads the invocation only when called.
    fn reusable(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "debug"
    }

    fn install(&self, lua: &Lua, env: &Rc<Env>) -> mlua::Result<()> {
        let t = lua.create_table()?;
        let e = Rc::clone(env);
        t.set(
            "trace_id",
            lua.create_function(move |_, ()| Ok(e.ctx.trace_id.clone()))?,
        )?;
        let e = Rc::clone(env);
        t.set(
            "tracing",
            lua.create_function(move |_, ()| Ok(e.tracer.is_some()))?,
        )?;
        let e = Rc::clone(env);
        t.set(
            "checkpoint",
            lua.create_function(move |lua, (label, value): (String, Value)| {
                if let Some(tr) = &e.tracer {
                    let line = lua
                        .inspect_stack(1, |d| d.current_line().map(|n| n as i32).unwrap_or(-1))
                        .unwrap_or(-1);
                    let mut budget = 500;
                    tr.borrow_mut().checkpoint(
                        line,
                        label,
                        serialize(&value, 0, &mut HashSet::new(), &mut budget),
                    );
                }
                Ok(())
            })?,
        )?;
        t.set(
            "traceback",
            lua.create_function(|lua, msg: Option<String>| lua.traceback(msg.as_deref(), 1))?,
        )?;
        lua.globals().set(self.name(), t)
    }
}
