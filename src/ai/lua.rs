//! The Lua component `ai`: model calls from app code, as the caller.
//!
//! - `ai.generate_text{model=, system=, prompt= | messages=, temperature=, max_tokens=, tools=,
//!   max_steps=, cache=}` → `{text, finish_reason, usage = {input, output, cached}, cost, id,
//!   model, steps}`. `tools = {name = {description=, parameters = <JSON Schema>, execute =
//!   function(args) ... end}}`: the model's calls run here, arguments validated first.
//! - `ai.generate_object{schema=, ...}` → `object, info` (`info` as generate_text's result).
//! - `ai.stream_text{..., on_chunk = function(delta) end, channel = "name"}` → as generate_text.
//! - `ai.embed(texts, {model=})` → vectors (one per text; one vector for one string), `info`.
//! - `ai.rate(id, score, note?)` → the stored rating.
//!
//! Every call is one generation in the log, with the invocation's user, function and trace id.
//! Waiting for a model runs no Lua (no instruction is counted) and stops at the invocation's
//! deadline (`wait`). Must not reach providers except through `AiService`.

use std::rc::Rc;
use std::sync::Arc;

use futures_util::StreamExt;
use mlua::{Function, Lua, LuaSerdeExt, Table, Value};
use serde_json::{Value as Json, json};

use super::provider::{ChatRequest, Msg, Reply, ToolSpec, Usage};
use super::{AiService, Generation, ModelSpec};
use crate::core::{Error, ErrorCode};
use crate::lua::components::{Component, lua_err};
use crate::lua::sandbox::Limit;
use crate::lua::{Env, to_json};

pub struct AiLua;

fn bad(msg: impl Into<String>) -> mlua::Error {
    lua_err(Error::new(ErrorCode::BadArguments, msg))
}

fn service(env: &Env) -> mlua::Result<Arc<AiService>> {
    let app = env.app.as_ref().ok_or_else(|| {
        lua_err(Error::new(ErrorCode::NotImplemented, "ai: no model service in this context"))
    })?;
    AiService::of(app).map_err(lua_err)
}

/// Wait for `fut` on this (blocking) thread, at most until the invocation's deadline. Past it
/// the time limit trips (the invocation ends with `TIMEOUT_EXCEEDED`) and `fut` is dropped,
/// which closes its connection to the provider.
fn wait<T>(env: &Env, fut: impl std::future::Future<Output = T>) -> Result<T, Error> {
    match env.control.deadline {
        None => Ok(env.rt.block_on(fut)),
        Some(d) => env
            .rt
            .block_on(async { tokio::time::timeout_at(tokio::time::Instant::from_std(d), fut).await })
            .map_err(|_| {
                env.meter.tripped.set(Some(Limit::Time));
                Error::new(
                    ErrorCode::TimeoutExceeded,
                    format!("the model call ran past the invocation's time limit ({} s)", env.options.timeout.as_secs_f64()),
                )
            }),
    }
}

/// A tool offered from Lua.
struct Tool {
    spec: ToolSpec,
    validator: jsonschema::Validator,
    execute: Function,
}

/// A call's arguments, checked.
struct Args {
    model: Option<String>,
    req: ChatRequest,
    tools: Vec<Tool>,
    max_steps: u32,
    cache: Option<bool>,
    schema: Option<Json>,
    on_chunk: Option<Function>,
    channel: Option<String>,
}

fn schema_validator(what: &str, schema: &Json) -> mlua::Result<jsonschema::Validator> {
    if !schema.is_object() && !schema.is_boolean() {
        return Err(bad(format!("{what} must be a JSON Schema (a table)")));
    }
    jsonschema::validator_for(schema).map_err(|e| bad(format!("{what} is not a valid JSON Schema: {e}")))
}

/// The errors of `v` against `validator`, one line each (at most 10).
pub(crate) fn schema_errors(validator: &jsonschema::Validator, v: &Json) -> Vec<String> {
    validator
        .iter_errors(v)
        .take(10)
        .map(|e| {
            let at = e.instance_path().to_string();
            if at.is_empty() { e.to_string() } else { format!("at {at}: {e}") }
        })
        .collect()
}

const KEYS: &[&str] = &[
    "model", "system", "prompt", "messages", "temperature", "max_tokens", "tools", "max_steps", "cache", "schema",
    "on_chunk", "channel",
];

