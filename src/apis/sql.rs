//! ClickHouse-style SQL-over-HTTP: `POST /` (SQL in the body, or `?query=` with the body as
//! data), `GET /?query=` (read-only), URL settings, `param_*` values, formats, limits and the
//! ClickHouse response headers.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::stream;
use http_body::Frame;
use tokio::sync::mpsc;

use super::{App, RequestScope, error_response};
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::sql::Format;
use crate::sql::exec::{self, Msg, QuerySettings, Summary};
use crate::storage::ExecControl;

/// SQL over HTTP (`/`): ClickHouse's interface over the app's SQLite database.
pub struct SqlModule;

impl crate::modules::Module for SqlModule {
    fn name(&self) -> &'static str {
        "sql"
    }
    fn section(&self) -> Option<&'static str> {
        Some("sql")
    }
    fn provide(&self, b: &mut crate::app::AppBuilder) -> anyhow::Result<()> {
        let s: SqlSettings = b.core().config.section("sql")?;
        s.validate()?;
        b.provide(SqlRuntime {
            inline: s.inline_reads(),
        });
        Ok(())
    }
    fn routes(&self) -> Router<App> {
        routes()
    }
}

/// The `[sql]` section (`ICHIBASE_SQL__<KEY>` in the environment): how `/` runs short reads.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SqlSettings {
    /// A single read-only statement runs on the request's own thread when a reader connection
    /// is free, for at most this many microseconds; past it, it is interrupted and runs again
    /// on the reader pool. 0: every read goes through the pool.
    pub inline_read_budget_us: u64,
    /// Largest answer, in bytes, an inline read builds; a larger one runs again on the pool
    /// (which streams it).
    pub inline_read_max_bytes: usize,
}

impl Default for SqlSettings {
    fn default() -> Self {
        SqlSettings {
            inline_read_budget_us: 1_000,
            inline_read_max_bytes: 64 * 1024,
        }
    }
}

impl SqlSettings {
    /// Largest inline budget: a run holds an async worker for up to this long.
    pub const MAX_BUDGET_US: u64 = 100_000;
    /// Largest inline answer.
    pub const MAX_INLINE_BYTES: usize = 16 * 1024 * 1024;

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.inline_read_budget_us <= Self::MAX_BUDGET_US,
            "[sql] inline_read_budget_us must be at most {} (an inline read holds an async worker thread)",
            Self::MAX_BUDGET_US
        );
        anyhow::ensure!(
            self.inline_read_max_bytes <= Self::MAX_INLINE_BYTES,
            "[sql] inline_read_max_bytes must be at most {}",
            Self::MAX_INLINE_BYTES
        );
        Ok(())
    }

    fn inline_reads(&self) -> exec::InlineReads {
        if self.inline_read_budget_us == 0 || self.inline_read_max_bytes == 0 {
            return exec::InlineReads::OFF;
        }
        exec::InlineReads {
            budget: std::time::Duration::from_micros(self.inline_read_budget_us),
            max_bytes: self.inline_read_max_bytes,
        }
    }
}

/// What the SQL module keeps for its handlers (`app.get::<SqlRuntime>()`).
pub struct SqlRuntime {
    pub inline: exec::InlineReads,
}

pub fn routes() -> Router<App> {
    // ClickHouse compresses a response only when the request sets enable_http_compression=1
    // (marked on the response by `serve`), in an encoding Accept-Encoding names.
    use tower_http::compression::Predicate as _;
    let compression = tower_http::compression::CompressionLayer::new()
        .compress_when(
            tower_http::compression::predicate::DefaultPredicate::new().and(
                |_: axum::http::StatusCode, _: axum::http::Version, _: &HeaderMap, ext: &axum::http::Extensions| {
                    ext.get::<CompressResponse>().is_some()
                },
            ),
        );
    Router::new()
        .route("/", get(handle).post(handle))
        .layer(compression)
}

/// Response extension: the request asked for `enable_http_compression=1`.
#[derive(Debug, Clone, Copy)]
struct CompressResponse;

