//! `/flows` routes and the operations they share with the `flow` Lua global.
//!
//! `POST /flows/{name}` (`{"input": ..., "id": "..."}`, both optional) starts an instance as
//! the caller; `GET /flows[?status=&name=&limit=]`, `GET /flows/{id}`,
//! `POST /flows/{id}/cancel`, `POST /flows/{id}/events/{event}` (the body is the payload),
//! `GET /flows/schedules`, `DELETE /flows/schedules/{name}`. The admin sees every instance;
//! another signed-in user only the instances they started.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value as Json, json};

use super::FlowService;
use super::journal::{self, NewFlow};
use crate::apis::{Admin, BodyBytes, BodyLimit, Caller, admin_area, body_limit, reply};
use crate::app::App;
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::storage::ExecControl;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/flows", get(list))
        .route(
            "/flows/schedules",
            get(schedules).route_layer(admin_area("managing flow schedules")),
        )
        .route(
            "/flows/schedules/{name}",
            axum::routing::delete(unschedule_http).route_layer(admin_area("managing flow schedules")),
        )
        .route("/flows/clock", post(clock_http))
        .route("/flows/{id}", get(show).post(start_http))
        .route("/flows/{id}/cancel", post(cancel_http))
        .route("/flows/{id}/events/{event}", post(event_http))
        .layer(body_limit(BodyLimit::Json))
}

fn service(app: &App) -> Result<&FlowService> {
    app.get::<FlowService>()
        .ok_or_else(|| Error::internal("the flow service is not running"))
}

/// Start an instance of `name` as `ctx` (idempotent with an explicit id). Returns
/// (id, version, created).
pub(crate) async fn start(
    app: &App,
    ctx: &RequestContext,
    name: &str,
    input: Json,
    id: Option<String>,
    schedule: Option<(String, i64)>,
) -> Result<(String, i64, bool)> {
    crate::lua::store::check_name(name)?;
    let svc = service(app)?;
    if let Some(i) = &id {
        super::component::check_id(i)?;
    }
    let input = input.to_string();
    if input.len() as u64 > svc.settings.max_input_bytes {
        return Err(Error::new(
            ErrorCode::FlowLimit,
            format!(
                "the input is {} bytes, over [flow] max_input_bytes ({})",
                input.len(),
                svc.settings.max_input_bytes
            ),
        ));
    }
    let (user_id, role, claims) = super::component::identity(ctx);
    let id = id.unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let (schedule, tick) = match schedule {
        Some((s, t)) => (Some(s), Some(t)),
        None => (None, None),
    };
    let nf = NewFlow {
        id: id.clone(),
        name: name.to_string(),
        input,
        trace_id: uuid::Uuid::new_v4().simple().to_string(),
        user_id,
        role,
        claims,
        parent_id: None,
        schedule,
        tick,
        now: svc.now_ms(),
    };
    let max = svc.settings.max_active;
    let (version, created) = app
        .storage()
        .write(&RequestContext::system(), ExecControl::lookup(), move |c| {
            let tx = c.transaction()?;
            if journal::load(&tx, &nf.id)?.is_none() && journal::active(&tx)? >= max {
                return Err(Error::new(
                    ErrorCode::FlowLimit,
                    format!("{max} workflows are unfinished ([flow] max_active)"),
                ));
            }
            let r = journal::insert(&tx, &nf)?;
            tx.commit()?;
            Ok(r)
        })
        .await?;
    if created {
        svc.wake();
    }
    Ok((id, version, created))
}

/// May `ctx` see and steer an instance of `owner`?
fn may_see(ctx: &RequestContext, owner: Option<&str>) -> bool {
    ctx.is_admin() || (ctx.user_id.is_some() && ctx.user_id.as_deref() == owner)
}

