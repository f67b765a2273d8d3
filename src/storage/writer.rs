//! The single writer: one thread owns the read-write connection and runs queued write jobs in
//! arrival order. A bounded queue gives back-pressure; on close the thread drains the queue,
//! checkpoints the WAL into the database file and exits. Change capture (`capture`) writes its
//! change-log rows inside the jobs' own transactions; around each job the writer lets it notice
//! writes by other processes (`Capture::job_starts`: before the job's first statement) and
//! finish a transaction it opened for an autocommit statement (`Capture::end_job`, whose error
//! replaces the job's result: that write was rolled back). The `committed` signal then wakes change-data-capture.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::capture::{self, Capture};
use super::control::{ConnState, ExecControl, reset};
use crate::core::{Error, ErrorCode, RequestContext, Result};

type Job = Box<dyn FnOnce(&mut Connection, &ConnState, &Capture) + Send>;
/// Runs once on the writer thread before the final checkpoint on close.
pub(super) type CloseHook = Box<dyn FnOnce(&Connection) + Send>;

/// Queue depth before callers wait for the writer.
const QUEUE: usize = 1024;

pub(super) struct Writer {
    /// Signalled after every write job (change-data-capture picks committed changes up).
    pub(super) committed: Arc<tokio::sync::Notify>,
    pub(super) before_close: Arc<Mutex<Option<CloseHook>>>,
    pub(super) capture: Arc<Capture>,
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<Result<()>>>>,
}

impl Writer {
    pub fn start(conn: Connection, state: Arc<ConnState>, capture: Arc<Capture>) -> std::io::Result<Writer> {
        let (tx, rx) = mpsc::channel::<Job>(QUEUE);
        let committed = Arc::new(tokio::sync::Notify::new());
        let c2 = Arc::clone(&committed);
        let before_close: Arc<Mutex<Option<CloseHook>>> = Arc::default();
        let h2 = Arc::clone(&before_close);
        let cap = Arc::clone(&capture);
        let thread = std::thread::Builder::new()
            .name("ichibase-writer".into())
            .spawn(move || writer_loop(conn, state, rx, c2, h2, cap))?;
        Ok(Writer {
            committed,
            before_close,
            capture,
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    pub async fn run<F, R>(&self, ctx: RequestContext, control: Arc<ExecControl>, f: F) -> Result<R>
    where
        F: FnOnce(&mut Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let tx = self
            .tx
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(super::shutting_down)?;
        let (done_tx, done_rx) = oneshot::channel();
        let job_control = Arc::clone(&control);
        let job: Job = Box::new(move |conn, st, cap| {
            job_control.begin_write();
            cap.job_starts();
            let out = match job_control.check() {
                Ok(()) => match st.check_out(conn, ctx, Arc::clone(&job_control)) {
                    Ok(()) => f(conn).map_err(|e| job_control.map_error(st.explain(e))),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            // A transaction capture opened is committed here; if capture had to roll a write
            // back, that is the job's outcome.
            let out = match cap.end_job(conn) {
                Some(msg) => Err(Error::new(ErrorCode::Internal, msg)),
                None => out,
            };
            reset(conn, st);
            let _ = done_tx.send(out);
        });
        let send = tx.send(job);
        match control.deadline {
            Some(d) => match tokio::time::timeout_at(d.into(), send).await {
                Ok(r) => r.map_err(|_| super::shutting_down())?,
                Err(_) => return Err(control.stop_error()),
            },
            None => send.await.map_err(|_| super::shutting_down())?,
        }
        done_rx.await.unwrap_or_else(|_| {
            Err(Error::new(
                ErrorCode::Internal,
                "writer dropped the job (it panicked)",
            ))
        })
    }

    pub async fn close(&self) -> Result<()> {
        drop(self.tx.lock().unwrap().take());
        let Some(handle) = self.thread.lock().unwrap().take() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || handle.join())
            .await
            .map_err(|e| Error::internal(format!("joining writer: {e}")))?
            .unwrap_or_else(|_| Err(Error::internal("writer thread panicked")))
    }
}

fn writer_loop(
    mut conn: Connection,
    state: Arc<ConnState>,
    mut rx: mpsc::Receiver<Job>,
    committed: Arc<tokio::sync::Notify>,
    before_close: Arc<Mutex<Option<CloseHook>>>,
    capture: Arc<Capture>,
) -> Result<()> {
    while let Some(job) = rx.blocking_recv() {
        // A panicking job must not take the writer (and with it every future write) down.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut conn, &state, &capture)));
        if r.is_err() {
            tracing::error!("a write job panicked; its transaction was rolled back");
            let _ = capture.end_job(&conn);
            reset(&conn, &state);
        }
        committed.notify_one();
    }
    capture::uninstall(&mut conn);
    if let Some(hook) = before_close.lock().unwrap().take() {
        hook(&conn);
    }
    let (busy, log, done): (i64, i64, i64) =
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
    tracing::info!(
        busy,
        wal_frames = log,
        checkpointed = done,
        "final WAL checkpoint"
    );
    conn.close().map_err(|(_, e)| Error::from(e))?;
    Ok(())
}
