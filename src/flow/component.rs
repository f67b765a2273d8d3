//! The `flow` Lua global.
//!
//! - `flow.define(name, function(ctx, input) ... end)`: in a function named `name`, declares
//!   the workflow. Inside a run of an instance it becomes the function's handler (the body
//!   gets `ctx`); called as a plain function (`POST /fn/{name}`) the handler starts an
//!   instance with the call's input and returns `{id = ...}`.
//! - `flow.start(name, input, {id = ...})` → id (an explicit id makes starting idempotent;
//!   inside a workflow it is required, or use `ctx.child`).
//! - `flow.signal(id, event, payload)`, `flow.status(id)`, `flow.cancel(id)`.
//! - `flow.schedule(name, "0 7 * * *", {tz =, input =, missed = "once"|"skip", user =})`,
//!   `flow.unschedule(name)` (admin; `user`: the runs start as that user).
//! - `flow.localtime(unix_seconds, tz)` → `{date, time, year, month, day, hour, minute,
//!   second, weekday, offset}`: wall-clock time in an IANA time zone (pure, replay-safe).
//! - `flow.test_outside(line)`: only with the test-only `[flow] test_outside_file`.
//!
//! Everything runs as the invocation's identity: the instance started runs as it.

use std::io::Write as _;
use std::rc::Rc;

use mlua::{Function, Lua, LuaSerdeExt, Table, Value};
use serde_json::Value as Json;

use super::{FlowService, run};
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::lua::components::{Component, lua_err};
use crate::lua::{Env, to_json};

pub struct FlowLua;

/// A flow id: 1..200 of `A-Z a-z 0-9 . _ : -`.
pub(crate) fn check_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > 200
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(&b))
    {
        return Err(Error::new(
            ErrorCode::BadArguments,
            "a flow id must be 1 to 200 characters of A-Z, a-z, 0-9, '.', '-', '_', ':'",
        ));
    }
    Ok(())
}

fn svc(env: &Env) -> mlua::Result<&FlowService> {
    env.app
        .as_ref()
        .and_then(|a| a.get::<FlowService>())
        .ok_or_else(|| {
            lua_err(Error::new(
                ErrorCode::NotImplemented,
                "flow: workflows run only in a server",
            ))
        })
}

fn json_arg(v: &Value, what: &str) -> mlua::Result<Json> {
    to_json(v).map_err(|e| {
        lua_err(Error::new(
            ErrorCode::BadArguments,
            format!("{what}: {e}"),
        ))
    })
}

fn start(env: &Env, name: String, input: Value, id: Option<String>) -> mlua::Result<String> {
    let app = env.app.clone().ok_or_else(|| svc(env).err().unwrap())?;
    svc(env)?;
    if run::current().is_some() && id.is_none() {
        return Err(lua_err(Error::new(
            ErrorCode::BadArguments,
            "flow.start inside a workflow needs an explicit {id = ...} (a re-run would start another instance); or use ctx.child",
        )));
    }
    let input = json_arg(&input, "flow.start: input")?;
    let (id, _, _) = env
        .rt
        .block_on(super::http::start(&app, &env.ctx, &name, input, id, None))
        .map_err(lua_err)?;
    Ok(id)
}

