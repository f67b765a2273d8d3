//! SQLite storage: one serialised writer and a pool of read-only connections.
//!
//! Owns the database file of the app (`<data_dir>/ichibase.db`), its pragmas (WAL, synchronous,
//! busy timeout, foreign keys), the engine's own migrations and the life cycle of every
//! connection: check-out installs the request context and execution limits on a connection,
//! check-in removes them again, so nothing of one request leaks into the next.
//!
//! Reads run on pooled read-only connections and never wait for the writer (WAL snapshot
//! isolation). Writes are closures queued to one writer thread, run in arrival order.
//! This module knows nothing about SQL-over-HTTP, formats or routing.

pub mod authz;
pub mod capture;
mod control;
pub mod migrations;
mod readers;
pub mod stamp;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

pub use authz::Authz;
pub use control::{ConnState, EngineAccess, ExecControl, begin_shutdown, engine_statements};
use readers::ReaderPool;
use writer::Writer;

use crate::config::{Config, Synchronous};
use crate::core::{Error, ErrorCode, RequestContext, Result};

/// Storage settings taken from [`Config`].
#[derive(Debug, Clone)]
pub struct StorageOptions {
    pub path: PathBuf,
    pub synchronous: Synchronous,
    pub busy_timeout: Duration,
    pub readers: usize,
    /// WAL replication is on: SQLite's automatic checkpoint is off and the replicator runs
    /// checkpoints only after it captured the frames (see `crate::replication`).
    pub replicated: bool,
}

impl StorageOptions {
    pub fn from_config(cfg: &Config) -> Self {
        StorageOptions {
            path: cfg.db_path(),
            synchronous: cfg.synchronous,
            busy_timeout: Duration::from_millis(cfg.busy_timeout_ms),
            readers: cfg.readers,
            replicated: cfg.replication.is_some(),
        }
    }
}

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    authz: Arc<Authz>,
    writer: Writer,
    readers: ReaderPool,
    stamps: stamp::Stamps,
}

/// How many SQLite VM instructions run between two checks of the deadline / cancel flag.
const PROGRESS_OPS: i32 = 1000;

/// Create `dir` (with its parents) for this user only (0700), or tighten an existing one that
/// others could enter (with a warning): the data directory holds the database, the key ring
/// and the request log.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        if !dir.exists() {
            return std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir);
        }
        let mode = std::fs::metadata(dir)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(dir = %dir.display(), mode = format!("{:o}", mode & 0o777), "the data directory was open to other users; setting it to 0700");
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(())
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir)
}

/// An exclusive lock on a data directory, held while a server (or a restore) uses it; released
/// when dropped (or when the process dies: it is an `flock`).
pub struct DirLock {
    _file: std::fs::File,
    pub path: PathBuf,
}

/// Take the data directory's exclusive lock (`<dir>/ichibase.lock`), creating the directory
/// (0700) if needed. A second server on the same directory is refused here, before anything is
/// opened.
pub fn lock_data_dir(dir: &Path) -> anyhow::Result<DirLock> {
    private_dir(dir).map_err(|e| anyhow::anyhow!("creating the data directory {}: {e}", dir.display()))?;
    let path = dir.join("ichibase.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("opening the lock file {}: {e}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on a file descriptor this function owns.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                anyhow::bail!(
                    "another ichibase process is using the data directory {} (it holds {}): stop it first, or start with another --data-dir",
                    dir.display(),
                    path.display()
                );
            }
            anyhow::bail!("locking {}: {e}", path.display());
        }
    }
    Ok(DirLock { _file: file, path })
}

