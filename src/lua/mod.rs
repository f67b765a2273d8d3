//! The Lua runtime: sandboxed invocations of deployed functions, the component registry, the
//! deep tracer and the function store.
//!
//! Owns: creating the per-invocation sandbox (`sandbox`), attaching components
//! (`components::registry`), turning values between Lua and JSON, mapping Lua failures to
//! [`Error`]s with line numbers, and the engine tables of functions and traces (`store`).
//! Must not touch HTTP: `apis::functions` calls [`invoke`] from a blocking thread.

pub mod components;
pub mod limits;
pub mod pool;
pub mod sandbox;
pub mod store;
pub mod saver;
pub mod trace;

use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlua::{Function, Lua, LuaSerdeExt, Value};
use serde_json::{Map, Value as Json};

use crate::core::{Error, ErrorCode, RequestContext};
use crate::storage::{ExecControl, Storage};
use sandbox::{Limit, Limits, Meter};
use trace::{Step, Tracer};

/// Limits and sizes of the Lua runtime.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LuaOptions {
    /// An instruction budget (0: none — no count hook; see `sandbox`).
    pub instruction_limit: u64,
    /// CPU time of one invocation's thread.
    pub cpu_limit: Duration,
    pub memory_limit: usize,
    pub timeout: Duration,
    pub max_trace_steps: usize,
    /// Most rows one `db.query` may return.
    pub max_rows: u64,
    /// Largest SQL text one `db` call may send.
    pub max_sql: usize,
    /// Cases `prop.check` tries unless the check says otherwise.
    pub property_runs: u32,
    /// Longest a write transaction from Lua may hold the writer (`[lua_limits] tx_timeout_secs`).
    pub tx_timeout: Duration,
    /// Bounds of stored traces (`[traces]`).
    pub traces: limits::TraceLimits,
    /// Runs use pooled, reset sandboxes (`[lua_limits] reuse_states`; see `pool`).
    pub reuse_states: bool,
    /// CPU and wall time an HTTP call may first run on its async worker ([`invoke_inline`];
    /// `[lua_limits] inline_budget_us`; zero: never).
    pub inline_budget: Duration,
}

impl Default for LuaOptions {
    fn default() -> Self {
        LuaOptions {
            instruction_limit: 0,
            cpu_limit: Duration::from_secs(5),
            memory_limit: 64 * 1024 * 1024,
            timeout: Duration::from_secs(10),
            max_trace_steps: 100_000,
            max_rows: 100_000,
            max_sql: 1024 * 1024,
            property_runs: 100,
            tx_timeout: Duration::from_secs_f64(limits::LuaLimitSettings::default().tx_timeout_secs),
            traces: limits::TraceLimits::default(),
            reuse_states: true,
            inline_budget: Duration::from_micros(limits::LuaLimitSettings::default().inline_budget_us),
        }
    }
}

/// What one invocation runs.
#[derive(Debug, Clone, Default)]
pub struct Invocation {
    pub function: String,
    pub version: i64,
    pub source: String,
    pub input: Json,
    pub trace: bool,
    /// Who may read the trace besides the admin (a non-admin caller allowed to trace).
    pub trace_owner: Option<String>,
    /// Set when the source is a check (a chunk whose own return value is the result) rather
    /// than a function.
    pub check: Option<CheckMode>,
}

/// How a check runs.
#[derive(Debug, Clone, Default)]
pub struct CheckMode {
    /// Seed of `prop.check`'s random source.
    pub seed: i64,
    /// Run only property `.0`, once, on value `.1` (to trace a known counterexample).
    pub replay: Option<(String, Json)>,
}

/// What components get: a handle on the invocation being served ([`EnvState`], reached through
/// `Deref`: `env.ctx`, `env.storage`, ...). A fresh sandbox serves one invocation; a pooled one
/// ([`pool`]) is re-bound to each invocation it runs, so components installed once read the
/// current caller's identity, limits and storage at call time (never capture them at install).
pub struct Env {
    /// Points into `held` (null while a pooled state waits for its next invocation).
    current: std::cell::Cell<*const EnvState>,
    held: RefCell<Option<Rc<EnvState>>>,
}

impl Env {
    fn new(state: Rc<EnvState>) -> Env {
        Env {
            current: std::cell::Cell::new(Rc::as_ptr(&state)),
            held: RefCell::new(Some(state)),
        }
    }

    /// Serve the next invocation (`None`: none; a pooled state then keeps no storage, app or
    /// caller alive). Only between invocations: no Lua code of the state runs, so no reference
    /// obtained through `Deref` is alive (a pooled state is checked out by exactly one
    /// invocation at a time, and such references cannot outlive the callback that took them).
    fn rebind(&self, state: Option<Rc<EnvState>>) {
        self.current
            .set(state.as_ref().map_or(std::ptr::null(), Rc::as_ptr));
        let old = self.held.replace(state);
        drop(old);
    }
}

