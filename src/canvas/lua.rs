//! The `ui` Lua component: `ui.deploy{name=, code=, props=, to=}` compiles a TSX UI, stores it
//! as a new version and pushes it to the target's open canvases (as the caller: anyone may
//! deploy to their own `user:<id>`, other targets need the admin or `[canvas]
//! channel_deploy_roles`); a compile error raises `UI_COMPILE_ERROR` with `name.tsx:line:column`.
//! `ui.check{code=}` compiles without storing and returns `{ok=true}` or
//! `{ok=false, line=, column=, message=}` (for repair loops).

use std::rc::Rc;

use mlua::{Lua, LuaSerdeExt, Table, Value};
use serde_json::{Value as Json, json};

use super::{DeployReq, compile, prepare, push, service, store};
use crate::core::{Error, ErrorCode, RequestContext};
use crate::lua::components::{Component, lua_err};
use crate::lua::{Env, to_json};

pub struct Ui;

fn field_str(t: &Table, k: &str, required: bool) -> mlua::Result<Option<String>> {
    match t.raw_get::<Value>(k)? {
        Value::Nil if !required => Ok(None),
        Value::String(s) => Ok(Some(s.to_str()?.to_string())),
        Value::Nil => Err(mlua::Error::runtime(format!("ui: '{k}' is required (a string)"))),
        other => Err(mlua::Error::runtime(format!("ui: '{k}' must be a string, not {}", other.type_name()))),
    }
}

fn check_keys(t: &Table, allowed: &[&str]) -> mlua::Result<()> {
    for pair in t.pairs::<Value, Value>() {
        let (k, _) = pair?;
        let ok = matches!(&k, Value::String(s) if allowed.iter().any(|a| s.as_bytes() == a.as_bytes()));
        if !ok {
            return Err(mlua::Error::runtime(format!(
                "ui: unknown field {}; expected {}",
                match &k {
                    Value::String(s) => format!("'{}'", s.to_string_lossy()),
                    v => v.type_name().to_string(),
                },
                allowed.join(", ")
            )));
        }
    }
    Ok(())
}

fn unavailable() -> mlua::Error {
    lua_err(Error::new(ErrorCode::NotImplemented, "ui: the canvas is not available in this context"))
}

impl Component for Ui {
    /// Installed once per pooled state (`lua::pool`): reads the invocation only when called.
    fn reusable(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "ui"
    }

    fn install(&self, lua: &Lua, env: &Rc<Env>) -> mlua::Result<()> {
        let t = lua.create_table()?;
        let e = Rc::clone(env);
        t.set(
            "deploy",
            lua.create_function(move |lua, spec: Value| {
                let Value::Table(spec) = spec else {
                    return Err(mlua::Error::runtime("ui.deploy expects a table {name=, code=, props=, to=}"));
                };
                check_keys(&spec, &["name", "code", "props", "to"])?;
                let name = field_str(&spec, "name", true)?.unwrap_or_default();
                let code = field_str(&spec, "code", true)?.unwrap_or_default();
                let to = field_str(&spec, "to", false)?;
                let props = match spec.raw_get::<Value>("props")? {
                    Value::Nil => json!({}),
                    v @ Value::Table(_) => match to_json(&v).map_err(|m| mlua::Error::runtime(format!("ui.deploy: props: {m}")))? {
                        Json::Array(a) if a.is_empty() => json!({}),
                        j => j,
                    },
                    other => return Err(mlua::Error::runtime(format!("ui.deploy: props must be a table, not {}", other.type_name()))),
                };
                let app = e.app.as_ref().ok_or_else(unavailable)?;
                let canvas = service(app).map_err(lua_err)?;
                if e.tx.borrow().is_some() {
                    return Err(lua_err(Error::new(
                        ErrorCode::BadArguments,
                        "ui.deploy cannot run inside db.tx (deploy after the transaction)",
                    )));
                }
                let req = DeployReq { name, code, props, to };
                let (target, compiled) = prepare(&canvas.settings, &e.ctx, &req).map_err(lua_err)?;
                let by = e.ctx.user_id.clone();
                let (n, t2, code, props) = (req.name.clone(), target.clone(), req.code, req.props.clone());
                let hash = compiled.hash.clone();
                let css = compiled.css.clone();
                let v = e
                    .rt
                    .block_on(e.storage.write(&RequestContext::system(), crate::storage::ExecControl::lookup(), move |c| {
                        store::deploy(c, &n, &t2, &code, &compiled, &props, by.as_deref())
                    }))
                    .map_err(lua_err)?;
                let mount = store::mount_json(&req.name, &target, v, &hash, &css, &req.props.to_string());
                let delivered = push(app, &mount);
                lua.to_value(&json!({"name": req.name, "target": target, "version": v, "hash": hash, "delivered": delivered}))
            })?,
        )?;
        let e = Rc::clone(env);
        t.set(
            "check",
            lua.create_function(move |lua, spec: Value| {
                let Value::Table(spec) = spec else {
                    return Err(mlua::Error::runtime("ui.check expects a table {code=, name=}"));
                };
                check_keys(&spec, &["name", "code", "props", "to"])?;
                let name = field_str(&spec, "name", false)?.unwrap_or_else(|| "ui".into());
                let code = field_str(&spec, "code", true)?.unwrap_or_default();
                let max = e
                    .app
                    .as_ref()
                    .and_then(|a| service(a).ok())
                    .map_or(super::CanvasSettings::default().max_source, |c| c.settings.max_source);
                if code.len() > max {
                    return Err(lua_err(Error::new(
                        ErrorCode::RequestTooLarge,
                        format!("ui.check: source of {} bytes is over [canvas] max_source ({max} bytes)", code.len()),
                    )));
                }
                let r = match compile::compile(&name, &code) {
                    Ok(c) => json!({"ok": true, "bytes": c.js.len(), "css_bytes": c.css.len()}),
                    Err(e) => json!({"ok": false, "line": e.line, "column": e.column, "message": e.message}),
                };
                lua.to_value(&r)
            })?,
        )?;
        lua.globals().set(self.name(), t)
    }
}
