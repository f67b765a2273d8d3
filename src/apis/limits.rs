//! The `[http]` and `[sql_guard]` sections: limits of the HTTP front (connections, timeouts,
//! streaming to slow clients) and of SQL requests (fair share of the connection pool per
//! identity, how long a write may hold the writer, value and buffer sizes, SQLite's heap), and
//! the state they share across requests.
//!
//! Owns these settings and their counters; it does not serve requests itself.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::core::{Error, ErrorCode, RequestContext, Role};
use crate::sql::spool::SpoolLimits;

/// `[http]` in ichibase.toml (or `ICHIBASE_HTTP__<KEY>`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Bytes of a streamed result one request may hold in memory for a slow client before
    /// spilling to a temporary file.
    pub spool_memory: u64,
    /// Bytes of a streamed result one request may hold for a slow client in all.
    pub spool_disk: u64,
    /// Bytes of results all requests together may hold for slow clients.
    pub spool_total: u64,
    /// Seconds a client may take no part of a streamed answer before it is abandoned.
    pub send_timeout_secs: f64,
    /// Open client connections at most (WebSocket connections included). Lowered at start to
    /// the process's file-descriptor limit minus `reserved_fds`.
    pub max_connections: usize,
    /// File descriptors kept free for the database, WAL, analytics, spool files and backups:
    /// the connection cap stays this far below the fd limit.
    pub reserved_fds: u64,
    /// Seconds from a connection's opening (or the first byte of its next request) to the end
    /// of the request's headers; a slower head is dropped (slowloris, sockets that never send).
    pub header_read_timeout_secs: f64,
    /// Seconds a keep-alive connection may sit idle between requests before it is closed.
    pub idle_timeout_secs: f64,
    /// Seconds a connection arriving at the cap waits for a slot (the oldest idle connection
    /// is closed to make room) before it is answered 503 and closed; the listener accepts
    /// nothing else meanwhile.
    pub cap_wait_secs: f64,
    /// Connections the kernel queues for the server to accept (capped by the system, e.g.
    /// net.core.somaxconn); a short queue drops new connections during a burst.
    pub listen_backlog: u32,
    /// Bytes of a JSON request body at most (admin, auth, branches and bundles, generate, a
    /// function's invoke input and rollback); a larger one is refused 413 `REQUEST_TOO_LARGE`.
    pub max_json_body: usize,
    /// Bytes of a function's source at most (`PUT /fn/{name}`); a larger one is refused 413.
    pub max_function_source: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            spool_memory: 8 << 20,
            spool_disk: 1 << 30,
            spool_total: 4 << 30,
            send_timeout_secs: 60.0,
            max_connections: 10_000,
            reserved_fds: 256,
            header_read_timeout_secs: 10.0,
            idle_timeout_secs: 60.0,
            cap_wait_secs: 1.0,
            listen_backlog: 4096,
            max_json_body: 16 << 20,
            max_function_source: crate::lua::store::MAX_SOURCE,
        }
    }
}

/// The `[http]` settings and the counters requests share.
#[derive(Debug)]
pub struct HttpLimits {
    pub settings: HttpSettings,
    spooled: Arc<AtomicU64>,
}

impl HttpLimits {
    pub fn new(settings: HttpSettings) -> anyhow::Result<HttpLimits> {
        anyhow::ensure!(
            settings.send_timeout_secs > 0.0 && settings.send_timeout_secs.is_finite(),
            "[http] send_timeout_secs must be a positive number of seconds"
        );
        anyhow::ensure!(
            settings.spool_memory <= settings.spool_disk && settings.spool_disk <= settings.spool_total,
            "[http] needs spool_memory <= spool_disk <= spool_total"
        );
        for (name, v) in [
            ("header_read_timeout_secs", settings.header_read_timeout_secs),
            ("idle_timeout_secs", settings.idle_timeout_secs),
        ] {
            anyhow::ensure!(
                v > 0.0 && v.is_finite() && v < 1e9,
                "[http] {name} must be a positive number of seconds (got {v})"
            );
        }
        anyhow::ensure!(
            settings.cap_wait_secs >= 0.0 && settings.cap_wait_secs.is_finite() && settings.cap_wait_secs < 1e9,
            "[http] cap_wait_secs must be zero or a positive number of seconds"
        );
        anyhow::ensure!(settings.max_connections >= 1, "[http] max_connections must be at least 1");
        anyhow::ensure!(
            (1..=i32::MAX as u32).contains(&settings.listen_backlog),
            "[http] listen_backlog must be between 1 and {}",
            i32::MAX
        );
        anyhow::ensure!(settings.max_json_body >= 1, "[http] max_json_body must be positive");
        anyhow::ensure!(
            settings.max_function_source >= 1,
            "[http] max_function_source must be positive"
        );
        Ok(HttpLimits {
            settings,
            spooled: Arc::default(),
        })
    }

