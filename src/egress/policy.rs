//! Egress policies: which hosts, ports, methods, path prefixes and addresses a function may
//! reach, and the address classes denied unless a policy names them.
//!
//! Owns the `[egress]` settings and the pure checks (no I/O); `egress::fetch` applies them
//! hop by hop.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::Deserialize;

use super::guard::{GuardSettings, Kind};
use crate::core::{Error, ErrorCode, Result};

/// `[egress]` in ichibase.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressSettings {
    /// Largest request body `http.fetch` sends, bytes.
    pub max_request_bytes: usize,
    /// Largest response body it reads, bytes (past it the call fails).
    pub max_response_bytes: usize,
    /// Seconds a call waits for the whole answer unless it asks for less (`timeout=`).
    pub timeout_secs: f64,
    /// Most seconds a call may ask for.
    pub max_timeout_secs: f64,
    /// Seconds to connect.
    pub connect_timeout_secs: f64,
    /// Most redirects followed (each hop re-checked).
    pub max_redirects: usize,
    /// Names answered without DNS, like /etc/hosts (their addresses are checked as DNS answers
    /// are).
    pub resolve: BTreeMap<String, Vec<IpAddr>>,
    /// The policy of functions without their own (none: such functions cannot reach out).
    pub default: Option<Policy>,
    /// Policies by function name (`name`, or a prefix ending in `*`).
    pub functions: BTreeMap<String, Policy>,
    /// The privacy guard.
    pub guard: GuardSettings,
}

impl Default for EgressSettings {
    fn default() -> Self {
        EgressSettings {
            max_request_bytes: 1 << 20,
            max_response_bytes: 10 << 20,
            timeout_secs: 10.0,
            max_timeout_secs: 30.0,
            connect_timeout_secs: 5.0,
            max_redirects: 5,
            resolve: BTreeMap::new(),
            default: None,
            functions: BTreeMap::new(),
            guard: GuardSettings::default(),
        }
    }
}

impl EgressSettings {
    pub fn validate(&self) -> anyhow::Result<()> {
        for (n, v) in [
            ("timeout_secs", self.timeout_secs),
            ("max_timeout_secs", self.max_timeout_secs),
            ("connect_timeout_secs", self.connect_timeout_secs),
        ] {
            anyhow::ensure!(v > 0.0 && v.is_finite(), "[egress] {n} must be a positive number of seconds");
        }
        anyhow::ensure!(self.max_response_bytes > 0, "[egress] max_response_bytes must be positive");
        for (name, p) in &self.functions {
            p.validate().map_err(|e| anyhow::anyhow!("[egress] policy {name}: {e}"))?;
        }
        if let Some(p) = &self.default {
            p.validate().map_err(|e| anyhow::anyhow!("[egress] default policy: {e}"))?;
        }
        Ok(())
    }

    /// The policy of `function` (its own, the longest matching `prefix*`, or the default).
    pub fn policy_for(&self, function: &str) -> Option<(&str, &Policy)> {
        if let Some((k, p)) = self.functions.get_key_value(function) {
            return Some((k.as_str(), p));
        }
        self.functions
            .iter()
            .filter(|(k, _)| k.ends_with('*') && function.starts_with(&k[..k.len() - 1]))
            .max_by_key(|(k, _)| k.len())
            .map(|(k, p)| (k.as_str(), p))
            .or(self.default.as_ref().map(|p| ("default", p)))
    }
}

/// What one function may reach.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Host names (`api.example.com`, `*.example.com` for any subdomain, `*` for any host) or
    /// IP literals. Addresses are checked whatever the name.
    pub hosts: Vec<String>,
    /// Ports (default 80 and 443).
    pub ports: Vec<u16>,
    /// Methods (default GET, HEAD, POST, PUT, PATCH, DELETE).
    pub methods: Vec<String>,
    /// Path prefixes (default: any path).
    pub paths: Vec<String>,
    /// URL schemes (default https and http).
    pub schemes: Vec<String>,
    /// Address ranges (CIDR) allowed although private, loopback, link-local, ... .
    pub allow_addresses: Vec<IpNet>,
    /// Privacy-guard kinds this function may send (e.g. `email` for a mailer).
    pub allow_kinds: Vec<Kind>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            hosts: Vec::new(),
            ports: vec![80, 443],
            methods: ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"].map(String::from).to_vec(),
            paths: Vec::new(),
            schemes: vec!["https".into(), "http".into()],
            allow_addresses: Vec::new(),
            allow_kinds: Vec::new(),
        }
    }
}

