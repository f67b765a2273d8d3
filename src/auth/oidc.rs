//! OpenID Connect sign-in (`[oidc]`): authorization code flow with PKCE (S256), `state` and
//! `nonce`, the ID token verified against the provider's JWKS (signature, `iss`, `aud`, `exp`,
//! `nonce`), and accounts linked by verified email only.
//!
//! - `GET /auth/oidc/{provider}/start[?return_to=/path]` → 303 to the provider, with a
//!   one-time `state` (also set as the `ichibase_oidc` cookie, so the callback must come back
//!   to the browser that started), a `nonce` and a PKCE challenge. The pending sign-in is kept
//!   in `_ichibase_oidc_pending` (state hash, nonce, verifier; `pending_ttl_secs`).
//! - `GET /auth/oidc/{provider}/callback?code=&state=` → the state is spent (once), the code
//!   exchanged, the ID token verified, the identity linked to an account, and a session started
//!   through the auth module: the tokens as JSON (plus the session cookie), or a 303 to
//!   `return_to` with the cookie.
//!
//! Linking: an identity seen before (`_ichibase_oidc_links`, keyed by provider and `sub`) signs
//! in as its user. A new identity with `email_verified = true` links to the account with that
//! email, or creates one (`create_accounts`). With an unverified email it never links to an
//! existing account (`OIDC_NOT_LINKED`); `unverified_email = "new_account"` gives it a new
//! account under a placeholder address instead of refusing.
//!
//! Providers are `[oidc.providers.<name>]` with `discovery_url` (or a preset: `google`,
//! `microsoft`, `apple`, by name or `preset =`), `client_id`, `client_secret`. Discovery
//! documents and key sets are cached (`discovery_cache_secs`); an unknown key id refetches the
//! key set (at most every 10 s). Owns its two tables and routes; sessions are started only by
//! `Auth::sign_in_proven`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rusqlite::{OptionalExtension, params};
use serde::Deserialize;
use serde_json::Value as Json;
use sha2::Digest;

use super::UserInfo;
use super::jwt::now;
use super::safety::{SignInEvent, audit, user_agent};
use super::secrets::{hash_secret, random_token};
use crate::apis::{App, RequestScope, error_response};
use crate::app::AppBuilder;
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::storage::ExecControl;
use crate::storage::migrations::Migration;

/// The cookie binding a pending sign-in to the browser that started it.
pub const STATE_COOKIE: &str = "ichibase_oidc";

/// `[oidc]` in ichibase.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OidcSettings {
    pub providers: BTreeMap<String, ProviderSettings>,
    /// Base URL of this server as the browser reaches it (for `redirect_uri`); default: the
    /// scheme and `Host` of the start request.
    pub public_url: Option<String>,
    /// Create an account for a new identity whose email has none; default: as `--signup-open`.
    pub create_accounts: Option<bool>,
    /// A new identity whose email the provider did not verify: `refuse` (default), or
    /// `new_account` (an account of its own under `<provider>-<id>@oidc.invalid`; never linked to
    /// an existing account).
    pub unverified_email: String,
    /// Role of accounts created here.
    pub new_account_role: String,
    /// How long a started sign-in may take, seconds.
    pub pending_ttl_secs: f64,
    /// Timeout of each request to a provider, seconds.
    pub http_timeout_secs: f64,
    /// Clock skew allowed on `exp`/`iat`/`nbf`, seconds.
    pub leeway_secs: u64,
    /// How long discovery documents and key sets are cached, seconds.
    pub discovery_cache_secs: f64,
}

impl Default for OidcSettings {
    fn default() -> Self {
        OidcSettings {
            providers: BTreeMap::new(),
            public_url: None,
            create_accounts: None,
            unverified_email: "refuse".into(),
            new_account_role: "user".into(),
            pending_ttl_secs: 600.0,
            http_timeout_secs: 10.0,
            leeway_secs: 60,
            discovery_cache_secs: 3600.0,
        }
    }
}

