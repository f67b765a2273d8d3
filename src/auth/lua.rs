//! The `auth` Lua global: who the caller is and what they may do.
//!
//! - `auth.user()` → nil for anon, else `{id, role, email, email_verified, claims, session,
//!   device}` (`device` = the session's device name when known);
//! - `auth.require(role | {role, ...} | {claim = value, ...})` → the user table, or a 403
//!   `AUTH_REQUIREMENT_FAILED` naming what is missing (401 for anon); the admin passes any
//!   role requirement, not claim requirements;
//! - `auth.can(operation, table)` → `allowed, via`: whether the caller's role may run
//!   `operation` (`select`, `insert`, `update`, `delete`) on `table` as the storage authorizer
//!   would judge it (grants and policy views), and the policy views over `table` granted to
//!   the role for it;
//! - privileged (an admin caller, or a function named in `[auth_safety]
//!   privileged_functions`): `auth.invite{email=, role=}`, `auth.send_sign_in_link{email=}`,
//!   `auth.revoke_device(id)` (a device id from `GET /auth/devices`: its sessions end and its
//!   sockets close; an id that is no device is taken as a session id) /
//!   `auth.revoke_device{user = id}` (signs the user out everywhere).
//!
//! Every argument is checked; nothing here runs inside `db.tx` that needs the writer.

use std::rc::Rc;

use mlua::{Lua, LuaSerdeExt, Table, Value};
use serde_json::{Value as Json, json};

use super::safety::{Kind, Safety, fn_matches, send_link};
use crate::core::{Error, ErrorCode};
use crate::lua::Env;
use crate::lua::components::{Component, lua_err};

pub struct AuthLua;

fn bad(msg: impl Into<String>) -> mlua::Error {
    lua_err(Error::new(ErrorCode::BadArguments, msg))
}

fn app(env: &Env) -> mlua::Result<&crate::app::App> {
    env.app.as_ref().ok_or_else(|| {
        lua_err(Error::new(ErrorCode::NotImplemented, "auth: not available in this context (no server)"))
    })
}

fn string_arg(what: &str, v: Value, max: usize) -> mlua::Result<String> {
    match v {
        Value::String(s) => {
            let s = s.to_str().map_err(|_| bad(format!("{what} must be UTF-8 text")))?.to_string();
            if s.is_empty() || s.len() > max {
                return Err(bad(format!("{what} must be 1 to {max} bytes")));
            }
            Ok(s)
        }
        other => Err(bad(format!("{what} must be a string, not {}", other.type_name()))),
    }
}

/// Named fields of a table argument; unknown keys are refused.
fn fields(what: &str, t: &Table, known: &[&str]) -> mlua::Result<()> {
    for pair in t.clone().pairs::<Value, Value>() {
        let (k, _) = pair?;
        let Value::String(s) = &k else {
            return Err(bad(format!("{what}: takes a table of named fields ({})", known.join(", "))));
        };
        let name = s.to_string_lossy();
        if !known.contains(&name.as_str()) {
            return Err(bad(format!("{what}: unknown field {name:?} (fields: {})", known.join(", "))));
        }
    }
    Ok(())
}

fn privileged(env: &Env, what: &str) -> mlua::Result<()> {
    let allowed = env.ctx.is_admin()
        || env
            .app
            .as_ref()
            .and_then(|a| a.get::<Safety>())
            .is_some_and(|s| fn_matches(&s.settings.privileged_functions, &env.function));
    if !allowed {
        return Err(lua_err(Error::new(
            ErrorCode::AccessDenied,
            format!(
                "{what} is for admin callers or functions listed in [auth_safety] privileged_functions ('{}' is not)",
                env.function
            ),
        )));
    }
    if env.tx.borrow().is_some() {
        return Err(bad(format!("{what} cannot run inside db.tx")));
    }
    Ok(())
}

