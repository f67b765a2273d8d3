//! WebSocket and change-capture benchmarks, measured against the real server binary (a
//! separate process, so clients and server each have their own file-descriptor budget):
//! 1. fan-out of one broadcast to N broadcast-only clients (1,000, 5,000 and 10,000), against
//!    ichibase and against a minimal Node `ws` server (benches/node-ws/server.js, a separate
//!    process started here) with the same clients and the same schedule, in the same run:
//!    connect+join time, delivery latency p50/p99/max (from just before the HTTP
//!    `POST /broadcast` to each client's receipt), and server CPU per delivery (utime+stime of
//!    the server process from /proc/PID/stat, before and after the rounds);
//! 2. change capture while the writer runs at full speed (batched inserts from 4 clients):
//!    writer rows/s on a captured table vs two baselines in the same run — an uncaptured table
//!    of the same server (capture is active there for another table: its hook sees every row,
//!    and autocommit statements run in a transaction of capture's) and the same table on a
//!    second server of the same build with nothing captured (true "CDC off") — and change
//!    events/s delivered to a subscriber, with the server's CPU per statement in each phase;
//! 3. the writer's own cost of change capture, in process (the same statements on one
//!    connection, captured vs nothing captured, thread CPU per statement).
//!
//! `cargo bench --bench ws`; `BENCH_CLIENTS=1000,5000,10000`, `BENCH_REPEAT=3` (runs per size
//! and server, in turn; medians reported), `BENCH_ROUNDS=10` and `BENCH_SECS=3` adjust it;
//! `BENCH_ONLY=fanout` skips the change-capture part; `BENCH_ONLY=capture` runs only the
//! in-process measurement of capture's cost to the writer (`BENCH_CDC_RUNS` rounds); `BENCH_BASELINE_BIN=/path/to/ichibase`
//! adds another ichibase build (say, the previous commit's) to the fan-out, same run.
//! The Node baseline needs `npm ci` in benches/node-ws once (ws 8.23.0, pinned by its lock
//! file); the bench stops with that instruction when node_modules is missing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[path = "../tests/common/mod.rs"]
mod common;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1] as f64 / 1e3
}

async fn ws_connect(
    url: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {}", common::ADMIN_KEY).parse().unwrap());
    let cfg = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(cfg), true)
        .await
        .expect("connect");
    ws
}

/// One fan-out run against one server.
struct FanOut {
    /// Sorted delivery latencies, ns.
    lat: Vec<u64>,
    connect_s: f64,
    /// Server CPU (user + system) during the rounds, seconds.
    cpu_s: f64,
    /// Of which system (kernel) time, seconds.
    sys_s: f64,
}

impl FanOut {
    fn cpu_us_per_delivery(&self) -> f64 {
        self.cpu_s * 1e6 / self.lat.len().max(1) as f64
    }

    fn sys_share(&self) -> f64 {
        self.sys_s / self.cpu_s.max(f64::MIN_POSITIVE)
    }
}

/// (utime + stime, stime) of a process, seconds.
fn cpu_secs(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("server /proc stat");
    // Fields after the command name (which may hold spaces) start at `state`, field 3.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (user, sys): (u64, u64) = (f[11].parse().unwrap(), f[12].parse().unwrap());
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ((user + sys) as f64 / hz, sys as f64 / hz)
}

/// utime + stime of the thread of `pid` named `name` (the first one), seconds.
fn thread_cpu_secs(pid: u32, name: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0.0 };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let Some(at) = stat.rfind(')') else { return 0.0 };
        let f: Vec<&str> = stat[at + 2..].split_whitespace().collect();
        let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0) + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        return ticks as f64 / hz;
    }
    0.0
}

