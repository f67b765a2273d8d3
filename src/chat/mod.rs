//! Two-way chats: Telegram, Slack and Discord messages reach a Lua handler, and `chat.send`
//! replies on the same channel through the notify outbox (sent once, retried, dead-lettered).
//!
//! Owns: the `[chat]` settings (`[chat.telegram]`, `[chat.slack]`, `[chat.discord]`), the
//! engine tables `_ichibase_chat_*` (inbox, links, link codes, state such as the Telegram
//! offset), the inbound routes (`/chat/telegram/webhook`, `/chat/slack/events`,
//! `/chat/discord/interactions`) and the link API (`api`), the Telegram long poller
//! (`telegram`), the inbox worker that runs handlers (`inbound`), the outbound delivery of
//! `chat` outbox rows (`send`, registered with notify as an [`ExternalChannel`]), and the
//! `chat` Lua global (`lua`). Every inbound and outbound message is logged to posterity as
//! `kind = 'chat'` by [`log_event`] (the one place this module writes log events).
//!
//! Must not touch: the outbox table other than through `notify::outbox` (insert) and the
//! notify sender (claims, retries), other modules' tables, the users table (read only, to
//! build a linked user's identity).

pub mod api;
pub mod discord;
pub mod inbound;
pub mod lua;
pub mod send;
pub mod slack;
pub mod telegram;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;

use crate::app::{App, AppBuilder};
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::lua::components::Component;
use crate::storage::migrations::Migration;

/// The providers, by their names in config, Lua and the tables.
pub const PROVIDERS: &[&str] = &["telegram", "slack", "discord"];

/// `[chat]` of ichibase.toml.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatSettings {
    /// The handler function for every provider (a provider's own `function` overrides it).
    pub function: String,
    /// What happens to a message from a chat user not linked to an ichibase user:
    /// `refuse` (dropped, logged), `quarantine` (kept in the inbox for the admin, no handler)
    /// or `anon` (the handler runs as anon with `user = nil`).
    pub unlinked: String,
    /// Text sent back to a refused or quarantined unlinked sender (empty: no answer).
    pub unlinked_reply: String,
    /// Messages one chat user may send per minute (then they are refused and logged).
    pub rate_per_minute: u32,
    /// Messages one chat user may send at once before the per-minute rate applies.
    pub rate_burst: u32,
    /// How long a link code from `POST /chat/link` is valid, seconds.
    pub link_code_ttl_secs: u64,
    /// Timeout of one request to a provider's API, seconds.
    pub timeout_secs: f64,
    /// Handlers running at once.
    pub concurrency: usize,
    /// How long a handler may run, seconds (the Lua timeout of the invocation).
    pub handler_timeout_secs: f64,
    /// How many handled inbox rows are kept (older ones are deleted; quarantined rows stay).
    pub keep_inbox: u64,
    pub telegram: TelegramSettings,
    pub slack: SlackSettings,
    pub discord: DiscordSettings,
}

impl Default for ChatSettings {
    fn default() -> Self {
        ChatSettings {
            function: String::new(),
            unlinked: "refuse".into(),
            unlinked_reply: String::new(),
            rate_per_minute: 30,
            rate_burst: 10,
            link_code_ttl_secs: 600,
            timeout_secs: 30.0,
            concurrency: 4,
            handler_timeout_secs: 30.0,
            keep_inbox: 10_000,
            telegram: TelegramSettings::default(),
            slack: SlackSettings::default(),
            discord: DiscordSettings::default(),
        }
    }
}

/// `[chat.telegram]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelegramSettings {
    /// Bot API base URL (tests point it at a local server).
    pub base_url: String,
    /// The bot token (`123456:ABC...`); or `token_vault`.
    pub token: String,
    /// Name of a vault secret holding the bot token (its `functions` must allow `chat`, its
    /// `hosts` the API's host).
    pub token_vault: String,
    /// The `secret_token` given to `setWebhook`: the webhook refuses requests whose
    /// `X-Telegram-Bot-Api-Secret-Token` differs. Empty: the webhook is off.
    pub webhook_secret: String,
    /// Long polling with `getUpdates` (for servers without a public URL).
    pub poll: bool,
    /// `getUpdates` long-poll timeout, seconds.
    pub poll_timeout_secs: u64,
    /// The handler function (empty: `[chat] function`).
    pub function: String,
}

