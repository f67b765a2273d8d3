//! The privacy guard: finds personal codes and secrets in outgoing text and redacts them (or
//! refuses the text, per policy) before it leaves the machine.
//!
//! A reusable API: `http.fetch` runs it over every outgoing URL, header value and body, and any
//! other component sending text outside (e.g. `ai.*` prompts) calls it the same way:
//!
//! ```ignore
//! let guard = app.get::<crate::egress::Egress>().unwrap().guard();
//! let scan = guard.check(&prompt, &[])?;   // Err(PRIVACY_BLOCKED) for a kind set to block
//! send(scan.text);                         // the redacted text
//! audit(scan.counts);                      // kinds and counts, never the values
//! ```
//!
//! What it finds (each a [`Kind`]): configured secrets and every vault value, in all common
//! encodings (raw, base64 standard/URL-safe at any alignment, percent/form-encoded, hex);
//! API-key-like tokens (well-known prefixes, JWTs, long high-entropy tokens); one-time and
//! verification codes near an English or Japanese phrase ("your code is", "認証コード");
//! email addresses; phone numbers (international, Japanese, North American); card numbers
//! (13–19 digits, Luhn-checked); Japanese My Number (12 digits, check digit). Full-width digits
//! count as digits.
//!
//! Owns only text scanning; it knows nothing of HTTP or the vault's storage (the vault hands it
//! its values with [`Guard::set_dynamic_secrets`]).

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, RwLock};

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use base64::Engine;
use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::core::{Error, ErrorCode, Result};

/// What was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A configured secret or a vault value, in any encoding.
    Secret,
    /// An API-key-like token.
    ApiKey,
    /// A card number (Luhn-checked).
    Card,
    /// A Japanese My Number (check digit verified).
    MyNumber,
    /// A one-time or verification code.
    Otp,
    /// A phone number.
    Phone,
    /// An email address.
    Email,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Secret,
        Kind::ApiKey,
        Kind::Card,
        Kind::MyNumber,
        Kind::Otp,
        Kind::Phone,
        Kind::Email,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Secret => "secret",
            Kind::ApiKey => "api_key",
            Kind::Card => "card",
            Kind::MyNumber => "my_number",
            Kind::Otp => "otp",
            Kind::Phone => "phone",
            Kind::Email => "email",
        }
    }

    /// Overlapping findings keep the kind with the lowest rank.
    fn rank(self) -> u8 {
        self as u8
    }
}

/// `[egress.guard]` in ichibase.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuardSettings {
    /// Kinds whose presence refuses the whole request (`PRIVACY_BLOCKED`) instead of redacting.
    pub block: Vec<Kind>,
    /// Kinds not looked for at all (server-wide; a function's policy can allow more).
    pub allow: Vec<Kind>,
    /// Known secrets (at least 6 characters) redacted in every encoding, besides the vault's.
    pub secrets: Vec<String>,
}

impl Default for GuardSettings {
    fn default() -> Self {
        GuardSettings {
            block: Vec::new(),
            allow: Vec::new(),
            secrets: Vec::new(),
        }
    }
}

/// The result of one scan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// The text with every finding replaced by `[REDACTED:<kind>]`.
    pub text: String,
    /// How many of each kind were found (never the values).
    pub counts: BTreeMap<Kind, usize>,
    /// Kinds found that the policy blocks (empty: the text may go, redacted).
    pub blocked: Vec<Kind>,
}

impl Scan {
    pub fn found(&self) -> usize {
        self.counts.values().sum()
    }

    /// Add another scan's counts and blocked kinds (its text is not kept).
    pub fn absorb(&mut self, other: &Scan) {
        for (k, n) in &other.counts {
            *self.counts.entry(*k).or_default() += n;
        }
        for k in &other.blocked {
            if !self.blocked.contains(k) {
                self.blocked.push(*k);
            }
        }
    }

