//! The `[ws_limits]` section: who may open a WebSocket from where, and how much one client may
//! hold (sockets per identity / per IP, channels and presence bytes per socket, subscriptions),
//! plus the live socket counts these caps are checked against.
//!
//! Owns these settings, the origin check for cookie-authenticated upgrades and the socket slots.
//! It does not speak the protocol (`apis::ws`), keep channels (`hub`) or decide who a caller is
//! (`auth`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use crate::core::{Error, ErrorCode, RequestContext, Result};

/// `[ws_limits]` in ichibase.toml (or `ICHIBASE_WS_LIMITS__<KEY>`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WsLimitsSettings {
    /// Origins (`scheme://host[:port]`) besides the server's own that may open a WebSocket
    /// authenticated by the session cookie. Empty: same origin only (the `Origin` header's
    /// host must equal the `Host` header). Token-authenticated and anonymous sockets are not
    /// origin-checked (a cross-site page cannot attach someone else's token).
    pub allowed_origins: Vec<String>,
    /// Open sockets in all.
    pub max_total_sockets: usize,
    /// Open sockets of one signed-in user or one API key (the admin is exempt).
    pub max_sockets_per_identity: usize,
    /// Open anonymous sockets from one client IP address.
    pub max_sockets_per_ip: usize,
    /// Channels one socket may be in at once.
    pub max_channels_per_socket: usize,
    /// Bytes of presence metadata (`meta`, as JSON) in one join.
    pub max_presence_bytes: usize,
    /// Change subscriptions one socket may hold.
    pub max_subscriptions_per_socket: usize,
    /// Seconds between re-checks of every socket's credentials (revocations made through this
    /// server close sockets at once; this catches the rest). 0: no periodic re-check.
    pub revalidate_secs: f64,
}

impl Default for WsLimitsSettings {
    fn default() -> Self {
        WsLimitsSettings {
            allowed_origins: Vec::new(),
            max_total_sockets: 10_000,
            max_sockets_per_identity: 32,
            max_sockets_per_ip: 32,
            max_channels_per_socket: 100,
            max_presence_bytes: 4096,
            max_subscriptions_per_socket: 100,
            revalidate_secs: 10.0,
        }
    }
}

/// The settings, checked, and the live socket counts.
#[derive(Debug)]
pub struct WsLimits {
    pub settings: WsLimitsSettings,
    /// Normalised allowed origins (`scheme://host:port`, lower case).
    origins: Vec<String>,
    counts: Arc<Mutex<Counts>>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_key: HashMap<String, usize>,
}

/// A socket's place under the caps; released when dropped (the socket closed, or the upgrade
/// never completed).
#[derive(Debug)]
pub struct Slot {
    counts: Arc<Mutex<Counts>>,
    key: Option<String>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap();
        c.total = c.total.saturating_sub(1);
        if let Some(k) = &self.key {
            if let Some(n) = c.by_key.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    c.by_key.remove(k);
                }
            }
        }
    }
}

