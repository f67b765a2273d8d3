//! The project's one Chromium harness (Rust side): runs `tests/browser/driver.mjs` (Node +
//! playwright-core driving Debian's headless `/usr/bin/chromium`, set up by
//! `scripts/peers/chromium.sh`) and talks to it one JSON line at a time.
//!
//! Include it with `#[path = "common/browser.rs"] mod browser;` next to `mod common;`.
//!
//! - [`Browser::launch`]: `None` (after printing "skipped: peer missing") when Chromium or the
//!   driver's node_modules are missing, unless `CI` or `ICHIBASE_REQUIRE_PEERS` is set (then it
//!   panics);
//! - [`Browser::page`] → a [`Page`] in its own browser context (fresh cookies and storage);
//! - [`Page::goto`], [`Page::eval`], [`Page::wait_for`] (poll a JS expression until truthy),
//!   [`Page::click`], [`Page::fill`], [`Page::hover`], [`Page::press`], [`Page::select`], [`Page::viewport`] — each optionally inside the iframe a CSS selector names
//!   (`Some("section[data-ui=x] iframe")`); [`Page::requests`] (every request the page and its
//!   frames made: url, method, frame, headers), [`Page::console`].
//!
//! [`Page::cdp`] sends a Chrome DevTools Protocol command (virtual WebAuthn authenticators).
//!
//! The browser's network is limited to loopback: 127.0.0.1, and `localhost` and `*.localhost`
//! mapped to it (a dead proxy for every other host, no DNS).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

struct Io {
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    next: u64,
}

pub struct Browser {
    child: Child,
    io: Arc<Mutex<Io>>,
}

/// Longest one driver command may take (the driver has its own, shorter, timeouts).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

fn peers_required() -> bool {
    std::env::var_os("CI").is_some() || std::env::var_os("ICHIBASE_REQUIRE_PEERS").is_some()
}

