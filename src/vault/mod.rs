//! The credential vault: secrets encrypted at rest (AES-256-GCM), each scoped to the functions
//! that may use it and bound to the hosts it may be sent to. Lua never sees a value: it gets a
//! reference (`vault.bearer("spotify")`, `vault.ref("name")`, `vault.basic("name", "user")`) that
//! `http.fetch` substitutes as the request leaves, and only toward a bound host.
//!
//! Admin API: `PUT /vault/{name}` (`{"value", "functions", "hosts", "expires_at"?}`),
//! `DELETE /vault/{name}`, `GET /vault` (names, scopes, hosts, expiry — never values),
//! `POST /vault/rotate` (re-encrypt every secret with the current key; old keys stay readable
//! while listed in `[vault] old_keys`).
//!
//! Owns the `_ichibase_vault` table, the `[vault]` section and the `vault` Lua global. Every
//! value is handed to the privacy guard (`crate::egress::guard`) so it is redacted wherever Lua
//! might try to send it itself.

pub mod crypto;
pub mod oauth;

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::RwLock;

use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use mlua::{Lua, UserData, UserDataMethods};
use serde::{Deserialize, Serialize};
use serde_json::json;
use zeroize::Zeroizing;

use crate::apis::{Admin, App, JsonBody, admin_area, reply};
use crate::app::AppBuilder;
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::lua::Env;
use crate::lua::components::{Component, lua_err};
use crate::storage::ExecControl;
use crate::storage::migrations::Migration;

/// `[vault]` in ichibase.toml (or `ICHIBASE_VAULT__KEY`, ...).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct VaultSettings {
    /// The encryption key: 32 bytes in base64. Without it (and without `key_file`) a key is
    /// generated once in `<data-dir>/vault.key`.
    pub key: Option<String>,
    /// A file holding the key (base64).
    pub key_file: Option<String>,
    /// Earlier keys (base64), still accepted for reading until `POST /vault/rotate`
    /// re-encrypted everything with the current key.
    pub old_keys: Vec<String>,
    /// OAuth2 providers by name (`[vault.oauth.<name>]`); their tokens are the secret `<name>`.
    pub oauth: std::collections::BTreeMap<String, oauth::Provider>,
}

/// How a reference is written into a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefFormat {
    /// The value as it is.
    Raw,
    /// `Bearer <value>`.
    Bearer,
    /// `Basic base64(user:value)`.
    Basic(String),
}

/// What Lua holds instead of a secret.
#[derive(Debug, Clone)]
pub struct VaultRef {
    pub name: String,
    pub format: RefFormat,
}

impl UserData for VaultRef {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        m.add_meta_method("__tostring", |_, r, ()| Ok(format!("vault:{}", r.name)));
    }
}

/// One stored secret, decrypted in memory.
struct Entry {
    value: Zeroizing<String>,
    /// The OAuth2 provider of a token (refreshable).
    provider: Option<String>,
    refresh: Option<Zeroizing<String>>,
    functions: Vec<String>,
    hosts: Vec<String>,
    expires_at: Option<f64>,
}

/// What `GET /vault` shows of a secret.
#[derive(Debug, Serialize)]
pub struct Listing {
    pub name: String,
    pub functions: Vec<String>,
    pub hosts: Vec<String>,
    pub expires_at: Option<f64>,
    pub key_id: String,
    pub updated_at: f64,
}

/// The vault service.
pub struct Vault {
    keys: crypto::Keys,
    storage: crate::storage::Storage,
    cache: RwLock<Option<HashMap<String, Entry>>>,
    guard: std::sync::OnceLock<std::sync::Arc<crate::egress::Guard>>,
    pub oauth: oauth::OAuth,
    refreshing: tokio::sync::Mutex<()>,
    /// When each token was last refreshed (concurrent 401s refresh once).
    refreshed: std::sync::Mutex<HashMap<String, f64>>,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 128
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(Error::new(
            ErrorCode::BadArguments,
            format!("vault: bad secret name {name:?} (1-128 of A-Z a-z 0-9 _ - .)"),
        ));
    }
    Ok(())
}

fn fn_matches(pattern: &str, function: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(p) => function.starts_with(p),
        None => pattern == function,
    }
}

fn host_matches(pattern: &str, host: &str) -> bool {
    let p = pattern.to_ascii_lowercase();
    match p.strip_prefix("*.") {
        Some(s) => host.ends_with(&format!(".{s}")),
        None => p == host,
    }
}

