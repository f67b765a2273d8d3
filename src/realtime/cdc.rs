//! Change-data-capture: committed row changes of chosen tables as events, in commit order,
//! delivered to WebSocket subscribers through their row-level security.
//!
//! **Capture** (`storage::capture`, installed on every storage's writer connection): SQLite's
//! pre-update hook sees each row an INSERT / UPDATE / DELETE changes, whole (old and new values,
//! deletes included, which the RLS check below needs), before it changes. For the tables
//! enabled here (`POST /admin/cdc`, kept in `_ichibase_cdc_tables`) it appends a compact binary
//! record to an in-memory buffer, and the records are written as rows of
//! `_ichibase_change_batches(first_id, last_id, at, data)` *inside the transaction that made
//! them* (before its COMMIT, at a savepoint boundary, or when a would-be autocommit statement
//! ends): data and events commit or roll back together, so a crash loses neither one without
//! the other. Each change keeps its own id (`first_id + i`); ids are strictly increasing in
//! commit order. A failed statement's records are dropped (capture reads back the row of its
//! last record), a REPLACE over an existing key is one `insert` (as the trigger version reported
//! it), a renamed table stays captured. Pruning removes whole batches, oldest first, always
//! keeping at least the newest `retention` changes (so the largest id never goes away and ids
//! only grow, across restarts too).
//!
//! Why the hook and not triggers: a capture trigger ran per row and wrote each row a second time,
//! as JSON, into the log; bulk inserts ran at ~0.22 of their speed. The hook copies the values
//! in Rust and the log takes one row per transaction. What it costs: SQLite must be built with
//! `SQLITE_ENABLE_PREUPDATE_HOOK` (`.cargo/config.toml` sets `LIBSQLITE3_FLAGS`); writes by
//! other processes (the `sqlite3` shell) are not captured row by row (a trigger saw them): the
//! writer notices them (`PRAGMA data_version`) and every subscription gets a
//! `{"type":"refetch","sub",...}` message telling the client to fetch the current rows.
//! Databases of the trigger version are migrated: the `cdc` module's migration moves their log
//! rows (JSON, decoded by [`decode_legacy`]) into the batch table with their ids, and
//! `storage::capture::install` drops the triggers when the database opens.
//!
//! One dispatcher task reads new changes after every write job (and every second, when it also
//! asks the writer to look for writes by other processes), and for each
//! subscription decides visibility by evaluating the policy's USING predicate on the old and the
//! new row *as the subscriber* (so `auth_userid()` is theirs): an insert or update is sent when
//! the new row is visible, an update whose row left the view is sent as a delete, a delete only
//! when the old row was visible. Base tables are subscribable by the admin and by roles holding a
//! select grant on them. A client that reconnects with its last change id gets what it missed
//! while the log still holds it (replay may start inside a batch), else a `refetch` message.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::types::Value as Sql;
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Map, Value as Json, json};
use tokio::sync::{mpsc, oneshot};

use super::hub::{Hub, Out};
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::sql::parse::quote_ident;
use crate::storage::capture;
use crate::storage::{ExecControl, Storage};

/// Start capturing `table`'s row changes (again after an ALTER TABLE: its columns are reloaded).
pub fn enable(c: &mut Connection, table: &str) -> Result<()> {
    let kind: Option<String> = c
        .query_row(
            "SELECT type FROM sqlite_schema WHERE name = ?1",
            [table],
            |r| r.get(0),
        )
        .optional()?;
    if kind.as_deref() != Some("table") {
        return Err(Error::new(
            ErrorCode::UnknownTable,
            format!("No table '{table}' (names are case-sensitive here)"),
        ));
    }
    if table.starts_with("_ichibase") || table.starts_with("sqlite_") {
        return Err(Error::new(
            ErrorCode::BadArguments,
            "engine tables cannot be captured",
        ));
    }
    let cap = capture_of(c)?;
    c.execute(
        "INSERT OR IGNORE INTO _ichibase_cdc_tables (name) VALUES (?1)",
        [table],
    )?;
    cap.set_table(c, table, true)
}

fn capture_of(c: &Connection) -> Result<Arc<capture::Capture>> {
    capture::of(c).ok_or_else(|| Error::internal("change capture runs on the writer connection only"))
}

pub fn disable(c: &mut Connection, table: &str) -> Result<()> {
    let cap = capture_of(c)?;
    if c.execute("DELETE FROM _ichibase_cdc_tables WHERE name = ?1", [table])? == 0 {
        return Err(Error::new(
            ErrorCode::NotFound,
            format!("CDC is not enabled on '{table}'"),
        ));
    }
    cap.set_table(c, table, false)
}

pub fn list(c: &Connection) -> Result<Vec<String>> {
    Ok(
        c.prepare("SELECT name FROM _ichibase_cdc_tables ORDER BY name")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?,
    )
}

/// The `cdc` module: its migration moves the log of older versions (one JSON row per change,
/// written by capture triggers) into the batched log; the triggers themselves are dropped by
/// `storage::capture::install` when the database opens.
pub struct CdcModule;

impl crate::modules::Module for CdcModule {
    fn name(&self) -> &'static str {
        "cdc"
    }

    fn migrations(&self) -> &'static [crate::storage::migrations::Migration] {
        &[crate::storage::migrations::Migration {
            version: 1,
            name: "batched change log (pre-update hook capture)",
            sql: "CREATE TABLE IF NOT EXISTS _ichibase_change_batches (
                      first_id INTEGER PRIMARY KEY,
                      last_id INTEGER NOT NULL,
                      at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
                      data ANY NOT NULL
                  ) STRICT;
                  INSERT INTO _ichibase_change_batches (first_id, last_id, at, data)
                      SELECT id, id, at, json_object('tbl', tbl, 'op', op, 'pk', json(pk), 'old', json(old), 'new', json(new))
                      FROM _ichibase_changes
                      WHERE id < (SELECT coalesce(min(first_id), 9223372036854775807) FROM _ichibase_change_batches)
                      ORDER BY id;
                  DROP TABLE _ichibase_changes;",
        }]
    }
}

/// A subscription request from a socket.
pub struct SubscribeReq {
    pub conn: u64,
    pub ctx: RequestContext,
    pub sub: String,
    /// A policy view (or, for the admin / granted roles, a table).
    pub object: String,
    /// Column = value equalities the row must match.
    pub filter: Map<String, Json>,
    /// Last change id the client saw.
    pub since: Option<i64>,
    /// How many subscriptions one connection may hold (`[ws_limits] max_subscriptions_per_socket`).
    pub max_per_conn: usize,
}

enum Cmd {
    Subscribe(SubscribeReq, oneshot::Sender<Result<Json>>),
    Unsubscribe { conn: u64, sub: String },
    Closed(u64),
}

/// Handle to the dispatcher.
#[derive(Clone)]
pub struct Cdc {
    cmd: mpsc::UnboundedSender<Cmd>,
}

struct Sub {
    conn: u64,
    id: String,
    ctx: RequestContext,
    object: String,
    table: String,
    columns: Vec<String>,
    predicate: Option<String>,
    filter: Map<String, Json>,
}

#[derive(Debug, Clone)]
struct Event {
    id: i64,
    table: Arc<str>,
    op: &'static str,
    /// Key and rows as JSON values: decoded only when a subscription needs to look at them (a
    /// policy predicate or a filter); `Null` / `None` otherwise.
    key: Json,
    old: Option<Map<String, Json>>,
    new: Option<Map<String, Json>>,
    /// The end of the change frame, serialised straight from the encoded record:
    /// `"table":…,"change_id":…,"op":…,"key":…,"old":…,"new":…}` — what every subscription
    /// without predicate and filter gets, after its own `{"type":"change","sub":…,"object":…,`.
    tail: Option<String>,
}

