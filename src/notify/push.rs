//! Web Push: RFC 8030 delivery, RFC 8291 `aes128gcm` payload encryption (web-push-native) and
//! RFC 8292 VAPID (an ES256 JWT signed here, with the push service's origin as `aud`).
//!
//! The VAPID key pair is generated on first use and kept in `_ichibase_notify_keys`; browsers
//! subscribe with its public key (`GET /notify/push/vapid`). Subscriptions are per user and
//! device (`_ichibase_notify_push_subscriptions`); a push goes to every device of the user, and
//! a push service answering 404 or 410 removes that subscription.
//!
//! Owns the subscription and key tables; must not touch the outbox table.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};
use web_push_native::jwt_simple::prelude::*;

use super::outbox::{Claimed, Delivery};
use super::{Notify, now_ms};
use crate::app::App;
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::storage::ExecControl;

/// The server's VAPID key pair.
pub struct Vapid {
    pub key: ES256KeyPair,
    /// The public key, uncompressed point, base64url without padding (the browser's
    /// `applicationServerKey`).
    pub public_b64: String,
}

impl Vapid {
    fn from_bytes(raw: &[u8]) -> Result<Vapid> {
        let key = ES256KeyPair::from_bytes(raw)
            .map_err(|e| Error::internal(format!("the stored VAPID key is unreadable: {e}")))?;
        let public_b64 = b64url(&key.public_key().public_key().to_bytes_uncompressed());
        Ok(Vapid { key, public_b64 })
    }

    /// `Authorization: vapid t=<JWT>, k=<public key>` for `endpoint`.
    pub fn authorization(&self, endpoint: &reqwest::Url, subject: &str) -> Result<String> {
        let aud = endpoint.origin().ascii_serialization();
        let claims = Claims::create(web_push_native::jwt_simple::prelude::Duration::from_hours(12))
            .with_audience(aud)
            .with_subject(subject);
        let t = self
            .key
            .sign(claims)
            .map_err(|e| Error::internal(format!("signing the VAPID JWT: {e}")))?;
        Ok(format!("vapid t={t}, k={}", self.public_b64))
    }
}

pub fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim().trim_end_matches('=');
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.replace('+', "-").replace('/', "_"))
        .ok()
}

/// The VAPID key pair: loaded, or generated and stored on first use.
pub async fn vapid(app: &App, n: &Notify) -> Result<Arc<Vapid>> {
    if let Some(v) = n.vapid.lock().unwrap().as_ref() {
        return Ok(Arc::clone(v));
    }
    let fresh = ES256KeyPair::generate().to_bytes();
    let raw: Vec<u8> = app
        .storage()
        .write(&RequestContext::system(), ExecControl::lookup(), move |c| {
            c.execute(
                "INSERT OR IGNORE INTO _ichibase_notify_keys (name, value, created_at) VALUES ('vapid', ?1, ?2)",
                params![fresh, now_ms()],
            )?;
            Ok(c.query_row("SELECT value FROM _ichibase_notify_keys WHERE name = 'vapid'", [], |r| r.get(0))?)
        })
        .await?;
    let v = Arc::new(Vapid::from_bytes(&raw)?);
    *n.vapid.lock().unwrap() = Some(Arc::clone(&v));
    Ok(v)
}

/// A browser's `PushSubscription.toJSON()`, plus the device name it is kept under.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewSubscription {
    /// The device (one subscription per user and device; a new one replaces it). Default: a
    /// hash of the endpoint.
    #[serde(default)]
    pub device: Option<String>,
    pub endpoint: String,
    #[serde(default, rename = "expirationTime")]
    pub expiration_time: Option<Json>,
    pub keys: SubscriptionKeys,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SubscriptionKeys {
    pub p256dh: String,
    pub auth: String,
}

/// A stored subscription.
#[derive(Debug, Clone, Serialize)]
pub struct Subscription {
    pub user_id: String,
    pub device: String,
    pub endpoint: String,
    #[serde(skip)]
    pub p256dh: String,
    #[serde(skip)]
    pub auth: String,
    pub created_ms: i64,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorCode::BadArguments, msg)
}