impl std::ops::Deref for Env {
    type Target = EnvState;
    fn deref(&self) -> &EnvState {
        let p = self.current.get();
        assert!(!p.is_null(), "a Lua component ran outside an invocation");
        // SAFETY: `p` points into the Rc `held` keeps alive; it changes only in `rebind` (see
        // there).
        unsafe { &*p }
    }
}

/// The invocation a component serves: the caller's identity, storage, the limits and the tracer.
pub struct EnvState {
    /// Unique per invocation in this process (a component caching per invocation compares it).
    pub serial: u64,
    pub storage: Storage,
    pub ctx: RequestContext,
    pub rt: tokio::runtime::Handle,
    pub control: Arc<ExecControl>,
    pub options: LuaOptions,
    pub function: String,
    pub tracer: Option<Rc<RefCell<Tracer>>>,
    pub logs: RefCell<Vec<Json>>,
    /// The app's services for components (`hub`, `posterity`, modules' services through
    /// `App::get`); `None` outside a server (tests and benchmarks on bare storage).
    pub app: Option<crate::app::App>,
    /// The open `db.tx` session, if any.
    pub tx: RefCell<Option<components::db::TxSession>>,
    /// Outcomes `prop.check` reported.
    pub reports: RefCell<Vec<Json>>,
    /// The invocation's meter (`db.tx` sets its own deadline there for the hook to enforce).
    pub meter: Rc<Meter>,
    pub check: Option<CheckMode>,
    /// Work a component defers to the end of a successful invocation (the notify outbox row of
    /// a call made outside `db.tx`): run in order once the handler returned; an error fails
    /// the invocation. Dropped when the invocation fails.
    pub on_success: RefCell<Vec<Box<dyn FnOnce(&Env) -> Result<(), Error>>>>,
}

/// The result of one invocation.
#[derive(Clone)]
pub struct Outcome {
    pub result: Result<Json, Error>,
    /// Line of the failure in the function's source, when known.
    pub error_line: Option<i64>,
    /// VM instructions, counted only when a count hook ran (an instruction budget or a trace;
    /// in steps of 1000).
    pub instructions: Option<u64>,
    /// CPU time of the invocation's thread.
    pub cpu: Duration,
    pub peak_memory: usize,
    pub elapsed: Duration,
    pub steps: Option<(Vec<Step>, bool)>,
    /// What hot-line sampling left out of the trace (`None`: every visit was recorded).
    pub sampling: Option<trace::Sampling>,
    pub logs: Vec<Json>,
    /// What property checks reported (each with `property`, `ok`, and for a failure the shrunk
    /// `counterexample`).
    pub reports: Vec<Json>,
    /// The table an uncaught `error(t)` threw, as JSON (its `message` field, if a string, is
    /// the error's message; otherwise the message is this JSON).
    pub error_value: Option<Json>,
    /// The run was made on an async worker ([`invoke_inline`]).
    pub inline: bool,
}

/// Where and with what invocations run: the storage their SQL uses, where their traces are
/// kept, the runtime storage lives on, the sandbox limits, and the app's services.
#[derive(Clone)]
pub struct Runtime {
    pub storage: Storage,
    /// Where traces are saved (the live database, also for checks run on a branch copy);
    /// `None`: traces are returned in the outcome only.
    pub traces: Option<Storage>,
    pub rt: tokio::runtime::Handle,
    pub options: LuaOptions,
    /// Services for components and the posterity log; `None` on bare storage.
    pub app: Option<crate::app::App>,
}

impl Runtime {
    /// Invocations on bare `storage` (no server around it: tests, benchmarks, the CLI).
    pub fn bare(storage: Storage, rt: tokio::runtime::Handle, options: LuaOptions) -> Runtime {
        Runtime {
            traces: Some(storage.clone()),
            storage,
            rt,
            options,
            app: None,
        }
    }

    /// Invocations of a running server on its live database.
    pub fn of_app(app: &crate::app::App, rt: tokio::runtime::Handle) -> Runtime {
        Runtime {
            storage: app.storage().clone(),
            traces: Some(app.storage().clone()),
            rt,
            options: app.lua(),
            app: Some(app.clone()),
        }
    }
}

/// Run `inv` in a fresh sandbox as `ctx`, then record it wherever it came from (HTTP, a
/// bundle check, the CLI): one `lua` row in the posterity log, and the trace saved (to
/// `runtime.traces`) under `ctx.trace_id` when `inv.trace` is set. Blocking: call it from a
/// blocking thread.
pub fn invoke(runtime: &Runtime, ctx: RequestContext, inv: Invocation) -> Outcome {
    let mut outcome = run_sandbox(runtime, ctx.clone(), &inv, None);
    record(runtime, &ctx, &inv, &mut outcome);
    outcome
}