/// The caller as JSON (None for anon).
fn user_json(env: &Env) -> mlua::Result<Option<Json>> {
    let ctx = &env.ctx;
    let claims: Json = ctx.claims.as_deref().map(|m| Json::Object(m.clone())).unwrap_or(Json::Null);
    let Some(uid) = ctx.user_id.clone() else {
        if ctx.is_admin() && claims.get("key_id").is_some() {
            // An admin API key without a user.
            return Ok(Some(json!({"id": Json::Null, "role": ctx.role.as_str(), "claims": claims})));
        }
        return Ok(None);
    };
    let (verified, device) = match &env.app {
        Some(app) => {
            let auth = app.auth();
            let verified = env.rt.block_on(auth.email_verified(&uid)).map_err(lua_err)?;
            let device = match &ctx.session_id {
                Some(sid) => env.rt.block_on(auth.session_device(sid)).map_err(lua_err)?,
                None => None,
            };
            (verified, device)
        }
        None => (false, None),
    };
    Ok(Some(json!({
        "id": uid,
        "role": ctx.role.as_str(),
        "email": claims.get("email").cloned().unwrap_or(Json::Null),
        "email_verified": verified,
        "claims": claims,
        "session": ctx.session_id,
        "device": device,
    })))
}

fn denied(msg: String) -> mlua::Error {
    lua_err(Error::new(ErrorCode::AuthRequirementFailed, msg))
}

fn lua_to_json(v: &Value) -> mlua::Result<Json> {
    crate::lua::to_json(v).map_err(bad)
}