impl WsLimits {
    pub fn new(settings: WsLimitsSettings) -> anyhow::Result<WsLimits> {
        let s = &settings;
        for (name, v) in [
            ("max_total_sockets", s.max_total_sockets),
            ("max_sockets_per_identity", s.max_sockets_per_identity),
            ("max_sockets_per_ip", s.max_sockets_per_ip),
            ("max_channels_per_socket", s.max_channels_per_socket),
            (
                "max_subscriptions_per_socket",
                s.max_subscriptions_per_socket,
            ),
        ] {
            anyhow::ensure!(v >= 1, "[ws_limits] {name} must be at least 1");
        }
        anyhow::ensure!(
            s.max_presence_bytes >= 4,
            "[ws_limits] max_presence_bytes must be at least 4 (room for `null`)"
        );
        anyhow::ensure!(
            s.revalidate_secs >= 0.0 && s.revalidate_secs.is_finite(),
            "[ws_limits] revalidate_secs must be a number of seconds >= 0 (0: off)"
        );
        let origins = s
            .allowed_origins
            .iter()
            .map(|o| {
                normalize_origin(o).ok_or_else(|| {
                    anyhow::anyhow!(
                        "[ws_limits] allowed_origins: '{o}' is not an origin like https://app.example.com or http://localhost:3000 (scheme http or https, a host, an optional port, nothing else; no wildcards)"
                    )
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(WsLimits {
            settings,
            origins,
            counts: Arc::default(),
        })
    }

    /// May a cookie-authenticated upgrade come from `origin` to a server reached as `host`?
    pub fn check_origin(&self, origin: Option<&str>, host: Option<&str>) -> Result<()> {
        let deny = |why: String| {
            Err(Error::new(
                ErrorCode::AccessDenied,
                format!(
                    "WebSocket refused: {why}. A socket authenticated by the session cookie must come from this server's own origin or one in [ws_limits] allowed_origins; other clients authenticate with ?access_token= or an Authorization header"
                ),
            ))
        };
        let Some(origin) = origin else {
            return deny("no Origin header".into());
        };
        let Some(norm) = normalize_origin(origin) else {
            return deny(format!("Origin '{}' is not allowed", clip(origin)));
        };
        if self.origins.iter().any(|o| *o == norm) {
            return Ok(());
        }
        // Same origin: the origin's host:port is the Host header's (default ports implied).
        let scheme = norm.split("://").next().unwrap_or("");
        let default_port = if scheme == "https" { "443" } else { "80" };
        let same = host
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty() && !h.contains(['/', '@', '?', '#', ' ']))
            .map(|h| {
                if has_port(&h) {
                    h
                } else {
                    format!("{h}:{default_port}")
                }
            })
            .is_some_and(|h| norm == format!("{scheme}://{h}"));
        if same {
            Ok(())
        } else {
            deny(format!("Origin '{}' is not allowed", clip(origin)))
        }
    }

    /// Take a socket slot for `ctx` (connecting from `ip`), or refuse with 429.
    pub fn admit(&self, ctx: &RequestContext, ip: Option<std::net::IpAddr>) -> Result<Slot> {
        let s = &self.settings;
        let key_id = ctx
            .claims
            .as_ref()
            .and_then(|c| c.get("key_id"))
            .and_then(|v| v.as_str());
        let (key, cap, what) = if ctx.is_admin() {
            (None, usize::MAX, "")
        } else if let Some(u) = &ctx.user_id {
            (
                Some(format!("user:{u}")),
                s.max_sockets_per_identity,
                "max_sockets_per_identity",
            )
        } else if let Some(k) = key_id {
            (
                Some(format!("key:{k}")),
                s.max_sockets_per_identity,
                "max_sockets_per_identity",
            )
        } else {
            let ip = ip.map_or_else(|| "unknown".to_string(), |i| i.to_string());
            (
                Some(format!("ip:{ip}")),
                s.max_sockets_per_ip,
                "max_sockets_per_ip",
            )
        };
        let mut c = self.counts.lock().unwrap();
        if c.total >= s.max_total_sockets {
            return Err(Error::new(
                ErrorCode::TooManyRequests,
                format!(
                    "the server holds its maximum of {} WebSockets ([ws_limits] max_total_sockets); try again later",
                    s.max_total_sockets
                ),
            ));
        }
        if let Some(k) = &key {
            let n = c.by_key.get(k).copied().unwrap_or(0);
            if n >= cap {
                let who = if k.starts_with("ip:") {
                    "anonymous sockets from this address"
                } else {
                    "sockets of this identity"
                };
                return Err(Error::new(
                    ErrorCode::TooManyRequests,
                    format!(
                        "too many {who}: at most {cap} at once ([ws_limits] {what}); close one first"
                    ),
                ));
            }
            *c.by_key.entry(k.clone()).or_default() += 1;
        }
        c.total += 1;
        Ok(Slot {
            counts: Arc::clone(&self.counts),
            key,
        })
    }

    /// Open sockets counted against the caps.
    pub fn open_sockets(&self) -> usize {
        self.counts.lock().unwrap().total
    }
}

fn clip(s: &str) -> String {
    s.chars().take(100).collect()
}

fn has_port(hostport: &str) -> bool {
    match hostport.rfind(':') {
        // An IPv6 literal ends with ']' unless a port follows it.
        Some(i) => !hostport[i..].contains(']'),
        None => false,
    }
}

/// `scheme://host[:port]` (http or https only, no user, path, query or fragment) as
/// `scheme://host:port` in lower case with the default port made explicit; `None` for
/// anything else (`null`, `file://`, look-alikes with user info or a path).
pub fn normalize_origin(o: &str) -> Option<String> {
    let o = o.trim().to_ascii_lowercase();
    let (scheme, rest) = o.split_once("://")?;
    let default_port = match scheme {
        "http" => "80",
        "https" => "443",
        _ => return None,
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty()
        || rest.chars().any(|c| {
            matches!(c, '/' | '@' | '?' | '#' | '\\' | '*' | '%')
                || c.is_whitespace()
                || c.is_control()
        })
    {
        return None;
    }
    let hostport = if has_port(rest) {
        let (h, p) = rest.rsplit_once(':')?;
        if h.is_empty() || p.is_empty() || !p.chars().all(|c| c.is_ascii_digit()) || p.len() > 5 {
            return None;
        }
        format!("{h}:{}", p.parse::<u16>().ok()?)
    } else {
        format!("{rest}:{default_port}")
    };
    Some(format!("{scheme}://{hostport}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(origins: &[&str]) -> WsLimits {
        WsLimits::new(WsLimitsSettings {
            allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn origins() {
        let l = limits(&["https://app.example.com", "http://localhost:3000/"]);
        let ok = |o: &str, h: &str| l.check_origin(Some(o), Some(h)).is_ok();
        assert!(ok("http://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(ok("HTTP://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(ok("https://example.com", "example.com"));
        assert!(ok("https://example.com:443", "example.com"));
        assert!(ok("http://[::1]:9000", "[::1]:9000"));
        assert!(ok("https://app.example.com", "api.example.com"));
        assert!(ok("http://localhost:3000", "api.example.com"));
        for bad in [
            "null",
            "",
            "http://evil.com",
            "http://127.0.0.1:8081",
            "http://127.0.0.1:8080.evil.com",
            "http://127.0.0.1:8080@evil.com",
            "http://evil.com/127.0.0.1:8080",
            "http://evil.com#127.0.0.1:8080",
            "file://127.0.0.1:8080",
            "http://127.0.0.1",
            "http://app.example.com",
            "https://app.example.com.evil.com",
            "https://evilapp.example.com",
        ] {
            assert!(!ok(bad, "127.0.0.1:8080"), "{bad}");
        }
        assert!(l.check_origin(None, Some("127.0.0.1:8080")).is_err());
        assert!(l.check_origin(Some("http://127.0.0.1:8080"), None).is_err());
    }

    #[test]
    fn bad_settings_fail() {
        for o in [
            "*",
            "app.example.com",
            "https://*.example.com",
            "https://a.com/path",
            "ftp://a.com",
        ] {
            assert!(
                WsLimits::new(WsLimitsSettings {
                    allowed_origins: vec![o.into()],
                    ..Default::default()
                })
                .is_err(),
                "{o}"
            );
        }
        assert!(
            WsLimits::new(WsLimitsSettings {
                max_sockets_per_ip: 0,
                ..Default::default()
            })
            .is_err()
        );
    }

    #[test]
    fn slots_are_released() {
        let l = WsLimits::new(WsLimitsSettings {
            max_sockets_per_ip: 2,
            ..Default::default()
        })
        .unwrap();
        let anon = RequestContext::anon(None);
        let ip = Some("10.0.0.1".parse().unwrap());
        let a = l.admit(&anon, ip).unwrap();
        let _b = l.admit(&anon, ip).unwrap();
        assert_eq!(
            l.admit(&anon, ip).unwrap_err().code,
            ErrorCode::TooManyRequests
        );
        assert!(l.admit(&anon, Some("10.0.0.2".parse().unwrap())).is_ok());
        drop(a);
        assert!(l.admit(&anon, ip).is_ok());
        assert_eq!(l.open_sockets(), 1);
    }
}

#[cfg(test)]
mod origin_tests {
    use super::*;

    #[test]
    fn origins_normalise_to_scheme_host_and_explicit_port() {
        for (given, want) in [
            ("https://app.example.com", "https://app.example.com:443"),
            ("http://app.example.com", "http://app.example.com:80"),
            ("HTTPS://App.Example.COM/", "https://app.example.com:443"),
            ("  http://localhost:3000  ", "http://localhost:3000"),
            ("http://localhost:03000", "http://localhost:3000"),
            ("https://example.com:443", "https://example.com:443"),
            ("http://[::1]", "http://[::1]:80"),
            ("http://[::1]:9000", "http://[::1]:9000"),
            ("http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
        ] {
            assert_eq!(normalize_origin(given).as_deref(), Some(want), "{given}");
        }
    }

    #[test]
    fn anything_but_an_origin_is_refused() {
        for bad in [
            "",
            "null",
            "app.example.com",
            "ftp://a.com",
            "file:///etc/passwd",
            "https://",
            "https:///",
            "https://a.com/path",
            "https://a.com//",
            "https://user@a.com",
            "https://a.com?x=1",
            "https://a.com#frag",
            "https://a.com\\b",
            "https://*.a.com",
            "https://a%2ecom",
            "https://a .com",
            "https://a.com:",
            "https://:443",
            "https://a.com:x80",
            "https://a.com:123456",
            "https://a.com:65536",
            "https://a.com:-1",
        ] {
            assert_eq!(normalize_origin(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn ports_are_seen_after_ipv6_brackets_only() {
        assert!(has_port("a.com:80"));
        assert!(has_port("[::1]:80"));
        assert!(!has_port("[::1]"));
        assert!(!has_port("a.com"));
    }

    #[test]
    fn clip_keeps_at_most_100_characters() {
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(150);
        assert_eq!(clip(&long).chars().count(), 100);
    }
}
