//! App bundles: what a model (or a person) proposes and ichibase verifies before it goes live —
//! schema migrations, policies, grants, Lua services and checks.
//!
//! Owns the bundle format ([`Bundle`], documented in `docs/bundles.md`), its validation, applying
//! bundles to a storage in ONE transaction (so a failure anywhere leaves the database exactly as
//! it was), running a bundle's checks (examples and Lua/property checks) on a storage, and
//! rendering failures (error, shrunk counterexample, trace excerpt) for people and models.
//! Must not choose where bundles run: branches and the repair loop decide that.

use std::time::Instant;

use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use crate::auth::policy::{self, GrantSpec, PolicySpec};
use crate::core::{Error, ErrorCode, RequestContext, Result, Role};
use crate::lua::{self, CheckMode, Invocation, LuaOptions, store};
use crate::storage::{ExecControl, Storage};

/// A migration: SQL text, optionally named.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MigrationSpec {
    Sql(String),
    Named { name: String, sql: String },
}

impl MigrationSpec {
    pub fn sql(&self) -> &str {
        match self {
            MigrationSpec::Sql(s) => s,
            MigrationSpec::Named { sql, .. } => sql,
        }
    }
    pub fn label(&self, i: usize) -> String {
        match self {
            MigrationSpec::Sql(_) => format!("migration {}", i + 1),
            MigrationSpec::Named { name, .. } => format!("migration {} ({name})", i + 1),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionSpec {
    pub name: String,
    pub source: String,
    /// Trace every call of the deployed function.
    #[serde(default)]
    pub trace: bool,
}

/// Who a check runs as (default: the admin).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunAs {
    pub user_id: Option<String>,
    #[serde(default = "user_role")]
    pub role: String,
}

fn user_role() -> String {
    "user".into()
}

/// One check: an example (`function` + `input` + `expect`/`expect_error`) or Lua code (`lua`)
/// that passes unless it raises — typically `prop.check(...)` calls.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Json>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<Json>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lua: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, rename = "as", skip_serializing_if = "Option::is_none")]
    pub run_as: Option<RunAs>,
}

/// A generated UI (see docs/canvas.md): TSX compiled when the bundle is validated, stored as
/// a new version of the UI `name` for `to` (`user:<id>` or a channel) when it is applied.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UiSpec {
    pub name: String,
    pub code: String,
    #[serde(default, skip_serializing_if = "Json::is_null")]
    pub props: Json,
    pub to: String,
}

/// Largest UI source in a bundle.
const MAX_UI_SOURCE: usize = 1024 * 1024;

impl UiSpec {
    fn compile(&self) -> Result<crate::canvas::compile::Compiled> {
        crate::canvas::check_name(&self.name)?;
        crate::realtime::hub::may_join(&RequestContext::system(), &self.to)
            .map_err(|e| bad(format!("ui '{}': to: {}", self.name, e.message)))?;
        if self.code.len() > MAX_UI_SOURCE {
            return Err(bad(format!("ui '{}' is larger than {MAX_UI_SOURCE} bytes", self.name)));
        }
        if !(self.props.is_object() || self.props.is_null()) {
            return Err(bad(format!("ui '{}': props must be an object", self.name)));
        }
        crate::canvas::compile::compile(&self.name, &self.code).map_err(|e| {
            Error::new(
                ErrorCode::UiCompileError,
                format!("ui '{}' at line {} column {}: {}", self.name, e.line, e.column, e.message),
            )
        })
    }
}

/// The unit of change (see `docs/bundles.md`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub migrations: Vec<MigrationSpec>,
    #[serde(default)]
    pub policies: Vec<PolicySpec>,
    #[serde(default)]
    pub grants: Vec<GrantSpec>,
    #[serde(default)]
    pub functions: Vec<FunctionSpec>,
    #[serde(default)]
    pub checks: Vec<CheckSpec>,
    /// Generated UIs (compile-checked with the bundle, deployed with it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uis: Vec<UiSpec>,
    /// Tables made conflict-free replicated (CRR) tables (`src/crdt`), after the migrations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub crdt: Vec<String>,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorCode::BadArguments, msg)
}

/// Statements a migration may not contain: they would break the one-transaction guarantee or
/// reach outside the database.
const REFUSED_VERBS: &[&str] = &[
    "BEGIN",
    "COMMIT",
    "END",
    "ROLLBACK",
    "SAVEPOINT",
    "RELEASE",
    "ATTACH",
    "DETACH",
    "VACUUM",
    "PRAGMA",
];

