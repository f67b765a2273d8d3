//! Search inside SQLite: vectors (sqlite-vec), full text (FTS5, trigram for Japanese) and hybrid
//! ranking (reciprocal rank fusion), under the same row-level security as every other read.
//!
//! Owns: the sqlite-vec registration (`sqlite3_auto_extension`, never a loadable extension),
//! the engine table `_ichibase_search_indexes`, the index objects it creates for a table
//! (`_ichibase_fts_<t>`, `_ichibase_vq_<t>`, queue triggers `_ichibase_search_<t>_*`), the
//! queue `_ichibase_search_queue` and the task that drains it, the `search()` SQL function,
//! `db.search` in Lua and the admin routes `/search/indexes`.
//! Must not touch: policies or grants (it only reads them), other modules' tables.
//!
//! Why a queue: FTS5 and vec0 run their own statements inside a write, which the authorizer
//! would judge as the caller's. A user's write through a policy view therefore only appends
//! the row's key to a plain queue table (by trigger); the engine updates the index tables on
//! the writer as itself right after the commit. Reads go through `search()`, which checks the
//! caller's SELECT grant on the view and evaluates that view with the caller's identity.

pub mod index;
pub mod lua;
pub mod sql;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, put};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::apis::{Admin, App, BodyLimit, JsonBody, admin_area, body_limit, reply};
use crate::app::AppBuilder;
use crate::core::{RequestContext, Result};
use crate::lua::components::Component;
use crate::storage::ExecControl;
use crate::storage::migrations::Migration;

pub use index::IndexSpec;

/// `[search]` settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SearchSettings {
    /// Largest `k` a search may ask for.
    pub max_k: usize,
    /// Candidates each ranked list (text, vector) contributes to the fusion (at least `k`).
    pub candidates: usize,
    /// The constant of reciprocal rank fusion: score = Σ 1 / (rrf_k + rank).
    pub rrf_k: f64,
    /// Queued rows the sync task indexes in one write transaction.
    pub sync_batch: usize,
    /// int8/bit searches rank this many times `candidates` by the quantised distance before
    /// re-ranking them by the float32 distance (`rescore`).
    pub rescore_factor: usize,
    /// Longest query text (bytes).
    pub max_text: usize,
    /// Most dimensions of an indexed vector.
    pub max_dims: usize,
    /// The `[ai.models.NAME]` that embeds query texts for `db.search{text=...}` without
    /// `vector=` on an index with a vector column ("": none, the text ranking alone).
    pub embed_model: String,
}

impl Default for SearchSettings {
    fn default() -> Self {
        SearchSettings {
            max_k: 1000,
            candidates: 100,
            rrf_k: 60.0,
            sync_batch: 1000,
            rescore_factor: 8,
            max_text: 4096,
            max_dims: 4096,
            embed_model: String::new(),
        }
    }
}

static SETTINGS: OnceLock<SearchSettings> = OnceLock::new();

/// The settings in force (the defaults until the module read its section).
pub fn settings() -> &'static SearchSettings {
    SETTINGS.get_or_init(SearchSettings::default)
}

/// Register sqlite-vec for every SQLite connection this process opens from now on. Idempotent.
/// sqlite-vec's C source is compiled with `SQLITE_CORE` into this binary and calls the bundled
/// SQLite directly: there is no second SQLite and extension loading stays off.
pub fn register_sqlite_vec() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: `sqlite3_vec_init` has the signature of an SQLite extension entry point
        // (db, pzErrMsg, pApi); the crate declares it without arguments.
        unsafe {
            type Entry = unsafe extern "C" fn(
                *mut rusqlite::ffi::sqlite3,
                *mut *mut std::os::raw::c_char,
                *const rusqlite::ffi::sqlite3_api_routines,
            ) -> std::os::raw::c_int;
            let entry: Entry = std::mem::transmute(sqlite_vec::sqlite3_vec_init as *const ());
            rusqlite::ffi::sqlite3_auto_extension(Some(entry));
        }
    });
}

/// The vector of a query text, for `db.search{text=...}` called without `vector=` on an index
/// that has a vector column: embedded by `[search] embed_model` through the `ai` layer (one
/// logged, budgeted generation as the caller, from the calling function), waiting at most until
/// the invocation's deadline. `None` when no embedding model is configured: the search then
/// ranks by text alone. Runs on the Lua thread; `dims` is the index's dimension count.
pub fn embed_query_text(env: &crate::lua::Env, text: &str, dims: usize) -> Result<Option<Vec<f32>>> {
    use crate::core::{Error, ErrorCode};
    let name = settings().embed_model.as_str();
    if name.is_empty() {
        return Ok(None);
    }
    let Some(app) = env.app.as_ref() else {
        return Ok(None);
    };
    let svc = crate::ai::AiService::of(app)?;
    let dims_ok = |v: &[Vec<f64>]| {
        let n = v.first().map_or(0, Vec::len);
        if n != dims {
            return Err(Error::new(
                ErrorCode::BadArguments,
                format!("[search] embed_model '{name}' returned {n} dimensions; the index has {dims}"),
            ));
        }
        Ok(())
    };
    let mut v = env.rt.block_on(svc.embed_logged(
        &env.ctx,
        &env.function,
        "lua",
        name,
        vec![text.to_string()],
        env.control.deadline,
        dims_ok,
    ))?;
    Ok(Some(v.pop().unwrap_or_default().into_iter().map(|x| x as f32).collect()))
}

