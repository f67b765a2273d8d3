//! The wire protocols of model providers for the `ai` module: OpenAI-compatible chat
//! completions (+ `/embeddings`) and Anthropic's messages API, plain and streamed (SSE).
//!
//! Owns request bodies, answer parsing (text, tool calls, finish reason, usage with cached
//! tokens) and the classification of failures (retryable or not, `Retry-After`). Knows nothing
//! of models' names, prices, fallbacks, budgets or logging: those are `ai::service`'s.

use std::pin::Pin;
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

/// Which protocol a model speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// OpenAI-compatible chat completions (OpenAI, OpenRouter, vLLM, llama.cpp, Ollama).
    #[default]
    Openai,
    /// Anthropic's messages API.
    Anthropic,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Openai => "openai",
            Provider::Anthropic => "anthropic",
        }
    }
}

/// How structured output is asked of an OpenAI-compatible model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum JsonMode {
    /// `response_format: {"type": "json_object"}` (widely supported).
    #[default]
    Object,
    /// `response_format: {"type": "json_schema", ...}` with the schema (OpenAI structured outputs).
    Schema,
    /// Nothing: the schema is only described in the system prompt.
    None,
}

/// One tool call the model asked for.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: Json,
}

/// One message of a conversation: `user`, `assistant` (maybe with tool calls) or `tool` (a
/// tool's result, answering `tool_call_id`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Msg {
    pub role: String,
    #[serde(default)]
    pub content: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Msg {
    pub fn user(text: impl Into<String>) -> Msg {
        Msg { role: "user".into(), content: text.into(), tool_calls: Vec::new(), tool_call_id: None }
    }
    pub fn assistant(text: impl Into<String>, calls: Vec<ToolCall>) -> Msg {
        Msg { role: "assistant".into(), content: text.into(), tool_calls: calls, tool_call_id: None }
    }
    pub fn tool(id: &str, text: impl Into<String>) -> Msg {
        Msg { role: "tool".into(), content: text.into(), tool_calls: Vec::new(), tool_call_id: Some(id.to_string()) }
    }
}

/// A tool offered to the model: its name, what it does and the JSON Schema of its arguments.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub parameters: Json,
}

/// A provider-neutral request (also what the generation log keeps, and what replay re-sends).
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct ChatRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    pub messages: Vec<Msg>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ToolSpec>,
    /// Structured output asked: the JSON Schema the answer must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Json>,
}

/// Tokens, as the provider reported them. `input` includes `cached`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    pub cached: u64,
}

impl Usage {
    pub fn add(&mut self, o: Usage) {
        self.input += o.input;
        self.output += o.output;
        self.cached += o.cached;
    }
    pub fn total(&self) -> u64 {
        self.input + self.output
    }
}

/// One answer of the model.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reply {
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    /// `stop`, `length`, `tool_calls`, `content_filter` (OpenAI's names; Anthropic's mapped).
    pub finish_reason: String,
    pub usage: Usage,
    /// The model as the provider named it in its answer.
    pub provider_model: String,
}

/// Where and how one configured model is called.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub provider: Provider,
    /// Base URL, e.g. `https://api.openai.com/v1` (no trailing slash).
    pub base: String,
    pub model: String,
    pub key: Option<String>,
    pub timeout: Duration,
    pub max_tokens: u32,
    pub json_mode: JsonMode,
}

/// A failed exchange.
#[derive(Debug, Clone)]
pub struct CallError {
    pub message: String,
    /// 429, 408, 409, 5xx, connection failures and time-outs: another attempt or model may work.
    pub retryable: bool,
    pub retry_after: Option<Duration>,
    pub status: Option<u16>,
}

impl CallError {
    fn fatal(message: impl Into<String>) -> CallError {
        CallError { message: message.into(), retryable: false, retry_after: None, status: None }
    }
}

