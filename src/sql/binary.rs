//! ClickHouse's binary formats: `Native` (columnar blocks), `RowBinary` and
//! `RowBinaryWithNamesAndTypes`, as output of queries and as input of inserts.
//!
//! Layouts (ClickHouse's "Formats for input and output data"): integers and floats are
//! little-endian, `String` is a LEB128 length then the bytes, `Nullable(T)` is a null flag
//! (RowBinary: one byte before the value, absent value when 1; Native: a byte map of the whole
//! column before the values, with a default value in place of every NULL). A Native block is
//! `columns, rows` (LEB128), then per column its name, its type name and its data. Over HTTP
//! without `client_protocol_version` there is no block-info prefix.
//!
//! SQLite values are dynamically typed: a value that does not fit the column's type (text in
//! an `Int64` column) is converted when it can be without loss, else the query fails with a
//! message naming the column.

use rusqlite::types::{Value, ValueRef};

use crate::core::{Error, ErrorCode, Result};

/// Rows per Native block (ClickHouse's default `max_block_size` is 65409).
const BLOCK_ROWS: usize = 65_536;
/// A block is also cut once its data reaches this size.
const BLOCK_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    UInt8,
    UInt16,
    UInt32,
    UInt64,
    Int8,
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    String,
    FixedString(usize),
    Bool,
    Date,
    Date32,
    DateTime,
    /// `Nothing` (the type of `NULL`): written as `Nullable(String)`.
    Nothing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BinType {
    pub base: Base,
    pub nullable: bool,
}

impl BinType {
    /// Parse a ClickHouse type name (the subset these formats carry here).
    pub fn parse(name: &str) -> Result<BinType> {
        let n = name.trim();
        if let Some(inner) = strip_call(n, "Nullable") {
            let t = BinType::parse(inner)?;
            return Ok(BinType {
                base: t.base,
                nullable: true,
            });
        }
        if let Some(inner) = strip_call(n, "LowCardinality") {
            // Only without client_protocol_version, where it is sent as the plain type.
            return BinType::parse(inner);
        }
        let base = if let Some(len) = strip_call(n, "FixedString") {
            Base::FixedString(len.trim().parse().map_err(|_| unknown_type(n))?)
        } else if n.starts_with("DateTime(") {
            Base::DateTime
        } else {
            match n {
                "UInt8" => Base::UInt8,
                "UInt16" => Base::UInt16,
                "UInt32" => Base::UInt32,
                "UInt64" => Base::UInt64,
                "Int8" => Base::Int8,
                "Int16" => Base::Int16,
                "Int32" => Base::Int32,
                "Int64" => Base::Int64,
                "Float32" => Base::Float32,
                "Float64" => Base::Float64,
                "String" => Base::String,
                "Bool" | "Boolean" => Base::Bool,
                "Date" => Base::Date,
                "Date32" => Base::Date32,
                "DateTime" => Base::DateTime,
                "Nothing" => Base::Nothing,
                _ => return Err(unknown_type(n)),
            }
        };
        Ok(BinType {
            base,
            nullable: false,
        })
    }

    /// The type a result column of ClickHouse type `ty` (as [`super::format::Column`] has it)
    /// is written with. SQLite columns may hold NULL anywhere, so the wide types (those of
    /// table columns and of expressions over rows) are `Nullable`; the narrow types of a
    /// single literal row are exact.
    pub fn for_output(ty: &str) -> BinType {
        match BinType::parse(ty) {
            Ok(BinType {
                base: Base::Nothing,
                ..
            })
            | Err(_) => BinType {
                base: Base::String,
                nullable: true,
            },
            Ok(t) if matches!(t.base, Base::Int64 | Base::Float64 | Base::String) => BinType {
                base: t.base,
                nullable: true,
            },
            Ok(t) => t,
        }
    }

