//! The statements on `_ichibase_email_in`: store received messages (once per message and
//! recipient), claim pending ones for the handler, record outcomes, list and change them for
//! the admin API. Owns that table's SQL; nothing else.

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Value as Json, json};

use super::now_ms;
use crate::core::{Error, ErrorCode, Result};

/// A message about to be stored for one recipient.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: String,
    pub dedupe_key: String,
    pub message_id: Option<String>,
    pub recipient: String,
    pub route: String,
    pub user_id: String,
    pub function: String,
    pub mail_from: String,
    pub from_addr: Option<String>,
    pub subject: Option<String>,
    pub remote_ip: Option<String>,
    pub helo: Option<String>,
    /// `pending` or `quarantined`.
    pub status: &'static str,
    /// Why it is quarantined.
    pub reason: Option<String>,
    pub dkim: &'static str,
    pub dkim_detail: String,
    pub spf: &'static str,
    /// The email table handed to Lua (JSON), without `id`.
    pub email: String,
    pub raw: Vec<u8>,
}

/// Ids already stored for `key` among `recipients`: (recipient, id).
pub fn existing(c: &Connection, key: &str, recipients: &[String]) -> Result<Vec<(String, String)>> {
    let mut st = c.prepare_cached("SELECT id FROM _ichibase_email_in WHERE dedupe_key = ?1 AND recipient = ?2")?;
    let mut out = Vec::new();
    for r in recipients {
        if let Some(id) = st.query_row(params![key, r], |row| row.get::<_, String>(0)).optional()? {
            out.push((r.clone(), id));
        }
    }
    Ok(out)
}

/// Store `msgs` in one transaction; a (message, recipient) already stored is left alone.
/// Returns each message's id and whether it was new.
pub fn insert_all(c: &mut Connection, msgs: &[NewMessage]) -> Result<Vec<(String, bool)>> {
    let tx = c.transaction()?;
    let mut out = Vec::new();
    {
        let now = now_ms();
        let mut ins = tx.prepare_cached(
            "INSERT INTO _ichibase_email_in
               (id, dedupe_key, message_id, recipient, route, user_id, function, mail_from, from_addr, subject,
                remote_ip, helo, status, reason, dkim, dkim_detail, spf, email, raw, size, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?21)
             ON CONFLICT (dedupe_key, recipient) DO NOTHING",
        )?;
        let mut find = tx.prepare_cached("SELECT id FROM _ichibase_email_in WHERE dedupe_key = ?1 AND recipient = ?2")?;
        for m in msgs {
            let n = ins.execute(params![
                m.id, m.dedupe_key, m.message_id, m.recipient, m.route, m.user_id, m.function, m.mail_from,
                m.from_addr, m.subject, m.remote_ip, m.helo, m.status, m.reason, m.dkim, m.dkim_detail, m.spf,
                m.email, m.raw, m.raw.len() as i64, now
            ])?;
            if n == 1 {
                out.push((m.id.clone(), true));
            } else {
                let id: String = find.query_row(params![m.dedupe_key, m.recipient], |r| r.get(0))?;
                out.push((id, false));
            }
        }
    }
    tx.commit()?;
    Ok(out)
}

