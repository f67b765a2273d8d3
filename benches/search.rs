//! Search inside SQLite (src/search): vector KNN per quantisation and full text, through the
//! real server over HTTP, against baselines measured in the same run.
//!
//! What is measured:
//!
//! 1. **Vectors**: `BENCH_SEARCH_N` (default 100 000) unit vectors of 384 dimensions, clustered
//!    like text embeddings (2 000 random centres + noise), written straight into the database
//!    file before the server starts (`items(id INTEGER PRIMARY KEY, v BLOB)`, float32 blobs).
//!    For each quantisation (float32, int8, bit; the quantised ones without and with float32
//!    re-ranking), `PUT /search/indexes/items` (build time), then
//!    `BENCH_QUERIES` (default 40) queries `SELECT search('items', NULL, X'…', 10)` over HTTP,
//!    one at a time: queries/s and recall@10 against the exact top 10 that this process
//!    computes by brute force (cosine, f64) on the same vectors. The brute force's own speed
//!    (one thread, in process) is the baseline. sqlite-vec's own `vec0` table (float32 and
//!    bit, `MATCH … AND k = 10`, admin SQL) is measured the same way for comparison.
//! 2. **Full text**: `BENCH_FTS_N` (default 1 000 000) Japanese-like rows without spaces (words
//!    of 2–4 characters from a 5 000-word vocabulary) in `notes(id, owner, body)`; build time of
//!    the trigram index, then `search('notes', '<word>', NULL, 10)` queries/s for words of three
//!    characters or more (FTS5 + bm25 + snippet) and of two characters (the LIKE fallback, a
//!    scan). The baseline is `SELECT count(*) … WHERE body LIKE '%word%'`, the scan one would
//!    run without an index. The same queries as a user through a policy view that shows 1 % of
//!    the rows (`owner = auth_userid()`, an index on `owner`) give the cost of RLS.
//!
//! Everything runs on this machine's shared cores; the ratios are the comparable figures.

use std::time::Instant;

use ichibase::config::Config;
use rusqlite::Connection;

#[path = "../tests/common/mod.rs"]
mod common;

const DIMS: usize = 384;
const K: usize = 10;

struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= n);
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn hex(v: &[f32]) -> String {
    let mut s = String::with_capacity(v.len() * 8 + 3);
    s.push_str("X'");
    for x in v {
        for b in x.to_le_bytes() {
            s.push_str(&format!("{b:02x}"));
        }
    }
    s.push('\'');
    s
}

/// Exact top-k by cosine distance (vectors are unit length: 1 - dot).
fn brute(data: &[f32], q: &[f32], k: usize) -> Vec<i64> {
    let mut best: Vec<(f64, i64)> = data
        .chunks_exact(DIMS)
        .enumerate()
        .map(|(i, v)| {
            let dot: f64 = v.iter().zip(q).map(|(a, b)| (*a as f64) * (*b as f64)).sum();
            (1.0 - dot, i as i64 + 1)
        })
        .collect();
    best.select_nth_unstable_by(k, |a, b| a.partial_cmp(b).unwrap());
    best.truncate(k);
    best.sort_by(|a, b| a.partial_cmp(b).unwrap());
    best.into_iter().map(|x| x.1).collect()
}

fn recall(got: &[i64], want: &[i64]) -> f64 {
    got.iter().filter(|g| want.contains(g)).count() as f64 / want.len() as f64
}

async fn sql(c: &reqwest::Client, root: &str, q: &str) -> String {
    let r = common::post(c, root, &[], q).await;
    assert_eq!(r.status, 200, "{}: {}", &q[..q.len().min(200)], r.body);
    r.body
}

async fn search_ids(c: &reqwest::Client, root: &str, call: &str) -> Vec<i64> {
    let body = sql(c, root, &format!("SELECT {call} AS r FORMAT JSONEachRow")).await;
    let row: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    let hits: serde_json::Value = serde_json::from_str(row["r"].as_str().unwrap()).unwrap();
    hits.as_array().unwrap().iter().map(|h| h["id"].as_i64().unwrap()).collect()
}

