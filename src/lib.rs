//! ichibase: an engine for Just-In-Time applications.
//!
//! Layout (each module documents what it owns and what it must not touch):
//! - [`core`]: the error model and the request context every layer passes down.
//! - [`config`]: layered configuration (flags > env > TOML > defaults).
//! - [`storage`]: SQLite — one writer thread, a pool of readers, engine migrations.
//! - [`sql`]: ClickHouse-style SQL: placeholders, formats, execution over storage.
//! - [`auth`]: identities, sessions, JWT, API keys, policies as views.
//! - [`lua`]: the Lua sandbox, its components and deep traces.
//! - [`realtime`]: WebSockets, presence and change-data-capture.
//! - [`llm`]: the language-model client; [`bundle`]: app bundles, applied and checked;
//!   [`branch`]: SQLite branches; [`generate`]: the intent-to-service repair loop.
//! - [`replication`]: continuous WAL backup to S3 or a directory, snapshots, restore.
//! - [`flow`]: durable workflows (`flow.define`, steps journaled in SQLite) and cron.
//! - [`egress`]: `http.fetch` under per-function policies, the privacy guard; [`vault`]:
//!   encrypted secrets Lua only references; [`files`]: `file.*` on object storage.
//! - [`app`]: the `App` handle (shared state with accessors, modules' services).
//! - [`modules`]: the module contract and the one registry that names every module.
//! - [`ai`]: named models for app code (Lua `ai`), the generation log, budgets, cache.
//! - [`apis`]: the HTTP front: request context, identity extractors, request log, errors.
//! - [`server`]: start, serve and shut down gracefully.

pub mod ai;
pub mod apis;
pub mod app;
pub mod auth;
pub mod branch;
pub mod canvas;
pub mod chat;
pub mod console;
pub mod bundle;
pub mod config;
pub mod conns;
pub mod core;
pub mod crdt;
pub mod flow;
pub mod egress;
pub mod email_in;
pub mod files;
pub mod generate;
pub mod llm;
pub mod lua;
pub mod modules;
pub mod notify;
pub mod open;
pub mod posterity;
pub mod realtime;
pub mod replication;
pub mod search;
pub mod server;
pub mod sql;
pub mod storage;
pub mod vault;

/// Version of this build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