fn parse_args(svc: &AiService, opts: &Table, what: &str, allowed: &[&str]) -> mlua::Result<Args> {
    for pair in opts.pairs::<Value, Value>() {
        let (k, _) = pair?;
        let name = match &k {
            Value::String(s) => s.to_string_lossy(),
            other => return Err(bad(format!("{what}: option keys are names, got a {}", other.type_name()))),
        };
        if !KEYS.contains(&name.as_str()) || !allowed.contains(&name.as_str()) {
            return Err(bad(format!(
                "{what}: unknown option '{}' (options: {})",
                super::provider::clip(&name, 40),
                allowed.join(", ")
            )));
        }
    }
    let s = &svc.settings;
    let opt_string = |k: &str| -> mlua::Result<Option<String>> {
        match opts.get::<Value>(k)? {
            Value::Nil => Ok(None),
            Value::String(v) => Ok(Some(v.to_str().map_err(|_| bad(format!("{what}: {k} must be UTF-8 text")))?.to_string())),
            other => Err(bad(format!("{what}: {k} must be a string, got a {}", other.type_name()))),
        }
    };
    let model = opt_string("model")?;
    let system = opt_string("system")?;
    let prompt = opt_string("prompt")?;
    let mut messages: Vec<Msg> = Vec::new();
    match opts.get::<Value>("messages")? {
        Value::Nil => {}
        Value::Table(t) => {
            let j = to_json(&Value::Table(t)).map_err(|e| bad(format!("{what}: messages: {e}")))?;
            let arr = j.as_array().ok_or_else(|| bad(format!("{what}: messages must be an array of {{role=, content=}}")))?;
            for (i, m) in arr.iter().enumerate() {
                let role = m.get("role").and_then(Json::as_str).unwrap_or("");
                let content = m.get("content").and_then(Json::as_str);
                match (role, content) {
                    ("user" | "assistant", Some(c)) => messages.push(Msg {
                        role: role.to_string(),
                        content: c.to_string(),
                        tool_calls: Vec::new(),
                        tool_call_id: None,
                    }),
                    _ => {
                        return Err(bad(format!(
                            "{what}: messages[{}] needs role = 'user' or 'assistant' and content = a string",
                            i + 1
                        )));
                    }
                }
            }
        }
        other => return Err(bad(format!("{what}: messages must be a table, got a {}", other.type_name()))),
    }
    match (prompt, messages.is_empty()) {
        (Some(p), true) => messages.push(Msg::user(p)),
        (Some(_), false) => return Err(bad(format!("{what}: give prompt or messages, not both"))),
        (None, true) => return Err(bad(format!("{what}: prompt (a string) or messages (an array) is required"))),
        (None, false) => {}
    }
    let temperature = match opts.get::<Value>("temperature")? {
        Value::Nil => None,
        Value::Integer(i) => Some(i as f64),
        Value::Number(n) => Some(n),
        other => return Err(bad(format!("{what}: temperature must be a number, got a {}", other.type_name()))),
    };
    if temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return Err(bad(format!("{what}: temperature must be between 0 and 2")));
    }
    let int = |k: &str, lo: i64, hi: i64| -> mlua::Result<Option<i64>> {
        match opts.get::<Value>(k)? {
            Value::Nil => Ok(None),
            Value::Integer(i) if (lo..=hi).contains(&i) => Ok(Some(i)),
            Value::Number(n) if n.fract() == 0.0 && n >= lo as f64 && n <= hi as f64 => Ok(Some(n as i64)),
            _ => Err(bad(format!("{what}: {k} must be a whole number from {lo} to {hi}"))),
        }
    };
    let max_tokens = int("max_tokens", 1, 1_000_000)?.map(|v| v as u32);
    let max_steps = int("max_steps", 1, i64::from(s.max_steps_limit))?.map(|v| v as u32).unwrap_or(s.max_steps);
    let cache = match opts.get::<Value>("cache")? {
        Value::Nil => None,
        Value::Boolean(b) => Some(b),
        _ => return Err(bad(format!("{what}: cache must be true or false"))),
    };
    let mut tools = Vec::new();
    match opts.get::<Value>("tools")? {
        Value::Nil => {}
        Value::Table(t) => {
            for pair in t.pairs::<Value, Value>() {
                let (k, v) = pair?;
                let name = match &k {
                    Value::String(s) => s.to_string_lossy(),
                    _ => return Err(bad(format!("{what}: tools is a table of name = {{description=, parameters=, execute=}}"))),
                };
                if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                    return Err(bad(format!("{what}: tool names are 1-64 letters, digits, _ or -, got '{}'", super::provider::clip(&name, 64))));
                }
                let Value::Table(def) = v else {
                    return Err(bad(format!("{what}: tools.{name} must be a table {{description=, parameters=, execute=}}")));
                };
                let description: Option<String> = def.get("description").map_err(|_| bad(format!("{what}: tools.{name}.description must be a string")))?;
                let execute: Function = def.get("execute").map_err(|_| bad(format!("{what}: tools.{name}.execute must be a function")))?;
                let params = match def.get::<Value>("parameters")? {
                    Value::Nil => json!({"type": "object", "properties": {}}),
                    v => to_json(&v).map_err(|e| bad(format!("{what}: tools.{name}.parameters: {e}")))?,
                };
                let validator = schema_validator(&format!("{what}: tools.{name}.parameters"), &params)?;
                tools.push(Tool {
                    spec: ToolSpec { name, description: description.unwrap_or_default(), parameters: params },
                    validator,
                    execute,
                });
            }
            tools.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        }
        other => return Err(bad(format!("{what}: tools must be a table, got a {}", other.type_name()))),
    }
    let schema = match opts.get::<Value>("schema")? {
        Value::Nil => None,
        v => Some(to_json(&v).map_err(|e| bad(format!("{what}: schema: {e}")))?),
    };
    let on_chunk = match opts.get::<Value>("on_chunk")? {
        Value::Nil => None,
        Value::Function(f) => Some(f),
        other => return Err(bad(format!("{what}: on_chunk must be a function, got a {}", other.type_name()))),
    };
    let channel = opt_string("channel")?;
    let req = ChatRequest {
        system,
        messages,
        temperature,
        max_tokens,
        tools: tools.iter().map(|t| t.spec.clone()).collect(),
        schema: None,
    };
    let size = serde_json::to_vec(&req).map(|v| v.len()).unwrap_or(usize::MAX)
        + schema.as_ref().map_or(0, |s| s.to_string().len());
    if size > s.max_prompt_bytes {
        return Err(bad(format!(
            "{what}: the request is {size} bytes, over [ai] max_prompt_bytes ({})",
            s.max_prompt_bytes
        )));
    }
    Ok(Args { model, req, tools, max_steps, cache, schema, on_chunk, channel })
}

