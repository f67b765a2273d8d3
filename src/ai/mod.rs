//! `ai`: named models for app code, every model call observable, budgeted, cached and rated.
//!
//! Owns the `[ai]` configuration section (models, prices, fallbacks, budgets, cache, logging),
//! the [`AiService`] (calling models with fallbacks, daily budgets, the response cache, the
//! generation log), the Lua component `ai` (`lua.rs`), the HTTP routes under `/ai` (`http.rs`)
//! and the `ichibase ai` commands (`cli.rs`). Provider protocols are in `provider.rs`.
//!
//! Every call becomes one posterity row of kind `ai` (its fields in `detail`, see
//! [`Generation`]); ratings are rows of kind `ai_feedback`. Nothing here touches SQLite.
//! Must not touch the repair loop's client (`src/llm`) beyond logging through the same rows,
//! nor the privacy guard or the vault: outgoing prompts pass [`AiService::outgoing_prompt`].
//!
//! Threads: Lua runs on a blocking thread (`apis::functions` → `spawn_blocking`). A model call
//! from Lua waits with `Handle::block_on` on that thread, bounded by the invocation's deadline
//! (`wait`): the network I/O is driven by the runtime's reactor, no async worker is ever
//! blocked, the Lua VM executes no instruction while waiting (so the instruction budget is not
//! burnt) and the wall-clock deadline still ends the wait. See docs/ai.md.

pub mod cli;
pub mod eval;
pub mod http;
pub mod lua;
pub mod provider;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use crate::app::{App, AppBuilder};
use crate::core::{Error, ErrorCode, RequestContext, Result};
use provider::{CallError, ChatRequest, Endpoint, JsonMode, Provider, Reply, Usage};

/// The module (one line in `modules::registry`).
pub struct AiModule;

impl crate::modules::Module for AiModule {
    fn name(&self) -> &'static str {
        "ai"
    }
    fn section(&self) -> Option<&'static str> {
        Some("ai")
    }
    fn provide(&self, b: &mut AppBuilder) -> anyhow::Result<()> {
        let s: AiSettings = b.core().config.section("ai")?;
        let svc = AiService::new(s, b.core().posterity.clone())?;
        b.provide(Arc::new(svc));
        Ok(())
    }
    fn routes(&self) -> axum::Router<App> {
        http::routes()
    }
    fn lua_components(&self) -> &'static [&'static dyn crate::lua::components::Component] {
        &[&lua::AiLua]
    }
    fn start(&self, app: &App) -> anyhow::Result<()> {
        if let Some(svc) = app.get::<Arc<AiService>>() {
            if let Some(guard) = crate::egress::guard_of(app) {
                svc.set_guard(guard);
            }
            let svc = Arc::clone(svc);
            // Today's spend so far (budgets survive a restart), read once in the background.
            std::thread::Builder::new()
                .name("ai-budget-seed".into())
                .spawn(move || svc.seed_budgets())?;
        }
        Ok(())
    }
}

/// `[ai.models.NAME]`: one model app code can name.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSettings {
    /// `openai` (any OpenAI-compatible server) or `anthropic`.
    pub provider: Provider,
    /// Base URL: `https://api.openai.com/v1`, `https://api.anthropic.com/v1`, ...
    pub url: String,
    /// The provider's model id.
    pub model: String,
    /// Environment variable holding the API key (none: no key is sent, for local servers).
    pub key_env: Option<String>,
    /// Dollars per million input tokens (uncached).
    pub input_price: f64,
    /// Dollars per million output tokens.
    pub output_price: f64,
    /// Dollars per million cached input tokens (default: `input_price`).
    pub cached_price: Option<f64>,
    /// Seconds one HTTP exchange may take (a streamed one: the whole stream).
    pub timeout_secs: f64,
    /// Extra attempts on this model after a retryable failure (429, 408, 409, 5xx, time-out),
    /// waiting `Retry-After` when given, before moving on to the fallbacks.
    pub retries: u32,
    /// Models (names in `[ai.models]`) tried in order when this one fails retryably.
    pub fallbacks: Vec<String>,
    /// Output token limit sent when the call gives none.
    pub max_tokens: u32,
    /// How `ai.generate_object` asks for JSON: `object`, `schema` or `none`.
    pub json_mode: JsonMode,
}

impl Default for ModelSettings {
    fn default() -> Self {
        ModelSettings {
            provider: Provider::Openai,
            url: String::new(),
            model: String::new(),
            key_env: None,
            input_price: 0.0,
            output_price: 0.0,
            cached_price: None,
            timeout_secs: 60.0,
            retries: 0,
            fallbacks: Vec::new(),
            max_tokens: 1024,
            json_mode: JsonMode::Object,
        }
    }
}

