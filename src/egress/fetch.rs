//! The egress client: one outgoing request under a policy, hop by hop.
//!
//! Every policy gets its own `reqwest::Client` (so pooled connections are never shared between
//! policies) whose resolver answers only from pins: before each hop the host is resolved here,
//! every address checked, and the checked addresses pinned for that host; the client never
//! resolves by itself. Redirects are followed here, each hop checked like the first.
//!
//! Owns the HTTP mechanics and the audit row; policies are `policy`'s, redaction `guard`'s,
//! secrets the vault's.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use zeroize::Zeroizing;

use super::guard::{Guard, Kind, Scan};
use super::policy::{EgressSettings, Policy};
use crate::app::App;
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::vault::VaultRef;

/// A header value from Lua: text, or a vault reference substituted as the request leaves.
#[derive(Debug, Clone)]
pub enum HeaderSrc {
    Text(String),
    Vault(VaultRef),
}

/// One call as Lua asked for it.
#[derive(Debug, Clone, Default)]
pub struct FetchInput {
    pub url: String,
    pub method: String,
    pub headers: Vec<(String, HeaderSrc)>,
    pub body: Option<Vec<u8>>,
    /// Seconds (bounded by `[egress] max_timeout_secs`).
    pub timeout: Option<f64>,
}

/// The answer.
#[derive(Debug, Clone)]
pub struct FetchOutput {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The URL of the last hop.
    pub url: String,
    /// What the privacy guard redacted from the request (kinds and counts).
    pub redacted: BTreeMap<Kind, usize>,
}

/// Pins: host name → the checked addresses its connections may use.
type Pins = Arc<Mutex<HashMap<String, Vec<SocketAddr>>>>;

struct PinResolver(Pins);

impl reqwest::dns::Resolve for PinResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let addrs = self.0.lock().unwrap().get(name.as_str()).cloned();
        Box::pin(async move {
            match addrs {
                Some(a) if !a.is_empty() => Ok(Box::new(a.into_iter()) as reqwest::dns::Addrs),
                _ => Err("egress: host was not resolved and checked first".into()),
            }
        })
    }
}

struct PolicyClient {
    client: reqwest::Client,
    pins: Pins,
}

/// The egress service: settings, the guard, and a client per policy.
pub struct Egress {
    pub settings: EgressSettings,
    pub guard: Arc<Guard>,
    clients: Mutex<HashMap<String, Arc<PolicyClient>>>,
}

/// Why a call ended early: an error, or the invocation's own deadline.
pub enum Failure {
    Error(Error),
    Deadline,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Error(e)
    }
}

fn denied(msg: impl Into<String>) -> Error {
    Error::new(ErrorCode::EgressDenied, msg)
}

fn failed(msg: impl Into<String>) -> Error {
    Error::new(ErrorCode::EgressFailed, msg)
}

impl Egress {
    pub fn new(settings: EgressSettings) -> anyhow::Result<Egress> {
        let guard = Arc::new(Guard::new(&settings.guard));
        Ok(Egress {
            settings,
            guard,
            clients: Mutex::new(HashMap::new()),
        })
    }

    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    fn client(&self, policy: &str) -> Result<Arc<PolicyClient>> {
        let mut m = self.clients.lock().unwrap();
        if let Some(c) = m.get(policy) {
            return Ok(Arc::clone(c));
        }
        let pins: Pins = Arc::default();
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(PinResolver(Arc::clone(&pins))))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(Duration::from_secs_f64(self.settings.connect_timeout_secs))
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("ichibase/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::internal(format!("egress client: {e}")))?;
        let c = Arc::new(PolicyClient { client, pins });
        m.insert(policy.to_string(), Arc::clone(&c));
        Ok(c)
    }

