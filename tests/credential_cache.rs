//! Verified credentials are remembered (the JWT key ring keeps the claims of tokens it verified,
//! see `src/auth/jwt.rs`), yet revocation, rotation and policy changes take effect at the next
//! request: a token that was just accepted many times is refused right after sign-out, after its
//! user is disabled, and after its key falls off the ring; a revoked API key is refused at once;
//! a policy change and a schema change are seen by the next query of a role whose statements are
//! cached on the pooled readers.

mod common;

use common::*;
use serde_json::json;

/// Use `c` a few times so its credential is remembered; each must succeed.
async fn warm(c: &reqwest::Client, base: &str, sql: &str) {
    for _ in 0..5 {
        let r = post(c, base, &[], sql).await;
        assert_eq!(r.status, 200, "{sql}: {}", r.body);
    }
}

#[tokio::test]
async fn remembered_tokens_are_refused_after_sign_out_disable_and_rotation() {
    let s = Server::start(&["--signup-open", "true"]);
    let base = s.url.clone();
    let admin = client();

    // Sign-out: the very next request with the same access token is a 401.
    let ann = signup(&base, "ann@example.com").await;
    warm(&ann.client, &base, "SELECT auth_userid()").await;
    let r = request(&ann.client, reqwest::Method::POST, format!("{base}/auth/signout"), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(&ann.client, &base, &[], "SELECT 1").await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.body.contains("revoked"), "{}", r.body);

    // Disabling the user: refused at once.
    let bo = signup(&base, "bo@example.com").await;
    warm(&bo.client, &base, "SELECT 1").await;
    let r = json_request(
        &admin,
        reqwest::Method::PATCH,
        format!("{base}/admin/users/{}", bo.id),
        Some(json!({"disabled": true})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(post(&bo.client, &base, &[], "SELECT 1").await.status, 401);

    // Rotation: tokens keep verifying while their key is on the ring, and stop the moment it
    // leaves (3 keys are kept).
    let cy = signup(&base, "cy@example.com").await;
    warm(&cy.client, &base, "SELECT 1").await;
    for i in 0..3 {
        let r = request(&admin, reqwest::Method::POST, format!("{base}/admin/jwt/rotate"), None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let st = post(&cy.client, &base, &[], "SELECT 1").await.status;
        if i < 2 {
            assert_eq!(st, 200, "still on the ring after {} rotations", i + 1);
        } else {
            assert_eq!(st, 401, "rotated out");
        }
    }
    // A tampered token is refused (a different token is checked in full).
    let mut bad = cy.token.clone().into_bytes();
    let at = bad.len() - 2;
    bad[at] = if bad[at] == b'x' { b'y' } else { b'x' };
    let c = client_with_token(std::str::from_utf8(&bad).unwrap());
    assert_eq!(post(&c, &base, &[], "SELECT 1").await.status, 401);
}

#[tokio::test]
async fn a_revoked_api_key_is_refused_at_once() {
    let s = Server::start(&[]);
    let base = s.url.clone();
    let admin = client();
    let r = jpost(&admin, &base, "/admin/keys", json!({"name": "svc", "role": "admin"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let key = r.json()["key"].as_str().unwrap().to_string();
    let id = r.json()["info"]["id"].as_str().unwrap().to_string();
    let kc = client_with_token(&key);
    warm(&kc, &base, "SELECT 1").await;
    let r = json_request(&admin, reqwest::Method::DELETE, format!("{base}/admin/keys/{id}"), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(&kc, &base, &[], "SELECT 1").await;
    assert_eq!(r.status, 401, "{}", r.body);
}

#[tokio::test]
async fn policy_and_schema_changes_reach_cached_statements_at_the_next_query() {
    let s = Server::start(&["--signup-open", "true"]);
    let base = s.url.clone();
    let admin = client();
    let u = signup(&base, "dee@example.com").await;
    ok(&admin, &base, "CREATE TABLE items(id INTEGER PRIMARY KEY, owner TEXT, v TEXT)").await;
    ok(
        &admin,
        &base,
        &format!("INSERT INTO items VALUES (1, '{}', 'mine'), (2, 'someone', 'theirs')", u.id),
    )
    .await;
    let r = jpost(
        &admin,
        &base,
        "/admin/policies",
        json!({"name": "my_items", "table": "items", "roles": ["user"], "using": format!("owner = '{}'", u.id)}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The same statement many times: prepared once per reader connection and then cached.
    let q = "SELECT group_concat(v) FROM my_items";
    for _ in 0..12 {
        let r = post(&u.client, &base, &[], q).await;
        assert_eq!((r.status, r.body.as_str()), (200, "mine\n"));
    }
    // The policy is replaced: the next query sees the new predicate on every reader.
    let r = request(&admin, reqwest::Method::DELETE, format!("{base}/admin/policies/my_items"), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = jpost(
        &admin,
        &base,
        "/admin/policies",
        json!({"name": "my_items", "table": "items", "roles": ["user"], "using": "owner = 'someone'"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    for _ in 0..12 {
        let r = post(&u.client, &base, &[], q).await;
        assert_eq!((r.status, r.body.as_str()), (200, "theirs\n"), "policy change seen");
    }
    // The policy is dropped: the role loses the view at once.
    let r = request(&admin, reqwest::Method::DELETE, format!("{base}/admin/policies/my_items"), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    for _ in 0..8 {
        let r = post(&u.client, &base, &[], q).await;
        assert_ne!(r.status, 200, "dropped policy: {}", r.body);
    }

    // Schema change under a cached admin statement: the next query sees the new column.
    let q = "SELECT * FROM items WHERE id = 1";
    for _ in 0..12 {
        let r = post(&admin, &base, &[], q).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body.split('\t').count(), 3, "{}", r.body);
    }
    ok(&admin, &base, "ALTER TABLE items ADD COLUMN extra TEXT DEFAULT 'x'").await;
    for _ in 0..12 {
        let r = post(&admin, &base, &[], q).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body.trim_end().split('\t').collect::<Vec<_>>().last(), Some(&"x"), "{}", r.body);
    }
    // And with GET (read-only readers), as the point-SELECT path runs.
    for _ in 0..12 {
        let r = get(&admin, &base, &[("query", "SELECT * FROM items WHERE id = 1")]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.body.trim_end().ends_with("\tx"), "{}", r.body);
    }
}
