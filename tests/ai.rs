//! The `ai` module end to end: the real server calls a scripted model provider on 127.0.0.1
//! (tests/common/model_server.rs, both protocols) from Lua functions invoked with
//! `POST /fn/...`; the generation log, usage, feedback and replay are read back over HTTP.

mod common;
#[path = "common/model_server.rs"]
mod model_server;

use std::time::Duration;

use common::ws::{Ws, recv, send};
use common::{ADMIN_KEY, Server, User, api, call_fn, client, put_fn, signup};
use model_server::{ModelServer, Script};
use serde_json::{Value, json};

fn config(url: &str, extra: &str) -> String {
    format!(
        r#"
[ai]
default = "fast"
{extra}

[ai.models.fast]
url = "{url}"
model = "m-fast"
input_price = 1.0
output_price = 2.0
cached_price = 0.5
fallbacks = ["backup"]

[ai.models.backup]
url = "{url}"
model = "m-backup"
input_price = 3.0
output_price = 4.0

[ai.models.claude]
provider = "anthropic"
url = "{url}"
model = "c-1"
input_price = 3.0
output_price = 15.0
cached_price = 0.3

[ai.models.retry]
url = "{url}"
model = "m-retry"
retries = 1

[ai.models.slow]
url = "{url}"
model = "m-slow"
timeout_secs = 1.0
fallbacks = ["backup"]

[ai.models.lonely]
url = "{url}"
model = "m-lonely"

[ai.models.keyed]
url = "{url}"
model = "m-keyed"
key_env = "ICHIBASE_TEST_UNSET_MODEL_KEY"

[ai.models.emb]
url = "{url}"
model = "e-1"
input_price = 0.1
"#
    )
}

fn start(url: &str, extra: &str, flags: &[&str]) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ichibase.toml"), config(url, extra)).unwrap();
    let mut f = vec!["--signup-open", "true"];
    f.extend_from_slice(flags);
    let s = Server::start_in(dir.path(), &f, &[]);
    (s, dir)
}

async fn deploy(base: &str, name: &str, src: &str) {
    let r = put_fn(&client(), base, name, src).await;
    assert_eq!(r.status, 200, "deploy {name}: {}", r.body);
}

/// Call `name` as `u` (or the admin): (status, JSON answer).
async fn call(base: &str, u: Option<&User>, name: &str, input: Value) -> (u16, Value) {
    let c = u.map(|u| u.client.clone()).unwrap_or_else(client);
    let r = call_fn(&c, base, name, input).await;
    let v = serde_json::from_str(&r.body).unwrap_or_else(|_| json!({"text": r.body}));
    (r.status, v)
}

async fn generation(base: &str, id: &str) -> Value {
    let (st, v) = api(&client(), "GET", format!("{base}/ai/generations/{id}"), None).await;
    assert_eq!(st, 200, "{v}");
    v["data"].clone()
}

fn close(a: &Value, b: f64) -> bool {
    a.as_f64().is_some_and(|x| (x - b).abs() < 1e-12)
}

/// Lua: one call of every shape, chosen by `input.shape`.
const CALLS: &str = r#"
return function(input)
  if input.shape == 'text' then
    return ai.generate_text{model = input.model, system = input.system, prompt = input.prompt,
                            max_tokens = input.max_tokens, cache = input.cache}
  elseif input.shape == 'messages' then
    return ai.generate_text{messages = input.messages}
  elseif input.shape == 'object' then
    local obj, info = ai.generate_object{model = input.model, prompt = input.prompt, schema = {
      type = 'object', required = {'score'}, additionalProperties = false,
      properties = {score = {type = 'integer', minimum = 0, maximum = 10}}}}
    return {object = obj, info = info}
  elseif input.shape == 'tools' then
    local calls = 0
    local r = ai.generate_text{model = input.model, prompt = input.prompt, max_steps = input.max_steps,
      tools = {add = {description = 'adds two integers',
                      parameters = {type = 'object', required = {'a', 'b'},
                                    properties = {a = {type = 'integer'}, b = {type = 'integer'}}},
                      execute = function(args) calls = calls + 1; return {sum = args.a + args.b} end}}}
    r.tool_runs = calls
    return r
  elseif input.shape == 'embed' then
    local v, info = ai.embed(input.texts, {model = 'emb'})
    return {vectors = v, info = info}
  elseif input.shape == 'rate' then
    return ai.rate(input.id, input.score, input.note)
  end
  error('unknown shape')
end
"#;

