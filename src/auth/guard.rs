//! The front door's guard (`[auth_guard]`): back-off after failed password checks, per account
//! and client address, per account and per client IP; the bounded pool of threads that runs
//! password hashing, so a sign-in flood queues behind a few cores instead of taking all of them;
//! and the password strength rule.
//!
//! Back-off counts failed password checks in three places (an account is its email, known or
//! not, so lockouts reveal nothing; an IPv6 client counts by its /64):
//!
//! 1. **(account, client IP)**: `signin_failures_before_backoff` failures, then every attempt of
//!    that pair is refused with 429 and `Retry-After` — the right password too, and without
//!    running argon2 — for `backoff_base_secs`, doubling with each further failure up to
//!    `backoff_max_secs`. A success clears it. This is what stops a guesser on one address.
//! 2. **client IP** (any accounts): `ip_failures_before_backoff`, the same back-off; a success
//!    does not clear it (an attacker with one account could reset the IP between guesses).
//! 3. **account** (from every address): `account_failures_before_backoff`, the same back-off,
//!    against a guesser spread over many addresses. It is not applied to addresses the account
//!    signed in from successfully in the last `known_address_secs` (kept in memory), so a
//!    distributed attack does not lock the owner out on their usual devices; on a new address
//!    the owner can still get in with a password-reset or sign-in link (which also marks that
//!    address known).
//!
//! Attempts in flight count against each allowance, so a concurrent burst gets no more checks
//! than a sequential one. A count is forgotten `failure_memory_secs` after its last failure.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::core::{Error, ErrorCode, Result};

/// `[auth_guard]` in ichibase.toml (or `ICHIBASE_AUTH_GUARD__<KEY>`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthGuardSettings {
    /// Failed password checks one account may have from one client IP before that pair is
    /// locked out for a while.
    pub signin_failures_before_backoff: u32,
    /// Failed password checks one account may have from all addresses together before it is
    /// locked out for addresses it has not signed in from lately (see `known_address_secs`).
    pub account_failures_before_backoff: u32,
    /// How long an address the account signed in from stays exempt from the account-wide
    /// lockout, seconds.
    pub known_address_secs: f64,
    /// Failed password checks (on any accounts) one client IP may make before it is locked out.
    pub ip_failures_before_backoff: u32,
    /// First lock-out, seconds; it doubles with each further failure.
    pub backoff_base_secs: f64,
    /// Longest lock-out, seconds.
    pub backoff_max_secs: f64,
    /// A count of failures is forgotten this long after its last failure, seconds.
    pub failure_memory_secs: f64,
    /// Accounts and IPs tracked at most (memory bound; idle entries go first).
    pub tracked_max: usize,
    /// Threads that hash and verify passwords (argon2); 0 = half the CPUs, at least 1.
    pub hash_workers: usize,
    /// Password checks that may wait for a hashing thread; more are refused with 429.
    pub hash_queue: usize,
    /// Shortest password accepted at sign-up and password change, characters.
    pub min_password_length: usize,
    /// Reverse proxies whose `X-Forwarded-For` names the client (its last address is used);
    /// from anyone else the header is ignored.
    pub trusted_proxies: Vec<IpAddr>,
    /// Verified access tokens whose claims are remembered, so a token's signature and JSON are
    /// checked once per key ring (expiry and revocation are still checked on every request);
    /// 0 = verify every request in full.
    pub verified_tokens_max: usize,
}

impl Default for AuthGuardSettings {
    fn default() -> Self {
        AuthGuardSettings {
            signin_failures_before_backoff: 5,
            account_failures_before_backoff: 20,
            known_address_secs: 30.0 * 86400.0,
            ip_failures_before_backoff: 20,
            backoff_base_secs: 1.0,
            backoff_max_secs: 900.0,
            failure_memory_secs: 3600.0,
            tracked_max: 100_000,
            hash_workers: 0,
            hash_queue: 64,
            min_password_length: 8,
            trusted_proxies: Vec::new(),
            verified_tokens_max: super::jwt::VERIFIED_MAX,
        }
    }
}

