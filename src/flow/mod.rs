//! Durable workflows and cron (`flow.*`, `/flows/*`).
//!
//! A workflow is a deployed function (`PUT /fn/{name}`, versioned like any function) whose
//! source calls `flow.define(name, function(ctx, input) ... end)` with its own name. An
//! instance is pinned to the function version live when it started. Lua coroutines cannot be
//! persisted, so every run of an instance executes the body from the top and takes the results
//! of finished steps from the instance's journal (`_ichibase_flow_steps`): DBOS's rule — a step
//! runs at least once; a `ctx.tx` step's SQLite writes commit in the same transaction as its
//! journal row, so they apply exactly once.
//!
//! Owns: its engine tables (instances, journal, events, schedules), the `[flow]` section, the
//! `flow` Lua component, the `/flows` routes, the poller that runs due instances on a bounded
//! pool of blocking workers, and the cron scheduler. Must not touch other modules' tables; it
//! reads deployed functions through `lua::store` and runs them through `lua::invoke`, as the
//! identity that started the instance.
//!
//! Files: `run.rs` (one run of one instance and the `ctx` object), `journal.rs` (SQL of the
//! engine tables), `component.rs` (the `flow` Lua global), `cron.rs` (schedules), `http.rs`
//! (routes).

mod component;
pub mod cron;
mod http;
pub mod journal;
mod run;

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use serde::Deserialize;

use crate::app::{App, AppBuilder};
use crate::core::RequestContext;
use crate::lua::components::Component;
use crate::storage::ExecControl;
use crate::storage::migrations::Migration;

pub use run::run_instance;

/// The `[flow]` section. Every limit of the component; the last four are for tests only.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlowSettings {
    /// Instances run at once (each on a blocking thread).
    pub workers: usize,
    /// How often the poller looks for due instances and cron ticks (it is also woken on
    /// starts, events and finished runs).
    pub poll_interval_ms: u64,
    /// Most journal entries (steps, sleeps, events, `now`/`random` values) of one instance.
    pub max_steps: usize,
    /// Most bytes of recorded results in one instance's journal.
    pub max_journal_bytes: u64,
    /// Largest recorded result of one step (and largest workflow output).
    pub max_result_bytes: u64,
    /// Largest workflow input and event payload.
    pub max_input_bytes: u64,
    /// Most unfinished instances; starts past it are refused.
    pub max_active: u64,
    /// Most unconsumed events waiting at one instance.
    pub max_events: u64,
    /// Lua time limit of one run of an instance (replay plus the new steps).
    pub run_timeout_secs: f64,
    /// Retries of a failed step unless the step says otherwise (`retries=`).
    pub step_retries: u32,
    /// First retry delay; doubled each attempt up to `retry_backoff_max_ms`.
    pub retry_backoff_ms: u64,
    pub retry_backoff_max_ms: u64,
    /// Finished instances (and their journals) are deleted after this many days.
    pub retention_days: f64,
    /// Most cron schedules.
    pub max_schedules: usize,
    /// Most instances `GET /flows` returns.
    pub list_limit: usize,
    /// TEST ONLY: the flow clock runs this many times faster than real time (from
    /// `clock_anchor`), so a day of sleeps and cron ticks passes in seconds.
    pub clock_speed: f64,
    /// TEST ONLY: the Unix time (s) from which `clock_speed` counts; keep it fixed across
    /// restarts so the clock stays continuous.
    pub clock_anchor: f64,
    /// TEST ONLY: seconds added to the flow clock.
    pub clock_offset_secs: f64,
    /// TEST ONLY: enables `POST /flows/clock` (admin), which moves the flow clock while the
    /// server runs (`{"advance_secs": s}` or `{"offset_secs": s}`), so a test can jump to the
    /// next cron tick or past a wait without restarting.
    pub clock_control: bool,
    /// TEST ONLY: when set, `flow.test_outside(line)` appends a line to this file: an effect
    /// outside the database for crash tests (at least once, never rolled back).
    pub test_outside_file: Option<String>,
}

impl Default for FlowSettings {
    fn default() -> Self {
        FlowSettings {
            workers: 4,
            poll_interval_ms: 200,
            max_steps: 1000,
            max_journal_bytes: 16 * 1024 * 1024,
            max_result_bytes: 1024 * 1024,
            max_input_bytes: 1024 * 1024,
            max_active: 100_000,
            max_events: 1000,
            run_timeout_secs: 60.0,
            step_retries: 3,
            retry_backoff_ms: 1000,
            retry_backoff_max_ms: 300_000,
            retention_days: 7.0,
            max_schedules: 1000,
            list_limit: 1000,
            clock_speed: 1.0,
            clock_anchor: 0.0,
            clock_offset_secs: 0.0,
            clock_control: false,
            test_outside_file: None,
        }
    }
}

