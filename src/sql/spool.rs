//! The spool between a query that produces a streamed result and the client that reads it.
//!
//! A query runs on a pooled SQLite connection; a client may read its answer slowly or not at all.
//! The connection must never wait for the network: chunks go to the HTTP layer through a small
//! channel, and when the channel is full they queue here instead, in memory up to a bound and
//! then in an unlinked temporary file, up to a per-request bound and a server-wide budget. The
//! query finishes at SQLite's speed and frees its connection; the spool then drains to the client
//! at the client's pace, and gives up when the client takes no chunk for `send_timeout`.
//!
//! Owns only this buffering; it knows nothing about formats, storage or HTTP.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc::{self, error::TrySendError};

use super::exec::{Msg, Summary};
use crate::core::{Error, ErrorCode, Result};

/// Bounds of the spool (the `[http]` section: `spool_memory`, `spool_disk`, `spool_total`,
/// `send_timeout_secs`).
#[derive(Debug, Clone)]
pub struct SpoolLimits {
    /// Bytes one request may queue in memory before spilling to a temporary file.
    pub memory: u64,
    /// Bytes one request may queue in all (memory + file).
    pub per_request: u64,
    /// Bytes every request together may queue; shared counter and its bound.
    pub total: Arc<AtomicU64>,
    pub total_limit: u64,
    /// Longest the client may take no chunk before the answer is abandoned.
    pub send_timeout: Duration,
}

impl Default for SpoolLimits {
    fn default() -> Self {
        SpoolLimits {
            memory: 8 << 20,
            per_request: 1 << 30,
            total: Arc::default(),
            total_limit: 4 << 30,
            send_timeout: Duration::from_secs(60),
        }
    }
}

/// Chunks waiting for a slow client, in order: memory first, then the file.
pub(crate) struct Spool {
    tx: mpsc::Sender<Msg>,
    limits: SpoolLimits,
    mem: VecDeque<Bytes>,
    mem_bytes: u64,
    file: Option<File>,
    /// Byte offsets in the file: where the next chunk is written and read.
    file_write: u64,
    file_read: u64,
    /// Bytes queued here (memory + unread file), counted against the budgets.
    queued: u64,
    /// The summary that goes with the last queued chunk.
    summary: Summary,
}

fn too_slow(what: String) -> Error {
    Error::new(
        ErrorCode::TooManyRowsOrBytes,
        format!("The client reads the result too slowly: {what}; the query was stopped"),
    )
}

fn gone() -> Error {
    Error::new(
        ErrorCode::QueryWasCancelled,
        "Client went away while the result was streaming",
    )
}

impl Spool {
    pub(crate) fn new(tx: mpsc::Sender<Msg>, limits: SpoolLimits) -> Spool {
        Spool {
            tx,
            limits,
            mem: VecDeque::new(),
            mem_bytes: 0,
            file: None,
            file_write: 0,
            file_read: 0,
            queued: 0,
            summary: Summary::default(),
        }
    }

    /// Nothing is waiting for the client.
    pub(crate) fn is_idle(&self) -> bool {
        self.queued == 0
    }

