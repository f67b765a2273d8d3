//! Change capture with SQLite's pre-update hook and the batched change log (src/storage/capture.rs,
//! src/realtime/cdc.rs), with real clients: a statement's changes are one batch yet each keeps its
//! own id (replay can start inside a batch); rolled-back statements, savepoints and transactions
//! emit nothing, also inside a Lua `db.tx`; ids keep growing and replay works across a restart;
//! a database whose log was written by the capture triggers of older versions is migrated; a
//! `kill -9` during writes never leaves a committed row without its event (the log is written
//! inside the data's transactions); writes by another process send `refetch`; REPLACE, upsert and
//! rename; a branch merge's writes are captured.

mod common;

use std::time::Duration;

use common::ws::{Ws, send};
use common::{ADMIN_KEY, Server, client, post};
use serde_json::{Value, json};

async fn connect(base: &str) -> Ws {
    let mut ws = common::ws::open(base, &[("authorization", format!("Bearer {ADMIN_KEY}"))]).await;
    assert_eq!(recv(&mut ws).await["type"], "hello");
    ws
}

/// Next JSON frame (pings skipped); generous for a loaded machine.
async fn recv(ws: &mut Ws) -> Value {
    common::ws::recv_within(ws, 60).await
}

async fn recv_type(ws: &mut Ws, ty: &str) -> Value {
    loop {
        let v = recv(ws).await;
        if v["type"] == ty {
            return v;
        }
    }
}

async fn sql(base: &str, q: &str) -> String {
    let r = post(&client(), base, &[("transaction", "1")], q).await;
    assert_eq!(r.status, 200, "{q}: {}", r.body);
    r.body
}

async fn enable(base: &str, table: &str) {
    let r = common::jpost(&client(), base, "/admin/cdc", json!({"table": table})).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

async fn subscribe(ws: &mut Ws, sub: &str, object: &str, since: Option<i64>) -> Value {
    let mut m = json!({"type": "subscribe", "sub": sub, "object": object});
    if let Some(s) = since {
        m["since"] = json!(s);
    }
    send(ws, m).await;
    recv_type(ws, "subscribed").await
}

/// Change events up to and including the one whose key id is `last`.
async fn changes_until(ws: &mut Ws, last: i64) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let e = recv_type(ws, "change").await;
        let done = e["key"]["id"].as_i64() == Some(last);
        out.push(e);
        if done {
            return out;
        }
    }
}

fn summary(evs: &[Value]) -> Vec<String> {
    evs.iter()
        .map(|e| format!("{} {} {}", e["table"].as_str().unwrap_or(""), e["op"].as_str().unwrap(), e["key"]["id"]))
        .collect()
}

fn ids(evs: &[Value]) -> Vec<i64> {
    evs.iter().map(|e| e["change_id"].as_i64().unwrap()).collect()
}

