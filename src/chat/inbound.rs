//! The inbox: every verified inbound message (any provider) is one row of
//! `_ichibase_chat_inbox`, unique by (provider, provider's event id) so a webhook retried by
//! the provider or an update fetched twice is handled once. The worker takes `new` rows,
//! marks them `handling`, and then: the link command (`/link CODE`), the per-sender rate
//! limit, the unlinked-sender policy, and the handler (as the linked user, or anon).
//! A row left `handling` by a crash is marked `interrupted` at start and not run again
//! (a handler runs at most once per message; its replies go through the outbox).
//!
//! Owns the inbox rows, the link rows and the link codes; must not run a handler for a
//! message that was not verified (only the provider routes and the poller call [`accept`]).

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use super::{Chat, log_event, now_secs};
use crate::app::App;
use crate::core::{Error, ErrorCode, RequestContext, Result, Role};
use crate::lua::{self, Invocation};
use crate::notify::outbox::{self, NewMessage};
use crate::storage::ExecControl;

/// One inbound message or button press, as the providers' parsers produce it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Inbound {
    pub provider: String,
    /// The provider's id of this event (update id, event id, interaction id): the dedupe key.
    pub event_id: String,
    pub chat_id: String,
    pub from_id: String,
    pub from_name: Option<String>,
    pub text: Option<String>,
    pub message_id: Option<String>,
    pub reply_to: Option<String>,
    /// A button's `data` (Telegram `callback_data`, Slack `value`, Discord `custom_id`).
    pub callback: Option<String>,
    /// Telegram's callback query id (answered with `answerCallbackQuery`).
    pub callback_id: Option<String>,
}

thread_local! {
    /// The chat of the message whose handler runs on this thread: `chat.send` may always
    /// answer there.
    pub(crate) static CURRENT: RefCell<Option<(String, String)>> = const { RefCell::new(None) };
}

fn now_ms() -> i64 {
    crate::notify::now_ms()
}

async fn write<R: Send + 'static>(app: &App, f: impl FnOnce(&mut Connection) -> Result<R> + Send + 'static) -> Result<R> {
    app.storage().write(&RequestContext::system(), ExecControl::lookup(), f).await
}

async fn read<R: Send + 'static>(app: &App, f: impl FnOnce(&Connection) -> Result<R> + Send + 'static) -> Result<R> {
    app.storage().read(&RequestContext::system(), ExecControl::lookup(), f).await
}

/// Insert `msgs` (skipping events already in the inbox) and, in the same transaction, set
/// state `key` to `value` (the Telegram offset). Returns how many were new.
pub async fn accept(app: &App, msgs: Vec<Inbound>, state: Option<(String, String)>) -> Result<usize> {
    let rows: Vec<(Inbound, String)> = msgs
        .into_iter()
        .map(|m| {
            let j = serde_json::to_string(&m).unwrap_or_default();
            (m, j)
        })
        .collect();
    let logged: Vec<Inbound> = rows.iter().map(|(m, _)| m.clone()).collect();
    let fresh = write(app, move |c| {
        let tx = c.transaction()?;
        let mut fresh = Vec::new();
        {
            let now = now_ms();
            let mut st = tx.prepare_cached(
                "INSERT OR IGNORE INTO _ichibase_chat_inbox (provider, event_id, message, status, created_at, updated_at)
                 VALUES (?1, ?2, ?3, 'new', ?4, ?4)",
            )?;
            for (m, j) in &rows {
                fresh.push(st.execute(params![m.provider, m.event_id, j, now])? == 1);
            }
            if let Some((k, v)) = &state {
                tx.execute(
                    "INSERT INTO _ichibase_chat_state (key, value) VALUES (?1, ?2)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    params![k, v],
                )?;
            }
        }
        tx.commit()?;
        Ok(fresh)
    })
    .await?;
    let mut n = 0;
    for (m, fresh) in logged.iter().zip(&fresh) {
        log_event(app, None, None, &m.provider, if *fresh { "received" } else { "duplicate" }, 0.0, None, message_detail(m));
        n += *fresh as usize;
    }
    if n > 0
        && let Some(c) = app.get::<Chat>()
    {
        c.wake.notify_one();
    }
    Ok(n)
}

