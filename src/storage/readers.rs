//! The pool of read-only connections. A semaphore counts free connections; the blocking work
//! runs on tokio's blocking threads so the async runtime stays responsive.
//!
//! Short reads may also run **inline** on the calling thread ([`Storage::try_read_inline`]):
//! when a connection is free at once, the caller (an async worker) runs SQLite itself instead
//! of hopping to a blocking thread and back, which is most of a point query's cost. The caller
//! bounds such a run (a tight [`ExecControl`] deadline, polled by the progress handler, and a
//! cap on the answer) and falls back to [`Storage::read`] when the bound is hit; when no
//! connection is free nothing runs and the caller goes through the pool's queue as before.
//! An inline run never waits for a lock: its connection's busy timeout is zero while it runs,
//! so a busy database answers `DATABASE_BUSY` at once and the caller falls back to the pool,
//! which waits the configured `busy_timeout_ms` on a blocking thread, not on an async worker.
//! A connection always goes back to the pool, also when the work panics.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::Semaphore;

use super::control::{ConnState, ExecControl, reset};
use crate::core::{Error, ErrorCode, RequestContext, Result};

type Pooled = (Connection, Arc<ConnState>);

pub(super) struct ReaderPool {
    conns: Arc<Mutex<Vec<Pooled>>>,
    free: Arc<Semaphore>,
    size: u32,
    /// The connections' busy timeout (`busy_timeout_ms`), put back after an inline run.
    busy_timeout: Duration,
}

impl ReaderPool {
    pub fn new(conns: Vec<Pooled>, busy_timeout: Duration) -> Self {
        let size = conns.len() as u32;
        ReaderPool {
            free: Arc::new(Semaphore::new(conns.len())),
            conns: Arc::new(Mutex::new(conns)),
            size,
            busy_timeout,
        }
    }

    async fn acquire(&self, control: &ExecControl) -> Result<tokio::sync::OwnedSemaphorePermit> {
        let acquire = Arc::clone(&self.free).acquire_owned();
        match control.deadline {
            Some(d) => match tokio::time::timeout_at(d.into(), acquire).await {
                Ok(p) => p,
                Err(_) => return Err(control.stop_error()),
            },
            None => acquire.await,
        }
        .map_err(|_| super::shutting_down())
    }

    pub async fn run<F, R>(&self, ctx: RequestContext, control: Arc<ExecControl>, f: F) -> Result<R>
    where
        F: FnOnce(&Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let permit = self.acquire(&control).await?;
        let conns = Arc::clone(&self.conns);
        let joined = tokio::task::spawn_blocking(move || {
            let out = with_conn(&conns, ctx, control, f);
            drop(permit);
            out
        })
        .await;
        joined.unwrap_or_else(|e| {
            Err(Error::new(
                ErrorCode::Internal,
                format!("reader task failed: {e}"),
            ))
        })
    }

    /// Like [`run`](Self::run), on the calling thread, which must be a blocking thread (not an
    /// async worker): saves a thread hop for work that is already off the runtime (Lua).
    pub fn run_blocking<F, R>(
        &self,
        rt: &tokio::runtime::Handle,
        ctx: RequestContext,
        control: Arc<ExecControl>,
        f: F,
    ) -> Result<R>
    where
        F: FnOnce(&Connection) -> Result<R>,
    {
        let permit = rt.block_on(self.acquire(&control))?;
        let out = with_conn(&self.conns, ctx, control, f);
        drop(permit);
        out
    }

    /// Run `f` on the calling thread when a connection is free right now (`None`: none was, and
    /// `f` did not run).
    pub fn try_run_inline<F, R>(
        &self,
        ctx: RequestContext,
        control: Arc<ExecControl>,
        f: F,
    ) -> Option<Result<R>>
    where
        F: FnOnce(&Connection) -> Result<R>,
    {
        let permit = self.free.try_acquire().ok()?;
        /// Puts the busy timeout back, also when the work panics.
        struct Waits<'a>(&'a Connection, Duration);
        impl Drop for Waits<'_> {
            fn drop(&mut self) {
                let _ = self.0.busy_timeout(self.1);
            }
        }
        let out = with_conn(&self.conns, ctx, control, |conn| {
            conn.busy_timeout(Duration::ZERO)?;
            let _waits = Waits(conn, self.busy_timeout);
            f(conn)
        });
        drop(permit);
        Some(out)
    }

    /// Wait for every connection to come back, then close them all.
    pub async fn close(&self) {
        if let Ok(all) = self.free.acquire_many(self.size).await {
            all.forget();
        }
        self.free.close();
        let conns = std::mem::take(&mut *self.conns.lock().unwrap());
        drop(conns);
    }
}

/// Check a connection out (a permit is held by the caller), run `f`, check it back in (also
/// when `f` panics: the pool never shrinks below its permits).
fn with_conn<F, R>(
    conns: &Mutex<Vec<Pooled>>,
    ctx: RequestContext,
    control: Arc<ExecControl>,
    f: F,
) -> Result<R>
where
    F: FnOnce(&Connection) -> Result<R>,
{
    struct CheckedOut<'a> {
        conns: &'a Mutex<Vec<Pooled>>,
        conn: Option<Pooled>,
    }
    impl Drop for CheckedOut<'_> {
        fn drop(&mut self) {
            if let Some((conn, st)) = self.conn.take() {
                reset(&conn, &st);
                let mut g = self.conns.lock().unwrap_or_else(|p| p.into_inner());
                g.push((conn, st));
            }
        }
    }
    let out = CheckedOut {
        conns,
        conn: Some(
            conns
                .lock()
                .unwrap()
                .pop()
                .expect("a permit guarantees a free connection"),
        ),
    };
    let (conn, st) = out.conn.as_ref().expect("just checked out");
    match control.check() {
        Ok(()) => match st.check_out(conn, ctx, Arc::clone(&control)) {
            Ok(()) => f(conn).map_err(|e| control.map_error(st.explain(e))),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    }
}

