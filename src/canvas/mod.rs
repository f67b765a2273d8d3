//! The canvas: generated React/Tailwind UIs pushed to the user's screen.
//!
//! Owns `GET /canvas[/{app}]` (the shell page and its assets, embedded in the binary),
//! `/ui/*` (deploy, list, versions, rollback, delete: admin), `GET /canvas/uis` (what a signed-in
//! user's canvas mounts), `POST /canvas/errors` (runtime errors a canvas reports) and the Lua
//! component `ui` (`ui.deploy{...}`, `ui.check{...}`). Deployed UIs are compiled in process
//! (`compile`), stored as versions (`store`, tables `_ichibase_ui_*`) and pushed over the
//! WebSocket hub to the target's channel (`user:<id>` or a channel name).
//!
//! Generated code never runs in the shell's origin: the canvas serves it from a second origin
//! (`frame`: the same host, another port, `[canvas] frame_port`) into iframes sandboxed without
//! `allow-same-origin`, under a CSP that allows only that origin and no connections; the frame
//! reaches the API only through the shell, by `postMessage` (`ichi.call`, `ichi.sql`,
//! `ichi.subscribe`, `ichi.rate`).
//!
//! It must not touch other modules' tables or the core's; it reaches the hub, storage and auth
//! through `App`'s accessors only.

pub mod assets;
pub mod compile;
pub mod frame;
mod lua;
pub mod store;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value as Json, json};

use crate::apis::{Admin, App, Caller, JsonBody, admin_area, body_limit, error_response, reply};
use crate::app::AppBuilder;
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::storage::ExecControl;
use crate::storage::migrations::Migration;

/// `[canvas]` settings.
#[derive(Deserialize, Clone, Debug)]
#[serde(default, deny_unknown_fields)]
pub struct CanvasSettings {
    /// Largest TSX source `ui.deploy` / `PUT /ui/{name}` accept, bytes.
    pub max_source: usize,
    /// Largest `props` (as JSON), bytes.
    pub max_props: usize,
    /// Port of the second origin generated code is served from (same address as `listen`);
    /// 0 picks a free port at start.
    pub frame_port: u16,
    /// The frame origin as browsers reach it (e.g. `https://ui.example.com` behind a proxy);
    /// empty: `http://<the page's host>:<frame_port>`.
    pub frame_origin: String,
    /// Roles besides the admin that may deploy UIs to channels (anyone may deploy to their own
    /// `user:<id>`).
    pub channel_deploy_roles: Vec<String>,
    /// How many runtime errors reported by canvases are kept for `GET /canvas/errors`.
    pub error_log: usize,
    /// Open connections the frame origin accepts at most.
    pub frame_max_connections: usize,
    /// How often (seconds) current versions changed by other paths — a bundle merged from a
    /// branch — are looked for and pushed to open canvases; 0 turns it off.
    pub watch_secs: f64,
}

impl Default for CanvasSettings {
    fn default() -> Self {
        CanvasSettings {
            max_source: 256 * 1024,
            max_props: 256 * 1024,
            frame_port: 0,
            frame_origin: String::new(),
            channel_deploy_roles: Vec::new(),
            error_log: 200,
            frame_max_connections: 512,
            watch_secs: 1.0,
        }
    }
}

/// The canvas service: settings, the frame listener's port, recent runtime errors.
pub struct Canvas {
    pub settings: CanvasSettings,
    /// The bound frame listener (taken by `start`) and its port.
    listener: Mutex<Option<std::net::TcpListener>>,
    pub frame_port: u16,
    errors: Mutex<VecDeque<Json>>,
    /// The version last pushed per (name, target), so the watcher does not push twice.
    pushed: Mutex<std::collections::HashMap<(String, String), i64>>,
}

impl Canvas {
    fn record_error(&self, e: Json) {
        let mut q = self.errors.lock().unwrap();
        if q.len() >= self.settings.error_log.max(1) {
            q.pop_front();
        }
        q.push_back(e);
    }
}

pub struct CanvasModule;

