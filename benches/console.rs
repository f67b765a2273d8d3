//! Console benchmark, a ratio against a baseline measured in the same run: "view as user"
//! (`POST /console/api/query-as`, the admin asking for what a user sees) against the same user
//! running the same query on SQL over HTTP with their own token. The difference is the
//! console's cost: looking the user up and building their context. Also: the first request of
//! `console.js` (the TSX compile, once) against a later one (served from memory).
//!
//! `cargo bench --no-default-features --bench console`; `BENCH_SECS` sets the seconds per
//! measurement (default 3).

use std::time::{Duration, Instant};

use serde_json::json;

#[path = "../tests/common/mod.rs"]
mod common;

fn secs() -> f64 {
    std::env::var("BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0)
}

async fn per_call<F, Fut>(mut f: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..5 {
        f().await;
    }
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < Duration::from_secs_f64(secs()) {
        f().await;
        n += 1;
    }
    t0.elapsed().as_secs_f64() / n as f64
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s = common::Server::start(&["--signup-open", "true"]);
        let base = s.url.clone();
        let admin = common::client();

        // The page script: the first fetch compiles the TSX, later ones are served from memory.
        let t0 = Instant::now();
        let js = admin.get(format!("{base}/console/assets/console.js")).send().await.unwrap().bytes().await.unwrap();
        let first = t0.elapsed().as_secs_f64();
        let later = per_call(|| {
            let c = admin.clone();
            let u = format!("{base}/console/assets/console.js");
            async move {
                c.get(u).send().await.unwrap().bytes().await.unwrap();
            }
        })
        .await;

        let alice = common::signup(&base, "alice@example.com").await;
        common::ok(&admin, &base, "CREATE TABLE notes (id INTEGER PRIMARY KEY, owner TEXT NOT NULL DEFAULT (auth_userid()), body TEXT)").await;
        let r = common::jpost(&admin, &base, "/admin/policies", json!({"name": "my_notes", "table": "notes", "roles": ["user"], "using": "owner = auth_userid()"})).await;
        assert_eq!(r.status, 200, "{}", r.body);
        for i in 0..100 {
            common::ok(&alice.client, &base, &format!("INSERT INTO my_notes (body) VALUES ('note {i}')")).await;
        }
        let sql = "SELECT id, body FROM my_notes ORDER BY id LIMIT 50 FORMAT JSONCompact";
        let own = per_call(|| {
            let c = alice.client.clone();
            let base = base.clone();
            async move {
                let r = common::post(&c, &base, &[], sql).await;
                assert_eq!(r.status, 200);
            }
        })
        .await;
        let as_user = per_call(|| {
            let c = admin.clone();
            let base = base.clone();
            let id = alice.id.clone();
            async move {
                let r = common::jpost(&c, &base, "/console/api/query-as", json!({"user": id, "sql": "SELECT id, body FROM my_notes ORDER BY id LIMIT 50", "format": "JSONCompact"})).await;
                assert_eq!(r.status, 200, "{}", r.body);
            }
        })
        .await;
        println!("console.js: {} bytes; first request (compiles) {:.1} ms, later {:.2} ms ({:.0}x)", js.len(), first * 1e3, later * 1e3, first / later);
        println!(
            "view as user (query-as, 50 rows through RLS): {:.3} ms; the user's own SQL over HTTP: {:.3} ms; ratio {:.2}x",
            as_user * 1e3,
            own * 1e3,
            as_user / own
        );
    });
}
