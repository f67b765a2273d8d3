//! The life of one HTTP request around its handler: the [`RequestScope`] (client address, and
//! the identity the request ran as), the one request layer ([`request_layer`]) that puts it in
//! the request's extensions and writes the request's `http` posterity row, and the identity
//! extractors [`Caller`] and [`Admin`].
//!
//! Identity travels in request extensions, never in task-locals: an extractor (or a handler
//! that must identify from more than headers, such as `sql` with URL credentials) identifies
//! through [`RequestScope::identify`], which hands the sign-in guard the client address and
//! notes the identity in the scope; the request layer reads it back for the log row.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;

use super::{App, error_response};
use crate::core::{Error, ErrorCode, RequestContext};
use crate::posterity::{Event, Sink};

/// What one HTTP request carries beside its handler's arguments: who the client is and who the
/// request ran as. Cheap to clone (one `Arc`); every clone is the same scope.
#[derive(Clone, Default)]
pub struct RequestScope {
    inner: Arc<ScopeInner>,
}

#[derive(Default)]
struct ScopeInner {
    client: Option<IpAddr>,
    caller: Mutex<Option<RequestContext>>,
}

impl RequestScope {
    /// A scope for a request from `client` (its address after trusted proxies).
    pub fn new(client: Option<IpAddr>) -> RequestScope {
        RequestScope {
            inner: Arc::new(ScopeInner {
                client,
                caller: Mutex::new(None),
            }),
        }
    }

    /// The client's address (None when the server is served without connection info).
    pub fn client(&self) -> Option<IpAddr> {
        self.inner.client
    }

    /// Note that the request runs as `ctx` (its posterity row carries that identity).
    pub fn note(&self, ctx: &RequestContext) {
        if let Ok(mut g) = self.inner.caller.lock() {
            *g = Some(ctx.clone());
        }
    }

    /// The identity the request ran as, if it identified.
    pub fn caller(&self) -> Option<RequestContext> {
        self.inner.caller.lock().ok().and_then(|g| g.clone())
    }

    /// Identify the request from its credentials (see [`crate::auth::Auth::identify`]) with
    /// this scope's client address, and note the identity.
    pub fn identify(
        &self,
        app: &App,
        headers: &HeaderMap,
        url_user: Option<&str>,
        url_password: Option<&str>,
        query_id: Option<String>,
    ) -> crate::core::Result<RequestContext> {
        let ctx = app
            .auth()
            .identify(headers, url_user, url_password, query_id, self.client())?;
        self.note(&ctx);
        Ok(ctx)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RequestScope {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // The request layer always inserts one; a router without it gets a detached scope.
        Ok(parts
            .extensions
            .get::<RequestScope>()
            .cloned()
            .unwrap_or_default())
    }
}

/// The caller's identity from the request's headers; a 401 in the JSON error shape when the
/// credentials are wrong. No credentials is the `anon` role.
pub struct Caller(pub RequestContext);

impl FromRequestParts<App> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        let scope = RequestScope::from_request_parts(parts, app)
            .await
            .unwrap_or_else(|e| match e {});
        scope
            .identify(app, &parts.headers, None, None, None)
            .map(Caller)
            .map_err(|e| error_response(&e, true, None))
    }
}

/// The caller's identity when it has the admin role; else a 401 (bad credentials) or a 403
/// "`<area>` needs the admin role; this request runs as '<role>'", where the area is what the
/// route's [`admin_area`] layer names (the request path without one).
pub struct Admin(pub RequestContext);

