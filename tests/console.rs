//! The console (`/console`) against the real binary: its JSON endpoints refuse every non-admin
//! (plain HTTP), "view as user" runs through the real row-level security, and in headless
//! Chromium (tests/common/browser.rs) an admin signs in, creates a table and rows from the SQL
//! console, views a table as another user, deploys and runs a function and reads a variable
//! of its trace on hover, finds the invocation in Activity and approves a pending generation
//! (the model is the scripted provider of tests/common/model_server.rs).

mod common;
#[path = "common/browser.rs"]
mod browser;
#[path = "common/model_server.rs"]
mod model_server;

use browser::{Browser, Page};
use common::*;
use serde_json::{Value, json};

const ADMIN_EMAIL: &str = "root@example.com";
const ADMIN_PASSWORD: &str = "console-admin-pass-42";

/// Every console API: (method, path, body).
fn console_apis() -> Vec<(&'static str, &'static str, Option<Value>)> {
    vec![
        ("GET", "/console/api/tables", None),
        ("POST", "/console/api/query-as", Some(json!({"user": "x", "sql": "SELECT 1"}))),
        ("POST", "/console/api/run", Some(json!({"function": "f", "input": {}}))),
        ("GET", "/console/api/presence?channel=public:x", None),
        ("GET", "/console/api/presence", None),
    ]
}