pub struct SearchModule;

/// The module's service: whether any index exists (the sync task sleeps until one does).
#[derive(Default)]
pub struct SearchState {
    active: std::sync::atomic::AtomicBool,
}

impl SearchState {
    fn active(&self) -> bool {
        self.active.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn activate(&self) {
        self.active.store(true, std::sync::atomic::Ordering::Relaxed)
    }
}

static MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "search indexes and queue",
    sql: "CREATE TABLE _ichibase_search_indexes (
            tbl TEXT PRIMARY KEY,
            spec TEXT NOT NULL,
            created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
          );
          CREATE TABLE _ichibase_search_queue (
            seq INTEGER PRIMARY KEY,
            tbl TEXT NOT NULL,
            id INTEGER NOT NULL
          );",
}];

impl crate::modules::Module for SearchModule {
    fn name(&self) -> &'static str {
        "search"
    }
    fn section(&self) -> Option<&'static str> {
        Some("search")
    }
    fn migrations(&self) -> &'static [Migration] {
        MIGRATIONS
    }
    fn provide(&self, b: &mut AppBuilder) -> anyhow::Result<()> {
        let s: SearchSettings = b.core().config.section("search")?;
        anyhow::ensure!(s.max_k >= 1, "[search] max_k must be at least 1");
        anyhow::ensure!(s.sync_batch >= 1, "[search] sync_batch must be at least 1");
        anyhow::ensure!(s.rrf_k >= 0.0, "[search] rrf_k must not be negative");
        let _ = SETTINGS.set(s);
        b.provide(SearchState::default());
        Ok(())
    }
    fn routes(&self) -> Router<App> {
        Router::new()
            .route("/search/indexes", get(list_indexes))
            .route(
                "/search/indexes/{table}",
                put(create_index).delete(drop_index),
            )
            .route_layer(admin_area("/search/indexes"))
            .layer(body_limit(BodyLimit::Json))
    }
    fn lua_components(&self) -> &'static [&'static dyn Component] {
        &[&lua::DbSearch]
    }
    fn start(&self, app: &App) -> anyhow::Result<()> {
        let app = app.clone();
        tokio::spawn(async move { sync_loop(app).await });
        Ok(())
    }
}

/// Rows embedded per model call by embed-on-insert.
const EMBED_BATCH: usize = 64;

/// Embed-on-insert: for every index whose vector has `embed`, rows whose vector column is NULL
/// get the embedding of their `from` text columns (joined by newlines) through the `ai` layer —
/// one generation per batch, logged and budgeted as function `search.embed`, run as the engine
/// (system). The UPDATE queues the rows again, so the next drain indexes their vectors. Returns
/// how many rows got a vector; an error (no model, provider down, budget) leaves the rows NULL
/// for a later attempt.
async fn embed_pending(app: &App) -> Result<usize> {
    use crate::core::{Error, ErrorCode};
    use crate::sql::parse::quote_ident;
    let storage = app.storage().clone();
    let specs: Vec<(String, IndexSpec)> = storage
        .read(&RequestContext::system(), ExecControl::lookup(), |c| {
            let tables: Vec<String> = c
                .prepare("SELECT tbl FROM _ichibase_search_indexes ORDER BY tbl")?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let mut out = Vec::new();
            for t in tables {
                if let Some(s) = index::load(c, &t)? {
                    if s.vector.as_ref().is_some_and(|v| v.embed.is_some()) {
                        out.push((t, s));
                    }
                }
            }
            Ok(out)
        })
        .await?;
    let mut total = 0;
    for (t, spec) in specs {
        let v = spec.vector.clone().expect("filtered above");
        let e = v.embed.clone().expect("filtered above");
        let (tq, key, vcol) = (quote_ident(&t), quote_ident(&spec.key), quote_ident(&v.column));
        let text = e.from.iter().map(|c| format!("coalesce(CAST({} AS TEXT), '')", quote_ident(c))).collect::<Vec<_>>().join(" || char(10) || ");
        let sql = format!("SELECT {key}, {text} FROM {tq} WHERE {vcol} IS NULL LIMIT {EMBED_BATCH}");
        let rows: Vec<(i64, String)> = storage
            .read(&RequestContext::system(), ExecControl::new(Instant::now(), 30.0), move |c| {
                Ok(c.prepare(&sql)?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<_>>()?)
            })
            .await?;
        if rows.is_empty() {
            continue;
        }
        let svc = crate::ai::AiService::of(app)?;
        let model = e.model.as_deref().unwrap_or(settings().embed_model.as_str());
        let texts: Vec<String> = rows.iter().map(|r| r.1.clone()).collect();
        let check = |vs: &[Vec<f64>]| {
            if vs.len() != rows.len() || vs.iter().any(|x| x.len() != v.dims) {
                return Err(Error::new(
                    ErrorCode::BadArguments,
                    format!("embedding model '{model}' did not return {} vectors of {} dimensions for '{t}'", rows.len(), v.dims),
                ));
            }
            Ok(())
        };
        let vectors = svc
            .embed_logged(&RequestContext::system(), "search.embed", "search", model, texts, None, check)
            .await?;
        let update = format!("UPDATE {tq} SET {vcol} = ?1 WHERE {key} = ?2 AND {vcol} IS NULL");
        let pairs: Vec<(i64, String)> = rows
            .iter()
            .zip(vectors)
            .map(|((id, _), vec)| (*id, serde_json::to_string(&vec).unwrap_or_default()))
            .collect();
        total += storage
            .write(&RequestContext::system(), ExecControl::new(Instant::now(), 0.0), move |c| {
                let tx = c.transaction()?;
                let mut n = 0;
                {
                    let mut st = tx.prepare(&update)?;
                    for (id, v) in &pairs {
                        n += st.execute(rusqlite::params![v, id])?;
                    }
                }
                tx.commit()?;
                Ok(n)
            })
            .await?;
    }
    Ok(total)
}

