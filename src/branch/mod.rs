//! SQLite branches: named copies of the live database to try changes in isolation.
//!
//! Owns `<data_dir>/branches/<name>.db`: creating a branch (`VACUUM INTO` from a read
//! transaction on the live file, so writers are never blocked: the copy is the snapshot the read
//! transaction saw), opening it as its own [`Storage`] (own writer, readers and authorization
//! snapshot), listing and deleting branches. A branch remembers, in its own `_ichibase_meta`,
//! when it was taken and which applied bundles it already had, so a merge knows what to replay.
//!
//! The copy runs on a thread of its own at a low CPU priority (`[branches] copy_nice`, default
//! 19): on a small machine it would otherwise take a core from request threads, and their
//! wake-ups would wait behind it (single-row INSERT p99 12x its value alone before this).
//!
//! Must not touch the live database beyond reading it: merging is `bundle::merge`, which replays
//! a branch's bundles on the live storage in one transaction.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde::Serialize;
use tokio::sync::Mutex;

use crate::core::background::run_niced;
use crate::core::{Error, ErrorCode, Result};
use crate::storage::{Storage, StorageOptions};

/// `[branches]` settings.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BranchSettings {
    /// Nice value (0-19) of the thread that copies a database for a branch or a check run:
    /// 19 lets request threads go first under CPU contention (a copy takes longer on a busy
    /// machine); 0 runs it at the server's priority.
    pub copy_nice: i32,
}

impl Default for BranchSettings {
    fn default() -> Self {
        BranchSettings { copy_nice: 19 }
    }
}

impl BranchSettings {
    /// Refuse values outside 0-19 (naming the setting).
    pub fn validate(&self) -> Result<()> {
        if !(0..=19).contains(&self.copy_nice) {
            return Err(Error::new(
                ErrorCode::BadArguments,
                format!(
                    "[branches] copy_nice must be 0-19 (a Linux nice value), not {}",
                    self.copy_nice
                ),
            ));
        }
        Ok(())
    }
}

/// What `GET /branches` shows of one branch.
#[derive(Debug, Clone, Serialize)]
pub struct BranchInfo {
    pub name: String,
    pub created_at: Option<String>,
    pub bytes: u64,
    /// Bundles applied to the branch since it was taken (what a merge would replay), each with
    /// the outcome of its checks when it was applied (a merge runs them again).
    pub pending_bundles: Vec<PendingBundle>,
    pub open: bool,
}

/// A bundle waiting in a branch.
#[derive(Debug, Clone, Serialize)]
pub struct PendingBundle {
    pub id: i64,
    pub name: String,
    /// `true`/`false` once its checks ran on the branch (at apply); `null` if they never did.
    pub checks_ok: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failures: Option<String>,
}

/// Record the outcome of a bundle's checks in the branch (shown by `pending_bundles`).
pub fn record_checks(c: &Connection, bundle_id: i64, ok: bool, failures: Option<&str>) -> Result<()> {
    let v = serde_json::json!({"ok": ok, "failures": failures}).to_string();
    c.execute(
        "INSERT INTO _ichibase_meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        rusqlite::params![format!("checks:{bundle_id}"), v],
    )
    .map_err(|e| storage_err("recording the checks", e))?;
    Ok(())
}

/// A throw-away copy of a branch (see [`Branches::scratch`]).
pub struct Scratch {
    pub storage: Storage,
    path: PathBuf,
}

impl Scratch {
    /// Close the copy and delete its files.
    pub async fn discard(self) {
        let _ = self.storage.close().await;
        remove_db_files(&self.path);
    }
}

fn remove_db_files(path: &Path) {
    for ext in ["db", "db-wal", "db-shm"] {
        let _ = std::fs::remove_file(path.with_extension(ext));
    }
}

/// Every branch of one live database.
pub struct Branches {
    dir: PathBuf,
    live_path: PathBuf,
    template: StorageOptions,
    copy_nice: i32,
    open: Mutex<HashMap<String, Storage>>,
}

pub fn check_name(name: &str) -> Result<()> {
    crate::core::check_name("branch name", name)
}

fn not_found(name: &str) -> Error {
    Error::new(ErrorCode::NotFound, format!("No branch '{name}'"))
}

fn storage_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorCode::StorageError, format!("{what}: {e}"))
}

