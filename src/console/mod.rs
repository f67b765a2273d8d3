//! The console: the web admin UI at `/console`, embedded in the binary, working offline.
//!
//! Owns `GET /console` (the page), `GET /console/assets/{file}` (its compiled script, its style
//! and React, served from the canvas's vendored copy — not duplicated) and the few JSON
//! endpoints the existing admin APIs lack, under `/console/api/` (every one admin-only, 403 to
//! any other role):
//!
//! - `GET /console/api/tables`: tables and views of the app, with columns, policies and grants;
//! - `POST /console/api/query-as` `{user, sql, params?, format?}`: "view as user X" — a
//!   read-only query run by the real SQL engine with X's identity (role, user id, claims), so
//!   the authorizer and the policy views decide what it sees, exactly as for X's own requests;
//! - `POST /console/api/run` `{function, user?, input?}`: run a deployed function as X (or the
//!   admin) with a deep trace, through `lua::invoke` like `POST /fn/{name}`;
//! - `GET /console/api/presence[?channel=]`: open sockets and channels, and who is in one.
//!
//! Everything else the page does goes through the existing APIs (SQL over HTTP, `/fn`,
//! `/trace`, `/analytics`, `/admin/*`, `/branches`, `/generate`). The console must not touch
//! other modules' tables; it reads users through SQL as the engine, and runs work as the
//! chosen identity through the same paths as HTTP.

pub mod compile;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value as Json, json};

use crate::apis::{Admin, App, JsonBody, admin_area, body_limit, error_response, reply};
use crate::app::AppBuilder;
use crate::core::{Error, ErrorCode, RequestContext, Result, Role};
use crate::storage::ExecControl;

/// `[console]` settings.
#[derive(Deserialize, Clone, Debug)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleSettings {
    /// Serve the console at all (`false`: `/console` answers 404; the APIs stay refused to
    /// non-admins either way).
    pub enabled: bool,
    /// Rows per page when browsing a table.
    pub page_rows: u32,
    /// Most rows a "view as user" query returns (lower than the server's `max_result_rows`
    /// when that is lower).
    pub as_user_max_rows: u64,
    /// Longest a "view as user" query may run, seconds.
    pub as_user_timeout_secs: f64,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        ConsoleSettings { enabled: true, page_rows: 50, as_user_max_rows: 10_000, as_user_timeout_secs: 30.0 }
    }
}

pub struct Console {
    pub settings: ConsoleSettings,
}

pub struct ConsoleModule;

impl crate::modules::Module for ConsoleModule {
    fn name(&self) -> &'static str {
        "console"
    }
    fn section(&self) -> Option<&'static str> {
        Some("console")
    }
    fn provide(&self, b: &mut AppBuilder) -> anyhow::Result<()> {
        let settings: ConsoleSettings = b.core().config.section("console")?;
        anyhow::ensure!((1..=10_000).contains(&settings.page_rows), "[console] page_rows must be 1..=10000");
        anyhow::ensure!(settings.as_user_max_rows >= 1, "[console] as_user_max_rows must be positive");
        anyhow::ensure!(
            settings.as_user_timeout_secs > 0.0 && settings.as_user_timeout_secs.is_finite(),
            "[console] as_user_timeout_secs must be positive"
        );
        b.provide(Console { settings });
        Ok(())
    }
    fn routes(&self) -> Router<App> {
        routes()
    }
}

fn settings(app: &App) -> ConsoleSettings {
    app.get::<Console>().map(|c| c.settings.clone()).unwrap_or_default()
}

fn routes() -> Router<App> {
    const AREA: &str = "the console's API";
    let api = Router::new()
        .route("/console/api/tables", get(tables))
        .route("/console/api/query-as", post(query_as))
        .route("/console/api/run", post(run))
        .route("/console/api/presence", get(presence))
        .route_layer(admin_area(AREA))
        .layer(body_limit(crate::apis::BodyLimit::Json));
    Router::new()
        .route("/console", get(page))
        .route("/console/", get(page))
        .route("/console/assets/{file}", get(asset))
        .layer(tower_http::compression::CompressionLayer::new())
        .merge(api)
}

