//! Prepared sandboxes, reused between invocations (issue 18): building a state (the standard
//! libraries, the prelude, every component, the host-function guards) costs far more than a
//! small function's run, so an untraced run takes a state prepared earlier on its thread and
//! hands it back reset.
//!
//! Owns: the per-thread pool, building a state ([`Prepared::build`]), the compiled-chunk cache
//! of a pooled state, and the reset between runs. Must not touch HTTP or the store.
//!
//! **Isolation.** A pooled state is built with the components that declare themselves
//! [`Component::reusable`] (they read the invocation through [`Env`] at call time); the others
//! are installed again for every run. Right after building, everything user code can reach is
//! recorded: every table reachable from the globals, the string metatable, the array metatable
//! and the thrown-error slot (keys, values and metatables, recursively, through the upvalues of
//! Lua functions too), and the upvalues of every reachable Lua function. After each run the
//! reset puts every recorded table back exactly (fields added by the run removed, changed ones
//! restored, metatables restored, also behind `__metatable`), restores the recorded upvalues and
//! reseeds `math.random`. What a run created is then unreachable from anything the next run can
//! see (user code has no `debug` library and no registry access), so globals, upvalues,
//! metatables, the string library and suspended coroutines of one run do not reach the next,
//! whoever calls. A cached chunk gets its `_ENV` back before each run. A run that hit a limit
//! (its state may hold a hook the watchdog installed), a reset that fails, a state that keeps
//! much more memory than it started with, and a state used [`MAX_USES`] times are dropped
//! instead. Traced runs, checks and runs with an instruction budget always get a fresh state.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use mlua::{Function, Lua, LuaSerdeExt, Value};

use super::components::{self, Component};
use super::sandbox::{self, Binding, Limits, Meter};
use super::trace::Tracer;
use super::{Env, EnvState, Invocation, LuaOptions, Runtime};

/// States kept idle per thread (a nested invocation takes a second one).
pub const PER_THREAD: usize = 2;
/// Runs after which a state is dropped and built again (bounds fragmentation and any growth).
pub const MAX_USES: u32 = 2000;
/// Chunks one pooled state keeps compiled.
const MAX_CHUNKS: usize = 32;
/// Memory a state may keep above its fresh size after a run and a collection.
const MAX_GROWTH: usize = 4 * 1024 * 1024;

thread_local! {
    static POOL: RefCell<Vec<Prepared>> = const { RefCell::new(Vec::new()) };
}

/// May `inv` run in a pooled state?
pub fn eligible(runtime: &Runtime, inv: &Invocation) -> bool {
    runtime.options.reuse_states && !inv.trace && inv.check.is_none() && runtime.options.instruction_limit == 0
}

/// A pooled state prepared for `options`, if this thread has one idle.
pub fn take(options: &LuaOptions) -> Option<Prepared> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let i = p.iter().position(|s| s.options == *options)?;
        Some(p.swap_remove(i))
    })
}

/// Idle pooled states on this thread (tests).
pub fn idle() -> usize {
    POOL.with(|p| p.borrow().len())
}

/// Drop this thread's idle states.
pub fn clear() {
    let states = POOL.with(|p| std::mem::take(&mut *p.borrow_mut()));
    drop(states);
}

/// A sandbox ready to run an invocation.
pub struct Prepared {
    lua: Lua,
    env: Rc<Env>,
    binding: Rc<Binding>,
    options: LuaOptions,
    /// Components installed for every run (pooled states only).
    per_call: Vec<&'static dyn Component>,
    /// Pooled states: the reset, `debug.setupvalue`, compiled chunks by function name.
    pooled: Option<Pooled>,
}

struct Pooled {
    reset: Function,
    setupvalue: Function,
    chunks: HashMap<String, (String, Function)>,
    uses: u32,
    /// Memory in use right after building.
    base_memory: usize,
}

impl Prepared {
    /// Build a state for the invocation `state` describes. `pooled`: install only the reusable
    /// components now (the others per run) and record what the reset restores.
    pub fn build(
        state: Rc<EnvState>,
        meter: Rc<Meter>,
        limits: Limits,
        tracer: Option<Rc<RefCell<Tracer>>>,
        pooled: bool,
    ) -> mlua::Result<Prepared> {
        let options = state.options;
        let binding = Binding::new(meter, limits);
        let (lua, host_debug) = sandbox::new_bound_state(&binding, tracer)?;
        let env = Rc::new(Env::new(state));
        let before = super::global_names(&lua)?;
        let mut per_call = Vec::new();
        for c in components::registry()
            .iter()
            .copied()
            .chain(crate::modules::lua_components())
        {
            if pooled && !c.reusable() {
                per_call.push(c);
            } else {
                c.install(&lua, &env)?;
            }
        }
        // Every host function checks the limits before it starts.
        let installed = super::global_names(&lua)?
            .into_iter()
            .filter(|n| !before.contains(n))
            .collect();
        sandbox::guard_host_functions(&lua, &binding, installed)?;
        let pooled = if pooled {
            // Recording and resetting run outside the invocation's memory limit.
            lua.set_memory_limit(0)?;
            let roots = lua.create_table()?;
            roots.raw_push(lua.globals())?;
            let smt: Value = host_debug
                .get::<Function>("getmetatable")?
                .call(lua.create_string("")?)?;
            roots.raw_push(smt)?;
            roots.raw_push(lua.array_metatable())?;
            let thrown: Value = lua.named_registry_value(sandbox::THROWN)?;
            roots.raw_push(thrown)?;
            let reset: Function = lua
                .load(RESET)
                .set_name("=reset")
                .set_mode(mlua::ChunkMode::Text)
                .call((
                    roots,
                    host_debug.get::<Function>("getmetatable")?,
                    host_debug.get::<Function>("setmetatable")?,
                    host_debug.get::<Function>("getupvalue")?,
                    host_debug.get::<Function>("setupvalue")?,
                    host_debug.get::<Function>("getinfo")?,
                ))?;
            lua.gc_collect()?;
            lua.set_memory_limit(limits.memory)?;
            Some(Pooled {
                reset,
                setupvalue: host_debug.get("setupvalue")?,
                chunks: HashMap::new(),
                uses: 0,
                base_memory: lua.used_memory(),
            })
        } else {
            None
        };
        Ok(Prepared {
            lua,
            env,
            binding,
            options,
            per_call,
            pooled,
        })
    }

