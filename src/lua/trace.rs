//! The deep trace: every executed line of a traced invocation with the values of the
//! function's locals and upvalues *after* the line ran.
//!
//! A line hook fires before a line runs, so the state it sees is the state after the previous
//! line of the same frame: each step stays pending until the next line (or the return) of its
//! frame completes it. Values are serialised safely: depth, entry and length limits, cycles
//! marked, functions/userdata/threads shown by type, raw access only (no metamethod runs).
//!
//! The per-line cost is kept low (issue 18):
//! - the hook is a plain C function ([`trace_hook`]) installed with `lua_sethook`; it reads
//!   locals and upvalues through the C API (`lua_getlocal`, `lua_getupvalue`, `lua_next`,
//!   `lua_rawgeti`) instead of calling Lua's `debug` library, and hands the rare slow cases
//!   (a limit check every [`HOOK_EVERY`] instructions, the watchdog's alarm) to the sandbox's
//!   mlua hook, which raises the limit error;
//! - **deltas**: each frame keeps a fingerprint of every local and upvalue as last recorded.
//!   A value is serialised again only when its fingerprint changed. The fingerprint is exact
//!   for nil, booleans and numbers, and a 64-bit hash of exactly what would be recorded for
//!   strings (length and the recorded prefix) and tables (the same bounded walk the
//!   serialiser does: depth, entries, the step's value budget). So a value is re-recorded
//!   whenever its recorded form changes, barring a 64-bit hash collision; an unchanged table
//!   costs one bounded walk without building JSON, and no copy;
//! - a step's values are shared snapshots ([`Snap`], reference counted): a step whose frame
//!   changed nothing shares the previous step's snapshot; JSON text is produced only when
//!   the trace is saved (once per distinct snapshot), off the hook;
//! - function names and sources are read once per frame, the stack depth from the previous
//!   line's depth in O(1) probes in the common cases.
//!
//! What a trace keeps is configurable (`[traces] mode`): `full` (the default) records lines
//! from the start until `lua_max_trace_steps` or `[traces] max_bytes` is reached; `ends` keeps
//! the first `head_steps` and the last `tail_steps` steps (each within half of `max_bytes`),
//! so the lines before an error at the end of a long run are kept; the step numbers show the
//! gap.
//!
//! **Hot-line sampling** (`full` mode, `[traces] sample_after` = K): each source line's first
//! K visits are recorded, then only its K + 2^j-th; every visit is counted. Step numbers count
//! every line event, a recorded step carries `skipped` (visits of its line not recorded since
//! the previous recorded one) and [`Tracer::sampling`] summarises the lines sampled. A visit
//! not recorded costs the hook call and a counter: the **fast path** of [`Tracer::on_line`]
//! recognises the frame of the previous line event by its thread and `CallInfo` (a return
//! event in between clears it), so it reads no value, no depth and no function. A run that
//! fails on a skipped visit still records it: mlua's message handler returns while the failing
//! frames are on the stack, and the return hook reads them there ([`error_handler`]).

use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::ffi::{CStr, c_char, c_int, c_void};
use std::rc::Rc;
use std::sync::Arc;

use mlua::{Value, ffi};
use serde::{Serialize, Serializer};
use serde_json::{Map, Value as Json};

use super::limits::{TraceLimits, TraceMode};
use super::sandbox::{HOOK_EVERY, Meter};

/// Approximate bytes of one JSON value once stored.
fn json_size(v: &Json) -> usize {
    match v {
        Json::String(s) => s.len() + 2,
        Json::Array(a) => 2 + a.iter().map(json_size).sum::<usize>(),
        Json::Object(o) => 2 + o.iter().map(|(k, v)| k.len() + 3 + json_size(v)).sum::<usize>(),
        _ => 8,
    }
}

/// Named values of one frame at one step (locals or upvalues), in declaration order; shared
/// between the steps that saw them unchanged.
#[derive(Debug, Default, PartialEq)]
pub struct Snap {
    entries: Vec<(Arc<str>, Arc<Json>)>,
    /// Approximate stored bytes (see [`step_size`]).
    size: usize,
    /// Two entries share a name (a shadowed local): the later one wins, as in a JSON object.
    dup: bool,
}

impl Snap {
    pub fn from_map(m: Map<String, Json>) -> Arc<Snap> {
        let entries: Vec<(Arc<str>, Arc<Json>)> =
            m.into_iter().map(|(k, v)| (Arc::from(k.as_str()), Arc::new(v))).collect();
        let size = entries.iter().map(|(k, v)| k.len() + 3 + json_size(v)).sum();
        Arc::new(Snap::new(entries, size))
    }

    fn of_slots(slots: &[Slot]) -> Snap {
        Snap::new(
            slots.iter().map(|s| (Arc::clone(&s.name), Arc::clone(&s.value))).collect(),
            slots.iter().map(|s| s.size).sum(),
        )
    }

    fn new(entries: Vec<(Arc<str>, Arc<Json>)>, size: usize) -> Snap {
        let mut dup = false;
        for (i, (k, _)) in entries.iter().enumerate() {
            if entries[..i].iter().any(|(n, _)| n == k) {
                dup = true;
                break;
            }
        }
        Snap { entries, size, dup }
    }

    /// The value of `name` (the last binding of that name).
    pub fn get(&self, name: &str) -> Option<&Json> {
        self.entries.iter().rev().find(|(k, _)| &**k == name).map(|(_, v)| &**v)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// As a JSON object (what is stored and served).
    pub fn to_map(&self) -> Map<String, Json> {
        let mut m = Map::new();
        for (k, v) in &self.entries {
            m.insert(k.to_string(), (**v).clone());
        }
        m
    }

    pub fn to_json(&self) -> Json {
        Json::Object(self.to_map())
    }
}

impl Serialize for Snap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        if self.dup {
            return self.to_map().serialize(s);
        }
        let mut m = s.serialize_map(Some(self.entries.len()))?;
        for (k, v) in &self.entries {
            m.serialize_entry(&**k, &**v)?;
        }
        m.end()
    }
}

/// Approximate bytes one step takes once stored.
pub fn step_size(s: &Step) -> usize {
    48 + s.function.len() + s.source.len() + s.locals.size + s.upvalues.size
}

/// Limits of one serialised snapshot.
const MAX_DEPTH: usize = 3;
const MAX_ENTRIES: usize = 50;
const MAX_STRING: usize = 256;
/// Values serialised per step (locals and upvalues together).
const STEP_BUDGET: usize = 500;
const MAX_LOCALS: c_int = 200;
const MAX_UPVALUES: c_int = 60;

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// The line event's number in the run (every visit of a line counts, recorded or not: a
    /// gap in the numbers is visits not recorded).
    pub step: u64,
    pub line: i32,
    pub depth: u32,
    #[serde(serialize_with = "ser_str")]
    pub function: Arc<str>,
    #[serde(serialize_with = "ser_str")]
    pub source: Arc<str>,
    #[serde(serialize_with = "ser_snap")]
    pub locals: Arc<Snap>,
    #[serde(serialize_with = "ser_snap")]
    pub upvalues: Arc<Snap>,
    /// The values were read after the line ran (false: before, when the frame ended by error).
    pub after: bool,
    /// Visits of this line (same source and line) not recorded since its previous recorded
    /// visit (hot-line sampling); omitted when 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub skipped: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn ser_str<S: Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v)
}

fn ser_snap<S: Serializer>(v: &Arc<Snap>, s: S) -> Result<S::Ok, S::Error> {
    (**v).serialize(s)
}

/// One recorded local or upvalue of a frame: what is compared at the next line.
struct Slot {
    /// The name as Lua holds it (names of a function's locals are stable strings of its
    /// prototype; compared by address, then by content).
    name_ptr: *const c_char,
    name: Arc<str>,
    fp: u64,
    /// Values of the step budget the recorded form took.
    cost: usize,
    value: Arc<Json>,
    /// Stored bytes of the entry (name and value).
    size: usize,
}

/// A traced frame: the function running at one stack depth.
struct Frame {
    l: *mut ffi::lua_State,
    func: *const c_void,
    function: Arc<str>,
    source: Arc<str>,
    /// The engine's own Lua modules (the `prop` library) are not the user's code.
    skip: bool,
    /// Index of the frame's source in [`Tracer::sources`] (its lines' visit counts).
    src: usize,
    /// The frame's last line visit was not recorded (sampling): its step number and line. If
    /// the run fails right there, the error handler records it.
    skip_visit: Option<(u64, i32)>,
    locals: Vec<Slot>,
    upvalues: Vec<Slot>,
    snap_locals: Arc<Snap>,
    snap_upvalues: Arc<Snap>,
    /// The step of this frame's current line, completed by its next line or its return.
    pending: Option<Step>,
}

/// Visit counts of one source's lines (hot-line sampling), indexed by line number.
struct LineCounts {
    source: Arc<str>,
    lines: Vec<LineCount>,
}

