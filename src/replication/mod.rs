//! Continuous replication of the database to S3-compatible storage or a local directory, in
//! Litestream v0.5's layout so the stock `litestream restore` can read it.
//!
//! How it works:
//! - **Capture** (on the writer thread, as a write job, so no frame is appended meanwhile):
//!   read the WAL from the last captured position to the last commit frame, and write the
//!   newest version of every changed page as one level-0 LTX file (transaction id + 1) into a
//!   local spool directory (`<data_dir>/replication/spool`), fsync'd, then record the new
//!   position in `<data_dir>/replication/state.json`. Capture runs every half sync interval
//!   when the WAL changed, so a commit is captured within half an interval.
//! - **Upload** (async task): spool files go to `<prefix>/ltx/<level>/<min>-<max>.ltx` on a directory, `<prefix>/<level as %04x>/<min>-<max>.ltx`
//!   on S3 (both as Litestream 0.5.17 keys them) in
//!   order, with retries and exponential back-off; a file leaves the spool only once stored.
//!   S3 being down never blocks or loses local writes: capture continues into the spool.
//! - **Checkpoints** belong to the replicator: SQLite's automatic checkpoint is off and a
//!   PASSIVE checkpoint runs inside the same write job as a capture, so no frame is ever
//!   checkpointed (and overwritten when the WAL restarts) before it is captured.
//! - **Snapshots** (level 9, `1-<txid>`, every page of the database): at first start, every
//!   snapshot interval, and whenever the WAL is not where we left it (unclean history: a new
//!   *generation* then starts at a new transaction id). The page image comes from SQLite's
//!   backup API on a read transaction opened inside a write job, so it is exactly the state at
//!   that transaction id.
//! - **Retention** prunes snapshots older than the retention (the newest is always kept) and
//!   every change file no kept snapshot needs.
//!
//! Owns `<data_dir>/replication/` and the objects under the target prefix. It must not
//! touch the database other than through `Storage` jobs and reading the WAL file.

pub mod ltx;
pub mod offload;
pub mod restore;
pub mod target;
pub mod wal;

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use crate::config::{Config, ReplicationSettings};
use crate::core::RequestContext;
use crate::storage::{ExecControl, Storage};
pub use target::{Target, TargetOptions};

/// Level of snapshot files (as in Litestream).
pub const SNAPSHOT_LEVEL: u32 = 9;
/// Longest wait between two upload attempts while the target fails.
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// Lag samples kept for the percentiles in the status.
const LAG_SAMPLES: usize = 2000;

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Target options from the configuration.
pub fn target_options(r: &ReplicationSettings) -> TargetOptions {
    TargetOptions {
        url: r.url.clone(),
        endpoint: r.endpoint.clone(),
        region: r.region.clone(),
        access_key_id: r.access_key_id.clone(),
        secret_access_key: r.secret_access_key.clone(),
        encryption_key: r.encryption_key,
        timeout: Duration::from_secs_f64(r.timeout_secs),
    }
}

/// Upload local files under `prefix` of the replication target (e.g. archived Parquet files):
/// each file is stored as `<prefix>/<file name>`, encrypted when a key is configured.
/// Returns the object names (relative to the target).
pub async fn upload_files(
    target: &Target,
    prefix: &str,
    files: &[PathBuf],
) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for f in files {
        let name = f
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{} has no file name", f.display()))?;
        let data = tokio::fs::read(f)
            .await
            .with_context(|| format!("reading {}", f.display()))?;
        let rel = format!("{}/{name}", prefix.trim_matches('/'));
        target.put(&rel, Bytes::from(data)).await?;
        out.push(rel);
    }
    Ok(out)
}

/// Download every object under `prefix` of the target into `local_dir` (flat, by file name).
/// Returns the local paths written.
pub async fn download_prefix(
    target: &Target,
    prefix: &str,
    local_dir: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    tokio::fs::create_dir_all(local_dir).await?;
    let mut out = Vec::new();
    for obj in target.list(prefix.trim_matches('/')).await? {
        let data = target.get(&obj.name).await?;
        let name = obj.name.rsplit('/').next().unwrap_or(&obj.name);
        let path = local_dir.join(name);
        let tmp = local_dir.join(format!(".{name}.part"));
        tokio::fs::write(&tmp, &data).await?;
        tokio::fs::rename(&tmp, &path).await?;
        out.push(path);
    }
    Ok(out)
}

/// What the replicator remembers across restarts (`state.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    target: String,
    /// Last transaction id captured into the spool.
    txid: u64,
    pos: wal::WalPos,
    page_size: u32,
    /// A checkpoint we ran backfilled the WAL up to `pos`: a WAL restart is expected.
    checkpointed: bool,
    /// The writer captured the tail of the WAL just before its final checkpoint on close.
    clean_close: bool,
    /// Size and modification time of the database file after that clean close.
    closed_db: Option<(u64, i128)>,
    last_snapshot_txid: u64,
    last_snapshot_ms: i64,
    /// Transaction id of the snapshot that started the current generation.
    #[serde(default)]
    generation: u64,
}

