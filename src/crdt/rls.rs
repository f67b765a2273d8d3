//! Row-level security of the sync protocol: which changes a caller receives and how a caller's
//! changes are written.
//!
//! The admin (an API key, a peer) receives every change and writes straight to the tables. Any
//! other role receives a row only when one of its readable policy views over the table shows
//! that row *when read as the caller* (the view, the authorizer and `auth_*()` are the ones
//! SQL-over-HTTP uses); a deleted row is sent when the view's USING predicate holds for its last
//! values. A caller's change is written through the policy views it holds the privilege on,
//! so their INSTEAD OF triggers check it as for a direct write; a refused change is reported.
//! Owns no tables; reads `_ichibase_policies` and `_ichibase_grants` (read-only).

use std::collections::BTreeMap;

use rusqlite::Connection;
use rusqlite::types::Value;
use serde::Serialize;
use serde_json::Value as Json;

use super::engine::{self, ChangeResult, MergeLimits, RowChange, TableInfo, Target};
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::sql::parse::quote_ident;
use crate::storage::{Authz, engine_statements};

/// One answer of `GET /sync/changes`.
#[derive(Debug, Serialize)]
pub struct Batch {
    /// The sender's site id.
    pub site: String,
    pub changes: Vec<RowChange>,
    /// Resume with `since=cursor`.
    pub cursor: i64,
    /// More changes wait after `cursor`.
    pub more: bool,
}

/// A readable policy of a table: view name and USING predicate.
struct ReadPolicy {
    view: String,
    using_expr: String,
}

/// Policies (and direct grants) through which `role` may read each table.
fn read_policies(c: &Connection, authz: &Authz, role: &str) -> Result<(BTreeMap<String, Vec<ReadPolicy>>, Vec<String>)> {
    let rows: Vec<(String, String, String)> = engine_statements(|| -> Result<_> {
        let mut st = engine::prep(c, "SELECT name, table_name, using_expr FROM _ichibase_policies")?;
        let r = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(r)
    })?;
    let mut out: BTreeMap<String, Vec<ReadPolicy>> = BTreeMap::new();
    for (view, table, using_expr) in rows {
        if authz.can_read(role, &view) {
            out.entry(table).or_default().push(ReadPolicy { view, using_expr });
        }
    }
    let tables = engine_statements(|| engine::list(c))?;
    let direct = tables
        .into_iter()
        .filter(|t| authz.can_read(role, &t.name))
        .map(|t| t.name)
        .collect();
    Ok((out, direct))
}