/// The visit counts of one line, side by side (a hot line's visit touches one cache line).
#[derive(Clone, Copy, Default)]
struct LineCount {
    /// Every visit of the line (recorded or not).
    visits: u32,
    /// Visits not recorded since the line's last recorded visit.
    unrecorded: u32,
    /// Visits not recorded in all.
    skipped: u32,
}

/// A line first met past the end of its source's counts (rare: once per new line).
#[cold]
#[inline(never)]
fn grow(lines: &mut Vec<LineCount>, len: usize) {
    lines.resize(len, LineCount::default());
}

/// Count a visit of `line` of source `src` (`k`: [`Tracer::sample_after`]); is it to be
/// recorded? A free function over the two fields it needs, so the hook's fast path can call
/// it while it holds the frame.
#[inline(always)]
fn visit(sources: &mut [LineCounts], skipped: &mut u64, k: u32, src: usize, line: i32) -> bool {
    let Some(c) = sources.get_mut(src) else { return true };
    let i = line.max(0) as usize;
    if i >= c.lines.len() {
        grow(&mut c.lines, i + 1);
    }
    let n = &mut c.lines[i];
    let v = n.visits.saturating_add(1);
    n.visits = v;
    if k == 0 || sampled(v, k) {
        return true;
    }
    n.unrecorded = n.unrecorded.saturating_add(1);
    n.skipped = n.skipped.saturating_add(1);
    *skipped += 1;
    false
}

/// What hot-line sampling left out of a trace (stored with it, served as `sampling`).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Sampling {
    /// Visits of a line recorded in full before sampling starts (`[traces] sample_after`).
    pub after: u32,
    /// Line visits not recorded, in all.
    pub skipped: u64,
    /// Lines with visits not recorded: `{source, line, visits, skipped}` (`skipped`: not
    /// recorded in all; the steps' own `skipped` say where), most visited first, at most
    /// [`MAX_SAMPLED_LINES`].
    pub lines: Vec<SampledLine>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SampledLine {
    pub source: String,
    pub line: i32,
    pub visits: u64,
    pub skipped: u64,
}

/// Lines listed in [`Sampling::lines`].
pub const MAX_SAMPLED_LINES: usize = 200;

/// Is visit `v` (1-based) of a line recorded when the first `k` are? The first `k`, then the
/// `k + 2^j`-th: exponentially sparser.
#[inline]
fn sampled(v: u32, k: u32) -> bool {
    v <= k || (v - k).is_power_of_two()
}

/// The `CallInfo` of a hook's activation record (the private field `i_ci`, last in
/// `lua_Debug`): it identifies the running frame (a stack level of one thread) cheaply.
#[inline]
unsafe fn ci_of(ar: *const ffi::lua_Debug) -> *const c_void {
    const OFF: usize = std::mem::size_of::<ffi::lua_Debug>() - std::mem::size_of::<*mut c_void>();
    unsafe { *((ar as *const u8).add(OFF) as *const *const c_void) }
}

pub struct Tracer {
    frames: Vec<Option<Frame>>,
    /// Frames with a pending step.
    pending: usize,
    /// Line events so far (the next step's number).
    seq: u64,
    /// Steps recorded so far (the caps count these).
    recorded: usize,
    /// Hot-line sampling: visits of a line recorded in full (0: every visit is recorded).
    sample_after: u32,
    sources: Vec<LineCounts>,
    skipped: u64,
    /// The frame of the last line event (thread and `CallInfo`), at `last_depth`; reset by
    /// every return event, so the next line event on the same `CallInfo` is the same call.
    last_l: *mut ffi::lua_State,
    last_ci: *const c_void,
    /// New steps are still recorded (false once the head is full and no tail is kept).
    recording: bool,
    pub truncated: bool,
    /// Steps kept from the start: at most `head_steps` and `head_bytes`.
    head: Vec<Step>,
    head_bytes: usize,
    head_steps: usize,
    head_max_bytes: usize,
    /// First step number not in the head (`u64::MAX`: the head is open).
    head_end: u64,
    /// The most recent steps once the head is full (`ends` mode).
    tail: VecDeque<Step>,
    tail_bytes: usize,
    tail_steps: usize,
    tail_max_bytes: usize,
    /// Depth of the last line seen (the next is most often the same, one deeper or one up).
    last_depth: u32,
    empty: Arc<Snap>,
}

impl Tracer {
    /// A `full` trace: steps from the start, at most `max_steps` and `max_bytes`.
    pub fn new(max_steps: usize, max_bytes: usize) -> Self {
        Self::build(max_steps, max_bytes, 0, 0)
    }

    /// A trace as `[traces]` says (`mode`, `head_steps`, `tail_steps`, `max_bytes`).
    pub fn with_limits(max_steps: usize, limits: &TraceLimits) -> Self {
        let max_bytes = limits.max_bytes as usize;
        match limits.mode {
            TraceMode::Full => Self::new(max_steps, max_bytes).sample_after(limits.sample_after),
            // `ends` is for the lines before a late error: every visit is recorded (no
            // sampling), so the tail is the very last steps.
            TraceMode::Ends => Self::build(
                limits.head_steps.min(max_steps),
                max_bytes / 2,
                limits.tail_steps.min(max_steps),
                max_bytes / 2,
            ),
        }
    }

    fn build(head_steps: usize, head_bytes: usize, tail_steps: usize, tail_bytes: usize) -> Self {
        Tracer {
            frames: Vec::new(),
            pending: 0,
            seq: 0,
            recording: true,
            truncated: false,
            head: Vec::new(),
            head_bytes: 0,
            head_steps,
            head_max_bytes: head_bytes,
            head_end: u64::MAX,
            tail: VecDeque::new(),
            tail_bytes: 0,
            tail_steps,
            tail_max_bytes: tail_bytes,
            last_depth: 0,
            empty: Arc::new(Snap::default()),
            recorded: 0,
            sample_after: 0,
            sources: Vec::new(),
            skipped: 0,
            last_l: std::ptr::null_mut(),
            last_ci: std::ptr::null(),
        }
    }

    /// Record only the first `k` visits of each line, then exponentially fewer (the `k + 2^j`-th),
    /// counting every visit (0: record every visit).
    pub fn sample_after(mut self, k: u32) -> Self {
        self.sample_after = k;
        self
    }

    /// Count a visit of `line` of source `src`; is it to be recorded?
    fn visit(&mut self, src: usize, line: i32) -> bool {
        visit(&mut self.sources, &mut self.skipped, self.sample_after, src, line)
    }

    /// Unrecorded visits of `line` since its last recorded one (reset: this one is recorded).
    fn take_unrecorded(&mut self, src: usize, line: i32) -> u64 {
        self.sources
            .get_mut(src)
            .and_then(|c| c.lines.get_mut(line.max(0) as usize))
            .map_or(0, |n| std::mem::take(&mut n.unrecorded) as u64)
    }

    /// The index of `source`'s visit counts.
    fn source_index(&mut self, source: &Arc<str>) -> usize {
        if let Some(i) = self.sources.iter().position(|c| c.source == *source) {
            return i;
        }
        self.sources.push(LineCounts {
            source: Arc::clone(source),
            lines: Vec::new(),
        });
        self.sources.len() - 1
    }

    /// What sampling left out (`None` when nothing was).
    pub fn sampling(&self) -> Option<Sampling> {
        if self.skipped == 0 {
            return None;
        }
        let mut lines = Vec::new();
        for c in &self.sources {
            for (line, n) in c.lines.iter().enumerate() {
                if n.skipped > 0 {
                    lines.push(SampledLine {
                        source: c.source.to_string(),
                        line: line as i32,
                        visits: n.visits as u64,
                        skipped: n.skipped as u64,
                    });
                }
            }
        }
        lines.sort_by(|a, b| b.visits.cmp(&a.visits).then(a.line.cmp(&b.line)));
        lines.truncate(MAX_SAMPLED_LINES);
        Some(Sampling {
            after: self.sample_after,
            skipped: self.skipped,
            lines,
        })
    }

    /// May step `seq` be started? Closes the head when it is full.
    fn may_start(&mut self, seq: u64) -> bool {
        if self.head_end == u64::MAX
            && (self.recorded >= self.head_steps || self.head_bytes >= self.head_max_bytes)
        {
            self.head_end = seq;
            self.truncated = true;
            if self.tail_steps == 0 || self.tail_max_bytes == 0 {
                self.recording = false;
            }
        }
        self.recording
    }

    fn emit(&mut self, s: Step) {
        let size = step_size(&s);
        if s.step < self.head_end {
            self.head_bytes += size;
            self.head.push(s);
            return;
        }
        self.tail_bytes += size;
        self.tail.push_back(s);
        while self.tail.len() > self.tail_steps || self.tail_bytes > self.tail_max_bytes {
            let Some(old) = self.tail.pop_front() else { break };
            self.tail_bytes -= step_size(&old);
            self.truncated = true;
        }
    }

    /// A pending step that never completed keeps the values from before its line.
    fn settle_frame(&mut self, f: Frame) {
        if let Some(s) = f.pending {
            self.pending -= 1;
            self.emit(s);
        }
    }

    fn flush_deeper(&mut self, depth: u32) {
        while self.frames.len() > depth as usize + 1 {
            if let Some(Some(f)) = self.frames.pop() {
                self.settle_frame(f);
            }
        }
    }

