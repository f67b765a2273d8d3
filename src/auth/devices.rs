//! Devices: every session (and so every refresh token and every access token, which carry the
//! session id) belongs to a device — a browser, a phone, a CLI — with a name, its user agent,
//! first and last seen, and the last client address.
//!
//! A browser keeps its device across sign-ins through the `ichibase_device` cookie (an id, not a
//! credential: it only names which of the *same user's* live devices a new session joins); an
//! API client may send `device_id` in the sign-in body. Without either, a sign-in is a new device.
//!
//! Revoking a device revokes every session on it at once: the sessions go into the auth cache's
//! revoked set (so access tokens and the session cookie are refused on their next request), the
//! refresh tokens stop working (their session is revoked in the table), and open WebSockets on
//! those sessions are closed by the revocation notice (`auth::revocation`). "Sign out
//! everywhere" revokes every device of the user.
//!
//! Owns the `_ichibase_devices` table and the `device_id` column of `_ichibase_sessions` (module
//! migrations of `devices`), and the `/auth/devices` routes. It must not touch passwords, keys
//! or how credentials are verified (that is `auth::Auth`).

use std::net::IpAddr;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Auth, auth_failed};
use crate::apis::{App, BodyLimit, Caller, JsonBody, body_limit, reply};
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::storage::migrations::Migration;

/// Name of the cookie that keeps a browser's device id across sign-ins.
pub const DEVICE_COOKIE: &str = "ichibase_device";

/// Longest device name and user agent kept, characters.
const MAX_TEXT: usize = 200;

/// Where a new session comes from: which device it joins (if any), its name, user agent and
/// client address. Build it with [`SessionDevice::from_request`] in a handler, or
/// [`SessionDevice::named`] where only a name is known.
#[derive(Debug, Clone, Default)]
pub struct SessionDevice {
    /// A device of the same user to join (the `ichibase_device` cookie or `device_id` in the
    /// sign-in body); ignored when unknown, revoked or another user's.
    pub device_id: Option<String>,
    /// A name the client chose ("Ann's phone"); the user agent when absent.
    pub name: Option<String>,
    pub user_agent: Option<String>,
    pub ip: Option<IpAddr>,
}

impl SessionDevice {
    pub fn named(name: Option<String>) -> SessionDevice {
        SessionDevice {
            name,
            ..Default::default()
        }
    }

    /// The device of a sign-in request: `device_id` (body) or the device cookie, the name the
    /// body gave, the User-Agent header and the client address.
    pub fn from_request(
        headers: &HeaderMap,
        name: Option<String>,
        device_id: Option<String>,
        ip: Option<IpAddr>,
    ) -> SessionDevice {
        let user_agent = headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        SessionDevice {
            device_id: device_id.or_else(|| super::cookie_value(headers, DEVICE_COOKIE)),
            name,
            user_agent,
            ip,
        }
    }
}

fn clip(s: Option<String>) -> Option<String> {
    s.map(|s| s.trim().chars().take(MAX_TEXT).collect::<String>())
        .filter(|s| !s.is_empty())
}

/// A device of the user, as `GET /auth/devices` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceInfo {
    pub id: String,
    pub name: Option<String>,
    pub user_agent: Option<String>,
    pub first_seen_at: String,
    pub last_seen_at: String,
    pub last_ip: Option<String>,
    /// Live sessions on the device.
    pub sessions: i64,
    /// The device of the request that asks.
    pub current: bool,
}

/// Join the session being created to a device of `user_id` (the one `dev` names when it is a
/// live device of that user, else a new one); returns the device id. Runs on the writer inside
/// the session's insert.
pub(super) fn attach(
    c: &rusqlite::Connection,
    user_id: &str,
    dev: &SessionDevice,
) -> rusqlite::Result<String> {
    let ip = dev.ip.map(|i| i.to_string());
    let ua = clip(dev.user_agent.clone());
    let name = clip(dev.name.clone());
    if let Some(id) = dev.device_id.as_deref().filter(|d| d.len() <= 64) {
        let n = c.execute(
            "UPDATE _ichibase_devices SET last_seen_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),
                 last_ip = coalesce(?3, last_ip), user_agent = coalesce(?4, user_agent), name = coalesce(?5, name)
             WHERE id = ?1 AND user_id = ?2 AND revoked_at IS NULL",
            params![id, user_id, ip, ua, name],
        )?;
        if n == 1 {
            return Ok(id.to_string());
        }
    }
    let id = uuid::Uuid::new_v4().to_string();
    c.execute(
        "INSERT INTO _ichibase_devices (id, user_id, name, user_agent, last_ip) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![id, user_id, name.or_else(|| ua.clone()), ua, ip],
    )?;
    Ok(id)
}

