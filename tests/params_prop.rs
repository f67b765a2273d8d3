//! Property: any string bound as `{p:String}` comes back exactly and never changes the
//! statement it is bound into (it is a bound value, not SQL text).

mod common;

use proptest::prelude::*;

/// ClickHouse's escaping of a parameter value, as its clients send it.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\'' => out.push_str("\\'"),
            c => out.push(c),
        }
    }
    out
}

fn hostile() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "'",
        "\"",
        "`",
        ";",
        "--",
        "/*",
        "*/",
        "{p:String}",
        "{x:Int64}",
        "?",
        "?1",
        ":p",
        "$p",
        "@p",
        "\\",
        "\\N",
        "\\t",
        "\n",
        "\t",
        "\0",
        "DROP TABLE t",
        "') OR 1=1 --",
        "日本語",
        "FORMAT JSON",
        "UNION SELECT",
        "é",
        "\u{2028}",
        "%",
        "&",
        "=",
        "+",
        "#",
    ]);
    prop::collection::vec(
        prop_oneof![pieces.prop_map(str::to_string), any::<String>()],
        0..8,
    )
    .prop_map(|v| v.concat())
}

#[test]
fn strings_round_trip_and_never_change_the_statement() {
    let server = common::Server::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = common::client();
    let url = server.url.clone();
    rt.block_on(async {
        common::ok(&c, &url, "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)").await;
    });
    proptest!(ProptestConfig::with_cases(300), |(s in prop_oneof![any::<String>(), hostile()])| {
        let esc = escape(&s);
        let (select, insert, count) = rt.block_on(async {
            let select = common::post(&c, &url, &[("param_p", esc.as_str())],
                "SELECT {p:String} AS v, typeof({p:String}) AS t, (SELECT count(*) FROM t) AS n FORMAT JSONEachRow").await;
            let insert = common::post(&c, &url, &[("param_p", esc.as_str())],
                "INSERT INTO t(v) VALUES ({p:String}) RETURNING v FORMAT JSONEachRow").await;
            let count = common::ok(&c, &url, "SELECT count(*) FROM t").await;
            (select, insert, count)
        });
        prop_assert_eq!(select.status, 200, "{}", &select.body);
        prop_assert_eq!(select.body.lines().count(), 1, "exactly one row: {}", &select.body);
        let row: serde_json::Value = serde_json::from_str(&select.body).unwrap();
        prop_assert_eq!(row["v"].as_str(), Some(s.as_str()));
        prop_assert_eq!(row["t"].as_str(), Some("text"));
        let before: u64 = row["n"].as_str().unwrap().parse().unwrap();
        prop_assert_eq!(row.as_object().unwrap().len(), 3, "no extra columns");
        prop_assert_eq!(insert.status, 200, "{}", &insert.body);
        let ins: serde_json::Value = serde_json::from_str(&insert.body).unwrap();
        prop_assert_eq!(ins["v"].as_str(), Some(s.as_str()));
        prop_assert_eq!(count, format!("{}\n", before + 1), "the insert added exactly one row");
    });
}
