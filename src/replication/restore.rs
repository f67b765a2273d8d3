//! Restore: rebuild a database from a replica — the newest snapshot at or before the target,
//! then the change files that extend the transaction range furthest at each step (the same
//! plan Litestream v0.5 makes), applied page by page into a scratch file, checked with
//! `PRAGMA integrity_check`, then moved into place.
//!
//! Owns nothing but the output path; reads the target only.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use serde::Serialize;

use super::target::Target;
use super::{SNAPSHOT_LEVEL, ltx};

/// What to restore to (at most one of them; none = the newest state).
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Only changes captured before this instant (ms since the epoch).
    pub timestamp_ms: Option<i64>,
    /// Up to and including this transaction id.
    pub txid: Option<u64>,
    /// The newest state of the generation that starts at this transaction id.
    pub generation: Option<u64>,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// Replace an existing database at the output path.
    pub force: bool,
}

/// What a restore produced.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub path: PathBuf,
    pub txid: u64,
    /// Capture time of the last change applied.
    pub timestamp: String,
    pub snapshot_txid: u64,
    pub files: usize,
    pub bytes: u64,
    pub pages: u64,
    pub integrity: String,
}

/// One LTX object of the replica.
#[derive(Debug, Clone)]
pub struct RemoteFile {
    pub name: String,
    pub level: u32,
    pub min: u64,
    pub max: u64,
    pub size: u64,
    pub timestamp_ms: Option<i64>,
}

/// Every LTX file of the replica, by level.
pub async fn list_files(target: &Target) -> anyhow::Result<Vec<RemoteFile>> {
    let mut out = Vec::new();
    for f in target.list("").await? {
        let Some((level, name)) = target.parse_level_path(&f.name) else {
            continue;
        };
        let Some((min, max)) = ltx::parse_file_name(name) else {
            continue;
        };
        out.push(RemoteFile {
            name: f.name,
            level,
            min,
            max,
            size: f.size,
            timestamp_ms: None,
        });
    }
    out.sort_by_key(|f| (f.level, f.min, f.max));
    Ok(out)
}

/// Fill in the capture timestamps (from the LTX headers).
pub async fn load_timestamps(target: &Target, files: &mut [RemoteFile]) -> anyhow::Result<()> {
    let heads: Vec<anyhow::Result<i64>> = futures_util::stream::iter(files.iter())
        .map(|f| async move {
            let b = target.get_head(&f.name, ltx::HEADER_SIZE as u64).await?;
            Ok(ltx::Header::decode(&b)
                .with_context(|| format!("header of {}", f.name))?
                .timestamp_ms)
        })
        .buffered(16)
        .collect()
        .await;
    for (f, h) in files.iter_mut().zip(heads) {
        f.timestamp_ms = Some(h?);
    }
    Ok(())
}

/// Generations: snapshots whose transaction id no change file ends at (a new history began).
pub fn generations(files: &[RemoteFile]) -> Vec<u64> {
    let mut g: Vec<u64> = files
        .iter()
        .filter(|f| f.level == SNAPSHOT_LEVEL)
        .filter(|s| {
            !files
                .iter()
                .any(|f| f.level < SNAPSHOT_LEVEL && f.max == s.max)
        })
        .map(|s| s.max)
        .collect();
    g.sort_unstable();
    g.dedup();
    g
}

/// The files to apply, in order.
pub fn plan(
    files: &[RemoteFile],
    txid: Option<u64>,
    timestamp_ms: Option<i64>,
) -> anyhow::Result<Vec<RemoteFile>> {
    let ok = |f: &RemoteFile| {
        txid.is_none_or(|t| f.max <= t)
            && timestamp_ms.is_none_or(|t| f.timestamp_ms.is_some_and(|ts| ts < t))
    };
    let mut out: Vec<RemoteFile> = Vec::new();
    if let Some(s) = files
        .iter()
        .filter(|f| f.level == SNAPSHOT_LEVEL && ok(f))
        .max_by_key(|f| f.max)
    {
        out.push(s.clone());
    }
    let mut cur = out.last().map(|f| f.max).unwrap_or(0);
    loop {
        let next = files
            .iter()
            .filter(|f| f.level < SNAPSHOT_LEVEL && ok(f))
            .filter(|f| f.min <= cur + 1 && f.max > cur)
            .filter(|f| cur > 0 || f.min == 1)
            .max_by(|a, b| {
                a.max
                    .cmp(&b.max)
                    .then(b.min.cmp(&a.min))
                    .then(a.level.cmp(&b.level))
            });
        match next {
            Some(f) => {
                cur = f.max;
                out.push(f.clone());
            }
            None => break,
        }
    }
    if out.is_empty() {
        bail!("the replica holds no snapshot at or before the requested point");
    }
    if txid.is_none()
        && timestamp_ms.is_none()
        && let Some(beyond) = files
            .iter()
            .filter(|f| f.level < SNAPSHOT_LEVEL && f.max > cur)
            .min_by_key(|f| f.min)
    {
        bail!(
            "the replica is not contiguous: it restores up to transaction {cur:016x} but {} starts at {:016x}; restore with --txid or --timestamp to accept the older state",
            beyond.name,
            beyond.min
        );
    }
    Ok(out)
}

