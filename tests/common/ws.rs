//! WebSocket client helpers shared by the tests that talk to `/ws` (tests/ws.rs,
//! tests/ws_fanout.rs, tests/ai.rs): a handshake with optional headers, JSON frames out, the
//! next JSON frame in (pings and other control frames skipped) within a deadline.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long [`recv`] waits for a frame (generous: the tests run on loaded 2-core machines).
pub const RECV_SECS: u64 = 30;

/// Open `base`'s `/ws` with `headers` (e.g. `("authorization", "Bearer …")`); the server's
/// first frame (`hello`) is left unread.
pub async fn open(base: &str, headers: &[(&str, String)]) -> Ws {
    let mut req = (base.replace("http://", "ws://") + "/ws").into_client_request().unwrap();
    for (k, v) in headers {
        let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap();
        req.headers_mut().insert(name, v.parse().unwrap());
    }
    let (ws, _) = tokio_tungstenite::connect_async(req).await.expect("websocket handshake");
    ws
}

/// Send `v` as one text frame.
pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// The next JSON text frame, or panic after [`RECV_SECS`] seconds or on a close.
pub async fn recv(ws: &mut Ws) -> Value {
    recv_within(ws, RECV_SECS).await
}

/// The next JSON text frame, or panic after `secs` seconds or on a close.
pub async fn recv_within(ws: &mut Ws, secs: u64) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(secs), ws.next())
            .await
            .unwrap_or_else(|_| panic!("no frame within {secs} s"))
            .expect("stream ended")
            .expect("ws error");
        match m {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => continue,
        }
    }
}