    /// `{"email": 1, ...}` for audit logs.
    pub fn counts_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.counts
                .iter()
                .map(|(k, n)| (k.as_str().to_string(), (*n).into()))
                .collect(),
        )
    }

    /// The `PRIVACY_BLOCKED` error when a blocked kind was found.
    pub fn refusal(&self, what: &str) -> Option<Error> {
        if self.blocked.is_empty() {
            return None;
        }
        let kinds: Vec<String> = self
            .blocked
            .iter()
            .map(|k| format!("{} ({})", k.as_str(), self.counts.get(k).copied().unwrap_or(0)))
            .collect();
        Some(Error::new(
            ErrorCode::PrivacyBlocked,
            format!(
                "{what} refused by the privacy guard: it carries {} ([egress.guard] block)",
                kinds.join(", ")
            ),
        ))
    }
}

/// Secrets known at a moment, as one automaton over all their encodings.
struct Secrets {
    ac: Option<AhoCorasick>,
}

impl Secrets {
    fn build<'a, 'b>(fixed: impl Iterator<Item = &'a str>, more: impl Iterator<Item = &'b str>) -> Secrets {
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        let values: Vec<&str> = fixed.map(|s| s as &str).chain(more.map(|s| s as &str)).collect();
        for v in values {
            if v.chars().count() < MIN_SECRET_CHARS {
                continue;
            }
            patterns.extend(encodings(v.as_bytes()));
        }
        patterns.sort();
        patterns.dedup();
        patterns.retain(|p| p.len() >= 6);
        if patterns.is_empty() {
            return Secrets { ac: None };
        }
        let ac = AhoCorasickBuilder::new()
            .match_kind(MatchKind::LeftmostLongest)
            .ascii_case_insensitive(true)
            .build(&patterns)
            .ok();
        Secrets { ac }
    }
}

/// Shorter secrets are not looked for (they would redact ordinary words).
pub const MIN_SECRET_CHARS: usize = 6;

/// Every form a secret may take in outgoing text.
fn encodings(s: &[u8]) -> Vec<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let mut out = vec![s.to_vec()];
    // Base64 at each of the three alignments (the secret inside a longer encoded value, e.g.
    // `Basic base64(user:secret)`): the characters that depend on the secret's bytes only.
    for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
        out.push(engine.encode(s).into_bytes());
        for k in 0..3usize {
            let mut buf = vec![0u8; k];
            buf.extend_from_slice(s);
            let enc = engine.encode(&buf).into_bytes();
            // Groups of 4 chars map to 3 bytes; group 0 mixes the k prefix bytes (when k > 0),
            // the last group may mix with what follows.
            let first = if k == 0 { 0 } else { 4 };
            let full = buf.len() / 3;
            let end = full * 4;
            if end > first + 4 {
                out.push(enc[first..end].to_vec());
            }
        }
    }
    let pe = percent_encoding::percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string();
    out.push(pe.into_bytes());
    let form: String = form_urlencoded::byte_serialize(s).collect();
    out.push(form.into_bytes());
    let hex: String = s.iter().map(|b| format!("{b:02x}")).collect();
    out.push(hex.into_bytes());
    out
}

/// The guard: the policy (which kinds redact, block or are let through) and the known secrets.
pub struct Guard {
    block: Vec<Kind>,
    allow: Vec<Kind>,
    fixed: Vec<String>,
    secrets: RwLock<Arc<Secrets>>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("block", &self.block)
            .field("allow", &self.allow)
            .finish_non_exhaustive()
    }
}

static KEYWORD: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)one[- ]?time[- ]?(?:pass(?:word|code)?|code|pin)|verification|verify|security code|confirmation code|auth(?:entication|orization)? code|log[- ]?in code|sign[- ]?in code|access code|passcode|\botp\b|\b2fa\b|\bpin\b|\bcode\b|認証コード|確認コード|認証番号|確認番号|承認番号|ワンタイムパスワード|ワンタイムコード|ワンタイム|セキュリティコード|パスコード|暗証番号|コード|ＯＴＰ",
    )
    .unwrap()
});

static OTP_CANDIDATE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[0-9０-９]{3}[ \-－][0-9０-９]{3}|[0-9０-９]{4,8}").unwrap()
});

