//! The intent-to-service loop over HTTP (admin only): `POST /generate`
//! (`{"intent", "max_rounds"?, "require_approval"?}`; answers when the loop ends, with every
//! round), `GET /generate`, `GET /generate/{id}` (rounds with prompts, answers, outcomes, tokens,
//! time), `POST /generate/{id}/approve`, `POST /generate/{id}/discard`.

use axum::Router;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::{Admin, App, JsonBody, admin_area, reply};
use crate::generate::{self, Generator, Request};
use crate::llm::LlmClient;

/// The intent-to-service loop (`/generate`).
pub struct GenerateModule;

impl crate::modules::Module for GenerateModule {
    fn name(&self) -> &'static str {
        "generate"
    }
    fn routes(&self) -> Router<App> {
        routes()
    }
}

pub fn routes() -> Router<App> {
    Router::new()
        .route("/generate", get(list).post(run))
        .route("/generate/{id}", get(fetch))
        .route("/generate/{id}/approve", post(approve))
        .route("/generate/{id}/discard", post(discard))
        .route_layer(admin_area("generating services"))
        .layer(super::body_limit(super::BodyLimit::Json))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunBody {
    intent: String,
    max_rounds: Option<u32>,
    require_approval: Option<bool>,
}

async fn run(
    State(st): State<App>,
    Admin(ctx): Admin,
    JsonBody(b): JsonBody<RunBody>,
) -> Response {
    let r = async {
        let g = Generator {
            log: st.posterity().sink(),
            live: st.storage().clone(),
            branches: st.branches().clone(),
            lua: st.lua(),
            settings: st.config().generate.clone(),
            llm: LlmClient::from_settings(&st.config().llm)?,
        };
        g.run(
            Request {
                intent: b.intent,
                max_rounds: b.max_rounds,
                require_approval: b.require_approval,
                by: ctx.user_id.clone(),
            },
            &|r| tracing::info!(round = r.round, outcome = %r.outcome, "generate round"),
        )
        .await
    }
    .await;
    reply(r)
}

async fn list(State(st): State<App>, Admin(_): Admin) -> Response {
    reply(
        generate::list(&st.storage())
            .await
            .map(|g| json!({"generations": g})),
    )
}

async fn fetch(State(st): State<App>, Path(id): Path<String>, Admin(_): Admin) -> Response {
    reply(generate::get(&st.storage(), &id).await)
}

async fn approve(State(st): State<App>, Path(id): Path<String>, Admin(ctx): Admin) -> Response {
    reply(generate::decide(&st.storage(), &st.branches(), &id, true, ctx.user_id.clone()).await)
}

async fn discard(State(st): State<App>, Path(id): Path<String>, Admin(ctx): Admin) -> Response {
    reply(generate::decide(&st.storage(), &st.branches(), &id, false, ctx.user_id.clone()).await)
}
