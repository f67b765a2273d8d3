//! The `notify` Lua global.
//!
//! Live messages (realtime hub), as the caller (the channel's join rules apply):
//! - `notify.broadcast(channel, payload)` → number of sockets reached;
//! - `notify.presence(channel)` → who is in it.
//!
//! Outbox messages (delivered after commit, see `outbox`):
//! - `notify.email{to=, cc=, bcc=, subject=, text= | markdown= | html=, attachments=, reply_to=, idempotency_key=}`
//! - `notify.push{user=, title=, body=, url=, data=, idempotency_key=}`
//! - `notify.sms{to=, body=, idempotency_key=}`
//!   each → the message id (the earlier message's id when the idempotency key was used before);
//! - `notify.status(id)` → the message's status table, or nil (not found, or not the caller's).
//!
//! Inside `db.tx` the outbox row is written on the transaction's session: it commits or rolls
//! back with the caller's writes. Outside `db.tx` it is written when the invocation ends
//! successfully (one transaction for all of them); a failing invocation queues nothing.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use base64::Engine as _;
use mlua::{Lua, LuaSerdeExt, Table, Value};
use serde_json::{Value as Json, json};

use super::email::{Attached, Email};
use super::outbox::{self, NewMessage};
use super::push::Push;
use super::sms::Sms;
use super::{Notify, log_event};
use crate::core::{Error, ErrorCode, RequestContext};
use crate::lua::components::{Component, db, lua_err};
use crate::lua::{Env, to_json};
use crate::storage::{ExecControl, engine_statements};

pub struct NotifyLua;

fn no_server() -> mlua::Error {
    lua_err(Error::new(
        ErrorCode::NotImplemented,
        "notify: not available in this context (no server)",
    ))
}

fn bad(msg: impl Into<String>) -> mlua::Error {
    lua_err(Error::new(ErrorCode::BadArguments, msg))
}

/// Reject keys the call does not know (a typo would otherwise be silently ignored).
fn known_keys(what: &str, t: &Table, keys: &[&str]) -> mlua::Result<()> {
    for pair in t.clone().pairs::<Value, Value>() {
        let (k, _) = pair?;
        let name = match &k {
            Value::String(s) => s.to_string_lossy(),
            _ => return Err(bad(format!("notify.{what}: takes a table of named fields"))),
        };
        if !keys.contains(&name.as_str()) {
            return Err(bad(format!(
                "notify.{what}: unknown field {name:?} (fields: {})",
                keys.join(", ")
            )));
        }
    }
    Ok(())
}

fn opt_string(what: &str, t: &Table, key: &str, max: usize) -> mlua::Result<Option<String>> {
    match t.raw_get::<Value>(key)? {
        Value::Nil => Ok(None),
        Value::String(s) => {
            let s = s.to_str().map_err(|_| bad(format!("notify.{what}: {key} is not UTF-8 text")))?.to_string();
            if s.len() > max {
                return Err(bad(format!("notify.{what}: {key} is over {max} bytes")));
            }
            Ok(Some(s))
        }
        Value::Integer(_) | Value::Number(_) => Ok(Some(t.raw_get::<String>(key)?)),
        other => Err(bad(format!("notify.{what}: {key} must be a string, not {}", other.type_name()))),
    }
}

fn req_string(what: &str, t: &Table, key: &str, max: usize) -> mlua::Result<String> {
    opt_string(what, t, key, max)?.ok_or_else(|| bad(format!("notify.{what}: {key}= is required")))
}

fn addresses(t: &Table, key: &str) -> mlua::Result<Vec<String>> {
    match t.raw_get::<Value>(key)? {
        Value::Nil => Ok(Vec::new()),
        Value::String(s) => Ok(vec![s.to_str().map_err(|_| bad(format!("notify.email: {key} is not UTF-8")))?.to_string()]),
        Value::Table(list) => {
            let mut out = Vec::new();
            for v in list.sequence_values::<Value>() {
                match v? {
                    Value::String(s) => out.push(s.to_str().map_err(|_| bad(format!("notify.email: {key} is not UTF-8")))?.to_string()),
                    other => return Err(bad(format!("notify.email: {key} must hold strings, not {}", other.type_name()))),
                }
                if out.len() > 10_000 {
                    return Err(bad(format!("notify.email: too many addresses in {key}")));
                }
            }
            Ok(out)
        }
        other => Err(bad(format!("notify.email: {key} must be a string or a list of strings, not {}", other.type_name()))),
    }
}

