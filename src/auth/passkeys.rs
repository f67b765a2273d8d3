//! Passkeys (WebAuthn, through `webauthn-rs`): a signed-in user registers passkeys (several,
//! named, renamed, deleted); anyone signs in with one without typing a name (a discoverable
//! credential: the authenticator offers the passkeys it holds for this relying party, and its
//! user handle names the account). A passkey sign-in starts an ordinary session on a device
//! (`auth::devices`), so refresh, sign-out and revocation work as for passwords.
//!
//! Ceremony state (the challenge and what the server expects back) stays on the server, in
//! memory, keyed by a random `challenge_id`, for `challenge_ttl_secs`, capped in all and per
//! client address; each challenge is taken out of the store before it is checked, so it is
//! good for one answer only (a replayed or reused assertion is refused). The server checks the
//! origin against `rp_origins`, the RP id hash, user verification, the signature against the
//! stored public key, that the credential belongs to the account its user handle names, and the
//! signature counter (a clone detector for authenticators that count).
//!
//! Owns `_ichibase_passkeys` (module migrations of `passkeys`), the `[passkeys]` section, the
//! `/auth/passkeys*` routes and the sign-in page `/auth/passkey` with its script
//! `/auth/passkeys.js`. It starts sessions only through `Auth::start_session_on` and must not
//! touch passwords, tokens or the session tables directly.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::Router;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};
use webauthn_rs::prelude::{
    DiscoverableAuthentication, Passkey, PasskeyRegistration, PublicKeyCredential,
    RegisterPublicKeyCredential, Url, Uuid, Webauthn, WebauthnBuilder,
};

use super::UserInfo;
use super::devices::SessionDevice;
use crate::apis::{App, BodyLimit, Caller, JsonBody, RequestScope, body_limit, reply};
use crate::app::AppBuilder;
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::storage::ExecControl;
use crate::storage::migrations::Migration;

/// `[passkeys]` in ichibase.toml (or `ICHIBASE_PASSKEYS__<KEY>`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PasskeySettings {
    /// The relying party id: the domain passkeys are bound to (the site's host name or a parent
    /// of it). `localhost` works from the same machine; a phone needs a real name (see
    /// docs/passkeys.md).
    pub rp_id: String,
    /// Origins (scheme://host[:port]) pages may sign in from. Empty: `https://<rp_id>` on any
    /// port, and `http://localhost` when `rp_id` is `localhost`.
    pub rp_origins: Vec<String>,
    /// Name shown by the authenticator.
    pub rp_name: String,
    /// Also accept origins on subdomains of `rp_id`.
    pub allow_subdomains: bool,
    /// Accept `rp_origins` on any port (always on when `rp_origins` is empty).
    pub allow_any_port: bool,
    /// How long a ceremony (register or sign in) may take, seconds.
    pub challenge_ttl_secs: f64,
    /// Ceremonies waiting for an answer at most (memory bound); more are refused with 429.
    pub max_pending: usize,
    /// Ceremonies one client address may have waiting.
    pub max_pending_per_ip: usize,
    /// Passkeys one user may register.
    pub max_per_user: usize,
}

impl Default for PasskeySettings {
    fn default() -> Self {
        PasskeySettings {
            rp_id: "localhost".into(),
            rp_origins: Vec::new(),
            rp_name: "ichibase".into(),
            allow_subdomains: false,
            allow_any_port: false,
            challenge_ttl_secs: 300.0,
            max_pending: 10_000,
            max_pending_per_ip: 32,
            max_per_user: 20,
        }
    }
}