impl crate::modules::Module for CanvasModule {
    fn name(&self) -> &'static str {
        "canvas"
    }
    fn section(&self) -> Option<&'static str> {
        Some("canvas")
    }
    fn migrations(&self) -> &'static [Migration] {
        store::MIGRATIONS
    }
    fn provide(&self, b: &mut AppBuilder) -> anyhow::Result<()> {
        let settings: CanvasSettings = b.core().config.section("canvas")?;
        anyhow::ensure!(settings.max_source >= 1, "[canvas] max_source must be positive");
        anyhow::ensure!(settings.max_props >= 2, "[canvas] max_props must be at least 2");
        anyhow::ensure!(
            settings.watch_secs == 0.0 || (0.05..=3600.0).contains(&settings.watch_secs),
            "[canvas] watch_secs must be 0 (off) or between 0.05 and 3600"
        );
        let ip = b.core().config.listen.ip();
        let listener = std::net::TcpListener::bind((ip, settings.frame_port)).map_err(|e| {
            anyhow::anyhow!("[canvas] cannot listen on {ip}:{} for the frame origin: {e}", settings.frame_port)
        })?;
        listener.set_nonblocking(true)?;
        let frame_port = listener.local_addr()?.port();
        b.provide(Canvas {
            settings,
            listener: Mutex::new(Some(listener)),
            frame_port,
            errors: Mutex::new(VecDeque::new()),
            pushed: Mutex::new(std::collections::HashMap::new()),
        });
        Ok(())
    }
    fn routes(&self) -> Router<App> {
        routes()
    }
    fn lua_components(&self) -> &'static [&'static dyn crate::lua::components::Component] {
        &[&lua::Ui]
    }
    fn start(&self, app: &App) -> anyhow::Result<()> {
        let canvas = service(app)?;
        let Some(l) = canvas.listener.lock().unwrap().take() else {
            return Ok(());
        };
        let l = tokio::net::TcpListener::from_std(l)?;
        let router = frame::router().with_state(app.clone());
        // The same connection front as the API (cap, header-read and idle timeouts).
        let limits = crate::conns::ConnLimits {
            cap: canvas.settings.frame_max_connections.max(1),
            configured: canvas.settings.frame_max_connections.max(1),
            header_read_timeout: std::time::Duration::from_secs(10),
            idle_timeout: std::time::Duration::from_secs(60),
            cap_wait: std::time::Duration::from_secs(5),
            backlog: 128,
        };
        tokio::spawn(async move {
            if let Err(e) = crate::conns::serve(l, router, limits, std::future::pending()).await {
                tracing::error!(error = %e, "canvas frame origin stopped");
            }
        });
        if canvas.settings.watch_secs > 0.0 {
            tokio::spawn(watch(app.clone(), std::time::Duration::from_secs_f64(canvas.settings.watch_secs)));
        }
        Ok(())
    }
}

pub(crate) fn service(app: &App) -> Result<&Canvas> {
    app.get::<Canvas>()
        .ok_or_else(|| Error::internal("the canvas module is not running"))
}

fn routes() -> Router<App> {
    const AREA: &str = "managing UIs";
    Router::new()
        .route("/canvas", get(assets::shell))
        .route("/canvas/{app}", get(assets::shell_app))
        .route("/canvas/assets/{file}", get(assets::shell_asset))
        .route("/canvas/uis", get(mine))
        .route("/canvas/errors", post(report_error).get(errors))
        .route("/ui", get(list).route_layer(admin_area(AREA)))
        .route(
            "/ui/{name}",
            get(fetch)
                .put(deploy_http)
                .delete(remove)
                .route_layer(admin_area(AREA)),
        )
        .route("/ui/{name}/versions", get(versions).route_layer(admin_area(AREA)))
        .route("/ui/{name}/rollback", post(rollback).route_layer(admin_area(AREA)))
        .layer(body_limit(crate::apis::BodyLimit::Json))
}

fn lookup() -> Arc<ExecControl> {
    ExecControl::lookup()
}

/// UI names: like function names.
pub fn check_name(name: &str) -> Result<()> {
    crate::core::check_name("UI name", name)
}