fn sys() -> RequestContext {
    RequestContext::system()
}

fn ctl() -> Arc<ExecControl> {
    ExecControl::new(Instant::now(), 30.0)
}

impl Cdc {
    /// Start the dispatcher on the current runtime.
    pub fn start(storage: Storage, hub: Arc<Hub>, retention: i64) -> Cdc {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(dispatch(storage, hub, retention.max(100), rx));
        Cdc { cmd: tx }
    }

    pub async fn subscribe(&self, req: SubscribeReq) -> Result<Json> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Subscribe(req, tx))
            .map_err(|_| Error::new(ErrorCode::ShuttingDown, "change capture stopped"))?;
        rx.await
            .map_err(|_| Error::new(ErrorCode::ShuttingDown, "change capture stopped"))?
    }

    pub fn unsubscribe(&self, conn: u64, sub: String) {
        let _ = self.cmd.send(Cmd::Unsubscribe { conn, sub });
    }

    pub fn closed(&self, conn: u64) {
        let _ = self.cmd.send(Cmd::Closed(conn));
    }
}

/// Drops the batches whose changes are all at or before `?1`. `first_id <= ?1` follows from
/// `last_id <= ?1` and bounds the primary key: only the pruned batches are visited.
const PRUNE_SQL: &str =
    "DELETE FROM _ichibase_change_batches WHERE first_id <= ?1 AND last_id <= ?1";

/// The batches holding changes after `?1` (up to `?2`, if not NULL), in order. A range of the
/// primary key: from the batch holding change `?1` (the newest batch that starts at or before
/// it; none: from `?1`) on. `last_id` alone is not indexed: filtering on it scanned every kept
/// batch (the whole retention window, re-read from the file after every write) on each read.
const READ_SQL: &str = "SELECT first_id, data FROM _ichibase_change_batches
    WHERE first_id >= coalesce((SELECT first_id FROM _ichibase_change_batches WHERE first_id <= ?1 ORDER BY first_id DESC LIMIT 1), ?1)
      AND last_id > ?1 AND (?2 IS NULL OR first_id <= ?2)
    ORDER BY first_id";

fn read_events(c: &Connection, after: i64, upto: Option<i64>, limit: i64, maps: bool) -> Result<Vec<Event>> {
    let mut st = c.prepare_cached(READ_SQL)?;
    let mut rows = st.query(params![after, upto])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let first: i64 = r.get(0)?;
        let keep = |id: i64| id > after && upto.is_none_or(|u| id <= u);
        let evs = match r.get_ref(1)? {
            rusqlite::types::ValueRef::Blob(b) => decode(first, b, maps, &keep, &mut out),
            rusqlite::types::ValueRef::Text(t) => decode_legacy(first, t).map(|evs| out.extend(evs.into_iter().filter(|e| keep(e.id)))),
            _ => Err("not a batch".into()),
        };
        if let Err(e) = evs {
            tracing::error!(first_id = first, error = %e, "an unreadable change batch was skipped");
        }
        if out.len() as i64 >= limit {
            break;
        }
    }
    Ok(out)
}

/// A change row written by the capture triggers of older versions (kept as JSON by the `cdc`
/// module's migration).
fn decode_legacy(id: i64, t: &[u8]) -> std::result::Result<Vec<Event>, String> {
    let v: Json = serde_json::from_slice(t).map_err(|e| e.to_string())?;
    let obj = |k: &str| match &v[k] {
        Json::Object(m) => Some(m.clone()),
        _ => None,
    };
    Ok(vec![Event {
        id,
        table: v["tbl"].as_str().unwrap_or_default().into(),
        op: match v["op"].as_str().unwrap_or_default() {
            "insert" => "insert",
            "update" => "update",
            "delete" => "delete",
            _ => "unknown",
        },
        key: v["pk"].clone(),
        old: obj("old"),
        new: obj("new"),
        tail: None,
    }])
}

/// Reads the batch encoding of `storage::capture`.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> std::result::Result<u8, String> {
        let v = *self.b.get(self.at).ok_or("truncated batch")?;
        self.at += 1;
        Ok(v)
    }
    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("bad varint".into())
    }
    fn int(&mut self) -> std::result::Result<i64, String> {
        let v = self.varint()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }
    fn bytes(&mut self) -> std::result::Result<&'a [u8], String> {
        let n = self.varint()? as usize;
        let s = self.b.get(self.at..self.at + n).ok_or("truncated batch")?;
        self.at += n;
        Ok(s)
    }
    fn text(&mut self) -> std::result::Result<String, String> {
        Ok(String::from_utf8_lossy(self.bytes()?).into_owned())
    }
    fn value(&mut self) -> std::result::Result<Json, String> {
        Ok(match self.byte()? {
            capture::V_NULL => Json::Null,
            capture::V_INT => json!(self.int()?),
            capture::V_REAL => {
                let s = self.b.get(self.at..self.at + 8).ok_or("truncated batch")?;
                self.at += 8;
                json!(f64::from_le_bytes(s.try_into().unwrap()))
            }
            capture::V_TEXT => Json::String(self.text()?),
            capture::V_BLOB => {
                // As the capture triggers of older versions showed them: upper-case hex.
                let b = self.bytes()?;
                let mut h = String::with_capacity(b.len() * 2);
                for x in b {
                    h.push_str(&format!("{x:02X}"));
                }
                Json::String(h)
            }
            t => return Err(format!("unknown value tag {t}")),
        })
    }
    fn row(&mut self, cols: &[String]) -> std::result::Result<Map<String, Json>, String> {
        let n = self.varint()? as usize;
        let mut m = Map::new();
        for i in 0..n {
            let v = self.value()?;
            let name = cols.get(i).cloned().unwrap_or_else(|| format!("column{}", i + 1));
            m.insert(name, v);
        }
        Ok(m)
    }
}