fn main() {
    let n = env_usize("BENCH_SEARCH_N", 100_000);
    let queries = env_usize("BENCH_QUERIES", 40);
    let fts_n = env_usize("BENCH_FTS_N", 1_000_000);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng(42);

    // --- data, written before the server starts ---
    let centres: Vec<Vec<f32>> = (0..2000)
        .map(|_| {
            let mut c: Vec<f32> = (0..DIMS).map(|_| rng.unit()).collect();
            normalize(&mut c);
            c
        })
        .collect();
    let mut data = Vec::with_capacity(n * DIMS);
    for _ in 0..n {
        let c = &centres[rng.below(centres.len())];
        let mut v: Vec<f32> = c.iter().map(|x| x + 0.06 * rng.unit()).collect();
        normalize(&mut v);
        data.extend_from_slice(&v);
    }
    let syllables: Vec<char> = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをん東京大阪都市駅電車会社仕事学校先生友達時間今日明日雨雪春夏秋冬山川海空花木水火金土月日本語英語映画音楽料理旅行"
        .chars()
        .collect();
    let vocab: Vec<String> = (0..5000)
        .map(|_| {
            let len = 2 + rng.below(3);
            (0..len).map(|_| syllables[rng.below(syllables.len())]).collect()
        })
        .collect();
    let t0 = Instant::now();
    {
        let mut c = Connection::open(tmp.path().join("ichibase.db")).unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        let tx = c.transaction().unwrap();
        tx.execute_batch(
            "CREATE TABLE items(id INTEGER PRIMARY KEY, v BLOB);
             CREATE TABLE notes(id INTEGER PRIMARY KEY, owner TEXT NOT NULL, body TEXT NOT NULL);
             CREATE INDEX notes_owner ON notes(owner);",
        )
        .unwrap();
        {
            let mut st = tx.prepare("INSERT INTO items(id, v) VALUES (?1, ?2)").unwrap();
            for (i, v) in data.chunks_exact(DIMS).enumerate() {
                let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                st.execute(rusqlite::params![i as i64 + 1, b]).unwrap();
            }
            let mut st = tx.prepare("INSERT INTO notes(id, owner, body) VALUES (?1, ?2, ?3)").unwrap();
            for i in 0..fts_n {
                let words = 6 + rng.below(8);
                let body: String = (0..words).map(|_| vocab[rng.below(vocab.len())].as_str()).collect();
                st.execute(rusqlite::params![i as i64 + 1, format!("u{}", i % 100), body]).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    let fill_s = t0.elapsed().as_secs_f64();

    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: tmp.path().to_path_buf(),
        ..Config::default()
    };
    config.auth.admin_key = Some(common::ADMIN_KEY.to_string());
    config.auth.signup_open = true;
    config.limits.max_execution_time = 600.0;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let running = ichibase::server::start(config).await.expect("start server");
        let root = format!("http://{}", running.addr);
        let admin = common::client();

        println!("# ichibase {} search benchmark", ichibase::VERSION);
        println!();
        println!("- machine: {cores} cores, shared; server and client in this process");
        println!("- {n} vectors × {DIMS} dims (unit length, 2 000 clusters), {fts_n} text rows; written in {fill_s:.1} s before start");
        println!("- {queries} queries per case, one at a time over HTTP; k = {K}");
        println!();

        // Queries: perturbed data points, so each has real neighbours.
        let qs: Vec<Vec<f32>> = (0..queries)
            .map(|_| {
                let i = rng.below(n);
                let mut q: Vec<f32> = data[i * DIMS..(i + 1) * DIMS].iter().map(|x| x + 0.03 * rng.unit()).collect();
                normalize(&mut q);
                q
            })
            .collect();
        let t = Instant::now();
        let truth: Vec<Vec<i64>> = qs.iter().map(|q| brute(&data, q, K)).collect();
        let brute_qps = queries as f64 / t.elapsed().as_secs_f64();

        println!("## Vectors (KNN, exact scan per quantisation)");
        println!();
        println!("| method | build s | queries/s | recall@10 | queries/s ÷ in-process brute force |");
        println!("|---|---|---|---|---|");
        println!("| brute force in this process (Rust, f64, 1 thread) — baseline | – | {brute_qps:.1} | 1.000 | 1.00 |");
        for quant in ["float32", "int8", "bit"] {
            let t = Instant::now();
            let r = common::json_request(
                &admin,
                reqwest::Method::PUT,
                format!("{root}/search/indexes/items"),
                Some(serde_json::json!({"vector": {"column": "v", "dims": DIMS, "quantization": quant}})),
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.body);
            let build = t.elapsed().as_secs_f64();
            let variants: &[bool] = if quant == "float32" { &[false] } else { &[false, true] };
            for &rescore in variants {
                let t = Instant::now();
                let mut rec = 0.0;
                for (q, want) in qs.iter().zip(&truth) {
                    let got = search_ids(
                        &admin,
                        &root,
                        &format!("search('items', NULL, {}, {K}, '{{\"rescore\": {rescore}}}')", hex(q)),
                    )
                    .await;
                    rec += recall(&got, want);
                }
                let qps = queries as f64 / t.elapsed().as_secs_f64();
                let label = if rescore { format!("{quant} + float32 rescoring of 8 × 100 candidates") } else { quant.to_string() };
                println!(
                    "| `search()` {label} | {} | {qps:.1} | {:.3} | {:.2} |",
                    if rescore { "–".to_string() } else { format!("{build:.1}") },
                    rec / queries as f64,
                    qps / brute_qps
                );
            }
        }
        for (quant, decl, ins) in [
            ("float32", "float[384] distance_metric=cosine", "v"),
            ("bit", "bit[384]", "vec_quantize_binary(v)"),
        ] {
            let t = Instant::now();
            sql(&admin, &root, &format!("CREATE VIRTUAL TABLE vv_{quant} USING vec0(v {decl})")).await;
            sql(&admin, &root, &format!("INSERT INTO vv_{quant}(rowid, v) SELECT id, {ins} FROM items")).await;
            let build = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let mut rec = 0.0;
            for (q, want) in qs.iter().zip(&truth) {
                let qexpr = if quant == "bit" { format!("vec_quantize_binary({})", hex(q)) } else { hex(q) };
                let body = sql(
                    &admin,
                    &root,
                    &format!("SELECT rowid FROM vv_{quant} WHERE v MATCH {qexpr} AND k = {K} FORMAT TabSeparated"),
                )
                .await;
                let got: Vec<i64> = body.lines().map(|l| l.trim().parse().unwrap()).collect();
                rec += recall(&got, want);
            }
            let qps = queries as f64 / t.elapsed().as_secs_f64();
            println!(
                "| sqlite-vec `vec0` {quant} (admin SQL, no policies) | {build:.1} | {qps:.1} | {:.3} | {:.2} |",
                rec / queries as f64,
                qps / brute_qps
            );
        }
        println!();

        println!("## Full text ({fts_n} rows, trigram)");
        println!();
        let t = Instant::now();
        let r = common::json_request(
            &admin,
            reqwest::Method::PUT,
            format!("{root}/search/indexes/notes"),
            Some(serde_json::json!({"text": ["body"]})),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let build = t.elapsed().as_secs_f64();
        println!("- index build: {build:.1} s");
        println!();
        println!("| query | queries/s | mean hits | queries/s ÷ LIKE scan |");
        println!("|---|---|---|---|");
        let long: Vec<&String> = vocab.iter().filter(|w| w.chars().count() >= 3).take(queries).collect();
        let short: Vec<&String> = vocab.iter().filter(|w| w.chars().count() == 2).take(queries.min(10)).collect();
        let t = Instant::now();
        for w in &short {
            sql(&admin, &root, &format!("SELECT count(*) FROM notes WHERE body LIKE '%{w}%'")).await;
        }
        let scan_qps = short.len() as f64 / t.elapsed().as_secs_f64();
        println!("| baseline: `count(*) … LIKE '%w%'` scan, no index | {scan_qps:.2} | – | 1.00 |");
        for (label, words) in [("3–4 character word (FTS5, bm25, snippet)", &long), ("2 character word (LIKE fallback)", &short)] {
            let t = Instant::now();
            let mut hits = 0;
            for w in words.iter() {
                hits += search_ids(&admin, &root, &format!("search('notes', '{w}', NULL, {K})")).await.len();
            }
            let qps = words.len() as f64 / t.elapsed().as_secs_f64();
            println!(
                "| {label} | {qps:.1} | {:.1} | {:.1} |",
                hits as f64 / words.len() as f64,
                qps / scan_qps
            );
        }
        // The same words as a user, through a policy view showing 1 % of the rows.
        let r = common::jpost(
            &admin,
            &root,
            "/admin/policies",
            serde_json::json!({"name": "my_notes", "table": "notes", "roles": ["user"], "using": "owner = auth_userid()"}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let user = common::signup(&root, "bench@example.com").await;
        sql(&admin, &root, &format!("UPDATE notes SET owner = '{}' WHERE owner = 'u0'", user.id)).await;
        for (label, words) in [("3–4 character word, as a user through `my_notes` (1 % of rows)", &long), ("2 character word, as that user (LIKE over the view)", &short)] {
            let t = Instant::now();
            let mut hits = 0;
            for w in words.iter() {
                hits += search_ids(&user.client, &root, &format!("search('my_notes', '{w}', NULL, {K})")).await.len();
            }
            let qps = words.len() as f64 / t.elapsed().as_secs_f64();
            println!(
                "| {label} | {qps:.1} | {:.1} | {:.1} |",
                hits as f64 / words.len() as f64,
                qps / scan_qps
            );
        }
        running.shutdown().await.unwrap();
    });
}