impl PasskeySettings {
    fn build(&self) -> anyhow::Result<Webauthn> {
        anyhow::ensure!(
            self.challenge_ttl_secs > 0.0 && self.challenge_ttl_secs.is_finite(),
            "[passkeys] challenge_ttl_secs must be a positive number"
        );
        anyhow::ensure!(
            self.max_pending > 0 && self.max_pending_per_ip > 0 && self.max_per_user > 0,
            "[passkeys] max_pending, max_pending_per_ip and max_per_user must be positive"
        );
        let rp_id = self.rp_id.trim();
        anyhow::ensure!(!rp_id.is_empty(), "[passkeys] rp_id must be a domain name");
        let mut origins: Vec<Url> = Vec::new();
        let mut any_port = self.allow_any_port;
        if self.rp_origins.is_empty() {
            any_port = true;
            origins.push(Url::parse(&format!("https://{rp_id}"))?);
            if rp_id == "localhost" {
                origins.push(Url::parse("http://localhost")?);
            }
        }
        for o in &self.rp_origins {
            origins.push(
                Url::parse(o).map_err(|e| anyhow::anyhow!("[passkeys] rp_origins: '{o}' is not a URL: {e}"))?,
            );
        }
        let mut b = WebauthnBuilder::new(rp_id, &origins[0]).map_err(|e| {
            anyhow::anyhow!(
                "[passkeys] rp_id '{rp_id}' must be the host of every origin in rp_origins or a parent domain of it ({}): {e}",
                origins[0]
            )
        })?;
        for o in &origins[1..] {
            anyhow::ensure!(
                o.domain().is_some_and(|d| d == rp_id || d.ends_with(&format!(".{rp_id}"))),
                "[passkeys] origin {o} is not on rp_id '{rp_id}' or a subdomain of it"
            );
            b = b.append_allowed_origin(o);
        }
        b.rp_name(&self.rp_name)
            .allow_subdomains(self.allow_subdomains)
            .allow_any_port(any_port)
            .timeout(Duration::from_secs_f64(self.challenge_ttl_secs))
            .build()
            .map_err(|e| anyhow::anyhow!("[passkeys]: {e}"))
    }
}

enum Ceremony {
    Register {
        user_id: String,
        name: Option<String>,
        state: PasskeyRegistration,
    },
    Signin(DiscoverableAuthentication),
}

struct Pending {
    expires: Instant,
    ip: Option<IpAddr>,
    ceremony: Ceremony,
}

/// The passkey service: the relying party and the ceremonies waiting for an answer.
pub struct Passkeys {
    webauthn: Webauthn,
    settings: PasskeySettings,
    pending: Mutex<HashMap<String, Pending>>,
}

fn challenge_invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorCode::PasskeyChallengeInvalid, msg)
}

fn rejected(e: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorCode::PasskeyRejected,
        format!("The passkey answer was refused: {e}"),
    )
}

/// A passkey of the user, as `GET /auth/passkeys` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct PasskeyInfo {
    pub id: String,
    pub name: String,
    /// The credential id (base64url), as the authenticator names it.
    pub credential_id: String,
    pub created_at: String,
    pub last_used_at: Option<String>,
}

fn validate_name(name: &str) -> Result<String> {
    let n = name.trim();
    if n.is_empty() || n.chars().count() > 100 || n.chars().any(char::is_control) {
        return Err(Error::new(
            ErrorCode::BadArguments,
            "a passkey name is 1-100 characters without control characters",
        ));
    }
    Ok(n.to_string())
}

impl Passkeys {
    pub fn new(settings: PasskeySettings) -> anyhow::Result<Passkeys> {
        Ok(Passkeys {
            webauthn: settings.build()?,
            settings,
            pending: Mutex::new(HashMap::new()),
        })
    }

    pub fn settings(&self) -> &PasskeySettings {
        &self.settings
    }