impl Policy {
    fn validate(&self) -> anyhow::Result<()> {
        for s in &self.schemes {
            anyhow::ensure!(s == "http" || s == "https", "scheme {s} is not http or https");
        }
        for p in &self.paths {
            anyhow::ensure!(p.starts_with('/'), "path prefix {p} must start with /");
        }
        Ok(())
    }

    pub fn host_allowed(&self, host: &url::Host<&str>) -> bool {
        let h = match host {
            url::Host::Domain(d) => d.trim_end_matches('.').to_ascii_lowercase(),
            url::Host::Ipv4(a) => a.to_string(),
            url::Host::Ipv6(a) => a.to_string(),
        };
        self.hosts.iter().any(|p| {
            let p = p.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
            if p == "*" {
                return true;
            }
            if let Some(suffix) = p.strip_prefix("*.") {
                h.ends_with(&format!(".{suffix}"))
            } else {
                p == h
            }
        })
    }

    /// Refuse `url` with `method` unless the policy allows scheme, host, port, method and path.
    pub fn check_url(&self, name: &str, method: &str, url: &url::Url) -> Result<()> {
        let deny = |what: String| {
            Err(Error::new(
                ErrorCode::EgressDenied,
                format!("http.fetch refused: {what} (egress policy '{name}')"),
            ))
        };
        if !self.schemes.iter().any(|s| s == url.scheme()) {
            return deny(format!("scheme {} is not allowed", url.scheme()));
        }
        let Some(host) = url.host() else {
            return deny("the URL has no host".into());
        };
        if !url.username().is_empty() || url.password().is_some() {
            return deny("credentials in the URL are not allowed (use the vault)".into());
        }
        if !self.host_allowed(&host) {
            return deny(format!("host {host} is not allowed"));
        }
        let port = url.port_or_known_default().unwrap_or(0);
        if !self.ports.contains(&port) {
            return deny(format!("port {port} is not allowed"));
        }
        if !self.methods.iter().any(|m| m.eq_ignore_ascii_case(method)) {
            return deny(format!("method {method} is not allowed"));
        }
        if !self.paths.is_empty() && !self.paths.iter().any(|p| url.path().starts_with(p.as_str())) {
            return deny(format!("path {} is not allowed", url.path()));
        }
        Ok(())
    }

    /// Refuse an address in a denied class unless a range of the policy names it.
    pub fn check_addr(&self, name: &str, host: &str, ip: IpAddr) -> Result<()> {
        let Some(class) = denied_class(ip) else { return Ok(()) };
        let canon = canonical(ip);
        if self
            .allow_addresses
            .iter()
            .any(|n| n.contains(&ip) || n.contains(&canon))
        {
            return Ok(());
        }
        Err(Error::new(
            ErrorCode::EgressDenied,
            format!(
                "http.fetch refused: {host} is {ip}, a {class} address, which egress policy '{name}' does not allow (allow_addresses)"
            ),
        ))
    }
}