    /// Resolve `host` once, check every address, pin them.
    async fn resolve_and_pin(
        &self,
        pname: &str,
        policy: &Policy,
        pc: &PolicyClient,
        url: &url::Url,
    ) -> Result<SocketAddr> {
        let port = url.port_or_known_default().unwrap_or(80);
        let host = url.host().ok_or_else(|| denied("http.fetch refused: the URL has no host"))?;
        let addrs: Vec<IpAddr> = match &host {
            url::Host::Ipv4(a) => vec![IpAddr::V4(*a)],
            url::Host::Ipv6(a) => vec![IpAddr::V6(*a)],
            url::Host::Domain(d) => {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                if let Some(a) = self.settings.resolve.get(&d) {
                    a.clone()
                } else {
                    let found = tokio::time::timeout(
                        Duration::from_secs_f64(self.settings.connect_timeout_secs),
                        tokio::net::lookup_host((d.as_str(), port)),
                    )
                    .await
                    .map_err(|_| failed(format!("http.fetch: resolving {d} timed out")))?
                    .map_err(|e| failed(format!("http.fetch: cannot resolve {d}: {e}")))?;
                    found.map(|s| s.ip()).collect()
                }
            }
        };
        if addrs.is_empty() {
            return Err(failed(format!("http.fetch: {host} has no address")));
        }
        for ip in &addrs {
            policy.check_addr(pname, &host.to_string(), *ip)?;
        }
        let socks: Vec<SocketAddr> = addrs.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
        if let url::Host::Domain(d) = host {
            pc.pins
                .lock()
                .unwrap()
                .insert(d.trim_end_matches('.').to_ascii_lowercase(), socks.clone());
        }
        Ok(socks[0])
    }

    /// Redact the URL's path segments and query (decoded, so `a%40b.com` is found too).
    fn guard_url(&self, url: &mut url::Url, allowed: &[Kind], scan: &mut Scan) {
        let mut changed = false;
        let segs: Vec<String> = url
            .path_segments()
            .map(|s| s.map(String::from).collect())
            .unwrap_or_default();
        let mut new_segs = Vec::with_capacity(segs.len());
        for s in &segs {
            let dec = percent_encoding::percent_decode_str(s).decode_utf8_lossy().to_string();
            let r = self.guard.scan(&dec, allowed);
            if r.found() > 0 {
                changed = true;
                scan.absorb(&r);
                new_segs.push(r.text);
            } else {
                new_segs.push(dec);
            }
        }
        if changed {
            if let Ok(mut p) = url.path_segments_mut() {
                p.clear();
                p.extend(new_segs.iter().map(String::as_str));
            }
        }
        if url.query().is_some() {
            let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
            let mut qchanged = false;
            let mut out = Vec::with_capacity(pairs.len());
            for (k, v) in pairs {
                let rk = self.guard.scan(&k, allowed);
                let rv = self.guard.scan(&v, allowed);
                if rk.found() + rv.found() > 0 {
                    qchanged = true;
                    scan.absorb(&rk);
                    scan.absorb(&rv);
                }
                out.push((rk.text, rv.text));
            }
            if qchanged {
                url.query_pairs_mut().clear().extend_pairs(out);
            }
        }
        url.set_fragment(None);
    }

    /// Redact a body: form bodies pair by pair, text as text; a binary body with findings is
    /// refused (it cannot be redacted without corrupting it).
    fn guard_body(
        &self,
        body: Vec<u8>,
        form: bool,
        allowed: &[Kind],
        scan: &mut Scan,
    ) -> Result<Vec<u8>> {
        match String::from_utf8(body) {
            Ok(text) if form => {
                let mut any = false;
                let pairs: Vec<(String, String)> = form_urlencoded::parse(text.as_bytes())
                    .into_owned()
                    .map(|(k, v)| {
                        let (rk, rv) = (self.guard.scan(&k, allowed), self.guard.scan(&v, allowed));
                        if rk.found() + rv.found() > 0 {
                            any = true;
                            scan.absorb(&rk);
                            scan.absorb(&rv);
                        }
                        (rk.text, rv.text)
                    })
                    .collect();
                if !any {
                    return Ok(text.into_bytes());
                }
                Ok(form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(pairs)
                    .finish()
                    .into_bytes())
            }
            Ok(text) => {
                let r = self.guard.scan(&text, allowed);
                scan.absorb(&r);
                Ok(r.text.into_bytes())
            }
            Err(e) => {
                let bytes = e.into_bytes();
                let r = self.guard.scan(&String::from_utf8_lossy(&bytes), allowed);
                if r.found() > 0 {
                    let mut r2 = r.clone();
                    r2.blocked = r.counts.keys().copied().collect();
                    return Err(r2
                        .refusal("http.fetch: a binary body")
                        .unwrap_or_else(|| failed("binary body refused")));
                }
                Ok(bytes)
            }
        }
    }

