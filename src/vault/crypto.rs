//! The vault's encryption: AES-256-GCM with a random 96-bit nonce per value and the secret's
//! name as associated data (a ciphertext moved to another name does not decrypt). Keys are
//! identified by the first 8 hex digits of their SHA-256, so rows name the key that sealed
//! them and rotation can re-seal them with the current one.
//!
//! Owns key loading (config, environment through the section override, a key file, or a key
//! generated once in the data directory) and sealing; knows nothing of storage.

use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use sha2::Digest;
use zeroize::Zeroizing;

use super::VaultSettings;
use crate::core::{Error, Result};

struct Key {
    id: String,
    cipher: Aes256Gcm,
}

/// The current key and the old ones still accepted for reading.
pub struct Keys {
    current: Key,
    old: Vec<Key>,
}

fn parse_key(b64: &str) -> anyhow::Result<Key> {
    let raw = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| anyhow::anyhow!("[vault] a key is not base64: {e}"))?,
    );
    anyhow::ensure!(raw.len() == 32, "[vault] a key must be 32 bytes (base64 of 32 random bytes), got {}", raw.len());
    let id: String = sha2::Sha256::digest(&raw[..]).iter().take(4).map(|b| format!("{b:02x}")).collect();
    let cipher = Aes256Gcm::new_from_slice(&raw).map_err(|e| anyhow::anyhow!("[vault] key: {e}"))?;
    Ok(Key { id, cipher })
}

impl Keys {
    pub fn from_settings(s: &VaultSettings, data_dir: &Path) -> anyhow::Result<Keys> {
        let current = if let Some(k) = &s.key {
            parse_key(k)?
        } else {
            let path = match &s.key_file {
                Some(p) => std::path::PathBuf::from(p),
                None => data_dir.join("vault.key"),
            };
            if !path.exists() && s.key_file.is_none() {
                let mut raw = Zeroizing::new([0u8; 32]);
                getrandom::fill(&mut raw[..]).map_err(|e| anyhow::anyhow!("vault key: {e}"))?;
                let text = base64::engine::general_purpose::STANDARD.encode(&raw[..]);
                write_private(&path, &text)?;
            }
            let text = Zeroizing::new(
                std::fs::read_to_string(&path)
                    .map_err(|e| anyhow::anyhow!("[vault] key_file {}: {e}", path.display()))?,
            );
            parse_key(&text)?
        };
        let old = s.old_keys.iter().map(|k| parse_key(k)).collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Keys { current, old })
    }

    pub fn current_id(&self) -> &str {
        &self.current.id
    }

    /// Seal `plain`: (key id, nonce, ciphertext).
    pub fn encrypt(&self, plain: &[u8], aad: &[u8]) -> Result<(String, Vec<u8>, Vec<u8>)> {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|e| Error::internal(format!("vault: {e}")))?;
        let ct = self
            .current
            .cipher
            .encrypt(&Nonce::from(nonce), Payload { msg: plain, aad })
            .map_err(|_| Error::internal("vault: encryption failed"))?;
        Ok((self.current.id.clone(), nonce.to_vec(), ct))
    }

    pub fn decrypt(&self, key_id: &str, nonce: &[u8], ct: &[u8], aad: &[u8]) -> std::result::Result<Zeroizing<String>, String> {
        let key = std::iter::once(&self.current)
            .chain(self.old.iter())
            .find(|k| k.id == key_id)
            .ok_or_else(|| format!("key {key_id} is neither [vault] key nor one of old_keys"))?;
        let nonce = <[u8; 12]>::try_from(nonce).map_err(|_| "bad nonce".to_string())?;
        let plain = Zeroizing::new(
            key.cipher
                .decrypt(&Nonce::from(nonce), Payload { msg: ct, aad })
                .map_err(|_| "authentication failed (wrong key or tampered row)".to_string())?,
        );
        String::from_utf8(plain.to_vec()).map(Zeroizing::new).map_err(|_| "not UTF-8".into())
    }
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o.open(path).map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
        let k2 = base64::engine::general_purpose::STANDARD.encode([2u8; 32]);
        let a = Keys::from_settings(&VaultSettings { key: Some(k1.clone()), ..Default::default() }, dir.path()).unwrap();
        let (id, n, ct) = a.encrypt(b"tok", b"spotify").unwrap();
        assert_eq!(&*a.decrypt(&id, &n, &ct, b"spotify").unwrap(), "tok");
        assert!(a.decrypt(&id, &n, &ct, b"other").is_err(), "bound to its name");
        let b = Keys::from_settings(&VaultSettings { key: Some(k2), old_keys: vec![k1], ..Default::default() }, dir.path()).unwrap();
        assert_eq!(&*b.decrypt(&id, &n, &ct, b"spotify").unwrap(), "tok");
        assert_ne!(b.current_id(), id);
        // A generated key file is reused.
        let g1 = Keys::from_settings(&VaultSettings::default(), dir.path()).unwrap();
        let g2 = Keys::from_settings(&VaultSettings::default(), dir.path()).unwrap();
        assert_eq!(g1.current_id(), g2.current_id());
    }
}
