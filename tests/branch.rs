//! SQLite branches over HTTP against the real server: a branch taken during concurrent writes is a
//! consistent snapshot; `?branch=` sees the branch, not live; bundles applied to a branch run
//! their checks there; merging migrations that add columns and tables keeps existing data; a
//! failing merge leaves live untouched; only the admin reaches branches.

mod common;

use common::{Server, api, client, ok, post};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn a_branch_taken_during_writes_is_consistent() {
    let s = Server::start(&[]);
    let c = client();
    ok(
        &c,
        &s.url,
        "CREATE TABLE ledger (n INTEGER PRIMARY KEY, pad TEXT)",
    )
    .await;
    ok(&c, &s.url, "CREATE TABLE totals (c INTEGER NOT NULL)").await;
    ok(&c, &s.url, "INSERT INTO totals VALUES (0)").await;
    // Writers: each transaction inserts a row and bumps the total; the two only agree in a
    // consistent snapshot.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for _ in 0..3 {
        let (c, url, stop) = (c.clone(), s.url.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = post(
                    &c,
                    &url,
                    &[("transaction", "1")],
                    "INSERT INTO ledger (pad) VALUES (hex(randomblob(200))); UPDATE totals SET c = c + 1",
                )
                .await;
                assert_eq!(r.status, 200, "{}", r.body);
                n += 1;
            }
            n
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut names = Vec::new();
    for i in 0..4 {
        let name = format!("snap{i}");
        let (st, b) = api(
            &c,
            "POST",
            format!("{}/branches", s.url),
            Some(json!({"name": name})),
        )
        .await;
        assert_eq!(st, 200, "{b}");
        assert_eq!(b["name"], name.as_str());
        names.push(name);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut written = 0;
    for w in writers {
        written += w.await.unwrap();
    }
    assert!(
        written > 20,
        "writers made progress while branching ({written})"
    );
    let live: i64 = ok(&c, &s.url, "SELECT count(*) FROM ledger")
        .await
        .trim()
        .parse()
        .unwrap();
    assert_eq!(live, written);
    for name in &names {
        let r = post(
            &c,
            &s.url,
            &[("branch", name)],
            "SELECT (SELECT count(*) FROM ledger) AS rows, (SELECT c FROM totals) AS total, (SELECT integrity_check FROM pragma_integrity_check) AS integrity FORMAT JSONEachRow",
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let v: Value = serde_json::from_str(r.body.trim()).unwrap();
        assert_eq!(v["rows"], v["total"], "branch {name} is one snapshot: {v}");
        assert_eq!(v["integrity"], "ok");
        let rows: i64 = v["rows"].as_str().unwrap().parse().unwrap();
        assert!(rows > 0 && rows < live, "branch {name}: {rows} of {live}");
    }
    let (_, list) = api(&c, "GET", format!("{}/branches", s.url), None).await;
    assert_eq!(list["branches"].as_array().unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn branch_queries_bundles_merge_and_delete() {
    let s = Server::start(&[]);
    let c = client();
    ok(
        &c,
        &s.url,
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)",
    )
    .await;
    ok(
        &c,
        &s.url,
        "INSERT INTO notes (body) VALUES ('一つ目'), ('second')",
    )
    .await;
    let (st, _) = api(
        &c,
        "POST",
        format!("{}/branches", s.url),
        Some(json!({"name": "try-tags"})),
    )
    .await;
    assert_eq!(st, 200);

    // Writes to the branch stay in the branch; writes to live stay live.
    ok(&c, &s.url, "INSERT INTO notes (body) VALUES ('live only')").await;
    let r = post(
        &c,
        &s.url,
        &[("branch", "try-tags")],
        "INSERT INTO notes (body) VALUES ('branch only')",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(
        &c,
        &s.url,
        &[("branch", "try-tags")],
        "SELECT body FROM notes ORDER BY id",
    )
    .await;
    assert_eq!(r.body, "一つ目\nsecond\nbranch only\n");
    assert_eq!(
        ok(&c, &s.url, "SELECT body FROM notes ORDER BY id").await,
        "一つ目\nsecond\nlive only\n"
    );

    // A bundle adding a column, a table, a policy and a function, with checks, in the branch.
    let bundle = json!({
        "name": "tags",
        "migrations": [
            "ALTER TABLE notes ADD COLUMN tags TEXT NOT NULL DEFAULT ''",
            {"name": "tag table", "sql": "CREATE TABLE tag_names (name TEXT PRIMARY KEY); CREATE INDEX notes_tags ON notes (tags)"}
        ],
        "policies": [{"name": "tagged_notes", "table": "notes", "roles": ["user"], "operations": ["select"], "using": "tags <> ''"}],
        "functions": [{"name": "tag", "source": "return function(input)\n  db.exec('UPDATE notes SET tags = {t:String} WHERE id = {id:Int64}', {t = input.tag, id = input.id})\n  return db.one('SELECT tags FROM notes WHERE id = {id:Int64}', {id = input.id})\nend"}],
        "checks": [
            {"name": "tags a note", "function": "tag", "input": {"id": 1, "tag": "日記"}, "expect": {"tags": "日記"}},
            {"name": "users see tagged notes only", "lua": "local rows = db.query('SELECT body FROM tagged_notes')\nassert(#rows == 1 and rows[1].body == '一つ目', json.encode(rows))", "as": {"user_id": "u1", "role": "user"}},
            {"name": "any tag round-trips", "lua": "prop.check('tag', prop.string{alphabet = 'japanese', min = 1, max = 10}, function(t)\n  return fn.call('tag', {id = 2, tag = t}).tags == t\nend, {runs = 30})"}
        ]
    });
    let (st, r) = api(
        &c,
        "POST",
        format!("{}/branches/try-tags/apply", s.url),
        Some(bundle.clone()),
    )
    .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["ok"], true, "{r:#}");
    assert_eq!(r["checks"].as_array().unwrap().len(), 3);
    // Live has not changed yet.
    let r = post(&c, &s.url, &[], "SELECT tags FROM notes").await;
    assert_eq!(r.status, 400, "no such column on live: {}", r.body);
    let (_, info) = api(&c, "GET", format!("{}/branches/try-tags", s.url), None).await;
    assert_eq!(info["pending_bundles"].as_array().unwrap().len(), 1, "{info}");
    assert_eq!(info["pending_bundles"][0]["name"], "tags");
    assert_eq!(info["pending_bundles"][0]["checks_ok"], true);

    // A failing bundle is rolled back in the branch and reported with its check details.
    let mut broken = bundle.clone();
    broken["name"] = json!("broken");
    broken["migrations"] = json!(["CREATE TABLE extra (a)", "ALTER TABLE nope ADD COLUMN x"]);
    let (st, r) = api(
        &c,
        "POST",
        format!("{}/branches/try-tags/apply", s.url),
        Some(broken),
    )
    .await;
    assert_eq!(st, 404, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("migration 2"),
        "{r}"
    );
    let r = post(
        &c,
        &s.url,
        &[("branch", "try-tags")],
        "SELECT count(*) FROM sqlite_schema WHERE name = 'extra'",
    )
    .await;
    assert_eq!(r.body.trim(), "0");

    // Merge: the migrations run on live in one transaction; existing rows keep their data.
    let (st, m) = api(
        &c,
        "POST",
        format!("{}/branches/try-tags/merge", s.url),
        None,
    )
    .await;
    assert_eq!(st, 200, "{m}");
    assert_eq!(m["merged"], json!(["tags"]));
    assert_eq!(
        ok(&c, &s.url, "SELECT body, tags FROM notes ORDER BY id").await,
        "一つ目\t\nsecond\t\nlive only\t\n",
        "live rows kept, with the new column's default; branch rows not copied"
    );
    assert_eq!(
        ok(&c, &s.url, "SELECT count(*) FROM tag_names")
            .await
            .trim(),
        "0"
    );
    let r = c
        .post(format!("{}/fn/tag", s.url))
        .json(&json!({"id": 3, "tag": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"tags": "x"}));
    let (st, _) = api(&c, "GET", format!("{}/branches/try-tags", s.url), None).await;
    assert_eq!(st, 404, "merged branches are deleted");

    // Errors are typed.
    let (st, e) = api(
        &c,
        "POST",
        format!("{}/branches", s.url),
        Some(json!({"name": "../x"})),
    )
    .await;
    assert_eq!(st, 400, "{e}");
    let (st, _) = api(
        &c,
        "POST",
        format!("{}/branches", s.url),
        Some(json!({"name": "b2"})),
    )
    .await;
    assert_eq!(st, 200);
    let (st, e) = api(
        &c,
        "POST",
        format!("{}/branches", s.url),
        Some(json!({"name": "b2"})),
    )
    .await;
    assert_eq!(st, 409, "{e}");
    let (st, e) = api(&c, "POST", format!("{}/branches/b2/merge", s.url), None).await;
    assert_eq!(st, 409, "nothing to merge: {e}");
    let r = post(&c, &s.url, &[("branch", "nope")], "SELECT 1").await;
    assert_eq!(r.status, 404, "{}", r.body);
    let (st, e) = api(
        &c,
        "POST",
        format!("{}/branches/b2/apply", s.url),
        Some(json!({"name": "x", "checks": [{"name": "c"}]})),
    )
    .await;
    assert_eq!(st, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("needs either"),
        "{e}"
    );
    let (st, e) = api(
        &c,
        "POST",
        format!("{}/branches/b2/apply", s.url),
        Some(json!({"name": "x", "migrations": ["DROP TABLE _ichibase_users"]})),
    )
    .await;
    assert_eq!(st, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("engine tables"),
        "{e}"
    );

    // Only the admin reaches branches, over the API and over SQL.
    ok(&c, &s.url, "CREATE TABLE t (x)").await;
    let key: Value = c
        .post(format!("{}/admin/keys", s.url))
        .json(&json!({"role": "user", "name": "k"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let u = common::client_with_token(key["key"].as_str().expect("api key"));
    let (st, _) = api(&u, "GET", format!("{}/branches", s.url), None).await;
    assert_eq!(st, 403);
    let r = post(&u, &s.url, &[("branch", "b2")], "SELECT 1").await;
    assert_eq!(r.status, 403, "{}", r.body);

    let (st, _) = api(&c, "DELETE", format!("{}/branches/b2", s.url), None).await;
    assert_eq!(st, 200);
    let (_, list) = api(&c, "GET", format!("{}/branches", s.url), None).await;
    assert_eq!(list["branches"], json!([]));
    assert!(!s.data_dir.join("branches/b2.db").exists());
}

/// Issue 14.1: "verified before it goes live" holds at merge: a bundle whose checks fail on the
/// branch is not merged unless an admin forces it, and the override is recorded.
#[tokio::test(flavor = "multi_thread")]
async fn merge_refuses_bundles_whose_checks_fail() {
    let s = Server::start(&[]);
    let c = client();
    ok(&c, &s.url, "CREATE TABLE items (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)").await;
    let (st, _) = api(&c, "POST", format!("{}/branches", s.url), Some(json!({"name": "b"}))).await;
    assert_eq!(st, 200);
    // No checks at all: refused at apply.
    let (st, r) = api(
        &c,
        "POST",
        format!("{}/branches/b/apply", s.url),
        Some(json!({"name": "unchecked", "functions": [{"name": "f", "source": "return function() return 1 end"}]})),
    )
    .await;
    assert_eq!(st, 400, "{r}");
    assert!(r.to_string().contains("at least one check"), "{r}");
    let (st, r) = api(
        &c,
        "POST",
        format!("{}/branches/b/apply", s.url),
        Some(json!({"name": "double", "checks": [],
            "functions": [{"name": "double", "source": "return function(i) return {n = i.n * 3} end"}]})),
    )
    .await;
    assert_eq!(st, 400, "empty checks are no checks: {r}");
    // A bundle whose check fails is applied to the branch (to inspect) but reported failing.
    let (st, r) = api(
        &c,
        "POST",
        format!("{}/branches/b/apply", s.url),
        Some(json!({"name": "double",
            "functions": [{"name": "double", "source": "return function(i) return {n = i.n * 3} end"}],
            "checks": [{"name": "doubles two", "function": "double", "input": {"n": 2}, "expect": {"n": 4}}]})),
    )
    .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["ok"], false, "{r}");
    let (_, info) = api(&c, "GET", format!("{}/branches/b", s.url), None).await;
    assert_eq!(info["pending_bundles"][0]["name"], "double", "{info}");
    assert_eq!(info["pending_bundles"][0]["checks_ok"], false, "{info}");
    // Merge refuses, naming the bundle and the check; nothing goes live.
    let (st, r) = api(&c, "POST", format!("{}/branches/b/merge", s.url), None).await;
    assert_eq!(st, 422, "{r}");
    let msg = r.to_string();
    assert!(msg.contains("double") && msg.contains("doubles two") && msg.contains("CHECK_FAILED"), "{msg}");
    let (st, _) = api(&c, "POST", format!("{}/fn/double", s.url), Some(json!({"n": 2}))).await;
    assert_eq!(st, 404, "the function did not go live");
    let (st, _) = api(&c, "GET", format!("{}/branches/b", s.url), None).await;
    assert_eq!(st, 200, "a refused merge keeps the branch");
    // An explicit override merges and is recorded.
    let (st, r) = api(&c, "POST", format!("{}/branches/b/merge?force=1", s.url), None).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["override"]["forced"], true, "{r}");
    assert_eq!(
        ok(&c, &s.url, "SELECT count(*) FROM _ichibase_meta WHERE key LIKE 'merge_override:b:%'").await.trim(),
        "1"
    );

    // A bundle that passed when applied but is broken by a later one is refused at merge.
    let (st, _) = api(&c, "POST", format!("{}/branches", s.url), Some(json!({"name": "c2"}))).await;
    assert_eq!(st, 200);
    let good = json!({"name": "count", "functions": [{"name": "count_items", "source": "return function() return db.one('SELECT count(*) AS n FROM items') end"}],
        "checks": [{"name": "counts", "function": "count_items", "input": {}, "expect": {"n": 0}}]});
    let (st, r) = api(&c, "POST", format!("{}/branches/c2/apply", s.url), Some(good)).await;
    assert_eq!((st, r["ok"].clone()), (200, json!(true)), "{r}");
    let breaker = json!({"name": "rename", "migrations": ["ALTER TABLE items RENAME TO things"],
        "checks": [{"name": "things exist", "lua": "assert(db.one('SELECT count(*) AS n FROM things').n == 0)"}]});
    let (st, r) = api(&c, "POST", format!("{}/branches/c2/apply", s.url), Some(breaker)).await;
    assert_eq!((st, r["ok"].clone()), (200, json!(true)), "{r}");
    let (st, r) = api(&c, "POST", format!("{}/branches/c2/merge", s.url), None).await;
    assert_eq!(st, 422, "{r}");
    assert!(r.to_string().contains("counts"), "{r}");
    let r = post(&c, &s.url, &[], "SELECT count(*) FROM things").await;
    assert_eq!(r.status, 404, "live untouched: {}", r.body);
}
