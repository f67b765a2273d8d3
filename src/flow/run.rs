//! One run of one workflow instance, and the `ctx` object its body receives.
//!
//! A run loads the instance and its journal, invokes the pinned function version through
//! `lua::invoke` as the identity that started the instance, and replays: every `ctx.*` call
//! takes the next journal sequence number; a finished entry returns its recorded result, a
//! missing one does the work and records it. A sleep, an event wait, a child not finished yet
//! or a step retry *suspends* the run (a marker error unwinds the body; a `pcall` that catches
//! it only makes every later `ctx.*` call raise it again) and the instance is stored with its
//! wake time. Must not keep anything between runs outside the database.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlua::{Function, IntoLuaMulti, Lua, LuaSerdeExt, MultiValue, Table, Value};
use serde_json::Value as Json;

use super::FlowService;
use super::journal::{self, FOREVER, NewFlow, Next, StepRec};
use crate::app::App;
use crate::core::{Error, ErrorCode, RequestContext, Role};
use crate::lua::components::lua_err;
use crate::lua::sandbox;
use crate::lua::{self, Env, Invocation, store, to_json};
use crate::storage::ExecControl;

thread_local! {
    /// The run on this thread (set around `lua::invoke`, read when the `flow` component is
    /// installed into the run's sandbox).
    static CURRENT: RefCell<Option<Rc<RunState>>> = const { RefCell::new(None) };
}

pub(crate) fn current() -> Option<Rc<RunState>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// The marker error that unwinds a suspended run.
#[derive(Debug)]
pub(crate) struct Suspended;

impl std::fmt::Display for Suspended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the workflow is suspended (sleeping, waiting or retrying a step); do not catch this error")
    }
}

impl std::error::Error for Suspended {}

fn suspended() -> mlua::Error {
    mlua::Error::external(Suspended)
}

fn is_marker(e: &mlua::Error) -> bool {
    match e {
        mlua::Error::ExternalError(x) => x.downcast_ref::<Suspended>().is_some(),
        mlua::Error::CallbackError { cause, .. } | mlua::Error::WithContext { cause, .. } => {
            is_marker(cause)
        }
        _ => false,
    }
}

/// The message of a Lua error without its traceback.
pub(crate) fn message(e: &mlua::Error) -> String {
    match e {
        mlua::Error::CallbackError { cause, .. } | mlua::Error::WithContext { cause, .. } => {
            message(cause)
        }
        mlua::Error::ExternalError(x) => match x.downcast_ref::<Error>() {
            Some(err) => err.message.clone(),
            None => x.to_string(),
        },
        mlua::Error::RuntimeError(m) => m.lines().next().unwrap_or(m).to_string(),
        other => {
            let t = other.to_string();
            t.lines().next().unwrap_or(&t).to_string()
        }
    }
}

/// The step in progress: when a limit ends the run inside it (its own `timeout`, the run's
/// time, memory or instruction limit, a `ctx.tx` step's transaction limit), the attempt is
/// recorded as failed after the run and retried like any failed attempt.
struct Timing {
    rec: StepRec,
    deadline: Option<Instant>,
    timeout: Option<f64>,
    retries: u32,
    backoff_ms: u64,
    started: Instant,
    /// The limit that ended the step (the run's own error may come later, e.g. from a body
    /// that caught a memory error and returned it).
    limit: Option<String>,
}

/// The state of one run, shared by the `ctx` functions.
pub(crate) struct RunState {
    pub app: App,
    pub rt: tokio::runtime::Handle,
    pub id: String,
    pub name: String,
    pub version: i64,
    pub trace_id: String,
    pub tick: Option<i64>,
    pub ctx: RequestContext,
    journal: RefCell<HashMap<i64, StepRec>>,
    seq: Cell<i64>,
    suspend: RefCell<Option<Next>>,
    fatal: RefCell<Option<Error>>,
    pending: RefCell<Vec<StepRec>>,
    bytes: Cell<u64>,
    pub defined: Cell<bool>,
    in_step: Cell<bool>,
    timing: RefCell<Option<Timing>>,
}

impl RunState {
    fn svc(&self) -> &FlowService {
        self.app.get::<FlowService>().expect("the flow service")
    }

    fn now(&self) -> i64 {
        self.svc().now_ms()
    }

    /// A suspended or failed run lets no more `ctx.*` calls through.
    fn check(&self, what: &str) -> mlua::Result<()> {
        if let Some(e) = self.fatal.borrow().as_ref() {
            return Err(lua_err(e.clone()));
        }
        if self.suspend.borrow().is_some() {
            return Err(suspended());
        }
        if self.in_step.get() {
            return Err(mlua::Error::runtime(format!(
                "ctx.{what} cannot be used inside a step (steps are the unit of replay; call it between steps)"
            )));
        }
        Ok(())
    }

    fn fail(&self, e: Error) -> mlua::Error {
        *self.fatal.borrow_mut() = Some(e.clone());
        lua_err(e)
    }

    /// The next journal position.
    fn next_seq(&self) -> mlua::Result<i64> {
        let s = self.seq.get() + 1;
        if s as usize > self.svc().settings.max_steps {
            return Err(self.fail(Error::new(
                ErrorCode::FlowLimit,
                format!(
                    "the workflow recorded more than {} journal entries ([flow] max_steps)",
                    self.svc().settings.max_steps
                ),
            )));
        }
        self.seq.set(s);
        Ok(s)
    }

