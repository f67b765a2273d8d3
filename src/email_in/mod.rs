//! Inbound email: an SMTP listener (off unless `--smtp-listen` / `[email_in] listen` is set)
//! that accepts mail for configured addresses, parses it (text, HTML as readable text,
//! attachments into the file store under the addressed user's prefix), checks DKIM (against
//! keys given in config) and an offline SPF table, stores every accepted message in
//! `_ichibase_email_in` before it answers `250`, and then hands it to the configured Lua
//! function as the addressed user (`handler`), at least once, also after a restart.
//!
//! Owns: the `[email_in]` settings, the engine table `_ichibase_email_in`, the SMTP listener
//! (`smtp`), MIME parsing (`parse`), DKIM/SPF checks (`dkim`), the table's statements
//! (`store`), the task that runs handlers (`handler`), the `/email/*` routes (`api`) and the
//! `email_in` posterity events (one place: [`log_event`]).
//!
//! Must not touch: other modules' tables (it reads `_ichibase_users` to resolve the addressed
//! user, and deployed functions through `lua::store`), the file store's internals (it writes
//! through `files::Files::put` as the addressed user), the Lua runtime (it calls `lua::invoke`).

pub mod api;
pub mod dkim;
pub mod handler;
pub mod parse;
pub mod smtp;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Router;
use serde::Deserialize;

use crate::app::{App, AppBuilder};
use crate::storage::migrations::Migration;

/// What to do with a message from a sender that is not on the address's allowlist (or whose
/// DKIM signature failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Store and handle it.
    #[default]
    Accept,
    /// Store it as `quarantined`: no handler runs until an admin releases it.
    Quarantine,
    /// Refuse it in the SMTP dialogue (550).
    Refuse,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Accept => "accept",
            Policy::Quarantine => "quarantine",
            Policy::Refuse => "refuse",
        }
    }
}

/// One receiving address: `[email_in.addresses."news@in.example.com"]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Route {
    /// The ichibase user the message belongs to (email or user id): the handler runs as them
    /// and attachments go under their file prefix.
    pub user: String,
    /// The deployed function that handles the message.
    pub function: String,
    /// Senders this address knows (`alice@example.com`, `*@example.com`), besides the global
    /// `senders` and the user's own email.
    pub senders: Vec<String>,
    /// Overrides the global `unknown_senders` for this address.
    pub unknown_senders: Option<Policy>,
}

