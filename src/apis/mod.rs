//! HTTP API: the one router where components attach their routes, the shared application state
//! and the rendering of [`Error`]s as responses.
//!
//! Owns HTTP concerns only (status codes, headers, bodies). Components register their routes in
//! [`router`]; request handling delegates to `sql`, `storage` and later components.

pub mod admin;
pub mod analytics;
pub mod auth;
pub mod branches;
pub mod context;
pub mod functions;
pub mod generate;
pub mod limits;
pub mod sql;
pub mod ws;


use axum::Router;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::core::{Error, ErrorCode};

pub use context::{Admin, Caller, RequestScope, admin_area};

pub use crate::app::App;

/// A JSON answer, or the error in the JSON error shape.
pub fn reply<T: serde::Serialize>(r: crate::core::Result<T>) -> Response {
    match r {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => error_response(&e, true, None),
    }
}

/// Which `[http]` limit bounds a request body: set on a route group (or one route) by the
/// [`body_limit`] layer and read by the body extractors ([`JsonBody`], [`BodyBytes`]); a route
/// without the layer gets [`BodyLimit::Json`]. The SQL endpoint reads its own body
/// (`max_body_size`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyLimit {
    /// `[http] max_json_body`: the JSON APIs.
    Json,
    /// `[http] max_function_source`: a function's source (`PUT /fn/{name}`).
    FunctionSource,
}

impl BodyLimit {
    /// The setting's name in `[http]`.
    pub fn setting(self) -> &'static str {
        match self {
            BodyLimit::Json => "max_json_body",
            BodyLimit::FunctionSource => "max_function_source",
        }
    }

    /// The limit in bytes.
    pub fn bytes(self, s: &limits::HttpSettings) -> usize {
        match self {
            BodyLimit::Json => s.max_json_body,
            BodyLimit::FunctionSource => s.max_function_source,
        }
    }
}

/// The layer that bounds the bodies of a route group: `router.layer(body_limit(BodyLimit::Json))`.
/// An inner layer (on one route) wins over the group's.
pub fn body_limit(limit: BodyLimit) -> axum::Extension<BodyLimit> {
    axum::Extension(limit)
}

/// The 413 of a body over `limit`, naming the setting.
fn too_large(limit: BodyLimit, bytes: usize) -> Response {
    error_response(
        &Error::new(
            ErrorCode::RequestTooLarge,
            format!(
                "Request body is larger than {bytes} bytes ([http] {})",
                limit.setting()
            ),
        ),
        true,
        None,
    )
}

/// Read a request body whole, bounded by its route's [`BodyLimit`]: over it, 413
/// `REQUEST_TOO_LARGE` in the JSON error shape (from `Content-Length` before reading, else
/// while reading); a body that cannot be read, 400 `BAD_ARGUMENTS`.
async fn read_limited(req: Request, st: &App) -> Result<axum::body::Bytes, Response> {
    let limit = req
        .extensions()
        .get::<BodyLimit>()
        .copied()
        .unwrap_or(BodyLimit::Json);
    let bytes = limit.bytes(&st.http().settings);
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > bytes as u64
    {
        return Err(too_large(limit, bytes));
    }
    axum::body::to_bytes(req.into_body(), bytes)
        .await
        .map_err(|e| {
            let inner = e.into_inner();
            if inner.is::<http_body_util::LengthLimitError>() {
                too_large(limit, bytes)
            } else {
                error_response(
                    &Error::new(
                        ErrorCode::BadArguments,
                        format!("Could not read the body: {inner}"),
                    ),
                    true,
                    None,
                )
            }
        })
}

/// A raw request body bounded by its route's [`BodyLimit`] (instead of axum's `Bytes`, whose
/// default 2 MB limit answers in plain text).
pub struct BodyBytes(pub axum::body::Bytes);

impl FromRequest<App> for BodyBytes {
    type Rejection = Response;

    async fn from_request(req: Request, state: &App) -> Result<Self, Self::Rejection> {
        read_limited(req, state).await.map(BodyBytes)
    }
}

/// A JSON request body bounded by its route's [`BodyLimit`], whose errors are answered in
/// ichibase's JSON error shape (413 over the limit, 400 for malformed JSON).
pub struct JsonBody<T>(pub T);

impl<T: serde::de::DeserializeOwned> FromRequest<App> for JsonBody<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &App) -> Result<Self, Self::Rejection> {
        let bytes = read_limited(req, state).await?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            error_response(
                &Error::new(ErrorCode::BadArguments, format!("Invalid JSON body: {e}")),
                true,
                None,
            )
        })
    }
}

/// `GET /admin/backup/status`: replication's position, lag and errors.
pub struct BackupModule;

impl crate::modules::Module for BackupModule {
    fn name(&self) -> &'static str {
        "backup"
    }
    fn routes(&self) -> Router<App> {
        Router::new()
            .route("/admin/backup/status", get(backup_status))
            .route_layer(admin_area("/admin/backup/status"))
    }
}

/// Every HTTP route of the engine: `/ping`, then each registered module's routes
/// ([`crate::modules::registry`]), and the one request layer every request passes
/// ([`context::request_layer`]: the request's scope and its posterity row).
pub fn router(state: App) -> Router {
    Router::new()
        .route("/ping", get(ping).head(ping))
        .merge(crate::modules::routes())
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            context::request_layer,
        ))
        .with_state(state)
}