/// Note that the device of session `sid` was seen now from `ip` (token refresh).
pub(super) fn touch(c: &rusqlite::Connection, sid: &str, ip: Option<IpAddr>) -> rusqlite::Result<()> {
    c.execute(
        "UPDATE _ichibase_devices SET last_seen_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), last_ip = coalesce(?2, last_ip)
         WHERE id = (SELECT device_id FROM _ichibase_sessions WHERE id = ?1)",
        params![sid, ip.map(|i| i.to_string())],
    )?;
    Ok(())
}

fn validate_name(name: &str) -> Result<String> {
    let n = name.trim();
    if n.is_empty() || n.chars().count() > MAX_TEXT || n.chars().any(char::is_control) {
        return Err(Error::new(
            ErrorCode::BadArguments,
            format!("a device name is 1-{MAX_TEXT} characters without control characters"),
        ));
    }
    Ok(n.to_string())
}

impl Auth {
    /// The device of the caller's session, if it has one.
    pub async fn current_device(&self, who: &RequestContext) -> Result<Option<String>> {
        let Some(sid) = who.session_id.clone() else {
            return Ok(None);
        };
        self.sys_read(move |c| {
            Ok(c.query_row(
                "SELECT device_id FROM _ichibase_sessions WHERE id = ?1",
                [sid],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()?
            .flatten())
        })
        .await
    }

    /// The caller's devices with at least one live session, oldest first.
    pub async fn devices(&self, who: &RequestContext) -> Result<Vec<DeviceInfo>> {
        let uid = who.user_id.clone().ok_or_else(|| auth_failed("Sign in first"))?;
        let current = self.current_device(who).await?;
        let t = super::now() as i64;
        self.sys_read(move |c| {
            let rows = c
                .prepare(
                    "SELECT d.id, d.name, d.user_agent, d.first_seen_at, d.last_seen_at, d.last_ip, count(s.id)
                     FROM _ichibase_devices d JOIN _ichibase_sessions s ON s.device_id = d.id
                     WHERE d.user_id = ?1 AND d.revoked_at IS NULL AND s.revoked_at IS NULL AND s.expires_at > ?2
                     GROUP BY d.id ORDER BY d.first_seen_at, d.id",
                )?
                .query_map(params![uid, t], |r| {
                    let id: String = r.get(0)?;
                    Ok(DeviceInfo {
                        current: current.as_deref() == Some(id.as_str()),
                        id,
                        name: r.get(1)?,
                        user_agent: r.get(2)?,
                        first_seen_at: r.get(3)?,
                        last_seen_at: r.get(4)?,
                        last_ip: r.get(5)?,
                        sessions: r.get(6)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
        .await
    }

    pub async fn rename_device(&self, who: &RequestContext, id: &str, name: &str) -> Result<()> {
        let uid = who.user_id.clone().ok_or_else(|| auth_failed("Sign in first"))?;
        let name = validate_name(name)?;
        let id2 = id.to_string();
        let n = self
            .sys_write(move |c| {
                Ok(c.execute(
                    "UPDATE _ichibase_devices SET name = ?1 WHERE id = ?2 AND user_id = ?3 AND revoked_at IS NULL",
                    params![name, id2, uid],
                )?)
            })
            .await?;
        if n == 0 {
            return Err(Error::new(ErrorCode::NotFound, format!("No device {id} of yours")));
        }
        Ok(())
    }

    /// Revoke one device of the caller (an admin: of anyone): every session on it ends at once
    /// (access tokens, refresh tokens, the session cookie, open WebSockets).
    pub async fn revoke_device(&self, who: &RequestContext, id: &str) -> Result<usize> {
        let uid = who.user_id.clone();
        if uid.is_none() && !who.is_admin() {
            return Err(auth_failed("Sign in first"));
        }
        let (id2, admin) = (id.to_string(), who.is_admin());
        let sids = self
            .sys_write(move |c| {
                let n = c.execute(
                    "UPDATE _ichibase_devices SET revoked_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                     WHERE id = ?1 AND (user_id = ?2 OR ?3) AND revoked_at IS NULL",
                    params![id2, uid, admin],
                )?;
                if n == 0 {
                    return Ok(None);
                }
                Ok(Some(revoke_sessions_where(c, "device_id = ?1", &id2)?))
            })
            .await?
            .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("No device {id} of yours")))?;
        let n = sids.len();
        self.sessions_revoked(sids);
        Ok(n)
    }

    /// Sign out everywhere: revoke every device and session of the caller (but the caller's
    /// own device with `keep_current`). Returns how many sessions ended.
    pub async fn revoke_all_devices(&self, who: &RequestContext, keep_current: bool) -> Result<usize> {
        let uid = who.user_id.clone().ok_or_else(|| auth_failed("Sign in first"))?;
        let keep = if keep_current { self.current_device(who).await? } else { None };
        let keep_sid = if keep_current { who.session_id.clone() } else { None };
        let uid2 = uid.clone();
        let sids = self
            .sys_write(move |c| {
                c.execute(
                    "UPDATE _ichibase_devices SET revoked_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                     WHERE user_id = ?1 AND revoked_at IS NULL AND id IS NOT ?2",
                    params![uid2, keep],
                )?;
                let ids: Vec<String> = c
                    .prepare(
                        "SELECT id FROM _ichibase_sessions WHERE user_id = ?1 AND revoked_at IS NULL
                         AND id IS NOT ?2 AND (device_id IS NOT ?3 OR ?3 IS NULL)",
                    )?
                    .query_map(params![uid2, keep_sid, keep], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                for id in &ids {
                    c.execute(
                        "UPDATE _ichibase_sessions SET revoked_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?1",
                        [id],
                    )?;
                }
                Ok(ids)
            })
            .await?;
        let n = sids.len();
        self.sessions_revoked(sids);
        Ok(n)
    }

    /// Sessions just revoked in the table: refuse them from now on and close their sockets.
    fn sessions_revoked(&self, sids: Vec<String>) {
        if sids.is_empty() {
            return;
        }
        self.cache.write().unwrap().revoked_sessions.extend(sids);
        self.revocations.changed();
    }
}

/// Revoke the live sessions matching `cond` (with `?1` bound to `arg`); their ids.
fn revoke_sessions_where(
    c: &rusqlite::Connection,
    cond: &str,
    arg: &str,
) -> rusqlite::Result<Vec<String>> {
    let ids: Vec<String> = c
        .prepare(&format!(
            "SELECT id FROM _ichibase_sessions WHERE {cond} AND revoked_at IS NULL"
        ))?
        .query_map([arg], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    c.execute(
        &format!(
            "UPDATE _ichibase_sessions SET revoked_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE {cond} AND revoked_at IS NULL"
        ),
        [arg],
    )?;
    Ok(ids)
}

// ----- the module: tables and routes -----

/// Devices of sessions (`/auth/devices`).
pub struct DevicesModule;

const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "devices of sessions",
    sql: "CREATE TABLE _ichibase_devices (
              id TEXT PRIMARY KEY,
              user_id TEXT NOT NULL REFERENCES _ichibase_users(id) ON DELETE CASCADE,
              name TEXT,
              user_agent TEXT,
              first_seen_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
              last_seen_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
              last_ip TEXT,
              revoked_at TEXT
          ) STRICT;
          CREATE INDEX _ichibase_devices_user ON _ichibase_devices(user_id);
          ALTER TABLE _ichibase_sessions ADD COLUMN device_id TEXT;
          CREATE INDEX _ichibase_sessions_device ON _ichibase_sessions(device_id);
          -- Sessions from before devices: each live one becomes its own device.
          INSERT INTO _ichibase_devices (id, user_id, name, user_agent, first_seen_at, last_seen_at)
              SELECT id, user_id, device, device, created_at, coalesce(last_used_at, created_at)
              FROM _ichibase_sessions WHERE revoked_at IS NULL;
          UPDATE _ichibase_sessions SET device_id = id WHERE revoked_at IS NULL;",
}];

impl crate::modules::Module for DevicesModule {
    fn name(&self) -> &'static str {
        "devices"
    }
    fn migrations(&self) -> &'static [Migration] {
        MIGRATIONS
    }
    fn routes(&self) -> Router<App> {
        Router::new()
            .route("/auth/devices", get(list))
            .route("/auth/devices/{id}", axum::routing::patch(rename).delete(revoke))
            .route("/auth/devices/revoke-all", post(revoke_all))
            .layer(body_limit(BodyLimit::Json))
    }
}

async fn list(State(st): State<App>, Caller(ctx): Caller) -> Response {
    reply(st.auth().devices(&ctx).await.map(|d| json!({ "devices": d })))
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
    reply(
        st.auth()
            .rename_device(&ctx, &id, &b.name)
            .await
            .map(|()| json!({"id": id, "name": b.name.trim()})),
    )
}

async fn revoke(State(st): State<App>, Path(id): Path<String>, Caller(ctx): Caller) -> Response {
    reply(
        st.auth()
            .revoke_device(&ctx, &id)
            .await
            .map(|n| json!({"revoked": id, "sessions_revoked": n})),
    )
}

#[derive(Deserialize)]
struct RevokeAllQuery {
    #[serde(default)]
    keep_current: bool,
}

async fn revoke_all(
    State(st): State<App>,
    Query(q): Query<RevokeAllQuery>,
    Caller(ctx): Caller,
) -> Response {
    let r = st.auth().revoke_all_devices(&ctx, q.keep_current).await;
    let mut resp = reply(r.map(|n| json!({"sessions_revoked": n, "kept_current": q.keep_current})));
    if !q.keep_current && resp.status().is_success() {
        if let Ok(v) = st.auth().clear_cookie_header().parse() {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    resp
}

/// The device cookie for `id` (kept ~400 days, sent only to `/auth`).
pub fn device_cookie_header(id: &str, secure: bool) -> String {
    format!(
        "{DEVICE_COOKIE}={id}; Path=/auth; HttpOnly; SameSite=Lax; Max-Age=34560000{}",
        if secure { "; Secure" } else { "" }
    )
}