    /// Frames on `l`'s stack, probing around the last depth seen first.
    unsafe fn depth(&mut self, l: *mut ffi::lua_State) -> u32 {
        let has = |d: u32| -> bool {
            let mut ar: ffi::lua_Debug = unsafe { std::mem::zeroed() };
            unsafe { ffi::lua_getstack(l, d as c_int, &mut ar) != 0 }
        };
        // depth == d  <=>  has(d - 1) && !has(d)
        let last = self.last_depth;
        let d = if last >= 1 && has(last - 1) {
            if !has(last) {
                last
            } else if !has(last + 1) {
                last + 1
            } else {
                let mut lo = last + 1; // has(lo)
                let mut hi = (last + 1) * 2;
                while has(hi) {
                    lo = hi;
                    hi *= 2;
                }
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
        } else if last >= 2 && has(last - 2) {
            last - 1
        } else if !has(0) {
            0
        } else {
            let mut hi = 1;
            while has(hi) {
                hi *= 2;
            }
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
        };
        self.last_depth = d;
        d
    }

    /// Compare the locals and upvalues of the hooked frame (function at stack index `fidx`)
    /// with what `f` recorded last; serialise the changed ones. Returns the snapshots.
    unsafe fn capture(
        f: &mut Frame,
        l: *mut ffi::lua_State,
        ar: *mut ffi::lua_Debug,
        fidx: c_int,
    ) -> (Arc<Snap>, Arc<Snap>) {
        let mut budget = STEP_BUDGET;
        let mut changed = false;
        let mut k = 0usize;
        for i in 1..=MAX_LOCALS {
            let name = unsafe { ffi::lua_getlocal(l, ar, i) };
            if name.is_null() {
                break;
            }
            // SAFETY: the value lua_getlocal pushed is at the top.
            if unsafe { *name } != b'(' as c_char {
                changed |= unsafe { update_slot(&mut f.locals, k, name, l, &mut budget) };
                k += 1;
            }
            unsafe { ffi::lua_settop(l, -2) };
        }
        if f.locals.len() != k {
            f.locals.truncate(k);
            changed = true;
        }
        if changed {
            f.snap_locals = Arc::new(Snap::of_slots(&f.locals));
        }
        let mut changed = false;
        let mut k = 0usize;
        for i in 1..=MAX_UPVALUES {
            let name = unsafe { ffi::lua_getupvalue(l, fidx, i) };
            if name.is_null() {
                break;
            }
            let skip = unsafe { *name == 0 || CStr::from_ptr(name).to_bytes() == b"_ENV" };
            if !skip {
                changed |= unsafe { update_slot(&mut f.upvalues, k, name, l, &mut budget) };
                k += 1;
            }
            unsafe { ffi::lua_settop(l, -2) };
        }
        if f.upvalues.len() != k {
            f.upvalues.truncate(k);
            changed = true;
        }
        if changed {
            f.snap_upvalues = Arc::new(Snap::of_slots(&f.upvalues));
        }
        (Arc::clone(&f.snap_locals), Arc::clone(&f.snap_upvalues))
    }

    /// The frame at `depth` running `func` on `l` (a new one if another ran there).
    unsafe fn frame_at(
        &mut self,
        l: *mut ffi::lua_State,
        ar: *mut ffi::lua_Debug,
        depth: u32,
        func: *const c_void,
    ) {
        let d = depth as usize;
        if self.frames.len() <= d {
            self.frames.resize_with(d + 1, || None);
        }
        if matches!(&self.frames[d], Some(f) if f.l == l && f.func == func) {
            return;
        }
        // Another function at this depth: the previous one ended (by error, or on another
        // coroutine); its pending step keeps its values from before.
        if let Some(old) = self.frames[d].take() {
            self.settle_frame(old);
        }
        let ok = unsafe { ffi::lua_getinfo(l, c"Sn".as_ptr(), ar) } != 0;
        let (function, source, skip) = if ok {
            let a = unsafe { &*ar };
            let source = unsafe { CStr::from_ptr(a.short_src.as_ptr()) }.to_string_lossy();
            let what = if a.what.is_null() {
                ""
            } else {
                unsafe { CStr::from_ptr(a.what) }.to_str().unwrap_or("")
            };
            let function = if !a.name.is_null() {
                unsafe { CStr::from_ptr(a.name) }.to_string_lossy().into_owned()
            } else if what == "main" {
                "main chunk".into()
            } else {
                format!("function@{}", a.linedefined.max(0))
            };
            let skip = source == "prop";
            (function, source.into_owned(), skip)
        } else {
            ("?".to_string(), String::new(), false)
        };
        let source: Arc<str> = Arc::from(source);
        let src = self.source_index(&source);
        self.frames[d] = Some(Frame {
            l,
            func,
            function: Arc::from(function),
            source,
            skip,
            src,
            skip_visit: None,
            locals: Vec::new(),
            upvalues: Vec::new(),
            snap_locals: Arc::clone(&self.empty),
            snap_upvalues: Arc::clone(&self.empty),
            pending: None,
        });
    }

    /// A line event of the hooked frame. The fast path (a hot line's visit not recorded) is
    /// inlined into the hook; the rest is [`Tracer::on_line_slow`], out of line, so the fast
    /// path does not pay for the slow one's register saves.
    ///
    /// # Safety
    /// `l` and `ar` are the arguments of a line hook call.
    #[inline(always)]
    pub unsafe fn on_line(&mut self, l: *mut ffi::lua_State, ar: *mut ffi::lua_Debug) {
        if !self.recording && self.pending == 0 {
            return;
        }
        let line = unsafe { (*ar).currentline };
        let ci = unsafe { ci_of(ar) };
        // The fast path of a hot line: the same call as the last line event (same thread and
        // CallInfo, no return since), nothing pending in it, and this visit not sampled: count
        // it and return, without reading a value.
        let mut decided = false;
        if self.sample_after > 0 && ci == self.last_ci && l == self.last_l && !ci.is_null() {
            let d = self.last_depth as usize;
            if let Some(Some(f)) = self.frames.get_mut(d) {
                if f.skip {
                    return;
                }
                if f.pending.is_none() {
                    if !visit(&mut self.sources, &mut self.skipped, self.sample_after, f.src, line) {
                        f.skip_visit = Some((self.seq, line));
                        self.seq += 1;
                        return;
                    }
                    decided = true;
                }
            }
        }
        unsafe { self.on_line_slow(l, ar, line, ci, decided) }
    }

    /// [`Tracer::on_line`] past its fast path (`decided`: the visit was counted there and is
    /// recorded).
    ///
    /// # Safety
    /// As [`Tracer::on_line`].
    #[inline(never)]
    unsafe fn on_line_slow(
        &mut self,
        l: *mut ffi::lua_State,
        ar: *mut ffi::lua_Debug,
        line: i32,
        ci: *const c_void,
        decided: bool,
    ) {
        // Room for the function, a value and a bounded table walk (2 slots per level).
        if unsafe { ffi::lua_checkstack(l, 4 + 2 * MAX_DEPTH as c_int + 4) } == 0 {
            return;
        }
        let depth = unsafe { self.depth(l) };
        unsafe { ffi::lua_getinfo(l, c"f".as_ptr(), ar) };
        let fidx = unsafe { ffi::lua_gettop(l) };
        let func = unsafe { ffi::lua_topointer(l, fidx) };
        unsafe { self.frame_at(l, ar, depth, func) };
        self.last_l = l;
        self.last_ci = ci;
        let d = depth as usize;
        if self.frames[d].as_ref().is_some_and(|f| f.skip) {
            unsafe { ffi::lua_settop(l, fidx - 1) };
            return;
        }
        self.flush_deeper(depth);
        let Some(f) = self.frames[d].as_mut() else {
            unsafe { ffi::lua_settop(l, fidx - 1) };
            return;
        };
        let src = f.src;
        // Read the values only when a pending step needs them or this visit is recorded.
        let record = decided || {
            let has_pending = f.pending.is_some();
            let r = self.visit(src, line);
            if !r && !has_pending {
                unsafe { ffi::lua_settop(l, fidx - 1) };
                let seq = self.seq;
                if let Some(f) = self.frames[d].as_mut() {
                    f.skip_visit = Some((seq, line));
                }
                self.seq += 1;
                return;
            }
            r
        };
        let Some(f) = self.frames[d].as_mut() else {
            unsafe { ffi::lua_settop(l, fidx - 1) };
            return;
        };
        let (locals, upvalues) = unsafe { Self::capture(f, l, ar, fidx) };
        unsafe { ffi::lua_settop(l, fidx - 1) };
        let done = f.pending.take().map(|mut prev| {
            prev.locals = Arc::clone(&locals);
            prev.upvalues = Arc::clone(&upvalues);
            prev.after = true;
            prev
        });
        let (function, source) = (Arc::clone(&f.function), Arc::clone(&f.source));
        if let Some(prev) = done {
            self.pending -= 1;
            self.emit(prev);
        }
        let seq = self.seq;
        self.seq += 1;
        if let Some(f) = self.frames[d].as_mut() {
            f.skip_visit = (!record).then_some((seq, line));
        }
        if !record || !self.may_start(seq) {
            return;
        }
        let skipped = self.take_unrecorded(src, line);
        let step = Step {
            step: seq,
            line,
            depth,
            function,
            source,
            locals,
            upvalues,
            after: false,
            skipped,
        };
        self.recorded += 1;
        if let Some(f) = self.frames[d].as_mut() {
            f.pending = Some(step);
            self.pending += 1;
        }
    }

    /// A return event: completes the returning frame's pending step.
    ///
    /// # Safety
    /// `l` and `ar` are the arguments of a return hook call.
    pub unsafe fn on_return(&mut self, l: *mut ffi::lua_State, ar: *mut ffi::lua_Debug) {
        // A call ended (or a C function returned after catching an error or a yield): the
        // next line event may be another call on the same CallInfo.
        self.last_ci = std::ptr::null();
        if self.skipped > 0 {
            // The error handler returning while the failing frames are still on the stack:
            // visits that sampling did not record, where they failed, are recorded now.
            if unsafe { ffi::lua_checkstack(l, 4 + 2 * MAX_DEPTH as c_int + 4) } == 0 {
                return;
            }
            unsafe { ffi::lua_getinfo(l, c"f".as_ptr(), ar) };
            let fidx = unsafe { ffi::lua_gettop(l) };
            let is_handler = unsafe { ffi::lua_iscfunction(l, fidx) } != 0
                && error_handler().is_some_and(|h| {
                    unsafe { ffi::lua_tocfunction(l, fidx) }.map(|f| f as usize) == Some(h)
                });
            unsafe { ffi::lua_settop(l, fidx - 1) };
            if is_handler {
                unsafe { self.record_failing(l) };
            }
        }
        if self.pending == 0 {
            return;
        }
        if unsafe { ffi::lua_checkstack(l, 4 + 2 * MAX_DEPTH as c_int + 4) } == 0 {
            return;
        }
        unsafe { ffi::lua_getinfo(l, c"f".as_ptr(), ar) };
        let fidx = unsafe { ffi::lua_gettop(l) };
        // C functions have no lines, hence no pending step.
        if unsafe { ffi::lua_iscfunction(l, fidx) } != 0 {
            unsafe { ffi::lua_settop(l, fidx - 1) };
            return;
        }
        let func = unsafe { ffi::lua_topointer(l, fidx) };
        let depth = unsafe { self.depth(l) };
        self.flush_deeper(depth);
        let d = depth as usize;
        let mine = matches!(self.frames.get(d), Some(Some(f)) if f.l == l && f.func == func);
        if mine {
            if let Some(Some(mut f)) = self.frames.get_mut(d).map(Option::take) {
                if let Some(mut prev) = f.pending.take() {
                    let (locals, upvalues) = unsafe { Self::capture(&mut f, l, ar, fidx) };
                    prev.locals = locals;
                    prev.upvalues = upvalues;
                    prev.after = true;
                    self.pending -= 1;
                    self.emit(prev);
                }
            }
        }
        unsafe { ffi::lua_settop(l, fidx - 1) };
    }

    /// From the error handler (stack level 0): record the last visit of each failing frame
    /// (levels 1 to 8) that sampling did not record; the line failed (or called what failed),
    /// its values are those from before it ran.
    unsafe fn record_failing(&mut self, l: *mut ffi::lua_State) {
        let top = unsafe { self.depth(l) };
        let mut ar: ffi::lua_Debug = unsafe { std::mem::zeroed() };
        for level in 1..=8u32 {
            if level >= top || unsafe { ffi::lua_getstack(l, level as c_int, &mut ar) } == 0 {
                break;
            }
            // Frames are indexed by the number of levels below them and themselves.
            let d = (top - level) as usize;
            let Some(Some(f)) = self.frames.get(d) else { continue };
            let Some((seq, line)) = f.skip_visit else { continue };
            if f.l != l || f.pending.is_some() {
                continue;
            }
            unsafe { ffi::lua_getinfo(l, c"f".as_ptr(), &mut ar) };
            let fidx = unsafe { ffi::lua_gettop(l) };
            let func = unsafe { ffi::lua_topointer(l, fidx) };
            if f.func != func || !self.may_start(seq) {
                unsafe { ffi::lua_settop(l, fidx - 1) };
                continue;
            }
            let Some(Some(f)) = self.frames.get_mut(d) else {
                unsafe { ffi::lua_settop(l, fidx - 1) };
                continue;
            };
            f.skip_visit = None;
            let (locals, upvalues) = unsafe { Self::capture(f, l, &mut ar, fidx) };
            unsafe { ffi::lua_settop(l, fidx - 1) };
            let (function, source, src) = (Arc::clone(&f.function), Arc::clone(&f.source), f.src);
            // This visit is recorded after all: it leaves the counts of visits not recorded.
            let mut before = 0;
            if let Some(c) = self.sources.get_mut(src) {
                let i = line.max(0) as usize;
                if let Some(n) = c.lines.get_mut(i) {
                    n.skipped = n.skipped.saturating_sub(1);
                    before = n.unrecorded.saturating_sub(1) as u64;
                    n.unrecorded = 0;
                }
            }
            self.skipped = self.skipped.saturating_sub(1);
            self.recorded += 1;
            self.emit(Step {
                step: seq,
                line,
                depth: d as u32,
                function,
                source,
                locals,
                upvalues,
                after: false,
                skipped: before,
            });
        }
    }

    /// All steps in execution order.
    pub fn finish(mut self) -> (Vec<Step>, bool) {
        let frames: Vec<Frame> = self.frames.drain(..).flatten().collect();
        for f in frames {
            self.settle_frame(f);
        }
        let mut steps = std::mem::take(&mut self.head);
        steps.extend(self.tail.drain(..));
        steps.sort_by_key(|s| s.step);
        (steps, self.truncated)
    }

    /// Annotate the trace from the `debug` component (`debug.checkpoint(label, value)`).
    pub fn checkpoint(&mut self, line: i32, label: String, value: Json) {
        if !self.may_start(self.seq) {
            return;
        }
        let mut locals = Map::new();
        locals.insert(label, value);
        let s = Step {
            step: self.seq,
            line,
            depth: 0,
            function: Arc::from("checkpoint"),
            source: Arc::from(""),
            locals: Snap::from_map(locals),
            upvalues: Arc::clone(&self.empty),
            after: true,
            skipped: 0,
        };
        self.seq += 1;
        self.recorded += 1;
        self.emit(s);
    }
}

/// Compare the value at the top of `l`'s stack with slot `k` of `slots` (recorded under
/// `name`), re-serialising it when its fingerprint changed. Returns whether it changed.
unsafe fn update_slot(
    slots: &mut Vec<Slot>,
    k: usize,
    name: *const c_char,
    l: *mut ffi::lua_State,
    budget: &mut usize,
) -> bool {
    let before = *budget;
    let mut h = Fx::default();
    unsafe { walk(l, ffi::lua_gettop(l), 0, &mut Path::default(), budget, &mut h) };
    let cost = before - *budget;
    let fp = h.0;
    if let Some(s) = slots.get(k) {
        let same_name = s.name_ptr == name
            || unsafe { CStr::from_ptr(name) }.to_bytes() == s.name.as_bytes();
        if same_name && s.fp == fp && s.cost == cost {
            return false;
        }
    }
    let mut b = before;
    let value = unsafe { walk(l, ffi::lua_gettop(l), 0, &mut Path::default(), &mut b, &mut JsonSink) };
    let name_arc: Arc<str> = match slots.get(k) {
        Some(s) if unsafe { CStr::from_ptr(name) }.to_bytes() == s.name.as_bytes() => {
            Arc::clone(&s.name)
        }
        _ => Arc::from(unsafe { CStr::from_ptr(name) }.to_string_lossy().as_ref()),
    };
    let slot = Slot {
        name_ptr: name,
        size: name_arc.len() + 3 + json_size(&value),
        name: name_arc,
        fp,
        cost,
        value: Arc::new(value),
    };
    if k < slots.len() {
        slots[k] = slot;
    } else {
        slots.push(slot);
    }
    true
}

/// The message handler mlua runs when a call from Rust into Lua fails (its private
/// `error_traceback`), found once by watching which C function returns while a probe call
/// fails. It runs before the stack unwinds, so the failing frame can still be read. `None` if
/// the probe does not find exactly one (then a failing visit that sampling skipped is not
/// recorded: the trace's error and error line still say where it failed).
fn error_handler() -> Option<usize> {
    static HANDLER: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *HANDLER.get_or_init(|| {
        thread_local! {
            static SEEN: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
        }
        unsafe extern "C-unwind" fn probe(l: *mut ffi::lua_State, ar: *mut ffi::lua_Debug) {
            unsafe {
                if (*ar).event != ffi::LUA_HOOKRET || ffi::lua_checkstack(l, 2) == 0 {
                    return;
                }
                ffi::lua_getinfo(l, c"f".as_ptr(), ar);
                if ffi::lua_iscfunction(l, -1) != 0 {
                    if let Some(f) = ffi::lua_tocfunction(l, -1) {
                        SEEN.with(|s| s.borrow_mut().push(f as usize));
                    }
                }
                ffi::lua_settop(l, -2);
            }
        }
        let lua = mlua::Lua::new();
        let f = lua.load("local t = nil\nreturn t.x").into_function().ok()?;
        unsafe {
            lua.exec_raw::<()>((), |l| {
                ffi::lua_sethook(l, Some(probe), ffi::LUA_MASKRET, 0);
            })
            .ok()?;
        }
        SEEN.with(|s| s.borrow_mut().clear());
        let failed = f.call::<()>(()).is_err();
        let seen = SEEN.with(|s| std::mem::take(&mut *s.borrow_mut()));
        let mut uniq = seen.clone();
        uniq.sort_unstable();
        uniq.dedup();
        (failed && uniq.len() == 1).then(|| uniq[0])
    })
}

/// Per-state context of [`trace_hook`], pointed to by the state's extra space (coroutines
/// copy it from the main state when created).
pub struct HookCtx {
    pub meter: Rc<Meter>,
    pub tracer: Rc<RefCell<Tracer>>,
    /// The sandbox's mlua hook: limit checks and raising their errors.
    pub slow: Option<ffi::lua_Hook>,
}

/// Owns the [`HookCtx`] for as long as the Lua state lives (kept in its app data).
pub struct HookCtxBox(pub Box<HookCtx>);

/// Point `l`'s extra space (copied by coroutines created later) at `ctx`.
///
/// # Safety
/// `ctx` must outlive every call of [`trace_hook`] on `l` and its coroutines.
pub unsafe fn attach(l: *mut ffi::lua_State, ctx: *const HookCtx) {
    unsafe { *(ffi::lua_getextraspace(l) as *mut *const HookCtx) = ctx };
}

/// The traced run's hook: counts instructions (one by one for the first [`HOOK_EVERY`], then
/// [`HOOK_EVERY`] at a time: a count hook per instruction doubles a tight loop's time), records
/// lines and returns, and passes the checks (every [`HOOK_EVERY`] instructions, or when the
/// watchdog's alarm rang or a limit tripped) to the sandbox's mlua hook, which raises the
/// limit's error.
///
/// # Safety
/// Installed by the sandbox with `lua_sethook` on a state whose extra space was set by
/// [`attach`].
pub unsafe extern "C-unwind" fn trace_hook(l: *mut ffi::lua_State, ar: *mut ffi::lua_Debug) {
    let ctx = unsafe { *(ffi::lua_getextraspace(l) as *const *const HookCtx) };
    if ctx.is_null() {
        return;
    }
    // SAFETY: see `attach`.
    let ctx = unsafe { &*ctx };
    let m = &*ctx.meter;
    let limited = m.tripped.get().is_some() || m.alarm.fired().is_some();
    let slow = match unsafe { (*ar).event } {
        ffi::LUA_HOOKCOUNT => {
            // The hook runs every `count` instructions: 1 for the first HOOK_EVERY (a short
            // run's count is exact), then HOOK_EVERY (no call per instruction).
            let count = unsafe { ffi::lua_gethookcount(l) }.max(1) as u64;
            let n0 = m.instructions.get();
            let n = n0 + count;
            m.instructions.set(n);
            if count == 1 && n >= HOOK_EVERY as u64 && !limited {
                unsafe {
                    ffi::lua_sethook(l, Some(trace_hook), ffi::lua_gethookmask(l), HOOK_EVERY as c_int)
                };
            }
            limited || n / HOOK_EVERY as u64 != n0 / HOOK_EVERY as u64
        }
        ffi::LUA_HOOKLINE if limited => true,
        ffi::LUA_HOOKLINE => {
            if let Ok(mut t) = ctx.tracer.try_borrow_mut() {
                unsafe { t.on_line(l, ar) };
            }
            false
        }
        ffi::LUA_HOOKRET => {
            if let Ok(mut t) = ctx.tracer.try_borrow_mut() {
                unsafe { t.on_return(l, ar) };
            }
            false
        }
        _ => false,
    };
    // Nothing of this frame needs dropping past this point: the slow hook may raise (unwind
    // through this frame).
    if slow {
        if let Some(h) = ctx.slow {
            unsafe { h(l, ar) };
        }
    }
}

/// FxHash-style mixing: a bijection of each word for a given state.
#[derive(Default)]
struct Fx(u64);

impl Fx {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn bytes(&mut self, b: &[u8]) {
        let mut chunks = b.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().unwrap_or_default()));
        }
        let mut last = [0u8; 8];
        let rest = chunks.remainder();
        last[..rest.len()].copy_from_slice(rest);
        self.add(u64::from_le_bytes(last) ^ ((rest.len() as u64) << 56));
    }
}