/// `[oidc.providers.<name>]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderSettings {
    /// `google`, `microsoft` or `apple` (default: the provider's name when it is one of them):
    /// fills `discovery_url`.
    pub preset: Option<String>,
    pub discovery_url: Option<String>,
    pub client_id: String,
    pub client_secret: Option<String>,
    /// Default `["openid", "email", "profile"]`.
    pub scopes: Vec<String>,
    /// Default `<public_url>/auth/oidc/<name>/callback`.
    pub redirect_uri: Option<String>,
}

fn preset_url(name: &str) -> Option<&'static str> {
    Some(match name {
        "google" => "https://accounts.google.com/.well-known/openid-configuration",
        "microsoft" => "https://login.microsoftonline.com/common/v2.0/.well-known/openid-configuration",
        "apple" => "https://appleid.apple.com/.well-known/openid-configuration",
        _ => return None,
    })
}

impl ProviderSettings {
    fn discovery(&self, name: &str) -> anyhow::Result<String> {
        if let Some(u) = &self.discovery_url {
            return Ok(u.clone());
        }
        let p = self.preset.as_deref().unwrap_or(name);
        preset_url(p).map(str::to_string).ok_or_else(|| {
            anyhow::anyhow!("[oidc.providers.{name}] needs discovery_url (or preset = google, microsoft or apple)")
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
}

struct Cached<T> {
    value: T,
    at: Instant,
}

/// The OIDC service (`app.get::<Oidc>()`).
pub struct Oidc {
    pub settings: OidcSettings,
    http: reqwest::Client,
    discovery: Mutex<HashMap<String, Cached<Discovery>>>,
    keys: Mutex<HashMap<String, Cached<JwkSet>>>,
}

fn failed(msg: impl Into<String>) -> Error {
    Error::new(ErrorCode::OidcFailed, msg)
}

fn provider_error(msg: impl Into<String>) -> Error {
    Error::new(ErrorCode::OidcProviderError, msg)
}

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

/// The PKCE S256 challenge of a verifier.
pub fn pkce_challenge(verifier: &str) -> String {
    b64(&sha2::Sha256::digest(verifier.as_bytes()))
}

fn https_or_local(u: &str) -> bool {
    u.starts_with("https://") || u.starts_with("http://127.") || u.starts_with("http://localhost") || u.starts_with("http://[::1]")
}

impl Oidc {
    pub fn new(settings: OidcSettings) -> anyhow::Result<Oidc> {
        anyhow::ensure!(
            ["refuse", "new_account"].contains(&settings.unverified_email.as_str()),
            "[oidc] unverified_email must be \"refuse\" or \"new_account\""
        );
        anyhow::ensure!(
            settings.pending_ttl_secs > 0.0 && settings.http_timeout_secs > 0.0 && settings.discovery_cache_secs >= 0.0,
            "[oidc] pending_ttl_secs and http_timeout_secs must be positive"
        );
        for (name, p) in &settings.providers {
            anyhow::ensure!(
                !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                "[oidc.providers.{name}]: provider names are letters, digits, '_' and '-'"
            );
            anyhow::ensure!(!p.client_id.is_empty(), "[oidc.providers.{name}] needs client_id");
            let d = p.discovery(name)?;
            anyhow::ensure!(
                https_or_local(&d),
                "[oidc.providers.{name}] discovery_url must be https:// (http only on a loopback address)"
            );
        }
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs_f64(settings.http_timeout_secs))
            .build()?;
        Ok(Oidc { settings, http, discovery: Mutex::new(HashMap::new()), keys: Mutex::new(HashMap::new()) })
    }

    fn provider(&self, name: &str) -> Result<&ProviderSettings> {
        self.settings.providers.get(name).ok_or_else(|| {
            Error::new(ErrorCode::NotFound, format!("No OpenID Connect provider '{name}' (configure [oidc.providers.{name}])"))
        })
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str, what: &str) -> Result<T> {
        let r = self.http.get(url).send().await.map_err(|e| provider_error(format!("fetching the {what} ({url}): {e}")))?;
        if !r.status().is_success() {
            return Err(provider_error(format!("the {what} ({url}) answered {}", r.status())));
        }
        r.json::<T>().await.map_err(|e| provider_error(format!("the {what} ({url}) is not valid: {e}")))
    }

    async fn discover(&self, name: &str) -> Result<Discovery> {
        let ttl = Duration::from_secs_f64(self.settings.discovery_cache_secs);
        if let Some(c) = self.discovery.lock().unwrap().get(name).filter(|c| c.at.elapsed() < ttl) {
            return Ok(c.value.clone());
        }
        let p = self.provider(name)?;
        let url = p.discovery(name).map_err(|e| provider_error(e.to_string()))?;
        let d: Discovery = self.get_json(&url, "discovery document").await?;
        for u in [&d.authorization_endpoint, &d.token_endpoint, &d.jwks_uri] {
            if !https_or_local(u) {
                return Err(provider_error(format!("the discovery document of '{name}' names a non-HTTPS endpoint {u}")));
            }
        }
        self.discovery.lock().unwrap().insert(name.to_string(), Cached { value: d.clone(), at: Instant::now() });
        Ok(d)
    }

    async fn key_set(&self, name: &str, jwks_uri: &str, refresh: bool) -> Result<JwkSet> {
        let ttl = Duration::from_secs_f64(self.settings.discovery_cache_secs);
        {
            let k = self.keys.lock().unwrap();
            if let Some(c) = k.get(name) {
                // A refetch for an unknown key id at most every 10 s.
                let fresh = if refresh { c.at.elapsed() < Duration::from_secs(10) } else { c.at.elapsed() < ttl };
                if fresh {
                    return Ok(c.value.clone());
                }
            }
        }
        let set: JwkSet = self.get_json(jwks_uri, "key set (JWKS)").await?;
        self.keys.lock().unwrap().insert(name.to_string(), Cached { value: set.clone(), at: Instant::now() });
        Ok(set)
    }

    /// Verify an ID token: signature by a key of the provider's JWKS, issuer, audience,
    /// expiry, and the nonce of the pending sign-in. Returns its claims.
    pub async fn verify_id_token(&self, name: &str, d: &Discovery, token: &str, nonce: &str) -> Result<serde_json::Map<String, Json>> {
        let p = self.provider(name)?;
        let head = jsonwebtoken::decode_header(token).map_err(|e| failed(format!("the ID token is malformed: {e}")))?;
        let alg = head.alg;
        if !matches!(
            alg,
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 | Algorithm::PS256 | Algorithm::PS384 | Algorithm::PS512 | Algorithm::ES256 | Algorithm::ES384 | Algorithm::EdDSA
        ) {
            return Err(failed(format!("the ID token is signed with {alg:?}; only the provider's public-key algorithms are accepted")));
        }
        let find = |set: &JwkSet| -> Option<jsonwebtoken::jwk::Jwk> {
            match &head.kid {
                Some(kid) => set.find(kid).cloned(),
                None if set.keys.len() == 1 => set.keys.first().cloned(),
                None => None,
            }
        };
        let mut jwk = find(&self.key_set(name, &d.jwks_uri, false).await?);
        if jwk.is_none() {
            jwk = find(&self.key_set(name, &d.jwks_uri, true).await?);
        }
        let jwk = jwk.ok_or_else(|| failed("the ID token's key id is not in the provider's key set"))?;
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| provider_error(format!("a key of the provider's key set is unusable: {e}")))?;
        let mut v = Validation::new(alg);
        v.leeway = self.settings.leeway_secs;
        v.set_audience(&[p.client_id.as_str()]);
        // Microsoft's multi-tenant issuer has a `{tenantid}` placeholder: checked below.
        let tenant_issuer = d.issuer.contains("{tenantid}");
        if !tenant_issuer {
            v.set_issuer(&[d.issuer.as_str()]);
        }
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.validate_nbf = true;
        let data = jsonwebtoken::decode::<serde_json::Map<String, Json>>(token, &key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            failed(match e.kind() {
                K::ExpiredSignature => "the ID token has expired".to_string(),
                K::InvalidIssuer => format!("the ID token's issuer is not '{}'", d.issuer),
                K::InvalidAudience => "the ID token was issued for another client (audience)".to_string(),
                K::InvalidSignature => "the ID token's signature does not verify".to_string(),
                K::ImmatureSignature => "the ID token is not valid yet".to_string(),
                other => format!("the ID token is not valid: {other:?}"),
            })
        })?;
        let claims = data.claims;
        if tenant_issuer {
            let tid = claims.get("tid").and_then(Json::as_str).unwrap_or("");
            if tid.is_empty() || claims.get("iss").and_then(Json::as_str) != Some(d.issuer.replace("{tenantid}", tid).as_str()) {
                return Err(failed("the ID token's issuer does not match its tenant"));
            }
        }
        if let Some(Json::Array(aud)) = claims.get("aud")
            && aud.len() > 1
            && claims.get("azp").and_then(Json::as_str) != Some(p.client_id.as_str())
        {
            return Err(failed("the ID token has several audiences and this client is not its authorized party (azp)"));
        }
        match claims.get("nonce").and_then(Json::as_str) {
            Some(n) if n.len() == nonce.len() && constant_eq(n.as_bytes(), nonce.as_bytes()) => {}
            _ => return Err(failed("the ID token's nonce does not match this sign-in")),
        }
        Ok(claims)
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn oidc(app: &App) -> Result<&Oidc> {
    app.get::<Oidc>().ok_or_else(|| Error::internal("the oidc module is not loaded"))
}

fn base_url(s: &OidcSettings, headers: &HeaderMap) -> String {
    if let Some(u) = &s.public_url {
        return u.trim_end_matches('/').to_string();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c)))
        .unwrap_or("127.0.0.1");
    format!("http://{host}")
}