    /// Keep a ceremony's state; its id. Refused (429) over the caps.
    fn hold(&self, ip: Option<IpAddr>, ceremony: Ceremony) -> Result<String> {
        let now = Instant::now();
        let mut p = self.pending.lock().unwrap();
        p.retain(|_, v| v.expires > now);
        if p.len() >= self.settings.max_pending {
            return Err(Error::new(
                ErrorCode::TooManyRequests,
                "Too many passkey ceremonies are waiting ([passkeys] max_pending); retry shortly",
            ));
        }
        if ip.is_some() && p.values().filter(|v| v.ip == ip).count() >= self.settings.max_pending_per_ip {
            return Err(Error::new(
                ErrorCode::TooManyRequests,
                "Too many passkey ceremonies are waiting from this address ([passkeys] max_pending_per_ip); finish one or retry later",
            ));
        }
        let id = super::secrets::random_token(24);
        p.insert(
            id.clone(),
            Pending {
                expires: now + Duration::from_secs_f64(self.settings.challenge_ttl_secs),
                ip,
                ceremony,
            },
        );
        Ok(id)
    }

    /// Take a ceremony out of the store (good for one answer only).
    fn take(&self, id: &str) -> Result<Ceremony> {
        let p = self.pending.lock().unwrap().remove(id);
        match p {
            Some(p) if p.expires > Instant::now() => Ok(p.ceremony),
            Some(_) => Err(challenge_invalid(
                "This passkey challenge expired ([passkeys] challenge_ttl_secs); start again",
            )),
            None => Err(challenge_invalid(
                "Unknown or already used passkey challenge: each challenge takes one answer; start again",
            )),
        }
    }

    /// Ceremonies waiting (for tests and the console).
    pub fn pending(&self) -> usize {
        self.pending.lock().unwrap().len()
    }
}

async fn read<F, R>(app: &App, f: F) -> Result<R>
where
    F: FnOnce(&rusqlite::Connection) -> Result<R> + Send + 'static,
    R: Send + 'static,
{
    app.storage()
        .read(&RequestContext::system(), ExecControl::lookup(), f)
        .await
}

async fn write<F, R>(app: &App, f: F) -> Result<R>
where
    F: FnOnce(&mut rusqlite::Connection) -> Result<R> + Send + 'static,
    R: Send + 'static,
{
    app.storage()
        .write(&RequestContext::system(), ExecControl::new(Instant::now(), 0.0), f)
        .await
}

fn service(app: &App) -> Result<&Passkeys> {
    app.get::<Passkeys>()
        .ok_or_else(|| Error::internal("the passkeys module is not started"))
}

fn signed_in(ctx: &RequestContext) -> Result<String> {
    match (&ctx.user_id, &ctx.session_id) {
        (Some(u), Some(_)) => Ok(u.clone()),
        _ => Err(Error::new(
            ErrorCode::AuthenticationFailed,
            "Sign in first (a session: password or passkey sign-in, not an API key) to manage passkeys",
        )),
    }
}

// ----- registration -----

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RegisterStart {
    #[serde(default)]
    name: Option<String>,
}

async fn register_start(
    State(st): State<App>,
    scope: RequestScope,
    Caller(ctx): Caller,
    JsonBody(b): JsonBody<RegisterStart>,
) -> Response {
    reply(register_start_inner(&st, scope.client(), &ctx, b).await)
}