    /// Run one call for `function` as `ctx`. `deadline` is the invocation's: the wait never
    /// goes past it (then [`Failure::Deadline`]).
    pub async fn fetch(
        &self,
        app: Option<&App>,
        ctx: &RequestContext,
        function: &str,
        input: FetchInput,
        deadline: Option<Instant>,
    ) -> std::result::Result<FetchOutput, Failure> {
        let started = Instant::now();
        let mut audit = Audit {
            host: String::new(),
            method: input.method.to_ascii_uppercase(),
            status: None,
            req_bytes: 0,
            resp_bytes: 0,
            redirects: 0,
            scan: Scan::default(),
            policy: String::new(),
        };
        let r = self.fetch_inner(app, ctx, function, input, deadline, &mut audit).await;
        audit.record(app, ctx, function, started, &r);
        r
    }

    async fn fetch_inner(
        &self,
        app: Option<&App>,
        ctx: &RequestContext,
        function: &str,
        input: FetchInput,
        deadline: Option<Instant>,
        audit: &mut Audit,
    ) -> std::result::Result<FetchOutput, Failure> {
        let s = &self.settings;
        let (pname, policy) = s.policy_for(function).ok_or_else(|| {
            denied(format!(
                "http.fetch refused: function '{function}' has no egress policy ([egress.functions.\"{function}\"] or [egress.default])"
            ))
        })?;
        audit.policy = pname.to_string();
        let mut method = reqwest::Method::from_bytes(audit.method.as_bytes())
            .map_err(|_| Error::new(ErrorCode::BadArguments, format!("http.fetch: bad method {:?}", audit.method)))?;
        let mut url = url::Url::parse(&input.url).map_err(|e| {
            Error::new(ErrorCode::BadArguments, format!("http.fetch: bad URL {:?}: {e}", input.url))
        })?;
        if let Some(h) = url.host_str() {
            audit.host = h.to_string();
        }
        policy.check_url(pname, method.as_str(), &url)?;
        let allowed = policy.allow_kinds.as_slice();
        // The guard over what Lua wrote (vault values are added after it, toward bound hosts).
        let mut scan = Scan::default();
        self.guard_url(&mut url, allowed, &mut scan);
        let mut headers: Vec<(HeaderName, HeaderSrc)> = Vec::new();
        let mut form = false;
        for (k, v) in input.headers {
            let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| {
                Error::new(ErrorCode::BadArguments, format!("http.fetch: bad header name {k:?}"))
            })?;
            if matches!(name.as_str(), "host" | "content-length" | "transfer-encoding" | "connection") {
                return Err(Error::new(ErrorCode::BadArguments, format!("http.fetch: header {name} is set by the host")).into());
            }
            let v = match v {
                HeaderSrc::Text(t) => {
                    if name == reqwest::header::CONTENT_TYPE && t.starts_with("application/x-www-form-urlencoded") {
                        form = true;
                    }
                    let r = self.guard.scan(&t, allowed);
                    scan.absorb(&r);
                    HeaderSrc::Text(r.text)
                }
                vr => vr,
            };
            headers.push((name, v));
        }
        let mut body = match input.body {
            Some(b) => {
                if b.len() > s.max_request_bytes {
                    return Err(Error::new(
                        ErrorCode::EgressLimit,
                        format!("http.fetch: request body of {} bytes is over [egress] max_request_bytes ({})", b.len(), s.max_request_bytes),
                    )
                    .into());
                }
                Some(self.guard_body(b, form, allowed, &mut scan)?)
            }
            None => None,
        };
        audit.scan = scan.clone();
        if let Some(e) = scan.refusal("http.fetch") {
            return Err(e.into());
        }
        audit.req_bytes = body.as_ref().map_or(0, |b| b.len());