impl Component for FlowLua {
    fn name(&self) -> &'static str {
        "flow"
    }

    /// Installed once per pooled state (`lua::pool`) until called, outside workflow runs (a
    /// run's install depends on the run).
    fn reusable_until_called(&self) -> bool {
        run::current().is_none()
    }

    fn install(&self, lua: &Lua, env: &Rc<Env>) -> mlua::Result<()> {
        let t = lua.create_table()?;
        let current = run::current().filter(|r| r.name == env.function);
        if let Some(st) = &current {
            run::fix_nondeterminism(lua, st)?;
        }
        let (e, cur) = (Rc::clone(env), current.clone());
        t.set(
            "define",
            lua.create_function(move |lua, (name, body): (String, Function)| {
                if name != e.function {
                    return Err(lua_err(Error::new(
                        ErrorCode::BadArguments,
                        format!(
                            "flow.define('{name}', ...) in function '{}': a workflow is defined in the function of its own name",
                            e.function
                        ),
                    )));
                }
                let handler = match &cur {
                    Some(st) => {
                        st.defined.set(true);
                        let (e2, st2) = (Rc::clone(&e), Rc::clone(st));
                        lua.create_function(move |lua, (input, _): (Value, Value)| {
                            let ctx = run::make_ctx(lua, &e2, &st2)?;
                            body.call::<Value>((ctx, input))
                        })?
                    }
                    None => {
                        let e2 = Rc::clone(&e);
                        lua.create_function(move |lua, (input, _): (Value, Value)| {
                            let id = start(&e2, name.clone(), input, None)?;
                            let out = lua.create_table()?;
                            out.set("id", id)?;
                            Ok(out)
                        })?
                    }
                };
                lua.globals().set("handler", handler.clone())?;
                Ok(handler)
            })?,
        )?;
        let e = Rc::clone(env);
        t.set(
            "start",
            lua.create_function(move |_, (name, input, o): (String, Value, Option<Table>)| {
                let id = match o {
                    None => None,
                    Some(o) => o.get::<Option<String>>("id")?,
                };
                start(&e, name, input, id)
            })?,
        )?;
        let e = Rc::clone(env);
        t.set(
            "signal",
            lua.create_function(move |_, (id, event, payload): (String, String, Value)| {
                let app = e.app.clone().ok_or_else(|| svc(&e).err().unwrap())?;
                let payload = json_arg(&payload, "flow.signal: payload")?;
                e.rt.block_on(super::http::signal(&app, &e.ctx, &id, &event, payload))
                    .map_err(lua_err)?;
                Ok(true)
            })?,
        )?;
        let e = Rc::clone(env);
        t.set(
            "status",
            lua.create_function(move |lua, id: String| {
                let app = e.app.clone().ok_or_else(|| svc(&e).err().unwrap())?;
                let d = e
                    .rt
                    .block_on(super::http::detail(&app, &e.ctx, &id, false))
                    .map_err(lua_err)?;
                lua.to_value(&d)
            })?,
        )?;
        let e = Rc::clone(env);
        t.set(
            "cancel",
            lua.create_function(move |_, id: String| {
                let app = e.app.clone().ok_or_else(|| svc(&e).err().unwrap())?;
                let n = e
                    .rt
                    .block_on(super::http::cancel(&app, &e.ctx, &id))
                    .map_err(lua_err)?;
                Ok(n)
            })?,
        )?;
        let e = Rc::clone(env);
        t.set(
            "schedule",
            lua.create_function(move |lua, (name, pattern, o): (String, String, Option<Table>)| {
                let app = e.app.clone().ok_or_else(|| svc(&e).err().unwrap())?;
                let (mut tz, mut input, mut missed) = ("UTC".to_string(), Json::Null, "once".to_string());
                let mut user = None;
                if let Some(o) = o {
                    for pair in o.pairs::<String, Value>() {
                        let (k, v) = pair?;
                        match k.as_str() {
                            "tz" => tz = String::from_lua_value(v, "tz")?,
                            "missed" => missed = String::from_lua_value(v, "missed")?,
                            "input" => input = json_arg(&v, "flow.schedule: input")?,
                            "user" => user = Some(String::from_lua_value(v, "user")?),
                            other => {
                                return Err(lua_err(Error::new(
                                    ErrorCode::BadArguments,
                                    format!("flow.schedule: unknown option '{other}' (tz, input, missed, user)"),
                                )));
                            }
                        }
                    }
                }
                let r = e
                    .rt
                    .block_on(super::cron::schedule(&app, &e.ctx, &name, &pattern, &tz, input, &missed, user))
                    .map_err(lua_err)?;
                lua.to_value(&r)
            })?,
        )?;
        let e = Rc::clone(env);
        t.set(
            "unschedule",
            lua.create_function(move |_, name: String| {
                let app = e.app.clone().ok_or_else(|| svc(&e).err().unwrap())?;
                e.rt.block_on(super::cron::unschedule(&app, &e.ctx, &name))
                    .map_err(lua_err)
            })?,
        )?;
        t.set(
            "localtime",
            lua.create_function(|lua, (secs, tz): (f64, String)| {
                let t = localtime(secs, &tz).map_err(lua_err)?;
                lua.to_value(&t)
            })?,
        )?;
        if let Some(path) = env
            .app
            .as_ref()
            .and_then(|a| a.get::<FlowService>())
            .and_then(|s| s.settings.test_outside_file.clone())
        {
            t.set(
                "test_outside",
                lua.create_function(move |_, line: String| {
                    if line.len() > 4096 || line.contains('\n') {
                        return Err(mlua::Error::runtime("flow.test_outside: one line of at most 4096 bytes"));
                    }
                    let mut f = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                        .map_err(mlua::Error::external)?;
                    f.write_all(format!("{line}\n").as_bytes())
                        .map_err(mlua::Error::external)?;
                    Ok(())
                })?,
            )?;
        }
        lua.globals().set(self.name(), t)
    }
}

