//! The `search()` SQL function: full-text, vector and hybrid search over a view the caller may
//! read, as a JSON array of hits (best first).
//!
//! `search(view, text, vector, k [, options])`:
//! - `view`: a policy view (or a table) granted to the caller's role with SELECT, over a table
//!   that has a search index (`PUT /search/indexes/{table}`);
//! - `text`: words (NULL for none); every word must occur (AND). With the trigram tokenizer a
//!   word of one or two characters is matched with `LIKE` over the view instead of the index;
//! - `vector`: a JSON array of numbers or a float32 blob (NULL for none);
//! - `k`: hits wanted (1..=`[search] max_k`);
//! - `options`: JSON `{"filter": {"column": value, ...}, "highlight": ["[", "]"],
//!   "candidates": n, "rescore": true}`; `rescore` (int8 and bit indexes, default true) takes
//!   `[search] rescore_factor` times more candidates by the quantised distance and ranks them
//!   by the float32 distance of the rows' own vectors.
//!
//! Each hit: `{"id", "score", "text_rank", "bm25", "snippet", "vector_rank", "distance"}`; with
//! both text and vector, `score` is the reciprocal rank fusion Σ 1/(rrf_k + rank).
//!
//! Security: the caller's SELECT grant on `view` is checked first; the nested statements then
//! run with the engine's access (FTS5 reads its shadow tables with statements of its own) but
//! every candidate set is restricted to keys the view returns, and the view is evaluated with
//! the caller's identity (`auth_userid()` stays the caller's). The index tables themselves are
//! never granted, so a role cannot read them directly.

use std::collections::HashMap;
use std::sync::Arc;

use rusqlite::functions::{Context, FunctionFlags};
use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, OptionalExtension};

use super::index::{self, IndexSpec};
use crate::core::{Error, ErrorCode, Role};
use crate::sql::parse::quote_ident;
use crate::storage::ConnState;

/// Register `search()` (4 and 5 arguments) on a storage connection.
pub fn register(conn: &Connection, st: &Arc<ConnState>) -> rusqlite::Result<()> {
    let flags = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DIRECTONLY;
    for n in [4, 5] {
        let st = Arc::clone(st);
        conn.create_scalar_function("search", n, flags, move |c: &mut Context<'_>| {
            search_fn(c, &st).map_err(|e| rusqlite::Error::UserFunctionError(Box::new(e)))
        })?;
    }
    Ok(())
}

/// A parsed search request.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub view: String,
    pub text: Option<String>,
    pub vector: Option<Vec<f32>>,
    pub k: usize,
    pub filter: Vec<(String, Value)>,
    pub highlight: (String, String),
    pub candidates: Option<usize>,
    /// Re-rank int8/bit candidates by their float32 distance (default true).
    pub rescore: Option<bool>,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorCode::BadArguments, msg)
}

/// A vector from JSON text (array of numbers) or a little-endian float32 blob.
pub fn parse_vector(v: ValueRef<'_>) -> Result<Option<Vec<f32>>, Error> {
    match v {
        ValueRef::Null => Ok(None),
        ValueRef::Text(t) => {
            let j: serde_json::Value = serde_json::from_slice(t)
                .map_err(|_| bad("search: the vector must be a JSON array of numbers"))?;
            vector_from_json(&j).map(Some)
        }
        ValueRef::Blob(b) => {
            if b.len() % 4 != 0 || b.is_empty() {
                return Err(bad("search: a vector blob must hold float32 values (4 bytes each)"));
            }
            let v: Vec<f32> = b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            check_finite(&v)?;
            Ok(Some(v))
        }
        _ => Err(bad("search: the vector must be a JSON array or a float32 blob")),
    }
}

pub fn vector_from_json(j: &serde_json::Value) -> Result<Vec<f32>, Error> {
    let a = j
        .as_array()
        .ok_or_else(|| bad("search: the vector must be an array of numbers"))?;
    let v = a
        .iter()
        .map(|x| x.as_f64().map(|f| f as f32))
        .collect::<Option<Vec<f32>>>()
        .ok_or_else(|| bad("search: the vector must be an array of numbers"))?;
    check_finite(&v)?;
    Ok(v)
}