/// The target a deploy from `ctx` goes to: `to` (a `user:<id>` or a channel), or the caller's
/// own `user:<id>`. Anyone may deploy to themselves; other targets need the admin or a role in
/// `[canvas] channel_deploy_roles` that may join the channel.
pub fn resolve_target(settings: &CanvasSettings, ctx: &RequestContext, to: Option<&str>) -> Result<String> {
    let own = ctx.user_id.as_ref().map(|u| format!("user:{u}"));
    let target = match to {
        None | Some("") => own.clone().ok_or_else(|| {
            Error::new(
                ErrorCode::BadArguments,
                "this identity has no user: name the target with to = 'user:<id>' or a channel",
            )
        })?,
        Some(t) => t.to_string(),
    };
    crate::realtime::hub::may_join(&RequestContext::system(), &target)?;
    if ctx.is_admin() || Some(&target) == own.as_ref() {
        return Ok(target);
    }
    if target.starts_with("user:") {
        return Err(Error::new(
            ErrorCode::AccessDenied,
            format!("may not deploy a UI to '{target}': only the admin deploys to other users"),
        ));
    }
    if !settings.channel_deploy_roles.iter().any(|r| r == ctx.role.as_str()) {
        return Err(Error::new(
            ErrorCode::AccessDenied,
            format!(
                "may not deploy a UI to channel '{target}': needs the admin role or a role in [canvas] channel_deploy_roles; this request runs as '{}'",
                ctx.role.as_str()
            ),
        ));
    }
    crate::realtime::hub::may_join(ctx, &target)?;
    Ok(target)
}

/// A deploy request, from Lua or HTTP.
pub struct DeployReq {
    pub name: String,
    pub code: String,
    pub props: Json,
    pub to: Option<String>,
}

/// Check sizes and names, compile; the target and the compiled UI.
pub fn prepare(
    settings: &CanvasSettings,
    ctx: &RequestContext,
    req: &DeployReq,
) -> Result<(String, compile::Compiled)> {
    check_name(&req.name)?;
    if req.code.len() > settings.max_source {
        return Err(Error::new(
            ErrorCode::RequestTooLarge,
            format!(
                "UI source of {} bytes is over [canvas] max_source ({} bytes)",
                req.code.len(),
                settings.max_source
            ),
        ));
    }
    let props_len = req.props.to_string().len();
    if props_len > settings.max_props {
        return Err(Error::new(
            ErrorCode::RequestTooLarge,
            format!("UI props of {props_len} bytes are over [canvas] max_props ({} bytes)", settings.max_props),
        ));
    }
    if !(req.props.is_object() || req.props.is_null()) {
        return Err(Error::new(ErrorCode::BadArguments, "UI props must be an object (a table of name = value)"));
    }
    // Compile first: a compile error is what a repair loop needs to hear about.
    let compiled = compile::compile(&req.name, &req.code).map_err(|e| compile_error(&req.name, &e))?;
    let target = resolve_target(settings, ctx, req.to.as_deref())?;
    Ok((target, compiled))
}

pub fn compile_error(name: &str, e: &compile::CompileError) -> Error {
    Error::new(
        ErrorCode::UiCompileError,
        format!("{name}.tsx:{}:{}: {}", e.line, e.column, e.message),
    )
}

fn by_of(ctx: &RequestContext) -> Option<String> {
    ctx.user_id.clone().or_else(|| {
        ctx.claim("key_name")
            .and_then(|v| v.as_str())
            .map(str::to_string)
    })
}

/// After a version is stored: push it to the target's open canvases. Returns how many sockets
/// got it.
pub fn push(app: &App, mount: &Json) -> usize {
    let target = mount["target"].as_str().unwrap_or_default();
    if let (Ok(c), Some(name), Some(v)) = (service(app), mount["name"].as_str(), mount["version"].as_i64()) {
        c.pushed.lock().unwrap().insert((name.to_string(), target.to_string()), v);
    }
    app.hub().publish(target, &json!({"type": "ui", "channel": target, "ui": mount}), None)
}