pub fn clip(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn url_of(ep: &Endpoint, path: &str) -> String {
    format!("{}/{path}", ep.base)
}

fn send_error(ep: &Endpoint, e: reqwest::Error) -> CallError {
    let what = if e.is_timeout() {
        format!("timed out after {} s", ep.timeout.as_secs_f64())
    } else if e.is_connect() {
        format!("could not connect ({e})")
    } else {
        format!("failed ({e})")
    };
    CallError { message: format!("the call to {} {what}", ep.base), retryable: true, retry_after: None, status: None }
}

fn authorize(ep: &Endpoint, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    match ep.provider {
        Provider::Openai => match &ep.key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        },
        Provider::Anthropic => {
            let rb = rb.header("anthropic-version", "2023-06-01");
            match &ep.key {
                Some(k) => rb.header("x-api-key", k),
                None => rb,
            }
        }
    }
}

/// POST `body` to `path`; a non-2xx answer becomes a [`CallError`].
async fn post(http: &reqwest::Client, ep: &Endpoint, path: &str, body: &Json) -> Result<reqwest::Response, CallError> {
    let rb = authorize(ep, http.post(url_of(ep, path)).timeout(ep.timeout).json(body));
    let resp = rb.send().await.map_err(|e| send_error(ep, e))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(3600.0)));
    let text = resp.text().await.unwrap_or_default();
    let code = status.as_u16();
    Err(CallError {
        message: format!("{} answered HTTP {code}: {}", ep.base, clip(&text, 500)),
        retryable: matches!(code, 408 | 409 | 429) || code >= 500,
        retry_after,
        status: Some(code),
    })
}

fn chat_path(ep: &Endpoint) -> &'static str {
    match ep.provider {
        Provider::Openai => "chat/completions",
        Provider::Anthropic => "messages",
    }
}

