//! The `/ai` routes: models, generations (one, a filtered list), usage with quality, feedback
//! and replay. Generations are read back from the posterity log (DuckDB, `log_all`, rows of
//! kind `ai`; ratings are kind `ai_feedback`), after a flush so a call just made is visible.
//!
//! - `GET /ai/models` (any caller): the configured models, prices and fallbacks (never keys).
//! - `GET /ai/generations/{id}`: one generation, OpenRouter's field names (`{"data": {...}}`);
//!   the admin sees all, a user their own.
//! - `GET /ai/generations?function=&user=&model=&trace_id=&since=&until=&limit=`: newest first; a
//!   non-admin sees only their own.
//! - `GET /ai/usage?group_by=model|function|user|day&since=&until=` (admin): calls, errors,
//!   tokens, cost, latency, cache hits and ratings per group, plus today's budgets.
//! - `POST /ai/generations/{id}/feedback` `{"score", "note"}`: the caller's verdict.
//! - `POST /ai/generations/{id}/replay` `{"model"}` (admin): send the logged request again.
//! - `POST /ai/eval` (admin): an eval file (see `eval.rs`), answered with results and a summary.

use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{Map, Value as Json, json};

use super::AiService;
use super::provider::ChatRequest;
use crate::apis::{Admin, App, BodyBytes, Caller, JsonBody, reply};
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::storage::ExecControl;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/ai/models", get(models))
        .route("/ai/generations", get(list))
        .route("/ai/generations/{id}", get(one))
        .route("/ai/generations/{id}/feedback", post(feedback))
        .route("/ai/generations/{id}/replay", post(replay))
        .route("/ai/usage", get(usage))
        .route("/ai/eval", post(eval))
}

async fn eval(State(app): State<App>, Admin(ctx): Admin, JsonBody(f): JsonBody<super::eval::EvalFile>) -> Response {
    reply(super::eval::run(&app, &ctx, f).await)
}

/// Run a read-only analytics query as the system; rows as JSON objects. Blocking.
pub(crate) fn query(p: &crate::posterity::Posterity, sql: &str, params: &Map<String, Json>, max_rows: u64) -> Result<Vec<Json>> {
    let control = ExecControl::with_value_limit(std::time::Instant::now(), 30.0, 0);
    let rows = crate::posterity::analytics::query_json(p, &RequestContext::system(), &control, sql, params, max_rows, 1 << 20)?;
    Ok(rows
        .rows
        .into_iter()
        .map(|r| {
            let mut o = Map::new();
            for (c, v) in rows.columns.iter().zip(r) {
                use rusqlite::types::Value as V;
                o.insert(
                    c.clone(),
                    match v {
                        V::Null => Json::Null,
                        V::Integer(i) => json!(i),
                        V::Real(f) => json!(f),
                        V::Text(t) => Json::String(t),
                        V::Blob(_) => Json::Null,
                    },
                );
            }
            Json::Object(o)
        })
        .collect())
}

const ROW: &str = "SELECT CAST(ts AS VARCHAR) AS ts, user_id, role, trace_id, outcome, error, elapsed_ms, CAST(detail AS VARCHAR) AS detail FROM log_all WHERE kind = 'ai'";

/// The log row of generation `id` (flushing queued rows first). Blocking.
pub(crate) fn find(p: &crate::posterity::Posterity, id: &str) -> Result<Option<Json>> {
    p.flush();
    let mut params = Map::new();
    params.insert("id".into(), json!(id));
    let rows = query(p, &format!("{ROW} AND (detail->>'id') = {{id:String}} LIMIT 1"), &params, 1)?;
    Ok(rows.into_iter().next())
}

/// A log row as the API shows it (OpenRouter's names where they match).
fn shape(row: &Json, full: bool) -> Json {
    let d: Json = row["detail"].as_str().and_then(|s| serde_json::from_str(s).ok()).unwrap_or(Json::Null);
    let mut o = json!({
        "id": d["id"], "created_at": row["ts"], "user_id": row["user_id"], "trace_id": row["trace_id"],
        "function": d["function"], "origin": d["purpose"], "call": d["call"],
        "model": d["model"], "model_requested": d["model_requested"], "provider": d["provider"],
        "provider_name": d["provider_name"], "provider_model": d["provider_model"],
        "attempts": d["attempts"], "fallbacks": d["fallbacks"], "models_tried": d["models_tried"],
        "tokens_prompt": d["tokens_prompt"], "tokens_completion": d["tokens_completion"],
        "native_tokens_cached": d["native_tokens_cached"], "usage_estimated": d["usage_estimated"],
        "total_cost": d["total_cost"], "latency": d["latency"], "generation_time": d["generation_time"],
        "time_to_first_token": d["time_to_first_token"], "tokens_per_second": d["tokens_per_second"],
        "finish_reason": d["finish_reason"], "streamed": d["streamed"], "cancelled": d["cancelled"],
        "cache_hit": d["cache_hit"], "steps": d["steps"], "outcome": row["outcome"], "error": row["error"],
    });
    if full {
        o["request"] = d["request"].clone();
        o["answer"] = d["answer"].clone();
    }
    o
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(Error::internal(format!("ai task failed: {e}"))))
}

