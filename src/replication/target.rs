//! Where replicas live: an S3-compatible bucket (`s3://bucket/prefix`) or a local directory
//! (`file:///dir`), both through the `object_store` crate, with optional client-side
//! AES-256-GCM encryption of every object.
//!
//! Owns object naming under the configured prefix and the encryption envelope
//! (`IBX1` + 12-byte nonce + ciphertext with its tag). Knows nothing about LTX or SQLite.

use std::sync::Arc;
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, PutPayload};

const ENVELOPE: &[u8; 4] = b"IBX1";
/// Files larger than this are uploaded in parts.
const STREAM_ABOVE: u64 = 64 * 1024 * 1024;
const PART: u64 = 16 * 1024 * 1024;

/// Settings of a target (from [`crate::config::ReplicationSettings`]).
#[derive(Clone, Default)]
pub struct TargetOptions {
    pub url: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// 32-byte AES-256-GCM key.
    pub encryption_key: Option<[u8; 32]>,
    /// Timeout of one request.
    pub timeout: Duration,
}

impl std::fmt::Debug for TargetOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetOptions")
            .field("url", &self.url)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("encrypted", &self.encryption_key.is_some())
            .finish()
    }
}

/// An object listed under the prefix.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Path relative to the target's prefix.
    pub name: String,
    pub size: u64,
    /// When the object was stored (ms since the epoch).
    pub modified_ms: i64,
}

#[derive(Clone)]
pub struct Target {
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    url: String,
    cipher: Option<Arc<Aes256Gcm>>,
    /// Litestream v0.5 keys levels differently per backend: `ltx/<level>/` on a directory,
    /// `<level as %04x>/` on S3.
    s3_layout: bool,
}

