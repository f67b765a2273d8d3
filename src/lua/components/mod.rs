//! The component registry: every global module Lua code can use, attached per invocation.
//!
//! A component is one module implementing [`Component`] plus one line in [`registry`]. Each
//! receives the invocation's [`Env`] (identity, role, trace id, storage, limits, tracer) and
//! must do everything as that identity: `db` runs SQL through the same authorizer and
//! policies as SQL-over-HTTP.

pub mod analytics;
pub mod db;
pub mod debug;
pub mod fns;
pub mod json;
pub mod log;
pub mod prop;

use std::rc::Rc;

use mlua::Lua;

use super::Env;

pub trait Component: Sync {
    /// The global name in Lua.
    fn name(&self) -> &'static str;
    /// Create the component's table (or functions) in `lua`'s globals.
    fn install(&self, lua: &Lua, env: &Rc<Env>) -> mlua::Result<()>;
    /// True when the component may be installed once in a pooled state and serve many
    /// invocations (`lua::pool`): it keeps no per-invocation state in its closures or tables
    /// and reads the caller (`env.ctx`, `env.app`, ...) only when called, never while installing
    /// (a pooled state serves one set of `LuaOptions`: reading `env.options` there is fine). Otherwise (the default) it is installed again for every run.
    fn reusable(&self) -> bool {
        false
    }
    /// For a component that is not [`reusable`](Component::reusable): may its install in a
    /// pooled state serve the current invocation as long as none of its functions has been
    /// called? True when installing reads nothing of the invocation and its closures hold
    /// per-invocation state only once called (a pooled state then installs it once, and again
    /// for every run after the first call of one of its functions). Asked when a pooled state
    /// is built and before each of its runs.
    fn reusable_until_called(&self) -> bool {
        false
    }
}

/// Every component, in installation order. Add new components here.
pub fn registry() -> &'static [&'static dyn Component] {
    &[
        &db::Db,
        &json::Json,
        &log::Log,
        &debug::Debug,
        &prop::Prop,
        &fns::Fns,
        &analytics::Analytics,
    ]
}

/// Turn an engine error into a Lua error that keeps its code for the HTTP answer.
pub fn lua_err(e: crate::core::Error) -> mlua::Error {
    mlua::Error::external(e)
}