impl AuthGuardSettings {
    pub fn validate(&self) -> anyhow::Result<()> {
        let pos = |v: f64| v > 0.0 && v.is_finite();
        anyhow::ensure!(
            self.signin_failures_before_backoff > 0
                && self.ip_failures_before_backoff > 0
                && self.account_failures_before_backoff > 0,
            "[auth_guard] signin_failures_before_backoff, account_failures_before_backoff and ip_failures_before_backoff must be at least 1"
        );
        anyhow::ensure!(
            pos(self.backoff_base_secs)
                && pos(self.backoff_max_secs)
                && pos(self.failure_memory_secs)
                && self.known_address_secs >= 0.0
                && self.known_address_secs.is_finite()
                && self.backoff_base_secs <= self.backoff_max_secs,
            "[auth_guard] backoff_base_secs, backoff_max_secs and failure_memory_secs must be positive, base <= max"
        );
        anyhow::ensure!(
            self.hash_queue > 0 && self.tracked_max > 0,
            "[auth_guard] hash_queue and tracked_max must be positive"
        );
        anyhow::ensure!(
            (1..=1024).contains(&self.min_password_length),
            "[auth_guard] min_password_length must be 1 to 1024"
        );
        Ok(())
    }

    pub fn workers(&self) -> usize {
        if self.hash_workers > 0 {
            self.hash_workers
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get() / 2)
                .unwrap_or(1)
                .max(1)
        }
    }
}

// ----- the client's address -----

/// The client of a connection from `peer`: the last `X-Forwarded-For` address when `peer` is
/// a trusted proxy, else `peer`.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[IpAddr]) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    forwarded_for
        .and_then(|v| v.rsplit(',').next())
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or(peer)
}

/// IPv4 as is (also when mapped into IPv6); IPv6 by its /64, what one host usually gets.
fn ip_bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// The account an email (or ClickHouse user name) names: trimmed, ASCII-lowercased, as the
/// user table's `COLLATE NOCASE` compares.
pub fn account_key(email: &str) -> String {
    email.trim().to_ascii_lowercase()
}

// ----- back-off -----

#[derive(Debug, Clone)]
struct Entry {
    failures: u32,
    pending: u32,
    last_failure: Instant,
    locked_until: Option<Instant>,
}

struct Tracker<K> {
    allowance: u32,
    map: HashMap<K, Entry>,
}

enum Verdict {
    Admit,
    Locked(Duration),
}

impl<K: Hash + Eq + Clone> Tracker<K> {
    fn judge(&mut self, k: &K, now: Instant, memory: Duration) -> Verdict {
        let Some(e) = self.map.get_mut(k) else {
            return Verdict::Admit;
        };
        if let Some(until) = e.locked_until {
            if until > now {
                return Verdict::Locked(until - now);
            }
        }
        if e.pending == 0 && now.duration_since(e.last_failure) > memory {
            e.failures = 0;
            e.locked_until = None;
        }
        // Checks in flight count against the allowance; once it is used up (a lock-out ran
        // out), one check at a time. Either way: come back shortly.
        let busy = if e.failures >= self.allowance {
            e.pending > 0
        } else {
            e.failures + e.pending >= self.allowance
        };
        if busy {
            return Verdict::Locked(Duration::from_secs(1));
        }
        Verdict::Admit
    }

    fn start(&mut self, k: &K, now: Instant) {
        self.map
            .entry(k.clone())
            .or_insert(Entry {
                failures: 0,
                pending: 0,
                last_failure: now,
                locked_until: None,
            })
            .pending += 1;
    }

    fn end(
        &mut self,
        k: &K,
        outcome: Option<bool>,
        now: Instant,
        s: &AuthGuardSettings,
        clear_on_success: bool,
    ) {
        let Some(e) = self.map.get_mut(k) else { return };
        e.pending = e.pending.saturating_sub(1);
        match outcome {
            Some(false) => {
                e.failures = e.failures.saturating_add(1);
                e.last_failure = now;
                if e.failures >= self.allowance {
                    let doublings = (e.failures - self.allowance).min(30);
                    let secs = (s.backoff_base_secs * f64::from(1u32 << doublings))
                        .min(s.backoff_max_secs);
                    e.locked_until = Some(now + Duration::from_secs_f64(secs));
                }
            }
            Some(true) if clear_on_success => {
                e.failures = 0;
                e.locked_until = None;
            }
            _ => {}
        }
        if e.pending == 0 && e.failures == 0 {
            self.map.remove(k);
        }
    }

    /// Keep the map under `max` entries: forget idle ones first, then unlocked ones.
    fn prune(&mut self, max: usize, now: Instant, memory: Duration) {
        if self.map.len() < max {
            return;
        }
        self.map.retain(|_, e| {
            e.pending > 0
                || e.locked_until.is_some_and(|u| u > now)
                || now.duration_since(e.last_failure) <= memory
        });
        if self.map.len() >= max {
            self.map
                .retain(|_, e| e.pending > 0 || e.locked_until.is_some_and(|u| u > now));
        }
    }
}

