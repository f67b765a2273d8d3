//! Per-connection state installed at check-out and cleared at check-in: the request context and
//! the execution control (deadline + cancel flag) that SQLite's progress handler polls.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use rusqlite::functions::{Context, FunctionFlags};
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::types::{ToSqlOutput, Value};

use super::authz::Authz;
use crate::core::Role;

use crate::core::{Error, ErrorCode, RequestContext};

/// Set once the server begins to shut down: running reads stop at once.
static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);

/// The server is shutting down: every execution that is not a write in progress stops at its
/// next check (reads, and work waiting for a connection); writes finish or roll back.
pub fn begin_shutdown() {
    SHUTTING_DOWN.store(true, Ordering::Relaxed);
}

/// Limits of one execution: an absolute deadline and a cancel flag (set when the client goes
/// away). Shared between the request's async side and the thread that runs SQLite.
#[derive(Debug)]
pub struct ExecControl {
    pub deadline: Option<Instant>,
    pub max_execution_time: f64,
    /// Largest string or blob SQLite may build for this execution (0: SQLite's default).
    pub value_limit: usize,
    /// Longest this execution may hold the single writer once its write job starts (`None`:
    /// only the overall deadline applies). Set for non-admin requests so one client cannot
    /// keep everyone's writes waiting until the global time-out.
    pub write_limit: Option<Duration>,
    /// The writer-hold deadline, set when the write job starts.
    write_deadline: Mutex<Option<Instant>>,
    cancelled: AtomicBool,
    timed_out: AtomicBool,
    write_timed_out: AtomicBool,
    /// A write job of this execution is running on the writer.
    writing: AtomicBool,
}

impl ExecControl {
    /// `max_execution_time` in seconds from `start`; 0 means no deadline.
    pub fn new(start: Instant, max_execution_time: f64) -> Arc<Self> {
        let deadline =
            (max_execution_time > 0.0).then(|| start + Duration::from_secs_f64(max_execution_time));
        Arc::new(ExecControl {
            deadline,
            max_execution_time,
            value_limit: 0,
            write_limit: None,
            write_deadline: Mutex::new(None),
            cancelled: AtomicBool::new(false),
            timed_out: AtomicBool::new(false),
            write_timed_out: AtomicBool::new(false),
            writing: AtomicBool::new(false),
        })
    }

    /// Limits of a request's own work: the overall deadline, a cap on value sizes (0: SQLite's
    /// default) and on how long a write job may hold the writer (`None`: no cap).
    pub fn for_request(
        start: Instant,
        max_execution_time: f64,
        value_limit: usize,
        write_limit: Option<Duration>,
    ) -> Arc<Self> {
        let mut c = Arc::into_inner(Self::new(start, max_execution_time)).expect("fresh");
        c.value_limit = value_limit;
        c.write_limit = write_limit;
        Arc::new(c)
    }

    /// The engine's own look-ups done for a request (identities, function sources): they wait
    /// for a connection at most this long, never without a deadline.
    pub fn lookup() -> Arc<Self> {
        Self::new(Instant::now(), LOOKUP_SECS)
    }

    /// Called when the write job starts on the writer: from now on the write limit runs.
    pub fn begin_write(&self) {
        self.writing.store(true, Ordering::Relaxed);
        if let Some(l) = self.write_limit {
            *self.write_deadline.lock().unwrap() = Some(Instant::now() + l);
        }
    }

    /// The same limits with a cap on the size of values SQLite builds (e.g. `zeroblob(1e9)`).
    pub fn with_value_limit(
        start: Instant,
        max_execution_time: f64,
        value_limit: usize,
    ) -> Arc<Self> {
        Self::for_request(start, max_execution_time, value_limit, None)
    }

    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// True once the work should stop; remembers whether the deadline was the reason.
    pub fn should_stop(&self) -> bool {
        if self.cancelled.load(Ordering::Relaxed) {
            return true;
        }
        if SHUTTING_DOWN.load(Ordering::Relaxed) && !self.writing.load(Ordering::Relaxed) {
            self.cancelled.store(true, Ordering::Relaxed);
            return true;
        }
        if self.write_limit.is_some() {
            if let Some(d) = *self.write_deadline.lock().unwrap() {
                if Instant::now() >= d {
                    self.write_timed_out.store(true, Ordering::Relaxed);
                    return true;
                }
            }
        }
        if let Some(d) = self.deadline {
            if Instant::now() >= d {
                self.timed_out.store(true, Ordering::Relaxed);
                return true;
            }
        }
        false
    }

