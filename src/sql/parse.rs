//! Turn the text of a request into statements ready to prepare.
//!
//! Splits on top-level `;` (respecting trigger bodies via `sqlite3_complete`), takes a trailing
//! `FORMAT X` clause off the last statement, finds where inline data of
//! `INSERT INTO t [(cols)] FORMAT X` begins (the rest of the text is data, never lexed), and
//! rewrites every `{name:Type}` placeholder to a numbered SQLite parameter `?N`.

use std::ffi::CString;

use super::lexer::{Lexer, TokKind, Token};
use crate::core::{Error, ErrorCode, Result};

/// A `{name:Type}` placeholder; its position in `Statement::params` is SQLite index - 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placeholder {
    pub name: String,
    pub ty: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// SQL with placeholders replaced by `?1`, `?2`, ...
    pub sql: String,
    pub params: Vec<Placeholder>,
    /// First keyword, upper-cased (`SELECT`, `INSERT`, ...).
    pub verb: String,
    /// Names the statement defines with `name [(cols)] AS (` (CTEs, and window names).
    pub ctes: Vec<String>,
    /// The statement asks for the REPLACE conflict resolution (`REPLACE INTO`,
    /// `INSERT OR REPLACE`, `UPDATE OR REPLACE`), which SQLite also applies inside triggers.
    pub or_replace: bool,
    /// For `UPDATE`/`DELETE` (after an optional `WITH`): the target's name, unquoted and without
    /// its schema, and whether the statement could read anything but the target: a subquery
    /// (`SELECT`/`VALUES`), a CTE, `UPDATE ... FROM`, or `IN table`. SQLite compiles every part
    /// of an UPDATE/DELETE on a *view* with the view as the authorizer's accessor, so such reads
    /// would pass as the view's own; the SQL layer refuses them for non-admin roles.
    pub write_target: Option<WriteTarget>,
}

/// Target of an UPDATE or DELETE statement; see [`Statement::write_target`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteTarget {
    pub name: String,
    pub reads_other: bool,
}

/// Target of an `INSERT ... FORMAT X` with data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsertTarget {
    /// `INSERT INTO`, `INSERT OR REPLACE INTO`, `REPLACE INTO`...
    pub head: String,
    /// The table as written in the SQL (`t`, `"my table"`, `main.t`).
    pub table: String,
    /// Column names (unquoted) when a column list was given.
    pub columns: Option<Vec<String>>,
    pub format: String,
}

#[derive(Debug)]
pub struct Parsed<'a> {
    pub statements: Vec<Statement>,
    /// Output format named by a trailing `FORMAT X`.
    pub format: Option<String>,
    /// Insert target and the inline data that follows its `FORMAT X`.
    pub insert: Option<(InsertTarget, &'a str)>,
}

/// Tokens lexed on demand, so parsing can stop where insert data begins.
struct Toks<'a> {
    lx: Lexer<'a>,
    buf: Vec<Token>,
    eof: bool,
}

impl<'a> Toks<'a> {
    fn get(&mut self, i: usize) -> Result<Option<Token>> {
        while self.buf.len() <= i && !self.eof {
            match self.lx.next_token()? {
                Some(t) => self.buf.push(t),
                None => self.eof = true,
            }
        }
        Ok(self.buf.get(i).cloned())
    }
}

fn is_complete(sql: &str) -> bool {
    match CString::new(sql) {
        // SAFETY: sqlite3_complete only reads the NUL-terminated string.
        Ok(c) => unsafe { rusqlite::ffi::sqlite3_complete(c.as_ptr()) != 0 },
        Err(_) => true,
    }
}

