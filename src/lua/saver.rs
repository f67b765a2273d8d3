//! Saving traces off the invocation's path (issue 18).
//!
//! A traced invocation returns as soon as its script ended: its trace is handed to a bounded
//! queue served by one background thread (`ichibase-trace-saver`, started on first use), which
//! turns the steps into JSON text ([`store::trace_rows`]) and writes them on the storage's
//! writer ([`store::insert_trace`], which also prunes old traces).
//!
//! - **Bound**: at most `[traces] save_queue` traces wait (default 64). When the queue is full
//!   the invocation saves its own trace before returning, as it did before the queue existed:
//!   backpressure, never a dropped trace. `save_queue = 0` always saves before returning.
//! - **Reading right after the response**: while a trace waits or is being written its id is
//!   *pending*; `GET /trace/{id}` and the hover route wait for it ([`wait`], bounded), so a
//!   client that fetches the trace id from the response at once gets the trace.
//! - **Crash semantics**: a trace still queued when the process dies is lost (the invocation's
//!   result, its posterity row and everything it wrote are not affected: the trace is the only
//!   thing written after the response). A graceful stop waits for the queue ([`flush`]).
//!   A failed write is logged (`saving a trace failed`), as before.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::Outcome;
use super::limits::TraceLimits;
use super::store;
use crate::core::RequestContext;
use crate::storage::{ExecControl, Storage};

/// One trace to save.
pub struct Job {
    pub storage: Storage,
    pub rt: tokio::runtime::Handle,
    pub id: String,
    pub function: String,
    pub version: i64,
    pub user_id: Option<String>,
    pub role: String,
    pub owner: Option<String>,
    pub limits: TraceLimits,
    pub outcome: Outcome,
}

struct State {
    /// Traces queued or being written.
    queued: usize,
    /// Their ids, each with the flag its readers wait on (set once written or failed).
    pending: HashMap<String, watch::Sender<bool>>,
}

struct Saver {
    tx: Mutex<mpsc::Sender<Job>>,
    state: Mutex<State>,
    /// Signalled whenever a queued trace is done (for [`flush`]).
    done: Condvar,
}

static SAVER: OnceLock<Saver> = OnceLock::new();

/// The saver, if a trace was ever queued (readers need not start it).
fn started() -> Option<&'static Saver> {
    SAVER.get()
}

fn saver() -> &'static Saver {
    SAVER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("ichibase-trace-saver".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    let id = job.id.clone();
                    // A panic saving one trace must not stop the saver (or leave readers
                    // waiting): it is logged and the trace counted done.
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| save(job))).is_err() {
                        tracing::error!(trace_id = %id, "saving a trace failed: panic");
                    }
                    let s = saver();
                    let mut st = s.state.lock().unwrap_or_else(|e| e.into_inner());
                    st.queued = st.queued.saturating_sub(1);
                    if let Some(w) = st.pending.remove(&id) {
                        w.send_replace(true);
                    }
                    drop(st);
                    s.done.notify_all();
                }
            })
            .expect("spawning the trace saver thread");
        Saver {
            tx: Mutex::new(tx),
            state: Mutex::new(State {
                queued: 0,
                pending: HashMap::new(),
            }),
            done: Condvar::new(),
        }
    })
}

/// Serialise and write one trace now, on this thread (and the storage's writer).
pub fn save(job: Job) {
    let Job {
        storage,
        rt,
        id,
        function,
        version,
        user_id,
        role,
        owner,
        limits,
        outcome,
    } = job;
    let rows = store::trace_rows(
        &id,
        &function,
        version,
        user_id.as_deref(),
        &role,
        owner.as_deref(),
        &limits,
        &outcome,
    );
    let large = outcome
        .steps
        .as_ref()
        .is_some_and(|(s, _)| super::large_trace(s));
    drop(outcome);
    let saved = rt.block_on(storage.write(
        &RequestContext::system(),
        ExecControl::lookup(),
        move |c| store::insert_trace(c, &rows),
    ));
    if let Err(e) = saved {
        tracing::error!(trace_id = %id, error = %e, "saving a trace failed");
    }
    // Saving a large trace built large temporaries (its JSON text): give them back. A small
    // one is not worth a heap trim (it costs about as much as a small traced run).
    if large {
        super::release_freed_memory();
    }
}

/// Save `job` in the background when the queue has room (`[traces] save_queue`), else now.
/// Returns whether it was queued.
pub fn submit(job: Job) -> bool {
    let cap = job.limits.save_queue;
    if cap == 0 {
        save(job);
        return false;
    }
    let s = saver();
    {
        let mut st = s.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.queued >= cap || st.pending.contains_key(&job.id) {
            drop(st);
            tracing::debug!(trace_id = %job.id, "trace save queue full: saving before returning");
            save(job);
            return false;
        }
        st.queued += 1;
        st.pending.insert(job.id.clone(), watch::channel(false).0);
    }
    let id = job.id.clone();
    let sent = s
        .tx
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(job);
    if let Err(mpsc::SendError(job)) = sent {
        // The saver thread is gone (it never exits while the process runs): save here.
        let mut st = s.state.lock().unwrap_or_else(|e| e.into_inner());
        st.queued = st.queued.saturating_sub(1);
        if let Some(w) = st.pending.remove(&id) {
            w.send_replace(true);
        }
        drop(st);
        save(job);
        return false;
    }
    true
}

/// Is trace `id` waiting to be saved?
pub fn is_pending(id: &str) -> bool {
    started().is_some_and(|s| {
        s.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pending
            .contains_key(id)
    })
}

/// Wait (at most `timeout`) until trace `id` is no longer pending: written, or its write
/// failed. Returns at once when it is not pending.
pub async fn wait(id: &str, timeout: Duration) {
    let Some(s) = started() else { return };
    let rx = {
        let st = s.state.lock().unwrap_or_else(|e| e.into_inner());
        match st.pending.get(id) {
            Some(w) => w.subscribe(),
            None => return,
        }
    };
    let mut rx = rx;
    let _ = tokio::time::timeout(timeout, rx.wait_for(|done| *done)).await;
}

/// Block until every queued trace is saved, at most `timeout`. Returns whether the queue
/// emptied.
pub fn flush(timeout: Duration) -> bool {
    let Some(s) = started() else { return true };
    let end = Instant::now() + timeout;
    let mut st = s.state.lock().unwrap_or_else(|e| e.into_inner());
    while st.queued > 0 {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        st = s
            .done
            .wait_timeout(st, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    true
}

/// Traces queued or being written now.
pub fn queued() -> usize {
    started().map_or(0, |s| s.state.lock().unwrap_or_else(|e| e.into_inner()).queued)
}