    pub fn name(&self) -> String {
        let base = match self.base {
            Base::UInt8 => "UInt8".to_string(),
            Base::UInt16 => "UInt16".into(),
            Base::UInt32 => "UInt32".into(),
            Base::UInt64 => "UInt64".into(),
            Base::Int8 => "Int8".into(),
            Base::Int16 => "Int16".into(),
            Base::Int32 => "Int32".into(),
            Base::Int64 => "Int64".into(),
            Base::Float32 => "Float32".into(),
            Base::Float64 => "Float64".into(),
            Base::String | Base::Nothing => "String".into(),
            Base::FixedString(n) => format!("FixedString({n})"),
            Base::Bool => "Bool".into(),
            Base::Date => "Date".into(),
            Base::Date32 => "Date32".into(),
            Base::DateTime => "DateTime".into(),
        };
        if self.nullable {
            format!("Nullable({base})")
        } else {
            base
        }
    }
}

fn strip_call<'a>(s: &'a str, f: &str) -> Option<&'a str> {
    s.strip_prefix(f)?
        .trim_start()
        .strip_prefix('(')?
        .strip_suffix(')')
}

fn unknown_type(n: &str) -> Error {
    Error::new(
        ErrorCode::UnknownType,
        format!(
            "Type {n} is not supported by ichibase's binary formats; supported: (U)Int8-64, Float32/64, String, FixedString(N), Bool, Date, Date32, DateTime, Nullable of these"
        ),
    )
}

pub fn write_varuint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

pub fn write_str(s: &[u8], out: &mut Vec<u8>) {
    write_varuint(s.len() as u64, out);
    out.extend_from_slice(s);
}