    /// Check before starting (or between steps of) work that does not run SQLite's VM.
    pub fn check(&self) -> Result<(), Error> {
        if self.should_stop() {
            Err(self.stop_error())
        } else {
            Ok(())
        }
    }

    /// The error to report once [`should_stop`](Self::should_stop) fired.
    pub fn stop_error(&self) -> Error {
        if self.write_timed_out.load(Ordering::Relaxed) && !self.is_cancelled() {
            return Error::new(
                ErrorCode::TimeoutExceeded,
                format!(
                    "Timeout exceeded: a write may hold the database writer for at most {} seconds (write_timeout_secs in the [sql_guard] section); the transaction was rolled back",
                    self.write_limit.unwrap_or_default().as_secs_f64()
                ),
            );
        }
        if self.timed_out.load(Ordering::Relaxed)
            || (!self.is_cancelled() && self.deadline.is_some_and(|d| Instant::now() >= d))
        {
            Error::new(
                ErrorCode::TimeoutExceeded,
                format!(
                    "Timeout exceeded: maximum execution time is {} seconds (max_execution_time)",
                    self.max_execution_time
                ),
            )
        } else {
            Error::new(
                ErrorCode::QueryWasCancelled,
                "Query was cancelled (client disconnected or server shutting down)",
            )
        }
    }

    /// Turn an error raised while this control was active into the right one: SQLite reports an
    /// interrupt as a generic error, which is a time-out or a cancel here.
    pub fn map_error(&self, e: Error) -> Error {
        if e.code == ErrorCode::QueryWasCancelled || e.message.contains("interrupted") {
            self.stop_error()
        } else {
            e
        }
    }
}

