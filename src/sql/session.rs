//! ClickHouse HTTP sessions (`session_id`, `session_timeout`, `session_check`), as far as
//! clients need them: clickhouse-connect sends a fresh `session_id` with every request by
//! default, and `session_check=1` asks that the session exist already.
//!
//! A session here is a name bound to the identity that opened it, with an expiry: requests in
//! it run exactly as requests without one (every request is its own transaction; there is no
//! per-session `SET` or temporary table, because pooled SQLite connections are shared). The
//! table is bounded: at most [`MAX_SESSIONS`] live sessions, each a few hundred bytes; expired
//! ones are dropped when the table is full, and a full table of live sessions refuses new ones.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use crate::core::{Error, ErrorCode, RequestContext, Result};

/// Live sessions at most (server-wide).
pub const MAX_SESSIONS: usize = 10_000;
/// ClickHouse's `default_session_timeout` and `max_session_timeout`, seconds.
pub const DEFAULT_TIMEOUT: u64 = 60;
pub const MAX_TIMEOUT: u64 = 3600;
const MAX_ID_LEN: usize = 128;

struct Entry {
    owner: String,
    expires: Instant,
}

static SESSIONS: LazyLock<Mutex<HashMap<String, Entry>>> = LazyLock::new(Default::default);

/// What a request asked of its session.
#[derive(Debug, Clone, Default)]
pub struct SessionArgs {
    pub id: Option<String>,
    pub timeout: Option<u64>,
    pub check: bool,
}

fn owner_of(ctx: &RequestContext) -> String {
    format!(
        "{}\0{}",
        ctx.role.as_str(),
        ctx.user_id.as_deref().unwrap_or("")
    )
}

/// Open or renew the request's session; no-op without `session_id`.
pub fn enter(args: &SessionArgs, ctx: &RequestContext) -> Result<()> {
    let Some(id) = args.id.as_deref() else {
        if args.check || args.timeout.is_some() {
            return Err(Error::new(
                ErrorCode::BadArguments,
                "session_timeout and session_check need a session_id",
            ));
        }
        return Ok(());
    };
    if id.is_empty()
        || id.len() > MAX_ID_LEN
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    {
        return Err(Error::new(
            ErrorCode::BadArguments,
            format!("session_id must be 1 to {MAX_ID_LEN} letters, digits, '-', '_', '.' or ':'"),
        ));
    }
    let timeout = args.timeout.unwrap_or(DEFAULT_TIMEOUT);
    if timeout > MAX_TIMEOUT {
        return Err(Error::new(
            ErrorCode::BadArguments,
            format!("session_timeout={timeout} is above the maximum {MAX_TIMEOUT} seconds"),
        ));
    }
    let owner = owner_of(ctx);
    let now = Instant::now();
    let expires = now + Duration::from_secs(timeout);
    let mut map = SESSIONS.lock().unwrap();
    match map.get_mut(id) {
        Some(e) if e.expires > now => {
            if e.owner != owner {
                // Not "exists, owned by someone else": the same answer as a missing session.
                return Err(not_found(id));
            }
            e.expires = expires;
            return Ok(());
        }
        _ if args.check => return Err(not_found(id)),
        _ => {}
    }
    if map.len() >= MAX_SESSIONS {
        map.retain(|_, e| e.expires > now);
        if map.len() >= MAX_SESSIONS {
            return Err(Error::new(
                ErrorCode::TooManyRequests,
                format!(
                    "Too many open HTTP sessions (at most {MAX_SESSIONS}); retry later or send requests without session_id"
                ),
            ));
        }
    }
    map.insert(id.to_string(), Entry { owner, expires });
    Ok(())
}

fn not_found(id: &str) -> Error {
    Error::new(
        ErrorCode::NotFound,
        format!("Session {id} not found (session_check=1), expired, or opened by another user"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(role: crate::core::Role) -> RequestContext {
        RequestContext::new(None, role)
    }

    #[test]
    fn check_owner_and_validation() {
        let admin = ctx(crate::core::Role::Admin);
        let anon = ctx(crate::core::Role::Anon);
        let args = |id: &str, check: bool| SessionArgs {
            id: Some(id.into()),
            timeout: None,
            check,
        };
        assert!(enter(&args("unit-s1", true), &admin).is_err());
        enter(&args("unit-s1", false), &admin).unwrap();
        enter(&args("unit-s1", true), &admin).unwrap();
        assert!(enter(&args("unit-s1", false), &anon).is_err());
        assert!(enter(&args("bad id", false), &admin).is_err());
    }
}
