//! Inline reads (`[sql] inline_read_budget_us`, `inline_read_max_bytes`): a single read-only
//! statement runs on the request's own worker when a reader connection is free, and runs again
//! on the reader pool when it outgrows the budget or the answer cap. Whatever path a query
//! takes, its answer, its errors, the identity it runs as (policy views) and its posterity row
//! are the same: these tests run the same queries on a server with the default settings, one
//! with a budget so small that nearly every statement is interrupted and re-run, and one with
//! inline reads off.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// The three ways a read can go: default (inline for short reads), a tiny budget and answer cap
/// (most attempts fall back), inline off.
fn servers() -> Vec<(&'static str, (Server, tempfile::TempDir))> {
    let flags = ["--signup-open", "true", "--posterity-flush-secs", "0.2"];
    let start = |env: &[(&str, &str)]| {
        let tmp = tempfile::tempdir().unwrap();
        (Server::start_in(tmp.path(), &flags, env), tmp)
    };
    vec![
        ("default", start(&[])),
        (
            "tiny budget",
            start(&[
                ("ICHIBASE_SQL__INLINE_READ_BUDGET_US", "1"),
                ("ICHIBASE_SQL__INLINE_READ_MAX_BYTES", "64"),
            ]),
        ),
        ("off", start(&[("ICHIBASE_SQL__INLINE_READ_BUDGET_US", "0")])),
    ]
}

const COUNT_3M: &str = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) SELECT count(*), sum(x) FROM c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_errors_and_identity_are_the_same_on_every_path() {
    for (name, (s, _dir)) in servers() {
        let base = s.url.clone();
        let admin = client();
        ok(&admin, &base, "CREATE TABLE kv(id INTEGER PRIMARY KEY, v TEXT)").await;
        ok(
            &admin,
            &base,
            "INSERT INTO kv WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000) SELECT i, 'value-' || i FROM n",
        )
        .await;

        // A point read, in JSON, with a parameter.
        let r = get(
            &admin,
            &base,
            &[
                ("query", "SELECT v FROM kv WHERE id = {id:Int64}"),
                ("param_id", "42"),
                ("default_format", "JSON"),
            ],
        )
        .await;
        assert_eq!(r.status, 200, "{name}: {}", r.body);
        let j = r.json();
        assert_eq!(j["data"], json!([{"v": "value-42"}]), "{name}: {}", r.body);
        assert_eq!(j["rows"], 1, "{name}");
        assert!(r.header("x-clickhouse-summary").unwrap().contains("\"result_rows\":\"1\""), "{name}");

        // Work far past any inline budget still answers in full (re-run on the pool).
        let r = get(&admin, &base, &[("query", COUNT_3M)]).await;
        assert_eq!((r.status, r.body.as_str()), (200, "3000000\t4500001500000\n"), "{name}");

        // An answer far past the inline cap: every row, in order.
        let r = get(&admin, &base, &[("query", "SELECT id, v FROM kv ORDER BY id")]).await;
        assert_eq!(r.status, 200, "{name}");
        let lines: Vec<&str> = r.body.lines().collect();
        assert_eq!(lines.len(), 20000, "{name}");
        assert_eq!(lines[0], "1\tvalue-1", "{name}");
        assert_eq!(lines[19999], "20000\tvalue-20000", "{name}");

        // Errors keep their codes: unknown table, a write on GET, a missing parameter, a
        // result limit, and the request's own time-out.
        let r = get(&admin, &base, &[("query", "SELECT * FROM nope")]).await;
        assert_eq!(r.status, 404, "{name}: {}", r.body);
        let r = get(&admin, &base, &[("query", "DELETE FROM kv")]).await;
        assert_eq!((r.status, r.code()), (403, Some(164)), "{name}: {}", r.body);
        let r = get(&admin, &base, &[("query", "SELECT {x:Int64}")]).await;
        assert_eq!(r.code(), Some(456), "{name}: {}", r.body);
        let r = get(
            &admin,
            &base,
            &[("query", "SELECT id FROM kv"), ("max_result_rows", "10")],
        )
        .await;
        assert_eq!(r.code(), Some(396), "{name}: {}", r.body);
        let forever = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c";
        let r = get(&admin, &base, &[("query", forever), ("max_execution_time", "0.5")]).await;
        assert_eq!((r.status, r.code()), (408, Some(159)), "{name}: {}", r.body);
        assert!(r.body.contains("max_execution_time"), "{name}: {}", r.body);
        // The rows are still there (nothing was written by a refused GET).
        assert_eq!(ok(&admin, &base, "SELECT count(*) FROM kv").await, "20000\n", "{name}");

        // Identity: two users through a policy view see only their own rows, whichever path
        // each read took, also when their reads interleave on the same connections.
        ok(&admin, &base, "CREATE TABLE notes(id INTEGER PRIMARY KEY, owner TEXT NOT NULL, v TEXT)").await;
        let r = jpost(
            &admin,
            &base,
            "/admin/policies",
            json!({"name": "my_notes", "table": "notes", "roles": ["user"], "using": "owner = auth_userid()"}),
        )
        .await;
        assert_eq!(r.status, 200, "{name}: {}", r.body);
        let alice = signup(&base, "alice@example.com").await;
        let bob = signup(&base, "bob@example.com").await;
        ok(
            &admin,
            &base,
            &format!("INSERT INTO notes(owner, v) VALUES ('{}', 'a1'), ('{}', 'a2'), ('{}', 'b1')", alice.id, alice.id, bob.id),
        )
        .await;
        for _ in 0..5 {
            for (u, want) in [(&alice, "a1\na2\n"), (&bob, "b1\n"), (&alice, "a1\na2\n")] {
                let r = get(&u.client, &base, &[("query", "SELECT v FROM my_notes ORDER BY v")]).await;
                assert_eq!((r.status, r.body.as_str()), (200, want), "{name}");
                // The base table stays out of reach.
                let r = get(&u.client, &base, &[("query", "SELECT v FROM notes")]).await;
                assert_eq!(r.status, 403, "{name}: {}", r.body);
            }
            let r = get(&admin, &base, &[("query", "SELECT count(*) FROM notes")]).await;
            assert_eq!(r.body, "3\n", "{name}");
        }
        // Anonymous clients see nothing of either.
        let r = get(&anon_client(), &base, &[("query", "SELECT v FROM my_notes")]).await;
        assert_eq!(r.status, 403, "{name}: {}", r.body);
    }
}

