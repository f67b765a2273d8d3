//! Live apps: WebSocket connections, channels with broadcast and presence, and change-data-
//! capture (CDC) from SQLite filtered through row-level security.
//!
//! Owns the [`hub::Hub`] (connections, channels, presence, bounded per-connection queues) and
//! the `[ws_limits]` caps ([`limits`]), and the [`cdc`] dispatcher (capture triggers, the change log, subscriptions, replay). The WebSocket
//! protocol itself (frames in and out) lives in `apis::ws`; this module never touches sockets.

pub mod cdc;
pub mod hub;
pub mod limits;

pub use hub::Hub;

/// Version of the JSON protocol spoken on `/ws`.
pub const PROTOCOL_VERSION: u32 = 1;