fn pk_where(t: &TableInfo) -> String {
    t.pk.iter()
        .enumerate()
        .map(|(i, k)| format!("{} IS ?{}", quote_ident(k), i + 1))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The changes after `since` that `ctx` may receive.
pub fn pull(
    c: &Connection,
    ctx: &RequestContext,
    authz: &Authz,
    since: i64,
    limit: usize,
    tables: Option<&[String]>,
) -> Result<Batch> {
    let admin = ctx.is_admin();
    let run = || -> Result<Batch> {
        let (cands, cursor, more) = engine_statements(|| engine::changes(c, since, limit, tables))?;
        let site = engine_statements(|| engine::site_id(c))?;
        if admin {
            return Ok(Batch { site, changes: cands.into_iter().map(|c| c.change).collect(), cursor, more });
        }
        let (policies, direct) = read_policies(c, authz, ctx.role.as_str())?;
        let infos: BTreeMap<String, TableInfo> =
            engine_statements(|| engine::list(c))?.into_iter().map(|t| (t.name.clone(), t)).collect();
        let mut changes = Vec::new();
        for cand in cands {
            let ch = cand.change;
            let Some(info) = infos.get(&ch.table) else { continue };
            if direct.contains(&ch.table) {
                changes.push(ch);
                continue;
            }
            let Some(pols) = policies.get(&ch.table) else { continue };
            let keys: Vec<Value> = ch.pk.iter().map(engine::from_json).collect::<Result<_>>()?;
            let visible = if ch.cl % 2 == 1 {
                // Read through the view as the caller: the policy machinery decides.
                let mut seen = false;
                for p in pols {
                    let sql = format!("SELECT 1 FROM {} WHERE {}", quote_ident(&p.view), pk_where(info));
                    if c.prepare_cached(&sql)?.exists(rusqlite::params_from_iter(keys.iter()))? {
                        seen = true;
                        break;
                    }
                }
                seen
            } else {
                match &cand.tomb {
                    Some(Json::Object(last)) => tomb_visible(c, info, pols, last)?,
                    _ => false,
                }
            };
            if visible {
                changes.push(ch);
            }
        }
        Ok(Batch { site, changes, cursor, more })
    };
    if admin { run() } else { engine::uncached(run) }
}

/// A deleted row's last values satisfy one of the USING predicates (evaluated with the
/// caller's identity installed, as the engine: the row is no longer in any table).
fn tomb_visible(c: &Connection, t: &TableInfo, pols: &[ReadPolicy], last: &serde_json::Map<String, Json>) -> Result<bool> {
    let cols: Vec<&String> = t.pk.iter().chain(t.columns.iter()).collect();
    let vals: Vec<Value> = cols
        .iter()
        .map(|n| last.get(*n).map(engine::from_json).unwrap_or(Ok(Value::Null)))
        .collect::<Result<_>>()?;
    let select = cols
        .iter()
        .enumerate()
        .map(|(i, n)| format!("?{} AS {}", i + 1, quote_ident(n)))
        .collect::<Vec<_>>()
        .join(", ");
    for p in pols {
        let sql = format!(
            "SELECT 1 FROM (SELECT {select}) AS {} WHERE ({})",
            quote_ident(&t.name),
            p.using_expr
        );
        let ok = engine_statements(|| -> Result<bool> {
            Ok(c.prepare(&sql)?.exists(rusqlite::params_from_iter(vals.iter()))?)
        });
        if ok.unwrap_or(false) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Writes through the caller's policy views (their triggers check each row).
struct ViaPolicies {
    role: String,
}

impl ViaPolicies {
    /// Views over `t` (or `t` itself, when granted directly) on which the role holds `privilege`.
    fn objects(&self, c: &Connection, t: &TableInfo, privilege: &str) -> Result<Vec<String>> {
        engine_statements(|| -> Result<Vec<String>> {
            let mut st = engine::prep(
                c,
                "SELECT g.object FROM _ichibase_grants g WHERE g.role = ?1 AND g.privilege = ?2
                   AND (g.object = ?3 OR g.object IN (SELECT name FROM _ichibase_policies WHERE table_name = ?3))
                 ORDER BY g.object = ?3 DESC, g.object",
            )?;
            let r = st
                .query_map(rusqlite::params![self.role, privilege, t.name], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(r)
        })
    }

    fn denied(&self, t: &TableInfo, what: &str, last: Option<Error>) -> Error {
        Error::new(
            ErrorCode::AccessDenied,
            format!(
                "role '{}' may not {what} this row of '{}'{}",
                self.role,
                t.name,
                match last {
                    Some(e) => format!(": {}", e.message),
                    None => " (no policy grants it, or the row is not visible to you)".into(),
                }
            ),
        )
    }

    /// Try `f` on each object in a savepoint until `done` holds afterwards.
    fn try_each(
        &self,
        c: &Connection,
        t: &TableInfo,
        privilege: &str,
        what: &str,
        f: impl Fn(&str) -> Result<()>,
        done: impl Fn() -> Result<bool>,
    ) -> Result<()> {
        let mut last = None;
        for o in self.objects(c, t, privilege)? {
            engine_statements(|| c.execute_batch("SAVEPOINT crdt_via"))?;
            let r = f(&o).and_then(|_| engine_statements(&done));
            match r {
                Ok(true) => {
                    engine_statements(|| c.execute_batch("RELEASE crdt_via"))?;
                    return Ok(());
                }
                Ok(false) => {}
                Err(e) => last = Some(e),
            }
            engine_statements(|| c.execute_batch("ROLLBACK TO crdt_via; RELEASE crdt_via"))?;
        }
        Err(self.denied(t, what, last))
    }
}

fn base_row(c: &Connection, t: &TableInfo, pk: &[Value], cols: &[&String]) -> Result<Option<Vec<Value>>> {
    use rusqlite::OptionalExtension;
    let sql = format!(
        "SELECT {} FROM {} WHERE {}",
        if cols.is_empty() { "1".to_string() } else { cols.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ") },
        quote_ident(&t.name),
        pk_where(t)
    );
    Ok(c.prepare(&sql)?
        .query_row(rusqlite::params_from_iter(pk.iter()), |r| {
            (0..cols.len()).map(|i| r.get::<_, Value>(i)).collect()
        })
        .optional()?)
}

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Integer(x), Value::Real(y)) | (Value::Real(y), Value::Integer(x)) => (*x as f64) == *y,
        _ => a == b,
    }
}

impl Target for ViaPolicies {
    fn trusted(&self) -> bool {
        false
    }
    fn insert(&self, c: &Connection, t: &TableInfo, cols: &[(String, Value)]) -> Result<()> {
        let pk: Vec<Value> = cols[..t.pk.len()].iter().map(|(_, v)| v.clone()).collect();
        self.try_each(
            c,
            t,
            "insert",
            "insert",
            |o| {
                c.prepare_cached(&engine::insert_sql(o, cols))?
                    .execute(rusqlite::params_from_iter(cols.iter().map(|(_, v)| v)))?;
                Ok(())
            },
            || Ok(base_row(c, t, &pk, &[])?.is_some()),
        )
    }
    fn update(&self, c: &Connection, t: &TableInfo, pk: &[Value], sets: &[(String, Value)]) -> Result<()> {
        let names: Vec<&String> = sets.iter().map(|(n, _)| n).collect();
        self.try_each(
            c,
            t,
            "update",
            "update",
            |o| {
                c.prepare_cached(&engine::update_sql(o, t, sets))?
                    .execute(rusqlite::params_from_iter(sets.iter().map(|(_, v)| v).chain(pk.iter())))?;
                Ok(())
            },
            || {
                Ok(base_row(c, t, pk, &names)?
                    .is_some_and(|row| row.iter().zip(sets).all(|(a, (_, b))| same(a, b))))
            },
        )
    }
    fn delete(&self, c: &Connection, t: &TableInfo, pk: &[Value]) -> Result<()> {
        self.try_each(
            c,
            t,
            "delete",
            "delete",
            |o| {
                c.prepare_cached(&engine::delete_sql(o, t))?
                    .execute(rusqlite::params_from_iter(pk.iter()))?;
                Ok(())
            },
            || Ok(base_row(c, t, pk, &[])?.is_none()),
        )
    }
}

/// Merge `changes` as `ctx`: the admin straight, anyone else through their policies.
pub fn push(c: &mut Connection, ctx: &RequestContext, changes: &[RowChange], limits: &MergeLimits) -> Result<Vec<ChangeResult>> {
    if ctx.is_admin() {
        return engine::apply(c, changes, &engine::Direct, limits, |_| Ok(()));
    }
    let target = ViaPolicies { role: ctx.role.as_str().to_string() };
    engine::uncached(|| engine::apply(c, changes, &target, limits, |_| Ok(())))
}
