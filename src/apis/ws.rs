//! `GET /ws`: the WebSocket endpoint and its JSON protocol (version [`PROTOCOL_VERSION`]).
//!
//! Authenticated like HTTP (Authorization header, session cookie, or `?access_token=` since
//! browsers cannot set headers on WebSockets). Every frame is a JSON object with a `type`; a
//! client may add `ref`, echoed in the reply. Replies, broadcasts, presence diffs and change
//! events share one bounded queue per connection, so their order is kept and a slow client is
//! cut off (close code 1008 with the reason) instead of slowing anyone down.
//!
//! Each socket has two tasks: the session (reads client frames, answers through the queue,
//! watches for revocation) and the writer ([`write_loop`]), which alone owns the sending half:
//! it takes everything queued at each wake-up and writes it with one flush, straight from the
//! shared frame bytes a broadcast was serialised into once (`realtime::hub`).
//!
//! Security (`[ws_limits]`, see `realtime::limits`): an upgrade authenticated by the session
//! cookie must come from an allowed `Origin` (cross-site WebSocket hijacking); sockets are
//! capped in all, per identity and per anonymous client IP (429 before the upgrade); channels,
//! presence bytes and subscriptions are capped per socket (error frames). A socket whose
//! credential is revoked (sign-out, password change, user disabled or re-roled, API key
//! revoked) is closed at once with code 1008 and the reason, and stops receiving anything.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Extension;
use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Map, Value as Json, json};

use super::{Admin, App, JsonBody, RequestScope, admin_area, error_response, reply};
use crate::core::{Error, ErrorCode, RequestContext};
use crate::realtime::PROTOCOL_VERSION;
use crate::realtime::cdc::SubscribeReq;
use crate::realtime::hub::Out;
use crate::realtime::limits::Slot;

/// WebSockets: broadcast, presence and change-data-capture (`/ws`).
pub struct WsModule;

impl crate::modules::Module for WsModule {
    fn name(&self) -> &'static str {
        "ws"
    }
    fn routes(&self) -> Router<App> {
        routes()
    }
}

pub fn routes() -> Router<App> {
    Router::new()
        .route("/ws", get(upgrade))
        .route(
            "/broadcast",
            post(http_broadcast).route_layer(admin_area("POST /broadcast")),
        )
        .layer(super::body_limit(super::BodyLimit::Json))
}

#[derive(Deserialize)]
struct WsQuery {
    access_token: Option<String>,
    device: Option<String>,
}

/// Whether the request carries the session cookie and no other credential (so `identify`
/// authenticates it by the cookie, which a browser attaches for any page that opens a socket).
fn cookie_authenticated(headers: &HeaderMap) -> bool {
    let other = [
        header::AUTHORIZATION.as_str(),
        "x-clickhouse-user",
        "x-clickhouse-key",
    ]
    .iter()
    .any(|h| headers.contains_key(*h));
    !other
        && headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .any(|kv| {
                kv.trim()
                    .split_once('=')
                    .is_some_and(|(k, v)| k == crate::auth::COOKIE && !v.is_empty())
            })
}

async fn upgrade(
    State(st): State<App>,
    scope: RequestScope,
    mut headers: HeaderMap,
    Query(q): Query<WsQuery>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    ws: WebSocketUpgrade,
) -> Response {
    if let Some(t) = &q.access_token {
        if let Ok(v) = HeaderValue::from_str(&format!("Bearer {t}")) {
            headers.insert(header::AUTHORIZATION, v);
        }
    }
    let limits = st.hub().limits();
    if cookie_authenticated(&headers) {
        let h = |n: header::HeaderName| headers.get(n).and_then(|v| v.to_str().ok());
        if let Err(e) = limits.check_origin(h(header::ORIGIN), h(header::HOST)) {
            return error_response(&e, true, None);
        }
    }
    // Taken before authenticating: a revocation racing this upgrade is seen by the socket.
    let generation = st.auth().revocations.generation();
    let ctx = match scope.identify(&st, &headers, None, None, None) {
        Ok(c) => c,
        Err(e) => return error_response(&e, true, None),
    };
    let slot = match limits.admit(&ctx, peer.map(|Extension(ConnectInfo(a))| a.ip())) {
        Ok(s) => s,
        Err(e) => return error_response(&e, true, None),
    };
    let device = q.device.or_else(|| {
        headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    });
    ws.max_message_size(st.config().ws.max_message)
        .read_buffer_size(8 * 1024)
        .on_upgrade(move |socket| session(st, ctx, generation, slot, device, socket))
        .into_response()
}