fn mismatch(col: &str, ty: &BinType, v: ValueRef<'_>) -> Error {
    let shown = match v {
        ValueRef::Null => "NULL".to_string(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => f.to_string(),
        ValueRef::Text(t) => format!("'{}'", String::from_utf8_lossy(&t[..t.len().min(50)])),
        ValueRef::Blob(b) => format!("a blob of {} bytes", b.len()),
    };
    Error::new(
        ErrorCode::IncorrectData,
        format!(
            "Column '{col}' is {} but holds {shown} (SQLite columns are dynamically typed); CAST the column in the query or use a text format",
            ty.name()
        ),
    )
}

fn as_int(v: ValueRef<'_>) -> Option<i64> {
    match v {
        ValueRef::Integer(i) => Some(i),
        ValueRef::Real(f) if f.fract() == 0.0 && f.abs() < 9.2e18 => Some(f as i64),
        ValueRef::Text(t) => std::str::from_utf8(t).ok()?.trim().parse().ok(),
        _ => None,
    }
}

fn as_float(v: ValueRef<'_>) -> Option<f64> {
    match v {
        ValueRef::Integer(i) => Some(i as f64),
        ValueRef::Real(f) => Some(f),
        ValueRef::Text(t) => std::str::from_utf8(t).ok()?.trim().parse().ok(),
        _ => None,
    }
}

/// Write the default value of `base` (under a NULL).
fn write_default(base: Base, out: &mut Vec<u8>) {
    let n = match base {
        Base::UInt8 | Base::Int8 | Base::Bool => 1,
        Base::UInt16 | Base::Int16 | Base::Date => 2,
        Base::UInt32 | Base::Int32 | Base::Float32 | Base::Date32 | Base::DateTime => 4,
        Base::UInt64 | Base::Int64 | Base::Float64 => 8,
        Base::String | Base::Nothing => 1,
        Base::FixedString(n) => n,
    };
    out.extend(std::iter::repeat_n(0u8, n));
}

/// Write a non-NULL value as `base`.
fn write_value(col: &str, ty: &BinType, v: ValueRef<'_>, out: &mut Vec<u8>) -> Result<()> {
    let bad = || mismatch(col, ty, v);
    macro_rules! int {
        ($t:ty) => {{
            let i = as_int(v).ok_or_else(bad)?;
            let x: $t = <$t>::try_from(i).map_err(|_| bad())?;
            out.extend_from_slice(&x.to_le_bytes());
        }};
    }
    match ty.base {
        Base::UInt8 => int!(u8),
        Base::UInt16 => int!(u16),
        Base::UInt32 => int!(u32),
        Base::UInt64 => int!(u64),
        Base::Int8 => int!(i8),
        Base::Int16 => int!(i16),
        Base::Int32 => int!(i32),
        Base::Int64 => int!(i64),
        Base::Bool => {
            let i = as_int(v).ok_or_else(bad)?;
            out.push(u8::from(i != 0));
        }
        Base::Float32 => {
            out.extend_from_slice(&(as_float(v).ok_or_else(bad)? as f32).to_le_bytes())
        }
        Base::Float64 => out.extend_from_slice(&as_float(v).ok_or_else(bad)?.to_le_bytes()),
        Base::String | Base::Nothing => match v {
            ValueRef::Text(t) | ValueRef::Blob(t) => write_str(t, out),
            ValueRef::Integer(i) => write_str(i.to_string().as_bytes(), out),
            ValueRef::Real(f) => {
                let mut s = Vec::new();
                super::format::float_text(f, &mut s);
                write_str(&s, out)
            }
            ValueRef::Null => write_str(b"", out),
        },
        Base::FixedString(n) => match v {
            ValueRef::Text(t) | ValueRef::Blob(t) if t.len() <= n => {
                out.extend_from_slice(t);
                out.extend(std::iter::repeat_n(0u8, n - t.len()));
            }
            _ => return Err(bad()),
        },
        Base::Date | Base::Date32 | Base::DateTime => return Err(bad()),
    }
    Ok(())
}

/// One column of a Native block being built.
struct NativeColumn {
    name: String,
    ty: BinType,
    nulls: Vec<u8>,
    data: Vec<u8>,
}

/// Builds Native blocks row by row.
pub struct NativeWriter {
    cols: Vec<NativeColumn>,
    rows: usize,
    blocks: u64,
}

impl NativeWriter {
    pub fn new(cols: &[(String, String)]) -> NativeWriter {
        NativeWriter {
            cols: cols
                .iter()
                .map(|(name, ty)| NativeColumn {
                    name: name.clone(),
                    ty: BinType::for_output(ty),
                    nulls: Vec::new(),
                    data: Vec::new(),
                })
                .collect(),
            rows: 0,
            blocks: 0,
        }
    }

    pub fn row<'r>(
        &mut self,
        values: &mut dyn FnMut(usize) -> Result<ValueRef<'r>>,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let mut bytes = 0;
        for (i, c) in self.cols.iter_mut().enumerate() {
            let v = values(i)?;
            if c.ty.nullable {
                c.nulls.push(u8::from(v == ValueRef::Null));
            }
            if v == ValueRef::Null {
                if !c.ty.nullable {
                    return Err(mismatch(&c.name, &c.ty, v));
                }
                write_default(c.ty.base, &mut c.data);
            } else {
                write_value(&c.name, &c.ty, v, &mut c.data)?;
            }
            bytes += c.data.len();
        }
        self.rows += 1;
        if self.rows >= BLOCK_ROWS || bytes >= BLOCK_BYTES {
            self.flush(out);
        }
        Ok(())
    }

    fn flush(&mut self, out: &mut Vec<u8>) {
        write_varuint(self.cols.len() as u64, out);
        write_varuint(self.rows as u64, out);
        for c in &mut self.cols {
            write_str(c.name.as_bytes(), out);
            write_str(c.ty.name().as_bytes(), out);
            out.append(&mut c.nulls);
            out.append(&mut c.data);
        }
        self.rows = 0;
        self.blocks += 1;
    }

    /// The last block; an empty result still gets one block (names and types, no rows).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.rows > 0 || self.blocks == 0 {
            self.flush(out);
        }
    }
}

/// RowBinary(WithNamesAndTypes) writer.
pub struct RowBinaryWriter {
    cols: Vec<(String, BinType)>,
}

impl RowBinaryWriter {
    pub fn new(cols: &[(String, String)], with_header: bool, out: &mut Vec<u8>) -> RowBinaryWriter {
        let cols: Vec<(String, BinType)> = cols
            .iter()
            .map(|(n, t)| (n.clone(), BinType::for_output(t)))
            .collect();
        if with_header {
            write_varuint(cols.len() as u64, out);
            for (n, _) in &cols {
                write_str(n.as_bytes(), out);
            }
            for (_, t) in &cols {
                write_str(t.name().as_bytes(), out);
            }
        }
        RowBinaryWriter { cols }
    }

    pub fn row<'r>(
        &mut self,
        values: &mut dyn FnMut(usize) -> Result<ValueRef<'r>>,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        for (i, (name, ty)) in self.cols.iter().enumerate() {
            let v = values(i)?;
            if ty.nullable {
                out.push(u8::from(v == ValueRef::Null));
                if v == ValueRef::Null {
                    continue;
                }
            } else if v == ValueRef::Null {
                return Err(mismatch(name, ty, v));
            }
            write_value(name, ty, v, out)?;
        }
        Ok(())
    }
}

