//! `http` in Lua: `http.fetch{url=, method=, headers=, body=, timeout=}`, `http.get(url, opts)`
//! and `http.post(url, body, opts)`. Each returns `{status=, ok=, headers=, body=, url=,
//! redacted=}` (header names lower-case; `redacted` counts what the privacy guard removed) or
//! raises a coded error (`EGRESS_DENIED`, `EGRESS_FAILED`, `EGRESS_LIMIT_EXCEEDED`,
//! `PRIVACY_BLOCKED`, `VAULT_DENIED`, `TIMEOUT_EXCEEDED`). A table body is sent as JSON.
//! Header values may be vault references (`vault.bearer("name")`), substituted by the host.
//!
//! Validates every argument (hostile Lua is expected); runs the call on the invocation's
//! runtime and never waits past the invocation's deadline.

use std::rc::Rc;
use std::time::Instant;

use mlua::{Lua, Table, Value};

use super::fetch::{Egress, Failure, FetchInput, HeaderSrc};
use crate::core::{Error, ErrorCode};
use crate::lua::components::{Component, lua_err};
use crate::lua::sandbox::Limit;
use crate::lua::{Env, to_json};
use crate::vault::VaultRef;

pub struct Http;

fn bad(msg: impl Into<String>) -> mlua::Error {
    lua_err(Error::new(ErrorCode::BadArguments, msg))
}

fn parse_input(spec: &Table, max_body: usize) -> mlua::Result<FetchInput> {
    for pair in spec.clone().pairs::<Value, Value>() {
        let (k, _) = pair?;
        match &k {
            Value::String(s) if matches!(&*s.to_string_lossy(), "url" | "method" | "headers" | "body" | "timeout") => {}
            other => {
                return Err(bad(format!(
                    "http.fetch: unknown option {:?} (url, method, headers, body, timeout)",
                    other.to_string().unwrap_or_default()
                )));
            }
        }
    }
    let url = match spec.get::<Value>("url")? {
        Value::String(s) => s.to_str().map_err(|_| bad("http.fetch: url must be UTF-8"))?.to_string(),
        _ => return Err(bad("http.fetch: url (a string) is required")),
    };
    if url.len() > 8192 {
        return Err(bad("http.fetch: url is longer than 8192 bytes"));
    }
    let method = match spec.get::<Value>("method")? {
        Value::Nil => "GET".to_string(),
        Value::String(s) => s.to_str().map_err(|_| bad("http.fetch: bad method"))?.to_ascii_uppercase(),
        _ => return Err(bad("http.fetch: method must be a string")),
    };
    let mut headers = Vec::new();
    let mut has_ct = false;
    match spec.get::<Value>("headers")? {
        Value::Nil => {}
        Value::Table(t) => {
            for pair in t.pairs::<Value, Value>() {
                let (k, v) = pair?;
                let Value::String(k) = k else {
                    return Err(bad("http.fetch: header names must be strings"));
                };
                let k = k.to_str().map_err(|_| bad("http.fetch: header names must be UTF-8"))?.to_string();
                if k.eq_ignore_ascii_case("content-type") {
                    has_ct = true;
                }
                let v = match v {
                    Value::String(s) => HeaderSrc::Text(
                        s.to_str().map_err(|_| bad(format!("http.fetch: header {k} must be UTF-8")))?.to_string(),
                    ),
                    Value::Integer(i) => HeaderSrc::Text(i.to_string()),
                    Value::Number(n) => HeaderSrc::Text(n.to_string()),
                    Value::UserData(ud) => match ud.borrow::<VaultRef>() {
                        Ok(r) => HeaderSrc::Vault(r.clone()),
                        Err(_) => return Err(bad(format!("http.fetch: header {k} must be a string or a vault reference"))),
                    },
                    _ => return Err(bad(format!("http.fetch: header {k} must be a string or a vault reference"))),
                };
                headers.push((k, v));
                if headers.len() > 100 {
                    return Err(bad("http.fetch: more than 100 headers"));
                }
            }
        }
        _ => return Err(bad("http.fetch: headers must be a table")),
    }
    let body = match spec.get::<Value>("body")? {
        Value::Nil => None,
        Value::String(s) => {
            let b = s.as_bytes();
            if b.len() > max_body {
                return Err(lua_err(Error::new(
                    ErrorCode::EgressLimit,
                    format!("http.fetch: request body of {} bytes is over [egress] max_request_bytes ({max_body})", b.len()),
                )));
            }
            Some(b.to_vec())
        }
        t @ Value::Table(_) => {
            let j = to_json(&t).map_err(|e| bad(format!("http.fetch: body: {e}")))?;
            if !has_ct {
                headers.push(("content-type".into(), HeaderSrc::Text("application/json".into())));
            }
            Some(j.to_string().into_bytes())
        }
        _ => return Err(bad("http.fetch: body must be a string or a table (sent as JSON)")),
    };
    let timeout = match spec.get::<Value>("timeout")? {
        Value::Nil => None,
        Value::Integer(i) if i > 0 => Some(i as f64),
        Value::Number(n) if n > 0.0 && n.is_finite() => Some(n),
        _ => return Err(bad("http.fetch: timeout must be a positive number of seconds")),
    };
    Ok(FetchInput { url, method, headers, body, timeout })
}

