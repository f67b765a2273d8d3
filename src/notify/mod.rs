//! Notifications: email (SMTP), Web Push and SMS from one line of Lua, through a durable
//! transactional outbox; plus the live `notify.broadcast` / `notify.presence` of the realtime
//! hub, which share the Lua table.
//!
//! Owns: the `[notify]` settings, the engine tables `_ichibase_notify_*` (outbox, push
//! subscriptions, VAPID key), the sender task that delivers committed messages
//! (`outbox`), the three channels (`email`, `push`, `sms`), the `/notify/*` routes (`api`)
//! and the `notify` Lua global (`lua`). Every message, attempt and outcome goes to the
//! posterity log as `kind = 'notify'`.
//!
//! Must not touch: other modules' tables, the hub's internals (it calls `Hub::broadcast` /
//! `Hub::presence` only), the SQL layer (its outbox rows are written with fixed engine
//! statements on the caller's writer session, see `lua`).

pub mod api;
pub mod email;
pub mod lua;
pub mod outbox;
pub mod push;
pub mod sms;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;

use crate::app::{App, AppBuilder};
use crate::core::{Error, ErrorCode, Result};
use crate::lua::components::Component;
use crate::storage::migrations::Migration;

/// `[notify]` of ichibase.toml (or `ICHIBASE_NOTIFY__<KEY>`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifySettings {
    /// Run the sender (off: messages are queued but not delivered, e.g. on a replica).
    pub sender: bool,
    /// Attempts before a message is dead-lettered (`status = 'dead'`).
    pub max_attempts: u32,
    /// Back-off after the first failed attempt, seconds; doubles per attempt (with jitter).
    pub backoff_base_secs: f64,
    /// Longest back-off between two attempts, seconds.
    pub backoff_max_secs: f64,
    /// Messages the sender claims in one batch (also the most that can be in doubt after a crash).
    pub batch: u32,
    /// Deliveries of one batch in flight at once.
    pub concurrency: u32,
    /// How often the sender looks for due messages when nothing woke it, seconds.
    pub poll_secs: f64,
    /// Largest message (its JSON with attachments) accepted by `notify.*`, bytes.
    pub max_message_bytes: usize,
    /// Most recipients (to + cc + bcc) of one email.
    pub max_recipients: usize,
    /// Most messages one invocation may queue.
    pub max_per_invocation: usize,
    /// Most bytes (message JSON, attachments base64) one invocation may queue in all: the
    /// messages of a call outside `db.tx` wait in server memory until the invocation ends.
    pub max_bytes_per_invocation: usize,

    /// SMTP relay: `smtp://host:port` (plain, for local servers), `smtp://host:587?tls=required`
    /// (STARTTLS), `smtps://host:465` (TLS); credentials as `smtp://user:pass@host`. Empty: no email.
    pub smtp_url: String,
    /// The From address of every email (`Name <addr@example.com>` or `addr@example.com`).
    pub from: String,
    /// Timeout of one SMTP delivery, seconds.
    pub smtp_timeout_secs: f64,
    /// A PEM file of extra root certificates to trust for the relay's TLS (a private relay
    /// with its own CA); empty: the webpki roots only.
    pub smtp_ca_file: String,

    /// The VAPID `sub` claim (RFC 8292): `mailto:` or `https:` contact of the sender.
    pub vapid_subject: String,
    /// How long a push service keeps an undelivered push (`TTL` header), seconds.
    pub push_ttl_secs: u64,
    /// Timeout of one request to a push service, seconds.
    pub push_timeout_secs: f64,
    /// Most push subscriptions (devices) per user.
    pub max_subscriptions_per_user: usize,

    /// Base URL of the Twilio-style SMS API; messages go to `{sms_url}/Accounts/{sid}/Messages.json`.
    pub sms_url: String,
    /// Account SID (the Basic-auth user). Empty: no SMS.
    pub sms_account_sid: String,
    /// Auth token (the Basic-auth password).
    pub sms_auth_token: String,
    /// The `From` number of every SMS.
    pub sms_from: String,
    /// Timeout of one SMS API request, seconds.
    pub sms_timeout_secs: f64,
}

impl Default for NotifySettings {
    fn default() -> Self {
        NotifySettings {
            sender: true,
            max_attempts: 8,
            backoff_base_secs: 2.0,
            backoff_max_secs: 3600.0,
            batch: 32,
            concurrency: 8,
            poll_secs: 1.0,
            max_message_bytes: 10 * 1024 * 1024,
            max_recipients: 50,
            max_per_invocation: 1000,
            max_bytes_per_invocation: 64 * 1024 * 1024,
            smtp_url: String::new(),
            from: String::new(),
            smtp_timeout_secs: 30.0,
            smtp_ca_file: String::new(),
            vapid_subject: "mailto:admin@localhost".into(),
            push_ttl_secs: 86_400,
            push_timeout_secs: 30.0,
            max_subscriptions_per_user: 20,
            sms_url: "https://api.twilio.com/2010-04-01".into(),
            sms_account_sid: String::new(),
            sms_auth_token: String::new(),
            sms_from: String::new(),
            sms_timeout_secs: 30.0,
        }
    }
}

