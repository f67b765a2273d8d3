//! CRDT sync (issue 26 parts 1-2): opt-in conflict-free replicated (CRR) tables and the sync
//! protocol between devices and instances.
//!
//! Owns `src/crdt/`: the engine ([`engine`]: metadata tables, capture triggers, change feed,
//! merge), row-level security of the feed ([`rls`]), the HTTP routes (`/sync/changes`,
//! `/admin/crdt/tables`), the peer loop and the `ichibase crdt` / `ichibase sync` commands
//! ([`sync`]), the `[crdt]` section and error codes 1150-1159. Must not touch other modules'
//! tables; the SQL layer calls [`check_statement`] before running a statement (schema changes
//! of CRR tables).

pub mod engine;
pub mod rls;
pub mod sync;

use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::{delete, get};
use serde::Deserialize;
use serde_json::{Value as Json, json};

use crate::apis::{Admin, App, BodyLimit, Caller, JsonBody, admin_area, body_limit, reply};
use crate::app::AppBuilder;
use crate::core::{Error, ErrorCode, RequestContext, Result, Role};
use crate::storage::ExecControl;
use crate::storage::migrations::Migration;

pub struct CrdtModule;

/// `[crdt]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CrdtSettings {
    /// Most row changes one `GET /sync/changes` answers (`limit=` asks for fewer).
    pub max_batch: usize,
    /// Most row changes one `POST /sync/changes` may carry.
    pub max_push: usize,
    /// A received change whose clock is further ahead of this server's clock is refused (ms).
    pub max_clock_drift_ms: i64,
    /// How often the server looks for `ALTER TABLE ... ADD COLUMN` on CRR tables (ms).
    pub schema_poll_ms: u64,
    /// Peers this server keeps in sync with, both ways (like `ichibase sync`).
    pub peers: Vec<PeerSettings>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSettings {
    pub url: String,
    /// Name of the environment variable that holds the peer's API key.
    pub key_env: String,
    #[serde(default)]
    pub tables: Vec<String>,
    /// Pause between rounds when nothing changed (ms).
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
}

fn default_interval() -> u64 {
    500
}

impl Default for CrdtSettings {
    fn default() -> Self {
        CrdtSettings {
            max_batch: 1000,
            max_push: 5000,
            max_clock_drift_ms: 5 * 60 * 1000,
            schema_poll_ms: 1000,
            peers: Vec::new(),
        }
    }
}

impl CrdtSettings {
    fn limits(&self) -> engine::MergeLimits {
        engine::MergeLimits {
            max_clock_drift_ms: self.max_clock_drift_ms,
        }
    }
}

static MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "crr tables",
    sql: engine::SCHEMA,
}];

impl crate::modules::Module for CrdtModule {
    fn name(&self) -> &'static str {
        "crdt"
    }
    fn section(&self) -> Option<&'static str> {
        Some("crdt")
    }
    fn migrations(&self) -> &'static [Migration] {
        MIGRATIONS
    }
    fn provide(&self, b: &mut AppBuilder) -> anyhow::Result<()> {
        let s: CrdtSettings = b.core().config.section("crdt")?;
        anyhow::ensure!(s.max_batch > 0 && s.max_push > 0, "[crdt] max_batch and max_push must be above 0");
        for p in &s.peers {
            url::Url::parse(&p.url)
                .map_err(|e| anyhow::anyhow!("[crdt] peers: url '{}': {e}", p.url))?;
        }
        b.provide(s);
        Ok(())
    }
    fn routes(&self) -> Router<App> {
        let admin = Router::new()
            .route("/admin/crdt/tables", get(list_tables).post(enable_table))
            .route("/admin/crdt/tables/{table}", delete(disable_table))
            .route_layer(admin_area("/admin/crdt"));
        Router::new()
            .route("/sync/changes", get(pull).post(push))
            .merge(admin)
            .layer(body_limit(BodyLimit::Json))
    }
    fn start(&self, app: &App) -> anyhow::Result<()> {
        let s = settings(app);
        let a = app.clone();
        tokio::spawn(async move { schema_loop(a, s.schema_poll_ms).await });
        for p in s.peers.clone() {
            let key = std::env::var(&p.key_env).map_err(|_| {
                anyhow::anyhow!("[crdt] peers: the environment variable {} (key_env of {}) is not set", p.key_env, p.url)
            })?;
            let storage = app.storage().clone();
            let limits = s.limits();
            tokio::spawn(async move {
                let peer = sync::Peer { url: p.url, key, tables: p.tables, interval: Duration::from_millis(p.interval_ms) };
                sync::run(storage, peer, limits, None).await
            });
        }
        Ok(())
    }
}

fn settings(app: &App) -> CrdtSettings {
    app.get::<CrdtSettings>().cloned().unwrap_or_default()
}

/// Called by the SQL layer before it runs a statement: schema changes of CRR tables that would
/// not merge are refused (`CRDT_SCHEMA_REFUSED`), whoever runs them.
pub fn check_statement(conn: &rusqlite::Connection, verb: &str, sql: &str) -> Result<()> {
    if !verb.eq_ignore_ascii_case("DROP") && !verb.eq_ignore_ascii_case("ALTER") {
        return Ok(());
    }
    crate::storage::engine_statements(|| {
        engine::uncached(|| engine::check_ddl(sql, verb, &|t| engine::is_crr(conn, t)))
    })
}