#[tokio::test]
async fn one_statement_is_one_batch_and_replay_starts_inside_it() {
    let s = Server::start(&[]);
    let base = &s.url;
    sql(base, "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, r REAL, b BLOB)").await;
    sql(base, "CREATE TABLE u(k TEXT PRIMARY KEY, n INT) WITHOUT ROWID").await;
    sql(base, "CREATE TABLE plain(x)").await;
    enable(base, "t").await;
    enable(base, "u").await;
    let mut ws = connect(base).await;
    subscribe(&mut ws, "t", "t", None).await;
    subscribe(&mut ws, "u", "u", None).await;
    // 1000 rows in one statement: one batch, 1000 events with consecutive ids, in row order.
    sql(base, "INSERT INTO t(id, v) WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 1000) SELECT n, 'row ' || n FROM c").await;
    let evs = changes_until(&mut ws, 1000).await;
    assert_eq!(evs.len(), 1000);
    let got = ids(&evs);
    assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "consecutive ids");
    assert_eq!(evs[499]["new"], json!({"id": 500, "v": "row 500", "r": null, "b": null}));
    // One transaction over two captured tables and an uncaptured one: statement order kept;
    // values of every type; a table without rowid keys by its primary key.
    sql(
        base,
        "INSERT INTO u VALUES ('a', 1); INSERT INTO plain VALUES (1);
         UPDATE t SET r = 2.5, b = x'00ff' WHERE id = 2; DELETE FROM t WHERE id = 3;
         UPDATE u SET n = 2 WHERE k = 'a'; INSERT INTO t(id) VALUES (1001)",
    )
    .await;
    let evs2 = changes_until(&mut ws, 1001).await;
    let sm: Vec<String> = evs2
        .iter()
        .map(|e| format!("{} {} {}", e["sub"].as_str().unwrap(), e["op"].as_str().unwrap(), e["key"]))
        .collect();
    assert_eq!(
        sm,
        vec![
            r#"u insert {"k":"a"}"#,
            r#"t update {"id":2}"#,
            r#"t delete {"id":3}"#,
            r#"u update {"k":"a"}"#,
            r#"t insert {"id":1001}"#
        ]
    );
    assert_eq!(evs2[1]["new"], json!({"id": 2, "v": "row 2", "r": 2.5, "b": "00FF"}));
    assert_eq!(evs2[1]["old"]["r"], Value::Null);
    assert_eq!(evs2[2]["old"], json!({"id": 3, "v": "row 3", "r": null, "b": null}));
    assert_eq!(evs2[3]["old"]["n"], 1);
    let all: Vec<i64> = got.iter().chain(ids(&evs2).iter()).copied().collect();
    assert!(all.windows(2).all(|w| w[0] < w[1]), "commit order: {all:?}");
    drop(ws);
    // Resume from the middle of the big batch: exactly the rest, in order, then live.
    let mut ws = connect(base).await;
    send(&mut ws, json!({"type": "subscribe", "sub": "t", "object": "t", "since": got[699]})).await;
    let mut replayed = Vec::new();
    loop {
        let m = recv(&mut ws).await;
        match m["type"].as_str() {
            Some("change") => replayed.push(m),
            Some("subscribed") => {
                assert_eq!(m["replayed_from"], got[699]);
                break;
            }
            _ => {}
        }
    }
    assert_eq!(replayed.len(), 300 + 3, "ids 701..1000 and the three later changes of t");
    assert_eq!(replayed[0]["key"]["id"], 701);
    assert_eq!(replayed[0]["change_id"], got[700]);
    assert_eq!(summary(&replayed[300..]), vec!["t update 2", "t delete 3", "t insert 1001"]);
    sql(base, "INSERT INTO t(id) VALUES (1002)").await;
    assert_eq!(recv_type(&mut ws, "change").await["key"]["id"], 1002);
}