// ---- the page and its assets

const CSS: &str = include_str!("ui/console.css");

/// The import map: bare specifiers → the console's assets (React from the canvas's copy).
const IMPORT_MAP: &str = r#"{"imports":{"react":"/console/assets/react.js","react/jsx-runtime":"/console/assets/jsx-runtime.js","react-dom/client":"/console/assets/react-dom-client.js"}}"#;

/// Files of the canvas's vendored React the console serves (same bytes, one copy in the binary).
const VENDOR: &[&str] = &["react-all.js", "react.js", "react-dom-client.js", "jsx-runtime.js", "LICENSE-react.txt"];

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static(""))
}

fn not_found() -> Response {
    error_response(&Error::new(ErrorCode::NotFound, "No route for /console (the console is off: [console] enabled)"), true, None)
}

async fn page(State(st): State<App>, headers: HeaderMap) -> Response {
    let s = settings(&st);
    if !s.enabled {
        return not_found();
    }
    let mut n = [0u8; 16];
    let _ = getrandom::fill(&mut n);
    let nonce = crate::canvas::compile::hex(&n);
    let body = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>ichibase console</title><link rel=\"icon\" href=\"data:,\"><link rel=\"stylesheet\" href=\"/console/assets/console.css\">\
<script type=\"importmap\" nonce=\"{nonce}\">{IMPORT_MAP}</script>\
<link rel=\"modulepreload\" href=\"/console/assets/react-all.js\"></head>\
<body data-page-rows=\"{}\"><div id=\"root\"><p class=\"boot\">Loading the console…</p></div>\
<noscript>The console needs JavaScript.</noscript><script type=\"module\" src=\"/console/assets/console.js\"></script></body></html>\n",
        s.page_rows
    );
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("127.0.0.1");
    let csp = format!(
        "default-src 'none'; script-src 'self' 'nonce-{nonce}'; style-src 'self'; img-src 'self' data:; \
connect-src 'self' ws://{host} wss://{host}; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    );
    let mut r = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, hv(&csp));
    h.insert(header::CACHE_CONTROL, hv("no-store"));
    h.insert("referrer-policy", hv("no-referrer"));
    h.insert("x-content-type-options", hv("nosniff"));
    h.insert("x-frame-options", hv("DENY"));
    r
}

