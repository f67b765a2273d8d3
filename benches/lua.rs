//! Lua runtime benchmarks, each a ratio against a baseline measured in the same run:
//! 1. CPU-bound scripts (recursive fib, string building, table sort) in the ichibase sandbox
//!    (count hook, memory limit, wrapped globals) vs the stock `lua5.4` interpreter (Debian),
//!    both timed with `os.clock()` inside the script around the same work;
//! 2. the same scripts with deep tracing on vs off (smaller inputs: tracing records every line),
//!    and issue 18's two workloads, each a whole invocation (`invoke`: state, run, and for
//!    traced runs saving the trace) timed on the wall clock, traced vs untraced in the same run:
//!    a typical app function (~200 traced lines, 10 `db` inserts in a transaction) and a tight
//!    loop of 20k iterations (also timed with `os.clock()` inside the script); with the default
//!    hot-line sampling and with every visit recorded, and the time until the trace is stored
//!    (traces are saved in the background: the call returns before); traced runs also with a
//!    fresh state per run (`reuse_states = false`), the baseline of pooled traced runs;
//! 3. invocation overhead in process: an empty function in a fresh sandbox per run vs a pooled
//!    one (`[lua_limits] reuse_states`), with the cost of building a bare state alone;
//! 4. invocation overhead over HTTP: `POST /fn/empty` vs `GET /ping`, same client, same server
//!    (1, 4 and 32 connections), also against a server building a fresh state per run and one
//!    running every call on a blocking thread (`[lua_limits] inline_budget_us = 0`).
//!
//! `cargo bench --bench lua`; `BENCH_SECS` sets the seconds per HTTP measurement (default 3);
//! `BENCH_ONLY=trace` runs only the deep-trace tables, `BENCH_ONLY=stock` only the sandbox vs
//! stock `lua5.4` table, `BENCH_ONLY=overhead` only parts 3 and 4 (`BENCH_CONNS`, e.g. `32`,
//! limits part 4 to those connection counts); `BENCH_ROW=<prefix>` limits the whole-invocation
//! trace table to the workloads whose name starts with the prefix (e.g. `BENCH_ROW="tight loop
//! (20k"`).

use std::process::Command;
use std::time::{Duration, Instant};

use ichibase::config::Config;
use ichibase::core::RequestContext;
use ichibase::lua::{Invocation, LuaOptions, invoke};
use ichibase::storage::{Storage, StorageOptions};

#[path = "../tests/common/mod.rs"]
mod common;

/// (name, setup + work returning nothing, inputs for plain / traced runs)
const SCRIPTS: &[(&str, &str, u32, u32)] = &[
    (
        "fib (recursive)",
        "local function fib(n) if n < 2 then return n end return fib(n-1) + fib(n-2) end\nlocal function work(n) return fib(n) end",
        30,
        15,
    ),
    (
        "string building",
        "local function work(n) local t = {} for i = 1, n do t[#t+1] = tostring(i) .. ',' end local s = table.concat(t) return #s end",
        300000,
        2000,
    ),
    (
        "table sort",
        "local function work(n) local t = {} local x = 12345 for i = 1, n do x = (x * 1103515245 + 12345) % 2147483648 t[i] = x end table.sort(t) return t[1] end",
        200000,
        1500,
    ),
];

