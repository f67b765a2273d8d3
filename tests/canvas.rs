//! The canvas in real headless Chromium (Debian's `chromium`, driven through
//! tests/browser/driver.mjs; see tests/common/browser.rs) against the real binary, with the
//! browser's network limited to 127.0.0.1: deploys from Lua reach an open canvas, redeploys
//! replace, compile errors reach Lua with line and column, runtime errors show the overlay and
//! are logged with the TSX position, `ichi.sql` goes through row-level security, CDC updates
//! arrive live, a hostile component cannot reach the shell's credentials or another host, and
//! the debugger shows the variable values behind a clicked element.

mod common;
#[path = "common/browser.rs"]
mod browser;

use browser::{Browser, Page};
use common::*;
use serde_json::{Value, json};

const DEPLOYER: &str = r#"
return function(input, ctx)
  return ui.deploy{name = input.name, code = input.code, props = input.props, to = input.to}
end
"#;

const CHECKER: &str = r#"
return function(input, ctx)
  local ok, err = pcall(ui.deploy, {name = input.name, code = input.code})
  return {deployed = ok, error = tostring(err), check = ui.check{name = input.name, code = input.code}}
end
"#;

fn frame(name: &str) -> String {
    format!("section[data-ui=\"{name}\"] iframe")
}

/// Open the canvas at `path` and sign in through its form.
fn open_canvas(page: &Page, base: &str, path: &str, email: &str) {
    page.goto(&format!("{base}{path}"));
    page.wait_for(None, "!!document.querySelector('#ichi-email')", 60);
    page.fill(None, "#ichi-email", email);
    page.fill(None, "#ichi-password", &password_of(email));
    page.click(None, "#ichi-signin-button");
    page.wait_for(None, "document.querySelector('#ichi-status')?.textContent === 'live'", 60);
}

async fn deploy(base: &str, name: &str, code: &str, to: &str, props: Value) -> Resp {
    call_fn(&client(), base, "deployer", json!({"name": name, "code": code, "to": to, "props": props})).await
}

fn text_in(page: &Page, name: &str, selector: &str, want: &str) {
    let js = format!(
        "document.querySelector({})?.textContent === {}",
        serde_json::to_string(selector).unwrap(),
        serde_json::to_string(want).unwrap()
    );
    page.wait_for(Some(&frame(name)), &js, 60);
}

const HELLO_V1: &str = r#"import { useState } from 'react';
export default function Hello({ who }: { who: string }) {
  const [n, setN] = useState(0);
  return <div className="p-4 text-blue-600">
    <h1 id="greet">Hello {who} v1</h1>
    <button id="inc" onClick={() => setN(n + 1)}>clicked {n}</button>
  </div>;
}
"#;

const HELLO_V2: &str = r#"export default function Hello({ who }: { who: string }) {
  return <p id="greet" className="font-bold">Goodbye {who} v2</p>;
}
"#;

const BAD: &str = "export default function Bad() {\n  return <div>\n    <span>oops</div>;\n}\n";

