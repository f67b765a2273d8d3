//! Cron and sleeps with the test-only flow clock (`[flow] clock_speed`, `clock_anchor`,
//! `clock_offset_secs`): four hours pass every real second, so a day passes in six seconds.
//! Daily ticks in Asia/Tokyo, at most one run per tick, a sleep across a kill -9 and restart
//! that keeps its wake time, and ticks missed while the server was down (the restart moves the
//! clock three days on): `missed = "once"` runs one catch-up, `"skip"` none.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const SPEED: &str = "14400";
const DAY: i64 = 86_400;

fn start(dir: &Path, anchor: &str, offset: &str) -> Server {
    Server::start_in(
        dir,
        &[],
        &[
            ("ICHIBASE_FLOW__POLL_INTERVAL_MS", "50"),
            ("ICHIBASE_FLOW__CLOCK_SPEED", SPEED),
            ("ICHIBASE_FLOW__CLOCK_ANCHOR", anchor),
            ("ICHIBASE_FLOW__CLOCK_OFFSET_SECS", offset),
        ],
    )
}

/// Tick times (unix s) recorded by runs of `name`, in order.
async fn ticks(c: &reqwest::Client, base: &str, name: &str) -> Vec<i64> {
    let r = post(c, base, &[("param_n", name)], "SELECT at FROM ticks WHERE name = {n:String} ORDER BY at").await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body.lines().map(|l| l.parse().unwrap()).collect()
}

