//! Account safety (`[auth_safety]`): email verification, password reset, invitations and
//! sign-in links by email (queued on the notify outbox), their one-time tokens, and the audit
//! trail of sign-ins in the posterity log.
//!
//! One-time tokens (`it_<random>`) are stored only as their SHA-256 in `_ichibase_auth_tokens`
//! with a kind (`verify`, `reset`, `invite`, `link`), an expiry and a `used_at`: consuming one is
//! a single `UPDATE ... WHERE used_at IS NULL AND expires_at > now`, so a token works once. A
//! new token of a kind replaces the user's earlier unused ones of that kind.
//!
//! No user enumeration: `POST /auth/reset/request` answers the same text and status at once for
//! every email and does the lookup and the mailing afterwards, in a task, so neither the answer
//! nor its timing tells whether the address has an account. Mails per address are limited
//! (`mails_per_address_per_hour`) so the route cannot be used to flood someone's inbox.
//!
//! Owns its tables, routes and settings; creates sessions only through `Auth::start_session`
//! and changes credentials only through the auth module's own statements and caches. Must not
//! touch the session schema (the passkeys/devices work owns it).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::post;
use rusqlite::{OptionalExtension, params};
use serde::Deserialize;
use serde_json::{Value as Json, json};

use super::jwt::now;
use super::secrets::{hash_password, hash_secret, random_token};
use super::{Auth, Tokens, UserInfo};
use crate::apis::{App, BodyLimit, Caller, JsonBody, RequestScope, body_limit, error_response};
use crate::app::AppBuilder;
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::storage::migrations::Migration;

/// `[auth_safety]` in ichibase.toml (or `ICHIBASE_AUTH_SAFETY__<KEY>`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SafetySettings {
    /// Base URL of the links in mails (`https://app.example.com`); default: the scheme and
    /// `Host` of the request that asked for the mail, or `http://<listen>` from Lua.
    pub public_url: Option<String>,
    /// Name of the app in mail subjects.
    pub app_name: String,
    /// How long an email verification link works, seconds.
    pub verify_ttl_secs: f64,
    /// How long a password reset link works, seconds.
    pub reset_ttl_secs: f64,
    /// How long an invitation (set-your-password) link works, seconds.
    pub invite_ttl_secs: f64,
    /// How long a sign-in link works, seconds.
    pub link_ttl_secs: f64,
    /// Mails of these kinds one address may be sent per hour (more are silently not sent).
    pub mails_per_address_per_hour: u32,
    /// Functions (names, or prefixes ending in `*`) that may call `auth.invite`,
    /// `auth.send_sign_in_link` and `auth.revoke_device` whoever calls them; an admin caller
    /// may call them from any function.
    pub privileged_functions: Vec<String>,
}

impl Default for SafetySettings {
    fn default() -> Self {
        SafetySettings {
            public_url: None,
            app_name: "ichibase".into(),
            verify_ttl_secs: 86400.0,
            reset_ttl_secs: 3600.0,
            invite_ttl_secs: 7.0 * 86400.0,
            link_ttl_secs: 900.0,
            mails_per_address_per_hour: 5,
            privileged_functions: Vec::new(),
        }
    }
}

impl SafetySettings {
    fn check(&self) -> anyhow::Result<()> {
        for (n, v) in [
            ("verify_ttl_secs", self.verify_ttl_secs),
            ("reset_ttl_secs", self.reset_ttl_secs),
            ("invite_ttl_secs", self.invite_ttl_secs),
            ("link_ttl_secs", self.link_ttl_secs),
        ] {
            anyhow::ensure!(v > 0.0 && v.is_finite(), "[auth_safety] {n} must be positive");
        }
        if let Some(u) = &self.public_url {
            anyhow::ensure!(
                u.starts_with("http://") || u.starts_with("https://"),
                "[auth_safety] public_url must start with http:// or https://"
            );
        }
        Ok(())
    }

    fn ttl(&self, kind: Kind) -> i64 {
        (match kind {
            Kind::Verify => self.verify_ttl_secs,
            Kind::Reset => self.reset_ttl_secs,
            Kind::Invite => self.invite_ttl_secs,
            Kind::Link => self.link_ttl_secs,
        }) as i64
    }
}

