//! Branches and bundles over HTTP (admin only): `GET /branches`, `POST /branches`
//! (`{"name"}`: take a branch of the live database), `GET /branches/{name}`,
//! `DELETE /branches/{name}`, `POST /branches/{name}/apply` (a bundle in the body: applied to the
//! branch in one transaction, then its checks run there), `POST /branches/{name}/merge[?keep=1]`
//! (replay the branch's bundles on the live database in one transaction). SQL reaches a branch
//! with `POST /?branch=name` (see `apis::sql`).

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::{AppState, JsonBody, reply, require_admin};
use crate::bundle::{self, Bundle, CheckEnv};
use crate::core::{Error, ErrorCode};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/branches", get(list).post(create))
        .route("/branches/{name}", get(info).delete(remove))
        .route("/branches/{name}/apply", post(apply))
        .route("/branches/{name}/merge", post(merge))
}

macro_rules! admin {
    ($st:expr, $h:expr) => {
        match require_admin(&$st, &$h, "managing branches") {
            Ok(c) => c,
            Err(r) => return r,
        }
    };
}

async fn list(State(st): State<AppState>, h: HeaderMap) -> Response {
    admin!(st, h);
    reply(st.branches.list().await.map(|b| json!({"branches": b})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
}

async fn create(
    State(st): State<AppState>,
    h: HeaderMap,
    JsonBody(b): JsonBody<CreateBody>,
) -> Response {
    admin!(st, h);
    reply(st.branches.create(&b.name).await)
}

async fn info(State(st): State<AppState>, h: HeaderMap, Path(name): Path<String>) -> Response {
    admin!(st, h);
    reply(st.branches.info(&name).await)
}

async fn remove(State(st): State<AppState>, h: HeaderMap, Path(name): Path<String>) -> Response {
    admin!(st, h);
    reply(
        st.branches
            .delete(&name)
            .await
            .map(|_| json!({"deleted": name})),
    )
}

async fn apply(
    State(st): State<AppState>,
    h: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let ctx = admin!(st, h);
    let r = async {
        let text = std::str::from_utf8(&body)
            .map_err(|_| Error::new(ErrorCode::BadArguments, "The bundle must be UTF-8 JSON"))?;
        let b = Bundle::from_json(text)?;
        let storage = st.branches.get(&name).await?;
        let ids = bundle::apply(&storage, vec![b.clone()], ctx.user_id.clone(), None).await?;
        let env = CheckEnv {
            storage,
            traces: Some(st.storage.clone()),
            lua: st.lua,
            rt: tokio::runtime::Handle::current(),
        };
        let checks = bundle::run_checks(&env, &b).await;
        let ok = checks.iter().all(|c| c.ok);
        Ok(json!({
            "branch": name,
            "bundle_id": ids.first(),
            "ok": ok,
            "checks": checks,
            "failures": (!ok).then(|| bundle::describe_failures(&checks)),
        }))
    }
    .await;
    reply(r)
}

#[derive(Deserialize)]
struct MergeQuery {
    keep: Option<String>,
}

async fn merge(
    State(st): State<AppState>,
    h: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<MergeQuery>,
) -> Response {
    let ctx = admin!(st, h);
    let keep = q.keep.as_deref().is_some_and(|v| v == "1" || v == "true");
    reply(
        st.branches
            .merge(&name, &st.storage, ctx.user_id.clone(), keep)
            .await,
    )
}
