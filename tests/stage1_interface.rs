//! Issue 14, "Documentation and interface" — the minor rough edges a new user met, each through
//! the real binary: sign-in's `created_at`, Lua errors (a trace id that opens, tables thrown as
//! errors, `return 42` refused at deploy, instruction counts of traced runs), ClickHouse's
//! name for a parameter column, policy error offsets in the user's text, paths in file errors,
//! the final `X-ClickHouse-Summary` of a streamed answer.

mod common;

use common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::process::Command;

#[tokio::test]
async fn signin_answers_the_users_created_at() {
    let s = Server::start(&[]);
    let admin = client();
    let r = jpost(&admin, &s.url, "/admin/users", json!({"email": "ann@example.com", "password": "correct-horse-42"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let created = r.json()["created_at"].as_str().unwrap().to_string();
    assert!(created.ends_with('Z') && created.contains('T'), "{created}");
    let r = signin(&anon_client(), &s.url, "ann@example.com", "correct-horse-42").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["user"]["created_at"], json!(created), "{}", r.body);
    // Every timestamp the APIs answer is RFC 3339 UTC (sessions' expiry was epoch seconds).
    let u = client_with_token(r.json()["access_token"].as_str().unwrap());
    let (st, j) = api(&u, "GET", format!("{}/auth/sessions", s.url), None).await;
    assert_eq!(st, 200, "{j}");
    let exp = j["sessions"][0]["expires_at"].as_str().unwrap_or_default().to_string();
    assert!(exp.len() == 24 && exp.as_bytes()[10] == b'T' && exp.ends_with('Z'), "{j}");
    // Lists are wrapped in an object named after what they hold; analytics views too.
    let (st, j) = api(&admin, "GET", format!("{}/admin/analytics/views", s.url), None).await;
    assert_eq!(st, 200, "{j}");
    assert!(j["views"].is_array(), "{j}");
}

#[tokio::test]
async fn deploy_refuses_a_chunk_that_returns_no_function() {
    let s = Server::start(&[]);
    let c = client();
    for (src, what) in [("return 42", "a number"), ("local x = 1", "nothing"), ("return {}", "a table")] {
        let r = put_fn(&c, &s.url, "f", src).await;
        assert_eq!(r.status, 400, "{src}: {}", r.body);
        let m = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(m.contains("must return a function") && m.contains(what), "{src}: {m}");
    }
    // A function, a global handler, or a top level the bare check cannot judge (it calls a
    // component) deploy as before.
    for src in [
        "return function() return 1 end",
        "function handler(input) return 2 end",
        "local one = db.one('SELECT 1 AS x') return function() return one end",
    ] {
        let r = put_fn(&c, &s.url, "f", src).await;
        assert_eq!(r.status, 200, "{src}: {}", r.body);
    }
    // The CLI checks the same.
    let file = s.data_dir.join("bad.lua");
    std::fs::write(&file, "return 42").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ichibase"))
        .args(["fn", "deploy", "g"])
        .arg(&file)
        .arg("--data-dir")
        .arg(&s.data_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must return a function"));
}

#[tokio::test]
async fn tables_thrown_as_errors_arrive_as_json() {
    let s = Server::start(&[]);
    let c = client();
    let r = put_fn(&c, &s.url, "t1", "return function() error({code = 42}) end").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = call_fn(&c, &s.url, "t1", json!({})).await;
    assert_eq!(r.status, 422, "{}", r.body);
    let e = &r.json()["error"];
    assert_eq!(e["message"], json!("{\"code\":42}"), "{}", r.body);
    assert_eq!(e["value"], json!({"code": 42}), "{}", r.body);
    assert!(!r.body.contains("table: 0x") && !r.body.contains("<table"), "{}", r.body);

    // {code =, message =}: the message is the message; the table stays readable.
    let src = "return function(input)\n  assert(input.n < 10, {code = 'TOO_BIG', message = 'n must be below 10'})\n  return input.n\nend";
    put_fn(&c, &s.url, "t2", src).await;
    let r = call_fn(&c, &s.url, "t2", json!({"n": 11})).await;
    assert_eq!(r.status, 422, "{}", r.body);
    let e = &r.json()["error"];
    assert_eq!(e["message"], json!("n must be below 10"), "{}", r.body);
    assert_eq!(e["value"]["code"], json!("TOO_BIG"), "{}", r.body);
    assert_eq!(call_fn(&c, &s.url, "t2", json!({"n": 3})).await.body.trim(), "3");

    // Lua semantics are unchanged: a caught table is the table, and levels point where they did.
    let src = "return function()\n  local ok, e = pcall(error, {x = 1})\n  return {ok = ok, x = e.x}\nend";
    put_fn(&c, &s.url, "t3", src).await;
    let r = call_fn(&c, &s.url, "t3", json!({})).await;
    assert_eq!(r.json(), json!({"ok": false, "x": 1}), "{}", r.body);
    let src = "local function f() error('boom', 2) end\nreturn function()\n  f()\nend";
    put_fn(&c, &s.url, "t4", src).await;
    let r = call_fn(&c, &s.url, "t4", json!({})).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.json()["error"]["line"], json!(3), "{}", r.body);
    assert_eq!(r.json()["error"]["message"], json!("boom"), "{}", r.body);
}

#[tokio::test]
async fn an_error_answers_a_trace_id_that_opens_or_none() {
    let s = Server::start(&["--signup-open", "true"]);
    let c = client();
    put_fn(&c, &s.url, "boom", "return function()\n  log.info('about to fail')\n  error('boom')\nend").await;
    // The admin (who may trace) gets a trace id that opens: a minimal trace of the failure.
    let r = call_fn(&c, &s.url, "boom", json!({})).await;
    assert_eq!(r.status, 422, "{}", r.body);
    let id = r.json()["error"]["trace_id"].as_str().expect("trace id").to_string();
    let t = read(c.get(format!("{}/trace/{id}", s.url)).send().await.unwrap()).await;
    assert_eq!(t.status, 200, "{}", t.body);
    let tj = &t.json()["trace"];
    assert_eq!(tj["outcome"], json!("error"), "{}", t.body);
    assert_eq!(tj["error_line"], json!(3), "{}", t.body);
    assert!(t.body.contains("about to fail"), "{}", t.body);
    // A user who may not trace gets no id to open.
    let u = signup(&s.url, "bob@example.com").await;
    let r = call_fn(&u.client, &s.url, "boom", json!({})).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.json()["error"]["trace_id"].is_null(), "{}", r.body);
}

#[tokio::test]
async fn traced_runs_count_their_instructions() {
    let s = Server::start(&[]);
    let c = client();
    let src = "return function()\n  local s = 0\n  for i = 1, 20 do s = s + i end\n  return s\nend";
    put_fn(&c, &s.url, "sum", src).await;
    for traced in [true, false] {
        let url = format!("{}/fn/sum{}", s.url, if traced { "?trace=1" } else { "" });
        let r = read(c.post(url).body("{}").send().await.unwrap()).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body.trim(), "210");
        if traced {
            let id = r.header("x-ichibase-trace-id").unwrap().to_string();
            let t = read(c.get(format!("{}/trace/{id}", s.url)).send().await.unwrap()).await;
            let n = t.json()["trace"]["instructions"].as_i64().unwrap();
            // 20 loop iterations are at least 40 VM instructions (ADD, FORLOOP).
            assert!(n >= 40, "traced run reports {n} instructions: {}", t.body);
        }
    }
}