/// The tables being walked (cycles are judged on the path, as the serialiser does).
#[derive(Default)]
struct Path {
    tables: [usize; MAX_DEPTH + 1],
    len: usize,
}

/// What a walk of a Lua value produces: its JSON, or its fingerprint.
trait Sink {
    type Out;
    type Key;
    fn null(&mut self) -> Self::Out;
    fn boolean(&mut self, b: bool) -> Self::Out;
    fn int(&mut self, i: i64) -> Self::Out;
    fn num(&mut self, n: f64) -> Self::Out;
    /// A string: its first bytes (at most `MAX_STRING * 4`) and its whole length.
    fn text(&mut self, head: &[u8], len: usize) -> Self::Out;
    fn mark(&mut self, s: &'static str) -> Self::Out;
    /// `<table: n entries>` (kind 0) or `… n more` (kind 1).
    fn counted(&mut self, kind: u8, n: u64) -> Self::Out;
    fn array(&mut self, items: Vec<Self::Out>) -> Self::Out;
    /// The key at `idx` (during `lua_next`: never converted in place).
    unsafe fn key(&mut self, l: *mut ffi::lua_State, idx: c_int) -> Self::Key;
    fn more_key(&mut self) -> Self::Key;
    fn object(&mut self, entries: Vec<(Self::Key, Self::Out)>) -> Self::Out;
}

/// A string of the serialised form: long ones cut with their size.
fn text_json(head: &[u8], len: usize) -> Json {
    let s = String::from_utf8_lossy(head);
    if len > MAX_STRING * 4 || s.chars().count() > MAX_STRING {
        Json::String(format!("{}… ({} bytes)", s.chars().take(MAX_STRING).collect::<String>(), len))
    } else {
        Json::String(s.into_owned())
    }
}

struct JsonSink;

impl Sink for JsonSink {
    type Out = Json;
    type Key = String;
    fn null(&mut self) -> Json {
        Json::Null
    }
    fn boolean(&mut self, b: bool) -> Json {
        Json::Bool(b)
    }
    fn int(&mut self, i: i64) -> Json {
        Json::from(i)
    }
    fn num(&mut self, n: f64) -> Json {
        serde_json::Number::from_f64(n)
            .map(Json::Number)
            .unwrap_or_else(|| Json::String(n.to_string()))
    }
    fn text(&mut self, head: &[u8], len: usize) -> Json {
        text_json(head, len)
    }
    fn mark(&mut self, s: &'static str) -> Json {
        Json::String(s.into())
    }
    fn counted(&mut self, kind: u8, n: u64) -> Json {
        Json::String(if kind == 0 { format!("<table: {n} entries>") } else { format!("… {n} more") })
    }
    fn array(&mut self, items: Vec<Json>) -> Json {
        Json::Array(items)
    }
    unsafe fn key(&mut self, l: *mut ffi::lua_State, idx: c_int) -> String {
        unsafe {
            match ffi::lua_type(l, idx) {
                ffi::LUA_TSTRING => String::from_utf8_lossy(lua_bytes(l, idx)).into_owned(),
                ffi::LUA_TNUMBER if ffi::lua_isinteger(l, idx) != 0 => {
                    ffi::lua_tointegerx(l, idx, std::ptr::null_mut()).to_string()
                }
                ffi::LUA_TNUMBER => ffi::lua_tonumberx(l, idx, std::ptr::null_mut()).to_string(),
                ffi::LUA_TBOOLEAN => (ffi::lua_toboolean(l, idx) != 0).to_string(),
                t => format!("<{}>", type_name(t)),
            }
        }
    }
    fn more_key(&mut self) -> String {
        "…".into()
    }
    fn object(&mut self, entries: Vec<(String, Json)>) -> Json {
        let mut m = Map::new();
        for (k, v) in entries {
            m.insert(k, v);
        }
        Json::Object(m)
    }
}

impl Sink for Fx {
    type Out = ();
    type Key = ();
    fn null(&mut self) {
        self.add(1);
    }
    fn boolean(&mut self, b: bool) {
        self.add(2);
        self.add(b as u64);
    }
    fn int(&mut self, i: i64) {
        self.add(3);
        self.add(i as u64);
    }
    fn num(&mut self, n: f64) {
        self.add(4);
        self.add(n.to_bits());
    }
    fn text(&mut self, head: &[u8], len: usize) {
        self.add(5);
        self.add(len as u64);
        self.bytes(head);
    }
    fn mark(&mut self, s: &'static str) {
        self.add(6);
        self.add(s.as_ptr() as u64);
    }
    fn counted(&mut self, kind: u8, n: u64) {
        self.add(7 + kind as u64);
        self.add(n);
    }
    fn array(&mut self, items: Vec<()>) {
        self.add(9);
        self.add(items.len() as u64);
    }
    unsafe fn key(&mut self, l: *mut ffi::lua_State, idx: c_int) {
        unsafe {
            match ffi::lua_type(l, idx) {
                ffi::LUA_TSTRING => {
                    self.add(10);
                    self.bytes(lua_bytes(l, idx));
                }
                ffi::LUA_TNUMBER if ffi::lua_isinteger(l, idx) != 0 => {
                    self.add(11);
                    self.add(ffi::lua_tointegerx(l, idx, std::ptr::null_mut()) as u64);
                }
                ffi::LUA_TNUMBER => {
                    self.add(12);
                    self.add(ffi::lua_tonumberx(l, idx, std::ptr::null_mut()).to_bits());
                }
                ffi::LUA_TBOOLEAN => {
                    self.add(13);
                    self.add(ffi::lua_toboolean(l, idx) as u64);
                }
                t => {
                    self.add(14);
                    self.add(t as u64);
                }
            }
        }
    }
    fn more_key(&mut self) {
        self.add(15);
    }
    fn object(&mut self, entries: Vec<((), ())>) {
        self.add(16);
        self.add(entries.len() as u64);
    }
}

/// The bytes of the string at `idx` (which must be a string: no conversion happens).
unsafe fn lua_bytes<'a>(l: *mut ffi::lua_State, idx: c_int) -> &'a [u8] {
    let mut len = 0usize;
    let p = unsafe { ffi::lua_tolstring(l, idx, &mut len) };
    if p.is_null() {
        return &[];
    }
    unsafe { std::slice::from_raw_parts(p as *const u8, len) }
}

fn type_name(t: c_int) -> &'static str {
    match t {
        ffi::LUA_TNIL => "nil",
        ffi::LUA_TBOOLEAN => "boolean",
        ffi::LUA_TLIGHTUSERDATA => "lightuserdata",
        ffi::LUA_TNUMBER => "number",
        ffi::LUA_TSTRING => "string",
        ffi::LUA_TTABLE => "table",
        ffi::LUA_TFUNCTION => "function",
        ffi::LUA_TUSERDATA => "userdata",
        ffi::LUA_TTHREAD => "thread",
        _ => "unknown",
    }
}

