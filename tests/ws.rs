//! WebSockets with real clients: broadcast, presence (also when a socket dies), change events
//! in commit order through row-level security, reconnect-and-resume, a slow consumer cut off.

mod common;

use std::time::Duration;

use common::{Server, client, post};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(base: &str, token: Option<&str>) -> Ws {
    let url = base.replace("http://", "ws://") + "/ws";
    let mut req = url.into_client_request().unwrap();
    if let Some(t) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("websocket handshake");
    let hello = recv(&mut ws).await;
    assert_eq!(hello["type"], "hello", "{hello}");
    assert_eq!(hello["protocol"], 1);
    ws
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// Next JSON frame (pings skipped), or panic after 10 s.
async fn recv(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no frame within 10 s")
            .expect("stream ended")
            .expect("ws error");
        match m {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => continue,
        }
    }
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

async fn signup(base: &str, email: &str) -> (String, String) {
    let j = common::signup_and_signin(base, email, "long password").await;
    (
        j["user"]["id"].as_str().unwrap().to_string(),
        j["access_token"].as_str().unwrap().to_string(),
    )
}

#[tokio::test]
async fn broadcast_presence_and_join_rules() {
    let s = Server::start(&["--signup-open", "true"]);
    let base = &s.url;
    let (a_id, a_tok) = signup(base, "a@example.com").await;
    let (b_id, b_tok) = signup(base, "b@example.com").await;
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
    let (a_id, a_tok) = signup(base, "a@example.com").await;
    let (b_id, b_tok) = signup(base, "b@example.com").await;
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