fn email_from_lua(t: &Table, n: &Notify) -> mlua::Result<Email> {
    known_keys("email", t, &["to", "cc", "bcc", "subject", "text", "markdown", "html", "attachments", "reply_to", "idempotency_key"])?;
    let max = n.settings.max_message_bytes;
    let markdown = opt_string("email", t, "markdown", max)?;
    let mut text = opt_string("email", t, "text", max)?;
    let mut html = opt_string("email", t, "html", max)?;
    if let Some(md) = &markdown {
        if html.is_some() {
            return Err(bad("notify.email: give markdown= or html=, not both"));
        }
        html = Some(super::email::markdown_to_html(md));
        if text.is_none() {
            text = Some(md.clone());
        }
    }
    let mut attachments = Vec::new();
    match t.raw_get::<Value>("attachments")? {
        Value::Nil => {}
        Value::Table(list) => {
            let mut total = 0usize;
            for v in list.sequence_values::<Value>() {
                let Value::Table(a) = v? else {
                    return Err(bad("notify.email: attachments must be a list of {filename=, content=, content_type=}"));
                };
                known_keys("email", &a, &["filename", "content", "content_type"])?;
                let filename = req_string("email", &a, "filename", 255)?;
                let content: mlua::String = match a.raw_get::<Value>("content")? {
                    Value::String(s) => s,
                    _ => return Err(bad(format!("notify.email: attachment {filename:?} needs content= (a string of bytes)"))),
                };
                let bytes = content.as_bytes();
                total += bytes.len();
                if total > max {
                    return Err(lua_err(outbox::too_large("email", total, max)));
                }
                let content_type = opt_string("email", &a, "content_type", 200)?
                    .unwrap_or_else(|| "application/octet-stream".into());
                attachments.push(Attached {
                    filename,
                    content_type,
                    data: base64::engine::general_purpose::STANDARD.encode(&bytes[..]),
                });
            }
        }
        other => return Err(bad(format!("notify.email: attachments must be a list, not {}", other.type_name()))),
    }
    let e = Email {
        to: addresses(t, "to")?,
        cc: addresses(t, "cc")?,
        bcc: addresses(t, "bcc")?,
        subject: req_string("email", t, "subject", 998)?,
        text,
        html,
        reply_to: opt_string("email", t, "reply_to", 998)?,
        attachments,
    };
    super::email::validate(&e, &n.settings).map_err(lua_err)?;
    Ok(e)
}

fn push_from_lua(t: &Table) -> mlua::Result<Push> {
    known_keys("push", t, &["user", "title", "body", "url", "data", "idempotency_key"])?;
    let data = match t.raw_get::<Value>("data")? {
        Value::Nil => None,
        v => Some(to_json(&v).map_err(|m| bad(format!("notify.push: data: {m}")))?),
    };
    let p = Push {
        user: req_string("push", t, "user", 200)?,
        title: req_string("push", t, "title", 500)?,
        body: opt_string("push", t, "body", 3000)?,
        url: opt_string("push", t, "url", 2048)?,
        data,
    };
    if p.user.is_empty() {
        return Err(bad("notify.push: user= is empty"));
    }
    // RFC 8291: one record of at most 4096 bytes, of which 3993 are the payload; the payload
    // adds the message id and JSON quoting.
    let size = serde_json::to_string(&p).map(|s| s.len()).unwrap_or(0);
    if size > 3500 {
        return Err(bad(format!("notify.push: the notification is {size} bytes; a push payload holds about 3500")));
    }
    Ok(p)
}

fn sms_from_lua(t: &Table) -> mlua::Result<Sms> {
    known_keys("sms", t, &["to", "body", "idempotency_key"])?;
    let s = Sms {
        to: req_string("sms", t, "to", 32)?,
        body: req_string("sms", t, "body", 6400)?,
    };
    super::sms::validate(&s).map_err(lua_err)?;
    Ok(s)
}

