//! `app_table('name')`: a DuckDB table function that reads a table or view of the app's SQLite
//! database through rusqlite, so analytics can run OLAP over live app data.
//!
//! The bundled DuckDB cannot load its own sqlite scanner offline (extensions are downloaded),
//! so this one is built in. It reads on a fresh read-only SQLite connection (a WAL snapshot,
//! never blocking the writer), streaming rows from a producer thread in chunks of 2048. Column
//! types follow SQLite's declared types (INTEGER -> BIGINT, REAL -> DOUBLE, BLOB -> BLOB, the
//! rest VARCHAR); a value that does not fit its column's type (SQLite is dynamically typed)
//! reads as NULL, except numbers in text columns, which read as their text.
//!
//! It reads rows raw, without row-level security: only the admin may call it. Other roles
//! reach app data only through views an admin granted them (see [`super::analytics`]).

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, sync_channel};

use duckdb::core::{DataChunkHandle, Inserter, LogicalTypeHandle, LogicalTypeId};
use duckdb::vtab::{BindInfo, InitInfo, TableFunctionInfo, VTab};
use rusqlite::types::Value as SqlValue;

const CHUNK: usize = 2048;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Col {
    Int,
    Real,
    Text,
    Blob,
}

impl Col {
    fn from_decl(decl: Option<&str>) -> Col {
        let d = decl.unwrap_or("").to_ascii_uppercase();
        if d.contains("INT") {
            Col::Int
        } else if d.contains("CHAR") || d.contains("CLOB") || d.contains("TEXT") {
            Col::Text
        } else if d.contains("BLOB") {
            Col::Blob
        } else if d.contains("REAL") || d.contains("FLOA") || d.contains("DOUB") {
            Col::Real
        } else {
            Col::Text
        }
    }

    fn logical(self) -> LogicalTypeHandle {
        LogicalTypeHandle::from(match self {
            Col::Int => LogicalTypeId::Bigint,
            Col::Real => LogicalTypeId::Double,
            Col::Text => LogicalTypeId::Varchar,
            Col::Blob => LogicalTypeId::Blob,
        })
    }
}

pub struct BindData {
    db: PathBuf,
    sql: String,
    cols: Vec<Col>,
}

type Batch = Result<Vec<Vec<SqlValue>>, String>;

pub struct InitData {
    rx: Mutex<Receiver<Batch>>,
}

pub struct AppTable;

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn open(db: &PathBuf) -> rusqlite::Result<rusqlite::Connection> {
    let c = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    c.busy_timeout(std::time::Duration::from_secs(5))?;
    c.execute_batch("PRAGMA query_only = 1")?;
    Ok(c)
}

impl VTab for AppTable {
    type InitData = InitData;
    type BindData = BindData;

    fn bind(bind: &BindInfo) -> Result<BindData, Box<dyn std::error::Error>> {
        let name = bind.get_parameter(0).to_string();
        // SAFETY: registered with a PathBuf as extra info (see `register`).
        let db = unsafe { &*bind.get_extra_info::<PathBuf>() }.clone();
        if name.is_empty() || name.starts_with("sqlite_") {
            return Err(format!("app_table: no table '{name}'").into());
        }
        let sql = format!("SELECT * FROM {}", quote(&name));
        let conn = open(&db)?;
        let st = conn
            .prepare(&sql)
            .map_err(|e| format!("app_table('{name}'): {e}"))?;
        let mut cols = Vec::new();
        for c in st.columns() {
            let col = Col::from_decl(c.decl_type());
            bind.add_result_column(c.name(), col.logical());
            cols.push(col);
        }
        Ok(BindData { db, sql, cols })
    }

    fn init(init: &InitInfo) -> Result<InitData, Box<dyn std::error::Error>> {
        // SAFETY: DuckDB hands back the bind data this function's `bind` produced.
        let bind = unsafe { &*init.get_bind_data::<BindData>() };
        let (tx, rx) = sync_channel::<Batch>(4);
        let (db, sql, n) = (bind.db.clone(), bind.sql.clone(), bind.cols.len());
        std::thread::Builder::new()
            .name("app_table".into())
            .spawn(move || {
                let run = || -> rusqlite::Result<()> {
                    let conn = open(&db)?;
                    let mut st = conn.prepare(&sql)?;
                    let mut rows = st.raw_query();
                    let mut batch = Vec::with_capacity(CHUNK);
                    while let Some(r) = rows.next()? {
                        let mut row = Vec::with_capacity(n);
                        for i in 0..n {
                            row.push(r.get::<_, SqlValue>(i)?);
                        }
                        batch.push(row);
                        if batch.len() == CHUNK
                            && tx
                                .send(Ok(std::mem::replace(&mut batch, Vec::with_capacity(CHUNK))))
                                .is_err()
                        {
                            return Ok(()); // the scan stopped early (LIMIT)
                        }
                    }
                    if !batch.is_empty() {
                        let _ = tx.send(Ok(batch));
                    }
                    Ok(())
                };
                if let Err(e) = run() {
                    let _ = tx.send(Err(format!("app_table: {e}")));
                }
            })?;
        Ok(InitData { rx: Mutex::new(rx) })
    }

    fn func(
        func: &TableFunctionInfo<Self>,
        output: &mut DataChunkHandle,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let init = func.get_init_data();
        let bind = func.get_bind_data();
        let batch = match init.rx.lock().map_err(|_| "app_table: poisoned")?.recv() {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                output.set_len(0);
                return Ok(());
            }
        };
        for (i, col) in bind.cols.iter().enumerate() {
            let mut v = output.flat_vector(i);
            for (j, row) in batch.iter().enumerate() {
                match (col, &row[i]) {
                    (_, SqlValue::Null) => v.set_null(j),
                    (Col::Int, SqlValue::Integer(n)) => unsafe { v.as_mut_slice::<i64>()[j] = *n },
                    (Col::Real, SqlValue::Real(f)) => unsafe { v.as_mut_slice::<f64>()[j] = *f },
                    (Col::Real, SqlValue::Integer(n)) => unsafe {
                        v.as_mut_slice::<f64>()[j] = *n as f64
                    },
                    (Col::Text, SqlValue::Text(s)) => v.insert(j, s.as_str()),
                    (Col::Text, SqlValue::Integer(n)) => v.insert(j, n.to_string().as_str()),
                    (Col::Text, SqlValue::Real(f)) => v.insert(j, f.to_string().as_str()),
                    (Col::Text, SqlValue::Blob(b)) => {
                        v.insert(j, String::from_utf8_lossy(b).as_ref())
                    }
                    (Col::Blob, SqlValue::Blob(b)) => v.insert(j, b.as_slice()),
                    (Col::Blob, SqlValue::Text(s)) => v.insert(j, s.as_bytes()),
                    _ => v.set_null(j),
                }
            }
        }
        output.set_len(batch.len());
        Ok(())
    }

    fn parameters() -> Option<Vec<LogicalTypeHandle>> {
        Some(vec![LogicalTypeHandle::from(LogicalTypeId::Varchar)])
    }
}

/// Register `app_table(name)` on the database of `conn`, reading `app_db`.
pub fn register(conn: &duckdb::Connection, app_db: &std::path::Path) -> anyhow::Result<()> {
    conn.register_table_function_with_extra_info::<AppTable, PathBuf>(
        "app_table",
        &app_db.to_path_buf(),
    )?;
    Ok(())
}