async fn asset(State(st): State<App>, Path(file): Path<String>) -> Response {
    if !settings(&st).enabled {
        return not_found();
    }
    // Working on the console: `ICHIBASE_CONSOLE_SOURCE_DIR=src/console/ui` serves the files of
    // that directory, compiled at every request, instead of the embedded ones.
    let dev = std::env::var_os("ICHIBASE_CONSOLE_SOURCE_DIR").map(std::path::PathBuf::from);
    let (ctype, body): (&str, Body) = match file.as_str() {
        "console.js" => {
            let js = match &dev {
                Some(d) => std::fs::read_to_string(d.join("console.tsx"))
                    .map_err(|e| e.to_string())
                    .and_then(|src| compile::compile("console", &src)),
                None => compile::console_js().clone(),
            };
            match js {
                Ok(js) => ("text/javascript; charset=utf-8", Body::from(js)),
                Err(e) => {
                    return error_response(&Error::internal(format!("the console's script did not compile: {e}")), true, None);
                }
            }
        }
        "console.css" => match &dev {
            Some(d) => ("text/css; charset=utf-8", Body::from(std::fs::read_to_string(d.join("console.css")).unwrap_or_default())),
            None => ("text/css; charset=utf-8", Body::from(CSS)),
        },
        f if VENDOR.contains(&f) => {
            let Some((_, ctype, body)) = crate::canvas::assets::FRAME_ASSETS.iter().find(|(n, _, _)| *n == f) else {
                return (StatusCode::NOT_FOUND, "no such asset").into_response();
            };
            (*ctype, Body::from(*body))
        }
        _ => return (StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    let mut r = ([(header::CONTENT_TYPE, ctype)], body).into_response();
    r.headers_mut().insert("x-content-type-options", hv("nosniff"));
    r.headers_mut().insert(header::CACHE_CONTROL, hv("no-cache"));
    r
}

// ---- GET /console/api/tables

fn lookup() -> Arc<ExecControl> {
    ExecControl::lookup()
}

async fn tables(State(st): State<App>, Admin(ctx): Admin) -> Response {
    reply(st.storage().read(&ctx, lookup(), |c| list_tables(c)).await.map(|t| json!({"tables": t})))
}

fn list_tables(c: &rusqlite::Connection) -> Result<Vec<Json>> {
    let mut st = c.prepare(
        "SELECT name, type, sql FROM sqlite_schema WHERE type IN ('table', 'view')
         AND name NOT LIKE 'sqlite_%' AND name NOT LIKE '\\_ichibase\\_%' ESCAPE '\\' ORDER BY name",
    )?;
    let objects: Vec<(String, String, Option<String>)> =
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<rusqlite::Result<_>>()?;
    // Policies and grants through the auth component's own listing.
    let mut policies: HashMap<String, Vec<Json>> = HashMap::new();
    let mut policy_views: HashMap<String, String> = HashMap::new();
    for p in crate::auth::policy::list(c)? {
        policy_views.insert(p.name.clone(), p.table.clone());
        let table = p.table.clone();
        let mut v = serde_json::to_value(&p).map_err(|e| Error::internal(e.to_string()))?;
        if let Some(o) = v.as_object_mut() {
            o.remove("table");
        }
        policies.entry(table).or_default().push(v);
    }
    let mut grants: HashMap<String, Vec<Json>> = HashMap::new();
    for g in crate::auth::policy::list_grants(c)? {
        let object = g["object"].as_str().unwrap_or_default().to_string();
        grants.entry(object).or_default().push(json!({"role": g["role"], "privileges": g["privileges"]}));
    }
    let mut out = Vec::with_capacity(objects.len());
    for (name, kind, sql) in objects {
        let q = crate::sql::parse::quote_ident(&name);
        let mut cols = Vec::new();
        let mut pk = Vec::new();
        if let Ok(mut st) = c.prepare(&format!("SELECT name, type, \"notnull\", pk FROM pragma_table_info({})", sql_str(&name))) {
            let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, bool>(2)?, r.get::<_, i64>(3)?)))?;
            for r in rows {
                let (n, t, nn, p) = r?;
                if p > 0 {
                    pk.push(n.clone());
                }
                cols.push(json!({"name": n, "type": t, "notnull": nn, "pk": p > 0}));
            }
        }
        let rowid = kind == "table" && !sql.as_deref().unwrap_or("").to_ascii_uppercase().contains("WITHOUT ROWID");
        let rows: Option<i64> = if kind == "table" { c.query_row(&format!("SELECT count(*) FROM {q}"), [], |r| r.get(0)).ok() } else { None };
        out.push(json!({
            "name": name, "type": kind, "columns": cols, "primary_key": pk, "rowid": rowid, "rows": rows,
            "policy_of": policy_views.get(&name),
            "policies": policies.remove(&name).unwrap_or_default(),
            "grants": grants.remove(&name).unwrap_or_default(),
            "sql": sql,
        }));
    }
    Ok(out)
}