/// Replication status, as `GET /admin/backup/status` and `ichibase backup status` show it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub target: String,
    pub encrypted: bool,
    /// Last transaction id captured locally.
    pub captured_txid: u64,
    /// Every transaction id up to this one is stored in the target.
    pub shipped_txid: u64,
    pub pending_files: u64,
    pub pending_bytes: u64,
    /// Age of the oldest captured change not yet stored in the target.
    pub lag_seconds: f64,
    /// Bytes not yet stored in the target: spool plus uncaptured WAL.
    pub lag_bytes: u64,
    /// Commit-to-stored time of recent files (upper bound: from the capture tick before).
    pub lag_ms_p50: Option<u64>,
    pub lag_ms_p99: Option<u64>,
    pub last_capture_at: Option<String>,
    pub last_shipped_at: Option<String>,
    pub last_snapshot_txid: u64,
    pub last_snapshot_at: Option<String>,
    pub generation: u64,
    /// Change files up to this transaction id are also merged into level-1 files.
    pub compacted_txid: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub errors_total: u64,
    pub consecutive_errors: u64,
    pub updated_at: String,
}

fn iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// A file waiting in the spool.
#[derive(Debug, Clone)]
struct Spooled {
    path: PathBuf,
    level: u32,
    min: u64,
    max: u64,
    size: u64,
}

fn spool_name(level: u32, min: u64, max: u64) -> String {
    format!("{max:016x}-{level}-{min:016x}.ltx")
}

fn list_spool(dir: &Path) -> anyhow::Result<Vec<Spooled>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        let Some(stem) = name.strip_suffix(".ltx") else {
            continue;
        };
        let parts: Vec<&str> = stem.split('-').collect();
        if parts.len() != 3 {
            continue;
        }
        let (Ok(max), Ok(level), Ok(min)) = (
            u64::from_str_radix(parts[0], 16),
            parts[1].parse::<u32>(),
            u64::from_str_radix(parts[2], 16),
        ) else {
            continue;
        };
        out.push(Spooled {
            path: e.path(),
            level,
            min,
            max,
            size: e.metadata()?.len(),
        });
    }
    out.sort_by_key(|s| (s.max, s.level));
    Ok(out)
}

fn fsync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Write `data` to `path` atomically (temp file, fsync, rename).
/// Where a server replicates to, recorded in `<data_dir>/replication/replica.json` at every
/// start so `ichibase restore` and `ichibase backup status` find the replica without its flags
/// repeated. Only the place: credentials and the encryption key are never written.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RecordedTarget {
    pub url: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
}

