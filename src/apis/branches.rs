//! Branches and bundles over HTTP (admin only): `GET /branches`, `POST /branches`
//! (`{"name"}`: take a branch of the live database), `GET /branches/{name}`,
//! `DELETE /branches/{name}`, `POST /branches/{name}/apply` (a bundle in the body: applied to the
//! branch in one transaction, then its checks run there), `POST /branches/{name}/merge[?keep=1]`
//! (every pending bundle's checks run again on the branch's current state; only if all pass are
//! the bundles replayed on the live database in one transaction; `force=1` overrides a failure
//! and the override is recorded). SQL reaches a branch with `POST /?branch=name` (see
//! `apis::sql`).

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::{Admin, App, BodyBytes, BodyLimit, JsonBody, admin_area, body_limit, reply};
use crate::bundle::{self, Bundle, CheckEnv};
use crate::core::{Error, ErrorCode};

/// Branches and bundles (`/branches/*`).
pub struct BranchesModule;

impl crate::modules::Module for BranchesModule {
    fn name(&self) -> &'static str {
        "branches"
    }
    fn section(&self) -> Option<&'static str> {
        Some("branches")
    }
    fn routes(&self) -> Router<App> {
        routes()
    }
}

pub fn routes() -> Router<App> {
    Router::new()
        .route("/branches", get(list).post(create))
        .route("/branches/{name}", get(info).delete(remove))
        .route("/branches/{name}/apply", post(apply))
        .route("/branches/{name}/merge", post(merge))
        .route_layer(admin_area("managing branches"))
        .layer(body_limit(BodyLimit::Json))
}

