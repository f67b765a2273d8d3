//! Point-SELECT throughput: ichibase over HTTP vs. `GET /ping` on the same server with the same
//! client, and vs. the same query run in-process with rusqlite.
//!
//! What is measured, all in one run and on the same database file:
//!
//! 1. **HTTP**: the real server (`ichibase::server::start`) runs in this process on an ephemeral
//!    127.0.0.1 port with default settings (posterity log on); the clients and SQL helpers are
//!    the tests' harness (`tests/common`, admin API key). A table `kv(id INTEGER PRIMARY KEY,
//!    v TEXT)` with 100 000 rows is filled over HTTP. Then, for N = 1, 4, 32 concurrent client
//!    tasks sharing one keep-alive `reqwest::Client`, each task loops for a fixed time on
//!    `GET /?query=SELECT v FROM kv WHERE id = {id:Int64}&param_id=<random id>&default_format=JSON`.
//!    Every response must be `200` and its JSON must carry `value-<id>`. We report completed
//!    requests per second and the per-request latency (p50, p99) seen by the client.
//! 2. **`/ping` baseline**: the same tasks and client loop on `GET /ping` (through the same
//!    request layer, posterity row included) on the same server; ping and SELECT alternate in
//!    rounds so load changes on the shared machine hit both. SELECT/ping is issue 18's figure:
//!    what a point query costs beyond the HTTP round trip itself.
//! 3. **In-process baseline**: the same statement, `SELECT v FROM kv WHERE id = ?1`, prepared once
//!    (`prepare_cached`) on a read-only rusqlite connection to the same file, looped on random
//!    ids — single-threaded, and with N threads (capped at 16), each with its own connection.
//!
//! **Why the ratios.** An indexed point lookup costs SQLite a few microseconds, so the in-process
//! figure is the ceiling for this hardware; HTTP/in-process says what fraction of it survives
//! everything ichibase puts around a query (TCP, HTTP parsing, URL settings and parameter
//! binding, the reader pool, output formatting, response headers). SELECT/ping isolates the
//! query's own share from the HTTP round trip. Absolute numbers depend on the machine; the ratios
//! are what is comparable between machines and versions. Note that the HTTP client, the server
//! and SQLite all share this machine's cores, so the client's own cost is included in both HTTP
//! figures.
//!
//! `BENCH_ONLY=ping` runs only the SELECT-vs-ping table (with the in-process column),
//! `BENCH_ONLY=rls` only the row-level-security table.
//!
//! Duration per measurement: `BENCH_SECS` seconds (default 3). With defaults the whole run takes
//! about 30 s after compilation.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use ichibase::config::Config;
use rusqlite::{Connection, OpenFlags};

const ROWS: i64 = 100_000;
const LEVELS: [usize; 3] = [1, 4, 32];
/// Alternating ping / SELECT rounds per level.
const ROUNDS: usize = 4;
const MAX_THREADS: usize = 16;
const SELECT_HTTP: &str = "SELECT v FROM kv WHERE id = {id:Int64}";
const SELECT_SQLITE: &str = "SELECT v FROM kv WHERE id = ?1";

/// xorshift64*: a tiny, fast PRNG; good enough to spread ids over the table.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 the seed so nearby seeds give unrelated streams (and never 0).
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A random id in 1..=ROWS.
    fn id(&mut self) -> i64 {
        (self.next() % ROWS as u64) as i64 + 1
    }
}

struct HttpResult {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
}

/// What one client request of a measurement is.
#[derive(Clone, Copy)]
enum Probe {
    /// `GET /?query=<sql>&param_id=<id>` (TabSeparated), the body checked.
    Select(&'static str),
    /// The same with `default_format=JSON`, the body checked.
    SelectJson(&'static str),
    /// `GET /ping`.
    Ping,
}

/// Nearest-rank percentile of sorted nanosecond samples, in microseconds.
fn percentile_us(sorted_ns: &[u64], p: f64) -> f64 {
    if sorted_ns.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted_ns.len() as f64).ceil() as usize).clamp(1, sorted_ns.len());
    sorted_ns[rank - 1] as f64 / 1e3
}

#[path = "../tests/common/mod.rs"]
mod common;

const SELECT_BASE: &str = "SELECT v FROM notes WHERE id = {id:Int64}";
const SELECT_VIEW: &str = "SELECT v FROM my_notes WHERE id = {id:Int64}";

/// A JSON POST to `{root}{path}` that must succeed; its JSON answer.
async fn post_json(
    client: &reqwest::Client,
    root: &str,
    path: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let r = common::jpost(client, root, path, body).await;
    assert!((200..300).contains(&r.status), "{path} -> {}: {}", r.status, r.body);
    r.json()
}

