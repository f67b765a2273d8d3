//! Deployed UIs, versioned, in the canvas module's own tables.
//!
//! A UI is keyed by its name and its target (`user:<id>` or a channel): every deploy adds a
//! version (TSX source, compiled JavaScript, CSS, props, position map) and makes it current;
//! rollback moves the head back. Runs on storage connections as the engine, after the caller
//! was checked. Touches only `_ichibase_ui_*`.

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Value as Json, json};

use super::compile::Compiled;
use crate::core::{Error, ErrorCode, Result};
use crate::storage::migrations::Migration;

pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "ui versions and heads",
    sql: "CREATE TABLE _ichibase_ui_versions (
            name TEXT NOT NULL,
            target TEXT NOT NULL,
            version INTEGER NOT NULL,
            source TEXT NOT NULL,
            js TEXT NOT NULL,
            css TEXT NOT NULL,
            props TEXT NOT NULL,
            map TEXT NOT NULL,
            hash TEXT NOT NULL,
            created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
            created_by TEXT,
            PRIMARY KEY (name, target, version)
          ) STRICT;
          CREATE INDEX _ichibase_ui_versions_hash ON _ichibase_ui_versions (hash);
          CREATE TABLE _ichibase_ui_heads (
            name TEXT NOT NULL,
            target TEXT NOT NULL,
            version INTEGER NOT NULL,
            updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
            PRIMARY KEY (name, target)
          ) STRICT;
          CREATE INDEX _ichibase_ui_heads_updated ON _ichibase_ui_heads (updated_at);",
}];

/// What a canvas needs to mount one UI (no TSX source, no map).
pub fn mount_json(name: &str, target: &str, version: i64, hash: &str, css: &str, props: &str) -> Json {
    json!({
        "name": name, "target": target, "version": version, "hash": hash, "css": css,
        "props": serde_json::from_str::<Json>(props).unwrap_or(Json::Null),
    })
}

/// Store a new version and make it current; returns the version number.
pub fn deploy(
    c: &mut Connection,
    name: &str,
    target: &str,
    source: &str,
    compiled: &Compiled,
    props: &Json,
    by: Option<&str>,
) -> Result<i64> {
    let tx = c.savepoint()?;
    let v: i64 = tx.query_row(
        "SELECT coalesce(max(version), 0) + 1 FROM _ichibase_ui_versions WHERE name = ?1 AND target = ?2",
        params![name, target],
        |r| r.get(0),
    )?;
    let map = serde_json::to_string(&compiled.map).unwrap_or_else(|_| "[]".into());
    tx.execute(
        "INSERT INTO _ichibase_ui_versions (name, target, version, source, js, css, props, map, hash, created_by)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![name, target, v, source, compiled.js, compiled.css, props.to_string(), map, compiled.hash, by],
    )?;
    tx.execute(
        "INSERT INTO _ichibase_ui_heads (name, target, version) VALUES (?1, ?2, ?3)
         ON CONFLICT (name, target) DO UPDATE SET version = excluded.version, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
        params![name, target, v],
    )?;
    tx.commit()?;
    Ok(v)
}

/// The mount description of version `version` (`None`: the current one).
pub fn mount(c: &Connection, name: &str, target: &str, version: Option<i64>) -> Result<Json> {
    c.query_row(
        "SELECT v.version, v.hash, v.css, v.props FROM _ichibase_ui_versions v
         JOIN _ichibase_ui_heads h ON h.name = v.name AND h.target = v.target
         WHERE v.name = ?1 AND v.target = ?2 AND v.version = coalesce(?3, h.version)",
        params![name, target, version],
        |r| {
            Ok(mount_json(
                name,
                target,
                r.get(0)?,
                &r.get::<_, String>(1)?,
                &r.get::<_, String>(2)?,
                &r.get::<_, String>(3)?,
            ))
        },
    )
    .optional()?
    .ok_or_else(|| not_found(name, target))
}