impl FlowSettings {
    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=256).contains(&self.workers),
            "[flow] workers must be 1..256"
        );
        anyhow::ensure!(
            self.poll_interval_ms >= 10,
            "[flow] poll_interval_ms must be at least 10"
        );
        anyhow::ensure!(
            self.max_steps >= 1 && self.max_journal_bytes >= 1024,
            "[flow] max_steps and max_journal_bytes are too small"
        );
        anyhow::ensure!(
            self.run_timeout_secs > 0.0 && self.run_timeout_secs <= 86_400.0,
            "[flow] run_timeout_secs must be in (0, 86400]"
        );
        anyhow::ensure!(
            self.clock_speed > 0.0 && self.clock_speed <= 1e6,
            "[flow] clock_speed must be in (0, 1e6]"
        );
        anyhow::ensure!(
            self.retry_backoff_max_ms >= self.retry_backoff_ms,
            "[flow] retry_backoff_max_ms must be at least retry_backoff_ms"
        );
        Ok(())
    }
}

/// The flow clock (milliseconds since the Unix epoch): real time unless the test-only settings
/// speed it up or shift it (the offset can move while the server runs: `POST /flows/clock`
/// with the test-only `[flow] clock_control`).
#[derive(Debug, Clone)]
pub struct Clock {
    speed: f64,
    anchor_ms: f64,
    offset_ms: std::sync::Arc<AtomicI64>,
}

impl Clock {
    pub fn new(s: &FlowSettings) -> Clock {
        Clock {
            speed: s.clock_speed,
            anchor_ms: s.clock_anchor * 1000.0,
            offset_ms: std::sync::Arc::new(AtomicI64::new((s.clock_offset_secs * 1000.0) as i64)),
        }
    }

    /// The offset added to the clock, seconds.
    pub fn offset_secs(&self) -> f64 {
        self.offset_ms.load(Ordering::SeqCst) as f64 / 1000.0
    }

    /// Set the offset (test-only clock control): the clock never moves backwards.
    pub fn set_offset_secs(&self, secs: f64) -> std::result::Result<(), String> {
        let new = (secs * 1000.0) as i64;
        let old = self.offset_ms.load(Ordering::SeqCst);
        if new < old {
            return Err(format!("the flow clock only moves forwards (offset {} s, asked {secs} s)", old as f64 / 1000.0));
        }
        self.offset_ms.store(new, Ordering::SeqCst);
        Ok(())
    }

    pub fn now_ms(&self) -> i64 {
        let real = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0);
        (self.anchor_ms + (real - self.anchor_ms) * self.speed) as i64 + self.offset_ms.load(Ordering::SeqCst)
    }

    /// Real time for `ms` of flow time.
    pub fn real(&self, ms: i64) -> Duration {
        Duration::from_secs_f64((ms.max(0) as f64 / self.speed) / 1000.0)
    }
}

/// The running service: settings, clock, the set of instances running in this process.
pub struct FlowService {
    pub settings: FlowSettings,
    pub clock: Clock,
    wake: tokio::sync::Notify,
    running: Mutex<HashSet<String>>,
    cancelled: Mutex<HashSet<String>>,
    /// Flow time when this process started: cron ticks before it were missed while down.
    started_ms: AtomicI64,
}

impl FlowService {
    /// Look for due work now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    pub(crate) fn is_cancelled(&self, id: &str) -> bool {
        self.cancelled.lock().unwrap().contains(id)
    }

    pub(crate) fn note_cancelled(&self, id: &str) {
        let mut c = self.cancelled.lock().unwrap();
        if c.len() > 100_000 {
            c.clear();
        }
        c.insert(id.to_string());
    }

    pub fn started_ms(&self) -> i64 {
        self.started_ms.load(Ordering::Relaxed)
    }

    /// Instances running in this process now.
    pub fn running(&self) -> usize {
        self.running.lock().unwrap().len()
    }
}

pub struct FlowModule;

static MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "flows",
    sql: journal::SCHEMA,
}];