/// Restore the replica in `target` to `to`.
pub async fn restore(
    target: &Target,
    to: &Path,
    opts: &RestoreOptions,
) -> anyhow::Result<RestoreReport> {
    if to.exists() && !opts.force {
        bail!(
            "{} already exists; restore refuses to overwrite a database (use --force)",
            to.display()
        );
    }
    let mut files = list_files(target).await?;
    if files.is_empty() {
        bail!("no replica found at {}", target.url());
    }
    let mut txid = opts.txid;
    if let Some(g) = opts.generation {
        let gens = generations(&files);
        let Some(i) = gens.iter().position(|&x| x == g) else {
            bail!(
                "no generation {g:016x} in the replica (generations: {})",
                gens.iter()
                    .map(|g| format!("{g:016x}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        if let Some(next) = gens.get(i + 1) {
            txid = Some(next - 1);
        }
        // Start from this generation's snapshots, not an older generation's.
        files.retain(|f| !(f.level == SNAPSHOT_LEVEL && f.max < g));
    }
    if let Some(t) = opts.timestamp_ms {
        // Timestamps live in the LTX headers: read the snapshots' first, then only those of
        // the files after the snapshot the restore starts from.
        let (mut snaps, mut rest): (Vec<_>, Vec<_>) =
            files.into_iter().partition(|f| f.level == SNAPSHOT_LEVEL);
        load_timestamps(target, &mut snaps).await?;
        let from = snaps
            .iter()
            .filter(|f| f.timestamp_ms.is_some_and(|ts| ts < t))
            .map(|f| f.max)
            .max()
            .unwrap_or(0);
        rest.retain(|f| f.max > from);
        load_timestamps(target, &mut rest).await?;
        files = snaps;
        files.extend(rest);
    }
    let plan = plan(&files, txid, opts.timestamp_ms)?;
    let total: u64 = plan.iter().map(|f| f.size).sum();
    let bar = if opts.progress {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} restoring [{bar:40}] {bytes}/{total_bytes} ({eta}) {msg}",
            )
            .unwrap(),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let scratch = PathBuf::from(format!("{}.restoring", to.display()));
    let _ = std::fs::remove_file(&scratch);
    if let Some(d) = to.parent() {
        std::fs::create_dir_all(d)?;
    }
    let out = std::sync::Arc::new(std::sync::Mutex::new(
        OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?,
    ));
    // Downloads go to scratch files (a snapshot may be larger than memory), 8 at a time.
    let parts = PathBuf::from(format!("{}.parts", to.display()));
    let _ = std::fs::remove_dir_all(&parts);
    std::fs::create_dir_all(&parts)?;
    let parts2 = parts.clone();
    let mut downloads = futures_util::stream::iter(plan.iter().cloned().enumerate())
        .map(|(i, f)| {
            let p = parts2.join(format!("{i}.ltx"));
            async move { target.get_to_file(&f.name, &p).await.map(|n| (f, p, n)) }
        })
        .buffered(8);
    let mut last = None;
    let mut pages = 0u64;
    while let Some(r) = downloads.next().await {
        let (f, part, n) = r?;
        bar.set_message(f.name.clone());
        let out2 = std::sync::Arc::clone(&out);
        let d = tokio::task::spawn_blocking(move || -> anyhow::Result<(ltx::Decoded, u64)> {
            let mut out = out2.lock().unwrap();
            let mut n = 0u64;
            let mut ps = 0u64;
            let input = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&part)?);
            let dec = ltx::decode(input, |pgno, page| {
                ps = page.len() as u64;
                out.seek(SeekFrom::Start((pgno as u64 - 1) * ps))?;
                out.write_all(page)?;
                n += 1;
                Ok(())
            })
            .with_context(|| format!("applying {}", f.name))?;
            out.set_len(dec.header.commit as u64 * dec.header.page_size as u64)?;
            let _ = std::fs::remove_file(&part);
            Ok((dec, n))
        })
        .await??;
        pages += d.1;
        bar.inc(n);
        last = Some(d.0.header);
    }
    bar.finish_and_clear();
    let _ = std::fs::remove_dir_all(&parts);
    out.lock().unwrap().sync_all()?;
    drop(out);
    let last = last.context("nothing was applied")?;
    let integrity = {
        let p = scratch.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
            let c = rusqlite::Connection::open(&p)?;
            let r: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
            c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
            Ok(r)
        })
        .await??
    };
    if integrity != "ok" {
        bail!(
            "the restored database failed PRAGMA integrity_check: {integrity} (left at {})",
            scratch.display()
        );
    }
    for ext in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", scratch.display()));
        let _ = std::fs::remove_file(format!("{}{ext}", to.display()));
    }
    std::fs::rename(&scratch, to)?;
    Ok(RestoreReport {
        path: to.to_path_buf(),
        txid: last.max_txid,
        timestamp: super::iso(last.timestamp_ms),
        snapshot_txid: plan
            .first()
            .filter(|f| f.level == SNAPSHOT_LEVEL)
            .map(|f| f.max)
            .unwrap_or(0),
        files: plan.len(),
        bytes: total,
        pages,
        integrity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(level: u32, min: u64, max: u64, ts: i64) -> RemoteFile {
        RemoteFile {
            name: format!("{level}/{}", ltx::file_name(min, max)),
            level,
            min,
            max,
            size: 1,
            timestamp_ms: Some(ts),
        }
    }

    #[test]
    fn plan_takes_the_newest_snapshot_then_the_longest_steps() {
        let files = vec![
            f(SNAPSHOT_LEVEL, 1, 1, 10),
            f(SNAPSHOT_LEVEL, 1, 4, 40),
            f(0, 2, 2, 20),
            f(0, 3, 3, 30),
            f(0, 4, 4, 40),
            f(0, 5, 5, 50),
            f(1, 5, 7, 70),
            f(0, 6, 6, 60),
            f(0, 7, 7, 70),
            f(0, 8, 8, 80),
        ];
        let p: Vec<(u32, u64, u64)> = plan(&files, None, None)
            .unwrap()
            .iter()
            .map(|f| (f.level, f.min, f.max))
            .collect();
        assert_eq!(p, vec![(9, 1, 4), (1, 5, 7), (0, 8, 8)]);
        // Up to a transaction id: the compacted file would overshoot, so level 0 is used.
        let p: Vec<u64> = plan(&files, Some(6), None)
            .unwrap()
            .iter()
            .map(|f| f.max)
            .collect();
        assert_eq!(p, vec![4, 5, 6]);
        // Before a timestamp: the older snapshot and the changes captured before it.
        let p: Vec<u64> = plan(&files, None, Some(35))
            .unwrap()
            .iter()
            .map(|f| f.max)
            .collect();
        assert_eq!(p, vec![1, 2, 3]);
        assert!(plan(&files, None, Some(5)).is_err());
    }

    #[test]
    fn a_gap_fails_a_newest_restore_and_generations_are_found() {
        let files = vec![
            f(SNAPSHOT_LEVEL, 1, 1, 10),
            f(0, 2, 2, 20),
            f(0, 4, 4, 40),
            f(SNAPSHOT_LEVEL, 1, 6, 60),
            f(0, 7, 7, 70),
        ];
        // Newest: the second generation's snapshot, no gap after it.
        assert_eq!(plan(&files, None, None).unwrap().len(), 2);
        assert_eq!(generations(&files), vec![1, 6]);
        let without_second = &files[..3];
        let e = plan(without_second, None, None).unwrap_err().to_string();
        assert!(e.contains("not contiguous"), "{e}");
        assert_eq!(plan(without_second, Some(2), None).unwrap().len(), 2);
    }
}