    /// Hand a chunk on without ever blocking: straight into the channel when nothing waits and
    /// there is room, else into the queue.
    pub(crate) fn push(&mut self, bytes: Bytes, summary: Summary) -> Result<()> {
        self.summary = summary;
        if self.is_idle() {
            match self.tx.try_send(Msg::Data(bytes, summary)) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(_)) => return Err(gone()),
                Err(TrySendError::Full(Msg::Data(b, _))) => return self.enqueue(b),
                Err(TrySendError::Full(_)) => unreachable!("a Data message was sent"),
            }
        }
        self.pump()?;
        if self.is_idle() {
            return self.push(bytes, summary);
        }
        self.enqueue(bytes)
    }

    fn enqueue(&mut self, b: Bytes) -> Result<()> {
        let n = b.len() as u64;
        if self.queued + n > self.limits.per_request {
            return Err(too_slow(format!(
                "{} bytes are waiting, more than spool_disk = {} ([http] section)",
                self.queued + n,
                self.limits.per_request
            )));
        }
        let total = self.limits.total.fetch_add(n, Ordering::Relaxed) + n;
        if total > self.limits.total_limit {
            self.limits.total.fetch_sub(n, Ordering::Relaxed);
            return Err(too_slow(format!(
                "the server's results waiting for slow clients reached spool_total = {} bytes ([http] section)",
                self.limits.total_limit
            )));
        }
        self.queued += n;
        if self.file.is_none() && self.mem_bytes + n <= self.limits.memory {
            self.mem_bytes += n;
            self.mem.push_back(b);
            return Ok(());
        }
        let f = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(tempfile::tempfile().map_err(|e| {
                Error::internal(format!("creating a spool file for a slow client: {e}"))
            })?),
        };
        let io = |e: std::io::Error| Error::internal(format!("writing the spool file: {e}"));
        f.seek(SeekFrom::Start(self.file_write)).map_err(io)?;
        f.write_all(&(n as u32).to_le_bytes()).map_err(io)?;
        f.write_all(&b).map_err(io)?;
        self.file_write += 4 + n;
        Ok(())
    }

    /// The next queued chunk (memory, then file), without removing it from the budget yet.
    fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        if let Some(b) = self.mem.pop_front() {
            self.mem_bytes -= b.len() as u64;
            return Ok(Some(b));
        }
        let Some(f) = &mut self.file else {
            return Ok(None);
        };
        if self.file_read >= self.file_write {
            return Ok(None);
        }
        let io = |e: std::io::Error| Error::internal(format!("reading the spool file: {e}"));
        f.seek(SeekFrom::Start(self.file_read)).map_err(io)?;
        let mut len = [0u8; 4];
        f.read_exact(&mut len).map_err(io)?;
        let n = u32::from_le_bytes(len) as usize;
        let mut buf = vec![0u8; n];
        f.read_exact(&mut buf).map_err(io)?;
        self.file_read += 4 + n as u64;
        if self.file_read >= self.file_write {
            // Everything read: start the file over.
            self.file_read = 0;
            self.file_write = 0;
            let _ = f.set_len(0);
        }
        Ok(Some(Bytes::from(buf)))
    }

    fn sent(&mut self, n: u64) {
        self.queued -= n;
        self.limits.total.fetch_sub(n, Ordering::Relaxed);
    }

    /// Move queued chunks into the channel while it has room.
    fn pump(&mut self) -> Result<()> {
        while !self.is_idle() {
            let tx = self.tx.clone();
            let permit = match tx.try_reserve() {
                Ok(p) => p,
                Err(TrySendError::Full(())) => return Ok(()),
                Err(TrySendError::Closed(())) => return Err(gone()),
            };
            let Some(b) = self.next_chunk()? else {
                break;
            };
            self.sent(b.len() as u64);
            permit.send(Msg::Data(b, self.summary));
        }
        Ok(())
    }

    /// After the query ended (its connection is free again): deliver what is queued, then `last`
    /// (the final `Done`, or the error that ended the query). Gives up when the client takes
    /// nothing for `send_timeout` or went away.
    pub(crate) async fn drain(mut self, last: Msg) {
        loop {
            let next = match self.next_chunk() {
                Ok(Some(b)) => {
                    self.sent(b.len() as u64);
                    Msg::Data(b, self.summary)
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = self.tx.send(Msg::Error(e)).await;
                    return;
                }
            };
            match tokio::time::timeout(self.limits.send_timeout, self.tx.send(next)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return,
            }
        }
        let _ = tokio::time::timeout(self.limits.send_timeout, self.tx.send(last)).await;
    }

    /// Send `last` straight away when nothing is queued (the common case, from the SQLite
    /// thread); otherwise hand it back for [`drain`](Self::drain).
    pub(crate) fn try_finish(&mut self, last: Msg) -> Option<Msg> {
        let _ = self.pump();
        if !self.is_idle() {
            return Some(last);
        }
        match self.tx.try_send(last) {
            Ok(()) | Err(TrySendError::Closed(_)) => None,
            Err(TrySendError::Full(m)) => Some(m),
        }
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        // Whatever is still queued (client gone, error) leaves the server-wide budget.
        self.limits.total.fetch_sub(self.queued, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(i: u8, n: usize) -> Bytes {
        Bytes::from(vec![i; n])
    }

    #[tokio::test]
    async fn queues_in_memory_then_file_and_drains_in_order() {
        let (tx, mut rx) = mpsc::channel(2);
        let limits = SpoolLimits {
            memory: 100,
            ..Default::default()
        };
        let total = Arc::clone(&limits.total);
        let mut sp = Spool::new(tx, limits);
        for i in 0..20u8 {
            sp.push(chunk(i, 40), Summary::default()).unwrap();
        }
        assert!(sp.file.is_some(), "spilled past the memory bound");
        assert_eq!(total.load(Ordering::Relaxed), 18 * 40);
        let last = sp.try_finish(Msg::Done(Bytes::from_static(b"end"), Summary::default()));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(m) = rx.recv().await {
                match m {
                    Msg::Data(b, _) => got.push(b[0]),
                    Msg::Done(b, _) => {
                        assert_eq!(&b[..], b"end");
                        break;
                    }
                    Msg::Error(e) => panic!("{e:?}"),
                }
            }
            got
        });
        sp.drain(last.expect("queued chunks keep the final message")).await;
        assert_eq!(reader.await.unwrap(), (0..20u8).collect::<Vec<_>>());
        assert_eq!(total.load(Ordering::Relaxed), 0, "budget returned");
    }

    #[test]
    fn bounds_are_enforced_and_returned_on_drop() {
        let (tx, _rx) = mpsc::channel(1);
        let limits = SpoolLimits {
            memory: 10,
            per_request: 100,
            ..Default::default()
        };
        let total = Arc::clone(&limits.total);
        let mut sp = Spool::new(tx, limits);
        sp.push(chunk(1, 50), Summary::default()).unwrap(); // into the channel
        sp.push(chunk(2, 50), Summary::default()).unwrap(); // queued (file)
        sp.push(chunk(3, 50), Summary::default()).unwrap(); // queued
        let e = sp.push(chunk(4, 50), Summary::default()).unwrap_err();
        assert_eq!(e.code, ErrorCode::TooManyRowsOrBytes);
        assert!(e.message.contains("spool_disk"), "{}", e.message);
        drop(sp);
        assert_eq!(total.load(Ordering::Relaxed), 0);

        let (tx, _rx) = mpsc::channel(1);
        let shared = SpoolLimits {
            total_limit: 60,
            ..Default::default()
        };
        let mut sp = Spool::new(tx, shared);
        sp.push(chunk(1, 50), Summary::default()).unwrap();
        sp.push(chunk(2, 50), Summary::default()).unwrap();
        let e = sp.push(chunk(3, 50), Summary::default()).unwrap_err();
        assert!(e.message.contains("spool_total"), "{}", e.message);
    }

    #[test]
    fn a_closed_channel_is_a_cancel() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let mut sp = Spool::new(tx, SpoolLimits::default());
        let e = sp.push(chunk(1, 5), Summary::default()).unwrap_err();
        assert_eq!(e.code, ErrorCode::QueryWasCancelled);
    }
}
