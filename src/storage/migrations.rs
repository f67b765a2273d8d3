//! The engine's own schema, versioned. Each migration runs once, in order, inside one
//! transaction with its row in `_ichibase_migrations`. Components append their migrations
//! here; app tables are never touched.

use rusqlite::Connection;

/// One step of the engine schema.
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every engine migration, in order. Append only: never edit a released step.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "engine metadata",
    sql: "CREATE TABLE _ichibase_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
          INSERT INTO _ichibase_meta (key, value) VALUES
              ('instance_id', lower(hex(randomblob(16)))),
              ('created_at', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));",
}];

/// Apply every migration not yet recorded. Returns how many ran.
pub fn apply(conn: &mut Connection) -> anyhow::Result<usize> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS _ichibase_migrations (
            version INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
        ) STRICT",
    )?;
    let current: i64 = conn.query_row("SELECT coalesce(max(version), 0) FROM _ichibase_migrations", [], |r| r.get(0))?;
    let mut ran = 0;
    for m in MIGRATIONS.iter().filter(|m| m.version > current) {
        let tx = conn.transaction()?;
        tx.execute_batch(m.sql).map_err(|e| anyhow::anyhow!("engine migration {} ({}) failed: {e}", m.version, m.name))?;
        tx.execute("INSERT INTO _ichibase_migrations (version, name) VALUES (?1, ?2)", (m.version, m.name))?;
        tx.commit()?;
        tracing::info!(version = m.version, name = m.name, "applied engine migration");
        ran += 1;
    }
    Ok(ran)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_apply_once() {
        let mut c = Connection::open_in_memory().unwrap();
        assert_eq!(apply(&mut c).unwrap(), MIGRATIONS.len());
        assert_eq!(apply(&mut c).unwrap(), 0);
        let n: i64 = c.query_row("SELECT count(*) FROM _ichibase_migrations", [], |r| r.get(0)).unwrap();
        assert_eq!(n as usize, MIGRATIONS.len());
    }
}