/// URL arguments ClickHouse clients send that do not change results here.
const IGNORED_SETTINGS: &[&str] = &[
    "enable_http_compression",
    "send_progress_in_http_headers",
    "http_headers_progress_interval_ms",
    "http_response_buffer_size",
    "cancel_http_readonly_queries_on_client_close",
    "output_format_json_quote_denormals",
    "date_time_output_format",
    "log_comment",
    // Native output here never carries block info or LowCardinality: protocol version 0.
    "client_protocol_version",
];

/// What the URL and headers asked for.
struct Request {
    query: Option<String>,
    user: Option<String>,
    password: Option<String>,
    query_id: Option<String>,
    settings: QuerySettings,
    max_execution_time: f64,
    wants_json: bool,
    /// `branch=name`: run against a branch instead of the live database (admin only).
    branch: Option<String>,
    session: crate::sql::session::SessionArgs,
}

fn parse_bool(name: &str, v: &str) -> Result<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(Error::new(
            ErrorCode::BadArguments,
            format!("Setting {name} must be 0 or 1, got '{v}'"),
        )),
    }
}

fn parse_num<T: std::str::FromStr>(name: &str, v: &str) -> Result<T> {
    v.trim().parse().map_err(|_| {
        Error::new(
            ErrorCode::BadArguments,
            format!("Setting {name} must be a number, got '{v}'"),
        )
    })
}

/// A request may lower a server limit (0 = unlimited) but never raise it; asking 0 (ClickHouse's
/// default, "no limit") keeps the server's limit.
fn lower_only<T: PartialOrd + Copy + Default + std::fmt::Display>(
    name: &str,
    asked: T,
    server: T,
) -> Result<T> {
    let zero = T::default();
    if asked == zero {
        Ok(server)
    } else if server == zero || asked <= server {
        Ok(asked)
    } else {
        Err(Error::new(
            ErrorCode::BadArguments,
            format!(
                "Setting {name}={asked} is above the server's limit {server}; a request may only lower it"
            ),
        ))
    }
}