fn usage_table(lua: &Lua, u: Usage) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("input", u.input)?;
    t.set("output", u.output)?;
    t.set("cached", u.cached)?;
    Ok(t)
}

fn to_lua(lua: &Lua, v: &Json) -> mlua::Result<Value> {
    lua.to_value_with(v, mlua::SerializeOptions::new().serialize_none_to_null(false).serialize_unit_to_null(false))
}

/// The result table every call shape returns (the `info` of generate_object and embed).
fn info(lua: &Lua, g: &Generation, text: Option<&str>, steps: &[Json]) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    if let Some(x) = text {
        t.set("text", x)?;
    }
    t.set("finish_reason", g.finish_reason.clone())?;
    t.set("usage", usage_table(lua, g.usage)?)?;
    t.set("cost", g.cost)?;
    t.set("id", g.id.clone())?;
    t.set("model", g.model_used.clone())?;
    t.set("cache_hit", g.cache_hit)?;
    t.set("steps", to_lua(lua, &Json::Array(steps.to_vec()))?)?;
    Ok(t)
}

/// Log the generation, and note it in the invocation's logs (kept with its trace): the Lua line
/// that made the call links to its generation.
fn done(lua: &Lua, env: &Env, svc: &AiService, g: Generation) {
    // The nearest Lua frame (below the host function and its guard wrapper).
    let line = (1..6).find_map(|l| lua.inspect_stack(l, |d| d.current_line()).flatten());
    let mut logs = env.logs.borrow_mut();
    if logs.len() < 1000 {
        logs.push(json!({"level": "info", "message": format!("ai.{} → {}", g.call, g.id),
            "fields": {"generation": g.id, "model": g.model_used, "line": line, "error": g.error.as_ref().map(|e| e.code.name())}}));
    }
    drop(logs);
    svc.finish(g);
}

/// End the generation with `e`: log it, and raise it in Lua.
fn fail(lua: &Lua, env: &Env, svc: &AiService, mut g: Generation, e: Error) -> mlua::Error {
    if e.code == ErrorCode::TimeoutExceeded {
        // The invocation's deadline ended the wait: the provider's request was dropped.
        g.cancelled = true;
    }
    g.error = Some(e.clone());
    done(lua, env, svc, g);
    lua_err(e)
}

