//! Typed query parameters: `{name:Type}` placeholders and their `param_name=value` values.
//!
//! Values arrive in ClickHouse's *escaped* text form (`\N` is NULL, `\t` a tab, `\\` a
//! backslash); arrays in ClickHouse literal form (`[1,2]`, `['a','b']`) or JSON. Each value is
//! checked against its declared type and turned into a SQLite value that is *bound* to the
//! statement; the SQL text never changes.

use rusqlite::types::Value;
use serde_json::Value as Json;

use crate::core::{Error, ErrorCode, Result};

/// A declared parameter type.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamType {
    String,
    FixedString(usize),
    Int { bits: u32, signed: bool },
    Float,
    Bool,
    Date,
    DateTime,
    Uuid,
    Json,
    Nullable(Box<ParamType>),
    Array(Box<ParamType>),
}

const SUPPORTED: &str = "String, FixedString(N), Int8..Int64, UInt8..UInt64, Float32, Float64, Bool, Date, DateTime, UUID, JSON, Nullable(T), Array(T), LowCardinality(T)";

impl ParamType {
    pub fn parse(s: &str) -> Result<ParamType> {
        let s = s.trim();
        let unknown = || {
            Error::new(
                ErrorCode::UnknownType,
                format!(
                    "Unknown or unsupported query parameter type '{s}'; supported: {SUPPORTED}"
                ),
            )
        };
        if let Some(open) = s.find('(') {
            let (head, rest) = s.split_at(open);
            let inner = rest
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(unknown)?;
            return Ok(match head.trim() {
                "Nullable" => ParamType::Nullable(Box::new(ParamType::parse(inner)?)),
                "Array" => ParamType::Array(Box::new(ParamType::parse(inner)?)),
                "LowCardinality" => ParamType::parse(inner)?,
                "FixedString" => {
                    ParamType::FixedString(inner.trim().parse().map_err(|_| unknown())?)
                }
                "DateTime" | "DateTime64" => ParamType::DateTime,
                _ => return Err(unknown()),
            });
        }
        Ok(match s {
            "String" => ParamType::String,
            "Int8" => ParamType::Int {
                bits: 8,
                signed: true,
            },
            "Int16" => ParamType::Int {
                bits: 16,
                signed: true,
            },
            "Int32" => ParamType::Int {
                bits: 32,
                signed: true,
            },
            "Int64" => ParamType::Int {
                bits: 64,
                signed: true,
            },
            "UInt8" => ParamType::Int {
                bits: 8,
                signed: false,
            },
            "UInt16" => ParamType::Int {
                bits: 16,
                signed: false,
            },
            "UInt32" => ParamType::Int {
                bits: 32,
                signed: false,
            },
            "UInt64" => ParamType::Int {
                bits: 64,
                signed: false,
            },
            "Float32" | "Float64" => ParamType::Float,
            "Bool" | "Boolean" => ParamType::Bool,
            "Date" | "Date32" => ParamType::Date,
            "DateTime" | "DateTime64" => ParamType::DateTime,
            "UUID" => ParamType::Uuid,
            "JSON" => ParamType::Json,
            "Identifier" => {
                return Err(Error::new(
                    ErrorCode::NotImplemented,
                    "Query parameters of type Identifier are not supported: ichibase binds every parameter as a value and never splices text into SQL",
                ));
            }
            _ => return Err(unknown()),
        })
    }
}

fn bad(name: &str, ty: &str, raw: &str, why: &str) -> Error {
    let shown: String = raw.chars().take(64).collect();
    Error::new(
        ErrorCode::BadQueryParameter,
        format!("Value '{shown}' cannot be parsed as {ty} for query parameter '{name}': {why}"),
    )
}

