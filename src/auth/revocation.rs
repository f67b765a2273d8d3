//! Revocation notices for long-lived connections (WebSockets).
//!
//! A request is authenticated once, but a WebSocket lives on. Whenever a credential stops being
//! valid (sign-out, a session revoked, a password changed, a user disabled or re-roled, an API key
//! revoked) [`super::Auth`] bumps a generation here; sockets watch it and re-check their identity
//! with [`super::Auth::still_valid`] at once. Credentials without a session (email + password on
//! each request) are judged by the generation at which their user's credentials last changed.
//!
//! Owns only the generation counter and the per-user change marks; it never decides validity
//! itself (that is `Auth::still_valid`, against the auth cache) and never touches sockets.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;

pub struct Revocations {
    tx: watch::Sender<u64>,
    /// user id -> generation at which the user's sessions/password/role/state last changed.
    users: Mutex<HashMap<String, u64>>,
}

impl Default for Revocations {
    fn default() -> Self {
        Revocations {
            tx: watch::channel(0).0,
            users: Mutex::default(),
        }
    }
}

impl Revocations {
    /// The current generation; take it *before* authenticating a long-lived connection.
    pub fn generation(&self) -> u64 {
        *self.tx.borrow()
    }

    /// A receiver that wakes on every revocation.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    /// Something was revoked (a session, a key): wake the watchers.
    pub(super) fn changed(&self) {
        self.tx.send_modify(|g| *g += 1);
    }

    /// Every credential of `uid` changed (password, role, disabled, all sessions revoked).
    pub(super) fn user_changed(&self, uid: &str) {
        let mut users = self.users.lock().unwrap();
        let mut generation = 0;
        self.tx.send_modify(|g| {
            *g += 1;
            generation = *g;
        });
        users.insert(uid.to_string(), generation);
    }

    /// Whether `uid`'s credentials changed after generation `since`.
    pub fn user_changed_since(&self, uid: &str, since: u64) -> bool {
        self.users
            .lock()
            .unwrap()
            .get(uid)
            .is_some_and(|g| *g > since)
    }
}