fn timed_source(body: &str, n: u32, as_function: bool) -> String {
    let run = format!("local c0 = os.clock() local r = work({n}) local dt = os.clock() - c0");
    if as_function {
        format!("{body}\nreturn function() {run} return {{seconds = dt, result = r}} end")
    } else {
        format!("{body}\n{run} print(string.format('%.6f', dt))")
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn sandbox_seconds(
    storage: &Storage,
    rt: &tokio::runtime::Runtime,
    body: &str,
    n: u32,
    trace: bool,
) -> f64 {
    sandbox_runs(storage, rt, body, n, trace, 5)
}

/// Median in-script seconds of `count` sandbox runs of `body`.
fn sandbox_runs(
    storage: &Storage,
    rt: &tokio::runtime::Runtime,
    body: &str,
    n: u32,
    trace: bool,
    count: usize,
) -> f64 {
    let mut runs = Vec::new();
    for _ in 0..count {
        let inv = Invocation {
            function: "bench".into(),
            version: 1,
            source: timed_source(body, n, true),
            input: serde_json::Value::Null,
            trace,
            check: None,
            trace_owner: None,
        };
        // The default configuration: no instruction budget, so no count hook (the watchdog
        // enforces the CPU and wall limits, generous here).
        let opts = LuaOptions {
            instruction_limit: 0,
            cpu_limit: Duration::from_secs(600),
            timeout: Duration::from_secs(600),
            max_trace_steps: 10_000_000,
            ..LuaOptions::default()
        };
        let out = invoke(
            &ichibase::lua::Runtime::bare(storage.clone(), rt.handle().clone(), opts),
            RequestContext::system(),
            inv,
        );
        // os.clock() is process CPU time: a trace still being saved in the background would
        // count against the next run.
        ichibase::lua::saver::flush(Duration::from_secs(120));
        let v = out
            .result
            .unwrap_or_else(|e| panic!("sandbox run failed: {e}"));
        runs.push(v["seconds"].as_f64().unwrap());
    }
    median(runs)
}

/// Issue 18's typical app function: validate the input, price 10 order lines, insert them in
/// one transaction, summarise (about 200 traced lines).
const APP_FN: &str = r#"
local TAX = 0.2
local function price_of(item)
  local base = item.qty * item.unit
  local discount = 0
  if item.qty >= 5 then
    discount = base * 0.1
  end
  return base - discount
end
return function(input)
  local order = {customer = input.customer, lines = {}, total = 0}
  if type(order.customer) ~= "string" then
    error("customer required")
  end
  db.tx(function()
    for i = 1, 10 do
      local item = {sku = "sku-" .. i, qty = i, unit = 2.5}
      local price = price_of(item)
      local tax = price * TAX
      order.total = order.total + price + tax
      db.exec("INSERT INTO order_lines (customer, sku, qty, price) VALUES ({c:String}, {s:String}, {q:Int64}, {p:Float64})",
        {c = order.customer, s = item.sku, q = item.qty, p = price + tax})
      order.lines[#order.lines + 1] = item.sku
    end
  end)
  local checked = 0
  for _, sku in ipairs(order.lines) do
    if sku:sub(1, 4) == "sku-" then
      checked = checked + 1
    end
  end
  local summary = string.format("%s: %d lines, %.2f", order.customer, checked, order.total)
  return {summary = summary, total = order.total}
end
"#;

/// Issue 18's tight loop: 20k iterations of arithmetic with a lookup table.
const LOOP_FN: &str = r#"
return function()
  local weights = {3, 1, 4, 1, 5, 9, 2, 6}
  local c0 = os.clock()
  local total, evens = 0, 0
  for i = 1, 20000 do
    local x = weights[i % 8 + 1] * i
    total = total + x
    if x % 2 == 0 then evens = evens + 1 end
  end
  return {seconds = os.clock() - c0, total = total, evens = evens}
end
"#;

/// What one row of the whole-invocation table measured (medians).
struct Measured {
    /// Wall seconds of the call (what the caller waits for).
    wall: f64,
    /// Wall seconds until the trace is stored too (the background saver drained).
    saved: f64,
    /// Seconds inside the script (if the function returns `seconds`).
    inside: Option<f64>,
    /// Steps of the last traced run, and line visits sampling left out.
    steps: usize,
    skipped: u64,
}

/// Whole invocations of `source` (`ends`: `[traces] mode = "ends"`; `sample_after`: the
/// `[traces] sample_after` of the run, `None`: the default), untraced, traced in a pooled state
/// and traced in a fresh state. The three **alternate call by call** (off, on, fresh, off, ...),
/// so a change of the machine's speed during the row (a shared VM's CPU drifts by 1.5x within
/// a minute) hits the baseline and the traced runs alike. After each call the bench waits for
/// the trace saver to drain, so a background save never overlaps the next call.
fn invocation_seconds(
    storage: &Storage,
    rt: &tokio::runtime::Runtime,
    source: &str,
    input: serde_json::Value,
    runs: usize,
    ends: bool,
    sample_after: Option<u32>,
) -> [Measured; 3] {
    let runtime = |reuse: bool| {
        let mut opts = LuaOptions {
            reuse_states: reuse,
            ..LuaOptions::default()
        };
        if ends {
            opts.traces.mode = ichibase::lua::limits::TraceMode::Ends;
        }
        if let Some(k) = sample_after {
            opts.traces.sample_after = k;
        }
        ichibase::lua::Runtime::bare(storage.clone(), rt.handle().clone(), opts)
    };
    // Off and on share the pooled states (same options), as untraced and traced calls of a
    // server do; "fresh" builds a state for every call.
    let variants = [(runtime(true), false), (runtime(true), true), (runtime(false), true)];
    ichibase::lua::pool::clear();
    let mut samples: [Vec<(f64, f64, Option<f64>)>; 3] = Default::default();
    let mut steps = 0;
    let mut skipped = 0;
    for i in 0..runs + 2 {
        for (k, (runtime, trace)) in variants.iter().enumerate() {
            let inv = Invocation {
                function: "bench_app".into(),
                version: 1,
                source: source.into(),
                input: input.clone(),
                trace: *trace,
                check: None,
                trace_owner: None,
            };
            let t0 = Instant::now();
            let out = invoke(runtime, RequestContext::system(), inv);
            let dt = t0.elapsed().as_secs_f64();
            assert!(ichibase::lua::saver::flush(Duration::from_secs(120)), "the trace saver drained");
            let ds = t0.elapsed().as_secs_f64();
            let v = out.result.unwrap_or_else(|e| panic!("run failed: {e}"));
            if i >= 2 {
                samples[k].push((dt, ds, v["seconds"].as_f64()));
            }
            if k == 1 {
                if let Some((s, _)) = &out.steps {
                    steps = s.len();
                }
                skipped = out.sampling.as_ref().map_or(0, |s| s.skipped);
            }
        }
    }
    samples.map(|v| {
        let inside: Vec<f64> = v.iter().filter_map(|s| s.2).collect();
        Measured {
            wall: median(v.iter().map(|s| s.0).collect()),
            saved: median(v.iter().map(|s| s.1).collect()),
            inside: (!inside.is_empty()).then(|| median(inside)),
            steps,
            skipped,
        }
    })
}

/// Median in-script seconds of `count` runs of `body` by Debian's `lua5.4` (None if missing).
fn stock_seconds(body: &str, n: u32, count: usize) -> Option<f64> {
    let dir = tempfile::tempdir().ok()?;
    let file = dir.path().join("bench.lua");
    std::fs::write(&file, timed_source(body, n, false)).ok()?;
    let mut runs = Vec::new();
    for _ in 0..count {
        let out = Command::new("lua5.4").arg(&file).output().ok()?;
        if !out.status.success() {
            return None;
        }
        runs.push(
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<f64>()
                .ok()?,
        );
    }
    Some(median(runs))
}

async fn http_rate(
    client: &reqwest::Client,
    n: usize,
    secs: f64,
    req: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder + Send + Sync + Clone + 'static,
) -> f64 {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (c, req) = (client.clone(), req.clone());
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            while Instant::now() < deadline {
                let r = req(&c).send().await.expect("request");
                assert!(r.status().is_success(), "{}", r.status());
                r.bytes().await.unwrap();
                done += 1;
            }
            done
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / secs
}

fn main() {
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: tmp.path().to_path_buf(),
        ..Config::default()
    };
    config.auth.admin_key = Some(common::ADMIN_KEY.into());
    let storage = {
        let opts = StorageOptions::from_config(&config);
        Storage::open(&opts).expect("storage")
    };

    println!("# ichibase {} Lua runtime benchmarks", ichibase::VERSION);
    println!();
    println!(
        "- machine: {} cores; Lua 5.4 vendored by mlua vs Debian `lua5.4` ({})",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        Command::new("lua5.4")
            .arg("-v")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|_| "not installed".into())
    );
    println!("- CPU time of the work measured with os.clock() inside the script, median of 5 runs");
    println!();
    if std::env::var("BENCH_ONLY").as_deref() == Ok("overhead") {
        return overhead(storage, config, tmp, rt, secs);
    }
    let only_trace = std::env::var("BENCH_ONLY").as_deref() == Ok("trace");
    if !only_trace {
    println!("## Sandbox vs stock interpreter");
    println!();
    // Sandbox and stock runs alternate (ROUNDS_STOCK of each, one at a time) so a change of
    // load on the shared machine hits both; each figure is the median.
    println!("| script | input | stock lua5.4 s | ichibase sandbox s | ratio sandbox/stock |");
    println!("|---|---:|---:|---:|---:|");
    const ROUNDS_STOCK: usize = 11;
    for (name, body, n, _) in SCRIPTS {
        let (mut sb, mut st) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS_STOCK {
            sb.push(sandbox_runs(&storage, &rt, body, *n, false, 1));
            if let Some(s) = stock_seconds(body, *n, 1) {
                st.push(s);
            }
        }
        let sb = median(sb);
        if st.is_empty() {
            println!("| {name} | {n} | (lua5.4 not installed) | {sb:.4} | - |");
        } else {
            let st = median(st);
            println!("| {name} | {n} | {st:.4} | {sb:.4} | {:.2} |", sb / st);
        }
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("stock") {
        return;
    }
    }
    println!();
    println!("## Deep tracing on vs off (every line recorded with locals and upvalues)");
    println!();
    println!("| script | input | off s | on s | ratio on/off |");
    println!("|---|---:|---:|---:|---:|");
    for (name, body, _, n) in SCRIPTS {
        let off = sandbox_seconds(&storage, &rt, body, *n, false);
        let on = sandbox_seconds(&storage, &rt, body, *n, true);
        println!("| {name} | {n} | {off:.5} | {on:.4} | {:.0} |", on / off);
    }
    println!();
    println!("## Deep tracing on vs off, whole invocations (issue 18's workloads)");
    println!();
    {
        let setup = Invocation {
            function: "setup".into(),
            version: 1,
            source: "return function() db.migrate('CREATE TABLE IF NOT EXISTS order_lines (id INTEGER PRIMARY KEY, customer TEXT, sku TEXT, qty INTEGER, price REAL)') return 1 end".into(),
            ..Invocation::default()
        };
        let runtime = ichibase::lua::Runtime::bare(storage.clone(), rt.handle().clone(), LuaOptions::default());
        invoke(&runtime, RequestContext::system(), setup).result.expect("setup");
    }
    println!("Untraced and traced runs take pooled states (the default); \"fresh\" builds a state for every traced run (how traced runs ran before issue 18's sixth pass).");
    println!();
    println!("| workload | traced steps (visits not recorded) | off ms | on ms | ratio on/off | on ms, fresh state | ratio fresh/off | on ms, trace stored | ratio | in-script off ms | in-script on ms | in-script ratio |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let input = serde_json::json!({"customer": "acme"});
    let null = serde_json::Value::Null;
    for (name, src, input, runs, ends, sample_after) in [
        ("typical app function (10 inserts in db.tx)", APP_FN, input.clone(), 30usize, false, None),
        ("typical app function, every visit recorded (`sample_after = 0`)", APP_FN, input, 30, false, Some(0)),
        ("tight loop (20k iterations)", LOOP_FN, null.clone(), 31, false, None),
        ("tight loop, every visit recorded (`sample_after = 0`)", LOOP_FN, null.clone(), 7, false, Some(0)),
        // `ends` records every visit (no sampling): its tail is the very last steps.
        ("tight loop, `[traces] mode = \"ends\"` (first 2000 + last 2000 steps)", LOOP_FN, null, 7, true, None),
    ] {
        if std::env::var("BENCH_ROW").is_ok_and(|r| !name.starts_with(r.as_str())) {
            continue;
        }
        let [off, on, fresh] = invocation_seconds(&storage, &rt, src, input.clone(), runs, ends, sample_after);
        let inside = match (off.inside, on.inside) {
            (Some(a), Some(b)) => format!("{:.3} | {:.2} | {:.1}", a * 1e3, b * 1e3, b / a),
            _ => "- | - | -".into(),
        };
        println!(
            "| {name} | {} ({}) | {:.3} | {:.2} | {:.1} | {:.2} | {:.1} | {:.2} | {:.1} | {inside} |",
            on.steps,
            on.skipped,
            off.wall * 1e3,
            on.wall * 1e3,
            on.wall / off.wall,
            fresh.wall * 1e3,
            fresh.wall / off.wall,
            on.saved * 1e3,
            on.saved / off.wall,
        );
    }
    if only_trace {
        return;
    }
    overhead(storage, config, tmp, rt, secs);
}

/// Parts 3 and 4: the cost of invoking an empty function, in process and over HTTP
/// (`BENCH_ONLY=overhead` runs only these).
fn overhead(storage: Storage, config: Config, tmp: tempfile::TempDir, rt: tokio::runtime::Runtime, secs: f64) {
    println!();
    println!("## Invocation overhead in process: fresh sandbox vs pooled (empty function)");
    println!();
    let per_run = |reuse: bool| -> f64 {
        let opts = LuaOptions {
            reuse_states: reuse,
            ..LuaOptions::default()
        };
        let runtime = ichibase::lua::Runtime::bare(storage.clone(), rt.handle().clone(), opts);
        ichibase::lua::pool::clear();
        let n = if reuse { 20_000 } else { 2_000 };
        let run = || {
            let inv = Invocation {
                function: "empty".into(),
                version: 1,
                source: "return function() return 1 end".into(),
                ..Invocation::default()
            };
            let out = invoke(&runtime, RequestContext::system(), inv);
            out.result.expect("empty run");
        };
        for _ in 0..50 {
            run();
        }
        let t0 = Instant::now();
        for _ in 0..n {
            run();
        }
        t0.elapsed().as_secs_f64() * 1e6 / n as f64
    };
    let bare_state = {
        let n = 2_000;
        let t0 = Instant::now();
        for _ in 0..n {
            let limits = ichibase::lua::sandbox::Limits {
                instructions: None,
                cpu: Duration::from_secs(5),
                memory: 64 << 20,
                deadline: Instant::now() + Duration::from_secs(10),
            };
            let meter = std::rc::Rc::new(ichibase::lua::sandbox::Meter::default());
            drop(ichibase::lua::sandbox::new_state(limits, meter, None).expect("state"));
        }
        t0.elapsed().as_secs_f64() * 1e6 / n as f64
    };
    let fresh = per_run(false);
    let pooled = per_run(true);
    println!("| bare sandbox state (libraries + prelude) µs | fresh run µs | pooled run µs | ratio fresh/pooled |");
    println!("|---:|---:|---:|---:|");
    println!("| {bare_state:.1} | {fresh:.1} | {pooled:.1} | {:.1} |", fresh / pooled);
    drop(storage);

    rt.block_on(async move {
        // The same server twice: sandboxes reused (the default) and a fresh one per run.
        let mut fresh_config = config.clone();
        fresh_config.data_dir = tmp.path().join("fresh");
        std::fs::create_dir_all(&fresh_config.data_dir).unwrap();
        let mut t = toml::Table::new();
        t.insert("reuse_states".into(), toml::Value::Boolean(false));
        fresh_config.sections.insert("lua_limits".into(), t.clone());
        // And with pooled states but every call on a blocking thread (before inline runs).
        let mut blocking_config = config.clone();
        blocking_config.data_dir = tmp.path().join("blocking");
        std::fs::create_dir_all(&blocking_config.data_dir).unwrap();
        let mut t = toml::Table::new();
        t.insert("inline_budget_us".into(), toml::Value::Integer(0));
        blocking_config.sections.insert("lua_limits".into(), t);
        let running = ichibase::server::start(config).await.expect("server");
        let fresh = ichibase::server::start(fresh_config).await.expect("server");
        let blocking = ichibase::server::start(blocking_config).await.expect("server");
        let base = format!("http://{}", running.addr);
        let fresh_base = format!("http://{}", fresh.addr);
        let blocking_base = format!("http://{}", blocking.addr);
        let client = common::client();
        for b in [&base, &fresh_base, &blocking_base] {
            let r = common::put_fn(&client, b, "empty", "return function() return 1 end").await;
            assert_eq!(r.status, 200, "{}", r.body);
        }
        println!();
        println!("## Invocation overhead over HTTP: empty function vs /ping");
        println!();
        println!("| N | GET /ping req/s | POST /fn/empty req/s, fresh state per run | ratio | pooled states, every call on a blocking thread (`inline_budget_us = 0`) | ratio | pooled states, inline (the default) | ratio fn/ping |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
        let conns: Vec<usize> = std::env::var("BENCH_CONNS")
            .ok()
            .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![1, 4, 32]);
        for n in conns {
            let b = base.clone();
            let ping = http_rate(&client, n, secs, move |c| c.get(format!("{b}/ping"))).await;
            let b = fresh_base.clone();
            let f0 = http_rate(&client, n, secs, move |c| c.post(format!("{b}/fn/empty"))).await;
            let b = blocking_base.clone();
            let f1 = http_rate(&client, n, secs, move |c| c.post(format!("{b}/fn/empty"))).await;
            let b = base.clone();
            let f = http_rate(&client, n, secs, move |c| c.post(format!("{b}/fn/empty"))).await;
            println!(
                "| {n} | {ping:.0} | {f0:.0} | {:.3} | {f1:.0} | {:.3} | {f:.0} | {:.3} |",
                f0 / ping,
                f1 / ping,
                f / ping
            );
        }
        running.shutdown().await.unwrap();
        fresh.shutdown().await.unwrap();
        blocking.shutdown().await.unwrap();
    });
}
