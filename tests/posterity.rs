//! Posterity: requests, statements and Lua runs land in the DuckDB log; `POST /analytics` in
//! every format; the Parquet archive queried together with live rows; the role restriction of
//! analytics; and a kill -9 during a burst loses at most the last flush interval.

mod common;

use std::time::{Duration, Instant};

use common::{ADMIN_KEY, Resp, Server, anon_client, client, client_with_token, post};
use serde_json::{Value, json};

async fn read(r: reqwest::Response) -> Resp {
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    Resp {
        status,
        headers,
        body: r.text().await.unwrap(),
    }
}

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

async fn jreq(c: &reqwest::Client, m: reqwest::Method, url: String, body: Option<Value>) -> Resp {
    let mut rb = c.request(m, url);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    read(rb.send().await.unwrap()).await
}

async fn signup(base: &str, email: &str) -> (String, reqwest::Client) {
    let j = common::signup_and_signin(base, email, &format!("password-of-{email}")).await;
    (
        j["user"]["id"].as_str().unwrap().to_string(),
        client_with_token(j["access_token"].as_str().unwrap()),
    )
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
    let ok = jreq(
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
    let fail = jreq(
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
        "SELECT function, version, outcome, error, instructions, memory, elapsed_ms, trace_id FROM lua_invocations ORDER BY ts",
    )
    .await;
    assert_eq!(lua.len(), 2, "{lua:?}");
    assert_eq!(lua[0]["function"], "stats");
    assert_eq!(lua[0]["version"], 1);
    assert_eq!(lua[0]["outcome"], "ok");
    assert_eq!(lua[0]["trace_id"], trace_ok.as_str());
    assert!(lua[0]["instructions"].as_i64().is_some(), "{lua:?}");
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
    let st = jreq(
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
    let (alice_id, alice) = signup(&base, "alice@example.com").await;
    let (bob_id, bob) = signup(&base, "bob@example.com").await;
    // Each makes a few requests of their own.
    for _ in 0..3 {
        post(&alice, &base, &[], "SELECT 1").await;
    }
    post(&bob, &base, &[], "SELECT 2").await;

    // The admin publishes "my requests" to the `user` role.
    let r = jreq(
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
    let r = jreq(
        &admin,
        reqwest::Method::GET,
        format!("{base}/admin/analytics/views"),
        None,
    )
    .await;
    assert_eq!(r.json()[0]["name"], "my_requests");
    assert_eq!(r.json()[0]["roles"], json!(["user"]));
    // Engine objects cannot be replaced, and the role cannot publish views.
    let r = jreq(
        &admin,
        reqwest::Method::PUT,
        format!("{base}/admin/analytics/views/log"),
        Some(json!({"sql": "SELECT 1"})),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = jreq(
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
    let r = jreq(
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
    let r = jreq(
        &alice,
        reqwest::Method::POST,
        format!("{base}/fn/peek"),
        Some(json!({})),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = jreq(
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
    let r = jreq(
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
    let r = jreq(
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