#[tokio::test]
async fn a_parameter_column_is_named_as_clickhouse_names_it() {
    let s = Server::start(&[]);
    let c = client();
    let r = post(&c, &s.url, &[("param_x", "5")], "SELECT {x:Int64} FORMAT JSON").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["meta"][0]["name"], json!("_CAST(5, 'Int64')"), "{}", r.body);
    let r = post(
        &c,
        &s.url,
        &[("param_s", "it\\'s"), ("param_n", "2")],
        "SELECT {s:String}, {n:Int64} + 1 AS m, {n:Int64} * 2 FORMAT JSONCompact",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let names: Vec<_> = r.json()["meta"].as_array().unwrap().iter().map(|m| m["name"].clone()).collect();
    assert_eq!(names, vec![json!("_CAST('it\\'s', 'String')"), json!("m"), json!("_CAST(2, 'Int64') * 2")], "{}", r.body);
}

#[tokio::test]
async fn policy_errors_point_into_the_users_text() {
    let s = Server::start(&[]);
    let c = client();
    ok(&c, &s.url, "CREATE TABLE notes(id INTEGER PRIMARY KEY, owner TEXT, body TEXT)").await;
    let r = jpost(&c, &s.url, "/admin/policies", json!({"name": "mine", "table": "notes", "roles": ["user"], "using": "owner = = auth_userid()"})).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let m = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(m.contains("at offset 8 of using: '= auth_userid()'"), "{m}");
    assert!(!m.contains("CREATE VIEW") && !m.contains("SELECT *"), "{m}");
    let r = jpost(&c, &s.url, "/admin/policies", json!({"name": "mine", "table": "notes", "roles": ["user"], "using": "owner = auth_userid()", "check": "body <> <> 1"})).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let m = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(m.starts_with("check:") && m.contains("at offset 8 of check: '<> 1'"), "{m}");
}