/// Analytics rows (TabSeparated) of `sql`, polled until there are `want` of them.
async fn log_rows(base: &str, sql: &str, want: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = read(
            client()
                .post(format!("{base}/analytics"))
                .body(sql.to_string())
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200, "{sql}: {}", r.body);
        let rows: Vec<String> = r.body.lines().map(str::to_string).collect();
        if rows.len() >= want || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_statement_row_per_query_on_every_path() {
    for (name, (s, _dir)) in servers() {
        let base = s.url.clone();
        let admin = client();
        ok(&admin, &base, "CREATE TABLE kv(id INTEGER PRIMARY KEY, v TEXT)").await;
        ok(&admin, &base, "INSERT INTO kv VALUES (1, 'one')").await;
        for (qid, sql) in [
            ("q-point", "SELECT v FROM kv WHERE id = 1"),
            ("q-long", COUNT_3M),
            // Fails while stepping (a statement that does not prepare has no row on any path).
            ("q-bad", "SELECT abs(-9223372036854775807 - 1) FROM kv"),
        ] {
            let r = get(&admin, &base, &[("query", sql), ("query_id", qid)]).await;
            assert_eq!(r.header("x-clickhouse-query-id"), Some(qid), "{name}");
        }
        // Exactly one `sql` row each (an interrupted inline attempt leaves none), with the
        // outcome of the run that answered.
        let rows = log_rows(
            &base,
            "SELECT query_id, outcome, rows FROM sql_statements WHERE query_id LIKE 'q-%' ORDER BY query_id",
            3,
        )
        .await;
        // Give a duplicate the time to show up, then look again.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let again = log_rows(
            &base,
            "SELECT query_id, outcome, rows FROM sql_statements WHERE query_id LIKE 'q-%' ORDER BY query_id",
            3,
        )
        .await;
        assert_eq!(rows, again, "{name}");
        assert_eq!(
            rows,
            vec!["q-bad\terror\t0", "q-long\tok\t1", "q-point\tok\t1"],
            "{name}"
        );
    }
}

#[test]
fn out_of_range_settings_refuse_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ichibase"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path())
        .env_remove("ICHIBASE_CONFIG")
        .env("ICHIBASE_ADMIN_KEY", ADMIN_KEY)
        .env("ICHIBASE_SQL__INLINE_READ_BUDGET_US", "5000000")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("inline_read_budget_us"), "{err}");
}
