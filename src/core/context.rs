//! The request context: who runs a request, in which role, under which query and trace id.
//!
//! One [`RequestContext`] is built per request at the edge (HTTP today; WebSocket and Lua later)
//! and passed down to storage, which installs it on the connection that runs the request and
//! removes it again at check-in. Identity checks (tokens, sessions, API keys) belong to the auth
//! component; this module only carries the result.

use std::sync::Arc;
use std::time::Instant;

/// The role a request runs as. Until identities exist every request runs as [`Role::Admin`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Full access, as SQLite's own `main` user.
    Admin,
    /// Unauthenticated client.
    Anon,
    /// A named application role (e.g. `user`).
    Named(String),
}

impl Role {
    pub fn as_str(&self) -> &str {
        match self {
            Role::Admin => "admin",
            Role::Anon => "anon",
            Role::Named(n) => n,
        }
    }

    /// The role named `name` (`admin` and `anon` are the built-in ones).
    pub fn from_name(name: &str) -> Role {
        match name {
            "admin" => Role::Admin,
            "anon" => Role::Anon,
            other => Role::Named(other.to_string()),
        }
    }
}

/// Everything downstream code may know about the caller of one request.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// Client-chosen (`query_id=`) or generated id, echoed in `X-ClickHouse-Query-Id`.
    pub query_id: String,
    /// Id tying log lines, traces and posterity rows of this request together.
    pub trace_id: String,
    /// The authenticated user id; `None` for anonymous requests and for machine keys without a user.
    pub user_id: Option<String>,
    pub role: Role,
    /// Claims of the credential (JWT claims, or the equivalent for sessions and API keys),
    /// readable from SQL with `auth_claim(name)`.
    pub claims: Option<Arc<serde_json::Map<String, serde_json::Value>>>,
    /// The server-side session behind the credential, when there is one.
    pub session_id: Option<String>,
    /// The engine evaluates admin-written SQL (a policy predicate) with this identity: the
    /// authorizer allows it, while `auth_*()` still return the identity.
    pub elevated: bool,
    pub started: Instant,
}

impl RequestContext {
    /// A context for `role` with fresh ids.
    pub fn new(query_id: Option<String>, role: Role) -> Self {
        RequestContext {
            query_id: query_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            trace_id: uuid::Uuid::new_v4().simple().to_string(),
            user_id: None,
            role,
            claims: None,
            session_id: None,
            elevated: false,
            started: Instant::now(),
        }
    }

    /// The engine's own work (migrations, auth lookups): full access, no user.
    pub fn system() -> Self {
        Self::new(None, Role::Admin)
    }

    /// An anonymous request.
    pub fn anon(query_id: Option<String>) -> Self {
        Self::new(query_id, Role::Anon)
    }

    /// One claim as SQL sees it through `auth_claim(name)`.
    pub fn claim(&self, name: &str) -> Option<&serde_json::Value> {
        self.claims.as_ref()?.get(name)
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}