/// Messages of this invocation waiting for its successful end (calls outside `db.tx`).
#[derive(Default)]
pub(crate) struct Pending {
    msgs: RefCell<Vec<NewMessage>>,
    hooked: Cell<bool>,
    /// A wake-up of the sender is due at the invocation's end (rows written inside `db.tx`
    /// are visible to it only after the commit).
    wake_hooked: Cell<bool>,
    count: Cell<usize>,
    bytes: Cell<usize>,
}

/// Queue one message of `channel` (also the chat module's entry, with its own `Pending`).
pub(crate) fn enqueue(env: &Rc<Env>, pending: &Rc<Pending>, channel: &'static str, payload: Json, key: Option<String>) -> mlua::Result<String> {
    let app = env.app.as_ref().ok_or_else(no_server)?;
    let n = app.get::<Notify>().ok_or_else(no_server)?;
    n.check_channel(channel).map_err(lua_err)?;
    let payload = payload.to_string();
    let max = n.settings.max_message_bytes;
    if payload.len() > max + max / 3 + 1024 {
        return Err(lua_err(outbox::too_large(channel, payload.len(), max)));
    }
    if pending.count.get() >= n.settings.max_per_invocation {
        return Err(lua_err(Error::new(
            ErrorCode::TooManyRequests,
            format!("notify: more than [notify] max_per_invocation ({}) messages in one invocation", n.settings.max_per_invocation),
        )));
    }
    let bytes = pending.bytes.get() + payload.len();
    if bytes > n.settings.max_bytes_per_invocation {
        return Err(lua_err(Error::new(
            ErrorCode::RequestTooLarge,
            format!("notify: more than [notify] max_bytes_per_invocation ({}) bytes of messages in one invocation", n.settings.max_bytes_per_invocation),
        )));
    }
    pending.bytes.set(bytes);
    if let Some(k) = &key
        && (k.is_empty() || k.len() > 200)
    {
        return Err(bad("notify: idempotency_key must be 1 to 200 bytes"));
    }
    let m = NewMessage::new(channel, &env.ctx, &env.function, key, payload);
    let detail = |id: &str, fresh: bool, in_tx: bool| json!({"id": id, "new": fresh, "in_transaction": in_tx, "function": env.function});
    // Inside db.tx: the row is part of the caller's transaction.
    let m2 = m.clone();
    if let Some(r) = db::in_open_tx(env, move |c| engine_statements(|| outbox::insert(c, &m2))) {
        let (id, fresh) = r.map_err(lua_err)?;
        pending.count.set(pending.count.get() + 1);
        log_event(app, env.ctx.user_id.as_deref(), Some(&env.ctx.trace_id), channel, "queued", 0.0, None, detail(&id, fresh, true));
        if !pending.wake_hooked.replace(true) {
            // After the commit (a failed invocation leaves it to the sender's poll).
            env.on_success.borrow_mut().push(Box::new(|env: &Env| {
                if let Some(n) = env.app.as_ref().and_then(|a| a.get::<Notify>()) {
                    n.wake();
                }
                Ok(())
            }));
        }
        return Ok(id);
    }
    // Outside: queued at the invocation's successful end. A key used before answers the
    // earlier message's id now.
    if let Some(k) = &m.key {
        if let Some(earlier) = pending.msgs.borrow().iter().find(|p| p.key.as_deref() == Some(k)) {
            return Ok(earlier.id.clone());
        }
        let (owner, k) = (m.owner.clone(), k.clone());
        let found = env
            .storage
            .read_blocking(&env.rt, &RequestContext::system(), ExecControl::lookup(), move |c| {
                outbox::find_by_key(c, owner.as_deref(), &k)
            })
            .map_err(lua_err)?;
        if let Some(id) = found {
            return Ok(id);
        }
    }
    let id = m.id.clone();
    pending.msgs.borrow_mut().push(m);
    pending.count.set(pending.count.get() + 1);
    if !pending.hooked.replace(true) {
        let pending = Rc::clone(pending);
        env.on_success.borrow_mut().push(Box::new(move |env: &Env| {
            let msgs = pending.msgs.take();
            if msgs.is_empty() {
                return Ok(());
            }
            let app = env.app.as_ref().expect("checked at enqueue");
            let n = app.get::<Notify>().expect("checked at enqueue");
            let msgs2 = msgs.clone();
            let done = env.rt.block_on(env.storage.write(
                &RequestContext::system(),
                ExecControl::lookup(),
                move |c| outbox::insert_all(c, &msgs2),
            ))?;
            for (m, (id, fresh)) in msgs.iter().zip(done) {
                log_event(app, env.ctx.user_id.as_deref(), Some(&env.ctx.trace_id), m.channel, "queued", 0.0, None,
                    json!({"id": id, "new": fresh, "in_transaction": false, "function": env.function}));
            }
            n.wake();
            Ok(())
        }));
    }
    Ok(id)
}