fn not_found(name: &str, target: &str) -> Error {
    Error::new(ErrorCode::NotFound, format!("No UI '{name}' for '{target}'"))
}

/// Current UIs for any of `targets`, in name order.
pub fn current_for(c: &Connection, targets: &[String]) -> Result<Vec<Json>> {
    let mut out = Vec::new();
    let mut st = c.prepare_cached(
        "SELECT h.name, v.version, v.hash, v.css, v.props FROM _ichibase_ui_heads h
         JOIN _ichibase_ui_versions v ON v.name = h.name AND v.target = h.target AND v.version = h.version
         WHERE h.target = ?1 ORDER BY h.name",
    )?;
    for t in targets {
        let rows = st
            .query_map([t], |r| {
                Ok(mount_json(
                    &r.get::<_, String>(0)?,
                    t,
                    r.get(1)?,
                    &r.get::<_, String>(2)?,
                    &r.get::<_, String>(3)?,
                    &r.get::<_, String>(4)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        out.extend(rows);
    }
    Ok(out)
}

/// Every current UI (admin listing).
pub fn list(c: &Connection) -> Result<Vec<Json>> {
    let mut st = c.prepare(
        "SELECT h.name, h.target, h.version, h.updated_at,
                (SELECT count(*) FROM _ichibase_ui_versions v WHERE v.name = h.name AND v.target = h.target)
         FROM _ichibase_ui_heads h ORDER BY h.name, h.target",
    )?;
    let rows = st
        .query_map([], |r| {
            Ok(json!({"name": r.get::<_, String>(0)?, "target": r.get::<_, String>(1)?, "version": r.get::<_, i64>(2)?,
                      "updated_at": r.get::<_, String>(3)?, "versions": r.get::<_, i64>(4)?}))
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// The versions of one UI.
pub fn versions(c: &Connection, name: &str, target: &str) -> Result<Vec<Json>> {
    let mut st = c.prepare(
        "SELECT v.version, v.created_at, v.created_by, v.version = h.version, length(v.source), v.hash
         FROM _ichibase_ui_versions v JOIN _ichibase_ui_heads h ON h.name = v.name AND h.target = v.target
         WHERE v.name = ?1 AND v.target = ?2 ORDER BY v.version",
    )?;
    let rows: Vec<Json> = st
        .query_map(params![name, target], |r| {
            Ok(json!({"version": r.get::<_, i64>(0)?, "created_at": r.get::<_, String>(1)?, "created_by": r.get::<_, Option<String>>(2)?,
                      "current": r.get::<_, bool>(3)?, "bytes": r.get::<_, i64>(4)?, "hash": r.get::<_, String>(5)?}))
        })?
        .collect::<rusqlite::Result<_>>()?;
    if rows.is_empty() {
        return Err(not_found(name, target));
    }
    Ok(rows)
}

/// The TSX source of a version (`None`: the current one).
pub fn source(c: &Connection, name: &str, target: &str, version: Option<i64>) -> Result<Json> {
    c.query_row(
        "SELECT v.version, v.source, v.props, v.created_at FROM _ichibase_ui_versions v
         JOIN _ichibase_ui_heads h ON h.name = v.name AND h.target = v.target
         WHERE v.name = ?1 AND v.target = ?2 AND v.version = coalesce(?3, h.version)",
        params![name, target, version],
        |r| {
            Ok(json!({"name": name, "target": target, "version": r.get::<_, i64>(0)?, "source": r.get::<_, String>(1)?,
                      "props": serde_json::from_str::<Json>(&r.get::<_, String>(2)?).unwrap_or(Json::Null),
                      "created_at": r.get::<_, String>(3)?}))
        },
    )
    .optional()?
    .ok_or_else(|| not_found(name, target))
}

/// Make `to` (default: the version before the current one) current; returns it.
pub fn rollback(c: &mut Connection, name: &str, target: &str, to: Option<i64>) -> Result<i64> {
    let tx = c.transaction()?;
    let live: Option<i64> = tx
        .query_row(
            "SELECT version FROM _ichibase_ui_heads WHERE name = ?1 AND target = ?2",
            params![name, target],
            |r| r.get(0),
        )
        .optional()?;
    let Some(live) = live else {
        return Err(not_found(name, target));
    };
    let found: Option<i64> = match to {
        Some(v) => tx
            .query_row(
                "SELECT version FROM _ichibase_ui_versions WHERE name = ?1 AND target = ?2 AND version = ?3",
                params![name, target, v],
                |r| r.get(0),
            )
            .optional()?,
        None => tx.query_row(
            "SELECT max(version) FROM _ichibase_ui_versions WHERE name = ?1 AND target = ?2 AND version < ?3",
            params![name, target, live],
            |r| r.get(0),
        )?,
    };
    let Some(v) = found else {
        return Err(Error::new(
            ErrorCode::NotFound,
            match to {
                Some(v) => format!("No version {v} of UI '{name}' for '{target}'"),
                None => format!("UI '{name}' for '{target}' has no version before {live}"),
            },
        ));
    };
    tx.execute(
        "UPDATE _ichibase_ui_heads SET version = ?3, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE name = ?1 AND target = ?2",
        params![name, target, v],
    )?;
    tx.commit()?;
    Ok(v)
}

/// Remove a UI with all its versions.
pub fn delete(c: &mut Connection, name: &str, target: &str) -> Result<()> {
    let tx = c.transaction()?;
    let n = tx.execute(
        "DELETE FROM _ichibase_ui_heads WHERE name = ?1 AND target = ?2",
        params![name, target],
    )?;
    if n == 0 {
        return Err(not_found(name, target));
    }
    tx.execute(
        "DELETE FROM _ichibase_ui_versions WHERE name = ?1 AND target = ?2",
        params![name, target],
    )?;
    tx.commit()?;
    Ok(())
}

/// Compiled JavaScript and CSS by hash (what the frame origin serves).
pub fn by_hash(c: &Connection, hash: &str) -> Result<Option<(String, String)>> {
    Ok(c
        .query_row(
            "SELECT js, css FROM _ichibase_ui_versions WHERE hash = ?1 LIMIT 1",
            [hash],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?)
}

/// The position map and TSX source of the UI version with this hash.
pub fn map_by_hash(c: &Connection, hash: &str) -> Result<Option<(String, i64, Vec<[u32; 4]>)>> {
    let row: Option<(String, i64, String)> = c
        .query_row(
            "SELECT name, version, map FROM _ichibase_ui_versions WHERE hash = ?1 LIMIT 1",
            [hash],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    Ok(row.map(|(n, v, m)| (n, v, serde_json::from_str(&m).unwrap_or_default())))
}

/// Heads changed at or after `since` (an `updated_at`), as mount descriptions, and the latest
/// `updated_at` seen. With `since = None`: nothing, just the latest.
pub fn changed_since(c: &Connection, since: Option<&str>) -> Result<(Vec<Json>, Option<String>)> {
    let latest: Option<String> = c.query_row("SELECT max(updated_at) FROM _ichibase_ui_heads", [], |r| r.get(0))?;
    let Some(since) = since else {
        return Ok((Vec::new(), latest));
    };
    let mut st = c.prepare_cached(
        "SELECT h.name, h.target, v.version, v.hash, v.css, v.props FROM _ichibase_ui_heads h
         JOIN _ichibase_ui_versions v ON v.name = h.name AND v.target = h.target AND v.version = h.version
         WHERE h.updated_at >= ?1 ORDER BY h.updated_at LIMIT 1000",
    )?;
    let rows = st
        .query_map([since], |r| {
            Ok(mount_json(
                &r.get::<_, String>(0)?,
                &r.get::<_, String>(1)?,
                r.get(2)?,
                &r.get::<_, String>(3)?,
                &r.get::<_, String>(4)?,
                &r.get::<_, String>(5)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok((rows, latest))
}