        let want = input.timeout.unwrap_or(s.timeout_secs).clamp(0.001, s.max_timeout_secs);
        let mut until = Instant::now() + Duration::from_secs_f64(want);
        let mut by_deadline = false;
        if let Some(d) = deadline {
            if d <= until {
                until = d;
                by_deadline = true;
            }
        }
        let pc = self.client(pname)?;
        let vault = app.and_then(|a| a.get::<crate::vault::Vault>());
        let first_host = url.host_str().unwrap_or("").to_ascii_lowercase();
        let mut refreshed = false;
        let work = async {
            let mut hops = 0usize;
            loop {
                let hop_host = url.host_str().unwrap_or("").to_ascii_lowercase();
                self.resolve_and_pin(pname, policy, &pc, &url).await?;
                let mut hm = HeaderMap::new();
                let mut used_vault: Option<VaultRef> = None;
                for (name, v) in &headers {
                    let value: Zeroizing<String> = match v {
                        HeaderSrc::Text(t) => {
                            // Credentials Lua wrote do not follow a redirect to another host.
                            if hop_host != first_host
                                && matches!(name.as_str(), "authorization" | "cookie" | "proxy-authorization")
                            {
                                continue;
                            }
                            Zeroizing::new(t.clone())
                        }
                        HeaderSrc::Vault(r) => {
                            let Some(vault) = vault else {
                                return Err(Error::new(ErrorCode::VaultDenied, "http.fetch: the vault is not available").into());
                            };
                            if !vault.bound_to(ctx, &r.name, &hop_host) {
                                if hops == 0 {
                                    return Err(Error::new(
                                        ErrorCode::VaultDenied,
                                        format!("http.fetch refused: vault secret '{}' is not bound to host {hop_host}", r.name),
                                    )
                                    .into());
                                }
                                // A redirect elsewhere: the secret stays behind.
                                continue;
                            }
                            used_vault = Some(r.clone());
                            vault.header_value(ctx, function, r, &hop_host).await?
                        }
                    };
                    let hv = HeaderValue::from_str(&value).map_err(|_| {
                        Error::new(ErrorCode::BadArguments, format!("http.fetch: header {name} has a value that cannot be sent"))
                    })?;
                    hm.append(name.clone(), hv);
                }
                let mut rb = pc.client.request(method.clone(), url.clone()).headers(hm);
                if let Some(b) = &body {
                    rb = rb.body(b.clone());
                }
                let mut resp = rb.send().await.map_err(|e| {
                    failed(format!("http.fetch: {}: {}", url.host_str().unwrap_or(""), describe(&e)))
                })?;
                let status = resp.status();
                audit.status = Some(status.as_u16());
                // An expired or revoked OAuth2 token: refresh once and try again.
                if status == reqwest::StatusCode::UNAUTHORIZED && !refreshed {
                    if let (Some(r), Some(vault)) = (&used_vault, vault) {
                        if vault.is_oauth(ctx, &r.name) {
                            refreshed = true;
                            vault.refresh(ctx, &r.name).await?;
                            continue;
                        }
                    }
                }
                if status.is_redirection() {
                    if let Some(loc) = resp.headers().get(reqwest::header::LOCATION) {
                        hops += 1;
                        audit.redirects = hops;
                        if hops > s.max_redirects {
                            return Err(Error::new(
                                ErrorCode::EgressLimit,
                                format!("http.fetch: more than {} redirects ([egress] max_redirects)", s.max_redirects),
                            )
                            .into());
                        }
                        let loc = loc.to_str().map_err(|_| failed("http.fetch: a redirect Location that is not text"))?;
                        let next = url.join(loc).map_err(|e| failed(format!("http.fetch: bad redirect Location {loc:?}: {e}")))?;
                        if status == reqwest::StatusCode::SEE_OTHER
                            || (matches!(status.as_u16(), 301 | 302) && method == reqwest::Method::POST)
                        {
                            method = reqwest::Method::GET;
                            body = None;
                        }
                        policy.check_url(pname, method.as_str(), &next).map_err(|e| {
                            Error::new(e.code, format!("{} (redirected from {})", e.message, url.host_str().unwrap_or("")))
                        })?;
                        url = next;
                        continue;
                    }
                }
                // A remote that echoes a vault value back does not hand it to Lua.
                let mut headers_out = Vec::new();
                for (k, v) in resp.headers() {
                    if let Ok(v) = v.to_str() {
                        let v = self.guard.redact_secrets(v).unwrap_or_else(|| v.to_string());
                        headers_out.push((k.as_str().to_string(), v));
                    }
                }
                if let Some(len) = resp.content_length() {
                    if len as usize > s.max_response_bytes {
                        return Err(too_large(s.max_response_bytes).into());
                    }
                }
                let mut out = Vec::new();
                while let Some(chunk) = resp.chunk().await.map_err(|e| failed(format!("http.fetch: reading the answer: {}", describe(&e))))? {
                    if out.len() + chunk.len() > s.max_response_bytes {
                        return Err(too_large(s.max_response_bytes).into());
                    }
                    out.extend_from_slice(&chunk);
                }
                audit.resp_bytes = out.len();
                if let Ok(text) = std::str::from_utf8(&out) {
                    if let Some(r) = self.guard.redact_secrets(text) {
                        out = r.into_bytes();
                    }
                }
                return Ok::<_, Failure>(FetchOutput {
                    status: status.as_u16(),
                    headers: headers_out,
                    body: out,
                    url: url.to_string(),
                    redacted: scan.counts.clone(),
                });
            }
        };
        let res = tokio::time::timeout_at(until.into(), work).await;
        match res {
            Ok(r) => r,
            Err(_) if by_deadline => Err(Failure::Deadline),
            Err(_) => Err(Error::new(
                ErrorCode::TimeoutExceeded,
                format!("http.fetch: no complete answer from {} within {want} s (timeout)", audit.host),
            )
            .into()),
        }
    }
}