pub fn parse(text: &str) -> Result<Parsed<'_>> {
    let mut toks = Toks {
        lx: Lexer::new(text),
        buf: Vec::new(),
        eof: false,
    };
    let mut statements = Vec::new();
    let mut cur: Vec<Token> = Vec::new();
    let mut cur_start = 0usize;
    let mut format = None;
    let mut insert = None;
    let mut i = 0usize;
    while let Some(t) = toks.get(i)? {
        i += 1;
        if t.kind == TokKind::Semicolon {
            if cur.is_empty() {
                cur_start = t.end;
            } else if !is_trigger(&cur, text) || is_complete(&text[cur_start..t.end]) {
                statements.push(finish(text, cur_start, t.start, &cur)?);
                cur.clear();
                cur_start = t.end;
            } else {
                cur.push(t);
            }
            continue;
        }
        if t.is_word(text, "FORMAT") {
            if let Some(next) = toks.get(i)?.filter(|n| n.kind == TokKind::Word) {
                let name = next.text(text).to_string();
                if let Some(target) = insert_target(&cur, text, &name) {
                    insert = Some((target, data_after(text, next.end)));
                    cur.clear();
                    break;
                }
                let after = toks.get(i + 1)?;
                let at_end = match &after {
                    None => true,
                    Some(a) if a.kind == TokKind::Semicolon => toks.get(i + 2)?.is_none(),
                    _ => false,
                };
                if at_end {
                    format = Some(name);
                    statements.push(finish(text, cur_start, t.start, &cur)?);
                    cur.clear();
                    break;
                }
            }
        }
        cur.push(t);
    }
    if !cur.is_empty() {
        statements.push(finish(text, cur_start, text.len(), &cur)?);
    }
    if statements.is_empty() && insert.is_none() {
        return Err(Error::syntax("Empty query"));
    }
    Ok(Parsed {
        statements,
        format,
        insert,
    })
}

fn is_trigger(toks: &[Token], text: &str) -> bool {
    toks.first().is_some_and(|t| t.is_word(text, "CREATE"))
        && toks.iter().take(4).any(|t| t.is_word(text, "TRIGGER"))
}

/// Inline data starts after spaces and at most one line break following the format name.
fn data_after(text: &str, mut pos: usize) -> &str {
    let b = text.as_bytes();
    while pos < b.len() && (b[pos] == b' ' || b[pos] == b'\t') {
        pos += 1;
    }
    if text[pos..].starts_with("\r\n") {
        pos += 2;
    } else if text[pos..].starts_with('\n') {
        pos += 1;
    }
    &text[pos..]
}

/// `INSERT [OR x] INTO table [(a, b)]` / `REPLACE INTO table [(a, b)]`, and nothing else.
fn insert_target(toks: &[Token], text: &str, format: &str) -> Option<InsertTarget> {
    let first = toks.first()?;
    let mut i;
    if first.is_word(text, "INSERT") {
        i = 1;
        if toks.get(i)?.is_word(text, "OR") {
            i += 2;
        }
    } else if first.is_word(text, "REPLACE") {
        i = 1;
    } else {
        return None;
    }
    if !toks.get(i)?.is_word(text, "INTO") {
        return None;
    }
    let head = text[first.start..toks[i].end].to_string();
    i += 1;
    let table_start = i;
    while i < toks.len()
        && matches!(
            toks[i].kind,
            TokKind::Word | TokKind::QuotedIdent | TokKind::Punct
        )
    {
        if toks[i].kind == TokKind::Punct && toks[i].text(text) != "." {
            return None;
        }
        i += 1;
    }
    if i == table_start {
        return None;
    }
    let table = text[toks[table_start].start..toks[i - 1].end].to_string();
    let mut columns = None;
    if i < toks.len() {
        if toks[i].kind != TokKind::LParen || toks.last()?.kind != TokKind::RParen {
            return None;
        }
        let mut cols = Vec::new();
        for (k, t) in toks[i + 1..toks.len() - 1].iter().enumerate() {
            let want_name = k % 2 == 0;
            match (&t.kind, want_name) {
                (TokKind::Word | TokKind::QuotedIdent, true) => cols.push(unquote(t.text(text))),
                (TokKind::Punct, false) if t.text(text) == "," => {}
                _ => return None,
            }
        }
        if cols.is_empty() {
            return None;
        }
        columns = Some(cols);
    }
    Some(InsertTarget {
        head,
        table,
        columns,
        format: format.to_string(),
    })
}