impl Default for TelegramSettings {
    fn default() -> Self {
        TelegramSettings {
            base_url: "https://api.telegram.org".into(),
            token: String::new(),
            token_vault: String::new(),
            webhook_secret: String::new(),
            poll: false,
            poll_timeout_secs: 25,
            function: String::new(),
        }
    }
}

/// `[chat.slack]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlackSettings {
    /// Web API base URL.
    pub base_url: String,
    /// The bot token (`xoxb-...`); or `bot_token_vault`.
    pub bot_token: String,
    pub bot_token_vault: String,
    /// The app's signing secret (request signatures); or `signing_secret_vault`. Empty: the
    /// Events API route is off.
    pub signing_secret: String,
    pub signing_secret_vault: String,
    /// How far `X-Slack-Request-Timestamp` may be from the server's clock, seconds.
    pub timestamp_window_secs: u64,
    /// The handler function (empty: `[chat] function`).
    pub function: String,
}

impl Default for SlackSettings {
    fn default() -> Self {
        SlackSettings {
            base_url: "https://slack.com/api".into(),
            bot_token: String::new(),
            bot_token_vault: String::new(),
            signing_secret: String::new(),
            signing_secret_vault: String::new(),
            timestamp_window_secs: 300,
            function: String::new(),
        }
    }
}

/// `[chat.discord]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscordSettings {
    /// REST API base URL.
    pub base_url: String,
    /// The bot token; or `bot_token_vault`.
    pub bot_token: String,
    pub bot_token_vault: String,
    /// The application's Ed25519 public key (hex, from the developer portal). Empty: the
    /// interactions endpoint is off.
    pub public_key: String,
    /// How far `X-Signature-Timestamp` may be from the server's clock, seconds.
    pub timestamp_window_secs: u64,
    /// The ephemeral answer to a slash command while the handler runs (empty: a deferred
    /// answer, "thinking...").
    pub ack_text: String,
    /// The handler function (empty: `[chat] function`).
    pub function: String,
}

impl Default for DiscordSettings {
    fn default() -> Self {
        DiscordSettings {
            base_url: "https://discord.com/api/v10".into(),
            bot_token: String::new(),
            bot_token_vault: String::new(),
            public_key: String::new(),
            timestamp_window_secs: 300,
            ack_text: "Received.".into(),
            function: String::new(),
        }
    }
}

impl ChatSettings {
    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            ["refuse", "quarantine", "anon"].contains(&self.unlinked.as_str()),
            "[chat] unlinked must be refuse, quarantine or anon (not {:?})",
            self.unlinked
        );
        anyhow::ensure!(self.rate_per_minute >= 1 && self.rate_burst >= 1, "[chat] rate_per_minute and rate_burst must be at least 1");
        anyhow::ensure!(self.timeout_secs > 0.0 && self.handler_timeout_secs > 0.0, "[chat] timeout_secs and handler_timeout_secs must be > 0");
        anyhow::ensure!(self.concurrency >= 1, "[chat] concurrency must be at least 1");
        anyhow::ensure!(self.link_code_ttl_secs >= 10, "[chat] link_code_ttl_secs must be at least 10");
        for (name, url) in [
            ("telegram", &self.telegram.base_url),
            ("slack", &self.slack.base_url),
            ("discord", &self.discord.base_url),
        ] {
            let u = url::Url::parse(url).map_err(|e| anyhow::anyhow!("[chat.{name}] base_url {url:?}: {e}"))?;
            anyhow::ensure!(matches!(u.scheme(), "http" | "https"), "[chat.{name}] base_url must be http(s)");
        }
        if !self.discord.public_key.is_empty() {
            let k = hex_decode(&self.discord.public_key);
            anyhow::ensure!(k.as_ref().is_some_and(|k| k.len() == 32), "[chat.discord] public_key must be 64 hex digits (an Ed25519 key)");
        }
        anyhow::ensure!(self.telegram.poll_timeout_secs <= 50, "[chat.telegram] poll_timeout_secs must be at most 50");
        Ok(())
    }

    /// The handler function of `provider` (empty: none configured).
    pub fn function_of(&self, provider: &str) -> &str {
        let own = match provider {
            "telegram" => &self.telegram.function,
            "slack" => &self.slack.function,
            "discord" => &self.discord.function,
            _ => "",
        };
        if own.is_empty() { &self.function } else { own }
    }

    /// Whether `provider` can send (a token in config or the vault).
    pub fn can_send(&self, provider: &str) -> bool {
        match provider {
            "telegram" => !self.telegram.token.is_empty() || !self.telegram.token_vault.is_empty(),
            "slack" => !self.slack.bot_token.is_empty() || !self.slack.bot_token_vault.is_empty(),
            "discord" => !self.discord.bot_token.is_empty() || !self.discord.bot_token_vault.is_empty(),
            _ => false,
        }
    }
}

