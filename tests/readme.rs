//! The README's examples run top to bottom on ONE fresh server (issue 14, acceptance).
//!
//! This test reads `README.md`, takes every fenced code block whose language is `sh` or `bash`
//! (indented fences inside lists included), and runs them all, in order, as one bash script
//! (`set -euo pipefail`, so a variable a block uses must have been set by an earlier block)
//! against one freshly started `ichibase serve` with default settings.
//!
//! Conventions (also stated in an HTML comment at the top of README.md):
//! - **`<!-- not-run -->`** on the line just before a fence (blank lines allowed in between):
//!   the block is not run (it needs a build, S3, a model provider, a second machine...). Blocks
//!   fenced as anything other than `sh`/`bash` (`text`, `lua`, `toml`, a bare fence) never run.
//! - **`<!-- file: NAME -->`** before a fence: the block's text is saved as `NAME` in the
//!   script's working directory (e.g. `notes.lua`, deployed later with `--data-binary @notes.lua`).
//! - `127.0.0.1:8080` and `localhost:8080` are replaced by the test server's address, and the
//!   placeholder `ik_...` by its admin key (the key a real first start prints).
//! - `curl` is a shell function that adds `-H "$K"` (the admin key, as the README says "the
//!   examples below leave out `-H "$K"`") unless the command already sends an `Authorization`
//!   header, and fails the script when curl fails or the answer is HTTP 400 or above. A curl
//!   command (starting on its line) whose line ends in a comment naming a status, e.g. `# 403`,
//!   must answer exactly that status.
//!
//! On failure the test prints the block (README line) that failed and every request so far with
//! its status and answer; `ICHIBASE_README_VERBOSE=1` prints them on success too.

mod common;

use common::*;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One fenced block of the README.
#[derive(Debug)]
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    lang: String,
    text: String,
    marker: Option<Marker>,
}

#[derive(Debug, PartialEq)]
enum Marker {
    NotRun,
    File(String),
}

/// Fenced blocks of a Markdown text with the marker comment before each, if any.
fn blocks(md: &str) -> Vec<Block> {
    let lines: Vec<&str> = md.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        let t = l.trim_start();
        if let Some(info) = t.strip_prefix("```") {
            let indent = l.len() - t.len();
            let lang = info.split_whitespace().next().unwrap_or("").to_string();
            let mut body = String::new();
            let mut j = i + 1;
            while j < lines.len() && lines[j].trim() != "```" {
                let b = lines[j];
                let strip = b.len() - b.trim_start().len();
                body.push_str(&b[strip.min(indent)..]);
                body.push('\n');
                j += 1;
            }
            assert!(j < lines.len(), "README.md:{}: fence never closed", i + 1);
            // The marker: the nearest non-blank line before the fence, if it is a comment.
            let mut k = i;
            let mut marker = None;
            while k > 0 {
                k -= 1;
                let p = lines[k].trim();
                if p.is_empty() {
                    continue;
                }
                if let Some(c) = p.strip_prefix("<!--").and_then(|c| c.strip_suffix("-->")) {
                    let c = c.trim();
                    marker = Some(if c == "not-run" {
                        Marker::NotRun
                    } else if let Some(name) = c.strip_prefix("file:") {
                        let name = name.trim();
                        assert!(
                            !name.is_empty() && !name.contains('/') && !name.starts_with('.'),
                            "README.md:{}: bad file name in {p}",
                            k + 1
                        );
                        Marker::File(name.to_string())
                    } else {
                        panic!(
                            "README.md:{}: unknown marker {p} before a code block \
                             (known: <!-- not-run -->, <!-- file: NAME -->)",
                            k + 1
                        )
                    });
                }
                break;
            }
            out.push(Block {
                line: i + 1,
                lang,
                text: body,
                marker,
            });
            i = j + 1;
        } else {
            i += 1;
        }
    }
    out
}

/// `ICHIBASE_EXPECT=NNN ` in front of a curl command whose line ends in `# NNN`.
fn expect_prefix(line: &str) -> String {
    let t = line.trim_start();
    if !t.starts_with("curl ") {
        return line.to_string();
    }
    if let Some(pos) = line.rfind('#') {
        let c = line[pos + 1..].trim_start();
        let digits: String = c.chars().take_while(|c| c.is_ascii_digit()).collect();
        if digits.len() == 3 && !c[3..].starts_with(|c: char| c.is_alphanumeric()) {
            let indent = &line[..line.len() - t.len()];
            return format!("{indent}ICHIBASE_EXPECT={digits} {t}");
        }
    }
    line.to_string()
}

