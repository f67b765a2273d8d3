//! Identities, sessions, tokens and API keys: who a request runs as.
//!
//! Owns the engine tables `_ichibase_users`, `_ichibase_sessions`, `_ichibase_api_keys`, the JWT
//! key ring, and [`Auth::identify`], which turns request credentials into a [`RequestContext`].
//! What a role may do in SQL is not decided here but by the storage authorizer
//! (`storage::authz`) and the policies (`auth::policy`).
//!
//! Credentials, in the order they are looked at: `Authorization: Bearer <JWT | ik_ API key>`,
//! `Authorization: Basic`, `X-ClickHouse-User`/`X-ClickHouse-Key`, `user`/`password` URL
//! arguments (email + password, or an API key as the password), the `ichibase_session` cookie.
//! No credentials means the `anon` role; wrong, expired or revoked credentials are a 401, never
//! a silent fall-back to `anon`.
//!
//! Revocation takes effect at once: revoked sessions, disabled users and API keys are held in
//! memory (loaded at start, updated by every change made through this process).

pub mod devices;
pub mod guard;
pub mod jwt;
pub mod lua;
pub mod oidc;
pub mod passkeys;
pub mod policy;
pub mod revocation;
pub mod safety;
pub mod secrets;
pub mod tls;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use base64::Engine;
use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use serde_json::{Map, Value as Json, json};

use crate::core::{Error, ErrorCode, RequestContext, Result, Role};
use crate::storage::{ExecControl, Storage};
use jwt::{Claims, KeyRing, now};
use secrets::{dummy_hash, hash_password, hash_secret, random_token, verify_password};

/// Name of the browser session cookie.
pub const COOKIE: &str = "ichibase_session";

/// Auth settings from [`crate::config::Config`].
#[derive(Debug, Clone)]
pub struct AuthOptions {
    pub signup_open: bool,
    pub access_ttl: Duration,
    pub session_ttl: Duration,
    /// Secure attribute on the session cookie (set behind HTTPS).
    pub cookie_secure: bool,
    /// An API key with the admin role, ensured at start (`ICHIBASE_ADMIN_KEY`).
    pub admin_key: Option<String>,
    /// An admin user ensured at start (`ICHIBASE_ADMIN_EMAIL` + `ICHIBASE_ADMIN_PASSWORD`).
    pub admin_user: Option<(String, String)>,
    /// Sign-in back-off, the hashing pool and the password rule (`[auth_guard]`).
    pub guard: guard::AuthGuardSettings,
}

#[derive(Debug, Clone)]
struct KeyInfo {
    id: String,
    role: String,
    user_id: Option<String>,
    name: String,
}

#[derive(Default)]
struct Cache {
    revoked_sessions: HashSet<String>,
    disabled_users: HashSet<String>,
    /// key hash -> key
    api_keys: HashMap<String, KeyInfo>,
    /// sha256(email NUL password) -> (user id, role, email, verified at): spares argon2 on
    /// every request of clients that send a password each time (ClickHouse clients).
    passwords: HashMap<String, (String, String, String, Instant)>,
    /// `auth_version` of the database when this cache was loaded.
    version: String,
}

const PASSWORD_CACHE_TTL: Duration = Duration::from_secs(60);

/// What sign-in, sign-up and refresh return.
#[derive(Debug, Clone, Serialize)]
pub struct Tokens {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
    pub refresh_token: String,
    pub session_id: String,
    /// The device the session belongs to (`GET /auth/devices`).
    pub device_id: String,
    pub user: UserInfo,
}

#[derive(Debug, Clone, Serialize)]
pub struct UserInfo {
    pub id: String,
    pub email: String,
    pub role: String,
    pub created_at: String,
    pub disabled: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    pub id: String,
    pub device: Option<String>,
    pub created_at: String,
    pub last_used_at: Option<String>,
    /// RFC 3339 UTC, like every timestamp the APIs answer (stored as epoch seconds).
    pub expires_at: String,
    pub current: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiKeyInfo {
    pub id: String,
    pub name: String,
    pub role: String,
    pub user_id: Option<String>,
    pub created_at: String,
    pub revoked: bool,
}

/// Epoch seconds as the APIs' timestamp convention: RFC 3339 UTC with milliseconds, the form
/// SQLite's `strftime('%Y-%m-%dT%H:%M:%fZ')` gives every `created_at`.
fn rfc3339(epoch: i64) -> String {
    chrono::DateTime::from_timestamp(epoch, 0)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default()
}

pub struct Auth {
    storage: Storage,
    keys: RwLock<KeyRing>,
    cache: RwLock<Cache>,
    opts: AuthOptions,
    /// Wakes long-lived connections (WebSockets) when a credential is revoked.
    pub revocations: revocation::Revocations,
    guard: guard::Guard,
    hashes: guard::HashPool,
}

fn auth_failed(msg: impl Into<String>) -> Error {
    Error::new(ErrorCode::AuthenticationFailed, msg)
}

fn validate_email(email: &str) -> Result<String> {
    let e = email.trim();
    if e.len() > 254
        || !e.contains('@')
        || e.starts_with('@')
        || e.ends_with('@')
        || e.chars().any(char::is_whitespace)
    {
        return Err(Error::new(
            ErrorCode::BadArguments,
            "email must look like name@domain",
        ));
    }
    Ok(e.to_string())
}

/// What sign-up answers, whether or not the email had an account (which it must not reveal).
pub const SIGNUP_ANSWER: &str = "If this email address had no account, one was created with this password: sign in with POST /auth/signin. An existing account is left unchanged.";

fn validate_role(r: &str) -> Result<String> {
    let r = r.trim();
    if r.is_empty()
        || r.len() > 64
        || !r
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(Error::new(
            ErrorCode::BadArguments,
            "role names are 1-64 characters of letters, digits, '_' and '-'",
        ));
    }
    if r == "anon" {
        return Err(Error::new(
            ErrorCode::BadArguments,
            "'anon' is the role of unauthenticated requests; it cannot be given to a user or key",
        ));
    }
    Ok(r.to_string())
}

