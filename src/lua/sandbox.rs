//! The sandboxed Lua 5.4 state of one invocation: which globals exist, and the limits.
//!
//! A fresh state per invocation (so no invocation sees another's globals), with only `base`
//! (minus `dofile`, `loadfile`, `require`, raw `load`, `collectgarbage` control), `string`
//! (minus `dump`; the string metatable is locked), `table`, `math`, `utf8`, `coroutine` and
//! `os.time/clock/date`. Lua's `debug` library is loaded but kept by the host only; user code
//! sees the safe `debug` component instead (the tracer reads locals through the C API).
//!
//! Limits: a wall-clock deadline, a CPU-time budget and a memory limit enforced by the
//! allocator; optionally an instruction budget. Untraced code runs with **no hook at all** (a
//! count hook puts Lua 5.4's interpreter in its per-instruction "trap" path, about 2x the CPU):
//! the [`watchdog`] thread measures the invocation thread's CPU clock and the wall clock, and
//! when a limit is reached it installs the sandbox's hook on the running state and on the
//! coroutines it is running (`lua_sethook` is safe to call asynchronously, as `lua.c` does for
//! Ctrl-C), so the invocation stops at its next VM instruction. Only an explicit instruction
//! budget (`lua_instruction_limit` > 0, deterministic but ~2x slower) installs a count hook
//! ([`HOOK_EVERY`] instructions, a global hook, so coroutines inherit it). A traced run installs
//! the tracer's C hook (`trace::trace_hook`: line, return and count events; coroutines inherit
//! it), which passes the limit checks to this module's mlua hook every [`HOOK_EVERY`]
//! instructions or once the watchdog rang; the watchdog installs that same C hook. Every host
//! function checks the limits before it starts ([`guard_host_functions`]) and long host loops
//! check them through [`time_check`]. Once a limit fires it stays fired: `pcall`, `xpcall` and
//! `coroutine.resume` re-raise it instead of catching it. `__gc` metamethods are refused
//! (finalizers run with hooks disabled, so they could escape the limits); pattern matching is
//! refused on subject/pattern combinations whose backtracking could run unbounded in C.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Instant;

use mlua::{Function, HookTriggers, Lua, LuaOptions, StdLib, Table, Value, VmState, ffi};

/// VM instructions between two checks of the budget and the deadline.
pub const HOOK_EVERY: u32 = 1000;

/// Why an invocation was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Instructions,
    Time,
    /// The invocation thread's CPU time passed `[lua_limits]`/`lua_cpu_limit_secs`.
    Cpu,
    Memory,
    /// A `db.tx` (or an autocommitted write) ran past `[lua_limits] tx_timeout_secs`.
    Transaction,
    /// A run on an async worker ([`Binding::set_inline`]) called a host function that may
    /// block or reach outside the invocation: the run is abandoned (it changed nothing outside
    /// its sandbox) and made again on a blocking thread. Never reported to a caller.
    Inline,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Limit::Instructions => "instruction limit exceeded",
            Limit::Time => "time limit exceeded",
            Limit::Cpu => "CPU time limit exceeded",
            Limit::Memory => "memory limit exceeded",
            Limit::Transaction => "transaction time limit exceeded",
            Limit::Inline => "the run must continue on a blocking thread",
        })
    }
}

impl std::error::Error for Limit {}

/// Limits of one invocation.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// An instruction budget, counted by a count hook (`None`: no count hook; the CPU budget
    /// and the deadline are enforced by the watchdog).
    pub instructions: Option<u64>,
    /// CPU time of the invocation's thread.
    pub cpu: std::time::Duration,
    pub memory: usize,
    pub deadline: Instant,
}

/// Shared between the hook, the wrapped `pcall`s and the host.
#[derive(Default)]
pub struct Meter {
    pub instructions: Cell<u64>,
    pub peak_memory: Cell<usize>,
    pub tripped: Cell<Option<Limit>>,
    /// Deadline of the open `db.tx`, if any: the hook ends the invocation past it.
    tx_deadline: Cell<Option<Instant>>,
    /// What the watchdog shares with this invocation.
    pub alarm: std::sync::Arc<watchdog::Alarm>,
}

impl Meter {
    pub fn tx_deadline(&self) -> Option<Instant> {
        self.tx_deadline.get()
    }

    /// Set or clear the open `db.tx`'s deadline (the watchdog enforces it too).
    pub fn set_tx_deadline(&self, d: Option<Instant>) {
        self.tx_deadline.set(d);
        self.alarm.set_tx_deadline(d);
    }

    /// A limit the watchdog found reached, if any.
    fn alarmed(&self) -> Option<Limit> {
        self.alarm.fired()
    }
}

/// Find a [`Limit`] inside an mlua error chain.
pub fn limit_of(e: &mlua::Error) -> Option<Limit> {
    match e {
        mlua::Error::MemoryError(_) => Some(Limit::Memory),
        mlua::Error::ExternalError(x) => x.downcast_ref::<Limit>().copied(),
        mlua::Error::CallbackError { cause, .. } => limit_of(cause),
        mlua::Error::WithContext { cause, .. } => limit_of(cause),
        _ => None,
    }
}

/// The invocation a state serves: its meter and limits, read by the hook, the prelude's
/// guards and the host-function wrappers. A fresh state is bound once; a pooled state
/// (`super::pool`) is bound again for every invocation it runs.
pub struct Binding {
    meter: RefCell<Rc<Meter>>,
    limits: Cell<Limits>,
    /// The sandbox's hook function (what the watchdog installs when a limit is reached).
    hook: Cell<Option<ffi::lua_Hook>>,
    /// The run is on an async worker: only [`INLINE_HOST_FUNCTIONS`] may be called.
    inline: Cell<bool>,
}

impl Binding {
    pub fn new(meter: Rc<Meter>, limits: Limits) -> Rc<Binding> {
        Rc::new(Binding {
            meter: RefCell::new(meter),
            limits: Cell::new(limits),
            hook: Cell::new(None),
            inline: Cell::new(false),
        })
    }

    pub fn meter(&self) -> Rc<Meter> {
        Rc::clone(&self.meter.borrow())
    }

    pub fn limits(&self) -> Limits {
        self.limits.get()
    }

    /// Serve the next invocation (between invocations only: no Lua code of this state runs).
    pub fn bind(&self, lua: &Lua, meter: Rc<Meter>, limits: Limits) -> mlua::Result<()> {
        meter.alarm.set_hook(self.hook.get());
        *self.meter.borrow_mut() = meter;
        self.limits.set(limits);
        lua.set_memory_limit(limits.memory)?;
        Ok(())
    }

    fn check_deadline(&self) -> mlua::Result<()> {
        check_deadline(&self.meter.borrow(), &self.limits.get())
    }

    /// Mark the next run as running on an async worker (see [`Limit::Inline`]).
    pub fn set_inline(&self, inline: bool) {
        self.inline.set(inline);
    }

    /// Move the bound run's wall-clock deadline (before it starts).
    pub fn set_deadline(&self, deadline: Instant) {
        self.limits.set(Limits {
            deadline,
            ..self.limits.get()
        });
    }
}

