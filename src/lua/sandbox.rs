//! The sandboxed Lua 5.4 state of one invocation: which globals exist, and the limits.
//!
//! A fresh state per invocation (so no invocation sees another's globals), with only `base`
//! (minus `dofile`, `loadfile`, `require`, raw `load`, `collectgarbage` control), `string`
//! (minus `dump`; the string metatable is locked), `table`, `math`, `utf8`, `coroutine` and
//! `os.time/clock/date`. Lua's `debug` library is loaded but kept by the host only (the tracer
//! reads locals with it); user code sees the safe `debug` component instead.
//!
//! Limits: an instruction budget and a wall-clock deadline checked by a count hook every
//! [`HOOK_EVERY`] VM instructions (a global hook, so coroutines inherit it), and a memory limit
//! enforced by the allocator. Once a limit fires it stays fired: `pcall`, `xpcall` and
//! `coroutine.resume` re-raise it instead of catching it. `__gc` metamethods are refused
//! (finalizers run with hooks disabled, so they could escape the limits); pattern matching is
//! refused on subject/pattern combinations whose backtracking could run unbounded in C.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Instant;

use mlua::{Function, HookTriggers, Lua, LuaOptions, MultiValue, StdLib, Table, Value, VmState};

/// VM instructions between two checks of the budget and the deadline.
pub const HOOK_EVERY: u32 = 1000;

/// Why an invocation was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Instructions,
    Time,
    Memory,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Limit::Instructions => "instruction limit exceeded",
            Limit::Time => "time limit exceeded",
            Limit::Memory => "memory limit exceeded",
        })
    }
}

impl std::error::Error for Limit {}

/// Limits of one invocation.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub instructions: u64,
    pub memory: usize,
    pub deadline: Instant,
}