struct State {
    /// (account, client IP bucket; `None` without an address).
    pairs: Tracker<(String, Option<IpAddr>)>,
    accounts: Tracker<String>,
    ips: Tracker<IpAddr>,
    /// (account, client IP bucket) -> last successful sign-in.
    known: HashMap<(String, IpAddr), Instant>,
}

impl State {
    fn is_known(&self, account: &str, ip: Option<IpAddr>, now: Instant, s: &AuthGuardSettings) -> bool {
        let Some(ip) = ip else { return false };
        self.known
            .get(&(account.to_string(), ip))
            .is_some_and(|t| now.duration_since(*t).as_secs_f64() <= s.known_address_secs)
    }

    fn remember(&mut self, account: &str, ip: Option<IpAddr>, now: Instant, s: &AuthGuardSettings) {
        let Some(ip) = ip else { return };
        if self.known.len() >= s.tracked_max {
            let keep = Duration::from_secs_f64(s.known_address_secs);
            self.known.retain(|_, t| now.duration_since(*t) <= keep);
            if self.known.len() >= s.tracked_max {
                self.known.clear();
            }
        }
        self.known.insert((account.to_string(), ip), now);
    }
}

/// Back-off state of the process.
pub struct Guard {
    settings: AuthGuardSettings,
    state: Arc<Mutex<State>>,
}

/// An admitted password check; [`Ticket::finish`] records its outcome. Dropped unfinished (the
/// client went away, the hashing pool was full) it counts neither way.
pub struct Ticket {
    account: String,
    ip: Option<IpAddr>,
    /// Whether the account-wide count was started (not for a known address).
    account_wide: bool,
    state: Arc<Mutex<State>>,
    settings: AuthGuardSettings,
    done: bool,
}

impl Ticket {
    pub fn finish(mut self, ok: bool) {
        self.end(Some(ok));
    }

    fn end(&mut self, outcome: Option<bool>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let now = Instant::now();
        let mut st = self.state.lock().unwrap();
        let pair = (self.account.clone(), self.ip);
        st.pairs.end(&pair, outcome, now, &self.settings, true);
        if self.account_wide {
            st.accounts
                .end(&self.account, outcome, now, &self.settings, false);
        } else if outcome == Some(false) {
            // A known address's failures still count account-wide, they just are not refused.
            let e = st.accounts.map.entry(self.account.clone()).or_insert(Entry {
                failures: 0,
                pending: 0,
                last_failure: now,
                locked_until: None,
            });
            e.failures = e.failures.saturating_add(1);
            e.last_failure = now;
        }
        if let Some(ip) = self.ip {
            st.ips.end(&ip, outcome, now, &self.settings, false);
        }
        if outcome == Some(true) {
            st.remember(&self.account, self.ip, now, &self.settings);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.end(None);
    }
}

fn too_many(whose: &str, wait: Duration) -> Error {
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    Error::new(
        ErrorCode::TooManyRequests,
        format!("Too many failed sign-in attempts {whose}; retry after {secs} s"),
    )
}

impl Guard {
    pub fn new(settings: AuthGuardSettings) -> Guard {
        Guard {
            state: Arc::new(Mutex::new(State {
                pairs: Tracker {
                    allowance: settings.signin_failures_before_backoff,
                    map: HashMap::new(),
                },
                accounts: Tracker {
                    allowance: settings.account_failures_before_backoff,
                    map: HashMap::new(),
                },
                known: HashMap::new(),
                ips: Tracker {
                    allowance: settings.ip_failures_before_backoff,
                    map: HashMap::new(),
                },
            })),
            settings,
        }
    }

    pub fn settings(&self) -> &AuthGuardSettings {
        &self.settings
    }