/// Host functions a run on an async worker may call (`[lua_limits] inline_budget_us`): they
/// neither block nor do anything outside the invocation, so a run abandoned at a later host
/// call leaves no trace and can be made again from the start. Any other host function ends
/// such a run with [`Limit::Inline`] before it does anything.
pub const INLINE_HOST_FUNCTIONS: &[(&str, &str)] = &[
    ("json", "encode"),
    ("json", "decode"),
    ("debug", "trace_id"),
    ("debug", "tracing"),
    ("debug", "traceback"),
    // Records only into a trace, and inline runs are untraced.
    ("debug", "checkpoint"),
];

/// Build the sandboxed state. With a tracer, the hook also records every executed line.
pub fn new_state(
    limits: Limits,
    meter: Rc<Meter>,
    tracer: Option<Rc<std::cell::RefCell<super::trace::Tracer>>>,
) -> mlua::Result<(Lua, Table)> {
    new_bound_state(&Binding::new(meter, limits), tracer)
}

/// [`new_state`] serving the invocation `binding` names (which may change between runs).
pub fn new_bound_state(
    binding: &Rc<Binding>,
    tracer: Option<Rc<std::cell::RefCell<super::trace::Tracer>>>,
) -> mlua::Result<(Lua, Table)> {
    let limits = binding.limits();
    // SAFETY: the debug library is loaded for the host only; it is removed from the globals
    // below before any user code runs.
    let lua = unsafe {
        Lua::unsafe_new_with(
            StdLib::COROUTINE
                | StdLib::TABLE
                | StdLib::STRING
                | StdLib::UTF8
                | StdLib::MATH
                | StdLib::OS
                | StdLib::DEBUG,
            LuaOptions::new(),
        )
    };
    let g = lua.globals();
    let host_debug: Table = g.get("debug")?;
    for name in [
        "dofile",
        "loadfile",
        "require",
        "debug",
        "collectgarbage",
        "print",
        "package",
        "io",
    ] {
        g.raw_set(name, Value::Nil)?;
    }
    // os: only the clock.
    let os: Table = g.get("os")?;
    let safe_os = lua.create_table()?;
    for name in ["time", "clock", "date", "difftime"] {
        safe_os.raw_set(name, os.get::<Value>(name)?)?;
    }
    g.raw_set("os", safe_os)?;
    // string: no dump; lock the shared string metatable.
    let string: Table = g.get("string")?;
    string.raw_set("dump", Value::Nil)?;
    let smt: Table = host_debug
        .get::<Function>("getmetatable")?
        .call(lua.create_string("")?)?;
    smt.raw_set("__metatable", false)?;
    // collectgarbage: reading the count only.
    g.raw_set(
        "collectgarbage",
        lua.create_function(|lua, opt: Option<String>| match opt.as_deref() {
            Some("count") => Ok(Value::Number(lua.used_memory() as f64 / 1024.0)),
            _ => Err(mlua::Error::runtime(
                "collectgarbage: only collectgarbage('count') is available in the sandbox",
            )),
        })?,
    )?;
    // setmetatable without __gc (finalizers run with hooks off).
    let real_setmt: Function = g.get("setmetatable")?;
    g.raw_set(
        "setmetatable",
        lua.create_function(move |_, (t, mt): (Value, Value)| {
            if let Value::Table(m) = &mt {
                if !m.raw_get::<Value>("__gc")?.is_nil() {
                    return Err(mlua::Error::runtime(
                        "setmetatable: __gc metamethods are not allowed in the sandbox",
                    ));
                }
            }
            real_setmt.call::<Value>((t, mt))
        })?,
    )?;
    // Host helpers for the prelude: raise a tripped limit / the deadline; did a limit trip?
    let (b1, b2, b3) = (Rc::clone(binding), Rc::clone(binding), Rc::clone(binding));
    let guard = lua.create_function(move |_, ()| b1.check_deadline())?;
    let tripped = lua.create_function(move |_, ()| Ok(b2.meter.borrow().tripped.get().is_some()))?;
    let out_of_memory = lua.create_function(move |_, ()| -> mlua::Result<()> {
        b3.meter.borrow().tripped.set(Some(Limit::Memory));
        Err(mlua::Error::external(Limit::Memory))
    })?;
    // The coroutines a resume runs, for the watchdog (it must stop code running inside one).
    let (b1, b2) = (Rc::clone(binding), Rc::clone(binding));
    let enter_co = lua.create_function(move |_, co: mlua::Thread| {
        b1.meter.borrow().alarm.enter(co.to_pointer() as usize);
        Ok(())
    })?;
    let leave_co = lua.create_function(move |_, rest: mlua::MultiValue| {
        b2.meter.borrow().alarm.leave();
        Ok(rest)
    })?;
    let pattern_ok = lua.create_function(
        |_, (name, s, p, plain): (String, mlua::String, mlua::String, bool)| {
            pattern_guard(&name, s.as_bytes().len(), &p.as_bytes(), plain)
        },
    )?;
    let thrown = lua.create_table()?;
    lua.set_named_registry_value(THROWN, &thrown)?;
    lua.load(PRELUDE)
        .set_name("=sandbox")
        .set_mode(mlua::ChunkMode::Text)
        .call::<()>((
            guard,
            tripped,
            out_of_memory,
            pattern_ok,
            limits.memory as i64,
            MAX_LOAD as i64,
            enter_co,
            leave_co,
            thrown,
        ))?;
    lua.set_memory_limit(limits.memory)?;
    match tracer {
        None => limit_hook(&lua, binding)?,
        Some(t) => start_trace(&lua, binding, t)?,
    }
    Ok((lua, host_debug))
}

/// The untraced hook: mlua's, running the limit checks every [`HOOK_EVERY`] instructions. It
/// stays installed only with an instruction budget; otherwise it is taken off again and the
/// watchdog puts it back when a limit is reached.
fn limit_hook(lua: &Lua, binding: &Rc<Binding>) -> mlua::Result<()> {
    let b = Rc::clone(binding);
    lua.set_global_hook(
        HookTriggers::new().every_nth_instruction(HOOK_EVERY),
        move |lua, _d| {
            check(lua, &b.meter.borrow(), &b.limits.get())?;
            Ok(VmState::Continue)
        },
    )?;
    let budget = binding.limits().instructions.is_some();
    // SAFETY: reads the hook mlua installed on the main state, and (without an instruction
    // budget) takes it off again: mlua keeps the callback, and the watchdog puts the same hook
    // function back when a limit is reached.
    unsafe {
        lua.exec_raw::<()>((), |l| {
            binding.hook.set(ffi::lua_gethook(l));
            if !budget {
                ffi::lua_sethook(l, None, 0, 0);
            }
        })?;
    }
    binding.meter.borrow().alarm.set_hook(binding.hook.get());
    Ok(())
}