// ---- input ----

fn truncated(what: &str) -> Error {
    Error::new(
        ErrorCode::IncorrectData,
        format!("Cannot read binary insert data: it ends inside {what}"),
    )
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn at_end(&self) -> bool {
        self.pos >= self.data.len()
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.data.len() - self.pos < n {
            return Err(truncated(what));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn varuint(&mut self, what: &str) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.take(1, what)?[0];
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Error::new(
            ErrorCode::IncorrectData,
            format!("Malformed length in {what}"),
        ))
    }

    fn string(&mut self, what: &str) -> Result<&'a [u8]> {
        let n = self.varuint(what)?;
        let n = usize::try_from(n).map_err(|_| truncated(what))?;
        self.take(n, what)
    }

    fn value(&mut self, base: Base, col: &str) -> Result<Value> {
        macro_rules! num {
            ($t:ty, $n:expr) => {{
                let b = self.take($n, col)?;
                <$t>::from_le_bytes(b.try_into().unwrap())
            }};
        }
        Ok(match base {
            Base::UInt8 => Value::Integer(num!(u8, 1) as i64),
            Base::Bool => Value::Integer(i64::from(num!(u8, 1) != 0)),
            Base::UInt16 => Value::Integer(num!(u16, 2) as i64),
            Base::UInt32 => Value::Integer(num!(u32, 4) as i64),
            Base::UInt64 => {
                let v = num!(u64, 8);
                Value::Integer(i64::try_from(v).map_err(|_| {
                    Error::new(
                        ErrorCode::IncorrectData,
                        format!("Column '{col}': UInt64 value {v} does not fit SQLite's 64-bit signed integers"),
                    )
                })?)
            }
            Base::Int8 => Value::Integer(num!(i8, 1) as i64),
            Base::Int16 => Value::Integer(num!(i16, 2) as i64),
            Base::Int32 => Value::Integer(num!(i32, 4) as i64),
            Base::Int64 => Value::Integer(num!(i64, 8)),
            Base::Float32 => Value::Real(num!(f32, 4) as f64),
            Base::Float64 => Value::Real(num!(f64, 8)),
            Base::String | Base::Nothing => bytes_value(self.string(col)?),
            Base::FixedString(n) => bytes_value(self.take(n, col)?),
            Base::Date => {
                let d = num!(u16, 2) as i64;
                Value::Text(date_text(d))
            }
            Base::Date32 => {
                let d = num!(i32, 4) as i64;
                Value::Text(date_text(d))
            }
            Base::DateTime => {
                let s = num!(u32, 4) as i64;
                Value::Text(
                    chrono::DateTime::from_timestamp(s, 0)
                        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                        .unwrap_or_default(),
                )
            }
        })
    }
}

