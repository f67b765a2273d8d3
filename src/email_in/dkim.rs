//! DKIM verification (RFC 6376) against public keys given in `[email_in] dkim_keys`, and an
//! offline SPF table (`[email_in] spf`). No DNS: a signature whose key is not configured
//! records `none`.
//!
//! Supports `rsa-sha256` (RFC 6376) and `ed25519-sha256` (RFC 8463), `simple` and `relaxed`
//! canonicalization of headers and body, `l=`, `x=` and `i=`. `rsa-sha1` is refused
//! (RFC 8301). Owns nothing but these functions; it reads the raw message it is given.

use std::collections::BTreeMap;
use std::net::IpAddr;

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// Most DKIM-Signature headers looked at in one message.
const MAX_SIGNATURES: usize = 8;

/// A DKIM public key (the `p=` of a TXT record).
#[derive(Debug, Clone)]
pub enum PublicKey {
    Rsa(Box<rsa::RsaPublicKey>),
    Ed25519(ed25519_dalek::VerifyingKey),
}

impl PublicKey {
    /// Parse a DKIM key record: `v=DKIM1; k=rsa; p=<base64>` (`k=ed25519`: 32 raw bytes).
    pub fn parse(record: &str) -> Result<PublicKey, String> {
        let tags = tags(record)?;
        let get = |n: &str| tags.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        if let Some(v) = get("v")
            && v != "DKIM1"
        {
            return Err(format!("v={v}: only DKIM1 keys"));
        }
        let p = get("p").ok_or("the record has no p= (public key)")?;
        let p: String = p.chars().filter(|c| !c.is_whitespace()).collect();
        if p.is_empty() {
            return Err("p= is empty (the key is revoked)".into());
        }
        let der = base64::engine::general_purpose::STANDARD
            .decode(p.as_bytes())
            .map_err(|e| format!("p= is not base64: {e}"))?;
        match get("k").unwrap_or("rsa") {
            "rsa" => {
                use rsa::pkcs1::DecodeRsaPublicKey;
                use rsa::pkcs8::DecodePublicKey;
                use rsa::traits::PublicKeyParts;
                let k = rsa::RsaPublicKey::from_public_key_der(&der)
                    .or_else(|_| rsa::RsaPublicKey::from_pkcs1_der(&der))
                    .map_err(|e| format!("p= is not an RSA public key: {e}"))?;
                if k.size() * 8 < 1024 {
                    return Err(format!("the RSA key has {} bits; at least 1024 are needed", k.size() * 8));
                }
                Ok(PublicKey::Rsa(Box::new(k)))
            }
            "ed25519" => {
                let b: [u8; 32] = der.as_slice().try_into().map_err(|_| "an ed25519 key is 32 bytes".to_string())?;
                Ok(PublicKey::Ed25519(
                    ed25519_dalek::VerifyingKey::from_bytes(&b).map_err(|e| format!("bad ed25519 key: {e}"))?,
                ))
            }
            k => Err(format!("k={k}: only rsa and ed25519 keys")),
        }
    }
}

/// `1.2.3.4`, `1.2.3.0/24`, `2001:db8::/32`.
pub fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<ipnet::IpNet>() {
        return Ok(n.trunc());
    }
    s.parse::<IpAddr>()
        .map(ipnet::IpNet::from)
        .map_err(|_| format!("{s:?} is not an address or CIDR range"))
}

/// The offline SPF result for a client at `ip` sending as `mail_from`: `pass` or `fail` when
/// its domain is in the table, else `none`.
pub fn spf(table: &BTreeMap<String, Vec<ipnet::IpNet>>, mail_from: &str, ip: Option<IpAddr>) -> &'static str {
    let Some((_, domain)) = mail_from.rsplit_once('@') else { return "none" };
    let Some(nets) = table.get(&domain.to_ascii_lowercase()) else { return "none" };
    let ip = match ip {
        Some(IpAddr::V6(v6)) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        Some(ip) => ip,
        None => return "fail",
    };
    if nets.iter().any(|n| n.contains(&ip)) { "pass" } else { "fail" }
}

