//! `/admin/*` (admin role only): users, API keys, JWT key rotation, policies and grants.

use std::time::Instant;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::{delete, patch, post};
use serde::Deserialize;
use serde_json::json;

use super::{Admin, App, BodyLimit, JsonBody, admin_area, body_limit, reply};
use crate::auth::policy::{self, GrantSpec, PolicySpec};
use crate::core::{RequestContext, Result};
use crate::storage::ExecControl;

/// Administration of users, keys, policies and grants (`/admin/*`).
pub struct AdminModule;

impl crate::modules::Module for AdminModule {
    fn name(&self) -> &'static str {
        "admin"
    }
    fn routes(&self) -> Router<App> {
        routes()
    }
}

pub fn routes() -> Router<App> {
    Router::new()
        .route("/admin/users", post(create_user).get(list_users))
        .route("/admin/users/{id}", patch(update_user))
        .route("/admin/keys", post(create_key).get(list_keys))
        .route("/admin/keys/{id}", delete(revoke_key))
        .route("/admin/jwt/rotate", post(rotate))
        .route("/admin/policies", post(create_policy).get(list_policies))
        .route("/admin/policies/{name}", delete(drop_policy))
        .route(
            "/admin/grants",
            post(grant).get(list_grants).delete(revoke_grant),
        )
        .route("/admin/cdc", post(cdc_enable).get(cdc_list))
        .route("/admin/cdc/{table}", delete(cdc_disable))
        .route_layer(admin_area("/admin"))
        .layer(body_limit(BodyLimit::Json))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    email: String,
    password: String,
    #[serde(default = "default_role")]
    role: String,
}

fn default_role() -> String {
    "user".into()
}

async fn create_user(
    State(st): State<App>,
    Admin(_): Admin,
    JsonBody(u): JsonBody<NewUser>,
) -> Response {
    reply(st.auth().create_user(&u.email, &u.password, &u.role).await)
}

async fn list_users(State(st): State<App>, Admin(_): Admin) -> Response {
    reply(st.auth().list_users().await.map(|u| json!({"users": u})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserPatch {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    disabled: Option<bool>,
}

async fn update_user(
    State(st): State<App>,
    Path(id): Path<String>,
    Admin(_): Admin,
    JsonBody(p): JsonBody<UserPatch>,
) -> Response {
    reply(
        st.auth()
            .update_user(&id, p.role.as_deref(), p.disabled)
            .await
            .map(|_| json!({"updated": id})),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    name: String,
    role: String,
    #[serde(default)]
    user_id: Option<String>,
}

async fn create_key(
    State(st): State<App>,
    Admin(_): Admin,
    JsonBody(k): JsonBody<NewKey>,
) -> Response {
    reply(
        st.auth()
            .create_api_key(&k.name, &k.role, k.user_id)
            .await
            .map(|(info, key)| json!({"key": key, "info": info})),
    )
}

async fn list_keys(State(st): State<App>, Admin(_): Admin) -> Response {
    reply(st.auth().list_api_keys().await.map(|k| json!({"keys": k})))
}

async fn revoke_key(State(st): State<App>, Path(id): Path<String>, Admin(_): Admin) -> Response {
    reply(
        st.auth()
            .revoke_api_key(&id)
            .await
            .map(|_| json!({"revoked": id})),
    )
}

async fn rotate(State(st): State<App>, Admin(_): Admin) -> Response {
    reply(
        st.auth()
            .rotate_signing_key()
            .map(|(kid, kids)| json!({"signing_key": kid, "verifying_keys": kids})),
    )
}

async fn on_writer<R: Send + 'static>(
    st: &App,
    ctx: &RequestContext,
    f: impl FnOnce(&mut rusqlite::Connection) -> Result<R> + Send + 'static,
) -> Result<R> {
    st.storage()
        .write(ctx, ExecControl::new(Instant::now(), 0.0), f)
        .await
}

async fn create_policy(
    State(st): State<App>,
    Admin(ctx): Admin,
    JsonBody(p): JsonBody<PolicySpec>,
) -> Response {
    let name = p.name.clone();
    reply(
        on_writer(&st, &ctx, move |c| policy::create(c, &p))
            .await
            .map(|_| json!({"policy": name})),
    )
}

async fn list_policies(State(st): State<App>, Admin(ctx): Admin) -> Response {
    reply(
        st.storage()
            .read(&ctx, ExecControl::new(Instant::now(), 0.0), |c| {
                policy::list(c)
            })
            .await
            .map(|p| json!({"policies": p})),
    )
}

async fn drop_policy(
    State(st): State<App>,
    Path(name): Path<String>,
    Admin(ctx): Admin,
) -> Response {
    let n = name.clone();
    reply(
        on_writer(&st, &ctx, move |c| policy::drop(c, &n))
            .await
            .map(|_| json!({"dropped": name})),
    )
}

async fn grant(
    State(st): State<App>,
    Admin(ctx): Admin,
    JsonBody(g): JsonBody<GrantSpec>,
) -> Response {
    reply(
        on_writer(&st, &ctx, move |c| {
            policy::grant(c, &g).map(|_| json!({"granted": g}))
        })
        .await,
    )
}

async fn list_grants(State(st): State<App>, Admin(ctx): Admin) -> Response {
    reply(
        st.storage()
            .read(&ctx, ExecControl::new(Instant::now(), 0.0), |c| {
                policy::list_grants(c)
            })
            .await
            .map(|g| json!({"grants": g})),
    )
}

#[derive(Deserialize)]
struct RevokeQuery {
    object: String,
    role: String,
}

async fn revoke_grant(
    State(st): State<App>,
    Query(q): Query<RevokeQuery>,
    Admin(ctx): Admin,
) -> Response {
    reply(
        on_writer(&st, &ctx, move |c| policy::revoke(c, &q.object, &q.role))
            .await
            .map(|n| json!({"revoked": n})),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CdcBody {
    table: String,
}

async fn cdc_enable(
    State(st): State<App>,
    Admin(ctx): Admin,
    JsonBody(b): JsonBody<CdcBody>,
) -> Response {
    let t = b.table.clone();
    reply(
        on_writer(&st, &ctx, move |c| crate::realtime::cdc::enable(c, &t))
            .await
            .map(|_| json!({"capturing": b.table})),
    )
}

async fn cdc_list(State(st): State<App>, Admin(ctx): Admin) -> Response {
    reply(
        st.storage()
            .read(&ctx, ExecControl::new(Instant::now(), 0.0), |c| {
                crate::realtime::cdc::list(c)
            })
            .await
            .map(|t| json!({"tables": t})),
    )
}

async fn cdc_disable(
    State(st): State<App>,
    Path(table): Path<String>,
    Admin(ctx): Admin,
) -> Response {
    let t = table.clone();
    reply(
        on_writer(&st, &ctx, move |c| crate::realtime::cdc::disable(c, &t))
            .await
            .map(|_| json!({"stopped": table})),
    )
}