/// `[ai.budget]`: daily (UTC) limits, 0 = none. Checked before every call and during streams.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetSettings {
    /// Dollars all calls together may cost per day.
    pub global_cost: f64,
    /// Tokens (input + output) all calls together may use per day.
    pub global_tokens: u64,
    /// Dollars per user per day.
    pub user_cost: f64,
    pub user_tokens: u64,
    /// Dollars per Lua function per day.
    pub function_cost: f64,
    pub function_tokens: u64,
}

/// `[ai]` in ichibase.toml (or `ICHIBASE_AI__<KEY>`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AiSettings {
    /// The model used when a call names none (default: the only model, when there is one).
    pub default: Option<String>,
    pub models: BTreeMap<String, ModelSettings>,
    /// Keep prompts and answers in the generation log (off: only numbers and outcomes).
    pub log_prompts: bool,
    /// Tool-loop steps when a call gives no `max_steps`.
    pub max_steps: u32,
    /// Most steps a call may ask for.
    pub max_steps_limit: u32,
    /// Extra attempts `ai.generate_object` makes after an answer fails the schema.
    pub object_retries: u32,
    /// Most bytes of one request's prompt (system, messages, tools, schema).
    pub max_prompt_bytes: usize,
    /// Most texts one `ai.embed` call may send.
    pub max_embed_inputs: usize,
    /// Cache answers by default (a call's `cache = true/false` decides for itself).
    pub cache: bool,
    /// Answers the cache keeps (least recently stored are evicted first).
    pub cache_entries: usize,
    /// Seconds a cached answer stays valid.
    pub cache_ttl_secs: f64,
    pub budget: BudgetSettings,
    /// Pass every prompt through the privacy guard (`[egress.guard]`: redact or block one-time
    /// codes, secrets, card numbers, ... before they leave for a provider).
    pub privacy_guard: bool,
}

impl Default for AiSettings {
    fn default() -> Self {
        AiSettings {
            default: None,
            models: BTreeMap::new(),
            log_prompts: true,
            max_steps: 5,
            max_steps_limit: 20,
            object_retries: 2,
            max_prompt_bytes: 1 << 20,
            max_embed_inputs: 256,
            cache: false,
            cache_entries: 1000,
            cache_ttl_secs: 3600.0,
            budget: BudgetSettings::default(),
            privacy_guard: true,
        }
    }
}

/// One configured model, resolved.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    pub settings: ModelSettings,
    pub key: Option<String>,
}

impl ModelSpec {
    /// Dollars for `u` at this model's prices.
    pub fn cost(&self, u: Usage) -> f64 {
        let s = &self.settings;
        let cached = u.cached.min(u.input);
        ((u.input - cached) as f64 * s.input_price
            + cached as f64 * s.cached_price.unwrap_or(s.input_price)
            + u.output as f64 * s.output_price)
            / 1e6
    }

    /// Host of the URL (OpenRouter's `provider_name` is the upstream's name; ours is its host).
    pub fn provider_name(&self) -> String {
        let u = self.settings.url.split("://").nth(1).unwrap_or(&self.settings.url);
        u.split('/').next().unwrap_or(u).to_string()
    }

    fn endpoint(&self) -> Result<Endpoint> {
        if self.key.is_none() {
            if let Some(var) = &self.settings.key_env {
                return Err(Error::new(
                    ErrorCode::AiKeyMissing,
                    format!("model '{}' takes its API key from ${var}, which is not set", self.name),
                ));
            }
        }
        Ok(Endpoint {
            provider: self.settings.provider,
            base: self.settings.url.trim_end_matches('/').to_string(),
            model: self.settings.model.clone(),
            key: self.key.clone(),
            timeout: Duration::from_secs_f64(self.settings.timeout_secs),
            max_tokens: self.settings.max_tokens,
            json_mode: self.settings.json_mode,
        })
    }

    /// What `GET /ai/models` shows (never the key).
    pub fn describe(&self, default: bool) -> Json {
        let s = &self.settings;
        json!({
            "name": self.name, "provider": s.provider.as_str(), "url": s.url, "model": s.model,
            "default": default,
            "key_env": s.key_env, "key_set": self.key.is_some() || s.key_env.is_none(),
            "pricing": {"input": s.input_price, "output": s.output_price,
                        "cached": s.cached_price.unwrap_or(s.input_price), "per": "1M tokens"},
            "timeout_secs": s.timeout_secs, "retries": s.retries, "fallbacks": s.fallbacks,
            "max_tokens": s.max_tokens, "json_mode": s.json_mode,
        })
    }
}