/// Undo ClickHouse's escaping of a text value.
pub fn unescape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut it = raw.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some('0') => out.push('\0'),
            Some('a') => out.push('\u{7}'),
            Some('v') => out.push('\u{b}'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// Parse the URL value `raw` of parameter `name` declared as `ty_text`.
pub fn bind_value(name: &str, ty_text: &str, raw: &str) -> Result<Value> {
    let ty = ParamType::parse(ty_text)?;
    match &ty {
        ParamType::Nullable(inner) if raw == "\\N" => {
            let _ = inner;
            Ok(Value::Null)
        }
        ParamType::Nullable(inner) => scalar(name, ty_text, inner, raw),
        ParamType::Array(elem) => {
            let items = parse_array_literal(raw).map_err(|why| bad(name, ty_text, raw, &why))?;
            let json = Json::Array(
                items
                    .into_iter()
                    .map(|it| array_elem(name, ty_text, elem, it))
                    .collect::<Result<Vec<_>>>()?,
            );
            Ok(Value::Text(json.to_string()))
        }
        _ => scalar(name, ty_text, &ty, raw),
    }
}

fn scalar(name: &str, ty_text: &str, ty: &ParamType, raw: &str) -> Result<Value> {
    if raw == "\\N" {
        return Err(bad(
            name,
            ty_text,
            raw,
            "NULL is only allowed for Nullable(...) types",
        ));
    }
    let text = unescape(raw);
    typed_text(name, ty_text, ty, &text).map_err(|why| bad(name, ty_text, raw, &why))
}

fn typed_text(
    name: &str,
    ty_text: &str,
    ty: &ParamType,
    text: &str,
) -> std::result::Result<Value, String> {
    Ok(match ty {
        ParamType::String => Value::Text(text.to_string()),
        ParamType::FixedString(n) => {
            if text.len() > *n {
                return Err(format!("longer than {n} bytes"));
            }
            Value::Text(text.to_string())
        }
        ParamType::Int { bits, signed } => Value::Integer(parse_int(text.trim(), *bits, *signed)?),
        ParamType::Float => Value::Real(parse_float(text.trim())?),
        ParamType::Bool => Value::Integer(match text.trim().to_ascii_lowercase().as_str() {
            "1" | "true" => 1,
            "0" | "false" => 0,
            _ => return Err("expected true, false, 1 or 0".into()),
        }),
        ParamType::Date => Value::Text(parse_date(text.trim())?),
        ParamType::DateTime => Value::Text(parse_datetime(text.trim())?),
        ParamType::Uuid => Value::Text(
            uuid::Uuid::parse_str(text.trim())
                .map_err(|e| e.to_string())?
                .hyphenated()
                .to_string(),
        ),
        ParamType::Json => {
            let v: Json = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
            Value::Text(v.to_string())
        }
        ParamType::Nullable(inner) => typed_text(name, ty_text, inner, text)?,
        ParamType::Array(_) => return Err("nested arrays must be written as array literals".into()),
    })
}

fn parse_int(t: &str, bits: u32, signed: bool) -> std::result::Result<i64, String> {
    let v: i128 = t.parse().map_err(|_| "not an integer".to_string())?;
    let (lo, hi): (i128, i128) = if signed {
        (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1)
    } else {
        (0, (1i128 << bits) - 1)
    };
    if v < lo || v > hi {
        return Err(format!("out of range [{lo}, {hi}]"));
    }
    i64::try_from(v)
        .map_err(|_| "above 9223372036854775807, the largest integer SQLite stores".to_string())
}

fn parse_float(t: &str) -> std::result::Result<f64, String> {
    match t.to_ascii_lowercase().as_str() {
        "nan" | "+nan" | "-nan" => Ok(f64::NAN),
        "inf" | "+inf" | "infinity" => Ok(f64::INFINITY),
        "-inf" | "-infinity" => Ok(f64::NEG_INFINITY),
        _ => t.parse::<f64>().map_err(|_| "not a number".into()),
    }
}

fn parse_date(t: &str) -> std::result::Result<String, String> {
    let b = t.as_bytes();
    let ok = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !ok {
        return Err("expected YYYY-MM-DD".into());
    }
    let (m, d): (u32, u32) = (t[5..7].parse().unwrap(), t[8..10].parse().unwrap());
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err("month or day out of range".into());
    }
    Ok(t.to_string())
}

