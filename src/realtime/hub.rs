//! Connections, channels and presence.
//!
//! Every connection has a bounded outgoing queue, drained by that connection's own writer task
//! (`apis::ws`). A message that does not fit means the client is too slow: it is disconnected
//! with a reason, and nobody else (no writer, no other client) ever waits for it. Presence lists
//! who is in a channel (user, role, device, metadata) and is diffed on join and leave, including
//! when a socket dies.
//!
//! Fan-out: a broadcast is serialised once into shared bytes ([`Out::Text`] holds a
//! reference-counted [`Utf8Bytes`], so queuing it for 10,000 members copies nothing). Each
//! channel keeps its members' queue senders beside their ids, so a fan-out is one pass over the
//! channel under the hub lock: a non-blocking `try_send` per member, no per-member lookup, no
//! per-member lock. Joins and leaves touch only the joining member's entries (presence lists
//! and diffs cost what the presence-tracked members cost), never a scan of the channel.
//! Change-data-capture queues all the frames of a delivery batch under one lock
//! ([`Hub::send_many`]), not one lock and lookup per frame.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::ws::Utf8Bytes;
use serde_json::{Value as Json, json};
use tokio::sync::{mpsc, watch};

use super::limits::WsLimits;
use crate::core::{Error, ErrorCode, RequestContext, Result, Role};

/// A frame for one connection. The text is shared: cloning it for every member of a channel
/// bumps a reference count (the bytes are written to each socket straight from it).
#[derive(Debug, Clone)]
pub enum Out {
    Text(Utf8Bytes),
}

impl Out {
    /// A JSON value, serialised once.
    pub fn json(v: &Json) -> Out {
        Out::Text(Utf8Bytes::from(v.to_string()))
    }
}

struct Conn {
    ctx: RequestContext,
    device: Option<String>,
    tx: mpsc::Sender<Out>,
    /// Set to a reason to make the socket task close the connection.
    kill: watch::Sender<Option<String>>,
    /// channel -> (metadata given at join, tracked in presence)
    channels: BTreeMap<String, (Json, bool)>,
    joined_at: String,
}

#[derive(Default)]
struct State {
    conns: HashMap<u64, Conn>,
    channels: HashMap<String, Channel>,
}

/// One channel's members, each with its connection's queue (a fan-out needs nothing else).
/// Presence-tracked members are kept apart (in connection order), so a join, a presence list
/// or a presence diff costs what the tracked members cost, never a scan of every
/// broadcast-only member.
#[derive(Default)]
struct Channel {
    members: HashMap<u64, mpsc::Sender<Out>>,
    tracked: BTreeSet<u64>,
}

impl State {
    /// Take `id` out of `channel`, dropping the channel when it empties.
    fn remove_member(&mut self, channel: &str, id: u64) {
        if let Some(m) = self.channels.get_mut(channel) {
            m.members.remove(&id);
            m.tracked.remove(&id);
            if m.members.is_empty() {
                self.channels.remove(channel);
            }
        }
    }
}

/// What a new connection gets back from [`Hub::connect`].
pub struct Registered {
    pub id: u64,
    pub rx: mpsc::Receiver<Out>,
    pub kill: watch::Receiver<Option<String>>,
}

pub struct Hub {
    state: Mutex<State>,
    next: AtomicU64,
    queue: usize,
    /// `[ws_limits]`: caps per socket (channels, presence bytes) and the socket slots.
    limits: WsLimits,
}

/// Who may join a channel, by its name:
/// `public:*` everyone (also anonymous), `user:<id>` that user only (their devices),
/// `role:<name>` that role, `private:*` the admin only, anything else any signed-in role.
pub fn may_join(ctx: &RequestContext, channel: &str) -> Result<()> {
    if channel.is_empty() || channel.len() > 200 || channel.chars().any(char::is_control) {
        return Err(Error::new(
            ErrorCode::BadArguments,
            "channel names are 1-200 characters without control characters",
        ));
    }
    if ctx.is_admin() {
        return Ok(());
    }
    let deny = |why: &str| {
        Err(Error::new(
            ErrorCode::AccessDenied,
            format!("may not join '{channel}': {why}"),
        ))
    };
    if channel.starts_with("public:") {
        Ok(())
    } else if let Some(uid) = channel.strip_prefix("user:") {
        if ctx.user_id.as_deref() == Some(uid) {
            Ok(())
        } else {
            deny("user channels are their owner's")
        }
    } else if let Some(role) = channel.strip_prefix("role:") {
        if ctx.role.as_str() == role {
            Ok(())
        } else {
            deny("role channels are that role's")
        }
    } else if channel.starts_with("private:") {
        deny("private channels are the admin's")
    } else if ctx.role == Role::Anon {
        deny("sign in first (anonymous clients may join public: channels)")
    } else {
        Ok(())
    }
}

