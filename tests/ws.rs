//! WebSockets with real clients: broadcast, presence (also when a socket dies), change events
//! in commit order through row-level security, reconnect-and-resume, a slow consumer cut off.

mod common;

use std::time::Duration;

use common::ws::{Ws, recv, send};
use common::{Server, anon_client, client, post, signup_with};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

async fn connect(base: &str, token: Option<&str>) -> Ws {
    let headers: Vec<_> = token.map(|t| ("authorization", format!("Bearer {t}"))).into_iter().collect();
    let mut ws = common::ws::open(base, &headers).await;
    let hello = recv(&mut ws).await;
    assert_eq!(hello["type"], "hello", "{hello}");
    assert_eq!(hello["protocol"], 1);
    ws
}

/// Next frame of `ty`, skipping others.
async fn recv_type(ws: &mut Ws, ty: &str) -> Value {
    loop {
        let v = recv(ws).await;
        if v["type"] == ty {
            return v;
        }
    }
}

/// Nothing arrives within `ms`.
async fn quiet(ws: &mut Ws, ms: u64) {
    loop {
        match tokio::time::timeout(Duration::from_millis(ms), ws.next()).await {
            Err(_) => return,
            Ok(Some(Ok(Message::Text(t)))) => panic!("unexpected frame: {t}"),
            Ok(_) => continue,
        }
    }
}

/// The password every test user here signs up with.
const PASSWORD: &str = "long password";

