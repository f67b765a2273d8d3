//! Start and stop as a new user meets them (issue 14.3, 14.9, 14.10): a failed start creates
//! nothing and spends no one-time key; one server per data directory; CLI commands do not create
//! data directories by accident; Ctrl-C stops reads at once and a second one exits at once.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, client, post};

fn ichibase() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ichibase"));
    c.env_remove("ICHIBASE_ADMIN_KEY")
        .env_remove("ICHIBASE_CONFIG")
        .env("ICHIBASE_LOG", "warn");
    c
}

fn wait_exit(child: &mut std::process::Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_failed_first_start_creates_nothing_and_keeps_the_key_for_the_real_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    // The port is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = ichibase()
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot listen"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ik_"), "no key was shown");
    assert!(!data.exists(), "a failed start created the data directory");
    // A guessable configured key is refused before anything is created, too.
    let out = ichibase()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("ICHIBASE_ADMIN_KEY", format!("ik_{}", "a".repeat(21)))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!data.exists(), "a refused configuration created the data directory");
    // The real first start shows the key, and it works.
    drop(taken);
    let mut child = ichibase()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut key, mut url) = (None, None);
    for l in lines.by_ref() {
        let l = l.unwrap();
        if let Some(k) = l.trim().strip_prefix("ichibase:").map(str::trim).filter(|k| k.starts_with("ik_")) {
            key = Some(k.to_string());
        }
        if let Some(u) = l.strip_prefix("ichibase listening on ") {
            url = Some(u.trim().to_string());
            break;
        }
    }
    let (key, url) = (key.expect("the first real start shows the key"), url.unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let r = rt.block_on(post(&common::client_with_token(&key), &url, &[], "SELECT auth_role()"));
    assert_eq!(r.body, "admin\n");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn one_server_per_data_directory() {
    let s = Server::start(&[]);
    let started = Instant::now();
    let out = ichibase()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&s.data_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another ichibase process"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(20));
    let r = post(&client(), &s.url, &[], "SELECT 1").await;
    assert_eq!(r.status, 200, "the first server is unaffected");
}

#[test]
fn commands_that_read_a_data_directory_do_not_create_one() {
    let dir = tempfile::tempdir().unwrap();
    for args in [vec!["fn", "list"], vec!["fn", "rollback", "f"], vec!["archive"]] {
        let missing = dir.path().join(format!("typo-{}", args.join("-")));
        let out = ichibase().args(&args).arg("--data-dir").arg(&missing).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("not an ichibase data directory"), "{args:?}: {stderr}");
        assert!(!missing.exists(), "{args:?} created {}", missing.display());
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_stops_a_long_read_at_once() {
    let mut s = Server::start(&["--max-execution-time", "30"]);
    let url = s.url.clone();
    let long = tokio::spawn(async move {
        post(
            &client(),
            &url,
            &[],
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let sent = Instant::now();
    signal(s.pid(), "INT");
    let st = wait_exit(&mut s.child, Duration::from_secs(20)).expect("the server did not stop");
    assert!(st.success(), "{st:?}");
    assert!(sent.elapsed() < Duration::from_secs(20), "stopping took {:?}", sent.elapsed());
    let _ = long.await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_exits_at_once() {
    let mut s = Server::start(&["--max-execution-time", "30", "--shutdown-grace-secs", "30"]);
    let c = client();
    common::ok(&c, &s.url, "CREATE TABLE t(x)").await;
    let url = s.url.clone();
    // A long write (the admin's writes are not capped) keeps the graceful shutdown waiting.
    let long = tokio::spawn(async move {
        post(
            &client(),
            &url,
            &[],
            "INSERT INTO t SELECT x FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c)",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    signal(s.pid(), "INT");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(s.child.try_wait().unwrap().is_none(), "the first signal waits for the write");
    let sent = Instant::now();
    signal(s.pid(), "INT");
    let st = wait_exit(&mut s.child, Duration::from_secs(10)).expect("a second signal must exit at once");
    assert_eq!(st.code(), Some(130));
    assert!(sent.elapsed() < Duration::from_secs(10));
    let _ = long.await;
}

#[test]
fn logs_written_to_a_file_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let mut child = ichibase()
        .env("ICHIBASE_LOG", "info")
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("d"))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    for l in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        if l.unwrap().starts_with("ichibase listening on ") {
            break;
        }
    }
    signal(child.id(), "TERM");
    wait_exit(&mut child, Duration::from_secs(20)).expect("stopped");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("listening"), "{text}");
    assert!(!text.contains('\u{1b}'), "ANSI escapes in a log file: {text:?}");
}