/// The IPv4 address inside IPv4-mapped, IPv4-compatible, NAT64 and 6to4 IPv6 forms.
pub fn embedded_v4(a: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = a.segments();
    let o = a.octets();
    if let Some(v4) = a.to_ipv4_mapped() {
        return Some(v4);
    }
    // ::a.b.c.d (deprecated compatible form), but not :: and ::1.
    if s[..6] == [0; 6] && !(s[6] == 0 && s[7] <= 1) {
        return Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    // NAT64 well-known and local-use prefixes: 64:ff9b::/96, 64:ff9b:1::/48.
    if s[0] == 0x64 && s[1] == 0xff9b {
        return Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    // 6to4: 2002:aabb:ccdd::/48.
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    None
}

/// The address an IPv6 form stands for (its embedded IPv4 address), or itself.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => embedded_v4(a).map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Why `ip` is denied by default (`None`: a public address).
pub fn denied_class(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) => v4_class(a),
        IpAddr::V6(a) => {
            if let Some(v4) = embedded_v4(a) {
                // IPv4-mapped, compatible, NAT64 and 6to4 forms: judged by the IPv4 address.
                return v4_class(v4);
            }
            let s = a.segments();
            if a.is_loopback() {
                Some("loopback")
            } else if a.is_unspecified() {
                Some("unspecified")
            } else if a.is_multicast() {
                Some("multicast")
            } else if s[0] & 0xfe00 == 0xfc00 {
                Some("unique-local (private)")
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if s[0] & 0xffc0 == 0xfec0 {
                Some("site-local")
            } else if s[0] == 0x2001 && s[1] == 0x0db8 {
                Some("documentation")
            } else if s[0] == 0xfd00 && s[1] == 0x0ec2 {
                Some("cloud metadata")
            } else if s[0] == 0x0100 && s[1..4] == [0, 0, 0] {
                Some("discard-only")
            } else {
                None
            }
        }
    }
}

fn v4_class(a: Ipv4Addr) -> Option<&'static str> {
    let o = a.octets();
    if a == Ipv4Addr::new(169, 254, 169, 254) || a == Ipv4Addr::new(100, 100, 100, 200) {
        Some("cloud metadata")
    } else if a.is_loopback() {
        Some("loopback")
    } else if a.is_unspecified() || o[0] == 0 {
        Some("unspecified (0.0.0.0/8)")
    } else if a.is_private() {
        Some("private")
    } else if a.is_link_local() {
        Some("link-local")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("carrier-grade NAT (shared)")
    } else if a.is_multicast() {
        Some("multicast")
    } else if a.is_broadcast() || o[0] >= 240 {
        Some("reserved")
    } else if a.is_documentation() {
        Some("documentation")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        Some("benchmarking")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignment")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> Option<&'static str> {
        denied_class(s.parse().unwrap())
    }

    #[test]
    fn denied_classes() {
        for a in [
            "127.0.0.1", "127.255.0.1", "0.0.0.0", "10.1.2.3", "172.16.0.1", "192.168.1.1",
            "169.254.169.254", "169.254.1.1", "100.64.0.1", "224.0.0.1", "255.255.255.255",
            "::1", "::", "fd00::1", "fe80::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
            "64:ff9b::7f00:1", "2002:7f00:1::", "::127.0.0.1", "fd00:ec2::254",
        ] {
            assert!(class(a).is_some(), "{a} should be denied");
        }
        for a in ["93.184.216.34", "1.1.1.1", "2606:4700::1111", "8.8.8.8"] {
            assert!(class(a).is_none(), "{a} should be allowed");
        }
    }

    #[test]
    fn url_spellings_normalise_to_loopback() {
        for u in ["http://127.1/", "http://0x7f000001/", "http://2130706433/", "http://0177.0.0.1/", "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://0/"] {
            let url = url::Url::parse(u).unwrap();
            let ip: IpAddr = match url.host().unwrap() {
                url::Host::Ipv4(a) => a.into(),
                url::Host::Ipv6(a) => a.into(),
                url::Host::Domain(d) => panic!("{u} parsed as domain {d}"),
            };
            assert!(denied_class(ip).is_some(), "{u} -> {ip}");
        }
    }

    #[test]
    fn policies_match_hosts_ports_methods_paths_and_allowed_ranges() {
        let p = Policy {
            hosts: vec!["api.example.com".into(), "*.example.org".into(), "127.0.0.1".into()],
            paths: vec!["/v1/".into()],
            allow_addresses: vec!["127.0.0.0/8".parse().unwrap()],
            ..Default::default()
        };
        let ok = |u: &str, m: &str| p.check_url("t", m, &url::Url::parse(u).unwrap()).is_ok();
        assert!(ok("https://api.example.com/v1/x", "GET"));
        assert!(ok("https://a.b.example.org/v1/x", "POST"));
        assert!(!ok("https://example.org/v1/x", "GET"));
        assert!(!ok("https://api.example.com/v2/x", "GET"));
        assert!(!ok("https://api.example.com:8443/v1/x", "GET"));
        assert!(!ok("https://api.example.com/v1/x", "TRACE"));
        assert!(!ok("ftp://api.example.com/v1/x", "GET"));
        assert!(!ok("https://u:p@api.example.com/v1/x", "GET"));
        assert!(p.check_addr("t", "h", "127.0.0.1".parse().unwrap()).is_ok());
        assert!(p.check_addr("t", "h", "::ffff:127.0.0.1".parse().unwrap()).is_ok());
        assert!(p.check_addr("t", "h", "10.0.0.1".parse().unwrap()).is_err());
    }
}