fn parse_request(
    st: &App,
    method: &Method,
    headers: &HeaderMap,
    raw: Option<&str>,
) -> Result<Request> {
    let cfg = &st.config();
    let lim = cfg.limits;
    let mut r = Request {
        query: None,
        user: None,
        password: None,
        query_id: None,
        settings: QuerySettings {
            default_format: None,
            transaction: false,
            readonly: *method == Method::GET,
            max_result_rows: lim.max_result_rows,
            max_result_bytes: lim.max_result_bytes,
            overflow_break: false,
            quote_i64: cfg.json_quote_64bit_integers,
            params: HashMap::new(),
            max_query_size: lim.max_query_size,
            buffer_size: cfg.http_buffer_size,
            log: st.posterity().sink(),
            spool: st.http().spool(),
            max_buffered: st.sql_guard().settings.max_buffered_result_bytes,
        },
        max_execution_time: lim.max_execution_time,
        wants_json: headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("application/json")),
        branch: None,
        session: Default::default(),
    };
    if let Some(f) = headers
        .get("x-clickhouse-format")
        .and_then(|v| v.to_str().ok())
    {
        r.settings.default_format = Some(Format::parse(f)?);
    }
    for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        let s = &mut r.settings;
        match k.as_ref() {
            "query" => r.query = Some(v.into_owned()),
            "user" => r.user = Some(v.into_owned()),
            "password" => r.password = Some(v.into_owned()),
            "query_id" if !v.is_empty() => r.query_id = Some(v.into_owned()),
            "query_id" => {}
            "branch" => r.branch = Some(v.into_owned()).filter(|b| !b.is_empty()),
            "default_format" => s.default_format = Some(Format::parse(&v)?),
            "transaction" => s.transaction = parse_bool(&k, &v)?,
            "readonly" => {
                let level: u8 = parse_num(&k, &v)?;
                if level > 2 {
                    return Err(Error::new(
                        ErrorCode::BadArguments,
                        "Setting readonly must be 0, 1 or 2",
                    ));
                }
                if level > 0 {
                    s.readonly = true;
                } else if *method == Method::GET {
                    return Err(Error::new(
                        ErrorCode::Readonly,
                        "GET requests are always read-only; send writes with POST",
                    ));
                }
            }
            "max_execution_time" => {
                let t: f64 = parse_num(&k, &v)?;
                if !(t >= 0.0 && t.is_finite()) {
                    return Err(Error::new(
                        ErrorCode::BadArguments,
                        "Setting max_execution_time must be a non-negative number of seconds",
                    ));
                }
                r.max_execution_time = lower_only(&k, t, lim.max_execution_time)?;
            }
            "max_result_rows" => {
                s.max_result_rows = lower_only(&k, parse_num(&k, &v)?, lim.max_result_rows)?
            }
            "max_result_bytes" => {
                s.max_result_bytes = lower_only(&k, parse_num(&k, &v)?, lim.max_result_bytes)?
            }
            "result_overflow_mode" => {
                s.overflow_break = match v.as_ref() {
                    "throw" => false,
                    "break" => true,
                    _ => {
                        return Err(Error::new(
                            ErrorCode::BadArguments,
                            "Setting result_overflow_mode must be 'throw' or 'break'",
                        ));
                    }
                }
            }
            "output_format_json_quote_64bit_integers" => s.quote_i64 = parse_bool(&k, &v)?,
            "wait_end_of_query" => {
                if parse_bool(&k, &v)? {
                    s.buffer_size = usize::MAX;
                }
            }
            "session_id" => r.session.id = Some(v.into_owned()),
            "session_timeout" => r.session.timeout = Some(parse_num(&k, &v)?),
            "session_check" => r.session.check = parse_bool(&k, &v)?,
            "database" => {
                if !matches!(v.as_ref(), "default" | "main" | "") {
                    return Err(Error::new(
                        ErrorCode::UnknownDatabase,
                        format!(
                            "Database {v} does not exist; ichibase has one database, 'default'"
                        ),
                    ));
                }
            }
            name if name.starts_with("param_") => {
                s.params
                    .insert(name["param_".len()..].to_string(), v.into_owned());
            }
            name if IGNORED_SETTINGS.contains(&name) => {}
            name => {
                return Err(Error::new(
                    ErrorCode::UnknownSetting,
                    format!("Unknown setting '{name}'"),
                ));
            }
        }
    }
    // JSON error bodies only when asked for outside the SQL (Accept header or default_format):
    // ClickHouse clients append `FORMAT JSONEachRow` themselves and parse errors as text.
    if r.settings.default_format.is_some_and(Format::is_json) {
        r.wants_json = true;
    }
    Ok(r)
}

/// Cancels the query if the response (or the client) goes away before it finished.
struct CancelOnDrop(Arc<ExecControl>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Which database a ClickHouse-style request runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// The app's SQLite database (`/`).
    Sqlite,
    /// The read-only analytics database, DuckDB (`/analytics`).
    Analytics,
}

