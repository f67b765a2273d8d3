//! A small SQLite-aware lexer: enough to find statement boundaries, `{name:Type}` placeholders,
//! a trailing `FORMAT X` clause and where inline insert data starts, without ever looking inside
//! string literals, quoted identifiers or comments. SQLite itself still parses the SQL.

use crate::core::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokKind {
    /// Keyword or bare identifier (also numbers and blob-literal prefixes).
    Word,
    /// `'...'` string literal.
    Str,
    /// `"..."`, `` `...` `` or `[...]` identifier.
    QuotedIdent,
    /// `{name:Type}` query parameter.
    Param {
        name: String,
        ty: String,
    },
    /// Native SQLite parameter (`?`, `?1`, `:x`, `@x`, `$x`), which ichibase does not bind.
    NativeParam,
    Semicolon,
    LParen,
    RParen,
    /// Any other punctuation / operator character.
    Punct,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub kind: TokKind,
    pub start: usize,
    pub end: usize,
}

impl Token {
    pub fn text<'a>(&self, src: &'a str) -> &'a str {
        &src[self.start..self.end]
    }
    pub fn is_word(&self, src: &str, w: &str) -> bool {
        self.kind == TokKind::Word && self.text(src).eq_ignore_ascii_case(w)
    }
}

pub struct Lexer<'a> {
    src: &'a str,
    pos: usize,
}

fn is_ident_start(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || !c.is_ascii()
}
fn is_ident_char(c: char) -> bool {
    is_ident_start(c) || c == '$' || c == '.'
}

impl<'a> Lexer<'a> {
    pub fn new(src: &'a str) -> Self {
        Lexer { src, pos: 0 }
    }

    /// Byte offset just past the last token returned.
    pub fn pos(&self) -> usize {
        self.pos
    }

    fn peek(&self) -> Option<char> {
        self.src[self.pos..].chars().next()
    }

    fn skip_trivia(&mut self) -> Result<()> {
        loop {
            let rest = &self.src[self.pos..];
            if let Some(c) = rest.chars().next().filter(|c| c.is_whitespace()) {
                self.pos += c.len_utf8();
            } else if rest.starts_with("--") {
                self.pos += rest.find('\n').map_or(rest.len(), |i| i + 1);
            } else if rest.starts_with("/*") {
                // SQLite accepts an unterminated block comment at the end of input.
                self.pos += rest[2..].find("*/").map_or(rest.len(), |i| i + 4);
            } else {
                return Ok(());
            }
        }
    }

    /// Scan a quoted run closed by `close`, where a doubled `close` is an escaped one.
    fn quoted(&mut self, close: char, doubled_escapes: bool, what: &str) -> Result<()> {
        let start = self.pos;
        self.pos += 1;
        loop {
            match self.src[self.pos..].find(close) {
                None => {
                    return Err(Error::syntax(format!(
                        "Unterminated {what} starting at offset {start}"
                    )));
                }
                Some(i) => {
                    self.pos += i + close.len_utf8();
                    if doubled_escapes && self.src[self.pos..].starts_with(close) {
                        self.pos += close.len_utf8();
                        continue;
                    }
                    return Ok(());
                }
            }
        }
    }

