//! Server-wide limits of the Lua runtime, read once at start from two module sections:
//!
//! - `[traces]` ([`TraceSettings`]): who may ask for a deep trace besides the admin and the
//!   function's owner, how large one stored trace may be, how many bytes all traces together
//!   may take (the oldest are pruned), and how long traces are kept.
//! - `[lua_limits]` ([`LuaLimitSettings`]): the time limit of a write transaction opened from
//!   Lua (`db.tx`, and each autocommitted write), and the memory budget all concurrent
//!   invocations share: each invocation reserves its memory limit before it starts, waiting up
//!   to a bound, and is refused with `MEMORY_LIMIT_EXCEEDED` (HTTP 503) otherwise.
//!
//! Owns these settings and the budget's counter ([`MemoryBudget`]); it runs nothing itself.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::core::{Error, ErrorCode, RequestContext, Result};

/// `[traces]` in ichibase.toml (or `ICHIBASE_TRACES__<KEY>`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TraceSettings {
    /// Roles besides `admin` that may trace any function (`?trace=1`) and read the traces they
    /// asked for. The function's owner (who deployed its live version) may always trace it.
    pub debug_roles: Vec<String>,
    /// Most bytes of one stored trace (steps' locals and upvalues, result and logs); the rest
    /// of the run is not recorded and the trace is marked truncated.
    pub max_bytes: u64,
    /// Most bytes all stored traces together may take; saving a trace prunes the oldest ones.
    pub total_bytes: u64,
    /// Seconds a trace is kept.
    pub retention_secs: f64,
    /// Seconds between two prunings of traces past their retention (saving a trace prunes too).
    pub prune_interval_secs: f64,
    /// Which lines a trace keeps: `full` (from the start until `lua_max_trace_steps` or
    /// `max_bytes`) or `ends` (the first `head_steps` and the last `tail_steps`).
    pub mode: TraceMode,
    /// `ends` mode: steps kept from the start (within half of `max_bytes`).
    pub head_steps: usize,
    /// `ends` mode: the most recent steps kept (within half of `max_bytes`), so the lines
    /// before an error at the end of a long run are in the trace.
    pub tail_steps: usize,
    /// Hot-line sampling: each line's first `sample_after` visits in a run are recorded in
    /// full, later visits only at exponentially growing spacing (`sample_after + 2^j`); every
    /// visit is counted and the trace says which were not recorded. 0: record every visit.
    pub sample_after: u32,
    /// Traces waiting to be saved by the background saver; when it is full, the invocation
    /// saves its trace itself before returning (backpressure, nothing is dropped). 0: always
    /// save before returning.
    pub save_queue: usize,
}

/// `[traces] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TraceMode {
    #[default]
    Full,
    Ends,
}

impl Default for TraceSettings {
    fn default() -> Self {
        TraceSettings {
            debug_roles: Vec::new(),
            max_bytes: 4 << 20,
            total_bytes: 256 << 20,
            retention_secs: 3.0 * 86400.0,
            prune_interval_secs: 300.0,
            mode: TraceMode::Full,
            head_steps: 2000,
            tail_steps: 2000,
            sample_after: 100,
            save_queue: 64,
        }
    }
}

impl TraceSettings {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.max_bytes >= 1024 && self.max_bytes <= self.total_bytes,
            "[traces] needs 1024 <= max_bytes <= total_bytes"
        );
        anyhow::ensure!(
            self.retention_secs > 0.0 && self.retention_secs.is_finite(),
            "[traces] retention_secs must be a positive number of seconds"
        );
        anyhow::ensure!(
            self.prune_interval_secs > 0.0 && self.prune_interval_secs.is_finite(),
            "[traces] prune_interval_secs must be a positive number of seconds"
        );
        anyhow::ensure!(
            self.mode == TraceMode::Full || (self.head_steps > 0 || self.tail_steps > 0),
            "[traces] mode = \"ends\" needs head_steps or tail_steps above 0"
        );
        anyhow::ensure!(
            self.save_queue <= 100_000,
            "[traces] save_queue must be at most 100000 traces"
        );
        Ok(())
    }

    /// May `ctx` trace a function whose live version `created_by` deployed?
    pub fn may_trace(&self, ctx: &RequestContext, created_by: Option<&str>) -> bool {
        if ctx.is_admin() || self.debug_roles.iter().any(|r| r == ctx.role.as_str()) {
            return true;
        }
        created_by.is_some_and(|by| ctx.user_id.as_deref() == Some(by))
    }
}