/// `YYYY-MM-DD hh:mm:ss[.fff]` (a `T` separator is accepted) or a Unix timestamp, as UTC text.
fn parse_datetime(t: &str) -> std::result::Result<String, String> {
    if !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit() || c == b'.') {
        let secs: f64 = t.parse().map_err(|_| "not a timestamp")?;
        let whole = secs.trunc() as i64;
        let (days, rem) = (whole.div_euclid(86_400), whole.rem_euclid(86_400));
        let (y, m, d) = civil_from_days(days);
        let frac = ((secs - secs.trunc()) * 1000.0).round() as i64;
        let base = format!(
            "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        );
        return Ok(if frac > 0 {
            format!("{base}.{frac:03}")
        } else {
            base
        });
    }
    if t.len() < 19 || !t.is_ascii() {
        return Err("expected 'YYYY-MM-DD hh:mm:ss' or a Unix timestamp".into());
    }
    parse_date(&t[..10])?;
    let time = &t[11..];
    let sep = t.as_bytes()[10];
    let tb = time.as_bytes();
    let ok = (sep == b' ' || sep == b'T')
        && tb.len() >= 8
        && tb[2] == b':'
        && tb[5] == b':'
        && tb[..8]
            .iter()
            .enumerate()
            .all(|(i, c)| i == 2 || i == 5 || c.is_ascii_digit())
        && (tb.len() == 8
            || (tb[8] == b'.' && tb.len() > 9 && tb[9..].iter().all(u8::is_ascii_digit)));
    if !ok {
        return Err("expected 'YYYY-MM-DD hh:mm:ss' or a Unix timestamp".into());
    }
    Ok(format!("{} {}", &t[..10], time))
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Bind a JSON value (from Lua, or a JSON API) to parameter `name` declared as `ty_text`.
pub fn bind_json(name: &str, ty_text: &str, v: &Json) -> Result<Value> {
    let ty = ParamType::parse(ty_text)?;
    json_typed(name, ty_text, &ty, v)
}

fn json_typed(name: &str, ty_text: &str, ty: &ParamType, v: &Json) -> Result<Value> {
    let shown = || v.to_string().chars().take(64).collect::<String>();
    let err = |why: &str| bad(name, ty_text, &shown(), why);
    match (ty, v) {
        (ParamType::Nullable(_), Json::Null) => Ok(Value::Null),
        (_, Json::Null) => Err(err("NULL is only allowed for Nullable(...) types")),
        (ParamType::Nullable(inner), _) => json_typed(name, ty_text, inner, v),
        (ParamType::Array(elem), Json::Array(items)) => {
            let items = items
                .iter()
                .map(|i| {
                    Ok(match json_typed(name, ty_text, elem, i)? {
                        Value::Null => Json::Null,
                        Value::Integer(n) if **elem == ParamType::Bool => Json::Bool(n != 0),
                        Value::Integer(n) => Json::from(n),
                        Value::Real(f) => serde_json::Number::from_f64(f)
                            .map(Json::Number)
                            .unwrap_or(Json::Null),
                        Value::Text(t)
                            if matches!(**elem, ParamType::Json | ParamType::Array(_)) =>
                        {
                            serde_json::from_str(&t).unwrap_or(Json::Null)
                        }
                        Value::Text(t) => Json::String(t),
                        Value::Blob(_) => Json::Null,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Value::Text(Json::Array(items).to_string()))
        }
        (ParamType::Array(_), _) => Err(err("expected an array")),
        (ParamType::Json, v) => Ok(Value::Text(v.to_string())),
        (ParamType::Bool, Json::Bool(b)) => Ok(Value::Integer(*b as i64)),
        (ParamType::Int { bits, signed }, Json::Number(n)) => match n.as_i64() {
            Some(i) => Ok(Value::Integer(
                parse_int(&i.to_string(), *bits, *signed).map_err(|w| err(&w))?,
            )),
            None if n
                .as_f64()
                .is_some_and(|f| f.fract() == 0.0 && f.abs() < 9.0e15) =>
            {
                Ok(Value::Integer(
                    parse_int(&(n.as_f64().unwrap() as i64).to_string(), *bits, *signed)
                        .map_err(|w| err(&w))?,
                ))
            }
            None => Err(err("not an integer")),
        },
        (ParamType::Float, Json::Number(n)) => Ok(Value::Real(n.as_f64().unwrap_or(f64::NAN))),
        (_, Json::String(s)) => typed_text(name, ty_text, ty, s).map_err(|w| err(&w)),
        (ParamType::String | ParamType::FixedString(_), Json::Number(n)) => {
            Ok(Value::Text(n.to_string()))
        }
        _ => Err(err("wrong kind of value")),
    }
}

/// One element of an array literal before typing.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Null,
    Quoted(String),
    Bare(String),
    List(Vec<Item>),
}

fn array_elem(name: &str, ty_text: &str, ty: &ParamType, it: Item) -> Result<Json> {
    let err = |why: &str| bad(name, ty_text, &format!("{it:?}"), why);
    match (ty, it.clone()) {
        (ParamType::Nullable(_), Item::Null) => Ok(Json::Null),
        (_, Item::Null) => Err(err("NULL element in an array of a non-Nullable type")),
        (ParamType::Nullable(inner), _) => array_elem(name, ty_text, inner, it),
        (ParamType::Array(inner), Item::List(items)) => Ok(Json::Array(
            items
                .into_iter()
                .map(|i| array_elem(name, ty_text, inner, i))
                .collect::<Result<_>>()?,
        )),
        (ParamType::Array(_), _) => Err(err("expected a nested array")),
        (_, Item::List(_)) => Err(err("unexpected nested array")),
        (ParamType::Json, Item::Quoted(s) | Item::Bare(s)) => {
            serde_json::from_str(&s).map_err(|e| err(&format!("invalid JSON: {e}")))
        }
        (_, Item::Quoted(s) | Item::Bare(s)) => {
            let v = typed_text(name, ty_text, ty, &s).map_err(|why| err(&why))?;
            Ok(match v {
                Value::Null => Json::Null,
                Value::Integer(i) if *ty == ParamType::Bool => Json::Bool(i != 0),
                Value::Integer(i) => Json::from(i),
                Value::Real(f) => serde_json::Number::from_f64(f)
                    .map(Json::Number)
                    .ok_or_else(|| err("NaN and infinities cannot be stored in JSON arrays"))?,
                Value::Text(t) => Json::String(t),
                Value::Blob(_) => unreachable!("parameters never produce blobs"),
            })
        }
    }
}

/// Parse `[a, 'b', "c", NULL, [1,2]]`: ClickHouse literals (single quotes, backslash escapes)
/// or JSON (double quotes, JSON escapes).
pub fn parse_array_literal(raw: &str) -> std::result::Result<Vec<Item>, String> {
    let chars: Vec<char> = raw.trim().chars().collect();
    let mut pos = 0;
    let v = parse_list(&chars, &mut pos)?;
    skip_ws(&chars, &mut pos);
    if pos != chars.len() {
        return Err(format!(
            "unexpected text after the closing ']' at character {pos}"
        ));
    }
    Ok(v)
}

fn skip_ws(c: &[char], pos: &mut usize) {
    while *pos < c.len() && c[*pos].is_whitespace() {
        *pos += 1;
    }
}

fn parse_list(c: &[char], pos: &mut usize) -> std::result::Result<Vec<Item>, String> {
    skip_ws(c, pos);
    if c.get(*pos) != Some(&'[') {
        return Err("an array must start with '['".into());
    }
    *pos += 1;
    let mut items = Vec::new();
    skip_ws(c, pos);
    if c.get(*pos) == Some(&']') {
        *pos += 1;
        return Ok(items);
    }
    loop {
        skip_ws(c, pos);
        let item = match c.get(*pos) {
            None => return Err("unterminated array".into()),
            Some('[') => Item::List(parse_list(c, pos)?),
            Some(&q @ ('\'' | '"')) => {
                *pos += 1;
                let mut s = String::new();
                loop {
                    match c.get(*pos) {
                        None => return Err("unterminated string in array".into()),
                        Some(&ch) if ch == q => {
                            *pos += 1;
                            break;
                        }
                        Some('\\') => {
                            *pos += 1;
                            let e = *c.get(*pos).ok_or("dangling backslash")?;
                            *pos += 1;
                            match e {
                                'u' if q == '"' => {
                                    let hex: String = c
                                        .get(*pos..*pos + 4)
                                        .ok_or("short \\u escape")?
                                        .iter()
                                        .collect();
                                    *pos += 4;
                                    let cp = u32::from_str_radix(&hex, 16)
                                        .map_err(|_| "bad \\u escape")?;
                                    s.push(char::from_u32(cp).unwrap_or('\u{fffd}'));
                                }
                                other => s.push_str(&unescape(&format!("\\{other}"))),
                            }
                        }
                        Some(&ch) => {
                            s.push(ch);
                            *pos += 1;
                        }
                    }
                }
                Item::Quoted(s)
            }
            Some(_) => {
                let start = *pos;
                while *pos < c.len() && c[*pos] != ',' && c[*pos] != ']' {
                    *pos += 1;
                }
                let word: String = c[start..*pos].iter().collect::<String>().trim().to_string();
                if word.is_empty() {
                    return Err("empty array element".into());
                }
                if word.eq_ignore_ascii_case("null") {
                    Item::Null
                } else {
                    Item::Bare(word)
                }
            }
        };
        items.push(item);
        skip_ws(c, pos);
        match c.get(*pos) {
            Some(',') => *pos += 1,
            Some(']') => {
                *pos += 1;
                return Ok(items);
            }
            _ => return Err("expected ',' or ']' in array".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars() {
        assert_eq!(
            bind_value("a", "String", "x\\ty\\\\").unwrap(),
            Value::Text("x\ty\\".into())
        );
        assert_eq!(
            bind_value("a", "Int64", "-42").unwrap(),
            Value::Integer(-42)
        );
        assert_eq!(
            bind_value("a", "UInt8", "255").unwrap(),
            Value::Integer(255)
        );
        assert!(bind_value("a", "UInt8", "256").is_err());
        assert!(bind_value("a", "Int64", "12abc").is_err());
        assert_eq!(bind_value("a", "Float64", "1.5").unwrap(), Value::Real(1.5));
        assert_eq!(bind_value("a", "Bool", "true").unwrap(), Value::Integer(1));
        assert_eq!(
            bind_value("a", "Nullable(Int64)", "\\N").unwrap(),
            Value::Null
        );
        assert!(bind_value("a", "Int64", "\\N").is_err());
        assert_eq!(
            bind_value("a", "DateTime", "0").unwrap(),
            Value::Text("1970-01-01 00:00:00".into())
        );
        assert_eq!(
            bind_value("a", "DateTime", "1700000000").unwrap(),
            Value::Text("2023-11-14 22:13:20".into())
        );
        assert_eq!(
            bind_value("a", "Date", "2024-02-29").unwrap(),
            Value::Text("2024-02-29".into())
        );
        assert!(bind_value("a", "Date", "2024-13-01").is_err());
    }

    #[test]
    fn arrays_in_clickhouse_and_json_form() {
        assert_eq!(
            bind_value("a", "Array(Int64)", "[1, 2,3]").unwrap(),
            Value::Text("[1,2,3]".into())
        );
        assert_eq!(
            bind_value("a", "Array(String)", "['it\\'s','b']").unwrap(),
            Value::Text("[\"it's\",\"b\"]".into())
        );
        assert_eq!(
            bind_value("a", "Array(String)", "[\"x\\u00e9\"]").unwrap(),
            Value::Text("[\"xé\"]".into())
        );
        assert_eq!(
            bind_value("a", "Array(Nullable(Int64))", "[1,NULL]").unwrap(),
            Value::Text("[1,null]".into())
        );
        assert_eq!(
            bind_value("a", "Array(Array(Int64))", "[[1],[]]").unwrap(),
            Value::Text("[[1],[]]".into())
        );
        assert_eq!(
            bind_value("a", "Array(Bool)", "[TRUE,false]").unwrap(),
            Value::Text("[true,false]".into())
        );
        assert!(bind_value("a", "Array(Int64)", "[1,'x']").is_err());
        assert!(bind_value("a", "Array(Int64)", "[1,NULL]").is_err());
        assert!(bind_value("a", "Array(Int64)", "1,2").is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_values_never_panic(v in ".*", pick in 0usize..14) {
            let types = ["String", "FixedString(3)", "Int8", "UInt64", "Float64", "Bool", "Date", "DateTime", "UUID", "JSON",
                "Nullable(Date)", "Array(DateTime)", "Array(Array(Nullable(String)))", "Array(JSON)"];
            let _ = bind_value("p", types[pick], &v);
        }

        #[test]
        fn arbitrary_sql_never_panics(sql in ".*") {
            let _ = crate::sql::parse::parse(&sql);
        }
    }

    #[test]
    fn unknown_types() {
        assert_eq!(
            bind_value("a", "Map(String,Int64)", "{}").unwrap_err().code,
            ErrorCode::UnknownType
        );
        assert_eq!(
            bind_value("a", "Identifier", "t").unwrap_err().code,
            ErrorCode::NotImplemented
        );
    }
}
