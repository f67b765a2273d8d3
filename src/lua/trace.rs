//! The deep trace: every executed line of a traced invocation with the values of the
//! function's locals and upvalues *after* the line ran.
//!
//! A line hook fires before a line runs, so the state it sees is the state after the previous
//! line of the same frame: each step stays pending until the next line (or the return) of its
//! frame completes it. Values are serialised safely: depth, entry and length limits, cycles
//! marked, functions/userdata/threads shown by type. Reading locals uses Lua's `debug` library,
//! which only the host holds.

use std::collections::HashSet;

use mlua::{Function, Lua, Table, Value};
use serde::Serialize;
use serde_json::{Map, Value as Json};

fn approx_size(m: &Map<String, Json>) -> usize {
    fn go(v: &Json) -> usize {
        match v {
            Json::String(s) => s.len() + 2,
            Json::Array(a) => 2 + a.iter().map(go).sum::<usize>(),
            Json::Object(o) => 2 + o.iter().map(|(k, v)| k.len() + 3 + go(v)).sum::<usize>(),
            _ => 8,
        }
    }
    m.iter().map(|(k, v)| k.len() + 3 + go(v)).sum()
}

/// Approximate bytes one step takes once stored.
pub fn step_size(s: &Step) -> usize {
    48 + s.function.len() + s.source.len() + approx_size(&s.locals) + approx_size(&s.upvalues)
}

/// Limits of one serialised snapshot.
const MAX_DEPTH: usize = 3;
const MAX_ENTRIES: usize = 50;
const MAX_STRING: usize = 256;

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub step: u32,
    pub line: i32,
    pub depth: u32,
    pub function: String,
    pub source: String,
    pub locals: Map<String, Json>,
    pub upvalues: Map<String, Json>,
    /// The values were read after the line ran (false: before, when the frame ended by error).
    pub after: bool,
}

pub struct Tracer {
    getlocal: Option<Function>,
    getinfo: Option<Function>,
    getupvalue: Option<Function>,
    steps: Vec<Step>,
    /// Pending step per stack depth, with the index in `steps` of the step whose values are its
    /// "before" values (the previous line of the same frame; `None`: its own). The values are
    /// read once per line and moved, never copied, unless a frame ends by error.
    pending: Vec<Option<(Step, Option<usize>)>>,
    seq: u32,
    max_steps: usize,
    pub truncated: bool,
    /// Approximate bytes of recorded steps so far.
    bytes: usize,
    /// Most bytes of steps one trace records (then it is marked truncated): `[traces] max_bytes`.
    max_bytes: usize,
    /// Stack level of the hooked function as seen from a host call of `debug.getlocal`.
    level: i64,
}

impl Tracer {
    pub fn new(max_steps: usize, max_bytes: usize) -> Self {
        Tracer {
            getlocal: None,
            getinfo: None,
            getupvalue: None,
            steps: Vec::new(),
            pending: Vec::new(),
            seq: 0,
            max_steps,
            truncated: false,
            bytes: 0,
            max_bytes,
            level: 1,
        }
    }

    pub fn attach(&mut self, host_debug: &Table) -> mlua::Result<()> {
        self.getlocal = Some(host_debug.get("getlocal")?);
        self.getinfo = Some(host_debug.get("getinfo")?);
        self.getupvalue = Some(host_debug.get("getupvalue")?);
        Ok(())
    }