    pub fn next_token(&mut self) -> Result<Option<Token>> {
        self.skip_trivia()?;
        let start = self.pos;
        let Some(c) = self.peek() else {
            return Ok(None);
        };
        let kind = match c {
            '\'' => {
                self.quoted('\'', true, "string literal")?;
                TokKind::Str
            }
            '"' => {
                self.quoted('"', true, "quoted identifier")?;
                TokKind::QuotedIdent
            }
            '`' => {
                self.quoted('`', true, "quoted identifier")?;
                TokKind::QuotedIdent
            }
            '[' => {
                self.quoted(']', false, "bracketed identifier")?;
                TokKind::QuotedIdent
            }
            ';' => {
                self.pos += 1;
                TokKind::Semicolon
            }
            '(' => {
                self.pos += 1;
                TokKind::LParen
            }
            ')' => {
                self.pos += 1;
                TokKind::RParen
            }
            '{' => self.placeholder()?,
            '?' => {
                self.pos += 1;
                while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                    self.pos += 1;
                }
                TokKind::NativeParam
            }
            ':' | '@' | '$'
                if self.src[self.pos + 1..]
                    .chars()
                    .next()
                    .is_some_and(is_ident_start) =>
            {
                self.pos += 1;
                while self.peek().is_some_and(|c| is_ident_char(c) || c == ':') {
                    self.pos += self.peek().unwrap().len_utf8();
                }
                TokKind::NativeParam
            }
            c if is_ident_start(c) => {
                while let Some(c) = self.peek().filter(|c| is_ident_char(*c)) {
                    self.pos += c.len_utf8();
                }
                TokKind::Word
            }
            c => {
                self.pos += c.len_utf8();
                TokKind::Punct
            }
        };
        Ok(Some(Token {
            kind,
            start,
            end: self.pos,
        }))
    }

    /// `{name:Type}`; the type may hold parentheses and commas (`Nullable(Array(Int64))`).
    fn placeholder(&mut self) -> Result<TokKind> {
        let start = self.pos;
        let rest = &self.src[start..];
        let Some(close) = rest.find('}') else {
            return Err(Error::syntax(format!(
                "Unterminated query parameter '{{' at offset {start}"
            )));
        };
        let inner = &rest[1..close];
        let Some((name, ty)) = inner.split_once(':') else {
            return Err(Error::syntax(format!(
                "Query parameter '{{{inner}}}' at offset {start} must have the form {{name:Type}}"
            )));
        };
        let (name, ty) = (name.trim(), ty.trim());
        if name.is_empty()
            || !name.chars().all(|c| c.is_alphanumeric() || c == '_')
            || ty.is_empty()
        {
            return Err(Error::syntax(format!(
                "Query parameter '{{{inner}}}' at offset {start} must have the form {{name:Type}} with a name of letters, digits and '_'"
            )));
        }
        self.pos = start + close + 1;
        Ok(TokKind::Param {
            name: name.to_string(),
            ty: ty.to_string(),
        })
    }
}

/// Every token of `src`.
pub fn tokenize(src: &str) -> Result<Vec<Token>> {
    let mut lx = Lexer::new(src);
    let mut out = Vec::new();
    while let Some(t) = lx.next_token()? {
        out.push(t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(s: &str) -> Vec<TokKind> {
        tokenize(s).unwrap().into_iter().map(|t| t.kind).collect()
    }

    #[test]
    fn placeholders_outside_literals_only() {
        let k = kinds(
            "SELECT '{a:String}', \"{b:Int64}\", {c:Nullable(Array(Int64))} -- {d:String}\n /* {e:X} */",
        );
        let params: Vec<_> = k
            .iter()
            .filter_map(|k| {
                if let TokKind::Param { name, ty } = k {
                    Some((name.clone(), ty.clone()))
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(
            params,
            vec![("c".to_string(), "Nullable(Array(Int64))".to_string())]
        );
    }

    #[test]
    fn doubled_quotes_and_semicolons_in_strings() {
        let k = kinds("SELECT 'it''s;'; SELECT 2");
        assert_eq!(k.iter().filter(|k| **k == TokKind::Semicolon).count(), 1);
    }

    #[test]
    fn native_params_are_seen() {
        assert!(kinds("SELECT ?1").contains(&TokKind::NativeParam));
        assert!(kinds("SELECT :x").contains(&TokKind::NativeParam));
        assert!(!kinds("SELECT 'a:x'").contains(&TokKind::NativeParam));
    }

    #[test]
    fn bad_input_is_a_syntax_error() {
        assert!(tokenize("SELECT 'abc").is_err());
        assert!(tokenize("SELECT {x}").is_err());
        assert!(tokenize("SELECT {x:String").is_err());
    }
}