/// [`invoke`] on the calling thread, an async worker, for a run that needs no blocking thread
/// (issue 18: the hand-off to a blocking thread and back cost more than a small function's
/// run). The run takes this thread's pooled state and may last `options.inline_budget` of CPU
/// and wall time (enforced up to one budget late); it may call only the host functions that
/// neither block nor act outside the invocation (`sandbox::INLINE_HOST_FUNCTIONS`). A run
/// that calls any other, or fails in any way (a limit, an error), is abandoned before the
/// call: nothing of it is kept (no posterity row, no trace, no logs) and `Err` tells the
/// caller to make the whole invocation again with [`invoke`] on a blocking thread. Only a
/// successful run is recorded and returned. Untraced runs in pooled states only.
///
/// `Err` gives the invocation back, and whether a limit ended the attempt (a host call that
/// needs a blocking thread, the CPU budget, memory): such a function version is better sent
/// to a blocking thread directly next time.
pub fn invoke_inline(
    runtime: &Runtime,
    ctx: RequestContext,
    inv: Invocation,
) -> Result<Outcome, (Invocation, bool)> {
    let budget = runtime.options.inline_budget;
    if budget.is_zero() || inv.trace || !pool::eligible(runtime, &inv) {
        return Err((inv, false));
    }
    let mut outcome = run_sandbox(runtime, ctx.clone(), &inv, Some(budget));
    if let Err(e) = &outcome.result {
        // A host call that needs a blocking thread, the CPU budget, memory: the same next
        // time. Not the wall-clock budget: a preempted run passes it by no fault of its own.
        let limited = e.code == ErrorCode::LuaLimit;
        return Err((inv, limited));
    }
    record(runtime, &ctx, &inv, &mut outcome);
    Ok(outcome)
}

/// The one place a Lua run is logged and its trace kept.
fn record(runtime: &Runtime, ctx: &RequestContext, inv: &Invocation, outcome: &mut Outcome) {
    // Every run is a `lua` row in the posterity log; the server log carries it only at debug
    // level (at info it wrote a line per call: a busy function filled the log and paid a
    // formatted stderr write per invocation).
    tracing::debug!(function = %inv.function, version = inv.version, trace_id = %ctx.trace_id, role = ctx.role.as_str(),
        ok = outcome.result.is_ok(), instructions = outcome.instructions, cpu_ms = outcome.cpu.as_secs_f64() * 1e3, peak_memory = outcome.peak_memory,
        elapsed_ms = outcome.elapsed.as_secs_f64() * 1e3, "lua invocation");
    if let Some(app) = &runtime.app {
        let sink = app.posterity().sink();
        if sink.enabled() {
            let mut e = crate::posterity::Event::now("lua", Some(ctx));
            e.name = Some(inv.function.clone());
            e.version = Some(inv.version);
            e.outcome = Some(if outcome.result.is_ok() { "ok" } else { "error" });
            e.error = outcome
                .result
                .as_ref()
                .err()
                .map(|e| e.message.chars().take(1000).collect());
            e.elapsed_ms = outcome.elapsed.as_secs_f64() * 1e3;
            e.detail = Some(run_detail(inv, outcome));
            sink.record(e);
        }
    }
    if !inv.trace || outcome.steps.is_none() {
        return;
    }
    save_trace(runtime, ctx, &inv.function, inv.version, inv.trace_owner.clone(), outcome);
}

/// The `lua` row's detail, a JSON object written straight into one string (no JSON values
/// built per call: this runs on the request's thread).
fn run_detail(inv: &Invocation, outcome: &Outcome) -> String {
    use std::fmt::Write;
    let cpu_ms = outcome.cpu.as_secs_f64() * 1e3;
    let mut s = String::with_capacity(144);
    s.push_str("{\"instructions\":");
    let _ = match outcome.instructions {
        Some(n) => write!(s, "{n}"),
        None => s.write_str("null"),
    };
    let _ = write!(
        s,
        ",\"cpu_ms\":{},\"memory\":{},\"traced\":{},\"error_line\":",
        if cpu_ms.is_finite() { cpu_ms } else { 0.0 },
        outcome.peak_memory,
        inv.trace
    );
    let _ = match outcome.error_line {
        Some(n) => write!(s, "{n}"),
        None => s.write_str("null"),
    };
    let _ = write!(s, ",\"check\":{},\"inline\":{}}}", inv.check.is_some(), outcome.inline);
    s
}

