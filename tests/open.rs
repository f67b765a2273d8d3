//! `ichibase open` (issue 26, the one-file app): the data lands in the platform's data
//! directory, the browser is started with a one-time sign-in link that sets the owner's session
//! cookie and leads to the canvas, the link works once, and a taken port falls back to a free
//! one.


use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Open {
    child: Child,
    base: String,
    link: String,
}

impl Drop for Open {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `ichibase open` with HOME and XDG_DATA_HOME in `home`, and `$BROWSER` a script that
/// writes the URL it is given to `home/opened`.
fn start_open(home: &std::path::Path, extra: &[&str]) -> Open {
    let browser = home.join("browser.sh");
    std::fs::write(
        &browser,
        format!("#!/bin/sh\nprintf '%s' \"$1\" > '{}'\n", home.join("opened.tmp").display())
            + &format!("mv '{}' '{}'\n", home.join("opened.tmp").display(), home.join("opened").display()),
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&browser, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_ichibase"))
        .arg("open")
        .args(extra)
        .current_dir(home)
        .env("HOME", home)
        .env("XDG_DATA_HOME", home.join("xdg"))
        .env("BROWSER", &browser)
        .env_remove("ICHIBASE_DATA_DIR")
        .env_remove("ICHIBASE_CONFIG")
        .env_remove("ICHIBASE_ADMIN_KEY")
        .env_remove("ICHIBASE_LISTEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut base, mut link) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(120);
    while base.is_none() || link.is_none() {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("ichibase open printed its address and link");
        if let Some(a) = line.strip_prefix("ichibase listening on ") {
            base = Some(a.trim().to_string());
        }
        if let Some(i) = line.find("http://").filter(|_| line.contains("sign-in link")) {
            link = Some(line[i..].trim().to_string());
        }
    }
    Open {
        child,
        base: base.unwrap(),
        link: link.unwrap(),
    }
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_signs_the_owner_in_once_with_data_in_the_platform_directory() {
    let home = tempfile::tempdir().unwrap();
    let app = start_open(home.path(), &["--listen", "127.0.0.1:0"]);
    // The data directory is the platform's (XDG_DATA_HOME/ichibase), nothing in the cwd.
    let data = home.path().join("xdg/ichibase");
    assert!(data.join("ichibase.db").exists(), "data in {}", data.display());
    assert!(!home.path().join("ichibase-data").exists());
    // The browser was started with the link.
    let opened = home.path().join("opened");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !opened.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(std::fs::read_to_string(&opened).unwrap(), app.link);
    assert!(app.link.starts_with(&format!("{}/open/", app.base)), "{}", app.link);

    // Following it: 303 to the canvas with the owner's session cookie.
    let c = no_redirects();
    let r = c.get(&app.link).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/canvas");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    let pair = cookie.split(';').next().unwrap().to_string();
    // The cookie is a real session of the owner, an admin (the canvas signs in with it).
    let me: serde_json::Value = c
        .get(format!("{}/auth/me", app.base))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["claims"]["email"], "owner@localhost", "{me}");
    assert_eq!(me["role"], "admin", "{me}");
    // The canvas page answers.
    let r = c.get(format!("{}/canvas", app.base)).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // The link works once; a made-up one never.
    for url in [app.link.clone(), format!("{}/open/{}", app.base, "A".repeat(43))] {
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 401, "{url}");
        assert!(r.headers().get("set-cookie").is_none());
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["name"], "AUTHENTICATION_FAILED", "{body}");
    }
    drop(app);

    // A second run keeps the data and the owner, and makes a new link.
    let again = start_open(home.path(), &["--listen", "127.0.0.1:0", "--no-browser"]);
    let r = c.get(&again.link).send().await.unwrap();
    assert_eq!(r.status(), 303);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_falls_back_to_a_free_one() {
    let home = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let app = start_open(
        home.path(),
        &["--listen", &format!("127.0.0.1:{port}"), "--no-browser", "--owner", "me@example.com"],
    );
    assert_ne!(app.base, format!("http://127.0.0.1:{port}"));
    assert!(!home.path().join("opened").exists(), "--no-browser starts no browser");
    let r = no_redirects().get(&app.link).send().await.unwrap();
    assert_eq!(r.status(), 303);
}

/// Every asset is inside the executable: a copy of the binary alone, started from an empty
/// directory, serves the canvas shell, its script and the vendored React.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_alone_serves_its_assets() {
    let home = tempfile::tempdir().unwrap();
    let exe = home.path().join("ichibase");
    std::fs::copy(env!("CARGO_BIN_EXE_ichibase"), &exe).unwrap();
    let mut child = Command::new(&exe)
        .args(["open", "--no-browser", "--listen", "127.0.0.1:0", "--data-dir", "data"])
        .current_dir(home.path())
        .env("HOME", home.path())
        .env_remove("ICHIBASE_CONFIG")
        .env_remove("ICHIBASE_ADMIN_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let base = loop {
        let line = lines.next().expect("an address").unwrap();
        if let Some(a) = line.strip_prefix("ichibase listening on ") {
            break a.trim().to_string();
        }
    };
    let c = no_redirects();
    let shell = c.get(format!("{base}/canvas")).send().await.unwrap();
    assert_eq!(shell.status(), 200);
    let html = shell.text().await.unwrap();
    // Every script and stylesheet the shell page names is served from the binary.
    let mut assets = 0;
    for part in html.split(['"', '\'']) {
        if part.starts_with("/canvas/assets/") {
            let r = c.get(format!("{base}{part}")).send().await.unwrap();
            assert_eq!(r.status(), 200, "{part}");
            assert!(!r.bytes().await.unwrap().is_empty(), "{part}");
            assets += 1;
        }
    }
    assert!(assets >= 2, "the shell names its assets: {html}");
    // The frame origin's page and the React it imports, too.
    let frame = html.split("data-frame-origin=\"").nth(1).unwrap().split('"').next().unwrap();
    let page = c.get(format!("{frame}/frame")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let page = page.text().await.unwrap();
    let mut vendored = 0;
    for part in page.split(['"', '\'']) {
        if part.starts_with("/vendor/") {
            let r = c.get(format!("{frame}{part}")).send().await.unwrap();
            assert_eq!(r.status(), 200, "{part}");
            vendored += 1;
        }
    }
    assert!(vendored >= 1, "the frame imports vendored React: {page}");
    assert!(home.path().join("data/ichibase.db").exists());
    let _ = child.kill();
    let _ = child.wait();
}
