//! The module contract and the one registry that names every module.
//!
//! A module is one component of the engine: it owns its HTTP routes, its engine tables
//! (migrations, kept per module), its Lua components, its configuration section and its
//! background work. It implements [`Module`], and [`registry`] is the only place that lists
//! modules: adding a component is one folder (or file) with a `Module` implementation plus one
//! line there (see docs/architecture.md).
//!
//! This file knows modules only by that list; it must not reach into their internals.

use axum::Router;

use crate::app::{App, AppBuilder};
use crate::lua::components::Component;
use crate::storage::migrations::Migration;

/// What every component provides. Every method has a default, so a module implements only
/// what it has.
pub trait Module: Send + Sync + 'static {
    /// Unique, stable name (it keys the module's migrations).
    fn name(&self) -> &'static str;

    /// The module's configuration section (`[name]` of ichibase.toml, read with
    /// `config.section::<T>(name)`); `None` when it has none.
    fn section(&self) -> Option<&'static str> {
        None
    }

    /// The module's own engine tables, in order; each applied once per database, keyed by
    /// (module name, version). Append only.
    fn migrations(&self) -> &'static [Migration] {
        &[]
    }

    /// Build the module's services from the configuration and the core services, and store
    /// them with `builder.provide(...)`; handlers and Lua components read them with
    /// `app.get::<T>()`. Runs once at start, before the server listens.
    fn provide(&self, _builder: &mut AppBuilder) -> anyhow::Result<()> {
        Ok(())
    }

    /// The module's HTTP routes (merged into the one router).
    fn routes(&self) -> Router<App> {
        Router::new()
    }

    /// Global tables the module adds to every Lua sandbox.
    fn lua_components(&self) -> &'static [&'static dyn Component] {
        &[]
    }

    /// Background work, started once the app is built.
    fn start(&self, _app: &App) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Every module, in the order their routes, components and migrations are attached.
/// This is the one place a module is named.
pub fn registry() -> &'static [&'static dyn Module] {
    &[
        &crate::apis::sql::SqlModule,
        &crate::apis::auth::AuthModule,
        &crate::auth::devices::DevicesModule,
        &crate::auth::passkeys::PasskeysModule,
        &crate::apis::admin::AdminModule,
        &crate::apis::functions::FunctionsModule,
        &crate::apis::ws::WsModule,
        &crate::apis::branches::BranchesModule,
        &crate::apis::generate::GenerateModule,
        &crate::apis::analytics::AnalyticsModule,
        &crate::apis::BackupModule,
        &crate::canvas::CanvasModule,
        &crate::console::ConsoleModule,
        &crate::notify::NotifyModule,
        &crate::search::SearchModule,
        &crate::ai::AiModule,
        &crate::flow::FlowModule,
        &crate::egress::EgressModule,
        &crate::vault::VaultModule,
        &crate::files::FilesModule,
        &crate::open::OpenModule,
        &crate::email_in::EmailInModule,
        &crate::auth::safety::AuthSafetyModule,
        &crate::auth::oidc::OidcModule,
        &crate::chat::ChatModule,
        &crate::crdt::CrdtModule,
        &crate::realtime::cdc::CdcModule,
    ]
}

/// Configuration sections modules declare (the core engine's sections are in
/// `config::SECTIONS`).
pub fn sections() -> impl Iterator<Item = &'static str> {
    registry().iter().filter_map(|m| m.section())
}

/// Lua components of every module (after the core components).
pub fn lua_components() -> impl Iterator<Item = &'static dyn Component> {
    registry()
        .iter()
        .flat_map(|m| m.lua_components().iter().copied())
}

/// Apply every module's pending migrations (at start, on the writer's connection).
pub fn migrate(conn: &mut rusqlite::Connection) -> anyhow::Result<usize> {
    let mut n = 0;
    for m in registry() {
        n += crate::storage::migrations::apply_module(conn, m.name(), m.migrations())?;
    }
    Ok(n)
}

/// Let every module provide its services.
pub fn provide(builder: &mut AppBuilder) -> anyhow::Result<()> {
    for m in registry() {
        m.provide(builder)
            .map_err(|e| e.context(format!("starting module '{}'", m.name())))?;
    }
    Ok(())
}

/// Start every module's background work.
pub fn start(app: &App) -> anyhow::Result<()> {
    for m in registry() {
        m.start(app)
            .map_err(|e| e.context(format!("starting module '{}'", m.name())))?;
    }
    Ok(())
}

/// Every module's routes in one router.
pub fn routes() -> Router<App> {
    registry()
        .iter()
        .fold(Router::new(), |r, m| r.merge(m.routes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_sections_are_unique() {
        let mut names = std::collections::HashSet::new();
        for m in registry() {
            assert!(names.insert(m.name()), "two modules are named {}", m.name());
        }
        for s in sections() {
            assert!(
                !crate::config::SECTIONS.contains(&s),
                "section {s} is declared by a module and by the core"
            );
        }
    }

    #[test]
    fn module_migrations_apply_once_and_in_order() {
        static M: &[Migration] = &[
            Migration { version: 1, name: "a", sql: "CREATE TABLE _ichibase_demo (x)" },
            Migration { version: 2, name: "b", sql: "ALTER TABLE _ichibase_demo ADD COLUMN y" },
        ];
        let mut c = rusqlite::Connection::open_in_memory().unwrap();
        assert_eq!(crate::storage::migrations::apply_module(&mut c, "demo", M).unwrap(), 2);
        assert_eq!(crate::storage::migrations::apply_module(&mut c, "demo", M).unwrap(), 0);
        assert_eq!(crate::storage::migrations::apply_module(&mut c, "other", &M[..1]).is_err(), true,
            "another module may not create the same table");
        let n: i64 = c
            .query_row("SELECT count(*) FROM _ichibase_module_migrations WHERE module = 'demo'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2);
    }
}
