//! OAuth2 authorization code with PKCE (S256) for the vault: `GET /vault/oauth/{provider}/start`
//! (admin) answers the provider's authorization URL (or redirects there with `?redirect=1`);
//! `GET /vault/oauth/{provider}/callback?code=&state=` exchanges the code (the one-time `state`
//! is the only credential it accepts) and stores the tokens as the vault secret named after the
//! provider. Access tokens are refreshed before they expire (`refresh_margin_secs`) and when an
//! API answers 401; a refused refresh (revoked grant) is `OAUTH_FAILED` naming the fix.
//!
//! Providers are `[vault.oauth.<name>]` sections with a `preset` (google, spotify, github) or
//! their own URLs. Owns the pending authorizations (memory, 10 minutes) and the token requests;
//! storage of the tokens is the vault's.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use serde::Deserialize;
use sha2::Digest;
use zeroize::Zeroizing;

use crate::core::{Error, ErrorCode, Result};

/// One `[vault.oauth.<name>]` provider.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Provider {
    /// `google`, `spotify` or `github`: fills the URLs and hosts left out.
    pub preset: Option<String>,
    pub auth_url: Option<String>,
    pub token_url: Option<String>,
    pub client_id: String,
    pub client_secret: Option<String>,
    pub scopes: Vec<String>,
    /// Where the provider sends the browser back; default: this server's
    /// `/vault/oauth/<name>/callback` as the start request reached it.
    pub redirect_uri: Option<String>,
    /// API hosts the token may be sent to (presets have defaults).
    pub hosts: Vec<String>,
    /// Functions that may use the token.
    pub functions: Vec<String>,
    /// Refresh this many seconds before the access token expires (default 60).
    pub refresh_margin_secs: Option<f64>,
}

impl Provider {
    fn preset_urls(&self) -> (Option<&'static str>, Option<&'static str>, &'static [&'static str]) {
        match self.preset.as_deref() {
            Some("google") => (
                Some("https://accounts.google.com/o/oauth2/v2/auth"),
                Some("https://oauth2.googleapis.com/token"),
                &["*.googleapis.com"],
            ),
            Some("spotify") => (
                Some("https://accounts.spotify.com/authorize"),
                Some("https://accounts.spotify.com/api/token"),
                &["api.spotify.com"],
            ),
            Some("github") => (
                Some("https://github.com/login/oauth/authorize"),
                Some("https://github.com/login/oauth/access_token"),
                &["api.github.com"],
            ),
            _ => (None, None, &[]),
        }
    }

    pub fn validate(&self, name: &str) -> anyhow::Result<()> {
        if let Some(p) = &self.preset {
            anyhow::ensure!(
                matches!(p.as_str(), "google" | "spotify" | "github"),
                "[vault.oauth.{name}] preset {p} is not google, spotify or github"
            );
        }
        anyhow::ensure!(self.auth_url().is_some() && self.token_url().is_some(), "[vault.oauth.{name}] needs auth_url and token_url (or a preset)");
        anyhow::ensure!(!self.client_id.is_empty(), "[vault.oauth.{name}] needs client_id");
        anyhow::ensure!(!self.hosts().is_empty(), "[vault.oauth.{name}] needs hosts the token is bound to");
        anyhow::ensure!(!self.functions.is_empty(), "[vault.oauth.{name}] needs functions that may use the token");
        Ok(())
    }

    pub fn auth_url(&self) -> Option<String> {
        self.auth_url.clone().or(self.preset_urls().0.map(String::from))
    }
    pub fn token_url(&self) -> Option<String> {
        self.token_url.clone().or(self.preset_urls().1.map(String::from))
    }
    pub fn hosts(&self) -> Vec<String> {
        if self.hosts.is_empty() {
            self.preset_urls().2.iter().map(|s| s.to_string()).collect()
        } else {
            self.hosts.clone()
        }
    }
    pub fn margin(&self) -> f64 {
        self.refresh_margin_secs.unwrap_or(60.0)
    }
}

struct Pending {
    provider: String,
    verifier: Zeroizing<String>,
    redirect_uri: String,
    at: Instant,
}

/// Tokens from a token endpoint.
pub struct Tokens {
    pub access: Zeroizing<String>,
    pub refresh: Option<Zeroizing<String>>,
    pub expires_in: Option<f64>,
}

/// Pending authorizations and the token client.
pub struct OAuth {
    pub providers: BTreeMap<String, Provider>,
    pending: Mutex<HashMap<String, Pending>>,
    client: reqwest::Client,
}

fn random_token(bytes: usize) -> Result<String> {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).map_err(|e| Error::internal(format!("oauth: {e}")))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

const PENDING_TTL: Duration = Duration::from_secs(600);

