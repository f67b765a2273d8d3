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
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
    name: "engine metadata",
    sql: "CREATE TABLE _ichibase_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
          INSERT INTO _ichibase_meta (key, value) VALUES
              ('instance_id', lower(hex(randomblob(16)))),
              ('created_at', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));",
    },
    Migration {
        version: 2,
        name: "identities, sessions, API keys, grants and policies",
        sql: "CREATE TABLE _ichibase_users (
                  id TEXT PRIMARY KEY,
                  email TEXT NOT NULL UNIQUE COLLATE NOCASE,
                  password_hash TEXT NOT NULL,
                  role TEXT NOT NULL DEFAULT 'user',
                  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
                  disabled_at TEXT
              ) STRICT;
              CREATE TABLE _ichibase_sessions (
                  id TEXT PRIMARY KEY,
                  user_id TEXT NOT NULL REFERENCES _ichibase_users(id) ON DELETE CASCADE,
                  secret_hash TEXT NOT NULL UNIQUE,
                  device TEXT,
                  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
                  last_used_at TEXT,
                  expires_at INTEGER NOT NULL,
                  revoked_at TEXT
              ) STRICT;
              CREATE INDEX _ichibase_sessions_user ON _ichibase_sessions(user_id);
              CREATE TABLE _ichibase_api_keys (
                  id TEXT PRIMARY KEY,
                  name TEXT NOT NULL,
                  key_hash TEXT NOT NULL UNIQUE,
                  role TEXT NOT NULL,
                  user_id TEXT REFERENCES _ichibase_users(id) ON DELETE CASCADE,
                  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
                  revoked_at TEXT
              ) STRICT;
              CREATE TABLE _ichibase_grants (
                  object TEXT NOT NULL,
                  role TEXT NOT NULL,
                  privilege TEXT NOT NULL CHECK (privilege IN ('select', 'insert', 'update', 'delete', 'ddl')),
                  PRIMARY KEY (object, role, privilege)
              ) STRICT;
              CREATE TABLE _ichibase_policies (
                  name TEXT PRIMARY KEY,
                  table_name TEXT NOT NULL,
                  roles TEXT NOT NULL,
                  operations TEXT NOT NULL,
                  using_expr TEXT NOT NULL,
                  check_expr TEXT,
                  defaults TEXT NOT NULL DEFAULT '{}',
                  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
              ) STRICT;
              INSERT INTO _ichibase_meta (key, value) VALUES ('authz_version', '0');
              CREATE TRIGGER _ichibase_grants_ins AFTER INSERT ON _ichibase_grants BEGIN
                  UPDATE _ichibase_meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'authz_version';
              END;
              CREATE TRIGGER _ichibase_grants_upd AFTER UPDATE ON _ichibase_grants BEGIN
                  UPDATE _ichibase_meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'authz_version';
              END;
              CREATE TRIGGER _ichibase_grants_del AFTER DELETE ON _ichibase_grants BEGIN
                  UPDATE _ichibase_meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'authz_version';
              END;",
    },
    Migration {
        version: 3,
        name: "Lua functions and traces",
        sql: "CREATE TABLE _ichibase_functions (
                  name TEXT NOT NULL,
                  version INTEGER NOT NULL,
                  source TEXT NOT NULL,
                  trace INTEGER NOT NULL DEFAULT 0,
                  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
                  created_by TEXT,
                  PRIMARY KEY (name, version)
              ) STRICT;
              CREATE TABLE _ichibase_function_heads (
                  name TEXT PRIMARY KEY,
                  version INTEGER NOT NULL,
                  updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
              ) STRICT;
              CREATE TABLE _ichibase_traces (
                  id TEXT PRIMARY KEY,
                  function TEXT NOT NULL,
                  version INTEGER NOT NULL,
                  user_id TEXT,
                  role TEXT NOT NULL,
                  started_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
                  elapsed_ms REAL NOT NULL,
                  outcome TEXT NOT NULL,
                  error TEXT,
                  error_line INTEGER,
                  instructions INTEGER NOT NULL,
                  peak_memory INTEGER NOT NULL,
                  steps INTEGER NOT NULL,
                  truncated INTEGER NOT NULL,
                  result TEXT,
                  logs TEXT
              ) STRICT;
              CREATE TABLE _ichibase_trace_steps (
                  trace_id TEXT NOT NULL REFERENCES _ichibase_traces(id) ON DELETE CASCADE,
                  step INTEGER NOT NULL,
                  line INTEGER NOT NULL,
                  depth INTEGER NOT NULL,
                  function TEXT NOT NULL,
                  source TEXT NOT NULL,
                  locals TEXT NOT NULL,
                  upvalues TEXT NOT NULL,
                  after INTEGER NOT NULL,
                  PRIMARY KEY (trace_id, step)
              ) STRICT, WITHOUT ROWID;",
    },
    Migration {
        version: 4,
        name: "change data capture",
        sql: "CREATE TABLE _ichibase_changes (
                  id INTEGER PRIMARY KEY,
                  tbl TEXT NOT NULL,
                  op TEXT NOT NULL,
                  pk TEXT NOT NULL,
                  old TEXT,
                  new TEXT,
                  at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
              );
              CREATE TABLE _ichibase_cdc_tables (name TEXT PRIMARY KEY, enabled_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))) STRICT;",
    },
    Migration {
        version: 5,
        name: "bundles, generations and their rounds",
        sql: "CREATE TABLE _ichibase_bundles (
                  id INTEGER PRIMARY KEY,
                  name TEXT NOT NULL,
                  bundle TEXT NOT NULL,
                  applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
                  applied_by TEXT,
                  generation_id TEXT
              ) STRICT;
              CREATE TABLE _ichibase_generations (
                  id TEXT PRIMARY KEY,
                  intent TEXT NOT NULL,
                  status TEXT NOT NULL,
                  model TEXT,
                  branch TEXT,
                  rounds INTEGER NOT NULL DEFAULT 0,
                  input_tokens INTEGER NOT NULL DEFAULT 0,
                  output_tokens INTEGER NOT NULL DEFAULT 0,
                  bundle TEXT,
                  error TEXT,
                  created_by TEXT,
                  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
                  finished_at TEXT
              ) STRICT;
              CREATE TABLE _ichibase_generation_rounds (
                  generation_id TEXT NOT NULL REFERENCES _ichibase_generations(id) ON DELETE CASCADE,
                  round INTEGER NOT NULL,
                  prompt TEXT NOT NULL,
                  answer TEXT,
                  outcome TEXT NOT NULL,
                  error TEXT,
                  checks TEXT,
                  input_tokens INTEGER NOT NULL DEFAULT 0,
                  output_tokens INTEGER NOT NULL DEFAULT 0,
                  elapsed_ms INTEGER NOT NULL,
                  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
                  PRIMARY KEY (generation_id, round)
              ) STRICT;",
    },
    Migration {
        version: 6,
        name: "spent refresh tokens (reuse detection)",
        sql: "CREATE TABLE _ichibase_refresh_spent (
                  secret_hash TEXT PRIMARY KEY,
                  session_id TEXT NOT NULL,
                  spent_at INTEGER NOT NULL
              ) STRICT, WITHOUT ROWID;
              CREATE INDEX _ichibase_refresh_spent_at ON _ichibase_refresh_spent(spent_at);",
    },
    Migration {
        version: 7,
        name: "trace owners and sizes",
        sql: "ALTER TABLE _ichibase_traces ADD COLUMN owner TEXT;
              ALTER TABLE _ichibase_traces ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
              UPDATE _ichibase_traces SET bytes = coalesce(length(result), 0) + coalesce(length(logs), 0)
                  + coalesce((SELECT sum(48 + length(function) + length(source) + length(locals) + length(upvalues))
                              FROM _ichibase_trace_steps s WHERE s.trace_id = _ichibase_traces.id), 0);
              CREATE INDEX _ichibase_traces_started ON _ichibase_traces (started_at);",
    },
    Migration {
        version: 8,
        name: "credential changes bump auth_version (a running server reloads what the CLI changed)",
        sql: "INSERT OR IGNORE INTO _ichibase_meta (key, value) VALUES ('auth_version', '0');
              CREATE TRIGGER _ichibase_auth_keys_ins AFTER INSERT ON _ichibase_api_keys BEGIN
                  UPDATE _ichibase_meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'auth_version';
              END;
              CREATE TRIGGER _ichibase_auth_keys_upd AFTER UPDATE ON _ichibase_api_keys BEGIN
                  UPDATE _ichibase_meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'auth_version';
              END;
              CREATE TRIGGER _ichibase_auth_keys_del AFTER DELETE ON _ichibase_api_keys BEGIN
                  UPDATE _ichibase_meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'auth_version';
              END;
              CREATE TRIGGER _ichibase_auth_sessions_revoked AFTER UPDATE OF revoked_at ON _ichibase_sessions BEGIN
                  UPDATE _ichibase_meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'auth_version';
              END;
              CREATE TRIGGER _ichibase_auth_users_upd AFTER UPDATE OF disabled_at, password_hash, role ON _ichibase_users BEGIN
                  UPDATE _ichibase_meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'auth_version';
              END;",
    },
    Migration {
        version: 9,
        name: "trace sampling: visits of a line not recorded before each step, and the run's summary",
        sql: "ALTER TABLE _ichibase_trace_steps ADD COLUMN skipped INTEGER NOT NULL DEFAULT 0;
              ALTER TABLE _ichibase_traces ADD COLUMN sampling TEXT;",
    },
];