/// The cost of row-level security: the same point SELECT by a user through a policy view
/// (`owner = auth_userid()`, authorizer on) and by the admin on the base table.
async fn rls_section(admin: &reqwest::Client, base: &str, secs: f64) {
    let root = base.trim_end_matches('/');
    let user = post_json(admin, root, "/admin/users", serde_json::json!({"email": "bench@example.com", "password": "bench-password", "role": "user"})).await;
    let uid = user["id"].as_str().unwrap().to_string();
    common::ok(
        admin,
        root,
        "CREATE TABLE notes(id INTEGER PRIMARY KEY, owner TEXT NOT NULL, v TEXT)",
    )
    .await;
    common::ok(
        admin,
        root,
        &format!(
            "INSERT INTO notes SELECT value, '{uid}', printf('value-%d', value) FROM \
             (WITH RECURSIVE c(value) AS (SELECT 1 UNION ALL SELECT value+1 FROM c WHERE value < {ROWS}) SELECT value FROM c)"
        ),
    )
    .await;
    common::ok(admin, root, "CREATE INDEX notes_owner ON notes(owner)").await;
    post_json(admin, root, "/admin/policies", serde_json::json!({"name": "my_notes", "table": "notes", "roles": ["user"], "using": "owner = auth_userid()"})).await;
    let r = common::signin(&common::anon_client(), root, "bench@example.com", "bench-password").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let user_client = common::client_with_token(r.json()["access_token"].as_str().unwrap());
    select_http(&user_client, base, SELECT_VIEW, 7).await;
    select_http(admin, base, SELECT_BASE, 7).await;
    run_http(&user_client, base, SELECT_VIEW, 4, (secs / 6.0).min(0.5), 1).await;

    println!();
    println!(
        "## Row-level security: point SELECT through a policy view vs the base table as admin"
    );
    println!();
    println!(
        "- user (JWT, role `user`): `{SELECT_VIEW}` where `my_notes` = `SELECT * FROM notes WHERE owner = auth_userid()`, authorizer on"
    );
    println!("- admin (API key): `{SELECT_BASE}`");
    println!();
    println!(
        "| N | admin, base table req/s | user, policy view req/s | p50 µs admin / user | ratio view/base |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for (i, n) in [1usize, 4].into_iter().enumerate() {
        let a = run_http(admin, base, SELECT_BASE, n, secs, 0xAB + i as u64).await;
        let u = run_http(&user_client, base, SELECT_VIEW, n, secs, 0xCD + i as u64).await;
        println!(
            "| {n} | {} | {} | {:.0} / {:.0} | {:.3} |",
            fmt_int(a.rps),
            fmt_int(u.rps),
            a.p50_us,
            u.p50_us,
            u.rps / a.rps
        );
    }
}

async fn select_http(client: &reqwest::Client, base: &str, query: &str, id: i64) {
    let id_s = id.to_string();
    let resp = client
        .get(base)
        .query(&[("query", query), ("param_id", id_s.as_str())])
        .send()
        .await
        .expect("GET /?query=");
    let status = resp.status();
    let body = resp.bytes().await.expect("response body");
    assert!(
        status == reqwest::StatusCode::OK,
        "id={id} -> {status}: {}",
        String::from_utf8_lossy(&body)
    );
    // Cheap check of every answer: "value-<id>\n".
    let ok = body
        .strip_prefix(b"value-")
        .and_then(|r| r.strip_suffix(b"\n"))
        == Some(id_s.as_bytes());
    assert!(
        ok,
        "id={id}: unexpected body {:?}",
        String::from_utf8_lossy(&body)
    );
}

async fn select_json(client: &reqwest::Client, base: &str, query: &str, id: i64) {
    let id_s = id.to_string();
    let resp = client
        .get(base)
        .query(&[("query", query), ("param_id", id_s.as_str()), ("default_format", "JSON")])
        .send()
        .await
        .expect("GET /?query=");
    let status = resp.status();
    let body = resp.bytes().await.expect("response body");
    let want = format!("\"value-{id}\"");
    assert!(
        status == reqwest::StatusCode::OK
            && body.windows(want.len()).any(|w| w == want.as_bytes()),
        "id={id} -> {status}: {}",
        String::from_utf8_lossy(&body)
    );
}

async fn ping(client: &reqwest::Client, base: &str) {
    let resp = client.get(format!("{base}ping")).send().await.expect("GET /ping");
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    let _ = resp.bytes().await.expect("response body");
}