#[tokio::test]
async fn rolled_back_statements_savepoints_and_transactions_emit_nothing() {
    let s = Server::start(&[]);
    let base = &s.url;
    sql(base, "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)").await;
    enable(base, "t").await;
    let mut ws = connect(base).await;
    subscribe(&mut ws, "t", "t", None).await;
    sql(base, "INSERT INTO t(id) VALUES (1)").await;
    // A failing transaction over HTTP.
    let bad = post(&client(), base, &[("transaction", "1")], "INSERT INTO t(id) VALUES (2); INSERT INTO t(id) VALUES (1)").await;
    assert_eq!(bad.status, 409, "{}", bad.body);
    // One autocommitted statement that fails after writing rows.
    let bad = post(&client(), base, &[], "INSERT INTO t(id) VALUES (3), (4), (1)").await;
    assert_eq!(bad.status, 409, "{}", bad.body);
    // In a Lua transaction: a statement that fails half-way (caught), a nested db.tx that raises
    // (caught: its savepoint is rolled back), a nested one that succeeds.
    let c = client();
    let r = common::put_fn(
        &c,
        base,
        "mixed",
        "return function()
           return db.tx(function()
             db.exec('INSERT INTO t(id, v) VALUES (10, {v:String})', {v = 'kept'})
             assert(not pcall(db.exec, 'INSERT INTO t(id) SELECT column1 FROM (VALUES (11), (12), (13), (10))'))
             db.exec('INSERT INTO t(id) VALUES (14)')
             assert(not pcall(db.tx, function()
               db.exec('INSERT INTO t(id) VALUES (15)')
               db.exec('UPDATE t SET v = {v:String} WHERE id = 10', {v = 'undone'})
               error('nope')
             end))
             db.tx(function()
               db.exec('INSERT INTO t(id) VALUES (16)')
               assert(not pcall(db.tx, function() db.exec('DELETE FROM t WHERE id = 14') error('inner') end))
             end)
             db.exec('INSERT INTO t(id) VALUES (17)')
             return 'ok'
           end)
         end",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = common::call_fn(&c, base, "mixed", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // A Lua transaction that raises at the end: nothing of it.
    let r = common::put_fn(&c, base, "fails", "return function() db.tx(function() db.exec('INSERT INTO t(id) VALUES (20)') error('boom') end) end").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = common::call_fn(&c, base, "fails", json!({})).await;
    assert_ne!(r.status, 200, "{}", r.body);
    // A savepoint rolled back over SQL-over-HTTP, and a marker.
    let r = post(&c, base, &[], "SAVEPOINT a; INSERT INTO t(id) VALUES (30); ROLLBACK TO a; INSERT INTO t(id) VALUES (31); RELEASE a").await;
    let _ = r; // whether savepoint statements are allowed over HTTP or not, nothing of 30 may show
    sql(base, "INSERT INTO t(id) VALUES (99)").await;
    let evs = changes_until(&mut ws, 99).await;
    let mut want = vec!["t insert 1", "t insert 10", "t insert 14", "t insert 16", "t insert 17"];
    let rows = sql(base, "SELECT count(*) FROM t WHERE id = 31 FORMAT CSV").await;
    if rows.trim() == "1" {
        want.push("t insert 31");
    }
    want.push("t insert 99");
    assert_eq!(summary(&evs), want);
    assert_eq!(evs[1]["new"]["v"], "kept");
}

#[tokio::test]
async fn ids_keep_growing_and_replay_works_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start_in(dir.path(), &[], &[]);
    sql(&s.url, "CREATE TABLE t(id INTEGER PRIMARY KEY)").await;
    enable(&s.url, "t").await;
    let mut ws = connect(&s.url).await;
    subscribe(&mut ws, "t", "t", None).await;
    sql(&s.url, "INSERT INTO t VALUES (1), (2)").await;
    let seen = changes_until(&mut ws, 2).await;
    let last = seen[1]["change_id"].as_i64().unwrap();
    drop(ws);
    // Missed: one batch before the stop (the close flushes it), one after the restart.
    sql(&s.url, "INSERT INTO t VALUES (3), (4)").await;
    assert!(s.terminate().success());
    let s = Server::start_in(dir.path(), &[], &[]);
    sql(&s.url, "INSERT INTO t VALUES (5); DELETE FROM t WHERE id = 1").await;
    let mut ws = connect(&s.url).await;
    send(&mut ws, json!({"type": "subscribe", "sub": "t", "object": "t", "since": last})).await;
    let mut got = Vec::new();
    loop {
        let m = recv(&mut ws).await;
        match m["type"].as_str() {
            Some("change") => got.push(m),
            Some("subscribed") => break,
            _ => {}
        }
    }
    assert_eq!(summary(&got), vec!["t insert 3", "t insert 4", "t insert 5", "t delete 1"]);
    let all: Vec<i64> = std::iter::once(last).chain(ids(&got)).collect();
    assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "{all:?}");
}

