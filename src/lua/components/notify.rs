//! `notify`: live messages from Lua. `notify.broadcast(channel, payload)` → number of sockets
//! reached; `notify.presence(channel)` → who is in it. Both as the caller: the channel's join
//! rules apply (see `realtime::hub::may_join`).

use std::rc::Rc;

use mlua::{Lua, LuaSerdeExt, Value};

use super::{Component, lua_err};
use crate::core::{Error, ErrorCode};
use crate::lua::{Env, to_json};

pub struct Notify;

impl Component for Notify {
    fn name(&self) -> &'static str {
        "notify"
    }

    fn install(&self, lua: &Lua, env: &Rc<Env>) -> mlua::Result<()> {
        let t = lua.create_table()?;
        let e = Rc::clone(env);
        t.set(
            "broadcast",
            lua.create_function(move |_, (channel, payload): (String, Value)| {
                let hub = e.app.as_ref().map(|a| a.hub()).ok_or_else(|| {
                    lua_err(Error::new(
                        ErrorCode::NotImplemented,
                        "notify: no live connections in this context",
                    ))
                })?;
                let payload = to_json(&payload)
                    .map_err(|m| mlua::Error::runtime(format!("notify.broadcast: {m}")))?;
                hub.broadcast(&e.ctx, &channel, payload).map_err(lua_err)
            })?,
        )?;
        let e = Rc::clone(env);
        t.set(
            "presence",
            lua.create_function(move |lua, channel: String| {
                let hub = e.app.as_ref().map(|a| a.hub()).ok_or_else(|| {
                    lua_err(Error::new(
                        ErrorCode::NotImplemented,
                        "notify: no live connections in this context",
                    ))
                })?;
                let list = hub.presence(&e.ctx, &channel).map_err(lua_err)?;
                lua.to_value(&list)
            })?,
        )?;
        lua.globals().set(self.name(), t)
    }
}
