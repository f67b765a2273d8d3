//! The repair loop: a user's intent → a model-written bundle → verified in a branch → merged.
//!
//! Owns the prompts (system prompt = role + `docs/bundles.md` + rules; first message = intent +
//! the live schema, policies and functions), extracting the bundle from an answer, the rounds
//! (verify in a fresh branch; on an invalid answer, a SQL error, a Lua error or a failing property
//! feed the details — shrunk counterexample and trace excerpt included — back to the model), the
//! final merge (or waiting for approval), and the record of every round in
//! `_ichibase_generations` / `_ichibase_generation_rounds`.
//! Must not talk HTTP to the provider itself (`llm`) nor apply SQL itself (`bundle`).

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use serde_json::{Value as Json, json};

use crate::branch::Branches;
use crate::bundle::{self, Bundle, CheckEnv, CheckResult};
use crate::config::GenerateSettings;
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::llm::{LlmClient, Message, clip};
use crate::lua::LuaOptions;
use crate::storage::{ExecControl, Storage};

const BUNDLE_DOC: &str = include_str!("../../docs/bundles.md");

/// The instructions every model call starts with.
pub fn system_prompt() -> String {
    format!(
        "You are the service generator of ichibase, an engine for small personal apps built on SQLite and sandboxed Lua.\n\
         Turn the user's intent (often written in Japanese) into ONE app bundle: a JSON object as documented below.\n\
         Rules:\n\
         - Answer with the bundle JSON only (a ```json fence is fine), never prose around it.\n\
         - Migrations only add to the current schema; keep existing data.\n\
         - Use {{name:Type}} placeholders for every value in SQL.\n\
         - Validate inputs in functions and raise clear errors with error('...').\n\
         - Include example checks AND at least one property check (prop.check) for each function's \
           essential invariant; text may be Japanese, so test with prop.string{{alphabet='japanese'}} where text is involved.\n\
         - When told that a round failed, answer with the complete corrected bundle.\n\n{BUNDLE_DOC}"
    )
}

/// One round of the loop, as recorded.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub round: u32,
    /// `invalid_answer`, `invalid_bundle`, `apply_failed`, `checks_failed`, `verified`,
    /// `llm_error`.
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CheckResult>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub elapsed_ms: u64,
}

/// What verifying one answer found.
struct Verdict {
    outcome: &'static str,
    error: Option<String>,
    checks: Vec<CheckResult>,
    /// What the model is told.
    feedback: String,
    /// The bundle, when it passed.
    bundle: Option<Bundle>,
}

impl Verdict {
    /// A failure before any check ran: the error is also the feedback.
    fn failed(outcome: &'static str, error: impl Into<String>) -> Verdict {
        let error = error.into();
        Verdict {
            outcome,
            feedback: error.clone(),
            error: Some(error),
            checks: Vec::new(),
            bundle: None,
        }
    }
}

/// The result of `generate`.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub id: String,
    pub intent: String,
    /// `merged`, `awaiting_approval`, `failed`, `merge_failed`, `discarded`, `running`.
    pub status: String,
    pub model: String,
    /// The branch the last round ran in: kept while awaiting approval (or after a failure with
    /// `generate_keep_failed_branch`), deleted once merged or failed.
    pub branch: Option<String>,
    pub rounds: Vec<Round>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle: Option<Json>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What to generate.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub intent: String,
    pub max_rounds: Option<u32>,
    pub require_approval: Option<bool>,
    pub by: Option<String>,
}

pub struct Generator {
    /// Where model calls are logged (`ai` rows of the posterity log).
    pub log: crate::posterity::Sink,
    pub live: Storage,
    pub branches: Arc<Branches>,
    pub lua: LuaOptions,
    pub settings: GenerateSettings,
    pub llm: LlmClient,
}

fn sys() -> RequestContext {
    RequestContext::system()
}

fn no_deadline() -> Arc<ExecControl> {
    ExecControl::new(Instant::now(), 0.0)
}