#[tokio::test]
async fn a_trigger_written_log_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start_in(dir.path(), &[], &[]);
    sql(&s.url, "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT)").await;
    enable(&s.url, "items").await;
    assert!(s.terminate().success());
    // Make it look like a database of the trigger-based version: its log table with two
    // changes, a capture trigger, and no record of the `cdc` module's migration.
    {
        let c = rusqlite::Connection::open(dir.path().join("ichibase.db")).unwrap();
        c.execute_batch(
            "DROP TABLE _ichibase_change_batches;
             DELETE FROM _ichibase_module_migrations WHERE module = 'cdc';
             CREATE TABLE _ichibase_changes (id INTEGER PRIMARY KEY, tbl TEXT NOT NULL, op TEXT NOT NULL,
                 pk TEXT NOT NULL, old TEXT, new TEXT,
                 at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')));
             INSERT INTO items VALUES (1, 'one');
             INSERT INTO _ichibase_changes (id, tbl, op, pk, old, new) VALUES
                 (41, 'items', 'insert', '{\"id\":1}', NULL, '{\"id\":1,\"name\":\"one\"}'),
                 (42, 'items', 'update', '{\"id\":1}', '{\"id\":1,\"name\":\"one\"}', '{\"id\":1,\"name\":\"uno\"}');
             UPDATE items SET name = 'uno';
             CREATE TRIGGER _ichibase_cdc_items_insert AFTER INSERT ON items BEGIN
                 INSERT INTO _ichibase_changes (tbl, op, pk, old, new) VALUES ('items', 'insert', '{}', NULL, '{}');
             END;",
        )
        .unwrap();
    }
    let s = Server::start_in(dir.path(), &[], &[]);
    let base = &s.url;
    sql(base, "INSERT INTO items VALUES (2, 'two')").await;
    let mut ws = connect(base).await;
    send(&mut ws, json!({"type": "subscribe", "sub": "i", "object": "items", "since": 40})).await;
    let mut got = Vec::new();
    loop {
        let m = recv(&mut ws).await;
        match m["type"].as_str() {
            Some("change") => got.push(m),
            Some("subscribed") => break,
            _ => {}
        }
    }
    assert_eq!(summary(&got), vec!["items insert 1", "items update 1", "items insert 2"]);
    assert_eq!(ids(&got), vec![41, 42, 43]);
    assert_eq!(got[1]["old"]["name"], "one");
    assert_eq!(got[2]["new"], json!({"id": 2, "name": "two"}));
    let left = sql(
        base,
        "SELECT count(*) FROM sqlite_schema WHERE (type = 'trigger' AND name GLOB '_ichibase_cdc_*') OR name = '_ichibase_changes' FORMAT CSV",
    )
    .await;
    assert_eq!(left.trim(), "0", "legacy triggers and table are gone");
}

/// Every change event a fresh subscription replays from the start of the log.
async fn replay_all(base: &str, object: &str) -> Vec<Value> {
    let mut ws = connect(base).await;
    send(&mut ws, json!({"type": "subscribe", "sub": "all", "object": object, "since": 0})).await;
    let mut got = Vec::new();
    loop {
        let m = recv(&mut ws).await;
        match m["type"].as_str() {
            Some("change") => got.push(m),
            Some("subscribed") => {
                assert!(m.get("refetch").is_none(), "the whole log is kept: {m}");
                return got;
            }
            _ => {}
        }
    }
}

/// The log is written inside the data's own transactions: a server killed with SIGKILL while
/// writes of every shape (autocommitted statements, multi-row statements, multi-statement
/// transactions, Lua `db.tx`) are in flight never leaves a committed row without its event, nor
/// an event without its row, and change ids stay unique and growing.
#[tokio::test(flavor = "multi_thread")]
async fn no_committed_row_is_missing_from_the_log_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start_in(dir.path(), &[], &[]);
    sql(&s.url, "CREATE TABLE t(id INTEGER PRIMARY KEY, w INT)").await;
    enable(&s.url, "t").await;
    let r = common::put_fn(
        &client(),
        &s.url,
        "two",
        "return function(input)
           db.tx(function()
             db.exec('INSERT INTO t(id, w) VALUES ({a:Int64}, 3)', {a = input.a})
             db.exec('INSERT INTO t(id, w) VALUES ({b:Int64}, 3)', {b = input.a + 1})
           end)
           return {}
         end",
    )
    .await;
    assert!(r.status == 200 || r.status == 201, "{}", r.body);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(1));
    for round in 0..3 {
        let mut writers = Vec::new();
        for w in 0..4i64 {
            let (url, next) = (s.url.clone(), next.clone());
            writers.push(tokio::spawn(async move {
                let c = client();
                loop {
                    let id = next.fetch_add(10, std::sync::atomic::Ordering::Relaxed);
                    let q = match w {
                        0 => format!("INSERT INTO t VALUES ({id}, 0)"),
                        1 => format!("INSERT INTO t VALUES ({id}, 1), ({}, 1), ({}, 1)", id + 1, id + 2),
                        2 => format!("INSERT INTO t VALUES ({id}, 2); UPDATE t SET w = 22 WHERE id = {id}; INSERT INTO t VALUES ({}, 2)", id + 1),
                        _ => {
                            // Panics (ends this writer) once the server is gone.
                            common::call_fn(&c, &url, "two", json!({"a": id})).await;
                            continue;
                        }
                    };
                    let args: &[(&str, &str)] = if w == 2 { &[("transaction", "1")] } else { &[] };
                    if c.post(format!("{url}/"))
                        .query(args)
                        .body(q)
                        .send()
                        .await
                        .is_err()
                    {
                        return; // the server is gone
                    }
                }
            }));
        }
        // Let writes run, then kill the server in the middle of them.
        let url = s.url.clone();
        common::wait_for("rows to be written", 120, || {
            let url = url.clone();
            async move {
                let r = post(&client(), &url, &[], "SELECT count(*) FROM t").await;
                (r.status == 200 && r.body.trim().parse::<i64>().unwrap_or(0) >= 150 * (round + 1)).then_some(())
            }
        })
        .await;
        s.child.kill().unwrap();
        let _ = s.child.wait();
        for w in writers {
            let _ = tokio::time::timeout(Duration::from_secs(60), w).await;
        }
        s = Server::start_in(dir.path(), &[], &[]);
    }
    let rows: Vec<i64> = post(&client(), &s.url, &[], "SELECT id FROM t ORDER BY id")
        .await
        .body
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert!(rows.len() >= 450, "{} rows", rows.len());
    let evs = replay_all(&s.url, "t").await;
    let mut inserted: Vec<i64> = evs.iter().filter(|e| e["op"] == "insert").map(|e| e["key"]["id"].as_i64().unwrap()).collect();
    inserted.sort();
    assert_eq!(inserted, rows, "every committed row has its insert event, and no event lacks its row");
    let updates = evs.iter().filter(|e| e["op"] == "update").count();
    let updated = post(&client(), &s.url, &[], "SELECT count(*) FROM t WHERE w = 22").await.body;
    assert_eq!(updates.to_string(), updated.trim(), "one update event per committed update");
    let ids = ids(&evs);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "change ids grow");
}

