//! Pooled Lua states (`lua::pool`, issue 18): runs on one thread reuse a prepared sandbox, and
//! nothing one run does reaches the next — globals, library tables, metatables (also behind
//! `__metatable`), `_ENV` of a cached chunk, upvalues, suspended coroutines, thrown-error
//! slots, the random generator — whoever calls next, also after an error; a run that hits a
//! limit drops its state. In process, on bare storage (as the benchmarks run), so every run is
//! on this test's thread and reuse is certain (`pool::idle`).

use std::time::Duration;

use ichibase::config::Config;
use ichibase::core::{RequestContext, Role};
use ichibase::lua::{Invocation, LuaOptions, Outcome, Runtime, invoke, pool};
use ichibase::storage::{Storage, StorageOptions};
use serde_json::{Value, json};

struct Fixture {
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    runtime: Runtime,
}

fn fixture(options: LuaOptions) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    let storage = {
        let _g = rt.enter();
        Storage::open(&StorageOptions::from_config(&config)).expect("storage")
    };
    let runtime = Runtime::bare(storage, rt.handle().clone(), options);
    pool::clear();
    Fixture {
        _dir: dir,
        rt,
        runtime,
    }
}

fn user(id: &str, role: Role) -> RequestContext {
    let mut c = RequestContext::new(None, role);
    c.user_id = Some(id.to_string());
    c
}

fn run(f: &Fixture, ctx: RequestContext, name: &str, source: &str, input: Value) -> Outcome {
    let _g = f.rt.enter();
    invoke(
        &f.runtime,
        ctx,
        Invocation {
            function: name.into(),
            version: 1,
            source: source.into(),
            input,
            ..Invocation::default()
        },
    )
}

fn ok(o: Outcome) -> Value {
    o.result.unwrap_or_else(|e| panic!("run failed: {e}"))
}

