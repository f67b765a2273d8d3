//! Test harness shared by every file in `tests/` and every bench in `benches/` (there as
//! `#[path = "../tests/common/mod.rs"] mod common;`): run the real `ichibase` binary on an
//! ephemeral 127.0.0.1 port with its own data directory, and talk to it with a real HTTP client.
//!
//! - server: [`Server::start`], [`Server::start_in`];
//! - clients: [`client`] (admin), [`client_with_token`], [`anon_client`];
//! - SQL: [`post`], [`get`], [`ok`] (must answer 200);
//! - any endpoint: [`request`] (raw body), [`json_request`] / [`jpost`] (JSON body), [`api`]
//!   (status and JSON answer), [`read`];
//! - identities: [`signup`] / [`signup_with`] (a signed-in [`User`]), [`signup_and_signin`],
//!   [`signin`], [`password_of`], [`grant`];
//! - Lua: [`put_fn`] (deploy), [`call_fn`] (call);
//! - WebSockets: [`ws`] (open, send, receive JSON frames).
#![allow(dead_code)]

pub mod ws;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The admin API key every test server is started with (`ICHIBASE_ADMIN_KEY`).
pub const ADMIN_KEY: &str = "ik_af0594b7328f76f30193e94c1a44db3255d62438036389ec";

pub struct Server {
    pub child: Child,
    pub url: String,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// Start with a fresh data directory and extra `serve` flags.
    pub fn start(extra: &[&str]) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut s = Server::start_in(&dir, extra, &[]);
        s._tmp = Some(tmp);
        s
    }

    /// Start on `data_dir` with extra flags and environment variables.
    pub fn start_in(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        // `ICHIBASE_SERVER_BIN`: another build of the server (benchmarks compare two builds
        // with the same client binary this way); default: the one cargo built with the tests.
        let bin = std::env::var_os("ICHIBASE_SERVER_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_ichibase").into());
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra);
        cmd.env_remove("ICHIBASE_CONFIG")
            .env("ICHIBASE_LOG", "warn")
            .env("ICHIBASE_ADMIN_KEY", ADMIN_KEY);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.current_dir(data_dir);
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn ichibase");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let url = loop {
            let line = lines
                .next()
                .expect("server exited before listening")
                .unwrap();
            if let Some(rest) = line.strip_prefix("ichibase listening on ") {
                break rest.trim().to_string();
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            url,
            data_dir: data_dir.to_path_buf(),
            _tmp: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the server process, bytes.
    pub fn rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    }

    /// Send SIGTERM and wait for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe_kill(self.pid(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "server did not stop within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn unsafe_kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A response read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    /// ClickHouse error code from the header.
    pub fn code(&self) -> Option<u32> {
        self.header("x-clickhouse-exception-code")
            .and_then(|c| c.parse().ok())
    }
}

/// A client authenticated as the admin (Bearer API key).
pub fn client() -> reqwest::Client {
    client_with_token(ADMIN_KEY)
}

/// A client sending `Authorization: Bearer <token>` on every request.
pub fn client_with_token(token: &str) -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(h)
        .pool_max_idle_per_host(64)
        .build()
        .unwrap()
}

/// A client without credentials (the `anon` role).
pub fn anon_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap()
}

/// Read a response whole (status, headers, body).
pub async fn read(r: reqwest::Response) -> Resp {
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.text().await.unwrap();
    Resp {
        status,
        headers,
        body,
    }
}