fn err_frame(e: &Error, r#ref: &Json) -> Json {
    json!({"type": "error", "ref": r#ref, "code": e.code.number(), "name": e.code.name(), "message": e.message})
}

/// Give freed memory back to the OS after a socket that moved a lot of data closes (glibc
/// keeps it otherwise), at most once a second.
fn release_memory_after(bytes_in: u64) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    if bytes_in < (1 << 20) {
        return;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    if LAST.swap(now, Ordering::Relaxed) != now {
        crate::lua::release_freed_memory();
    }
}

/// Why a socket is closed when its credential is no longer valid.
fn revoked_reason(e: &Error) -> String {
    format!("credentials revoked: {}", e.message)
}

async fn session(
    st: App,
    ctx: RequestContext,
    generation: u64,
    slot: Slot,
    device: Option<String>,
    socket: WebSocket,
) {
    let hub = Arc::clone(&st.hub());
    let reg = hub.connect(
        ctx.clone(),
        device.clone().map(|d| d.chars().take(200).collect()),
    );
    let id = reg.id;
    let mut revocations = st.auth().revocations.subscribe();
    // A revocation between the upgrade request and now found no socket to close: check once.
    if let Err(e) = st.auth().still_valid(&ctx, generation) {
        hub.disconnect(id, &revoked_reason(&e));
    }
    let mut killed = reg.kill.clone();
    let revalidate = st.hub().limits().settings.revalidate_secs;
    let (sink, mut stream) = socket.split();
    let heartbeat = Duration::from_secs_f64(st.config().ws.heartbeat_secs);
    hub.send_json(id, &json!({"type": "hello", "protocol": PROTOCOL_VERSION, "conn_id": id, "user_id": ctx.user_id, "role": ctx.role.as_str(), "heartbeat_secs": heartbeat.as_secs_f64()}));
    let last_seen = Arc::new(std::sync::Mutex::new(Instant::now()));
    let writer = tokio::spawn(write_loop(sink, reg.rx, reg.kill, heartbeat, Arc::clone(&last_seen)));
    let mut recheck = (revalidate > 0.0).then(|| {
        let every = Duration::from_secs_f64(revalidate);
        tokio::time::interval_at(tokio::time::Instant::now() + every, every)
    });
    let mut bytes_in: u64 = 0;
    loop {
        let msg = tokio::select! {
            biased;
            // Closed by the hub (slow consumer, revoked): read nothing more from the client.
            _ = killed.changed() => break,
            r = revocations.changed() => {
                if r.is_ok() {
                    if let Err(e) = st.auth().still_valid(&ctx, generation) {
                        hub.disconnect(id, &revoked_reason(&e));
                        break;
                    }
                }
                continue;
            }
            _ = async {
                match recheck.as_mut() {
                    Some(t) => { t.tick().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {
                if let Err(e) = st.auth().still_valid(&ctx, generation) {
                    hub.disconnect(id, &revoked_reason(&e));
                    break;
                }
                continue;
            }
            m = stream.next() => match m {
                Some(Ok(m)) => m,
                _ => break,
            },
        };
        *last_seen.lock().unwrap() = Instant::now();
        bytes_in += match &msg {
            Message::Text(t) => t.len(),
            Message::Binary(b) => b.len(),
            _ => 0,
        } as u64;
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(_) => break,
            Message::Binary(_) => {
                hub.send_json(
                    id,
                    &err_frame(
                        &Error::new(ErrorCode::BadArguments, "frames are JSON text"),
                        &Json::Null,
                    ),
                );
                continue;
            }
            _ => continue,
        };
        let v: Json = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => {
                hub.send_json(
                    id,
                    &err_frame(
                        &Error::new(ErrorCode::BadArguments, format!("invalid JSON: {e}")),
                        &Json::Null,
                    ),
                );
                continue;
            }
        };
        let r = v.get("ref").cloned().unwrap_or(Json::Null);
        match handle(&st, &ctx, id, &v).await {
            Ok(Some(mut out)) => {
                out["ref"] = r;
                hub.send_json(id, &out);
            }
            Ok(None) => {}
            Err(e) => {
                hub.send_json(id, &err_frame(&e, &r));
            }
        }
        if writer.is_finished() {
            break;
        }
    }
    hub.disconnect(id, "connection closed");
    st.cdc().closed(id);
    let _ = writer.await;
    drop(slot);
    release_memory_after(bytes_in);
}

/// Frames written to the socket before one flush, at most.
const BURST: usize = 256;

/// The connection's writer: drains its bounded queue into the socket, pings every `heartbeat`,
/// and closes with a reason when the hub kills the connection (slow consumer, revoked
/// credentials) or the client falls silent.
///
/// Every wake-up takes whatever is queued (up to [`BURST`] frames) and writes it with one flush,
/// so a frame costs one `write` syscall when the client keeps up and fewer when frames pile up.
/// The shared frame bytes go to tungstenite as they are (no copy per connection). The kill
/// signal is one future for the connection's life, not a new watch registration per frame.
async fn write_loop(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut rx: tokio::sync::mpsc::Receiver<Out>,
    kill: tokio::sync::watch::Receiver<Option<String>>,
    heartbeat: Duration,
    seen: Arc<std::sync::Mutex<Instant>>,
) {
    let reason_of = |kill: &tokio::sync::watch::Receiver<Option<String>>| {
        kill.borrow()
            .clone()
            .unwrap_or_else(|| "closed by the server".into())
    };
    let mut watch = kill.clone();
    let killed = async move {
        // Resolves when a reason is set, or when the hub drops the connection.
        let _ = watch.changed().await;
    };
    tokio::pin!(killed);
    let mut tick = tokio::time::interval(heartbeat);
    tick.tick().await;
    let mut batch: Vec<Out> = Vec::with_capacity(8);
    let mut close: Option<(u16, String)> = None;
    loop {
        tokio::select! {
            biased;
            _ = &mut killed => {
                close = Some((1008, reason_of(&kill)));
                break;
            }
            n = rx.recv_many(&mut batch, BURST) => {
                if n == 0 {
                    close = Some((1008, reason_of(&kill)));
                    break;
                }
                // A kill while the client does not read interrupts the wait.
                let burst = async {
                    for Out::Text(t) in batch.drain(..) {
                        if sink.feed(Message::Text(t)).await.is_err() {
                            return false;
                        }
                    }
                    sink.flush().await.is_ok()
                };
                tokio::select! {
                    biased;
                    _ = &mut killed => {
                        close = Some((1008, reason_of(&kill)));
                        break;
                    }
                    ok = burst => if !ok { break },
                }
            }
            _ = tick.tick() => {
                if seen.lock().unwrap().elapsed() > heartbeat * 2 {
                    close = Some((1001, "heartbeat timeout".into()));
                    break;
                }
                if sink.send(Message::Ping(Default::default())).await.is_err() { break }
            }
        }
    }
    // Say why, after what is already buffered, if the client reads within 10 s.
    if let Some((code, reason)) = close {
        let frame = CloseFrame {
            code: code.into(),
            reason: reason.chars().take(120).collect::<String>().into(),
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            let _ = sink.flush().await;
            let _ = sink.send(Message::Close(Some(frame))).await;
        })
        .await;
    }
}

fn str_field<'a>(v: &'a Json, k: &str) -> Result<&'a str, Error> {
    v.get(k).and_then(Json::as_str).ok_or_else(|| {
        Error::new(
            ErrorCode::BadArguments,
            format!("'{k}' (a string) is required"),
        )
    })
}