/// The bounds of stored traces, as the store applies them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceLimits {
    pub max_bytes: u64,
    pub total_bytes: u64,
    pub retention_secs: f64,
    pub mode: TraceMode,
    pub head_steps: usize,
    pub tail_steps: usize,
    pub sample_after: u32,
    pub save_queue: usize,
}

impl From<&TraceSettings> for TraceLimits {
    fn from(s: &TraceSettings) -> Self {
        TraceLimits {
            max_bytes: s.max_bytes,
            total_bytes: s.total_bytes,
            retention_secs: s.retention_secs,
            mode: s.mode,
            head_steps: s.head_steps,
            tail_steps: s.tail_steps,
            sample_after: s.sample_after,
            save_queue: s.save_queue,
        }
    }
}

impl Default for TraceLimits {
    fn default() -> Self {
        (&TraceSettings::default()).into()
    }
}

/// `[lua_limits]` in ichibase.toml (or `ICHIBASE_LUA_LIMITS__<KEY>`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LuaLimitSettings {
    /// Seconds a write transaction from Lua may hold the writer: a `db.tx` from its start
    /// (waiting for the writer included) to its commit, and each autocommitted write. Past it
    /// the transaction is rolled back and the invocation ends with `TIMEOUT_EXCEEDED`.
    pub tx_timeout_secs: f64,
    /// Bytes of Lua memory all concurrent invocations may reserve together; each reserves its
    /// memory limit (`lua_memory_limit`) before it starts.
    pub memory_total: u64,
    /// Seconds an invocation waits for its reservation before it is refused (HTTP 503).
    pub memory_wait_secs: f64,
    /// Run untraced invocations in prepared sandboxes reset between runs (`lua::pool`)
    /// instead of building a fresh one per run.
    pub reuse_states: bool,
    /// Microseconds of CPU and wall time an HTTP call (`POST /fn/{name}`, untraced) may first
    /// run on the request's async worker, without the hand-off to a blocking thread. Such a
    /// run may call only host functions that neither block nor act outside the invocation
    /// (`json.encode/decode`, `debug.*`); one that calls another, runs past the
    /// budget or fails is abandoned before that call and made again on a blocking thread.
    /// 0 disables it; at most 10,000 (the run holds an async worker).
    pub inline_budget_us: u64,
}

impl Default for LuaLimitSettings {
    fn default() -> Self {
        LuaLimitSettings {
            tx_timeout_secs: 3.0,
            memory_total: 1 << 30,
            memory_wait_secs: 2.0,
            reuse_states: true,
            inline_budget_us: 1_000,
        }
    }
}

impl LuaLimitSettings {
    pub fn validate(&self, memory_limit: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.tx_timeout_secs > 0.0 && self.tx_timeout_secs.is_finite(),
            "[lua_limits] tx_timeout_secs must be a positive number of seconds"
        );
        anyhow::ensure!(
            self.memory_wait_secs >= 0.0 && self.memory_wait_secs.is_finite(),
            "[lua_limits] memory_wait_secs must be zero or a positive number of seconds"
        );
        anyhow::ensure!(
            self.inline_budget_us <= 10_000,
            "[lua_limits] inline_budget_us must be at most 10000 (an inline run holds an async worker thread), got {}",
            self.inline_budget_us
        );
        anyhow::ensure!(
            self.memory_total >= memory_limit as u64,
            "[lua_limits] memory_total ({}) must be at least lua_memory_limit ({memory_limit})",
            self.memory_total
        );
        Ok(())
    }
}

/// Reservations are counted in units of this many bytes.
const UNIT: u64 = 1 << 20;