fn sql_str(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

// ---- identities of other users

/// The context user `who` (an id or an email) gets for their own requests: their role, user
/// id and the claims a session gives (`sub`, `role`, `email`), plus `console_as` naming the
/// admin who asked. Refused for an unknown or disabled user.
async fn context_of(st: &App, admin: &RequestContext, who: &str) -> Result<RequestContext> {
    let w = who.trim().to_string();
    if w.is_empty() {
        return Err(Error::new(ErrorCode::BadArguments, "name the user: an id or an email"));
    }
    let found: Option<(String, String, String, bool)> = st
        .storage()
        .read(&RequestContext::system(), lookup(), move |c| {
            use rusqlite::OptionalExtension;
            Ok(c.query_row(
                "SELECT id, role, email, disabled_at IS NOT NULL FROM _ichibase_users WHERE id = ?1 OR email = ?1 COLLATE NOCASE",
                [&w],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?)
        })
        .await?;
    let Some((id, role, email, disabled)) = found else {
        return Err(Error::new(ErrorCode::NotFound, format!("No user '{who}'")));
    };
    if disabled {
        return Err(Error::new(ErrorCode::AccessDenied, format!("User '{email}' is disabled: nothing runs as them")));
    }
    let mut ctx = RequestContext::new(None, Role::from_name(&role));
    let by = admin.user_id.clone().or_else(|| admin.claim("key_name").and_then(|v| v.as_str()).map(str::to_string));
    let mut claims = serde_json::Map::new();
    claims.insert("sub".into(), json!(id));
    claims.insert("role".into(), json!(role));
    claims.insert("email".into(), json!(email));
    claims.insert("console_as".into(), json!(by));
    ctx.user_id = Some(id);
    ctx.claims = Some(Arc::new(claims));
    Ok(ctx)
}

// ---- POST /console/api/query-as

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AsBody {
    user: String,
    sql: String,
    #[serde(default)]
    params: HashMap<String, Json>,
    #[serde(default)]
    format: Option<String>,
}

async fn query_as(State(st): State<App>, Admin(admin): Admin, JsonBody(b): JsonBody<AsBody>) -> Response {
    let r = async {
        let ctx = context_of(&st, &admin, &b.user).await?;
        let cs = settings(&st);
        let cfg = st.config();
        let lim = cfg.limits;
        let format = crate::sql::Format::parse(b.format.as_deref().unwrap_or("JSON"))?;
        let mut params = HashMap::new();
        for (k, v) in b.params {
            // The URL form `param_x=` takes: text as is, anything else as its JSON.
            params.insert(k, match v { Json::String(s) => s, Json::Null => "\\N".into(), v => v.to_string() });
        }
        let max_rows = if lim.max_result_rows == 0 { cs.as_user_max_rows } else { lim.max_result_rows.min(cs.as_user_max_rows) };
        let settings = crate::sql::exec::QuerySettings {
            default_format: Some(format),
            transaction: false,
            readonly: true,
            max_result_rows: max_rows,
            max_result_bytes: lim.max_result_bytes,
            overflow_break: false,
            quote_i64: cfg.json_quote_64bit_integers,
            params,
            max_query_size: lim.max_query_size,
            buffer_size: usize::MAX,
            log: st.posterity().sink(),
            spool: st.http().spool(),
            max_buffered: st.sql_guard().settings.max_buffered_result_bytes,
        };
        let secs = if lim.max_execution_time > 0.0 { lim.max_execution_time.min(cs.as_user_timeout_secs) } else { cs.as_user_timeout_secs };
        let control = ExecControl::for_request(ctx.started, secs, st.sql_guard().value_limit(&ctx), st.sql_guard().write_limit(&ctx));
        let turn = st.sql_guard().admit(&ctx).await?;
        let (format, mut rx) = crate::sql::exec::start(st.storage().clone(), ctx.clone(), control, b.sql, None, settings, turn);
        let mut out = Vec::new();
        let mut summary = None;
        while let Some(m) = rx.recv().await {
            match m {
                crate::sql::exec::Msg::Error(e) => return Err(e),
                crate::sql::exec::Msg::Data(bytes, _) => out.extend_from_slice(&bytes),
                crate::sql::exec::Msg::Done(bytes, s) => {
                    out.extend_from_slice(&bytes);
                    summary = Some(s);
                    break;
                }
            }
        }
        let summary = summary.ok_or_else(|| Error::internal("the query ended without an answer"))?;
        Ok((format, out, summary, ctx))
    }
    .await;
    match r {
        Ok((format, out, summary, ctx)) => {
            let mut resp = ([(header::CONTENT_TYPE, format.content_type())], out).into_response();
            let h = resp.headers_mut();
            h.insert("x-clickhouse-format", hv(format.name()));
            h.insert("x-clickhouse-summary", hv(&summary.to_header()));
            h.insert("x-ichibase-as-user", hv(ctx.user_id.as_deref().unwrap_or("")));
            h.insert("x-ichibase-as-role", hv(ctx.role.as_str()));
            resp
        }
        Err(e) => error_response(&e, true, None),
    }
}

// ---- POST /console/api/run

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunBody {
    function: String,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    input: Json,
}

async fn run(State(st): State<App>, Admin(admin): Admin, JsonBody(b): JsonBody<RunBody>) -> Response {
    reply(run_traced(&st, &admin, b).await)
}

async fn run_traced(st: &App, admin: &RequestContext, b: RunBody) -> Result<Json> {
    crate::lua::store::check_name(&b.function)?;
    let ctx = match b.user.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
        Some(u) => context_of(st, admin, u).await?,
        None => {
            let mut c = admin.clone();
            c.trace_id = uuid::Uuid::new_v4().simple().to_string();
            c
        }
    };
    let reserved = st.lua_limits().budget.reserve(st.lua().memory_limit as u64).await?;
    let runtime = crate::lua::Runtime::of_app(st, tokio::runtime::Handle::current());
    let (c2, name, input) = (ctx.clone(), b.function.clone(), b.input);
    let ran = tokio::task::spawn_blocking(move || -> Result<(i64, crate::lua::Outcome)> {
        let f = runtime.storage.read_blocking(&runtime.rt, &RequestContext::system(), lookup(), |c| {
            crate::lua::store::get(c, &name, None)
        })?;
        // Traced always; only the admin reads the trace (no owner).
        let inv = crate::lua::Invocation {
            function: name,
            version: f.version,
            source: f.source,
            input,
            trace: true,
            check: None,
            trace_owner: None,
        };
        let out = crate::lua::invoke(&runtime, c2, inv);
        drop(reserved);
        Ok((f.version, out))
    })
    .await
    .map_err(|e| Error::internal(format!("Lua invocation task failed: {e}")))??;
    let (version, mut outcome) = ran;
    if outcome.steps.take().is_some_and(|(s, _)| crate::lua::large_trace(&s)) {
        crate::lua::release_freed_memory();
    }
    let mut v = json!({
        "function": b.function, "version": version, "trace_id": ctx.trace_id,
        "user_id": ctx.user_id, "role": ctx.role.as_str(),
        "elapsed_ms": outcome.elapsed.as_secs_f64() * 1000.0, "logs": outcome.logs,
    });
    match outcome.result {
        Ok(r) => {
            v["ok"] = json!(true);
            v["result"] = r;
        }
        Err(e) => {
            v["ok"] = json!(false);
            v["error"] = json!({"code": e.code.number(), "name": e.code.name(), "message": e.message, "line": outcome.error_line, "value": outcome.error_value});
        }
    }
    Ok(v)
}

// ---- GET /console/api/presence

#[derive(Deserialize)]
struct PresenceQuery {
    channel: Option<String>,
}

async fn presence(State(st): State<App>, Admin(ctx): Admin, Query(q): Query<PresenceQuery>) -> Response {
    let hub = st.hub();
    let mut v = json!({"connections": hub.connections(), "channels": hub.channels(1000)});
    if let Some(ch) = q.channel.filter(|c| !c.is_empty()) {
        match hub.presence(&ctx, &ch) {
            Ok(p) => {
                v["channel"] = json!(ch);
                v["presence"] = json!(p);
            }
            Err(e) => return error_response(&e, true, None),
        }
    }
    axum::Json(v).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_default() {
        let s = ConsoleSettings::default();
        assert!(s.enabled && s.page_rows == 50);
    }

    #[test]
    fn vendor_files_exist_in_the_canvas() {
        for f in VENDOR {
            assert!(crate::canvas::assets::FRAME_ASSETS.iter().any(|(n, _, _)| n == f), "{f}");
        }
    }
}
