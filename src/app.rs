//! The `App` handle: the engine's shared state, built once at start and passed everywhere
//! (handlers get it as axum state, background tasks and Lua components clone it).
//!
//! State is private behind one `Arc`; components read it through accessors. A module that
//! brings its own service (a client, a queue, a cache) does not add a field here: it stores the
//! service in the extension map at start ([`AppBuilder::provide`]) and reads it back with
//! [`App::get`]. This file must not know any module by name beyond the engine's core services.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;

use crate::apis::limits::{HttpLimits, SqlGuard};
use crate::auth::Auth;
use crate::config::Config;
use crate::lua::LuaOptions;
use crate::lua::limits::LuaLimits;
use crate::posterity::Posterity;
use crate::realtime::Hub;
use crate::realtime::cdc::Cdc;
use crate::replication::Replicator;
use crate::storage::Storage;

/// The engine's core services; modules' own services live in `ext`.
pub struct Core {
    pub storage: Storage,
    pub auth: Arc<Auth>,
    pub config: Arc<Config>,
    pub lua: LuaOptions,
    pub lua_limits: Arc<LuaLimits>,
    pub hub: Arc<Hub>,
    pub cdc: Cdc,
    pub branches: Arc<crate::branch::Branches>,
    pub posterity: Posterity,
    pub replication: Option<Replicator>,
    pub http: Arc<HttpLimits>,
    pub sql_guard: Arc<SqlGuard>,
}

struct Inner {
    core: Core,
    ext: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
}

/// A cheap, clonable handle to everything the engine shares.
#[derive(Clone)]
pub struct App {
    inner: Arc<Inner>,
}

/// Collects the core services and the modules' services before the [`App`] is sealed.
pub struct AppBuilder {
    core: Core,
    ext: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
}

impl AppBuilder {
    pub fn new(core: Core) -> AppBuilder {
        AppBuilder {
            core,
            ext: HashMap::new(),
        }
    }

    /// The core services, for modules that build their service from them.
    pub fn core(&self) -> &Core {
        &self.core
    }

    /// Make `service` available to every handler and component as `app.get::<T>()`.
    pub fn provide<T: Any + Send + Sync>(&mut self, service: T) {
        self.ext.insert(TypeId::of::<T>(), Box::new(service));
    }

    pub fn build(self) -> App {
        App {
            inner: Arc::new(Inner {
                core: self.core,
                ext: self.ext,
            }),
        }
    }
}

impl App {
    /// A service a module provided at start (`None` if that module is not registered).
    pub fn get<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.inner
            .ext
            .get(&TypeId::of::<T>())
            .and_then(|b| b.downcast_ref::<T>())
    }

    pub fn storage(&self) -> &Storage {
        &self.inner.core.storage
    }
    pub fn auth(&self) -> &Arc<Auth> {
        &self.inner.core.auth
    }
    pub fn config(&self) -> &Arc<Config> {
        &self.inner.core.config
    }
    /// Limits of the Lua sandbox (instructions, memory, time, trace sizes).
    pub fn lua(&self) -> LuaOptions {
        self.inner.core.lua
    }
    /// Who may trace, and the memory budget of concurrent Lua invocations.
    pub fn lua_limits(&self) -> &Arc<LuaLimits> {
        &self.inner.core.lua_limits
    }
    pub fn hub(&self) -> &Arc<Hub> {
        &self.inner.core.hub
    }
    pub fn cdc(&self) -> &Cdc {
        &self.inner.core.cdc
    }
    pub fn branches(&self) -> &Arc<crate::branch::Branches> {
        &self.inner.core.branches
    }
    /// The posterity log and analytics database (DuckDB).
    pub fn posterity(&self) -> &Posterity {
        &self.inner.core.posterity
    }
    /// The WAL replicator when replication is configured.
    pub fn replication(&self) -> Option<&Replicator> {
        self.inner.core.replication.as_ref()
    }
    /// The `[http]` limits and their shared counters.
    pub fn http(&self) -> &Arc<HttpLimits> {
        &self.inner.core.http
    }
    /// The `[sql_guard]` limits: fair share of the pool, write and memory bounds.
    pub fn sql_guard(&self) -> &Arc<SqlGuard> {
        &self.inner.core.sql_guard
    }
}
