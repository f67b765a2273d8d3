//! Secure egress: `http.fetch` (and `http.get` / `http.post`) from Lua under a per-function
//! policy, with the privacy guard over everything that leaves and an audit row per call.
//!
//! Owns: the `[egress]` section ([`policy`]), the privacy guard ([`guard`], a reusable API for
//! other components), the HTTP client and its pinned resolver ([`fetch`]), and the `http` Lua
//! component ([`lua`]). Secrets come from the vault (`crate::vault`) as references resolved at
//! the moment a request leaves. Must not touch storage or other modules' tables.
//!
//! How a call leaves: the URL is parsed as browsers do (so `127.1`, `0x7f000001`, `2130706433`
//! are the loopback address they mean), the policy checks scheme, host, port, method and path;
//! the host name is resolved once (or taken from `[egress] resolve`) and every address checked
//! against the denied classes (loopback, private, link-local, cloud metadata, unspecified,
//! multicast, reserved, IPv4-mapped/NAT64/6to4 forms of those) unless the policy's
//! `allow_addresses` names it; the connection goes to that checked address (the client's
//! resolver answers only from these pins, so a second DNS answer cannot rebind it); redirects
//! are followed by hand and every hop checked again. Sizes and time are bounded, and the wait
//! counts against the invocation's own deadline.

pub mod fetch;
pub mod guard;
pub mod lua;
pub mod policy;

use std::sync::Arc;

use crate::app::{App, AppBuilder};
use crate::lua::components::Component;

pub use fetch::Egress;
pub use guard::{Guard, Kind, Scan};

/// The egress module: `[egress]`, the `http` Lua global and the guard service.
pub struct EgressModule;

impl crate::modules::Module for EgressModule {
    fn name(&self) -> &'static str {
        "egress"
    }
    fn section(&self) -> Option<&'static str> {
        Some("egress")
    }
    fn provide(&self, b: &mut AppBuilder) -> anyhow::Result<()> {
        let s: policy::EgressSettings = b.core().config.section("egress")?;
        s.validate()?;
        b.provide(Egress::new(s)?);
        Ok(())
    }
    fn lua_components(&self) -> &'static [&'static dyn Component] {
        &[&lua::Http]
    }
}

impl Egress {
    /// The guard of a running app (for other components: `crate::egress::guard_of(&app)`).
    pub fn guard_arc(&self) -> Arc<Guard> {
        Arc::clone(&self.guard)
    }
}

/// The privacy guard of `app`, when the egress module is registered.
pub fn guard_of(app: &App) -> Option<Arc<Guard>> {
    app.get::<Egress>().map(|e| e.guard_arc())
}