impl Bundle {
    /// Parse a bundle from JSON text (errors name the field).
    pub fn from_json(text: &str) -> Result<Bundle> {
        let b = Self::from_json_unchecked(text)?;
        b.validate()?;
        Ok(b)
    }

    /// Parse a bundle that was validated when it was applied (stored bundles).
    pub fn from_json_unchecked(text: &str) -> Result<Bundle> {
        serde_json::from_str(text).map_err(|e| bad(format!("Invalid bundle: {e}")))
    }

    /// Everything that can be checked without a database.
    pub fn validate(&self) -> Result<()> {
        if self.name.trim().is_empty() || self.name.len() > 128 {
            return Err(bad("Invalid bundle: name must be 1-128 characters"));
        }
        for (i, m) in self.migrations.iter().enumerate() {
            check_migration(m.sql()).map_err(|e| bad(format!("{}: {}", m.label(i), e.message)))?;
        }
        for f in &self.functions {
            store::check_name(&f.name)?;
            if f.source.len() > store::MAX_SOURCE {
                return Err(bad(format!(
                    "function '{}' is larger than {} bytes",
                    f.name,
                    store::MAX_SOURCE
                )));
            }
            lua::deploy_check(&f.name, &f.source).map_err(|(e, line)| {
                let at = line.map(|l| format!(" at line {l}")).unwrap_or_default();
                Error::new(e.code, format!("function '{}'{at}: {}", f.name, e.message))
            })?;
        }
        for u in &self.uis {
            u.compile()?;
        }
        if self.checks.is_empty() {
            return Err(bad(
                "Invalid bundle: it needs at least one check (\"checks\": [...]); nothing goes live unverified",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for c in &self.checks {
            if !names.insert(c.name.as_str()) {
                return Err(bad(format!("two checks are named '{}'", c.name)));
            }
            match (&c.function, &c.lua) {
                (Some(_), None) => {
                    if c.expect.is_some() && c.expect_error.is_some() {
                        return Err(bad(format!(
                            "check '{}': give expect or expect_error, not both",
                            c.name
                        )));
                    }
                }
                (None, Some(src)) => {
                    lua::compile_check(&format!("check:{}", c.name), src).map_err(|(e, _)| {
                        Error::new(e.code, format!("check '{}': {}", c.name, e.message))
                    })?;
                }
                _ => {
                    return Err(bad(format!(
                        "check '{}' needs either \"function\" (an example) or \"lua\" (code, e.g. prop.check)",
                        c.name
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Refuse transaction control, attachments and engine tables in migration SQL.
fn check_migration(sql: &str) -> Result<()> {
    let parsed = crate::sql::parse::parse(sql)?;
    if parsed.statements.is_empty() {
        return Err(bad("empty migration"));
    }
    if parsed.insert.is_some() || parsed.format.is_some() {
        return Err(bad(
            "FORMAT clauses and inline data are not allowed in migrations",
        ));
    }
    for st in &parsed.statements {
        if REFUSED_VERBS.contains(&st.verb.as_str()) {
            return Err(bad(format!(
                "{} statements are not allowed in migrations (each bundle is applied in one transaction)",
                st.verb
            )));
        }
        if !st.params.is_empty() {
            return Err(bad("migrations cannot have {name:Type} parameters"));
        }
    }
    for t in crate::sql::lexer::tokenize(sql)? {
        let text = t
            .text(sql)
            .trim_matches(|c| c == '"' || c == '`' || c == '[' || c == ']');
        let lower = text.to_ascii_lowercase();
        if lower.starts_with("_ichibase") || lower.starts_with("sqlite_") {
            return Err(bad(format!(
                "migrations may not touch engine tables ('{text}')"
            )));
        }
    }
    Ok(())
}

/// Apply `bundles` on `c` in ONE transaction: every migration, policy, grant and function
/// version, plus a row per bundle in `_ichibase_bundles`. On any error nothing remains.
pub fn apply_all(
    c: &mut Connection,
    bundles: &[Bundle],
    by: Option<&str>,
    generation: Option<&str>,
) -> Result<Vec<i64>> {
    if !c.is_autocommit() {
        return Err(Error::internal(
            "apply_all needs a connection outside a transaction",
        ));
    }
    c.execute_batch("BEGIN IMMEDIATE")?;
    let r = (|| -> Result<Vec<i64>> {
        let mut ids = Vec::new();
        for b in bundles {
            ids.push(apply_one(c, b, by, generation)?);
        }
        Ok(ids)
    })();
    match r {
        Ok(ids) => {
            if let Err(e) = c.execute_batch("COMMIT") {
                let _ = c.execute_batch("ROLLBACK");
                return Err(e.into());
            }
            Ok(ids)
        }
        Err(e) => {
            if !c.is_autocommit() {
                let _ = c.execute_batch("ROLLBACK");
            }
            Err(e)
        }
    }
}

fn apply_one(
    c: &mut Connection,
    b: &Bundle,
    by: Option<&str>,
    generation: Option<&str>,
) -> Result<i64> {
    b.validate()?;
    let ctx = |what: String| move |e: Error| Error::new(e.code, format!("{what}: {}", e.message));
    for (i, m) in b.migrations.iter().enumerate() {
        let parsed = crate::sql::parse::parse(m.sql())?;
        for st in &parsed.statements {
            crate::crdt::check_statement(c, &st.verb, &st.sql).map_err(ctx(m.label(i)))?;
            c.execute_batch(&st.sql)
                .map_err(Error::from)
                .map_err(ctx(m.label(i)))?;
            if c.is_autocommit() {
                return Err(bad(format!(
                    "{} ended the bundle's transaction",
                    m.label(i)
                )));
            }
        }
    }
    // CRR tables: the listed ones become CRR tables; columns a migration added to one are
    // captured from now on.
    crate::crdt::engine::refresh(c).map_err(ctx("crdt".into()))?;
    for t in &b.crdt {
        crate::crdt::engine::enable(c, t).map_err(ctx(format!("crdt table '{t}'")))?;
    }
    for p in &b.policies {
        policy::create(c, p).map_err(ctx(format!("policy '{}'", p.name)))?;
    }
    for g in &b.grants {
        policy::grant(c, g).map_err(ctx(format!("grant on '{}'", g.object)))?;
    }
    for f in &b.functions {
        store::deploy(c, &f.name, &f.source, f.trace, by)
            .map_err(ctx(format!("function '{}'", f.name)))?;
    }
    for u in &b.uis {
        let compiled = u.compile()?;
        let props = if u.props.is_null() { json!({}) } else { u.props.clone() };
        crate::canvas::store::deploy(c, &u.name, &u.to, &u.code, &compiled, &props, by)
            .map_err(ctx(format!("ui '{}'", u.name)))?;
    }
    let text = serde_json::to_string(b).map_err(|e| Error::internal(e.to_string()))?;
    c.execute(
        "INSERT INTO _ichibase_bundles (name, bundle, applied_by, generation_id) VALUES (?1, ?2, ?3, ?4)",
        rusqlite::params![b.name, text, by, generation],
    )?;
    Ok(c.last_insert_rowid())
}

/// Apply `bundles` to `storage` on its writer (one transaction).
pub async fn apply(
    storage: &Storage,
    bundles: Vec<Bundle>,
    by: Option<String>,
    generation: Option<String>,
) -> Result<Vec<i64>> {
    storage
        .write(
            &RequestContext::system(),
            ExecControl::new(Instant::now(), 0.0),
            move |c| apply_all(c, &bundles, by.as_deref(), generation.as_deref()),
        )
        .await
}

/// The outcome of one check.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Json>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<Json>,
    /// Property outcomes reported by `prop.check` (failures carry the shrunk counterexample).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub properties: Vec<Json>,
    /// Id of the stored trace of the failing run (`GET /trace/{id}` on the live server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The last traced lines of the failing run, with locals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_excerpt: Option<String>,
    pub elapsed_ms: u64,
}

/// Where checks run and where traces of failures are kept.
#[derive(Clone)]
pub struct CheckEnv {
    /// The storage the bundle was applied to (a branch).
    pub storage: Storage,
    /// Failing traces are saved here (the live database, so they outlive the branch).
    pub traces: Option<Storage>,
    pub lua: LuaOptions,
    pub rt: tokio::runtime::Handle,
    /// The server's services (posterity log, hub); `None` outside a server.
    pub app: Option<crate::app::App>,
}

fn ctx_for(run_as: &Option<RunAs>) -> RequestContext {
    match run_as {
        None => RequestContext::system(),
        Some(a) => {
            let mut c = RequestContext::new(None, Role::from_name(&a.role));
            c.user_id = a.user_id.clone();
            c
        }
    }
}

async fn invoke(env: &CheckEnv, ctx: RequestContext, inv: Invocation) -> Result<lua::Outcome> {
    let runtime = lua::Runtime {
        storage: env.storage.clone(),
        traces: env.traces.clone(),
        rt: env.rt.clone(),
        options: env.lua,
        app: env.app.clone(),
    };
    tokio::task::spawn_blocking(move || lua::invoke(&runtime, ctx, inv))
        .await
        .map_err(|e| Error::internal(format!("check task failed: {e}")))
}

/// Equal as JSON, with numbers compared by value (Lua may return 2.0 for 2).
pub fn same(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) => x.as_f64() == y.as_f64(),
        (Json::Array(x), Json::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
        }
        (Json::Object(x), Json::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        // An empty Lua table is encoded as {}; accept it for an expected [].
        (Json::Object(x), Json::Array(y)) | (Json::Array(y), Json::Object(x)) => {
            x.is_empty() && y.is_empty()
        }
        _ => a == b,
    }
}

/// Run every check of `bundle` on `env.storage`, in order.
pub async fn run_checks(env: &CheckEnv, bundle: &Bundle) -> Vec<CheckResult> {
    let mut out = Vec::new();
    for c in &bundle.checks {
        out.push(run_check(env, c).await);
    }
    out
}

async fn run_check(env: &CheckEnv, c: &CheckSpec) -> CheckResult {
    let started = Instant::now();
    let mut res = CheckResult {
        name: c.name.clone(),
        ok: false,
        error: None,
        error_code: None,
        line: None,
        result: None,
        expected: None,
        properties: Vec::new(),
        trace_id: None,
        trace_excerpt: None,
        elapsed_ms: 0,
    };
    let seed = c.seed.unwrap_or_else(|| {
        let r = crate::auth::secrets::random_bytes(4);
        i64::from(u32::from_le_bytes([r[0], r[1], r[2], r[3]]) >> 1)
    });
    match (&c.function, &c.lua) {
        (Some(function), _) => {
            let src = env
                .storage
                .read(
                    &RequestContext::system(),
                    ExecControl::new(Instant::now(), 0.0),
                    {
                        let f = function.clone();
                        move |conn| store::get(conn, &f, None)
                    },
                )
                .await;
            let src = match src {
                Ok(s) => s,
                Err(e) => {
                    res.error = Some(e.message);
                    res.error_code = Some(e.code.name().into());
                    res.elapsed_ms = started.elapsed().as_millis() as u64;
                    return res;
                }
            };
            let ctx = ctx_for(&c.run_as);
            let trace_id = ctx.trace_id.clone();
            let inv = Invocation {
                function: function.clone(),
                version: src.version,
                source: src.source,
                input: c.input.clone().unwrap_or(Json::Object(Default::default())),
                trace: true,
                check: None,
                trace_owner: None,
            };
            match invoke(env, ctx.clone(), inv).await {
                Err(e) => res.error = Some(e.message),
                Ok(o) => {
                    let failed = match (&o.result, &c.expect, &c.expect_error) {
                        (Ok(v), Some(want), _) => {
                            res.result = Some(v.clone());
                            res.expected = Some(want.clone());
                            if same(v, want) {
                                None
                            } else {
                                Some(format!("returned {v}, expected {want}"))
                            }
                        }
                        (Ok(v), None, Some(msg)) => {
                            res.result = Some(v.clone());
                            Some(format!(
                                "returned {v}, expected an error containing '{msg}'"
                            ))
                        }
                        (Ok(v), None, None) => {
                            res.result = Some(v.clone());
                            None
                        }
                        (Err(e), _, Some(msg)) if e.message.contains(msg.as_str()) => None,
                        (Err(e), _, _) => {
                            res.error_code = Some(e.code.name().into());
                            res.line = o.error_line;
                            Some(e.message.clone())
                        }
                    };
                    match failed {
                        None => res.ok = true,
                        Some(msg) => {
                            res.error = Some(msg);
                            keep_trace(env, &o, &mut res, &trace_id);
                        }
                    }
                }
            }
        }
        (None, Some(source)) => {
            let name = format!("check:{}", c.name);
            let ctx = ctx_for(&c.run_as);
            let inv = Invocation {
                function: name.clone(),
                version: 0,
                source: source.clone(),
                input: Json::Object(Default::default()),
                trace: false,
                check: Some(CheckMode { seed, replay: None }),
                trace_owner: None,
            };
            match invoke(env, ctx.clone(), inv.clone()).await {
                Err(e) => res.error = Some(e.message),
                Ok(o) => {
                    res.properties = o.reports.clone();
                    match &o.result {
                        Ok(v) => {
                            res.ok = true;
                            if !v.is_null() && v != &Json::Bool(true) {
                                res.result = Some(v.clone());
                            }
                        }
                        Err(e) => {
                            res.error = Some(e.message.clone());
                            res.error_code = Some(e.code.name().into());
                            res.line = o.error_line;
                            // Trace one run: the shrunk counterexample alone when a property
                            // failed, else the whole check again (same seed).
                            let failed = o.reports.iter().find(|r| r["ok"] == json!(false));
                            let replay = failed.map(|r| {
                                (
                                    r["property"].as_str().unwrap_or("").to_string(),
                                    r["counterexample"].clone(),
                                )
                            });
                            let rctx = ctx_for(&c.run_as);
                            let trace_id = rctx.trace_id.clone();
                            let mut tinv = inv;
                            tinv.trace = true;
                            tinv.check = Some(CheckMode { seed, replay });
                            if let Ok(t) = invoke(env, rctx.clone(), tinv).await {
                                keep_trace(env, &t, &mut res, &trace_id);
                            }
                        }
                    }
                }
            }
        }
        (None, None) => {
            res.error = Some("the check has neither function nor lua".into());
        }
    }
    res.elapsed_ms = started.elapsed().as_millis() as u64;
    res
}

/// Excerpt the trace of a failing run; [`lua::invoke`] saved it (to the live database when
/// configured) under the run's trace id.
fn keep_trace(env: &CheckEnv, o: &lua::Outcome, res: &mut CheckResult, trace_id: &str) {
    let Some((steps, _)) = &o.steps else { return };
    res.trace_excerpt = Some(excerpt(steps, 24));
    if env.traces.is_some() {
        res.trace_id = Some(trace_id.to_string());
    }
}

/// The last `n` traced lines outside the `prop` module, with their locals.
pub fn excerpt(steps: &[lua::trace::Step], n: usize) -> String {
    let mine: Vec<&lua::trace::Step> = steps.iter().filter(|s| &*s.source != "prop").collect();
    let start = mine.len().saturating_sub(n);
    let mut out = String::new();
    if start > 0 {
        out.push_str(&format!("… {start} earlier steps\n"));
    }
    for s in &mine[start..] {
        let locals = crate::llm::clip(&s.locals.to_json().to_string(), 240);
        out.push_str(&format!("{}:{} {}\n", s.source, s.line, locals));
    }
    out
}

/// A short, model-readable account of failed checks.
pub fn describe_failures(results: &[CheckResult]) -> String {
    let mut out = String::new();
    for r in results.iter().filter(|r| !r.ok) {
        out.push_str(&format!("- check '{}' FAILED", r.name));
        if let Some(l) = r.line {
            out.push_str(&format!(" at line {l}"));
        }
        out.push_str(&format!(": {}\n", r.error.as_deref().unwrap_or("failed")));
        for p in r.properties.iter().filter(|p| p["ok"] == json!(false)) {
            out.push_str(&format!(
                "  property '{}' failed after {} runs (seed {}); minimal counterexample after {} shrinks: {}\n  original failing input: {}\n  error: {}\n",
                p["property"].as_str().unwrap_or("?"),
                p["runs"],
                p["seed"],
                p["shrinks"],
                p["counterexample"],
                crate::llm::clip(&p["original"].to_string(), 300),
                p["error"].as_str().unwrap_or(""),
            ));
        }
        if let Some(t) = &r.trace_excerpt {
            out.push_str("  trace of the failing run (chunk:line locals-after-the-line):\n");
            for line in t.lines() {
                out.push_str("    ");
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_is_a_valid_bundle() {
        let doc = include_str!("../../docs/bundles.md");
        let start = doc.find("```json\n").unwrap() + 8;
        let end = start + doc[start..].find("\n```").unwrap();
        let b = Bundle::from_json(&doc[start..end]).unwrap();
        assert_eq!(b.checks.len(), 4);
        assert!(
            b.checks
                .iter()
                .any(|c| c.lua.as_deref().is_some_and(|l| l.contains("prop.check")))
        );
    }

    #[test]
    fn migrations_refuse_transaction_control_and_engine_tables() {
        for bad in [
            "BEGIN; CREATE TABLE a (x)",
            "CREATE TABLE a (x); COMMIT",
            "ATTACH 'x.db' AS x",
            "PRAGMA writable_schema = 1",
            "DROP TABLE _ichibase_users",
            "CREATE TABLE a AS SELECT * FROM \"_ichibase_sessions\"",
            "DELETE FROM sqlite_schema",
            "INSERT INTO t VALUES ({x:String})",
            "",
        ] {
            assert!(check_migration(bad).is_err(), "{bad}");
        }
        check_migration("CREATE TABLE a (x TEXT DEFAULT '_ichibase'); CREATE INDEX a_x ON a (x)")
            .unwrap();
    }

    #[test]
    fn results_compare_numbers_by_value() {
        assert!(same(&json!({"a": [1, 2.0]}), &json!({"a": [1.0, 2]})));
        assert!(same(&json!({}), &json!([])));
        assert!(!same(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
        assert!(!same(&json!("1"), &json!(1)));
    }
}