fn begin(svc: &AiService, env: &Env, call: &'static str, model: &Arc<ModelSpec>) -> Generation {
    svc.begin(&env.ctx, Some(&env.function), "lua", call, &model.name)
}

/// Budget check and cache look-up before a call. `Ok(Some(hit))`: answered from the cache.
fn preflight(svc: &AiService, env: &Env, g: &mut Generation, model: &ModelSpec, key: Option<&str>) -> Result<Option<Json>, Error> {
    svc.check_budget(env.ctx.user_id.as_deref(), Some(&env.function), (0.0, 0))?;
    if let Some(k) = key {
        if let Some(hit) = svc.cache_get(k) {
            g.cache_hit = true;
            g.model_used = Some(model.name.clone());
            g.provider = Some(model.settings.provider.as_str());
            g.provider_name = Some(model.provider_name());
            g.usage = serde_json::from_value(hit["usage"].clone()).unwrap_or_default();
            g.cost = 0.0;
            g.finish_reason = hit["finish_reason"].as_str().map(str::to_string);
            g.first_token = Some(g.started.elapsed());
            g.steps = 1;
            g.answer = Some(hit["answer"].clone());
            return Ok(Some(hit));
        }
    }
    Ok(None)
}

fn cached_value(r: &Reply, answer: &Json) -> Json {
    json!({"usage": r.usage, "finish_reason": r.finish_reason, "answer": answer, "text": r.text})
}

fn wants_cache(svc: &AiService, a: &Args) -> bool {
    a.cache.unwrap_or(svc.settings.cache) && a.tools.is_empty()
}

/// Run one tool call: validate, execute in the sandbox, the result as text for the model.
fn run_tool(lua: &Lua, tools: &[Tool], call: &super::provider::ToolCall) -> mlua::Result<(String, Json)> {
    let Some(tool) = tools.iter().find(|t| t.spec.name == call.name) else {
        let r = json!({"error": format!("unknown tool '{}'", super::provider::clip(&call.name, 64))});
        return Ok((r.to_string(), r));
    };
    let errs = schema_errors(&tool.validator, &call.arguments);
    if !errs.is_empty() {
        let r = json!({"error": format!("invalid arguments for {}: {}", tool.spec.name, errs.join("; "))});
        return Ok((r.to_string(), r));
    }
    let args = to_lua(lua, &call.arguments)?;
    let out: Value = tool.execute.call(args)?;
    let j = to_json(&out).map_err(|e| mlua::Error::runtime(format!("ai: tool {} returned a value that is not JSON: {e}", tool.spec.name)))?;
    let text = match &j {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    };
    Ok((text, j))
}

fn generate_text(lua: &Lua, env: &Env, opts: Table) -> mlua::Result<Table> {
    let svc = service(env)?;
    let a = parse_args(&svc, &opts, "ai.generate_text", &["model", "system", "prompt", "messages", "temperature", "max_tokens", "tools", "max_steps", "cache"])?;
    let model = svc.resolve(a.model.as_deref()).map_err(lua_err)?;
    let mut g = begin(&svc, env, "text", &model);
    g.request = Some(serde_json::to_value(&a.req).unwrap_or(Json::Null));
    let key = wants_cache(&svc, &a).then(|| svc.cache_key(&model.name, "text", &a.req));
    match preflight(&svc, env, &mut g, &model, key.as_deref()) {
        Err(e) => return Err(fail(lua, env, &svc, g, e)),
        Ok(Some(hit)) => {
            let text = hit["text"].as_str().unwrap_or("").to_string();
            let t = info(lua, &g, Some(&text), &[])?;
            done(lua, env, &svc, g);
            return Ok(t);
        }
        Ok(None) => {}
    }
    let mut req = a.req.clone();
    let mut steps: Vec<Json> = Vec::new();
    let last = loop {
        let r = match wait(env, svc.chat(&mut g, &model, &req)).and_then(|r| r) {
            Ok(r) => r,
            Err(e) => return Err(fail(lua, env, &svc, g, e)),
        };
        let mut step = json!({"text": r.text, "finish_reason": r.finish_reason, "usage": r.usage, "tool_calls": r.tool_calls});
        if r.tool_calls.is_empty() || a.tools.is_empty() || steps.len() + 1 >= a.max_steps as usize {
            steps.push(step);
            break r;
        }
        req.messages.push(Msg::assistant(r.text.clone(), r.tool_calls.clone()));
        let mut results = Vec::new();
        for call in &r.tool_calls {
            let (text, value) = match run_tool(lua, &a.tools, call) {
                Ok(v) => v,
                Err(e) => {
                    let msg = e.to_string();
                    g.error = Some(Error::new(ErrorCode::LuaError, format!("tool {} failed: {}", call.name, super::provider::clip(&msg, 500))));
                    done(lua, env, &svc, g);
                    return Err(e);
                }
            };
            results.push(json!({"id": call.id, "name": call.name, "result": value}));
            req.messages.push(Msg::tool(&call.id, text));
        }
        step["tool_results"] = Json::Array(results);
        steps.push(step);
        // Budgets hold between steps too.
        if let Err(e) = svc.check_budget(env.ctx.user_id.as_deref(), Some(&env.function), (g.cost, g.usage.total())) {
            return Err(fail(lua, env, &svc, g, e));
        }
    };
    g.finish_reason = Some(last.finish_reason.clone());
    let answer = json!({"text": last.text, "tool_calls": last.tool_calls});
    g.answer = Some(answer.clone());
    if let Some(k) = key {
        svc.cache_put(k, cached_value(&last, &answer));
    }
    let t = info(lua, &g, Some(&last.text), &steps)?;
    done(lua, env, &svc, g);
    Ok(t)
}

