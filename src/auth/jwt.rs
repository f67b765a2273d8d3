//! The HS256 key ring for access tokens, kept in `<data_dir>/jwt-keys.json` (mode 0600).
//!
//! The newest key signs; every key in the ring verifies, so rotation does not log anyone out:
//! a rotated-out key keeps verifying until it falls off the ring ([`KEEP`] keys are kept).
//! Only HS256 is accepted; `alg: none` and every other algorithm are refused.
//!
//! A token's signature and claims are checked once per ring: the claims of tokens that verified
//! are remembered (by the SHA-256 of the token, at most [`VERIFIED_MAX`]), so later requests
//! with the same token skip the HMAC and JSON work. Expiry is checked again on every use, and a
//! rotation (or a ring reloaded from disk) starts the memory over, so a key that left the ring
//! stops verifying its tokens at once. Revocation (sign-out, disabled users) is not decided here:
//! `Auth` checks it on every request after `verify`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::secrets::random_bytes;
use crate::core::{Error, ErrorCode, Result};

/// Keys kept in the ring: the signing key and the ones before it.
pub const KEEP: usize = 3;

/// Verified tokens remembered at most by default (about 0.5 KB each); past it the memory starts
/// over (`[auth_guard] verified_tokens_max`).
pub const VERIFIED_MAX: usize = 10_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    secret: String,
    created_at: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Stored {
    keys: Vec<StoredKey>,
}

/// Claims of an ichibase access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: String,
    pub sid: String,
    /// The device of the session (`auth::devices`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub did: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    pub iat: u64,
    pub exp: u64,
    pub iss: String,
}

pub struct KeyRing {
    path: PathBuf,
    stored: Stored,
    /// SHA-256 of a token that verified with this ring -> its claims.
    verified: Mutex<HashMap<[u8; 32], Claims>>,
    /// At most this many remembered (0: none).
    verified_max: usize,
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_key() -> StoredKey {
    StoredKey {
        kid: uuid::Uuid::new_v4().simple().to_string()[..12].to_string(),
        secret: STANDARD.encode(random_bytes(32)),
        created_at: now(),
    }
}

impl KeyRing {
    /// Load the ring, creating it with one fresh key on first start.
    pub fn open(path: &Path) -> anyhow::Result<KeyRing> {
        let stored = if path.exists() {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("reading the JWT key ring {}: {e}", path.display()))?;
            let s: Stored = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{} is not a valid key ring: {e}", path.display()))?;
            anyhow::ensure!(!s.keys.is_empty(), "{} holds no keys", path.display());
            s
        } else {
            Stored {
                keys: vec![new_key()],
            }
        };
        let ring = KeyRing {
            path: path.to_path_buf(),
            stored,
            verified: Mutex::new(HashMap::new()),
            verified_max: VERIFIED_MAX,
        };
        if !path.exists() {
            ring.save()?;
        }
        Ok(ring)
    }