fn date_text(days: i64) -> String {
    chrono::DateTime::from_timestamp(days * 86_400, 0)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

fn bytes_value(b: &[u8]) -> Value {
    match std::str::from_utf8(b) {
        Ok(s) => Value::Text(s.to_string()),
        Err(_) => Value::Blob(b.to_vec()),
    }
}

/// Call `f(columns, values)` for every row of Native blocks in `data`.
pub fn read_native(
    data: &[u8],
    f: &mut dyn FnMut(&[String], Vec<Value>) -> Result<()>,
) -> Result<u64> {
    let mut r = Reader { data, pos: 0 };
    let mut n = 0u64;
    while !r.at_end() {
        let ncols = r.varuint("a block header")? as usize;
        let nrows = r.varuint("a block header")? as usize;
        if ncols == 0 {
            continue;
        }
        let mut names = Vec::with_capacity(ncols.min(1024));
        let mut columns: Vec<Vec<Value>> = Vec::with_capacity(ncols.min(1024));
        for _ in 0..ncols {
            let name = String::from_utf8_lossy(r.string("a column name")?).into_owned();
            let ty_name = String::from_utf8_lossy(r.string("a column type")?).into_owned();
            let ty = BinType::parse(&ty_name)?;
            // Never trust a row count for an allocation: values are read one by one.
            let nulls = if ty.nullable {
                Some(r.take(nrows, &name)?)
            } else {
                None
            };
            let mut vals = Vec::new();
            for i in 0..nrows {
                let v = r.value(ty.base, &name)?;
                vals.push(if nulls.is_some_and(|m| m[i] != 0) {
                    Value::Null
                } else {
                    v
                });
            }
            names.push(name);
            columns.push(vals);
        }
        let mut iters: Vec<_> = columns.into_iter().map(|c| c.into_iter()).collect();
        for _ in 0..nrows {
            let row: Vec<Value> = iters
                .iter_mut()
                .map(|c| c.next().unwrap_or(Value::Null))
                .collect();
            n += 1;
            f(&names, row)?;
        }
    }
    Ok(n)
}

/// Call `f(columns, values)` for every row of RowBinary data. `header`: the data starts with
/// names and types (RowBinaryWithNamesAndTypes); otherwise `columns` gives names and types.
pub fn read_row_binary(
    data: &[u8],
    header: bool,
    columns: &mut dyn FnMut() -> Result<Vec<(String, String)>>,
    f: &mut dyn FnMut(&[String], Vec<Value>) -> Result<()>,
) -> Result<u64> {
    let mut r = Reader { data, pos: 0 };
    let (names, types): (Vec<String>, Vec<BinType>) = if header {
        let n = r.varuint("the header")? as usize;
        let mut names = Vec::new();
        for _ in 0..n {
            names.push(String::from_utf8_lossy(r.string("the header")?).into_owned());
        }
        let mut types = Vec::new();
        for _ in 0..n {
            types.push(BinType::parse(&String::from_utf8_lossy(
                r.string("the header")?,
            ))?);
        }
        (names, types)
    } else {
        let cols = columns()?;
        let types = cols
            .iter()
            .map(|(_, t)| BinType::parse(t))
            .collect::<Result<Vec<_>>>()?;
        (cols.into_iter().map(|(n, _)| n).collect(), types)
    };
    let mut n = 0u64;
    while !r.at_end() {
        let mut row = Vec::with_capacity(types.len());
        for (name, ty) in names.iter().zip(&types) {
            if ty.nullable && r.take(1, name)?[0] != 0 {
                row.push(Value::Null);
                continue;
            }
            row.push(r.value(ty.base, name)?);
        }
        n += 1;
        f(&names, row)?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_round_trip() {
        let mut w = NativeWriter::new(&[
            ("a".into(), "Int64".into()),
            ("s".into(), "String".into()),
            ("one".into(), "UInt8".into()),
        ]);
        let mut out = Vec::new();
        let rows: Vec<Vec<Value>> = vec![
            vec![
                Value::Integer(7),
                Value::Text("x".into()),
                Value::Integer(1),
            ],
            vec![Value::Null, Value::Null, Value::Integer(2)],
        ];
        for r in &rows {
            w.row(&mut |i| Ok(ValueRef::from(&r[i])), &mut out).unwrap();
        }
        w.finish(&mut out);
        let mut got = Vec::new();
        read_native(&out, &mut |names, vals| {
            assert_eq!(names, ["a", "s", "one"]);
            got.push(vals);
            Ok(())
        })
        .unwrap();
        assert_eq!(got, rows);
    }

    #[test]
    fn row_binary_round_trip() {
        let mut out = Vec::new();
        let mut w = RowBinaryWriter::new(&[("f".into(), "Float64".into())], true, &mut out);
        w.row(&mut |_| Ok(ValueRef::Real(1.5)), &mut out).unwrap();
        w.row(&mut |_| Ok(ValueRef::Null), &mut out).unwrap();
        let mut got = Vec::new();
        read_row_binary(&out, true, &mut || unreachable!(), &mut |_, v| {
            got.push(v);
            Ok(())
        })
        .unwrap();
        assert_eq!(got, vec![vec![Value::Real(1.5)], vec![Value::Null]]);
    }

    #[test]
    fn truncated_input_is_an_error() {
        let e = read_native(&[1, 5, 1, b'a'], &mut |_, _| Ok(())).unwrap_err();
        assert_eq!(e.code, ErrorCode::IncorrectData);
    }
}
