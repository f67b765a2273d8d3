//! Durable workflows (`flow.*`, `/flows`): steps and their journal, idempotent starts, events,
//! retries, failures, cancellation, child workflows, identity (RLS) and replay determinism,
//! against the real binary.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// Poll `GET /flows/{id}` until its status is one of `want` (generous: a loaded machine).
async fn wait_status(c: &reqwest::Client, base: &str, id: &str, want: &[&str]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (s, v) = api(c, "GET", format!("{base}/flows/{id}"), None).await;
        assert_eq!(s, 200, "{v}");
        if want.contains(&v["status"].as_str().unwrap_or("")) {
            return v;
        }
        assert!(Instant::now() < deadline, "flow {id} never reached {want:?}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start(c: &reqwest::Client, base: &str, name: &str, body: Value) -> (u16, Value) {
    api(c, "POST", format!("{base}/flows/{name}"), Some(body)).await
}

async fn deploy(c: &reqwest::Client, base: &str, name: &str, src: &str) {
    let r = put_fn(c, base, name, src).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// A server with a short poll interval and back-off (and its data directory).
fn fast() -> (Server, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_in(
        tmp.path(),
        &[],
        &[
            ("ICHIBASE_FLOW__POLL_INTERVAL_MS", "50"),
            ("ICHIBASE_FLOW__RETRY_BACKOFF_MS", "20"),
            ("ICHIBASE_SIGNUP_OPEN", "true"),
        ],
    );
    (s, tmp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_are_journaled_and_replayed() {
    let (s, _dir) = fast();
    let (c, u) = (client(), s.url.clone());
    ok(&c, &u, "CREATE TABLE orders(id INTEGER PRIMARY KEY, item TEXT, flow TEXT)").await;
    ok(&c, &u, "CREATE TABLE runs(n INTEGER)").await;
    deploy(
        &c,
        &u,
        "order",
        r#"
return flow.define("order", function(ctx, input)
  -- body code outside steps runs on every run; steps run once
  db.exec("INSERT INTO runs VALUES (1)")
  local id = ctx.tx("insert", function(key)
    return db.exec("INSERT INTO orders(item, flow) VALUES ({i:String}, {f:String})", {i = input.item, f = ctx.id}).last_insert_id
  end)
  local t = ctx.now()
  local r = ctx.random()
  local key = ctx.step("notify", function(k) return {key = k, seen = ctx.idempotency_key} end)
  ctx.sleep(0.2)
  local keys = {}
  for k in pairs({zeta = 1, alpha = 2, mid = 3, [3] = 0, [1] = 0}) do keys[#keys + 1] = tostring(k) end
  return {order = id, t = t, r = r, key = key, keys = table.concat(keys, ","), rnd = math.random(1, 6)}
end)
"#,
    )
    .await;
    let (st, v) = start(&c, &u, "order", json!({"input": {"item": "book"}, "id": "order-1"})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["id"], "order-1");
    assert_eq!(v["created"], true);
    // The same id again: the same instance, nothing new.
    let (st, v) = start(&c, &u, "order", json!({"input": {"item": "other"}, "id": "order-1"})).await;
    assert_eq!((st, v["created"].clone()), (200, json!(false)), "{v}");
    let f = wait_status(&c, &u, "order-1", &["completed", "failed"]).await;
    assert_eq!(f["status"], "completed", "{f}");
    let out = &f["output"];
    assert_eq!(out["key"]["key"], "order-1:4");
    assert_eq!(out["key"]["seen"], "order-1:4");
    assert_eq!(out["keys"], "1,3,alpha,mid,zeta", "pairs() is ordered inside flows");
    assert!(out["r"].as_f64().unwrap() >= 0.0 && out["r"].as_f64().unwrap() < 1.0);
    let steps = f["steps"].as_array().unwrap();
    let kinds: Vec<&str> = steps.iter().map(|s| s["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["tx", "now", "random", "step", "sleep", "random"], "{f}");
    assert!(steps.iter().all(|s| s["status"] == "done"), "{f}");
    assert_eq!(steps[0]["attempts"], 1);
    assert!(steps[0]["trace_id"].is_string());
    // The sleep suspended the instance: it ran at least twice, but the insert happened once.
    assert!(f["runs"].as_i64().unwrap() >= 2, "{f}");
    assert_eq!(ok(&c, &u, "SELECT count(*) FROM orders").await.trim(), "1");
    let runs: i64 = ok(&c, &u, "SELECT count(*) FROM runs").await.trim().parse().unwrap();
    assert_eq!(runs, f["runs"].as_i64().unwrap());
    // The recorded values replayed: the output's now/random equal the journal's.
    assert_eq!(out["t"], steps[1]["result"]);
    assert_eq!(out["r"], steps[2]["result"]);
    // A posterity row per executed step (and one for the finished workflow).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = read(
            c.post(format!("{u}/analytics"))
                .body("SELECT count(*) FILTER (WHERE kind = 'flow_step'), count(*) FILTER (WHERE kind = 'flow') FROM log WHERE detail LIKE '%\"order-1\"%'")
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        if r.body.trim() == "2\t1" {
            break;
        }
        assert!(Instant::now() < deadline, "posterity rows: {}", r.body);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Listing.
    let (st, l) = api(&c, "GET", format!("{u}/flows?name=order"), None).await;
    assert_eq!(st, 200);
    assert_eq!(l["flows"][0]["id"], "order-1");
    assert_eq!(l["counts"]["completed"], 1);
    // Unknown workflow, bad id, bad body.
    let (st, v) = start(&c, &u, "nope", json!({})).await;
    assert_eq!(st, 404, "{v}");
    let (st, v) = start(&c, &u, "order", json!({"id": "bad id!"})).await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = start(&c, &u, "order", json!({"inptu": 1})).await;
    assert_eq!(st, 400, "{v}");
    // Starting through the function itself, and from Lua.
    let r = call_fn(&c, &u, "order", json!({"item": "pen"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    wait_status(&c, &u, &id, &["completed"]).await;
    deploy(&c, &u, "starter", r#"return function(input) return {id = flow.start("order", {item = "cup"}, {id = input.id})} end"#).await;
    let r = call_fn(&c, &u, "starter", json!({"id": "from-lua"})).await;
    assert_eq!(r.json()["id"], "from-lua", "{}", r.body);
    wait_status(&c, &u, "from-lua", &["completed"]).await;
    assert_eq!(ok(&c, &u, "SELECT count(*) FROM orders").await.trim(), "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_failures_events_cancel_children() {
    let (s, _dir) = fast();
    let (c, u) = (client(), s.url.clone());
    ok(&c, &u, "CREATE TABLE tries(n INTEGER)").await;
    deploy(
        &c,
        &u,
        "flaky",
        r#"
return flow.define("flaky", function(ctx, input)
  local n = ctx.step("flaky", function()
    db.exec("INSERT INTO tries VALUES (1)")
    local n = db.one("SELECT count(*) AS n FROM tries").n
    if n < 3 then error("not yet " .. n) end
    return n
  end, {retries = 5, backoff = 0.01})
  local ok, err = pcall(ctx.step, "doomed", function() error("always") end, {retries = 1, backoff = 0.01})
  if input.fail then error("the workflow gives up: " .. tostring(err)) end
  return {n = n, caught = err}
end)
"#,
    )
    .await;
    let (_, v) = start(&c, &u, "flaky", json!({"input": {}})).await;
    let f = wait_status(&c, &u, v["id"].as_str().unwrap(), &["completed", "failed"]).await;
    assert_eq!(f["status"], "completed", "{f}");
    assert_eq!(f["output"]["n"], 3);
    assert!(f["output"]["caught"].as_str().unwrap().contains("always"), "{f}");
    assert_eq!(f["steps"][0]["attempts"], 3);
    assert_eq!(f["steps"][1]["status"], "failed");
    assert_eq!(f["steps"][1]["attempts"], 2);
    // A failing workflow: a clear failed state with the error and the trace id.
    let (_, v) = start(&c, &u, "flaky", json!({"input": {"fail": true}})).await;
    let f = wait_status(&c, &u, v["id"].as_str().unwrap(), &["completed", "failed"]).await;
    assert_eq!(f["status"], "failed", "{f}");
    assert!(f["error"].as_str().unwrap().contains("the workflow gives up"), "{f}");
    assert!(f["trace_id"].as_str().unwrap().len() >= 16);
    assert_eq!(f["error_code"], 1010);

    // Events: buffered before the wait, delivered after it, and a timeout.
    deploy(
        &c,
        &u,
        "approve",
        r#"
return flow.define("approve", function(ctx, input)
  local a = ctx.wait_event("approved")
  local b = ctx.wait_event("second", {timeout = input.timeout})
  return {a = a, b = b}
end)
"#,
    )
    .await;
    let (_, _) = start(&c, &u, "approve", json!({"id": "ap1", "input": {"timeout": 0.3}})).await;
    wait_status(&c, &u, "ap1", &["waiting"]).await;
    let (st, v) = api(&c, "POST", format!("{u}/flows/ap1/events/approved"), Some(json!({"by": "ann"}))).await;
    assert_eq!(st, 200, "{v}");
    let f = wait_status(&c, &u, "ap1", &["completed"]).await;
    assert_eq!(f["output"]["a"]["by"], "ann");
    assert!(f["output"]["b"].is_null(), "timed out: {f}");
    // Signals from Lua, sent before the workflow waits.
    deploy(&c, &u, "signaller", r#"return function(i) return flow.signal(i.id, i.event, i.payload) end"#).await;
    start(&c, &u, "approve", json!({"id": "ap2", "input": {"timeout": 60}})).await;
    call_fn(&c, &u, "signaller", json!({"id": "ap2", "event": "second", "payload": 2})).await;
    call_fn(&c, &u, "signaller", json!({"id": "ap2", "event": "approved", "payload": 1})).await;
    let f = wait_status(&c, &u, "ap2", &["completed"]).await;
    assert_eq!(f["output"], json!({"a": 1, "b": 2}));
    let (st, _) = api(&c, "POST", format!("{u}/flows/ap2/events/late"), Some(json!(1))).await;
    assert_eq!(st, 409, "a finished flow takes no events");
    let (st, _) = api(&c, "POST", format!("{u}/flows/none/events/x"), Some(json!(1))).await;
    assert_eq!(st, 404);

    // Cancellation.
    start(&c, &u, "approve", json!({"id": "ap3", "input": {}})).await;
    wait_status(&c, &u, "ap3", &["waiting"]).await;
    let (st, v) = api(&c, "POST", format!("{u}/flows/ap3/cancel"), None).await;
    assert_eq!((st, v["cancelled"].clone()), (200, json!(true)), "{v}");
    let f = wait_status(&c, &u, "ap3", &["cancelled"]).await;
    assert_eq!(f["error_code"], 1073);
    let (_, v) = api(&c, "POST", format!("{u}/flows/ap3/cancel"), None).await;
    assert_eq!(v["cancelled"], false);

    // Child workflows: the parent waits for the child's output; a failing child raises.
    deploy(
        &c,
        &u,
        "parent",
        r#"
return flow.define("parent", function(ctx, input)
  local a = ctx.child("kid", {x = 20})
  local ok, err = pcall(ctx.child, "kid", {x = -1})
  return {a = a, err = err}
end)
"#,
    )
    .await;
    deploy(
        &c,
        &u,
        "kid",
        r#"
return flow.define("kid", function(ctx, input)
  ctx.sleep(0.05)
  if input.x < 0 then error("negative") end
  return input.x + 1
end)
"#,
    )
    .await;
    start(&c, &u, "parent", json!({"id": "p1"})).await;
    let f = wait_status(&c, &u, "p1", &["completed", "failed"]).await;
    assert_eq!(f["output"]["a"], 21, "{f}");
    assert!(f["output"]["err"].as_str().unwrap().contains("negative"), "{f}");
    let kid = wait_status(&c, &u, "p1.1", &["completed"]).await;
    assert_eq!(kid["parent_id"], "p1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_run_as_their_starter_and_stay_on_their_version() {
    let (s, _dir) = fast();
    let (c, u) = (client(), s.url.clone());
    ok(&c, &u, "CREATE TABLE notes(id INTEGER PRIMARY KEY, owner TEXT NOT NULL, body TEXT)").await;
    let r = jpost(&c, &u, "/admin/policies", json!({"name": "my_notes", "table": "notes", "roles": ["user"],
        "using": "owner = auth_userid()", "defaults": {"owner": "auth_userid()"}})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    deploy(
        &c,
        &u,
        "note",
        r#"
return flow.define("note", function(ctx, input)
  ctx.tx("write", function()
    db.exec("INSERT INTO my_notes(body) VALUES ({b:String})", {b = input.body})
  end)
  local ok, err = pcall(ctx.tx, "base", function()
    db.exec("INSERT INTO notes(owner, body) VALUES ('x', 'sneaky')")
  end, {retries = 0})
  ctx.wait_event("go")
  return {user = ctx.user_id, denied = not ok, err = err, v = 1}
end)
"#,
    )
    .await;
    let ann = signup(&u, "ann@example.com").await;
    let bob = signup(&u, "bob@example.com").await;
    let (st, v) = start(&ann.client, &u, "note", json!({"id": "ann-note", "input": {"body": "hello"}})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["version"], 1);
    wait_status(&ann.client, &u, "ann-note", &["waiting"]).await;
    // A new version while the instance waits: it finishes on version 1.
    deploy(&c, &u, "note", r#"return flow.define("note", function(ctx, input) return {v = 2} end)"#).await;
    // Bob can neither see nor steer Ann's flow.
    let (st, _) = api(&bob.client, "GET", format!("{u}/flows/ann-note"), None).await;
    assert_eq!(st, 404);
    let (st, _) = api(&bob.client, "POST", format!("{u}/flows/ann-note/events/go"), Some(json!(1))).await;
    assert_eq!(st, 404);
    let (st, _) = api(&bob.client, "POST", format!("{u}/flows/ann-note/cancel"), None).await;
    assert_eq!(st, 404);
    let (st, _) = start(&bob.client, &u, "note", json!({"id": "ann-note"})).await;
    assert_eq!(st, 409, "another user's id is taken");
    let (_, l) = api(&bob.client, "GET", format!("{u}/flows"), None).await;
    assert_eq!(l["flows"].as_array().unwrap().len(), 0, "{l}");
    let (st, _) = api(&anon_client(), "GET", format!("{u}/flows"), None).await;
    assert_eq!(st, 403);
    let (st, _) = api(&ann.client, "POST", format!("{u}/flows/ann-note/events/go"), Some(json!(1))).await;
    assert_eq!(st, 200);
    let f = wait_status(&ann.client, &u, "ann-note", &["completed", "failed"]).await;
    assert_eq!(f["status"], "completed", "{f}");
    assert_eq!(f["output"]["v"], 1, "the instance stays on the version it started with");
    assert_eq!(f["output"]["user"], ann.id.as_str());
    assert_eq!(f["output"]["denied"], true, "RLS applies inside steps: {f}");
    assert!(f["output"]["err"].as_str().unwrap().contains("not authorized"), "{f}");
    assert_eq!(ok(&c, &u, "SELECT owner FROM notes").await.trim(), ann.id);
    assert_eq!(ok(&c, &u, "SELECT count(*) FROM notes").await.trim(), "1");
    // New instances get the new version.
    let (_, v) = start(&c, &u, "note", json!({})).await;
    let f = wait_status(&c, &u, v["id"].as_str().unwrap(), &["completed"]).await;
    assert_eq!(f["output"]["v"], 2);
    assert_eq!(f["version"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_and_wrong_workflows_fail_clearly() {
    let (s, _dir) = fast();
    let (c, u) = (client(), s.url.clone());
    // Replay that takes another path than the journal: caught as nondeterminism.
    ok(&c, &u, "CREATE TABLE flip(n INTEGER)").await;
    ok(&c, &u, "INSERT INTO flip VALUES (0)").await;
    deploy(
        &c,
        &u,
        "drift",
        r#"
return flow.define("drift", function(ctx, input)
  -- reads outside a step: a different answer on the next run
  local n = db.one("SELECT n FROM flip").n
  db.exec("UPDATE flip SET n = n + 1")
  if n == 0 then ctx.step("a", function() return 1 end) else ctx.step("b", function() return 2 end) end
  ctx.sleep(0.01)
  return n
end)
"#,
    )
    .await;
    let (_, v) = start(&c, &u, "drift", json!({})).await;
    let f = wait_status(&c, &u, v["id"].as_str().unwrap(), &["completed", "failed"]).await;
    assert_eq!(f["status"], "failed", "{f}");
    assert_eq!(f["error_code"], 1071, "{f}");
    // Catching the suspension does not help: the run still suspends.
    deploy(
        &c,
        &u,
        "sneaky",
        r#"
return flow.define("sneaky", function(ctx, input)
  local ok = pcall(ctx.sleep, 0.1)
  local ok2, e2 = pcall(ctx.step, "x", function() return 1 end)
  return {ok = ok, ok2 = ok2}
end)
"#,
    )
    .await;
    let (_, v) = start(&c, &u, "sneaky", json!({})).await;
    let f = wait_status(&c, &u, v["id"].as_str().unwrap(), &["completed", "failed"]).await;
    assert_eq!(f["status"], "completed", "{f}");
    assert_eq!(f["output"], json!({"ok": true, "ok2": true}), "{f}");
    // A step past its own time limit: retried, then a failure the body can catch.
    deploy(
        &c,
        &u,
        "slow",
        r#"
return flow.define("slow", function(ctx, input)
  local ok, err = pcall(ctx.step, "spin", function() while true do end end, {timeout = 0.2, retries = 1, backoff = 0.01})
  return {ok = ok, err = err}
end)
"#,
    )
    .await;
    let (_, v) = start(&c, &u, "slow", json!({})).await;
    let f = wait_status(&c, &u, v["id"].as_str().unwrap(), &["completed", "failed"]).await;
    assert_eq!(f["status"], "completed", "{f}");
    assert_eq!(f["output"]["ok"], false, "{f}");
    assert!(f["output"]["err"].as_str().unwrap().contains("time limit"), "{f}");
    assert_eq!(f["steps"][0]["attempts"], 2, "{f}");
    assert_eq!(f["steps"][0]["status"], "failed", "{f}");
    // Limits: too many steps.
    deploy(
        &c,
        &u,
        "greedy",
        r#"
return flow.define("greedy", function(ctx, input)
  for i = 1, 100000 do ctx.now() end
end)
"#,
    )
    .await;
    let (_, v) = start(&c, &u, "greedy", json!({})).await;
    let f = wait_status(&c, &u, v["id"].as_str().unwrap(), &["completed", "failed"]).await;
    assert_eq!(f["error_code"], 1072, "{f}");
    // Not a workflow; a workflow defined under another name; ctx inside a step; bad options.
    deploy(&c, &u, "plain", "return function() return 1 end").await;
    let (_, v) = start(&c, &u, "plain", json!({})).await;
    let f = wait_status(&c, &u, v["id"].as_str().unwrap(), &["completed", "failed"]).await;
    assert!(f["error"].as_str().unwrap().contains("flow.define"), "{f}");
    deploy(&c, &u, "misnamed", r#"return flow.define("other", function() end)"#).await;
    let (_, v) = start(&c, &u, "misnamed", json!({})).await;
    let f = wait_status(&c, &u, v["id"].as_str().unwrap(), &["completed", "failed"]).await;
    assert!(f["error"].as_str().unwrap().contains("own name"), "{f}");
    deploy(
        &c,
        &u,
        "nested",
        r#"
return flow.define("nested", function(ctx, input)
  local ok, e = pcall(ctx.step, "outer", function() return ctx.now() end, {retries = 0})
  local ok2, e2 = pcall(ctx.step, "opts", function() end, {retries = -1})
  local ok3, e3 = pcall(ctx.step, "bad", function() return function() end end, {retries = 0})
  local ok4, e4 = pcall(flow.start, "nested", {})
  -- os.time and math.random inside a step are the step's business (its result is recorded)
  local v = ctx.step("inner", function() return os.time() + math.random() end)
  ctx.sleep(0.01)
  return {e = e, e2 = e2, e3 = e3, e4 = tostring(e4), v = v}
end)
"#,
    )
    .await;
    let (_, v) = start(&c, &u, "nested", json!({})).await;
    let f = wait_status(&c, &u, v["id"].as_str().unwrap(), &["completed", "failed"]).await;
    assert_eq!(f["status"], "completed", "{f}");
    let o = &f["output"];
    assert!(o["e"].as_str().unwrap().contains("inside a step"), "{f}");
    assert!(o["e2"].as_str().unwrap().contains("out of range"), "{f}");
    assert!(o["e3"].as_str().unwrap().contains("cannot be recorded"), "{f}");
    assert!(o["e4"].as_str().unwrap().contains("explicit"), "{f}");
    assert!(o["v"].as_f64().unwrap() > 1.7e9, "{f}");
    // A limit of the whole run inside a step (here the memory limit) is a failed attempt too.
    deploy(
        &c,
        &u,
        "hog",
        r#"
return flow.define("hog", function(ctx, input)
  local ok, err = pcall(ctx.step, "hog", function() local t = {} for i = 1, 1e9 do t[i] = string.rep("x", 100000) .. i end end, {retries = 1, backoff = 0.01})
  -- the body catches the limit and would finish; the attempt is still recorded and retried
  return {ok = ok, err = tostring(err)}
end)
"#,
    )
    .await;
    let (_, v) = start(&c, &u, "hog", json!({})).await;
    let f = wait_status(&c, &u, v["id"].as_str().unwrap(), &["completed", "failed"]).await;
    assert_eq!(f["status"], "completed", "{f}");
    assert!(f["output"]["err"].as_str().unwrap().contains("memory limit"), "{f}");
    assert_eq!(f["steps"][0]["attempts"], 2, "{f}");
    // Only the admin schedules.
    let ann = signup(&u, "ann@example.com").await;
    deploy(&c, &u, "sched", r#"return function(i) return flow.schedule("order", "0 7 * * *", {tz = i.tz}) end"#).await;
    let r = call_fn(&ann.client, &u, "sched", json!({"tz": "UTC"})).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = call_fn(&c, &u, "sched", json!({"tz": "Mars/Olympus"})).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = call_fn(&c, &u, "sched", json!({"tz": "Asia/Tokyo"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["next_at"].as_str().unwrap().ends_with(":00:00.000Z"), "{}", r.body);
    let (st, v) = api(&c, "GET", format!("{u}/flows/schedules"), None).await;
    assert_eq!(st, 200);
    assert_eq!(v["schedules"][0]["tz"], "Asia/Tokyo");
    let (st, _) = api(&ann.client, "GET", format!("{u}/flows/schedules"), None).await;
    assert_eq!(st, 403);
}
