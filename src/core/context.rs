//! The request context: who runs a request, in which role, under which query and trace id.
//!
//! One [`RequestContext`] is built per request at the edge (HTTP today; WebSocket and Lua later)
//! and passed down to storage, which installs it on the connection that runs the request and
//! removes it again at check-in. Identity checks (tokens, sessions, API keys) belong to the auth
//! component; this module only carries the result.

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
}

/// Everything downstream code may know about the caller of one request.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// Client-chosen (`query_id=`) or generated id, echoed in `X-ClickHouse-Query-Id`.
    pub query_id: String,
    /// Id tying log lines, traces and posterity rows of this request together.
    pub trace_id: String,
    /// The authenticated user id; `None` for anonymous and for the built-in admin.
    pub user_id: Option<String>,
    pub role: Role,
    pub started: Instant,
}

impl RequestContext {
    /// The context every request gets until the auth component exists: the admin.
    pub fn admin(query_id: Option<String>) -> Self {
        let trace_id = uuid::Uuid::new_v4().simple().to_string();
        RequestContext {
            query_id: query_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            trace_id,
            user_id: None,
            role: Role::Admin,
            started: Instant::now(),
        }
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}