/// Keep a minimal trace (error, line, logs, counters; no steps) of a failed untraced run, so
/// the `trace_id` its error answer names can be opened (`GET /trace/{id}`). The caller decides
/// who gets one (callers who may trace: the admin, the function's owner, `[traces] debug_roles`).
pub fn keep_error_trace(
    runtime: &Runtime,
    ctx: &RequestContext,
    function: &str,
    version: i64,
    owner: Option<String>,
    outcome: &mut Outcome,
) {
    if outcome.result.is_err() && outcome.steps.is_none() {
        save_trace(runtime, ctx, function, version, owner, outcome);
    }
}

fn save_trace(
    runtime: &Runtime,
    ctx: &RequestContext,
    function: &str,
    version: i64,
    owner: Option<String>,
    outcome: &mut Outcome,
) {
    let Some(traces) = &runtime.traces else { return };
    // The saver gets its own copy of the outcome (the steps share their snapshots); callers
    // keep theirs (bundle checks excerpt the steps).
    let job = saver::Job {
        storage: traces.clone(),
        rt: runtime.rt.clone(),
        id: ctx.trace_id.clone(),
        function: function.to_string(),
        version,
        user_id: ctx.user_id.clone(),
        role: ctx.role.as_str().to_string(),
        owner,
        limits: runtime.options.traces,
        outcome: outcome.clone(),
    };
    // Off the invocation's path when `[traces] save_queue` has room; else saved now.
    saver::submit(job);
}

/// Is a trace large enough that the memory it held is worth handing back to the system
/// ([`release_freed_memory`]) once it is dropped?
pub fn large_trace(steps: &[Step]) -> bool {
    steps.len() >= 10_000 || steps.iter().map(trace::step_size).sum::<usize>() >= 1 << 20
}