static DIGIT_RUN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[0-9０-９](?:[ \-－‐]?[0-9０-９])+").unwrap()
});

static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        r"(?:\+|＋)[0-9０-９](?:[ \-－.()]{0,2}[0-9０-９]){7,14}",
        r"|\(?0[0-9]{1,4}\)?[ \-－][0-9]{1,4}[ \-－][0-9]{3,4}",
        r"|0[5789]0[0-9]{8}",
        r"|\(?[2-9][0-9]{2}\)?[ \-.][0-9]{3}[ \-.][0-9]{4}",
    ))
    .unwrap()
});

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)[a-z0-9._%+\-]+@[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?)*\.[a-z]{2,}").unwrap()
});

static API_KEY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        r"sk-(?:proj-|live-|test-|ant-)?[A-Za-z0-9_\-]{16,}",
        r"|[spr]k_(?:live|test)_[A-Za-z0-9]{16,}",
        r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}",
        r"|xox[abposr]-[A-Za-z0-9\-]{10,}",
        r"|A(?:KIA|SIA)[0-9A-Z]{16}",
        r"|AIza[0-9A-Za-z_\-]{35}",
        r"|ya29\.[0-9A-Za-z_\-]{20,}",
        r"|glpat-[0-9A-Za-z_\-]{20,}",
        r"|eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",
    ))
    .unwrap()
});

static LONG_TOKEN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[A-Za-z0-9_\-+]{32,}={0,2}").unwrap());

fn digit_value(c: char) -> Option<u32> {
    match c {
        '0'..='9' => Some(c as u32 - '0' as u32),
        '０'..='９' => Some(c as u32 - '０' as u32),
        _ => None,
    }
}

fn digits_of(s: &str) -> Vec<u32> {
    s.chars().filter_map(digit_value).collect()
}

fn is_digit(c: char) -> bool {
    digit_value(c).is_some()
}

