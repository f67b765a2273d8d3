//! Lua services over HTTP: deploy, invoke, versions and rollback, errors with line numbers,
//! components as the caller, and the deep trace with hover.

mod common;

use common::{Resp, Server, client, client_with_token, post};
use serde_json::{Value, json};

async fn req(c: &reqwest::Client, m: reqwest::Method, url: String, body: Option<String>) -> Resp {
    let mut rb = c.request(m, url);
    if let Some(b) = body {
        rb = rb.body(b);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    Resp {
        status,
        headers,
        body: r.text().await.unwrap(),
    }
}

async fn deploy(c: &reqwest::Client, base: &str, name: &str, src: &str) -> Resp {
    req(
        c,
        reqwest::Method::PUT,
        format!("{base}/fn/{name}"),
        Some(src.to_string()),
    )
    .await
}

async fn call(c: &reqwest::Client, base: &str, name: &str, input: Value) -> Resp {
    req(
        c,
        reqwest::Method::POST,
        format!("{base}/fn/{name}"),
        Some(input.to_string()),
    )
    .await
}

#[tokio::test]
async fn deploy_invoke_versions_rollback() {
    let s = Server::start(&[]);
    let admin = client();
    let base = &s.url;
    let r = deploy(
        &admin,
        base,
        "greet",
        "return function(input) return {hello = input.name, n = #input.name} end",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["version"], 1);
    let r = call(&admin, base, "greet", json!({"name": "世界"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"hello": "世界", "n": 6}));
    assert_eq!(r.header("x-ichibase-function-version"), Some("1"));
    assert!(r.header("x-ichibase-trace-id").is_some());
    // The `handler` global form, a second version.
    let r = deploy(
        &admin,
        base,
        "greet",
        "function handler(input, ctx) return 'v2 ' .. input.name .. ' as ' .. ctx.role end",
    )
    .await;
    assert_eq!(r.json()["version"], 2);
    assert_eq!(
        call(&admin, base, "greet", json!({"name": "x"}))
            .await
            .json(),
        json!("v2 x as admin")
    );
    let r = req(&admin, reqwest::Method::GET, format!("{base}/fn"), None).await;
    assert_eq!(r.json()["functions"][0]["name"], "greet");
    assert_eq!(r.json()["functions"][0]["versions"], 2);
    let r = req(
        &admin,
        reqwest::Method::GET,
        format!("{base}/fn/greet?version=1"),
        None,
    )
    .await;
    assert!(r.json()["source"].as_str().unwrap().contains("hello"));
    assert_eq!(r.json()["live"], false);
    let r = req(
        &admin,
        reqwest::Method::GET,
        format!("{base}/fn/greet/versions"),
        None,
    )
    .await;
    assert_eq!(r.json()["versions"].as_array().unwrap().len(), 2);
    // Roll back to the previous version, then forward again by number.
    let r = req(
        &admin,
        reqwest::Method::POST,
        format!("{base}/fn/greet/rollback"),
        None,
    )
    .await;
    assert_eq!(r.json()["version"], 1, "{}", r.body);
    assert_eq!(
        call(&admin, base, "greet", json!({"name": "ab"}))
            .await
            .json(),
        json!({"hello": "ab", "n": 2})
    );
    let r = req(
        &admin,
        reqwest::Method::POST,
        format!("{base}/fn/greet/rollback"),
        Some("{\"version\": 2}".into()),
    )
    .await;
    assert_eq!(r.json()["version"], 2);
    let r = req(
        &admin,
        reqwest::Method::POST,
        format!("{base}/fn/greet/rollback"),
        Some("{\"version\": 9}".into()),
    )
    .await;
    assert_eq!(r.status, 404);
    // Delete.
    assert_eq!(
        req(
            &admin,
            reqwest::Method::DELETE,
            format!("{base}/fn/greet"),
            None
        )
        .await
        .status,
        200
    );
    assert_eq!(call(&admin, base, "greet", json!({})).await.status, 404);
    // Bad names, bad bodies.
    assert_eq!(
        deploy(&admin, base, "bad name", "return function() end")
            .await
            .status,
        400
    );
    assert_eq!(
        deploy(&admin, base, "bad%20name", "return function() end")
            .await
            .status,
        400
    );
    let r = deploy(&admin, base, "nofn", "return 42").await;
    assert_eq!(r.status, 200);
    let r = call(&admin, base, "nofn", json!(null)).await;
    assert_eq!(r.status, 422);
    assert!(r.body.contains("must return a function"), "{}", r.body);
    deploy(&admin, base, "echo", "return function(x) return x end").await;
    let r = req(
        &admin,
        reqwest::Method::POST,
        format!("{base}/fn/echo"),
        Some("{not json".into()),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        call(&admin, base, "echo", json!([1, "a", {"b": [true]}]))
            .await
            .json(),
        json!([1, "a", {"b": [true]}])
    );
    let r = req(
        &admin,
        reqwest::Method::POST,
        format!("{base}/fn/echo"),
        None,
    )
    .await;
    assert_eq!(
        r.body.trim(),
        "null",
        "an empty body is nil, answered as JSON null"
    );
    // Fresh globals on every call.
    deploy(
        &admin,
        base,
        "counter",
        "return function() counter_g = (counter_g or 0) + 1 return counter_g end",
    )
    .await;
    for _ in 0..3 {
        assert_eq!(
            call(&admin, base, "counter", json!(null)).await.json(),
            json!(1)
        );
    }
}

#[tokio::test]
async fn errors_carry_message_line_and_trace_id() {
    let s = Server::start(&[]);
    let admin = client();
    let base = &s.url;
    let r = deploy(
        &admin,
        base,
        "syntax",
        "return function(x)\n  local y = \nend\n",
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let j = r.json();
    assert_eq!(j["error"]["name"], "SYNTAX_ERROR");
    assert_eq!(j["error"]["line"], 3);
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("near 'end'")
    );
    assert_eq!(
        call(&admin, base, "syntax", json!(null)).await.status,
        404,
        "a failed deploy stores nothing"
    );
    deploy(&admin, base, "boom", "local function inner(t)\n  return t.missing.field\nend\nreturn function(x)\n  return inner(x)\nend\n").await;
    let r = call(&admin, base, "boom", json!({})).await;
    assert_eq!(r.status, 422, "{}", r.body);
    let j = r.json();
    assert_eq!(j["error"]["name"], "LUA_ERROR");
    assert_eq!(j["error"]["line"], 2);
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("attempt to index a nil value"),
        "{}",
        r.body
    );
    assert_eq!(
        j["error"]["trace_id"].as_str(),
        r.header("x-ichibase-trace-id")
    );
    deploy(
        &admin,
        base,
        "raise",
        "return function()\n  error('custom failure')\nend",
    )
    .await;
    let j = call(&admin, base, "raise", json!(null)).await.json();
    assert_eq!(
        (j["error"]["line"].clone(), j["error"]["message"].clone()),
        (json!(2), json!("custom failure"))
    );
    // SQL errors from db keep their code.
    deploy(
        &admin,
        base,
        "sqlerr",
        "return function()\n\n  return db.query('SELECT * FROM nope')\nend",
    )
    .await;
    let r = call(&admin, base, "sqlerr", json!(null)).await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.json()["error"]["name"], "UNKNOWN_TABLE");
    assert_eq!(r.json()["error"]["line"], 3);
    deploy(
        &admin,
        base,
        "nojson",
        "return function() return function() end end",
    )
    .await;
    let r = call(&admin, base, "nojson", json!(null)).await;
    assert_eq!(r.status, 422);
    assert!(r.body.contains("cannot be encoded as JSON"), "{}", r.body);
}

