//! TSX → JavaScript (oxc) and Tailwind classes → CSS (encre-css), in process.
//!
//! Owns only the pure compile step: no storage, no HTTP. The output is an ES module whose JSX
//! goes through `react/jsx-dev-runtime` (the canvas maps that to its own runtime, which tags
//! every host element with its TSX position) and whose components register for React Fast
//! Refresh (`$RefreshReg$`, `$RefreshSig$`), plus the CSS of every Tailwind class the source
//! mentions, a position map (generated line/column → TSX line/column) for runtime errors, and
//! the SHA-256 of the JavaScript (the name the frame origin serves it under).

use std::path::Path;

use oxc::allocator::Allocator;
use oxc::codegen::{Codegen, CodegenOptions};
use oxc::parser::Parser;
use oxc::semantic::SemanticBuilder;
use oxc::span::SourceType;
use oxc::transformer::{JsxRuntime, ReactRefreshOptions, TransformOptions, Transformer};
use sha2::{Digest, Sha256};

/// A compiled UI.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub js: String,
    pub css: String,
    /// `[generated line, generated column, TSX line, TSX column]`, 0-based, in generated order.
    pub map: Vec<[u32; 4]>,
    /// Hex SHA-256 of `js`.
    pub hash: String,
}

/// Why a source did not compile: the first error, 1-based line and column.
#[derive(Debug, Clone, PartialEq)]
pub struct CompileError {
    pub message: String,
    pub line: u32,
    pub column: u32,
}

impl std::fmt::Display for CompileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

/// 1-based line and column (in characters) of byte `offset` of `src`.
pub fn line_col(src: &str, offset: usize) -> (u32, u32) {
    let offset = offset.min(src.len());
    let mut off = offset;
    while !src.is_char_boundary(off) {
        off -= 1;
    }
    let before = &src[..off];
    let line = before.matches('\n').count() as u32 + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[start..].chars().count() as u32 + 1;
    (line, column)
}

fn first_error(src: &str, diags: &[oxc::diagnostics::OxcDiagnostic], what: &str) -> CompileError {
    let d = &diags[0];
    let offset = d
        .labels
        .first()
        .map(|l| l.offset() as usize)
        .unwrap_or(0);
    let (line, column) = line_col(src, offset);
    let mut message = format!("{what}: {}", d.message);
    if let Some(h) = &d.help {
        message.push_str(&format!(" ({h})"));
    }
    CompileError {
        message,
        line,
        column,
    }
}