/// `[email_in]` of ichibase.toml (or `ICHIBASE_EMAIL_IN__<KEY>`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmailInSettings {
    /// Address the SMTP listener binds (`--smtp-listen` overrides it); empty: no listener.
    pub listen: String,
    /// The name the server gives in its greeting and EHLO answer.
    pub hostname: String,
    /// Domains mail is accepted for; mail for other domains is refused (no relaying). Empty:
    /// the domains of `addresses`.
    pub domains: Vec<String>,
    /// Receiving addresses (`news@in.example.com`, or `*@in.example.com` for a whole domain):
    /// who owns the mail and which function handles it. `news+tag@...` reaches `news@...`.
    pub addresses: BTreeMap<String, Route>,
    /// Senders every address knows (`alice@example.com`, `*@example.com`).
    pub senders: Vec<String>,
    /// Senders no allowlist names: `accept`, `quarantine` or `refuse` (at RCPT, 550).
    pub unknown_senders: Policy,
    /// A message whose DKIM signature fails: `quarantine` (default), `refuse` (550 after
    /// DATA) or `accept` (handled, with `dkim = "fail"`).
    pub dkim_fail: Policy,
    /// DKIM public keys by DNS name: `"sel._domainkey.example.com" = "v=DKIM1; k=rsa; p=..."`
    /// (the TXT record's text; `k=ed25519` too). Signatures by other keys record `none`.
    pub dkim_keys: BTreeMap<String, String>,
    /// Offline SPF: the addresses (CIDR ranges) allowed to send for a MAIL FROM domain,
    /// `"example.com" = ["192.0.2.0/24"]`. Domains not listed record `spf = "none"`.
    pub spf: BTreeMap<String, Vec<String>>,
    /// Largest message (DATA after dot-unstuffing), bytes; larger ones get 552.
    pub max_message_bytes: usize,
    /// Most RCPT TO of one message (452 past it).
    pub max_recipients: usize,
    /// Most SMTP connections at once (421 past it).
    pub max_connections: usize,
    /// Most SMTP connections from one client address at once.
    pub max_connections_per_ip: usize,
    /// Longest command or message line, bytes (500 / 552 past it).
    pub max_line_bytes: usize,
    /// Bad commands before a connection is closed.
    pub max_bad_commands: u32,
    /// Seconds a client may take to send one command.
    pub command_timeout_secs: f64,
    /// Seconds a client may take to send a whole message (DATA).
    pub data_timeout_secs: f64,
    /// Messages one sender (envelope MAIL FROM) may send per minute (450 past it); 0: no limit.
    pub rate_per_sender_per_minute: f64,
    /// Messages a sender may send at once before the per-minute rate applies.
    pub rate_burst: f64,
    /// Most attachments stored per message (the rest are listed with `skipped`).
    pub max_attachments: usize,
    /// Largest attachment stored, bytes (larger ones are listed with `skipped`).
    pub max_attachment_bytes: usize,
    /// Longest `text` / `html_text` handed to Lua, bytes (cut at a character boundary).
    pub max_text_bytes: usize,
    /// Run handlers (off: messages are stored as `pending` and wait, e.g. during maintenance;
    /// they run at the next start with handlers on).
    pub handlers: bool,
    /// Handlers running at once.
    pub handler_concurrency: usize,
    /// Seconds between looks for pending messages when nothing woke the handler task.
    pub poll_secs: f64,
}

impl Default for EmailInSettings {
    fn default() -> Self {
        EmailInSettings {
            listen: String::new(),
            hostname: "ichibase".into(),
            domains: Vec::new(),
            addresses: BTreeMap::new(),
            senders: Vec::new(),
            unknown_senders: Policy::Accept,
            dkim_fail: Policy::Quarantine,
            dkim_keys: BTreeMap::new(),
            spf: BTreeMap::new(),
            max_message_bytes: 10 << 20,
            max_recipients: 50,
            max_connections: 100,
            max_connections_per_ip: 10,
            max_line_bytes: 16 << 10,
            max_bad_commands: 20,
            command_timeout_secs: 60.0,
            data_timeout_secs: 300.0,
            rate_per_sender_per_minute: 60.0,
            rate_burst: 20.0,
            max_attachments: 20,
            max_attachment_bytes: 10 << 20,
            max_text_bytes: 1 << 20,
            handlers: true,
            handler_concurrency: 2,
            poll_secs: 2.0,
        }
    }
}