fn run(lua: &Lua, env: &Env, spec: Table) -> mlua::Result<Table> {
    let app = env.app.as_ref();
    let egress = app.and_then(|a| a.get::<Egress>()).ok_or_else(|| {
        lua_err(Error::new(ErrorCode::NotImplemented, "http: no egress in this context"))
    })?;
    let input = parse_input(&spec, egress.settings.max_request_bytes)?;
    let deadline = env.control.deadline;
    if deadline.is_some_and(|d| Instant::now() >= d) {
        return Err(mlua::Error::external(Limit::Time));
    }
    let r = env.rt.block_on(egress.fetch(app, &env.ctx, &env.function, input, deadline));
    let out = match r {
        Ok(o) => o,
        Err(Failure::Deadline) => {
            env.meter.tripped.set(Some(Limit::Time));
            return Err(mlua::Error::external(Limit::Time));
        }
        Err(Failure::Error(e)) => return Err(lua_err(e)),
    };
    let t = lua.create_table()?;
    t.set("status", out.status)?;
    t.set("ok", (200..300).contains(&out.status))?;
    t.set("url", out.url)?;
    t.set("body", lua.create_string(&out.body)?)?;
    let h = lua.create_table()?;
    for (k, v) in out.headers {
        // Repeated headers are joined as HTTP allows.
        let prev: Option<String> = h.get(k.as_str())?;
        match prev {
            Some(p) => h.set(k, format!("{p}, {v}"))?,
            None => h.set(k, v)?,
        }
    }
    t.set("headers", h)?;
    let red = lua.create_table()?;
    for (k, n) in out.redacted {
        red.set(k.as_str(), n)?;
    }
    t.set("redacted", red)?;
    Ok(t)
}

impl Component for Http {
    /// Installed once per pooled state (`lua::pool`): reads the invocation only when called.
    fn reusable(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "http"
    }

    fn install(&self, lua: &Lua, env: &Rc<Env>) -> mlua::Result<()> {
        let t = lua.create_table()?;
        let e = Rc::clone(env);
        t.set(
            "fetch",
            lua.create_function(move |lua, spec: Value| match spec {
                Value::Table(spec) => run(lua, &e, spec),
                _ => Err(bad("http.fetch expects a table: http.fetch{url=..., method=..., headers=..., body=..., timeout=...}")),
            })?,
        )?;
        let e = Rc::clone(env);
        t.set(
            "get",
            lua.create_function(move |lua, (url, opts): (Value, Option<Table>)| {
                let spec = opts.unwrap_or(lua.create_table()?);
                spec.set("url", url)?;
                spec.set("method", "GET")?;
                run(lua, &e, spec)
            })?,
        )?;
        let e = Rc::clone(env);
        t.set(
            "post",
            lua.create_function(move |lua, (url, body, opts): (Value, Value, Option<Table>)| {
                let spec = opts.unwrap_or(lua.create_table()?);
                spec.set("url", url)?;
                spec.set("body", body)?;
                spec.set("method", "POST")?;
                run(lua, &e, spec)
            })?,
        )?;
        lua.globals().set(self.name(), t)
    }
}