fn now() -> String {
    // The engine's timestamp convention: RFC 3339 UTC with milliseconds, as SQLite's
    // `strftime('%Y-%m-%dT%H:%M:%fZ')` writes `created_at` everywhere else.
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

impl Hub {
    pub fn new(queue: usize, limits: WsLimits) -> Arc<Hub> {
        Arc::new(Hub {
            state: Mutex::new(State::default()),
            next: AtomicU64::new(1),
            queue: queue.max(1),
            limits,
        })
    }

    pub fn limits(&self) -> &WsLimits {
        &self.limits
    }

    pub fn connect(&self, ctx: RequestContext, device: Option<String>) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.queue);
        let (kill_tx, kill) = watch::channel(None);
        self.state.lock().unwrap().conns.insert(
            id,
            Conn {
                ctx,
                device,
                tx,
                kill: kill_tx,
                channels: BTreeMap::new(),
                joined_at: now(),
            },
        );
        Registered { id, rx, kill }
    }

    pub fn connections(&self) -> usize {
        self.state.lock().unwrap().conns.len()
    }

    /// Queue a frame for one connection; a full queue disconnects it. False if it is gone.
    pub fn send(&self, id: u64, msg: Out) -> bool {
        let full = {
            let st = self.state.lock().unwrap();
            let Some(c) = st.conns.get(&id) else {
                return false;
            };
            match c.tx.try_send(msg) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Full(_)) => true,
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        };
        if full {
            self.disconnect(
                id,
                &format!("slow consumer: {} messages queued and not read", self.queue),
            );
        }
        false
    }

    /// Queue many frames (for one or several connections) under one hub lock, in the order
    /// given: what change-data-capture delivers after a write. A connection whose queue fills
    /// takes none of its later frames (never a gap followed by more frames) and is disconnected
    /// as a slow consumer once the lock is released. Returns how many frames were queued.
    pub fn send_many(&self, frames: impl IntoIterator<Item = (u64, Out)>) -> usize {
        let mut queued = 0;
        let mut slow: Vec<u64> = Vec::new();
        {
            let st = self.state.lock().unwrap();
            // Frames come in runs for the same connection: look each run's connection up once.
            let mut cur: Option<(u64, Option<&mpsc::Sender<Out>>)> = None;
            for (id, msg) in frames {
                let tx = match cur {
                    Some((c, tx)) if c == id => tx,
                    _ => {
                        let tx = if slow.contains(&id) {
                            None
                        } else {
                            st.conns.get(&id).map(|c| &c.tx)
                        };
                        cur = Some((id, tx));
                        tx
                    }
                };
                let Some(tx) = tx else { continue };
                match tx.try_send(msg) {
                    Ok(()) => queued += 1,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        slow.push(id);
                        cur = Some((id, None));
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => cur = Some((id, None)),
                }
            }
        }
        for id in slow {
            self.disconnect(
                id,
                &format!("slow consumer: {} messages queued and not read", self.queue),
            );
        }
        queued
    }

    pub fn send_json(&self, id: u64, v: &Json) -> bool {
        self.send(id, Out::json(v))
    }

    /// Remove a connection, leave its channels (with presence diffs), and close its socket.
    pub fn disconnect(&self, id: u64, reason: &str) {
        let (conn, notices) = {
            let mut st = self.state.lock().unwrap();
            let Some(conn) = st.conns.remove(&id) else {
                return;
            };
            let mut notices = Vec::new();
            for (ch, (_, tracked)) in &conn.channels {
                st.remove_member(ch, id);
                if *tracked {
                    notices.push((ch.clone(), presence_entry(id, &conn, ch)));
                }
            }
            (conn, notices)
        };
        let _ = conn.kill.send(Some(reason.to_string()));
        for (ch, entry) in notices {
            self.publish_presence(
                &ch,
                &json!({"type": "presence_diff", "channel": ch, "joins": [], "leaves": [entry]}),
                None,
            );
        }
    }

    /// Join `channel` with presence `meta`; returns the channel's presence list. Joining a
    /// channel again replaces the metadata. Refused past `[ws_limits] max_presence_bytes` of
    /// metadata or `max_channels_per_socket` channels.
    pub fn join(&self, id: u64, channel: &str, meta: Json, tracked: bool) -> Result<Vec<Json>> {
        let max_bytes = self.limits.settings.max_presence_bytes;
        let size = serde_json::to_string(&meta).map_or(usize::MAX, |s| s.len());
        if size > max_bytes {
            return Err(Error::new(
                ErrorCode::RequestTooLarge,
                format!(
                    "presence metadata is {size} bytes as JSON; at most {max_bytes} ([ws_limits] max_presence_bytes)"
                ),
            ));
        }
        let (entry, list) = {
            let mut st = self.state.lock().unwrap();
            let conn = st
                .conns
                .get(&id)
                .ok_or_else(|| Error::internal("connection gone"))?;
            may_join(&conn.ctx, channel)?;
            let max = self.limits.settings.max_channels_per_socket;
            if !conn.channels.contains_key(channel) && conn.channels.len() >= max {
                return Err(Error::new(
                    ErrorCode::TooManyRequests,
                    format!(
                        "a connection may be in at most {max} channels ([ws_limits] max_channels_per_socket); leave one first"
                    ),
                ));
            }
            let st = &mut *st;
            let conn = st.conns.get_mut(&id).expect("checked above");
            conn.channels.insert(channel.to_string(), (meta, tracked));
            let tx = conn.tx.clone();
            let ch = st.channels.entry(channel.to_string()).or_default();
            ch.members.insert(id, tx);
            if tracked {
                ch.tracked.insert(id);
            } else {
                ch.tracked.remove(&id);
            }
            let conn = &st.conns[&id];
            let entry = tracked.then(|| presence_entry(id, conn, channel));
            (entry, Self::presence_locked(st, channel))
        };
        if let Some(entry) = entry {
            self.publish_presence(channel, &json!({"type": "presence_diff", "channel": channel, "joins": [entry], "leaves": []}), Some(id));
        }
        Ok(list)
    }

    pub fn leave(&self, id: u64, channel: &str) -> Result<()> {
        let entry = {
            let mut st = self.state.lock().unwrap();
            let st = &mut *st;
            let conn = st
                .conns
                .get_mut(&id)
                .ok_or_else(|| Error::internal("connection gone"))?;
            if !conn.channels.contains_key(channel) {
                return Err(Error::new(
                    ErrorCode::NotFound,
                    format!("not in channel '{channel}'"),
                ));
            }
            let entry = presence_entry(id, conn, channel);
            let tracked = conn.channels.remove(channel).is_some_and(|(_, t)| t);
            st.remove_member(channel, id);
            tracked.then_some(entry)
        };
        if let Some(entry) = entry {
            self.publish_presence(channel, &json!({"type": "presence_diff", "channel": channel, "joins": [], "leaves": [entry]}), None);
        }
        Ok(())
    }

    /// The tracked members of `channel`, in connection order.
    fn presence_locked(st: &State, channel: &str) -> Vec<Json> {
        st.channels
            .get(channel)
            .map(|m| {
                m.tracked
                    .iter()
                    .filter_map(|id| st.conns.get(id).map(|c| presence_entry(*id, c, channel)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every open channel with its member and presence-tracked counts, by name (at most
    /// `limit`): what the console shows. A snapshot under the state lock, O(channels).
    pub fn channels(&self, limit: usize) -> Vec<Json> {
        let st = self.state.lock().unwrap();
        let mut v: Vec<(&String, &Channel)> = st.channels.iter().collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v.into_iter()
            .take(limit)
            .map(|(name, c)| serde_json::json!({"channel": name, "members": c.members.len(), "tracked": c.tracked.len()}))
            .collect()
    }

    /// Who is in `channel` (the caller must be allowed to join it).
    pub fn presence(&self, ctx: &RequestContext, channel: &str) -> Result<Vec<Json>> {
        may_join(ctx, channel)?;
        Ok(Self::presence_locked(&self.state.lock().unwrap(), channel))
    }

    pub fn is_member(&self, id: u64, channel: &str) -> bool {
        self.state
            .lock()
            .unwrap()
            .conns
            .get(&id)
            .is_some_and(|c| c.channels.contains_key(channel))
    }

    /// Send `msg` to every member of `channel` (except `skip`). Returns how many got it.
    pub fn publish(&self, channel: &str, msg: &Json, skip: Option<u64>) -> usize {
        self.fan_out(channel, Out::json(msg), skip, false)
    }

    /// A presence diff goes to the members that follow presence only.
    fn publish_presence(&self, channel: &str, msg: &Json, skip: Option<u64>) -> usize {
        self.fan_out(channel, Out::json(msg), skip, true)
    }

    /// Queue one serialised frame (shared, never copied per member) for the members of
    /// `channel` in one pass under the lock: queuing never waits (a full queue marks a slow
    /// consumer, disconnected after the lock is released).
    fn fan_out(&self, channel: &str, msg: Out, skip: Option<u64>, tracked_only: bool) -> usize {
        let mut delivered = 0;
        let mut slow = Vec::new();
        {
            let st = self.state.lock().unwrap();
            let Some(ch) = st.channels.get(channel) else {
                return 0;
            };
            let mut offer = |id: u64, tx: &mpsc::Sender<Out>| {
                if Some(id) == skip {
                    return;
                }
                match tx.try_send(msg.clone()) {
                    Ok(()) => delivered += 1,
                    Err(mpsc::error::TrySendError::Full(_)) => slow.push(id),
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            };
            if tracked_only {
                for id in &ch.tracked {
                    if let Some(tx) = ch.members.get(id) {
                        offer(*id, tx);
                    }
                }
            } else {
                for (id, tx) in &ch.members {
                    offer(*id, tx);
                }
            }
        }
        for id in slow {
            self.disconnect(
                id,
                &format!("slow consumer: {} messages queued and not read", self.queue),
            );
        }
        delivered
    }

    /// A broadcast from `ctx` (a member, the admin over HTTP, or Lua code).
    pub fn broadcast(&self, from: &RequestContext, channel: &str, payload: Json) -> Result<usize> {
        may_join(from, channel)?;
        let msg = json!({"type": "broadcast", "channel": channel, "payload": payload, "from": {"user_id": from.user_id, "role": from.role.as_str()}});
        Ok(self.publish(channel, &msg, None))
    }

    /// The identity of a connection.
    pub fn identity(&self, id: u64) -> Option<RequestContext> {
        self.state
            .lock()
            .unwrap()
            .conns
            .get(&id)
            .map(|c| c.ctx.clone())
    }
}

fn presence_entry(id: u64, c: &Conn, channel: &str) -> Json {
    json!({
        "conn_id": id,
        "user_id": c.ctx.user_id,
        "role": c.ctx.role.as_str(),
        "device": c.device,
        "meta": c.channels.get(channel).map(|m| m.0.clone()).unwrap_or(Json::Null),
        "connected_at": c.joined_at,
    })
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::realtime::limits::WsLimitsSettings;

    fn hub(queue: usize, s: WsLimitsSettings) -> Arc<Hub> {
        Hub::new(queue, WsLimits::new(s).unwrap())
    }

    fn user(id: &str, role: &str) -> RequestContext {
        let mut c = RequestContext::new(None, Role::from_name(role));
        c.user_id = Some(id.to_string());
        c
    }

    /// Every frame queued for a connection so far, as JSON.
    fn drain(r: &mut Registered) -> Vec<Json> {
        let mut v = Vec::new();
        while let Ok(Out::Text(t)) = r.rx.try_recv() {
            v.push(serde_json::from_str(&t).unwrap());
        }
        v
    }

    #[test]
    fn channel_names_decide_who_may_join() {
        let admin = RequestContext::system();
        let anon = RequestContext::anon(None);
        let alice = user("alice", "user");
        let editor = user("bob", "editor");
        for ch in ["public:x", "user:alice", "role:editor", "private:x", "room"] {
            assert!(may_join(&admin, ch).is_ok(), "admin {ch}");
        }
        assert!(may_join(&anon, "public:lobby").is_ok());
        for ch in ["user:alice", "role:user", "private:x", "room"] {
            assert_eq!(may_join(&anon, ch).unwrap_err().code, ErrorCode::AccessDenied, "anon {ch}");
        }
        assert!(may_join(&alice, "user:alice").is_ok());
        assert!(may_join(&alice, "role:user").is_ok());
        assert!(may_join(&alice, "room").is_ok());
        for ch in ["user:bob", "role:editor", "private:x"] {
            assert_eq!(may_join(&alice, ch).unwrap_err().code, ErrorCode::AccessDenied, "alice {ch}");
        }
        assert!(may_join(&editor, "role:editor").is_ok());
        let long = "a".repeat(201);
        for bad in ["", "a\nb", long.as_str()] {
            assert_eq!(may_join(&admin, bad).unwrap_err().code, ErrorCode::BadArguments, "{bad:?}");
        }
        assert!(may_join(&admin, &"a".repeat(200)).is_ok());
    }

    #[test]
    fn join_leave_and_disconnect_keep_channels_and_presence_consistent() {
        let h = hub(16, WsLimitsSettings::default());
        let mut a = h.connect(user("alice", "user"), Some("phone".into()));
        let mut b = h.connect(user("bob", "user"), None);
        assert_eq!(h.connections(), 2);

        let list = h.join(a.id, "room", json!({"x": 1}), true).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0]["user_id"], "alice");
        assert_eq!(list[0]["device"], "phone");
        assert_eq!(list[0]["meta"], json!({"x": 1}));
        assert!(h.is_member(a.id, "room"));
        assert!(drain(&mut a).is_empty(), "no diff to the joiner itself");

        let list = h.join(b.id, "room", Json::Null, true).unwrap();
        assert_eq!(list.len(), 2);
        assert!(list[0]["conn_id"].as_u64() < list[1]["conn_id"].as_u64(), "sorted by connection");
        let d = drain(&mut a);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0]["type"], "presence_diff");
        assert_eq!(d[0]["joins"][0]["user_id"], "bob");

        // Joining again replaces the metadata and does not add a member.
        let list = h.join(a.id, "room", json!({"x": 2}), true).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list.iter().find(|e| e["user_id"] == "alice").unwrap()["meta"], json!({"x": 2}));
        drain(&mut b);

        assert_eq!(h.publish("room", &json!({"m": 1}), Some(a.id)), 1);
        assert_eq!(drain(&mut b), vec![json!({"m": 1})]);
        assert!(drain(&mut a).is_empty());

        h.leave(b.id, "room").unwrap();
        assert!(!h.is_member(b.id, "room"));
        assert_eq!(h.leave(b.id, "room").unwrap_err().code, ErrorCode::NotFound);
        let d = drain(&mut a);
        assert_eq!(d[0]["leaves"][0]["user_id"], "bob");

        // A dying socket leaves its channels with a diff, and its kill switch says why.
        h.join(b.id, "room", Json::Null, true).unwrap();
        drain(&mut a);
        h.disconnect(b.id, "bye");
        assert_eq!(b.kill.borrow().as_deref(), Some("bye"));
        assert_eq!(h.connections(), 1);
        assert_eq!(drain(&mut a)[0]["leaves"][0]["user_id"], "bob");
        let alice = user("alice", "user");
        assert_eq!(h.presence(&alice, "room").unwrap().len(), 1);
        assert!(!h.send_json(b.id, &json!({})), "a gone connection takes nothing");

        // The last member leaving removes the channel: publishing reaches nobody.
        h.disconnect(a.id, "done");
        assert_eq!(h.publish("room", &json!({}), None), 0);
        assert_eq!(h.connections(), 0);
    }

    #[test]
    fn untracked_members_neither_appear_nor_get_diffs() {
        let h = hub(16, WsLimitsSettings::default());
        let mut a = h.connect(user("alice", "user"), None);
        let b = h.connect(user("bob", "user"), None);
        h.join(a.id, "room", Json::Null, false).unwrap();
        let list = h.join(b.id, "room", Json::Null, true).unwrap();
        assert_eq!(list.len(), 1, "only tracked members are listed");
        assert_eq!(list[0]["user_id"], "bob");
        assert!(drain(&mut a).is_empty(), "no presence diff to an untracked member");
        assert_eq!(h.publish("room", &json!({"m": 1}), None), 2, "broadcasts reach everyone");
    }

    #[test]
    fn a_full_queue_disconnects_the_slow_consumer() {
        let h = hub(2, WsLimitsSettings::default());
        let slow = h.connect(RequestContext::system(), None);
        assert!(h.send_json(slow.id, &json!(1)));
        assert!(h.send_json(slow.id, &json!(2)));
        assert!(!h.send_json(slow.id, &json!(3)));
        assert_eq!(h.connections(), 0);
        let why = slow.kill.borrow().clone().unwrap();
        assert!(why.contains("slow consumer"), "{why}");
    }

    #[test]
    fn batched_frames_keep_their_order_and_a_full_queue_takes_nothing_more() {
        let h = hub(3, WsLimitsSettings::default());
        let mut a = h.connect(RequestContext::system(), None);
        let slow = h.connect(RequestContext::system(), None);
        let frame = |v: Json| Out::json(&v);
        let frames = vec![
            (a.id, frame(json!(1))),
            (slow.id, frame(json!("s1"))),
            (slow.id, frame(json!("s2"))),
            (a.id, frame(json!(2))),
            (slow.id, frame(json!("s3"))),
            (slow.id, frame(json!("s4"))),
            (999, frame(json!("nobody"))),
            (a.id, frame(json!(3))),
        ];
        assert_eq!(
            h.send_many(frames),
            6,
            "three for each; the fourth for `slow` does not fit"
        );
        assert_eq!(drain(&mut a), vec![json!(1), json!(2), json!(3)]);
        assert_eq!(h.connections(), 1, "the slow consumer is gone");
        assert!(
            slow.kill
                .borrow()
                .clone()
                .unwrap()
                .contains("slow consumer")
        );
        // After the cut-off nothing more reaches it, even from a later batch.
        assert_eq!(
            h.send_many(vec![
                (slow.id, frame(json!("late"))),
                (a.id, frame(json!(4)))
            ]),
            1
        );
        assert_eq!(drain(&mut a), vec![json!(4)]);
    }

    #[test]
    fn joins_are_capped_by_the_limits() {
        let h = hub(
            16,
            WsLimitsSettings {
                max_channels_per_socket: 2,
                max_presence_bytes: 10,
                ..Default::default()
            },
        );
        let a = h.connect(user("alice", "user"), None);
        h.join(a.id, "one", Json::Null, true).unwrap();
        h.join(a.id, "two", Json::Null, true).unwrap();
        assert_eq!(h.join(a.id, "three", Json::Null, true).unwrap_err().code, ErrorCode::TooManyRequests);
        h.join(a.id, "two", json!(1), true).expect("re-joining is not a new channel");
        assert_eq!(
            h.join(a.id, "one", json!("more than ten bytes"), true).unwrap_err().code,
            ErrorCode::RequestTooLarge
        );
        assert_eq!(h.join(a.id, "private:x", Json::Null, true).unwrap_err().code, ErrorCode::AccessDenied);
        assert_eq!(h.join(999, "one", Json::Null, true).unwrap_err().code, ErrorCode::Internal);
    }

    #[test]
    fn broadcasts_carry_the_sender_and_need_the_right_to_join() {
        let h = hub(16, WsLimitsSettings::default());
        let mut a = h.connect(user("alice", "user"), None);
        h.join(a.id, "public:lobby", Json::Null, false).unwrap();
        let n = h.broadcast(&user("bob", "user"), "public:lobby", json!({"hi": 1})).unwrap();
        assert_eq!(n, 1);
        let m = drain(&mut a).remove(0);
        assert_eq!(m["type"], "broadcast");
        assert_eq!(m["payload"], json!({"hi": 1}));
        assert_eq!(m["from"], json!({"user_id": "bob", "role": "user"}));
        assert!(h.broadcast(&RequestContext::anon(None), "room", json!(1)).is_err());
        assert_eq!(h.identity(a.id).unwrap().user_id.as_deref(), Some("alice"));
        assert!(h.identity(999).is_none());
    }
}
