//! Lua services over HTTP: deploy and manage versioned functions (admin), invoke them (any
//! role; the function runs as the caller), fetch traces and hover over traced variables.
//!
//! `PUT /fn/{name}` (source in the body, `?trace=1` traces every call), `GET /fn`,
//! `GET /fn/{name}[?version=N]`, `GET /fn/{name}/versions`, `POST /fn/{name}/rollback`
//! (`{"version": N}` or the previous one), `DELETE /fn/{name}`, `POST /fn/{name}[?trace=1]`
//! (JSON body → the function's argument, its return value → the JSON answer),
//! `GET /trace/{id}`, `GET /trace/{id}/hover?name=x[&step=N]`.
//!
//! Traces show a function's locals and upvalues, so asking for one (`?trace=1`) is for the
//! admin, the function's owner and `[traces] debug_roles`; a trace is read by the admin and its
//! owner only. Each invocation first reserves its memory limit from `[lua_limits]
//! memory_total`.


use axum::extract::{Path, Query, State};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value as JsonValue, json};

use super::{
    Admin, App, BodyBytes, BodyLimit, Caller, admin_area, body_limit, error_response, reply,
};
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::lua::{self, Invocation, store};
use crate::storage::ExecControl;

/// Lua functions: deploy, versions, invoke, traces (`/fn/*`, `/trace/*`).
pub struct FunctionsModule;

impl crate::modules::Module for FunctionsModule {
    fn name(&self) -> &'static str {
        "functions"
    }
    fn routes(&self) -> Router<App> {
        routes()
    }
}

pub fn routes() -> Router<App> {
    const AREA: &str = "managing functions";
    Router::new()
        .route("/fn", get(list).route_layer(admin_area(AREA)))
        .route(
            "/fn/{name}",
            get(fetch)
                .put(deploy)
                .layer(body_limit(BodyLimit::FunctionSource))
                .delete(remove)
                .route_layer(admin_area(AREA))
                .post(invoke),
        )
        .route(
            "/fn/{name}/versions",
            get(versions).route_layer(admin_area(AREA)),
        )
        .route(
            "/fn/{name}/rollback",
            post(rollback).route_layer(admin_area(AREA)),
        )
        .route("/trace/{id}", get(trace))
        .route("/trace/{id}/hover", get(hover))
        .layer(body_limit(BodyLimit::Json))
}

/// Look-ups wait for a connection at most 30 s, never without a deadline.
fn no_deadline() -> std::sync::Arc<ExecControl> {
    ExecControl::lookup()
}

async fn list(State(st): State<App>, Admin(ctx): Admin) -> Response {
    reply(
        st.storage()
            .read(&ctx, no_deadline(), |c| store::list(c))
            .await
            .map(|f| json!({"functions": f})),
    )
}

#[derive(Deserialize)]
struct VersionQuery {
    version: Option<i64>,
}

async fn fetch(
    State(st): State<App>,
    Path(name): Path<String>,
    Query(q): Query<VersionQuery>,
    Admin(ctx): Admin,
) -> Response {
    reply(
        st.storage()
            .read(&ctx, no_deadline(), move |c| {
                store::get(c, &name, q.version)
            })
            .await,
    )
}

async fn versions(State(st): State<App>, Path(name): Path<String>, Admin(ctx): Admin) -> Response {
    reply(
        st.storage()
            .read(&ctx, no_deadline(), move |c| store::versions(c, &name))
            .await
            .map(|v| json!({"versions": v})),
    )
}

#[derive(Deserialize)]
struct TraceFlag {
    trace: Option<String>,
}

fn flag(v: &Option<String>) -> bool {
    v.as_deref()
        .is_some_and(|s| s == "1" || s.eq_ignore_ascii_case("true"))
}

