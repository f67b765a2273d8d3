//! The `[http]` section: limits of the HTTP front (connections, timeouts, streaming to slow
//! clients, fair use of the database per identity) and the state they share across requests.
//!
//! Owns these settings and their counters; it does not serve requests itself.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use serde::Deserialize;

use crate::sql::spool::SpoolLimits;

/// `[http]` in ichibase.toml (or `ICHIBASE_HTTP__<KEY>`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Bytes of a streamed result one request may hold in memory for a slow client before
    /// spilling to a temporary file.
    pub spool_memory: u64,
    /// Bytes of a streamed result one request may hold for a slow client in all.
    pub spool_disk: u64,
    /// Bytes of results all requests together may hold for slow clients.
    pub spool_total: u64,
    /// Seconds a client may take no part of a streamed answer before it is abandoned.
    pub send_timeout_secs: f64,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            spool_memory: 8 << 20,
            spool_disk: 1 << 30,
            spool_total: 4 << 30,
            send_timeout_secs: 60.0,
        }
    }
}

/// The `[http]` settings and the counters requests share.
#[derive(Debug)]
pub struct HttpLimits {
    pub settings: HttpSettings,
    spooled: Arc<AtomicU64>,
}

impl HttpLimits {
    pub fn new(settings: HttpSettings) -> anyhow::Result<HttpLimits> {
        anyhow::ensure!(
            settings.send_timeout_secs > 0.0 && settings.send_timeout_secs.is_finite(),
            "[http] send_timeout_secs must be a positive number of seconds"
        );
        anyhow::ensure!(
            settings.spool_memory <= settings.spool_disk && settings.spool_disk <= settings.spool_total,
            "[http] needs spool_memory <= spool_disk <= spool_total"
        );
        Ok(HttpLimits {
            settings,
            spooled: Arc::default(),
        })
    }

    /// Bounds for one streamed answer.
    pub fn spool(&self) -> SpoolLimits {
        let s = &self.settings;
        SpoolLimits {
            memory: s.spool_memory,
            per_request: s.spool_disk,
            total: Arc::clone(&self.spooled),
            total_limit: s.spool_total,
            send_timeout: Duration::from_secs_f64(s.send_timeout_secs),
        }
    }
}