/// Strip SQL identifier quotes.
pub fn unquote(s: &str) -> String {
    let b = s.as_bytes();
    if b.len() >= 2 {
        match (b[0], b[b.len() - 1]) {
            (b'"', b'"') => return s[1..s.len() - 1].replace("\"\"", "\""),
            (b'`', b'`') => return s[1..s.len() - 1].replace("``", "`"),
            (b'[', b']') => return s[1..s.len() - 1].to_string(),
            _ => {}
        }
    }
    s.to_string()
}

/// Quote an identifier for SQLite.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Build one statement from its tokens, rewriting placeholders to `?N`.
fn finish(text: &str, start: usize, end: usize, toks: &[Token]) -> Result<Statement> {
    let mut sql = String::with_capacity(end - start);
    let mut params: Vec<Placeholder> = Vec::new();
    let mut copied = start;
    for t in toks {
        match &t.kind {
            TokKind::Param { name, ty } => {
                sql.push_str(&text[copied..t.start]);
                let idx = match params.iter().position(|p| &p.name == name) {
                    Some(k) if params[k].ty != *ty => {
                        return Err(Error::new(
                            ErrorCode::BadQueryParameter,
                            format!(
                                "Query parameter '{name}' is declared with two types: {} and {ty}",
                                params[k].ty
                            ),
                        ));
                    }
                    Some(k) => k,
                    None => {
                        params.push(Placeholder {
                            name: name.clone(),
                            ty: ty.clone(),
                        });
                        params.len() - 1
                    }
                };
                sql.push_str(&format!("?{}", idx + 1));
                copied = t.end;
            }
            TokKind::NativeParam => {
                return Err(Error::syntax(format!(
                    "Native SQLite parameter '{}' is not supported; write {{name:Type}} and pass param_name= in the URL",
                    t.text(text)
                )));
            }
            _ => {}
        }
    }
    sql.push_str(&text[copied..end]);
    let verb = toks
        .first()
        .map(|t| t.text(text).to_ascii_uppercase())
        .unwrap_or_default();
    let or_replace = verb == "REPLACE"
        || toks
            .windows(2)
            .any(|w| w[0].is_word(text, "OR") && w[1].is_word(text, "REPLACE"));
    Ok(Statement {
        sql: sql.trim().to_string(),
        params,
        verb,
        ctes: cte_names(text, toks),
        or_replace,
        write_target: write_target(text, toks),
    })
}

