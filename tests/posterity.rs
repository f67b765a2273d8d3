//! Posterity: requests, statements and Lua runs land in the DuckDB log; `POST /analytics` in
//! every format; the Parquet archive queried together with live rows; the role restriction of
//! analytics; and a kill -9 during a burst loses at most the last flush interval.

mod common;

use std::time::{Duration, Instant};

use common::{
    ADMIN_KEY, Resp, Server, anon_client, client, json_request, post, read, signup,
};
use serde_json::{Value, json};

/// POST `sql` to `/analytics` with URL arguments.
async fn analytics(c: &reqwest::Client, base: &str, args: &[(&str, &str)], sql: &str) -> Resp {
    read(
        c.post(format!("{base}/analytics"))
            .query(args)
            .body(sql.to_string())
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// Rows of an analytics query as JSON objects.
async fn rows(c: &reqwest::Client, base: &str, sql: &str) -> Vec<Value> {
    let r = analytics(
        c,
        base,
        &[
            ("default_format", "JSON"),
            ("output_format_json_quote_64bit_integers", "0"),
        ],
        sql,
    )
    .await;
    assert_eq!(r.status, 200, "{sql}: {}", r.body);
    r.json()["data"].as_array().unwrap().clone()
}

/// Poll until `sql` returns a first column >= `want` (the log commits every flush interval).
async fn wait_count(c: &reqwest::Client, base: &str, sql: &str, want: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = analytics(c, base, &[], sql).await;
        assert_eq!(r.status, 200, "{sql}: {}", r.body);
        let n: i64 = r.body.trim().parse().unwrap();
        if n >= want || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const FAST: &[&str] = &["--posterity-flush-secs", "0.2"];

#[tokio::test]
async fn requests_statements_and_lua_runs_are_logged() {
    let s = Server::start(FAST);
    let (c, base) = (client(), s.url.clone());
    assert_eq!(
        post(&c, &base, &[], "CREATE TABLE t(a INTEGER, b TEXT)")
            .await
            .status,
        200
    );
    assert_eq!(
        post(
            &c,
            &base,
            &[],
            "INSERT INTO t VALUES (1,'x'),(2,'y'),(3,'z')"
        )
        .await
        .status,
        200
    );
    let sel = post(
        &c,
        &base,
        &[("query_id", "q-select-1")],
        "SELECT * FROM t WHERE a >= 2",
    )
    .await;
    assert_eq!(sel.status, 200);
    let bad = post(
        &c,
        &base,
        &[("query_id", "q-bad-1")],
        "SELECT * FROM missing",
    )
    .await;
    assert_eq!(bad.status, 404);

    // Lua: one good run, one failing run, and analytics.query from Lua.
    let src = "return function(input)\n if input.fail then error('boom') end\n local r = analytics.query('SELECT count(*) AS n FROM log WHERE kind = {k:String}', {k = 'sql'})\n local t = db.query('SELECT count(*) AS c FROM t')\n return {n = r[1].n, c = t[1].c}\nend";
    let r = read(
        c.put(format!("{base}/fn/stats"))
            .body(src)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ok = json_request(
        &c,
        reqwest::Method::POST,
        format!("{base}/fn/stats"),
        Some(json!({})),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(ok.json()["n"].as_i64().unwrap() >= 0);
    assert_eq!(ok.json()["c"], 3);
    let trace_ok = ok.header("x-ichibase-trace-id").unwrap().to_string();
    let fail = json_request(
        &c,
        reqwest::Method::POST,
        format!("{base}/fn/stats"),
        Some(json!({"fail": true})),
    )
    .await;
    assert_eq!(fail.status, 422, "{}", fail.body);

    // HTTP rows: method, path, status, latency, bytes, identity, query id.
    wait_count(&c, &base, "SELECT count(*) FROM log WHERE kind = 'lua'", 2).await;
    let http = rows(
        &c,
        &base,
        "SELECT method, path, status, latency_ms, bytes, role, user_id FROM http_requests WHERE query_id = 'q-select-1'",
    )
    .await;
    assert_eq!(http.len(), 1, "{http:?}");
    assert_eq!(http[0]["method"], "POST");
    assert_eq!(http[0]["path"], "/");
    assert_eq!(http[0]["status"], 200);
    assert_eq!(http[0]["role"], "admin");
    assert_eq!(http[0]["bytes"], sel.body.len() as i64);
    assert!(http[0]["latency_ms"].as_f64().unwrap() > 0.0);
    let failed = rows(
        &c,
        &base,
        "SELECT status FROM http_requests WHERE query_id = 'q-bad-1'",
    )
    .await;
    assert_eq!(failed[0]["status"], 404);

    // SQL rows: text hash, rows, elapsed, and the text once in sql_texts.
    let sql = rows(
        &c,
        &base,
        "SELECT s.hash, s.verb, s.rows, s.elapsed_ms, s.outcome, t.text FROM sql_statements s JOIN sql_texts t USING (hash) WHERE s.query_id = 'q-select-1'",
    )
    .await;
    assert_eq!(sql.len(), 1, "{sql:?}");
    assert_eq!(sql[0]["verb"], "SELECT");
    assert_eq!(sql[0]["rows"], 2);
    assert_eq!(sql[0]["outcome"], "ok");
    assert_eq!(sql[0]["text"], "SELECT * FROM t WHERE a >= 2");
    assert_eq!(sql[0]["hash"].as_str().unwrap().len(), 16);
    let ins = rows(
        &c,
        &base,
        "SELECT rows FROM sql_statements WHERE verb = 'INSERT'",
    )
    .await;
    assert_eq!(ins[0]["rows"], 3);
    let err = rows(
        &c,
        &base,
        "SELECT outcome, error FROM sql_statements WHERE query_id = 'q-bad-1'",
    )
    .await;
    assert_eq!(
        err.len(),
        0,
        "a statement that does not prepare never ran: {err:?}"
    );

    // Lua rows: function, version, outcome, error, instructions, memory, elapsed, trace id.
    let lua = rows(
        &c,
        &base,
        "SELECT function, version, outcome, error, instructions, cpu_ms, memory, elapsed_ms, trace_id FROM lua_invocations ORDER BY ts",
    )
    .await;
    assert_eq!(lua.len(), 2, "{lua:?}");
    assert_eq!(lua[0]["function"], "stats");
    assert_eq!(lua[0]["version"], 1);
    assert_eq!(lua[0]["outcome"], "ok");
    assert_eq!(lua[0]["trace_id"], trace_ok.as_str());
    // Untraced, without an instruction budget: no count hook, so no instruction count; the
    // thread's CPU time instead.
    assert!(lua[0]["instructions"].is_null(), "{lua:?}");
    assert!(lua[0]["cpu_ms"].as_f64().is_some_and(|c| c >= 0.0), "{lua:?}");
    assert!(lua[0]["memory"].as_i64().unwrap() > 0);
    assert_eq!(lua[1]["outcome"], "error");
    assert!(
        lua[1]["error"].as_str().unwrap().contains("boom"),
        "{lua:?}"
    );

    // Statements from Lua's db component are logged too, with the invocation's trace id.
    let from_lua = rows(
        &c,
        &base,
        &format!("SELECT rows, detail->>'function' AS f FROM log WHERE kind = 'sql' AND (detail->>'from') = 'lua' AND trace_id = '{trace_ok}'"),
    )
    .await;
    assert_eq!(from_lua, vec![json!({"rows": 1, "f": "stats"})]);

    // The counters.
    let st = json_request(
        &c,
        reqwest::Method::GET,
        format!("{base}/admin/posterity"),
        None,
    )
    .await;
    assert_eq!(st.status, 200);
    assert_eq!(st.json()["dropped"], 0);
    assert!(st.json()["written"].as_u64().unwrap() > 5);
}

#[tokio::test]
async fn analytics_in_every_format_and_read_only() {
    let s = Server::start(FAST);
    let (c, base) = (client(), s.url.clone());
    let q = "SELECT x AS n, 'v' || x AS s FROM range(1, 3) t(x) ORDER BY x";
    let cases: &[(&str, &str)] = &[
        ("TabSeparated", "1\tv1\n2\tv2\n"),
        ("TabSeparatedWithNames", "n\ts\n1\tv1\n2\tv2\n"),
        ("CSV", "1,\"v1\"\n2,\"v2\"\n"),
        ("CSVWithNames", "\"n\",\"s\"\n1,\"v1\"\n2,\"v2\"\n"),
        (
            "JSONEachRow",
            "{\"n\":\"1\",\"s\":\"v1\"}\n{\"n\":\"2\",\"s\":\"v2\"}\n",
        ),
        ("JSONCompactEachRow", "[\"1\",\"v1\"]\n[\"2\",\"v2\"]\n"),
    ];
    for (f, want) in cases {
        let r = analytics(&c, &base, &[], &format!("{q} FORMAT {f}")).await;
        assert_eq!(r.status, 200, "{f}: {}", r.body);
        assert_eq!(r.body, *want, "{f}");
        assert_eq!(r.header("x-clickhouse-format"), Some(*f));
        let r = analytics(&c, &base, &[("default_format", f)], q).await;
        assert_eq!(r.body, *want, "default_format={f}");
    }
    for f in ["JSON", "JSONCompact"] {
        let r = analytics(&c, &base, &[("default_format", f)], q).await;
        let j = r.json();
        assert_eq!(j["rows"], 2, "{f}");
        assert_eq!(j["meta"][0]["type"], "Int64");
        assert!(
            r.header("x-clickhouse-summary")
                .unwrap()
                .contains("\"result_rows\":\"2\"")
        );
    }
    // GET with ?query=, typed parameters, limits.
    let r = read(
        c.get(format!("{base}/analytics"))
            .query(&[
                ("query", "SELECT {a:Int32} + {b:Int32}, {s:String}"),
                ("param_a", "2"),
                ("param_b", "3"),
                ("param_s", "it's"),
            ])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.body, "5\tit\\'s\n");
    let r = analytics(&c, &base, &[("param_a", "x")], "SELECT {a:Int32}").await;
    assert_eq!(r.code(), Some(457), "{}", r.body);
    let r = analytics(&c, &base, &[], "SELECT {a:Int32}").await;
    assert_eq!(r.code(), Some(456), "{}", r.body);
    let r = analytics(
        &c,
        &base,
        &[("max_result_rows", "5")],
        "SELECT * FROM range(10)",
    )
    .await;
    assert_eq!(r.code(), Some(396), "{}", r.body);
    let r = analytics(
        &c,
        &base,
        &[("max_execution_time", "1")],
        "SELECT count(*) FROM range(100000000000) a",
    )
    .await;
    assert_eq!(r.code(), Some(159), "{}", r.body);
    // Read-only, by DuckDB: writes, DDL, SET, several statements, file access.
    for sql in [
        "INSERT INTO log (ts, kind) VALUES (now(), 'x')",
        "DELETE FROM log",
        "CREATE TABLE x (a INT)",
        "SET VARIABLE user_id = 'someone'",
        "COPY log TO 'x.csv'",
        "ATTACH 'other.duckdb'",
        "CHECKPOINT",
    ] {
        let r = analytics(&c, &base, &[], sql).await;
        assert_eq!(r.status, 403, "{sql}: {}", r.body);
        assert_eq!(r.code(), Some(164), "{sql}: {}", r.body);
    }
    let r = analytics(&c, &base, &[], "SELECT 1; DELETE FROM log").await;
    assert!(matches!(r.code(), Some(62) | Some(164)), "{}", r.body);
    let r = analytics(&c, &base, &[], "SELECT 1; SELECT 2").await;
    assert_eq!(r.code(), Some(62), "{}", r.body);
    let r = analytics(&c, &base, &[], "SELECT * FROM read_csv('/etc/passwd')").await;
    assert_eq!(r.code(), Some(497), "{}", r.body);
    let r = analytics(&c, &base, &[], "SELECT * FROM nope").await;
    assert_eq!(r.status, 404, "{}", r.body);
    // Anonymous callers are refused (no grants).
    let r = analytics(&anon_client(), &base, &[], "SELECT 1 FROM log").await;
    assert_eq!(r.code(), Some(497), "{}", r.body);
}

#[tokio::test]
async fn app_tables_reach_duckdb() {
    let s = Server::start(FAST);
    let (c, base) = (client(), s.url.clone());
    let r = post(
        &c,
        &base,
        &[],
        "CREATE TABLE orders(id INTEGER PRIMARY KEY, customer TEXT, amount REAL, note BLOB)",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(
        &c,
        &base,
        &[],
        "INSERT INTO orders(customer, amount) WITH RECURSIVE n(v) AS (SELECT 1 UNION ALL SELECT v + 1 FROM n WHERE v < 5000) SELECT 'c' || (v % 7), v * 0.5 FROM n",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = rows(
        &c,
        &base,
        "SELECT customer, count(*) AS n, sum(amount) AS total FROM app_table('orders') GROUP BY ALL ORDER BY customer",
    )
    .await;
    assert_eq!(r.len(), 7);
    let n: i64 = r.iter().map(|x| x["n"].as_i64().unwrap()).sum();
    assert_eq!(n, 5000);
    // Live: a new row is visible at once.
    post(
        &c,
        &base,
        &[],
        "INSERT INTO orders(customer, amount) VALUES ('new', 1)",
    )
    .await;
    let r = analytics(&c, &base, &[], "SELECT count(*) FROM app_table('orders')").await;
    assert_eq!(r.body, "5001\n");
    let r = analytics(&c, &base, &[], "SELECT * FROM app_table('missing')").await;
    assert_ne!(r.status, 200);
}

#[tokio::test]
async fn role_restriction_holds() {
    let s = Server::start(&["--posterity-flush-secs", "0.2", "--signup-open", "true"]);
    let (admin, base) = (client(), s.url.clone());
    let common::User { id: alice_id, client: alice, .. } = signup(&base, "alice@example.com").await;
    let common::User { id: bob_id, client: bob, .. } = signup(&base, "bob@example.com").await;
    // Each makes a few requests of their own.
    for _ in 0..3 {
        post(&alice, &base, &[], "SELECT 1").await;
    }
    post(&bob, &base, &[], "SELECT 2").await;

    // The admin publishes "my requests" to the `user` role.
    let r = json_request(
        &admin,
        reqwest::Method::PUT,
        format!("{base}/admin/analytics/views/my_requests"),
        Some(json!({
            "sql": "SELECT ts, method, path, status, user_id FROM http_requests WHERE user_id = getvariable('user_id')",
            "roles": ["user"],
        })),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = json_request(
        &admin,
        reqwest::Method::GET,
        format!("{base}/admin/analytics/views"),
        None,
    )
    .await;
    // Lists are wrapped in an object, like every other list endpoint (issue 14).
    assert_eq!(r.json()["views"][0]["name"], "my_requests");
    assert_eq!(r.json()["views"][0]["roles"], json!(["user"]));
    // Engine objects cannot be replaced, and the role cannot publish views.
    let r = json_request(
        &admin,
        reqwest::Method::PUT,
        format!("{base}/admin/analytics/views/log"),
        Some(json!({"sql": "SELECT 1"})),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = json_request(
        &alice,
        reqwest::Method::PUT,
        format!("{base}/admin/analytics/views/mine"),
        Some(json!({"sql": "SELECT * FROM log", "roles": ["user"]})),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);

    wait_count(
        &admin,
        &base,
        &format!("SELECT count(*) FROM log WHERE kind = 'http' AND user_id = '{bob_id}'"),
        1,
    )
    .await;
    let mine = rows(&alice, &base, "SELECT DISTINCT user_id FROM my_requests").await;
    assert_eq!(mine, vec![json!({"user_id": alice_id})]);
    let r = analytics(&alice, &base, &[], "SELECT getvariable('user_id')").await;
    assert_eq!(r.body.trim(), alice_id);
    let theirs = rows(&bob, &base, "SELECT DISTINCT user_id FROM my_requests").await;
    assert_eq!(theirs, vec![json!({"user_id": bob_id})]);

    // Everything else is refused.
    let denied = [
        "SELECT * FROM log",
        "SELECT * FROM main.log",
        "SELECT * FROM \"LOG\"",
        "SELECT * FROM http_requests",
        "SELECT * FROM log_all",
        "SELECT * FROM my_requests, log",
        "SELECT (SELECT count(*) FROM log) FROM my_requests",
        "SELECT * FROM my_requests WHERE path IN (SELECT name FROM log)",
        "SELECT * FROM my_requests UNION ALL SELECT ts, method, name, status, user_id FROM log",
        "WITH log AS (SELECT 1) SELECT * FROM log",
        "WITH x AS (SELECT * FROM log) SELECT * FROM x",
        "SELECT * FROM (WITH m AS (SELECT 1) SELECT * FROM m) a, log",
        "SELECT * FROM app_table('users')",
        "SELECT * FROM read_parquet('archive/*/*/*.parquet')",
        "SELECT * FROM duckdb_tables()",
        "SELECT * FROM information_schema.tables",
        "SELECT * FROM query('SELECT * FROM log')",
        "DESCRIBE log",
        "SUMMARIZE log",
        "FROM log",
        "SELECT * FROM my_requests m JOIN LATERAL (SELECT * FROM log) l ON true",
        "SELECT * FROM analytics_grants",
        "SELECT * FROM sql_texts",
        "SELECT * FROM posterity.main.log",
    ];
    for sql in denied {
        let r = analytics(&alice, &base, &[], sql).await;
        assert_eq!(r.status, 403, "{sql} must be refused: {}", r.body);
        assert_eq!(r.code(), Some(497), "{sql}: {}", r.body);
    }
    for sql in [
        "SET VARIABLE user_id = 'x'",
        "SELECT 1; SET VARIABLE user_id = 'x'",
        "PRAGMA version",
    ] {
        let r = analytics(&alice, &base, &[], sql).await;
        assert!(r.status == 403 || r.status == 400, "{sql}: {}", r.body);
    }
    // A CTE of its own over the granted view is fine.
    let r = analytics(
        &alice,
        &base,
        &[],
        "WITH m AS (SELECT * FROM my_requests) SELECT count(*) > 0 FROM m",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Revoking the view ends access.
    let r = json_request(
        &admin,
        reqwest::Method::DELETE,
        format!("{base}/admin/analytics/views/my_requests"),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = analytics(&alice, &base, &[], "SELECT * FROM my_requests").await;
    assert_eq!(r.status, 403, "{}", r.body);
    // From Lua too, as the caller.
    let src = "return function() return analytics.query('SELECT count(*) AS n FROM log') end";
    let r = read(
        admin
            .put(format!("{base}/fn/peek"))
            .body(src)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = json_request(
        &alice,
        reqwest::Method::POST,
        format!("{base}/fn/peek"),
        Some(json!({})),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = json_request(
        &admin,
        reqwest::Method::POST,
        format!("{base}/fn/peek"),
        Some(json!({})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn archive_then_query_parquet_and_live_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut s = Server::start_in(dir, FAST, &[]);
    let (c, base) = (client(), s.url.clone());
    for i in 0..20 {
        post(&c, &base, &[("query_id", &format!("old-{i}"))], "SELECT 1").await;
    }
    assert!(s.terminate().success());

    // On demand, on the stopped server's data directory: everything before a future date.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ichibase"))
        .args(["archive", "--data-dir"])
        .arg(dir)
        .args(["--before", "2999-01-01"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let http_dir = std::fs::read_dir(dir.join("archive/kind=http"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert!(
        http_dir
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("date=")
    );
    let files: Vec<_> = std::fs::read_dir(&http_dir).unwrap().flatten().collect();
    assert_eq!(files.len(), 1);
    assert!(files[0].path().extension().unwrap() == "parquet");

    let s = Server::start_in(dir, FAST, &[]);
    let base = s.url.clone();
    for i in 0..5 {
        post(&c, &base, &[("query_id", &format!("new-{i}"))], "SELECT 1").await;
    }
    wait_count(
        &c,
        &base,
        "SELECT count(*) FROM log WHERE query_id LIKE 'new-%' AND kind = 'http'",
        5,
    )
    .await;
    let r = analytics(
        &c,
        &base,
        &[],
        "SELECT count(*) FROM log WHERE query_id LIKE 'old-%'",
    )
    .await;
    assert_eq!(r.body, "0\n", "archived rows left the live table");
    let r = rows(
        &c,
        &base,
        "SELECT count(*) FILTER (WHERE query_id LIKE 'old-%') AS old, count(*) FILTER (WHERE query_id LIKE 'new-%') AS new FROM http_requests",
    )
    .await;
    assert_eq!(r[0], json!({"old": 20, "new": 5}));
    let r = analytics(
        &c,
        &base,
        &[],
        "SELECT sum(rows) FROM archive_files WHERE kind = 'http'",
    )
    .await;
    assert!(r.body.trim().parse::<i64>().unwrap() >= 20, "{}", r.body);

    // And on a running server.
    let r = json_request(
        &c,
        reqwest::Method::POST,
        format!("{base}/admin/archive?before=2999-01-01"),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!r.json()["files"].as_array().unwrap().is_empty());
    let r = rows(
        &c,
        &base,
        "SELECT count(*) FILTER (WHERE query_id LIKE 'new-%') AS new FROM http_requests",
    )
    .await;
    assert_eq!(r[0], json!({"new": 5}));
    let r = analytics(
        &c,
        &base,
        &[],
        "SELECT count(*) FROM log WHERE query_id LIKE 'new-%'",
    )
    .await;
    assert_eq!(r.body, "0\n");
    // The default (complete days past the retention) finds nothing today.
    let r = json_request(
        &c,
        reqwest::Method::POST,
        format!("{base}/admin/archive"),
        None,
    )
    .await;
    assert_eq!(r.json()["files"], json!([]));
    let _ = ADMIN_KEY;
}

#[tokio::test]
async fn kill_9_during_a_burst_loses_at_most_the_flush_interval() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let flush = 0.5;
    let mut s = Server::start_in(dir, &["--posterity-flush-secs", "0.5"], &[]);
    let (c, base) = (client(), s.url.clone());
    assert_eq!(
        post(&c, &base, &[], "CREATE TABLE burst(i INTEGER)")
            .await
            .status,
        200
    );
    // A burst of inserts from 4 clients; kill -9 in the middle of it.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..4 {
        let (c, base) = (c.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            for i in 0.. {
                let qid = format!("b-{w}-{i}");
                let r = c
                    .post(format!("{base}/"))
                    .query(&[("query_id", qid.as_str())])
                    .body(format!("INSERT INTO burst VALUES ({})", w * 1_000_000 + i))
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.bytes().await;
                        done.push((qid, Instant::now()));
                    }
                    _ => break,
                }
                if i > 100_000 {
                    break;
                }
            }
            done
        }));
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let killed_at = Instant::now();
    s.child.kill().unwrap(); // SIGKILL
    s.child.wait().unwrap();
    let mut done = Vec::new();
    for t in tasks {
        done.extend(t.await.unwrap());
    }
    assert!(done.len() > 50, "the burst ran ({} requests)", done.len());
    let horizon = killed_at - Duration::from_secs_f64(flush) - Duration::from_millis(250);
    let old: Vec<&String> = done
        .iter()
        .filter(|(_, t)| *t < horizon)
        .map(|(q, _)| q)
        .collect();
    assert!(
        !old.is_empty(),
        "some requests finished a flush interval before the kill ({:?})",
        killed_at - started
    );

    let s = Server::start_in(dir, &["--posterity-flush-secs", "0.5"], &[]);
    let base = s.url.clone();
    // SQLite: every acknowledged insert is there, and the file is sound.
    let r = post(&c, &base, &[], "SELECT count(*) FROM burst").await;
    assert!(
        r.body.trim().parse::<usize>().unwrap() >= done.len(),
        "{} < {}",
        r.body,
        done.len()
    );
    let r = post(&c, &base, &[], "PRAGMA integrity_check").await;
    assert_eq!(r.body, "ok\n");
    // The log: every request older than the flush interval before the kill is there.
    let list = old
        .iter()
        .map(|q| format!("'{q}'"))
        .collect::<Vec<_>>()
        .join(",");
    let r = analytics(
        &c,
        &base,
        &[],
        &format!(
            "SELECT count(DISTINCT query_id) FROM log WHERE kind = 'http' AND query_id IN ({list})"
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body.trim().parse::<usize>().unwrap(),
        old.len(),
        "log rows older than the flush interval survived"
    );
    let r = analytics(
        &c,
        &base,
        &[],
        &format!(
            "SELECT count(DISTINCT query_id) FROM log WHERE kind = 'sql' AND query_id IN ({list})"
        ),
    )
    .await;
    assert_eq!(r.body.trim().parse::<usize>().unwrap(), old.len());
}

// ---------------------------------------------------------------------------------------------
// Issue 12, items 3 and 4: analytics names resolved by scope, settings and files out of reach of
// non-admins, anonymous clients refused, and runaway queries bounded.

async fn put_view(admin: &reqwest::Client, base: &str, name: &str, sql: &str, roles: &[&str]) {
    let r = json_request(
        admin,
        reqwest::Method::PUT,
        format!("{base}/admin/analytics/views/{name}"),
        Some(json!({"sql": sql, "roles": roles})),
    )
    .await;
    assert_eq!(r.status, 200, "view {name}: {}", r.body);
}

/// A server with archived history (Parquet files under `<data>/archive`), a user `alice`
/// with the view `my_requests`, and the glob of the archive (absolute, and relative to the
/// server's working directory, which is its data directory).
async fn archived_server() -> (Server, reqwest::Client, String, Vec<String>) {
    let s = Server::start(&["--posterity-flush-secs", "0.2", "--signup-open", "true"]);
    let (admin, base) = (client(), s.url.clone());
    let alice = signup(&base, "alice@example.com").await.client;
    for i in 0..5 {
        post(&admin, &base, &[("query_id", &format!("secret-{i}"))], "SELECT 1").await;
        post(&alice, &base, &[], "SELECT 1").await;
    }
    wait_count(&admin, &base, "SELECT count(*) FROM log WHERE kind = 'http'", 10).await;
    let r = json_request(
        &admin,
        reqwest::Method::POST,
        format!("{base}/admin/archive?before=2999-01-01"),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    put_view(
        &admin,
        &base,
        "my_requests",
        "SELECT ts, method, path, status, user_id FROM http_requests WHERE user_id = getvariable('user_id')",
        &["user"],
    )
    .await;
    let abs = format!("{}/archive/*/*/*.parquet", s.data_dir.display());
    // The archive really is there and readable by the admin through each spelling.
    for g in [abs.as_str(), "archive/*/*/*.parquet"] {
        let r = analytics(&admin, &base, &[], &format!("SELECT count(*) FROM '{g}'")).await;
        assert_eq!(r.status, 200, "{g}: {}", r.body);
        assert!(r.body.trim().parse::<i64>().unwrap() >= 10, "{g}: {}", r.body);
    }
    let globs = vec![
        abs,
        "archive/*/*/*.parquet".to_string(),
        "archive/kind=http/*/*.parquet".to_string(),
    ];
    (s, alice, base, globs)
}

/// Queries that would read the archive (or the log) if CTE names leaked out of their scope.
fn scope_leaks(g: &str) -> Vec<String> {
    vec![
        // A UNION branch's CTE does not cover the other branch.
        format!("SELECT * FROM (SELECT count(*) FROM \"{g}\") UNION ALL (WITH \"{g}\" AS (SELECT 42) SELECT * FROM \"{g}\")"),
        format!("(WITH \"{g}\" AS (SELECT 42) SELECT * FROM \"{g}\") UNION ALL SELECT count(*) FROM \"{g}\""),
        format!("SELECT count(*) FROM '{g}' UNION ALL (WITH \"{g}\" AS (SELECT 1) SELECT 1)"),
        format!("SELECT count(*) FROM \"{g}\" INTERSECT (WITH \"{g}\" AS (SELECT 1) SELECT 1) "),
        // A CTE's own (non-recursive) body sees the file, not itself.
        format!("WITH \"{g}\" AS (SELECT count(*) AS n FROM \"{g}\") SELECT * FROM \"{g}\""),
        format!("WITH \"{g}\" AS (SELECT * FROM \"{g}\") SELECT user_id, path FROM \"{g}\""),
        // An earlier sibling does not see a later CTE.
        format!("WITH a AS (SELECT count(*) AS n FROM \"{g}\"), \"{g}\" AS (SELECT 1) SELECT * FROM a"),
        // The anchor of a recursive CTE does not see the CTE.
        format!("WITH RECURSIVE \"{g}\"(n) AS (SELECT count(*) FROM \"{g}\" UNION ALL SELECT n FROM \"{g}\" WHERE false) SELECT * FROM \"{g}\""),
        // An inner CTE does not cover the enclosing query.
        format!("SELECT (SELECT count(*) FROM \"{g}\") FROM (WITH \"{g}\" AS (SELECT 1) SELECT * FROM \"{g}\")"),
        format!("WITH x AS (WITH \"{g}\" AS (SELECT 1) SELECT 1) SELECT count(*) FROM \"{g}\", x"),
        format!("SELECT count(*) FROM \"{g}\" WHERE EXISTS (WITH \"{g}\" AS (SELECT 1) SELECT * FROM \"{g}\")"),
        format!("SELECT * FROM my_requests WHERE path IN (SELECT path FROM \"{g}\") OR EXISTS (WITH \"{g}\" AS (SELECT 1) SELECT 1)"),
        format!("SELECT * FROM my_requests m, LATERAL (SELECT count(*) FROM \"{g}\") x, (WITH \"{g}\" AS (SELECT 1) SELECT 1) y"),
        format!("SELECT * FROM (WITH \"{g}\" AS (SELECT 1) SELECT 1) a JOIN (SELECT count(*) FROM \"{g}\") b ON true"),
        // A sibling subquery's CTE does not cover its neighbour.
        format!("SELECT (WITH \"{g}\" AS (SELECT 1) SELECT 1), (SELECT count(*) FROM \"{g}\")"),
        // Same name, other quoting/case.
        format!("WITH \"{g}\" AS (SELECT 1) SELECT count(*) FROM '{g}'"),
        format!("WITH \"{}\" AS (SELECT 1) SELECT count(*) FROM \"{g}\"", g.to_uppercase()),
        // A CTE named like a table, in every position.
        "WITH log AS (SELECT count(*) FROM log) SELECT * FROM log".to_string(),
        "SELECT * FROM (SELECT count(*) FROM log) UNION ALL (WITH log AS (SELECT 1) SELECT * FROM log)".to_string(),
        "WITH m AS (SELECT * FROM my_requests) SELECT * FROM m, (WITH x AS (SELECT 1) SELECT * FROM log_all) z".to_string(),
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r, sql_texts".to_string(),
    ]
}

/// Files, table functions, settings and engine objects, with no CTE at all.
fn sources(g: &str) -> Vec<String> {
    vec![
        format!("SELECT * FROM '{g}'"),
        format!("FROM '{g}'"),
        format!("SELECT count(*) FROM \"{g}\""),
        format!("SELECT * FROM read_parquet('{g}')"),
        format!("SELECT * FROM read_parquet(['{g}'])"),
        format!("SELECT * FROM parquet_scan('{g}')"),
        format!("SELECT * FROM parquet_metadata('{g}')"),
        format!("SELECT * FROM parquet_schema('{g}')"),
        format!("SELECT * FROM read_text('{g}')"),
        format!("SELECT * FROM read_blob('{g}')"),
        format!("SELECT * FROM read_csv('{g}')"),
        format!("SELECT * FROM read_csv_auto('{g}')"),
        format!("SELECT * FROM read_json_auto('{g}')"),
        format!("SELECT * FROM glob('{g}')"),
        format!("SELECT * FROM my_requests, glob('{g}')"),
        format!("SELECT (SELECT count(*) FROM read_parquet('{g}'))"),
        format!("SELECT * FROM my_requests WHERE path IN (SELECT path FROM '{g}')"),
        format!("SELECT * FROM query('SELECT * FROM ''{g}''')"),
        format!("SELECT * FROM query_table('{g}')"),
        "SELECT * FROM read_csv('/etc/passwd')".to_string(),
        "SELECT * FROM 'posterity.tmp/x.csv'".to_string(),
        "SELECT * FROM app_table('_ichibase_users')".to_string(),
        "SELECT * FROM range(10)".to_string(),
        "SELECT * FROM generate_series(1, 3)".to_string(),
        // Settings, pragmas, the environment.
        "SELECT current_setting('allowed_directories')".to_string(),
        "SELECT current_setting('temp_directory')".to_string(),
        "SELECT CURRENT_SETTING('memory_limit')".to_string(),
        "SELECT main.current_setting('threads')".to_string(),
        "SELECT * FROM my_requests WHERE current_setting('allowed_directories') IS NOT NULL".to_string(),
        "SELECT list_transform([1], x -> current_setting('temp_directory'))".to_string(),
        "SELECT getenv('HOME')".to_string(),
        "SELECT * FROM duckdb_settings()".to_string(),
        "SELECT * FROM duckdb_databases()".to_string(),
        "SELECT * FROM duckdb_tables()".to_string(),
        "SELECT * FROM duckdb_settings".to_string(),
        "SELECT * FROM pragma_database_list()".to_string(),
        "SELECT * FROM pragma_table_info('log')".to_string(),
        "SELECT * FROM pragma_version()".to_string(),
        "SELECT * FROM which_secret('s3://x/y', 's3')".to_string(),
        "SELECT * FROM information_schema.tables".to_string(),
        "SELECT * FROM pg_catalog.pg_settings".to_string(),
        "SELECT * FROM pg_settings".to_string(),
        "SELECT current_database()".to_string(),
        "SELECT version()".to_string(),
        "SELECT * FROM log".to_string(),
        "SELECT * FROM main.my_requests, posterity.main.log".to_string(),
        "DESCRIBE my_requests".to_string(),
        "SHOW TABLES".to_string(),
        "SUMMARIZE my_requests".to_string(),
    ]
}

/// Statements that are not a SELECT: refused to everyone (400 or 403).
const STATEMENTS: &[&str] = &[
    "ATTACH 'x.db' AS x",
    "ATTACH ':memory:' AS m",
    "DETACH posterity",
    "COPY (SELECT 1) TO 'archive/x.csv'",
    "COPY log TO 'archive/x.parquet'",
    "EXPORT DATABASE 'archive/x'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "LOAD parquet",
    "SET memory_limit = '100GB'",
    "SET enable_external_access = true",
    "RESET lock_configuration",
    "PRAGMA database_list",
    "CALL pragma_version()",
    "CREATE TABLE t AS SELECT 1",
    "CREATE MACRO m() AS 1",
    "USE memory",
    "CHECKPOINT",
    "SELECT 1; ATTACH ':memory:' AS m",
];

fn assert_refused(sql: &str, r: &Resp, statuses: &[u16], secrets: &[&str]) {
    assert!(
        statuses.contains(&r.status),
        "{sql} must be refused with one of {statuses:?}, got {}: {}",
        r.status,
        r.body
    );
    for s in secrets {
        // (a refusal may quote what the caller typed)
        if !sql.contains(s) {
            assert!(!r.body.contains(s), "{sql} revealed {s}: {}", r.body);
        }
    }
}

#[tokio::test]
async fn analytics_names_resolve_by_scope_for_every_role() {
    let (s, alice, base, globs) = archived_server().await;
    let admin = client();
    let anon = anon_client();
    let data_dir = s.data_dir.display().to_string();
    let secrets = [data_dir.as_str(), "secret-"];

    let r = analytics(&alice, &base, &[], "SELECT count(*) FROM my_requests").await;
    assert_eq!(r.status, 200, "{}", r.body);
    // A signed-in user: every CTE-scope trick, file, table function and setting is refused.
    for g in &globs {
        for sql in scope_leaks(g).iter().chain(sources(g).iter()) {
            let r = analytics(&alice, &base, &[], sql).await;
            assert_refused(sql, &r, &[403], &secrets);
        }
    }
    // Anonymous clients: nothing at all while no view is granted to `anon`.
    for sql in ["SELECT 1", "SELECT getvariable('role')", "SELECT current_setting('allowed_directories')"]
    {
        let r = analytics(&anon, &base, &[], sql).await;
        assert_refused(sql, &r, &[403], &secrets);
    }
    for g in &globs {
        for sql in scope_leaks(g).iter().chain(sources(g).iter()) {
            let r = analytics(&anon, &base, &[], sql).await;
            assert_refused(sql, &r, &[403], &secrets);
        }
    }
    for sql in STATEMENTS {
        for c in [&alice, &anon, &admin] {
            let r = analytics(c, &base, &[], sql).await;
            assert_refused(sql, &r, &[400, 403], &[]);
        }
    }

    // With a view granted to `anon`, anonymous clients may read that view, and nothing more.
    put_view(&admin, &base, "public_stats", "SELECT count(*) AS n FROM http_requests", &["anon"]).await;
    let r = analytics(&anon, &base, &[], "SELECT n > 0 FROM public_stats").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body.trim(), "1");
    for g in &globs {
        for sql in scope_leaks(g).iter().chain(sources(g).iter()) {
            let r = analytics(&anon, &base, &[], sql).await;
            assert_refused(sql, &r, &[403], &secrets);
        }
    }
    let r = analytics(&anon, &base, &[], "SELECT count(*) FROM my_requests").await;
    assert_refused("anon on a user view", &r, &[403], &secrets);
    let r = analytics(&alice, &base, &[], "SELECT * FROM public_stats").await;
    assert_refused("user on an anon view", &r, &[403], &secrets);

    // CTEs used as CTEs still work, in every scope DuckDB gives them.
    for (sql, want) in [
        ("WITH m AS (SELECT * FROM my_requests), n AS (SELECT * FROM m) SELECT count(*) > 0 FROM n", "1"),
        ("WITH m AS (SELECT 1 AS a) SELECT (SELECT count(*) FROM m) FROM (SELECT * FROM m)", "1"),
        ("WITH m AS (SELECT 1 AS a) SELECT * FROM m UNION ALL SELECT * FROM m", "1\n1"),
        ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT sum(n) FROM r", "15"),
        ("WITH x AS (SELECT 2 AS v) SELECT * FROM (WITH y AS (SELECT v + 1 AS v FROM x) SELECT v FROM y)", "3"),
        ("WITH \"My Data\" AS (SELECT 4 AS v) SELECT v FROM \"my data\"", "4"),
        ("SELECT len(range(10)), length(repeat('ab', 3)), lpad('x', 3, '-')", "10\t6\t--x"),
        ("SELECT list_sum(list_transform(range(100), x -> x))", "4950"),
    ] {
        let r = analytics(&alice, &base, &[], sql).await;
        assert_eq!(r.status, 200, "{sql}: {}", r.body);
        assert_eq!(r.body.trim(), want, "{sql}");
    }

    // The admin keeps every means.
    for sql in [
        format!("SELECT count(*) > 0 FROM read_parquet('{}')", globs[0]),
        "SELECT current_setting('threads')".to_string(),
        "WITH log AS (SELECT count(*) FROM log) SELECT * FROM log".to_string(),
    ] {
        let r = analytics(&admin, &base, &[], &sql).await;
        assert_eq!(r.status, 200, "{sql}: {}", r.body);
    }
}

/// CPU seconds the live threads of the process have used (user + system), summed per thread
/// (some kernels do not aggregate threads in `/proc/<pid>/stat`).
fn cpu_secs(pid: u32) -> f64 {
    let mut total = 0.0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        total += (tick(11) + tick(12)) / 100.0;
    }
    total
}

/// Samples the server's RSS every 50 ms; `peak()` is the highest seen.
struct RssWatch {
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl RssWatch {
    /// Panics (failing the test, and killing the server with it) past `ceiling` bytes, so a
    /// runaway never takes the whole machine down.
    fn start(pid: u32, ceiling: u64) -> RssWatch {
        use std::sync::atomic::Ordering;
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p2, s2) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let rss = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                    .map_or(0, |kb| kb * 1024);
                p2.fetch_max(rss, Ordering::Relaxed);
                if rss > ceiling {
                    let _ = std::process::Command::new("kill").arg("-9").arg(pid.to_string()).status();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        RssWatch { peak, stop }
    }
    fn peak(&self) -> u64 {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

const MB: u64 = 1024 * 1024;

/// Generators of huge values: refused to non-admins before DuckDB plans them (DuckDB folds
/// constants while planning, where no interrupt reaches).
const GENERATORS: &[&str] = &[
    "SELECT sum(len(x)) FROM (SELECT range(150000000) AS x)",
    "SELECT len(range(150000000))",
    "SELECT len(range(150000000::BIGINT))",
    "SELECT len(range(-150000000, 0))",
    "SELECT len(range(0, 150000000, 1))",
    "SELECT len(range(150000000::HUGEINT))",
    "SELECT len(range(1e9::BIGINT))",
    "SELECT len(generate_series(1, 1000000000))",
    "SELECT sum(len(x)) FROM (SELECT generate_series(150000000) AS x)",
    "SELECT len(range(n)) FROM (SELECT 150000000 AS n)",
    "SELECT len(range((SELECT 150000000)))",
    "SELECT string_agg(x::VARCHAR, ',') FROM (SELECT unnest(range(150000000)) AS x)",
    "SELECT length(repeat('x', 2000000000))",
    "SELECT length(repeat('abcdefghij', 200000000))",
    "SELECT length(repeat(repeat('x', 100000), 100000))",
    "SELECT len(repeat([1, 2, 3], 100000000))",
    "SELECT len(list_resize([1], 1000000000))",
    "SELECT len(array_resize([1], 1000000000, 0))",
    "SELECT length(lpad('x', 1000000000, 'y'))",
    "SELECT length(rpad('x', 1000000000, 'y'))",
    "SELECT len(list_transform(range(100000), x -> range(100000)))",
    "SELECT len(flatten(list_transform(range(10000), x -> range(10000))))",
    "SELECT length(printf('%01000000000d', 1))",
    "SELECT length(format('{:>1000000000}', 'x'))",
    "SELECT length(to_base(1, 2, 1000000000))",
    "SELECT length(bar(1, 0, 1, 1000000000))",
    "WITH a AS (SELECT range(150000000) AS x) SELECT len(x) FROM a",
    "SELECT len(x) FROM my_requests, (SELECT range(150000000) AS x)",
];

#[tokio::test]
async fn analytics_runaway_queries_are_refused_or_bounded() {
    let (s, alice, base, _) = archived_server().await;
    let admin = client();
    let anon = anon_client();
    let pid = s.pid();
    let ceiling = s.rss() + 3 * 1024 * MB;
    let watch = RssWatch::start(pid, ceiling);
    let quick = |c: &reqwest::Client, sql: &str| {
        c.post(format!("{base}/analytics"))
            .body(sql.to_string())
            .timeout(Duration::from_secs(60))
            .send()
    };

    // The issue's query as anon, and every generator as anon and as a user.
    for sql in GENERATORS {
        for (who, c) in [("anon", &anon), ("user", &alice)] {
            let t = Instant::now();
            let r = read(quick(c, sql).await.unwrap_or_else(|e| panic!("{who}: {sql}: {e}"))).await;
            assert!(
                matches!(r.status, 403 | 503 | 400),
                "{who}: {sql} must be refused, got {}: {}",
                r.status,
                r.body
            );
            assert!(t.elapsed() < Duration::from_secs(30), "{who}: {sql} took {:?}", t.elapsed());
        }
    }
    let r = analytics(&alice, &base, &[], GENERATORS[0]).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.code(), Some(241), "{}", r.body);
    let base_rss = s.rss();
    assert!(
        watch.peak() < base_rss.max(200 * MB) + 1024 * MB,
        "refused generators still grew the server to {} MB",
        watch.peak() / MB
    );

    // A big cross join over a granted view: it runs, and stops at the deadline.
    put_view(&admin, &base, "nums", "SELECT range AS n FROM range(1000000)", &["user"]).await;
    let cross = "SELECT count(*) FROM nums a, nums b, nums c";
    let t = Instant::now();
    let r = analytics(&alice, &base, &[("max_execution_time", "2")], cross).await;
    assert_eq!(r.status, 408, "{}", r.body);
    assert!(t.elapsed() < Duration::from_secs(40), "deadline of 2 s answered after {:?}", t.elapsed());
    // ... and the work really stopped (no CPU burnt once it answered).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c0 = cpu_secs(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let burnt = cpu_secs(pid) - c0;
    assert!(burnt < 1.5, "the server kept burning CPU after the deadline: {burnt:.2} s in 3 s");
    drop(watch);
}

#[tokio::test]
async fn analytics_memory_is_bounded_and_runaways_stop_on_disconnect() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_in(
        tmp.path(),
        &["--posterity-flush-secs", "0.2", "--signup-open", "true"],
        &[
            ("ICHIBASE_ANALYTICS__MEMORY_LIMIT", "256MB"),
            ("ICHIBASE_ANALYTICS__MAX_TEMP_DIRECTORY_SIZE", "256MB"),
            ("ICHIBASE_ANALYTICS__THREADS", "2"),
            ("ICHIBASE_ANALYTICS__MAX_RESULT_ROWS", "5000"),
            ("ICHIBASE_ANALYTICS__MEMORY_GUARD_BYTES", "268435456"),
        ],
    );
    let admin = client();
    let base = s.url.clone();
    let alice = signup(&base, "alice@example.com").await.client;
    put_view(&admin, &base, "nums", "SELECT range AS n FROM range(1000000)", &["user"]).await;
    let pid = s.pid();
    let before = s.rss();
    // The watch kills the server far above every bound asserted below (a run away must fail the
    // test, not the machine); the bounds leave room for a loaded machine, where the guard's
    // polls come late.
    let watch = RssWatch::start(pid, before + 6 * 1024 * MB);

    // A hash aggregate of 10^12 distinct values, and a cross product DuckDB materialises:
    // DuckDB's memory_limit (and the temporary directory's cap) hold them.
    let distinct = "SELECT count(DISTINCT a.n * 1000000 + b.n) FROM nums a, nums b";
    let bushy = "SELECT count(*) FROM nums a, nums b, nums c, nums d";
    for (who, c, sql) in [
        ("user", &alice, distinct),
        ("admin", &admin, distinct),
        ("user", &alice, bushy),
        ("admin", &admin, bushy),
    ] {
        let t = Instant::now();
        let r = analytics(c, &base, &[("max_execution_time", "8")], sql).await;
        assert!(
            matches!(r.status, 408 | 503),
            "{who}: want a time-out or a memory error, got {}: {}",
            r.status,
            r.body
        );
        assert!(t.elapsed() < Duration::from_secs(60), "{who}: answered after {:?}", t.elapsed());
        assert!(
            watch.peak() < before + 1536 * MB,
            "{who}: RSS went from {} MB to {} MB with memory_limit 256MB",
            before / MB,
            watch.peak() / MB
        );
    }

    // A runaway whose client goes away stops soon after.
    let addr = base.trim_start_matches("http://").to_string();
    let token = ADMIN_KEY;
    let cross = "SELECT count(*) FROM nums a, nums b WHERE (a.n + b.n) % 7 = 3";
    for who in ["admin", "user"] {
        let auth = if who == "admin" {
            format!("Authorization: Bearer {token}\r\n")
        } else {
            // The user's token, taken from a fresh sign-in.
            let r = json_request(
                &anon_client(),
                reqwest::Method::POST,
                format!("{base}/auth/signin"),
                Some(json!({"email": "alice@example.com", "password": "password-of-alice@example.com", "device": "t"})),
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.body);
            format!("Authorization: Bearer {}\r\n", r.json()["access_token"].as_str().unwrap())
        };
        let mut sock = std::net::TcpStream::connect(&addr).unwrap();
        let req = format!(
            "POST /analytics?max_execution_time=25 HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: {}\r\n\r\n{cross}",
            cross.len()
        );
        std::io::Write::write_all(&mut sock, req.as_bytes()).unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Half a second of the server's CPU shows the query running; a loaded machine may
        // take longer to give it that (well within the query's 25 s).
        let c0 = cpu_secs(pid);
        let t0 = Instant::now();
        let mut running = 0.0;
        while running <= 0.5 && t0.elapsed() < Duration::from_secs(15) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            running = cpu_secs(pid) - c0;
        }
        let mut early = [0u8; 512];
        sock.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
        let n = std::io::Read::read(&mut sock, &mut early).unwrap_or(0);
        assert_eq!(n, 0, "{who}: answered early: {}", String::from_utf8_lossy(&early[..n]));
        assert!(running > 0.5, "{who}: the runaway was not running ({running:.2} s CPU in {:?})", t0.elapsed());
        drop(sock);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let c0 = cpu_secs(pid);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let burnt = cpu_secs(pid) - c0;
        assert!(burnt < 1.5, "{who}: the query kept running after the client left: {burnt:.2} s CPU in 3 s");
    }
    let r = analytics(&alice, &base, &[], "SELECT count(*) FROM nums").await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Values that grow by composition (no single generator is large) outside DuckDB's own
    // accounting: the memory guard interrupts them.
    let compose = "WITH a AS (SELECT range(1000000) l), b AS (SELECT flatten([l,l,l,l,l,l,l,l,l,l]) l FROM a), c AS (SELECT flatten([l,l,l,l,l,l,l,l,l,l]) l FROM b) SELECT len(l) FROM c";
    let t = Instant::now();
    let r = analytics(&alice, &base, &[("max_execution_time", "25")], compose).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.code(), Some(241), "{}", r.body);
    assert!(t.elapsed() < Duration::from_secs(60), "answered after {:?}", t.elapsed());
    // Unguarded, this query succeeds (200); the guard must stop it (503 above). DuckDB builds each
    // flatten in one step, so the guard stops it at the next step, not at its threshold: the
    // bound leaves room for that on a loaded machine.
    assert!(
        watch.peak() < before + 4096 * MB,
        "RSS went from {} MB to {} MB with a 256 MB memory guard",
        before / MB,
        watch.peak() / MB
    );
    // Results are capped by [analytics] max_result_rows; a request cannot raise the cap.
    for c in [&alice, &admin] {
        let r = analytics(c, &base, &[("max_result_rows", "1000000")], "SELECT n FROM nums").await;
        assert!(
            r.status != 200 || r.body.contains("max_result_rows"),
            "1000000 rows went out past a cap of 5000: {} lines",
            r.body.lines().count()
        );
        assert!(r.body.lines().count() <= 5001, "{} lines", r.body.lines().count());
    }
    drop(watch);
}