/// The memory budget concurrent invocations share.
#[derive(Debug)]
pub struct MemoryBudget {
    sem: Arc<Semaphore>,
    total: u64,
    wait: Duration,
}

impl MemoryBudget {
    pub fn new(total: u64, wait: Duration) -> MemoryBudget {
        let units = (total / UNIT).clamp(1, Semaphore::MAX_PERMITS as u64);
        MemoryBudget {
            sem: Arc::new(Semaphore::new(units as usize)),
            total,
            wait,
        }
    }

    /// Reserve `bytes` until the returned permit drops; waits up to the configured bound.
    pub async fn reserve(&self, bytes: u64) -> Result<OwnedSemaphorePermit> {
        let units = bytes
            .div_ceil(UNIT)
            .clamp(1, (self.total / UNIT).max(1))
            .min(u32::MAX as u64) as u32;
        let acquire = Arc::clone(&self.sem).acquire_many_owned(units);
        match tokio::time::timeout(self.wait, acquire).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(Error::internal("the Lua memory budget is closed")),
            Err(_) => Err(Error::new(
                ErrorCode::MemoryLimitExceeded,
                format!(
                    "Lua memory budget exhausted: concurrent invocations hold {} of {} bytes ([lua_limits] memory_total) and none freed {} bytes within {} s ([lua_limits] memory_wait_secs); try again later",
                    self.total
                        .saturating_sub(self.sem.available_permits() as u64 * UNIT),
                    self.total,
                    bytes,
                    self.wait.as_secs_f64()
                ),
            )),
        }
    }
}

/// The Lua limits the API layer needs at run time.
#[derive(Debug)]
pub struct LuaLimits {
    pub traces: TraceSettings,
    pub budget: MemoryBudget,
    /// Function versions whose inline attempt a limit ended (`lua::invoke_inline`).
    pub not_inline: NotInline,
    /// Live function versions as last read (`POST /fn/{name}` looks them up here first).
    pub sources: super::store::SourceCache,
}

impl LuaLimits {
    pub fn new(traces: TraceSettings, lua: &LuaLimitSettings) -> LuaLimits {
        LuaLimits {
            traces,
            budget: MemoryBudget::new(
                lua.memory_total,
                Duration::from_secs_f64(lua.memory_wait_secs),
            ),
            not_inline: NotInline::default(),
            sources: Default::default(),
        }
    }
}

/// Function versions sent straight to a blocking thread: their inline attempt called a host
/// function that needs one, or ran past the budget. A hint only (bounded: forgotten when
/// full); a new version of a function is tried inline again.
#[derive(Debug, Default)]
pub struct NotInline(std::sync::Mutex<std::collections::HashMap<String, Vec<i64>>>);

impl NotInline {
    /// Functions remembered at most.
    const MAX: usize = 4096;

    /// Looked up by `&str`: no allocation on the call path.
    pub fn contains(&self, name: &str, version: i64) -> bool {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(name).is_some_and(|v| v.contains(&version))
    }

    pub fn insert(&self, name: &str, version: i64) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= Self::MAX {
            map.clear();
        }
        let versions = map.entry(name.to_string()).or_default();
        if !versions.contains(&version) {
            versions.push(version);
        }
    }
}