impl Vault {
    pub fn new(s: &VaultSettings, storage: crate::storage::Storage, data_dir: &std::path::Path) -> anyhow::Result<Vault> {
        let keys = crypto::Keys::from_settings(s, data_dir)?;
        Ok(Vault {
            keys,
            storage,
            cache: RwLock::new(None),
            guard: std::sync::OnceLock::new(),
            oauth: oauth::OAuth::new(s.oauth.clone())?,
            refreshing: tokio::sync::Mutex::new(()),
            refreshed: std::sync::Mutex::new(HashMap::new()),
        })
    }

    fn sys() -> RequestContext {
        RequestContext::system()
    }

    /// Decrypt every row into the cache (once; again after a change).
    async fn load(&self) -> Result<()> {
        if self.cache.read().unwrap().is_some() {
            return Ok(());
        }
        let rows = self
            .storage
            .read(&Self::sys(), ExecControl::lookup(), |c| {
                let mut st = c
                    .prepare("SELECT name, nonce, ciphertext, key_id, functions, hosts, expires_at, provider, refresh_nonce, refresh_ct FROM _ichibase_vault")
                    .map_err(|e| Error::from_sqlite(&e))?;
                let rows = st
                    .query_map([], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, Vec<u8>>(1)?,
                            r.get::<_, Vec<u8>>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, String>(4)?,
                            r.get::<_, String>(5)?,
                            r.get::<_, Option<f64>>(6)?,
                            r.get::<_, Option<String>>(7)?,
                            r.get::<_, Option<Vec<u8>>>(8)?,
                            r.get::<_, Option<Vec<u8>>>(9)?,
                        ))
                    })
                    .map_err(|e| Error::from_sqlite(&e))?
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| Error::from_sqlite(&e))?;
                Ok(rows)
            })
            .await?;
        let mut m = HashMap::new();
        for (name, nonce, ct, key_id, f, h, exp, provider, rn, rc) in rows {
            let value = self.keys.decrypt(&key_id, &nonce, &ct, name.as_bytes()).map_err(|e| {
                Error::internal(format!("vault: secret '{name}' cannot be decrypted: {e}"))
            })?;
            let refresh = match (rn, rc) {
                (Some(n), Some(c)) => Some(
                    self.keys
                        .decrypt(&key_id, &n, &c, format!("{name}#refresh").as_bytes())
                        .map_err(|e| Error::internal(format!("vault: refresh token of '{name}' cannot be decrypted: {e}")))?,
                ),
                _ => None,
            };
            m.insert(
                name,
                Entry {
                    value,
                    provider,
                    refresh,
                    functions: serde_json::from_str(&f).unwrap_or_default(),
                    hosts: serde_json::from_str(&h).unwrap_or_default(),
                    expires_at: exp,
                },
            );
        }
        if let Some(g) = self.guard.get() {
            g.set_dynamic_secrets(
                m.values()
                    .flat_map(|e| std::iter::once(e.value.as_str()).chain(e.refresh.as_ref().map(|r| r.as_str()))),
            );
        }
        *self.cache.write().unwrap() = Some(m);
        Ok(())
    }

    fn invalidate(&self) {
        *self.cache.write().unwrap() = None;
    }

    /// Store (or replace) a secret.
    pub async fn put(&self, name: &str, value: &str, functions: Vec<String>, hosts: Vec<String>, expires_at: Option<f64>) -> Result<()> {
        check_name(name)?;
        if value.is_empty() || value.len() > 64 * 1024 {
            return Err(Error::new(ErrorCode::BadArguments, "vault: a value is 1 byte to 64 KiB"));
        }
        if hosts.is_empty() {
            return Err(Error::new(ErrorCode::BadArguments, "vault: a secret needs at least one bound host (hosts)"));
        }
        if functions.is_empty() {
            return Err(Error::new(ErrorCode::BadArguments, "vault: a secret needs at least one function that may use it (functions)"));
        }
        self.store(name, value, functions, hosts, expires_at, None, None).await
    }

    /// Write one secret row (and the cache): a plain secret, or an OAuth2 token of `provider`.
    #[allow(clippy::too_many_arguments)]
    async fn store(
        &self,
        name: &str,
        value: &str,
        functions: Vec<String>,
        hosts: Vec<String>,
        expires_at: Option<f64>,
        provider: Option<String>,
        refresh: Option<&str>,
    ) -> Result<()> {
        let (key_id, nonce, ct) = self.keys.encrypt(value.as_bytes(), name.as_bytes())?;
        let (rn, rc) = match refresh {
            Some(r) => {
                let (_, n, c) = self.keys.encrypt(r.as_bytes(), format!("{name}#refresh").as_bytes())?;
                (Some(n), Some(c))
            }
            None => (None, None),
        };
        let (name, f, h) = (
            name.to_string(),
            serde_json::to_string(&functions).unwrap(),
            serde_json::to_string(&hosts).unwrap(),
        );
        let t = now();
        self.storage
            .write(&Self::sys(), ExecControl::lookup(), move |c| {
                c.execute(
                    "INSERT INTO _ichibase_vault (name, nonce, ciphertext, key_id, functions, hosts, expires_at, updated_at, provider, refresh_nonce, refresh_ct)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                     ON CONFLICT(name) DO UPDATE SET nonce = excluded.nonce, ciphertext = excluded.ciphertext,
                       key_id = excluded.key_id, functions = excluded.functions, hosts = excluded.hosts,
                       expires_at = excluded.expires_at, updated_at = excluded.updated_at, provider = excluded.provider,
                       refresh_nonce = excluded.refresh_nonce, refresh_ct = excluded.refresh_ct",
                    rusqlite::params![name, nonce, ct, key_id, f, h, expires_at, t, provider, rn, rc],
                )
                .map_err(|e| Error::from_sqlite(&e))?;
                Ok(())
            })
            .await?;
        self.invalidate();
        self.load().await
    }

    pub async fn delete(&self, name: &str) -> Result<bool> {
        check_name(name)?;
        let n = name.to_string();
        let gone = self
            .storage
            .write(&Self::sys(), ExecControl::lookup(), move |c| {
                c.execute("DELETE FROM _ichibase_vault WHERE name = ?1", [n])
                    .map_err(|e| Error::from_sqlite(&e))
            })
            .await?;
        self.invalidate();
        self.load().await?;
        Ok(gone > 0)
    }

    pub async fn list(&self) -> Result<Vec<Listing>> {
        self.storage
            .read(&Self::sys(), ExecControl::lookup(), |c| {
                let mut st = c
                    .prepare("SELECT name, functions, hosts, expires_at, key_id, updated_at FROM _ichibase_vault ORDER BY name")
                    .map_err(|e| Error::from_sqlite(&e))?;
                let rows = st
                    .query_map([], |r| {
                        Ok(Listing {
                            name: r.get(0)?,
                            functions: serde_json::from_str(&r.get::<_, String>(1)?).unwrap_or_default(),
                            hosts: serde_json::from_str(&r.get::<_, String>(2)?).unwrap_or_default(),
                            expires_at: r.get(3)?,
                            key_id: r.get(4)?,
                            updated_at: r.get(5)?,
                        })
                    })
                    .map_err(|e| Error::from_sqlite(&e))?
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| Error::from_sqlite(&e))?;
                Ok(rows)
            })
            .await
    }

    /// Re-encrypt every secret with the current key; returns how many were rewritten.
    pub async fn rotate(&self) -> Result<usize> {
        self.invalidate();
        self.load().await?;
        type Row = (String, String, Vec<u8>, Vec<u8>, Option<Vec<u8>>, Option<Vec<u8>>);
        let rows: Vec<Row> = {
            let c = self.cache.read().unwrap();
            let m = c.as_ref().expect("loaded");
            let mut out = Vec::new();
            for (name, e) in m {
                let (kid, nonce, ct) = self.keys.encrypt(e.value.as_bytes(), name.as_bytes())?;
                let (rn, rc) = match &e.refresh {
                    Some(r) => {
                        let (_, n, c) = self.keys.encrypt(r.as_bytes(), format!("{name}#refresh").as_bytes())?;
                        (Some(n), Some(c))
                    }
                    None => (None, None),
                };
                out.push((name.clone(), kid, nonce, ct, rn, rc));
            }
            out
        };
        let n = rows.len();
        self.storage
            .write(&Self::sys(), ExecControl::lookup(), move |c| {
                let tx = c.transaction().map_err(|e| Error::from_sqlite(&e))?;
                for (name, kid, nonce, ct, rn, rc) in rows {
                    tx.execute(
                        "UPDATE _ichibase_vault SET key_id = ?2, nonce = ?3, ciphertext = ?4, refresh_nonce = ?5, refresh_ct = ?6 WHERE name = ?1",
                        rusqlite::params![name, kid, nonce, ct, rn, rc],
                    )
                    .map_err(|e| Error::from_sqlite(&e))?;
                }
                tx.commit().map_err(|e| Error::from_sqlite(&e))
            })
            .await?;
        Ok(n)
    }

    /// May `function` use secret `name`? (Checked when Lua takes a reference.)
    pub fn check_scope(&self, rt: &tokio::runtime::Handle, function: &str, name: &str) -> Result<()> {
        rt.block_on(self.load())?;
        let c = self.cache.read().unwrap();
        let e = c.as_ref().and_then(|m| m.get(name)).ok_or_else(|| {
            Error::new(ErrorCode::VaultDenied, format!("vault: no secret named '{name}'"))
        })?;
        if !e.functions.iter().any(|p| fn_matches(p, function)) {
            return Err(Error::new(
                ErrorCode::VaultDenied,
                format!("vault: function '{function}' may not use secret '{name}'"),
            ));
        }
        Ok(())
    }

    /// Is secret `name` bound to `host`?
    pub fn bound_to(&self, _ctx: &RequestContext, name: &str, host: &str) -> bool {
        let c = self.cache.read().unwrap();
        c.as_ref()
            .and_then(|m| m.get(name))
            .is_some_and(|e| e.hosts.iter().any(|p| host_matches(p, host)))
    }

    /// The header value of reference `r` for `function` toward `host`.
    pub async fn header_value(&self, ctx: &RequestContext, function: &str, r: &VaultRef, host: &str) -> Result<Zeroizing<String>> {
        self.load().await?;
        // An OAuth2 token close to its expiry is refreshed first.
        let due = {
            let c = self.cache.read().unwrap();
            c.as_ref().and_then(|m| m.get(&r.name)).is_some_and(|e| {
                let margin = e
                    .provider
                    .as_ref()
                    .and_then(|p| self.oauth.providers.get(p))
                    .map_or(60.0, |p| p.margin());
                e.provider.is_some() && e.expires_at.is_some_and(|x| x - margin <= now())
            })
        };
        if due {
            self.refresh(ctx, &r.name).await?;
        }
        let c = self.cache.read().unwrap();
        let e = c.as_ref().and_then(|m| m.get(&r.name)).ok_or_else(|| {
            Error::new(ErrorCode::VaultDenied, format!("vault: no secret named '{}'", r.name))
        })?;
        if !e.functions.iter().any(|p| fn_matches(p, function)) {
            return Err(Error::new(ErrorCode::VaultDenied, format!("vault: function '{function}' may not use secret '{}'", r.name)));
        }
        if !e.hosts.iter().any(|p| host_matches(p, host)) {
            return Err(Error::new(ErrorCode::VaultDenied, format!("vault: secret '{}' is not bound to host {host}", r.name)));
        }
        if e.expires_at.is_some_and(|x| x <= now()) {
            return Err(Error::new(ErrorCode::VaultDenied, format!("vault: secret '{}' has expired", r.name)));
        }
        use base64::Engine;
        Ok(Zeroizing::new(match &r.format {
            RefFormat::Raw => e.value.as_str().to_string(),
            RefFormat::Bearer => format!("Bearer {}", e.value.as_str()),
            RefFormat::Basic(user) => format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{}", e.value.as_str()))
            ),
        }))
    }

    /// Is `name` an OAuth2 token the vault can refresh?
    pub fn is_oauth(&self, _ctx: &RequestContext, name: &str) -> bool {
        let c = self.cache.read().unwrap();
        c.as_ref().and_then(|m| m.get(name)).is_some_and(|e| e.provider.is_some())
    }

    /// Refresh OAuth2 token `name` with its refresh token (one refresh at a time).
    pub async fn refresh(&self, _ctx: &RequestContext, name: &str) -> Result<()> {
        let started = now();
        let _one = self.refreshing.lock().await;
        self.load().await?;
        let (provider, refresh) = {
            let c = self.cache.read().unwrap();
            let e = c.as_ref().and_then(|m| m.get(name)).ok_or_else(|| {
                Error::new(ErrorCode::VaultDenied, format!("vault: no secret named '{name}'"))
            })?;
            (e.provider.clone(), e.refresh.clone())
        };
        let Some(provider) = provider else {
            return Err(Error::new(ErrorCode::VaultDenied, format!("vault: secret '{name}' is not an OAuth2 token")));
        };
        // Another call refreshed it while this one waited.
        if self.refreshed_since(name, started) {
            return Ok(());
        }
        let Some(refresh) = refresh else {
            return Err(Error::new(
                ErrorCode::OauthFailed,
                format!("oauth: '{name}' has no refresh token; authorize again with /vault/oauth/{provider}/start"),
            ));
        };
        let t = self.oauth.refresh(&provider, &refresh).await?;
        let keep = t.refresh.clone().unwrap_or(refresh);
        self.save_tokens(&provider, name, t.access.as_str(), Some(keep.as_str()), t.expires_in).await
    }

    fn refreshed_since(&self, name: &str, t: f64) -> bool {
        self.refreshed.lock().unwrap().get(name).is_some_and(|x| *x >= t)
    }

    /// Store tokens of `provider` as secret `name`.
    pub async fn save_tokens(&self, provider: &str, name: &str, access: &str, refresh: Option<&str>, expires_in: Option<f64>) -> Result<()> {
        let p = self.oauth.provider(provider)?;
        let expires_at = expires_in.map(|s| now() + s);
        self.store(name, access, p.functions.clone(), p.hosts(), expires_at, Some(provider.to_string()), refresh)
            .await?;
        self.refreshed.lock().unwrap().insert(name.to_string(), now());
        Ok(())
    }
}