/// The outcome of checking a message's signatures.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// `pass` (a signature verified), `fail` (signatures, none verified, one failed) or `none`
    /// (no signature, or only ones whose key is not configured).
    pub result: &'static str,
    /// One line per signature: `d=... s=...: pass|fail (why)|none (why)`.
    pub detail: String,
    /// The domain of the first passing signature.
    pub domain: Option<String>,
}

/// Tag list (`a=b; c=d`) → pairs; whitespace around names and values is dropped.
fn tags(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for part in s.split(';') {
        let part = part.trim_matches(|c: char| c.is_ascii_whitespace());
        if part.is_empty() {
            continue;
        }
        let (k, v) = part.split_once('=').ok_or_else(|| format!("tag {part:?} has no '='"))?;
        let k = k.trim_matches(|c: char| c.is_ascii_whitespace()).to_string();
        if out.iter().any(|(n, _): &(String, String)| *n == k) {
            return Err(format!("tag {k} appears twice"));
        }
        out.push((k, v.trim_matches(|c: char| c.is_ascii_whitespace()).to_string()));
    }
    Ok(out)
}

/// One header field: its name and its whole raw text (name, colon, value, CRLFs).
struct Field<'a> {
    name: &'a str,
    raw: &'a [u8],
}

/// Split the message into its header fields and its body (after the empty line).
fn split(raw: &[u8]) -> (Vec<Field<'_>>, &[u8]) {
    let (head, body) = match find(raw, b"\r\n\r\n") {
        Some(i) => (&raw[..i + 2], &raw[i + 4..]),
        None => (raw, &raw[raw.len()..]),
    };
    let mut fields = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < head.len() {
        // End of a line: the field goes on when the next line starts with WSP.
        if head[i] == b'\n' {
            let next = head.get(i + 1).copied();
            if !matches!(next, Some(b' ' | b'\t')) {
                let f = &head[start..=i];
                if let Some(colon) = f.iter().position(|&b| b == b':')
                    && let Ok(name) = std::str::from_utf8(&f[..colon])
                {
                    fields.push(Field { name: name.trim_end_matches([' ', '\t']), raw: f });
                }
                start = i + 1;
            }
        }
        i += 1;
    }
    if start < head.len() {
        let f = &head[start..];
        if let Some(colon) = f.iter().position(|&b| b == b':')
            && let Ok(name) = std::str::from_utf8(&f[..colon])
        {
            fields.push(Field { name: name.trim_end_matches([' ', '\t']), raw: f });
        }
    }
    (fields, body)
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Relaxed header canonicalization of one field, with CRLF.
fn relaxed_header(f: &Field<'_>) -> Vec<u8> {
    let colon = f.raw.iter().position(|&b| b == b':').unwrap_or(f.raw.len());
    let mut out = f.name.to_ascii_lowercase().into_bytes();
    out.push(b':');
    // Unfold (drop CR and LF), runs of WSP to one SP, trim both ends.
    let value: Vec<u8> = f.raw[(colon + 1).min(f.raw.len())..]
        .iter()
        .copied()
        .filter(|&b| b != b'\r' && b != b'\n')
        .collect();
    let mut v = Vec::with_capacity(value.len());
    let mut in_wsp = false;
    for b in value {
        if is_wsp(b) {
            in_wsp = true;
        } else {
            if in_wsp && !v.is_empty() {
                v.push(b' ');
            }
            in_wsp = false;
            v.push(b);
        }
    }
    out.extend_from_slice(&v);
    out.extend_from_slice(b"\r\n");
    out
}

/// The canonical body (`relaxed` or `simple`).
fn canonical_body(body: &[u8], relaxed: bool) -> Vec<u8> {
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut rest = body;
    loop {
        match find(rest, b"\r\n") {
            Some(i) => {
                lines.push(rest[..i].to_vec());
                rest = &rest[i + 2..];
            }
            None => {
                if !rest.is_empty() {
                    lines.push(rest.to_vec());
                }
                break;
            }
        }
    }
    if relaxed {
        for l in &mut lines {
            let mut out = Vec::with_capacity(l.len());
            let mut in_wsp = false;
            for &b in l.iter() {
                if is_wsp(b) {
                    in_wsp = true;
                } else {
                    if in_wsp {
                        out.push(b' ');
                    }
                    in_wsp = false;
                    out.push(b);
                }
            }
            *l = out; // trailing WSP dropped (never flushed)
        }
    }
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    if lines.is_empty() {
        return if relaxed { Vec::new() } else { b"\r\n".to_vec() };
    }
    let mut out = Vec::with_capacity(body.len() + 2);
    for l in lines {
        out.extend_from_slice(&l);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The DKIM-Signature field with its `b=` value removed (for hashing).
fn without_b(raw: &[u8]) -> Vec<u8> {
    let colon = raw.iter().position(|&b| b == b':').unwrap_or(0);
    let mut out = raw[..=colon].to_vec();
    let value = &raw[colon + 1..];
    let mut first = true;
    for seg in value.split(|&b| b == b';') {
        if !first {
            out.push(b';');
        }
        first = false;
        let name_end = seg.iter().position(|&b| b == b'=');
        let is_b = name_end.is_some_and(|e| {
            seg[..e]
                .iter()
                .copied()
                .filter(|b| !b.is_ascii_whitespace())
                .eq(b"b".iter().copied())
        });
        match (is_b, name_end) {
            (true, Some(e)) => out.extend_from_slice(&seg[..=e]),
            _ => out.extend_from_slice(seg),
        }
    }
    out
}

/// Verify every DKIM-Signature of `raw` (CRLF line ends) against `keys`
/// (`selector._domainkey.domain` → key); `now` is Unix seconds (for `x=`).
pub fn verify(raw: &[u8], keys: &BTreeMap<String, PublicKey>, now: i64) -> Outcome {
    let (fields, body) = split(raw);
    let sigs: Vec<&Field<'_>> = fields
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case("DKIM-Signature"))
        .take(MAX_SIGNATURES)
        .collect();
    if sigs.is_empty() {
        return Outcome { result: "none", detail: "no DKIM-Signature".into(), domain: None };
    }
    let mut lines = Vec::new();
    let (mut any_pass, mut any_fail, mut domain) = (false, false, None);
    for sig in sigs {
        let (label, r) = match check_one(sig, &fields, body, keys, now) {
            Ok((label, d)) => {
                any_pass = true;
                domain.get_or_insert(d);
                (label, "pass".to_string())
            }
            Err((label, Verdict::Fail(why))) => {
                any_fail = true;
                (label, format!("fail ({why})"))
            }
            Err((label, Verdict::None(why))) => (label, format!("none ({why})")),
        };
        lines.push(format!("{label}: {r}"));
    }
    let result = if any_pass {
        "pass"
    } else if any_fail {
        "fail"
    } else {
        "none"
    };
    Outcome { result, detail: lines.join("; "), domain }
}

enum Verdict {
    Fail(String),
    None(String),
}

fn check_one(
    sig: &Field<'_>,
    fields: &[Field<'_>],
    body: &[u8],
    keys: &BTreeMap<String, PublicKey>,
    now: i64,
) -> Result<(String, String), (String, Verdict)> {
    let text = String::from_utf8_lossy(sig.raw);
    let value = text.split_once(':').map(|x| x.1).unwrap_or("");
    let fail = |label: &str, why: String| (label.to_string(), Verdict::Fail(why));
    let t = tags(value).map_err(|e| fail("?", format!("malformed signature: {e}")))?;
    let get = |n: &str| t.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    let d = get("d").unwrap_or("").to_ascii_lowercase();
    let s = get("s").unwrap_or("").to_ascii_lowercase();
    let label = format!("d={d} s={s}");
    let fail = |why: String| (label.clone(), Verdict::Fail(why));
    if get("v") != Some("1") {
        return Err(fail("v= must be 1".into()));
    }
    if d.is_empty() || s.is_empty() {
        return Err(fail("d= and s= are required".into()));
    }
    let alg = get("a").ok_or_else(|| fail("a= is required".into()))?;
    let (hdr_relaxed, body_relaxed) = match get("c").unwrap_or("simple/simple") {
        "simple" | "simple/simple" => (false, false),
        "relaxed" | "relaxed/simple" => (true, false),
        "simple/relaxed" => (false, true),
        "relaxed/relaxed" => (true, true),
        c => return Err(fail(format!("c={c}: unknown canonicalization"))),
    };
    let h = get("h").ok_or_else(|| fail("h= is required".into()))?;
    let signed: Vec<String> = h
        .split(':')
        .map(|n| n.trim_matches(|c: char| c.is_ascii_whitespace()).to_string())
        .filter(|n| !n.is_empty())
        .collect();
    if !signed.iter().any(|n| n.eq_ignore_ascii_case("from")) {
        return Err(fail("h= does not sign From".into()));
    }
    if signed.len() > 200 {
        return Err(fail("h= names more than 200 headers".into()));
    }
    if let Some(i) = get("i") {
        let idom = i.rsplit_once('@').map(|x| x.1).unwrap_or("").to_ascii_lowercase();
        if idom != d && !idom.ends_with(&format!(".{d}")) {
            return Err(fail(format!("i={i} is not in d={d}")));
        }
    }
    if let Some(x) = get("x") {
        let x: i64 = x.parse().map_err(|_| fail(format!("x={x} is not a number")))?;
        if x < now {
            return Err(fail("the signature has expired (x=)".into()));
        }
    }
    let b64 = |v: &str| {
        let v: String = v.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        base64::engine::general_purpose::STANDARD.decode(v.as_bytes())
    };
    let bh = b64(get("bh").ok_or_else(|| fail("bh= is required".into()))?).map_err(|_| fail("bh= is not base64".into()))?;
    let b = b64(get("b").ok_or_else(|| fail("b= is required".into()))?).map_err(|_| fail("b= is not base64".into()))?;
    let alg_ok = matches!(alg, "rsa-sha256" | "ed25519-sha256");
    if !alg_ok {
        return Err(fail(format!("a={alg} is not accepted (rsa-sha256 or ed25519-sha256; rsa-sha1 is refused, RFC 8301)")));
    }
    let key = keys
        .get(&format!("{s}._domainkey.{d}"))
        .ok_or_else(|| (label.clone(), Verdict::None(format!("no key {s}._domainkey.{d} in [email_in] dkim_keys"))))?;
    match (alg, key) {
        ("rsa-sha256", PublicKey::Rsa(_)) | ("ed25519-sha256", PublicKey::Ed25519(_)) => {}
        _ => return Err(fail(format!("a={alg} does not match the configured key's type"))),
    }
    // Body hash.
    let mut cb = canonical_body(body, body_relaxed);
    if let Some(l) = get("l") {
        let l: usize = l.parse().map_err(|_| fail(format!("l={l} is not a number")))?;
        if l > cb.len() {
            return Err(fail("l= is longer than the body".into()));
        }
        cb.truncate(l);
    }
    if Sha256::digest(&cb)[..] != bh[..] {
        return Err(fail("body hash mismatch (the body was changed)".into()));
    }
    // Header hash: each name in h= takes the last unused instance of that field.
    let mut used = vec![false; fields.len()];
    let mut data = Vec::new();
    for name in &signed {
        if let Some(i) = (0..fields.len()).rev().find(|&i| !used[i] && fields[i].name.eq_ignore_ascii_case(name)) {
            used[i] = true;
            if hdr_relaxed {
                data.extend_from_slice(&relaxed_header(&fields[i]));
            } else {
                data.extend_from_slice(fields[i].raw);
            }
        }
    }
    let stripped = without_b(sig.raw);
    let f = Field { name: sig.name, raw: &stripped };
    let mut own = if hdr_relaxed { relaxed_header(&f) } else { stripped.clone() };
    while own.last().is_some_and(|&c| c == b'\n' || c == b'\r') {
        own.pop();
    }
    data.extend_from_slice(&own);
    let hash = Sha256::digest(&data);
    let ok = match key {
        PublicKey::Rsa(k) => k.verify(rsa::Pkcs1v15Sign::new::<Sha256>(), &hash, &b).is_ok(),
        PublicKey::Ed25519(k) => match ed25519_dalek::Signature::from_slice(&b) {
            Ok(sig) => k.verify_strict(&hash, &sig).is_ok(),
            Err(_) => false,
        },
    };
    if ok {
        Ok((label, d))
    } else {
        Err(fail("signature mismatch (signed headers changed, or another key signed)".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_canonicalization() {
        assert_eq!(canonical_body(b"", false), b"\r\n");
        assert_eq!(canonical_body(b"", true), b"");
        assert_eq!(canonical_body(b"a  b \t\r\n\r\n\r\n", true), b"a b\r\n");
        assert_eq!(canonical_body(b"a  b \t\r\n\r\n\r\n", false), b"a  b \t\r\n");
        assert_eq!(canonical_body(b"x", false), b"x\r\n");
        assert_eq!(canonical_body(b" c \r\n", true), b" c\r\n");
    }

    #[test]
    fn header_canonicalization_and_b_removal() {
        let (fields, body) = split(b"Subject:  Hello \r\n\tworld  \r\nFrom: a@b\r\n\r\nbody\r\n");
        assert_eq!(fields.len(), 2);
        assert_eq!(body, b"body\r\n");
        assert_eq!(relaxed_header(&fields[0]), b"subject:Hello world\r\n");
        assert_eq!(
            without_b(b"DKIM-Signature: v=1; bh=abc; b=xyz\r\n  def; d=x\r\n"),
            b"DKIM-Signature: v=1; bh=abc; b=; d=x\r\n"
        );
    }

    #[test]
    fn spf_table() {
        let mut t = BTreeMap::new();
        t.insert("example.com".to_string(), vec![parse_net("127.0.0.1").unwrap(), parse_net("10.0.0.0/8").unwrap()]);
        assert_eq!(spf(&t, "a@example.com", Some("127.0.0.1".parse().unwrap())), "pass");
        assert_eq!(spf(&t, "a@EXAMPLE.com", Some("10.1.2.3".parse().unwrap())), "pass");
        assert_eq!(spf(&t, "a@example.com", Some("192.0.2.1".parse().unwrap())), "fail");
        assert_eq!(spf(&t, "a@other.org", Some("127.0.0.1".parse().unwrap())), "none");
        assert_eq!(spf(&t, "", None), "none");
    }

    #[test]
    fn unsigned_and_unknown_keys() {
        let keys = BTreeMap::new();
        assert_eq!(verify(b"From: a@b\r\n\r\nhi\r\n", &keys, 0).result, "none");
        let m = b"DKIM-Signature: v=1; a=rsa-sha256; d=b; s=s; h=from; bh=AAAA; b=AAAA\r\nFrom: a@b\r\n\r\nhi\r\n";
        let o = verify(m, &keys, 0);
        assert_eq!(o.result, "none", "{o:?}");
        assert!(PublicKey::parse("v=DKIM1; k=rsa; p=").is_err());
        assert!(PublicKey::parse("v=DKIM1; k=ed25519; p=AAAA").is_err());
    }
}
