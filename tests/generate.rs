//! The repair loop end to end against the real server: a local HTTP server speaks the model
//! provider's protocol (OpenAI chat completions, Anthropic messages) and returns scripted answers;
//! everything else — branches, bundles, checks, Lua, merges — is the real engine.

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use common::{Server, client, ok, post as sql_post};
use serde_json::{Value, json};

/// A scripted model: answers in order, records what it was asked, and (when `probe` is set)
/// records the live app's state at the moment of each call.
#[derive(Clone, Default)]
struct Model {
    replies: Arc<Mutex<VecDeque<(u16, String)>>>,
    seen: Arc<Mutex<Vec<(HeaderMap, Value)>>>,
    probe: Arc<Mutex<Option<String>>>,
    probes: Arc<Mutex<Vec<Value>>>,
}

async fn probe_live(m: &Model) {
    let url = m.probe.lock().unwrap().clone();
    if let Some(url) = url {
        let body = sql_post(
            &client(),
            &url,
            &[("output_format_json_quote_64bit_integers", "0")],
            "SELECT (SELECT count(*) FROM sqlite_schema WHERE name IN ('notes', 'tags')) AS tables,
                    (SELECT count(*) FROM _ichibase_function_heads) AS functions FORMAT JSONEachRow",
        )
        .await
        .body;
        m.probes
            .lock()
            .unwrap()
            .push(serde_json::from_str(body.trim()).unwrap());
    }
}

fn next_reply(m: &Model) -> (u16, String) {
    m.replies
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or((500, "{\"error\": \"no scripted reply left\"}".into()))
}

async fn openai(State(m): State<Model>, h: HeaderMap, body: String) -> impl IntoResponse {
    let v: Value = serde_json::from_str(&body).unwrap();
    m.seen.lock().unwrap().push((h, v));
    probe_live(&m).await;
    let (status, text) = next_reply(&m);
    if status == 999 {
        // A provider that hangs: answers only after the client's time-out.
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    } else if status != 200 {
        return (StatusCode::from_u16(status).unwrap(), text).into_response();
    }
    axum::Json(json!({
        "id": "chatcmpl-test", "object": "chat.completion", "model": "scripted-1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200}
    }))
    .into_response()
}

async fn anthropic(State(m): State<Model>, h: HeaderMap, body: String) -> impl IntoResponse {
    let v: Value = serde_json::from_str(&body).unwrap();
    m.seen.lock().unwrap().push((h, v));
    probe_live(&m).await;
    let (status, text) = next_reply(&m);
    if status != 200 {
        return (StatusCode::from_u16(status).unwrap(), text).into_response();
    }
    axum::Json(json!({
        "id": "msg_test", "type": "message", "role": "assistant", "model": "scripted-claude",
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 700, "output_tokens": 300}
    }))
    .into_response()
}

async fn start_model(replies: Vec<(u16, String)>) -> (Model, String) {
    let m = Model::default();
    *m.replies.lock().unwrap() = replies.into();
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(openai))
        .route("/v1/messages", post(anthropic))
        .with_state(m.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (m, format!("http://{addr}/v1"))
}

async fn json_of(rb: reqwest::RequestBuilder) -> Value {
    rb.send().await.unwrap().json().await.unwrap()
}

fn server_for(model_url: &str, extra_env: &[(&str, &str)]) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut env = vec![
        ("ICHIBASE_LLM_URL", model_url),
        ("ICHIBASE_LLM_KEY", "sk-test-key"),
        ("ICHIBASE_LLM_MODEL", "scripted-1"),
    ];
    env.extend_from_slice(extra_env);
    let s = Server::start_in(dir.path(), &[], &env);
    (s, dir)
}

const MIGRATION: &str =
    "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL, chars INTEGER NOT NULL)";

const ADD_NOTE: &str = "return function(input)\n  local c = fn.call('count_chars', {text = input.body})\n  local r = db.exec('INSERT INTO notes (body, chars) VALUES ({b:String}, {c:Int64})', {b = input.body, c = c.count})\n  return {id = r.last_insert_id, chars = c.count}\nend";

fn checks() -> Value {
    json!([
        {"name": "counts ascii", "function": "count_chars", "input": {"text": "abc"}, "expect": {"count": 3}},
        {"name": "adds a note", "function": "add_note", "input": {"body": "abc"}, "expect": {"id": 1, "chars": 3}},
        {"name": "counts any japanese text", "lua":
            "prop.check('count is characters', prop.string{alphabet = 'japanese', max = 30}, function(s)\n  return fn.call('count_chars', {text = s}).count == utf8.len(s)\nend, {runs = 100})"}
    ])
}

