//! The sandbox's property-testing module (`prop`): shrinking reaches minimal counterexamples for
//! known-bad properties, generators produce valid UTF-8 Japanese text, seeds make runs
//! repeatable. Runs real Lua invocations on a real SQLite storage (no server needed).

use std::time::Duration;

use ichibase::config::Synchronous;
use ichibase::core::RequestContext;
use ichibase::lua::{self, CheckMode, Invocation, LuaOptions, Outcome};
use ichibase::storage::{Storage, StorageOptions};
use serde_json::{Value, json};

struct Env {
    storage: Storage,
    _dir: tempfile::TempDir,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(&StorageOptions {
        path: dir.path().join("t.db"),
        synchronous: Synchronous::Normal,
        busy_timeout: Duration::from_secs(5),
        readers: 2,
        replicated: false,
    })
    .unwrap();
    Env { storage, _dir: dir }
}

async fn check(e: &Env, source: &str, seed: i64) -> Outcome {
    let (storage, src) = (e.storage.clone(), source.to_string());
    let rt = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        lua::invoke(
            &lua::Runtime::bare(storage, rt, LuaOptions::default()),
            RequestContext::system(),
            Invocation {
                function: "check".into(),
                version: 0,
                source: src,
                input: json!({}),
                trace: false,
                check: Some(CheckMode { seed, replay: None }),
                trace_owner: None,
            },
        )
    })
    .await
    .unwrap()
}