/// Largest intent accepted.
pub const MAX_INTENT: usize = 64 * 1024;

/// The JSON object in a model's answer: a ```json fence, else the outermost braces.
pub fn extract_json(answer: &str) -> Option<&str> {
    if let Some(i) = answer.find("```json").or_else(|| answer.find("```JSON")) {
        let rest = &answer[i + 7..];
        if let Some(j) = rest.find("```") {
            return Some(rest[..j].trim());
        }
    }
    let (a, b) = (answer.find('{')?, answer.rfind('}')?);
    (b > a).then(|| &answer[a..=b])
}

/// The live app as the model should know it: schema, policies, functions.
pub async fn describe_app(live: &Storage) -> Result<String> {
    live.read(&sys(), no_deadline(), |c| {
        let mut out = String::new();
        let mut st = c.prepare(
            "SELECT sql FROM sqlite_schema WHERE sql IS NOT NULL AND name NOT LIKE '\\_ichibase%' ESCAPE '\\'
               AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND name NOT IN (SELECT name FROM _ichibase_policies)
               AND tbl_name NOT IN (SELECT name FROM _ichibase_policies) ORDER BY type DESC, name",
        )?;
        let schema: Vec<String> = st
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        if schema.is_empty() {
            out.push_str("Schema: (empty: no app tables yet)\n");
        } else {
            out.push_str("Schema (SQLite):\n");
            for s in schema {
                out.push_str(&s);
                out.push_str(";\n");
            }
        }
        let policies = crate::auth::policy::list(c)?;
        if !policies.is_empty() {
            out.push_str("Policies:\n");
            for p in policies {
                out.push_str(&format!("{}\n", serde_json::to_string(&p).unwrap_or_default()));
            }
        }
        // The live version of every function, in one query.
        let mut st = c.prepare(
            "SELECT h.name, h.version, f.source FROM _ichibase_function_heads h
             JOIN _ichibase_functions f ON f.name = h.name AND f.version = h.version ORDER BY h.name",
        )?;
        let fns: Vec<(String, i64, String)> = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        if !fns.is_empty() {
            out.push_str("Deployed functions (a bundle function with the same name replaces it):\n");
            for (name, version, source) in fns {
                out.push_str(&format!("-- {name} (version {version})\n{}\n", clip(&source, 4000)));
            }
        }
        Ok(out)
    })
    .await
}