/// `e` with the path it concerns in its message (an OS error alone, "Permission denied", does
/// not say which file).
pub fn with_path(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Create `path` empty for this user only (0600) if it is missing, or tighten it to 0600.
/// Errors name the path.
pub fn private_file(path: &Path) -> std::io::Result<()> {
    private_file_inner(path).map_err(|e| with_path(path, e))
}

fn private_file_inner(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if std::fs::metadata(path)?.permissions().mode() & 0o077 != 0 {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

impl Storage {
    /// Open (creating if needed) the database, apply the engine's migrations, start the writer
    /// thread and fill the reader pool.
    pub fn open(opts: &StorageOptions) -> anyhow::Result<Storage> {
        // sqlite-vec on every connection opened from here on (never a loadable extension).
        crate::search::register_sqlite_vec();
        use anyhow::Context;
        Self::open_inner(opts).with_context(|| {
            format!(
                "opening the database {} (with its -wal and -shm files)",
                opts.path.display()
            )
        })
    }

    fn open_inner(opts: &StorageOptions) -> anyhow::Result<Storage> {
        if let Some(dir) = opts.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            private_dir(dir)?;
        }
        // SQLite gives the -wal and -shm files the database file's mode: 0600 for all three.
        private_file(&opts.path)?;
        let mut wconn = Connection::open(&opts.path)?;
        configure(&wconn, opts, false)?;
        let journal: String = wconn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        anyhow::ensure!(
            journal.eq_ignore_ascii_case("wal"),
            "could not switch {} to WAL (got {journal})",
            opts.path.display()
        );
        for suffix in ["-wal", "-shm"] {
            let mut p = opts.path.clone().into_os_string();
            p.push(suffix);
            let p = PathBuf::from(p);
            if p.exists() {
                private_file(&p)?;
            }
        }
        wconn.pragma_update(None, "synchronous", opts.synchronous.pragma_value())?;
        if opts.replicated {
            wconn.pragma_update(None, "wal_autocheckpoint", 0)?;
        }
        migrations::apply(&mut wconn)?;
        let authz = Arc::new(Authz::default());
        authz.refresh(&wconn)?;
        // Change capture (crate::realtime::cdc): the pre-update hook on the writer connection.
        let capture = capture::install(&mut wconn)?;
        let wstate = ConnState::install(&mut wconn, PROGRESS_OPS, Arc::clone(&authz))?;
        let writer = Writer::start(wconn, wstate, capture)?;

        let mut readers = Vec::with_capacity(opts.readers);
        for _ in 0..opts.readers {
            let mut c = Connection::open_with_flags(
                &opts.path,
                OpenFlags::SQLITE_OPEN_READ_ONLY
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX
                    | OpenFlags::SQLITE_OPEN_URI,
            )?;
            configure(&c, opts, true)?;
            let st = ConnState::install(&mut c, PROGRESS_OPS, Arc::clone(&authz))?;
            readers.push((c, st));
        }
        tracing::info!(path = %opts.path.display(), readers = opts.readers, synchronous = ?opts.synchronous, "storage open");
        Ok(Storage {
            inner: Arc::new(Inner {
                path: opts.path.clone(),
                authz,
                writer,
                readers: ReaderPool::new(readers, opts.busy_timeout),
                // After the migrations: the -shm file exists, and the writer's connection
                // keeps it for the storage's life.
                stamps: stamp::Stamps::open(&opts.path),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// A storage on a new database in `dir`, default settings (unit tests).
    #[cfg(test)]
    pub fn open_in(dir: &Path) -> Storage {
        let config = crate::config::Config {
            data_dir: dir.to_path_buf(),
            ..crate::config::Config::default()
        };
        Storage::open(&StorageOptions::from_config(&config)).unwrap()
    }

    /// The database's change stamp now (see [`stamp`]): equal stamps mean nothing was
    /// committed in between, by this process or another. `None`: cannot be told now.
    pub fn change_stamp(&self) -> Option<stamp::Stamp> {
        self.inner.stamps.now()
    }

    /// Signalled after every write job finished (its changes are committed or rolled back).
    pub fn committed(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.inner.writer.committed)
    }

    /// Change capture on the writer connection (`capture`).
    pub fn capture(&self) -> &Arc<capture::Capture> {
        &self.inner.writer.capture
    }

    /// The authorization snapshot shared by every connection.
    pub fn authz(&self) -> &Arc<Authz> {
        &self.inner.authz
    }

    /// Run `f` on a pooled read-only connection, with `ctx` and `control` installed.
    /// Waits for a free connection until the control's deadline.
    pub async fn read<F, R>(
        &self,
        ctx: &RequestContext,
        control: Arc<ExecControl>,
        f: F,
    ) -> Result<R>
    where
        F: FnOnce(&Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        self.inner.readers.run(ctx.clone(), control, f).await
    }

    /// [`read`](Self::read) on the calling thread, which must be a blocking thread (not an async
    /// worker); `rt` is the runtime storage lives on.
    pub fn read_blocking<F, R>(
        &self,
        rt: &tokio::runtime::Handle,
        ctx: &RequestContext,
        control: Arc<ExecControl>,
        f: F,
    ) -> Result<R>
    where
        F: FnOnce(&Connection) -> Result<R>,
    {
        self.inner.readers.run_blocking(rt, ctx.clone(), control, f)
    }

    /// Queue `f` to the writer; it runs after every write queued before it.
    pub async fn write<F, R>(
        &self,
        ctx: &RequestContext,
        control: Arc<ExecControl>,
        f: F,
    ) -> Result<R>
    where
        F: FnOnce(&mut Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        self.inner.writer.run(ctx.clone(), control, f).await
    }

    /// Register `f` to run on the writer thread after the last write and just before the final
    /// checkpoint on close (the replicator captures the WAL tail there).
    pub fn before_close_checkpoint(&self, f: Box<dyn FnOnce(&Connection) + Send>) {
        *self.inner.writer.before_close.lock().unwrap() = Some(f);
    }

    /// Stop accepting work, let queued writes finish, close the readers and checkpoint the WAL
    /// into the main file. Called once on shutdown.
    pub async fn close(&self) -> Result<()> {
        self.inner.stamps.close();
        self.inner.readers.close().await;
        self.inner.writer.close().await
    }
}

fn configure(c: &Connection, opts: &StorageOptions, read_only: bool) -> rusqlite::Result<()> {
    c.busy_timeout(opts.busy_timeout)?;
    c.pragma_update(None, "foreign_keys", "ON")?;
    if read_only {
        c.pragma_update(None, "query_only", "ON")?;
    }
    c.set_prepared_statement_cache_capacity(64);
    // Plans do not depend on bound values (the query-planner stability guarantee). Without it
    // SQLite marks a statement whose planning looked at a parameter (a `LIMIT ?`, a comparison
    // the planner matched against a literal) to be re-prepared whenever that parameter is
    // bound to a new value, so a cached statement was parsed and planned again on every use
    // (the function look-up of every Lua invocation was; issue 18).
    c.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    Ok(())
}

/// Error for work refused because the storage is closing.
fn shutting_down() -> Error {
    Error::new(ErrorCode::ShuttingDown, "The server is shutting down")
}