#[tokio::test]
async fn broadcast_presence_and_join_rules() {
    let s = Server::start(&["--signup-open", "true"]);
    let base = &s.url;
    let common::User { id: a_id, token: a_tok, .. } = signup_with(base, "a@example.com", PASSWORD).await;
    let common::User { id: b_id, token: b_tok, .. } = signup_with(base, "b@example.com", PASSWORD).await;
    let mut a = connect(base, Some(&a_tok)).await;
    send(
        &mut a,
        json!({"type": "join", "channel": "room1", "meta": {"name": "a"}, "ref": 1}),
    )
    .await;
    let j = recv(&mut a).await;
    assert_eq!(
        (j["type"].clone(), j["ref"].clone()),
        (json!("joined"), json!(1))
    );
    assert_eq!(j["presence"].as_array().unwrap().len(), 1);
    // Timestamps follow the engine's convention, RFC 3339 UTC like every `created_at` (issue 14).
    let at = j["presence"][0]["connected_at"].as_str().unwrap().to_string();
    assert!(
        at.len() == 24 && at.as_bytes()[10] == b'T' && at.ends_with('Z'),
        "connected_at {at}"
    );
    let mut b = connect(base, Some(&b_tok)).await;
    send(
        &mut b,
        json!({"type": "join", "channel": "room1", "meta": {"name": "b"}}),
    )
    .await;
    let j = recv(&mut b).await;
    let who: Vec<&str> = j["presence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(who, vec![a_id.as_str(), b_id.as_str()]);
    let d = recv_type(&mut a, "presence_diff").await;
    assert_eq!(d["joins"][0]["user_id"].as_str(), Some(b_id.as_str()));
    assert_eq!(d["joins"][0]["meta"], json!({"name": "b"}));
    // Broadcast reaches the others.
    send(
        &mut a,
        json!({"type": "broadcast", "channel": "room1", "payload": {"text": "hi"}, "ref": "x"}),
    )
    .await;
    assert_eq!(
        recv(&mut a).await,
        json!({"type": "ok", "delivered": 1, "ref": "x"})
    );
    let m = recv_type(&mut b, "broadcast").await;
    assert_eq!(m["payload"], json!({"text": "hi"}));
    assert_eq!(m["from"]["user_id"].as_str(), Some(a_id.as_str()));
    // Join rules.
    let mut anon = connect(base, None).await;
    send(&mut anon, json!({"type": "join", "channel": "room1"})).await;
    let e = recv(&mut anon).await;
    assert_eq!(
        (e["type"].clone(), e["name"].clone()),
        (json!("error"), json!("ACCESS_DENIED"))
    );
    send(
        &mut anon,
        json!({"type": "join", "channel": "public:lobby"}),
    )
    .await;
    assert_eq!(recv(&mut anon).await["type"], "joined");
    send(
        &mut b,
        json!({"type": "join", "channel": format!("user:{a_id}")}),
    )
    .await;
    assert_eq!(recv_type(&mut b, "error").await["name"], "ACCESS_DENIED");
    send(
        &mut a,
        json!({"type": "join", "channel": format!("user:{a_id}")}),
    )
    .await;
    assert_eq!(
        recv_type(&mut a, "joined").await["channel"],
        format!("user:{a_id}")
    );
    send(
        &mut b,
        json!({"type": "broadcast", "channel": "public:lobby", "payload": 1}),
    )
    .await;
    assert_eq!(
        recv_type(&mut b, "error").await["name"],
        "ACCESS_DENIED",
        "broadcast needs membership"
    );
    // The admin over HTTP and Lua code broadcast too.
    let r = client()
        .post(format!("{base}/broadcast"))
        .json(&json!({"channel": "room1", "payload": "from http"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["delivered"], 2);
    assert_eq!(recv_type(&mut a, "broadcast").await["payload"], "from http");
    assert_eq!(recv_type(&mut b, "broadcast").await["payload"], "from http");
    let r = client().put(format!("{base}/fn/shout")).body("return function(x) return {n = notify.broadcast('room1', {said = x.text}), who = #notify.presence('room1')} end").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = common::client_with_token(&a_tok)
        .post(format!("{base}/fn/shout"))
        .json(&json!({"text": "lua"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"n": 2, "who": 2}));
    assert_eq!(
        recv_type(&mut b, "broadcast").await["payload"],
        json!({"said": "lua"})
    );
    let r = client()
        .post(format!("{base}/broadcast"))
        .json(&json!({"channel": "room1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = common::client_with_token(&a_tok)
        .post(format!("{base}/broadcast"))
        .json(&json!({"channel": "room1", "payload": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // A socket that dies without closing leaves the channel; the others see it go.
    drop(b);
    let d = recv_type(&mut a, "presence_diff").await;
    assert_eq!(
        d["leaves"][0]["user_id"].as_str(),
        Some(b_id.as_str()),
        "{d}"
    );
    send(&mut a, json!({"type": "presence", "channel": "room1"})).await;
    assert_eq!(
        recv_type(&mut a, "presence").await["presence"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // A member that opts out of presence gets broadcasts but is neither listed nor announced.
    let mut quiet_member = connect(base, Some(common::ADMIN_KEY)).await;
    send(
        &mut quiet_member,
        json!({"type": "join", "channel": "room1", "presence": false}),
    )
    .await;
    assert_eq!(recv(&mut quiet_member).await["type"], "joined");
    quiet(&mut a, 200).await;
    send(
        &mut a,
        json!({"type": "broadcast", "channel": "room1", "payload": "to all"}),
    )
    .await;
    assert_eq!(
        recv_type(&mut quiet_member, "broadcast").await["payload"],
        "to all"
    );
    assert_eq!(recv(&mut a).await["delivered"], 1);
    send(&mut a, json!({"type": "presence", "channel": "room1"})).await;
    assert_eq!(
        recv_type(&mut a, "presence").await["presence"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    drop(quiet_member);
    quiet(&mut a, 200).await;
    // Protocol errors are frames, not disconnects.
    a.send(Message::Text("{nope".into())).await.unwrap();
    assert_eq!(recv_type(&mut a, "error").await["name"], "BAD_ARGUMENTS");
    send(&mut a, json!({"type": "dance"})).await;
    assert!(
        recv_type(&mut a, "error").await["message"]
            .as_str()
            .unwrap()
            .contains("unknown message type")
    );
    send(&mut a, json!({"type": "ping", "ref": 7})).await;
    assert_eq!(recv_type(&mut a, "pong").await["ref"], 7);
    // Bad credentials fail the handshake; ?access_token= works for browsers.
    let url = base.replace("http://", "ws://") + "/ws";
    let mut req = url.clone().into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", "Bearer nonsense".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_err());
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{url}?access_token={a_tok}"))
        .await
        .unwrap();
    assert_eq!(recv(&mut ws).await["user_id"].as_str(), Some(a_id.as_str()));
}

async fn admin_sql(base: &str, sql: &str) {
    let r = post(&client(), base, &[("transaction", "1")], sql).await;
    assert_eq!(r.status, 200, "{sql}: {}", r.body);
}

#[tokio::test]
async fn changes_in_commit_order_and_resume() {
    let s = Server::start(&["--cdc-retention", "100"]);
    let base = &s.url;
    admin_sql(
        base,
        "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, data BLOB)",
    )
    .await;
    let r = client()
        .post(format!("{base}/admin/cdc"))
        .json(&json!({"table": "items"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut ws = connect(base, Some(common::ADMIN_KEY)).await;
    send(
        &mut ws,
        json!({"type": "subscribe", "sub": "s1", "object": "items"}),
    )
    .await;
    let sub = recv(&mut ws).await;
    assert_eq!(sub["type"], "subscribed", "{sub}");
    admin_sql(
        base,
        "INSERT INTO items(id, name, data) VALUES (1, 'one', x'00ff')",
    )
    .await;
    admin_sql(base, "UPDATE items SET name = 'uno' WHERE id = 1").await;
    admin_sql(
        base,
        "INSERT INTO items VALUES (2, 'two', NULL); DELETE FROM items WHERE id = 1",
    )
    .await;
    let bad = post(&client(), base, &[("transaction", "1")], "INSERT INTO items VALUES (3, 'rolled back', NULL); INSERT INTO items VALUES (2, 'dup', NULL)").await;
    assert_eq!(bad.status, 409);
    admin_sql(base, "INSERT INTO items VALUES (4, 'four', NULL)").await;
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(recv_type(&mut ws, "change").await);
    }
    let ops: Vec<(String, Value)> = got
        .iter()
        .map(|e| {
            (
                e["op"].as_str().unwrap().to_string(),
                e["key"]["id"].clone(),
            )
        })
        .collect();
    assert_eq!(
        ops,
        vec![
            ("insert".into(), json!(1)),
            ("update".into(), json!(1)),
            ("insert".into(), json!(2)),
            ("delete".into(), json!(1)),
            ("insert".into(), json!(4))
        ]
    );
    let ids: Vec<i64> = got
        .iter()
        .map(|e| e["change_id"].as_i64().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "commit order: {ids:?}");
    assert_eq!(
        got[0]["new"],
        json!({"id": 1, "name": "one", "data": "00FF"})
    );
    assert_eq!(got[1]["old"]["name"], "one");
    assert_eq!(got[1]["new"]["name"], "uno");
    assert_eq!(got[3]["old"]["name"], "uno");
    assert_eq!(got[3]["new"], Value::Null);
    quiet(&mut ws, 300).await;
    // Filters.
    send(
        &mut ws,
        json!({"type": "subscribe", "sub": "only5", "object": "items", "filter": {"id": 5}}),
    )
    .await;
    recv_type(&mut ws, "subscribed").await;
    admin_sql(
        base,
        "INSERT INTO items VALUES (5, 'five', NULL); INSERT INTO items VALUES (6, 'six', NULL)",
    )
    .await;
    let mut subs = Vec::new();
    for _ in 0..3 {
        let e = recv_type(&mut ws, "change").await;
        subs.push((
            e["sub"].as_str().unwrap().to_string(),
            e["key"]["id"].as_i64().unwrap(),
        ));
    }
    subs.sort();
    assert_eq!(
        subs,
        vec![("only5".into(), 5), ("s1".into(), 5), ("s1".into(), 6)]
    );
    // Reconnect with the last change id: the missed changes arrive, in order, then live ones.
    let last = got[4]["change_id"].as_i64().unwrap() + 2;
    drop(ws);
    admin_sql(base, "UPDATE items SET name = 'FIVE' WHERE id = 5").await;
    admin_sql(base, "DELETE FROM items WHERE id = 6").await;
    let mut ws = connect(base, Some(common::ADMIN_KEY)).await;
    send(
        &mut ws,
        json!({"type": "subscribe", "sub": "s1", "object": "items", "since": last}),
    )
    .await;
    let a = recv_type(&mut ws, "change").await;
    let b = recv_type(&mut ws, "change").await;
    assert_eq!(
        (a["op"].clone(), a["new"]["name"].clone()),
        (json!("update"), json!("FIVE"))
    );
    assert_eq!(
        (b["op"].clone(), b["key"]["id"].clone()),
        (json!("delete"), json!(6))
    );
    let sub = recv_type(&mut ws, "subscribed").await;
    assert_eq!(sub["replayed_from"], last);
    admin_sql(base, "INSERT INTO items VALUES (7, 'seven', NULL)").await;
    assert_eq!(recv_type(&mut ws, "change").await["key"]["id"], 7);
    // Too far back: the client is told to refetch.
    for i in 0..260 {
        admin_sql(
            base,
            &format!("INSERT INTO items VALUES ({}, 'bulk', NULL)", 100 + i),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    admin_sql(base, "INSERT INTO items VALUES (999, 'last', NULL)").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ws2 = connect(base, Some(common::ADMIN_KEY)).await;
    send(
        &mut ws2,
        json!({"type": "subscribe", "sub": "old", "object": "items", "since": 1}),
    )
    .await;
    let sub = recv_type(&mut ws2, "subscribed").await;
    assert_eq!(sub["refetch"], true, "{sub}");
    // Errors: no capture on the table, unknown object.
    admin_sql(base, "CREATE TABLE plain(x)").await;
    send(
        &mut ws2,
        json!({"type": "subscribe", "sub": "p", "object": "plain"}),
    )
    .await;
    assert!(
        recv_type(&mut ws2, "error").await["message"]
            .as_str()
            .unwrap()
            .contains("not enabled")
    );
}

#[tokio::test]
async fn change_events_respect_row_level_security() {
    let s = Server::start(&["--signup-open", "true"]);
    let base = &s.url;
    admin_sql(
        base,
        "CREATE TABLE notes(id INTEGER PRIMARY KEY, owner TEXT NOT NULL, body TEXT)",
    )
    .await;
    let r = client().post(format!("{base}/admin/policies")).json(&json!({"name": "my_notes", "table": "notes", "roles": ["user"], "using": "owner = auth_userid()", "defaults": {"owner": "auth_userid()"}})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    client()
        .post(format!("{base}/admin/cdc"))
        .json(&json!({"table": "notes"}))
        .send()
        .await
        .unwrap();
    let common::User { id: a_id, token: a_tok, .. } = signup_with(base, "a@example.com", PASSWORD).await;
    let common::User { id: b_id, token: b_tok, .. } = signup_with(base, "b@example.com", PASSWORD).await;
    let mut a = connect(base, Some(&a_tok)).await;
    let mut b = connect(base, Some(&b_tok)).await;
    for (ws, n) in [(&mut a, "a"), (&mut b, "b")] {
        send(
            ws,
            json!({"type": "subscribe", "sub": n, "object": "my_notes"}),
        )
        .await;
        assert_eq!(recv(ws).await["type"], "subscribed");
        send(
            ws,
            json!({"type": "subscribe", "sub": "base", "object": "notes"}),
        )
        .await;
        assert_eq!(
            recv(ws).await["name"],
            "ACCESS_DENIED",
            "the base table is not subscribable"
        );
    }
    let ua = common::client_with_token(&a_tok);
    let ub = common::client_with_token(&b_tok);
    assert_eq!(
        post(
            &ua,
            base,
            &[],
            "INSERT INTO my_notes(id, body) VALUES (1, 'a1')"
        )
        .await
        .status,
        200
    );
    assert_eq!(
        post(
            &ub,
            base,
            &[],
            "INSERT INTO my_notes(id, body) VALUES (2, 'B-SECRET')"
        )
        .await
        .status,
        200
    );
    assert_eq!(
        post(
            &ua,
            base,
            &[],
            "UPDATE my_notes SET body = 'a1 edited' WHERE id = 1"
        )
        .await
        .status,
        200
    );
    assert_eq!(
        post(&ub, base, &[], "DELETE FROM my_notes WHERE id = 2")
            .await
            .status,
        200
    );
    // The admin hands A's note to B: A sees it leave, B sees it arrive.
    admin_sql(
        base,
        &format!("UPDATE notes SET owner = '{b_id}' WHERE id = 1"),
    )
    .await;
    let a_events: Vec<Value> = vec![
        recv_type(&mut a, "change").await,
        recv_type(&mut a, "change").await,
        recv_type(&mut a, "change").await,
    ];
    let b_events: Vec<Value> = vec![
        recv_type(&mut b, "change").await,
        recv_type(&mut b, "change").await,
        recv_type(&mut b, "change").await,
    ];
    let summary = |v: &[Value]| {
        v.iter()
            .map(|e| format!("{} {}", e["op"].as_str().unwrap(), e["key"]["id"]))
            .collect::<Vec<_>>()
    };
    assert_eq!(summary(&a_events), vec!["insert 1", "update 1", "delete 1"]);
    assert_eq!(summary(&b_events), vec!["insert 2", "delete 2", "update 1"]);
    assert_eq!(
        b_events[2]["old"],
        Value::Null,
        "B could not see the old row"
    );
    assert_eq!(b_events[2]["new"]["owner"].as_str(), Some(b_id.as_str()));
    quiet(&mut a, 400).await;
    for e in &a_events {
        assert!(!e.to_string().contains("B-SECRET"), "{e}");
    }
    let _ = a_id;
}

#[tokio::test]
async fn slow_consumer_is_cut_off_without_hurting_others() {
    let s = Server::start(&["--ws-queue", "16"]);
    let base = &s.url;
    let mut slow = connect(base, Some(common::ADMIN_KEY)).await;
    let mut fast = connect(base, Some(common::ADMIN_KEY)).await;
    for ws in [&mut slow, &mut fast] {
        send(ws, json!({"type": "join", "channel": "firehose"})).await;
        recv_type(ws, "joined").await;
    }
    recv_type(&mut slow, "presence_diff").await;
    let big = "x".repeat(64 * 1024);
    let total = 300;
    let reader = tokio::spawn(async move {
        let mut n = 0;
        while n < total {
            let v = recv(&mut fast).await;
            if v["type"] == "broadcast" {
                n += 1;
            }
        }
        (n, fast)
    });
    let c = client();
    for i in 0..total {
        let r = c
            .post(format!("{base}/broadcast"))
            .json(&json!({"channel": "firehose", "payload": {"i": i, "pad": big}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let (n, mut fast) = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, total, "the fast client got everything");
    // The slow one finds a close frame with the reason after what was queued for it.
    let mut reason = None;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(10), slow.next()).await {
        match m {
            Ok(Message::Close(Some(f))) => {
                reason = Some((u16::from(f.code), f.reason.to_string()));
                break;
            }
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    let (code, why) = reason.expect("the slow client was closed with a reason");
    assert_eq!(code, 1008);
    assert!(why.contains("slow consumer"), "{why}");
    // The server is fine and the fast client's seat is still there.
    let r = c
        .post(format!("{base}/broadcast"))
        .json(&json!({"channel": "firehose", "payload": "after"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["delivered"], 1);
    assert_eq!(recv_type(&mut fast, "broadcast").await["payload"], "after");
}

// ----- Security (issue 12, items 9-11): revocation, Origin, resource caps -----

/// A handshake refused before the upgrade: its status and JSON body.
type Refused = (u16, Value);

/// Open `/ws?<query>` with extra headers; the hello frame is read and returned with the socket.
async fn try_connect(
    base: &str,
    query: &str,
    headers: &[(&str, String)],
) -> Result<(Ws, Value), Refused> {
    let mut url = base.replace("http://", "ws://") + "/ws";
    if !query.is_empty() {
        url = format!("{url}?{query}");
    }
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            reqwest::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((mut ws, _)) => {
            let hello = recv(&mut ws).await;
            assert_eq!(hello["type"], "hello", "{hello}");
            Ok((ws, hello))
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            let body = r
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).to_string())
                .unwrap_or_default();
            Err((
                r.status().as_u16(),
                serde_json::from_str(&body).unwrap_or(Value::String(body)),
            ))
        }
        Err(e) => panic!("handshake failed: {e}"),
    }
}

async fn must_connect(base: &str, query: &str, headers: &[(&str, String)]) -> (Ws, Value) {
    match try_connect(base, query, headers).await {
        Ok(x) => x,
        Err((st, body)) => panic!("refused ({st}): {body}"),
    }
}

/// Retry a refused handshake until `deadline_secs` pass (slots of closed sockets are given
/// back once the server has seen the close).
async fn connect_eventually(base: &str, query: &str, headers: &[(&str, String)]) -> (Ws, Value) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match try_connect(base, query, headers).await {
            Ok(x) => return x,
            Err(e) if std::time::Instant::now() > deadline => panic!("still refused: {e:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn bearer(t: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {t}"))
}

fn cookie(refresh: &str) -> (&'static str, String) {
    ("cookie", format!("ichibase_session={refresh}"))
}

fn origin(o: &str) -> (&'static str, String) {
    ("origin", o.to_string())
}

fn basic(email: &str, password: &str) -> (&'static str, String) {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode(format!("{email}:{password}"));
    ("authorization", format!("Basic {b}"))
}

/// Sign up, then sign in (sign-up answers alike for new and existing emails, without tokens);
/// the whole sign-in answer (tokens, session id, user).
async fn signup_full(base: &str, email: &str) -> Value {
    signup_with(base, email, PASSWORD).await.signin
}

/// A sign-in that must succeed; its answer.
async fn signin_full(base: &str, email: &str, password: &str) -> Value {
    let r = common::signin(&anon_client(), base, email, password).await;
    assert_eq!(r.status, 200);
    r.json()
}

async fn join(ws: &mut Ws, channel: &str) {
    send(ws, json!({"type": "join", "channel": channel})).await;
    let j = recv_type(ws, "joined").await;
    assert_eq!(j["channel"], channel);
}

/// How many sockets an admin broadcast to `channel` reaches.
async fn reach(base: &str, channel: &str) -> u64 {
    let r = client()
        .post(format!("{base}/broadcast"))
        .json(&json!({"channel": channel, "payload": "ping"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["delivered"]
        .as_u64()
        .unwrap()
}

/// The server closes the socket (code 1008) with a reason naming the revocation, within 15 s;
/// frames queued before are skipped.
async fn expect_revoked(ws: &mut Ws, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("{what}: the socket was still open 15 s later"));
        match m {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 1008, "{what}: {f:?}");
                assert!(f.reason.contains("revoked"), "{what}: {f:?}");
                return;
            }
            Some(Ok(Message::Close(None))) | None | Some(Err(_)) => {
                panic!("{what}: closed without the reason")
            }
            Some(Ok(_)) => continue,
        }
    }
}

/// The socket is open: a ping is answered.
async fn expect_open(ws: &mut Ws, what: &str) {
    send(ws, json!({"type": "ping", "ref": "alive"})).await;
    let p = recv_type(ws, "pong").await;
    assert_eq!(p["ref"], "alive", "{what}");
}

#[tokio::test]
async fn revoked_credentials_close_sockets_at_once() {
    let s = Server::start(&["--signup-open", "true"]);
    let base = &s.url;
    let own = origin(base);

    // 1. Sign-out with the access token closes every socket of that session (token, cookie).
    let a = signup_full(base, "a@example.com").await;
    let a_tok = a["access_token"].as_str().unwrap();
    let a_ref = a["refresh_token"].as_str().unwrap();
    let (mut t, _) = must_connect(base, "", &[bearer(a_tok)]).await;
    let (mut q, _) = must_connect(base, &format!("access_token={a_tok}"), &[]).await;
    let (mut c, _) = must_connect(base, "", &[cookie(a_ref), own.clone()]).await;
    for ws in [&mut t, &mut q, &mut c] {
        join(ws, "room-a").await;
    }
    assert_eq!(reach(base, "room-a").await, 3);
    let r = anon_client()
        .post(format!("{base}/auth/signout"))
        .bearer_auth(a_tok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    expect_revoked(&mut t, "signout: bearer socket").await;
    expect_revoked(&mut q, "signout: ?access_token socket").await;
    expect_revoked(&mut c, "signout: cookie socket").await;
    assert_eq!(reach(base, "room-a").await, 0, "no broadcast reaches them");
    let e = try_connect(base, "", &[bearer(a_tok)])
        .await
        .err()
        .expect("revoked token refused");
    assert_eq!(e.0, 401);

    // 2. Sign-out by the cookie alone.
    let a2 = signin_full(base, "a@example.com", "long password").await;
    let (mut t, _) = must_connect(base, "", &[bearer(a2["access_token"].as_str().unwrap())]).await;
    let (mut c, _) = must_connect(
        base,
        "",
        &[cookie(a2["refresh_token"].as_str().unwrap()), own.clone()],
    )
    .await;
    let r = anon_client()
        .post(format!("{base}/auth/signout"))
        .header(
            "cookie",
            format!("ichibase_session={}", a2["refresh_token"].as_str().unwrap()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    expect_revoked(&mut t, "cookie signout: bearer socket").await;
    expect_revoked(&mut c, "cookie signout: cookie socket").await;

    // 3. Revoking one device (DELETE /auth/sessions/{id}) from another.
    let d1 = signin_full(base, "a@example.com", "long password").await;
    let d2 = signin_full(base, "a@example.com", "long password").await;
    let (mut w2, _) = must_connect(base, "", &[bearer(d2["access_token"].as_str().unwrap())]).await;
    let (mut w1, _) = must_connect(base, "", &[bearer(d1["access_token"].as_str().unwrap())]).await;
    let r = anon_client()
        .delete(format!(
            "{base}/auth/sessions/{}",
            d2["session_id"].as_str().unwrap()
        ))
        .bearer_auth(d1["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    expect_revoked(&mut w2, "revoked device").await;
    expect_open(&mut w1, "the other device stays").await;

    // 4. A password change closes the user's other sessions and password-authenticated
    //    sockets; the session that changed it keeps its socket.
    let p_other = signin_full(base, "a@example.com", "long password").await;
    let (mut other_tok, _) = must_connect(
        base,
        "",
        &[bearer(p_other["access_token"].as_str().unwrap())],
    )
    .await;
    let (mut other_cookie, _) = must_connect(
        base,
        "",
        &[
            cookie(p_other["refresh_token"].as_str().unwrap()),
            own.clone(),
        ],
    )
    .await;
    let (mut by_password, hello) =
        must_connect(base, "", &[basic("a@example.com", "long password")]).await;
    assert_eq!(hello["user_id"], a["user"]["id"]);
    for ws in [&mut w1, &mut other_tok, &mut other_cookie, &mut by_password] {
        join(ws, "room-p").await;
    }
    let r = anon_client()
        .post(format!("{base}/auth/password"))
        .bearer_auth(d1["access_token"].as_str().unwrap())
        .json(&json!({"old_password": "long password", "new_password": "another long password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    expect_revoked(&mut other_tok, "password change: other session (token)").await;
    expect_revoked(&mut other_cookie, "password change: other session (cookie)").await;
    expect_revoked(&mut by_password, "password change: old password socket").await;
    assert_eq!(
        reach(base, "room-p").await,
        1,
        "only the changing session's socket remains"
    );
    assert_eq!(recv_type(&mut w1, "broadcast").await["channel"], "room-p");

    // 5. An admin disabling a user closes all of them: token, cookie, password, the user's key.
    let b = signup_full(base, "b@example.com").await;
    let b_id = b["user"]["id"].as_str().unwrap();
    let key: Value = client()
        .post(format!("{base}/admin/keys"))
        .json(&json!({"name": "b's key", "role": "user", "user_id": b_id}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let b_key = key["key"].as_str().unwrap();
    let (mut bt, _) = must_connect(base, "", &[bearer(b["access_token"].as_str().unwrap())]).await;
    let (mut bc, _) = must_connect(
        base,
        "",
        &[cookie(b["refresh_token"].as_str().unwrap()), own.clone()],
    )
    .await;
    let (mut bp, _) = must_connect(base, "", &[basic("b@example.com", "long password")]).await;
    let (mut bk, hello) = must_connect(base, &format!("access_token={b_key}"), &[]).await;
    assert_eq!(hello["user_id"], b_id);
    for ws in [&mut bt, &mut bc, &mut bp, &mut bk] {
        join(ws, &format!("user:{b_id}")).await;
    }
    let r = client()
        .patch(format!("{base}/admin/users/{b_id}"))
        .json(&json!({"disabled": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    expect_revoked(&mut bt, "disabled: token").await;
    expect_revoked(&mut bc, "disabled: cookie").await;
    expect_revoked(&mut bp, "disabled: password").await;
    expect_revoked(&mut bk, "disabled: the user's API key").await;
    assert_eq!(reach(base, &format!("user:{b_id}")).await, 0);
    assert_eq!(
        try_connect(base, &format!("access_token={b_key}"), &[])
            .await
            .err()
            .unwrap()
            .0,
        401
    );

    // 6. A role change (its sessions are revoked) closes the sockets carrying the old role.
    let c_user = signup_full(base, "c@example.com").await;
    let (mut cw, _) = must_connect(
        base,
        "",
        &[bearer(c_user["access_token"].as_str().unwrap())],
    )
    .await;
    let r = client()
        .patch(format!(
            "{base}/admin/users/{}",
            c_user["user"]["id"].as_str().unwrap()
        ))
        .json(&json!({"role": "editor"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    expect_revoked(&mut cw, "role change").await;

    // 7. Revoking an API key closes its sockets, CDC subscribers included; no change reaches them.
    admin_sql(
        base,
        "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT)",
    )
    .await;
    let r = client()
        .post(format!("{base}/admin/cdc"))
        .json(&json!({"table": "items"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let key: Value = client()
        .post(format!("{base}/admin/keys"))
        .json(&json!({"name": "feed", "role": "admin"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (k, kid) = (
        key["key"].as_str().unwrap(),
        key["info"]["id"].as_str().unwrap(),
    );
    let (mut kw, _) = must_connect(base, "", &[bearer(k)]).await;
    let (mut kq, _) = must_connect(base, &format!("access_token={k}"), &[]).await;
    for ws in [&mut kw, &mut kq] {
        send(
            ws,
            json!({"type": "subscribe", "sub": "s", "object": "items"}),
        )
        .await;
        recv_type(ws, "subscribed").await;
    }
    admin_sql(base, "INSERT INTO items VALUES (1, 'before')").await;
    assert_eq!(recv_type(&mut kw, "change").await["new"]["name"], "before");
    let r = client()
        .delete(format!("{base}/admin/keys/{kid}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    admin_sql(base, "INSERT INTO items VALUES (2, 'after')").await;
    for (ws, what) in [(&mut kw, "key (header)"), (&mut kq, "key (?access_token)")] {
        // Anything still queued must predate the revocation.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            match tokio::time::timeout_at(deadline, ws.next()).await {
                Err(_) => panic!("{what}: still open 15 s after the key was revoked"),
                Ok(Some(Ok(Message::Text(t)))) => {
                    assert!(
                        !t.contains("after"),
                        "{what}: a change after revocation: {t}"
                    )
                }
                Ok(Some(Ok(Message::Close(Some(f))))) => {
                    assert!(f.reason.contains("revoked"), "{what}: {f:?}");
                    break;
                }
                Ok(Some(Ok(_))) => continue,
                Ok(_) => panic!("{what}: closed without the reason"),
            }
        }
    }
    assert_eq!(
        try_connect(base, "", &[bearer(k)]).await.err().unwrap().0,
        401
    );
}

#[tokio::test]
async fn cookie_upgrades_check_origin() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_in(
        tmp.path(),
        &["--signup-open", "true"],
        &[(
            "ICHIBASE_WS_LIMITS__ALLOWED_ORIGINS",
            r#"["https://app.example.com"]"#,
        )],
    );
    let base = &s.url;
    let port: u16 = base.rsplit(':').next().unwrap().parse().unwrap();
    let u = signup_full(base, "victim@example.com").await;
    let (tok, refresh) = (
        u["access_token"].as_str().unwrap(),
        u["refresh_token"].as_str().unwrap(),
    );
    let uid = u["user"]["id"].as_str().unwrap();

    // Refused before the upgrade, with the JSON error shape.
    let bad: Vec<Option<String>> = vec![
        None,
        Some("null".into()),
        Some("http://evil.example".into()),
        Some(format!("http://127.0.0.1:{port}.evil.example")),
        Some(format!("http://127.0.0.1:{port}@evil.example")),
        Some(format!("http://evil.example/127.0.0.1:{port}")),
        Some(format!("http://evil.example#127.0.0.1:{port}")),
        Some(format!("http://127.0.0.1:{}", port.wrapping_add(1))),
        Some(format!("http://localhost:{port}")),
        Some("http://127.0.0.1".into()),
        Some(format!("file://127.0.0.1:{port}")),
        Some("https://app.example.com.evil.example".into()),
        Some("https://evilapp.example.com".into()),
        Some("http://app.example.com".into()),
        Some("https://app.example.com:8443".into()),
    ];
    for o in &bad {
        let mut h = vec![cookie(refresh)];
        if let Some(o) = o {
            h.push(origin(o));
        }
        let (status, body) = try_connect(base, "", &h)
            .await
            .err()
            .unwrap_or_else(|| panic!("cookie upgrade from Origin {o:?} was accepted"));
        assert_eq!(status, 403, "{o:?}: {body}");
        assert_eq!(body["error"]["name"], "ACCESS_DENIED", "{o:?}: {body}");
        // Twice the cookie (a second, attacker-planted one) changes nothing.
        let mut h2 = h.clone();
        h2[0].1 = format!("x=1; ichibase_session={refresh}");
        assert_eq!(
            try_connect(base, "", &h2).await.err().map(|e| e.0),
            Some(403),
            "{o:?}"
        );
    }

    // Same origin (any case of the scheme) and configured origins are accepted.
    for o in [
        format!("http://127.0.0.1:{port}"),
        format!("HTTP://127.0.0.1:{port}"),
        "https://app.example.com".to_string(),
        "https://app.example.com:443".to_string(),
    ] {
        let (_ws, hello) = must_connect(base, "", &[cookie(refresh), origin(&o)]).await;
        assert_eq!(hello["user_id"], uid, "{o}");
    }

    // Tokens are not origin-checked (a foreign page cannot attach them), even with the cookie.
    let (_ws, hello) = must_connect(base, "", &[bearer(tok), origin("http://evil.example")]).await;
    assert_eq!(hello["user_id"], uid);
    let (_ws, hello) = must_connect(
        base,
        &format!("access_token={tok}"),
        &[cookie(refresh), origin("http://evil.example")],
    )
    .await;
    assert_eq!(hello["user_id"], uid);
    // Anonymous sockets from anywhere stay anonymous.
    let (_ws, hello) = must_connect(base, "", &[origin("http://evil.example")]).await;
    assert_eq!(hello["role"], "anon");
    assert!(hello["user_id"].is_null());
    // A refused handshake never fell back to anonymous either.
    let e = try_connect(base, "", &[cookie(refresh), origin("null")]).await;
    assert!(e.is_err());
}

#[test]
fn bad_ws_limits_fail_start() {
    for (k, v, says) in [
        (
            "ICHIBASE_WS_LIMITS__ALLOWED_ORIGINS",
            r#"["*"]"#,
            "allowed_origins",
        ),
        (
            "ICHIBASE_WS_LIMITS__ALLOWED_ORIGINS",
            r#"["app.example.com"]"#,
            "allowed_origins",
        ),
        (
            "ICHIBASE_WS_LIMITS__ALLOWED_ORIGINS",
            r#"["https://a.example/x"]"#,
            "allowed_origins",
        ),
        (
            "ICHIBASE_WS_LIMITS__MAX_SOCKETS_PER_IP",
            "0",
            "max_sockets_per_ip",
        ),
        (
            "ICHIBASE_WS_LIMITS__MAX_CHANNELS_PER_SOCKET",
            "0",
            "max_channels_per_socket",
        ),
        (
            "ICHIBASE_WS_LIMITS__REVALIDATE_SECS",
            "-1",
            "revalidate_secs",
        ),
        ("ICHIBASE_WS_LIMITS__MAX_JOINZ", "3", "max_joinz"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ichibase"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(tmp.path())
            .env_remove("ICHIBASE_CONFIG")
            .env("ICHIBASE_ADMIN_KEY", common::ADMIN_KEY)
            .env(k, v)
            .current_dir(tmp.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{k}={v}: the server started");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{k}={v}: {text}");
        assert!(!text.contains("listening on"), "{k}={v}: {text}");
        assert!(
            text.contains(says),
            "{k}={v}: the message should name {says}: {text}"
        );
    }
}

/// Close from the client side and wait until the server has answered (its slot is free then).
async fn close(mut ws: Ws) {
    let _ = ws.close(None).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

#[tokio::test]
async fn socket_caps_per_ip_identity_and_total() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_in(
        tmp.path(),
        &["--signup-open", "true"],
        &[
            ("ICHIBASE_WS_LIMITS__MAX_SOCKETS_PER_IP", "3"),
            ("ICHIBASE_WS_LIMITS__MAX_SOCKETS_PER_IDENTITY", "2"),
            ("ICHIBASE_WS_LIMITS__MAX_TOTAL_SOCKETS", "12"),
        ],
    );
    let base = &s.url;
    let own = origin(base);

    // Anonymous: three from this address, the fourth refused with 429 before the upgrade.
    let mut anon = Vec::new();
    for _ in 0..3 {
        anon.push(must_connect(base, "", &[]).await.0);
    }
    let (status, body) = try_connect(base, "", &[])
        .await
        .err()
        .expect("4th anon socket refused");
    assert_eq!(status, 429, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_sockets_per_ip"),
        "{body}"
    );
    // Junk credentials do not dodge it (they are refused outright), nor does a foreign Origin.
    assert_eq!(
        try_connect(base, "", &[origin("http://evil.example")])
            .await
            .err()
            .unwrap()
            .0,
        429
    );
    assert_eq!(
        try_connect(base, "access_token=junk", &[])
            .await
            .err()
            .unwrap()
            .0,
        401
    );

    // Reconnect loop: slots come back on close, so a client never locks itself out.
    close(anon.pop().unwrap()).await;
    for i in 0..25 {
        let (mut ws, _) = connect_eventually(base, "", &[]).await;
        send(
            &mut ws,
            json!({"type": "join", "channel": format!("public:{i}"), "meta": {"i": i}}),
        )
        .await;
        recv_type(&mut ws, "joined").await;
        if i % 2 == 0 {
            close(ws).await;
        } else {
            drop(ws); // vanishes without a close handshake
        }
    }
    anon.push(connect_eventually(base, "", &[]).await.0);
    assert_eq!(
        try_connect(base, "", &[]).await.err().map(|e| e.0),
        Some(429)
    );

    // Per identity: token, ?access_token= and cookie sockets of one user count together.
    let u = signup_full(base, "u@example.com").await;
    let (tok, refresh) = (
        u["access_token"].as_str().unwrap(),
        u["refresh_token"].as_str().unwrap(),
    );
    let mut mine = vec![
        must_connect(base, "", &[bearer(tok)]).await.0,
        must_connect(base, "", &[cookie(refresh), own.clone()])
            .await
            .0,
    ];
    for (q, h) in [
        ("".to_string(), vec![bearer(tok)]),
        (format!("access_token={tok}"), vec![]),
        ("".to_string(), vec![cookie(refresh), own.clone()]),
    ] {
        let (status, body) = try_connect(base, &q, &h)
            .await
            .err()
            .expect("3rd socket of a user refused");
        assert_eq!(status, 429, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("max_sockets_per_identity")
        );
    }
    // A second session of the same user is the same identity.
    let u2 = signin_full(base, "u@example.com", "long password").await;
    assert_eq!(
        try_connect(base, "", &[bearer(u2["access_token"].as_str().unwrap())])
            .await
            .err()
            .map(|e| e.0),
        Some(429)
    );
    // Another user has their own allowance.
    let v = signup_full(base, "v@example.com").await;
    mine.push(
        must_connect(base, "", &[bearer(v["access_token"].as_str().unwrap())])
            .await
            .0,
    );

    // The admin is not capped per identity, but everyone is under the total (12).
    // Open now: 3 anon + 2 u + 1 v = 6.
    let mut admin = Vec::new();
    let refused = loop {
        match try_connect(base, "", &[bearer(common::ADMIN_KEY)]).await {
            Ok((ws, _)) => admin.push(ws),
            Err(e) => break e,
        }
        assert!(admin.len() <= 12, "the total cap never applied");
    };
    assert_eq!(admin.len(), 6, "admin sockets until the total cap");
    assert_eq!(refused.0, 429, "{:?}", refused.1);
    assert!(
        refused.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_total_sockets")
    );
    // Closing one frees a place for anyone under their own cap.
    close(admin.pop().unwrap()).await;
    mine.push(
        connect_eventually(base, "", &[bearer(common::ADMIN_KEY)])
            .await
            .0,
    );
    drop((anon, mine, admin));
}

#[tokio::test]
async fn per_socket_caps_on_channels_presence_and_subscriptions() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_in(
        tmp.path(),
        &[],
        &[
            ("ICHIBASE_WS_LIMITS__MAX_CHANNELS_PER_SOCKET", "5"),
            ("ICHIBASE_WS_LIMITS__MAX_PRESENCE_BYTES", "1024"),
            ("ICHIBASE_WS_LIMITS__MAX_SUBSCRIPTIONS_PER_SOCKET", "2"),
        ],
    );
    let base = &s.url;
    let meta = |n: usize| json!({"pad": "x".repeat(n)});

    // Channels per socket: five, the sixth refused; re-joining one is not a new channel.
    let (mut ws, _) = must_connect(base, "", &[]).await;
    for i in 0..5 {
        send(
            &mut ws,
            json!({"type": "join", "channel": format!("public:{i}"), "meta": meta(900)}),
        )
        .await;
        recv_type(&mut ws, "joined").await;
    }
    send(
        &mut ws,
        json!({"type": "join", "channel": "public:5", "ref": "six"}),
    )
    .await;
    let e = recv(&mut ws).await;
    assert_eq!(
        (e["type"].as_str(), e["ref"].as_str()),
        (Some("error"), Some("six")),
        "{e}"
    );
    assert_eq!(e["name"], "TOO_MANY_SIMULTANEOUS_QUERIES", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("max_channels_per_socket"),
        "{e}"
    );
    send(
        &mut ws,
        json!({"type": "join", "channel": "public:0", "meta": {"again": true}}),
    )
    .await;
    recv_type(&mut ws, "joined").await;
    send(&mut ws, json!({"type": "leave", "channel": "public:1"})).await;
    recv_type(&mut ws, "left").await;
    send(&mut ws, json!({"type": "join", "channel": "public:5"})).await;
    recv_type(&mut ws, "joined").await;

    // Presence metadata: big in one join is refused and never listed.
    let (mut big, _) = must_connect(base, "", &[]).await;
    for (n, ch) in [(2_000, "public:big"), (900_000, "public:bigger")] {
        send(
            &mut big,
            json!({"type": "join", "channel": ch, "meta": meta(n), "ref": n}),
        )
        .await;
        let e = recv(&mut big).await;
        assert_eq!(e["type"], "error", "{n} bytes of metadata accepted");
        assert_eq!(e["name"], "REQUEST_TOO_LARGE", "{e}");
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("max_presence_bytes"),
            "{e}"
        );
        send(&mut big, json!({"type": "presence", "channel": ch})).await;
        assert_eq!(recv_type(&mut big, "presence").await["presence"], json!([]));
        send(&mut big, json!({"type": "broadcast", "channel": ch})).await;
        assert_eq!(
            recv(&mut big).await["name"],
            "ACCESS_DENIED",
            "not a member"
        );
    }

    close(big).await;

    // Change subscriptions per socket (the admin too).
    admin_sql(
        base,
        "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT)",
    )
    .await;
    let r = client()
        .post(format!("{base}/admin/cdc"))
        .json(&json!({"table": "items"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut a = connect(base, Some(common::ADMIN_KEY)).await;
    for sub in ["s1", "s2"] {
        send(
            &mut a,
            json!({"type": "subscribe", "sub": sub, "object": "items"}),
        )
        .await;
        recv_type(&mut a, "subscribed").await;
    }
    send(
        &mut a,
        json!({"type": "subscribe", "sub": "s3", "object": "items", "ref": 3}),
    )
    .await;
    let e = recv(&mut a).await;
    assert_eq!(
        (e["type"].as_str(), e["name"].as_str()),
        (Some("error"), Some("TOO_MANY_SIMULTANEOUS_QUERIES")),
        "{e}"
    );
    send(&mut a, json!({"type": "unsubscribe", "sub": "s1"})).await;
    recv_type(&mut a, "unsubscribed").await;
    send(
        &mut a,
        json!({"type": "subscribe", "sub": "s3", "object": "items"}),
    )
    .await;
    recv_type(&mut a, "subscribed").await;
    admin_sql(base, "INSERT INTO items VALUES (1, 'x')").await;
    let mut got = vec![
        recv_type(&mut a, "change").await["sub"]
            .as_str()
            .unwrap()
            .to_string(),
        recv_type(&mut a, "change").await["sub"]
            .as_str()
            .unwrap()
            .to_string(),
    ];
    got.sort();
    assert_eq!(got, vec!["s2", "s3"]);
}

#[tokio::test]
async fn big_presence_metadata_cannot_pile_up_in_memory() {
    // Default [ws_limits]: metadata up to 4 KB per join, 100 channels per socket.
    let s = Server::start(&[]);
    let base = &s.url;
    let pad = "x".repeat(900_000);
    let before = s.rss();
    // Three anonymous sockets, each trying 40 joins with 900 KB of metadata (108 MB in all).
    let mut socks = Vec::new();
    for _ in 0..3 {
        socks.push(must_connect(base, "", &[]).await.0);
    }
    for (n, ws) in socks.iter_mut().enumerate() {
        for i in 0..40 {
            send(
                ws,
                json!({"type": "join", "channel": format!("public:{n}-{i}"), "meta": {"pad": pad}}),
            )
            .await;
            let r = recv(ws).await;
            assert_eq!(r["type"], "error", "900 KB of presence metadata accepted");
        }
    }
    let grown = s.rss().saturating_sub(before);
    assert!(
        grown < 45 << 20,
        "120 refused 900 KB joins grew RSS by {} MB",
        grown >> 20
    );
    // Nobody is listed with it.
    let (mut probe, _) = must_connect(base, "", &[]).await;
    send(
        &mut probe,
        json!({"type": "presence", "channel": "public:0-0"}),
    )
    .await;
    assert_eq!(
        recv_type(&mut probe, "presence").await["presence"],
        json!([])
    );
    // Metadata at the cap is fine, and closing gives everything back to a fresh socket.
    for ws in socks {
        close(ws).await;
    }
    let (mut ws, _) = must_connect(base, "", &[]).await;
    let ok_meta = json!({"pad": "y".repeat(4000)});
    send(
        &mut ws,
        json!({"type": "join", "channel": "public:fits", "meta": ok_meta}),
    )
    .await;
    assert_eq!(
        recv_type(&mut ws, "joined").await["presence"][0]["meta"],
        ok_meta
    );
    let grown = s.rss().saturating_sub(before);
    assert!(
        grown < 45 << 20,
        "after closing, RSS is {} MB above the start",
        grown >> 20
    );
}

/// Issue 14.5: change capture's own bookkeeping rows are not the statement's rows.
#[tokio::test]
async fn captured_tables_report_the_statements_own_row_counts() {
    let s = Server::start(&[]);
    let base = &s.url;
    admin_sql(base, "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT)").await;
    let r = client()
        .post(format!("{base}/admin/cdc"))
        .json(&json!({"table": "items"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let c = client();
    for (sql, n) in [
        ("INSERT INTO items(name) VALUES ('a')", "1"),
        ("INSERT INTO items(name) VALUES ('b'), ('c')", "2"),
        ("UPDATE items SET name = name || '!'", "3"),
        ("DELETE FROM items WHERE name = 'a!'", "1"),
    ] {
        let r = common::post(&c, base, &[], sql).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let summary = r.header("x-clickhouse-summary").unwrap();
        assert!(
            summary.contains(&format!("\"written_rows\":\"{n}\"")),
            "{sql}: {summary}"
        );
    }
    let r = common::put_fn(
        &c,
        base,
        "add",
        "return function(i) return db.exec('INSERT INTO items(name) VALUES ({n:String})', {n = i.name}) end",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = common::call_fn(&c, base, "add", json!({"name": "d"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["changes"], 1, "{}", r.body);
}