/// Ask for JSON valid against `schema`: the provider's JSON mode, and the schema in the system
/// prompt (for providers without one).
pub(crate) fn with_schema(req: &mut ChatRequest, schema: Json) {
    let instruction = format!(
        "Answer with only one JSON value (no prose, no code fence) that is valid against this JSON Schema:\n{}",
        serde_json::to_string(&schema).unwrap_or_default()
    );
    req.system = Some(match req.system.take() {
        Some(s) => format!("{s}\n\n{instruction}"),
        None => instruction,
    });
    req.schema = Some(schema);
}

/// The JSON in a model's answer: the whole text, or a fenced block, or the outermost braces.
pub(crate) fn extract_json(text: &str) -> Result<Json, String> {
    let t = text.trim();
    if let Ok(v) = serde_json::from_str(t) {
        return Ok(v);
    }
    if let Some(start) = t.find("```") {
        let rest = &t[start + 3..];
        let rest = rest.split_once('\n').map_or(rest, |(_, r)| r);
        if let Some(end) = rest.find("```") {
            if let Ok(v) = serde_json::from_str(rest[..end].trim()) {
                return Ok(v);
            }
        }
    }
    for (open, close) in [('{', '}'), ('[', ']')] {
        if let (Some(a), Some(b)) = (t.find(open), t.rfind(close)) {
            if a < b {
                if let Ok(v) = serde_json::from_str(&t[a..=b]) {
                    return Ok(v);
                }
            }
        }
    }
    Err("the answer is not JSON".into())
}