/// What a clean sandbox looks like, checked from inside a run.
const PROBE: &str = r#"
return function(input, ctx)
  local bad = {}
  local function want(cond, what) if not cond then bad[#bad + 1] = what end end
  want(rawget(_G, "leaked") == nil, "global leaked")
  want(getmetatable(_G) == nil, "globals metatable")
  want(leaked_via_index == nil, "globals __index")
  want(string.upper("a") == "A", "string.upper replaced")
  want(("a"):upper() == "A", "string method through the string metatable")
  want(rawget(string, "evil") == nil, "field added to string")
  want(getmetatable(string) == nil, "string library metatable")
  want(getmetatable("") == false, "string metatable unlocked")
  want(type(table.insert) == "function", "table.insert removed")
  want(math.pi > 3.14 and math.pi < 3.15, "math.pi changed")
  want(type(pcall) == "function" and pcall(function() return 1 end) == true, "pcall replaced")
  want(select(2, pcall(error, "x", 0)) == "x", "error replaced")
  want(coroutine.wrap(function() return 5 end)() == 5, "coroutine.wrap replaced")
  want(rawget(_G, "co") == nil, "a suspended coroutine kept")
  want(type(db.query) == "function" and db.query("select 1 as one")[1].one == 1, "db.query replaced")
  want(json.encode(json.decode("[]")) == "[]", "array metatable changed")
  local amt = getmetatable(json.decode("[]"))
  want(type(amt) ~= "table" or rawget(amt, "__index") == nil, "array metatable field added")
  want(rawget(_G, "handler") == nil, "handler global kept")
  want(next(fn) ~= nil and fn.evil == nil, "fn component table changed")
  want(ctx.user_id == input.user and debug.trace_id() == ctx.trace_id, "the caller's identity")
  local me = db.query("select auth_userid() as u")[1].u
  want(me == input.user, "auth_userid() is " .. tostring(me))
  return {bad = table.concat(bad, "; "), random = math.random(1, 1000000000)}
end
"#;

/// Hostile code that tries every way to leave state behind for the next run.
const HOSTILE: &str = r#"
leaked = "from the previous run"
string.upper = function() return "hacked" end
rawset(string, "evil", true)
setmetatable(string, {__index = function() return "x" end})
table.insert = nil
math.pi = 3
pcall = function() return false, "hijacked" end
error = function() return "no error" end
coroutine.wrap = function() return function() return "hijacked" end end
co = coroutine.create(function() coroutine.yield(1) leaked = "late" end)
coroutine.resume(co)
db.query = function() return {{one = "fake", u = "fake"}} end
local amt = getmetatable(json.decode("[]"))
if type(amt) == "table" then amt.__index = {evil = true} end
fn.evil = true
setmetatable(_G, {__index = function(_, k) return "leak:" .. k end})
function handler() return "stale handler" end
math.randomseed(42)
_ENV = {leaked = true}
"#;

#[test]
fn runs_reuse_a_pooled_state_and_see_nothing_of_the_previous_run() {
    let f = fixture(LuaOptions::default());
    let alice = || user("alice", Role::Admin);
    let bob = || user("bob", Role::Named("user".into()));
    // A clean first run, then the state is back in the pool.
    let r = ok(run(&f, alice(), "probe", PROBE, json!({"user": "alice"})));
    assert_eq!(r["bad"], json!(""), "{r}");
    assert_eq!(pool::idle(), 1, "the state went back to the pool");
    // The hostile run (as alice), in the pooled state.
    let o = run(&f, alice(), "hostile", &format!("{HOSTILE}\nreturn function() return 1 end"), Value::Null);
    assert_eq!(o.result.unwrap(), json!(1), "the hostile run completed");
    assert_eq!(pool::idle(), 1);
    // The next run, as bob, sees a clean sandbox (and bob's identity).
    let r = ok(run(&f, bob(), "probe", PROBE, json!({"user": "bob"})));
    assert_eq!(r["bad"], json!(""), "{r}");
    // math.randomseed(42) did not carry over: the first draw after seeding 42 differs.
    let seeded = ok(run(&f, alice(), "seeded", "math.randomseed(42) return function() return math.random(1, 1000000000) end", Value::Null));
    let next = ok(run(&f, alice(), "probe", PROBE, json!({"user": "alice"})));
    assert_ne!(seeded, next["random"], "the generator was reseeded");
    assert_eq!(pool::idle(), 1, "one state served every run");
}

#[test]
fn a_cached_chunk_runs_its_top_level_again_with_a_fresh_env_and_upvalues() {
    let f = fixture(LuaOptions::default());
    let src = r#"
        count = (count or 0) + 1
        local n = 0
        local env_ok = _ENV == _G
        _ENV = {}          -- the top level replaces its own _ENV
        return function() n = n + 1 return {count = count, n = n, env_ok = env_ok} end
    "#;
    // `count` is read through the replaced _ENV inside the handler: nil, and it stays so.
    for _ in 0..3 {
        let r = ok(run(&f, user("u", Role::Admin), "counter", src, Value::Null));
        assert_eq!(r, json!({"n": 1, "env_ok": true}), "{r}");
    }
    let src2 = "hits = (hits or 0) + 1 local up = {} return function() up[#up + 1] = 1 return {hits = hits, up = #up} end";
    for _ in 0..3 {
        let r = ok(run(&f, user("u", Role::Admin), "counter2", src2, Value::Null));
        assert_eq!(r, json!({"hits": 1, "up": 1}));
    }
    // A new version of the same function runs the new source.
    let r = ok(run(&f, user("u", Role::Admin), "counter2", "return function() return 'v2' end", Value::Null));
    assert_eq!(r, json!("v2"));
    assert_eq!(pool::idle(), 1);
}

#[test]
fn an_error_or_a_thrown_table_leaves_nothing_behind() {
    let f = fixture(LuaOptions::default());
    let o = run(
        &f,
        user("alice", Role::Admin),
        "throws",
        "return function() leaked = 1 string.evil = 1 error({code = 42, message = 'boom'}) end",
        Value::Null,
    );
    let e = o.result.unwrap_err();
    assert_eq!(e.message, "boom");
    assert_eq!(o.error_value, Some(json!({"code": 42, "message": "boom"})));
    assert_eq!(pool::idle(), 1, "a plain error keeps the state (reset)");
    let r = ok(run(&f, user("bob", Role::Admin), "probe", PROBE, json!({"user": "bob"})));
    assert_eq!(r["bad"], json!(""), "{r}");
    // A plain string error after a thrown table is not reported as the old table.
    let o = run(&f, user("bob", Role::Admin), "plain", "return function() error('plain') end", Value::Null);
    assert!(o.error_value.is_none());
    assert!(o.result.unwrap_err().message.contains("plain"));
}

#[test]
fn a_run_that_hits_a_limit_drops_its_state() {
    let f = fixture(LuaOptions {
        memory_limit: 8 * 1024 * 1024,
        timeout: Duration::from_millis(500),
        ..LuaOptions::default()
    });
    ok(run(&f, user("a", Role::Admin), "probe", PROBE, json!({"user": "a"})));
    assert_eq!(pool::idle(), 1);
    let o = run(&f, user("a", Role::Admin), "hog", "leaked = 1 return function() local t = {} for i = 1, 1e8 do t[i] = i end end", Value::Null);
    assert!(o.result.unwrap_err().message.contains("memory"), "memory limit");
    assert_eq!(pool::idle(), 0, "the state that hit the limit was dropped");
    let o = run(&f, user("a", Role::Admin), "spin", "leaked = 1 return function() while true do end end", Value::Null);
    assert!(o.result.is_err());
    assert_eq!(pool::idle(), 0);
    let r = ok(run(&f, user("b", Role::Admin), "probe", PROBE, json!({"user": "b"})));
    assert_eq!(r["bad"], json!(""), "{r}");
    assert_eq!(pool::idle(), 1);
}

fn traced(f: &Fixture, name: &str, source: &str, input: Value) -> Outcome {
    let _g = f.rt.enter();
    invoke(
        &f.runtime,
        user("a", Role::Admin),
        Invocation {
            function: name.into(),
            version: 1,
            source: source.into(),
            input,
            trace: true,
            ..Invocation::default()
        },
    )
}

/// A run's trace as JSON (lines, locals, upvalues, sampling marks) and its instruction count.
fn trace_of(o: Outcome) -> (Value, Option<u64>, Value) {
    let steps = o.steps.as_ref().map(|(s, _)| serde_json::to_value(s).unwrap());
    let n = o.instructions;
    let v = ok(o);
    (steps.expect("a traced run has steps"), n, v)
}

/// A typical traced function: locals, a table, a closure, a coroutine, a host call, a loop
/// long enough to be sampled and to switch the hook's count.
const TRACED: &str = r#"
return function(input)
  local t = {n = 0, list = {}}
  local function add(x) t.n = t.n + x; t.list[#t.list + 1] = x end
  for i = 1, input.n do add(i) end
  local co = coroutine.wrap(function(a) local b = a * 2; coroutine.yield(b); return b + 1 end)
  local y1, y2 = co(3), co()
  local one = db.query("select 1 as one")[1].one
  return {n = t.n, y = y1 + y2, one = one}
end
"#;

#[test]
fn traced_runs_use_pooled_states_and_record_what_a_fresh_state_records() {
    // The reference: every run in a fresh state.
    let fresh = fixture(LuaOptions {
        reuse_states: false,
        ..LuaOptions::default()
    });
    let want = trace_of(traced(&fresh, "t", TRACED, json!({"n": 300})));
    let want_short = trace_of(traced(&fresh, "t", TRACED, json!({"n": 3})));
    assert_eq!(pool::idle(), 0, "[lua_limits] reuse_states = false");
    assert!(want.1.unwrap() > 1000, "long enough to switch the hook's count");
    drop(fresh);

    let f = fixture(LuaOptions {
        timeout: Duration::from_millis(500),
        ..LuaOptions::default()
    });
    // A traced run on a new state, then traced and untraced runs alternating on the pooled one.
    assert_eq!(trace_of(traced(&f, "t", TRACED, json!({"n": 300}))), want);
    assert_eq!(pool::idle(), 1, "a traced run hands its state back");
    assert_eq!(pool::idle_hooked(), 0, "without the tracer's hook");
    for _ in 0..3 {
        let r = ok(run(&f, user("b", Role::Admin), "probe", PROBE, json!({"user": "b"})));
        assert_eq!(r["bad"], json!(""), "{r}");
        let o = run(&f, user("b", Role::Admin), "plain", "return function() return 1 end", Value::Null);
        assert!(o.steps.is_none() && o.instructions.is_none(), "no trace, no count hook after a traced run");
        assert_eq!(ok(o), json!(1));
        // The count starts again at one instruction per hook call: a short run is exact.
        assert_eq!(trace_of(traced(&f, "t", TRACED, json!({"n": 3}))), want_short);
        assert_eq!(trace_of(traced(&f, "t", TRACED, json!({"n": 300}))), want);
        assert_eq!((pool::idle(), pool::idle_hooked()), (1, 0));
    }
    // Hostile code in a traced run leaves nothing for the next (untraced) one.
    let o = traced(&f, "hostile", HOSTILE, Value::Null);
    assert!(o.steps.is_some());
    let r = ok(run(&f, user("c", Role::Admin), "probe", PROBE, json!({"user": "c"})));
    assert_eq!(r["bad"], json!(""), "{r}");
    // A traced run that hits a limit drops its state; the trace keeps what ran.
    let o = traced(&f, "spin", "return function() local i = 0 while true do i = i + 1 end end", Value::Null);
    assert!(o.result.is_err() && o.steps.is_some());
    assert_eq!(pool::idle(), 0, "the state that hit the limit was dropped");
    assert_eq!(trace_of(traced(&f, "t", TRACED, json!({"n": 300}))), want);
}

#[test]
fn disabled_reuse_builds_fresh_states() {
    let f = fixture(LuaOptions {
        reuse_states: false,
        ..LuaOptions::default()
    });
    ok(run(&f, user("a", Role::Admin), "probe", PROBE, json!({"user": "a"})));
    assert_eq!(pool::idle(), 0, "[lua_limits] reuse_states = false");
}

#[test]
fn functions_loaded_with_fn_belong_to_one_invocation() {
    let f = fixture(LuaOptions::default());
    let deploy = |src: &str| {
        let src = src.to_string();
        f.rt
            .block_on(f.runtime.storage.write(
                &RequestContext::system(),
                ichibase::storage::ExecControl::lookup(),
                move |c| ichibase::lua::store::deploy(c, "helper", &src, false, None),
            ))
            .expect("deploy");
    };
    deploy("local calls = 0 return function(x) calls = calls + 1 return {v = 1, calls = calls} end");
    let caller = "return function() fn.call('helper', 1) return fn.call('helper', 2) end";
    // Within one run the loaded function is kept (its upvalue counts both calls); the next run
    // loads it afresh (its own upvalues), and sees a new version at once.
    for _ in 0..2 {
        let r = ok(run(&f, user("a", Role::Admin), "caller", caller, Value::Null));
        assert_eq!(r, json!({"v": 1, "calls": 2}));
    }
    deploy("return function() return {v = 2} end");
    let r = ok(run(&f, user("a", Role::Admin), "caller", caller, Value::Null));
    assert_eq!(r, json!({"v": 2}));
    assert_eq!(pool::idle(), 1);
}

/// The reset finds changed tables and upvalues by their bytes (`lua::pool`): many runs that
/// change, restore, grow and re-change the same library tables, metatables and globals, as
/// different users, each followed by a clean probe.
#[test]
fn repeated_changes_to_the_same_tables_are_all_undone() {
    let f = fixture(LuaOptions::default());
    let changes = [
        // the same global and library field again and again (the node is reused)
        "leaked = 1 string.evil = 1 function string.trim(s) return s end",
        "leaked = {} string.evil = true string.upper = nil",
        // `#` on library tables moves Lua's size hint; a value changed and put back by the run
        "local n = #string + #table + #_G string.format = string.format leaked = n",
        // the array part of a library table grows, then its fields go
        "for i = 1, 2000 do string[i] = i end leaked = #string",
        // the string metatable's __index (locked with __metatable, changed through rawset)
        "rawset(getmetatable('') == false and string or string, 'upper', function() return 'x' end)",
        // the shared array metatable, json's table, coroutine library, a global function
        "local amt = getmetatable(json.decode('[]')) if type(amt) == 'table' then amt.__index = {evil = 1} end json.evil = 1 coroutine.evil = 1 function pcall() return false end",
        // nothing at all
        "",
    ];
    for round in 0..3 {
        for (i, change) in changes.iter().enumerate() {
            let who = if (round + i) % 2 == 0 { "alice" } else { "bob" };
            let o = run(&f, user(who, Role::Named("user".into())), &format!("change{i}"), &format!("{change}\nreturn function() return string.trim and string.trim(' a ') or 1 end"), Value::Null);
            assert!(o.result.is_ok(), "round {round} change {i}: {:?}", o.result.err());
            let r = ok(run(&f, user("carol", Role::Admin), "probe", PROBE, json!({"user": "carol"})));
            assert_eq!(r["bad"], json!(""), "after round {round} change {i}: {r}");
            assert_eq!(pool::idle(), 1, "round {round} change {i}: the state was kept");
        }
    }
}

/// A run that grows a library table far (its array part stays allocated after the reset) does
/// not leave it behind either; the state is kept or dropped, and the next run is clean.
#[test]
fn a_run_that_grows_a_library_table_far_leaves_nothing_behind() {
    let f = fixture(LuaOptions::default());
    ok(run(&f, user("a", Role::Admin), "probe", PROBE, json!({"user": "a"})));
    let o = run(&f, user("a", Role::Admin), "grow", "for i = 1, 200000 do table[i] = i end _G[1] = 1 return function() return #table end", Value::Null);
    assert_eq!(o.result.unwrap(), json!(200000));
    let r = ok(run(&f, user("b", Role::Admin), "probe", PROBE, json!({"user": "b"})));
    assert_eq!(r["bad"], json!(""), "{r}");
    let r = ok(run(&f, user("b", Role::Admin), "len", "return function() return {t = #table, g = rawget(_G, 1) == nil} end", Value::Null));
    assert_eq!(r, json!({"t": 0, "g": true}));
}

/// Upvalues of the sandbox's own Lua functions (recorded when the state was built) and
/// suspended coroutines: a coroutine left suspended by one run, holding the previous caller's
/// data, cannot be resumed by the next.
#[test]
fn suspended_coroutines_and_closures_of_a_run_are_gone_for_the_next() {
    let f = fixture(LuaOptions::default());
    let o = run(
        &f,
        user("alice", Role::Admin),
        "park",
        r#"
        local secret = "alice's secret"
        parked = coroutine.create(function() coroutine.yield(secret) return secret end)
        coroutine.resume(parked)
        string.peek = function() return secret end
        local wrapped = coroutine.wrap(function() while true do coroutine.yield(secret) end end)
        wrapped()
        table.peek = wrapped
        return function() return 1 end
        "#,
        Value::Null,
    );
    assert_eq!(o.result.unwrap(), json!(1));
    let r = ok(run(
        &f,
        user("bob", Role::Named("user".into())),
        "look",
        r#"return function()
            local seen = {}
            if rawget(_G, "parked") ~= nil then seen[#seen + 1] = "parked" end
            if string.peek ~= nil then seen[#seen + 1] = "string.peek" end
            if table.peek ~= nil then seen[#seen + 1] = "table.peek" end
            for k, v in pairs(_G) do
              if type(v) == "thread" then seen[#seen + 1] = "thread " .. tostring(k) end
            end
            return table.concat(seen, ",")
        end"#,
        Value::Null,
    ));
    assert_eq!(r, json!(""));
}

/// A component that keeps per-invocation state once called (`notify`, `chat`, `flow`:
/// `Component::reusable_until_called`) is installed once in a pooled state and kept while
/// unused; once a run called one of its functions, every later run gets its own install. A
/// run's changes to its table are undone either way.
#[test]
fn components_kept_until_called_are_installed_afresh_after_a_call() {
    let f = fixture(LuaOptions::default());
    let id = "return function() return tostring(notify) .. ' ' .. tostring(notify.broadcast) end";
    let first = ok(run(&f, user("a", Role::Admin), "id", id, Value::Null));
    let again = ok(run(&f, user("b", Role::Admin), "id", id, Value::Null));
    assert_eq!(first, again, "unused: the install made when building is kept");
    // A run changes the table (undone), then one calls a function (no server here: it fails,
    // but it was called).
    let o = run(&f, user("a", Role::Admin), "evil", "notify.evil = 1 notify.broadcast = nil return function() return 1 end", Value::Null);
    assert_eq!(o.result.unwrap(), json!(1));
    let r = ok(run(&f, user("b", Role::Admin), "check", "return function() return {evil = notify.evil == nil, fn = type(notify.broadcast)} end", Value::Null));
    assert_eq!(r, json!({"evil": true, "fn": "function"}));
    let o = run(&f, user("a", Role::Admin), "call", "return function() local ok = pcall(notify.broadcast, 'c', {}) return ok end", Value::Null);
    assert_eq!(o.result.unwrap(), json!(false));
    let later = ok(run(&f, user("b", Role::Admin), "id", id, Value::Null));
    let later2 = ok(run(&f, user("b", Role::Admin), "id", id, Value::Null));
    assert_ne!(later, first, "after a call: a fresh install");
    assert_ne!(later2, later, "and again for every later run");
    assert_eq!(pool::idle(), 1);
    let r = ok(run(&f, user("c", Role::Admin), "probe", PROBE, json!({"user": "c"})));
    assert_eq!(r["bad"], json!(""), "{r}");
}