async fn deploy(
    State(st): State<App>,
    Path(name): Path<String>,
    Query(q): Query<TraceFlag>,
    Admin(ctx): Admin,
    BodyBytes(body): BodyBytes,
) -> Response {
    let r = async {
        store::check_name(&name)?;
        let source = String::from_utf8(body.to_vec()).map_err(|_| {
            Error::new(
                ErrorCode::BadArguments,
                "Function source must be UTF-8 text",
            )
        })?;
        Ok(source)
    }
    .await;
    let source = match r {
        Ok(s) => s,
        Err(e) => return error_response(&e, true, None),
    };
    if let Err((e, line)) = lua::deploy_check(&name, &source) {
        return syntax_error(&e, line);
    }
    let trace = flag(&q.trace);
    let by = ctx.user_id.clone().or_else(|| {
        ctx.claim("key_name")
            .and_then(|v| v.as_str())
            .map(str::to_string)
    });
    let n = name.clone();
    reply(
        st.storage()
            .write(&ctx, no_deadline(), move |c| {
                store::deploy(c, &n, &source, trace, by.as_deref())
            })
            .await
            .map(|v| json!({"name": name, "version": v, "trace": trace})),
    )
}

fn syntax_error(e: &Error, line: Option<i64>) -> Response {
    let mut r = error_response(e, true, None);
    let body = json!({"error": {"code": e.code.number(), "name": e.code.name(), "message": e.message, "line": line}, "exception": e.to_string()});
    *r.body_mut() = axum::body::Body::from(format!("{body}\n"));
    r.headers_mut().remove(axum::http::header::CONTENT_LENGTH);
    r
}

async fn remove(State(st): State<App>, Path(name): Path<String>, Admin(ctx): Admin) -> Response {
    let n = name.clone();
    reply(
        st.storage()
            .write(&ctx, no_deadline(), move |c| store::delete(c, &n))
            .await
            .map(|_| json!({"deleted": name})),
    )
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    version: Option<i64>,
}

async fn rollback(
    State(st): State<App>,
    Path(name): Path<String>,
    Admin(ctx): Admin,
    BodyBytes(body): BodyBytes,
) -> Response {
    let b: RollbackBody = if body.is_empty() {
        RollbackBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                return error_response(
                    &Error::new(ErrorCode::BadArguments, format!("Invalid JSON body: {e}")),
                    true,
                    None,
                );
            }
        }
    };
    let n = name.clone();
    reply(
        st.storage()
            .write(&ctx, no_deadline(), move |c| {
                store::rollback(c, &n, b.version)
            })
            .await
            .map(|v| json!({"name": name, "version": v})),
    )
}

async fn invoke(
    State(st): State<App>,
    Path(name): Path<String>,
    Query(q): Query<TraceFlag>,
    Caller(ctx): Caller,
    BodyBytes(body): BodyBytes,
) -> Response {
    let input: JsonValue = if body.iter().all(u8::is_ascii_whitespace) {
        JsonValue::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return error_response(
                    &Error::new(
                        ErrorCode::BadArguments,
                        format!("The request body must be JSON: {e}"),
                    ),
                    true,
                    Some(&ctx.query_id),
                );
            }
        }
    };
    // Each invocation reserves its memory limit from the server-wide budget first: concurrent
    // Lua cannot together exceed `[lua_limits] memory_total`. The reservation moves into the
    // blocking task, so a client that goes away does not free it while its Lua still runs.
    let reserved = match st
        .lua_limits()
        .budget
        .reserve(st.lua().memory_limit as u64)
        .await
    {
        Ok(p) => p,
        Err(e) => return error_response(&e, true, Some(&ctx.query_id)),
    };
    let runtime = lua::Runtime::of_app(&st, tokio::runtime::Handle::current());
    // First on this worker, when the call needs no blocking thread (`lua::invoke_inline`).
    let (input, looked_up) = if flag(&q.trace) {
        (input, None)
    } else {
        match try_inline(&st, &runtime, &ctx, &name, input) {
            Ok(done) => {
                drop(reserved);
                return answer(&ctx, &name, done);
            }
            Err(back) => back,
        }
    };
    // One hop to a blocking thread: look the function up (unless the inline attempt did) and
    // run it there. `lua::invoke` logs the run and keeps its trace.
    let (c2, n, trace_flag, limits) = (
        ctx.clone(),
        name.clone(),
        flag(&q.trace),
        std::sync::Arc::clone(st.lua_limits()),
    );
    let ran = tokio::task::spawn_blocking(
        move || -> Result<Ran> {
            let f = match looked_up {
                Some(f) => f,
                None => limits
                    .sources
                    .live(&runtime.storage, &n, || {
                        Some(runtime.storage.read_blocking(&runtime.rt, &RequestContext::system(), no_deadline(), |c| {
                            store::get(c, &n, None)
                        }))
                    })
                    .unwrap_or_else(|| Err(Error::internal("the function look-up did not run")))?,
            };
            // A trace shows the function's locals and upvalues (its secrets too): only its
            // owner, the admin and `[traces] debug_roles` may ask for one.
            let may_trace = limits.traces.may_trace(&c2, f.created_by.as_deref());
            if trace_flag && !may_trace {
                return Err(Error::new(
                    ErrorCode::AccessDenied,
                    format!(
                        "tracing function '{n}' needs the admin role, ownership of the function or a role in [traces] debug_roles; this request runs as '{}'",
                        c2.role.as_str()
                    ),
                ));
            }
            let trace = trace_flag || f.trace;
            // Who may read the trace besides the admin: the caller, if they may trace it.
            let owner = if may_trace && !c2.is_admin() {
                c2.user_id.clone()
            } else {
                None
            };
            let inv = Invocation {
                function: n,
                version: f.version,
                source: f.source.clone(),
                input,
                trace,
                check: None,
                trace_owner: owner.clone(),
            };
            let (fname, version) = (inv.function.clone(), inv.version);
            let mut outcome = lua::invoke(&runtime, c2.clone(), inv);
            if may_trace && !trace {
                lua::keep_error_trace(&runtime, &c2, &fname, version, owner, &mut outcome);
            }
            drop(reserved);
            Ok((f, trace, may_trace, outcome))
        },
    )
    .await;
    match ran {
        Ok(Ok(v)) => answer(&ctx, &name, v),
        Ok(Err(e)) => error_response(&e, true, Some(&ctx.query_id)),
        Err(e) => error_response(
            &Error::internal(format!("Lua invocation task failed: {e}")),
            true,
            Some(&ctx.query_id),
        ),
    }
}

