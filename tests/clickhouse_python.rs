//! Interop: the official ClickHouse Python client (`clickhouse-connect`) against the real
//! binary, with the client's defaults (session ids, lz4-compressed Native inserts, compressed
//! Native answers), plus pandas DataFrames and a 100k-row block stream.
//!
//! Runs `python tests/clickhouse-python/client_test.py <server url>`; the script prints one
//! line per check and exits non-zero if any check failed. The Python with `clickhouse-connect`
//! and `pandas` is `$ICHIBASE_CH_PYTHON`, else the venv scripts/test makes
//! (`$HOME/.cache/ichibase-chpy/venv/bin/python`).

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest the whole client script may run.
const TIMEOUT: Duration = Duration::from_secs(300);

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("ICHIBASE_CH_PYTHON") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_default();
    Path::new(&home).join(".cache/ichibase-chpy/venv/bin/python")
}

#[test]
fn clickhouse_python_client() {
    let py = python();
    assert!(
        py.exists(),
        "{} is missing: run scripts/test (it makes a venv with clickhouse-connect and pandas), or set ICHIBASE_CH_PYTHON",
        py.display()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("clickhouse-python")
        .join("client_test.py");

    let server = common::Server::start(&[]);
    let mut child = Command::new(&py)
        .arg(&script)
        .arg(&server.url)
        .env("ICHIBASE_KEY", common::ADMIN_KEY)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", py.display()));

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
            "client_test.py did not finish within {TIMEOUT:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
        );
    };
    assert!(
        status.success(),
        "client_test.py failed ({status})\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    println!("{stdout}");
    if !stderr.is_empty() {
        eprintln!("{stderr}");
    }
}