/// After every commit (and at least every second), index what the queue holds. Until an index
/// exists it only waits.
async fn sync_loop(app: App) {
    let storage = app.storage().clone();
    let committed = storage.committed();
    let Some(state) = app.get::<SearchState>() else { return };
    let any: Result<bool> = storage
        .read(&RequestContext::system(), ExecControl::lookup(), |c| {
            Ok(c.query_row(
                "SELECT EXISTS (SELECT 1 FROM _ichibase_search_indexes)",
                [],
                |r| r.get::<_, bool>(0),
            )?)
        })
        .await;
    if any.unwrap_or(true) {
        state.activate();
    }
    // Embed-on-insert runs when rows were queued, and retries (after a failure) every 30 s.
    let mut embed_retry_at: Option<Instant> = Some(Instant::now());
    loop {
        let notified = committed.notified();
        if !state.active() {
            let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
            continue;
        }
        if embed_retry_at.is_some_and(|t| Instant::now() >= t) {
            embed_retry_at = None;
            match embed_pending(&app).await {
                Ok(_) => {}
                Err(e) if e.code == crate::core::ErrorCode::ShuttingDown => return,
                Err(e) => {
                    tracing::warn!(error = %e, "search: embedding rows failed; retrying in 30 s");
                    embed_retry_at = Some(Instant::now() + Duration::from_secs(30));
                }
            }
        }
        let pending = storage
            .read(
                &RequestContext::system(),
                ExecControl::new(Instant::now(), 30.0),
                |c| {
                    Ok(c.query_row(
                        "SELECT EXISTS (SELECT 1 FROM _ichibase_search_queue)",
                        [],
                        |r| r.get::<_, bool>(0),
                    )?)
                },
            )
            .await;
        match pending {
            Ok(true) => {
                if embed_retry_at.is_none() {
                    embed_retry_at = Some(Instant::now());
                }
                let batch = settings().sync_batch;
                let r = storage
                    .write(
                        &RequestContext::system(),
                        ExecControl::new(Instant::now(), 0.0),
                        move |c| index::drain(c, batch),
                    )
                    .await;
                match r {
                    Ok(_) => continue,
                    Err(e) if e.code == crate::core::ErrorCode::ShuttingDown => return,
                    Err(e) => tracing::warn!(error = %e, "search: indexing queued rows failed"),
                }
            }
            Ok(false) => {}
            Err(e) if e.code == crate::core::ErrorCode::ShuttingDown => return,
            Err(e) => tracing::warn!(error = %e, "search: reading the queue failed"),
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
    }
}

async fn create_index(
    State(st): State<App>,
    Path(table): Path<String>,
    Admin(ctx): Admin,
    JsonBody(spec): JsonBody<IndexSpec>,
) -> Response {
    if let Some(s) = st.get::<SearchState>() {
        s.activate();
    }
    reply(
        st.storage()
            .write(&ctx, ExecControl::new(Instant::now(), 0.0), move |c| {
                index::create(c, &table, &spec)
            })
            .await,
    )
}

async fn drop_index(State(st): State<App>, Path(table): Path<String>, Admin(ctx): Admin) -> Response {
    reply(
        st.storage()
            .write(&ctx, ExecControl::new(Instant::now(), 0.0), move |c| {
                index::drop(c, &table).map(|_| json!({"dropped": table}))
            })
            .await,
    )
}

async fn list_indexes(State(st): State<App>, Admin(ctx): Admin) -> Response {
    reply(
        st.storage()
            .read(&ctx, ExecControl::new(Instant::now(), 0.0), |c| index::list(c))
            .await
            .map(|l| json!({"indexes": l})),
    )
}