fn too_large(max: usize) -> Error {
    Error::new(
        ErrorCode::EgressLimit,
        format!("http.fetch: the answer is over [egress] max_response_bytes ({max} bytes)"),
    )
}

fn describe(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// What the posterity log keeps of one call (never values).
struct Audit {
    host: String,
    method: String,
    status: Option<u16>,
    req_bytes: usize,
    resp_bytes: usize,
    redirects: usize,
    scan: Scan,
    policy: String,
}

impl Audit {
    fn record(
        &self,
        app: Option<&App>,
        ctx: &RequestContext,
        function: &str,
        started: Instant,
        r: &std::result::Result<FetchOutput, Failure>,
    ) {
        tracing::info!(host = %self.host, status = ?self.status, bytes = self.resp_bytes, function, "egress");
        let Some(app) = app else { return };
        let sink = app.posterity().sink();
        if !sink.enabled() {
            return;
        }
        let mut e = crate::posterity::Event::now("egress", Some(ctx));
        e.name = Some(self.host.clone());
        e.method = Some(self.method.clone());
        e.status = self.status.map(i32::from);
        e.bytes = Some(self.resp_bytes as i64);
        e.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        e.outcome = Some(if r.is_ok() { "ok" } else { "error" });
        e.error = match r {
            Err(Failure::Error(x)) => Some(x.message.chars().take(500).collect()),
            Err(Failure::Deadline) => Some("the invocation's time limit".into()),
            Ok(_) => None,
        };
        e.detail = Some(
            serde_json::json!({
                "function": function,
                "policy": self.policy,
                "request_bytes": self.req_bytes,
                "redirects": self.redirects,
                "redacted": self.scan.counts_json(),
                "blocked": self.scan.blocked.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
            })
            .to_string(),
        );
        sink.record(e);
    }
}