fn check_finite(v: &[f32]) -> Result<(), Error> {
    if v.iter().all(|x| x.is_finite()) {
        Ok(())
    } else {
        Err(bad("search: vector components must be finite numbers"))
    }
}

/// Parse the options object (`filter`, `highlight`, `candidates`) into `req`.
pub fn apply_options(req: &mut Request, o: &serde_json::Value) -> Result<(), Error> {
    let Some(o) = o.as_object() else {
        return Err(bad("search: options must be a JSON object"));
    };
    for (k, v) in o {
        match k.as_str() {
            "filter" => {
                let Some(f) = v.as_object() else {
                    return Err(bad("search: filter must be an object of column = value"));
                };
                if f.len() > 32 {
                    return Err(bad("search: at most 32 filter columns"));
                }
                for (col, val) in f {
                    let sv = match val {
                        serde_json::Value::Null => Value::Null,
                        serde_json::Value::Bool(b) => Value::Integer(*b as i64),
                        serde_json::Value::Number(n) => match n.as_i64() {
                            Some(i) => Value::Integer(i),
                            None => Value::Real(n.as_f64().unwrap_or(0.0)),
                        },
                        serde_json::Value::String(s) => Value::Text(s.clone()),
                        _ => {
                            return Err(bad(format!(
                                "search: filter value of '{col}' must be a string, number, boolean or null"
                            )));
                        }
                    };
                    req.filter.push((col.clone(), sv));
                }
            }
            "highlight" => {
                let pair = v.as_array().filter(|a| a.len() == 2).and_then(|a| {
                    Some((a[0].as_str()?.to_string(), a[1].as_str()?.to_string()))
                });
                match pair {
                    Some(p) if p.0.len() <= 64 && p.1.len() <= 64 => req.highlight = p,
                    _ => return Err(bad("search: highlight must be [open, close] strings")),
                }
            }
            "candidates" => {
                req.candidates = Some(
                    v.as_u64()
                        .filter(|n| *n >= 1)
                        .ok_or_else(|| bad("search: candidates must be a positive integer"))?
                        as usize,
                )
            }
            "rescore" => {
                req.rescore = Some(
                    v.as_bool()
                        .ok_or_else(|| bad("search: rescore must be true or false"))?,
                )
            }
            other => {
                return Err(bad(format!(
                    "search: unknown option '{other}' (filter, highlight, candidates, rescore)"
                )));
            }
        }
    }
    Ok(())
}

fn search_fn(c: &Context<'_>, st: &ConnState) -> Result<String, Error> {
    let view: String = match c.get_raw(0) {
        ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
        _ => return Err(bad("search: the first argument is the view (or table) name")),
    };
    let text = match c.get_raw(1) {
        ValueRef::Null => None,
        ValueRef::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
        _ => return Err(bad("search: the text must be a string or NULL")),
    };
    let vector = parse_vector(c.get_raw(2))?;
    let k = match c.get_raw(3) {
        ValueRef::Integer(i) if i >= 1 => i as usize,
        _ => return Err(bad("search: k must be a positive integer")),
    };
    let mut req = Request {
        view,
        text,
        vector,
        k,
        highlight: ("[".into(), "]".into()),
        ..Default::default()
    };
    if c.len() > 4 {
        match c.get_raw(4) {
            ValueRef::Null => {}
            ValueRef::Text(t) => {
                let o: serde_json::Value = serde_json::from_slice(t)
                    .map_err(|_| bad("search: options must be a JSON object"))?;
                apply_options(&mut req, &o)?;
            }
            _ => return Err(bad("search: options must be a JSON object")),
        }
    }
    let role = st.context().map(|c| c.role).unwrap_or(Role::Admin);
    // SAFETY: the connection is used only for the nested statements of this call, on the
    // thread that runs the outer statement.
    let conn = unsafe { c.get_connection() }.map_err(Error::from)?;
    let hits = run(&conn, st, &role, &req)?;
    Ok(serde_json::Value::Array(hits).to_string())
}