    /// The recorded entry at `seq`, checked against what the replay asks for now.
    fn recorded(&self, seq: i64, kind: &str, name: &str) -> mlua::Result<Option<StepRec>> {
        let Some(r) = self.journal.borrow().get(&seq).cloned() else {
            return Ok(None);
        };
        if r.kind != kind || r.name != name {
            return Err(self.fail(Error::new(
                ErrorCode::FlowNondeterministic,
                format!(
                    "journal entry {seq} was {} '{}', but this run of the workflow asked for {kind} '{name}' there: the body must call its steps in the same order on every run (pairs() order, os.time and math.random are fixed inside flows; branch only on step results)",
                    r.kind, r.name
                ),
            )));
        }
        Ok(Some(r))
    }

    fn remember(&self, rec: StepRec) -> mlua::Result<()> {
        let n = rec.result.as_ref().map_or(0, |r| r.len()) + rec.error.as_ref().map_or(0, |e| e.len());
        self.bytes.set(self.bytes.get() + n as u64);
        let max = self.svc().settings.max_journal_bytes;
        self.journal.borrow_mut().insert(rec.seq, rec);
        if self.bytes.get() > max {
            return Err(self.fail(Error::new(
                ErrorCode::FlowLimit,
                format!("the workflow's journal passed {max} bytes ([flow] max_journal_bytes)"),
            )));
        }
        Ok(())
    }

    fn rec(&self, seq: i64, kind: &str, name: &str, status: &str) -> StepRec {
        let now = self.now();
        StepRec {
            seq,
            name: name.to_string(),
            kind: kind.to_string(),
            status: status.to_string(),
            result: None,
            error: None,
            attempts: 1,
            started_at: Some(now),
            finished_at: (status == "done").then_some(now),
            trace_id: Some(self.ctx.trace_id.clone()),
        }
    }