impl Auth {
    /// Open the key ring in `data_dir`, load the revocation state and ensure the bootstrap admin.
    pub async fn open(
        storage: Storage,
        data_dir: &Path,
        opts: AuthOptions,
    ) -> anyhow::Result<Auth> {
        let keys = KeyRing::open(&data_dir.join("jwt-keys.json"))?
            .with_verified_max(opts.guard.verified_tokens_max);
        opts.guard.validate()?;
        let auth = Auth {
            storage,
            keys: RwLock::new(keys),
            cache: RwLock::new(Cache::default()),
            guard: guard::Guard::new(opts.guard.clone()),
            hashes: guard::HashPool::new(opts.guard.workers(), opts.guard.hash_queue),
            opts,
            revocations: Default::default(),
        };
        auth.reload_cache().await?;
        if let Some(key) = auth.opts.admin_key.clone() {
            anyhow::ensure!(
                key.starts_with("ik_") && key.len() >= 24,
                "ICHIBASE_ADMIN_KEY must start with 'ik_' and be at least 24 characters"
            );
            if let Some(why) = crate::config::key_weakness(&key) {
                anyhow::bail!("ICHIBASE_ADMIN_KEY is too easy to guess: {why}. {}", crate::config::KEY_ADVICE);
            }
            auth.ensure_key("bootstrap admin key", &key, "admin")
                .await?;
        }
        if let Some((email, password)) = auth.opts.admin_user.clone() {
            match auth.create_user(&email, &password, "admin").await {
                Ok(u) => tracing::info!(email = %u.email, "bootstrap admin user created"),
                Err(e) if e.code == ErrorCode::ConstraintViolation => {}
                Err(e) => anyhow::bail!("creating the bootstrap admin: {e}"),
            }
        }
        Ok(auth)
    }

    /// On a fresh data directory nobody could administer the server: create an admin API key
    /// and return it (to be shown once). `None` when an admin user or key exists.
    pub async fn first_start_admin_key(&self) -> Result<Option<String>> {
        let admins: i64 = self
            .sys_read(|c| {
                Ok(c.query_row(
                    "SELECT (SELECT count(*) FROM _ichibase_users WHERE role = 'admin' AND disabled_at IS NULL)
                          + (SELECT count(*) FROM _ichibase_api_keys WHERE role = 'admin' AND revoked_at IS NULL)",
                    [],
                    |r| r.get(0),
                )?)
            })
            .await?;
        if admins > 0 {
            return Ok(None);
        }
        let (_, key) = self
            .create_api_key("first-start admin key", "admin", None)
            .await?;
        Ok(Some(key))
    }