/// One run in a sandbox; `inline`: on an async worker within that budget ([`invoke_inline`]).
fn run_sandbox(runtime: &Runtime, ctx: RequestContext, inv: &Invocation, inline: Option<Duration>) -> Outcome {
    let (storage, rt, options) = (runtime.storage.clone(), runtime.rt.clone(), runtime.options);
    let started = Instant::now();
    let cpu_started = sandbox::watchdog::this_thread_cpu();
    let mut deadline = started + inline.map_or(options.timeout, |b| b.min(options.timeout));
    let meter = Rc::new(Meter::default());
    let tracer = inv
        .trace
        .then(|| {
            Rc::new(RefCell::new(Tracer::with_limits(
                options.max_trace_steps,
                &options.traces,
            )))
        });
    let cpu_limit = inline.map_or(options.cpu_limit, |b| b.min(options.cpu_limit));
    let limits = Limits {
        instructions: (options.instruction_limit > 0).then_some(options.instruction_limit),
        cpu: cpu_limit,
        memory: options.memory_limit,
        deadline,
    };
    static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let state = Rc::new(EnvState {
        serial: SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        storage,
        control: ExecControl::with_value_limit(
            started,
            options.timeout.as_secs_f64(),
            options.memory_limit,
        ),
        ctx,
        rt,
        options,
        function: inv.function.clone(),
        tracer: tracer.clone(),
        logs: RefCell::new(Vec::new()),
        app: runtime.app.clone(),
        tx: RefCell::new(None),
        reports: RefCell::new(Vec::new()),
        check: inv.check.clone(),
        meter: Rc::clone(&meter),
        on_success: RefCell::new(Vec::new()),
    });
    // A pooled state (reset between invocations) when this run may use one; else a fresh one.
    let reuse = pool::eligible(runtime, inv);
    let taken = reuse.then(|| pool::take(&options)).flatten();
    // The CPU budget counts from the start of the run, unless a state is built for it (that is
    // not the run's work): the watch then reads the clock again (one system call less per
    // pooled run).
    let cpu_from = if taken.is_some() { cpu_started } else { None };
    let prepared = match taken {
        Some(mut p) => p
            .bind(Rc::clone(&state), Rc::clone(&meter), limits, tracer.clone())
            .map(|()| p),
        None => pool::Prepared::build(
            Rc::clone(&state),
            Rc::clone(&meter),
            limits,
            tracer.clone(),
            reuse,
        ),
    };
    if let Ok(p) = &prepared {
        p.set_inline(inline.is_some());
        if let Some(budget) = inline {
            // The budget is the run's: building this thread's first state is not counted.
            deadline = Instant::now() + budget;
            p.set_deadline(deadline);
        }
    }
    let env: &EnvState = &state;
    let error_value: RefCell<Option<Json>> = RefCell::new(None);
    let run = |p: &mut pool::Prepared| -> mlua::Result<Json> {
        let lua = p.lua();
        // Wall time is enforced even while no count hook fires (slow host calls): the watch
        // ends before the state is dropped or pooled again.
        let _watch = sandbox::watchdog::Watch::start_with_slack(
            lua,
            deadline,
            Some(cpu_limit),
            cpu_from,
            Arc::clone(&meter.alarm),
            inline.unwrap_or_default(),
        )?;
        // Tables carrying this metatable (query results, decoded JSON arrays) stay JSON arrays
        // when empty; the guard restores an outer invocation's value.
        let _array_mt = ArrayMetatable::enter(lua);
        // Components that keep per-invocation state are installed for every run.
        p.install_per_call()?;
        if sandbox::has_close_attribute(&inv.source) {
            return Err(mlua::Error::runtime(
                "to-be-closed variables (<close>) are not available in the sandbox",
            ));
        }
        let chunk = p.chunk(&inv.function, &inv.source)?;
        let lua = p.lua();
        let returned: Value = chunk
            .call(())
            .map_err(|e| thrown_error(lua, e, &error_value))?;
        if inv.check.is_some() {
            // A check's chunk is the test itself: it passes unless it raises (or returns false).
            if returned == Value::Boolean(false) {
                return Err(mlua::Error::runtime("the check returned false"));
            }
            if !matches!(returned, Value::Function(_)) {
                return to_json(&returned).map_err(mlua::Error::runtime);
            }
        }
        let handler: Function = match returned {
            Value::Function(f) => f,
            _ => match lua.globals().get::<Value>("handler")? {
                Value::Function(f) => f,
                _ => {
                    return Err(mlua::Error::runtime(
                        "the function's source must return a function, or define handler(input, ctx)",
                    ));
                }
            },
        };
        let input = lua.to_value_with(
            &inv.input,
            mlua::SerializeOptions::new()
                .serialize_none_to_null(false)
                .serialize_unit_to_null(false),
        )?;
        // `ctx` in one protected call (a `Table::set` per field makes one for each key and
        // each string value: ~6% of an empty function's HTTP call).
        let fields = [
            (c"user_id", env.ctx.user_id.as_deref()),
            (c"role", Some(env.ctx.role.as_str())),
            (c"trace_id", Some(env.ctx.trace_id.as_str())),
            (c"function", Some(inv.function.as_str())),
        ];
        // SAFETY: the closure runs in a protected call on this state's stack and leaves the
        // new table as the only value pushed; it owns nothing that needs dropping, so an
        // out-of-memory error raised inside it (a longjmp) skips no destructor.
        let ctx_t: mlua::Table = unsafe {
            lua.exec_raw((), |l| {
                use mlua::ffi;
                ffi::lua_createtable(l, 0, fields.len() as std::ffi::c_int + 1);
                for (key, value) in &fields {
                    if let Some(v) = value {
                        ffi::lua_pushlstring(l, v.as_ptr().cast(), v.len());
                        ffi::lua_setfield(l, -2, key.as_ptr());
                    }
                }
                ffi::lua_pushinteger(l, inv.version);
                ffi::lua_setfield(l, -2, c"version".as_ptr());
            })?
        };
        let out = handler.call((input, ctx_t));
        // Sampled on errors too (no count hook samples it): a large peak makes the run hand
        // freed memory back to the system afterwards.
        meter
            .peak_memory
            .set(meter.peak_memory.get().max(lua.used_memory()));
        let out: Value = out.map_err(|e| thrown_error(lua, e, &error_value))?;
        to_json(&out).map_err(mlua::Error::runtime)
    };
    let (result, prepared) = {
        let _clock = sandbox::ClockGuard::enter(&meter, deadline);
        match prepared {
            Ok(mut p) => (run(&mut p), Some(p)),
            Err(e) => (Err(e), None),
        }
    };
    // Back to the pool (reset) when the run ended without hitting a limit; else dropped.
    if let Some(p) = prepared {
        // An inline run abandoned at a host call hit no real limit (no hook was installed):
        // its state is reset and kept like after any error.
        let real = |l: Option<Limit>| l.is_some_and(|l| l != Limit::Inline);
        let limited = real(meter.tripped.get())
            || meter.alarm.fired().is_some()
            || real(result.as_ref().err().and_then(sandbox::limit_of));
        p.release(limited);
    }
    // A db.tx left open by an error is rolled back by its session when the sender drops.
    env.tx.borrow_mut().take();
    let deferred = env.on_success.take();
    let handle = Env::new(Rc::clone(&state));
    let result = match result {
        Ok(v) => deferred
            .into_iter()
            .try_for_each(|f| f(&handle))
            .map(|()| v)
            .map_err(mlua::Error::external),
        Err(e) => Err(e),
    };
    let (result, error_line) = match result {
        Ok(v) => (Ok(v), None),
        Err(e) => {
            let (err, line) = describe(&e, &inv.function, &meter, &options, deadline);
            (Err(err), line)
        }
    };
    let (steps, sampling) = match tracer {
        Some(t) => {
            let t = std::mem::replace(&mut *t.borrow_mut(), Tracer::new(0, 0));
            let sampling = t.sampling();
            (Some(t.finish()), sampling)
        }
        None => (None, None),
    };
    // A run that used more than a little memory, made large allocations outside Lua, or failed
    // (stopped midway, possibly with large temporaries, as hostile code tends to) hands freed
    // memory back to the system: glibc would keep it in per-thread arenas, and the server's
    // resident size would creep up with every such run.
    let heavy = HEAVY.with(|h| h.replace(false));
    // An abandoned inline attempt too: it freed its memory in the worker thread's arena.
    if heavy || result.is_err() || meter.peak_memory.get() > 1024 * 1024 {
        release_freed_memory();
    }
    Outcome {
        result,
        error_line,
        instructions: (options.instruction_limit > 0 || inv.trace).then(|| meter.instructions.get()),
        cpu: cpu_started
            .and_then(|(clock, t0)| sandbox::watchdog::thread_cpu(clock).map(|t| t.saturating_sub(t0)))
            .unwrap_or_default(),
        peak_memory: meter.peak_memory.get(),
        elapsed: started.elapsed(),
        steps,
        sampling,
        logs: env.logs.take(),
        reports: env.reports.take(),
        error_value: error_value.take(),
        inline: inline.is_some(),
    }
}