/// The function, whether the run was traced, whether the caller may trace it, and its outcome.
type Ran = (std::sync::Arc<store::FunctionSource>, bool, bool, lua::Outcome);

/// Look the live version up (cached, or on a reader that is free at once) and run it on this
/// async worker (`lua::invoke_inline`), when the version is not known to need a blocking thread. `Err` gives
/// the input back, with the function when it was looked up: the call goes the usual way
/// (nothing of the attempt is kept).
fn try_inline(
    st: &App,
    runtime: &lua::Runtime,
    ctx: &RequestContext,
    name: &str,
    input: JsonValue,
) -> std::result::Result<Ran, (JsonValue, Option<std::sync::Arc<store::FunctionSource>>)> {
    if runtime.options.inline_budget.is_zero() {
        return Err((input, None));
    }
    let limits = st.lua_limits();
    // The cached live version while nothing was committed since it was read, else a reader
    // that is free at once.
    let f = match limits.sources.live(st.storage(), name, || {
        let control = ExecControl::new(
            std::time::Instant::now(),
            runtime.options.inline_budget.as_secs_f64(),
        );
        st.storage()
            .try_read_inline(&RequestContext::system(), control, |c| store::get(c, name, None))
    }) {
        Some(Ok(f)) if !f.trace => f,
        Some(Ok(f)) => return Err((input, Some(f))),
        // No reader free, or an error (the usual way reports it).
        _ => return Err((input, None)),
    };
    if limits.not_inline.contains(name, f.version) {
        return Err((input, Some(f)));
    }
    let may_trace = limits.traces.may_trace(ctx, f.created_by.as_deref());
    let owner = if may_trace && !ctx.is_admin() {
        ctx.user_id.clone()
    } else {
        None
    };
    let inv = Invocation {
        function: name.to_string(),
        version: f.version,
        source: f.source.clone(),
        input,
        trace: false,
        check: None,
        trace_owner: owner,
    };
    match lua::invoke_inline(runtime, ctx.clone(), inv) {
        Ok(outcome) => Ok((f, false, may_trace, outcome)),
        Err((inv, limited)) => {
            if limited {
                limits.not_inline.insert(name, f.version);
            }
            Err((inv.input, Some(f)))
        }
    }
}

