//! Lua services over HTTP: deploy, invoke, versions and rollback, errors with line numbers,
//! components as the caller, and the deep trace with hover.

mod common;

use common::{
    Resp, Server, anon_client, call_fn, client, client_with_token, post, put_fn, read, request,
};
use serde_json::{Value, json};

#[tokio::test]
async fn deploy_invoke_versions_rollback() {
    let s = Server::start(&[]);
    let admin = client();
    let base = &s.url;
    let r = put_fn(
        &admin,
        base,
        "greet",
        "return function(input) return {hello = input.name, n = #input.name} end",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["version"], 1);
    let r = call_fn(&admin, base, "greet", json!({"name": "世界"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"hello": "世界", "n": 6}));
    assert_eq!(r.header("x-ichibase-function-version"), Some("1"));
    assert!(r.header("x-ichibase-trace-id").is_some());
    // The `handler` global form, a second version.
    let r = put_fn(
        &admin,
        base,
        "greet",
        "function handler(input, ctx) return 'v2 ' .. input.name .. ' as ' .. ctx.role end",
    )
    .await;
    assert_eq!(r.json()["version"], 2);
    assert_eq!(
        call_fn(&admin, base, "greet", json!({"name": "x"}))
            .await
            .json(),
        json!("v2 x as admin")
    );
    let r = request(&admin, reqwest::Method::GET, format!("{base}/fn"), None).await;
    assert_eq!(r.json()["functions"][0]["name"], "greet");
    assert_eq!(r.json()["functions"][0]["versions"], 2);
    let r = request(
        &admin,
        reqwest::Method::GET,
        format!("{base}/fn/greet?version=1"),
        None,
    )
    .await;
    assert!(r.json()["source"].as_str().unwrap().contains("hello"));
    assert_eq!(r.json()["live"], false);
    let r = request(
        &admin,
        reqwest::Method::GET,
        format!("{base}/fn/greet/versions"),
        None,
    )
    .await;
    assert_eq!(r.json()["versions"].as_array().unwrap().len(), 2);
    // Roll back to the previous version, then forward again by number.
    let r = request(
        &admin,
        reqwest::Method::POST,
        format!("{base}/fn/greet/rollback"),
        None,
    )
    .await;
    assert_eq!(r.json()["version"], 1, "{}", r.body);
    assert_eq!(
        call_fn(&admin, base, "greet", json!({"name": "ab"}))
            .await
            .json(),
        json!({"hello": "ab", "n": 2})
    );
    let r = request(
        &admin,
        reqwest::Method::POST,
        format!("{base}/fn/greet/rollback"),
        Some("{\"version\": 2}".into()),
    )
    .await;
    assert_eq!(r.json()["version"], 2);
    let r = request(
        &admin,
        reqwest::Method::POST,
        format!("{base}/fn/greet/rollback"),
        Some("{\"version\": 9}".into()),
    )
    .await;
    assert_eq!(r.status, 404);
    // Delete.
    assert_eq!(
        request(
            &admin,
            reqwest::Method::DELETE,
            format!("{base}/fn/greet"),
            None
        )
        .await
        .status,
        200
    );
    assert_eq!(call_fn(&admin, base, "greet", json!({})).await.status, 404);
    // Bad names, bad bodies.
    assert_eq!(
        put_fn(&admin, base, "bad name", "return function() end")
            .await
            .status,
        400
    );
    assert_eq!(
        put_fn(&admin, base, "bad%20name", "return function() end")
            .await
            .status,
        400
    );
    // A chunk that returns no function is refused at deploy (issue 14), not at its first call.
    let r = put_fn(&admin, base, "nofn", "return 42").await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("must return a function"), "{}", r.body);
    put_fn(&admin, base, "echo", "return function(x) return x end").await;
    let r = request(
        &admin,
        reqwest::Method::POST,
        format!("{base}/fn/echo"),
        Some("{not json".into()),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        call_fn(&admin, base, "echo", json!([1, "a", {"b": [true]}]))
            .await
            .json(),
        json!([1, "a", {"b": [true]}])
    );
    let r = request(
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
    put_fn(
        &admin,
        base,
        "counter",
        "return function() counter_g = (counter_g or 0) + 1 return counter_g end",
    )
    .await;
    for _ in 0..3 {
        assert_eq!(
            call_fn(&admin, base, "counter", json!(null)).await.json(),
            json!(1)
        );
    }
}

