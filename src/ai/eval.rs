//! `POST /ai/eval` (admin): run a set of prompts — written out, or recorded generations named
//! by id — against one or more models and check every answer (exact, contains, JSON Schema, a
//! Lua check function run in the sandbox). `ichibase ai eval FILE` posts the file here and
//! prints the table. Every call is a generation in the log (origin `eval`).

use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;
use serde_json::{Value as Json, json};

use super::AiService;
use super::provider::{ChatRequest, Msg};
use crate::app::App;
use crate::core::{Error, ErrorCode, RequestContext, Result};

/// An eval file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalFile {
    /// Models to run every case on (default: the configured default).
    #[serde(default)]
    pub models: Vec<String>,
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    /// A logged generation whose request is replayed.
    #[serde(default)]
    pub generation: Option<String>,
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    /// Ask for JSON valid against this schema.
    #[serde(default)]
    pub schema: Option<Json>,
    #[serde(default)]
    pub checks: Vec<Check>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Check {
    /// The answer, trimmed, is this text.
    Exact(String),
    /// The answer contains this text.
    Contains(String),
    /// The answer is JSON valid against this schema.
    JsonSchema(Json),
    /// Lua source returning `function(input)` (`input.text`, `input.object`): passes when truthy.
    Lua(String),
}

const MAX_RUNS: usize = 1000;

async fn request_of(svc: &Arc<AiService>, c: &Case) -> Result<ChatRequest> {
    if let Some(id) = &c.generation {
        let (svc2, id2) = (Arc::clone(svc), id.clone());
        let row = tokio::task::spawn_blocking(move || super::http::find(svc2.posterity(), &id2))
            .await
            .map_err(|e| Error::internal(e.to_string()))??
            .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("case '{}': no generation '{id}'", c.name)))?;
        let d: Json = row["detail"].as_str().and_then(|s| serde_json::from_str(s).ok()).unwrap_or(Json::Null);
        return serde_json::from_value(d["request"].clone()).map_err(|_| {
            Error::new(ErrorCode::BadArguments, format!("case '{}': generation '{id}' has no logged request", c.name))
        });
    }
    let prompt = c.prompt.clone().ok_or_else(|| {
        Error::new(ErrorCode::BadArguments, format!("case '{}' needs prompt or generation", c.name))
    })?;
    let mut req = ChatRequest { system: c.system.clone(), messages: vec![Msg::user(prompt)], ..Default::default() };
    if let Some(s) = &c.schema {
        super::lua::with_schema(&mut req, s.clone());
    }
    Ok(req)
}

async fn lua_check(app: &App, source: &str, text: &str, object: &Json) -> std::result::Result<(), String> {
    let reserved = app
        .lua_limits()
        .budget
        .reserve(app.lua().memory_limit as u64)
        .await
        .map_err(|e| e.message)?;
    let runtime = crate::lua::Runtime::of_app(app, tokio::runtime::Handle::current());
    let inv = crate::lua::Invocation {
        function: "ai_eval_check".into(),
        source: source.to_string(),
        input: json!({"text": text, "object": object}),
        ..Default::default()
    };
    let out = tokio::task::spawn_blocking(move || {
        let o = crate::lua::invoke(&runtime, RequestContext::system(), inv);
        drop(reserved);
        o.result
    })
    .await
    .map_err(|e| e.to_string())?;
    match out {
        Ok(Json::Null) | Ok(Json::Bool(false)) => Err("the Lua check returned false".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("the Lua check failed: {}", e.message)),
    }
}

