//! The `chat` Lua global:
//! - `chat.send{provider=, chat_id= | user=, text=, buttons={{text=, data=}}, reply_to=, idempotency_key=}`
//!   → the outbox id (delivered after the invocation succeeds, or with `db.tx`'s commit;
//!   see notify's outbox);
//! - `chat.links([user])` → the caller's linked chats (the admin may name a user).
//!
//! Who may send where: the admin anywhere; a handler to the chat its message came from; a
//! user to the chats linked to them (`user=` must be the caller unless admin). Every argument
//! is checked (hostile Lua): types, sizes, the providers' id formats and limits.

use std::rc::Rc;

use mlua::{Lua, LuaSerdeExt, Table, Value};
use rusqlite::{OptionalExtension, params};
use serde_json::json;

use super::send::{Button, Outgoing};
use super::{Chat, PROVIDERS};
use crate::core::{Error, ErrorCode, RequestContext};
use crate::lua::Env;
use crate::lua::components::{Component, lua_err};
use crate::notify::lua::{Pending, enqueue};
use crate::storage::ExecControl;

pub struct ChatLua;

fn bad(msg: impl Into<String>) -> mlua::Error {
    lua_err(Error::new(ErrorCode::BadArguments, msg))
}

fn known_keys(t: &Table, keys: &[&str]) -> mlua::Result<()> {
    for pair in t.clone().pairs::<Value, Value>() {
        let (k, _) = pair?;
        let name = match &k {
            Value::String(s) => s.to_string_lossy(),
            _ => return Err(bad("chat.send: takes a table of named fields")),
        };
        if !keys.contains(&name.as_str()) {
            return Err(bad(format!("chat.send: unknown field {name:?} (fields: {})", keys.join(", "))));
        }
    }
    Ok(())
}

/// A string field (integers are taken as their decimal text: Telegram ids are numbers).
fn opt_str(t: &Table, key: &str, max: usize) -> mlua::Result<Option<String>> {
    match t.raw_get::<Value>(key)? {
        Value::Nil => Ok(None),
        Value::String(s) => {
            let s = s.to_str().map_err(|_| bad(format!("chat.send: {key} is not UTF-8 text")))?.to_string();
            if s.len() > max {
                return Err(bad(format!("chat.send: {key} is over {max} bytes")));
            }
            Ok(Some(s))
        }
        Value::Integer(i) => Ok(Some(i.to_string())),
        Value::Number(n) if n.fract() == 0.0 && n.abs() < 1e15 => Ok(Some((n as i64).to_string())),
        other => Err(bad(format!("chat.send: {key} must be a string, not {}", other.type_name()))),
    }
}

/// The providers' id formats (ids go into URLs and JSON).
fn check_chat_id(provider: &str, id: &str) -> mlua::Result<()> {
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    let ok = match provider {
        "telegram" => {
            digits(id.strip_prefix('-').unwrap_or(id))
                || id.strip_prefix('@').is_some_and(|n| (4..=32).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        }
        "slack" => !id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_alphanumeric()),
        "discord" => digits(id),
        _ => false,
    };
    if ok { Ok(()) } else { Err(bad(format!("chat.send: chat_id {id:?} is not a {provider} chat id"))) }
}

fn check_reply_to(provider: &str, id: &str) -> mlua::Result<()> {
    let ok = match provider {
        "telegram" | "discord" => !id.is_empty() && id.len() <= 20 && id.bytes().all(|b| b.is_ascii_digit()),
        "slack" => id.len() <= 32 && id.split_once('.').is_some_and(|(a, b)| {
            !a.is_empty() && !b.is_empty() && a.bytes().all(|c| c.is_ascii_digit()) && b.bytes().all(|c| c.is_ascii_digit())
        }),
        _ => false,
    };
    if ok { Ok(()) } else { Err(bad(format!("chat.send: reply_to {id:?} is not a {provider} message id"))) }
}

/// Longest text per provider, characters.
fn max_text(provider: &str) -> usize {
    match provider {
        "telegram" => 4096,
        "discord" => 2000,
        _ => 3000,
    }
}

