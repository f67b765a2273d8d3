//! Interop: the official ClickHouse JS client (`@clickhouse/client`) against the real binary.
//!
//! Runs `node tests/clickhouse-js/client_test.mjs <server url>`; the script prints one line per
//! check and exits non-zero if any check failed. Needs Node.js 20+ and
//! `npm ci --prefix tests/clickhouse-js`.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest the whole client script may run.
const TIMEOUT: Duration = Duration::from_secs(180);

#[test]
fn clickhouse_js_client() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("clickhouse-js");
    assert!(
        dir.join("node_modules")
            .join("@clickhouse")
            .join("client")
            .is_dir(),
        "{}/node_modules is missing: run `npm ci --prefix tests/clickhouse-js` (needs Node.js 20+) before this test",
        dir.display()
    );

    let server = common::Server::start(&[]);
    let mut child = Command::new("node")
        .arg(dir.join("client_test.mjs"))
        .arg(&server.url)
        .env("ICHIBASE_KEY", common::ADMIN_KEY)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("could not run `node` (Node.js 20+ must be on PATH): {e}"));

    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));

    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = stdout.join().unwrap();
    let stderr = stderr.join().unwrap();

    let Some(status) = status else {
        panic!(
            "client_test.mjs did not finish within {TIMEOUT:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
        );
    };
    assert!(
        status.success(),
        "client_test.mjs failed ({status})\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    // What was checked (shown with --nocapture).
    println!("{stdout}");
    if !stderr.is_empty() {
        eprintln!("{stderr}");
    }
}
