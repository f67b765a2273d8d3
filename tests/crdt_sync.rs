//! CRDT sync between two real servers (issue 26): `ichibase sync` keeps them converged while
//! both take writes, through a kill -9 of one server and of the sync process itself; a user's
//! device (a user's access token) receives only rows its read policy shows, and its pushed
//! changes pass its write policies or are reported refused; schema changes of CRR tables that
//! would not merge are refused.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const SCHEMA: &str = "CREATE TABLE notes (id TEXT PRIMARY KEY, owner TEXT, body TEXT, n INTEGER NOT NULL DEFAULT 0)";

/// The `ichibase sync` child, killed when dropped (also when the test fails).
struct SyncProc(Child);

impl Drop for SyncProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sync_process(dir: &std::path::Path, peer: &str) -> SyncProc {
    SyncProc(Command::new(env!("CARGO_BIN_EXE_ichibase"))
        .args(["sync", "--peer", peer, "--key", ADMIN_KEY, "--interval-ms", "100", "--data-dir"])
        .arg(dir)
        .env("ICHIBASE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn ichibase sync"))
}

fn kill9(pid: u32) {
    let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
}

/// SQL that may fail while a server is down: retried until it answers 200.
async fn exec(base: &std::sync::Mutex<String>, sql: &str) {
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let url = base.lock().unwrap().clone();
        if let Ok(r) = c.post(format!("{url}/")).body(sql.to_string()).send().await {
            let st = r.status();
            let body = r.text().await.unwrap_or_default();
            if st.is_success() {
                return;
            }
            assert!(st.is_server_error() || st.as_u16() == 503, "{sql}: {st} {body}");
        }
        assert!(Instant::now() < deadline, "{sql} never succeeded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn dump(base: &str) -> String {
    let body = ok(&client(), base, "SELECT id, owner, body, n FROM notes ORDER BY id FORMAT JSONCompact").await;
    let j: Value = serde_json::from_str(&body).unwrap();
    j["data"].to_string()
}

async fn all_changes(c: &reqwest::Client, base: &str) -> Vec<Value> {
    let mut since = 0;
    let mut out = Vec::new();
    loop {
        let r = read(
            c.get(format!("{base}/sync/changes"))
                .query(&[("since", since.to_string()), ("limit", "7".to_string())])
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let j = r.json();
        out.extend(j["changes"].as_array().unwrap().iter().cloned());
        since = j["cursor"].as_i64().unwrap();
        if !j["more"].as_bool().unwrap() {
            return out;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_converge_through_kill9_and_devices_see_only_their_rows() {
    let a_dir = tempfile::tempdir().unwrap();
    let mut a = Server::start_in(a_dir.path(), &["--signup-open", "true"], &[]);
    let b = Server::start(&[]);
    let admin = client();
    for s in [&a.url, &b.url] {
        ok(&admin, s, SCHEMA).await;
    }
    // A through the admin API, B through the CLI on its data directory (while it runs).
    let r = jpost(&admin, &a.url, "/admin/crdt/tables", json!({"table": "notes"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["pk"], json!(["id"]));
    let out = Command::new(env!("CARGO_BIN_EXE_ichibase"))
        .args(["crdt", "enable", "notes", "--data-dir"])
        .arg(&b.data_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Schema changes: adding a column is fine, the rest is refused with a clear error.
    let r = post(&admin, &a.url, &[], "DROP TABLE notes").await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("CRDT_SCHEMA_REFUSED") && r.body.contains("CRR table"), "{}", r.body);
    let r = post(&admin, &a.url, &[], "ALTER TABLE notes RENAME COLUMN body TO text").await;
    assert_eq!(r.status, 409, "{}", r.body);
    // A table without a primary key cannot become a CRR table.
    ok(&admin, &a.url, "CREATE TABLE loose (x, y)").await;
    let r = jpost(&admin, &a.url, "/admin/crdt/tables", json!({"table": "loose"})).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("PRIMARY KEY"), "{}", r.body);

    // Users live on A; their policy shows each their own notes.
    let alice = signup(&a.url, "alice@example.com").await;
    let bob = signup(&a.url, "bob@example.com").await;
    let r = jpost(
        &admin,
        &a.url,
        "/admin/policies",
        json!({"name": "my_notes", "table": "notes", "roles": ["user"], "using": "owner = auth_userid()"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);

    let mut sync = sync_process(a_dir.path(), &b.url);
    let a_url = std::sync::Arc::new(std::sync::Mutex::new(a.url.clone()));
    let b_url = std::sync::Arc::new(std::sync::Mutex::new(b.url.clone()));

    // Both servers take writes: inserts, updates of shared rows, deletes and re-inserts.
    let writer = |base: std::sync::Arc<std::sync::Mutex<String>>, side: &'static str, owner: String| {
        tokio::spawn(async move {
            for i in 0..60 {
                exec(&base, &format!("INSERT INTO notes (id, owner, body) VALUES ('{side}-{i}', '{owner}', 'v0') ON CONFLICT (id) DO NOTHING")).await;
                exec(&base, &format!("INSERT INTO notes (id, owner, body) VALUES ('shared-{}', '{owner}', '{side}') ON CONFLICT (id) DO UPDATE SET body = '{side}', n = n + 1", i % 7)).await;
                if i % 5 == 0 && i > 0 {
                    exec(&base, &format!("UPDATE notes SET body = 'edited on {side}' WHERE id = '{side}-{}'", i - 1)).await;
                }
                if i % 9 == 0 {
                    exec(&base, &format!("DELETE FROM notes WHERE id = '{side}-{}'", i / 2)).await;
                }
                if i % 12 == 0 {
                    exec(&base, &format!("INSERT INTO notes (id, owner, body) VALUES ('{side}-{}', '{owner}', 'again') ON CONFLICT (id) DO NOTHING", i / 2)).await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let wa = writer(a_url.clone(), "a", alice.id.clone());
    let wb = writer(b_url.clone(), "b", bob.id.clone());

    // In the middle: kill -9 server A and restart it on its data directory; kill -9 the sync
    // process and start it again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    kill9(a.pid());
    let _ = a.child.wait();
    kill9(sync.0.id());
    let _ = sync.0.wait();
    tokio::time::sleep(Duration::from_millis(300)).await;
    a = Server::start_in(a_dir.path(), &["--signup-open", "true"], &[]);
    *a_url.lock().unwrap() = a.url.clone();
    sync = sync_process(a_dir.path(), &b.url);
    wa.await.unwrap();
    wb.await.unwrap();

    // Converged: identical tables, nothing lost.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (da, db) = loop {
        let (da, db) = (dump(&a.url).await, dump(&b.url).await);
        if da == db {
            break (da, db);
        }
        assert!(Instant::now() < deadline, "not converged:\nA: {da}\nB: {db}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(da, db);
    let rows: Value = serde_json::from_str(&da).unwrap();
    let rows = rows.as_array().unwrap().clone();
    let ids: Vec<&str> = rows.iter().map(|r| r[0].as_str().unwrap()).collect();
    // What each writer left alive (each side writes its own ids, in order).
    let mut alive = std::collections::BTreeSet::new();
    for i in 0..60usize {
        alive.insert(i);
        if i % 9 == 0 {
            alive.remove(&(i / 2));
        }
        if i % 12 == 0 {
            alive.insert(i / 2);
        }
    }
    for side in ["a", "b"] {
        for i in 0..60usize {
            let id = format!("{side}-{i}");
            assert_eq!(ids.contains(&id.as_str()), alive.contains(&i), "{id}: expected alive = {}; {ids:?}", alive.contains(&i));
        }
    }
    for i in 0..7 {
        assert!(ids.contains(&format!("shared-{i}").as_str()));
    }

    // Devices: alice's token on A receives only alice's rows, bob's only bob's.
    let owner_of = |id: &str| rows.iter().find(|r| r[0] == id).map(|r| r[1].as_str().unwrap_or("").to_string());
    for (u, other) in [(&alice, &bob), (&bob, &alice)] {
        let got = all_changes(&u.client, &a.url).await;
        assert!(!got.is_empty());
        for ch in &got {
            let id = ch["pk"][0].as_str().unwrap();
            if ch["cl"].as_i64().unwrap() % 2 == 1 {
                assert_eq!(ch["cols"]["owner"]["v"], json!(u.id), "{} received a row of another user: {ch}", u.id);
            } else {
                // A deleted row is sent only when its last values were the user's.
                assert_ne!(owner_of(id).as_deref(), Some(other.id.as_str()), "{ch}");
            }
        }
        let mine = rows.iter().filter(|r| r[1] == json!(u.id)).count();
        let alive = got.iter().filter(|c| c["cl"].as_i64().unwrap() % 2 == 1).count();
        assert_eq!(alive, mine, "every row of {} reaches its device", u.id);
    }
    // Anonymous callers get nothing.
    let r = read(anon_client().get(format!("{}/sync/changes", a.url)).send().await.unwrap()).await;
    assert_eq!(r.status, 401, "{}", r.body);

    // A device pushes: its own new row is applied; an edit of bob's row is refused and reported.
    // b-1 is bob's, alive since its first insert (causal length 1).
    let bobs = "b-1".to_string();
    assert_eq!(owner_of(&bobs).as_deref(), Some(bob.id.as_str()));
    let now_hlc = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64) << 16;
    let site = "device-of-alice";
    let batch = json!({"changes": [
        {"table": "notes", "pk": ["from-device"], "cl": 1, "cols": {
            "owner": {"v": alice.id, "t": now_hlc, "s": site},
            "body": {"v": "written offline", "t": now_hlc, "s": site},
            "n": {"v": 1, "t": now_hlc, "s": site}}},
        {"table": "notes", "pk": [bobs], "cl": 1, "cols": {
            "body": {"v": "alice was here", "t": now_hlc + 5, "s": site}}}
    ]});
    let r = jpost(&alice.client, &a.url, "/sync/changes", batch.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["applied"], 1, "{j}");
    assert_eq!(j["refused"], 1, "{j}");
    assert_eq!(j["results"][1]["error"]["name"], "ACCESS_DENIED", "{j}");
    // Idempotent: the same batch again changes nothing.
    let j = jpost(&alice.client, &a.url, "/sync/changes", batch).await.json();
    assert_eq!(j["applied"], 0, "{j}");
    assert_eq!(j["unchanged"], 1, "{j}");
    // The device's row reaches B through the sync process; bob's row is untouched everywhere.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body = ok(&admin, &b.url, "SELECT body FROM notes WHERE id = 'from-device' FORMAT TSV").await;
        if body.trim() == "written offline" {
            break;
        }
        assert!(Instant::now() < deadline, "the device's row never reached B");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let body = ok(&admin, &b.url, &format!("SELECT body FROM notes WHERE id = '{bobs}' FORMAT TSV")).await;
    assert_ne!(body.trim(), "alice was here");

    // Adding a column stays mergeable: the new column's writes sync too.
    for s in [&a.url, &b.url] {
        ok(&admin, s, "ALTER TABLE notes ADD COLUMN tag TEXT").await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await; // the servers refresh their triggers
    ok(&admin, &b.url, "UPDATE notes SET tag = 'tagged on b' WHERE id = 'shared-1'").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let t = ok(&admin, &a.url, "SELECT tag FROM notes WHERE id = 'shared-1' FORMAT TSV").await;
        if t.trim() == "tagged on b" {
            break;
        }
        assert!(Instant::now() < deadline, "the added column's write never reached A: {t}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(sync);
}