impl EmailInSettings {
    fn check(&self) -> anyhow::Result<()> {
        let positive = [
            ("max_message_bytes", self.max_message_bytes),
            ("max_recipients", self.max_recipients),
            ("max_connections", self.max_connections),
            ("max_connections_per_ip", self.max_connections_per_ip),
            ("max_line_bytes", self.max_line_bytes),
            ("max_text_bytes", self.max_text_bytes),
            ("handler_concurrency", self.handler_concurrency),
        ];
        for (k, v) in positive {
            anyhow::ensure!(v > 0, "[email_in] {k} must be positive");
        }
        anyhow::ensure!(self.max_line_bytes >= 1000, "[email_in] max_line_bytes must be at least 1000 (RFC 5321)");
        for (k, v) in [("command_timeout_secs", self.command_timeout_secs), ("data_timeout_secs", self.data_timeout_secs), ("poll_secs", self.poll_secs)] {
            anyhow::ensure!(v > 0.0 && v.is_finite(), "[email_in] {k} must be a positive number of seconds");
        }
        anyhow::ensure!(
            self.rate_per_sender_per_minute >= 0.0 && self.rate_burst >= 1.0,
            "[email_in] rate_per_sender_per_minute must be >= 0 and rate_burst >= 1"
        );
        for (addr, r) in &self.addresses {
            let (local, domain) = addr
                .rsplit_once('@')
                .ok_or_else(|| anyhow::anyhow!("[email_in] addresses: {addr:?} is not an email address"))?;
            anyhow::ensure!(!local.is_empty() && !domain.is_empty(), "[email_in] addresses: {addr:?} is not an email address");
            anyhow::ensure!(!r.user.is_empty(), "[email_in] addresses.{addr:?}: `user` (an email or user id) is required");
            anyhow::ensure!(!r.function.is_empty(), "[email_in] addresses.{addr:?}: `function` is required");
            if !self.domains.is_empty() {
                anyhow::ensure!(
                    self.domains.iter().any(|d| d.eq_ignore_ascii_case(domain)),
                    "[email_in] addresses: {addr:?} is not in one of `domains`"
                );
            }
        }
        for (name, rec) in &self.dkim_keys {
            dkim::PublicKey::parse(rec).map_err(|e| anyhow::anyhow!("[email_in] dkim_keys.{name:?}: {e}"))?;
        }
        for (domain, nets) in &self.spf {
            for n in nets {
                dkim::parse_net(n).map_err(|e| anyhow::anyhow!("[email_in] spf.{domain:?}: {e}"))?;
            }
        }
        Ok(())
    }

    /// The domains mail is accepted for (lowercase).
    pub fn accepted_domains(&self) -> Vec<String> {
        if !self.domains.is_empty() {
            return self.domains.iter().map(|d| d.to_ascii_lowercase()).collect();
        }
        let mut d: Vec<String> = self
            .addresses
            .keys()
            .filter_map(|a| a.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase()))
            .collect();
        d.sort();
        d.dedup();
        d
    }

    /// The route of `rcpt` (lowercase `local@domain`): the exact address, then `local` without
    /// its `+tag`, then `*@domain`. Returns the configured key, the route and the tag.
    pub fn route(&self, rcpt: &str) -> Option<(String, &Route, Option<String>)> {
        let (local, domain) = rcpt.rsplit_once('@')?;
        let find = |k: &str| self.addresses.iter().find(|(a, _)| a.eq_ignore_ascii_case(k));
        if let Some((a, r)) = find(rcpt) {
            return Some((a.to_ascii_lowercase(), r, None));
        }
        if let Some((base, tag)) = local.split_once('+')
            && let Some((a, r)) = find(&format!("{base}@{domain}"))
        {
            return Some((a.to_ascii_lowercase(), r, Some(tag.to_string())));
        }
        find(&format!("*@{domain}")).map(|(a, r)| (a.to_ascii_lowercase(), r, None))
    }
}

/// Whether `sender` (lowercase) matches one of `patterns` (`a@b`, `*@b`, `*`).
pub fn sender_matches(patterns: &[String], sender: &str) -> bool {
    patterns.iter().any(|p| {
        let p = p.trim().to_ascii_lowercase();
        if p == "*" {
            return true;
        }
        match p.strip_prefix("*@") {
            Some(d) => sender.rsplit_once('@').is_some_and(|(_, sd)| sd == d),
            None => p == sender,
        }
    })
}