/// What a one-time token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Verify,
    Reset,
    Invite,
    Link,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Verify => "verify",
            Kind::Reset => "reset",
            Kind::Invite => "invite",
            Kind::Link => "link",
        }
    }
}

/// The service (`app.get::<Safety>()`).
pub struct Safety {
    pub settings: SafetySettings,
    listen: String,
    /// address -> times mails were queued to it in the last hour.
    sent: Mutex<HashMap<String, Vec<Instant>>>,
}

/// What `POST /auth/reset/request` answers for every email.
pub const RESET_ANSWER: &str = "If this email address has an account, a message with a link to choose a new password is on its way.";

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorCode::BadArguments, msg)
}

fn token_invalid() -> Error {
    Error::new(
        ErrorCode::AuthTokenInvalid,
        "This link is invalid, expired or used already; ask for a new one",
    )
}

/// Does `function` match one of `patterns` (a name, or a prefix ending in `*`)?
pub fn fn_matches(patterns: &[String], function: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => function.starts_with(prefix),
        None => p == function,
    })
}

impl Safety {
    pub fn new(settings: SafetySettings, listen: String) -> anyhow::Result<Safety> {
        settings.check()?;
        Ok(Safety { settings, listen, sent: Mutex::new(HashMap::new()) })
    }

    /// The base URL of links: `public_url`, else the request's, else the listen address.
    pub fn base_url(&self, headers: Option<&HeaderMap>) -> String {
        if let Some(u) = &self.settings.public_url {
            return u.trim_end_matches('/').to_string();
        }
        if let Some(host) = headers
            .and_then(|h| h.get(header::HOST))
            .and_then(|v| v.to_str().ok())
            .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c)))
        {
            return format!("http://{host}");
        }
        format!("http://{}", self.listen.replace("0.0.0.0", "127.0.0.1"))
    }

    /// May one more mail go to `email` now? (Counts it when yes.)
    fn mail_allowed(&self, email: &str) -> bool {
        let now = Instant::now();
        let hour = Duration::from_secs(3600);
        let mut m = self.sent.lock().unwrap();
        if m.len() > 100_000 {
            m.retain(|_, v| v.iter().any(|t| now.duration_since(*t) < hour));
        }
        let v = m.entry(super::guard::account_key(email)).or_default();
        v.retain(|t| now.duration_since(*t) < hour);
        if v.len() >= self.settings.mails_per_address_per_hour as usize {
            return false;
        }
        v.push(now);
        true
    }
}

// ----- the audit trail -----

/// One sign-in attempt for the audit trail.
#[derive(Debug, Default)]
pub struct SignInEvent<'a> {
    /// `password`, `oidc:<provider>`, `link`, `reset`, ...
    pub method: &'a str,
    pub ok: bool,
    /// Why it failed (the error's message).
    pub reason: Option<&'a str>,
    pub user_id: Option<&'a str>,
    pub email: Option<&'a str>,
    pub ip: Option<IpAddr>,
    pub user_agent: Option<&'a str>,
}

/// Record a sign-in attempt in the posterity log: `kind = 'auth'`, `name = 'signin'`,
/// `outcome` ok/error, `error` = the reason, `detail` = `{method, email, ip, user_agent}`.
pub fn audit(app: &App, e: SignInEvent<'_>) {
    let sink = app.posterity().sink();
    if !sink.enabled() {
        return;
    }
    let mut ev = crate::posterity::Event::now("auth", None);
    ev.name = Some("signin".into());
    ev.user_id = e.user_id.map(str::to_string);
    ev.outcome = Some(if e.ok { "ok" } else { "error" });
    ev.error = e.reason.map(|r| r.chars().take(500).collect());
    ev.detail = Some(
        json!({
            "method": e.method,
            // (what a client typed: bounded, so a huge "email" cannot bloat the log)
            "email": e.email.map(|m| super::guard::account_key(m).chars().take(254).collect::<String>()),
            "ip": e.ip.map(|i| i.to_string()),
            "user_agent": e.user_agent.map(|u| u.chars().take(300).collect::<String>()),
        })
        .to_string(),
    );
    sink.record(ev);
}

/// The `User-Agent` of a request.
pub fn user_agent(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok())
}

// ----- tokens, users, mails (on Auth: they use its storage and caches) -----

