//! Prepared sandboxes, reused between invocations (issue 18): building a state (the standard
//! libraries, the prelude, every component, the host-function guards) costs far more than a
//! small function's run, so a run takes a state prepared earlier on its thread and hands it
//! back reset.
//!
//! Owns: the per-thread pool, building a state ([`Prepared::build`]), the compiled-chunk cache
//! of a pooled state, and the reset between runs. Must not touch HTTP or the store.
//!
//! **Isolation.** A pooled state is built with the components that declare themselves
//! [`Component::reusable`] (they read the invocation through [`Env`] at call time) and those
//! that are [`Component::reusable_until_called`] (their install serves later invocations until
//! one of its functions is called — the guards note the call — and is made afresh for every
//! run after that); the others are installed again for every run. Right after building,
//! everything user code can reach is recorded ([`RECORD`]): every table reachable from the
//! globals, the string metatable, the array metatable and the thrown-error slot (keys, values
//! and metatables, recursively, through the upvalues of Lua functions too), and the upvalues
//! of every reachable Lua function. After each run the reset puts every recorded table back
//! exactly (fields added by the run removed, changed ones restored, metatables restored, also
//! behind `__metatable`), restores the recorded upvalues and reseeds `math.random`. It costs
//! what the run changed, not what was recorded: each recorded table and function is first
//! compared byte for byte with its state when it last matched the recording (the table's size
//! fields, metatable, array part and node array; the closure's upvalue values: [`raw`], a
//! memory comparison of a few kilobytes in all), and only those that differ are compared and
//! restored field by field, then their bytes taken again. What a run created is then
//! unreachable from anything the next run can see (user code has no `debug` library and no
//! registry access), so globals, upvalues, metatables, the string library and suspended
//! coroutines of one run do not reach the next, whoever calls. A cached chunk gets its `_ENV`
//! back before each run. A run that hit a limit (its state may hold a hook the watchdog
//! installed), a reset that fails, a state that keeps much more memory than it started with
//! or whose recorded tables grew far, and a state used [`MAX_USES`] times are dropped instead.
//! A traced run takes a pooled state too: the tracer's hook is installed for that run only
//! ([`sandbox::start_trace`]) and taken off before the reset. Checks and runs with an
//! instruction budget always get a fresh state.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use mlua::{Function, Lua, LuaSerdeExt, Table, Value};

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
    runtime.options.reuse_states && inv.check.is_none() && runtime.options.instruction_limit == 0
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