async fn models(State(app): State<App>, Caller(_ctx): Caller) -> Response {
    reply(AiService::of(&app).map(|s| json!({"data": s.models()})))
}

fn may_see(ctx: &RequestContext, row: &Json) -> bool {
    ctx.is_admin() || (ctx.user_id.is_some() && row["user_id"].as_str() == ctx.user_id.as_deref())
}

async fn one(State(app): State<App>, Path(id): Path<String>, Caller(ctx): Caller) -> Response {
    let r = async {
        let svc = AiService::of(&app)?;
        let row = blocking(move || find(svc.posterity(), &id).map(|r| (r, id))).await?;
        match row {
            (Some(row), _) if may_see(&ctx, &row) => Ok(json!({"data": shape(&row, true)})),
            (_, id) => Err(Error::new(ErrorCode::NotFound, format!("no generation '{}' visible to this caller", super::provider::clip(&id, 100)))),
        }
    }
    .await;
    reply(r)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    function: Option<String>,
    user: Option<String>,
    model: Option<String>,
    since: Option<String>,
    until: Option<String>,
    trace_id: Option<String>,
    limit: Option<u32>,
    group_by: Option<String>,
}

/// An instant from RFC 3339 or `YYYY-MM-DD` (UTC), as DuckDB timestamp text.
fn instant(what: &str, s: &str) -> Result<String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc).format("%Y-%m-%d %H:%M:%S%.6f").to_string());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(format!("{d} 00:00:00"));
    }
    Err(Error::new(ErrorCode::BadArguments, format!("{what} must be an RFC 3339 time or a YYYY-MM-DD date, got '{}'", super::provider::clip(s, 64))))
}

/// `AND ...` filters of a query and their parameters.
fn filters(q: &ListQuery, ctx: &RequestContext) -> Result<(String, Map<String, Json>)> {
    let mut sql = String::new();
    let mut p = Map::new();
    let user = if ctx.is_admin() {
        q.user.clone()
    } else {
        match &ctx.user_id {
            Some(u) if q.user.as_deref().is_none_or(|x| x == u) => Some(u.clone()),
            Some(_) => return Err(Error::new(ErrorCode::AccessDenied, "only the admin may list other users' generations")),
            None => return Err(Error::new(ErrorCode::AccessDenied, "listing generations needs a signed-in user or the admin")),
        }
    };
    if let Some(u) = user {
        sql.push_str(" AND user_id = {user:String}");
        p.insert("user".into(), json!(u));
    }
    if let Some(f) = &q.function {
        sql.push_str(" AND (detail->>'function') = {function:String}");
        p.insert("function".into(), json!(f));
    }
    if let Some(m) = &q.model {
        sql.push_str(" AND ((detail->>'model') = {model:String} OR name = {model:String})");
        p.insert("model".into(), json!(m));
    }
    if let Some(t) = &q.trace_id {
        sql.push_str(" AND trace_id = {trace_id:String}");
        p.insert("trace_id".into(), json!(t));
    }
    if let Some(s) = &q.since {
        sql.push_str(" AND ts >= CAST({since:String} AS TIMESTAMP)");
        p.insert("since".into(), json!(instant("since", s)?));
    }
    if let Some(s) = &q.until {
        sql.push_str(" AND ts < CAST({until:String} AS TIMESTAMP)");
        p.insert("until".into(), json!(instant("until", s)?));
    }
    Ok((sql, p))
}

async fn list(State(app): State<App>, Query(q): Query<ListQuery>, Caller(ctx): Caller) -> Response {
    let r = async {
        let svc = AiService::of(&app)?;
        let (f, p) = filters(&q, &ctx)?;
        let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
        let rows = blocking(move || {
            svc.posterity().flush();
            query(svc.posterity(), &format!("{ROW}{f} ORDER BY ts DESC LIMIT {limit}"), &p, limit as u64)
        })
        .await?;
        Ok(json!({"data": rows.iter().map(|r| shape(r, false)).collect::<Vec<_>>()}))
    }
    .await;
    reply(r)
}