/// Notice `ALTER TABLE ... ADD COLUMN` on CRR tables and refresh their capture triggers.
async fn schema_loop(app: App, every_ms: u64) {
    let mut last: Option<i64> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(every_ms.max(50))).await;
        let v = app
            .storage()
            .read(&RequestContext::system(), ExecControl::lookup(), |c| {
                Ok(c.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0))?)
            })
            .await;
        let v = match v {
            Ok(v) => v,
            Err(e) if e.code == ErrorCode::ShuttingDown => return,
            Err(_) => continue,
        };
        if last == Some(v) {
            continue;
        }
        let r = app
            .storage()
            .write(&RequestContext::system(), ExecControl::lookup(), |c| engine::refresh(c))
            .await;
        match r {
            Ok(t) if !t.is_empty() => tracing::info!(tables = ?t, "crdt: capture triggers refreshed after a schema change"),
            Ok(_) => {}
            Err(e) if e.code == ErrorCode::ShuttingDown => return,
            Err(e) => tracing::warn!(error = %e, "crdt: refreshing capture triggers failed"),
        }
        last = Some(v);
    }
}

fn control() -> std::sync::Arc<ExecControl> {
    ExecControl::new(Instant::now(), 60.0)
}

#[derive(Deserialize)]
struct EnableBody {
    table: String,
}

async fn enable_table(State(app): State<App>, Admin(ctx): Admin, JsonBody(b): JsonBody<EnableBody>) -> Response {
    reply(
        app.storage()
            .write(&ctx, control(), move |c| engine::enable(c, &b.table))
            .await,
    )
}

async fn disable_table(State(app): State<App>, Admin(ctx): Admin, Path(table): Path<String>) -> Response {
    reply(
        app.storage()
            .write(&ctx, control(), move |c| {
                engine::disable(c, &table).map(|_| json!({"disabled": table}))
            })
            .await,
    )
}

async fn list_tables(State(app): State<App>, Admin(ctx): Admin) -> Response {
    reply(
        app.storage()
            .read(&ctx, control(), |c| {
                let tables = engine::list(c)?;
                let (site, version) = if tables.is_empty() {
                    (Json::Null, Json::Null)
                } else {
                    (json!(engine::site_id(c)?), json!(engine::db_version(c)?))
                };
                Ok(json!({"tables": tables, "site": site, "version": version}))
            })
            .await,
    )
}

fn needs_identity(ctx: &RequestContext) -> Result<()> {
    if ctx.role == Role::Anon {
        return Err(Error::new(
            ErrorCode::AuthenticationFailed,
            "sync needs credentials: a user's access token, or an API key",
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
struct PullQuery {
    #[serde(default)]
    since: i64,
    limit: Option<usize>,
    /// Comma-separated table names (default: every CRR table).
    tables: Option<String>,
}

/// `GET /sync/changes?since=N[&limit=][&tables=a,b]`: row changes after version N, whole rows,
/// in version order, filtered by the caller's read policies; `cursor` is the `since` of the next
/// call and `more` says whether to call at once.
async fn pull(State(app): State<App>, Caller(ctx): Caller, Query(q): Query<PullQuery>) -> Response {
    reply(pull_inner(app, ctx, q).await)
}

async fn pull_inner(app: App, ctx: RequestContext, q: PullQuery) -> Result<Json> {
    needs_identity(&ctx)?;
    let s = settings(&app);
    let limit = q.limit.unwrap_or(s.max_batch).clamp(1, s.max_batch);
    let tables: Option<Vec<String>> = q
        .tables
        .map(|t| t.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect());
    let authz = app.storage().authz().clone();
    let c2 = ctx.clone();
    app.storage()
        .read(&ctx, control(), move |c| {
            let batch = rls::pull(c, &c2, &authz, q.since, limit, tables.as_deref())?;
            Ok(serde_json::to_value(batch).unwrap())
        })
        .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushBody {
    changes: Vec<engine::RowChange>,
}

/// `POST /sync/changes` with `{"changes": [...]}` (as `GET` answers them): each merged as if the
/// caller wrote it directly (a user's insert / update / delete policies apply), each reported
/// (`applied`, `unchanged`, or an error). Applying the same batch again changes nothing.
async fn push(State(app): State<App>, Caller(ctx): Caller, JsonBody(b): JsonBody<PushBody>) -> Response {
    reply(push_inner(app, ctx, b).await)
}

async fn push_inner(app: App, ctx: RequestContext, b: PushBody) -> Result<Json> {
    needs_identity(&ctx)?;
    let s = settings(&app);
    if b.changes.len() > s.max_push {
        return Err(Error::new(
            ErrorCode::RequestTooLarge,
            format!("{} changes in one push; at most {} (max_push in [crdt])", b.changes.len(), s.max_push),
        ));
    }
    let limits = s.limits();
    let c2 = ctx.clone();
    let results = app
        .storage()
        .write(&ctx, control(), move |c| rls::push(c, &c2, &b.changes, &limits))
        .await?;
    let count = |o: Option<engine::Outcome>| results.iter().filter(|r| r.outcome == o && (o.is_some() || r.error.is_some())).count();
    Ok(json!({
        "applied": count(Some(engine::Outcome::Applied)),
        "unchanged": count(Some(engine::Outcome::Unchanged)),
        "refused": count(None),
        "results": results,
    }))
}
