//! `file.*` end to end: per-user prefixes, size limits, paths that try to escape, Markdown
//! notes with YAML and TOML front matter — against the local directory store and against the
//! S3-compatible server the replication tests use (moto).

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, call_fn, client, put_fn, signup};
use serde_json::{Value, json};

const SRC: &str = r#"
return function(input, ctx)
  local op = input.op
  if op == "put" then return file.put(input.path, input.content)
  elseif op == "get" then return {content = file.get(input.path)}
  elseif op == "list" then return file.list(input.prefix)
  elseif op == "delete" then return {deleted = file.delete(input.path)}
  elseif op == "mdw" then return file.md.write(input.path, input.meta, input.body, input.format)
  elseif op == "mdr" then return file.md.read(input.path)
  elseif op == "big" then return file.put("big.bin", string.rep("x", input.n))
  end
  error("unknown op")
end"#;

async fn run(c: &reqwest::Client, base: &str, input: Value) -> (u16, Value) {
    let r = call_fn(c, base, "files", input).await;
    (r.status, serde_json::from_str(&r.body).unwrap_or(json!({"text": r.body})))
}

async fn exercise(s: &Server) {
    let base = &s.url;
    let admin = client();
    assert_eq!(put_fn(&admin, base, "files", SRC).await.status, 200);
    let a = signup(base, "fa@example.com").await;
    let b = signup(base, "fb@example.com").await;
    // Put, get, list, delete in a user's own area.
    let (st, v) = run(&a.client, base, json!({"op": "put", "path": "notes/one.txt", "content": "hello"})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["size"], 5);
    run(&a.client, base, json!({"op": "put", "path": "notes/two.txt", "content": "日本語"})).await;
    let (_, v) = run(&a.client, base, json!({"op": "get", "path": "notes/one.txt"})).await;
    assert_eq!(v["content"], "hello");
    let (st, v) = run(&a.client, base, json!({"op": "list", "prefix": "notes"})).await;
    assert_eq!(st, 200, "{v}");
    let paths: Vec<&str> = v.as_array().unwrap().iter().map(|x| x["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["notes/one.txt", "notes/two.txt"]);
    assert_eq!(v[1]["size"], 9);
    // Another user sees nothing of it, and cannot reach it by any path.
    let (_, v) = run(&b.client, base, json!({"op": "list"})).await;
    assert_eq!(v, json!([]));
    let (_, v) = run(&b.client, base, json!({"op": "get", "path": "notes/one.txt"})).await;
    assert_eq!(v, json!({}), "missing file is nil");
    for p in [
        format!("../{}/notes/one.txt", a.id),
        format!("../../users/{}/notes/one.txt", a.id),
        "./x".into(),
        "a//b".into(),
        "a\\..\\b".into(),
        "%2e%2e/x".into(),
        "".into(),
        "x".repeat(600),
    ] {
        let (st, v) = run(&b.client, base, json!({"op": "get", "path": p})).await;
        assert_eq!(st, 400, "{p}: {v}");
        assert!(v.to_string().contains("bad path"), "{v}");
    }
    // Anonymous callers have no area.
    let (st, v) = run(&common::anon_client(), base, json!({"op": "list"})).await;
    assert!(st == 403 || st == 401, "{st} {v}");
    // Size limit (set to 64 KiB in these tests).
    let (st, v) = run(&a.client, base, json!({"op": "big", "n": 70000})).await;
    assert_eq!(st, 413, "{v}");
    assert!(v.to_string().contains("max_file_bytes"), "{v}");
    // Markdown notes: YAML and TOML front matter to and from Lua tables.
    let meta = json!({"title": "Preferences", "genres": ["jazz", "ジャズ"], "volume": 7, "nested": {"on": true}});
    for format in ["yaml", "toml"] {
        let path = format!("prefs-{format}.md");
        let (st, v) = run(&a.client, base, json!({"op": "mdw", "path": path, "meta": meta, "body": "# Hi\nbody text\n", "format": format})).await;
        assert_eq!(st, 200, "{v}");
        let (st, v) = run(&a.client, base, json!({"op": "mdr", "path": path})).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["meta"], meta, "{format}");
        assert_eq!(v["body"], "# Hi\nbody text\n");
        let (_, raw) = run(&a.client, base, json!({"op": "get", "path": path})).await;
        let raw = raw["content"].as_str().unwrap().to_string();
        assert!(raw.starts_with(if format == "yaml" { "---\n" } else { "+++\n" }), "{raw}");
    }
    // A note a person edited by hand.
    run(&a.client, base, json!({"op": "put", "path": "hand.md", "content": "---\ntitle: by hand\nlist:\n  - 1\n  - 2\n---\ntext"})).await;
    let (_, v) = run(&a.client, base, json!({"op": "mdr", "path": "hand.md"})).await;
    assert_eq!(v["meta"], json!({"title": "by hand", "list": [1, 2]}));
    run(&a.client, base, json!({"op": "put", "path": "broken.md", "content": "---\ntitle: [\n---\n"})).await;
    let (st, v) = run(&a.client, base, json!({"op": "mdr", "path": "broken.md"})).await;
    assert_eq!(st, 400, "{v}");
    assert!(v.to_string().contains("YAML front matter"), "{v}");
    // Delete.
    let (_, v) = run(&a.client, base, json!({"op": "delete", "path": "notes/one.txt"})).await;
    assert_eq!(v["deleted"], true);
    let (_, v) = run(&a.client, base, json!({"op": "delete", "path": "notes/one.txt"})).await;
    assert_eq!(v["deleted"], false);
    // Bad arguments.
    let (st, _) = run(&a.client, base, json!({"op": "put", "path": 5, "content": "x"})).await;
    assert_eq!(st, 400);
}

const FLAGS: &[&str] = &["--signup-open", "true"];

#[tokio::test]
async fn files_on_the_directory_store() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ichibase.toml"), "[files]\nmax_file_bytes = 65536\n").unwrap();
    let s = Server::start_in(dir.path(), FLAGS, &[]);
    exercise(&s).await;
    // The objects are plain files under <data-dir>/files/users/<id>/.
    let users = std::fs::read_dir(dir.path().join("files/users")).unwrap().count();
    assert_eq!(users, 1, "only the user who wrote has a directory");
}

