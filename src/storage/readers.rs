//! The pool of read-only connections. A semaphore counts free connections; the blocking work
//! runs on tokio's blocking threads so the async runtime stays responsive.

use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use tokio::sync::Semaphore;

use super::control::{ConnState, ExecControl, reset};
use crate::core::{Error, ErrorCode, RequestContext, Result};

type Pooled = (Connection, Arc<ConnState>);

pub(super) struct ReaderPool {
    conns: Arc<Mutex<Vec<Pooled>>>,
    free: Arc<Semaphore>,
    size: u32,
}

impl ReaderPool {
    pub fn new(conns: Vec<Pooled>) -> Self {
        let size = conns.len() as u32;
        ReaderPool {
            free: Arc::new(Semaphore::new(conns.len())),
            conns: Arc::new(Mutex::new(conns)),
            size,
        }
    }

    pub async fn run<F, R>(&self, ctx: RequestContext, control: Arc<ExecControl>, f: F) -> Result<R>
    where
        F: FnOnce(&Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let acquire = Arc::clone(&self.free).acquire_owned();
        let permit = match control.deadline {
            Some(d) => match tokio::time::timeout_at(d.into(), acquire).await {
                Ok(p) => p,
                Err(_) => return Err(control.stop_error()),
            },
            None => acquire.await,
        }
        .map_err(|_| super::shutting_down())?;
        let conns = Arc::clone(&self.conns);
        let joined = tokio::task::spawn_blocking(move || {
            let (conn, st) = conns
                .lock()
                .unwrap()
                .pop()
                .expect("a permit guarantees a free connection");
            let out = match control.check() {
                Ok(()) => match st.check_out(&conn, ctx, Arc::clone(&control)) {
                    Ok(()) => f(&conn).map_err(|e| control.map_error(st.explain(e))),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            reset(&conn, &st);
            conns.lock().unwrap().push((conn, st));
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