async fn handle(
    State(st): State<App>,
    scope: RequestScope,
    method: Method,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Response {
    serve(st, scope, method, headers, raw, body, Engine::Sqlite).await
}

/// Serve one ClickHouse-style request on `engine`: the same settings, parameters, formats,
/// limits, headers and streaming for both. The request identifies through `scope` (its
/// credentials may be URL arguments).
pub async fn serve(
    st: App,
    scope: RequestScope,
    method: Method,
    headers: HeaderMap,
    raw: Option<String>,
    body: Body,
    engine: Engine,
) -> Response {
    let compress = form_urlencoded::parse(raw.as_deref().unwrap_or("").as_bytes())
        .any(|(k, v)| k == "enable_http_compression" && matches!(v.as_ref(), "1" | "true"));
    let mut resp = serve_inner(st, scope, method, headers, raw, body, engine).await;
    if compress {
        resp.extensions_mut().insert(CompressResponse);
    }
    resp
}

async fn serve_inner(
    st: App,
    scope: RequestScope,
    method: Method,
    headers: HeaderMap,
    raw: Option<String>,
    body: Body,
    engine: Engine,
) -> Response {
    let req = match parse_request(&st, &method, &headers, raw.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            let json = headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("json"));
            return error_response(&e, json, None);
        }
    };
    if method == Method::GET && req.query.is_none() {
        return "Ok.\n".into_response();
    }
    let ctx = match scope.identify(
        &st,
        &headers,
        req.user.as_deref(),
        req.password.as_deref(),
        req.query_id.clone(),
    ) {
        Ok(c) => c,
        Err(e) => {
            let mut r = error_response(&e, req.wants_json, req.query_id.as_deref());
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"ichibase\""),
            );
            return r;
        }
    };
    if let Err(e) = crate::sql::session::enter(&req.session, &ctx) {
        return error_response(&e, req.wants_json, Some(&ctx.query_id));
    }
    let body = if method == Method::GET {
        Bytes::new()
    } else {
        match read_body(body, &headers, st.config().limits.max_body_size).await {
            Ok(b) => b,
            Err(e) => {
                // The unread rest of the body makes the connection unusable: say so, so clients
                // do not send their next request on it.
                let mut r = error_response(&e, req.wants_json, Some(&ctx.query_id));
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return r;
            }
        }
    };
    let (text, data) = match compose_text(req.query.as_deref(), &body, &method) {
        Ok(t) => t,
        Err(e) => return error_response(&e, req.wants_json, Some(&ctx.query_id)),
    };
    let storage = match &req.branch {
        None => st.storage().clone(),
        Some(name) => {
            let target = if ctx.is_admin() {
                st.branches().get(name).await
            } else {
                Err(Error::new(
                    ErrorCode::AccessDenied,
                    format!(
                        "Querying branches needs the admin role; this request runs as '{}'",
                        ctx.role.as_str()
                    ),
                ))
            };
            match target {
                Ok(s) => s,
                Err(e) => return error_response(&e, req.wants_json, Some(&ctx.query_id)),
            }
        }
    };
    let control = ExecControl::for_request(
        ctx.started,
        req.max_execution_time,
        st.sql_guard().value_limit(&ctx),
        st.sql_guard().write_limit(&ctx),
    );
    let guard = CancelOnDrop(Arc::clone(&control));
    // A fair share of the connection pool per identity (all anonymous clients count as one).
    let turn = match st.sql_guard().admit(&ctx).await {
        Ok(t) => t,
        Err(e) => {
            log(&ctx, &method, e.code.http_status(), None, Some(&e));
            let mut r = error_response(&e, req.wants_json, Some(&ctx.query_id));
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
    };
    let (format, mut rx) = match engine {
        Engine::Sqlite => {
            let inline = st.get::<SqlRuntime>().map_or(exec::InlineReads::OFF, |r| r.inline);
            exec::start_inline(storage, ctx.clone(), control, text, data, req.settings, turn, inline)
        }
        Engine::Analytics if data.is_some() => {
            let e = Error::new(ErrorCode::Readonly, "The analytics database is read-only");
            return error_response(&e, req.wants_json, Some(&ctx.query_id));
        }
        Engine::Analytics => crate::posterity::analytics::start(
            st.posterity().clone(),
            ctx.clone(),
            control,
            text,
            req.settings,
        ),
    };
    let wants_json = req.wants_json;
    let first = rx
        .recv()
        .await
        .unwrap_or_else(|| Msg::Error(Error::internal("query task ended without an answer")));
    let resp = match first {
        Msg::Error(e) => {
            log(&ctx, &method, e.code.http_status(), None, Some(&e));
            return error_response(&e, wants_json, Some(&ctx.query_id));
        }
        Msg::Done(bytes, summary) => {
            log(&ctx, &method, 200, Some(&summary), None);
            ok_response(Body::from(bytes), format, &ctx, &summary)
        }
        Msg::Data(bytes, summary) => {
            log(&ctx, &method, 200, Some(&summary), None);
            let tag = exception_tag();
            let mut resp = ok_response(
                streaming_body(bytes, rx, guard, tag.clone()),
                format,
                &ctx,
                &summary,
            );
            if let Ok(v) = HeaderValue::from_str(&tag) {
                resp.headers_mut().insert("x-clickhouse-exception-tag", v);
            }
            // The summary header counts what was ready when the headers went out; the final
            // one follows as a trailer.
            resp.headers_mut()
                .insert(header::TRAILER, HeaderValue::from_static("x-clickhouse-summary"));
            resp
        }
    };
    resp
}