/// A token bucket per chat user.
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The chat service (`app.get::<Chat>()`).
pub struct Chat {
    pub settings: ChatSettings,
    pub(crate) http: reqwest::Client,
    /// Wakes the inbox worker.
    pub(crate) wake: Arc<tokio::sync::Notify>,
    buckets: Mutex<HashMap<(String, String), Bucket>>,
    /// Slack signatures seen inside the timestamp window (a replay is refused).
    pub(crate) slack_seen: Mutex<HashMap<String, i64>>,
}

impl Chat {
    pub fn new(settings: ChatSettings) -> anyhow::Result<Chat> {
        settings.check()?;
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs_f64(settings.timeout_secs))
            .build()?;
        Ok(Chat {
            settings,
            http,
            wake: Arc::new(tokio::sync::Notify::new()),
            buckets: Mutex::new(HashMap::new()),
            slack_seen: Mutex::new(HashMap::new()),
        })
    }

    /// Take one message from `sender`'s bucket; false when over the rate.
    pub fn allow(&self, provider: &str, sender: &str) -> bool {
        let s = &self.settings;
        let per_sec = s.rate_per_minute as f64 / 60.0;
        let burst = s.rate_burst as f64;
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap();
        if b.len() > 100_000 {
            // Forget full buckets (idle senders) so the map stays bounded.
            b.retain(|_, v| v.tokens + now.duration_since(v.at).as_secs_f64() * per_sec < burst);
        }
        let e = b
            .entry((provider.to_string(), sender.to_string()))
            .or_insert(Bucket { tokens: burst, at: now });
        e.tokens = (e.tokens + now.duration_since(e.at).as_secs_f64() * per_sec).min(burst);
        e.at = now;
        if e.tokens >= 1.0 {
            e.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A provider's error when it is not configured.
pub fn not_configured(provider: &str, what: &str) -> Error {
    Error::new(
        ErrorCode::ChatNotConfigured,
        format!("chat: {provider} is not configured (set {what} in [chat.{provider}])"),
    )
}

/// A secret from config, or from the vault (its `functions` must allow `chat`, its `hosts`
/// the provider's host).
pub async fn secret(app: &App, provider: &str, value: &str, vault_name: &str, base_url: &str) -> Result<String> {
    if !value.is_empty() {
        return Ok(value.to_string());
    }
    if vault_name.is_empty() {
        return Err(not_configured(provider, "the token"));
    }
    let vault = app
        .get::<crate::vault::Vault>()
        .ok_or_else(|| Error::new(ErrorCode::ChatNotConfigured, "chat: the vault is not running"))?;
    let host = url::Url::parse(base_url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default();
    let r = crate::vault::VaultRef { name: vault_name.to_string(), format: crate::vault::RefFormat::Raw };
    Ok(vault.header_value(&RequestContext::system(), "chat", &r, &host).await?.to_string())
}

/// Record one chat event in the posterity log (`kind = 'chat'`; `name` = the provider;
/// outcome `received`, `handled`, `refused`, `quarantined`, `limited`, `failed`, `sent`, ...).
/// The one place this module writes log events.
pub(crate) fn log_event(
    app: &App,
    user: Option<&str>,
    trace: Option<&str>,
    provider: &str,
    outcome: &'static str,
    elapsed_ms: f64,
    error: Option<&str>,
    detail: serde_json::Value,
) {
    let sink = app.posterity().sink();
    if sink.enabled() {
        sink.record(crate::posterity::Event::module(
            "chat", user, trace, provider, outcome, elapsed_ms, error, detail,
        ));
    }
}

/// Constant-time equality of two byte strings.
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

pub(crate) fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Seconds since the Unix epoch.
pub(crate) fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `ICHIBASE_CHAT__TELEGRAM__TOKEN=...` arrives as key `telegram__token` of `[chat]`: put such
/// keys into their sub-table (`[chat.telegram] token`), so provider settings (tokens) can come
/// from the environment too.
fn nest(mut t: toml::Table) -> toml::Table {
    let flat: Vec<String> = t.keys().filter(|k| k.contains("__")).cloned().collect();
    for k in flat {
        let v = t.remove(&k).expect("listed");
        let (sub, key) = k.split_once("__").expect("contains __");
        match t.entry(sub.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new())) {
            toml::Value::Table(st) => {
                st.insert(key.to_string(), v);
            }
            _ => {
                // Not a table: keep the flat key, so deserializing names it as unknown.
                t.insert(k, v);
            }
        }
    }
    t
}

pub struct ChatModule;

static MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "inbox, links, link codes, state",
    sql: "CREATE TABLE _ichibase_chat_inbox (
            id INTEGER PRIMARY KEY,
            provider TEXT NOT NULL,
            event_id TEXT NOT NULL,
            message TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'new',
            user_id TEXT,
            error TEXT,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            UNIQUE (provider, event_id)
          );
          CREATE INDEX _ichibase_chat_inbox_status ON _ichibase_chat_inbox (status, id);
          CREATE TABLE _ichibase_chat_links (
            provider TEXT NOT NULL,
            sender_id TEXT NOT NULL,
            user_id TEXT NOT NULL,
            chat_id TEXT NOT NULL,
            name TEXT,
            created_at INTEGER NOT NULL,
            PRIMARY KEY (provider, sender_id)
          );
          CREATE INDEX _ichibase_chat_links_user ON _ichibase_chat_links (user_id, created_at);
          CREATE TABLE _ichibase_chat_link_codes (
            code_hash TEXT PRIMARY KEY,
            user_id TEXT NOT NULL,
            expires_at INTEGER NOT NULL
          );
          CREATE TABLE _ichibase_chat_state (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
          );",
}];