async fn setup_notes(base: &str) -> (User, User) {
    let c = client();
    let alice = signup(base, "alice@example.com").await;
    let bob = signup(base, "bob@example.com").await;
    ok(&c, base, "CREATE TABLE notes (id INTEGER PRIMARY KEY, owner TEXT NOT NULL DEFAULT (auth_userid()), body TEXT)").await;
    let r = jpost(&c, base, "/admin/policies", json!({"name": "my_notes", "table": "notes", "roles": ["user"], "using": "owner = auth_userid()"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    (alice, bob)
}

#[tokio::test(flavor = "multi_thread")]
async fn non_admins_are_refused_every_console_api() {
    let s = Server::start(&["--signup-open", "true"]);
    let base = s.url.clone();
    let (alice, _bob) = setup_notes(&base).await;
    let (st, key) = api(&client(), "POST", format!("{base}/admin/keys"), Some(json!({"name": "svc", "role": "user"}))).await;
    assert_eq!(st, 200, "{key}");
    let user_key = client_with_token(key["key"].as_str().unwrap());
    let who = [("a signed-in user", alice.client.clone()), ("a user API key", user_key), ("anonymous", anon_client())];
    for (method, path, body) in console_apis() {
        for (name, c) in &who {
            let (st, v) = api(c, method, format!("{base}{path}"), body.clone()).await;
            assert_eq!(st, 403, "{name} {method} {path}: {v}");
            assert_eq!(v["error"]["name"], "ACCESS_DENIED", "{name} {method} {path}: {v}");
            assert!(v["error"]["message"].as_str().unwrap().contains("needs the admin role"), "{v}");
        }
        // Refused before the body is read: a malformed body changes nothing.
        if method == "POST" {
            let r = request(&alice.client, reqwest::Method::POST, format!("{base}{path}"), Some("{not json".into())).await;
            assert_eq!(r.status, 403, "{path}: {}", r.body);
        }
    }
    // Wrong credentials are 401, never a fall-back.
    let (st, _) = api(&client_with_token("ik_wrong"), "GET", format!("{base}/console/api/tables"), None).await;
    assert_eq!(st, 401);
    // The admin gets them.
    let (st, v) = api(&client(), "GET", format!("{base}/console/api/tables"), None).await;
    assert_eq!(st, 200, "{v}");
    let notes = v["tables"].as_array().unwrap().iter().find(|t| t["name"] == "notes").expect("notes listed").clone();
    assert_eq!(notes["policies"][0]["name"], "my_notes", "{notes}");
    assert_eq!(notes["rowid"], true);
    assert!(v["tables"].as_array().unwrap().iter().all(|t| !t["name"].as_str().unwrap().starts_with("_ichibase")), "{v}");
    let (st, v) = api(&client(), "GET", format!("{base}/console/api/presence"), None).await;
    assert_eq!(st, 200, "{v}");
    assert!(v["connections"].is_number() && v["channels"].is_array(), "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn view_as_user_goes_through_row_level_security() {
    let s = Server::start(&["--signup-open", "true"]);
    let base = s.url.clone();
    let (alice, bob) = setup_notes(&base).await;
    let c = client();
    // Each user writes a note as themselves.
    for (u, body) in [(&alice, "note of alice"), (&bob, "note of bob")] {
        let r = post(&u.client, &base, &[], &format!("INSERT INTO my_notes (body) VALUES ('{body}')")).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let as_user = |user: String, sql: &str, params: Value| {
        let c = c.clone();
        let base = base.clone();
        let sql = sql.to_string();
        async move {
            // (status, the raw body as "text" and, when it is one JSON value, that value)
            let r = jpost(&c, &base, "/console/api/query-as", json!({"user": user, "sql": sql, "params": params, "format": "JSONEachRow"})).await;
            let mut v = serde_json::from_str::<Value>(&r.body).unwrap_or(json!({}));
            if !v.is_object() {
                v = json!({});
            }
            v["text"] = json!(r.body);
            (r.status, v)
        }
    };
    let body_of = |v: &Value| v["text"].as_str().unwrap_or_default().to_string();
    let (st, v) = as_user(alice.id.clone(), "SELECT body FROM my_notes ORDER BY id", json!({})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(body_of(&v).trim(), "{\"body\":\"note of alice\"}", "{v}");
    // By email too, with a typed parameter.
    let (st, v) = as_user("bob@example.com".into(), "SELECT body FROM my_notes WHERE id > {min:Int64}", json!({"min": 0})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(body_of(&v).trim(), "{\"body\":\"note of bob\"}", "{v}");
    // The base table is refused to the user, as over their own HTTP.
    let (st, v) = as_user(alice.id.clone(), "SELECT * FROM notes", json!({})).await;
    assert_eq!(st, 403, "{v}");
    assert_eq!(v["error"]["name"], "ACCESS_DENIED");
    // Read-only: nothing is written as someone else.
    let (st, v) = as_user(alice.id.clone(), "INSERT INTO my_notes (body) VALUES ('forged')", json!({})).await;
    assert_eq!(st, 403, "{v}");
    assert_eq!(v["error"]["name"], "READONLY", "{v}");
    assert_eq!(ok(&c, &base, "SELECT count(*) FROM notes").await.trim(), "2");
    // auth_*() are the user's.
    let (st, v) = as_user(alice.id.clone(), "SELECT auth_userid() AS u, auth_role() AS r", json!({})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(serde_json::from_str::<Value>(body_of(&v).trim()).unwrap(), json!({"u": alice.id, "r": "user"}));
    // Unknown and disabled users.
    let (st, v) = as_user("nobody@example.com".into(), "SELECT 1", json!({})).await;
    assert_eq!(st, 404, "{v}");
    let r = json_request(&c, reqwest::Method::PATCH, format!("{base}/admin/users/{}", bob.id), Some(json!({"disabled": true}))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (st, v) = as_user(bob.id.clone(), "SELECT 1", json!({})).await;
    assert_eq!(st, 403, "{v}");

    // Run as a user: the function's db calls see that user's rows, and the trace is kept.
    put_fn(&c, &base, "mine", "return function(input, ctx)\n  local rows = db.query('SELECT body FROM my_notes')\n  local n = #rows\n  return {n = n, first = rows[1] and rows[1].body, user = ctx.user_id}\nend\n").await;
    let (st, v) = api(&c, "POST", format!("{base}/console/api/run"), Some(json!({"function": "mine", "user": "alice@example.com", "input": {}}))).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["result"], json!({"n": 1, "first": "note of alice", "user": alice.id}));
    let tid = v["trace_id"].as_str().unwrap();
    let (st, h) = api(&c, "GET", format!("{base}/trace/{tid}/hover?name=n"), None).await;
    assert_eq!(st, 200, "{h}");
    assert_eq!(h["history"][0]["value"], 1, "{h}");
    // Only the admin reads that trace: not even the user it ran as.
    let (st, _) = api(&alice.client, "GET", format!("{base}/trace/{tid}"), None).await;
    assert_eq!(st, 404);
    // A failing run reports the error and its line.
    put_fn(&c, &base, "boom", "return function(input)\n  local x = nil\n  return x.y\nend\n").await;
    let (st, v) = api(&c, "POST", format!("{base}/console/api/run"), Some(json!({"function": "boom"}))).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!((v["ok"].clone(), v["error"]["line"].clone()), (json!(false), json!(3)), "{v}");
    let (st, v) = api(&c, "POST", format!("{base}/console/api/run"), Some(json!({"function": "missing"}))).await;
    assert_eq!(st, 404, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_is_served_offline_and_small() {
    let s = Server::start(&[]);
    let c = reqwest::Client::new(); // no decompression feature: gzipped bodies are measured as sent
    let r = read(c.get(format!("{}/console", s.url)).send().await.unwrap()).await;
    assert_eq!(r.status, 200);
    let csp = r.header("content-security-policy").unwrap().to_string();
    assert!(csp.contains("script-src 'self' 'nonce-") && csp.contains("default-src 'none'"), "{csp}");
    assert!(!r.body.contains("http://") && !r.body.contains("https://"), "no outside URL: {}", r.body);
    let mut total_gz = r.body.len();
    let mut total = r.body.len();
    for f in ["console.js", "console.css", "react-all.js", "react.js", "react-dom-client.js", "jsx-runtime.js"] {
        let plain = read(c.get(format!("{}/console/assets/{f}", s.url)).send().await.unwrap()).await;
        assert_eq!(plain.status, 200, "{f}: {}", plain.body);
        let gz = c.get(format!("{}/console/assets/{f}", s.url)).header("accept-encoding", "gzip").send().await.unwrap();
        let enc = gz.headers().get("content-encoding").map(|v| v.to_str().unwrap().to_string());
        let n = gz.bytes().await.unwrap().len();
        if plain.body.len() > 1024 {
            assert_eq!(enc.as_deref(), Some("gzip"), "{f}");
        }
        total += plain.body.len();
        total_gz += n;
    }
    eprintln!("console page weight: {total} bytes, {total_gz} bytes gzipped");
    assert!(total_gz < 200 * 1024, "page weight {total_gz} bytes gzipped");
    let r = read(c.get(format!("{}/console/assets/nope.js", s.url)).send().await.unwrap()).await;
    assert_eq!(r.status, 404);
}

// ---------------------------------------------------------------- the browser

fn labelled(page: &Page) {
    // Every form control has an accessible name.
    let bad = page.eval(None, "[...document.querySelectorAll('input,select,textarea')].filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.closest('.editor') && e.type !== 'hidden').map(e => e.outerHTML.slice(0, 120))");
    assert_eq!(bad, json!([]), "controls without a label");
}

fn no_overflow(page: &Page) {
    let w = page.eval(None, "document.documentElement.scrollWidth");
    assert!(w.as_f64().unwrap() <= 376.0, "page wider than the phone: {w}");
}

/// Click Run in the SQL console and wait for that run to end.
fn run_sql(page: &Page) {
    let before = page.eval(None, "document.querySelector('#sql').dataset.runs");
    page.click(None, "#sql-run");
    page.wait_for(None, &format!("document.querySelector('#sql').dataset.runs !== {before}"), 60);
}

fn sql(page: &Page, text: &str) {
    page.fill(None, "#sql-text", text);
    run_sql(page);
    let err = page.eval(None, "document.querySelector('#sql-error')?.textContent || ''");
    assert_eq!(err, json!(""), "{text}");
}

fn wait_text(page: &Page, selector: &str, want: &str) {
    let js = format!(
        "(document.querySelector({})?.textContent || '').includes({})",
        serde_json::to_string(selector).unwrap(),
        serde_json::to_string(want).unwrap()
    );
    page.wait_for(None, &js, 60);
}

fn text(page: &Page, selector: &str) -> String {
    page.eval(None, &format!("document.querySelector({})?.textContent || ''", serde_json::to_string(selector).unwrap()))
        .as_str()
        .unwrap()
        .to_string()
}

fn sign_in(page: &Page, base: &str, email: &str, password: &str) {
    page.goto(&format!("{base}/console"));
    page.wait_for(None, "!!document.querySelector('#signin-email')", 60);
    page.fill(None, "#signin-email", email);
    page.fill(None, "#signin-password", password);
    page.click(None, "#signin-submit");
}

const ADDER: &str = "return function(input, ctx)\n  local total = input.a + input.b\n  local doubled = total * 2\n  return {total = total, doubled = doubled, user = ctx.user_id}\nend\n";

const GREET: &str = "return function(input)\n  local name = input.name or 'world'\n  return {greeting = 'hello ' .. name}\nend";

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_works_in_the_console() {
    let Some(b) = Browser::launch() else { return };
    let m = model_server::ModelServer::start().await;
    let bundle = json!({
        "name": "greet", "description": "greets",
        "migrations": [{"name": "greetings", "sql": "CREATE TABLE greetings (id INTEGER PRIMARY KEY, name TEXT)"}],
        "functions": [{"name": "greet", "source": GREET}],
        "checks": [{"name": "greets", "function": "greet", "input": {"name": "ann"}, "expect": {"greeting": "hello ann"}}]
    });
    let answer = format!("Here it is.\n```json\n{}\n```\n", serde_json::to_string_pretty(&bundle).unwrap());
    m.script("scripted-1", vec![model_server::Script::text(&answer, (100, 50, 0))]);
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(
        dir.path(),
        &["--signup-open", "true"],
        &[
            ("ICHIBASE_ADMIN_EMAIL", ADMIN_EMAIL),
            ("ICHIBASE_ADMIN_PASSWORD", ADMIN_PASSWORD),
            ("ICHIBASE_LLM_URL", &m.url),
            ("ICHIBASE_LLM_KEY", "sk-test"),
            ("ICHIBASE_LLM_MODEL", "scripted-1"),
            ("ICHIBASE_GENERATE_REQUIRE_APPROVAL", "true"),
        ],
    );
    let base = s.url.clone();
    let c = client();
    let alice = signup(&base, "alice@example.com").await;
    let bob = signup(&base, "bob@example.com").await;

    // A non-admin is told, and sees nothing.
    let page = b.page();
    sign_in(&page, &base, "alice@example.com", &password_of("alice@example.com"));
    page.wait_for(None, "(document.querySelector('#signin-error')?.textContent || '').includes('needs the admin role')", 60);
    drop(page);

    // Sign in as the admin.
    let page = b.page();
    sign_in(&page, &base, ADMIN_EMAIL, ADMIN_PASSWORD);
    page.wait_for(None, "(document.querySelector('#who')?.textContent || '').includes('admin')", 60);
    labelled(&page);

    // Create a table and rows from the SQL console (a parameterised insert), then a policy.
    sql(&page, "CREATE TABLE notes (id INTEGER PRIMARY KEY, owner TEXT NOT NULL, body TEXT)");
    page.fill(None, "#sql-text", "INSERT INTO notes (owner, body) VALUES ({owner:String}, {body:String})");
    page.wait_for(None, "!!document.querySelector('input[data-param=body]')", 30);
    for (u, body) in [(&alice, "alice's secret"), (&bob, "bob's secret")] {
        page.fill(None, "input[data-param=owner]", &u.id);
        page.fill(None, "input[data-param=body]", body);
        run_sql(&page);
        assert_eq!(text(&page, "#sql-error"), "");
    }
    assert_eq!(text(&page, "#sql-error"), "");
    sql(&page, "SELECT owner, body FROM notes ORDER BY id");
    wait_text(&page, "#sql-result", "bob's secret");
    assert_eq!(ok(&c, &base, "SELECT count(*) FROM notes").await.trim(), "2");
    // An error is shown in place, with the bad word selected.
    page.fill(None, "#sql-text", "SELEC 1");
    run_sql(&page);
    page.wait_for(None, "(document.querySelector('#sql-error')?.textContent || '').includes('SYNTAX_ERROR')", 60);
    assert_eq!(page.eval(None, "document.querySelector('#sql-text').selectionEnd - document.querySelector('#sql-text').selectionStart"), json!(5));
    let r = jpost(&c, &base, "/admin/policies", json!({"name": "my_notes", "table": "notes", "roles": ["user"], "using": "owner = auth_userid()"})).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Browse the table as alice: bob's row is not there.
    sql(&page, "SELECT 1"); // reloads the table list
    page.wait_for(None, "!!document.querySelector('button[data-table=notes]')", 60);
    page.click(None, "button[data-table=notes]");
    wait_text(&page, "#browse-table", "bob's secret");
    // Edit a cell from the keyboard: Enter opens it, Enter saves.
    let cell = "#browse-table tbody tr:first-child td:nth-child(3)";
    assert_eq!(text(&page, cell), "alice's secret");
    page.press(None, cell, "Enter");
    page.fill(None, "#browse-table td input", "edited by the admin");
    page.press(None, "#browse-table td input", "Enter");
    wait_text(&page, cell, "edited by the admin");
    assert_eq!(ok(&c, &base, "SELECT body FROM notes WHERE owner = (SELECT id FROM _ichibase_users WHERE email = 'alice@example.com')").await.trim(), "edited by the admin");
    page.select(None, "#browse-as", &alice.id);
    wait_text(&page, "#browse-as-note", "alice@example.com");
    page.wait_for(None, "(() => { const t = document.querySelector('#browse-table')?.textContent || ''; return t.includes(\"edited by the admin\") && !t.includes(\"bob's secret\"); })()", 60);
    assert!(text(&page, "#browse-as-note").contains("my_notes"));
    page.select(None, "#browse-as", &bob.id);
    page.wait_for(None, "(() => { const t = document.querySelector('#browse-table')?.textContent || ''; return t.includes(\"bob's secret\") && !t.includes(\"edited by the admin\"); })()", 60);

    // Functions: deploy, run as alice, hover a variable of the trace.
    page.click(None, "nav.sections button[data-section=functions]");
    page.fill(None, "#fn-new-name", "adder");
    page.click(None, "#fn-new");
    page.fill(None, "#fn-source", ADDER);
    page.click(None, "#fn-deploy");
    wait_text(&page, "#fn-msg", "Deployed version 1");
    labelled(&page);
    page.fill(None, "#fn-input", r#"{"a": 2, "b": 3}"#);
    page.select(None, "#fn-as", &alice.id);
    page.click(None, "#fn-run");
    wait_text(&page, "#fn-output", "\"doubled\": 10");
    assert!(text(&page, "#fn-output").contains(&alice.id));
    page.wait_for(None, "!!document.querySelector('#trace-source .var[data-var=total][data-line=\"2\"]')", 60);
    page.hover(None, "#trace-source .var[data-var=total][data-line=\"2\"]");
    wait_text(&page, "#trace-tip", "total = 5");
    page.hover(None, "#trace-source .var[data-var=doubled][data-line=\"3\"]");
    wait_text(&page, "#trace-tip", "doubled = 10");
    // The keyboard gets the same: focus shows the value.
    page.press(None, "#trace-source .var[data-var=total][data-line=\"2\"]", "Shift");
    wait_text(&page, "#trace-tip", "total = 5");

    // Identity: create an API key (shown once), use it, revoke it.
    page.click(None, "nav.sections button[data-section=identity]");
    page.fill(None, "#key-name", "ci-bot");
    page.fill(None, "#key-role", "user");
    page.click(None, "#key-create");
    wait_text(&page, "#new-key", "ik_");
    let key = text(&page, "#new-key");
    let (st, me) = api(&client_with_token(&key), "GET", format!("{base}/auth/me"), None).await;
    assert_eq!((st, me["role"].clone()), (200, json!("user")), "{me}");
    page.wait_for(None, "!!document.querySelector('button[data-revoke-key=\"ci-bot\"]')", 60);
    page.click(None, "button[data-revoke-key=\"ci-bot\"]");
    page.wait_for(None, "!document.querySelector('button[data-revoke-key=\"ci-bot\"]')", 60);
    let (st, _) = api(&client_with_token(&key), "GET", format!("{base}/auth/me"), None).await;
    assert_eq!(st, 401, "a revoked key stops working at once");
    wait_text(&page, "#users", "bob@example.com");
    labelled(&page);

    // Activity shows that invocation (the log flushes every second: refresh until it is there).
    page.click(None, "nav.sections button[data-section=activity]");
    page.click(None, "button[data-list=lua]");
    page.wait_for(None, "(() => { const t = document.querySelector('#activity-list')?.textContent || ''; if (t.includes('adder')) return true; if (!window.__r || Date.now() - window.__r > 1000) { window.__r = Date.now(); document.querySelector('#activity-refresh').click(); } return false; })()", 60);
    labelled(&page);
    page.wait_for(None, "!!document.querySelector('svg.chart')", 60);

    // A pending generation: open it, see the bundle's diff, approve it.
    let (st, g) = api(&c, "POST", format!("{base}/generate"), Some(json!({"intent": "greet people"}))).await;
    assert_eq!(st, 200, "{g}");
    assert_eq!(g["status"], "awaiting_approval", "{g}");
    let id = g["id"].as_str().unwrap().to_string();
    page.click(None, "nav.sections button[data-section=operations]");
    page.wait_for(None, &format!("!!document.querySelector('button[data-gen=\"{id}\"]')"), 60);
    page.click(None, &format!("button[data-gen=\"{id}\"]"));
    wait_text(&page, "#generation", "greet people");
    wait_text(&page, "#generation", "local name = input.name or 'world'");
    page.click(None, "#gen-approve");
    wait_text(&page, "#gen-status", "merged");
    let r = call_fn(&c, &base, "greet", json!({"name": "bo"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"greeting": "hello bo"}));

    // Live channels: a socket from the page joins a channel; the console lists it and who is there.
    page.eval(None, "(() => { const t = sessionStorage.getItem('ichibase-console-credential'); window.__ws = new WebSocket(`ws://${location.host}/ws?access_token=${t}`); window.__ws.onopen = () => window.__ws.send(JSON.stringify({type: 'join', channel: 'public:lobby', meta: {name: 'console-test'}})); return true; })()");
    page.wait_for(None, "(() => { const t = document.querySelector('#ws-channels')?.textContent || ''; if (t.includes('public:lobby')) return true; if (!window.__w || Date.now() - window.__w > 1000) { window.__w = Date.now(); document.querySelector('#ws-refresh').click(); } return false; })()", 60);
    page.click(None, "button[data-channel=\"public:lobby\"]");
    wait_text(&page, "#ws-presence", "console-test");

    // Keyboard: arrows move between sections.
    page.press(None, "nav.sections button[data-section=operations]", "ArrowLeft");
    page.wait_for(None, "document.activeElement?.dataset?.section === 'activity' && location.hash === '#activity'", 30);

    // A phone's width: nothing spills sideways.
    page.viewport(375, 800);
    for sec in ["data", "functions", "identity", "activity", "operations"] {
        page.click(None, &format!("nav.sections button[data-section={sec}]"));
        page.wait_for(None, "!!document.querySelector('main')", 30);
        no_overflow(&page);
    }
    labelled(&page);

    // Signing in with an API key works too.
    let page2 = b.page();
    page2.goto(&format!("{base}/console"));
    page2.wait_for(None, "!!document.querySelector('#signin-tab-key')", 60);
    page2.click(None, "#signin-tab-key");
    page2.fill(None, "#signin-key", ADMIN_KEY);
    page2.click(None, "#signin-submit");
    page2.wait_for(None, "(document.querySelector('#who')?.textContent || '').includes('admin')", 60);
    // Nothing was fetched from another host.
    for r in page.requests().iter().chain(page2.requests().iter()) {
        assert!(r["url"].as_str().unwrap().starts_with(&base), "{r}");
    }
}