/// Push current versions that changed without a push (a bundle merged from a branch writes the
/// UI tables directly): every `every`, the heads updated since the last look.
async fn watch(app: App, every: std::time::Duration) {
    let mut since: Option<String> = None;
    let mut first = true;
    loop {
        if !first {
            tokio::time::sleep(every).await;
        }
        first = false;
        let s2 = since.clone();
        let r = app
            .storage()
            .read(&RequestContext::system(), lookup(), move |c| store::changed_since(c, s2.as_deref()))
            .await;
        let (changed, latest) = match r {
            Ok(v) => v,
            Err(e) if e.code == ErrorCode::ShuttingDown => return,
            Err(e) => {
                tracing::debug!(error = %e, "canvas: looking for changed UIs failed");
                continue;
            }
        };
        for m in changed {
            let key = (m["name"].as_str().unwrap_or_default().to_string(), m["target"].as_str().unwrap_or_default().to_string());
            let v = m["version"].as_i64().unwrap_or(0);
            let already = service(&app).is_ok_and(|c| c.pushed.lock().unwrap().get(&key) == Some(&v));
            if !already {
                push(&app, &m);
            }
        }
        if latest.is_some() {
            since = latest;
        } else if since.is_none() {
            since = Some(String::new());
        }
    }
}

// ---- HTTP

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployBody {
    code: String,
    #[serde(default)]
    props: Json,
    #[serde(default)]
    to: Option<String>,
}

async fn deploy_http(
    State(st): State<App>,
    Path(name): Path<String>,
    Admin(ctx): Admin,
    JsonBody(b): JsonBody<DeployBody>,
) -> Response {
    let r = async {
        let canvas = service(&st)?;
        let settings = canvas.settings.clone();
        let req = DeployReq { name, code: b.code, props: if b.props.is_null() { json!({}) } else { b.props }, to: b.to };
        let c2 = ctx.clone();
        let (req, target, compiled) = tokio::task::spawn_blocking(move || {
            prepare(&settings, &c2, &req).map(|(t, c)| (req, t, c))
        })
        .await
        .map_err(|e| Error::internal(format!("compile task failed: {e}")))??;
        let by = by_of(&ctx);
        let (n, t, code, props) = (req.name.clone(), target.clone(), req.code, req.props);
        let hash = compiled.hash.clone();
        let css = compiled.css.clone();
        let v = st
            .storage()
            .write(&RequestContext::system(), lookup(), move |c| {
                store::deploy(c, &n, &t, &code, &compiled, &props, by.as_deref())
                    .map(|v| (v, props))
            })
            .await?;
        let mount = store::mount_json(&req.name, &target, v.0, &hash, &css, &v.1.to_string());
        let delivered = push(&st, &mount);
        Ok(json!({"name": req.name, "target": target, "version": v.0, "hash": hash, "delivered": delivered}))
    }
    .await;
    reply(r)
}

#[derive(Deserialize)]
struct TargetQuery {
    to: Option<String>,
    version: Option<i64>,
}

fn target_of(ctx: &RequestContext, to: Option<String>) -> Result<String> {
    match to {
        Some(t) if !t.is_empty() => Ok(t),
        _ => ctx.user_id.as_ref().map(|u| format!("user:{u}")).ok_or_else(|| {
            Error::new(ErrorCode::BadArguments, "name the UI's target with ?to=user:<id> or ?to=<channel>")
        }),
    }
}

async fn list(State(st): State<App>, Admin(ctx): Admin) -> Response {
    reply(
        st.storage()
            .read(&ctx, lookup(), |c| store::list(c))
            .await
            .map(|u| json!({"uis": u})),
    )
}

async fn fetch(State(st): State<App>, Path(name): Path<String>, Query(q): Query<TargetQuery>, Admin(ctx): Admin) -> Response {
    let t = match target_of(&ctx, q.to) {
        Ok(t) => t,
        Err(e) => return error_response(&e, true, None),
    };
    reply(st.storage().read(&ctx, lookup(), move |c| store::source(c, &name, &t, q.version)).await)
}