/// Check a subscription; returns the device name.
pub fn validate(s: &NewSubscription) -> Result<String> {
    let url = reqwest::Url::parse(&s.endpoint)
        .map_err(|e| bad(format!("endpoint {:?} is not a URL: {e}", s.endpoint)))?;
    if !matches!(url.scheme(), "https" | "http") || url.host().is_none() || s.endpoint.len() > 2048 {
        return Err(bad("endpoint must be an http(s) URL of at most 2048 bytes"));
    }
    let p = b64url_decode(&s.keys.p256dh).ok_or_else(|| bad("keys.p256dh is not base64url"))?;
    web_push_native::p256::PublicKey::from_sec1_bytes(&p)
        .map_err(|_| bad("keys.p256dh is not a P-256 public key"))?;
    let a = b64url_decode(&s.keys.auth).ok_or_else(|| bad("keys.auth is not base64url"))?;
    if a.len() != 16 {
        return Err(bad("keys.auth must be 16 bytes"));
    }
    let device = match &s.device {
        Some(d) => d.clone(),
        None => {
            use sha2::Digest;
            b64url(&sha2::Sha256::digest(s.endpoint.as_bytes())[..12])
        }
    };
    if device.is_empty() || device.len() > 200 || device.chars().any(|c| c.is_control()) {
        return Err(bad("device must be 1 to 200 printable characters"));
    }
    Ok(device)
}

/// Store (or replace) the subscription of `user` on `device`.
pub fn save(c: &Connection, user: &str, device: &str, s: &NewSubscription, max: usize) -> Result<()> {
    let exists: bool = c
        .query_row(
            "SELECT 1 FROM _ichibase_notify_push_subscriptions WHERE user_id = ?1 AND device = ?2",
            params![user, device],
            |_| Ok(true),
        )
        .optional()?
        .unwrap_or(false);
    if !exists {
        let count: i64 = c.query_row(
            "SELECT count(*) FROM _ichibase_notify_push_subscriptions WHERE user_id = ?1",
            [user],
            |r| r.get(0),
        )?;
        if count as usize >= max {
            return Err(Error::new(
                ErrorCode::Conflict,
                format!("this user has {count} push subscriptions, the most [notify] max_subscriptions_per_user allows; delete one first"),
            ));
        }
    }
    c.execute(
        "INSERT INTO _ichibase_notify_push_subscriptions (user_id, device, endpoint, p256dh, auth, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (user_id, device) DO UPDATE SET endpoint = excluded.endpoint, p256dh = excluded.p256dh,
           auth = excluded.auth, created_at = excluded.created_at",
        params![user, device, s.endpoint, s.keys.p256dh, s.keys.auth, now_ms()],
    )?;
    Ok(())
}