async fn owner_of(app: &App, id: &str) -> Result<Option<String>> {
    let i = id.to_string();
    let row = app
        .storage()
        .read(&RequestContext::system(), ExecControl::lookup(), move |c| {
            journal::load(c, &i)
        })
        .await?;
    match row {
        None => Err(Error::new(ErrorCode::NotFound, format!("No flow '{id}'"))),
        Some(r) => Ok(r.user_id),
    }
}

fn hidden(id: &str) -> Error {
    // The same answer as a missing instance: others' ids are not confirmed.
    Error::new(ErrorCode::NotFound, format!("No flow '{id}'"))
}

pub(crate) async fn signal(app: &App, ctx: &RequestContext, id: &str, event: &str, payload: Json) -> Result<()> {
    let svc = service(app)?;
    if event.is_empty() || event.len() > 200 || event.chars().any(char::is_control) {
        return Err(Error::new(
            ErrorCode::BadArguments,
            "an event name must be 1 to 200 characters without control characters",
        ));
    }
    if !may_see(ctx, owner_of(app, id).await?.as_deref()) {
        return Err(hidden(id));
    }
    let payload = payload.to_string();
    if payload.len() as u64 > svc.settings.max_input_bytes {
        return Err(Error::new(
            ErrorCode::FlowLimit,
            "the event payload is over [flow] max_input_bytes",
        ));
    }
    let (i, e, now, max) = (id.to_string(), event.to_string(), svc.now_ms(), svc.settings.max_events);
    app.storage()
        .write(&RequestContext::system(), ExecControl::lookup(), move |c| {
            journal::add_event(c, &i, &e, &payload, now, max)
        })
        .await?;
    svc.wake();
    Ok(())
}

pub(crate) async fn detail(app: &App, ctx: &RequestContext, id: &str, _full: bool) -> Result<Json> {
    let i = id.to_string();
    let d = app
        .storage()
        .read(&RequestContext::system(), ExecControl::lookup(), move |c| {
            journal::detail(c, &i)
        })
        .await?;
    match d {
        Some((owner, v)) if may_see(ctx, owner.as_deref()) => Ok(v),
        _ => Err(hidden(id)),
    }
}

pub(crate) async fn cancel(app: &App, ctx: &RequestContext, id: &str) -> Result<bool> {
    let svc = service(app)?;
    if !may_see(ctx, owner_of(app, id).await?.as_deref()) {
        return Err(hidden(id));
    }
    let (i, now) = (id.to_string(), svc.now_ms());
    let ids = app
        .storage()
        .write(&RequestContext::system(), ExecControl::lookup(), move |c| {
            journal::cancel(c, &i, now)
        })
        .await?;
    for x in &ids {
        svc.note_cancelled(x);
    }
    svc.wake();
    Ok(!ids.is_empty())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StartBody {
    input: Option<Json>,
    id: Option<String>,
}

async fn start_http(
    State(app): State<App>,
    Path(name): Path<String>,
    Caller(ctx): Caller,
    BodyBytes(body): BodyBytes,
) -> Response {
    let b: StartBody = if body.iter().all(u8::is_ascii_whitespace) {
        StartBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                return reply::<Json>(Err(Error::new(
                    ErrorCode::BadArguments,
                    format!("The body must be JSON {{\"input\": ..., \"id\": \"...\"}}: {e}"),
                )));
            }
        }
    };
    let r = start(&app, &ctx, &name, b.input.unwrap_or(Json::Null), b.id, None).await;
    reply(r.map(|(id, version, created)| {
        json!({"id": id, "name": name, "version": version, "created": created})
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    name: Option<String>,
    limit: Option<usize>,
}

async fn list(State(app): State<App>, Query(q): Query<ListQuery>, Caller(ctx): Caller) -> Response {
    let r = async {
        let svc = service(&app)?;
        let user = if ctx.is_admin() {
            None
        } else {
            Some(ctx.user_id.clone().ok_or_else(|| {
                Error::new(ErrorCode::AccessDenied, "listing flows needs a signed-in user")
            })?)
        };
        let limit = q.limit.unwrap_or(100).min(svc.settings.list_limit);
        app.storage()
            .read(&RequestContext::system(), ExecControl::lookup(), move |c| {
                let flows = journal::list(c, user.as_deref(), q.status.as_deref(), q.name.as_deref(), limit)?;
                let counts = journal::counts(c, user.as_deref())?;
                Ok(json!({"flows": flows, "counts": counts}))
            })
            .await
    }
    .await;
    reply(r)
}

async fn show(State(app): State<App>, Path(id): Path<String>, Caller(ctx): Caller) -> Response {
    reply(detail(&app, &ctx, &id, true).await)
}

async fn cancel_http(State(app): State<App>, Path(id): Path<String>, Caller(ctx): Caller) -> Response {
    reply(
        cancel(&app, &ctx, &id)
            .await
            .map(|c| json!({"id": id, "cancelled": c})),
    )
}

async fn event_http(
    State(app): State<App>,
    Path((id, event)): Path<(String, String)>,
    Caller(ctx): Caller,
    BodyBytes(body): BodyBytes,
) -> Response {
    let payload: Json = if body.iter().all(u8::is_ascii_whitespace) {
        Json::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return reply::<Json>(Err(Error::new(
                    ErrorCode::BadArguments,
                    format!("The event payload must be JSON: {e}"),
                )));
            }
        }
    };
    reply(
        signal(&app, &ctx, &id, &event, payload)
            .await
            .map(|_| json!({"id": id, "event": event, "queued": true})),
    )
}

