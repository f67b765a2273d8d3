//! Identities and row-level security over HTTP: two users and an anonymous client, policies as
//! views, WITH CHECK, sessions and tokens, and an adversarial suite of attempts to reach rows
//! or engine tables a role must not reach.

mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::ok as sql_ok;
use common::{
    Server, User, anon_client, client, client_with_token, json_request, jpost, ok, post, signup,
};
use serde_json::{Value, json};

/// A notes app: each user sees only their notes; anonymous clients see public ones; a shared
/// team table visible to members.
async fn notes_app(extra: &[&str]) -> (Server, reqwest::Client, User, User) {
    let mut flags = vec!["--signup-open", "true"];
    flags.extend_from_slice(extra);
    let s = Server::start(&flags);
    let admin = client();
    let base = s.url.clone();
    let r = post(
        &admin,
        &base,
        &[("transaction", "1")],
        "CREATE TABLE notes(id INTEGER PRIMARY KEY, owner TEXT NOT NULL, body TEXT NOT NULL, public INTEGER NOT NULL DEFAULT 0);
         CREATE TABLE team_members(user_id TEXT NOT NULL, team TEXT NOT NULL, PRIMARY KEY (user_id, team));
         CREATE TABLE team_docs(id INTEGER PRIMARY KEY, team TEXT NOT NULL, body TEXT NOT NULL);
         CREATE TABLE lookup(code TEXT PRIMARY KEY, label TEXT)",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    ok(
        &admin,
        &base,
        "INSERT INTO lookup VALUES ('jp', 'Japan'), ('fr', 'France')",
    )
    .await;
    for (name, body) in [
        (
            "my_notes",
            json!({"name": "my_notes", "table": "notes", "roles": ["user"], "using": "owner = auth_userid()", "defaults": {"owner": "auth_userid()"}}),
        ),
        (
            "public_notes",
            json!({"name": "public_notes", "table": "notes", "roles": ["anon", "user"], "operations": ["select"], "using": "public = 1"}),
        ),
        (
            "my_team_docs",
            json!({"name": "my_team_docs", "table": "team_docs", "roles": ["user"], "using": "team IN (SELECT team FROM team_members WHERE user_id = auth_userid())"}),
        ),
    ] {
        let r = jpost(&admin, &base, "/admin/policies", body).await;
        assert_eq!(r.status, 200, "policy {name}: {}", r.body);
    }
    let r = jpost(
        &admin,
        &base,
        "/admin/grants",
        json!({"object": "lookup", "role": "anon", "privileges": ["select"]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = jpost(
        &admin,
        &base,
        "/admin/grants",
        json!({"object": "lookup", "role": "user", "privileges": ["select"]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let alice = signup(&base, "alice@example.com").await;
    let bob = signup(&base, "bob@example.com").await;
    for (u, n) in [(&alice, "alice"), (&bob, "bob")] {
        for i in 0..3 {
            let r = post(
                &u.client,
                &base,
                &[
                    ("param_b", &format!("{n} note {i}")),
                    ("param_p", if i == 0 { "1" } else { "0" }),
                ],
                "INSERT INTO my_notes(body, public) VALUES ({b:String}, {p:Int64})",
            )
            .await;
            assert_eq!(r.status, 200, "{n} insert: {}", r.body);
        }
    }
    ok(
        &bob.client,
        &base,
        "INSERT INTO my_notes(body) VALUES ('BOB-SECRET-7f3a')",
    )
    .await;
    ok(
        &admin,
        &base,
        &format!(
            "INSERT INTO team_members VALUES ('{}', 'red'), ('{}', 'blue')",
            alice.id, bob.id
        ),
    )
    .await;
    ok(
        &admin,
        &base,
        "INSERT INTO team_docs(team, body) VALUES ('red', 'red plan'), ('blue', 'BOB-SECRET-team')",
    )
    .await;
    (s, admin, alice, bob)
}

#[tokio::test]
async fn each_identity_sees_only_its_rows() {
    let (s, admin, alice, bob) = notes_app(&[]).await;
    let base = &s.url;
    assert_eq!(
        ok(&alice.client, base, "SELECT body FROM my_notes ORDER BY id").await,
        "alice note 0\nalice note 1\nalice note 2\n"
    );
    assert_eq!(
        ok(&bob.client, base, "SELECT body FROM my_notes ORDER BY id").await,
        "bob note 0\nbob note 1\nbob note 2\nBOB-SECRET-7f3a\n"
    );
    assert_eq!(
        ok(
            &anon_client(),
            base,
            "SELECT body FROM public_notes ORDER BY id"
        )
        .await,
        "alice note 0\nbob note 0\n"
    );
    assert_eq!(
        ok(&alice.client, base, "SELECT body FROM my_team_docs").await,
        "red plan\n"
    );
    assert_eq!(
        ok(&bob.client, base, "SELECT body FROM my_team_docs").await,
        "BOB-SECRET-team\n"
    );
    assert_eq!(
        ok(
            &anon_client(),
            base,
            "SELECT label FROM lookup ORDER BY code"
        )
        .await,
        "France\nJapan\n"
    );
    assert_eq!(
        ok(&admin, base, "SELECT count(*) FROM notes").await,
        "7\n"
    );
    // Identity functions.
    assert_eq!(
        ok(
            &alice.client,
            base,
            "SELECT auth_userid(), auth_role(), auth_claim('email')"
        )
        .await,
        format!("{}\tuser\talice@example.com\n", alice.id)
    );
    assert_eq!(
        ok(
            &anon_client(),
            base,
            "SELECT auth_userid(), auth_role(), auth_claim('email')"
        )
        .await,
        "\\N\tanon\t\\N\n"
    );
    // Defaults: owner filled from auth_userid(), public from the table DEFAULT.
    let r = post(
        &alice.client,
        base,
        &[],
        "INSERT INTO my_notes(body) VALUES ('defaults')",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(ok(&admin, base, "SELECT owner = (SELECT id FROM _ichibase_users WHERE email = 'alice@example.com'), public FROM notes WHERE body = 'defaults'").await, "1\t0\n");
    // Anonymous clients cannot use user views.
    let r = post(&anon_client(), base, &[], "SELECT * FROM my_notes").await;
    assert_eq!((r.status, r.code()), (403, Some(497)), "{}", r.body);
    assert!(r.body.contains("my_notes"), "{}", r.body);
    let r = post(
        &anon_client(),
        base,
        &[],
        "INSERT INTO public_notes(owner, body) VALUES ('x', 'y')",
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    drop(bob);
}

#[tokio::test]
async fn with_check_refuses_bad_writes() {
    let (s, admin, alice, bob) = notes_app(&[]).await;
    let base = &s.url;
    let bob_note = ok(
        &admin,
        base,
        "SELECT id FROM notes WHERE body = 'BOB-SECRET-7f3a'",
    )
    .await
    .trim()
    .to_string();
    // Inserting a row owned by someone else.
    let r = post(
        &alice.client,
        base,
        &[("param_o", &bob.id)],
        "INSERT INTO my_notes(owner, body) VALUES ({o:String}, 'forged')",
    )
    .await;
    assert_eq!((r.status, r.code()), (403, Some(497)), "{}", r.body);
    assert!(r.body.contains("violates WITH CHECK"), "{}", r.body);
    // Giving one's own rows away.
    let r = post(
        &alice.client,
        base,
        &[("param_o", &bob.id)],
        "UPDATE my_notes SET owner = {o:String}",
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    // Rows of others are invisible to update and delete.
    let r = post(
        &alice.client,
        base,
        &[("param_i", &bob_note)],
        "UPDATE my_notes SET body = 'pwned' WHERE id = {i:Int64}",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(
        &alice.client,
        base,
        &[],
        "DELETE FROM my_notes WHERE owner != auth_userid()",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        ok(
            &admin,
            base,
            &format!("SELECT body FROM notes WHERE id = {bob_note}")
        )
        .await,
        "BOB-SECRET-7f3a\n"
    );
    assert_eq!(
        ok(&admin, base, "SELECT count(*) FROM notes").await,
        "7\n"
    );
    // Own rows can be changed and deleted; a multi-statement transaction fails as a whole.
    ok(
        &alice.client,
        base,
        "UPDATE my_notes SET body = 'edited' WHERE body = 'alice note 1'",
    )
    .await;
    assert_eq!(
        ok(
            &alice.client,
            base,
            "SELECT count(*) FROM my_notes WHERE body = 'edited'"
        )
        .await,
        "1\n"
    );
    ok(
        &alice.client,
        base,
        "DELETE FROM my_notes WHERE body = 'edited'",
    )
    .await;
    let r = post(&alice.client, base, &[("transaction", "1"), ("param_o", &bob.id)],
        "INSERT INTO my_notes(body) VALUES ('kept?'); INSERT INTO my_notes(owner, body) VALUES ({o:String}, 'forged')").await;
    assert_eq!(r.status, 403);
    assert_eq!(
        ok(&alice.client, base, "SELECT count(*) FROM my_notes").await,
        "2\n"
    );
}

#[tokio::test]
async fn policies_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let admin = client();
    let s = Server::start_in(dir.path(), &["--signup-open", "true"], &[]);
    ok(
        &admin,
        &s.url,
        "CREATE TABLE notes(id INTEGER PRIMARY KEY, owner TEXT, body TEXT)",
    )
    .await;
    let r = jpost(&admin, &s.url, "/admin/policies", json!({"name": "my_notes", "table": "notes", "roles": ["user"], "using": "owner = auth_userid()", "defaults": {"owner": "auth_userid()"}})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let alice = signup(&s.url, "alice@example.com").await;
    ok(
        &alice.client,
        &s.url,
        "INSERT INTO my_notes(body) VALUES ('persisted')",
    )
    .await;
    ok(
        &admin,
        &s.url,
        "INSERT INTO notes(owner, body) VALUES ('someone-else', 'hidden')",
    )
    .await;
    drop(s);
    let s = Server::start_in(dir.path(), &[], &[]);
    // The same access token still works (the key ring is in the data dir) and the policy holds.
    assert_eq!(
        ok(&alice.client, &s.url, "SELECT body FROM my_notes").await,
        "persisted\n"
    );
    assert_eq!(
        post(&alice.client, &s.url, &[], "SELECT body FROM notes")
            .await
            .status,
        403
    );
    let r = json_request(
        &admin,
        reqwest::Method::GET,
        format!("{}/admin/policies", s.url),
        None,
    )
    .await;
    assert_eq!(r.json()["policies"][0]["using"], "owner = auth_userid()");
}

#[tokio::test]
async fn sessions_tokens_and_keys() {
    let s = Server::start(&["--signup-open", "true"]);
    let base = &s.url;
    let admin = client();
    let alice = signup(base, "alice@example.com").await;
    // Sign-in on a second device; both sessions are listed.
    let r = jpost(&anon_client(), base, "/auth/signin", json!({"email": "alice@example.com", "password": "password-of-alice@example.com", "device": "phone"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.header("set-cookie").unwrap().contains("HttpOnly"));
    let phone = r.json();
    let phone_client = client_with_token(phone["access_token"].as_str().unwrap());
    let r = json_request(
        &alice.client,
        reqwest::Method::GET,
        format!("{base}/auth/sessions"),
        None,
    )
    .await;
    let sessions = r.json()["sessions"].as_array().unwrap().clone();
    assert_eq!(sessions.len(), 2, "{}", r.body);
    assert_eq!(sessions.iter().filter(|s| s["current"] == true).count(), 1);
    // Revoking the phone session takes effect at once.
    let sid = phone["session_id"].as_str().unwrap();
    let r = json_request(
        &alice.client,
        reqwest::Method::DELETE,
        format!("{base}/auth/sessions/{sid}"),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(&phone_client, base, &[], "SELECT 1").await;
    assert_eq!((r.status, r.code()), (401, Some(516)), "{}", r.body);
    assert!(r.header("www-authenticate").is_some());
    assert_eq!(post(&alice.client, base, &[], "SELECT 1").await.status, 200);
    // Refresh rotates the refresh token.
    let r = jpost(
        &anon_client(),
        base,
        "/auth/refresh",
        json!({"refresh_token": alice.refresh}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let refreshed = r.json();
    // (Replaying the used refresh token is refused and revokes the session: tests/auth_guard.rs.)
    let new_client = client_with_token(refreshed["access_token"].as_str().unwrap());
    assert_eq!(
        ok(&new_client, base, "SELECT auth_userid()")
            .await
            .trim(),
        alice.id
    );
    // The browser cookie identifies the session too.
    let cookie = format!(
        "ichibase_session={}",
        refreshed["refresh_token"].as_str().unwrap()
    );
    let r = anon_client()
        .post(format!("{base}/"))
        .header("Cookie", &cookie)
        .body("SELECT auth_userid()")
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap().trim(), alice.id);
    // Sign-out revokes the session: access token and cookie stop working.
    let r = jpost(&new_client, base, "/auth/signout", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(post(&new_client, base, &[], "SELECT 1").await.status, 401);
    let r = anon_client()
        .post(format!("{base}/"))
        .header("Cookie", &cookie)
        .body("SELECT 1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Password change revokes other sessions; the new password works, the old one not.
    let r = jpost(
        &anon_client(),
        base,
        "/auth/signin",
        json!({"email": "alice@example.com", "password": "password-of-alice@example.com"}),
    )
    .await;
    let a = r.json();
    let a_client = client_with_token(a["access_token"].as_str().unwrap());
    let other = jpost(
        &anon_client(),
        base,
        "/auth/signin",
        json!({"email": "alice@example.com", "password": "password-of-alice@example.com"}),
    )
    .await
    .json();
    let r = jpost(&a_client, base, "/auth/password", json!({"old_password": "password-of-alice@example.com", "new_password": "a brand new secret"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        post(
            &client_with_token(other["access_token"].as_str().unwrap()),
            base,
            &[],
            "SELECT 1"
        )
        .await
        .status,
        401
    );
    assert_eq!(
        post(&a_client, base, &[], "SELECT 1").await.status,
        200,
        "the session that changed the password stays"
    );
    let r = jpost(
        &anon_client(),
        base,
        "/auth/signin",
        json!({"email": "alice@example.com", "password": "password-of-alice@example.com"}),
    )
    .await;
    assert_eq!(r.status, 401);
    // Basic auth (ClickHouse clients) with email and password.
    let r = anon_client()
        .post(format!("{base}/"))
        .basic_auth("alice@example.com", Some("a brand new secret"))
        .body("SELECT auth_role()")
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "user\n");
    let r = anon_client()
        .post(format!("{base}/"))
        .basic_auth("alice@example.com", Some("wrong"))
        .body("SELECT 1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // API keys: scoped to a role, acting as a user, revocable.
    let r = jpost(
        &admin,
        base,
        "/admin/keys",
        json!({"name": "alice's script", "role": "user", "user_id": alice.id}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let key = r.json()["key"].as_str().unwrap().to_string();
    let key_id = r.json()["info"]["id"].as_str().unwrap().to_string();
    let kc = client_with_token(&key);
    assert_eq!(
        ok(&kc, base, "SELECT auth_userid(), auth_role()").await,
        format!("{}\tuser\n", alice.id)
    );
    let r = anon_client()
        .post(format!("{base}/"))
        .header("X-ClickHouse-User", "default")
        .header("X-ClickHouse-Key", &key)
        .body("SELECT auth_role()")
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "user\n");
    let r = json_request(
        &admin,
        reqwest::Method::DELETE,
        format!("{base}/admin/keys/{key_id}"),
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(post(&kc, base, &[], "SELECT 1").await.status, 401);
    // Disabling a user cuts them off at once.
    let bob = signup(base, "bob@example.com").await;
    let r = json_request(
        &admin,
        reqwest::Method::PATCH,
        format!("{base}/admin/users/{}", bob.id),
        Some(json!({"disabled": true})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(post(&bob.client, base, &[], "SELECT 1").await.status, 401);
    // Sign-up closed / bad input.
    let closed = Server::start(&[]);
    let r = jpost(
        &anon_client(),
        &closed.url,
        "/auth/signup",
        json!({"email": "x@example.com", "password": "long enough"}),
    )
    .await;
    assert_eq!(r.status, 403);
    let r = jpost(
        &anon_client(),
        base,
        "/auth/signup",
        json!({"email": "not-an-email", "password": "long enough"}),
    )
    .await;
    assert_eq!(r.status, 400);
    let r = jpost(
        &anon_client(),
        base,
        "/auth/signup",
        json!({"email": "c@example.com", "password": "short"}),
    )
    .await;
    assert_eq!(r.status, 400);
    let r = jpost(
        &anon_client(),
        base,
        "/auth/signup",
        json!({"email": "ALICE@example.com", "password": "long enough!"}),
    )
    .await;
    assert_eq!(r.status, 200, "the same answer as for a new account: {}", r.body);
    let r = jpost(
        &anon_client(),
        base,
        "/auth/signin",
        json!({"email": "alice@example.com", "password": "long enough!"}),
    )
    .await;
    assert_eq!(r.status, 401, "emails are case-insensitive: the existing account is unchanged");
    // Key rotation keeps existing tokens valid.
    let r = jpost(&admin, base, "/admin/jwt/rotate", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(post(&a_client, base, &[], "SELECT 1").await.status, 200);
    let _ = URL_SAFE_NO_PAD.encode("x");
    let _ = base64::engine::general_purpose::STANDARD.encode("x");
}

#[tokio::test]
async fn expired_tokens_are_refused() {
    let s = Server::start(&["--signup-open", "true", "--access-token-ttl-secs", "1"]);
    let alice = signup(&s.url, "alice@example.com").await;
    assert_eq!(
        post(&alice.client, &s.url, &[], "SELECT 1").await.status,
        200
    );
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let r = post(&alice.client, &s.url, &[], "SELECT 1").await;
    assert_eq!(r.status, 401);
    assert!(r.body.contains("expired"), "{}", r.body);
    let _ = alice.token;
}

#[tokio::test]
async fn concurrent_users_never_see_each_others_identity() {
    let s = Server::start(&["--signup-open", "true", "--readers", "3"]);
    let admin = client();
    ok(
        &admin,
        &s.url,
        "CREATE TABLE notes(id INTEGER PRIMARY KEY, owner TEXT, body TEXT)",
    )
    .await;
    let r = jpost(&admin, &s.url, "/admin/policies", json!({"name": "my_notes", "table": "notes", "roles": ["user"], "using": "owner = auth_userid()", "defaults": {"owner": "auth_userid()"}})).await;
    assert_eq!(r.status, 200);
    let mut users = Vec::new();
    for i in 0..8 {
        let u = signup(&s.url, &format!("user{i}@example.com")).await;
        for _ in 0..=i {
            ok(&u.client, &s.url, "INSERT INTO my_notes(body) VALUES ('n')").await;
        }
        users.push((u, i + 1));
    }
    let mut tasks = Vec::new();
    for (u, n) in users {
        let url = s.url.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..40 {
                let sql = if round % 2 == 0 {
                    "SELECT auth_userid(), (SELECT count(*) FROM my_notes), auth_claim('email')"
                } else {
                    "SELECT auth_userid(), count(*), auth_claim('email') FROM my_notes"
                };
                let r = post(&u.client, &url, &[], sql).await;
                assert_eq!(r.status, 200, "{}", r.body);
                let want = format!("{}\t{n}\tuser{}@example.com\n", u.id, n - 1);
                assert_eq!(r.body, want, "a request saw another identity");
                // Interleave anonymous and admin requests on the same pooled connections.
                let a = post(
                    &anon_client(),
                    &url,
                    &[],
                    "SELECT auth_userid(), auth_role()",
                )
                .await;
                assert_eq!(a.body, "\\N\tanon\n");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        ok(&admin, &s.url, "SELECT auth_userid() IS NULL, auth_role()").await,
        "1\tadmin\n"
    );
}

fn b64json(part: &str) -> Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

fn enc(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

#[tokio::test]
async fn adversarial_suite() {
    let (s, admin, alice, bob) = notes_app(&[]).await;
    let base = &s.url;
    let bob_note = ok(
        &admin,
        base,
        "SELECT id FROM notes WHERE body = 'BOB-SECRET-7f3a'",
    )
    .await
    .trim()
    .to_string();
    let before_notes = ok(
        &admin,
        base,
        "SELECT id, owner, body, public FROM notes ORDER BY id FORMAT JSONCompactEachRow",
    )
    .await;
    let before_engine = ok(&admin, base, "SELECT (SELECT count(*) FROM _ichibase_users), (SELECT group_concat(role) FROM _ichibase_users), (SELECT count(*) FROM _ichibase_grants), (SELECT count(*) FROM _ichibase_policies), (SELECT count(*) FROM sqlite_schema)").await;

    // SQL that alice (role `user`) must not be able to run.
    let refused: Vec<String> = vec![
        "SELECT * FROM notes".into(),
        "SELECT body FROM notes WHERE owner != auth_userid()".into(),
        "SELECT count(*) FROM notes".into(),
        "SELECT * FROM \"notes\"".into(),
        "SELECT * FROM main.notes".into(),
        "SELECT * FROM NOTES".into(),
        "SELECT * FROM [notes]".into(),
        "SELECT name, sql FROM sqlite_master".into(),
        "SELECT sql FROM sqlite_schema WHERE name = 'notes'".into(),
        "SELECT * FROM sqlite_temp_master".into(),
        "SELECT * FROM pragma_table_info('notes')".into(),
        "PRAGMA table_info(notes)".into(),
        "PRAGMA writable_schema = ON".into(),
        "PRAGMA query_only = OFF".into(),
        "PRAGMA foreign_keys".into(),
        "ATTACH DATABASE 'ichibase.db' AS other".into(),
        "WITH my_notes AS (SELECT * FROM notes) SELECT * FROM my_notes".into(),
        "WITH \"MY_NOTES\"(a, b, c, d) AS (SELECT * FROM notes) SELECT * FROM my_notes".into(),
        "WITH my_notes__insert AS (SELECT * FROM notes) SELECT * FROM my_notes__insert".into(),
        "WITH x AS (SELECT * FROM notes) SELECT * FROM x".into(),
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < (SELECT count(*) FROM notes)) SELECT max(n) FROM r".into(),
        "SELECT row_number() OVER my_notes FROM my_notes WINDOW my_notes AS (ORDER BY id)".into(),
        "SELECT * FROM my_notes UNION ALL SELECT * FROM notes".into(),
        "SELECT (SELECT body FROM notes WHERE owner != auth_userid() LIMIT 1)".into(),
        "SELECT * FROM my_notes WHERE EXISTS (SELECT 1 FROM notes WHERE body LIKE 'BOB%')".into(),
        "SELECT * FROM my_notes JOIN notes USING (id)".into(),
        "SELECT * FROM json_each((SELECT json_group_array(body) FROM notes))".into(),
        "SELECT * FROM (SELECT * FROM notes) AS my_notes".into(),
        "INSERT INTO my_notes(body) SELECT body FROM notes".into(),
        "UPDATE my_notes SET body = (SELECT body FROM notes WHERE owner != auth_userid() LIMIT 1)".into(),
        "INSERT INTO notes(owner, body) VALUES ('x', 'direct')".into(),
        "UPDATE notes SET body = 'pwned'".into(),
        "DELETE FROM notes".into(),
        "CREATE VIEW steal AS SELECT * FROM notes".into(),
        "CREATE TEMP VIEW steal AS SELECT * FROM notes".into(),
        "CREATE TRIGGER steal AFTER INSERT ON notes BEGIN SELECT 1; END".into(),
        "CREATE TEMP TRIGGER steal AFTER INSERT ON notes BEGIN SELECT 1; END".into(),
        "CREATE TABLE stolen AS SELECT * FROM notes".into(),
        "CREATE TABLE evil(x)".into(),
        "CREATE INDEX evil ON notes(body)".into(),
        "CREATE VIRTUAL TABLE evil USING fts5(a)".into(),
        "DROP VIEW my_notes".into(),
        "DROP TABLE notes".into(),
        "ALTER TABLE notes RENAME TO n2".into(),
        "ANALYZE".into(),
        "VACUUM".into(),
        "VACUUM INTO '/tmp/ichibase-steal.db'".into(),
        "SELECT * FROM _ichibase_users".into(),
        "SELECT password_hash FROM _ichibase_users".into(),
        "SELECT * FROM _ichibase_sessions".into(),
        "SELECT key_hash FROM _ichibase_api_keys".into(),
        "SELECT * FROM _ichibase_meta".into(),
        "INSERT INTO _ichibase_grants VALUES ('notes', 'user', 'select')".into(),
        "UPDATE _ichibase_users SET role = 'admin'".into(),
        "DELETE FROM _ichibase_policies".into(),
        "SELECT load_extension('/tmp/x.so')".into(),
        "SELECT fts3_tokenizer('simple')".into(),
        "SELECT sqlite_compileoption_get(0)".into(),
        format!("REPLACE INTO my_notes(id, body) VALUES ({bob_note}, 'hijack')"),
        format!("INSERT OR REPLACE INTO my_notes(id, body) VALUES ({bob_note}, 'hijack')"),
        format!("UPDATE OR REPLACE my_notes SET id = {bob_note}"),
        format!("INSERT INTO my_notes(id, body) VALUES ({bob_note}, 'dup')"),
        "DELETE FROM lookup".into(),
        "UPDATE lookup SET label = 'x'".into(),
        "INSERT INTO public_notes(owner, body, public) VALUES (auth_userid(), 'x', 1)".into(),
        "DELETE FROM public_notes".into(),
        "SELECT * FROM my_notes; SELECT * FROM notes".into(),
        "BEGIN; SELECT * FROM notes; COMMIT".into(),
    ];
    let mut attempts = 0;
    for sql in &refused {
        let tx = if sql.matches(';').count() > 0 && !sql.contains("BEGIN SELECT") {
            "1"
        } else {
            "0"
        };
        let r = post(&alice.client, base, &[("transaction", tx)], sql).await;
        attempts += 1;
        assert!(
            r.status >= 400 && r.status < 500,
            "NOT REFUSED ({}): {sql}\n{}",
            r.status,
            r.body
        );
        assert!(
            !r.body.contains("BOB-SECRET"),
            "leak in the error of {sql}: {}",
            r.body
        );
    }
    // Anonymous clients: the same families of attacks.
    for sql in [
        "SELECT * FROM notes",
        "SELECT * FROM my_notes",
        "SELECT * FROM my_team_docs",
        "SELECT * FROM _ichibase_users",
        "INSERT INTO my_notes(body) VALUES ('x')",
        "UPDATE public_notes SET body = 'x'",
        "WITH public_notes AS (SELECT * FROM notes) SELECT * FROM public_notes",
        "CREATE TABLE anon_t(x)",
    ] {
        let r = post(&anon_client(), base, &[], sql).await;
        attempts += 1;
        assert!(
            r.status >= 400 && r.status < 500,
            "NOT REFUSED for anon ({}): {sql}\n{}",
            r.status,
            r.body
        );
        assert!(!r.body.contains("BOB-SECRET"));
    }
    // Allowed statements that must still not reveal or change other users' rows.
    for (sql, args) in [
        (
            "SELECT body FROM my_notes WHERE body = {b:String}",
            vec![("param_b", "x' OR '1'='1".to_string())],
        ),
        (
            "SELECT body FROM my_notes WHERE body = {b:String}",
            vec![("param_b", "') UNION SELECT body FROM notes --".to_string())],
        ),
        (
            "SELECT body FROM my_notes WHERE owner = {o:String}",
            vec![("param_o", bob.id.clone())],
        ),
        ("SELECT body FROM my_team_docs WHERE team = 'blue'", vec![]),
        ("SELECT * FROM public_notes", vec![]),
        (
            "UPDATE my_notes SET body = 'pwned' WHERE id = {i:Int64}",
            vec![("param_i", bob_note.clone())],
        ),
        (
            "DELETE FROM my_notes WHERE id = {i:Int64}",
            vec![("param_i", bob_note.clone())],
        ),
        (
            "SELECT count(*) FROM my_notes WHERE owner != auth_userid()",
            vec![],
        ),
        ("SELECT * FROM lookup", vec![]),
    ] {
        let args: Vec<(&str, &str)> = args.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = post(&alice.client, base, &args, sql).await;
        attempts += 1;
        assert_eq!(r.status, 200, "{sql}: {}", r.body);
        assert!(
            !r.body.contains("BOB-SECRET") && !r.body.contains("bob note 1"),
            "LEAK: {sql}: {}",
            r.body
        );
    }
    let r = post(
        &alice.client,
        base,
        &[("param_t", "notes")],
        "SELECT * FROM {t:Identifier}",
    )
    .await;
    attempts += 1;
    assert_eq!(r.status, 501, "{}", r.body);

    // Credentials that must be refused (401), never treated as anonymous or as someone else.
    let parts: Vec<&str> = alice.token.split('.').collect();
    let mut payload = b64json(parts[1]);
    payload["sub"] = json!(bob.id);
    payload["role"] = json!("admin");
    let forged = format!("{}.{}.{}", parts[0], enc(&payload), parts[2]);
    let none_token = format!(
        "{}.{}.",
        enc(&json!({"alg": "none", "typ": "JWT"})),
        enc(&payload)
    );
    let kid = b64json(parts[0])["kid"].as_str().unwrap().to_string();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(kid);
    let other_key = jsonwebtoken::encode(
        &header,
        &payload,
        &jsonwebtoken::EncodingKey::from_secret(b"not the server's key"),
    )
    .unwrap();
    let unknown_kid = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &payload,
        &jsonwebtoken::EncodingKey::from_secret(b"x"),
    )
    .unwrap();
    let rs_header = format!(
        "{}.{}.{}",
        enc(&json!({"alg": "RS256", "typ": "JWT", "kid": b64json(parts[0])["kid"]})),
        enc(&payload),
        parts[2]
    );
    let bearer_attempts = vec![
        forged,
        none_token,
        other_key,
        unknown_kid,
        rs_header,
        "abc".to_string(),
        "".to_string(),
        alice.refresh.clone(),
        "ik_guessed-key-0000000000000000".to_string(),
        format!("{}.{}", parts[0], parts[1]),
    ];
    for t in &bearer_attempts {
        let r = anon_client()
            .post(format!("{base}/"))
            .header("Authorization", format!("Bearer {t}"))
            .body("SELECT auth_userid(), auth_role()")
            .send()
            .await
            .unwrap();
        attempts += 1;
        assert_eq!(r.status(), 401, "token accepted: {t}");
    }
    let sid = b64json(parts[1])["sid"].as_str().unwrap().to_string();
    for req in [
        anon_client()
            .post(format!("{base}/"))
            .basic_auth("alice@example.com", Some("wrong password")),
        anon_client()
            .post(format!("{base}/"))
            .basic_auth("nobody@example.com", Some("whatever-password")),
        anon_client().post(format!("{base}/?user=alice@example.com&password=wrong")),
        anon_client()
            .post(format!("{base}/"))
            .header("X-ClickHouse-User", "alice@example.com")
            .header("X-ClickHouse-Key", "nope"),
        anon_client()
            .post(format!("{base}/"))
            .header("Cookie", format!("ichibase_session=ir_{sid}.forged-secret")),
        anon_client()
            .post(format!("{base}/"))
            .header("Cookie", "ichibase_session=garbage"),
        anon_client()
            .post(format!("{base}/"))
            .header("Authorization", "Digest abc"),
    ] {
        let r = req.body("SELECT auth_userid()").send().await.unwrap();
        attempts += 1;
        assert_eq!(r.status(), 401);
    }
    // Admin endpoints as a user.
    for (m, path, body) in [
        (reqwest::Method::GET, "/admin/users".to_string(), None),
        (
            reqwest::Method::POST,
            "/admin/policies".to_string(),
            Some(json!({"name": "all", "table": "notes", "roles": ["user"], "using": "1"})),
        ),
        (
            reqwest::Method::POST,
            "/admin/grants".to_string(),
            Some(json!({"object": "notes", "role": "user", "privileges": ["select"]})),
        ),
        (
            reqwest::Method::PATCH,
            format!("/admin/users/{}", alice.id),
            Some(json!({"role": "admin"})),
        ),
        (
            reqwest::Method::POST,
            "/admin/keys".to_string(),
            Some(json!({"name": "k", "role": "admin"})),
        ),
        (
            reqwest::Method::POST,
            "/admin/jwt/rotate".to_string(),
            Some(json!({})),
        ),
    ] {
        let r = json_request(
            &alice.client,
            m.clone(),
            format!("{base}{path}"),
            body.clone(),
        )
        .await;
        attempts += 1;
        assert_eq!(r.status, 403, "{m} {path}: {}", r.body);
        let r = json_request(&anon_client(), m, format!("{base}{path}"), body).await;
        attempts += 1;
        assert_eq!(r.status, 403, "anon {path}: {}", r.body);
    }
    // A revoked session.
    let r = jpost(&alice.client, base, "/auth/signout", json!({})).await;
    assert_eq!(r.status, 200);
    let r = post(&alice.client, base, &[], "SELECT body FROM my_notes").await;
    attempts += 1;
    assert_eq!(r.status, 401);

    // Nothing changed, nothing leaked.
    assert_eq!(
        ok(
            &admin,
            base,
            "SELECT id, owner, body, public FROM notes ORDER BY id FORMAT JSONCompactEachRow"
        )
        .await,
        before_notes
    );
    let after_engine = ok(&admin, base, "SELECT (SELECT count(*) FROM _ichibase_users), (SELECT group_concat(role) FROM _ichibase_users), (SELECT count(*) FROM _ichibase_grants), (SELECT count(*) FROM _ichibase_policies), (SELECT count(*) FROM sqlite_schema)").await;
    assert_eq!(after_engine, before_engine);
    assert!(!std::path::Path::new("/tmp/ichibase-steal.db").exists());
    eprintln!("{attempts} attack attempts refused or contained");
    assert!(attempts >= 40);
}

/// Issue 12.1: SQLite compiles every expression of an UPDATE/DELETE on a view with the view as
/// the authorizer's accessor. None of these may read what the caller's role cannot read, over
/// HTTP or from Lua, and none may serve as a yes/no oracle through `written_rows`.
#[tokio::test]
async fn writes_through_policy_views_cannot_read_other_tables() {
    let (s, admin, alice, _bob) = notes_app(&[]).await;
    let base = &s.url;
    let alice_first: String = ok(&alice.client, base, "SELECT min(id) FROM my_notes")
        .await
        .trim()
        .to_string();
    let id = alice_first.as_str();
    let attacks = [
        format!("UPDATE my_notes SET body=(SELECT group_concat(email||' '||password_hash,' | ') FROM _ichibase_users) FROM (SELECT 1) AS d WHERE my_notes.id={id}"),
        format!("UPDATE my_notes SET body=(SELECT group_concat(email||' '||password_hash,' | ') FROM _ichibase_users) WHERE id={id}"),
        format!("UPDATE my_notes SET body=(SELECT group_concat(body, ',') FROM notes) WHERE id={id}"),
        format!("UPDATE my_notes SET body=x.body FROM notes AS x WHERE my_notes.id={id} AND x.body LIKE 'BOB-SECRET%'"),
        format!("UPDATE my_notes SET body=x.body FROM team_docs AS x WHERE my_notes.id={id}"),
        format!("UPDATE my_notes SET body=(VALUES ((SELECT password_hash FROM _ichibase_users LIMIT 1))) WHERE id={id}"),
        format!("UPDATE my_notes SET body='x' WHERE id={id} RETURNING (SELECT group_concat(body, ',') FROM notes)"),
        format!("WITH s AS (SELECT group_concat(body, ',') AS b FROM notes) UPDATE my_notes SET body=(SELECT b FROM s) WHERE id={id}"),
        format!("UPDATE my_notes SET body='oracle' WHERE id={id} AND (SELECT count(*) FROM notes WHERE body LIKE 'BOB-SECRET%') > 0"),
        format!("UPDATE my_notes SET body='oracle' WHERE id={id} AND EXISTS (SELECT 1 FROM _ichibase_users WHERE email LIKE 'bob%')"),
        format!("UPDATE my_notes SET body='oracle' WHERE id={id} AND body IN _ichibase_meta"),
        format!("UPDATE my_notes SET body='oracle' WHERE id={id} AND 'x' IN json_each((SELECT group_concat(body) FROM notes))"),
        "DELETE FROM my_notes WHERE id=999999 OR (SELECT count(*) FROM notes WHERE body LIKE 'BOB-SECRET%') > 100".to_string(),
        "DELETE FROM my_notes WHERE id IN (SELECT id FROM notes WHERE body LIKE 'BOB-SECRET%')".to_string(),
        "DELETE FROM main.my_notes WHERE EXISTS (SELECT 1 FROM _ichibase_users)".to_string(),
        "WITH x(v) AS (VALUES (1)) DELETE FROM my_notes WHERE id IN x".to_string(),
        format!("UPDATE \"my_notes\" SET body=(SELECT group_concat(body) FROM team_docs) WHERE id={id}"),
        format!("UPDATE OR ABORT My_Notes SET body=(SELECT group_concat(body) FROM notes) WHERE id={id}"),
    ];
    let before = ok(&alice.client, base, "SELECT group_concat(body, '|') FROM my_notes").await;
    for sql in &attacks {
        let r = post(&alice.client, base, &[], sql).await;
        assert_eq!(r.status, 403, "{sql} must be refused: {}", r.body);
        assert!(!r.body.contains("BOB-SECRET") && !r.body.contains("argon2"), "{sql}: {}", r.body);
        let summary = r.header("x-clickhouse-summary").unwrap_or("");
        assert!(!summary.contains("\"written_rows\":\"1\""), "{sql}: {summary}");
    }
    let after = ok(&alice.client, base, "SELECT group_concat(body, '|') FROM my_notes").await;
    assert_eq!(before, after, "nothing was written");
    for leak in ["BOB-SECRET", "argon2", "bob@example.com", "red plan"] {
        assert!(!after.contains(leak), "{leak} leaked: {after}");
    }

    // The same through Lua's db.exec / db.query, run as the caller.
    let r = common::put_fn(
        &admin,
        base,
        "sneaky",
        "return function(input) return db.exec(input.sql, {}) end",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    for sql in &attacks[..6] {
        let r = common::call_fn(&alice.client, base, "sneaky", json!({ "sql": sql })).await;
        assert_ne!(r.status, 200, "Lua {sql}: {}", r.body);
        assert!(r.body.contains("ACCESS_DENIED"), "Lua {sql}: {}", r.body);
        assert!(!r.body.contains("BOB-SECRET") && !r.body.contains("argon2"), "Lua {sql}: {}", r.body);
    }
    let after = ok(&alice.client, base, "SELECT group_concat(body, '|') FROM my_notes").await;
    assert_eq!(before, after, "nothing was written from Lua");

    // Ordinary writes through the view still work, with the view's columns and functions.
    let r = post(
        &alice.client,
        base,
        &[("param_id", id)],
        "UPDATE my_notes SET body = upper(body) || ' ' || length(body) WHERE id = {id:Int64} AND body IS NOT DISTINCT FROM body",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.header("x-clickhouse-summary").unwrap().contains("\"written_rows\":\"1\""));
    let r = post(&alice.client, base, &[], "DELETE FROM my_notes WHERE id IN (1, 2, 3) AND body LIKE 'alice note 2'").await;
    assert_eq!(r.status, 200, "{}", r.body);
    // A view granted only for select cannot be written through, whatever the accessor.
    for sql in ["DELETE FROM public_notes", "UPDATE public_notes SET body = 'x'", "INSERT INTO public_notes(body, owner) VALUES ('x', 'y')"] {
        let r = post(&anon_client(), base, &[], sql).await;
        assert!(r.status == 403 || r.status == 400, "{sql}: {}", r.body);
    }
    // The admin is not restricted.
    let r = post(&admin, base, &[], &format!("UPDATE my_notes SET body=(SELECT 'by admin') WHERE id={id}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Issue 14.2: no grant is accepted and silently ignored; schema changes stay the admin's.
#[tokio::test]
async fn ddl_grants_are_refused_not_ignored() {
    let (s, admin, alice, _bob) = notes_app(&[]).await;
    let base = &s.url;
    for body in [
        json!({"object": "*", "role": "user", "privileges": ["ddl"]}),
        json!({"object": "notes", "role": "user", "privileges": ["ddl"]}),
        json!({"object": "lookup", "role": "user", "privileges": ["select", "ddl"]}),
        json!({"object": "lookup", "role": "user", "privileges": ["drop"]}),
    ] {
        let r = jpost(&admin, base, "/admin/grants", body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
    }
    let r = jpost(&admin, base, "/admin/grants", json!({"object": "*", "role": "user", "privileges": ["ddl"]})).await;
    assert!(r.body.contains("schema changes are the admin's"), "{}", r.body);
    for sql in [
        "CREATE TABLE mine(x)",
        "ALTER TABLE lookup ADD COLUMN y",
        "DROP TABLE lookup",
        "CREATE INDEX i ON lookup(label)",
        "CREATE VIEW v AS SELECT 1",
    ] {
        let r = post(&alice.client, base, &[], sql).await;
        assert_eq!(r.status, 403, "{sql}: {}", r.body);
    }
}

/// ClickHouse clients' probes for non-admin roles: system tables, DESCRIBE and EXISTS show only
/// granted objects; CTEs and subqueries are not tables (`count(*)` over them works) while a CTE
/// or eponymous table never stands in for a real object.
#[tokio::test]
async fn clickhouse_probes_and_ctes_for_roles() {
    let (s, _admin, alice, _bob) = notes_app(&[]).await;
    let base = &s.url;
    let c = &alice.client;
    assert_eq!(
        sql_ok(c, base, "WITH c(x) AS (SELECT 1 UNION ALL SELECT 2) SELECT count(*) FROM c").await,
        "2\n"
    );
    assert_eq!(
        sql_ok(c, base, "WITH c AS (SELECT * FROM my_notes) SELECT count(*) FROM c").await,
        "3\n"
    );
    assert_eq!(sql_ok(c, base, "SELECT count(*) FROM (SELECT 1)").await, "1\n");
    for sql in [
        "WITH notes AS (SELECT 1) SELECT count(*) FROM notes",
        "SELECT count(*) FROM notes",
        "SELECT count(*) FROM pragma_table_info('notes')",
        "SELECT count(*) FROM sqlite_schema",
        "WITH my_notes AS (SELECT * FROM notes) SELECT count(*) FROM my_notes",
    ] {
        let r = post(c, base, &[], sql).await;
        assert_ne!(r.status, 200, "{sql}: {}", r.body);
    }
    assert_eq!(
        sql_ok(c, base, "SELECT name FROM system.tables ORDER BY name").await,
        "lookup\nmy_notes\nmy_team_docs\npublic_notes\n"
    );
    assert_eq!(
        sql_ok(c, base, "SELECT count(*) FROM system.columns WHERE table = 'notes'").await,
        "0\n"
    );
    assert_eq!(sql_ok(c, base, "EXISTS TABLE notes").await, "0\n");
    assert_eq!(sql_ok(c, base, "EXISTS TABLE my_notes").await, "1\n");
    let r = post(c, base, &[], "DESCRIBE TABLE notes").await;
    assert_eq!(r.code(), Some(60), "{}", r.body);
    assert!(sql_ok(c, base, "DESCRIBE my_notes").await.starts_with("id\tNullable(Int64)"));
    assert_eq!(
        sql_ok(c, base, "SELECT version(), currentUser(), currentDatabase()").await,
        "24.8.0.0\talice@example.com\tdefault\n"
    );
    let anon = common::anon_client();
    assert_eq!(
        sql_ok(&anon, base, "SHOW TABLES").await,
        "lookup\npublic_notes\n"
    );
}
