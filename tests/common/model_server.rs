//! A scripted model provider on 127.0.0.1 for tests and benches of the `ai` module, speaking
//! both protocols the engine talks to: OpenAI-compatible `POST /v1/chat/completions` (plain and
//! SSE with `stream_options.include_usage`, tool calls, `response_format`), `POST
//! /v1/embeddings`, and Anthropic's `POST /v1/messages` (plain and SSE events, `tool_use`
//! blocks, cache usage fields).
//!
//! Answers are scripted per model id (the request's `model`): [`ModelServer::script`] queues
//! [`Script`]s; with nothing queued, a responder set with [`ModelServer::respond`] answers from
//! the request (a model whose answer depends on its prompt), else the model echoes the last
//! user message with usage [`DEFAULT_USAGE`]. Every request is recorded ([`ModelServer::seen`]).
//! Include with `#[path = "common/model_server.rs"] mod model_server;`.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// (input, output, cached) tokens of an answer with no scripted usage.
pub const DEFAULT_USAGE: (u64, u64, u64) = (10, 5, 0);

/// One scripted answer.
#[derive(Clone, Debug)]
pub enum Script {
    /// Text, with usage (input incl. cached, output, cached) and finish reason (`stop` default).
    Text { text: String, usage: (u64, u64, u64), finish: Option<String> },
    /// Tool calls: (name, arguments).
    Tools { calls: Vec<(String, Value)>, usage: (u64, u64, u64) },
    /// An HTTP error status, with `Retry-After` seconds.
    Status(u16, Option<u64>),
    /// Answer nothing for this many seconds (then the echo answer).
    Hang(u64),
    /// A stream: the text in chunks of `chunk` chars, `delay_ms` apart; then stall for
    /// `stall_secs` before finishing (0: no stall).
    Slow { text: String, chunk: usize, delay_ms: u64, stall_secs: u64, usage: (u64, u64, u64) },
}

impl Script {
    pub fn text(t: &str, usage: (u64, u64, u64)) -> Script {
        Script::Text { text: t.to_string(), usage, finish: None }
    }
    pub fn tool(name: &str, args: Value, usage: (u64, u64, u64)) -> Script {
        Script::Tools { calls: vec![(name.to_string(), args)], usage }
    }
}

/// A recorded request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub model: String,
    pub body: Value,
    pub headers: HeaderMap,
}

/// Answers a request (its JSON body) when nothing is queued; `None`: the echo answer.
pub type Responder = Arc<dyn Fn(&Value) -> Option<Script> + Send + Sync>;

#[derive(Default)]
struct Inner {
    scripts: Mutex<HashMap<String, VecDeque<Script>>>,
    responders: Mutex<HashMap<String, Responder>>,
    seen: Mutex<Vec<Seen>>,
}

#[derive(Clone)]
pub struct ModelServer {
    /// Base URL for `[ai.models.X] url` (`http://127.0.0.1:PORT/v1`).
    pub url: String,
    inner: Arc<Inner>,
}

impl ModelServer {
    /// Start on an ephemeral port (needs a running Tokio runtime).
    pub async fn start() -> ModelServer {
        let inner = Arc::new(Inner::default());
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(openai))
            .route("/v1/messages", post(anthropic))
            .route("/v1/embeddings", post(embeddings))
            .with_state(Arc::clone(&inner));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        ModelServer { url: format!("http://{addr}/v1"), inner }
    }

    /// Queue answers for model id `model`.
    pub fn script(&self, model: &str, scripts: Vec<Script>) {
        self.inner.scripts.lock().unwrap().entry(model.to_string()).or_default().extend(scripts);
    }

    /// Answer requests to model id `model` with `f` whenever no script is queued.
    pub fn respond(&self, model: &str, f: impl Fn(&Value) -> Option<Script> + Send + Sync + 'static) {
        self.inner.responders.lock().unwrap().insert(model.to_string(), Arc::new(f));
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.inner.seen.lock().unwrap().clone()
    }

    /// Requests to model id `model`.
    pub fn seen_by(&self, model: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.model == model).collect()
    }

    pub fn clear_seen(&self) {
        self.inner.seen.lock().unwrap().clear();
    }
}