const THROWS: &str = r#"export default function Boom() {
  const items: string[] | null = null;
  return <ul>{items!.map((i) => <li>{i}</li>)}</ul>;
}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn deploy_redeploy_errors_and_versions() {
    let Some(b) = Browser::launch() else { return };
    let s = Server::start(&["--signup-open", "true"]);
    let base = s.url.clone();
    let alice = signup(&base, "alice@example.com").await;
    assert_eq!(put_fn(&client(), &base, "deployer", DEPLOYER).await.status, 200);
    assert_eq!(put_fn(&client(), &base, "checker", CHECKER).await.status, 200);
    let to = format!("user:{}", alice.id);

    // The canvas is open before anything is deployed.
    let page = b.page();
    open_canvas(&page, &base, "/canvas", "alice@example.com");
    assert_eq!(page.eval(None, "document.querySelectorAll('section.ichi-ui').length"), json!(0));

    let r = deploy(&base, "hello", HELLO_V1, &to, json!({"who": "Alice"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["version"], 1);
    assert_eq!(r.json()["delivered"], 1, "pushed to the open canvas: {}", r.body);
    text_in(&page, "hello", "#greet", "Hello Alice v1");
    // Tailwind classes became CSS in the frame.
    let color = page.eval(Some(&frame("hello")), "getComputedStyle(document.querySelector('div.text-blue-600')).color");
    assert_ne!(color, json!("rgb(0, 0, 0)"), "text-blue-600 is styled: {color}");
    page.click(Some(&frame("hello")), "#inc");
    text_in(&page, "hello", "#inc", "clicked 1");

    // A redeploy that keeps the component's hooks keeps its state (Fast Refresh).
    let r = deploy(&base, "hello", &HELLO_V1.replace("v1</h1>", "v1b</h1>"), &to, json!({"who": "Alice"})).await;
    assert_eq!(r.json()["version"], 2, "{}", r.body);
    text_in(&page, "hello", "#greet", "Hello Alice v1b");
    text_in(&page, "hello", "#inc", "clicked 1");

    // A redeploy replaces it in place.
    let r = deploy(&base, "hello", HELLO_V2, &to, json!({"who": "Alice"})).await;
    assert_eq!(r.json()["version"], 3, "{}", r.body);
    text_in(&page, "hello", "#greet", "Goodbye Alice v2");
    assert_eq!(page.eval(Some(&frame("hello")), "document.querySelector('#inc') === null"), json!(true));
    assert_eq!(page.eval(None, "document.querySelectorAll('section.ichi-ui').length"), json!(1));

    // Versions and rollback (admin), pushed too.
    let (st, v) = api(&client(), "GET", format!("{base}/ui/hello/versions?to={to}"), None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["versions"].as_array().unwrap().len(), 3);
    let (st, v) = api(&client(), "POST", format!("{base}/ui/hello/rollback"), Some(json!({"to": to, "version": 1}))).await;
    assert_eq!((st, v["version"].clone()), (200, json!(1)), "{v}");
    text_in(&page, "hello", "#greet", "Hello Alice v1");

    // A canvas opened later gets the current version.
    let later = b.page();
    open_canvas(&later, &base, "/canvas/hello", "alice@example.com");
    text_in(&later, "hello", "#greet", "Hello Alice v1");
    drop(later);

    // A syntax error reaches Lua with line and column; nothing is deployed.
    let r = deploy(&base, "bad", BAD, &to, json!({})).await;
    assert_eq!(r.status, 422, "{}", r.body);
    let e = r.json();
    assert_eq!(e["error"]["name"], "UI_COMPILE_ERROR", "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains("bad.tsx:3:"), "{msg}");
    let r = call_fn(&client(), &base, "checker", json!({"name": "bad", "code": BAD})).await;
    let c = r.json();
    assert_eq!(c["deployed"], false, "{c}");
    assert!(c["error"].as_str().unwrap().contains("bad.tsx:3:"), "{c}");
    assert_eq!(c["check"]["ok"], false, "{c}");
    assert_eq!(c["check"]["line"], 3, "{c}");
    assert!(c["check"]["column"].as_i64().unwrap() > 1, "{c}");
    let (st, _) = api(&client(), "GET", format!("{base}/ui/bad/versions?to={to}"), None).await;
    assert_eq!(st, 404);

    // A component that throws: the overlay in place, the error logged with its TSX line.
    let r = deploy(&base, "boom", THROWS, &to, json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    page.wait_for(Some(&frame("boom")), "!!document.querySelector('#ichi-error')", 60);
    page.wait_for(Some(&frame("boom")), "document.querySelector('#ichi-error-position')?.textContent.startsWith('at boom.tsx:3:')", 60);
    let (st, v) = api(&client(), "GET", format!("{base}/canvas/errors"), None).await;
    assert_eq!(st, 200, "{v}");
    let errs = v["errors"].as_array().unwrap();
    let boom = errs.iter().find(|e| e["name"] == "boom").unwrap_or_else(|| panic!("{v}"));
    assert_eq!(boom["line"], 3, "{boom}");
    assert_eq!(boom["user_id"], json!(alice.id));
    // The other UI still works.
    text_in(&page, "hello", "#greet", "Hello Alice v1");

    // An error outside rendering (an event handler) is reported with its TSX line too.
    let clicky = "export default function Clicky() {\n  const fail = () => {\n    throw new Error('handler failed');\n  };\n  return <button id=\"b\" onClick={fail}>go</button>;\n}\n";
    assert_eq!(deploy(&base, "clicky", clicky, &to, json!({})).await.status, 200);
    text_in(&page, "clicky", "#b", "go");
    page.click(Some(&frame("clicky")), "#b");
    let mut found = Value::Null;
    for _ in 0..200 {
        let (_, v) = api(&client(), "GET", format!("{base}/canvas/errors"), None).await;
        if let Some(e) = v["errors"].as_array().unwrap().iter().find(|e| e["name"] == "clicky") {
            found = e.clone();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(found["line"], 3, "{found}");
    assert!(found["message"].as_str().unwrap().contains("handler failed"), "{found}");

    // A user may deploy only to themselves.
    let (st, v) = api(&alice.client, "POST", format!("{base}/fn/deployer"), Some(json!({"name": "x", "code": HELLO_V2, "to": "user:someone-else"}))).await;
    assert_eq!((st, v["error"]["name"].clone()), (403, json!("ACCESS_DENIED")), "{v}");
    let (st, v) = api(&alice.client, "POST", format!("{base}/fn/deployer"), Some(json!({"name": "mine", "code": HELLO_V2, "props": {"who": "me"}}))).await;
    assert_eq!(st, 200, "{v}");
    text_in(&page, "mine", "#greet", "Goodbye me v2");
}

const NOTES_UI: &str = r#"import { useEffect, useState } from 'react';
type Note = { id: number; body: string };
export default function Notes() {
  const [notes, setNotes] = useState<Note[] | null>(null);
  const load = () => ichi.sql('SELECT id, body FROM my_notes ORDER BY id', {}).then(setNotes);
  useEffect(() => {
    load();
    return ichi.subscribe('my_notes', () => load());
  }, []);
  if (!notes) return <p id="loading">loading</p>;
  return <ul id="notes">{notes.map((n) => <li key={n.id}>{n.body}</li>)}</ul>;
}
"#;

async fn notes_server() -> (Server, String) {
    let s = Server::start(&["--signup-open", "true"]);
    let base = s.url.clone();
    ok(&client(), &base, "CREATE TABLE notes(id INTEGER PRIMARY KEY, owner TEXT NOT NULL, body TEXT)").await;
    let r = jpost(&client(), &base, "/admin/policies", json!({"name": "my_notes", "table": "notes", "roles": ["user"], "using": "owner = auth_userid()", "defaults": {"owner": "auth_userid()"}})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = jpost(&client(), &base, "/admin/cdc", json!({"table": "notes"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(put_fn(&client(), &base, "deployer", DEPLOYER).await.status, 200);
    (s, base)
}

async fn add_note(u: &User, base: &str, body: &str) {
    let r = post(&u.client, base, &[("param_b", body)], "INSERT INTO my_notes(body) VALUES ({b:String})").await;
    assert_eq!(r.status, 200, "{}", r.body);
}

fn notes_text(page: &Page) -> Value {
    page.eval(Some(&frame("notes")), "Array.from(document.querySelectorAll('#notes li')).map(l => l.textContent)")
}

#[tokio::test(flavor = "multi_thread")]
async fn rls_per_user_and_live_cdc() {
    let Some(b) = Browser::launch() else { return };
    let (_s, base) = notes_server().await;
    let alice = signup(&base, "alice@example.com").await;
    let bob = signup(&base, "bob@example.com").await;
    add_note(&alice, &base, "alice-1").await;
    add_note(&bob, &base, "bob-1").await;
    add_note(&alice, &base, "alice-2").await;
    for u in [&alice, &bob] {
        let r = deploy(&base, "notes", NOTES_UI, &format!("user:{}", u.id), json!({})).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let pa = b.page();
    open_canvas(&pa, &base, "/canvas", "alice@example.com");
    let pb = b.page();
    open_canvas(&pb, &base, "/canvas", "bob@example.com");
    pa.wait_for(Some(&frame("notes")), "document.querySelectorAll('#notes li').length === 2", 60);
    pb.wait_for(Some(&frame("notes")), "document.querySelectorAll('#notes li').length === 1", 60);
    assert_eq!(notes_text(&pa), json!(["alice-1", "alice-2"]));
    assert_eq!(notes_text(&pb), json!(["bob-1"]));

    // A change arrives live, only where the policy lets it.
    add_note(&alice, &base, "alice-3").await;
    pa.wait_for(Some(&frame("notes")), "document.querySelectorAll('#notes li').length === 3", 60);
    assert_eq!(notes_text(&pa), json!(["alice-1", "alice-2", "alice-3"]));
    add_note(&bob, &base, "bob-2").await;
    pb.wait_for(Some(&frame("notes")), "document.querySelectorAll('#notes li').length === 2", 60);
    assert_eq!(notes_text(&pb), json!(["bob-1", "bob-2"]));
    assert_eq!(notes_text(&pa), json!(["alice-1", "alice-2", "alice-3"]));

    // A reload signs in with the session cookie alone (API and WebSocket), no form.
    pa.goto(&format!("{base}/canvas"));
    pa.wait_for(None, "document.querySelector('#ichi-status')?.textContent === 'live'", 60);
    assert_eq!(pa.eval(None, "document.querySelector('#ichi-email') === null"), json!(true));
    pa.wait_for(Some(&frame("notes")), "document.querySelectorAll('#notes li').length === 3", 60);
    add_note(&alice, &base, "alice-4").await;
    pa.wait_for(Some(&frame("notes")), "document.querySelectorAll('#notes li').length === 4", 60);

    // Everything the browser asked for was on 127.0.0.1.
    for p in [&pa, &pb] {
        for r in p.requests() {
            let url = r["url"].as_str().unwrap();
            assert!(url.starts_with("http://127.0.0.1:") || url.starts_with("ws://127.0.0.1:"), "{url}");
        }
    }
}

const HOSTILE: &str = r#"import { useEffect, useState } from 'react';
declare const SERVER: string;
const violations: string[] = [];
document.addEventListener('securitypolicyviolation', (e) => violations.push(e.effectiveDirective + ' ' + e.blockedURI));
async function probe(): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  const tryIt = async (k: string, f: () => any) => {
    try { const v = await f(); out[k] = 'LEAK ' + String(v).slice(0, 60); } catch (e: any) { out[k] = 'blocked ' + String(e && e.name); }
  };
  await tryIt('parent_dom', () => (window.parent as any).document.body.innerHTML);
  await tryIt('parent_storage', () => (window.parent as any).localStorage.length);
  await tryIt('top_location', () => String(window.top!.location.href));
  await tryIt('cookie', () => document.cookie);
  await tryIt('local_storage', () => window.localStorage.length);
  await tryIt('fetch_server', () => fetch(SERVER + '/auth/me').then((r) => r.status));
  await tryIt('fetch_other', () => fetch('http://10.255.255.1/steal').then((r) => r.status));
  await tryIt('fetch_name', () => fetch('https://example.com/steal').then((r) => r.status));
  await tryIt('websocket', () => new Promise((res, rej) => { const w = new WebSocket(SERVER.replace('http', 'ws') + '/ws'); w.onopen = () => res('open'); w.onerror = () => rej(new Error('ws')); }));
  await tryIt('image', () => new Promise((res, rej) => { const i = new Image(); i.onload = () => res('loaded'); i.onerror = () => rej(new Error('img')); i.src = 'http://example.com/p.gif'; }));
  await tryIt('popup', () => { const w = window.open('http://example.com/'); if (!w) throw new Error('no popup'); return 'opened'; });
  await new Promise((r) => setTimeout(r, 300));
  out.csp = violations.join(' | ');
  return out;
}
export default function Hostile({ server }: { server: string }) {
  (globalThis as any).SERVER = server;
  const [out, setOut] = useState<Record<string, string> | null>(null);
  useEffect(() => { probe().then(setOut); }, []);
  return <pre id="probe">{out ? JSON.stringify(out) : 'probing'}</pre>;
}
"#;

/// Stopped by a Content-Security-Policy in the browser (Chromium names it either way).
fn blocked_by_csp(r: &Value) -> bool {
    matches!(r["failure"].as_str(), Some("csp" | "net::ERR_BLOCKED_BY_CSP"))
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_component_is_isolated() {
    let Some(b) = Browser::launch() else { return };
    let s = Server::start(&["--signup-open", "true"]);
    let base = s.url.clone();
    let alice = signup(&base, "alice@example.com").await;
    assert_eq!(put_fn(&client(), &base, "deployer", DEPLOYER).await.status, 200);
    let to = format!("user:{}", alice.id);
    let page = b.page();
    open_canvas(&page, &base, "/canvas", "alice@example.com");
    assert_eq!(deploy(&base, "hello", HELLO_V2, &to, json!({"who": "A"})).await.status, 200);
    let r = deploy(&base, "hostile", HOSTILE, &to, json!({"server": base})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let out = page.wait_for(
        Some(&frame("hostile")),
        "(() => { const t = document.querySelector('#probe')?.textContent; return t && t !== 'probing' ? t : null })()",
        90,
    );
    let out: Value = serde_json::from_str(out.as_str().unwrap()).unwrap();
    for (k, v) in out.as_object().unwrap() {
        if k != "csp" {
            assert!(v.as_str().unwrap().starts_with("blocked"), "{k}: {v} (all: {out})");
        }
    }
    assert_eq!(out.as_object().unwrap().len(), 12, "{out}");
    // The frame's CSP stopped the connections and the image (not only CORS or the proxy).
    let csp = out["csp"].as_str().unwrap();
    for want in [format!("connect-src {base}/auth/me"), "connect-src http://10.255.255.1/steal".into(), "img-src http://example.com/p.gif".into()] {
        assert!(csp.contains(&want), "{want} in {csp}");
    }
    // The shell and the other UI are untouched.
    text_in(&page, "hello", "#greet", "Goodbye A v2");
    assert_eq!(page.eval(None, "document.querySelector('#ichi-status').textContent"), json!("live"));
    // Frames carried no credentials and asked only their own origin.
    let frame_origin = page.eval(None, "document.body.dataset.frameOrigin");
    let frame_origin = frame_origin.as_str().unwrap();
    assert_ne!(frame_origin, base, "the frame has its own origin");
    // Nothing left 127.0.0.1: other hosts were stopped in the browser (CSP) before the network.
    for r in page.requests() {
        let url = r["url"].as_str().unwrap();
        if !(url.starts_with("http://127.0.0.1:") || url.starts_with("ws://127.0.0.1:")) {
            assert!(blocked_by_csp(&r), "a request to another host: {r}");
            assert!(r["status"].is_null(), "{r}");
            continue;
        }
        let from_frame = r["frame"].as_str().is_some_and(|f| f.starts_with(frame_origin));
        if from_frame {
            if !url.starts_with(frame_origin) {
                assert!(blocked_by_csp(&r), "a frame reached another origin: {r}");
            }
            let h = &r["headers"];
            assert!(h.get("authorization").is_none() && h.get("cookie").is_none(), "credentials from a frame: {r}");
        }
    }
    // The browser itself reaches nothing but 127.0.0.1.
    let other = b.page();
    for url in ["http://example.com/", "http://10.255.255.1/", "https://localhost.invalid/"] {
        let e = other.try_goto(url).expect_err(url);
        assert!(e.contains("net::ERR_"), "{url}: {e}");
    }
    drop(other);
    // The frame origin serves no API.
    let r = request(&anon_client(), reqwest::Method::GET, format!("{frame_origin}/auth/me"), None).await;
    assert_eq!(r.status, 404);
}

const STATS_FN: &str = r#"
return function(input, ctx)
  local rows = db.query("SELECT count(*) AS n FROM my_notes")
  local total = rows[1].n * 10 + 7
  local label = "total-" .. total
  return {label = label, total = total}
end
"#;

const DASH: &str = r#"import { useEffect, useState } from 'react';
export default function Dash() {
  const [s, setS] = useState<{ label: string } | null>(null);
  useEffect(() => { ichi.call('stats', {}).then(setS); }, []);
  return <div className="p-2">
    <span id="label">{s ? s.label : 'loading'}</span>
  </div>;
}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn debugger_shows_the_clicked_elements_call() {
    let Some(b) = Browser::launch() else { return };
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(dir.path(), &["--signup-open", "true"], &[("ICHIBASE_TRACES__DEBUG_ROLES", r#"["user"]"#)]);
    let base = s.url.clone();
    ok(&client(), &base, "CREATE TABLE notes(id INTEGER PRIMARY KEY, owner TEXT NOT NULL, body TEXT)").await;
    let r = jpost(&client(), &base, "/admin/policies", json!({"name": "my_notes", "table": "notes", "roles": ["user"], "using": "owner = auth_userid()", "defaults": {"owner": "auth_userid()"}})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(put_fn(&client(), &base, "deployer", DEPLOYER).await.status, 200);
    assert_eq!(put_fn(&client(), &base, "stats", STATS_FN).await.status, 200);
    let alice = signup(&base, "alice@example.com").await;
    for n in ["a", "b", "c"] {
        add_note(&alice, &base, n).await;
    }
    let page = b.page();
    open_canvas(&page, &base, "/canvas?debug=1", "alice@example.com");
    let r = deploy(&base, "dash", DASH, &format!("user:{}", alice.id), json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    text_in(&page, "dash", "#label", "total-37");
    page.click(Some(&frame("dash")), "#label");
    page.wait_for(None, "document.querySelector('#ichi-inspect-vars')?.textContent.includes('total = 37')", 60);
    let text = |sel: &str| page.eval(None, &format!("document.querySelector('{sel}')?.textContent")).as_str().unwrap_or_default().to_string();
    let vars = text("#ichi-inspect-vars");
    assert!(vars.contains("label = \"total-37\""), "{vars}");
    assert!(text("#ichi-inspect-call").contains("ichi.call('stats'"), "{}", text("#ichi-inspect-call"));
    assert!(text("#ichi-inspect-source").contains("dash.tsx:6:"), "{}", text("#ichi-inspect-source"));
    assert!(text("#ichi-inspect-rows").contains("total-37"));
    // The timeline: deploy, call (with its trace), render, the click.
    let kinds = page.eval(None, "Array.from(document.querySelectorAll('#ichi-timeline > li')).map(l => l.dataset.kind)");
    for k in ["deploy", "call", "render", "event"] {
        assert!(kinds.as_array().unwrap().contains(&json!(k)), "{k} in {kinds}");
    }
}

/// UIs in bundles: compile-checked in a branch before merge, deployed with the merge (no
/// browser needed).
#[tokio::test]
async fn bundle_uis_are_checked_and_merged() {
    let s = Server::start(&[]);
    let (c, base) = (client(), s.url.clone());
    let (st, r) = api(&c, "POST", format!("{base}/branches"), Some(json!({"name": "ui-try"}))).await;
    assert_eq!(st, 200, "{r}");
    let bundle = |code: &str| {
        json!({
            "name": "hello-ui",
            "functions": [{"name": "hi", "source": "return function() return 'hi' end"}],
            "uis": [{"name": "hello", "code": code, "props": {"who": "all"}, "to": "user:u1"}],
            "checks": [{"name": "hi", "function": "hi", "input": {}, "expect": "hi"}]
        })
    };
    let (st, r) = api(&c, "POST", format!("{base}/branches/ui-try/apply"), Some(bundle(BAD))).await;
    assert_eq!(st, 422, "{r}");
    assert_eq!(r["error"]["name"], "UI_COMPILE_ERROR", "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("ui 'hello' at line 3 column"), "{r}");
    let (st, r) = api(&c, "POST", format!("{base}/branches/ui-try/apply"), Some(bundle(HELLO_V2))).await;
    assert_eq!((st, r["ok"].clone()), (200, json!(true)), "{r}");
    // Not live before the merge.
    let (st, _) = api(&c, "GET", format!("{base}/ui/hello/versions?to=user:u1"), None).await;
    assert_eq!(st, 404);
    // An open canvas (here a WebSocket in the target's channel) gets the merged UI pushed.
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
    let mut req = (base.replace("http://", "ws://") + "/ws").into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {ADMIN_KEY}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send(Message::Text(json!({"type": "join", "channel": "user:u1", "presence": false}).to_string().into())).await.unwrap();
    let mut next = async || -> Value {
        loop {
            let m = tokio::time::timeout(std::time::Duration::from_secs(20), ws.next()).await.expect("a frame within 20 s").unwrap().unwrap();
            if let Message::Text(t) = m {
                return serde_json::from_str(&t).unwrap();
            }
        }
    };
    while next().await["type"] != "joined" {}
    let (st, r) = api(&c, "POST", format!("{base}/branches/ui-try/merge"), None).await;
    assert_eq!(st, 200, "{r}");
    let pushed = loop {
        let f = next().await;
        if f["type"] == "ui" {
            break f;
        }
    };
    assert_eq!((pushed["ui"]["name"].clone(), pushed["ui"]["version"].clone()), (json!("hello"), json!(1)), "{pushed}");
    let (st, v) = api(&c, "GET", format!("{base}/ui/hello?to=user:u1"), None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!((v["version"].clone(), v["props"]["who"].clone()), (json!(1), json!("all")), "{v}");
    assert!(v["source"].as_str().unwrap().contains("Goodbye"));
    // The compiled code is served by the frame origin under its hash.
    let (_, vs) = api(&c, "GET", format!("{base}/ui/hello/versions?to=user:u1"), None).await;
    let hash = vs["versions"][0]["hash"].as_str().unwrap().to_string();
    let (_, mine) = api(&c, "GET", format!("{base}/canvas/uis"), None).await;
    let port = mine["frame_port"].as_u64().unwrap();
    let r = request(&anon_client(), reqwest::Method::GET, format!("http://127.0.0.1:{port}/code/{hash}.js"), None).await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("react/jsx-dev-runtime"), "{}", r.body);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
}

/// Bad input to the HTTP API: typed errors, nothing stored (no browser needed).
#[tokio::test]
async fn http_api_refuses_bad_input() {
    let s = Server::start(&["--signup-open", "true"]);
    let (c, base) = (client(), s.url.clone());
    let put = |name: &str, body: Value| {
        let c = c.clone();
        let url = format!("{base}/ui/{name}");
        async move { json_request(&c, reqwest::Method::PUT, url, Some(body)).await }
    };
    let r = put("bad name!", json!({"code": HELLO_V2, "to": "user:u1"})).await;
    assert_eq!((r.status, r.json()["error"]["name"].clone()), (400, json!("BAD_ARGUMENTS")), "{}", r.body);
    let r = put("x", json!({"code": HELLO_V2, "to": "user:u1", "props": [1, 2]})).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = put("x", json!({"code": "x".repeat(300 * 1024), "to": "user:u1"})).await;
    assert_eq!((r.status, r.json()["error"]["name"].clone()), (413, json!("REQUEST_TOO_LARGE")), "{}", r.body);
    let r = put("x", json!({"code": HELLO_V2})).await;
    assert_eq!(r.status, 400, "the admin key has no user: name the target: {}", r.body);
    let r = put("x", json!({"code": HELLO_V2, "to": "user:u1", "extra": 1})).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = put("x", json!({"code": BAD, "to": "user:u1"})).await;
    assert_eq!((r.status, r.json()["error"]["name"].clone()), (422, json!("UI_COMPILE_ERROR")), "{}", r.body);
    let (st, v) = api(&c, "GET", format!("{base}/ui"), None).await;
    assert_eq!((st, v["uis"].as_array().unwrap().len()), (200, 0), "{v}");
    // Not for users: deploy over HTTP, listing, errors log.
    let u = signup(&base, "u@example.com").await;
    let r = json_request(&u.client, reqwest::Method::PUT, format!("{base}/ui/x"), Some(json!({"code": HELLO_V2}))).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let (st, _) = api(&u.client, "GET", format!("{base}/canvas/errors"), None).await;
    assert_eq!(st, 403);
    // An error report for an unknown UI, and a malformed one.
    let (st, _) = api(&u.client, "POST", format!("{base}/canvas/errors"), Some(json!({"name": "x", "hash": "0".repeat(64), "message": "m"}))).await;
    assert_eq!(st, 404);
    let (st, _) = api(&u.client, "POST", format!("{base}/canvas/errors"), Some(json!({"name": "x", "hash": "zz", "message": "m"}))).await;
    assert_eq!(st, 400);
    // Anonymous visitors get the page (it shows the sign-in form) but no UIs.
    let r = request(&anon_client(), reqwest::Method::GET, format!("{base}/canvas"), None).await;
    assert_eq!(r.status, 200);
    let csp = r.header("content-security-policy").unwrap().to_string();
    assert!(csp.contains("frame-src http://127.0.0.1:") && csp.contains("script-src 'self'"), "{csp}");
    let (st, v) = api(&anon_client(), "GET", format!("{base}/canvas/uis"), None).await;
    assert_eq!((st, v["uis"].as_array().map(|a| a.len())), (200, Some(0)), "{v}");
}

/// Hostile or careless Lua gets a clear error from every `ui` entry point (no browser needed).
#[tokio::test]
async fn lua_ui_validates_its_arguments() {
    let s = Server::start(&[]);
    let (c, base) = (client(), s.url.clone());
    let src = r#"
return function(input, ctx)
  local cases = {
    function() return ui.deploy("x") end,
    function() return ui.deploy{} end,
    function() return ui.deploy{name = 1, code = "x", to = "user:u"} end,
    function() return ui.deploy{name = "x", code = {}, to = "user:u"} end,
    function() return ui.deploy{name = "x", code = "export default () => <p/>", to = "user:u", extra = 1} end,
    function() return ui.deploy{name = "x", code = "export default () => <p/>", to = "user:u", props = "no"} end,
    function() return ui.deploy{name = "../x", code = "export default () => <p/>", to = "user:u"} end,
    function() return ui.deploy{name = "x", code = "export default () => <p/>", to = ""} end,
    function() return ui.deploy{name = "x", code = string.rep("a", 300 * 1024), to = "user:u"} end,
    function() return db.tx(function() return ui.deploy{name = "x", code = "export default () => <p/>", to = "user:u"} end) end,
    function() return ui.check(nil) end,
    function() return ui.check{name = "x"} end,
  }
  local out = {}
  for i, f in ipairs(cases) do
    local ok, err = pcall(f)
    out[i] = ok and "ok" or tostring(err)
  end
  out[#out + 1] = ui.deploy{name = "fine", code = "export default () => <p>fine</p>", to = "user:u"}.version
  return out
end
"#;
    assert_eq!(put_fn(&c, &base, "cases", src).await.status, 200);
    let r = call_fn(&c, &base, "cases", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let out = r.json();
    let out = out.as_array().unwrap();
    assert_eq!(out.len(), 13, "{out:?}");
    for (i, want) in [
        "expects a table",
        "'name' is required",
        "'name' must be a string",
        "'code' must be a string",
        "unknown field 'extra'",
        "props must be a table",
        "UI name '../x'",
        "no user",
        "max_source",
        "cannot run inside db.tx",
        "expects a table",
        "'code' is required",
    ]
    .iter()
    .enumerate()
    {
        let got = out[i].as_str().unwrap_or_default();
        assert!(got.contains(want), "case {}: {got:?} should mention {want:?}", i + 1);
    }
    assert_eq!(out[12], 1, "a good deploy still works: {out:?}");
}