async fn list(State(st): State<App>, Admin(_): Admin) -> Response {
    reply(st.branches().list().await.map(|b| json!({"branches": b})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
}

async fn create(
    State(st): State<App>,
    Admin(_): Admin,
    JsonBody(b): JsonBody<CreateBody>,
) -> Response {
    reply(st.branches().create(&b.name).await)
}

async fn info(State(st): State<App>, Path(name): Path<String>, Admin(_): Admin) -> Response {
    reply(st.branches().info(&name).await)
}

async fn remove(State(st): State<App>, Path(name): Path<String>, Admin(_): Admin) -> Response {
    reply(
        st.branches()
            .delete(&name)
            .await
            .map(|_| json!({"deleted": name})),
    )
}

async fn apply(
    State(st): State<App>,
    Path(name): Path<String>,
    Admin(ctx): Admin,
    BodyBytes(body): BodyBytes,
) -> Response {
    let r = async {
        let text = std::str::from_utf8(&body)
            .map_err(|_| Error::new(ErrorCode::BadArguments, "The bundle must be UTF-8 JSON"))?;
        let b = Bundle::from_json(text)?;
        let storage = st.branches().get(&name).await?;
        let ids = bundle::apply(&storage, vec![b.clone()], ctx.user_id.clone(), None).await?;
        let checks = checks_on_copy(&st, &name, &b).await?;
        let ok = checks.iter().all(|c| c.ok);
        if let Some(&id) = ids.first() {
            let failures = (!ok).then(|| bundle::describe_failures(&checks));
            storage
                .write(
                    &crate::core::RequestContext::system(),
                    crate::storage::ExecControl::lookup(),
                    move |c| crate::branch::record_checks(c, id, ok, failures.as_deref()),
                )
                .await?;
        }
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
    /// Merge although checks failed (recorded in `_ichibase_meta` as a merge override).
    force: Option<String>,
}

fn truthy(v: &Option<String>) -> bool {
    v.as_deref().is_some_and(|v| v == "1" || v == "true")
}

/// Run `b`'s checks on a throw-away copy of the branch, so checks never change the branch and
/// give the same verdict when they run again at merge.
async fn checks_on_copy(
    st: &App,
    name: &str,
    b: &Bundle,
) -> crate::core::Result<Vec<bundle::CheckResult>> {
    let scratch = st.branches().scratch(name).await?;
    let env = CheckEnv {
        storage: scratch.storage.clone(),
        traces: Some(st.storage().clone()),
        lua: st.lua(),
        rt: tokio::runtime::Handle::current(),
        app: Some(st.clone()),
    };
    let checks = bundle::run_checks(&env, b).await;
    scratch.discard().await;
    Ok(checks)
}

/// Run every pending bundle's checks on the branch as it is now. Returns one entry per bundle:
/// `{"bundle", "ok", "checks", "failures"}`.
async fn verify_pending(st: &App, name: &str) -> crate::core::Result<Vec<serde_json::Value>> {
    let storage = st.branches().get(name).await?;
    let rows = storage
        .read(
            &crate::core::RequestContext::system(),
            crate::storage::ExecControl::lookup(),
            |c| crate::branch::pending(c, crate::branch::base_of(c)?),
        )
        .await?;
    let mut out = Vec::new();
    for (_, bname, text) in rows {
        let b = Bundle::from_json_unchecked(&text)?;
        if b.checks.is_empty() {
            out.push(json!({"bundle": bname,
    "ok": false,
    "checks": [],
    "failures": "the bundle has no checks; a bundle needs at least one (docs/bundles.md)"}));
            continue;
        }
        let checks = checks_on_copy(st, name, &b).await?;
        let ok = checks.iter().all(|c| c.ok);
        out.push(json!({
                "bundle": bname,
        "ok": ok,
        "checks": checks,
        "failures": (!ok).then(|| bundle::describe_failures(&checks)),
        }));
    }
    Ok(out)
}

async fn merge(
    State(st): State<App>,
    Path(name): Path<String>,
    Query(q): Query<MergeQuery>,
    Admin(ctx): Admin,
) -> Response {
    let keep = truthy(&q.keep);
    let force = truthy(&q.force);
    let r = async {
        let verdicts = verify_pending(&st, &name).await?;
        let failed: Vec<&serde_json::Value> = verdicts.iter().filter(|v| v["ok"] != true).collect();
        if !failed.is_empty() && !force {
            let what: Vec<String> = failed
                .iter()
                .map(|v| {
                    let bad: Vec<&str> = v["checks"]
                        .as_array()
                        .map(|cs| {
                            cs.iter()
                                .filter(|c| c["ok"] != true)
                                .filter_map(|c| c["name"].as_str())
                                .collect()
                        })
                        .unwrap_or_default();
                    if bad.is_empty() {
                        format!("bundle '{}' ({})", v["bundle"].as_str().unwrap_or("?"), v["failures"].as_str().unwrap_or("failed"))
                    } else {
                        format!("bundle '{}' failed check(s) {}", v["bundle"].as_str().unwrap_or("?"), bad.join(", "))
                    }
                })
                .collect();
            return Err(Error::new(
                ErrorCode::CheckFailed,
                format!(
                    "Branch '{name}' was not merged: {}. Fix the bundle and apply it again, or merge with force=1 to override (recorded)",
                    what.join("; ")
                ),
            ));
        }
        let mut merged = st
            .branches()
            .merge(&name, &st.storage(), ctx.user_id.clone(), keep)
            .await?;
        if !failed.is_empty() {
            // The override is part of the live database's history.
            let record = json!({
                "branch": name,
                "by": ctx.user_id,
                "at": chrono::Utc::now().to_rfc3339(),
                "failed": failed,
            });
            let key = format!("merge_override:{}:{}", name, uuid::Uuid::new_v4().simple());
            let value = record.to_string();
            st.storage()
                .write(&crate::core::RequestContext::system(), crate::storage::ExecControl::lookup(), move |c| {
                    c.execute("INSERT INTO _ichibase_meta(key, value) VALUES (?1, ?2)", [key, value])?;
                    Ok(())
                })
                .await?;
            tracing::warn!(branch = %name, by = ?ctx.user_id, "branch merged with failing checks (force=1)");
            merged["override"] = json!({"forced": true, "failed": failed});
        }
        merged["checks"] = json!(verdicts);
        Ok(merged)
    }
    .await;
    reply(r)
}