/// POST `sql` to `/` with URL arguments.
pub async fn post(c: &reqwest::Client, base: &str, args: &[(&str, &str)], sql: &str) -> Resp {
    read(
        c.post(format!("{base}/"))
            .query(args)
            .body(sql.to_string())
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// GET `/` with URL arguments.
pub async fn get(c: &reqwest::Client, base: &str, args: &[(&str, &str)]) -> Resp {
    read(c.get(format!("{base}/")).query(args).send().await.unwrap()).await
}

/// SQL POST to `/` that must answer 200; returns the body.
pub async fn ok(c: &reqwest::Client, base: &str, sql: &str) -> String {
    let r = post(c, base, &[], sql).await;
    assert_eq!(r.status, 200, "{sql}: {}", r.body);
    r.body
}

/// Deploy a Lua function (`PUT /fn/{name}`).
pub async fn put_fn(c: &reqwest::Client, base: &str, name: &str, src: &str) -> Resp {
    read(c.put(format!("{base}/fn/{name}")).body(src.to_string()).send().await.unwrap()).await
}

/// Call a Lua function (`POST /fn/{name}`) with a JSON input.
pub async fn call_fn(c: &reqwest::Client, base: &str, name: &str, input: serde_json::Value) -> Resp {
    read(
        c.post(format!("{base}/fn/{name}"))
            .body(input.to_string())
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// Create an account and sign in: `POST /auth/signup` (which answers the same whether or not
/// the email had an account, without tokens), then `POST /auth/signin`. Returns the sign-in
/// answer (`access_token`, `refresh_token`, `session_id`, `user`).
pub async fn signup_and_signin(base: &str, email: &str, password: &str) -> serde_json::Value {
    let c = anon_client();
    let body = serde_json::json!({"email": email, "password": password, "device": "test"});
    let r = read(c.post(format!("{base}/auth/signup")).json(&body).send().await.unwrap()).await;
    assert_eq!(r.status, 200, "signup {email}: {}", r.body);
    let r = read(c.post(format!("{base}/auth/signin")).json(&body).send().await.unwrap()).await;
    assert_eq!(r.status, 200, "signin {email}: {}", r.body);
    r.json()
}

/// `method url` with an optional raw body; the whole answer.
pub async fn request(
    c: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Option<String>,
) -> Resp {
    let mut rb = c.request(method, url);
    if let Some(b) = body {
        rb = rb.body(b);
    }
    read(rb.send().await.unwrap()).await
}

/// `method url` with an optional JSON body; the whole answer.
pub async fn json_request(
    c: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Option<serde_json::Value>,
) -> Resp {
    let mut rb = c.request(method, url);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    read(rb.send().await.unwrap()).await
}

/// POST a JSON body to `{base}{path}`; the whole answer.
pub async fn jpost(c: &reqwest::Client, base: &str, path: &str, body: serde_json::Value) -> Resp {
    json_request(c, reqwest::Method::POST, format!("{base}{path}"), Some(body)).await
}

/// A JSON API call (`method` is "GET", "DELETE", anything else is POST): the status and the
/// answer as JSON, or `{"text": <body>}` when the answer is not JSON.
pub async fn api(
    c: &reqwest::Client,
    method: &str,
    url: String,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let m = match method {
        "GET" => reqwest::Method::GET,
        "DELETE" => reqwest::Method::DELETE,
        _ => reqwest::Method::POST,
    };
    let r = json_request(c, m, url, body).await;
    let v = serde_json::from_str(&r.body).unwrap_or_else(|_| serde_json::json!({"text": r.body}));
    (r.status, v)
}

/// The password tests give `email` unless they need another: `password-of-<email>`.
pub fn password_of(email: &str) -> String {
    format!("password-of-{email}")
}

/// `POST /auth/signin` with `{"email", "password"}` (no device); the whole answer, unchecked.
pub async fn signin(c: &reqwest::Client, base: &str, email: &str, password: &str) -> Resp {
    jpost(
        c,
        base,
        "/auth/signin",
        serde_json::json!({"email": email, "password": password}),
    )
    .await
}

/// A signed-up, signed-in user.
pub struct User {
    /// `user.id` of the sign-in answer.
    pub id: String,
    /// The access token.
    pub token: String,
    /// The refresh token.
    pub refresh: String,
    /// A client sending the access token.
    pub client: reqwest::Client,
    /// The whole sign-in answer.
    pub signin: serde_json::Value,
}

/// Sign up `email` with [`password_of`] and sign in ([`signup_and_signin`]).
pub async fn signup(base: &str, email: &str) -> User {
    signup_with(base, email, &password_of(email)).await
}

/// Sign up `email` with `password` and sign in ([`signup_and_signin`]).
pub async fn signup_with(base: &str, email: &str, password: &str) -> User {
    let j = signup_and_signin(base, email, password).await;
    let token = j["access_token"].as_str().unwrap().to_string();
    User {
        id: j["user"]["id"].as_str().unwrap().to_string(),
        refresh: j["refresh_token"].as_str().unwrap().to_string(),
        client: client_with_token(&token),
        token,
        signin: j,
    }
}

/// `POST /admin/grants` that must answer 200 (`c` is an admin client).
pub async fn grant(c: &reqwest::Client, base: &str, object: &str, role: &str, privileges: &[&str]) {
    let r = jpost(
        c,
        base,
        "/admin/grants",
        serde_json::json!({"object": object, "role": role, "privileges": privileges}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Poll `f` until it returns `Some`, for at most `secs` seconds (generous on a loaded machine:
/// the bound is a ceiling, not a timing assertion).
pub async fn wait_for<T, F, Fut>(what: &str, secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out after {secs} s waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The JSON lines a peer (the SMTP sink) has written to `out` so far; a last line without its
/// newline is still being written and is not there yet.
pub fn mails(out: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a mail line that is not JSON ({e}): {l}")))
        .collect()
}