/// The vault module.
pub struct VaultModule;

static MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "secrets",
    sql: "CREATE TABLE _ichibase_vault (
            name TEXT PRIMARY KEY,
            nonce BLOB NOT NULL,
            ciphertext BLOB NOT NULL,
            key_id TEXT NOT NULL,
            functions TEXT NOT NULL,
            hosts TEXT NOT NULL,
            expires_at REAL,
            updated_at REAL NOT NULL
          ) STRICT",
}, Migration {
    version: 2,
    name: "oauth tokens",
    sql: "ALTER TABLE _ichibase_vault ADD COLUMN provider TEXT;
          ALTER TABLE _ichibase_vault ADD COLUMN refresh_nonce BLOB;
          ALTER TABLE _ichibase_vault ADD COLUMN refresh_ct BLOB;",
}];

impl crate::modules::Module for VaultModule {
    fn name(&self) -> &'static str {
        "vault"
    }
    fn section(&self) -> Option<&'static str> {
        Some("vault")
    }
    fn migrations(&self) -> &'static [Migration] {
        MIGRATIONS
    }
    fn provide(&self, b: &mut AppBuilder) -> anyhow::Result<()> {
        let s: VaultSettings = b.core().config.section("vault")?;
        let v = Vault::new(&s, b.core().storage.clone(), &b.core().config.data_dir)?;
        b.provide(v);
        Ok(())
    }
    fn start(&self, app: &App) -> anyhow::Result<()> {
        // The privacy guard learns every vault value (redacted wherever Lua would send one).
        if let (Some(v), Some(g)) = (app.get::<Vault>(), crate::egress::guard_of(app)) {
            let _ = v.guard.set(g);
            let app = app.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Some(v) = app.get::<Vault>() {
                        if let Err(e) = v.load().await {
                            tracing::error!(error = %e, "loading the vault failed");
                        }
                    }
                });
            }
        }
        Ok(())
    }
    fn routes(&self) -> Router<App> {
        Router::new()
            .route("/vault", get(list))
            .route("/vault/rotate", post(rotate))
            .route("/vault/{name}", put(put_secret).delete(delete_secret))
            .route("/vault/oauth/{provider}/start", get(oauth_start))
            .route("/vault/oauth/{provider}/callback", get(oauth_callback))
            .route_layer(admin_area("managing the vault"))
    }
    fn lua_components(&self) -> &'static [&'static dyn Component] {
        &[&VaultLua]
    }
}