/// Resolve `view` to (its base table, the table's index) for `role`, checking the grant.
pub fn resolve(
    conn: &Connection,
    st: &ConnState,
    role: &Role,
    view: &str,
) -> Result<(String, IndexSpec), Error> {
    if view.is_empty() || view.len() > 128 {
        return Err(bad("search: bad view name"));
    }
    if *role != Role::Admin && !st.authz().can_read(role.as_str(), view) {
        return Err(Error::new(
            ErrorCode::AccessDenied,
            format!("role '{}' may not read {view}", role.as_str()),
        ));
    }
    let _engine = st.engine_access();
    let base: Option<String> = conn
        .query_row(
            "SELECT table_name FROM _ichibase_policies WHERE name = ?1 COLLATE NOCASE",
            [view],
            |r| r.get(0),
        )
        .optional()?;
    let base = match base {
        Some(b) => b,
        None => {
            let is_table: bool = conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?1 COLLATE NOCASE)",
                [view],
                |r| r.get(0),
            )?;
            if !is_table {
                return Err(Error::new(
                    ErrorCode::NoSearchIndex,
                    format!("search: '{view}' is neither a policy view nor a table"),
                ));
            }
            view.to_string()
        }
    };
    let spec = index::load(conn, &base)?.ok_or_else(|| {
        Error::new(
            ErrorCode::NoSearchIndex,
            format!("search: table '{base}' (behind '{view}') has no search index (PUT /search/indexes/{base})"),
        )
    })?;
    Ok((base, spec))
}

/// One ranked list entry.
struct Hit {
    id: i64,
    bm25: Option<f64>,
    snippet: Option<String>,
    distance: Option<f64>,
}

