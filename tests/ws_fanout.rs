//! WebSocket fan-out with real clients against the real binary (issue 18): the per-connection
//! writer keeps each connection's frames in order whatever their sources, a slow consumer with
//! a full bounded queue is closed (1008, "slow consumer") while every other member keeps up and
//! receives everything in order, and the writer's heartbeat closes a silent client (1001).

mod common;

use std::time::Duration;

use common::ws::{Ws, recv, send};
use common::{ADMIN_KEY, Server, client};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

async fn connect(base: &str) -> Ws {
    let mut ws = common::ws::open(base, &[("authorization", format!("Bearer {ADMIN_KEY}"))]).await;
    assert_eq!(recv(&mut ws).await["type"], "hello");
    ws
}

async fn join(ws: &mut Ws, channel: &str, presence: bool) {
    send(ws, json!({"type": "join", "channel": channel, "presence": presence})).await;
    loop {
        let v = recv(ws).await;
        if v["type"] == "joined" {
            return;
        }
    }
}

/// The close frame a client finds after whatever was queued before it: (code, reason).
async fn close_of(ws: &mut Ws) -> (u16, String) {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                return (u16::from(f.code), f.reason.to_string());
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    }
}

async fn http_broadcast(c: &reqwest::Client, base: &str, channel: &str, payload: Value) -> u64 {
    let r = c
        .post(format!("{base}/broadcast"))
        .json(&json!({"channel": channel, "payload": payload}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["delivered"].as_u64().unwrap()
}

#[tokio::test]
async fn frames_keep_their_order_per_connection_whatever_their_source() {
    let s = Server::start(&[]);
    let base = s.url.clone();
    let n = 300;
    let mut reader = connect(&base).await;
    let mut sender = connect(&base).await;
    join(&mut reader, "order", false).await;
    join(&mut sender, "order", false).await;

    // Two sources at once: the admin over HTTP, and a member over its socket (whose replies
    // must also come back in the order of its requests).
    let b = base.clone();
    let http = tokio::spawn(async move {
        let c = client();
        for i in 0..n {
            assert_eq!(http_broadcast(&c, &b, "order", json!({"src": "http", "i": i})).await, 2);
        }
    });
    let member = tokio::spawn(async move {
        for i in 0..n {
            send(&mut sender, json!({"type": "broadcast", "channel": "order", "ref": i, "payload": {"src": "ws", "i": i}})).await;
        }
        let mut next_ref = 0;
        let mut http_seen = 0;
        while next_ref < n || http_seen < n {
            let v = recv(&mut sender).await;
            match v["type"].as_str() {
                Some("ok") => {
                    assert_eq!(v["ref"], next_ref, "replies in request order");
                    assert_eq!(v["delivered"], 1, "everyone but the sender");
                    next_ref += 1;
                }
                Some("broadcast") => {
                    assert_eq!(v["payload"]["src"], "http", "no echo of its own broadcasts");
                    assert_eq!(v["payload"]["i"], http_seen, "HTTP broadcasts in order");
                    http_seen += 1;
                }
                _ => panic!("unexpected {v}"),
            }
        }
    });
    let mut next = std::collections::HashMap::from([("http", 0), ("ws", 0)]);
    while next.values().any(|&i| i < n) {
        let v = recv(&mut reader).await;
        assert_eq!(v["type"], "broadcast", "{v}");
        let src = if v["payload"]["src"] == "http" { "http" } else { "ws" };
        assert_eq!(v["payload"]["i"], next[src], "{src} broadcasts in order: {v}");
        *next.get_mut(src).unwrap() += 1;
    }
    http.await.unwrap();
    member.await.unwrap();
}

#[tokio::test]
async fn a_slow_consumer_is_closed_and_the_others_get_everything_in_order() {
    // A queue of 8 frames; frames of 64 KiB, so a client that does not read fills its socket
    // buffers (a few MB on loopback), then its queue, long before the last frame.
    let s = Server::start(&["--ws-queue", "8"]);
    let base = s.url.clone();
    let fast_n = 8;
    let total = 150;
    let mut slow = connect(&base).await;
    join(&mut slow, "firehose", false).await;
    let mut readers = Vec::new();
    for _ in 0..fast_n {
        let mut ws = connect(&base).await;
        join(&mut ws, "firehose", false).await;
        readers.push(tokio::spawn(async move {
            for i in 0..total {
                let v = recv(&mut ws).await;
                assert_eq!(v["type"], "broadcast");
                assert_eq!(v["payload"]["i"], i, "in order, none missing");
            }
            ws
        }));
    }
    let c = client();
    let pad = "x".repeat(64 * 1024);
    let mut delivered = Vec::new();
    for i in 0..total {
        delivered.push(http_broadcast(&c, &base, "firehose", json!({"i": i, "pad": pad})).await);
    }
    let mut fast = Vec::new();
    for r in readers {
        fast.push(r.await.unwrap());
    }
    assert_eq!(delivered[0], fast_n as u64 + 1, "at first the slow one is queued for too");
    assert_eq!(
        *delivered.last().unwrap(),
        fast_n as u64,
        "the slow one was cut off before the end: {delivered:?}"
    );
    // It finds the reason after what had been written to it.
    let (code, why) = close_of(&mut slow).await;
    assert_eq!(code, 1008);
    assert!(why.contains("slow consumer"), "{why}");
    // The others are still there and still served.
    assert_eq!(http_broadcast(&c, &base, "firehose", json!("after")).await, fast_n as u64);
    for ws in &mut fast {
        assert_eq!(recv(ws).await["payload"], "after");
    }
}

#[tokio::test]
async fn the_writer_pings_and_closes_silent_clients() {
    let s = Server::start(&["--ws-heartbeat-secs", "2"]);
    let base = s.url.clone();
    let mut alive = connect(&base).await;
    let mut silent = connect(&base).await;
    // A client that reads answers the server's pings (tungstenite replies with pongs) and stays.
    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_secs(7);
    while tokio::time::Instant::now() < until {
        match tokio::time::timeout_at(until, alive.next()).await {
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(Some(Ok(Message::Close(c)))) => panic!("a reading client was closed: {c:?}"),
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("{other:?}"),
            Err(_) => break,
        }
    }
    assert!(pings >= 1, "the server pings");
    send(&mut alive, json!({"type": "ping"})).await;
    assert_eq!(recv(&mut alive).await["type"], "pong");
    // The one that read nothing (so answered no ping) is closed for silence.
    let (code, why) = close_of(&mut silent).await;
    assert_eq!((code, why.as_str()), (1001, "heartbeat timeout"));
}