/// A token bucket per sender.
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_minute: f64, burst: f64) -> RateLimiter {
        RateLimiter { per_sec: per_minute / 60.0, burst, buckets: Mutex::new(HashMap::new()) }
    }

    /// Take one message from `key`'s bucket; false when it is empty.
    pub fn allow(&self, key: &str) -> bool {
        if self.per_sec <= 0.0 {
            return true;
        }
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if b.len() > 100_000 {
            // Forget buckets that have refilled (they hold no information).
            let (per_sec, burst) = (self.per_sec, self.burst);
            b.retain(|_, (t, at)| *t + now.duration_since(*at).as_secs_f64() * per_sec < burst);
        }
        let e = b.entry(key.to_string()).or_insert((self.burst, now));
        e.0 = (e.0 + now.duration_since(e.1).as_secs_f64() * self.per_sec).min(self.burst);
        e.1 = now;
        if e.0 >= 1.0 {
            e.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The inbound-email service (`app.get::<EmailIn>()`).
pub struct EmailIn {
    pub settings: EmailInSettings,
    /// Where the listener binds (flag over section); `None`: no listener.
    pub listen: Option<SocketAddr>,
    /// The address it did bind (known once started).
    pub bound: Mutex<Option<SocketAddr>>,
    pub keys: BTreeMap<String, dkim::PublicKey>,
    pub spf: BTreeMap<String, Vec<ipnet::IpNet>>,
    pub rate: RateLimiter,
    /// Wakes the handler task (a message was stored or released).
    pub wake: tokio::sync::Notify,
    /// Open SMTP connections, in all and by client address.
    pub conns: Mutex<HashMap<std::net::IpAddr, usize>>,
}

impl EmailIn {
    pub fn new(settings: EmailInSettings, flag: Option<SocketAddr>) -> anyhow::Result<EmailIn> {
        settings.check()?;
        let listen = match flag {
            Some(a) => Some(a),
            None if settings.listen.trim().is_empty() => None,
            None => Some(
                settings
                    .listen
                    .trim()
                    .parse()
                    .map_err(|e| anyhow::anyhow!("[email_in] listen {:?}: {e} (want ADDR:PORT)", settings.listen))?,
            ),
        };
        let keys = settings
            .dkim_keys
            .iter()
            .map(|(k, v)| Ok((k.to_ascii_lowercase(), dkim::PublicKey::parse(v)?)))
            .collect::<Result<_, String>>()
            .map_err(|e| anyhow::anyhow!("[email_in] dkim_keys: {e}"))?;
        let spf = settings
            .spf
            .iter()
            .map(|(d, nets)| Ok((d.to_ascii_lowercase(), nets.iter().map(|n| dkim::parse_net(n)).collect::<Result<Vec<_>, String>>()?)))
            .collect::<Result<_, String>>()
            .map_err(|e| anyhow::anyhow!("[email_in] spf: {e}"))?;
        Ok(EmailIn {
            rate: RateLimiter::new(settings.rate_per_sender_per_minute, settings.rate_burst),
            settings,
            listen,
            bound: Mutex::new(None),
            keys,
            spf,
            wake: tokio::sync::Notify::new(),
            conns: Mutex::new(HashMap::new()),
        })
    }

    pub fn poll(&self) -> Duration {
        Duration::from_secs_f64(self.settings.poll_secs)
    }
}

/// Record one inbound-email event in the posterity log (`kind = 'email_in'`): every message
/// received (accepted, quarantined, refused, duplicate) and every handler outcome.
pub(crate) fn log_event(
    app: &App,
    user: Option<&str>,
    trace: Option<&str>,
    name: &str,
    outcome: &'static str,
    elapsed_ms: f64,
    error: Option<&str>,
    detail: serde_json::Value,
) {
    let sink = app.posterity().sink();
    if sink.enabled() {
        sink.record(crate::posterity::Event::module(
            "email_in", user, trace, name, outcome, elapsed_ms, error, detail,
        ));
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub struct EmailInModule;

static MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "inbound messages",
    sql: "CREATE TABLE _ichibase_email_in (
            id TEXT PRIMARY KEY,
            dedupe_key TEXT NOT NULL,
            message_id TEXT,
            recipient TEXT NOT NULL,
            route TEXT NOT NULL,
            user_id TEXT NOT NULL,
            function TEXT NOT NULL,
            mail_from TEXT NOT NULL,
            from_addr TEXT,
            subject TEXT,
            remote_ip TEXT,
            helo TEXT,
            status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'handled', 'failed', 'quarantined')),
            reason TEXT,
            dkim TEXT NOT NULL,
            dkim_detail TEXT,
            spf TEXT NOT NULL,
            email TEXT NOT NULL,
            raw BLOB NOT NULL,
            size INTEGER NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            in_doubt INTEGER NOT NULL DEFAULT 0,
            error TEXT,
            result TEXT,
            trace_id TEXT,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            handled_at INTEGER
          );
          CREATE UNIQUE INDEX _ichibase_email_in_dedupe ON _ichibase_email_in (dedupe_key, recipient);
          CREATE INDEX _ichibase_email_in_status ON _ichibase_email_in (status, created_at);
          CREATE INDEX _ichibase_email_in_user ON _ichibase_email_in (user_id, created_at);",
}];