fn redirect_uri(s: &OidcSettings, p: &ProviderSettings, name: &str, headers: &HeaderMap) -> String {
    p.redirect_uri.clone().unwrap_or_else(|| format!("{}/auth/oidc/{name}/callback", base_url(s, headers)))
}

/// A same-site path to return to, or nothing (never another site: no open redirect).
fn safe_return(r: &str) -> Option<String> {
    (r.starts_with('/') && !r.starts_with("//") && !r.contains('\\') && r.len() <= 1000 && !r.chars().any(|c| c.is_control()))
        .then(|| r.to_string())
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name && !v.is_empty()).then(|| v.to_string())
        })
}

// ----- HTTP -----

pub struct OidcModule;

static MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "pending sign-ins, linked identities",
    sql: "CREATE TABLE _ichibase_oidc_pending (
            state_hash TEXT PRIMARY KEY,
            provider TEXT NOT NULL,
            nonce TEXT NOT NULL,
            verifier TEXT NOT NULL,
            redirect_uri TEXT NOT NULL,
            return_to TEXT,
            expires_at INTEGER NOT NULL
          );
          CREATE TABLE _ichibase_oidc_links (
            provider TEXT NOT NULL,
            subject TEXT NOT NULL,
            user_id TEXT NOT NULL,
            email TEXT,
            created_at INTEGER NOT NULL,
            last_used_at INTEGER NOT NULL,
            PRIMARY KEY (provider, subject)
          );
          CREATE INDEX _ichibase_oidc_links_user ON _ichibase_oidc_links (user_id);",
}];