/// Messages left `running` by a stop go back to `pending` (`in_doubt + 1`): their handler may
/// or may not have finished. Returns their ids.
pub fn recover(c: &Connection) -> Result<Vec<String>> {
    let mut st = c.prepare(
        "UPDATE _ichibase_email_in SET status = 'pending', in_doubt = in_doubt + 1, updated_at = ?1
          WHERE status = 'running' RETURNING id",
    )?;
    let rows = st.query_map([now_ms()], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// A message claimed for its handler.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: String,
    pub recipient: String,
    pub user_id: String,
    pub function: String,
    pub email: String,
    pub attempts: i64,
    pub in_doubt: i64,
}

/// Claim the oldest pending message (`pending → running`, `attempts + 1`).
pub fn claim(c: &Connection) -> Result<Option<Claimed>> {
    Ok(c.prepare_cached(
        "UPDATE _ichibase_email_in SET status = 'running', attempts = attempts + 1, updated_at = ?1
          WHERE id = (SELECT id FROM _ichibase_email_in WHERE status = 'pending' ORDER BY created_at, rowid LIMIT 1)
          RETURNING id, recipient, user_id, function, email, attempts, in_doubt",
    )?
    .query_row([now_ms()], |r| {
        Ok(Claimed {
            id: r.get(0)?,
            recipient: r.get(1)?,
            user_id: r.get(2)?,
            function: r.get(3)?,
            email: r.get(4)?,
            attempts: r.get(5)?,
            in_doubt: r.get(6)?,
        })
    })
    .optional()?)
}

/// Record a handler's outcome (`handled` or `failed`), or put the message back (`pending`,
/// the server is stopping).
pub fn finish(
    c: &Connection,
    id: &str,
    status: &str,
    error: Option<&str>,
    result: Option<&str>,
    trace_id: Option<&str>,
) -> Result<()> {
    let now = now_ms();
    c.prepare_cached(
        "UPDATE _ichibase_email_in
            SET status = ?2, error = ?3, result = ?4, trace_id = coalesce(?5, trace_id), updated_at = ?6,
                handled_at = CASE WHEN ?2 = 'handled' THEN ?6 ELSE handled_at END
          WHERE id = ?1 AND status = 'running'",
    )?
    .execute(params![id, status, error, result, trace_id, now])?;
    Ok(())
}

/// Whether any message is pending.
pub fn any_pending(c: &Connection) -> Result<bool> {
    Ok(c.prepare_cached("SELECT EXISTS (SELECT 1 FROM _ichibase_email_in WHERE status = 'pending')")?
        .query_row([], |r| r.get(0))?)
}

/// `failed → pending` (retry) or `quarantined → pending` (release); a typed 409 otherwise.
pub fn requeue(c: &Connection, id: &str, from: &str) -> Result<()> {
    let n = c.execute(
        "UPDATE _ichibase_email_in SET status = 'pending', error = NULL, updated_at = ?3 WHERE id = ?1 AND status = ?2",
        params![id, from, now_ms()],
    )?;
    if n == 1 {
        return Ok(());
    }
    let status: Option<String> = c
        .query_row("SELECT status FROM _ichibase_email_in WHERE id = ?1", [id], |r| r.get(0))
        .optional()?;
    match status {
        None => Err(Error::new(ErrorCode::NotFound, format!("no inbound message {id}"))),
        Some(s) => Err(Error::new(
            ErrorCode::EmailInConflict,
            format!(
                "inbound message {id} is {s}; only a {from} message can be {}",
                if from == "failed" { "retried" } else { "released" }
            ),
        )),
    }
}

const COLUMNS: &str = "id, message_id, recipient, route, user_id, function, mail_from, from_addr, subject, remote_ip, helo,
    status, reason, dkim, dkim_detail, spf, size, attempts, in_doubt, error, result, trace_id, created_at, updated_at,
    handled_at, email";

fn row_json(r: &rusqlite::Row<'_>, full: bool) -> rusqlite::Result<Json> {
    let mut j = json!({
        "id": r.get::<_, String>(0)?,
        "message_id": r.get::<_, Option<String>>(1)?,
        "recipient": r.get::<_, String>(2)?,
        "route": r.get::<_, String>(3)?,
        "user_id": r.get::<_, String>(4)?,
        "function": r.get::<_, String>(5)?,
        "mail_from": r.get::<_, String>(6)?,
        "from": r.get::<_, Option<String>>(7)?,
        "subject": r.get::<_, Option<String>>(8)?,
        "remote_ip": r.get::<_, Option<String>>(9)?,
        "helo": r.get::<_, Option<String>>(10)?,
        "status": r.get::<_, String>(11)?,
        "reason": r.get::<_, Option<String>>(12)?,
        "dkim": r.get::<_, String>(13)?,
        "dkim_detail": r.get::<_, Option<String>>(14)?,
        "spf": r.get::<_, String>(15)?,
        "size": r.get::<_, i64>(16)?,
        "attempts": r.get::<_, i64>(17)?,
        "in_doubt": r.get::<_, i64>(18)?,
        "error": r.get::<_, Option<String>>(19)?,
        "trace_id": r.get::<_, Option<String>>(21)?,
        "created_ms": r.get::<_, i64>(22)?,
        "updated_ms": r.get::<_, i64>(23)?,
        "handled_ms": r.get::<_, Option<i64>>(24)?,
    });
    if full {
        let result: Option<String> = r.get(20)?;
        j["result"] = result.and_then(|s| serde_json::from_str(&s).ok()).unwrap_or(Json::Null);
        let email: String = r.get(25)?;
        j["email"] = serde_json::from_str(&email).unwrap_or(Json::Null);
    }
    Ok(j)
}

/// One message (with its email table and handler result; `raw` adds the message as text).
pub fn get(c: &Connection, id: &str, user: Option<&str>, raw: bool) -> Result<Option<Json>> {
    let row = c
        .prepare(&format!("SELECT {COLUMNS}, raw FROM _ichibase_email_in WHERE id = ?1 AND (?2 IS NULL OR user_id = ?2)"))?
        .query_row(params![id, user], |r| {
            let mut j = row_json(r, true)?;
            if raw {
                let b: Vec<u8> = r.get(26)?;
                j["raw"] = Json::String(String::from_utf8_lossy(&b).into_owned());
            }
            Ok(j)
        })
        .optional()?;
    Ok(row)
}

/// Filters of a listing.
#[derive(Debug, Default)]
pub struct ListQuery {
    pub status: Option<String>,
    pub recipient: Option<String>,
    /// Newest first, at most this many (default 100, at most 1000).
    pub limit: Option<u32>,
    /// Only messages stored before this one (paging).
    pub before: Option<String>,
}

/// Messages, newest first (`user`: only that user's).
pub fn list(c: &Connection, user: Option<&str>, q: &ListQuery) -> Result<Vec<Json>> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let mut st = c.prepare(&format!(
        "SELECT {COLUMNS} FROM _ichibase_email_in
          WHERE (?1 IS NULL OR user_id = ?1) AND (?2 IS NULL OR status = ?2) AND (?3 IS NULL OR recipient = ?3)
            AND (?4 IS NULL OR rowid < (SELECT rowid FROM _ichibase_email_in WHERE id = ?4))
          ORDER BY rowid DESC LIMIT ?5"
    ))?;
    let rows = st.query_map(params![user, q.status, q.recipient, q.before, limit], |r| row_json(r, false))?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// Counts by status.
pub fn counts(c: &Connection) -> Result<Json> {
    let mut st = c.prepare("SELECT status, count(*) FROM _ichibase_email_in GROUP BY status")?;
    let mut m = serde_json::Map::new();
    for s in ["pending", "running", "handled", "failed", "quarantined"] {
        m.insert(s.into(), json!(0));
    }
    for row in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
        let (s, n) = row?;
        m.insert(s, json!(n));
    }
    Ok(Json::Object(m))
}