trait FromLuaValue: Sized {
    fn from_lua_value(v: Value, what: &str) -> mlua::Result<Self>;
}

impl FromLuaValue for String {
    fn from_lua_value(v: Value, what: &str) -> mlua::Result<Self> {
        match v {
            Value::String(s) => Ok(s.to_string_lossy()),
            _ => Err(lua_err(Error::new(
                ErrorCode::BadArguments,
                format!("flow.schedule: {what} must be a string"),
            ))),
        }
    }
}

/// Wall-clock time of `secs` (Unix seconds) in the IANA zone `tz`.
pub(crate) fn localtime(secs: f64, tz: &str) -> Result<Json> {
    use chrono::{Datelike, Offset, Timelike};
    let z = super::cron::zone(tz)?;
    let t = (secs.is_finite() && secs.abs() < 1e13)
        .then(|| chrono::DateTime::from_timestamp_millis((secs * 1000.0).floor() as i64))
        .flatten()
        .ok_or_else(|| Error::new(ErrorCode::BadArguments, "flow.localtime: a Unix time in seconds"))?
        .with_timezone(&z);
    Ok(serde_json::json!({
        "date": t.format("%Y-%m-%d").to_string(),
        "time": t.format("%H:%M:%S").to_string(),
        "year": t.year(), "month": t.month(), "day": t.day(),
        "hour": t.hour(), "minute": t.minute(), "second": t.second(),
        "weekday": t.weekday().number_from_monday(),
        "offset": t.offset().fix().local_minus_utc(),
    }))
}

/// The identity a new instance runs as, as stored with it.
pub(crate) fn identity(ctx: &RequestContext) -> (Option<String>, String, Option<String>) {
    (
        ctx.user_id.clone(),
        ctx.role.as_str().to_string(),
        ctx.claims
            .as_ref()
            .map(|c| Json::Object((**c).clone()).to_string()),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn localtime_follows_the_zone() {
        // 2026-12-01T22:00:00Z is 07:00 on the 2nd in Tokyo, 22:00 on the 1st in London (GMT).
        let t = super::localtime(1_796_162_400.0, "Asia/Tokyo").unwrap();
        assert_eq!(t["date"], "2026-12-02");
        assert_eq!(t["time"], "07:00:00");
        assert_eq!(t["offset"], 9 * 3600);
        assert_eq!(t["weekday"], 3);
        let l = super::localtime(1_796_162_400.0, "Europe/London").unwrap();
        assert_eq!(l["date"], "2026-12-01");
        assert_eq!(l["hour"], 22);
        assert!(super::localtime(f64::NAN, "UTC").is_err());
        assert!(super::localtime(0.0, "Mars/Base").is_err());
    }
}