async fn schedules(State(app): State<App>, Admin(_): Admin) -> Response {
    let r = async {
        let svc = service(&app)?;
        let (now, started) = (svc.now_ms(), svc.started_ms());
        app.storage()
            .read(&RequestContext::system(), ExecControl::lookup(), |c| {
                super::cron::list(c)
            })
            .await
            .map(|s| {
                // The flow clock: ticks before `started_at` fell due while the server was down.
                json!({"schedules": s, "clock": {"now": journal::iso(Some(now)), "started_at": journal::iso(Some(started))}})
            })
    }
    .await;
    reply(r)
}

async fn unschedule_http(State(app): State<App>, Path(name): Path<String>, Admin(ctx): Admin) -> Response {
    reply(
        super::cron::unschedule(&app, &ctx, &name)
            .await
            .map(|d| json!({"name": name, "deleted": d})),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClockMove {
    advance_secs: Option<f64>,
    offset_secs: Option<f64>,
}

/// `POST /flows/clock` `{"advance_secs": s}` or `{"offset_secs": s}` (admin, and only with the
/// test-only `[flow] clock_control`): move the flow clock forwards while the server runs, then
/// look for due work at once. Answers the clock (`now`, `offset_secs`).
async fn clock_http(State(app): State<App>, Admin(_): Admin, body: crate::apis::JsonBody<ClockMove>) -> Response {
    let r = (|| {
        let svc = service(&app)?;
        if !svc.settings.clock_control {
            return Err(Error::new(
                ErrorCode::AccessDenied,
                "moving the flow clock needs the test-only setting [flow] clock_control = true",
            ));
        }
        let m = body.0;
        let target = match (m.advance_secs, m.offset_secs) {
            (Some(a), None) if a.is_finite() && a >= 0.0 => svc.clock.offset_secs() + a,
            (None, Some(o)) if o.is_finite() => o,
            _ => {
                return Err(Error::new(
                    ErrorCode::BadArguments,
                    "give either advance_secs (>= 0) or offset_secs, a number",
                ));
            }
        };
        svc.clock
            .set_offset_secs(target)
            .map_err(|e| Error::new(ErrorCode::BadArguments, e))?;
        svc.wake();
        Ok(json!({"now": journal::iso(Some(svc.now_ms())), "offset_secs": svc.clock.offset_secs()}))
    })();
    reply(r)
}