/// The replica target the server on `data_dir` last used, if it recorded one.
pub fn recorded_target(data_dir: &Path) -> Option<RecordedTarget> {
    let bytes = std::fs::read(data_dir.join("replication").join("replica.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(d) = path.parent() {
        fsync_dir(d);
    }
    Ok(())
}

fn file_stamp(p: &Path) -> Option<(u64, i128)> {
    let m = std::fs::metadata(p).ok()?;
    let t = m.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    Some((m.len(), t.as_nanos() as i128))
}

/// Outcome of one capture.
enum Captured {
    Nothing,
    File {
        txid: u64,
    },
    /// The WAL is not where we left it; only a new snapshot makes the replica whole again.
    NeedResync(String),
}

struct Shared {
    storage: Storage,
    target: Target,
    opts: ReplicationSettings,
    wal_path: PathBuf,
    db_path: PathBuf,
    dir: PathBuf,
    spool: PathBuf,
    state: Mutex<State>,
    status: Mutex<Status>,
    upload_wake: tokio::sync::Notify,
    snapshot_wake: tokio::sync::Notify,
    stopping: AtomicBool,
    capture_stop: AtomicBool,
    snapshot_running: AtomicBool,
    compaction_running: AtomicBool,
    /// After a failed snapshot, the next attempt waits until then.
    snapshot_retry_at: Mutex<Option<Instant>>,
    /// Capture tick before each captured txid (for lag samples).
    tick_before: Mutex<VecDeque<(u64, i64)>>,
    lags: Mutex<VecDeque<u64>>,
}

/// Handle to the running replicator; cheap to clone.
#[derive(Clone)]
pub struct Replicator {
    sh: Arc<Shared>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Replicator {
    /// Decide where replication resumes and start capturing and uploading in the background.
    pub async fn start(storage: Storage, config: &Config) -> anyhow::Result<Replicator> {
        let opts = config
            .replication
            .clone()
            .context("replication is not configured")?;
        let target = Target::open(&target_options(&opts))?;
        let dir = config.data_dir.join("replication");
        let spool = dir.join("spool");
        std::fs::create_dir_all(&spool)?;
        let record = RecordedTarget {
            url: opts.url.clone(),
            endpoint: opts.endpoint.clone(),
            region: opts.region.clone(),
        };
        if let Err(e) = write_atomic(
            &dir.join("replica.json"),
            &serde_json::to_vec_pretty(&record).unwrap(),
        ) {
            tracing::warn!(error = %e, "replication: recording the target for the CLI");
        }
        let db_path = storage.path().to_path_buf();
        let wal_path = PathBuf::from(format!("{}-wal", db_path.display()));
        let state: State = std::fs::read(dir.join("state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let sh = Arc::new(Shared {
            storage: storage.clone(),
            target,
            opts,
            wal_path,
            db_path,
            dir,
            spool,
            state: Mutex::new(state),
            status: Mutex::new(Status::default()),
            upload_wake: tokio::sync::Notify::new(),
            snapshot_wake: tokio::sync::Notify::new(),
            stopping: AtomicBool::new(false),
            capture_stop: AtomicBool::new(false),
            snapshot_running: AtomicBool::new(false),
            compaction_running: AtomicBool::new(false),
            snapshot_retry_at: Mutex::new(None),
            tick_before: Mutex::new(VecDeque::new()),
            lags: Mutex::new(VecDeque::new()),
        });
        {
            let mut s = sh.status.lock().unwrap();
            s.target = sh.target.url().to_string();
            s.encrypted = sh.target.encrypted();
        }
        // Capture the tail of the WAL on the writer thread right before its final checkpoint.
        let hook_sh = Arc::clone(&sh);
        storage.before_close_checkpoint(Box::new(move |_conn: &Connection| {
            let mut st = hook_sh.state.lock().unwrap();
            match hook_sh.capture_locked(&mut st) {
                Ok(Captured::NeedResync(why)) => {
                    tracing::warn!(%why, "replication: the WAL tail could not be captured on close; the next start takes a snapshot")
                }
                Err(e) => tracing::error!(error = %e, "replication: capture on close failed"),
                Ok(_) => {
                    st.clean_close = true;
                    st.pos = wal::WalPos::default();
                    st.checkpointed = false;
                    if let Err(e) = hook_sh.save_state(&st) {
                        tracing::error!(error = %e, "replication: saving state on close");
                    }
                }
            }
        }));

        let resync = sh.decide_resume().await?;
        let r = Replicator {
            sh: Arc::clone(&sh),
            tasks: Arc::default(),
        };
        let s1 = Arc::clone(&sh);
        let s2 = Arc::clone(&sh);
        let s3 = Arc::clone(&sh);
        let mut tasks = r.tasks.lock().unwrap();
        tasks.push(tokio::spawn(async move { s1.sync_loop(resync).await }));
        tasks.push(tokio::spawn(async move { s2.upload_loop(false).await }));
        tasks.push(tokio::spawn(async move { s3.upload_loop(true).await }));
        drop(tasks);
        tracing::info!(target = %sh.target.url(), "replication started");
        Ok(r)
    }

    pub fn target(&self) -> &Target {
        &self.sh.target
    }

    /// Current status (also written to `<data_dir>/replication/status.json`).
    pub fn status(&self) -> Status {
        self.sh.refresh_status();
        self.sh.status.lock().unwrap().clone()
    }

    /// Stop capturing (before storage closes; the writer's close hook captures the tail).
    pub fn stop_capturing(&self) {
        self.sh.capture_stop.store(true, Ordering::SeqCst);
    }

    /// After storage closed: upload what is left in the spool (for at most `deadline`) and stop.
    /// Whatever could not be uploaded stays in the spool for the next start.
    pub async fn finish(&self, deadline: Duration) {
        self.sh.stopping.store(true, Ordering::SeqCst);
        {
            let mut st = self.sh.state.lock().unwrap();
            if st.clean_close {
                st.closed_db = file_stamp(&self.sh.db_path);
                let _ = self.sh.save_state(&st);
            }
        }
        self.sh.upload_wake.notify_one();
        self.sh.snapshot_wake.notify_one();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap());
        let all = futures_util::future::join_all(tasks);
        if tokio::time::timeout(deadline, all).await.is_err() {
            tracing::warn!(
                "replication: spool not fully uploaded before shutdown; it is uploaded at the next start"
            );
        }
        self.sh.refresh_status();
        self.sh.write_status_file();
    }
}

impl Shared {
    fn save_state(&self, st: &State) -> std::io::Result<()> {
        write_atomic(
            &self.dir.join("state.json"),
            &serde_json::to_vec_pretty(st).unwrap(),
        )
    }

    fn error(&self, what: &str, e: &anyhow::Error) {
        let mut s = self.status.lock().unwrap();
        s.last_error = Some(format!("{what}: {e:#}"));
        s.last_error_at = Some(iso(now_ms()));
        s.errors_total += 1;
        s.consecutive_errors += 1;
        tracing::warn!(error = %format!("{e:#}"), "replication: {what}");
    }

    /// Resume from the saved state if it matches the target and the WAL; else ask for a
    /// snapshot (returns true).
    async fn decide_resume(&self) -> anyhow::Result<bool> {
        // S3 being unreachable must not keep the server from starting: then trust the local
        // state about what the replica holds (the spool keeps everything not yet uploaded).
        let limit = Duration::from_secs_f64(self.opts.timeout_secs.min(5.0));
        let listed = tokio::time::timeout(limit, self.remote_max_txid())
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {limit:?}")));
        let remote_max = match listed {
            Ok(m) => Some(m),
            Err(e) => {
                self.error(
                    "listing the replica at start (continuing from local state)",
                    &e,
                );
                None
            }
        };
        let spool_max = list_spool(&self.spool)?
            .iter()
            .map(|s| s.max)
            .max()
            .unwrap_or(0);
        let mut st = self.state.lock().unwrap();
        let remote_max = remote_max.unwrap_or(st.txid);
        let known = remote_max.max(spool_max);
        let trusted = st.target == self.target.url() && st.txid > 0 && st.txid == known;
        let mut resync = !trusted;
        if trusted && st.clean_close {
            let wal_empty = wal::read_header(&self.wal_path)?.is_none();
            let same_db = st
                .closed_db
                .is_none_or(|stamp| file_stamp(&self.db_path) == Some(stamp));
            if !same_db || !wal_empty && st.closed_db.is_none() {
                resync = true;
            }
        }
        if resync {
            tracing::info!(
                remote_txid = remote_max,
                local_txid = st.txid,
                "replication: starting a new generation with a snapshot"
            );
            st.target = self.target.url().to_string();
            st.txid = known;
            st.clean_close = false;
            st.closed_db = None;
        } else {
            st.clean_close = false;
            st.closed_db = None;
            tracing::info!(txid = st.txid, "replication: resuming");
        }
        self.save_state(&st)?;
        let mut s = self.status.lock().unwrap();
        s.captured_txid = st.txid;
        s.last_snapshot_txid = st.last_snapshot_txid;
        s.last_snapshot_at = (st.last_snapshot_ms > 0).then(|| iso(st.last_snapshot_ms));
        Ok(resync)
    }

    async fn remote_max_txid(&self) -> anyhow::Result<u64> {
        let mut m = 0;
        for level in [0, 1, SNAPSHOT_LEVEL] {
            for f in self.target.list(&self.target.level_dir(level)).await? {
                if let Some((_, max)) = f.name.rsplit('/').next().and_then(ltx::parse_file_name) {
                    m = m.max(max);
                }
            }
        }
        Ok(m)
    }

    /// Capture committed WAL frames into a spool file. Must run on the writer thread.
    fn capture_locked(&self, st: &mut State) -> anyhow::Result<Captured> {
        let Some(hdr) = wal::read_header(&self.wal_path)? else {
            return Ok(if st.pos.offset == 0 {
                Captured::Nothing
            } else {
                Captured::NeedResync("the WAL was truncated outside the replicator".into())
            });
        };
        let from = if st.pos.offset == 0 {
            hdr.start()
        } else if (hdr.salt1, hdr.salt2) == (st.pos.salt1, st.pos.salt2) {
            st.pos
        } else if st.checkpointed && hdr.salt1 == st.pos.salt1.wrapping_add(1) {
            hdr.start()
        } else {
            return Ok(Captured::NeedResync(
                "the WAL was restarted by a checkpoint the replicator did not run".into(),
            ));
        };
        if st.page_size != 0 && st.page_size != hdr.page_size {
            return Ok(Captured::NeedResync("the page size changed".into()));
        }
        let scan = wal::scan(&self.wal_path, &hdr, from)?;
        if scan.commit == 0 {
            if from != st.pos {
                st.pos = from;
                st.checkpointed = false;
                self.save_state(st)?;
            }
            return Ok(Captured::Nothing);
        }
        let txid = st.txid + 1;
        let header = ltx::Header {
            flags: ltx::FLAG_NO_CHECKSUM,
            page_size: hdr.page_size,
            commit: scan.commit,
            min_txid: txid,
            max_txid: txid,
            timestamp_ms: now_ms(),
            wal_offset: from.offset as i64,
            wal_size: (scan.end.offset - from.offset) as i64,
            wal_salt1: hdr.salt1,
            wal_salt2: hdr.salt2,
        };
        let mut wal_file = File::open(&self.wal_path)?;
        let mut buf = vec![0u8; hdr.page_size as usize];
        let lock = ltx::lock_pgno(hdr.page_size);
        self.write_spool(0, txid, txid, &header, |enc| {
            for (&pgno, &off) in scan.pages.range(..=scan.commit) {
                if pgno == lock {
                    continue;
                }
                wal::read_page(&mut wal_file, off, &mut buf)?;
                enc.page(pgno, &buf)?;
            }
            Ok(())
        })?;
        st.txid = txid;
        st.pos = scan.end;
        st.page_size = hdr.page_size;
        st.checkpointed = false;
        st.clean_close = false;
        self.save_state(st)?;
        Ok(Captured::File { txid })
    }

    /// Encode an LTX file into the spool (fsync'd, atomically named).
    fn write_spool(
        &self,
        level: u32,
        min: u64,
        max: u64,
        header: &ltx::Header,
        pages: impl FnOnce(&mut ltx::Encoder<BufWriter<File>>) -> anyhow::Result<()>,
    ) -> anyhow::Result<PathBuf> {
        let name = spool_name(level, min, max);
        let tmp = self.spool.join(format!(".{name}.tmp"));
        let f = File::create(&tmp)?;
        let mut enc = ltx::Encoder::new(BufWriter::with_capacity(1 << 20, f), header)?;
        pages(&mut enc)?;
        let f = enc
            .finish()?
            .into_inner()
            .map_err(|e| anyhow::anyhow!("flushing spool file: {e}"))?;
        f.sync_all()?;
        let path = self.spool.join(&name);
        std::fs::rename(&tmp, &path)?;
        fsync_dir(&self.spool);
        Ok(path)
    }

    /// One capture (and a checkpoint when the WAL grew past the threshold) on the writer.
    async fn capture(self: &Arc<Self>, tick_ms: i64) -> anyhow::Result<Captured> {
        let sh = Arc::clone(self);
        let ctl = ExecControl::new(Instant::now(), 0.0);
        let out = self
            .storage
            .write(&RequestContext::system(), ctl, move |conn| {
                let mut st = sh.state.lock().unwrap();
                let r = sh.capture_locked(&mut st);
                if let Ok(Captured::File { .. }) | Ok(Captured::Nothing) = &r {
                    let frames = st.pos.offset.saturating_sub(wal::WAL_HEADER)
                        / (24 + st.page_size.max(512) as u64);
                    if st.pos.offset > 0 && frames >= sh.opts.checkpoint_pages && !st.checkpointed {
                        st.checkpointed = true;
                        if let Err(e) = sh.save_state(&st) {
                            return Ok(Err(anyhow::Error::from(e)));
                        }
                        let r: rusqlite::Result<(i64, i64, i64)> =
                            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                            });
                        match r {
                            Ok((busy, log, done)) => {
                                tracing::debug!(busy, log, done, "replication checkpoint")
                            }
                            Err(e) => tracing::warn!(error = %e, "replication checkpoint failed"),
                        }
                    }
                }
                Ok(r)
            })
            .await
            .map_err(|e| anyhow::anyhow!("capture job: {e}"))??;
        if let Captured::File { txid } = &out {
            let mut t = self.tick_before.lock().unwrap();
            t.push_back((*txid, tick_ms));
            if t.len() > 10_000 {
                t.pop_front();
            }
            let mut s = self.status.lock().unwrap();
            s.captured_txid = *txid;
            s.last_capture_at = Some(iso(now_ms()));
            drop(s);
            self.upload_wake.notify_one();
        }
        Ok(out)
    }

    /// Take a full snapshot. With `resync`, the snapshot starts a new generation at a fresh
    /// transaction id from wherever the WAL is now; otherwise it captures first and snapshots
    /// the captured transaction id.
    async fn snapshot(self: &Arc<Self>, resync: bool) -> anyhow::Result<u64> {
        let sh = Arc::clone(self);
        let ctl = ExecControl::new(Instant::now(), 0.0);
        let db_path = self.db_path.clone();
        let pinned = self
            .storage
            .write(&RequestContext::system(), ctl, move |_conn| {
                let go = || -> anyhow::Result<(Connection, u64)> {
                    let mut st = sh.state.lock().unwrap();
                    let mut resync = resync;
                    if !resync && let Captured::NeedResync(why) = sh.capture_locked(&mut st)? {
                        tracing::warn!(%why, "replication: starting a new generation");
                        resync = true;
                    }
                    if resync {
                        // Skip to the end of what is committed in the WAL now.
                        st.pos = match wal::read_header(&sh.wal_path)? {
                            None => wal::WalPos::default(),
                            Some(h) => wal::scan(&sh.wal_path, &h, h.start())?.end,
                        };
                        st.txid += 1;
                        st.generation = st.txid;
                        st.checkpointed = false;
                        st.clean_close = false;
                        sh.save_state(&st)?;
                    }
                    let conn = Connection::open_with_flags(
                        &db_path,
                        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                            | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    )?;
                    conn.execute_batch("BEGIN")?;
                    conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))?;
                    Ok((conn, st.txid))
                };
                Ok(go())
            })
            .await
            .map_err(|e| anyhow::anyhow!("snapshot job: {e}"))??;
        // The page image is copied and encoded in the background: captures go on meanwhile
        // (the pinned read transaction only holds checkpoints back).
        let sh = Arc::clone(self);
        let txid = pinned.1;
        self.snapshot_running.store(true, Ordering::SeqCst);
        let work = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
            let (src, txid) = pinned;
            let tmp = sh.dir.join(format!("snapshot-{txid:016x}.tmp.db"));
            let _ = std::fs::remove_file(&tmp);
            {
                let mut dst = Connection::open(&tmp)?;
                let b = rusqlite::backup::Backup::new(&src, &mut dst)?;
                b.step(-1)?;
            }
            drop(src);
            let page_size = {
                let c = Connection::open(&tmp)?;
                let ps: u32 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
                ps
            };
            let mut f = File::open(&tmp)?;
            let len = f.metadata()?.len();
            let commit = (len / page_size as u64) as u32;
            let header = ltx::Header {
                flags: ltx::FLAG_NO_CHECKSUM,
                page_size,
                commit,
                min_txid: 1,
                max_txid: txid,
                timestamp_ms: now_ms(),
                ..Default::default()
            };
            let lock = ltx::lock_pgno(page_size);
            let mut buf = vec![0u8; page_size as usize];
            sh.write_spool(SNAPSHOT_LEVEL, 1, txid, &header, |enc| {
                let mut r = std::io::BufReader::with_capacity(1 << 20, &mut f);
                for pgno in 1..=commit {
                    r.read_exact(&mut buf)?;
                    if pgno != lock {
                        enc.page(pgno, &buf)?;
                    }
                }
                Ok(())
            })?;
            let _ = std::fs::remove_file(&tmp);
            let mut st = sh.state.lock().unwrap();
            st.last_snapshot_txid = txid;
            st.last_snapshot_ms = now_ms();
            if st.page_size == 0 {
                st.page_size = page_size;
            }
            sh.save_state(&st)?;
            let mut s = sh.status.lock().unwrap();
            s.last_snapshot_txid = txid;
            s.last_snapshot_at = Some(iso(st.last_snapshot_ms));
            s.captured_txid = st.txid;
            Ok(txid)
        });
        let sh = Arc::clone(self);
        tokio::spawn(async move {
            match work.await.map_err(anyhow::Error::from).and_then(|r| r) {
                Ok(txid) => {
                    sh.snapshot_wake.notify_one();
                    tracing::info!(txid, "replication: snapshot taken");
                }
                Err(e) => {
                    *sh.snapshot_retry_at.lock().unwrap() =
                        Some(Instant::now() + Duration::from_secs(5));
                    sh.error("snapshot", &e);
                }
            }
            sh.snapshot_running.store(false, Ordering::SeqCst);
        });
        Ok(txid)
    }

    fn wal_changed(&self, last: &mut Option<(u64, SystemTime)>) -> bool {
        let now = std::fs::metadata(&self.wal_path)
            .ok()
            .map(|m| (m.len(), m.modified().unwrap_or(UNIX_EPOCH)));
        let changed = now != *last;
        *last = now;
        changed
    }

    async fn sync_loop(self: Arc<Self>, mut resync: bool) {
        let tick = Duration::from_secs_f64(self.opts.sync_interval_secs / 2.0);
        let snapshot_every = (self.opts.snapshot_interval_secs * 1000.0) as i64;
        let mut last_wal = None;
        let mut idle_ticks = 0u32;
        let mut last_tick_ms = now_ms();
        let mut last_retention = Instant::now();
        let mut failures = 0u32;
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let compaction_every = Duration::from_secs_f64(self.opts.compaction_interval_secs);
        let mut last_compaction = Instant::now();
        let retention_every =
            Duration::from_secs_f64((self.opts.snapshot_interval_secs / 2.0).clamp(1.0, 600.0));
        while !self.stopping.load(Ordering::SeqCst) && !self.capture_stop.load(Ordering::SeqCst) {
            let due_snapshot = !self.snapshot_running.load(Ordering::SeqCst)
                && self
                    .snapshot_retry_at
                    .lock()
                    .unwrap()
                    .is_none_or(|t| Instant::now() >= t)
                && {
                    let st = self.state.lock().unwrap();
                    st.last_snapshot_ms == 0 || now_ms() - st.last_snapshot_ms >= snapshot_every
                };
            if resync || due_snapshot {
                match self.snapshot(resync).await {
                    Ok(_) => {
                        resync = false;
                        failures = 0;
                    }
                    Err(e) => {
                        if self.stopping.load(Ordering::SeqCst) {
                            break;
                        }
                        self.error("snapshot", &e);
                        failures += 1;
                        tokio::time::sleep(
                            (Duration::from_millis(500) * 2u32.pow(failures.min(4)))
                                .min(MAX_BACKOFF),
                        )
                        .await;
                        continue;
                    }
                }
            } else if self.wal_changed(&mut last_wal) || idle_ticks >= 2 {
                // (A capture at least once per sync interval even when size and mtime look
                // unchanged: file times are coarse and a restarted WAL keeps its size.)
                idle_ticks = 0;
                match self.capture(last_tick_ms).await {
                    Ok(Captured::NeedResync(why)) => {
                        tracing::warn!(%why, "replication: starting a new generation");
                        resync = true;
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if self.stopping.load(Ordering::SeqCst) {
                            break;
                        }
                        self.error("capture", &e);
                    }
                }
            }
            if last_retention.elapsed() >= retention_every
                && list_spool(&self.spool)
                    .map(|s| s.is_empty())
                    .unwrap_or(false)
            {
                last_retention = Instant::now();
                if let Err(e) = self.retention().await {
                    self.error("retention", &e);
                }
            }
            if last_compaction.elapsed() >= compaction_every
                && !self.compaction_running.swap(true, Ordering::SeqCst)
            {
                last_compaction = Instant::now();
                let sh = Arc::clone(&self);
                tokio::spawn(async move {
                    if let Err(e) = sh.compact().await {
                        sh.error("compaction", &e);
                    }
                    sh.compaction_running.store(false, Ordering::SeqCst);
                });
            }
            self.refresh_status();
            self.write_status_file();
            last_tick_ms = now_ms();
            idle_ticks += 1;
            ticker.tick().await;
        }
    }

    /// Uploads spool files in order: one task for change files, one for snapshots, so a
    /// large snapshot never delays the changes behind it.
    async fn upload_loop(self: Arc<Self>, snapshots: bool) {
        let mut backoff = Duration::from_millis(250);
        let wake = if snapshots {
            &self.snapshot_wake
        } else {
            &self.upload_wake
        };
        loop {
            let files = match list_spool(&self.spool) {
                Ok(f) => f
                    .into_iter()
                    .filter(|f| (f.level == SNAPSHOT_LEVEL) == snapshots)
                    .collect::<Vec<_>>(),
                Err(e) => {
                    self.error("listing the spool", &e);
                    Vec::new()
                }
            };
            if files.is_empty() {
                if self.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let _ = tokio::time::timeout(Duration::from_millis(500), wake.notified()).await;
                continue;
            }
            let mut failed = false;
            for f in files {
                match self.upload_one(&f).await {
                    Ok(()) => {
                        backoff = Duration::from_millis(250);
                        let mut s = self.status.lock().unwrap();
                        s.consecutive_errors = 0;
                        s.last_shipped_at = Some(iso(now_ms()));
                    }
                    Err(e) => {
                        self.error("upload", &e);
                        failed = true;
                        break;
                    }
                }
            }
            if failed {
                // (finish() bounds how long we keep trying at shutdown.)
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    async fn upload_one(&self, f: &Spooled) -> anyhow::Result<()> {
        let started = Instant::now();
        let rel = format!(
            "{}/{}",
            self.target.level_dir(f.level),
            ltx::file_name(f.min, f.max)
        );
        let data_len = self.target.put_file(&rel, &f.path).await?;
        tokio::fs::remove_file(&f.path).await?;
        if started.elapsed().as_secs_f64() > self.opts.sync_interval_secs {
            tracing::warn!(
                file = %rel,
                bytes = data_len,
                secs = started.elapsed().as_secs_f64(),
                "replication: slow upload (longer than the sync interval)"
            );
        }
        if f.level == 0 {
            let tick = {
                let mut t = self.tick_before.lock().unwrap();
                let mut found = None;
                while let Some(&(txid, ms)) = t.front() {
                    if txid > f.max {
                        break;
                    }
                    t.pop_front();
                    if txid == f.max {
                        found = Some(ms);
                    }
                }
                found
            };
            if let Some(ms) = tick {
                let mut l = self.lags.lock().unwrap();
                l.push_back((now_ms() - ms).max(0) as u64);
                if l.len() > LAG_SAMPLES {
                    l.pop_front();
                }
            }
        }
        Ok(())
    }

    /// Merge the level-0 files stored after the last level-1 file into one level-1 file (the
    /// newest version of each page), so a restore downloads a few files instead of one per
    /// capture. Level-0 files stay until retention prunes them: they keep point-in-time
    /// resolution.
    async fn compact(&self) -> anyhow::Result<()> {
        let mut l1_max = 0;
        for f in self.target.list(&self.target.level_dir(1)).await? {
            if let Some((_, max)) = f.name.rsplit('/').next().and_then(ltx::parse_file_name) {
                l1_max = l1_max.max(max);
            }
        }
        let mut l0: Vec<(u64, u64, String)> = Vec::new();
        for f in self.target.list(&self.target.level_dir(0)).await? {
            if let Some((min, max)) = f.name.rsplit('/').next().and_then(ltx::parse_file_name)
                && min > l1_max
            {
                l0.push((min, max, f.name));
            }
        }
        l0.sort();
        // The contiguous run from the first candidate (a new generation breaks the run).
        let mut run = Vec::new();
        for f in l0 {
            if run
                .last()
                .is_none_or(|p: &(u64, u64, String)| f.0 == p.1 + 1)
            {
                run.push(f);
            } else {
                break;
            }
        }
        if run.len() < 2 {
            return Ok(());
        }
        let (min, max) = (run[0].0, run.last().unwrap().1);
        let scratch = self.dir.join(format!("compact-{max:016x}.tmp"));
        let part = self.dir.join(format!("compact-{max:016x}.part"));
        let out = self.dir.join(format!("compact-{max:016x}.ltx"));
        let mut pages = std::collections::BTreeSet::new();
        let mut last: Option<ltx::Header> = None;
        {
            let mut sf = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(&scratch)?;
            for (_, _, name) in &run {
                self.target.get_to_file(name, &part).await?;
                let input = std::io::BufReader::new(File::open(&part)?);
                let d = ltx::decode(input, |pgno, data| {
                    use std::io::{Seek, SeekFrom};
                    sf.seek(SeekFrom::Start((pgno as u64 - 1) * data.len() as u64))?;
                    sf.write_all(data)?;
                    pages.insert(pgno);
                    Ok(())
                })
                .with_context(|| format!("compacting {name}"))?;
                if last
                    .as_ref()
                    .is_some_and(|h| h.page_size != d.header.page_size)
                {
                    anyhow::bail!("page size changed within {name}");
                }
                last = Some(d.header);
            }
            let last = last.context("nothing to compact")?;
            let header = ltx::Header {
                flags: ltx::FLAG_NO_CHECKSUM,
                page_size: last.page_size,
                commit: last.commit,
                min_txid: min,
                max_txid: max,
                timestamp_ms: last.timestamp_ms,
                ..Default::default()
            };
            let mut enc = ltx::Encoder::new(BufWriter::new(File::create(&out)?), &header)?;
            let mut buf = vec![0u8; last.page_size as usize];
            for &pgno in pages.range(..=last.commit) {
                use std::io::{Seek, SeekFrom};
                sf.seek(SeekFrom::Start((pgno as u64 - 1) * buf.len() as u64))?;
                sf.read_exact(&mut buf)?;
                enc.page(pgno, &buf)?;
            }
            enc.finish()?.flush()?;
        }
        let rel = format!("{}/{}", self.target.level_dir(1), ltx::file_name(min, max));
        let r = self.target.put_file(&rel, &out).await;
        for p in [&scratch, &part, &out] {
            let _ = std::fs::remove_file(p);
        }
        r?;
        self.status.lock().unwrap().compacted_txid = max;
        tracing::debug!(
            min,
            max,
            files = run.len(),
            "replication: compacted into level 1"
        );
        Ok(())
    }

    /// Delete snapshots older than the retention (keeping the newest) and the change files no
    /// kept snapshot needs.
    async fn retention(&self) -> anyhow::Result<()> {
        let keep_ms = (self.opts.retention_secs * 1000.0) as i64;
        let mut snaps = Vec::new();
        for f in self
            .target
            .list(&self.target.level_dir(SNAPSHOT_LEVEL))
            .await?
        {
            let Some((_, max)) = f.name.rsplit('/').next().and_then(ltx::parse_file_name) else {
                continue;
            };
            let head = self
                .target
                .get_head(&f.name, ltx::HEADER_SIZE as u64)
                .await?;
            let h = ltx::Header::decode(&head)?;
            snaps.push((max, h.timestamp_ms, f.name));
        }
        snaps.sort();
        if snaps.is_empty() {
            return Ok(());
        }
        let cutoff = now_ms() - keep_ms;
        let newest = snaps.last().unwrap().0;
        let mut oldest_kept = newest;
        for (max, ts, name) in &snaps {
            if *max != newest && *ts < cutoff {
                self.target.delete(name).await?;
                tracing::info!(snapshot = %name, "replication: pruned snapshot");
            } else {
                oldest_kept = oldest_kept.min(*max);
            }
        }
        let mut l1_max = 0;
        for level in (0..SNAPSHOT_LEVEL).rev() {
            for f in self.target.list(&self.target.level_dir(level)).await? {
                let Some((_, max)) = f.name.rsplit('/').next().and_then(ltx::parse_file_name)
                else {
                    continue;
                };
                if level == 1 {
                    l1_max = l1_max.max(max);
                }
                // Level-0 files merged into level 1 are kept for an hour (twelve compaction
                // intervals) of capture-tick resolution, then level 1 takes over.
                let merged_and_old = level == 0
                    && max <= l1_max
                    && f.modified_ms
                        < now_ms() - (self.opts.compaction_interval_secs * 12_000.0) as i64;
                if max <= oldest_kept || merged_and_old {
                    self.target.delete(&f.name).await?;
                }
            }
        }
        Ok(())
    }

    fn refresh_status(&self) {
        let spool = list_spool(&self.spool).unwrap_or_default();
        let st = self.state.lock().unwrap().clone();
        let wal_len = std::fs::metadata(&self.wal_path)
            .map(|m| m.len())
            .unwrap_or(0);
        let uncaptured = match wal::read_header(&self.wal_path).ok().flatten() {
            Some(h) if (h.salt1, h.salt2) == (st.pos.salt1, st.pos.salt2) => {
                wal_len.saturating_sub(st.pos.offset)
            }
            Some(_) => wal_len.saturating_sub(wal::WAL_HEADER),
            None => 0,
        };
        let oldest = spool
            .iter()
            .filter_map(|f| std::fs::metadata(&f.path).ok()?.modified().ok())
            .min();
        let mut lags: Vec<u64> = self.lags.lock().unwrap().iter().copied().collect();
        lags.sort_unstable();
        let pct = |p: f64| -> Option<u64> {
            (!lags.is_empty()).then(|| lags[((lags.len() - 1) as f64 * p).round() as usize])
        };
        let mut s = self.status.lock().unwrap();
        s.captured_txid = st.txid;
        s.shipped_txid = spool
            .iter()
            .filter(|f| f.level != SNAPSHOT_LEVEL)
            .map(|f| f.min.saturating_sub(1))
            .min()
            .unwrap_or(st.txid);
        s.pending_files = spool.len() as u64;
        s.pending_bytes = spool.iter().map(|f| f.size).sum();
        s.lag_bytes = s.pending_bytes + uncaptured;
        s.lag_seconds = oldest
            .and_then(|t| t.elapsed().ok())
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        s.lag_ms_p50 = pct(0.5);
        s.lag_ms_p99 = pct(0.99);
        s.generation = st.generation;
        s.updated_at = iso(now_ms());
    }

    /// Informational, rewritten every tick: renamed into place but not fsync'd.
    fn write_status_file(&self) {
        let s = self.status.lock().unwrap().clone();
        let path = self.dir.join("status.json");
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, serde_json::to_vec_pretty(&s).unwrap()).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
}