/// Find the target of an UPDATE/DELETE and whether anything else could be read; see
/// [`Statement::write_target`]. Conservative: when in doubt, `reads_other` is true.
fn write_target(text: &str, toks: &[Token]) -> Option<WriteTarget> {
    let first = toks.first()?;
    let with = first.is_word(text, "WITH");
    // The main verb: the first depth-0 UPDATE/DELETE (CTE bodies are inside parentheses).
    let mut depth = 0i64;
    let mut verb_at = None;
    for (i, t) in toks.iter().enumerate() {
        match t.kind {
            TokKind::LParen => depth += 1,
            TokKind::RParen => depth -= 1,
            TokKind::Word if depth == 0 => {
                if t.is_word(text, "UPDATE") || t.is_word(text, "DELETE") {
                    verb_at = Some(i);
                    break;
                }
                if t.is_word(text, "SELECT")
                    || t.is_word(text, "INSERT")
                    || t.is_word(text, "REPLACE")
                    || t.is_word(text, "VALUES")
                {
                    return None;
                }
            }
            _ => {}
        }
        if !with && i > 0 {
            return None;
        }
    }
    let v = verb_at?;
    let is_update = toks[v].is_word(text, "UPDATE");
    let mut i = v + 1;
    if is_update {
        if toks.get(i).is_some_and(|t| t.is_word(text, "OR")) {
            i += 2;
        }
    } else if toks.get(i).is_some_and(|t| t.is_word(text, "FROM")) {
        i += 1;
    }
    let is_name = |t: &Token| matches!(t.kind, TokKind::Word | TokKind::QuotedIdent);
    // The lexer keeps `main.t` (and `main.` before a quoted name) in one word.
    let head = toks.get(i).filter(|t| is_name(t))?;
    let mut name = match head.kind {
        TokKind::Word => head.text(text).rsplit('.').next().unwrap_or("").to_string(),
        _ => unquote(head.text(text)),
    };
    let mut target_end = i + 1;
    if name.is_empty() {
        name = unquote(toks.get(i + 1).filter(|t| is_name(t))?.text(text));
        target_end = i + 2;
    } else if toks.get(i + 1).is_some_and(|t| t.kind == TokKind::Punct && t.text(text) == ".") {
        name = unquote(toks.get(i + 2).filter(|t| is_name(t))?.text(text));
        target_end = i + 3;
    }
    let mut reads_other = with;
    for (k, t) in toks.iter().enumerate() {
        if t.kind != TokKind::Word {
            continue;
        }
        if t.is_word(text, "SELECT") || t.is_word(text, "VALUES") {
            reads_other = true;
        }
        // `UPDATE v ... FROM x` and a second FROM in DELETE; `IS [NOT] DISTINCT FROM` is not one.
        if t.is_word(text, "FROM")
            && k >= target_end
            && !(k > 0 && toks[k - 1].is_word(text, "DISTINCT"))
        {
            reads_other = true;
        }
        // `x IN table` / `x IN schema.table` / `x IN table_function(...)`.
        if t.is_word(text, "IN") && toks.get(k + 1).is_some_and(|n| is_name(n)) {
            reads_other = true;
        }
    }
    Some(WriteTarget { name, reads_other })
}

