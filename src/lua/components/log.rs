//! `log.debug/info/warn/error(message, fields?)` and `print(...)`: structured log lines tied to
//! the invocation's trace id, also returned with traces.

use std::rc::Rc;

use mlua::{Lua, MultiValue, Table, Value};
use serde_json::json;

use super::Component;
use crate::lua::{Env, to_json};

pub struct Log;

/// Longest message and fields (as JSON) kept per log line.
const MAX_LINE: usize = 8 * 1024;

fn clip(s: &str) -> String {
    if s.len() <= MAX_LINE {
        return s.to_string();
    }
    let mut end = MAX_LINE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

fn emit(env: &Env, level: &str, msg: &str, fields: serde_json::Value) {
    let msg = &clip(msg);
    let fields = match fields.to_string() {
        f if f.len() > MAX_LINE => serde_json::Value::String(clip(&f)),
        _ => fields,
    };
    let (trace_id, function) = (&env.ctx.trace_id, &env.function);
    match level {
        "debug" => tracing::debug!(%trace_id, %function, %fields, "lua: {msg}"),
        "warn" => tracing::warn!(%trace_id, %function, %fields, "lua: {msg}"),
        "error" => tracing::error!(%trace_id, %function, %fields, "lua: {msg}"),
        _ => tracing::info!(%trace_id, %function, %fields, "lua: {msg}"),
    }
    // Kept with the trace: bounded in count and size, so logging cannot outgrow the sandbox.
    let mut logs = env.logs.borrow_mut();
    if logs.len() < 1000 {
        logs.push(json!({"level": level, "message": msg, "fields": fields}));
    }
}

impl Component for Log {
    /// Installed once per pooled state (`lua::pool`): reads the invocation only when called.
    fn reusable(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "log"
    }

    fn install(&self, lua: &Lua, env: &Rc<Env>) -> mlua::Result<()> {
        let t = lua.create_table()?;
        for level in ["debug", "info", "warn", "error"] {
            let env = Rc::clone(env);
            t.set(
                level,
                lua.create_function(move |_, (msg, fields): (mlua::String, Option<Table>)| {
                    let fields = match fields {
                        Some(f) => {
                            to_json(&Value::Table(f)).unwrap_or_else(|e| json!({"unencodable": e}))
                        }
                        None => serde_json::Value::Null,
                    };
                    // Serialising stopped at a limit: that ends the invocation.
                    if let Some(l) = crate::lua::sandbox::tripped_limit() {
                        return Err(mlua::Error::external(l));
                    }
                    emit(&env, level, &msg.to_string_lossy(), fields);
                    Ok(())
                })?,
            )?;
        }
        lua.globals().set(self.name(), t)?;
        let env = Rc::clone(env);
        lua.globals().set(
            "print",
            lua.create_function(move |_, args: MultiValue| {
                let parts: Vec<String> = args
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<mlua::Result<_>>()?;
                emit(&env, "info", &parts.join("\t"), serde_json::Value::Null);
                Ok(())
            })?,
        )
    }
}
