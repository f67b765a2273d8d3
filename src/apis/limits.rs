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
    /// Open client connections at most (WebSocket connections included). Lowered at start to
    /// the process's file-descriptor limit minus `reserved_fds`.
    pub max_connections: usize,
    /// File descriptors kept free for the database, WAL, analytics, spool files and backups:
    /// the connection cap stays this far below the fd limit.
    pub reserved_fds: u64,
    /// Seconds from a connection's opening (or the first byte of its next request) to the end
    /// of the request's headers; a slower head is dropped (slowloris, sockets that never send).
    pub header_read_timeout_secs: f64,
    /// Seconds a keep-alive connection may sit idle between requests before it is closed.
    pub idle_timeout_secs: f64,
    /// Seconds a connection arriving at the cap waits for a slot (the oldest idle connection
    /// is closed to make room) before it is answered 503 and closed; the listener accepts
    /// nothing else meanwhile.
    pub cap_wait_secs: f64,
    /// Connections the kernel queues for the server to accept (capped by the system, e.g.
    /// net.core.somaxconn); a short queue drops new connections during a burst.
    pub listen_backlog: u32,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            spool_memory: 8 << 20,
            spool_disk: 1 << 30,
            spool_total: 4 << 30,
            send_timeout_secs: 60.0,
            max_connections: 10_000,
            reserved_fds: 256,
            header_read_timeout_secs: 10.0,
            idle_timeout_secs: 60.0,
            cap_wait_secs: 1.0,
            listen_backlog: 4096,
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
        for (name, v) in [
            ("header_read_timeout_secs", settings.header_read_timeout_secs),
            ("idle_timeout_secs", settings.idle_timeout_secs),
        ] {
            anyhow::ensure!(
                v > 0.0 && v.is_finite() && v < 1e9,
                "[http] {name} must be a positive number of seconds (got {v})"
            );
        }
        anyhow::ensure!(
            settings.cap_wait_secs >= 0.0 && settings.cap_wait_secs.is_finite() && settings.cap_wait_secs < 1e9,
            "[http] cap_wait_secs must be zero or a positive number of seconds"
        );
        anyhow::ensure!(settings.max_connections >= 1, "[http] max_connections must be at least 1");
        anyhow::ensure!(
            (1..=i32::MAX as u32).contains(&settings.listen_backlog),
            "[http] listen_backlog must be between 1 and {}",
            i32::MAX
        );
        Ok(HttpLimits {
            settings,
            spooled: Arc::default(),
        })
    }

    /// The connection limits for a process allowed `fd_limit` open files: `max_connections`,
    /// lowered so that `reserved_fds` descriptors stay free.
    pub fn connections(&self, fd_limit: u64) -> Result<crate::conns::ConnLimits, ConnCapError> {
        let s = &self.settings;
        let room = fd_limit.saturating_sub(s.reserved_fds);
        if room < 1 {
            return Err(ConnCapError::NoRoom {
                fd_limit,
                reserved: s.reserved_fds,
            });
        }
        let cap = (s.max_connections as u64).min(room) as usize;
        Ok(crate::conns::ConnLimits {
            cap,
            configured: s.max_connections,
            header_read_timeout: Duration::from_secs_f64(s.header_read_timeout_secs),
            idle_timeout: Duration::from_secs_f64(s.idle_timeout_secs),
            cap_wait: Duration::from_secs_f64(s.cap_wait_secs),
            backlog: s.listen_backlog,
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

/// Why no connection cap fits under the file-descriptor limit.
#[derive(Debug, thiserror::Error)]
pub enum ConnCapError {
    #[error(
        "[http] reserved_fds ({reserved}) leaves no file descriptors for connections under the \
         process's limit of {fd_limit}: raise the limit (ulimit -n) or lower reserved_fds"
    )]
    NoRoom { fd_limit: u64, reserved: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, reserved: u64) -> HttpLimits {
        HttpLimits::new(HttpSettings {
            max_connections: max,
            reserved_fds: reserved,
            ..HttpSettings::default()
        })
        .unwrap()
    }

    #[test]
    fn the_cap_stays_below_the_fd_limit() {
        assert_eq!(limits(10_000, 256).connections(1024).unwrap().cap, 768);
        assert_eq!(limits(64, 256).connections(1024).unwrap().cap, 64);
        assert_eq!(limits(10_000, 256).connections(1 << 20).unwrap().cap, 10_000);
        assert!(matches!(
            limits(10, 256).connections(200),
            Err(ConnCapError::NoRoom { fd_limit: 200, reserved: 256 })
        ));
    }

    #[test]
    fn bad_timeouts_are_refused() {
        for s in [
            HttpSettings { header_read_timeout_secs: 0.0, ..HttpSettings::default() },
            HttpSettings { idle_timeout_secs: f64::NAN, ..HttpSettings::default() },
            HttpSettings { cap_wait_secs: -1.0, ..HttpSettings::default() },
            HttpSettings { max_connections: 0, ..HttpSettings::default() },
        ] {
            assert!(HttpLimits::new(s).is_err());
        }
    }
}