fn record(inner: &Inner, path: &str, h: HeaderMap, body: &str) -> (Value, Script) {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let model = v["model"].as_str().unwrap_or("").to_string();
    inner.seen.lock().unwrap().push(Seen { path: path.into(), model: model.clone(), body: v.clone(), headers: h });
    let next = inner.scripts.lock().unwrap().get_mut(&model).and_then(VecDeque::pop_front);
    let responder = inner.responders.lock().unwrap().get(&model).cloned();
    let script = next
        .or_else(|| responder.and_then(|f| f(&v)))
        .unwrap_or_else(|| echo(&v));
    (v, script)
}

/// The echo answer: "echo: <last user text>".
fn echo(v: &Value) -> Script {
    let last = v["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .map(|m| match &m["content"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .unwrap_or_default();
    Script::text(&format!("echo: {last}"), DEFAULT_USAGE)
}

fn status(code: u16, retry_after: Option<u64>) -> Response {
    let mut r = (StatusCode::from_u16(code).unwrap(), format!("{{\"error\": {{\"message\": \"scripted {code}\"}}}}")).into_response();
    if let Some(s) = retry_after {
        r.headers_mut().insert("retry-after", s.to_string().parse().unwrap());
    }
    r
}

fn chunks(text: &str, n: usize) -> Vec<String> {
    let cs: Vec<char> = text.chars().collect();
    cs.chunks(n.max(1)).map(|c| c.iter().collect()).collect()
}

/// An SSE body from (event name, data) frames sent with `delay_ms` between them, and an
/// optional stall before the last `tail` frames.
fn sse(frames: Vec<(Option<String>, String)>, delay_ms: u64, stall_at: Option<(usize, u64)>) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        for (i, (ev, data)) in frames.into_iter().enumerate() {
            if let Some((at, secs)) = stall_at {
                if i == at {
                    tokio::time::sleep(Duration::from_secs(secs)).await;
                }
            }
            if delay_ms > 0 && i > 0 {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            }
            let mut s = String::new();
            if let Some(e) = ev {
                s.push_str(&format!("event: {e}\n"));
            }
            s.push_str(&format!("data: {data}\n\n"));
            if tx.send(Ok(bytes::Bytes::from(s))).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .unwrap()
}

async fn openai(State(inner): State<Arc<Inner>>, h: HeaderMap, body: String) -> Response {
    let (v, mut script) = record(&inner, "/v1/chat/completions", h, &body);
    let model = v["model"].as_str().unwrap_or("").to_string();
    if let Script::Hang(secs) = script {
        tokio::time::sleep(Duration::from_secs(secs)).await;
        script = echo(&v);
    }
    let stream = v["stream"] == true;
    let usage = |(i, o, c): (u64, u64, u64)| json!({"prompt_tokens": i, "completion_tokens": o, "total_tokens": i + o, "prompt_tokens_details": {"cached_tokens": c}});
    match script {
        Script::Status(code, ra) => status(code, ra),
        Script::Hang(_) => unreachable!(),
        Script::Text { text, usage: u, finish } if !stream => axum::Json(json!({
            "id": "chatcmpl-scripted", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish.unwrap_or("stop".into())}],
            "usage": usage(u),
        }))
        .into_response(),
        Script::Tools { calls, usage: u } if !stream => axum::Json(json!({
            "id": "chatcmpl-scripted", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": calls.iter().enumerate().map(|(i, (n, a))| json!({
                "id": format!("call_{i}"), "type": "function", "function": {"name": n, "arguments": a.to_string()}})).collect::<Vec<_>>()},
                "finish_reason": "tool_calls"}],
            "usage": usage(u),
        }))
        .into_response(),
        Script::Text { text, usage: u, finish } => {
            openai_stream(&model, &text, 3, 0, 0, u, finish.unwrap_or("stop".into()))
        }
        Script::Slow { text, chunk, delay_ms, stall_secs, usage: u } => {
            openai_stream(&model, &text, chunk, delay_ms, stall_secs, u, "stop".into())
        }
        Script::Tools { .. } => status(400, None),
    }
}