impl Auth {
    /// Issue a one-time token of `kind` for a user (earlier unused ones of the kind stop
    /// working). Returns the token, to be sent; only its hash is kept.
    pub async fn issue_one_time(&self, kind: Kind, user_id: &str, email: &str, ttl_secs: i64) -> Result<String> {
        let token = format!("it_{}", random_token(32));
        let (hash, uid, email, t) = (hash_secret(&token), user_id.to_string(), email.to_string(), now() as i64);
        self.sys_write(move |c| {
            c.execute(
                "UPDATE _ichibase_auth_tokens SET used_at = ?3 WHERE user_id = ?1 AND kind = ?2 AND used_at IS NULL",
                params![uid, kind.as_str(), t],
            )?;
            c.execute("DELETE FROM _ichibase_auth_tokens WHERE expires_at < ?1", [t - 86400])?;
            c.execute(
                "INSERT INTO _ichibase_auth_tokens (token_hash, kind, user_id, email, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![hash, kind.as_str(), uid, email, t, t + ttl_secs],
            )?;
            Ok(())
        })
        .await?;
        Ok(token)
    }

    /// Use a one-time token of one of `kinds`: (kind, user id, email) once, or the error.
    pub async fn consume_one_time(&self, kinds: &[Kind], token: &str) -> Result<(Kind, String, String)> {
        if !token.starts_with("it_") || token.len() > 200 {
            return Err(token_invalid());
        }
        let hash = hash_secret(token);
        let t = now() as i64;
        let row: Option<(String, String, String)> = self
            .sys_write(move |c| {
                Ok(c.query_row(
                    "UPDATE _ichibase_auth_tokens SET used_at = ?2 WHERE token_hash = ?1 AND used_at IS NULL AND expires_at > ?2
                     RETURNING kind, user_id, email",
                    params![hash, t],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?)
            })
            .await?;
        let Some((kind, uid, email)) = row else { return Err(token_invalid()) };
        let kind = [Kind::Verify, Kind::Reset, Kind::Invite, Kind::Link]
            .into_iter()
            .find(|k| k.as_str() == kind)
            .ok_or_else(token_invalid)?;
        if !kinds.contains(&kind) {
            // Spent anyway: a token shown to the wrong endpoint is not kept around.
            return Err(token_invalid());
        }
        Ok((kind, uid, email))
    }

    /// The email a usable token of one of `kinds` was issued for, without spending it (to check
    /// a new password before the token is used up).
    pub async fn peek_one_time(&self, kinds: &[Kind], token: &str) -> Result<String> {
        if !token.starts_with("it_") || token.len() > 200 {
            return Err(token_invalid());
        }
        let (hash, t) = (hash_secret(token), now() as i64);
        let kinds: Vec<&'static str> = kinds.iter().map(|k| k.as_str()).collect();
        let row: Option<(String, String)> = self
            .sys_read(move |c| {
                Ok(c.query_row(
                    "SELECT kind, email FROM _ichibase_auth_tokens WHERE token_hash = ?1 AND used_at IS NULL AND expires_at > ?2",
                    params![hash, t],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?)
            })
            .await?;
        match row {
            Some((k, email)) if kinds.contains(&k.as_str()) => Ok(email),
            _ => Err(token_invalid()),
        }
    }

    /// Check a new password against the password rule for `email`.
    pub fn check_new_password(&self, password: &str, email: &str) -> Result<()> {
        self.validate_password(password, email)
    }

    /// A user by id or email: (info, disabled).
    pub async fn find_user(&self, id_or_email: &str) -> Result<Option<UserInfo>> {
        let key = id_or_email.trim().to_string();
        self.sys_read(move |c| {
            Ok(c.query_row(
                "SELECT id, email, role, created_at, disabled_at IS NOT NULL FROM _ichibase_users WHERE id = ?1 OR email = ?1",
                [key],
                |r| Ok(UserInfo { id: r.get(0)?, email: r.get(1)?, role: r.get(2)?, created_at: r.get(3)?, disabled: r.get(4)? }),
            )
            .optional()?)
        })
        .await
    }

    /// Whether the user's current email was verified.
    pub async fn email_verified(&self, user_id: &str) -> Result<bool> {
        let uid = user_id.to_string();
        self.sys_read(move |c| {
            Ok(c.query_row(
                "SELECT EXISTS (SELECT 1 FROM _ichibase_email_verified v JOIN _ichibase_users u ON u.id = v.user_id
                                WHERE v.user_id = ?1 AND v.email = u.email COLLATE NOCASE)",
                [uid],
                |r| r.get(0),
            )?)
        })
        .await
    }

    /// Mark the user's email verified (they proved they read its mail, or their identity
    /// provider vouched for it).
    pub async fn mark_email_verified(&self, user_id: &str, email: &str) -> Result<()> {
        let (uid, email, t) = (user_id.to_string(), email.to_string(), now() as i64);
        self.sys_write(move |c| {
            c.execute(
                "INSERT INTO _ichibase_email_verified (user_id, email, verified_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (user_id) DO UPDATE SET email = excluded.email, verified_at = excluded.verified_at",
                params![uid, email, t],
            )?;
            Ok(())
        })
        .await
    }

    /// Set a new password (a reset or an invitation): every session of the user is revoked.
    pub async fn set_password(&self, user_id: &str, email: &str, password: &str) -> Result<()> {
        self.validate_password(password, email)?;
        let pw = password.to_string();
        let hash = self.hashes.run(move || hash_password(&pw)).await??;
        let uid = user_id.to_string();
        self.sys_write(move |c| {
            c.execute("UPDATE _ichibase_users SET password_hash = ?1 WHERE id = ?2", params![hash, uid])?;
            Ok(())
        })
        .await?;
        self.revoke_user_sessions(user_id, None).await
    }

    /// Start a session for a user proven by other means than a password (a sign-in link,
    /// OpenID Connect): refused for a disabled user. Marks `client` a known address.
    pub async fn sign_in_proven(&self, user: UserInfo, device: Option<String>, client: Option<IpAddr>) -> Result<Tokens> {
        if user.disabled || self.cache.read().unwrap().disabled_users.contains(&user.id) {
            return Err(Error::new(ErrorCode::AuthenticationFailed, "User is disabled"));
        }
        self.guard.note_success(&user.email, client);
        self.start_session(user, device).await
    }

    /// The owner proved control of the account's mailbox from `client`: clear its lockouts.
    pub fn forgive(&self, email: &str, client: Option<IpAddr>) {
        self.guard.forgive(email, client);
    }

    /// Revoke one session of any user (privileged callers: `auth.revoke_device`).
    pub async fn revoke_session_of_anyone(&self, sid: &str) -> Result<bool> {
        let sid2 = sid.to_string();
        let n = self
            .sys_write(move |c| {
                Ok(c.execute(
                    "UPDATE _ichibase_sessions SET revoked_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?1 AND revoked_at IS NULL",
                    [sid2],
                )?)
            })
            .await?;
        if n > 0 {
            self.cache.write().unwrap().revoked_sessions.insert(sid.to_string());
            self.revocations.changed();
        }
        Ok(n > 0)
    }

    /// The device name a session was started with, if any.
    pub async fn session_device(&self, sid: &str) -> Result<Option<String>> {
        let sid = sid.to_string();
        self.sys_read(move |c| {
            Ok(c.query_row("SELECT device FROM _ichibase_sessions WHERE id = ?1", [sid], |r| r.get::<_, Option<String>>(0))
                .optional()?
                .flatten())
        })
        .await
    }

    /// Revoke every session of a user ("sign out everywhere").
    pub async fn revoke_all_sessions(&self, user_id: &str) -> Result<()> {
        self.revoke_user_sessions(user_id, None).await
    }

    /// Create a `role` account with a password nobody knows (the owner sets one through an
    /// invitation or reset link, or signs in another way).
    pub async fn create_user_without_password(&self, email: &str, role: &str) -> Result<UserInfo> {
        // 43 random URL-safe characters pass every password rule.
        self.create_user(email, &random_token(32), role).await
    }
}

/// Queue one email on the notify outbox as the system (the notify sender delivers it).
pub async fn queue_mail(app: &App, to: &str, subject: &str, text: String, key: Option<String>) -> Result<String> {
    let notify = app
        .get::<crate::notify::Notify>()
        .ok_or_else(|| Error::internal("the notify module is not loaded"))?;
    notify.check_channel("email")?;
    let mail = crate::notify::email::Email {
        to: vec![to.to_string()],
        subject: subject.to_string(),
        text: Some(text),
        ..Default::default()
    };
    crate::notify::email::validate(&mail, &notify.settings)?;
    let payload = serde_json::to_string(&mail).map_err(|e| Error::internal(e.to_string()))?;
    let ctx = RequestContext::system();
    let msg = crate::notify::outbox::NewMessage::new("email", &ctx, "auth", key, payload);
    let id = app
        .storage()
        .write(&ctx, crate::storage::ExecControl::new(Instant::now(), 0.0), move |c| {
            crate::notify::outbox::insert(c, &msg).map(|(id, _)| id)
        })
        .await?;
    notify.wake();
    Ok(id)
}

fn safety(app: &App) -> Result<&Safety> {
    app.get::<Safety>().ok_or_else(|| Error::internal("the auth_safety module is not loaded"))
}

/// Send a link of `kind` to `user` (subject to the per-address limit). `Ok(None)` when the limit
/// held it back.
pub async fn send_link(app: &App, kind: Kind, user: &UserInfo, base: &str) -> Result<Option<String>> {
    let s = safety(app)?;
    if !s.mail_allowed(&user.email) {
        tracing::warn!(kind = kind.as_str(), "auth mail not sent: mails_per_address_per_hour reached");
        return Ok(None);
    }
    // Fail before a token is issued when mail cannot be sent at all.
    app.get::<crate::notify::Notify>()
        .ok_or_else(|| Error::internal("the notify module is not loaded"))?
        .check_channel("email")?;
    let token = app.auth().issue_one_time(kind, &user.id, &user.email, s.settings.ttl(kind)).await?;
    let name = &s.settings.app_name;
    let mins = s.settings.ttl(kind) / 60;
    let (subject, path, text) = match kind {
        Kind::Verify => (format!("{name}: confirm your email address"), "verify", "Confirm your email address by opening this link"),
        Kind::Reset => (format!("{name}: choose a new password"), "reset", "Someone (hopefully you) asked to reset the password of your account. Choose a new one here"),
        Kind::Invite => (format!("{name}: you are invited"), "reset", "You were invited. Choose your password here"),
        Kind::Link => (format!("{name}: your sign-in link"), "link", "Sign in by opening this link"),
    };
    let body = format!(
        "{text} (it works once, for {mins} minutes):\n\n{base}/auth/{path}?token={token}\n\nIf you did not ask for this, ignore this message.\n"
    );
    queue_mail(app, &user.email, &subject, body, None).await.map(Some)
}

// ----- HTTP -----

pub struct AuthSafetyModule;

static MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "one-time tokens, verified emails",
    sql: "CREATE TABLE _ichibase_auth_tokens (
            token_hash TEXT PRIMARY KEY,
            kind TEXT NOT NULL CHECK (kind IN ('verify', 'reset', 'invite', 'link')),
            user_id TEXT NOT NULL,
            email TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL,
            used_at INTEGER
          );
          CREATE INDEX _ichibase_auth_tokens_user ON _ichibase_auth_tokens (user_id, kind);
          CREATE TABLE _ichibase_email_verified (
            user_id TEXT PRIMARY KEY,
            email TEXT NOT NULL,
            verified_at INTEGER NOT NULL
          );",
}];