/// Walk the value at absolute stack index `idx` within the limits (the same walk as
/// [`serialize`]: depth, entries, budget, cycles on the path), raw access only.
unsafe fn walk<S: Sink>(
    l: *mut ffi::lua_State,
    idx: c_int,
    depth: usize,
    path: &mut Path,
    budget: &mut usize,
    sink: &mut S,
) -> S::Out {
    if *budget == 0 {
        return sink.mark("…");
    }
    *budget -= 1;
    unsafe {
        match ffi::lua_type(l, idx) {
            ffi::LUA_TNIL | ffi::LUA_TNONE => sink.null(),
            ffi::LUA_TBOOLEAN => sink.boolean(ffi::lua_toboolean(l, idx) != 0),
            ffi::LUA_TNUMBER if ffi::lua_isinteger(l, idx) != 0 => {
                sink.int(ffi::lua_tointegerx(l, idx, std::ptr::null_mut()))
            }
            ffi::LUA_TNUMBER => sink.num(ffi::lua_tonumberx(l, idx, std::ptr::null_mut())),
            ffi::LUA_TSTRING => {
                // Only a prefix is read: a local holding megabytes is not copied per line.
                let b = lua_bytes(l, idx);
                sink.text(&b[..b.len().min(MAX_STRING * 4)], b.len())
            }
            ffi::LUA_TTABLE => {
                let ptr = ffi::lua_topointer(l, idx) as usize;
                if path.tables[..path.len].contains(&ptr) {
                    return sink.mark("<cycle>");
                }
                let len = ffi::lua_rawlen(l, idx);
                if depth >= MAX_DEPTH || path.len >= path.tables.len() {
                    return sink.counted(0, len as u64);
                }
                path.tables[path.len] = ptr;
                path.len += 1;
                let out = if len > 0 {
                    let mut items = Vec::with_capacity(len.min(MAX_ENTRIES) + 1);
                    for i in 1..=len.min(MAX_ENTRIES) {
                        ffi::lua_rawgeti(l, idx, i as ffi::lua_Integer);
                        let top = ffi::lua_gettop(l);
                        items.push(walk(l, top, depth + 1, path, budget, sink));
                        ffi::lua_settop(l, top - 1);
                    }
                    if len > MAX_ENTRIES {
                        items.push(sink.counted(1, (len - MAX_ENTRIES) as u64));
                    }
                    sink.array(items)
                } else {
                    let mut entries = Vec::new();
                    ffi::lua_pushnil(l);
                    let mut n = 0usize;
                    while ffi::lua_next(l, idx) != 0 {
                        let top = ffi::lua_gettop(l);
                        if n >= MAX_ENTRIES {
                            let k = sink.more_key();
                            entries.push((k, sink.mark("more entries")));
                            ffi::lua_settop(l, top - 2);
                            break;
                        }
                        let k = sink.key(l, top - 1);
                        let v = walk(l, top, depth + 1, path, budget, sink);
                        entries.push((k, v));
                        ffi::lua_settop(l, top - 1);
                        n += 1;
                    }
                    sink.object(entries)
                };
                path.len -= 1;
                out
            }
            ffi::LUA_TFUNCTION => sink.mark("<function>"),
            ffi::LUA_TTHREAD => sink.mark("<thread>"),
            _ => sink.mark("<userdata>"),
        }
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
    use crate::lua::limits::TraceLimits;
    use mlua::Lua;
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
        assert_eq!(&*steps[1].function, "checkpoint");
        assert_eq!(steps[1].locals.get("y"), Some(&json!({"a": [1, 2]})));
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
            locals: Snap::from_map(locals.as_object().unwrap().clone()),
            upvalues: Arc::new(Snap::default()),
            after: true,
            skipped: 0,
        };
        let empty = step_size(&step(json!({})));
        assert_eq!(empty, 48 + 1 + 3);
        // "ab" (2) + 3 + "xyz" as a string (3 + 2)
        assert_eq!(step_size(&step(json!({"ab": "xyz"}))), empty + 10);
        assert_eq!(step_size(&step(json!({"n": 1}))), empty + 1 + 3 + 8);
        assert_eq!(step_size(&step(json!({"a": [1, "x"]}))), empty + 1 + 3 + 2 + 8 + 3);
        assert_eq!(step_size(&step(json!({"o": {"k": null}}))), empty + 1 + 3 + 2 + 1 + 3 + 8);
    }

    /// Run `code` traced in a sandbox state; the steps and whether the trace was truncated.
    fn traced(code: &str, tracer: Tracer) -> (mlua::Result<()>, Vec<Step>, bool) {
        use crate::lua::sandbox::{Limits, Meter, new_state};
        use std::time::{Duration, Instant};
        let tracer = Rc::new(RefCell::new(tracer));
        let limits = Limits {
            instructions: None,
            cpu: Duration::from_secs(30),
            memory: 64 << 20,
            deadline: Instant::now() + Duration::from_secs(30),
        };
        let meter = Rc::new(Meter::default());
        let (lua, _) = new_state(limits, meter, Some(Rc::clone(&tracer))).unwrap();
        let r = lua.load(code).set_name("=t").exec();
        drop(lua);
        let t = std::mem::replace(&mut *tracer.borrow_mut(), Tracer::new(0, 0));
        let (steps, truncated) = t.finish();
        (r, steps, truncated)
    }

    #[test]
    fn the_c_walk_serialises_as_serialize_does() {
        let lua = Lua::new();
        for expr in [
            "nil", "true", "42", "-0.5", "1e300", "0/0", "1/0", "'héllo'", "string.rep('a', 300)",
            "string.rep('é', 600)", "string.rep('x', 2000)", "'\\xff\\xfe'", "{1, 'two', {3}}",
            "{a = 1, b = {c = true}}", "{}", "{[2] = 'x', [true] = 1, [1.5] = 2}",
            "(function() local t = {} t.self = t return t end)()",
            "(function() local s = {1} return {s, s} end)()", "{{{{1, 2}}}}",
            "(function() local t = {} for i = 1, 60 do t[i] = i end return t end)()",
            "(function() local t = {} for i = 1, 60 do t['k' .. i] = {i, {i}} end return t end)()",
            "(function() local t = {} for i = 1, 400 do t[i] = {i, i} end return t end)()",
            "function() end", "coroutine.create(function() end)", "{[{}] = 1, [print] = 2}",
        ] {
            let v: Value = lua.load(format!("return {expr}")).eval().unwrap();
            let want = serialize(&v, 0, &mut HashSet::new(), &mut 500);
            let mut got = Json::Null;
            let mut cost = 0;
            unsafe {
                lua.exec_raw::<()>(v, |l| {
                    let mut b = 500;
                    got = walk(l, ffi::lua_gettop(l), 0, &mut Path::default(), &mut b, &mut JsonSink);
                    cost = 500 - b;
                })
                .unwrap();
            }
            assert_eq!(got, want, "{expr}");
            assert!(cost >= 1 && cost <= 500, "{expr}: {cost}");
        }
    }

    #[test]
    fn a_change_is_recorded_at_its_line_and_unchanged_values_are_shared() {
        let code = "local t = {a = 1, list = {1, 2, 3}}\nlocal n = 0\nn = n + 1\nlocal s = 'x'\nt.a = 2\nn = n + 1\nreturn n";
        let (r, steps, truncated) = traced(code, Tracer::new(1000, 1 << 20));
        r.unwrap();
        assert!(!truncated);
        let main: Vec<&Step> = steps.iter().filter(|s| &*s.source == "t").collect();
        let at = |line: i32| *main.iter().find(|s| s.line == line).unwrap_or_else(|| panic!("line {line}: {main:?}"));
        // Values after each line ran.
        assert_eq!(at(1).locals.get("t"), Some(&json!({"a": 1, "list": [1, 2, 3]})));
        assert_eq!(at(2).locals.get("n"), Some(&json!(0)));
        assert_eq!(at(3).locals.get("n"), Some(&json!(1)));
        assert_eq!(at(5).locals.get("t"), Some(&json!({"a": 2, "list": [1, 2, 3]})));
        assert_eq!(at(6).locals.get("n"), Some(&json!(2)));
        assert_eq!(at(4).locals.get("s"), Some(&json!("x")));
        assert!(main.iter().all(|s| s.after));
        // The unchanged table is one recorded value from line 1 to line 4 (not serialised
        // again), readable at every step; line 5 changed it.
        let table = |line: i32| {
            let l = &at(line).locals;
            Arc::clone(&l.entries.iter().find(|(k, _)| &**k == "t").unwrap().1)
        };
        assert!(Arc::ptr_eq(&table(1), &table(2)));
        assert!(Arc::ptr_eq(&table(1), &table(4)));
        assert!(!Arc::ptr_eq(&table(4), &table(5)));
        assert!(Arc::ptr_eq(&table(5), &table(6)));
        // A line that changed nothing shares the whole snapshot of the line before... none
        // here; the stored form is a JSON object in declaration order.
        assert_eq!(
            serde_json::to_value(&*at(6).locals).unwrap(),
            json!({"t": {"a": 2, "list": [1, 2, 3]}, "n": 2, "s": "x"})
        );
    }

    #[test]
    fn a_table_changed_deep_inside_or_by_a_callee_is_recorded_again() {
        let code = "local t = {inner = {v = 1}}\nlocal function bump(x) x.inner.v = x.inner.v + 1 end\nbump(t)\nlocal same = 1\nreturn t";
        let (r, steps, _) = traced(code, Tracer::new(1000, 1 << 20));
        r.unwrap();
        let main: Vec<&Step> = steps.iter().filter(|s| s.function.as_ref() == "main chunk").collect();
        let at = |line: i32| main.iter().find(|s| s.line == line).unwrap();
        assert_eq!(at(2).locals.get("t"), Some(&json!({"inner": {"v": 1}})));
        assert_eq!(at(3).locals.get("t"), Some(&json!({"inner": {"v": 2}})));
        assert_eq!(at(4).locals.get("t"), Some(&json!({"inner": {"v": 2}})));
        // The callee's frame is its own, with its parameter.
        let callee = steps.iter().find(|s| &*s.function == "bump").unwrap();
        assert_eq!(callee.locals.get("x"), Some(&json!({"inner": {"v": 2}})));
    }

    #[test]
    fn tracing_runs_no_metamethod_and_bounds_hostile_tables() {
        let code = r#"
            local calls = 0
            local mt = {__index = function() calls = calls + 1 return 1 end,
                        __pairs = function() calls = calls + 1 error("pairs ran") end,
                        __len = function() calls = calls + 1 return 1e9 end,
                        __tostring = function() calls = calls + 1 return "x" end}
            local hostile = setmetatable({a = 1}, mt)
            local big = {}
            for i = 1, 3000 do big[i] = {i} end
            local cyc = {} cyc.me = cyc
            local deep = {{{{{{1}}}}}}
            assert(calls == 0, "a metamethod ran: " .. calls)
            result = calls
        "#;
        let (r, steps, _) = traced(code, Tracer::new(100_000, 64 << 20));
        r.unwrap();
        let last = steps.iter().rev().find(|s| s.locals.get("hostile").is_some()).unwrap();
        assert_eq!(last.locals.get("hostile"), Some(&json!({"a": 1})));
        assert_eq!(last.locals.get("cyc"), Some(&json!({"me": "<cycle>"})));
        assert_eq!(last.locals.get("deep"), Some(&json!([[["<table: 1 entries>"]]])));
        let big = last.locals.get("big").unwrap().as_array().unwrap();
        assert_eq!(big.len(), MAX_ENTRIES + 1);
        assert_eq!(big[MAX_ENTRIES], json!("… 2950 more"));
    }

    #[test]
    fn ends_mode_keeps_the_first_and_the_last_steps_before_an_error() {
        // Every visit recorded (`ends` does not sample hot lines): the tail holds the very
        // last steps.
        let limits = TraceLimits { mode: TraceMode::Ends, head_steps: 5, tail_steps: 8, ..TraceLimits::default() };
        let code = "local n = 0\nfor i = 1, 500 do\n  n = n + i\nend\nlocal boom = n\nerror('late failure')";
        let (r, steps, truncated) = traced(code, Tracer::with_limits(100_000, &limits));
        assert!(r.is_err());
        assert!(truncated);
        assert_eq!(steps.len(), 5 + 8, "{steps:?}");
        let nums: Vec<u64> = steps.iter().map(|s| s.step).collect();
        assert_eq!(&nums[..5], &[0, 1, 2, 3, 4]);
        assert!(nums[5] > 100, "a gap: {nums:?}");
        // The failing line is the last step of the chunk (the sandbox's `error` wrapper ran
        // after it), with the values from before it ran.
        let mine: Vec<&Step> = steps.iter().filter(|s| &*s.source == "t").collect();
        let last = mine.last().unwrap();
        assert_eq!(last.line, 6);
        assert!(!last.after);
        assert_eq!(last.locals.get("boom"), Some(&json!(125250)));
        assert_eq!(mine[mine.len() - 2].line, 5);
        // The full mode stops at its cap instead.
        let (_, steps, truncated) = traced(code, Tracer::new(5, 1 << 20));
        assert!(truncated);
        assert_eq!(steps.len(), 5);
        assert!(steps.iter().all(|s| s.line <= 3));
    }

    #[test]
    fn the_callinfo_offset_identifies_a_stack_level() {
        let lua = Lua::new();
        unsafe {
            lua.exec_raw::<()>((), |l| {
                let mut a: ffi::lua_Debug = std::mem::zeroed();
                let mut b: ffi::lua_Debug = std::mem::zeroed();
                // Level 0 is the C function exec_raw runs in; no level 1 above it here, so
                // compare level 0 read twice, and a fresh zeroed record.
                assert_eq!(ffi::lua_getstack(l, 0, &mut a), 1);
                assert_eq!(ffi::lua_getstack(l, 0, &mut b), 1);
                assert!(!ci_of(&a).is_null());
                assert_eq!(ci_of(&a), ci_of(&b));
                let z: ffi::lua_Debug = std::mem::zeroed();
                assert!(ci_of(&z).is_null());
            })
            .unwrap();
        }
        // Two levels of a Lua call stack have two CallInfos.
        let seen = std::rc::Rc::new(RefCell::new(Vec::new()));
        let s2 = std::rc::Rc::clone(&seen);
        let probe = lua
            .create_function(move |lua, ()| {
                unsafe {
                    lua.exec_raw::<()>((), |l| {
                        let mut ar: ffi::lua_Debug = std::mem::zeroed();
                        let mut v = Vec::new();
                        let mut level = 0;
                        while ffi::lua_getstack(l, level, &mut ar) != 0 {
                            v.push(ci_of(&ar) as usize);
                            level += 1;
                        }
                        s2.borrow_mut().push(v);
                    })?;
                }
                Ok(())
            })
            .unwrap();
        lua.globals().set("probe", probe).unwrap();
        lua.load("local function f() probe() end f() probe()").exec().unwrap();
        let seen = seen.borrow();
        let deep = &seen[0];
        assert!(deep.len() >= 3, "{deep:?}");
        let mut uniq = deep.clone();
        uniq.dedup();
        assert_eq!(uniq.len(), deep.len(), "{deep:?}");
        assert!(deep.iter().all(|&p| p != 0));
    }

    #[test]
    fn hot_lines_are_sampled_every_visit_counted() {
        let code = "local n = 0\nfor i = 1, 1000 do\n  local x = i\n  n = n + x\nend\nreturn n";
        let (r, steps, truncated) = traced(code, Tracer::new(100_000, 1 << 24).sample_after(10));
        r.unwrap();
        assert!(!truncated);
        let body: Vec<&Step> = steps.iter().filter(|s| &*s.source == "t" && s.line == 3).collect();
        // The first 10 visits, then the 10 + 2^j-th (j = 0..9: up to 522).
        assert_eq!(body.len(), 10 + 10, "{body:?}");
        assert!(body[..10].iter().all(|s| s.skipped == 0));
        // Each recorded visit says how many visits of the line were not recorded before it.
        let gaps: Vec<u64> = body[10..].iter().map(|s| s.skipped).collect();
        assert_eq!(gaps, vec![0, 0, 1, 3, 7, 15, 31, 63, 127, 255]);
        // Recorded values are exact: after line 3, x = i and n = 1 + ... + (i - 1).
        for s in &body {
            let i = s.locals.get("i").and_then(Json::as_i64).unwrap();
            assert_eq!(s.locals.get("x"), Some(&json!(i)), "{s:?}");
            assert_eq!(s.locals.get("n"), Some(&json!((i - 1) * i / 2)), "{s:?}");
            assert!(s.after);
        }
        // Step numbers count every line event: they grow, with gaps where visits were skipped.
        assert!(steps.windows(2).all(|w| w[0].step < w[1].step));
        assert!(body.last().unwrap().step > 1000);
    }

    #[test]
    fn the_sampling_summary_counts_every_visit() {
        use crate::lua::sandbox::{Limits, Meter, new_state};
        use std::time::{Duration, Instant};
        let tracer = Rc::new(RefCell::new(Tracer::new(100_000, 1 << 24).sample_after(10)));
        let limits = Limits {
            instructions: None,
            cpu: Duration::from_secs(30),
            memory: 64 << 20,
            deadline: Instant::now() + Duration::from_secs(30),
        };
        let (lua, _) = new_state(limits, Rc::new(Meter::default()), Some(Rc::clone(&tracer))).unwrap();
        lua.load("local n = 0\nfor i = 1, 1000 do\n  n = n + i\nend\nreturn n").set_name("=t").exec().unwrap();
        drop(lua);
        let t = std::mem::replace(&mut *tracer.borrow_mut(), Tracer::new(0, 0));
        let sampling = t.sampling().expect("visits were skipped");
        let (steps, _) = t.finish();
        assert_eq!(sampling.after, 10);
        let line3 = sampling.lines.iter().find(|l| l.source == "t" && l.line == 3).unwrap();
        assert_eq!(line3.visits, 1000);
        assert_eq!(line3.skipped, 1000 - 20);
        let recorded: u64 = steps.iter().filter(|s| &*s.source == "t" && s.line == 3).map(|s| 1 + s.skipped).sum();
        // Visits after the last recorded one are in the summary only.
        assert_eq!(recorded + (1000 - 522), 1000);
        assert_eq!(sampling.skipped, sampling.lines.iter().map(|l| l.skipped).sum::<u64>());
        // Without sampling nothing is skipped.
        let (r, steps, _) = traced("local n = 0\nfor i = 1, 100 do\n  n = n + i\nend", Tracer::new(100_000, 1 << 24));
        r.unwrap();
        assert_eq!(steps.iter().filter(|s| s.line == 3).count(), 100);
        assert!(steps.iter().all(|s| s.skipped == 0));
    }

    #[test]
    fn sampling_keeps_recursive_calls_and_coroutines_apart() {
        // Each call's local is its own: a recorded step of line 2 always shows x == d * 10.
        let code = "local function f(d)\n  local x = d * 10\n  if d > 0 then f(d - 1) end\n  return x\nend\nfor k = 1, 60 do f(12) end\nlocal co = coroutine.wrap(function()\n  for i = 1, 300 do\n    local y = i * 2\n    coroutine.yield(y)\n  end\nend)\nlocal total = 0\nfor j = 1, 300 do\n  total = total + co()\nend\nreturn total";
        let (r, steps, _) = traced(code, Tracer::new(100_000, 1 << 24).sample_after(3));
        r.unwrap();
        let mut seen = 0;
        for s in steps.iter().filter(|s| &*s.function == "f" && s.after) {
            if let (Some(d), Some(x)) = (s.locals.get("d"), s.locals.get("x")) {
                assert_eq!(x.as_i64().unwrap(), d.as_i64().unwrap() * 10, "{s:?}");
                seen += 1;
            }
        }
        assert!(seen > 10, "{seen}");
        for s in steps.iter().filter(|s| s.line == 9 && s.after) {
            let i = s.locals.get("i").and_then(Json::as_i64).unwrap();
            assert_eq!(s.locals.get("y"), Some(&json!(i * 2)), "{s:?}");
        }
        // After the loop line, before the body adds the j-th value.
        let mut n = 0;
        for s in steps.iter().filter(|s| s.line == 14 && s.after) {
            if let Some(j) = s.locals.get("j").and_then(Json::as_i64) {
                assert_eq!(s.locals.get("total"), Some(&json!((j - 1) * j)), "{s:?}");
                n += 1;
            }
        }
        assert!(n > 3, "{n}");
    }

    #[test]
    fn a_failing_visit_that_sampling_skipped_is_recorded_with_its_values() {
        assert!(error_handler().is_some(), "mlua's error handler found");
        // A runtime error on a hot line, and an error() call from a hot line in a callee.
        for (code, line, var) in [
            ("local t = {}\nfor i = 1, 500 do\n  local k = 1\n  if i > 450 then k = nil end\n  local z = k + i\n  t[1] = z\nend", 5, "i"),
            ("local function check(n)\n  if n > 300 then error('too big: ' .. n) end\n  return n\nend\nlocal s = 0\nfor i = 1, 1000 do\n  s = s + check(i)\nend", 2, "n"),
        ] {
            let (r, steps, _) = traced(code, Tracer::new(100_000, 1 << 24).sample_after(5));
            assert!(r.is_err());
            let fail = steps.iter().rev().find(|s| s.line == line && &*s.source == "t").unwrap();
            assert!(!fail.after, "{fail:?}");
            let v = fail.locals.get(var).and_then(Json::as_i64).unwrap();
            // The failing visit itself: the values from before the failing line ran.
            assert!(v == 451 || v == 301, "{fail:?}");
            assert!(fail.skipped > 0, "{fail:?}");
        }
    }

    #[test]
    fn coroutines_are_traced_with_their_own_frames() {
        let code = "local co = coroutine.wrap(function(a)\n  local b = a * 2\n  coroutine.yield(b)\n  local c = b + 1\n  return c\nend)\nlocal x = co(5)\nlocal y = co()\nreturn x + y";
        let (r, steps, _) = traced(code, Tracer::new(1000, 1 << 20));
        r.unwrap();
        let inner = |line: i32| steps.iter().find(|s| s.line == line && s.locals.get("a").is_some()).cloned();
        assert_eq!(inner(2).unwrap().locals.get("b"), Some(&json!(10)));
        assert_eq!(inner(4).unwrap().locals.get("c"), Some(&json!(11)));
        let main = steps.iter().rev().find(|s| s.locals.get("y").is_some()).unwrap();
        assert_eq!(main.locals.get("x"), Some(&json!(10)));
        assert_eq!(main.locals.get("y"), Some(&json!(11)));
    }

    #[test]
    fn instructions_are_counted_exactly_at_first_then_by_thousands() {
        use crate::lua::sandbox::{Limits, Meter, new_state};
        use std::time::{Duration, Instant};
        let run = |code: &str| {
            let limits = Limits {
                instructions: None,
                cpu: Duration::from_secs(30),
                memory: 64 << 20,
                deadline: Instant::now() + Duration::from_secs(30),
            };
            let meter = Rc::new(Meter::default());
            let tracer = Rc::new(RefCell::new(Tracer::new(10, 1 << 20)));
            let (lua, _) = new_state(limits, Rc::clone(&meter), Some(tracer)).unwrap();
            lua.load(code).exec().unwrap();
            meter.instructions.get()
        };
        let short = run("local s = 0 for i = 1, 20 do s = s + i end");
        assert!((40..200).contains(&short), "{short}");
        let long = run("local s = 0 for i = 1, 100000 do s = s + i end");
        assert!((200_000..=300_000).contains(&long), "{long}");
        // A limit still stops a traced run (the deadline, checked every HOOK_EVERY).
        let limits = Limits {
            instructions: None,
            cpu: Duration::from_secs(30),
            memory: 64 << 20,
            deadline: Instant::now() + Duration::from_millis(200),
        };
        let tracer = Rc::new(RefCell::new(Tracer::new(10, 1 << 20)));
        let (lua, _) = new_state(limits, Rc::new(Meter::default()), Some(tracer)).unwrap();
        let e = lua.load("while true do end").exec().unwrap_err();
        assert_eq!(crate::lua::sandbox::limit_of(&e), Some(crate::lua::sandbox::Limit::Time), "{e}");
    }
}