fn log(
    ctx: &RequestContext,
    method: &Method,
    status: u16,
    summary: Option<&Summary>,
    err: Option<&Error>,
) {
    let elapsed_ms = ctx.started.elapsed().as_secs_f64() * 1e3;
    match err {
        Some(e) if status >= 500 => {
            tracing::error!(query_id = %ctx.query_id, %method, status, elapsed_ms, error = %e, "sql request failed")
        }
        Some(e) => {
            tracing::info!(query_id = %ctx.query_id, %method, status, elapsed_ms, error = %e, "sql request rejected")
        }
        // A line per answered request only at debug level: the posterity log keeps every
        // request (`http` and `sql` rows), and formatting a line to stderr per request cost
        // about 6% of the server's CPU on a point SELECT.
        None => tracing::debug!(
            query_id = %ctx.query_id, %method, status, elapsed_ms,
            result_rows = summary.map(|s| s.result_rows), written_rows = summary.map(|s| s.written_rows), "sql request"
        ),
    }
}

async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes> {
    let too_large = || {
        Error::new(
            ErrorCode::RequestTooLarge,
            format!("Request body is larger than {limit} bytes (max_body_size)"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(too_large());
        }
    }
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        let inner = e.into_inner();
        if inner.is::<http_body_util::LengthLimitError>() {
            too_large()
        } else {
            Error::new(
                ErrorCode::BadArguments,
                format!("Could not read the request body: {inner}"),
            )
        }
    })?;
    if encoding.is_empty() {
        return Ok(bytes);
    }
    // Decompressing up to max_body_size is CPU work: off the async workers.
    tokio::task::spawn_blocking(move || crate::sql::compress::decode(&encoding, bytes, limit))
        .await
        .map_err(|e| Error::internal(format!("decompression task failed: {e}")))?
}

/// ClickHouse's rule: `?query=` text, then a newline and the body (insert data), or the body
/// alone when there is no `query` argument. Binary insert data (Native, RowBinary) comes back
/// apart from the text: after `?query=INSERT ... FORMAT Native`, or after that SQL at the start
/// of the body.
fn compose_text(
    url_query: Option<&str>,
    body: &Bytes,
    method: &Method,
) -> Result<(String, Option<Bytes>)> {
    let binary_insert = |sql: &str| {
        crate::sql::parse::parse(sql).ok().and_then(|p| p.insert).and_then(|(t, data)| {
            Format::parse(&t.format)
                .is_ok_and(Format::is_binary)
                .then_some(sql.len() - data.len())
        })
    };
    if let (Some(q), false) = (url_query, body.is_empty()) {
        if binary_insert(q).is_some() {
            return Ok((q.to_string(), Some(body.clone())));
        }
    }
    let body = match std::str::from_utf8(body) {
        Ok(b) => b,
        Err(e) => {
            let prefix = std::str::from_utf8(&body[..e.valid_up_to()]).unwrap_or("");
            if url_query.is_none() {
                if let Some(start) = binary_insert(prefix) {
                    return Ok((prefix[..start].to_string(), Some(body.slice(start..))));
                }
            }
            return Err(Error::new(
                ErrorCode::BadArguments,
                format!(
                    "Request body is not valid UTF-8 (at byte {}); binary data must follow INSERT ... FORMAT Native, RowBinary or RowBinaryWithNamesAndTypes",
                    e.valid_up_to()
                ),
            ));
        }
    };
    let text = match (url_query, body.is_empty()) {
        (Some(q), true) => q.to_string(),
        (Some(q), false) => format!("{q}\n{body}"),
        (None, false) => body.to_string(),
        (None, true) if *method == Method::GET => {
            return Err(Error::syntax("Empty query: pass the SQL as ?query="));
        }
        (None, true) => {
            return Err(Error::syntax(
                "Empty query: send the SQL in the POST body or as ?query=",
            ));
        }
    };
    if text.trim().is_empty() {
        return Err(Error::syntax("Empty query"));
    }
    Ok((text, None))
}