/// JSON string literal of `s` (as serde_json writes it).
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if esc.is_empty() {
            let _ = write!(out, "\\u{:04x}", b);
        } else {
            out.push_str(esc);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// An integer in decimal, as `Display` writes it (`itoa`, without the formatting machinery:
/// this runs for every id and integer value of every change).
fn push_i64(out: &mut String, v: i64) {
    out.push_str(itoa::Buffer::new().format(v));
}

/// A table's column names as JSON object keys (`"name":`), escaped once per batch, not once
/// per value.
fn json_keys(cols: &[String]) -> Vec<String> {
    cols.iter()
        .map(|c| {
            let mut k = String::with_capacity(c.len() + 3);
            push_json_str(&mut k, c);
            k.push(':');
            k
        })
        .collect()
}

impl Reader<'_> {
    /// One encoded row straight to a JSON object (`keys`: the columns' [`json_keys`]); `spans`
    /// gets where each value's text lies.
    fn row_json(
        &mut self,
        keys: &[String],
        out: &mut String,
        spans: &mut Vec<(usize, usize)>,
    ) -> std::result::Result<(), String> {
        let n = self.varint()? as usize;
        spans.clear();
        out.push('{');
        for i in 0..n {
            if i > 0 {
                out.push(',');
            }
            match keys.get(i) {
                Some(k) => out.push_str(k),
                None => {
                    push_json_str(out, &format!("column{}", i + 1));
                    out.push(':');
                }
            }
            let at = out.len();
            match self.byte()? {
                capture::V_NULL => out.push_str("null"),
                capture::V_INT => push_i64(out, self.int()?),
                capture::V_REAL => {
                    let s = self.b.get(self.at..self.at + 8).ok_or("truncated batch")?;
                    self.at += 8;
                    match serde_json::Number::from_f64(f64::from_le_bytes(s.try_into().unwrap())) {
                        Some(n) => {
                            let _ = write!(out, "{n}");
                        }
                        None => out.push_str("null"),
                    }
                }
                capture::V_TEXT => push_json_str(out, &String::from_utf8_lossy(self.bytes()?)),
                capture::V_BLOB => {
                    out.push('"');
                    for x in self.bytes()? {
                        let _ = write!(out, "{x:02X}");
                    }
                    out.push('"');
                }
                t => return Err(format!("unknown value tag {t}")),
            }
            spans.push((at, out.len()));
        }
        out.push('}');
        Ok(())
    }

    /// Skip one encoded row.
    fn skip_row(&mut self) -> std::result::Result<(), String> {
        let n = self.varint()? as usize;
        for _ in 0..n {
            match self.byte()? {
                capture::V_INT => {
                    self.varint()?;
                }
                capture::V_REAL => self.at += 8,
                capture::V_TEXT | capture::V_BLOB => {
                    self.bytes()?;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// A table of a batch: name, columns, primary-key positions, the columns as JSON keys.
type BatchTable = (Arc<str>, Vec<String>, Vec<usize>, Vec<String>);

/// The changes of one batch row (ids from `first`) that `keep` wants, appended to `out`: each
/// with its frame tail serialised straight from the encoding, and with JSON values too when
/// `maps` (a subscription must evaluate a predicate or filter on them).
fn decode(
    first: i64,
    data: &[u8],
    maps: bool,
    keep: &dyn Fn(i64) -> bool,
    out: &mut Vec<Event>,
) -> std::result::Result<(), String> {
    let mut r = Reader { b: data, at: 0 };
    if r.byte()? != capture::FORMAT {
        return Err("unknown batch format".into());
    }
    let ntables = r.varint()? as usize;
    let mut tables: Vec<BatchTable> = Vec::with_capacity(ntables.min(1024));
    for _ in 0..ntables {
        let name = r.text()?;
        let ncols = r.varint()? as usize;
        let mut cols = Vec::with_capacity(ncols.min(4096));
        for _ in 0..ncols {
            cols.push(r.text()?);
        }
        let npk = r.varint()? as usize;
        let mut pk = Vec::with_capacity(npk.min(4096));
        for _ in 0..npk {
            pk.push(r.varint()? as usize);
        }
        let keys = json_keys(&cols);
        tables.push((name.into(), cols, pk, keys));
    }
    let n = r.varint()? as usize;
    out.reserve(n.min(1 << 20));
    let (mut so, mut sn) = (Vec::new(), Vec::new());
    // The rows of one event, written before the key that is copied out of them (reused).
    let mut rows = String::new();
    for i in 0..n {
        let id = first + i as i64;
        let op = r.byte()?;
        let (name, cols, pk, keys) = tables.get(r.varint()? as usize).ok_or("bad table index")?;
        let rowid = r.int()?;
        let op_name = match op {
            capture::OP_INSERT => "insert",
            capture::OP_UPDATE => "update",
            capture::OP_DELETE => "delete",
            _ => return Err(format!("unknown op {op}")),
        };
        if !keep(id) {
            if op != capture::OP_INSERT {
                r.skip_row()?;
            }
            if op != capture::OP_DELETE {
                r.skip_row()?;
            }
            continue;
        }
        let start = r.at;
        // The frame tail, straight from the encoding.
        let mut t = String::with_capacity(96 + (data.len() / n.max(1)) * 2);
        t.push_str("\"table\":");
        push_json_str(&mut t, name);
        t.push_str(",\"change_id\":");
        push_i64(&mut t, id);
        t.push_str(",\"op\":\"");
        t.push_str(op_name);
        t.push_str("\",\"key\":");
        // Rows go to `rows` first: the key comes before them in the frame.
        rows.clear();
        rows.push_str(",\"old\":");
        if op != capture::OP_INSERT {
            r.row_json(keys, &mut rows, &mut so)?;
        } else {
            rows.push_str("null");
        }
        rows.push_str(",\"new\":");
        if op != capture::OP_DELETE {
            r.row_json(keys, &mut rows, &mut sn)?;
        } else {
            rows.push_str("null");
        }
        rows.push('}');
        let spans = if op == capture::OP_DELETE { &so } else { &sn };
        if pk.is_empty() || spans.is_empty() {
            t.push_str("{\"rowid\":");
            push_i64(&mut t, rowid);
            t.push('}');
        } else {
            t.push('{');
            for (j, p) in pk.iter().enumerate() {
                if j > 0 {
                    t.push(',');
                }
                match keys.get(*p) {
                    Some(k) => t.push_str(k),
                    None => {
                        push_json_str(&mut t, &format!("column{}", p + 1));
                        t.push(':');
                    }
                }
                match spans.get(*p) {
                    Some((a, b)) => t.push_str(&rows[*a..*b]),
                    None => t.push_str("null"),
                }
            }
            t.push('}');
        }
        t.push_str(&rows);
        let (key, old, new) = if maps {
            let end = r.at;
            r.at = start;
            let old = if op != capture::OP_INSERT { Some(r.row(cols)?) } else { None };
            let new = if op != capture::OP_DELETE { Some(r.row(cols)?) } else { None };
            r.at = end;
            let keyed = if op == capture::OP_DELETE { &old } else { &new };
            let key = match keyed {
                Some(row) if !pk.is_empty() => Json::Object(
                    pk.iter()
                        .filter_map(|p| cols.get(*p))
                        .map(|c| (c.clone(), row.get(c).cloned().unwrap_or(Json::Null)))
                        .collect(),
                ),
                _ => json!({"rowid": rowid}),
            };
            (key, old, new)
        } else {
            (Json::Null, None, None)
        };
        out.push(Event { id, table: Arc::clone(name), op: op_name, key, old, new, tail: Some(t) });
    }
    Ok(())
}

fn to_sql(v: Option<&Json>) -> Sql {
    match v {
        None | Some(Json::Null) => Sql::Null,
        Some(Json::Bool(b)) => Sql::Integer(*b as i64),
        Some(Json::Number(n)) => n
            .as_i64()
            .map(Sql::Integer)
            .unwrap_or_else(|| Sql::Real(n.as_f64().unwrap_or(0.0))),
        Some(Json::String(s)) => Sql::Text(s.clone()),
        Some(other) => Sql::Text(other.to_string()),
    }
}

/// Does `row` pass `predicate` for the identity checked out on `c`?
fn visible(
    c: &Connection,
    predicate: &str,
    columns: &[String],
    row: &Map<String, Json>,
) -> Result<bool> {
    let cols: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, n)| format!("?{} AS {}", i + 1, quote_ident(n)))
        .collect();
    let sql = format!(
        "SELECT coalesce(({predicate}), 0) FROM (SELECT {})",
        cols.join(", ")
    );
    let mut st = c.prepare_cached(&sql)?;
    for (i, n) in columns.iter().enumerate() {
        st.raw_bind_parameter(i + 1, to_sql(row.get(n)))?;
    }
    let mut rows = st.raw_query();
    Ok(match rows.next()? {
        Some(r) => match r.get_ref(0)? {
            rusqlite::types::ValueRef::Integer(n) => n != 0,
            rusqlite::types::ValueRef::Real(f) => f != 0.0,
            _ => false,
        },
        None => false,
    })
}

fn matches_filter(filter: &Map<String, Json>, row: &Map<String, Json>) -> bool {
    filter
        .iter()
        .all(|(k, v)| row.get(k) == Some(v) || (v.is_null() && row.get(k).is_none()))
}

/// The message `sub` gets for `ev`, if any (visibility given for old/new rows).
fn message(sub: &Sub, ev: &Event, old_vis: bool, new_vis: bool) -> Option<String> {
    let row_ok =
        |r: &Option<Map<String, Json>>| r.as_ref().is_some_and(|r| matches_filter(&sub.filter, r));
    let old_ok = old_vis && row_ok(&ev.old);
    let new_ok = new_vis && row_ok(&ev.new);
    let (op, old, new) = match ev.op {
        "insert" if new_ok => ("insert", None, ev.new.as_ref()),
        "update" if new_ok => (
            "update",
            if old_ok { ev.old.as_ref() } else { None },
            ev.new.as_ref(),
        ),
        "update" if old_ok => ("delete", ev.old.as_ref(), None),
        "delete" if old_ok => ("delete", ev.old.as_ref(), None),
        _ => return None,
    };
    /// The frame, serialised straight from the event's rows (no copy of them).
    #[derive(serde::Serialize)]
    struct Msg<'a> {
        r#type: &'static str,
        sub: &'a str,
        object: &'a str,
        table: &'a str,
        change_id: i64,
        op: &'static str,
        key: &'a Json,
        old: Option<&'a Map<String, Json>>,
        new: Option<&'a Map<String, Json>>,
    }
    serde_json::to_string(&Msg {
        r#type: "change",
        sub: &sub.id,
        object: &sub.object,
        table: &ev.table,
        change_id: ev.id,
        op,
        key: &ev.key,
        old,
        new,
    })
    .ok()
}

/// Deliver `events` to `subs`, evaluating predicates once per identity for the whole batch.
async fn deliver(storage: &Storage, hub: &Hub, subs: &[&Sub], events: &[Event]) {
    // (sub index, event index) -> (old visible, new visible)
    let mut vis: HashMap<(usize, usize), (bool, bool)> = HashMap::new();
    let mut by_identity: HashMap<(Option<String>, String), Vec<usize>> = HashMap::new();
    for (i, s) in subs.iter().enumerate() {
        if s.predicate.is_some() {
            by_identity
                .entry((s.ctx.user_id.clone(), s.ctx.role.as_str().to_string()))
                .or_default()
                .push(i);
        }
    }
    for (_, idxs) in by_identity {
        let mut ctx = subs[idxs[0]].ctx.clone();
        ctx.elevated = true;
        let work: Vec<(usize, String, Vec<String>)> = idxs
            .iter()
            .map(|i| (*i, subs[*i].table.clone(), subs[*i].columns.clone()))
            .collect();
        let preds: Vec<String> = idxs
            .iter()
            .map(|i| subs[*i].predicate.clone().unwrap_or_default())
            .collect();
        let evs = events.to_vec();
        let r = storage
            .read(&ctx, ctl(), move |c| {
                let mut out = Vec::new();
                for ((i, table, columns), pred) in work.iter().zip(&preds) {
                    for (j, e) in evs.iter().enumerate() {
                        if *e.table != **table {
                            continue;
                        }
                        let o = match &e.old {
                            Some(r) => visible(c, pred, columns, r)?,
                            None => false,
                        };
                        let n = match &e.new {
                            Some(r) => visible(c, pred, columns, r)?,
                            None => false,
                        };
                        out.push(((*i, j), (o, n)));
                    }
                }
                Ok(out)
            })
            .await;
        match r {
            Ok(v) => vis.extend(v),
            Err(e) => {
                tracing::error!(error = %e, "CDC visibility check failed; events withheld from that identity")
            }
        }
    }
    // Subscriptions without predicate and filter get every change of their table as recorded:
    // their frame is a prefix of their own and the event's pre-serialised tail.
    let prefixes: Vec<Option<String>> = subs
        .iter()
        .map(|s| {
            (s.predicate.is_none() && s.filter.is_empty()).then(|| {
                let mut p = String::from("{\"type\":\"change\",\"sub\":");
                push_json_str(&mut p, &s.id);
                p.push_str(",\"object\":");
                push_json_str(&mut p, &s.object);
                p.push(',');
                p
            })
        })
        .collect();
    // Every frame of the batch, in order, queued under one hub lock.
    let mut frames: Vec<(u64, Out)> = Vec::with_capacity(events.len() * subs.len().min(4));
    for (j, e) in events.iter().enumerate() {
        for (i, s) in subs.iter().enumerate() {
            if let (Some(prefix), Some(tail)) = (&prefixes[i], &e.tail) {
                if *s.table == *e.table {
                    let mut m = String::with_capacity(prefix.len() + tail.len());
                    m.push_str(prefix);
                    m.push_str(tail);
                    frames.push((s.conn, Out::Text(m.into())));
                }
                continue;
            }
            let v = if s.predicate.is_none() {
                (*s.table == *e.table).then_some((e.op != "insert", e.op != "delete"))
            } else {
                vis.get(&(i, j)).copied()
            };
            if let Some((o, n)) = v {
                if let Some(m) = message(s, e, o, n) {
                    // `.into()`: the frame type of `Out::Text` (shared text) built from the string.
                    frames.push((s.conn, Out::Text(m.into())));
                }
            }
        }
    }
    hub.send_many(frames);
}

/// Resolve what a subscription reads and check the role may read it.
fn resolve(c: &Connection, req: &SubscribeReq) -> Result<(String, Option<String>, Vec<String>)> {
    let policy: Option<(String, String)> = c
        .query_row(
            "SELECT table_name, using_expr FROM _ichibase_policies WHERE name = ?1",
            [&req.object],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let role = req.ctx.role.as_str();
    let granted: bool = c.query_row(
        "SELECT count(*) > 0 FROM _ichibase_grants WHERE lower(object) = lower(?1) AND role = ?2 AND privilege = 'select'",
        params![req.object, role],
        |r| r.get(0),
    )?;
    let (table, predicate) = match policy {
        Some((t, using)) => (
            t,
            if req.ctx.is_admin() {
                None
            } else {
                Some(using)
            },
        ),
        None => (req.object.clone(), None),
    };
    if !req.ctx.is_admin() && !granted {
        return Err(Error::new(
            ErrorCode::AccessDenied,
            format!("role '{role}' may not read {}", req.object),
        ));
    }
    let enabled: bool = c.query_row(
        "SELECT count(*) > 0 FROM _ichibase_cdc_tables WHERE name = ?1",
        [&table],
        |r| r.get(0),
    )?;
    if !enabled {
        return Err(Error::new(
            ErrorCode::NotFound,
            format!("change capture is not enabled on table '{table}' (POST /admin/cdc)"),
        ));
    }
    let columns: Vec<String> = c
        .prepare("SELECT name FROM pragma_table_info(?1) ORDER BY cid")?
        .query_map([&table], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok((table, predicate, columns))
}

/// Changes read from the log at once, at most.
const READ_LIMIT: i64 = 500;

/// The newest change id the log holds (0: none yet).
const NEWEST_SQL: &str =
    "SELECT coalesce((SELECT last_id FROM _ichibase_change_batches ORDER BY first_id DESC LIMIT 1), 0)";

/// How long a read of the log may hold the dispatcher's async worker before it is interrupted
/// and made again on a blocking thread: the batches a write job just committed take tens of
/// microseconds to read.
const INLINE_READ: Duration = Duration::from_millis(2);

/// Run `f` on a reader connection: inline on this worker when one is free at once (no blocking
/// thread woken for every write job's few batches), within [`INLINE_READ`]; else, and when the
/// inline attempt fails (a lock, the time budget), on the reader pool.
async fn read_now<R: Send + 'static>(
    storage: &Storage,
    f: impl Fn(&Connection) -> Result<R> + Send + Sync + 'static,
) -> Result<R> {
    let budget = ExecControl::new(Instant::now(), INLINE_READ.as_secs_f64());
    if let Some(Ok(v)) = storage.try_read_inline(&sys(), budget, &f) {
        return Ok(v);
    }
    storage.read(&sys(), ctl(), move |c| f(c)).await
}

async fn dispatch(
    storage: Storage,
    hub: Arc<Hub>,
    retention: i64,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
) {
    let committed = storage.committed();
    let mut cursor: i64 = match storage
        .read(&sys(), ctl(), |c| {
            Ok(c.query_row(
                "SELECT coalesce(max(last_id), 0) FROM _ichibase_change_batches",
                [],
                |r| r.get(0),
            )?)
        })
        .await
    {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "CDC dispatcher could not start");
            return;
        }
    };
    let mut subs: Vec<Sub> = Vec::new();
    let mut last_prune = Instant::now();
    let mut pruned_at = cursor;
    let mut external_seen = storage.capture().external_writes();
    loop {
        let mut cmds = Vec::new();
        let mut tick = false;
        tokio::select! {
            c = rx.recv() => match c {
                Some(c) => cmds.push(c),
                None => return,
            },
            _ = committed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => tick = true,
        }
        if tick && !subs.is_empty() {
            // An idle writer runs no job that would notice writes by other processes: ask it.
            let _ = storage.write(&sys(), ctl(), |c| {
                if let Some(cap) = capture::of(c) {
                    cap.poll_external(c);
                }
                Ok(())
            }).await;
        }
        let external = storage.capture().external_writes();
        if external != external_seen {
            external_seen = external;
            for s in &subs {
                let m = json!({"type": "refetch", "sub": s.id, "object": s.object, "table": s.table,
                    "reason": "the database was changed by another process or connection, whose row changes are not captured; fetch the current rows"});
                hub.send(s.conn, Out::Text(m.to_string().into()));
            }
        }
        while let Ok(c) = rx.try_recv() {
            cmds.push(c);
        }
        // Live events first, so a new subscription's replay ends exactly where live delivery starts.
        let maps = subs.iter().any(|s| s.predicate.is_some() || !s.filter.is_empty());
        loop {
            let after = cursor;
            if subs.is_empty() {
                // Nobody to deliver to: only the cursor moves (a later subscription's live
                // delivery starts after the newest change), nothing is decoded.
                match read_now(&storage, |c| Ok(c.query_row(NEWEST_SQL, [], |r| r.get::<_, i64>(0))?)).await {
                    Ok(newest) => cursor = cursor.max(newest),
                    Err(e) => tracing::error!(error = %e, "reading the change log failed"),
                }
                break;
            }
            let events = match read_now(&storage, move |c| read_events(c, after, None, READ_LIMIT, maps)).await {
                Ok(e) => e,
                Err(e) if e.code == crate::core::ErrorCode::QueryWasCancelled => {
                    // The server is shutting down (Ctrl-C stops reads).
                    tracing::debug!(error = %e, "reading the change log stopped");
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, "reading the change log failed");
                    break;
                }
            };
            let Some(last) = events.last().map(|e| e.id) else {
                break;
            };
            let refs: Vec<&Sub> = subs.iter().collect();
            deliver(&storage, &hub, &refs, &events).await;
            cursor = last;
            if (events.len() as i64) < READ_LIMIT {
                break;
            }
        }
        for c in cmds {
            match c {
                Cmd::Subscribe(req, reply) => {
                    let r = subscribe(&storage, &hub, &mut subs, req, cursor).await;
                    let _ = reply.send(r);
                }
                Cmd::Unsubscribe { conn, sub } => subs.retain(|s| !(s.conn == conn && s.id == sub)),
                Cmd::Closed(conn) => subs.retain(|s| s.conn != conn),
            }
        }
        if last_prune.elapsed() > Duration::from_secs(10) || cursor - pruned_at >= retention {
            last_prune = Instant::now();
            pruned_at = cursor;
            let keep_from = cursor - retention;
            if keep_from > 0 {
                let r = storage
                    .write(&sys(), ctl(), move |c| {
                        Ok(c.execute(PRUNE_SQL, [keep_from])?)
                    })
                    .await;
                if let Err(e) = r {
                    tracing::warn!(error = %e, "pruning the change log failed");
                }
            }
        }
    }
}