fn generate_object(lua: &Lua, env: &Env, opts: Table) -> mlua::Result<(Value, Table)> {
    let svc = service(env)?;
    let a = parse_args(&svc, &opts, "ai.generate_object", &["model", "system", "prompt", "messages", "temperature", "max_tokens", "schema", "cache"])?;
    let schema = a.schema.clone().ok_or_else(|| bad("ai.generate_object: schema (a JSON Schema table) is required"))?;
    let validator = schema_validator("ai.generate_object: schema", &schema)?;
    let model = svc.resolve(a.model.as_deref()).map_err(lua_err)?;
    let mut g = begin(&svc, env, "object", &model);
    let mut req = a.req.clone();
    with_schema(&mut req, schema);
    g.request = Some(serde_json::to_value(&req).unwrap_or(Json::Null));
    let key = wants_cache(&svc, &a).then(|| svc.cache_key(&model.name, "object", &req));
    match preflight(&svc, env, &mut g, &model, key.as_deref()) {
        Err(e) => return Err(fail(lua, env, &svc, g, e)),
        Ok(Some(hit)) => {
            let obj = to_lua(lua, &hit["answer"]["object"])?;
            let t = info(lua, &g, None, &[])?;
            done(lua, env, &svc, g);
            return Ok((obj, t));
        }
        Ok(None) => {}
    }
    let tries = svc.settings.object_retries + 1;
    let mut steps = Vec::new();
    let mut last_text = String::new();
    let mut last_errors = Vec::new();
    for attempt in 1..=tries {
        let r = match wait(env, svc.chat(&mut g, &model, &req)).and_then(|r| r) {
            Ok(r) => r,
            Err(e) => return Err(fail(lua, env, &svc, g, e)),
        };
        let verdict = extract_json(&r.text).map_err(|e| vec![e]).and_then(|v| {
            let errs = schema_errors(&validator, &v);
            if errs.is_empty() { Ok(v) } else { Err(errs) }
        });
        steps.push(json!({"text": r.text, "finish_reason": r.finish_reason, "usage": r.usage,
                          "valid": verdict.is_ok(), "errors": verdict.as_ref().err()}));
        match verdict {
            Ok(obj) => {
                g.finish_reason = Some(r.finish_reason.clone());
                let answer = json!({"object": obj, "text": r.text});
                g.answer = Some(answer.clone());
                if let Some(k) = key {
                    svc.cache_put(k, cached_value(&r, &answer));
                }
                let lv = to_lua(lua, &obj)?;
                let t = info(lua, &g, Some(&r.text), &steps)?;
                done(lua, env, &svc, g);
                return Ok((lv, t));
            }
            Err(errs) => {
                last_text = r.text.clone();
                last_errors = errs.clone();
                g.finish_reason = Some(r.finish_reason.clone());
                if attempt < tries {
                    req.messages.push(Msg::assistant(r.text, Vec::new()));
                    req.messages.push(Msg::user(format!(
                        "That answer is not valid against the schema:\n- {}\nAnswer again with only the corrected JSON.",
                        errs.join("\n- ")
                    )));
                    if let Err(e) = svc.check_budget(env.ctx.user_id.as_deref(), Some(&env.function), (g.cost, g.usage.total())) {
                        return Err(fail(lua, env, &svc, g, e));
                    }
                }
            }
        }
    }
    g.answer = Some(json!({"text": last_text}));
    let e = Error::new(
        ErrorCode::AiObjectInvalid,
        format!(
            "the model's answer did not match the schema after {tries} attempt(s) (generation {}): {}; last output: {}",
            g.id,
            last_errors.join("; "),
            super::provider::clip(&last_text, 2000)
        ),
    );
    Err(fail(lua, env, &svc, g, e))
}

/// Rough token count of streamed text not yet reported by the provider.
fn estimate_tokens(chars: usize) -> u64 {
    (chars as u64).div_ceil(4)
}

