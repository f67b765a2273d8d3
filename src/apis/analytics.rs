//! Posterity over HTTP: `POST /analytics` (ClickHouse-style, read-only, on DuckDB), the admin's
//! analytics views and grants, the archive on demand, the log's counters, and the middleware
//! that records one posterity row per HTTP request.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, RawQuery, Request, State};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, put};
use serde::Deserialize;

use super::sql::{Engine, serve};
use super::{App, JsonBody, reply, require_admin};
use crate::core::{Error, ErrorCode};
use crate::posterity::{CallerSlot, Event, Sink};

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
        .route("/admin/analytics/views", get(list_views))
        .route(
            "/admin/analytics/views/{name}",
            put(define_view).delete(drop_view),
        )
        .route("/admin/archive", axum::routing::post(archive))
        .route("/admin/archive/sync", axum::routing::post(archive_sync))
        .route("/admin/posterity", get(stats))
}

async fn analytics(
    State(st): State<App>,
    method: Method,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Response {
    serve(st, method, headers, raw, body, Engine::Analytics).await
}

macro_rules! admin {
    ($st:expr, $h:expr, $what:expr) => {
        match require_admin(&$st, &$h, $what) {
            Ok(c) => c,
            Err(r) => return r,
        }
    };
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::core::Result<T> + Send + 'static,
) -> crate::core::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("analytics task failed: {e}")))?
}

async fn list_views(State(st): State<App>, h: HeaderMap) -> Response {
    admin!(st, h, "/admin/analytics/views");
    let p = st.posterity().clone();
    reply(blocking(move || p.list_views()).await)
}

#[derive(Deserialize)]
struct ViewBody {
    sql: String,
    #[serde(default)]
    roles: Vec<String>,
}

async fn define_view(
    State(st): State<App>,
    h: HeaderMap,
    Path(name): Path<String>,
    JsonBody(b): JsonBody<ViewBody>,
) -> Response {
    admin!(st, h, "/admin/analytics/views");
    let p = st.posterity().clone();
    reply(blocking(move || p.define_view(&name, &b.sql, &b.roles)).await)
}

async fn drop_view(State(st): State<App>, h: HeaderMap, Path(name): Path<String>) -> Response {
    admin!(st, h, "/admin/analytics/views");
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

async fn archive(
    State(st): State<App>,
    h: HeaderMap,
    Query(a): Query<ArchiveArgs>,
) -> Response {
    admin!(st, h, "/admin/archive");
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
async fn archive_sync(State(st): State<App>, h: HeaderMap) -> Response {
    admin!(st, h, "/admin/archive/sync");
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

async fn stats(State(st): State<App>, h: HeaderMap) -> Response {
    admin!(st, h, "/admin/posterity");
    reply(Ok(st.posterity().stats()))
}

/// Middleware: one `http` row per request — method, path, status, latency (until the body is
/// fully sent or dropped), bytes sent, and the identity / query id / trace id it ran with.
pub async fn record_request(State(st): State<App>, req: Request, next: Next) -> Response {
    let sink = st.posterity().sink();
    if !sink.enabled() {
        return next.run(req).await;
    }
    let started = Instant::now();
    let ts_us = crate::posterity::now_us();
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let slot: CallerSlot = Arc::new(Mutex::new(None));
    let resp = crate::posterity::with_caller_slot(Arc::clone(&slot), next.run(req)).await;
    let status = resp.status().as_u16();
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut e = Event::now("http", None);
    e.ts_us = ts_us;
    e.method = Some(method);
    e.name = Some(path);
    e.status = Some(i32::from(status));
    e.outcome = Some(if status < 400 { "ok" } else { "error" });
    e.query_id = header("x-clickhouse-query-id");
    e.trace_id = header("x-ichibase-trace-id");
    if let Some(c) = slot.lock().ok().and_then(|mut g| g.take()) {
        e.user_id = c.user_id;
        e.role = Some(c.role);
        e.query_id = e.query_id.or(Some(c.query_id));
        e.trace_id = e.trace_id.or(Some(c.trace_id));
    }
    if status >= 400 {
        e.error = header("x-clickhouse-exception-code").map(|c| format!("code {c}"));
    }
    let (parts, body) = resp.into_parts();
    Response::from_parts(
        parts,
        Body::new(Counted {
            inner: body,
            bytes: 0,
            pending: Some((sink, e, started)),
        }),
    )
}

/// A response body that counts what it sends and records the request's row when it is done
/// (or dropped, if the client went away).
struct Counted {
    inner: Body,
    bytes: u64,
    pending: Option<(Sink, Event, Instant)>,
}

impl Counted {
    fn finish(&mut self) {
        if let Some((sink, mut e, started)) = self.pending.take() {
            e.bytes = Some(self.bytes as i64);
            e.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
            sink.record(e);
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.finish();
    }
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