fn buttons(t: &Table) -> mlua::Result<Vec<Button>> {
    let list = match t.raw_get::<Value>("buttons")? {
        Value::Nil => return Ok(Vec::new()),
        Value::Table(l) => l,
        other => return Err(bad(format!("chat.send: buttons must be a list of {{text=, data=}}, not {}", other.type_name()))),
    };
    let mut out = Vec::new();
    for v in list.sequence_values::<Value>() {
        let Value::Table(b) = v? else {
            return Err(bad("chat.send: buttons must be a list of {text=, data=}"));
        };
        if out.len() >= 25 {
            return Err(bad("chat.send: at most 25 buttons"));
        }
        for pair in b.clone().pairs::<Value, Value>() {
            let (k, _) = pair?;
            if !matches!(&k, Value::String(s) if matches!(s.to_string_lossy().as_str(), "text" | "data")) {
                return Err(bad("chat.send: a button has text= and data= only"));
            }
        }
        let text = opt_str(&b, "text", 400)?.ok_or_else(|| bad("chat.send: a button needs text="))?;
        let data = opt_str(&b, "data", 64)?.ok_or_else(|| bad("chat.send: a button needs data= (at most 64 bytes)"))?;
        let n = text.chars().count();
        if n == 0 || n > 75 {
            return Err(bad(format!("chat.send: a button's text has {n} characters; 1 to 75 are allowed")));
        }
        if data.is_empty() {
            return Err(bad("chat.send: a button's data is empty"));
        }
        out.push(Button { text, data });
    }
    Ok(out)
}