impl OAuth {
    pub fn new(providers: BTreeMap<String, Provider>) -> anyhow::Result<OAuth> {
        for (n, p) in &providers {
            p.validate(n)?;
        }
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(20))
            .build()?;
        Ok(OAuth { providers, pending: Mutex::new(HashMap::new()), client })
    }

    pub fn provider(&self, name: &str) -> Result<&Provider> {
        self.providers.get(name).ok_or_else(|| {
            Error::new(ErrorCode::NotFound, format!("oauth: no provider '{name}' ([vault.oauth.{name}])"))
        })
    }

    /// The authorization URL for `provider`; `default_redirect` when the provider names none.
    pub fn start(&self, name: &str, default_redirect: String) -> Result<(String, String)> {
        let p = self.provider(name)?;
        let verifier = Zeroizing::new(random_token(48)?);
        let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(sha2::Sha256::digest(verifier.as_bytes()));
        let state = random_token(24)?;
        let redirect_uri = p.redirect_uri.clone().unwrap_or(default_redirect);
        let mut url = url::Url::parse(&p.auth_url().unwrap_or_default())
            .map_err(|e| Error::internal(format!("oauth: auth_url: {e}")))?;
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &p.client_id)
            .append_pair("redirect_uri", &redirect_uri)
            .append_pair("state", &state)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        if !p.scopes.is_empty() {
            url.query_pairs_mut().append_pair("scope", &p.scopes.join(" "));
        }
        let mut m = self.pending.lock().unwrap();
        m.retain(|_, v| v.at.elapsed() < PENDING_TTL);
        if m.len() > 10_000 {
            return Err(Error::new(ErrorCode::TooManyRequests, "oauth: too many pending authorizations"));
        }
        m.insert(state.clone(), Pending { provider: name.to_string(), verifier, redirect_uri, at: Instant::now() });
        Ok((url.to_string(), state))
    }

    /// Exchange `code` for tokens (the `state` must be one `start` issued for `name`).
    pub async fn callback(&self, name: &str, code: &str, state: &str) -> Result<Tokens> {
        let pending = self.pending.lock().unwrap().remove(state);
        let Some(pd) = pending.filter(|p| p.provider == name && p.at.elapsed() < PENDING_TTL) else {
            return Err(Error::new(ErrorCode::AuthenticationFailed, "oauth: unknown or expired state; start again"));
        };
        let p = self.provider(name)?;
        let mut form = vec![
            ("grant_type", "authorization_code".to_string()),
            ("code", code.to_string()),
            ("redirect_uri", pd.redirect_uri.clone()),
            ("code_verifier", pd.verifier.to_string()),
        ];
        self.token_request(name, p, &mut form).await
    }

    /// Use `refresh` for new tokens.
    pub async fn refresh(&self, name: &str, refresh: &str) -> Result<Tokens> {
        let p = self.provider(name)?;
        let mut form = vec![("grant_type", "refresh_token".to_string()), ("refresh_token", refresh.to_string())];
        self.token_request(name, p, &mut form).await
    }

    async fn token_request(&self, name: &str, p: &Provider, form: &mut Vec<(&str, String)>) -> Result<Tokens> {
        form.push(("client_id", p.client_id.clone()));
        if let Some(s) = &p.client_secret {
            form.push(("client_secret", s.clone()));
        }
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form.iter().map(|(k, v)| (*k, v.as_str())))
            .finish();
        for (_, v) in form.iter_mut() {
            zeroize::Zeroize::zeroize(v);
        }
        let r = self
            .client
            .post(p.token_url().unwrap_or_default())
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| Error::new(ErrorCode::OauthFailed, format!("oauth: provider '{name}' token endpoint unreachable: {e}")))?;
        let status = r.status();
        let text = Zeroizing::new(r.text().await.unwrap_or_default());
        let j: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        if !status.is_success() || j.get("error").is_some() {
            let err = j.get("error").and_then(|e| e.as_str()).unwrap_or("error");
            let desc = j.get("error_description").and_then(|e| e.as_str()).unwrap_or("");
            return Err(Error::new(
                ErrorCode::OauthFailed,
                format!(
                    "oauth: provider '{name}' refused ({status}: {err}{}{desc}); authorize again with /vault/oauth/{name}/start",
                    if desc.is_empty() { "" } else { ": " }
                ),
            ));
        }
        let access = j.get("access_token").and_then(|v| v.as_str()).ok_or_else(|| {
            Error::new(ErrorCode::OauthFailed, format!("oauth: provider '{name}' answered no access_token"))
        })?;
        Ok(Tokens {
            access: Zeroizing::new(access.to_string()),
            refresh: j.get("refresh_token").and_then(|v| v.as_str()).map(|s| Zeroizing::new(s.to_string())),
            expires_in: j.get("expires_in").and_then(|v| v.as_f64().or_else(|| v.as_str().and_then(|s| s.parse().ok()))),
        })
    }
}