fn ok_response(body: Body, format: Format, ctx: &RequestContext, summary: &Summary) -> Response {
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    h.insert(
        "x-clickhouse-format",
        HeaderValue::from_static(format.name()),
    );
    if let Ok(v) = HeaderValue::from_str(&ctx.query_id) {
        h.insert("x-clickhouse-query-id", v);
    }
    if let Ok(v) = HeaderValue::from_str(&summary.to_header()) {
        h.insert("x-clickhouse-summary", v);
    }
    if let Ok(v) = HeaderValue::from_str(&ctx.trace_id) {
        h.insert("x-ichibase-trace-id", v);
    }
    resp
}

/// Text appended when a query fails after its response started streaming (the status is
/// already 200), framed as ClickHouse (25.11+) does so its clients recognise it:
/// `\r\n__exception__\r\n<tag>\n<message>\n<len(message)+1> <tag>\r\n__exception__\r\n`.
/// `tag` is random per response and announced in `X-ClickHouse-Exception-Tag`, so a client
/// can tell a real failure from data that merely looks like one.
pub fn exception_trailer(e: &Error, tag: &str) -> String {
    let msg = e.to_string();
    format!(
        "\r\n__exception__\r\n{tag}\n{msg}\n{} {tag}\r\n__exception__\r\n",
        msg.len() + 1
    )
}

/// 16 random lower-case alphanumerics, as ClickHouse's exception tags.
fn exception_tag() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    uuid::Uuid::new_v4()
        .as_bytes()
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