fn openai_stream(model: &str, text: &str, chunk: usize, delay_ms: u64, stall_secs: u64, (i, o, c): (u64, u64, u64), finish: String) -> Response {
    let mut frames: Vec<(Option<String>, String)> = chunks(text, chunk)
        .into_iter()
        .map(|t| (None, json!({"id": "chatcmpl-s", "model": model, "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": null}]}).to_string()))
        .collect();
    let n = frames.len();
    frames.push((None, json!({"id": "chatcmpl-s", "model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}).to_string()));
    frames.push((None, json!({"id": "chatcmpl-s", "model": model, "choices": [], "usage": {"prompt_tokens": i, "completion_tokens": o, "prompt_tokens_details": {"cached_tokens": c}}}).to_string()));
    frames.push((None, "[DONE]".into()));
    sse(frames, delay_ms, (stall_secs > 0).then_some((n.min(2), stall_secs)))
}

async fn anthropic(State(inner): State<Arc<Inner>>, h: HeaderMap, body: String) -> Response {
    let (v, mut script) = record(&inner, "/v1/messages", h, &body);
    let model = v["model"].as_str().unwrap_or("").to_string();
    if let Script::Hang(secs) = script {
        tokio::time::sleep(Duration::from_secs(secs)).await;
        script = echo(&v);
    }
    let stream = v["stream"] == true;
    // Anthropic reports uncached input apart from cache reads.
    let usage = |(i, o, c): (u64, u64, u64)| json!({"input_tokens": i - c, "output_tokens": o, "cache_read_input_tokens": c, "cache_creation_input_tokens": 0});
    match script {
        Script::Status(code, ra) => status(code, ra),
        Script::Hang(_) => unreachable!(),
        Script::Text { text, usage: u, finish } if !stream => axum::Json(json!({
            "id": "msg_scripted", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": match finish.as_deref() { Some("length") => "max_tokens", _ => "end_turn" },
            "usage": usage(u),
        }))
        .into_response(),
        Script::Tools { calls, usage: u } if !stream => axum::Json(json!({
            "id": "msg_scripted", "type": "message", "role": "assistant", "model": model,
            "content": calls.iter().enumerate().map(|(i, (n, a))| json!({"type": "tool_use", "id": format!("toolu_{i}"), "name": n, "input": a})).collect::<Vec<_>>(),
            "stop_reason": "tool_use",
            "usage": usage(u),
        }))
        .into_response(),
        Script::Text { text, usage: u, .. } => anthropic_stream(&model, &text, 3, 0, 0, u),
        Script::Slow { text, chunk, delay_ms, stall_secs, usage: u } => anthropic_stream(&model, &text, chunk, delay_ms, stall_secs, u),
        Script::Tools { .. } => status(400, None),
    }
}

fn anthropic_stream(model: &str, text: &str, chunk: usize, delay_ms: u64, stall_secs: u64, (i, o, c): (u64, u64, u64)) -> Response {
    let ev = |name: &str, v: Value| (Some(name.to_string()), v.to_string());
    let mut frames = vec![
        ev("message_start", json!({"type": "message_start", "message": {"id": "msg_s", "model": model, "usage": {"input_tokens": i - c, "cache_read_input_tokens": c, "output_tokens": 1}}})),
        ev("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})),
    ];
    for t in chunks(text, chunk) {
        frames.push(ev("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}})));
    }
    frames.push(ev("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
    frames.push(ev("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": o}})));
    frames.push(ev("message_stop", json!({"type": "message_stop"})));
    sse(frames, delay_ms, (stall_secs > 0).then_some((4, stall_secs)))
}

/// A deterministic vector of a text: [chars, vowels, bytes mod 97, 1].
pub fn vector_of(t: &str) -> Vec<f64> {
    vec![
        t.chars().count() as f64,
        t.chars().filter(|c| "aeiou".contains(*c)).count() as f64,
        (t.bytes().map(u64::from).sum::<u64>() % 97) as f64,
        1.0,
    ]
}

async fn embeddings(State(inner): State<Arc<Inner>>, h: HeaderMap, body: String) -> Response {
    let (v, script) = record(&inner, "/v1/embeddings", h, &body);
    if let Script::Status(code, ra) = script {
        return status(code, ra);
    }
    let texts: Vec<String> = match &v["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().map(|x| x.as_str().unwrap_or("").to_string()).collect(),
        _ => Vec::new(),
    };
    let tokens: u64 = texts.iter().map(|t| (t.chars().count() as u64).div_ceil(4)).sum();
    axum::Json(json!({
        "object": "list", "model": v["model"],
        "data": texts.iter().enumerate().map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": vector_of(t)})).collect::<Vec<_>>(),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response()
}