fn message_detail(m: &Inbound) -> Json {
    json!({"event_id": m.event_id, "chat_id": m.chat_id, "from": {"id": m.from_id, "name": m.from_name},
           "text": m.text.as_ref().map(|t| t.chars().take(2000).collect::<String>()), "message_id": m.message_id,
           "reply_to": m.reply_to, "callback": m.callback})
}

/// State value `key` (e.g. the Telegram offset).
pub async fn state(app: &App, key: &str) -> Result<Option<String>> {
    let k = key.to_string();
    read(app, move |c| {
        Ok(c.prepare_cached("SELECT value FROM _ichibase_chat_state WHERE key = ?1")?
            .query_row([k], |r| r.get(0))
            .optional()?)
    })
    .await
}

/// Start the inbox worker.
pub fn start(app: &App) -> anyhow::Result<()> {
    if app.get::<Chat>().is_none() {
        return Ok(());
    }
    let rt = tokio::runtime::Handle::try_current()?;
    let app = app.clone();
    rt.spawn(async move { worker(app).await });
    Ok(())
}

async fn worker(app: App) {
    let chat = app.get::<Chat>().expect("chat service");
    let now = now_ms();
    match write(&app, move |c| {
        Ok(c.execute(
            "UPDATE _ichibase_chat_inbox SET status = 'interrupted', error = 'the server stopped while its handler ran', updated_at = ?1
              WHERE status = 'handling'",
            [now],
        )?)
    })
    .await
    {
        Ok(n) if n > 0 => tracing::warn!(messages = n, "chat: handlers interrupted by the last stop are not run again"),
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "chat: recovering the inbox failed"),
    }
    let mut handled_since_prune = 0u64;
    loop {
        let limit = chat.settings.concurrency * 4;
        let claimed = write(&app, move |c| {
            let now = now_ms();
            let mut st = c.prepare_cached(
                "UPDATE _ichibase_chat_inbox SET status = 'handling', updated_at = ?1
                  WHERE id IN (SELECT id FROM _ichibase_chat_inbox WHERE status = 'new' ORDER BY id LIMIT ?2)
                  RETURNING id, message",
            )?;
            let rows = st.query_map(params![now, limit as i64], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
            let mut v = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            v.sort_by_key(|r| r.0);
            Ok(v)
        })
        .await;
        match claimed {
            Ok(rows) if !rows.is_empty() => {
                handled_since_prune += rows.len() as u64;
                // In order per chat would need a queue per chat; messages of a batch run
                // concurrently, a batch after the previous one.
                futures_util::stream::iter(rows)
                    .for_each_concurrent(chat.settings.concurrency, |(id, msg)| {
                        let app = app.clone();
                        async move {
                            let (status, user, err) = match serde_json::from_str::<Inbound>(&msg) {
                                Ok(m) => handle(&app, m).await,
                                Err(e) => ("failed", None, Some(format!("unreadable inbox row: {e}"))),
                            };
                            let r = write(&app, move |c| {
                                Ok(c.execute(
                                    "UPDATE _ichibase_chat_inbox SET status = ?2, user_id = ?3, error = ?4, updated_at = ?5 WHERE id = ?1",
                                    params![id, status, user, err, now_ms()],
                                )?)
                            })
                            .await;
                            if let Err(e) = r {
                                tracing::error!(error = %e, "chat: recording a handled message failed");
                            }
                        }
                    })
                    .await;
                if handled_since_prune > 1000 {
                    handled_since_prune = 0;
                    prune(&app, chat.settings.keep_inbox).await;
                }
                continue;
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "chat: claiming inbox rows failed"),
        }
        tokio::select! {
            _ = chat.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

async fn prune(app: &App, keep: u64) {
    let _ = write(app, move |c| {
        Ok(c.execute(
            "DELETE FROM _ichibase_chat_inbox WHERE status NOT IN ('new', 'handling', 'quarantined')
               AND id <= (SELECT max(id) FROM _ichibase_chat_inbox) - ?1",
            [keep as i64],
        )?)
    })
    .await;
}

/// Queue a message from the engine itself (link answers, the unlinked reply) in the outbox.
async fn system_reply(app: &App, provider: &str, chat_id: &str, text: &str, reply_to: Option<&str>) {
    let Some(chat) = app.get::<Chat>() else { return };
    if !chat.settings.can_send(provider) || text.is_empty() {
        return;
    }
    let payload = json!({"provider": provider, "chat_id": chat_id, "text": text, "buttons": [], "reply_to": reply_to});
    let m = NewMessage {
        id: uuid::Uuid::new_v4().simple().to_string(),
        channel: "chat",
        owner: None,
        key: None,
        payload: payload.to_string(),
        trace_id: None,
        function: None,
    };
    match write(app, move |c| outbox::insert(c, &m)).await {
        Ok(_) => {
            if let Some(n) = app.get::<crate::notify::Notify>() {
                n.wake();
            }
        }
        Err(e) => tracing::warn!(error = %e, "chat: queueing a reply failed"),
    }
}

/// The code of a `/link CODE` (or `link CODE`, Telegram's `/start CODE`) message.
fn link_code(text: &str) -> Option<&str> {
    let t = text.trim();
    let mut parts = t.split_whitespace();
    let cmd = parts.next()?;
    let cmd = cmd.split('@').next().unwrap_or(cmd); // Telegram's /link@BotName
    if !["/link", "link", "/start"].iter().any(|c| c.eq_ignore_ascii_case(cmd)) {
        return None;
    }
    let code = parts.next()?;
    (parts.next().is_none() && code.len() >= 6 && code.len() <= 64).then_some(code)
}

pub(crate) fn code_hash(code: &str) -> String {
    use sha2::Digest;
    super::hex_encode(&sha2::Sha256::digest(code.trim().to_ascii_uppercase().as_bytes()))
}

/// The ichibase user linked to a chat sender, with their role (disabled users are unlinked).
async fn linked_user(app: &App, provider: &str, sender: &str) -> Result<Option<(String, String, Option<String>)>> {
    let (p, s) = (provider.to_string(), sender.to_string());
    read(app, move |c| {
        Ok(c.prepare_cached(
            "SELECT u.id, u.role, u.email FROM _ichibase_chat_links l JOIN _ichibase_users u ON u.id = l.user_id
              WHERE l.provider = ?1 AND l.sender_id = ?2 AND u.disabled_at IS NULL",
        )?
        .query_row([p, s], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?)
    })
    .await
}

/// What one inbox row came to: its status, the user it ran as, an error.
async fn handle(app: &App, m: Inbound) -> (&'static str, Option<String>, Option<String>) {
    let chat = app.get::<Chat>().expect("chat service");
    let started = Instant::now();
    let ms = || started.elapsed().as_secs_f64() * 1e3;
    if let Some(id) = &m.callback_id {
        super::telegram::answer_callback(app, id).await;
    }
    if !chat.allow(&m.provider, &m.from_id) {
        log_event(app, None, None, &m.provider, "limited", ms(), Some("over [chat] rate_per_minute for this sender"), message_detail(&m));
        return ("limited", None, Some("over the sender's rate limit".into()));
    }
    if m.callback.is_none()
        && let Some(code) = m.text.as_deref().and_then(link_code)
    {
        return link(app, &m, code).await;
    }
    let user = match linked_user(app, &m.provider, &m.from_id).await {
        Ok(u) => u,
        Err(e) => return ("failed", None, Some(e.message)),
    };
    if user.is_none() && chat.settings.unlinked != "anon" {
        let quarantine = chat.settings.unlinked == "quarantine";
        let outcome = if quarantine { "quarantined" } else { "refused" };
        log_event(app, None, None, &m.provider, outcome, ms(), Some("the sender is not linked to a user"), message_detail(&m));
        system_reply(app, &m.provider, &m.chat_id, &chat.settings.unlinked_reply, m.message_id.as_deref()).await;
        return (outcome, None, None);
    }
    let function = chat.settings.function_of(&m.provider).to_string();
    if function.is_empty() {
        let e = format!("no handler: set function in [chat] or [chat.{}]", m.provider);
        log_event(app, user.as_ref().map(|u| u.0.as_str()), None, &m.provider, "failed", ms(), Some(&e), message_detail(&m));
        return ("failed", user.map(|u| u.0), Some(e));
    }
    let mut ctx = match &user {
        Some((id, role, email)) => {
            let mut c = RequestContext::new(None, Role::from_name(role));
            let mut claims = serde_json::Map::new();
            claims.insert("sub".into(), json!(id));
            claims.insert("role".into(), json!(role));
            if let Some(e) = email {
                claims.insert("email".into(), json!(e));
            }
            claims.insert("chat_provider".into(), json!(m.provider));
            c.user_id = Some(id.clone());
            c.claims = Some(Arc::new(claims));
            c
        }
        None => RequestContext::anon(None),
    };
    ctx.query_id = format!("chat-{}-{}", m.provider, m.event_id);
    let trace_id = ctx.trace_id.clone();
    let user_id = ctx.user_id.clone();
    let input = json!({"event": "chat", "message": {
        "provider": m.provider, "chat_id": m.chat_id, "user": user_id,
        "from": {"id": m.from_id, "name": m.from_name}, "text": m.text, "reply_to": m.reply_to,
        "message_id": m.message_id, "callback": m.callback}});
    let result = run_handler(app, &function, ctx, input, (m.provider.clone(), m.chat_id.clone()), chat.settings.handler_timeout_secs).await;
    match result {
        Ok(()) => {
            log_event(app, user_id.as_deref(), Some(&trace_id), &m.provider, "handled", ms(), None,
                json!({"event_id": m.event_id, "function": function, "chat_id": m.chat_id}));
            ("handled", user_id, None)
        }
        Err(e) => {
            log_event(app, user_id.as_deref(), Some(&trace_id), &m.provider, "failed", ms(), Some(&e.message),
                json!({"event_id": m.event_id, "function": function, "chat_id": m.chat_id}));
            ("failed", user_id, Some(e.message))
        }
    }
}

/// The function's source, wrapped so a global `on_message(message, ctx)` is called when the
/// chunk returns no function (line numbers stay those of the source).
fn wrap(source: &str) -> String {
    format!(
        "local __chat_main = (function(...) {source}\nend)(...)\n\
         if __chat_main == nil and type(on_message) == 'function' then\n\
           return function(input, ctx) return on_message(input.message, ctx) end\n\
         end\n\
         return __chat_main\n"
    )
}

async fn run_handler(app: &App, function: &str, ctx: RequestContext, input: Json, current: (String, String), timeout: f64) -> Result<()> {
    let reserved = app.lua_limits().budget.reserve(app.lua().memory_limit as u64).await?;
    let mut runtime = lua::Runtime::of_app(app, tokio::runtime::Handle::current());
    runtime.options.timeout = Duration::from_secs_f64(timeout);
    let name = function.to_string();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let f = runtime.storage.read_blocking(&runtime.rt, &RequestContext::system(), ExecControl::lookup(), |c| {
            crate::lua::store::get(c, &name, None)
        })?;
        let inv = Invocation {
            function: name,
            version: f.version,
            source: wrap(&f.source),
            input,
            trace: f.trace,
            ..Default::default()
        };
        CURRENT.with(|c| *c.borrow_mut() = Some(current));
        let outcome = lua::invoke(&runtime, ctx, inv);
        CURRENT.with(|c| c.borrow_mut().take());
        drop(reserved);
        outcome.result.map(|_| ())
    })
    .await
    .map_err(|e| Error::internal(format!("chat handler task failed: {e}")))?
}

/// `/link CODE`: the code's user is linked to this sender (replacing an earlier link).
async fn link(app: &App, m: &Inbound, code: &str) -> (&'static str, Option<String>, Option<String>) {
    let hash = code_hash(code);
    let (p, s, chat_id, name) = (m.provider.clone(), m.from_id.clone(), m.chat_id.clone(), m.from_name.clone());
    let r = write(app, move |c| {
        let tx = c.transaction()?;
        let user: Option<(String, i64)> = tx
            .query_row("DELETE FROM _ichibase_chat_link_codes WHERE code_hash = ?1 RETURNING user_id, expires_at", [&hash], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let user = match user {
            Some((u, exp)) if exp > now_secs() => u,
            _ => {
                tx.commit()?;
                return Ok(None);
            }
        };
        tx.execute(
            "INSERT INTO _ichibase_chat_links (provider, sender_id, user_id, chat_id, name, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (provider, sender_id) DO UPDATE SET user_id = excluded.user_id, chat_id = excluded.chat_id,
               name = excluded.name, created_at = excluded.created_at",
            params![p, s, user, chat_id, name, now_ms()],
        )?;
        tx.commit()?;
        Ok(Some(user))
    })
    .await;
    match r {
        Ok(Some(user)) => {
            log_event(app, Some(&user), None, &m.provider, "linked", 0.0, None,
                json!({"event_id": m.event_id, "from": {"id": m.from_id, "name": m.from_name}, "chat_id": m.chat_id}));
            system_reply(app, &m.provider, &m.chat_id, "Linked: this chat now talks to your account.", m.message_id.as_deref()).await;
            ("linked", Some(user), None)
        }
        Ok(None) => {
            log_event(app, None, None, &m.provider, "refused", 0.0, Some("unknown or expired link code"),
                json!({"event_id": m.event_id, "from": {"id": m.from_id}}));
            system_reply(app, &m.provider, &m.chat_id, "That link code is unknown or expired; ask for a new one.", m.message_id.as_deref()).await;
            ("refused", None, Some("unknown or expired link code".into()))
        }
        Err(e) => ("failed", None, Some(e.message)),
    }
}

/// A fresh one-time link code for `user` (only its hash is stored).
pub async fn new_code(app: &App, user: &str, ttl: u64) -> Result<(String, i64)> {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut raw = [0u8; 10];
    getrandom::fill(&mut raw).map_err(|e| Error::internal(format!("random: {e}")))?;
    let code: String = raw.iter().map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char).collect();
    let (hash, u, exp) = (code_hash(&code), user.to_string(), now_secs() + ttl as i64);
    write(app, move |c| {
        c.execute("DELETE FROM _ichibase_chat_link_codes WHERE expires_at <= ?1", [now_secs()])?;
        let n: i64 = c.query_row("SELECT count(*) FROM _ichibase_chat_link_codes WHERE user_id = ?1", [&u], |r| r.get(0))?;
        if n >= 10 {
            return Err(Error::new(ErrorCode::TooManyRequests, "chat: 10 link codes are pending for this user; use one or wait for them to expire"));
        }
        c.execute("INSERT INTO _ichibase_chat_link_codes (code_hash, user_id, expires_at) VALUES (?1, ?2, ?3)", params![hash, u, exp])?;
        Ok(())
    })
    .await?;
    Ok((code, exp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_commands_are_recognised() {
        assert_eq!(link_code("/link ABCDEF23"), Some("ABCDEF23"));
        assert_eq!(link_code("  link   abcdef23 "), Some("abcdef23"));
        assert_eq!(link_code("/link@my_bot ABCDEF23"), Some("ABCDEF23"));
        assert_eq!(link_code("/start ABCDEF23"), Some("ABCDEF23"));
        assert_eq!(link_code("/link"), None);
        assert_eq!(link_code("/link AB"), None);
        assert_eq!(link_code("/link ABCDEF23 extra"), None);
        assert_eq!(link_code("please link ABCDEF23"), None);
        assert_eq!(code_hash("abcdef23"), code_hash("ABCDEF23"));
    }

    #[test]
    fn the_wrapper_keeps_line_numbers_and_both_shapes() {
        let w = wrap("return function(i) return 1 end");
        assert!(w.starts_with("local __chat_main = (function(...) return function(i)"));
        let lua = mlua::Lua::new();
        let f: mlua::Value = lua.load(wrap("function on_message(m, ctx) return m.text end")).call(()).unwrap();
        let mlua::Value::Function(f) = f else { panic!("on_message is wrapped in a function") };
        let t = lua.create_table().unwrap();
        let m = lua.create_table().unwrap();
        m.set("text", "hi").unwrap();
        t.set("message", m).unwrap();
        assert_eq!(f.call::<String>((t, mlua::Value::Nil)).unwrap(), "hi");
        let v: mlua::Value = lua.load(wrap("function handler(i) end -- comment")).call(()).unwrap();
        assert!(v.is_nil(), "a source defining handler() is left to lua::invoke");
    }
}