async fn handle(
    st: &App,
    ctx: &RequestContext,
    id: u64,
    v: &Json,
) -> Result<Option<Json>, Error> {
    let ty = str_field(v, "type")?;
    Ok(Some(match ty {
        "ping" => json!({"type": "pong"}),
        "join" => {
            let ch = str_field(v, "channel")?;
            let presence = st.hub().join(
                id,
                ch,
                v.get("meta").cloned().unwrap_or(Json::Null),
                v.get("presence").and_then(Json::as_bool).unwrap_or(true),
            )?;
            json!({"type": "joined", "channel": ch, "presence": presence})
        }
        "leave" => {
            let ch = str_field(v, "channel")?;
            st.hub().leave(id, ch)?;
            json!({"type": "left", "channel": ch})
        }
        "presence" => {
            let ch = str_field(v, "channel")?;
            json!({"type": "presence", "channel": ch, "presence": st.hub().presence(ctx, ch)?})
        }
        "broadcast" => {
            let ch = str_field(v, "channel")?;
            if !st.hub().is_member(id, ch) {
                return Err(Error::new(
                    ErrorCode::AccessDenied,
                    format!("join '{ch}' before broadcasting to it"),
                ));
            }
            let msg = json!({"type": "broadcast", "channel": ch, "payload": v.get("payload").cloned().unwrap_or(Json::Null), "from": {"conn_id": id, "user_id": ctx.user_id, "role": ctx.role.as_str()}});
            let n = st.hub().publish(ch, &msg, Some(id));
            json!({"type": "ok", "delivered": n})
        }
        "subscribe" => {
            let filter = match v.get("filter") {
                None | Some(Json::Null) => Map::new(),
                Some(Json::Object(m)) => m.clone(),
                Some(_) => {
                    return Err(Error::new(
                        ErrorCode::BadArguments,
                        "'filter' is an object of column: value",
                    ));
                }
            };
            let since = match v.get("since") {
                None | Some(Json::Null) => None,
                Some(s) => Some(s.as_i64().ok_or_else(|| {
                    Error::new(ErrorCode::BadArguments, "'since' is a change id")
                })?),
            };
            let req = SubscribeReq {
                conn: id,
                ctx: ctx.clone(),
                sub: str_field(v, "sub")?.to_string(),
                object: str_field(v, "object")?.to_string(),
                filter,
                since,
                max_per_conn: st.hub().limits().settings.max_subscriptions_per_socket,
            };
            st.cdc().subscribe(req).await?
        }
        "unsubscribe" => {
            let sub = str_field(v, "sub")?.to_string();
            st.cdc().unsubscribe(id, sub.clone());
            json!({"type": "unsubscribed", "sub": sub})
        }
        other => {
            return Err(Error::new(
                ErrorCode::BadArguments,
                format!(
                    "unknown message type '{other}' (join, leave, presence, broadcast, subscribe, unsubscribe, ping)"
                ),
            ));
        }
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastBody {
    channel: String,
    #[serde(default)]
    payload: Json,
}

async fn http_broadcast(
    State(st): State<App>,
    Admin(ctx): Admin,
    JsonBody(b): JsonBody<BroadcastBody>,
) -> Response {
    reply(
        st.hub()
            .broadcast(&ctx, &b.channel, b.payload)
            .map(|n| json!({"delivered": n})),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn only_cookie_only_upgrades_count_as_cookie_authenticated() {
        let c = format!("{}=tok", crate::auth::COOKIE);
        assert!(cookie_authenticated(&headers(&[("cookie", &c)])));
        assert!(cookie_authenticated(&headers(&[("cookie", &format!("a=1; {c}; b=2"))])));
        assert!(cookie_authenticated(&headers(&[("cookie", "a=1"), ("cookie", &c)])));
        assert!(!cookie_authenticated(&headers(&[])));
        assert!(!cookie_authenticated(&headers(&[("cookie", "a=1")])));
        let empty = format!("{}=", crate::auth::COOKIE);
        assert!(!cookie_authenticated(&headers(&[("cookie", &empty)])), "an empty cookie");
        let prefixed = format!("x{}=tok", crate::auth::COOKIE);
        assert!(!cookie_authenticated(&headers(&[("cookie", &prefixed)])));
        for other in ["authorization", "x-clickhouse-user", "x-clickhouse-key"] {
            assert!(
                !cookie_authenticated(&headers(&[("cookie", &c), (other, "x")])),
                "{other} wins over the cookie"
            );
        }
    }

    #[test]
    fn error_frames_and_fields() {
        let e = Error::new(ErrorCode::AccessDenied, "no");
        let f = err_frame(&e, &json!("r1"));
        assert_eq!(
            f,
            json!({"type": "error", "ref": "r1", "code": 497, "name": "ACCESS_DENIED", "message": "no"})
        );
        assert_eq!(revoked_reason(&e), "credentials revoked: no");
        let v = json!({"channel": "room", "n": 1});
        assert_eq!(str_field(&v, "channel").unwrap(), "room");
        for k in ["n", "missing"] {
            let e = str_field(&v, k).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadArguments);
            assert_eq!(e.message, format!("'{k}' (a string) is required"));
        }
    }
}
