//! The Dockerfile cannot rot (issue 14.8): no Docker engine runs in CI, so this checks that
//! every file the release build reads is copied into the build stage — the manifest, the build
//! script, every bench the manifest declares, and every file `include_str!`/`include_bytes!`
//! compiles in — and that `.dockerignore` does not drop any of them.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Source paths of the `COPY` lines of the first (build) stage, relative to the context.
fn copied() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let mut out = Vec::new();
    let mut stages = 0;
    for line in text.lines().map(str::trim) {
        if line.starts_with("FROM ") {
            stages += 1;
        }
        if stages == 1 && line.starts_with("COPY ") && !line.contains("--from") {
            let words: Vec<&str> = line.split_whitespace().skip(1).collect();
            for w in &words[..words.len() - 1] {
                out.push(w.trim_start_matches("./").trim_end_matches('/').to_string());
            }
        }
    }
    out
}

fn covered(copied: &[String], rel: &str) -> bool {
    copied
        .iter()
        .any(|c| rel == c || rel.starts_with(&format!("{c}/")))
}

fn ignored(rel: &str) -> bool {
    let text = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .any(|p| {
            let p = p.trim_start_matches("**/");
            rel == p || rel.starts_with(&format!("{p}/")) || rel.split('/').any(|part| part == p)
        })
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn the_build_stage_copies_every_file_the_build_reads() {
    let copied = copied();
    let mut needed = vec!["Cargo.toml".to_string(), "Cargo.lock".to_string()];
    if root().join("build.rs").exists() {
        needed.push("build.rs".into());
    }
    // Build settings (LIBSQLITE3_FLAGS for the pre-update hook change capture needs).
    if root().join(".cargo/config.toml").exists() {
        needed.push(".cargo/config.toml".into());
    }
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    for line in manifest.lines() {
        if let Some(name) = line.trim().strip_prefix("name = \"") {
            let name = name.trim_end_matches('"');
            let bench = format!("benches/{name}.rs");
            if root().join(&bench).exists() {
                needed.push(bench);
            }
        }
    }
    let mut files = Vec::new();
    rs_files(&root().join("src"), &mut files);
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for mac in ["include_str!(\"", "include_bytes!(\""] {
            for (i, _) in text.match_indices(mac) {
                let rest = &text[i + mac.len()..];
                let arg = &rest[..rest.find('"').unwrap()];
                let abs = f.parent().unwrap().join(arg);
                let abs = abs.canonicalize().unwrap_or_else(|_| panic!("{} includes missing {arg}", f.display()));
                let rel = abs.strip_prefix(root().canonicalize().unwrap()).unwrap();
                needed.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    assert!(needed.iter().any(|n| n.starts_with("docs/")), "the scan found docs/bundles.md");
    for n in &needed {
        assert!(covered(&copied, n), "the Dockerfile's build stage does not COPY {n} (COPY lines: {copied:?})");
        assert!(!ignored(n), ".dockerignore drops {n}, which the build needs");
    }
}