impl crate::modules::Module for OidcModule {
    fn name(&self) -> &'static str {
        "oidc"
    }
    fn section(&self) -> Option<&'static str> {
        Some("oidc")
    }
    fn migrations(&self) -> &'static [Migration] {
        MIGRATIONS
    }
    fn provide(&self, b: &mut AppBuilder) -> anyhow::Result<()> {
        let s: OidcSettings = b.core().config.section("oidc")?;
        b.provide(Oidc::new(s)?);
        Ok(())
    }
    fn routes(&self) -> Router<App> {
        Router::new()
            .route("/auth/oidc/{provider}/start", get(start))
            .route("/auth/oidc/{provider}/callback", get(callback))
    }
}

#[derive(Deserialize)]
struct StartQuery {
    #[serde(default)]
    return_to: Option<String>,
}

async fn sys_write<F, R>(app: &App, f: F) -> Result<R>
where
    F: FnOnce(&mut rusqlite::Connection) -> Result<R> + Send + 'static,
    R: Send + 'static,
{
    app.storage().write(&RequestContext::system(), ExecControl::new(Instant::now(), 0.0), f).await
}

async fn start(State(app): State<App>, Path(name): Path<String>, headers: HeaderMap, Query(q): Query<StartQuery>) -> Response {
    match start_inner(&app, &name, &headers, q).await {
        Ok(r) => r,
        Err(e) => error_response(&e, true, None),
    }
}

