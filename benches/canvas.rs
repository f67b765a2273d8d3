//! Canvas benchmarks, each against a baseline measured in the same run:
//! 1. compile time per KB of TSX (oxc + encre-css, in process) vs `lua::compile_check` on the
//!    same number of bytes of Lua;
//! 2. `PUT /ui/{name}` → first paint of the new version in a canvas already open in headless
//!    Chromium (p50/p95, from the request's start to the frame's paint, read from the page's
//!    clock), vs the deploy request's own answer time;
//! 3. the shell's size gzipped: the page, shell script and style, React, the JSX runtime and the
//!    frame runtime (everything a first visit downloads).
//!
//! `cargo bench --no-default-features [--profile dev] --bench canvas` (needs
//! scripts/peers/chromium.sh for 2;
//! `BENCH_DEPLOYS` sets the number of redeploys, default 40).

use std::io::Write;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/browser.rs"]
mod browser;

fn gz(s: &str) -> usize {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(s.as_bytes()).unwrap();
    e.finish().unwrap().len()
}

fn component(i: usize, rows: usize) -> String {
    let mut s = format!(
        "import {{ useState }} from 'react';\ntype Row = {{ id: number; name: string }};\nexport default function C{i}({{ rows }}: {{ rows?: Row[] }}) {{\n  const [sel, setSel] = useState<number | null>(null);\n  return <div className=\"p-4 grid gap-2\">\n"
    );
    for r in 0..rows {
        s.push_str(&format!(
            "    <button className=\"px-2 py-1 rounded bg-slate-{}00 text-white hover:bg-blue-500\" onClick={{() => setSel({r})}}>item {r} of v{i} {{sel === {r} ? '(selected)' : ''}}</button>\n",
            1 + r % 9
        ));
    }
    s.push_str("  </div>;\n}\n");
    s
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn now_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64() * 1000.0
}

fn main() {
    // 1. compile per KB
    let src = component(0, 120);
    let kb = src.len() as f64 / 1024.0;
    let lua: String = (0..)
        .map(|i| format!("t.v{i} = {{name = 'item {i}', n = {i} * 2}}\n"))
        .scan(0usize, |len, l| {
            *len += l.len();
            (*len <= src.len()).then_some(l)
        })
        .collect();
    let lua = format!("local t = {{}}\n{lua}return function() return t end\n");
    let runs = 30;
    let t = Instant::now();
    for _ in 0..runs {
        ichibase::canvas::compile::compile("bench", &src).unwrap();
    }
    let tsx_ms = t.elapsed().as_secs_f64() * 1000.0 / runs as f64;
    let t = Instant::now();
    for _ in 0..runs {
        ichibase::lua::compile_check("bench", &lua).unwrap();
    }
    let lua_ms = t.elapsed().as_secs_f64() * 1000.0 / runs as f64;
    println!(
        "compile: {kb:.1} KB of TSX in {tsx_ms:.2} ms = {:.2} ms/KB; the same bytes of Lua {lua_ms:.3} ms; ratio {:.1}x",
        tsx_ms / kb,
        tsx_ms / lua_ms.max(1e-6)
    );

    // 3. shell size
    let page_html = 700; // the page itself (a few hundred bytes)
    let mut total = page_html;
    let mut parts = vec![
        ("shell.js", gz(ichibase::canvas::assets::SHELL_JS)),
        ("shell.css", gz(ichibase::canvas::assets::SHELL_CSS)),
    ];
    for (n, _, body) in ichibase::canvas::assets::FRAME_ASSETS {
        if n.ends_with(".js") {
            parts.push((n, gz(body)));
        }
    }
    for (_, n) in &parts {
        total += n;
    }
    println!(
        "shell size gzipped: {:.1} KB in all ({})",
        total as f64 / 1024.0,
        parts.iter().map(|(n, s)| format!("{n} {:.1} KB", *s as f64 / 1024.0)).collect::<Vec<_>>().join(", ")
    );

    // 2. deploy → first paint
    let Some(b) = browser::Browser::launch() else {
        println!("deploy → paint: skipped (no browser)");
        return;
    };
    let deploys: usize = std::env::var("BENCH_DEPLOYS").ok().and_then(|s| s.parse().ok()).unwrap_or(40);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = common::Server::start(&["--signup-open", "true"]);
    let base = s.url.clone();
    let user = rt.block_on(common::signup(&base, "bench@example.com"));
    let to = format!("user:{}", user.id);
    let page = b.page();
    page.goto(&format!("{base}/canvas"));
    page.wait_for(None, "!!document.querySelector('#ichi-email')", 60);
    page.fill(None, "#ichi-email", "bench@example.com");
    page.fill(None, "#ichi-password", &common::password_of("bench@example.com"));
    page.click(None, "#ichi-signin-button");
    page.wait_for(None, "document.querySelector('#ichi-status')?.textContent === 'live'", 60);
    let admin = common::client();
    let mut paint = Vec::new();
    let mut answer = Vec::new();
    for i in 0..deploys + 1 {
        let code = component(i, 12);
        let t0 = now_ms();
        let r = rt.block_on(common::json_request(
            &admin,
            reqwest::Method::PUT,
            format!("{base}/ui/bench"),
            Some(json!({"code": code, "to": to})),
        ));
        let t1 = now_ms();
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json()["version"].as_i64().unwrap();
        let at = page.wait_for(
            None,
            &format!("(() => {{ const s = document.querySelector('section[data-ui=bench]'); return s && s.dataset.painted === '{v}' ? s.dataset.paintedAt : null }})()"),
            60,
        );
        let at: f64 = at.as_str().unwrap().parse().unwrap();
        if i > 0 {
            // The first deploy also loads the frame (React etc.): reported apart.
            paint.push(at - t0);
            answer.push(t1 - t0);
        } else {
            println!("first deploy (frame and React load included) → paint: {:.0} ms", at - t0);
        }
    }
    let (p50, p95) = (pct(&mut paint, 0.5), pct(&mut paint, 0.95));
    let (a50, a95) = (pct(&mut answer, 0.5), pct(&mut answer, 0.95));
    println!(
        "ui deploy → first paint in an open canvas ({deploys} redeploys): p50 {p50:.0} ms, p95 {p95:.0} ms; the PUT's answer p50 {a50:.0} ms, p95 {a95:.0} ms; paint/answer p95 ratio {:.1}x",
        p95 / a95.max(0.001)
    );
}