impl Generator {
    /// Run the loop for `req`; `progress` sees each round as it ends.
    pub async fn run(
        &self,
        req: Request,
        progress: &(dyn Fn(&Round) + Sync),
    ) -> Result<Generation> {
        let intent = req.intent.trim().to_string();
        if intent.is_empty() {
            return Err(Error::new(ErrorCode::BadArguments, "The intent is empty"));
        }
        if intent.len() > MAX_INTENT {
            return Err(Error::new(
                ErrorCode::RequestTooLarge,
                format!("The intent is longer than {MAX_INTENT} bytes"),
            ));
        }
        let max_rounds = req
            .max_rounds
            .unwrap_or(self.settings.max_rounds)
            .clamp(1, 20);
        let approval = req
            .require_approval
            .unwrap_or(self.settings.require_approval);
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let branch = format!("gen-{id}");
        {
            let (id, intent, model, by) = (
                id.clone(),
                intent.clone(),
                self.llm.model().to_string(),
                req.by.clone(),
            );
            self.live
                .write(&sys(), no_deadline(), move |c| {
                    c.execute(
                        "INSERT INTO _ichibase_generations (id, intent, status, model, created_by) VALUES (?1, ?2, 'running', ?3, ?4)",
                        rusqlite::params![id, intent, model, by],
                    )?;
                    Ok(())
                })
                .await?;
        }
        let mut out = Generation {
            id: id.clone(),
            intent: intent.clone(),
            status: "running".into(),
            model: self.llm.model().to_string(),
            branch: None,
            rounds: Vec::new(),
            input_tokens: 0,
            output_tokens: 0,
            bundle: None,
            error: None,
        };
        let system = system_prompt();
        let app = describe_app(&self.live).await?;
        let mut messages = vec![Message::user(format!(
            "Intent:\n{intent}\n\nThe live app now:\n{app}\nAnswer with the bundle JSON."
        ))];
        let mut verified: Option<Bundle> = None;
        for round in 1..=max_rounds {
            let started = Instant::now();
            let prompt = messages
                .last()
                .map(|m| m.content.clone())
                .unwrap_or_default();
            let prompt_record = if round == 1 {
                format!("SYSTEM:\n{system}\n\nUSER:\n{prompt}")
            } else {
                prompt
            };
            let called = self.llm.chat(&system, &messages).await;
            self.log_call(&req, &id, round, &called, started);
            let reply = match called {
                Ok(r) => r,
                Err(e) => {
                    let r = Round {
                        round,
                        outcome: "llm_error".into(),
                        error: Some(e.message.clone()),
                        checks: Vec::new(),
                        input_tokens: 0,
                        output_tokens: 0,
                        elapsed_ms: started.elapsed().as_millis() as u64,
                    };
                    self.record(&id, &prompt_record, None, &r).await?;
                    progress(&r);
                    out.rounds.push(r);
                    out.status = "failed".into();
                    out.error = Some(e.message.clone());
                    self.clean_failed_branches(&id, &mut out).await;
                    self.finish(&out).await?;
                    return Ok(out);
                }
            };
            out.input_tokens += reply.usage.input_tokens;
            out.output_tokens += reply.usage.output_tokens;
            let v = self.verify(&reply.text, &branch).await;
            let outcome = v.outcome;
            out.branch = Some(branch.clone())
                .filter(|_| outcome != "invalid_answer" && outcome != "invalid_bundle");
            let r = Round {
                round,
                outcome: outcome.to_string(),
                error: v.error,
                checks: v.checks,
                input_tokens: reply.usage.input_tokens,
                output_tokens: reply.usage.output_tokens,
                elapsed_ms: started.elapsed().as_millis() as u64,
            };
            self.record(&id, &prompt_record, Some(&reply.text), &r)
                .await?;
            progress(&r);
            out.rounds.push(r);
            if let Some(b) = v.bundle {
                verified = Some(b);
                break;
            }
            messages.push(Message::assistant(reply.text));
            messages.push(Message::user(format!(
                "Round {round} failed ({outcome}). Fix the bundle and answer with the complete corrected bundle JSON.\n\n{}{}",
                v.feedback,
                if reply.truncated { "\nNote: your answer was cut off at the token limit; keep it shorter." } else { "" }
            )));
        }
        match verified {
            None => {
                out.status = "failed".into();
                out.error = Some(format!("no verified bundle after {max_rounds} round(s)"));
            }
            Some(b) => {
                out.bundle = serde_json::to_value(&b).ok();
                if approval {
                    out.status = "awaiting_approval".into();
                } else {
                    match bundle::apply(&self.live, vec![b], req.by.clone(), Some(id.clone())).await
                    {
                        Ok(_) => {
                            out.status = "merged".into();
                            let _ = self.branches.delete(&branch).await;
                            out.branch = None;
                        }
                        Err(e) => {
                            out.status = "merge_failed".into();
                            out.error = Some(e.message);
                        }
                    }
                }
            }
        }
        if out.status == "failed" || out.status == "merge_failed" {
            self.clean_failed_branches(&id, &mut out).await;
        }
        self.finish(&out).await?;
        Ok(out)
    }

