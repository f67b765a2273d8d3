//! The console's TSX → JavaScript, compiled once (at the first request) with the same oxc
//! pipeline as the canvas, but for production: the automatic JSX runtime (`react/jsx-runtime`),
//! no development positions, no Fast Refresh, whitespace minified.
//!
//! Owns only this pure step; no storage, no HTTP.

use std::path::Path;
use std::sync::OnceLock;

use oxc::allocator::Allocator;
use oxc::codegen::{Codegen, CodegenOptions};
use oxc::parser::Parser;
use oxc::semantic::SemanticBuilder;
use oxc::span::SourceType;
use oxc::transformer::{JsxRuntime, TransformOptions, Transformer};

/// The console's source, embedded in the binary.
pub const SOURCE: &str = include_str!("ui/console.tsx");

/// TSX → an ES module (or the first error as `line:column: message`).
pub fn compile(name: &str, source: &str) -> Result<String, String> {
    let allocator = Allocator::default();
    let file = format!("{name}.tsx");
    let path = Path::new(&file);
    let parsed = Parser::new(&allocator, source, SourceType::tsx()).parse();
    let pos = |off: u32| crate::canvas::compile::line_col(source, off as usize);
    let first = |d: &[oxc::diagnostics::OxcDiagnostic]| {
        let d = &d[0];
        let (l, c) = pos(d.labels.first().map(|l| l.offset() as u32).unwrap_or(0));
        format!("{file}:{l}:{c}: {}", d.message)
    };
    if parsed.panicked || !parsed.diagnostics.is_empty() {
        return Err(if parsed.diagnostics.is_empty() { format!("{file}: syntax error") } else { first(&parsed.diagnostics) });
    }
    let mut program = parsed.program;
    let sem = SemanticBuilder::new().with_excess_capacity(2.0).build(&program);
    if !sem.diagnostics.is_empty() {
        return Err(first(&sem.diagnostics));
    }
    let scoping = sem.semantic.into_scoping();
    let mut options = TransformOptions::default();
    options.jsx.runtime = JsxRuntime::Automatic;
    options.jsx.development = false;
    options.jsx.jsx_plugin = true;
    options.jsx.jsx_self_plugin = false;
    options.jsx.jsx_source_plugin = false;
    options.jsx.refresh = None;
    let ret = Transformer::new(&allocator, path, &options).build_with_scoping(scoping, &mut program);
    if !ret.diagnostics.is_empty() {
        return Err(first(&ret.diagnostics));
    }
    Ok(Codegen::new()
        .with_options(CodegenOptions { minify: true, ..CodegenOptions::default() })
        .build(&program)
        .code)
}

/// The compiled console, built once.
pub fn console_js() -> &'static Result<String, String> {
    static JS: OnceLock<Result<String, String>> = OnceLock::new();
    JS.get_or_init(|| compile("console", SOURCE))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_console_compiles() {
        let js = super::console_js().as_ref().unwrap();
        assert!(js.contains("react/jsx-runtime"), "automatic runtime");
        assert!(!js.contains("$RefreshReg$"));
        assert!(!js.contains("interface "), "types are stripped");
    }

    #[test]
    fn errors_have_positions() {
        let e = super::compile("x", "export const a = <div>\n<span></div>;").unwrap_err();
        assert!(e.starts_with("x.tsx:2:"), "{e}");
    }
}