fn bundle(count_source: &str) -> Value {
    json!({
        "name": "notes",
        "description": "notes with their length in characters",
        "migrations": [{"name": "notes", "sql": MIGRATION}],
        "functions": [
            {"name": "count_chars", "source": count_source},
            {"name": "add_note", "source": ADD_NOTE}
        ],
        "checks": checks()
    })
}

/// Round 1: a Lua runtime error (indexing a missing field).
const COUNT_V1: &str = "return function(input)\n  local text = input.text\n  local n = #text + input.offset.value\n  return {count = n}\nend";
/// Round 2: counts bytes, not characters — passes the ASCII example, fails the property.
const COUNT_V2: &str =
    "return function(input)\n  local text = input.text or ''\n  return {count = #text}\nend";
/// Round 3: right.
const COUNT_V3: &str = "return function(input)\n  local text = input.text or ''\n  return {count = utf8.len(text)}\nend";

fn answer(b: &Value) -> String {
    format!(
        "Here is the bundle.\n```json\n{}\n```\n",
        serde_json::to_string_pretty(b).unwrap()
    )
}

fn user_messages(seen: &[(HeaderMap, Value)], i: usize) -> String {
    seen[i].1["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .join("\n---\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn three_rounds_lua_error_then_property_then_merge() {
    let (model, url) = start_model(vec![
        (200, answer(&bundle(COUNT_V1))),
        (200, answer(&bundle(COUNT_V2))),
        (200, answer(&bundle(COUNT_V3))),
    ])
    .await;
    let (s, _dir) = server_for(&url, &[]);
    *model.probe.lock().unwrap() = Some(s.url.clone());
    let c = client();

    let r = c
        .post(format!("{}/generate", s.url))
        .json(&json!({"intent": "メモを保存して、文字数を数えるサービス"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let g: Value = r.json().await.unwrap();
    assert_eq!(g["status"], "merged", "{g:#}");
    let rounds = g["rounds"].as_array().unwrap();
    let outcomes: Vec<&str> = rounds
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["checks_failed", "checks_failed", "verified"]);
    assert_eq!(g["input_tokens"], 3000);
    assert_eq!(g["output_tokens"], 600);

    // Round 1: the Lua error names the line; round 2: the property's counterexample shrank to
    // one character.
    let r1 = &rounds[0]["checks"];
    assert!(
        r1[0]["error"].as_str().unwrap().contains("offset"),
        "{r1:#}"
    );
    assert_eq!(r1[0]["line"], 3, "{r1:#}");
    let r2 = &rounds[1]["checks"];
    assert_eq!(r2[0]["ok"], true);
    assert_eq!(r2[1]["ok"], true);
    assert_eq!(r2[2]["ok"], false);
    assert_eq!(r2[2]["properties"][0]["counterexample"], "あ", "{r2:#}");

    // What the model was told: the error with its line, then the shrunk counterexample and the
    // trace of the failing run.
    let seen = model.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    assert!(seen[0].0["authorization"] == "Bearer sk-test-key");
    assert_eq!(seen[0].1["model"], "scripted-1");
    let first = user_messages(&seen, 0);
    assert!(first.contains("メモを保存して"), "{first}");
    assert!(first.contains("no app tables yet"), "{first}");
    assert!(
        seen[0].1["messages"][0]["content"]
            .as_str()
            .unwrap()
            .contains("prop.check")
    );
    let second = user_messages(&seen, 1);
    assert!(
        second.contains("Round 1 failed (checks_failed)"),
        "{second}"
    );
    assert!(second.contains("attempt to index a nil value"), "{second}");
    assert!(second.contains("at line 3"), "{second}");
    let third = user_messages(&seen, 2);
    assert!(third.contains("Round 2 failed (checks_failed)"), "{third}");
    assert!(third.contains("minimal counterexample after"), "{third}");
    assert!(third.contains("\"あ\""), "{third}");
    assert!(third.contains("trace of the failing run"), "{third}");
    assert!(
        third.contains("count_chars:3"),
        "trace names the function's line: {third}"
    );

    // The live app was untouched while the model was being asked.
    let probes = model.probes.lock().unwrap().clone();
    assert_eq!(probes.len(), 3);
    for p in &probes {
        assert_eq!(p["tables"], 0, "{probes:?}");
        assert_eq!(p["functions"], 0, "{probes:?}");
    }

    // Merged: schema and both functions are live; rows the checks wrote stayed in the branch.
    assert_eq!(
        ok(&c, &s.url, "SELECT count(*) FROM notes").await.trim(),
        "0"
    );
    let r = c
        .post(format!("{}/fn/add_note", s.url))
        .json(&json!({"body": "こんにちは"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"id": 1, "chars": 5})
    );
    let branches: Value = json_of(c.get(format!("{}/branches", s.url))).await;
    assert_eq!(branches["branches"], json!([]), "the merged branch is gone");

    // Every round is recorded with prompt, answer, outcome, tokens and time, and the failing
    // runs' traces are kept.
    let rec: Value =
        json_of(c.get(format!("{}/generate/{}", s.url, g["id"].as_str().unwrap()))).await;
    assert_eq!(rec["status"], "merged");
    let rr = rec["rounds"].as_array().unwrap();
    assert_eq!(rr.len(), 3);
    assert!(rr[0]["prompt"].as_str().unwrap().starts_with("SYSTEM:"));
    assert!(rr[1]["answer"].as_str().unwrap().contains("#text}"));
    assert_eq!(rr[2]["outcome"], "verified");
    assert_eq!(rr[1]["input_tokens"], 1000);
    let trace_id = rr[1]["checks"][2]["trace_id"].as_str().expect("trace id");
    let t = c
        .get(format!("{}/trace/{trace_id}", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(t.status(), 200);
    let list: Value = json_of(c.get(format!("{}/generate", s.url))).await;
    assert_eq!(list["generations"][0]["id"], g["id"]);
    // One name, one shape (issue 14): `rounds_run` is the count in the list and the record,
    // `rounds` only ever the list of round records.
    assert_eq!(list["generations"][0]["rounds_run"], 3, "{list}");
    assert!(list["generations"][0].get("rounds").is_none(), "{list}");
    assert_eq!(rec["rounds_run"], 3);

    // Each model call is an `ai` row of the posterity log (committed within a second).
    let q = format!(
        "SELECT count(*), sum(input_tokens), sum(output_tokens), max(round), min(model) FROM ai_calls WHERE generation = '{}' AND outcome = 'ok'",
        g["id"].as_str().unwrap()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let body = c
            .post(format!("{}/analytics", s.url))
            .body(q.clone())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if body == "3\t3000\t600\t3\tscripted-1\n" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "ai_calls: {body:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn anthropic_protocol_retries_and_bad_answers_are_fed_back() {
    let mut bad_migration = bundle(COUNT_V3);
    bad_migration["migrations"] = json!(["BEGIN; CREATE TABLE x (a)"]);
    let (model, url) = start_model(vec![
        (
            529,
            "{\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}".into(),
        ),
        (200, "I think you want a notes app. Let me know!".into()),
        (200, answer(&bad_migration)),
        (200, answer(&bundle(COUNT_V3))),
    ])
    .await;
    let (s, _dir) = server_for(
        &url,
        &[
            ("ICHIBASE_LLM_PROVIDER", "anthropic"),
            ("ICHIBASE_LLM_MODEL", "claude-test"),
        ],
    );
    let c = client();
    let g: Value = json_of(
        c.post(format!("{}/generate", s.url))
            .json(&json!({"intent": "notes", "max_rounds": 3})),
    )
    .await;
    assert_eq!(g["status"], "merged", "{g:#}");
    let outcomes: Vec<&str> = g["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["invalid_answer", "invalid_bundle", "verified"]);
    assert_eq!(g["input_tokens"], 2100);
    let seen = model.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "the 529 was retried");
    for (h, body) in &seen {
        assert_eq!(h["x-api-key"], "sk-test-key");
        assert_eq!(h["anthropic-version"], "2023-06-01");
        assert_eq!(body["model"], "claude-test");
        assert!(body["system"].as_str().unwrap().contains("App bundles"));
    }
    let third = user_messages(&seen, 3);
    assert!(
        third.contains("BEGIN statements are not allowed"),
        "{third}"
    );
    assert!(ok(&c, &s.url, "SELECT count(*) FROM notes").await.trim() == "0");
}

#[tokio::test(flavor = "multi_thread")]
async fn approval_and_a_failing_merge_leave_the_live_app_as_it_was() {
    let mut b = bundle(COUNT_V3);
    b["migrations"] = json!([
        {"name": "tags", "sql": "CREATE TABLE tags (id INTEGER PRIMARY KEY, name TEXT)"},
        {"name": "notes", "sql": MIGRATION}
    ]);
    let (_model, url) = start_model(vec![(200, answer(&b)), (200, answer(&b))]).await;
    let (s, _dir) = server_for(&url, &[("ICHIBASE_GENERATE_REQUIRE_APPROVAL", "true")]);
    let c = client();
    let g: Value = json_of(
        c.post(format!("{}/generate", s.url))
            .json(&json!({"intent": "notes"})),
    )
    .await;
    assert_eq!(g["status"], "awaiting_approval", "{g:#}");
    let id = g["id"].as_str().unwrap().to_string();
    let branch = g["branch"].as_str().unwrap().to_string();
    // The verified branch can be inspected with SQL; live has nothing yet.
    let r = sql_post(
        &c,
        &s.url,
        &[("branch", &branch)],
        "SELECT count(*) FROM notes",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body.trim(), "1", "the check's row is in the branch");
    let r = sql_post(&c, &s.url, &[], "SELECT count(*) FROM notes").await;
    assert_eq!(r.status, 404, "{}", r.body);

    // Meanwhile someone creates `notes` live with another shape: the merge's second migration
    // fails, and nothing of the bundle (first migration, functions, record) remains.
    ok(&c, &s.url, "CREATE TABLE notes (x TEXT)").await;
    ok(&c, &s.url, "INSERT INTO notes VALUES ('kept')").await;
    let r = c
        .post(format!("{}/generate/{id}/approve", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "{}", r.text().await.unwrap());
    let state = sql_post(
        &c,
        &s.url,
        &[("output_format_json_quote_64bit_integers", "0")],
        "SELECT (SELECT count(*) FROM sqlite_schema WHERE name = 'tags') AS tags,
                (SELECT count(*) FROM _ichibase_function_heads) AS fns,
                (SELECT count(*) FROM _ichibase_bundles) AS bundles,
                (SELECT group_concat(x) FROM notes) AS notes FORMAT JSONEachRow",
    )
    .await
    .body;
    assert_eq!(
        serde_json::from_str::<Value>(state.trim()).unwrap(),
        json!({"tags": 0, "fns": 0, "bundles": 0, "notes": "kept"})
    );
    let rec: Value = json_of(c.get(format!("{}/generate/{id}", s.url))).await;
    assert_eq!(
        rec["status"], "awaiting_approval",
        "still waiting after a failed merge"
    );

    // Fix live, approve again: merged.
    ok(&c, &s.url, "DROP TABLE notes").await;
    let r = c
        .post(format!("{}/generate/{id}/approve", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "merged");
    assert_eq!(
        ok(&c, &s.url, "SELECT count(*) FROM tags").await.trim(),
        "0"
    );
    let r = c
        .post(format!("{}/generate/{id}/approve", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);

    // Without a configured model, generate says what to set.
    let (s2, _d2) = {
        let dir = tempfile::tempdir().unwrap();
        (Server::start_in(dir.path(), &[], &[]), dir)
    };
    let r = c
        .post(format!("{}/generate", s2.url))
        .json(&json!({"intent": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let e: Value = r.json().await.unwrap();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ICHIBASE_LLM_URL")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_generates_into_a_data_dir() {
    let (model, url) = start_model(vec![
        (200, answer(&bundle(COUNT_V2))),
        (200, answer(&bundle(COUNT_V3))),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_ichibase"))
            .args(["generate", "文字数を数える", "--rounds", "2", "--data-dir"])
            .arg(&data)
            .env_remove("ICHIBASE_CONFIG")
            .env("ICHIBASE_LLM_URL", &url)
            .env("ICHIBASE_LLM_MODEL", "scripted-1")
            .current_dir(&data)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("round 1: checks_failed"), "{stderr}");
    assert!(stderr.contains("round 2: verified"), "{stderr}");
    let g: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(g["status"], "merged");
    assert_eq!(model.seen.lock().unwrap().len(), 2);
    assert!(
        model.seen.lock().unwrap()[0]
            .0
            .get("authorization")
            .is_none(),
        "no key configured, none sent"
    );
    // The server on that data dir serves the merged functions.
    let s = Server::start_in(dir.path(), &[], &[]);
    let r = client()
        .post(format!("{}/fn/count_chars", s.url))
        .json(&json!({"text": "ありがとう"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"count": 5}));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_provider_times_out_is_retried_and_reported() {
    let (model, url) = start_model(vec![(999, String::new()), (999, String::new())]).await;
    let (s, _dir) = server_for(
        &url,
        &[
            ("ICHIBASE_LLM_TIMEOUT_SECS", "0.5"),
            ("ICHIBASE_LLM_MAX_RETRIES", "1"),
        ],
    );
    let g: Value = json_of(
        client()
            .post(format!("{}/generate", s.url))
            .json(&json!({"intent": "anything"})),
    )
    .await;
    assert_eq!(g["status"], "failed", "{g:#}");
    assert_eq!(g["rounds"][0]["outcome"], "llm_error");
    let err = g["error"].as_str().unwrap();
    assert!(
        err.contains("timed out") && err.contains("after 2 attempts"),
        "{err}"
    );
    assert_eq!(model.seen.lock().unwrap().len(), 2);
    let rec: Value =
        json_of(client().get(format!("{}/generate/{}", s.url, g["id"].as_str().unwrap()))).await;
    assert_eq!(rec["status"], "failed");
    assert_eq!(rec["rounds"][0]["outcome"], "llm_error");
}
