//! Core types shared by every component: the typed error model and the per-request context.
//!
//! Owns: [`error::Error`] (ClickHouse-style error codes mapped to HTTP statuses) and
//! [`context::RequestContext`] (who runs a request, with which role, under which query id).
//! Must not touch: storage, HTTP routing or SQL parsing; everything else depends on this module,
//! never the other way round.

pub mod background;
pub mod context;
pub mod error;

pub use context::{RequestContext, Role};
pub use error::{Error, ErrorCode, Result};

/// Names that become URL path segments and file names (functions, branches): 1-64 characters of
/// ASCII letters, digits, `_` and `-`. `what` names the thing in the error.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(Error::new(
            ErrorCode::BadArguments,
            format!("{what} '{name}' must be 1-64 characters of letters, digits, '_' and '-'"),
        ));
    }
    Ok(())
}