async fn versions(State(st): State<App>, Path(name): Path<String>, Query(q): Query<TargetQuery>, Admin(ctx): Admin) -> Response {
    let t = match target_of(&ctx, q.to) {
        Ok(t) => t,
        Err(e) => return error_response(&e, true, None),
    };
    reply(
        st.storage()
            .read(&ctx, lookup(), move |c| store::versions(c, &name, &t))
            .await
            .map(|v| json!({"versions": v})),
    )
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    version: Option<i64>,
}

async fn rollback(
    State(st): State<App>,
    Path(name): Path<String>,
    Admin(ctx): Admin,
    JsonBody(b): JsonBody<RollbackBody>,
) -> Response {
    let r = async {
        let t = target_of(&ctx, b.to)?;
        let (n, t2) = (name.clone(), t.clone());
        let mount = st
            .storage()
            .write(&RequestContext::system(), lookup(), move |c| {
                let v = store::rollback(c, &n, &t2, b.version)?;
                store::mount(c, &n, &t2, Some(v))
            })
            .await?;
        let delivered = push(&st, &mount);
        Ok(json!({"name": name, "target": t, "version": mount["version"], "delivered": delivered}))
    }
    .await;
    reply(r)
}

async fn remove(State(st): State<App>, Path(name): Path<String>, Query(q): Query<TargetQuery>, Admin(ctx): Admin) -> Response {
    let r = async {
        let t = target_of(&ctx, q.to)?;
        let (n, t2) = (name.clone(), t.clone());
        st.storage()
            .write(&RequestContext::system(), lookup(), move |c| store::delete(c, &n, &t2))
            .await?;
        st.hub().publish(&t, &json!({"type": "ui_removed", "channel": t, "name": name}), None);
        Ok(json!({"deleted": name, "target": t}))
    }
    .await;
    reply(r)
}

#[derive(Deserialize)]
struct MineQuery {
    /// Comma-separated channels to mount UIs of, besides the user's own.
    channels: Option<String>,
}

/// The current UIs of the caller's canvas: their own `user:<id>` and the channels asked for
/// that they may join.
async fn mine(State(st): State<App>, Query(q): Query<MineQuery>, Caller(ctx): Caller) -> Response {
    let r = async {
        let canvas = service(&st)?;
        let mut targets = Vec::new();
        if let Some(u) = &ctx.user_id {
            targets.push(format!("user:{u}"));
        }
        for ch in q.channels.as_deref().unwrap_or("").split(',').map(str::trim).filter(|c| !c.is_empty()).take(32) {
            if crate::realtime::hub::may_join(&ctx, ch).is_ok() && !targets.iter().any(|t| t == ch) {
                targets.push(ch.to_string());
            }
        }
        let t2 = targets.clone();
        let uis = st
            .storage()
            .read(&RequestContext::system(), lookup(), move |c| store::current_for(c, &t2))
            .await?;
        Ok(json!({
            "user_id": ctx.user_id, "role": ctx.role.as_str(), "targets": targets, "uis": uis,
            "frame_port": canvas.frame_port, "frame_origin": canvas.settings.frame_origin,
        }))
    }
    .await;
    reply(r)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ErrorReport {
    name: String,
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    version: Option<i64>,
    hash: String,
    message: String,
    #[serde(default)]
    stack: Option<String>,
    #[serde(default)]
    component_stack: Option<String>,
    /// TSX position of the innermost element rendered, when the canvas knows it.
    #[serde(default)]
    source: Option<String>,
}

fn clip(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// The first `/code/<hash>.js[?query]:<line>:<column>` of a stack (generated position).
fn stack_position(stack: &str, hash: &str) -> Option<(u32, u32)> {
    let needle = format!("/code/{hash}.js");
    let i = stack.find(&needle)? + needle.len();
    let mut rest = &stack[i..];
    if let Some(q) = rest.strip_prefix('?') {
        rest = &q[q.find(':')?..];
    }
    let rest = rest.strip_prefix(':')?;
    let mut it = rest.split(|c: char| !c.is_ascii_digit());
    let line: u32 = it.next()?.parse().ok()?;
    let column: u32 = it.next()?.parse().ok()?;
    Some((line, column))
}

/// A runtime error a canvas caught in a UI: logged with the TSX position.
async fn report_error(State(st): State<App>, Caller(ctx): Caller, JsonBody(r): JsonBody<ErrorReport>) -> Response {
    let res = async {
        let canvas = service(&st)?;
        let hash = r.hash.clone();
        if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Error::new(ErrorCode::BadArguments, "hash must be the UI's 64 hex digits"));
        }
        let found = st
            .storage()
            .read(&RequestContext::system(), lookup(), move |c| store::map_by_hash(c, &hash))
            .await?;
        let Some((name, version, map)) = found else {
            return Err(Error::new(ErrorCode::NotFound, format!("No UI with hash {}", r.hash)));
        };
        let stack = clip(r.stack.as_deref().unwrap_or(""), 8192);
        let position = stack_position(&stack, &r.hash).and_then(|(l, c)| compile::original_position(&map, l, c));
        let entry = json!({
            "at": chrono::Utc::now().to_rfc3339(),
            "name": name, "version": version, "reported_name": clip(&r.name, 200),
            "target": r.target.as_deref().map(|t| clip(t, 200)), "reported_version": r.version,
            "user_id": ctx.user_id, "message": clip(&r.message, 2000),
            "line": position.map(|p| p.0), "column": position.map(|p| p.1),
            "element": r.source.as_deref().map(|s| clip(s, 100)),
            "stack": stack, "component_stack": clip(r.component_stack.as_deref().unwrap_or(""), 4096),
        });
        tracing::warn!(
            ui = %name, version, user = ?ctx.user_id,
            line = ?position.map(|p| p.0), column = ?position.map(|p| p.1),
            element = ?r.source, message = %clip(&r.message, 500),
            "runtime error in a deployed UI ({name}.tsx:{})",
            position.map(|p| format!("{}:{}", p.0, p.1)).unwrap_or_else(|| "?".into())
        );
        canvas.record_error(entry.clone());
        Ok(json!({"logged": true, "line": entry["line"], "column": entry["column"]}))
    }
    .await;
    reply(res)
}