/// An error thrown as a table (`error({code = 42, message = "..."})`) becomes an error whose
/// message is the table's `message` (a string) or else its JSON; the JSON is kept in `slot`.
fn thrown_error(lua: &Lua, e: mlua::Error, slot: &RefCell<Option<Json>>) -> mlua::Error {
    let Some(t) = sandbox::thrown_table(lua, &e) else {
        return e;
    };
    let json = match to_json(&Value::Table(t)) {
        Ok(j) => j,
        Err(_) => return e,
    };
    let message = match json.get("message") {
        Some(Json::String(m)) => m.clone(),
        _ => {
            let text = json.to_string();
            if text.len() > 4000 {
                format!("{}...", text.chars().take(4000).collect::<String>())
            } else {
                text
            }
        }
    };
    *slot.borrow_mut() = Some(json);
    mlua::Error::RuntimeError(message)
}

/// Names of the state's globals.
fn global_names(lua: &Lua) -> mlua::Result<HashSet<String>> {
    let mut out = HashSet::new();
    for pair in lua.globals().pairs::<Value, Value>() {
        if let (Value::String(k), _) = pair? {
            out.insert(k.to_string_lossy());
        }
    }
    Ok(out)
}

/// Syntax check at deploy time; the error names the line.
pub fn compile_check(name: &str, source: &str) -> Result<(), (Error, Option<i64>)> {
    if sandbox::has_close_attribute(source) {
        return Err((
            Error::new(
                ErrorCode::SyntaxError,
                "to-be-closed variables (<close>) are not available in the sandbox: their handlers would run outside its limits",
            ),
            None,
        ));
    }
    let lua = Lua::new();
    match lua
        .load(source)
        .set_name(format!("={name}"))
        .set_mode(mlua::ChunkMode::Text)
        .into_function()
    {
        Ok(_) => Ok(()),
        Err(e) => {
            let (msg, line) = message_and_line(&e, name);
            Err((
                Error::new(ErrorCode::SyntaxError, format!("Lua syntax error: {msg}")),
                line,
            ))
        }
    }
}

/// Globals a deployed function may define instead of returning a function: `handler`, and the
/// entry points modules call with their events (`on_email`: inbound email, src/email_in).
pub const ENTRY_GLOBALS: &[&str] = &["handler", "on_email", "on_message"];

/// What a function's deploy checks: the syntax ([`compile_check`]) and that the chunk returns
/// a function or defines one of the [`ENTRY_GLOBALS`]. The top level runs in a bare sandbox (no
/// components, so no `db` and no side effects) under small limits; a top level that fails there
/// (e.g. it calls a component) is not judged: its call reports it.
pub fn deploy_check(name: &str, source: &str) -> Result<(), (Error, Option<i64>)> {
    compile_check(name, source)?;
    let limits = Limits {
        // A count hook bounds this run by itself (no watchdog watches this state).
        instructions: Some(200_000),
        cpu: Duration::from_secs(1),
        memory: 16 * 1024 * 1024,
        deadline: Instant::now() + Duration::from_secs(1),
    };
    let Ok((lua, _)) = sandbox::new_state(limits, Rc::new(Meter::default()), None) else {
        return Ok(());
    };
    let returned = lua
        .load(source)
        .set_name(format!("={name}"))
        .set_mode(mlua::ChunkMode::Text)
        .call::<Value>(());
    let Ok(returned) = returned else { return Ok(()) };
    // `on_message` / `on_email`: the event handlers the chat and inbound-email modules call.
    if matches!(returned, Value::Function(_))
        || ENTRY_GLOBALS
            .iter()
            .any(|g| matches!(lua.globals().raw_get::<Value>(*g), Ok(Value::Function(_))))
    {
        return Ok(());
    }
    Err((
        Error::new(
            ErrorCode::BadArguments,
            format!(
                "the function's source must return a function, or define handler(input, ctx); its top level returned {}",
                match &returned {
                    Value::Nil => "nothing".to_string(),
                    Value::Integer(_) | Value::Number(_) => "a number".to_string(),
                    v => format!("a {}", v.type_name()),
                }
            ),
        ),
        None,
    ))
}

