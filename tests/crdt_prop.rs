//! Property tests of the CRR engine (src/crdt/engine.rs) on in-process SQLite databases: 3-5
//! replicas take random inserts, updates, deletes and re-inserts on random columns (through
//! plain SQL, captured by the triggers), exchange random partial batches in random order
//! (replayed batches included); once every pair syncs until nothing moves, every replica's full
//! dump is identical. And the same changes delivered one by one in any order (and twice) give
//! the same table. Bundles declare CRR tables, and their migrations pass the schema check.

use ichibase::crdt::engine::{self, Direct, MergeLimits, RowChange};
use proptest::prelude::*;
use rusqlite::Connection;

const SCHEMA: &str =
    "CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, b INTEGER NOT NULL DEFAULT 0, c REAL)";

fn replica() -> Connection {
    let mut c = Connection::open_in_memory().unwrap();
    c.execute_batch(SCHEMA).unwrap();
    engine::enable(&mut c, "t").unwrap();
    c
}

fn dump(c: &Connection) -> Vec<(i64, Option<String>, i64, Option<f64>)> {
    c.prepare("SELECT id, a, b, c FROM t ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

fn feed(c: &Connection, since: i64, limit: usize) -> (Vec<RowChange>, i64) {
    let (cands, cursor, _) = engine::changes(c, since, limit, None).unwrap();
    (cands.into_iter().map(|c| c.change).collect(), cursor)
}

/// Apply a batch; returns how many changes changed something.
fn apply(c: &mut Connection, batch: &[RowChange]) -> usize {
    let r = engine::apply(c, batch, &Direct, &MergeLimits::default(), |_| Ok(())).unwrap();
    for x in &r {
        assert!(x.error.is_none(), "change refused: {x:?}");
    }
    r.iter()
        .filter(|x| x.outcome == Some(engine::Outcome::Applied))
        .count()
}

#[derive(Debug, Clone)]
enum Op {
    Insert { r: usize, id: i64, a: Option<String>, b: i64 },
    Update { r: usize, id: i64, col: u8, v: i64 },
    Delete { r: usize, id: i64 },
    /// Send `to` the changes of `from` after its cursor, at most `limit`; `replay` resends from 0.
    Sync { from: usize, to: usize, limit: usize, replay: bool },
}

fn op(n: usize) -> impl Strategy<Value = Op> {
    let id = 0i64..6;
    prop_oneof![
        3 => (0..n, id.clone(), proptest::option::of("[a-c]{1,2}"), -3i64..3)
            .prop_map(|(r, id, a, b)| Op::Insert { r, id, a, b }),
        3 => (0..n, id.clone(), 0u8..3, -5i64..5).prop_map(|(r, id, col, v)| Op::Update { r, id, col, v }),
        2 => (0..n, id).prop_map(|(r, id)| Op::Delete { r, id }),
        3 => (0..n, 0..n, 1usize..5, proptest::bool::weighted(0.1))
            .prop_map(|(from, to, limit, replay)| Op::Sync { from, to, limit, replay }),
    ]
}

fn local(c: &Connection, o: &Op) {
    match o {
        Op::Insert { id, a, b, .. } => {
            c.execute(
                "INSERT INTO t (id, a, b, c) VALUES (?1, ?2, ?3, ?3 * 0.5) ON CONFLICT (id) DO NOTHING",
                rusqlite::params![id, a, b],
            )
            .unwrap();
        }
        Op::Update { id, col, v, .. } => {
            let sql = match col {
                0 => "UPDATE t SET a = 'u' || ?2 WHERE id = ?1",
                1 => "UPDATE t SET b = ?2 WHERE id = ?1",
                _ => "UPDATE t SET c = ?2 * 1.5, a = NULL WHERE id = ?1",
            };
            c.execute(sql, rusqlite::params![id, v]).unwrap();
        }
        Op::Delete { id, .. } => {
            c.execute("DELETE FROM t WHERE id = ?1", [id]).unwrap();
        }
        Op::Sync { .. } => unreachable!(),
    }
}

/// Every pair syncs fully until no change applies anywhere.
fn quiesce(reps: &mut [Connection]) {
    let n = reps.len();
    for _round in 0..10 {
        let mut moved = 0;
        for from in 0..n {
            for to in 0..n {
                if from == to {
                    continue;
                }
                let (batch, _) = feed(&reps[from], 0, usize::MAX / 2);
                moved += apply(&mut reps[to], &batch);
            }
        }
        if moved == 0 {
            return;
        }
    }
    panic!("replicas did not quiesce within 10 full rounds");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn replicas_converge(n in 3usize..=5, ops in proptest::collection::vec(op(5), 1..60)) {
        let mut reps: Vec<Connection> = (0..n).map(|_| replica()).collect();
        let mut cursor = vec![vec![0i64; n]; n];
        for o in &ops {
            match o {
                Op::Sync { from, to, limit, replay } => {
                    let (from, to) = (from % n, to % n);
                    if from == to { continue; }
                    let since = if *replay { 0 } else { cursor[from][to] };
                    let (batch, next) = feed(&reps[from], since, *limit);
                    apply(&mut reps[to], &batch);
                    if !replay { cursor[from][to] = next; }
                }
                Op::Insert { r, .. } | Op::Update { r, .. } | Op::Delete { r, .. } => {
                    local(&reps[r % n], o);
                }
            }
        }
        quiesce(&mut reps);
        let first = dump(&reps[0]);
        for (i, r) in reps.iter().enumerate().skip(1) {
            prop_assert_eq!(&dump(r), &first, "replica {} differs from replica 0", i);
        }
        // Applying everything again changes nothing (idempotent).
        for from in 0..n {
            for to in 0..n {
                if from != to {
                    let (batch, _) = feed(&reps[from], 0, usize::MAX / 2);
                    prop_assert_eq!(apply(&mut reps[to], &batch), 0);
                }
            }
        }
    }

    #[test]
    fn any_delivery_order_gives_the_same_table(
        ops in proptest::collection::vec(op(3), 1..40),
        seed_a in any::<u64>(),
        seed_b in any::<u64>(),
    ) {
        // Three replicas write independently (no sync), interleaving their edits.
        let reps: Vec<Connection> = (0..3).map(|_| replica()).collect();
        for o in &ops {
            match o {
                Op::Sync { .. } => {}
                Op::Insert { r, .. } | Op::Update { r, .. } | Op::Delete { r, .. } => local(&reps[r % 3], o),
            }
        }
        let mut all: Vec<RowChange> = Vec::new();
        for r in &reps {
            all.extend(feed(r, 0, usize::MAX / 2).0);
        }
        let shuffled = |seed: u64| {
            let mut v = all.clone();
            let mut x = seed | 1;
            for i in (1..v.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                v.swap(i, (x % (i as u64 + 1)) as usize);
            }
            v
        };
        let mut a = replica();
        let mut b = replica();
        for ch in shuffled(seed_a) {
            apply(&mut a, std::slice::from_ref(&ch));
        }
        let order_b = shuffled(seed_b);
        for ch in order_b.iter().chain(order_b.iter().rev()) {
            apply(&mut b, std::slice::from_ref(ch));
        }
        prop_assert_eq!(dump(&a), dump(&b));
    }
}

#[test]
fn delete_then_reinsert_wins_over_the_old_life() {
    let x = replica();
    let mut y = replica();
    x.execute("INSERT INTO t (id, a, b) VALUES (1, 'first', 1)", []).unwrap();
    let (b, _) = feed(&x, 0, 100);
    apply(&mut y, &b);
    // x deletes and re-inserts; y meanwhile updates the old life.
    x.execute("DELETE FROM t WHERE id = 1", []).unwrap();
    x.execute("INSERT INTO t (id, a, b) VALUES (1, 'second', 2)", []).unwrap();
    y.execute("UPDATE t SET a = 'old life edit' WHERE id = 1", []).unwrap();
    let mut reps = vec![x, y];
    quiesce(&mut reps);
    assert_eq!(dump(&reps[0]), vec![(1, Some("second".into()), 2, None)]);
    assert_eq!(dump(&reps[1]), dump(&reps[0]));
    let cl: i64 = reps[1]
        .query_row("SELECT cl FROM _ichibase_crdt_rows WHERE tbl = 't'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(cl, 3, "alive again: odd causal length");
}

#[test]
fn a_table_without_primary_key_is_refused() {
    let mut c = Connection::open_in_memory().unwrap();
    c.execute_batch("CREATE TABLE k (a, b)").unwrap();
    let e = engine::enable(&mut c, "k").unwrap_err();
    assert_eq!(e.code.name(), "CRDT_SCHEMA_REFUSED");
    assert!(e.message.contains("PRIMARY KEY"), "{}", e.message);
}

#[test]
fn added_column_stays_mergeable() {
    let mut x = replica();
    let mut y = replica();
    x.execute("INSERT INTO t (id, a) VALUES (1, 'x')", []).unwrap();
    let (b, _) = feed(&x, 0, 100);
    apply(&mut y, &b);
    for c in [&mut x, &mut y] {
        c.execute_batch("ALTER TABLE t ADD COLUMN d TEXT DEFAULT 'none'").unwrap();
        assert_eq!(engine::refresh(c).unwrap(), vec!["t".to_string()]);
    }
    x.execute("UPDATE t SET d = 'from x' WHERE id = 1", []).unwrap();
    y.execute("UPDATE t SET a = 'from y' WHERE id = 1", []).unwrap();
    let mut reps = vec![x, y];
    quiesce(&mut reps);
    let row = |c: &Connection| -> (String, String) {
        c.query_row("SELECT a, d FROM t WHERE id = 1", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap()
    };
    assert_eq!(row(&reps[0]), ("from y".to_string(), "from x".to_string()));
    assert_eq!(row(&reps[1]), row(&reps[0]));
}

#[test]
fn ddl_check_refuses_what_would_not_merge() {
    let is = |t: &str| t == "t";
    let refused = |sql: &str, verb: &str| engine::check_ddl(sql, verb, &is).is_err();
    assert!(refused("DROP TABLE t", "DROP"));
    assert!(refused("drop table if exists \"t\"", "DROP"));
    assert!(refused("ALTER TABLE t RENAME TO u", "ALTER"));
    assert!(refused("ALTER TABLE t RENAME COLUMN a TO z", "ALTER"));
    assert!(refused("ALTER TABLE t DROP COLUMN a", "ALTER"));
    assert!(refused("ALTER TABLE t ADD COLUMN z TEXT NOT NULL", "ALTER"));
    assert!(!refused("ALTER TABLE t ADD COLUMN z TEXT", "ALTER"));
    assert!(!refused("ALTER TABLE t ADD z INTEGER NOT NULL DEFAULT 0", "ALTER"));
    assert!(!refused("DROP TABLE other", "DROP"));
    assert!(!refused("ALTER TABLE other RENAME TO x", "ALTER"));
}

#[test]
fn a_bundle_declares_crr_tables_and_its_migrations_are_checked() {
    let mut c = Connection::open_in_memory().unwrap();
    ichibase::storage::migrations::apply(&mut c).unwrap();
    let bundle = |json: &str| ichibase::bundle::Bundle::from_json(json).unwrap();
    let b = bundle(
        r#"{"name": "todo", "migrations": ["CREATE TABLE todo (id TEXT PRIMARY KEY, title TEXT)"],
            "crdt": ["todo"], "checks": [{"name": "ok", "lua": "assert(true)"}]}"#,
    );
    ichibase::bundle::apply_all(&mut c, &[b], None, None).unwrap();
    assert!(engine::is_crr(&c, "todo"));
    c.execute("INSERT INTO todo (id, title) VALUES ('x', 'milk')", []).unwrap();
    assert_eq!(feed(&c, 0, 10).0.len(), 1, "the bundle's CRR table captures writes");
    // A later bundle may add a column, not drop the table.
    let add = bundle(
        r#"{"name": "todo2", "migrations": ["ALTER TABLE todo ADD COLUMN done INTEGER NOT NULL DEFAULT 0"],
            "checks": [{"name": "ok", "lua": "assert(true)"}]}"#,
    );
    ichibase::bundle::apply_all(&mut c, &[add], None, None).unwrap();
    assert_eq!(engine::list(&c).unwrap()[0].columns, vec!["title".to_string(), "done".to_string()]);
    let drop = bundle(
        r#"{"name": "todo3", "migrations": ["DROP TABLE todo"], "checks": [{"name": "ok", "lua": "assert(true)"}]}"#,
    );
    let e = ichibase::bundle::apply_all(&mut c, &[drop], None, None).unwrap_err();
    assert_eq!(e.code.name(), "CRDT_SCHEMA_REFUSED", "{}", e.message);
}