impl crate::modules::Module for AuthSafetyModule {
    fn name(&self) -> &'static str {
        "auth_safety"
    }
    fn section(&self) -> Option<&'static str> {
        Some("auth_safety")
    }
    fn migrations(&self) -> &'static [Migration] {
        MIGRATIONS
    }
    fn provide(&self, b: &mut AppBuilder) -> anyhow::Result<()> {
        let s: SafetySettings = b.core().config.section("auth_safety")?;
        let listen = b.core().config.listen.to_string();
        b.provide(Safety::new(s, listen)?);
        Ok(())
    }
    fn routes(&self) -> Router<App> {
        Router::new()
            .route("/auth/reset/request", post(reset_request))
            .route("/auth/reset", post(reset).get(reset_page))
            .route("/auth/verify/request", post(verify_request))
            .route("/auth/verify", post(verify).get(verify_page))
            .route("/auth/link", post(link).get(link_page))
            .layer(body_limit(BodyLimit::Json))
    }
    fn lua_components(&self) -> &'static [&'static dyn crate::lua::components::Component] {
        &[&super::lua::AuthLua]
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmailBody {
    email: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    token: String,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    device: Option<String>,
}

#[derive(Deserialize)]
struct TokenQuery {
    #[serde(default)]
    token: String,
}

fn err(e: Error) -> Response {
    error_response(&e, true, None)
}

async fn reset_request(State(app): State<App>, headers: HeaderMap, JsonBody(b): JsonBody<EmailBody>) -> Response {
    if b.email.len() > 254 || !b.email.contains('@') {
        return err(bad("email must look like name@domain"));
    }
    // Mail must be possible at all (the same for every email, so it reveals nothing).
    if let Some(n) = app.get::<crate::notify::Notify>()
        && let Err(e) = n.check_channel("email")
    {
        return err(e);
    }
    let base = match safety(&app) {
        Ok(s) => s.base_url(Some(&headers)),
        Err(e) => return err(e),
    };
    // The same answer at once for every email; the work happens after it.
    let app2 = app.clone();
    tokio::spawn(async move {
        match app2.auth().find_user(&b.email).await {
            Ok(Some(u)) if !u.disabled && u.email.eq_ignore_ascii_case(b.email.trim()) => {
                if let Err(e) = send_link(&app2, Kind::Reset, &u, &base).await {
                    tracing::warn!(error = %e, "queueing a password reset mail failed");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "password reset lookup failed"),
        }
    });
    axum::Json(json!({"status": "accepted", "message": RESET_ANSWER})).into_response()
}

async fn reset(
    State(app): State<App>,
    scope: RequestScope,
    headers: HeaderMap,
    JsonBody(b): JsonBody<TokenBody>,
) -> Response {
    let Some(pw) = b.password.as_deref() else {
        return err(bad("give the new password as \"password\""));
    };
    let auth = app.auth();
    let ua = user_agent(&headers);
    let r: Result<UserInfo> = async {
        let email = auth.peek_one_time(&[Kind::Reset, Kind::Invite], &b.token).await?;
        auth.check_new_password(pw, &email)?;
        let (_, uid, email) = auth.consume_one_time(&[Kind::Reset, Kind::Invite], &b.token).await?;
        let u = auth.find_user(&uid).await?.filter(|u| u.email.eq_ignore_ascii_case(&email)).ok_or_else(token_invalid)?;
        auth.set_password(&u.id, &u.email, pw).await?;
        auth.mark_email_verified(&u.id, &u.email).await?;
        auth.forgive(&u.email, scope.client());
        Ok(u)
    }
    .await;
    match r {
        Ok(u) => {
            audit(&app, SignInEvent { method: "reset", ok: true, reason: Some("password changed by reset link"), user_id: Some(&u.id), email: Some(&u.email), ip: scope.client(), user_agent: ua });
            axum::Json(json!({"status": "password_changed", "user_id": u.id, "sessions_revoked": true, "next": "sign in with POST /auth/signin"})).into_response()
        }
        Err(e) => {
            if e.code == ErrorCode::AuthTokenInvalid {
                audit(&app, SignInEvent { method: "reset", ok: false, reason: Some(&e.message), ip: scope.client(), user_agent: ua, ..Default::default() });
            }
            err(e)
        }
    }
}

async fn verify_request(State(app): State<App>, headers: HeaderMap, Caller(ctx): Caller) -> Response {
    let Some(uid) = ctx.user_id.clone() else {
        return err(Error::new(ErrorCode::AuthenticationFailed, "Sign in first: only a user's own email can be verified"));
    };
    let r: Result<Json> = async {
        if app.auth().email_verified(&uid).await? {
            return Ok(json!({"status": "verified"}));
        }
        let u = app.auth().find_user(&uid).await?.ok_or_else(|| Error::new(ErrorCode::NotFound, "No such user"))?;
        let base = safety(&app)?.base_url(Some(&headers));
        Ok(match send_link(&app, Kind::Verify, &u, &base).await? {
            Some(id) => json!({"status": "sent", "message_id": id}),
            None => json!({"status": "not_sent", "message": "Too many mails to this address in the last hour; try later"}),
        })
    }
    .await;
    crate::apis::reply(r)
}

async fn do_verify(app: &App, token: &str) -> Result<Json> {
    let auth = app.auth();
    let (_, uid, email) = auth.consume_one_time(&[Kind::Verify], token).await?;
    let u = auth.find_user(&uid).await?.filter(|u| u.email.eq_ignore_ascii_case(&email)).ok_or_else(token_invalid)?;
    auth.mark_email_verified(&u.id, &u.email).await?;
    Ok(json!({"status": "verified", "user_id": u.id, "email": u.email}))
}

async fn verify(State(app): State<App>, JsonBody(b): JsonBody<TokenBody>) -> Response {
    crate::apis::reply(do_verify(&app, &b.token).await)
}

async fn verify_page(State(app): State<App>, Query(q): Query<TokenQuery>) -> Response {
    match do_verify(&app, &q.token).await {
        Ok(_) => page("Email confirmed", "<p>Your email address is confirmed. You can close this page.</p>", ""),
        Err(e) => {
            let mut r = page("Link not valid", &format!("<p>{}</p>", esc(&e.message)), "");
            *r.status_mut() = axum::http::StatusCode::BAD_REQUEST;
            r
        }
    }
}

async fn link(
    State(app): State<App>,
    scope: RequestScope,
    headers: HeaderMap,
    JsonBody(b): JsonBody<TokenBody>,
) -> Response {
    let auth = app.auth();
    let ua = user_agent(&headers);
    let r: Result<Tokens> = async {
        let (_, uid, email) = auth.consume_one_time(&[Kind::Link], &b.token).await?;
        let u = auth.find_user(&uid).await?.filter(|u| u.email.eq_ignore_ascii_case(&email)).ok_or_else(token_invalid)?;
        auth.mark_email_verified(&u.id, &u.email).await?;
        auth.forgive(&u.email, scope.client());
        auth.sign_in_proven(u, b.device.clone().or_else(|| ua.map(str::to_string)), scope.client()).await
    }
    .await;
    match r {
        Ok(t) => {
            audit(&app, SignInEvent { method: "link", ok: true, user_id: Some(&t.user.id), email: Some(&t.user.email), ip: scope.client(), user_agent: ua, ..Default::default() });
            let mut resp = axum::Json(&t).into_response();
            if let Ok(v) = HeaderValue::from_str(&auth.cookie_header(&t.refresh_token)) {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
            resp
        }
        Err(e) => {
            audit(&app, SignInEvent { method: "link", ok: false, reason: Some(&e.message), ip: scope.client(), user_agent: ua, ..Default::default() });
            err(e)
        }
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

fn page(title: &str, body: &str, script: &str) -> Response {
    let mut r = Html(format!(
        "<!doctype html><meta charset=utf-8><meta name=viewport content=\"width=device-width\"><title>{t}</title>\
         <body style=\"font-family:system-ui;max-width:28em;margin:3em auto\"><h1>{t}</h1>{body}<script>{script}</script>",
        t = esc(title)
    ))
    .into_response();
    let h = r.headers_mut();
    h.insert("cache-control", HeaderValue::from_static("no-store"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    r
}

/// The token is used by a button (a POST), not by opening the page: mail scanners that fetch
/// links do not spend it.
async fn reset_page(Query(q): Query<TokenQuery>) -> Response {
    let tok = serde_json::to_string(&q.token).unwrap_or_default();
    page(
        "Choose a new password",
        "<form id=f><p><input id=p type=password autocomplete=new-password minlength=8 required placeholder=\"New password\" style=\"width:100%\"></p>\
         <p><button>Set password</button></p></form><p id=m></p>",
        &format!(
            "document.getElementById('f').onsubmit=async e=>{{e.preventDefault();\
             const r=await fetch('/auth/reset',{{method:'POST',headers:{{'content-type':'application/json'}},body:JSON.stringify({{token:{tok},password:document.getElementById('p').value}})}});\
             const j=await r.json();document.getElementById('m').textContent=r.ok?'Password changed: sign in with it now.':(j.error||j.message||'failed');}}"
        ),
    )
}

async fn link_page(Query(q): Query<TokenQuery>) -> Response {
    let tok = serde_json::to_string(&q.token).unwrap_or_default();
    page(
        "Sign in",
        "<p><button id=b>Sign in</button></p><p id=m></p>",
        &format!(
            "document.getElementById('b').onclick=async()=>{{\
             const r=await fetch('/auth/link',{{method:'POST',headers:{{'content-type':'application/json'}},body:JSON.stringify({{token:{tok}}})}});\
             const j=await r.json();if(r.ok){{location.href='/';}}else{{document.getElementById('m').textContent=j.error||j.message||'failed';}}}}"
        ),
    )
}
