//! Posterity over HTTP: `POST /analytics` (ClickHouse-style, read-only, on DuckDB), the admin's
//! analytics views and grants, the archive on demand and the log's counters. (The `http` row of
//! every request is written by the request layer, `apis::context`.)

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, Method};
use axum::response::Response;
use axum::routing::{get, post, put};
use serde::Deserialize;

use super::sql::{Engine, serve};
use super::{Admin, App, JsonBody, RequestScope, admin_area, reply};
use crate::core::{Error, ErrorCode};

/// Analytics over the posterity log, the archive and the request log (`/analytics`, `/admin/analytics/*`).
pub struct AnalyticsModule;

impl crate::modules::Module for AnalyticsModule {
    fn name(&self) -> &'static str {
        "analytics"
    }
    fn routes(&self) -> Router<App> {
        routes()
    }
}

pub fn routes() -> Router<App> {
    Router::new()
        .route("/analytics", get(analytics).post(analytics))
        .route(
            "/admin/analytics/views",
            get(list_views).route_layer(admin_area("/admin/analytics/views")),
        )
        .route(
            "/admin/analytics/views/{name}",
            put(define_view)
                .delete(drop_view)
                .route_layer(admin_area("/admin/analytics/views")),
        )
        .route(
            "/admin/archive",
            post(archive).route_layer(admin_area("/admin/archive")),
        )
        .route(
            "/admin/archive/sync",
            post(archive_sync).route_layer(admin_area("/admin/archive/sync")),
        )
        .route(
            "/admin/posterity",
            get(stats).route_layer(admin_area("/admin/posterity")),
        )
        // `/analytics` reads its own body under `max_body_size`, like the SQL endpoint.
        .layer(super::body_limit(super::BodyLimit::Json))
}

async fn analytics(
    State(st): State<App>,
    scope: RequestScope,
    method: Method,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Response {
    serve(st, scope, method, headers, raw, body, Engine::Analytics).await
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::core::Result<T> + Send + 'static,
) -> crate::core::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("analytics task failed: {e}")))?
}

async fn list_views(State(st): State<App>, Admin(_): Admin) -> Response {
    let p = st.posterity().clone();
    reply(
        blocking(move || p.list_views())
            .await
            .map(|v| serde_json::json!({"views": v})),
    )
}

#[derive(Deserialize)]
struct ViewBody {
    sql: String,
    #[serde(default)]
    roles: Vec<String>,
}

async fn define_view(
    State(st): State<App>,
    Path(name): Path<String>,
    Admin(_): Admin,
    JsonBody(b): JsonBody<ViewBody>,
) -> Response {
    let p = st.posterity().clone();
    reply(blocking(move || p.define_view(&name, &b.sql, &b.roles)).await)
}

async fn drop_view(State(st): State<App>, Path(name): Path<String>, Admin(_): Admin) -> Response {
    let p = st.posterity().clone();
    let n = name.clone();
    reply(blocking(move || p.drop_view(&n)).await.and_then(|found| {
        if found {
            Ok(serde_json::json!({"dropped": name}))
        } else {
            Err(Error::new(
                ErrorCode::NotFound,
                format!("No analytics view '{name}'"),
            ))
        }
    }))
}

#[derive(Deserialize)]
struct ArchiveArgs {
    /// Archive rows before this date (YYYY-MM-DD) instead of complete days past the retention.
    before: Option<String>,
}

async fn archive(State(st): State<App>, Query(a): Query<ArchiveArgs>, Admin(_): Admin) -> Response {
    let p = st.posterity().clone();
    let r = async {
        let files = blocking(move || p.archive(a.before.as_deref())).await?;
        // With replication on, new files go to the replica target at once.
        let offload = match &st.replication() {
            None => serde_json::Value::Null,
            Some(r) => match crate::replication::offload::sync(r.target(), &st.posterity()).await {
                Ok(rep) => serde_json::json!(rep),
                Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
            },
        };
        Ok(serde_json::json!({ "files": files, "offload": offload }))
    }
    .await;
    reply(r)
}

/// Sync the Parquet archive with the replica target: fetch missing files (and adopt them),
/// upload files the target lacks.
async fn archive_sync(State(st): State<App>, Admin(_): Admin) -> Response {
    let r = match &st.replication() {
        None => Err(Error::new(
            ErrorCode::BadArguments,
            "Archive sync needs replication: set replicate_url (ICHIBASE_REPLICATE_URL)",
        )),
        Some(r) => crate::replication::offload::sync(r.target(), &st.posterity())
            .await
            .map(|rep| serde_json::json!(rep))
            .map_err(|e| Error::new(ErrorCode::StorageError, format!("archive sync: {e:#}"))),
    };
    reply(r)
}

async fn stats(State(st): State<App>, Admin(_): Admin) -> Response {
    reply(Ok(st.posterity().stats()))
}