thread_local! {
    /// Set while engine code runs its own statements on a connection that has a request's
    /// context installed (see [`engine_statements`]).
    static ENGINE_STATEMENTS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` (on the thread that owns the connection) with the authorizer letting every statement
/// through: for a module writing its own engine rows inside a caller's open transaction (the
/// notify outbox row in `db.tx`, a workflow's journal row committed with its step's writes). `f` must prepare only its own fixed statements, uncached
/// (`Connection::prepare`, not `prepare_cached`): a cached statement would keep the
/// authorization it was prepared with.
pub fn engine_statements<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            ENGINE_STATEMENTS.with(|e| e.set(self.0));
        }
    }
    let _reset = Reset(ENGINE_STATEMENTS.with(|e| e.replace(true)));
    f()
}

/// What a connection knows about the request it currently serves.
pub struct ConnState {
    authz: Arc<Authz>,
    /// Authorization snapshot generation the cached statements were prepared under.
    last_authz_gen: Mutex<u64>,
    control: Mutex<Option<Arc<ExecControl>>>,
    ctx: Mutex<Option<RequestContext>>,
    /// Why the authorizer refused the last statement, to replace SQLite's bare "not authorized".
    denial: Mutex<Option<String>>,
    /// Role of the previous check-out: prepared statements are authorised when prepared, so the
    /// statement cache is flushed whenever the role changes.
    last_role: Mutex<Option<String>>,
    /// Engine work nested inside the request's statement is running (see [`EngineAccess`]).
    engine: AtomicU32,
}

/// Held while the engine runs its own statements nested inside a request's statement (the
/// `search()` SQL function reading its FTS5 index): the authorizer allows everything on this
/// connection until it is dropped. The nested SQL is the engine's, never the caller's; the
/// caller's identity stays installed, so policy views read inside it still filter by it.
pub struct EngineAccess<'a>(&'a ConnState);

impl Drop for EngineAccess<'_> {
    fn drop(&mut self) {
        self.0.engine.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Seconds an engine look-up for a request waits for a connection at most.
const LOOKUP_SECS: f64 = 30.0;

/// SQLite's default SQLITE_LIMIT_LENGTH (restored for executions without a value limit).
const DEFAULT_MAX_LENGTH: i32 = 1_000_000_000;

/// PRAGMAs that take an argument without changing connection state.
const ARGUMENT_PRAGMAS: &[&str] = &[
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
    "foreign_key_check",
    "integrity_check",
    "quick_check",
    "wal_checkpoint",
    "optimize",
];

impl ConnState {
    /// Create the state for `conn` and hook SQLite's progress handler to it.
    pub fn install(
        conn: &mut Connection,
        ops: i32,
        authz: Arc<Authz>,
    ) -> rusqlite::Result<Arc<ConnState>> {
        let st = Arc::new(ConnState {
            authz,
            last_authz_gen: Mutex::new(0),
            control: Mutex::new(None),
            ctx: Mutex::new(None),
            denial: Mutex::new(None),
            last_role: Mutex::new(None),
            engine: AtomicU32::new(0),
        });
        let hook = Arc::clone(&st);
        conn.progress_handler(
            ops,
            Some(move || {
                hook.control
                    .lock()
                    .map(|c| c.as_ref().is_some_and(|c| c.should_stop()))
                    .unwrap_or(true)
            }),
        )?;
        let auth = Arc::clone(&st);
        conn.authorizer(Some(move |a: AuthContext<'_>| auth.authorize(&a)))?;
        register_identity_functions(conn, &st)?;
        let s2 = Arc::clone(&st);
        crate::sql::system::register_functions(
            conn,
            Arc::new(move || {
                s2.ctx
                    .lock()
                    .unwrap()
                    .as_ref()
                    .map(crate::sql::system::user_name)
            }),
        )?;
        crate::search::sql::register(conn, &st)?;
        Ok(st)
    }

    /// The authorization snapshot this connection judges statements with.
    pub fn authz(&self) -> &Arc<Authz> {
        &self.authz
    }

    /// Let the engine run its own nested statements unhindered until the guard drops.
    pub fn engine_access(&self) -> EngineAccess<'_> {
        self.engine.fetch_add(1, Ordering::SeqCst);
        EngineAccess(self)
    }

    /// The authorizer: engine work (no request checked out) may do anything; request SQL may
    /// not change state that would outlive the request on a pooled connection.
    fn authorize(&self, a: &AuthContext<'_>) -> Authorization {
        // The engine's own statements: a module's fixed statements on a caller's session
        // (`engine_statements`: the notify outbox row, a workflow's journal row), nested
        // statements of engine SQL functions (`engine_access`: search).
        if ENGINE_STATEMENTS.with(|e| e.get()) || self.engine.load(Ordering::SeqCst) > 0 {
            return Authorization::Allow;
        }
        let role = match self.ctx.lock() {
            Ok(c) => match c.as_ref() {
                None => return Authorization::Allow,
                Some(ctx) if ctx.elevated => return Authorization::Allow,
                Some(ctx) => ctx.role.clone(),
            },
            Err(_) => return Authorization::Deny,
        };
        let why = match &a.action {
            AuthAction::Attach { .. } | AuthAction::Detach { .. } => {
                "ATTACH and DETACH are not allowed over SQL-over-HTTP: an attached database would outlive the request on a pooled connection".to_string()
            }
            AuthAction::CreateTempTable { .. }
            | AuthAction::CreateTempIndex { .. }
            | AuthAction::CreateTempTrigger { .. }
            | AuthAction::CreateTempView { .. } => {
                "TEMP tables, views, triggers and indexes are not allowed over SQL-over-HTTP: they would outlive the request on a pooled connection; use a CTE or a regular table".to_string()
            }
            AuthAction::Pragma { pragma_name, pragma_value: Some(_) }
                if !ARGUMENT_PRAGMAS.iter().any(|p| p.eq_ignore_ascii_case(pragma_name)) =>
            {
                format!("PRAGMA {pragma_name} with a value changes connection state and is not allowed over SQL-over-HTTP")
            }
            _ => match role {
                Role::Admin => return Authorization::Allow,
                _ => match self.authz.decide(role.as_str(), a) {
                    Ok(()) => return Authorization::Allow,
                    Err(why) => why,
                },
            },
        };
        let mut d = self.denial.lock().unwrap();
        if d.is_none() {
            *d = Some(why);
        }
        Authorization::Deny
    }

    /// Install `ctx` and `control` on this connection. For non-admin roles the authorization
    /// snapshot is refreshed first; prepared statements are flushed whenever the role or the
    /// snapshot changed, because SQLite authorises a statement when it is prepared.
    pub fn check_out(
        &self,
        conn: &Connection,
        ctx: RequestContext,
        control: Arc<ExecControl>,
    ) -> Result<(), Error> {
        let role = ctx.role.as_str().to_string();
        let mut flush = false;
        if ctx.role != Role::Admin {
            let generation = self.authz.refresh(conn).map_err(Error::from)?;
            let mut last = self.last_authz_gen.lock().unwrap();
            if *last != generation {
                *last = generation;
                flush = true;
            }
        }
        let mut last = self.last_role.lock().unwrap();
        if last.as_deref() != Some(role.as_str()) {
            *last = Some(role);
            flush = true;
        }
        if flush {
            conn.flush_prepared_statement_cache();
        }
        *self.denial.lock().unwrap() = None;
        let length = if control.value_limit > 0 {
            control.value_limit.min(i32::MAX as usize) as i32
        } else {
            DEFAULT_MAX_LENGTH
        };
        let _ = conn.set_limit(rusqlite::limits::Limit::SQLITE_LIMIT_LENGTH, length);
        *self.ctx.lock().unwrap() = Some(ctx);
        *self.control.lock().unwrap() = Some(control);
        Ok(())
    }

    /// Replace SQLite's bare "not authorized" with the authorizer's reason.
    pub fn explain(&self, e: Error) -> Error {
        match self.denial.lock().unwrap().take() {
            Some(why)
                if e.message.contains("not authorized") || e.message.contains("prohibited") =>
            {
                Error::new(ErrorCode::AccessDenied, why)
            }
            _ => e,
        }
    }

    pub fn check_in(&self) {
        *self.ctx.lock().unwrap() = None;
        *self.control.lock().unwrap() = None;
    }

    /// The context of the request this connection serves now (None between requests).
    pub fn context(&self) -> Option<RequestContext> {
        self.ctx.lock().unwrap().clone()
    }
}

/// `auth_userid()`, `auth_role()` and `auth_claim(name)`: the identity of the request the
/// connection serves now (NULL outside requests; `auth_userid()` NULL when anonymous).
fn register_identity_functions(conn: &Connection, st: &Arc<ConnState>) -> rusqlite::Result<()> {
    let flags = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_INNOCUOUS;
    let s = Arc::clone(st);
    conn.create_scalar_function("auth_userid", 0, flags, move |_c: &mut Context<'_>| {
        Ok(s.ctx
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|c| c.user_id.clone()))
    })?;
    let s = Arc::clone(st);
    conn.create_scalar_function("auth_role", 0, flags, move |_c: &mut Context<'_>| {
        Ok(s.ctx
            .lock()
            .unwrap()
            .as_ref()
            .map(|c| c.role.as_str().to_string()))
    })?;
    let s = Arc::clone(st);
    conn.create_scalar_function("auth_claim", 1, flags, move |c: &mut Context<'_>| {
        let name: String = c.get(0)?;
        let guard = s.ctx.lock().unwrap();
        let v = guard.as_ref().and_then(|ctx| ctx.claim(&name).cloned());
        Ok(match v {
            None | Some(serde_json::Value::Null) => ToSqlOutput::Owned(Value::Null),
            Some(serde_json::Value::Bool(b)) => ToSqlOutput::Owned(Value::Integer(b as i64)),
            Some(serde_json::Value::Number(n)) => ToSqlOutput::Owned(match n.as_i64() {
                Some(i) => Value::Integer(i),
                None => Value::Real(n.as_f64().unwrap_or(f64::NAN)),
            }),
            Some(serde_json::Value::String(t)) => ToSqlOutput::Owned(Value::Text(t)),
            Some(other) => ToSqlOutput::Owned(Value::Text(other.to_string())),
        })
    })?;
    Ok(())
}

/// Leave the connection as a fresh one: no open transaction, no request state.
pub(super) fn reset(conn: &Connection, st: &ConnState) {
    if !conn.is_autocommit() {
        if let Err(e) = conn.execute_batch("ROLLBACK") {
            tracing::error!(error = %e, "rollback at check-in failed");
        }
    }
    st.check_in();
}
