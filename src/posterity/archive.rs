//! The Parquet archive ("life memory"): old log rows rolled into one Parquet file per kind and
//! day, hive-partitioned as `<data_dir>/archive/kind=<kind>/date=<YYYY-MM-DD>/part-<id>.parquet`,
//! and read together with the live log through the `log_all` view.
//!
//! One partition at a time, inside one DuckDB transaction: the rows are copied to a hidden
//! temporary file, the file is fsynced and renamed into place (and its directory fsynced), then
//! the same rows (same snapshot) are deleted from the live table and the file is recorded in
//! `archive_files`; the transaction commits. A crash before the commit leaves a file that
//! `archive_files` does not list while its rows are still live: [`recover`] (run at every open)
//! removes such files, so no row is ever both archived and live, nor lost. The returned
//! [`ArchivedFile`]s (and the `archive_files` table) are the hook for shipping files elsewhere.

use std::path::{Path, PathBuf};

use duckdb::Connection;

use super::{LOG_COLUMNS, Posterity, duck_err, path_literal, sql_str};
use crate::core::{Error, Result};

/// A Parquet file the archive wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ArchivedFile {
    pub path: PathBuf,
    pub kind: String,
    pub day: String,
    pub rows: u64,
    pub bytes: u64,
}

/// Columns stored in the Parquet files: the log's, less `kind` (it is in the path).
fn file_columns() -> String {
    LOG_COLUMNS
        .split(", ")
        .filter(|c| *c != "kind")
        .collect::<Vec<_>>()
        .join(", ")
}

fn parquet_files(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                parquet_files(&p, out);
            } else {
                out.push(p);
            }
        }
    }
}

fn any_parquet(dir: &Path) -> bool {
    let mut files = Vec::new();
    parquet_files(dir, &mut files);
    files
        .iter()
        .any(|p| p.extension().is_some_and(|e| e == "parquet"))
}

/// Remove files of runs that did not commit (see the module docs).
pub(super) fn recover(conn: &Connection, dir: &Path) -> anyhow::Result<()> {
    let mut files = Vec::new();
    parquet_files(dir, &mut files);
    if files.is_empty() {
        return Ok(());
    }
    let mut st = conn.prepare("SELECT path FROM archive_files")?;
    let known: std::collections::HashSet<String> = st
        .query_map([], |r| r.get::<_, String>(0))?
        .flatten()
        .collect();
    for f in files {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let stale_tmp = name.starts_with(".part-") && name.ends_with(".tmp");
        let orphan = name.ends_with(".parquet") && !known.contains(&f.display().to_string());
        if stale_tmp || orphan {
            tracing::warn!(file = %f.display(), "archive: removing a file of an interrupted run (its rows are still live)");
            std::fs::remove_file(&f)?;
        }
    }
    Ok(())
}

/// (Re)create `log_all` (live + archive) and the per-kind views over it.
pub(super) fn create_views(conn: &Connection, dir: &Path) -> anyhow::Result<()> {
    let archived = if any_parquet(dir) {
        let glob = path_literal(&dir.join("*/*/*.parquet"));
        format!(
            "\nUNION ALL\nSELECT {LOG_COLUMNS} FROM read_parquet({glob}, hive_partitioning = true, hive_types = {{'kind': VARCHAR, 'date': DATE}}, union_by_name = true)"
        )
    } else {
        String::new()
    };
    conn.execute_batch(&format!(
        "CREATE OR REPLACE VIEW log_all AS SELECT {LOG_COLUMNS} FROM log{archived};
         CREATE OR REPLACE VIEW http_requests AS
           SELECT ts, method, name AS path, status, elapsed_ms AS latency_ms, bytes, user_id, role,
                  query_id, trace_id
           FROM log_all WHERE kind = 'http';
         CREATE OR REPLACE VIEW sql_statements AS
           SELECT ts, name AS hash, detail->>'verb' AS verb, rows, elapsed_ms, outcome, error,
                  user_id, role, query_id, trace_id
           FROM log_all WHERE kind = 'sql';
         CREATE OR REPLACE VIEW lua_invocations AS
           SELECT ts, name AS function, version, outcome, error,
                  CAST(detail->>'instructions' AS BIGINT) AS instructions,
                  CAST(detail->>'cpu_ms' AS DOUBLE) AS cpu_ms,
                  CAST(detail->>'memory' AS BIGINT) AS memory,
                  elapsed_ms, trace_id, user_id, role
           FROM log_all WHERE kind = 'lua';
         CREATE OR REPLACE VIEW ai_calls AS
           SELECT ts, name AS model, outcome, error, elapsed_ms,
                  CAST(detail->>'input_tokens' AS BIGINT) AS input_tokens,
                  CAST(detail->>'output_tokens' AS BIGINT) AS output_tokens,
                  CAST(detail->>'attempts' AS INTEGER) AS attempts,
                  detail->>'purpose' AS purpose, detail->>'generation' AS generation,
                  CAST(detail->>'round' AS INTEGER) AS round, user_id, role
           FROM log_all WHERE kind = 'ai';"
    ))?;
    Ok(())
}