impl Default for LuaLimits {
    fn default() -> Self {
        LuaLimits::new(TraceSettings::default(), &LuaLimitSettings::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Role;

    fn ctx(role: &str, user: Option<&str>) -> RequestContext {
        let mut c = RequestContext::new(None, Role::from_name(role));
        c.user_id = user.map(String::from);
        c
    }

    #[test]
    fn admin_debug_roles_and_the_owner_may_trace() {
        let s = TraceSettings {
            debug_roles: vec!["dev".into()],
            ..Default::default()
        };
        assert!(s.may_trace(&RequestContext::system(), None));
        assert!(s.may_trace(&ctx("dev", Some("d")), Some("someone else")));
        assert!(s.may_trace(&ctx("user", Some("u1")), Some("u1")));
        assert!(!s.may_trace(&ctx("user", Some("u1")), Some("u2")));
        assert!(!s.may_trace(&ctx("user", Some("u1")), None));
        assert!(!s.may_trace(&ctx("user", None), None));
        assert!(!s.may_trace(&RequestContext::anon(None), Some("u1")));
        assert!(!TraceSettings::default().may_trace(&ctx("dev", Some("d")), None));
    }

    #[test]
    fn settings_are_validated() {
        assert!(TraceSettings::default().validate().is_ok());
        for bad in [
            TraceSettings { max_bytes: 1023, ..Default::default() },
            TraceSettings { max_bytes: 2048, total_bytes: 1024, ..Default::default() },
            TraceSettings { retention_secs: 0.0, ..Default::default() },
            TraceSettings { retention_secs: f64::INFINITY, ..Default::default() },
            TraceSettings { prune_interval_secs: -1.0, ..Default::default() },
            TraceSettings { prune_interval_secs: f64::NAN, ..Default::default() },
            TraceSettings { mode: TraceMode::Ends, head_steps: 0, tail_steps: 0, ..Default::default() },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        let ends = TraceSettings { mode: TraceMode::Ends, head_steps: 0, tail_steps: 10, ..Default::default() };
        assert!(ends.validate().is_ok());
        let t: TraceLimits = (&ends).into();
        assert_eq!((t.mode, t.head_steps, t.tail_steps), (TraceMode::Ends, 0, 10));
        // Spelled in lower case in ichibase.toml; anything else is refused.
        let parsed: TraceSettings = toml::from_str("mode = \"ends\"\ntail_steps = 5").unwrap();
        assert_eq!((parsed.mode, parsed.tail_steps, parsed.head_steps), (TraceMode::Ends, 5, 2000));
        assert!(toml::from_str::<TraceSettings>("mode = \"sample\"").is_err());
        let d = LuaLimitSettings::default();
        assert!(d.validate(64 << 20).is_ok());
        assert!(d.validate((d.memory_total + 1) as usize).is_err());
        for bad in [
            LuaLimitSettings { tx_timeout_secs: 0.0, ..Default::default() },
            LuaLimitSettings { tx_timeout_secs: f64::NAN, ..Default::default() },
            LuaLimitSettings { memory_wait_secs: -0.5, ..Default::default() },
        ] {
            assert!(bad.validate(1).is_err(), "{bad:?}");
        }
        assert!(LuaLimitSettings { memory_wait_secs: 0.0, ..Default::default() }.validate(1).is_ok());
        let t: TraceLimits = (&TraceSettings::default()).into();
        assert_eq!(t.max_bytes, 4 << 20);
    }

    #[tokio::test]
    async fn the_memory_budget_refuses_beyond_its_total_and_frees_on_drop() {
        // 4 MiB in all, no waiting.
        let b = MemoryBudget::new(4 * UNIT, Duration::ZERO);
        let p1 = b.reserve(3 * UNIT).await.unwrap();
        let e = b.reserve(2 * UNIT).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::MemoryLimitExceeded);
        assert!(e.message.contains("memory_total"), "{}", e.message);
        // Anything rounds up to at least one unit; one unit is left.
        let p2 = b.reserve(1).await.unwrap();
        assert!(b.reserve(1).await.is_err());
        drop(p1);
        drop(p2);
        // A reservation above the total is capped at the total, so it can run alone.
        let all = b.reserve(100 * UNIT).await.unwrap();
        assert!(b.reserve(1).await.is_err());
        drop(all);
        assert!(b.reserve(4 * UNIT).await.is_ok());
    }

    #[tokio::test]
    async fn a_waiting_reservation_gets_in_when_memory_is_freed() {
        let b = Arc::new(MemoryBudget::new(2 * UNIT, Duration::from_secs(600)));
        let held = b.reserve(2 * UNIT).await.unwrap();
        let waiter = {
            let b = Arc::clone(&b);
            tokio::spawn(async move { b.reserve(UNIT).await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        drop(held);
        waiter.await.unwrap().unwrap();
    }
}