/// Every `name [(cols)] AS [NOT] [MATERIALIZED] (` in the statement: the names of its CTEs
/// (window definitions match too, which only makes the check that uses this stricter).
fn cte_names(text: &str, toks: &[Token]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, t) in toks.iter().enumerate() {
        if !matches!(t.kind, TokKind::Word | TokKind::QuotedIdent) {
            continue;
        }
        let mut j = i + 1;
        if toks.get(j).is_some_and(|n| n.kind == TokKind::LParen) {
            let mut depth = 0usize;
            while let Some(n) = toks.get(j) {
                match n.kind {
                    TokKind::LParen => depth += 1,
                    TokKind::RParen => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            j += 1;
        }
        if !toks.get(j).is_some_and(|n| n.is_word(text, "AS")) {
            continue;
        }
        j += 1;
        if toks.get(j).is_some_and(|n| n.is_word(text, "NOT")) {
            j += 1;
        }
        if toks.get(j).is_some_and(|n| n.is_word(text, "MATERIALIZED")) {
            j += 1;
        }
        if toks.get(j).is_some_and(|n| n.kind == TokKind::LParen) {
            out.push(unquote(t.text(text)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_clause_and_params() {
        let p = parse("SELECT {a:Int64} + {a:Int64}, {b:String} FORMAT JSON").unwrap();
        assert_eq!(p.format.as_deref(), Some("JSON"));
        assert_eq!(p.statements.len(), 1);
        assert_eq!(p.statements[0].sql, "SELECT ?1 + ?1, ?2");
        assert_eq!(p.statements[0].params.len(), 2);
    }

    #[test]
    fn format_as_column_name_is_not_a_clause() {
        let p = parse("SELECT format FROM t").unwrap();
        assert_eq!(p.format, None);
        let p = parse("SELECT format('%d', 1)").unwrap();
        assert_eq!(p.format, None);
    }

    #[test]
    fn multi_statements_and_triggers() {
        let p = parse("CREATE TABLE a(x); CREATE TRIGGER tr AFTER INSERT ON a BEGIN INSERT INTO a VALUES (1); SELECT 1; END; SELECT 'x;y';").unwrap();
        assert_eq!(p.statements.len(), 3, "{:?}", p.statements);
        assert!(p.statements[1].sql.ends_with("END"));
    }

    #[test]
    fn insert_with_inline_data() {
        let p =
            parse("INSERT INTO \"my t\" (a, \"b c\") FORMAT JSONEachRow\n{\"a\":1} 'unbalanced")
                .unwrap();
        assert!(
            p.statements.is_empty(),
            "the insert head is not a statement of its own"
        );
        let (t, data) = p.insert.unwrap();
        assert_eq!(t.table, "\"my t\"");
        assert_eq!(t.columns, Some(vec!["a".into(), "b c".into()]));
        assert_eq!(t.format, "JSONEachRow");
        assert_eq!(data, "{\"a\":1} 'unbalanced");
        assert_eq!(t.head, "INSERT INTO");
    }

    #[test]
    fn cte_names_are_found() {
        let p = parse("WITH a AS (SELECT 1), \"b c\"(x) AS MATERIALIZED (SELECT 2) SELECT * FROM a, [b c] WINDOW w AS (ORDER BY 1)").unwrap();
        assert_eq!(
            p.statements[0].ctes,
            vec!["a".to_string(), "b c".to_string(), "w".to_string()]
        );
        let p = parse("SELECT CAST(x AS TEXT) FROM t").unwrap();
        assert!(p.statements[0].ctes.is_empty());
    }

    #[test]
    fn write_targets() {
        let t = |sql: &str| parse(sql).unwrap().statements[0].write_target.clone();
        let plain = |name: &str| Some(WriteTarget { name: name.into(), reads_other: false });
        let reads = |name: &str| Some(WriteTarget { name: name.into(), reads_other: true });
        assert_eq!(t("UPDATE my_notes SET body = upper(body) WHERE id = 1"), plain("my_notes"));
        assert_eq!(t("update or abort main.\"My Notes\" set a=1"), plain("My Notes"));
        assert_eq!(t("DELETE FROM v WHERE a IS NOT DISTINCT FROM b"), plain("v"));
        assert_eq!(t("DELETE FROM main.v WHERE EXISTS (SELECT 1)"), reads("v"));
        assert_eq!(t("DELETE FROM \"main\".v"), plain("v"));
        assert_eq!(t("DELETE FROM main.\"V w\""), plain("V w"));
        assert_eq!(t("DELETE FROM v WHERE id IN (1, 2)"), plain("v"));
        assert_eq!(t("UPDATE v SET b = (SELECT x FROM s)"), reads("v"));
        assert_eq!(t("UPDATE v SET b = d.x FROM (SELECT 1 AS x) AS d"), reads("v"));
        assert_eq!(t("UPDATE v SET b = 1 FROM s"), reads("v"));
        assert_eq!(t("DELETE FROM v WHERE id IN s"), reads("v"));
        assert_eq!(t("DELETE FROM v WHERE id IN main.s"), reads("v"));
        assert_eq!(t("DELETE FROM v WHERE id IN json_each('[1]')"), reads("v"));
        assert_eq!(t("DELETE FROM v WHERE EXISTS (VALUES (1))"), reads("v"));
        assert_eq!(t("UPDATE v SET b = 1 RETURNING (SELECT 1)"), reads("v"));
        assert_eq!(t("WITH c AS (SELECT 1) UPDATE v SET b = 1"), reads("v"));
        assert_eq!(t("WITH c(x) AS (SELECT 1) DELETE FROM v"), reads("v"));
        assert_eq!(t("SELECT * FROM v"), None);
        assert_eq!(t("INSERT INTO v SELECT 1"), None);
        assert_eq!(t("WITH c AS (SELECT 1) SELECT * FROM c"), None);
    }

    #[test]
    fn native_params_rejected() {
        assert!(parse("SELECT ?").is_err());
    }
}