async fn subscribe(
    storage: &Storage,
    hub: &Hub,
    subs: &mut Vec<Sub>,
    req: SubscribeReq,
    cursor: i64,
) -> Result<Json> {
    if req.sub.is_empty() || req.sub.len() > 100 {
        return Err(Error::new(
            ErrorCode::BadArguments,
            "a subscription needs an id of 1-100 characters",
        ));
    }
    if hub.identity(req.conn).is_none() {
        // Closed (or cut off) while the request waited: never keep a subscription nobody reads.
        return Err(Error::new(
            ErrorCode::BadArguments,
            "the connection is closed",
        ));
    }
    if subs.iter().filter(|s| s.conn == req.conn).count() >= req.max_per_conn {
        return Err(Error::new(
            ErrorCode::TooManyRequests,
            format!(
                "at most {} subscriptions per connection ([ws_limits] max_subscriptions_per_socket)",
                req.max_per_conn
            ),
        ));
    }
    if subs.iter().any(|s| s.conn == req.conn && s.id == req.sub) {
        return Err(Error::new(
            ErrorCode::BadArguments,
            format!(
                "subscription '{}' exists already on this connection",
                req.sub
            ),
        ));
    }
    let r2 = SubscribeReq {
        conn: req.conn,
        ctx: req.ctx.clone(),
        sub: req.sub.clone(),
        object: req.object.clone(),
        filter: req.filter.clone(),
        since: req.since,
        max_per_conn: req.max_per_conn,
    };
    let (table, predicate, columns) = storage
        .read(&sys(), ctl(), move |c| resolve(c, &r2))
        .await?;
    let sub = Sub {
        conn: req.conn,
        id: req.sub.clone(),
        ctx: req.ctx,
        object: req.object,
        table,
        columns,
        predicate,
        filter: req.filter,
    };
    let mut reply = json!({"type": "subscribed", "sub": sub.id, "object": sub.object, "table": sub.table, "cursor": cursor});
    if let Some(since) = req.since.filter(|s| *s < cursor) {
        let min: Option<i64> = storage
            .read(&sys(), ctl(), |c| {
                Ok(c.query_row("SELECT min(first_id) FROM _ichibase_change_batches", [], |r| r.get(0))?)
            })
            .await?;
        if min.is_none_or(|m| m > since + 1) {
            reply["refetch"] = json!(true);
            reply["reason"] = json!(format!(
                "changes after {since} are no longer kept; fetch the current rows, then follow from change {cursor}"
            ));
        } else {
            let mut after = since;
            let maps = sub.predicate.is_some() || !sub.filter.is_empty();
            loop {
                let events = storage
                    .read(&sys(), ctl(), move |c| {
                        read_events(c, after, Some(cursor), 500, maps)
                    })
                    .await?;
                let Some(last) = events.last().map(|e| e.id) else {
                    break;
                };
                // Replayed events go out before the reply's own delivery, in order.
                deliver(storage, hub, &[&sub], &events).await;
                after = last;
            }
            reply["replayed_from"] = json!(since);
        }
    }
    subs.push(sub);
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Json) -> Map<String, Json> {
        v.as_object().unwrap().clone()
    }

    fn sub(filter: Json) -> Sub {
        Sub {
            conn: 1,
            id: "s".into(),
            ctx: RequestContext::system(),
            object: "notes".into(),
            table: "notes".into(),
            columns: vec!["id".into(), "owner".into()],
            predicate: None,
            filter: obj(filter),
        }
    }

    fn msg(s: &Sub, ev: &Event, o: bool, n: bool) -> Option<Json> {
        message(s, ev, o, n).map(|t| serde_json::from_str(&t).unwrap())
    }

    fn event(op: &'static str, old: Option<Json>, new: Option<Json>) -> Event {
        Event {
            id: 7,
            table: "notes".into(),
            op,
            key: json!(1),
            old: old.map(obj),
            new: new.map(obj),
            tail: None,
        }
    }

    fn events(c: &Connection, after: i64) -> Vec<String> {
        read_events(c, after, None, 1000, true)
            .unwrap()
            .iter()
            .map(|e| format!("{} {} {} {} {}", e.id, e.table, e.op, e.key, json!(e.new)))
            .collect()
    }

    /// Statements one by one, errors ignored (as a client that carries on would).
    fn ops(c: &Connection, sql: &str) {
        for st in sql.split(';').filter(|s| !s.trim().is_empty()) {
            let _ = c.execute_batch(st);
        }
    }

    fn captured_db() -> (Connection, Arc<capture::Capture>) {
        let mut c = Connection::open_in_memory().unwrap();
        c.execute_batch(
            "CREATE TABLE _ichibase_cdc_tables (name TEXT PRIMARY KEY, enabled_at TEXT);
             CREATE TABLE t(id INTEGER PRIMARY KEY, v);
             CREATE TABLE k(a TEXT, b INT, PRIMARY KEY (b, a)) WITHOUT ROWID;
             CREATE TABLE nopk(x);
             CREATE TABLE other(x);
             CREATE TABLE u(id INTEGER PRIMARY KEY, email TEXT UNIQUE, r REAL);
             INSERT INTO _ichibase_cdc_tables(name) VALUES ('t'), ('k'), ('nopk'), ('u');",
        )
        .unwrap();
        let cap = capture::install(&mut c).unwrap();
        (c, cap)
    }

    /// The capture mechanism on one connection, without a server: what reaches the log after
    /// commits, failed statements, savepoints and rollbacks, and how batches decode. The log is
    /// written inside the transactions themselves (no flush step).
    #[test]
    fn captured_batches_hold_exactly_the_committed_changes() {
        let (mut c, cap) = captured_db();
        ops(&c, "INSERT INTO t VALUES (1, 'a'), (2, 1.5); INSERT INTO other VALUES (1)");
        ops(
            &c,
            "BEGIN; UPDATE t SET v = x'01' WHERE id = 1; INSERT INTO t VALUES (3, 'x'), (1, 'dup');
             SAVEPOINT s; INSERT INTO k VALUES ('q', 7); ROLLBACK TO s; INSERT INTO k VALUES ('r', 8);
             RELEASE s; INSERT INTO nopk VALUES (9); DELETE FROM t WHERE id = 2; COMMIT",
        );
        ops(&c, "BEGIN; INSERT INTO t VALUES (4, 'gone'); ROLLBACK");
        assert_eq!(cap.end_job(&c), None);
        assert_eq!(
            events(&c, 0),
            vec![
                r#"1 t insert {"id":1} {"id":1,"v":"a"}"#,
                r#"2 t insert {"id":2} {"id":2,"v":1.5}"#,
                r#"3 t update {"id":1} {"id":1,"v":"01"}"#,
                r#"4 k insert {"a":"r","b":8} {"a":"r","b":8}"#,
                r#"5 nopk insert {"rowid":1} {"x":9}"#,
                r#"6 t delete {"id":2} null"#,
            ]
        );
        let evs = read_events(&c, 0, None, 1000, true).unwrap();
        assert_eq!(evs[5].old.as_ref().unwrap()["v"], json!(1.5));
        // Replay from inside a batch, and up to a bound.
        let ids: Vec<i64> = read_events(&c, 3, Some(5), 1000, true).unwrap().iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![4, 5]);
        // Not captured any more once disabled; a failed autocommit statement leaves nothing.
        disable(&mut c, "nopk").unwrap();
        ops(&c, "INSERT INTO nopk VALUES (10); INSERT INTO t VALUES (5, 'e'), (1, 'dup')");
        assert_eq!(events(&c, 6), Vec::<String>::new());
        assert_eq!(c.query_row("SELECT count(*) FROM t WHERE id = 5", [], |r| r.get::<_, i64>(0)).unwrap(), 0);
        capture::uninstall(&mut c);
    }

    /// A failed statement inside a transaction that carries on and commits (a Lua `pcall`
    /// around `db.exec` in `db.tx`): only the failed statement's rows are dropped. `INSERT OR
    /// FAIL` keeps (and reports) the rows before the failing one. REPLACE over an existing key is
    /// one insert; rows it removes for another key are deletes.
    #[test]
    fn failed_statements_or_fail_and_replace() {
        let (mut c, _cap) = captured_db();
        ops(
            &c,
            "BEGIN; INSERT INTO t VALUES (1, 'a'); UPDATE t SET v = 'b' WHERE id = 1;
             INSERT INTO t VALUES (2, 'x'), (1, 'dup'); UPDATE t SET id = 1 WHERE id = 1;
             INSERT INTO t VALUES (3, 'y'); COMMIT",
        );
        assert_eq!(
            events(&c, 0),
            vec![
                r#"1 t insert {"id":1} {"id":1,"v":"a"}"#,
                r#"2 t update {"id":1} {"id":1,"v":"b"}"#,
                r#"3 t update {"id":1} {"id":1,"v":"b"}"#,
                r#"4 t insert {"id":3} {"id":3,"v":"y"}"#,
            ]
        );
        ops(&c, "INSERT OR FAIL INTO t VALUES (10, 'p'), (11, 'q'), (1, 'dup'), (12, 'z')");
        assert_eq!(events(&c, 4), vec![r#"5 t insert {"id":10} {"id":10,"v":"p"}"#, r#"6 t insert {"id":11} {"id":11,"v":"q"}"#]);
        // An UPDATE whose later row fails: nothing (a REAL column given an integer compares equal).
        ops(&c, "INSERT INTO u VALUES (1, 'a@x', 1), (2, 'b@x', 2)");
        ops(&c, "UPDATE u SET email = 'c@x', r = 3 WHERE id = 1; UPDATE u SET email = 'same@x'");
        let all = events(&c, 6);
        assert_eq!(all.len(), 3, "{all:?}");
        assert!(all[2].starts_with(r#"9 u update {"id":1}"#), "{all:?}");
        // REPLACE over the same key: one insert. Over another row's UNIQUE email: that row's delete.
        ops(&c, "REPLACE INTO u VALUES (1, 'c@x', 5)");
        ops(&c, "REPLACE INTO u VALUES (3, 'b@x', 6)");
        ops(&c, "REPLACE INTO k VALUES ('r', 8)");
        ops(&c, "INSERT INTO k VALUES ('r', 9)");
        ops(&c, "REPLACE INTO k VALUES ('r', 9)");
        let tail: Vec<String> = events(&c, 9).into_iter().map(|e| e.split(' ').skip(1).take(3).collect::<Vec<_>>().join(" ")).collect();
        assert_eq!(
            tail,
            vec![
                r#"u insert {"id":1}"#,
                r#"u delete {"id":2}"#,
                r#"u insert {"id":3}"#,
                r#"k insert {"a":"r","b":8}"#,
                r#"k insert {"a":"r","b":9}"#,
                r#"k insert {"a":"r","b":9}"#,
            ]
        );
        capture::uninstall(&mut c);
    }

    /// The frame serialised straight from the encoding (subscriptions without predicate and
    /// filter) is the frame built from decoded values, byte for byte.
    #[test]
    fn pre_serialised_frames_equal_the_decoded_ones() {
        let (mut c, _cap) = captured_db();
        ops(
            &c,
            "INSERT INTO t VALUES (1, 'quote \" back \\ nl 
 tab 	 bell ' || char(7) || ' é 日'), (2, 1.5), (3, x'00ff10'), (4, NULL), (5, -9223372036854775808), (6, 1e300);
             UPDATE t SET v = 2.0 WHERE id = 2; DELETE FROM t WHERE id = 3;
             INSERT INTO k VALUES ('a\"b', 1); INSERT INTO nopk VALUES ('x'); REPLACE INTO u VALUES (1, 'e', 0.1)",
        );
        let fast = read_events(&c, 0, None, 1000, false).unwrap();
        let slow = read_events(&c, 0, None, 1000, true).unwrap();
        assert_eq!(fast.len(), 11);
        for (f, e) in fast.iter().zip(&slow) {
            let mut s = sub(json!({}));
            s.table = e.table.to_string();
            s.id = "s\"1".into();
            let want = message(&s, e, e.op != "insert", e.op != "delete").unwrap();
            let got = format!("{{\"type\":\"change\",\"sub\":\"s\\\"1\",\"object\":\"notes\",{}", f.tail.as_ref().unwrap());
            assert_eq!(got, want);
            assert!(f.old.is_none() && f.new.is_none(), "no JSON values without a predicate or filter");
        }
        capture::uninstall(&mut c);
    }

    /// The hook looks a row's table up once per switch of table, not per row: rows of captured
    /// and uncaptured tables interleaving inside one statement (triggers each way), and a table
    /// disabled or enabled between statements, land where they belong. Writes by another
    /// connection are noticed before the next job's first statement: inside the transaction
    /// capture opens for an autocommit write (an added column is in that statement's events),
    /// or on their own before a read.
    #[test]
    fn interleaved_tables_and_writes_by_other_connections() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let mut c = Connection::open(&path).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE _ichibase_cdc_tables (name TEXT PRIMARY KEY, enabled_at TEXT);
             CREATE TABLE t(id INTEGER PRIMARY KEY, v);
             CREATE TABLE other(x);
             CREATE TRIGGER tw AFTER INSERT ON other BEGIN INSERT INTO t VALUES (100 + new.x, 'via trigger'); END;
             CREATE TRIGGER ow AFTER INSERT ON t WHEN new.id < 100 BEGIN INSERT INTO other(x) VALUES (new.id); END;
             INSERT INTO _ichibase_cdc_tables(name) VALUES ('t');",
        )
        .unwrap();
        let cap = capture::install(&mut c).unwrap();
        ops(&c, "INSERT INTO other VALUES (1), (2); INSERT INTO t VALUES (5, 'direct')");
        disable(&mut c, "t").unwrap();
        enable(&mut c, "other").unwrap();
        ops(&c, "INSERT INTO t VALUES (6, 'after'); INSERT INTO other VALUES (3)");
        let without_ids = |after| -> Vec<String> {
            events(&c, after).into_iter().map(|e| e.split_once(' ').unwrap().1.to_string()).collect()
        };
        assert_eq!(
            without_ids(0),
            vec![
                r#"t insert {"id":101} {"id":101,"v":"via trigger"}"#,
                r#"t insert {"id":102} {"id":102,"v":"via trigger"}"#,
                r#"t insert {"id":5} {"id":5,"v":"direct"}"#,
                r#"t insert {"id":105} {"id":105,"v":"via trigger"}"#,
                r#"other insert {"rowid":4} {"x":6}"#,
                r#"other insert {"rowid":5} {"x":3}"#,
            ]
        );
        // Another connection writes and adds a column; the next job's autocommit insert sees it.
        let elsewhere = Connection::open(&path).unwrap();
        elsewhere.execute_batch("INSERT INTO other VALUES (50); ALTER TABLE other ADD COLUMN y").unwrap();
        let seen = cap.external_writes();
        cap.job_starts();
        c.execute_batch("INSERT INTO other(x) VALUES (7)").unwrap();
        assert_eq!(cap.external_writes(), seen + 1);
        assert_eq!(without_ids(6), vec![r#"other insert {"rowid":7} {"x":7,"y":null}"#]);
        // The same inside an explicit transaction (a Lua `db.tx`): the re-run's rows commit with
        // it, under the new columns.
        elsewhere.execute_batch("ALTER TABLE other ADD COLUMN z").unwrap();
        cap.job_starts();
        c.execute_batch("BEGIN; INSERT INTO other(x) VALUES (8); COMMIT").unwrap();
        assert!(c.is_autocommit());
        assert_eq!(without_ids(7), vec![r#"other insert {"rowid":8} {"x":8,"y":null,"z":null}"#]);
        let seen = seen + 1;
        // Our own commits are not writes by others; a job that starts with a read looks too.
        cap.job_starts();
        ops(&c, "SELECT count(*) FROM other");
        assert_eq!(cap.external_writes(), seen + 1);
        elsewhere.execute_batch("DELETE FROM t WHERE id = 150").unwrap();
        cap.job_starts();
        ops(&c, "SELECT count(*) FROM other");
        assert_eq!(cap.external_writes(), seen + 2);
        assert_eq!(cap.end_job(&c), None);
        capture::uninstall(&mut c);
    }

    /// A renamed table keeps being captured under its new name; a column added is picked up.
    #[test]
    fn renamed_tables_stay_captured() {
        let (mut c, _cap) = captured_db();
        ops(&c, "INSERT INTO t VALUES (1, 'a'); ALTER TABLE t RENAME TO t2; INSERT INTO t2 VALUES (2, 'b')");
        ops(&c, "ALTER TABLE t2 ADD COLUMN w");
        assert!(c.is_autocommit(), "a schema change in autocommit mode is committed when it ends");
        ops(&c, "DROP TABLE other; CREATE TABLE other(x)");
        assert!(c.is_autocommit(), "a schema change in autocommit mode is committed when it ends");
        ops(&c, "INSERT INTO t2 VALUES (3, 'c', 'd')");
        assert_eq!(
            events(&c, 0),
            vec![
                r#"1 t insert {"id":1} {"id":1,"v":"a"}"#,
                r#"2 t2 insert {"id":2} {"id":2,"v":"b"}"#,
                r#"3 t2 insert {"id":3} {"id":3,"v":"c","w":"d"}"#,
            ]
        );
        assert_eq!(list(&c).unwrap(), vec!["k", "nopk", "t2", "u"]);
        // Renamed inside a transaction that rolls back: still captured under the old name.
        ops(&c, "BEGIN; ALTER TABLE t2 RENAME TO t3; INSERT INTO t3 VALUES (4, 'x', 1); ROLLBACK; INSERT INTO t2 VALUES (5, 'y', 2)");
        assert_eq!(events(&c, 3), vec![r#"4 t2 insert {"id":5} {"id":5,"v":"y","w":2}"#]);
        capture::uninstall(&mut c);
    }

    /// Reading new changes seeks to the batch holding the cursor (a primary-key range), never a
    /// scan of every kept batch; pruning likewise visits only the pruned batches.
    #[test]
    fn log_reads_and_pruning_are_key_ranges() {
        let (mut c, _cap) = captured_db();
        for i in 0..5 {
            ops(
                &c,
                &format!(
                    "INSERT INTO t VALUES ({}, 'a'), ({}, 'b')",
                    2 * i + 1,
                    2 * i + 2
                ),
            );
        }
        let sql: String = c
            .query_row(
                "SELECT sql FROM sqlite_schema WHERE name = '_ichibase_change_batches'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(sql.contains("first_id INTEGER PRIMARY KEY"), "{sql}");
        // The plan as the dispatcher runs it: ?1 a change id, ?2 (reads) NULL.
        let plan = |q: &str| -> Vec<String> {
            let mut st = c.prepare(&format!("EXPLAIN QUERY PLAN {q}")).unwrap();
            for i in 1..=st.parameter_count() {
                st.raw_bind_parameter(i, if i == 1 { Sql::Integer(3) } else { Sql::Null })
                    .unwrap();
            }
            let mut rows = st.raw_query();
            let mut out = Vec::new();
            while let Some(r) = rows.next().unwrap() {
                out.push(r.get::<_, String>(3).unwrap());
            }
            out
        };
        let read = plan(READ_SQL);
        assert!(read.iter().all(|p| !p.starts_with("SCAN")), "{read:?}");
        assert!(
            read[0].contains("INTEGER PRIMARY KEY (rowid>?)"),
            "{read:?}"
        );
        // Every start position, inside and between batches, gives exactly the later changes.
        for after in 0..=10 {
            let ids: Vec<i64> = read_events(&c, after, None, 1000, false)
                .unwrap()
                .iter()
                .map(|e| e.id)
                .collect();
            assert_eq!(ids, ((after + 1)..=10).collect::<Vec<_>>(), "after {after}");
        }
        let prune = plan(PRUNE_SQL);
        assert!(prune.iter().all(|p| !p.starts_with("SCAN")), "{prune:?}");
        let n = c.execute(PRUNE_SQL, [5]).unwrap();
        assert_eq!(n, 2, "the batches 1-2 and 3-4; 5-6 holds a kept change");
        assert_eq!(read_events(&c, 0, None, 1000, false).unwrap()[0].id, 5);
        capture::uninstall(&mut c);
    }

    #[test]
    fn integers_are_written_as_display_writes_them() {
        for v in [
            0,
            1,
            -1,
            9,
            10,
            -10,
            1234567890,
            i64::MAX,
            i64::MIN,
            i64::MIN + 1,
        ] {
            let mut s = String::from("x");
            push_i64(&mut s, v);
            assert_eq!(s, format!("x{v}"));
        }
    }

    #[test]
    fn json_values_bind_as_sqlite_values() {
        assert_eq!(to_sql(None), Sql::Null);
        assert_eq!(to_sql(Some(&Json::Null)), Sql::Null);
        assert_eq!(to_sql(Some(&json!(true))), Sql::Integer(1));
        assert_eq!(to_sql(Some(&json!(-3))), Sql::Integer(-3));
        assert_eq!(to_sql(Some(&json!(2.5))), Sql::Real(2.5));
        assert_eq!(to_sql(Some(&json!("x"))), Sql::Text("x".into()));
        assert_eq!(to_sql(Some(&json!([1, 2]))), Sql::Text("[1,2]".into()));
    }

    #[test]
    fn filters_are_column_equalities() {
        let row = obj(json!({"owner": "a", "n": 1, "gone": null}));
        assert!(matches_filter(&Map::new(), &row));
        assert!(matches_filter(&obj(json!({"owner": "a"})), &row));
        assert!(matches_filter(&obj(json!({"owner": "a", "n": 1})), &row));
        assert!(!matches_filter(&obj(json!({"owner": "b"})), &row));
        assert!(!matches_filter(&obj(json!({"n": "1"})), &row), "no type coercion");
        assert!(matches_filter(&obj(json!({"gone": null})), &row));
        assert!(matches_filter(&obj(json!({"missing": null})), &row));
        assert!(!matches_filter(&obj(json!({"missing": 1})), &row));
    }

    #[test]
    fn changes_become_the_messages_the_subscriber_may_see() {
        let s = sub(json!({"owner": "a"}));
        let mine = json!({"id": 1, "owner": "a"});
        let theirs = json!({"id": 1, "owner": "b"});

        let m = msg(&s, &event("insert", None, Some(mine.clone())), false, true).unwrap();
        assert_eq!(m["type"], "change");
        assert_eq!((m["sub"].as_str(), m["op"].as_str(), m["change_id"].as_i64()), (Some("s"), Some("insert"), Some(7)));
        assert_eq!(m["new"], mine);
        assert_eq!(m["old"], Json::Null);
        assert!(msg(&s, &event("insert", None, Some(mine.clone())), false, false).is_none(), "invisible");
        assert!(msg(&s, &event("insert", None, Some(theirs.clone())), false, true).is_none(), "filtered");

        // An update seen on both sides; on the new side only (it moved in: no old row shown).
        let m = msg(&s, &event("update", Some(mine.clone()), Some(mine.clone())), true, true).unwrap();
        assert_eq!((m["op"].as_str(), &m["old"]), (Some("update"), &mine));
        let m = msg(&s, &event("update", Some(theirs.clone()), Some(mine.clone())), true, true).unwrap();
        assert_eq!((m["op"].as_str(), &m["old"]), (Some("update"), &Json::Null));
        // A row that leaves the subscriber's view is a delete for them.
        let m = msg(&s, &event("update", Some(mine.clone()), Some(theirs.clone())), true, true).unwrap();
        assert_eq!((m["op"].as_str(), &m["old"], &m["new"]), (Some("delete"), &mine, &Json::Null));
        assert!(msg(&s, &event("update", Some(theirs.clone()), Some(theirs.clone())), true, true).is_none());

        let m = msg(&s, &event("delete", Some(mine.clone()), None), true, false).unwrap();
        assert_eq!(m["op"], "delete");
        assert!(msg(&s, &event("delete", Some(mine.clone()), None), false, false).is_none());
        assert!(msg(&s, &event("truncate", Some(mine), None), true, true).is_none());
    }

    #[test]
    fn predicates_are_evaluated_on_the_row_values() {
        let c = Connection::open_in_memory().unwrap();
        let cols = vec!["id".to_string(), "owner".to_string(), "select".to_string()];
        let row = obj(json!({"id": 3, "owner": "a", "select": 1.5}));
        assert!(visible(&c, "owner = 'a'", &cols, &row).unwrap());
        assert!(!visible(&c, "owner = 'b'", &cols, &row).unwrap());
        assert!(visible(&c, "id > 2 AND \"select\" > 1", &cols, &row).unwrap());
        assert!(visible(&c, "\"select\" * 1.0", &cols, &row).unwrap(), "a non-zero real is true");
        assert!(!visible(&c, "NULL", &cols, &row).unwrap(), "NULL is not visible");
        assert!(!visible(&c, "owner", &cols, &row).unwrap(), "text is not true");
        let missing = obj(json!({"id": 3}));
        assert!(!visible(&c, "owner = 'a'", &cols, &missing).unwrap(), "missing columns are NULL");
        assert!(visible(&c, "no_such_column", &cols, &row).is_err());
    }
}