/// `n` client tasks loop on point SELECTs for `secs`.
async fn run_http(
    client: &reqwest::Client,
    base: &str,
    query: &'static str,
    n: usize,
    secs: f64,
    seed: u64,
) -> HttpResult {
    let mut lat = run_probe(client, base, Probe::Select(query), n, secs, seed).await;
    let elapsed = secs;
    lat.sort_unstable();
    HttpResult {
        rps: lat.len() as f64 / elapsed,
        p50_us: percentile_us(&lat, 0.50),
        p99_us: percentile_us(&lat, 0.99),
    }
}

/// `n` client tasks loop on `probe` for `secs`; every latency in ns.
async fn run_probe(
    client: &reqwest::Client,
    base: &str,
    probe: Probe,
    n: usize,
    secs: f64,
    seed: u64,
) -> Vec<u64> {
    let dur = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = Vec::with_capacity(n);
    for t in 0..n {
        let client = client.clone();
        let base = base.to_string();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(seed ^ ((t as u64) << 20));
            let mut lat = Vec::with_capacity(64 * 1024);
            loop {
                let t0 = Instant::now();
                if t0 >= deadline {
                    break;
                }
                match probe {
                    Probe::Select(q) => select_http(&client, &base, q, rng.id()).await,
                    Probe::SelectJson(q) => select_json(&client, &base, q, rng.id()).await,
                    Probe::Ping => ping(&client, &base).await,
                }
                lat.push(t0.elapsed().as_nanos() as u64);
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task panicked"));
    }
    all
}

/// SELECT (JSON) and `/ping` at `n` clients, alternating in [`ROUNDS`] rounds of `secs / ROUNDS`
/// each: (select, ping).
async fn select_vs_ping(
    client: &reqwest::Client,
    base: &str,
    n: usize,
    secs: f64,
    seed: u64,
) -> (HttpResult, HttpResult) {
    let round = secs / ROUNDS as f64;
    let mut lat = [Vec::new(), Vec::new()];
    for r in 0..ROUNDS {
        for k in [r % 2, 1 - r % 2] {
            let probe = if k == 0 { Probe::SelectJson(SELECT_HTTP) } else { Probe::Ping };
            lat[k].extend(run_probe(client, base, probe, n, round, seed + r as u64).await);
        }
    }
    let [mut s, mut p] = lat;
    let result = |l: &mut Vec<u64>| {
        l.sort_unstable();
        HttpResult {
            rps: l.len() as f64 / secs,
            p50_us: percentile_us(l, 0.50),
            p99_us: percentile_us(l, 0.99),
        }
    };
    (result(&mut s), result(&mut p))
}

fn open_ro(path: &std::path::Path) -> Connection {
    let c = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .expect("open database read-only");
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c
}

/// `threads` OS threads, each with its own read-only connection, loop on point SELECTs for
/// `secs`. Returns total requests/s.
fn run_inprocess(path: &std::path::Path, threads: usize, secs: f64, seed: u64) -> f64 {
    let dur = Duration::from_secs_f64(secs);
    let barrier = Arc::new(Barrier::new(threads));
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = Arc::clone(&barrier);
                s.spawn(move || {
                    let conn = open_ro(path);
                    let mut stmt = conn.prepare_cached(SELECT_SQLITE).expect("prepare");
                    let mut rng = Rng::new(seed ^ ((t as u64) << 20));
                    let mut query = |id: i64| -> String {
                        stmt.query_row([id], |r| r.get(0)).expect("point select")
                    };
                    // Warm the connection's page cache, and check a sample of answers.
                    for _ in 0..2_000 {
                        let id = rng.id();
                        let v = query(id);
                        assert_eq!(v, format!("value-{id}"));
                    }
                    barrier.wait();
                    let start = Instant::now();
                    let deadline = start + dur;
                    let mut count: u64 = 0;
                    loop {
                        // Check the clock every 32 queries; it is not free next to a ~µs query.
                        for _ in 0..32 {
                            let v = query(rng.id());
                            std::hint::black_box(v);
                        }
                        count += 32;
                        if Instant::now() >= deadline {
                            break;
                        }
                    }
                    count as f64 / start.elapsed().as_secs_f64()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("in-process thread panicked"))
            .sum()
    })
}