/// The newest chat linked to `user` (of `provider` if given).
fn linked_chat(env: &Env, user: &str, provider: Option<&str>) -> mlua::Result<Option<(String, String)>> {
    let (u, p) = (user.to_string(), provider.map(str::to_string));
    env.storage
        .read_blocking(&env.rt, &RequestContext::system(), ExecControl::lookup(), move |c| {
            Ok(c.prepare(
                "SELECT provider, chat_id FROM _ichibase_chat_links WHERE user_id = ?1 AND (?2 IS NULL OR provider = ?2)
                  ORDER BY created_at DESC LIMIT 1",
            )?
            .query_row(params![u, p], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?)
        })
        .map_err(lua_err)
}

/// Whether `chat_id` of `provider` is linked to `user`.
fn is_linked(env: &Env, user: &str, provider: &str, chat_id: &str) -> mlua::Result<bool> {
    let (u, p, c2) = (user.to_string(), provider.to_string(), chat_id.to_string());
    env.storage
        .read_blocking(&env.rt, &RequestContext::system(), ExecControl::lookup(), move |c| {
            Ok(c.prepare("SELECT 1 FROM _ichibase_chat_links WHERE user_id = ?1 AND provider = ?2 AND chat_id = ?3 LIMIT 1")?
                .query_row(params![u, p, c2], |_| Ok(()))
                .optional()?
                .is_some())
        })
        .map_err(lua_err)
}

fn denied(msg: String) -> mlua::Error {
    lua_err(Error::new(ErrorCode::AccessDenied, msg))
}

fn send(env: &Rc<Env>, pending: &Rc<Pending>, t: &Table) -> mlua::Result<String> {
    let app = env.app.as_ref().ok_or_else(|| lua_err(Error::new(ErrorCode::NotImplemented, "chat: not available in this context (no server)")))?;
    let chat = app.get::<Chat>().ok_or_else(|| lua_err(Error::new(ErrorCode::NotImplemented, "chat: the chat module is not running")))?;
    known_keys(t, &["provider", "chat_id", "user", "text", "buttons", "reply_to", "idempotency_key"])?;
    let provider = opt_str(t, "provider", 32)?;
    if let Some(p) = &provider
        && !PROVIDERS.contains(&p.as_str())
    {
        return Err(bad(format!("chat.send: provider {p:?} is not one of {}", PROVIDERS.join(", "))));
    }
    let chat_id = opt_str(t, "chat_id", 64)?;
    let user = opt_str(t, "user", 200)?;
    let (provider, chat_id) = match (chat_id, user) {
        (Some(_), Some(_)) => return Err(bad("chat.send: give chat_id= or user=, not both")),
        (None, None) => return Err(bad("chat.send: chat_id= (with provider=) or user= is required")),
        (Some(id), None) => {
            let p = provider.ok_or_else(|| bad("chat.send: chat_id= needs provider="))?;
            check_chat_id(&p, &id)?;
            let current = super::inbound::CURRENT.with(|c| c.borrow().clone());
            let here = current.as_ref().is_some_and(|(cp, cid)| *cp == p && *cid == id);
            if !env.ctx.is_admin() && !here {
                let me = env.ctx.user_id.as_deref().ok_or_else(|| {
                    denied(format!("chat.send: anon may only answer the chat its message came from, not {p} chat {id}"))
                })?;
                if !is_linked(env, me, &p, &id)? {
                    return Err(denied(format!("chat.send: {p} chat {id} is not linked to this user")));
                }
            }
            (p, id)
        }
        (None, Some(u)) => {
            if !env.ctx.is_admin() && env.ctx.user_id.as_deref() != Some(u.as_str()) {
                return Err(denied("chat.send: user= may only name the caller (the admin may name anyone)".into()));
            }
            linked_chat(env, &u, provider.as_deref())?.ok_or_else(|| {
                lua_err(Error::new(
                    ErrorCode::ChatNotLinked,
                    format!("chat.send: user {u} has no linked {} chat (POST /chat/link, then /link CODE to the bot)", provider.as_deref().unwrap_or("")),
                ))
            })?
        }
    };
    if !chat.settings.can_send(&provider) {
        return Err(lua_err(super::not_configured(&provider, "a bot token")));
    }
    let text = opt_str(t, "text", 64 * 1024)?.ok_or_else(|| bad("chat.send: text= is required"))?;
    let n = text.chars().count();
    let max = max_text(&provider);
    if n == 0 || n > max {
        return Err(bad(format!("chat.send: the text has {n} characters; {provider} takes 1 to {max}")));
    }
    let reply_to = opt_str(t, "reply_to", 64)?;
    if let Some(r) = &reply_to {
        check_reply_to(&provider, r)?;
    }
    let out = Outgoing { provider, chat_id, text, buttons: buttons(t)?, reply_to };
    let key = opt_str(t, "idempotency_key", 200)?;
    let payload = serde_json::to_value(&out).map_err(|e| bad(e.to_string()))?;
    enqueue(env, pending, "chat", payload, key)
}

fn links(env: &Rc<Env>, lua: &Lua, user: Option<String>) -> mlua::Result<Value> {
    let me = env.ctx.user_id.clone();
    let user = match user {
        Some(u) if env.ctx.is_admin() || me.as_deref() == Some(u.as_str()) => u,
        Some(_) => return Err(denied("chat.links: only the admin may name another user".into())),
        None => match me {
            Some(u) => u,
            None => return Ok(Value::Table(lua.create_table()?)),
        },
    };
    if user.len() > 200 {
        return Err(bad("chat.links: the user id is over 200 bytes"));
    }
    let rows = env
        .storage
        .read_blocking(&env.rt, &RequestContext::system(), ExecControl::lookup(), move |c| {
            let mut st = c.prepare(
                "SELECT provider, sender_id, chat_id, name, created_at FROM _ichibase_chat_links WHERE user_id = ?1 ORDER BY created_at DESC LIMIT 100",
            )?;
            let rows = st.query_map([user], |r| {
                Ok(json!({"provider": r.get::<_, String>(0)?, "sender_id": r.get::<_, String>(1)?, "chat_id": r.get::<_, String>(2)?,
                          "name": r.get::<_, Option<String>>(3)?, "created_ms": r.get::<_, i64>(4)?}))
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .map_err(lua_err)?;
    lua.to_value(&rows)
}

impl Component for ChatLua {
    /// Installed once per pooled state (`lua::pool`) until called: its pending messages belong to the invocation that first calls one of its functions.
    fn reusable_until_called(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "chat"
    }

    fn install(&self, lua: &Lua, env: &Rc<Env>) -> mlua::Result<()> {
        let t = lua.create_table()?;
        let pending = Rc::new(Pending::default());
        let (e, p) = (Rc::clone(env), Rc::clone(&pending));
        t.set(
            "send",
            lua.create_function(move |_, v: Value| match v {
                Value::Table(t) => send(&e, &p, &t),
                other => Err(bad(format!("chat.send: takes a table {{provider=, chat_id=, text=, ...}}, not {}", other.type_name()))),
            })?,
        )?;
        let e = Rc::clone(env);
        t.set(
            "links",
            lua.create_function(move |lua, user: Option<String>| links(&e, lua, user))?,
        )?;
        lua.globals().set(self.name(), t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_per_provider() {
        assert!(check_chat_id("telegram", "-100123").is_ok());
        assert!(check_chat_id("telegram", "@my_channel").is_ok());
        assert!(check_chat_id("telegram", "12/../x").is_err());
        assert!(check_chat_id("discord", "123456789012345678").is_ok());
        assert!(check_chat_id("discord", "123/messages").is_err());
        assert!(check_chat_id("slack", "C0123ABC").is_ok());
        assert!(check_chat_id("slack", "C0 1").is_err());
        assert!(check_reply_to("slack", "1700000000.000100").is_ok());
        assert!(check_reply_to("slack", "1700000000").is_err());
        assert!(check_reply_to("telegram", "12").is_ok());
    }
}