/// N broadcast-only clients join `channel`, then `rounds` broadcasts 200 ms apart.
async fn fanout(
    http: &reqwest::Client,
    base: &str,
    pid: u32,
    channel: &str,
    clients: usize,
    rounds: usize,
) -> FanOut {
    let url = base.replace("http://", "ws://") + "/ws";
    let received = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(clients);
    let t0 = Instant::now();
    let mut pending = Vec::new();
    for _ in 0..clients {
        let url = url.clone();
        let join = json!({"type": "join", "channel": channel, "presence": false}).to_string();
        pending.push(tokio::spawn(async move {
            let mut ws = ws_connect(&url).await;
            ws.send(Message::Text(join.into())).await.unwrap();
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) if t.contains("\"joined\"") => break,
                    Some(Ok(_)) => {}
                    other => panic!("no joined frame: {other:?}"),
                }
            }
            ws
        }));
        if pending.len() == 200 {
            for p in pending.drain(..) {
                tasks.push(p.await.unwrap());
            }
        }
    }
    for p in pending.drain(..) {
        tasks.push(p.await.unwrap());
    }
    let connect_s = t0.elapsed().as_secs_f64();
    let mut readers = Vec::new();
    for mut ws in tasks {
        let received = Arc::clone(&received);
        readers.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(rounds);
            while lat.len() < rounds {
                match tokio::time::timeout(Duration::from_secs(60), ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => {
                        let at = now_ns();
                        let v: Value = serde_json::from_str(&t).unwrap();
                        if v["type"] == "broadcast" {
                            lat.push(at.saturating_sub(v["payload"]["t"].as_u64().unwrap()));
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(Some(Ok(_))) => {}
                    _ => break,
                }
            }
            (lat, ws)
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpu0 = cpu_secs(pid);
    for _ in 0..rounds {
        let r = http
            .post(format!("{base}/broadcast"))
            .json(&json!({"channel": channel, "payload": {"t": now_ns()}}))
            .send()
            .await
            .unwrap();
        let delivered = r.json::<Value>().await.unwrap()["delivered"]
            .as_u64()
            .unwrap();
        assert_eq!(delivered as usize, clients, "every client must be reached");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut all = Vec::new();
    let mut sockets = Vec::new();
    for r in readers {
        let (lat, ws) = r.await.unwrap();
        all.extend(lat);
        sockets.push(ws);
    }
    let cpu1 = cpu_secs(pid);
    let (cpu_s, sys_s) = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1);
    assert_eq!(all.len(), clients * rounds, "every broadcast must arrive");
    // Close outside the measured window.
    drop(sockets);
    all.sort_unstable();
    FanOut {
        lat: all,
        connect_s,
        cpu_s,
        sys_s,
    }
}

/// The Node `ws` baseline server (benches/node-ws/server.js) in its own process.
struct NodeWs {
    child: std::process::Child,
    url: String,
}

impl NodeWs {
    fn start() -> NodeWs {
        use std::io::{BufRead, BufReader};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/node-ws");
        assert!(
            dir.join("node_modules/ws/package.json").exists(),
            "the Node baseline is not installed: run `npm ci` in {} (ws 8.23.0, pinned by package-lock.json)",
            dir.display()
        );
        let mut child = std::process::Command::new("node")
            .arg("server.js")
            .current_dir(&dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start `node` (Node.js 18+ must be on PATH) for the baseline");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let url = loop {
            let line = lines.next().expect("node-ws exited before listening").unwrap();
            if let Some(rest) = line.strip_prefix("node-ws listening on ") {
                break rest.trim().to_string();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        NodeWs { child, url }
    }
}

impl Drop for NodeWs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

/// Another ichibase binary (`BENCH_BASELINE_BIN`, e.g. a build of the previous commit) started
/// like the harness starts this one, so before/after are measured in the same run.
fn start_baseline(bin: &str, data: &std::path::Path) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .current_dir(data)
        .env_remove("ICHIBASE_CONFIG")
        .env("ICHIBASE_LOG", "warn")
        .env("ICHIBASE_ADMIN_KEY", common::ADMIN_KEY)
        .env("ICHIBASE_HTTP__MAX_CONNECTIONS", "20000")
        .env("ICHIBASE_WS_LIMITS__MAX_TOTAL_SOCKETS", "20000")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start BENCH_BASELINE_BIN");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("baseline exited before listening").unwrap();
        if let Some(rest) = line.strip_prefix("ichibase listening on ") {
            break rest.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, url)
}

/// The fan-out section: each size against every server (the last one is Node), `repeat` times
/// in turn (ichibase, [baseline,] Node, ichibase, ...); every run, then the medians.
async fn fanout_section(http: &reqwest::Client, servers: &[(&str, &str, u32)], sizes: &[usize]) {
    let repeat: usize = std::env::var("BENCH_REPEAT").ok().and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(10).max(1);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("## Fan-out of one broadcast ({rounds} rounds, 200 ms apart), ichibase vs Node `ws` 8.23.0");
    println!();
    println!("- load average at start: {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    println!();
    println!("| clients | server | run | connect+join s | deliveries | p50 ms | p99 ms | max ms | server CPU µs/delivery | of it kernel |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut summary = Vec::new();
    let mut run = 0;
    for &n in sizes {
        let mut res: Vec<Vec<FanOut>> = servers.iter().map(|_| Vec::new()).collect();
        for r in 0..repeat {
            for (i, (name, base, pid)) in servers.iter().enumerate() {
                run += 1;
                let f = fanout(http, base, *pid, &format!("bench-{run}"), n, rounds).await;
                println!(
                    "| {n} | {name} | {} | {:.2} | {} | {:.2} | {:.2} | {:.2} | {:.1} | {:.0}% |",
                    r + 1,
                    f.connect_s,
                    f.lat.len(),
                    pct(&f.lat, 0.5) / 1e3,
                    pct(&f.lat, 0.99) / 1e3,
                    f.lat.last().copied().unwrap_or(0) as f64 / 1e6,
                    f.cpu_us_per_delivery(),
                    f.sys_share() * 100.0
                );
                res[i].push(f);
                // Let the server take the closed sockets down before the next run.
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
        }
        summary.push((n, res));
    }
    let node = servers.len() - 1;
    println!();
    println!("Medians of {repeat} runs; ratios are the medians of each run's ratio to the Node run of the same round (below 1: ichibase ahead):");
    println!();
    println!("| clients | server | connect+join s | vs Node | p50 ms | p99 ms | p99 vs Node | server CPU µs/delivery | vs Node |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for (n, res) in summary {
        for (i, (name, _, _)) in servers.iter().enumerate() {
            let m = |f: &dyn Fn(&FanOut) -> f64| median(res[i].iter().map(f).collect());
            let ratio = |f: &dyn Fn(&FanOut) -> f64| median(res[i].iter().zip(&res[node]).map(|(a, b)| f(a) / f(b)).collect());
            let p99 = |f: &FanOut| pct(&f.lat, 0.99) / 1e3;
            println!(
                "| {n} | {name} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.2} |",
                m(&|f| f.connect_s),
                ratio(&|f| f.connect_s),
                m(&|f| pct(&f.lat, 0.5) / 1e3),
                m(&p99),
                ratio(&p99),
                m(&FanOut::cpu_us_per_delivery),
                ratio(&FanOut::cpu_us_per_delivery),
            );
        }
    }
}

/// CPU time of the calling thread, seconds.
fn thread_cpu_now() -> f64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// The writer's own cost of change capture, in process (no HTTP, dispatcher or client): a
/// connection in WAL mode (synchronous NORMAL, as the server's writer) runs the bench's 100-row
/// INSERT as write jobs do, capture's job start and end around each, into a table that is
/// captured and, on a second database, into the same table with nothing captured; the two
/// alternate in rounds. The log is pruned as the dispatcher does (keeping 10,000 changes, here
/// every 100 statements, as a job of its own). Thread CPU per statement and the ratio.
fn capture_in_process(secs: f64, rounds: usize) {
    use ichibase::storage::capture;
    let insert = "INSERT INTO ev(v) SELECT 'payload-' || n FROM (WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 100) SELECT n FROM c)";
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str, captured: bool| {
        let mut c = rusqlite::Connection::open(dir.path().join(name)).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
             CREATE TABLE _ichibase_cdc_tables (name TEXT PRIMARY KEY, enabled_at TEXT);
             CREATE TABLE ev(id INTEGER PRIMARY KEY, v TEXT);",
        )
        .unwrap();
        if captured {
            c.execute("INSERT INTO _ichibase_cdc_tables(name) VALUES ('ev')", []).unwrap();
        }
        let cap = capture::install(&mut c).unwrap();
        (c, cap)
    };
    let mut dbs = [open("nothing.db", false), open("captured.db", true)];
    let job = |c: &rusqlite::Connection, cap: &capture::Capture, sql: &str| {
        cap.job_starts();
        let r = c.execute(sql, []);
        assert_eq!(cap.end_job(c), None);
        r.unwrap();
    };
    println!();
    println!("## Change capture in process: the writer's own cost ({secs} s per phase, {rounds} rounds, 100-row statements)");
    println!();
    println!("| round | µs/statement, nothing captured | µs/statement, captured | ratio nothing/captured (statements per CPU second, captured vs not) |");
    println!("|---:|---:|---:|---:|");
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let mut us = [0.0f64; 2];
        for (i, (c, cap)) in dbs.iter_mut().enumerate() {
            let (t0, w0) = (thread_cpu_now(), Instant::now());
            let mut n = 0u64;
            while w0.elapsed().as_secs_f64() < secs {
                job(c, cap, insert);
                n += 1;
                if i == 1 && n.is_multiple_of(100) {
                    let newest: i64 = c.query_row("SELECT coalesce(max(last_id), 0) FROM _ichibase_change_batches", [], |r| r.get(0)).unwrap();
                    job(c, cap, &format!("DELETE FROM _ichibase_change_batches WHERE first_id <= {0} AND last_id <= {0}", newest - 10_000));
                }
            }
            us[i] = (thread_cpu_now() - t0) * 1e6 / n as f64;
        }
        println!("| {round} | {:.1} | {:.1} | {:.3} |", us[0], us[1], us[0] / us[1]);
        ratios.push(us[0] / us[1]);
    }
    println!();
    println!("median ratio: {:.3}", median(ratios));
    for (mut c, _) in dbs {
        capture::uninstall(&mut c);
    }
}

/// One phase of the change-capture bench: the writer's rows/s, and the server's CPU (whole
/// process, and its writer thread) per 100-row statement, µs.
struct Phase {
    rows_s: f64,
    cpu_us: f64,
    writer_us: f64,
}

async fn phase(http: &reqwest::Client, base: &str, pid: u32, table: &str, secs: f64) -> Phase {
    let (cpu0, w0) = (cpu_secs(pid).0, thread_cpu_secs(pid, "ichibase-writer"));
    let rows_s = writer_rate(http, base, table, secs).await;
    let (cpu1, w1) = (cpu_secs(pid).0, thread_cpu_secs(pid, "ichibase-writer"));
    let stmts = (rows_s * secs / 100.0).max(1.0);
    Phase { rows_s, cpu_us: (cpu1 - cpu0) * 1e6 / stmts, writer_us: (w1 - w0) * 1e6 / stmts }
}

async fn writer_rate(http: &reqwest::Client, base: &str, table: &str, secs: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let sql = format!(
        "INSERT INTO {table}(v) SELECT 'payload-' || n FROM (WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 100) SELECT n FROM c)"
    );
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (c, b, sql) = (http.clone(), base.to_string(), sql.clone());
        tasks.push(tokio::spawn(async move {
            let mut rows = 0u64;
            while Instant::now() < deadline {
                let r = c
                    .post(format!("{b}/"))
                    .body(sql.clone())
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "{}", r.text().await.unwrap());
                r.bytes().await.unwrap();
                rows += 100;
            }
            rows
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
    let sizes: Vec<usize> = std::env::var("BENCH_CLIENTS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1000, 5000, 10000]);
    // The release server in its own process, started by the tests' harness.
    // Room for 10,000 sockets beside the bench's HTTP client (the defaults cap both at 10,000).
    let data = tempfile::tempdir().unwrap();
    let server = common::Server::start_in(
        data.path(),
        &["--ws-queue", "200000"],
        &[("ICHIBASE_HTTP__MAX_CONNECTIONS", "20000"), ("ICHIBASE_WS_LIMITS__MAX_TOTAL_SOCKETS", "20000")],
    );
    let base = server.url.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = common::client();
        println!("# ichibase {} WebSocket benchmarks", ichibase::VERSION);
        println!();
        println!("- machine: {} cores; server is the release binary in its own process, clients in this one", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        println!();
        if std::env::var("BENCH_ONLY").map_or(true, |o| o == "fanout") {
            let baseline_dir = tempfile::tempdir().unwrap();
            let baseline = std::env::var("BENCH_BASELINE_BIN").ok().map(|bin| start_baseline(&bin, baseline_dir.path()));
            let node = NodeWs::start();
            let mut servers = vec![("ichibase", base.as_str(), server.pid())];
            if let Some((child, url)) = &baseline {
                servers.push(("ichibase baseline", url.as_str(), child.id()));
            }
            servers.push(("node ws", node.url.as_str(), node.child.id()));
            fanout_section(&http, &servers, &sizes).await;
            drop(node);
            if let Some((mut child, _)) = baseline {
                let _ = child.kill();
                let _ = child.wait();
            }
            println!();
        }
        if std::env::var("BENCH_ONLY").is_ok_and(|o| o == "fanout") {
            return;
        }
        if std::env::var("BENCH_ONLY").is_ok_and(|o| o == "capture") {
            let rounds = std::env::var("BENCH_CDC_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
            capture_in_process(secs.min(2.0), rounds);
            return;
        }

        for sql in ["CREATE TABLE ev(id INTEGER PRIMARY KEY, v TEXT)", "CREATE TABLE ev_plain(id INTEGER PRIMARY KEY, v TEXT)"] {
            common::ok(&http, &base, sql).await;
        }
        // The true baseline: the same build and flags on its own data directory, with no table
        // captured and no subscriber (the server under test captures `ev`, so its hook also
        // runs for `ev_plain`'s rows).
        let off_server = common::Server::start(&["--ws-queue", "200000"]);
        let off_base = off_server.url.clone();
        common::ok(&http, &off_base, "CREATE TABLE ev_plain(id INTEGER PRIMARY KEY, v TEXT)").await;
        let r = common::jpost(&http, &base, "/admin/cdc", json!({"table": "ev"})).await;
        assert!((200..300).contains(&r.status), "{}", r.body);
        let url = base.replace("http://", "ws://") + "/ws";
        let mut sub = ws_connect(&url).await;
        sub.send(Message::Text(json!({"type": "subscribe", "sub": "s", "object": "ev"}).to_string().into())).await.unwrap();
        let events = Arc::new(AtomicU64::new(0));
        let last_at = Arc::new(std::sync::Mutex::new(Instant::now()));
        let (e2, l2) = (Arc::clone(&events), Arc::clone(&last_at));
        let counter = tokio::spawn(async move {
            while let Some(Ok(m)) = sub.next().await {
                if let Message::Text(t) = m {
                    if t.contains("\"change\"") {
                        e2.fetch_add(1, Ordering::Relaxed);
                        *l2.lock().unwrap() = Instant::now();
                    }
                }
            }
        });
        // Off/on pairs, each after the dispatcher delivered everything written before it (a
        // backlog would take CPU from the next measurement); the ratio of each pair and their median.
        let runs: usize = std::env::var("BENCH_CDC_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
        println!();
        println!("## Change capture with the writer at full speed (4 clients inserting 100 rows per statement, {secs} s, {runs} rounds)");
        println!();
        println!("Server CPU per 100-row statement: utime+stime of the server process (and of its writer thread) over the phase, from /proc; the dispatcher's delivery of the phase's events is included only as far as it happened within the phase.");
        println!();
        println!("| writer rows/s, nothing captured (2nd server) | uncaptured table, capture on elsewhere | CDC on | ratio on/nothing captured | ratio on/uncaptured table | change events delivered | delivered/s (to the last event) | server CPU µs/statement: nothing / uncaptured / on | writer thread µs/statement: nothing / uncaptured / on |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---|---|");
        let mut ratios = Vec::new();
        let mut ratios_plain = Vec::new();
        let mut written = 0u64;
        for _ in 0..runs {
            let p_none = phase(&http, &off_base, off_server.pid(), "ev_plain", secs).await;
            let p_off = phase(&http, &base, server.pid(), "ev_plain", secs).await;
            let before = events.load(Ordering::Relaxed);
            let start = Instant::now();
            let p_on = phase(&http, &base, server.pid(), "ev", secs).await;
            let (none, off, on) = (p_none.rows_s, p_off.rows_s, p_on.rows_s);
            written += (on * secs).round() as u64;
            let wait = Instant::now() + Duration::from_secs(120);
            while events.load(Ordering::Relaxed) < written && Instant::now() < wait {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let delivered = events.load(Ordering::Relaxed);
            let took = last_at.lock().unwrap().duration_since(start).as_secs_f64();
            println!(
                "| {none:.0} | {off:.0} | {on:.0} | {:.3} | {:.3} | {} of {} | {:.0} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} / {:.0} |",
                on / none,
                on / off,
                delivered - before,
                (on * secs).round() as u64,
                (delivered - before) as f64 / took,
                p_none.cpu_us,
                p_off.cpu_us,
                p_on.cpu_us,
                p_none.writer_us,
                p_off.writer_us,
                p_on.writer_us,
            );
            ratios.push(on / none);
            ratios_plain.push(on / off);
        }
        println!();
        println!(
            "median ratio on/nothing captured: {:.3}; on/uncaptured table: {:.3}",
            median(ratios),
            median(ratios_plain)
        );
        counter.abort();
        drop(off_server);
        if std::env::var("BENCH_ONLY").is_err() {
            capture_in_process(secs.min(2.0), runs.max(3));
        }
    });
    drop(server);
}