    /// May a password check for `account` from `ip` run now? A 429 (with the wait in its
    /// message, rendered as `Retry-After`) when the pair, the address or (for an address the
    /// account has not signed in from lately) the account is locked out.
    pub fn admit(&self, account: &str, ip: Option<IpAddr>) -> Result<Ticket> {
        let ip = ip.map(ip_bucket);
        let account = account_key(account);
        let now = Instant::now();
        let memory = Duration::from_secs_f64(self.settings.failure_memory_secs);
        let mut st = self.state.lock().unwrap();
        let pair = (account.clone(), ip);
        let known = st.is_known(&account, ip, now, &self.settings);
        let mut waits: Vec<(&str, Duration)> = Vec::new();
        if let Verdict::Locked(w) = st.pairs.judge(&pair, now, memory) {
            waits.push(("for this account", w));
        }
        if !known {
            if let Verdict::Locked(w) = st.accounts.judge(&account, now, memory) {
                waits.push(("for this account", w));
            }
        }
        if let Some(ip) = ip {
            if let Verdict::Locked(w) = st.ips.judge(&ip, now, memory) {
                waits.push(("from your address", w));
            }
        }
        if let Some((whose, w)) = waits.into_iter().max_by_key(|(_, w)| *w) {
            return Err(too_many(whose, w));
        }
        let max = self.settings.tracked_max;
        st.pairs.prune(max, now, memory);
        st.pairs.start(&pair, now);
        if !known {
            st.accounts.prune(max, now, memory);
            st.accounts.start(&account, now);
        }
        if let Some(ip) = ip {
            st.ips.prune(max, now, memory);
            st.ips.start(&ip, now);
        }
        Ok(Ticket {
            account,
            ip,
            account_wide: !known,
            state: Arc::clone(&self.state),
            settings: self.settings.clone(),
            done: false,
        })
    }

    /// The owner proved control of the account another way (a password reset or sign-in link):
    /// clear its account-wide count and the count of (account, `ip`), and mark `ip` known.
    pub fn forgive(&self, account: &str, ip: Option<IpAddr>) {
        let ip = ip.map(ip_bucket);
        let account = account_key(account);
        let now = Instant::now();
        let mut st = self.state.lock().unwrap();
        if let Some(e) = st.accounts.map.get_mut(&account) {
            e.failures = 0;
            e.locked_until = None;
        }
        // Only this address's pair: a guesser elsewhere stays locked.
        st.pairs.map.retain(|(a, i), e| a != &account || *i != ip || e.pending > 0);
        st.remember(&account, ip, now, &self.settings);
    }

    /// A successful sign-in without a password (OpenID Connect, a link): mark `ip` known.
    pub fn note_success(&self, account: &str, ip: Option<IpAddr>) {
        let ip = ip.map(ip_bucket);
        let account = account_key(account);
        let now = Instant::now();
        self.state.lock().unwrap().remember(&account, ip, now, &self.settings);
    }
}

// ----- the hashing pool -----

type Job = Box<dyn FnOnce() + Send>;

/// A fixed number of threads that run argon2, fed by a bounded queue.
pub struct HashPool {
    tx: mpsc::SyncSender<Job>,
}

fn busy() -> Error {
    Error::new(
        ErrorCode::TooManyRequests,
        "Too many password checks in progress; retry after 1 s",
    )
}

impl HashPool {
    pub fn new(workers: usize, queue: usize) -> HashPool {
        let (tx, rx) = mpsc::sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers.max(1) {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("ichibase-hash-{i}"))
                .spawn(move || {
                    loop {
                        let job = rx.lock().unwrap().recv();
                        match job {
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                            }
                            Err(_) => break, // the pool was dropped
                        }
                    }
                })
                .expect("spawning a password hashing thread");
        }
        HashPool { tx }
    }

    fn submit(&self, job: Job) -> Result<()> {
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => busy(),
            mpsc::TrySendError::Disconnected(_) => {
                Error::internal("the password hashing pool stopped")
            }
        })
    }

    /// Run `f` on the pool and wait for it without holding a runtime thread. Work whose caller
    /// went away before a thread was free is skipped.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move || {
            if !tx.is_closed() {
                let _ = tx.send(f());
            }
        }))?;
        rx.await
            .map_err(|_| Error::internal("a password hashing thread failed"))
    }

    /// [`HashPool::run`] for synchronous callers (credential checks inside `identify`).
    pub fn run_blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(Box::new(move || {
            let _ = tx.send(f());
        }))?;
        super::blocking(|| rx.recv())
            .map_err(|_| Error::internal("a password hashing thread failed"))
    }
}

// ----- password strength -----