fn moto() -> Option<PathBuf> {
    let p = std::env::var_os("ICHIBASE_MOTO_SERVER").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/ichibase-s3tools/venv/bin/moto_server")
    });
    if p.exists() {
        return Some(p);
    }
    if std::env::var_os("CI").is_some() || std::env::var_os("ICHIBASE_REQUIRE_PEERS").is_some() {
        panic!("moto_server not found: run ./scripts/test or set ICHIBASE_MOTO_SERVER");
    }
    None
}

struct Moto(Child);
impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn files_on_s3() {
    let Some(bin) = moto() else {
        eprintln!("skipped: peer missing (moto_server)");
        return;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _m = Moto(
        Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let endpoint = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let plain = reqwest::Client::new();
    loop {
        if let Ok(r) = plain.put(format!("{endpoint}/files-bucket")).send().await {
            if r.status().is_success() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "moto did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ichibase.toml"),
        format!("[files]\nmax_file_bytes = 65536\ns3_url = \"s3://files-bucket/app1\"\nendpoint = \"{endpoint}\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\n"),
    )
    .unwrap();
    let s = Server::start_in(dir.path(), FLAGS, &[]);
    exercise(&s).await;
    assert!(!dir.path().join("files").exists(), "nothing on the local disk");
    // The objects are in the bucket under the configured prefix.
    let r = plain.get(format!("{endpoint}/files-bucket?list-type=2&prefix=app1/users/")).send().await.unwrap();
    let body = r.text().await.unwrap();
    assert!(body.contains("prefs-yaml.md") && body.contains("/notes/two.txt"), "{body}");
}