    /// Engine writes as the system, blocking.
    fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut rusqlite::Connection) -> crate::core::Result<R> + Send + 'static,
    ) -> mlua::Result<R> {
        self.rt
            .block_on(self.app.storage().write(
                &RequestContext::system(),
                ExecControl::lookup(),
                f,
            ))
            .map_err(lua_err)
    }

    fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> crate::core::Result<R> + Send + 'static,
    ) -> mlua::Result<R> {
        self.rt
            .block_on(self.app.storage().read(
                &RequestContext::system(),
                ExecControl::lookup(),
                f,
            ))
            .map_err(lua_err)
    }

    /// Write entries recorded only in memory so far (`now`, `random`, finished sleeps).
    fn flush(&self) -> mlua::Result<()> {
        let pending = self.pending.take();
        if pending.is_empty() {
            return Ok(());
        }
        let id = self.id.clone();
        self.write(move |c| {
            let tx = c.transaction()?;
            for p in &pending {
                journal::put_step(&tx, &id, p)?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn put(&self, rec: StepRec) -> mlua::Result<()> {
        let id = self.id.clone();
        let pending = self.pending.take();
        self.write(move |c| {
            let tx = c.transaction()?;
            for p in &pending {
                journal::put_step(&tx, &id, p)?;
            }
            journal::put_step(&tx, &id, &rec)?;
            tx.commit()?;
            Ok(())
        })
    }

    /// One posterity row per executed step.
    fn log_step(&self, rec: &StepRec, elapsed: Duration, error: Option<&str>) {
        let sink = self.app.posterity().sink();
        if !sink.enabled() {
            return;
        }
        let mut e = crate::posterity::Event::now("flow_step", Some(&self.ctx));
        e.name = Some(format!("{}.{}", self.name, rec.name));
        e.version = Some(self.version);
        e.outcome = Some(if error.is_none() { "ok" } else { "error" });
        e.error = error.map(|m| m.chars().take(1000).collect());
        e.elapsed_ms = elapsed.as_secs_f64() * 1e3;
        e.bytes = rec.result.as_ref().map(|r| r.len() as i64);
        e.detail = Some(
            serde_json::json!({"flow_id": self.id, "seq": rec.seq, "kind": rec.kind,
                               "attempt": rec.attempts, "status": rec.status})
            .to_string(),
        );
        sink.record(e);
    }

    fn backoff(&self, base_ms: u64, attempt: i64) -> i64 {
        let max = self.svc().settings.retry_backoff_max_ms;
        let shift = (attempt - 1).clamp(0, 30) as u32;
        base_ms.saturating_mul(1u64 << shift).min(max) as i64
    }
}

fn to_lua(lua: &Lua, text: Option<&str>) -> mlua::Result<Value> {
    let j: Json = match text {
        None => Json::Null,
        Some(t) => serde_json::from_str(t).map_err(mlua::Error::external)?,
    };
    lua.to_value_with(
        &j,
        mlua::SerializeOptions::new()
            .serialize_none_to_null(false)
            .serialize_unit_to_null(false),
    )
}

fn first_json(mv: &MultiValue, max: u64, what: &str) -> mlua::Result<String> {
    let v = mv.iter().next().cloned().unwrap_or(Value::Nil);
    let j = to_json(&v).map_err(|e| mlua::Error::runtime(format!("{what}: its result cannot be recorded: {e}")))?;
    let t = j.to_string();
    if t.len() as u64 > max {
        return Err(lua_err(Error::new(
            ErrorCode::FlowLimit,
            format!("{what}: its result is {} bytes, over [flow] max_result_bytes ({max})", t.len()),
        )));
    }
    Ok(t)
}

fn check_step_name(name: &str) -> mlua::Result<()> {
    if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return Err(lua_err(Error::new(
            ErrorCode::BadArguments,
            "a step name must be 1 to 200 characters without control characters",
        )));
    }
    Ok(())
}

/// `ctx.step` / `ctx.tx` options.
struct StepOpts {
    retries: u32,
    backoff_ms: u64,
    timeout: Option<f64>,
}

fn step_opts(o: Option<Table>, svc: &FlowService) -> mlua::Result<StepOpts> {
    let mut out = StepOpts {
        retries: svc.settings.step_retries,
        backoff_ms: svc.settings.retry_backoff_ms,
        timeout: None,
    };
    let Some(o) = o else { return Ok(out) };
    let bad = |m: &str| lua_err(Error::new(ErrorCode::BadArguments, format!("ctx.step options: {m}")));
    for pair in o.pairs::<Value, Value>() {
        let (k, v) = pair?;
        let key = match &k {
            Value::String(s) => s.to_string_lossy(),
            _ => return Err(bad("keys must be names")),
        };
        let num = match v {
            Value::Integer(i) => i as f64,
            Value::Number(n) => n,
            _ => return Err(bad(&format!("{key} must be a number"))),
        };
        match key.as_str() {
            "retries" if (0.0..=100.0).contains(&num) => out.retries = num as u32,
            "backoff" if (0.0..=86_400.0).contains(&num) => out.backoff_ms = (num * 1000.0) as u64,
            "timeout" if num > 0.0 && num <= 86_400.0 => out.timeout = Some(num),
            "retries" | "backoff" | "timeout" => {
                return Err(bad(&format!("{key} is out of range (retries 0..100, backoff 0..86400 s, timeout (0, 86400] s)")))
            }
            other => return Err(bad(&format!("unknown option '{other}' (retries, backoff, timeout)"))),
        }
    }
    Ok(out)
}

/// `ctx.step(name, fn, opts)` (`tx = false`) and `ctx.tx(name, fn, opts)` (`tx = true`).
fn step(
    lua: &Lua,
    env: &Rc<Env>,
    st: &Rc<RunState>,
    ctx_t: &Table,
    (name, f, opts): (String, Function, Option<Table>),
    tx: bool,
) -> mlua::Result<Value> {
    let what = if tx { "tx" } else { "step" };
    st.check(what)?;
    check_step_name(&name)?;
    let o = step_opts(opts, st.svc())?;
    let seq = st.next_seq()?;
    let mut attempts = 0;
    if let Some(p) = st.recorded(seq, what, &name)? {
        match p.status.as_str() {
            "done" => return to_lua(lua, p.result.as_deref()),
            "failed" => {
                return Err(mlua::Error::runtime(format!(
                    "step '{name}' failed after {} attempt(s): {}",
                    p.attempts,
                    p.error.as_deref().unwrap_or("")
                )));
            }
            _ => attempts = p.attempts,
        }
    }
    if st.svc().is_cancelled(&st.id) {
        return Err(st.fail(Error::new(ErrorCode::FlowCancelled, "the workflow was cancelled")));
    }
    st.flush()?;
    let attempt = attempts + 1;
    let key = format!("{}:{}", st.id, seq);
    let mut rec = st.rec(seq, what, &name, "done");
    rec.attempts = attempt;
    let max = st.svc().settings.max_result_bytes;
    let t0 = Instant::now();
    ctx_t.raw_set("idempotency_key", key.as_str())?;
    st.in_step.set(true);
    let deadline = o.timeout.filter(|_| !tx).map(|t| Instant::now() + Duration::from_secs_f64(t));
    *st.timing.borrow_mut() = Some(Timing {
        rec: rec.clone(),
        deadline,
        timeout: o.timeout.filter(|_| !tx),
        retries: o.retries,
        backoff_ms: o.backoff_ms,
        started: t0,
        limit: None,
    });
    let result: mlua::Result<String> = if tx {
        let id = st.id.clone();
        let base = rec.clone();
        let clock = st.svc().clock.clone();
        let label = format!("step '{name}'");
        let hook = move |mv: &MultiValue| -> mlua::Result<crate::lua::components::db::CommitHook> {
            let mut r = base.clone();
            r.result = Some(first_json(mv, max, &label)?);
            r.finished_at = Some(clock.now_ms());
            let id = id.clone();
            Ok(Box::new(move |c: &mut rusqlite::Connection| {
                crate::storage::engine_statements(|| journal::put_step(c, &id, &r))
            }))
        };
        let args = key.clone().into_lua_multi(lua)?;
        crate::lua::components::db::tx_then(env, f, args, Some(&hook))
            .and_then(|mv| first_json(&mv, max, &format!("step '{name}'")))
    } else {
        let outer = env.meter.tx_deadline();
        if let Some(d) = deadline {
            env.meter.set_tx_deadline(Some(outer.map_or(d, |x| x.min(d))));
        }
        let r = f
            .call::<MultiValue>(key.clone())
            .and_then(|mv| first_json(&mv, max, &format!("step '{name}'")));
        if !matches!(&r, Err(e) if sandbox::limit_of(e).is_some()) {
            env.meter.set_tx_deadline(outer);
        }
        r
    };
    // A limit ends the run: the attempt is judged after it (see `Timing`).
    match &result {
        Err(e) if sandbox::limit_of(e).is_some() => {
            if let Some(t) = st.timing.borrow_mut().as_mut() {
                t.limit = sandbox::limit_of(e).map(|l| format!("the step ended the run: Lua {l}"));
            }
            // The run is over even if the body catches this: later `ctx.*` calls are refused
            // (the attempt is recorded and retried after the run).
            *st.suspend.borrow_mut() = Some(Next::Suspended {
                status: "sleeping",
                wake_at: 0,
                event: None,
            });
        }
        _ => {
            st.timing.borrow_mut().take();
        }
    }
    st.in_step.set(false);
    ctx_t.raw_set("idempotency_key", Value::Nil)?;
    match result {
        Ok(text) => {
            rec.result = Some(text);
            rec.finished_at = Some(st.now());
            if !tx {
                st.put(rec.clone())?;
            }
            st.log_step(&rec, t0.elapsed(), None);
            let out = to_lua(lua, rec.result.as_deref());
            st.remember(rec)?;
            out
        }
        Err(e) => {
            if is_marker(&e) || sandbox::limit_of(&e).is_some() || st.fatal.borrow().is_some() {
                return Err(e);
            }
            let msg = message(&e);
            rec.error = Some(msg.chars().take(4000).collect());
            rec.finished_at = Some(st.now());
            if attempt <= o.retries as i64 {
                rec.status = "retry".into();
                st.put(rec.clone())?;
                st.log_step(&rec, t0.elapsed(), Some(&msg));
                let wake = st.now() + st.backoff(o.backoff_ms, attempt);
                *st.suspend.borrow_mut() = Some(Next::Suspended {
                    status: "sleeping",
                    wake_at: wake,
                    event: None,
                });
                Err(suspended())
            } else {
                rec.status = "failed".into();
                st.put(rec.clone())?;
                st.log_step(&rec, t0.elapsed(), Some(&msg));
                st.remember(rec)?;
                Err(mlua::Error::runtime(format!(
                    "step '{name}' failed after {attempt} attempt(s): {msg}"
                )))
            }
        }
    }
}

/// A recorded value (`now`, `random`): the journal's, or a fresh one recorded.
fn recorded_value(st: &RunState, kind: &str, fresh: impl FnOnce() -> f64) -> mlua::Result<f64> {
    if let Some(e) = st.fatal.borrow().as_ref() {
        return Err(lua_err(e.clone()));
    }
    if st.suspend.borrow().is_some() {
        return Err(suspended());
    }
    if st.in_step.get() {
        // Inside a step (`os.time()`, `math.random()` in its code) the step's result is what
        // is recorded: its values need no journal entries of their own.
        return Ok(fresh());
    }
    let seq = st.next_seq()?;
    if let Some(p) = st.recorded(seq, kind, kind)? {
        return p
            .result
            .and_then(|r| r.parse::<f64>().ok())
            .ok_or_else(|| mlua::Error::runtime(format!("journal entry {seq} ({kind}) is unreadable")));
    }
    let v = fresh();
    let mut rec = st.rec(seq, kind, kind, "done");
    rec.result = Some(Json::from(serde_json::Number::from_f64(v).unwrap_or(0.into())).to_string());
    st.pending.borrow_mut().push(rec.clone());
    st.remember(rec)?;
    Ok(v)
}

pub(crate) fn now_value(st: &RunState) -> mlua::Result<f64> {
    let now = st.now();
    recorded_value(st, "now", || now as f64 / 1000.0)
}

pub(crate) fn random_value(st: &RunState) -> mlua::Result<f64> {
    recorded_value(st, "random", || {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
    })
}

/// `ctx.sleep(seconds)` / `ctx.sleep_until(unix_seconds)`.
fn sleep(st: &RunState, until: Option<i64>, secs: f64) -> mlua::Result<()> {
    st.check("sleep")?;
    let seq = st.next_seq()?;
    let now = st.now();
    let wake = match st.recorded(seq, "sleep", "sleep")? {
        Some(p) if p.status == "done" => return Ok(()),
        Some(p) => p.result.and_then(|r| r.parse::<i64>().ok()).unwrap_or(now),
        None => until.unwrap_or(now + (secs * 1000.0) as i64),
    };
    let mut rec = st.rec(seq, "sleep", "sleep", "waiting");
    rec.result = Some(wake.to_string());
    if let Some(p) = st.journal.borrow().get(&seq) {
        rec.started_at = p.started_at;
    }
    if now >= wake {
        rec.status = "done".into();
        rec.finished_at = Some(now);
        st.pending.borrow_mut().push(rec.clone());
        st.remember(rec)?;
        return Ok(());
    }
    st.pending.borrow_mut().push(rec);
    *st.suspend.borrow_mut() = Some(Next::Suspended {
        status: "sleeping",
        wake_at: wake,
        event: None,
    });
    Err(suspended())
}

/// `ctx.wait_event(name, {timeout = s})` → the payload, or nil after the timeout.
fn wait_event(lua: &Lua, st: &RunState, name: String, timeout: Option<f64>) -> mlua::Result<Value> {
    st.check("wait_event")?;
    check_step_name(&name)?;
    let seq = st.next_seq()?;
    let now = st.now();
    let prev = st.recorded(seq, "event", &name)?;
    if let Some(p) = &prev
        && p.status == "done"
    {
        return to_lua(lua, p.result.as_deref());
    }
    let mut rec = prev.unwrap_or_else(|| {
        let mut r = st.rec(seq, "event", &name, "waiting");
        // While waiting, the entry's result is the deadline.
        r.result = Some(
            timeout
                .map(|t| (now + (t * 1000.0) as i64).to_string())
                .unwrap_or_else(|| FOREVER.to_string()),
        );
        r
    });
    let deadline: i64 = rec.result.as_deref().and_then(|d| d.parse().ok()).unwrap_or(FOREVER);
    st.flush()?;
    let (id, r2) = (st.id.clone(), rec.clone());
    if let Some(payload) = st.write(move |c| journal::consume_event(c, &id, &r2, now))? {
        rec.status = "done".into();
        rec.result = Some(payload);
        rec.finished_at = Some(now);
        let out = to_lua(lua, rec.result.as_deref());
        st.remember(rec)?;
        return out;
    }
    if now >= deadline {
        rec.status = "done".into();
        rec.result = None;
        rec.finished_at = Some(now);
        st.pending.borrow_mut().push(rec.clone());
        st.remember(rec)?;
        return Ok(Value::Nil);
    }
    st.pending.borrow_mut().push(rec);
    *st.suspend.borrow_mut() = Some(Next::Suspended {
        status: "waiting",
        wake_at: deadline,
        event: Some(format!("event:{name}")),
    });
    Err(suspended())
}

/// `ctx.child(name, input, {id=})` → the child workflow's output (raises its error).
fn child(lua: &Lua, st: &RunState, name: String, input: Value, id: Option<String>) -> mlua::Result<Value> {
    st.check("child")?;
    store::check_name(&name).map_err(lua_err)?;
    let seq = st.next_seq()?;
    let prev = st.recorded(seq, "child", &name)?;
    let child_id = match &prev {
        Some(p) if p.status == "done" => return to_lua(lua, p.result.as_deref()),
        Some(p) if p.status == "failed" => {
            return Err(mlua::Error::runtime(format!(
                "child workflow '{name}' failed: {}",
                p.error.as_deref().unwrap_or("")
            )));
        }
        // While waiting, the entry's result is the child's id.
        Some(p) => p
            .result
            .as_deref()
            .and_then(|r| serde_json::from_str::<String>(r).ok())
            .unwrap_or_default(),
        None => {
            let child_id = match id {
                Some(i) => {
                    super::component::check_id(&i).map_err(lua_err)?;
                    i
                }
                None => format!("{}.{}", st.id, seq),
            };
            let input = to_json(&input).map_err(|e| mlua::Error::runtime(format!("ctx.child: input: {e}")))?;
            let input = input.to_string();
            if input.len() as u64 > st.svc().settings.max_input_bytes {
                return Err(lua_err(Error::new(ErrorCode::FlowLimit, "ctx.child: the input is over [flow] max_input_bytes")));
            }
            let mut rec = st.rec(seq, "child", &name, "waiting");
            rec.result = Some(Json::String(child_id.clone()).to_string());
            let nf = NewFlow {
                id: child_id.clone(),
                name: name.clone(),
                input,
                trace_id: st.ctx.trace_id.clone(),
                user_id: st.ctx.user_id.clone(),
                role: st.ctx.role.as_str().to_string(),
                claims: st.ctx.claims.as_ref().map(|c| Json::Object((**c).clone()).to_string()),
                parent_id: Some(st.id.clone()),
                schedule: None,
                tick: None,
                now: st.now(),
            };
            let (pid, pending) = (st.id.clone(), st.pending.take());
            st.write(move |c| {
                let tx = c.transaction()?;
                for p in &pending {
                    journal::put_step(&tx, &pid, p)?;
                }
                journal::insert(&tx, &nf)?;
                journal::put_step(&tx, &pid, &rec)?;
                tx.commit()?;
                Ok(())
            })?;
            st.journal.borrow_mut().insert(seq, {
                let mut r = st.rec(seq, "child", &name, "waiting");
                r.result = Some(Json::String(child_id.clone()).to_string());
                r
            });
            st.svc().wake();
            child_id
        }
    };
    let cid = child_id.clone();
    let out = st.read(move |c| journal::outcome(c, &cid))?;
    let mut rec = st.rec(seq, "child", &name, "done");
    if let Some(p) = st.journal.borrow().get(&seq) {
        rec.started_at = p.started_at;
    }
    match out {
        Some((s, output, _)) if s == "completed" => {
            rec.result = output;
            st.put(rec.clone())?;
            let v = to_lua(lua, rec.result.as_deref());
            st.remember(rec)?;
            v
        }
        Some((s, _, error)) if s == "failed" || s == "cancelled" => {
            rec.status = "failed".into();
            rec.error = Some(format!("{child_id} {s}: {}", error.unwrap_or_default()));
            st.put(rec.clone())?;
            let msg = format!("child workflow '{name}' failed: {}", rec.error.as_deref().unwrap_or(""));
            st.remember(rec)?;
            Err(mlua::Error::runtime(msg))
        }
        None => Err(st.fail(Error::new(ErrorCode::NotFound, format!("child flow '{child_id}' is gone")))),
        Some(_) => {
            *st.suspend.borrow_mut() = Some(Next::Suspended {
                status: "waiting",
                wake_at: FOREVER,
                event: Some(format!("child:{child_id}")),
            });
            Err(suspended())
        }
    }
}

/// A catchable failure (a step out of attempts, a failed child, bad arguments) as
/// `(false, message)`; suspensions, limits and fatal errors (which end the run whatever the
/// body does) stay errors.
fn catchable_result(lua: &Lua, st: &RunState, r: mlua::Result<Value>) -> mlua::Result<(bool, Value)> {
    match r {
        Ok(v) => Ok((true, v)),
        Err(e) if !is_marker(&e) && sandbox::limit_of(&e).is_none() && st.fatal.borrow().is_none() => {
            Ok((false, Value::String(lua.create_string(message(&e))?)))
        }
        Err(e) => Err(e),
    }
}

/// The `ctx` table a workflow body receives.
pub(crate) fn make_ctx(lua: &Lua, env: &Rc<Env>, st: &Rc<RunState>) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("id", st.id.as_str())?;
    t.set("name", st.name.as_str())?;
    t.set("version", st.version)?;
    t.set("trace_id", st.trace_id.as_str())?;
    t.set("user_id", st.ctx.user_id.clone())?;
    t.set("role", st.ctx.role.as_str())?;
    if let Some(tick) = st.tick {
        t.set("scheduled_at", tick as f64 / 1000.0)?;
    }
    // Failures a workflow may catch (a step out of attempts, a failed child) are raised as
    // plain Lua strings by a small Lua wrapper: the host function answers (false, message).
    let raiser: Function = lua
        .load("local raw = ...\nreturn function(...) local ok, v = raw(...) if not ok then error(v, 2) end return v end")
        .set_name("=flow_ctx")
        .into_function()?;
    for tx in [false, true] {
        let (e, s, weak) = (Rc::clone(env), Rc::clone(st), t.clone());
        let raw = lua.create_function(move |lua, args: (String, Function, Option<Table>)| {
            catchable_result(lua, &s, step(lua, &e, &s, &weak, args, tx))
        })?;
        t.set(if tx { "tx" } else { "step" }, raiser.call::<Function>(raw)?)?;
    }

    let s = Rc::clone(st);
    t.set(
        "sleep",
        lua.create_function(move |_, secs: f64| {
            if !secs.is_finite() || !(0.0..=10.0 * 366.0 * 86_400.0).contains(&secs) {
                return Err(lua_err(Error::new(ErrorCode::BadArguments, "ctx.sleep(seconds): 0 to ten years")));
            }
            sleep(&s, None, secs)
        })?,
    )?;
    let s = Rc::clone(st);
    t.set(
        "sleep_until",
        lua.create_function(move |_, at: f64| {
            if !at.is_finite() || !(0.0..=1e11).contains(&at) {
                return Err(lua_err(Error::new(ErrorCode::BadArguments, "ctx.sleep_until(unix_seconds): a time as returned by ctx.now()")));
            }
            sleep(&s, Some((at * 1000.0) as i64), 0.0)
        })?,
    )?;
    let s = Rc::clone(st);
    t.set(
        "wait_event",
        lua.create_function(move |lua, (name, o): (String, Option<Table>)| {
            let timeout = match o {
                None => None,
                Some(o) => match o.get::<Value>("timeout")? {
                    Value::Nil => None,
                    Value::Integer(i) if i > 0 => Some(i as f64),
                    Value::Number(n) if n > 0.0 && n.is_finite() => Some(n),
                    _ => return Err(lua_err(Error::new(ErrorCode::BadArguments, "ctx.wait_event: timeout must be a positive number of seconds"))),
                },
            };
            wait_event(lua, &s, name, timeout)
        })?,
    )?;
    let s = Rc::clone(st);
    t.set(
        "now",
        lua.create_function(move |_, ()| {
            s.check("now")?;
            now_value(&s)
        })?,
    )?;
    let s = Rc::clone(st);
    t.set(
        "random",
        lua.create_function(move |_, ()| {
            s.check("random")?;
            random_value(&s)
        })?,
    )?;
    let s = Rc::clone(st);
    let raw = lua.create_function(move |lua, (name, input, o): (String, Value, Option<Table>)| {
        let id = match o {
            None => None,
            Some(o) => o.get::<Option<String>>("id")?,
        };
        catchable_result(lua, &s, child(lua, &s, name, input, id))
    })?;
    t.set("child", raiser.call::<Function>(raw)?)?;
    Ok(t)
}

/// Install the replay-safe `math.random`, `os.time`, `os.date` and `pairs` of a flow run.
pub(crate) fn fix_nondeterminism(lua: &Lua, st: &Rc<RunState>) -> mlua::Result<()> {
    let g = lua.globals();
    let math: Table = g.get("math")?;
    let s = Rc::clone(st);
    math.raw_set(
        "random",
        lua.create_function(move |_, (m, n): (Option<i64>, Option<i64>)| {
            let r = random_value(&s)?;
            let pick = |lo: i64, hi: i64| -> mlua::Result<Value> {
                if lo > hi {
                    return Err(mlua::Error::runtime("bad argument to 'random' (interval is empty)"));
                }
                let span = (hi as i128 - lo as i128 + 1) as f64;
                Ok(Value::Integer(lo + (r * span).floor() as i64))
            };
            match (m, n) {
                (None, _) => Ok(Value::Number(r)),
                (Some(m), None) => pick(1, m),
                (Some(m), Some(n)) => pick(m, n),
            }
        })?,
    )?;
    math.raw_set("randomseed", lua.create_function(|_, _: MultiValue| Ok(()))?)?;
    let os: Table = g.get("os")?;
    let (time, date): (Function, Function) = (os.get("time")?, os.get("date")?);
    let s = Rc::clone(st);
    os.raw_set(
        "time",
        lua.create_function(move |_, t: Option<Table>| match t {
            Some(t) => time.call::<Value>(t),
            None => Ok(Value::Integer(now_value(&s)?.floor() as i64)),
        })?,
    )?;
    let s = Rc::clone(st);
    os.raw_set(
        "date",
        lua.create_function(move |_, (fmt, t): (Option<String>, Option<i64>)| {
            let t = match t {
                Some(t) => t,
                None => now_value(&s)?.floor() as i64,
            };
            date.call::<Value>((fmt.unwrap_or_else(|| "%c".into()), t))
        })?,
    )?;
    let sorted: Function = lua
        .load(
            r#"
local next, type, sort, getmetatable, rawpairs = next, type, table.sort, getmetatable, pairs
local rank = {number = 1, string = 2, boolean = 3}
local function less(a, b)
  local ta, tb = type(a), type(b)
  if ta ~= tb then return (rank[ta] or 4) < (rank[tb] or 4) end
  if ta == "number" or ta == "string" then return a < b end
  if ta == "boolean" then return (not a) and b end
  return false
end
return function(t)
  local mt = type(t) == "table" and getmetatable(t)
  if type(t) ~= "table" or (type(mt) == "table" and mt.__pairs) then return rawpairs(t) end
  local keys, n = {}, 0
  for k in next, t do n = n + 1; keys[n] = k end
  sort(keys, less)
  local i = 0
  return function()
    i = i + 1
    local k = keys[i]
    if k ~= nil then return k, t[k] end
  end, t, nil
end
"#,
        )
        .set_name("=flow_pairs")
        .call(())?;
    g.raw_set("pairs", sorted)?;
    Ok(())
}

/// Run instance `id` once (from a worker thread): replay, new work, then store where it stands.
pub fn run_instance(app: &App, rt: tokio::runtime::Handle, id: &str) {
    let Some(svc) = app.get::<FlowService>() else { return };
    let storage = app.storage().clone();
    let sys = RequestContext::system();
    let fid = id.to_string();
    let loaded = rt.block_on(storage.read(&sys, ExecControl::lookup(), move |c| {
        let Some(row) = journal::load(c, &fid)? else {
            return Ok(None);
        };
        let src = store::get(c, &row.name, Some(row.version));
        let steps = journal::steps(c, &row.id)?;
        Ok(Some((row, src, steps)))
    }));
    let (row, src, steps) = match loaded {
        Ok(Some(x)) => x,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(flow_id = %id, error = %e, "flow: loading an instance failed");
            return;
        }
    };
    if !matches!(row.status.as_str(), "pending" | "running" | "sleeping" | "waiting") || svc.is_cancelled(id) {
        return;
    }
    let write = |next: Next, pending: Vec<StepRec>| {
        let (fid, now) = (id.to_string(), svc.now_ms());
        let r = rt.block_on(storage.write(&sys, ExecControl::lookup(), move |c| {
            let tx = c.transaction()?;
            for p in &pending {
                journal::put_step(&tx, &fid, p)?;
            }
            let changed = journal::finish(&tx, &fid, &next, now)?;
            if changed && let Next::Suspended { event: Some(_), .. } = next {
                // An event or a child that arrived while this run was going wakes it now.
                tx.execute(
                    &format!("UPDATE _ichibase_flows SET wake_at = 0 WHERE id = ?1 AND status = 'waiting' AND (
                       (wait_event LIKE 'event:%' AND EXISTS (SELECT 1 FROM _ichibase_flow_events e WHERE e.flow_id = ?1
                          AND e.name = substr(wait_event, 7) AND e.consumed_seq IS NULL))
                       OR (wait_event LIKE 'child:%' AND EXISTS (SELECT 1 FROM _ichibase_flows k WHERE k.id = substr(wait_event, 7)
                          AND k.status NOT IN {})))", journal::ACTIVE),
                    [&fid],
                )?;
            }
            tx.commit()?;
            Ok(changed)
        }));
        if let Err(e) = r {
            tracing::warn!(flow_id = %id, error = %e, "flow: recording a run failed");
        }
    };
    let src = match src {
        Ok(s) => s,
        Err(e) => {
            write(
                Next::Failed {
                    error: format!("version {} of workflow '{}' is gone: {}", row.version, row.name, e.message),
                    code: ErrorCode::FlowFailed.number(),
                },
                vec![],
            );
            return;
        }
    };
    let fid = id.to_string();
    let now = svc.now_ms();
    match rt.block_on(storage.write(&sys, ExecControl::lookup(), move |c| journal::mark_running(c, &fid, now))) {
        Ok(true) => {}
        _ => return,
    }
    let mut ctx = RequestContext::new(None, Role::from_name(&row.role));
    ctx.user_id = row.user_id.clone();
    ctx.claims = row
        .claims
        .as_deref()
        .and_then(|c| serde_json::from_str::<serde_json::Map<String, Json>>(c).ok())
        .map(Arc::new);
    ctx.trace_id = row.trace_id.clone();
    let bytes: u64 = steps
        .iter()
        .map(|s| (s.result.as_ref().map_or(0, |r| r.len()) + s.error.as_ref().map_or(0, |e| e.len())) as u64)
        .sum();
    let state = Rc::new(RunState {
        app: app.clone(),
        rt: rt.clone(),
        id: row.id.clone(),
        name: row.name.clone(),
        version: row.version,
        trace_id: row.trace_id.clone(),
        tick: row.tick,
        ctx: ctx.clone(),
        journal: RefCell::new(steps.into_iter().map(|s| (s.seq, s)).collect()),
        seq: Cell::new(0),
        suspend: RefCell::new(None),
        fatal: RefCell::new(None),
        pending: RefCell::new(Vec::new()),
        bytes: Cell::new(bytes),
        defined: Cell::new(false),
        in_step: Cell::new(false),
        timing: RefCell::new(None),
    });
    let mut runtime = lua::Runtime::of_app(app, rt.clone());
    runtime.options.timeout = Duration::from_secs_f64(svc.settings.run_timeout_secs);
    let inv = Invocation {
        function: row.name.clone(),
        version: row.version,
        source: src.source,
        input: serde_json::from_str(&row.input).unwrap_or(Json::Null),
        ..Default::default()
    };
    CURRENT.with(|c| *c.borrow_mut() = Some(Rc::clone(&state)));
    let outcome = lua::invoke(&runtime, ctx, inv);
    CURRENT.with(|c| c.borrow_mut().take());
    let mut pending = state.pending.take();
    let fatal = state.fatal.borrow_mut().take();
    let suspend = state.suspend.borrow_mut().take();
    let timing = state.timing.borrow_mut().take();
    let next = if let Some(e) = fatal {
        Next::Failed { error: e.message, code: e.code.number() }
    } else if let Some(t) = timing {
        // A limit ended the run inside a step: a failed attempt, retried or recorded as failed
        // (the next run raises it in the body, where `pcall` may catch it).
        if matches!(&outcome.result, Err(e) if e.code == ErrorCode::ShuttingDown) {
            return;
        }
        let mut rec = t.rec;
        let now = svc.now_ms();
        rec.error = Some(match (t.timeout, t.deadline) {
            (Some(secs), Some(d)) if Instant::now() >= d => {
                format!("the step ran past its time limit ({secs} s)")
            }
            _ => t.limit.clone().unwrap_or_else(|| match &outcome.result {
                Err(e) => e.message.clone(),
                Ok(_) => "the run ended inside the step".into(),
            }),
        });
        rec.finished_at = Some(now);
        let wake = if rec.attempts <= t.retries as i64 {
            rec.status = "retry".into();
            now + state.backoff(t.backoff_ms, rec.attempts)
        } else {
            rec.status = "failed".into();
            now
        };
        state.log_step(&rec, t.started.elapsed(), rec.error.clone().as_deref());
        pending.push(rec);
        Next::Suspended { status: "sleeping", wake_at: wake, event: None }
    } else if let Some(s) = suspend {
        s
    } else {
        match outcome.result {
            Ok(_) if !state.defined.get() => Next::Failed {
                error: format!(
                    "version {} of function '{}' does not call flow.define('{}', function(ctx, input) ... end)",
                    row.version, row.name, row.name
                ),
                code: ErrorCode::FlowFailed.number(),
            },
            Ok(v) => {
                let t = v.to_string();
                if t.len() as u64 > svc.settings.max_result_bytes {
                    Next::Failed {
                        error: format!("the workflow's output is {} bytes, over [flow] max_result_bytes", t.len()),
                        code: ErrorCode::FlowLimit.number(),
                    }
                } else {
                    Next::Completed(t)
                }
            }
            // Stopping: the instance stays `running` and is picked up again at the next start.
            Err(e) if matches!(e.code, ErrorCode::ShuttingDown) => return,
            Err(e) => Next::Failed { error: e.message, code: e.code.number() },
        }
    };
    let finished = matches!(next, Next::Completed(_) | Next::Failed { .. });
    if finished {
        let sink = app.posterity().sink();
        if sink.enabled() {
            let mut e = crate::posterity::Event::now("flow", Some(&state.ctx));
            e.name = Some(row.name.clone());
            e.version = Some(row.version);
            let failed = match &next {
                Next::Failed { error, .. } => Some(error.clone()),
                _ => None,
            };
            e.outcome = Some(if failed.is_none() { "ok" } else { "error" });
            e.error = failed.map(|m| m.chars().take(1000).collect());
            e.detail = Some(
                serde_json::json!({"flow_id": row.id, "runs": row.runs + 1, "steps": state.seq.get()})
                    .to_string(),
            );
            sink.record(e);
        }
    }
    if finished && row.parent_id.is_some() {
        svc.wake();
    }
    write(next, pending);
}