/// The provider's request body for `req`.
pub fn chat_body(ep: &Endpoint, req: &ChatRequest, stream: bool) -> Json {
    let max_tokens = req.max_tokens.unwrap_or(ep.max_tokens);
    match ep.provider {
        Provider::Openai => {
            let mut msgs = Vec::with_capacity(req.messages.len() + 1);
            if let Some(s) = &req.system {
                msgs.push(json!({"role": "system", "content": s}));
            }
            for m in &req.messages {
                msgs.push(match m.role.as_str() {
                    "assistant" if !m.tool_calls.is_empty() => json!({
                        "role": "assistant",
                        "content": if m.content.is_empty() { Json::Null } else { Json::String(m.content.clone()) },
                        "tool_calls": m.tool_calls.iter().map(|c| json!({
                            "id": c.id, "type": "function",
                            "function": {"name": c.name, "arguments": c.arguments.to_string()}
                        })).collect::<Vec<_>>(),
                    }),
                    "tool" => json!({"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content}),
                    role => json!({"role": role, "content": m.content}),
                });
            }
            let mut body = json!({"model": ep.model, "messages": msgs, "max_tokens": max_tokens});
            if let Some(t) = req.temperature {
                body["temperature"] = json!(t);
            }
            if !req.tools.is_empty() {
                body["tools"] = Json::Array(
                    req.tools
                        .iter()
                        .map(|t| json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}))
                        .collect(),
                );
            }
            if let Some(schema) = &req.schema {
                match ep.json_mode {
                    JsonMode::Object => body["response_format"] = json!({"type": "json_object"}),
                    JsonMode::Schema => {
                        body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "output", "schema": schema}})
                    }
                    JsonMode::None => {}
                }
            }
            if stream {
                body["stream"] = json!(true);
                body["stream_options"] = json!({"include_usage": true});
            }
            body
        }
        Provider::Anthropic => {
            let mut msgs: Vec<Json> = Vec::with_capacity(req.messages.len());
            for m in &req.messages {
                match m.role.as_str() {
                    "assistant" => {
                        let mut blocks = Vec::new();
                        if !m.content.is_empty() {
                            blocks.push(json!({"type": "text", "text": m.content}));
                        }
                        for c in &m.tool_calls {
                            blocks.push(json!({"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments}));
                        }
                        msgs.push(json!({"role": "assistant", "content": blocks}));
                    }
                    "tool" => {
                        let block = json!({"type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.content});
                        // Consecutive tool results go back in one user turn.
                        match msgs.last_mut() {
                            Some(last) if last["role"] == "user" && last["content"].is_array() => {
                                last["content"].as_array_mut().expect("array").push(block)
                            }
                            _ => msgs.push(json!({"role": "user", "content": [block]})),
                        }
                    }
                    _ => msgs.push(json!({"role": "user", "content": m.content})),
                }
            }
            let mut body = json!({"model": ep.model, "max_tokens": max_tokens, "messages": msgs});
            if let Some(s) = &req.system {
                body["system"] = json!(s);
            }
            if let Some(t) = req.temperature {
                body["temperature"] = json!(t);
            }
            if !req.tools.is_empty() {
                body["tools"] = Json::Array(
                    req.tools
                        .iter()
                        .map(|t| json!({"name": t.name, "description": t.description, "input_schema": t.parameters}))
                        .collect(),
                );
            }
            if stream {
                body["stream"] = json!(true);
            }
            body
        }
    }
}

fn finish_of_anthropic(s: &str) -> String {
    match s {
        "end_turn" | "stop_sequence" => "stop",
        "max_tokens" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        other => other,
    }
    .to_string()
}

fn num(v: &Json, p: &str) -> u64 {
    v.pointer(p).and_then(Json::as_u64).unwrap_or(0)
}

fn openai_usage(u: &Json) -> Usage {
    Usage {
        input: num(u, "/prompt_tokens"),
        output: num(u, "/completion_tokens"),
        cached: num(u, "/prompt_tokens_details/cached_tokens"),
    }
}

fn anthropic_usage(u: &Json) -> Usage {
    let cached = num(u, "/cache_read_input_tokens");
    Usage {
        input: num(u, "/input_tokens") + cached + num(u, "/cache_creation_input_tokens"),
        output: num(u, "/output_tokens"),
        cached,
    }
}

/// Tool arguments as the model sent them: JSON text (OpenAI) or an object (Anthropic).
fn arguments(v: Option<&Json>) -> Json {
    match v {
        Some(Json::String(s)) if s.trim().is_empty() => json!({}),
        Some(Json::String(s)) => serde_json::from_str(s).unwrap_or_else(|_| Json::String(s.clone())),
        Some(v) => v.clone(),
        None => json!({}),
    }
}

/// Parse a whole (non-streamed) answer.
pub fn parse_reply(ep: &Endpoint, v: &Json) -> Result<Reply, CallError> {
    let provider_model = v.get("model").and_then(Json::as_str).unwrap_or(&ep.model).to_string();
    match ep.provider {
        Provider::Openai => {
            let choice = v.pointer("/choices/0").ok_or_else(|| {
                CallError::fatal(format!("the model's answer has no choices: {}", clip(&v.to_string(), 300)))
            })?;
            let calls = choice
                .pointer("/message/tool_calls")
                .and_then(Json::as_array)
                .map(|a| {
                    a.iter()
                        .map(|c| ToolCall {
                            id: c.get("id").and_then(Json::as_str).unwrap_or_default().to_string(),
                            name: c.pointer("/function/name").and_then(Json::as_str).unwrap_or_default().to_string(),
                            arguments: arguments(c.pointer("/function/arguments")),
                        })
                        .collect()
                })
                .unwrap_or_default();
            Ok(Reply {
                text: choice.pointer("/message/content").and_then(Json::as_str).unwrap_or("").to_string(),
                tool_calls: calls,
                finish_reason: choice.get("finish_reason").and_then(Json::as_str).unwrap_or("stop").to_string(),
                usage: v.get("usage").map(openai_usage).unwrap_or_default(),
                provider_model,
            })
        }
        Provider::Anthropic => {
            let blocks = v.get("content").and_then(Json::as_array).ok_or_else(|| {
                CallError::fatal(format!("the model's answer has no content: {}", clip(&v.to_string(), 300)))
            })?;
            let mut r = Reply { provider_model, ..Default::default() };
            for b in blocks {
                match b.get("type").and_then(Json::as_str) {
                    Some("text") => r.text.push_str(b.get("text").and_then(Json::as_str).unwrap_or("")),
                    Some("tool_use") => r.tool_calls.push(ToolCall {
                        id: b.get("id").and_then(Json::as_str).unwrap_or_default().to_string(),
                        name: b.get("name").and_then(Json::as_str).unwrap_or_default().to_string(),
                        arguments: arguments(b.get("input")),
                    }),
                    _ => {}
                }
            }
            r.finish_reason = finish_of_anthropic(v.get("stop_reason").and_then(Json::as_str).unwrap_or("end_turn"));
            r.usage = v.get("usage").map(anthropic_usage).unwrap_or_default();
            Ok(r)
        }
    }
}

/// One whole chat exchange.
pub async fn chat(http: &reqwest::Client, ep: &Endpoint, req: &ChatRequest) -> Result<Reply, CallError> {
    let resp = post(http, ep, chat_path(ep), &chat_body(ep, req, false)).await?;
    let text = resp.text().await.map_err(|e| send_error(ep, e))?;
    let v: Json = serde_json::from_str(&text).map_err(|e| {
        CallError::fatal(format!("the model provider answered with invalid JSON ({e}): {}", clip(&text, 300)))
    })?;
    parse_reply(ep, &v)
}

/// Server-sent events of a streamed answer.
pub type Events = Pin<Box<dyn Stream<Item = Result<eventsource_stream::Event, String>> + Send>>;

/// Start a streamed exchange: returns once the provider accepted it (status 2xx).
pub async fn open_stream(http: &reqwest::Client, ep: &Endpoint, req: &ChatRequest) -> Result<Events, CallError> {
    let resp = post(http, ep, chat_path(ep), &chat_body(ep, req, true)).await?;
    Ok(Box::pin(resp.bytes_stream().eventsource().map(|r| r.map_err(|e| e.to_string()))))
}

/// Builds a [`Reply`] from streamed events.
#[derive(Default)]
pub struct StreamAcc {
    reply: Reply,
    /// Tool calls being assembled: (id, name, argument text).
    calls: Vec<(String, String, String)>,
    pub done: bool,
}

impl StreamAcc {
    /// Take one event; returns the text it adds, if any.
    pub fn feed(&mut self, provider: Provider, ev: &eventsource_stream::Event) -> Result<Option<String>, String> {
        let data = ev.data.trim();
        if data.is_empty() {
            return Ok(None);
        }
        if data == "[DONE]" {
            self.done = true;
            return Ok(None);
        }
        let v: Json = serde_json::from_str(data).map_err(|e| format!("a streamed event is not JSON ({e}): {}", clip(data, 200)))?;
        match provider {
            Provider::Openai => {
                if let Some(e) = v.get("error") {
                    return Err(format!("the provider reported an error mid-stream: {}", clip(&e.to_string(), 300)));
                }
                if let Some(m) = v.get("model").and_then(Json::as_str) {
                    self.reply.provider_model = m.to_string();
                }
                if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                    self.reply.usage = openai_usage(u);
                }
                let Some(choice) = v.pointer("/choices/0") else { return Ok(None) };
                if let Some(f) = choice.get("finish_reason").and_then(Json::as_str) {
                    self.reply.finish_reason = f.to_string();
                }
                if let Some(calls) = choice.pointer("/delta/tool_calls").and_then(Json::as_array) {
                    for c in calls {
                        let i = c.get("index").and_then(Json::as_u64).unwrap_or(0) as usize;
                        if i > 128 {
                            return Err("too many streamed tool calls".into());
                        }
                        while self.calls.len() <= i {
                            self.calls.push(Default::default());
                        }
                        let slot = &mut self.calls[i];
                        if let Some(id) = c.get("id").and_then(Json::as_str) {
                            slot.0 = id.to_string();
                        }
                        if let Some(n) = c.pointer("/function/name").and_then(Json::as_str) {
                            slot.1.push_str(n);
                        }
                        if let Some(a) = c.pointer("/function/arguments").and_then(Json::as_str) {
                            slot.2.push_str(a);
                        }
                    }
                }
                match choice.pointer("/delta/content").and_then(Json::as_str) {
                    Some(t) if !t.is_empty() => {
                        self.reply.text.push_str(t);
                        Ok(Some(t.to_string()))
                    }
                    _ => Ok(None),
                }
            }
            Provider::Anthropic => match v.get("type").and_then(Json::as_str).unwrap_or(ev.event.as_str()) {
                "message_start" => {
                    if let Some(m) = v.pointer("/message/model").and_then(Json::as_str) {
                        self.reply.provider_model = m.to_string();
                    }
                    if let Some(u) = v.pointer("/message/usage") {
                        self.reply.usage = anthropic_usage(u);
                    }
                    Ok(None)
                }
                "content_block_start" => {
                    let b = v.get("content_block").cloned().unwrap_or(Json::Null);
                    if b.get("type").and_then(Json::as_str) == Some("tool_use") {
                        self.calls.push((
                            b.get("id").and_then(Json::as_str).unwrap_or_default().to_string(),
                            b.get("name").and_then(Json::as_str).unwrap_or_default().to_string(),
                            String::new(),
                        ));
                    }
                    Ok(None)
                }
                "content_block_delta" => match v.pointer("/delta/type").and_then(Json::as_str) {
                    Some("text_delta") => {
                        let t = v.pointer("/delta/text").and_then(Json::as_str).unwrap_or("");
                        self.reply.text.push_str(t);
                        Ok((!t.is_empty()).then(|| t.to_string()))
                    }
                    Some("input_json_delta") => {
                        if let Some(last) = self.calls.last_mut() {
                            last.2.push_str(v.pointer("/delta/partial_json").and_then(Json::as_str).unwrap_or(""));
                        }
                        Ok(None)
                    }
                    _ => Ok(None),
                },
                "message_delta" => {
                    if let Some(s) = v.pointer("/delta/stop_reason").and_then(Json::as_str) {
                        self.reply.finish_reason = finish_of_anthropic(s);
                    }
                    if let Some(o) = v.pointer("/usage/output_tokens").and_then(Json::as_u64) {
                        self.reply.usage.output = o;
                    }
                    Ok(None)
                }
                "message_stop" => {
                    self.done = true;
                    Ok(None)
                }
                "error" => Err(format!(
                    "the provider reported an error mid-stream: {}",
                    clip(&v.get("error").unwrap_or(&v).to_string(), 300)
                )),
                _ => Ok(None),
            },
        }
    }

    /// The text so far.
    pub fn text(&self) -> &str {
        &self.reply.text
    }

    pub fn usage(&self) -> Usage {
        self.reply.usage
    }

    pub fn finish(mut self) -> Reply {
        self.reply.tool_calls = self
            .calls
            .into_iter()
            .map(|(id, name, args)| ToolCall { id, name, arguments: arguments(Some(&Json::String(args))) })
            .collect();
        if self.reply.finish_reason.is_empty() {
            self.reply.finish_reason = if self.done { "stop".into() } else { "cancelled".into() };
        }
        self.reply
    }
}

/// Embeddings of `texts` (OpenAI-compatible `/embeddings`).
pub async fn embed(http: &reqwest::Client, ep: &Endpoint, texts: &[String]) -> Result<(Vec<Vec<f64>>, Usage, String), CallError> {
    if ep.provider != Provider::Openai {
        return Err(CallError::fatal("embeddings need an OpenAI-compatible model (provider = \"openai\")"));
    }
    let resp = post(http, ep, "embeddings", &json!({"model": ep.model, "input": texts})).await?;
    let text = resp.text().await.map_err(|e| send_error(ep, e))?;
    let v: Json = serde_json::from_str(&text)
        .map_err(|e| CallError::fatal(format!("the embeddings answer is not JSON ({e}): {}", clip(&text, 300))))?;
    let data = v.get("data").and_then(Json::as_array).ok_or_else(|| {
        CallError::fatal(format!("the embeddings answer has no data: {}", clip(&text, 300)))
    })?;
    let mut out = vec![Vec::new(); texts.len()];
    for (k, d) in data.iter().enumerate() {
        let i = d.get("index").and_then(Json::as_u64).map(|i| i as usize).unwrap_or(k);
        let vec: Vec<f64> = d
            .get("embedding")
            .and_then(Json::as_array)
            .map(|a| a.iter().filter_map(Json::as_f64).collect())
            .unwrap_or_default();
        if i < out.len() {
            out[i] = vec;
        }
    }
    if out.iter().any(Vec::is_empty) {
        return Err(CallError::fatal(format!(
            "the embeddings answer has {} vectors for {} texts",
            data.len(),
            texts.len()
        )));
    }
    let usage = Usage { input: num(&v, "/usage/prompt_tokens"), output: 0, cached: 0 };
    let model = v.get("model").and_then(Json::as_str).unwrap_or(&ep.model).to_string();
    Ok((out, usage, model))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(p: Provider) -> Endpoint {
        Endpoint {
            provider: p,
            base: "http://x/v1".into(),
            model: "m".into(),
            key: None,
            timeout: Duration::from_secs(1),
            max_tokens: 100,
            json_mode: JsonMode::Object,
        }
    }

    fn ev(event: &str, data: &str) -> eventsource_stream::Event {
        eventsource_stream::Event { event: event.into(), data: data.into(), id: String::new(), retry: None }
    }

    #[test]
    fn bodies_carry_tools_results_and_json_mode() {
        let req = ChatRequest {
            system: Some("sys".into()),
            messages: vec![
                Msg::user("hi"),
                Msg::assistant("", vec![ToolCall { id: "c1".into(), name: "f".into(), arguments: json!({"a": 1}) }]),
                Msg::tool("c1", "{\"r\":2}"),
            ],
            tools: vec![ToolSpec { name: "f".into(), description: "d".into(), parameters: json!({"type": "object"}) }],
            schema: Some(json!({"type": "object"})),
            ..Default::default()
        };
        let o = chat_body(&ep(Provider::Openai), &req, true);
        assert_eq!(o["messages"][0]["role"], "system");
        assert_eq!(o["messages"][2]["tool_calls"][0]["function"]["arguments"], "{\"a\":1}");
        assert_eq!(o["messages"][3]["tool_call_id"], "c1");
        assert_eq!(o["response_format"]["type"], "json_object");
        assert_eq!(o["stream_options"]["include_usage"], true);
        let a = chat_body(&ep(Provider::Anthropic), &req, false);
        assert_eq!(a["system"], "sys");
        assert_eq!(a["messages"][1]["content"][0]["type"], "tool_use");
        assert_eq!(a["messages"][2]["content"][0]["tool_use_id"], "c1");
        assert_eq!(a["tools"][0]["input_schema"]["type"], "object");
    }

    #[test]
    fn streams_assemble_text_tools_and_usage() {
        let mut s = StreamAcc::default();
        let p = Provider::Openai;
        assert_eq!(s.feed(p, &ev("", r#"{"choices":[{"delta":{"content":"He"}}]}"#)).unwrap().as_deref(), Some("He"));
        s.feed(p, &ev("", r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"t","function":{"name":"f","arguments":"{\"a\""}}]}}]}"#)).unwrap();
        s.feed(p, &ev("", r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":":1}"}}]},"finish_reason":"tool_calls"}]}"#)).unwrap();
        s.feed(p, &ev("", r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":1}}}"#)).unwrap();
        s.feed(p, &ev("", "[DONE]")).unwrap();
        let r = s.finish();
        assert_eq!(r.text, "He");
        assert_eq!(r.tool_calls[0].arguments, json!({"a": 1}));
        assert_eq!(r.usage, Usage { input: 5, output: 2, cached: 1 });
        assert_eq!(r.finish_reason, "tool_calls");

        let mut s = StreamAcc::default();
        let p = Provider::Anthropic;
        s.feed(p, &ev("message_start", r#"{"type":"message_start","message":{"model":"c","usage":{"input_tokens":3,"cache_read_input_tokens":4}}}"#)).unwrap();
        assert_eq!(s.feed(p, &ev("content_block_delta", r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"yo"}}"#)).unwrap().as_deref(), Some("yo"));
        s.feed(p, &ev("message_delta", r#"{"type":"message_delta","delta":{"stop_reason":"max_tokens"},"usage":{"output_tokens":9}}"#)).unwrap();
        let r = s.finish();
        assert_eq!(r.usage, Usage { input: 7, output: 9, cached: 4 });
        assert_eq!(r.finish_reason, "length");
        assert_eq!(r.provider_model, "c");
    }
}