/// Run the file; every answer checked. Returns per-run results and a per-model summary.
pub async fn run(app: &App, ctx: &RequestContext, f: EvalFile) -> Result<Json> {
    let svc = AiService::of(app)?;
    let models: Vec<Arc<super::ModelSpec>> = if f.models.is_empty() {
        vec![svc.resolve(None)?]
    } else {
        f.models.iter().map(|m| svc.resolve(Some(m))).collect::<Result<_>>()?
    };
    if f.cases.is_empty() || f.cases.len() * models.len() > MAX_RUNS {
        return Err(Error::new(ErrorCode::BadArguments, format!("an eval runs 1 to {MAX_RUNS} cases × models")));
    }
    let mut reqs = Vec::new();
    for c in &f.cases {
        for ch in &c.checks {
            if let Check::JsonSchema(s) = ch {
                jsonschema::validator_for(s).map_err(|e| {
                    Error::new(ErrorCode::BadArguments, format!("case '{}': json_schema is not a valid schema: {e}", c.name))
                })?;
            }
            if let Check::Lua(src) = ch {
                crate::lua::compile_check("ai_eval_check", src).map_err(|(e, _)| {
                    Error::new(ErrorCode::BadArguments, format!("case '{}': lua check: {}", c.name, e.message))
                })?;
            }
        }
        reqs.push(request_of(&svc, c).await?);
    }
    let mut results = Vec::new();
    for m in &models {
        for (c, req) in f.cases.iter().zip(&reqs) {
            let mut g = svc.begin(ctx, None, "eval", "text", &m.name);
            g.request = Some(serde_json::to_value(req).unwrap_or(Json::Null));
            let t = Instant::now();
            let r = svc.chat(&mut g, m, req).await;
            let latency = t.elapsed().as_secs_f64() * 1e3;
            let (text, error) = match &r {
                Ok(rep) => {
                    g.finish_reason = Some(rep.finish_reason.clone());
                    g.answer = Some(json!({"text": rep.text}));
                    (rep.text.clone(), None)
                }
                Err(e) => {
                    g.error = Some(e.clone());
                    (String::new(), Some(e.message.clone()))
                }
            };
            let (id, cost) = (g.id.clone(), g.cost);
            svc.finish(g);
            let mut failures = Vec::new();
            if let Some(e) = &error {
                failures.push(format!("call failed: {e}"));
            } else {
                let object = super::lua::extract_json(&text).unwrap_or(Json::Null);
                for ch in &c.checks {
                    let verdict = match ch {
                        Check::Exact(x) => (text.trim() == x.trim()).then_some(()).ok_or_else(|| format!("not exactly {x:?}")),
                        Check::Contains(x) => text.contains(x.as_str()).then_some(()).ok_or_else(|| format!("does not contain {x:?}")),
                        Check::JsonSchema(s) => match (super::lua::extract_json(&text), jsonschema::validator_for(s)) {
                            (Ok(v), Ok(val)) => {
                                let errs = super::lua::schema_errors(&val, &v);
                                if errs.is_empty() { Ok(()) } else { Err(format!("schema: {}", errs.join("; "))) }
                            }
                            (Err(e), _) => Err(e),
                            (_, Err(e)) => Err(e.to_string()),
                        },
                        Check::Lua(src) => lua_check(app, src, &text, &object).await,
                    };
                    if let Err(why) = verdict {
                        failures.push(why);
                    }
                }
            }
            results.push(json!({
                "case": c.name, "model": m.name, "id": id, "passed": failures.is_empty(),
                "failures": failures, "text": super::provider::clip(&text, 500), "cost": cost, "latency_ms": latency,
            }));
        }
    }
    let summary: Vec<Json> = models
        .iter()
        .map(|m| {
            let rs: Vec<&Json> = results.iter().filter(|r| r["model"] == m.name.as_str()).collect();
            let passed = rs.iter().filter(|r| r["passed"] == true).count();
            let mut lat: Vec<f64> = rs.iter().filter_map(|r| r["latency_ms"].as_f64()).collect();
            lat.sort_by(f64::total_cmp);
            let p50 = lat.get(lat.len() / 2).copied().unwrap_or(0.0);
            json!({
                "model": m.name, "cases": rs.len(), "passed": passed,
                "pass_rate": if rs.is_empty() { 0.0 } else { passed as f64 / rs.len() as f64 },
                "cost": rs.iter().filter_map(|r| r["cost"].as_f64()).sum::<f64>(),
                "p50_latency_ms": p50,
            })
        })
        .collect();
    Ok(json!({"results": results, "summary": summary}))
}