/// A write by another process (here the test itself, through its own SQLite connection) is not
/// captured row by row: the server notices it and tells every subscription to refetch; events
/// of its own writes keep coming.
#[tokio::test]
async fn writes_by_another_process_send_refetch() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(dir.path(), &[], &[]);
    let base = &s.url;
    sql(base, "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)").await;
    enable(base, "t").await;
    let mut ws = connect(base).await;
    subscribe(&mut ws, "t", "t", None).await;
    sql(base, "INSERT INTO t VALUES (1, 'a')").await;
    assert_eq!(recv_type(&mut ws, "change").await["key"]["id"], 1);
    {
        let c = rusqlite::Connection::open(dir.path().join("ichibase.db")).unwrap();
        c.busy_timeout(Duration::from_secs(30)).unwrap();
        c.execute("INSERT INTO t VALUES (2, 'from the shell')", []).unwrap();
    }
    let m = recv_type(&mut ws, "refetch").await;
    assert_eq!((m["sub"].as_str(), m["table"].as_str()), (Some("t"), Some("t")), "{m}");
    sql(base, "INSERT INTO t VALUES (3, 'c')").await;
    let e = recv_type(&mut ws, "change").await;
    assert_eq!(e["key"]["id"], 3, "{e}");
    // The other process adds a column: the next autocommit write (SQLite prepares it again and
    // re-runs it) is committed, and its event carries the new column.
    {
        let c = rusqlite::Connection::open(dir.path().join("ichibase.db")).unwrap();
        c.busy_timeout(Duration::from_secs(30)).unwrap();
        c.execute_batch("ALTER TABLE t ADD COLUMN w").unwrap();
    }
    let r = post(&client(), base, &[], "INSERT INTO t(id, v) VALUES (4, 'd')").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let e = recv_type(&mut ws, "change").await;
    assert_eq!((e["key"]["id"].as_i64(), e["new"]["v"].as_str()), (Some(4), Some("d")), "{e}");
    assert!(e["new"].as_object().unwrap().contains_key("w"), "the added column is in the event: {e}");
}