/// Record the state's next run with `tracer`: the tracer's C hook (`trace::trace_hook`) counts
/// instructions and records lines itself, and hands mlua's hook the limit checks (every
/// [`HOOK_EVERY`] instructions, or once a limit is reached), which raises their errors. Called
/// when a state is built for a traced run, and by a pooled state before each traced run it
/// serves (between runs only: no Lua code of this state runs); [`stop_trace`] undoes it.
pub fn start_trace(
    lua: &Lua,
    binding: &Rc<Binding>,
    tracer: Rc<RefCell<super::trace::Tracer>>,
) -> mlua::Result<()> {
    let b = Rc::clone(binding);
    lua.set_global_hook(HookTriggers::new().every_nth_instruction(1), move |lua, d| {
        let (m, limits) = (b.meter(), b.limits.get());
        match d.event() {
            mlua::DebugEvent::Count => check_counted(lua, &m, &limits)?,
            _ => check_deadline(&m, &limits)?,
        }
        Ok(VmState::Continue)
    })?;
    // SAFETY: only reads the hook function mlua installed.
    let mut slow = None;
    unsafe { lua.exec_raw::<()>((), |l| slow = ffi::lua_gethook(l))? };
    // One context per state, kept in its app data for as long as the state lives (coroutines
    // of earlier runs copied its address): a later run updates it in place.
    let ptr: *const super::trace::HookCtx = match lua.app_data_mut::<super::trace::HookCtxBox>() {
        Some(mut ctx) => {
            ctx.0.meter = binding.meter();
            ctx.0.tracer = tracer;
            ctx.0.slow = slow;
            let p: *const super::trace::HookCtx = &*ctx.0;
            p
        }
        None => {
            let ctx = Box::new(super::trace::HookCtx {
                meter: binding.meter(),
                tracer,
                slow,
            });
            let ptr: *const super::trace::HookCtx = &*ctx;
            lua.set_app_data(super::trace::HookCtxBox(ctx));
            ptr
        }
    };
    // SAFETY: `ctx` lives in the state's app data, as long as the state; it is set before any
    // user code of the run runs (coroutines copy the extra space when created). The hook
    // function is read back for the watchdog, which installs it when a limit is reached (it
    // keeps the line and return events). The count starts at 1 (a short run's count is exact).
    unsafe {
        lua.exec_raw::<()>((), |l| {
            super::trace::attach(l, ptr);
            ffi::lua_sethook(
                l,
                Some(super::trace::trace_hook),
                ffi::LUA_MASKLINE | ffi::LUA_MASKRET | ffi::LUA_MASKCOUNT,
                1,
            );
            binding.hook.set(ffi::lua_gethook(l));
        })?
    };
    binding.meter.borrow().alarm.set_hook(binding.hook.get());
    Ok(())
}

/// A traced run is over (a pooled state, between runs): the tracer's hook is off, the main
/// state's extra space no longer names the context, and the untraced limit hook is back.
pub fn stop_trace(lua: &Lua, binding: &Rc<Binding>) -> mlua::Result<()> {
    // SAFETY: between runs (no Lua code of this state runs). Coroutines the run created keep
    // the context's address, which stays valid (the context lives as long as the state).
    unsafe {
        lua.exec_raw::<()>((), |l| {
            ffi::lua_sethook(l, None, 0, 0);
            super::trace::attach(l, std::ptr::null());
        })?
    };
    limit_hook(lua, binding)
}

/// Registry name of the table holding the last table thrown with `error` or `assert`.
pub(crate) const THROWN: &str = "ichibase_thrown";

/// The table an uncaught error was thrown with, if `e` is such an error: mlua reports a table
/// error value as `table: 0x...` (or `<table 0x...>`); the prelude's `error`/`assert` kept the last one thrown.
pub fn thrown_table(lua: &Lua, e: &mlua::Error) -> Option<Table> {
    let msg = match e {
        mlua::Error::RuntimeError(m) => m,
        _ => return None,
    };
    let first = msg.lines().next().unwrap_or("").trim();
    let ptr = match first.strip_prefix("table: ") {
        Some(p) => p,
        None => first.strip_prefix("<table ")?.strip_suffix('>')?,
    };
    let slot: Table = lua.named_registry_value(THROWN).ok()?;
    let t: Table = slot.raw_get(1).ok()?;
    (format!("{:?}", t.to_pointer()) == ptr).then_some(t)
}

/// Largest chunk `load` accepts at run time (parsing runs in C, out of the hook's reach).
pub const MAX_LOAD: usize = 64 * 1024;

/// Wrappers installed by the host before user code runs. They capture the real functions as
/// upvalues; user code only ever sees the wrappers. `guard()` raises a tripped limit or the
/// deadline (C functions below do not run the count hook, so their wrappers check first).
const PRELUDE: &str = r#"
local guard, tripped, out_of_memory, pattern_ok, memory_limit, max_load, enter_co, leave_co, thrown = ...
local type, select, error, tostring = type, select, error, tostring
local real_pcall, real_xpcall = pcall, xpcall
local co_resume, co_close, co_create, co_status = coroutine.resume, coroutine.close, coroutine.create, coroutine.status
local s_rep, s_find, s_match, s_gmatch, s_gsub = string.rep, string.find, string.match, string.gmatch, string.gsub
local t_move, t_insert, t_remove, t_concat = table.move, table.insert, table.remove, table.concat
local real_load, sandbox_env = load, _G

-- A limit that fired stays fired: protected calls re-raise it instead of catching it.
local function pass(ok, ...)
  if tripped() then guard() end
  -- A caught memory error is the memory limit: it ends the invocation.
  if ok == false and ... == "not enough memory" then out_of_memory() end
  return ok, ...
end
pcall = function(f, ...) guard() return pass(real_pcall(f, ...)) end
xpcall = function(f, handler, ...)
  guard()
  -- Message handlers run inside error handling, where a limit raised by the hook turns hooks
  -- off: once a limit fired the handler is not called at all.
  local function h(e) if tripped() then return e end return handler(e) end
  return pass(real_xpcall(f, h, ...))
end
-- The host tracks which coroutine runs (the watchdog stops code inside it); enter_co accepts
-- only a coroutine, so leave_co always pairs with it (co_resume itself never raises then).
local function resume(co, ...)
  guard()
  enter_co(co)
  return pass(leave_co(co_resume(co, ...)))