impl crate::modules::Module for FlowModule {
    fn name(&self) -> &'static str {
        "flow"
    }
    fn section(&self) -> Option<&'static str> {
        Some("flow")
    }
    fn migrations(&self) -> &'static [Migration] {
        MIGRATIONS
    }
    fn provide(&self, b: &mut AppBuilder) -> anyhow::Result<()> {
        let s: FlowSettings = b.core().config.section("flow")?;
        s.check()?;
        let clock = Clock::new(&s);
        if s.clock_control {
            tracing::warn!("flow: [flow] clock_control is on (test only): POST /flows/clock moves the flow clock");
        }
        b.provide(FlowService {
            started_ms: AtomicI64::new(clock.now_ms()),
            clock,
            settings: s,
            wake: tokio::sync::Notify::new(),
            running: Mutex::new(HashSet::new()),
            cancelled: Mutex::new(HashSet::new()),
        });
        Ok(())
    }
    fn routes(&self) -> axum::Router<App> {
        http::routes()
    }
    fn lua_components(&self) -> &'static [&'static dyn Component] {
        &[&component::FlowLua]
    }
    fn start(&self, app: &App) -> anyhow::Result<()> {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return Ok(());
        };
        let app = app.clone();
        rt.spawn(poll_loop(app));
        Ok(())
    }
}

/// The poller: cron ticks, then due instances onto free workers; pruning now and then.
async fn poll_loop(app: App) {
    let Some(svc) = app.get::<FlowService>() else { return };
    let every = Duration::from_millis(svc.settings.poll_interval_ms);
    let mut last_prune = std::time::Instant::now() - Duration::from_secs(3600);
    loop {
        if let Err(e) = cron::tick(&app).await {
            if e.code == crate::core::ErrorCode::ShuttingDown {
                return;
            }
            tracing::warn!(error = %e, "flow: cron pass failed");
        }
        let free = svc
            .settings
            .workers
            .saturating_sub(svc.running.lock().unwrap().len());
        if free > 0 {
            let now = svc.now_ms();
            let skip: Vec<String> = svc.running.lock().unwrap().iter().cloned().collect();
            let limit = free + skip.len();
            let due = app
                .storage()
                .read(&RequestContext::system(), ExecControl::lookup(), move |c| {
                    journal::due(c, now, limit)
                })
                .await;
            match due {
                Ok(ids) => {
                    let mut n = 0;
                    for id in ids {
                        if n >= free {
                            break;
                        }
                        if !svc.running.lock().unwrap().insert(id.clone()) {
                            continue;
                        }
                        n += 1;
                        let a = app.clone();
                        let rt = tokio::runtime::Handle::current();
                        tokio::task::spawn_blocking(move || {
                            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                run_instance(&a, rt, &id)
                            }));
                            if r.is_err() {
                                tracing::error!(flow_id = %id, "flow: a run panicked");
                            }
                            if let Some(s) = a.get::<FlowService>() {
                                s.running.lock().unwrap().remove(&id);
                                s.wake();
                            }
                        });
                    }
                }
                Err(e) if e.code == crate::core::ErrorCode::ShuttingDown => return,
                Err(e) => tracing::warn!(error = %e, "flow: looking for due instances failed"),
            }
        }
        if last_prune.elapsed() > Duration::from_secs(60) {
            last_prune = std::time::Instant::now();
            let cutoff = svc.now_ms() - (svc.settings.retention_days * 86_400_000.0) as i64;
            let r = app
                .storage()
                .write(&RequestContext::system(), ExecControl::lookup(), move |c| {
                    journal::prune(c, cutoff)
                })
                .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, "flow: pruning finished instances failed");
            }
        }
        // Sleep until the poll interval, or the first sleeping instance's wake time if sooner
        // (the poller is also woken by starts, events and finished runs).
        tokio::select! {
            _ = svc.wake.notified() => {}
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_clock_runs_fast_from_its_anchor() {
        let real = Clock::new(&FlowSettings::default());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert!((real.now_ms() - now).abs() < 1000);
        let s = FlowSettings {
            clock_speed: 3600.0,
            clock_anchor: (now / 1000) as f64 - 10.0,
            clock_offset_secs: 86_400.0,
            ..FlowSettings::default()
        };
        let fast = Clock::new(&s);
        // Ten real seconds since the anchor are ten hours, plus the day of offset.
        let expect = now + 36_000_000 + 86_400_000;
        assert!((fast.now_ms() - expect).abs() < 3_600_000, "{} vs {expect}", fast.now_ms());
        assert_eq!(fast.real(3_600_000), Duration::from_secs(1));
        assert!(FlowSettings { workers: 0, ..FlowSettings::default() }.check().is_err());
        assert!(FlowSettings { clock_speed: 0.0, ..FlowSettings::default() }.check().is_err());
        assert!(FlowSettings::default().check().is_ok());
        // The controllable offset moves forwards only.
        let before = fast.now_ms();
        fast.set_offset_secs(2.0 * 86_400.0).unwrap();
        assert!(fast.now_ms() - before >= 86_400_000 - 1000);
        assert!(fast.set_offset_secs(0.0).is_err());
        assert_eq!(fast.offset_secs(), 2.0 * 86_400.0);
    }
}