/// Idle pooled states on this thread with a hook installed (tests: none should have one, a
/// traced run takes its tracer's hook off when it ends).
pub fn idle_hooked() -> usize {
    POOL.with(|p| {
        p.borrow()
            .iter()
            .filter(|s| {
                let mut hooked = true;
                // SAFETY: only reads the state's hook; no code of the idle state runs.
                let _ = unsafe {
                    s.lua
                        .exec_raw::<()>((), |l| hooked = mlua::ffi::lua_gethook(l).is_some())
                };
                hooked
            })
            .count()
    })
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
    /// Components installed for every run (pooled states only), each with the called flag of
    /// its install made when building, if it was made then (kept until one of its functions is
    /// called: [`Component::reusable_until_called`]).
    per_call: Vec<(&'static dyn Component, Option<Rc<Cell<bool>>>)>,
    /// Pooled states: the reset, `debug.setupvalue`, compiled chunks by function name.
    pooled: Option<Pooled>,
    /// The tracer's hook is on for the current run (a pooled state turns it off after).
    traced: bool,
}

struct Pooled {
    snapshot: Snapshot,
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
        // A pooled state starts tracing once it is recorded (the recording is host code).
        let traced = tracer.is_some();
        let (lua, host_debug) =
            sandbox::new_bound_state(&binding, if pooled { None } else { tracer.clone() })?;
        let env = Rc::new(Env::new(state));
        let before = super::global_names(&lua)?;
        let mut per_call = Vec::new();
        for c in components::registry()
            .iter()
            .copied()
            .chain(crate::modules::lua_components())
        {
            if pooled && !c.reusable() {
                per_call.push((c, None));
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
        // Installed now and kept (recorded below, so the reset restores their tables) until
        // one of their functions is called.
        for (c, called) in per_call.iter_mut() {
            if c.reusable_until_called() {
                c.install(&lua, &env)?;
                let flag = Rc::new(Cell::new(false));
                sandbox::guard_host_functions_noting(
                    &lua,
                    &binding,
                    vec![c.name().to_string()],
                    Some(Rc::clone(&flag)),
                )?;
                *called = Some(flag);
            }
        }
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
            let recorded: (Table, Table, Function, Function) = lua
                .load(RECORD)
                .set_name("=record")
                .set_mode(mlua::ChunkMode::Text)
                .call((
                    roots,
                    host_debug.get::<Function>("getmetatable")?,
                    host_debug.get::<Function>("setmetatable")?,
                    host_debug.get::<Function>("getupvalue")?,
                    host_debug.get::<Function>("setupvalue")?,
                    host_debug.get::<Function>("getinfo")?,
                ))?;
            let randomseed: Function = lua
                .globals()
                .get::<Table>("math")?
                .raw_get("randomseed")?;
            let snapshot = Snapshot::new(recorded, randomseed)?;
            lua.gc_collect()?;
            lua.set_memory_limit(limits.memory)?;
            Some(Pooled {
                snapshot,
                setupvalue: host_debug.get("setupvalue")?,
                chunks: HashMap::new(),
                uses: 0,
                base_memory: lua.used_memory(),
            })
        } else {
            None
        };
        if let (Some(_), Some(t)) = (&pooled, tracer) {
            sandbox::start_trace(&lua, &binding, t)?;
        }
        Ok(Prepared {
            lua,
            env,
            binding,
            options,
            per_call,
            pooled,
            traced,
        })
    }

    pub fn lua(&self) -> &Lua {
        &self.lua
    }

    /// The next run is on an async worker (see `sandbox::Limit::Inline`), or not.
    pub fn set_inline(&self, inline: bool) {
        self.binding.set_inline(inline);
    }

    /// Move the bound run's wall-clock deadline (before it starts).
    pub fn set_deadline(&self, deadline: std::time::Instant) {
        self.binding.set_deadline(deadline);
    }

    /// Serve the next invocation (a state taken from the pool), recording it with `tracer` if
    /// it is traced.
    pub fn bind(
        &mut self,
        state: Rc<EnvState>,
        meter: Rc<Meter>,
        limits: Limits,
        tracer: Option<Rc<RefCell<Tracer>>>,
    ) -> mlua::Result<()> {
        self.env.rebind(Some(state));
        self.binding.bind(&self.lua, meter, limits)?;
        if let Some(t) = tracer {
            sandbox::start_trace(&self.lua, &self.binding, t)?;
            self.traced = true;
        }
        Ok(())
    }

    /// Install the components that keep per-invocation state, guarded like the others.
    /// A component installed when building is kept while none of its functions was called
    /// (the reset put its table back as recorded) and it may serve this invocation.
    pub fn install_per_call(&self) -> mlua::Result<()> {
        let mut names = Vec::new();
        for (c, called) in &self.per_call {
            if called.as_ref().is_some_and(|f| !f.get()) && c.reusable_until_called() {
                continue;
            }
            c.install(&self.lua, &self.env)?;
            names.push(c.name().to_string());
        }
        if names.is_empty() {
            return Ok(());
        }
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
        // The tracer's hook comes off before the reset (which must not be recorded).
        if self.traced && sandbox::stop_trace(lua, &self.binding).is_err() {
            return;
        }
        // No hook is set on a state that hit no limit; the reset runs without a memory limit.
        if lua.set_memory_limit(0).is_err() || !matches!(p.snapshot.reset(), Ok(true)) {
            return;
        }
        if lua.used_memory() > p.base_memory + MAX_GROWTH / 4 {
            if lua.gc_collect().is_err() || lua.used_memory() > p.base_memory + MAX_GROWTH {
                return;
            }
        }
        let me = Prepared {
            pooled: Some(p),
            traced: false,
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

/// What the reset puts back: every table and Lua function user code can reach in a freshly
/// built state ([`RECORD`]), with their bytes ([`raw`]) for the fast check.
struct Snapshot {
    /// The recorded tables and Lua functions (held: their snapshots point into them).
    tables: Table,
    fns: Table,
    restore_table: Function,
    restore_fn: Function,
    randomseed: Function,
    table_snaps: Vec<raw::TableSnap>,
    fn_snaps: Vec<raw::FnSnap>,
    /// The layout check passed: unchanged tables and functions are found by their bytes.
    fast: bool,
    /// Bytes of all table snapshots right after building.
    base_bytes: usize,
}

impl Snapshot {
    fn new(
        (tables, fns, restore_table, restore_fn): (Table, Table, Function, Function),
        randomseed: Function,
    ) -> mlua::Result<Snapshot> {
        let fast = raw::layout_ok();
        let (mut table_snaps, mut fn_snaps) = (Vec::new(), Vec::new());
        if fast {
            for t in tables.sequence_values::<Table>() {
                // SAFETY: `tables` keeps every recorded table alive as long as the snapshot.
                table_snaps.push(unsafe { raw::TableSnap::take(&t?) });
            }
            for f in fns.sequence_values::<Function>() {
                // SAFETY: as above; RECORD lists Lua functions only.
                fn_snaps.push(unsafe { raw::FnSnap::take(&f?) });
            }
        }
        let base_bytes = table_snaps.iter().map(raw::TableSnap::size).sum();
        Ok(Snapshot {
            tables,
            fns,
            restore_table,
            restore_fn,
            randomseed,
            table_snaps,
            fn_snaps,
            fast,
            base_bytes,
        })
    }

    /// Put every recorded table and upvalue back and reseed `math.random`. Only tables and
    /// functions whose bytes changed are compared and restored through Lua. Between runs only
    /// (no code runs in the state). `Ok(false)`: the state is fine but grew its recorded
    /// tables too much to keep.
    fn reset(&mut self) -> mlua::Result<bool> {
        if !self.fast {
            for i in 1..=self.tables.raw_len() {
                self.restore_table.call::<()>(i)?;
            }
            for i in 1..=self.fns.raw_len() {
                self.restore_fn.call::<()>(i)?;
            }
            self.randomseed.call::<()>(())?;
            return Ok(true);
        }
        let mut bytes = 0;
        for (i, s) in self.table_snaps.iter_mut().enumerate() {
            // SAFETY: the table is alive (held by `tables`) and no code runs in the state.
            unsafe {
                if !s.same() {
                    self.restore_table.call::<()>(i + 1)?;
                    s.retake();
                }
            }
            bytes += s.size();
        }
        for (i, s) in self.fn_snaps.iter_mut().enumerate() {
            // SAFETY: as above.
            unsafe {
                if !s.same() {
                    self.restore_fn.call::<()>(i + 1)?;
                    s.retake();
                }
            }
        }
        self.randomseed.call::<()>(())?;
        // A run that grew a recorded table (its fields are gone, its arrays stay allocated)
        // would make every later check compare the larger bytes.
        Ok(bytes <= 2 * self.base_bytes + MAX_SNAPSHOT_GROWTH)
    }
}

/// Bytes the recorded tables may grow by (see [`Snapshot::reset`]) before the state is dropped.
const MAX_SNAPSHOT_GROWTH: usize = 64 * 1024;

/// Records what user code can reach in a freshly built state; returns the recorded tables and
/// Lua functions (for the byte-level check, [`raw`]) and the functions that put one of them,
/// or all, back as recorded. Runs host-only (the debug functions come from the host's `debug`
/// library, which user code never sees; the standard functions are taken before any user code
/// ran).
const RECORD: &str = r#"
local roots, getmt, setmt, getupvalue, setupvalue, getinfo = ...
local next, rawset, rawget, rawequal, type = next, rawset, rawget, rawequal, type
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
local function restore_table(i)
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
local function restore_fn(i)
  local e = fns[i]
  local f, ups = e[1], e[2]
  for j = 1, e[3] do
    local _, x = getupvalue(f, j)
    if not rawequal(x, ups[j]) then setupvalue(f, j, ups[j]) end
  end
end
local tlist, flist = {}, {}
for i = 1, #tables do tlist[i] = tables[i][1] end
for i = 1, #fns do flist[i] = fns[i][1] end
return tlist, flist, restore_table, restore_fn
"#;
/// Byte-level snapshots of Lua tables and closures' upvalues: the fast check of the reset.
///
/// Reads the vendored Lua 5.4's object layout (`lobject.h`: `Table`, `Node`, `TValue`,
/// `LClosure`, `UpVal`) without calling into Lua. A table whose size fields, metatable, array
/// part and node array hold the same bytes as when it was last known to match its recorded
/// contents holds the same keys and values (every value and key is a tagged immediate or a
/// pointer to an object the recording keeps alive, so no other object can take its address);
/// only a table whose bytes differ is compared and restored through Lua. Bytes can also differ
/// without a change (Lua's `#` updates a size hint, the collector marks removed keys dead, a
/// resize moves padding): that only costs a restore, after which the bytes are taken again.
/// [`layout_ok`] checks the layout once per process on a scratch state; if it does not match
/// (another Lua version), every table and closure is restored through Lua at every reset.
mod raw {
    use std::ffi::c_void;
    use std::sync::OnceLock;

    use mlua::{Function, Lua, Table};

    /// `TValue`: 8 bytes of value, a tag byte, padding (16 bytes).
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct TValue {
        value: u64,
        tt: u8,
    }

    /// `Table` (`lobject.h`).
    #[repr(C)]
    struct RawTable {
        next: *const c_void,
        tt: u8,
        marked: u8,
        flags: u8,
        lsizenode: u8,
        alimit: u32,
        array: *const TValue,
        node: *const u8,
        lastfree: *const u8,
        metatable: *const c_void,
        gclist: *const c_void,
    }

    /// `sizeof(Node)`: value, tag, key tag, `next`, key value.
    const NODE: usize = 24;
    /// `BITRAS`: set when `alimit` is not the real size of the array part.
    const BITRAS: u8 = 1 << 7;
    /// `LClosure`: `nupvalues` and `upvals[]` offsets; `UpVal`: offset of `v.p`.
    const CL_NUPVALUES: usize = 10;
    const CL_UPVALS: usize = 32;
    const UV_V: usize = 16;

    /// What identifies a table's contents: array size hint and its flag, node array size,
    /// metatable.
    #[derive(Clone, Copy, PartialEq, Eq)]
    struct Header {
        alimit: u32,
        ras: u8,
        lsizenode: u8,
        metatable: usize,
    }

    /// SAFETY (all readers below): `t` points to a live table of a state no code runs in.
    unsafe fn header(t: *const RawTable) -> Header {
        unsafe {
            Header {
                alimit: (*t).alimit,
                ras: (*t).flags & BITRAS,
                lsizenode: (*t).lsizenode,
                metatable: (*t).metatable as usize,
            }
        }
    }

    /// `luaH_realasize`.
    fn array_size(h: &Header) -> usize {
        let a = h.alimit as usize;
        if h.ras == 0 || a & a.wrapping_sub(1) == 0 {
            a
        } else {
            a.next_power_of_two()
        }
    }

    unsafe fn parts<'a>(t: *const RawTable, h: &Header) -> (&'a [u8], &'a [u8]) {
        unsafe {
            let asize = array_size(h) * std::mem::size_of::<TValue>();
            let array = if asize == 0 {
                &[][..]
            } else {
                std::slice::from_raw_parts((*t).array as *const u8, asize)
            };
            let nodes = std::slice::from_raw_parts((*t).node, NODE << h.lsizenode);
            (array, nodes)
        }
    }

    /// A table's bytes when it last matched its recorded contents.
    pub struct TableSnap {
        t: *const RawTable,
        header: Header,
        bytes: Vec<u8>,
    }

    impl TableSnap {
        /// SAFETY: `t` is a table the caller keeps alive as long as the snapshot.
        pub unsafe fn take(t: &Table) -> TableSnap {
            let mut s = TableSnap {
                t: t.to_pointer() as *const RawTable,
                header: Header {
                    alimit: 0,
                    ras: 0,
                    lsizenode: 0,
                    metatable: 0,
                },
                bytes: Vec::new(),
            };
            unsafe { s.retake() };
            s
        }

        /// Take the bytes again (after a restore).
        pub unsafe fn retake(&mut self) {
            unsafe {
                self.header = header(self.t);
                let (a, n) = parts(self.t, &self.header);
                self.bytes.clear();
                self.bytes.extend_from_slice(a);
                self.bytes.extend_from_slice(n);
            }
        }

        /// Are the table's bytes those of the snapshot?
        pub unsafe fn same(&self) -> bool {
            unsafe {
                let h = header(self.t);
                if h != self.header {
                    return false;
                }
                let (a, n) = parts(self.t, &h);
                a.len() + n.len() == self.bytes.len()
                    && self.bytes[..a.len()] == *a
                    && self.bytes[a.len()..] == *n
            }
        }

        pub fn size(&self) -> usize {
            self.bytes.len()
        }
    }

    /// A Lua closure's upvalues (value and tag of each) when they last matched the recording.
    pub struct FnSnap {
        f: *const u8,
        ups: Vec<(u64, u8)>,
    }

    unsafe fn upvalues(f: *const u8, out: &mut Vec<(u64, u8)>) {
        unsafe {
            let n = *f.add(CL_NUPVALUES) as usize;
            let upvals = f.add(CL_UPVALS) as *const *const u8;
            out.clear();
            for i in 0..n {
                let uv = *upvals.add(i);
                let v = *(uv.add(UV_V) as *const *const TValue);
                out.push(((*v).value, (*v).tt));
            }
        }
    }

    impl FnSnap {
        /// SAFETY: `f` is a Lua (not C) function the caller keeps alive as long as the
        /// snapshot.
        pub unsafe fn take(f: &Function) -> FnSnap {
            let mut s = FnSnap {
                f: f.to_pointer() as *const u8,
                ups: Vec::new(),
            };
            unsafe { upvalues(s.f, &mut s.ups) };
            s
        }

        pub unsafe fn retake(&mut self) {
            unsafe { upvalues(self.f, &mut self.ups) };
        }

        pub unsafe fn same(&self) -> bool {
            unsafe {
                let n = *self.f.add(CL_NUPVALUES) as usize;
                if n != self.ups.len() {
                    return false;
                }
                let upvals = self.f.add(CL_UPVALS) as *const *const u8;
                self.ups.iter().enumerate().all(|(i, &(value, tt))| {
                    let uv = *upvals.add(i);
                    let v = *(uv.add(UV_V) as *const *const TValue);
                    (*v).value == value && (*v).tt == tt
                })
            }
        }
    }

    /// Does this build's Lua have the layout the snapshots read? Checked once per process on
    /// a scratch state: known tables and closures read back through the layout.
    pub fn layout_ok() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            let ok = check().unwrap_or(false);
            if !ok {
                tracing::warn!(
                    "Lua object layout not as expected: pooled states are reset by a full comparison (slower)"
                );
            }
            ok
        })
    }

    fn check() -> mlua::Result<bool> {
        let lua = Lua::new();
        let mut version = 0.0;
        // SAFETY: reads the version number.
        unsafe { lua.exec_raw::<()>((), |l| version = mlua::ffi::lua_version(l))? };
        if version != 504.0 {
            return Ok(false);
        }
        let (t, f, mt, x): (Table, Function, Table, mlua::String) = lua
            .load(
                r#"local t = {10, 20, k = 30, j = 40}
                   local up, up2 = 77, "x"
                   return t, function() return up, up2 end, {}, "x""#,
            )
            .eval()?;
        // SAFETY: `t` and `f` are alive (held above) and no code runs in the state.
        unsafe {
            let rt = t.to_pointer() as *const RawTable;
            let h = header(rt);
            if h.alimit != 2 || h.ras != 0 || h.lsizenode != 1 || h.metatable != 0 {
                return Ok(false);
            }
            let (a, n) = parts(rt, &h);
            let int = |b: &[u8], at: usize| {
                (
                    i64::from_ne_bytes(b[at..at + 8].try_into().unwrap()),
                    b[at + 8],
                )
            };
            // LUA_VNUMINT is 3; a short string key's tag is LUA_VSHRSTR | BIT_ISCOLLECTABLE.
            if int(a, 0) != (10, 3) || int(a, 16) != (20, 3) {
                return Ok(false);
            }
            let mut vals = [int(n, 0).0, int(n, NODE).0];
            vals.sort();
            if vals != [30, 40] || n[8] != 3 || n[NODE + 8] != 3 || n[9] != 0x44 || n[NODE + 9] != 0x44 {
                return Ok(false);
            }
            let before = TableSnap::take(&t);
            if !before.same() {
                return Ok(false);
            }
            t.raw_set("k", 31)?;
            if before.same() {
                return Ok(false);
            }
            t.set_metatable(Some(mt.clone()))?;
            if header(rt).metatable != mt.to_pointer() as usize {
                return Ok(false);
            }
            // The closure: two upvalues, an integer and a string.
            let s = FnSnap::take(&f);
            if s.ups != [(77, 3), (x.to_pointer() as u64, 0x44)] {
                return Ok(false);
            }
            let mut id = 0usize;
            lua.exec_raw::<()>(f.clone(), |l| {
                id = mlua::ffi::lua_upvalueid(l, -1, 1) as usize;
            })?;
            let upvals = (f.to_pointer() as *const u8).add(CL_UPVALS) as *const usize;
            if *upvals != id {
                return Ok(false);
            }
        }
        Ok(true)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn the_layout_matches_the_vendored_lua() {
            assert!(super::layout_ok());
        }
    }
}