/// Luhn check over digits (left to right).
pub fn luhn(d: &[u32]) -> bool {
    let mut sum = 0;
    for (i, x) in d.iter().rev().enumerate() {
        let mut v = *x;
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum % 10 == 0
}

/// The My Number check digit of its first 11 digits.
pub fn my_number_check_digit(d: &[u32]) -> u32 {
    let mut sum = 0;
    for n in 1..=11usize {
        let p = d[11 - n];
        let q = if n <= 6 { n as u32 + 1 } else { n as u32 - 5 };
        sum += p * q;
    }
    let r = sum % 11;
    if r <= 1 { 0 } else { 11 - r }
}

/// A 12-digit number with a valid My Number check digit.
pub fn is_my_number(d: &[u32]) -> bool {
    d.len() == 12 && my_number_check_digit(d) == d[11]
}

fn shannon_bits(s: &str) -> f64 {
    let mut counts = [0usize; 128];
    let mut n = 0usize;
    for b in s.bytes() {
        counts[(b & 127) as usize] += 1;
        n += 1;
    }
    counts
        .iter()
        .filter(|c| **c > 0)
        .map(|c| {
            let p = *c as f64 / n as f64;
            -p * p.log2()
        })
        .sum()
}

/// Characters before `i` and after `j` in `text` are not digits (the match is a whole number).
fn digit_bounded(text: &str, i: usize, j: usize) -> bool {
    let before = text[..i].chars().next_back();
    let after = text[j..].chars().next();
    !before.is_some_and(is_digit) && !after.is_some_and(is_digit)
}

impl Guard {
    pub fn new(s: &GuardSettings) -> Guard {
        let fixed: Vec<String> = s.secrets.clone();
        let g = Guard {
            block: s.block.clone(),
            allow: s.allow.clone(),
            secrets: RwLock::new(Arc::new(Secrets::build(fixed.iter().map(String::as_str), std::iter::empty()))),
            fixed,
        };
        g
    }

    /// Replace the secrets that come and go (the vault's values), keeping the configured ones.
    pub fn set_dynamic_secrets<'a>(&self, values: impl Iterator<Item = &'a str>) {
        let all = Secrets::build(self.fixed.iter().map(String::as_str), values);
        *self.secrets.write().unwrap() = Arc::new(all);
    }

    /// Scan and redact `text`; `allowed` kinds (a function's policy) are left alone. Never
    /// fails: blocked kinds are listed in [`Scan::blocked`].
    pub fn scan(&self, text: &str, allowed: &[Kind]) -> Scan {
        let on = |k: Kind| !self.allow.contains(&k) && !allowed.contains(&k);
        let mut spans: Vec<(usize, usize, Kind)> = Vec::new();
        if on(Kind::Secret) {
            let secrets = Arc::clone(&self.secrets.read().unwrap());
            if let Some(ac) = &secrets.ac {
                for m in ac.find_iter(text.as_bytes()) {
                    let (mut i, mut j) = (m.start(), m.end());
                    // ASCII-case-insensitive matches of UTF-8 patterns start and end on char
                    // boundaries; be safe anyway.
                    while !text.is_char_boundary(i) {
                        i -= 1;
                    }
                    while !text.is_char_boundary(j) {
                        j += 1;
                    }
                    spans.push((i, j, Kind::Secret));
                }
            }
        }
        if on(Kind::ApiKey) {
            for m in API_KEY.find_iter(text) {
                spans.push((m.start(), m.end(), Kind::ApiKey));
            }
            for m in LONG_TOKEN.find_iter(text) {
                let t = m.as_str();
                let (up, low, dig) = (
                    t.bytes().any(|b| b.is_ascii_uppercase()),
                    t.bytes().any(|b| b.is_ascii_lowercase()),
                    t.bytes().any(|b| b.is_ascii_digit()),
                );
                if up && low && dig && shannon_bits(t) >= 4.0 {
                    spans.push((m.start(), m.end(), Kind::ApiKey));
                }
            }
        }
        if on(Kind::Card) || on(Kind::MyNumber) {
            for m in DIGIT_RUN.find_iter(text) {
                let s = m.as_str();
                let d = digits_of(s);
                if on(Kind::MyNumber) && is_my_number(&d) {
                    spans.push((m.start(), m.end(), Kind::MyNumber));
                } else if on(Kind::Card) && (13..=19).contains(&d.len()) && luhn(&d) {
                    spans.push((m.start(), m.end(), Kind::Card));
                }
            }
        }
        if on(Kind::Otp) {
            for k in KEYWORD.find_iter(text) {
                let lo = back_chars(text, k.start(), 40);
                let hi = fwd_chars(text, k.end(), 40);
                for (a, b) in [(lo, k.start()), (k.end(), hi)] {
                    for c in OTP_CANDIDATE.find_iter(&text[a..b]) {
                        let (i, j) = (a + c.start(), a + c.end());
                        if digit_bounded(text, i, j) {
                            spans.push((i, j, Kind::Otp));
                        }
                    }
                }
            }
        }
        if on(Kind::Phone) {
            for m in PHONE.find_iter(text) {
                if digit_bounded(text, m.start(), m.end()) {
                    spans.push((m.start(), m.end(), Kind::Phone));
                }
            }
        }
        if on(Kind::Email) {
            for m in EMAIL.find_iter(text) {
                spans.push((m.start(), m.end(), Kind::Email));
            }
        }
        if spans.is_empty() {
            return Scan {
                text: text.to_string(),
                ..Default::default()
            };
        }
        // Merge overlapping findings; the merged span keeps the most sensitive kind.
        spans.sort_by_key(|s| (s.0, std::cmp::Reverse(s.1)));
        let mut merged: Vec<(usize, usize, Kind)> = Vec::new();
        for s in spans {
            match merged.last_mut() {
                Some(last) if s.0 < last.1 => {
                    last.1 = last.1.max(s.1);
                    if s.2.rank() < last.2.rank() {
                        last.2 = s.2;
                    }
                }
                _ => merged.push(s),
            }
        }
        let mut out = String::with_capacity(text.len());
        let mut counts = BTreeMap::new();
        let mut at = 0;
        for (i, j, k) in merged {
            out.push_str(&text[at..i]);
            out.push_str("[REDACTED:");
            out.push_str(k.as_str());
            out.push(']');
            at = j;
            *counts.entry(k).or_insert(0usize) += 1;
        }
        out.push_str(&text[at..]);
        let blocked = counts
            .keys()
            .copied()
            .filter(|k| self.block.contains(k))
            .collect();
        Scan {
            text: out,
            counts,
            blocked,
        }
    }

    /// Only known secrets (vault values, `[egress.guard] secrets`) redacted, e.g. in answers a
    /// remote echoes back to Lua. `None` when there were none.
    pub fn redact_secrets(&self, text: &str) -> Option<String> {
        let others: Vec<Kind> = Kind::ALL.iter().copied().filter(|k| *k != Kind::Secret).collect();
        let s = self.scan(text, &others);
        (s.found() > 0).then_some(s.text)
    }

    /// [`scan`](Self::scan), and `Err(PRIVACY_BLOCKED)` when a kind the policy blocks is found.
    pub fn check(&self, text: &str, allowed: &[Kind]) -> Result<Scan> {
        let s = self.scan(text, allowed);
        match s.refusal("the text") {
            Some(e) => Err(e),
            None => Ok(s),
        }
    }
}