fn fmt_int(x: f64) -> String {
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

fn main() {
    let secs: f64 = match std::env::var("BENCH_SECS") {
        Ok(v) => v
            .trim()
            .parse()
            .ok()
            .filter(|s: &f64| *s > 0.0 && s.is_finite())
            .expect("BENCH_SECS must be a positive number"),
        Err(_) => 3.0,
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: tmp.path().to_path_buf(),
        ..Config::default()
    };
    config.auth.admin_key = Some(common::ADMIN_KEY.to_string());
    let readers = config.readers;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let (only_rls, only_ping) = (only == "rls", only == "ping");
    rt.block_on(async move {
        let running = ichibase::server::start(config).await.expect("start server");
        let root = format!("http://{}", running.addr);
        let base = format!("{root}/");
        let client = common::client();

        // Populate over HTTP.
        let t0 = Instant::now();
        common::ok(&client, &root, "CREATE TABLE kv(id INTEGER PRIMARY KEY, v TEXT)").await;
        common::ok(
            &client,
            &root,
            &format!(
                "INSERT INTO kv SELECT value, printf('value-%d', value) FROM \
                 (WITH RECURSIVE c(value) AS (SELECT 1 UNION ALL SELECT value+1 FROM c WHERE value < {ROWS}) SELECT value FROM c)"
            ),
        )
        .await;
        let populate_s = t0.elapsed().as_secs_f64();
        let count = common::ok(&client, &root, "SELECT count(*) FROM kv").await;
        assert_eq!(count.trim(), ROWS.to_string(), "row count after populate");
        select_http(&client, &base, SELECT_HTTP, 42).await;
        select_http(&client, &base, SELECT_HTTP, ROWS).await;
        select_json(&client, &base, SELECT_HTTP, 7).await;

        println!("# ichibase {} point SELECT: HTTP vs /ping and vs in-process rusqlite", ichibase::VERSION);
        println!();
        println!("- machine: {cores} cores (available_parallelism); server, HTTP client and SQLite share them");
        println!("- table: kv(id INTEGER PRIMARY KEY, v TEXT), {} rows (populated over HTTP in {populate_s:.2} s)", fmt_int(ROWS as f64));
        println!("- HTTP: GET /?query={SELECT_HTTP}&param_id=<random>&default_format=JSON vs GET /ping, admin API key, one keep-alive reqwest client, {ROUNDS} alternating rounds");
        println!("- server: default config (reader pool = {readers} connections), in this process, tracing not initialised");
        println!("- in-process: rusqlite read-only connection, prepare_cached(\"{SELECT_SQLITE}\"), one connection per thread");
        println!("- {secs} s per measurement (BENCH_SECS)");
        println!();

        if !only_rls {
            // Warm-up: open the client connections and the server's reader connections.
            run_http(&client, &base, SELECT_HTTP, *LEVELS.last().unwrap(), (secs / 6.0).min(0.5), 0xBEEF).await;

            let path = running.storage.path().to_path_buf();

            let single = {
                let p = path.clone();
                tokio::task::spawn_blocking(move || run_inprocess(&p, 1, secs, 0x5EED)).await.expect("in-process run")
            };

            let mut rows = Vec::new();
            for (i, &n) in LEVELS.iter().enumerate() {
                let (http, ping) = select_vs_ping(&client, &base, n, secs, 0xC0FFEE + 16 * i as u64).await;
                let threads = n.min(MAX_THREADS);
                let inproc = if threads == 1 {
                    single
                } else {
                    let p = path.clone();
                    tokio::task::spawn_blocking(move || run_inprocess(&p, threads, secs, 0xF00D + i as u64)).await.expect("in-process run")
                };
                rows.push((n, threads, http, ping, inproc));
            }

            println!("| N | GET /ping req/s | SELECT req/s | SELECT p50 µs | SELECT p99 µs | ratio SELECT/ping | in-process req/s (threads) | ratio SELECT/in-process |");
            println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
            for (n, threads, http, ping, inproc) in &rows {
                println!(
                    "| {n} | {} | {} | {:.0} | {:.0} | {:.3} | {} ({threads}) | {:.4} (1/{:.0}) |",
                    fmt_int(ping.rps),
                    fmt_int(http.rps),
                    http.p50_us,
                    http.p99_us,
                    http.rps / ping.rps,
                    fmt_int(*inproc),
                    http.rps / inproc,
                    inproc / http.rps
                );
            }
            println!();
            println!("In-process, single thread: {} req/s ({:.2} µs per SELECT).", fmt_int(single), 1e6 / single);
            println!(
                "N = concurrent HTTP client tasks; the in-process column uses min(N, {MAX_THREADS}) threads. \
                 /ping p50 µs by N: {}.",
                rows.iter().map(|r| format!("{:.0}", r.3.p50_us)).collect::<Vec<_>>().join(", ")
            );
        }

        if !only_ping {
            rls_section(&client, &base, secs).await;
        }

        running.shutdown().await.expect("server shutdown");
    });
    drop(tmp);
}