/// `GET /admin/backup/status`: the replicator's position, lag and errors (admin only).
async fn backup_status(
    axum::extract::State(st): axum::extract::State<App>,
    Admin(_): Admin,
) -> Response {
    match &st.replication() {
        Some(r) => {
            axum::Json(serde_json::json!({"enabled": true, "status": r.status()})).into_response()
        }
        None => axum::Json(serde_json::json!({"enabled": false})).into_response(),
    }
}

async fn ping() -> &'static str {
    "Ok.\n"
}

async fn not_found(uri: axum::http::Uri) -> Response {
    error_response(
        &Error::new(ErrorCode::NotFound, format!("No route for {}", uri.path())),
        true,
        None,
    )
}

/// Render an error: ClickHouse's text shape, or JSON when the client asked for a JSON format.
pub fn error_response(e: &Error, json: bool, query_id: Option<&str>) -> Response {
    let status =
        StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = if json {
        let body = serde_json::json!({
            "error": {
                "code": e.code.number(),
                "name": e.code.name(),
                "message": e.message,
                "query_id": query_id,
            },
            "exception": e.to_string(),
        });
        let mut r = (status, format!("{body}\n")).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=UTF-8"),
        );
        r
    } else {
        let mut r = (status, format!("{e}\n")).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=UTF-8"),
        );
        r
    };
    let h = resp.headers_mut();
    h.insert(
        "x-clickhouse-exception-code",
        HeaderValue::from(e.code.number()),
    );
    if let Some(q) = query_id.and_then(|q| HeaderValue::from_str(q).ok()) {
        h.insert("x-clickhouse-query-id", q);
    }
    if let Some(secs) = retry_after(e) {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// A 429 whose message ends "retry after N s" is answered with `Retry-After: N`.
fn retry_after(e: &Error) -> Option<u64> {
    if e.code != ErrorCode::TooManyRequests {
        return None;
    }
    let rest = &e.message[e.message.rfind("retry after ")? + "retry after ".len()..];
    rest.split(' ').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(r: Response) -> String {
        let b = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn errors_in_clickhouse_text_shape() {
        let e = Error::new(ErrorCode::NotFound, "no such thing");
        let r = error_response(&e, false, Some("q-1"));
        assert_eq!(r.status().as_u16(), e.code.http_status());
        let h = r.headers();
        assert_eq!(h["content-type"], "text/plain; charset=UTF-8");
        assert_eq!(h["x-clickhouse-exception-code"], e.code.number().to_string().as_str());
        assert_eq!(h["x-clickhouse-query-id"], "q-1");
        assert!(h.get(header::RETRY_AFTER).is_none());
        assert_eq!(body(r).await, format!("{e}\n"));
    }

    #[tokio::test]
    async fn errors_in_json_shape() {
        let e = Error::new(ErrorCode::BadArguments, "bad \"thing\"");
        let r = error_response(&e, true, None);
        assert_eq!(r.headers()["content-type"], "application/json; charset=UTF-8");
        assert!(r.headers().get("x-clickhouse-query-id").is_none());
        let v: serde_json::Value = serde_json::from_str(&body(r).await).unwrap();
        assert_eq!(v["error"]["code"], e.code.number());
        assert_eq!(v["error"]["name"], e.code.name());
        assert_eq!(v["error"]["message"], "bad \"thing\"");
        assert_eq!(v["error"]["query_id"], serde_json::Value::Null);
        assert_eq!(v["exception"], e.to_string());
        // A query id that is not a valid header value is left out of the headers only.
        let r = error_response(&e, true, Some("bad\nid"));
        assert!(r.headers().get("x-clickhouse-query-id").is_none());
    }

    #[test]
    fn only_429s_that_say_so_carry_retry_after() {
        let too_many = |m: &str| Error::new(ErrorCode::TooManyRequests, m);
        assert_eq!(retry_after(&too_many("slow down; retry after 7 s")), Some(7));
        assert_eq!(retry_after(&too_many("retry after 1 s, then retry after 30 s")), Some(30));
        assert_eq!(retry_after(&too_many("retry after 12")), Some(12));
        assert_eq!(retry_after(&too_many("retry later")), None);
        assert_eq!(retry_after(&too_many("retry after soon")), None);
        assert_eq!(retry_after(&Error::new(ErrorCode::NotFound, "retry after 7 s")), None);
        let r = error_response(&too_many("locked; retry after 42 s"), true, None);
        assert_eq!(r.headers()[header::RETRY_AFTER], "42");
    }

    #[tokio::test]
    async fn replies_are_json_or_the_json_error() {
        let r = reply(Ok(serde_json::json!({"a": 1})));
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(body(r).await, r#"{"a":1}"#);
        let r = reply::<()>(Err(Error::new(ErrorCode::AccessDenied, "no")));
        assert_eq!(r.status().as_u16(), ErrorCode::AccessDenied.http_status());
        assert!(body(r).await.contains("\"name\":\"ACCESS_DENIED\""));
    }
}