const PRELUDE: &str = r#"set -euo pipefail
curl() {
  local a auth=
  for a in "$@"; do case "$a" in *Authorization:*) auth=1;; esac; done
  local hdr=(); [ -n "$auth" ] || hdr=(-H "$K")
  local body; body=$(mktemp)
  local code rc=0
  code=$(command curl -sS --max-time 120 "${hdr[@]}" -o "$body" -w '%{http_code}' "$@") || rc=$?
  cat "$body"
  { printf '+ curl'; printf ' %q' "$@"; printf '\n  -> HTTP %s\n' "$code"; head -c 1500 "$body"; echo; } >> "$ICHIBASE_README_LOG"
  rm -f "$body"
  if [ "$rc" -ne 0 ]; then echo "README example: curl exited $rc: curl $*" >&2; return 1; fi
  local want=${ICHIBASE_EXPECT:-}
  if [ -n "$want" ]; then
    if [ "$code" != "$want" ]; then echo "README example: expected HTTP $want, got $code: curl $*" >&2; return 1; fi
  elif [ "$code" -ge 400 ]; then
    echo "README example: HTTP $code: curl $*" >&2; return 1
  fi
}
"#;

/// The script: prelude, then each runnable block (files written where marked).
fn script(md: &str, addr: &str, work: &Path) -> (String, usize) {
    let mut s = String::from(PRELUDE);
    let mut runnable = 0;
    for b in blocks(md) {
        let text = b
            .text
            .replace("127.0.0.1:8080", addr)
            .replace("localhost:8080", addr)
            .replace("ik_...", ADMIN_KEY);
        match (&b.marker, b.lang.as_str()) {
            (Some(Marker::NotRun), _) => {}
            (Some(Marker::File(name)), _) => std::fs::write(work.join(name), &text).unwrap(),
            (None, "sh" | "bash") => {
                runnable += 1;
                s.push_str(&format!(
                    "echo '>>> README.md:{}' >> \"$ICHIBASE_README_LOG\"\nICHIBASE_README_LINE={}\n",
                    b.line, b.line
                ));
                for l in text.lines() {
                    s.push_str(&expect_prefix(l));
                    s.push('\n');
                }
            }
            _ => {}
        }
    }
    s.push_str("echo README-DONE\n");
    (s, runnable)
}

#[test]
fn markers_and_expectations_parse() {
    let md = "a\n```sh\necho 1\n```\n<!-- not-run -->\n\n```sh\nexit 1\n```\n  <!-- file: x.lua -->\n  ```lua\n  return 1\n  ```\n";
    let b = blocks(md);
    assert_eq!(b.len(), 3);
    assert_eq!(b[0].marker, None);
    assert_eq!(b[0].text, "echo 1\n");
    assert_eq!(b[1].marker, Some(Marker::NotRun));
    assert_eq!(b[2].marker, Some(Marker::File("x.lua".into())));
    assert_eq!(b[2].text, "return 1\n");
    assert_eq!(
        expect_prefix("curl \"$U/\" -d 'SELECT 1'   # 403"),
        "ICHIBASE_EXPECT=403 curl \"$U/\" -d 'SELECT 1'   # 403"
    );
    assert_eq!(expect_prefix("curl x   # only mine"), "curl x   # only mine");
    assert_eq!(expect_prefix("curl x   # 4031"), "curl x   # 4031");
}

#[test]
fn readme_examples_run_top_to_bottom_on_one_fresh_server() {
    let md = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .unwrap();
    let have_curl = Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        have_curl,
        "the README's examples are curl commands: install curl (e.g. apt-get install curl)"
    );
    let server = Server::start(&[]);
    let addr = server.url.trim_start_matches("http://").to_string();
    let work = tempfile::tempdir().unwrap();
    let (script, runnable) = script(&md, &addr, work.path());
    assert!(
        runnable >= 5,
        "only {runnable} runnable blocks found in README.md: the parser or the markers are off"
    );
    let log = work.path().join("requests.log");
    std::fs::write(&log, "").unwrap();
    std::fs::write(work.path().join("readme.sh"), &script).unwrap();
    let mut child = Command::new("bash")
        .arg("readme.sh")
        .current_dir(work.path())
        .env("ICHIBASE_README_LOG", &log)
        .env_remove("K")
        .env_remove("U")
        .env_remove("JWT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = t_out.join().unwrap();
    let stderr = t_err.join().unwrap();
    let requests = std::fs::read_to_string(&log).unwrap_or_default();
    let ok = matches!(status, Some(st) if st.success()) && stdout.contains("README-DONE");
    if std::env::var_os("ICHIBASE_README_VERBOSE").is_some() {
        eprintln!("--- requests\n{requests}\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
    }
    assert!(
        ok,
        "the README's examples failed ({}):\n--- stderr\n{stderr}\n--- requests (last block marked >>>)\n{requests}",
        match status {
            Some(st) => format!("bash {st}"),
            None => "timed out after 600 s".into(),
        }
    );
}
