//! Search inside SQLite (src/search) against the real binary: exact KNN against a brute-force
//! computation, RLS isolation of KNN and full text for two users (SQL endpoint, Lua and direct
//! attempts at the index tables), Japanese full text without spaces, hybrid ranking.

mod common;

use common::{Server, User, call_fn, client, jpost, json_request, ok, post, put_fn, signup};
use serde_json::{Value, json};

/// Deterministic pseudo-random numbers (SplitMix64) in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^= z >> 31;
        ((z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
    }
    fn vec(&mut self, d: usize) -> Vec<f32> {
        (0..d).map(|_| self.next()).collect()
    }
}

fn vjson(v: &[f32]) -> String {
    serde_json::to_string(v).unwrap()
}

async fn put_index(admin: &reqwest::Client, base: &str, table: &str, spec: Value) -> (u16, Value) {
    let r = json_request(
        admin,
        reqwest::Method::PUT,
        format!("{base}/search/indexes/{table}"),
        Some(spec),
    )
    .await;
    let v = serde_json::from_str(&r.body).unwrap_or(json!({"text": r.body}));
    (r.status, v)
}

/// `SELECT search(...)` over the SQL endpoint as `c`: the hits, or the error answer.
async fn sql_search(c: &reqwest::Client, base: &str, call: &str) -> Result<Vec<Value>, (u16, String)> {
    let r = post(c, base, &[], &format!("SELECT {call} AS r FORMAT JSONEachRow")).await;
    if r.status != 200 {
        return Err((r.status, r.body));
    }
    let row: Value = serde_json::from_str(r.body.trim()).unwrap_or_else(|e| panic!("{e}: {}", r.body));
    Ok(serde_json::from_str(row["r"].as_str().unwrap()).unwrap())
}

fn ids(hits: &[Value]) -> Vec<i64> {
    hits.iter().map(|h| h["id"].as_i64().unwrap()).collect()
}

/// Poll until the admin's text search of `word` on `notes` finds `n` rows (the queue drained).
async fn wait_indexed(admin: &reqwest::Client, base: &str, word: &str, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let hits = sql_search(admin, base, &format!("search('notes', '{word}', NULL, 1000)"))
            .await
            .unwrap();
        if hits.len() == n {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "index never caught up: {} of {n}", hits.len());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn l2(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt()
}
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64) * (*y as f64)).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    1.0 - dot / (na * nb)
}
fn hamming(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| (**x > 0.0) != (**y > 0.0)).count() as f64
}

