//! Parquet offload: the posterity archive's files (`<data_dir>/archive/kind=…/date=…/*.parquet`)
//! kept in the replication target under `archive/<same relative path>`, and fetched back on a
//! box that lacks them (a fresh machine after `serve --restore-if-missing`, or a lost disk), so
//! analytics (`log_all`) sees the whole history again.
//!
//! Sync is by name: upload what the target lacks, download what the local archive lacks. Files
//! are immutable once archived, so a name is a version. Objects are checksummed and encrypted by
//! the target like every replica object. Must not touch the DuckDB database itself: adopting
//! fetched files is `Posterity::adopt_archive_files`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;

use super::Target;

/// Object prefix of archived Parquet files in the target (beside Litestream's level dirs).
pub const ARCHIVE_PREFIX: &str = "archive";

/// What one sync did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncReport {
    /// Object names uploaded.
    pub uploaded: Vec<String>,
    /// Local files downloaded.
    pub downloaded: Vec<PathBuf>,
}

/// `kind=…/date=…/name.parquet` of a file under `archive_dir`, if it is an archive file.
fn relative(archive_dir: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(archive_dir).ok()?;
    let parts: Vec<&str> = rel.iter().filter_map(|p| p.to_str()).collect();
    let ok = parts.len() == 3
        && parts[0].starts_with("kind=")
        && parts[1].starts_with("date=")
        && parts[2].ends_with(".parquet")
        && !parts[2].starts_with('.')
        && parts.iter().all(|p| !p.contains("..") && !p.is_empty());
    ok.then(|| parts.join("/"))
}

fn local_files(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                local_files(&p, out);
            } else {
                out.push(p);
            }
        }
    }
}

/// Upload every archive file of `archive_dir` the target does not have yet.
pub async fn upload_missing(target: &Target, archive_dir: &Path) -> anyhow::Result<Vec<String>> {
    let remote: HashSet<String> = target
        .list(ARCHIVE_PREFIX)
        .await?
        .into_iter()
        .map(|l| l.name)
        .collect();
    let mut files = Vec::new();
    local_files(archive_dir, &mut files);
    files.sort();
    let mut uploaded = Vec::new();
    for f in files {
        let Some(rel) = relative(archive_dir, &f) else {
            continue;
        };
        let key = format!("{ARCHIVE_PREFIX}/{rel}");
        if remote.contains(&key) {
            continue;
        }
        target
            .put_file(&key, &f)
            .await
            .with_context(|| format!("uploading {}", f.display()))?;
        uploaded.push(key);
    }
    Ok(uploaded)
}

/// Download every archive object the local `archive_dir` lacks (written to a temporary name,
/// then renamed, so a partial download is never mistaken for a file).
pub async fn download_missing(target: &Target, archive_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for obj in target.list(ARCHIVE_PREFIX).await? {
        let Some(rel) = obj.name.strip_prefix(&format!("{ARCHIVE_PREFIX}/")) else {
            continue;
        };
        let path = archive_dir.join(rel);
        if relative(archive_dir, &path).as_deref() != Some(rel) {
            tracing::warn!(object = %obj.name, "archive: skipping an object that is not an archive file");
            continue;
        }
        if path.exists() {
            continue;
        }
        let parent = path.parent().context("archive path without a parent")?;
        tokio::fs::create_dir_all(parent).await?;
        let tmp = parent.join(format!(
            ".fetch-{}.tmp",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("x")
        ));
        target
            .get_to_file(&obj.name, &tmp)
            .await
            .with_context(|| format!("downloading {}", obj.name))?;
        tokio::fs::rename(&tmp, &path).await?;
        out.push(path);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hive_partitioned_parquet_files_count() {
        let d = Path::new("/data/archive");
        assert_eq!(
            relative(
                d,
                Path::new("/data/archive/kind=http/date=2026-11-25/a.parquet")
            )
            .as_deref(),
            Some("kind=http/date=2026-11-25/a.parquet")
        );
        for bad in [
            "/data/archive/kind=http/a.parquet",
            "/data/archive/kind=http/date=2026-11-25/.part-1.tmp",
            "/data/archive/kind=http/date=2026-11-25/a.csv",
            "/data/archive/x/date=1/a.parquet",
            "/data/other/kind=http/date=2026-11-25/a.parquet",
        ] {
            assert_eq!(relative(d, Path::new(bad)), None, "{bad}");
        }
    }
}

/// Bring the local archive and the target's copy together: fetch what is missing here (and
/// adopt it into the posterity database), then upload what the target lacks.
pub async fn sync(
    target: &Target,
    posterity: &crate::posterity::Posterity,
) -> anyhow::Result<SyncReport> {
    let dir = posterity.options().archive_dir();
    let downloaded = download_missing(target, &dir).await?;
    if !downloaded.is_empty() {
        let (p, files) = (posterity.clone(), downloaded.clone());
        tokio::task::spawn_blocking(move || p.adopt_archive_files(&files))
            .await?
            .map_err(|e| anyhow::anyhow!("adopting fetched archive files: {e}"))?;
    }
    let uploaded = upload_missing(target, &dir).await?;
    if !uploaded.is_empty() || !downloaded.is_empty() {
        tracing::info!(
            uploaded = uploaded.len(),
            downloaded = downloaded.len(),
            "archive: Parquet files synced with the replica target"
        );
    }
    Ok(SyncReport {
        uploaded,
        downloaded,
    })
}