async fn start_inner(app: &App, name: &str, headers: &HeaderMap, q: StartQuery) -> Result<Response> {
    let o = oidc(app)?;
    let p = o.provider(name)?.clone();
    let return_to = match q.return_to.as_deref() {
        None | Some("") => None,
        Some(r) => Some(safe_return(r).ok_or_else(|| {
            Error::new(ErrorCode::BadArguments, "return_to must be a path on this server (starting with one '/')")
        })?),
    };
    let d = o.discover(name).await?;
    let (state, nonce, verifier) = (random_token(32), random_token(32), random_token(48));
    let redirect = redirect_uri(&o.settings, &p, name, headers);
    let t = now() as i64;
    let expires = t + o.settings.pending_ttl_secs as i64;
    let (sh, prov, n2, v2, r2, ret2) = (hash_secret(&state), name.to_string(), nonce.clone(), verifier.clone(), redirect.clone(), return_to);
    sys_write(app, move |c| {
        c.execute("DELETE FROM _ichibase_oidc_pending WHERE expires_at < ?1", [t])?;
        c.execute(
            "INSERT INTO _ichibase_oidc_pending (state_hash, provider, nonce, verifier, redirect_uri, return_to, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![sh, prov, n2, v2, r2, ret2, expires],
        )?;
        Ok(())
    })
    .await?;
    let scopes = if p.scopes.is_empty() { "openid email profile".to_string() } else { p.scopes.join(" ") };
    let mut url = reqwest::Url::parse(&d.authorization_endpoint)
        .map_err(|e| provider_error(format!("the authorization endpoint is not a URL: {e}")))?;
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", &p.client_id)
        .append_pair("redirect_uri", &redirect)
        .append_pair("scope", &scopes)
        .append_pair("state", &state)
        .append_pair("nonce", &nonce)
        .append_pair("code_challenge", &pkce_challenge(&verifier))
        .append_pair("code_challenge_method", "S256");
    let secure = redirect.starts_with("https://");
    let cookie = format!(
        "{STATE_COOKIE}={state}; Path=/auth/oidc; HttpOnly; SameSite=Lax; Max-Age={}{}",
        o.settings.pending_ttl_secs as i64,
        if secure { "; Secure" } else { "" }
    );
    let mut r = (StatusCode::SEE_OTHER, [(header::LOCATION, url.to_string())]).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

#[derive(Deserialize)]
struct CallbackQuery {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    id_token: Option<String>,
}

async fn callback(
    State(app): State<App>,
    Path(name): Path<String>,
    scope: RequestScope,
    headers: HeaderMap,
    Query(q): Query<CallbackQuery>,
) -> Response {
    let ua = user_agent(&headers).map(str::to_string);
    let method = format!("oidc:{}", name.chars().take(64).collect::<String>());
    match callback_inner(&app, &name, &scope, &headers, q).await {
        Ok((tokens, return_to)) => {
            audit(&app, SignInEvent { method: &method, ok: true, user_id: Some(&tokens.user.id), email: Some(&tokens.user.email), ip: scope.client(), user_agent: ua.as_deref(), ..Default::default() });
            let auth = app.auth();
            let mut r = match return_to {
                Some(path) => (StatusCode::SEE_OTHER, [(header::LOCATION, path)]).into_response(),
                None => axum::Json(&tokens).into_response(),
            };
            let h = r.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&auth.cookie_header(&tokens.refresh_token)) {
                h.append(header::SET_COOKIE, v);
            }
            if let Ok(v) = HeaderValue::from_str(&format!("{STATE_COOKIE}=; Path=/auth/oidc; HttpOnly; SameSite=Lax; Max-Age=0")) {
                h.append(header::SET_COOKIE, v);
            }
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err((e, email)) => {
            audit(&app, SignInEvent { method: &method, ok: false, reason: Some(&e.message), email: email.as_deref(), ip: scope.client(), user_agent: ua.as_deref(), ..Default::default() });
            error_response(&e, true, None)
        }
    }
}

type Failure = (Error, Option<String>);

async fn callback_inner(
    app: &App,
    name: &str,
    scope: &RequestScope,
    headers: &HeaderMap,
    q: CallbackQuery,
) -> std::result::Result<(super::Tokens, Option<String>), Failure> {
    let plain = |e: Error| (e, None);
    let o = oidc(app).map_err(plain)?;
    let p = o.provider(name).map_err(plain)?.clone();
    if let Some(err) = q.error {
        let d = q.error_description.unwrap_or_default();
        return Err(plain(failed(format!("the provider refused the sign-in: {} {}", err.chars().take(100).collect::<String>(), d.chars().take(300).collect::<String>()))));
    }
    let state = q.state.filter(|s| !s.is_empty() && s.len() <= 200).ok_or_else(|| plain(failed("the callback has no state")))?;
    let code = q.code.filter(|s| !s.is_empty() && s.len() <= 4096).ok_or_else(|| plain(failed("the callback has no code")))?;
    // The state must be the one this browser started with ...
    let cookie = cookie_value(headers, STATE_COOKIE).unwrap_or_default();
    if !constant_eq(cookie.as_bytes(), state.as_bytes()) {
        return Err(plain(failed("the state does not match the sign-in this browser started (bad state, or the sign-in was started elsewhere)")));
    }
    // ... and pending, for this provider, unexpired; it is spent now whatever happens next.
    let (sh, t) = (hash_secret(&state), now() as i64);
    let pending: Option<(String, String, String, String, Option<String>, i64)> = sys_write(app, move |c| {
        Ok(c.query_row(
            "DELETE FROM _ichibase_oidc_pending WHERE state_hash = ?1 RETURNING provider, nonce, verifier, redirect_uri, return_to, expires_at",
            [sh],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
        )
        .optional()?)
    })
    .await
    .map_err(plain)?;
    let Some((prov, nonce, verifier, redirect, return_to, expires)) = pending else {
        return Err(plain(failed("unknown or already used state: start the sign-in again")));
    };
    if prov != name || expires <= t {
        return Err(plain(failed("the sign-in expired or was started for another provider: start again")));
    }
    let d = o.discover(name).await.map_err(plain)?;
    let mut form = vec![
        ("grant_type", "authorization_code".to_string()),
        ("code", code),
        ("redirect_uri", redirect),
        ("client_id", p.client_id.clone()),
        ("code_verifier", verifier),
    ];
    if let Some(s) = &p.client_secret {
        form.push(("client_secret", s.clone()));
    }
    let r = o
        .http
        .post(&d.token_endpoint)
        .header(header::ACCEPT, "application/json")
        .form(&form)
        .send()
        .await
        .map_err(|e| plain(provider_error(format!("the token endpoint failed: {e}"))))?;
    let status = r.status();
    let body = r.text().await.map_err(|e| plain(provider_error(format!("reading the token answer: {e}"))))?;
    if !status.is_success() {
        // A refused code (reused, expired, wrong verifier) is the client's failure.
        return Err(plain(failed(format!("the provider refused the code ({status}): {}", body.chars().take(300).collect::<String>()))));
    }
    let answer: TokenAnswer = serde_json::from_str(&body).map_err(|e| plain(provider_error(format!("the token answer is not valid JSON: {e}"))))?;
    let id_token = answer.id_token.ok_or_else(|| plain(provider_error("the token answer has no id_token (is `openid` in the scopes?)")))?;
    let claims = o.verify_id_token(name, &d, &id_token, &nonce).await.map_err(plain)?;
    let email = claims.get("email").and_then(Json::as_str).map(|e| e.trim().to_string());
    let user = link_account(app, o, name, &claims).await.map_err(|e| (e, email.clone()))?;
    let device = user_agent(headers).map(str::to_string);
    let tokens = app.auth().sign_in_proven(user, device, scope.client()).await.map_err(|e| (e, email))?;
    Ok((tokens, return_to))
}

/// The account an identity signs in as (see the module doc).
async fn link_account(app: &App, o: &Oidc, provider: &str, claims: &serde_json::Map<String, Json>) -> Result<UserInfo> {
    let auth = app.auth();
    let sub = claims.get("sub").and_then(Json::as_str).filter(|s| !s.is_empty() && s.len() <= 255).ok_or_else(|| failed("the ID token has no usable sub"))?.to_string();
    let (prov, sub2, t) = (provider.to_string(), sub.clone(), now() as i64);
    let linked: Option<String> = sys_write(app, move |c| {
        Ok(c.query_row(
            "UPDATE _ichibase_oidc_links SET last_used_at = ?3 WHERE provider = ?1 AND subject = ?2 RETURNING user_id",
            params![prov, sub2, t],
            |r| r.get(0),
        )
        .optional()?)
    })
    .await?;
    if let Some(uid) = linked
        && let Some(u) = auth.find_user(&uid).await?.filter(|u| u.id == uid)
    {
        return Ok(u);
    }
    let email = claims.get("email").and_then(Json::as_str).map(|e| e.trim().to_string()).filter(|e| !e.is_empty());
    let verified = matches!(claims.get("email_verified"), Some(Json::Bool(true))) || claims.get("email_verified").and_then(Json::as_str) == Some("true");
    let create = o.settings.create_accounts.unwrap_or_else(|| auth.signup_open());
    let user = match (email, verified) {
        (Some(email), true) => match auth.find_user(&email).await?.filter(|u| u.email.eq_ignore_ascii_case(&email)) {
            Some(u) => u,
            None if create => {
                let u = auth.create_user_without_password(&email, &o.settings.new_account_role).await?;
                auth.mark_email_verified(&u.id, &u.email).await?;
                u
            }
            None => return Err(Error::new(ErrorCode::OidcNotLinked, "No account has this email and new accounts are not created here ([oidc] create_accounts)")),
        },
        (email, _) => {
            if o.settings.unverified_email != "new_account" || !create {
                return Err(Error::new(
                    ErrorCode::OidcNotLinked,
                    "The provider did not verify this identity's email, so it cannot be linked to an account; verify the email with the provider first",
                ));
            }
            let _ = email;
            let id: String = hash_secret(&format!("{provider}\0{sub}")).chars().take(20).collect();
            let placeholder = format!("{provider}-{id}@oidc.invalid");
            match auth.find_user(&placeholder).await? {
                Some(u) => u,
                None => auth.create_user_without_password(&placeholder, &o.settings.new_account_role).await?,
            }
        }
    };
    let (prov, uid, em, t) = (provider.to_string(), user.id.clone(), user.email.clone(), now() as i64);
    sys_write(app, move |c| {
        c.execute(
            "INSERT INTO _ichibase_oidc_links (provider, subject, user_id, email, created_at, last_used_at) VALUES (?1, ?2, ?3, ?4, ?5, ?5)
             ON CONFLICT (provider, subject) DO UPDATE SET user_id = excluded.user_id, email = excluded.email, last_used_at = excluded.last_used_at",
            params![prov, sub, uid, em, t],
        )?;
        Ok(())
    })
    .await?;
    Ok(user)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_matches_rfc7636_example() {
        assert_eq!(pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"), "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
    }

    #[test]
    fn return_to_stays_on_this_site() {
        assert_eq!(safe_return("/app?x=1").as_deref(), Some("/app?x=1"));
        for bad in ["//evil.example", "https://evil.example", "/\\evil", "app", "/a\nb"] {
            assert!(safe_return(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn presets_and_settings_are_checked() {
        let mut s = OidcSettings::default();
        s.providers.insert("google".into(), ProviderSettings { client_id: "x".into(), ..Default::default() });
        assert!(Oidc::new(s.clone()).is_ok());
        s.providers.insert("corp".into(), ProviderSettings { client_id: "x".into(), ..Default::default() });
        assert!(Oidc::new(s.clone()).is_err(), "a provider that is no preset needs discovery_url");
        s.providers.insert("corp".into(), ProviderSettings { client_id: "x".into(), discovery_url: Some("http://idp.example/.well-known/openid-configuration".into()), ..Default::default() });
        assert!(Oidc::new(s).is_err(), "plain http only on loopback");
    }
}