fn streaming_body(first: Bytes, rx: mpsc::Receiver<Msg>, guard: CancelOnDrop, tag: String) -> Body {
    enum St {
        First(Bytes),
        Rest,
        Summary(Summary),
        End,
    }
    let s = stream::unfold(
        (St::First(first), rx, guard),
        move |(state, mut rx, guard)| {
            let tag = tag.clone();
            async move {
                match state {
                    St::First(b) => Some((
                        Ok::<_, std::io::Error>(Frame::data(b)),
                        (St::Rest, rx, guard),
                    )),
                    St::Rest => match rx.recv().await {
                        Some(Msg::Data(b, _)) => Some((Ok(Frame::data(b)), (St::Rest, rx, guard))),
                        Some(Msg::Done(b, summary)) => {
                            Some((Ok(Frame::data(b)), (St::Summary(summary), rx, guard)))
                        }
                        Some(Msg::Error(e)) => {
                            tracing::warn!(error = %e, "query failed after streaming began");
                            Some((
                                Ok(Frame::data(Bytes::from(exception_trailer(&e, &tag)))),
                                (St::End, rx, guard),
                            ))
                        }
                        None => {
                            let e =
                                Error::internal("query task ended without finishing the result");
                            Some((
                                Ok(Frame::data(Bytes::from(exception_trailer(&e, &tag)))),
                                (St::End, rx, guard),
                            ))
                        }
                    },
                    // The whole answer's counters, as an HTTP trailer (sent by hyper when the
                    // request said `TE: trailers`; the header carried the first part's).
                    St::Summary(summary) => {
                        let mut t = HeaderMap::new();
                        if let Ok(v) = HeaderValue::from_str(&summary.to_header()) {
                            t.insert("x-clickhouse-summary", v);
                        }
                        Some((Ok(Frame::trailers(t)), (St::End, rx, guard)))
                    }
                    St::End => None,
                }
            }
        },
    );
    // Fused: the compression layer may poll once more after the end.
    Body::new(http_body_util::StreamBody::new(futures_util::StreamExt::fuse(s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boolean_settings_take_0_1_true_false() {
        for (v, want) in [("1", true), ("true", true), ("TRUE", true), ("0", false), ("False", false)] {
            assert_eq!(parse_bool("readonly", v).unwrap(), want, "{v}");
        }
        for v in ["", "yes", "2", " 1"] {
            let e = parse_bool("readonly", v).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadArguments, "{v:?}");
            assert!(e.message.contains("readonly must be 0 or 1"), "{}", e.message);
        }
    }

    #[test]
    fn numeric_settings_are_trimmed_and_typed() {
        assert_eq!(parse_num::<u64>("max_result_rows", " 42 ").unwrap(), 42);
        assert_eq!(parse_num::<f64>("max_execution_time", "1.5").unwrap(), 1.5);
        for v in ["", "-1", "1e3x", "ten"] {
            let e = parse_num::<u64>("max_result_rows", v).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadArguments, "{v:?}");
            assert!(e.message.contains("max_result_rows must be a number"), "{}", e.message);
        }
    }

    #[test]
    fn a_request_may_lower_a_limit_but_never_raise_it() {
        // Server limit 100.
        assert_eq!(lower_only("max_result_rows", 10u64, 100).unwrap(), 10);
        assert_eq!(lower_only("max_result_rows", 100u64, 100).unwrap(), 100);
        let e = lower_only("max_result_rows", 101u64, 100).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadArguments);
        assert!(e.message.contains("max_result_rows=101"), "{}", e.message);
        // 0 (ClickHouse's default, sent by its clients) means the server's own limit, never none.
        assert_eq!(lower_only("max_result_rows", 0u64, 100).unwrap(), 100);
        // A server without a limit (0) takes anything.
        assert_eq!(lower_only("max_result_rows", 0u64, 0).unwrap(), 0);
        assert_eq!(lower_only("max_result_rows", 5u64, 0).unwrap(), 5);
        assert_eq!(lower_only("max_execution_time", 0.5f64, 30.0).unwrap(), 0.5);
        assert!(lower_only("max_execution_time", 31.0f64, 30.0).is_err());
    }

    #[test]
    fn query_text_is_the_url_query_then_the_body() {
        let post = Method::POST;
        let text = |q: Option<&str>, body: &'static [u8], m: &Method| {
            compose_text(q, &Bytes::from_static(body), m)
        };
        assert_eq!(text(Some("SELECT 1"), b"", &post).unwrap().0, "SELECT 1");
        assert_eq!(
            text(Some("INSERT INTO t FORMAT CSV"), b"1,2", &post).unwrap().0,
            "INSERT INTO t FORMAT CSV\n1,2"
        );
        assert_eq!(text(None, b"SELECT 2", &post).unwrap().0, "SELECT 2");
        let e = text(None, b"", &Method::GET).unwrap_err();
        assert_eq!(e.code, ErrorCode::SyntaxError);
        assert!(e.message.contains("?query="), "{}", e.message);
        let e = text(None, b"", &post).unwrap_err();
        assert!(e.message.contains("POST body"), "{}", e.message);
        assert_eq!(text(Some("  "), b"", &post).unwrap_err().code, ErrorCode::SyntaxError);
        assert_eq!(text(None, b" \n", &post).unwrap_err().code, ErrorCode::SyntaxError);
        let e = text(None, b"SELECT '\xff'", &post).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadArguments);
        assert!(e.message.contains("at byte 8"), "{}", e.message);
        // Binary insert data stays apart from the text.
        let (sql, data) = text(Some("INSERT INTO t FORMAT RowBinary"), b"\x01\xff", &post).unwrap();
        assert_eq!(sql, "INSERT INTO t FORMAT RowBinary");
        assert_eq!(data.as_deref(), Some(&b"\x01\xff"[..]));
    }

    #[test]
    fn the_exception_trailer_is_framed_as_clickhouse_does() {
        let e = Error::new(ErrorCode::TimeoutExceeded, "too slow");
        let msg = e.to_string();
        let t = exception_trailer(&e, "abc123");
        assert_eq!(
            t,
            format!("\r\n__exception__\r\nabc123\n{msg}\n{} abc123\r\n__exception__\r\n", msg.len() + 1)
        );
        let tag = exception_tag();
        assert_eq!(tag.len(), 16);
        assert!(tag.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()), "{tag}");
        assert_ne!(tag, exception_tag());
    }
}
