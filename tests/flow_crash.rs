//! The crash test of durable workflows: 100 workflows of several steps (SQLite writes in
//! `ctx.tx` steps, an effect outside the database, a sleep), the server killed with SIGKILL
//! at least 50 times — inside a step's transaction, between an outside effect and its journal
//! record, and at random moments — and restarted each time. At the end every workflow
//! completed, every SQLite step applied exactly once (counts), every outside effect made at
//! least once, with the same idempotency key on every repeat.
//!
//! The outside effect is `flow.test_outside(line)` (the test-only `[flow] test_outside_file`):
//! a line appended to a file outside the database, never rolled back. The workflow writes one
//! line when its transaction begins and one when its effect is done, so the test can kill the
//! server exactly inside those windows (each step then keeps working for a few milliseconds).

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const FLOWS: usize = 100;
const KILLS: usize = 60;

/// Transaction steps (each applies `applied` rows and bumps `totals` once) and outside steps.
const TX_STEPS: [&str; 4] = ["a", "b", "c", "d"];
const OUTSIDE_STEPS: [&str; 3] = ["mail", "hook", "ping"];

const WORKFLOW: &str = r#"
local function busy(s) local t = os.clock() while os.clock() - t < s do end end
local function tx(ctx, name, rows)
  ctx.tx(name, function(key)
    flow.test_outside("txbegin " .. name .. " " .. key)
    for i = 1, rows do
      db.exec("INSERT INTO applied(flow, step, key, i) VALUES ({f:String}, {s:String}, {k:String}, {i:Int64})", {f = ctx.id, s = name, k = key, i = i})
    end
    busy(0.01)
    db.exec("UPDATE totals SET n = n + 1 WHERE step = {s:String}", {s = name})
  end)
end
local function outside(ctx, name)
  return ctx.step(name, function(key)
    flow.test_outside("effect " .. name .. " " .. ctx.id .. " " .. key)
    busy(0.01)
    return key
  end)
end
return flow.define("crash", function(ctx, input)
  tx(ctx, "a", 10)
  outside(ctx, "mail")
  ctx.sleep(0.1)
  tx(ctx, "b", 1)
  outside(ctx, "hook")
  tx(ctx, "c", 1)
  outside(ctx, "ping")
  tx(ctx, "d", 1)
  return input.n
end)
"#;