    /// A failed generation's branch goes, unless `keep_failed_branch` keeps the latest one for
    /// inspection; older failed generations' branches go either way.
    async fn clean_failed_branches(&self, id: &str, out: &mut Generation) {
        let id2 = id.to_string();
        let older: Vec<String> = self
            .live
            .read(&sys(), crate::storage::ExecControl::lookup(), move |c| {
                let mut st = c.prepare(
                    "SELECT branch FROM _ichibase_generations WHERE id <> ?1 AND branch IS NOT NULL AND status IN ('failed', 'merge_failed')",
                )?;
                let rows = st
                    .query_map([id2], |r| r.get::<_, String>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(rows)
            })
            .await
            .unwrap_or_default();
        for b in &older {
            let _ = self.branches.delete(b).await;
        }
        if !older.is_empty() {
            let _ = self
                .live
                .write(&sys(), crate::storage::ExecControl::lookup(), move |c| {
                    c.execute(
                        "UPDATE _ichibase_generations SET branch = NULL WHERE branch IS NOT NULL AND status IN ('failed', 'merge_failed')",
                        [],
                    )?;
                    Ok(())
                })
                .await;
        }
        if !self.settings.keep_failed_branch {
            if let Some(b) = out.branch.take() {
                let _ = self.branches.delete(&b).await;
            }
        }
    }

    /// Verify one answer in a fresh branch.
    async fn verify(&self, answer: &str, branch: &str) -> Verdict {
        // The previous round's branch goes first: a branch always holds the latest attempt.
        let _ = self.branches.delete(branch).await;
        let Some(text) = extract_json(answer) else {
            return Verdict::failed("invalid_answer", "the answer contains no JSON object");
        };
        let b = match Bundle::from_json(text) {
            Ok(b) => b,
            Err(e) => return Verdict::failed("invalid_bundle", e.message),
        };
        if b.checks.is_empty() {
            return Verdict::failed(
                "invalid_bundle",
                "the bundle has no checks: add example checks and property checks",
            );
        }
        let storage = match self.branches.create(branch).await {
            Ok(_) => match self.branches.get(branch).await {
                Ok(s) => s,
                Err(e) => return Verdict::failed("apply_failed", e.message),
            },
            Err(e) => return Verdict::failed("apply_failed", e.message),
        };
        if let Err(e) = bundle::apply(&storage, vec![b.clone()], None, None).await {
            let mut v = Verdict::failed("apply_failed", e.message);
            v.feedback = format!(
                "Applying the bundle failed (nothing of it was kept): {}",
                v.feedback
            );
            return v;
        }
        let env = CheckEnv {
            storage,
            traces: Some(self.live.clone()),
            lua: self.lua,
            rt: tokio::runtime::Handle::current(),
            app: None,
        };
        let checks = bundle::run_checks(&env, &b).await;
        let failed = checks.iter().filter(|r| !r.ok).count();
        if failed > 0 {
            return Verdict {
                outcome: "checks_failed",
                error: Some(format!("{failed} check(s) failed")),
                feedback: format!(
                    "{failed} of {} checks failed:\n{}",
                    checks.len(),
                    bundle::describe_failures(&checks)
                ),
                checks,
                bundle: None,
            };
        }
        Verdict {
            outcome: "verified",
            error: None,
            checks,
            feedback: String::new(),
            bundle: Some(b),
        }
    }

    /// One `ai` row in the posterity log per model call (tokens, attempts, time, outcome).
    fn log_call(
        &self,
        req: &Request,
        generation: &str,
        round: u32,
        called: &Result<crate::llm::Reply>,
        started: Instant,
    ) {
        if !self.log.enabled() {
            return;
        }
        let mut e = crate::posterity::Event::now("ai", None);
        e.user_id = req.by.clone();
        e.name = Some(self.llm.model().to_string());
        e.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        // The same fields as the `ai` module's generation rows (src/ai), so these calls show
        // in `/ai/generations` and `/ai/usage` too (at cost 0: `[llm]` has no prices).
        let ms = e.elapsed_ms;
        let mut detail = json!({"purpose": "generate", "generation": generation, "round": round, "endpoint": self.llm.endpoint(),
            "id": format!("gen-{}", uuid::Uuid::new_v4().simple()), "call": "text",
            "model_requested": self.llm.model(), "model": self.llm.model(),
            "provider_name": self.llm.endpoint().split("://").nth(1).and_then(|h| h.split('/').next()),
            "total_cost": 0.0, "latency": ms, "generation_time": ms, "streamed": false, "cancelled": false, "cache_hit": false});
        match called {
            Ok(r) => {
                e.outcome = Some("ok");
                detail["input_tokens"] = json!(r.usage.input_tokens);
                detail["output_tokens"] = json!(r.usage.output_tokens);
                detail["tokens_prompt"] = json!(r.usage.input_tokens);
                detail["tokens_completion"] = json!(r.usage.output_tokens);
                detail["attempts"] = json!(r.attempts);
                detail["truncated"] = json!(r.truncated);
                detail["finish_reason"] = json!(if r.truncated { "length" } else { "stop" });
            }
            Err(err) => {
                e.outcome = Some("error");
                e.error = Some(err.message.clone());
            }
        }
        e.detail = Some(detail.to_string());
        self.log.record(e);
    }

    async fn record(&self, id: &str, prompt: &str, answer: Option<&str>, r: &Round) -> Result<()> {
        let (id, prompt, answer) = (
            id.to_string(),
            prompt.to_string(),
            answer.map(str::to_string),
        );
        let checks =
            (!r.checks.is_empty()).then(|| serde_json::to_string(&r.checks).unwrap_or_default());
        let r = r.clone();
        self.live
            .write(&sys(), no_deadline(), move |c| {
                c.execute(
                    "INSERT INTO _ichibase_generation_rounds (generation_id, round, prompt, answer, outcome, error, checks, input_tokens, output_tokens, elapsed_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                    rusqlite::params![id, r.round, prompt, answer, r.outcome, r.error, checks, r.input_tokens as i64, r.output_tokens as i64, r.elapsed_ms as i64],
                )?;
                c.execute(
                    "UPDATE _ichibase_generations SET rounds = ?2, input_tokens = input_tokens + ?3, output_tokens = output_tokens + ?4 WHERE id = ?1",
                    rusqlite::params![id, r.round, r.input_tokens as i64, r.output_tokens as i64],
                )?;
                Ok(())
            })
            .await
    }

    async fn finish(&self, g: &Generation) -> Result<()> {
        let (id, status, branch, bundle, error) = (
            g.id.clone(),
            g.status.clone(),
            g.branch.clone(),
            g.bundle.as_ref().map(|b| b.to_string()),
            g.error.clone(),
        );
        self.live
            .write(&sys(), no_deadline(), move |c| {
                c.execute(
                    "UPDATE _ichibase_generations SET status = ?2, branch = ?3, bundle = ?4, error = ?5,
                         finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?1",
                    rusqlite::params![id, status, branch, bundle, error],
                )?;
                Ok(())
            })
            .await
    }
}

/// A recorded generation with every round (prompts and answers included).
pub async fn get(live: &Storage, id: &str) -> Result<Json> {
    let id = id.to_string();
    live.read(&sys(), no_deadline(), move |c| {
        use rusqlite::OptionalExtension;
        let g = c
            .query_row(
                "SELECT id, intent, status, model, branch, rounds, input_tokens, output_tokens, bundle, error, created_by, created_at, finished_at
                 FROM _ichibase_generations WHERE id = ?1",
                [&id],
                |r| {
                    Ok(json!({
                        "id": r.get::<_, String>(0)?, "intent": r.get::<_, String>(1)?,
                        "status": r.get::<_, String>(2)?, "model": r.get::<_, Option<String>>(3)?,
                        "branch": r.get::<_, Option<String>>(4)?, "rounds_run": r.get::<_, i64>(5)?,
                        "input_tokens": r.get::<_, i64>(6)?, "output_tokens": r.get::<_, i64>(7)?,
                        "bundle": r.get::<_, Option<String>>(8)?.and_then(|s| serde_json::from_str::<Json>(&s).ok()),
                        "error": r.get::<_, Option<String>>(9)?, "created_by": r.get::<_, Option<String>>(10)?,
                        "created_at": r.get::<_, String>(11)?, "finished_at": r.get::<_, Option<String>>(12)?,
                    }))
                },
            )
            .optional()?
            .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("No generation '{id}'")))?;
        let mut st = c.prepare(
            "SELECT round, prompt, answer, outcome, error, checks, input_tokens, output_tokens, elapsed_ms, created_at
             FROM _ichibase_generation_rounds WHERE generation_id = ?1 ORDER BY round",
        )?;
        let rounds: Vec<Json> = st
            .query_map([&id], |r| {
                Ok(json!({
                    "round": r.get::<_, i64>(0)?, "prompt": r.get::<_, String>(1)?,
                    "answer": r.get::<_, Option<String>>(2)?, "outcome": r.get::<_, String>(3)?,
                    "error": r.get::<_, Option<String>>(4)?,
                    "checks": r.get::<_, Option<String>>(5)?.and_then(|s| serde_json::from_str::<Json>(&s).ok()),
                    "input_tokens": r.get::<_, i64>(6)?, "output_tokens": r.get::<_, i64>(7)?,
                    "elapsed_ms": r.get::<_, i64>(8)?, "created_at": r.get::<_, String>(9)?,
                }))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let mut g = g;
        g["rounds"] = Json::Array(rounds);
        Ok(g)
    })
    .await
}

pub async fn list(live: &Storage) -> Result<Vec<Json>> {
    live.read(&sys(), no_deadline(), |c| {
        let mut st = c.prepare(
            "SELECT id, intent, status, model, rounds, input_tokens, output_tokens, created_at, finished_at
             FROM _ichibase_generations ORDER BY created_at DESC LIMIT 1000",
        )?;
        let rows = st
            .query_map([], |r| {
                Ok(json!({
                    "id": r.get::<_, String>(0)?, "intent": r.get::<_, String>(1)?,
                    "status": r.get::<_, String>(2)?, "model": r.get::<_, Option<String>>(3)?,
                    "rounds_run": r.get::<_, i64>(4)?, "input_tokens": r.get::<_, i64>(5)?,
                    "output_tokens": r.get::<_, i64>(6)?, "created_at": r.get::<_, String>(7)?,
                    "finished_at": r.get::<_, Option<String>>(8)?,
                }))
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    })
    .await
}

/// Merge a generation that waits for approval; or discard it.
pub async fn decide(
    live: &Storage,
    branches: &Branches,
    id: &str,
    approve: bool,
    by: Option<String>,
) -> Result<Json> {
    let g = get(live, id).await?;
    if g["status"] != "awaiting_approval" && g["status"] != "merge_failed" {
        return Err(Error::new(
            ErrorCode::Conflict,
            format!(
                "Generation '{id}' is {}; only awaiting_approval or merge_failed ones can be approved or discarded",
                g["status"]
            ),
        ));
    }
    let branch = g["branch"].as_str().map(str::to_string);
    let status = if approve {
        let b: Bundle = serde_json::from_value(g["bundle"].clone())
            .map_err(|e| Error::internal(format!("stored bundle unreadable: {e}")))?;
        bundle::apply(live, vec![b], by, Some(id.to_string())).await?;
        "merged"
    } else {
        "discarded"
    };
    if let Some(b) = &branch {
        let _ = branches.delete(b).await;
    }
    let (id2, st) = (id.to_string(), status.to_string());
    live.write(&sys(), no_deadline(), move |c| {
        c.execute(
            "UPDATE _ichibase_generations SET status = ?2, branch = NULL, finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?1",
            rusqlite::params![id2, st],
        )?;
        Ok(())
    })
    .await?;
    get(live, id).await
}
