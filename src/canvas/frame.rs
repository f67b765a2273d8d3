//! The frame origin: a second listener (`[canvas] frame_port`) that serves generated UIs and
//! nothing else — the frame page, React and the frame runtime, and compiled UIs by hash. It
//! has no credentials, no API and no cookies: generated code, sandboxed in an iframe without
//! `allow-same-origin` on this origin, reaches the server only by `postMessage` to the shell.
//!
//! Every answer carries `Access-Control-Allow-Origin: *` (the sandboxed frame's origin is
//! opaque, and module scripts are fetched in CORS mode); the page's CSP allows scripts, styles,
//! images and fonts from this origin only and no connections at all.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::assets::FRAME_ASSETS;
use super::{hv, store, with_type};
use crate::apis::App;
use crate::core::RequestContext;

pub fn router() -> Router<App> {
    Router::new()
        .route("/frame", get(page))
        .route("/vendor/{file}", get(vendor))
        .route("/code/{file}", get(code))
}

fn common(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert("access-control-allow-origin", hv("*"));
    h.insert("x-content-type-options", hv("nosniff"));
    h.insert("referrer-policy", hv("no-referrer"));
    r
}

/// The import map every frame uses: bare specifiers → this origin.
pub const IMPORT_MAP: &str = r#"{"imports":{"react":"/vendor/react.js","react/jsx-runtime":"/vendor/jsx-runtime.js","react/jsx-dev-runtime":"/vendor/jsx-dev-runtime.js","react-dom/client":"/vendor/react-dom-client.js","ichi":"/vendor/ichi.js"}}"#;

async fn page(State(st): State<App>, headers: HeaderMap) -> Response {
    let origin = match super::service(&st) {
        Ok(c) if !c.settings.frame_origin.is_empty() => c.settings.frame_origin.trim_end_matches('/').to_string(),
        _ => format!("http://{}", headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("127.0.0.1")),
    };
    let mut n = [0u8; 16];
    let _ = getrandom::fill(&mut n);
    let nonce = super::compile::hex(&n);
    let body = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<script type=\"importmap\" nonce=\"{nonce}\">{IMPORT_MAP}</script>\
<script type=\"module\" src=\"/vendor/frame.js\"></script></head><body><div id=\"root\"></div></body></html>\n"
    );
    let csp = format!(
        "default-src 'none'; script-src {origin} 'nonce-{nonce}'; style-src {origin} 'unsafe-inline'; img-src {origin} data:; \
font-src {origin} data:; connect-src 'none'; media-src 'none'; object-src 'none'; worker-src 'none'; frame-src 'none'; \
form-action 'none'; base-uri 'none'; sandbox allow-scripts"
    );
    let mut r = with_type(body, "text/html; charset=utf-8");
    r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, hv(&csp));
    r.headers_mut().insert(header::CACHE_CONTROL, hv("no-store"));
    common(r)
}

async fn vendor(Path(file): Path<String>) -> Response {
    match FRAME_ASSETS.iter().find(|(n, _, _)| *n == file) {
        Some((_, ctype, body)) => {
            let mut r = with_type(*body, ctype);
            r.headers_mut().insert(header::CACHE_CONTROL, hv("no-cache"));
            common(r)
        }
        None => common((StatusCode::NOT_FOUND, "no such file").into_response()),
    }
}

async fn code(State(st): State<App>, Path(file): Path<String>) -> Response {
    let (hash, ext) = file.rsplit_once('.').unwrap_or((&file, ""));
    if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) || !(ext == "js" || ext == "css") {
        return common((StatusCode::NOT_FOUND, "no such code").into_response());
    }
    let h = hash.to_string();
    let found = st
        .storage()
        .read(&RequestContext::system(), crate::storage::ExecControl::lookup(), move |c| store::by_hash(c, &h))
        .await;
    match found {
        Ok(Some((js, css))) => {
            let mut r = if ext == "js" {
                with_type(js, "text/javascript; charset=utf-8")
            } else {
                with_type(css, "text/css; charset=utf-8")
            };
            // Content-addressed: never changes.
            r.headers_mut().insert(header::CACHE_CONTROL, hv("public, max-age=31536000, immutable"));
            common(r)
        }
        Ok(None) => common((StatusCode::NOT_FOUND, "no such code").into_response()),
        Err(e) => common(crate::apis::error_response(&e, true, None)),
    }
}