#[tokio::test]
async fn components_run_as_the_caller() {
    let s = Server::start(&["--signup-open", "true"]);
    let admin = client();
    let base = &s.url;
    let r = post(
        &admin,
        base,
        &[],
        "CREATE TABLE notes(id INTEGER PRIMARY KEY, owner TEXT NOT NULL, body TEXT NOT NULL)",
    )
    .await;
    assert_eq!(r.status, 200);
    let r = admin.post(format!("{base}/admin/policies")).json(&json!({"name": "my_notes", "table": "notes", "roles": ["user"], "using": "owner = auth_userid()", "defaults": {"owner": "auth_userid()"}})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let src = r#"
return function(input, ctx)
  if input.add then
    db.exec("INSERT INTO my_notes(body) VALUES ({b:String})", {b = input.add})
  end
  local mine = db.query("SELECT body FROM my_notes ORDER BY id")
  local me = db.one("SELECT auth_userid() AS u, auth_role() AS r")
  log.info("listed", {count = #mine})
  return {me = me.u, role = me.r, ctx_user = ctx.user_id, notes = mine, json = json.decode(json.encode({a = {1, 2}}))}
end"#;
    assert_eq!(deploy(&admin, base, "notes", src).await.status, 200);
    let mut users = Vec::new();
    for email in ["a@example.com", "b@example.com"] {
        let j = common::signup_and_signin(base, email, "long password").await;
        users.push((
            j["user"]["id"].as_str().unwrap().to_string(),
            client_with_token(j["access_token"].as_str().unwrap()),
        ));
    }
    let (a_id, a) = &users[0];
    let (b_id, b) = &users[1];
    call(a, base, "notes", json!({"add": "from a"})).await;
    let r = call(b, base, "notes", json!({"add": "from b"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["me"].as_str(), Some(b_id.as_str()));
    assert_eq!(j["ctx_user"].as_str(), Some(b_id.as_str()));
    assert_eq!(j["role"], "user");
    assert_eq!(j["notes"], json!([{"body": "from b"}]));
    assert_eq!(j["json"], json!({"a": [1, 2]}));
    assert_eq!(
        call(a, base, "notes", json!({})).await.json()["notes"],
        json!([{"body": "from a"}])
    );
    assert_eq!(
        call(a, base, "notes", json!({})).await.json()["me"].as_str(),
        Some(a_id.as_str())
    );
    // Users may invoke, not deploy.
    assert_eq!(
        deploy(a, base, "mine", "return function() end")
            .await
            .status,
        403
    );
    assert_eq!(
        req(a, reqwest::Method::GET, format!("{base}/fn/notes"), None)
            .await
            .status,
        403
    );
    // The base table stays out of reach from Lua too.
    deploy(
        &admin,
        base,
        "steal",
        "return function() return db.query('SELECT * FROM notes') end",
    )
    .await;
    let r = call(a, base, "steal", json!(null)).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["error"]["name"], "ACCESS_DENIED");
    // db.tx: commit on return, rollback on error.
    let tx = r#"
return function(input)
  local ok, err = pcall(db.tx, function()
    db.exec("INSERT INTO my_notes(body) VALUES ('in tx')")
    if input.fail then error("abort") end
  end)
  return {ok = ok, count = db.one("SELECT count(*) AS n FROM my_notes").n}
end"#;
    deploy(&admin, base, "tx", tx).await;
    let r = call(a, base, "tx", json!({"fail": true})).await;
    assert_eq!(r.json(), json!({"ok": false, "count": 1}), "{}", r.body);
    let r = call(a, base, "tx", json!({"fail": false})).await;
    assert_eq!(r.json(), json!({"ok": true, "count": 2}), "{}", r.body);
    // db.migrate is the admin's.
    deploy(
        &admin,
        base,
        "mig",
        "return function() db.migrate('CREATE TABLE m1(x); CREATE TABLE m2(y)') return 'ok' end",
    )
    .await;
    assert_eq!(call(a, base, "mig", json!(null)).await.status, 403);
    assert_eq!(
        call(&admin, base, "mig", json!(null)).await.json(),
        json!("ok")
    );
    assert_eq!(
        post(
            &admin,
            base,
            &[],
            "SELECT count(*) FROM sqlite_schema WHERE name IN ('m1', 'm2')"
        )
        .await
        .body,
        "2\n"
    );
}

const TRACED: &str = r#"local function square(v)
  local r = v * v
  return r
end

return function(input)
  local acc = {}
  local sum = 0
  for i = 1, input.n do
    local sq = square(i)
    sum = sum + sq
    acc[#acc + 1] = {i = i, sq = sq}
  end
  local cyc = {}
  cyc.self = cyc
  log.info("summed", {sum = sum})
  debug.checkpoint("sum", sum)
  return {sum = sum, items = #acc}
end
"#;

#[tokio::test]
async fn deep_trace_and_hover() {
    let s = Server::start(&["--signup-open", "true"]);
    let admin = client();
    let base = &s.url;
    deploy(&admin, base, "squares", TRACED).await;
    // Untraced calls record nothing.
    let r = call(&admin, base, "squares", json!({"n": 3})).await;
    assert_eq!(r.json(), json!({"sum": 14, "items": 3}));
    assert!(r.header("x-ichibase-trace").is_none());
    let id = r.header("x-ichibase-trace-id").unwrap().to_string();
    assert_eq!(
        req(
            &admin,
            reqwest::Method::GET,
            format!("{base}/trace/{id}"),
            None
        )
        .await
        .status,
        404
    );
    // Traced call.
    let r = req(
        &admin,
        reqwest::Method::POST,
        format!("{base}/fn/squares?trace=1"),
        Some(json!({"n": 3}).to_string()),
    )
    .await;
    assert_eq!(r.json(), json!({"sum": 14, "items": 3}));
    let path = r.header("x-ichibase-trace").unwrap().to_string();
    let t = req(&admin, reqwest::Method::GET, format!("{base}{path}"), None)
        .await
        .json();
    assert_eq!(t["trace"]["outcome"], "ok");
    assert_eq!(t["trace"]["result"], json!({"sum": 14, "items": 3}));
    assert_eq!(t["trace"]["logs"][0]["message"], "summed");
    let steps = t["steps"].as_array().unwrap();
    assert!(steps.len() > 20, "{}", steps.len());
    // Every line of the loop body ran three times; the nested function ran deeper.
    assert_eq!(
        steps
            .iter()
            .filter(|s| s["line"] == 11 && s["function"] != "checkpoint")
            .count(),
        3
    );
    let inner: Vec<&Value> = steps.iter().filter(|s| s["function"] == "square").collect();
    assert_eq!(inner.len(), 6, "two lines per call of square");
    assert!(
        inner
            .iter()
            .all(|s| s["depth"].as_i64() > steps[0]["depth"].as_i64())
    );
    // Values after the line ran: `local r = v * v` for v = 3 shows r = 9.
    let r9 = inner
        .iter()
        .find(|s| s["line"] == 2 && s["locals"]["v"] == 3)
        .unwrap();
    assert_eq!(r9["locals"]["r"], 9);
    assert_eq!(r9["after"], true);
    // Tables serialised; cycles marked; upvalues seen.
    let last_acc = steps
        .iter()
        .rev()
        .find(|s| s["locals"]["acc"].is_array())
        .unwrap();
    assert_eq!(last_acc["locals"]["acc"][2], json!({"i": 3, "sq": 9}));
    let cyc = steps
        .iter()
        .find(|s| s["locals"]["cyc"]["self"].is_string())
        .unwrap();
    assert_eq!(cyc["locals"]["cyc"]["self"], "<cycle>");
    assert!(
        steps
            .iter()
            .any(|s| s["upvalues"]["square"] == "<function>")
    );
    assert!(
        steps
            .iter()
            .any(|s| s["function"] == "checkpoint" && s["locals"]["sum"] == 14)
    );
    // Hover: history of `sum` and its value at one step.
    let h = req(
        &admin,
        reqwest::Method::GET,
        format!("{base}{path}/hover?name=sum"),
        None,
    )
    .await
    .json();
    let values: Vec<i64> = h["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["function"] != "checkpoint")
        .map(|x| x["value"].as_i64().unwrap())
        .collect();
    assert_eq!(values, vec![0, 1, 5, 14]);
    let step = h["history"][2]["step"].as_i64().unwrap();
    let v = req(
        &admin,
        reqwest::Method::GET,
        format!("{base}{path}/hover?name=sum&step={step}"),
        None,
    )
    .await
    .json();
    assert_eq!(
        (v["value"].clone(), v["scope"].clone(), v["defined"].clone()),
        (json!(5), json!("local"), json!(true))
    );
    let v = req(
        &admin,
        reqwest::Method::GET,
        format!("{base}{path}/hover?name=nothing&step={step}"),
        None,
    )
    .await
    .json();
    assert_eq!(v["defined"], false);
    assert_eq!(
        req(
            &admin,
            reqwest::Method::GET,
            format!("{base}{path}/hover?name=sum&step=99999"),
            None
        )
        .await
        .status,
        404
    );
    // A failing traced call records the steps up to the error.
    deploy(
        &admin,
        base,
        "fails",
        "return function()\n  local a = 1\n  local b = a + 1\n  error('stop at ' .. b)\nend",
    )
    .await;
    let r = req(
        &admin,
        reqwest::Method::POST,
        format!("{base}/fn/fails?trace=1"),
        None,
    )
    .await;
    assert_eq!(r.status, 422);
    let t = req(
        &admin,
        reqwest::Method::GET,
        format!("{base}{}", r.header("x-ichibase-trace").unwrap()),
        None,
    )
    .await
    .json();
    assert_eq!(t["trace"]["outcome"], "error");
    assert_eq!(t["trace"]["error_line"], 4);
    assert!(
        t["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["locals"]["b"] == 2)
    );
    // Per-function tracing, and who may read a trace.
    deploy(
        &admin,
        base,
        "always",
        "return function(x) local y = x return y end",
    )
    .await;
    let r = req(
        &admin,
        reqwest::Method::PUT,
        format!("{base}/fn/always?trace=1"),
        Some("return function(x) local y = x return y end".into()),
    )
    .await;
    assert_eq!(r.json()["trace"], true);
    let signup = common::signup_and_signin(base, "u@example.com", "long password").await;
    let user = client_with_token(signup["access_token"].as_str().unwrap());
    let r = call(&user, base, "always", json!(7)).await;
    let tpath = r
        .header("x-ichibase-trace")
        .expect("traced by the function's flag")
        .to_string();
    assert_eq!(
        req(&user, reqwest::Method::GET, format!("{base}{tpath}"), None)
            .await
            .status,
        200,
        "the caller sees their own trace"
    );
    let other = common::signup_and_signin(base, "v@example.com", "long password").await;
    let other = client_with_token(other["access_token"].as_str().unwrap());
    assert_eq!(
        req(&other, reqwest::Method::GET, format!("{base}{tpath}"), None)
            .await
            .status,
        404,
        "others do not"
    );
    assert_eq!(
        req(&admin, reqwest::Method::GET, format!("{base}{tpath}"), None)
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn cli_deploys_functions() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = dir.path().join("hello.lua");
    std::fs::write(&file, "return function(x) return 'hi ' .. x.name end").unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ichibase"))
            .arg("fn")
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap()
    };
    let out = run(&["deploy", "hello", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("version 1"));
    std::fs::write(&file, "return function(x)\n  return 'broken' ..\nend").unwrap();
    let out = run(&["deploy", "hello", file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("hello.lua:3"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&file, "return function(x) return 'v2' end").unwrap();
    assert!(
        run(&["deploy", "hello", file.to_str().unwrap()])
            .status
            .success()
    );
    assert!(String::from_utf8_lossy(&run(&["list"]).stdout).contains("hello\tversion 2"));
    let out = run(&["rollback", "hello"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("version 1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = Server::start_in(&data, &[], &[]);
    assert_eq!(
        call(&client(), &s.url, "hello", json!({"name": "cli"}))
            .await
            .json(),
        json!("hi cli")
    );
}