    /// The connection limits for a process allowed `fd_limit` open files: `max_connections`,
    /// lowered so that `reserved_fds` descriptors stay free.
    pub fn connections(&self, fd_limit: u64) -> Result<crate::conns::ConnLimits, ConnCapError> {
        let s = &self.settings;
        let room = fd_limit.saturating_sub(s.reserved_fds);
        if room < 1 {
            return Err(ConnCapError::NoRoom {
                fd_limit,
                reserved: s.reserved_fds,
            });
        }
        let cap = (s.max_connections as u64).min(room) as usize;
        Ok(crate::conns::ConnLimits {
            cap,
            configured: s.max_connections,
            header_read_timeout: Duration::from_secs_f64(s.header_read_timeout_secs),
            idle_timeout: Duration::from_secs_f64(s.idle_timeout_secs),
            cap_wait: Duration::from_secs_f64(s.cap_wait_secs),
            backlog: s.listen_backlog,
        })
    }

    /// Bounds for one streamed answer.
    pub fn spool(&self) -> SpoolLimits {
        let s = &self.settings;
        SpoolLimits {
            memory: s.spool_memory,
            per_request: s.spool_disk,
            total: Arc::clone(&self.spooled),
            total_limit: s.spool_total,
            send_timeout: Duration::from_secs_f64(s.send_timeout_secs),
        }
    }
}

/// `[sql_guard]` in ichibase.toml (or `ICHIBASE_SQL_GUARD__<KEY>`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SqlGuardSettings {
    /// Seconds a non-admin write may hold the single writer once it starts (the rest of the
    /// request's `max_execution_time` does not extend it).
    pub write_timeout_secs: f64,
    /// Largest string or blob a non-admin statement may build (`randomblob`, `zeroblob`,
    /// concatenation), bytes.
    pub max_value_bytes: usize,
    /// Largest answer held whole in memory (writes with RETURNING, `wait_end_of_query=1`),
    /// bytes; larger answers of reads stream.
    pub max_buffered_result_bytes: usize,
    /// SQLite's hard heap limit for the whole process, bytes (0: none). An allocation over it
    /// fails the statement with MEMORY_LIMIT_EXCEEDED instead of growing the process.
    pub sqlite_heap_limit: i64,
    /// Queries one identity (a user, or a non-admin API key) may run at once; 0: half the reader
    /// pool (at least 1). The admin is not limited.
    pub max_queries_per_identity: usize,
    /// Queries all anonymous clients together may run at once; 0: half the reader pool.
    pub max_anon_queries: usize,
    /// Seconds a query waits for its identity's turn before 429 TOO_MANY_SIMULTANEOUS_QUERIES.
    pub queue_wait_secs: f64,
}

impl Default for SqlGuardSettings {
    fn default() -> Self {
        SqlGuardSettings {
            write_timeout_secs: 5.0,
            max_value_bytes: 64 << 20,
            max_buffered_result_bytes: 64 << 20,
            sqlite_heap_limit: 2 << 30,
            max_queries_per_identity: 0,
            max_anon_queries: 0,
            queue_wait_secs: 5.0,
        }
    }
}