#[tokio::test]
async fn knn_equals_brute_force() {
    let s = Server::start(&[]);
    let admin = client();
    let base = &s.url;
    ok(&admin, base, "CREATE TABLE items(id INTEGER PRIMARY KEY, v BLOB)").await;
    let dims = 24;
    let mut rng = Rng(7);
    let data: Vec<Vec<f32>> = (0..400).map(|_| rng.vec(dims)).collect();
    for chunk in data.chunks(100).enumerate() {
        let values: Vec<String> = chunk
            .1
            .iter()
            .enumerate()
            .map(|(i, v)| format!("({}, '{}')", chunk.0 * 100 + i + 1, vjson(v)))
            .collect();
        ok(&admin, base, &format!("INSERT INTO items VALUES {}", values.join(","))).await;
    }
    type Dist = fn(&[f32], &[f32]) -> f64;
    let cases: [(&str, &str, Dist); 3] = [
        ("float32", "l2", l2),
        ("float32", "cosine", cosine),
        ("bit", "cosine", hamming),
    ];
    for (quant, metric, dist) in cases {
        let (st, v) = put_index(
            &admin,
            base,
            "items",
            json!({"vector": {"column": "v", "dims": dims, "quantization": quant, "metric": metric}}),
        )
        .await;
        assert_eq!(st, 200, "{v}");
        for q in 0..5 {
            let query = rng.vec(dims);
            let k = 10;
            // Quantised: the raw quantised ranking (rescoring is checked below).
            let opts = if quant == "float32" { "NULL" } else { "'{\"rescore\": false}'" };
            let hits = sql_search(&admin, base, &format!("search('items', NULL, '{}', {k}, {opts})", vjson(&query)))
                .await
                .unwrap();
            let mut brute: Vec<(f64, i64)> = data
                .iter()
                .enumerate()
                .map(|(i, v)| (dist(v, &query), i as i64 + 1))
                .collect();
            brute.sort_by(|a, b| a.partial_cmp(b).unwrap());
            assert_eq!(hits.len(), k);
            for (i, h) in hits.iter().enumerate() {
                let d = h["distance"].as_f64().unwrap();
                assert!(
                    (d - brute[i].0).abs() < 1e-3 * (1.0 + brute[i].0),
                    "{quant}/{metric} query {q} rank {i}: distance {d} vs brute force {}",
                    brute[i].0
                );
            }
            if quant == "float32" {
                let want: Vec<i64> = brute[..k].iter().map(|x| x.1).collect();
                assert_eq!(ids(&hits), want, "{quant}/{metric} query {q}");
            } else {
                // Hamming distances tie: every hit's distance must be among the k smallest.
                let kth = brute[k - 1].0;
                for h in &hits {
                    let id = h["id"].as_i64().unwrap();
                    assert!(dist(&data[id as usize - 1], &query) <= kth);
                }
            }
        }
    }
    // bit with rescoring (the default): the candidates (8 × 100) cover all 400 rows, so the
    // float32 re-ranking must give exactly the cosine brute force.
    for _ in 0..3 {
        let query = rng.vec(dims);
        let hits = sql_search(&admin, base, &format!("search('items', NULL, '{}', 10)", vjson(&query)))
            .await
            .unwrap();
        let mut brute: Vec<(f64, i64)> = data.iter().enumerate().map(|(i, v)| (cosine(v, &query), i as i64 + 1)).collect();
        brute.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert_eq!(ids(&hits), brute[..10].iter().map(|x| x.1).collect::<Vec<_>>(), "bit + rescore");
        assert!((hits[0]["distance"].as_f64().unwrap() - brute[0].0).abs() < 1e-4);
    }
    // int8: sqlite-vec's unit quantisation; the order must match brute force on the
    // quantised vectors, which the test recomputes.
    let (st, v) = put_index(
        &admin,
        base,
        "items",
        json!({"vector": {"column": "v", "dims": dims, "quantization": "int8", "metric": "l2"}}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let quant = |v: &[f32]| -> Vec<f32> {
        v.iter()
            .map(|x| ((*x as f64 + 1.0) / (2.0f32 / 255.0) as f64 - 128.0).trunc().clamp(-128.0, 127.0) as f32)
            .collect()
    };
    let query = rng.vec(dims);
    let hits = sql_search(&admin, base, &format!("search('items', NULL, '{}', 10, '{{\"rescore\": false}}')", vjson(&query)))
        .await
        .unwrap();
    let qq = quant(&query);
    let mut brute: Vec<(f64, i64)> = data
        .iter()
        .enumerate()
        .map(|(i, v)| (l2(&quant(v), &qq), i as i64 + 1))
        .collect();
    brute.sort_by(|a, b| a.partial_cmp(b).unwrap());
    for (i, h) in hits.iter().enumerate() {
        let d = h["distance"].as_f64().unwrap();
        // Rounding of a component may differ by one step from the test's float arithmetic.
        assert!((d - brute[i].0).abs() < 0.02 * (1.0 + brute[i].0), "int8 rank {i}: {d} vs {}", brute[i].0);
    }
    // Bad vectors are typed errors.
    let e = sql_search(&admin, base, "search('items', NULL, '[1,2]', 10)").await.unwrap_err();
    assert_eq!(e.0, 400, "{}", e.1);
    assert!(e.1.contains("dimensions"), "{}", e.1);
    let e = sql_search(&admin, base, "search('items', NULL, 'nope', 10)").await.unwrap_err();
    assert_eq!(e.0, 400, "{}", e.1);
    let e = sql_search(&admin, base, "search('items', 'word', NULL, 10)").await.unwrap_err();
    assert!(e.1.contains("NO_SEARCH_INDEX") || e.1.contains("no text columns"), "{}", e.1);
}

/// notes(id, owner, body, embedding) behind `my_notes` (owner = auth_userid()), indexed for text
/// (trigram) and 8-dimension vectors; alice and bob.
async fn notes_app() -> (Server, reqwest::Client, User, User) {
    let s = Server::start(&["--signup-open", "true"]);
    let admin = client();
    let base = s.url.clone();
    ok(
        &admin,
        &base,
        "CREATE TABLE notes(id INTEGER PRIMARY KEY, owner TEXT NOT NULL, body TEXT NOT NULL, embedding BLOB)",
    )
    .await;
    let r = jpost(
        &admin,
        &base,
        "/admin/policies",
        json!({"name": "my_notes", "table": "notes", "roles": ["user"], "using": "owner = auth_userid()", "defaults": {"owner": "auth_userid()"}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (st, v) = put_index(
        &admin,
        &base,
        "notes",
        json!({"text": ["body"], "vector": {"column": "embedding", "dims": 8, "metric": "l2"}}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let alice = signup(&base, "alice@example.com").await;
    let bob = signup(&base, "bob@example.com").await;
    (s, admin, alice, bob)
}

#[tokio::test]
async fn rls_isolates_knn_and_full_text() {
    let (s, admin, alice, bob) = notes_app().await;
    let base = &s.url;
    let mut rng = Rng(11);
    let mut by_body = std::collections::HashMap::new();
    for (u, name) in [(&alice, "alice"), (&bob, "bob")] {
        for i in 0..20 {
            let v = rng.vec(8);
            let body = format!("{name} secret note {i} about zeppelins");
            let r = post(
                &u.client,
                base,
                &[],
                &format!("INSERT INTO my_notes(body, embedding) VALUES ('{body}', '{}')", vjson(&v)),
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.body);
            by_body.insert(body, (name, v));
        }
    }
    let mut vectors = std::collections::HashMap::new();
    for line in ok(&admin, base, "SELECT id, body FROM notes FORMAT JSONEachRow").await.lines() {
        let row: Value = serde_json::from_str(line).unwrap();
        let id = row["id"].to_string().trim_matches('"').parse::<i64>().unwrap();
        vectors.insert(id, by_body[row["body"].as_str().unwrap()].clone());
    }
    wait_indexed(&admin, base, "zeppelins", 40).await;
    let owner_of = |id: i64| vectors[&id].0;
    // Full text over the SQL endpoint: only the caller's rows.
    for (u, name) in [(&alice, "alice"), (&bob, "bob")] {
        let hits = sql_search(&u.client, base, "search('my_notes', 'zeppelins', NULL, 100)").await.unwrap();
        assert_eq!(hits.len(), 20, "{name}");
        assert!(hits.iter().all(|h| owner_of(h["id"].as_i64().unwrap()) == name));
        // The other user's name is in their bodies only.
        let other = if name == "alice" { "bob" } else { "alice" };
        let hits = sql_search(&u.client, base, &format!("search('my_notes', '{other}', NULL, 100)")).await.unwrap();
        assert!(hits.is_empty(), "{name} found {other}'s notes: {hits:?}");
    }
    // KNN with the exact vector of one of bob's notes, from alice: only alice's rows.
    let (bob_id, bob_vec) = vectors.iter().find(|(_, (n, _))| *n == "bob").map(|(i, (_, v))| (*i, v.clone())).unwrap();
    let hits = sql_search(&alice.client, base, &format!("search('my_notes', NULL, '{}', 100)", vjson(&bob_vec)))
        .await
        .unwrap();
    assert_eq!(hits.len(), 20);
    assert!(hits.iter().all(|h| owner_of(h["id"].as_i64().unwrap()) == "alice"));
    assert!(!ids(&hits).contains(&bob_id));
    // Bob finds it at distance 0.
    let hits = sql_search(&bob.client, base, &format!("search('my_notes', NULL, '{}', 1)", vjson(&bob_vec)))
        .await
        .unwrap();
    assert_eq!(ids(&hits), vec![bob_id]);
    assert!(hits[0]["distance"].as_f64().unwrap() < 1e-6);
    // Hybrid from alice: still only hers.
    let hits = sql_search(&alice.client, base, &format!("search('my_notes', 'secret', '{}', 100)", vjson(&bob_vec)))
        .await
        .unwrap();
    assert_eq!(hits.len(), 20);
    assert!(hits.iter().all(|h| owner_of(h["id"].as_i64().unwrap()) == "alice"));
    // A filter naming bob's id as owner cannot widen the view.
    let hits = sql_search(
        &alice.client,
        base,
        &format!("search('my_notes', 'zeppelins', NULL, 100, '{}')", json!({"filter": {"owner": bob.id}})),
    )
    .await
    .unwrap();
    assert!(hits.is_empty());
    // Plain SQL KNN through the policy view with sqlite-vec's distance functions.
    let r = post(
        &alice.client,
        base,
        &[],
        &format!(
            "SELECT id FROM my_notes ORDER BY vec_distance_l2(embedding, '{}') LIMIT 100 FORMAT JSONEachRow",
            vjson(&bob_vec)
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let n = r.body.lines().count();
    assert_eq!(n, 20);
    for line in r.body.lines() {
        let id = serde_json::from_str::<Value>(line).unwrap()["id"].to_string().trim_matches('"').parse::<i64>().unwrap();
        assert_eq!(owner_of(id), "alice");
    }
    // Adversarial: the base table, the index tables and their shadow tables are not reachable.
    for sql in [
        "SELECT search('notes', 'zeppelins', NULL, 100)",
        "SELECT * FROM notes",
        "SELECT * FROM _ichibase_fts_notes WHERE _ichibase_fts_notes MATCH 'zeppelins'",
        "SELECT * FROM _ichibase_fts_notes_content",
        "SELECT * FROM _ichibase_fts_notes_data",
        "SELECT * FROM _ichibase_vq_notes",
        "SELECT * FROM _ichibase_search_queue",
        "SELECT * FROM _ichibase_search_indexes",
        "SELECT * FROM fts5vocab('_ichibase_fts_notes', 'row')",
        "CREATE VIRTUAL TABLE mine USING fts5(x)",
        "CREATE VIRTUAL TABLE mine USING vec0(v float[8])",
        "SELECT load_extension('x')",
        "SELECT search('_ichibase_search_indexes', 'x', NULL, 1)",
    ] {
        let r = post(&alice.client, base, &[], sql).await;
        assert_ne!(r.status, 200, "{sql} answered {}", r.body);
        assert!(!r.body.contains("bob"), "{sql}: {}", r.body);
    }
    let hostile = [
        json!({"filter": {"owner\" OR 1=1 --": 1}}),
        json!({"filter": {"owner": {"a": 1}}}),
        json!({"highlight": [1, 2]}),
        json!({"nope": 1}),
    ];
    for o in hostile {
        let e = sql_search(&alice.client, base, &format!("search('my_notes', 'zeppelins', NULL, 10, '{o}')"))
            .await
            .unwrap_err();
        assert_eq!(e.0, 400, "{o}: {}", e.1);
    }
    // A view whose grant is another role's: refused.
    let r = jpost(
        &admin,
        base,
        "/admin/policies",
        json!({"name": "all_notes_for_editors", "table": "notes", "roles": ["editor"], "operations": ["select"], "using": "1"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let e = sql_search(&alice.client, base, "search('all_notes_for_editors', 'zeppelins', NULL, 100)")
        .await
        .unwrap_err();
    assert_eq!(e.0, 403, "{}", e.1);
    // Lua db.search as each user: the view's rows with scores.
    let r = put_fn(
        &admin,
        base,
        "find",
        "return function(input) return db.search{table = 'my_notes', text = input.text, vector = input.vector, k = 50} end",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    for (u, name) in [(&alice, "alice"), (&bob, "bob")] {
        let r = call_fn(&u.client, base, "find", json!({"text": "zeppelins", "vector": bob_vec})).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let rows = r.json();
        let rows = rows.as_array().unwrap();
        assert_eq!(rows.len(), 20, "{name}");
        for row in rows {
            assert!(row["body"].as_str().unwrap().starts_with(name), "{row}");
            assert!(row["_score"].as_f64().unwrap() > 0.0);
        }
        if name == "bob" {
            let r = call_fn(&u.client, base, "find", json!({"vector": bob_vec})).await;
            assert_eq!(r.status, 200, "{}", r.body);
            assert_eq!(r.json()[0]["id"].as_i64(), Some(bob_id), "bob's exact vector ranks first");
            assert!(r.json()[0]["_distance"].as_f64().unwrap() < 1e-6);
        }
    }
    // Hostile Lua arguments are typed errors.
    let r = put_fn(&admin, base, "bad", "return function(input) return db.search{table = 'my_notes', k = -1, text = 'x'} end").await;
    assert_eq!(r.status, 200);
    let r = call_fn(&alice.client, base, "bad", json!({})).await;
    assert_eq!(r.status, 400, "{}", r.body);
    // Deleting a note removes it from both indexes.
    ok(&admin, base, &format!("DELETE FROM notes WHERE id = {bob_id}")).await;
    wait_indexed(&admin, base, "zeppelins", 39).await;
    let hits = sql_search(&bob.client, base, &format!("search('my_notes', NULL, '{}', 100)", vjson(&bob_vec)))
        .await
        .unwrap();
    assert_eq!(hits.len(), 19);
    assert!(!ids(&hits).contains(&bob_id));
}

#[tokio::test]
async fn japanese_full_text_without_spaces() {
    let (s, admin, alice, _bob) = notes_app().await;
    let base = &s.url;
    let bodies = [
        "昨日は東京タワーに行きました。とても高かったです。",
        "東京駅で友達と待ち合わせをしました",
        "京都の金閣寺はきれいでした",
        "今日は雨なので家で本を読みます",
        "The quick brown fox jumps over the lazy dog",
    ];
    for b in bodies {
        ok(&alice.client, base, &format!("INSERT INTO my_notes(body) VALUES ('{b}')")).await;
    }
    // The last insert is indexed once its word is found: the queue drains in order.
    wait_indexed(&admin, base, "lazy", 1).await;
    let find = |q: &'static str| {
        let c = alice.client.clone();
        let base = base.clone();
        async move { sql_search(&c, &base, &format!("search('my_notes', '{q}', NULL, 10)")).await.unwrap() }
    };
    let hits = find("東京タワー").await;
    assert_eq!(ids(&hits), vec![1]);
    assert!(hits[0]["snippet"].as_str().unwrap().contains("[東京タワー]") || hits[0]["snippet"].as_str().unwrap().contains("[東京タ"), "{hits:?}");
    let hits = find("待ち合わせ").await;
    assert_eq!(ids(&hits), vec![2]);
    // Two-character words (shorter than a trigram) still match, inside sentences.
    let mut got = ids(&find("東京").await);
    got.sort();
    assert_eq!(got, vec![1, 2]);
    assert_eq!(ids(&find("京都").await), vec![3]);
    let hits = find("雨").await;
    assert_eq!(ids(&hits), vec![4]);
    assert!(hits[0]["snippet"].as_str().unwrap().contains("[雨]"), "{hits:?}");
    // Several words: all must occur.
    assert_eq!(ids(&find("金閣寺 きれい").await), vec![3]);
    assert_eq!(ids(&find("東京 金閣寺").await), Vec::<i64>::new());
    // English inside the same index (trigram: substrings, case-insensitive).
    assert_eq!(ids(&find("LAZY").await), vec![5]);
    assert_eq!(ids(&find("brown fox").await), vec![5]);
}

#[tokio::test]
async fn hybrid_ranks_planted_best_match_first() {
    let s = Server::start(&[]);
    let admin = client();
    let base = &s.url;
    ok(&admin, base, "CREATE TABLE docs(id INTEGER PRIMARY KEY, body TEXT, v BLOB, lang TEXT)").await;
    let mut rng = Rng(3);
    let words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"];
    let query = rng.vec(16);
    let planted = 137i64;
    let mut rows = Vec::new();
    for id in 1..=300i64 {
        let mut body: Vec<&str> = (0..12).map(|_| words[((rng.next() + 1.0) * 5.0) as usize % 10]).collect();
        let mut v = rng.vec(16);
        if id % 7 == 0 && id % 11 != 0 {
            // Decoys: the word once, with a far vector.
            body.push("kilimanjaro");
        }
        if id % 11 == 0 {
            // Decoys: a vector near the query, without the word.
            v = query.iter().map(|x| x + 0.3 * rng.next()).collect();
        }
        if id == planted {
            // The best match: the word twice and the nearest vector.
            body.push("kilimanjaro");
            body.push("kilimanjaro");
            v = query.iter().map(|x| x + 0.01 * rng.next()).collect();
        }
        rows.push(format!("({id}, '{}', '{}', {})", body.join(" "), vjson(&v), if id % 2 == 0 { "'en'" } else { "'fr'" }));
    }
    ok(&admin, base, &format!("INSERT INTO docs VALUES {}", rows.join(","))).await;
    let (st, v) = put_index(
        &admin,
        base,
        "docs",
        json!({"text": ["body"], "tokenizer": "unicode61", "vector": {"column": "v", "dims": 16}}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let text_only = sql_search(&admin, base, "search('docs', 'kilimanjaro', NULL, 10)").await.unwrap();
    let vec_only = sql_search(&admin, base, &format!("search('docs', NULL, '{}', 10)", vjson(&query))).await.unwrap();
    let hybrid = sql_search(&admin, base, &format!("search('docs', 'kilimanjaro', '{}', 10)", vjson(&query))).await.unwrap();
    assert_eq!(hybrid[0]["id"].as_i64(), Some(planted), "hybrid: {hybrid:?}");
    assert!(hybrid[0]["text_rank"].as_i64().is_some() && hybrid[0]["vector_rank"].as_i64().is_some());
    assert!(hybrid[0]["snippet"].as_str().unwrap().contains("[kilimanjaro]"));
    // Each list alone contains decoys; the text list ranks many equal documents.
    assert!(text_only.len() == 10 && vec_only.len() == 10);
    assert!(ids(&vec_only).iter().any(|i| i % 11 == 0));
    // A metadata filter: the planted document is 'fr'; with lang = 'en' it is gone.
    let hits = sql_search(
        &admin,
        base,
        &format!("search('docs', 'kilimanjaro', '{}', 10, '{}')", vjson(&query), json!({"filter": {"lang": "en"}})),
    )
    .await
    .unwrap();
    assert!(!ids(&hits).contains(&planted));
    assert!(!hits.is_empty());
    // Over SQL, the documented join back to the rows.
    let r = post(
        &admin,
        base,
        &[],
        &format!(
            "SELECT d.id, json_extract(s.value, '$.score') AS score FROM json_each(search('docs', 'kilimanjaro', '{}', 3)) AS s JOIN docs AS d ON d.id = json_extract(s.value, '$.id') ORDER BY s.key FORMAT JSONEachRow",
            vjson(&query)
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let first: Value = serde_json::from_str(r.body.lines().next().unwrap()).unwrap();
    assert_eq!(first["id"].to_string().trim_matches('"'), planted.to_string());
}

#[tokio::test]
async fn index_declarations_are_validated_and_admin_only() {
    let (s, admin, alice, _bob) = notes_app().await;
    let base = &s.url;
    ok(&admin, base, "CREATE TABLE nokey(a TEXT, b TEXT)").await;
    ok(&admin, base, "CREATE TABLE textkey(k TEXT PRIMARY KEY, b TEXT)").await;
    // Not for users.
    let (st, _) = put_index(&alice.client, base, "notes", json!({"text": ["body"]})).await;
    assert_eq!(st, 403);
    let r = json_request(&alice.client, reqwest::Method::GET, format!("{base}/search/indexes"), None).await;
    assert_eq!(r.status, 403);
    for (table, spec, status) in [
        ("missing", json!({"text": ["b"]}), 404),
        ("nokey", json!({"text": ["a"]}), 400),
        ("textkey", json!({"text": ["b"]}), 400),
        ("notes", json!({"text": ["nope"]}), 400),
        ("notes", json!({"text": ["body", "body"]}), 400),
        ("notes", json!({"text": ["body"], "tokenizer": "mecab"}), 400),
        ("notes", json!({}), 400),
        ("notes", json!({"vector": {"column": "embedding", "dims": 0}}), 400),
        ("notes", json!({"vector": {"column": "embedding", "dims": 12, "quantization": "bit"}}), 400),
        ("notes", json!({"vector": {"column": "embedding", "dims": 8, "quantization": "int4"}}), 400),
        ("notes", json!({"vector": {"column": "embedding", "dims": 8, "metric": "dot"}}), 400),
        ("notes", json!({"text": ["body"], "key": "owner"}), 400),
        ("_ichibase_users", json!({"text": ["email"]}), 400),
        ("sqlite_schema", json!({"text": ["sql"]}), 400),
    ] {
        let (st, v) = put_index(&admin, base, table, spec.clone()).await;
        assert_eq!(st, status, "{table} {spec}: {v}");
    }
    let r = json_request(&admin, reqwest::Method::GET, format!("{base}/search/indexes"), None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["indexes"][0]["table"], "notes");
    assert_eq!(r.json()["indexes"][0]["key"], "id");
    let r = json_request(&admin, reqwest::Method::DELETE, format!("{base}/search/indexes/nokey"), None).await;
    assert_eq!(r.status, 404, "{}", r.body);
    let e = sql_search(&admin, base, "search('nokey', 'x', NULL, 1)").await.unwrap_err();
    assert_eq!(e.0, 404, "{}", e.1);
    assert!(e.1.contains("NO_SEARCH_INDEX"), "{}", e.1);
    // Malformed vectors leave their row out of the vector index without stopping the queue.
    for v in ["'[1,2]'", "'garbage'", "X'00'", "'[1,2,3,4,5,6,7,\"x\"]'"] {
        ok(&admin, base, &format!("INSERT INTO notes(owner, body, embedding) VALUES ('x', 'broken vector', {v})")).await;
    }
    ok(&admin, base, "INSERT INTO notes(owner, body, embedding) VALUES ('x', 'fine vector', '[1,0,0,0,0,0,0,0]')").await;
    wait_indexed(&admin, base, "vector", 5).await;
    let hits = sql_search(&admin, base, "search('notes', NULL, '[1,0,0,0,0,0,0,0]', 10)").await.unwrap();
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert!(hits[0]["distance"].as_f64().unwrap() < 1e-6);
    // Dropping the index removes its objects; search then says so.
    let r = json_request(&admin, reqwest::Method::DELETE, format!("{base}/search/indexes/notes"), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(&admin, base, &[], "SELECT count(*) FROM sqlite_schema WHERE name LIKE '_ichibase_fts_notes%' OR name LIKE '_ichibase_vq_notes%' OR name LIKE '_ichibase_search_notes%'").await;
    assert_eq!(r.body.trim(), "0");
    let e = sql_search(&alice.client, base, "search('my_notes', 'vector', NULL, 1)").await.unwrap_err();
    assert_eq!(e.0, 404, "{}", e.1);
    // Writes through the policy view keep working without the index.
    ok(&alice.client, base, "INSERT INTO my_notes(body) VALUES ('after the index')").await;
}

#[path = "common/model_server.rs"]
mod model_server;

/// `db.search{text=...}` without `vector=` embeds the text with `[search] embed_model` through
/// the `ai` layer (logged as a generation of the calling function); without the setting it
/// ranks by text alone.
#[tokio::test]
async fn query_text_is_embedded_through_the_ai_layer() {
    let m = model_server::ModelServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ichibase.toml"),
        format!("[search]\nembed_model = \"emb\"\n\n[ai.models.emb]\nurl = \"{}\"\nmodel = \"e-1\"\ninput_price = 0.1\n", m.url),
    )
    .unwrap();
    let s = Server::start_in(dir.path(), &[], &[]);
    let (admin, base) = (client(), s.url.clone());
    ok(&admin, &base, "CREATE TABLE docs(id INTEGER PRIMARY KEY, body TEXT, v BLOB)").await;
    let f = |t: &str| {
        let v: Vec<f32> = model_server::vector_of(t).into_iter().map(|x| x as f32).collect();
        vjson(&v)
    };
    // Every row has the word; only row 7's vector is the query's ("zebra").
    let mut rows = Vec::new();
    for id in 1..=20 {
        let vt = if id == 7 { "zebra".to_string() } else { format!("{}", "q".repeat(id as usize + 10)) };
        rows.push(format!("({id}, 'zebra number {id}', '{}')", f(&vt)));
    }
    ok(&admin, &base, &format!("INSERT INTO docs VALUES {}", rows.join(","))).await;
    let (st, v) = put_index(&admin, &base, "docs", json!({"text": ["body"], "vector": {"column": "v", "dims": 4}})).await;
    assert_eq!(st, 200, "{v}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while sql_search(&admin, &base, "search('docs', 'zebra', NULL, 100)").await.unwrap().len() < 20 {
        assert!(std::time::Instant::now() < deadline, "the index never caught up");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let r = put_fn(&admin, &base, "find", "return function(input) return db.search{table = 'docs', text = input.q, k = 3} end").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = call_fn(&admin, &base, "find", json!({"q": "zebra"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let hits: Value = serde_json::from_str(&r.body).unwrap();
    // The vector ranking comes from the embedded text: row 7's vector is the query's own.
    let nearest = hits.as_array().unwrap().iter().find(|h| h["_vector_rank"] == 1).unwrap_or_else(|| panic!("no vector ranking: {hits}"));
    assert_eq!(nearest["id"], 7, "{hits}");
    assert_eq!(nearest["_distance"].as_f64(), Some(0.0), "{hits}");
    // The model saw the query text, and the call is one generation of `find`.
    assert!(m.seen().iter().any(|x| x.body.to_string().contains("zebra")), "the embedding request carried the text");
    let (st, g) = common::api(&admin, "GET", format!("{base}/ai/generations?function=find"), None).await;
    assert_eq!(st, 200, "{g}");
    assert!(g.to_string().contains("\"embed\""), "a logged embed generation: {g}");

    // A vector of the wrong size is a clear error, not a silent text-only search.
    let r = put_fn(&admin, &base, "find4", "return function() return db.search{table = 'docs2', text = 'zebra'} end").await;
    assert_eq!(r.status, 200, "{}", r.body);
    ok(&admin, &base, "CREATE TABLE docs2(id INTEGER PRIMARY KEY, body TEXT, v BLOB)").await;
    ok(&admin, &base, "INSERT INTO docs2 VALUES (1, 'zebra', '[1,2,3]')").await;
    let (st, v) = put_index(&admin, &base, "docs2", json!({"text": ["body"], "vector": {"column": "v", "dims": 3}})).await;
    assert_eq!(st, 200, "{v}");
    let r = call_fn(&admin, &base, "find4", json!({})).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("4 dimensions") && r.body.contains("has 3"), "{}", r.body);
}

/// Embed-on-insert: an index whose vector declares `embed` fills NULL vectors from the text
/// columns through the `ai` layer (batched, logged as `search.embed`), and the filled vectors
/// are indexed: a vector search for a row's own text finds it at distance 0.
#[tokio::test]
async fn rows_are_embedded_on_insert_through_the_ai_layer() {
    let m = model_server::ModelServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ichibase.toml"),
        format!("[ai.models.emb]\nurl = \"{}\"\nmodel = \"e-1\"\ninput_price = 0.1\n", m.url),
    )
    .unwrap();
    let s = Server::start_in(dir.path(), &[], &[]);
    let (admin, base) = (client(), s.url.clone());
    ok(&admin, &base, "CREATE TABLE docs(id INTEGER PRIMARY KEY, title TEXT, body TEXT, v BLOB)").await;
    // A model that is not configured, or a column that does not exist: clear errors.
    let (st, v) = put_index(&admin, &base, "docs", json!({"text": ["body"], "vector": {"column": "v", "dims": 4, "embed": {"from": ["nope"], "model": "emb"}}})).await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = put_index(&admin, &base, "docs", json!({"vector": {"column": "v", "dims": 4, "embed": {"from": ["body"]}}})).await;
    assert_eq!(st, 400, "no model named and no [search] embed_model: {v}");
    let (st, v) = put_index(&admin, &base, "docs", json!({"text": ["body"], "vector": {"column": "v", "dims": 4, "embed": {"from": ["title", "body"], "model": "emb"}}})).await;
    assert_eq!(st, 200, "{v}");
    let rows: Vec<String> = (1..=70).map(|i| format!("({i}, 'title {i}', '{}', NULL)", "word ".repeat(i))).collect();
    ok(&admin, &base, &format!("INSERT INTO docs VALUES {}", rows.join(","))).await;
    ok(&admin, &base, "INSERT INTO docs VALUES (100, 'zebra', 'crossing', NULL)").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let n = ok(&admin, &base, "SELECT count(*) FROM docs WHERE v IS NULL").await;
        if n.trim() == "0" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "rows never embedded: {n} left");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // Two batches of at most 64 texts each (71 rows).
    let calls = m.seen().iter().filter(|x| x.path.contains("embeddings")).count();
    assert!((2..=4).contains(&calls), "{calls} embedding calls for 71 rows");
    // The text embedded is the `from` columns joined by a newline.
    let q: Vec<f32> = model_server::vector_of("zebra\ncrossing").into_iter().map(|x| x as f32).collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let hits = sql_search(&admin, &base, &format!("search('docs', NULL, '{}', 1)", vjson(&q))).await.unwrap();
        if hits.first().is_some_and(|h| h["id"] == 100) {
            assert!(hits[0]["distance"].as_f64().is_some_and(|d| d.abs() < 1e-9), "{hits:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "embedded vectors never indexed: {hits:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let (st, g) = common::api(&admin, "GET", format!("{base}/ai/generations?function=search.embed"), None).await;
    assert_eq!(st, 200, "{g}");
    assert!(g.to_string().contains("\"embed\""), "embed generations logged: {g}");
}