fn fsync_dir(p: &Path) -> std::io::Result<()> {
    std::fs::File::open(p)?.sync_all()
}

impl Posterity {
    /// Archive every log row older than `before` (a `YYYY-MM-DD` date, UTC; default: today
    /// minus `archive_after_days`, so only complete days move). Blocking.
    pub fn archive(&self, before: Option<&str>) -> Result<Vec<ArchivedFile>> {
        let _one_at_a_time = self.archive_lock();
        let conn = self.connect()?;
        let dir = self.options().archive_dir();
        let cutoff: String = match before {
            Some(d) => conn
                .query_row("SELECT CAST(CAST(? AS DATE) AS VARCHAR)", [d], |r| r.get(0))
                .map_err(|e| {
                    Error::new(
                        crate::core::ErrorCode::BadArguments,
                        format!("archive: '{d}' is not a date (YYYY-MM-DD): {e}"),
                    )
                })?,
            None => {
                let today = super::now_us().div_euclid(86_400_000_000);
                conn.query_row(
                    "SELECT CAST(DATE '1970-01-01' + CAST(? AS INTEGER) AS VARCHAR)",
                    [today - i64::from(self.options().archive_after_days)],
                    |r| r.get(0),
                )
                .map_err(duck_err)?
            }
        };
        let parts: Vec<(String, String)> = {
            let mut st = conn
                .prepare(
                    "SELECT DISTINCT kind, CAST(CAST(ts AS DATE) AS VARCHAR) FROM log
                     WHERE ts < CAST(? AS DATE) ORDER BY 2, 1",
                )
                .map_err(duck_err)?;
            st.query_map([&cutoff], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(duck_err)?
                .flatten()
                .collect()
        };
        let mut written = Vec::new();
        for (kind, day) in parts {
            match archive_partition(&conn, &dir, &kind, &day) {
                Ok(Some(f)) => written.push(f),
                Ok(None) => {}
                Err(e) => {
                    let _ = conn.execute_batch("ROLLBACK");
                    // Views must still describe what is on disk.
                    let _ = create_views(&conn, &dir);
                    return Err(e);
                }
            }
        }
        if !written.is_empty() {
            create_views(&conn, &dir)
                .map_err(|e| Error::internal(format!("archive views: {e}")))?;
            let _ = conn.execute_batch("CHECKPOINT");
        }
        Ok(written)
    }

    /// Take archive files that arrived from elsewhere (fetched back from the replica target)
    /// into the archive: recorded in `archive_files` (so start-up recovery keeps them) and
    /// visible through `log_all`. Files already recorded are skipped. Blocking.
    pub fn adopt_archive_files(&self, files: &[PathBuf]) -> Result<usize> {
        let _one_at_a_time = self.archive_lock();
        let conn = self.connect()?;
        let dir = self.options().archive_dir();
        let mut adopted = 0;
        for f in files {
            let path = f.display().to_string();
            let known: i64 = conn
                .query_row(
                    "SELECT count(*) FROM archive_files WHERE path = ?",
                    [&path],
                    |r| r.get(0),
                )
                .map_err(duck_err)?;
            if known > 0 {
                continue;
            }
            let part = |prefix: &str| -> Option<String> {
                f.ancestors()
                    .filter_map(|a| {
                        a.file_name()?
                            .to_str()?
                            .strip_prefix(prefix)
                            .map(str::to_string)
                    })
                    .next()
            };
            let (Some(kind), Some(day)) = (part("kind="), part("date=")) else {
                return Err(Error::new(
                    crate::core::ErrorCode::BadArguments,
                    format!("archive: {path} is not under kind=…/date=…"),
                ));
            };
            let rows: i64 = conn
                .query_row(
                    &format!("SELECT count(*) FROM read_parquet({})", path_literal(f)),
                    [],
                    |r| r.get(0),
                )
                .map_err(duck_err)?;
            let bytes = std::fs::metadata(f).map(|m| m.len()).unwrap_or(0) as i64;
            conn.execute(
                "INSERT INTO archive_files VALUES (?, ?, CAST(? AS DATE), ?, ?, ?)",
                duckdb::params![
                    path,
                    kind,
                    day,
                    rows,
                    bytes,
                    super::ts_value(super::now_us())
                ],
            )
            .map_err(duck_err)?;
            adopted += 1;
        }
        if adopted > 0 {
            create_views(&conn, &dir)
                .map_err(|e| Error::internal(format!("archive views: {e}")))?;
        }
        Ok(adopted)
    }
}

fn archive_partition(
    conn: &Connection,
    dir: &Path,
    kind: &str,
    day: &str,
) -> Result<Option<ArchivedFile>> {
    if !kind.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(Error::internal(format!(
            "archive: unexpected kind '{kind}'"
        )));
    }
    let pdir = dir.join(format!("kind={kind}")).join(format!("date={day}"));
    std::fs::create_dir_all(&pdir).map_err(|e| Error::internal(format!("archive: {e}")))?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let tmp = pdir.join(format!(".part-{id}.tmp"));
    let file = pdir.join(format!("part-{id}.parquet"));
    let filter = format!(
        "kind = {} AND ts >= CAST({d} AS DATE) AND ts < CAST({d} AS DATE) + INTERVAL 1 DAY",
        sql_str(kind),
        d = sql_str(day)
    );
    conn.execute_batch("BEGIN TRANSACTION").map_err(duck_err)?;
    let rows: u64 = conn
        .query_row(
            &format!("SELECT count(*) FROM log WHERE {filter}"),
            [],
            |r| r.get::<_, i64>(0),
        )
        .map_err(duck_err)? as u64;
    if rows == 0 {
        conn.execute_batch("ROLLBACK").map_err(duck_err)?;
        return Ok(None);
    }
    conn.execute_batch(&format!(
        "COPY (SELECT {} FROM log WHERE {filter} ORDER BY ts) TO {} (FORMAT parquet, COMPRESSION zstd)",
        file_columns(),
        path_literal(&tmp)
    ))
    .map_err(duck_err)?;
    let io = |e: std::io::Error| Error::internal(format!("archive: {}: {e}", file.display()));
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, &file).map_err(io)?;
    fsync_dir(&pdir).map_err(io)?;
    let bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    let deleted = conn
        .execute(&format!("DELETE FROM log WHERE {filter}"), [])
        .map_err(duck_err)? as u64;
    if deleted != rows {
        conn.execute_batch("ROLLBACK").map_err(duck_err)?;
        let _ = std::fs::remove_file(&file);
        return Err(Error::internal(format!(
            "archive: {kind} {day}: copied {rows} rows but would delete {deleted}; nothing archived"
        )));
    }
    conn.execute(
        "INSERT INTO archive_files VALUES (?, ?, CAST(? AS DATE), ?, ?, ?)",
        duckdb::params![
            file.display().to_string(),
            kind,
            day,
            rows as i64,
            bytes as i64,
            super::ts_value(super::now_us())
        ],
    )
    .map_err(duck_err)?;
    conn.execute_batch("COMMIT").map_err(duck_err)?;
    Ok(Some(ArchivedFile {
        path: file,
        kind: kind.to_string(),
        day: day.to_string(),
        rows,
        bytes,
    }))
}