/// Per-identity concurrency of SQL requests: a semaphore per identity, so that no single
/// client (and not all anonymous clients together) can occupy the whole connection pool.
#[derive(Debug)]
pub struct SqlGuard {
    pub settings: SqlGuardSettings,
    per_identity: usize,
    anon: usize,
    slots: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl SqlGuard {
    pub fn new(settings: SqlGuardSettings, readers: usize) -> anyhow::Result<SqlGuard> {
        let pos = |v: f64| v > 0.0 && v.is_finite();
        anyhow::ensure!(
            pos(settings.write_timeout_secs) && pos(settings.queue_wait_secs),
            "[sql_guard] write_timeout_secs and queue_wait_secs must be positive numbers of seconds"
        );
        anyhow::ensure!(
            settings.max_value_bytes >= 1024 && settings.max_buffered_result_bytes >= 1024,
            "[sql_guard] max_value_bytes and max_buffered_result_bytes must be at least 1024"
        );
        anyhow::ensure!(
            settings.sqlite_heap_limit == 0 || settings.sqlite_heap_limit >= 64 << 20,
            "[sql_guard] sqlite_heap_limit must be 0 (none) or at least 64 MiB"
        );
        let half = (readers / 2).max(1);
        let pick = |v: usize| if v == 0 { half } else { v };
        Ok(SqlGuard {
            per_identity: pick(settings.max_queries_per_identity),
            anon: pick(settings.max_anon_queries),
            settings,
            slots: Mutex::default(),
        })
    }

    /// Install the process-wide SQLite heap limit.
    pub fn apply_heap_limit(&self) {
        if self.settings.sqlite_heap_limit > 0 {
            // SAFETY: sets a process-wide SQLite setting; safe to call at any time.
            unsafe { rusqlite::ffi::sqlite3_hard_heap_limit64(self.settings.sqlite_heap_limit) };
        }
    }

    /// How long a non-admin write may hold the writer.
    pub fn write_limit(&self, ctx: &RequestContext) -> Option<Duration> {
        (!ctx.is_admin()).then(|| Duration::from_secs_f64(self.settings.write_timeout_secs))
    }

    /// Largest value a statement of `ctx` may build (0: SQLite's default, for the admin).
    pub fn value_limit(&self, ctx: &RequestContext) -> usize {
        if ctx.is_admin() { 0 } else { self.settings.max_value_bytes }
    }

    /// Wait for the caller's turn; `None` for the admin (not limited).
    pub async fn admit(&self, ctx: &RequestContext) -> Result<Option<OwnedSemaphorePermit>, Error> {
        let (key, n) = match (&ctx.role, &ctx.user_id) {
            (Role::Admin, _) => return Ok(None),
            (Role::Anon, _) => ("anon".to_string(), self.anon),
            (_, Some(u)) => (format!("user:{u}"), self.per_identity),
            (r, None) => (
                format!("role:{}:{}", r.as_str(), ctx.session_id.as_deref().unwrap_or("")),
                self.per_identity,
            ),
        };
        let sem = {
            let mut slots = self.slots.lock().unwrap();
            // Forget identities with nothing running (keeps the map small).
            if slots.len() > 4096 {
                slots.retain(|_, s| Arc::strong_count(s) > 1 || s.available_permits() == 0);
            }
            Arc::clone(slots.entry(key).or_insert_with(|| Arc::new(Semaphore::new(n))))
        };
        let wait = Duration::from_secs_f64(self.settings.queue_wait_secs);
        match tokio::time::timeout(wait, sem.acquire_owned()).await {
            Ok(Ok(p)) => Ok(Some(p)),
            _ => Err(Error::new(
                ErrorCode::TooManyRequests,
                format!(
                    "Too many simultaneous queries for this {}: at most {n} at once ({} in the [sql_guard] section); retry later",
                    if ctx.role == Role::Anon { "server's anonymous clients" } else { "identity" },
                    if ctx.role == Role::Anon { "max_anon_queries" } else { "max_queries_per_identity" },
                ),
            )),
        }
    }
}

/// Why no connection cap fits under the file-descriptor limit.
#[derive(Debug, thiserror::Error)]
pub enum ConnCapError {
    #[error(
        "[http] reserved_fds ({reserved}) leaves no file descriptors for connections under the \
         process's limit of {fd_limit}: raise the limit (ulimit -n) or lower reserved_fds"
    )]
    NoRoom { fd_limit: u64, reserved: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, reserved: u64) -> HttpLimits {
        HttpLimits::new(HttpSettings {
            max_connections: max,
            reserved_fds: reserved,
            ..HttpSettings::default()
        })
        .unwrap()
    }

    #[test]
    fn the_cap_stays_below_the_fd_limit() {
        assert_eq!(limits(10_000, 256).connections(1024).unwrap().cap, 768);
        assert_eq!(limits(64, 256).connections(1024).unwrap().cap, 64);
        assert_eq!(limits(10_000, 256).connections(1 << 20).unwrap().cap, 10_000);
        assert!(matches!(
            limits(10, 256).connections(200),
            Err(ConnCapError::NoRoom { fd_limit: 200, reserved: 256 })
        ));
    }

    #[test]
    fn bad_timeouts_are_refused() {
        for s in [
            HttpSettings { header_read_timeout_secs: 0.0, ..HttpSettings::default() },
            HttpSettings { idle_timeout_secs: f64::NAN, ..HttpSettings::default() },
            HttpSettings { cap_wait_secs: -1.0, ..HttpSettings::default() },
            HttpSettings { max_connections: 0, ..HttpSettings::default() },
        ] {
            assert!(HttpLimits::new(s).is_err());
        }
    }

    fn ctx(role: &str, user: Option<&str>, session: Option<&str>) -> RequestContext {
        let mut c = RequestContext::new(None, Role::from_name(role));
        c.user_id = user.map(String::from);
        c.session_id = session.map(String::from);
        c
    }

    #[test]
    fn http_settings_are_validated() {
        assert!(HttpLimits::new(HttpSettings::default()).is_ok());
        for bad in [
            HttpSettings { send_timeout_secs: 0.0, ..Default::default() },
            HttpSettings { send_timeout_secs: f64::INFINITY, ..Default::default() },
            HttpSettings { spool_memory: 2 << 30, ..Default::default() },
            HttpSettings { spool_disk: 8 << 30, ..Default::default() },
        ] {
            assert!(HttpLimits::new(bad.clone()).is_err(), "{bad:?}");
        }
        let l = HttpLimits::new(HttpSettings::default()).unwrap();
        let s = l.spool();
        assert_eq!((s.memory, s.per_request, s.total_limit), (8 << 20, 1 << 30, 4 << 30));
        assert_eq!(s.send_timeout, Duration::from_secs(60));
        assert!(Arc::ptr_eq(&s.total, &l.spool().total), "every answer shares one counter");
    }

    #[test]
    fn sql_guard_settings_are_validated_and_default_to_half_the_pool() {
        for bad in [
            SqlGuardSettings { write_timeout_secs: 0.0, ..Default::default() },
            SqlGuardSettings { queue_wait_secs: f64::NAN, ..Default::default() },
            SqlGuardSettings { max_value_bytes: 1023, ..Default::default() },
            SqlGuardSettings { max_buffered_result_bytes: 10, ..Default::default() },
            SqlGuardSettings { sqlite_heap_limit: 1 << 20, ..Default::default() },
        ] {
            assert!(SqlGuard::new(bad.clone(), 8).is_err(), "{bad:?}");
        }
        assert!(SqlGuard::new(SqlGuardSettings { sqlite_heap_limit: 0, ..Default::default() }, 8).is_ok());
        let g = SqlGuard::new(SqlGuardSettings::default(), 8).unwrap();
        assert_eq!((g.per_identity, g.anon), (4, 4));
        let g = SqlGuard::new(SqlGuardSettings::default(), 1).unwrap();
        assert_eq!((g.per_identity, g.anon), (1, 1));
        let g = SqlGuard::new(
            SqlGuardSettings { max_queries_per_identity: 3, max_anon_queries: 7, ..Default::default() },
            8,
        )
        .unwrap();
        assert_eq!((g.per_identity, g.anon), (3, 7));
    }

    #[test]
    fn the_admin_is_not_limited() {
        let g = SqlGuard::new(SqlGuardSettings::default(), 8).unwrap();
        let admin = RequestContext::system();
        let user = ctx("user", Some("u"), None);
        assert_eq!(g.write_limit(&admin), None);
        assert_eq!(g.write_limit(&user), Some(Duration::from_secs(5)));
        assert_eq!(g.value_limit(&admin), 0);
        assert_eq!(g.value_limit(&user), 64 << 20);
    }

    #[tokio::test]
    async fn each_identity_gets_its_own_share_and_anonymous_clients_share_one() {
        let g = SqlGuard::new(
            SqlGuardSettings {
                max_queries_per_identity: 1,
                max_anon_queries: 1,
                queue_wait_secs: 0.01,
                ..Default::default()
            },
            8,
        )
        .unwrap();
        assert!(g.admit(&RequestContext::system()).await.unwrap().is_none());

        let alice = g.admit(&ctx("user", Some("alice"), None)).await.unwrap();
        assert!(alice.is_some());
        let e = g.admit(&ctx("editor", Some("alice"), None)).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::TooManyRequests);
        assert!(e.message.contains("max_queries_per_identity"), "{}", e.message);
        let _bob = g.admit(&ctx("user", Some("bob"), None)).await.unwrap();

        let _anon = g.admit(&RequestContext::anon(None)).await.unwrap();
        let e = g.admit(&RequestContext::anon(Some("other".into()))).await.unwrap_err();
        assert!(e.message.contains("max_anon_queries"), "{}", e.message);

        // Keys without a user are told apart by role and session.
        let _k1 = g.admit(&ctx("svc", None, Some("s1"))).await.unwrap();
        let _k2 = g.admit(&ctx("svc", None, Some("s2"))).await.unwrap();
        assert!(g.admit(&ctx("svc", None, Some("s1"))).await.is_err());

        drop(alice);
        assert!(g.admit(&ctx("user", Some("alice"), None)).await.is_ok());
    }
}