fn stream_text(lua: &Lua, env: &Env, opts: Table) -> mlua::Result<Table> {
    let svc = service(env)?;
    let a = parse_args(&svc, &opts, "ai.stream_text", &["model", "system", "prompt", "messages", "temperature", "max_tokens", "cache", "on_chunk", "channel"])?;
    let model = svc.resolve(a.model.as_deref()).map_err(lua_err)?;
    let mut g = begin(&svc, env, "stream", &model);
    g.streamed = true;
    g.request = Some(serde_json::to_value(&a.req).unwrap_or(Json::Null));
    let hub = env.app.as_ref().map(|app| Arc::clone(app.hub()));
    let publish = |msg: Json| -> Result<usize, Error> {
        match (&a.channel, &hub) {
            (Some(ch), Some(h)) => h.broadcast(&env.ctx, ch, msg),
            _ => Ok(0),
        }
    };
    // The channel's join rules are checked before anything is spent.
    if let Err(e) = publish(json!({"type": "ai", "event": "start", "generation": g.id})) {
        return Err(fail(lua, env, &svc, g, e));
    }
    let key = wants_cache(&svc, &a).then(|| svc.cache_key(&model.name, "text", &a.req));
    match preflight(&svc, env, &mut g, &model, key.as_deref()) {
        Err(e) => return Err(fail(lua, env, &svc, g, e)),
        Ok(Some(hit)) => {
            let text = hit["text"].as_str().unwrap_or("").to_string();
            if let Some(f) = &a.on_chunk {
                if let Err(e) = f.call::<()>(text.clone()) {
                    g.cancelled = true;
                    done(lua, env, &svc, g);
                    return Err(e);
                }
            }
            let _ = publish(json!({"type": "ai", "event": "delta", "generation": g.id, "delta": text}));
            let _ = publish(json!({"type": "ai", "event": "finish", "generation": g.id, "finish_reason": g.finish_reason, "cache_hit": true}));
            let t = info(lua, &g, Some(&text), &[])?;
            done(lua, env, &svc, g);
            return Ok(t);
        }
        Ok(None) => {}
    }
    let (spec, mut events) = match wait(env, svc.open_stream(&mut g, &model, &a.req)).and_then(|r| r) {
        Ok(v) => v,
        Err(e) => return Err(fail(lua, env, &svc, g, e)),
    };
    let provider = spec.settings.provider;
    let prompt_chars = a.req.system.as_ref().map_or(0, |s| s.chars().count())
        + a.req.messages.iter().map(|m| m.content.chars().count()).sum::<usize>();
    let mut acc = super::provider::StreamAcc::default();
    let mut out_chars = 0usize;
    let mut stop: Option<Result<&'static str, Error>> = None;
    loop {
        let next = match wait(env, events.next()) {
            Ok(n) => n,
            Err(e) => {
                stop = Some(Err(e));
                break;
            }
        };
        let ev = match next {
            None => break,
            Some(Ok(ev)) => ev,
            Some(Err(e)) => {
                stop = Some(Err(Error::new(ErrorCode::LlmUnavailable, format!("the stream from model '{}' broke: {e}", spec.name))));
                break;
            }
        };
        let delta = match acc.feed(provider, &ev) {
            Ok(d) => d,
            Err(e) => {
                stop = Some(Err(Error::new(ErrorCode::LlmUnavailable, format!("model '{}': {e}", spec.name))));
                break;
            }
        };
        if let Some(d) = delta {
            if g.first_token.is_none() {
                g.first_token = Some(g.started.elapsed());
            }
            out_chars += d.chars().count();
            if let Some(f) = &a.on_chunk {
                if let Err(e) = f.call::<()>(d.clone()) {
                    // The Lua callback failed (or a limit fired in it): the stream is cancelled.
                    drop(events);
                    let r = acc.finish();
                    g.cancelled = true;
                    g.finish_reason = Some("cancelled".into());
                    g.answer = Some(json!({"text": r.text}));
                    g.usage = billed(&r, prompt_chars, out_chars, &mut g.estimated);
                    g.cost = spec.cost(g.usage);
                    g.error = Some(Error::new(ErrorCode::LuaError, format!("on_chunk failed: {}", super::provider::clip(&e.to_string(), 500))));
                    done(lua, env, &svc, g);
                    return Err(e);
                }
            }
            if let Err(e) = publish(json!({"type": "ai", "event": "delta", "generation": g.id, "delta": d})) {
                stop = Some(Err(e));
                break;
            }
            // A budget can stop a stream midway: what was streamed so far is counted.
            let est = Usage { input: estimate_tokens(prompt_chars).max(acc.usage().input), output: estimate_tokens(out_chars), cached: 0 };
            if svc.check_budget(env.ctx.user_id.as_deref(), Some(&env.function), (spec.cost(est), est.total())).is_err() {
                stop = Some(Ok("budget"));
                break;
            }
        }
        if acc.done {
            break;
        }
    }
    drop(events);
    let complete = acc.done;
    let r = acc.finish();
    g.steps = 1;
    g.provider_model = Some(r.provider_model.clone());
    g.usage = billed(&r, prompt_chars, out_chars, &mut g.estimated);
    g.cost = spec.cost(g.usage);
    g.answer = Some(json!({"text": r.text}));
    match stop {
        Some(Err(e)) => {
            g.cancelled = true;
            g.finish_reason = Some("cancelled".into());
            let _ = publish(json!({"type": "ai", "event": "error", "generation": g.id, "error": e.message}));
            Err(fail(lua, env, &svc, g, e))
        }
        Some(Ok(why)) => {
            g.cancelled = true;
            g.finish_reason = Some(why.into());
            let _ = publish(json!({"type": "ai", "event": "finish", "generation": g.id, "finish_reason": why}));
            let t = info(lua, &g, Some(&r.text), &[])?;
            t.set("cancelled", true)?;
            done(lua, env, &svc, g);
            Ok(t)
        }
        None => {
            g.finish_reason = Some(if complete || !r.finish_reason.is_empty() { r.finish_reason.clone() } else { "cancelled".into() });
            if let Some(k) = key {
                svc.cache_put(k, cached_value(&r, &json!({"text": r.text})));
            }
            let _ = publish(json!({"type": "ai", "event": "finish", "generation": g.id, "finish_reason": g.finish_reason,
                                   "usage": g.usage, "cost": g.cost}));
            let t = info(lua, &g, Some(&r.text), &[])?;
            done(lua, env, &svc, g);
            Ok(t)
        }
    }
}

/// What a stream is billed: the provider's usage when it reported it, else estimates.
fn billed(r: &Reply, prompt_chars: usize, out_chars: usize, estimated: &mut bool) -> Usage {
    let mut u = r.usage;
    if u.input == 0 {
        u.input = estimate_tokens(prompt_chars);
        *estimated = true;
    }
    if u.output == 0 && out_chars > 0 {
        u.output = estimate_tokens(out_chars);
        *estimated = true;
    }
    u
}