impl Target {
    pub fn open(o: &TargetOptions) -> anyhow::Result<Target> {
        let url = o.url.trim_end_matches('/').to_string();
        let (store, prefix): (Arc<dyn ObjectStore>, String) =
            if let Some(rest) = url.strip_prefix("s3://") {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    bail!("replication url {url}: no bucket (expected s3://BUCKET/PREFIX)");
                }
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_region(o.region.clone().unwrap_or_else(|| "us-east-1".into()))
                    .with_retry(object_store::RetryConfig {
                        backoff: Default::default(),
                        max_retries: 2,
                        retry_timeout: o.timeout,
                    })
                    .with_client_options(
                        object_store::ClientOptions::new()
                            .with_timeout(o.timeout)
                            .with_connect_timeout(o.timeout.min(Duration::from_secs(5))),
                    );
                if let Some(ep) = &o.endpoint {
                    b = b
                        .with_endpoint(ep.trim_end_matches('/'))
                        .with_allow_http(ep.starts_with("http://"))
                        .with_virtual_hosted_style_request(false);
                }
                if let Some(k) = &o.access_key_id {
                    b = b.with_access_key_id(k);
                }
                if let Some(s) = &o.secret_access_key {
                    b = b.with_secret_access_key(s);
                }
                (
                    Arc::new(b.build().context("configuring the S3 client")?),
                    prefix.to_string(),
                )
            } else if let Some(dir) = url.strip_prefix("file://") {
                if dir.is_empty() || !dir.starts_with('/') {
                    bail!("replication url {url}: expected file:///ABSOLUTE/DIR");
                }
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating replica directory {dir}"))?;
                (
                    Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir)?),
                    String::new(),
                )
            } else {
                bail!("replication url {url}: expected s3://BUCKET/PREFIX or file:///DIR");
            };
        Ok(Target {
            s3_layout: url.starts_with("s3://"),
            store,
            prefix: ObjPath::from(prefix),
            url,
            cipher: o
                .encryption_key
                .map(|k| Arc::new(Aes256Gcm::new_from_slice(&k).expect("32-byte key"))),
        })
    }

    /// The directory (relative to the prefix) of LTX files of `level`.
    pub fn level_dir(&self, level: u32) -> String {
        if self.s3_layout {
            format!("{level:04x}")
        } else {
            format!("ltx/{level}")
        }
    }

    /// The level and file name of an object named by [`level_dir`](Self::level_dir).
    pub fn parse_level_path<'a>(&self, rel: &'a str) -> Option<(u32, &'a str)> {
        let parts: Vec<&str> = rel.split('/').collect();
        match (self.s3_layout, parts.as_slice()) {
            (true, [l, name]) if l.len() == 4 => Some((u32::from_str_radix(l, 16).ok()?, name)),
            (false, ["ltx", l, name]) => Some((l.parse().ok()?, name)),
            _ => None,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn encrypted(&self) -> bool {
        self.cipher.is_some()
    }

    fn path(&self, rel: &str) -> ObjPath {
        let mut p = self.prefix.clone();
        for part in rel.split('/').filter(|s| !s.is_empty()) {
            p = p.child(part);
        }
        p
    }

    fn seal(&self, data: Bytes) -> anyhow::Result<Bytes> {
        let Some(c) = &self.cipher else {
            return Ok(data);
        };
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("random nonce: {e}"))?;
        let ct = c
            .encrypt(&Nonce::from(nonce), data.as_ref())
            .map_err(|_| anyhow::anyhow!("encryption failed"))?;
        let mut out = Vec::with_capacity(16 + ct.len());
        out.extend_from_slice(ENVELOPE);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out.into())
    }

    fn open_sealed(&self, name: &str, data: Bytes) -> anyhow::Result<Bytes> {
        let Some(c) = &self.cipher else {
            if data.starts_with(ENVELOPE) {
                bail!("{name} is encrypted but no replication encryption key is configured");
            }
            return Ok(data);
        };
        if data.len() < 16 || !data.starts_with(ENVELOPE) {
            bail!(
                "{name} is not encrypted (or not by ichibase) but an encryption key is configured"
            );
        }
        let pt = c
            .decrypt(
                &Nonce::from(<[u8; 12]>::try_from(&data[4..16]).unwrap()),
                &data[16..],
            )
            .map_err(|_| {
                anyhow::anyhow!("{name}: decryption failed (wrong key or damaged object)")
            })?;
        Ok(pt.into())
    }

    /// object_store's S3 errors carry the server's XML answer once per layer of their chain;
    /// keep it once, as `Code: Message`, and say plainly when the bucket does not exist.
    fn concise(&self, e: object_store::Error) -> anyhow::Error {
        let text = e.to_string();
        let tag = |t: &str| {
            let (_, rest) = text.split_once(&format!("<{t}>"))?;
            rest.split_once(&format!("</{t}>")).map(|(v, _)| v.to_string())
        };
        match (tag("Code"), tag("Message")) {
            (Some(code), _) if code == "NoSuchBucket" => {
                let bucket = self
                    .url
                    .strip_prefix("s3://")
                    .map(|r| r.split('/').next().unwrap_or(r))
                    .unwrap_or(&self.url);
                anyhow::anyhow!(
                    "the bucket '{bucket}' does not exist: create it, or fix replicate_url ({})",
                    self.url
                )
            }
            (Some(code), message) => {
                let status = text
                    .split_once("status code: ")
                    .map(|(_, r)| format!(" (HTTP {})", r.split(':').next().unwrap_or("").trim()))
                    .unwrap_or_default();
                anyhow::anyhow!("S3 error {code}: {}{status}", message.unwrap_or_default())
            }
            _ => anyhow::Error::new(e),
        }
    }

    pub async fn put(&self, rel: &str, data: Bytes) -> anyhow::Result<()> {
        let data = self.seal(data)?;
        self.store
            .put(&self.path(rel), PutPayload::from_bytes(data))
            .await
            .map_err(|e| self.concise(e))
            .with_context(|| format!("uploading {rel} to {}", self.url))?;
        Ok(())
    }

    /// Upload a local file; large unencrypted files stream in 16 MiB parts (multipart upload)
    /// instead of being held in memory.
    pub async fn put_file(&self, rel: &str, file: &std::path::Path) -> anyhow::Result<u64> {
        use tokio::io::AsyncReadExt;
        let len = tokio::fs::metadata(file).await?.len();
        if self.cipher.is_some() || len <= STREAM_ABOVE {
            let data = tokio::fs::read(file).await?;
            self.put(rel, Bytes::from(data)).await?;
            return Ok(len);
        }
        let upload = self
            .store
            .put_multipart(&self.path(rel))
            .await
            .map_err(|e| self.concise(e))
            .with_context(|| format!("starting the upload of {rel} to {}", self.url))?;
        let mut w = object_store::WriteMultipart::new_with_chunk_size(upload, PART as usize);
        let mut f = tokio::fs::File::open(file).await?;
        let mut buf = vec![0u8; PART as usize];
        loop {
            let n = f.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            w.wait_for_capacity(4)
                .await
                .map_err(|e| self.concise(e))
            .with_context(|| format!("uploading {rel} to {}", self.url))?;
            w.write(&buf[..n]);
        }
        w.finish()
            .await
            .map_err(|e| self.concise(e))
            .with_context(|| format!("uploading {rel} to {}", self.url))?;
        Ok(len)
    }

    /// Download an object into a local file (streamed when unencrypted).
    pub async fn get_to_file(&self, rel: &str, file: &std::path::Path) -> anyhow::Result<u64> {
        use tokio::io::AsyncWriteExt;
        if self.cipher.is_some() {
            let data = self.get(rel).await?;
            tokio::fs::write(file, &data).await?;
            return Ok(data.len() as u64);
        }
        let mut s = self
            .store
            .get(&self.path(rel))
            .await
            .map_err(|e| self.concise(e))
            .with_context(|| format!("downloading {rel} from {}", self.url))?
            .into_stream();
        let mut f = tokio::io::BufWriter::new(tokio::fs::File::create(file).await?);
        let mut n = 0u64;
        while let Some(chunk) = s.next().await {
            let chunk = chunk.map_err(|e| self.concise(e))
            .with_context(|| format!("downloading {rel} from {}", self.url))?;
            if n == 0 && chunk.starts_with(ENVELOPE) {
                bail!("{rel} is encrypted but no replication encryption key is configured");
            }
            n += chunk.len() as u64;
            f.write_all(&chunk).await?;
        }
        f.flush().await?;
        Ok(n)
    }

    pub async fn get(&self, rel: &str) -> anyhow::Result<Bytes> {
        let data = self
            .store
            .get(&self.path(rel))
            .await
            .map_err(|e| self.concise(e))
            .with_context(|| format!("downloading {rel} from {}", self.url))?
            .bytes()
            .await
            .map_err(|e| self.concise(e))
            .with_context(|| format!("downloading {rel} from {}", self.url))?;
        self.open_sealed(rel, data)
    }

    /// The first `n` bytes of an object (the whole object when encrypted).
    pub async fn get_head(&self, rel: &str, n: u64) -> anyhow::Result<Bytes> {
        if self.cipher.is_some() {
            return self.get(rel).await;
        }
        self.store
            .get_range(&self.path(rel), 0..n)
            .await
            .map_err(|e| self.concise(e))
            .with_context(|| format!("reading the header of {rel} from {}", self.url))
    }

    pub async fn delete(&self, rel: &str) -> anyhow::Result<()> {
        match self.store.delete(&self.path(rel)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.concise(e)).with_context(|| format!("deleting {rel} from {}", self.url)),
        }
    }

    /// Every object under `rel_dir` (recursively), names relative to the target's prefix.
    pub async fn list(&self, rel_dir: &str) -> anyhow::Result<Vec<Listed>> {
        let base = self.path(rel_dir);
        let mut s = self.store.list(Some(&base));
        let mut out = Vec::new();
        let strip = self.prefix.as_ref().len();
        while let Some(m) = s.next().await {
            let m = m.map_err(|e| self.concise(e))
            .with_context(|| format!("listing {rel_dir} in {}", self.url))?;
            let full = m.location.as_ref();
            let rel = full[strip..].trim_start_matches('/').to_string();
            out.push(Listed {
                name: rel,
                size: m.size,
                modified_ms: m.last_modified.timestamp_millis(),
            });
        }
        Ok(out)
    }
}