/// Run a search; the hits as JSON objects, best first.
pub fn run(
    conn: &Connection,
    st: &ConnState,
    role: &Role,
    req: &Request,
) -> Result<Vec<serde_json::Value>, Error> {
    let s = super::settings();
    if req.k > s.max_k {
        return Err(bad(format!("search: k is at most {} ([search] max_k)", s.max_k)));
    }
    if req.text.as_ref().is_some_and(|t| t.len() > s.max_text) {
        return Err(bad(format!("search: the text is longer than {} bytes ([search] max_text)", s.max_text)));
    }
    let words: Vec<String> = req
        .text
        .as_deref()
        .unwrap_or("")
        .split_whitespace()
        .take(32)
        .map(str::to_string)
        .collect();
    if words.is_empty() && req.vector.is_none() {
        return Err(bad("search: give text, a vector or both"));
    }
    let (base, spec) = resolve(conn, st, role, &req.view)?;
    // Filter columns must be columns of the view.
    let view_cols: Vec<String> = {
        let _engine = st.engine_access();
        let mut stmt = conn.prepare("SELECT name FROM pragma_table_info(?1)")?;
        stmt.query_map([&req.view], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?
    };
    for (col, _) in &req.filter {
        if !view_cols.iter().any(|c| c.eq_ignore_ascii_case(col)) {
            return Err(bad(format!("search: '{}' has no column '{col}'", req.view)));
        }
    }
    if !view_cols.iter().any(|c| c.eq_ignore_ascii_case(&spec.key)) {
        return Err(bad(format!(
            "search: '{}' does not show the key column '{}' of '{base}'",
            req.view, spec.key
        )));
    }
    let n = req.candidates.unwrap_or(s.candidates).min(s.max_k).max(req.k);
    // The keys the caller may see, narrowed by the filter: `SELECT k FROM view WHERE ...`.
    let mut params: Vec<Value> = Vec::new();
    let mut conds = Vec::new();
    for (col, v) in &req.filter {
        if matches!(v, Value::Null) {
            conds.push(format!("{} IS NULL", quote_ident(col)));
        } else {
            params.push(v.clone());
            conds.push(format!("{} = ?{}", quote_ident(col), params.len()));
        }
    }
    let where_ = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    let visible = format!(
        "SELECT {} FROM {}{where_}",
        quote_ident(&spec.key),
        quote_ident(&req.view)
    );
    // Searching the indexed table itself without a filter: every indexed row is visible (only
    // the admin, or a role granted the whole table, gets here), so no key set is built.
    let whole_table = req.view.eq_ignore_ascii_case(&base) && req.filter.is_empty();

    let mut text_hits: Option<Vec<Hit>> = None;
    if !words.is_empty() {
        if spec.text.is_empty() {
            return Err(Error::new(
                ErrorCode::NoSearchIndex,
                format!("search: the index of '{base}' has no text columns"),
            ));
        }
        let short = spec.tokenizer == "trigram" && words.iter().any(|w| w.chars().count() < 3);
        text_hits = Some(if short {
            like_search(conn, st, req, &spec, &words, &where_, &params, n)?
        } else {
            let restrict = (!whole_table).then_some(visible.as_str());
            fts_search(conn, st, req, &base, &words, restrict, &params, n)?
        });
    }
    let mut vec_hits: Option<Vec<Hit>> = None;
    if let Some(v) = &req.vector {
        let Some(vs) = &spec.vector else {
            return Err(Error::new(
                ErrorCode::NoSearchIndex,
                format!("search: the index of '{base}' has no vector column"),
            ));
        };
        if v.len() != vs.dims {
            return Err(bad(format!(
                "search: the vector has {} dimensions, the index of '{base}' {}",
                v.len(),
                vs.dims
            )));
        }
        let blob: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let from = if whole_table {
            format!("{} AS q", quote_ident(&index::vq_table(&base)))
        } else {
            format!(
                "({visible}) AS v CROSS JOIN {} AS q ON q.id = v.{}",
                quote_ident(&index::vq_table(&base)),
                quote_ident(&spec.key)
            )
        };
        // Quantised vectors: take `rescore_factor` times more candidates by the quantised
        // distance, then rank those by the float32 distance of the rows' own vectors.
        let rescore = vs.quantization != "float32" && req.rescore.unwrap_or(true);
        let m = if rescore { n.saturating_mul(s.rescore_factor.max(1)) } else { n };
        let sql = format!(
            "SELECT q.id, {dist}({stored}, {query}) AS d FROM {from} ORDER BY d, q.id LIMIT {m}",
            dist = vs.distance_fn(),
            stored = vs.stored("q.v"),
            query = vs.quantize(&format!("?{}", params.len() + 1)),
        );
        let mut p = params.clone();
        p.push(Value::Blob(blob));
        let _engine = st.engine_access();
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(p.iter()), |r| {
                Ok(Hit {
                    id: r.get(0)?,
                    bm25: None,
                    snippet: None,
                    distance: r.get(1)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let rows = if rescore && !rows.is_empty() {
            let float_fn = match vs.metric.as_str() {
                "l2" => "vec_distance_l2",
                "l1" => "vec_distance_l1",
                _ => "vec_distance_cosine",
            };
            let ids: Vec<i64> = rows.iter().map(|h| h.id).collect();
            let sql = format!(
                "SELECT t.{key}, {float_fn}(vec_f32(t.{col}), vec_f32(?1)) AS d FROM {tq} AS t
                 WHERE t.{key} IN (SELECT value FROM json_each(?2)) ORDER BY d, t.{key} LIMIT {n}",
                key = quote_ident(&spec.key),
                col = quote_ident(&vs.column),
                tq = quote_ident(&base),
            );
            let blob: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            let ids = serde_json::to_string(&ids).map_err(|e| Error::internal(e.to_string()))?;
            let mut stmt = conn.prepare(&sql)?;
            stmt.query_map(rusqlite::params![blob, ids], |r| {
                Ok(Hit {
                    id: r.get(0)?,
                    bm25: None,
                    snippet: None,
                    distance: r.get(1)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?
        } else {
            rows
        };
        vec_hits = Some(rows);
    }
    Ok(fuse(text_hits, vec_hits, req.k, s.rrf_k))
}

#[allow(clippy::too_many_arguments)]
fn fts_search(
    conn: &Connection,
    st: &ConnState,
    req: &Request,
    base: &str,
    words: &[String],
    visible: Option<&str>,
    params: &[Value],
    n: usize,
) -> Result<Vec<Hit>, Error> {
    let fts = quote_ident(&index::fts_table(base));
    let query: Vec<String> = words
        .iter()
        .map(|w| format!("\"{}\"", w.replace('"', "\"\"")))
        .collect();
    let i = params.len();
    let sql = format!(
        "SELECT rowid, bm25({fts}) AS s, snippet({fts}, -1, ?{o}, ?{c}, '…', 24) FROM {fts}
         WHERE {fts} MATCH ?{q}{restrict} ORDER BY s, rowid LIMIT {n}",
        o = i + 1,
        c = i + 2,
        q = i + 3,
        // `+rowid`: the key set filters the matches; pushed into FTS5 as a rowid constraint
        // it would run the full-text query once per visible key.
        restrict = visible.map(|v| format!(" AND +rowid IN ({v})")).unwrap_or_default(),
    );
    let mut p = params.to_vec();
    p.push(Value::Text(req.highlight.0.clone()));
    p.push(Value::Text(req.highlight.1.clone()));
    p.push(Value::Text(query.join(" ")));
    let _engine = st.engine_access();
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt
        .query_map(rusqlite::params_from_iter(p.iter()), |r| {
            Ok(Hit {
                id: r.get(0)?,
                bm25: r.get(1)?,
                snippet: r.get(2)?,
                distance: None,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// Words shorter than a trigram: every word must occur in one of the text columns (`LIKE`
/// over the caller's view); ranked by how often the words occur.
#[allow(clippy::too_many_arguments)]
fn like_search(
    conn: &Connection,
    st: &ConnState,
    req: &Request,
    spec: &IndexSpec,
    words: &[String],
    where_: &str,
    params: &[Value],
    n: usize,
) -> Result<Vec<Hit>, Error> {
    let cols: Vec<String> = spec.text.iter().map(|c| quote_ident(c)).collect();
    let mut p = params.to_vec();
    let mut conds = Vec::new();
    for w in words {
        let pat = format!(
            "%{}%",
            w.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
        );
        p.push(Value::Text(pat));
        let i = p.len();
        conds.push(format!(
            "({})",
            cols.iter()
                .map(|c| format!("{c} LIKE ?{i} ESCAPE '\\'"))
                .collect::<Vec<_>>()
                .join(" OR ")
        ));
    }
    let glue = if where_.is_empty() { " WHERE " } else { " AND " };
    let concat = cols
        .iter()
        .map(|c| format!("coalesce({c}, '')"))
        .collect::<Vec<_>>()
        .join(" || char(10) || ");
    // Enough matches to rank; the rank is by occurrences, computed below.
    let cap = (n * 20).max(1000);
    let sql = format!(
        "SELECT {key}, {concat} FROM {view}{where_}{glue}{conds} LIMIT {cap}",
        key = quote_ident(&spec.key),
        view = quote_ident(&req.view),
        conds = conds.join(" AND "),
    );
    let _engine = st.engine_access();
    let mut stmt = conn.prepare(&sql)?;
    let rows: Vec<(i64, String)> = stmt
        .query_map(rusqlite::params_from_iter(p.iter()), |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let lower: Vec<String> = words.iter().map(|w| w.to_lowercase()).collect();
    let mut scored: Vec<(usize, i64, String)> = rows
        .into_iter()
        .map(|(id, text)| {
            let t = text.to_lowercase();
            let count = lower.iter().map(|w| t.matches(w.as_str()).count()).sum();
            (count, id, snippet_of(&text, &lower, &req.highlight))
        })
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.truncate(n);
    Ok(scored
        .into_iter()
        .map(|(_, id, snip)| Hit {
            id,
            bm25: None,
            snippet: Some(snip),
            distance: None,
        })
        .collect())
}

/// About 24 characters around the first occurrence of a word, the words marked.
fn snippet_of(text: &str, words: &[String], hl: &(String, String)) -> String {
    let chars: Vec<char> = text.chars().collect();
    let lower: Vec<char> = text.to_lowercase().chars().collect();
    if lower.len() != chars.len() {
        return text.chars().take(48).collect();
    }
    let wl: Vec<Vec<char>> = words.iter().map(|w| w.chars().collect()).collect();
    let at = |i: usize| wl.iter().find(|w| !w.is_empty() && lower[i..].starts_with(w)).map(|w| w.len());
    let first = (0..chars.len()).find(|&i| at(i).is_some()).unwrap_or(0);
    let start = first.saturating_sub(8);
    let end = (first + 24).min(chars.len());
    let mut out = String::new();
    if start > 0 {
        out.push('…');
    }
    let mut i = start;
    while i < end {
        if let Some(len) = at(i) {
            out.push_str(&hl.0);
            out.extend(&chars[i..(i + len).min(chars.len())]);
            out.push_str(&hl.1);
            i += len;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    if end < chars.len() {
        out.push('…');
    }
    out
}

/// Reciprocal rank fusion of the lists given (one list: its own order).
fn fuse(text: Option<Vec<Hit>>, vector: Option<Vec<Hit>>, k: usize, rrf_k: f64) -> Vec<serde_json::Value> {
    struct Acc {
        score: f64,
        text_rank: Option<usize>,
        vector_rank: Option<usize>,
        bm25: Option<f64>,
        snippet: Option<String>,
        distance: Option<f64>,
        first_seen: usize,
    }
    let mut acc: HashMap<i64, Acc> = HashMap::new();
    let mut seen = 0;
    for (is_text, list) in [(true, text), (false, vector)] {
        let Some(list) = list else { continue };
        for (i, h) in list.into_iter().enumerate() {
            let rank = i + 1;
            let e = acc.entry(h.id).or_insert_with(|| {
                seen += 1;
                Acc {
                    score: 0.0,
                    text_rank: None,
                    vector_rank: None,
                    bm25: None,
                    snippet: None,
                    distance: None,
                    first_seen: seen,
                }
            });
            e.score += 1.0 / (rrf_k + rank as f64);
            if is_text {
                e.text_rank = Some(rank);
                e.bm25 = h.bm25;
                e.snippet = h.snippet;
            } else {
                e.vector_rank = Some(rank);
                e.distance = h.distance;
            }
        }
    }
    let mut all: Vec<(i64, Acc)> = acc.into_iter().collect();
    all.sort_by(|a, b| {
        b.1.score
            .partial_cmp(&a.1.score)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.1.first_seen.cmp(&b.1.first_seen))
    });
    all.truncate(k);
    all.into_iter()
        .map(|(id, a)| {
            serde_json::json!({
                "id": id,
                "score": a.score,
                "text_rank": a.text_rank,
                "bm25": a.bm25,
                "snippet": a.snippet,
                "vector_rank": a.vector_rank,
                "distance": a.distance,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fusion_ranks_an_item_high_in_both_lists_first() {
        let h = |id| Hit { id, bm25: None, snippet: None, distance: None };
        let out = fuse(
            Some(vec![h(1), h(2), h(3)]),
            Some(vec![h(3), h(2), h(4)]),
            10,
            60.0,
        );
        let ids: Vec<i64> = out.iter().map(|v| v["id"].as_i64().unwrap()).collect();
        // 2: 1/62 + 1/62; 3: 1/63 + 1/61; 1: 1/61; 4: 1/63.
        assert_eq!(ids[..2].iter().copied().collect::<std::collections::HashSet<_>>(), [2, 3].into());
        assert_eq!(ids.len(), 4);
        assert_eq!(*ids.last().unwrap(), 4);
    }

    #[test]
    fn snippet_marks_words() {
        let s = snippet_of("今日は東京に行きました", &["東京".into()], &("[".into(), "]".into()));
        assert_eq!(s, "今日は[東京]に行きました");
    }
}