#[test]
fn file_errors_name_the_path() {
    // A file the server must read that is a directory: the OS error alone names nothing.
    for (file, named) in [("jwt-keys.json", "jwt-keys.json"), ("ichibase.db-wal", "ichibase.db")] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        // A first start creates the data directory, then the file is replaced by a directory.
        let out = Command::new(env!("CARGO_BIN_EXE_ichibase"))
            .args(["admin", "create-key", "--name", "k", "--data-dir"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let p = dir.join(file);
        let _ = std::fs::remove_file(&p);
        std::fs::create_dir(&p).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_ichibase"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&dir)
            .env("RUST_BACKTRACE", "0")
            .env("ICHIBASE_LOG", "warn")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err.lines().find(|l| l.starts_with("Error:")).unwrap_or("").to_string();
        assert!(
            line.contains(&dir.join(named).display().to_string()),
            "{file}: the error does not name the path: {err}"
        );
    }
}

#[test]
fn a_streamed_answer_ends_with_its_whole_summary() {
    let s = Server::start(&[]);
    let addr = s.url.trim_start_matches("http://").to_string();
    let sql = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 300000) SELECT x FROM c";
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.set_read_timeout(Some(std::time::Duration::from_secs(120))).unwrap();
    write!(
        conn,
        "POST / HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_KEY}\r\nTE: trailers\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{sql}",
        sql.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
    let header_rows = summary_rows(head).expect("summary header");
    assert!(header_rows < 300000, "the header already had everything: {head}");
    // The last chunk (0) is followed by the trailer.
    let tail = &rest[rest.len().saturating_sub(600)..];
    let trailer = tail.rsplit_once("\r\n0\r\n").map(|x| x.1).unwrap_or("");
    assert_eq!(summary_rows(trailer), Some(300000), "no whole summary in the trailer: {tail:?}");
}

/// `result_rows` of an `X-ClickHouse-Summary` line in `text`.
fn summary_rows(text: &str) -> Option<u64> {
    let line = text
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("x-clickhouse-summary:"))?;
    let v: serde_json::Value = serde_json::from_str(line.split_once(':')?.1.trim()).ok()?;
    v["result_rows"].as_str()?.parse().ok()
}

/// `--help` of a subcommand lists its own flags, not every `serve` setting.
#[test]
fn each_subcommand_help_lists_its_own_flags() {
    let help = |args: &[&str]| -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_ichibase")).args(args).arg("--help").output().unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let serve = help(&["serve"]);
    for f in ["--listen", "--lua-memory-limit", "--replicate-url", "--llm-url"] {
        assert!(serve.contains(f), "serve --help lacks {f}");
    }
    for (args, own, foreign) in [
        (&["restore"][..], &["--to", "--timestamp", "--replicate-url", "--data-dir"][..], &["--listen", "--lua-memory-limit", "--llm-url", "--signup-open"][..]),
        (&["backup", "status"], &["--json", "--replicate-url", "--replicate-endpoint", "--data-dir"], &["--listen", "--lua-memory-limit", "--llm-url", "--ws-queue"]),
        (&["generate"], &["--rounds", "--llm-url", "--llm-model", "--generate-max-rounds", "--data-dir"], &["--listen", "--replicate-url", "--ws-queue", "--signup-open"]),
    ] {
        let h = help(args);
        for f in own {
            assert!(h.contains(f), "{args:?} --help lacks {f}:\n{h}");
        }
        for f in foreign {
            assert!(!h.contains(f), "{args:?} --help lists {f}:\n{h}");
        }
        let flags = h.lines().filter(|l| l.trim_start().starts_with("--")).count();
        assert!(flags < 20, "{args:?} --help lists {flags} flags:\n{h}");
    }
    // Hidden settings are still accepted (a config file or env may name them anyway).
    let out = Command::new(env!("CARGO_BIN_EXE_ichibase"))
        .args(["backup", "status", "--lua-memory-limit", "1000000", "--data-dir"])
        .arg(tempfile::tempdir().unwrap().path().join("none"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("unexpected argument"), "{err}");
}