async fn wait_for(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn flow(c: &reqwest::Client, base: &str, id: &str) -> Value {
    let (st, v) = api(c, "GET", format!("{base}/flows/{id}"), None).await;
    assert_eq!(st, 200, "{v}");
    v
}

fn secs(iso: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(iso.as_str().unwrap()).unwrap().timestamp()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cron_and_sleep_with_a_fast_clock() {
    let dir = tempfile::tempdir().unwrap();
    let anchor = format!(
        "{}",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
    );
    let mut s = start(dir.path(), &anchor, "0");
    let c = client();
    let u = s.url.clone();
    ok(&c, &u, "CREATE TABLE ticks(name TEXT, at INTEGER)").await;
    for name in ["digest", "digest_skip"] {
        let src = format!(
            r#"return flow.define("{name}", function(ctx, input)
  ctx.tx("record", function()
    db.exec("INSERT INTO ticks(name, at) VALUES ('{name}', {{a:Int64}})", {{a = math.floor(ctx.scheduled_at)}})
  end)
  return input.tag
end)"#
        );
        assert_eq!(put_fn(&c, &u, name, &src).await.status, 200);
    }
    let r = put_fn(
        &c,
        &u,
        "napper",
        r#"return flow.define("napper", function(ctx, input)
  local t0 = ctx.now()
  ctx.sleep(input.days * 86400)
  return {t0 = t0, t1 = ctx.now()}
end)"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = put_fn(
        &c,
        &u,
        "setup",
        r#"return function()
  flow.schedule("digest", "0 7 * * *", {tz = "Asia/Tokyo", input = {tag = "morning"}})
  return flow.schedule("digest_skip", "0 7 * * *", {tz = "Asia/Tokyo", missed = "skip"})
end"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let r = call_fn(&c, &u, "setup", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // 07:00 in Tokyo is 22:00 UTC.
    assert!(r.json()["next_at"].as_str().unwrap().contains("T22:00:00.000Z"), "{}", r.body);

    // Two daily ticks while the server runs: one run each, at 07:00 Tokyo.
    wait_for("two ticks", Duration::from_secs(60), async || {
        ticks(&c, &u, "digest").await.len() >= 2 && ticks(&c, &u, "digest_skip").await.len() >= 2
    })
    .await;
    let (_, l) = api(&c, "GET", format!("{u}/flows?name=digest"), None).await;
    let first = &l["flows"].as_array().unwrap().last().unwrap()["id"];
    let f = flow(&c, &u, first.as_str().unwrap()).await;
    assert_eq!(f["status"], "completed", "{f}");
    assert_eq!(f["output"], "morning");
    assert_eq!(f["schedule"], "digest");

    // Two naps, then kill -9 and restart three days later (the clock's offset).
    for (id, days) in [("nap1", 1), ("nap5", 5)] {
        let (st, v) = api(&c, "POST", format!("{u}/flows/napper"), Some(json!({"id": id, "input": {"days": days}}))).await;
        assert_eq!(st, 200, "{v}");
    }
    wait_for("the naps to sleep", Duration::from_secs(30), async || {
        flow(&c, &u, "nap1").await["status"] == "sleeping" && flow(&c, &u, "nap5").await["status"] == "sleeping"
    })
    .await;
    let nap5_wake = secs(&flow(&c, &u, "nap5").await["wake_at"]);
    let before: Vec<Vec<i64>> = vec![ticks(&c, &u, "digest").await, ticks(&c, &u, "digest_skip").await];
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    s = start(dir.path(), &anchor, &(3 * DAY).to_string());
    let u = s.url.clone();
    let (st, sch) = api(&c, "GET", format!("{u}/flows/schedules"), None).await;
    assert_eq!(st, 200, "{sch}");
    let restarted = secs(&sch["clock"]["started_at"]);
    assert_eq!(sch["schedules"].as_array().unwrap().len(), 2);

    // The 5-day nap keeps its wake time: still asleep right after the restart (2 more days).
    let nap5 = flow(&c, &u, "nap5").await;
    assert_eq!(nap5["status"], "sleeping", "{nap5}");
    assert_eq!(secs(&nap5["wake_at"]), nap5_wake);
    // The 1-day nap is due and finishes.
    wait_for("nap1", Duration::from_secs(30), async || flow(&c, &u, "nap1").await["status"] == "completed").await;
    let n1 = flow(&c, &u, "nap1").await;
    let slept = n1["output"]["t1"].as_f64().unwrap() - n1["output"]["t0"].as_f64().unwrap();
    assert!(slept >= DAY as f64, "{n1}");

    // One on-time tick after the restart for both schedules.
    wait_for("a tick after the restart", Duration::from_secs(60), async || {
        ticks(&c, &u, "digest").await.iter().any(|t| *t >= restarted)
            && ticks(&c, &u, "digest_skip").await.iter().any(|t| *t >= restarted)
    })
    .await;
    for (i, name) in ["digest", "digest_skip"].iter().enumerate() {
        let all = ticks(&c, &u, name).await;
        let mut dedup = all.clone();
        dedup.dedup();
        assert_eq!(all, dedup, "{name}: at most one run per tick");
        assert!(all.iter().all(|t| t % DAY == 22 * 3600), "{name}: every tick at 07:00 Tokyo: {all:?}");
        let last_before = *before[i].last().unwrap();
        let missed: Vec<i64> = all.iter().copied().filter(|t| *t > last_before && *t < restarted).collect();
        let on_time: Vec<i64> = all.iter().copied().filter(|t| *t >= restarted).collect();
        assert!(!on_time.is_empty());
        // At least two ticks fell due while the server was down.
        let down_ticks = (restarted - last_before) / DAY;
        assert!(down_ticks >= 2, "{name}: {down_ticks}");
        if *name == "digest" {
            // missed = "once": one catch-up run, for the latest missed tick.
            assert_eq!(missed.len(), 1, "{name}: {all:?} restarted {restarted}");
            assert!(restarted - missed[0] < DAY, "{name}: the catch-up is the latest missed tick");
        } else {
            assert!(missed.is_empty(), "{name}: missed = skip: {all:?}");
        }
        // Before the kill, ticks were consecutive days.
        assert!(before[i].windows(2).all(|w| w[1] - w[0] == DAY), "{name}: {:?}", before[i]);
    }

    // The 5-day nap wakes at its own time, not 5 days after the restart.
    wait_for("nap5", Duration::from_secs(60), async || flow(&c, &u, "nap5").await["status"] == "completed").await;
    let n5 = flow(&c, &u, "nap5").await;
    let (t0, t1) = (n5["output"]["t0"].as_f64().unwrap(), n5["output"]["t1"].as_f64().unwrap());
    assert!(t1 - t0 >= 5.0 * DAY as f64, "{n5}");
    assert!(t1 - t0 < 7.0 * DAY as f64, "the sleep was not restarted: {n5}");
    assert!(secs(&n5["finished_at"]) >= nap5_wake);
}