impl super::Storage {
    /// [`read`](super::Storage::read) on the calling thread, if a reader connection is free at
    /// once (`None`: none was, `f` did not run). For short work only: it occupies the caller
    /// (an async worker) while SQLite runs, so bound it with `control`'s deadline.
    pub fn try_read_inline<F, R>(
        &self,
        ctx: &RequestContext,
        control: Arc<ExecControl>,
        f: F,
    ) -> Option<Result<R>>
    where
        F: FnOnce(&Connection) -> Result<R>,
    {
        self.inner.readers.try_run_inline(ctx.clone(), control, f)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use crate::config::Config;
    use crate::core::RequestContext;
    use crate::storage::{ExecControl, Storage, StorageOptions};

    /// Storage in `dir` with a single reader connection and the given busy wait.
    fn one_reader_storage(dir: &std::path::Path, busy_timeout_ms: u64) -> Storage {
        let config = Config {
            data_dir: dir.to_path_buf(),
            readers: 1,
            busy_timeout_ms,
            ..Config::default()
        };
        Storage::open(&StorageOptions::from_config(&config)).unwrap()
    }

    fn busy_ms(conn: &rusqlite::Connection) -> crate::core::Result<i64> {
        Ok(conn.query_row("PRAGMA busy_timeout", [], |r| r.get(0))?)
    }

    /// An inline read runs with no busy wait (a lock would otherwise hold an async worker for
    /// up to `busy_timeout_ms`), and its connection gets the configured wait back afterwards,
    /// also when the work fails or panics.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_inline_read_never_waits_for_a_lock_and_puts_the_wait_back() {
        let dir = tempfile::tempdir().unwrap();
        let storage = one_reader_storage(dir.path(), 4_321);
        let ctx = RequestContext::system();
        let control = || ExecControl::new(Instant::now(), 0.0);
        let inline = storage.try_read_inline(&ctx, control(), busy_ms).unwrap().unwrap();
        assert_eq!(inline, 0, "an inline read must not wait for locks");
        let failed: Option<crate::core::Result<()>> = storage.try_read_inline(&ctx, control(), |_| {
            Err(crate::core::Error::new(crate::core::ErrorCode::Internal, "boom"))
        });
        assert!(failed.unwrap().is_err());
        let s2 = storage.clone();
        let panicked = std::thread::spawn(move || {
            s2.try_read_inline(&RequestContext::system(), ExecControl::new(Instant::now(), 0.0), |_| -> crate::core::Result<()> {
                panic!("work panicked")
            })
        })
        .join();
        assert!(panicked.is_err());
        // The only reader connection is back in the pool with its configured wait.
        let pooled = storage.read(&ctx, control(), busy_ms).await.unwrap();
        assert_eq!(pooled, 4_321);
    }

    /// A cached statement is prepared once per connection, whatever its parameters are bound
    /// to: connections run with the query-planner stability guarantee. Without it SQLite
    /// re-prepared the function look-up (which binds a name and a NULL version) on every use,
    /// and user SQL with a bound `LIMIT` or a parameter the planner compared with a literal.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cached_statements_are_not_prepared_again_for_new_bindings() {
        let dir = tempfile::tempdir().unwrap();
        let storage = one_reader_storage(dir.path(), Config::default().busy_timeout_ms);
        let ctx = RequestContext::system();
        let control = || ExecControl::new(Instant::now(), 0.0);
        for name in ["a", "b"] {
            storage
                .write(&ctx, control(), move |c| {
                    crate::lua::store::deploy(
                        c,
                        name,
                        "return function() return 1 end",
                        false,
                        None,
                    )
                })
                .await
                .unwrap();
        }
        storage
            .write(&ctx, control(), |c| {
                c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT); INSERT INTO t VALUES (1, 'x'), (2, 'y'), (3, 'z');")?;
                Ok(())
            })
            .await
            .unwrap();
        let reprepared = storage
            .read(&ctx, control(), |c| {
                for i in 0..6i64 {
                    let name = if i % 2 == 0 { "a" } else { "b" };
                    let version = (i % 3 == 0).then_some(1);
                    crate::lua::store::get(c, name, version)?;
                    let n: i64 = c
                        .prepare_cached(
                            "SELECT count(*) FROM (SELECT v FROM t WHERE id >= ?1 LIMIT ?2)",
                        )?
                        .query_row(rusqlite::params![i % 3, i % 4], |r| r.get(0))?;
                    assert!(n <= 3);
                }
                let f = c.prepare_cached(crate::lua::store::GET_SQL)?;
                let l = c.prepare_cached(
                    "SELECT count(*) FROM (SELECT v FROM t WHERE id >= ?1 LIMIT ?2)",
                )?;
                Ok((
                    f.get_status(rusqlite::StatementStatus::RePrepare),
                    f.get_status(rusqlite::StatementStatus::Run),
                    l.get_status(rusqlite::StatementStatus::RePrepare),
                ))
            })
            .await
            .unwrap();
        assert_eq!(reprepared.1, 6, "the look-up ran on one cached statement");
        assert_eq!(
            (reprepared.0, reprepared.2),
            (0, 0),
            "re-prepared: {reprepared:?}"
        );
    }
}