#[tokio::test(flavor = "multi_thread")]
async fn every_call_shape_fallbacks_and_the_generation_log() {
    let m = ModelServer::start().await;
    let (s, _dir) = start(&m.url, "", &[]);
    let base = &s.url;
    deploy(base, "calls", CALLS).await;
    let alice = signup(base, "alice@example.com").await;
    let bob = signup(base, "bob@example.com").await;

    // The models endpoint lists names, prices and fallbacks, never keys.
    let (st, v) = api(&alice.client, "GET", format!("{base}/ai/models"), None).await;
    assert_eq!(st, 200, "{v}");
    let fast = v["data"].as_array().unwrap().iter().find(|m| m["name"] == "fast").unwrap().clone();
    assert_eq!(fast["default"], true);
    assert_eq!(fast["fallbacks"], json!(["backup"]));
    assert_eq!(fast["pricing"]["cached"], 0.5);
    let keyed = v["data"].as_array().unwrap().iter().find(|m| m["name"] == "keyed").unwrap().clone();
    assert_eq!(keyed["key_set"], false);

    // Text (OpenAI protocol), usage with cached tokens, cost from the configured prices.
    m.script("m-fast", vec![Script::text("Bonjour", (100, 20, 40))]);
    let (st, t) = call(base, Some(&alice), "calls", json!({"shape": "text", "prompt": "Say hello", "system": "Be brief"})).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["text"], "Bonjour");
    assert_eq!(t["finish_reason"], "stop");
    assert_eq!(t["usage"], json!({"input": 100, "output": 20, "cached": 40}));
    assert!(close(&t["cost"], (60.0 * 1.0 + 40.0 * 0.5 + 20.0 * 2.0) / 1e6), "{t}");
    assert_eq!(t["model"], "fast");
    let sent = m.seen_by("m-fast").pop().unwrap();
    assert_eq!(sent.body["messages"][0], json!({"role": "system", "content": "Be brief"}));
    assert_eq!(sent.body["messages"][1], json!({"role": "user", "content": "Say hello"}));
    let text_id = t["id"].as_str().unwrap().to_string();

    // Anthropic protocol: system apart, cache reads reported apart and priced at cached_price.
    m.script("c-1", vec![Script::text("Hi from claude", (200, 50, 100))]);
    let (st, t) = call(base, Some(&alice), "calls", json!({"shape": "text", "model": "claude", "prompt": "hello", "system": "sys"})).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["text"], "Hi from claude");
    assert_eq!(t["usage"], json!({"input": 200, "output": 50, "cached": 100}));
    assert!(close(&t["cost"], (100.0 * 3.0 + 100.0 * 0.3 + 50.0 * 15.0) / 1e6), "{t}");
    let sent = m.seen_by("c-1").pop().unwrap();
    assert_eq!(sent.body["system"], "sys");
    assert_eq!(sent.headers.get("anthropic-version").unwrap(), "2023-06-01");
    let claude_id = t["id"].as_str().unwrap().to_string();

    // messages= instead of prompt=.
    let (st, t) = call(base, Some(&alice), "calls", json!({"shape": "messages", "messages": [
        {"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"}]})).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["text"], "echo: three");

    // An object: not JSON, then JSON failing the schema, then valid; errors fed back each time.
    m.script("m-fast", vec![
        Script::text("I think it is good", (10, 5, 0)),
        Script::text("{\"score\": \"high\"}", (10, 5, 0)),
        Script::text("```json\n{\"score\": 7}\n```", (10, 5, 0)),
    ]);
    m.clear_seen();
    let (st, o) = call(base, Some(&alice), "calls", json!({"shape": "object", "prompt": "rate it"})).await;
    assert_eq!(st, 200, "{o}");
    assert_eq!(o["object"], json!({"score": 7}));
    assert_eq!(o["info"]["usage"]["input"], 30);
    assert_eq!(o["info"]["steps"].as_array().unwrap().len(), 3);
    let seen = m.seen_by("m-fast");
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].body["response_format"]["type"], "json_object");
    assert!(seen[0].body["messages"][0]["content"].as_str().unwrap().contains("\"score\""), "the schema is in the system prompt");
    let fed_back = seen[2].body["messages"].as_array().unwrap().last().unwrap()["content"].as_str().unwrap().to_string();
    assert!(fed_back.contains("not valid against the schema") && fed_back.contains("integer"), "{fed_back}");
    let object_id = o["info"]["id"].as_str().unwrap().to_string();

    // ...and an object that never validates: a clear error carrying the last output.
    m.script("m-fast", vec![
        Script::text("{\"score\": 11}", (1, 1, 0)),
        Script::text("{\"score\": 12}", (1, 1, 0)),
        Script::text("{\"score\": 13, \"extra\": true}", (1, 1, 0)),
    ]);
    let (st, e) = call(base, Some(&alice), "calls", json!({"shape": "object", "prompt": "rate it"})).await;
    assert_eq!(st, 422, "{e}");
    assert_eq!(e["error"]["name"], "AI_OBJECT_INVALID");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains("after 3 attempt") && msg.contains("{\"score\": 13, \"extra\": true}"), "{msg}");

    // Tools: the model calls `add`, the Lua function runs, its result goes back, then text.
    m.script("m-fast", vec![
        Script::tool("add", json!({"a": 2, "b": 3}), (50, 10, 0)),
        Script::text("The sum is 5", (70, 6, 0)),
    ]);
    m.clear_seen();
    let (st, t) = call(base, Some(&alice), "calls", json!({"shape": "tools", "prompt": "2+3?"})).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["text"], "The sum is 5");
    assert_eq!(t["tool_runs"], 1);
    assert_eq!(t["usage"]["input"], 120);
    assert_eq!(t["steps"].as_array().unwrap().len(), 2);
    assert_eq!(t["steps"][0]["tool_results"][0]["result"], json!({"sum": 5}));
    let seen = m.seen_by("m-fast");
    assert_eq!(seen[0].body["tools"][0]["function"]["name"], "add");
    let back = seen[1].body["messages"].as_array().unwrap();
    assert_eq!(back[back.len() - 1]["role"], "tool");
    assert_eq!(back[back.len() - 1]["content"], "{\"sum\":5}");

    // Invalid tool arguments are refused before the Lua runs, and the model is told why; a
    // model that keeps calling tools stops at max_steps.
    m.script("m-fast", vec![
        Script::tool("add", json!({"a": "two", "b": 3}), (5, 5, 0)),
        Script::tool("add", json!({"a": 1, "b": 1}), (5, 5, 0)),
        Script::tool("add", json!({"a": 1, "b": 1}), (5, 5, 0)),
    ]);
    m.clear_seen();
    let (st, t) = call(base, Some(&alice), "calls", json!({"shape": "tools", "prompt": "loop", "max_steps": 3})).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["finish_reason"], "tool_calls");
    assert_eq!(t["steps"].as_array().unwrap().len(), 3);
    assert_eq!(t["tool_runs"], 1, "the invalid call did not run; the last step's call is not run");
    let seen = m.seen_by("m-fast");
    assert_eq!(seen.len(), 3);
    let first_result = seen[1].body["messages"].as_array().unwrap().last().unwrap()["content"].as_str().unwrap().to_string();
    assert!(first_result.contains("invalid arguments"), "{first_result}");

    // Anthropic tool calls.
    m.script("c-1", vec![Script::tool("add", json!({"a": 4, "b": 4}), (5, 5, 0)), Script::text("8", (5, 5, 0))]);
    let (st, t) = call(base, Some(&alice), "calls", json!({"shape": "tools", "model": "claude", "prompt": "4+4"})).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["text"], "8");
    assert_eq!(t["tool_runs"], 1);
    let back = m.seen_by("c-1").pop().unwrap().body["messages"].clone();
    assert_eq!(back[2]["content"][0]["type"], "tool_result");

    // Embeddings.
    let (st, e) = call(base, Some(&alice), "calls", json!({"shape": "embed", "texts": ["hello", "abc"]})).await;
    assert_eq!(st, 200, "{e}");
    assert_eq!(e["vectors"], json!([model_server::vector_of("hello"), model_server::vector_of("abc")]));
    assert_eq!(e["info"]["usage"]["input"], 3);

    // Fallbacks: a 500 from fast moves on to backup.
    m.script("m-fast", vec![Script::Status(500, None)]);
    let (st, t) = call(base, Some(&alice), "calls", json!({"shape": "text", "prompt": "fall back"})).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["model"], "backup");
    assert_eq!(t["text"], "echo: fall back");
    let fb = generation(base, t["id"].as_str().unwrap()).await;
    assert_eq!(fb["attempts"], 2);
    assert_eq!(fb["fallbacks"], 1);
    assert_eq!(fb["models_tried"], json!(["fast", "backup"]));
    assert_eq!(fb["model_requested"], "fast");

    // 429 with Retry-After on a model with retries: waited for, then answered.
    m.script("m-retry", vec![Script::Status(429, Some(1))]);
    let t0 = std::time::Instant::now();
    let (st, t) = call(base, Some(&alice), "calls", json!({"shape": "text", "model": "retry", "prompt": "again"})).await;
    assert_eq!(st, 200, "{t}");
    assert!(t0.elapsed() >= Duration::from_millis(900), "Retry-After was honoured");
    assert_eq!(generation(base, t["id"].as_str().unwrap()).await["attempts"], 2);

    // A model that hangs past its timeout falls back.
    m.script("m-slow", vec![Script::Hang(5)]);
    let (st, t) = call(base, Some(&alice), "calls", json!({"shape": "text", "model": "slow", "prompt": "slowly"})).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["model"], "backup");

    // Failures are typed and logged.
    m.script("m-lonely", vec![Script::Status(503, None)]);
    let (st, e) = call(base, Some(&alice), "calls", json!({"shape": "text", "model": "lonely", "prompt": "x"})).await;
    assert_eq!(st, 502, "{e}");
    assert_eq!(e["error"]["name"], "LLM_UNAVAILABLE");
    let (st, e) = call(base, Some(&alice), "calls", json!({"shape": "text", "model": "nope", "prompt": "x"})).await;
    assert_eq!((st, e["error"]["name"].as_str()), (404, Some("AI_UNKNOWN_MODEL")), "{e}");
    let (st, e) = call(base, Some(&alice), "calls", json!({"shape": "text", "model": "keyed", "prompt": "x"})).await;
    assert_eq!((st, e["error"]["name"].as_str()), (503, Some("AI_KEY_MISSING")), "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("ICHIBASE_TEST_UNSET_MODEL_KEY"));
    // Hostile arguments are refused with a message naming the problem.
    deploy(base, "bad_args", "return function(i) return ai.generate_text(i) end").await;
    for (input, needle) in [
        (json!({"prompt": 5}), "prompt must be a string"),
        (json!({"prompt": "x", "temperature": 9}), "temperature"),
        (json!({"prompt": "x", "bogus": 1}), "unknown option 'bogus'"),
        (json!({}), "prompt (a string) or messages"),
        (json!({"prompt": "x", "max_steps": 1000}), "max_steps"),
    ] {
        let (st, e) = call(base, Some(&alice), "bad_args", input.clone()).await;
        assert_eq!(st, 400, "{input}: {e}");
        assert!(e["error"]["message"].as_str().unwrap().contains(needle), "{input}: {e}");
    }

    // The generation as OpenRouter shows one, with the caller's identity and function.
    let g = generation(base, &text_id).await;
    assert_eq!(g["tokens_prompt"], 100);
    assert_eq!(g["tokens_completion"], 20);
    assert_eq!(g["native_tokens_cached"], 40);
    assert!(close(&g["total_cost"], 120.0 / 1e6), "{g}");
    assert_eq!(g["user_id"], alice.id.as_str());
    assert_eq!(g["function"], "calls");
    assert_eq!(g["provider"], "openai");
    assert!(g["provider_name"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(g["finish_reason"], "stop");
    assert_eq!(g["streamed"], false);
    assert_eq!(g["cancelled"], false);
    assert!(g["trace_id"].as_str().is_some_and(|t| !t.is_empty()));
    let (_, l) = api(&client(), "GET", format!("{base}/ai/generations?trace_id={}", g["trace_id"].as_str().unwrap()), None).await;
    assert_eq!(l["data"].as_array().unwrap().len(), 1, "{l}");
    assert_eq!(l["data"][0]["id"], text_id.as_str());
    assert!(g["latency"].as_f64().unwrap() > 0.0 && g["generation_time"].as_f64().unwrap() > 0.0);
    assert_eq!(g["request"]["system"], "Be brief");
    assert_eq!(g["answer"]["text"], "Bonjour");
    // Bob cannot see Alice's generation; Alice can.
    let (st, _) = api(&bob.client, "GET", format!("{base}/ai/generations/{text_id}"), None).await;
    assert_eq!(st, 404);
    let (st, _) = api(&alice.client, "GET", format!("{base}/ai/generations/{text_id}"), None).await;
    assert_eq!(st, 200);

    // A traced run links to its generations: the trace's logs name them and the Lua line.
    let r = common::request(&client(), reqwest::Method::POST, format!("{base}/fn/calls?trace=1"), Some(json!({"shape": "text", "prompt": "traced"}).to_string())).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (tid, gid) = (r.header("x-ichibase-trace-id").unwrap().to_string(), r.json()["id"].as_str().unwrap().to_string());
    let (st, tr) = api(&client(), "GET", format!("{base}/trace/{tid}"), None).await;
    assert_eq!(st, 200, "{tr}");
    let logs = tr.pointer("/logs").or_else(|| tr.pointer("/trace/logs")).cloned().unwrap_or(Value::Null);
    let entry = logs.as_array().into_iter().flatten().find(|l| l["fields"]["generation"] == gid.as_str()).cloned();
    assert!(entry.as_ref().is_some_and(|e| e["fields"]["line"].as_u64() == Some(4)), "{tr}");
    assert_eq!(generation(base, &gid).await["trace_id"], tid.as_str());

    // Lists by function, user and model.
    let (st, l) = api(&client(), "GET", format!("{base}/ai/generations?model=claude&user={}", alice.id), None).await;
    assert_eq!(st, 200, "{l}");
    assert_eq!(l["data"].as_array().unwrap().len(), 2, "{l}");
    let (st, l) = api(&bob.client, "GET", format!("{base}/ai/generations"), None).await;
    assert_eq!((st, l["data"].as_array().map(Vec::len)), (200, Some(0)), "{l}");
    let (st, _) = api(&bob.client, "GET", format!("{base}/ai/generations?user={}", alice.id), None).await;
    assert_eq!(st, 403);
    let (st, l) = api(&client(), "GET", format!("{base}/ai/generations?since=2000-01-01&until=2000-01-02"), None).await;
    assert_eq!((st, l["data"].as_array().map(Vec::len)), (200, Some(0)), "{l}");

    // Feedback: the user who made it (HTTP and Lua), not someone else.
    let (st, v) = api(&alice.client, "POST", format!("{base}/ai/generations/{claude_id}/feedback"), Some(json!({"score": 1, "note": "liked"}))).await;
    assert_eq!(st, 200, "{v}");
    let (st, _) = api(&bob.client, "POST", format!("{base}/ai/generations/{claude_id}/feedback"), Some(json!({"score": -1}))).await;
    assert_eq!(st, 403);
    let (st, _) = api(&alice.client, "POST", format!("{base}/ai/generations/gen-nope/feedback"), Some(json!({"score": 1}))).await;
    assert_eq!(st, 404);
    let (st, v) = call(base, Some(&alice), "calls", json!({"shape": "rate", "id": object_id, "score": -1, "note": "meh"})).await;
    assert_eq!(st, 200, "{v}");

    // Usage per model: the scripted numbers, summed in DuckDB, with ratings beside them.
    let (st, u) = api(&client(), "GET", format!("{base}/ai/usage?group_by=model"), None).await;
    assert_eq!(st, 200, "{u}");
    let row = |g: &str| u["data"].as_array().unwrap().iter().find(|r| r["group"] == g).cloned().unwrap_or(Value::Null);
    let claude = row("claude");
    assert_eq!(claude["generations"], 2, "{u}");
    assert_eq!(claude["tokens_prompt"], 210);
    assert_eq!(claude["rated"], 1);
    assert_eq!(claude["avg_score"], 1.0);
    assert!(close(&claude["total_cost"], (1080.0 + (5.0 * 3.0 + 5.0 * 15.0) * 2.0) / 1e6), "{claude}");
    assert_eq!(row("lonely")["errors"], 1);
    let (st, u) = api(&client(), "GET", format!("{base}/ai/usage?group_by=function"), None).await;
    assert_eq!(st, 200, "{u}");
    let calls = u["data"].as_array().unwrap().iter().find(|r| r["group"] == "calls").unwrap();
    assert_eq!(calls["rated"], 2);
    assert_eq!(calls["avg_score"], 0.0);
    for g in ["user", "day"] {
        let (st, u) = api(&client(), "GET", format!("{base}/ai/usage?group_by={g}"), None).await;
        assert_eq!(st, 200, "{u}");
        assert!(!u["data"].as_array().unwrap().is_empty());
    }
    let (st, _) = api(&client(), "GET", format!("{base}/ai/usage?group_by=colour"), None).await;
    assert_eq!(st, 400);
    let (st, _) = api(&alice.client, "GET", format!("{base}/ai/usage"), None).await;
    assert_eq!(st, 403);

    // Replay against another model: a new generation, the same request.
    m.script("c-1", vec![Script::text("Bonjour from claude", (30, 3, 0))]);
    let (st, r) = api(&client(), "POST", format!("{base}/ai/generations/{text_id}/replay"), Some(json!({"model": "claude"}))).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["text"], "Bonjour from claude");
    assert_eq!(r["original"]["text"], "Bonjour");
    let sent = m.seen_by("c-1").pop().unwrap();
    assert_eq!(sent.body["system"], "Be brief");
    assert_eq!(generation(base, r["id"].as_str().unwrap()).await["origin"], "replay");
}

async fn ws_connect(base: &str, token: &str) -> Ws {
    common::ws::open(base, &[("authorization", format!("Bearer {token}"))]).await
}

const STREAM: &str = r#"
return function(input)
  local chunks = {}
  local r = ai.stream_text{model = input.model, prompt = input.prompt, channel = input.channel,
                           on_chunk = function(d) chunks[#chunks + 1] = d end}
  r.chunks = chunks
  return r
end
"#;

#[tokio::test(flavor = "multi_thread")]
async fn streams_budgets_and_the_cache() {
    let m = ModelServer::start().await;
    let (mut s, dir) = start(&m.url, "[ai.budget]\nuser_tokens = 1000\n", &["--lua-timeout-secs", "4"]);
    let base = &s.url;
    deploy(base, "calls", CALLS).await;
    deploy(base, "stream", STREAM).await;
    let alice = signup(base, "alice@example.com").await;
    let bob = signup(base, "bob@example.com").await;
    let carol = signup(base, "carol@example.com").await;

    // Streaming to on_chunk and to a WebSocket channel the user may join.
    let mut ws = ws_connect(base, &alice.token).await;
    let channel = format!("user:{}", alice.id);
    send(&mut ws, json!({"type": "join", "channel": channel})).await;
    loop {
        if recv(&mut ws).await["type"] == "joined" {
            break;
        }
    }
    let text = "Tokens arrive one small piece at a time.";
    m.script("m-fast", vec![Script::Slow { text: text.into(), chunk: 5, delay_ms: 20, stall_secs: 0, usage: (40, 12, 8) }]);
    let (st, r) = call(base, Some(&alice), "stream", json!({"prompt": "stream please", "channel": channel})).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["text"], text);
    assert_eq!(r["chunks"].as_array().unwrap().len(), text.chars().count().div_ceil(5));
    assert_eq!(r["usage"], json!({"input": 40, "output": 12, "cached": 8}));
    assert_eq!(m.seen_by("m-fast")[0].body["stream"], true);
    let mut got = String::new();
    let finish = loop {
        let f = recv(&mut ws).await;
        if f["type"] != "broadcast" {
            continue;
        }
        let p = &f["payload"];
        assert_eq!(p["generation"], r["id"]);
        match p["event"].as_str().unwrap() {
            "delta" => got.push_str(p["delta"].as_str().unwrap()),
            "finish" => break p.clone(),
            _ => {}
        }
    };
    assert_eq!(got, text);
    assert_eq!(finish["usage"]["output"], 12);
    let g = generation(base, r["id"].as_str().unwrap()).await;
    assert_eq!(g["streamed"], true);
    assert_eq!(g["cancelled"], false);
    assert!(g["time_to_first_token"].as_f64().unwrap() > 0.0);
    assert!(g["tokens_per_second"].as_f64().unwrap() > 0.0);
    // Not someone else's channel.
    let (st, e) = call(base, Some(&bob), "stream", json!({"prompt": "x", "channel": channel})).await;
    assert_eq!(st, 403, "{e}");

    // Anthropic streaming.
    m.script("c-1", vec![Script::Slow { text: "Claude streams too".into(), chunk: 4, delay_ms: 5, stall_secs: 0, usage: (30, 6, 10) }]);
    let (st, r) = call(base, Some(&bob), "stream", json!({"model": "claude", "prompt": "x"})).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["text"], "Claude streams too");
    assert_eq!(r["usage"], json!({"input": 30, "output": 6, "cached": 10}));

    // A stream that stalls past the invocation's time limit: cancelled, logged with what was
    // streamed (estimated), and the invocation ends with TIMEOUT_EXCEEDED.
    m.script("m-fast", vec![Script::Slow { text: "partial answer then nothing".into(), chunk: 8, delay_ms: 0, stall_secs: 30, usage: (1, 1, 0) }]);
    let (st, e) = call(base, Some(&bob), "stream", json!({"prompt": "stall"})).await;
    assert_eq!(st, 408, "{e}");
    assert_eq!(e["error"]["name"], "TIMEOUT_EXCEEDED");
    let (_, l) = api(&client(), "GET", format!("{base}/ai/generations?user={}&limit=1", bob.id), None).await;
    let g = &l["data"][0];
    assert_eq!(g["cancelled"], true, "{g}");
    assert_eq!(g["streamed"], true);
    assert_eq!(g["usage_estimated"], true);
    assert_eq!(g["tokens_completion"], 4, "16 chars streamed before the stall: ~4 tokens");

    // The cache: the second identical request is answered without the provider, at cost 0.
    m.script("m-fast", vec![Script::text("cached answer", (300, 30, 0))]);
    m.clear_seen();
    let a = call(base, Some(&carol), "calls", json!({"shape": "text", "prompt": "same", "cache": true})).await.1;
    let b = call(base, Some(&carol), "calls", json!({"shape": "text", "prompt": "same", "cache": true})).await.1;
    assert_eq!((a["text"].as_str(), b["text"].as_str()), (Some("cached answer"), Some("cached answer")));
    assert_eq!(m.seen_by("m-fast").len(), 1);
    assert_eq!(b["cache_hit"], true);
    let g = generation(base, b["id"].as_str().unwrap()).await;
    assert_eq!(g["cache_hit"], true);
    assert_eq!(g["total_cost"], 0.0);
    // Without cache = true the provider is asked again.
    call(base, Some(&carol), "calls", json!({"shape": "text", "prompt": "same"})).await;
    assert_eq!(m.seen_by("m-fast").len(), 2);

    // Budgets: Alice has used 52 tokens; a call of 1100 takes her over 1000; the next is refused.
    m.script("m-fast", vec![Script::text("big", (600, 500, 0))]);
    let (st, _) = call(base, Some(&alice), "calls", json!({"shape": "text", "prompt": "big"})).await;
    assert_eq!(st, 200);
    m.clear_seen();
    let (st, e) = call(base, Some(&alice), "calls", json!({"shape": "text", "prompt": "more"})).await;
    assert_eq!(st, 429, "{e}");
    assert_eq!(e["error"]["name"], "BUDGET_EXCEEDED");
    assert!(e["error"]["message"].as_str().unwrap().contains("user_tokens"), "{e}");
    assert!(m.seen().is_empty(), "a refused call never reaches the provider");
    let (_, l) = api(&client(), "GET", format!("{base}/ai/generations?user={}&limit=1", alice.id), None).await;
    assert!(l["data"][0]["error"].as_str().unwrap().contains("BUDGET_EXCEEDED"), "{l}");
    // Others still may.
    let (st, _) = call(base, Some(&bob), "calls", json!({"shape": "text", "prompt": "fine"})).await;
    assert_eq!(st, 200);
    // The day's spend is in /ai/usage.
    let (_, u) = api(&client(), "GET", format!("{base}/ai/usage?group_by=user"), None).await;
    assert!(u["budgets"]["today"]["users"][&alice.id]["tokens"].as_u64().unwrap() >= 1100, "{u}");
    assert_eq!(u["budgets"]["limits"]["user_tokens"], 1000);

    // A budget stops a stream midway: 8000 chars are ~2000 tokens, over Dave's 1000.
    let dave = signup(base, "dave@example.com").await;
    let long: String = "abcdefghij".repeat(800);
    m.script("m-fast", vec![Script::Slow { text: long.clone(), chunk: 100, delay_ms: 1, stall_secs: 0, usage: (10, 2000, 0) }]);
    let (st, r) = call(base, Some(&dave), "stream", json!({"prompt": "long"})).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["cancelled"], true);
    assert_eq!(r["finish_reason"], "budget");
    let n = r["text"].as_str().unwrap().len();
    assert!(n > 0 && n < long.len(), "stopped after {n} chars");
    let g = generation(base, r["id"].as_str().unwrap()).await;
    assert_eq!(g["cancelled"], true);
    assert_eq!(g["outcome"], "cancelled");
    assert!(g["tokens_completion"].as_u64().unwrap() > 0);

    // Budgets survive a restart: today's spend is read back from the log.
    let base = base.clone();
    assert!(s.terminate().success());
    drop(s);
    let s = Server::start_in(dir.path(), &["--signup-open", "true"], &[]);
    let alice = common::signin(&common::anon_client(), &s.url, "alice@example.com", &common::password_of("alice@example.com")).await;
    assert_eq!(alice.status, 200, "{}", alice.body);
    let token = alice.json()["access_token"].as_str().unwrap().to_string();
    let alice_client = common::client_with_token(&token);
    let alice_id = alice.json()["user"]["id"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, u) = api(&client(), "GET", format!("{}/ai/usage?group_by=user", s.url), None).await;
        if u["budgets"]["today"]["users"][&alice_id]["tokens"].as_u64().unwrap_or(0) >= 1100 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "today's spend was not read back: {u}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = call_fn(&alice_client, &s.url, "calls", json!({"shape": "text", "prompt": "after restart"})).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.body.contains("BUDGET_EXCEEDED"), "{}", r.body);
    let _ = base;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_article_ranking_example_ranks_with_generate_object() {
    let m = ModelServer::start().await;
    let (s, _dir) = start(&m.url, "", &[]);
    let base = &s.url;
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/ai_rank_articles.lua")).unwrap();
    deploy(base, "rank_articles", &src).await;
    let articles: Vec<Value> = (1..=10)
        .map(|i| json!({"id": i, "title": format!("Article {i}"), "summary": format!("About topic {i}")}))
        .collect();
    // The model first misses an article (the schema demands all ten), then ranks them all.
    let bad: Vec<Value> = (1..=9).map(|i| json!({"id": i, "score": i, "reason": "ok"})).collect();
    let good: Vec<Value> = [7, 3, 10, 1, 2, 4, 5, 6, 8, 9]
        .iter()
        .enumerate()
        .map(|(k, id)| json!({"id": id, "score": 10 - k, "reason": format!("rank {}", k + 1)}))
        .collect();
    m.script("m-fast", vec![
        Script::text(&json!({"ranking": bad}).to_string(), (500, 100, 0)),
        Script::text(&json!({"ranking": good}).to_string(), (600, 120, 0)),
    ]);
    let alice = signup(base, "alice@example.com").await;
    let prefs = "# What I like\n- Rust, databases\n- **not** celebrity news\n";
    let (st, r) = call(base, Some(&alice), "rank_articles", json!({"preferences": prefs, "articles": articles})).await;
    assert_eq!(st, 200, "{r}");
    let ids: Vec<i64> = r["ranked"].as_array().unwrap().iter().map(|a| a["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [7, 3, 10, 1, 2, 4, 5, 6, 8, 9]);
    assert_eq!(r["ranked"][0]["title"], "Article 7");
    assert_eq!(r["usage"]["input"], 1100);
    let sent = &m.seen_by("m-fast")[0].body;
    let prompt = sent["messages"][1]["content"].as_str().unwrap();
    assert!(prompt.contains("not** celebrity news") && prompt.contains("Article 10"), "{prompt}");
    // The user's verdict on the ranking, as the example's client sends it.
    let (st, v) = api(&alice.client, "POST", format!("{base}/ai/generations/{}/feedback", r["generation"].as_str().unwrap()), Some(json!({"score": 1, "note": "good order"}))).await;
    assert_eq!(st, 200, "{v}");
    let _ = ADMIN_KEY;
}

fn cli(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ichibase"))
        .args(args)
        .env("ICHIBASE_ADMIN_KEY", ADMIN_KEY)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "ichibase {args:?}: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_replays_and_evaluates_against_several_models() {
    let m = ModelServer::start().await;
    let (s, dir) = start(&m.url, "", &[]);
    let base = s.url.clone();
    deploy(&base, "calls", CALLS).await;
    let (st, t) = call(&base, None, "calls", json!({"shape": "text", "prompt": "recorded prompt", "system": "sys"})).await;
    assert_eq!(st, 200, "{t}");
    let id = t["id"].as_str().unwrap().to_string();

    m.script("c-1", vec![Script::text("Bonjour de Claude", (10, 4, 0))]);
    let out = tokio::task::spawn_blocking({
        let (base, id) = (base.clone(), id.clone());
        move || cli(&["ai", "replay", &id, "--model", "claude", "--url", &base])
    })
    .await
    .unwrap();
    assert!(out.contains("original  fast") && out.contains("echo: recorded prompt"), "{out}");
    assert!(out.contains("replay    claude") && out.contains("Bonjour de Claude"), "{out}");

    let schema = json!({"type": "object", "required": ["score"], "properties": {"score": {"type": "integer"}}});
    let file = json!({
        "models": ["fast", "claude"],
        "cases": [
            {"name": "exact", "prompt": "2+2?", "checks": [{"exact": "4"}]},
            {"name": "contains", "prompt": "greet", "checks": [{"contains": "echo"}]},
            {"name": "schema", "prompt": "score it", "schema": schema, "checks": [{"json_schema": schema}]},
            {"name": "lua", "prompt": "long?", "checks": [{"lua": "return function(i) return #i.text > 10 end"}]},
            {"name": "recorded", "generation": id, "checks": [{"contains": "recorded prompt"}]}
        ]
    });
    let path = dir.path().join("eval.json");
    std::fs::write(&path, file.to_string()).unwrap();
    m.script("m-fast", vec![Script::text("4", (1, 1, 0)), Script::text("echo: greet", (1, 1, 0)), Script::text("{\"score\": 3}", (1, 1, 0))]);
    m.script("c-1", vec![Script::text("four", (1, 1, 0)), Script::text("echo: greet", (1, 1, 0)), Script::text("no idea", (1, 1, 0))]);
    let out = tokio::task::spawn_blocking({
        let (base, path) = (base.clone(), path.display().to_string());
        move || cli(&["ai", "eval", &path, "--url", &base])
    })
    .await
    .unwrap();
    let row = |model: &str| out.lines().find(|l| l.starts_with(model)).unwrap_or_default().to_string();
    assert!(row("fast").contains("100.0%"), "{out}");
    assert!(row("claude").contains("60.0%"), "{out}");
    assert!(out.contains("FAIL exact on claude") && out.contains("FAIL schema on claude"), "{out}");
    // The schema case asked the provider for JSON.
    assert!(m.seen_by("m-fast").iter().any(|s| s.body["response_format"]["type"] == "json_object"));
    // Eval calls are generations too.
    let (_, l) = api(&client(), "GET", format!("{base}/ai/generations?limit=100"), None).await;
    assert_eq!(l["data"].as_array().unwrap().iter().filter(|g| g["origin"] == "eval").count(), 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_repair_loop_calls_are_in_the_generation_log() {
    let m = ModelServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ichibase.toml"), config(&m.url, "")).unwrap();
    let s = Server::start_in(dir.path(), &[], &[("ICHIBASE_LLM_URL", &m.url), ("ICHIBASE_LLM_MODEL", "m-repair")]);
    // The echo answers hold no bundle: two rounds, both logged, then the loop gives up.
    m.script("m-repair", vec![Script::text("no bundle here", (111, 22, 0))]);
    let (st, g) = api(&client(), "POST", format!("{}/generate", s.url), Some(json!({"intent": "notes", "max_rounds": 2}))).await;
    assert_eq!(st, 200, "{g}");
    let (st, l) = api(&client(), "GET", format!("{}/ai/generations?model=m-repair", s.url), None).await;
    assert_eq!(st, 200, "{l}");
    let rows = l["data"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{l}");
    assert!(rows.iter().all(|r| r["origin"] == "generate" && r["id"].as_str().unwrap().starts_with("gen-")));
    assert!(rows.iter().any(|r| r["tokens_prompt"] == 111 && r["tokens_completion"] == 22), "{l}");
    let (_, u) = api(&client(), "GET", format!("{}/ai/usage?group_by=model", s.url), None).await;
    let row = u["data"].as_array().unwrap().iter().find(|r| r["group"] == "m-repair").unwrap().clone();
    assert_eq!(row["generations"], 2);
}

/// Prompts pass the privacy guard before they leave: one-time codes and card numbers are
/// redacted in what the provider receives (system text, messages and embedded texts); a kind
/// `[egress.guard] block` names refuses the call with PRIVACY_BLOCKED and sends nothing.
#[tokio::test(flavor = "multi_thread")]
async fn prompts_pass_the_privacy_guard() {
    let m = ModelServer::start().await;
    let (s, _dir) = start(&m.url, "\n[egress.guard]\nblock = [\"my_number\"]\nsecrets = [\"hunter2-vault-xyz\"]\n", &[]);
    let base = &s.url;
    deploy(base, "calls", CALLS).await;
    let alice = signup(base, "alice@example.com").await;

    m.script("m-fast", vec![Script::text("ok", (10, 2, 0))]);
    let prompt = "Your verification code is 482913. Card 4242 4242 4242 4242, token hunter2-vault-xyz.";
    let (st, t) = call(base, Some(&alice), "calls", json!({"shape": "text", "prompt": prompt, "system": "認証コードは 771234 です"})).await;
    assert_eq!(st, 200, "{t}");
    let sent = m.seen_by("m-fast").pop().unwrap().body.to_string();
    for secret in ["482913", "4242 4242 4242 4242", "hunter2-vault-xyz", "771234"] {
        assert!(!sent.contains(secret), "{secret} reached the provider: {sent}");
    }
    assert!(sent.contains("[REDACTED:otp]") && sent.contains("[REDACTED:card]") && sent.contains("[REDACTED:secret]"), "{sent}");
    assert!(sent.contains("Your verification code is"), "the rest of the prompt is kept: {sent}");

    // Embeddings too.
    m.clear_seen();
    let (st, v) = call(base, Some(&alice), "calls", json!({"shape": "embed", "texts": ["code 482913 is your login code", "plain"]})).await;
    assert_eq!(st, 200, "{v}");
    let sent = m.seen().pop().unwrap().body.to_string();
    assert!(!sent.contains("482913"), "{sent}");

    // A blocked kind (a valid My Number: 12 digits with its check digit) refuses the call.
    m.clear_seen();
    let (st, e) = call(base, Some(&alice), "calls", json!({"shape": "text", "prompt": "マイナンバーは 1234 5678 9018 です"})).await;
    assert_eq!(st, 422, "{e}");
    assert_eq!(e["error"]["name"], "PRIVACY_BLOCKED", "{e}");
    assert!(m.seen().is_empty(), "nothing was sent");
}