/// Shared between the hook, the wrapped `pcall`s and the host.
#[derive(Default)]
pub struct Meter {
    pub instructions: Cell<u64>,
    pub peak_memory: Cell<usize>,
    pub tripped: Cell<Option<Limit>>,
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

/// Build the sandboxed state. With a tracer, the hook also records every executed line.
pub fn new_state(
    limits: Limits,
    meter: Rc<Meter>,
    tracer: Option<Rc<std::cell::RefCell<super::trace::Tracer>>>,
) -> mlua::Result<(Lua, Table)> {
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
    let real_load: Function = g.get("load")?;
    for name in [
        "dofile",
        "loadfile",
        "require",
        "debug",
        "collectgarbage",
        "load",
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
    guard_patterns(&lua, &string)?;
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
    // load: text chunks only, in the sandbox's globals unless an environment is given.
    let g2 = g.clone();
    g.raw_set(
        "load",
        lua.create_function(
            move |_,
                  (chunk, name, _mode, env): (
                Value,
                Option<String>,
                Option<String>,
                Option<Value>,
            )| {
                let env = env.unwrap_or(Value::Table(g2.clone()));
                real_load.call::<MultiValue>((chunk, name, "t", env))
            },
        )?,
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
    wrap_protected_calls(&lua, &g, &meter)?;
    lua.set_memory_limit(limits.memory)?;
    let m = Rc::clone(&meter);
    match tracer {
        None => lua.set_global_hook(
            HookTriggers::new().every_nth_instruction(HOOK_EVERY),
            move |lua, _d| {
                check(lua, &m, &limits)?;
                Ok(VmState::Continue)
            },
        )?,
        Some(t) => {
            t.borrow_mut().attach(&host_debug)?;
            let triggers = HookTriggers::new()
                .every_nth_instruction(HOOK_EVERY)
                .every_line()
                .on_returns();
            lua.set_global_hook(triggers, move |lua, d| {
                match d.event() {
                    mlua::DebugEvent::Count => check(lua, &m, &limits)?,
                    mlua::DebugEvent::Line => {
                        if let Some(l) = m.tripped.get() {
                            return Err(mlua::Error::external(l));
                        }
                        t.borrow_mut().on_line(lua, d)?
                    }
                    mlua::DebugEvent::Ret => t.borrow_mut().on_return(lua, d)?,
                    _ => {}
                }
                Ok(VmState::Continue)
            })?
        }
    }
    Ok((lua, host_debug))
}

/// Count, sample memory, enforce the limits. Called from the hook(s).
pub fn check(lua: &Lua, m: &Meter, limits: &Limits) -> mlua::Result<()> {
    if let Some(l) = m.tripped.get() {
        return Err(mlua::Error::external(l));
    }
    m.instructions.set(m.instructions.get() + HOOK_EVERY as u64);
    m.peak_memory
        .set(m.peak_memory.get().max(lua.used_memory()));
    let tripped = if m.instructions.get() > limits.instructions {
        Some(Limit::Instructions)
    } else if Instant::now() >= limits.deadline {
        Some(Limit::Time)
    } else {
        None
    };
    if let Some(l) = tripped {
        m.tripped.set(Some(l));
        return Err(mlua::Error::external(l));
    }
    Ok(())
}

/// `pcall`, `xpcall` and `coroutine.resume` that cannot swallow a tripped limit.
fn wrap_protected_calls(lua: &Lua, g: &Table, meter: &Rc<Meter>) -> mlua::Result<()> {
    for (table, name) in [
        (None, "pcall"),
        (None, "xpcall"),
        (Some("coroutine"), "resume"),
    ] {
        let holder: Table = match table {
            Some(t) => g.get(t)?,
            None => g.clone(),
        };
        let real: Function = holder.get(name)?;
        let m = Rc::clone(meter);
        let what = name.to_string();
        holder.raw_set(
            name,
            lua.create_function(move |lua, args: MultiValue| {
                let out = real.call::<MultiValue>(args)?;
                if let Some(l) = m.tripped.get() {
                    return Err(mlua::Error::external(l));
                }
                // A memory error caught here would let a program keep probing the limit.
                if out.front() == Some(&Value::Boolean(false)) {
                    if let Some(Value::Error(e)) = out.get(1) {
                        if let Some(l) = limit_of(e) {
                            m.tripped.set(Some(l));
                            return Err(mlua::Error::external(l));
                        }
                    }
                    if let Some(Value::String(s)) = out.get(1) {
                        if s.to_str().is_ok_and(|s| s.contains("not enough memory"))
                            && lua.used_memory() > 0
                        {
                            m.tripped.set(Some(Limit::Memory));
                            return Err(mlua::Error::external(Limit::Memory));
                        }
                    }
                }
                let _ = &what;
                Ok(out)
            })?,
        )?;
    }
    Ok(())
}

/// Lua patterns backtrack in C, where no hook runs: refuse combinations that could take
/// longer than the limits allow (roughly subject length ^ quantifiers > 1e8).
fn guard_patterns(lua: &Lua, string: &Table) -> mlua::Result<()> {
    for name in ["find", "match", "gmatch", "gsub"] {
        let real: Function = string.get(name)?;
        let n = name.to_string();
        string.raw_set(
            name,
            lua.create_function(move |_, args: MultiValue| {
                let subject = args.front().and_then(|v| v.as_string().map(|s| s.as_bytes().len())).unwrap_or(0);
                let plain = n == "find" && args.get(3).is_some_and(|v| v.as_boolean() == Some(true));
                if let (false, Some(Value::String(p))) = (plain, args.get(1)) {
                    let q = quantifiers(&p.as_bytes());
                    if q >= 2 && (subject as f64).powi(q.min(16) as i32) > 1e8 {
                        return Err(mlua::Error::runtime(format!(
                            "string.{n}: pattern with {q} backtracking quantifiers on a {subject}-byte subject could run unbounded; simplify the pattern or split the input"
                        )));
                    }
                }
                real.call::<MultiValue>(args)
            })?,
        )?;
    }
    Ok(())
}

/// Number of `*`, `+`, `-`, `?` quantifiers in a Lua pattern (outside `%` escapes and sets).
fn quantifiers(p: &[u8]) -> u32 {
    let (mut i, mut q) = (0, 0);
    while i < p.len() {
        match p[i] {
            b'%' => i += 1,
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
