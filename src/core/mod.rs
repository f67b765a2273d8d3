//! Core types shared by every component: the typed error model and the per-request context.
//!
//! Owns: [`error::Error`] (ClickHouse-style error codes mapped to HTTP statuses) and
//! [`context::RequestContext`] (who runs a request, with which role, under which query id).
//! Must not touch: storage, HTTP routing or SQL parsing; everything else depends on this module,
//! never the other way round.

pub mod context;
pub mod error;

pub use context::{RequestContext, Role};
pub use error::{Error, ErrorCode, Result};
