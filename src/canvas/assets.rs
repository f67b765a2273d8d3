//! The canvas shell's page and assets (embedded in the binary: nothing from a CDN).
//!
//! `GET /canvas` and `GET /canvas/{app}` answer the shell page; `GET /canvas/assets/{file}` its
//! script and style. The frame origin's assets (React, the JSX runtime, the frame bootstrap)
//! are in [`FRAME_ASSETS`], served by `frame`. React 19 is vendored under
//! `src/canvas/assets/vendor` by `scripts/vendor-react/build.sh` (pinned, with its licence).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{hv, with_type};
use crate::apis::App;

pub const SHELL_JS: &str = include_str!("assets/shell.js");
pub const SHELL_CSS: &str = include_str!("assets/shell.css");

/// (file name, content type, content) served by the frame origin under `/vendor/`.
pub const FRAME_ASSETS: &[(&str, &str, &str)] = &[
    ("react-all.js", "text/javascript; charset=utf-8", include_str!("assets/vendor/react-all.js")),
    ("react.js", "text/javascript; charset=utf-8", include_str!("assets/vendor/react.js")),
    ("react-dom-client.js", "text/javascript; charset=utf-8", include_str!("assets/vendor/react-dom-client.js")),
    ("jsx-runtime.js", "text/javascript; charset=utf-8", include_str!("assets/vendor/jsx-runtime.js")),
    ("react-refresh.js", "text/javascript; charset=utf-8", include_str!("assets/vendor/react-refresh.js")),
    ("jsx-dev-runtime.js", "text/javascript; charset=utf-8", include_str!("assets/jsx-dev-runtime.js")),
    ("ichi.js", "text/javascript; charset=utf-8", include_str!("assets/ichi.js")),
    ("frame.js", "text/javascript; charset=utf-8", include_str!("assets/frame.js")),
    ("LICENSE-react.txt", "text/plain; charset=utf-8", include_str!("assets/vendor/LICENSE-react.txt")),
];

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

/// The shell page for `app` (empty: every UI of the user).
fn page(st: &App, headers: &HeaderMap, app: &str) -> Response {
    let Ok(canvas) = super::service(st) else {
        return (StatusCode::SERVICE_UNAVAILABLE, "canvas not running").into_response();
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("127.0.0.1");
    let hostname = host.rsplit_once(':').map(|(h, p)| if p.chars().all(|c| c.is_ascii_digit()) { h } else { host }).unwrap_or(host);
    let frame_origin = if canvas.settings.frame_origin.is_empty() {
        format!("http://{hostname}:{}", canvas.frame_port)
    } else {
        canvas.settings.frame_origin.trim_end_matches('/').to_string()
    };
    let body = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>ichibase canvas</title><link rel=\"stylesheet\" href=\"/canvas/assets/shell.css\"></head>\
<body data-app=\"{}\" data-frame-origin=\"{}\"><div id=\"ichi-shell\"></div><script type=\"module\" src=\"/canvas/assets/shell.js\"></script></body></html>\n",
        html_escape(app),
        html_escape(&frame_origin)
    );
    let ws = format!("ws://{host} wss://{host}");
    let csp = format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self' {ws}; \
frame-src {frame_origin}; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    );
    let mut r = with_type(body, "text/html; charset=utf-8");
    let h = r.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, hv(&csp));
    h.insert(header::CACHE_CONTROL, hv("no-store"));
    h.insert("referrer-policy", hv("no-referrer"));
    h.insert("x-content-type-options", hv("nosniff"));
    r
}

pub async fn shell(State(st): State<App>, headers: HeaderMap) -> Response {
    page(&st, &headers, "")
}

pub async fn shell_app(State(st): State<App>, headers: HeaderMap, Path(app): Path<String>) -> Response {
    if super::check_name(&app).is_err() {
        return (StatusCode::NOT_FOUND, "no such app").into_response();
    }
    page(&st, &headers, &app)
}

pub async fn shell_asset(Path(file): Path<String>) -> Response {
    let (ctype, body) = match file.as_str() {
        "shell.js" => ("text/javascript; charset=utf-8", SHELL_JS),
        "shell.css" => ("text/css; charset=utf-8", SHELL_CSS),
        _ => return (StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    let mut r = with_type(body, ctype);
    r.headers_mut().insert("x-content-type-options", hv("nosniff"));
    r.headers_mut().insert(header::CACHE_CONTROL, hv("no-cache"));
    r
}
