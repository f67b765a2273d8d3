//! Change stamps: a cheap answer to "has anything been committed to the database since?",
//! for caches of data read from it (the live function versions, `crate::lua::store`).
//!
//! In WAL mode SQLite keeps a header at the start of the `-shm` file (the wal-index header,
//! documented in SQLite's "WAL-mode file format"): the last valid WAL frame, the WAL's salts
//! and the running checksum. Every commit, by any connection of any process, appends frames
//! and rewrites this header (a WAL restart changes the salts), and every reader reads it to
//! start its snapshot; a checkpoint changes no data and leaves it as it is. So two equal
//! headers mean the database holds the same data. SQLite writes the header twice (two 48-byte
//! copies, the second first) and readers compare the copies: a read here does the same and
//! answers "unknown" (`None`) when they differ (a commit being published) or the header is not
//! initialised yet.
//!
//! One `pread` of 96 bytes, no lock and no SQLite call: far cheaper than a read transaction.
//! Owns only the `-shm` file handle it opened (read-only); it never writes.
//! Must not be used to decide what a connection sees: only whether a cached copy is still
//! the database's.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// The database's state as of one commit (the wal-index header), comparable for equality.
/// It also names the [`Stamps`] it came from: stamps of two storages (two databases, or one
/// database opened twice) never compare equal, even when their headers happen to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stamp {
    source: u64,
    header: [u8; HEADER],
}

/// Numbers every [`Stamps`] made in this process.
static SOURCES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Bytes of one copy of the wal-index header.
const HEADER: usize = 48;
/// Offset of `isInit` in the header (non-zero once the header is valid).
const IS_INIT: usize = 12;

/// Reads the stamps of one database (its `-shm` file).
#[derive(Debug)]
pub struct Stamps {
    shm: Option<File>,
    source: u64,
    /// Set when the storage closes: its `-shm` file may then be removed and made again by
    /// another process, which this handle would not see.
    closed: AtomicBool,
}

impl Stamps {
    /// Stamps of the database at `db` (WAL mode, opened by a connection the storage keeps
    /// open, so the `-shm` file stays the one SQLite uses). Without the file every stamp is
    /// `None` (callers then read the database).
    pub fn open(db: &Path) -> Stamps {
        let mut p = db.as_os_str().to_owned();
        p.push("-shm");
        let shm = File::open(&p)
            .map_err(|e| tracing::debug!(path = ?p, error = %e, "no -shm file: change stamps off"))
            .ok();
        Stamps {
            shm,
            source: SOURCES.fetch_add(1, Ordering::Relaxed),
            closed: AtomicBool::new(false),
        }
    }

    /// The database's current stamp, `None` when it cannot be told (a commit being published,
    /// no `-shm` file, the storage closed).
    pub fn now(&self) -> Option<Stamp> {
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        let mut buf = [0u8; 2 * HEADER];
        self.shm.as_ref()?.read_exact_at(&mut buf, 0).ok()?;
        let (a, b) = buf.split_at(HEADER);
        if a != b || a[IS_INIT] == 0 {
            return None;
        }
        let mut header = [0u8; HEADER];
        header.copy_from_slice(a);
        Some(Stamp {
            source: self.source,
            header,
        })
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use crate::core::RequestContext;
    use crate::storage::{ExecControl, Storage};

    fn control() -> std::sync::Arc<ExecControl> {
        ExecControl::new(std::time::Instant::now(), 0.0)
    }

    /// Every commit changes the stamp: the storage's own, another connection's (as another
    /// process's would), and commits after a WAL restart; reads and checkpoints do not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_commit_changes_the_stamp_and_nothing_else_does() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open_in(dir.path());
        let sys = RequestContext::system;
        let mut seen = std::collections::HashSet::new();
        let s0 = storage.change_stamp().expect("a stamp after open");
        seen.insert(s0);
        storage
            .write(&sys(), control(), |c| Ok(c.execute_batch("CREATE TABLE t(x)")?))
            .await
            .unwrap();
        let s1 = storage.change_stamp().unwrap();
        assert!(seen.insert(s1), "a commit changes the stamp");
        let n: i64 = storage
            .read(&sys(), control(), |c| Ok(c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(n, 0);
        assert_eq!(storage.change_stamp(), Some(s1), "a read does not");
        // Another connection (as another process would write): seen at once.
        let other = rusqlite::Connection::open(storage.path()).unwrap();
        other.execute("INSERT INTO t VALUES (1)", []).unwrap();
        let s2 = storage.change_stamp().unwrap();
        assert!(seen.insert(s2), "another connection's commit changes the stamp");
        // A rolled-back transaction changes nothing.
        other.execute_batch("BEGIN; INSERT INTO t VALUES (2); ROLLBACK").unwrap();
        assert_eq!(storage.change_stamp(), Some(s2), "a rollback does not");
        // A full checkpoint that empties the WAL keeps the data: same stamp or a new one is
        // fine, but the next commit (which restarts the WAL from its start) must differ from
        // every stamp seen before.
        other
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        if let Some(s) = storage.change_stamp() {
            seen.insert(s);
        }
        for i in 3..8 {
            other.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
            let s = storage.change_stamp().unwrap();
            assert!(seen.insert(s), "commit {i} after a WAL restart repeats an earlier stamp");
            other
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .unwrap();
        }
        drop(other);
        // The same database opened again (as a restore or a second storage would): its stamps
        // never equal the first one's, though the header is the same.
        let again = crate::storage::stamp::Stamps::open(storage.path());
        let (x, y) = (storage.change_stamp().unwrap(), again.now().unwrap());
        assert_eq!(x.header, y.header);
        assert_ne!(x, y);
        storage.close().await.unwrap();
        assert_eq!(storage.change_stamp(), None, "a closed storage has no stamp");
    }
}