impl crate::modules::Module for ChatModule {
    fn name(&self) -> &'static str {
        "chat"
    }
    fn section(&self) -> Option<&'static str> {
        Some("chat")
    }
    fn migrations(&self) -> &'static [Migration] {
        MIGRATIONS
    }
    fn provide(&self, b: &mut AppBuilder) -> anyhow::Result<()> {
        let raw: toml::Table = b.core().config.section("chat")?;
        let s: ChatSettings = nest(raw)
            .try_into()
            .map_err(|e| anyhow::anyhow!("in the [chat] section of the configuration: {e}"))?;
        b.provide(Chat::new(s)?);
        b.provide(crate::notify::ExternalChannel(Box::new(send::ChatSender)));
        Ok(())
    }
    fn routes(&self) -> Router<App> {
        api::routes()
    }
    fn lua_components(&self) -> &'static [&'static dyn Component] {
        &[&lua::ChatLua]
    }
    fn start(&self, app: &App) -> anyhow::Result<()> {
        inbound::start(app)?;
        telegram::start_poller(app)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        assert!(ChatSettings::default().check().is_ok());
        assert!(ChatSettings { unlinked: "maybe".into(), ..Default::default() }.check().is_err());
        let mut s = ChatSettings::default();
        s.discord.public_key = "abcd".into();
        assert!(s.check().is_err());
        let mut s = ChatSettings::default();
        s.slack.base_url = "ftp://x".into();
        assert!(s.check().is_err());
    }

    #[test]
    fn environment_keys_reach_provider_tables() {
        let t: toml::Table = toml::from_str("function = \"bot\"\ntelegram__token = \"1:A\"\n[telegram]\npoll = true").unwrap();
        let s: ChatSettings = nest(t).try_into().unwrap();
        assert_eq!((s.telegram.token.as_str(), s.telegram.poll, s.function.as_str()), ("1:A", true, "bot"));
        let t: toml::Table = toml::from_str("slack__bot_token = \"x\"").unwrap();
        assert_eq!(nest(t).try_into::<ChatSettings>().unwrap().slack.bot_token, "x");
        let t: toml::Table = toml::from_str("telegram__nope = 1").unwrap();
        assert!(nest(t).try_into::<ChatSettings>().is_err());
    }

    #[test]
    fn buckets_refuse_over_the_burst() {
        let c = Chat::new(ChatSettings { rate_burst: 3, rate_per_minute: 1, ..Default::default() }).unwrap();
        assert!((0..3).all(|_| c.allow("telegram", "1")));
        assert!(!c.allow("telegram", "1"));
        assert!(c.allow("telegram", "2"), "another sender has its own bucket");
    }

    #[test]
    fn hex_round_trip_and_constant_time_compare() {
        assert_eq!(hex_decode(&hex_encode(&[0, 1, 254, 255])).unwrap(), vec![0, 1, 254, 255]);
        assert!(hex_decode("zz").is_none() && hex_decode("abc").is_none());
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"ab", b"abc"));
    }
}