/// Apply every migration not yet recorded. Returns how many ran.
pub fn apply(conn: &mut Connection) -> anyhow::Result<usize> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS _ichibase_migrations (
            version INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
        ) STRICT",
    )?;
    let current: i64 = conn.query_row(
        "SELECT coalesce(max(version), 0) FROM _ichibase_migrations",
        [],
        |r| r.get(0),
    )?;
    let mut ran = 0;
    for m in MIGRATIONS.iter().filter(|m| m.version > current) {
        let tx = conn.transaction()?;
        tx.execute_batch(m.sql).map_err(|e| {
            anyhow::anyhow!("engine migration {} ({}) failed: {e}", m.version, m.name)
        })?;
        tx.execute(
            "INSERT INTO _ichibase_migrations (version, name) VALUES (?1, ?2)",
            (m.version, m.name),
        )?;
        tx.commit()?;
        tracing::info!(
            version = m.version,
            name = m.name,
            "applied engine migration"
        );
        ran += 1;
    }
    Ok(ran)
}

/// Apply the pending migrations of module `module` (see `crate::modules`): each step runs once
/// per database, in its own transaction, recorded in `_ichibase_module_migrations` under the
/// module's name. Returns how many ran.
pub fn apply_module(conn: &mut Connection, module: &str, steps: &[Migration]) -> anyhow::Result<usize> {
    if steps.is_empty() {
        return Ok(0);
    }
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS _ichibase_module_migrations (
            module TEXT NOT NULL,
            version INTEGER NOT NULL,
            name TEXT NOT NULL,
            applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
            PRIMARY KEY (module, version)
        ) STRICT",
    )?;
    let current: i64 = conn.query_row(
        "SELECT coalesce(max(version), 0) FROM _ichibase_module_migrations WHERE module = ?1",
        [module],
        |r| r.get(0),
    )?;
    let mut ran = 0;
    for m in steps.iter().filter(|m| m.version > current) {
        let tx = conn.transaction()?;
        tx.execute_batch(m.sql).map_err(|e| {
            anyhow::anyhow!("migration {} ({}) of module '{module}' failed: {e}", m.version, m.name)
        })?;
        tx.execute(
            "INSERT INTO _ichibase_module_migrations (module, version, name) VALUES (?1, ?2, ?3)",
            (module, m.version, m.name),
        )?;
        tx.commit()?;
        tracing::info!(module, version = m.version, name = m.name, "applied module migration");
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
        let n: i64 = c
            .query_row("SELECT count(*) FROM _ichibase_migrations", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(n as usize, MIGRATIONS.len());
    }
}