    pub fn lua(&self) -> &Lua {
        &self.lua
    }

    /// Serve the next invocation (a state taken from the pool).
    pub fn bind(&self, state: Rc<EnvState>, meter: Rc<Meter>, limits: Limits) -> mlua::Result<()> {
        self.env.rebind(Some(state));
        self.binding.bind(&self.lua, meter, limits)
    }

    /// Install the components that keep per-invocation state, guarded like the others.
    pub fn install_per_call(&self) -> mlua::Result<()> {
        if self.per_call.is_empty() {
            return Ok(());
        }
        for c in &self.per_call {
            c.install(&self.lua, &self.env)?;
        }
        let names = self.per_call.iter().map(|c| c.name().to_string()).collect();
        sandbox::guard_host_functions(&self.lua, &self.binding, names)
    }

    /// The function's chunk, compiled (a pooled state keeps it per function name and source,
    /// with its `_ENV` set back to the globals before each run).
    pub fn chunk(&mut self, name: &str, source: &str) -> mlua::Result<Function> {
        let compile = |lua: &Lua| {
            lua.load(source)
                .set_name(format!("={name}"))
                .set_mode(mlua::ChunkMode::Text)
                .into_function()
        };
        let Some(p) = self.pooled.as_mut() else {
            return compile(&self.lua);
        };
        let f = match p.chunks.get(name) {
            Some((src, f)) if src == source => f.clone(),
            _ => {
                let f = compile(&self.lua)?;
                if p.chunks.len() >= MAX_CHUNKS {
                    p.chunks.clear();
                }
                p.chunks
                    .insert(name.to_string(), (source.to_string(), f.clone()));
                f
            }
        };
        p.setupvalue
            .call::<()>((f.clone(), 1, self.lua.globals()))?;
        Ok(f)
    }

    /// The run is over: reset a pooled state and keep it for this thread's next run, unless the
    /// run hit a limit (`limited`) or the state cannot be reset to what it was.
    pub fn release(self, limited: bool) {
        let Some(mut p) = self.pooled else { return };
        if limited || p.uses + 1 >= MAX_USES {
            return;
        }
        p.uses += 1;
        self.env.rebind(None);
        let lua = &self.lua;
        // No hook is set on a state that hit no limit; the reset runs without a memory limit.
        if lua.set_memory_limit(0).is_err() || p.reset.call::<()>(()).is_err() {
            return;
        }
        if lua.used_memory() > p.base_memory + MAX_GROWTH / 4 {
            if lua.gc_collect().is_err() || lua.used_memory() > p.base_memory + MAX_GROWTH {
                return;
            }
        }
        let me = Prepared {
            pooled: Some(p),
            ..self
        };
        POOL.with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < PER_THREAD {
                pool.push(me);
            }
        });
    }
}

/// Records what user code can reach in a freshly built state; returns the reset that puts it
/// all back. Runs host-only (the debug functions come from the host's `debug` library, which
/// user code never sees; the standard functions are taken before any user code ran).
const RESET: &str = r#"
local roots, getmt, setmt, getupvalue, setupvalue, getinfo = ...
local next, rawset, rawget, rawequal, type = next, rawset, rawget, rawequal, type
local randomseed = math.randomseed
local tables, fns, seen = {}, {}, {}
local walk
walk = function(v)
  local tv = type(v)
  if tv ~= "table" and tv ~= "function" and tv ~= "userdata" then return end
  if seen[v] then return end
  seen[v] = true
  if tv == "table" then
    local copy = {}
    for k, x in next, v do copy[k] = x end
    local mt = getmt(v)
    tables[#tables + 1] = {v, copy, mt}
    for k, x in next, copy do walk(k) walk(x) end
    walk(mt)
  elseif tv == "function" then
    -- Host (C) functions keep their state out of user code's reach; Lua functions' upvalues
    -- are recorded and restored.
    if getinfo(v, "S").what == "C" then return end
    local ups, i = {}, 1
    while true do
      local name, x = getupvalue(v, i)
      if name == nil then break end
      ups[i] = x
      i = i + 1
    end
    if i > 1 then
      fns[#fns + 1] = {v, ups, i - 1}
      for j = 1, i - 1 do walk(ups[j]) end
    end
  else
    walk(getmt(v))
  end
end
for i = 1, #roots do walk(roots[i]) end
seen = nil
return function()
  for i = 1, #tables do
    local e = tables[i]
    local t, copy = e[1], e[2]
    -- Clearing fields during a traversal is allowed; fields the run added go.
    for k in next, t do
      if rawequal(rawget(copy, k), nil) then rawset(t, k, nil) end
    end
    for k, x in next, copy do
      if not rawequal(rawget(t, k), x) then rawset(t, k, x) end
    end
    if not rawequal(getmt(t), e[3]) then setmt(t, e[3]) end
  end
  for i = 1, #fns do
    local e = fns[i]
    local f, ups = e[1], e[2]
    for j = 1, e[3] do
      local _, x = getupvalue(f, j)
      if not rawequal(x, ups[j]) then setupvalue(f, j, ups[j]) end
    end
  end
  randomseed()
end
"#;