#[tokio::test]
async fn errors_carry_message_line_and_trace_id() {
    let s = Server::start(&[]);
    let admin = client();
    let base = &s.url;
    let r = put_fn(
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
        call_fn(&admin, base, "syntax", json!(null)).await.status,
        404,
        "a failed deploy stores nothing"
    );
    put_fn(&admin, base, "boom", "local function inner(t)\n  return t.missing.field\nend\nreturn function(x)\n  return inner(x)\nend\n").await;
    let r = call_fn(&admin, base, "boom", json!({})).await;
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
    put_fn(
        &admin,
        base,
        "raise",
        "return function()\n  error('custom failure')\nend",
    )
    .await;
    let j = call_fn(&admin, base, "raise", json!(null)).await.json();
    assert_eq!(
        (j["error"]["line"].clone(), j["error"]["message"].clone()),
        (json!(2), json!("custom failure"))
    );
    // SQL errors from db keep their code.
    put_fn(
        &admin,
        base,
        "sqlerr",
        "return function()\n\n  return db.query('SELECT * FROM nope')\nend",
    )
    .await;
    let r = call_fn(&admin, base, "sqlerr", json!(null)).await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.json()["error"]["name"], "UNKNOWN_TABLE");
    assert_eq!(r.json()["error"]["line"], 3);
    put_fn(
        &admin,
        base,
        "nojson",
        "return function() return function() end end",
    )
    .await;
    let r = call_fn(&admin, base, "nojson", json!(null)).await;
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
    assert_eq!(put_fn(&admin, base, "notes", src).await.status, 200);
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
    call_fn(a, base, "notes", json!({"add": "from a"})).await;
    let r = call_fn(b, base, "notes", json!({"add": "from b"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["me"].as_str(), Some(b_id.as_str()));
    assert_eq!(j["ctx_user"].as_str(), Some(b_id.as_str()));
    assert_eq!(j["role"], "user");
    assert_eq!(j["notes"], json!([{"body": "from b"}]));
    assert_eq!(j["json"], json!({"a": [1, 2]}));
    assert_eq!(
        call_fn(a, base, "notes", json!({})).await.json()["notes"],
        json!([{"body": "from a"}])
    );
    assert_eq!(
        call_fn(a, base, "notes", json!({})).await.json()["me"].as_str(),
        Some(a_id.as_str())
    );
    // Users may invoke, not deploy.
    assert_eq!(
        put_fn(a, base, "mine", "return function() end")
            .await
            .status,
        403
    );
    assert_eq!(
        request(a, reqwest::Method::GET, format!("{base}/fn/notes"), None)
            .await
            .status,
        403
    );
    // The base table stays out of reach from Lua too.
    put_fn(
        &admin,
        base,
        "steal",
        "return function() return db.query('SELECT * FROM notes') end",
    )
    .await;
    let r = call_fn(a, base, "steal", json!(null)).await;
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
    put_fn(&admin, base, "tx", tx).await;
    let r = call_fn(a, base, "tx", json!({"fail": true})).await;
    assert_eq!(r.json(), json!({"ok": false, "count": 1}), "{}", r.body);
    let r = call_fn(a, base, "tx", json!({"fail": false})).await;
    assert_eq!(r.json(), json!({"ok": true, "count": 2}), "{}", r.body);
    // db.migrate is the admin's.
    put_fn(
        &admin,
        base,
        "mig",
        "return function() db.migrate('CREATE TABLE m1(x); CREATE TABLE m2(y)') return 'ok' end",
    )
    .await;
    assert_eq!(call_fn(a, base, "mig", json!(null)).await.status, 403);
    assert_eq!(
        call_fn(&admin, base, "mig", json!(null)).await.json(),
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
    put_fn(&admin, base, "squares", TRACED).await;
    // Untraced calls record nothing.
    let r = call_fn(&admin, base, "squares", json!({"n": 3})).await;
    assert_eq!(r.json(), json!({"sum": 14, "items": 3}));
    assert!(r.header("x-ichibase-trace").is_none());
    let id = r.header("x-ichibase-trace-id").unwrap().to_string();
    assert_eq!(
        request(
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
    let r = request(
        &admin,
        reqwest::Method::POST,
        format!("{base}/fn/squares?trace=1"),
        Some(json!({"n": 3}).to_string()),
    )
    .await;
    assert_eq!(r.json(), json!({"sum": 14, "items": 3}));
    let path = r.header("x-ichibase-trace").unwrap().to_string();
    let t = request(&admin, reqwest::Method::GET, format!("{base}{path}"), None)
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
    let h = request(
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
    let v = request(
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
    let v = request(
        &admin,
        reqwest::Method::GET,
        format!("{base}{path}/hover?name=nothing&step={step}"),
        None,
    )
    .await
    .json();
    assert_eq!(v["defined"], false);
    assert_eq!(
        request(
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
    put_fn(
        &admin,
        base,
        "fails",
        "return function()\n  local a = 1\n  local b = a + 1\n  error('stop at ' .. b)\nend",
    )
    .await;
    let r = request(
        &admin,
        reqwest::Method::POST,
        format!("{base}/fn/fails?trace=1"),
        None,
    )
    .await;
    assert_eq!(r.status, 422);
    let t = request(
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
    put_fn(
        &admin,
        base,
        "always",
        "return function(x) local y = x return y end",
    )
    .await;
    let r = request(
        &admin,
        reqwest::Method::PUT,
        format!("{base}/fn/always?trace=1"),
        Some("return function(x) local y = x return y end".into()),
    )
    .await;
    assert_eq!(r.json()["trace"], true);
    let signup = common::signup_and_signin(base, "u@example.com", "long password").await;
    let user = client_with_token(signup["access_token"].as_str().unwrap());
    let r = call_fn(&user, base, "always", json!(7)).await;
    let tpath = r
        .header("x-ichibase-trace")
        .expect("traced by the function's flag")
        .to_string();
    // Changed (issue 12): a trace holds the function's locals and upvalues, so a caller who
    // may not trace the function does not read the trace the function's flag recorded.
    assert_eq!(
        request(&user, reqwest::Method::GET, format!("{base}{tpath}"), None)
            .await
            .status,
        404,
        "the caller does not see a trace they could not have asked for"
    );
    let other = common::signup_and_signin(base, "v@example.com", "long password").await;
    let other = client_with_token(other["access_token"].as_str().unwrap());
    assert_eq!(
        request(&other, reqwest::Method::GET, format!("{base}{tpath}"), None)
            .await
            .status,
        404,
        "others do not"
    );
    assert_eq!(
        request(&admin, reqwest::Method::GET, format!("{base}{tpath}"), None)
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
        call_fn(&client(), &s.url, "hello", json!({"name": "cli"}))
            .await
            .json(),
        json!("hi cli")
    );
}

/// Calls use a cached copy of the live version only while nothing was committed since it was
/// read: a deploy by `ichibase fn` from another process, a rollback, an HTTP deploy, a delete
/// and a write to an app table each reach the very next call, inline or not.
#[tokio::test]
async fn cached_function_versions_follow_every_change_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    for budget in ["1000", "0"] {
        let s = Server::start_in(&data, &[], &[("ICHIBASE_LUA_LIMITS__INLINE_BUDGET_US", budget)]);
        let (c, base) = (client(), s.url.clone());
        let name = format!("cached_{budget}");
        let calls = |want: &'static str, version: &'static str| {
            let (c, base, name) = (c.clone(), base.clone(), name.clone());
            async move {
                // Several calls: the first may fill the cache, the others use it.
                for i in 0..4 {
                    let r = call_fn(&c, &base, &name, json!({})).await;
                    assert_eq!(r.status, 200, "budget {budget}, call {i}: {}", r.body);
                    assert_eq!(r.json(), json!(want), "budget {budget}, call {i}");
                    assert_eq!(r.header("x-ichibase-function-version"), Some(version), "budget {budget}, call {i}");
                }
            }
        };
        assert_eq!(put_fn(&c, &base, &name, "return function() return 'http 1' end").await.status, 200);
        calls("http 1", "1").await;
        let file = dir.path().join("cached.lua");
        std::fs::write(&file, "return function() return 'cli 2' end").unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ichibase"))
            .args(["fn", "deploy", &name])
            .arg(&file)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        calls("cli 2", "2").await;
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ichibase"))
            .args(["fn", "rollback", &name, "--data-dir"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        calls("http 1", "1").await;
        assert_eq!(put_fn(&c, &base, &name, "return function() return 'http 3' end").await.status, 200);
        calls("http 3", "3").await;
        // A write elsewhere: the next call reads again and finds the same version.
        let r = post(&c, &base, &[], "CREATE TABLE IF NOT EXISTS unrelated(x)").await;
        assert_eq!(r.status, 200, "{}", r.body);
        calls("http 3", "3").await;
        let r = request(&c, reqwest::Method::POST, format!("{base}/fn/{name}/rollback"), None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        // Back from version 3 to the one before it.
        calls("cli 2", "2").await;
        let r = request(&c, reqwest::Method::DELETE, format!("{base}/fn/{name}"), None).await;
        assert!(r.status == 200 || r.status == 204, "{}", r.body);
        for _ in 0..3 {
            assert_eq!(call_fn(&c, &base, &name, json!({})).await.status, 404);
        }
        drop(s);
    }
}

// --- Security (issue 12): traces, db.tx time limit, memory budget ----------------------------

/// Sign up `email` (then sign in) and return a client carrying its access token.
async fn user(base: &str, email: &str) -> reqwest::Client {
    common::signup_with(base, email, "a long enough password 42").await.client
}

async fn get_url(c: &reqwest::Client, url: String) -> Resp {
    request(c, reqwest::Method::GET, url, None).await
}

/// POST /fn/{name}{suffix} with extra headers.
async fn call_with(
    c: &reqwest::Client,
    base: &str,
    name: &str,
    suffix: &str,
    headers: &[(&str, &str)],
) -> Resp {
    let mut rb = c.post(format!("{base}/fn/{name}{suffix}")).body("{}");
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    read(rb.send().await.unwrap()).await
}

const SECRET_FN: &str = r#"local API_KEY = "sk-live-very-secret"
return function(input)
  local token = API_KEY .. "-derived"
  return {ok = #token}
end"#;

#[tokio::test]
async fn traces_only_for_admin_owner_or_debug_roles() {
    let s = Server::start(&["--signup-open", "true"]);
    let (admin, anon, base) = (client(), anon_client(), s.url.clone());
    let alice = user(&base, "alice@example.com").await;
    let bob = user(&base, "bob@example.com").await;
    assert_eq!(put_fn(&admin, &base, "secret", SECRET_FN).await.status, 200);
    // Every way a non-admin could ask for a trace: refused before anything runs, nothing kept.
    let asks: &[(&str, &[(&str, &str)])] = &[
        ("?trace=1", &[]),
        ("?trace=true", &[]),
        ("?trace=TRUE", &[]),
        ("?trace=True&x=1", &[]),
        ("?trace=1", &[("x-ichibase-trace", "1")]),
    ];
    for (who, c) in [("anon", &anon), ("alice", &alice)] {
        for (suffix, headers) in asks {
            let r = call_with(c, &base, "secret", suffix, headers).await;
            assert_eq!(r.status, 403, "{who} {suffix}: {}", r.body);
            assert_eq!(r.json()["error"]["name"], "ACCESS_DENIED", "{who} {suffix}");
            assert!(r.header("x-ichibase-trace").is_none(), "{who} {suffix}");
            assert!(!r.body.contains("sk-live"), "{who} {suffix}: {}", r.body);
        }
        // Headers or other spellings are not a way in: the call runs untraced.
        for (suffix, headers) in [
            ("", &[("x-ichibase-trace", "1")][..]),
            ("?debug=1", &[][..]),
            ("?trace=yes", &[][..]),
            ("?tracing=1", &[][..]),
        ] {
            let r = call_with(c, &base, "secret", suffix, headers).await;
            assert_eq!(r.status, 200, "{who} {suffix}: {}", r.body);
            assert!(r.header("x-ichibase-trace").is_none(), "{who} {suffix}");
            let id = r.header("x-ichibase-trace-id").unwrap();
            assert_eq!(get_url(&admin, format!("{base}/trace/{id}")).await.status, 404, "{who} {suffix}: nothing stored");
        }
    }
    // The admin may trace; nobody else reads the trace or hovers over its secrets.
    let r = call_with(&admin, &base, "secret", "?trace=1", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.header("x-ichibase-trace-id").unwrap().to_string();
    let t = get_url(&admin, format!("{base}/trace/{id}")).await;
    assert_eq!(t.status, 200);
    assert!(t.body.contains("sk-live-very-secret"), "the admin sees the upvalue");
    for (who, c) in [("anon", &anon), ("alice", &alice), ("bob", &bob)] {
        for path in [
            format!("/trace/{id}"),
            format!("/trace/{id}/hover?name=API_KEY"),
            format!("/trace/{id}/hover?name=token&step=1"),
            format!("/trace/{id}/hover?name=API_KEY&step=0"),
        ] {
            let r = get_url(c, format!("{base}{path}")).await;
            assert_eq!(r.status, 404, "{who} {path}: {}", r.body);
            assert!(!r.body.contains("sk-live"), "{who} {path}");
        }
    }
    // A function the admin traces on every call: a user's call is traced for the admin, and
    // the caller does not read it (it holds the function's upvalues).
    let r = request(&admin, reqwest::Method::PUT, format!("{base}/fn/secret?trace=1"), Some(SECRET_FN.into())).await;
    assert_eq!(r.json()["trace"], true);
    let r = call_fn(&alice, &base, "secret", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let tpath = r.header("x-ichibase-trace").expect("traced by the function's flag").to_string();
    for (who, c) in [("anon", &anon), ("alice", &alice), ("bob", &bob)] {
        assert_eq!(get_url(c, format!("{base}{tpath}")).await.status, 404, "{who}");
        assert_eq!(get_url(c, format!("{base}{tpath}/hover?name=API_KEY")).await.status, 404, "{who}");
    }
    let t = get_url(&admin, format!("{base}{tpath}")).await;
    assert_eq!(t.status, 200);
    assert_eq!(t.json()["trace"]["owner"], Value::Null);
    // Made-up and malformed ids.
    for id in ["nope", "%27%20OR%201%3D1--", "../trace"] {
        assert_eq!(get_url(&alice, format!("{base}/trace/{id}")).await.status, 404, "{id}");
    }
}

#[tokio::test]
async fn debug_roles_may_trace_and_read_only_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(
        dir.path(),
        &["--signup-open", "true"],
        &[("ICHIBASE_TRACES__DEBUG_ROLES", r#"["user"]"#)],
    );
    let (admin, anon, base) = (client(), anon_client(), s.url.clone());
    let alice = user(&base, "alice@example.com").await;
    let bob = user(&base, "bob@example.com").await;
    put_fn(&admin, &base, "secret", SECRET_FN).await;
    let r = call_with(&alice, &base, "secret", "?trace=1", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.header("x-ichibase-trace-id").unwrap().to_string();
    assert_eq!(get_url(&alice, format!("{base}/trace/{id}")).await.status, 200);
    assert_eq!(get_url(&alice, format!("{base}/trace/{id}/hover?name=API_KEY")).await.status, 200);
    assert_eq!(get_url(&admin, format!("{base}/trace/{id}")).await.status, 200);
    for (who, c) in [("anon", &anon), ("bob", &bob)] {
        assert_eq!(get_url(c, format!("{base}/trace/{id}")).await.status, 404, "{who}");
        assert_eq!(get_url(c, format!("{base}/trace/{id}/hover?name=API_KEY")).await.status, 404, "{who}");
    }
    // anon is not a debug role.
    assert_eq!(call_with(&anon, &base, "secret", "?trace=1", &[]).await.status, 403);
}

/// A function whose every line holds ~10 KB of locals.
const BIG_TRACE_FN: &str = r#"return function()
  local t = {}
  for i = 1, 50 do t[i] = string.rep(string.char(65 + i % 26), 200) end
  local sum = 0
  for i = 1, 3000 do
    sum = sum + #t[(i % 50) + 1]
  end
  return sum
end"#;

fn db_bytes(dir: &std::path::Path) -> u64 {
    ["ichibase.db", "ichibase.db-wal"]
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0))
        .sum()
}

#[tokio::test]
async fn trace_storage_is_capped_per_trace_and_in_total() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(
        dir.path(),
        &[],
        &[
            ("ICHIBASE_TRACES__MAX_BYTES", "65536"),
            ("ICHIBASE_TRACES__TOTAL_BYTES", "262144"),
        ],
    );
    let (admin, base) = (client(), s.url.clone());
    put_fn(&admin, &base, "big", BIG_TRACE_FN).await;
    let before = db_bytes(dir.path());
    let mut ids = Vec::new();
    for _ in 0..10 {
        let r = call_with(&admin, &base, "big", "?trace=1", &[]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json(), json!(600000));
        let id = r.header("x-ichibase-trace-id").unwrap().to_string();
        let t = get_url(&admin, format!("{base}/trace/{id}")).await;
        assert_eq!(t.status, 200);
        let t = t.json();
        let bytes = t["trace"]["bytes"].as_i64().expect("a trace records its size");
        assert!(bytes > 0 && bytes <= 65536, "one trace is capped: {bytes}");
        assert_eq!(t["trace"]["truncated"], true);
        assert!(t.to_string().len() < 4 * 65536, "the stored trace is small");
        ids.push(id);
    }
    // The oldest are pruned to keep the total within its budget; the newest remain.
    let mut kept = 0;
    let mut total = 0;
    for (i, id) in ids.iter().enumerate() {
        let r = get_url(&admin, format!("{base}/trace/{id}")).await;
        if r.status == 200 {
            kept += 1;
            total += r.json()["trace"]["bytes"].as_i64().unwrap();
        } else {
            assert_eq!(r.status, 404);
            assert!(i < 6, "trace {i} (of the newest) was pruned");
        }
    }
    assert!(total <= 262144, "traces hold {total} bytes");
    assert!((3..=8).contains(&kept), "{kept} traces kept");
    assert_eq!(get_url(&admin, format!("{base}/trace/{}", ids[0])).await.status, 404, "the oldest went first");
    assert_eq!(get_url(&admin, format!("{base}/trace/{}", ids[9])).await.status, 200);
    let grown = db_bytes(dir.path()).saturating_sub(before);
    assert!(grown < 24 << 20, "the database grew by {grown} bytes for ten traced calls");
}

#[tokio::test]
async fn traces_expire_after_their_retention() {
    // Pruned by the periodic task.
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(
        dir.path(),
        &[],
        &[
            ("ICHIBASE_TRACES__RETENTION_SECS", "2"),
            ("ICHIBASE_TRACES__PRUNE_INTERVAL_SECS", "0.5"),
        ],
    );
    let (admin, base) = (client(), s.url.clone());
    put_fn(&admin, &base, "secret", SECRET_FN).await;
    let r = call_with(&admin, &base, "secret", "?trace=1", &[]).await;
    let id = r.header("x-ichibase-trace-id").unwrap().to_string();
    assert_eq!(get_url(&admin, format!("{base}/trace/{id}")).await.status, 200);
    let gone_by = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        if get_url(&admin, format!("{base}/trace/{id}")).await.status == 404 {
            break;
        }
        assert!(std::time::Instant::now() < gone_by, "trace still kept 20 s after a 2 s retention");
    }
    // Pruned when the next trace is saved (no periodic run in between).
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(
        dir.path(),
        &[],
        &[
            ("ICHIBASE_TRACES__RETENTION_SECS", "2"),
            ("ICHIBASE_TRACES__PRUNE_INTERVAL_SECS", "3600"),
        ],
    );
    let base = s.url.clone();
    put_fn(&admin, &base, "secret", SECRET_FN).await;
    let r = call_with(&admin, &base, "secret", "?trace=1", &[]).await;
    let old = r.header("x-ichibase-trace-id").unwrap().to_string();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let r = call_with(&admin, &base, "secret", "?trace=1", &[]).await;
    let new = r.header("x-ichibase-trace-id").unwrap().to_string();
    // Reading the new trace waits for its (background) save, which pruned the old one.
    assert_eq!(get_url(&admin, format!("{base}/trace/{new}")).await.status, 200);
    assert_eq!(get_url(&admin, format!("{base}/trace/{old}")).await.status, 404);
}

#[tokio::test]
async fn db_tx_has_its_own_short_time_limit() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(
        dir.path(),
        &["--lua-timeout-secs", "40", "--lua-instruction-limit", "1000000000000"],
        &[("ICHIBASE_LUA_LIMITS__TX_TIMEOUT_SECS", "1")],
    );
    let (admin, base) = (client(), s.url.clone());
    common::ok(&admin, &base, "CREATE TABLE tx_t (id INTEGER PRIMARY KEY, v TEXT)").await;
    let variants = [
        ("tx_write_loop", r#"return function()
            return db.tx(function()
              while true do db.exec("INSERT INTO tx_t (v) VALUES ('lua')") end
            end)
          end"#),
        ("tx_nested_write_loop", r#"return function()
            return db.tx(function()
              db.exec("INSERT INTO tx_t (v) VALUES ('lua')")
              return db.tx(function()
                while true do db.exec("INSERT INTO tx_t (v) VALUES ('lua')") end
              end)
            end)
          end"#),
        ("tx_cpu_loop", r#"return function()
            return db.tx(function()
              db.exec("INSERT INTO tx_t (v) VALUES ('lua')")
              local x = 0
              while true do x = x + 1 end
            end)
          end"#),
        ("tx_pcall_again", r#"return function()
            for i = 1, 1000 do
              pcall(db.tx, function()
                db.exec("INSERT INTO tx_t (v) VALUES ('lua')")
                while true do end
              end)
            end
            return "escaped"
          end"#),
        ("tx_slow_statement", r#"return function()
            return db.tx(function()
              return db.query("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c")
            end)
          end"#),
    ];
    for (name, src) in variants {
        assert_eq!(put_fn(&admin, &base, name, src).await.status, 200, "{name}");
        let started = std::time::Instant::now();
        let (c, b, n) = (admin.clone(), base.clone(), name.to_string());
        let lua = tokio::spawn(async move { call_fn(&c, &b, &n, json!({})).await });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        // The writer stays available to others.
        let w = std::time::Instant::now();
        let r = common::post(&admin, &base, &[], "INSERT INTO tx_t (v) VALUES ('http')").await;
        let waited = w.elapsed();
        assert_eq!(r.status, 200, "{name}: {}", r.body);
        assert!(waited < std::time::Duration::from_secs(10), "{name}: an INSERT waited {waited:?} for the writer");
        let r = lua.await.unwrap();
        let took = started.elapsed();
        assert!(took < std::time::Duration::from_secs(20), "{name}: ran {took:?} (the Lua limit is 40 s)");
        assert_eq!(r.status, 408, "{name}: {}", r.body);
        assert_eq!(r.json()["error"]["name"], "TIMEOUT_EXCEEDED", "{name}");
        if name != "tx_slow_statement" {
            assert!(r.body.contains("tx_timeout_secs"), "{name}: {}", r.body);
        }
    }
    // Everything the functions wrote was rolled back; every HTTP insert is there.
    let out = common::ok(&admin, &base, "SELECT v, count(*) FROM tx_t GROUP BY v ORDER BY v FORMAT TSV").await;
    assert_eq!(out, "http\t5\n");
    // A short transaction still commits.
    put_fn(&admin, &base, "tx_short", r#"return function()
        return db.tx(function() return db.exec("INSERT INTO tx_t (v) VALUES ('short')").changes end)
      end"#).await;
    let r = call_fn(&admin, &base, "tx_short", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Allocates ~40 MB, then holds it for a second or two; returns its start and end (ms).
const HUNGRY_FN: &str = r#"return function()
  local now = function() return db.one("SELECT julianday('now') * 86400000.0 AS t").t end
  local s = now()
  local t = {}
  for i = 1, 40 do t[i] = string.rep(string.char(65 + i % 26), 1000000) end
  local t0 = os.time()
  while os.time() < t0 + 2 do end
  return {s, now()}
end"#;

#[tokio::test]
async fn lua_memory_budget_refuses_beyond_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(
        dir.path(),
        &["--lua-memory-limit", "67108864"],
        &[
            ("ICHIBASE_LUA_LIMITS__MEMORY_TOTAL", "134217728"),
            ("ICHIBASE_LUA_LIMITS__MEMORY_WAIT_SECS", "0.3"),
        ],
    );
    let (admin, anon, base) = (client(), anon_client(), s.url.clone());
    put_fn(&admin, &base, "hungry", HUNGRY_FN).await;
    let rss0 = s.rss();
    let mut calls = Vec::new();
    for _ in 0..10 {
        let (c, b) = (anon.clone(), base.clone());
        calls.push(tokio::spawn(async move { call_fn(&c, &b, "hungry", json!({})).await }));
    }
    let mut peak = 0;
    while !calls.iter().all(|c| c.is_finished()) {
        peak = peak.max(s.rss());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (mut ok, mut refused) = (0, 0);
    for c in calls {
        let r = c.await.unwrap();
        match r.status {
            200 => ok += 1,
            503 => {
                assert_eq!(r.json()["error"]["name"], "MEMORY_LIMIT_EXCEEDED", "{}", r.body);
                assert!(r.body.contains("memory_total"), "{}", r.body);
                refused += 1;
            }
            s => panic!("unexpected {s}: {}", r.body),
        }
    }
    assert!((1..=5).contains(&ok), "{ok} admitted with room for 2");
    assert!(refused >= 5, "{refused} refused");
    let grown = peak.saturating_sub(rss0);
    assert!(grown < 400 << 20, "RSS grew by {grown} bytes");
    // Room again once they finished.
    assert_eq!(call_fn(&anon, &base, "hungry", json!({})).await.status, 200);
}

#[tokio::test]
async fn lua_memory_budget_queues_within_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(
        dir.path(),
        &["--lua-memory-limit", "67108864"],
        &[
            ("ICHIBASE_LUA_LIMITS__MEMORY_TOTAL", "134217728"),
            ("ICHIBASE_LUA_LIMITS__MEMORY_WAIT_SECS", "120"),
        ],
    );
    let (admin, base) = (client(), s.url.clone());
    put_fn(&admin, &base, "hungry", HUNGRY_FN).await;
    let mut calls = Vec::new();
    for _ in 0..5 {
        let (c, b) = (admin.clone(), base.clone());
        calls.push(tokio::spawn(async move { call_fn(&c, &b, "hungry", json!({})).await }));
    }
    let mut spans = Vec::new();
    for c in calls {
        let r = c.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        spans.push((v[0].as_f64().unwrap(), v[1].as_f64().unwrap()));
    }
    // Never more than two ran at once.
    let most = spans
        .iter()
        .map(|(s, _)| spans.iter().filter(|(a, b)| a <= s && s < b).count())
        .max()
        .unwrap();
    assert!(most <= 2, "{most} ran at once: {spans:?}");
}

/// Issue 14.6: arrays round-trip as JSON arrays, empty or not.
#[tokio::test]
async fn empty_arrays_stay_arrays() {
    let s = Server::start(&[]);
    let admin = client();
    let base = &s.url;
    let r = post(&admin, base, &[], "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = common::put_fn(
        &admin,
        base,
        "lists",
        r#"return function(input)
            return {
              notes = db.query('SELECT id, body FROM notes'),
              decoded = json.decode('[]'),
              nested = json.decode('{"a": [], "b": {}}'),
              echoed = input.items,
              plain = {},
            }
          end"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = common::call_fn(&admin, base, "lists", json!({"items": []})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["notes"], json!([]), "{j}");
    assert_eq!(j["decoded"], json!([]), "{j}");
    assert_eq!(j["nested"], json!({"a": [], "b": {}}), "{j}");
    assert_eq!(j["echoed"], json!([]), "{j}");
    assert_eq!(j["plain"], json!({}), "a plain empty table stays an object: {j}");
    let r = post(&admin, base, &[], "INSERT INTO notes(body) VALUES ('x')").await;
    assert_eq!(r.status, 200);
    let r = common::call_fn(&admin, base, "lists", json!({"items": [1]})).await;
    assert_eq!(r.json()["notes"], json!([{"id": 1, "body": "x"}]));
}

// --- Deep trace modes and limits (issue 18) ----------------------------------------------------

const LATE_FAIL_FN: &str = r#"return function()
  local cfg = {limit = 300, name = "late"}
  local n = 0
  for i = 1, cfg.limit do
    n = n + i
  end
  error("failed after " .. n)
end"#;

#[tokio::test]
async fn ends_mode_keeps_the_lines_before_an_error_with_full_values() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(
        dir.path(),
        &[],
        &[
            ("ICHIBASE_TRACES__MODE", "ends"),
            ("ICHIBASE_TRACES__HEAD_STEPS", "4"),
            ("ICHIBASE_TRACES__TAIL_STEPS", "12"),
        ],
    );
    let (admin, base) = (client(), s.url.clone());
    assert_eq!(put_fn(&admin, &base, "late", LATE_FAIL_FN).await.status, 200);
    let r = call_with(&admin, &base, "late", "?trace=1", &[]).await;
    assert_eq!(r.status, 422, "{}", r.body);
    let id = r.header("x-ichibase-trace-id").unwrap().to_string();
    let t = get_url(&admin, format!("{base}/trace/{id}")).await;
    assert_eq!(t.status, 200, "{}", t.body);
    let t = t.json();
    assert_eq!(t["trace"]["truncated"], true, "{t}");
    assert_eq!(t["trace"]["error_line"], 7, "{t}");
    let steps = t["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 16, "{t}");
    let nums: Vec<i64> = steps.iter().map(|s| s["step"].as_i64().unwrap()).collect();
    assert_eq!(&nums[..4], &[0, 1, 2, 3], "the head");
    assert!(nums[4] > 500, "a gap: {nums:?}");
    // The failing line is kept, with the values before it ran; every step shows every local
    // (unchanged ones too: deltas are recorded, whole values are served).
    let fail = steps.iter().find(|s| s["line"] == 7 && s["locals"]["n"].is_number()).expect("the failing line");
    assert_eq!(fail["locals"]["n"], json!(45150), "{fail}");
    assert_eq!(fail["after"], false);
    for s in steps.iter().filter(|s| s["locals"]["n"].is_number()) {
        assert_eq!(s["locals"]["cfg"], json!({"limit": 300, "name": "late"}), "{s}");
    }
    // Hover reads the same values.
    let h = get_url(&admin, format!("{base}/trace/{id}/hover?name=n")).await;
    assert_eq!(h.status, 200, "{}", h.body);
    let history = h.json()["history"].as_array().unwrap().clone();
    assert_eq!(history.last().unwrap()["value"], json!(45150), "{}", h.body);
}

#[tokio::test]
async fn a_traced_endless_loop_still_ends_at_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    for mode in ["full", "ends"] {
        std::fs::create_dir_all(dir.path().join(mode)).unwrap();
        let s = Server::start_in(
            dir.path().join(mode).as_path(),
            &[],
            &[
                ("ICHIBASE_TRACES__MODE", mode),
                ("ICHIBASE_LUA_TIMEOUT_SECS", "3"),
                ("ICHIBASE_LUA_CPU_LIMIT_SECS", "2"),
            ],
        );
        let (admin, base) = (client(), s.url.clone());
        for (name, src) in [
            ("spin", "return function() local x = 0 while true do x = x + 1 end end"),
            ("spin_bare", "return function() while true do end end"),
            ("spin_co", "return function() local co = coroutine.wrap(function() while true do end end) co() end"),
        ] {
            assert_eq!(put_fn(&admin, &base, name, src).await.status, 200, "{mode} {name}");
            let started = std::time::Instant::now();
            let r = call_with(&admin, &base, name, "?trace=1", &[]).await;
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "{mode} {name}: took {:?}",
                started.elapsed()
            );
            assert!(r.status == 408 || r.status == 422, "{mode} {name}: {} {}", r.status, r.body);
            let code = r.json()["error"]["name"].as_str().unwrap_or("").to_string();
            assert!(code == "TIMEOUT_EXCEEDED" || code == "LUA_LIMIT_EXCEEDED", "{mode} {name}: {}", r.body);
            let id = r.header("x-ichibase-trace-id").unwrap().to_string();
            let t = get_url(&admin, format!("{base}/trace/{id}")).await;
            assert_eq!(t.status, 200, "{mode} {name}: {}", t.body);
            assert_eq!(t.json()["trace"]["outcome"], "error");
            assert!(!t.json()["steps"].as_array().unwrap().is_empty(), "{mode} {name}");
        }
        // The server still answers.
        assert_eq!(get_url(&admin, format!("{base}/ping")).await.status, 200);
    }
}

// --- Issue 18: hot-line sampling and traces saved in the background ----------------------------

const HOT_LOOP_FN: &str = r#"return function()
  local total = 0
  for i = 1, 200 do
    local x = i * 2
    total = total + x
  end
  return total
end"#;

#[tokio::test]
async fn hot_lines_are_sampled_and_marked_in_the_trace() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(dir.path(), &[], &[("ICHIBASE_TRACES__SAMPLE_AFTER", "5")]);
    let (admin, base) = (client(), s.url.clone());
    assert_eq!(put_fn(&admin, &base, "hot", HOT_LOOP_FN).await.status, 200);
    let r = call_with(&admin, &base, "hot", "?trace=1", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!(40200));
    // Read at once: a trace still being saved in the background is waited for.
    let id = r.header("x-ichibase-trace-id").unwrap().to_string();
    let t = get_url(&admin, format!("{base}/trace/{id}")).await;
    assert_eq!(t.status, 200, "{}", t.body);
    let t = t.json();
    let sampling = &t["trace"]["sampling"];
    assert_eq!(sampling["after"], 5, "{t}");
    // Line 4 ran 200 times: the first 5 visits, then the 5 + 2^j-th (j = 0..7) are recorded.
    let line4 = sampling["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["line"] == 4)
        .unwrap_or_else(|| panic!("line 4 in {sampling}"));
    assert_eq!(line4["visits"], 200, "{line4}");
    assert_eq!(line4["skipped"], 200 - 13, "{line4}");
    let total: i64 = sampling["lines"].as_array().unwrap().iter().map(|l| l["skipped"].as_i64().unwrap()).sum();
    assert_eq!(sampling["skipped"].as_i64().unwrap(), total);
    let steps = t["steps"].as_array().unwrap();
    let body: Vec<&Value> = steps.iter().filter(|s| s["line"] == 4).collect();
    assert_eq!(body.len(), 13, "{t}");
    // Each recorded step after sampling began says how many visits of its line were skipped
    // before it; the first ones carry no mark (the format readers knew stays as it was).
    assert!(body[..6].iter().all(|s| s.get("skipped").is_none()), "{t}");
    let gaps: Vec<i64> = body[6..].iter().map(|s| s["skipped"].as_i64().unwrap_or(0)).collect();
    assert_eq!(gaps, vec![0, 1, 3, 7, 15, 31, 63], "{t}");
    let covered: i64 = body.iter().map(|s| 1 + s["skipped"].as_i64().unwrap_or(0)).sum();
    assert_eq!(covered, 5 + 128, "visits up to the last recorded one");
    // Recorded values are exact, and step numbers count every line event (gaps: skipped).
    for s in &body {
        let i = s["locals"]["i"].as_i64().unwrap();
        assert_eq!(s["locals"]["x"], json!(i * 2), "{s}");
        assert_eq!(s["locals"]["total"], json!((i - 1) * i), "{s}");
    }
    let nums: Vec<i64> = steps.iter().map(|s| s["step"].as_i64().unwrap()).collect();
    assert!(nums.windows(2).all(|w| w[0] < w[1]), "{nums:?}");
    assert!(*nums.last().unwrap() > 600, "every visit is numbered: {nums:?}");
    // Hover says its history is over the recorded steps.
    let h = get_url(&admin, format!("{base}/trace/{id}/hover?name=total")).await;
    assert_eq!(h.status, 200, "{}", h.body);
    assert_eq!(h.json()["sampled"], true, "{}", h.body);
    // Failing on a visit sampling skipped: that visit is recorded all the same, with the
    // values from before the failing line ran.
    let failing = "return function()\n  local total = 0\n  for i = 1, 200 do\n    local k = 1\n    if i == 150 then k = nil end\n    total = total + k * i\n  end\n  return total\nend";
    assert_eq!(put_fn(&admin, &base, "hot_fail", failing).await.status, 200);
    let r = call_with(&admin, &base, "hot_fail", "?trace=1", &[]).await;
    assert_eq!(r.status, 422, "{}", r.body);
    let id = r.header("x-ichibase-trace-id").unwrap().to_string();
    let t = get_url(&admin, format!("{base}/trace/{id}")).await.json();
    assert_eq!(t["trace"]["error_line"], 6, "{t}");
    let fail = t["steps"].as_array().unwrap().iter().rev().find(|s| s["line"] == 6).unwrap();
    assert_eq!(fail["after"], false, "{fail}");
    assert_eq!(fail["locals"]["i"], 150, "{fail}");
    assert_eq!(fail["locals"]["k"], Value::Null, "{fail}");
    assert_eq!(fail["locals"]["total"], json!(149 * 150 / 2), "{fail}");
    assert!(fail["skipped"].as_i64().unwrap() > 0, "{fail}");
    // A function without hot lines is traced whole: no sampling in its trace.
    assert_eq!(put_fn(&admin, &base, "cool", "return function() local a = 1\nlocal b = a + 1\nreturn b end").await.status, 200);
    let r = call_with(&admin, &base, "cool", "?trace=1", &[]).await;
    let id = r.header("x-ichibase-trace-id").unwrap().to_string();
    let t = get_url(&admin, format!("{base}/trace/{id}")).await.json();
    assert_eq!(t["trace"]["sampling"], Value::Null, "{t}");
    assert!(t["steps"].as_array().unwrap().iter().all(|s| s.get("skipped").is_none()), "{t}");
}

#[tokio::test]
async fn traces_saved_in_the_background_are_readable_at_once() {
    // A queue with room (the default), a queue of one (full at once: callers save their own
    // trace before answering), and no queue (always saved before answering).
    for queue in ["64", "1", "0"] {
        let dir = tempfile::tempdir().unwrap();
        let s = Server::start_in(dir.path(), &[], &[("ICHIBASE_TRACES__SAVE_QUEUE", queue)]);
        let (admin, base) = (client(), s.url.clone());
        assert_eq!(put_fn(&admin, &base, "hot", HOT_LOOP_FN).await.status, 200);
        assert_eq!(put_fn(&admin, &base, "late", LATE_FAIL_FN).await.status, 200);
        let mut tasks = Vec::new();
        for k in 0..8 {
            let (admin, base) = (admin.clone(), base.clone());
            tasks.push(tokio::spawn(async move {
                let name = if k % 2 == 0 { "hot" } else { "late" };
                let r = call_with(&admin, &base, name, "?trace=1", &[]).await;
                let id = r.header("x-ichibase-trace-id").unwrap().to_string();
                // Right after the response, with no pause.
                let t = get_url(&admin, format!("{base}/trace/{id}")).await;
                assert_eq!(t.status, 200, "queue {queue}, {name}: {}", t.body);
                let t = t.json();
                assert_eq!(t["trace"]["id"], json!(id));
                assert!(!t["steps"].as_array().unwrap().is_empty(), "queue {queue}: {t}");
                if name == "late" {
                    assert_eq!(t["trace"]["outcome"], "error");
                    assert_eq!(t["trace"]["error_line"], 7, "{t}");
                    // The failing line is recorded (visited once) with its values.
                    let fail = t["steps"].as_array().unwrap().iter().find(|s| s["line"] == 7).expect("line 7");
                    assert_eq!(fail["locals"]["n"], json!(45150), "{fail}");
                }
                let h = get_url(&admin, format!("{base}/trace/{id}/hover?name=n")).await;
                assert_eq!(h.status, 200, "{}", h.body);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // An unknown trace is still 404 (nothing pending to wait for).
        let r = get_url(&admin, format!("{base}/trace/0000000000000000000000000000dead")).await;
        assert_eq!(r.status, 404, "{}", r.body);
    }
}

/// `lua` rows of the posterity log for `function`: (outcome, inline) in call order, once
/// `want` of them are committed.
async fn lua_rows(c: &reqwest::Client, base: &str, function: &str, want: usize) -> Vec<(String, bool)> {
    let sql = format!(
        "SELECT outcome, (detail->>'inline')::BOOLEAN AS inline FROM log WHERE kind = 'lua' AND name = '{function}' ORDER BY ts"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let r = read(
            c.post(format!("{base}/analytics?default_format=JSONCompact"))
                .body(sql.clone())
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let rows: Vec<(String, bool)> = r.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r[0].as_str().unwrap().to_string(), r[1].as_bool().or(r[1].as_i64().map(|v| v != 0)).unwrap()))
            .collect();
        if rows.len() >= want || std::time::Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Issue 18: a call that needs no blocking thread runs on the request's async worker; one that
/// calls any other host function, runs past the budget or fails is made again on a blocking
/// thread, and nothing of the abandoned attempt is kept or done twice (rows, log rows,
/// inserts), whatever the function tries (pcall around the call that needs the thread).
#[tokio::test]
async fn calls_that_need_no_blocking_thread_run_inline_and_others_exactly_once() {
    // The largest budget: a busy machine may still preempt a run past it (it is then made
    // again on a blocking thread), so pure calls are checked to run inline at least once.
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(dir.path(), &["--posterity-flush-secs", "0.2"], &[("ICHIBASE_LUA_LIMITS__INLINE_BUDGET_US", "10000")]);
    let (admin, base) = (client(), s.url.clone());
    let anon = anon_client();
    common::ok(&admin, &base, "CREATE TABLE inl (id INTEGER PRIMARY KEY, v TEXT)").await;
    let fns = [
        ("pure", "return function(i) return {echo = json.decode(json.encode(i)), id = debug.trace_id() ~= nil} end"),
        // Pure work first, then a write: the insert happens once, on the blocking thread.
        ("writes", "return function(i) local s = json.encode(i) db.exec('INSERT INTO inl (v) VALUES ({s:String})', {s = s}) return db.query('SELECT count(*) AS n FROM inl')[1].n end"),
        // pcall cannot swallow the hand-off: the caught call still runs (on the blocking thread).
        ("caught", "return function() local ok, r = pcall(db.query, 'SELECT 7 AS x') return {ok = ok, x = ok and r[1].x} end"),
        ("caught_co", "return function() local co = coroutine.create(function() return db.query('SELECT 8 AS x') end) local ok, r = coroutine.resume(co) return {ok = ok, x = ok and r[1].x} end"),
        ("logs", "return function() log.info('inline-log-line') return 1 end"),
        ("slow", "return function() local n = 0 for k = 1, 2e7 do n = n + k end return n end"),
        ("fails", "return function(i) if i.bad then error({code = 7, message = 'bad input'}) end return 'fine' end"),
    ];
    for (name, src) in fns {
        let r = put_fn(&admin, &base, name, src).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    for k in 0..3 {
        let r = call_fn(&anon, &base, "pure", json!({"k": k})).await;
        assert_eq!(r.json(), json!({"echo": {"k": k}, "id": true}), "{}", r.body);
        let r = call_fn(&admin, &base, "writes", json!({"k": k})).await;
        assert_eq!(r.json(), json!(k + 1), "one insert per call: {}", r.body);
        let r = call_fn(&anon, &base, "caught", json!({})).await;
        assert_eq!(r.json(), json!({"ok": true, "x": 7}), "{}", r.body);
        let r = call_fn(&anon, &base, "caught_co", json!({})).await;
        assert_eq!(r.json(), json!({"ok": true, "x": 8}), "{}", r.body);
        assert_eq!(call_fn(&anon, &base, "logs", json!({})).await.json(), json!(1));
        assert_eq!(call_fn(&anon, &base, "slow", json!({})).await.json(), json!(200000010000000u64));
        let r = call_fn(&anon, &base, "fails", json!({"bad": true})).await;
        assert_eq!(r.status, 422, "{}", r.body);
        assert_eq!(r.json()["error"]["message"], "bad input");
        assert_eq!(r.json()["error"]["value"], json!({"code": 7, "message": "bad input"}));
        assert_eq!(call_fn(&anon, &base, "fails", json!({})).await.json(), json!("fine"));
    }
    assert_eq!(common::ok(&admin, &base, "SELECT count(*) FROM inl").await.trim(), "3");
    // One `lua` row per call; where it ran.
    let rows = lua_rows(&admin, &base, "pure", 3).await;
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|(o, _)| o == "ok") && rows.iter().any(|(_, inline)| *inline), "{rows:?}");
    for name in ["writes", "caught", "caught_co", "logs", "slow"] {
        let rows = lua_rows(&admin, &base, name, 3).await;
        assert_eq!(rows, vec![("ok".to_string(), false); 3], "{name}");
    }
    // A failed attempt is made again on a blocking thread (its row says so); the next
    // successful call may still run inline (an error is not a reason to stop trying).
    let rows = lua_rows(&admin, &base, "fails", 6).await;
    assert_eq!(rows.len(), 6, "{rows:?}");
    for pair in rows.chunks(2) {
        assert_eq!(pair[0], ("error".to_string(), false), "{rows:?}");
        assert_eq!(pair[1].0, "ok", "{rows:?}");
    }
    assert!(rows.iter().any(|(o, inline)| o == "ok" && *inline), "{rows:?}");
    // Limits name the configured ones, not the inline budget.
    put_fn(&admin, &base, "spin", "return function() while true do end end").await;
    let r = call_fn(&anon, &base, "spin", json!({})).await;
    assert!(r.body.contains("CPU time limit") || r.body.contains("time limit exceeded (10"), "{}", r.body);
}

#[tokio::test]
async fn inline_runs_can_be_turned_off_and_the_budget_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(dir.path(), &["--posterity-flush-secs", "0.2"], &[("ICHIBASE_LUA_LIMITS__INLINE_BUDGET_US", "0")]);
    let (admin, base) = (client(), s.url.clone());
    put_fn(&admin, &base, "pure", "return function() return 1 end").await;
    assert_eq!(call_fn(&anon_client(), &base, "pure", json!({})).await.json(), json!(1));
    assert_eq!(lua_rows(&admin, &base, "pure", 1).await, vec![("ok".to_string(), false)]);
    drop(s);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ichibase"))
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:0"])
        .env("ICHIBASE_LUA_LIMITS__INLINE_BUDGET_US", "20000")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("inline_budget_us must be at most 10000"), "{err}");
}

/// `ctx` holds exactly the caller's role and user, the request's trace id and the function's
/// name and live version, inline and on a blocking thread alike, and a change to it does not
/// reach the next call.
#[tokio::test]
async fn ctx_names_the_caller_the_trace_and_the_function_version() {
    for budget in ["1000", "0"] {
        let dir = tempfile::tempdir().unwrap();
        let s = Server::start_in(dir.path(), &["--signup-open", "true"], &[("ICHIBASE_LUA_LIMITS__INLINE_BUDGET_US", budget)]);
        let (admin, base) = (client(), s.url.clone());
        let src = "return function(input, ctx)
  local seen = {}
  for k, v in pairs(ctx) do seen[k] = v end
  ctx.role = 'admin'; ctx.extra = 1
  return seen
end";
        assert_eq!(put_fn(&admin, &base, "who", "return function() return 0 end").await.status, 200);
        assert_eq!(put_fn(&admin, &base, "who", src).await.status, 200);
        let r = call_fn(&admin, &base, "who", json!({})).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let trace = r.header("x-ichibase-trace-id").unwrap().to_string();
        assert_eq!(r.json(), json!({"role": "admin", "trace_id": trace, "function": "who", "version": 2}), "budget {budget}");
        let ann = common::signup_with(&base, "ann@example.com", "a long enough password 42").await;
        let (id, ann) = (ann.id, ann.client);
        for _ in 0..2 {
            let r = call_fn(&ann, &base, "who", json!({})).await;
            assert_eq!(r.status, 200, "{}", r.body);
            let trace = r.header("x-ichibase-trace-id").unwrap().to_string();
            assert_eq!(
                r.json(),
                json!({"role": "user", "user_id": id, "trace_id": trace, "function": "who", "version": 2}),
                "budget {budget}"
            );
        }
    }
}

/// Issue 18, hostile inline runs: functions that use most of the inline budget, overrun it, or
/// never end keep every answer right and never starve the async workers they try to run on:
/// `/ping` keeps answering while 22 clients call them without pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inline_runs_near_past_or_without_end_do_not_starve_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(dir.path(), &["--lua-cpu-limit-secs", "0.05"], &[]);
    let (admin, base) = (client(), s.url.clone());
    // os.clock is the process's CPU time: with both cores busy it runs faster than the wall.
    let fns = [
        ("near", "return function() local t = os.clock() while os.clock() - t < 0.0008 do end return 1 end"),
        ("past", "return function() local t = os.clock() while os.clock() - t < 0.004 do end return 2 end"),
        ("endless", "return function() local n = 0 while true do n = n + 1 end end"),
    ];
    for (name, src) in fns {
        assert_eq!(put_fn(&admin, &base, name, src).await.status, 200);
    }
    let stop = std::time::Instant::now() + std::time::Duration::from_secs(4);
    let mut callers = Vec::new();
    // Few endless ones: each then spins a blocking thread up to the CPU limit.
    for k in 0..22 {
        let (c, base, name) = (anon_client(), base.clone(), fns[if k < 2 { 2 } else { k % 2 }].0);
        callers.push(tokio::spawn(async move {
            let mut n = 0;
            while std::time::Instant::now() < stop {
                let r = call_fn(&c, &base, name, json!({})).await;
                match name {
                    "near" => assert_eq!((r.status, r.json()), (200, json!(1)), "{}", r.body),
                    "past" => assert_eq!((r.status, r.json()), (200, json!(2)), "{}", r.body),
                    _ => {
                        assert_eq!(r.status, 422, "{}", r.body);
                        assert!(r.body.contains("LUA_LIMIT_EXCEEDED"), "{}", r.body);
                    }
                }
                n += 1;
            }
            n
        }));
    }
    // A starved worker would hold /ping until the flood ends (or for ever, were a run without
    // end not stopped at the budget): the client gives up after 3 s.
    let c = reqwest::Client::builder().timeout(std::time::Duration::from_secs(3)).build().unwrap();
    let (mut pings, mut slowest) = (0, std::time::Duration::ZERO);
    while std::time::Instant::now() < stop {
        let t = std::time::Instant::now();
        let r = c.get(format!("{base}/ping")).send().await;
        assert!(r.as_ref().is_ok_and(|r| r.status().is_success()), "/ping after {:?}: {r:?}", t.elapsed());
        slowest = slowest.max(t.elapsed());
        pings += 1;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut calls = 0;
    for h in callers {
        calls += h.await.unwrap();
    }
    assert!(pings >= 2 && calls >= 22, "{pings} pings (slowest {slowest:?}), {calls} calls");
    assert_eq!(call_fn(&admin, &base, "near", json!({})).await.json(), json!(1));
}