    fn save(&self) -> anyhow::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let named = |what: &str, p: &Path, e: std::io::Error| {
            anyhow::anyhow!("{what} the JWT key ring {}: {e}", p.display())
        };
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.stored)?)
            .map_err(|e| named("writing", &tmp, e))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| named("setting the mode of", &tmp, e))?;
        }
        std::fs::rename(&tmp, &self.path).map_err(|e| named("replacing", &self.path, e))?;
        Ok(())
    }

    /// Add a new signing key; keeps the newest [`KEEP`]. Returns the new key id.
    /// Where the ring is stored.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn rotate(&mut self) -> anyhow::Result<String> {
        let k = new_key();
        let kid = k.kid.clone();
        self.stored.keys.insert(0, k);
        self.stored.keys.truncate(KEEP);
        // Tokens of the key that fell off the ring must stop verifying now.
        self.forget_verified();
        self.save()?;
        Ok(kid)
    }

    pub fn kids(&self) -> Vec<String> {
        self.stored.keys.iter().map(|k| k.kid.clone()).collect()
    }

    fn secret(k: &StoredKey) -> Vec<u8> {
        STANDARD.decode(&k.secret).unwrap_or_default()
    }

    pub fn sign(&self, claims: &Claims) -> Result<String> {
        let k = &self.stored.keys[0];
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(k.kid.clone());
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(&Self::secret(k)))
            .map_err(|e| Error::internal(format!("signing token: {e}")))
    }

    /// Remember at most `n` verified tokens (0: verify every use in full).
    pub fn with_verified_max(mut self, n: usize) -> KeyRing {
        self.verified_max = n;
        self
    }

    fn forget_verified(&self) {
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Verify signature, algorithm, issuer and expiry. A token that verified before with this
    /// ring is only checked for expiry (see the module doc).
    pub fn verify(&self, token: &str) -> Result<Claims> {
        use sha2::Digest;
        let id: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        if let Some(c) = self
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            // Same rule as the full check (leeway 0): valid while exp >= now.
            if c.exp >= now() {
                return Ok(c.clone());
            }
        }
        let claims = self.verify_uncached(token)?;
        if self.verified_max == 0 {
            return Ok(claims);
        }
        let mut v = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() >= self.verified_max {
            v.clear();
        }
        v.insert(id, claims.clone());
        Ok(claims)
    }

    fn verify_uncached(&self, token: &str) -> Result<Claims> {
        let fail = |why: &str| {
            Error::new(
                ErrorCode::AuthenticationFailed,
                format!("Invalid access token: {why}"),
            )
        };
        let header = jsonwebtoken::decode_header(token).map_err(|e| fail(&e.to_string()))?;
        if header.alg != Algorithm::HS256 {
            return Err(fail("only HS256 tokens are accepted"));
        }
        let kid = header.kid.ok_or_else(|| fail("no key id"))?;
        let key = self
            .stored
            .keys
            .iter()
            .find(|k| k.kid == kid)
            .ok_or_else(|| fail("unknown key id (signed with another key, or rotated out)"))?;
        let mut v = Validation::new(Algorithm::HS256);
        v.leeway = 0;
        v.set_issuer(&["ichibase"]);
        v.set_required_spec_claims(&["exp", "sub", "iss"]);
        jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(&Self::secret(key)), &v)
            .map(|d| d.claims)
            .map_err(|e| {
                if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) {
                    Error::new(
                        ErrorCode::AuthenticationFailed,
                        "Access token expired: refresh it with POST /auth/refresh",
                    )
                } else {
                    fail(&e.to_string())
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_tokens_still_expire_and_tampering_still_fails() {
        let dir = tempfile::tempdir().unwrap();
        let ring = KeyRing::open(&dir.path().join("k.json")).unwrap();
        // Expires within the second: verified once, then refused once past `exp`.
        let t = ring.sign(&claims(1)).unwrap();
        assert_eq!(ring.verify(&t).unwrap().sub, "u1");
        assert_eq!(ring.verify(&t).unwrap().sub, "u1", "remembered");
        std::thread::sleep(std::time::Duration::from_millis(2100));
        let e = ring.verify(&t).unwrap_err();
        assert!(e.message.contains("expired"), "{}", e.message);
        // A token differing in one character is a different token: fully checked, refused.
        let t = ring.sign(&claims(60)).unwrap();
        assert!(ring.verify(&t).is_ok());
        let mut bad = t.clone().into_bytes();
        let last = bad.len() - 2;
        bad[last] = if bad[last] == b'A' { b'B' } else { b'A' };
        assert!(ring.verify(std::str::from_utf8(&bad).unwrap()).is_err());
    }

    fn claims(exp_in: i64) -> Claims {
        Claims {
            sub: "u1".into(),
            role: "user".into(),
            sid: "s1".into(),
            did: None,
            email: None,
            iat: now(),
            exp: (now() as i64 + exp_in) as u64,
            iss: "ichibase".into(),
        }
    }

    #[test]
    fn sign_verify_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.json");
        let mut ring = KeyRing::open(&p).unwrap();
        let t = ring.sign(&claims(60)).unwrap();
        assert_eq!(ring.verify(&t).unwrap().sub, "u1");
        ring.rotate().unwrap();
        assert_eq!(
            ring.verify(&t).unwrap().sub,
            "u1",
            "old tokens verify after one rotation"
        );
        let t2 = ring.sign(&claims(60)).unwrap();
        assert_eq!(
            KeyRing::open(&p).unwrap().verify(&t2).unwrap().sub,
            "u1",
            "ring persists"
        );
        for _ in 0..KEEP {
            ring.rotate().unwrap();
        }
        assert!(ring.verify(&t).is_err(), "rotated out");
        // A ring reloaded from disk with fewer keys refuses a token the old ring had verified.
        let t3 = ring.sign(&claims(60)).unwrap();
        assert!(ring.verify(&t3).is_ok());
        let mut other = KeyRing::open(&p).unwrap();
        for _ in 0..KEEP {
            other.rotate().unwrap();
        }
        assert!(KeyRing::open(&p).unwrap().verify(&t3).is_err(), "reloaded ring");
        assert!(
            ring.verify(&ring.sign(&claims(-10)).unwrap())
                .unwrap_err()
                .message
                .contains("expired")
        );
    }
}