/// The HTTP answer of a finished invocation.
fn answer(ctx: &RequestContext, name: &str, (f, trace, may_trace, mut outcome): Ran) -> Response {
    let trace_id = ctx.trace_id.clone();
    if outcome.steps.take().is_some_and(|(s, _)| lua::large_trace(&s)) {
        // The trace is saved; a large one's memory goes back to the system now.
        lua::release_freed_memory();
    }
    let mut resp = match outcome.result {
        Ok(v) => Json(v).into_response(),
        Err(e) => {
            let mut r = error_response(&e, true, Some(&ctx.query_id));
            // The trace id names a trace the caller can open (the run's trace, or the minimal
            // one kept for a failed untraced run) when the caller may trace; else it is null.
            let readable = may_trace;
            let mut body = json!({
                "error": {"code": e.code.number(), "name": e.code.name(), "message": e.message, "line": outcome.error_line,
                          "function": name, "version": f.version,
                          "trace_id": if readable { Some(&trace_id) } else { None }},
                "exception": e.to_string(),
            });
            if let Some(v) = outcome.error_value.take() {
                body["error"]["value"] = v;
            }
            *r.body_mut() = axum::body::Body::from(format!("{body}\n"));
            r.headers_mut().remove(axum::http::header::CONTENT_LENGTH);
            r
        }
    };
    let hdrs = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&trace_id) {
        hdrs.insert("x-ichibase-trace-id", v);
    }
    hdrs.insert("x-ichibase-function-version", HeaderValue::from(f.version));
    if trace {
        if let Ok(v) = HeaderValue::from_str(&format!("/trace/{trace_id}")) {
            hdrs.insert("x-ichibase-trace", v);
        }
    }
    resp
}

/// How long a trace read waits for that trace's background save.
const TRACE_SAVE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The admin, or the trace's owner (the user who ran the traced invocation, when they were
/// allowed to trace the function). Anyone else is told there is no such trace.
async fn may_see_trace(st: &App, ctx: &RequestContext, id: &str) -> Result<()> {
    // A trace saved in the background (`lua::saver`) may still be queued right after its
    // invocation answered: wait for it (bounded) rather than answer 404.
    lua::saver::wait(id, TRACE_SAVE_WAIT).await;
    let i = id.to_string();
    let owner = st
        .storage()
        .read(&RequestContext::system(), no_deadline(), move |c| {
            store::trace_owner(c, &i)
        })
        .await?;
    if ctx.is_admin() || (owner.is_some() && owner == ctx.user_id) {
        Ok(())
    } else {
        Err(Error::new(ErrorCode::NotFound, format!("No trace {id}")))
    }
}

async fn trace(State(st): State<App>, Path(id): Path<String>, Caller(ctx): Caller) -> Response {
    if let Err(e) = may_see_trace(&st, &ctx, &id).await {
        return error_response(&e, true, None);
    }
    reply(
        st.storage()
            .read(&RequestContext::system(), no_deadline(), move |c| {
                store::get_trace(c, &id)
            })
            .await,
    )
}

#[derive(Deserialize)]
struct HoverQuery {
    name: String,
    step: Option<i64>,
}

async fn hover(
    State(st): State<App>,
    Path(id): Path<String>,
    Query(q): Query<HoverQuery>,
    Caller(ctx): Caller,
) -> Response {
    if let Err(e) = may_see_trace(&st, &ctx, &id).await {
        return error_response(&e, true, None);
    }
    reply(
        st.storage()
            .read(&RequestContext::system(), no_deadline(), move |c| {
                store::hover(c, &id, &q.name, q.step)
            })
            .await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_1_or_true() {
        for (v, want) in [
            (None, false),
            (Some("1"), true),
            (Some("true"), true),
            (Some("TRUE"), true),
            (Some("0"), false),
            (Some(""), false),
            (Some("yes"), false),
        ] {
            assert_eq!(flag(&v.map(String::from)), want, "{v:?}");
        }
    }

    #[tokio::test]
    async fn syntax_errors_carry_their_line() {
        let e = Error::new(ErrorCode::LuaError, "unexpected symbol near '}'");
        let r = syntax_error(&e, Some(3));
        assert_eq!(r.status().as_u16(), e.code.http_status());
        assert!(r.headers().get(axum::http::header::CONTENT_LENGTH).is_none());
        let b = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        let v: JsonValue = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["error"]["line"], 3);
        assert_eq!(v["error"]["name"], e.code.name());
        assert_eq!(v["error"]["message"], "unexpected symbol near '}'");
        assert_eq!(v["exception"], e.to_string());
        let r = syntax_error(&e, None);
        let b = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        assert_eq!(serde_json::from_slice::<JsonValue>(&b).unwrap()["error"]["line"], JsonValue::Null);
    }
}