/// Recent runtime errors canvases reported (admin).
async fn errors(State(st): State<App>, Admin(_ctx): Admin) -> Response {
    reply(service(&st).map(|c| json!({"errors": c.errors.lock().unwrap().iter().cloned().collect::<Vec<_>>()})))
}

/// A header value, or none when it is not valid.
pub(crate) fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static(""))
}

pub(crate) fn with_type(body: impl IntoResponse, ctype: &'static str) -> Response {
    let mut r = body.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_positions() {
        let h = "a".repeat(64);
        let s = format!("Error: boom\n    at App (http://127.0.0.1:4000/code/{h}.js:12:7)\n    at x");
        assert_eq!(stack_position(&s, &h), Some((12, 7)));
        let s = format!("at App (http://127.0.0.1:4000/code/{h}.js?m=3:9:2)");
        assert_eq!(stack_position(&s, &h), Some((9, 2)));
        assert_eq!(stack_position("nothing", &h), None);
    }

    #[test]
    fn targets() {
        let s = CanvasSettings::default();
        let mut u = RequestContext::system();
        u.role = crate::core::Role::from_name("authenticated");
        u.user_id = Some("u1".into());
        assert_eq!(resolve_target(&s, &u, None).unwrap(), "user:u1");
        assert_eq!(resolve_target(&s, &u, Some("user:u1")).unwrap(), "user:u1");
        assert!(resolve_target(&s, &u, Some("user:u2")).is_err());
        assert!(resolve_target(&s, &u, Some("team")).is_err());
        let s2 = CanvasSettings { channel_deploy_roles: vec!["authenticated".into()], ..s.clone() };
        assert_eq!(resolve_target(&s2, &u, Some("team")).unwrap(), "team");
        assert!(resolve_target(&s2, &u, Some("private:x")).is_err());
        assert_eq!(resolve_target(&s, &RequestContext::system(), Some("user:u2")).unwrap(), "user:u2");
        assert!(resolve_target(&s, &RequestContext::system(), None).is_err());
    }
}