/// What an admin-only route group is called in its 403 message (set by [`admin_area`]).
#[derive(Clone, Copy, Debug)]
pub struct AdminArea(pub &'static str);

/// The admin layer of a route group: `router.route_layer(admin_area("managing branches"))`
/// names the group in the [`Admin`] extractor's refusals.
pub fn admin_area(what: &'static str) -> axum::Extension<AdminArea> {
    axum::Extension(AdminArea(what))
}

impl FromRequestParts<App> for Admin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        let Caller(ctx) = Caller::from_request_parts(parts, app).await?;
        if !ctx.is_admin() {
            let path;
            let what = match parts.extensions.get::<AdminArea>() {
                Some(AdminArea(w)) => *w,
                None => {
                    path = parts.uri.path().to_string();
                    path.as_str()
                }
            };
            let e = Error::new(
                ErrorCode::AccessDenied,
                format!(
                    "{what} needs the admin role; this request runs as '{}'",
                    ctx.role.as_str()
                ),
            );
            return Err(error_response(&e, true, None));
        }
        Ok(Admin(ctx))
    }
}

/// The one request layer: puts the request's [`RequestScope`] in its extensions (the client
/// address from the connection info and a trusted proxy's `X-Forwarded-For`), and records one
/// `http` posterity row per request — method, path, status, latency (until the body is fully
/// sent or dropped), bytes sent, and the identity / query id / trace id it ran with.
pub async fn request_layer(State(st): State<App>, mut req: Request, next: Next) -> Response {
    let client = req
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| st.auth().client_ip(c.0.ip(), req.headers()));
    let scope = RequestScope::new(client);
    req.extensions_mut().insert(scope.clone());
    let sink = st.posterity().sink();
    if !sink.enabled() {
        return next.run(req).await;
    }
    let started = Instant::now();
    let ts_us = crate::posterity::now_us();
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let e = Event::for_request(
        crate::posterity::HttpRequest {
            ts_us,
            method,
            path,
            status,
            query_id: header("x-clickhouse-query-id"),
            trace_id: header("x-ichibase-trace-id"),
            exception_code: header("x-clickhouse-exception-code"),
        },
        scope.caller().as_ref(),
    );
    let (parts, body) = resp.into_parts();
    Response::from_parts(
        parts,
        Body::new(Counted {
            inner: body,
            bytes: 0,
            pending: Some((sink, e, started)),
        }),
    )
}

/// A response body that counts what it sends and records the request's row when it is done
/// (or dropped, if the client went away).
struct Counted {
    inner: Body,
    bytes: u64,
    pending: Option<(Sink, Event, Instant)>,
}

impl Counted {
    fn finish(&mut self) {
        if let Some((sink, mut e, started)) = self.pending.take() {
            e.bytes = Some(self.bytes as i64);
            e.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
            sink.record(e);
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.finish();
    }
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scope_keeps_the_last_identity_noted() {
        let s = RequestScope::new(Some("10.0.0.1".parse().unwrap()));
        assert!(s.caller().is_none());
        let a = RequestContext::anon(Some("q1".into()));
        s.clone().note(&a);
        assert_eq!(s.caller().unwrap().query_id, "q1");
        assert_eq!(s.client(), Some("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn the_http_row_prefers_the_response_ids_and_takes_the_identity() {
        use crate::posterity::HttpRequest;
        let mut who = RequestContext::anon(Some("q-ctx".into()));
        who.user_id = Some("u1".into());
        let r = HttpRequest {
            ts_us: 7,
            method: "POST".into(),
            path: "/".into(),
            status: 401,
            query_id: Some("q-resp".into()),
            trace_id: None,
            exception_code: Some("516".into()),
        };
        let e = Event::for_request(r.clone(), Some(&who));
        assert_eq!(
            (e.kind, e.ts_us, e.status, e.outcome),
            ("http", 7, Some(401), Some("error"))
        );
        assert_eq!(e.query_id.as_deref(), Some("q-resp"));
        assert_eq!(e.trace_id.as_deref(), Some(who.trace_id.as_str()));
        assert_eq!(
            (e.user_id.as_deref(), e.role.as_deref()),
            (Some("u1"), Some("anon"))
        );
        assert_eq!(e.error.as_deref(), Some("code 516"));
        let e = Event::for_request(HttpRequest { status: 200, ..r }, None);
        assert_eq!(
            (e.user_id, e.role, e.trace_id, e.error),
            (None, None, None, None)
        );
        assert_eq!(e.outcome, Some("ok"));
    }
}