fn vault_of(app: &App) -> Result<&Vault> {
    app.get::<Vault>().ok_or_else(|| Error::internal("the vault is not running"))
}

async fn list(State(app): State<App>, Admin(_): Admin) -> Response {
    let r = async { vault_of(&app)?.list().await }.await;
    reply(r.map(|s| json!({"secrets": s})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    value: String,
    functions: Vec<String>,
    hosts: Vec<String>,
    #[serde(default)]
    expires_at: Option<f64>,
}

async fn put_secret(State(app): State<App>, Admin(_): Admin, Path(name): Path<String>, JsonBody(b): JsonBody<PutBody>) -> Response {
    let r = async {
        vault_of(&app)?.put(&name, &b.value, b.functions, b.hosts, b.expires_at).await
    }
    .await;
    reply(r.map(|_| json!({"name": name, "stored": true})))
}

async fn delete_secret(State(app): State<App>, Admin(_): Admin, Path(name): Path<String>) -> Response {
    let r = async {
        if vault_of(&app)?.delete(&name).await? {
            Ok(json!({"name": name, "deleted": true}))
        } else {
            Err(Error::new(ErrorCode::NotFound, format!("vault: no secret named '{name}'")))
        }
    }
    .await;
    reply(r)
}

async fn rotate(State(app): State<App>, Admin(_): Admin) -> Response {
    let r = async { vault_of(&app)?.rotate().await }.await;
    reply(r.map(|n| json!({"rotated": n})))
}

#[derive(Deserialize)]
struct StartQuery {
    #[serde(default)]
    redirect: Option<String>,
}

/// `GET /vault/oauth/{provider}/start` (admin): the authorization URL, or a redirect to it.
async fn oauth_start(
    State(app): State<App>,
    Admin(_): Admin,
    Path(provider): Path<String>,
    axum::extract::Query(q): axum::extract::Query<StartQuery>,
    headers: axum::http::HeaderMap,
) -> Response {
    let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("localhost").to_string();
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .filter(|s| *s == "https")
        .unwrap_or("http");
    let r = vault_of(&app).and_then(|v| {
        v.oauth.start(&provider, format!("{scheme}://{host}/vault/oauth/{provider}/callback"))
    });
    match r {
        Ok((url, _)) if q.redirect.as_deref().is_some_and(|r| r == "1" || r == "true") => {
            axum::response::Redirect::to(&url).into_response()
        }
        r => reply(r.map(|(url, state)| json!({"authorize_url": url, "state": state}))),
    }
}

#[derive(Deserialize)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

/// `GET /vault/oauth/{provider}/callback`: the provider sends the browser back here.
async fn oauth_callback(
    State(app): State<App>,
    Path(provider): Path<String>,
    axum::extract::Query(q): axum::extract::Query<CallbackQuery>,
) -> Response {
    let r = async {
        if let Some(e) = q.error {
            return Err(Error::new(ErrorCode::OauthFailed, format!("oauth: the provider answered {e}")));
        }
        let (Some(code), Some(state)) = (q.code, q.state) else {
            return Err(Error::new(ErrorCode::BadArguments, "oauth: code and state are required"));
        };
        let v = vault_of(&app)?;
        let t = v.oauth.callback(&provider, &code, &state).await?;
        v.save_tokens(&provider, &provider, t.access.as_str(), t.refresh.as_ref().map(|r| r.as_str()), t.expires_in)
            .await?;
        Ok(json!({"connected": provider, "expires_in": t.expires_in, "refreshable": t.refresh.is_some()}))
    }
    .await;
    reply(r)
}

/// `vault` in Lua: references only.
pub struct VaultLua;

impl Component for VaultLua {
    /// Installed once per pooled state (`lua::pool`): reads the invocation only when called.
    fn reusable(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "vault"
    }

    fn install(&self, lua: &Lua, env: &Rc<Env>) -> mlua::Result<()> {
        let t = lua.create_table()?;
        let mk = |format: fn(Option<String>) -> RefFormat| {
            let e = Rc::clone(env);
            lua.create_function(move |lua, (name, user): (mlua::Value, Option<String>)| {
                let name = match name {
                    mlua::Value::String(s) => s.to_str()?.to_string(),
                    _ => return Err(lua_err(Error::new(ErrorCode::BadArguments, "vault: a secret's name (a string) is needed"))),
                };
                check_name(&name).map_err(lua_err)?;
                let v = e
                    .app
                    .as_ref()
                    .and_then(|a| a.get::<Vault>())
                    .ok_or_else(|| lua_err(Error::new(ErrorCode::NotImplemented, "vault: not available in this context")))?;
                v.check_scope(&e.rt, &e.function, &name).map_err(lua_err)?;
                lua.create_userdata(VaultRef { name, format: format(user) })
            })
        };
        t.set("ref", mk(|_| RefFormat::Raw)?)?;
        t.set("bearer", mk(|_| RefFormat::Bearer)?)?;
        t.set("basic", mk(|u| RefFormat::Basic(u.unwrap_or_default()))?)?;
        lua.globals().set(self.name(), t)
    }
}
