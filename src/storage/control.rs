//! Per-connection state installed at check-out and cleared at check-in: the request context and
//! the execution control (deadline + cancel flag) that SQLite's progress handler polls.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};

use crate::core::{Error, ErrorCode, RequestContext};

/// Limits of one execution: an absolute deadline and a cancel flag (set when the client goes
/// away). Shared between the request's async side and the thread that runs SQLite.
#[derive(Debug)]
pub struct ExecControl {
    pub deadline: Option<Instant>,
    pub max_execution_time: f64,
    cancelled: AtomicBool,
    timed_out: AtomicBool,
}

impl ExecControl {
    /// `max_execution_time` in seconds from `start`; 0 means no deadline.
    pub fn new(start: Instant, max_execution_time: f64) -> Arc<Self> {
        let deadline = (max_execution_time > 0.0).then(|| start + Duration::from_secs_f64(max_execution_time));
        Arc::new(ExecControl { deadline, max_execution_time, cancelled: AtomicBool::new(false), timed_out: AtomicBool::new(false) })
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
        if self.should_stop() { Err(self.stop_error()) } else { Ok(()) }
    }

    /// The error to report once [`should_stop`](Self::should_stop) fired.
    pub fn stop_error(&self) -> Error {
        if self.timed_out.load(Ordering::Relaxed) || (!self.is_cancelled() && self.deadline.is_some_and(|d| Instant::now() >= d)) {
            Error::new(
                ErrorCode::TimeoutExceeded,
                format!("Timeout exceeded: maximum execution time is {} seconds (max_execution_time)", self.max_execution_time),
            )
        } else {
            Error::new(ErrorCode::QueryWasCancelled, "Query was cancelled (client disconnected or server shutting down)")
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

/// What a connection knows about the request it currently serves.
#[derive(Default)]
pub struct ConnState {
    control: Mutex<Option<Arc<ExecControl>>>,
    ctx: Mutex<Option<RequestContext>>,
    /// Why the authorizer refused the last statement, to replace SQLite's bare "not authorized".
    denial: Mutex<Option<String>>,
    /// Role of the previous check-out: prepared statements are authorised when prepared, so the
    /// statement cache is flushed whenever the role changes.
    last_role: Mutex<Option<String>>,
}

/// PRAGMAs that take an argument without changing connection state.
const ARGUMENT_PRAGMAS: &[&str] = &[
    "table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo", "foreign_key_list",
    "foreign_key_check", "integrity_check", "quick_check", "wal_checkpoint", "optimize",
];

impl ConnState {
    /// Create the state for `conn` and hook SQLite's progress handler to it.
    pub fn install(conn: &mut Connection, ops: i32) -> rusqlite::Result<Arc<ConnState>> {
        let st = Arc::new(ConnState::default());
        let hook = Arc::clone(&st);
        conn.progress_handler(
            ops,
            Some(move || hook.control.lock().map(|c| c.as_ref().is_some_and(|c| c.should_stop())).unwrap_or(true)),
        )?;
        let auth = Arc::clone(&st);
        conn.authorizer(Some(move |a: AuthContext<'_>| auth.authorize(&a)))?;
        Ok(st)
    }

    /// The authorizer: engine work (no request checked out) may do anything; request SQL may
    /// not change state that would outlive the request on a pooled connection.
    fn authorize(&self, a: &AuthContext<'_>) -> Authorization {
        if self.ctx.lock().map(|c| c.is_none()).unwrap_or(false) {
            return Authorization::Allow;
        }
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
            _ => return Authorization::Allow,
        };
        *self.denial.lock().unwrap() = Some(why);
        Authorization::Deny
    }

    pub fn check_out(&self, conn: &Connection, ctx: RequestContext, control: Arc<ExecControl>) {
        let role = ctx.role.as_str().to_string();
        let mut last = self.last_role.lock().unwrap();
        if last.as_deref() != Some(role.as_str()) {
            conn.flush_prepared_statement_cache();
            *last = Some(role);
        }
        *self.denial.lock().unwrap() = None;
        *self.ctx.lock().unwrap() = Some(ctx);
        *self.control.lock().unwrap() = Some(control);
    }

    /// Replace SQLite's bare "not authorized" with the authorizer's reason.
    pub fn explain(&self, e: Error) -> Error {
        match self.denial.lock().unwrap().take() {
            Some(why) if e.message.contains("not authorized") => Error::new(ErrorCode::AccessDenied, why),
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

/// Leave the connection as a fresh one: no open transaction, no request state.
pub(super) fn reset(conn: &Connection, st: &ConnState) {
    if !conn.is_autocommit() {
        if let Err(e) = conn.execute_batch("ROLLBACK") {
            tracing::error!(error = %e, "rollback at check-in failed");
        }
    }
    st.check_in();
}
