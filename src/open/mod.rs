//! `ichibase open`: ichibase as a one-file personal app.
//!
//! Owns the pieces the `open` command needs beyond `serve`: the platform's data directory for
//! the app's files, the local owner account, one-time sign-in links (table
//! `_ichibase_open_links`, route `GET /open/{token}`) that put the owner's session cookie in the
//! browser it opens, and starting that browser. The server itself is the one `serve` runs
//! (`crate::server`); this module must not change how it starts or what it serves otherwise.
//!
//! A link is 32 random bytes (base64url), stored only as its SHA-256, valid for
//! [`LINK_TTL_SECS`] and spent by its first use, so a link left in a browser's history or a
//! terminal's scrollback opens nothing later.

use std::path::PathBuf;
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use rusqlite::{OptionalExtension, params};

use crate::app::App;
use crate::auth::secrets::{hash_secret, random_token};
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::storage::ExecControl;
use crate::storage::migrations::Migration;

/// How long a sign-in link of `ichibase open` stays valid, in seconds.
pub const LINK_TTL_SECS: i64 = 300;

/// The account `ichibase open` signs in as unless `--owner` names another.
pub const DEFAULT_OWNER: &str = "owner@localhost";

/// The module: its table and its one route.
pub struct OpenModule;

static MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "one-time sign-in links",
    sql: "CREATE TABLE _ichibase_open_links (
            token_hash TEXT PRIMARY KEY,
            email TEXT NOT NULL,
            expires_at INTEGER NOT NULL
          ) STRICT",
}];

impl crate::modules::Module for OpenModule {
    fn name(&self) -> &'static str {
        "open"
    }
    fn migrations(&self) -> &'static [Migration] {
        MIGRATIONS
    }
    fn routes(&self) -> Router<App> {
        Router::new().route("/open/{token}", get(follow_link))
    }
}

fn now() -> i64 {
    crate::auth::jwt::now() as i64
}

fn system_ctl() -> std::sync::Arc<ExecControl> {
    ExecControl::new(Instant::now(), 0.0)
}

/// The directory for the app's data when none is given: `$XDG_DATA_HOME/ichibase` or
/// `~/.local/share/ichibase` (Linux and other Unix), `~/Library/Application Support/ichibase`
/// (macOS), `%APPDATA%\ichibase` (Windows).
pub fn default_data_dir() -> anyhow::Result<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if cfg!(windows) {
        if let Some(d) = var("APPDATA") {
            return Ok(d.join("ichibase"));
        }
    } else if cfg!(target_os = "macos") {
        if let Some(h) = var("HOME") {
            return Ok(h.join("Library/Application Support/ichibase"));
        }
    } else {
        if let Some(d) = var("XDG_DATA_HOME").filter(|d| d.is_absolute()) {
            return Ok(d.join("ichibase"));
        }
        if let Some(h) = var("HOME") {
            return Ok(h.join(".local/share/ichibase"));
        }
    }
    anyhow::bail!("no home directory to keep the app's data in; pass --data-dir DIR")
}

/// Make sure the owner account exists (an admin; its password is random and never shown: the
/// owner signs in through the links `open` prints, or sets a password with
/// `ichibase admin create-user` on another account). Returns whether it was created now.
pub async fn ensure_owner(app: &App, email: &str) -> Result<bool> {
    let exists = app
        .auth()
        .list_users()
        .await?
        .iter()
        .any(|u| u.email.eq_ignore_ascii_case(email.trim()));
    if exists {
        return Ok(false);
    }
    app.auth()
        .create_user(email, &random_token(32), "admin")
        .await?;
    Ok(true)
}

/// Store a new one-time sign-in link for `email` and return its path (`/open/<token>`).
pub async fn mint_link(app: &App, email: &str) -> Result<String> {
    let token = random_token(32);
    let (hash, email, expires) = (hash_secret(&token), email.to_string(), now() + LINK_TTL_SECS);
    app.storage()
        .write(&RequestContext::system(), system_ctl(), move |c| {
            let t = now();
            c.execute("DELETE FROM _ichibase_open_links WHERE expires_at <= ?1", [t])?;
            c.execute(
                "INSERT INTO _ichibase_open_links (token_hash, email, expires_at) VALUES (?1, ?2, ?3)",
                params![hash, email, expires],
            )?;
            Ok(())
        })
        .await?;
    Ok(format!("/open/{token}"))
}

/// `GET /open/{token}`: spend the link, start the owner's session (device "ichibase open"),
/// set its cookie and go to the canvas. An unknown, spent or expired link is 401.
async fn follow_link(State(app): State<App>, Path(token): Path<String>) -> Response {
    match spend(&app, &token).await {
        Ok(email) => match app
            .auth()
            .signin_verified(&email, Some("ichibase open".into()))
            .await
        {
            Ok(tokens) => {
                let mut r = (StatusCode::SEE_OTHER, [(header::LOCATION, "/canvas")]).into_response();
                if let Ok(v) = HeaderValue::from_str(&app.auth().cookie_header(&tokens.refresh_token)) {
                    r.headers_mut().insert(header::SET_COOKIE, v);
                }
                r.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                r
            }
            Err(e) => crate::apis::error_response(&e, true, None),
        },
        Err(e) => crate::apis::error_response(&e, true, None),
    }
}

async fn spend(app: &App, token: &str) -> Result<String> {
    if token.len() > 128 {
        return Err(expired());
    }
    let hash = hash_secret(token);
    let found = app
        .storage()
        .write(&RequestContext::system(), system_ctl(), move |c| {
            let row: Option<(String, i64)> = c
                .query_row(
                    "DELETE FROM _ichibase_open_links WHERE token_hash = ?1 RETURNING email, expires_at",
                    [hash],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            Ok(row)
        })
        .await?;
    match found {
        Some((email, expires)) if expires > now() => Ok(email),
        _ => Err(expired()),
    }
}

fn expired() -> Error {
    Error::new(
        ErrorCode::AuthenticationFailed,
        "This sign-in link is unknown, already used or expired; run `ichibase open` again for a new one",
    )
}

/// Open `url` in the user's browser: `$BROWSER` when set (a command, given the URL as its last
/// argument), else the platform's opener (`xdg-open`, `open`, `cmd /c start`).
pub fn open_browser(url: &str) -> anyhow::Result<()> {
    let mut cmd = if let Some(b) = std::env::var_os("BROWSER").filter(|b| !b.is_empty()) {
        std::process::Command::new(b)
    } else if cfg!(windows) {
        let mut c = std::process::Command::new("cmd");
        c.args(["/C", "start", ""]);
        c
    } else if cfg!(target_os = "macos") {
        std::process::Command::new("open")
    } else {
        std::process::Command::new("xdg-open")
    };
    cmd.arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("could not start a browser ({e}); open {url} yourself"))?;
    // Reap the opener in the background (xdg-open and friends return at once).
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    Ok(())
}
