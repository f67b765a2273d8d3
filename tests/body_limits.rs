//! Request-body limits per endpoint family (`[http] max_json_body`, `[http]
//! max_function_source`): a body at the limit is not refused for its size, one byte more is 413
//! `REQUEST_TOO_LARGE` in the JSON error shape naming the limit and the setting; malformed JSON
//! stays 400 `BAD_ARGUMENTS`.

mod common;

use common::{Resp, Server, anon_client, client, put_fn, request};
use reqwest::Method;

const JSON_LIMIT: usize = 100_000;
const SOURCE_LIMIT: usize = 50_000;

/// `json` padded with spaces (still valid JSON) to exactly `len` bytes.
fn padded(json: &str, len: usize) -> String {
    assert!(json.len() <= len);
    format!("{json}{}", " ".repeat(len - json.len()))
}

/// A Lua source of exactly `len` bytes.
fn source(len: usize) -> String {
    let code = "return function(input) return {ok = true} end\n-- ";
    format!("{code}{}", "x".repeat(len - code.len()))
}

fn assert_too_large(r: &Resp, what: &str, setting: &str, limit: usize) {
    assert_eq!(r.status, 413, "{what}: {}", r.body);
    assert_eq!(
        r.header("content-type"),
        Some("application/json; charset=UTF-8"),
        "{what}: {}",
        r.body
    );
    assert_eq!(
        r.header("x-clickhouse-exception-code"),
        Some("1001"),
        "{what}"
    );
    let v = r.json();
    assert_eq!(v["error"]["code"], 1001, "{what}: {v}");
    assert_eq!(v["error"]["name"], "REQUEST_TOO_LARGE", "{what}: {v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains(setting), "{what}: {msg}");
    assert!(msg.contains(&limit.to_string()), "{what}: {msg}");
    assert!(
        v["exception"].as_str().unwrap().contains(setting),
        "{what}: {v}"
    );
}

/// Every JSON endpoint family: (method, path, a small valid JSON body, anonymous?).
fn json_endpoints() -> Vec<(Method, &'static str, &'static str, bool)> {
    vec![
        (Method::POST, "/fn/echo", r#"{"x": 1}"#, false),
        (
            Method::POST,
            "/fn/echo/rollback",
            r#"{"version": 1}"#,
            false,
        ),
        (Method::POST, "/branches", r#"{"name": "b1"}"#, false),
        (Method::POST, "/branches/b1/apply", r#"{}"#, false),
        (Method::POST, "/admin/policies", r#"{}"#, false),
        (Method::POST, "/admin/grants", r#"{}"#, false),
        (
            Method::POST,
            "/admin/users",
            r#"{"email": "pad@example.com", "password": "pw-0123456789"}"#,
            false,
        ),
        (
            Method::POST,
            "/admin/keys",
            r#"{"name": "k", "role": "user"}"#,
            false,
        ),
        (Method::POST, "/admin/cdc", r#"{"table": "nope"}"#, false),
        (
            Method::POST,
            "/auth/signup",
            r#"{"email": "anon@example.com", "password": "pw-0123456789"}"#,
            true,
        ),
        (
            Method::POST,
            "/auth/signin",
            r#"{"email": "anon@example.com", "password": "pw-0123456789"}"#,
            true,
        ),
        (
            Method::POST,
            "/auth/refresh",
            r#"{"refresh_token": "x"}"#,
            true,
        ),
        (
            Method::POST,
            "/generate",
            r#"{"intent": "a notes service"}"#,
            false,
        ),
        (
            Method::POST,
            "/broadcast",
            r#"{"channel": "c", "payload": 1}"#,
            false,
        ),
        (Method::PUT, "/admin/analytics/views/v1", r#"{}"#, false),
    ]
}

#[tokio::test]
async fn configured_limits_per_family() {
    let dir = tempfile::tempdir().unwrap();
    let json_limit = JSON_LIMIT.to_string();
    let source_limit = SOURCE_LIMIT.to_string();
    let s = Server::start_in(
        dir.path(),
        &[],
        &[
            ("ICHIBASE_HTTP__MAX_JSON_BODY", json_limit.as_str()),
            ("ICHIBASE_HTTP__MAX_FUNCTION_SOURCE", source_limit.as_str()),
        ],
    );
    let admin = client();
    let anon = anon_client();
    let base = &s.url;

    // Function sources: at the limit deployed, one byte more refused.
    let r = put_fn(&admin, base, "echo", &source(SOURCE_LIMIT)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = put_fn(&admin, base, "echo", &source(SOURCE_LIMIT + 1)).await;
    assert_too_large(&r, "PUT /fn/echo", "max_function_source", SOURCE_LIMIT);
    // The source limit is its own, not the (larger) JSON limit.
    const { assert!(SOURCE_LIMIT < JSON_LIMIT) };

    for (method, path, json, anonymous) in json_endpoints() {
        let c = if anonymous { &anon } else { &admin };
        let what = format!("{method} {path}");
        let r = request(
            c,
            method.clone(),
            format!("{base}{path}"),
            Some(padded(json, JSON_LIMIT)),
        )
        .await;
        assert_ne!(r.status, 413, "{what} at the limit: {}", r.body);
        assert_ne!(
            r.header("x-clickhouse-exception-code"),
            Some("1001"),
            "{what} at the limit: {}",
            r.body
        );
        let r = request(
            c,
            method.clone(),
            format!("{base}{path}"),
            Some(padded(json, JSON_LIMIT + 1)),
        )
        .await;
        assert_too_large(&r, &what, "max_json_body", JSON_LIMIT);
    }

    // A chunked body (no Content-Length) is bounded while it is read.
    for (len, refused) in [(JSON_LIMIT, false), (JSON_LIMIT + 1, true)] {
        let body = padded("{}", len).into_bytes();
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            body.chunks(7_000).map(|c| Ok(c.to_vec())).collect();
        let r = common::read(
            admin
                .post(format!("{base}/admin/policies"))
                .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
                .send()
                .await
                .unwrap(),
        )
        .await;
        if refused {
            assert_too_large(&r, "chunked POST /admin/policies", "max_json_body", JSON_LIMIT);
        } else {
            assert_eq!(r.status, 400, "{}", r.body);
            assert_eq!(r.json()["error"]["name"], "BAD_ARGUMENTS", "{}", r.body);
        }
    }

    // Malformed JSON stays 400 BAD_ARGUMENTS in the JSON shape.
    for path in [
        "/admin/policies",
        "/fn/echo",
        "/branches/b1/apply",
        "/auth/signup",
    ] {
        let c = if path.starts_with("/auth") {
            &anon
        } else {
            &admin
        };
        let r = request(
            c,
            Method::POST,
            format!("{base}{path}"),
            Some("{not json".into()),
        )
        .await;
        assert_eq!(r.status, 400, "{path}: {}", r.body);
        assert_eq!(
            r.json()["error"]["name"],
            "BAD_ARGUMENTS",
            "{path}: {}",
            r.body
        );
    }

    // Identity is checked before the body is read: a non-admin is refused 403, not 413.
    let r = request(
        &anon,
        Method::POST,
        format!("{base}/admin/policies"),
        Some(padded("{}", JSON_LIMIT + 1)),
    )
    .await;
    assert!(
        r.status == 401 || r.status == 403,
        "{}: {}",
        r.status,
        r.body
    );
}

#[tokio::test]
async fn default_limits_are_documented_ones() {
    let s = Server::start(&[]);
    let admin = client();
    let base = &s.url;
    // axum's own 2 MB limit no longer applies: 3 MB bodies are not refused for their size.
    let r = put_fn(
        &admin,
        base,
        "echo",
        "return function(input) return input end",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    for path in ["/fn/echo", "/admin/policies", "/branches/b1/apply"] {
        let r = request(
            &admin,
            Method::POST,
            format!("{base}{path}"),
            Some(padded("{}", 3 << 20)),
        )
        .await;
        assert_ne!(r.status, 413, "{path}: {}", r.body);
        assert_ne!(
            r.header("x-clickhouse-exception-code"),
            Some("1001"),
            "{path}: {}",
            r.body
        );
        assert!(
            !r.body.contains("Could not read the body"),
            "{path}: {}",
            r.body
        );
    }
    // The function-source default is the store's limit (1 MiB).
    let r = put_fn(&admin, base, "big", &source(1 << 20)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = put_fn(&admin, base, "big", &source((1 << 20) + 1)).await;
    assert_too_large(&r, "PUT /fn/big", "max_function_source", 1 << 20);
}