async fn register_start_inner(
    st: &App,
    ip: Option<IpAddr>,
    ctx: &RequestContext,
    b: RegisterStart,
) -> Result<Json> {
    let pk = service(st)?;
    let uid = signed_in(ctx)?;
    let name = b.name.as_deref().map(validate_name).transpose()?;
    let uid2 = uid.clone();
    let (email, existing): (String, Vec<String>) = read(st, move |c| {
        let email: String = c
            .query_row("SELECT email FROM _ichibase_users WHERE id = ?1", [&uid2], |r| r.get(0))
            .optional()?
            .ok_or_else(|| Error::new(ErrorCode::AuthenticationFailed, "No such user"))?;
        let creds = c
            .prepare("SELECT cred_id FROM _ichibase_passkeys WHERE user_id = ?1")?
            .query_map([&uid2], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok((email, creds))
    })
    .await?;
    if existing.len() >= pk.settings.max_per_user {
        return Err(Error::new(
            ErrorCode::Conflict,
            format!(
                "You have {} passkeys, the most allowed ([passkeys] max_per_user); delete one first",
                existing.len()
            ),
        ));
    }
    let handle = Uuid::parse_str(&uid)
        .map_err(|_| Error::internal("this user's id is not a UUID; passkeys need one"))?;
    let exclude: Vec<Vec<u8>> = existing
        .iter()
        .filter_map(|c| URL_SAFE_NO_PAD.decode(c).ok())
        .collect();
    let (ccr, state) = pk
        .webauthn
        .start_passkey_registration(handle, &email, &email, Some(exclude))
        .map_err(|e| Error::internal(format!("starting a passkey registration: {e}")))?;
    // A passkey is a discoverable credential: ask the authenticator to keep it (sign-in
    // without a user name finds it there).
    let mut options = serde_json::to_value(&ccr).map_err(|e| Error::internal(e.to_string()))?;
    if let Some(sel) = options
        .pointer_mut("/publicKey/authenticatorSelection")
        .and_then(Json::as_object_mut)
    {
        sel.insert("residentKey".into(), json!("required"));
        sel.insert("requireResidentKey".into(), json!(true));
    }
    let id = pk.hold(ip, Ceremony::Register { user_id: uid, name, state })?;
    Ok(json!({"challenge_id": id, "options": options}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterFinish {
    challenge_id: String,
    credential: Json,
    #[serde(default)]
    name: Option<String>,
}

async fn register_finish(
    State(st): State<App>,
    Caller(ctx): Caller,
    JsonBody(b): JsonBody<RegisterFinish>,
) -> Response {
    reply(register_finish_inner(&st, &ctx, b).await)
}

async fn register_finish_inner(st: &App, ctx: &RequestContext, b: RegisterFinish) -> Result<PasskeyInfo> {
    let pk = service(st)?;
    let uid = signed_in(ctx)?;
    let cred: RegisterPublicKeyCredential = serde_json::from_value(b.credential).map_err(|e| {
        Error::new(ErrorCode::BadArguments, format!("credential is not a WebAuthn registration (PublicKeyCredential JSON): {e}"))
    })?;
    let Ceremony::Register { user_id, name, state } = pk.take(&b.challenge_id)? else {
        return Err(challenge_invalid("This challenge is for signing in, not for registering a passkey"));
    };
    if user_id != uid {
        return Err(challenge_invalid("This registration challenge was started by another user"));
    }
    let passkey = pk.webauthn.finish_passkey_registration(&cred, &state).map_err(rejected)?;
    let name = match b.name.as_deref().map(validate_name).transpose()?.or(name) {
        Some(n) => n,
        None => format!("Passkey {}", chrono::Utc::now().format("%Y-%m-%d %H:%M")),
    };
    let cred_id = URL_SAFE_NO_PAD.encode(passkey.cred_id());
    let stored = serde_json::to_string(&passkey).map_err(|e| Error::internal(e.to_string()))?;
    let id = uuid::Uuid::new_v4().to_string();
    let max = pk.settings.max_per_user as i64;
    let (id2, cred2, name2) = (id.clone(), cred_id.clone(), name.clone());
    let created_at = write(st, move |c| {
        let n: i64 = c.query_row("SELECT count(*) FROM _ichibase_passkeys WHERE user_id = ?1", [&uid], |r| r.get(0))?;
        if n >= max {
            return Err(Error::new(ErrorCode::Conflict, "You have the most passkeys allowed ([passkeys] max_per_user); delete one first"));
        }
        c.execute(
            "INSERT INTO _ichibase_passkeys (id, user_id, cred_id, name, passkey) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id2, uid, cred2, name2, stored],
        )
        .map_err(|e| {
            let e = Error::from(e);
            if e.code == ErrorCode::ConstraintViolation {
                Error::new(ErrorCode::Conflict, "This passkey is registered already")
            } else {
                e
            }
        })?;
        Ok(c.query_row("SELECT created_at FROM _ichibase_passkeys WHERE id = ?1", [&id2], |r| r.get::<_, String>(0))?)
    })
    .await?;
    Ok(PasskeyInfo { id, name, credential_id: cred_id, created_at, last_used_at: None })
}

// ----- sign-in -----

async fn signin_start(State(st): State<App>, scope: RequestScope) -> Response {
    reply(signin_start_inner(&st, scope.client()))
}

fn signin_start_inner(st: &App, ip: Option<IpAddr>) -> Result<Json> {
    let pk = service(st)?;
    let (rcr, state) = pk
        .webauthn
        .start_discoverable_authentication()
        .map_err(|e| Error::internal(format!("starting a passkey sign-in: {e}")))?;
    let mut options = serde_json::to_value(&rcr).map_err(|e| Error::internal(e.to_string()))?;
    // A button press, not the autofill (conditional) flow: the page asks when it wants to.
    if let Some(o) = options.as_object_mut() {
        o.remove("mediation");
    }
    let id = pk.hold(ip, Ceremony::Signin(state))?;
    Ok(json!({"challenge_id": id, "options": options}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SigninFinish {
    challenge_id: String,
    credential: Json,
    /// A name for the device, as in password sign-in.
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    device_id: Option<String>,
}

async fn signin_finish(
    State(st): State<App>,
    scope: RequestScope,
    headers: HeaderMap,
    JsonBody(b): JsonBody<SigninFinish>,
) -> Response {
    let dev = SessionDevice::from_request(&headers, b.device.clone(), b.device_id.clone(), scope.client());
    let r = signin_finish_inner(&st, b, dev).await;
    crate::apis::auth::session_reply(&st, r)
}

async fn signin_finish_inner(st: &App, b: SigninFinish, dev: SessionDevice) -> Result<super::Tokens> {
    let pk = service(st)?;
    let cred: PublicKeyCredential = serde_json::from_value(b.credential).map_err(|e| {
        Error::new(ErrorCode::BadArguments, format!("credential is not a WebAuthn assertion (PublicKeyCredential JSON): {e}"))
    })?;
    // The challenge is spent whatever happens next.
    let Ceremony::Signin(state) = pk.take(&b.challenge_id)? else {
        return Err(challenge_invalid("This challenge is for registering a passkey, not for signing in"));
    };
    let (handle, cred_id) = pk
        .webauthn
        .identify_discoverable_authentication(&cred)
        .map_err(|_| rejected("the answer carries no user handle (use a discoverable passkey)"))?;
    let cred_id = URL_SAFE_NO_PAD.encode(cred_id);
    let cred_id2 = cred_id.clone();
    type Row = (String, String, String, String, String, String, bool);
    let row: Option<Row> = read(st, move |c| {
        Ok(c.query_row(
            "SELECT p.id, p.user_id, p.passkey, u.email, u.role, u.created_at, u.disabled_at IS NOT NULL
             FROM _ichibase_passkeys p JOIN _ichibase_users u ON u.id = p.user_id WHERE p.cred_id = ?1",
            [cred_id2],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
        )
        .optional()?)
    })
    .await?;
    let unknown = || Error::new(ErrorCode::PasskeyUnknown, "This passkey is not registered here (deleted, or for another server); sign in another way");
    let Some((pid, uid, stored, email, role, created_at, disabled)) = row else {
        return Err(unknown());
    };
    // The user handle is not signed: it must name the credential's own account.
    if Uuid::parse_str(&uid).ok() != Some(handle) {
        return Err(unknown());
    }
    let mut passkey: Passkey = serde_json::from_str(&stored)
        .map_err(|e| Error::internal(format!("a stored passkey does not parse: {e}")))?;
    let result = pk
        .webauthn
        .finish_discoverable_authentication_v2(&cred, state, &passkey)
        .map_err(rejected)?;
    if disabled {
        return Err(Error::new(ErrorCode::AuthenticationFailed, "User is disabled"));
    }
    let updated = passkey.update_credential(&result) == Some(true);
    let stored = updated
        .then(|| serde_json::to_string(&passkey))
        .transpose()
        .map_err(|e| Error::internal(e.to_string()))?;
    write(st, move |c| {
        c.execute(
            "UPDATE _ichibase_passkeys SET last_used_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), passkey = coalesce(?2, passkey) WHERE id = ?1",
            params![pid, stored],
        )?;
        Ok(())
    })
    .await?;
    let user = UserInfo { id: uid, email, role, created_at, disabled };
    st.auth().start_session_on(user, dev).await
}

// ----- list, rename, delete -----

async fn list(State(st): State<App>, Caller(ctx): Caller) -> Response {
    let r = async {
        let uid = ctx.user_id.clone().ok_or_else(|| Error::new(ErrorCode::AuthenticationFailed, "Sign in first"))?;
        read(&st, move |c| {
            Ok(c.prepare("SELECT id, name, cred_id, created_at, last_used_at FROM _ichibase_passkeys WHERE user_id = ?1 ORDER BY created_at, id")?
                .query_map([uid], |r| Ok(PasskeyInfo { id: r.get(0)?, name: r.get(1)?, credential_id: r.get(2)?, created_at: r.get(3)?, last_used_at: r.get(4)? }))?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }
    .await;
    reply(r.map(|p| json!({ "passkeys": p })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RenameBody {
    name: String,
}

async fn rename(
    State(st): State<App>,
    Path(id): Path<String>,
    Caller(ctx): Caller,
    JsonBody(b): JsonBody<RenameBody>,
) -> Response {
    let r = async {
        let uid = signed_in(&ctx)?;
        let name = validate_name(&b.name)?;
        let (id2, name2) = (id.clone(), name.clone());
        let n = write(&st, move |c| {
            Ok(c.execute("UPDATE _ichibase_passkeys SET name = ?1 WHERE id = ?2 AND user_id = ?3", params![name2, id2, uid])?)
        })
        .await?;
        if n == 0 {
            return Err(Error::new(ErrorCode::NotFound, format!("No passkey {id} of yours")));
        }
        Ok(json!({"id": id, "name": name}))
    }
    .await;
    reply(r)
}

async fn delete(State(st): State<App>, Path(id): Path<String>, Caller(ctx): Caller) -> Response {
    let r = async {
        let uid = signed_in(&ctx)?;
        let id2 = id.clone();
        let n = write(&st, move |c| {
            Ok(c.execute("DELETE FROM _ichibase_passkeys WHERE id = ?1 AND user_id = ?2", params![id2, uid])?)
        })
        .await?;
        if n == 0 {
            return Err(Error::new(ErrorCode::NotFound, format!("No passkey {id} of yours")));
        }
        Ok(json!({"deleted": id}))
    }
    .await;
    reply(r)
}

// ----- the sign-in page -----

const PAGE: &str = include_str!("passkey_page.html");
const SCRIPT: &str = include_str!("passkeys.js");

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    );
    r
}

async fn page() -> Response {
    asset(PAGE, "text/html; charset=utf-8")
}

async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

// ----- the module -----

/// Passkeys: WebAuthn registration and usernameless sign-in (`/auth/passkeys*`).
pub struct PasskeysModule;

const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "passkeys",
    sql: "CREATE TABLE _ichibase_passkeys (
              id TEXT PRIMARY KEY,
              user_id TEXT NOT NULL REFERENCES _ichibase_users(id) ON DELETE CASCADE,
              cred_id TEXT NOT NULL UNIQUE,
              name TEXT NOT NULL,
              passkey TEXT NOT NULL,
              created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
              last_used_at TEXT
          ) STRICT;
          CREATE INDEX _ichibase_passkeys_user ON _ichibase_passkeys(user_id);",
}];

impl crate::modules::Module for PasskeysModule {
    fn name(&self) -> &'static str {
        "passkeys"
    }
    fn section(&self) -> Option<&'static str> {
        Some("passkeys")
    }
    fn migrations(&self) -> &'static [Migration] {
        MIGRATIONS
    }
    fn provide(&self, b: &mut AppBuilder) -> anyhow::Result<()> {
        let s: PasskeySettings = b.core().config.section("passkeys")?;
        b.provide(Passkeys::new(s)?);
        Ok(())
    }
    fn routes(&self) -> Router<App> {
        Router::new()
            .route("/auth/passkey", get(page))
            .route("/auth/passkeys.js", get(script))
            .route("/auth/passkeys", get(list))
            .route("/auth/passkeys/{id}", patch(rename).delete(delete))
            .route("/auth/passkeys/register/start", post(register_start))
            .route("/auth/passkeys/register/finish", post(register_finish))
            .route("/auth/passkeys/signin/start", post(signin_start))
            .route("/auth/passkeys/signin/finish", post(signin_finish))
            .layer(body_limit(BodyLimit::Json))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        assert!(PasskeySettings::default().build().is_ok());
        let bad = |f: fn(&mut PasskeySettings)| {
            let mut s = PasskeySettings::default();
            f(&mut s);
            s.build().unwrap_err().to_string()
        };
        assert!(bad(|s| s.rp_id = String::new()).contains("rp_id"));
        assert!(bad(|s| s.challenge_ttl_secs = 0.0).contains("challenge_ttl_secs"));
        assert!(bad(|s| s.max_pending = 0).contains("max_pending"));
        assert!(bad(|s| s.rp_origins = vec!["https://evil.example".into()]).contains("rp_id"));
        assert!(bad(|s| s.rp_origins = vec!["not a url".into()]).contains("not a URL"));
        let mut s = PasskeySettings::default();
        s.rp_id = "home.example".into();
        s.rp_origins = vec!["https://ichibase.home.example:8443".into()];
        assert!(s.build().is_ok());
    }

    #[test]
    fn challenges_are_single_use_and_capped() {
        let mut s = PasskeySettings::default();
        s.max_pending_per_ip = 2;
        let pk = Passkeys::new(s).unwrap();
        let ip: Option<IpAddr> = Some("10.0.0.1".parse().unwrap());
        let new = || pk.webauthn.start_discoverable_authentication().unwrap().1;
        let a = pk.hold(ip, Ceremony::Signin(new())).unwrap();
        let _b = pk.hold(ip, Ceremony::Signin(new())).unwrap();
        let e = pk.hold(ip, Ceremony::Signin(new())).unwrap_err();
        assert_eq!(e.code, ErrorCode::TooManyRequests);
        assert!(pk.hold(Some("10.0.0.2".parse().unwrap()), Ceremony::Signin(new())).is_ok());
        assert!(pk.take(&a).is_ok());
        assert_eq!(pk.take(&a).err().unwrap().code, ErrorCode::PasskeyChallengeInvalid);
        assert_eq!(pk.take("nope").err().unwrap().code, ErrorCode::PasskeyChallengeInvalid);
    }

    #[test]
    fn challenges_expire() {
        let mut s = PasskeySettings::default();
        s.challenge_ttl_secs = 0.05;
        let pk = Passkeys::new(s).unwrap();
        let state = pk.webauthn.start_discoverable_authentication().unwrap().1;
        let id = pk.hold(None, Ceremony::Signin(state)).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let e = pk.take(&id).err().unwrap();
        assert_eq!(e.code, ErrorCode::PasskeyChallengeInvalid);
        assert!(e.message.contains("expired"), "{}", e.message);
        assert_eq!(pk.pending(), 0);
    }
}