/// REPLACE over an existing key is one `insert` (as the capture triggers of older versions
/// reported it); an upsert is an `update`; a renamed table keeps being captured under its new
/// name (new subscriptions use it); columns added by ALTER TABLE appear in events.
#[tokio::test]
async fn replace_upsert_and_rename() {
    let s = Server::start(&[]);
    let base = &s.url;
    sql(base, "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)").await;
    enable(base, "t").await;
    let mut ws = connect(base).await;
    subscribe(&mut ws, "t", "t", None).await;
    sql(base, "INSERT INTO t VALUES (1, 'a')").await;
    sql(base, "REPLACE INTO t VALUES (1, 'b')").await;
    sql(base, "INSERT INTO t VALUES (1, 'c') ON CONFLICT (id) DO UPDATE SET v = excluded.v").await;
    sql(base, "INSERT INTO t VALUES (2, 'x')").await;
    let evs = changes_until(&mut ws, 2).await;
    assert_eq!(summary(&evs), vec!["t insert 1", "t insert 1", "t update 1", "t insert 2"]);
    assert_eq!(evs[1]["new"]["v"], "b");
    assert_eq!(evs[2]["old"]["v"], "b");
    sql(base, "ALTER TABLE t RENAME TO t2").await;
    sql(base, "ALTER TABLE t2 ADD COLUMN w INT").await;
    let mut ws2 = connect(base).await;
    subscribe(&mut ws2, "t2", "t2", None).await;
    sql(base, "INSERT INTO t2 VALUES (3, 'y', 7)").await;
    let e = recv_type(&mut ws2, "change").await;
    assert_eq!((e["table"].as_str(), &e["new"]), (Some("t2"), &json!({"id": 3, "v": "y", "w": 7})), "{e}");
}

/// Bundles applied through a branch merge write on the live writer: their data changes are
/// captured like any other write, with the columns the migration added.
#[tokio::test]
async fn branch_merge_writes_are_captured() {
    let s = Server::start(&[]);
    let base = &s.url;
    let c = client();
    sql(base, "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)").await;
    sql(base, "INSERT INTO notes VALUES (1, 'one'), (2, 'two')").await;
    enable(base, "notes").await;
    let mut ws = connect(base).await;
    subscribe(&mut ws, "n", "notes", None).await;
    let (st, _) = common::api(&c, "POST", format!("{base}/branches"), Some(json!({"name": "b"}))).await;
    assert_eq!(st, 200);
    let bundle = json!({
        "name": "tags",
        "migrations": ["ALTER TABLE notes ADD COLUMN tag TEXT NOT NULL DEFAULT ''", "UPDATE notes SET tag = 'x' WHERE id = 2"],
        "checks": [{"name": "tagged", "lua": "assert(db.one('SELECT tag FROM notes WHERE id = 2').tag == 'x')"}]
    });
    let (st, r) = common::api(&c, "POST", format!("{base}/branches/b/apply"), Some(bundle)).await;
    assert_eq!(st, 200, "{r}");
    let (st, r) = common::api(&c, "POST", format!("{base}/branches/b/merge"), None).await;
    assert_eq!(st, 200, "{r}");
    let e = recv_type(&mut ws, "change").await;
    assert_eq!((e["op"].as_str(), &e["key"]["id"]), (Some("update"), &json!(2)), "{e}");
    assert_eq!(e["new"], json!({"id": 2, "body": "two", "tag": "x"}));
    assert_eq!(e["old"]["tag"], "", "{e}");
}

/// Changes committed while nobody subscribes are not decoded for anyone (the dispatcher only
/// moves past them): a subscription made afterwards without `since` gets exactly the changes
/// after it, live; with `since` it replays the earlier ones from the log.
#[tokio::test]
async fn changes_made_with_no_subscriber_are_not_delivered_live_later() {
    let s = Server::start(&[]);
    let base = &s.url;
    sql(base, "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)").await;
    enable(base, "t").await;
    for i in 1..=5 {
        let r = post(&client(), base, &[], &format!("INSERT INTO t VALUES ({i}, 'unseen')")).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // Give the dispatcher its wake-ups for those jobs (and its one-second tick).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut ws = connect(base).await;
    subscribe(&mut ws, "t", "t", None).await;
    sql(base, "INSERT INTO t VALUES (6, 'live')").await;
    let e = recv_type(&mut ws, "change").await;
    assert_eq!((e["key"]["id"].as_i64(), e["new"]["v"].as_str()), (Some(6), Some("live")), "{e}");
    assert_eq!(e["change_id"], 6, "{e}");
    let mut ws2 = connect(base).await;
    send(&mut ws2, json!({"type": "subscribe", "sub": "t", "object": "t", "since": 0})).await;
    let evs = changes_until(&mut ws2, 6).await;
    assert_eq!(ids(&evs), vec![1, 2, 3, 4, 5, 6]);
}