impl Branches {
    /// Branches of the database opened with `live` options, kept under `data_dir/branches`.
    pub fn new(data_dir: &Path, live: &StorageOptions, settings: &BranchSettings) -> Branches {
        // Copies a crash interrupted are never complete branches.
        if let Ok(rd) = std::fs::read_dir(data_dir.join("branches")) {
            for e in rd.flatten() {
                let f = e.file_name().to_string_lossy().to_string();
                if f.starts_with(".scratch-") {
                    let _ = std::fs::remove_file(e.path());
                    continue;
                }
                if f.ends_with(".db.partial") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let mut template = live.clone();
        template.readers = template.readers.clamp(1, 2);
        // Branches are scratch copies: never replicated, SQLite checkpoints them itself.
        template.replicated = false;
        Branches {
            dir: data_dir.join("branches"),
            live_path: live.path.clone(),
            template,
            copy_nice: settings.copy_nice.clamp(0, 19),
            open: Mutex::new(HashMap::new()),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.db"))
    }

    /// Take a branch of the live database as it is now (one consistent snapshot).
    pub async fn create(&self, name: &str) -> Result<BranchInfo> {
        check_name(name)?;
        let open = self.open.lock().await;
        let path = self.path(name);
        if open.contains_key(name) || path.exists() {
            return Err(Error::new(
                ErrorCode::Conflict,
                format!("Branch '{name}' exists; delete it first or pick another name"),
            ));
        }
        crate::storage::private_dir(&self.dir)
            .map_err(|e| storage_err("creating the branch dir", e))?;
        let live = self.live_path.clone();
        let (name_s, dest) = (name.to_string(), path.clone());
        let timeout = self.template.busy_timeout;
        let made = run_niced("branch-copy", self.copy_nice, move || -> Result<()> {
            let tmp = dest.with_extension("db.partial");
            let _ = std::fs::remove_file(&tmp);
            let src = Connection::open_with_flags(
                &live,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(|e| storage_err("opening the live database", e))?;
            src.busy_timeout(timeout)
                .map_err(|e| storage_err("busy timeout", e))?;
            // The bundles the live database already has: a merge replays only later ones.
            let base: i64 = src
                .query_row(
                    "SELECT coalesce(max(id), 0) FROM _ichibase_bundles",
                    [],
                    |r| r.get(0),
                )
                .map_err(|e| storage_err("reading applied bundles", e))?;
            src.execute("VACUUM INTO ?1", [tmp.to_string_lossy().as_ref()])
                .map_err(|e| storage_err("copying the live database", e))?;
            drop(src);
            // The copy is in rollback-journal mode until the branch's storage opens it.
            let c = Connection::open(&tmp).map_err(|e| storage_err("opening the copy", e))?;
            c.execute(
                "INSERT OR REPLACE INTO _ichibase_meta (key, value) VALUES
                     ('branch_name', ?1),
                     ('branched_at', strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
                     ('branch_base_bundle', ?2)",
                rusqlite::params![name_s, base.to_string()],
            )
            .map_err(|e| storage_err("marking the branch", e))?;
            drop(c);
            crate::storage::private_file(&tmp).map_err(|e| storage_err("making the copy private", e))?;
            // Rename only a complete copy into place (a crash leaves a `.partial` behind).
            std::fs::rename(&tmp, &dest).map_err(|e| storage_err("placing the branch", e))?;
            Ok(())
        })
        .await?;
        made?;
        drop(open);
        self.info(name).await
    }

    /// A throw-away copy of branch `name` as it is now, for checks: they may write whatever
    /// they like without changing the branch, so running them again (at merge) sees the same
    /// state. Discard it with [`Scratch::discard`].
    pub async fn scratch(&self, name: &str) -> Result<Scratch> {
        self.get(name).await?; // exists, and its WAL is in a consistent state
        let src = self.path(name);
        let dest = self
            .dir
            .join(format!(".scratch-{}.db", uuid::Uuid::new_v4().simple()));
        let timeout = self.template.busy_timeout;
        let d2 = dest.clone();
        run_niced("branch-copy", self.copy_nice, move || -> Result<()> {
            let c = Connection::open_with_flags(
                &src,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(|e| storage_err("opening the branch", e))?;
            c.busy_timeout(timeout)
                .map_err(|e| storage_err("busy timeout", e))?;
            c.execute("VACUUM INTO ?1", [d2.to_string_lossy().as_ref()])
                .map_err(|e| storage_err("copying the branch for its checks", e))?;
            Ok(())
        })
        .await??;
        let mut opts = self.template.clone();
        opts.path = dest.clone();
        let storage = match tokio::task::spawn_blocking(move || Storage::open(&opts)).await {
            Ok(Ok(s)) => s,
            other => {
                remove_db_files(&dest);
                return Err(match other {
                    Ok(Err(e)) => storage_err("opening the check copy", e),
                    Err(e) => Error::internal(format!("branch task failed: {e}")),
                    Ok(Ok(_)) => unreachable!(),
                });
            }
        };
        Ok(Scratch { storage, path: dest })
    }

    /// The branch's storage, opened on first use.
    pub async fn get(&self, name: &str) -> Result<Storage> {
        check_name(name)?;
        let mut open = self.open.lock().await;
        if let Some(s) = open.get(name) {
            return Ok(s.clone());
        }
        let path = self.path(name);
        if !path.exists() {
            return Err(not_found(name));
        }
        let mut opts = self.template.clone();
        opts.path = path;
        let s = tokio::task::spawn_blocking(move || Storage::open(&opts))
            .await
            .map_err(|e| Error::internal(format!("branch task failed: {e}")))?
            .map_err(|e| storage_err("opening the branch", e))?;
        open.insert(name.to_string(), s.clone());
        Ok(s)
    }

    pub async fn info(&self, name: &str) -> Result<BranchInfo> {
        check_name(name)?;
        let path = self.path(name);
        if !path.exists() {
            return Err(not_found(name));
        }
        let is_open = self.open.lock().await.contains_key(name);
        let n = name.to_string();
        tokio::task::spawn_blocking(move || read_info(&path, &n, is_open))
            .await
            .map_err(|e| Error::internal(format!("branch task failed: {e}")))?
    }

    pub async fn list(&self) -> Result<Vec<BranchInfo>> {
        let mut names = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let f = e.file_name().to_string_lossy().to_string();
                if let Some(n) = f.strip_suffix(".db")
                    && check_name(n).is_ok()
                {
                    names.push(n.to_string());
                }
            }
        }
        names.sort();
        let mut out = Vec::new();
        for n in names {
            if let Ok(i) = self.info(&n).await {
                out.push(i);
            }
        }
        Ok(out)
    }

    /// Close and remove a branch.
    pub async fn delete(&self, name: &str) -> Result<()> {
        check_name(name)?;
        let mut open = self.open.lock().await;
        let path = self.path(name);
        if let Some(s) = open.remove(name) {
            s.close().await?;
        }
        if !path.exists() {
            return Err(not_found(name));
        }
        for p in [
            path.clone(),
            path.with_extension("db-wal"),
            path.with_extension("db-shm"),
        ] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(storage_err("removing the branch", e)),
            }
        }
        Ok(())
    }

    /// Replay the bundles applied to branch `name` on `live` in one transaction; the branch is
    /// deleted afterwards unless `keep`. Returns what was merged.
    pub async fn merge(
        &self,
        name: &str,
        live: &Storage,
        by: Option<String>,
        keep: bool,
    ) -> Result<serde_json::Value> {
        let storage = self.get(name).await?;
        let pending_rows = storage
            .read(
                &crate::core::RequestContext::system(),
                crate::storage::ExecControl::new(std::time::Instant::now(), 0.0),
                |c| pending(c, base_of(c)?),
            )
            .await?;
        if pending_rows.is_empty() {
            return Err(Error::new(
                ErrorCode::Conflict,
                format!("Branch '{name}' has no applied bundles to merge"),
            ));
        }
        let mut bundles = Vec::new();
        for (_, _, text) in &pending_rows {
            bundles.push(crate::bundle::Bundle::from_json(text)?);
        }
        let names: Vec<String> = bundles.iter().map(|b| b.name.clone()).collect();
        let ids = crate::bundle::apply(live, bundles, by, None).await?;
        if !keep {
            self.delete(name).await?;
        }
        Ok(
            serde_json::json!({"branch": name, "merged": names, "bundle_ids": ids, "deleted": !keep}),
        )
    }

    /// Close every open branch (server shutdown).
    pub async fn close_all(&self) {
        let mut open = self.open.lock().await;
        for (_, s) in open.drain() {
            let _ = s.close().await;
        }
    }
}

fn read_info(path: &Path, name: &str, open: bool) -> Result<BranchInfo> {
    let c = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| storage_err("opening the branch", e))?;
    c.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(|e| storage_err("busy timeout", e))?;
    let meta = |k: &str| -> Result<Option<String>> {
        c.query_row(
            "SELECT value FROM _ichibase_meta WHERE key = ?1",
            [k],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| storage_err("reading the branch", e))
    };
    let created_at = meta("branched_at")?;
    let base: i64 = meta("branch_base_bundle")?
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut pending_bundles = Vec::new();
    for (id, name, _) in pending(&c, base)? {
        let rec: Option<serde_json::Value> = meta(&format!("checks:{id}"))?
            .and_then(|v| serde_json::from_str(&v).ok());
        pending_bundles.push(PendingBundle {
            id,
            name,
            checks_ok: rec.as_ref().and_then(|r| r["ok"].as_bool()),
            failures: rec.as_ref().and_then(|r| r["failures"].as_str().map(str::to_string)),
        });
    }
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
        + std::fs::metadata(path.with_extension("db-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
    Ok(BranchInfo {
        name: name.to_string(),
        created_at,
        bytes,
        pending_bundles,
        open,
    })
}

/// Bundles applied to a branch after it was taken: `(id, name, bundle JSON)` in order.
pub fn pending(c: &Connection, base: i64) -> Result<Vec<(i64, String, String)>> {
    let mut st = c
        .prepare("SELECT id, name, bundle FROM _ichibase_bundles WHERE id > ?1 ORDER BY id")
        .map_err(|e| storage_err("reading the branch's bundles", e))?;
    let rows = st
        .query_map([base], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .map_err(|e| storage_err("reading the branch's bundles", e))?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(|e| storage_err("reading the branch's bundles", e))?;
    Ok(rows)
}

/// The bundle id the branch was taken at (from its own metadata).
pub fn base_of(c: &Connection) -> Result<i64> {
    let v: Option<String> = c
        .query_row(
            "SELECT value FROM _ichibase_meta WHERE key = 'branch_base_bundle'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| storage_err("reading the branch", e))?;
    Ok(v.and_then(|s| s.parse().ok()).unwrap_or(0))
}

/// Keep a handle type for the API state.
pub type SharedBranches = Arc<Branches>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_nice_defaults_low_and_is_checked() {
        let d: BranchSettings = toml::from_str("").unwrap();
        assert_eq!(d.copy_nice, 19);
        let z: BranchSettings = toml::from_str("copy_nice = 0").unwrap();
        z.validate().unwrap();
        for bad in ["copy_nice = 20", "copy_nice = -5"] {
            let s: BranchSettings = toml::from_str(bad).unwrap();
            let e = s.validate().unwrap_err();
            assert!(format!("{e}").contains("copy_nice"), "{e}");
        }
        assert!(toml::from_str::<BranchSettings>("nice = 3").is_err());
    }

    /// A branch taken at nice 19 is a complete, consistent copy, and the live database keeps
    /// taking writes while it is made.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn niced_copy_is_complete() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StorageOptions {
            path: dir.path().join("ichibase.db"),
            synchronous: crate::config::Synchronous::Normal,
            busy_timeout: std::time::Duration::from_secs(5),
            readers: 2,
            replicated: false,
        };
        let sys = crate::core::RequestContext::system();
        let ctl = || crate::storage::ExecControl::new(std::time::Instant::now(), 0.0);
        let live = Storage::open(&opts).unwrap();
        live.write(&sys, ctl(), |c| {
            c.execute_batch(
                "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)
                 INSERT INTO t (v) SELECT hex(randomblob(32)) FROM n;",
            )?;
            Ok(())
        })
        .await
        .unwrap();
        let branches = Branches::new(dir.path(), &opts, &BranchSettings::default());
        let info = branches.create("b1").await.unwrap();
        assert!(info.bytes > 0);
        let b = branches.get("b1").await.unwrap();
        let n: i64 = b
            .read(&sys, ctl(), |c| Ok(c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(n, 20000);
        branches.close_all().await;
        live.close().await.unwrap();
    }
}