fn back_chars(text: &str, i: usize, n: usize) -> usize {
    text[..i]
        .char_indices()
        .rev()
        .nth(n.saturating_sub(1))
        .map(|(p, _)| p)
        .unwrap_or(0)
}

fn fwd_chars(text: &str, j: usize, n: usize) -> usize {
    text[j..]
        .char_indices()
        .nth(n)
        .map(|(p, _)| j + p)
        .unwrap_or(text.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn guard(secrets: &[&str]) -> Guard {
        Guard::new(&GuardSettings {
            secrets: secrets.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
    }

    #[test]
    fn check_digits() {
        assert!(luhn(&digits_of("4111111111111111")));
        assert!(!luhn(&digits_of("4111111111111112")));
        // A valid My Number example (check digit computed by the published rule).
        let d = digits_of("12345678901");
        let c = my_number_check_digit(&d);
        let mut full = d.clone();
        full.push(c);
        assert!(is_my_number(&full));
        full[11] = (c + 1) % 10;
        assert!(!is_my_number(&full));
    }

    #[test]
    fn finds_each_kind() {
        let g = guard(&["hunter2-very-secret"]);
        let cases: &[(&str, Kind)] = &[
            ("Your verification code is 482910.", Kind::Otp),
            ("482910 is your login code", Kind::Otp),
            ("認証コードは４８２９１０です", Kind::Otp),
            ("確認コード：123-456", Kind::Otp),
            ("card 4111 1111 1111 1111 exp", Kind::Card),
            ("カード番号4111-1111-1111-1111", Kind::Card),
            ("mail me at alice.b@example.co.jp please", Kind::Email),
            ("call +81 90-1234-5678", Kind::Phone),
            ("電話 090-1234-5678 まで", Kind::Phone),
            ("key sk-proj-abcdefghijklmnop1234", Kind::ApiKey),
            ("token ghp_abcdefghijklmnopqrstuvwxyz0123456789", Kind::ApiKey),
            ("pw=hunter2-very-secret", Kind::Secret),
            ("pw=aHVudGVyMi12ZXJ5LXNlY3JldA", Kind::Secret),
            ("pw=hunter2%2Dvery%2Dsecret", Kind::Secret),
            ("pw=68756e746572322d766572792d736563726574", Kind::Secret),
        ];
        for (text, kind) in cases {
            let s = g.scan(text, &[]);
            assert!(s.counts.get(kind).copied().unwrap_or(0) >= 1, "{text}: {s:?}");
            assert!(s.text.contains(&format!("[REDACTED:{}]", kind.as_str())), "{text}: {}", s.text);
        }
        // My Number.
        let mut d = digits_of("12345678901");
        d.push(my_number_check_digit(&d));
        let mn: String = d.iter().map(|x| char::from_digit(*x, 10).unwrap()).collect();
        let s = g.scan(&format!("マイナンバー {} です", mn), &[]);
        assert_eq!(s.counts.get(&Kind::MyNumber), Some(&1), "{s:?}");
        // Ordinary text passes untouched.
        for plain in [
            "The meeting is on 2024-05-01 at 10:30, room 12. 今日はいい天気ですね。",
            "See https://example.org/Podcasts/Episode123/TranscriptFullVersion2024 for details",
            "id 550e8400-e29b-41d4-a716-446655440000, total 1234567890.123 yen, v1.2.3",
            "192.168.100.200 and 10.0.0.1 are addresses; ISBN 978-4-06-521234-5",
        ] {
            assert_eq!(g.scan(plain, &[]).text, plain);
        }
    }

    #[test]
    fn basic_auth_hides_the_secret_at_any_alignment() {
        let g = guard(&["s3cr3t-passw0rd-xyz"]);
        for user in ["a", "ab", "abc", "user"] {
            let enc = base64::engine::general_purpose::STANDARD
                .encode(format!("{user}:s3cr3t-passw0rd-xyz"));
            let s = g.scan(&format!("Basic {enc}"), &[]);
            assert!(s.counts.contains_key(&Kind::Secret), "{user}: {s:?}");
        }
    }

    #[test]
    fn allowed_and_blocked_kinds() {
        let g = Guard::new(&GuardSettings {
            block: vec![Kind::Card],
            ..Default::default()
        });
        let s = g.scan("a@b.example and 4111111111111111", &[Kind::Email]);
        assert!(!s.counts.contains_key(&Kind::Email));
        assert_eq!(s.blocked, vec![Kind::Card]);
        assert!(g.check("4111111111111111", &[]).is_err());
        assert!(g.check("hello", &[]).is_ok());
    }

    fn filler() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[a-zA-Z ,.!?あいうえおかきくけこ今日天気ですね。、]{0,40}").unwrap()
    }

    proptest! {
        #[test]
        fn random_codes_in_random_text_are_redacted(
            pre in filler(), post in filler(),
            otp in 0u32..1_000_000u32,
            card_body in proptest::collection::vec(0u32..10, 14),
            mn_body in proptest::collection::vec(0u32..10, 11),
            secret in "[A-Za-z0-9]{12,32}",
            phrase in 0usize..6,
            sep in 0usize..3,
        ) {
            let g = guard(&[&secret]);
            let otp = format!("{otp:06}");
            let phrases = [
                format!("Your verification code is {otp}"),
                format!("{otp} is your one-time code"),
                format!("認証コードは{otp}です"),
                format!("ワンタイムパスワード: {otp}"),
                format!("security code {otp}."),
                format!("確認コード {otp}"),
            ];
            let mut card: Vec<u32> = vec![4];
            card.extend(card_body);
            let mut c = 0;
            while { let mut t = card.clone(); t.push(c); !luhn(&t) } { c += 1; }
            card.push(c);
            let sepc = ["", " ", "-"][sep];
            let card_s: String = card.chunks(4).map(|g| g.iter().map(|d| char::from_digit(*d, 10).unwrap()).collect::<String>()).collect::<Vec<_>>().join(sepc);
            let mut mn = mn_body.clone();
            mn.push(my_number_check_digit(&mn));
            let mn_s: String = mn.chunks(4).map(|g| g.iter().map(|d| char::from_digit(*d, 10).unwrap()).collect::<String>()).collect::<Vec<_>>().join(sepc);
            let b64 = base64::engine::general_purpose::STANDARD.encode(&secret);
            let text = format!("{pre} {} {post} カード {card_s} 、マイナンバー {mn_s} . key={secret} b={b64} {pre}", phrases[phrase]);
            let s = g.scan(&text, &[]);
            prop_assert!(!s.text.contains(&otp), "{}", s.text);
            prop_assert!(!s.text.contains(&card_s), "{}", s.text);
            prop_assert!(!s.text.contains(&mn_s), "{}", s.text);
            prop_assert!(!s.text.contains(&secret), "{}", s.text);
            prop_assert!(!s.text.contains(&b64[..b64.len() - 4]), "{}", s.text);
        }
    }
}