fn start(dir: &Path, outside: &Path) -> Server {
    Server::start_in(
        dir,
        &[],
        &[
            ("ICHIBASE_FLOW__POLL_INTERVAL_MS", "50"),
            ("ICHIBASE_FLOW__RETRY_BACKOFF_MS", "20"),
            ("ICHIBASE_FLOW__TEST_OUTSIDE_FILE", outside.to_str().unwrap()),
            ("ICHIBASE_POSTERITY", "false"),
            ("ICHIBASE_FLOW__WORKERS", "2"),
        ],
    )
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Wait until a new line starting with `prefix` appears after line `from` (then the server is
/// inside that window); false after `limit`.
fn wait_line(p: &Path, from: usize, prefix: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if lines(p).iter().skip(from).any(|l| l.starts_with(prefix)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflows_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let outside = out_dir.path().join("outside.log");
    let mut s = start(dir.path(), &outside);
    let c = client();
    ok(&c, &s.url, "CREATE TABLE applied(flow TEXT, step TEXT, key TEXT, i INTEGER)").await;
    ok(&c, &s.url, "CREATE TABLE totals(step TEXT PRIMARY KEY, n INTEGER)").await;
    ok(&c, &s.url, "INSERT INTO totals VALUES ('a', 0), ('b', 0), ('c', 0), ('d', 0)").await;
    let r = put_fn(&c, &s.url, "crash", WORKFLOW).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Start them all (idempotent ids), then kill. A fast machine may finish a batch before
    // enough kill points passed: then another batch of FLOWS starts (ids w<batch>_<n>).
    let id = |batch: usize, n: usize| if batch == 0 { format!("w{n}") } else { format!("w{batch}_{n}") };
    let mut batches = 0;
    let start_batch = |batch: usize, url: String| {
        let c = c.clone();
        async move {
            for n in 0..FLOWS {
                let (st, v) = api(&c, "POST", format!("{url}/flows/crash"), Some(json!({"id": id(batch, n), "input": {"n": n}}))).await;
                assert_eq!(st, 200, "{v}");
            }
        }
    };
    start_batch(0, s.url.clone()).await;
    batches += 1;
    let started = Instant::now();
    let mut kills = HashMap::<&str, usize>::new();
    let mut rng = 0x9e3779b97f4a7c15u64;
    for k in 0..KILLS {
        let from = lines(&outside).len();
        // Where to kill: inside a transaction, right after an outside effect (before its
        // record), or after a random delay.
        let kind = ["in-tx", "after-effect", "random"][k % 3];
        let hit = match kind {
            "in-tx" => wait_line(&outside, from, "txbegin", Duration::from_secs(10)),
            "after-effect" => wait_line(&outside, from, "effect", Duration::from_secs(10)),
            _ => {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                std::thread::sleep(Duration::from_millis(20 + rng % 400));
                true
            }
        };
        if !hit {
            let (_, v) = api(&c, "GET", format!("{}/flows?limit=1", s.url), None).await;
            eprintln!("nothing to interrupt after {k} kills: {}", v["counts"]);
            if kills.values().sum::<usize>() >= 50 || batches >= 5 {
                break;
            }
            start_batch(batches, s.url.clone()).await;
            batches += 1;
            continue;
        }
        s.child.kill().unwrap();
        s.child.wait().unwrap();
        *kills.entry(kind).or_default() += 1;
        s = start(dir.path(), &outside);
    }
    let total: usize = kills.values().sum();
    eprintln!("kills: {kills:?} in {:.1} s", started.elapsed().as_secs_f64());
    assert!(total >= 50, "only {total} kill points: {kills:?}");
    // Let everything finish.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (st, v) = api(&c, "GET", format!("{}/flows?limit=1", s.url), None).await;
        assert_eq!(st, 200, "{v}");
        let done = v["counts"]["completed"].as_u64().unwrap_or(0) as usize;
        assert_eq!(v["counts"]["failed"].as_u64().unwrap_or(0), 0, "{v}");
        if done == FLOWS * batches {
            break;
        }
        assert!(Instant::now() < deadline, "not all workflows completed: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("all {} completed after {:.1} s ({batches} batches)", FLOWS * batches, started.elapsed().as_secs_f64());
    let flows = FLOWS * batches;
    // Every SQLite step exactly once.
    let counts = ok(&c, &s.url, "SELECT step, count(*), count(DISTINCT flow), count(DISTINCT key) FROM applied GROUP BY step ORDER BY step").await;
    let want: Vec<String> = TX_STEPS
        .iter()
        .map(|t| format!("{t}\t{}\t{flows}\t{flows}", if *t == "a" { flows * 10 } else { flows }))
        .collect();
    assert_eq!(counts.trim(), want.join("\n"));
    let totals = ok(&c, &s.url, "SELECT group_concat(n, ',') FROM (SELECT n FROM totals ORDER BY step)").await;
    assert_eq!(totals.trim(), vec![flows.to_string(); TX_STEPS.len()].join(","));
    // Every outside effect at least once, always with the same key.
    let mut keys: HashMap<(String, String), HashSet<String>> = HashMap::new();
    let mut effects = 0;
    for l in lines(&outside) {
        let p: Vec<&str> = l.split(' ').collect();
        if p[0] == "effect" {
            effects += 1;
            keys.entry((p[1].to_string(), p[2].to_string())).or_default().insert(p[3].to_string());
        }
    }
    for batch in 0..batches {
        for n in 0..FLOWS {
            let w = id(batch, n);
            for step in OUTSIDE_STEPS {
                let k = keys.get(&(step.to_string(), w.clone())).unwrap_or_else(|| panic!("{w} never made its {step} effect"));
                assert_eq!(k.len(), 1, "{w} {step}: several idempotency keys {k:?}");
            }
        }
    }
    let rolled_back = lines(&outside).iter().filter(|l| l.starts_with("txbegin")).count() - TX_STEPS.len() * flows;
    eprintln!(
        "effects: {effects} for {} (repeats {}); transactions begun {} times for {} (rolled back {rolled_back})",
        OUTSIDE_STEPS.len() * flows,
        effects - OUTSIDE_STEPS.len() * flows,
        rolled_back + TX_STEPS.len() * flows,
        TX_STEPS.len() * flows
    );
    // Each instance's journal shows its steps, and the workflow's output.
    let (_, f) = api(&c, "GET", format!("{}/flows/w7", s.url), None).await;
    assert_eq!(f["output"], 7, "{f}");
    let kinds: Vec<&str> = f["steps"].as_array().unwrap().iter().map(|s| s["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["tx", "step", "sleep", "tx", "step", "tx", "step", "tx"]);
}