/// Subscriptions of `user` (every user's when `None`).
pub fn list(c: &Connection, user: Option<&str>) -> Result<Vec<Subscription>> {
    let mut st = c.prepare(
        "SELECT user_id, device, endpoint, p256dh, auth, created_at FROM _ichibase_notify_push_subscriptions
          WHERE ?1 IS NULL OR user_id = ?1 ORDER BY user_id, created_at",
    )?;
    let rows = st.query_map([user], |r| {
        Ok(Subscription {
            user_id: r.get(0)?,
            device: r.get(1)?,
            endpoint: r.get(2)?,
            p256dh: r.get(3)?,
            auth: r.get(4)?,
            created_ms: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// A push as queued.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Push {
    pub user: String,
    pub title: String,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub data: Option<Json>,
}

/// Deliver one claimed push to every device of its user not reached by an earlier attempt.
pub async fn deliver(app: &App, n: &Notify, m: &Claimed) -> Delivery {
    let p: Push = match serde_json::from_str(&m.payload) {
        Ok(p) => p,
        Err(e) => return Delivery::Fail(format!("unreadable message: {e}"), None),
    };
    let vapid = match vapid(app, n).await {
        Ok(v) => v,
        Err(e) => return Delivery::Retry(e.message, None),
    };
    let user = p.user.clone();
    let subs = match app
        .storage()
        .read(&RequestContext::system(), ExecControl::lookup(), move |c| list(c, Some(&user)))
        .await
    {
        Ok(s) => s,
        Err(e) => return Delivery::Retry(e.message, None),
    };
    let done: Vec<String> = m
        .result
        .as_ref()
        .and_then(|r| r.get("delivered"))
        .and_then(|d| serde_json::from_value(d.clone()).ok())
        .unwrap_or_default();
    if subs.is_empty() && done.is_empty() {
        return Delivery::Fail(format!("user {} has no push subscriptions", p.user), None);
    }
    let payload = json!({"id": m.id, "title": p.title, "body": p.body, "url": p.url, "data": p.data}).to_string();
    let mut delivered = done.clone();
    let earlier = |k: &str| m.result.as_ref().and_then(|r| r.get(k)).cloned();
    let mut gone: Vec<Json> = earlier("gone").and_then(|g| serde_json::from_value(g).ok()).unwrap_or_default();
    let mut failed = match earlier("failed") {
        Some(Json::Object(f)) => f,
        _ => serde_json::Map::new(),
    };
    let mut retry = Vec::new();
    let skip: Vec<String> = failed.keys().cloned().chain(done.iter().cloned()).collect();
    for s in subs.iter().filter(|s| !skip.contains(&s.device)) {
        match send_one(n, &vapid, s, &payload, &m.id).await {
            Ok(()) => delivered.push(s.device.clone()),
            Err(SendError::Gone(code)) => {
                let (u, d) = (s.user_id.clone(), s.device.clone());
                let _ = app
                    .storage()
                    .write(&RequestContext::system(), ExecControl::lookup(), move |c| {
                        Ok(c.execute(
                            "DELETE FROM _ichibase_notify_push_subscriptions WHERE user_id = ?1 AND device = ?2",
                            params![u, d],
                        )?)
                    })
                    .await;
                gone.push(json!({"device": s.device, "status": code}));
            }
            Err(SendError::Permanent(e)) => {
                failed.insert(s.device.clone(), json!(e));
            }
            Err(SendError::Temporary(e)) => retry.push(format!("{}: {e}", s.device)),
        }
    }
    let result = json!({"delivered": delivered, "gone": gone, "failed": failed});
    if !retry.is_empty() {
        Delivery::Retry(retry.join("; "), Some(result))
    } else if !delivered.is_empty() {
        Delivery::Sent(result)
    } else if failed.is_empty() {
        Delivery::Fail("every subscription of the user is gone (404/410)".into(), Some(result))
    } else {
        Delivery::Fail(format!("every push service refused: {}", Json::Object(failed.clone())), Some(result))
    }
}

enum SendError {
    Gone(u16),
    Permanent(String),
    Temporary(String),
}

async fn send_one(n: &Notify, vapid: &Vapid, s: &Subscription, payload: &str, id: &str) -> std::result::Result<(), SendError> {
    let url = reqwest::Url::parse(&s.endpoint).map_err(|e| SendError::Permanent(e.to_string()))?;
    let ua_public = b64url_decode(&s.p256dh)
        .and_then(|b| web_push_native::p256::PublicKey::from_sec1_bytes(&b).ok())
        .ok_or_else(|| SendError::Permanent("bad p256dh".into()))?;
    let auth = b64url_decode(&s.auth)
        .filter(|a| a.len() == 16)
        .ok_or_else(|| SendError::Permanent("bad auth secret".into()))?;
    let auth: [u8; 16] = auth.try_into().map_err(|_| SendError::Permanent("bad auth secret".into()))?;
    let auth = web_push_native::Auth::from(auth);
    let body = web_push_native::encrypt(payload.as_bytes().to_vec(), &ua_public, &auth)
        .map_err(|e| SendError::Permanent(format!("encrypting: {e}")))?;
    let authorization = vapid
        .authorization(&url, &n.settings.vapid_subject)
        .map_err(|e| SendError::Temporary(e.message))?;
    let resp = n
        .http
        .post(url)
        .timeout(Duration::from_secs_f64(n.settings.push_timeout_secs))
        .header("TTL", n.settings.push_ttl_secs.to_string())
        .header("Content-Encoding", "aes128gcm")
        .header("Content-Type", "application/octet-stream")
        .header("Urgency", "normal")
        // RFC 8030 §5.4: a resend after a crash replaces the first copy if it is still queued.
        .header("Topic", &id[..id.len().min(32)])
        .header("Authorization", authorization)
        .body(body)
        .send()
        .await
        .map_err(|e| SendError::Temporary(e.to_string()))?;
    let code = resp.status().as_u16();
    match code {
        200..=299 => Ok(()),
        404 | 410 => Err(SendError::Gone(code)),
        429 | 500..=599 => Err(SendError::Temporary(format!("push service answered {code}"))),
        _ => {
            let text = resp.text().await.unwrap_or_default();
            Err(SendError::Permanent(format!("push service answered {code}: {}", text.chars().take(300).collect::<String>())))
        }
    }
}