/// What leaves the server for a model provider (the privacy guard's hook point).
pub enum Outgoing<'a> {
    Chat(&'a mut ChatRequest),
    Embed(&'a mut Vec<String>),
}

/// One call being made (and then its log row). Fields keep OpenRouter's names in the log.
#[derive(Debug, Clone)]
pub struct Generation {
    pub id: String,
    pub ctx: RequestContext,
    pub function: Option<String>,
    /// Who called: `lua`, `http`, `replay`, `eval`.
    pub purpose: &'static str,
    /// `text`, `object`, `stream`, `embed`.
    pub call: &'static str,
    pub ts_us: i64,
    pub started: Instant,
    pub model_requested: String,
    pub model_used: Option<String>,
    pub provider: Option<&'static str>,
    pub provider_name: Option<String>,
    pub provider_model: Option<String>,
    pub attempts: u32,
    pub tried: Vec<String>,
    pub usage: Usage,
    /// Usage includes estimates (a stream stopped before the provider reported usage).
    pub estimated: bool,
    pub cost: f64,
    pub first_token: Option<Duration>,
    pub finish_reason: Option<String>,
    pub error: Option<Error>,
    pub cache_hit: bool,
    pub streamed: bool,
    pub cancelled: bool,
    pub steps: u32,
    pub request: Option<Json>,
    pub answer: Option<Json>,
}

/// Daily spend: (dollars, tokens) per scope.
#[derive(Default)]
struct Spend {
    day: i64,
    global: (f64, u64),
    users: HashMap<String, (f64, u64)>,
    functions: HashMap<String, (f64, u64)>,
}

fn today() -> i64 {
    crate::posterity::now_us().div_euclid(86_400_000_000)
}

#[derive(Default)]
struct Cache {
    map: HashMap<String, (Instant, Json)>,
    order: VecDeque<String>,
}

/// Recent generations' owners (user id), to authorise ratings without a DuckDB look-up.
#[derive(Default)]
struct Recent {
    map: HashMap<String, Option<String>>,
    order: VecDeque<String>,
}

const RECENT_MAX: usize = 100_000;

/// The `ai` service: models, the HTTP client, budgets, the cache and the generation log.
pub struct AiService {
    pub settings: AiSettings,
    models: BTreeMap<String, Arc<ModelSpec>>,
    default: Option<String>,
    http: reqwest::Client,
    posterity: crate::posterity::Posterity,
    spend: Mutex<Spend>,
    cache: Mutex<Cache>,
    recent: Mutex<Recent>,
    /// The egress module's privacy guard, set at start (`None`: not checking).
    guard: std::sync::OnceLock<Arc<crate::egress::guard::Guard>>,
}

fn unavailable(msg: impl Into<String>) -> Error {
    Error::new(ErrorCode::LlmUnavailable, msg)
}

impl AiService {
    pub fn new(s: AiSettings, posterity: crate::posterity::Posterity) -> anyhow::Result<AiService> {
        let mut models = BTreeMap::new();
        for (name, m) in &s.models {
            anyhow::ensure!(
                !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
                "[ai.models.{name}]: model names are 1-64 characters of letters, digits, - _ ."
            );
            anyhow::ensure!(
                m.url.starts_with("http://") || m.url.starts_with("https://"),
                "[ai.models.{name}] url must start with http:// or https://, got '{}'",
                m.url
            );
            anyhow::ensure!(!m.model.is_empty(), "[ai.models.{name}] needs model = \"<the provider's model id>\"");
            for (what, p) in [("input_price", m.input_price), ("output_price", m.output_price), ("cached_price", m.cached_price.unwrap_or(0.0))] {
                anyhow::ensure!(p.is_finite() && p >= 0.0, "[ai.models.{name}] {what} must be a price >= 0 (dollars per million tokens)");
            }
            anyhow::ensure!(
                m.timeout_secs.is_finite() && m.timeout_secs > 0.0,
                "[ai.models.{name}] timeout_secs must be a positive number of seconds"
            );
            anyhow::ensure!(m.max_tokens > 0, "[ai.models.{name}] max_tokens must be at least 1");
            for f in &m.fallbacks {
                anyhow::ensure!(s.models.contains_key(f), "[ai.models.{name}] fallback '{f}' is not a model in [ai.models]");
                anyhow::ensure!(f != name, "[ai.models.{name}] cannot be its own fallback");
            }
            let key = m.key_env.as_ref().and_then(|v| std::env::var(v).ok()).filter(|k| !k.is_empty());
            models.insert(name.clone(), Arc::new(ModelSpec { name: name.clone(), settings: m.clone(), key }));
        }
        let default = match &s.default {
            Some(d) => {
                anyhow::ensure!(models.contains_key(d), "[ai] default = '{d}' is not a model in [ai.models]");
                Some(d.clone())
            }
            None if models.len() == 1 => models.keys().next().cloned(),
            None => None,
        };
        anyhow::ensure!(s.max_steps >= 1 && s.max_steps <= s.max_steps_limit, "[ai] needs 1 <= max_steps <= max_steps_limit");
        anyhow::ensure!(s.cache_ttl_secs.is_finite() && s.cache_ttl_secs > 0.0, "[ai] cache_ttl_secs must be a positive number of seconds");
        anyhow::ensure!(s.max_prompt_bytes >= 1024, "[ai] max_prompt_bytes must be at least 1024");
        let b = &s.budget;
        for (what, v) in [("global_cost", b.global_cost), ("user_cost", b.user_cost), ("function_cost", b.function_cost)] {
            anyhow::ensure!(v.is_finite() && v >= 0.0, "[ai.budget] {what} must be dollars >= 0 (0: no limit)");
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(64)
            .user_agent(concat!("ichibase/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(AiService {
            settings: s,
            models,
            default,
            http,
            posterity,
            spend: Mutex::new(Spend { day: today(), ..Default::default() }),
            cache: Mutex::new(Cache::default()),
            recent: Mutex::new(Recent::default()),
            guard: std::sync::OnceLock::new(),
        })
    }

    /// The service of a running app (`AI_UNKNOWN_MODEL` when the module is absent is not
    /// possible: the module is always registered).
    pub fn of(app: &App) -> Result<Arc<AiService>> {
        app.get::<Arc<AiService>>()
            .cloned()
            .ok_or_else(|| Error::internal("the ai module is not running"))
    }

    pub fn posterity(&self) -> &crate::posterity::Posterity {
        &self.posterity
    }

    pub fn models(&self) -> Json {
        Json::Array(
            self.models
                .values()
                .map(|m| m.describe(self.default.as_deref() == Some(m.name.as_str())))
                .collect(),
        )
    }

    /// The model named `name` (or the default), or a clear error.
    pub fn resolve(&self, name: Option<&str>) -> Result<Arc<ModelSpec>> {
        let name = match name.or(self.default.as_deref()) {
            Some(n) => n,
            None if self.models.is_empty() => {
                return Err(Error::new(
                    ErrorCode::AiUnknownModel,
                    "no model is configured: add an [ai.models.NAME] section (provider, url, model, key_env, prices) to ichibase.toml",
                ));
            }
            None => {
                return Err(Error::new(
                    ErrorCode::AiUnknownModel,
                    format!(
                        "no model named and no [ai] default set; configured models: {}",
                        self.models.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        };
        self.models.get(name).cloned().ok_or_else(|| {
            Error::new(
                ErrorCode::AiUnknownModel,
                format!(
                    "unknown model '{}'; configured models: {}",
                    provider::clip(name, 64),
                    if self.models.is_empty() { "none".to_string() } else { self.models.keys().cloned().collect::<Vec<_>>().join(", ") }
                ),
            )
        })
    }

    /// The model and its fallbacks, in order, each once.
    fn chain(&self, m: &Arc<ModelSpec>) -> Vec<Arc<ModelSpec>> {
        let mut out = vec![Arc::clone(m)];
        for f in &m.settings.fallbacks {
            if let Some(spec) = self.models.get(f) {
                if !out.iter().any(|o| o.name == spec.name) {
                    out.push(Arc::clone(spec));
                }
            }
        }
        out
    }

    /// Every prompt leaving the server passes here, once per call, with the identity it runs
    /// as and the model it goes to: the privacy guard (`[egress.guard]`, when `[ai]
    /// privacy_guard` is on) redacts what it finds in the system text, every message and every
    /// embedded text, or refuses the call with `PRIVACY_BLOCKED` for a kind its policy blocks.
    /// What was redacted is logged as counts per kind, never the values.
    pub fn outgoing_prompt(&self, ctx: &RequestContext, model: &ModelSpec, out: Outgoing<'_>) -> Result<()> {
        let Some(guard) = self.guard.get() else { return Ok(()) };
        let mut found: BTreeMap<String, usize> = BTreeMap::new();
        let mut clean = |text: &mut String| -> Result<()> {
            if text.is_empty() {
                return Ok(());
            }
            let scan = guard.check(text, &[])?;
            if !scan.counts.is_empty() {
                for (k, n) in &scan.counts {
                    *found.entry(k.as_str().to_string()).or_default() += n;
                }
                *text = scan.text;
            }
            Ok(())
        };
        match out {
            Outgoing::Chat(req) => {
                if let Some(s) = req.system.as_mut() {
                    clean(s)?;
                }
                for m in &mut req.messages {
                    clean(&mut m.content)?;
                }
            }
            Outgoing::Embed(texts) => {
                for t in texts.iter_mut() {
                    clean(t)?;
                }
            }
        }
        if !found.is_empty() {
            tracing::info!(model = %model.name, user = ?ctx.user_id, trace_id = %ctx.trace_id,
                redacted = %serde_json::to_string(&found).unwrap_or_default(), "privacy guard redacted a prompt");
        }
        Ok(())
    }

    /// Check prompts with `guard` from now on (the egress module's, found at start).
    pub fn set_guard(&self, guard: Arc<crate::egress::guard::Guard>) {
        if self.settings.privacy_guard {
            let _ = self.guard.set(guard);
        }
    }

    /// Start the record of one call.
    pub fn begin(&self, ctx: &RequestContext, function: Option<&str>, purpose: &'static str, call: &'static str, model: &str) -> Generation {
        Generation {
            id: format!("gen-{}", uuid::Uuid::new_v4().simple()),
            ctx: ctx.clone(),
            function: function.map(str::to_string),
            purpose,
            call,
            ts_us: crate::posterity::now_us(),
            started: Instant::now(),
            model_requested: model.to_string(),
            model_used: None,
            provider: None,
            provider_name: None,
            provider_model: None,
            attempts: 0,
            tried: Vec::new(),
            usage: Usage::default(),
            estimated: false,
            cost: 0.0,
            first_token: None,
            finish_reason: None,
            error: None,
            cache_hit: false,
            streamed: false,
            cancelled: false,
            steps: 0,
            request: None,
            answer: None,
        }
    }

    fn note_model(g: &mut Generation, spec: &ModelSpec) {
        g.model_used = Some(spec.name.clone());
        g.provider = Some(spec.settings.provider.as_str());
        g.provider_name = Some(spec.provider_name());
        if !g.tried.contains(&spec.name) {
            g.tried.push(spec.name.clone());
        }
    }

    /// Run `f` on `model`, then its fallbacks, retrying per model: the first success, or the
    /// last failure. Callers pass the prompt through [`Self::outgoing_prompt`] first.
    async fn with_fallbacks<T, F, Fut>(&self, g: &mut Generation, model: &Arc<ModelSpec>, mut f: F) -> Result<(Arc<ModelSpec>, T)>
    where
        F: FnMut(Endpoint, Arc<ModelSpec>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, CallError>>,
    {
        let mut failures: Vec<String> = Vec::new();
        for spec in self.chain(model) {
            let ep = match spec.endpoint() {
                Ok(ep) => ep,
                Err(e) if failures.is_empty() && spec.name == model.name => return Err(e),
                Err(e) => {
                    failures.push(format!("{}: {}", spec.name, e.message));
                    continue;
                }
            };
            Self::note_model(g, &spec);
            let mut tries = 0u32;
            loop {
                tries += 1;
                g.attempts += 1;
                match f(ep.clone(), Arc::clone(&spec)).await {
                    Ok(v) => return Ok((spec, v)),
                    Err(e) if e.retryable && tries <= spec.settings.retries => {
                        let backoff = Duration::from_millis(250u64 << (tries - 1).min(6));
                        let wait = e.retry_after.unwrap_or(backoff).min(Duration::from_secs(60));
                        tracing::warn!(model = %spec.name, attempt = tries, wait_ms = wait.as_millis() as u64, error = %e.message, "model call failed; retrying");
                        tokio::time::sleep(wait).await;
                    }
                    Err(e) if e.retryable => {
                        failures.push(format!("{}: {}", spec.name, e.message));
                        break;
                    }
                    Err(e) => return Err(unavailable(format!("model '{}': {}", spec.name, e.message))),
                }
            }
        }
        Err(unavailable(format!(
            "every model failed ({} attempts): {}",
            g.attempts,
            failures.join("; ")
        )))
    }

    /// One chat exchange on `model` (fallbacks included); usage and cost go into `g`.
    pub async fn chat(&self, g: &mut Generation, model: &Arc<ModelSpec>, req: &ChatRequest) -> Result<Reply> {
        let http = &self.http;
        let mut req = req.clone();
        self.outgoing_prompt(&g.ctx, model, Outgoing::Chat(&mut req))?;
        let req = &req;
        let (spec, reply) = self
            .with_fallbacks(g, model, |ep, _spec| async move { provider::chat(http, &ep, req).await })
            .await?;
        g.usage.add(reply.usage);
        g.cost += spec.cost(reply.usage);
        g.provider_model = Some(reply.provider_model.clone());
        g.steps += 1;
        if g.first_token.is_none() {
            g.first_token = Some(g.started.elapsed());
        }
        Ok(reply)
    }

    /// Open a streamed exchange (fallbacks before the first byte); returns the model that took it.
    pub async fn open_stream(&self, g: &mut Generation, model: &Arc<ModelSpec>, req: &ChatRequest) -> Result<(Arc<ModelSpec>, provider::Events)> {
        let http = &self.http;
        g.streamed = true;
        let mut req = req.clone();
        self.outgoing_prompt(&g.ctx, model, Outgoing::Chat(&mut req))?;
        let req = &req;
        self.with_fallbacks(g, model, |ep, _spec| async move { provider::open_stream(http, &ep, req).await })
            .await
    }

    /// One whole embedding generation for engine callers (search): resolve `model`, check the
    /// budgets of `ctx`'s user and `function`, embed `texts` (waiting at most until
    /// `deadline`), let `check` judge the vectors, and log the generation with its outcome.
    #[allow(clippy::too_many_arguments)]
    pub async fn embed_logged(
        &self,
        ctx: &RequestContext,
        function: &str,
        purpose: &'static str,
        model: &str,
        texts: Vec<String>,
        deadline: Option<Instant>,
        check: impl FnOnce(&[Vec<f64>]) -> Result<()>,
    ) -> Result<Vec<Vec<f64>>> {
        let model = self.resolve(Some(model))?;
        self.check_budget(ctx.user_id.as_deref(), Some(function), (0.0, 0))?;
        let mut g = self.begin(ctx, Some(function), purpose, "embed", &model.name);
        let call = self.embed(&mut g, &model, texts);
        let r = match deadline {
            None => call.await,
            Some(d) => tokio::time::timeout_at(tokio::time::Instant::from_std(d), call)
                .await
                .unwrap_or_else(|_| {
                    Err(Error::new(
                        ErrorCode::TimeoutExceeded,
                        "the embedding call ran past the invocation's time limit",
                    ))
                }),
        };
        let r = r.and_then(|v| check(&v).map(|()| v));
        match &r {
            Ok(_) => g.finish_reason = Some("stop".into()),
            Err(e) => g.error = Some(e.clone()),
        }
        self.finish(g);
        r
    }

    /// Embeddings of `texts` with `model` (no fallbacks: vectors of different models do not mix).
    pub async fn embed(&self, g: &mut Generation, model: &Arc<ModelSpec>, texts: Vec<String>) -> Result<Vec<Vec<f64>>> {
        let mut texts = texts;
        self.outgoing_prompt(&g.ctx, model, Outgoing::Embed(&mut texts))?;
        let ep = model.endpoint()?;
        Self::note_model(g, model);
        g.attempts += 1;
        let (v, usage, pm) = provider::embed(&self.http, &ep, &texts)
            .await
            .map_err(|e| unavailable(format!("model '{}': {}", model.name, e.message)))?;
        g.usage.add(usage);
        g.cost += model.cost(usage);
        g.provider_model = Some(pm);
        g.steps = 1;
        Ok(v)
    }

    /// Refuse a call (`BUDGET_EXCEEDED`) when the day's spend of its user, function or the
    /// whole server has reached a limit, counting `extra` (dollars, tokens) not yet recorded.
    pub fn check_budget(&self, user: Option<&str>, function: Option<&str>, extra: (f64, u64)) -> Result<()> {
        let b = &self.settings.budget;
        let mut sp = self.spend.lock().unwrap_or_else(|p| p.into_inner());
        if sp.day != today() {
            *sp = Spend { day: today(), ..Default::default() };
        }
        let over = |scope: &str, (c, t): (f64, u64), cost_limit: f64, token_limit: u64, key: &str| -> Result<()> {
            let (c, t) = (c + extra.0, t + extra.1);
            if cost_limit > 0.0 && c >= cost_limit {
                return Err(Error::new(
                    ErrorCode::BudgetExceeded,
                    format!("{scope} has spent ${c:.6} today, its daily limit is ${cost_limit} ([ai.budget] {key}_cost); try again tomorrow (UTC)"),
                ));
            }
            if token_limit > 0 && t >= token_limit {
                return Err(Error::new(
                    ErrorCode::BudgetExceeded,
                    format!("{scope} has used {t} tokens today, its daily limit is {token_limit} ([ai.budget] {key}_tokens); try again tomorrow (UTC)"),
                ));
            }
            Ok(())
        };
        over("the server", sp.global, b.global_cost, b.global_tokens, "global")?;
        if let Some(u) = user {
            let s = sp.users.get(u).copied().unwrap_or_default();
            over(&format!("user '{u}'"), s, b.user_cost, b.user_tokens, "user")?;
        }
        if let Some(f) = function {
            let s = sp.functions.get(f).copied().unwrap_or_default();
            over(&format!("function '{f}'"), s, b.function_cost, b.function_tokens, "function")?;
        }
        Ok(())
    }

    fn charge(&self, user: Option<&str>, function: Option<&str>, cost: f64, tokens: u64) {
        let mut sp = self.spend.lock().unwrap_or_else(|p| p.into_inner());
        if sp.day != today() {
            *sp = Spend { day: today(), ..Default::default() };
        }
        let add = |e: &mut (f64, u64)| {
            e.0 += cost;
            e.1 += tokens;
        };
        add(&mut sp.global);
        if let Some(u) = user {
            add(sp.users.entry(u.to_string()).or_default());
        }
        if let Some(f) = function {
            add(sp.functions.entry(f.to_string()).or_default());
        }
    }

    /// Today's spend and the limits, for `/ai/usage`.
    pub fn budgets(&self) -> Json {
        let sp = self.spend.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = sp.day == today();
        let map = |m: &HashMap<String, (f64, u64)>| -> Json {
            Json::Object(
                m.iter()
                    .filter(|_| fresh)
                    .map(|(k, (c, t))| (k.clone(), json!({"cost": c, "tokens": t})))
                    .collect(),
            )
        };
        let g = if fresh { sp.global } else { (0.0, 0) };
        json!({
            "limits": self.settings.budget,
            "today": {"global": {"cost": g.0, "tokens": g.1}, "users": map(&sp.users), "functions": map(&sp.functions)},
        })
    }

    /// Add today's already-logged spend (at start: budgets survive a restart).
    fn seed_budgets(&self) {
        let day_start = chrono::DateTime::from_timestamp(today() * 86_400, 0)
            .map(|d| d.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_default();
        let sql = "SELECT user_id, detail->>'function' AS f,
                          sum(coalesce(CAST(detail->>'total_cost' AS DOUBLE), 0)) AS cost,
                          sum(coalesce(CAST(detail->>'tokens_prompt' AS BIGINT), 0) + coalesce(CAST(detail->>'tokens_completion' AS BIGINT), 0)) AS tokens
                   FROM log WHERE kind = 'ai' AND ts >= CAST({since:String} AS TIMESTAMP) GROUP BY ALL";
        let mut params = serde_json::Map::new();
        params.insert("since".into(), json!(day_start));
        match http::query(&self.posterity, sql, &params, 1_000_000) {
            Ok(rows) => {
                for r in rows {
                    let cost = r["cost"].as_f64().unwrap_or(0.0);
                    let tokens = r["tokens"].as_u64().unwrap_or(0);
                    self.charge(r["user_id"].as_str(), r["f"].as_str(), cost, tokens);
                }
            }
            Err(e) => tracing::warn!(error = %e.message, "ai: could not read today's spend from the log; budgets start at 0"),
        }
    }

    /// The cache key of a request to `model` (only requests without Lua tools are cached).
    pub fn cache_key(&self, model: &str, call: &str, req: &ChatRequest) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(model.as_bytes());
        h.update([0]);
        h.update(call.as_bytes());
        h.update([0]);
        h.update(serde_json::to_vec(req).unwrap_or_default());
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn cache_get(&self, key: &str) -> Option<Json> {
        let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.map
            .get(key)
            .filter(|(t, _)| t.elapsed().as_secs_f64() < self.settings.cache_ttl_secs)
            .map(|(_, v)| v.clone())
    }

    pub fn cache_put(&self, key: String, v: Json) {
        if self.settings.cache_entries == 0 {
            return;
        }
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if c.map.insert(key.clone(), (Instant::now(), v)).is_none() {
            c.order.push_back(key);
        }
        while c.map.len() > self.settings.cache_entries {
            match c.order.pop_front() {
                Some(k) => {
                    c.map.remove(&k);
                }
                None => break,
            }
        }
    }

    /// Write the call's log row (one per call) and charge its spend.
    pub fn finish(&self, g: Generation) {
        let total = g.started.elapsed();
        let tokens = g.usage.total();
        if !g.cache_hit {
            self.charge(g.ctx.user_id.as_deref(), g.function.as_deref(), g.cost, tokens);
        }
        {
            let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if r.map.insert(g.id.clone(), g.ctx.user_id.clone()).is_none() {
                r.order.push_back(g.id.clone());
            }
            while r.map.len() > RECENT_MAX {
                if let Some(k) = r.order.pop_front() {
                    r.map.remove(&k);
                }
            }
        }
        let sink = self.posterity.sink();
        if !sink.enabled() {
            return;
        }
        let total_ms = total.as_secs_f64() * 1e3;
        let ttft_ms = g.first_token.map(|d| d.as_secs_f64() * 1e3);
        let gen_secs = match g.first_token {
            Some(f) if g.streamed => (total - f).as_secs_f64(),
            _ => total.as_secs_f64(),
        };
        let tps = if gen_secs > 0.0 && g.usage.output > 0 { g.usage.output as f64 / gen_secs } else { 0.0 };
        let mut e = crate::posterity::Event::now("ai", Some(&g.ctx));
        e.ts_us = g.ts_us;
        e.name = Some(g.model_used.clone().unwrap_or_else(|| g.model_requested.clone()));
        e.outcome = Some(if g.error.is_some() {
            "error"
        } else if g.cancelled {
            "cancelled"
        } else {
            "ok"
        });
        e.error = g.error.as_ref().map(|e| format!("{}: {}", e.code.name(), provider::clip(&e.message, 1000)));
        e.elapsed_ms = total_ms;
        let log_prompts = self.settings.log_prompts;
        let detail = json!({
            "id": g.id, "function": g.function, "purpose": g.purpose, "call": g.call,
            "model_requested": g.model_requested, "model": g.model_used,
            "provider": g.provider, "provider_name": g.provider_name, "provider_model": g.provider_model,
            "attempts": g.attempts, "fallbacks": g.tried.len().saturating_sub(1), "models_tried": g.tried,
            "tokens_prompt": g.usage.input, "tokens_completion": g.usage.output, "native_tokens_cached": g.usage.cached,
            "input_tokens": g.usage.input, "output_tokens": g.usage.output, "usage_estimated": g.estimated,
            "total_cost": g.cost, "latency": ttft_ms.unwrap_or(total_ms), "generation_time": total_ms,
            "time_to_first_token": ttft_ms, "tokens_per_second": tps,
            "finish_reason": g.finish_reason, "streamed": g.streamed, "cancelled": g.cancelled,
            "cache_hit": g.cache_hit, "steps": g.steps,
            "error_code": g.error.as_ref().map(|e| e.code.name()),
            "request": if log_prompts { g.request.clone() } else { None },
            "answer": if log_prompts { g.answer.clone() } else { None },
        });
        e.detail = Some(detail.to_string());
        sink.record(e);
    }

    /// Who made generation `id` (`Some(None)`: nobody signed in), from memory or the log.
    pub fn owner_of(&self, id: &str) -> Result<Option<Option<String>>> {
        if let Some(u) = self.recent.lock().unwrap_or_else(|p| p.into_inner()).map.get(id) {
            return Ok(Some(u.clone()));
        }
        Ok(http::find(&self.posterity, id)?.map(|row| row["user_id"].as_str().map(str::to_string)))
    }

    /// Attach `ctx`'s verdict to generation `id`: the admin, or the user who made it (any
    /// signed-in user when nobody signed in made it).
    pub fn rate(&self, ctx: &RequestContext, id: &str, score: f64, note: Option<String>) -> Result<Json> {
        if !score.is_finite() || !(-1000.0..=1000.0).contains(&score) {
            return Err(Error::new(ErrorCode::BadArguments, "score must be a number between -1000 and 1000 (e.g. 1 liked, -1 disliked, or 1-5)"));
        }
        if note.as_ref().is_some_and(|n| n.chars().count() > 4000) {
            return Err(Error::new(ErrorCode::BadArguments, "note is limited to 4000 characters"));
        }
        if id.len() > 100 {
            return Err(Error::new(ErrorCode::BadArguments, "not a generation id"));
        }
        let owner = self
            .owner_of(id)?
            .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("no generation '{}'", provider::clip(id, 100))))?;
        if !ctx.is_admin() {
            match (&owner, &ctx.user_id) {
                (_, None) => return Err(Error::new(ErrorCode::AccessDenied, "rating a generation needs a signed-in user")),
                (Some(o), Some(u)) if o != u => {
                    return Err(Error::new(ErrorCode::AccessDenied, "only the user a generation was made for (or the admin) may rate it"));
                }
                _ => {}
            }
        }
        let mut e = crate::posterity::Event::now("ai_feedback", Some(ctx));
        e.name = Some(id.to_string());
        e.outcome = Some("ok");
        let detail = json!({"generation": id, "score": score, "note": note});
        e.detail = Some(detail.to_string());
        self.posterity.sink().record(e);
        Ok(json!({"generation": id, "score": score, "note": note, "user_id": ctx.user_id}))
    }
}