fn key_of(t: &Table) -> mlua::Result<Option<String>> {
    opt_string("message", t, "idempotency_key", 200)
}

fn hub_of(e: &Env) -> mlua::Result<&std::sync::Arc<crate::realtime::hub::Hub>> {
    e.app.as_ref().map(|a| a.hub()).ok_or_else(|| {
        lua_err(Error::new(
            ErrorCode::NotImplemented,
            "notify: no live connections in this context",
        ))
    })
}

impl Component for NotifyLua {
    /// Installed once per pooled state (`lua::pool`) until called: its pending messages belong to the invocation that first calls one of its functions.
    fn reusable_until_called(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "notify"
    }

    fn install(&self, lua: &Lua, env: &Rc<Env>) -> mlua::Result<()> {
        let t = lua.create_table()?;
        let pending = Rc::new(Pending::default());
        let e = Rc::clone(env);
        t.set(
            "broadcast",
            lua.create_function(move |_, (channel, payload): (String, Value)| {
                let hub = hub_of(&e)?;
                let payload = to_json(&payload)
                    .map_err(|m| mlua::Error::runtime(format!("notify.broadcast: {m}")))?;
                hub.broadcast(&e.ctx, &channel, payload).map_err(lua_err)
            })?,
        )?;
        let e = Rc::clone(env);
        t.set(
            "presence",
            lua.create_function(move |lua, channel: String| {
                let list = hub_of(&e)?.presence(&e.ctx, &channel).map_err(lua_err)?;
                lua.to_value(&list)
            })?,
        )?;
        let (e, p) = (Rc::clone(env), Rc::clone(&pending));
        t.set(
            "email",
            lua.create_function(move |_, t: Table| {
                let n = e.app.as_ref().and_then(|a| a.get::<Notify>()).ok_or_else(no_server)?;
                let m = email_from_lua(&t, n)?;
                let payload = serde_json::to_value(&m).map_err(|err| bad(err.to_string()))?;
                enqueue(&e, &p, "email", payload, key_of(&t)?)
            })?,
        )?;
        let (e, p) = (Rc::clone(env), Rc::clone(&pending));
        t.set(
            "push",
            lua.create_function(move |_, t: Table| {
                let m = push_from_lua(&t)?;
                let payload = serde_json::to_value(&m).map_err(|err| bad(err.to_string()))?;
                enqueue(&e, &p, "push", payload, key_of(&t)?)
            })?,
        )?;
        let (e, p) = (Rc::clone(env), Rc::clone(&pending));
        t.set(
            "sms",
            lua.create_function(move |_, t: Table| {
                let m = sms_from_lua(&t)?;
                let payload = serde_json::to_value(&m).map_err(|err| bad(err.to_string()))?;
                enqueue(&e, &p, "sms", payload, key_of(&t)?)
            })?,
        )?;
        let e = Rc::clone(env);
        t.set(
            "status",
            lua.create_function(move |lua, id: String| {
                if id.len() > 100 {
                    return Ok(Value::Nil);
                }
                let ctx = e.ctx.clone();
                let (id2, ctx2) = (id.clone(), ctx.clone());
                let found = match db::in_open_tx(&e, move |c| engine_statements(|| outbox::status(c, &ctx2, &id2))) {
                    Some(r) => r,
                    None => e.storage.read_blocking(&e.rt, &RequestContext::system(), ExecControl::lookup(), move |c| {
                        outbox::status(c, &ctx, &id)
                    }),
                }
                .map_err(lua_err)?;
                match found {
                    Some(j) => lua.to_value(&j),
                    None => Ok(Value::Nil),
                }
            })?,
        )?;
        lua.globals().set(self.name(), t)
    }
}