/// The user-facing message of a Lua error and the line in chunk `name` it points at.
fn message_and_line(e: &mlua::Error, name: &str) -> (String, Option<i64>) {
    let prefix = format!("{name}:");
    let parse = |text: &str| -> (String, Option<i64>) {
        let first = text.lines().next().unwrap_or(text);
        if let Some(rest) = first.strip_prefix(&prefix) {
            if let Some((n, msg)) = rest.split_once(':') {
                if let Ok(line) = n.trim().parse::<i64>() {
                    return (msg.trim().to_string(), Some(line));
                }
            }
        }
        (first.to_string(), None)
    };
    let line_in = |text: &str| -> Option<i64> {
        text.match_indices(&prefix).find_map(|(i, _)| {
            let rest = &text[i + prefix.len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
    };
    match e {
        mlua::Error::SyntaxError { message, .. } => parse(message),
        mlua::Error::RuntimeError(m) => parse(m),
        mlua::Error::CallbackError { traceback, cause } => {
            let (msg, line) = message_and_line(cause, name);
            (msg, line.or_else(|| line_in(traceback)))
        }
        mlua::Error::WithContext { context, cause } => {
            let (msg, line) = message_and_line(cause, name);
            (format!("{context}: {msg}"), line)
        }
        mlua::Error::ExternalError(x) => {
            let t = x.to_string();
            let (m, l) = parse(&t);
            (m, l)
        }
        other => parse(&other.to_string()),
    }
}

fn describe(
    e: &mlua::Error,
    name: &str,
    meter: &Meter,
    o: &LuaOptions,
    deadline: Instant,
) -> (Error, Option<i64>) {
    let (msg, line) = message_and_line(e, name);
    // A limit the watchdog found, or the deadline itself (a host call's own deadline, e.g. the
    // SQL engine's, is the invocation's and may fire first): the invocation's limit is named.
    let limit = sandbox::limit_of(e)
        .or(meter.tripped.get())
        .or(meter.alarm.fired())
        .or((Instant::now() >= deadline).then_some(Limit::Time));
    let err = match limit {
        Some(Limit::Time) => Error::new(
            ErrorCode::TimeoutExceeded,
            format!("Lua time limit exceeded ({} s)", o.timeout.as_secs_f64()),
        ),
        Some(Limit::Cpu) => Error::new(
            ErrorCode::LuaLimit,
            format!(
                "Lua CPU time limit exceeded ({} s, lua_cpu_limit_secs)",
                o.cpu_limit.as_secs_f64()
            ),
        ),
        Some(Limit::Instructions) => Error::new(
            ErrorCode::LuaLimit,
            format!(
                "Lua instruction limit exceeded ({} instructions)",
                o.instruction_limit
            ),
        ),
        Some(Limit::Memory) => Error::new(
            ErrorCode::LuaLimit,
            format!("Lua memory limit exceeded ({} bytes)", o.memory_limit),
        ),
        // Only an inline attempt meets it, and its outcome is never reported.
        Some(Limit::Inline) => Error::new(ErrorCode::LuaLimit, Limit::Inline.to_string()),
        Some(Limit::Transaction) => Error::new(
            ErrorCode::TimeoutExceeded,
            format!(
                "db.tx held the writer past its time limit ({} s, [lua_limits] tx_timeout_secs); the transaction was rolled back",
                o.tx_timeout.as_secs_f64()
            ),
        ),
        None => {
            if let Some(inner) = find_engine_error(e) {
                inner
            } else {
                Error::new(ErrorCode::LuaError, msg)
            }
        }
    };
    (err, line)
}

/// An engine [`Error`] raised by a component (e.g. a SQL error from `db.query`) keeps its code.
fn find_engine_error(e: &mlua::Error) -> Option<Error> {
    match e {
        mlua::Error::ExternalError(x) => x.downcast_ref::<Error>().cloned(),
        mlua::Error::CallbackError { cause, .. } | mlua::Error::WithContext { cause, .. } => {
            find_engine_error(cause)
        }
        _ => None,
    }
}

/// A Lua value as JSON: sequences become arrays, string-keyed tables objects; functions,
/// userdata, cycles and mixed tables are errors.
pub fn to_json(v: &Value) -> Result<Json, String> {
    fn go(
        v: &Value,
        depth: usize,
        seen: &mut HashSet<usize>,
        budget: &mut usize,
    ) -> Result<Json, String> {
        if depth > 64 {
            return Err("value nested deeper than 64 levels".into());
        }
        if *budget == 0 {
            return Err("value has more than 1,000,000 parts (shared subtables count every time they appear)".into());
        }
        *budget -= 1;
        // A large value takes long to serialise: the invocation's deadline is checked here
        // too, not only between VM instructions.
        if *budget % 4096 == 0 {
            sandbox::time_check().map_err(|l| l.to_string())?;
        }
        Ok(match v {
            Value::Nil => Json::Null,
            Value::Boolean(b) => Json::Bool(*b),
            Value::Integer(i) => Json::from(*i),
            Value::Number(n) => serde_json::Number::from_f64(*n)
                .map(Json::Number)
                .ok_or("NaN and infinities cannot be encoded as JSON")?,
            Value::String(s) => Json::String(
                s.to_str()
                    .map_err(|_| "strings must be UTF-8 to be encoded as JSON".to_string())?
                    .to_string(),
            ),
            Value::LightUserData(p) if p.0.is_null() => Json::Null,
            Value::Table(t) => {
                let ptr = t.to_pointer() as usize;
                if !seen.insert(ptr) {
                    return Err("a table refers to itself".into());
                }
                let len = t.raw_len();
                let mut count = 0usize;
                let mut obj = Map::new();
                let mut arr = vec![Json::Null; len];
                let mut all_index = true;
                for pair in t.clone().pairs::<Value, Value>() {
                    let (k, val) = pair.map_err(|e| e.to_string())?;
                    count += 1;
                    let jv = go(&val, depth + 1, seen, budget)?;
                    match k {
                        Value::Integer(i) if i >= 1 && (i as usize) <= len => {
                            arr[i as usize - 1] = jv
                        }
                        Value::String(s) => {
                            all_index = false;
                            obj.insert(
                                s.to_str()
                                    .map_err(|_| "table keys must be UTF-8".to_string())?
                                    .to_string(),
                                jv,
                            );
                        }
                        Value::Integer(i) => {
                            all_index = false;
                            obj.insert(i.to_string(), jv);
                        }
                        other => {
                            return Err(format!(
                                "table keys of type {} cannot be encoded as JSON",
                                other.type_name()
                            ));
                        }
                    }
                }
                seen.remove(&ptr);
                if count == 0 && is_array_table(t) {
                    Json::Array(Vec::new())
                } else if count == 0 {
                    Json::Object(Map::new())
                } else if all_index {
                    Json::Array(arr)
                } else if len > 0 {
                    return Err("a table mixes array items and named keys".into());
                } else {
                    Json::Object(obj)
                }
            }
            other => return Err(format!("a {} cannot be encoded as JSON", other.type_name())),
        })
    }
    let mut budget = 1_000_000;
    let out = go(v, 0, &mut HashSet::new(), &mut budget);
    if budget < 900_000 {
        mark_heavy();
    }
    out
}

thread_local! {
    /// The array metatable of the Lua state running on this thread (0: none).
    static ARRAY_MT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the running state's array metatable for [`to_json`] while alive.
struct ArrayMetatable(usize);

impl ArrayMetatable {
    fn enter(lua: &Lua) -> ArrayMetatable {
        let p = lua.array_metatable().to_pointer() as usize;
        ArrayMetatable(ARRAY_MT.with(|c| c.replace(p)))
    }
}

impl Drop for ArrayMetatable {
    fn drop(&mut self) {
        ARRAY_MT.with(|c| c.set(self.0));
    }
}

/// The table is marked as an array (empty arrays then encode as `[]`, not `{}`).
fn is_array_table(t: &mlua::Table) -> bool {
    let want = ARRAY_MT.with(|c| c.get());
    want != 0 && t.metatable().is_some_and(|m| m.to_pointer() as usize == want)
}

thread_local! {
    /// Set when an invocation made large allocations outside Lua's allocator (JSON, rows).
    static HEAVY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Note that this invocation allocated a lot outside Lua (its end returns memory to the OS).
pub fn mark_heavy() {
    HEAVY.with(|h| h.set(true));
}

/// Give memory a large invocation freed back to the OS (glibc keeps it in per-thread arenas
/// otherwise, and the server's resident size would stay at its peak).
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: malloc_trim only returns free heap pages to the kernel.
        unsafe {
            malloc_trim(0);
        }
    }
}