/// The one failed property report of an outcome that must have failed.
fn failure(o: &Outcome) -> Value {
    assert!(
        o.result.is_err(),
        "the property should fail: {:?}",
        o.result
    );
    let f: Vec<&Value> = o
        .reports
        .iter()
        .filter(|r| r["ok"] == json!(false))
        .collect();
    assert_eq!(f.len(), 1, "one failed report: {:?}", o.reports);
    f[0].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn integers_shrink_to_the_boundary() {
    let e = env();
    for seed in [1, 2, 3, 42, 1234] {
        let o = check(
            &e,
            "prop.check('below 100', prop.int(0, 100000), function(x) return x < 100 end, {runs = 300})",
            seed,
        )
        .await;
        let f = failure(&o);
        assert_eq!(f["counterexample"], json!(100), "seed {seed}: {f}");
        let msg = o.result.as_ref().unwrap_err().message.clone();
        assert!(msg.contains("counterexample 100"), "{msg}");
    }
    // Negative side: shrinks towards zero from below.
    let o = check(
        &e,
        "prop.check('above -50', prop.int(-100000, 100000), function(x) return x > -50 end, {runs = 500})",
        7,
    )
    .await;
    assert_eq!(failure(&o)["counterexample"], json!(-50));
}

#[tokio::test(flavor = "multi_thread")]
async fn lists_shrink_to_one_minimal_element() {
    let e = env();
    for seed in [5, 6, 7] {
        let o = check(
            &e,
            "prop.check('small sum', prop.list(prop.int(0, 100), {max = 30}), function(xs)
               local s = 0
               for _, x in ipairs(xs) do s = s + x end
               return s < 10
             end, {runs = 300})",
            seed,
        )
        .await;
        let f = failure(&o);
        assert_eq!(f["counterexample"], json!([10]), "seed {seed}: {f}");
        assert!(f["shrinks"].as_i64().unwrap() > 0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn strings_and_records_shrink() {
    let e = env();
    let o = check(
        &e,
        "prop.check('no b', prop.string{alphabet = 'abc', max = 40}, function(s) return not s:find('b') end, {runs = 300})",
        9,
    )
    .await;
    assert_eq!(failure(&o)["counterexample"], json!("b"));

    // A bug that needs two fields: shrinks both to the boundary.
    let o = check(
        &e,
        "prop.check('adults have no name', prop.record{age = prop.int(0, 120), name = prop.string{alphabet = 'alnum', max = 10}},
           function(p) return not (p.age >= 18 and #p.name > 0) end, {runs = 400})",
        11,
    )
    .await;
    assert_eq!(
        failure(&o)["counterexample"],
        json!({"age": 18, "name": "a"})
    );

    // An error raised by the property counts as a failure and is reported with the case.
    let o = check(
        &e,
        "prop.check('divides', prop.int(-10, 10), function(x) if x == 0 then error('zero!') end return true end, {runs = 400})",
        3,
    )
    .await;
    let f = failure(&o);
    assert_eq!(f["counterexample"], json!(0));
    assert!(f["error"].as_str().unwrap().contains("zero!"), "{f}");
}

#[tokio::test(flavor = "multi_thread")]
async fn japanese_strings_are_valid_utf8_and_shrink_to_one_character() {
    let e = env();
    let o = check(
        &e,
        "local out = {}
         for i = 1, 300 do out[i] = prop.sample(prop.string{alphabet = 'japanese', min = 1, max = 20}, i) end
         return out",
        1,
    )
    .await;
    let samples = o.result.expect("samples");
    let samples = samples.as_array().unwrap();
    assert_eq!(samples.len(), 300);
    let (mut kana, mut kanji) = (0, 0);
    for s in samples {
        // Arriving as a JSON string already proves valid UTF-8 (invalid text cannot be encoded).
        let s = s.as_str().unwrap();
        assert!(!s.is_empty() && s.chars().count() <= 20, "{s:?}");
        for c in s.chars() {
            let cp = c as u32;
            let ok = (0x3042..=0x3093).contains(&cp)
                || (0x30A2..=0x30F3).contains(&cp)
                || (0x4E00..=0x9FAF).contains(&cp)
                || matches!(cp, 0x30FC | 0x3001 | 0x3002)
                || (0xFF10..=0xFF19).contains(&cp);
            assert!(ok, "unexpected character {c:?} (U+{cp:04X}) in {s:?}");
            if (0x4E00..=0x9FAF).contains(&cp) {
                kanji += 1;
            } else if cp < 0x3100 {
                kana += 1;
            }
        }
    }
    assert!(kana > 100 && kanji > 100, "kana {kana}, kanji {kanji}");

    // Byte length is not character length: the minimal counterexample is one simple character.
    let o = check(
        &e,
        "prop.check('bytes are chars', prop.string{alphabet = 'japanese'}, function(s) return #s == utf8.len(s) end)",
        21,
    )
    .await;
    assert_eq!(failure(&o)["counterexample"], json!("あ"));
}

#[tokio::test(flavor = "multi_thread")]
async fn seeds_repeat_and_passing_properties_report_their_runs() {
    let e = env();
    let src = "prop.check('p', prop.list(prop.int(-1000, 1000)), function(xs) return #xs < 5 end, {runs = 200})";
    let a = failure(&check(&e, src, 77).await);
    let b = failure(&check(&e, src, 77).await);
    assert_eq!(a, b, "the same seed gives the same failure");

    let o = check(
        &e,
        "prop.check('reverse twice', prop.list(prop.string{alphabet = 'unicode'}), function(xs)
           local r, rr = {}, {}
           for i = #xs, 1, -1 do r[#r + 1] = xs[i] end
           for i = #r, 1, -1 do rr[#rr + 1] = r[i] end
           for i = 1, #xs do if rr[i] ~= xs[i] then return false end end
           return true
         end, {runs = 150})
         return 'done'",
        5,
    )
    .await;
    assert_eq!(o.result.unwrap(), json!("done"));
    assert_eq!(o.reports.len(), 1);
    assert_eq!(o.reports[0]["ok"], json!(true));
    assert_eq!(o.reports[0]["runs"], json!(150));

    // Tuples pass separate arguments; a bad generator argument is a clear error.
    let o = check(
        &e,
        "prop.check('commutes', prop.tuple(prop.int(), prop.int()), function(a, b) return a + b == b + a end)",
        1,
    )
    .await;
    assert!(o.result.is_ok(), "{:?}", o.result);
    let o = check(&e, "prop.check('x', 5, function() end)", 1).await;
    let msg = o.result.unwrap_err().message;
    assert!(msg.contains("expected a generator"), "{msg}");
}