/// The most common passwords of 8 or more characters (lower case), from the public breach
/// top lists; shorter ones are refused by length anyway.
const COMMON: &[&str] = &[
    "password",
    "password1",
    "password12",
    "password123",
    "password1234",
    "passw0rd",
    "p@ssw0rd",
    "p@ssword",
    "pa$$word",
    "12345678",
    "123456789",
    "1234567890",
    "0123456789",
    "87654321",
    "11111111",
    "00000000",
    "12341234",
    "11223344",
    "12344321",
    "123123123",
    "123456abc",
    "abc12345",
    "abcd1234",
    "1234abcd",
    "a1b2c3d4",
    "qwertyui",
    "qwertyuiop",
    "qwerty123",
    "qwerty12",
    "1qaz2wsx",
    "1q2w3e4r",
    "1q2w3e4r5t",
    "zaq12wsx",
    "zaq1zaq1",
    "qazwsxedc",
    "asdfghjk",
    "asdfghjkl",
    "zxcvbnm1",
    "iloveyou",
    "iloveyou1",
    "sunshine",
    "princess",
    "football",
    "baseball",
    "basketball",
    "superman",
    "starwars",
    "whatever",
    "trustno1",
    "letmein1",
    "welcome1",
    "welcome123",
    "admin123",
    "administrator",
    "changeme",
    "changeme1",
    "computer",
    "internet",
    "michelle",
    "jennifer",
    "jordan23",
    "charlie1",
    "mustang1",
    "dragon12",
    "master12",
    "monkey12",
    "shadow12",
    "killer12",
    "jessica1",
    "michael1",
    "anthony1",
    "football1",
    "baseball1",
    "sunshine1",
    "princess1",
    "default1",
    "secret12",
    "letmeinnow",
    "lovely12",
    "liverpool",
    "chelsea1",
    "arsenal1",
    "pokemon1",
    "blink182",
    "samsung1",
    "asdf1234",
    "qwer1234",
    "1qazxsw2",
    "q1w2e3r4",
    "q1w2e3r4t5",
    "passpass",
    "testtest",
    "test1234",
    "test12345",
    "access14",
    "corvette",
    "mercedes",
    "maverick",
    "hello123",
    "freedom1",
    "whatever1",
    "trustnoone",
    "qwertyuiop123",
    "1234qwer",
    "unknown1",
    "google123",
    "summer2024",
    "winter2024",
    "spring2024",
    "autumn2024",
    "ichibase",
    "ichibase1",
];

#[derive(PartialEq, Eq, Clone, Copy)]
enum Class {
    Lower,
    Upper,
    Digit,
    Space,
    Symbol,
    Other,
}

fn class(c: char) -> Class {
    if c.is_ascii_lowercase() {
        Class::Lower
    } else if c.is_ascii_uppercase() {
        Class::Upper
    } else if c.is_ascii_digit() {
        Class::Digit
    } else if c.is_whitespace() {
        Class::Space
    } else if c.is_ascii() {
        Class::Symbol
    } else {
        Class::Other
    }
}