impl Browser {
    pub fn launch() -> Option<Browser> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let driver = std::env::var_os("ICHIBASE_BROWSER_DRIVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("tests/browser/driver.mjs"));
        let chromium = std::env::var_os("ICHIBASE_CHROMIUM")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
        let modules = root.join("tests/browser/node_modules/playwright-core");
        let missing = if !chromium.exists() {
            Some(format!("no Chromium at {}", chromium.display()))
        } else if !modules.is_dir() {
            Some(format!("{} is missing (npm ci --prefix tests/browser)", modules.display()))
        } else {
            None
        };
        if let Some(why) = missing {
            if peers_required() {
                panic!("browser peer missing: {why}; run scripts/peers/chromium.sh (scripts/test does)");
            }
            eprintln!("skipped: peer missing ({why}; run scripts/peers/chromium.sh)");
            return None;
        }
        let mut child = Command::new("node")
            .arg(&driver)
            .env("ICHIBASE_CHROMIUM", &chromium)
            .current_dir(root.join("tests/browser"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("could not run node {}: {e}", driver.display()));
        let stdout: ChildStdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = rx
            .recv_timeout(COMMAND_TIMEOUT)
            .expect("the browser driver did not start");
        assert!(first.contains("ready"), "browser driver: {first}");
        let io = Io { stdin: child.stdin.take().unwrap(), lines: rx, next: 1 };
        Some(Browser { child, io: Arc::new(Mutex::new(io)) })
    }

    fn cmd(&self, mut m: Value) -> Result<Value, String> {
        let mut io = self.io.lock().unwrap();
        let id = io.next;
        io.next += 1;
        m["id"] = json!(id);
        writeln!(io.stdin, "{m}").map_err(|e| format!("driver gone: {e}"))?;
        io.stdin.flush().ok();
        loop {
            let line = io
                .lines
                .recv_timeout(COMMAND_TIMEOUT)
                .map_err(|e| format!("no answer from the browser driver to {m}: {e}"))?;
            let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
            if v["id"] != json!(id) {
                continue;
            }
            return if v["ok"] == json!(true) {
                Ok(v["value"].clone())
            } else {
                Err(v["error"].as_str().unwrap_or("error").to_string())
            };
        }
    }

    pub fn version(&self) -> String {
        self.cmd(json!({"cmd": "version"})).unwrap().as_str().unwrap_or_default().to_string()
    }

    pub fn page(&self) -> Page<'_> {
        let id = self.cmd(json!({"cmd": "newPage"})).expect("new page");
        Page { browser: self, id: id.as_u64().unwrap() }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.cmd(json!({"cmd": "quit"}));
        for _ in 0..100 {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Page<'a> {
    browser: &'a Browser,
    id: u64,
}

impl Page<'_> {
    fn cmd(&self, mut m: Value) -> Result<Value, String> {
        m["page"] = json!(self.id);
        self.browser.cmd(m)
    }

    /// Navigate; the error (e.g. `net::ERR_PROXY_CONNECTION_FAILED` for a host other than
    /// 127.0.0.1) instead of a panic.
    pub fn try_goto(&self, url: &str) -> Result<(), String> {
        self.cmd(json!({"cmd": "goto", "url": url, "timeout": 30000})).map(|_| ())
    }

    pub fn goto(&self, url: &str) {
        self.cmd(json!({"cmd": "goto", "url": url})).unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    /// Evaluate a JS expression (in the page, or in the iframe `frame` selects).
    pub fn try_eval(&self, frame: Option<&str>, js: &str) -> Result<Value, String> {
        self.cmd(json!({"cmd": "eval", "js": js, "frame": frame}))
    }

    pub fn eval(&self, frame: Option<&str>, js: &str) -> Value {
        self.try_eval(frame, js).unwrap_or_else(|e| panic!("eval {js}: {e}"))
    }

    /// Poll `js` until it is truthy (at most `secs` seconds); its value, or the error.
    pub fn try_wait_for(&self, frame: Option<&str>, js: &str, secs: u64) -> Result<Value, String> {
        self.cmd(json!({"cmd": "waitFor", "js": js, "frame": frame, "timeout": secs * 1000}))
    }

    pub fn wait_for(&self, frame: Option<&str>, js: &str, secs: u64) -> Value {
        self.try_wait_for(frame, js, secs).unwrap_or_else(|e| {
            let console = self.console();
            panic!("{e}\n--- browser console\n{}", console.join("\n"))
        })
    }

    pub fn click(&self, frame: Option<&str>, selector: &str) {
        self.cmd(json!({"cmd": "click", "selector": selector, "frame": frame}))
            .unwrap_or_else(|e| panic!("click {selector}: {e}"));
    }

    /// Move the mouse over the element (a real hover: `mouseover`/`mouseenter`, `:hover`).
    pub fn hover(&self, frame: Option<&str>, selector: &str) {
        self.cmd(json!({"cmd": "hover", "selector": selector, "frame": frame}))
            .unwrap_or_else(|e| panic!("hover {selector}: {e}"));
    }

    /// Focus the element and press `key` (Playwright key names: `Enter`, `Tab`, `ArrowRight`,
    /// `Control+Enter`).
    pub fn press(&self, frame: Option<&str>, selector: &str, key: &str) {
        self.cmd(json!({"cmd": "press", "selector": selector, "key": key, "frame": frame}))
            .unwrap_or_else(|e| panic!("press {key} on {selector}: {e}"));
    }

    /// Choose the option whose value (or label) is `value` in a `<select>`.
    pub fn select(&self, frame: Option<&str>, selector: &str, value: &str) {
        self.cmd(json!({"cmd": "select", "selector": selector, "value": value, "frame": frame}))
            .unwrap_or_else(|e| panic!("select {value} in {selector}: {e}"));
    }

    /// Resize the page's viewport (CSS pixels).
    pub fn viewport(&self, width: u32, height: u32) {
        self.cmd(json!({"cmd": "viewport", "width": width, "height": height}))
            .unwrap_or_else(|e| panic!("viewport {width}x{height}: {e}"));
    }

    pub fn fill(&self, frame: Option<&str>, selector: &str, value: &str) {
        self.cmd(json!({"cmd": "fill", "selector": selector, "value": value, "frame": frame}))
            .unwrap_or_else(|e| panic!("fill {selector}: {e}"));
    }

    /// Send a Chrome DevTools Protocol command to the page (e.g. `WebAuthn.enable`); its result.
    pub fn cdp(&self, method: &str, params: Value) -> Value {
        self.cmd(json!({"cmd": "cdp", "method": method, "params": params}))
            .unwrap_or_else(|e| panic!("cdp {method}: {e}"))
    }

    /// Every request the page and its frames made so far.
    pub fn requests(&self) -> Vec<Value> {
        self.cmd(json!({"cmd": "requests"})).unwrap().as_array().cloned().unwrap_or_default()
    }

    pub fn console(&self) -> Vec<String> {
        self.cmd(json!({"cmd": "console"}))
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .collect()
    }
}

impl Drop for Page<'_> {
    fn drop(&mut self) {
        let _ = self.cmd(json!({"cmd": "closePage"}));
    }
}