end
coroutine.resume = resume
coroutine.close = function(co) guard() return pass(co_close(co)) end
-- coroutine.wrap, through the tracked resume (C's wrap resumes directly).
local function unwrap(co, ok, ...)
  if ok then return ... end
  local e = ...
  if co_status(co) == "dead" then co_close(co) end
  error(e, type(e) == "string" and 2 or 0)
end
coroutine.wrap = function(f)
  local co = co_create(f)
  return function(...) return unwrap(co, resume(co, ...)) end
end

-- C functions whose loops the count hook cannot see.
string.rep = function(s, n, sep)
  guard()
  if type(n) == "number" and n > 0 then
    local unit = (type(s) == "string" and #s or 0) + (type(sep) == "string" and #sep or 0)
    if n > 1e7 and unit == 0 or unit * n > memory_limit then out_of_memory() end
  end
  return s_rep(s, n, sep)
end
local function guarded(name, real)
  return function(s, p, init, plain)
    guard()
    if type(s) == "string" and type(p) == "string" then pattern_ok(name, s, p, plain == true) end
    return real(s, p, init, plain)
  end
end
string.find = guarded("find", s_find)
string.match = guarded("match", s_match)
string.gmatch = guarded("gmatch", s_gmatch)
string.gsub = function(s, p, repl, n)
  guard()
  if type(s) == "string" and type(p) == "string" then pattern_ok("gsub", s, p, false) end
  return s_gsub(s, p, repl, n)
end
table.move = function(a1, f, e, t, ...)
  guard()
  if type(f) == "number" and type(e) == "number" and e - f > 1e7 then
    error("table.move: more than 10,000,000 elements", 2)
  end
  return t_move(a1, f, e, t, ...)
end
table.insert = function(t, ...)
  guard()
  if #t > 1e7 then error("table.insert: table longer than 10,000,000", 2) end
  return t_insert(t, ...)
end
table.remove = function(t, ...)
  guard()
  if #t > 1e7 then error("table.remove: table longer than 10,000,000", 2) end
  return t_remove(t, ...)
end
table.concat = function(t, sep, i, j)
  guard()
  if type(i) == "number" and type(j) == "number" and j - i > 1e7 then
    error("table.concat: more than 10,000,000 elements", 2)
  end
  return t_concat(t, sep, i, j)
end

-- load: text only, bounded size, no to-be-closed variables, in the sandbox unless given an env.
load = function(chunk, name, mode, env)
  guard()
  if type(chunk) == "function" then
    local parts, size = {}, 0
    while true do
      guard()
      local piece = chunk()
      if piece == nil or piece == "" then break end
      if type(piece) ~= "string" then error("load: the reader must return strings", 2) end
      size = size + #piece
      if size > max_load then error("load: chunks are limited to " .. max_load .. " bytes", 2) end
      parts[#parts + 1] = piece
    end
    chunk = t_concat(parts)
  end
  if type(chunk) ~= "string" then error("load: the chunk must be a string or a reader function", 2) end
  if #chunk > max_load then error("load: chunks are limited to " .. max_load .. " bytes", 2) end
  if s_find(chunk, "<%s*close%s*>") then error("load: to-be-closed variables (<close>) are not available in the sandbox", 2) end
  local f, err = real_load(chunk, name, "t", env or sandbox_env)
  if f == nil and type(err) == "string" and s_find(err, "not enough memory", 1, true) then out_of_memory() end
  return f, err
end

-- error / assert remember the last table thrown, so an uncaught `error({code = 42})` reaches
-- the caller as that table's JSON instead of "table: 0x...". Strings keep their levels (the
-- wrapper is one more frame: a positive level is moved up by one). `error` is a local above,
-- so the globals are set through the environment table.
local real_assert = assert
sandbox_env.error = function(e, level)
  if type(e) == "table" then thrown[1] = e end
  if type(e) == "string" and (level == nil or type(level) == "number" and level > 0) then
    error(e, (level or 1) + 1)
  end
  error(e, level)
end
sandbox_env.assert = function(v, ...)
  if not v and type((...)) == "table" then thrown[1] = (...) end
  return real_assert(v, ...)
end
"#;

/// True when Lua source declares a to-be-closed variable (`<close>`): their `__close`
/// handlers run during error unwinding with hooks off, out of the limits' reach.
pub fn has_close_attribute(source: &str) -> bool {
    let b = source.as_bytes();
    let mut i = 0;
    while let Some(p) = b[i..].iter().position(|c| *c == b'<') {
        let mut j = i + p + 1;
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        if b[j..].starts_with(b"close") {
            let mut k = j + 5;
            while k < b.len() && b[k].is_ascii_whitespace() {
                k += 1;
            }
            if b.get(k) == Some(&b'>') {
                return true;
            }
        }
        i = i + p + 1;
    }
    false
}

/// Raise a tripped limit, or trip the time limit when the deadline passed.
pub fn check_deadline(m: &Meter, limits: &Limits) -> mlua::Result<()> {
    if let Some(l) = m.tripped.get() {
        return Err(mlua::Error::external(l));
    }
    if let Some(l) = m.alarmed() {
        m.tripped.set(Some(l));
        return Err(mlua::Error::external(l));
    }
    let now = Instant::now();
    if now >= limits.deadline {
        m.tripped.set(Some(Limit::Time));
        return Err(mlua::Error::external(Limit::Time));
    }
    if m.tx_deadline.get().is_some_and(|d| now >= d) {
        m.tripped.set(Some(Limit::Transaction));
        return Err(mlua::Error::external(Limit::Transaction));
    }
    Ok(())
}

thread_local! {
    /// The meter and deadline of the invocation running on this thread, for host code that
    /// runs long outside the VM (serialising tables, building query results): it checks the
    /// clock with [`time_check`] every few thousand parts.
    static CLOCK: std::cell::RefCell<Option<(Rc<Meter>, Instant)>> = const { std::cell::RefCell::new(None) };
}

/// Marks the invocation running on this thread for [`time_check`] while alive (restores an
/// outer invocation's clock when dropped).
pub struct ClockGuard(Option<(Rc<Meter>, Instant)>);

impl ClockGuard {
    pub fn enter(meter: &Rc<Meter>, deadline: Instant) -> ClockGuard {
        ClockGuard(CLOCK.with(|c| c.replace(Some((Rc::clone(meter), deadline)))))
    }
}

impl Drop for ClockGuard {
    fn drop(&mut self) {
        let outer = self.0.take();
        CLOCK.with(|c| *c.borrow_mut() = outer);
    }
}

/// For long host loops: `Err(limit)` (and the limit tripped, so the invocation ends even if
/// the caller swallows the error) once a limit fired or the running invocation's deadline
/// passed. Cheap enough to call every few thousand items.
pub fn time_check() -> Result<(), Limit> {
    CLOCK.with(|c| {
        let c = c.borrow();
        let Some((m, deadline)) = c.as_ref() else {
            return Ok(());
        };
        if let Some(l) = m.tripped.get() {
            return Err(l);
        }
        if let Some(l) = m.alarmed() {
            m.tripped.set(Some(l));
            return Err(l);
        }
        if Instant::now() >= *deadline {
            m.tripped.set(Some(Limit::Time));
            return Err(Limit::Time);
        }
        Ok(())
    })
}

/// Has a limit of the invocation running on this thread fired? (For host code that turns
/// errors into values, such as `log`'s unencodable fields: it must not swallow a limit.)
pub fn tripped_limit() -> Option<Limit> {
    CLOCK.with(|c| c.borrow().as_ref().and_then(|(m, _)| m.tripped.get()))
}

/// Host functions (every component's) check the limits before they start: each Rust function
/// a component installed as a global, or in a global table, is replaced by a Rust wrapper that
/// runs [`check_deadline`] first. (A Rust wrapper, not a Lua one: a Lua wrapper would turn the
/// caller's `return db.query(...)` into a Lua tail call and lose the caller's line.) Runs once
/// per invocation, after the components are installed.
pub fn guard_host_functions(
    lua: &Lua,
    binding: &Rc<Binding>,
    names: Vec<String>,
) -> mlua::Result<()> {
    guard_host_functions_noting(lua, binding, names, None)
}

/// [`guard_host_functions`], with the wrappers setting `called` when one of them runs (a
/// pooled state keeps a component installed until one of its functions is called).
pub fn guard_host_functions_noting(
    lua: &Lua,
    binding: &Rc<Binding>,
    names: Vec<String>,
    called: Option<Rc<Cell<bool>>>,
) -> mlua::Result<()> {
    let wrap = |f: Function, table: &str, key: &Value| -> mlua::Result<Value> {
        // Only host (C) functions: wrapping a Lua function in a Rust call would stop it from
        // yielding.
        if f.info().what != "C" {
            return Ok(Value::Function(f));
        }
        let b = Rc::clone(binding);
        let called = called.clone();
        let key = match key {
            Value::String(k) => k.to_string_lossy(),
            _ => String::new(),
        };
        let may_run_inline = INLINE_HOST_FUNCTIONS.contains(&(table, key.as_str()));
        Ok(Value::Function(lua.create_function(
            move |lua, args: mlua::MultiValue| {
                if b.inline.get() && !may_run_inline {
                    // Stays fired (pcall re-raises it): the run is made again off the worker.
                    b.meter.borrow().tripped.set(Some(Limit::Inline));
                    return Err(mlua::Error::external(Limit::Inline));
                }
                if let Some(c) = &called {
                    c.set(true);
                }
                b.check_deadline()?;
                // The error keeps the shape it had without the wrapper (one CallbackError,
                // whose traceback the outer call adds).
                let r = f.call::<mlua::MultiValue>(args).map_err(|e| match e {
                    mlua::Error::CallbackError { cause, .. } => (*cause).clone(),
                    e => e,
                });
                // Without a count hook, host calls are where the memory peak is sampled.
                let m = b.meter.borrow();
                m.peak_memory.set(m.peak_memory.get().max(lua.used_memory()));
                r
            },
        )?))
    };
    let g = lua.globals();
    for name in names {
        match g.raw_get::<Value>(name.as_str())? {
            Value::Function(f) => g.raw_set(name.as_str(), wrap(f, "", &Value::Nil)?)?,
            Value::Table(t) => {
                let mut fns = Vec::new();
                for pair in t.pairs::<Value, Value>() {
                    if let (k, Value::Function(f)) = pair? {
                        fns.push((k, f));
                    }
                }
                for (k, f) in fns {
                    let w = wrap(f, name.as_str(), &k)?;
                    t.raw_set(k, w)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Wall-clock, CPU-time and transaction limits, enforced without a count hook: one background
/// thread for the whole process. An invocation registers its main Lua state, its deadline, its
/// thread's CPU clock and budget, and an [`Alarm`] it shares with the sandbox. The thread sleeps
/// until the earliest moment a limit could be reached (CPU time grows no faster than wall time,
/// so a CPU budget is re-checked after the rest of it has passed on the wall clock); a new
/// registration wakes it only when its own earliest moment comes before that (most runs end
/// long before their limits: no wake-up, so no context switch, per run). When one
/// is reached it records which in the alarm and installs the sandbox's hook, firing on every
/// instruction, on the main state and on every coroutine the invocation is running
/// (`lua_sethook` only stores the hook fields and sets the trap flags of the call stack; Lua
/// documents it as safe to call asynchronously). Registration, the coroutine list and the hook
/// change happen under locks the invocation takes too, and [`Watch`] unregisters before the
/// state is dropped, so the thread never touches a freed state.
pub mod watchdog {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
    use std::sync::{Arc, Condvar, Mutex, OnceLock};
    use std::time::{Duration, Instant};

    use mlua::ffi;

    use super::Limit;

    /// How often an overdue invocation's hook is set again while it keeps running.
    const RETRY: Duration = Duration::from_millis(5);
    /// How often the thread looks while runs come and go (see [`LINGER`]): no later than
    /// an inline run (1 ms budget by default, taken with as much slack) needs it.
    const TICK: Duration = Duration::from_millis(1);
    /// How long after it last saw an invocation the thread keeps looking every [`TICK`].
    const LINGER: Duration = Duration::from_millis(20);

    /// What the watchdog and one invocation share.
    #[derive(Default)]
    pub struct Alarm {
        /// 0 none; else the limit found reached (see `code`).
        fired: AtomicU8,
        /// The sandbox's hook function (`lua_Hook`), installed when a limit is reached.
        hook: AtomicUsize,
        /// The open `db.tx`'s deadline.
        tx_deadline: Mutex<Option<Instant>>,
        /// Coroutines being resumed, outermost first (alive while listed: their resumers hold
        /// them).
        running: Mutex<Vec<usize>>,
    }

    fn code(l: Limit) -> u8 {
        match l {
            Limit::Time => 1,
            Limit::Cpu => 2,
            Limit::Transaction => 3,
            Limit::Instructions => 4,
            Limit::Memory => 5,
            Limit::Inline => 6,
        }
    }

    impl Alarm {
        pub fn fired(&self) -> Option<Limit> {
            match self.fired.load(Ordering::Acquire) {
                1 => Some(Limit::Time),
                2 => Some(Limit::Cpu),
                3 => Some(Limit::Transaction),
                4 => Some(Limit::Instructions),
                5 => Some(Limit::Memory),
                6 => Some(Limit::Inline),
                _ => None,
            }
        }

        pub(super) fn set_hook(&self, hook: Option<ffi::lua_Hook>) {
            self.hook
                .store(hook.map_or(0, |f| f as usize), Ordering::Release);
        }

        pub(super) fn set_tx_deadline(&self, d: Option<Instant>) {
            *self.tx_deadline.lock().unwrap_or_else(|e| e.into_inner()) = d;
            if d.is_some() {
                // Wake the thread so it sleeps until this deadline at the latest.
                shared().wake.notify_all();
            }
        }

        pub(super) fn enter(&self, co: usize) {
            self.running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(co);
        }

        pub(super) fn leave(&self) {
            self.running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop();
        }

        /// Record `limit` (the first one stays) and make `main` and the running coroutines
        /// call the hook at their next instruction.
        fn ring(&self, main: usize, limit: Limit) {
            let _ = self
                .fired
                .compare_exchange(0, code(limit), Ordering::AcqRel, Ordering::Acquire);
            let hook = self.hook.load(Ordering::Acquire);
            if hook == 0 {
                return;
            }
            // SAFETY: `hook` is the lua_Hook read from this state by the sandbox.
            let hook = unsafe { std::mem::transmute::<usize, ffi::lua_Hook>(hook) };
            let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            for &l in std::iter::once(&main).chain(running.iter()) {
                // SAFETY: the main state is alive while registered (unregistering takes the
                // watchdog's lock, held by our caller); listed coroutines are alive while
                // listed (the list's lock is held).
                unsafe {
                    let l = l as *mut ffi::lua_State;
                    let mask = ffi::lua_gethookmask(l) | ffi::LUA_MASKCOUNT;
                    ffi::lua_sethook(l, Some(hook), mask, 1);
                }
            }
        }
    }

    struct Entry {
        state: usize,
        deadline: Instant,
        /// The invocation thread's CPU clock, its reading at the start, and the budget.
        cpu: Option<(libc::clockid_t, Duration, Duration)>,
        alarm: Arc<Alarm>,
    }

    #[derive(Default)]
    struct Shared {
        /// The last id given, the watched invocations, and when the thread wakes next
        /// (`None`: only when notified).
        entries: Mutex<(u64, HashMap<u64, Entry>, Option<Instant>)>,
        wake: Condvar,
    }

    fn shared() -> &'static Shared {
        static S: OnceLock<&'static Shared> = OnceLock::new();
        S.get_or_init(|| {
            let s: &'static Shared = Box::leak(Box::default());
            std::thread::Builder::new()
                .name("lua-watchdog".into())
                .spawn(move || run(s))
                .expect("starting the Lua watchdog thread");
            s
        })
    }

    /// CPU time on `clock` (a thread's CPU clock).
    pub fn thread_cpu(clock: libc::clockid_t) -> Option<Duration> {
        cpu_now(clock)
    }

    fn cpu_now(clock: libc::clockid_t) -> Option<Duration> {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: plain syscall writing into `ts`.
        let r = unsafe { libc::clock_gettime(clock, &mut ts) };
        (r == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }

    /// The calling thread's CPU clock and its current reading.
    pub fn this_thread_cpu() -> Option<(libc::clockid_t, Duration)> {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: asks for the calling thread's CPU clock id.
        let r = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
        if r != 0 {
            return None;
        }
        cpu_now(clock).map(|t| (clock, t))
    }

    fn run(s: &'static Shared) {
        let mut g = s.entries.lock().unwrap_or_else(|e| e.into_inner());
        // When the thread last saw an invocation.
        let mut busy = Instant::now();
        loop {
            let now = Instant::now();
            if !g.1.is_empty() {
                busy = now;
            }
            let mut next: Option<Instant> = None;
            let mut at = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
            for e in g.1.values() {
                let tx = *e.alarm.tx_deadline.lock().unwrap_or_else(|p| p.into_inner());
                let mut reached = None;
                if e.deadline <= now {
                    reached = Some(Limit::Time);
                } else if tx.is_some_and(|d| d <= now) {
                    reached = Some(Limit::Transaction);
                } else if let Some((clock, start, budget)) = e.cpu {
                    match cpu_now(clock).map(|t| t.saturating_sub(start)) {
                        Some(used) if used >= budget => reached = Some(Limit::Cpu),
                        Some(used) => at(now + (budget - used)),
                        None => {}
                    }
                }
                match reached {
                    Some(limit) => {
                        e.alarm.ring(e.state, limit);
                        // Again shortly while the invocation is still registered: the running
                        // VM updates its hook counter without synchronisation and may
                        // overwrite this reset (it then fires at the end of the current count
                        // at worst).
                        at(now + RETRY);
                    }
                    None => {
                        at(e.deadline);
                        if let Some(d) = tx {
                            at(d);
                        }
                    }
                }
            }
            // Just after a run, keep looking every TICK for a while instead of waiting to be
            // notified: under a steady stream of short runs, a run starting in between finds
            // the thread due soon and need not wake it (a futex call and a context switch per
            // run otherwise). Idle, it sleeps until notified.
            if next.is_none() && now.saturating_duration_since(busy) < LINGER {
                next = Some(now + TICK);
            }
            g.2 = next;
            g = match next {
                None => s.wake.wait(g).unwrap_or_else(|e| e.into_inner()),
                Some(t) => {
                    let wait = t.saturating_duration_since(Instant::now());
                    s.wake
                        .wait_timeout(g, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// One watched invocation; dropping it unregisters the state. Must be dropped before the
    /// `Lua` whose state it watches.
    pub struct Watch(u64);

    impl Watch {
        /// Watch `lua`'s main state, running on the calling thread, until `deadline`, with a
        /// CPU budget for this thread (`None`: wall time only). Call outside any Lua callback
        /// (the state mlua reports there is the main thread) and after the sandbox hook is
        /// installed.
        pub fn start(
            lua: &mlua::Lua,
            deadline: Instant,
            cpu: Option<Duration>,
            alarm: Arc<Alarm>,
        ) -> mlua::Result<Watch> {
            Watch::start_with_slack(lua, deadline, cpu, None, alarm, Duration::ZERO)
        }

        /// [`Watch::start`] for short budgets (a run on an async worker): the thread is not
        /// woken for this invocation when it is due to wake anyway within `slack` of the
        /// invocation's limit, which may then be enforced up to `slack` late. Without the
        /// slack, every run with a short budget would wake the thread (a context switch per
        /// run); with it, a steady stream of such runs wakes it about once per `slack`.
        /// `cpu_from`: the thread's CPU clock and the reading the budget counts from (as
        /// [`this_thread_cpu`] gave it when the run started; `None`: read it now). Reading a
        /// thread's CPU clock is a system call: a run that has one already passes it on.
        pub fn start_with_slack(
            lua: &mlua::Lua,
            deadline: Instant,
            cpu: Option<Duration>,
            cpu_from: Option<(libc::clockid_t, Duration)>,
            alarm: Arc<Alarm>,
            slack: Duration,
        ) -> mlua::Result<Watch> {
            let mut state = 0usize;
            // SAFETY: only reads the state pointer.
            unsafe { lua.exec_raw::<()>((), |l| state = l as usize)? };
            let cpu = cpu.and_then(|budget| cpu_from.or_else(this_thread_cpu).map(|(c, t)| (c, t, budget)));
            // The earliest moment a limit of this invocation can be reached (its CPU time grows
            // no faster than the wall clock).
            let due = match cpu {
                Some((_, _, budget)) => deadline.min(Instant::now() + budget),
                None => deadline,
            };
            let s = shared();
            let mut g = s.entries.lock().unwrap_or_else(|e| e.into_inner());
            // The thread is woken only when it would otherwise sleep past `due`: an invocation
            // started while it waits for an earlier moment is looked at then (one wake-up per
            // run would cost a context switch on every invocation).
            let wake = g.2.is_none_or(|at| due + slack < at);
            g.0 += 1;
            let id = g.0;
            g.1.insert(
                id,
                Entry {
                    state,
                    deadline,
                    cpu,
                    alarm,
                },
            );
            if wake {
                // The thread sets its next wake-up before it waits (under this lock).
                g.2 = Some(due);
                drop(g);
                s.wake.notify_all();
            }
            Ok(Watch(id))
        }
    }

    impl Drop for Watch {
        fn drop(&mut self) {
            let s = shared();
            s.entries
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .1
                .remove(&self.0);
        }
    }
}

/// Work budget for one pattern call, in simple steps (about a second of C time).
const PATTERN_BUDGET: f64 = 2e8;

/// Lua patterns backtrack in C, where no hook runs. Estimate the worst case as
/// (subject length + 1) ^ (backtracking items + 1) x pattern length (`find`/`gmatch`/`gsub`
/// try every start position) and refuse calls over [`PATTERN_BUDGET`].
fn pattern_guard(name: &str, subject: usize, pattern: &[u8], plain: bool) -> mlua::Result<()> {
    let n = subject as f64 + 1.0;
    let m = pattern.len().max(1) as f64;
    let specials = pattern.iter().any(|c| b"^$*+?.([%-".contains(c));
    let cost = if plain || !specials {
        n * m
    } else {
        n.powi(quantifiers(pattern).min(16) as i32 + 1) * m
    };
    if cost > PATTERN_BUDGET {
        return Err(mlua::Error::runtime(format!(
            "string.{name}: a {subject}-byte subject with this pattern could run unbounded (patterns backtrack outside the sandbox's limits); use a simpler pattern or split the input"
        )));
    }
    Ok(())
}

/// Count, sample memory, enforce the limits. Called from the hook(s).
pub fn check(lua: &Lua, m: &Meter, limits: &Limits) -> mlua::Result<()> {
    if let Some(l) = m.tripped.get() {
        return Err(mlua::Error::external(l));
    }
    // The watchdog's alarm first: it makes the hook fire on every instruction.
    if let Some(l) = m.alarmed() {
        m.tripped.set(Some(l));
        return Err(mlua::Error::external(l));
    }
    m.instructions.set(m.instructions.get() + HOOK_EVERY as u64);
    check_counted(lua, m, limits)
}

/// [`check`] for a hook that counted the instructions itself (the tracer's).
pub fn check_counted(lua: &Lua, m: &Meter, limits: &Limits) -> mlua::Result<()> {
    if let Some(l) = m.tripped.get() {
        return Err(mlua::Error::external(l));
    }
    if let Some(l) = m.alarmed() {
        m.tripped.set(Some(l));
        return Err(mlua::Error::external(l));
    }
    m.peak_memory
        .set(m.peak_memory.get().max(lua.used_memory()));
    let now = Instant::now();
    let tripped = if limits.instructions.is_some_and(|n| m.instructions.get() > n) {
        Some(Limit::Instructions)
    } else if now >= limits.deadline {
        Some(Limit::Time)
    } else if m.tx_deadline.get().is_some_and(|d| now >= d) {
        Some(Limit::Transaction)
    } else {
        None
    };
    if let Some(l) = tripped {
        m.tripped.set(Some(l));
        return Err(mlua::Error::external(l));
    }
    Ok(())
}

/// Backtracking items of a Lua pattern: `*`, `+`, `-`, `?` quantifiers and `%b` (outside `%`
/// escapes and sets).
fn quantifiers(p: &[u8]) -> u32 {
    let (mut i, mut q) = (0, 0);
    while i < p.len() {
        match p[i] {
            b'%' => {
                if p.get(i + 1) == Some(&b'b') {
                    q += 1;
                }
                i += 1;
            }
            b'[' => {
                i += 1;
                if p.get(i) == Some(&b'^') {
                    i += 1;
                }
                if p.get(i) == Some(&b']') {
                    i += 1;
                }
                while i < p.len() && p[i] != b']' {
                    if p[i] == b'%' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            b'*' | b'+' | b'-' | b'?' if i > 0 => q += 1,
            _ => {}
        }
        i += 1;
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn close_attributes_are_found_with_any_spacing() {
        for src in [
            "local x <close> = nil",
            "local x<close>= nil",
            "local x < close > = nil",
            "local x <\n\tclose\n> = nil",
            "<close>",
        ] {
            assert!(has_close_attribute(src), "{src:?}");
        }
        for src in [
            "",
            "local x <const> = 1",
            "if a < b then return a end",
            "local closed = a < closeness",
            "x = '<clos' .. 'e>'",
            "a <close",
            "<",
            "<close x>",
        ] {
            assert!(!has_close_attribute(src), "{src:?}");
        }
    }

    #[test]
    fn backtracking_items_are_counted_outside_escapes_and_sets() {
        assert_eq!(quantifiers(b"abc"), 0);
        assert_eq!(quantifiers(b"a*b+c-d?"), 4);
        assert_eq!(quantifiers(b"(.-)%s*=%s*(.*)"), 4);
        assert_eq!(quantifiers(b"%*%+%-%?"), 0, "escaped quantifiers");
        assert_eq!(quantifiers(b"[*+?-]"), 0, "quantifiers inside a set");
        assert_eq!(quantifiers(b"[]*]"), 0, "']' first in a set is literal");
        assert_eq!(quantifiers(b"[^]*]x"), 0);
        assert_eq!(quantifiers(b"[%]*]"), 0, "an escaped ']' does not end the set");
        assert_eq!(quantifiers(b"%b()"), 1);
        assert_eq!(quantifiers(b"*a"), 0, "a leading '*' is a literal");
        assert_eq!(quantifiers(b"[a-z]+"), 1);
    }

    #[test]
    fn patterns_whose_worst_case_is_unbounded_are_refused() {
        // Plain searches and patterns without specials cost subject x pattern.
        assert!(pattern_guard("find", 10_000_000, b"needle", true).is_ok());
        assert!(pattern_guard("find", 10_000_000, b"needle", false).is_ok());
        // One quantifier over a large subject is fine; several are not.
        assert!(pattern_guard("match", 1_000, b"a*b", false).is_ok());
        let e = pattern_guard("match", 1_000, b"a*a*a*b", false).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("string.match") && msg.contains("1000-byte subject"), "{msg}");
        // The same pattern on a short subject passes.
        assert!(pattern_guard("match", 20, b"a*a*a*b", false).is_ok());
        // The same pattern as a plain search is cheap.
        assert!(pattern_guard("find", 10_000, b"a*a*a*b", true).is_ok());
    }

    #[test]
    fn limits_are_found_anywhere_in_an_error_chain() {
        let ext = mlua::Error::external(Limit::Time);
        assert_eq!(limit_of(&ext), Some(Limit::Time));
        let wrapped = mlua::Error::CallbackError {
            traceback: String::new(),
            cause: std::sync::Arc::new(mlua::Error::WithContext {
                context: "ctx".into(),
                cause: std::sync::Arc::new(mlua::Error::external(Limit::Transaction)),
            }),
        };
        assert_eq!(limit_of(&wrapped), Some(Limit::Transaction));
        assert_eq!(
            limit_of(&mlua::Error::MemoryError("oom".into())),
            Some(Limit::Memory)
        );
        assert_eq!(limit_of(&mlua::Error::runtime("boom")), None);
        assert_eq!(limit_of(&mlua::Error::external("not a limit")), None);
        assert_eq!(Limit::Instructions.to_string(), "instruction limit exceeded");
        assert_eq!(Limit::Transaction.to_string(), "transaction time limit exceeded");
    }

    fn limits(deadline: Instant) -> Limits {
        Limits {
            instructions: Some(10_000),
            cpu: Duration::from_secs(3600),
            memory: 1 << 20,
            deadline,
        }
    }

    #[test]
    fn deadlines_trip_and_stay_tripped() {
        let far = Instant::now() + Duration::from_secs(3600);
        let m = Meter::default();
        assert!(check_deadline(&m, &limits(far)).is_ok());

        // A passed transaction deadline trips the transaction limit.
        m.set_tx_deadline(Some(Instant::now()));
        let e = check_deadline(&m, &limits(far)).unwrap_err();
        assert_eq!(limit_of(&e), Some(Limit::Transaction));
        // Tripped stays tripped, even once the transaction is gone.
        m.set_tx_deadline(None);
        assert_eq!(
            limit_of(&check_deadline(&m, &limits(far)).unwrap_err()),
            Some(Limit::Transaction)
        );

        let m = Meter::default();
        let e = check_deadline(&m, &limits(Instant::now())).unwrap_err();
        assert_eq!(limit_of(&e), Some(Limit::Time));
        assert_eq!(m.tripped.get(), Some(Limit::Time));
    }

    /// Run `code` in a sandbox without an instruction budget (no hook until the watchdog
    /// rings), watched with `deadline` and `cpu`.
    fn run_watched(code: &str, deadline: Instant, cpu: Duration) -> (mlua::Result<()>, Rc<Meter>) {
        let meter = Rc::new(Meter::default());
        let limits = Limits {
            instructions: None,
            cpu,
            memory: 64 << 20,
            deadline,
        };
        let (lua, _debug) = new_state(limits, Rc::clone(&meter), None).unwrap();
        let r = {
            let _watch =
                watchdog::Watch::start(&lua, deadline, Some(cpu), Arc::clone(&meter.alarm)).unwrap();
            lua.load(code).exec()
        };
        (r, meter)
    }

    #[test]
    fn without_a_budget_no_hook_runs_until_the_watchdog_rings() {
        let far = Instant::now() + Duration::from_secs(3600);
        let meter = Rc::new(Meter::default());
        let limits = Limits { instructions: None, cpu: Duration::from_secs(60), memory: 64 << 20, deadline: far };
        let (lua, _debug) = new_state(limits, Rc::clone(&meter), None).unwrap();
        // SAFETY: reads the hook fields.
        let hooked = unsafe {
            let mut h = false;
            lua.exec_raw::<()>((), |l| h = ffi::lua_gethook(l).is_some()).unwrap();
            h
        };
        assert!(!hooked, "no hook (the interpreter's fast path)");
        lua.load("local n = 0 for i = 1, 100000 do n = n + i end").exec().unwrap();
        assert_eq!(meter.instructions.get(), 0);
        // With a budget, the count hook is on.
        let limits = Limits { instructions: Some(1_000_000), ..limits };
        let meter = Rc::new(Meter::default());
        let (lua, _debug) = new_state(limits, Rc::clone(&meter), None).unwrap();
        let r = lua.load("while true do end").exec();
        assert_eq!(limit_of(&r.unwrap_err()), Some(Limit::Instructions));
    }

    #[test]
    fn the_watchdog_stops_loops_by_cpu_and_wall_time_also_inside_coroutines() {
        let far = Instant::now() + Duration::from_secs(3600);
        let cpu = Duration::from_millis(300);
        for code in [
            "while true do end",
            "local co = coroutine.create(function() while true do end end) coroutine.resume(co)",
            "coroutine.wrap(function() while true do end end)()",
            // nested coroutines, and a loop that yields between resumes
            "coroutine.wrap(function() coroutine.wrap(function() local n = 0 while true do n = n + 1 end end)() end)()",
            "local co = coroutine.wrap(function() while true do coroutine.yield() end end) while true do co() end",
            "while true do pcall(function() while true do end end) end",
        ] {
            let started = Instant::now();
            let (r, meter) = run_watched(code, far, cpu);
            let e = r.unwrap_err();
            assert_eq!(limit_of(&e).or(meter.tripped.get()), Some(Limit::Cpu), "{code}: {e}");
            // A loaded machine gives the loop less CPU per second: generous wall bound.
            assert!(started.elapsed() < Duration::from_secs(60), "{code}: {:?}", started.elapsed());
        }
        // The wall deadline, when it comes first.
        let (r, _) = run_watched("while true do end", Instant::now() + Duration::from_millis(200), Duration::from_secs(3600));
        assert_eq!(limit_of(&r.unwrap_err()), Some(Limit::Time));
    }

    #[test]
    fn coroutine_wrap_keeps_its_behaviour() {
        let far = Instant::now() + Duration::from_secs(3600);
        let (r, _) = run_watched(
            r#"
            local gen = coroutine.wrap(function(a) local b = coroutine.yield(a + 1) return b * 2 end)
            assert(gen(1) == 2)
            assert(gen(5) == 10)
            local ok, e = pcall(gen)
            assert(not ok and e:find("dead coroutine"), e)
            local bad = coroutine.wrap(function() error("boom") end)
            local ok2, e2 = pcall(bad)
            assert(not ok2 and e2:find("boom"), e2)
            local t = coroutine.wrap(function() error({code = 1}) end)
            local ok3, e3 = pcall(t)
            assert(not ok3 and type(e3) == "table" and e3.code == 1)
            local ok4, e4 = pcall(coroutine.resume, 42)
            assert(not ok4, "resume of a non-coroutine raises")
            "#,
            far,
            Duration::from_secs(60),
        );
        r.unwrap();
    }

    #[test]
    fn long_host_loops_see_the_deadline() {
        assert_eq!(time_check(), Ok(()), "no invocation on this thread");
        let m = Rc::new(Meter::default());
        {
            let _clock = ClockGuard::enter(&m, Instant::now() + Duration::from_secs(3600));
            assert_eq!(time_check(), Ok(()));
            assert_eq!(tripped_limit(), None);
        }
        {
            let _clock = ClockGuard::enter(&m, Instant::now());
            assert_eq!(time_check(), Err(Limit::Time));
            assert_eq!(tripped_limit(), Some(Limit::Time));
            assert_eq!(m.tripped.get(), Some(Limit::Time));
        }
        assert_eq!(time_check(), Ok(()), "the clock is gone with its guard");
    }

    #[test]
    fn the_hook_counts_instructions_and_samples_memory() {
        let lua = Lua::new();
        let far = Instant::now() + Duration::from_secs(3600);
        let m = Meter::default();
        let l = limits(far);
        for _ in 0..10 {
            check(&lua, &m, &l).unwrap();
        }
        assert_eq!(m.instructions.get(), 10 * HOOK_EVERY as u64);
        assert!(m.peak_memory.get() > 0);
        let e = check(&lua, &m, &l).unwrap_err();
        assert_eq!(limit_of(&e), Some(Limit::Instructions));
        assert_eq!(m.tripped.get(), Some(Limit::Instructions));
        // Once tripped, the count no longer moves.
        let _ = check(&lua, &m, &l);
        assert_eq!(m.instructions.get(), 11 * HOOK_EVERY as u64);
    }
}
