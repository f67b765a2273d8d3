//! `/auth/*`: sign-up, sign-in, refresh, sign-out, password change, sessions (devices), `me`.
//! Bodies and answers are JSON; errors use the JSON error shape.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{App, BodyLimit, Caller, JsonBody, RequestScope, body_limit, error_response};
use crate::core::{Error, ErrorCode};

/// Identities: sign-up, sign-in, sessions, tokens (`/auth/*`).
pub struct AuthModule;

impl crate::modules::Module for AuthModule {
    fn name(&self) -> &'static str {
        "auth"
    }
    fn routes(&self) -> Router<App> {
        routes()
    }
}

pub fn routes() -> Router<App> {
    Router::new()
        .route("/auth/signup", post(signup))
        .route("/auth/signin", post(signin))
        .route("/auth/refresh", post(refresh))
        .route("/auth/signout", post(signout))
        .route("/auth/password", post(password))
        .route("/auth/me", get(me))
        .route("/auth/sessions", get(sessions))
        .route("/auth/sessions/{id}", delete(revoke))
        .layer(body_limit(BodyLimit::Json))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Credentials {
    email: String,
    password: String,
    #[serde(default)]
    device: Option<String>,
    /// A device of this user to join (see `auth::devices`); the device cookie otherwise.
    #[serde(default)]
    device_id: Option<String>,
}

/// Tokens as JSON plus the session cookie and the device cookie, or the error.
pub fn session_reply(st: &App, r: crate::core::Result<crate::auth::Tokens>) -> Response {
    let tokens = match r {
        Ok(t) => t,
        Err(e) => return error_response(&e, true, None),
    };
    let mut resp = Json(&tokens).into_response();
    if let Ok(v) = HeaderValue::from_str(&st.auth().cookie_header(&tokens.refresh_token)) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    let device = crate::auth::devices::device_cookie_header(&tokens.device_id, st.auth().cookie_secure());
    if let Ok(v) = HeaderValue::from_str(&device) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

async fn signup(State(st): State<App>, JsonBody(c): JsonBody<Credentials>) -> Response {
    // The same answer whether or not the email had an account: no tokens, no cookie.
    match st.auth().signup(&c.email, &c.password).await {
        Ok(msg) => Json(json!({"status": "accepted", "message": msg})).into_response(),
        Err(e) => error_response(&e, true, None),
    }
}

async fn signin(
    State(st): State<App>,
    scope: RequestScope,
    headers: HeaderMap,
    JsonBody(c): JsonBody<Credentials>,
) -> Response {
    let dev = crate::auth::devices::SessionDevice::from_request(
        &headers,
        c.device.clone(),
        c.device_id.clone(),
        scope.client(),
    );
    let r = st
        .auth()
        .signin_on(&c.email, &c.password, dev, scope.client())
        .await;
    // The audit trail of sign-ins (posterity, `kind = 'auth'`).
    let (uid, reason) = match &r {
        Ok(t) => (Some(t.user.id.as_str()), None),
        Err(e) => (None, Some(e.message.as_str())),
    };
    crate::auth::safety::audit(
        &st,
        crate::auth::safety::SignInEvent {
            method: "password",
            ok: r.is_ok(),
            reason,
            user_id: uid,
            email: Some(&c.email),
            ip: scope.client(),
            user_agent: crate::auth::safety::user_agent(&headers),
        },
    );
    session_reply(&st, r)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshBody {
    refresh_token: String,
}

async fn refresh(
    State(st): State<App>,
    scope: RequestScope,
    JsonBody(b): JsonBody<RefreshBody>,
) -> Response {
    let r = st.auth().refresh_from(&b.refresh_token, scope.client()).await;
    session_reply(&st, r)
}

async fn signout(State(st): State<App>, Caller(ctx): Caller) -> Response {
    let Some(sid) = ctx.session_id.clone() else {
        return error_response(
            &Error::new(
                ErrorCode::BadArguments,
                "This credential has no session to sign out of (API keys are revoked by an admin)",
            ),
            true,
            None,
        );
    };
    match st.auth().revoke_session(&ctx, &sid).await {
        Ok(()) => {
            let mut r = Json(json!({"signed_out": sid})).into_response();
            if let Ok(v) = HeaderValue::from_str(&st.auth().clear_cookie_header()) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Err(e) => error_response(&e, true, None),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordBody {
    old_password: String,
    new_password: String,
}

async fn password(
    State(st): State<App>,
    scope: RequestScope,
    Caller(ctx): Caller,
    JsonBody(b): JsonBody<PasswordBody>,
) -> Response {
    match st
        .auth()
        .change_password(&ctx, &b.old_password, &b.new_password, scope.client())
        .await
    {
        Ok(()) => Json(json!({"changed": true, "other_sessions_revoked": true})).into_response(),
        Err(e) => error_response(&e, true, None),
    }
}

async fn me(State(st): State<App>, Caller(ctx): Caller) -> Response {
    match st.auth().me(&ctx).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => error_response(&e, true, None),
    }
}

async fn sessions(State(st): State<App>, Caller(ctx): Caller) -> Response {
    match st.auth().sessions(&ctx).await {
        Ok(v) => Json(json!({"sessions": v})).into_response(),
        Err(e) => error_response(&e, true, None),
    }
}

async fn revoke(
    State(st): State<App>,
    Path(id): Path<String>,
    Caller(ctx): Caller,
) -> Response {
    match st.auth().revoke_session(&ctx, &id).await {
        Ok(()) => Json(json!({"revoked": id})).into_response(),
        Err(e) => error_response(&e, true, None),
    }
}
