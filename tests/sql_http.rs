//! SQL-over-HTTP against the real server binary on 127.0.0.1 with a real HTTP client.

mod common;

use std::time::{Duration, Instant};

use common::{Server, client, get, ok, post};

const SEED: &str = "CREATE TABLE people(id INTEGER PRIMARY KEY, name TEXT, score REAL, tags TEXT)";

async fn seeded(extra: &[&str]) -> (Server, reqwest::Client) {
    let s = Server::start(extra);
    let c = client();
    ok(&c, &s.url, SEED).await;
    ok(&c, &s.url, "INSERT INTO people VALUES (1, 'Ann', 1.5, NULL), (2, 'Bo\tb', NULL, 'x'), (3, 'Cé \"q\"', -2.25, 'y')").await;
    (s, c)
}

#[tokio::test]
async fn ping_and_root() {
    let s = Server::start(&[]);
    let c = client();
    let r = c.get(format!("{}/ping", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "Ok.\n");
    let r = c.get(format!("{}/", s.url)).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "Ok.\n");
    let r = c.get(format!("{}/nope", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn every_output_format() {
    let (s, c) = seeded(&[]).await;
    let q = "SELECT id, name, score FROM people ORDER BY id";
    let fmt = |f: &str| format!("{q} FORMAT {f}");
    assert_eq!(
        ok(&c, &s.url, q).await,
        "1\tAnn\t1.5\n2\tBo\\tb\t\\N\n3\tCé \"q\"\t-2.25\n",
        "TabSeparated is the default"
    );
    assert_eq!(
        ok(&c, &s.url, &fmt("TSV")).await,
        "1\tAnn\t1.5\n2\tBo\\tb\t\\N\n3\tCé \"q\"\t-2.25\n"
    );
    assert_eq!(
        ok(&c, &s.url, &fmt("TabSeparatedWithNames")).await,
        "id\tname\tscore\n1\tAnn\t1.5\n2\tBo\\tb\t\\N\n3\tCé \"q\"\t-2.25\n"
    );
    assert_eq!(
        ok(&c, &s.url, &fmt("CSV")).await,
        "1,\"Ann\",1.5\n2,\"Bo\tb\",\\N\n3,\"Cé \"\"q\"\"\",-2.25\n"
    );
    assert_eq!(
        ok(&c, &s.url, &fmt("CSVWithNames")).await,
        "\"id\",\"name\",\"score\"\n1,\"Ann\",1.5\n2,\"Bo\tb\",\\N\n3,\"Cé \"\"q\"\"\",-2.25\n"
    );
    assert_eq!(
        ok(&c, &s.url, &fmt("JSONEachRow")).await,
        "{\"id\":\"1\",\"name\":\"Ann\",\"score\":1.5}\n{\"id\":\"2\",\"name\":\"Bo\\tb\",\"score\":null}\n{\"id\":\"3\",\"name\":\"Cé \\\"q\\\"\",\"score\":-2.25}\n"
    );
    assert_eq!(
        ok(&c, &s.url, &fmt("JSONCompactEachRow")).await,
        "[\"1\",\"Ann\",1.5]\n[\"2\",\"Bo\\tb\",null]\n[\"3\",\"Cé \\\"q\\\"\",-2.25]\n"
    );
    let j: serde_json::Value = serde_json::from_str(&ok(&c, &s.url, &fmt("JSON")).await).unwrap();
    assert_eq!(
        j["meta"],
        serde_json::json!([{"name":"id","type":"Int64"},{"name":"name","type":"String"},{"name":"score","type":"Float64"}])
    );
    assert_eq!(
        j["data"][2],
        serde_json::json!({"id":"3","name":"Cé \"q\"","score":-2.25})
    );
    assert_eq!(j["rows"], 3);
    assert!(j["statistics"]["elapsed"].as_f64().unwrap() >= 0.0);
    assert_eq!(j["statistics"]["rows_read"], 3);
    assert!(j["statistics"]["bytes_read"].as_u64().unwrap() > 0);
    let j: serde_json::Value =
        serde_json::from_str(&ok(&c, &s.url, &fmt("JSONCompact")).await).unwrap();
    assert_eq!(j["data"][0], serde_json::json!(["1", "Ann", 1.5]));
    // default_format and the X-ClickHouse-Format header choose a format too; a FORMAT clause wins.
    let r = post(
        &c,
        &s.url,
        &[("default_format", "JSONCompactEachRow")],
        "SELECT 1",
    )
    .await;
    // An integer literal is UInt8, never quoted (as ClickHouse).
    assert_eq!(r.body, "[1]\n");
    assert_eq!(r.header("x-clickhouse-format"), Some("JSONCompactEachRow"));
    assert_eq!(
        r.header("content-type"),
        Some("application/x-ndjson; charset=UTF-8")
    );
    let r = c
        .post(format!("{}/", s.url))
        .header("X-ClickHouse-Format", "CSV")
        .body("SELECT 'a'")
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "\"a\"\n");
    let r = post(
        &c,
        &s.url,
        &[("default_format", "CSV")],
        "SELECT 'a' FORMAT TSV",
    )
    .await;
    assert_eq!(r.body, "a\n");
    // 64-bit integers unquoted on request.
    let r = post(
        &c,
        &s.url,
        &[("output_format_json_quote_64bit_integers", "0")],
        "SELECT 7 AS n FORMAT JSONEachRow",
    )
    .await;
    assert_eq!(r.body, "{\"n\":7}\n");
    // Empty result in JSON keeps the shape.
    let j: serde_json::Value = serde_json::from_str(
        &ok(&c, &s.url, "SELECT id FROM people WHERE id < 0 FORMAT JSON").await,
    )
    .unwrap();
    assert_eq!(j["rows"], 0);
    assert_eq!(j["data"], serde_json::json!([]));
}

#[tokio::test]
async fn parameters_of_every_type() {
    let (s, c) = seeded(&[]).await;
    let one = |ty: &'static str, v: &'static str| {
        let c = c.clone();
        let url = s.url.clone();
        async move {
            let sql = format!("SELECT {{v:{ty}}} AS v, typeof({{v:{ty}}}) AS t FORMAT JSONEachRow");
            let r = post(
                &c,
                &url,
                &[
                    ("param_v", v),
                    ("output_format_json_quote_64bit_integers", "0"),
                ],
                &sql,
            )
            .await;
            assert_eq!(r.status, 200, "{ty} {v}: {}", r.body);
            let j = r.json();
            (j["v"].clone(), j["t"].as_str().unwrap().to_string())
        }
    };
    use serde_json::json;
    assert_eq!(
        one("String", "it's\\ta \\\\ {x:String}").await,
        (json!("it's\ta \\ {x:String}"), "text".into())
    );
    assert_eq!(
        one("Int64", "-9223372036854775808").await,
        (json!(-9223372036854775808i64), "integer".into())
    );
    assert_eq!(one("UInt8", "255").await, (json!(255), "integer".into()));
    assert_eq!(one("Float64", "2.5").await, (json!(2.5), "real".into()));
    assert_eq!(one("Bool", "true").await, (json!(1), "integer".into()));
    assert_eq!(one("Bool", "0").await, (json!(0), "integer".into()));
    assert_eq!(
        one("Nullable(Int64)", "\\N").await,
        (json!(null), "null".into())
    );
    assert_eq!(
        one("Nullable(String)", "x").await,
        (json!("x"), "text".into())
    );
    assert_eq!(
        one("Array(Int64)", "[1, 2, 3]").await,
        (json!("[1,2,3]"), "text".into())
    );
    assert_eq!(
        one("Array(String)", "['a\\'b','c']").await,
        (json!("[\"a'b\",\"c\"]"), "text".into())
    );
    assert_eq!(
        one("Array(String)", "[\"json\",\"form\"]").await,
        (json!("[\"json\",\"form\"]"), "text".into())
    );
    assert_eq!(
        one("Array(Nullable(Float64))", "[1.5,NULL]").await,
        (json!("[1.5,null]"), "text".into())
    );
    assert_eq!(
        one("Date", "2024-02-29").await,
        (json!("2024-02-29"), "text".into())
    );
    assert_eq!(
        one("DateTime", "2024-02-29 12:00:01").await,
        (json!("2024-02-29 12:00:01"), "text".into())
    );
    assert_eq!(
        one("UUID", "6F9619FF-8B86-D011-B42D-00C04FC964FF").await,
        (json!("6f9619ff-8b86-d011-b42d-00c04fc964ff"), "text".into())
    );
    assert_eq!(
        one("JSON", "{\"a\": [1, 2]}").await,
        (json!("{\"a\":[1,2]}"), "text".into())
    );

    // Arrays are usable with json_each.
    let r = post(&c, &s.url, &[("param_ids", "[1,3]")], "SELECT name FROM people WHERE id IN (SELECT value FROM json_each({ids:Array(Int64)})) ORDER BY id").await;
    assert_eq!(r.body, "Ann\nCé \"q\"\n");
    // GET with parameters.
    let r = get(
        &c,
        &s.url,
        &[
            ("query", "SELECT name FROM people WHERE id = {id:Int64}"),
            ("param_id", "1"),
        ],
    )
    .await;
    assert_eq!(r.body, "Ann\n");

    // Bad values and declarations: 400 with a body naming the problem.
    for (sql, v, code, needle) in [
        ("SELECT {v:Int64}", "12x", 457, "cannot be parsed as Int64"),
        ("SELECT {v:UInt8}", "300", 457, "out of range"),
        ("SELECT {v:Int64}", "\\N", 457, "Nullable"),
        ("SELECT {v:Array(Int64)}", "[1,'a']", 457, "Array(Int64)"),
        ("SELECT {v:Bool}", "yes", 457, "Bool"),
        ("SELECT {v:Date}", "2024-13-01", 457, "Date"),
        ("SELECT {v:JSON}", "{oops", 457, "JSON"),
        ("SELECT {v:Map(String,Int64)}", "{}", 50, "Map"),
        ("SELECT {w:Int64}", "1", 456, "`w` is not set"),
        ("SELECT {v:Int64} + {v:String}", "1", 457, "two types"),
        ("SELECT ?1", "1", 62, "{name:Type}"),
    ] {
        let r = post(&c, &s.url, &[("param_v", v)], sql).await;
        assert_eq!(r.status, 400, "{sql} with {v}: {}", r.body);
        assert_eq!(r.code(), Some(code), "{sql}: {}", r.body);
        assert!(r.body.contains(needle), "{sql}: {} lacks {needle}", r.body);
    }
}

#[tokio::test]
async fn errors_are_typed() {
    let (s, c) = seeded(&[]).await;
    let r = post(&c, &s.url, &[], "SELEC 1").await;
    assert_eq!((r.status, r.code()), (400, Some(62)));
    assert!(
        r.body
            .starts_with("Code: 62. DB::Exception: near \"SELEC\": syntax error"),
        "{}",
        r.body
    );
    assert!(r.body.trim_end().ends_with("(SYNTAX_ERROR)"));
    let r = post(&c, &s.url, &[], "SELECT * FROM missing").await;
    assert_eq!((r.status, r.code()), (404, Some(60)));
    let r = post(&c, &s.url, &[], "SELECT nope FROM people").await;
    assert_eq!((r.status, r.code()), (400, Some(47)));
    let r = post(&c, &s.url, &[], "SELECT 1 FORMAT Parquet").await;
    assert_eq!((r.status, r.code()), (404, Some(73)));
    assert!(r.body.contains("Unknown format Parquet"));
    let r = post(&c, &s.url, &[("default_format", "XML")], "SELECT 1").await;
    assert_eq!(r.status, 404);
    let r = post(&c, &s.url, &[("no_such_setting", "1")], "SELECT 1").await;
    assert_eq!((r.status, r.code()), (404, Some(115)));
    assert!(r.body.contains("no_such_setting"));
    let r = post(&c, &s.url, &[], "INSERT INTO people(id) VALUES (1)").await;
    assert_eq!((r.status, r.code()), (409, Some(1002)));
    let r = post(&c, &s.url, &[], "").await;
    assert_eq!((r.status, r.code()), (400, Some(62)));
    let r = post(&c, &s.url, &[], "SELECT 'unterminated").await;
    assert_eq!(r.status, 400);
    let r = post(&c, &s.url, &[("database", "other")], "SELECT 1").await;
    assert_eq!(r.status, 404);
    // A FORMAT clause keeps ClickHouse's text errors (its clients parse them)...
    let r = post(&c, &s.url, &[], "SELECT * FROM missing FORMAT JSON").await;
    assert_eq!(r.status, 404);
    assert!(
        r.body
            .starts_with("Code: 60. DB::Exception: no such table: missing"),
        "{}",
        r.body
    );
    // ...and a JSON variant when the client asks for JSON outside the SQL.
    let r = read_with_accept(&c, &s.url, "SELECT * FROM missing").await;
    assert_eq!(r.status, 404);
    let j = r.json();
    assert_eq!(j["error"]["code"], 60);
    assert_eq!(j["error"]["name"], "UNKNOWN_TABLE");
    assert!(j["error"]["message"].as_str().unwrap().contains("missing"));
    assert!(j["exception"].as_str().unwrap().starts_with("Code: 60."));
    let r = post(&c, &s.url, &[("default_format", "JSONEachRow")], "SELEC").await;
    assert_eq!(r.json()["error"]["name"], "SYNTAX_ERROR");
    // Query id is echoed on success and on error.
    // HTTP sessions: a session_id opens a session; session_check=1 needs one opened before.
    let r = post(&c, &s.url, &[("session_id", "abc")], "SELECT 1").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(&c, &s.url, &[("session_id", "abc"), ("session_check", "1")], "SELECT 1").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(&c, &s.url, &[("session_id", "nope"), ("session_check", "1")], "SELECT 1").await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = post(&c, &s.url, &[("query_id", "my-query-1")], "SELECT 1").await;
    assert_eq!(r.header("x-clickhouse-query-id"), Some("my-query-1"));
    let summary: serde_json::Value =
        serde_json::from_str(r.header("x-clickhouse-summary").unwrap()).unwrap();
    assert_eq!(summary["result_rows"], "1");
    assert!(
        summary["elapsed_ns"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 0
    );
    let r = post(&c, &s.url, &[("query_id", "my-query-2")], "SELEC").await;
    assert_eq!(r.header("x-clickhouse-query-id"), Some("my-query-2"));
    // The server is still fine.
    assert_eq!(ok(&c, &s.url, "SELECT count(*) FROM people").await, "3\n");
}

async fn read_with_accept(c: &reqwest::Client, base: &str, sql: &str) -> common::Resp {
    let r = c
        .post(format!("{base}/"))
        .header("Accept", "application/json")
        .body(sql.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    common::Resp {
        status,
        headers,
        body: r.text().await.unwrap(),
    }
}

#[tokio::test]
async fn reads_only_over_get_and_readonly() {
    let (s, c) = seeded(&[]).await;
    let r = get(&c, &s.url, &[("query", "DELETE FROM people")]).await;
    assert_eq!((r.status, r.code()), (403, Some(164)));
    let r = post(
        &c,
        &s.url,
        &[("readonly", "1")],
        "UPDATE people SET name = 'x'",
    )
    .await;
    assert_eq!(r.status, 403);
    let r = post(
        &c,
        &s.url,
        &[("readonly", "1"), ("transaction", "1")],
        "SELECT 1; DELETE FROM people",
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = post(
        &c,
        &s.url,
        &[
            ("readonly", "1"),
            ("query", "INSERT INTO people FORMAT JSONEachRow"),
        ],
        "{\"id\":9}",
    )
    .await;
    assert_eq!(r.status, 403);
    let r = get(
        &c,
        &s.url,
        &[("query", "SELECT count(*) FROM people"), ("readonly", "0")],
    )
    .await;
    assert_eq!(r.status, 403, "GET cannot be made writable");
    assert_eq!(ok(&c, &s.url, "SELECT count(*) FROM people").await, "3\n");
}

#[tokio::test]
async fn inserts_in_formats_are_atomic() {
    let (s, c) = seeded(&[]).await;
    let ins = |q: &'static str, body: &'static str| {
        let c = c.clone();
        let url = s.url.clone();
        async move { post(&c, &url, &[("query", q)], body).await }
    };
    let r = ins(
        "INSERT INTO people FORMAT JSONEachRow",
        "{\"id\":10,\"name\":\"j1\",\"tags\":[1,2]}\n{\"id\":11,\"score\":0.5}\n",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let summary: serde_json::Value =
        serde_json::from_str(r.header("x-clickhouse-summary").unwrap()).unwrap();
    assert_eq!(summary["written_rows"], "2");
    assert_eq!(
        ins(
            "INSERT INTO people (id, name) FORMAT CSV",
            "20,\"c,1\"\n21,\\N\n"
        )
        .await
        .status,
        200
    );
    assert_eq!(
        ins(
            "INSERT INTO people FORMAT CSVWithNames",
            "name,id\n\"c3\",22\n"
        )
        .await
        .status,
        200
    );
    assert_eq!(
        ins("INSERT INTO people (id, name) FORMAT TSV", "30\tt\\tab\n")
            .await
            .status,
        200
    );
    assert_eq!(
        ins(
            "INSERT INTO people (name, id) FORMAT TabSeparatedWithNames",
            "id\tname\n31\tt2\n"
        )
        .await
        .status,
        200
    );
    assert_eq!(
        ins(
            "INSERT INTO people (id, name) FORMAT JSONCompactEachRow",
            "[40, \"k\"]\n[41, null]\n"
        )
        .await
        .status,
        200
    );
    // Inline data in the body after FORMAT.
    let r = post(
        &c,
        &s.url,
        &[],
        "INSERT INTO people (id, name) FORMAT JSONEachRow {\"id\":50,\"name\":\"inline\"}",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let got = ok(
        &c,
        &s.url,
        "SELECT id, name, tags FROM people WHERE id >= 10 ORDER BY id FORMAT JSONCompactEachRow",
    )
    .await;
    assert_eq!(
        got,
        "[\"10\",\"j1\",\"[1,2]\"]\n[\"11\",null,null]\n[\"20\",\"c,1\",null]\n[\"21\",null,null]\n[\"22\",\"c3\",null]\n[\"30\",\"t\\tab\",null]\n[\"31\",\"t2\",null]\n[\"40\",\"k\",null]\n[\"41\",null,null]\n[\"50\",\"inline\",null]\n"
    );
    // A bad row anywhere rejects the whole insert.
    let r = ins(
        "INSERT INTO people FORMAT JSONEachRow",
        "{\"id\":60}\n{\"id\":61}\nnot json\n",
    )
    .await;
    assert_eq!((r.status, r.code()), (400, Some(117)));
    assert!(r.body.contains("row 3"), "{}", r.body);
    let r = ins(
        "INSERT INTO people FORMAT JSONEachRow",
        "{\"id\":62}\n{\"id\":1}\n",
    )
    .await;
    assert_eq!(r.status, 409, "duplicate key: {}", r.body);
    let r = ins(
        "INSERT INTO people (id) FORMAT JSONEachRow",
        "{\"id\":63,\"name\":\"x\"}",
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = ins(
        "INSERT INTO people FORMAT JSONEachRow",
        "{\"id\":64,\"nope\":1}",
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        ok(&c, &s.url, "SELECT count(*) FROM people WHERE id >= 60").await,
        "0\n"
    );
}

#[tokio::test]
async fn statements_and_transactions() {
    let (s, c) = seeded(&[]).await;
    let r = post(&c, &s.url, &[], "SELECT 1; SELECT 2").await;
    assert_eq!((r.status, r.code()), (400, Some(62)));
    assert!(r.body.contains("transaction=1"));
    // All or nothing.
    let r = post(
        &c,
        &s.url,
        &[("transaction", "1")],
        "INSERT INTO people(id) VALUES (100); INSERT INTO people(id) VALUES (1)",
    )
    .await;
    assert_eq!(r.status, 409);
    assert_eq!(
        ok(&c, &s.url, "SELECT count(*) FROM people WHERE id = 100").await,
        "0\n"
    );
    let r = post(
        &c,
        &s.url,
        &[("transaction", "1"), ("param_n", "7")],
        "CREATE TABLE log(n INTEGER); INSERT INTO log VALUES ({n:Int64}); CREATE TRIGGER tr AFTER INSERT ON log BEGIN INSERT INTO log VALUES (NEW.n + 1000); SELECT 1; END; INSERT INTO log VALUES (1); SELECT n FROM log ORDER BY n FORMAT CSV",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, "1\n7\n1001\n");
    let summary: serde_json::Value =
        serde_json::from_str(r.header("x-clickhouse-summary").unwrap()).unwrap();
    assert_eq!(summary["written_rows"], "3");
    // Transaction control from the client is refused; a request is a transaction.
    for sql in ["BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT a"] {
        let r = post(&c, &s.url, &[], sql).await;
        assert_eq!(r.status, 400, "{sql}: {}", r.body);
    }
    // RETURNING results come back after commit.
    let r = post(
        &c,
        &s.url,
        &[],
        "INSERT INTO people(id, name) VALUES (200, 'r') RETURNING id, name FORMAT JSONEachRow",
    )
    .await;
    assert_eq!(r.body, "{\"id\":\"200\",\"name\":\"r\"}\n");
    // Connection state that would outlive the request is refused.
    for sql in [
        "PRAGMA foreign_keys = OFF",
        "ATTACH DATABASE 'x.db' AS x",
        "CREATE TEMP TABLE t(a)",
    ] {
        let r = post(&c, &s.url, &[], sql).await;
        assert_eq!((r.status, r.code()), (403, Some(497)), "{sql}: {}", r.body);
    }
    assert_eq!(ok(&c, &s.url, "PRAGMA foreign_keys").await, "1\n");
    assert!(
        ok(&c, &s.url, "PRAGMA table_info(people)")
            .await
            .contains("name\tTEXT")
    );
}

#[tokio::test]
async fn result_limits() {
    let (s, c) = seeded(&[]).await;
    let r = post(
        &c,
        &s.url,
        &[("max_result_rows", "2")],
        "SELECT id FROM people",
    )
    .await;
    assert_eq!((r.status, r.code()), (400, Some(396)), "{}", r.body);
    let r = post(
        &c,
        &s.url,
        &[("max_result_rows", "2"), ("result_overflow_mode", "break")],
        "SELECT id FROM people ORDER BY id",
    )
    .await;
    assert_eq!(r.body, "1\n2\n");
    let r = post(
        &c,
        &s.url,
        &[("max_result_bytes", "5")],
        "SELECT name FROM people",
    )
    .await;
    assert_eq!(r.status, 400);
    // A request may not raise a server limit.
    let r = post(&c, &s.url, &[("max_execution_time", "100000")], "SELECT 1").await;
    assert_eq!(r.status, 400, "{}", r.body);
    // Server-side limits come from flags / env.
    let s2 = Server::start(&["--max-result-rows", "1"]);
    let r = post(&c, &s2.url, &[], "SELECT 1 UNION ALL SELECT 2").await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn oversize_body_and_query() {
    let s = Server::start(&["--max-body-size", "1000", "--max-query-size", "200"]);
    let c = client();
    let big = format!("SELECT '{}'", "x".repeat(2000));
    let r = post(&c, &s.url, &[], &big).await;
    assert_eq!((r.status, r.code()), (413, Some(1001)), "{}", r.body);
    assert!(r.body.contains("max_body_size"));
    // Chunked body without Content-Length is limited too.
    let stream =
        futures_util::stream::iter((0..20).map(|_| Ok::<_, std::io::Error>(vec![b' '; 100])));
    let r = c
        .post(format!("{}/", s.url))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let r = post(&c, &s.url, &[], &format!("SELECT '{}'", "y".repeat(300))).await;
    assert_eq!(r.status, 413);
    assert!(r.body.contains("max_query_size"));
    // Insert data does not count against max_query_size.
    ok(&c, &s.url, "CREATE TABLE t(a TEXT)").await;
    let rows: String = (0..20)
        .map(|i| format!("{{\"a\":\"{i:020}\"}}\n"))
        .collect();
    let r = post(
        &c,
        &s.url,
        &[("query", "INSERT INTO t FORMAT JSONEachRow")],
        &rows,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(ok(&c, &s.url, "SELECT 1").await, "1\n");
}

const FOREVER: &str =
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c";

#[tokio::test]
async fn execution_time_limit_interrupts_and_server_stays_responsive() {
    let s = Server::start(&["--readers", "2"]);
    let c = client();
    let started = Instant::now();
    let long = {
        let (c, url) = (c.clone(), s.url.clone());
        tokio::spawn(async move { post(&c, &url, &[("max_execution_time", "1.5")], FOREVER).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // While the runaway query runs, the server answers at once.
    let r = c.get(format!("{}/ping", s.url)).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "Ok.\n");
    assert_eq!(ok(&c, &s.url, "SELECT 42").await, "42\n");
    assert!(
        !long.is_finished(),
        "the runaway query should still be running when /ping answered"
    );
    let r = long.await.unwrap();
    assert_eq!((r.status, r.code()), (408, Some(159)), "{}", r.body);
    assert!(r.body.contains("max_execution_time"));
    assert!(started.elapsed() >= Duration::from_millis(1400));
    // A runaway write is interrupted and rolled back too.
    ok(&c, &s.url, "CREATE TABLE w(x INTEGER)").await;
    let r = post(
        &c,
        &s.url,
        &[("max_execution_time", "1")],
        "INSERT INTO w WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c",
    )
    .await;
    assert_eq!(r.status, 408, "{}", r.body);
    assert_eq!(ok(&c, &s.url, "SELECT count(*) FROM w").await, "0\n");
    assert_eq!(
        ok(&c, &s.url, "INSERT INTO w VALUES (1) RETURNING x").await,
        "1\n",
        "writer is usable after an interrupt"
    );
}

#[tokio::test]
async fn failure_after_streaming_began_is_marked() {
    let s = Server::start(&["--http-buffer-size", "1024"]);
    let c = client();
    let r = c
        .post(format!("{}/", s.url))
        .query(&[("max_execution_time", "1")])
        .body("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "streaming had begun, so the status was already sent"
    );
    let tag = r
        .headers()
        .get("x-clickhouse-exception-tag")
        .expect("streamed responses announce an exception tag")
        .to_str()
        .unwrap()
        .to_string();
    let mut body = Vec::new();
    let mut stream = r.bytes_stream();
    use futures_util::StreamExt;
    while let Some(chunk) = stream.next().await {
        body.extend_from_slice(&chunk.unwrap());
        if body.len() > 8192 {
            body.drain(..body.len() - 8192);
        }
    }
    let text = String::from_utf8_lossy(&body);
    assert_eq!(tag.len(), 16);
    let start = text.find("\r\n__exception__\r\n").unwrap_or_else(|| {
        panic!(
            "no exception trailer: {}",
            &text[text.len().saturating_sub(300)..]
        )
    });
    let trailer = &text[start..];
    let msg_start = format!("\r\n__exception__\r\n{tag}\n");
    assert!(trailer.starts_with(&msg_start), "{trailer:?}");
    let msg = trailer[msg_start.len()..].split('\n').next().unwrap();
    assert!(
        msg.starts_with("Code: 159. DB::Exception: Timeout exceeded")
            && msg.ends_with("(TIMEOUT_EXCEEDED)"),
        "{msg}"
    );
    assert!(
        trailer.ends_with(&format!("\n{} {tag}\r\n__exception__\r\n", msg.len() + 1)),
        "{trailer:?}"
    );
}

#[tokio::test]
async fn million_row_select_streams_with_bounded_memory() {
    let s = Server::start(&[]);
    let c = client();
    ok(
        &c,
        &s.url,
        "CREATE TABLE big(id INTEGER PRIMARY KEY, pad TEXT)",
    )
    .await;
    ok(
        &c,
        &s.url,
        "INSERT INTO big WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000) SELECT x, printf('%0100d', x) FROM c",
    )
    .await;
    let baseline = s.rss();
    let pid_rss = {
        let s_pid = s.pid();
        move || {
            let st = std::fs::read_to_string(format!("/proc/{s_pid}/status")).unwrap_or_default();
            st.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        }
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(pid_rss());
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        })
    };
    let r = c
        .post(format!("{}/", s.url))
        .body("SELECT id, pad FROM big")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    use futures_util::StreamExt;
    let mut stream = r.bytes_stream();
    let (mut bytes, mut lines, mut last_line) = (0u64, 0u64, Vec::new());
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        bytes += chunk.len() as u64;
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
        last_line.extend_from_slice(&chunk);
        if last_line.len() > 4096 {
            last_line.drain(..last_line.len() - 4096);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    assert_eq!(lines, 1_000_000);
    assert!(String::from_utf8_lossy(&last_line).ends_with(&format!("1000000\t{:0100}\n", 1000000)));
    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "streamed {bytes} bytes; server RSS baseline {baseline}, peak {peak}, growth {growth}"
    );
    assert!(bytes > 100_000_000);
    assert!(
        growth < 48 * 1024 * 1024,
        "server memory grew by {growth} bytes while streaming {bytes} bytes"
    );
}

#[tokio::test]
async fn readers_do_not_wait_for_a_long_write() {
    let s = Server::start(&["--readers", "4"]);
    let c = client();
    let r = post(
        &c,
        &s.url,
        &[("transaction", "1")],
        "CREATE TABLE small2(id INTEGER PRIMARY KEY); INSERT INTO small2 VALUES (1), (2)",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    ok(&c, &s.url, "CREATE TABLE big(x INTEGER, pad TEXT)").await;
    let write = {
        let (c, url) = (c.clone(), s.url.clone());
        tokio::spawn(async move {
            post(
                &c,
                &url,
                &[("transaction", "1")],
                "INSERT INTO big WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 4000000) SELECT x, printf('%050d', x) FROM c; CREATE INDEX big_pad ON big(pad); INSERT INTO small2 VALUES (3)",
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !write.is_finished(),
        "the long write finished too quickly to test anything"
    );
    let mut readers = Vec::new();
    for _ in 0..32 {
        let (c, url) = (c.clone(), s.url.clone());
        readers.push(tokio::spawn(async move {
            get(&c, &url, &[("query", "SELECT count(*) FROM small2")]).await
        }));
    }
    for r in readers {
        let r = r.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body, "2\n",
            "readers see the last committed state, not the write in progress"
        );
    }
    assert!(
        !write.is_finished(),
        "32 reads should complete while the write is still running"
    );
    let w = write.await.unwrap();
    assert_eq!(w.status, 200, "{}", w.body);
    assert_eq!(ok(&c, &s.url, "SELECT count(*) FROM small2").await, "3\n");
}

#[tokio::test]
async fn graceful_shutdown_finishes_requests_and_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start_in(dir.path(), &[], &[]);
    let c = client();
    ok(&c, &s.url, "CREATE TABLE keep(x INTEGER)").await;
    ok(&c, &s.url, "INSERT INTO keep WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 10000) SELECT x FROM c").await;
    // A slow request in flight when SIGTERM arrives still gets its whole answer.
    let slow = {
        let (c, url) = (c.clone(), s.url.clone());
        tokio::spawn(async move {
            post(&c, &url, &[], "SELECT count(*) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) SELECT x FROM c)").await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = tokio::task::spawn_blocking(move || {
        let st = s.terminate();
        (st, s)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "exit status {:?}", status.0);
    let r = slow.await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "3000000\n"));
    let wal = dir.path().join("ichibase.db-wal");
    let wal_len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(
        wal_len, 0,
        "WAL should be checkpointed and truncated on shutdown"
    );
    drop(status);
    // Everything is there after a restart.
    let s2 = Server::start_in(dir.path(), &[], &[]);
    assert_eq!(
        ok(&c, &s2.url, "SELECT count(*), sum(x) FROM keep").await,
        "10000\t50005000\n"
    );
}

#[tokio::test]
async fn configuration_layers() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ichibase.toml"),
        "max_result_rows = 1\nmax_body_size = 5000\n",
    )
    .unwrap();
    let c = client();
    // The TOML file in the working directory applies...
    let s = Server::start_in(dir.path(), &[], &[]);
    assert_eq!(
        post(&c, &s.url, &[], "SELECT 1 UNION ALL SELECT 2")
            .await
            .status,
        400
    );
    drop(s);
    // ...env beats the file...
    let s = Server::start_in(dir.path(), &[], &[("ICHIBASE_MAX_RESULT_ROWS", "2")]);
    assert_eq!(
        post(&c, &s.url, &[], "SELECT 1 UNION ALL SELECT 2")
            .await
            .status,
        200
    );
    assert_eq!(
        post(
            &c,
            &s.url,
            &[],
            "SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3"
        )
        .await
        .status,
        400
    );
    drop(s);
    // ...and flags beat env.
    let s = Server::start_in(
        dir.path(),
        &["--max-result-rows", "3"],
        &[("ICHIBASE_MAX_RESULT_ROWS", "2")],
    );
    assert_eq!(
        post(
            &c,
            &s.url,
            &[],
            "SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3"
        )
        .await
        .status,
        200
    );
    assert_eq!(
        post(&c, &s.url, &[], &format!("SELECT '{}'", "x".repeat(6000)))
            .await
            .status,
        413,
        "file value still applies"
    );
    drop(s);
    // A bad config file stops start-up with a clear message.
    std::fs::write(dir.path().join("ichibase.toml"), "max_rezult_rows = 1\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ichibase"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("max_rezult_rows"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cli_help_and_version() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ichibase"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("serve") && help.contains("version"), "{help}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ichibase"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--listen")
            && help.contains("--data-dir")
            && help.contains("ICHIBASE_LISTEN"),
        "{help}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ichibase"))
        .arg("version")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .starts_with(&format!("ichibase {}", env!("CARGO_PKG_VERSION")))
    );
}

/// Kills the child process when dropped (also when an assertion fails).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start the binary with defaults in `dir`; returns the process, its URL and the stdout lines
/// printed before it listened.
fn start_plain(dir: &std::path::Path) -> (KillOnDrop, String, Vec<String>) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ichibase"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(dir)
        .env_remove("ICHIBASE_DATA_DIR")
        .env_remove("ICHIBASE_ADMIN_KEY")
        .env("ICHIBASE_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let guard = KillOnDrop(child);
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut before = Vec::new();
    let url = loop {
        let line = lines
            .next()
            .expect("server exited before listening")
            .unwrap();
        if let Some(u) = line.strip_prefix("ichibase listening on ") {
            break u.to_string();
        }
        before.push(line);
    };
    std::thread::spawn(move || for _ in lines {});
    (guard, url, before)
}

#[tokio::test]
async fn first_start_creates_data_dir_and_prints_an_admin_key() {
    let dir = tempfile::tempdir().unwrap();
    let (server, url, printed) = start_plain(dir.path());
    assert!(dir.path().join("ichibase-data/ichibase.db").exists());
    assert!(dir.path().join("ichibase-data/jwt-keys.json").exists());
    let key = printed
        .iter()
        .find_map(|l| {
            l.trim()
                .strip_prefix("ichibase:")
                .map(str::trim)
                .filter(|k| k.starts_with("ik_"))
        })
        .unwrap_or_else(|| panic!("no admin key printed: {printed:?}"))
        .to_string();
    let c = common::client_with_token(&key);
    assert_eq!(ok(&c, &url, "SELECT auth_role()").await, "admin\n");
    let r = post(&common::anon_client(), &url, &[], "CREATE TABLE t(x)").await;
    assert_eq!(
        r.status, 403,
        "anonymous clients get nothing by default: {}",
        r.body
    );
    drop(server);
    // An admin exists now: a restart prints no new key, and the old one still works.
    let (_server, url, printed) = start_plain(dir.path());
    assert!(printed.iter().all(|l| !l.contains("ik_")), "{printed:?}");
    assert_eq!(ok(&c, &url, "SELECT auth_role()").await, "admin\n");
}

#[tokio::test]
async fn cli_admin_commands() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ichibase"))
            .arg("admin")
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let out = run(&[
        "create-user",
        "--email",
        "root@example.com",
        "--password",
        "root password",
    ]);
    assert!(out.contains("root@example.com"), "{out}");
    let key = run(&["create-key", "--name", "ci", "--role", "admin"])
        .trim()
        .to_string();
    assert!(key.starts_with("ik_"), "{key}");
    let out = run(&["rotate-jwt-key"]);
    assert!(out.contains("new signing key"), "{out}");
    let s = Server::start_in(&data, &[], &[]);
    let r = common::anon_client()
        .post(format!("{}/", s.url))
        .basic_auth("root@example.com", Some("root password"))
        .body("SELECT auth_role()")
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "admin\n");
    assert_eq!(
        ok(
            &common::client_with_token(&key),
            &s.url,
            "SELECT auth_role()"
        )
        .await,
        "admin\n"
    );
    // A duplicate user is a clear error, not a crash.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ichibase"))
        .args([
            "admin",
            "create-user",
            "--email",
            "ROOT@example.com",
            "--password",
            "another password",
        ])
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exists already"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// POST raw bytes with URL arguments and extra headers; the body comes back as bytes.
async fn post_bytes(
    c: &reqwest::Client,
    base: &str,
    args: &[(&str, &str)],
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut rb = c.post(format!("{base}/")).query(args).body(body);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let h = r.headers().clone();
    (status, h, r.bytes().await.unwrap().to_vec())
}

/// ClickHouse's binary formats, probes and compression (issue 17).
#[tokio::test]
async fn binary_formats_probes_and_compression() {
    use std::io::{Read, Write};
    let s = Server::start(&[]);
    let c = client();
    ok(&c, &s.url, "CREATE TABLE b(id INTEGER PRIMARY KEY, name TEXT, score REAL)").await;
    // Native output: one block of 3 columns and 2 rows, Nullable table columns.
    ok(&c, &s.url, "INSERT INTO b VALUES (1, 'x', 0.5), (2, NULL, NULL)").await;
    let (st, h, body) = post_bytes(&c, &s.url, &[], &[], b"SELECT id, name FROM b ORDER BY id FORMAT Native".to_vec()).await;
    assert_eq!(st, 200);
    assert_eq!(h.get("x-clickhouse-format").unwrap(), "Native");
    let mut want = vec![2u8, 2, 2, b'i', b'd', 15];
    want.extend_from_slice(b"Nullable(Int64)");
    want.extend_from_slice(&[0, 0]);
    want.extend_from_slice(&1i64.to_le_bytes());
    want.extend_from_slice(&2i64.to_le_bytes());
    want.extend_from_slice(&[4, b'n', b'a', b'm', b'e', 16]);
    want.extend_from_slice(b"Nullable(String)");
    want.extend_from_slice(&[0, 1, 1, b'x', 0]);
    assert_eq!(body, want);
    // RowBinaryWithNamesAndTypes of literals: narrow types.
    let (_, _, body) = post_bytes(&c, &s.url, &[], &[], b"SELECT 1 AS a, -2 AS b FORMAT RowBinaryWithNamesAndTypes".to_vec()).await;
    assert_eq!(body, b"\x02\x01a\x01b\x05UInt8\x04Int8\x01\xfe");
    // A Native insert whose data is not UTF-8, after the SQL in the body and after ?query=.
    let mut block = vec![2u8, 1, 2, b'i', b'd', 5];
    block.extend_from_slice(b"Int64");
    block.extend_from_slice(&3i64.to_le_bytes());
    block.extend_from_slice(&[4, b'n', b'a', b'm', b'e', 6]);
    block.extend_from_slice(b"String");
    block.extend_from_slice(&[2, 0xff, 0xfe]);
    let mut body = b"INSERT INTO b (id, name) FORMAT Native\n".to_vec();
    body.extend_from_slice(&block);
    let (st, _, out) = post_bytes(&c, &s.url, &[], &[], body).await;
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&out));
    let mut block2 = block.clone();
    let at = 6 + 5;
    block2[at..at + 8].copy_from_slice(&4i64.to_le_bytes());
    let (st, _, out) = post_bytes(&c, &s.url, &[("query", "INSERT INTO b FORMAT Native")], &[], block2).await;
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&out));
    assert_eq!(ok(&c, &s.url, "SELECT id, hex(name) FROM b WHERE id > 2 ORDER BY id").await, "3\tFFFE\n4\tFFFE\n");
    // Bytes that are neither UTF-8 nor binary insert data: a clear error.
    let (st, _, out) = post_bytes(&c, &s.url, &[], &[], vec![b'S', 0xff]).await;
    assert_eq!(st, 400);
    assert!(String::from_utf8_lossy(&out).contains("not valid UTF-8"));
    // Compressed request bodies: gzip, zstd, lz4 frames.
    let sql = b"INSERT INTO b (id, name) FORMAT CSV\n10,\"gz\"\n".to_vec();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&sql).unwrap();
    let (st, _, out) = post_bytes(&c, &s.url, &[], &[("content-encoding", "gzip")], gz.finish().unwrap()).await;
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&out));
    let z = zstd::encode_all(&b"INSERT INTO b (id, name) FORMAT CSV\n11,\"zs\"\n"[..], 1).unwrap();
    let (st, _, _) = post_bytes(&c, &s.url, &[], &[("content-encoding", "zstd")], z).await;
    assert_eq!(st, 200);
    let mut l = lz4_flex::frame::FrameEncoder::new(Vec::new());
    l.write_all(b"INSERT INTO b (id, name) FORMAT CSV\n12,\"lz\"\n").unwrap();
    let (st, _, _) = post_bytes(&c, &s.url, &[], &[("content-encoding", "lz4")], l.finish().unwrap()).await;
    assert_eq!(st, 200);
    assert_eq!(ok(&c, &s.url, "SELECT group_concat(name) FROM b WHERE id >= 10").await, "gz,zs,lz\n");
    // Responses compressed only with enable_http_compression=1.
    let q = b"SELECT group_concat(name, ',') FROM (SELECT 'some text to compress' AS name FROM b)".to_vec();
    let (_, h, _) = post_bytes(&c, &s.url, &[], &[("accept-encoding", "gzip")], q.clone()).await;
    assert!(h.get("content-encoding").is_none());
    let (st, h, out) = post_bytes(&c, &s.url, &[("enable_http_compression", "1")], &[("accept-encoding", "gzip")], q).await;
    assert_eq!(st, 200);
    assert_eq!(h.get("content-encoding").unwrap(), "gzip");
    let mut text = String::new();
    flate2::read::GzDecoder::new(&out[..]).read_to_string(&mut text).unwrap();
    assert!(text.starts_with("some text to compress,"), "{text}");
    // Probes.
    assert_eq!(
        ok(&c, &s.url, "SELECT version(), timezone(), currentDatabase(), currentUser(), uptime() >= 0").await,
        "24.8.0.0\tUTC\tdefault\tadmin\t1\n"
    );
    assert_eq!(ok(&c, &s.url, "SELECT name FROM system.tables").await, "b\n");
    assert!(ok(&c, &s.url, "SELECT name, value, readonly FROM system.settings LIMIT 10000").await.contains("max_result_rows\t"));
    assert_eq!(ok(&c, &s.url, "SELECT count(*) FROM system.formats WHERE name = 'Native'").await, "1\n");
    assert_eq!(
        ok(&c, &s.url, "DESCRIBE TABLE b").await,
        "id\tNullable(Int64)\t\t\t\t\t\nname\tNullable(String)\t\t\t\t\t\nscore\tNullable(Float64)\t\t\t\t\t\n"
    );
    assert_eq!(ok(&c, &s.url, "EXISTS TABLE b").await, "1\n");
    let r = post(&c, &s.url, &[], "SELECT * FROM system.nope").await;
    assert_eq!(r.code(), Some(60), "{}", r.body);
    // ClickHouse's max_result_rows=0 ("no limit") means the server's limit.
    let r = post(&c, &s.url, &[("max_result_rows", "0"), ("max_execution_time", "0")], "SELECT 1").await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Issue 14.4: keys (and users) the CLI creates while the server runs work at once (within the
/// watcher's second), without a restart.
#[tokio::test]
async fn cli_changes_reach_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let s = Server::start_in(&data, &[], &[]);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ichibase"))
            .arg("admin")
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let key = run(&["create-key", "--name", "live", "--role", "admin"]).trim().to_string();
    assert!(key.starts_with("ik_"), "{key}");
    let c = common::client_with_token(&key);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let r = common::post(&c, &s.url, &[], "SELECT auth_role()").await;
        if r.status == 200 {
            assert_eq!(r.body, "admin\n");
            break;
        }
        assert_eq!(r.status, 401, "{}", r.body);
        assert!(std::time::Instant::now() < deadline, "the new key never worked without a restart");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // A JWT signing key rotated by the CLI is used by the running server too.
    let out = run(&["rotate-jwt-key"]);
    assert!(out.contains("new signing key"), "{out}");
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let r = common::post(&c, &s.url, &[], "SELECT 1").await;
    assert_eq!(r.status, 200, "{}", r.body);
}