/// Compile TSX `source` (file name `name` for messages) to an ES module and its CSS.
pub fn compile(name: &str, source: &str) -> Result<Compiled, CompileError> {
    let allocator = Allocator::default();
    let path = format!("{name}.tsx");
    let path = Path::new(&path);
    let parsed = Parser::new(&allocator, source, SourceType::tsx()).parse();
    if !parsed.diagnostics.is_empty() || parsed.panicked {
        if parsed.diagnostics.is_empty() {
            return Err(CompileError {
                message: "syntax error".into(),
                line: 1,
                column: 1,
            });
        }
        return Err(first_error(source, &parsed.diagnostics, "syntax error"));
    }
    let mut program = parsed.program;
    let sem = SemanticBuilder::new()
        .with_excess_capacity(2.0)
        .build(&program);
    if !sem.diagnostics.is_empty() {
        return Err(first_error(source, &sem.diagnostics, "error"));
    }
    let scoping = sem.semantic.into_scoping();
    let mut options = TransformOptions::default();
    options.jsx.runtime = JsxRuntime::Automatic;
    options.jsx.development = true;
    options.jsx.jsx_plugin = true;
    options.jsx.jsx_self_plugin = false;
    options.jsx.jsx_source_plugin = false;
    // Fast Refresh: components register with `$RefreshReg$` (the frame maps them to families by
    // UI name), so a redeploy keeps their state when their hooks did not change.
    options.jsx.refresh = Some(ReactRefreshOptions::default());
    let ret = Transformer::new(&allocator, path, &options).build_with_scoping(scoping, &mut program);
    if !ret.diagnostics.is_empty() {
        return Err(first_error(source, &ret.diagnostics, "transform error"));
    }
    let out = Codegen::new()
        .with_options(CodegenOptions {
            source_map_path: Some(path.to_path_buf()),
            ..CodegenOptions::default()
        })
        .build(&program);
    let map = out
        .map
        .map(|m| {
            m.get_tokens()
                .map(|t| {
                    [
                        t.get_dst_line(),
                        t.get_dst_col(),
                        t.get_src_line(),
                        t.get_src_col(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    let css = encre_css::generate([source], &encre_css::Config::default());
    let hash = hex(&Sha256::digest(out.code.as_bytes()));
    Ok(Compiled {
        js: out.code,
        css,
        map,
        hash,
    })
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The TSX position (1-based line, column) of generated 1-based `line`/`column`, from a
/// compile's position map: the nearest mapped token at or before it on that line (or the
/// last one of an earlier line).
pub fn original_position(map: &[[u32; 4]], line: u32, column: u32) -> Option<(u32, u32)> {
    let (l, c) = (line.checked_sub(1)?, column.saturating_sub(1));
    let mut best: Option<&[u32; 4]> = None;
    for t in map {
        if (t[0], t[1]) <= (l, c) {
            if best.is_none_or(|b| (b[0], b[1]) <= (t[0], t[1])) {
                best = Some(t);
            }
        }
    }
    best.map(|t| (t[2] + 1, t[3] + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsx_compiles_to_a_module_with_css() {
        let src = "import { useState } from 'react';\n\
                   type P = { title: string };\n\
                   export default function App({ title }: P) {\n\
                   \x20 const [n, setN] = useState<number>(0);\n\
                   \x20 return <div className=\"p-4 text-red-500\"><h1>{title}</h1><button onClick={() => setN(n + 1)}>{n}</button></div>;\n\
                   }\n";
        let c = compile("app", src).unwrap();
        assert!(c.js.contains("react/jsx-dev-runtime"), "{}", c.js);
        assert!(!c.js.contains("type P"), "{}", c.js);
        assert!(c.js.contains("lineNumber: 5"), "{}", c.js);
        assert!(c.js.contains("$RefreshReg$") && c.js.contains("$RefreshSig$"), "{}", c.js);
        assert!(c.css.contains(".p-4"), "{}", c.css);
        assert!(c.css.contains(".text-red-500"), "{}", c.css);
        assert_eq!(c.hash.len(), 64);
        assert!(!c.map.is_empty());
    }

    #[test]
    fn syntax_errors_have_line_and_column() {
        let src = "export default function App() {\n  return <div>\n    <span>hi</div>;\n}\n";
        let e = compile("bad", src).unwrap_err();
        assert_eq!(e.line, 3, "{e:?}");
        assert!(e.column > 1, "{e:?}");
        assert!(e.message.starts_with("syntax error"), "{e:?}");
    }

    #[test]
    fn the_readme_example_compiles() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        let start = readme.find("-- hello.lua").expect("the canvas example in the README");
        let code = &readme[start..];
        let code = &code[code.find("code = [[").unwrap() + 9..];
        let code = &code[..code.find("]]").unwrap()];
        let c = compile("hello", code).unwrap_or_else(|e| panic!("{e}\n{code}"));
        assert!(c.css.contains(".bg-blue-600"), "{}", c.css);
    }

    #[test]
    fn positions_map_back() {
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("ab", 0), (1, 1));
        let map = vec![[0, 0, 4, 2], [0, 10, 5, 0], [2, 3, 9, 7]];
        assert_eq!(original_position(&map, 1, 5), Some((5, 3)));
        assert_eq!(original_position(&map, 1, 12), Some((6, 1)));
        assert_eq!(original_position(&map, 2, 1), Some((6, 1)));
        assert_eq!(original_position(&map, 3, 4), Some((10, 8)));
        assert_eq!(original_position(&map, 0, 4), None);
    }
}