impl crate::modules::Module for EmailInModule {
    fn name(&self) -> &'static str {
        "email_in"
    }
    fn section(&self) -> Option<&'static str> {
        Some("email_in")
    }
    fn migrations(&self) -> &'static [Migration] {
        MIGRATIONS
    }
    fn provide(&self, b: &mut AppBuilder) -> anyhow::Result<()> {
        let s: EmailInSettings = b.core().config.section("email_in")?;
        b.provide(EmailIn::new(s, b.core().config.smtp_listen)?);
        Ok(())
    }
    fn routes(&self) -> Router<App> {
        api::routes()
    }
    fn start(&self, app: &App) -> anyhow::Result<()> {
        handler::start(app)?;
        smtp::start(app)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> EmailInSettings {
        let mut s = EmailInSettings::default();
        s.addresses.insert("news@in.example.com".into(), Route { user: "a".into(), function: "f".into(), ..Default::default() });
        s.addresses.insert("*@all.example.com".into(), Route { user: "b".into(), function: "g".into(), ..Default::default() });
        s
    }

    #[test]
    fn routes_exact_plus_tag_and_catch_all() {
        let s = settings();
        assert!(s.check().is_ok());
        assert_eq!(s.route("news@in.example.com").unwrap().0, "news@in.example.com");
        let (a, r, tag) = s.route("news+weekly@in.example.com").unwrap();
        assert_eq!((a.as_str(), r.user.as_str(), tag.as_deref()), ("news@in.example.com", "a", Some("weekly")));
        assert_eq!(s.route("anyone@all.example.com").unwrap().1.user, "b");
        assert!(s.route("other@in.example.com").is_none());
        assert_eq!(s.accepted_domains(), vec!["all.example.com", "in.example.com"]);
    }

    #[test]
    fn settings_are_checked() {
        let mut s = settings();
        s.domains = vec!["elsewhere.org".into()];
        assert!(s.check().is_err(), "an address outside `domains`");
        let mut s = settings();
        s.addresses.insert("nobody".into(), Route::default());
        assert!(s.check().is_err());
        assert!(EmailInSettings { max_line_bytes: 10, ..Default::default() }.check().is_err());
        let mut s = settings();
        s.dkim_keys.insert("x._domainkey.a".into(), "v=DKIM1; k=rsa; p=notbase64!".into());
        assert!(s.check().is_err());
    }

    #[test]
    fn sender_patterns() {
        let p = vec!["alice@example.com".to_string(), "*@trusted.org".to_string()];
        assert!(sender_matches(&p, "alice@example.com"));
        assert!(sender_matches(&p, "bob@trusted.org"));
        assert!(!sender_matches(&p, "bob@example.com"));
        assert!(!sender_matches(&p, "bob@nottrusted.org"));
    }

    #[test]
    fn rate_limit_refills() {
        let r = RateLimiter::new(60.0, 2.0);
        assert!(r.allow("a") && r.allow("a"));
        assert!(!r.allow("a"), "the burst is spent");
        assert!(r.allow("b"), "buckets are per sender");
        assert!(RateLimiter::new(0.0, 1.0).allow("x"));
    }
}