    /// Frames on the stack (a galloping search: each probe walks the stack).
    fn depth(lua: &Lua) -> u32 {
        let has = |d: u32| lua.inspect_stack(d as usize, |_| ()).is_some();
        if !has(0) {
            return 0;
        }
        let mut hi = 1;
        while has(hi) {
            hi *= 2;
        }
        // has(lo) and !has(hi)
        let mut lo = hi / 2;
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if has(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        hi
    }

    /// A pending step that never completed keeps the values from before its line.
    fn settle(&self, (mut s, from): (Step, Option<usize>)) -> Step {
        if let Some(prev) = from.and_then(|i| self.steps.get(i)) {
            s.locals = prev.locals.clone();
            s.upvalues = prev.upvalues.clone();
        }
        s
    }

    /// Locals and upvalues of the hooked frame now.
    fn snapshot(&self) -> mlua::Result<(Map<String, Json>, Map<String, Json>)> {
        let (Some(getlocal), Some(getinfo), Some(getupvalue)) =
            (&self.getlocal, &self.getinfo, &self.getupvalue)
        else {
            return Ok((Map::new(), Map::new()));
        };
        let mut locals = Map::new();
        let mut budget = 500usize;
        for i in 1..=200 {
            let (name, value): (Option<String>, Value) = getlocal.call((self.level, i))?;
            let Some(name) = name else { break };
            if name.starts_with('(') {
                continue;
            }
            let mut seen = HashSet::new();
            locals.insert(name, serialize(&value, 0, &mut seen, &mut budget));
        }
        let mut upvalues = Map::new();
        let info: Value = getinfo.call((self.level, "f"))?;
        if let Value::Table(info) = info {
            if let Ok(Value::Function(f)) = info.get::<Value>("func") {
                for i in 1..=60 {
                    let (name, value): (Option<String>, Value) = getupvalue.call((f.clone(), i))?;
                    let Some(name) = name else { break };
                    if name == "_ENV" || name.is_empty() {
                        continue;
                    }
                    let mut seen = HashSet::new();
                    upvalues.insert(name, serialize(&value, 0, &mut seen, &mut budget));
                }
            }
        }
        Ok((locals, upvalues))
    }

    fn emit(&mut self, s: Step) {
        self.bytes += step_size(&s);
        self.steps.push(s);
    }

    fn flush_deeper(&mut self, depth: u32) {
        while self.pending.len() > depth as usize + 1 {
            if let Some(Some(p)) = self.pending.pop() {
                let s = self.settle(p);
                self.emit(s);
            }
        }
    }

    pub fn on_line(&mut self, lua: &Lua, d: &mlua::Debug) -> mlua::Result<()> {
        if self.truncated && self.pending.iter().all(Option::is_none) {
            return Ok(());
        }
        // The engine's own Lua modules (the `prop` library) are not the user's code: their
        // lines would only bury the user's steps (and cost memory).
        if d.source().short_src.as_deref() == Some("prop") {
            return Ok(());
        }
        let depth = Self::depth(lua);
        self.flush_deeper(depth);
        let (locals, upvalues) = self.snapshot()?;
        let mut values = Some((locals, upvalues));
        let mut from = None;
        if let Some(Some((mut prev, _))) = self.pending.get_mut(depth as usize).map(Option::take) {
            let (locals, upvalues) = values.take().unwrap_or_default();
            prev.locals = locals;
            prev.upvalues = upvalues;
            prev.after = true;
            from = Some(self.steps.len());
            self.emit(prev);
        }
        if self.seq as usize >= self.max_steps || self.bytes >= self.max_bytes {
            self.truncated = true;
            return Ok(());
        }
        let (locals, upvalues) = values.unwrap_or_default();
        let names = d.names();
        let source = d.source();
        let step = Step {
            step: self.seq,
            line: d.current_line().map(|n| n as i32).unwrap_or(-1),
            depth,
            function: match (names.name, source.what) {
                (Some(n), _) => n.to_string(),
                (None, "main") => "main chunk".into(),
                (None, _) => format!("function@{}", source.line_defined.unwrap_or(0)),
            },
            source: source.short_src.map(|s| s.to_string()).unwrap_or_default(),
            locals,
            upvalues,
            after: false,
        };
        self.seq += 1;
        if self.pending.len() <= depth as usize {
            self.pending.resize(depth as usize + 1, None);
        }
        self.pending[depth as usize] = Some((step, from));
        Ok(())
    }

    pub fn on_return(&mut self, lua: &Lua, _d: &mlua::Debug) -> mlua::Result<()> {
        let depth = Self::depth(lua);
        self.flush_deeper(depth);
        if let Some(Some((mut prev, _))) = self.pending.get_mut(depth as usize).map(Option::take) {
            let (locals, upvalues) = self.snapshot()?;
            prev.locals = locals;
            prev.upvalues = upvalues;
            prev.after = true;
            self.emit(prev);
        }
        Ok(())
    }

    /// All steps in execution order.
    pub fn finish(mut self) -> (Vec<Step>, bool) {
        let pending: Vec<_> = self.pending.drain(..).flatten().collect();
        for p in pending {
            let s = self.settle(p);
            self.steps.push(s);
        }
        self.steps.sort_by_key(|s| s.step);
        (self.steps, self.truncated)
    }

    /// Annotate the trace from the `debug` component (`debug.checkpoint(label, value)`).
    pub fn checkpoint(&mut self, line: i32, label: String, value: Json) {
        if self.seq as usize >= self.max_steps || self.bytes >= self.max_bytes {
            self.truncated = true;
            return;
        }
        let mut locals = Map::new();
        locals.insert(label, value);
        self.emit(Step {
            step: self.seq,
            line,
            depth: 0,
            function: "checkpoint".into(),
            source: String::new(),
            locals,
            upvalues: Map::new(),
            after: true,
        });
        self.seq += 1;
    }
}

/// A Lua value as JSON for traces and hover, within limits.
pub fn serialize(v: &Value, depth: usize, seen: &mut HashSet<usize>, budget: &mut usize) -> Json {
    if *budget == 0 {
        return Json::String("…".into());
    }
    *budget -= 1;
    match v {
        Value::Nil => Json::Null,
        Value::Boolean(b) => Json::Bool(*b),
        Value::Integer(i) => Json::from(*i),
        Value::Number(n) => serde_json::Number::from_f64(*n)
            .map(Json::Number)
            .unwrap_or_else(|| Json::String(n.to_string())),
        Value::String(s) => {
            // Only a prefix is read: a local holding megabytes must not be copied per line.
            let bytes = s.as_bytes();
            let head =
                String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_STRING * 4)]).into_owned();
            if head.chars().count() > MAX_STRING || bytes.len() > MAX_STRING * 4 {
                Json::String(format!(
                    "{}… ({} bytes)",
                    head.chars().take(MAX_STRING).collect::<String>(),
                    bytes.len()
                ))
            } else {
                Json::String(head)
            }
        }
        Value::Table(t) => {
            let ptr = t.to_pointer() as usize;
            if !seen.insert(ptr) {
                return Json::String("<cycle>".into());
            }
            if depth >= MAX_DEPTH {
                seen.remove(&ptr);
                return Json::String(format!("<table: {} entries>", t.raw_len()));
            }
            let len = t.raw_len();
            let mut out = if len > 0 {
                let mut arr = Vec::new();
                for i in 1..=len.min(MAX_ENTRIES) {
                    let item: Value = t.raw_get(i).unwrap_or(Value::Nil);
                    arr.push(serialize(&item, depth + 1, seen, budget));
                }
                if len > MAX_ENTRIES {
                    arr.push(Json::String(format!("… {} more", len - MAX_ENTRIES)));
                }
                Json::Array(arr)
            } else {
                let mut obj = Map::new();
                for (n, pair) in t.clone().pairs::<Value, Value>().enumerate() {
                    let Ok((k, val)) = pair else { break };
                    if n >= MAX_ENTRIES {
                        obj.insert("…".into(), Json::String("more entries".into()));
                        break;
                    }
                    let key = match &k {
                        Value::String(s) => s.to_string_lossy().to_string(),
                        Value::Integer(i) => i.to_string(),
                        Value::Number(n) => n.to_string(),
                        Value::Boolean(b) => b.to_string(),
                        other => format!("<{}>", other.type_name()),
                    };
                    obj.insert(key, serialize(&val, depth + 1, seen, budget));
                }
                Json::Object(obj)
            };
            seen.remove(&ptr);
            if let Json::Object(o) = &mut out {
                if o.is_empty() && len == 0 {
                    return Json::Object(Map::new());
                }
            }
            out
        }
        Value::Function(_) => Json::String("<function>".into()),
        Value::Thread(_) => Json::String("<thread>".into()),
        Value::UserData(_) | Value::LightUserData(_) => Json::String("<userdata>".into()),
        Value::Error(e) => Json::String(format!("<error: {e}>")),
        other => Json::String(format!("<{}>", other.type_name())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `serialize` of the value a Lua expression evaluates to, with a fresh budget.
    fn ser(lua: &Lua, expr: &str) -> Json {
        let v: Value = lua.load(format!("return {expr}")).eval().unwrap();
        serialize(&v, 0, &mut HashSet::new(), &mut 500)
    }

    #[test]
    fn scalars_serialise_as_json() {
        let lua = Lua::new();
        assert_eq!(ser(&lua, "nil"), Json::Null);
        assert_eq!(ser(&lua, "true"), json!(true));
        assert_eq!(ser(&lua, "42"), json!(42));
        assert_eq!(ser(&lua, "1.5"), json!(1.5));
        assert_eq!(ser(&lua, "0/0").as_str().map(|s| s.to_lowercase().contains("nan")), Some(true));
        assert_eq!(ser(&lua, "'héllo'"), json!("héllo"));
        assert_eq!(ser(&lua, "function() end"), json!("<function>"));
        assert_eq!(ser(&lua, "coroutine.create(function() end)"), json!("<thread>"));
    }

    #[test]
    fn long_strings_are_cut_with_their_size() {
        let lua = Lua::new();
        let s = ser(&lua, "string.rep('a', 300)");
        let s = s.as_str().unwrap();
        assert!(s.starts_with(&"a".repeat(MAX_STRING)), "{s}");
        assert!(s.ends_with("… (300 bytes)"), "{s}");
        assert_eq!(ser(&lua, "string.rep('a', 256)"), json!("a".repeat(256)));
        // A megabyte is never copied whole, and the size is still reported.
        let s = ser(&lua, "string.rep('é', 500000)");
        assert!(s.as_str().unwrap().ends_with("… (1000000 bytes)"), "{s}");
    }

    #[test]
    fn tables_arrays_cycles_depth_and_entries() {
        let lua = Lua::new();
        assert_eq!(ser(&lua, "{1, 'two', {3}}"), json!([1, "two", [3]]));
        assert_eq!(ser(&lua, "{a = 1, b = {c = true}}"), json!({"a": 1, "b": {"c": true}}));
        assert_eq!(ser(&lua, "{}"), json!({}));
        assert_eq!(ser(&lua, "{[2] = 'x', [true] = 1}"), json!({"2": "x", "true": 1}));
        let cyc = ser(&lua, "(function() local t = {} t.self = t return t end)()");
        assert_eq!(cyc, json!({"self": "<cycle>"}));
        // The same table twice side by side is not a cycle.
        let twice = ser(&lua, "(function() local s = {1} return {s, s} end)()");
        assert_eq!(twice, json!([[1], [1]]));
        let deep = ser(&lua, "{{{{1, 2}}}}");
        assert_eq!(deep, json!([[["<table: 2 entries>"]]]));
        let many = ser(&lua, "(function() local t = {} for i = 1, 60 do t[i] = i end return t end)()");
        let a = many.as_array().unwrap();
        assert_eq!(a.len(), MAX_ENTRIES + 1);
        assert_eq!(a[MAX_ENTRIES], json!("… 10 more"));
        let wide = ser(&lua, "(function() local t = {} for i = 1, 60 do t['k' .. i] = i end return t end)()");
        let o = wide.as_object().unwrap();
        assert_eq!(o.len(), MAX_ENTRIES + 1);
        assert_eq!(o["…"], json!("more entries"));
    }

    #[test]
    fn the_budget_bounds_a_whole_snapshot() {
        let lua = Lua::new();
        let v: Value = lua.load("return {1, 2, 3, 4, 5}").eval().unwrap();
        let mut budget = 3;
        let j = serialize(&v, 0, &mut HashSet::new(), &mut budget);
        assert_eq!(budget, 0);
        assert_eq!(j, json!([1, 2, "…", "…", "…"]));
        assert_eq!(serialize(&Value::Integer(1), 0, &mut HashSet::new(), &mut 0), json!("…"));
    }

    #[test]
    fn checkpoints_are_steps_until_a_limit_truncates() {
        let mut t = Tracer::new(2, usize::MAX);
        t.checkpoint(3, "x".into(), json!(1));
        t.checkpoint(4, "y".into(), json!({"a": [1, 2]}));
        assert!(!t.truncated);
        t.checkpoint(5, "z".into(), json!(3));
        assert!(t.truncated);
        let (steps, truncated) = t.finish();
        assert!(truncated);
        assert_eq!(steps.len(), 2);
        assert_eq!((steps[0].step, steps[0].line), (0, 3));
        assert_eq!(steps[1].function, "checkpoint");
        assert_eq!(steps[1].locals["y"], json!({"a": [1, 2]}));
        assert!(steps[1].after);

        // The byte cap: once the recorded steps reach it, the next is refused.
        let mut t = Tracer::new(100, 1);
        t.checkpoint(1, "x".into(), json!(1));
        t.checkpoint(2, "y".into(), json!(2));
        let (steps, truncated) = t.finish();
        assert_eq!(steps.len(), 1);
        assert!(truncated);
    }

    #[test]
    fn step_size_grows_with_names_and_values() {
        let step = |locals: Json| Step {
            step: 0,
            line: 1,
            depth: 0,
            function: "f".into(),
            source: "src".into(),
            locals: locals.as_object().unwrap().clone(),
            upvalues: Map::new(),
            after: true,
        };
        let empty = step_size(&step(json!({})));
        assert_eq!(empty, 48 + 1 + 3);
        // "ab" (2) + 3 + "xyz" as a string (3 + 2)
        assert_eq!(step_size(&step(json!({"ab": "xyz"}))), empty + 10);
        assert_eq!(step_size(&step(json!({"n": 1}))), empty + 1 + 3 + 8);
        assert_eq!(step_size(&step(json!({"a": [1, "x"]}))), empty + 1 + 3 + 2 + 8 + 3);
        assert_eq!(step_size(&step(json!({"o": {"k": null}}))), empty + 1 + 3 + 2 + 1 + 3 + 8);
    }
}