    async fn sys_read<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&rusqlite::Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        self.storage
            .read(&RequestContext::system(), ExecControl::lookup(), f)
            .await
    }

    async fn sys_write<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&mut rusqlite::Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        self.storage
            .write(
                &RequestContext::system(),
                ExecControl::new(Instant::now(), 0.0),
                f,
            )
            .await
    }

    /// Keep the cache in step with credential changes made outside this process (the CLI's
    /// `admin create-key`, a second tool on the same database): triggers bump `auth_version`
    /// on every change of keys, revocations, disabled users, passwords and roles; this task
    /// polls it every `every` and reloads, closing sockets whose credentials went away.
    pub fn watch(self: &Arc<Self>, every: std::time::Duration) -> tokio::task::JoinHandle<()> {
        let me = Arc::downgrade(self);
        let ring_path = self.keys.read().unwrap().path().to_path_buf();
        let modified = move || std::fs::metadata(&ring_path).and_then(|m| m.modified()).ok();
        tokio::spawn(async move {
            let mut ring_seen = modified();
            loop {
                tokio::time::sleep(every).await;
                let Some(auth) = me.upgrade() else { return };
                // A signing key rotated by the CLI (`admin rotate-jwt-key`): sign with it now.
                let ring_now = modified();
                if ring_now != ring_seen {
                    ring_seen = ring_now;
                    let path = auth.keys.read().unwrap().path().to_path_buf();
                    match jwt::KeyRing::open(&path) {
                        Ok(ring) => {
                            *auth.keys.write().unwrap() =
                                ring.with_verified_max(auth.opts.guard.verified_tokens_max)
                        }
                        Err(e) => tracing::warn!(error = %e, "reloading the JWT key ring failed"),
                    }
                }
                let v = auth
                    .sys_read(|c| {
                        Ok(c.query_row(
                            "SELECT value FROM _ichibase_meta WHERE key = 'auth_version'",
                            [],
                            |r| r.get::<_, String>(0),
                        )?)
                    })
                    .await;
                let Ok(v) = v else { continue };
                if auth.cache.read().unwrap().version != v {
                    match auth.reload_cache().await {
                        Ok(()) => auth.revocations.changed(),
                        Err(e) => tracing::warn!(error = %e, "reloading credentials failed"),
                    }
                }
            }
        })
    }

    async fn reload_cache(&self) -> Result<()> {
        let t = now() as i64;
        let (revoked, disabled, keys, version) = self
            .sys_read(move |c| {
                // Read in the same snapshot as what it versions.
                let version: String = c
                    .query_row(
                        "SELECT coalesce((SELECT value FROM _ichibase_meta WHERE key = 'auth_version'), '')",
                        [],
                        |r| r.get(0),
                    )?;
                let revoked: HashSet<String> = c
                    .prepare("SELECT id FROM _ichibase_sessions WHERE revoked_at IS NOT NULL AND expires_at > ?1")?
                    .query_map([t], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                let disabled: HashSet<String> = c
                    .prepare("SELECT id FROM _ichibase_users WHERE disabled_at IS NOT NULL")?
                    .query_map([], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                let keys: HashMap<String, KeyInfo> = c
                    .prepare("SELECT key_hash, id, role, user_id, name FROM _ichibase_api_keys WHERE revoked_at IS NULL")?
                    .query_map([], |r| Ok((r.get(0)?, KeyInfo { id: r.get(1)?, role: r.get(2)?, user_id: r.get(3)?, name: r.get(4)? })))?
                    .collect::<rusqlite::Result<_>>()?;
                Ok((revoked, disabled, keys, version))
            })
            .await?;
        let mut c = self.cache.write().unwrap();
        c.version = version;
        c.revoked_sessions = revoked;
        c.disabled_users = disabled;
        c.api_keys = keys;
        c.passwords.clear();
        Ok(())
    }

    // ----- identity -----

    /// Whether a context authenticated at revocation generation `since` (see
    /// [`revocation::Revocations::generation`]) is still valid: its session not revoked, its
    /// user not disabled, its API key not revoked, its password-credentials not changed since.
    pub fn still_valid(&self, ctx: &RequestContext, since: u64) -> Result<()> {
        let key_id = ctx
            .claims
            .as_ref()
            .and_then(|c| c.get("key_id"))
            .and_then(Json::as_str);
        {
            let c = self.cache.read().unwrap();
            if ctx
                .session_id
                .as_ref()
                .is_some_and(|s| c.revoked_sessions.contains(s))
            {
                return Err(auth_failed(
                    "Session was revoked (signed out); sign in again",
                ));
            }
            if ctx
                .user_id
                .as_ref()
                .is_some_and(|u| c.disabled_users.contains(u))
            {
                return Err(auth_failed("User is disabled"));
            }
            if key_id.is_some_and(|k| !c.api_keys.values().any(|i| i.id == k)) {
                return Err(auth_failed("The API key was revoked"));
            }
        }
        if let (None, None, Some(uid)) = (&ctx.session_id, key_id, &ctx.user_id) {
            if self.revocations.user_changed_since(uid, since) {
                return Err(auth_failed("The user's credentials changed; sign in again"));
            }
        }
        Ok(())
    }

    /// Turn the credentials of a request into its context. `url_user`/`url_password` are the
    /// ClickHouse-style `user`/`password` URL arguments; `client` is the client's address, for
    /// the sign-in back-off of password credentials. (HTTP handlers identify through
    /// `apis::context`, which also notes the identity for the request's log row.)
    pub fn identify(
        &self,
        headers: &HeaderMap,
        url_user: Option<&str>,
        url_password: Option<&str>,
        query_id: Option<String>,
        client: Option<IpAddr>,
    ) -> Result<RequestContext> {
        let mut ctx = RequestContext::anon(query_id);
        let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
        if let Some(authz) = header("authorization") {
            let (scheme, value) = authz.split_once(' ').unwrap_or((authz, ""));
            let value = value.trim();
            if scheme.eq_ignore_ascii_case("bearer") {
                if value.starts_with("ik_") {
                    self.apply_api_key(&mut ctx, value)?;
                } else {
                    self.apply_jwt(&mut ctx, value)?;
                }
                return Ok(ctx);
            }
            if scheme.eq_ignore_ascii_case("basic") {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(value)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| auth_failed("Malformed Basic credentials"))?;
                let (user, pass) = raw.split_once(':').unwrap_or((raw.as_str(), ""));
                // An Authorization header that names nobody is a client bug or a probe, not a
                // request for anonymous access (send no header for that).
                if user.trim().is_empty() {
                    return Err(auth_failed("Empty Basic credentials: send a user name (or no Authorization header to run as anon)"));
                }
                self.apply_user_password(&mut ctx, user, pass, client)?;
                return Ok(ctx);
            }
            return Err(auth_failed(format!(
                "Unsupported Authorization scheme '{scheme}': use Bearer or Basic"
            )));
        }
        if header("x-clickhouse-user").is_some() || header("x-clickhouse-key").is_some() {
            self.apply_user_password(
                &mut ctx,
                header("x-clickhouse-user").unwrap_or(""),
                header("x-clickhouse-key").unwrap_or(""),
                client,
            )?;
            return Ok(ctx);
        }
        if url_user.is_some() || url_password.is_some() {
            self.apply_user_password(
                &mut ctx,
                url_user.unwrap_or(""),
                url_password.unwrap_or(""),
                client,
            )?;
            return Ok(ctx);
        }
        if let Some(cookie) = cookie_value(headers, COOKIE) {
            self.apply_session_cookie(&mut ctx, &cookie)?;
        }
        Ok(ctx)
    }

    fn set_user(
        &self,
        ctx: &mut RequestContext,
        user_id: String,
        role: String,
        email: Option<String>,
        sid: Option<String>,
        extra: Map<String, Json>,
    ) {
        let mut claims = extra;
        claims.insert("sub".into(), Json::String(user_id.clone()));
        claims.insert("role".into(), Json::String(role.clone()));
        if let Some(e) = &email {
            claims.insert("email".into(), Json::String(e.clone()));
        }
        if let Some(s) = &sid {
            claims.insert("sid".into(), Json::String(s.clone()));
        }
        ctx.user_id = Some(user_id);
        ctx.role = Role::from_name(&role);
        ctx.session_id = sid;
        ctx.claims = Some(Arc::new(claims));
    }

    fn apply_jwt(&self, ctx: &mut RequestContext, token: &str) -> Result<()> {
        let claims = self.keys.read().unwrap().verify(token)?;
        {
            let c = self.cache.read().unwrap();
            if c.revoked_sessions.contains(&claims.sid) {
                return Err(auth_failed(
                    "Session was revoked (signed out); sign in again",
                ));
            }
            if c.disabled_users.contains(&claims.sub) {
                return Err(auth_failed("User is disabled"));
            }
        }
        let mut extra = Map::new();
        extra.insert("iat".into(), json!(claims.iat));
        extra.insert("exp".into(), json!(claims.exp));
        if let Some(did) = &claims.did {
            extra.insert("device_id".into(), json!(did));
        }
        self.set_user(
            ctx,
            claims.sub,
            claims.role,
            claims.email,
            Some(claims.sid),
            extra,
        );
        Ok(())
    }

    fn apply_api_key(&self, ctx: &mut RequestContext, key: &str) -> Result<()> {
        let info = self
            .cache
            .read()
            .unwrap()
            .api_keys
            .get(&hash_secret(key))
            .cloned()
            .ok_or_else(|| auth_failed("Unknown or revoked API key"))?;
        if info
            .user_id
            .as_ref()
            .is_some_and(|u| self.cache.read().unwrap().disabled_users.contains(u))
        {
            return Err(auth_failed("The API key's user is disabled"));
        }
        let mut extra = Map::new();
        extra.insert("key_id".into(), Json::String(info.id.clone()));
        extra.insert("key_name".into(), Json::String(info.name.clone()));
        match info.user_id {
            Some(uid) => self.set_user(ctx, uid, info.role, None, None, extra),
            None => {
                extra.insert("role".into(), Json::String(info.role.clone()));
                ctx.role = Role::from_name(&info.role);
                ctx.claims = Some(Arc::new(extra));
            }
        }
        Ok(())
    }

    fn apply_user_password(
        &self,
        ctx: &mut RequestContext,
        user: &str,
        pass: &str,
        client: Option<IpAddr>,
    ) -> Result<()> {
        if pass.starts_with("ik_") && (user.is_empty() || user == "default" || user == "apikey") {
            return self.apply_api_key(ctx, pass);
        }
        if (user.is_empty() || user == "default") && pass.is_empty() {
            return Ok(()); // ClickHouse clients' default user without a password: anonymous.
        }
        // Back-off before anything else: a locked account or address gets no answer about its
        // password, not even from the cache.
        let ticket = self.guard.admit(user, client)?;
        let cache_key = hash_secret(&format!("{}\0{pass}", user.to_ascii_lowercase()));
        let hit = self
            .cache
            .read()
            .unwrap()
            .passwords
            .get(&cache_key)
            .filter(|e| e.3.elapsed() < PASSWORD_CACHE_TTL)
            .cloned();
        let (uid, role, email) = match hit {
            Some((u, r, e, _)) => {
                ticket.finish(true);
                (u, r, e)
            }
            None => {
                let found = blocking(|| self.storage_lookup_user(user))?;
                let hash = found.as_ref().map(|f| f.1.clone());
                let pw = pass.to_string();
                let matches = self.hashes.run_blocking(move || check_password(&pw, hash.as_deref()))?;
                ticket.finish(matches);
                let ok = matches && found.as_ref().is_some_and(|f| !f.4);
                let Some((uid, _, role, email, _, _)) = found.filter(|_| ok) else {
                    return Err(auth_failed("Wrong email or password"));
                };
                self.cache.write().unwrap().passwords.insert(
                    cache_key,
                    (uid.clone(), role.clone(), email.clone(), Instant::now()),
                );
                (uid, role, email)
            }
        };
        if self.cache.read().unwrap().disabled_users.contains(&uid) {
            return Err(auth_failed("User is disabled"));
        }
        self.set_user(ctx, uid, role, Some(email), None, Map::new());
        Ok(())
    }

    /// Synchronous user lookup on its own read-only connection (credential checks happen before
    /// a request has a pooled connection).
    fn storage_lookup_user(
        &self,
        email: &str,
    ) -> Result<Option<(String, String, String, String, bool, String)>> {
        let c = rusqlite::Connection::open_with_flags(
            self.storage.path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?;
        c.busy_timeout(Duration::from_secs(5))?;
        Ok(c.query_row(
            "SELECT id, password_hash, role, email, disabled_at IS NOT NULL, created_at FROM _ichibase_users WHERE email = ?1",
            [email.trim()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
        )
        .optional()?)
    }

    fn apply_session_cookie(&self, ctx: &mut RequestContext, cookie: &str) -> Result<()> {
        blocking(|| self.apply_session_cookie_inner(ctx, cookie))
    }

    fn apply_session_cookie_inner(&self, ctx: &mut RequestContext, cookie: &str) -> Result<()> {
        let (sid, secret) =
            parse_refresh(cookie).ok_or_else(|| auth_failed("Malformed session cookie"))?;
        if self.cache.read().unwrap().revoked_sessions.contains(sid) {
            return Err(auth_failed(
                "Session was revoked (signed out); sign in again",
            ));
        }
        let c = rusqlite::Connection::open_with_flags(
            self.storage.path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?;
        c.busy_timeout(Duration::from_secs(5))?;
        let row: Option<(String, String, String, String, i64, bool, Option<String>)> = c
            .query_row(
                "SELECT s.user_id, s.secret_hash, u.role, u.email, s.expires_at, s.revoked_at IS NOT NULL OR u.disabled_at IS NOT NULL, s.device_id
                 FROM _ichibase_sessions s JOIN _ichibase_users u ON u.id = s.user_id WHERE s.id = ?1",
                [sid],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
            )
            .optional()?;
        let Some((uid, hash, role, email, expires, dead, device_id)) = row else {
            return Err(auth_failed("Unknown session"));
        };
        if hash != hash_secret(secret) || dead || expires <= now() as i64 {
            return Err(auth_failed("Session expired or revoked; sign in again"));
        }
        let mut extra = Map::new();
        if let Some(did) = device_id {
            extra.insert("device_id".into(), Json::String(did));
        }
        self.set_user(ctx, uid, role, Some(email), Some(sid.to_string()), extra);
        Ok(())
    }

    /// The client address of a connection from `peer` (see `[auth_guard] trusted_proxies`).
    pub fn client_ip(&self, peer: std::net::IpAddr, headers: &HeaderMap) -> std::net::IpAddr {
        let xff = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
        guard::client_ip(peer, xff, &self.guard.settings().trusted_proxies)
    }

    // ----- sign-up, sign-in, sessions -----

    /// The password rule of `[auth_guard]` (length, variety, common passwords, not the email).
    fn validate_password(&self, password: &str, email: &str) -> Result<()> {
        match guard::password_problem(password, email, self.guard.settings().min_password_length) {
            Some(why) => Err(Error::new(ErrorCode::BadArguments, why)),
            None => Ok(()),
        }
    }

    pub fn signup_open(&self) -> bool {
        self.opts.signup_open
    }

    pub fn cookie_header(&self, refresh_token: &str) -> String {
        format!(
            "{COOKIE}={refresh_token}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}{}",
            self.opts.session_ttl.as_secs(),
            if self.opts.cookie_secure {
                "; Secure"
            } else {
                ""
            }
        )
    }

    /// Whether cookies are marked Secure (`cookie_secure`, or serving HTTPS).
    pub fn cookie_secure(&self) -> bool {
        self.opts.cookie_secure
    }

    pub fn clear_cookie_header(&self) -> String {
        format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0")
    }

    /// Create a `user` account if the email has none. The answer is the same either way (and
    /// takes the same work: the password is hashed in both cases), so sign-up does not tell
    /// who has an account; the client signs in next. With a mailer, the existing-account case
    /// would mail the owner instead; there is none yet.
    pub async fn signup(&self, email: &str, password: &str) -> Result<&'static str> {
        if !self.opts.signup_open {
            return Err(Error::new(
                ErrorCode::AccessDenied,
                "Sign-up is closed on this server; ask an admin for an account",
            ));
        }
        match self.create_user(email, password, "user").await {
            Ok(_) => Ok(SIGNUP_ANSWER),
            Err(e) if e.code == ErrorCode::ConstraintViolation => Ok(SIGNUP_ANSWER),
            Err(e) => Err(e),
        }
    }

    pub async fn signin(
        &self,
        email: &str,
        password: &str,
        device: Option<String>,
        client: Option<IpAddr>,
    ) -> Result<Tokens> {
        self.signin_on(email, password, devices::SessionDevice::named(device), client).await
    }

    /// [`Auth::signin`] on the device `dev` describes (see [`Auth::start_session_on`]).
    pub async fn signin_on(
        &self,
        email: &str,
        password: &str,
        dev: devices::SessionDevice,
        client: Option<IpAddr>,
    ) -> Result<Tokens> {
        let ticket = self.guard.admit(email, client)?;
        let found = blocking(|| self.storage_lookup_user(email))?;
        let hash = found.as_ref().map(|f| f.1.clone());
        let pw = password.to_string();
        let ok = self.hashes.run(move || check_password(&pw, hash.as_deref())).await?;
        ticket.finish(ok);
        let Some((id, _, role, email, disabled, created_at)) = found.filter(|_| ok) else {
            return Err(auth_failed("Wrong email or password"));
        };
        if disabled {
            return Err(auth_failed("User is disabled"));
        }
        let user = UserInfo {
            id,
            email,
            role,
            created_at,
            disabled,
        };
        let dev = devices::SessionDevice { ip: dev.ip.or(client), ..dev };
        self.start_session_on(user, dev).await
    }

    /// Start a session for a user who proved who they are by other means than a password
    /// (the one-time link `ichibase open` prints): the same session and tokens `signin` gives.
    pub async fn signin_verified(&self, email: &str, device: Option<String>) -> Result<Tokens> {
        let found = blocking(|| self.storage_lookup_user(email))?;
        let Some((id, _, role, email, disabled, created_at)) = found else {
            return Err(auth_failed("No such user"));
        };
        if disabled {
            return Err(auth_failed("User is disabled"));
        }
        let user = UserInfo {
            id,
            email,
            role,
            created_at,
            disabled,
        };
        self.start_session(user, device).await
    }

    /// Start a session for `user` (already authenticated by the caller) named `device`; a new
    /// device. [`Auth::start_session_on`] joins a known device and records its user agent and
    /// address.
    pub async fn start_session(&self, user: UserInfo, device: Option<String>) -> Result<Tokens> {
        self.start_session_on(user, devices::SessionDevice::named(device)).await
    }

    /// Start a session for `user` (already authenticated by the caller) on the device `dev`
    /// describes (the device it names when that is a live device of `user`, else a new one).
    pub async fn start_session_on(&self, user: UserInfo, dev: devices::SessionDevice) -> Result<Tokens> {
        let sid = uuid::Uuid::new_v4().to_string();
        let secret = random_token(32);
        let expires = now() as i64 + self.opts.session_ttl.as_secs() as i64;
        let (sid2, uid, hash) = (sid.clone(), user.id.clone(), hash_secret(&secret));
        let label = dev
            .name
            .clone()
            .or_else(|| dev.user_agent.clone())
            .map(|d| d.chars().take(200).collect::<String>());
        let device_id = self
            .sys_write(move |c| {
                let device_id = devices::attach(c, &uid, &dev)?;
                c.execute(
                    "INSERT INTO _ichibase_sessions (id, user_id, secret_hash, device, expires_at, device_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![sid2, uid, hash, label, expires, device_id],
                )?;
                Ok(device_id)
            })
            .await?;
        self.issue(user, sid, secret, device_id)
    }

    fn issue(&self, user: UserInfo, sid: String, secret: String, device_id: String) -> Result<Tokens> {
        let iat = now();
        let claims = Claims {
            sub: user.id.clone(),
            role: user.role.clone(),
            sid: sid.clone(),
            did: Some(device_id.clone()),
            email: Some(user.email.clone()),
            iat,
            exp: iat + self.opts.access_ttl.as_secs(),
            iss: "ichibase".into(),
        };
        let access_token = self.keys.read().unwrap().sign(&claims)?;
        Ok(Tokens {
            access_token,
            token_type: "Bearer",
            expires_in: self.opts.access_ttl.as_secs(),
            refresh_token: format!("ir_{sid}.{secret}"),
            session_id: sid,
            device_id,
            user,
        })
    }

    /// Exchange a refresh token for a new access token; the refresh token rotates (the old one
    /// stops working).
    pub async fn refresh(&self, refresh_token: &str) -> Result<Tokens> {
        self.refresh_from(refresh_token, None).await
    }

    /// [`Auth::refresh`] from `client` (noted as the device's last address).
    pub async fn refresh_from(&self, refresh_token: &str, client: Option<IpAddr>) -> Result<Tokens> {
        let (sid, secret) =
            parse_refresh(refresh_token).ok_or_else(|| auth_failed("Malformed refresh token"))?;
        let (sid, old_hash) = (sid.to_string(), hash_secret(secret));
        let new_secret = random_token(32);
        let new_hash = hash_secret(&new_secret);
        let t = now() as i64;
        let spent_ttl = self.opts.session_ttl.as_secs() as i64;
        let sid2 = sid.clone();
        let outcome = self
            .sys_write(move |c| {
                let row: Option<(String, String, String, String, Option<String>)> = c
                    .query_row(
                        "SELECT u.id, u.email, u.role, u.created_at, s.device_id FROM _ichibase_sessions s JOIN _ichibase_users u ON u.id = s.user_id
                         WHERE s.id = ?1 AND s.secret_hash = ?2 AND s.revoked_at IS NULL AND s.expires_at > ?3 AND u.disabled_at IS NULL",
                        params![sid2, old_hash, t],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                    )
                    .optional()?;
                let Some((id, email, role, created_at, device_id)) = row else {
                    // A token this session already rotated away from: it was copied, and
                    // either copy may be the thief's. End the session for both.
                    let reused: bool = c.query_row(
                        "SELECT EXISTS (SELECT 1 FROM _ichibase_refresh_spent WHERE secret_hash = ?1 AND session_id = ?2)",
                        params![old_hash, sid2],
                        |r| r.get(0),
                    )?;
                    if reused {
                        c.execute(
                            "UPDATE _ichibase_sessions SET revoked_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?1 AND revoked_at IS NULL",
                            [&sid2],
                        )?;
                    }
                    return Ok(Err(reused));
                };
                c.execute(
                    "UPDATE _ichibase_sessions SET secret_hash = ?1, last_used_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?2",
                    params![new_hash, sid2],
                )?;
                // Remember the spent secret (for reuse detection) as long as a session lives.
                c.execute(
                    "INSERT OR IGNORE INTO _ichibase_refresh_spent (secret_hash, session_id, spent_at) VALUES (?1, ?2, ?3)",
                    params![old_hash, sid2, t],
                )?;
                c.execute("DELETE FROM _ichibase_refresh_spent WHERE spent_at < ?1", [t - spent_ttl])?;
                devices::touch(c, &sid2, client)?;
                Ok(Ok((UserInfo { id, email, role, created_at, disabled: false }, device_id.unwrap_or_default())))
            })
            .await?;
        match outcome {
            Ok((user, device_id)) => self.issue(user, sid, new_secret, device_id),
            Err(true) => {
                self.cache.write().unwrap().revoked_sessions.insert(sid.clone());
                // Sockets on that session close at once.
                self.revocations.changed();
                tracing::warn!(session = %sid, "refresh token reuse: the session is revoked");
                Err(auth_failed(
                    "Refresh token reuse detected: this token was used already, so its session is revoked; sign in again",
                ))
            }
            Err(false) => Err(auth_failed("Refresh token is invalid, used already, expired or revoked")),
        }
    }

    /// Revoke one session (at once: tokens carrying it stop working on their next request).
    pub async fn revoke_session(&self, who: &RequestContext, sid: &str) -> Result<()> {
        let uid = who
            .user_id
            .clone()
            .ok_or_else(|| auth_failed("Sign in first"))?;
        let (sid2, admin) = (sid.to_string(), who.is_admin());
        let n = self
            .sys_write(move |c| {
                Ok(c.execute(
                    "UPDATE _ichibase_sessions SET revoked_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                     WHERE id = ?1 AND (user_id = ?2 OR ?3) AND revoked_at IS NULL",
                    params![sid2, uid, admin],
                )?)
            })
            .await?;
        if n == 0 {
            return Err(Error::new(
                ErrorCode::NotFound,
                format!("No active session {sid} of yours"),
            ));
        }
        self.cache
            .write()
            .unwrap()
            .revoked_sessions
            .insert(sid.to_string());
        self.revocations.changed();
        Ok(())
    }

    async fn revoke_user_sessions(&self, uid: &str, except: Option<String>) -> Result<()> {
        let uid2 = uid.to_string();
        let ids: Vec<String> = self
            .sys_write(move |c| {
                let ids: Vec<String> = c
                    .prepare("SELECT id FROM _ichibase_sessions WHERE user_id = ?1 AND revoked_at IS NULL AND id IS NOT ?2")?
                    .query_map(params![uid2, except], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                c.execute(
                    "UPDATE _ichibase_sessions SET revoked_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE user_id = ?1 AND revoked_at IS NULL AND id IS NOT ?2",
                    params![uid2, except],
                )?;
                Ok(ids)
            })
            .await?;
        let mut c = self.cache.write().unwrap();
        c.revoked_sessions.extend(ids);
        c.passwords.retain(|_, v| v.0 != uid);
        drop(c);
        self.revocations.user_changed(uid);
        Ok(())
    }

    pub async fn sessions(&self, who: &RequestContext) -> Result<Vec<SessionInfo>> {
        let uid = who
            .user_id
            .clone()
            .ok_or_else(|| auth_failed("Sign in first"))?;
        let current = who.session_id.clone();
        let t = now() as i64;
        self.sys_read(move |c| {
            let rows = c
                .prepare(
                    "SELECT id, device, created_at, last_used_at, expires_at FROM _ichibase_sessions
                     WHERE user_id = ?1 AND revoked_at IS NULL AND expires_at > ?2 ORDER BY created_at",
                )?
                .query_map(params![uid, t], |r| {
                    let id: String = r.get(0)?;
                    Ok(SessionInfo {
                        current: current.as_deref() == Some(id.as_str()),
                        id,
                        device: r.get(1)?,
                        created_at: r.get(2)?,
                        last_used_at: r.get(3)?,
                        expires_at: rfc3339(r.get(4)?),
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
        .await
    }

    /// Change a password; every other session of the user is revoked.
    pub async fn change_password(
        &self,
        who: &RequestContext,
        old: &str,
        new: &str,
        client: Option<IpAddr>,
    ) -> Result<()> {
        let uid = who
            .user_id
            .clone()
            .ok_or_else(|| auth_failed("Sign in first"))?;
        let uid2 = uid.clone();
        let row: Option<(String, String)> = self
            .sys_read(move |c| {
                Ok(c.query_row(
                    "SELECT password_hash, email FROM _ichibase_users WHERE id = ?1",
                    [uid2],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?)
            })
            .await?;
        let Some((hash, email)) = row else {
            return Err(auth_failed("The current password is wrong"));
        };
        self.validate_password(new, &email)?;
        let ticket = self.guard.admit(&email, client)?;
        let old = old.to_string();
        let ok = self.hashes.run(move || check_password(&old, Some(&hash))).await?;
        ticket.finish(ok);
        if !ok {
            return Err(auth_failed("The current password is wrong"));
        }
        let new = new.to_string();
        let new_hash = self.hashes.run(move || hash_password(&new)).await??;
        let uid2 = uid.clone();
        self.sys_write(move |c| {
            c.execute(
                "UPDATE _ichibase_users SET password_hash = ?1 WHERE id = ?2",
                params![new_hash, uid2],
            )?;
            Ok(())
        })
        .await?;
        self.revoke_user_sessions(&uid, who.session_id.clone())
            .await
    }

    pub async fn me(&self, who: &RequestContext) -> Result<Json> {
        Ok(json!({
            "user_id": who.user_id,
            "role": who.role.as_str(),
            "session_id": who.session_id,
            "claims": who.claims.as_deref(),
        }))
    }

    // ----- admin -----

    pub async fn create_user(&self, email: &str, password: &str, role: &str) -> Result<UserInfo> {
        let email = validate_email(email)?;
        self.validate_password(password, &email)?;
        let role = if role == "admin" {
            role.to_string()
        } else {
            validate_role(role)?
        };
        let pw = password.to_string();
        let hash = self.hashes.run(move || hash_password(&pw)).await??;
        let id = uuid::Uuid::new_v4().to_string();
        let (id2, email2, role2) = (id.clone(), email.clone(), role.clone());
        let created_at = self
            .sys_write(move |c| {
                c.execute("INSERT INTO _ichibase_users (id, email, password_hash, role) VALUES (?1, ?2, ?3, ?4)", params![id2, email2, hash, role2])
                    .map_err(|e| {
                        let e = Error::from(e);
                        if e.code == ErrorCode::ConstraintViolation { Error::new(ErrorCode::ConstraintViolation, "A user with this email exists already") } else { e }
                    })?;
                Ok(c.query_row("SELECT created_at FROM _ichibase_users WHERE id = ?1", [id2], |r| r.get::<_, String>(0))?)
            })
            .await?;
        Ok(UserInfo {
            id,
            email,
            role,
            created_at,
            disabled: false,
        })
    }

    pub async fn list_users(&self) -> Result<Vec<UserInfo>> {
        self.sys_read(|c| {
            Ok(c.prepare("SELECT id, email, role, created_at, disabled_at IS NOT NULL FROM _ichibase_users ORDER BY created_at")?
                .query_map([], |r| Ok(UserInfo { id: r.get(0)?, email: r.get(1)?, role: r.get(2)?, created_at: r.get(3)?, disabled: r.get(4)? }))?
                .collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    /// Change a user's role and/or disable/enable them. Either revokes their sessions, so the
    /// change applies to the very next request.
    pub async fn update_user(
        &self,
        id: &str,
        role: Option<&str>,
        disabled: Option<bool>,
    ) -> Result<()> {
        let role = match role {
            Some("admin") => Some("admin".to_string()),
            Some(r) => Some(validate_role(r)?),
            None => None,
        };
        let id2 = id.to_string();
        let n = self
            .sys_write(move |c| {
                let mut n = 0;
                if let Some(r) = role {
                    n += c.execute("UPDATE _ichibase_users SET role = ?1 WHERE id = ?2", params![r, id2])?;
                }
                if let Some(d) = disabled {
                    n += c.execute(
                        "UPDATE _ichibase_users SET disabled_at = CASE WHEN ?1 THEN strftime('%Y-%m-%dT%H:%M:%fZ', 'now') END WHERE id = ?2",
                        params![d, id2],
                    )?;
                }
                if n == 0 {
                    n = c.query_row("SELECT count(*) FROM _ichibase_users WHERE id = ?1", [&id2], |r| r.get::<_, i64>(0))? as usize;
                }
                Ok(n)
            })
            .await?;
        if n == 0 {
            return Err(Error::new(ErrorCode::NotFound, format!("No user {id}")));
        }
        if disabled == Some(true) {
            self.cache
                .write()
                .unwrap()
                .disabled_users
                .insert(id.to_string());
        } else if disabled == Some(false) {
            self.cache.write().unwrap().disabled_users.remove(id);
        }
        self.revoke_user_sessions(id, None).await
    }

    async fn ensure_key(&self, name: &str, key: &str, role: &str) -> Result<()> {
        let hash = hash_secret(key);
        if self.cache.read().unwrap().api_keys.contains_key(&hash) {
            return Ok(());
        }
        self.insert_key(name, hash, role.to_string(), None)
            .await
            .map(|_| ())
    }

    async fn insert_key(
        &self,
        name: &str,
        hash: String,
        role: String,
        user_id: Option<String>,
    ) -> Result<ApiKeyInfo> {
        let id = uuid::Uuid::new_v4().to_string();
        let (id2, name2, hash2, role2, uid2) = (
            id.clone(),
            name.to_string(),
            hash.clone(),
            role.clone(),
            user_id.clone(),
        );
        let created_at = self
            .sys_write(move |c| {
                c.execute(
                    "INSERT INTO _ichibase_api_keys (id, name, key_hash, role, user_id) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![id2, name2, hash2, role2, uid2],
                )?;
                Ok(c.query_row("SELECT created_at FROM _ichibase_api_keys WHERE id = ?1", [id2], |r| r.get::<_, String>(0))?)
            })
            .await?;
        self.cache.write().unwrap().api_keys.insert(
            hash,
            KeyInfo {
                id: id.clone(),
                role: role.clone(),
                user_id: user_id.clone(),
                name: name.to_string(),
            },
        );
        Ok(ApiKeyInfo {
            id,
            name: name.to_string(),
            role,
            user_id,
            created_at,
            revoked: false,
        })
    }

    /// Create an API key scoped to `role` (optionally acting as `user_id`). The key itself is
    /// returned once and stored only as a hash.
    pub async fn create_api_key(
        &self,
        name: &str,
        role: &str,
        user_id: Option<String>,
    ) -> Result<(ApiKeyInfo, String)> {
        let role = if role == "admin" {
            role.to_string()
        } else {
            validate_role(role)?
        };
        if name.trim().is_empty() || name.len() > 200 {
            return Err(Error::new(
                ErrorCode::BadArguments,
                "an API key needs a name of 1-200 characters",
            ));
        }
        let key = format!("ik_{}", random_token(32));
        let info = self
            .insert_key(name.trim(), hash_secret(&key), role, user_id)
            .await?;
        Ok((info, key))
    }

    pub async fn list_api_keys(&self) -> Result<Vec<ApiKeyInfo>> {
        self.sys_read(|c| {
            Ok(c.prepare("SELECT id, name, role, user_id, created_at, revoked_at IS NOT NULL FROM _ichibase_api_keys ORDER BY created_at")?
                .query_map([], |r| Ok(ApiKeyInfo { id: r.get(0)?, name: r.get(1)?, role: r.get(2)?, user_id: r.get(3)?, created_at: r.get(4)?, revoked: r.get(5)? }))?
                .collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    pub async fn revoke_api_key(&self, id: &str) -> Result<()> {
        let id2 = id.to_string();
        let n = self
            .sys_write(move |c| {
                Ok(c.execute("UPDATE _ichibase_api_keys SET revoked_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?1 AND revoked_at IS NULL", [id2])?)
            })
            .await?;
        if n == 0 {
            return Err(Error::new(
                ErrorCode::NotFound,
                format!("No active API key {id}"),
            ));
        }
        self.cache
            .write()
            .unwrap()
            .api_keys
            .retain(|_, k| k.id != id);
        self.revocations.changed();
        Ok(())
    }

    /// Start signing with a new key; tokens signed with the previous keys stay valid.
    pub fn rotate_signing_key(&self) -> Result<(String, Vec<String>)> {
        let mut ring = self.keys.write().unwrap();
        let kid = ring
            .rotate()
            .map_err(|e| Error::internal(format!("rotating the JWT key: {e}")))?;
        Ok((kid, ring.kids()))
    }
}

/// Run CPU- or IO-heavy work (argon2, opening a connection) without stalling the async
/// runtime's other tasks.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Verify `password` against `hash`, or against a hash nobody knows when there is no account
/// (the same work either way, so timing does not tell which emails have accounts).
fn check_password(password: &str, hash: Option<&str>) -> bool {
    match hash {
        Some(h) => verify_password(password, h),
        None => {
            let _ = verify_password(password, dummy_hash());
            false
        }
    }
}

/// `ir_<session id>.<secret>` -> (session id, secret).
fn parse_refresh(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix("ir_")?;
    let (sid, secret) = rest.split_once('.')?;
    (!sid.is_empty() && !secret.is_empty()).then_some((sid, secret))
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name && !v.is_empty()).then(|| v.to_string())
        })
}