async fn usage(State(app): State<App>, Query(q): Query<ListQuery>, Admin(ctx): Admin) -> Response {
    let r = async {
        let svc = AiService::of(&app)?;
        let group = q.group_by.clone().unwrap_or_else(|| "model".into());
        let key = match group.as_str() {
            "model" => "coalesce(detail->>'model', name)",
            "function" => "detail->>'function'",
            "user" => "user_id",
            "day" => "CAST(CAST(ts AS DATE) AS VARCHAR)",
            other => {
                return Err(Error::new(
                    ErrorCode::BadArguments,
                    format!("group_by must be model, function, user or day, got '{}'", super::provider::clip(other, 32)),
                ));
            }
        };
        let (f, p) = filters(&q, &ctx)?;
        let sql = format!(
            "WITH g AS (
               SELECT {key} AS k, detail->>'id' AS id, outcome, elapsed_ms,
                      coalesce(CAST(detail->>'tokens_prompt' AS BIGINT), CAST(detail->>'input_tokens' AS BIGINT), 0) AS tin,
                      coalesce(CAST(detail->>'tokens_completion' AS BIGINT), CAST(detail->>'output_tokens' AS BIGINT), 0) AS tout,
                      coalesce(CAST(detail->>'native_tokens_cached' AS BIGINT), 0) AS tcached,
                      coalesce(CAST(detail->>'total_cost' AS DOUBLE), 0) AS cost,
                      coalesce(CAST(detail->>'cache_hit' AS BOOLEAN), false) AS hit
               FROM log_all WHERE kind = 'ai'{f}),
             r AS (
               SELECT name AS id, avg(CAST(detail->>'score' AS DOUBLE)) AS score
               FROM log_all WHERE kind = 'ai_feedback' GROUP BY name)
             SELECT k AS \"group\", count(*) AS generations,
                    count(*) FILTER (WHERE outcome = 'error') AS errors,
                    count(*) FILTER (WHERE outcome = 'cancelled') AS cancelled,
                    count(*) FILTER (WHERE hit) AS cache_hits,
                    sum(tin) AS tokens_prompt, sum(tout) AS tokens_completion, sum(tcached) AS native_tokens_cached,
                    sum(cost) AS total_cost, avg(elapsed_ms) AS avg_latency_ms,
                    quantile_cont(elapsed_ms, 0.5) AS p50_latency_ms,
                    count(r.score) AS rated, avg(r.score) AS avg_score
             FROM g LEFT JOIN r USING (id) GROUP BY k ORDER BY k NULLS LAST"
        );
        let rows = blocking(move || {
            svc.posterity().flush();
            let rows = query(svc.posterity(), &sql, &p, 100_000)?;
            Ok((rows, svc.budgets()))
        })
        .await?;
        Ok(json!({"group_by": group, "data": rows.0, "budgets": rows.1}))
    }
    .await;
    reply(r)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Feedback {
    score: f64,
    #[serde(default)]
    note: Option<String>,
}

async fn feedback(State(app): State<App>, Path(id): Path<String>, Caller(ctx): Caller, JsonBody(b): JsonBody<Feedback>) -> Response {
    let r = async {
        let svc = AiService::of(&app)?;
        blocking(move || svc.rate(&ctx, &id, b.score, b.note)).await
    }
    .await;
    reply(r)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    #[serde(default)]
    model: Option<String>,
}

/// Send a logged generation's request again (to its model or `model`): a new generation.
pub async fn replay_generation(svc: &std::sync::Arc<AiService>, ctx: &RequestContext, id: &str, model: Option<&str>) -> Result<Json> {
    let (svc2, id2) = (std::sync::Arc::clone(svc), id.to_string());
    let row = blocking(move || find(svc2.posterity(), &id2))
        .await?
        .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("no generation '{}'", super::provider::clip(id, 100))))?;
    let d: Json = row["detail"].as_str().and_then(|s| serde_json::from_str(s).ok()).unwrap_or(Json::Null);
    let req: ChatRequest = serde_json::from_value(d["request"].clone()).map_err(|_| {
        Error::new(
            ErrorCode::BadArguments,
            format!("generation '{id}' has no replayable request (an embedding, or logged with [ai] log_prompts = false)"),
        )
    })?;
    let name = model.map(str::to_string).or_else(|| d["model_requested"].as_str().map(str::to_string));
    let spec = svc.resolve(name.as_deref())?;
    let mut g = svc.begin(ctx, d["function"].as_str(), "replay", "text", &spec.name);
    g.request = Some(serde_json::to_value(&req).unwrap_or(Json::Null));
    let r = svc.chat(&mut g, &spec, &req).await;
    let out = match &r {
        Ok(rep) => {
            g.finish_reason = Some(rep.finish_reason.clone());
            g.answer = Some(json!({"text": rep.text, "tool_calls": rep.tool_calls}));
            Ok(json!({
                "id": g.id, "replay_of": id, "model": g.model_used, "text": rep.text, "tool_calls": rep.tool_calls,
                "finish_reason": rep.finish_reason,
                "usage": {"input": g.usage.input, "output": g.usage.output, "cached": g.usage.cached},
                "cost": g.cost, "latency_ms": g.started.elapsed().as_secs_f64() * 1e3,
                "original": {"model": d["model"], "text": d["answer"]["text"], "usage": {"input": d["tokens_prompt"], "output": d["tokens_completion"]}, "cost": d["total_cost"]},
            }))
        }
        Err(e) => {
            g.error = Some(e.clone());
            Err(e.clone())
        }
    };
    svc.finish(g);
    out
}

async fn replay(State(app): State<App>, Path(id): Path<String>, Admin(ctx): Admin, BodyBytes(body): BodyBytes) -> Response {
    let r = async {
        let svc = AiService::of(&app)?;
        let b: ReplayBody = if body.iter().all(u8::is_ascii_whitespace) {
            ReplayBody::default()
        } else {
            serde_json::from_slice(&body).map_err(|e| Error::new(ErrorCode::BadArguments, format!("Invalid JSON body: {e}")))?
        };
        replay_generation(&svc, &ctx, &id, b.model.as_deref()).await
    }
    .await;
    reply(r)
}