impl NotifySettings {
    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.max_attempts >= 1, "[notify] max_attempts must be at least 1");
        anyhow::ensure!(self.batch >= 1 && self.concurrency >= 1, "[notify] batch and concurrency must be at least 1");
        anyhow::ensure!(
            self.backoff_base_secs > 0.0 && self.backoff_max_secs >= self.backoff_base_secs,
            "[notify] backoff_base_secs must be > 0 and <= backoff_max_secs"
        );
        anyhow::ensure!(self.poll_secs > 0.0, "[notify] poll_secs must be > 0");
        for (k, v) in [("smtp_timeout_secs", self.smtp_timeout_secs), ("push_timeout_secs", self.push_timeout_secs), ("sms_timeout_secs", self.sms_timeout_secs)] {
            anyhow::ensure!(v > 0.0, "[notify] {k} must be > 0");
        }
        Ok(())
    }

    /// Back-off before attempt `attempts + 1` (after `attempts` failed ones).
    pub fn backoff(&self, attempts: u32) -> Duration {
        let exp = self.backoff_base_secs * 2f64.powi(attempts.saturating_sub(1).min(30) as i32);
        let secs = exp.min(self.backoff_max_secs);
        // ±20 % jitter so a peer coming back is not hit by every message at once.
        let jitter = 0.8 + 0.4 * (uuid::Uuid::new_v4().as_u128() % 1000) as f64 / 1000.0;
        Duration::from_secs_f64((secs * jitter).min(self.backoff_max_secs))
    }
}

/// The notify service (`app.get::<Notify>()`).
pub struct Notify {
    pub settings: NotifySettings,
    /// Wakes the sender (a message was committed).
    pub(crate) wake: Arc<tokio::sync::Notify>,
    pub(crate) smtp: Option<email::Smtp>,
    pub(crate) http: reqwest::Client,
    /// The VAPID key pair, loaded (or generated) on first use.
    pub(crate) vapid: Mutex<Option<Arc<push::Vapid>>>,
}

impl Notify {
    pub fn new(settings: NotifySettings) -> anyhow::Result<Notify> {
        settings.check()?;
        let smtp = email::Smtp::new(&settings)?;
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Notify {
            settings,
            wake: Arc::new(tokio::sync::Notify::new()),
            smtp,
            http,
            vapid: Mutex::new(None),
        })
    }

    /// Tell the sender there may be work (after a commit).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Whether `channel` has what it needs in `[notify]`; the error names the settings.
    pub fn check_channel(&self, channel: &str) -> Result<()> {
        let s = &self.settings;
        let missing = match channel {
            "email" if self.smtp.is_none() => Some("smtp_url and from"),
            "sms" if s.sms_account_sid.is_empty() || s.sms_from.is_empty() || s.sms_url.is_empty() => {
                Some("sms_url, sms_account_sid, sms_auth_token and sms_from")
            }
            _ => None,
        };
        match missing {
            Some(what) => Err(Error::new(
                ErrorCode::NotifyNotConfigured,
                format!("notify.{channel}: the {channel} channel is not configured (set {what} in [notify])"),
            )),
            None => Ok(()),
        }
    }
}

/// Record one notify event in the posterity log (`kind = 'notify'`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn log_event(
    app: &App,
    user: Option<&str>,
    trace: Option<&str>,
    channel: &str,
    outcome: &'static str,
    elapsed_ms: f64,
    error: Option<&str>,
    detail: serde_json::Value,
) {
    let sink = app.posterity().sink();
    if sink.enabled() {
        sink.record(crate::posterity::Event::module(
            "notify", user, trace, channel, outcome, elapsed_ms, error, detail,
        ));
    }
}

pub struct NotifyModule;

static MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "outbox, push subscriptions, keys",
        sql: "CREATE TABLE _ichibase_notify_outbox (
            id TEXT PRIMARY KEY,
            channel TEXT NOT NULL CHECK (channel IN ('email', 'push', 'sms')),
            owner TEXT,
            idempotency_key TEXT,
            payload TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'sending', 'sent', 'dead')),
            attempts INTEGER NOT NULL DEFAULT 0,
            next_at INTEGER NOT NULL,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            sent_at INTEGER,
            last_error TEXT,
            result TEXT,
            in_doubt INTEGER NOT NULL DEFAULT 0,
            trace_id TEXT,
            function TEXT
          );
          CREATE UNIQUE INDEX _ichibase_notify_outbox_key
            ON _ichibase_notify_outbox (coalesce(owner, ''), idempotency_key)
            WHERE idempotency_key IS NOT NULL;
          CREATE INDEX _ichibase_notify_outbox_due ON _ichibase_notify_outbox (status, next_at);
          CREATE INDEX _ichibase_notify_outbox_owner ON _ichibase_notify_outbox (owner, id);
          CREATE TABLE _ichibase_notify_push_subscriptions (
            user_id TEXT NOT NULL,
            device TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            p256dh TEXT NOT NULL,
            auth TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            PRIMARY KEY (user_id, device)
          );
          CREATE TABLE _ichibase_notify_keys (
            name TEXT PRIMARY KEY,
            value BLOB NOT NULL,
            created_at INTEGER NOT NULL
          );",
    },
    // The `chat` channel (delivered by the chat module through [`ExternalChannel`]): SQLite
    // cannot change a CHECK, so the outbox is rebuilt with the same columns and indexes.
    Migration {
        version: 2,
        name: "chat channel",
        sql: "CREATE TABLE _ichibase_notify_outbox_v2 (
            id TEXT PRIMARY KEY,
            channel TEXT NOT NULL CHECK (channel IN ('email', 'push', 'sms', 'chat')),
            owner TEXT,
            idempotency_key TEXT,
            payload TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'sending', 'sent', 'dead')),
            attempts INTEGER NOT NULL DEFAULT 0,
            next_at INTEGER NOT NULL,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            sent_at INTEGER,
            last_error TEXT,
            result TEXT,
            in_doubt INTEGER NOT NULL DEFAULT 0,
            trace_id TEXT,
            function TEXT
          );
          INSERT INTO _ichibase_notify_outbox_v2 SELECT id, channel, owner, idempotency_key, payload, status, attempts,
            next_at, created_at, updated_at, sent_at, last_error, result, in_doubt, trace_id, function
            FROM _ichibase_notify_outbox ORDER BY rowid;
          DROP TABLE _ichibase_notify_outbox;
          ALTER TABLE _ichibase_notify_outbox_v2 RENAME TO _ichibase_notify_outbox;
          CREATE UNIQUE INDEX _ichibase_notify_outbox_key
            ON _ichibase_notify_outbox (coalesce(owner, ''), idempotency_key)
            WHERE idempotency_key IS NOT NULL;
          CREATE INDEX _ichibase_notify_outbox_due ON _ichibase_notify_outbox (status, next_at);
          CREATE INDEX _ichibase_notify_outbox_owner ON _ichibase_notify_outbox (owner, id);",
    },
];

/// A channel another module delivers (today `chat`): the module registers one with
/// `builder.provide(ExternalChannel(...))`, queues rows with `channel = "chat"` through
/// [`lua::enqueue`], and the sender hands each claimed row to it (claim, retries, back-off and
/// dead-lettering stay here).
pub struct ExternalChannel(pub Box<dyn ChannelSender>);

/// Delivers one claimed message of an [`ExternalChannel`].
pub trait ChannelSender: Send + Sync + 'static {
    fn deliver<'a>(
        &'a self,
        app: &'a App,
        m: &'a outbox::Claimed,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = outbox::Delivery> + Send + 'a>>;
}

impl crate::modules::Module for NotifyModule {
    fn name(&self) -> &'static str {
        "notify"
    }
    fn section(&self) -> Option<&'static str> {
        Some("notify")
    }
    fn migrations(&self) -> &'static [Migration] {
        MIGRATIONS
    }
    fn provide(&self, b: &mut AppBuilder) -> anyhow::Result<()> {
        let s: NotifySettings = b.core().config.section("notify")?;
        b.provide(Notify::new(s)?);
        Ok(())
    }
    fn routes(&self) -> Router<App> {
        api::routes()
    }
    fn lua_components(&self) -> &'static [&'static dyn Component] {
        &[&lua::NotifyLua]
    }
    fn start(&self, app: &App) -> anyhow::Result<()> {
        outbox::start(app)
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_and_is_capped() {
        let s = NotifySettings { backoff_base_secs: 2.0, backoff_max_secs: 60.0, ..Default::default() };
        for attempt in 1..40 {
            let d = s.backoff(attempt).as_secs_f64();
            let exp = (2.0 * 2f64.powi(attempt as i32 - 1)).min(60.0);
            assert!(d >= exp * 0.8 - 1e-9 && d <= (exp * 1.2).min(60.0) + 1e-9, "attempt {attempt}: {d}");
        }
    }

    #[test]
    fn settings_are_checked() {
        assert!(NotifySettings::default().check().is_ok());
        assert!(NotifySettings { max_attempts: 0, ..Default::default() }.check().is_err());
        assert!(NotifySettings { backoff_base_secs: 10.0, backoff_max_secs: 1.0, ..Default::default() }.check().is_err());
    }
}