fn embed(lua: &Lua, env: &Env, texts: Value, opts: Option<Table>) -> mlua::Result<(Value, Table)> {
    let svc = service(env)?;
    let (list, single) = match &texts {
        Value::String(s) => (vec![s.to_str().map_err(|_| bad("ai.embed: texts must be UTF-8"))?.to_string()], true),
        Value::Table(_) => {
            let j = to_json(&texts).map_err(|e| bad(format!("ai.embed: {e}")))?;
            let arr = j.as_array().ok_or_else(|| bad("ai.embed: texts must be a string or an array of strings"))?;
            let v: Option<Vec<String>> = arr.iter().map(|x| x.as_str().map(str::to_string)).collect();
            (v.ok_or_else(|| bad("ai.embed: texts must be a string or an array of strings"))?, false)
        }
        other => return Err(bad(format!("ai.embed: texts must be a string or an array of strings, got a {}", other.type_name()))),
    };
    if list.is_empty() {
        return Err(bad("ai.embed: no texts given"));
    }
    if list.len() > svc.settings.max_embed_inputs {
        return Err(bad(format!("ai.embed: {} texts, over [ai] max_embed_inputs ({})", list.len(), svc.settings.max_embed_inputs)));
    }
    let bytes: usize = list.iter().map(String::len).sum();
    if bytes > svc.settings.max_prompt_bytes {
        return Err(bad(format!("ai.embed: {bytes} bytes of text, over [ai] max_prompt_bytes ({})", svc.settings.max_prompt_bytes)));
    }
    let mut model_name = None;
    if let Some(o) = &opts {
        for pair in o.pairs::<Value, Value>() {
            let (k, v) = pair?;
            match (k.as_string().map(|s| s.to_string_lossy()).as_deref(), v) {
                (Some("model"), Value::String(s)) => model_name = Some(s.to_string_lossy()),
                _ => return Err(bad("ai.embed: options are {model = 'name'}")),
            }
        }
    }
    let model = svc.resolve(model_name.as_deref()).map_err(lua_err)?;
    let mut g = begin(&svc, env, "embed", &model);
    if let Err(e) = svc.check_budget(env.ctx.user_id.as_deref(), Some(&env.function), (0.0, 0)) {
        return Err(fail(lua, env, &svc, g, e));
    }
    let vectors = match wait(env, svc.embed(&mut g, &model, list)).and_then(|r| r) {
        Ok(v) => v,
        Err(e) => return Err(fail(lua, env, &svc, g, e)),
    };
    g.finish_reason = Some("stop".into());
    let out = if single { to_lua(lua, &json!(vectors[0]))? } else { to_lua(lua, &json!(vectors))? };
    let t = info(lua, &g, None, &[])?;
    done(lua, env, &svc, g);
    Ok((out, t))
}

fn rate(lua: &Lua, env: &Env, id: String, score: f64, note: Option<String>) -> mlua::Result<Value> {
    let svc = service(env)?;
    let r = svc.rate(&env.ctx, &id, score, note).map_err(lua_err)?;
    to_lua(lua, &r)
}

impl Component for AiLua {
    /// Installed once per pooled state (`lua::pool`): reads the invocation only when called.
    fn reusable(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "ai"
    }

    fn install(&self, lua: &Lua, env: &Rc<Env>) -> mlua::Result<()> {
        let t = lua.create_table()?;
        let e = Rc::clone(env);
        t.set("generate_text", lua.create_function(move |lua, opts: Table| generate_text(lua, &e, opts))?)?;
        let e = Rc::clone(env);
        t.set("generate_object", lua.create_function(move |lua, opts: Table| generate_object(lua, &e, opts))?)?;
        let e = Rc::clone(env);
        t.set("stream_text", lua.create_function(move |lua, opts: Table| stream_text(lua, &e, opts))?)?;
        let e = Rc::clone(env);
        t.set(
            "embed",
            lua.create_function(move |lua, (texts, opts): (Value, Option<Table>)| embed(lua, &e, texts, opts))?,
        )?;
        let e = Rc::clone(env);
        t.set(
            "rate",
            lua.create_function(move |lua, (id, score, note): (String, f64, Option<String>)| rate(lua, &e, id, score, note))?,
        )?;
        lua.globals().set(self.name(), t)
    }
}