impl Component for AuthLua {
    fn name(&self) -> &'static str {
        "auth"
    }

    /// Installed once per pooled state (`lua::pool`): reads the invocation only when called.
    fn reusable(&self) -> bool {
        true
    }

    fn install(&self, lua: &Lua, env: &Rc<Env>) -> mlua::Result<()> {
        let t = lua.create_table()?;

        let e = Rc::clone(env);
        t.set(
            "user",
            lua.create_function(move |lua, ()| match user_json(&e)? {
                Some(u) => lua.to_value(&u),
                None => Ok(Value::Nil),
            })?,
        )?;

        let e = Rc::clone(env);
        t.set(
            "require",
            lua.create_function(move |lua, need: Value| {
                let ctx = &e.ctx;
                let role = ctx.role.as_str().to_string();
                let roles: Option<Vec<String>> = match &need {
                    Value::String(_) => Some(vec![string_arg("auth.require: the role", need.clone(), 64)?]),
                    Value::Table(tb) if tb.raw_len() > 0 => {
                        let mut v = Vec::new();
                        for x in tb.clone().sequence_values::<Value>() {
                            v.push(string_arg("auth.require: each role", x?, 64)?);
                            if v.len() > 100 {
                                return Err(bad("auth.require: at most 100 roles"));
                            }
                        }
                        if tb.clone().pairs::<Value, Value>().count() != v.len() {
                            return Err(bad("auth.require: give a list of roles or a table of claims, not both"));
                        }
                        Some(v)
                    }
                    Value::Table(_) => None,
                    other => {
                        return Err(bad(format!(
                            "auth.require: takes a role name, a list of roles or a table of claims, not {}",
                            other.type_name()
                        )));
                    }
                };
                if ctx.user_id.is_none() && !ctx.is_admin() {
                    return Err(lua_err(Error::new(ErrorCode::AuthenticationFailed, "auth.require: sign in first")));
                }
                match roles {
                    Some(roles) => {
                        if !ctx.is_admin() && !roles.iter().any(|r| *r == role) {
                            return Err(denied(format!(
                                "auth.require: role {} needed; the caller's role is '{role}'",
                                roles.iter().map(|r| format!("'{r}'")).collect::<Vec<_>>().join(" or ")
                            )));
                        }
                    }
                    None => {
                        let Value::Table(tb) = &need else { unreachable!() };
                        let claims = ctx.claims.as_deref();
                        let mut n = 0;
                        for pair in tb.clone().pairs::<Value, Value>() {
                            let (k, v) = pair?;
                            let k = string_arg("auth.require: a claim name", k, 128)?;
                            n += 1;
                            if n > 100 {
                                return Err(bad("auth.require: at most 100 claims"));
                            }
                            let want = lua_to_json(&v)?;
                            let have = claims.and_then(|c| c.get(&k));
                            let same = match (have, &want) {
                                (Some(Json::Number(a)), Json::Number(b)) => a.as_f64() == b.as_f64(),
                                (Some(a), b) => a == b,
                                (None, _) => false,
                            };
                            if !same {
                                return Err(denied(format!(
                                    "auth.require: claim '{k}' must be {want}; the caller's is {}",
                                    have.map(|h| h.to_string()).unwrap_or_else(|| "missing".into())
                                )));
                            }
                        }
                    }
                }
                match user_json(&e)? {
                    Some(u) => lua.to_value(&u),
                    None => Ok(Value::Nil),
                }
            })?,
        )?;

        let e = Rc::clone(env);
        t.set(
            "can",
            lua.create_function(move |lua, (op, table): (Value, Value)| {
                let op = string_arg("auth.can: the operation", op, 16)?.to_ascii_lowercase();
                let bit = match op.as_str() {
                    "select" | "read" => crate::storage::authz::SELECT,
                    "insert" => crate::storage::authz::INSERT,
                    "update" => crate::storage::authz::UPDATE,
                    "delete" => crate::storage::authz::DELETE,
                    _ => return Err(bad(format!("auth.can: operation must be select, insert, update or delete, not {op:?}"))),
                };
                let table = string_arg("auth.can: the table", table, 128)?;
                let role = e.ctx.role.as_str().to_string();
                let admin = e.ctx.is_admin();
                let authz = std::sync::Arc::clone(e.storage.authz());
                let tname = table.clone();
                // Read on the caller's own read path so the grant snapshot is current, then ask
                // the same snapshot the authorizer judges every statement with.
                let policies: Vec<(String, Vec<String>, Vec<String>)> = e
                    .rt
                    .block_on(e.storage.read(&crate::core::RequestContext::system(), crate::storage::ExecControl::lookup(), move |c| {
                        authz.refresh(c)?;
                        let all = crate::auth::policy::list(c)?;
                        Ok(all
                            .into_iter()
                            .filter(|p| p.table.eq_ignore_ascii_case(&tname))
                            .map(|p| (p.name, p.roles, p.operations))
                            .collect())
                    }))
                    .map_err(lua_err)?;
                let authz = e.storage.authz();
                let allowed = admin || authz.allows(&role, &table, bit);
                let via: Vec<String> = policies
                    .into_iter()
                    .filter(|(name, _, _)| admin || authz.allows(&role, name, bit))
                    .map(|(name, _, _)| name)
                    .collect();
                Ok((allowed, lua.to_value(&via)?))
            })?,
        )?;

        let e = Rc::clone(env);
        t.set(
            "invite",
            lua.create_function(move |lua, arg: Value| {
                privileged(&e, "auth.invite")?;
                let Value::Table(tb) = arg else {
                    return Err(bad("auth.invite: takes {email = ..., role = ...}"));
                };
                fields("auth.invite", &tb, &["email", "role"])?;
                let email = string_arg("auth.invite: email", tb.raw_get("email")?, 254)?;
                let role = match tb.raw_get::<Value>("role")? {
                    Value::Nil => "user".to_string(),
                    v => string_arg("auth.invite: role", v, 64)?,
                };
                if role == "admin" && !e.ctx.is_admin() {
                    return Err(lua_err(Error::new(ErrorCode::AccessDenied, "auth.invite: only an admin caller may invite an admin")));
                }
                let app = app(&e)?.clone();
                let out = e
                    .rt
                    .block_on(async {
                        let auth = app.auth();
                        let (user, created) = match auth.find_user(&email).await? {
                            Some(u) if u.email.eq_ignore_ascii_case(email.trim()) => (u, false),
                            _ => (auth.create_user_without_password(&email, &role).await?, true),
                        };
                        let base = app.get::<Safety>().map(|s| s.base_url(None)).unwrap_or_default();
                        let msg = send_link(&app, Kind::Invite, &user, &base).await?;
                        Ok::<_, Error>(json!({"user_id": user.id, "created": created, "message_id": msg}))
                    })
                    .map_err(lua_err)?;
                lua.to_value(&out)
            })?,
        )?;

        let e = Rc::clone(env);
        t.set(
            "send_sign_in_link",
            lua.create_function(move |lua, arg: Value| {
                privileged(&e, "auth.send_sign_in_link")?;
                let Value::Table(tb) = arg else {
                    return Err(bad("auth.send_sign_in_link: takes {email = ...}"));
                };
                fields("auth.send_sign_in_link", &tb, &["email"])?;
                let email = string_arg("auth.send_sign_in_link: email", tb.raw_get("email")?, 254)?;
                let app = app(&e)?.clone();
                let out = e
                    .rt
                    .block_on(async {
                        let auth = app.auth();
                        let found: Option<super::UserInfo> = auth.find_user(&email).await?;
                        let Some(user) = found.filter(|u| u.email.eq_ignore_ascii_case(email.trim())) else {
                            return Err(Error::new(ErrorCode::NotFound, format!("auth.send_sign_in_link: no user with email {email:?}")));
                        };
                        if user.disabled {
                            return Err(Error::new(ErrorCode::AccessDenied, "auth.send_sign_in_link: the user is disabled"));
                        }
                        let base = app.get::<Safety>().map(|s| s.base_url(None)).unwrap_or_default();
                        let msg = send_link(&app, Kind::Link, &user, &base).await?;
                        Ok::<_, Error>(json!({"user_id": user.id, "message_id": msg}))
                    })
                    .map_err(lua_err)?;
                lua.to_value(&out)
            })?,
        )?;

        let e = Rc::clone(env);
        t.set(
            "revoke_device",
            lua.create_function(move |_, arg: Value| {
                privileged(&e, "auth.revoke_device")?;
                let app = app(&e)?.clone();
                match arg {
                    Value::String(_) => {
                        let id = string_arg("auth.revoke_device: the device or session id", arg, 64)?;
                        // A device id (`GET /auth/devices`) ends every session of that device
                        // and closes its sockets; otherwise the id names one session.
                        match e.rt.block_on(
                            app.auth().revoke_device(&crate::core::RequestContext::system(), &id),
                        ) {
                            Ok(_) => Ok(true),
                            Err(err) if err.code == ErrorCode::NotFound => e
                                .rt
                                .block_on(app.auth().revoke_session_of_anyone(&id))
                                .map_err(lua_err),
                            Err(err) => Err(lua_err(err)),
                        }
                    }
                    Value::Table(tb) => {
                        fields("auth.revoke_device", &tb, &["user"])?;
                        let uid = string_arg("auth.revoke_device: user", tb.raw_get("user")?, 64)?;
                        let exists = e.rt.block_on(app.auth().find_user(&uid)).map_err(lua_err)?.is_some_and(|u| u.id == uid);
                        if !exists {
                            return Err(lua_err(Error::new(ErrorCode::NotFound, format!("auth.revoke_device: no user {uid:?}"))));
                        }
                        e.rt.block_on(app.auth().revoke_all_sessions(&uid)).map_err(lua_err)?;
                        Ok(true)
                    }
                    other => Err(bad(format!(
                        "auth.revoke_device: takes a session id or {{user = id}}, not {}",
                        other.type_name()
                    ))),
                }
            })?,
        )?;

        lua.globals().set(self.name(), t)
    }
}