/// Why `password` is too weak for the account `email`, if it is.
pub fn password_problem(password: &str, email: &str, min_len: usize) -> Option<String> {
    let chars: Vec<char> = password.chars().collect();
    if chars.len() < min_len {
        return Some(format!("password must be at least {min_len} characters"));
    }
    if password.len() > 1024 {
        return Some("password must be at most 1024 bytes".into());
    }
    if password.trim().is_empty() {
        return Some("password must not be only spaces".into());
    }
    // One character or a short pattern over and over ("aaaaaaaa", "abababab", "a1a1a1a1").
    for k in 1..=4.min(chars.len() / 2) {
        if chars.len() % k == 0 && chars.chunks(k).all(|c| c == &chars[..k]) {
            return Some("password must not repeat one character or a short pattern".into());
        }
    }
    let first = class(chars[0]);
    if chars.len() < 16 && first != Class::Other && chars.iter().all(|&c| class(c) == first) {
        return Some(
            "password must mix two kinds of characters (lower or upper case letters, digits, symbols, spaces) or be at least 16 characters long".into(),
        );
    }
    let lower = password.trim().to_lowercase();
    let email = email.trim().to_lowercase();
    let local = email.split('@').next().unwrap_or("");
    if lower == email || (!local.is_empty() && (lower == local || lower.starts_with(&email))) {
        return Some("password must not be your email address".into());
    }
    if COMMON.contains(&lower.as_str()) {
        return Some("password is one of the most common passwords; choose another".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strength() {
        let bad = |p: &str| password_problem(p, "dave@example.com", 8).is_some();
        for p in [
            "12345678",
            "        ",
            "aaaaaaaa",
            "abababab",
            "a1a1a1a1",
            "Password1",
            "dave@example.com",
            "DAVE",
            "abcdefgh",
            "short",
        ] {
            assert!(bad(p), "{p}");
        }
        for p in [
            "long enough!",
            "password-of-dave@example.com",
            "correcthorsebatterystaple",
            "a brand new secret",
            "日本語のパスワード",
        ] {
            assert!(!bad(p), "{p}");
        }
    }

    #[test]
    fn backoff_counts_in_flight_checks_and_doubles() {
        let g = Guard::new(AuthGuardSettings {
            signin_failures_before_backoff: 2,
            backoff_base_secs: 10.0,
            ..Default::default()
        });
        let a = g.admit("a@x", None).unwrap();
        let b = g.admit("A@x ", None).unwrap();
        assert!(
            g.admit("a@x", None).is_err(),
            "two in flight use the allowance"
        );
        drop(b);
        a.finish(false);
        g.admit("a@x", None).unwrap().finish(false);
        let Err(e) = g.admit("a@x", None) else {
            panic!("admitted past the allowance")
        };
        assert_eq!(e.code, ErrorCode::TooManyRequests);
        assert!(e.message.contains("retry after 10 s"), "{}", e.message);
        g.admit("b@x", None).unwrap().finish(true);
        // When the lock-out ends, one more check is allowed; failing it doubles the wait.
        let g = Guard::new(AuthGuardSettings {
            signin_failures_before_backoff: 1,
            backoff_base_secs: 0.05,
            ..Default::default()
        });
        g.admit("c@x", None).unwrap().finish(false);
        assert!(g.admit("c@x", None).is_err());
        std::thread::sleep(Duration::from_millis(80));
        let t = g.admit("c@x", None).unwrap();
        assert!(
            g.admit("c@x", None).is_err(),
            "one at a time after a lock-out"
        );
        t.finish(false);
        std::thread::sleep(Duration::from_millis(80));
        assert!(
            g.admit("c@x", None).is_err(),
            "the second lock-out is twice as long"
        );
        std::thread::sleep(Duration::from_millis(40));
        g.admit("c@x", None).unwrap().finish(true);
        g.admit("c@x", None).unwrap().finish(false);
        assert!(
            g.admit("c@x", None).is_err(),
            "a success resets the count, not the allowance"
        );
    }

    #[test]
    fn account_lockout_spares_known_addresses_and_pairs_lock_alone() {
        let g = Guard::new(AuthGuardSettings {
            signin_failures_before_backoff: 3,
            account_failures_before_backoff: 6,
            backoff_base_secs: 60.0,
            ..Default::default()
        });
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        g.admit("a@x", ip("10.0.0.1")).unwrap().finish(true);
        // One guessing address: its pair locks after 3, the owner elsewhere is untouched.
        for _ in 0..3 {
            g.admit("a@x", ip("10.9.0.1")).unwrap().finish(false);
        }
        assert!(g.admit("a@x", ip("10.9.0.1")).is_err(), "the guessing pair is locked");
        g.admit("a@x", ip("10.0.0.2")).unwrap().finish(true);
        // Spread over many addresses: the account locks for new addresses only.
        for i in 0..3 {
            g.admit("a@x", ip(&format!("10.1.0.{i}"))).unwrap().finish(false);
        }
        let Err(e) = g.admit("a@x", ip("10.2.0.1")) else { panic!("a new address got in") };
        assert!(e.message.contains("for this account"), "{}", e.message);
        g.admit("a@x", ip("10.0.0.1")).unwrap().finish(true);
        g.admit("a@x", ip("10.0.0.2")).unwrap().finish(true);
        // A reset link proves ownership: the account-wide count goes, the address is known.
        g.forgive("a@x", ip("10.2.0.1"));
        assert!(g.admit("a@x", ip("10.9.0.1")).is_err(), "the guesser's pair stays locked");
        g.admit("a@x", ip("10.2.0.1")).unwrap().finish(true);
        g.admit("a@x", ip("10.3.0.1")).unwrap().finish(true);
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let xff = Some("1.2.3.4, 5.6.7.8");
        assert_eq!(client_ip(proxy, xff, &[proxy]), "5.6.7.8".parse::<IpAddr>().unwrap());
        assert_eq!(client_ip(other, xff, &[proxy]), other);
        assert_eq!(client_ip(proxy, Some("junk"), &[proxy]), proxy);
    }

    #[test]
    fn ipv6_by_prefix() {
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::ffff:2".parse().unwrap();
        assert_eq!(ip_bucket(a), ip_bucket(b));
        let m: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(ip_bucket(m), "10.0.0.1".parse::<IpAddr>().unwrap());
    }
}
